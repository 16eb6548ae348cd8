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
//!
//! This module sits beside [`crate::common`]: transports and the backend use
//! it; it uses only the common error type and region descriptions.

mod context;
mod copy;
pub mod driver;
mod host;
#[cfg(test)]
pub mod testing;

pub use copy::Copier;
pub use driver::{driver, use_library};
pub use host::HostBuffer;

use std::ffi::{c_int, c_void};

use crate::common::memory::{DeviceAlloc, DevicePiece};
use crate::common::{Error, Result};
use driver::{Driver, Handle, attr};

/// Most allocations one registration may span (adjacent VMM chunks).
const MAX_PIECES: usize = 1 << 16;

/// The attributes of the allocation that contains `ptr`.
struct Attributes {
    memory_type: u32,
    ordinal: i32,
    context: usize,
    buffer_id: u64,
    legacy_ipc: bool,
    start: u64,
    size: u64,
}

fn attributes(driver: &Driver, ptr: u64) -> Result<Attributes> {
    let (mut memory_type, mut ordinal, mut legacy) = (0u32, 0i32, 0i32);
    let (mut context, mut buffer_id, mut start, mut size): (Handle, u64, u64, u64) =
        (std::ptr::null_mut(), 0, 0, 0);
    let mut which: [c_int; 7] = [
        attr::MEMORY_TYPE,
        attr::DEVICE_ORDINAL,
        attr::CONTEXT,
        attr::BUFFER_ID,
        attr::IS_LEGACY_IPC_CAPABLE,
        attr::RANGE_START,
        attr::RANGE_SIZE,
    ];
    let mut data: [*mut c_void; 7] = [
        (&raw mut memory_type).cast(),
        (&raw mut ordinal).cast(),
        (&raw mut context).cast(),
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
        context: context as usize,
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
pub fn inspect(addr: u64, len: u64, dev_id: u64) -> Result<DeviceAlloc> {
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
    let mut context = 0;
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
        if context == 0 {
            context = a.context;
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
    if context == 0 {
        context = context::primary(driver, ordinal)?;
    }
    Ok(DeviceAlloc {
        ordinal,
        context,
        pieces,
    })
}
