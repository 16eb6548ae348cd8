//! The backend: NIXL's semantics, with no I/O of its own.
//!
//! [`Engine`] is the object behind the C++ shim. It owns the options, the
//! registry of local regions, the known peers and their regions, the request
//! slab, the notification inbox and the progress worker. It decides *what*
//! must move and *when a request is done*; the transports decide *how*.

pub mod engine;
pub mod notifs;
pub mod options;
pub mod progress;
pub mod registry;
pub mod requests;
pub mod status;

use std::fmt;
use std::sync::Arc;

pub use engine::{Desc, Engine, EngineConfig, MdId, ReqId};
pub use status::{Error, Result, Status};

/// An agent's name, exactly as NIXL gave it (arbitrary bytes, cheap to clone).
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct AgentName(Arc<[u8]>);

impl AgentName {
    /// The name's bytes.
    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }
}

impl From<&[u8]> for AgentName {
    fn from(bytes: &[u8]) -> Self {
        AgentName(bytes.into())
    }
}

impl From<&str> for AgentName {
    fn from(s: &str) -> Self {
        AgentName(s.as_bytes().into())
    }
}

impl fmt::Display for AgentName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", String::from_utf8_lossy(&self.0))
    }
}

impl fmt::Debug for AgentName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// The part of an engine its peers reach: who it is, what memory it
/// exposes, and where its notifications go. Transports serve peers through it.
#[derive(Debug)]
pub struct Endpoint {
    /// This agent's name.
    pub name: AgentName,
    /// This engine instance's random token.
    pub token: u128,
    /// Local registrations.
    pub registry: registry::Registry,
    /// Notifications received.
    pub inbox: notifs::Inbox,
}
