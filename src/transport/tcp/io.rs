//! Socket I/O straight between a socket and registered memory: vectored
//! `sendmsg`/`readv` over raw address ranges, no intermediate copy.

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

/// Fills every range with bytes from the socket, completely.
///
/// # Safety
/// Every range must be writable memory of this process for the whole call
/// and must not be read or written by Rust code meanwhile.
pub unsafe fn recv_into(fd: RawFd, ranges: &[RawRange]) -> io::Result<()> {
    let mut iov = iovecs(&[], ranges);
    while !iov.is_empty() {
        let n = iov.len().min(IOV_MAX);
        // SAFETY: the iovecs point into ranges the caller guarantees writable.
        let got = unsafe { libc::readv(fd, iov.as_ptr(), n as libc::c_int) };
        if got < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(timed_out(e));
        }
        if got == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "peer closed in the middle of a frame",
            ));
        }
        advance(&mut iov, got as usize);
    }
    Ok(())
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
        // SAFETY: `dst` is not touched by Rust code until the call returns.
        unsafe { recv_into(server.as_raw_fd(), &into) }.unwrap();
        let src = t.join().unwrap();
        assert_eq!(src, dst);
    }
}
