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

use super::job::{Mover, SegmentJob};
use super::{Op, Plan};
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

/// Moves a plan's bytes with a memory copy into an engine of this process.
pub struct InProcCopy {
    /// The target's regions, index-aligned with the plan's remote regions.
    targets: Vec<Arc<LocalRegion>>,
    target: Arc<Endpoint>,
    notif: Option<Delivery>,
}

/// One post to an engine of this process.
pub type CopyJob = SegmentJob<InProcCopy>;

impl InProcCopy {
    /// Prepares one post: the target checks every remote range against its
    /// registry, as a remote peer would before touching a byte.
    ///
    /// # Errors
    /// [`Error::NotAllowed`] when a key is unknown to the target or a range
    /// lies outside its registration.
    pub fn job(plan: Arc<Plan>, target: Arc<Endpoint>, notif: Option<Delivery>) -> Result<CopyJob> {
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
        Ok(SegmentJob::new(
            plan,
            InProcCopy {
                targets,
                target,
                notif,
            },
        ))
    }
}

impl Mover for InProcCopy {
    fn move_bytes(&self, plan: &Plan, segment: usize, offset: u64, budget: u64) -> Result<u64> {
        let s = plan.segments[segment];
        let len = (s.len - offset).min(budget);
        if len == 0 {
            return Ok(0);
        }
        let local = &plan.local_regions[s.local as usize];
        let _local_pin = local.pin().ok_or_else(|| {
            Error::InvalidParam(format!(
                "local region {:#x}+{} was deregistered during the transfer",
                local.addr, local.len
            ))
        })?;
        let _remote_pin = self.targets[s.remote as usize].pin().ok_or_else(|| {
            Error::RemoteDisconnect(format!(
                "agent {} deregistered the target region during the transfer",
                self.target.name
            ))
        })?;
        let (l, r) = (s.local_addr + offset, s.remote_addr + offset);
        let (src, dst) = match plan.op {
            Op::Write => (l, r),
            Op::Read => (r, l),
        };
        // SAFETY: both ranges lie inside live registrations of this process
        // (local ranges were checked at prep time against our registry, remote
        // ones at post time against the target's registry), and both regions
        // are pinned, so they stay registered for the duration of the copy.
        // `copy` (memmove) is used because a loopback transfer may overlap.
        unsafe { std::ptr::copy(src as *const u8, dst as *mut u8, len as usize) };
        Ok(len)
    }

    fn finished(&self) -> Result<()> {
        if let Some(n) = &self.notif {
            self.target.inbox.push(n.from.clone(), n.msg.clone());
        }
        Ok(())
    }
}
