//! The TCP transport: persistent connections per peer, several streams,
//! one-sided semantics served by the target's own threads.
//!
//! - `server`: accepts connections that present our token and serves them.
//! - `client`: [`PeerLink`], the initiator's connections to one peer.
//! - `outbox`: the notifications a link sent and its peer has not
//!   acknowledged yet, sent again after a broken connection.
//! - `io`: vectored socket I/O straight from and into registered memory.
//! - [`ControlService`]: request/answer services other transports offer
//!   through the listener (RDMA's connection setup).
//!
//! Frames are defined in [`crate::wire::frame`].

mod client;
mod io;
mod outbox;
mod server;
mod staging;

use std::any::Any;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

pub use client::{PeerLink, TcpConfig, TcpPost};
pub use server::{MAX_HANDSHAKING, TcpServer};

use super::Transport;
use crate::common::{AgentName, Endpoint, Error, Result};
use crate::wire::conn_info::{self, ConnInfo};

/// The TCP transport of one engine: its listener (serving peers) and the
/// settings of the links it opens to peers.
pub struct TcpTransport {
    server: Arc<TcpServer>,
    me: AgentName,
    my_token: u128,
    config: TcpConfig,
}

impl TcpTransport {
    /// Starts listening for the engine of `endpoint` on `ip_addr:port`
    /// (see [`listen_address`]); served connections busy-poll `busy_poll`
    /// after each request (see [`TcpServer`]). Links to peers use `config`,
    /// whose `stall_timeout` also bounds a served connection's stalls.
    ///
    /// # Errors
    /// [`Error::InvalidParam`] when the address cannot be bound.
    pub fn start(
        endpoint: Arc<Endpoint>,
        ip_addr: Option<IpAddr>,
        port: u16,
        busy_poll: Duration,
        config: TcpConfig,
    ) -> Result<TcpTransport> {
        let addr = listen_address(ip_addr, port);
        let (me, my_token) = (endpoint.name.clone(), endpoint.token);
        let server =
            TcpServer::start(endpoint, addr, config.stall_timeout, busy_poll).map_err(|e| {
                Error::InvalidParam(format!(
                    "cannot listen on {addr} (backend options ip_addr and port, or NIXL_MOONCAKE_IP_ADDR and NIXL_MOONCAKE_PORT): {e}"
                ))
            })?;
        Ok(TcpTransport {
            server,
            me,
            my_token,
            config,
        })
    }

    /// A link to agent `peer` (whose engine has `token`) listening at
    /// `addr`; nothing connects yet.
    pub fn route(&self, peer: &AgentName, token: u128, addr: SocketAddr) -> Arc<PeerLink> {
        PeerLink::new(
            self.me.clone(),
            self.my_token,
            peer.clone(),
            token,
            addr,
            self.config,
        )
    }

    /// Offers `service` to authenticated peers as control service `id`
    /// (see [`ControlService`]).
    pub fn offer(&self, id: u64, service: Arc<dyn ControlService>) {
        self.server.offer(id, service);
    }

    /// Calls control service `id` of the engine `token` listening at `addr`
    /// with `request`, on a connection of its own, within `within`.
    ///
    /// # Errors
    /// [`Error::RemoteDisconnect`] when the peer cannot be reached in time;
    /// [`Error::Backend`] with the service's reason when it refused.
    pub fn call(
        &self,
        addr: SocketAddr,
        token: u128,
        id: u64,
        request: &[u8],
        within: Duration,
    ) -> Result<Vec<u8>> {
        client::control_call(addr, token, (&self.me, self.my_token), id, request, within)
    }

    /// The listener (for tests).
    pub fn server(&self) -> &Arc<TcpServer> {
        &self.server
    }
}

impl Transport for TcpTransport {
    fn name(&self) -> &'static str {
        "tcp"
    }

    fn publish(&self, info: &mut ConnInfo) {
        info.endpoints
            .push(conn_info::Endpoint::Tcp(self.server.local_addr()));
    }

    fn forget(&self, peer: &AgentName) {
        self.server.close_from(peer);
    }

    fn shutdown(&self) {
        self.server.shutdown();
    }

    fn as_any(&self) -> &dyn Any {
        self
    }
}

/// A service another transport offers through our TCP listener (RDMA's
/// connection setup): requests arrive in Control frames from peers that
/// passed the handshake (they presented our token), and are answered once.
pub trait ControlService: Send + Sync {
    /// Answers `request` from agent `peer`, whose engine presented token
    /// `peer_token`; `Err` carries the reason of a refusal.
    ///
    /// # Errors
    /// The refusal's reason, sent to the peer.
    fn call(
        &self,
        peer: &AgentName,
        peer_token: u128,
        request: &[u8],
    ) -> std::result::Result<Vec<u8>, String>;
}

/// The address an engine listens on and publishes: the `ip_addr` option
/// (which `$NIXL_MOONCAKE_IP_ADDR` sets when `customParams` do not, as NIXL's
/// own Mooncake plugin honours it), else the first UP non-loopback IPv4
/// address, else 127.0.0.1.
pub fn listen_address(option: Option<IpAddr>, port: u16) -> SocketAddr {
    if let Some(ip) = option {
        return SocketAddr::new(ip, port);
    }
    let ip = if_addrs::get_if_addrs()
        .unwrap_or_default()
        .into_iter()
        .filter(|i| !i.is_loopback() && i.is_oper_up())
        .find_map(|i| match i.ip() {
            IpAddr::V4(v4) => Some(v4),
            IpAddr::V6(_) => None,
        })
        .unwrap_or(Ipv4Addr::LOCALHOST);
    SocketAddr::new(IpAddr::V4(ip), port)
}

/// The default number of streams per peer for this machine.
pub fn default_streams() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(2)
        .clamp(2, 8)
}
