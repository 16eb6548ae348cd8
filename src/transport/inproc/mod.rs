//! The in-process transport: two engines in one process, or an engine and
//! itself, move data with a plain memory copy.
//!
//! Engines of this process find each other through a directory keyed by
//! their random token. A copy job re-checks every remote range against the
//! target's own registry at post time, and pins both regions around each
//! piece it copies, so deregistration and cancellation are honoured exactly.
//!
//! Segments that touch GPU memory (on either side) move as device copies
//! on our own streams ([`cuda::Copier`]), many per step, waited for before
//! the step's pins are dropped.

use std::any::Any;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, LazyLock, Weak};

use parking_lot::Mutex;

use super::job::{Mover, SegmentJob};
use super::{Op, Plan, Posted, Route, Segment, Transport};
use crate::common::memory::DeviceAlloc;
use crate::common::{AgentName, Endpoint, Error, LocalRegion, MemKind, Pin, Result};
use crate::cuda;
use crate::wire::conn_info::ConnInfo;

/// An engine of this process as its peers find it.
#[derive(Clone)]
struct Listed {
    endpoint: Weak<Endpoint>,
    /// Cleared when the engine is destroyed (its endpoint may outlive it
    /// for a moment, held by a peer's job).
    alive: Arc<AtomicBool>,
}

static DIRECTORY: LazyLock<Mutex<HashMap<u128, Listed>>> =
    LazyLock::new(|| Mutex::new(HashMap::new()));

/// The in-process transport of one engine: makes it reachable by the other
/// engines of this process.
#[derive(Clone)]
pub struct InProcTransport {
    endpoint: Arc<Endpoint>,
    alive: Arc<AtomicBool>,
}

impl InProcTransport {
    /// Makes the engine of `endpoint` reachable by other engines of this
    /// process (until [`Transport::shutdown`]).
    pub fn publish(endpoint: Arc<Endpoint>) -> InProcTransport {
        let alive = Arc::new(AtomicBool::new(true));
        DIRECTORY.lock().insert(
            endpoint.token,
            Listed {
                endpoint: Arc::downgrade(&endpoint),
                alive: alive.clone(),
            },
        );
        InProcTransport { endpoint, alive }
    }

    /// The route of the engine to itself.
    pub fn loopback(&self) -> InProcRoute {
        InProcRoute {
            me: self.endpoint.name.clone(),
            target: Target::Loopback(self.endpoint.clone()),
        }
    }

    /// A route to agent `name`, the engine of this process with `token`.
    ///
    /// # Errors
    /// [`Error::RemoteDisconnect`] when no such engine exists any more.
    pub fn route(&self, name: &AgentName, token: u128) -> Result<InProcRoute> {
        let target = DIRECTORY.lock().get(&token).cloned().ok_or_else(|| {
            Error::RemoteDisconnect(format!(
                "agent {name}'s engine no longer exists in this process"
            ))
        })?;
        Ok(InProcRoute {
            me: self.endpoint.name.clone(),
            target: Target::Peer(name.clone(), target),
        })
    }
}

impl Transport for InProcTransport {
    fn name(&self) -> &'static str {
        "in-process copy"
    }

    /// Nothing to publish: peers know we share their process by the host
    /// identity and pid of our connection info.
    fn publish(&self, _info: &mut ConnInfo) {}

    fn shutdown(&self) {
        DIRECTORY.lock().remove(&self.endpoint.token);
        self.alive.store(false, Ordering::SeqCst);
    }

    fn as_any(&self) -> &dyn Any {
        self
    }
}

enum Target {
    /// Ourselves.
    Loopback(Arc<Endpoint>),
    /// Another engine of this process.
    Peer(AgentName, Listed),
}

/// A route to an engine of this process (or to ourselves).
pub struct InProcRoute {
    /// Our name, as the receiver of a notification sees it.
    me: AgentName,
    target: Target,
}

impl InProcRoute {
    /// The target engine, or [`Error::RemoteDisconnect`] (with `what` as
    /// the message's prefix) once it was destroyed.
    fn target(&self, what: &str) -> Result<Arc<Endpoint>> {
        match &self.target {
            Target::Loopback(ep) => Ok(ep.clone()),
            Target::Peer(name, listed) => listed
                .alive
                .load(Ordering::SeqCst)
                .then(|| listed.endpoint.upgrade())
                .flatten()
                .ok_or_else(|| {
                    Error::RemoteDisconnect(format!("{what}agent {name}'s engine was destroyed"))
                }),
        }
    }
}

impl Route for InProcRoute {
    fn transport(&self) -> &'static str {
        "in-process copy"
    }

    fn same_address_space(&self) -> bool {
        true
    }

    fn describe(&self) -> String {
        "direct copy (same process)".into()
    }

    /// Host and GPU memory on either side: device copies move whatever
    /// touches a GPU.
    fn serves(&self, local: MemKind, remote: MemKind) -> bool {
        local.is_memory() && remote.is_memory()
    }

    fn connect(&self) -> Result<()> {
        Ok(())
    }

    fn post(&self, plan: &Arc<Plan>, notif: Option<&[u8]>) -> Result<Posted> {
        let target = self.target("")?;
        let notif = notif.map(|msg| Delivery {
            from: self.me.clone(),
            msg: msg.to_vec(),
        });
        Ok(Posted::stepped(Arc::new(InProcCopy::job(
            plan.clone(),
            target,
            notif,
        )?)))
    }

    fn notify(&self, msg: &[u8]) -> Result<()> {
        let target = self.target("genNotif: ")?;
        deliver(&target, &self.me, msg.to_vec())
    }

    fn is_down(&self) -> bool {
        self.target("").is_err()
    }

    fn as_any(&self) -> &dyn Any {
        self
    }
}

/// Puts `msg` from `from` into `target`'s inbox.
///
/// # Errors
/// [`Error::NotAllowed`] when the inbox has no room for it.
fn deliver(target: &Endpoint, from: &AgentName, msg: Vec<u8>) -> Result<()> {
    target.inbox.push(from.clone(), msg).map_err(|why| {
        Error::NotAllowed(format!(
            "agent {} refused the notification: {why}",
            target.name
        ))
    })
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

/// Most bytes one step queues on a device stream before waiting for them
/// (a step holds the job's cursor: a cancel or a helping caller waits for
/// it).
const DEVICE_STEP_BYTES: u64 = 16 << 20;
/// Most copies one step queues on a device stream before waiting for them.
const DEVICE_STEP_COPIES: usize = 4096;

impl InProcCopy {
    /// Pins the local and the target region of segment `s` of `plan`.
    fn pin<'a>(&'a self, plan: &'a Plan, s: &Segment) -> Result<(Pin<'a>, Pin<'a>)> {
        let local_pin = plan.local_regions[s.local as usize].pin_local()?;
        let remote_pin = self.targets[s.remote as usize].pin().ok_or_else(|| {
            Error::RemoteDisconnect(format!(
                "agent {} deregistered the target region during the transfer",
                self.target.name
            ))
        })?;
        Ok((local_pin, remote_pin))
    }

    /// The GPU side of segment `s`, if it has one (the local one first).
    fn device_of<'a>(&'a self, plan: &'a Plan, s: &Segment) -> Option<&'a DeviceAlloc> {
        plan.local_regions[s.local as usize]
            .device
            .as_ref()
            .or(self.targets[s.remote as usize].device.as_ref())
    }

    /// Moves the segments from `segment` + `offset` on that touch GPU
    /// memory with device copies on one of our streams: queues many at
    /// once, then waits for all of them before the pins are dropped (so a
    /// deregistration or a cancel that waits for this step also waits for
    /// the device).
    fn device_step(&self, plan: &Plan, segment: usize, offset: u64) -> Result<u64> {
        let first = &plan.segments[segment];
        let Some(device) = self.device_of(plan, first) else {
            return Ok(0);
        };
        let driver = cuda::driver()?;
        let mut pins = Vec::new();
        let mut copier = cuda::Copier::new(driver, device.context)?;
        let (mut at, mut offset, mut moved, mut copies) = (segment, offset, 0u64, 0usize);
        let mut pinned = None;
        while at < plan.segments.len() && moved < DEVICE_STEP_BYTES && copies < DEVICE_STEP_COPIES {
            let s = &plan.segments[at];
            if self.device_of(plan, s).is_none() {
                break;
            }
            if pinned != Some((s.local, s.remote)) {
                pins.push(self.pin(plan, s)?);
                pinned = Some((s.local, s.remote));
            }
            let len = (s.len - offset).min(DEVICE_STEP_BYTES - moved);
            if len > 0 {
                let (l, r) = (s.local_addr + offset, s.remote_addr + offset);
                let (src, dst) = match plan.op {
                    Op::Write => (l, r),
                    Op::Read => (r, l),
                };
                if src < dst + len && dst < src + len {
                    // A loopback transfer onto itself: device copies are
                    // undefined for overlapping ranges.
                    return Err(Error::InvalidParam(format!(
                        "the source {src:#x}+{len} and destination {dst:#x}+{len} of a GPU memory \
                         copy overlap"
                    )));
                }
                // SAFETY: both ranges lie inside live registrations
                // (checked at prep and post time) pinned in `pins`, which
                // are dropped only after the copier waited for the device.
                unsafe { copier.copy(dst, src, len) }?;
                copies += 1;
            }
            moved += len;
            offset += len;
            if offset == s.len {
                at += 1;
                offset = 0;
            }
        }
        copier.wait()?;
        drop(copier);
        drop(pins);
        Ok(moved)
    }
}

impl Mover for InProcCopy {
    fn move_bytes(&self, plan: &Plan, segment: usize, offset: u64, budget: u64) -> Result<u64> {
        let s = &plan.segments[segment];
        if self.device_of(plan, s).is_some() {
            return self.device_step(plan, segment, offset);
        }
        let len = (s.len - offset).min(budget);
        if len == 0 {
            return Ok(0);
        }
        let _pins = self.pin(plan, s)?;
        let (l, r) = (s.local_addr + offset, s.remote_addr + offset);
        let (src, dst) = match plan.op {
            Op::Write => (l, r),
            Op::Read => (r, l),
        };
        // SAFETY: both ranges lie inside live registrations of host memory
        // of this process (local ranges were checked at prep time against
        // our registry, remote ones at post time against the target's
        // registry), and both regions are pinned, so they stay registered
        // for the duration of the copy. `copy` (memmove) is used because a
        // loopback transfer may overlap.
        unsafe { std::ptr::copy(src as *const u8, dst as *mut u8, len as usize) };
        Ok(len)
    }

    fn finished(&self) -> Result<()> {
        match &self.notif {
            Some(n) => deliver(&self.target, &n.from, n.msg.clone()),
            None => Ok(()),
        }
    }
}
