//! A raw socket client that breaks the TCP protocol's rules against a real
//! engine: no token, a wrong token, a wrong region key, ranges outside the
//! registration, truncated and garbage frames, huge lengths. Each is refused
//! (an error answer, or the connection closed), no byte outside the rules is
//! written, and the target keeps serving others.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use plugin_Mooncake::backend::{Engine, EngineConfig, Status};
use plugin_Mooncake::wire::conn_info::{ConnInfo, Endpoint};
use plugin_Mooncake::wire::frame::{self, HEADER_LEN, Header, Hello, Kind, Seg};
use plugin_Mooncake::wire::region::RegionPublic;

/// A target engine with one registered region in the middle of a buffer
/// whose guard bands must never change.
struct Target {
    engine: Engine,
    buf: Vec<u8>,
    region: RegionPublic,
    addr: SocketAddr,
    token: u128,
}

const GUARD: usize = 4096;
const LEN: usize = 64 << 10;

fn target() -> Target {
    let engine = Engine::new(EngineConfig::new(
        "target",
        &[
            ("protocol", "tcp"),
            ("ip_addr", "127.0.0.1"),
            ("timeout_ms", "2000"),
        ],
    ))
    .unwrap();
    let buf = vec![0xAAu8; GUARD + LEN + GUARD];
    let md = engine
        .register_mem(buf.as_ptr() as u64 + GUARD as u64, LEN as u64, 0, 0)
        .unwrap();
    let region = RegionPublic::decode(&engine.public_data(md).unwrap()).unwrap();
    let info = ConnInfo::decode(engine.conn_info()).unwrap();
    let Endpoint::Tcp(addr) = info.endpoints[0];
    Target {
        engine,
        buf,
        region,
        addr,
        token: info.token,
    }
}

impl Target {
    fn guards_intact(&self) -> bool {
        self.buf[..GUARD].iter().all(|&b| b == 0xAA)
            && self.buf[GUARD + LEN..].iter().all(|&b| b == 0xAA)
    }

    fn region_bytes(&self) -> &[u8] {
        &self.buf[GUARD..GUARD + LEN]
    }
}

fn connect(addr: SocketAddr) -> TcpStream {
    let s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    s
}

fn hello(s: &mut TcpStream, token: u128) {
    let body = Hello {
        target_token: token,
        sender_token: 1,
        name: b"raw".to_vec(),
    }
    .encode();
    s.write_all(&Header::new(Kind::Hello, body.len() as u32, 0, 0).encode())
        .unwrap();
    s.write_all(&body).unwrap();
}

fn read_header(s: &mut TcpStream) -> Header {
    let mut h = [0u8; HEADER_LEN];
    s.read_exact(&mut h).unwrap();
    Header::decode(&h).unwrap()
}

/// A connection that passed the handshake.
fn session(t: &Target) -> TcpStream {
    let mut s = connect(t.addr);
    hello(&mut s, t.token);
    assert_eq!(read_header(&mut s).kind, Kind::HelloOk);
    s
}

/// True when the server closed the connection (EOF or reset) within the timeout.
fn closed_by_server(s: &mut TcpStream) -> bool {
    let mut b = [0u8; 64];
    loop {
        match s.read(&mut b) {
            Ok(0) => return true,
            Ok(_) => continue,
            Err(e)
                if e.kind() == std::io::ErrorKind::WouldBlock
                    || e.kind() == std::io::ErrorKind::TimedOut =>
            {
                return false;
            }
            Err(_) => return true,
        }
    }
}

fn write_frame(s: &mut TcpStream, tag: u64, segs: &[Seg], data: &[u8]) {
    send_frame(s, tag, segs, data).unwrap();
}

/// A WRITE frame; the server may close the connection before all of it
/// was written (then this fails with a broken pipe or a reset).
fn send_frame(s: &mut TcpStream, tag: u64, segs: &[Seg], data: &[u8]) -> std::io::Result<()> {
    let mut table = Vec::new();
    frame::encode_segs(segs, &mut table);
    let h = Header::new(
        Kind::Write,
        (table.len() + data.len()) as u32,
        tag,
        segs.len() as u64,
    );
    s.write_all(&h.encode())?;
    s.write_all(&table)?;
    s.write_all(data)
}

fn read_frame(s: &mut TcpStream, tag: u64, segs: &[Seg]) {
    let mut table = Vec::new();
    frame::encode_segs(segs, &mut table);
    s.write_all(&Header::new(Kind::ReadReq, table.len() as u32, tag, segs.len() as u64).encode())
        .unwrap();
    s.write_all(&table).unwrap();
}

/// Reads an answer; returns (status, body).
fn answer(s: &mut TcpStream, kind: Kind, tag: u64) -> (i64, Vec<u8>) {
    let h = read_header(s);
    assert_eq!((h.kind, h.tag), (kind, tag));
    let mut body = vec![0u8; h.body_len as usize];
    s.read_exact(&mut body).unwrap();
    (h.status(), body)
}

/// The target still serves a well-behaved client.
fn still_serves(t: &Target) {
    let mut s = session(t);
    let seg = Seg {
        key: t.region.key,
        addr: t.region.addr,
        len: 16,
    };
    write_frame(&mut s, 99, &[seg], &[0x55; 16]);
    assert_eq!(answer(&mut s, Kind::WriteAck, 99).0, 0);
    assert_eq!(&t.region_bytes()[..16], &[0x55; 16]);
    read_frame(&mut s, 100, &[seg]);
    let (status, body) = answer(&mut s, Kind::ReadResp, 100);
    assert_eq!((status, body), (0, vec![0x55; 16]));
}

#[test]
fn a_client_without_the_token_is_closed() {
    let t = target();
    // No hello at all: a data frame first. The server closes as soon as it
    // read the header, possibly before the rest was written.
    let mut s = connect(t.addr);
    let _ = send_frame(
        &mut s,
        1,
        &[Seg {
            key: t.region.key,
            addr: t.region.addr,
            len: 4,
        }],
        &[1, 2, 3, 4],
    );
    assert!(closed_by_server(&mut s));
    // A hello with a wrong token.
    let mut s = connect(t.addr);
    hello(&mut s, t.token ^ 1);
    assert!(closed_by_server(&mut s));
    assert!(t.region_bytes().iter().all(|&b| b == 0xAA) && t.guards_intact());
    still_serves(&t);
}

#[test]
fn a_wrong_key_or_a_range_outside_the_region_is_refused_with_an_error() {
    let t = target();
    let mut s = session(&t);
    let cases = [
        Seg {
            key: t.region.key ^ 0x1234,
            addr: t.region.addr,
            len: 8,
        },
        Seg {
            key: t.region.key,
            addr: t.region.addr - 8,
            len: 8,
        },
        Seg {
            key: t.region.key,
            addr: t.region.addr + LEN as u64 - 4,
            len: 8,
        },
        Seg {
            key: t.region.key,
            addr: u64::MAX - 3,
            len: 8,
        },
    ];
    for (i, seg) in cases.iter().enumerate() {
        let tag = 10 + i as u64;
        write_frame(&mut s, tag, &[*seg], &[0x66; 8]);
        let (status, reason) = answer(&mut s, Kind::WriteAck, tag);
        assert_eq!(status, i64::from(Status::NotAllowed.code()), "case {i}");
        assert!(!reason.is_empty(), "the refusal says why");
        read_frame(&mut s, tag + 100, &[*seg]);
        let (status, _) = answer(&mut s, Kind::ReadResp, tag + 100);
        assert_eq!(
            status,
            i64::from(Status::NotAllowed.code()),
            "read case {i}"
        );
    }
    // One bad segment among good ones refuses the whole frame.
    let good = Seg {
        key: t.region.key,
        addr: t.region.addr,
        len: 8,
    };
    write_frame(&mut s, 50, &[good, cases[1]], &[0x77; 16]);
    assert_eq!(
        answer(&mut s, Kind::WriteAck, 50).0,
        i64::from(Status::NotAllowed.code())
    );
    assert!(
        t.region_bytes().iter().all(|&b| b == 0xAA),
        "nothing written"
    );
    assert!(t.guards_intact());
    // The same connection keeps working after refusals.
    write_frame(&mut s, 60, &[good], &[0x11; 8]);
    assert_eq!(answer(&mut s, Kind::WriteAck, 60).0, 0);
    still_serves(&t);
}

#[test]
fn truncated_and_garbage_frames_close_that_connection_only() {
    let t = target();
    // A write whose data stops short, then the client disappears.
    let mut s = session(&t);
    let seg = Seg {
        key: t.region.key,
        addr: t.region.addr,
        len: 1024,
    };
    let mut table = Vec::new();
    frame::encode_segs(&[seg], &mut table);
    s.write_all(&Header::new(Kind::Write, (table.len() + 1024) as u32, 1, 1).encode())
        .unwrap();
    s.write_all(&table).unwrap();
    s.write_all(&[0x22; 100]).unwrap();
    drop(s);
    // Garbage instead of a header.
    let mut s = session(&t);
    s.write_all(&[0xFF; HEADER_LEN]).unwrap();
    assert!(closed_by_server(&mut s));
    // A header cut short.
    let mut s = session(&t);
    s.write_all(&Header::new(Kind::Notif, 4, 0, 0).encode()[..10])
        .unwrap();
    drop(s);
    // An unknown kind, and a frame the server never accepts from a client.
    let mut s = session(&t);
    let mut raw = Header::new(Kind::Notif, 0, 0, 0).encode();
    raw[3] = 200;
    s.write_all(&raw).unwrap();
    assert!(closed_by_server(&mut s));
    let mut s = session(&t);
    s.write_all(&Header::new(Kind::HelloOk, 0, 0, 0).encode())
        .unwrap();
    assert!(closed_by_server(&mut s));
    // A segment table that does not add up.
    let mut s = session(&t);
    s.write_all(&Header::new(Kind::Write, (table.len() + 10) as u32, 2, 1).encode())
        .unwrap();
    s.write_all(&table).unwrap();
    assert!(closed_by_server(&mut s));
    assert!(t.guards_intact());
    still_serves(&t);
}

#[test]
fn huge_lengths_are_refused_before_anything_is_allocated_or_read() {
    let t = target();
    for header in [
        Header::new(Kind::Notif, u32::MAX, 0, 0),
        Header::new(Kind::Hello, u32::MAX, 0, 0),
        Header::new(Kind::Write, u32::MAX, 1, 1),
        Header::new(Kind::Write, 20, 1, frame::MAX_SEGS as u64 + 1),
        Header::new(Kind::ReadReq, 20 * 1000, 1, u64::MAX),
    ] {
        let mut s = session(&t);
        s.write_all(&header.encode()).unwrap();
        assert!(closed_by_server(&mut s), "{header:?}");
    }
    // A read asking for more than a frame may carry.
    let mut s = session(&t);
    read_frame(
        &mut s,
        5,
        &[Seg {
            key: t.region.key,
            addr: t.region.addr,
            len: u32::MAX,
        }],
    );
    assert!(closed_by_server(&mut s));
    // A hello claiming a huge body, before the handshake.
    let mut s = connect(t.addr);
    s.write_all(&Header::new(Kind::Hello, u32::MAX, 0, 0).encode())
        .unwrap();
    assert!(closed_by_server(&mut s));
    assert!(t.guards_intact());
    still_serves(&t);
}

#[test]
fn notifications_from_an_authenticated_client_arrive_intact() {
    let t = target();
    let mut s = session(&t);
    for msg in [&b""[..], b"\0\xff binary", &vec![7u8; 100_000]] {
        s.write_all(&Header::new(Kind::Notif, msg.len() as u32, 0, 0).encode())
            .unwrap();
        s.write_all(msg).unwrap();
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let mut got = Vec::new();
    while got.len() < 3 {
        got.extend(t.engine.get_notifs());
        assert!(
            std::time::Instant::now() < deadline,
            "notifications never arrived"
        );
        std::thread::sleep(Duration::from_millis(1));
    }
    let msgs: Vec<&[u8]> = got.iter().map(|(_, m)| m.as_slice()).collect();
    assert_eq!(
        msgs,
        vec![&b""[..], b"\0\xff binary", &vec![7u8; 100_000][..]]
    );
    assert!(got.iter().all(|(from, _)| from.as_bytes() == b"raw"));
}

#[test]
fn connections_that_never_say_hello_are_capped_and_others_still_get_in() {
    let t = target();
    // Fill the handshake slots with silent clients.
    let silent: Vec<TcpStream> = (0..64).map(|_| connect(t.addr)).collect();
    // Wait until the server accepted them all (a new one is then refused).
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let mut probe = connect(t.addr);
        probe
            .set_read_timeout(Some(Duration::from_millis(200)))
            .unwrap();
        if closed_by_server(&mut probe) {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the server never refused a connection"
        );
    }
    drop(silent);
    // Once they are gone, a real client is served again.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let mut s = connect(t.addr);
        hello(&mut s, t.token);
        let mut h = [0u8; HEADER_LEN];
        if s.read_exact(&mut h).is_ok() {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the server never recovered"
        );
    }
    still_serves(&t);
}

mod fuzz {
    use super::*;
    use proptest::prelude::*;

    /// Byte streams that start like frames (a valid header of a random kind
    /// with random fields) followed by random bytes.
    fn hostile_stream() -> impl Strategy<Value = Vec<u8>> {
        (
            1u8..=7,
            any::<u32>(),
            any::<u64>(),
            0u64..2048,
            proptest::collection::vec(any::<u8>(), 0..4096),
        )
            .prop_map(|(kind, body_len, tag, aux, tail)| {
                let mut raw = Header::new(Kind::Notif, 0, 0, 0).encode().to_vec();
                raw[3] = kind;
                raw[4..8].copy_from_slice(&(body_len % 70_000).to_le_bytes());
                raw[8..16].copy_from_slice(&tag.to_le_bytes());
                raw[16..24].copy_from_slice(&aux.to_le_bytes());
                raw.extend_from_slice(&tail);
                raw
            })
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

        /// Whatever an authenticated client sends, the server answers or
        /// closes, never writes outside the registration, and keeps serving.
        #[test]
        fn random_streams_after_the_handshake(streams in proptest::collection::vec(hostile_stream(), 1..4)) {
            let t = target();
            for bytes in streams {
                let mut s = session(&t);
                s.set_read_timeout(Some(Duration::from_millis(50))).unwrap();
                let _ = s.write_all(&bytes);
                drop(s);
            }
            prop_assert!(t.guards_intact());
            still_serves(&t);
        }

        /// Writes and reads naming the real key with ranges around the region
        /// (inside, straddling its ends, outside) and data lengths that may
        /// not match: only in-range frames are applied, nothing lands outside.
        #[test]
        fn ranges_around_the_region(
            frames in proptest::collection::vec(
                (any::<bool>(), proptest::collection::vec((-8192i64..(LEN as i64 + 8192), 0u32..16384), 1..4), -64i64..64),
                1..6,
            )
        ) {
            let t = target();
            let mut s = session(&t);
            s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
            for (tag, (is_write, segs, data_skew)) in frames.into_iter().enumerate() {
                let segs: Vec<Seg> = segs
                    .into_iter()
                    .map(|(off, len)| Seg { key: t.region.key, addr: (t.region.addr as i64 + off) as u64, len })
                    .collect();
                let total: i64 = segs.iter().map(|g| i64::from(g.len)).sum();
                let in_range = segs.iter().all(|g| {
                    g.addr >= t.region.addr && g.addr + u64::from(g.len) <= t.region.addr + LEN as u64
                });
                if is_write {
                    let data = vec![0x5Au8; (total + data_skew).max(0) as usize];
                    write_frame(&mut s, tag as u64, &segs, &data);
                    if data_skew != 0 {
                        prop_assert!(closed_by_server(&mut s), "a frame whose data does not add up");
                        s = session(&t);
                        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
                        continue;
                    }
                    let (status, _) = answer(&mut s, Kind::WriteAck, tag as u64);
                    prop_assert_eq!(status == 0, in_range);
                } else {
                    read_frame(&mut s, tag as u64, &segs);
                    let (status, body) = answer(&mut s, Kind::ReadResp, tag as u64);
                    prop_assert_eq!(status == 0, in_range);
                    if in_range {
                        prop_assert_eq!(body.len() as i64, total);
                    }
                }
                prop_assert!(t.guards_intact());
            }
            still_serves(&t);
        }
    }
}
