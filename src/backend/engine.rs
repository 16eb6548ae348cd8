//! [`Engine`]: one NIXL agent's backend instance.
//!
//! Every method takes `&self` and is safe to call from any thread at any
//! time: NIXL may race every call against every other.

use std::cell::Cell;
use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use log::info;
use parking_lot::{Mutex, RwLock};

use super::options::Options;
use super::progress::Worker;
use super::requests::RequestSlab;
use crate::common::memory::{VRAM_SEG, random_u128};
use crate::common::peers::Known;
use crate::common::{
    AgentName, Endpoint, Error, Inbox, LocalRegion, MemKind, Notification, Registry, Result, Status,
};
use crate::cuda;
use crate::transport::{self, Job, Op, Plan, Posted, Route, Segment, Transfer, Transports};
use crate::wire::conn_info::{ConnInfo, Endpoint as WireEndpoint};
use crate::wire::frame::MAX_NOTIF;
use crate::wire::region::RegionPublic;

/// Id of a metadata object (`nixlBackendMD`) handed to NIXL; never 0, and
/// unique across every engine of the process (see [`public_registrations`]).
pub type MdId = u64;

/// Metadata ids are numbered process-wide, so that a handle one engine
/// returned never names another object in another engine.
static NEXT_MD: AtomicU64 = AtomicU64::new(1);

/// The public data of every local registration of every engine in this
/// process, by metadata id: `getPublicData` on one engine with a handle
/// another engine returned answers for exactly that region (NIXL's own
/// backend test does this), and no other call acts on a foreign handle.
fn public_registrations() -> &'static RwLock<HashMap<MdId, RegionPublic>> {
    static MAP: std::sync::OnceLock<RwLock<HashMap<MdId, RegionPublic>>> =
        std::sync::OnceLock::new();
    MAP.get_or_init(Default::default)
}

/// Id of a request handle (`nixlBackendReqH`) handed to NIXL; never 0.
pub type ReqId = u64;

/// A transfer descriptor as NIXL passes it, flattened.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Desc {
    /// Start address (local, or in the remote agent's address space).
    pub addr: u64,
    /// Length in bytes.
    pub len: u64,
    /// The metadata object NIXL attached to the descriptor.
    pub md: MdId,
}

/// How an engine is created.
#[derive(Debug, Clone, Default)]
pub struct EngineConfig {
    /// NIXL's `localAgent`.
    pub local_agent: Vec<u8>,
    /// NIXL's `customParams`, as key/value pairs.
    pub params: Vec<(String, String)>,
    /// NIXL's `enableProgTh`.
    pub progress_thread: bool,
    /// NIXL's `pthrDelay`.
    pub progress_delay: Duration,
}

impl EngineConfig {
    /// Agent `agent` with `params`, a progress thread (NIXL's Python
    /// default) and no `pthrDelay`.
    pub fn new(agent: &str, params: &[(&str, &str)]) -> EngineConfig {
        EngineConfig {
            local_agent: agent.as_bytes().to_vec(),
            params: params
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            progress_thread: true,
            progress_delay: Duration::ZERO,
        }
    }
}

/// Copy transfers (in-process, CMA) up to this size run inline in `postXfer`:
/// no hand-off to the progress thread (at most ~100 us of copying).
const INLINE_BYTES: u64 = 1 << 20;
/// ... provided they have at most this many segments.
const INLINE_SEGMENTS: usize = 1024;
/// Without a progress thread, steps of work done inside one call.
const STEPS_PER_CALL: usize = 8;

/// A metadata object: one of our registrations, or a peer's region.
#[derive(Debug, Clone)]
enum Md {
    Local(Arc<LocalRegion>),
    /// A region of `agent` (ourselves for `loadLocalMD`).
    Remote {
        agent: AgentName,
        region: RegionPublic,
    },
}

/// The distinct metadata objects of one descriptor list, in order of first
/// appearance, each resolved once.
struct Interned<T> {
    index: HashMap<MdId, u32>,
    /// Consecutive descriptors nearly always share their metadata.
    last: Option<(MdId, u32)>,
    items: Vec<T>,
}

impl<T> Default for Interned<T> {
    fn default() -> Self {
        Interned {
            index: HashMap::new(),
            last: None,
            items: Vec::new(),
        }
    }
}

impl<T> Interned<T> {
    /// The index of `md`, resolving it with `resolve` on its first appearance.
    fn index(&mut self, md: MdId, resolve: impl FnOnce() -> Result<T>) -> Result<u32> {
        if let Some((last, x)) = self.last
            && last == md
        {
            return Ok(x);
        }
        let x = match self.index.get(&md) {
            Some(&x) => x,
            None => {
                self.items.push(resolve()?);
                let x = (self.items.len() - 1) as u32;
                self.index.insert(md, x);
                x
            }
        };
        self.last = Some((md, x));
        Ok(x)
    }
}

/// A peer whose connection info was loaded, and the routes that reach it
/// (in order of preference), or why none does.
struct Peer {
    info: ConnInfo,
    routes: Result<Vec<Arc<dyn Route>>>,
}

impl Peer {
    /// Closes every route to the peer.
    fn close(&self) {
        for route in self.routes.iter().flatten() {
            route.close();
        }
    }
}

struct Request {
    plan: Arc<Plan>,
    /// The route chosen for the plan at prep time.
    route: Arc<dyn Route>,
    /// Held only briefly: never across a post, never across I/O.
    slot: Mutex<Slot>,
    /// Signalled (under `slot`) when a post in progress returns.
    posted: parking_lot::Condvar,
}

/// Where a request stands.
#[derive(Default)]
struct Slot {
    /// The last post.
    current: Option<Posted>,
    /// A `postXfer` is starting a post right now (on another thread).
    posting: bool,
    /// `releaseReqH` was called: no post may start any more.
    released: bool,
}

impl Request {
    /// No post may start any more; the last one is cancelled (after a post
    /// starting right now on another thread has returned).
    fn release(&self) {
        let mut slot = self.slot.lock();
        slot.released = true;
        while slot.posting {
            self.posted.wait(&mut slot);
        }
        let current = slot.current.take();
        drop(slot);
        if let Some(posted) = current {
            posted.transfer.cancel();
        }
    }
}

/// Refuses a notification longer than any transport carries.
///
/// # Errors
/// [`Error::InvalidParam`] naming the call and the sizes.
fn check_notif_len(what: &str, msg: Option<&[u8]>) -> Result<()> {
    match msg {
        Some(m) if m.len() > MAX_NOTIF as usize => Err(Error::InvalidParam(format!(
            "{what}: a notification of {} bytes exceeds the limit of {MAX_NOTIF} bytes",
            m.len()
        ))),
        _ => Ok(()),
    }
}

/// Two `checkXfer` calls of one thread on one request, with no other
/// request checked between them and this close together, are a caller
/// spinning on it.
const SPIN_CHECK: Duration = Duration::from_micros(50);

thread_local! {
    /// This thread's last `checkXfer` of a request in progress: the engine
    /// (its address), the request, and when the call ended.
    static LAST_CHECK: Cell<Option<(usize, ReqId, Instant)>> = const { Cell::new(None) };
}

/// A spinning `checkXfer` waits for the rest of a transfer as if it moved at
/// this many bytes per nanosecond (GB/s): faster than any of our transports.
const SPIN_WAIT_BYTES_PER_NS: u64 = 20;
/// ... but no longer than this per call ...
const SPIN_WAIT_MAX: Duration = Duration::from_micros(200);
/// ... and not at all below this (it yields instead).
const SPIN_WAIT_MIN: Duration = Duration::from_micros(10);

/// One agent's backend engine.
pub struct Engine {
    endpoint: Arc<Endpoint>,
    transports: Transports,
    /// Our route to ourselves (NIXL's loopback).
    loopback: Arc<dyn Route>,
    conn_blob: Vec<u8>,
    mds: RwLock<HashMap<MdId, Md>>,
    peers: RwLock<HashMap<AgentName, Arc<Peer>>>,
    /// Serialises `loadRemoteConnInfo`.
    loading: Mutex<()>,
    requests: RequestSlab<Arc<Request>>,
    worker: Arc<Worker>,
    /// `checkXfer` calls that waited for a transfer (for tests).
    spin_waits: AtomicU64,
    /// `checkXfer` calls that moved a step of a transfer (for tests).
    spin_helps: AtomicU64,
}

impl Engine {
    /// Creates an engine.
    ///
    /// # Errors
    /// [`Error::InvalidParam`] for an invalid option value,
    /// [`Error::Backend`] when the progress thread cannot start.
    pub fn new(config: EngineConfig) -> Result<Engine> {
        Self::with_transports(config, |_| {})
    }

    /// [`Self::new`], with the transports' configuration changed by `tweak`
    /// after the options set it (tests tune transport internals this way).
    pub(crate) fn with_transports(
        config: EngineConfig,
        tweak: impl FnOnce(&mut transport::Config),
    ) -> Result<Engine> {
        let resolved = Options::from_params_and_env(
            config.params.iter().map(|(k, v)| (k.as_str(), v.as_str())),
        )?;
        info!("Mooncake: options: {}", resolved.describe());
        let options = resolved.options;
        let name = AgentName::from(config.local_agent.as_slice());
        let endpoint = Arc::new(Endpoint {
            name: name.clone(),
            token: random_u128(),
            registry: Registry::default(),
            inbox: Inbox::default(),
            peers: Default::default(),
        });
        let mut transport_config = options.transport_config();
        tweak(&mut transport_config);
        let transports = Transports::start(endpoint.clone(), transport_config)?;
        let worker = Worker::start(config.progress_thread, config.progress_delay).map_err(|e| {
            transports.shutdown();
            Error::Backend(format!("cannot start the progress thread: {e}"))
        })?;
        info!(
            "Mooncake: engine for agent {name} created (protocol={}, progress thread {})",
            options.protocol.as_str(),
            if config.progress_thread { "on" } else { "off" }
        );
        Ok(Engine {
            conn_blob: transports.conn_info().encode(),
            loopback: transports.loopback(),
            transports,
            endpoint,
            mds: RwLock::new(HashMap::new()),
            peers: RwLock::new(HashMap::new()),
            loading: Mutex::new(()),
            requests: RequestSlab::default(),
            worker,
            spin_waits: AtomicU64::new(0),
            spin_helps: AtomicU64::new(0),
        })
    }

    /// This agent's name.
    pub fn name(&self) -> &AgentName {
        &self.endpoint.name
    }

    /// True when a progress thread runs transfers.
    pub fn has_progress_thread(&self) -> bool {
        self.worker.has_thread()
    }

    // ---- connection info -------------------------------------------------

    /// `getConnInfo`: the blob peers pass to [`Self::load_remote_conn_info`].
    pub fn conn_info(&self) -> &[u8] {
        &self.conn_blob
    }

    /// `loadRemoteConnInfo`: learns how to reach `agent`. Loading the same
    /// info twice is a no-op; new info for a known agent (it restarted)
    /// replaces the old.
    ///
    /// # Errors
    /// [`Error::InvalidParam`] when the blob is malformed or names another agent.
    pub fn load_remote_conn_info(&self, agent: &[u8], blob: &[u8]) -> Result<()> {
        let name = AgentName::from(agent);
        let info = ConnInfo::decode(blob)
            .map_err(|e| Error::InvalidParam(format!("connection info of agent {name}: {e}")))?;
        if info.agent != agent {
            return Err(Error::InvalidParam(format!(
                "connection info of agent {} was presented as agent {name}",
                AgentName::from(info.agent.as_slice())
            )));
        }
        // One load at a time: two threads loading the same info must not
        // both build routes (loads are rare; transfers never take this).
        let _loading = self.loading.lock();
        if let Some(old) = self.peers.read().get(&name) {
            // Equal in every field: a reload. Same token but another field
            // changed (NIXL may have refused metadata that carried it, then
            // retries with the right one): the new info replaces the old.
            if old.info == info {
                return Ok(());
            }
            info!(
                "Mooncake: agent {name} has new connection info (it restarted, or it changed); replacing"
            );
        }
        crate::common::fault::point("engine.loading", self.endpoint.token);
        self.endpoint.peers.learn(
            name.clone(),
            Known {
                token: info.token,
                tcp: info
                    .endpoints
                    .iter()
                    .map(|e| match e {
                        WireEndpoint::Tcp(a) => *a,
                    })
                    .collect(),
            },
        );
        let routes = self.transports.routes(&info);
        match &routes {
            Ok(_) => {} // the choice and its reason are logged by the selection
            Err(e) => info!("Mooncake: agent {name} is not reachable: {e}"),
        }
        let old = self
            .peers
            .write()
            .insert(name, Arc::new(Peer { info, routes }));
        if let Some(old) = old {
            old.close();
        }
        Ok(())
    }

    /// `connect`: checks that `agent` is reachable (connections are otherwise
    /// made lazily, on the first transfer).
    ///
    /// # Errors
    /// [`Error::NotFound`] for an agent whose connection info was never
    /// loaded; the route's error when no transport reaches it.
    pub fn connect(&self, agent: &[u8]) -> Result<()> {
        if agent == self.name().as_bytes() {
            return Ok(());
        }
        self.route(agent)?.connect()
    }

    /// `disconnect`: forgets `agent`'s connection info.
    ///
    /// # Errors
    /// [`Error::NotFound`] for an unknown agent.
    pub fn disconnect(&self, agent: &[u8]) -> Result<()> {
        if agent == self.name().as_bytes() {
            return Ok(());
        }
        let name = AgentName::from(agent);
        let peer = self
            .peers
            .write()
            .remove(&name)
            .ok_or_else(|| Error::NotFound(format!("disconnect: unknown agent {name}")))?;
        self.endpoint.peers.forget(&name);
        peer.close();
        self.transports.forget(&name);
        Ok(())
    }

    /// The routes to `agent` in order of preference, or why there are none.
    fn routes(&self, agent: &[u8]) -> Result<Vec<Arc<dyn Route>>> {
        self.peer(agent)?.routes.clone()
    }

    /// The preferred route to `agent`.
    fn route(&self, agent: &[u8]) -> Result<Arc<dyn Route>> {
        Ok(self.routes(agent)?.swap_remove(0))
    }

    fn peer(&self, agent: &[u8]) -> Result<Arc<Peer>> {
        let name = AgentName::from(agent);
        self.peers.read().get(&name).cloned().ok_or_else(|| {
            Error::NotFound(format!(
                "agent {name}: its connection info was never loaded"
            ))
        })
    }

    // ---- memory ------------------------------------------------------------

    fn new_md(&self, md: Md) -> MdId {
        let id = NEXT_MD.fetch_add(1, Ordering::Relaxed);
        if let Md::Local(region) = &md {
            public_registrations()
                .write()
                .insert(id, region.public(self.endpoint.token));
        }
        self.mds.write().insert(id, md);
        id
    }

    /// `registerMem`: host memory as it is; GPU memory (`VRAM_SEG`) after
    /// the CUDA driver confirmed that the range is memory of device
    /// `dev_id` (the driver is loaded then, on first use).
    ///
    /// # Errors
    /// See [`Registry::register`] and [`cuda::inspect`].
    pub fn register_mem(&self, addr: u64, len: u64, mem_type: u32, dev_id: u64) -> Result<MdId> {
        let registry = &self.endpoint.registry;
        let region = if mem_type == VRAM_SEG {
            if addr == 0 {
                return Err(Error::InvalidParam("registerMem: null address".into()));
            }
            // Shared with same-host peers only where this engine has such paths.
            let share = self.transports.same_host_paths();
            registry.register_device(addr, len, cuda::inspect(addr, len, dev_id, share)?)?
        } else {
            registry.register(addr, len, mem_type, dev_id)?
        };
        Ok(self.new_md(Md::Local(region)))
    }

    /// `deregisterMem`: after return no byte moves into or out of the region.
    ///
    /// # Errors
    /// [`Error::NotFound`] when `md` is not one of our registrations.
    pub fn deregister_mem(&self, md: MdId) -> Result<()> {
        let mut mds = self.mds.write();
        match mds.get(&md) {
            Some(Md::Local(region)) => {
                let key = region.key;
                mds.remove(&md);
                drop(mds);
                public_registrations().write().remove(&md);
                self.endpoint.registry.deregister(key)
            }
            Some(Md::Remote { .. }) => Err(Error::InvalidParam(format!(
                "deregisterMem: metadata {md} is a remote region (use unloadMD)"
            ))),
            None => Err(Error::NotFound(format!(
                "deregisterMem: unknown metadata {md}"
            ))),
        }
    }

    /// `getPublicData`: what a peer needs to address the region. A handle
    /// another engine of this process returned for its registration
    /// answers for exactly that region (owned by that engine).
    ///
    /// # Errors
    /// [`Error::NotFound`] when `md` is not a live local registration of
    /// any engine of this process.
    pub fn public_data(&self, md: MdId) -> Result<Vec<u8>> {
        match public_registrations().read().get(&md) {
            Some(region) => Ok(region.encode()),
            None => Err(Error::NotFound(format!(
                "getPublicData: {md} is not a live local registration"
            ))),
        }
    }

    /// `loadRemoteMD`: a peer's region, from the descriptor NIXL received and
    /// the public data our peer produced.
    ///
    /// # Errors
    /// [`Error::NotFound`] for an agent whose connection info is unknown,
    /// [`Error::InvalidParam`] for malformed or inconsistent metadata.
    pub fn load_remote_md(
        &self,
        addr: u64,
        len: u64,
        mem_type: u32,
        blob: &[u8],
        agent: &[u8],
    ) -> Result<MdId> {
        let name = AgentName::from(agent);
        let region = RegionPublic::decode(blob)
            .map_err(|e| Error::InvalidParam(format!("loadRemoteMD from agent {name}: {e}")))?;
        let owner = if agent == self.name().as_bytes() {
            self.endpoint.token
        } else {
            self.peer(agent)?.info.token
        };
        if region.owner != owner {
            return Err(Error::InvalidParam(format!(
                "loadRemoteMD: region metadata does not belong to the engine of agent {name} \
                 we know (stale metadata from an earlier run?)"
            )));
        }
        if region.mem_type != mem_type || !region.contains(addr, len) {
            return Err(Error::InvalidParam(format!(
                "loadRemoteMD: descriptor {addr:#x}+{len} (type {mem_type}) does not match agent \
                 {name}'s registration {:#x}+{} (type {})",
                region.addr, region.len, region.mem_type
            )));
        }
        Ok(self.new_md(Md::Remote {
            agent: name,
            region,
        }))
    }

    /// `loadLocalMD`: a self-contained remote-style view of our own region,
    /// for loopback transfers.
    ///
    /// # Errors
    /// [`Error::NotFound`] when `md` is not one of our registrations.
    pub fn load_local_md(&self, md: MdId) -> Result<MdId> {
        let region = match self.mds.read().get(&md) {
            Some(Md::Local(region)) => region.public(self.endpoint.token),
            _ => {
                return Err(Error::NotFound(format!(
                    "loadLocalMD: {md} is not a local registration"
                )));
            }
        };
        Ok(self.new_md(Md::Remote {
            agent: self.name().clone(),
            region,
        }))
    }

    /// `unloadMD`.
    ///
    /// # Errors
    /// [`Error::NotFound`] when `md` is not a loaded remote metadata object.
    pub fn unload_md(&self, md: MdId) -> Result<()> {
        let removed = {
            let mut mds = self.mds.write();
            match mds.get(&md) {
                Some(Md::Remote { .. }) => mds.remove(&md),
                Some(Md::Local(_)) => {
                    return Err(Error::InvalidParam(format!(
                        "unloadMD: metadata {md} is a local registration (use deregisterMem)"
                    )));
                }
                None => return Err(Error::NotFound(format!("unloadMD: unknown metadata {md}"))),
            }
        };
        // What the routes keep for the region goes (outside the table's lock).
        if let Some(Md::Remote { agent, region }) = removed {
            let peer = self.peers.read().get(&agent).cloned();
            for route in peer.iter().flat_map(|p| p.routes.iter().flatten()) {
                route.unloaded(region.key);
            }
        }
        Ok(())
    }

    // ---- transfers -----------------------------------------------------------

    /// `prepXfer`: validates the descriptor lists and builds a reusable request.
    ///
    /// # Errors
    /// [`Error::Mismatch`] for lists of different counts or lengths,
    /// [`Error::InvalidParam`] / [`Error::NotFound`] for descriptors whose
    /// metadata is unknown, of the wrong agent, or whose range lies outside
    /// it, and the route's error when the agent cannot be reached.
    pub fn prep_xfer(
        &self,
        op: Op,
        local: &[Desc],
        remote: &[Desc],
        agent: &[u8],
    ) -> Result<ReqId> {
        let name = AgentName::from(agent);
        if local.len() != remote.len() {
            return Err(Error::Mismatch(format!(
                "prepXfer: {} local descriptors but {} remote",
                local.len(),
                remote.len()
            )));
        }
        let routes = if name == *self.name() {
            vec![self.loopback.clone()]
        } else {
            self.routes(agent)?
        };
        let same_space = routes.iter().any(|r| r.same_address_space());
        let plan = self.plan(op, local, remote, &name, same_space)?;
        let route = transport::select::choose(&routes, &plan, &name)?.clone();
        let id = self.requests.insert(Arc::new(Request {
            plan: Arc::new(plan),
            route,
            slot: Mutex::new(Slot::default()),
            posted: parking_lot::Condvar::new(),
        }));
        Ok(id)
    }

    /// The plan of a transfer between `local` and `remote` (of `agent`,
    /// whose addresses are ours when `same_space`).
    fn plan(
        &self,
        op: Op,
        local: &[Desc],
        remote: &[Desc],
        agent: &AgentName,
        same_space: bool,
    ) -> Result<Plan> {
        let mds = self.mds.read();
        let mut locals = Interned::default();
        let mut remotes = Interned::<RegionPublic>::default();
        let mut remote_extent: Vec<(u64, u64)> = Vec::new();
        let mut segments = Vec::with_capacity(local.len());
        let mut total_bytes = 0;
        for (i, (l, r)) in local.iter().zip(remote).enumerate() {
            if l.len != r.len {
                return Err(Error::Mismatch(format!(
                    "prepXfer: descriptor {i} is {} bytes locally but {} remotely",
                    l.len, r.len
                )));
            }
            let li = locals.index(l.md, || match mds.get(&l.md) {
                Some(Md::Local(region)) => Ok(region.clone()),
                Some(Md::Remote { .. }) => Err(Error::InvalidParam(format!(
                    "prepXfer: local descriptor {i} carries a remote region's metadata"
                ))),
                None => Err(Error::NotFound(format!(
                    "prepXfer: local descriptor {i} carries metadata {} this engine does not know",
                    l.md
                ))),
            })?;
            if !locals.items[li as usize].contains(l.addr, l.len) {
                return Err(Error::InvalidParam(format!(
                    "prepXfer: local descriptor {i} ({:#x}+{}) lies outside its registration",
                    l.addr, l.len
                )));
            }
            let ri = remotes.index(r.md, || match mds.get(&r.md) {
                Some(Md::Remote { agent: a, region }) if a == agent => Ok(region.clone()),
                Some(Md::Remote { agent: a, .. }) => Err(Error::InvalidParam(format!(
                    "prepXfer: remote descriptor {i} belongs to agent {a}, not {agent}"
                ))),
                Some(Md::Local(_)) => Err(Error::InvalidParam(format!(
                    "prepXfer: remote descriptor {i} carries a local registration, not metadata \
                     of agent {agent}"
                ))),
                None => Err(Error::NotFound(format!(
                    "prepXfer: remote descriptor {i} carries metadata {} this engine does not know",
                    r.md
                ))),
            })?;
            if !remotes.items[ri as usize].contains(r.addr, r.len) {
                return Err(Error::InvalidParam(format!(
                    "prepXfer: remote descriptor {i} ({:#x}+{}) lies outside agent {agent}'s registration",
                    r.addr, r.len
                )));
            }
            if remote_extent.len() == ri as usize {
                remote_extent.push((u64::MAX, 0));
            }
            let extent = &mut remote_extent[ri as usize];
            extent.0 = extent.0.min(r.addr);
            // Inside a region that does not wrap (checked at loadRemoteMD).
            extent.1 = extent.1.max(r.addr.saturating_add(r.len));
            total_bytes += l.len;
            // A descriptor that continues the previous one on both sides, in
            // the same regions, joins its segment (consecutive blocks, as
            // vLLM lists them): fewer frames, work requests and device
            // copies, the same bytes in the same places. Not when the two
            // sides of the joined segment would overlap in one address space
            // (a copy onto itself behaves per descriptor).
            let continues = |p: &Segment| {
                let joined = p.len.saturating_add(l.len);
                p.local == li
                    && p.remote == ri
                    && p.local_addr.checked_add(p.len) == Some(l.addr)
                    && p.remote_addr.checked_add(p.len) == Some(r.addr)
                    && !(same_space
                        && p.local_addr < p.remote_addr.saturating_add(joined)
                        && p.remote_addr < p.local_addr.saturating_add(joined))
            };
            match segments.last_mut() {
                Some(p) if continues(p) => p.len += l.len,
                _ => segments.push(Segment {
                    local: li,
                    remote: ri,
                    local_addr: l.addr,
                    remote_addr: r.addr,
                    len: l.len,
                }),
            }
        }
        let remote_kinds = remotes
            .items
            .iter()
            .map(|r| MemKind::from_nixl(r.mem_type, r.dev_id))
            .collect();
        Ok(Plan {
            op,
            segments,
            local_regions: locals.items,
            remote_regions: remotes.items,
            remote_kinds,
            remote_extent,
            total_bytes,
        })
    }

    /// `postXfer`: starts (or restarts) a prepped request. `notif` is
    /// delivered to the remote agent after all of this post's data landed.
    ///
    /// Returns [`Status::Success`] when the transfer finished inline, else
    /// [`Status::InProg`].
    ///
    /// # Errors
    /// [`Error::NotFound`] for an unknown handle, [`Error::RepostActive`]
    /// while the previous post runs, [`Error::RemoteDisconnect`] when the
    /// peer is gone, [`Error::NotAllowed`] when the peer refuses a range.
    pub fn post_xfer(&self, id: ReqId, notif: Option<&[u8]>) -> Result<Status> {
        check_notif_len("postXfer", notif)?;
        let req = self.request(id, "postXfer")?;
        let previous = {
            let mut slot = req.slot.lock();
            if slot.released {
                return Err(Error::NotFound(format!(
                    "postXfer: request {id:#x} was released"
                )));
            }
            if slot.posting
                || slot
                    .current
                    .as_ref()
                    .is_some_and(|p| p.transfer.completion().in_progress())
            {
                return Err(Error::RepostActive(format!(
                    "postXfer: request {id:#x} is still in flight"
                )));
            }
            slot.posting = true;
            slot.current.take()
        };
        // The request's state is not locked while the post starts (it never
        // waits on the network, but a release or a check must not wait for
        // it either). What the previous post moved has stopped moving.
        if let Some(previous) = previous {
            previous.transfer.cancel();
        }
        crate::common::fault::point("engine.posting", self.endpoint.token);
        let started = req.route.post(&req.plan, notif);
        let mut slot = req.slot.lock();
        slot.posting = false;
        req.posted.notify_all();
        let posted = started?;
        slot.current = Some(posted.clone());
        drop(slot);
        match posted.steps {
            Some(job) => self.run(job, &*posted.transfer, &req.plan),
            None => posted.transfer.completion().result(),
        }
    }

    /// Runs a copy job: small ones inline (lowest latency), others on the
    /// progress worker (or in bounded steps inside this call without one).
    fn run(&self, job: Arc<dyn Job>, transfer: &dyn Transfer, plan: &Plan) -> Result<Status> {
        if plan.total_bytes <= INLINE_BYTES && plan.segments.len() <= INLINE_SEGMENTS {
            job.step(usize::MAX);
        } else {
            self.worker.submit(job);
            if !self.worker.has_thread() {
                self.worker.drive(STEPS_PER_CALL);
            }
        }
        transfer.completion().result()
    }

    /// `checkXfer`: where the last post of the request stands. Without a
    /// progress thread, also advances queued work.
    ///
    /// # Errors
    /// The error the transfer ended with; [`Error::NotFound`] for an
    /// unknown handle, [`Error::InvalidParam`] for one never posted.
    pub fn check_xfer(&self, id: ReqId) -> Result<Status> {
        let req = self.request(id, "checkXfer")?;
        let slot = req.slot.lock();
        let Some(posted) = slot.current.clone() else {
            return if slot.posting {
                Ok(Status::InProg)
            } else {
                Err(Error::InvalidParam(format!(
                    "checkXfer: request {id:#x} was never posted"
                )))
            };
        };
        drop(slot);
        let job = &*posted.transfer;
        if job.completion().in_progress() {
            let moved_by_threads = if posted.steps.is_none() {
                // The transport's own threads move it.
                job.poll();
                true
            } else if !self.worker.has_thread() {
                self.worker.drive(STEPS_PER_CALL);
                false
            } else {
                true
            };
            if job.completion().in_progress() {
                self.pace_spinner(id, job, moved_by_threads);
            }
        }
        job.completion().result()
    }

    /// Leaves the CPU to our threads when the caller spins on request `id`
    /// (this thread checked it last, within [`SPIN_CHECK`]); on a busy host
    /// that is most of the bandwidth. While our threads (`moved_by_threads`)
    /// still have much of the transfer to move, the caller moves a bounded
    /// step of it itself where the transport allows (a copy step no other
    /// thread is moving), or else waits for its completion, at most as long
    /// as the rest would take at a rate above any of our transports reach,
    /// and [`SPIN_WAIT_MAX`]. Otherwise it yields, which with idle cores
    /// returns at once. A caller sweeping over several requests is never
    /// slowed down.
    fn pace_spinner(&self, id: ReqId, job: &dyn Transfer, moved_by_threads: bool) {
        let engine = std::ptr::from_ref(self) as usize;
        let now = Instant::now();
        let spinning = LAST_CHECK.get().is_some_and(|(e, r, t)| {
            e == engine && r == id && now.saturating_duration_since(t) < SPIN_CHECK
        });
        if spinning {
            let wait = Duration::from_nanos(job.remaining_bytes() / SPIN_WAIT_BYTES_PER_NS)
                .min(SPIN_WAIT_MAX);
            if moved_by_threads && wait >= SPIN_WAIT_MIN {
                if job.help() {
                    self.spin_helps.fetch_add(1, Ordering::Relaxed);
                } else {
                    self.spin_waits.fetch_add(1, Ordering::Relaxed);
                    job.completion().wait(wait);
                }
            } else {
                std::thread::yield_now();
            }
        }
        // The caller's next check is measured from the end of this one.
        LAST_CHECK.set(Some((engine, id, Instant::now())));
    }

    /// `releaseReqH`: frees the request; a transfer still in flight is
    /// cancelled first, and one a concurrent `postXfer` is starting is
    /// waited for and cancelled: after return no byte of the request moves.
    /// Never blocks for longer than one bounded copy step or system call.
    ///
    /// # Errors
    /// [`Error::NotFound`] for an unknown handle.
    pub fn release_req(&self, id: ReqId) -> Result<()> {
        let req = self
            .requests
            .remove(id)
            .ok_or_else(|| Error::NotFound(format!("releaseReqH: unknown request {id:#x}")))?;
        req.release();
        Ok(())
    }

    fn request(&self, id: ReqId, what: &str) -> Result<Arc<Request>> {
        self.requests
            .get(id)
            .ok_or_else(|| Error::NotFound(format!("{what}: unknown request {id:#x}")))
    }

    /// How many `checkXfer` calls waited for their transfer (for tests).
    #[cfg(test)]
    pub(crate) fn spin_waits(&self) -> u64 {
        self.spin_waits.load(Ordering::Relaxed)
    }

    /// How many `checkXfer` calls moved a step of their transfer (for tests).
    #[cfg(test)]
    pub(crate) fn spin_helps(&self) -> u64 {
        self.spin_helps.load(Ordering::Relaxed)
    }

    /// Number of live request handles.
    pub fn live_requests(&self) -> usize {
        self.requests.len()
    }

    // ---- notifications ---------------------------------------------------------

    /// `getNotifs`: every notification received since the last call.
    pub fn get_notifs(&self) -> Vec<Notification> {
        self.endpoint.inbox.drain()
    }

    /// `genNotif`: sends `msg` to `agent` (which may be ourselves).
    ///
    /// # Errors
    /// [`Error::NotFound`] for an unknown agent, the route's error when it
    /// cannot be reached.
    pub fn gen_notif(&self, agent: &[u8], msg: &[u8]) -> Result<()> {
        check_notif_len("genNotif", Some(msg))?;
        if agent == self.name().as_bytes() {
            self.loopback.notify(msg)
        } else {
            self.route(agent)?.notify(msg)
        }
    }
}

impl Drop for Engine {
    fn drop(&mut self) {
        // No peer reaches us any more: no new access to our memory starts.
        self.transports.shutdown();
        // Connections first: shutting their sockets releases any thread
        // blocked on a peer, so the cancels below cannot wait on the network.
        for (_, peer) in self.peers.get_mut().drain() {
            peer.close();
        }
        self.worker.shutdown();
        for req in self.requests.drain() {
            req.release();
        }
        // Peers may still hold our regions in their jobs: make sure none of
        // them touches our memory once we are gone.
        let mut public = public_registrations().write();
        for (id, md) in self.mds.get_mut().iter() {
            if let Md::Local(region) = md {
                public.remove(id);
                let _ = self.endpoint.registry.deregister(region.key);
            }
        }
        drop(public);
        info!(
            "Mooncake: engine for agent {} destroyed",
            self.endpoint.name
        );
    }
}

#[cfg(test)]
mod tests;
