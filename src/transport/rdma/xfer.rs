//! One post of a plan over RDMA: how many work requests are left, the
//! first error, the local regions it holds, and the notification of a READ
//! (sent once the data arrived).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use parking_lot::Mutex;

use super::qp::{Part, QpConn, Salvage};
use super::reg::RegionReg;
use super::slice::Slice;
use crate::common::{Completion, Error, Result};
use crate::transport::{Plan, Transfer};

/// What a post sends once every byte of it is confirmed (READ: arrived
/// here; WRITE: acknowledged by the peer's NIC): its notification, in
/// parts, one on each NIC pair that carried its data (after that data: the
/// target's NIC places a receive only after the writes before it), the
/// message on the first, fences on the others.
pub struct AfterData {
    /// Per NIC pair that carried the data (at least one), its queue pairs:
    /// the part goes on the first that is not broken.
    pub groups: Vec<Vec<Arc<QpConn>>>,
    /// The notification's id.
    pub id: u64,
    /// The message.
    pub msg: Arc<Vec<u8>>,
}

/// One post.
pub struct Xfer {
    /// The plan.
    pub plan: Arc<Plan>,
    /// Its slices (shared by the queue pairs that move them).
    pub slices: Vec<Slice>,
    /// The registrations of the plan's local regions, held (in flight)
    /// until the last work request completed.
    pub locals: Vec<Arc<RegionReg>>,
    completion: Completion,
    /// Work requests not completed yet (posted or still to post).
    left: AtomicUsize,
    error: Mutex<Option<Error>>,
    cancelled: AtomicBool,
    after_data: Mutex<Option<AfterData>>,
    /// Called when a transfer in progress is polled: notices a dead peer.
    watch: Option<Box<dyn Fn() + Send + Sync>>,
    /// Moves what a queue pair that lost its link left of this post to
    /// another one (its route's); false when none can take it.
    mover: Mutex<Option<Mover>>,
    /// How many times work of it moved.
    moves: AtomicUsize,
}

/// Moves salvaged work of a post (that broke on the queue pair of our NIC
/// `usize` with number `u32`) to a healthy queue pair; false when there is
/// none.
pub type Mover = Arc<dyn Fn(&Arc<Xfer>, (usize, u32), Salvage) -> bool + Send + Sync>;

/// How many times a post's work may move to another queue pair.
const MAX_MOVES: usize = 8;

impl Xfer {
    /// A post of `plan` cut into `slices`, with `wrs` work requests in all,
    /// holding `locals` (each entered once by the caller).
    pub fn new(
        plan: Arc<Plan>,
        slices: Vec<Slice>,
        locals: Vec<Arc<RegionReg>>,
        wrs: usize,
        watch: Option<Box<dyn Fn() + Send + Sync>>,
    ) -> Xfer {
        Xfer {
            plan,
            slices,
            locals,
            completion: Completion::default(),
            left: AtomicUsize::new(wrs),
            error: Mutex::new(None),
            cancelled: AtomicBool::new(false),
            after_data: Mutex::new(None),
            watch,
            mover: Mutex::new(None),
            moves: AtomicUsize::new(0),
        }
    }

    /// Sets how work of it moves after a link failure.
    pub fn set_mover(&self, mover: Mover) {
        *self.mover.lock() = Some(mover);
    }

    /// Moves `sv` (what queue pair `from` left of this post when its link
    /// failed) to another queue pair. False when it cannot (stopped, moved
    /// too often, no healthy queue pair): the caller fails that work.
    pub fn retry(self: &Arc<Self>, from: (usize, u32), sv: Salvage) -> bool {
        if self.stopped() || self.moves.fetch_add(1, Ordering::AcqRel) >= MAX_MOVES {
            return false;
        }
        // Called without the lock: moving may end up here again.
        let mover = self.mover.lock().clone();
        mover.is_some_and(|m| m(self, from, sv))
    }

    /// Sets what to send once the data arrived (a READ's notification).
    pub fn set_after_data(&self, after: AfterData) {
        *self.after_data.lock() = Some(after);
    }

    /// True once cancelled or failed: no more work of it is posted.
    pub fn stopped(&self) -> bool {
        self.cancelled.load(Ordering::Acquire) || self.error.lock().is_some()
    }

    /// `n` work requests of it completed (with `error` when they failed),
    /// or will never be posted.
    pub fn done(self: &Arc<Self>, n: usize, error: Option<Error>) {
        if n == 0 {
            return;
        }
        if let Some(e) = error {
            self.error.lock().get_or_insert(e);
        }
        let before = self.left.fetch_sub(n, Ordering::AcqRel);
        debug_assert!(before >= n, "more completions than work requests");
        if before != n {
            return;
        }
        // Every byte is confirmed: the notification goes now. (Sent before,
        // it could overtake data that a failed link makes us send again.)
        let after = self.after_data.lock().take();
        if let Some(after) = after
            && !self.stopped()
        {
            let parts = after.groups.len();
            self.left.fetch_add(
                super::qp::part_wrs(after.msg.len()) + parts - 1,
                Ordering::AcqRel,
            );
            for (k, group) in after.groups.iter().enumerate() {
                let q = group.iter().find(|q| !q.is_broken()).unwrap_or(&group[0]);
                let msg = (k == 0).then(|| after.msg.clone());
                q.push_part(self, Part::new(after.id, parts as u16, k as u16, msg));
            }
            return;
        }
        self.finish();
    }

    /// A post with nothing to move: ends at once (a READ's notification is
    /// sent first).
    pub fn done_nothing(self: &Arc<Self>) {
        self.left.fetch_add(1, Ordering::AcqRel);
        self.done(1, None);
    }

    fn finish(&self) {
        // A READ's data our NICs wrote into GPU memory is visible to GPU
        // work before the READ is reported done (and before the region may
        // be deregistered).
        if self.plan.op == crate::transport::Op::Read && self.locals.iter().any(|r| r.device) {
            crate::cuda::gpudirect::flush_writes();
        }
        for r in &self.locals {
            r.leave();
        }
        // It held the queue pairs of the post's generation.
        self.mover.lock().take();
        let result = match self.error.lock().clone() {
            Some(e) => Err(e),
            None if self.cancelled.load(Ordering::Acquire) => {
                Err(Error::Backend("transfer cancelled".into()))
            }
            None => Ok(()),
        };
        self.completion.finish(result);
    }

    /// Fails the post before anything of it was posted (no memory touched);
    /// it ends now, even with nothing to move.
    pub fn fail_unposted(self: &Arc<Self>, e: Error) {
        self.after_data.lock().take();
        let n = self.left.fetch_add(1, Ordering::AcqRel) + 1;
        self.done(n, Some(e));
    }

    /// The result so far.
    pub fn result(&self) -> Result<crate::common::Status> {
        self.completion.result()
    }
}

/// How long `cancel` waits for the work requests in flight to complete
/// (they do within the queue pair's transport timeout, about 0.5 s, even
/// when the peer is gone).
pub const CANCEL_BOUND: Duration = Duration::from_secs(5);

impl Transfer for Xfer {
    fn completion(&self) -> &Completion {
        &self.completion
    }

    /// Stops posting its work and waits (at most [`CANCEL_BOUND`]) for the
    /// work requests in flight: after return none of its bytes lands.
    fn cancel(&self) {
        self.cancelled.store(true, Ordering::Release);
        let started = std::time::Instant::now();
        while self.completion.in_progress() && started.elapsed() < CANCEL_BOUND {
            self.completion.wait(Duration::from_millis(20));
        }
        if self.completion.in_progress() {
            log::warn!(
                "Mooncake: RDMA transfer still has work on the NIC {} s after its release",
                CANCEL_BOUND.as_secs()
            );
        }
    }

    fn poll(&self) {
        if let Some(watch) = &self.watch {
            watch();
        }
    }

    fn remaining_bytes(&self) -> u64 {
        if self.completion.in_progress() {
            self.plan.total_bytes
        } else {
            0
        }
    }
}
