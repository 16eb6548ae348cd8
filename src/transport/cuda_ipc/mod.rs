//! Same host, GPU memory: CUDA IPC. The peer's GPU memory is mapped into
//! this process and bytes move with device copies on our streams, as in one
//! process: a `cuMemAlloc` allocation by the legacy IPC handle its region's
//! public data carries (`cuIpcOpenMemHandle`), VMM chunks by the POSIX file
//! descriptors the peer exported (numbers in its public data), which we
//! take from its process (`pidfd_getfd`) while holding a lane of the region,
//! import (`cuMemImportFromShareableHandle`) and map side by side in one
//! reservation of ours.
//!
//! It rides on cross-memory attach's standing with the peer: the same probe
//! proved we may reach the peer's memory (the driver needs the same right to
//! take the peer's allocation), and every step enters the peer's control
//! page for the regions it touches and holds the lane until the device
//! finished, so a deregistration on the peer waits for copies in flight and
//! none starts after it. Notifications ride the peer's TCP link, sent after
//! the last device copy completed.
//!
//! A plan whose remote GPU memory has neither (VMM chunks made without the
//! POSIX descriptor handle type, a driver without IPC) goes to the TCP link
//! instead, staged, with one log line. Mappings are cached per allocation
//! (legacy) or per region (VMM) and closed when the route goes (the peer
//! removed or disconnected), the peer is seen dead, or the region is found
//! deregistered (a job in flight keeps the mappings it uses until it ends).

use std::any::Any;
use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use parking_lot::Mutex;

use super::cma::CmaPeer;
use super::job::{Mover, SegmentJob};
use super::{Op, Plan, Posted, Route, Segment};
use crate::common::{Error, MemKind, Pin, Result};
use crate::cuda::{self, Copier, Imported};

/// Most bytes one step queues before waiting for the device.
const STEP_BYTES: u64 = 16 << 20;
/// Most copies one step queues before waiting for the device.
const STEP_COPIES: usize = 4096;

/// What a mapping is cached by (with our context).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Mapped {
    /// A legacy IPC allocation, by the driver's buffer id.
    Allocation(u64),
    /// The VMM chunks of a region, by its access key.
    Region(u64),
}

/// Mappings of a peer's GPU memory, by what they map and our context.
type Imports = Arc<Mutex<HashMap<(Mapped, usize), Arc<Imported>>>>;

/// A route to a same-host peer's GPU memory by CUDA IPC.
pub struct IpcRoute {
    peer: Arc<CmaPeer>,
    /// The peer's TCP link: notifications, and plans IPC cannot serve.
    control: Arc<dyn Route>,
    /// Mappings of the peer's GPU memory, by what they map and our context.
    imports: Imports,
    /// Whether plans IPC cannot serve may be staged through `control`
    /// (not under `protocol=cma`, which asks for same-host paths only).
    stage: bool,
    /// Whether the fallback to TCP was logged already.
    fell_back: AtomicBool,
}

impl IpcRoute {
    /// A route to `peer` (probed by cross-memory attach), with `control`
    /// its TCP link; with `stage`, plans IPC cannot serve go over `control`.
    pub fn new(peer: Arc<CmaPeer>, control: Arc<dyn Route>, stage: bool) -> IpcRoute {
        IpcRoute {
            peer,
            control,
            imports: Arc::default(),
            stage,
            fell_back: AtomicBool::new(false),
        }
    }

    /// The context our copies of `plan` run in, and its device: the first
    /// local GPU region's, else the primary context of the remote device's
    /// ordinal (or device 0 when we have no such device).
    fn context(plan: &Plan) -> Result<(usize, i32)> {
        if let Some(d) = plan.local_regions.iter().find_map(|r| r.device.as_ref()) {
            return Ok((d.context, d.ordinal));
        }
        let ordinal = plan
            .remote_regions
            .iter()
            .find(|r| r.ipc.is_some() || r.vmm.is_some())
            .map_or(0, |r| i32::try_from(r.dev_id).unwrap_or(0));
        match cuda::primary_context(ordinal) {
            Ok(c) => Ok((c, ordinal)),
            Err(_) => Ok((cuda::primary_context(0)?, 0)),
        }
    }

    /// The mappings of every remote region of `plan` (index-aligned), or
    /// `None` when one has neither an IPC handle nor shared VMM chunks.
    fn imports(
        &self,
        plan: &Plan,
        (context, ordinal): (usize, i32),
    ) -> Result<Option<Vec<Option<Arc<Imported>>>>> {
        let mut out = Vec::with_capacity(plan.remote_regions.len());
        for r in &plan.remote_regions {
            if MemKind::from_nixl(r.mem_type, r.dev_id) == MemKind::Dram {
                out.push(None); // only the local side of such a segment is a GPU's
                continue;
            }
            let mut imports = self.imports.lock();
            let mapped = if let Some(ipc) = r.ipc {
                // The same allocation as mapped before (a buffer id reused
                // with another handle is mapped anew).
                let id = (Mapped::Allocation(ipc.buffer_id), context);
                match imports.get(&id).filter(|m| m.maps(&ipc)) {
                    Some(m) => m.clone(),
                    None => {
                        let m = Arc::new(Imported::open(context, &ipc)?);
                        imports.insert(id, m.clone());
                        m
                    }
                }
            } else if let Some(vmm) = &r.vmm {
                let id = (Mapped::Region(r.key), context);
                match imports.get(&id) {
                    Some(m) => m.clone(),
                    None => {
                        // The peer's descriptors stay open while we hold
                        // the region's lane (its deregistration waits).
                        let _lane = self.peer.enter(&[r.key])?;
                        let take = |fd| self.peer.take_fd(fd);
                        let m = Arc::new(Imported::open_vmm(context, ordinal, vmm, take)?);
                        imports.insert(id, m.clone());
                        m
                    }
                }
            } else {
                return Ok(None);
            };
            out.push(Some(mapped));
        }
        Ok(Some(out))
    }
}

impl IpcRoute {
    /// A plan whose remote GPU memory has no IPC handle: staged over TCP
    /// under `auto` (one warning), refused under `cma`.
    fn no_handle(&self, plan: &Arc<Plan>, notif: Option<&[u8]>) -> Result<Posted> {
        if !self.stage {
            return Err(Error::NotSupported(format!(
                "GPU memory of agent {} cannot be mapped by CUDA IPC (no handle: VMM \
                 chunks not shared by file descriptor, or a driver without IPC), and \
                 protocol=cma stages nothing over TCP",
                self.peer.name()
            )));
        }
        if !self.fell_back.swap(true, Ordering::Relaxed) {
            log::warn!(
                "Mooncake: GPU memory of agent {} cannot be mapped by CUDA IPC (no handle: \
                 VMM chunks not shared by file descriptor, or a driver without IPC); staging \
                 it through TCP instead",
                self.peer.name()
            );
        }
        self.control.post(plan, notif)
    }
}

impl Route for IpcRoute {
    fn transport(&self) -> &'static str {
        "cuda-ipc"
    }

    fn describe(&self) -> String {
        format!("CUDA IPC (pid {} on this host)", self.peer.pid())
    }

    /// The peer's GPU memory, with our host or GPU memory.
    fn serves(&self, local: MemKind, remote: MemKind) -> bool {
        matches!(remote, MemKind::Vram { .. }) && local.is_memory()
    }

    fn connect(&self) -> Result<()> {
        self.control.connect()
    }

    fn post(&self, plan: &Arc<Plan>, notif: Option<&[u8]>) -> Result<Posted> {
        if !self.peer.alive() {
            self.imports.lock().clear(); // its memory is freed once nobody maps it
            return Err(Error::RemoteDisconnect(format!(
                "agent {} (pid {}) is gone",
                self.peer.name(),
                self.peer.pid()
            )));
        }
        let mapped = Self::context(plan).and_then(|c| Ok((c.0, self.imports(plan, c)?)));
        let (context, imports) = match mapped {
            Ok((context, Some(imports))) => (context, imports),
            // Deregistered by the peer, or the peer is gone: no staging helps.
            Err(e @ (Error::NotAllowed(_) | Error::RemoteDisconnect(_))) => return Err(e),
            Err(e) if self.stage => {
                if !self.fell_back.swap(true, Ordering::Relaxed) {
                    log::warn!(
                        "Mooncake: GPU memory of agent {} cannot be reached by CUDA IPC ({e}); \
                         staging it through TCP instead",
                        self.peer.name()
                    );
                }
                return self.control.post(plan, notif);
            }
            Err(e) => return Err(e),
            Ok((_, None)) => return self.no_handle(plan, notif),
        };
        Ok(Posted::stepped(Arc::new(SegmentJob::new(
            plan.clone(),
            IpcCopy {
                peer: self.peer.clone(),
                control: self.control.clone(),
                notif: notif.map(<[u8]>::to_vec),
                imports,
                cache: self.imports.clone(),
                context,
            },
        ))))
    }

    fn notify(&self, msg: &[u8]) -> Result<()> {
        self.control.notify(msg)
    }
    /// Also closes the mappings of a peer that exited: its memory is freed
    /// only once no other process maps it.
    fn is_down(&self) -> bool {
        if !self.peer.alive() {
            self.imports.lock().clear();
            return true;
        }
        self.control.is_down()
    }

    fn close(&self) {
        self.control.close();
    }

    /// A mapping of the region's VMM chunks holds the peer's memory: it goes
    /// (once no job in flight uses it).
    fn unloaded(&self, key: u64) {
        self.imports
            .lock()
            .retain(|(what, _), _| *what != Mapped::Region(key));
    }

    fn as_any(&self) -> &dyn Any {
        self
    }
}

/// Moves a plan's bytes between our memory and a peer's mapped GPU memory.
pub struct IpcCopy {
    peer: Arc<CmaPeer>,
    control: Arc<dyn Route>,
    notif: Option<Vec<u8>>,
    /// Mappings, index-aligned with the plan's remote regions.
    imports: Vec<Option<Arc<Imported>>>,
    /// The route's cache of mappings: the ones of regions the peer revoked
    /// are dropped from it.
    cache: Imports,
    context: usize,
}

impl IpcCopy {
    /// Where remote address `addr` of segment `s` is mapped here.
    fn mapped(&self, s: &Segment, addr: u64) -> Result<u64> {
        match &self.imports[s.remote as usize] {
            Some(m) => Ok(m.local(addr)),
            None => Err(Error::NotSupported(format!(
                "CUDA IPC cannot reach agent {}'s host memory at {addr:#x}",
                self.peer.name()
            ))),
        }
    }
}

impl Mover for IpcCopy {
    /// Queues the copies of many segments on one stream, then waits for
    /// the device, holding the local pins and the peer's control-page lane
    /// for the regions they touch until it is done.
    fn move_bytes(&self, plan: &Plan, segment: usize, offset: u64, _budget: u64) -> Result<u64> {
        let segments = &plan.segments;
        let mut pins: Vec<Pin<'_>> = Vec::new();
        let mut pinned: Vec<u32> = Vec::new();
        let mut keys: Vec<u64> = Vec::new();
        // Addresses first: the lane is held only around the device work.
        let mut copies: Vec<(u64, u64, u64)> = Vec::new();
        let (mut i, mut offset, mut moved) = (segment, offset, 0u64);
        while i < segments.len() && moved < STEP_BYTES && copies.len() < STEP_COPIES {
            let s = &segments[i];
            let key = plan.remote_regions[s.remote as usize].key;
            if !keys.contains(&key) {
                keys.push(key);
            }
            if !pinned.contains(&s.local) {
                pins.push(plan.local_regions[s.local as usize].pin_local()?);
                pinned.push(s.local);
            }
            let len = (s.len - offset).min(STEP_BYTES - moved);
            if len > 0 {
                let l = s.local_addr + offset;
                let r = self.mapped(s, s.remote_addr + offset)?;
                copies.push(match plan.op {
                    Op::Write => (r, l, len),
                    Op::Read => (l, r, len),
                });
            }
            moved += len;
            offset += len;
            if offset == s.len {
                i += 1;
                offset = 0;
            }
        }
        if !self.peer.alive() {
            return Err(Error::RemoteDisconnect(format!(
                "peer process {} exited",
                self.peer.pid()
            )));
        }
        let _lane = self.peer.enter(&keys).inspect_err(|e| {
            if matches!(e, Error::NotAllowed(_)) {
                // Deregistered by the peer: forget the mappings of the
                // regions this plan names, in every context (mapped anew if
                // still valid), so that none keeps the peer's memory alive.
                let mut cache = self.cache.lock();
                cache.retain(|(what, _), c| {
                    !self.imports.iter().flatten().any(|m| Arc::ptr_eq(c, m))
                        && !matches!(what, Mapped::Region(k) if keys.contains(k))
                });
            }
        })?;
        let mut copier = Copier::new(cuda::driver()?, self.context)?;
        for &(dst, src, len) in &copies {
            // SAFETY: local ranges lie in our registrations, pinned above;
            // remote ones in the peer's published registrations (checked at
            // prep time) inside allocations we mapped, which its control
            // page says are still registered (the lane, held until the
            // device finished, makes a deregistration wait). The copier
            // waits before the lane and pins are dropped.
            unsafe { copier.copy(dst, src, len) }?;
        }
        copier.wait()?;
        // The mapping outlives its owner: a peer that died meanwhile would
        // never see the notification, so the transfer fails.
        if !self.peer.alive() {
            return Err(Error::RemoteDisconnect(format!(
                "peer process {} exited during the transfer",
                self.peer.pid()
            )));
        }
        Ok(moved)
    }

    fn finished(&self) -> Result<()> {
        match &self.notif {
            Some(msg) => self.control.notify(msg),
            None => Ok(()),
        }
    }
}
