//! One connected queue pair and what goes through it.
//!
//! - Initiator side ([`SendSide`]): a queue of work (slices of posts, then
//!   the notification parts that follow them), posted as far as the queue
//!   pair's depth allows (credits), in batches with one signalled work
//!   request each (or every quarter of the depth); completions free the
//!   credits and post more. Work requests complete in order, so a
//!   signalled completion also completes the unsignalled ones before it.
//! - Target side ([`RecvSide`]): a ring of receive buffers, always posted,
//!   into which initiators send notification parts.
//!
//! An error completion breaks the queue pair: it is moved to ERR (never
//! RESET: that drops work requests without completions), everything
//! outstanding completes with a flush, queued work fails with the first
//! error, and the endpoint is rebuilt for the next post.

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use parking_lot::Mutex;

use super::connect;
use super::notif::PassivePeer;
use super::verbs::{Mr, Pd, Qp, Verbs, sys};
use super::xfer::Xfer;
use crate::common::{Error, Result};
use crate::transport::Op;
use crate::wire::rdma::{NotifPart, PART_HEADER};

/// Bytes of one receive buffer (and so of one notification part).
pub const RECV_BUF: usize = 4096;
/// Message bytes one part carries.
pub const CHUNK: usize = RECV_BUF - PART_HEADER;
/// Receive buffers posted per target queue pair.
pub const RECV_SLOTS: usize = 32;
/// Part buffers per initiator queue pair (for parts too long to inline).
const PART_SLOTS: usize = 16;
/// Most work requests posted in one `ibv_post_send` call.
const BATCH: usize = 32;
/// Marks a receive's `wr_id`.
const RECV_FLAG: u64 = 1 << 63;

/// Memory the NIC reads or writes outside Rust's view: allocated here,
/// registered, and freed after its memory region was deregistered.
struct NicBuffer {
    ptr: *mut u8,
    len: usize,
}

// SAFETY: a plain allocation; accesses are coordinated by the owner (slots
// are used by one work request at a time).
unsafe impl Send for NicBuffer {}
// SAFETY: as above.
unsafe impl Sync for NicBuffer {}

impl NicBuffer {
    fn new(len: usize) -> NicBuffer {
        let b = vec![0u8; len].into_boxed_slice();
        NicBuffer {
            ptr: Box::into_raw(b).cast::<u8>(),
            len,
        }
    }

    fn addr(&self) -> u64 {
        self.ptr as u64
    }

    /// Copies `bytes` to `off`.
    fn write(&self, off: usize, bytes: &[u8]) {
        assert!(off + bytes.len() <= self.len);
        // SAFETY: in bounds (checked); the slot at `off` is not in use by
        // the NIC (its work request completed or was never posted).
        unsafe { std::ptr::copy_nonoverlapping(bytes.as_ptr(), self.ptr.add(off), bytes.len()) }
    }

    /// The `len` bytes at `off`, which the NIC finished writing.
    fn read(&self, off: usize, len: usize) -> Vec<u8> {
        assert!(off + len <= self.len);
        // SAFETY: in bounds (checked); the receive that wrote them
        // completed, and the slot is reposted only after this copy.
        unsafe { std::slice::from_raw_parts(self.ptr.add(off), len) }.to_vec()
    }
}

impl Drop for NicBuffer {
    fn drop(&mut self) {
        // SAFETY: the allocation made in `new`, freed once; its memory
        // region (declared before it in its owner) was deregistered first.
        drop(unsafe { Box::from_raw(std::ptr::slice_from_raw_parts_mut(self.ptr, self.len)) });
    }
}

/// Work requests a message part of `len` bytes takes.
pub fn part_wrs(len: usize) -> usize {
    len.div_ceil(CHUNK).max(1)
}

/// A notification part (or what is left of it) to post.
#[derive(Clone)]
pub struct Part {
    /// The notification's id.
    pub id: u64,
    /// How many parts it has.
    pub parts: u16,
    /// This part's number.
    pub index: u16,
    /// The message (`None`: a fence).
    pub msg: Option<Arc<Vec<u8>>>,
    /// The next chunk to post.
    pub chunk: u32,
    /// The message's chunks (0 for a fence).
    pub chunks: u32,
}

impl Part {
    /// Part `index` of `parts` of notification `id`, carrying `msg` (or a
    /// fence).
    pub fn new(id: u64, parts: u16, index: u16, msg: Option<Arc<Vec<u8>>>) -> Part {
        Part {
            id,
            parts,
            index,
            chunks: msg.as_ref().map_or(0, |m| part_wrs(m.len()) as u32),
            msg,
            chunk: 0,
        }
    }

    /// Work requests still to post.
    pub fn wrs_left(&self) -> usize {
        (self.chunks.max(1) - self.chunk) as usize
    }
}

/// Which slices of a post a piece of work moves.
enum Sel {
    /// `next`, `next + stride`, ...
    Stride { next: usize, stride: usize },
    /// These, in order (slices moved here from a broken queue pair).
    List(VecDeque<usize>),
}

impl Sel {
    fn take(&mut self, n: usize) -> Option<usize> {
        match self {
            Sel::Stride { next, stride } if *next < n => {
                let i = *next;
                *next += *stride;
                Some(i)
            }
            Sel::Stride { .. } => None,
            Sel::List(l) => l.pop_front(),
        }
    }

    fn rest(self, n: usize) -> Vec<usize> {
        match self {
            Sel::Stride { next, stride } => (next..n).step_by(stride).collect(),
            Sel::List(l) => l.into(),
        }
    }
}

/// Work of one post on one queue pair: its slices, then its notification
/// part.
struct Work {
    xfer: Arc<Xfer>,
    sel: Sel,
    part: Option<Part>,
}

/// What a posted work request carries.
enum Carries {
    Slice(usize),
    /// One chunk of a part (`chunk` is this work request's).
    Chunk(Part),
}

impl Work {
    /// Work requests of it not posted yet.
    fn unposted(&self) -> usize {
        let n = self.xfer.slices.len();
        let slices = match &self.sel {
            Sel::Stride { next, stride } if *next < n => (n - next).div_ceil(*stride),
            Sel::Stride { .. } => 0,
            Sel::List(l) => l.len(),
        };
        slices + self.part.as_ref().map_or(0, Part::wrs_left)
    }
}

/// A posted work request not completed yet.
struct Out {
    seq: u64,
    xfer: Arc<Xfer>,
    slot: Option<usize>,
    carries: Carries,
}

/// What a queue pair that broke leaves of one post: moved to another
/// queue pair when the failure was the link's (the peer did not answer).
#[derive(Default)]
pub struct Salvage {
    /// Slices not known to have landed.
    pub slices: Vec<usize>,
    /// Notification parts not known to have arrived, from their first
    /// unconfirmed chunk.
    pub parts: Vec<Part>,
}

impl Salvage {
    /// Work requests it stands for.
    pub fn wrs(&self) -> usize {
        self.slices.len() + self.parts.iter().map(Part::wrs_left).sum::<usize>()
    }

    fn add_part(&mut self, p: Part) {
        match self
            .parts
            .iter_mut()
            .find(|q| q.id == p.id && q.index == p.index)
        {
            Some(q) => q.chunk = q.chunk.min(p.chunk),
            None => self.parts.push(p),
        }
    }
}

struct SendState {
    next_seq: u64,
    out: VecDeque<Out>,
    unsignaled: usize,
    work: VecDeque<Work>,
    free_slots: Vec<usize>,
    /// After a link failure: what to move elsewhere once every work request
    /// outstanding here has completed (flushed).
    salvage: Vec<(Arc<Xfer>, Salvage)>,
}

impl SendState {
    fn salvage_of(&mut self, x: &Arc<Xfer>) -> &mut Salvage {
        let i = match self.salvage.iter().position(|(y, _)| Arc::ptr_eq(x, y)) {
            Some(i) => i,
            None => {
                self.salvage.push((x.clone(), Salvage::default()));
                self.salvage.len() - 1
            }
        };
        &mut self.salvage[i].1
    }

    fn salvage_out(&mut self, o: Out) {
        if let Some(slot) = o.slot {
            self.free_slots.push(slot);
        }
        let sv = self.salvage_of(&o.xfer);
        match o.carries {
            Carries::Slice(i) => sv.slices.push(i),
            Carries::Chunk(p) => sv.add_part(p),
        }
    }

    fn salvage_work(&mut self, w: Work) {
        let n = w.xfer.slices.len();
        let sv = self.salvage_of(&w.xfer);
        sv.slices.extend(w.sel.rest(n));
        if let Some(p) = w.part {
            sv.add_part(p);
        }
    }
}

/// True for failures of the link (the peer did not answer, the queue pair
/// was flushed after that): the work may go over another NIC pair.
fn link_failure(e: &Error) -> bool {
    matches!(e, Error::RemoteDisconnect(_))
}

/// The initiator side of a queue pair.
pub struct SendSide {
    depth: usize,
    /// The depth asked for (what the completion queue budget counted).
    depth_asked: usize,
    inline: u32,
    state: Mutex<SendState>,
    /// Declared before `buf`: deregistered before it is freed.
    slots_mr: Mr,
    buf: NicBuffer,
}

/// The target side of a queue pair.
pub struct RecvSide {
    /// Whose notifications arrive here.
    pub peer: Arc<PassivePeer>,
    posted: AtomicUsize,
    /// Declared before `buf`: deregistered before it is freed.
    mr: Mr,
    buf: NicBuffer,
}

/// One connected queue pair.
pub struct QpConn {
    /// The queue pair.
    pub qp: Qp,
    /// Index of the local NIC (in the transport's list).
    pub nic: usize,
    /// Index of the peer's NIC (in its connection info's list).
    pub remote_nic: usize,
    verbs: &'static Verbs,
    send: Option<SendSide>,
    recv: Option<RecvSide>,
    broken: Mutex<Option<Error>>,
    retired: AtomicBool,
    /// Told when the queue pair breaks, with why (the initiator's route,
    /// to rebuild).
    on_break: Mutex<Option<BreakHook>>,
    /// Retire once nothing is queued or in flight (a healthy queue pair of
    /// a generation that was replaced).
    closing: AtomicBool,
}

/// Told when a queue pair breaks, with why.
pub type BreakHook = Arc<dyn Fn(&Error) + Send + Sync>;

/// What to create a queue pair for.
pub enum Side {
    /// Initiator: send queue of `depth`, `inline` bytes of inline data.
    Send {
        /// Send queue depth.
        depth: usize,
    },
    /// Target: receive buffers for `peer`'s notifications.
    Recv(Arc<PassivePeer>),
}

impl QpConn {
    /// A queue pair on `pd` with completions on `cq` (for NIC `nic`,
    /// connecting to the peer's NIC `remote_nic`), in RESET.
    ///
    /// # Errors
    /// When the NIC refuses the queue pair or its buffers.
    pub fn create(
        pd: &Arc<Pd>,
        cq: &Arc<super::verbs::Cq>,
        (nic, remote_nic): (usize, usize),
        side: Side,
    ) -> Result<QpConn> {
        let (send_wr, recv_wr) = match &side {
            Side::Send { depth } => (*depth as u32, 1),
            Side::Recv(_) => (1, RECV_SLOTS as u32),
        };
        let cap = sys::QpCap {
            max_send_wr: send_wr,
            max_recv_wr: recv_wr,
            max_send_sge: 1,
            max_recv_sge: 1,
            max_inline_data: 64,
        };
        let qp = pd.create_rc_qp(cq, cq, cap)?;
        let verbs = pd.context().verbs();
        let (send, recv) = match side {
            Side::Send { depth } => {
                let buf = NicBuffer::new(PART_SLOTS * RECV_BUF);
                // SAFETY: `buf` lives as long as the MR (declared after it).
                let slots_mr = unsafe { pd.reg_mr(buf.addr(), buf.len, sys::ACCESS_LOCAL_WRITE) }?;
                let asked = depth;
                let depth = (qp.cap.max_send_wr as usize).min(depth).max(2);
                (
                    Some(SendSide {
                        depth,
                        depth_asked: asked,
                        inline: qp.cap.max_inline_data,
                        state: Mutex::new(SendState {
                            next_seq: 1,
                            out: VecDeque::new(),
                            unsignaled: 0,
                            work: VecDeque::new(),
                            free_slots: (0..PART_SLOTS).collect(),
                            salvage: Vec::new(),
                        }),
                        slots_mr,
                        buf,
                    }),
                    None,
                )
            }
            Side::Recv(peer) => {
                let buf = NicBuffer::new(RECV_SLOTS * RECV_BUF);
                // SAFETY: as above.
                let mr = unsafe { pd.reg_mr(buf.addr(), buf.len, sys::ACCESS_LOCAL_WRITE) }?;
                (
                    None,
                    Some(RecvSide {
                        peer,
                        posted: AtomicUsize::new(0),
                        mr,
                        buf,
                    }),
                )
            }
        };
        Ok(QpConn {
            qp,
            nic,
            remote_nic,
            verbs,
            send,
            recv,
            broken: Mutex::new(None),
            retired: AtomicBool::new(false),
            on_break: Mutex::new(None),
            closing: AtomicBool::new(false),
        })
    }

    /// Tells `f` when the queue pair breaks (it must not own this queue
    /// pair).
    pub fn on_break(&self, f: BreakHook) {
        *self.on_break.lock() = Some(f);
    }

    /// Retires the queue pair once nothing is queued or in flight on it.
    pub fn close_when_idle(&self) {
        self.closing.store(true, Ordering::Release);
        self.retire_if_idle();
    }

    fn retire_if_idle(&self) {
        if !self.closing.load(Ordering::Acquire) || self.retired.load(Ordering::Acquire) {
            return;
        }
        let idle = self.send.as_ref().is_none_or(|s| {
            let st = s.state.lock();
            st.out.is_empty() && st.work.is_empty() && st.salvage.is_empty()
        });
        if idle {
            self.retire();
        }
    }

    /// Posts every receive buffer (a target queue pair, before it is
    /// announced to the initiator).
    ///
    /// # Errors
    /// When the NIC refuses.
    pub fn post_receives(&self) -> Result<()> {
        let Some(r) = &self.recv else { return Ok(()) };
        for slot in 0..RECV_SLOTS {
            self.post_receive(r, slot)?;
        }
        Ok(())
    }

    fn post_receive(&self, r: &RecvSide, slot: usize) -> Result<()> {
        let mut sge = sys::Sge {
            addr: r.buf.addr() + (slot * RECV_BUF) as u64,
            length: RECV_BUF as u32,
            lkey: r.mr.lkey,
        };
        let mut wr = sys::RecvWr {
            wr_id: RECV_FLAG | slot as u64,
            next: std::ptr::null_mut(),
            sg_list: &mut sge,
            num_sge: 1,
        };
        r.posted.fetch_add(1, Ordering::AcqRel);
        // SAFETY: the SGE names a slot of our registered buffer, which no
        // one touches until its receive completes.
        let posted = unsafe { self.qp.post_recv(&mut wr) };
        if posted.is_err() {
            r.posted.fetch_sub(1, Ordering::AcqRel);
        }
        posted
    }

    /// Queues `slices` of `xfer` from index `first` every `stride`, then
    /// (when set) the notification part `part`, and posts what the credits
    /// allow.
    pub fn push(&self, xfer: &Arc<Xfer>, (first, stride): (usize, usize), part: Option<Part>) {
        self.queue(Work {
            xfer: xfer.clone(),
            sel: Sel::Stride {
                next: first,
                stride: stride.max(1),
            },
            part,
        });
    }

    /// Queues a notification part alone (see [`Self::push`]).
    pub fn push_part(&self, xfer: &Arc<Xfer>, part: Part) {
        self.push(xfer, (xfer.slices.len(), 1), Some(part));
    }

    /// Queues what another queue pair left of `xfer` when it broke: its
    /// slices, then its parts (each after the slices, so a part still
    /// arrives after the data it vouches for).
    pub fn push_salvage(&self, xfer: &Arc<Xfer>, sv: Salvage) {
        let Salvage { slices, parts } = sv;
        let mut part = parts.into_iter();
        self.queue(Work {
            xfer: xfer.clone(),
            sel: Sel::List(slices.into()),
            part: part.next(),
        });
        for p in part {
            self.queue(Work {
                xfer: xfer.clone(),
                sel: Sel::List(VecDeque::new()),
                part: Some(p),
            });
        }
    }

    fn queue(&self, work: Work) {
        if let Some(s) = &self.send {
            s.state.lock().work.push_back(work);
        }
        self.pump();
    }

    /// Posts queued work while credits last; on a broken queue pair, fails
    /// it or keeps it to move elsewhere, and moves it once nothing is
    /// outstanding here any more.
    pub fn pump(&self) {
        let Some(s) = &self.send else { return };
        let mut finished: Vec<(Arc<Xfer>, usize, Option<Error>)> = Vec::new();
        let mut moved = Vec::new();
        let mut failed = None;
        {
            let mut st = s.state.lock();
            let broken = self.broken.lock().clone();
            if let Some(e) = broken {
                let moves = link_failure(&e) && !self.retired.load(Ordering::Acquire);
                while let Some(w) = st.work.pop_front() {
                    if moves {
                        st.salvage_work(w);
                    } else {
                        let n = w.unposted();
                        finished.push((w.xfer, n, Some(e.clone())));
                    }
                }
                if st.out.is_empty() && !st.salvage.is_empty() {
                    moved = std::mem::take(&mut st.salvage)
                        .into_iter()
                        .map(|(x, sv)| (x, sv, e.clone()))
                        .collect();
                }
            } else {
                while st.out.len() < s.depth && !st.work.is_empty() {
                    let before = st.next_seq;
                    if let Err(e) = self.post_batch(s, &mut st, &mut finished) {
                        failed = Some(e);
                        break;
                    }
                    if st.next_seq == before {
                        break; // waiting for a part buffer
                    }
                }
            }
        }
        for (x, n, e) in finished {
            x.done(n, e);
        }
        for (x, sv, e) in moved {
            let n = sv.wrs();
            if !x.retry((self.nic, self.qp.qp_num), sv) {
                x.done(n, Some(e));
            }
        }
        if let Some(e) = failed {
            // Fails (or keeps for elsewhere) the queued work, through `pump`.
            self.break_with(e);
        }
    }

    /// Builds and posts one batch (at most [`BATCH`] work requests, within
    /// the credits).
    fn post_batch(
        &self,
        s: &SendSide,
        st: &mut SendState,
        finished: &mut Vec<(Arc<Xfer>, usize, Option<Error>)>,
    ) -> Result<()> {
        let room = (s.depth - st.out.len()).min(BATCH);
        let mut wrs: Vec<sys::SendWr> = Vec::with_capacity(room);
        let mut sges: Vec<sys::Sge> = Vec::with_capacity(room);
        // Inline part bytes, alive until the post returns.
        let mut inline: Vec<Vec<u8>> = Vec::with_capacity(room);
        let mut outs: Vec<Out> = Vec::with_capacity(room);
        while wrs.len() < room {
            let Some(w) = st.work.front_mut() else { break };
            if w.xfer.stopped() {
                let w = st.work.pop_front().expect("front exists");
                finished.push((w.xfer.clone(), w.unposted(), None));
                continue;
            }
            let xfer = w.xfer.clone();
            if let Some(i) = w.sel.take(xfer.slices.len()) {
                let sl = xfer.slices[i];
                let region = &xfer.plan.remote_regions[sl.remote as usize];
                let rkey = region.rdma.as_ref().and_then(|k| {
                    k.rkey(
                        self.remote_nic,
                        region.addr,
                        sl.remote_addr,
                        u64::from(sl.len),
                    )
                });
                let Some(rkey) = rkey else {
                    finished.push((
                        xfer.clone(),
                        1,
                        Some(Error::InvalidParam(format!(
                            "RDMA: no key of the peer's NIC {} for {:#x}+{}",
                            self.remote_nic, sl.remote_addr, sl.len
                        ))),
                    ));
                    continue;
                };
                let lkey = xfer.locals[sl.local as usize].lkey(self.nic, sl.local_addr);
                let write = xfer.plan.op == Op::Write;
                sges.push(sys::Sge {
                    addr: sl.local_addr,
                    length: sl.len,
                    lkey,
                });
                wrs.push(sys::SendWr {
                    wr_id: st.next_seq,
                    num_sge: 1,
                    opcode: if write {
                        sys::WR_RDMA_WRITE
                    } else {
                        sys::WR_RDMA_READ
                    },
                    // (Never GPU memory inline: the CPU would read it.)
                    send_flags: if write
                        && sl.len <= s.inline
                        && !xfer.locals[sl.local as usize].device
                    {
                        sys::SEND_INLINE
                    } else {
                        0
                    },
                    rdma: sys::RdmaWr {
                        remote_addr: sl.remote_addr,
                        rkey,
                    },
                    ..Default::default()
                });
                outs.push(Out {
                    seq: st.next_seq,
                    xfer,
                    slot: None,
                    carries: Carries::Slice(i),
                });
                st.next_seq += 1;
                continue;
            }
            let Some(p) = w.part.as_mut() else {
                st.work.pop_front();
                continue;
            };
            let bytes: &[u8] = match &p.msg {
                Some(m) => {
                    let start = p.chunk as usize * CHUNK;
                    &m[start..(start + CHUNK).min(m.len())]
                }
                None => &[],
            };
            let mut wire = Vec::with_capacity(PART_HEADER + bytes.len());
            NotifPart {
                id: p.id,
                parts: p.parts,
                index: p.index,
                chunk: p.chunk,
                chunks: p.chunks,
                bytes,
            }
            .encode_into(&mut wire);
            let (sge, flags, slot) = if wire.len() as u32 <= s.inline {
                let sge = sys::Sge {
                    addr: wire.as_ptr() as u64,
                    length: wire.len() as u32,
                    lkey: 0,
                };
                inline.push(wire);
                (sge, sys::SEND_INLINE, None)
            } else {
                let Some(slot) = st.free_slots.pop() else {
                    break; // wait for a part buffer
                };
                s.buf.write(slot * RECV_BUF, &wire);
                let sge = sys::Sge {
                    addr: s.buf.addr() + (slot * RECV_BUF) as u64,
                    length: wire.len() as u32,
                    lkey: s.slots_mr.lkey,
                };
                (sge, 0, Some(slot))
            };
            sges.push(sge);
            wrs.push(sys::SendWr {
                wr_id: st.next_seq,
                num_sge: 1,
                opcode: sys::WR_SEND,
                send_flags: flags,
                ..Default::default()
            });
            outs.push(Out {
                seq: st.next_seq,
                xfer: xfer.clone(),
                slot,
                carries: Carries::Chunk(p.clone()),
            });
            st.next_seq += 1;
            p.chunk += 1;
            if p.chunk >= p.chunks.max(1) {
                st.work.pop_front();
            }
        }
        if wrs.is_empty() {
            return Ok(());
        }
        // Signal the last of the batch, and often enough that credits
        // come back before the queue fills.
        let every = (s.depth / 4).max(1);
        let last = wrs.len() - 1;
        for (i, wr) in wrs.iter_mut().enumerate() {
            st.unsignaled += 1;
            if i == last || st.unsignaled >= every {
                wr.send_flags |= sys::SEND_SIGNALED;
                st.unsignaled = 0;
            }
        }
        // The chain, through raw pointers into the two vectors (which do
        // not move from here until the post returned).
        let (base, sbase) = (wrs.as_mut_ptr(), sges.as_mut_ptr());
        for i in 0..wrs.len() {
            // SAFETY: `i` and `i + 1` (when linked) are in bounds of the
            // vectors, whose buffers stay put until after the post.
            unsafe {
                (*base.add(i)).sg_list = sbase.add(i);
                (*base.add(i)).next = if i < last {
                    base.add(i + 1)
                } else {
                    std::ptr::null_mut()
                };
            }
        }
        let n = outs.len();
        st.out.extend(outs);
        // SAFETY: the chain and its SGEs live until the call returns; the
        // memory they name is registered: slices lie in regions held in
        // flight by their post (until their completion), part buffers are
        // ours, inline bytes are copied by the call.
        let posted = unsafe { self.qp.post_send(base) };
        drop(inline);
        if let Err((e, bad)) = posted {
            // The work requests before the refused one are on the NIC and
            // stay outstanding; from it on, none is.
            let at = (bad as usize)
                .checked_sub(base as usize)
                .map(|off| off / std::mem::size_of::<sys::SendWr>())
                .filter(|&i| i < n && !bad.is_null())
                .unwrap_or(0);
            for _ in at..n {
                if let Some(o) = st.out.pop_back() {
                    if let Some(slot) = o.slot {
                        st.free_slots.push(slot);
                    }
                    finished.push((o.xfer, 1, Some(e.clone())));
                }
            }
            return Err(e);
        }
        Ok(())
    }

    /// Handles one completion of this queue pair.
    pub fn complete(&self, wc: &sys::Wc) {
        if wc.wr_id & RECV_FLAG != 0 {
            self.complete_recv(wc);
        } else {
            self.complete_send(wc);
        }
    }

    fn complete_send(&self, wc: &sys::Wc) {
        let Some(s) = &self.send else { return };
        let failed = (wc.status != sys::WC_SUCCESS).then(|| self.wc_error(wc.status));
        let was_broken = self.broken.lock().clone();
        let mut finished: Vec<(Arc<Xfer>, usize, Option<Error>)> = Vec::new();
        {
            let mut st = s.state.lock();
            while st.out.front().is_some_and(|o| o.seq <= wc.wr_id) {
                let o = st.out.pop_front().expect("front exists");
                // Completions come in order: before the one reported, every
                // work request succeeded, unless the queue pair had broken
                // already (then they were flushed).
                let e = match (&was_broken, &failed) {
                    (Some(b), _) => Some(b.clone()),
                    (None, Some(f)) if o.seq == wc.wr_id => Some(f.clone()),
                    _ => None,
                };
                match e {
                    // A link failure (not our own closing): the work moves.
                    Some(e) if link_failure(&e) && !self.retired.load(Ordering::Acquire) => {
                        st.salvage_out(o)
                    }
                    e => {
                        if let Some(slot) = o.slot {
                            st.free_slots.push(slot);
                        }
                        match finished.last_mut() {
                            Some((x, n, le))
                                if Arc::ptr_eq(x, &o.xfer) && le.is_none() == e.is_none() =>
                            {
                                *n += 1
                            }
                            _ => finished.push((o.xfer, 1, e)),
                        }
                    }
                }
            }
        }
        for (x, n, e) in finished {
            x.done(n, e);
        }
        if let Some(e) = failed {
            self.break_with(e);
        }
        // Posts more (credits came back), or, broken, moves what is left.
        self.pump();
        self.retire_if_idle();
    }

    fn complete_recv(&self, wc: &sys::Wc) {
        let Some(r) = &self.recv else { return };
        r.posted.fetch_sub(1, Ordering::AcqRel);
        if wc.status != sys::WC_SUCCESS {
            if wc.status != sys::WC_WR_FLUSH_ERR {
                self.break_with(self.wc_error(wc.status));
            }
            return;
        }
        let slot = (wc.wr_id & !RECV_FLAG) as usize;
        if slot >= RECV_SLOTS {
            return;
        }
        let len = (wc.byte_len as usize).min(RECV_BUF);
        let bytes = r.buf.read(slot * RECV_BUF, len);
        if !self.retired.load(Ordering::Acquire)
            && let Err(e) = self.post_receive(r, slot)
        {
            log::warn!("Mooncake: RDMA: cannot repost a receive buffer: {e}");
        }
        r.peer.part(&bytes);
    }

    /// The error a failed completion stands for.
    fn wc_error(&self, status: i32) -> Error {
        let what = self.verbs.status_str(status);
        match status {
            sys::WC_REM_ACCESS_ERR => Error::NotAllowed(format!(
                "RDMA: the peer's NIC refused the access ({what}): the region was deregistered, \
                 or the key or range is wrong"
            )),
            sys::WC_RETRY_EXC_ERR | sys::WC_RNR_RETRY_EXC_ERR => Error::RemoteDisconnect(format!(
                "RDMA: the peer does not answer on its link ({what}): it is gone or unreachable"
            )),
            sys::WC_WR_FLUSH_ERR => {
                Error::RemoteDisconnect(format!("RDMA: the queue pair to the peer failed ({what})"))
            }
            _ => Error::Backend(format!("RDMA: work request failed: {what}")),
        }
    }

    /// Marks the queue pair broken by `e` (the first error stays), moves it
    /// to ERR so that everything outstanding flushes, and tells its owner.
    pub fn break_with(&self, e: Error) {
        {
            let mut b = self.broken.lock();
            if b.is_some() {
                return;
            }
            log::warn!("Mooncake: RDMA queue pair {} broke: {e}", self.qp.qp_num);
            *b = Some(e);
        }
        if let Err(e) = connect::to_error(&self.qp) {
            log::warn!("Mooncake: RDMA queue pair {}: {e}", self.qp.qp_num);
        }
        let f = self.on_break.lock().clone();
        if let Some(f) = f {
            let why = self.broken.lock().clone();
            if let Some(why) = why {
                f(&why);
            }
        }
        self.pump();
    }

    /// True once broken.
    pub fn is_broken(&self) -> bool {
        self.broken.lock().is_some()
    }

    /// Stops the queue pair for good: to ERR, so its work flushes; it is
    /// destroyed once [`Self::drained`].
    pub fn retire(&self) {
        self.retired.store(true, Ordering::Release);
        {
            let mut b = self.broken.lock();
            if b.is_none() {
                *b = Some(Error::RemoteDisconnect("RDMA: queue pair closed".into()));
            }
        }
        if let Err(e) = connect::to_error(&self.qp) {
            log::debug!("Mooncake: RDMA queue pair {}: {e}", self.qp.qp_num);
        }
        self.pump();
    }

    /// Ends every post with work here, without waiting for the NIC (its
    /// completion thread stopped: the engine is going, and the queue pair
    /// was moved to ERR, so the NIC does nothing more for it).
    pub fn abandon(&self) {
        let Some(s) = &self.send else { return };
        let mut left: Vec<(Arc<Xfer>, usize)> = Vec::new();
        {
            let mut st = s.state.lock();
            for o in st.out.drain(..) {
                left.push((o.xfer, 1));
            }
            for w in std::mem::take(&mut st.work) {
                let n = w.unposted();
                left.push((w.xfer, n));
            }
            for (x, sv) in std::mem::take(&mut st.salvage) {
                let n = sv.wrs();
                left.push((x, n));
            }
        }
        let gone = Error::RemoteDisconnect("RDMA: the engine is shutting down".into());
        for (x, n) in left {
            x.done(n, Some(gone.clone()));
        }
    }

    /// The token of the peer a target queue pair serves (`None` for an
    /// initiator's).
    pub fn recv_peer_token(&self) -> Option<u128> {
        self.recv.as_ref().map(|r| r.peer.token)
    }

    /// Completion queue entries this queue pair was promised.
    pub fn cq_entries(&self) -> usize {
        match (&self.send, &self.recv) {
            (Some(s), _) => s.depth_asked + 1,
            _ => RECV_SLOTS + 1,
        }
    }

    /// True once retired with nothing outstanding on the NIC.
    pub fn drained(&self) -> bool {
        self.retired.load(Ordering::Acquire)
            && self.send.as_ref().is_none_or(|s| {
                let st = s.state.lock();
                st.out.is_empty() && st.salvage.is_empty()
            })
            && self
                .recv
                .as_ref()
                .is_none_or(|r| r.posted.load(Ordering::Acquire) == 0)
    }
}
