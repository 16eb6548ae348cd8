//! Who a connecting peer is: the agent name a peer claims when it connects,
//! checked against the connection info NIXL loaded for that name.
//!
//! A peer's hello carries its name and its engine's token. When this engine
//! has loaded connection info for that name, the token must be the one in it
//! ([`Claim::Verified`]); a different token is either the agent restarted (the
//! instance we know is gone) or someone else using its name, which the
//! transport tells apart by asking the known instance whether it is alive
//! ([`Claim::Stale`]). A name whose info was never loaded cannot be checked
//! ([`Claim::Unverified`]): NIXL gives a target no other means.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;

use parking_lot::{Mutex, RwLock};

use super::AgentName;

/// The instance of an agent whose connection info was loaded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Known {
    /// Its engine's token.
    pub token: u128,
    /// The TCP endpoints it serves on (where it can be asked whether it lives).
    pub tcp: Vec<SocketAddr>,
}

/// What a claimed (name, token) is worth.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Claim {
    /// No connection info was loaded for the name: the claim stands unchecked.
    Unverified,
    /// The token is the one in the loaded connection info.
    Verified,
    /// Connection info with another token was loaded for the name, and that
    /// instance is not known to be gone: ask it.
    Stale(Known),
}

/// The agents whose connection info this engine loaded, and the instances
/// seen gone.
#[derive(Debug, Default)]
pub struct KnownPeers {
    known: RwLock<HashMap<AgentName, Known>>,
    /// Tokens of instances found dead; they never come back.
    gone: Mutex<HashSet<u128>>,
}

impl KnownPeers {
    /// `name`'s connection info was loaded.
    pub fn learn(&self, name: AgentName, known: Known) {
        self.known.write().insert(name, known);
    }

    /// `name`'s connection info was dropped.
    pub fn forget(&self, name: &AgentName) {
        self.known.write().remove(name);
    }

    /// Checks a peer's claim to be `name` with engine token `token`.
    pub fn check(&self, name: &AgentName, token: u128) -> Claim {
        match self.known.read().get(name) {
            None => Claim::Unverified,
            Some(k) if k.token == token => Claim::Verified,
            Some(k) if self.gone.lock().contains(&k.token) => Claim::Unverified,
            Some(k) => Claim::Stale(k.clone()),
        }
    }

    /// The instance with `token` was found dead.
    pub fn mark_gone(&self, token: u128) {
        self.gone.lock().insert(token);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_claim_is_checked_against_the_loaded_info_only() {
        let peers = KnownPeers::default();
        let a = AgentName::from("A");
        assert_eq!(peers.check(&a, 1), Claim::Unverified);
        let known = Known {
            token: 1,
            tcp: vec!["127.0.0.1:9".parse().unwrap()],
        };
        peers.learn(a.clone(), known.clone());
        assert_eq!(peers.check(&a, 1), Claim::Verified);
        assert_eq!(peers.check(&a, 2), Claim::Stale(known));
        assert_eq!(peers.check(&AgentName::from("B"), 2), Claim::Unverified);
        peers.mark_gone(1);
        assert_eq!(
            peers.check(&a, 2),
            Claim::Unverified,
            "the known one is gone"
        );
        assert_eq!(peers.check(&a, 1), Claim::Verified);
        peers.forget(&a);
        assert_eq!(peers.check(&a, 1), Claim::Unverified);
    }
}
