//! [`SegmentJob`]: one post of a plan executed by synchronous copies (the
//! in-process copy, cross-memory attach), advanced in bounded steps by the
//! progress worker. A transport supplies the [`Mover`]: how to move bytes
//! from a cursor position, and how to deliver the notification at the end.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use parking_lot::Mutex;

use super::{Completion, Plan, Transfer};
use crate::backend::progress::Job;
use crate::backend::{Error, Result};

/// How a transport moves the bytes of a plan.
pub trait Mover: Send + Sync {
    /// Moves bytes of `plan` starting at `segment` + `offset`, about `budget`
    /// at most, and returns how many moved (more than 0 unless the remaining
    /// segments are empty). Partial moves are fine: the job advances exactly
    /// by the returned count.
    ///
    /// # Errors
    /// Why the transfer cannot go on; it then fails with that error.
    fn move_bytes(&self, plan: &Plan, segment: usize, offset: u64, budget: u64) -> Result<u64>;

    /// Called once, after every byte is in place.
    ///
    /// # Errors
    /// Why the notification could not be delivered.
    fn finished(&self) -> Result<()>;
}

#[derive(Debug, Default)]
struct Cursor {
    segment: usize,
    offset: u64,
    stopped: bool,
}

/// One post of a plan, moved by `M`.
pub struct SegmentJob<M> {
    plan: Arc<Plan>,
    mover: M,
    /// Held while bytes move: cancel waits for the step in progress.
    cursor: Mutex<Cursor>,
    /// Bytes not moved yet (read without the cursor lock).
    left: AtomicU64,
    completion: Completion,
}

impl<M: Mover> SegmentJob<M> {
    /// A job that has moved nothing yet.
    pub fn new(plan: Arc<Plan>, mover: M) -> Self {
        SegmentJob {
            left: AtomicU64::new(plan.total_bytes),
            plan,
            mover,
            cursor: Mutex::new(Cursor::default()),
            completion: Completion::default(),
        }
    }
}

impl<M: Mover> Job for SegmentJob<M> {
    fn step(&self, budget: usize) -> bool {
        let mut c = self.cursor.lock();
        if c.stopped {
            return true;
        }
        let segments = &self.plan.segments;
        let mut moved = 0u64;
        while c.segment < segments.len() && moved < budget as u64 {
            let mut n =
                match self
                    .mover
                    .move_bytes(&self.plan, c.segment, c.offset, budget as u64 - moved)
                {
                    Ok(n) => n,
                    Err(e) => {
                        c.stopped = true;
                        self.completion.finish(Err(e));
                        return true;
                    }
                };
            moved += n;
            // Only the stepping thread (holding the cursor) writes it.
            let left = self.left.load(Ordering::Relaxed).saturating_sub(n);
            self.left.store(left, Ordering::Relaxed);
            // Advance exactly n bytes, then past any empty segments.
            while c.segment < segments.len() && (n > 0 || segments[c.segment].len == c.offset) {
                let step = (segments[c.segment].len - c.offset).min(n);
                c.offset += step;
                n -= step;
                if c.offset == segments[c.segment].len {
                    c.segment += 1;
                    c.offset = 0;
                }
            }
        }
        if c.segment < segments.len() {
            return false;
        }
        c.stopped = true;
        // Every byte is in place: the notification may now be delivered.
        self.completion.finish(self.mover.finished());
        true
    }

    fn cancel(&self) {
        let mut c = self.cursor.lock();
        if !c.stopped {
            c.stopped = true;
            self.completion.finish(Err(Error::Canceled(
                "the request was released while in flight".into(),
            )));
        }
    }
}

impl<M: Mover> Transfer for SegmentJob<M> {
    fn completion(&self) -> &Completion {
        &self.completion
    }

    fn cancel(&self) {
        Job::cancel(self);
    }

    fn remaining_bytes(&self) -> u64 {
        self.left.load(Ordering::Relaxed)
    }
}
