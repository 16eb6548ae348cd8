//! How one engine reaches one peer over RDMA: per pair of (our NIC, its
//! NIC) an endpoint of a few RC queue pairs, connected lazily through the
//! peer's TCP listener (never inside `postXfer`: a post made while the
//! queue pairs connect waits in the route, and the connecting thread posts
//! it), and rebuilt with a new generation after one breaks.

use std::any::Any;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use parking_lot::Mutex;

use super::Shared;
use super::connect;
use super::qp::{QpConn, Salvage, Side};
use super::reg::RegionReg;
use super::slice::{self, Pieces};
use super::xfer::{AfterData, Xfer};
use crate::common::{AgentName, Error, MemKind, Result};
use crate::transport::{Op, Plan, Posted, Route};
use crate::wire::rdma::{ConnectReply, ConnectRequest};

/// How long connecting one endpoint may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long posts fail fast after a failed connection before the next try.
const RETRY_AFTER: Duration = Duration::from_millis(500);
/// How long a NIC pair whose link failed is left out of new connections
/// (while another pair works).
const RAIL_PAUSE: Duration = Duration::from_secs(30);

/// The connected queue pairs of one generation, all pairs of NICs.
struct Conns {
    qps: Vec<(Arc<QpConn>, usize)>,
    broken: AtomicBool,
}

/// A post waiting for the queue pairs.
struct Waiting {
    xfer: Arc<Xfer>,
    notif: Option<Arc<Vec<u8>>>,
}

enum State {
    Idle,
    Connecting(Vec<Waiting>),
    Ready(Arc<Conns>),
    Down { error: Error, retry_at: Instant },
    Closed,
}

struct Inner {
    shared: Arc<Shared>,
    peer: AgentName,
    token: u128,
    addr: SocketAddr,
    /// (our NIC index, its NIC index) pairs, rail-aligned.
    pairs: Vec<(usize, usize)>,
    control: Arc<dyn Route>,
    state: Mutex<State>,
    next_qp: AtomicUsize,
    /// NIC pairs whose link failed, until when they are left out.
    paused: Mutex<HashMap<(usize, usize), Instant>>,
    /// Under `protocol=auto`: the peer's TCP route, for what RDMA cannot
    /// move.
    fallback: Option<Arc<dyn Route>>,
    /// Whether the fallback was logged.
    fell_back: AtomicBool,
}

/// An RDMA route to one peer.
pub struct RdmaRoute {
    inner: Arc<Inner>,
}

impl RdmaRoute {
    /// A route to agent `peer` (engine `token`, TCP listener `addr`) over
    /// the NIC pairs `pairs`; notifications outside transfers and the
    /// peer's liveness go over `control`, and what RDMA cannot move over
    /// `fallback` when given (`protocol=auto`).
    pub(super) fn new(
        shared: Arc<Shared>,
        (peer, token, addr): (AgentName, u128, SocketAddr),
        pairs: Vec<(usize, usize)>,
        control: Arc<dyn Route>,
        fallback: Option<Arc<dyn Route>>,
    ) -> RdmaRoute {
        RdmaRoute {
            inner: Arc::new(Inner {
                shared,
                peer,
                token,
                addr,
                pairs,
                control,
                state: Mutex::new(State::Idle),
                next_qp: AtomicUsize::new(0),
                paused: Mutex::new(HashMap::new()),
                fallback,
                fell_back: AtomicBool::new(false),
            }),
        }
    }

    /// Queue pairs of the current generation (for tests).
    pub fn live_qps(&self) -> usize {
        match &*self.inner.state.lock() {
            State::Ready(c) => c.qps.len(),
            _ => 0,
        }
    }
}

impl Inner {
    /// Connects one generation of queue pairs: for each NIC pair, creates
    /// ours, asks the peer (over TCP) to create and connect its own, then
    /// connects ours to them.
    fn connect_now(self: &Arc<Self>) -> Result<Arc<Conns>> {
        let s = &self.shared;
        let mut generation = [0u8; 8];
        getrandom::fill(&mut generation).expect("the OS random source works");
        let generation = u64::from_le_bytes(generation);
        let mut qps: Vec<(Arc<QpConn>, usize)> = Vec::new();
        let undo = |qps: &[(Arc<QpConn>, usize)]| {
            for (q, w) in qps {
                s.workers[*w].retire(q);
            }
        };
        for (l, r) in self.live_pairs() {
            let w = &s.workers[l];
            let mut ours = Vec::new();
            for _ in 0..s.config.qps_per_pair {
                match w.create_qp(
                    r,
                    Side::Send {
                        depth: s.config.depth,
                    },
                ) {
                    Ok(q) => {
                        // Known to the worker from the start, so that undoing
                        // destroys it and gives its completion entries back.
                        w.attach(&q);
                        qps.push((q.clone(), l));
                        ours.push((q, connect::random_psn()));
                    }
                    Err(e) => {
                        undo(&qps);
                        return Err(e);
                    }
                }
            }
            let req = ConnectRequest {
                generation,
                from_nic: l as u8,
                to_nic: r as u8,
                qps: ours
                    .iter()
                    .map(|(q, psn)| connect::address(&q.qp, &w.nic, *psn))
                    .collect(),
            };
            let reply = s
                .tcp
                .call(
                    self.addr,
                    self.token,
                    super::SERVICE,
                    &req.encode(),
                    CONNECT_TIMEOUT,
                )
                .and_then(|b| {
                    ConnectReply::decode(&b).map_err(|e| {
                        Error::RemoteDisconnect(format!("agent {}: bad RDMA reply: {e}", self.peer))
                    })
                });
            let reply = match reply {
                Ok(r) if r.generation == generation && r.qps.len() == ours.len() => r,
                Ok(_) => {
                    undo(&qps);
                    return Err(Error::RemoteDisconnect(format!(
                        "agent {}: its RDMA reply does not answer our request",
                        self.peer
                    )));
                }
                Err(e) => {
                    undo(&qps);
                    return Err(e);
                }
            };
            for ((q, psn), addr) in ours.into_iter().zip(&reply.qps) {
                if let Err(e) = connect::connect(&q.qp, &w.nic, psn, addr, s.config.timing) {
                    undo(&qps);
                    return Err(e);
                }
            }
        }
        // Interleaved across NIC pairs (queue pair 0 of each pair, then 1,
        // ...): consecutive queue pairs use different NICs, so even a post
        // of a few slices spreads over them.
        let per_pair = s.config.qps_per_pair.max(1);
        let pairs = qps.len() / per_pair;
        let qps: Vec<(Arc<QpConn>, usize)> = (0..per_pair)
            .flat_map(|k| (0..pairs).map(move |p| p * per_pair + k))
            .map(|i| qps[i].clone())
            .collect();
        let conns = Arc::new(Conns {
            qps,
            broken: AtomicBool::new(false),
        });
        for (q, l) in &conns.qps {
            // A queue pair that breaks makes the next post connect anew,
            // without its NIC pair for a while when its link failed.
            let weak: Weak<Conns> = Arc::downgrade(&conns);
            let route = Arc::downgrade(self);
            let pair = (*l, q.remote_nic);
            q.on_break(Arc::new(move |why: &Error| {
                if let Some(c) = weak.upgrade() {
                    c.broken.store(true, Ordering::Release);
                }
                if let (Error::RemoteDisconnect(_), Some(r)) = (why, route.upgrade()) {
                    let all_paused = {
                        let mut paused = r.paused.lock();
                        paused.insert(pair, Instant::now() + RAIL_PAUSE);
                        r.pairs.iter().all(|p| paused.contains_key(p))
                    };
                    // Under auto, a peer no NIC pair reaches goes over TCP
                    // for a while.
                    if all_paused && r.fallback.is_some() {
                        let mut st = r.state.lock();
                        if matches!(&*st, State::Ready(_)) {
                            *st = State::Down {
                                error: why.clone(),
                                retry_at: Instant::now() + RAIL_PAUSE,
                            };
                        }
                    }
                }
            }));
            if q.is_broken() {
                conns.broken.store(true, Ordering::Release);
            }
        }
        log::info!(
            "Mooncake: agent {}: RDMA to agent {} connected ({} queue pairs over {} NIC pairs)",
            s.endpoint.name,
            self.peer,
            conns.qps.len(),
            self.pairs.len()
        );
        Ok(conns)
    }

    /// The NIC pairs to connect: those not paused, or all of them when
    /// every one is.
    fn live_pairs(&self) -> Vec<(usize, usize)> {
        let now = Instant::now();
        let mut paused = self.paused.lock();
        paused.retain(|_, until| *until > now);
        let live: Vec<(usize, usize)> = self
            .pairs
            .iter()
            .copied()
            .filter(|p| !paused.contains_key(p))
            .collect();
        if live.is_empty() {
            self.pairs.clone()
        } else {
            live
        }
    }

    /// Moves what queue pair `from` left of `xfer` after its link failed
    /// to a healthy queue pair of the current generation, preferring
    /// another NIC pair. False when there is none.
    fn move_work(
        &self,
        generation: &Arc<Conns>,
        xfer: &Arc<Xfer>,
        (from_nic, from): (usize, u32),
        sv: Salvage,
    ) -> bool {
        // The queue pairs of the post's own generation first (a post made
        // since may have started connecting a new one), then the current.
        let current = match &*self.state.lock() {
            State::Ready(c) => Some(c.clone()),
            _ => None,
        };
        let all: Vec<(Arc<QpConn>, usize)> = std::iter::once(generation.clone())
            .chain(current)
            .flat_map(|c| c.qps.clone())
            .collect();
        // Queue pair numbers are unique per NIC only.
        let is_from = |q: &QpConn| q.nic == from_nic && q.qp.qp_num == from;
        let failed = all
            .iter()
            .find(|(q, _)| is_from(q))
            .map(|(q, l)| (*l, q.remote_nic));
        let healthy = |(q, _): &&(Arc<QpConn>, usize)| !q.is_broken() && !is_from(q);
        let other_pair = all
            .iter()
            .filter(healthy)
            .find(|(q, l)| Some((*l, q.remote_nic)) != failed);
        let Some((q, _)) = other_pair.or_else(|| all.iter().find(healthy)) else {
            return false;
        };
        log::warn!(
            "Mooncake: agent {}: RDMA to agent {}: {} work requests move from queue pair {from} to \
             {} after a link failure",
            self.shared.endpoint.name,
            self.peer,
            sv.wrs(),
            q.qp.qp_num
        );
        q.push_salvage(xfer, sv);
        true
    }

    /// Retires the queue pairs of `c`: at once (`now`), or each once it
    /// has nothing in flight (a healthy one of a broken generation).
    fn retire(&self, c: &Conns, now: bool) {
        for (q, w) in &c.qps {
            let w = &self.shared.workers[*w];
            if now || q.is_broken() {
                w.retire(q);
            } else {
                q.close_when_idle();
                if q.drained() {
                    w.retire(q);
                }
            }
        }
    }

    /// Starts a connecting thread (the state is `Connecting`).
    fn spawn_connect(self: &Arc<Self>) {
        let me = self.clone();
        let spawned = std::thread::Builder::new()
            .name("mooncake-rdma-connect".into())
            .spawn(move || me.finish_connect());
        if let Err(e) = spawned {
            let e = Error::Backend(format!("cannot start an RDMA connecting thread: {e}"));
            self.connected(Err(e));
        }
    }

    fn finish_connect(self: &Arc<Self>) {
        let result = self.connect_now();
        self.connected(result);
    }

    /// Records the outcome of a connection and runs or fails the posts that
    /// waited for it.
    fn connected(self: &Arc<Self>, result: Result<Arc<Conns>>) {
        let waiting = {
            let mut st = self.state.lock();
            let waiting = match std::mem::replace(&mut *st, State::Idle) {
                State::Connecting(w) => w,
                State::Closed => {
                    *st = State::Closed;
                    drop(st);
                    if let Ok(c) = &result {
                        self.retire(c, true);
                    }
                    return;
                }
                other => {
                    *st = other;
                    Vec::new()
                }
            };
            *st = match &result {
                Ok(c) => State::Ready(c.clone()),
                // Under auto, TCP serves the peer meanwhile: try again later.
                Err(e) => State::Down {
                    error: e.clone(),
                    retry_at: Instant::now()
                        + if self.fallback.is_some() {
                            RAIL_PAUSE
                        } else {
                            RETRY_AFTER
                        },
                },
            };
            waiting
        };
        match result {
            Ok(c) => {
                for w in waiting {
                    self.dispatch(&c, &w.xfer, w.notif);
                }
            }
            Err(e) => {
                log::warn!(
                    "Mooncake: agent {}: cannot connect RDMA to agent {}: {e}",
                    self.shared.endpoint.name,
                    self.peer
                );
                for w in waiting {
                    w.xfer.fail_unposted(e.clone());
                }
            }
        }
    }

    /// Hands `xfer` to the connected queue pairs, or makes it wait for
    /// them (connecting them now if needed).
    fn submit(self: &Arc<Self>, xfer: &Arc<Xfer>, notif: Option<Arc<Vec<u8>>>) -> Result<()> {
        let waiting = Waiting {
            xfer: xfer.clone(),
            notif,
        };
        let mut st = self.state.lock();
        // Queue pairs are retired with the state unlocked: retiring may move
        // work, which looks at the state.
        let old = match &mut *st {
            State::Ready(c) if !c.broken.load(Ordering::Acquire) => {
                let c = c.clone();
                drop(st);
                self.dispatch(&c, &waiting.xfer, waiting.notif);
                return Ok(());
            }
            State::Connecting(w) => {
                w.push(waiting);
                return Ok(());
            }
            State::Down { error, retry_at } if Instant::now() < *retry_at => {
                return Err(error.clone());
            }
            State::Closed => {
                return Err(Error::RemoteDisconnect(format!(
                    "disconnected from agent {}",
                    self.peer
                )));
            }
            State::Ready(c) => Some(c.clone()),
            State::Down { .. } | State::Idle => None,
        };
        *st = State::Connecting(vec![waiting]);
        drop(st);
        if let Some(c) = old {
            self.retire(&c, false);
        }
        self.spawn_connect();
        Ok(())
    }

    /// The queue pairs a post takes, in order: rotated per post, and, when
    /// it uses fewer than all and our NICs sit on different NUMA nodes,
    /// those on the NUMA node of its local memory first.
    fn qp_order(&self, c: &Conns, xfer: &Xfer, used: usize) -> Vec<usize> {
        let n = c.qps.len();
        let rot = self.next_qp.fetch_add(1, Ordering::Relaxed) % n;
        let rotated: Vec<usize> = (0..n).map(|k| (rot + k) % n).collect();
        let workers = &self.shared.workers;
        let nodes = |i: usize| workers[c.qps[i].1].nic.numa;
        let varies = (0..n).any(|i| nodes(i) != nodes(0));
        if used >= n || !varies {
            return rotated;
        }
        let Some(node) = xfer
            .slices
            .first()
            .and_then(|s| super::device::numa_node_of(s.local_addr))
        else {
            return rotated;
        };
        let (mut local, other): (Vec<usize>, Vec<usize>) =
            rotated.into_iter().partition(|&i| nodes(i) == Some(node));
        local.extend(other);
        local
    }

    /// Spreads `xfer` over the queue pairs: slice `i` on queue pair
    /// `start + i % used`; a WRITE's notification in parts after the data
    /// on each queue pair used, a READ's after its data arrived.
    fn dispatch(self: &Arc<Self>, c: &Arc<Conns>, xfer: &Arc<Xfer>, notif: Option<Arc<Vec<u8>>>) {
        let n = c.qps.len();
        let used = xfer.slices.len().min(n);
        let order = self.qp_order(c, xfer, used);
        let id = self.shared.next_notif.fetch_add(1, Ordering::Relaxed);
        let route = Arc::downgrade(self);
        // The post holds its generation (until it ends): work moves within
        // it even after a newer one replaced it in the route.
        let generation = c.clone();
        xfer.set_mover(Arc::new(move |x, from, sv| {
            route
                .upgrade()
                .is_some_and(|r| r.move_work(&generation, x, from, sv))
        }));
        let used_qps: Vec<(Arc<QpConn>, usize)> = order[..used.max(1)]
            .iter()
            .map(|&i| c.qps[i].clone())
            .collect();
        if let Some(m) = notif {
            // Sent once every byte is confirmed: a WRITE's in parts, one per
            // NIC pair that carried data, on its queue pairs (a READ's data
            // is here: one part).
            let mut groups: Vec<Vec<Arc<QpConn>>> = Vec::new();
            let mut keys: Vec<(usize, usize)> = Vec::new();
            for (q, l) in &used_qps {
                let key = (*l, q.remote_nic);
                match keys.iter().position(|k| *k == key) {
                    Some(i) => groups[i].push(q.clone()),
                    None => {
                        keys.push(key);
                        groups.push(vec![q.clone()]);
                    }
                }
            }
            if xfer.plan.op == Op::Read {
                groups.truncate(1);
            }
            xfer.set_after_data(AfterData { groups, id, msg: m });
        }
        if used == 0 {
            // Nothing to move; the notification goes at once.
            xfer.done_nothing();
            return;
        }
        for (k, (q, _)) in used_qps.iter().enumerate() {
            q.push(xfer, (k, used), None);
        }
    }
}

impl Route for RdmaRoute {
    fn transport(&self) -> &'static str {
        "rdma"
    }

    fn describe(&self) -> String {
        let s = &self.inner.shared;
        let pairs: Vec<String> = self
            .inner
            .pairs
            .iter()
            .map(|&(l, r)| format!("{}->nic{r}", s.workers[l].nic.name()))
            .collect();
        format!(
            "RDMA ({}) with control over TCP to {}",
            pairs.join(", "),
            self.inner.addr
        )
    }

    /// Host memory on both sides, and GPU memory on either when our verbs
    /// library registers dmabufs (GPUDirect RDMA; a GPU region that could
    /// not be registered on either side goes over TCP under
    /// `protocol=auto`, or fails the post with the reason).
    fn serves(&self, local: MemKind, remote: MemKind) -> bool {
        let gpudirect = self.inner.shared.gpudirect();
        let ok = |k: MemKind| match k {
            MemKind::Dram => true,
            MemKind::Vram { .. } => gpudirect,
            MemKind::Other(_) => false,
        };
        ok(local) && ok(remote)
    }

    fn connect(&self) -> Result<()> {
        match self.connect_rdma() {
            Err(e) if self.inner.fallback.is_some() => {
                log::warn!(
                    "Mooncake: agent {}: RDMA to agent {} does not connect ({}); using TCP",
                    self.inner.shared.endpoint.name,
                    self.inner.peer,
                    e.message()
                );
                self.inner.control.connect()
            }
            other => other,
        }
    }

    fn post(&self, plan: &Arc<Plan>, notif: Option<&[u8]>) -> Result<Posted> {
        self.post_any(plan, notif)
    }

    fn notify(&self, msg: &[u8]) -> Result<()> {
        self.inner.control.notify(msg)
    }

    fn is_down(&self) -> bool {
        self.inner.control.is_down()
            || matches!(&*self.inner.state.lock(), State::Down { retry_at, .. } if Instant::now() < *retry_at)
    }

    fn close(&self) {
        self.inner.close();
        self.inner.control.close();
    }

    fn as_any(&self) -> &dyn Any {
        self
    }
}

impl RdmaRoute {
    /// Connects the queue pairs now (NIXL's `connect`).
    fn connect_rdma(&self) -> Result<()> {
        self.inner.control.connect()?;
        let deadline = Instant::now() + CONNECT_TIMEOUT + Duration::from_secs(1);
        loop {
            let mut st = self.inner.state.lock();
            let old = match &*st {
                State::Ready(c) if !c.broken.load(Ordering::Acquire) => return Ok(()),
                State::Down { error, retry_at } if Instant::now() < *retry_at => {
                    return Err(error.clone());
                }
                State::Closed => {
                    return Err(Error::RemoteDisconnect(format!(
                        "disconnected from agent {}",
                        self.inner.peer
                    )));
                }
                State::Connecting(_) => None,
                State::Ready(c) => Some(Some(c.clone())),
                State::Down { .. } | State::Idle => Some(None),
            };
            if let Some(old) = old {
                *st = State::Connecting(Vec::new());
                drop(st);
                if let Some(c) = old {
                    self.inner.retire(&c, false);
                }
                self.inner.spawn_connect();
            } else {
                drop(st);
            }
            if Instant::now() > deadline {
                return Err(Error::RemoteDisconnect(format!(
                    "RDMA to agent {} did not connect in time",
                    self.inner.peer
                )));
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    /// Posts over RDMA, or (under `protocol=auto`) over TCP what RDMA
    /// cannot move.
    fn post_any(&self, plan: &Arc<Plan>, notif: Option<&[u8]>) -> Result<Posted> {
        match self.post_rdma(plan, notif) {
            Err(Fallback(why)) => match &self.inner.fallback {
                // Under protocol=auto, what RDMA cannot move goes over TCP.
                Some(tcp) => {
                    if !self.inner.fell_back.swap(true, Ordering::Relaxed) {
                        log::warn!(
                            "Mooncake: agent {}: RDMA to agent {} cannot serve a transfer ({}); \
                             using TCP for such transfers",
                            self.inner.shared.endpoint.name,
                            self.inner.peer,
                            why.message()
                        );
                    }
                    tcp.post(plan, notif)
                }
                None => Err(why),
            },
            Ok(r) => r,
        }
    }
}

/// Why RDMA cannot move a plan, which TCP may (under `protocol=auto`).
struct Fallback(Error);

impl RdmaRoute {
    /// Starts one post of `plan` over RDMA: `Err(Fallback)` when RDMA
    /// cannot move it (a region without RDMA keys, queue pairs that could
    /// not connect), `Ok(Err)` for an error of the post itself.
    fn post_rdma(
        &self,
        plan: &Arc<Plan>,
        notif: Option<&[u8]>,
    ) -> std::result::Result<Result<Posted>, Fallback> {
        let inner = &self.inner;
        let s = &inner.shared;
        if inner.fallback.is_some()
            && matches!(&*inner.state.lock(), State::Down { retry_at, .. } if Instant::now() < *retry_at)
        {
            return Err(Fallback(Error::RemoteDisconnect(format!(
                "its queue pairs could not connect to agent {}",
                inner.peer
            ))));
        }
        // The peer's keys for every remote region, on each of its NICs.
        let mut remote = Vec::with_capacity(plan.remote_regions.len());
        for r in &plan.remote_regions {
            match &r.rdma {
                Some(k) if k.nics.len() > inner.pairs.iter().map(|p| p.1).max().unwrap_or(0) => {
                    remote.push(Pieces {
                        start: r.addr,
                        len: k.piece_len,
                    })
                }
                _ => {
                    return Err(Fallback(Error::NotSupported(format!(
                        "RDMA: agent {}'s region {:#x}+{} is not registered on its RDMA NICs",
                        inner.peer, r.addr, r.len
                    ))));
                }
            }
        }
        // Our registrations, held in flight until the last completion.
        let mut locals: Vec<Arc<RegionReg>> = Vec::with_capacity(plan.local_regions.len());
        let leave = |held: &[Arc<RegionReg>]| held.iter().for_each(|r| r.leave());
        for r in &plan.local_regions {
            let reg = s.regs.read().get(&r.key).cloned();
            let Some(reg) = reg else {
                leave(&locals);
                return Err(Fallback(Error::NotSupported(format!(
                    "RDMA: local region {:#x}+{} is not registered on our RDMA NICs",
                    r.addr, r.len
                ))));
            };
            match r.pin_local() {
                Ok(_pin) => reg.enter(),
                Err(e) => {
                    leave(&locals);
                    return Ok(Err(e));
                }
            }
            locals.push(reg);
        }
        let local_pieces: Vec<Pieces> = locals
            .iter()
            .map(|r| Pieces {
                start: r.addr,
                len: r.piece_len,
            })
            .collect();
        let slices = slice::slices(plan, s.config.slice, &local_pieces, &remote);
        let notif = notif.map(|m| Arc::new(m.to_vec()));
        // The notification's work requests are counted when it is
        // dispatched (their number depends on the queue pairs then).
        let wrs = slices.len();
        let weak = Arc::downgrade(inner);
        let watch: Box<dyn Fn() + Send + Sync> = Box::new(move || {
            if let Some(i) = weak.upgrade()
                && i.control.is_down()
            {
                i.close_conns();
            }
        });
        let xfer = Arc::new(Xfer::new(plan.clone(), slices, locals, wrs, Some(watch)));
        if let Err(e) = inner.submit(&xfer, notif) {
            xfer.fail_unposted(e.clone());
            return Err(Fallback(e));
        }
        Ok(Ok(Posted::threaded(xfer)))
    }
}

impl Inner {
    /// Closes the route for good: its queue pairs go (their transfers
    /// fail), the posts waiting for a connection fail.
    fn close(&self) {
        let old = std::mem::replace(&mut *self.state.lock(), State::Closed);
        match old {
            State::Ready(c) => self.retire(&c, true),
            State::Connecting(waiting) => {
                for w in waiting {
                    w.xfer.fail_unposted(Error::RemoteDisconnect(format!(
                        "disconnected from agent {}",
                        self.peer
                    )));
                }
            }
            _ => {}
        }
    }

    /// The peer is gone (its TCP link says so): the queue pairs go, and
    /// the transfers on them fail at once.
    fn close_conns(&self) {
        let mut st = self.state.lock();
        if let State::Ready(c) = &*st {
            let c = c.clone();
            *st = State::Down {
                error: Error::RemoteDisconnect(format!("agent {} is gone", self.peer)),
                retry_at: Instant::now() + RETRY_AFTER,
            };
            drop(st);
            self.retire(&c, true);
        }
    }
}

impl Drop for RdmaRoute {
    /// As `close`, without closing the TCP link (its own owner does): a
    /// connection finishing later finds the route closed and retires its
    /// queue pairs.
    fn drop(&mut self) {
        self.inner.close();
    }
}
