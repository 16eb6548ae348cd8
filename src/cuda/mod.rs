//! GPU memory through the CUDA driver API, loaded at run time.
//!
//! - [`driver`]: finds and loads the driver (`$NIXL_MOONCAKE_CUDA_LIB`, else
//!   `libcuda.so.1`) on the first use of GPU memory, never at plugin load;
//!   without one, GPU memory is refused with the reason and everything else
//!   works.
//! - [`inspect`]: what registration checks of a `VRAM` range (device
//!   memory, the device the caller named, inside one allocation or adjacent
//!   VMM chunks of one device).
//! - [`Copier`]: device copies on our own non-blocking streams, completed by
//!   events, with the right context current on the calling thread.
//! - [`HostBuffer`]: pooled pinned host memory, to stage device data through
//!   a socket.
//! - [`gpudirect`]: GPU memory exported for the NICs (GPUDirect RDMA).
//!
//! This module sits beside [`crate::common`]: transports and the backend use
//! it; it uses only the common error type and region descriptions.

mod context;
mod copy;
pub mod driver;
pub mod gpudirect;
mod host;
#[cfg(test)]
pub mod testing;

pub use copy::Copier;
pub use driver::{driver, use_library};
pub use host::HostBuffer;

use std::ffi::{c_int, c_void};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::Arc;

use crate::common::memory::{DeviceAlloc, DevicePiece, VmmShared};
use crate::common::{Error, Result};
use crate::wire::region::{IpcExport, MAX_VMM_PIECES, VmmExport, VmmPiece};
use driver::{Driver, attr};

/// `NIXL_MOONCAKE_CUDA_IPC=0` publishes no CUDA IPC handle with our GPU
/// regions: same-host peers then stage them through TCP (for containers
/// whose processes may not share GPU memory, say).
pub const IPC_ENV: &str = "NIXL_MOONCAKE_CUDA_IPC";

/// Most allocations one registration may span (adjacent VMM chunks).
const MAX_PIECES: usize = 1 << 16;

/// The attributes of the allocation that contains `ptr`.
struct Attributes {
    memory_type: u32,
    ordinal: i32,
    buffer_id: u64,
    legacy_ipc: bool,
    start: u64,
    size: u64,
}

fn attributes(driver: &Driver, ptr: u64) -> Result<Attributes> {
    let (mut memory_type, mut ordinal, mut legacy) = (0u32, 0i32, 0i32);
    let (mut buffer_id, mut start, mut size) = (0u64, 0u64, 0u64);
    let mut which: [c_int; 6] = [
        attr::MEMORY_TYPE,
        attr::DEVICE_ORDINAL,
        attr::BUFFER_ID,
        attr::IS_LEGACY_IPC_CAPABLE,
        attr::RANGE_START,
        attr::RANGE_SIZE,
    ];
    let mut data: [*mut c_void; 6] = [
        (&raw mut memory_type).cast(),
        (&raw mut ordinal).cast(),
        (&raw mut buffer_id).cast(),
        (&raw mut legacy).cast(),
        (&raw mut start).cast(),
        (&raw mut size).cast(),
    ];
    // SAFETY: each data pointer points to a live local of the attribute's
    // size (4 bytes for type, ordinal and the IPC flag, 8 for the others);
    // the driver reads `ptr` as a number and never dereferences it.
    let rc = unsafe {
        (driver.api.pointer_get_attributes)(
            which.len() as u32,
            which.as_mut_ptr(),
            data.as_mut_ptr(),
            ptr,
        )
    };
    driver.check(rc, &format!("cuPointerGetAttributes({ptr:#x})"))?;
    Ok(Attributes {
        memory_type,
        ordinal,
        buffer_id,
        legacy_ipc: legacy != 0,
        start,
        size,
    })
}

/// Checks that `[addr, addr+len)` is GPU memory of device `dev_id` and
/// describes it for registration.
///
/// # Errors
/// [`Error::NotSupported`] when no CUDA driver can be used here;
/// [`Error::InvalidParam`] naming the mismatch when the range is not device
/// memory, belongs to another device, or crosses the end of its allocation
/// (anything but adjacent VMM chunks of one device).
pub fn inspect(addr: u64, len: u64, dev_id: u64, share: bool) -> Result<DeviceAlloc> {
    let driver = driver()?;
    let end = addr.checked_add(len).ok_or_else(|| {
        Error::InvalidParam(format!(
            "registerMem: range {addr:#x}+{len} wraps around the address space"
        ))
    })?;
    let mut pieces: Vec<DevicePiece> = Vec::new();
    let ordinal = i32::try_from(dev_id).map_err(|_| {
        Error::InvalidParam(format!(
            "registerMem(VRAM): devId {dev_id} is not a device ordinal"
        ))
    })?;

    let mut at = addr;
    loop {
        let a = attributes(driver, at)?;
        if let Some(last) = pieces.last()
            && (a.memory_type != driver::MEMORYTYPE_DEVICE || a.ordinal != ordinal)
        {
            return Err(Error::InvalidParam(format!(
                "registerMem(VRAM): range {addr:#x}+{len} crosses the end of the \
                 allocation {:#x}+{} into memory that is not of device {ordinal}",
                last.base, last.size
            )));
        }
        if a.memory_type != driver::MEMORYTYPE_DEVICE {
            return Err(Error::InvalidParam(format!(
                "registerMem(VRAM): {at:#x} is not GPU memory (the CUDA driver reports \
                 memory type {}: host memory or unknown to it)",
                a.memory_type
            )));
        }
        if a.ordinal != ordinal {
            return Err(Error::InvalidParam(format!(
                "registerMem(VRAM): {at:#x} is memory of device {}, not of devId {dev_id}",
                a.ordinal
            )));
        }
        let piece_end = a.start.saturating_add(a.size);
        if a.start > at || piece_end <= at {
            return Err(Error::InvalidParam(format!(
                "registerMem(VRAM): the CUDA driver describes {at:#x} as inside \
                 {:#x}+{}, which does not contain it",
                a.start, a.size
            )));
        }
        if let Some(last) = pieces.last()
            && (last.legacy_ipc || a.legacy_ipc)
        {
            return Err(Error::InvalidParam(format!(
                "registerMem(VRAM): range {addr:#x}+{len} crosses the end of the \
                 allocation {:#x}+{} (only adjacent VMM chunks may be registered together)",
                last.base, last.size
            )));
        }

        pieces.push(DevicePiece {
            base: a.start,
            size: a.size,
            buffer_id: a.buffer_id,
            legacy_ipc: a.legacy_ipc,
        });
        if piece_end >= end {
            break;
        }
        if pieces.len() >= MAX_PIECES {
            return Err(Error::InvalidParam(format!(
                "registerMem(VRAM): range {addr:#x}+{len} spans more than {MAX_PIECES} allocations"
            )));
        }
        at = piece_end;
    }
    // Our copies, streams and staging buffers live in the device's primary
    // context, which we retain for the life of the process: never in a
    // context the application may destroy (unified addressing lets that
    // context reach memory of any context of the device).
    let context = context::primary(driver, ordinal)?;
    let ipc = match pieces.as_slice() {
        [one] if share && one.legacy_ipc => export(driver, context, one),
        _ => None,
    };
    let vmm = match pieces.first() {
        Some(first) if share && !first.legacy_ipc => {
            export_vmm(driver, context, &pieces).map(Arc::new)
        }
        _ => None,
    };
    Ok(DeviceAlloc {
        ordinal,
        context,
        pieces,
        ipc,
        vmm,
    })
}

/// True when CUDA IPC was turned off ([`IPC_ENV`]`=0`), with a line saying so.
fn ipc_disabled(base: u64, size: u64) -> bool {
    let off = std::env::var(IPC_ENV).is_ok_and(|v| v == "0");
    if off {
        log::info!(
            "GPU memory {base:#x}+{size}: CUDA IPC disabled ({IPC_ENV}=0); peers on this host \
             will stage it through TCP"
        );
    }
    off
}

/// The VMM chunks `pieces` exported as POSIX file descriptors, or `None`
/// (with a line saying why) when the driver gives none: the chunks were
/// created without that handle type, too many chunks, more descriptors
/// than the process's budget ([`fd_budget`]), or no VMM entry points.
/// Peers then stage through TCP.
fn export_vmm(driver: &Driver, context: usize, pieces: &[DevicePiece]) -> Option<VmmShared> {
    let (base, size) = (pieces[0].base, pieces.iter().map(|p| p.size).sum::<u64>());
    if ipc_disabled(base, size) {
        return None;
    }
    let vmm = driver.vmm.as_ref()?;
    if pieces.len() > MAX_VMM_PIECES {
        log::info!(
            "GPU memory {base:#x}+{size} spans {} VMM chunks, more than the {MAX_VMM_PIECES} \
             shared by file descriptor; peers on this host will stage it through TCP",
            pieces.len()
        );
        return None;
    }
    let _current = context::Current::enter(driver, context).ok()?;
    let budget = fd_budget();
    if !VmmShared::try_reserve(pieces.len(), budget) {
        log::warn!(
            "GPU memory {base:#x}+{size}: sharing its {} VMM chunks would keep more than {budget} \
             descriptors open (a quarter of the process's limit, RLIMIT_NOFILE); peers on this \
             host will stage it through TCP",
            pieces.len()
        );
        return None;
    }
    let mut fds = Vec::with_capacity(pieces.len());
    let mut chunks = Vec::with_capacity(pieces.len());
    for p in pieces {
        let mut handle: driver::MemHandle = 0;
        let mut fd: c_int = -1;
        // SAFETY: live out-pointers; `p.base` is the start of a mapping the
        // driver just described. The retained handle is released at once:
        // the exported descriptor keeps its own reference.
        let rc = unsafe {
            let rc = (vmm.retain)(&mut handle, p.base as *mut c_void);
            if rc == driver::SUCCESS {
                let exported = (vmm.export)(
                    (&raw mut fd).cast(),
                    handle,
                    driver::HANDLE_TYPE_POSIX_FD,
                    0,
                );
                (vmm.release)(handle);
                exported
            } else {
                rc
            }
        };
        if rc != driver::SUCCESS || fd < 0 {
            log::info!(
                "GPU memory {base:#x}+{size}: VMM chunk {:#x}+{} cannot be shared by file \
                 descriptor ({}; it must be created with CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR); \
                 peers on this host will stage it through TCP",
                p.base,
                p.size,
                driver.describe(rc)
            );
            VmmShared::unreserve(pieces.len());
            return None; // the descriptors so far are closed with `fds`
        }
        // SAFETY: a fresh descriptor the driver gave us to own.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        // Not inherited by programs the application runs.
        // SAFETY: fcntl on a descriptor we own.
        unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_SETFD, libc::FD_CLOEXEC) };
        chunks.push(VmmPiece {
            base: p.base,
            size: p.size,
            fd: fd.as_raw_fd(),
        });
        fds.push(fd);
    }
    Some(VmmShared::new(VmmExport { pieces: chunks }, fds))
}

/// Most descriptors of exported VMM chunks this process keeps open: a
/// quarter of its limit, so that the application keeps the rest.
fn fd_budget() -> usize {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit fills the struct we pass.
    let ok = unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } == 0;
    if ok {
        usize::try_from(lim.rlim_cur / 4).unwrap_or(usize::MAX)
    } else {
        256
    }
}

/// The IPC handle of allocation `piece`, or `None` (with a line saying
/// why) when the driver gives none: peers then stage through TCP.
fn export(driver: &Driver, context: usize, piece: &DevicePiece) -> Option<IpcExport> {
    if ipc_disabled(piece.base, piece.size) {
        return None;
    }
    let ipc = driver.ipc.as_ref()?;
    let _current = context::Current::enter(driver, context).ok()?;
    let mut h = driver::IpcHandle { reserved: [0; 64] };
    // SAFETY: the out-pointer is a live local; `piece.base` is the start of
    // a live allocation the driver just described.
    let rc = unsafe { (ipc.get_mem_handle)(&mut h, piece.base) };
    if rc != driver::SUCCESS {
        log::info!(
            "GPU allocation {:#x}+{} cannot be shared by CUDA IPC ({}); peers on this host \
             will stage it through TCP",
            piece.base,
            piece.size,
            driver.describe(rc)
        );
        return None;
    }
    let mut handle = [0u64; 8];
    for (w, b) in handle.iter_mut().zip(h.reserved.chunks_exact(8)) {
        *w = u64::from_le_bytes(b.try_into().expect("8 bytes"));
    }
    Some(IpcExport {
        base: piece.base,
        size: piece.size,
        buffer_id: piece.buffer_id,
        handle,
    })
}

/// Another process's GPU memory mapped into ours: one `cuMemAlloc`
/// allocation by its legacy IPC handle, or VMM chunks by their file
/// descriptors. The mapping is closed when this is dropped.
pub struct Imported {
    driver: &'static Driver,
    context: usize,
    /// Where the peer's address `base` is mapped here.
    ptr: u64,
    /// The first address of the peer's memory that is mapped.
    base: u64,
    kind: Mapping,
}

enum Mapping {
    /// By `cuIpcOpenMemHandle`.
    Legacy(IpcExport),
    /// By `cuMemImportFromShareableHandle`: a reservation of `size` bytes at
    /// `ptr`, the imported handles and the ranges mapped so far.
    Vmm {
        size: u64,
        handles: Vec<driver::MemHandle>,
        mapped: Vec<(u64, u64)>,
    },
}

impl Imported {
    /// Maps the allocation `ipc` describes, with `context` current.
    ///
    /// # Errors
    /// [`Error::NotSupported`] without a driver or IPC, or when the driver
    /// cannot open the handle (its owner exited, no right to its memory,
    /// no peer access between the devices).
    pub fn open(context: usize, ipc: &IpcExport) -> Result<Imported> {
        let driver = driver()?;
        let api = driver
            .ipc
            .as_ref()
            .ok_or_else(|| Error::NotSupported("the CUDA driver has no IPC entry points".into()))?;
        let _current = context::Current::enter(driver, context)?;
        let mut h = driver::IpcHandle { reserved: [0; 64] };
        for (b, w) in h.reserved.chunks_exact_mut(8).zip(ipc.handle) {
            b.copy_from_slice(&w.to_le_bytes());
        }
        let mut ptr = 0;
        // SAFETY: the out-pointer is a live local; the handle is passed by
        // value (the driver validates it).
        let rc =
            unsafe { (api.open_mem_handle)(&mut ptr, h, driver::IPC_MEM_LAZY_ENABLE_PEER_ACCESS) };
        if rc != driver::SUCCESS {
            return Err(Error::NotSupported(format!(
                "cannot map the peer's GPU allocation {:#x}+{} by CUDA IPC: {}",
                ipc.base,
                ipc.size,
                driver.describe(rc)
            )));
        }
        Ok(Imported {
            driver,
            context,
            ptr,
            base: ipc.base,
            kind: Mapping::Legacy(*ipc),
        })
    }

    /// Maps the peer's VMM chunks `export` (adjacent, as in the peer) into
    /// one reservation of ours, readable and writable by device `ordinal`,
    /// with `context` current. `take_fd` gives us our own descriptor for a
    /// descriptor number of the peer (closed once imported).
    ///
    /// # Errors
    /// [`Error::NotSupported`] without a driver or its VMM entry points, or
    /// when a descriptor cannot be taken or the driver refuses a step.
    pub fn open_vmm(
        context: usize,
        ordinal: i32,
        export: &VmmExport,
        take_fd: impl Fn(i32) -> Result<OwnedFd>,
    ) -> Result<Imported> {
        let driver = driver()?;
        let vmm = driver.vmm.as_ref().ok_or_else(|| {
            Error::NotSupported("the CUDA driver has no VMM sharing entry points".into())
        })?;
        let _current = context::Current::enter(driver, context)?;
        let (base, size) = (export.base(), export.size());
        let refused = |what: &str, rc| {
            Error::NotSupported(format!(
                "cannot map the peer's VMM memory {base:#x}+{size}: {what}: {}",
                driver.describe(rc)
            ))
        };
        let mut ptr = 0;
        // SAFETY: the out-pointer is a live local; size, alignment (0: the
        // default), no fixed address and no flags are plain values.
        let rc = unsafe { (vmm.reserve)(&mut ptr, size as usize, 0, 0, 0) };
        if rc != driver::SUCCESS {
            return Err(refused("cuMemAddressReserve", rc));
        }
        // From here on, dropping `mapping` undoes what was done.
        let mut mapping = Imported {
            driver,
            context,
            ptr,
            base,
            kind: Mapping::Vmm {
                size,
                handles: Vec::with_capacity(export.pieces.len()),
                mapped: Vec::with_capacity(export.pieces.len()),
            },
        };
        let Mapping::Vmm {
            handles, mapped, ..
        } = &mut mapping.kind
        else {
            unreachable!("made as VMM above")
        };
        for p in &export.pieces {
            let fd = take_fd(p.fd)?;
            let mut handle = 0;
            // SAFETY: the out-pointer is a live local; the descriptor is ours
            // and open (the driver takes its own reference to the memory).
            let rc = unsafe {
                (vmm.import)(
                    &mut handle,
                    fd.as_raw_fd() as isize as *mut c_void,
                    driver::HANDLE_TYPE_POSIX_FD,
                )
            };
            drop(fd);
            if rc != driver::SUCCESS {
                return Err(refused("cuMemImportFromShareableHandle", rc));
            }
            handles.push(handle);
            let at = ptr + (p.base - base);
            // SAFETY: `[at, at + p.size)` lies in our reservation (the chunks
            // are adjacent and sum to its size); the handle was just imported.
            let rc = unsafe { (vmm.map)(at, p.size as usize, 0, handle, 0) };
            if rc != driver::SUCCESS {
                return Err(refused("cuMemMap", rc));
            }
            mapped.push((at, p.size));
        }
        let access = driver::AccessDesc {
            location_type: driver::LOCATION_TYPE_DEVICE,
            location_id: ordinal,
            flags: driver::ACCESS_READWRITE,
        };
        // SAFETY: the whole reservation is mapped; one live descriptor.
        let rc = unsafe { (vmm.set_access)(ptr, size as usize, &access, 1) };
        if rc != driver::SUCCESS {
            return Err(refused("cuMemSetAccess", rc));
        }
        Ok(mapping)
    }

    /// Where the peer's address `addr` (inside the mapped memory) is here.
    pub fn local(&self, addr: u64) -> u64 {
        self.ptr + (addr - self.base)
    }

    /// True when this maps the allocation of legacy handle `ipc`.
    pub fn maps(&self, ipc: &IpcExport) -> bool {
        matches!(&self.kind, Mapping::Legacy(m) if m == ipc)
    }
}

impl Drop for Imported {
    fn drop(&mut self) {
        let Ok(_current) = context::Current::enter(self.driver, self.context) else {
            return;
        };
        // No copy of ours uses the mapping any more: every copy is waited
        // for before its lane is released.
        match &self.kind {
            Mapping::Legacy(_) => {
                let Some(api) = self.driver.ipc.as_ref() else {
                    return;
                };
                // SAFETY: our own mapping, closed once.
                let rc = unsafe { (api.close_mem_handle)(self.ptr) };
                if rc != driver::SUCCESS {
                    log::warn!("cuIpcCloseMemHandle failed: {}", self.driver.describe(rc));
                }
            }
            Mapping::Vmm {
                size,
                handles,
                mapped,
            } => {
                let Some(vmm) = self.driver.vmm.as_ref() else {
                    return;
                };
                // SAFETY: our own ranges, handles and reservation, each undone
                // once, in the reverse order of their making.
                let failed = unsafe {
                    // Every step is tried, whatever failed before it.
                    let unmap_failures = mapped
                        .iter()
                        .filter(|&&(at, len)| (vmm.unmap)(at, len as usize) != driver::SUCCESS)
                        .count();
                    let release_failures = handles
                        .iter()
                        .filter(|&&h| (vmm.release)(h) != driver::SUCCESS)
                        .count();
                    let freed = (vmm.free)(self.ptr, *size as usize) == driver::SUCCESS;
                    unmap_failures + release_failures > 0 || !freed
                };
                if failed {
                    log::warn!(
                        "unmapping a peer's VMM memory at {:#x}+{size} failed in part",
                        self.ptr
                    );
                }
            }
        }
    }
}

/// The primary context of device `ordinal` (retained on first use).
///
/// # Errors
/// No driver, or no such device.
pub fn primary_context(ordinal: i32) -> Result<usize> {
    context::primary(driver()?, ordinal)
}
