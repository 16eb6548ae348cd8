//! Transports: how bytes move. They know nothing of NIXL.
//!
//! The backend hands a transport a [`Plan`] (which local range goes to or
//! comes from which remote range) and gets back a [`Transfer`] whose
//! [`Completion`] it polls. Which transport serves a peer is decided in one
//! place, [`select`].

pub mod cma;
pub mod inproc;
pub mod job;
pub mod tcp;

use std::sync::Arc;
use std::sync::atomic::{AtomicI32, Ordering};
use std::time::Duration;

use parking_lot::{Condvar, Mutex};

use crate::backend::options::Protocol;
use crate::backend::registry::LocalRegion;
use crate::backend::{Error, Result, Status};
use crate::wire::conn_info::{ConnInfo, Endpoint};
use crate::wire::region::RegionPublic;

/// Direction of a transfer, seen from the initiator.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    /// Remote memory into local memory.
    Read,
    /// Local memory into remote memory.
    Write,
}

/// One contiguous piece of a transfer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Segment {
    /// Index into [`Plan::local_regions`].
    pub local: u32,
    /// Index into [`Plan::remote_regions`].
    pub remote: u32,
    /// Local start address.
    pub local_addr: u64,
    /// Remote start address (in the peer's address space).
    pub remote_addr: u64,
    /// Length in bytes.
    pub len: u64,
}

/// Everything that must move for one request, validated against the
/// registrations known at prep time. Immutable; shared by every post.
#[derive(Debug)]
pub struct Plan {
    /// Read or write.
    pub op: Op,
    /// The pieces, in the caller's order.
    pub segments: Vec<Segment>,
    /// Distinct local regions the segments use.
    pub local_regions: Vec<Arc<LocalRegion>>,
    /// Distinct remote regions the segments use, as the peer published them.
    pub remote_regions: Vec<RegionPublic>,
    /// Per remote region, the lowest and highest address the segments touch
    /// (`[lo, hi)`), so the target can check all of them at once.
    pub remote_extent: Vec<(u64, u64)>,
    /// Sum of segment lengths.
    pub total_bytes: u64,
}

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

/// A posted transfer, as the backend sees it.
pub trait Transfer: Send + Sync {
    /// Where the transfer stands.
    fn completion(&self) -> &Completion;
    /// Cancels the transfer. After return, no byte of it is written anywhere
    /// and its notification is not delivered.
    fn cancel(&self);
    /// Called by `checkXfer` while the transfer runs: a transport may make
    /// progress on the caller's thread (by default it does nothing).
    fn poll(&self) {}
    /// About how many bytes are still to move (0 when unknown): a caller
    /// spinning on a transfer with much left to move may wait instead.
    fn remaining_bytes(&self) -> u64 {
        0
    }
    /// Called by a caller spinning on the transfer: a transport whose data
    /// the caller's thread can move may move a bounded part of it there (or
    /// find it finished) and return true; false when the caller cannot help
    /// now (by default: the transport's own threads move the data).
    fn help(&self) -> bool {
        false
    }
}

/// How an engine reaches one peer.
#[derive(Debug)]
pub enum RouteKind {
    /// The peer is an engine in this very process: direct copy.
    InProcess,
    /// TCP to the peer's listener.
    Tcp(std::net::SocketAddr),
    /// Cross-memory attach to process `pid` on this host; control messages
    /// and notifications over TCP to `control`.
    Cma {
        /// The probed peer process.
        peer: cma::CmaPeer,
        /// The peer's TCP listener.
        control: std::net::SocketAddr,
    },
}

/// Chooses the transport for a peer, or says why none can serve it.
///
/// `auto`: a direct copy in the same process, cross-memory attach on the same
/// host when the probe succeeds (else TCP, with one log line saying why),
/// TCP otherwise. `tcp`, `cma`, `rdma` force that transport.
///
/// # Errors
/// [`Error::NotSupported`] when no transport of this build reaches the peer
/// under the configured protocol.
pub fn select(local: &ConnInfo, remote: &ConnInfo, protocol: Protocol) -> Result<RouteKind> {
    if protocol == Protocol::Auto && local.same_process(remote) {
        // No network or kernel path beats a copy inside the process.
        return Ok(RouteKind::InProcess);
    }
    let agent = String::from_utf8_lossy(&remote.agent);
    let tcp = remote
        .endpoints
        .iter()
        .map(|Endpoint::Tcp(addr)| *addr)
        .next();
    let no_tcp = || Error::NotSupported(format!("agent {agent:?} publishes no TCP endpoint"));
    let same_host = local.host.same_host(&remote.host);
    let cma = || -> std::result::Result<RouteKind, String> {
        if !same_host {
            return Err(format!(
                "it runs on another host or PID namespace (host {:?})",
                remote.host.hostname
            ));
        }
        let probe_addr = remote
            .cma_probe
            .ok_or("it does not accept cross-memory attach (its protocol option excludes it)")?;
        let control = tcp.ok_or("it publishes no TCP endpoint for control messages")?;
        let peer = cma::probe(remote.pid, probe_addr, remote.token)?;
        Ok(RouteKind::Cma { peer, control })
    };
    match protocol {
        Protocol::Auto => cma().or_else(|why| {
            if same_host {
                log::warn!(
                    "Mooncake: agent {agent:?} is on this host but cross-memory attach is not \
                     possible ({why}); using TCP"
                );
            }
            tcp.map(RouteKind::Tcp).ok_or_else(no_tcp)
        }),
        Protocol::Tcp => tcp.map(RouteKind::Tcp).ok_or_else(no_tcp),
        Protocol::Cma => cma().map_err(|why| {
            Error::NotSupported(format!(
                "protocol=cma: agent {agent:?} cannot be reached with cross-memory attach: {why}"
            ))
        }),
        Protocol::Rdma => Err(Error::NotSupported(format!(
            "protocol=rdma is not available in this build; agent {agent:?} (pid {} on host {:?}) \
             cannot be reached with it (use protocol=auto)",
            remote.pid, remote.host.hostname
        ))),
    }
}

#[cfg(test)]
mod tests {
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
