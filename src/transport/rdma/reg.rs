//! A local region's registration on our NICs, and the count of posts in
//! flight that use it: its deregistration destroys the memory regions only
//! after that count drained, so our NICs never touch memory after
//! `deregisterMem` returned (a peer's access fails on the NIC from then on).

use std::os::fd::{AsFd, OwnedFd};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::{Condvar, Mutex};

use super::mr::RegionMrs;
use super::nic::NicWorker;
use crate::common::memory::DeviceAlloc;
use crate::common::{Error, LocalRegion, Result};
use crate::wire::region::{MAX_RDMA_PIECES, RdmaKeys};

/// One region registered on every NIC.
pub struct RegionReg {
    /// Its first address.
    pub addr: u64,
    /// GPU memory (registered for GPUDirect RDMA): the CPU must not touch
    /// it, so no work request copies it inline.
    pub device: bool,
    /// The registration on each NIC, in the order of the transport's NICs.
    mrs: Mutex<Option<Vec<RegionMrs>>>,
    /// The pieces' length (the same on every NIC).
    pub piece_len: u64,
    /// Keys and lkeys, copied out so the data path takes no lock: per NIC,
    /// per piece, (lkey, rkey).
    keys: Vec<Vec<(u32, u32)>>,
    /// Posts in flight that use the region.
    inflight: Mutex<usize>,
    drained: Condvar,
}

/// How long a deregistration waits for posts in flight on the region
/// (they end within the QP transport timeout even when a peer is gone).
const DRAIN_BOUND: Duration = Duration::from_secs(10);

/// The dmabuf of a GPU region's allocation, and the address of its byte 0
/// (regions over several VMM chunks are not exported as one).
fn gpu_dmabuf(region: &LocalRegion, d: &DeviceAlloc) -> Result<(OwnedFd, u64)> {
    let [piece] = d.pieces.as_slice() else {
        return Err(Error::NotSupported(format!(
            "region {:#x}+{} spans {} allocations",
            region.addr,
            region.len,
            d.pieces.len()
        )));
    };
    crate::cuda::gpudirect::dmabuf(d.context, d.ordinal, piece)
}

impl RegionReg {
    /// Registers `region` on every worker's NIC, in pieces no NIC refuses.
    ///
    /// # Errors
    /// When a NIC refuses (e.g. the locked-memory limit): nothing stays
    /// registered.
    pub fn register(region: &LocalRegion, workers: &[Arc<NicWorker>]) -> Result<RegionReg> {
        let smallest = workers
            .iter()
            .map(|w| w.nic.limits.max_mr_size)
            .min()
            .unwrap_or(u64::MAX)
            .max(1);
        // Never more pieces than peers accept.
        let piece_len = smallest
            .max(region.len.div_ceil(MAX_RDMA_PIECES as u64))
            .min(region.len.max(1));
        if piece_len > smallest {
            return Err(Error::NotSupported(format!(
                "RDMA: region of {} bytes needs more than {MAX_RDMA_PIECES} memory regions of \
                 at most {smallest} bytes",
                region.len
            )));
        }
        // GPU memory goes to the NICs as a dmabuf the driver exports, else
        // (nvidia-peermem) by its address like host memory.
        let dmabuf = region.device.as_ref().map(|d| gpu_dmabuf(region, d));
        let mut mrs = Vec::with_capacity(workers.len());
        for w in workers {
            // SAFETY: NIXL's contract: registered memory stays mapped (GPU
            // memory allocated) until deregisterMem, and our revoke drops
            // these before it returns.
            let by_address =
                || unsafe { RegionMrs::register(&w.pd, region.addr, region.len, piece_len) };
            // GPU memory: why the dmabuf did not serve, when the address
            // (nvidia-peermem) is tried instead.
            let (m, no_dmabuf) = match &dmabuf {
                // SAFETY: as above; the dmabuf is that same memory.
                Some(Ok((fd, base))) => match unsafe {
                    RegionMrs::register_dmabuf(
                        &w.pd,
                        fd.as_fd(),
                        *base,
                        region.addr,
                        region.len,
                        piece_len,
                    )
                } {
                    Ok(m) => (Ok(m), None),
                    Err(e) => (by_address(), Some(e)),
                },
                Some(Err(e)) => (by_address(), Some(e.clone())),
                None => (by_address(), None),
            };
            let m = m.map_err(|e| {
                let gpu = no_dmabuf.map_or(String::new(), |why| {
                    format!(" (GPU memory: as a dmabuf: {}; by address)", why.message())
                });
                Error::Backend(format!(
                    "RDMA: cannot register {:#x}+{} on {}{gpu}: {}",
                    region.addr,
                    region.len,
                    w.nic.name(),
                    e.message()
                ))
            })?;
            mrs.push(m);
        }
        if let Some(d) = &region.device {
            crate::cuda::gpudirect::note_registered(d.context, d.ordinal);
        }
        let keys = mrs
            .iter()
            .map(|m| m.mrs.iter().map(|mr| (mr.lkey, mr.rkey)).collect())
            .collect();
        Ok(RegionReg {
            addr: region.addr,
            device: region.device.is_some(),
            mrs: Mutex::new(Some(mrs)),
            piece_len,
            keys,
            inflight: Mutex::new(0),
            drained: Condvar::new(),
        })
    }

    /// What peers are told.
    pub fn public_keys(&self) -> RdmaKeys {
        RdmaKeys {
            piece_len: self.piece_len,
            nics: self
                .keys
                .iter()
                .map(|k| k.iter().map(|&(_, r)| r).collect())
                .collect(),
        }
    }

    /// The lkey on NIC `nic` of the piece holding `addr`.
    pub fn lkey(&self, nic: usize, addr: u64) -> u32 {
        let i = ((addr - self.addr) / self.piece_len) as usize;
        self.keys[nic][i].0
    }

    /// One more post in flight uses the region.
    pub fn enter(&self) {
        *self.inflight.lock() += 1;
    }

    /// A post that used the region ended.
    pub fn leave(&self) {
        let mut n = self.inflight.lock();
        *n -= 1;
        if *n == 0 {
            self.drained.notify_all();
        }
    }

    /// Waits for the posts in flight (bounded), then deregisters on every
    /// NIC.
    pub fn revoke(&self) {
        self.revoke_within(DRAIN_BOUND)
    }

    /// [`Self::revoke`], waiting at most `bound`.
    pub fn revoke_within(&self, bound: Duration) {
        let deadline = Instant::now() + bound;
        let mut n = self.inflight.lock();
        while *n > 0 && Instant::now() < deadline {
            self.drained.wait_until(&mut n, deadline);
        }
        if *n > 0 {
            log::warn!(
                "Mooncake: RDMA region {:#x}: {} posts still in flight after {} ms; \
                 deregistering it anyway",
                self.addr,
                *n,
                bound.as_millis()
            );
        }
        drop(n);
        self.mrs.lock().take();
    }
}
