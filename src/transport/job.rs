//! [`SegmentJob`]: one post of a plan executed by synchronous copies (the
//! in-process copy, cross-memory attach), advanced in bounded steps by the
//! progress worker. A transport supplies the [`Mover`]: how to move bytes
//! from a cursor position, and how to deliver the notification at the end.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use parking_lot::Mutex;

use super::{Job, Plan, Transfer};
use crate::common::{Completion, Error, Result};

/// How many bytes a caller spinning on `checkXfer` moves per call (about
/// 50 us at memory speed): it keeps the call short, and the progress thread
/// never waits long for the cursor.
pub const HELP_BYTES: usize = 512 << 10;

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

    /// [`Job::step`] with the cursor held.
    fn step_locked(&self, c: &mut Cursor, budget: usize) -> bool {
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
}

impl<M: Mover> Job for SegmentJob<M> {
    fn step(&self, budget: usize) -> bool {
        self.step_locked(&mut self.cursor.lock(), budget)
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

    /// Moves a step of [`HELP_BYTES`] here unless another thread is moving
    /// one.
    fn help(&self) -> bool {
        match self.cursor.try_lock() {
            Some(mut c) => {
                self.step_locked(&mut c, HELP_BYTES);
                true
            }
            None => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::mpsc;
    use std::time::Duration;

    use super::*;
    use crate::transport::{Op, Segment};

    /// Moves nothing (touches no memory); blocks inside its first move until
    /// told to go on; counts the notifications it delivers.
    struct Gate {
        entered: mpsc::SyncSender<()>,
        go: parking_lot::Mutex<Option<mpsc::Receiver<()>>>,
        notified: AtomicU64,
    }

    impl Mover for Gate {
        fn move_bytes(&self, _: &Plan, _: usize, _: u64, budget: u64) -> Result<u64> {
            if let Some(go) = self.go.lock().take() {
                self.entered.send(()).unwrap();
                go.recv().unwrap();
            }
            Ok(budget.min(1 << 20))
        }

        fn finished(&self) -> Result<()> {
            self.notified.fetch_add(1, Ordering::SeqCst);
            Ok(())
        }
    }

    fn plan(len: u64) -> Arc<Plan> {
        Arc::new(Plan {
            op: Op::Write,
            segments: vec![Segment {
                local: 0,
                remote: 0,
                local_addr: 0x1000,
                remote_addr: 0x2000,
                len,
            }],
            local_regions: Vec::new(),
            remote_regions: Vec::new(),
            remote_kinds: Vec::new(),
            remote_extent: Vec::new(),
            total_bytes: len,
        })
    }

    #[test]
    fn a_spinning_caller_helps_only_when_no_other_thread_is_moving_a_step() {
        let (entered_tx, entered) = mpsc::sync_channel(1);
        let (go, go_rx) = mpsc::channel();
        let job = Arc::new(SegmentJob::new(
            plan(3 << 20),
            Gate {
                entered: entered_tx,
                go: parking_lot::Mutex::new(Some(go_rx)),
                notified: AtomicU64::new(0),
            },
        ));
        // A "progress thread" moves one 1 MiB step, and blocks inside it.
        let worker = {
            let job = job.clone();
            std::thread::spawn(move || job.step(1 << 20))
        };
        entered.recv().unwrap();
        // help() must return at once (not wait for the step in progress).
        let helper = {
            let job = job.clone();
            let (tx, rx) = mpsc::channel();
            std::thread::spawn(move || tx.send(job.help()).unwrap());
            rx
        };
        let helped = helper.recv_timeout(Duration::from_secs(60));
        assert_eq!(
            helped,
            Ok(false),
            "helped while another thread held the step"
        );
        assert_eq!(job.remaining_bytes(), 3 << 20);
        go.send(()).unwrap();
        assert!(!worker.join().unwrap(), "one step of three");
        assert_eq!(job.remaining_bytes(), 2 << 20);
        // Now the caller moves the rest itself, HELP_BYTES per call.
        for _ in 0..(2 << 20) / HELP_BYTES {
            assert!(job.completion().in_progress());
            assert!(job.help());
        }
        assert_eq!(job.remaining_bytes(), 0);
        assert_eq!(
            job.completion().result(),
            Ok(crate::common::Status::Success)
        );
        assert_eq!(
            job.mover.notified.load(Ordering::SeqCst),
            1,
            "one notification"
        );
        assert!(job.help(), "a finished job needs no help");
        assert_eq!(job.mover.notified.load(Ordering::SeqCst), 1);
    }
}
