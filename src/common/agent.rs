//! [`AgentName`]: a NIXL agent's name.

use std::fmt;
use std::sync::Arc;

/// An agent's name, exactly as NIXL gave it (arbitrary bytes, cheap to clone).
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct AgentName(Arc<[u8]>);

impl AgentName {
    /// The name's bytes.
    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }

    /// How many copies of this name exist (for leak tests).
    #[cfg(test)]
    pub(crate) fn copies(&self) -> usize {
        Arc::strong_count(&self.0)
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
