//! Frames of the TCP protocol: a fixed 24-byte header, then a body whose
//! shape depends on the kind. Pure encoders and validating decoders.
//!
//! ```text
//! header: magic "MC" | version u8 | kind u8 | body_len u32 | tag u64 | aux u64   (little endian)
//! Hello     aux = the generation of the sender's connection set (0: none; older clients send 0);
//!           body: target token u128 | sender token u128 | name_len u16 | name
//! HelloOk   aux = what the server does beyond version 2 (bit 0: acknowledges notifications); body: empty
//! Write     aux = segment count; body: count x Seg | data (sum of segment lengths)
//! WriteAck  aux = status (i64); body: empty, or the reason of a refusal (text)
//! ReadReq   aux = segment count; body: count x Seg
//! ReadResp  aux = status (i64); body: the data of every segment, or the reason
//! Notif     tag = its number in the sender's link (0: no acknowledgement wanted); aux = that link's id;
//!           body: the message bytes
//! NotifAck  tag = the sequence number of the notification delivered (or delivered before); body: empty
//! NotifRefused  tag = the refused notification's sequence number; aux = its length; body: the reason (text)
//! Control   aux = the service (1: RDMA connection setup); body: the service's request
//! ControlResp   aux = status (i64, 0 = done); body: the service's answer, or the reason
//! Seg: key u64 | addr u64 | len u32   (20 bytes)
//! ```
//!
//! Limits bound every allocation and read a peer can cause.

use thiserror::Error;

/// First bytes of every frame.
pub const MAGIC: [u8; 2] = *b"MC";
/// Protocol version this build speaks (2: `NotifRefused`).
pub const VERSION: u8 = 2;
/// Size of the header.
pub const HEADER_LEN: usize = 24;
/// Size of one encoded segment.
pub const SEG_LEN: usize = 20;
/// Most segments one Write or ReadReq may carry.
pub const MAX_SEGS: usize = 1024;
/// Most data bytes one Write or ReadResp may carry.
pub const MAX_DATA: u64 = 16 << 20;
/// Largest Hello body.
pub const MAX_HELLO: u32 = 4096;
/// Largest notification message.
pub const MAX_NOTIF: u32 = 16 << 20;
/// Largest refusal reason.
pub const MAX_REASON: u32 = 4096;
/// Largest Control or ControlResp body.
pub const MAX_CONTROL: u32 = 64 << 10;

/// What a frame is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Kind {
    /// Client to server: who I am and whom I expect.
    Hello = 1,
    /// Server to client: accepted.
    HelloOk = 2,
    /// Data to write into the server's memory.
    Write = 3,
    /// Result of a Write.
    WriteAck = 4,
    /// Request for the server's data.
    ReadReq = 5,
    /// Result of a ReadReq, with the data.
    ReadResp = 6,
    /// A notification for the server's agent.
    Notif = 7,
    /// Server to client: a notification was not accepted (no room for it).
    NotifRefused = 8,
    /// Client to server: a request to one of the server's control services
    /// (on a connection of its own, answered once).
    Control = 9,
    /// Server to client: the answer to a Control.
    ControlResp = 10,
    /// Server to client: a notification with a sequence number was delivered.
    NotifAck = 11,
}

/// [`Kind::HelloOk`]'s `aux` bit: the server acknowledges every [`Kind::Notif`]
/// with a nonzero tag (its number) by a [`Kind::NotifAck`] or a
/// [`Kind::NotifRefused`], and delivers each number of a sender's link once.
pub const HELLO_ACKS_NOTIFS: u64 = 1;

impl Kind {
    fn from_u8(b: u8) -> Option<Kind> {
        Some(match b {
            1 => Kind::Hello,
            2 => Kind::HelloOk,
            3 => Kind::Write,
            4 => Kind::WriteAck,
            5 => Kind::ReadReq,
            6 => Kind::ReadResp,
            7 => Kind::Notif,
            8 => Kind::NotifRefused,
            9 => Kind::Control,
            10 => Kind::ControlResp,
            11 => Kind::NotifAck,
            _ => return None,
        })
    }
}

/// Why bytes from a peer are not a valid frame.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum FrameError {
    /// Not our protocol.
    #[error("bad magic {0:02x?}")]
    Magic([u8; 2]),
    /// Another protocol version.
    #[error("unsupported protocol version {0} (this build speaks {VERSION})")]
    Version(u8),
    /// Unknown frame kind.
    #[error("unknown frame kind {0}")]
    Kind(u8),
    /// A length or count beyond the protocol's limits or inconsistent with the rest.
    #[error("{0}")]
    Size(String),
    /// A body that does not decode.
    #[error("malformed {0}")]
    Malformed(&'static str),
}

/// A decoded header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    /// Frame kind.
    pub kind: Kind,
    /// Bytes following the header.
    pub body_len: u32,
    /// Initiator-chosen id echoed in the answer.
    pub tag: u64,
    /// Segment count or status, by kind.
    pub aux: u64,
}

impl Header {
    /// A header for `kind`.
    pub fn new(kind: Kind, body_len: u32, tag: u64, aux: u64) -> Header {
        Header {
            kind,
            body_len,
            tag,
            aux,
        }
    }

    /// Encodes the header.
    pub fn encode(&self) -> [u8; HEADER_LEN] {
        let mut out = [0u8; HEADER_LEN];
        out[0..2].copy_from_slice(&MAGIC);
        out[2] = VERSION;
        out[3] = self.kind as u8;
        out[4..8].copy_from_slice(&self.body_len.to_le_bytes());
        out[8..16].copy_from_slice(&self.tag.to_le_bytes());
        out[16..24].copy_from_slice(&self.aux.to_le_bytes());
        out
    }

    /// Decodes and validates a header: magic, version, kind, and the body
    /// length and count limits of its kind.
    ///
    /// # Errors
    /// A [`FrameError`] describing the first violation.
    pub fn decode(b: &[u8; HEADER_LEN]) -> Result<Header, FrameError> {
        if b[0..2] != MAGIC {
            return Err(FrameError::Magic([b[0], b[1]]));
        }
        if b[2] != VERSION {
            return Err(FrameError::Version(b[2]));
        }
        let kind = Kind::from_u8(b[3]).ok_or(FrameError::Kind(b[3]))?;
        let le64 =
            |r: std::ops::Range<usize>| u64::from_le_bytes(b[r].try_into().expect("8 bytes"));
        let h = Header {
            kind,
            body_len: u32::from_le_bytes(b[4..8].try_into().expect("4 bytes")),
            tag: le64(8..16),
            aux: le64(16..24),
        };
        let limit = |max: u32, what: &str| {
            if h.body_len > max {
                Err(FrameError::Size(format!(
                    "{what} body of {} bytes exceeds {max}",
                    h.body_len
                )))
            } else {
                Ok(())
            }
        };
        match kind {
            Kind::Hello => limit(MAX_HELLO, "hello")?,
            Kind::HelloOk => limit(0, "hello-ok")?,
            Kind::NotifAck => limit(0, "notification acknowledgement")?,
            Kind::Notif => limit(MAX_NOTIF, "notification")?,
            Kind::WriteAck => limit(MAX_REASON, "write-ack")?,
            Kind::NotifRefused => limit(MAX_REASON, "notification refusal")?,
            Kind::Control | Kind::ControlResp => limit(MAX_CONTROL, "control")?,
            Kind::ReadResp => limit(MAX_DATA as u32, "read response")?,
            Kind::Write | Kind::ReadReq => {
                if h.aux == 0 || h.aux > MAX_SEGS as u64 {
                    return Err(FrameError::Size(format!(
                        "segment count {} not in 1..={MAX_SEGS}",
                        h.aux
                    )));
                }
                let table = h.aux as u32 * SEG_LEN as u32;
                let max = if kind == Kind::Write {
                    table + MAX_DATA as u32
                } else {
                    table
                };
                if h.body_len < table || h.body_len > max {
                    return Err(FrameError::Size(format!(
                        "body of {} bytes does not fit {} segments",
                        h.body_len, h.aux
                    )));
                }
            }
        }
        Ok(h)
    }

    /// A status carried in `aux` (acks and read responses).
    pub fn status(&self) -> i64 {
        self.aux as i64
    }
}

/// One segment of a Write or ReadReq: a range of a registered region.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Seg {
    /// The region's access key.
    pub key: u64,
    /// Start address in the server's address space.
    pub addr: u64,
    /// Length in bytes.
    pub len: u32,
}

/// Appends the encoded segment table to `out`.
pub fn encode_segs(segs: &[Seg], out: &mut Vec<u8>) {
    for s in segs {
        out.extend_from_slice(&s.key.to_le_bytes());
        out.extend_from_slice(&s.addr.to_le_bytes());
        out.extend_from_slice(&s.len.to_le_bytes());
    }
}

/// Decodes a segment table of `count` entries. For a Write, `data_len` is
/// the data the frame carries, which must equal the segments' total; for a
/// ReadReq it is `None`. The total never exceeds [`MAX_DATA`].
///
/// # Errors
/// [`FrameError::Size`] when the table length or the data size disagree.
pub fn decode_segs(
    table: &[u8],
    count: usize,
    data_len: Option<u64>,
) -> Result<Vec<Seg>, FrameError> {
    if count == 0 || count > MAX_SEGS || table.len() != count * SEG_LEN {
        return Err(FrameError::Size(format!(
            "segment table of {} bytes for {count} segments",
            table.len()
        )));
    }
    let segs: Vec<Seg> = table
        .chunks_exact(SEG_LEN)
        .map(|c| Seg {
            key: u64::from_le_bytes(c[0..8].try_into().expect("8 bytes")),
            addr: u64::from_le_bytes(c[8..16].try_into().expect("8 bytes")),
            len: u32::from_le_bytes(c[16..20].try_into().expect("4 bytes")),
        })
        .collect();
    let total: u64 = segs.iter().map(|s| u64::from(s.len)).sum();
    if total > MAX_DATA || data_len.is_some_and(|d| d != total) {
        return Err(FrameError::Size(format!(
            "segments total {total} bytes (limit {MAX_DATA}) but the frame carries {data_len:?}"
        )));
    }
    Ok(segs)
}

/// The body of a Hello.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hello {
    /// The token of the engine the client wants (learned from its metadata).
    pub target_token: u128,
    /// The client engine's own token.
    pub sender_token: u128,
    /// The client agent's name.
    pub name: Vec<u8>,
}

impl Hello {
    /// Encodes the body.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(34 + self.name.len());
        out.extend_from_slice(&self.target_token.to_le_bytes());
        out.extend_from_slice(&self.sender_token.to_le_bytes());
        let name = &self.name[..self.name.len().min(MAX_HELLO as usize - 34)];
        out.extend_from_slice(&(name.len() as u16).to_le_bytes());
        out.extend_from_slice(name);
        out
    }

    /// Decodes a body.
    ///
    /// # Errors
    /// [`FrameError::Malformed`] when the lengths disagree.
    pub fn decode(b: &[u8]) -> Result<Hello, FrameError> {
        if b.len() < 34 {
            return Err(FrameError::Malformed("hello"));
        }
        let name_len = u16::from_le_bytes([b[32], b[33]]) as usize;
        if b.len() != 34 + name_len {
            return Err(FrameError::Malformed("hello"));
        }
        Ok(Hello {
            target_token: u128::from_le_bytes(b[0..16].try_into().expect("16 bytes")),
            sender_token: u128::from_le_bytes(b[16..32].try_into().expect("16 bytes")),
            name: b[34..].to_vec(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn header_round_trips() {
        let h = Header::new(Kind::Write, 3 * SEG_LEN as u32 + 100, 7, 3);
        assert_eq!(Header::decode(&h.encode()), Ok(h));
        let ack = Header::new(Kind::WriteAck, 0, 9, (-6i64) as u64);
        assert_eq!(Header::decode(&ack.encode()).unwrap().status(), -6);
    }

    #[test]
    fn header_limits() {
        let bad = |h: Header| Header::decode(&h.encode()).unwrap_err();
        assert!(matches!(
            bad(Header::new(Kind::Write, 20, 1, 0)),
            FrameError::Size(_)
        ));
        assert!(matches!(
            bad(Header::new(Kind::Write, 20, 1, 2)),
            FrameError::Size(_)
        ));
        assert!(matches!(
            bad(Header::new(Kind::Write, u32::MAX, 1, 1)),
            FrameError::Size(_)
        ));
        assert!(matches!(
            bad(Header::new(Kind::ReadReq, 21, 1, 1)),
            FrameError::Size(_)
        ));
        assert!(matches!(
            bad(Header::new(Kind::ReadReq, 0, 1, MAX_SEGS as u64 + 1)),
            FrameError::Size(_)
        ));
        assert!(matches!(
            bad(Header::new(Kind::Notif, MAX_NOTIF + 1, 1, 0)),
            FrameError::Size(_)
        ));
        assert!(matches!(
            bad(Header::new(Kind::HelloOk, 1, 0, 0)),
            FrameError::Size(_)
        ));
        let mut raw = Header::new(Kind::Notif, 0, 0, 0).encode();
        raw[3] = 99;
        assert_eq!(Header::decode(&raw), Err(FrameError::Kind(99)));
        raw[2] = VERSION + 1;
        assert_eq!(Header::decode(&raw), Err(FrameError::Version(VERSION + 1)));
        raw[0] = b'X';
        assert!(matches!(Header::decode(&raw), Err(FrameError::Magic(_))));
    }

    #[test]
    fn segs_round_trip_and_check_totals() {
        let segs = vec![
            Seg {
                key: 1,
                addr: 0x1000,
                len: 10,
            },
            Seg {
                key: 2,
                addr: u64::MAX,
                len: 0,
            },
        ];
        let mut b = Vec::new();
        encode_segs(&segs, &mut b);
        assert_eq!(decode_segs(&b, 2, Some(10)), Ok(segs.clone()));
        assert_eq!(decode_segs(&b, 2, None), Ok(segs));
        assert!(decode_segs(&b, 2, Some(11)).is_err());
        assert!(decode_segs(&b[..39], 2, Some(10)).is_err());
        assert!(decode_segs(&b, 1, Some(10)).is_err());
        let huge = [Seg {
            key: 1,
            addr: 0,
            len: u32::MAX,
        }];
        let mut h = Vec::new();
        encode_segs(&huge, &mut h);
        assert!(
            decode_segs(&h, 1, None).is_err(),
            "a read larger than a frame"
        );
    }

    #[test]
    fn hello_round_trips() {
        let h = Hello {
            target_token: 1 << 100,
            sender_token: 5,
            name: b"A\0gent".to_vec(),
        };
        assert_eq!(Hello::decode(&h.encode()), Ok(h));
        assert!(Hello::decode(&[0; 33]).is_err());
    }

    proptest! {
        /// The decoders never panic on arbitrary bytes, and whatever header
        /// they accept respects the limits.
        #[test]
        fn decoders_survive_arbitrary_input(raw in proptest::array::uniform24(any::<u8>()), body in proptest::collection::vec(any::<u8>(), 0..200)) {
            if let Ok(h) = Header::decode(&raw) {
                prop_assert!(h.body_len <= MAX_NOTIF.max(MAX_SEGS as u32 * SEG_LEN as u32 + MAX_DATA as u32));
                prop_assert_eq!(Header::decode(&h.encode()), Ok(h));
            }
            let _ = Hello::decode(&body);
            let count = body.len() / SEG_LEN;
            let _ = decode_segs(&body, count, Some(body.len() as u64));
            let _ = decode_segs(&body, count, None);
        }

        /// Headers that pass decoding are exactly the ones whose fields are in range.
        #[test]
        fn header_fields_round_trip(kind in 1u8..=7, body_len: u32, tag: u64, aux: u64) {
            let mut raw = Header::new(Kind::Notif, 0, 0, 0).encode();
            raw[3] = kind;
            raw[4..8].copy_from_slice(&body_len.to_le_bytes());
            raw[8..16].copy_from_slice(&tag.to_le_bytes());
            raw[16..24].copy_from_slice(&aux.to_le_bytes());
            if let Ok(h) = Header::decode(&raw) {
                prop_assert_eq!(h.encode(), raw);
                prop_assert_eq!(h.tag, tag);
            }
        }
    }
}
