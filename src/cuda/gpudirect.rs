//! GPUDirect RDMA: GPU memory handed to the NICs, which then read and write
//! it without the CPU.
//!
//! - [`dmabuf`]: an allocation exported as a dmabuf descriptor
//!   (`cuMemGetHandleForAddressRange`), which a NIC registers
//!   (`ibv_reg_dmabuf_mr`).
//! - [`note_registered`] / [`flush_writes`]: data a NIC wrote into GPU
//!   memory is made visible to the GPU's own work
//!   (`cuFlushGPUDirectRDMAWrites`) before it is announced (a notification
//!   delivered, a READ reported done).

use std::ffi::c_int;
use std::os::fd::{FromRawFd, OwnedFd};

use parking_lot::Mutex;

use super::context::Current;
use super::driver::{self, driver};
use crate::common::memory::DevicePiece;
use crate::common::{Error, Result};

/// The contexts with memory registered on a NIC for GPUDirect RDMA, whose
/// devices need NIC writes flushed.
static REGISTERED: Mutex<Vec<usize>> = Mutex::new(Vec::new());

/// Set once a flush failed (logged once).
static FLUSH_FAILED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// A dmabuf descriptor for the allocation `piece` of device `ordinal`, made
/// with `context` current, and the address of its byte 0: it covers the
/// allocation in whole pages (the driver takes page-aligned ranges only;
/// small allocations share pages), so byte `x - start` of it is address `x`.
///
/// # Errors
/// [`Error::NotSupported`] when the driver cannot export dmabufs (too old,
/// or `CU_DEVICE_ATTRIBUTE_DMA_BUF_SUPPORTED` is 0, as with the proprietary
/// kernel module: nvidia-peermem may serve then), else the driver's error.
pub fn dmabuf(context: usize, ordinal: i32, piece: &DevicePiece) -> Result<(OwnedFd, u64)> {
    let driver = driver()?;
    let gdr = driver.gdr.as_ref().ok_or_else(|| {
        Error::NotSupported(format!(
            "the CUDA driver {} has no cuMemGetHandleForAddressRange (CUDA 11.7 or later)",
            driver.path
        ))
    })?;
    let _current = Current::enter(driver, context)?;
    if device_attribute(driver, gdr, ordinal, driver::ATTRIBUTE_DMA_BUF_SUPPORTED)? == 0 {
        return Err(Error::NotSupported(format!(
            "GPU {ordinal} exports no dmabuf (CU_DEVICE_ATTRIBUTE_DMA_BUF_SUPPORTED is 0)"
        )));
    }
    // SAFETY: sysconf has no preconditions.
    let page = u64::try_from(unsafe { libc::sysconf(libc::_SC_PAGESIZE) })
        .unwrap_or(4096)
        .max(1);
    let start = piece.base - piece.base % page;
    let end = piece
        .base
        .saturating_add(piece.size)
        .div_ceil(page)
        .saturating_mul(page);
    let size = end - start;
    let mut fd: c_int = -1;
    // SAFETY: the handle out-pointer is a live int (a dmabuf handle is a
    // file descriptor); the driver reads the range as numbers.
    let rc = unsafe {
        (gdr.range_handle)(
            (&raw mut fd).cast(),
            start,
            usize::try_from(size).unwrap_or(usize::MAX),
            driver::RANGE_HANDLE_DMA_BUF_FD,
            0,
        )
    };
    driver.check(
        rc,
        &format!("cuMemGetHandleForAddressRange({start:#x}, {size}, DMA_BUF_FD)"),
    )?;
    if fd < 0 {
        return Err(Error::Backend(format!(
            "cuMemGetHandleForAddressRange({:#x}) gave no descriptor",
            piece.base
        )));
    }
    // SAFETY: the driver gave us this descriptor to own.
    Ok((unsafe { OwnedFd::from_raw_fd(fd) }, start))
}

/// Memory of `context` (device `ordinal`) is registered on a NIC: data the
/// NICs write is flushed for it by [`flush_writes`], unless the device
/// orders NIC writes towards its own work already
/// (`CU_DEVICE_ATTRIBUTE_GPU_DIRECT_RDMA_WRITES_ORDERING` at least
/// "owner").
pub fn note_registered(context: usize, ordinal: i32) {
    if ordered(ordinal) {
        return;
    }
    let mut registered = REGISTERED.lock();
    if !registered.contains(&context) {
        registered.push(context);
    }
}

/// True when device `ordinal` orders the writes of NICs into its memory
/// before its own later work (no flush needed).
fn ordered(ordinal: i32) -> bool {
    let Ok(driver) = driver() else { return false };
    let Some(gdr) = driver.gdr.as_ref() else {
        return false;
    };
    let order = device_attribute(
        driver,
        gdr,
        ordinal,
        driver::ATTRIBUTE_GPU_DIRECT_RDMA_WRITES_ORDERING,
    );
    order.is_ok_and(|o| o >= driver::ORDERING_OWNER)
}

/// Attribute `attribute` of device `ordinal`.
///
/// # Errors
/// The driver's error.
fn device_attribute(
    driver: &driver::Driver,
    gdr: &driver::Gdr,
    ordinal: i32,
    attribute: c_int,
) -> Result<c_int> {
    let (mut device, mut value): (c_int, c_int) = (0, 0);
    // SAFETY: the out-pointer is a live local.
    let rc = unsafe { (driver.api.device_get)(&mut device, ordinal) };
    driver.check(rc, &format!("cuDeviceGet({ordinal})"))?;
    // SAFETY: as above.
    let rc = unsafe { (gdr.device_attribute)(&mut value, attribute, device) };
    driver.check(
        rc,
        &format!("cuDeviceGetAttribute({attribute}, device {ordinal})"),
    )?;
    Ok(value)
}

/// Makes what our NICs wrote into GPU memory visible to work on the GPUs
/// (`cuFlushGPUDirectRDMAWrites` to the owner, for each context with
/// registered memory). Nothing when no GPU memory was ever registered on a
/// NIC, or the driver has no such call; a failure is logged (the data is
/// in place; only its ordering towards GPU work is in doubt).
pub fn flush_writes() {
    let contexts = REGISTERED.lock().clone();
    if contexts.is_empty() {
        return;
    }
    let Ok(driver) = driver() else { return };
    let Some(flush) = driver.gdr.as_ref().and_then(|g| g.flush) else {
        return;
    };
    for context in contexts {
        let flushed = Current::enter(driver, context).and_then(|_current| {
            // SAFETY: plain values; a context is current.
            let rc = unsafe { flush(driver::FLUSH_TARGET_CURRENT_CTX, driver::FLUSH_TO_OWNER) };
            driver.check(rc, "cuFlushGPUDirectRDMAWrites")
        });
        if let Err(e) = flushed
            && !FLUSH_FAILED.swap(true, std::sync::atomic::Ordering::Relaxed)
        {
            log::warn!("Mooncake: {e} (said once; the data is in place)");
        }
    }
}
