//! The initiating side of the TCP transport: a [`PeerLink`] holds the
//! persistent connections to one peer (several streams, opened lazily),
//! splits each post into frames spread over the streams, and completes the
//! post when every frame was answered.
//!
//! Each stream has a writer thread (sends Writes, ReadReqs, notifications)
//! and a reader thread (receives acks and read data straight into registered
//! memory). A post's notification is sent only after every frame of the post
//! was acknowledged (WRITE: the data is in the target's memory) or received
//! (READ: the data is in ours).
//!
//! No thread waits for the network while it holds a request's memory: every
//! system call that touches registered memory is non-blocking and made under
//! pins and the post's cancel lock taken for that call only (see
//! [`io::send_frame`]); a frame of GPU memory holds them across the device
//! copies of a piece and the non-waiting system calls beside them, and lets
//! them go before any wait (see [`super::staging`]). So `releaseReqH` and
//! `deregisterMem` wait for one system call or one frame's device copies at
//! most, and a frame cut short by either goes on as zeros (sent) or is
//! thrown away (received), keeping the stream whole: a cancel never gives up
//! on a connection. A post ends only when every one of its
//! frames was settled (answered, refused, skipped or lost with its
//! connection), so a repost never overlaps frames of the previous post.
//!
//! A link whose connections fail comes back by itself: the next post after
//! a backoff (2 s, doubling to 30 s while reconnecting fails) opens new
//! connections; one whose peer closed it cleanly while idle reconnects on
//! the next post at once.
//!
//! Notifications are acknowledged by targets that say they do (see
//! [`super::outbox`]): one still unacknowledged when its connections fail
//! is sent again on the next connection set, which a background thread
//! opens after the backoff when nobody else does; once no acknowledgement
//! came for [`REDELIVER_FOR`], those left are given up and reported in a
//! log line.

use std::any::Any;
use std::collections::{HashMap, VecDeque};
use std::net::{SocketAddr, TcpStream};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock, Weak};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use log::{debug, error, warn};
use parking_lot::{Condvar, Mutex, RwLock, RwLockReadGuard};

use super::io::{self, Access, RawRange, Waits};
use super::outbox::Outbox;
use super::staging;
use crate::common::{AgentName, Completion, Error, MemKind, Pin, Result, Status};
use crate::cuda::HostBuffer;
use crate::transport::{Op, Plan, Posted, Route, Transfer};
use crate::wire::frame::{self, Header, Hello, Kind, Seg};

/// Tunables of the TCP transport.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TcpConfig {
    /// Parallel connections per peer.
    pub streams: usize,
    /// Most data bytes per frame (large descriptors are sliced to this size,
    /// small ones batched up to it).
    pub frame_bytes: u64,
    /// A peer that neither answers nor takes data for this long while work
    /// is outstanding is declared dead (0 disables).
    pub stall_timeout: Duration,
    /// How long after an application thread's last poll a stream's reader
    /// thread takes the stream back (see [`Receiver`]).
    pub handoff: Duration,
}

impl Default for TcpConfig {
    fn default() -> Self {
        TcpConfig {
            streams: 2,
            frame_bytes: 1 << 20,
            stall_timeout: Duration::from_secs(30),
            handoff: Duration::from_micros(200),
        }
    }
}

const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
const HELLO_TIMEOUT: Duration = Duration::from_secs(10);
/// How long posts fail fast after a link failed, before the next one tries
/// to reconnect; doubled after each failed reconnect, up to [`MAX_BACKOFF`].
const BACKOFF: Duration = Duration::from_secs(2);
const MAX_BACKOFF: Duration = Duration::from_secs(30);
/// How long unacknowledged notifications are kept for a link that brings
/// none of them to the peer, before they are given up (with a log line).
#[cfg(not(test))]
const REDELIVER_FOR: Duration = Duration::from_secs(60);
#[cfg(test)]
const REDELIVER_FOR: Duration = Duration::from_secs(3);
/// The least time between two rounds of bringing a link back for its
/// notifications.
const REDELIVER_PAUSE: Duration = Duration::from_millis(50);
/// How long closing a healthy link waits for the acknowledgements of the
/// notifications it sent.
const CLOSE_DRAIN: Duration = Duration::from_secs(1);

/// One piece of a frame: a contiguous range on both sides.
#[derive(Debug, Clone, Copy)]
struct Piece {
    local: u32,
    key: u64,
    local_addr: u64,
    remote_addr: u64,
    len: u32,
}

/// One post of a plan over TCP.
pub struct TcpPost {
    plan: Arc<Plan>,
    pieces: Vec<Piece>,
    /// Frame `i` covers `pieces[frames[i]..frames[i + 1]]`.
    frames: Vec<usize>,
    /// Frames not settled yet (answered, refused, skipped, or lost with
    /// their connection): the post ends when this reaches 0.
    outstanding: AtomicUsize,
    /// The first error of a frame: the post's result once all settled.
    error: Mutex<Option<Error>>,
    /// Set once the post finished, failed or was cancelled: none of its data
    /// moves between a socket and its memory any more.
    stopped: AtomicBool,
    /// Set by `cancel` before it takes `io`: a pipelined GPU frame, whose
    /// thread holds `io` shared across system calls, sends zeros from then
    /// on (see [`TcpPost::may_send_held`]).
    cancelling: AtomicBool,
    /// Held shared for each system call that moves the post's data between
    /// a socket and its memory (streams move frames of one post in
    /// parallel; no call waits), and across the device copies of a staged
    /// piece; exclusively by `cancel`, so that nothing moves after it
    /// returned.
    io: RwLock<()>,
    /// The connections the post runs on.
    conns: Weak<Conns>,
    completion: Completion,
    notif: Option<Arc<[u8]>>,
    /// The stream a small post was sent on by the posting thread (see
    /// [`Receiver`]); `NO_STREAM` otherwise.
    inline_stream: AtomicUsize,
}

const NO_STREAM: usize = usize::MAX;

/// Why a post stopped moving a frame of a local region.
fn deregistered() -> Error {
    Error::InvalidParam("a local region was deregistered during the transfer".into())
}

/// Generations of connection sets (sent in the Hello header's `aux`),
/// increasing across the process (so across every link and every
/// reconnection of one).
static NEXT_LINK: AtomicU64 = AtomicU64::new(1);

impl TcpPost {
    fn new(
        plan: Arc<Plan>,
        notif: Option<Vec<u8>>,
        frame_bytes: u64,
        conns: Weak<Conns>,
    ) -> TcpPost {
        let mut pieces = Vec::with_capacity(plan.segments.len());
        let mut frames = vec![0];
        let mut frame_len = 0u64;
        for s in &plan.segments {
            let key = plan.remote_regions[s.remote as usize].key;
            let mut off = 0;
            while off < s.len {
                let len = (s.len - off).min(frame_bytes);
                if frame_len + len > frame_bytes
                    || pieces.len() - frames[frames.len() - 1] == frame::MAX_SEGS
                {
                    frames.push(pieces.len());
                    frame_len = 0;
                }
                pieces.push(Piece {
                    local: s.local,
                    key,
                    local_addr: s.local_addr + off,
                    remote_addr: s.remote_addr + off,
                    len: len as u32,
                });
                frame_len += len;
                off += len;
            }
        }
        if pieces.len() > frames[frames.len() - 1] {
            frames.push(pieces.len());
        }
        let count = frames.len() - 1;
        TcpPost {
            plan,
            pieces,
            frames,
            outstanding: AtomicUsize::new(count),
            error: Mutex::new(None),
            stopped: AtomicBool::new(false),
            cancelling: AtomicBool::new(false),
            io: RwLock::new(()),
            conns,
            completion: Completion::default(),
            notif: notif.map(Arc::from),
            inline_stream: AtomicUsize::new(NO_STREAM),
        }
    }

    fn frame_count(&self) -> usize {
        self.frames.len() - 1
    }

    fn frame(&self, i: usize) -> &[Piece] {
        &self.pieces[self.frames[i]..self.frames[i + 1]]
    }

    fn frame_bytes(&self, i: usize) -> u64 {
        self.frame(i).iter().map(|p| u64::from(p.len)).sum()
    }

    /// Pins the local regions of frame `i`, or `None` if one was deregistered.
    fn pin_local(&self, i: usize) -> Option<Vec<Pin<'_>>> {
        let mut used: Vec<u32> = self.frame(i).iter().map(|p| p.local).collect();
        used.sort_unstable();
        used.dedup();
        used.iter()
            .map(|&r| self.plan.local_regions[r as usize].pin())
            .collect()
    }

    /// The context to stage frame `i` with, when local memory of it is on
    /// a GPU.
    fn device_context(&self, i: usize) -> Option<usize> {
        staging::device_context(
            self.frame(i)
                .iter()
                .map(|p| &*self.plan.local_regions[p.local as usize]),
        )
    }

    fn local_ranges(&self, i: usize) -> Vec<RawRange> {
        self.frame(i)
            .iter()
            .map(|p| RawRange {
                addr: p.local_addr,
                len: p.len as usize,
            })
            .collect()
    }

    fn segs(&self, i: usize) -> Vec<u8> {
        let segs: Vec<Seg> = self
            .frame(i)
            .iter()
            .map(|p| Seg {
                key: p.key,
                addr: p.remote_addr,
                len: p.len,
            })
            .collect();
        let mut table = Vec::with_capacity(segs.len() * frame::SEG_LEN);
        frame::encode_segs(&segs, &mut table);
        table
    }

    /// Ends the post with `result` unless it already ended, and stops its
    /// data.
    fn finish(&self, result: Result<()>) {
        self.stopped.store(true, Ordering::Release);
        self.completion.finish(result);
    }

    fn is_stopped(&self) -> bool {
        self.stopped.load(Ordering::Acquire)
    }

    /// Records `e` as the post's result (the first error wins) and stops
    /// its data; the post ends once every frame is settled.
    fn fail(&self, e: Error) {
        self.error.lock().get_or_insert(e);
        self.stopped.store(true, Ordering::Release);
    }

    /// The answer to one frame is in, or the frame will never be answered
    /// (`result` says why). When it was the last frame: the post ends with
    /// its first error, or sends the notification (which completes it once
    /// written), or completes now.
    fn settle(self: &Arc<Self>, conns: &Conns, result: Result<()>) {
        if let Err(e) = result {
            self.fail(e);
        }
        if self.outstanding.fetch_sub(1, Ordering::AcqRel) != 1 {
            return;
        }
        if let Some(e) = self.error.lock().take() {
            self.finish(Err(e));
            return;
        }
        if self.is_stopped() {
            return; // cancelled: finished already
        }
        match &self.notif {
            Some(msg) => {
                // (Refused when the peer holds too many unacknowledged.)
                if let Err(why) = conns.enqueue_notif(msg.clone(), Some(self.clone()), None) {
                    self.finish(Err(Error::Backend(why)));
                }
            }
            None => self.finish(Ok(())),
        }
    }

    /// The access [`io::send_frame`]/[`io::recv_frame`] may have to frame
    /// `i`'s local memory for one system call: under the cancel lock and
    /// pins, or none once the post stopped or a region went.
    fn access(&self, i: usize) -> Access<(RwLockReadGuard<'_, ()>, Vec<Pin<'_>>)> {
        let moving = self.io.read();
        if self.is_stopped() {
            return Access::Zeros;
        }
        match self.pin_or_fail(i) {
            Some(pins) => Access::Memory((moving, pins)),
            None => Access::Zeros,
        }
    }

    /// [`TcpPost::pin_local`], failing the post when a region went.
    fn pin_or_fail(&self, i: usize) -> Option<Vec<Pin<'_>>> {
        let pins = self.pin_local(i);
        if pins.is_none() {
            self.fail(deregistered());
        }
        pins
    }

    /// Whether frame `i`'s staged bytes may still go, asked by a thread that
    /// holds [`TcpPost::access`]'s guard already (and so must not take the
    /// cancel lock again: a waiting `cancel` would block it): not once the
    /// post stopped, a release waits for the lock, or a local region's
    /// deregistration started (which fails the post).
    fn may_send_held(&self, i: usize) -> bool {
        !(self.is_stopped() || self.cancelling.load(Ordering::Acquire))
            && self.pin_or_fail(i).is_some()
    }
}

impl Transfer for TcpPost {
    fn completion(&self) -> &Completion {
        &self.completion
    }

    fn poll(&self) {
        let Some(conns) = self.conns.upgrade() else {
            return;
        };
        let i = self.inline_stream.load(Ordering::Acquire);
        if i != NO_STREAM {
            conns.poll_stream(i);
        }
        conns.watchdog();
    }

    fn remaining_bytes(&self) -> u64 {
        // Frames of one post are about the same size.
        let frames = self.frame_count().max(1) as u64;
        let left = self.outstanding.load(Ordering::Acquire) as u64;
        self.plan.total_bytes / frames * left
    }

    /// Waits for the system call or device copies moving the post's data
    /// right now (never for the network: they do not wait), then stops the
    /// post: frames cut short go on as zeros or are thrown away.
    fn cancel(&self) {
        self.cancelling.store(true, Ordering::Release);
        let _moving = self.io.write();
        self.finish(Err(Error::Canceled(
            "the request was released while in flight".into(),
        )));
    }
}

enum Out {
    Frame {
        tag: u64,
        post: Arc<TcpPost>,
        frame: usize,
    },
    Notif {
        msg: Arc<[u8]>,
        /// Its sequence number (see [`super::outbox`]).
        seq: u64,
        post: Option<Arc<TcpPost>>,
    },
    /// The rest of a frame a poster started sending inline.
    Rest(Box<Outgoing>),
}

/// A frame on its way out: its bytes and how many were sent.
struct Outgoing {
    out: Out,
    /// Header and segment table (or header and message).
    head: Vec<u8>,
    /// The local memory a Write frame carries after `head` (its staging
    /// buffer once staged, for GPU memory).
    ranges: Vec<RawRange>,
    /// A Write frame's data, copied from GPU memory before it is sent.
    staged: Option<HostBuffer>,
    /// A Write frame of GPU memory sent pipelined: the device context and
    /// a buffer of [`staging::PIPE_BYTES`] (see [`send_pipelined_write`]).
    pipeline: Option<(usize, HostBuffer)>,
    sent: usize,
}

struct Pending {
    post: Arc<TcpPost>,
    frame: usize,
}

#[derive(Default)]
struct Queue {
    items: VecDeque<Out>,
    /// Someone (the stream's writer thread, or a poster sending inline) is
    /// sending on the socket: one sender at a time keeps frames whole.
    busy: bool,
    closed: bool,
}

/// Who reads a stream's answers: its reader thread, or an application thread
/// polling `checkXfer` on a small post.
///
/// A reader thread blocked on the socket must be woken by the scheduler for
/// every answer, which dominates the latency of a small transfer on a busy
/// host. So while an application thread polls (it did within
/// [`TcpConfig::handoff`]), it reads small answers itself and the reader
/// thread sleeps until the polls stop; an answer with a large body, or one
/// not yet wholly arrived, is handed back to the reader thread at once (a
/// poller never waits on the network). Whoever reads holds `lock`, so frames
/// stay whole; the reader thread waits for data without holding it, so the
/// first poll after a pause need not wait for the reader's wake-up.
struct Receiver {
    lock: Mutex<()>,
    /// Until when (nanoseconds since `Conns::epoch`) the reader thread leaves
    /// the stream to pollers.
    polled_until: AtomicU64,
    /// Set when a poller handed the stream back: pollers keep off until the
    /// reader thread has read a small answer (so that polls in a tight loop
    /// cannot keep a reader that was just woken from reading, and a stream
    /// of large answers stays with the reader).
    reader_claim: AtomicBool,
    park: Mutex<()>,
    wake: Condvar,
}

impl Receiver {
    fn new() -> Receiver {
        Receiver {
            lock: Mutex::new(()),
            polled_until: AtomicU64::new(0),
            reader_claim: AtomicBool::new(false),
            park: Mutex::new(()),
            wake: Condvar::new(),
        }
    }

    /// Gives the stream back to the reader thread now.
    fn hand_back(&self) {
        // SeqCst: pairs with `poll_stream` (store one flag, then read the
        // other), so that one of the two always sees the other's store.
        self.reader_claim.store(true, Ordering::SeqCst);
        self.polled_until.store(0, Ordering::SeqCst);
        let _g = self.park.lock();
        self.wake.notify_all();
    }
}

/// Answers up to this body size may be read by a polling application thread.
const POLL_BODY_BYTES: u32 = (INLINE_FRAME_BYTES + 4096) as u32;

/// A post of one frame up to this size is sent by the posting thread itself
/// when its stream is idle (no hand-off to the writer thread: lower latency).
const INLINE_FRAME_BYTES: u64 = 64 << 10;

/// The connections to one peer. Each stream's writer thread opens its
/// socket (no caller waits on the network: posts queue until it is up).
struct Conns {
    peer: AgentName,
    /// Set by the stream's writer thread once the handshake succeeded.
    socks: Vec<OnceLock<TcpStream>>,
    /// Signalled when a stream comes up or the connections fail.
    up: (Mutex<()>, Condvar),
    queues: Vec<(Mutex<Queue>, Condvar)>,
    receivers: Vec<Receiver>,
    epoch: Instant,
    handoff: Duration,
    /// Answers read by polling application threads (for tests).
    polled: AtomicU64,
    /// Answers a poller handed back to the reader thread (for tests).
    handed_back: AtomicU64,
    /// Notifications the peer refused (for tests).
    refused_notifs: AtomicU64,
    pending: Mutex<HashMap<u64, Pending>>,
    next_tag: std::sync::atomic::AtomicU64,
    next_stream: AtomicUsize,
    down: Mutex<Option<Error>>,
    /// Set when the connections ended with nothing lost: they were all up,
    /// and the peer closed them between frames with no work outstanding.
    clean_close: AtomicBool,
    /// Failed connections of the link in a row before these.
    failures_before: u32,
    /// The link's unacknowledged notifications.
    outbox: Arc<Outbox>,
    /// This connection set's generation (as sent in its hellos).
    generation: u64,
    /// The link, to reconnect it for them.
    link: Weak<PeerLink>,
    /// The peer acknowledges notifications (its HelloOk on stream 0 said so).
    acks_notifs: AtomicBool,
    last_progress: Mutex<Instant>,
    /// See [`TcpConfig::stall_timeout`].
    stall_timeout: Duration,
    threads: Mutex<Vec<JoinHandle<()>>>,
}

impl Conns {
    /// Declares the peer dead if it neither answered nor took data for the
    /// stall timeout while requests are outstanding (a peer that reads
    /// slowly is alive).
    fn watchdog(&self) {
        let timeout = self.stall_timeout;
        // Streams still connecting have their own connect and hello timeouts.
        if timeout.is_zero()
            || self.pending.lock().is_empty()
            || self.socks.iter().any(|s| s.get().is_none())
        {
            return;
        }
        if self.last_progress.lock().elapsed() > timeout {
            self.fail_all(Error::RemoteDisconnect(format!(
                "agent {} neither answered nor took data for {timeout:?} while transfers were \
                 outstanding",
                self.peer
            )));
        }
    }

    /// Queues `out`: data frames round-robin over the streams, notifications
    /// always on stream 0, so that they arrive in the order they were sent.
    fn enqueue(&self, out: Out) {
        let i = match out {
            Out::Frame { .. } => {
                self.next_stream.fetch_add(1, Ordering::Relaxed) % self.queues.len()
            }
            // (The rest of a frame is never queued here: it goes back to
            // the front of the stream it started on.)
            Out::Notif { .. } | Out::Rest(_) => 0,
        };
        let (queue, cv) = &self.queues[i];
        let mut q = queue.lock();
        if q.closed {
            drop(q);
            fail_out(self, out, &self.down_error());
            return;
        }
        q.items.push_back(out);
        drop(q);
        cv.notify_one();
    }

    /// Queues a notification on stream 0 (behind everything queued there, so
    /// in sequence order), with a new sequence number unless `seq` gives
    /// the one it had (sent again: kept in the outbox already). A new one
    /// outside any transfer (`post` none) is kept in the outbox from now on,
    /// so connections that fail before it was acknowledged do not lose it.
    ///
    /// # Errors
    /// When the outbox holds its limit of unacknowledged notifications.
    fn enqueue_notif(
        &self,
        msg: Arc<[u8]>,
        post: Option<Arc<TcpPost>>,
        seq: Option<u64>,
    ) -> std::result::Result<(), String> {
        let (queue, cv) = &self.queues[0];
        let mut q = queue.lock();
        let seq = match seq {
            Some(seq) => seq,
            None => {
                let seq = self.outbox.next_seq();
                match post {
                    None => self.outbox.admit(seq, &msg, self.generation)?,
                    // A transfer's is kept once written; room is checked now.
                    Some(_) => self.outbox.room_for(msg.len())?,
                }
                seq
            }
        };
        if q.closed {
            drop(q);
            match post {
                Some(post) => post.finish(Err(self.down_error())),
                None => self.redeliver_later(),
            }
            return Ok(());
        }
        q.items.push_back(Out::Notif { msg, seq, post });
        drop(q);
        cv.notify_one();
        Ok(())
    }

    /// Starts bringing the link back for the notifications its failed
    /// connections left unacknowledged (unless nothing waits, or a thread
    /// does so already): see [`redeliver`].
    fn redeliver_later(&self) {
        if self.outbox.is_empty() || self.outbox.redelivering.swap(true, Ordering::SeqCst) {
            return;
        }
        let (link, outbox) = (self.link.clone(), self.outbox.clone());
        let spawned = std::thread::Builder::new()
            .name("mooncake-renotif".into())
            .spawn(move || redeliver(&link, &outbox));
        if let Err(e) = spawned {
            self.outbox.redelivering.store(false, Ordering::SeqCst);
            warn!(
                "Mooncake: cannot start a thread to send notifications to agent {} again: {e}",
                self.peer
            );
        }
    }

    /// Sends `out` on stream `i` from the calling thread if nobody else is
    /// sending there and nothing is queued; otherwise hands it back.
    fn send_inline(&self, i: usize, out: Out) -> std::result::Result<(), Out> {
        let (queue, cv) = &self.queues[i];
        let Some(sock) = self.socks[i].get() else {
            return Err(out); // still connecting: the writer thread sends it
        };
        {
            let mut q = queue.lock();
            if q.busy || q.closed || !q.items.is_empty() {
                return Err(out);
            }
            q.busy = true;
        }
        if let Out::Frame { post, .. } = &out {
            post.inline_stream.store(i, Ordering::Release);
        }
        // Never wait for room in the socket: what does not fit now is left
        // to the writer thread, ahead of anything queued meanwhile.
        let mut outgoing = Outgoing::new(self, out);
        let result = send(self, sock, &mut outgoing, false);
        let queued = {
            let mut q = queue.lock();
            if matches!(result, Ok(false)) {
                q.items.push_front(Out::Rest(Box::new(outgoing)));
            }
            q.busy = false;
            !q.items.is_empty()
        };
        if queued {
            cv.notify_one(); // what others queued meanwhile
        }
        if let Err(e) = result {
            self.fail_all(Error::RemoteDisconnect(format!(
                "sending to agent {} failed: {e}",
                self.peer
            )));
        }
        Ok(())
    }

    fn now_ns(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_nanos()).unwrap_or(u64::MAX)
    }

    /// An application thread polls stream `i` (see [`Receiver`]): reads the
    /// small answers wholly there, unless the reader thread is reading.
    fn poll_stream(&self, i: usize) {
        let rx = &self.receivers[i];
        if rx.reader_claim.load(Ordering::Acquire) {
            return;
        }
        let until = self
            .now_ns()
            .saturating_add(u64::try_from(self.handoff.as_nanos()).unwrap_or(u64::MAX));
        rx.polled_until.store(until, Ordering::SeqCst); // see `hand_back`
        if rx.reader_claim.load(Ordering::SeqCst) {
            // Another poller handed the stream back meanwhile: keep off.
            rx.polled_until.store(0, Ordering::Release);
            return;
        }
        let Some(_reading) = rx.lock.try_lock() else {
            return;
        };
        let Some(sock) = self.socks[i].get() else {
            return;
        };
        let hand_back = || {
            self.handed_back.fetch_add(1, Ordering::Relaxed);
            rx.hand_back();
        };
        // A few answers per call: a poller never stalls its caller for long.
        for _ in 0..16 {
            let mut raw = [0u8; frame::HEADER_LEN];
            match io::peek_now(sock, &mut raw) {
                Ok(true) => {}
                Ok(false) => return,
                Err(_) => return hand_back(), // closed or failed: the reader reports it
            }
            let whole = match Header::decode(&raw) {
                Ok(h) if h.body_len <= POLL_BODY_BYTES => frame::HEADER_LEN + h.body_len as usize,
                _ => return hand_back(),
            };
            if io::buffered(sock).is_none_or(|n| n < whole) {
                return hand_back(); // reading it could wait on the network
            }
            match receive(self, sock) {
                Ok(Got::Frame { .. }) => {
                    self.polled.fetch_add(1, Ordering::Relaxed);
                }
                Ok(_) => return hand_back(),
                Err(e) => {
                    self.fail_all(e);
                    return hand_back();
                }
            }
        }
    }

    /// Waits until stream `i` is up (`Some`) or the connections failed.
    fn stream(&self, i: usize) -> Option<&TcpStream> {
        let mut g = self.up.0.lock();
        loop {
            if self.is_down() {
                return None;
            }
            if let Some(s) = self.socks[i].get() {
                return Some(s);
            }
            self.up.1.wait(&mut g);
        }
    }

    /// Waits until every stream is up, or says why not.
    fn wait_all_up(&self) -> Result<()> {
        if self.socks.iter().all(|s| s.get().is_some()) && !self.is_down() {
            return Ok(());
        }
        for i in 0..self.socks.len() {
            if self.stream(i).is_none() {
                return Err(self.down_error());
            }
        }
        Ok(())
    }

    fn down_error(&self) -> Error {
        self.down.lock().clone().unwrap_or_else(|| {
            Error::RemoteDisconnect(format!("connection to agent {} is closed", self.peer))
        })
    }

    fn is_down(&self) -> bool {
        self.down.lock().is_some()
    }

    /// Declares the peer dead: every request in flight to it fails with
    /// `err` now, and the sockets are shut so the threads exit.
    fn fail_all(&self, err: Error) {
        self.fail_all_as(err, false);
    }

    /// [`Self::fail_all`]; `closed_between_frames` says the peer closed a
    /// connection cleanly (the close is clean when nothing else was lost).
    fn fail_all_as(&self, err: Error, closed_between_frames: bool) {
        let outstanding = !self.pending.lock().is_empty();
        let queued = self.queues.iter().any(|(q, _)| !q.lock().items.is_empty());
        let all_up = self.socks.iter().all(|s| s.get().is_some());
        {
            let mut down = self.down.lock();
            if down.is_some() {
                return;
            }
            // Cleanliness is known before anyone can see the link down, so
            // a use that finds it down also finds whether to reconnect.
            // (Notifications waiting for acknowledgement are outstanding too.)
            if closed_between_frames && !outstanding && !queued && all_up && self.outbox.is_empty()
            {
                self.clean_close.store(true, Ordering::Release);
            }
            *down = Some(err.clone());
        }
        if outstanding {
            warn!("Mooncake: {err}");
        } else {
            debug!("Mooncake: {err}");
        }
        // Every frame sent or queued is in `pending`: settling them here
        // settles each exactly once (queued frames are then dropped).
        let pending: Vec<Pending> = self.pending.lock().drain().map(|(_, p)| p).collect();
        for p in pending {
            p.post.settle(self, Err(err.clone()));
        }
        for (queue, cv) in &self.queues {
            let items: Vec<Out> = {
                let mut q = queue.lock();
                q.closed = true;
                q.items.drain(..).collect()
            };
            cv.notify_all();
            for out in items {
                fail_out(self, out, &err);
            }
        }
        for s in self.socks.iter().filter_map(OnceLock::get) {
            let _ = s.shutdown(std::net::Shutdown::Both);
        }
        {
            let _g = self.up.0.lock();
            self.up.1.notify_all();
        }
        for rx in &self.receivers {
            rx.hand_back();
        }
        self.redeliver_later();
    }

    fn progress(&self) {
        *self.last_progress.lock() = Instant::now();
    }

    /// How long a frame may go without a byte moving.
    fn stall(&self) -> Option<Duration> {
        (!self.stall_timeout.is_zero()).then_some(self.stall_timeout)
    }
}

/// `out` will never be sent.
/// How long a link fails fast after `failures` failed connections in a row.
fn backoff(failures: u32) -> Duration {
    BACKOFF
        .saturating_mul(1 << failures.saturating_sub(1).min(8))
        .min(MAX_BACKOFF)
}

fn fail_out(conns: &Conns, out: Out, err: &Error) {
    match out {
        Out::Frame { tag, post, .. } => {
            // Settled by whoever takes it out of `pending`.
            if conns.pending.lock().remove(&tag).is_some() {
                post.settle(conns, Err(err.clone()));
            }
        }
        Out::Rest(outgoing) => fail_out(conns, outgoing.out, err),
        // Its transfer fails: it is not to be delivered.
        Out::Notif {
            post: Some(post),
            seq,
            ..
        } => {
            conns.outbox.forget(seq);
            post.finish(Err(err.clone()));
        }
        // Kept in the outbox: sent again on the next connections.
        Out::Notif { post: None, .. } => {}
    }
}

/// Brings `link` back for the notifications in `outbox` (runs on a thread
/// of its own, one per link at a time): waits out the link's backoff,
/// reconnects it and queues them on the new connections ([`PeerLink::start`]
/// queues them first), until they are all on connections that came up.
/// Gives up, reporting what was not delivered, once no acknowledgement came
/// for [`REDELIVER_FOR`] while the link is not up, or when the link was
/// closed or dropped.
fn redeliver(link: &Weak<PeerLink>, outbox: &Outbox) {
    loop {
        let Some(link) = link.upgrade() else {
            outbox.redelivering.store(false, Ordering::SeqCst);
            return; // dropped: its close reported them
        };
        let Some(since) = outbox.stuck_since() else {
            outbox.redelivering.store(false, Ordering::SeqCst);
            return; // all acknowledged meanwhile
        };
        let give_up = |why: &dyn std::fmt::Display| {
            let (n, bytes) = outbox.take_all();
            outbox.redelivering.store(false, Ordering::SeqCst);
            if n > 0 {
                warn!(
                    "Mooncake: {n} notification(s) ({bytes} bytes) to agent {} were not \
                     delivered: {why}",
                    link.peer
                );
            }
        };
        let left = REDELIVER_FOR.saturating_sub(since.elapsed());
        if left.is_zero() && !link.is_up() {
            give_up(&format_args!("no acknowledgement for {REDELIVER_FOR:?}"));
            return;
        }
        let wait = match link.conns() {
            Ok(conns) => {
                for (seq, msg) in outbox.claim(conns.generation) {
                    // (One sent again is never refused.)
                    let _ = conns.enqueue_notif(msg, None, Some(seq));
                }
                if conns.wait_all_up().is_ok() {
                    outbox.redelivering.store(false, Ordering::SeqCst);
                    // One kept meanwhile on connections that failed, or
                    // these failed already: go on.
                    let again = outbox.unclaimed(conns.generation) || conns.is_down();
                    if again && !outbox.redelivering.swap(true, Ordering::SeqCst) {
                        drop(link);
                        std::thread::sleep(REDELIVER_PAUSE);
                        continue;
                    }
                    return;
                }
                Duration::ZERO // failed: the next round waits out the backoff
            }
            Err(e) => match link.retry_in() {
                Some(wait) => wait.min(left),
                None => {
                    give_up(&e);
                    return;
                }
            },
        };
        drop(link);
        std::thread::sleep(wait.max(REDELIVER_PAUSE));
    }
}

/// Asks the engine with `token` whether it still serves at `addr`: true when
/// it accepts a hello that names its token before `within` runs out. A
/// refusal (another engine listens there now), a closed port or silence
/// until the deadline all say it is gone.
pub(super) fn instance_alive(
    addr: SocketAddr,
    token: u128,
    me: &AgentName,
    my_token: u128,
    within: Duration,
) -> bool {
    let deadline = Instant::now() + within;
    let Ok(s) = io::connect_by(addr, deadline, &|| false) else {
        return false;
    };
    let hello = Hello {
        target_token: token,
        sender_token: my_token,
        name: me.as_bytes().to_vec(),
    }
    .encode();
    let head = Header::new(Kind::Hello, hello.len() as u32, 0, 0).encode();
    let mut raw = [0u8; frame::HEADER_LEN];
    let alive = io::send_bytes(&s, &[&head, &hello]).is_ok()
        && io::read_exact_by(&s, &mut raw, deadline, &|| false).is_ok()
        && matches!(Header::decode(&raw), Ok(h) if h.kind == Kind::HelloOk);
    let _ = s.shutdown(std::net::Shutdown::Both);
    alive
}

/// Calls control service `service` of the engine `token` at `addr` with
/// `request`, on a connection of its own (presenting us as agent `me`,
/// engine `my_token`), and returns its answer; everything within `within`.
///
/// # Errors
/// [`Error::RemoteDisconnect`] when the peer cannot be reached or does not
/// answer in time; [`Error::Backend`] with the service's reason when it
/// refused.
pub(super) fn control_call(
    addr: SocketAddr,
    token: u128,
    (me, my_token): (&AgentName, u128),
    service: u64,
    request: &[u8],
    within: Duration,
) -> Result<Vec<u8>> {
    let deadline = Instant::now() + within;
    let gone =
        |e: std::io::Error| Error::RemoteDisconnect(format!("control call to {addr} failed: {e}"));
    let s = io::connect_by(addr, deadline, &|| false).map_err(gone)?;
    let hello = Hello {
        target_token: token,
        sender_token: my_token,
        name: me.as_bytes().to_vec(),
    }
    .encode();
    let hello_head = Header::new(Kind::Hello, hello.len() as u32, 0, 0).encode();
    let call_head = Header::new(Kind::Control, request.len() as u32, 1, service).encode();
    let result = (|| {
        io::send_bytes(&s, &[&hello_head, &hello]).map_err(gone)?;
        let mut raw = [0u8; frame::HEADER_LEN];
        io::read_exact_by(&s, &mut raw, deadline, &|| false).map_err(gone)?;
        if !matches!(Header::decode(&raw), Ok(h) if h.kind == Kind::HelloOk) {
            return Err(Error::RemoteDisconnect(format!(
                "{addr} refused our hello for a control call"
            )));
        }
        io::send_bytes(&s, &[&call_head, request]).map_err(gone)?;
        io::read_exact_by(&s, &mut raw, deadline, &|| false).map_err(gone)?;
        let h = Header::decode(&raw)
            .ok()
            .filter(|h| h.kind == Kind::ControlResp)
            .ok_or_else(|| {
                Error::RemoteDisconnect(format!("{addr} answered a control call with garbage"))
            })?;
        let mut body = vec![0u8; h.body_len as usize];
        io::read_exact_by(&s, &mut body, deadline, &|| false).map_err(gone)?;
        if h.status() != 0 {
            return Err(Error::Backend(format!(
                "the peer at {addr} refused: {}",
                String::from_utf8_lossy(&body)
            )));
        }
        Ok(body)
    })();
    let _ = s.shutdown(std::net::Shutdown::Both);
    result
}

/// What a writer thread needs to open its stream.
struct Dial {
    addr: SocketAddr,
    /// The encoded Hello body.
    hello: Vec<u8>,
    /// The generation of the connection set, sent in the Hello header's
    /// `aux` (which targets before generations ignore): the target fences
    /// off the connections of the sets before it.
    link: u64,
    stall: Option<Duration>,
}

impl Dial {
    /// Opens stream `i` of `conns`: connects, presents the peer's token,
    /// waits for its HelloOk. Gives up when the connections fail meanwhile
    /// (`close` never waits for a slow connect).
    fn open(&self, conns: &Conns, i: usize) -> Result<()> {
        let unreachable = |e: std::io::Error| {
            Error::RemoteDisconnect(format!(
                "cannot connect to agent {} at {}: {e}",
                conns.peer, self.addr
            ))
        };
        let abort = || conns.is_down();
        let s = io::connect_by(self.addr, Instant::now() + CONNECT_TIMEOUT, &abort)
            .map_err(unreachable)?;
        s.set_nodelay(true).map_err(unreachable)?;
        io::send_bytes(
            &s,
            &[
                &Header::new(Kind::Hello, self.hello.len() as u32, 0, self.link).encode(),
                &self.hello,
            ],
        )
        .map_err(unreachable)?;
        let mut raw = [0u8; frame::HEADER_LEN];
        io::read_exact_by(&s, &mut raw, Instant::now() + HELLO_TIMEOUT, &abort).map_err(|e| {
            Error::RemoteDisconnect(format!(
                "agent {} at {} refused the connection (it is not the engine whose metadata we hold, or another live agent uses our name there?): {e}",
                conns.peer, self.addr
            ))
        })?;
        match Header::decode(&raw) {
            Ok(h) if h.kind == Kind::HelloOk => {
                if i == 0 {
                    let acks = h.aux & frame::HELLO_ACKS_NOTIFS != 0;
                    conns.acks_notifs.store(acks, Ordering::Release);
                }
            }
            _ => {
                return Err(Error::RemoteDisconnect(format!(
                    "agent {} at {} answered the hello with garbage",
                    conns.peer, self.addr
                )));
            }
        }
        s.set_read_timeout(self.stall).map_err(unreachable)?;
        s.set_write_timeout(self.stall).map_err(unreachable)?;
        io::keep_alive(&s, self.stall.unwrap_or(Duration::ZERO)).map_err(unreachable)?;
        let slot = &conns.socks[i];
        let _ = slot.set(s); // only this thread sets stream `i`
        // Shut it if the connections failed while it was being opened (the
        // failure may have missed it).
        if conns.is_down() {
            let _ = slot.get().map(|s| s.shutdown(std::net::Shutdown::Both));
        }
        let _g = conns.up.0.lock();
        conns.up.1.notify_all();
        Ok(())
    }
}

enum LinkState {
    /// Not connected; the next use connects.
    Idle,
    Up(Arc<Conns>),
    /// The connections failed: uses fail with `error` until `retry_at`,
    /// then the next one reconnects.
    Down {
        error: Error,
        retry_at: Instant,
        /// Failed connections in a row (the backoff doubles with each).
        failures: u32,
    },
    /// Closed by us: for good.
    Closed(Error),
}

/// Everything needed to reach one peer over TCP, connected lazily.
pub struct PeerLink {
    me: AgentName,
    my_token: u128,
    peer: AgentName,
    peer_token: u128,
    addr: SocketAddr,
    config: TcpConfig,
    state: Mutex<LinkState>,
    /// Notifications not acknowledged yet, across connection sets.
    outbox: Arc<Outbox>,
    /// This link, for the thread that reconnects it for them.
    this: Weak<PeerLink>,
}

impl PeerLink {
    /// A link to `peer` (token `peer_token`) at `addr`; nothing connects yet.
    pub fn new(
        me: AgentName,
        my_token: u128,
        peer: AgentName,
        peer_token: u128,
        addr: SocketAddr,
        config: TcpConfig,
    ) -> Arc<PeerLink> {
        Arc::new_cyclic(|this| PeerLink {
            me,
            my_token,
            peer,
            peer_token,
            addr,
            config,
            state: Mutex::new(LinkState::Idle),
            outbox: Arc::default(),
            this: this.clone(),
        })
    }

    /// True while the link's connections are all up.
    fn is_up(&self) -> bool {
        matches!(&*self.state.lock(), LinkState::Up(c)
            if !c.is_down() && c.socks.iter().all(|s| s.get().is_some()))
    }

    /// How long until the next use may reconnect: zero when it may now,
    /// none once the link is closed.
    fn retry_in(&self) -> Option<Duration> {
        match &*self.state.lock() {
            LinkState::Closed(_) => None,
            LinkState::Down { retry_at, .. } => {
                Some(retry_at.saturating_duration_since(Instant::now()))
            }
            _ => Some(Duration::ZERO),
        }
    }

    /// The connections, opened now if needed. After the connections failed,
    /// calls fail fast for a backoff, then the next one reconnects (a peer
    /// that is in fact alive is reached again); connections the peer closed
    /// cleanly while idle are reopened at once.
    fn conns(&self) -> Result<Arc<Conns>> {
        let mut state = self.state.lock();
        let mut failures = 0;
        match &*state {
            LinkState::Up(c) if !c.is_down() => return Ok(c.clone()),
            LinkState::Up(c) if c.clean_close.load(Ordering::Acquire) => {}
            LinkState::Up(c) => {
                let error = c.down_error();
                // Connections that came up reset the count.
                let failures = if c.socks.iter().all(|s| s.get().is_some()) {
                    1
                } else {
                    c.failures_before + 1
                };
                *state = LinkState::Down {
                    error: error.clone(),
                    retry_at: Instant::now() + backoff(failures),
                    failures,
                };
                return Err(error);
            }
            LinkState::Down {
                error, retry_at, ..
            } if Instant::now() < *retry_at => return Err(error.clone()),
            LinkState::Down { failures: f, .. } => failures = *f,
            LinkState::Closed(e) => return Err(e.clone()),
            LinkState::Idle => {}
        }
        match self.start(failures) {
            Ok(c) => {
                *state = LinkState::Up(c.clone());
                Ok(c)
            }
            Err(e) => {
                *state = LinkState::Down {
                    error: e.clone(),
                    retry_at: Instant::now() + backoff(failures + 1),
                    failures: failures + 1,
                };
                Err(e)
            }
        }
    }

    /// Opens the connections now and waits until they are up (NIXL's
    /// `connect`).
    ///
    /// # Errors
    /// [`Error::RemoteDisconnect`] when the peer cannot be reached.
    pub fn ensure_connected(&self) -> Result<()> {
        self.conns()?.wait_all_up()
    }

    /// Creates the connections' state and starts their threads; each
    /// writer thread opens its stream (see [`dial`]).
    fn start(&self, failures_before: u32) -> Result<Arc<Conns>> {
        let n = self.config.streams.max(1);
        // A new generation for each connection set.
        let generation = NEXT_LINK.fetch_add(1, Ordering::Relaxed);
        let conns = Arc::new(Conns {
            peer: self.peer.clone(),
            socks: (0..n).map(|_| OnceLock::new()).collect(),
            up: (Mutex::new(()), Condvar::new()),
            queues: (0..n)
                .map(|_| (Mutex::new(Queue::default()), Condvar::new()))
                .collect(),
            receivers: (0..n).map(|_| Receiver::new()).collect(),
            epoch: Instant::now(),
            handoff: self.config.handoff,
            polled: AtomicU64::new(0),
            handed_back: AtomicU64::new(0),
            refused_notifs: AtomicU64::new(0),
            pending: Mutex::new(HashMap::new()),
            next_tag: std::sync::atomic::AtomicU64::new(1),
            next_stream: AtomicUsize::new(0),
            down: Mutex::new(None),
            clean_close: AtomicBool::new(false),
            failures_before,
            outbox: self.outbox.clone(),
            generation,
            link: self.this.clone(),
            acks_notifs: AtomicBool::new(false),
            last_progress: Mutex::new(Instant::now()),
            stall_timeout: self.config.stall_timeout,
            threads: Mutex::new(Vec::new()),
        });
        let dial = Arc::new(Dial {
            addr: self.addr,
            hello: Hello {
                target_token: self.peer_token,
                sender_token: self.my_token,
                name: self.me.as_bytes().to_vec(),
            }
            .encode(),
            link: generation,
            stall: (!self.config.stall_timeout.is_zero()).then_some(self.config.stall_timeout),
        });
        // What the connections before these left unacknowledged goes first.
        let again = self.outbox.claim(generation);
        if !again.is_empty() {
            log::info!(
                "Mooncake: sending {} unacknowledged notification(s) to agent {} again",
                again.len(),
                self.peer
            );
        }
        for (seq, msg) in again {
            // (One sent again is never refused.)
            let _ = conns.enqueue_notif(msg, None, Some(seq));
        }
        for i in 0..n {
            for writer in [true, false] {
                let (c, dial) = (conns.clone(), dial.clone());
                let spawned = std::thread::Builder::new()
                    .name(if writer { "mooncake-tx" } else { "mooncake-rx" }.into())
                    .spawn(move || {
                        if writer {
                            match dial.open(&c, i) {
                                Ok(()) => write_loop(&c, i),
                                Err(e) => c.fail_all(e),
                            }
                        } else if c.stream(i).is_some() {
                            read_loop(&c, i);
                        }
                    });
                match spawned {
                    Ok(t) => conns.threads.lock().push(t),
                    Err(e) => {
                        let err = Error::Backend(format!("cannot start a TCP thread: {e}"));
                        conns.fail_all(err.clone());
                        return Err(err);
                    }
                }
            }
        }
        debug!(
            "Mooncake: connecting to agent {} at {} with {n} streams",
            self.peer, self.addr
        );
        Ok(conns)
    }

    /// Starts one post of `plan`.
    ///
    /// # Errors
    /// [`Error::RemoteDisconnect`] when the peer is unreachable or dead.
    pub fn start_post(&self, plan: Arc<Plan>, notif: Option<Vec<u8>>) -> Result<Arc<TcpPost>> {
        let conns = self.conns()?;
        let post = Arc::new(TcpPost::new(
            plan,
            notif,
            self.config.frame_bytes,
            Arc::downgrade(&conns),
        ));
        if post.frame_count() == 0 {
            post.outstanding.store(1, Ordering::Relaxed);
            post.settle(&conns, Ok(()));
            return Ok(post);
        }
        if conns.pending.lock().is_empty() {
            conns.progress();
        }
        for frame in 0..post.frame_count() {
            let tag = conns.next_tag.fetch_add(1, Ordering::Relaxed);
            conns.pending.lock().insert(
                tag,
                Pending {
                    post: post.clone(),
                    frame,
                },
            );
            let out = Out::Frame {
                tag,
                post: post.clone(),
                frame,
            };
            if post.frame_count() == 1 && post.frame_bytes(0) <= INLINE_FRAME_BYTES {
                let mut out = Some(out);
                for i in 0..conns.queues.len() {
                    match conns.send_inline(i, out.take().expect("unsent")) {
                        Ok(()) => break,
                        Err(back) => out = Some(back),
                    }
                }
                if let Some(out) = out {
                    conns.enqueue(out);
                }
            } else {
                conns.enqueue(out);
            }
        }
        Ok(post)
    }

    /// True once the connections to the peer failed or were closed (a link
    /// never connected, or connecting right now, is not down).
    pub fn is_down(&self) -> bool {
        match self.state.try_lock().as_deref() {
            Some(LinkState::Up(c)) => c.is_down() && !c.clean_close.load(Ordering::Acquire),
            Some(LinkState::Down { .. } | LinkState::Closed(_)) => true,
            _ => false,
        }
    }

    /// Sends a notification outside any transfer.
    ///
    /// # Errors
    /// [`Error::RemoteDisconnect`] when the peer is unreachable or dead.
    pub fn send_notif(&self, msg: Vec<u8>) -> Result<()> {
        let conns = self.conns()?;
        conns
            .enqueue_notif(Arc::from(msg), None, None)
            .map_err(|why| Error::Backend(format!("agent {}: {why}", self.peer)))
    }

    /// Notifications sent and not acknowledged yet (for tests).
    #[cfg(test)]
    pub(crate) fn unacked_notifs(&self) -> usize {
        self.outbox.len()
    }

    /// Frames sent and not yet answered (for tests).
    #[cfg(test)]
    pub(crate) fn pending(&self) -> usize {
        match &*self.state.lock() {
            LinkState::Up(c) => c.pending.lock().len(),
            _ => 0,
        }
    }

    /// A counter of the live connections, 0 without them (for tests).
    #[cfg(test)]
    fn counter(&self, which: impl Fn(&Conns) -> &AtomicU64) -> u64 {
        match &*self.state.lock() {
            LinkState::Up(c) => which(c).load(Ordering::Relaxed),
            _ => 0,
        }
    }

    /// Answers read by application threads polling `checkXfer` (for tests).
    #[cfg(test)]
    pub(crate) fn polled(&self) -> u64 {
        self.counter(|c| &c.polled)
    }

    /// Notifications the peer refused (for tests).
    #[cfg(test)]
    pub(crate) fn refused_notifs(&self) -> u64 {
        self.counter(|c| &c.refused_notifs)
    }

    /// True while connections are up (for tests).
    #[cfg(test)]
    pub(crate) fn connected(&self) -> bool {
        matches!(&*self.state.lock(), LinkState::Up(c) if !c.is_down())
    }

    /// Answers a polling application thread handed back to the reader
    /// thread (for tests).
    #[cfg(test)]
    pub(crate) fn handed_back(&self) -> u64 {
        self.counter(|c| &c.handed_back)
    }

    /// True when no thread holds stream `i` for reading right now (false
    /// without live connections; for tests).
    #[cfg(test)]
    pub(crate) fn stream_free(&self, i: usize) -> bool {
        match &*self.state.lock() {
            LinkState::Up(c) => c.receivers[i].lock.try_lock().is_some(),
            _ => false,
        }
    }

    /// Closes the connections; requests in flight fail with `RemoteDisconnect`.
    /// Waits a little ([`CLOSE_DRAIN`]) for the acknowledgements of the
    /// notifications sent on healthy connections; those still unacknowledged
    /// then are reported in a log line.
    pub fn close(&self) {
        let healthy = matches!(&*self.state.lock(), LinkState::Up(c) if !c.is_down());
        if healthy {
            self.outbox.wait_drained(CLOSE_DRAIN);
        }
        let closed = Error::RemoteDisconnect(format!("disconnected from agent {}", self.peer));
        let state = std::mem::replace(&mut *self.state.lock(), LinkState::Closed(closed));
        let (n, bytes) = self.outbox.take_all();
        if n > 0 {
            warn!(
                "Mooncake: {n} notification(s) ({bytes} bytes) to agent {} may not have been \
                 delivered: the link was closed before the agent acknowledged them",
                self.peer
            );
        }
        let conns = match state {
            LinkState::Up(c) => c,
            _ => return,
        };
        conns.fail_all(Error::RemoteDisconnect(format!(
            "disconnected from agent {}",
            self.peer
        )));
        // An application thread may be reading an answer in checkXfer:
        // wait for it, so that nothing lands in memory after close returns.
        for rx in &conns.receivers {
            drop(rx.lock.lock());
        }
        let threads: Vec<_> = conns.threads.lock().drain(..).collect();
        for t in threads {
            let _ = t.join();
        }
    }
}

impl Route for PeerLink {
    fn transport(&self) -> &'static str {
        "tcp"
    }

    fn describe(&self) -> String {
        format!("TCP to {}", self.addr)
    }

    /// Host and GPU memory on either side: GPU memory is staged through
    /// pinned host buffers on both ends.
    fn serves(&self, local: MemKind, remote: MemKind) -> bool {
        local.is_memory() && remote.is_memory()
    }

    fn connect(&self) -> Result<()> {
        self.ensure_connected()
    }

    fn post(&self, plan: &Arc<Plan>, notif: Option<&[u8]>) -> Result<Posted> {
        let post = self.start_post(plan.clone(), notif.map(<[u8]>::to_vec))?;
        Ok(Posted::threaded(post))
    }

    fn notify(&self, msg: &[u8]) -> Result<()> {
        self.send_notif(msg.to_vec())
    }

    fn is_down(&self) -> bool {
        PeerLink::is_down(self)
    }

    fn close(&self) {
        PeerLink::close(self);
    }

    fn as_any(&self) -> &dyn Any {
        self
    }
}

impl Drop for PeerLink {
    fn drop(&mut self) {
        self.close();
    }
}

fn write_loop(conns: &Conns, i: usize) {
    let Some(sock) = conns.socks[i].get() else {
        return;
    };
    let (queue, cv) = &conns.queues[i];
    loop {
        let out = {
            let mut q = queue.lock();
            loop {
                if q.closed {
                    return;
                }
                if !q.busy
                    && let Some(out) = q.items.pop_front()
                {
                    q.busy = true;
                    break out;
                }
                cv.wait(&mut q);
            }
        };
        let mut outgoing = Outgoing::new(conns, out);
        let result = send(conns, sock, &mut outgoing, true);
        queue.lock().busy = false;
        if let Err(e) = result {
            let err =
                Error::RemoteDisconnect(format!("sending to agent {} failed: {e}", conns.peer));
            conns.fail_all(err.clone());
            // What was being sent (a frame was settled above with the rest).
            fail_out(conns, outgoing.out, &err);
            return;
        }
    }
}

impl Outgoing {
    /// The bytes of `out` (a notification numbered in `conns`' link).
    fn new(conns: &Conns, out: Out) -> Outgoing {
        let (head, ranges) = match &out {
            Out::Rest(_) => {
                let Out::Rest(rest) = out else { unreachable!() };
                return *rest;
            }
            Out::Frame { tag, post, frame } => {
                let table = post.segs(*frame);
                let count = post.frame(*frame).len() as u64;
                let (kind, data, ranges) = match post.plan.op {
                    Op::Write => (
                        Kind::Write,
                        post.frame_bytes(*frame),
                        post.local_ranges(*frame),
                    ),
                    Op::Read => (Kind::ReadReq, 0, Vec::new()),
                };
                let body = (table.len() as u64 + data) as u32;
                let mut head = Header::new(kind, body, *tag, count).encode().to_vec();
                head.extend_from_slice(&table);
                (head, ranges)
            }
            Out::Notif { msg, seq, .. } => {
                let mut head = Header::new(Kind::Notif, msg.len() as u32, *seq, conns.outbox.id)
                    .encode()
                    .to_vec();
                head.extend_from_slice(msg);
                (head, Vec::new())
            }
        };
        Outgoing {
            out,
            head,
            ranges,
            staged: None,
            pipeline: None,
            sent: 0,
        }
    }
}

/// Sends `o` on `sock`: with `wait`, waiting for room until all of it is
/// out; without, only what fits now (`Ok(false)`: the rest is left for the
/// writer thread). A frame of a post that stopped before the frame started
/// is not sent (nor its notification).
fn send(conns: &Conns, sock: &TcpStream, o: &mut Outgoing, wait: bool) -> std::io::Result<bool> {
    if o.sent == 0 {
        stage(o, wait);
    }
    if o.sent == 0 {
        match &o.out {
            Out::Frame { tag, post, frame } => {
                let skip = if post.is_stopped() {
                    Some(Ok(()))
                } else if post.plan.op == Op::Write && post.pin_local(*frame).is_none() {
                    Some(Err(deregistered()))
                } else {
                    None
                };
                if let Some(result) = skip {
                    if let Some(p) = conns.pending.lock().remove(tag) {
                        p.post.settle(conns, result);
                    }
                    return Ok(true);
                }
            }
            Out::Notif {
                post: Some(post), ..
            } if post.is_stopped() => return Ok(true), // cancelled or failed
            // A transfer's notification is kept from its first byte on (its
            // acknowledgement may come before the last byte's write returns).
            Out::Notif {
                post: Some(_),
                seq,
                msg,
            } if conns.acks_notifs.load(Ordering::Acquire) => {
                conns.outbox.keep(*seq, msg, conns.generation, true);
            }
            _ => {}
        }
    }
    let abort = || conns.is_down();
    let waits = wait.then_some(Waits {
        abort: &abort,
        stall: conns.stall(),
        deadline: None,
    });
    let fd = sock.as_raw_fd();
    if o.pipeline.is_some() {
        // Made only for a sender that may wait (see `stage`).
        let waits =
            waits.ok_or_else(|| std::io::Error::other("a pipelined frame sent without waiting"))?;
        send_pipelined_write(conns, fd, o, waits)?;
        return Ok(true);
    }
    let Outgoing {
        out,
        head,
        ranges,
        sent,
        ..
    } = o;
    let before = *sent;
    let done = match out {
        Out::Frame { post, frame, .. } if post.plan.op == Op::Write => {
            let frame = *frame;
            // SAFETY: the ranges lie in regions checked at prep time; for each
            // call `access` pins them and holds the post's cancel lock.
            unsafe { io::send_frame(fd, head, ranges, sent, &mut || post.access(frame), waits) }?
        }
        // SAFETY: no memory ranges, only `head`.
        _ => unsafe { io::send_frame::<()>(fd, head, &[], sent, &mut || Access::Zeros, waits) }?,
    };
    if *sent > before {
        conns.progress(); // the peer takes data: it is alive
    }
    if done && let Out::Notif { post, seq, .. } = out {
        if !conns.acks_notifs.load(Ordering::Acquire) {
            conns.outbox.forget(*seq); // an older peer: written is all we know
        } else if post.is_some() {
            // Written whole: sent again like the others from now on (now, if
            // these connections failed while it was being written).
            conns.outbox.written(*seq);
            if conns.is_down() {
                conns.redeliver_later();
            }
        }
        if let Some(post) = post {
            post.finish(Ok(()));
        }
    }
    Ok(done)
}

/// Readies a Write frame of GPU memory before its first byte is sent: a
/// frame of more than one [`staging::PIECE`] sent by a thread that may wait
/// (the stream's writer) gets a pipeline buffer ([`send_pipelined_write`]);
/// a smaller one (or one a posting thread sends without waiting) is copied
/// into a staging buffer whole, under the post's cancel lock and pins, and
/// the frame then sends the buffer. A device error fails the post, and the
/// frame is skipped like one of a stopped post.
fn stage(o: &mut Outgoing, wait: bool) {
    let Out::Frame { post, frame, .. } = &o.out else {
        return;
    };
    if post.plan.op != Op::Write || o.staged.is_some() || o.pipeline.is_some() {
        return;
    }
    let Some(context) = post.device_context(*frame) else {
        return;
    };
    let bytes = post.frame_bytes(*frame);
    if wait && bytes > staging::PIECE as u64 {
        match staging::buffer(context, staging::PIPE_BYTES) {
            Ok(b) => o.pipeline = Some((context, b)),
            Err(e) => post.fail(e),
        }
        return;
    }
    let staged = match post.access(*frame) {
        // SAFETY: the frame's ranges lie in regions checked at prep time,
        // pinned (with the cancel lock) until the device copies were
        // waited for; the buffer holds a whole frame (pooled beside the
        // pipelines' buffers: one size).
        Access::Memory(_guard) => {
            let len = staging::PIPE_BYTES.max(bytes as usize);
            staging::buffer(context, len).and_then(|b| {
                unsafe { staging::gather(context, &post.local_ranges(*frame), &b) }.map(|()| b)
            })
        }
        // Stopped: the frame is skipped.
        _ => return,
    };
    match staged {
        Ok(b) => {
            o.ranges = vec![staging::range_of(&b, bytes as usize)];
            o.staged = Some(b);
        }
        Err(e) => post.fail(e),
    }
}

/// Sends a Write frame of GPU memory pipelined ([`staging::send_pipelined`],
/// through `o.pipeline`'s buffer): the device copies the next piece out of
/// the frame's memory, under the post's cancel lock and pins, while the
/// previous one is on the socket. Every system call sends the buffer's bytes
/// only while the post may still send them (zeros otherwise), as
/// [`TcpPost::access`] decides for host memory, so nothing of the frame goes
/// once a release or deregistration started. A post stopped in the middle of
/// the frame, or a device error (which fails the post), sends the rest as
/// zeros: the frame was announced whole. Returns the socket's error.
fn send_pipelined_write(
    conns: &Conns,
    fd: std::os::fd::RawFd,
    o: &mut Outgoing,
    waits: Waits<'_>,
) -> std::io::Result<()> {
    let Outgoing {
        out: Out::Frame { post, frame, .. },
        head,
        pipeline: Some((context, bounce)),
        sent,
        ..
    } = o
    else {
        unreachable!("called for a pipelined Write frame");
    };
    let frame = *frame;
    let before = *sent;
    debug_assert_eq!(before, 0, "a pipelined frame is sent from its start");
    // SAFETY: no memory ranges, only the header and segment table.
    unsafe { io::send_frame::<()>(fd, head, &[], sent, &mut || Access::Zeros, Some(waits)) }?;
    if *sent > before {
        conns.progress();
    }
    let ranges = post.local_ranges(frame);
    let total: usize = ranges.iter().map(|r| r.len).sum();
    // Under `hold`'s guard the thread holds the cancel lock and pins
    // already; otherwise each system call takes them, as for host memory.
    let mut may_go = |step: staging::Step| {
        if !step.held {
            return post.access(frame).map(Some);
        }
        match post.may_send_held(frame) {
            true => Access::Memory(None),
            false => Access::Zeros,
        }
    };
    let mut step = staging::socket_step(fd, bounce, waits, false, &mut may_go);
    let mut data = 0;
    let mut counted = |buf: RawRange, done: &mut usize, s: staging::Step| {
        let was = *done;
        let result = step(buf, done, s);
        if *done > was {
            data += *done - was;
            conns.progress(); // the peer takes data: it is alive
        }
        result
    };
    // Stopped (released, failed, a region deregistered): the rest is zeros.
    let mut hold = || Ok(post.access(frame).memory());
    // Asked with the guard held before each further copy: once a release or
    // deregistration started, nothing more is copied out of the memory.
    let mut still = || post.may_send_held(frame);
    // SAFETY: the ranges lie in regions checked at prep time, pinned (with
    // the cancel lock) by `hold`'s guard while device copies out of them run.
    let outcome = unsafe {
        staging::send_pipelined(
            *context,
            bounce,
            &ranges,
            &mut counted,
            &mut hold,
            &mut still,
        )
    };
    match outcome {
        Ok(_) => {}
        Err(staging::SendStop::Stage(e)) => post.fail(e),
        Err(staging::SendStop::Socket(e)) => return Err(e),
    }
    // SAFETY: zeros only: `ranges` give the lengths, their memory is not read.
    let mut at = data;
    unsafe {
        io::send_frame::<()>(
            fd,
            &[],
            &ranges,
            &mut at,
            &mut || Access::Zeros,
            Some(waits),
        )
    }?;
    if at > data {
        conns.progress();
    }
    *sent = head.len() + total;
    Ok(())
}

fn read_loop(conns: &Conns, i: usize) {
    let Some(sock) = conns.socks[i].get() else {
        return;
    };
    // Set before the socket was published, never changed.
    let idle_after = sock.read_timeout().unwrap_or(None);
    let rx = &conns.receivers[i];
    loop {
        // Leave the stream to an application thread while it polls.
        {
            let mut parked = rx.park.lock();
            loop {
                if conns.is_down() {
                    return;
                }
                let until = rx.polled_until.load(Ordering::Acquire);
                let now = conns.now_ns();
                if until <= now {
                    break;
                }
                rx.wake
                    .wait_for(&mut parked, Duration::from_nanos(until - now));
            }
        }
        // Wait for an answer without holding the stream: a poller that comes
        // along meanwhile (after a pause, the caller's first checks) reads a
        // small answer itself instead of waiting for this thread's wake-up.
        match io::wait_readable(sock, idle_after) {
            Ok(true) => {}
            Ok(false) => {
                // Idle (or a signal): pollers may read again.
                rx.reader_claim.store(false, Ordering::Release);
                continue;
            }
            Err(e) => {
                conns.fail_all(Error::RemoteDisconnect(format!(
                    "connection to agent {} broke: {e}",
                    conns.peer
                )));
                return;
            }
        }
        if rx.polled_until.load(Ordering::Acquire) > conns.now_ns() {
            continue; // a poller is reading: leave the answer to it
        }
        let reading = rx.lock.lock();
        if !io::readable_now(sock) {
            continue; // a poller read it meanwhile
        }
        let received = receive(conns, sock);
        drop(reading);
        match received {
            Ok(Got::Frame { body }) if body > POLL_BODY_BYTES => {} // keep the claim
            Ok(Got::Frame { .. } | Got::Idle) => {
                rx.reader_claim.store(false, Ordering::Release);
            }
            Ok(Got::Closed) => {
                conns.fail_all_as(
                    Error::RemoteDisconnect(format!("agent {} closed the connection", conns.peer)),
                    true,
                );
                return;
            }
            Err(e) => {
                conns.fail_all(e);
                return;
            }
        }
    }
}

/// What [`receive`] found on the socket.
enum Got {
    /// An answer with a body of this many bytes, handled.
    Frame { body: u32 },
    /// Nothing within the socket's read timeout.
    Idle,
    /// The peer closed the connection between frames.
    Closed,
}

/// Handles one answer from the peer.
fn receive(conns: &Conns, sock: &TcpStream) -> Result<Got> {
    let lost = |e: std::io::Error| {
        Error::RemoteDisconnect(format!("connection to agent {} broke: {e}", conns.peer))
    };
    let mut raw = [0u8; frame::HEADER_LEN];
    let mut idle = false;
    if !io::read_header(sock, &mut raw, &mut idle).map_err(lost)? {
        return Ok(if idle { Got::Idle } else { Got::Closed });
    }
    let h = Header::decode(&raw).map_err(|e| {
        Error::RemoteDisconnect(format!("agent {} sent a bad frame: {e}", conns.peer))
    })?;
    conns.progress();
    match h.kind {
        Kind::WriteAck | Kind::ReadResp if h.status() != 0 => {
            let mut reason = vec![0u8; (h.body_len as usize).min(frame::MAX_REASON as usize)];
            io::read_exact(sock, &mut reason).map_err(lost)?;
            io::discard(sock, u64::from(h.body_len) - reason.len() as u64).map_err(lost)?;
            if let Some(p) = conns.pending.lock().remove(&h.tag) {
                p.post
                    .settle(conns, Err(remote_error(&conns.peer, h.status(), &reason)));
            }
        }
        Kind::NotifRefused => {
            let mut reason = vec![0u8; h.body_len as usize];
            io::read_exact(sock, &mut reason).map_err(lost)?;
            conns.refused_notifs.fetch_add(1, Ordering::Relaxed);
            conns.outbox.acked(h.tag); // refused for good: not sent again
            error!(
                "Mooncake: agent {} refused a notification of {} bytes: {}",
                conns.peer,
                h.aux,
                String::from_utf8_lossy(&reason)
            );
        }
        Kind::NotifAck => conns.outbox.acked(h.tag),
        Kind::WriteAck => {
            if h.body_len != 0 {
                return Err(Error::RemoteDisconnect(format!(
                    "agent {} sent a malformed ack",
                    conns.peer
                )));
            }
            if let Some(p) = conns.pending.lock().remove(&h.tag) {
                if p.post.plan.op != Op::Write {
                    return Err(protocol_violation(
                        conns,
                        &p.post,
                        "answered a read with a write acknowledgement",
                    ));
                }
                p.post.settle(conns, Ok(()));
            }
        }
        Kind::ReadResp => {
            let pending = conns.pending.lock().remove(&h.tag);
            if let Some(p) = pending.as_ref().filter(|p| p.post.plan.op != Op::Read) {
                return Err(protocol_violation(
                    conns,
                    &p.post,
                    "answered a write with read data",
                ));
            }
            let Some(p) = pending else {
                // The request is gone (cancelled): drain its data elsewhere.
                io::discard(sock, u64::from(h.body_len)).map_err(lost)?;
                return Ok(Got::Frame { body: h.body_len });
            };
            if u64::from(h.body_len) != p.post.frame_bytes(p.frame) {
                let what = format!(
                    "answered a read of {} bytes with {}",
                    p.post.frame_bytes(p.frame),
                    h.body_len
                );
                return Err(protocol_violation(conns, &p.post, &what));
            }
            if let Some(context) = p.post.device_context(p.frame) {
                return receive_staged(conns, sock, &p, context, h.body_len);
            }
            let ranges = p.post.local_ranges(p.frame);
            let mut got = 0;
            let abort = || conns.is_down();
            let waits = Waits {
                abort: &abort,
                stall: conns.stall(),
                deadline: None,
            };
            let frame = p.frame;
            // SAFETY: the local ranges lie in regions checked at prep time; for
            // each call `access` pins them and holds the post's cancel lock, so
            // no byte lands in them after a cancel or deregistration returned.
            let received = unsafe {
                io::recv_frame(
                    sock.as_raw_fd(),
                    &ranges,
                    &mut got,
                    &mut || p.post.access(frame),
                    Some(waits),
                )
            };
            match received {
                Ok(_) => p.post.settle(conns, Ok(())),
                Err(e) => {
                    // The frame left `pending`: settle it here, not in fail_all.
                    let e = lost(e);
                    p.post.settle(conns, Err(e.clone()));
                    return Err(e);
                }
            }
        }
        other => {
            return Err(Error::RemoteDisconnect(format!(
                "agent {} sent an unexpected {other:?} frame",
                conns.peer
            )));
        }
    }
    Ok(Got::Frame { body: h.body_len })
}

/// Receives a READ answer for GPU memory through a staging buffer,
/// pipelined ([`staging::recv_pipelined`]): the device copies each piece
/// into place under the post's cancel lock and pins, all waited for before
/// the frame settles.
fn receive_staged(
    conns: &Conns,
    sock: &TcpStream,
    p: &Pending,
    context: usize,
    body: u32,
) -> Result<Got> {
    let lost = |e: std::io::Error| {
        Error::RemoteDisconnect(format!("connection to agent {} broke: {e}", conns.peer))
    };
    let bounce = match staging::buffer(context, staging::PIPE_BYTES) {
        Ok(b) => b,
        Err(e) => {
            io::discard(sock, u64::from(body)).map_err(lost)?;
            p.post.settle(conns, Err(e));
            return Ok(Got::Frame { body });
        }
    };
    let abort = || conns.is_down();
    let waits = Waits {
        abort: &abort,
        stall: conns.stall(),
        deadline: None,
    };
    let mut recv = staging::socket_step(sock.as_raw_fd(), &bounce, waits, true, staging::always);
    let frame = p.frame;
    // Cancelled or failed: the data is thrown away.
    let mut hold = || Ok(p.post.access(frame).memory());
    let ranges = p.post.local_ranges(frame);
    // SAFETY: the local ranges lie in regions checked at prep time, pinned
    // (with the cancel lock) by `hold`'s guard while copies into them run,
    // so nothing lands after a cancel or deregistration returned.
    let received =
        unsafe { staging::recv_pipelined(context, &bounce, &ranges, &mut recv, &mut hold) };
    let result = match received {
        Ok(outcome) => outcome,
        Err(e) => {
            let e = lost(e);
            p.post.settle(conns, Err(e.clone()));
            return Err(e);
        }
    };
    p.post.settle(conns, result);
    Ok(Got::Frame { body })
}

/// The peer broke the protocol answering a frame of `post` (already out of
/// `pending`): settle it, and return the error that takes the connection down.
fn protocol_violation(conns: &Conns, post: &Arc<TcpPost>, what: &str) -> Error {
    let e = Error::RemoteDisconnect(format!("agent {} {what}", conns.peer));
    post.settle(conns, Err(e.clone()));
    e
}

fn remote_error(peer: &AgentName, status: i64, reason: &[u8]) -> Error {
    let msg = format!("agent {peer} refused: {}", String::from_utf8_lossy(reason));
    match i32::try_from(status).ok().and_then(Status::from_code) {
        Some(Status::NotAllowed) => Error::NotAllowed(msg),
        Some(Status::InvalidParam) => Error::InvalidParam(msg),
        Some(Status::NotFound) => Error::NotFound(msg),
        Some(Status::RemoteDisconnect) => Error::RemoteDisconnect(msg),
        _ => Error::Backend(msg),
    }
}
