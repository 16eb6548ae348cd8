//! The same-host transport: cross-memory attach (`process_vm_writev` /
//! `process_vm_readv`), one copy by the kernel between two processes.
//!
//! Data moves straight between registered ranges; the initiator checks every
//! range against the peer's published registrations before any call (the
//! kernel would let it touch anything). Control and notifications ride the
//! peer's TCP link. Whether the peer's memory is reachable is probed once:
//! the peer publishes the address of a cookie holding its token, and the
//! probe must read exactly that token from the peer's pid.

use std::any::Any;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::Arc;

use log::{info, warn};

use super::job::{Mover, SegmentJob};
use super::{Op, Plan, Posted, Route, Transport};
use crate::common::{Error, Result};
use crate::wire::conn_info::ConnInfo;

/// Kernel limit on iovecs per call.
const IOV_MAX: usize = 1024;

/// Environment knob that makes every probe fail as if the kernel refused
/// (`NIXL_MOONCAKE_CMA_PROBE=fail`), to exercise the fallbacks.
pub const PROBE_ENV: &str = "NIXL_MOONCAKE_CMA_PROBE";

/// Cross-memory attach for one engine: publishes the cookie same-host peers
/// probe, and makes routes to peers whose probe succeeds.
#[derive(Clone)]
pub struct CmaTransport {
    cookie: Arc<Cookie>,
}

impl CmaTransport {
    /// The transport of the engine with `token` (relaxes Yama's
    /// `ptrace_scope=1` for this process, see [`allow_peers`]).
    pub fn new(token: u128) -> CmaTransport {
        allow_peers();
        CmaTransport {
            cookie: Arc::new(Cookie::new(token)),
        }
    }

    /// A route to the engine with `token` in process `pid`, whose cookie
    /// is at `probe_addr`, with control messages and notifications over
    /// `control`.
    ///
    /// # Errors
    /// A sentence saying why the probe failed.
    pub fn route(
        &self,
        pid: u32,
        probe_addr: u64,
        token: u128,
        control: Arc<dyn Route>,
    ) -> std::result::Result<CmaRoute, String> {
        let peer = probe(pid, probe_addr, token)?;
        Ok(CmaRoute {
            peer: Arc::new(peer),
            control,
        })
    }
}

impl Transport for CmaTransport {
    fn name(&self) -> &'static str {
        "cma"
    }

    fn publish(&self, info: &mut ConnInfo) {
        info.cma_probe = Some(self.cookie.addr());
    }

    /// Nothing to stop: peers only read our memory with the kernel's help.
    fn shutdown(&self) {}

    fn as_any(&self) -> &dyn Any {
        self
    }
}

/// A route to a same-host peer by cross-memory attach; control messages
/// and notifications go over `control` (the peer's TCP route).
pub struct CmaRoute {
    peer: Arc<CmaPeer>,
    control: Arc<dyn Route>,
}

impl CmaRoute {
    /// The peer's process id.
    pub fn pid(&self) -> u32 {
        self.peer.pid()
    }

    /// The route control messages take.
    pub fn control(&self) -> &Arc<dyn Route> {
        &self.control
    }
}

impl Route for CmaRoute {
    fn transport(&self) -> &'static str {
        "cma"
    }

    fn describe(&self) -> String {
        format!("is on this host (pid {}): cross-memory attach", self.pid())
    }

    fn connect(&self) -> Result<()> {
        self.control.connect()
    }

    fn post(&self, plan: &Arc<Plan>, notif: Option<&[u8]>) -> Result<Posted> {
        // The control connection must be up: it is how we learn that the
        // peer's engine went away (see `CmaCopy`).
        self.control.connect()?;
        Ok(Posted::stepped(Arc::new(CmaCopy::job(
            plan.clone(),
            self.peer.clone(),
            self.control.clone(),
            notif.map(<[u8]>::to_vec),
        ))))
    }

    fn notify(&self, msg: &[u8]) -> Result<()> {
        self.control.notify(msg)
    }

    fn is_down(&self) -> bool {
        self.control.is_down()
    }

    fn close(&self) {
        self.control.close();
    }

    fn as_any(&self) -> &dyn Any {
        self
    }
}

/// The cookie a peer reads to prove it can reach this process's memory.
#[derive(Debug)]
pub struct Cookie(Box<[u8; 16]>);

impl Cookie {
    /// A cookie holding `token`.
    pub fn new(token: u128) -> Cookie {
        Cookie(Box::new(token.to_le_bytes()))
    }

    /// Its address in this process.
    pub fn addr(&self) -> u64 {
        self.0.as_ptr() as u64
    }
}

/// Lets processes of the same user read and write our memory when Yama's
/// `ptrace_scope` is 1 (restricted to descendants), as cross-memory attach
/// needs. Scope 0 needs nothing; scopes 2 and 3 cannot be relaxed by us.
pub fn allow_peers() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(allow_peers_now);
}

fn allow_peers_now() {
    let scope = std::fs::read_to_string("/proc/sys/kernel/yama/ptrace_scope").unwrap_or_default();
    if scope.trim() == "1" {
        // SAFETY: PR_SET_PTRACER takes plain integer arguments and changes
        // only who may attach to this process.
        let rc = unsafe { libc::prctl(libc::PR_SET_PTRACER, libc::PR_SET_PTRACER_ANY, 0, 0, 0) };
        if rc == 0 {
            info!(
                "Mooncake: Yama ptrace_scope=1: allowed same-user peers to access this process (PR_SET_PTRACER)"
            );
        } else {
            warn!(
                "Mooncake: Yama ptrace_scope=1 and PR_SET_PTRACER failed ({}); same-host peers will use TCP",
                std::io::Error::last_os_error()
            );
        }
    }
}

/// A same-host peer process whose memory we may access.
#[derive(Debug)]
pub struct CmaPeer {
    pid: libc::pid_t,
    /// A pidfd opened before the probe succeeded, so it names the very
    /// process that holds the cookie; it becomes readable when that process
    /// exits. `None` on kernels without pidfd (then ESRCH is the only sign).
    pidfd: Option<OwnedFd>,
}

impl CmaPeer {
    /// The peer's process id.
    pub fn pid(&self) -> u32 {
        self.pid as u32
    }

    /// False once the probed process exited (its pid may then be reused by
    /// an unrelated process, which we must never touch).
    pub fn alive(&self) -> bool {
        let Some(fd) = &self.pidfd else { return true };
        let mut p = libc::pollfd {
            fd: fd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd, zero timeout.
        let n = unsafe { libc::poll(&mut p, 1, 0) };
        n == 0
    }
}

/// Checks that process `pid` is the engine whose cookie at `addr` holds
/// `token`, and that its memory is reachable.
///
/// # Errors
/// A sentence saying why not (permission, no such process, wrong cookie).
pub fn probe(pid: u32, addr: u64, token: u128) -> std::result::Result<CmaPeer, String> {
    if std::env::var(PROBE_ENV).is_ok_and(|v| v == "fail") {
        return Err(format!("{PROBE_ENV}=fail forces the probe to fail"));
    }
    // SAFETY: pidfd_open takes a pid and flags and returns a new fd or -1.
    let raw = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, 0) };
    // SAFETY: a non-negative result is a fresh fd that we now own.
    let pidfd = (raw >= 0).then(|| unsafe { OwnedFd::from_raw_fd(raw as RawFd) });
    let mut got = [0u8; 16];
    let local = libc::iovec {
        iov_base: got.as_mut_ptr().cast(),
        iov_len: 16,
    };
    let remote = libc::iovec {
        iov_base: addr as *mut _,
        iov_len: 16,
    };
    // SAFETY: `local` points to a live 16-byte buffer; the kernel checks `remote`.
    let n = unsafe { libc::process_vm_readv(pid as libc::pid_t, &local, 1, &remote, 1, 0) };
    if n < 0 {
        return Err(format!(
            "process_vm_readv of pid {pid} failed: {}",
            std::io::Error::last_os_error()
        ));
    }
    if n != 16 || u128::from_le_bytes(got) != token {
        return Err(format!(
            "pid {pid} is not the engine that published this metadata"
        ));
    }
    Ok(CmaPeer {
        pid: pid as libc::pid_t,
        pidfd,
    })
}

/// Moves a plan's bytes with cross-memory attach to a same-host peer.
pub struct CmaCopy {
    peer: Arc<CmaPeer>,
    control: Arc<dyn Route>,
    notif: Option<Vec<u8>>,
}

/// One post to a same-host peer.
pub type CmaJob = SegmentJob<CmaCopy>;

impl CmaCopy {
    /// Prepares one post to `peer`; ranges were checked at prep time against
    /// the peer's published registrations. The notification goes over
    /// `control`.
    pub fn job(
        plan: Arc<Plan>,
        peer: Arc<CmaPeer>,
        control: Arc<dyn Route>,
        notif: Option<Vec<u8>>,
    ) -> CmaJob {
        SegmentJob::new(
            plan,
            CmaCopy {
                peer,
                control,
                notif,
            },
        )
    }
}

impl Mover for CmaCopy {
    /// One system call: at most `IOV_MAX` pieces and about `budget` bytes.
    fn move_bytes(&self, plan: &Plan, segment: usize, offset: u64, budget: u64) -> Result<u64> {
        let segments = &plan.segments;
        let mut local = Vec::with_capacity(IOV_MAX.min(segments.len() - segment));
        let mut remote = Vec::with_capacity(local.capacity());
        let mut pins = Vec::new();
        let mut pinned: Vec<u32> = Vec::new();
        let (mut i, mut offset, mut total) = (segment, offset, 0u64);
        while i < segments.len() && local.len() < IOV_MAX && total < budget {
            let s = segments[i];
            if !pinned.contains(&s.local) {
                let region = &plan.local_regions[s.local as usize];
                pins.push(region.pin().ok_or_else(|| {
                    Error::InvalidParam(format!(
                        "local region {:#x}+{} was deregistered during the transfer",
                        region.addr, region.len
                    ))
                })?);
                pinned.push(s.local);
            }
            let len = (s.len - offset).min(budget - total);
            local.push(libc::iovec {
                iov_base: (s.local_addr + offset) as *mut _,
                iov_len: len as usize,
            });
            remote.push(libc::iovec {
                iov_base: (s.remote_addr + offset) as *mut _,
                iov_len: len as usize,
            });
            total += len;
            offset += len;
            if offset == s.len {
                i += 1;
                offset = 0;
            }
        }
        if total == 0 {
            return Ok(0);
        }
        let pid = self.peer.pid;
        if !self.peer.alive() {
            return Err(Error::RemoteDisconnect(format!(
                "peer process {pid} exited"
            )));
        }
        let call = match plan.op {
            Op::Write => libc::process_vm_writev,
            Op::Read => libc::process_vm_readv,
        };
        // SAFETY: the local iovecs lie in our registered regions, pinned above
        // for the duration of the call; the remote ones lie in the peer's
        // published registrations (checked at prep time), and the kernel
        // validates them against the peer's address space.
        let n = unsafe {
            call(
                pid,
                local.as_ptr(),
                local.len() as _,
                remote.as_ptr(),
                remote.len() as _,
                0,
            )
        };
        drop(pins);
        if n < 0 {
            let e = std::io::Error::last_os_error();
            return Err(match e.raw_os_error() {
                Some(libc::ESRCH) => Error::RemoteDisconnect(format!("peer process {pid} is gone")),
                Some(libc::EFAULT) => Error::NotAllowed(format!(
                    "memory of peer process {pid} is not mapped where its metadata says (deregistered and freed?)"
                )),
                _ => Error::Backend(format!("cross-memory attach to pid {pid} failed: {e}")),
            });
        }
        if n == 0 {
            return Err(Error::NotAllowed(format!(
                "memory of peer process {pid} could not be accessed"
            )));
        }
        Ok(n as u64)
    }

    fn finished(&self) -> Result<()> {
        match &self.notif {
            Some(msg) => self.control.notify(msg),
            None => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn probing_ourselves_reads_our_cookie() {
        let cookie = Cookie::new(0x1234_5678_9abc_def0_1122_3344_5566_7788);
        let me = probe(
            std::process::id(),
            cookie.addr(),
            0x1234_5678_9abc_def0_1122_3344_5566_7788,
        )
        .unwrap();
        assert!(me.alive());
        assert_eq!(me.pid(), std::process::id());
        assert!(
            probe(std::process::id(), cookie.addr(), 1)
                .unwrap_err()
                .contains("not the engine")
        );
        assert!(
            probe(u32::MAX >> 2, cookie.addr(), 1).is_err(),
            "no such process"
        );
    }

    #[test]
    fn a_peer_that_exited_is_not_alive() {
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .unwrap();
        let pid = child.id();
        // SAFETY: pidfd_open with a pid and no flags.
        let raw = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, 0) };
        assert!(raw >= 0);
        // SAFETY: a fresh fd we own.
        let peer = CmaPeer {
            pid: pid as libc::pid_t,
            pidfd: Some(unsafe { OwnedFd::from_raw_fd(raw as RawFd) }),
        };
        assert!(peer.alive());
        child.kill().unwrap();
        child.wait().unwrap();
        assert!(!peer.alive());
    }
}
