//! Connection info: what an engine publishes about itself through NIXL's
//! metadata exchange (`getConnInfo` / `loadRemoteConnInfo`).
//!
//! It identifies the agent (name and a random token that proves a peer read
//! our metadata), the host and process (so a transport can be chosen per
//! peer), and the endpoints the engine serves on.

use serde::{Deserialize, Serialize};

use super::{Envelope, WireError};

const ENVELOPE: Envelope = Envelope {
    magic: b"MCci",
    version: 1,
    kind: "connection info",
};

/// Version 2: the fields of version 1, then the engine's RDMA NICs.
/// Written only by an engine that serves RDMA; everything else is written
/// (and read by older builds) as version 1.
const ENVELOPE_RDMA: Envelope = Envelope {
    magic: b"MCci",
    version: 2,
    kind: "connection info",
};

/// Most RDMA NICs an engine publishes.
pub const MAX_RDMA_NICS: usize = 64;

/// One RDMA port an engine serves on, as peers address it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct RdmaNic {
    /// InfiniBand (true: addressed by LID, within one subnet) or RoCE.
    pub infiniband: bool,
    /// The port's LID (InfiniBand).
    pub lid: u16,
    /// The port's GID (RoCE: the chosen one; InfiniBand: its subnet
    /// prefix and GUID).
    pub gid: [u8; 16],
    /// The port's active MTU (`enum ibv_mtu`, 1..=5).
    pub mtu: i32,
    /// The NIC's NUMA node, -1 when unknown.
    pub numa: i32,
}

/// Identity of the host and PID namespace a process runs in.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostIdentity {
    /// `/proc/sys/kernel/random/boot_id`: equal only on the same booted kernel.
    pub boot_id: String,
    /// Inode of `/proc/self/ns/pid`: equal only in the same PID namespace.
    pub pid_ns: u64,
    /// The host name, for log lines.
    pub hostname: String,
}

impl HostIdentity {
    /// Reads this process's host identity. Missing files give empty fields,
    /// which never compare equal to a real peer's (see [`Self::same_host`]).
    pub fn current() -> HostIdentity {
        use std::os::unix::fs::MetadataExt;
        let read = |p: &str| {
            std::fs::read_to_string(p)
                .map(|s| s.trim().to_owned())
                .unwrap_or_default()
        };
        HostIdentity {
            boot_id: read("/proc/sys/kernel/random/boot_id"),
            pid_ns: std::fs::metadata("/proc/self/ns/pid")
                .map(|m| m.ino())
                .unwrap_or(0),
            hostname: read("/proc/sys/kernel/hostname"),
        }
    }

    /// True when both identities are known and name the same kernel and PID namespace.
    pub fn same_host(&self, other: &HostIdentity) -> bool {
        !self.boot_id.is_empty()
            && self.pid_ns != 0
            && self.boot_id == other.boot_id
            && self.pid_ns == other.pid_ns
    }
}

/// A network endpoint an engine serves on.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Endpoint {
    /// A TCP listener.
    Tcp(std::net::SocketAddr),
}

/// Everything a peer needs to reach this engine.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConnInfo {
    /// The agent's name (NIXL's `localAgent`), as bytes.
    pub agent: Vec<u8>,
    /// A random token, fresh per engine: identifies this engine instance and
    /// authenticates connections from peers that loaded our metadata.
    pub token: u128,
    /// Host and namespace identity.
    pub host: HostIdentity,
    /// Process id (in `host.pid_ns`).
    pub pid: u32,
    /// Endpoints this engine serves on (may be empty).
    pub endpoints: Vec<Endpoint>,
    /// Address of the cookie a same-host peer reads to probe cross-memory
    /// attach (it holds `token`); `None` when this engine does not accept it.
    pub cma_probe: Option<u64>,
    /// The RDMA ports this engine serves on (empty: none; written in
    /// version 2 of the envelope only when not empty).
    #[serde(skip)]
    pub rdma: Vec<RdmaNic>,
}

impl ConnInfo {
    /// Encodes into the blob NIXL carries.
    pub fn encode(&self) -> Vec<u8> {
        if self.rdma.is_empty() {
            ENVELOPE.encode(self)
        } else {
            ENVELOPE_RDMA.encode(&(self, &self.rdma))
        }
    }

    /// Decodes a peer's blob.
    ///
    /// # Errors
    /// A [`WireError`] when the blob is not a connection info of this version.
    pub fn decode(blob: &[u8]) -> Result<ConnInfo, WireError> {
        if blob.get(4) != Some(&ENVELOPE_RDMA.version) {
            return ENVELOPE.decode(blob);
        }
        let (info, rdma): (ConnInfo, Vec<RdmaNic>) = ENVELOPE_RDMA.decode(blob)?;
        let bad = |why: String| WireError::Body {
            kind: ENVELOPE.kind,
            why,
        };
        if rdma.is_empty() || rdma.len() > MAX_RDMA_NICS {
            return Err(bad(format!(
                "{} RDMA NICs (1..={MAX_RDMA_NICS})",
                rdma.len()
            )));
        }
        if let Some(n) = rdma.iter().find(|n| !(1..=5).contains(&n.mtu)) {
            return Err(bad(format!("RDMA MTU code {} (1..=5)", n.mtu)));
        }
        Ok(ConnInfo { rdma, ..info })
    }

    /// True when `other` is an engine in this very process.
    pub fn same_process(&self, other: &ConnInfo) -> bool {
        self.host.same_host(&other.host) && self.pid == other.pid
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> ConnInfo {
        ConnInfo {
            agent: b"Agent\x001".to_vec(),
            token: 0x0123_4567_89ab_cdef_0011_2233_4455_6677,
            host: HostIdentity::current(),
            pid: std::process::id(),
            endpoints: vec![Endpoint::Tcp("127.0.0.1:5555".parse().unwrap())],
            cma_probe: Some(0x7f00_0000_0040),
            rdma: Vec::new(),
        }
    }

    fn nic(mtu: i32) -> RdmaNic {
        RdmaNic {
            infiniband: false,
            lid: 0,
            gid: "::ffff:10.0.0.1"
                .parse::<std::net::Ipv6Addr>()
                .unwrap()
                .octets(),
            mtu,
            numa: 1,
        }
    }

    #[test]
    fn round_trips() {
        let info = sample();
        assert_eq!(
            info.encode()[4],
            1,
            "no RDMA: version 1, as older builds read"
        );
        assert_eq!(ConnInfo::decode(&info.encode()).unwrap(), info);
        let rdma = ConnInfo {
            rdma: vec![nic(5), nic(3)],
            ..sample()
        };
        assert_eq!(rdma.encode()[4], 2);
        assert_eq!(ConnInfo::decode(&rdma.encode()).unwrap(), rdma);
    }

    #[test]
    fn rejects_bad_rdma_nics() {
        let bad_mtu = ConnInfo {
            rdma: vec![nic(9)],
            ..sample()
        };
        assert!(ConnInfo::decode(&bad_mtu.encode()).is_err());
        let mut empty = ENVELOPE_RDMA.encode(&(&sample(), &Vec::<RdmaNic>::new()));
        assert!(ConnInfo::decode(&empty).is_err());
        empty.truncate(empty.len() - 1);
        assert!(ConnInfo::decode(&empty).is_err());
    }

    #[test]
    fn current_host_is_known_here() {
        let h = HostIdentity::current();
        assert!(
            h.same_host(&h),
            "boot id and pid namespace readable on Linux"
        );
        let unknown = HostIdentity {
            boot_id: String::new(),
            pid_ns: 0,
            hostname: String::new(),
        };
        assert!(!unknown.same_host(&unknown));
    }

    #[test]
    fn rejects_every_truncation_and_trailing_garbage() {
        let blob = sample().encode();
        for cut in 0..blob.len() {
            assert!(ConnInfo::decode(&blob[..cut]).is_err(), "cut at {cut}");
        }
        let mut longer = blob.clone();
        longer.push(0);
        assert!(ConnInfo::decode(&longer).is_err());
    }

    #[test]
    fn rejects_wrong_magic_and_version() {
        let mut blob = sample().encode();
        blob[4] = 3;
        assert!(matches!(
            ConnInfo::decode(&blob),
            Err(WireError::Version { found: 3, .. })
        ));
        blob[0] = b'X';
        assert!(matches!(
            ConnInfo::decode(&blob),
            Err(WireError::Magic { .. })
        ));
    }

    #[test]
    fn same_process_compares_pid_and_host() {
        let a = sample();
        let mut b = sample();
        assert!(a.same_process(&b));
        b.pid += 1;
        assert!(!a.same_process(&b));
    }
}
