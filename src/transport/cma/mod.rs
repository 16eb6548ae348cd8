//! The same-host transport: cross-memory attach (`process_vm_writev` /
//! `process_vm_readv`), one copy by the kernel between two processes.
//!
//! Data moves straight between registered ranges; the initiator checks every
//! range against the peer's published registrations before any call (the
//! kernel would let it touch anything), and every call against the peer's
//! [control page](control), so that nothing touches a region after the
//! peer deregistered it, nor the peer's memory after its engine was
//! destroyed. Notifications ride the peer's TCP link. Whether the peer's
//! memory is reachable is probed once: the peer publishes the address of a
//! cookie holding its token and the fd of its control page, and the probe
//! must read exactly that token from the peer's pid and map that page.

pub mod control;

use std::any::Any;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::Arc;

use log::{info, warn};
use parking_lot::Mutex;

use self::control::{ControlPage, Refused};
use super::job::{Mover, SegmentJob};
use super::{Op, Plan, Posted, Route, Transport};
use crate::common::memory::RegionWatch;
use crate::common::{AgentName, Endpoint, Error, LocalRegion, Result};
use crate::wire::conn_info::ConnInfo;

/// Kernel limit on iovecs per call.
const IOV_MAX: usize = 1024;

/// Environment knob that makes every probe fail as if the kernel refused
/// (`NIXL_MOONCAKE_CMA_PROBE=fail`), to exercise the fallbacks.
pub const PROBE_ENV: &str = "NIXL_MOONCAKE_CMA_PROBE";

/// Cross-memory attach for one engine: publishes the cookie same-host peers
/// probe and the control page they check, and makes routes to peers whose
/// probe succeeds.
#[derive(Clone)]
pub struct CmaTransport {
    page: Arc<ControlPage>,
    cookie: Arc<Cookie>,
    _ptracer: Arc<PtracerGrant>,
}

impl CmaTransport {
    /// The transport of the engine of `endpoint`: creates its control page
    /// and keeps it in step with the endpoint's registry (relaxes Yama's
    /// `ptrace_scope=1` for this process while any such engine lives, see
    /// [`PtracerGrant`]).
    ///
    /// # Errors
    /// Why the control page cannot be created (the engine then does
    /// without cross-memory attach).
    pub fn new(endpoint: &Endpoint) -> std::result::Result<CmaTransport, String> {
        let page = Arc::new(
            ControlPage::create(endpoint.token)
                .map_err(|e| format!("cannot create its control page: {e}"))?,
        );
        endpoint.registry.watch(Arc::new(Watch(page.clone())));
        Ok(CmaTransport {
            cookie: Arc::new(Cookie::new(endpoint.token, page.fd())),
            page,
            _ptracer: PtracerGrant::acquire(),
        })
    }

    /// A route to agent `name`, the engine with `token` in process `pid`,
    /// whose cookie is at `probe_addr`, with notifications over `control`.
    ///
    /// # Errors
    /// A sentence saying why the probe failed.
    pub fn route(
        &self,
        name: &AgentName,
        pid: u32,
        probe_addr: u64,
        token: u128,
        control: Arc<dyn Route>,
    ) -> std::result::Result<CmaRoute, String> {
        let peer = probe(name, pid, probe_addr, token)?;
        Ok(CmaRoute {
            peer: Arc::new(peer),
            control,
        })
    }
}

/// Keeps the control page in step with the registry.
struct Watch(Arc<ControlPage>);

impl RegionWatch for Watch {
    fn registered(&self, region: &LocalRegion) -> Result<()> {
        self.0.publish(region.key);
        Ok(())
    }

    fn revoke(&self, region: &LocalRegion) {
        self.0.revoke(region.key);
    }
}

impl Transport for CmaTransport {
    fn name(&self) -> &'static str {
        "cma"
    }

    fn publish(&self, info: &mut ConnInfo) {
        info.cma_probe = Some(self.cookie.addr());
    }

    /// Our engine is going: after return no peer accesses our memory
    /// through cross-memory attach (an access in progress has finished).
    fn shutdown(&self) {
        self.page.destroy();
    }

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

    /// The peer process, as probed.
    pub fn peer(&self) -> &Arc<CmaPeer> {
        &self.peer
    }
}

impl Route for CmaRoute {
    fn transport(&self) -> &'static str {
        "cma"
    }

    fn describe(&self) -> String {
        format!("cross-memory attach (pid {} on this host)", self.pid())
    }

    fn connect(&self) -> Result<()> {
        self.control.connect()
    }

    fn post(&self, plan: &Arc<Plan>, notif: Option<&[u8]>) -> Result<Posted> {
        // Whether the peer's engine and regions still live is checked on its
        // control page by every step, not here: a post never waits.
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
        !self.peer.alive() || self.peer.page.enter(&[]).is_err() || self.control.is_down()
    }

    fn close(&self) {
        self.control.close();
    }

    fn as_any(&self) -> &dyn Any {
        self
    }
}

/// Bytes of a cookie: the engine's token (16), the fd of its control page
/// (4), and 4 reserved.
const COOKIE_LEN: usize = 24;

/// The cookie a peer reads to prove it can reach this process's memory, and
/// to learn where our control page is.
#[derive(Debug)]
pub struct Cookie(Box<[u8; COOKIE_LEN]>);

impl Cookie {
    /// A cookie holding `token` and the control page's fd `fd`.
    pub fn new(token: u128, fd: i32) -> Cookie {
        let mut b = [0u8; COOKIE_LEN];
        b[..16].copy_from_slice(&token.to_le_bytes());
        b[16..20].copy_from_slice(&fd.to_le_bytes());
        Cookie(Box::new(b))
    }

    /// Its address in this process.
    pub fn addr(&self) -> u64 {
        self.0.as_ptr() as u64
    }
}

/// While alive, lets processes of the same user read and write our memory
/// when Yama's `ptrace_scope` is 1 (restricted to descendants), as
/// cross-memory attach needs: the first grant calls
/// `prctl(PR_SET_PTRACER, PR_SET_PTRACER_ANY)`, and when the last grant of
/// the process goes (its last engine using cross-memory attach was
/// destroyed) `PR_SET_PTRACER` is reset to 0. The setting is per process:
/// an application that sets its own ptracer while our engines live has it
/// replaced. Scope 0 needs nothing; scopes 2 and 3 cannot be relaxed by us.
#[derive(Debug)]
pub struct PtracerGrant(());

static GRANTS: Mutex<usize> = Mutex::new(0);

impl PtracerGrant {
    /// Takes a grant (the first one relaxes the setting).
    pub fn acquire() -> Arc<PtracerGrant> {
        let mut grants = GRANTS.lock();
        if *grants == 0 && yama_scope() == Some(1) {
            set_ptracer(true);
        }
        *grants += 1;
        Arc::new(PtracerGrant(()))
    }

    /// Grants held now (for tests).
    pub fn held() -> usize {
        *GRANTS.lock()
    }
}

impl Drop for PtracerGrant {
    fn drop(&mut self) {
        let mut grants = GRANTS.lock();
        *grants -= 1;
        if *grants == 0 && yama_scope() == Some(1) {
            set_ptracer(false);
        }
    }
}

fn yama_scope() -> Option<u32> {
    std::fs::read_to_string("/proc/sys/kernel/yama/ptrace_scope")
        .ok()
        .and_then(|s| s.trim().parse().ok())
}

fn set_ptracer(any: bool) {
    let who = if any { libc::PR_SET_PTRACER_ANY } else { 0 };
    // SAFETY: PR_SET_PTRACER takes plain integer arguments and changes
    // only who may attach to this process.
    let rc = unsafe { libc::prctl(libc::PR_SET_PTRACER, who, 0, 0, 0) };
    match (any, rc) {
        (true, 0) => info!(
            "Mooncake: Yama ptrace_scope=1: allowed same-user peers to access this process (PR_SET_PTRACER)"
        ),
        (true, _) => warn!(
            "Mooncake: Yama ptrace_scope=1 and PR_SET_PTRACER failed ({}); same-host peers will use TCP",
            std::io::Error::last_os_error()
        ),
        (false, _) => {
            info!("Mooncake: no engine uses cross-memory attach any more: PR_SET_PTRACER reset")
        }
    }
}

/// A same-host peer process whose memory we may access.
#[derive(Debug)]
pub struct CmaPeer {
    name: AgentName,
    pid: libc::pid_t,
    /// The peer engine's control page, checked around every access.
    page: ControlPage,
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

    /// The peer's agent name.
    pub fn name(&self) -> &AgentName {
        &self.name
    }

    /// Enters the peer's control page for one access to the regions with
    /// access keys `keys`: hold the lane while the access runs, so that the
    /// peer's deregistration of one of them waits for it.
    ///
    /// # Errors
    /// [`Error::RemoteDisconnect`] when the peer's engine was destroyed,
    /// [`Error::NotAllowed`] when it deregistered one of the regions.
    pub fn enter(&self, keys: &[u64]) -> Result<control::Lane<'_>> {
        let name = &self.name;
        self.page.enter(keys).map_err(|refused| match refused {
            Refused::EngineGone => {
                Error::RemoteDisconnect(format!("agent {name}'s engine was destroyed"))
            }
            Refused::Revoked(key) => Error::NotAllowed(format!(
                "agent {name} refused the transfer: it deregistered region {key:#x}"
            )),
        })
    }

    /// Our own descriptor for the peer's descriptor `fd` (the same right to
    /// the process the probe checked). Callers hold a lane of the region
    /// the descriptor belongs to, so that it stays open meanwhile.
    ///
    /// # Errors
    /// [`Error::RemoteDisconnect`] when the peer exited;
    /// [`Error::NotSupported`] saying why it cannot be taken otherwise (no
    /// right, no such descriptor).
    pub fn take_fd(&self, fd: i32) -> Result<OwnedFd> {
        if !self.alive() {
            return Err(Error::RemoteDisconnect(format!(
                "agent {} (pid {}) is gone",
                self.name, self.pid
            )));
        }
        control::take_fd(
            self.pidfd.as_ref().map(AsRawFd::as_raw_fd),
            self.pid as u32,
            fd,
        )
        .map_err(|why| {
            Error::NotSupported(format!(
                "cannot take agent {}'s descriptor: {why}",
                self.name
            ))
        })
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

/// Checks that process `pid` is the engine of agent `name` whose cookie at
/// `addr` holds `token`, that its memory is reachable, and maps its control
/// page.
///
/// # Errors
/// A sentence saying why not (permission, no such process, wrong cookie).
pub fn probe(
    name: &AgentName,
    pid: u32,
    addr: u64,
    token: u128,
) -> std::result::Result<CmaPeer, String> {
    if std::env::var(PROBE_ENV).is_ok_and(|v| v == "fail") {
        return Err(format!("{PROBE_ENV}=fail forces the probe to fail"));
    }
    // SAFETY: pidfd_open takes a pid and flags and returns a new fd or -1.
    let raw = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, 0) };
    // SAFETY: a non-negative result is a fresh fd that we now own.
    let pidfd = (raw >= 0).then(|| unsafe { OwnedFd::from_raw_fd(raw as RawFd) });
    let mut got = [0u8; COOKIE_LEN];
    let local = libc::iovec {
        iov_base: got.as_mut_ptr().cast(),
        iov_len: COOKIE_LEN,
    };
    let remote = libc::iovec {
        iov_base: addr as *mut _,
        iov_len: COOKIE_LEN,
    };
    // SAFETY: `local` points to a live buffer of that size; the kernel checks `remote`.
    let n = unsafe { libc::process_vm_readv(pid as libc::pid_t, &local, 1, &remote, 1, 0) };
    if n < 0 {
        return Err(format!(
            "process_vm_readv of pid {pid} failed: {}",
            std::io::Error::last_os_error()
        ));
    }
    let cookie_token = u128::from_le_bytes(got[..16].try_into().expect("16 bytes"));
    if n != COOKIE_LEN as isize || cookie_token != token {
        return Err(format!(
            "pid {pid} is not the engine that published this metadata"
        ));
    }
    let fd = i32::from_le_bytes(got[16..20].try_into().expect("4 bytes"));
    let page = ControlPage::attach(pidfd.as_ref().map(AsRawFd::as_raw_fd), pid, fd, token)?;
    Ok(CmaPeer {
        name: name.clone(),
        pid: pid as libc::pid_t,
        page,
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
        // The peer's regions this call touches, checked on its control page.
        let mut keys: Vec<u64> = Vec::new();
        let mut last_remote = None;
        let (mut i, mut offset, mut total) = (segment, offset, 0u64);
        while i < segments.len() && local.len() < IOV_MAX && total < budget {
            let s = segments[i];
            if last_remote != Some(s.remote) {
                last_remote = Some(s.remote);
                let key = plan.remote_regions[s.remote as usize].key;
                if !keys.contains(&key) {
                    keys.push(key);
                }
            }
            if !pinned.contains(&s.local) {
                pins.push(plan.local_regions[s.local as usize].pin_local()?);
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
        let _lane = self.peer.enter(&keys)?;
        let call = match plan.op {
            Op::Write => libc::process_vm_writev,
            Op::Read => libc::process_vm_readv,
        };
        // SAFETY: the local iovecs lie in our registered regions, pinned above
        // for the duration of the call; the remote ones lie in the peer's
        // published registrations (checked at prep time), which its control
        // page says are still registered (the lane held until after the call
        // makes a deregistration wait for it), and the kernel validates them
        // against the peer's address space.
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
    use crate::common::{Inbox, Registry};

    fn endpoint(token: u128) -> Endpoint {
        Endpoint {
            name: AgentName::from("me"),
            token,
            registry: Registry::default(),
            inbox: Inbox::default(),
            peers: Default::default(),
        }
    }

    #[test]
    fn probing_ourselves_reads_our_cookie_and_maps_our_control_page() {
        let token = 0x1234_5678_9abc_def0_1122_3344_5566_7788;
        let cma = CmaTransport::new(&endpoint(token)).unwrap();
        let me = AgentName::from("me");
        let peer = probe(&me, std::process::id(), cma.cookie.addr(), token).unwrap();
        assert!(peer.alive());
        assert_eq!(peer.pid(), std::process::id());
        assert!(peer.page.enter(&[]).is_ok());
        assert!(
            probe(&me, std::process::id(), cma.cookie.addr(), 1)
                .unwrap_err()
                .contains("not the engine")
        );
        assert!(
            probe(&me, u32::MAX >> 2, cma.cookie.addr(), 1).is_err(),
            "no such process"
        );
        cma.shutdown();
        assert_eq!(peer.page.enter(&[]).err(), Some(Refused::EngineGone));
    }

    #[test]
    fn the_control_page_follows_the_registry() {
        let ep = endpoint(7);
        let cma = CmaTransport::new(&ep).unwrap();
        let region = ep.registry.register(0x1000, 64, 0, 0).unwrap();
        let peer = probe(
            &AgentName::from("me"),
            std::process::id(),
            cma.cookie.addr(),
            7,
        )
        .unwrap();
        assert!(peer.page.enter(&[region.key]).is_ok());
        ep.registry.deregister(region.key).unwrap();
        assert_eq!(
            peer.page.enter(&[region.key]).err(),
            Some(Refused::Revoked(region.key))
        );
    }

    #[test]
    fn the_ptracer_grant_is_counted() {
        let before = PtracerGrant::held();
        let a = PtracerGrant::acquire();
        assert!(PtracerGrant::held() > before);
        drop(a);
    }

    #[test]
    fn a_peer_that_exited_is_not_alive() {
        let ep = endpoint(9);
        let cma = CmaTransport::new(&ep).unwrap();
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .unwrap();
        let pid = child.id();
        // SAFETY: pidfd_open with a pid and no flags.
        let raw = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, 0) };
        assert!(raw >= 0);
        let page = ControlPage::attach(None, std::process::id(), cma.page.fd(), 9).unwrap();
        // SAFETY: a fresh fd we own.
        let peer = CmaPeer {
            name: AgentName::from("child"),
            pid: pid as libc::pid_t,
            page,
            pidfd: Some(unsafe { OwnedFd::from_raw_fd(raw as RawFd) }),
        };
        assert!(peer.alive());
        child.kill().unwrap();
        child.wait().unwrap();
        assert!(!peer.alive());
    }
}
