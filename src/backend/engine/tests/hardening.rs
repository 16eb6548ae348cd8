//! One test per defect found by reading the data paths (issue 15), each of
//! which fails without its fix. Races are made to happen with the
//! fault-injection points of [`crate::common::fault`] or with fake peers on
//! loopback that stop reading, trickle, or answer out of order.
//!
//! Defect 1 (cross-memory attach writing into a peer whose engine is gone)
//! is `conformance::cma::target_death_in_flight_writes_nothing_afterwards`
//! with `transport::cma::control::tests`.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc;

use parking_lot::Condvar;

use super::tcp::{
    ONE_STREAM, TCP, drain_until_closed, fake_agent, fake_peer, link, read_frame, wait_for,
};
use super::*;
use crate::common::fault;
use crate::transport::tcp::TcpTransport;
use crate::wire::frame::{self, HEADER_LEN, Header, Hello, Kind, Seg};

/// A prepped one-descriptor request to the fake agent: `len` bytes at
/// offset `off` of `buf` and of the fake region (at 0x10000).
fn to_fake_at(a: &Engine, op: Op, buf: &[u8], lmd: MdId, rmd: MdId, off: u64, len: u64) -> ReqId {
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
    a.prep_xfer(op, &[l], &[r], b"Fake").unwrap()
}

/// A gate a fault hook waits at until the test opens it.
#[derive(Default)]
struct Gate {
    open: Mutex<bool>,
    cv: Condvar,
    entered: AtomicUsize,
}

impl Gate {
    fn wait(&self) {
        self.entered.fetch_add(1, Ordering::SeqCst);
        let mut open = self.open.lock();
        while !*open {
            self.cv.wait(&mut open);
        }
    }

    fn open(&self) {
        *self.open.lock() = true;
        self.cv.notify_all();
    }

    fn wait_entered(&self, n: usize) {
        wait_for("the hook to be reached", || {
            self.entered.load(Ordering::SeqCst) >= n
        });
    }
}

fn tcp_server(e: &Engine) -> &crate::transport::tcp::TcpServer {
    e.transports
        .get::<TcpTransport>()
        .expect("a TCP transport")
        .server()
}

/// A raw client of engine `e`'s listener that has said hello as `name`.
fn hello(e: &Engine, name: &str) -> TcpStream {
    let mut s = TcpStream::connect(tcp_server(e).local_addr()).unwrap();
    let body = Hello {
        target_token: e.endpoint.token,
        sender_token: 1,
        name: name.as_bytes().to_vec(),
    }
    .encode();
    s.write_all(&Header::new(Kind::Hello, body.len() as u32, 0, 0).encode())
        .unwrap();
    s.write_all(&body).unwrap();
    assert_eq!(read_frame(&mut s).kind, Kind::HelloOk);
    s
}

/// The access key of `e`'s registration `md`.
fn key_of(e: &Engine, md: MdId) -> u64 {
    RegionPublic::decode(&e.public_data(md).unwrap())
        .unwrap()
        .key
}

/// True when the other side closed `s` (EOF or reset) within `within`.
fn closed_within(s: &mut TcpStream, within: Duration) -> bool {
    s.set_read_timeout(Some(within)).unwrap();
    let mut byte = [0u8; 1];
    loop {
        match s.read(&mut byte) {
            Ok(0) => return true,
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                return false;
            }
            Err(_) => return true,
            Ok(_) => {}
        }
    }
}

// ---- defect 2 ---------------------------------------------------------------

#[test]
fn d2_posts_to_a_peer_that_stopped_reading_never_block_nor_do_check_and_release() {
    let (stop, stopped) = mpsc::channel::<()>();
    let (addr, fake) = fake_peer(move |s| {
        let _ = stopped.recv(); // reads nothing until the test ends
        drop(s);
    });
    let params = &[
        ("protocol", "tcp"),
        ("ip_addr", "127.0.0.1"),
        ("streams", "1"),
        ("timeout_ms", "0"),
    ];
    let len = 32u64 << 20;
    let block = 64u64 << 10;
    let (a, buf, lmd, rmd) = fake_agent(addr, len, params, |_| {});
    a.connect(b"Fake").unwrap();
    // One-frame posts of 64 KiB go out inline while the writer is idle:
    // far more of them than the socket buffers hold.
    let ids: Vec<ReqId> = (0..len / block)
        .map(|i| to_fake_at(&a, Op::Write, &buf, lmd, rmd, i * block, block))
        .collect();
    let a = Arc::new(a);
    let (took_tx, took) = mpsc::channel();
    let poster = {
        let (a, ids) = (a.clone(), ids.clone());
        std::thread::spawn(move || {
            for &id in &ids {
                let started = Instant::now();
                let r = a.post_xfer(id, None);
                took_tx.send((r, started.elapsed())).unwrap();
            }
        })
    };
    for i in 0..ids.len() {
        let (r, t) = took
            .recv_timeout(Duration::from_secs(60))
            .unwrap_or_else(|_| panic!("post {i} blocked on the full socket"));
        assert_eq!(r, Ok(Status::InProg), "post {i}");
        assert!(t < Duration::from_secs(10), "post {i} took {t:?}");
    }
    poster.join().unwrap();
    let last = *ids.last().unwrap();
    let started = Instant::now();
    assert_eq!(a.check_xfer(last), Ok(Status::InProg));
    a.release_req(ids[ids.len() / 2]).unwrap();
    a.release_req(last).unwrap();
    assert!(started.elapsed() < Duration::from_secs(10));
    stop.send(()).unwrap();
    drop(a);
    fake.join().unwrap();
}

// ---- defect 3 ---------------------------------------------------------------

#[test]
fn d3_cancelling_a_slow_frame_fails_no_other_request_to_the_peer() {
    // The fake peer reads Writes slowly (8 KiB per 10 ms: a 1 MiB frame
    // takes over a second) until told to go fast, and acknowledges each.
    let fast = Arc::new(AtomicBool::new(false));
    let read = Arc::new(AtomicUsize::new(0));
    let (addr, fake) = {
        let (fast, read) = (fast.clone(), read.clone());
        fake_peer(move |mut s| {
            let mut chunk = vec![0u8; 8 << 10];
            loop {
                let mut head = [0u8; HEADER_LEN];
                if s.read_exact(&mut head).is_err() {
                    return;
                }
                let h = Header::decode(&head).unwrap();
                let mut left = h.body_len as usize;
                while left > 0 {
                    let n = left.min(chunk.len());
                    if s.read_exact(&mut chunk[..n]).is_err() {
                        return;
                    }
                    left -= n;
                    read.fetch_add(n, Ordering::SeqCst);
                    if !fast.load(Ordering::SeqCst) {
                        std::thread::sleep(Duration::from_millis(10));
                    }
                }
                if s.write_all(&Header::new(Kind::WriteAck, 0, h.tag, 0).encode())
                    .is_err()
                {
                    return;
                }
            }
        })
    };
    let len = 17u64 << 20;
    let (a, buf, lmd, rmd) = fake_agent(addr, len, ONE_STREAM, |_| {});
    let big = to_fake_at(&a, Op::Write, &buf, lmd, rmd, 0, 16 << 20);
    let small = to_fake_at(&a, Op::Write, &buf, lmd, rmd, 16 << 20, 4096);
    assert_eq!(a.post_xfer(big, None), Ok(Status::InProg));
    // The socket buffers are full once the peer has read anything: the
    // writer is in the middle of a frame.
    wait_for("the peer to read", || {
        read.load(Ordering::SeqCst) >= 64 << 10
    });
    assert_eq!(a.post_xfer(small, Some(b"small")), Ok(Status::InProg));
    let started = Instant::now();
    a.release_req(big).unwrap();
    assert!(started.elapsed() < Duration::from_secs(5), "release waited");
    fast.store(true, Ordering::SeqCst);
    assert_eq!(
        wait(&a, small),
        Ok(Status::Success),
        "the other request survives the cancel"
    );
    drop(a);
    fake.join().unwrap();
}

#[test]
fn d3_a_link_the_peer_closed_while_idle_reconnects_on_the_next_post() {
    let p = pair_with(4096, true, TCP);
    let id = p.whole(Op::Write);
    let _ = p.a.post_xfer(id, None).unwrap();
    assert_eq!(wait(&p.a, id), Ok(Status::Success));
    // Idle means every stream is up (on a loaded host the others may still
    // be dialing after the first transfer).
    let l = link(&p.a, "B");
    l.ensure_connected().unwrap();
    // B closes A's connections (it is alive): A's link goes down, cleanly.
    tcp_server(&p.b).close_from(&AgentName::from("A"));
    wait_for("A to see its connections closed", || !l.connected());
    let _ = p.a.post_xfer(id, Some(b"again")).unwrap();
    assert_eq!(wait(&p.a, id), Ok(Status::Success));
    assert_eq!(notifs_until(&p.b, 1).len(), 1);
}

#[test]
fn d3_a_link_that_failed_fails_fast_then_reconnects_to_a_live_peer() {
    // The fake peer resets the first connection in the middle of a frame,
    // then serves a second one properly.
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let fake = std::thread::spawn(move || {
        for round in 0..2 {
            let (mut s, _) = listener.accept().unwrap();
            read_frame(&mut s);
            s.write_all(&Header::new(Kind::HelloOk, 0, 0, 0).encode())
                .unwrap();
            if round == 0 {
                let mut head = [0u8; HEADER_LEN];
                s.read_exact(&mut head).unwrap();
                drop(s); // gone in the middle of the frame
                continue;
            }
            while let Ok(h) =
                std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| read_frame(&mut s)))
            {
                if s.write_all(&Header::new(Kind::WriteAck, 0, h.tag, 0).encode())
                    .is_err()
                {
                    return;
                }
            }
        }
    });
    let (a, buf, lmd, rmd) = fake_agent(addr, 1 << 20, ONE_STREAM, |_| {});
    let id = to_fake_at(&a, Op::Write, &buf, lmd, rmd, 0, 1 << 20);
    let _ = a.post_xfer(id, None);
    assert!(matches!(wait(&a, id), Err(Error::RemoteDisconnect(_))));
    // At once, a post fails fast (the peer just failed) ...
    assert!(matches!(
        a.post_xfer(id, None),
        Err(Error::RemoteDisconnect(_))
    ));
    // ... and after the backoff one reconnects, with no new metadata.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        assert!(Instant::now() < deadline, "the link never came back");
        if a.post_xfer(id, None).is_ok() {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(wait(&a, id), Ok(Status::Success));
    drop(a);
    fake.join().unwrap();
}

// ---- defect 4 ---------------------------------------------------------------

#[test]
fn d4_disconnect_also_closes_the_connections_the_peer_opened_to_us() {
    let p = pair_with(4096, false, TCP);
    p.a.connect(b"B").unwrap();
    let server = tcp_server(&p.b);
    wait_for("B to serve A's streams", || server.served() > 0);
    p.b.load_remote_conn_info(b"A", p.a.conn_info()).unwrap();
    p.b.disconnect(b"A").unwrap();
    wait_for("B to close A's connections", || server.served() == 0);
}

/// A network namespace with a veth pair to ours: `10.231.<n>.1` here,
/// `.2` there. Removed on drop.
struct Netns {
    name: String,
    here: String,
}

impl Netns {
    fn create() -> std::result::Result<Netns, String> {
        let n = std::process::id() % 200 + 20;
        let name = format!("mctest{}", std::process::id());
        let (here, there) = (format!("mch{n}"), format!("mct{n}"));
        let ns = Netns {
            name: name.clone(),
            here: here.clone(),
        };
        let run = |args: &[&str]| -> std::result::Result<(), String> {
            let out = std::process::Command::new("ip")
                .args(args)
                .output()
                .map_err(|e| format!("ip: {e}"))?;
            out.status.success().then_some(()).ok_or_else(|| {
                format!(
                    "ip {}: {}",
                    args.join(" "),
                    String::from_utf8_lossy(&out.stderr).trim()
                )
            })
        };
        let here_ip = format!("10.231.{n}.1/30");
        let there_ip = format!("10.231.{n}.2/30");
        run(&["netns", "add", &name])?;
        run(&["link", "add", &here, "type", "veth", "peer", "name", &there])?;
        run(&["link", "set", &there, "netns", &name])?;
        run(&["addr", "add", &here_ip, "dev", &here])?;
        run(&["link", "set", &here, "up"])?;
        run(&[
            "netns", "exec", &name, "ip", "addr", "add", &there_ip, "dev", &there,
        ])?;
        run(&["netns", "exec", &name, "ip", "link", "set", &there, "up"])?;
        Ok(ns)
    }

    fn addr(&self, host: u8) -> std::net::IpAddr {
        let n = std::process::id() % 200 + 20;
        std::net::IpAddr::V4(std::net::Ipv4Addr::new(10, 231, n as u8, host))
    }

    /// Runs `f` on a thread inside the namespace (sockets it makes live there).
    fn inside<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> T {
        let path = format!("/var/run/netns/{}", self.name);
        std::thread::spawn(move || {
            let ns = std::fs::File::open(&path).unwrap();
            use std::os::fd::AsRawFd;
            // SAFETY: setns with an fd of a network namespace moves only
            // this thread into it.
            assert_eq!(
                unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) },
                0
            );
            f()
        })
        .join()
        .unwrap()
    }

    /// Drops every packet between the namespaces, silently (no FIN, no RST).
    fn partition(&self) {
        let _ = std::process::Command::new("ip")
            .args(["netns", "exec", &self.name, "ip", "link", "set", "dev"])
            .arg(self.here.replace("mch", "mct"))
            .arg("down")
            .status();
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = std::process::Command::new("ip")
            .args(["link", "del", &self.here])
            .status();
        let _ = std::process::Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

#[test]
fn d4_an_initiator_that_vanishes_without_fin_or_rst_is_reaped() {
    let ns = match Netns::create() {
        Ok(ns) => ns,
        Err(why) => {
            eprintln!("SKIPPED: cannot make a network namespace here ({why})");
            return;
        }
    };
    let ip = ns.addr(1).to_string();
    let b = engine_with(
        "B",
        false,
        &[
            ("protocol", "tcp"),
            ("ip_addr", &ip),
            ("timeout_ms", "2000"),
        ],
    );
    let (addr, token) = (tcp_server(&b).local_addr(), b.endpoint.token);
    // A client in the other namespace says hello, then its host "crashes".
    let client = ns.inside(move || {
        let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(10)).unwrap();
        let body = Hello {
            target_token: token,
            sender_token: 1,
            name: b"V".to_vec(),
        }
        .encode();
        s.write_all(&Header::new(Kind::Hello, body.len() as u32, 0, 0).encode())
            .unwrap();
        s.write_all(&body).unwrap();
        assert_eq!(read_frame(&mut s).kind, Kind::HelloOk);
        s
    });
    let server = tcp_server(&b);
    wait_for("B to serve the client", || server.served() == 1);
    ns.partition();
    // Keepalive (about 5 s with timeout_ms=2000) ends the connection.
    wait_for("B to reap the vanished client", || server.served() == 0);
    drop(client);
}

// ---- defect 5 ---------------------------------------------------------------

/// A raw initiator that starts a Write of `len` bytes into `region` of
/// engine `b` and sends the first `first` bytes of data (0xAA).
fn start_write(b: &Engine, key: u64, addr: u64, len: u32, first: usize) -> TcpStream {
    let mut s = hello(b, "T");
    let mut table = Vec::new();
    frame::encode_segs(&[Seg { key, addr, len }], &mut table);
    s.write_all(&Header::new(Kind::Write, table.len() as u32 + len, 9, 1).encode())
        .unwrap();
    s.write_all(&table).unwrap();
    s.write_all(&vec![0xAA; first]).unwrap();
    s
}

#[test]
fn d5_a_trickling_initiator_cannot_hold_deregister_mem() {
    for timeout in ["30000", "0"] {
        let b = engine_with(
            "B",
            false,
            &[
                ("protocol", "tcp"),
                ("ip_addr", "127.0.0.1"),
                ("timeout_ms", timeout),
            ],
        );
        let len = 1usize << 20;
        let region = vec![0u8; len];
        let md = b
            .register_mem(region.as_ptr() as u64, len as u64, 0, 0)
            .unwrap();
        let key = key_of(&b, md);
        let mut s = start_write(&b, key, region.as_ptr() as u64, len as u32, 1000);
        wait_for("the first bytes to land", || region[999] == 0xAA);
        // One byte every 50 ms from now on, on another thread.
        let stop = Arc::new(AtomicBool::new(false));
        let trickler = {
            let (mut s, stop) = (s.try_clone().unwrap(), stop.clone());
            std::thread::spawn(move || {
                let mut sent = 0;
                while !stop.load(Ordering::SeqCst) {
                    s.write_all(&[0xAA]).unwrap();
                    sent += 1;
                    std::thread::sleep(Duration::from_millis(50));
                }
                sent
            })
        };
        let b = Arc::new(b);
        let (done, deregistered) = mpsc::channel();
        {
            let b = b.clone();
            std::thread::spawn(move || done.send(b.deregister_mem(md)).unwrap());
        }
        let result = deregistered.recv_timeout(Duration::from_secs(10));
        assert!(
            matches!(result, Ok(Ok(()))),
            "timeout_ms={timeout}: deregisterMem waited for the trickling peer"
        );
        let snapshot = region.clone();
        std::thread::sleep(Duration::from_millis(200)); // more bytes trickle in
        stop.store(true, Ordering::SeqCst);
        let sent = 1000 + trickler.join().unwrap();
        // The rest of the frame arrives; it is refused, and nothing landed.
        s.write_all(&vec![0xBB; len - sent]).unwrap();
        let ack = read_frame(&mut s);
        assert_eq!(ack.kind, Kind::WriteAck);
        assert_eq!(ack.status(), i64::from(Status::NotAllowed.code()));
        assert!(region == snapshot, "written after deregisterMem returned");
        drop(s);
        drop(b);
    }
}

#[test]
fn d5_a_target_that_stalls_in_read_data_cannot_hold_deregister_mem() {
    let (go, told) = mpsc::channel::<()>();
    let (addr, fake) = fake_peer(move |mut s| {
        let h = read_frame(&mut s);
        let len = 1usize << 20;
        s.write_all(&Header::new(Kind::ReadResp, len as u32, h.tag, 0).encode())
            .unwrap();
        s.write_all(&[0x11; 100]).unwrap();
        let _ = told.recv();
        let _ = s.write_all(&vec![0x22; len - 100]);
        drain_until_closed(s);
    });
    let params = &[
        ("protocol", "tcp"),
        ("ip_addr", "127.0.0.1"),
        ("streams", "1"),
        ("timeout_ms", "0"),
    ];
    let (a, buf, lmd, rmd) = fake_agent(addr, 1 << 20, params, |_| {});
    let id = to_fake_at(&a, Op::Read, &buf, lmd, rmd, 0, 1 << 20);
    assert_eq!(a.post_xfer(id, None), Ok(Status::InProg));
    wait_for("the first bytes to land", || buf[99] == 0x11);
    let a = Arc::new(a);
    let (done, deregistered) = mpsc::channel();
    {
        let a = a.clone();
        std::thread::spawn(move || done.send(a.deregister_mem(lmd)).unwrap());
    }
    assert!(
        matches!(
            deregistered.recv_timeout(Duration::from_secs(10)),
            Ok(Ok(()))
        ),
        "deregisterMem waited for the stalled peer"
    );
    let snapshot = buf.clone();
    go.send(()).unwrap();
    assert!(matches!(wait(&a, id), Err(Error::InvalidParam(_))));
    assert!(
        buf == snapshot,
        "read data landed after deregisterMem returned"
    );
    drop(a);
    fake.join().unwrap();
}

#[test]
fn d5_a_frame_that_trickles_past_its_deadline_closes_the_connection() {
    let b = engine_with(
        "B",
        false,
        &[
            ("protocol", "tcp"),
            ("ip_addr", "127.0.0.1"),
            ("timeout_ms", "500"),
        ],
    );
    let region = vec![0u8; 1 << 20];
    let md = b
        .register_mem(region.as_ptr() as u64, region.len() as u64, 0, 0)
        .unwrap();
    let key = key_of(&b, md);
    let mut s = start_write(&b, key, region.as_ptr() as u64, 1 << 20, 10);
    // A byte every 200 ms: never a stall of 500 ms, but the frame would take
    // days. The server gives up after its deadline (4 x timeout_ms).
    let started = Instant::now();
    let mut w = s.try_clone().unwrap();
    let trickler = std::thread::spawn(move || {
        while w.write_all(&[0xAA]).is_ok() && started.elapsed() < Duration::from_secs(30) {
            std::thread::sleep(Duration::from_millis(200));
        }
    });
    assert!(closed_within(&mut s, Duration::from_secs(60)));
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "closed only after {:?}",
        started.elapsed()
    );
    drop(s);
    trickler.join().unwrap();
}

// ---- defect 6 ---------------------------------------------------------------

#[test]
fn d6_shutdown_closes_a_connection_accepted_just_before_it() {
    let b = engine_with("B", false, TCP);
    let gate = Arc::new(Gate::default());
    let _hook = {
        let gate = gate.clone();
        fault::set("tcp.server.accepted", b.endpoint.token, move || gate.wait())
    };
    let server = tcp_server(&b);
    let mut client = TcpStream::connect(server.local_addr()).unwrap();
    gate.wait_entered(1); // accepted; not yet registered for shutdown
    std::thread::scope(|scope| {
        let shutting = scope.spawn(|| server.shutdown());
        wait_for("shutdown to start", || server.is_stopping());
        gate.open();
        shutting.join().unwrap();
    });
    // After shutdown returned, nobody serves the connection.
    let body = Hello {
        target_token: b.endpoint.token,
        sender_token: 1,
        name: b"late".to_vec(),
    }
    .encode();
    let _ = client.write_all(&Header::new(Kind::Hello, body.len() as u32, 0, 0).encode());
    let _ = client.write_all(&body);
    // (Its thread would otherwise serve it until its first idle timeout.)
    assert!(
        closed_within(&mut client, Duration::from_secs(10)),
        "a connection outlived shutdown"
    );
    assert_eq!(server.served(), 0);
}

// ---- defect 7 ---------------------------------------------------------------

#[test]
fn d7_a_post_fails_only_once_every_frame_stopped_and_cannot_be_reposted_before() {
    // Two streams; the fake refuses the first frame it reads at once and
    // answers the other only when told.
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let first = Arc::new(AtomicBool::new(true));
    let refused = Arc::new(AtomicBool::new(false));
    let (go, told) = mpsc::channel::<()>();
    let told = Arc::new(Mutex::new(told));
    let fake = std::thread::spawn({
        let (first, refused) = (first.clone(), refused.clone());
        move || {
            let mut conns = Vec::new();
            for _ in 0..2 {
                let (mut s, _) = listener.accept().unwrap();
                read_frame(&mut s);
                s.write_all(&Header::new(Kind::HelloOk, 0, 0, 0).encode())
                    .unwrap();
                let (first, refused, told) = (first.clone(), refused.clone(), told.clone());
                conns.push(std::thread::spawn(move || {
                    let h = read_frame(&mut s);
                    if first.swap(false, Ordering::SeqCst) {
                        let why = b"refused for the test";
                        let status = crate::common::Status::NotAllowed.code() as i64 as u64;
                        s.write_all(
                            &Header::new(Kind::WriteAck, why.len() as u32, h.tag, status).encode(),
                        )
                        .unwrap();
                        s.write_all(why).unwrap();
                        refused.store(true, Ordering::SeqCst);
                    } else {
                        let _ = told.lock().recv();
                        s.write_all(&Header::new(Kind::WriteAck, 0, h.tag, 0).encode())
                            .unwrap();
                    }
                    drain_until_closed(s);
                }));
            }
            for c in conns {
                c.join().unwrap();
            }
        }
    });
    let params = &[
        ("protocol", "tcp"),
        ("ip_addr", "127.0.0.1"),
        ("streams", "2"),
    ];
    let (a, buf, lmd, rmd) = fake_agent(addr, 2 << 20, params, |_| {});
    let id = to_fake_at(&a, Op::Write, &buf, lmd, rmd, 0, 2 << 20); // two frames
    assert_eq!(a.post_xfer(id, None), Ok(Status::InProg));
    wait_for("one frame to be refused", || refused.load(Ordering::SeqCst));
    // The other frame still moves: the post is not over, and no repost may
    // overlap it.
    for _ in 0..20 {
        assert_eq!(a.check_xfer(id), Ok(Status::InProg));
        std::thread::sleep(Duration::from_millis(5));
    }
    assert!(matches!(a.post_xfer(id, None), Err(Error::RepostActive(_))));
    go.send(()).unwrap();
    assert!(matches!(wait(&a, id), Err(Error::NotAllowed(m)) if m.contains("for the test")));
    drop(a);
    fake.join().unwrap();
}

// ---- defect 8 ---------------------------------------------------------------

#[test]
fn d8_a_burst_of_silent_connections_gets_at_most_the_handshake_cap() {
    let b = engine_with("B", false, TCP);
    let gate = Arc::new(Gate::default());
    // Threads that start slowly: none has begun its handshake yet.
    let _hook = {
        let gate = gate.clone();
        fault::set("tcp.server.serving", b.endpoint.token, move || gate.wait())
    };
    let server = tcp_server(&b);
    let burst = 100;
    let clients: Vec<TcpStream> = (0..burst)
        .map(|_| TcpStream::connect(server.local_addr()).unwrap())
        .collect();
    let cap = crate::transport::tcp::MAX_HANDSHAKING;
    wait_for("the burst to be accepted", || server.served() >= cap);
    // Every connection beyond the cap is closed at once.
    let refused = clients
        .iter()
        .filter(|c| {
            c.set_read_timeout(Some(Duration::from_millis(200)))
                .unwrap();
            let mut byte = [0u8; 1];
            let mut r: &TcpStream = c;
            matches!(r.read(&mut byte), Ok(0))
        })
        .count();
    assert_eq!(server.served(), cap, "more connections than the cap");
    assert_eq!(refused, burst - cap);
    assert!(server.handshaking_peak() <= cap);
    gate.open();
    drop(clients);
}

// ---- defect 9 ---------------------------------------------------------------

#[test]
fn d9_a_notification_larger_than_any_transport_carries_is_refused_at_the_call() {
    let p = pair_with(4096, false, TCP);
    let huge = vec![7u8; 64 << 20];
    assert!(matches!(
        p.a.gen_notif(b"B", &huge),
        Err(Error::InvalidParam(_))
    ));
    let id = p.whole(Op::Write);
    assert!(matches!(
        p.a.post_xfer(id, Some(&huge)),
        Err(Error::InvalidParam(_))
    ));
    // The link is fine.
    p.a.gen_notif(b"B", b"small").unwrap();
    assert_eq!(notifs_until(&p.b, 1).len(), 1);
}

#[test]
fn d9_notifications_beyond_the_inbox_limits_are_refused_and_the_sender_told() {
    for params in [TCP, &[][..]] {
        let p = pair_with(4096, false, params);
        let msg = vec![3u8; frame::MAX_NOTIF as usize];
        let limit = crate::common::inbox::SENDER_LIMIT / msg.len();
        let mut refused_at_call = 0;
        for _ in 0..limit + 2 {
            if p.a.gen_notif(b"B", &msg).is_err() {
                refused_at_call += 1; // in-process: the error comes back at once
            }
        }
        if params.is_empty() {
            assert_eq!(refused_at_call, 2);
        } else {
            let l = link(&p.a, "B");
            wait_for("the refusals to come back", || l.refused_notifs() == 2);
        }
        assert!(p.b.endpoint.inbox.bytes() <= crate::common::inbox::SENDER_LIMIT);
        assert_eq!(p.b.get_notifs().len(), limit);
        // Drained: there is room again.
        p.a.gen_notif(b"B", &msg).unwrap();
        assert_eq!(notifs_until(&p.b, 1).len(), 1);
    }
}

// ---- defect 10 --------------------------------------------------------------

#[test]
fn d10_release_racing_a_post_returns_only_when_nothing_of_it_moves() {
    for params in [&[][..], TCP] {
        let p = pair_with(64 << 20, true, params);
        let id = p.whole(Op::Write);
        let gate = Arc::new(Gate::default());
        let _hook = {
            let gate = gate.clone();
            fault::set("engine.posting", p.a.endpoint.token, move || gate.wait())
        };
        let released = AtomicBool::new(false);
        std::thread::scope(|scope| {
            let poster = scope.spawn(|| p.a.post_xfer(id, Some(b"late")));
            gate.wait_entered(1);
            let releaser = scope.spawn(|| {
                p.a.release_req(id).unwrap();
                released.store(true, Ordering::SeqCst);
            });
            std::thread::sleep(Duration::from_millis(50));
            assert!(
                !released.load(Ordering::SeqCst),
                "release returned while the post was starting"
            );
            gate.open();
            let _ = poster.join().unwrap();
            releaser.join().unwrap();
        });
        // The post started, then was cancelled before release returned.
        let snapshot = p.bbuf.clone();
        let other = p.whole(Op::Write);
        p.a.release_req(other).unwrap();
        if params.is_empty() {
            p.a.worker.drive(usize::MAX);
        }
        std::thread::sleep(Duration::from_millis(100));
        assert!(p.bbuf == snapshot, "bytes moved after releaseReqH returned");
        assert!(
            !p.b.get_notifs().iter().any(|(_, m)| m == b"late") || p.bbuf == p.abuf,
            "a notification for data that did not land"
        );
    }
}

#[test]
fn d10_concurrent_loads_of_the_same_info_build_one_route() {
    let a = engine_with("A", false, TCP);
    let b = engine_with("B", false, TCP);
    let gate = Arc::new(Gate::default());
    let _hook = {
        let gate = gate.clone();
        fault::set("engine.loading", a.endpoint.token, move || gate.wait())
    };
    std::thread::scope(|scope| {
        let first = scope.spawn(|| a.load_remote_conn_info(b"B", b.conn_info()));
        gate.wait_entered(1);
        let second = scope.spawn(|| a.load_remote_conn_info(b"B", b.conn_info()));
        std::thread::sleep(Duration::from_millis(50));
        gate.open();
        first.join().unwrap().unwrap();
        second.join().unwrap().unwrap();
    });
    assert_eq!(a.transports.routes_built(), 1);
}

#[test]
fn d10_a_region_that_wraps_around_the_address_space_is_refused() {
    let p = pair_with(4096, false, TCP);
    let info = ConnInfo::decode(p.b.conn_info()).unwrap();
    let wrapping = RegionPublic {
        owner: info.token,
        key: 1,
        addr: u64::MAX - 4095,
        len: 1 << 20,
        mem_type: 0,
        dev_id: 0,
        ipc: None,
        rdma: None,
        vmm: None,
    };
    assert!(matches!(
        p.a.load_remote_md(u64::MAX - 4095, 8, 0, &wrapping.encode(), b"B"),
        Err(Error::InvalidParam(m)) if m.contains("wraps")
    ));
}
