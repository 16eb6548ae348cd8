//! The control page of an engine: how cross-memory attach honours
//! `deregisterMem` and engine destruction.
//!
//! The kernel lets a peer with the right to attach read and write any
//! address of ours, so a peer that prepared a transfer earlier could keep
//! writing into a region after we deregistered it, or into our memory after
//! our engine was destroyed. The control page closes that hole.
//!
//! Each engine owns one page (a `memfd`, mapped shared), which peers map
//! with the same right the probe checks (`pidfd_getfd`, else
//! `/proc/<pid>/fd/<n>`). It holds, as 64-bit atomics:
//! - a liveness word: our engine's incarnation while it lives, 0 after;
//! - one word per region slot: the region's access key while it is
//!   registered, 0 once revoked (a key names its slot, see
//!   [`crate::common::memory::SLOT_BITS`]);
//! - lanes: a peer thread about to access our memory claims a free lane
//!   (compare-and-swap 0 -> a token with its pid), *then* checks the
//!   liveness word and the slots of the regions it touches, makes its one
//!   system call, and frees the lane.
//!
//! Revocation stores 0 in the slot (or the liveness word), *then* waits
//! until every lane claimed before has changed (or its owner process died).
//! Both sides use sequentially consistent operations, so either the peer's
//! check sees the revocation, or the revocation sees the peer's lane and
//! waits for its access to finish: after [`ControlPage::revoke`] returns,
//! no access to the region is in progress and none can start. The cost per
//! access is one CAS, a few loads and one store on a shared cache line.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use log::error;

use crate::common::memory::{MAX_REGIONS, slot_of};

/// First word of every control page.
const MAGIC: u64 = 0x4d43_434d_4170_6731; // "MCCMApg1"
/// Lanes: threads of all peers that may be inside an access at once.
const LANES: usize = 256;
/// Words between two lanes (one cache line each).
const LANE_STRIDE: usize = 8;
/// Word offsets.
const W_MAGIC: usize = 0;
const W_ALIVE: usize = 1;
const W_LANES: usize = 8;
const W_SLOTS: usize = W_LANES + LANES * LANE_STRIDE;
/// Words in a page (the slot area is sparse: only used slots get memory).
const WORDS: usize = W_SLOTS + MAX_REGIONS;
/// Size of the page in bytes.
pub const PAGE_BYTES: usize = WORDS * 8;

/// How long a revocation waits for a live peer's access before it gives up
/// with an error line (a peer stopped by a debugger in the middle of one).
const QUIESCE_CAP: Duration = Duration::from_secs(30);

/// Why a peer's access was refused by the page.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    /// The owner's engine was destroyed.
    EngineGone,
    /// The region with this key was deregistered.
    Revoked(u64),
}

/// A mapped control page: ours, or a peer's.
pub struct ControlPage {
    base: NonNull<AtomicU64>,
    fd: OwnedFd,
}

// SAFETY: the mapping is shared memory accessed only through atomics, and
// it stays mapped for as long as the value lives.
unsafe impl Send for ControlPage {}
// SAFETY: as above; every access is an atomic operation.
unsafe impl Sync for ControlPage {}

impl std::fmt::Debug for ControlPage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ControlPage")
            .field("fd", &self.fd.as_raw_fd())
            .finish_non_exhaustive()
    }
}

/// A nonzero word that names one engine incarnation.
fn incarnation(token: u128) -> u64 {
    (token as u64) | 1
}

impl ControlPage {
    /// Creates the control page of the engine with `token`.
    ///
    /// # Errors
    /// The system error of `memfd_create`, `ftruncate` or `mmap`.
    pub fn create(token: u128) -> std::io::Result<ControlPage> {
        // SAFETY: a NUL-terminated name and plain flags; returns a new fd or -1.
        let raw =
            unsafe { libc::memfd_create(c"mooncake-cma-control".as_ptr(), libc::MFD_CLOEXEC) };
        if raw < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: a fresh fd that we now own.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        // SAFETY: ftruncate on our own memfd.
        if unsafe { libc::ftruncate(fd.as_raw_fd(), PAGE_BYTES as libc::off_t) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        let page = Self::map(fd)?;
        page.word(W_MAGIC).store(MAGIC, Ordering::SeqCst);
        page.word(W_ALIVE)
            .store(incarnation(token), Ordering::SeqCst);
        Ok(page)
    }

    /// Maps the page of the peer process `pid` whose fd `fd` (in that
    /// process) is its control page, and checks that it belongs to the
    /// engine with `token` and that this engine is alive. `pidfd` is a pidfd
    /// of the peer, when the kernel has them.
    ///
    /// # Errors
    /// A sentence saying why not.
    pub fn attach(
        pidfd: Option<RawFd>,
        pid: u32,
        fd: i32,
        token: u128,
    ) -> std::result::Result<ControlPage, String> {
        let ours =
            take_fd(pidfd, pid, fd).map_err(|e| format!("cannot take its control page: {e}"))?;
        // SAFETY: fstat fills the struct for an fd we own.
        let mut st: libc::stat = unsafe { std::mem::zeroed() };
        // SAFETY: as above.
        if unsafe { libc::fstat(ours.as_raw_fd(), &mut st) } != 0
            || st.st_size != PAGE_BYTES as libc::off_t
        {
            return Err(format!(
                "fd {fd} of pid {pid} is not a control page of this version"
            ));
        }
        let page = Self::map(ours).map_err(|e| format!("cannot map its control page: {e}"))?;
        if page.word(W_MAGIC).load(Ordering::SeqCst) != MAGIC
            || page.word(W_ALIVE).load(Ordering::SeqCst) != incarnation(token)
        {
            return Err(format!(
                "fd {fd} of pid {pid} is not the control page of the engine that published this metadata"
            ));
        }
        Ok(page)
    }

    fn map(fd: OwnedFd) -> std::io::Result<ControlPage> {
        // SAFETY: a shared mapping of the whole memfd, which has that size;
        // the kernel picks the address.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                PAGE_BYTES,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd.as_raw_fd(),
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error());
        }
        let base = NonNull::new(p.cast::<AtomicU64>())
            .ok_or_else(|| std::io::Error::other("mmap returned a null mapping"))?;
        Ok(ControlPage { base, fd })
    }

    fn word(&self, i: usize) -> &AtomicU64 {
        assert!(i < WORDS);
        // SAFETY: `i` is inside the mapping, which is 8-byte aligned (page
        // aligned) and lives as long as `self`; shared memory is only ever
        // accessed through atomics.
        unsafe { &*self.base.as_ptr().add(i) }
    }

    fn lane(&self, i: usize) -> &AtomicU64 {
        self.word(W_LANES + i * LANE_STRIDE)
    }

    /// The fd number peers pass to [`Self::attach`].
    pub fn fd(&self) -> i32 {
        self.fd.as_raw_fd()
    }

    // ---- owner side ------------------------------------------------------

    /// Makes the region with `key` accessible to peers.
    pub fn publish(&self, key: u64) {
        self.word(W_SLOTS + slot_of(key) as usize)
            .store(key, Ordering::SeqCst);
    }

    /// Revokes peers' access to the region with `key`: after return none is
    /// in progress and none can start.
    pub fn revoke(&self, key: u64) {
        self.word(W_SLOTS + slot_of(key) as usize)
            .store(0, Ordering::SeqCst);
        self.quiesce(&format!("region {key:#x}"));
    }

    /// Our engine is going: after return no peer accesses our memory.
    pub fn destroy(&self) {
        self.word(W_ALIVE).store(0, Ordering::SeqCst);
        self.quiesce("the engine");
    }

    /// Waits until every lane claimed now was freed (or changed hands, or
    /// its owner process died).
    fn quiesce(&self, what: &str) {
        for i in 0..LANES {
            let held = self.lane(i).load(Ordering::SeqCst);
            if held == 0 {
                continue;
            }
            let pid = (held >> 32) as libc::pid_t;
            let started = Instant::now();
            let mut spins = 0u32;
            while self.lane(i).load(Ordering::SeqCst) == held {
                if !process_alive(pid) {
                    break;
                }
                if started.elapsed() > QUIESCE_CAP {
                    error!(
                        "Mooncake: revoking {what}: peer process {pid} has been inside one \
                         access for {QUIESCE_CAP:?} (stopped?); giving up waiting for it"
                    );
                    break;
                }
                spins += 1;
                if spins < 100 {
                    std::hint::spin_loop();
                } else if spins < 1000 {
                    std::thread::yield_now();
                } else {
                    std::thread::sleep(Duration::from_micros(50));
                }
            }
        }
    }

    // ---- peer side -------------------------------------------------------

    /// Claims a lane, then checks that the owner's engine lives and that
    /// every key of `keys` is still registered. Hold the returned guard for
    /// the duration of the access.
    ///
    /// # Errors
    /// What refused the access.
    pub fn enter(&self, keys: &[u64]) -> std::result::Result<Lane<'_>, Refused> {
        let lane = self.claim();
        if self.word(W_ALIVE).load(Ordering::SeqCst) == 0 {
            return Err(Refused::EngineGone);
        }
        for &key in keys {
            if self
                .word(W_SLOTS + slot_of(key) as usize)
                .load(Ordering::SeqCst)
                != key
            {
                return Err(Refused::Revoked(key));
            }
        }
        Ok(lane)
    }

    fn claim(&self) -> Lane<'_> {
        static SEQ: AtomicU32 = AtomicU32::new(0);
        let seq = SEQ.fetch_add(1, Ordering::Relaxed);
        let token = (u64::from(std::process::id()) << 32) | u64::from(seq);
        let start = thread_hint() % LANES;
        loop {
            for i in (0..LANES).map(|k| (start + k) % LANES) {
                if self
                    .lane(i)
                    .compare_exchange(0, token, Ordering::SeqCst, Ordering::Relaxed)
                    .is_ok()
                {
                    return Lane { page: self, i };
                }
            }
            // Every lane busy: 256 threads inside one system call each.
            std::thread::yield_now();
        }
    }
}

impl Drop for ControlPage {
    fn drop(&mut self) {
        // SAFETY: unmapping our own mapping, of the size we mapped; no
        // reference into it outlives `self`.
        unsafe { libc::munmap(self.base.as_ptr().cast(), PAGE_BYTES) };
    }
}

/// A claimed lane: the owner's revocations wait for it to be dropped.
pub struct Lane<'a> {
    page: &'a ControlPage,
    i: usize,
}

impl Drop for Lane<'_> {
    fn drop(&mut self) {
        self.page.lane(self.i).store(0, Ordering::SeqCst);
    }
}

/// A number that differs between threads, to spread them over the lanes.
fn thread_hint() -> usize {
    // SAFETY: gettid has no arguments and cannot fail.
    (unsafe { libc::gettid() }) as usize
}

/// False once process `pid` is gone.
fn process_alive(pid: libc::pid_t) -> bool {
    // SAFETY: signal 0 only checks that the process exists.
    let rc = unsafe { libc::kill(pid, 0) };
    rc == 0 || std::io::Error::last_os_error().raw_os_error() != Some(libc::ESRCH)
}

/// Our own descriptor for descriptor `fd` of process `pid`, with the right
/// the cross-memory attach probe checks: `pidfd_getfd` on `pidfd` (when the
/// kernel has pidfds), else opening `/proc/<pid>/fd/<fd>`.
///
/// # Errors
/// A sentence saying why neither worked.
pub fn take_fd(pidfd: Option<RawFd>, pid: u32, fd: i32) -> std::result::Result<OwnedFd, String> {
    let taken = pidfd
        .map(|p| {
            // SAFETY: pidfd_getfd takes a pidfd, an fd number of that
            // process and flags; it returns a new fd of ours or -1.
            let raw = unsafe { libc::syscall(libc::SYS_pidfd_getfd, p, fd, 0) };
            if raw < 0 {
                Err(std::io::Error::last_os_error())
            } else {
                // SAFETY: a fresh fd that we now own.
                Ok(unsafe { OwnedFd::from_raw_fd(raw as RawFd) })
            }
        })
        .unwrap_or_else(|| Err(std::io::Error::from_raw_os_error(libc::ENOSYS)));
    match taken {
        Ok(fd) => Ok(fd),
        Err(first) => std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(format!("/proc/{pid}/fd/{fd}"))
            .map(OwnedFd::from)
            .map_err(|e| format!("fd {fd} of pid {pid}: pidfd_getfd: {first}; /proc: {e}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::sync::atomic::AtomicBool;

    fn page_and_view() -> (ControlPage, ControlPage) {
        let token = 0x1234_5678_9abc_def0_0fed_cba9_8765_4321;
        let owner = ControlPage::create(token).unwrap();
        // SAFETY: pidfd_open of ourselves.
        let pidfd = unsafe { libc::syscall(libc::SYS_pidfd_open, std::process::id(), 0) };
        let view = ControlPage::attach(
            (pidfd >= 0).then_some(pidfd as RawFd),
            std::process::id(),
            owner.fd(),
            token,
        )
        .unwrap();
        if pidfd >= 0 {
            // SAFETY: closing the pidfd opened above.
            unsafe { libc::close(pidfd as RawFd) };
        }
        (owner, view)
    }

    #[test]
    fn a_peer_sees_published_keys_and_revocations() {
        let (owner, view) = page_and_view();
        let key = (77u64 << 20) | 5;
        assert_eq!(view.enter(&[key]).err(), Some(Refused::Revoked(key)));
        owner.publish(key);
        assert!(view.enter(&[key]).is_ok());
        assert_eq!(
            view.enter(&[key ^ (1 << 30)]).err(),
            Some(Refused::Revoked(key ^ (1 << 30))),
            "another key in the same slot"
        );
        owner.revoke(key);
        assert_eq!(view.enter(&[key]).err(), Some(Refused::Revoked(key)));
        owner.publish(key);
        owner.destroy();
        assert_eq!(view.enter(&[key]).err(), Some(Refused::EngineGone));
    }

    #[test]
    fn attaching_checks_the_token() {
        let owner = ControlPage::create(5).unwrap();
        let wrong = ControlPage::attach(None, std::process::id(), owner.fd(), 6);
        assert!(wrong.unwrap_err().contains("not the control page"));
        assert!(ControlPage::attach(None, std::process::id(), 0, 5).is_err());
    }

    #[test]
    fn revocation_waits_for_an_access_in_progress() {
        let (owner, view) = page_and_view();
        let owner = Arc::new(owner);
        let key = 9u64 << 20;
        owner.publish(key);
        let lane = view.enter(&[key]).unwrap();
        let revoked = Arc::new(AtomicBool::new(false));
        let t = {
            let (owner, revoked) = (owner.clone(), revoked.clone());
            std::thread::spawn(move || {
                owner.revoke(key);
                revoked.store(true, Ordering::SeqCst);
            })
        };
        std::thread::sleep(Duration::from_millis(50));
        assert!(
            !revoked.load(Ordering::SeqCst),
            "revocation returned while an access was in progress"
        );
        drop(lane);
        t.join().unwrap();
        assert!(view.enter(&[key]).is_err());
    }

    #[test]
    fn a_lane_left_by_a_dead_process_does_not_block_revocation() {
        let (owner, _view) = page_and_view();
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let pid = child.id();
        child.wait().unwrap();
        owner
            .lane(3)
            .store((u64::from(pid) << 32) | 1, Ordering::SeqCst);
        let started = Instant::now();
        owner.revoke(1 << 20);
        assert!(started.elapsed() < Duration::from_secs(10));
    }
}
