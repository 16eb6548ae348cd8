//! Registered memory: the kinds of memory a region can be ([`MemKind`]),
//! one registered local region ([`LocalRegion`]) and its [`Pin`]s, and the
//! registry of an engine's regions.
//!
//! Each registration gets a random 64-bit access key. Peers name the key and a
//! range in every access; the registry checks both before any byte moves.
//! A region can be *pinned* for the duration of one copy: deregistration waits
//! for pinned copies to finish and afterwards no new pin succeeds, so no byte
//! is ever written into memory after its `deregisterMem` returned.

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use parking_lot::{Mutex, RwLock, RwLockReadGuard};

use super::status::{Error, Result};
use crate::wire::region::{IpcExport, RdmaKeys, RegionPublic, VmmExport, range_within};

/// `nixl_mem_t::DRAM_SEG`.
pub const DRAM_SEG: u32 = 0;
/// `nixl_mem_t::VRAM_SEG`.
pub const VRAM_SEG: u32 = 1;

/// What kind of memory a region is. Every region of a transfer plan says
/// which, so that selection can pick a transport that serves both sides.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum MemKind {
    /// Host memory (`DRAM_SEG`).
    Dram,
    /// GPU memory (`VRAM_SEG`) of device `device`.
    Vram {
        /// The device ordinal (NIXL's `devId`).
        device: u64,
    },
    /// Another NIXL memory type (block, object, file), which no transport
    /// of ours serves.
    Other(u32),
}

impl MemKind {
    /// The kind of a NIXL memory type `mem_type` with device id `dev_id`.
    pub fn from_nixl(mem_type: u32, dev_id: u64) -> MemKind {
        match mem_type {
            DRAM_SEG => MemKind::Dram,
            VRAM_SEG => MemKind::Vram { device: dev_id },
            other => MemKind::Other(other),
        }
    }
}

impl MemKind {
    /// Host or GPU memory (what our transports can move), not a file,
    /// block or object.
    pub fn is_memory(self) -> bool {
        matches!(self, MemKind::Dram | MemKind::Vram { .. })
    }
}

impl std::fmt::Display for MemKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            MemKind::Dram => write!(f, "DRAM"),
            MemKind::Vram { device } => write!(f, "VRAM (device {device})"),
            MemKind::Other(t) => write!(f, "memory type {t}"),
        }
    }
}

/// The low bits of a region's key number its *slot*: a small index, unique
/// among the live regions of one engine, that a transport may use to keep
/// per-region state where peers see it (cross-memory attach publishes each
/// live key at its slot, see [`RegionWatch`]). The other 44 bits are random.
pub const SLOT_BITS: u32 = 20;

/// Most regions one engine can have registered at once.
pub const MAX_REGIONS: usize = 1 << SLOT_BITS;

/// The slot of the region with access key `key`.
pub fn slot_of(key: u64) -> u32 {
    (key & (MAX_REGIONS as u64 - 1)) as u32
}

/// Something told of every registration and deregistration of a registry
/// (a transport that must revoke peers' access on its own terms).
pub trait RegionWatch: Send + Sync {
    /// `region` was registered; called before `registerMem` returns.
    ///
    /// # Errors
    /// Why this watcher's transport cannot serve the region: the
    /// registration then fails with this error (and is undone).
    fn registered(&self, region: &LocalRegion) -> Result<()>;
    /// `region` is being deregistered: after return, no peer may access it
    /// through this watcher's transport, and an access in progress has
    /// finished. Called before `deregisterMem` returns, after the region's
    /// pins were waited for and before its slot can be reused.
    fn revoke(&self, region: &LocalRegion);
}

/// One allocation (or one mapped chunk of VMM memory) that a GPU region
/// lies in, as the CUDA driver describes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DevicePiece {
    /// Start of the allocation.
    pub base: u64,
    /// Its size in bytes.
    pub size: u64,
    /// The driver's unique id of the allocation.
    pub buffer_id: u64,
    /// True for `cuMemAlloc` memory (exportable with a legacy IPC handle),
    /// false for VMM memory.
    pub legacy_ipc: bool,
}

/// What the CUDA driver told us about a GPU region when it was registered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceAlloc {
    /// The device ordinal (equal to the registration's `devId`).
    pub ordinal: i32,
    /// The `CUcontext` our threads make current before touching the
    /// memory (the device's primary context, retained by us for the life of
    /// the process), as an opaque value.
    pub context: usize,
    /// The allocations the region covers, in address order (one, or
    /// several adjacent VMM chunks).
    pub pieces: Vec<DevicePiece>,
    /// How a process on this host can map it (one `cuMemAlloc` allocation
    /// whose IPC handle the driver gave), published with the region.
    pub ipc: Option<IpcExport>,
    /// Or, for VMM chunks exported by file descriptor: the chunks and the
    /// descriptors, published with the region and closed with it.
    pub vmm: Option<Arc<VmmShared>>,
}

/// The VMM chunks of a GPU region exported by POSIX file descriptor: what
/// peers are told, and the descriptors they take from this process (open
/// while the region is registered; closed when this is dropped, after its
/// deregistration waited for every peer access).
#[derive(Debug)]
pub struct VmmShared {
    /// The chunks and their descriptor numbers.
    pub export: Arc<VmmExport>,
    /// The descriptors, in the order of `export.pieces`.
    fds: Vec<std::os::fd::OwnedFd>,
}

/// Descriptors of exported VMM chunks open in this process.
static EXPORTED_FDS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

impl VmmShared {
    /// Counts `n` more exported descriptors unless that would pass
    /// `budget`; false then. Each counted descriptor is handed to
    /// [`VmmShared::new`] or given back with [`VmmShared::unreserve`].
    pub fn try_reserve(n: usize, budget: usize) -> bool {
        EXPORTED_FDS
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |open| {
                open.checked_add(n).filter(|&total| total <= budget)
            })
            .is_ok()
    }

    /// Gives back `n` descriptors counted by [`VmmShared::try_reserve`].
    pub fn unreserve(n: usize) {
        EXPORTED_FDS.fetch_sub(n, Ordering::Relaxed);
    }

    /// The chunks `export` describes, with their descriptors `fds` (counted
    /// by [`VmmShared::try_reserve`] before, given back when this goes).
    pub fn new(export: VmmExport, fds: Vec<std::os::fd::OwnedFd>) -> VmmShared {
        VmmShared {
            export: Arc::new(export),
            fds,
        }
    }

    /// Descriptors of exported VMM chunks open in this process now.
    pub fn open_fds() -> usize {
        EXPORTED_FDS.load(Ordering::Relaxed)
    }
}

impl Drop for VmmShared {
    fn drop(&mut self) {
        EXPORTED_FDS.fetch_sub(self.fds.len(), Ordering::Relaxed);
    }
}

impl PartialEq for VmmShared {
    fn eq(&self, other: &Self) -> bool {
        self.export == other.export
    }
}

impl Eq for VmmShared {}

/// One registered local region. Address, length and key never change.
#[derive(Debug)]
pub struct LocalRegion {
    /// The random access key.
    pub key: u64,
    /// Start address.
    pub addr: u64,
    /// Length in bytes.
    pub len: u64,
    /// NIXL memory type.
    pub mem_type: u32,
    /// Device id from the registration.
    pub dev_id: u64,
    /// For GPU memory: where it lives, as the driver said at registration.
    pub device: Option<DeviceAlloc>,
    /// Its keys on our RDMA NICs, set by the RDMA transport when it
    /// registered the region there (published to peers).
    pub rdma: std::sync::OnceLock<Arc<RdmaKeys>>,
    /// Read-held by every pin; write-taken once by the deregistration, to
    /// wait for the pins taken before it started.
    pins: RwLock<()>,
    /// Set when a deregistration starts: no pin succeeds after it, so a
    /// steady stream of short pins cannot keep the deregistration waiting.
    dying: AtomicBool,
}

/// Proof that a region stays registered while the guard lives.
pub type Pin<'a> = RwLockReadGuard<'a, ()>;

impl LocalRegion {
    /// Pins the region for one access, or `None` once its deregistration
    /// started (pins taken before then are waited for).
    ///
    /// Pins are recursive: one thread may pin a region several times.
    pub fn pin(&self) -> Option<Pin<'_>> {
        let guard = self.pins.read_recursive();
        // Checked under the pin: a deregistration that started before it
        // is refused, one that starts after it waits for it.
        (!self.dying.load(Ordering::Acquire)).then_some(guard)
    }

    /// [`LocalRegion::pin`] for one access of a transfer of ours.
    ///
    /// # Errors
    /// [`Error::InvalidParam`] once the region's deregistration started.
    pub fn pin_local(&self) -> Result<Pin<'_>> {
        self.pin().ok_or_else(|| {
            Error::InvalidParam(format!(
                "local region {:#x}+{} was deregistered during the transfer",
                self.addr, self.len
            ))
        })
    }

    /// The region's slot (see [`SLOT_BITS`]).
    pub fn slot(&self) -> u32 {
        slot_of(self.key)
    }

    /// The kind of memory the region is.
    pub fn kind(&self) -> MemKind {
        MemKind::from_nixl(self.mem_type, self.dev_id)
    }

    /// True when `[addr, addr+len)` lies inside the region.
    pub fn contains(&self, addr: u64, len: u64) -> bool {
        range_within(self.addr, self.len, addr, len)
    }

    /// The data a peer needs to address this region.
    pub fn public(&self, owner: u128) -> RegionPublic {
        RegionPublic {
            owner,
            key: self.key,
            addr: self.addr,
            len: self.len,
            mem_type: self.mem_type,
            dev_id: self.dev_id,
            ipc: self.device.as_ref().and_then(|d| d.ipc),
            rdma: self.rdma.get().cloned(),
            vmm: self
                .device
                .as_ref()
                .and_then(|d| d.vmm.as_ref())
                .map(|v| v.export.clone()),
        }
    }
}

/// All live registrations of one engine, by access key.
#[derive(Default)]
pub struct Registry {
    by_key: RwLock<HashMap<u64, Arc<LocalRegion>>>,
    slots: Mutex<Slots>,
    watchers: RwLock<Vec<Arc<dyn RegionWatch>>>,
}

impl std::fmt::Debug for Registry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Registry")
            .field("regions", &self.len())
            .finish_non_exhaustive()
    }
}

/// The slots in use: the lowest free one is taken first, so that a
/// transport's per-slot state stays dense.
#[derive(Debug, Default)]
struct Slots {
    /// Slots below `next` that are free again.
    freed: BTreeSet<u32>,
    /// The lowest slot never used.
    next: u32,
}

impl Slots {
    fn take(&mut self) -> Option<u32> {
        if let Some(slot) = self.freed.pop_first() {
            return Some(slot);
        }
        let slot = self.next;
        ((slot as usize) < MAX_REGIONS).then(|| {
            self.next += 1;
            slot
        })
    }

    fn give_back(&mut self, slot: u32) {
        self.freed.insert(slot);
    }
}

impl Registry {
    /// Registers `[addr, addr+len)` of host memory.
    ///
    /// # Errors
    /// [`Error::NotSupported`] for memory types other than DRAM (GPU memory
    /// goes through [`Registry::register_device`]),
    /// [`Error::InvalidParam`] for a null address or a range that wraps.
    pub fn register(
        &self,
        addr: u64,
        len: u64,
        mem_type: u32,
        dev_id: u64,
    ) -> Result<Arc<LocalRegion>> {
        if mem_type != DRAM_SEG {
            let what = if mem_type == VRAM_SEG {
                "VRAM (GPU memory) needs its device description".to_owned()
            } else {
                format!("memory type {mem_type} is not supported")
            };
            return Err(Error::NotSupported(format!(
                "registerMem: {what}; only DRAM and VRAM can be registered"
            )));
        }
        self.insert(addr, len, mem_type, dev_id, None)
    }

    /// Registers `[addr, addr+len)` of GPU memory that the driver described
    /// as `device` (see `crate::cuda::inspect`).
    ///
    /// # Errors
    /// [`Error::InvalidParam`] for a null address or a range that wraps.
    pub fn register_device(
        &self,
        addr: u64,
        len: u64,
        device: DeviceAlloc,
    ) -> Result<Arc<LocalRegion>> {
        let dev_id = device.ordinal as u64;
        self.insert(addr, len, VRAM_SEG, dev_id, Some(device))
    }

    fn insert(
        &self,
        addr: u64,
        len: u64,
        mem_type: u32,
        dev_id: u64,
        device: Option<DeviceAlloc>,
    ) -> Result<Arc<LocalRegion>> {
        if addr == 0 {
            return Err(Error::InvalidParam("registerMem: null address".into()));
        }
        if addr.checked_add(len).is_none() {
            return Err(Error::InvalidParam(format!(
                "registerMem: range {addr:#x}+{len} wraps around the address space"
            )));
        }
        let slot = self.slots.lock().take().ok_or_else(|| {
            Error::InvalidParam(format!(
                "registerMem: {MAX_REGIONS} regions are registered already"
            ))
        })?;
        let mut map = self.by_key.write();
        let key = loop {
            let k = (random_u64() << SLOT_BITS) | u64::from(slot);
            if k != 0 && !map.contains_key(&k) {
                break k;
            }
        };
        let region = Arc::new(LocalRegion {
            key,
            addr,
            len,
            mem_type,
            dev_id,
            device,
            rdma: Default::default(),
            pins: RwLock::new(()),
            dying: AtomicBool::new(false),
        });
        map.insert(key, region.clone());
        drop(map);
        let watchers = self.watchers.read();
        for (i, w) in watchers.iter().enumerate() {
            if let Err(e) = w.registered(&region) {
                // Undone as a deregistration would, for the watchers told.
                self.by_key.write().remove(&key);
                region.dying.store(true, Ordering::Release);
                drop(region.pins.write());
                for told in &watchers[..i] {
                    told.revoke(&region);
                }
                self.slots.lock().give_back(region.slot());
                return Err(e);
            }
        }
        drop(watchers);
        Ok(region)
    }

    /// Removes a registration. Waits for copies that pinned it; no access
    /// succeeds afterwards.
    ///
    /// # Errors
    /// [`Error::NotFound`] if the key is not registered.
    pub fn deregister(&self, key: u64) -> Result<()> {
        let region = self.by_key.write().remove(&key).ok_or_else(|| {
            Error::NotFound(format!("deregisterMem: no region with key {key:#x}"))
        })?;
        region.dying.store(true, Ordering::Release);
        drop(region.pins.write());
        for w in self.watchers.read().iter() {
            w.revoke(&region);
        }
        self.slots.lock().give_back(region.slot());
        Ok(())
    }

    /// Tells `watcher` of every registration and deregistration from now on
    /// (and of the regions registered already).
    pub fn watch(&self, watcher: Arc<dyn RegionWatch>) {
        let mut watchers = self.watchers.write();
        for region in self.by_key.read().values() {
            if let Err(e) = watcher.registered(region) {
                log::warn!("Mooncake: region {:#x}+{}: {e}", region.addr, region.len);
            }
        }
        watchers.push(watcher);
    }

    /// The target-side check of a peer's access: the key must name a live
    /// registration that contains `[addr, addr+len)`.
    ///
    /// # Errors
    /// [`Error::NotAllowed`] naming what failed.
    pub fn resolve(&self, key: u64, addr: u64, len: u64) -> Result<Arc<LocalRegion>> {
        let region =
            self.by_key.read().get(&key).cloned().ok_or_else(|| {
                Error::NotAllowed(format!("no registered region has key {key:#x}"))
            })?;
        if !region.contains(addr, len) {
            return Err(Error::NotAllowed(format!(
                "range {addr:#x}+{len} lies outside region {:#x}+{} (key {key:#x})",
                region.addr, region.len
            )));
        }
        Ok(region)
    }

    /// Number of live registrations.
    pub fn len(&self) -> usize {
        self.by_key.read().len()
    }

    /// True when nothing is registered.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// A random 64-bit value from the operating system.
pub fn random_u64() -> u64 {
    getrandom::u64().expect("the OS random source is available on Linux")
}

/// A random 128-bit value from the operating system.
pub fn random_u128() -> u128 {
    let mut b = [0u8; 16];
    getrandom::fill(&mut b).expect("the OS random source is available on Linux");
    u128::from_ne_bytes(b)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn register_resolve_deregister() {
        let reg = Registry::default();
        let r = reg.register(0x1000, 4096, DRAM_SEG, 0).unwrap();
        assert_eq!(reg.len(), 1);
        assert!(Arc::ptr_eq(&reg.resolve(r.key, 0x1000, 4096).unwrap(), &r));
        assert!(reg.resolve(r.key, 0x1800, 2048).is_ok());
        assert!(matches!(
            reg.resolve(r.key, 0x1800, 2049),
            Err(Error::NotAllowed(_))
        ));
        assert!(matches!(
            reg.resolve(r.key ^ 1, 0x1000, 1),
            Err(Error::NotAllowed(_))
        ));
        assert!(r.pin().is_some());
        reg.deregister(r.key).unwrap();
        assert!(r.pin().is_none(), "no access after deregistration");
        assert!(reg.resolve(r.key, 0x1000, 1).is_err());
        assert!(matches!(reg.deregister(r.key), Err(Error::NotFound(_))));
        assert!(reg.is_empty());
    }

    #[test]
    fn slots_are_dense_unique_and_reused_after_deregistration() {
        let reg = Registry::default();
        let a = reg.register(0x1000, 1, DRAM_SEG, 0).unwrap();
        let b = reg.register(0x2000, 1, DRAM_SEG, 0).unwrap();
        let c = reg.register(0x3000, 1, DRAM_SEG, 0).unwrap();
        assert_eq!((a.slot(), b.slot(), c.slot()), (0, 1, 2));
        reg.deregister(b.key).unwrap();
        let d = reg.register(0x4000, 1, DRAM_SEG, 0).unwrap();
        assert_eq!(d.slot(), 1, "the lowest free slot is reused");
        assert_ne!(d.key, b.key, "with a new random key");
        assert_eq!(slot_of(d.key), 1);
    }

    #[test]
    fn watchers_see_registrations_and_revoke_before_deregistration_returns() {
        #[derive(Default)]
        struct Log(Mutex<Vec<(bool, u64)>>);
        impl RegionWatch for Log {
            fn registered(&self, r: &LocalRegion) -> Result<()> {
                self.0.lock().push((true, r.key));
                Ok(())
            }
            fn revoke(&self, r: &LocalRegion) {
                assert!(r.pin().is_none(), "revoked after pins stop");
                self.0.lock().push((false, r.key));
            }
        }
        let reg = Registry::default();
        let early = reg.register(0x1000, 1, DRAM_SEG, 0).unwrap();
        let log = Arc::new(Log::default());
        reg.watch(log.clone());
        let late = reg.register(0x2000, 1, DRAM_SEG, 0).unwrap();
        reg.deregister(early.key).unwrap();
        assert_eq!(
            *log.0.lock(),
            vec![(true, early.key), (true, late.key), (false, early.key)]
        );
    }

    #[test]
    fn keys_are_distinct_and_random() {
        let reg = Registry::default();
        let keys: std::collections::HashSet<u64> = (0..1000)
            .map(|i| reg.register(0x1000 + i, 1, DRAM_SEG, 0).unwrap().key)
            .collect();
        assert_eq!(keys.len(), 1000);
    }

    #[test]
    fn refuses_undescribed_vram_other_types_null_and_wrapping_ranges() {
        let reg = Registry::default();
        let e = reg.register(0x1000, 1, VRAM_SEG, 0).unwrap_err();
        assert!(matches!(e, Error::NotSupported(_)) && e.to_string().contains("VRAM"));
        let e = reg.register(0x1000, 1, 3, 0).unwrap_err();
        assert!(matches!(e, Error::NotSupported(_)) && e.to_string().contains("type 3"));
        let gpu = DeviceAlloc {
            ordinal: 1,
            context: 0,
            pieces: vec![],
            ipc: None,
            vmm: None,
        };
        let r = reg.register_device(0x1000, 1, gpu.clone()).unwrap();
        assert_eq!(r.kind(), MemKind::Vram { device: 1 });
        assert_eq!(r.device.as_ref(), Some(&gpu));
        assert!(matches!(
            reg.register_device(0, 1, gpu),
            Err(Error::InvalidParam(_))
        ));
        assert!(matches!(
            reg.register(0, 1, DRAM_SEG, 0),
            Err(Error::InvalidParam(_))
        ));
        assert!(matches!(
            reg.register(u64::MAX, 2, DRAM_SEG, 0),
            Err(Error::InvalidParam(_))
        ));
    }

    #[test]
    fn deregistration_waits_for_a_pinned_copy() {
        let reg = Arc::new(Registry::default());
        let r = reg.register(0x1000, 16, DRAM_SEG, 0).unwrap();
        let copy_done = Arc::new(AtomicBool::new(false));
        let key = r.key;
        let pin = r.pin().unwrap();
        let t = {
            let (reg, copy_done) = (reg.clone(), copy_done.clone());
            std::thread::spawn(move || {
                reg.deregister(key).unwrap();
                // Deregistration can only return after the pin was dropped.
                assert!(copy_done.load(Ordering::SeqCst));
            })
        };
        std::thread::yield_now();
        copy_done.store(true, Ordering::SeqCst);
        drop(pin);
        t.join().unwrap();
    }

    #[test]
    fn overlapping_pins_cannot_starve_a_deregistration() {
        let reg = Arc::new(Registry::default());
        let r = reg.register(0x1000, 16, DRAM_SEG, 0).unwrap();
        // A copier whose every pin is taken before the previous one is
        // dropped: the region is never unpinned while pins succeed.
        let (first, pinned) = std::sync::mpsc::channel();
        let copier = {
            let r = r.clone();
            std::thread::spawn(move || {
                let mut current = r.pin().unwrap();
                first.send(()).unwrap();
                while let Some(next) = r.pin() {
                    drop(std::mem::replace(&mut current, next));
                    std::thread::yield_now();
                }
            })
        };
        pinned.recv().unwrap();
        let (done, deregistered) = std::sync::mpsc::channel();
        let key = r.key;
        let reg2 = reg.clone();
        std::thread::spawn(move || done.send(reg2.deregister(key)).unwrap());
        let result = deregistered.recv_timeout(std::time::Duration::from_secs(60));
        assert!(
            matches!(result, Ok(Ok(()))),
            "the deregistration never finished"
        );
        assert!(r.pin().is_none(), "no pin after deregistration");
        copier.join().unwrap();
    }
}
