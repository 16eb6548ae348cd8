//! Selection: which transports an engine runs, which routes reach a peer,
//! and which route serves a plan. The only module that knows every
//! transport.
//!
//! - Per engine ([`Transports::start`]): the in-process copy and the TCP
//!   listener always; cross-memory attach under `protocol=auto` and `cma`;
//!   RDMA under `auto` (when a verbs library and an active port exist) and
//!   `rdma` (which otherwise fails every route with the reason).
//! - Per peer ([`Transports::routes`], when its connection info is loaded):
//!   under `auto` a direct copy for an engine of this process,
//!   cross-memory attach on the same host when the probe succeeds, then CUDA
//!   IPC for the peer's GPU memory, then TCP for the rest (GPU memory
//!   without IPC, our GPU memory to its host memory) (without the probe TCP,
//!   with one log line saying why), RDMA for a peer on another host whose
//!   NICs ours reach (host memory, and GPU memory by GPUDirect RDMA when
//!   the verbs library registers dmabufs; then TCP for the rest), TCP
//!   otherwise; `tcp`, `cma` and `rdma` force that transport. Routes come
//!   in order of preference.
//! - Per plan ([`choose`], at `prepXfer`): the first route that serves the
//!   memory kinds on both sides of every segment, or an error naming each
//!   route's transport and the kinds it was asked for.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use crate::common::{AgentName, Endpoint, Error, MemKind, Result};
use crate::wire::conn_info::{self, ConnInfo, HostIdentity};

use super::cma::{CmaRoute, CmaTransport};
use super::cuda_ipc::IpcRoute;
use super::inproc::InProcTransport;
use super::rdma::{RdmaConfig, RdmaTransport};
use super::tcp::{TcpConfig, TcpTransport};
use super::{Plan, Route, Transport};

/// Which transport to use for peers in other processes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    /// Pick per peer: a direct copy in the same process, else the best
    /// transport this build has for the peer.
    Auto,
    /// Always TCP.
    Tcp,
    /// Always cross-memory attach (same host only); fail otherwise.
    Cma,
    /// Always RDMA; fail if no device is usable.
    Rdma,
}

impl Protocol {
    /// Parses the option's value (any case).
    pub fn parse(value: &str) -> Option<Protocol> {
        Some(match value.to_ascii_lowercase().as_str() {
            "auto" => Protocol::Auto,
            "tcp" => Protocol::Tcp,
            "cma" => Protocol::Cma,
            "rdma" => Protocol::Rdma,
            _ => return None,
        })
    }

    /// The option's spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Auto => "auto",
            Protocol::Tcp => "tcp",
            Protocol::Cma => "cma",
            Protocol::Rdma => "rdma",
        }
    }
}

/// What the transports of one engine are configured with (from the
/// backend's options).
#[derive(Debug, Clone)]
pub struct Config {
    /// Transport selection for peers.
    pub protocol: Protocol,
    /// Address to listen on; `None` picks one (see
    /// [`super::tcp::listen_address`]).
    pub ip_addr: Option<IpAddr>,
    /// TCP port; 0 = ephemeral.
    pub port: u16,
    /// TCP streams per peer; `None` = per core count.
    pub streams: Option<usize>,
    /// A peer that neither answers nor takes data for this long while work
    /// is outstanding is declared dead; zero disables.
    pub timeout: Duration,
    /// How long a served TCP connection busy-polls for the next request.
    pub busy_poll: Duration,
    /// Tunables of the TCP initiator (tests change them); `streams` and
    /// `stall_timeout` are set from the fields above.
    pub tcp: TcpConfig,
    /// The RDMA transport's settings (`required` is set from `protocol`).
    pub rdma: RdmaConfig,
    /// Tests only: peers of this host are taken for peers on another host
    /// (so that `protocol=auto` offers RDMA on one machine).
    pub other_host: bool,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            protocol: Protocol::Auto,
            ip_addr: None,
            port: 0,
            streams: None,
            timeout: Duration::from_secs(30),
            busy_poll: Duration::from_micros(30),
            tcp: TcpConfig::default(),
            rdma: RdmaConfig::default(),
            other_host: false,
        }
    }
}

/// The transports of one engine.
pub struct Transports {
    protocol: Protocol,
    info: ConnInfo,
    inproc: InProcTransport,
    tcp: Arc<TcpTransport>,
    cma: Option<CmaTransport>,
    /// The RDMA transport, or why there is none (under `protocol=rdma`,
    /// the error every route gives; under `auto`, logged once).
    rdma: std::result::Result<Arc<RdmaTransport>, Error>,
    /// Every transport, for publishing and shutdown.
    all: Vec<Arc<dyn Transport>>,
    /// How many times routes were built (for tests).
    routes_built: std::sync::atomic::AtomicUsize,
    /// See [`Config::other_host`].
    other_host: bool,
}

impl Transports {
    /// Starts the transports of the engine whose peer-facing side is
    /// `endpoint`.
    ///
    /// # Errors
    /// [`Error::InvalidParam`] when the TCP listener cannot be opened where
    /// the options say.
    pub fn start(endpoint: Arc<Endpoint>, config: Config) -> Result<Transports> {
        let tcp_config = TcpConfig {
            streams: config.streams.unwrap_or_else(super::tcp::default_streams),
            stall_timeout: config.timeout,
            ..config.tcp
        };
        let tcp = Arc::new(TcpTransport::start(
            endpoint.clone(),
            config.ip_addr,
            config.port,
            config.busy_poll,
            tcp_config,
        )?);
        let cma = match config.protocol {
            Protocol::Auto | Protocol::Cma => CmaTransport::new(&endpoint)
                .inspect_err(|why| {
                    log::warn!(
                        "Mooncake: agent {}: no cross-memory attach for its peers ({why})",
                        endpoint.name
                    )
                })
                .ok(),
            Protocol::Tcp | Protocol::Rdma => None,
        };
        let rdma = match config.protocol {
            Protocol::Auto | Protocol::Rdma => {
                let rdma_config = RdmaConfig {
                    required: config.protocol == Protocol::Rdma,
                    ..config.rdma.clone()
                };
                RdmaTransport::start(endpoint.clone(), tcp.clone(), rdma_config)
                    .map(Arc::new)
                    .inspect_err(|why| {
                        if config.protocol == Protocol::Rdma {
                            log::warn!("Mooncake: agent {}: protocol=rdma: {why}", endpoint.name)
                        } else {
                            log::debug!(
                                "Mooncake: agent {}: no RDMA for peers on other hosts: {why}",
                                endpoint.name
                            )
                        }
                    })
            }
            Protocol::Tcp | Protocol::Cma => Err(Error::NotSupported(format!(
                "protocol={} excludes RDMA",
                config.protocol.as_str()
            ))),
        };
        let inproc = InProcTransport::publish(endpoint.clone());
        let mut all: Vec<Arc<dyn Transport>> = vec![Arc::new(inproc.clone()), tcp.clone()];
        if let Some(cma) = &cma {
            all.push(Arc::new(cma.clone()));
        }
        if let Ok(rdma) = &rdma {
            all.push(rdma.clone());
        }
        let mut info = ConnInfo {
            agent: endpoint.name.as_bytes().to_vec(),
            token: endpoint.token,
            host: HostIdentity::current(),
            pid: std::process::id(),
            endpoints: Vec::new(),
            cma_probe: None,
            rdma: Vec::new(),
        };
        for t in &all {
            t.publish(&mut info);
        }
        Ok(Transports {
            protocol: config.protocol,
            info,
            inproc,
            tcp,
            cma,
            rdma,
            all,
            routes_built: Default::default(),
            other_host: config.other_host,
        })
    }

    /// Our connection info, with every transport's endpoints.
    pub fn conn_info(&self) -> &ConnInfo {
        &self.info
    }

    /// The route of an engine to itself (NIXL's loopback): a direct copy,
    /// whatever the protocol.
    pub fn loopback(&self) -> Arc<dyn Route> {
        Arc::new(self.inproc.loopback())
    }

    /// The routes that reach the peer whose connection info is `remote`,
    /// in order of preference.
    ///
    /// # Errors
    /// [`Error::NotSupported`] when no transport reaches the peer under the
    /// configured protocol; [`Error::RemoteDisconnect`] when the peer is an
    /// engine of this process that no longer exists.
    pub fn routes(&self, remote: &ConnInfo) -> Result<Vec<Arc<dyn Route>>> {
        self.routes_built
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let name = AgentName::from(remote.agent.as_slice());
        let chosen = |routes: Vec<Arc<dyn Route>>, why: &str| {
            log::info!(
                "Mooncake: agent {} reaches agent {name} by {} ({why})",
                AgentName::from(self.info.agent.as_slice()),
                routes[0].describe(),
            );
            routes
        };
        let protocol = format!("protocol={}", self.protocol.as_str());
        if self.protocol == Protocol::Auto && self.info.same_process(remote) && !self.other_host {
            // No network or kernel path beats a copy inside the process.
            let route: Arc<dyn Route> = Arc::new(self.inproc.route(&name, remote.token)?);
            return Ok(chosen(vec![route], "protocol=auto, same process"));
        }
        let agent = String::from_utf8_lossy(&remote.agent);
        let tcp = remote
            .endpoints
            .iter()
            .map(|conn_info::Endpoint::Tcp(addr)| *addr)
            .next();
        let no_tcp = || Error::NotSupported(format!("agent {agent:?} publishes no TCP endpoint"));
        let tcp_route = |addr| -> Arc<dyn Route> { self.tcp.route(&name, remote.token, addr) };
        let same_host = self.info.host.same_host(&remote.host) && !self.other_host;
        // One TCP link per peer, shared by cross-memory attach (its control
        // messages) and by the plans it cannot serve (GPU memory).
        let link = tcp.map(tcp_route);
        let cma = || -> std::result::Result<CmaRoute, String> {
            if !same_host {
                return Err(format!(
                    "it runs on another host or PID namespace (host {:?})",
                    remote.host.hostname
                ));
            }
            let cma = self
                .cma
                .as_ref()
                .ok_or("this engine does not use cross-memory attach")?;
            let probe_addr = remote.cma_probe.ok_or(
                "it does not accept cross-memory attach (its protocol option excludes it)",
            )?;
            let control = link
                .clone()
                .ok_or("it publishes no TCP endpoint for control messages")?;
            cma.route(&name, remote.pid, probe_addr, remote.token, control)
        };
        let only = |r: Arc<dyn Route>| vec![r];
        // RDMA to a peer that publishes NICs ours reach, with its TCP link
        // for connection setup, notifications outside transfers and its
        // liveness.
        let rdma = || -> Result<Arc<dyn Route>> {
            let t = self.rdma.as_ref().map_err(Clone::clone)?;
            if remote.rdma.is_empty() {
                return Err(Error::NotSupported(format!(
                    "agent {agent:?} publishes no RDMA NIC (its protocol option, or no device there)"
                )));
            }
            let pairs = t.pairs(&remote.rdma);
            if pairs.is_empty() {
                return Err(Error::NotSupported(format!(
                    "none of agent {agent:?}'s RDMA NICs is reachable from ours (another link \
                     layer or InfiniBand subnet)"
                )));
            }
            let addr = tcp.ok_or_else(no_tcp)?;
            let control = link.clone().ok_or_else(no_tcp)?;
            let fallback = self.protocol == Protocol::Auto;
            Ok(Arc::new(t.route(
                (name.clone(), remote.token, addr),
                pairs,
                control,
                fallback,
            )))
        };
        // Cross-memory attach for host memory, then CUDA IPC (riding on the
        // same probe and control page) for the peer's GPU memory.
        let stage = self.protocol == Protocol::Auto;
        let with_ipc = |cma: CmaRoute| -> Vec<Arc<dyn Route>> {
            let ipc = IpcRoute::new(cma.peer().clone(), cma.control().clone(), stage);
            vec![Arc::new(cma), Arc::new(ipc)]
        };
        match self.protocol {
            Protocol::Auto => match cma() {
                Ok(route) => {
                    // GPU memory: CUDA IPC (cross-memory attach never
                    // touches it), else staged over TCP.
                    let mut routes = with_ipc(route);
                    routes.extend(link.clone());
                    Ok(chosen(
                        routes,
                        "protocol=auto, same host, the cross-memory attach probe succeeded; \
                         GPU memory by CUDA IPC or over TCP",
                    ))
                }
                Err(why) => {
                    if same_host {
                        log::warn!(
                            "Mooncake: agent {agent:?} is on this host but cross-memory attach is \
                             not possible ({why}); using TCP"
                        );
                    } else if let Ok(route) = rdma() {
                        // Host memory (and GPU memory, by GPUDirect) by
                        // RDMA, the rest over TCP.
                        let mut routes = vec![route];
                        routes.extend(link.clone());
                        return Ok(chosen(
                            routes,
                            "protocol=auto, another host, RDMA reachable",
                        ));
                    }
                    let why = format!("protocol=auto, no cross-memory attach: {why}");
                    Ok(chosen(only(link.clone().ok_or_else(no_tcp)?), &why))
                }
            },
            Protocol::Tcp => Ok(chosen(only(link.clone().ok_or_else(no_tcp)?), &protocol)),
            Protocol::Cma => match cma() {
                Ok(route) => Ok(chosen(with_ipc(route), &protocol)),
                Err(why) => Err(Error::NotSupported(format!(
                    "protocol=cma: agent {agent:?} cannot be reached with cross-memory attach: {why}"
                ))),
            },
            Protocol::Rdma => match rdma() {
                Ok(route) => Ok(chosen(only(route), &protocol)),
                Err(why) => Err(Error::NotSupported(format!(
                    "protocol=rdma: agent {agent:?} (pid {} on host {:?}) cannot be reached by \
                     RDMA: {}",
                    remote.pid,
                    remote.host.hostname,
                    why.message()
                ))),
            },
        }
    }

    /// True when same-host peers may reach this engine's memory directly
    /// (cross-memory attach, and CUDA IPC with it): GPU memory is then
    /// registered with what they need to map it.
    pub fn same_host_paths(&self) -> bool {
        self.cma.is_some()
    }

    /// How many times [`Self::routes`] was called (for tests).
    pub fn routes_built(&self) -> usize {
        self.routes_built.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// The transport of concrete type `T`, if this engine runs one (for
    /// tests and diagnostics).
    pub fn get<T: 'static>(&self) -> Option<&T> {
        self.all.iter().find_map(|t| t.as_any().downcast_ref::<T>())
    }

    /// Forgets agent `peer` in every transport (NIXL's `disconnect`).
    pub fn forget(&self, peer: &AgentName) {
        for t in &self.all {
            t.forget(peer);
        }
    }

    /// Stops every transport: no peer reaches the engine any more.
    pub fn shutdown(&self) {
        for t in &self.all {
            t.shutdown();
        }
    }
}

/// The first of `routes` (in order of preference) that serves every pair
/// of memory kinds `plan` moves between.
///
/// # Errors
/// [`Error::NotSupported`] naming each route's transport and the kinds,
/// when none serves them.
pub fn choose<'a>(
    routes: &'a [Arc<dyn Route>],
    plan: &Plan,
    agent: &AgentName,
) -> Result<&'a Arc<dyn Route>> {
    let pairs = plan.kind_pairs();
    let serves = |r: &Arc<dyn Route>| pairs.iter().all(|&(l, rk)| r.serves(l, rk));
    routes.iter().find(|r| serves(r)).ok_or_else(|| {
        let wanted = pairs
            .iter()
            .filter(|&&(l, r)| (l, r) != (MemKind::Dram, MemKind::Dram))
            .map(|(l, r)| format!("local {l} with remote {r}"))
            .collect::<Vec<_>>()
            .join(", ");
        let tried = routes
            .iter()
            .map(|r| r.transport())
            .collect::<Vec<_>>()
            .join(", ");
        Error::NotSupported(format!(
            "prepXfer: no transport to agent {agent} moves {wanted} (tried: {tried}); \
             GPU memory moves in one process, by CUDA IPC, by GPUDirect RDMA and over TCP, \
             other memory types not at all"
        ))
    })
}
