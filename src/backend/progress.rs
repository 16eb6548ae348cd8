//! The progress worker: runs queued transfer work either on its own thread
//! (NIXL's `enableProgTh`) or inside the caller's `postXfer`/`checkXfer`.
//!
//! The thread sleeps on a condition variable while the queue is empty, so an
//! idle engine costs no CPU. With a non-zero `pthrDelay` it also wakes up at
//! least that often to look for work.

use std::collections::VecDeque;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use parking_lot::{Condvar, Mutex};

pub use crate::transport::Job;

/// How many bytes one step moves before the job goes back in the queue
/// (bounds how long `releaseReqH` may wait for a step in progress).
pub const STEP_BYTES: usize = 2 << 20;

#[derive(Default)]
struct Queue {
    jobs: VecDeque<Arc<dyn Job>>,
    stop: bool,
}

/// The queue of pending jobs and, optionally, the thread that runs them.
pub struct Worker {
    queue: Mutex<Queue>,
    wake: Condvar,
    thread: Mutex<Option<JoinHandle<()>>>,
    delay: Option<Duration>,
}

impl Worker {
    /// Creates a worker; with `thread` set, starts the progress thread.
    ///
    /// # Errors
    /// The OS error when the thread cannot be spawned.
    pub fn start(thread: bool, delay: Duration) -> std::io::Result<Arc<Worker>> {
        let worker = Arc::new(Worker {
            queue: Mutex::new(Queue::default()),
            wake: Condvar::new(),
            thread: Mutex::new(None),
            delay: (!delay.is_zero()).then_some(delay),
        });
        if thread {
            let w = worker.clone();
            let handle = std::thread::Builder::new()
                .name("mooncake-progress".into())
                .spawn(move || w.run())?;
            *worker.thread.lock() = Some(handle);
        }
        Ok(worker)
    }

    /// True when a progress thread runs the queue.
    pub fn has_thread(&self) -> bool {
        self.thread.lock().is_some()
    }

    /// Queues a job and wakes the progress thread.
    pub fn submit(&self, job: Arc<dyn Job>) {
        let mut q = self.queue.lock();
        if q.stop {
            drop(q);
            job.cancel();
            return;
        }
        q.jobs.push_back(job);
        drop(q);
        self.wake.notify_one();
    }

    /// Runs up to `steps` steps of queued jobs on the calling thread.
    /// Returns true when the queue was found empty.
    pub fn drive(&self, steps: usize) -> bool {
        for _ in 0..steps {
            let Some(job) = self.queue.lock().jobs.pop_front() else {
                return true;
            };
            if !job.step(STEP_BYTES) {
                self.queue.lock().jobs.push_back(job);
            }
        }
        false
    }

    fn run(&self) {
        loop {
            let job = {
                let mut q = self.queue.lock();
                loop {
                    if q.stop {
                        return;
                    }
                    if let Some(job) = q.jobs.pop_front() {
                        break job;
                    }
                    match self.delay {
                        Some(d) => {
                            self.wake.wait_for(&mut q, d);
                        }
                        None => self.wake.wait(&mut q),
                    }
                }
            };
            if !job.step(STEP_BYTES) {
                self.queue.lock().jobs.push_back(job);
            }
        }
    }

    /// Stops the thread (if any) and cancels every queued job.
    pub fn shutdown(&self) {
        let jobs = {
            let mut q = self.queue.lock();
            q.stop = true;
            std::mem::take(&mut q.jobs)
        };
        self.wake.notify_all();
        for job in jobs {
            job.cancel();
        }
        if let Some(handle) = self.thread.lock().take() {
            // A panic on the progress thread was already reported by the
            // panic hook; joining only collects it.
            let _ = handle.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    use std::time::Instant;

    struct Counter {
        left: AtomicUsize,
        cancelled: AtomicBool,
    }

    impl Job for Counter {
        fn step(&self, _budget: usize) -> bool {
            if self.cancelled.load(Ordering::SeqCst) {
                return true;
            }
            self.left.fetch_sub(1, Ordering::SeqCst) == 1
        }
        fn cancel(&self) {
            self.cancelled.store(true, Ordering::SeqCst);
        }
    }

    fn counter(n: usize) -> Arc<Counter> {
        Arc::new(Counter {
            left: AtomicUsize::new(n),
            cancelled: AtomicBool::new(false),
        })
    }

    fn wait_until(what: &str, cond: impl Fn() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while !cond() {
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    #[test]
    fn inline_drive_runs_jobs_in_bounded_steps() {
        let w = Worker::start(false, Duration::ZERO).unwrap();
        assert!(!w.has_thread());
        let (a, b) = (counter(3), counter(2));
        w.submit(a.clone());
        w.submit(b.clone());
        assert!(!w.drive(2));
        assert_eq!(
            (a.left.load(Ordering::SeqCst), b.left.load(Ordering::SeqCst)),
            (2, 1)
        );
        assert!(!w.drive(3));
        assert!(w.drive(10));
        assert_eq!(
            (a.left.load(Ordering::SeqCst), b.left.load(Ordering::SeqCst)),
            (0, 0)
        );
    }

    #[test]
    fn thread_runs_jobs_and_shutdown_cancels_the_rest() {
        let w = Worker::start(true, Duration::from_micros(100)).unwrap();
        assert!(w.has_thread());
        let a = counter(1000);
        w.submit(a.clone());
        wait_until("the thread to finish the job", || {
            a.left.load(Ordering::SeqCst) == 0
        });
        w.shutdown();
        let b = counter(5);
        w.submit(b.clone());
        assert!(
            b.cancelled.load(Ordering::SeqCst),
            "jobs after shutdown are cancelled"
        );
    }
}
