//! Asynchronous device copies on streams of our own, completed by events.
//!
//! A [`Copier`] makes a context current, takes a *lane* (a non-blocking
//! stream and its events) from a small pool per context, queues copies on
//! it and waits for them with one event, or for those before a mark (two
//! more events), to overlap the copies of one piece with other work. Until
//! it was waited for (or dropped, which waits too) the caller must keep the
//! memory of every queued copy
//! registered: that is how deregistration and cancel keep their promises
//! while copies run on the device.

use std::collections::HashMap;
use std::sync::LazyLock;

use parking_lot::Mutex;

use super::context::Current;
use super::driver::{self, Driver, Handle};
use crate::common::Result;

/// A stream and its events of one context (opaque values): one for
/// [`Copier::wait`], one per mark.
#[derive(Debug, Clone, Copy)]
struct Lane {
    stream: usize,
    event: usize,
    marks: [usize; MARKS],
}

/// Marks a copier can record at once (see [`Copier::mark`]).
pub const MARKS: usize = 2;

/// Idle lanes kept per context; more are destroyed when given back.
const IDLE_LANES: usize = 8;

/// Idle lanes, by context.
static LANES: LazyLock<Mutex<HashMap<usize, Vec<Lane>>>> = LazyLock::new(Default::default);

/// Copies queued on one lane of one context.
pub struct Copier<'d> {
    driver: &'d Driver,
    context: usize,
    lane: Lane,
    /// Copies queued since the last successful wait.
    queued: usize,
    /// Set when the driver reported an error on this lane: it is not
    /// pooled again.
    broken: bool,
    _current: Current<'d>,
}

impl<'d> Copier<'d> {
    /// Makes `context` current on this thread and takes a lane of it.
    ///
    /// # Errors
    /// [`Error::Backend`](crate::common::Error::Backend) when the driver
    /// refuses (a context broken by an earlier device fault, say).
    pub fn new(driver: &'d Driver, context: usize) -> Result<Copier<'d>> {
        let current = Current::enter(driver, context)?;
        let idle = LANES.lock().get_mut(&context).and_then(Vec::pop);
        let lane = match idle {
            Some(lane) => lane,
            None => new_lane(driver)?,
        };
        Ok(Copier {
            driver,
            context,
            lane,
            queued: 0,
            broken: false,
            _current: current,
        })
    }

    /// Queues a copy of `len` bytes from `src` to `dst` (device or host
    /// addresses: unified addressing tells which).
    ///
    /// # Errors
    /// [`Error::Backend`](crate::common::Error::Backend) when the driver
    /// refuses it.
    ///
    /// # Safety
    /// Both ranges must stay allocated, and no other code may write `dst`
    /// or (for host memory) read it, until the copy was waited for
    /// ([`Copier::wait`], or the drop of the copier).
    pub unsafe fn copy(&mut self, dst: u64, src: u64, len: u64) -> Result<()> {
        // SAFETY: the caller keeps both ranges allocated until the copy was
        // waited for; the stream is ours.
        let rc = unsafe {
            (self.driver.api.memcpy_async)(dst, src, len as usize, self.lane.stream as Handle)
        };
        // Counted first: a failed call may still have queued work.
        self.queued += 1;
        self.fails(rc, "cuMemcpyAsync")
    }

    /// Records mark `slot` (below [`MARKS`]) after the copies queued so far
    /// (replacing its previous place).
    ///
    /// # Errors
    /// [`Error::Backend`](crate::common::Error::Backend) when the driver
    /// refuses.
    pub fn mark(&mut self, slot: usize) -> Result<()> {
        let (stream, event) = (self.lane.stream as Handle, self.lane.marks[slot] as Handle);
        // SAFETY: the event and stream are ours, of the current context.
        let rc = unsafe { (self.driver.api.event_record)(event, stream) };
        self.fails(rc, "cuEventRecord")
    }

    /// Waits until the copies queued before mark `slot` have finished (at
    /// once when it was never recorded). Copies queued after it may still
    /// run: the caller keeps their memory as [`Copier::copy`] says.
    ///
    /// # Errors
    /// [`Error::Backend`](crate::common::Error::Backend) with the device's
    /// error when one failed.
    pub fn wait_mark(&mut self, slot: usize) -> Result<()> {
        // SAFETY: the event is ours, of the current context.
        let rc = unsafe { (self.driver.api.event_synchronize)(self.lane.marks[slot] as Handle) };
        self.fails(rc, "cuEventSynchronize")
    }

    /// Waits until every copy queued so far has finished on the device.
    ///
    /// # Errors
    /// [`Error::Backend`](crate::common::Error::Backend) with the device's
    /// error (an illegal address, say) when one failed.
    pub fn wait(&mut self) -> Result<()> {
        if self.queued == 0 {
            return Ok(());
        }
        let (stream, event) = (self.lane.stream as Handle, self.lane.event as Handle);
        // SAFETY: the event and stream are ours, of the current context.
        let rc = unsafe { (self.driver.api.event_record)(event, stream) };
        self.fails(rc, "cuEventRecord")?;
        // SAFETY: as above.
        let rc = unsafe { (self.driver.api.event_synchronize)(event) };
        self.fails(rc, "cuEventSynchronize")?;
        self.queued = 0;
        Ok(())
    }

    /// [`Driver::check`], marking the lane broken on an error.
    fn fails(&mut self, rc: driver::CuResult, what: &str) -> Result<()> {
        let checked = self.driver.check(rc, what);
        self.broken |= checked.is_err();
        checked
    }
}

impl Drop for Copier<'_> {
    /// Waits for what is still queued (an error path: with the event, else
    /// for the whole stream), then gives the lane back, or destroys it when
    /// the driver reported an error on it.
    fn drop(&mut self) {
        if let Err(e) = self.wait() {
            log::warn!("device copies ended with an error: {e}");
        }
        if self.queued > 0 {
            // The event failed: wait for the stream itself before the
            // memory of its copies may go.
            // SAFETY: the stream is ours, of the current context.
            let rc = unsafe { (self.driver.api.stream_synchronize)(self.lane.stream as Handle) };
            if rc != driver::SUCCESS {
                log::warn!("cuStreamSynchronize failed: {}", self.driver.describe(rc));
            }
        }
        if !self.broken {
            let mut lanes = LANES.lock();
            let idle = lanes.entry(self.context).or_default();
            if idle.len() < IDLE_LANES {
                idle.push(self.lane);
                return;
            }
        }
        destroy_lane(self.driver, self.lane);
    }
}

fn new_lane(driver: &Driver) -> Result<Lane> {
    let mut stream: Handle = std::ptr::null_mut();
    // SAFETY: the out-pointer is a live local; a context is current.
    let rc = unsafe { (driver.api.stream_create)(&mut stream, driver::STREAM_NON_BLOCKING) };
    driver.check(rc, "cuStreamCreate")?;
    let mut events = [0usize; MARKS + 1];
    for i in 0..events.len() {
        let mut event: Handle = std::ptr::null_mut();
        // SAFETY: as above.
        let rc = unsafe { (driver.api.event_create)(&mut event, driver::EVENT_DISABLE_TIMING) };
        if let Err(e) = driver.check(rc, "cuEventCreate") {
            // SAFETY: the stream and the events made so far are new and
            // hold no work.
            unsafe {
                for &made in &events[..i] {
                    (driver.api.event_destroy)(made as Handle);
                }
                (driver.api.stream_destroy)(stream);
            }
            return Err(e);
        }
        events[i] = event as usize;
    }
    Ok(Lane {
        stream: stream as usize,
        event: events[0],
        marks: [events[1], events[2]],
    })
}

fn destroy_lane(driver: &Driver, lane: Lane) {
    // SAFETY: the lane is ours and no longer used; destroying a stream
    // lets its queued work finish first.
    unsafe {
        for event in std::iter::once(lane.event).chain(lane.marks) {
            (driver.api.event_destroy)(event as Handle);
        }
        (driver.api.stream_destroy)(lane.stream as Handle);
    }
}
