//! Pinned host memory for staging device data through the network: the
//! device copies into and out of it at full speed (no driver-side bounce
//! through pageable memory). Buffers are pooled by size, so a busy link
//! allocates them once.

use std::collections::HashMap;
use std::ffi::c_void;
use std::sync::LazyLock;

use parking_lot::Mutex;

use super::context::Current;
use super::driver::{self, Driver};
use crate::common::Result;

/// Idle buffers kept per size; more are freed when given back.
const IDLE_PER_SIZE: usize = 32;

/// Addresses of idle pinned buffers, by (context, size).
type Pool = HashMap<(usize, usize), Vec<usize>>;

/// Idle pinned buffers.
static IDLE: LazyLock<Mutex<Pool>> = LazyLock::new(Default::default);

/// A pinned host buffer of a fixed size, back to the pool when dropped.
pub struct HostBuffer {
    driver: &'static Driver,
    /// The (retained primary) context it was allocated in.
    context: usize,
    addr: usize,
    len: usize,
}

impl HostBuffer {
    /// A buffer of `len` bytes (from the pool, or allocated with
    /// `context` current); `context` must be one we retain for the life of
    /// the process (a device's primary context).
    ///
    /// # Errors
    /// [`Error::Backend`](crate::common::Error::Backend) when the driver
    /// cannot allocate it.
    pub fn take(driver: &'static Driver, context: usize, len: usize) -> Result<HostBuffer> {
        let len = len.max(1);
        if let Some(addr) = IDLE.lock().get_mut(&(context, len)).and_then(Vec::pop) {
            return Ok(HostBuffer {
                driver,
                context,
                addr,
                len,
            });
        }
        let _current = Current::enter(driver, context)?;
        let mut p: *mut c_void = std::ptr::null_mut();
        // SAFETY: the out-pointer is a live local; a context is current.
        let rc = unsafe { (driver.api.mem_host_alloc)(&mut p, len, driver::MEMHOSTALLOC_PORTABLE) };
        driver.check(rc, &format!("cuMemHostAlloc({len})"))?;
        Ok(HostBuffer {
            driver,
            context,
            addr: p as usize,
            len,
        })
    }

    /// Start address.
    pub fn addr(&self) -> u64 {
        self.addr as u64
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Never true: buffers have at least one byte.
    pub fn is_empty(&self) -> bool {
        false
    }
}

impl Drop for HostBuffer {
    fn drop(&mut self) {
        let mut idle = IDLE.lock();
        let list = idle.entry((self.context, self.len)).or_default();
        if list.len() < IDLE_PER_SIZE {
            list.push(self.addr);
            return;
        }
        drop(idle);
        let Ok(_current) = Current::enter(self.driver, self.context) else {
            log::warn!("cannot free a pinned staging buffer: its context cannot be made current");
            return;
        };
        // SAFETY: our own pinned allocation, not used any more, freed with
        // the context it was allocated in current.
        let rc = unsafe { (self.driver.api.mem_free_host)(self.addr as *mut c_void) };
        if rc != 0 {
            log::warn!("cuMemFreeHost failed: {}", self.driver.describe(rc));
        }
    }
}
