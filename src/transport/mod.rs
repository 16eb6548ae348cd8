//! Transports: how bytes move. They know nothing of NIXL.
//!
//! # The seam
//!
//! The backend talks to every transport through the traits of this module
//! and never names a concrete one:
//!
//! - [`Transport`]: one per engine and kind of transport. It publishes its
//!   endpoints into the engine's connection info ([`Transport::publish`])
//!   and serves peers on its own threads (through the engine's
//!   [`Endpoint`](crate::common::Endpoint): its registry and inbox).
//! - [`Route`]: how one engine reaches one peer with one transport. It
//!   says which memory kinds it serves ([`Route::serves`]), posts a
//!   [`Plan`] ([`Route::post`]), sends notifications, connects, reports
//!   whether it is down, and closes.
//! - [`Transfer`]: one post of a plan, whose [`Completion`] the backend
//!   polls; a transfer that is moved in bounded steps by whichever thread
//!   the backend chooses (its progress thread, or the caller's) also comes
//!   as a [`Job`] (see [`Posted`]).
//!
//! Which transports an engine runs, and which routes reach a peer, is
//! decided in one place: [`select`]. It is the only module that knows every
//! transport; it picks per peer (same process, same host, other host, and
//! the `protocol` option) when the peer's connection info is loaded, and
//! per plan (the memory kinds on both sides) when a transfer is prepared.
//!
//! Dependencies run one way: `backend -> transport -> wire`, all on top of
//! [`crate::common`]. No module under `src/transport` imports the backend.
//!
//! # Adding a transport
//!
//! 1. Make a folder `src/transport/<name>/` with a type implementing
//!    [`Transport`] (started by [`select::Transports::start`], publishing its
//!    endpoint with a new variant of
//!    [`wire::conn_info::Endpoint`](crate::wire::conn_info::Endpoint) if
//!    peers need one) and a type implementing [`Route`] (say in
//!    [`Route::serves`] which memory kinds it can move).
//! 2. Teach [`select`] when to offer it: in `Transports::start` (which
//!    options enable it) and in `Transports::routes` (for which peers, in
//!    which order of preference under `protocol=auto`, and the error of a
//!    forced `protocol=<name>` it cannot serve).
//! 3. Run the transport conformance suite against it: add one line to
//!    `src/backend/engine/tests/conformance.rs` (`conformance!(name, params)`).
//!    Every transport must pass it: data both ways at awkward sizes and
//!    offsets, many descriptors, notifications only after the data,
//!    reposts, four threads, cancel, deregistration mid-transfer, and the
//!    peer's death.
//!
//! A transport whose data our threads move in bounded synchronous steps
//! can reuse [`job::SegmentJob`] (as the in-process copy and cross-memory
//! attach do): it supplies only a [`job::Mover`].

pub mod cma;
pub mod cuda_ipc;
pub mod inproc;
pub mod job;
pub mod rdma;
pub mod select;
pub mod tcp;

use std::any::Any;
use std::sync::Arc;

use crate::common::{Completion, LocalRegion, MemKind, Result};
use crate::wire::region::RegionPublic;

pub use select::{Config, Protocol, Transports};

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
    /// The pieces, in the caller's order; descriptors that continue each
    /// other on both sides (same regions) are joined into one.
    pub segments: Vec<Segment>,
    /// Distinct local regions the segments use (each says its
    /// [`MemKind`]).
    pub local_regions: Vec<Arc<LocalRegion>>,
    /// Distinct remote regions the segments use, as the peer published them.
    pub remote_regions: Vec<RegionPublic>,
    /// The memory kind of each remote region (index-aligned with
    /// [`Self::remote_regions`]).
    pub remote_kinds: Vec<MemKind>,
    /// Per remote region, the lowest and highest address the segments touch
    /// (`[lo, hi)`), so the target can check all of them at once.
    pub remote_extent: Vec<(u64, u64)>,
    /// Sum of segment lengths.
    pub total_bytes: u64,
}

impl Plan {
    /// The distinct (local, remote) memory kinds the segments move between,
    /// in order of first appearance.
    pub fn kind_pairs(&self) -> Vec<(MemKind, MemKind)> {
        let mut pairs: Vec<(MemKind, MemKind)> = Vec::new();
        let mut last = None;
        for s in &self.segments {
            if last == Some((s.local, s.remote)) {
                continue;
            }
            last = Some((s.local, s.remote));
            let pair = (
                self.local_regions[s.local as usize].kind(),
                self.remote_kinds[s.remote as usize],
            );
            if !pairs.contains(&pair) {
                pairs.push(pair);
            }
        }
        pairs
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
    /// progress on the caller's thread, or notice a peer that stopped
    /// answering (by default it does nothing).
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

/// A unit of queued work, advanced in bounded steps by the backend's
/// progress worker (or inside the caller's `postXfer`/`checkXfer`).
pub trait Job: Send + Sync {
    /// Advances the job by about `budget` bytes. Returns true when the job
    /// needs no more steps (finished, failed or cancelled).
    fn step(&self, budget: usize) -> bool;
    /// Stops the job; after return it touches no memory.
    fn cancel(&self);
}

/// What [`Route::post`] started.
#[derive(Clone)]
pub struct Posted {
    /// The transfer, polled by `checkXfer`.
    pub transfer: Arc<dyn Transfer>,
    /// `Some` when the transfer moves only when a thread steps it (the
    /// backend then runs it inline, on its progress thread, or in bounded
    /// steps inside `postXfer`/`checkXfer`); `None` when the transport's
    /// own threads move it.
    pub steps: Option<Arc<dyn Job>>,
}

impl Posted {
    /// A transfer moved by the transport's own threads.
    pub fn threaded(transfer: Arc<dyn Transfer>) -> Posted {
        Posted {
            transfer,
            steps: None,
        }
    }

    /// A transfer moved in steps by the backend's threads.
    pub fn stepped<J: Transfer + Job + 'static>(job: Arc<J>) -> Posted {
        Posted {
            transfer: job.clone(),
            steps: Some(job),
        }
    }
}

/// One transport of one engine: publishes where peers reach it, serves
/// them, and stops when the engine goes.
pub trait Transport: Send + Sync {
    /// The transport's name, as the `protocol` option spells it.
    fn name(&self) -> &'static str;
    /// Adds what peers need to reach this transport to our connection info.
    fn publish(&self, info: &mut crate::wire::conn_info::ConnInfo);
    /// Forgets agent `peer` (NIXL's `disconnect`): what this transport
    /// serves for it (connections it opened to us) goes. By default nothing.
    fn forget(&self, _peer: &crate::common::AgentName) {}
    /// Stops serving peers: after return no peer reaches the engine through
    /// this transport, and its threads have exited.
    fn shutdown(&self);
    /// The concrete transport (for tests and diagnostics).
    fn as_any(&self) -> &dyn Any;
}

/// How an engine reaches one peer with one transport.
pub trait Route: Send + Sync {
    /// The transport's name (for log lines and errors).
    fn transport(&self) -> &'static str;
    /// A noun phrase saying how the peer is reached, for the log line
    /// written when its connection info is loaded (e.g. "TCP to 10.0.0.2:4000").
    fn describe(&self) -> String;
    /// True when the peer lives in this process (its addresses are ours, so
    /// a transfer's two sides may overlap). By default: no.
    fn same_address_space(&self) -> bool {
        false
    }
    /// True when this route can move bytes between local memory of kind
    /// `local` and the peer's memory of kind `remote`. By default: host
    /// memory on both sides only.
    fn serves(&self, local: MemKind, remote: MemKind) -> bool {
        local == MemKind::Dram && remote == MemKind::Dram
    }
    /// Makes sure the peer is reachable now (NIXL's `connect`); otherwise
    /// routes connect lazily.
    ///
    /// # Errors
    /// Why the peer cannot be reached.
    fn connect(&self) -> Result<()>;
    /// Starts one post of `plan`, delivering `notif` to the peer after
    /// every byte of it landed.
    ///
    /// # Errors
    /// Why the post cannot start (peer gone, range refused).
    fn post(&self, plan: &Arc<Plan>, notif: Option<&[u8]>) -> Result<Posted>;
    /// Sends a notification outside any transfer.
    ///
    /// # Errors
    /// Why it cannot be sent.
    fn notify(&self, msg: &[u8]) -> Result<()>;
    /// True once the peer is known to be gone or unreachable.
    fn is_down(&self) -> bool {
        false
    }
    /// Closes the route: transfers in flight on it fail, its connections
    /// and threads go.
    fn close(&self) {}
    /// The peer's region with access key `key` was unloaded here (NIXL's
    /// `unloadMD`): let go of what was kept for it (a mapping of its
    /// memory, say), so that it does not outlive the peer's use of it.
    fn unloaded(&self, _key: u64) {}
    /// The concrete route (for tests and diagnostics).
    fn as_any(&self) -> &dyn Any;
}
