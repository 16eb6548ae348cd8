//! What the RDMA transport sends besides data: the connection setup it
//! exchanges over the TCP control link ([`ConnectRequest`],
//! [`ConnectReply`]), and the parts of a notification it sends on its
//! queue pairs after the data ([`NotifPart`]).
//!
//! A notification of a WRITE travels in parts, one per queue pair that
//! carried the transfer's data, each sent on that queue pair after the
//! data: the target delivers the notification once every part arrived, so
//! every byte was placed before it (RC queue pairs execute in order). One
//! part carries the message, cut in chunks that fit a receive buffer; the
//! others are empty fences.

use serde::{Deserialize, Serialize};

use super::{Envelope, WireError};

const CONNECT: Envelope = Envelope {
    magic: b"MCrc",
    version: 1,
    kind: "RDMA connection request",
};

const REPLY: Envelope = Envelope {
    magic: b"MCrr",
    version: 1,
    kind: "RDMA connection reply",
};

/// Most queue pairs one connection asks for.
pub const MAX_QPS: usize = 16;

/// What one side tells the other about one of its queue pairs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct QpAddress {
    /// The QP number (24 bits).
    pub qpn: u32,
    /// The first packet sequence number it sends (24 bits, random).
    pub psn: u32,
    /// The port's LID (InfiniBand).
    pub lid: u16,
    /// The port's GID.
    pub gid: [u8; 16],
    /// The port's active MTU (`enum ibv_mtu`, 1..=5).
    pub mtu: i32,
    /// RDMA READs the device serves at once per queue pair, as target
    /// (`max_qp_rd_atom`): the other side never has more outstanding.
    pub rd_atomic: u8,
}

/// Initiator to target, over the TCP control link: connect these queue
/// pairs of my NIC `from_nic` to new ones of your NIC `to_nic`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConnectRequest {
    /// The initiator's generation of this endpoint: a new one for every
    /// (re)connection, so that nothing of an older setup is reused.
    pub generation: u64,
    /// Index of the initiator's NIC in its connection info's RDMA list.
    pub from_nic: u8,
    /// Index of the target's NIC in its connection info's RDMA list.
    pub to_nic: u8,
    /// The initiator's queue pairs (in RESET, ready to connect).
    pub qps: Vec<QpAddress>,
}

/// Target to initiator: the queue pairs the target created and connected,
/// one per requested queue pair, in the same order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConnectReply {
    /// The generation of the request answered.
    pub generation: u64,
    /// The target's queue pairs (in RTS, receives posted).
    pub qps: Vec<QpAddress>,
}

fn check_qps(qps: &[QpAddress], kind: &'static str) -> Result<(), WireError> {
    let bad = |why: String| Err(WireError::Body { kind, why });
    if qps.is_empty() || qps.len() > MAX_QPS {
        return bad(format!("{} queue pairs (1..={MAX_QPS})", qps.len()));
    }
    if let Some(q) = qps.iter().find(|q| q.qpn >= 1 << 24 || q.psn >= 1 << 24) {
        return bad(format!(
            "QP number {:#x} or PSN {:#x} beyond 24 bits",
            q.qpn, q.psn
        ));
    }
    if let Some(q) = qps.iter().find(|q| !(1..=5).contains(&q.mtu)) {
        return bad(format!("MTU code {} (1..=5)", q.mtu));
    }
    Ok(())
}

impl ConnectRequest {
    /// Encodes the request.
    pub fn encode(&self) -> Vec<u8> {
        CONNECT.encode(self)
    }

    /// Decodes and checks a peer's request.
    ///
    /// # Errors
    /// A [`WireError`] naming what is wrong.
    pub fn decode(blob: &[u8]) -> Result<ConnectRequest, WireError> {
        let r: ConnectRequest = CONNECT.decode(blob)?;
        check_qps(&r.qps, CONNECT.kind)?;
        Ok(r)
    }
}

impl ConnectReply {
    /// Encodes the reply.
    pub fn encode(&self) -> Vec<u8> {
        REPLY.encode(self)
    }

    /// Decodes and checks a peer's reply.
    ///
    /// # Errors
    /// A [`WireError`] naming what is wrong.
    pub fn decode(blob: &[u8]) -> Result<ConnectReply, WireError> {
        let r: ConnectReply = REPLY.decode(blob)?;
        check_qps(&r.qps, REPLY.kind)?;
        Ok(r)
    }
}

/// Bytes of a [`NotifPart`]'s header.
pub const PART_HEADER: usize = 24;

/// Most parts of one notification (queue pairs of one transfer).
pub const MAX_PARTS: u16 = 1024;

/// One part of a notification, as sent on a queue pair:
///
/// ```text
/// id u64 | parts u16 | index u16 | chunk u32 | chunks u32 | len u32 | bytes   (little endian)
/// ```
///
/// A fence has `chunks == 0` and no bytes; the message part has
/// `chunks >= 1` chunks, numbered from 0, sent in order (on one queue pair,
/// or continued on another after a failover). `index` numbers the part
/// among `parts`: a part sent again after a failover is counted once.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NotifPart<'a> {
    /// The notification's id, unique per sender engine.
    pub id: u64,
    /// How many parts the notification has (queue pairs that carried data).
    pub parts: u16,
    /// This part's number, below `parts`.
    pub index: u16,
    /// This chunk's number (0 for a fence).
    pub chunk: u32,
    /// Chunks of the message part (0: this is a fence).
    pub chunks: u32,
    /// This chunk's bytes.
    pub bytes: &'a [u8],
}

impl NotifPart<'_> {
    /// Writes the part into `out` (cleared first).
    pub fn encode_into(&self, out: &mut Vec<u8>) {
        out.clear();
        out.extend_from_slice(&self.id.to_le_bytes());
        out.extend_from_slice(&self.parts.to_le_bytes());
        out.extend_from_slice(&self.index.to_le_bytes());
        out.extend_from_slice(&self.chunk.to_le_bytes());
        out.extend_from_slice(&self.chunks.to_le_bytes());
        out.extend_from_slice(&(self.bytes.len() as u32).to_le_bytes());
        out.extend_from_slice(self.bytes);
    }

    /// Decodes a received part.
    ///
    /// # Errors
    /// A [`WireError`] when the bytes are not a consistent part.
    pub fn decode(b: &[u8]) -> Result<NotifPart<'_>, WireError> {
        const KIND: &str = "RDMA notification part";
        if b.len() < PART_HEADER {
            return Err(WireError::Truncated(b.len()));
        }
        let u32_at = |i: usize| u32::from_le_bytes(b[i..i + 4].try_into().expect("4 bytes"));
        let part = NotifPart {
            id: u64::from_le_bytes(b[0..8].try_into().expect("8 bytes")),
            parts: u16::from_le_bytes(b[8..10].try_into().expect("2 bytes")),
            index: u16::from_le_bytes(b[10..12].try_into().expect("2 bytes")),
            chunk: u32_at(12),
            chunks: u32_at(16),
            bytes: &b[PART_HEADER..],
        };
        let bad = |why: String| Err(WireError::Body { kind: KIND, why });
        if u32_at(20) as usize != part.bytes.len() {
            return bad(format!(
                "says {} bytes but carries {}",
                u32_at(20),
                part.bytes.len()
            ));
        }
        if part.parts == 0 || part.parts > MAX_PARTS || part.index >= part.parts {
            return bad(format!(
                "part {} of {} (1..={MAX_PARTS} parts)",
                part.index, part.parts
            ));
        }
        if part.chunks == 0 && (part.chunk != 0 || !part.bytes.is_empty()) {
            return bad("a fence with a chunk number or bytes".into());
        }
        if part.chunks != 0 && part.chunk >= part.chunks {
            return bad(format!("chunk {} of {}", part.chunk, part.chunks));
        }
        Ok(part)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn qp(qpn: u32) -> QpAddress {
        QpAddress {
            qpn,
            psn: 0x12_3456,
            lid: 0,
            gid: [7; 16],
            mtu: 5,
            rd_atomic: 16,
        }
    }

    #[test]
    fn connect_messages_round_trip_and_are_checked() {
        let req = ConnectRequest {
            generation: 9,
            from_nic: 1,
            to_nic: 0,
            qps: vec![qp(0x1001), qp(0x1002)],
        };
        assert_eq!(ConnectRequest::decode(&req.encode()).unwrap(), req);
        let blob = req.encode();
        for cut in 0..blob.len() {
            assert!(ConnectRequest::decode(&blob[..cut]).is_err());
        }
        let reply = ConnectReply {
            generation: 9,
            qps: vec![qp(0x2001)],
        };
        assert_eq!(ConnectReply::decode(&reply.encode()).unwrap(), reply);
        assert!(ConnectReply::decode(&req.encode()).is_err(), "not a reply");
        for bad in [
            vec![],
            vec![qp(1 << 24)],
            vec![QpAddress { mtu: 0, ..qp(1) }],
            vec![qp(1); MAX_QPS + 1],
        ] {
            let r = ConnectReply {
                generation: 1,
                qps: bad,
            };
            assert!(ConnectReply::decode(&r.encode()).is_err(), "{r:?}");
        }
    }

    #[test]
    fn parts_round_trip_and_are_checked() {
        let mut buf = Vec::new();
        let chunk = NotifPart {
            id: 5,
            parts: 3,
            index: 0,
            chunk: 1,
            chunks: 2,
            bytes: b"hello",
        };
        chunk.encode_into(&mut buf);
        assert_eq!(NotifPart::decode(&buf).unwrap(), chunk);
        for cut in 0..buf.len() {
            assert!(NotifPart::decode(&buf[..cut]).is_err());
        }
        let fence = NotifPart {
            id: 5,
            parts: 3,
            index: 2,
            chunk: 0,
            chunks: 0,
            bytes: b"",
        };
        fence.encode_into(&mut buf);
        assert_eq!(NotifPart::decode(&buf).unwrap(), fence);
        for bad in [
            NotifPart {
                parts: 0,
                ..fence.clone()
            },
            NotifPart {
                index: 3,
                ..fence.clone()
            },
            NotifPart {
                bytes: b"x",
                ..fence.clone()
            },
            NotifPart {
                chunk: 2,
                ..chunk.clone()
            },
        ] {
            bad.encode_into(&mut buf);
            assert!(NotifPart::decode(&buf).is_err(), "{bad:?}");
        }
    }
}
