//! Fault-injection points: named places in the code where a unit test can
//! run a hook (block until told, delay, count) to make a race happen
//! deterministically. Outside `cargo test` every point compiles to nothing.
//!
//! A hook is registered for one point *and one engine* (by its token), so
//! tests running in parallel in one process do not see each other's hooks.

#[cfg(test)]
#[allow(clippy::items_after_test_module)]
mod imp {
    use std::sync::Arc;

    use parking_lot::Mutex;

    type Hook = Arc<dyn Fn() + Send + Sync>;

    static HOOKS: Mutex<Vec<(&'static str, u128, u64, Hook)>> = Mutex::new(Vec::new());
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

    /// Runs the hooks registered for point `name` of the engine `token`.
    pub fn point(name: &'static str, token: u128) {
        let hooks: Vec<Hook> = HOOKS
            .lock()
            .iter()
            .filter(|(n, t, _, _)| *n == name && *t == token)
            .map(|(_, _, _, h)| h.clone())
            .collect();
        for h in hooks {
            h();
        }
    }

    /// Removes its hook when dropped.
    pub struct Guard(u64);

    impl Drop for Guard {
        fn drop(&mut self) {
            HOOKS.lock().retain(|(_, _, id, _)| *id != self.0);
        }
    }

    /// Runs `hook` at point `name` of the engine `token` until the guard goes.
    pub fn set(name: &'static str, token: u128, hook: impl Fn() + Send + Sync + 'static) -> Guard {
        let id = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        HOOKS.lock().push((name, token, id, Arc::new(hook)));
        Guard(id)
    }
}

#[cfg(test)]
pub use imp::{Guard, point, set};

/// Runs the test hooks registered for point `name` of engine `token`
/// (nothing outside tests).
#[cfg(not(test))]
#[inline(always)]
pub fn point(_name: &'static str, _token: u128) {}
