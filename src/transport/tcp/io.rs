//! Socket I/O straight between a socket and registered memory: vectored
//! `sendmsg`/`recvmsg` over raw address ranges, no intermediate copy.
//!
//! Frames that touch registered memory move with [`send_frame`] and
//! [`recv_frame`]: one non-blocking system call at a time, each under a
//! guard the caller takes anew (its pins and cancel lock), so that no wait
//! for the network ever happens while memory is pinned. A cancel or a
//! deregistration then waits for one system call at most; the rest of the
//! frame moves as zeros (sent) or is thrown away (received), so that the
//! stream stays whole.

use std::io::{self, Read};
use std::net::{SocketAddr, TcpStream};
use std::os::fd::{AsRawFd, RawFd};
use std::time::{Duration, Instant};

use socket2::{Domain, Protocol, Socket, Type};

/// Most iovecs one system call takes (Linux `IOV_MAX`).
const IOV_MAX: usize = 1024;

/// A range of this process's memory, named by address (no Rust reference is
/// ever made to registered memory).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RawRange {
    /// Start address.
    pub addr: u64,
    /// Length in bytes.
    pub len: usize,
}

fn advance(iov: &mut Vec<libc::iovec>, mut n: usize) {
    let mut drop_front = 0;
    for v in iov.iter_mut() {
        if n >= v.iov_len {
            n -= v.iov_len;
            drop_front += 1;
        } else {
            // SAFETY: n < iov_len, so the new base stays inside the same range.
            v.iov_base = unsafe { v.iov_base.cast::<u8>().add(n) }.cast();
            v.iov_len -= n;
            break;
        }
    }
    iov.drain(..drop_front);
}

fn iovecs(head: &[u8], ranges: &[RawRange]) -> Vec<libc::iovec> {
    let mut iov = Vec::with_capacity(ranges.len() + 1);
    if !head.is_empty() {
        iov.push(libc::iovec {
            iov_base: head.as_ptr() as *mut _,
            iov_len: head.len(),
        });
    }
    iov.extend(ranges.iter().filter(|r| r.len > 0).map(|r| libc::iovec {
        iov_base: r.addr as *mut _,
        iov_len: r.len,
    }));
    iov
}

fn timed_out(e: io::Error) -> io::Error {
    if e.kind() == io::ErrorKind::WouldBlock {
        io::Error::new(
            io::ErrorKind::TimedOut,
            "socket timed out in the middle of a frame",
        )
    } else {
        e
    }
}

/// Sends `head` then every range, completely, without SIGPIPE.
///
/// # Safety
/// Every range must be readable memory of this process for the whole call
/// (callers pin the registered regions they name).
pub unsafe fn send_all(fd: RawFd, head: &[u8], ranges: &[RawRange]) -> io::Result<()> {
    let mut iov = iovecs(head, ranges);
    while !iov.is_empty() {
        let n = iov.len().min(IOV_MAX);
        // SAFETY: a zeroed msghdr is valid; we set only the iovec fields.
        let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
        msg.msg_iov = iov.as_mut_ptr();
        msg.msg_iovlen = n;
        // SAFETY: the iovecs point into `head` (borrowed for the call) and
        // into ranges the caller guarantees readable.
        let sent = unsafe { libc::sendmsg(fd, &msg, libc::MSG_NOSIGNAL) };
        if sent < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(timed_out(e));
        }
        advance(&mut iov, sent as usize);
    }
    Ok(())
}

/// What the caller of [`send_frame`] or [`recv_frame`] allows for the next
/// system call that touches its memory ranges.
pub enum Access<G> {
    /// Move bytes from or into the ranges, holding `G` (pins, a cancel
    /// lock) for the duration of the call.
    Memory(G),
    /// The ranges may not be touched any more: send zeros in their place,
    /// or throw received bytes away.
    Zeros,
    /// The ranges may not be touched any more and the frame must not go on:
    /// the call fails (the connection is to be closed).
    Stop,
}

impl<G> Access<G> {
    /// The guard of [`Access::Memory`], `None` otherwise.
    pub fn memory(self) -> Option<G> {
        match self {
            Access::Memory(g) => Some(g),
            _ => None,
        }
    }

    /// The same access with `f` applied to the guard.
    pub fn map<H>(self, f: impl FnOnce(G) -> H) -> Access<H> {
        match self {
            Access::Memory(g) => Access::Memory(f(g)),
            Access::Zeros => Access::Zeros,
            Access::Stop => Access::Stop,
        }
    }
}

fn stopped() -> io::Error {
    io::Error::other("the memory of the frame went away in the middle of it")
}

/// How a frame's I/O waits for the socket.
#[derive(Clone, Copy)]
pub struct Waits<'a> {
    /// True when the wait must end (the connection is being closed).
    pub abort: &'a dyn Fn() -> bool,
    /// Give up when no byte moved for this long (`None`: never).
    pub stall: Option<Duration>,
    /// Give up when the frame is not done by then (`None`: never).
    pub deadline: Option<Instant>,
}

impl Waits<'_> {
    /// Waits (at most [`ABORT_CHECK`]) until `fd` is ready for `events`,
    /// or fails when the wait must end.
    fn wait(&self, fd: RawFd, events: libc::c_short, last_progress: Instant) -> io::Result<()> {
        if (self.abort)() {
            return Err(aborted());
        }
        let now = Instant::now();
        if let Some(stall) = self.stall
            && now.saturating_duration_since(last_progress) > stall
        {
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("no byte moved for {stall:?} in the middle of a frame"),
            ));
        }
        if self.deadline.is_some_and(|d| now >= d) {
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "the frame did not complete within its deadline",
            ));
        }
        poll_one(fd, events, Some(ABORT_CHECK)).map(|_| ())
    }
}

/// Zeros sent in place of memory a frame may no longer read.
static ZEROS: [u8; 64 << 10] = [0; 64 << 10];

/// The iovecs of `head` then `ranges`, from byte `offset` on, at most
/// `IOV_MAX` of them; with `zeros` the ranges' part points at [`ZEROS`].
fn iovecs_from(head: &[u8], ranges: &[RawRange], offset: usize, zeros: bool) -> Vec<libc::iovec> {
    let mut iov = Vec::with_capacity(ranges.len().min(IOV_MAX) + 1);
    let mut skip = offset;
    if skip < head.len() {
        iov.push(libc::iovec {
            iov_base: head[skip..].as_ptr() as *mut _,
            iov_len: head.len() - skip,
        });
        skip = 0;
    } else {
        skip -= head.len();
    }
    for r in ranges {
        if iov.len() == IOV_MAX {
            break;
        }
        if skip >= r.len {
            skip -= r.len;
            continue;
        }
        let len = r.len - skip;
        if zeros {
            let mut left = len;
            while left > 0 && iov.len() < IOV_MAX {
                let n = left.min(ZEROS.len());
                iov.push(libc::iovec {
                    iov_base: ZEROS.as_ptr() as *mut _,
                    iov_len: n,
                });
                left -= n;
            }
        } else {
            iov.push(libc::iovec {
                iov_base: (r.addr + skip as u64) as *mut _,
                iov_len: len,
            });
        }
        skip = 0;
    }
    iov
}

/// `sendmsg` without waiting: `Ok(None)` when the socket has no room.
///
/// # Safety
/// Every iovec must point to memory readable for the whole call.
unsafe fn sendmsg_now(fd: RawFd, iov: &mut [libc::iovec]) -> io::Result<Option<usize>> {
    loop {
        // SAFETY: a zeroed msghdr is valid; we set only the iovec fields.
        let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
        msg.msg_iov = iov.as_mut_ptr();
        msg.msg_iovlen = iov.len();
        // SAFETY: the caller guarantees the iovecs readable.
        let n = unsafe { libc::sendmsg(fd, &msg, libc::MSG_NOSIGNAL | libc::MSG_DONTWAIT) };
        if n >= 0 {
            return Ok(Some(n as usize));
        }
        let e = io::Error::last_os_error();
        match e.kind() {
            io::ErrorKind::Interrupted => continue,
            io::ErrorKind::WouldBlock => return Ok(None),
            _ => return Err(e),
        }
    }
}

/// `recvmsg` without waiting: `Ok(None)` when nothing is there, `Ok(Some(0))`
/// when the peer closed.
///
/// # Safety
/// Every iovec must point to memory writable for the whole call, which no
/// Rust code reads or writes meanwhile.
unsafe fn recvmsg_now(fd: RawFd, iov: &mut [libc::iovec]) -> io::Result<Option<usize>> {
    loop {
        // SAFETY: a zeroed msghdr is valid; we set only the iovec fields.
        let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
        msg.msg_iov = iov.as_mut_ptr();
        msg.msg_iovlen = iov.len();
        // SAFETY: the caller guarantees the iovecs writable.
        let n = unsafe { libc::recvmsg(fd, &mut msg, libc::MSG_DONTWAIT) };
        if n >= 0 {
            return Ok(Some(n as usize));
        }
        let e = io::Error::last_os_error();
        match e.kind() {
            io::ErrorKind::Interrupted => continue,
            io::ErrorKind::WouldBlock => return Ok(None),
            _ => return Err(e),
        }
    }
}

/// Sends `head` then the bytes of `ranges`, from byte `*sent` on, and
/// counts what went out in `*sent`. Before every system call that reads
/// the ranges it asks `access` (whose guard it holds for that call only).
/// With `waits` it waits for room until everything is sent (`Ok(true)`);
/// without, it stops at the first full socket (`Ok(false)`).
///
/// # Safety
/// While `access` returns [`Access::Memory`], every range must be readable
/// memory of this process (the guard keeps it so).
pub unsafe fn send_frame<G>(
    fd: RawFd,
    head: &[u8],
    ranges: &[RawRange],
    sent: &mut usize,
    access: &mut dyn FnMut() -> Access<G>,
    waits: Option<Waits<'_>>,
) -> io::Result<bool> {
    let total = head.len() + ranges.iter().map(|r| r.len).sum::<usize>();
    let mut last_progress = Instant::now();
    let mut zeros = false;
    while *sent < total {
        let guard = if !ranges.is_empty() {
            match (zeros, access()) {
                (false, Access::Memory(g)) => Some(g),
                (_, Access::Stop) => return Err(stopped()),
                _ => {
                    zeros = true;
                    None
                }
            }
        } else {
            None
        };
        let mut iov = iovecs_from(head, ranges, *sent, zeros);
        // SAFETY: `head` is borrowed for the call; the ranges are readable
        // while the guard is held (the caller's contract), or replaced by
        // ZEROS.
        let moved = unsafe { sendmsg_now(fd, &mut iov) };
        drop(guard);
        match moved? {
            Some(n) => {
                *sent += n;
                last_progress = Instant::now();
            }
            None => match waits {
                None => return Ok(false),
                Some(w) => w.wait(fd, libc::POLLOUT, last_progress)?,
            },
        }
    }
    Ok(true)
}

/// Fills the bytes of `ranges` from the socket, from byte `*got` on, and
/// counts what came in `*got`, waiting for data as `waits` says (without
/// `waits`, only what has arrived: the caller sees in `*got` whether all
/// of it did). Before
/// every system call that writes the ranges it asks `access` (whose guard
/// it holds for that call only); once refused, the rest is thrown away.
/// Returns false when the bytes were thrown away.
///
/// # Safety
/// While `access` returns [`Access::Memory`], every range must be writable
/// memory of this process that no Rust code reads or writes meanwhile.
pub unsafe fn recv_frame<G>(
    fd: RawFd,
    ranges: &[RawRange],
    got: &mut usize,
    access: &mut dyn FnMut() -> Access<G>,
    waits: Option<Waits<'_>>,
) -> io::Result<bool> {
    let total: usize = ranges.iter().map(|r| r.len).sum();
    let mut last_progress = Instant::now();
    let mut discarding = false;
    let mut scratch = Vec::new();
    while *got < total {
        let guard = match (discarding, access()) {
            (false, Access::Memory(g)) => Some(g),
            (_, Access::Stop) => return Err(stopped()),
            _ => {
                discarding = true;
                None
            }
        };
        let mut iov = if discarding {
            scratch.resize((total - *got).min(1 << 20), 0u8);
            vec![libc::iovec {
                iov_base: scratch.as_mut_ptr().cast(),
                iov_len: scratch.len(),
            }]
        } else {
            iovecs_from(&[], ranges, *got, false)
        };
        // SAFETY: the ranges are writable while the guard is held (the
        // caller's contract), or the iovec is our scratch buffer.
        let moved = unsafe { recvmsg_now(fd, &mut iov) };
        drop(guard);
        match moved? {
            Some(0) => {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "peer closed in the middle of a frame",
                ));
            }
            Some(n) => {
                *got += n;
                last_progress = Instant::now();
            }
            None => match waits {
                None => break,
                Some(w) => w.wait(fd, libc::POLLIN, last_progress)?,
            },
        }
    }
    Ok(!discarding)
}

/// Makes the kernel notice a peer that vanished without a word (host crash,
/// partition): TCP keepalive probes on an idle connection, and
/// `TCP_USER_TIMEOUT` for data that goes unacknowledged. With a `timeout`
/// (the stall timeout; zero: none) the peer is declared gone after about
/// that long, else after about two minutes of silence while idle.
pub fn keep_alive(stream: &TcpStream, timeout: Duration) -> io::Result<()> {
    let sock = socket2::SockRef::from(stream);
    let (idle, interval, retries) = if timeout.is_zero() {
        (Duration::from_secs(60), Duration::from_secs(10), 6)
    } else {
        let third = (timeout / 3).max(Duration::from_secs(1));
        (third, (third / 2).max(Duration::from_secs(1)), 4)
    };
    sock.set_tcp_keepalive(
        &socket2::TcpKeepalive::new()
            .with_time(idle)
            .with_interval(interval)
            .with_retries(retries),
    )?;
    sock.set_tcp_user_timeout((!timeout.is_zero()).then_some(timeout))
}

/// Sends plain bytes (headers, tables, messages).
pub fn send_bytes(stream: &TcpStream, parts: &[&[u8]]) -> io::Result<()> {
    let ranges: Vec<RawRange> = parts
        .iter()
        .map(|p| RawRange {
            addr: p.as_ptr() as u64,
            len: p.len(),
        })
        .collect();
    // SAFETY: every range is a live Rust slice borrowed for the call.
    unsafe { send_all(stream.as_raw_fd(), &[], &ranges) }
}

/// Reads exactly `buf.len()` bytes; a timeout counts as a stall.
pub fn read_exact(mut stream: &TcpStream, buf: &mut [u8]) -> io::Result<()> {
    stream.read_exact(buf).map_err(timed_out)
}

/// How often a wait that can be aborted checks whether it should stop.
const ABORT_CHECK: Duration = Duration::from_millis(50);

fn aborted() -> io::Error {
    io::Error::new(
        io::ErrorKind::ConnectionAborted,
        "given up: the link was closed",
    )
}

/// Reads exactly `buf.len()` bytes before `deadline`, however slowly they
/// come, unless `abort()` turns true first (checked every 50 ms).
pub fn read_exact_by(
    mut stream: &TcpStream,
    buf: &mut [u8],
    deadline: Instant,
    abort: &dyn Fn() -> bool,
) -> io::Result<()> {
    let mut got = 0;
    while got < buf.len() {
        if abort() {
            return Err(aborted());
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(io::Error::new(io::ErrorKind::TimedOut, "deadline passed"));
        }
        stream.set_read_timeout(Some(left.min(ABORT_CHECK)))?;
        match stream.read(&mut buf[got..]) {
            Ok(0) => return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "peer closed")),
            Ok(n) => got += n,
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::Interrupted
                        | io::ErrorKind::WouldBlock
                        | io::ErrorKind::TimedOut
                ) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Opens a TCP connection to `addr` before `deadline`, unless `abort()`
/// turns true first (checked every 50 ms): a blocking `connect` could hold
/// a thread that must exit for as long as the kernel retries.
pub fn connect_by(
    addr: SocketAddr,
    deadline: Instant,
    abort: &dyn Fn() -> bool,
) -> io::Result<TcpStream> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    socket.set_nonblocking(true)?;
    match socket.connect(&addr.into()) {
        Ok(()) => {}
        Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => loop {
            if abort() {
                return Err(aborted());
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "connection timed out",
                ));
            }
            if poll_one(
                socket.as_raw_fd(),
                libc::POLLOUT,
                Some(left.min(ABORT_CHECK)),
            )? {
                match socket.take_error()? {
                    Some(e) => return Err(e),
                    None => break,
                }
            }
        },
        Err(e) => return Err(e),
    }
    socket.set_nonblocking(false)?;
    Ok(socket.into())
}

/// Waits until `fd` is ready for `events` (or failed or was closed: the
/// next I/O call reports that) or `timeout` passed (`None`: no limit).
/// `Ok(false)` on timeout, or on a signal.
fn poll_one(fd: RawFd, events: libc::c_short, timeout: Option<Duration>) -> io::Result<bool> {
    let mut pfd = libc::pollfd {
        fd,
        events,
        revents: 0,
    };
    let wait_ms = timeout.map_or(-1, |t| {
        libc::c_int::try_from(t.as_millis().max(1)).unwrap_or(libc::c_int::MAX)
    });
    // SAFETY: one valid pollfd on the stack, for the duration of the call.
    match unsafe { libc::poll(&raw mut pfd, 1, wait_ms) } {
        0 => Ok(false),
        n if n > 0 => Ok(true),
        _ => {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                Ok(false)
            } else {
                Err(e)
            }
        }
    }
}

/// Waits until the socket has bytes to read (or was closed or failed) or
/// `timeout` passed (`None`: no limit), without consuming anything.
/// `Ok(false)`: nothing yet.
pub fn wait_readable(stream: &TcpStream, timeout: Option<Duration>) -> io::Result<bool> {
    poll_one(stream.as_raw_fd(), libc::POLLIN, timeout)
}

/// Reads and throws away `len` bytes (data nobody may receive any more).
pub fn discard(stream: &TcpStream, mut len: u64) -> io::Result<()> {
    let mut scratch = vec![0u8; len.min(1 << 20) as usize];
    while len > 0 {
        let n = len.min(scratch.len() as u64) as usize;
        read_exact(stream, &mut scratch[..n])?;
        len -= n as u64;
    }
    Ok(())
}

/// Waits for the next frame header. `Ok(None)`: the peer closed cleanly
/// between frames, or nothing arrived within the socket's read timeout
/// (`idle` is then set). A header cut short is an error.
pub fn read_header(mut stream: &TcpStream, buf: &mut [u8], idle: &mut bool) -> io::Result<bool> {
    *idle = false;
    let mut got = 0;
    while got < buf.len() {
        match stream.read(&mut buf[got..]) {
            Ok(0) if got == 0 => return Ok(false),
            Ok(0) => {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "peer closed inside a header",
                ));
            }
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) if e.kind() == io::ErrorKind::WouldBlock && got == 0 => {
                *idle = true;
                return Ok(false);
            }
            Err(e) => return Err(timed_out(e)),
        }
    }
    Ok(true)
}

/// True when the socket has bytes to read (or was closed or failed), without
/// waiting and without consuming anything.
pub fn readable_now(stream: &TcpStream) -> bool {
    let mut byte = [0u8; 1];
    !matches!(peek_now(stream, &mut byte), Ok(false))
}

/// How many bytes the socket has received and not yet handed out (`None`
/// if the kernel does not say).
pub fn buffered(stream: &TcpStream) -> Option<usize> {
    let mut n: libc::c_int = 0;
    // SAFETY: FIONREAD writes one int into `n`.
    let rc = unsafe { libc::ioctl(stream.as_raw_fd(), libc::FIONREAD, &raw mut n) };
    (rc == 0).then(|| usize::try_from(n).ok()).flatten()
}

/// Copies the next `buf.len()` bytes of the socket into `buf` without
/// consuming them and without waiting: `Ok(true)` when that many are there,
/// `Ok(false)` when fewer are. A closed socket is an `UnexpectedEof` error.
pub fn peek_now(stream: &TcpStream, buf: &mut [u8]) -> io::Result<bool> {
    // SAFETY: the kernel writes at most `buf.len()` bytes into `buf`.
    let n = unsafe {
        libc::recv(
            stream.as_raw_fd(),
            buf.as_mut_ptr().cast(),
            buf.len(),
            libc::MSG_PEEK | libc::MSG_DONTWAIT,
        )
    };
    if n < 0 {
        let e = io::Error::last_os_error();
        return match e.kind() {
            io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted => Ok(false),
            _ => Err(e),
        };
    }
    if n == 0 && !buf.is_empty() {
        return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "peer closed"));
    }
    Ok(n as usize == buf.len())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpListener;

    #[test]
    fn vectored_send_and_receive_across_many_ranges() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let client = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (server, _) = listener.accept().unwrap();
        // 3000 ranges: more than IOV_MAX, so several system calls each way.
        let src: Vec<u8> = (0..3000 * 37).map(|i| (i % 251) as u8).collect();
        let ranges: Vec<RawRange> = (0..3000)
            .map(|i| RawRange {
                addr: src.as_ptr() as u64 + i * 37,
                len: 37,
            })
            .collect();
        let t = std::thread::spawn(move || {
            // SAFETY: `src` outlives the call and is only read.
            unsafe { send_all(client.as_raw_fd(), b"head", &ranges) }.unwrap();
            src
        });
        let mut head = [0u8; 4];
        read_exact(&server, &mut head).unwrap();
        assert_eq!(&head, b"head");
        let dst = vec![0u8; 3000 * 37];
        let into: Vec<RawRange> = (0..3000)
            .map(|i| RawRange {
                addr: dst.as_ptr() as u64 + i * 37,
                len: 37,
            })
            .collect();
        let mut got = 0;
        let never = || false;
        let waits = Waits {
            abort: &never,
            stall: None,
            deadline: None,
        };
        // SAFETY: `dst` is not touched by Rust code until the call returns.
        let landed = unsafe {
            recv_frame(
                server.as_raw_fd(),
                &into,
                &mut got,
                &mut || Access::Memory(()),
                Some(waits),
            )
        };
        assert!(landed.unwrap());
        let src = t.join().unwrap();
        assert_eq!(src, dst);
    }
}
