//! [`Completion`]: the outcome slot of one post of a transfer.

use std::sync::atomic::{AtomicI32, Ordering};
use std::time::Duration;

use parking_lot::{Condvar, Mutex};

use super::status::{Error, Result, Status};

/// The outcome slot of one post: in progress, then exactly one result.
#[derive(Debug)]
pub struct Completion {
    code: AtomicI32,
    error: Mutex<Option<Error>>,
    /// Signalled (under `error`) when the result is recorded.
    done: Condvar,
}

impl Default for Completion {
    fn default() -> Self {
        Completion {
            code: AtomicI32::new(Status::InProg.code()),
            error: Mutex::new(None),
            done: Condvar::new(),
        }
    }
}

impl Completion {
    /// Records the result; only the first call has an effect.
    pub fn finish(&self, result: Result<()>) {
        let mut slot = self.error.lock();
        if self.code.load(Ordering::Acquire) != Status::InProg.code() {
            return;
        }
        let code = match result {
            Ok(()) => Status::Success.code(),
            Err(e) => {
                let code = e.status().code();
                *slot = Some(e);
                code
            }
        };
        self.code.store(code, Ordering::Release);
        self.done.notify_all(); // cheap when nobody waits
    }

    /// Waits until the result is recorded or `timeout` passed.
    pub fn wait(&self, timeout: Duration) {
        let mut slot = self.error.lock();
        if self.in_progress() {
            self.done.wait_for(&mut slot, timeout);
        }
    }

    /// `Ok(InProg)`, `Ok(Success)`, or the error the transfer ended with.
    pub fn result(&self) -> Result<Status> {
        match Status::from_code(self.code.load(Ordering::Acquire)) {
            Some(s @ (Status::InProg | Status::Success)) => Ok(s),
            _ => Err(self.error.lock().clone().unwrap_or_else(|| {
                Error::Backend("transfer failed without a recorded error".into())
            })),
        }
    }

    /// True while the transfer runs.
    pub fn in_progress(&self) -> bool {
        self.code.load(Ordering::Acquire) == Status::InProg.code()
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::Instant;

    use super::*;

    #[test]
    fn a_wait_ends_when_the_result_is_recorded() {
        let c = Arc::new(Completion::default());
        let finisher = {
            let c = c.clone();
            std::thread::spawn(move || {
                std::thread::sleep(Duration::from_millis(20));
                c.finish(Ok(()));
            })
        };
        let started = Instant::now();
        c.wait(Duration::from_secs(120));
        assert!(started.elapsed() < Duration::from_secs(60), "not woken");
        assert_eq!(c.result(), Ok(Status::Success));
        finisher.join().unwrap();
        // Finished: returns at once.
        let started = Instant::now();
        c.wait(Duration::from_secs(120));
        assert!(started.elapsed() < Duration::from_secs(60));
    }

    #[test]
    fn a_wait_ends_after_its_timeout_while_in_progress() {
        let c = Completion::default();
        let started = Instant::now();
        c.wait(Duration::from_millis(20));
        assert!(started.elapsed() >= Duration::from_millis(20));
        assert!(c.in_progress());
    }
}
