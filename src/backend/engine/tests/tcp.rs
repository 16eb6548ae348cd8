//! The engine over its TCP transport: two engines in this process forced
//! onto TCP (`protocol=tcp`) on loopback.

use super::*;
use crate::transport::tcp::{PeerLink, TcpConfig, TcpTransport};
use crate::wire::conn_info;
use crate::wire::frame::{HEADER_LEN, Header, Kind};
use crate::wire::region::RegionPublic;
use std::io::{Read, Write};
use std::sync::atomic::{AtomicBool, Ordering};

pub(super) const TCP: &[(&str, &str)] = &[("protocol", "tcp"), ("ip_addr", "127.0.0.1")];

/// The TCP link of `e` to `agent`.
pub(super) struct Link(Arc<dyn Route>);

impl std::ops::Deref for Link {
    type Target = PeerLink;
    fn deref(&self) -> &PeerLink {
        self.0.as_any().downcast_ref().expect("a TCP link")
    }
}

pub(super) fn link(e: &Engine, agent: &str) -> Link {
    let route = route_of(e, agent);
    if !route.as_any().is::<PeerLink>() {
        panic!("agent {agent} is not reached over TCP");
    }
    Link(route)
}

pub(super) fn wait_for(what: &str, cond: impl Fn() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(1));
    }
}

#[test]
fn large_descriptors_are_sliced_over_streams() {
    let p = pair_with(
        40 << 20,
        true,
        &[
            ("protocol", "tcp"),
            ("ip_addr", "127.0.0.1"),
            ("streams", "3"),
        ],
    );
    let id = p.whole(Op::Write);
    let _ = p.a.post_xfer(id, Some(b"big")).unwrap();
    assert_eq!(wait(&p.a, id), Ok(Status::Success));
    assert_eq!(p.abuf, p.bbuf);
    assert_eq!(
        notifs_until(&p.b, 1),
        vec![(AgentName::from("A"), b"big".to_vec())]
    );
}

/// Small posts on one link: `slots` WRITE and READ requests of 4 KiB each
/// between `p.abuf` and `p.bbuf`.
fn small_requests(p: &Pair, op: Op, slots: usize) -> Vec<ReqId> {
    (0..slots)
        .map(|s| {
            let off = (s * 4096) as u64;
            let l = Desc {
                addr: p.abuf.as_ptr() as u64 + off,
                len: 4096,
                md: p.amd,
            };
            let r = Desc {
                addr: p.bbuf.as_ptr() as u64 + off,
                len: 4096,
                md: p.bmd_remote,
            };
            p.a.prep_xfer(op, &[l], &[r], b"B").unwrap()
        })
        .collect()
}

#[test]
fn a_polling_caller_reads_small_answers_and_the_reader_takes_back_when_polls_stop() {
    let p = pair_with(32 * 4096, true, TCP);
    let writes = small_requests(&p, Op::Write, 32);
    // Back-to-back small posts, each polled to completion: after the first
    // answer the reader thread leaves the stream to the polling thread.
    let l = link(&p.a, "B");
    let deadline = Instant::now() + Duration::from_secs(60);
    while l.polled() == 0 {
        assert!(
            Instant::now() < deadline,
            "no answer was read by the polling thread"
        );
        for &id in &writes {
            let _ = p.a.post_xfer(id, None).unwrap();
            assert_eq!(wait(&p.a, id), Ok(Status::Success));
        }
    }
    assert_eq!(p.abuf, p.bbuf);
    // A post nobody polls: the reader thread takes the stream back, reads
    // the acknowledgement and sends the notification behind it.
    let _ = p.a.post_xfer(writes[0], Some(b"unpolled")).unwrap();
    assert_eq!(
        notifs_until(&p.b, 1),
        vec![(AgentName::from("A"), b"unpolled".to_vec())]
    );
    assert_eq!(wait(&p.a, writes[0]), Ok(Status::Success));
}

#[test]
fn after_a_pause_the_polling_caller_reads_the_first_answer_itself() {
    // After a pause the reader thread has the stream back and waits on the
    // socket; it waits without holding the stream, so the caller's polls
    // read the first answer after the pause instead of waiting for the
    // reader thread's wake-up. (A caller descheduled between its post and
    // its first poll leaves that answer to the reader: several attempts.)
    let p = pair_with(4096, true, TCP);
    let id = small_requests(&p, Op::Write, 1)[0];
    let l = link(&p.a, "B");
    let _ = p.a.post_xfer(id, None).unwrap();
    assert_eq!(wait(&p.a, id), Ok(Status::Success));
    for _ in 0..50 {
        // Longer than the hand-off (200 us): the reader takes the stream back,
        // and waits for the next answer without holding the stream.
        std::thread::sleep(Duration::from_millis(5));
        wait_for("the reader to wait without holding the stream", || {
            l.stream_free(0)
        });
        let before = l.polled();
        let _ = p.a.post_xfer(id, None).unwrap();
        assert_eq!(spin(&p.a, id), Ok(Status::Success));
        if l.polled() > before {
            return;
        }
    }
    panic!("the first answer after a pause was never read by the polling caller");
}

#[test]
fn large_answers_go_back_to_the_reader_while_small_ones_are_polled() {
    // One stream: the big READ's data and the small posts' answers share it.
    let params = &[
        ("protocol", "tcp"),
        ("ip_addr", "127.0.0.1"),
        ("streams", "1"),
    ];
    let p = pair_with(4096, true, params);
    let len = 16 << 20;
    let local = vec![0u8; len];
    let remote: Vec<u8> = (0..len).map(|i| (i * 13 + 5) as u8).collect();
    let (lmd, rmd) = expose(&p.a, &p.b, b"B", &local, &remote);
    let read = |off: usize, n: usize| {
        let l = Desc {
            addr: local.as_ptr() as u64 + off as u64,
            len: n as u64,
            md: lmd,
        };
        let r = Desc {
            addr: remote.as_ptr() as u64 + off as u64,
            len: n as u64,
            md: rmd,
        };
        p.a.prep_xfer(Op::Read, &[l], &[r], b"B").unwrap()
    };
    // Small READs of the first 32 blocks, one big READ of the rest.
    let small: Vec<ReqId> = (0..32).map(|s| read(s * 4096, 4096)).collect();
    let big = read(32 * 4096, len - 32 * 4096);
    for _ in 0..4 {
        let _ = p.a.post_xfer(big, None).unwrap();
        for &id in &small {
            let _ = p.a.post_xfer(id, None).unwrap();
            assert_eq!(wait(&p.a, id), Ok(Status::Success));
        }
        assert_eq!(wait(&p.a, big), Ok(Status::Success));
    }
    assert!(local == remote, "every byte read, small and large");
}

/// Reads one request from a fake peer's socket: its header and the bytes
/// its segments name (`None` once the engine closed the connection).
pub(super) fn read_request(s: &mut std::net::TcpStream) -> Option<(Header, usize)> {
    let mut head = [0u8; HEADER_LEN];
    s.read_exact(&mut head).ok()?;
    let h = Header::decode(&head).unwrap();
    let mut table = vec![0u8; h.body_len as usize];
    s.read_exact(&mut table).ok()?;
    let segs = crate::wire::frame::decode_segs(&table, h.aux as usize, None).unwrap();
    Some((h, segs.iter().map(|g| g.len as usize).sum()))
}

#[test]
fn a_parked_reader_is_handed_a_large_answer_that_arrives_before_a_polled_one() {
    // The fake peer answers READs with 0xAB; once told, it takes the next
    // two requests and answers the larger first.
    let (larger_first, told) = std::sync::mpsc::channel::<()>();
    let (addr, fake) = fake_peer(move |mut s| {
        let answer = |s: &mut std::net::TcpStream, h: &Header, len: usize| {
            let mut out = Header::new(Kind::ReadResp, len as u32, h.tag, 0)
                .encode()
                .to_vec();
            out.resize(HEADER_LEN + len, 0xAB);
            s.write_all(&out).is_ok()
        };
        while let Some((h, len)) = read_request(&mut s) {
            let mut batch = vec![(h, len)];
            if told.try_recv().is_ok() {
                batch.extend(read_request(&mut s));
                batch.sort_by_key(|&(_, len)| std::cmp::Reverse(len));
            }
            for (h, len) in batch {
                if !answer(&mut s, &h, len) {
                    return;
                }
            }
        }
    });
    // The reader thread stays parked for an hour after a poll: only a
    // hand-back can make it read the large answer.
    let (a, buf, lmd, rmd) = fake_agent(addr, 1 << 20, ONE_STREAM, |c| {
        c.handoff = Duration::from_secs(3600);
    });
    let read = |off: u64, len: u64| {
        let l = Desc {
            addr: buf.as_ptr() as u64 + off,
            len,
            md: lmd,
        };
        let r = Desc {
            addr: 0x10000 + off,
            len,
            md: rmd,
        };
        a.prep_xfer(Op::Read, &[l], &[r], b"Fake").unwrap()
    };
    let small = read(0, 4096);
    let big = read(4096, 256 << 10);
    let l = link(&a, "Fake");
    // Small READs until three answers in a row were read by this thread: the
    // reader thread is parked then.
    let (mut streak, mut last) = (0, 0);
    let deadline = Instant::now() + Duration::from_secs(60);
    while streak < 3 {
        assert!(
            Instant::now() < deadline,
            "the polling thread never took over"
        );
        let _ = a.post_xfer(small, None).unwrap();
        assert_eq!(wait(&a, small), Ok(Status::Success));
        let polled = l.polled();
        streak = if polled > last { streak + 1 } else { 0 };
        last = polled;
    }
    let handed = l.handed_back();
    larger_first.send(()).unwrap();
    // The small one first, so that it goes out inline and is polled.
    let _ = a.post_xfer(small, None).unwrap();
    let _ = a.post_xfer(big, None).unwrap();
    assert_eq!(wait(&a, small), Ok(Status::Success));
    assert_eq!(wait(&a, big), Ok(Status::Success));
    assert!(l.handed_back() > handed, "the large answer was handed back");
    assert!(buf[..4096 + (256 << 10)].iter().all(|&b| b == 0xAB));
    drop(a);
    fake.join().unwrap();
}

#[test]
fn the_target_refuses_a_deregistered_region_with_a_clear_error() {
    let p = pair_with(4096, true, TCP);
    let id = p.whole(Op::Write);
    let bmd = *p.b.mds.read().keys().next().unwrap();
    p.b.deregister_mem(bmd).unwrap();
    let _ = p.a.post_xfer(id, Some(b"never"));
    match wait(&p.a, id) {
        Err(Error::NotAllowed(msg)) => assert!(msg.contains("refused"), "{msg}"),
        other => panic!("expected NotAllowed, got {other:?}"),
    }
    assert!(p.bbuf.iter().all(|&x| x == 0), "no byte written");
    assert!(
        p.b.get_notifs().is_empty(),
        "no notification for a refused transfer"
    );
    // The connection survives a refusal: a valid transfer still works.
    let dst = vec![0u8; 4096];
    let dmd = p.b.register_mem(dst.as_ptr() as u64, 4096, 0, 0).unwrap();
    let rmd =
        p.a.load_remote_md(
            dst.as_ptr() as u64,
            4096,
            0,
            &p.b.public_data(dmd).unwrap(),
            b"B",
        )
        .unwrap();
    let ok =
        p.a.prep_xfer(
            Op::Write,
            &[Desc {
                addr: p.abuf.as_ptr() as u64,
                len: 4096,
                md: p.amd,
            }],
            &[Desc {
                addr: dst.as_ptr() as u64,
                len: 4096,
                md: rmd,
            }],
            b"B",
        )
        .unwrap();
    let _ = p.a.post_xfer(ok, None).unwrap();
    assert_eq!(wait(&p.a, ok), Ok(Status::Success));
    assert_eq!(&dst[..], &p.abuf[..]);
}

#[test]
fn a_cancelled_read_never_writes_after_release() {
    let p = pair_with(64 << 20, true, TCP);
    // READ B's zeros into A's pattern: any byte landing late would show.
    let id = p.whole(Op::Read);
    let _ = p.a.post_xfer(id, Some(b"cancelled")).unwrap();
    p.a.release_req(id).unwrap();
    let snapshot = p.abuf.clone();
    // Wait until every frame of the cancelled post was answered and drained.
    let l = link(&p.a, "B");
    wait_for("the peer to answer the cancelled frames", || {
        l.pending() == 0
    });
    assert_eq!(
        p.abuf, snapshot,
        "no byte landed after releaseReqH returned"
    );
    assert!(
        p.b.get_notifs().is_empty(),
        "a cancelled READ sends no notification"
    );
}

#[test]
fn a_dead_peer_fails_transfers_at_once_and_a_restarted_one_works() {
    let a = engine_with("A", true, TCP);
    let b = engine_with("B", true, TCP);
    a.load_remote_conn_info(b"B", b.conn_info()).unwrap();
    let len = 64 << 20;
    let src = vec![1u8; len];
    let dst = vec![0u8; len];
    let (smd, rmd) = expose(&a, &b, b"B", &src, &dst);
    let id = a
        .prep_xfer(Op::Write, &[whole(&src, smd)], &[whole(&dst, rmd)], b"B")
        .unwrap();
    a.connect(b"B").unwrap();
    // Kill B's side of every connection (what the kernel does when B dies).
    b.transports
        .get::<TcpTransport>()
        .expect("a TCP transport")
        .server()
        .shutdown();
    let failed = a.post_xfer(id, None).and_then(|_| wait(&a, id));
    assert!(
        matches!(failed, Err(Error::RemoteDisconnect(_))),
        "{failed:?}"
    );
    // Later posts fail fast.
    let started = Instant::now();
    assert!(matches!(
        a.post_xfer(id, None),
        Err(Error::RemoteDisconnect(_))
    ));
    assert!(started.elapsed() < Duration::from_secs(1));
    drop(b);

    // A new engine for agent B, with new metadata, works again.
    let b2 = engine_with("B", true, TCP);
    a.load_remote_conn_info(b"B", b2.conn_info()).unwrap();
    let dmd2 = b2
        .register_mem(dst.as_ptr() as u64, len as u64, 0, 0)
        .unwrap();
    let rmd2 = a
        .load_remote_md(
            dst.as_ptr() as u64,
            len as u64,
            0,
            &b2.public_data(dmd2).unwrap(),
            b"B",
        )
        .unwrap();
    let id2 = a
        .prep_xfer(Op::Write, &[whole(&src, smd)], &[whole(&dst, rmd2)], b"B")
        .unwrap();
    let _ = a.post_xfer(id2, Some(b"back")).unwrap();
    assert_eq!(wait(&a, id2), Ok(Status::Success));
    assert_eq!(src, dst);
    assert_eq!(notifs_until(&b2, 1).len(), 1);
}

#[test]
fn a_peer_with_a_forged_token_is_refused() {
    let a = engine_with("A", true, TCP);
    let b = engine_with("B", true, TCP);
    // A peer whose metadata names B's address but not B's token.
    let mut info = ConnInfo::decode(b.conn_info()).unwrap();
    info.token ^= 1;
    a.load_remote_conn_info(b"B", &info.encode()).unwrap();
    assert!(matches!(a.connect(b"B"), Err(Error::RemoteDisconnect(m)) if m.contains("refused")));
    assert!(matches!(
        a.gen_notif(b"B", b"x"),
        Err(Error::RemoteDisconnect(_))
    ));
    assert!(b.get_notifs().is_empty());
}

/// A fake peer on loopback: accepts one connection, answers the hello, then
/// hands the socket to `then`. Returns its address and thread.
pub(super) fn fake_peer(
    then: impl FnOnce(std::net::TcpStream) + Send + 'static,
) -> (std::net::SocketAddr, std::thread::JoinHandle<()>) {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let t = std::thread::spawn(move || {
        let (mut s, _) = listener.accept().unwrap();
        read_frame(&mut s); // the hello
        s.write_all(&Header::new(Kind::HelloOk, 0, 0, 0).encode())
            .unwrap();
        then(s);
    });
    (addr, t)
}

/// An engine "A" (its TCP settings changed by `config`) that knows a fake
/// agent "Fake" at `addr` with one region of `len` bytes at 0x10000, and a
/// registered local buffer of `len` bytes. Returns the engine, the buffer and
/// the metadata ids of both.
pub(super) fn fake_agent(
    addr: std::net::SocketAddr,
    len: u64,
    params: &[(&str, &str)],
    config: impl FnOnce(&mut TcpConfig),
) -> (Engine, Vec<u8>, MdId, MdId) {
    let a =
        Engine::with_transports(EngineConfig::new("A", params), |c| config(&mut c.tcp)).unwrap();
    let mut info = ConnInfo::decode(a.conn_info()).unwrap();
    info.agent = b"Fake".to_vec();
    info.token = 77;
    info.pid = 0;
    info.endpoints = vec![conn_info::Endpoint::Tcp(addr)];
    a.load_remote_conn_info(b"Fake", &info.encode()).unwrap();
    let buf = vec![0u8; len as usize];
    let lmd = a.register_mem(buf.as_ptr() as u64, len, 0, 0).unwrap();
    let region = RegionPublic {
        owner: 77,
        key: 5,
        addr: 0x10000,
        len,
        mem_type: 0,
        dev_id: 0,
        ipc: None,
        rdma: None,
        vmm: None,
    };
    let rmd = a
        .load_remote_md(0x10000, len, 0, &region.encode(), b"Fake")
        .unwrap();
    (a, buf, lmd, rmd)
}

/// [`fake_agent`] with default settings and a prepped request of `len`
/// bytes (the whole buffer to the whole region).
pub(super) fn to_fake(
    addr: std::net::SocketAddr,
    op: Op,
    len: u64,
    params: &[(&str, &str)],
) -> (Engine, Vec<u8>, ReqId) {
    let (a, buf, lmd, rmd) = fake_agent(addr, len, params, |_| {});
    let id = a
        .prep_xfer(
            op,
            &[Desc {
                addr: buf.as_ptr() as u64,
                len,
                md: lmd,
            }],
            &[Desc {
                addr: 0x10000,
                len,
                md: rmd,
            }],
            b"Fake",
        )
        .unwrap();
    (a, buf, id)
}

#[test]
fn release_never_hangs_on_a_peer_that_stopped_reading() {
    // The fake peer reads nothing: a 64 MiB WRITE fills the socket buffers and
    // a sender blocks in the middle of a frame.
    let (addr, fake) = fake_peer(|s| {
        let _ = s.set_read_timeout(Some(Duration::from_secs(60)));
        std::thread::sleep(Duration::from_secs(2));
        drop(s);
    });
    let params = &[
        ("protocol", "tcp"),
        ("ip_addr", "127.0.0.1"),
        ("streams", "1"),
        ("timeout_ms", "0"),
    ];
    let (a, _buf, id) = to_fake(addr, Op::Write, 64 << 20, params);
    assert_eq!(a.post_xfer(id, None), Ok(Status::InProg));
    // Let the sender get stuck.
    wait_for("the sender to block", || link(&a, "Fake").pending() > 0);
    std::thread::sleep(Duration::from_millis(100));
    let started = Instant::now();
    a.release_req(id).unwrap();
    let took = started.elapsed();
    assert!(took < Duration::from_secs(5), "releaseReqH took {took:?}");
    drop(a);
    fake.join().unwrap();
}

/// Reads one frame (header and body) from a fake peer's socket.
pub(super) fn read_frame(s: &mut std::net::TcpStream) -> crate::wire::frame::Header {
    let mut head = [0u8; HEADER_LEN];
    s.read_exact(&mut head).unwrap();
    let h = Header::decode(&head).unwrap();
    let mut body = vec![0u8; h.body_len as usize];
    s.read_exact(&mut body).unwrap();
    h
}

/// Reads until the other side closes.
pub(super) fn drain_until_closed(mut s: std::net::TcpStream) {
    let mut sink = [0u8; 65536];
    while s.read(&mut sink).is_ok_and(|n| n > 0) {}
}

pub(super) const ONE_STREAM: &[(&str, &str)] = &[
    ("protocol", "tcp"),
    ("ip_addr", "127.0.0.1"),
    ("streams", "1"),
];

#[test]
fn a_reply_of_the_wrong_kind_breaks_the_link_not_the_memory() {
    // The fake peer answers a WRITE with "read data" for its tag.
    let (addr, fake) = fake_peer(|mut s| {
        let h = read_frame(&mut s);
        s.write_all(&Header::new(Kind::ReadResp, 4096, h.tag, 0).encode())
            .unwrap();
        let _ = s.write_all(&[0xEE; 4096]);
        drain_until_closed(s);
    });
    let (a, buf, id) = to_fake(addr, Op::Write, 4096, ONE_STREAM);
    let _ = a.post_xfer(id, None);
    assert!(matches!(wait(&a, id), Err(Error::RemoteDisconnect(m)) if m.contains("read data")));
    assert!(
        buf.iter().all(|&b| b == 0),
        "the WRITE's source buffer was not written"
    );
    drop(a);
    fake.join().unwrap();
}

#[test]
fn a_spinning_caller_waits_on_a_large_transfer_and_only_yields_on_a_small_one() {
    // The fake peers read everything and never answer: the posts stay in
    // progress for as long as the test spins on them.
    for (len, waits) in [(4096u64, false), (4 << 20, true)] {
        let (addr, fake) = fake_peer(drain_until_closed);
        let (a, _buf, id) = to_fake(addr, Op::Write, len, ONE_STREAM);
        assert_eq!(a.post_xfer(id, None), Ok(Status::InProg));
        // Checks in a tight loop (a check 50 µs after the previous one is
        // not spinning: a loaded host may interrupt the loop now and then).
        for _ in 0..2000 {
            let started = Instant::now();
            assert_eq!(a.check_xfer(id), Ok(Status::InProg));
            assert!(
                started.elapsed() < Duration::from_secs(10),
                "a check blocked"
            );
            if a.spin_waits() >= 20 {
                break;
            }
        }
        if waits {
            assert!(a.spin_waits() >= 20, "{} waits", a.spin_waits());
        } else {
            assert_eq!(
                a.spin_waits(),
                0,
                "a 4 KiB transfer has too little left to wait for"
            );
        }
        drop(a); // closes the connection: the fake peer's read loop ends
        fake.join().unwrap();
    }
}

#[test]
fn a_caller_sweeping_over_several_requests_never_waits() {
    let (addr, fake) = fake_peer(drain_until_closed);
    let len = 8u64 << 20;
    let (a, buf, lmd, rmd) = fake_agent(addr, len, ONE_STREAM, |_| {});
    let half = len / 2;
    let ids: Vec<ReqId> = (0..2)
        .map(|i| {
            let local = Desc {
                addr: buf.as_ptr() as u64 + i * half,
                len: half,
                md: lmd,
            };
            let remote = Desc {
                addr: 0x10000 + i * half,
                len: half,
                md: rmd,
            };
            a.prep_xfer(Op::Write, &[local], &[remote], b"Fake")
                .unwrap()
        })
        .collect();
    a.connect(b"Fake").unwrap();
    for &id in &ids {
        assert_eq!(a.post_xfer(id, None), Ok(Status::InProg));
    }
    for _ in 0..500 {
        for &id in &ids {
            assert_eq!(a.check_xfer(id), Ok(Status::InProg));
        }
    }
    assert_eq!(a.spin_waits(), 0, "a sweep was taken for a spin");
    // The same requests, each spun on in turn, are waited for.
    for &id in &ids {
        for _ in 0..2000 {
            assert_eq!(a.check_xfer(id), Ok(Status::InProg));
        }
    }
    assert!(a.spin_waits() > 0);
    drop(a);
    fake.join().unwrap();
}

#[test]
fn a_hung_peer_is_caught_by_the_stall_timeout() {
    // The fake peer reads everything and never answers.
    let (addr, fake) = fake_peer(drain_until_closed);
    let params = &[
        ("protocol", "tcp"),
        ("ip_addr", "127.0.0.1"),
        ("timeout_ms", "300"),
        ("streams", "1"),
    ];
    let (a, _buf, id) = to_fake(addr, Op::Write, 4096, params);
    let started = Instant::now();
    assert_eq!(a.post_xfer(id, None), Ok(Status::InProg));
    let result = wait(&a, id);
    assert!(
        matches!(&result, Err(Error::RemoteDisconnect(m)) if m.contains("neither answered nor took data")),
        "{result:?}"
    );
    assert!(started.elapsed() >= Duration::from_millis(300));
    drop(a); // closes the connection: the fake peer's read loop ends
    fake.join().unwrap();
}

#[test]
fn a_peer_that_dies_in_the_middle_of_read_data_fails_the_read() {
    let (addr, fake) = fake_peer(|mut s| {
        let h = read_frame(&mut s);
        // Promise 4096 bytes, deliver 100, vanish.
        s.write_all(&Header::new(Kind::ReadResp, 4096, h.tag, 0).encode())
            .unwrap();
        s.write_all(&[0x11; 100]).unwrap();
    });
    let (a, _buf, id) = to_fake(addr, Op::Read, 4096, ONE_STREAM);
    let _ = a.post_xfer(id, None);
    assert!(matches!(wait(&a, id), Err(Error::RemoteDisconnect(_))));
    fake.join().unwrap();
}

/// A listener whose accept queue is full: the kernel drops further SYNs, so
/// a connect to it hangs as one to an unreachable host does. Returns its
/// address and the sockets that must live as long as the test.
fn blackhole() -> (std::net::SocketAddr, socket2::Socket, std::net::TcpStream) {
    use socket2::{Domain, Socket, Type};
    let listener = Socket::new(Domain::IPV4, Type::STREAM, None).unwrap();
    let any: std::net::SocketAddr = "127.0.0.1:0".parse().unwrap();
    listener.bind(&any.into()).unwrap();
    listener.listen(0).unwrap();
    let addr = listener.local_addr().unwrap().as_socket().unwrap();
    let filler = std::net::TcpStream::connect(addr).unwrap();
    (addr, listener, filler)
}

#[test]
fn a_post_never_waits_for_the_network_and_close_never_waits_for_a_connect() {
    let (addr, _listener, _filler) = blackhole();
    let (a, _buf, id) = to_fake(addr, Op::Write, 4096, TCP);
    // The connect hangs: the post, and a notification, queue behind it.
    assert_eq!(a.post_xfer(id, Some(b"queued")), Ok(Status::InProg));
    assert_eq!(a.check_xfer(id), Ok(Status::InProg));
    assert_eq!(a.gen_notif(b"Fake", b"queued too"), Ok(()));
    // Closing the link gives up on the connects in progress (each checks
    // every 50 ms) instead of waiting out the 5 s connect timeout.
    let started = Instant::now();
    a.disconnect(b"Fake").unwrap();
    let took = started.elapsed();
    assert!(took < Duration::from_secs(3), "disconnect took {took:?}");
    assert!(matches!(wait(&a, id), Err(Error::RemoteDisconnect(_))));
}

#[test]
fn a_peer_that_never_accepts_fails_the_queued_post_after_the_connect_timeout() {
    let (addr, _listener, _filler) = blackhole();
    let (a, _buf, id) = to_fake(addr, Op::Read, 4096, ONE_STREAM);
    assert_eq!(a.post_xfer(id, None), Ok(Status::InProg));
    assert!(
        matches!(wait(&a, id), Err(Error::RemoteDisconnect(m)) if m.contains("cannot connect")),
        "the post fails with the reason"
    );
    // The link stays down: later posts fail at once, with the same reason.
    assert!(
        matches!(a.post_xfer(id, None), Err(Error::RemoteDisconnect(m)) if m.contains("cannot connect"))
    );
}

#[test]
fn posts_queued_during_a_slow_handshake_go_out_once_it_completes() {
    let (go, hello_ok) = std::sync::mpsc::channel::<()>();
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let fake = std::thread::spawn(move || {
        let (mut s, _) = listener.accept().unwrap();
        read_frame(&mut s); // the hello, answered only when the test says so
        hello_ok.recv().unwrap();
        s.write_all(&Header::new(Kind::HelloOk, 0, 0, 0).encode())
            .unwrap();
        let w = read_frame(&mut s);
        assert_eq!(w.kind, Kind::Write);
        s.write_all(&Header::new(Kind::WriteAck, 0, w.tag, 0).encode())
            .unwrap();
        let n = read_frame(&mut s);
        assert_eq!(n.kind, Kind::Notif, "the notification follows the data");
        drain_until_closed(s);
    });
    let (a, _buf, id) = to_fake(addr, Op::Write, 4096, ONE_STREAM);
    assert_eq!(a.post_xfer(id, Some(b"after")), Ok(Status::InProg));
    assert_eq!(a.check_xfer(id), Ok(Status::InProg));
    go.send(()).unwrap();
    assert_eq!(wait(&a, id), Ok(Status::Success));
    drop(a);
    fake.join().unwrap();
}

#[test]
fn a_live_agent_s_name_cannot_be_taken_but_a_restart_is_accepted() {
    let b = engine_with("B", false, TCP);
    let a1 = engine_with("A", false, TCP);
    b.load_remote_conn_info(b"A", a1.conn_info()).unwrap();
    // Another engine calls itself A while the A that B knows is alive.
    let impostor = engine_with("A", false, TCP);
    impostor.load_remote_conn_info(b"B", b.conn_info()).unwrap();
    assert!(
        matches!(
            link(&impostor, "B").ensure_connected(),
            Err(Error::RemoteDisconnect(_))
        ),
        "a second live agent named A was let in"
    );
    // The genuine A still gets in.
    a1.load_remote_conn_info(b"B", b.conn_info()).unwrap();
    a1.gen_notif(b"B", b"genuine").unwrap();
    assert_eq!(
        notifs_until(&b, 1),
        vec![(AgentName::from("A"), b"genuine".to_vec())]
    );
    // A restarts: the new engine is accepted once the old one is gone,
    // before B loads its new info.
    drop(a1);
    let a2 = engine_with("A", false, TCP);
    a2.load_remote_conn_info(b"B", b.conn_info()).unwrap();
    a2.gen_notif(b"B", b"restarted").unwrap();
    assert_eq!(
        notifs_until(&b, 1),
        vec![(AgentName::from("A"), b"restarted".to_vec())]
    );
    // Once B loaded the new info, the new engine is the one that counts.
    b.load_remote_conn_info(b"A", a2.conn_info()).unwrap();
    let impostor = engine_with("A", false, TCP);
    impostor.load_remote_conn_info(b"B", b.conn_info()).unwrap();
    assert!(link(&impostor, "B").ensure_connected().is_err());
    drop(impostor);
}

/// Engine `e`'s TCP listener, shared (for hooks that outlive a borrow).
fn tcp_server_of(e: &Engine) -> Arc<crate::transport::tcp::TcpServer> {
    e.transports
        .get::<TcpTransport>()
        .expect("a TCP transport")
        .server()
        .clone()
}

/// Cuts `b`'s connections from agent "A" right after `b` delivered its first
/// numbered notification, before the acknowledgement; the flag says it did.
fn cut_after_first_delivery(b: &Engine) -> (crate::common::fault::Guard, Arc<AtomicBool>) {
    let server = tcp_server_of(b);
    let fired = Arc::new(AtomicBool::new(false));
    let hook = {
        let fired = fired.clone();
        crate::common::fault::set("tcp.server.notif_delivered", b.endpoint.token, move || {
            if !fired.swap(true, Ordering::AcqRel) {
                server.close_from(&AgentName::from("A"));
            }
        })
    };
    (hook, fired)
}

#[test]
fn a_notification_whose_acknowledgement_is_lost_is_sent_again_and_delivered_once() {
    let p = pair_with(4096, true, TCP);
    let (_hook, fired) = cut_after_first_delivery(&p.b);
    p.a.gen_notif(b"B", b"once").unwrap();
    let l = link(&p.a, "B");
    // Sent again on new connections, recognised there, acknowledged.
    wait_for("the notification to be acknowledged", || {
        fired.load(Ordering::Acquire) && l.unacked_notifs() == 0
    });
    p.a.gen_notif(b"B", b"after").unwrap();
    let got = notifs_until(&p.b, 2);
    let msgs: Vec<&[u8]> = got.iter().map(|(_, m)| m.as_slice()).collect();
    assert_eq!(msgs, [&b"once"[..], b"after"], "delivered once, in order");
    wait_for("the second acknowledgement", || l.unacked_notifs() == 0);
    assert!(p.b.get_notifs().is_empty(), "a copy came later");
}

#[test]
fn a_transfer_s_notification_whose_acknowledgement_is_lost_is_delivered_once() {
    let p = pair_with(64 << 10, true, TCP);
    let (_hook, fired) = cut_after_first_delivery(&p.b);
    let id = p.whole(Op::Write);
    p.a.post_xfer(id, Some(b"xfer")).unwrap();
    assert_eq!(wait(&p.a, id), Ok(Status::Success));
    let l = link(&p.a, "B");
    wait_for("the notification to be acknowledged", || {
        fired.load(Ordering::Acquire) && l.unacked_notifs() == 0
    });
    // The next transfer's notification follows the first, which came once.
    p.a.post_xfer(id, Some(b"next")).unwrap();
    assert_eq!(wait(&p.a, id), Ok(Status::Success));
    let got = notifs_until(&p.b, 2);
    let msgs: Vec<&[u8]> = got.iter().map(|(_, m)| m.as_slice()).collect();
    assert_eq!(msgs, [&b"xfer"[..], b"next"]);
    wait_for("the second acknowledgement", || l.unacked_notifs() == 0);
    assert!(p.b.get_notifs().is_empty(), "a copy came later");
    assert_eq!(p.bbuf, p.abuf);
}

#[test]
fn notifications_for_a_peer_that_never_comes_back_are_given_up() {
    let p = pair_with(4096, true, TCP);
    let (_hook, fired) = cut_after_first_delivery(&p.b);
    // Delivered, its acknowledgement lost, then the peer's listener goes:
    // nothing can take it again.
    p.a.gen_notif(b"B", b"orphan").unwrap();
    wait_for("the first delivery", || fired.load(Ordering::Acquire));
    tcp_server_of(&p.b).shutdown();
    let l = link(&p.a, "B");
    let t0 = std::time::Instant::now();
    wait_for("the notification to be given up", || {
        l.unacked_notifs() == 0
    });
    assert!(
        t0.elapsed() < Duration::from_secs(30),
        "given up after the test's REDELIVER_FOR of 3 s (and a backoff), not held on"
    );
    assert_eq!(notifs_until(&p.b, 1).len(), 1, "delivered the one time");
}
