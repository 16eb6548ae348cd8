//! The vocabulary every layer speaks: errors and statuses, agent names,
//! registered memory and its pins, notifications, and the completion of a
//! transfer.
//!
//! Both the backend (NIXL's semantics) and the transports (how bytes move)
//! use these types, so that dependencies run one way: `backend ->
//! transport -> wire`, each of them on top of `common`. Nothing here does
//! I/O or knows a transport.

pub mod agent;
pub mod completion;
#[cfg(test)]
pub mod fakes;
pub mod fault;
pub mod inbox;
pub mod memory;
pub mod peers;
pub mod status;

pub use agent::AgentName;
pub use completion::Completion;
pub use inbox::{Inbox, Notification};
pub use memory::{LocalRegion, MemKind, Pin, Registry};
pub use peers::KnownPeers;
pub use status::{Error, Result, Status};

/// The part of an engine its peers reach: who it is, what memory it
/// exposes, and where its notifications go. Transports serve peers through it.
#[derive(Debug)]
pub struct Endpoint {
    /// This agent's name.
    pub name: AgentName,
    /// This engine instance's random token.
    pub token: u128,
    /// Local registrations.
    pub registry: Registry,
    /// Notifications received.
    pub inbox: Inbox,
    /// The agents whose connection info was loaded: what a connecting
    /// peer's claimed name is checked against.
    pub peers: KnownPeers,
}
