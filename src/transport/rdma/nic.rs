//! One NIC in use: its protection domain, one completion queue for all of
//! its queue pairs, and the thread that handles their completions. The
//! thread polls while completions come and sleeps on the completion
//! channel when idle (no CPU used by an idle engine).

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use parking_lot::{Mutex, RwLock};

use super::device::Nic;
use super::qp::{QpConn, Side};
use super::verbs::{CompChannel, Cq, Pd, sys};
use crate::common::{Error, Result};

/// Entries of each NIC's completion queue (at most the device's limit).
const CQ_ENTRIES: usize = 1 << 16;
/// How long the completion thread keeps polling after the last completion
/// before it sleeps on the channel.
const SPIN: Duration = Duration::from_micros(50);

/// One NIC and its completion thread.
pub struct NicWorker {
    /// Its index in our published list.
    pub index: usize,
    /// The NIC.
    pub nic: Nic,
    /// Its protection domain (every memory region and queue pair).
    pub pd: Arc<Pd>,
    cq: Arc<Cq>,
    channel: Arc<CompChannel>,
    /// Live queue pairs by number.
    qps: RwLock<HashMap<u32, Arc<QpConn>>>,
    /// Completion queue entries not promised to a queue pair yet.
    budget: Mutex<usize>,
    stop: AtomicBool,
    thread: Mutex<Option<JoinHandle<()>>>,
}

impl NicWorker {
    /// Opens `nic`'s resources and starts its completion thread.
    ///
    /// # Errors
    /// When the NIC refuses a resource or the thread cannot start.
    pub fn start(index: usize, nic: Nic) -> Result<Arc<NicWorker>> {
        let pd = nic.ctx.alloc_pd()?;
        let channel = nic.ctx.comp_channel()?;
        let entries = CQ_ENTRIES.min(nic.limits.max_cqe as usize);
        let cq = nic.ctx.create_cq(entries, Some(&channel))?;
        set_nonblocking(channel.fd())?;
        let budget = cq.entries();
        let w = Arc::new(NicWorker {
            index,
            nic,
            pd,
            cq,
            channel,
            qps: RwLock::new(HashMap::new()),
            budget: Mutex::new(budget),
            stop: AtomicBool::new(false),
            thread: Mutex::new(None),
        });
        let run = w.clone();
        let t = std::thread::Builder::new()
            .name(format!("mooncake-rdma-{index}"))
            .spawn(move || run.run())
            .map_err(|e| Error::Backend(format!("cannot start an RDMA thread: {e}")))?;
        *w.thread.lock() = Some(t);
        Ok(w)
    }

    /// A queue pair on this NIC (to the peer's NIC `remote_nic`), in RESET,
    /// not yet receiving completions (see [`Self::attach`]).
    ///
    /// # Errors
    /// When the completion queue has no room for it, or the NIC refuses.
    pub fn create_qp(&self, remote_nic: usize, side: Side) -> Result<Arc<QpConn>> {
        let need = match &side {
            Side::Send { depth } => *depth + 1,
            Side::Recv(_) => super::qp::RECV_SLOTS + 1,
        };
        {
            let mut b = self.budget.lock();
            if *b < need {
                return Err(Error::Backend(format!(
                    "RDMA: the completion queue of {} is full ({} queue pairs)",
                    self.nic.name(),
                    self.qps.read().len()
                )));
            }
            *b -= need;
        }
        match QpConn::create(&self.pd, &self.cq, (self.index, remote_nic), side) {
            Ok(q) => Ok(Arc::new(q)),
            Err(e) => {
                *self.budget.lock() += need;
                Err(e)
            }
        }
    }

    /// Starts handing `qp`'s completions to it.
    pub fn attach(&self, qp: &Arc<QpConn>) {
        self.qps.write().insert(qp.qp.qp_num, qp.clone());
    }

    /// Retires `qp` (see [`QpConn::retire`]); it is destroyed once drained.
    pub fn retire(&self, qp: &Arc<QpConn>) {
        qp.retire();
        self.reap(qp);
    }

    /// Destroys `qp` when it is retired and drained.
    fn reap(&self, qp: &Arc<QpConn>) {
        if qp.drained() && self.qps.write().remove(&qp.qp.qp_num).is_some() {
            let need = qp.cq_entries();
            *self.budget.lock() += need;
        }
    }

    /// Live queue pairs (for tests and diagnostics).
    pub fn live_qps(&self) -> usize {
        self.qps.read().len()
    }

    fn run(self: Arc<Self>) {
        let mut wcs = vec![sys::Wc::default(); 64];
        let mut last = Instant::now();
        while !self.stop.load(Ordering::Acquire) {
            let n = match self.cq.poll(&mut wcs) {
                Ok(n) => n,
                Err(e) => {
                    log::warn!("Mooncake: RDMA {}: {e}", self.nic.name());
                    std::thread::sleep(Duration::from_millis(10));
                    continue;
                }
            };
            if n > 0 {
                self.dispatch(&wcs[..n]);
                last = Instant::now();
                continue;
            }
            if last.elapsed() < SPIN {
                std::hint::spin_loop();
                continue;
            }
            // Arm, then look once more: a completion that came before the
            // arm raised no event.
            if let Err(e) = self.cq.arm() {
                log::warn!("Mooncake: RDMA {}: {e}", self.nic.name());
            }
            if let Ok(n) = self.cq.poll(&mut wcs)
                && n > 0
            {
                self.dispatch(&wcs[..n]);
                last = Instant::now();
                continue;
            }
            let mut pfd = libc::pollfd {
                fd: self.channel.fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: one live pollfd; bounded wait so `stop` is seen.
            unsafe { libc::poll(&mut pfd, 1, 100) };
            while self.channel.take_event(&self.cq) {}
        }
    }

    fn dispatch(&self, wcs: &[sys::Wc]) {
        for wc in wcs {
            let qp = self.qps.read().get(&wc.qp_num).cloned();
            if let Some(qp) = qp {
                qp.complete(wc);
                self.reap(&qp);
            }
        }
    }

    /// Retires every queue pair (their work flushes; see [`Self::stop`]).
    pub fn retire_all(&self) {
        let qps: Vec<_> = self.qps.read().values().cloned().collect();
        for q in &qps {
            q.retire();
        }
    }

    /// True once every retired queue pair drained.
    pub fn drained(&self) -> bool {
        self.qps.read().values().all(|q| q.drained())
    }

    /// Retires every queue pair, lets the flushes arrive until `deadline`,
    /// then stops the completion thread and ends what did not drain.
    pub fn stop(&self, deadline: Instant) {
        self.retire_all();
        let qps: Vec<_> = self.qps.read().values().cloned().collect();
        while Instant::now() < deadline && qps.iter().any(|q| !q.drained()) {
            std::thread::sleep(Duration::from_millis(2));
        }
        self.stop.store(true, Ordering::Release);
        if let Some(t) = self.thread.lock().take() {
            let _ = t.join();
        }
        // Whatever did not drain ends now (the thread that would have seen
        // its completions is gone).
        for q in &qps {
            q.abandon();
        }
        self.qps.write().clear();
    }
}

fn set_nonblocking(fd: i32) -> Result<()> {
    // SAFETY: fcntl on a descriptor we own (the channel's).
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
    // SAFETY: as above.
    if flags < 0 || unsafe { libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK) } < 0 {
        return Err(Error::Backend(format!(
            "RDMA: cannot make the completion channel non-blocking: {}",
            std::io::Error::last_os_error()
        )));
    }
    Ok(())
}
