//! The serving side of the TCP transport: accepts connections from peers
//! that present our token, then serves their Writes, ReadReqs and
//! notifications with no NIXL call on this side.
//!
//! Every access is checked against our registry (key and range) before a
//! byte moves; a refused access is answered with an error status and logged;
//! a malformed frame closes that connection only.
//!
//! Bounds on what a peer can hold:
//! - connections still in their handshake: at most [`MAX_HANDSHAKING`], each
//!   for [`HELLO_TIMEOUT`];
//! - registered memory: pinned only for one non-blocking system call at a
//!   time, so `deregisterMem` never waits for a slow or silent peer; a
//!   Write cut short by a deregistration is thrown away and refused, a read
//!   response cut short closes the connection (its data cannot be taken
//!   back);
//! - a frame: no byte for the stall timeout, or the whole frame not in
//!   within four times it, closes the connection;
//! - a silent peer (host gone, partition): TCP keepalive and
//!   `TCP_USER_TIMEOUT` end its connections, and with them their threads;
//! - notifications: the inbox's per-sender and total limits; a
//!   notification over them is thrown away and the sender told why
//!   (`NotifRefused`).

use std::collections::HashMap;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Weak};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use log::{debug, info, warn};
use parking_lot::{Mutex, RwLock};

use super::client;
use super::io::{self, Access, RawRange, Waits};
use super::staging;
use crate::common::peers::Claim;
use crate::common::{AgentName, Endpoint, Error, LocalRegion, Pin, Status, fault};
use crate::wire::frame::{self, Header, Hello, Kind, SEG_LEN, Seg};

/// Most connections that may be in their handshake at once.
pub const MAX_HANDSHAKING: usize = 64;

/// How long a new connection may take to say hello.
const HELLO_TIMEOUT: Duration = Duration::from_secs(10);

/// How long the engine a connecting peer's claimed name belongs to may take
/// to answer whether it is alive.
const PROBE_TIMEOUT: Duration = Duration::from_secs(2);

/// A served connection, kept so that shutdown and `disconnect` can close it.
struct Served {
    stream: TcpStream,
    /// The agent it says it serves, once its hello was accepted.
    peer: Option<AgentName>,
}

/// One served connection's standing among the connections of its sender:
/// made stale once a connection of a newer connection set of the same
/// sender said hello (the sender reconnected, so it gave up on this one).
/// Frames that arrive late on a stale connection are not applied.
struct Fence {
    stale: AtomicBool,
    /// Held shared for each system call or device copy that puts a frame's
    /// data into registered memory; exclusively by the fencing, so that
    /// none lands after the newer connection was admitted.
    io: RwLock<()>,
    /// A handle to the connection, to close it once fenced off.
    stream: Option<TcpStream>,
}

impl Fence {
    fn is_stale(&self) -> bool {
        self.stale.load(Ordering::Acquire)
    }
}

/// The connections of one sender engine, by generation (the Hello
/// header's `aux`).
#[derive(Default)]
struct Links {
    newest: u64,
    conns: Vec<(u64, Weak<Fence>)>,
}

/// Senders whose links are remembered before the table is pruned of
/// senders without a live connection.
const MAX_SENDERS: usize = 4096;

/// A listening TCP endpoint of one engine.
pub struct TcpServer {
    addr: SocketAddr,
    listener: TcpListener,
    /// The engine's token (names its fault-injection points).
    token: u128,
    stopping: AtomicBool,
    /// Served connections by id, so that shutdown can close them.
    conns: Mutex<HashMap<u64, Served>>,
    next_conn: AtomicU64,
    /// Connections that have not completed their handshake yet.
    handshaking: AtomicUsize,
    /// The most connections ever in their handshake at once (for tests).
    handshaking_peak: AtomicUsize,
    /// How long a stall mid-frame may last (0: forever).
    stall: Duration,
    /// How long a served connection polls for the next frame (0: never).
    spin: Duration,
    /// Connections polling right now (at most one).
    spinners: AtomicUsize,
    /// Served connections by sender engine token, for fencing.
    links: Mutex<HashMap<u128, Links>>,
    /// The numbered notifications delivered lately: one sent again after a
    /// broken connection is only acknowledged.
    delivered: super::outbox::Delivered,
    /// Control services other transports offer through this listener, by
    /// service number (see [`super::ControlService`]).
    services: RwLock<HashMap<u64, Arc<dyn super::ControlService>>>,
    accept: Mutex<Option<JoinHandle<()>>>,
    threads: Mutex<Vec<JoinHandle<()>>>,
}

impl TcpServer {
    /// Binds `addr` and starts accepting.
    ///
    /// # Errors
    /// The OS error of `bind` or of spawning the accept thread.
    pub fn start(
        endpoint: Arc<Endpoint>,
        addr: SocketAddr,
        stall: Duration,
        spin: Duration,
    ) -> std::io::Result<Arc<TcpServer>> {
        let listener = TcpListener::bind(addr)?;
        let server = Arc::new(TcpServer {
            addr: listener.local_addr()?,
            listener,
            token: endpoint.token,
            stopping: AtomicBool::new(false),
            conns: Mutex::new(HashMap::new()),
            next_conn: AtomicU64::new(0),
            handshaking: AtomicUsize::new(0),
            handshaking_peak: AtomicUsize::new(0),
            stall,
            spin,
            spinners: AtomicUsize::new(0),
            links: Mutex::new(HashMap::new()),
            delivered: Default::default(),
            services: RwLock::new(HashMap::new()),
            accept: Mutex::new(None),
            threads: Mutex::new(Vec::new()),
        });
        let s = server.clone();
        let accept = std::thread::Builder::new()
            .name("mooncake-accept".into())
            .spawn(move || s.accept_loop(endpoint))?;
        *server.accept.lock() = Some(accept);
        info!("Mooncake: agent listening on tcp://{}", server.addr);
        Ok(server)
    }

    /// The address peers connect to.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    fn accept_loop(self: Arc<Self>, endpoint: Arc<Endpoint>) {
        loop {
            let (stream, from) = match self.listener.accept() {
                Ok(c) => c,
                Err(_) if self.stopping.load(Ordering::Acquire) => return,
                Err(e) => {
                    warn!("Mooncake: accept failed: {e}");
                    std::thread::sleep(Duration::from_millis(10));
                    continue;
                }
            };
            if self.stopping.load(Ordering::Acquire) {
                return;
            }
            fault::point("tcp.server.accepted", self.token);
            // Bound what connections that never authenticate can hold:
            // counted here, before their thread exists.
            if self.handshaking.fetch_add(1, Ordering::AcqRel) >= MAX_HANDSHAKING {
                self.handshaking.fetch_sub(1, Ordering::AcqRel);
                warn!(
                    "Mooncake: refusing a connection from {from}: {MAX_HANDSHAKING} others are still in their handshake"
                );
                continue;
            }
            self.handshaking_peak
                .fetch_max(self.handshaking.load(Ordering::Acquire), Ordering::AcqRel);
            let Ok(clone) = stream.try_clone() else {
                self.handshaking.fetch_sub(1, Ordering::AcqRel);
                continue;
            };
            let id = self.next_conn.fetch_add(1, Ordering::Relaxed);
            self.conns.lock().insert(
                id,
                Served {
                    stream: clone,
                    peer: None,
                },
            );
            let endpoint = endpoint.clone();
            let server = self.clone();
            let spawned = std::thread::Builder::new()
                .name("mooncake-serve".into())
                .spawn(move || {
                    serve(&stream, id, from, &endpoint, &server);
                    // Close for real: the copy kept for shutdown holds the fd open.
                    let _ = stream.shutdown(std::net::Shutdown::Both);
                    server.conns.lock().remove(&id);
                });
            match spawned {
                Ok(handle) => {
                    let mut threads = self.threads.lock();
                    threads.retain(|t| !t.is_finished());
                    threads.push(handle);
                }
                Err(e) => {
                    warn!("Mooncake: cannot serve connection from {from}: {e}");
                    self.handshaking.fetch_sub(1, Ordering::AcqRel);
                    if let Some(c) = self.conns.lock().remove(&id) {
                        let _ = c.stream.shutdown(std::net::Shutdown::Both);
                    }
                }
            }
        }
    }

    /// Serves one connection that is already open, on this thread, exactly
    /// as the accept loop serves each connection it accepts (handshake, then
    /// frames until the peer closes or breaks the protocol), and returns when
    /// it ends. The fuzzer (`fuzz/`) drives the server's frame handling
    /// through it with arbitrary byte streams.
    #[doc(hidden)]
    pub fn serve_connection(&self, stream: &TcpStream, from: SocketAddr, endpoint: &Endpoint) {
        self.handshaking.fetch_add(1, Ordering::AcqRel);
        serve(stream, u64::MAX, from, endpoint, self);
    }

    /// Offers `service` as control service number `id` to authenticated
    /// peers (replacing one of that number).
    pub fn offer(&self, id: u64, service: Arc<dyn super::ControlService>) {
        self.services.write().insert(id, service);
    }

    /// Stops accepting, closes every served connection and joins the threads.
    pub fn shutdown(&self) {
        self.stopping.store(true, Ordering::Release);
        // SAFETY: shutting down a socket we own; wakes the blocked accept().
        unsafe { libc::shutdown(self.listener.as_raw_fd(), libc::SHUT_RDWR) };
        // The accept thread first: a connection it accepted just before
        // `stopping` was set is in `conns` once it has exited.
        if let Some(accept) = self.accept.lock().take() {
            let _ = accept.join();
        }
        for (_, c) in self.conns.lock().drain() {
            let _ = c.stream.shutdown(std::net::Shutdown::Both);
        }
        let threads: Vec<_> = self.threads.lock().drain(..).collect();
        for t in threads {
            let _ = t.join();
        }
    }

    /// Closes the connections served for agent `peer` (NIXL's `disconnect`
    /// of that agent): their threads end.
    pub fn close_from(&self, peer: &AgentName) {
        for c in self.conns.lock().values() {
            if c.peer.as_ref() == Some(peer) {
                let _ = c.stream.shutdown(std::net::Shutdown::Both);
            }
        }
    }

    /// True once shutdown started (for tests).
    pub fn is_stopping(&self) -> bool {
        self.stopping.load(Ordering::Acquire)
    }

    /// Connections served now (for tests).
    pub fn served(&self) -> usize {
        self.conns.lock().len()
    }

    /// The most connections that were in their handshake at once (for tests).
    pub fn handshaking_peak(&self) -> usize {
        self.handshaking_peak.load(Ordering::Acquire)
    }

    /// Waits as a frame's I/O does: until the server stops, and no longer
    /// than the stall timeout without a byte (`deadline`: for the frame).
    /// Enters a connection of generation `link` from engine `sender`: a
    /// newer generation than any before fences off the sender's older
    /// connections (waiting for a system call or device copy of theirs in
    /// progress, then closing them) before it is served.
    ///
    /// # Errors
    /// When a connection of a newer generation of the sender was admitted
    /// already: this one is a late connection of a set the sender gave up.
    fn join_link(&self, sender: u128, link: u64, stream: &TcpStream) -> Result<Arc<Fence>, Close> {
        let fence = Arc::new(Fence {
            stale: AtomicBool::new(false),
            io: RwLock::new(()),
            stream: stream.try_clone().ok(),
        });
        if link == 0 {
            return Ok(fence); // a client without generations: nothing to fence
        }
        // Every connection of the newest set waits for the older sets'
        // copies in progress, not only the first to arrive: a second stream
        // of the new set may not serve while an old one still writes.
        let older: Vec<Arc<Fence>> = {
            let mut links = self.links.lock();
            if links.len() > MAX_SENDERS {
                links.retain(|_, l| l.conns.iter().any(|(_, c)| c.strong_count() > 0));
            }
            let l = links.entry(sender).or_default();
            l.conns.retain(|(_, c)| c.strong_count() > 0);
            if l.conns.is_empty() {
                // Nothing of the sender is served: a claimed generation
                // cannot lock its later connections out for good.
                l.newest = 0;
            }
            if link < l.newest {
                return Err(format!(
                    "a connection of generation {link} arrived after one of generation {} \
                     (the peer reconnected since)",
                    l.newest
                ));
            }
            l.newest = link;
            let older: Vec<Arc<Fence>> = l
                .conns
                .iter()
                .filter(|(g, _)| *g < link)
                .filter_map(|(_, c)| c.upgrade())
                .collect();
            // Marked under the lock: no frame of theirs starts applying
            // once a newer connection was admitted.
            for old in &older {
                old.stale.store(true, Ordering::Release);
            }
            l.conns.push((link, Arc::downgrade(&fence)));
            older
        };
        for old in older {
            drop(old.io.write());
            if let Some(s) = &old.stream {
                let _ = s.shutdown(std::net::Shutdown::Both);
            }
        }
        Ok(fence)
    }

    fn waits<'a>(&self, abort: &'a dyn Fn() -> bool, deadline: Option<Instant>) -> Waits<'a> {
        Waits {
            abort,
            stall: (!self.stall.is_zero()).then_some(self.stall),
            deadline,
        }
    }

    /// When a frame that started now must be in.
    fn frame_deadline(&self) -> Option<Instant> {
        (!self.stall.is_zero()).then(|| Instant::now() + self.stall * 4)
    }
}

/// Why a connection is being closed.
type Close = String;

fn serve(stream: &TcpStream, id: u64, from: SocketAddr, endpoint: &Endpoint, server: &TcpServer) {
    let stall = server.stall;
    fault::point("tcp.server.serving", server.token);
    let _ = stream.set_nodelay(true);
    let greeted = handshake(stream, endpoint, server);
    server.handshaking.fetch_sub(1, Ordering::AcqRel);
    let (peer, peer_token, fence) = match greeted {
        Ok(joined) => joined,
        Err(why) => {
            warn!(
                "Mooncake: agent {}: refused connection from {from}: {why}",
                endpoint.name
            );
            return;
        }
    };
    debug!(
        "Mooncake: agent {} serving agent {peer} from {from}",
        endpoint.name
    );
    if let Some(c) = server.conns.lock().get_mut(&id) {
        c.peer = Some(peer.clone());
    }
    // Header reads wait at most this long before the loop looks again; a
    // peer that vanished is caught by keepalive.
    let _ = stream.set_read_timeout((!stall.is_zero()).then_some(stall));
    let _ = stream.set_write_timeout((!stall.is_zero()).then_some(stall));
    let _ = io::keep_alive(stream, stall);
    let mut scratch = Vec::new();
    loop {
        let from_peer = (&peer, peer_token);
        match serve_one(stream, endpoint, from_peer, server, &fence, &mut scratch) {
            Ok(true) => linger(stream, server.spin, &server.spinners),
            Ok(false) if server.stopping.load(Ordering::Acquire) => return,
            Ok(false) => {
                debug!("Mooncake: agent {peer} closed its connection from {from}");
                return;
            }
            Err(why) => {
                warn!(
                    "Mooncake: agent {}: closing connection from agent {peer} ({from}): {why}",
                    endpoint.name
                );
                return;
            }
        }
    }
}
/// After serving a frame, polls the socket for up to `spin` before going
/// back to a blocking read, so that the next request of a peer posting one
/// transfer after another is picked up without a thread wake-up (the
/// largest part of a small transfer's latency). At most one thread of a
/// server spins at a time, and only for `spin` after a frame: an idle engine
/// uses no CPU.
fn linger(stream: &TcpStream, spin: Duration, spinners: &AtomicUsize) {
    if spin.is_zero()
        || spinners
            .compare_exchange(0, 1, Ordering::AcqRel, Ordering::Acquire)
            .is_err()
    {
        return;
    }
    let start = std::time::Instant::now();
    while start.elapsed() < spin && !io::readable_now(stream) {
        std::hint::spin_loop();
    }
    spinners.store(0, Ordering::Release);
}

/// Reads and checks the client's hello, enters its connection set's
/// generation ([`TcpServer::join_link`]) and answers HelloOk: the agent name
/// and the connection's fence.
fn handshake(
    stream: &TcpStream,
    endpoint: &Endpoint,
    server: &TcpServer,
) -> Result<(AgentName, u128, Arc<Fence>), Close> {
    // One deadline for the whole handshake: a client trickling bytes cannot
    // hold this thread longer.
    let deadline = std::time::Instant::now() + HELLO_TIMEOUT;
    let mut raw = [0u8; frame::HEADER_LEN];
    io::read_exact_by(stream, &mut raw, deadline, &|| false)
        .map_err(|e| format!("no hello: {e}"))?;
    let header = Header::decode(&raw).map_err(|e| format!("bad hello header: {e}"))?;
    if header.kind != Kind::Hello {
        return Err(format!("first frame is {:?}, not Hello", header.kind));
    }
    let mut body = vec![0u8; header.body_len as usize];
    io::read_exact_by(stream, &mut body, deadline, &|| false)
        .map_err(|e| format!("truncated hello: {e}"))?;
    let hello = Hello::decode(&body).map_err(|e| e.to_string())?;
    if hello.target_token != endpoint.token {
        return Err("it did not present this engine's token (stale or forged metadata)".into());
    }
    let name = AgentName::from(hello.name.as_slice());
    admit(endpoint, &name, hello.sender_token)?;
    // Fenced (or refused) before the client hears HelloOk and sends frames.
    let fence = server.join_link(hello.sender_token, header.aux, stream)?;
    let ok = Header::new(Kind::HelloOk, 0, 0, frame::HELLO_ACKS_NOTIFS);
    io::send_bytes(stream, &[&ok.encode()]).map_err(|e| e.to_string())?;
    Ok((name, hello.sender_token, fence))
}

/// Checks a peer's claim to be agent `name` (engine `token`) against the
/// connection info loaded for that name (see [`crate::common::peers`]): a
/// name whose loaded instance is alive elsewhere is refused; when that
/// instance is gone the newcomer is its restart and is accepted.
fn admit(endpoint: &Endpoint, name: &AgentName, token: u128) -> Result<(), Close> {
    let known = match endpoint.peers.check(name, token) {
        Claim::Unverified | Claim::Verified => return Ok(()),
        Claim::Stale(known) => known,
    };
    let alive = known.tcp.iter().any(|addr| {
        client::instance_alive(
            *addr,
            known.token,
            &endpoint.name,
            endpoint.token,
            PROBE_TIMEOUT,
        )
    });
    if alive {
        return Err(format!(
            "it claims to be agent {name}, but the connection info loaded for that name is of \
             another engine, which is alive (a second agent with that name, or forged)"
        ));
    }
    endpoint.peers.mark_gone(known.token);
    info!(
        "Mooncake: agent {}: agent {name} connects as a new engine (the one whose connection info \
         was loaded is gone: a restart); accepted, unverified until its new info is loaded",
        endpoint.name
    );
    Ok(())
}

/// Serves one frame. `Ok(false)`: the peer closed between frames (or the
/// server stops); `Ok(true)` also after a wait that saw no frame.
fn serve_one(
    stream: &TcpStream,
    endpoint: &Endpoint,
    (peer, peer_token): (&AgentName, u128),
    server: &TcpServer,
    fence: &Fence,
    scratch: &mut Vec<u8>,
) -> Result<bool, Close> {
    let mut raw = [0u8; frame::HEADER_LEN];
    let mut idle = false;
    if !io::read_header(stream, &mut raw, &mut idle).map_err(|e| e.to_string())? {
        return Ok(idle && !server.stopping.load(Ordering::Acquire));
    }
    let h = Header::decode(&raw).map_err(|e| format!("bad frame: {e}"))?;
    let deadline = server.frame_deadline();
    let stopping = || server.stopping.load(Ordering::Acquire);
    let waits = server.waits(&stopping, deadline);
    let fenced = || "the peer reconnected: a frame on its old connection is not applied".to_owned();
    match h.kind {
        Kind::Write | Kind::ReadReq if fence.is_stale() => return Err(fenced()),
        Kind::Write => {
            let table_len = h.aux as usize * SEG_LEN;
            let data_len = (h.body_len as usize - table_len) as u64;
            let segs = read_segs(stream, &h, scratch, Some(data_len))?;
            let regions = resolve(endpoint, &segs);
            let (status, reason) = match pin_all(&regions) {
                Ok(pins) => {
                    drop(pins);
                    let regions = regions.as_ref().expect("pinned, so resolved");
                    let ranges = ranges(&segs);
                    if let Some(context) = staging::device_context(regions.iter().map(|r| &**r)) {
                        match receive_staged(stream, context, regions, &ranges, fence, waits)? {
                            Ok(()) => (Status::Success.code(), Vec::new()),
                            Err(e) => {
                                warn!(
                                    "Mooncake: agent {}: cut short a write from agent {peer}: {e}",
                                    endpoint.name
                                );
                                (e.status().code(), e.to_string().into_bytes())
                            }
                        }
                    } else {
                        let mut got = 0;
                        let mut access = || {
                            let moving = fence.io.read();
                            if fence.is_stale() {
                                return Access::Zeros;
                            }
                            match pin_all_of(regions) {
                                Some(pins) => Access::Memory((moving, pins)),
                                None => Access::Zeros,
                            }
                        };
                        // SAFETY: every range was checked to lie inside a region of our
                        // registry; for each call `access` pins those regions, so no byte
                        // lands in one after its deregistration returned.
                        let landed = unsafe {
                            io::recv_frame(
                                stream.as_raw_fd(),
                                &ranges,
                                &mut got,
                                &mut access,
                                Some(waits),
                            )
                        }
                        .map_err(|e| e.to_string())?;
                        if fence.is_stale() {
                            return Err(fenced());
                        }
                        if landed {
                            (Status::Success.code(), Vec::new())
                        } else {
                            let e = Error::NotAllowed(
                                "a target region was deregistered during the transfer".into(),
                            );
                            warn!(
                                "Mooncake: agent {}: cut short a write from agent {peer}: {e}",
                                endpoint.name
                            );
                            (e.status().code(), e.to_string().into_bytes())
                        }
                    }
                }
                Err(e) => {
                    warn!(
                        "Mooncake: agent {}: refused a write from agent {peer}: {e}",
                        endpoint.name
                    );
                    io::discard(stream, data_len).map_err(|e| e.to_string())?;
                    (e.status().code(), e.to_string().into_bytes())
                }
            };
            reply(
                stream,
                Kind::WriteAck,
                h.tag,
                status,
                &[],
                &reason,
                None,
                waits,
            )?;
        }
        Kind::ReadReq => {
            let segs = read_segs(stream, &h, scratch, None)?;
            let regions = resolve(endpoint, &segs);
            match pin_all(&regions) {
                Ok(pins) => {
                    drop(pins);
                    let regions = regions.as_ref().expect("pinned, so resolved");
                    if let Some(context) = staging::device_context(regions.iter().map(|r| &**r)) {
                        send_staged(stream, h.tag, context, regions, &ranges(&segs), waits)?;
                        return Ok(true);
                    }
                    reply(
                        stream,
                        Kind::ReadResp,
                        h.tag,
                        Status::Success.code(),
                        &ranges(&segs),
                        &[],
                        Some(regions),
                        waits,
                    )
                    .map_err(|e| format!("{e} (a region it reads was deregistered meanwhile?)"))?;
                }
                Err(e) => {
                    warn!(
                        "Mooncake: agent {}: refused a read from agent {peer}: {e}",
                        endpoint.name
                    );
                    reply(
                        stream,
                        Kind::ReadResp,
                        h.tag,
                        e.status().code(),
                        &[],
                        e.to_string().as_bytes(),
                        None,
                        waits,
                    )?;
                }
            }
        }
        Kind::Notif => {
            let len = h.body_len as usize;
            // A sequence number (nonzero) of the sender's link `aux` asks for
            // an acknowledgement.
            let (seq, link) = (h.tag, h.aux);
            let ack = || {
                io::send_bytes(stream, &[&Header::new(Kind::NotifAck, 0, seq, 0).encode()])
                    .map_err(|e| e.to_string())
            };
            if seq != 0 && server.delivered.seen(peer_token, link, seq) {
                io::discard(stream, len as u64).map_err(|e| e.to_string())?;
                return ack().map(|()| true);
            }
            match endpoint.inbox.reserve(peer, len) {
                Ok(room) => {
                    let mut msg = vec![0u8; len];
                    io::read_exact(stream, &mut msg).map_err(|e| e.to_string())?;
                    // Checked again with the delivery, at once: an older
                    // connection of the sender may carry the same number.
                    // (What our NICs wrote into GPU memory before it, e.g.
                    // WRITEs over RDMA, is visible to GPU work first.)
                    let deliver = || {
                        crate::cuda::gpudirect::flush_writes();
                        room.deliver(msg)
                    };
                    server
                        .delivered
                        .deliver_once(peer_token, link, seq, deliver);
                    fault::point("tcp.server.notif_delivered", server.token);
                    if seq != 0 {
                        ack()?;
                    }
                }
                Err(why) => {
                    warn!(
                        "Mooncake: agent {}: refused a notification of {len} bytes from agent {peer}: {why}",
                        endpoint.name
                    );
                    io::discard(stream, len as u64).map_err(|e| e.to_string())?;
                    let reason = why.as_bytes();
                    let reason = &reason[..reason.len().min(frame::MAX_REASON as usize)];
                    io::send_bytes(
                        stream,
                        &[
                            &Header::new(Kind::NotifRefused, reason.len() as u32, seq, len as u64)
                                .encode(),
                            reason,
                        ],
                    )
                    .map_err(|e| e.to_string())?;
                }
            }
        }
        Kind::Control => {
            let mut request = vec![0u8; h.body_len as usize];
            io::read_exact(stream, &mut request).map_err(|e| e.to_string())?;
            let service = server.services.read().get(&h.aux).cloned();
            let answer = match service {
                Some(s) => s.call(peer, peer_token, &request),
                None => Err(format!("no control service {} here", h.aux)),
            };
            let (status, body) = match answer {
                Ok(body) if body.len() <= frame::MAX_CONTROL as usize => (0, body),
                Ok(body) => (1, format!("an answer of {} bytes", body.len()).into_bytes()),
                Err(why) => (1, why.into_bytes()),
            };
            let body = &body[..body.len().min(frame::MAX_CONTROL as usize)];
            io::send_bytes(
                stream,
                &[
                    &Header::new(Kind::ControlResp, body.len() as u32, h.tag, status).encode(),
                    body,
                ],
            )
            .map_err(|e| e.to_string())?;
        }
        other => return Err(format!("unexpected {other:?} frame")),
    }
    Ok(true)
}

/// Receives the data of a WRITE frame into GPU memory through a staging
/// buffer, pipelined ([`staging::recv_pipelined`]): each piece lands in the
/// buffer, then the device copies it into place under the regions' pins
/// (and the connection's fence), all waited for before this returns. The
/// outcome is what to acknowledge; the stream stays whole either way (data
/// that may not land is received and thrown away).
fn receive_staged(
    stream: &TcpStream,
    context: usize,
    regions: &[Arc<LocalRegion>],
    ranges: &[RawRange],
    fence: &Fence,
    waits: Waits<'_>,
) -> Result<Result<(), Error>, Close> {
    let stale = "the peer reconnected: a frame on its old connection is not applied";
    let total: usize = ranges.iter().map(|r| r.len).sum();
    let bounce = match staging::buffer(context, staging::PIPE_BYTES) {
        Ok(b) => b,
        Err(e) => {
            io::discard(stream, total as u64).map_err(|e| e.to_string())?;
            return Ok(Err(e));
        }
    };
    let mut recv = staging::socket_step(stream.as_raw_fd(), &bounce, waits, true, staging::always);
    let mut hold = || {
        let moving = fence.io.read();
        if fence.is_stale() {
            return Err(Error::RemoteDisconnect(stale.into()));
        }
        match pin_all_of(regions) {
            Some(pins) => Ok(Some((moving, pins))),
            None => Err(Error::NotAllowed(
                "a target region was deregistered during the transfer".into(),
            )),
        }
    };
    // SAFETY: the ranges lie inside `regions` (checked by `resolve`), pinned
    // by `hold`'s guard while copies into them run.
    let outcome =
        unsafe { staging::recv_pipelined(context, &bounce, ranges, &mut recv, &mut hold) }
            .map_err(|e| e.to_string())?;
    if fence.is_stale() {
        return Err(stale.into());
    }
    Ok(outcome)
}

/// Answers a READ of GPU memory through a staging buffer, pipelined
/// ([`staging::send_pipelined`]): the device copies each piece into the
/// buffer under the regions' pins, then it is sent. A region deregistered
/// meanwhile, or a device error, ends the connection (the data was
/// announced already).
fn send_staged(
    stream: &TcpStream,
    tag: u64,
    context: usize,
    regions: &[Arc<LocalRegion>],
    ranges: &[RawRange],
    waits: Waits<'_>,
) -> Result<(), Close> {
    let bounce = match staging::buffer(context, staging::PIPE_BYTES) {
        Ok(b) => b,
        Err(e) => {
            let reason = e.to_string();
            let status = e.status().code();
            return reply(
                stream,
                Kind::ReadResp,
                tag,
                status,
                &[],
                reason.as_bytes(),
                None,
                waits,
            );
        }
    };
    let total: usize = ranges.iter().map(|r| r.len).sum();
    let head = Header::new(Kind::ReadResp, total as u32, tag, 0).encode();
    let fd = stream.as_raw_fd();
    let mut sent = 0;
    // SAFETY: only the header, no memory ranges.
    unsafe {
        io::send_frame::<()>(
            fd,
            &head,
            &[],
            &mut sent,
            &mut || Access::Zeros,
            Some(waits),
        )
    }
    .map_err(|e| e.to_string())?;
    let mut send = staging::socket_step(fd, &bounce, waits, false, staging::always);
    let mut hold = || match pin_all_of(regions) {
        Some(pins) => Ok(Some(pins)),
        None => Err(Error::NotAllowed(
            "a region it reads was deregistered meanwhile".into(),
        )),
    };
    // SAFETY: the ranges lie inside `regions` (checked by `resolve`), pinned
    // by `hold`'s guard while copies out of them run.
    let outcome = unsafe {
        staging::send_pipelined(context, &bounce, ranges, &mut send, &mut hold, &mut || true)
    };
    match outcome {
        Ok(true) => Ok(()),
        Ok(false) => Err("the read answer was cut short".into()),
        Err(why) => Err(why.to_string()),
    }
}

fn read_segs(
    stream: &TcpStream,
    h: &Header,
    scratch: &mut Vec<u8>,
    data_len: Option<u64>,
) -> Result<Vec<Seg>, Close> {
    let count = h.aux as usize;
    scratch.resize(count * SEG_LEN, 0);
    io::read_exact(stream, scratch).map_err(|e| e.to_string())?;
    frame::decode_segs(scratch, count, data_len).map_err(|e| format!("bad segment table: {e}"))
}

fn resolve(endpoint: &Endpoint, segs: &[Seg]) -> Result<Vec<Arc<LocalRegion>>, Error> {
    let mut regions: Vec<Arc<LocalRegion>> = Vec::new();
    for s in segs {
        if regions
            .last()
            .is_some_and(|r| r.key == s.key && r.contains(s.addr, u64::from(s.len)))
        {
            continue;
        }
        regions.push(endpoint.registry.resolve(s.key, s.addr, u64::from(s.len))?);
    }
    Ok(regions)
}

/// Pins every resolved region for one access; a region whose
/// deregistration started since it was resolved is refused like an unknown one.
fn pin_all(regions: &Result<Vec<Arc<LocalRegion>>, Error>) -> Result<Vec<Pin<'_>>, Error> {
    let regions = regions.as_ref().map_err(Clone::clone)?;
    pin_all_of(regions)
        .ok_or_else(|| Error::NotAllowed("a target region is being deregistered".into()))
}

/// Pins every region of `regions`, or `None` once one is being deregistered.
fn pin_all_of(regions: &[Arc<LocalRegion>]) -> Option<Vec<Pin<'_>>> {
    regions.iter().map(|r| r.pin()).collect()
}

fn ranges(segs: &[Seg]) -> Vec<RawRange> {
    segs.iter()
        .map(|s| RawRange {
            addr: s.addr,
            len: s.len as usize,
        })
        .collect()
}

/// Sends an answer: header, then `data` ranges of `regions` (pinned for
/// each system call; a region that goes meanwhile ends the connection, as
/// data already announced cannot be taken back) or a reason.
#[allow(clippy::too_many_arguments)]
fn reply(
    stream: &TcpStream,
    kind: Kind,
    tag: u64,
    status: i32,
    data: &[RawRange],
    reason: &[u8],
    regions: Option<&[Arc<LocalRegion>]>,
    waits: Waits<'_>,
) -> Result<(), Close> {
    let reason = &reason[..reason.len().min(frame::MAX_REASON as usize)];
    let body: u64 = data.iter().map(|r| r.len as u64).sum::<u64>() + reason.len() as u64;
    let mut head = Header::new(kind, body as u32, tag, i64::from(status) as u64)
        .encode()
        .to_vec();
    head.extend_from_slice(reason);
    let mut sent = 0;
    let mut access = || match regions.map(pin_all_of) {
        Some(Some(pins)) => Access::Memory(pins),
        _ => Access::Stop,
    };
    // SAFETY: the data ranges lie in `regions`, which `access` pins for each
    // call (with none, `data` is empty); once one is refused the send stops.
    unsafe {
        io::send_frame(
            stream.as_raw_fd(),
            &head,
            data,
            &mut sent,
            &mut access,
            Some(waits),
        )
    }
    .map(|_| ())
    .map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::sync::mpsc;

    #[test]
    fn a_newer_connection_set_fences_off_the_older_ones_of_its_sender() {
        let endpoint = Arc::new(Endpoint {
            name: AgentName::from("T"),
            token: 1,
            registry: Default::default(),
            inbox: Default::default(),
            peers: Default::default(),
        });
        let server = TcpServer::start(
            endpoint,
            "127.0.0.1:0".parse().unwrap(),
            Duration::ZERO,
            Duration::ZERO,
        )
        .unwrap();
        let (_c1, s1) = socket_pair();
        let (_c2, s2) = socket_pair();
        let (_c3, s3) = socket_pair();
        let (_c4, s4) = socket_pair();
        let gen1a = server.join_link(7, 1, &s1).unwrap();
        let gen1b = server.join_link(7, 1, &s2).unwrap();
        let other = server.join_link(8, 1, &s3).unwrap();
        let probe = server.join_link(7, 0, &s4).unwrap();
        assert!(
            !gen1a.is_stale() && !gen1b.is_stale(),
            "one set, several streams"
        );
        // The sender reconnects: its older set is fenced off, waiting for a
        // data copy in progress on it.
        let copying = gen1a.io.read();
        let (_c5, s5) = socket_pair();
        std::thread::scope(|t| {
            let first = t.spawn(|| server.join_link(7, 2, &s4).unwrap());
            // The second stream of the new set waits too, whether or not
            // the first one already marked the old set.
            let second = t.spawn(|| server.join_link(7, 2, &s5).unwrap());
            std::thread::sleep(Duration::from_millis(20));
            assert!(
                !first.is_finished(),
                "admitted while an old copy was landing"
            );
            assert!(
                !second.is_finished(),
                "a second stream admitted while an old copy was landing"
            );
            assert!(gen1a.is_stale(), "marked before the wait");
            drop(copying);
            assert!(!first.join().unwrap().is_stale());
            assert!(!second.join().unwrap().is_stale());
        });
        assert!(
            gen1a.is_stale() && gen1b.is_stale(),
            "the old set is fenced"
        );
        assert!(!other.is_stale(), "another sender's connections are not");
        assert!(
            !probe.is_stale(),
            "a connection without generation is never fenced"
        );
        // A late connection of the old set is refused while the sender has
        // connections here...
        assert!(server.join_link(7, 1, &s1).is_err());
        // ...but once none is left, no claimed generation locks it out.
        drop((gen1a, gen1b));
        assert!(server.join_link(7, 1, &s1).is_ok());
        server.shutdown();
    }

    fn socket_pair() -> (TcpStream, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let client = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (server, _) = listener.accept().unwrap();
        (client, server)
    }

    /// Runs `linger` with a spin of ten minutes on another thread; true if it
    /// returned within the generous bound (it must, long before the spin ends).
    fn lingers_briefly(
        server: TcpStream,
        spinners: Arc<AtomicUsize>,
        poke: Option<TcpStream>,
    ) -> bool {
        let (done, returned) = mpsc::channel();
        let t = std::thread::spawn(move || {
            linger(&server, Duration::from_secs(600), &spinners);
            done.send(()).unwrap();
        });
        if let Some(mut client) = poke {
            client.write_all(b"x").unwrap();
        }
        let ok = returned.recv_timeout(Duration::from_secs(60)).is_ok();
        if ok {
            t.join().unwrap();
        }
        ok
    }

    #[test]
    fn a_lingering_connection_stops_polling_when_a_request_arrives() {
        let (client, server) = socket_pair();
        let spinners = Arc::new(AtomicUsize::new(0));
        assert!(lingers_briefly(server, spinners.clone(), Some(client)));
        assert_eq!(
            spinners.load(Ordering::Acquire),
            0,
            "the poll slot is free again"
        );
    }

    #[test]
    fn a_connection_polls_holding_the_slot_until_a_request_arrives() {
        let (mut client, server) = socket_pair();
        let spinners = Arc::new(AtomicUsize::new(0));
        let (done, returned) = mpsc::channel();
        let s = spinners.clone();
        let t = std::thread::spawn(move || {
            linger(&server, Duration::from_secs(600), &s);
            done.send(()).unwrap();
        });
        // It holds the poll slot, and keeps polling while nothing arrives.
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        while spinners.load(Ordering::Acquire) == 0 {
            assert!(std::time::Instant::now() < deadline, "it never polled");
            std::thread::yield_now();
        }
        assert!(
            returned.try_recv().is_err(),
            "it stopped with nothing to read"
        );
        client.write_all(b"x").unwrap();
        returned.recv_timeout(Duration::from_secs(60)).unwrap();
        t.join().unwrap();
        assert_eq!(spinners.load(Ordering::Acquire), 0);
    }

    #[test]
    fn only_one_connection_polls_at_a_time() {
        let (_client, server) = socket_pair();
        // Another connection holds the poll slot: this one must not spin.
        let spinners = Arc::new(AtomicUsize::new(1));
        assert!(lingers_briefly(server, spinners.clone(), None));
        assert_eq!(
            spinners.load(Ordering::Acquire),
            1,
            "the other's slot is untouched"
        );
    }
}
