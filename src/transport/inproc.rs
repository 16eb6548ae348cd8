//! The in-process transport: two engines in one process, or an engine and
//! itself, move data with a plain memory copy.
//!
//! Engines of this process find each other through a directory keyed by
//! their random token. A copy job re-checks every remote range against the
//! target's own registry at post time, and pins both regions around each
//! piece it copies, so deregistration and cancellation are honoured exactly.

use std::collections::HashMap;
use std::sync::{Arc, LazyLock, Weak};

use parking_lot::Mutex;

use super::{Completion, Op, Plan, Transfer};
use crate::backend::progress::Job;
use crate::backend::registry::LocalRegion;
use crate::backend::{AgentName, Endpoint, Error, Result};

static DIRECTORY: LazyLock<Mutex<HashMap<u128, Weak<Endpoint>>>> =
    LazyLock::new(|| Mutex::new(HashMap::new()));

/// Makes an engine reachable by other engines of this process.
pub fn publish(endpoint: &Arc<Endpoint>) {
    DIRECTORY
        .lock()
        .insert(endpoint.token, Arc::downgrade(endpoint));
}

/// Removes an engine from the directory.
pub fn withdraw(token: u128) {
    DIRECTORY.lock().remove(&token);
}

/// Finds a live engine of this process by token.
pub fn find(token: u128) -> Option<Weak<Endpoint>> {
    DIRECTORY.lock().get(&token).cloned()
}

/// A notification to deliver once a job's data is in place.
#[derive(Debug)]
pub struct Delivery {
    /// Sender's name, as the receiver will see it.
    pub from: AgentName,
    /// Message bytes.
    pub msg: Vec<u8>,
}

#[derive(Debug, Default)]
struct Cursor {
    segment: usize,
    offset: u64,
    stopped: bool,
}

/// One post of a plan, executed by memory copies.
pub struct CopyJob {
    plan: Arc<Plan>,
    /// The target's regions, index-aligned with `plan.remote_regions`.
    targets: Vec<Arc<LocalRegion>>,
    target: Arc<Endpoint>,
    notif: Option<Delivery>,
    cursor: Mutex<Cursor>,
    completion: Completion,
}

impl CopyJob {
    /// Prepares one post: the target checks every remote range against its
    /// registry, as a remote peer would before touching a byte.
    ///
    /// # Errors
    /// [`Error::NotAllowed`] when a key is unknown to the target or a range
    /// lies outside its registration.
    pub fn new(plan: Arc<Plan>, target: Arc<Endpoint>, notif: Option<Delivery>) -> Result<CopyJob> {
        let targets = plan
            .remote_regions
            .iter()
            .zip(&plan.remote_extent)
            .map(|(r, &(lo, hi))| {
                target.registry.resolve(r.key, lo, hi - lo).map_err(|e| {
                    Error::NotAllowed(format!("agent {} refused the transfer: {e}", target.name))
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(CopyJob {
            plan,
            targets,
            target,
            notif,
            cursor: Mutex::new(Cursor::default()),
            completion: Completion::default(),
        })
    }

    /// Copies one piece. Both regions are pinned by the caller.
    fn copy(&self, local_addr: u64, remote_addr: u64, len: u64) {
        let (src, dst) = match self.plan.op {
            Op::Write => (local_addr, remote_addr),
            Op::Read => (remote_addr, local_addr),
        };
        // SAFETY: both ranges lie inside live registrations of this process
        // (local ranges were checked at prep time against our registry, remote
        // ones at post time against the target's registry), and both regions
        // are pinned, so they stay registered for the duration of the copy.
        // `copy` (memmove) is used because a loopback transfer may overlap.
        unsafe { std::ptr::copy(src as *const u8, dst as *mut u8, len as usize) };
    }

    fn fail(&self, cursor: &mut Cursor, error: Error) {
        cursor.stopped = true;
        self.completion.finish(Err(error));
    }
}

impl Job for CopyJob {
    fn step(&self, budget: usize) -> bool {
        let mut c = self.cursor.lock();
        if c.stopped {
            return true;
        }
        let segments = &self.plan.segments;
        let mut moved = 0u64;
        while c.segment < segments.len() && moved < budget as u64 {
            let s = segments[c.segment];
            let chunk = (s.len - c.offset).min(budget as u64 - moved);
            if chunk > 0 {
                let local = &self.plan.local_regions[s.local as usize];
                let Some(_local_pin) = local.pin() else {
                    let e = Error::InvalidParam(format!(
                        "local region {:#x}+{} was deregistered during the transfer",
                        local.addr, local.len
                    ));
                    self.fail(&mut c, e);
                    return true;
                };
                let Some(_remote_pin) = self.targets[s.remote as usize].pin() else {
                    let e = Error::RemoteDisconnect(format!(
                        "agent {} deregistered the target region during the transfer",
                        self.target.name
                    ));
                    self.fail(&mut c, e);
                    return true;
                };
                self.copy(s.local_addr + c.offset, s.remote_addr + c.offset, chunk);
            }
            c.offset += chunk;
            moved += chunk;
            if c.offset == s.len {
                c.segment += 1;
                c.offset = 0;
            }
        }
        if c.segment < segments.len() {
            return false;
        }
        // Every byte is in place: the notification may now be seen.
        if let Some(n) = &self.notif {
            self.target.inbox.push(n.from.clone(), n.msg.clone());
        }
        c.stopped = true;
        self.completion.finish(Ok(()));
        true
    }

    fn cancel(&self) {
        let mut c = self.cursor.lock();
        if !c.stopped {
            c.stopped = true;
            self.completion.finish(Err(Error::Canceled(
                "the request was released while in flight".into(),
            )));
        }
    }
}

impl Transfer for CopyJob {
    fn completion(&self) -> &Completion {
        &self.completion
    }

    fn cancel(&self) {
        Job::cancel(self);
    }
}
