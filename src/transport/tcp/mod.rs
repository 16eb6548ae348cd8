//! The TCP transport: persistent connections per peer, several streams,
//! one-sided semantics served by the target's own threads.
//!
//! - `server`: accepts connections that present our token and serves them.
//! - `client`: [`PeerLink`], the initiator's connections to one peer.
//! - `io`: vectored socket I/O straight from and into registered memory.
//!
//! Frames are defined in [`crate::wire::frame`].

mod client;
mod io;
mod server;

use std::net::{IpAddr, Ipv4Addr, SocketAddr};

pub use client::{PeerLink, TcpConfig, TcpPost};
pub use server::TcpServer;

/// Environment variable naming the address to listen on (as NIXL's own
/// Mooncake plugin honours it), used when the `ip_addr` option is empty.
pub const IP_ENV: &str = "NIXL_MOONCAKE_IP_ADDR";

/// The address an engine listens on and publishes: the `ip_addr` option,
/// else `$NIXL_MOONCAKE_IP_ADDR`, else the first UP non-loopback IPv4
/// address, else 127.0.0.1.
///
/// # Errors
/// A message when `$NIXL_MOONCAKE_IP_ADDR` is set but not an address.
pub fn listen_address(option: Option<IpAddr>, port: u16) -> Result<SocketAddr, String> {
    if let Some(ip) = option {
        return Ok(SocketAddr::new(ip, port));
    }
    if let Ok(value) = std::env::var(IP_ENV)
        && !value.trim().is_empty()
    {
        let ip: IpAddr = value
            .trim()
            .parse()
            .map_err(|_| format!("{IP_ENV}={value:?} is not an IP address"))?;
        return Ok(SocketAddr::new(ip, port));
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
    Ok(SocketAddr::new(IpAddr::V4(ip), port))
}

/// The default number of streams per peer for this machine.
pub fn default_streams() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(2)
        .clamp(2, 8)
}
