//! CUDA contexts: the primary context of each device (retained once, kept
//! for the life of the process) and a guard that makes a context current on
//! the calling thread and restores the caller's afterwards.

use std::collections::HashMap;
use std::sync::LazyLock;

use parking_lot::Mutex;

use super::driver::{Driver, Handle};
use crate::common::{Error, Result};

/// Primary contexts we retained, by device ordinal (as opaque values).
static PRIMARY: LazyLock<Mutex<HashMap<i32, usize>>> = LazyLock::new(Default::default);

/// The primary context of device `ordinal`, retained on first use.
///
/// # Errors
/// [`Error::InvalidParam`] for an ordinal the driver does not have,
/// [`Error::Backend`] when the driver refuses.
pub fn primary(driver: &Driver, ordinal: i32) -> Result<usize> {
    if ordinal < 0 || ordinal >= driver.devices {
        return Err(Error::InvalidParam(format!(
            "device {ordinal} does not exist (the CUDA driver has {} device(s))",
            driver.devices
        )));
    }
    let mut map = PRIMARY.lock();
    if let Some(&ctx) = map.get(&ordinal) {
        return Ok(ctx);
    }
    let mut dev = 0;
    // SAFETY: the out-pointer is a live local; the ordinal was checked.
    let rc = unsafe { (driver.api.device_get)(&mut dev, ordinal) };
    driver.check(rc, &format!("cuDeviceGet({ordinal})"))?;
    let mut ctx: Handle = std::ptr::null_mut();
    // SAFETY: as above. The retained context is never released: it lives
    // as long as the process, as the caller's own primary context does.
    let rc = unsafe { (driver.api.primary_ctx_retain)(&mut ctx, dev) };
    driver.check(rc, &format!("cuDevicePrimaryCtxRetain({ordinal})"))?;
    map.insert(ordinal, ctx as usize);
    Ok(ctx as usize)
}

/// Keeps a context current on this thread; restores the thread's previous
/// context when dropped (so a caller's thread that called into us finds
/// its own context as it left it).
pub struct Current<'d> {
    driver: &'d Driver,
    previous: Handle,
    changed: bool,
}

impl<'d> Current<'d> {
    /// Makes `context` current on this thread.
    ///
    /// # Errors
    /// [`Error::Backend`] when the driver refuses.
    pub fn enter(driver: &'d Driver, context: usize) -> Result<Current<'d>> {
        let mut previous: Handle = std::ptr::null_mut();
        // SAFETY: the out-pointer is a live local.
        let rc = unsafe { (driver.api.ctx_get_current)(&mut previous) };
        driver.check(rc, "cuCtxGetCurrent")?;
        let changed = previous as usize != context;
        if changed {
            // SAFETY: `context` is a context the driver gave us (an
            // allocation's or a primary context we retained).
            let rc = unsafe { (driver.api.ctx_set_current)(context as Handle) };
            driver.check(rc, "cuCtxSetCurrent")?;
        }
        Ok(Current {
            driver,
            previous,
            changed,
        })
    }
}

impl Drop for Current<'_> {
    fn drop(&mut self) {
        if self.changed {
            // SAFETY: `previous` was this thread's current context (or
            // null, which unsets it) when the guard was made.
            let rc = unsafe { (self.driver.api.ctx_set_current)(self.previous) };
            if rc != 0 {
                log::warn!(
                    "cuCtxSetCurrent could not restore the thread's context: {}",
                    self.driver.describe(rc)
                );
            }
        }
    }
}
