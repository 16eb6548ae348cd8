//! GPU memory over TCP: frames whose memory is on a device move through a
//! pinned host buffer ([`cuda::HostBuffer`]).
//!
//! - Sending (an initiator's WRITE, a target's READ answer): the device
//!   copies a piece of the frame into the buffer, which is then sent
//!   ([`send_pipelined`]). An initiator's frame asks the post, before every
//!   system call, whether its bytes may still go: none of it goes once the
//!   post was released or a region's deregistration started (zeros go
//!   instead), as for host memory. Frames of at most one piece (those a
//!   posting thread sends itself) are copied whole ([`gather`]) and waited
//!   for before the send.
//! - Receiving (a target's WRITE, an initiator's READ answer): each piece is
//!   received into the buffer, then the device copies it into the ranges
//!   ([`recv_pipelined`]), all waited for before the frame is acknowledged
//!   (target) or settled (initiator): an acknowledgement, and so a
//!   notification, means the bytes are in device memory.
//!
//! Pieces of [`PIECE`] bytes alternate between the two halves of one
//! buffer, so that the device copy of one piece runs while the next is on
//! the socket; frames of one post travel on several streams at once, so the
//! device copies of one frame also overlap the socket I/O of others. The
//! copies run under the caller's pins (and cancel lock or connection
//! fence), so deregistration and release wait for them as they wait for a
//! system call. No thread waits on the network while a copy it queued may
//! still run: before a socket call that would wait, the device is waited
//! for and the pins are let go (taken again for the next copy).

use std::os::fd::RawFd;

use super::io::{self, Access, RawRange, Waits};
use crate::common::{Error, LocalRegion, Result};
use crate::cuda::{self, Copier, HostBuffer};
use crate::wire::region::range_within;

/// Bytes of one piece of a pipelined frame.
pub const PIECE: usize = 256 << 10;

/// The size of a pipelined staging buffer: two pieces.
pub const PIPE_BYTES: usize = 2 * PIECE;

/// How a [`SocketStep`] is called.
#[derive(Clone, Copy, Debug)]
pub struct Step {
    /// Move all of the piece, waiting on the socket as needed; else only
    /// what the socket takes or has now.
    pub wait: bool,
    /// The pipeline holds `hold`'s guard during the call (so the memory the
    /// piece comes from or goes to cannot go away meanwhile, and the step
    /// must not take that guard again).
    pub held: bool,
}

/// Moves one piece between the socket and a range of the staging buffer,
/// from byte `*done` of it on, as [`Step`] says. Returns the I/O error that
/// ends the frame.
pub type SocketStep<'a> = dyn FnMut(RawRange, &mut usize, Step) -> std::io::Result<()> + 'a;

/// The [`SocketStep`] of a pipelined frame on socket `fd`: receives into
/// (`recv`) or sends from a range of `bounce`, waiting as `waits` says when
/// asked to. Before each system call it asks `access` whether the buffer's
/// bytes may move (zeros go, or the bytes are thrown away, when not). A
/// range outside `bounce` is refused.
pub fn socket_step<'a, G>(
    fd: RawFd,
    bounce: &'a HostBuffer,
    waits: Waits<'a>,
    recv: bool,
    mut access: impl FnMut(Step) -> Access<G> + 'a,
) -> impl FnMut(RawRange, &mut usize, Step) -> std::io::Result<()> + 'a {
    move |buf: RawRange, done: &mut usize, step: Step| {
        if !range_within(bounce.addr(), bounce.len() as u64, buf.addr, buf.len as u64) {
            return Err(std::io::Error::other("a range outside the staging buffer"));
        }
        let waits = step.wait.then_some(waits);
        let mut access = || access(step);
        // SAFETY: `buf` lies in `bounce` (checked above), our own staging
        // buffer, which no other code uses while the pipeline runs.
        unsafe {
            if recv {
                io::recv_frame(fd, &[buf], done, &mut access, waits)
            } else {
                io::send_frame(fd, &[], &[buf], done, &mut access, waits)
            }
        }
        .map(|_| ())
    }
}

/// A [`socket_step`] `access` for a buffer whose bytes may always move.
pub fn always(_: Step) -> Access<()> {
    Access::Memory(())
}

/// What keeps the GPU ranges of a frame usable while device copies into or
/// out of them run (pins, locks), taken before queueing copies and let go
/// once they were waited for. `Ok(None)`: the data is to be thrown away
/// (the transfer stopped), without an error.
pub type Hold<'a, G> = dyn FnMut() -> Result<Option<G>> + 'a;

/// Receives `ranges`' bytes from the socket (`recv`) and copies them into
/// `ranges` on the device, a [`PIECE`] at a time through the halves of
/// `bounce` (at least [`PIPE_BYTES`]): the copy of one piece overlaps the
/// receipt of the next. Returns the socket's error (which ends the frame),
/// else the outcome of the copies: the first error of the device or of
/// `hold`, after which the rest is received and thrown away. When it
/// returns, no copy of it runs any more.
///
/// # Safety
/// Every range must lie in GPU memory that stays allocated while `hold`'s
/// guard lives, and no other code may write it meanwhile.
pub unsafe fn recv_pipelined<G>(
    context: usize,
    bounce: &HostBuffer,
    ranges: &[RawRange],
    recv: &mut SocketStep<'_>,
    hold: &mut Hold<'_, G>,
) -> std::io::Result<Result<()>> {
    let total: usize = ranges.iter().map(|r| r.len).sum();
    let piece = PIECE.min(bounce.len() / 2).max(1);
    // Declared before the copier, so dropped after it: the copier's drop
    // waits for its copies before the guard lets the memory go.
    let mut held: Option<G> = None;
    let mut copier: Option<Copier<'static>> = None;
    let mut marked = [false; 2];
    let mut outcome: Result<()> = Ok(());
    let (mut off, mut k) = (0, 0);
    while off < total {
        let n = (total - off).min(piece);
        let half = k % 2;
        let buf = RawRange {
            addr: bounce.addr() + (half * piece) as u64,
            len: n,
        };
        // The copy out of this half two pieces ago must be done.
        if let (true, Some(c)) = (marked[half], copier.as_mut()) {
            marked[half] = false;
            if let Err(e) = c.wait_mark(half) {
                outcome = outcome.and(Err(e));
            }
        }
        let mut got = 0;
        recv(buf, &mut got, step(false, held.is_some()))?;
        if got < n {
            // About to wait on the network: nothing of ours may run on the
            // device with the memory held meanwhile.
            if let Some(c) = copier.as_mut()
                && let Err(e) = c.wait()
            {
                outcome = outcome.and(Err(e));
            }
            marked = [false; 2];
            held = None;
            recv(buf, &mut got, step(true, false))?;
        }
        if outcome.is_ok() && held.is_none() {
            match hold() {
                Ok(Some(g)) => held = Some(g),
                Ok(None) => {}
                Err(e) => outcome = Err(e),
            }
        }
        if outcome.is_ok() && held.is_some() {
            outcome = queue(&mut copier, context, |c| {
                let mut at = buf.addr;
                for w in window(ranges, off, n) {
                    // SAFETY: `w` lies in `ranges` (the caller's promise,
                    // kept while `held` lives, which outlives the copy);
                    // the half is ours until its mark was waited for.
                    unsafe { c.copy(w.addr, at, w.len as u64) }?;
                    at += w.len as u64;
                }
                c.mark(half)
            });
            marked[half] = outcome.is_ok();
        }
        off += n;
        k += 1;
    }
    if let Some(c) = copier.as_mut()
        && let Err(e) = c.wait()
    {
        outcome = outcome.and(Err(e));
    }
    drop(copier);
    drop(held);
    Ok(outcome)
}

/// Why [`send_pipelined`] stopped before the end of its frame.
#[derive(Debug)]
pub enum SendStop {
    /// The socket failed: the connection is lost.
    Socket(std::io::Error),
    /// The device (or `hold`) failed: the rest of the frame was not sent.
    Stage(Error),
}

impl std::fmt::Display for SendStop {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SendStop::Socket(e) => write!(f, "{e}"),
            SendStop::Stage(e) => write!(f, "staging GPU memory failed: {e}"),
        }
    }
}

/// Copies `ranges`' bytes out of the device and sends them (`send`), a
/// [`PIECE`] at a time through the halves of `bounce` (at least
/// [`PIPE_BYTES`]): the copy of the next piece overlaps the sending of one.
/// `still` is asked, while `hold`'s guard is held, before each further copy
/// under that guard (so `hold` need not be taken again to learn that the
/// transfer stopped). Returns `Ok(true)` when all went, `Ok(false)` when
/// `hold` or `still` said to stop, else why it stopped; in both cases the
/// rest of the frame was not sent (the caller completes it or ends the
/// connection).
///
/// # Safety
/// Every range must lie in GPU memory that stays allocated while `hold`'s
/// guard lives.
pub unsafe fn send_pipelined<G>(
    context: usize,
    bounce: &HostBuffer,
    ranges: &[RawRange],
    send: &mut SocketStep<'_>,
    hold: &mut Hold<'_, G>,
    still: &mut dyn FnMut() -> bool,
) -> std::result::Result<bool, SendStop> {
    let total: usize = ranges.iter().map(|r| r.len).sum();
    let piece = PIECE.min(bounce.len() / 2).max(1);
    let count = total.div_ceil(piece);
    let mut held: Option<G> = None;
    let mut copier: Option<Copier<'static>> = None;
    let failed = SendStop::Stage;
    // Queues the copy of piece `k` into its half, holding the memory.
    let mut gather = |copier: &mut Option<Copier<'static>>,
                      held: &mut Option<G>,
                      k: usize|
     -> std::result::Result<bool, SendStop> {
        if held.is_none() {
            match hold().map_err(failed)? {
                Some(g) => *held = Some(g),
                None => return Ok(false),
            }
        } else if !still() {
            return Ok(false);
        }
        let (off, half) = (k * piece, k % 2);
        let n = (total - off).min(piece);
        queue(copier, context, |c| {
            let mut at = bounce.addr() + (half * piece) as u64;
            for w in window(ranges, off, n) {
                // SAFETY: `w` lies in `ranges`, kept allocated while `held`
                // lives (which outlives the copy); the half is ours until
                // its mark was waited for.
                unsafe { c.copy(at, w.addr, w.len as u64) }?;
                at += w.len as u64;
            }
            c.mark(half)
        })
        .map_err(failed)?;
        Ok(true)
    };
    if count > 0 && !gather(&mut copier, &mut held, 0)? {
        return Ok(false);
    }
    for k in 0..count {
        let half = k % 2;
        let c = copier.as_mut().expect("a copy was queued");
        c.wait_mark(half).map_err(failed)?;
        if k + 1 < count && !gather(&mut copier, &mut held, k + 1)? {
            return Ok(false);
        }
        let n = (total - k * piece).min(piece);
        let buf = RawRange {
            addr: bounce.addr() + (half * piece) as u64,
            len: n,
        };
        let mut sent = 0;
        send(buf, &mut sent, step(false, held.is_some())).map_err(SendStop::Socket)?;
        if sent < n {
            // About to wait on the network: the next piece's copy first.
            if let Some(c) = copier.as_mut() {
                c.wait().map_err(failed)?;
            }
            held = None;
            send(buf, &mut sent, step(true, false)).map_err(SendStop::Socket)?;
        }
    }
    if let Some(c) = copier.as_mut() {
        c.wait().map_err(failed)?;
    }
    drop(copier);
    drop(held);
    Ok(true)
}

/// A [`Step`].
fn step(wait: bool, held: bool) -> Step {
    Step { wait, held }
}

/// Runs `queue` on the copier, made first if needed.
fn queue(
    copier: &mut Option<Copier<'static>>,
    context: usize,
    queue: impl FnOnce(&mut Copier<'static>) -> Result<()>,
) -> Result<()> {
    if copier.is_none() {
        *copier = Some(Copier::new(cuda::driver()?, context)?);
    }
    queue(copier.as_mut().expect("made above"))
}

/// The context to stage with, when one of `regions` is GPU memory.
pub fn device_context<'a>(regions: impl IntoIterator<Item = &'a LocalRegion>) -> Option<usize> {
    regions
        .into_iter()
        .find_map(|r| r.device.as_ref().map(|d| d.context))
}

/// A staging buffer for `len` bytes.
///
/// # Errors
/// Why the driver could not give one.
pub fn buffer(context: usize, len: usize) -> Result<HostBuffer> {
    HostBuffer::take(cuda::driver()?, context, len)
}

/// Copies `ranges` one after the other into the start of `bounce`, and
/// waits until the device is done.
///
/// # Errors
/// The device's error.
///
/// # Safety
/// Every range must stay allocated (registered and pinned) for the call,
/// and their total must fit in `bounce`.
pub unsafe fn gather(context: usize, ranges: &[RawRange], bounce: &HostBuffer) -> Result<()> {
    let mut copier = Copier::new(cuda::driver()?, context)?;
    let mut at = bounce.addr();
    for r in ranges.iter().filter(|r| r.len > 0) {
        // SAFETY: the caller keeps the range allocated; the buffer is ours
        // and fits (the caller's promise); both until the wait below.
        unsafe { copier.copy(at, r.addr, r.len as u64) }?;
        at += r.len as u64;
    }
    debug_assert!(at <= bounce.addr() + bounce.len() as u64);
    copier.wait()
}

/// The part `[offset, offset+len)` of the concatenation of `ranges`.
pub fn window(ranges: &[RawRange], offset: usize, len: usize) -> Vec<RawRange> {
    let (mut skip, mut left) = (offset, len);
    let mut out = Vec::new();
    for r in ranges {
        if left == 0 {
            break;
        }
        if skip >= r.len {
            skip -= r.len;
            continue;
        }
        let n = (r.len - skip).min(left);
        out.push(RawRange {
            addr: r.addr + skip as u64,
            len: n,
        });
        left -= n;
        skip = 0;
    }
    out
}

/// The whole of `bounce`'s first `len` bytes as one range.
pub fn range_of(bounce: &HostBuffer, len: usize) -> RawRange {
    RawRange {
        addr: bounce.addr(),
        len,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn windows_cut_the_concatenation_of_ranges() {
        let r = |addr, len| RawRange { addr, len };
        let ranges = [r(100, 10), r(200, 0), r(300, 5), r(400, 20)];
        assert_eq!(window(&ranges, 0, 10), vec![r(100, 10)]);
        assert_eq!(
            window(&ranges, 8, 10),
            vec![r(108, 2), r(300, 5), r(400, 3)]
        );
        assert_eq!(window(&ranges, 15, 20), vec![r(400, 20)]);
        assert_eq!(window(&ranges, 30, 100), vec![r(415, 5)]);
        assert!(window(&ranges, 35, 1).is_empty());
        let total: usize = (0..35)
            .step_by(7)
            .map(|o| window(&ranges, o, 7).iter().map(|w| w.len).sum::<usize>())
            .sum();
        assert_eq!(total, 35);
    }
}

#[cfg(test)]
mod pipeline_tests {
    use super::*;
    use crate::cuda::testing::fake;
    use std::io::{Read, Write};
    use std::os::fd::AsRawFd;
    use std::os::unix::net::UnixStream;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// Counts live guards of `hold`.
    struct Guard(Arc<AtomicUsize>);

    impl Drop for Guard {
        fn drop(&mut self) {
            self.0.fetch_sub(1, Ordering::SeqCst);
        }
    }

    /// Ranges of odd sizes over `len` bytes at `base` (crossing pieces).
    fn ranges(base: u64, len: usize) -> Vec<RawRange> {
        let mut out = Vec::new();
        let (mut at, mut i) = (0, 0);
        while at < len {
            let n = (100_000 + i * 77_777).min(len - at);
            out.push(RawRange {
                addr: base + at as u64,
                len: n,
            });
            at += n;
            i += 1;
        }
        out
    }

    /// A socket step over `s` in our own buffers: moves what the socket
    /// takes or has now, or all of it with `wait` (then it first checks
    /// that no guard lives: no thread waits on the network while it holds
    /// memory that copies may use). It checks that the pipeline says
    /// truly whether it holds a guard.
    fn step(
        s: &UnixStream,
        held: &Arc<AtomicUsize>,
        waited: &AtomicUsize,
        recv: bool,
    ) -> impl FnMut(RawRange, &mut usize, Step) -> std::io::Result<()> {
        let (fd, held) = (s.as_raw_fd(), held.clone());
        move |buf: RawRange, done: &mut usize, s: Step| {
            let live = held.load(Ordering::SeqCst);
            assert_eq!(s.held, live > 0, "the step is told whether memory is held");
            if s.wait {
                assert_eq!(live, 0, "waiting with memory held");
                waited.fetch_add(1, Ordering::SeqCst);
            }
            let (wait, flags) = (s.wait, if s.wait { 0 } else { libc::MSG_DONTWAIT });
            while *done < buf.len {
                let p = (buf.addr as usize + *done) as *mut libc::c_void;
                // SAFETY: the rest of `buf`, our own staging buffer.
                let n = unsafe {
                    if recv {
                        libc::recv(fd, p, buf.len - *done, flags)
                    } else {
                        libc::send(fd, p, buf.len - *done, flags)
                    }
                };
                if n < 0 {
                    let e = std::io::Error::last_os_error();
                    if !wait && e.kind() == std::io::ErrorKind::WouldBlock {
                        return Ok(());
                    }
                    return Err(e);
                }
                if n == 0 {
                    return Err(std::io::ErrorKind::UnexpectedEof.into());
                }
                *done += n as usize;
            }
            Ok(())
        }
    }

    #[test]
    fn pieces_land_in_order_and_the_network_is_never_waited_on_with_memory_held() {
        let gpu = fake();
        let _alone = gpu.exclusive();
        let len = 5 * PIECE + 12_345;
        let context = crate::cuda::primary_context(0).unwrap();
        let bounce = buffer(context, PIPE_BYTES).unwrap();
        let data: Vec<u8> = (0..len).map(|i| (i * 13 + 1) as u8).collect();
        let held = Arc::new(AtomicUsize::new(0));
        let mut hold = || {
            held.fetch_add(1, Ordering::SeqCst);
            Ok(Some(Guard(held.clone())))
        };

        // Receiving: the data comes in two bursts, so the receiver finds
        // the socket empty in the middle of the frame.
        let dev = gpu.alloc(0, len);
        let (mut tx, rx) = UnixStream::pair().unwrap();
        let waited = AtomicUsize::new(0);
        let feed = {
            let data = data.clone();
            std::thread::spawn(move || {
                tx.write_all(&data[..2 * PIECE + 1000]).unwrap();
                std::thread::sleep(std::time::Duration::from_millis(50));
                tx.write_all(&data[2 * PIECE + 1000..]).unwrap();
            })
        };
        let mut recv = step(&rx, &held, &waited, true);
        // SAFETY: `dev` is fake device memory of `len` bytes, kept until the
        // call returned; nothing else touches it.
        let outcome = unsafe {
            recv_pipelined(
                context,
                &bounce,
                &ranges(dev.ptr, len),
                &mut recv,
                &mut hold,
            )
        };
        feed.join().unwrap();
        assert!(matches!(outcome, Ok(Ok(()))), "{outcome:?}");
        assert!(gpu.read(dev.ptr, len) == data, "the bytes landed in order");
        assert!(
            waited.load(Ordering::SeqCst) > 0,
            "the receiver had to wait"
        );
        assert_eq!(held.load(Ordering::SeqCst), 0);
        assert_eq!(gpu.pending_copies(), 0, "no copy runs after it returned");

        // Sending: the reader takes the frame slowly, so the sender finds
        // the socket full.
        let (tx, mut rx) = UnixStream::pair().unwrap();
        let waited = AtomicUsize::new(0);
        let drain = std::thread::spawn(move || {
            let mut got = vec![0u8; len];
            for chunk in got.chunks_mut(64 << 10) {
                std::thread::sleep(std::time::Duration::from_millis(2));
                rx.read_exact(chunk).unwrap();
            }
            got
        });
        let mut send = step(&tx, &held, &waited, false);
        // SAFETY: as above.
        let sent = unsafe {
            send_pipelined(
                context,
                &bounce,
                &ranges(dev.ptr, len),
                &mut send,
                &mut hold,
                &mut || true,
            )
        };
        assert!(matches!(sent, Ok(true)), "{sent:?}");
        assert!(drain.join().unwrap() == data, "the bytes went out in order");
        assert!(waited.load(Ordering::SeqCst) > 0, "the sender had to wait");
        assert_eq!(held.load(Ordering::SeqCst), 0);
    }

    #[test]
    fn a_hold_that_says_stop_throws_the_data_away_and_an_error_is_the_outcome() {
        let gpu = fake();
        let len = 3 * PIECE;
        let context = crate::cuda::primary_context(0).unwrap();
        let bounce = buffer(context, PIPE_BYTES).unwrap();
        let dev = gpu.alloc(0, len);
        gpu.write(dev.ptr, &vec![9u8; len]);
        let held = Arc::new(AtomicUsize::new(0));
        let waited = AtomicUsize::new(0);
        for stop in [true, false] {
            let (mut tx, rx) = UnixStream::pair().unwrap();
            let feed = std::thread::spawn(move || tx.write_all(&vec![1u8; len]).unwrap());
            let mut recv = step(&rx, &held, &waited, true);
            let mut hold = || -> Result<Option<Guard>> {
                if stop {
                    Ok(None)
                } else {
                    Err(Error::NotAllowed("deregistered".into()))
                }
            };
            // SAFETY: as in the test above.
            let outcome = unsafe {
                recv_pipelined(
                    context,
                    &bounce,
                    &ranges(dev.ptr, len),
                    &mut recv,
                    &mut hold,
                )
            };
            feed.join().unwrap();
            match (stop, outcome) {
                (true, Ok(Ok(()))) | (false, Ok(Err(Error::NotAllowed(_)))) => {}
                (_, other) => panic!("stop {stop}: {other:?}"),
            }
            assert!(
                gpu.read(dev.ptr, len).iter().all(|&b| b == 9),
                "nothing landed"
            );
        }
    }

    #[test]
    fn a_sender_told_to_stop_copies_nothing_more_and_sends_nothing_more() {
        let gpu = fake();
        let _alone = gpu.exclusive();
        let len = 4 * PIECE;
        let context = crate::cuda::primary_context(0).unwrap();
        let bounce = buffer(context, PIPE_BYTES).unwrap();
        let dev = gpu.alloc(0, len);
        gpu.write(dev.ptr, &vec![7u8; len]);
        let held = Arc::new(AtomicUsize::new(0));
        let waited = AtomicUsize::new(0);
        let (tx, mut rx) = UnixStream::pair().unwrap();
        let mut send = step(&tx, &held, &waited, false);
        let mut hold = || {
            held.fetch_add(1, Ordering::SeqCst);
            Ok(Some(Guard(held.clone())))
        };
        // Goes on for the first piece only (one copy per piece: one range).
        let mut asked = 0;
        let mut still = || {
            asked += 1;
            false
        };
        let before = gpu.copies();
        let one = [RawRange { addr: dev.ptr, len }];
        // SAFETY: `dev` is fake device memory of `len` bytes, kept until the
        // call returned.
        let sent =
            unsafe { send_pipelined(context, &bounce, &one, &mut send, &mut hold, &mut still) };
        assert!(matches!(sent, Ok(false)), "{sent:?}");
        assert_eq!(asked, 1, "asked before the second piece's copy");
        assert_eq!(gpu.copies() - before, 1, "only the first piece was copied");
        assert_eq!(held.load(Ordering::SeqCst), 0);
        drop(send);
        drop(tx);
        let mut got = Vec::new();
        rx.read_to_end(&mut got).unwrap();
        assert!(got.is_empty(), "nothing was sent: {} bytes", got.len());
    }
}
