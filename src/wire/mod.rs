//! Wire encodings: pure functions, no I/O.
//!
//! Every blob this plugin hands to NIXL (connection info, a region's public
//! data) is an *envelope*: a 4-byte magic, a version byte, then a `postcard`
//! body. Decoders reject wrong magic, unknown versions, malformed bodies and
//! trailing bytes, so hostile or corrupted metadata is an error, never a crash.

pub mod conn_info;
pub mod frame;
pub mod rdma;
pub mod region;

use serde::{Serialize, de::DeserializeOwned};
use thiserror::Error;

/// Why a blob could not be decoded.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum WireError {
    /// The blob is shorter than the envelope header.
    #[error("blob of {0} bytes is too short for a header")]
    Truncated(usize),
    /// The blob is not of the expected kind.
    #[error("wrong magic {found:02x?} (expected {expected:?})")]
    Magic {
        /// What the blob starts with.
        found: [u8; 4],
        /// What the decoder expects.
        expected: &'static str,
    },
    /// The blob was written by an incompatible version.
    #[error("unsupported {kind} version {found} (this build speaks {supported})")]
    Version {
        /// The kind of blob.
        kind: &'static str,
        /// The version found.
        found: u8,
        /// The version this build reads.
        supported: u8,
    },
    /// The body does not decode.
    #[error("malformed {kind} body: {why}")]
    Body {
        /// The kind of blob.
        kind: &'static str,
        /// The decoder's complaint.
        why: String,
    },
}

/// Describes one envelope kind.
pub(crate) struct Envelope {
    pub magic: &'static [u8; 4],
    pub version: u8,
    pub kind: &'static str,
}

impl Envelope {
    pub(crate) fn encode<T: Serialize>(&self, body: &T) -> Vec<u8> {
        let mut out = Vec::with_capacity(64);
        out.extend_from_slice(self.magic);
        out.push(self.version);
        // Serializing plain structs into a Vec cannot fail.
        postcard::to_extend(body, out).expect("postcard encoding into a Vec is infallible")
    }

    pub(crate) fn decode<T: DeserializeOwned>(&self, blob: &[u8]) -> Result<T, WireError> {
        if blob.len() < 5 {
            return Err(WireError::Truncated(blob.len()));
        }
        let (magic, rest) = blob.split_at(4);
        if magic != self.magic {
            return Err(WireError::Magic {
                found: magic.try_into().expect("split_at(4) gives 4 bytes"),
                expected: std::str::from_utf8(self.magic).unwrap_or("?"),
            });
        }
        if rest[0] != self.version {
            return Err(WireError::Version {
                kind: self.kind,
                found: rest[0],
                supported: self.version,
            });
        }
        let (body, trailing) =
            postcard::take_from_bytes::<T>(&rest[1..]).map_err(|e| WireError::Body {
                kind: self.kind,
                why: e.to_string(),
            })?;
        if !trailing.is_empty() {
            return Err(WireError::Body {
                kind: self.kind,
                why: format!("{} trailing bytes", trailing.len()),
            });
        }
        Ok(body)
    }
}

#[cfg(test)]
mod seed_tests {
    //! The fuzzers' hand-made seeds (`fuzz/make_seeds.py`) are valid
    //! encodings, so the fuzzers start past the envelopes.

    use std::path::PathBuf;

    fn seeds(target: &str) -> Vec<Vec<u8>> {
        let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("fuzz/corpus")
            .join(target);
        let mut names: Vec<_> = std::fs::read_dir(&dir)
            .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
            .filter_map(|e| e.ok())
            .map(|e| e.path())
            .filter(|p| {
                p.file_name()
                    .unwrap()
                    .to_string_lossy()
                    .starts_with("seed-")
            })
            .collect();
        names.sort();
        names.iter().map(|p| std::fs::read(p).unwrap()).collect()
    }

    #[test]
    fn every_seed_decodes() {
        for s in seeds("wire_region") {
            super::region::RegionPublic::decode(&s).unwrap();
        }
        for s in seeds("wire_conn_info") {
            super::conn_info::ConnInfo::decode(&s).unwrap();
        }
        let rdma = seeds("wire_rdma");
        assert_eq!(rdma.len(), 4);
        super::rdma::ConnectRequest::decode(&rdma[0]).unwrap();
        super::rdma::ConnectReply::decode(&rdma[1]).unwrap();
        super::rdma::NotifPart::decode(&rdma[2]).unwrap();
        super::rdma::NotifPart::decode(&rdma[3]).unwrap();
    }
}
