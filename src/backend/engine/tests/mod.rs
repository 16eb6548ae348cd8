//! Engine tests: two engines in one process, driven the way NIXL drives them.

use super::*;
use std::time::Instant;

mod cma;
mod tcp;

fn engine(name: &str, progress_thread: bool) -> Engine {
    engine_with(name, progress_thread, &[])
}

fn engine_with(name: &str, progress_thread: bool, params: &[(&str, &str)]) -> Engine {
    Engine::new(EngineConfig {
        progress_thread,
        ..EngineConfig::new(name, params)
    })
    .unwrap()
}

/// Two engines where `a` knows `b`, with one registered buffer each.
struct Pair {
    a: Engine,
    b: Engine,
    abuf: Vec<u8>,
    bbuf: Vec<u8>,
    amd: MdId,
    bmd_remote: MdId,
}

fn pair(len: usize, progress_thread: bool) -> Pair {
    pair_with(len, progress_thread, &[])
}

fn pair_with(len: usize, progress_thread: bool, params: &[(&str, &str)]) -> Pair {
    let a = engine_with("A", progress_thread, params);
    let b = engine_with("B", progress_thread, params);
    a.load_remote_conn_info(b"B", b.conn_info()).unwrap();
    let abuf: Vec<u8> = (0..len).map(|i| (i * 7 + 3) as u8).collect();
    let bbuf = vec![0u8; len];
    let amd = a
        .register_mem(abuf.as_ptr() as u64, len as u64, 0, 0)
        .unwrap();
    let bmd = b
        .register_mem(bbuf.as_ptr() as u64, len as u64, 0, 0)
        .unwrap();
    let blob = b.public_data(bmd).unwrap();
    let bmd_remote = a
        .load_remote_md(bbuf.as_ptr() as u64, len as u64, 0, &blob, b"B")
        .unwrap();
    Pair {
        a,
        b,
        abuf,
        bbuf,
        amd,
        bmd_remote,
    }
}

impl Pair {
    fn whole(&self, op: Op) -> ReqId {
        let len = self.abuf.len() as u64;
        let l = Desc {
            addr: self.abuf.as_ptr() as u64,
            len,
            md: self.amd,
        };
        let r = Desc {
            addr: self.bbuf.as_ptr() as u64,
            len,
            md: self.bmd_remote,
        };
        self.a.prep_xfer(op, &[l], &[r], b"B").unwrap()
    }
}

/// Registers `src` on `a` and `dst` on `b` (agent `b_name`), and loads the
/// metadata of `dst` on `a`: returns `a`'s ids for `src` and for remote `dst`.
fn expose(a: &Engine, b: &Engine, b_name: &[u8], src: &[u8], dst: &[u8]) -> (MdId, MdId) {
    let smd = a
        .register_mem(src.as_ptr() as u64, src.len() as u64, 0, 0)
        .unwrap();
    let dmd = b
        .register_mem(dst.as_ptr() as u64, dst.len() as u64, 0, 0)
        .unwrap();
    let blob = b.public_data(dmd).unwrap();
    let rmd = a
        .load_remote_md(dst.as_ptr() as u64, dst.len() as u64, 0, &blob, b_name)
        .unwrap();
    (smd, rmd)
}

/// A descriptor covering all of `buf`, with metadata `md`.
fn whole(buf: &[u8], md: MdId) -> Desc {
    Desc {
        addr: buf.as_ptr() as u64,
        len: buf.len() as u64,
        md,
    }
}

fn wait(engine: &Engine, id: ReqId) -> Result<Status> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        match engine.check_xfer(id) {
            Ok(Status::InProg) => assert!(Instant::now() < deadline, "transfer never completed"),
            other => return other,
        }
        std::thread::yield_now();
    }
}

/// [`wait`] in a tight loop, as a caller spinning on the request checks it.
fn spin(engine: &Engine, id: ReqId) -> Result<Status> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        match engine.check_xfer(id) {
            Ok(Status::InProg) => assert!(Instant::now() < deadline, "transfer never completed"),
            other => return other,
        }
    }
}

fn notifs_until(engine: &Engine, count: usize) -> Vec<(AgentName, Vec<u8>)> {
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut got = Vec::new();
    while got.len() < count {
        got.extend(engine.get_notifs());
        assert!(
            Instant::now() < deadline,
            "only {} of {count} notifications",
            got.len()
        );
        std::thread::yield_now();
    }
    got
}

#[test]
fn write_and_read_with_notifications_both_progress_modes() {
    write_and_read_with_notifications_both_progress_modes_with(&[]);
}

pub(super) fn write_and_read_with_notifications_both_progress_modes_with(params: &[(&str, &str)]) {
    for thread in [false, true] {
        let p = pair_with(8 << 20, thread, params);
        let w = p.whole(Op::Write);
        let _ = p.a.post_xfer(w, Some(b"w\0\xff")).unwrap();
        assert_eq!(wait(&p.a, w), Ok(Status::Success));
        assert_eq!(p.abuf, p.bbuf);
        assert_eq!(
            notifs_until(&p.b, 1),
            vec![(AgentName::from("A"), b"w\0\xff".to_vec())]
        );

        // READ back into a zeroed buffer of A.
        let src: Vec<u8> = p.bbuf.iter().map(|x| x ^ 0x5a).collect();
        let src_md =
            p.b.register_mem(src.as_ptr() as u64, src.len() as u64, 0, 0)
                .unwrap();
        let blob = p.b.public_data(src_md).unwrap();
        let remote =
            p.a.load_remote_md(src.as_ptr() as u64, src.len() as u64, 0, &blob, b"B")
                .unwrap();
        let dst = vec![0u8; src.len()];
        let dst_md =
            p.a.register_mem(dst.as_ptr() as u64, dst.len() as u64, 0, 0)
                .unwrap();
        let r =
            p.a.prep_xfer(
                Op::Read,
                &[whole(&dst, dst_md)],
                &[whole(&src, remote)],
                b"B",
            )
            .unwrap();
        let _ = p.a.post_xfer(r, Some(b"")).unwrap();
        assert_eq!(wait(&p.a, r), Ok(Status::Success));
        assert_eq!(dst, src);
        assert_eq!(notifs_until(&p.b, 1), vec![(AgentName::from("A"), vec![])]);
        assert!(
            p.a.get_notifs().is_empty(),
            "the initiator receives nothing"
        );
        p.a.release_req(w).unwrap();
        p.a.release_req(r).unwrap();
        assert_eq!(p.a.live_requests(), 0);
    }
}

#[test]
fn a_spinning_caller_moves_copy_steps_itself_while_the_progress_thread_is_busy() {
    // The progress thread alternates steps of a large copy and of a smaller
    // one; a caller spinning on the smaller finds its cursor free and moves
    // steps itself (each attempt is a new chance; one is nearly always
    // enough).
    let p = pair(64 << 20, true);
    let big = p.whole(Op::Write);
    let src: Vec<u8> = (0..8usize << 20).map(|i| (i * 13 + 1) as u8).collect();
    let dst = vec![0u8; src.len()];
    let (src_md, dst_md) = expose(&p.a, &p.b, b"B", &src, &dst);
    let small =
        p.a.prep_xfer(
            Op::Write,
            &[whole(&src, src_md)],
            &[whole(&dst, dst_md)],
            b"B",
        )
        .unwrap();
    for _ in 0..20 {
        let _ = p.a.post_xfer(big, None).unwrap();
        let _ = p.a.post_xfer(small, Some(b"s")).unwrap();
        assert_eq!(spin(&p.a, small), Ok(Status::Success));
        assert_eq!(wait(&p.a, big), Ok(Status::Success));
        assert_eq!(
            notifs_until(&p.b, 1),
            vec![(AgentName::from("A"), b"s".to_vec())]
        );
        if p.a.spin_helps() > 0 {
            break;
        }
    }
    assert!(p.a.spin_helps() > 0, "the caller never moved a step");
    assert_eq!(dst, src);
    assert_eq!(p.abuf, p.bbuf);
}

#[test]
fn small_transfers_complete_inline() {
    let p = pair(4096, true);
    let id = p.whole(Op::Write);
    assert_eq!(p.a.post_xfer(id, Some(b"n")), Ok(Status::Success));
    assert_eq!(p.abuf, p.bbuf);
    assert_eq!(
        p.b.get_notifs().len(),
        1,
        "delivered before postXfer returned"
    );
}

#[test]
fn reposting_gives_one_notification_per_post() {
    reposting_gives_one_notification_per_post_with(&[]);
}

pub(super) fn reposting_gives_one_notification_per_post_with(params: &[(&str, &str)]) {
    let p = pair_with(1 << 20, true, params);
    let id = p.whole(Op::Write);
    for _ in 0..30 {
        let _ = p.a.post_xfer(id, Some(b"again")).unwrap();
        assert_eq!(wait(&p.a, id), Ok(Status::Success));
    }
    let got = notifs_until(&p.b, 30);
    assert_eq!(got.len(), 30);
    assert!(p.b.get_notifs().is_empty(), "no extra notification");
}

#[test]
fn many_noncontiguous_descriptors() {
    many_noncontiguous_descriptors_with(&[]);
}

pub(super) fn many_noncontiguous_descriptors_with(params: &[(&str, &str)]) {
    let block = 4096usize;
    let n = 10_000usize;
    // Every other block of A goes to every other block of B, in reverse order.
    let p = pair_with(2 * n * block, false, params);
    let (l, r): (Vec<Desc>, Vec<Desc>) = (0..n)
        .map(|i| {
            let l = Desc {
                addr: p.abuf.as_ptr() as u64 + (2 * i * block) as u64,
                len: block as u64,
                md: p.amd,
            };
            let r = Desc {
                addr: p.bbuf.as_ptr() as u64 + (2 * (n - 1 - i) * block) as u64,
                len: block as u64,
                md: p.bmd_remote,
            };
            (l, r)
        })
        .unzip();
    let id = p.a.prep_xfer(Op::Write, &l, &r, b"B").unwrap();
    let _ = p.a.post_xfer(id, Some(b"blocks")).unwrap();
    assert_eq!(wait(&p.a, id), Ok(Status::Success));
    for i in 0..n {
        let src = &p.abuf[2 * i * block..][..block];
        let dst = &p.bbuf[2 * (n - 1 - i) * block..][..block];
        assert_eq!(src, dst, "block {i}");
        assert!(
            p.bbuf[(2 * i + 1) * block..][..block]
                .iter()
                .all(|&x| x == 0),
            "gap {i} untouched"
        );
    }
    assert_eq!(notifs_until(&p.b, 1).len(), 1);
}

#[test]
fn loopback_through_load_local_md() {
    let a = engine("Self", true);
    let src: Vec<u8> = (0..1 << 20).map(|i| i as u8).collect();
    let dst = vec![0u8; 1 << 20];
    let smd = a
        .register_mem(src.as_ptr() as u64, src.len() as u64, 0, 0)
        .unwrap();
    let dmd = a
        .register_mem(dst.as_ptr() as u64, dst.len() as u64, 0, 0)
        .unwrap();
    let dloop = a.load_local_md(dmd).unwrap();
    assert_ne!(dloop, dmd, "a distinct object");
    a.connect(b"Self").unwrap();
    let id = a
        .prep_xfer(
            Op::Write,
            &[whole(&src, smd)],
            &[whole(&dst, dloop)],
            b"Self",
        )
        .unwrap();
    let _ = a.post_xfer(id, Some(b"me")).unwrap();
    assert_eq!(wait(&a, id), Ok(Status::Success));
    assert_eq!(src, dst);
    assert_eq!(
        notifs_until(&a, 1),
        vec![(AgentName::from("Self"), b"me".to_vec())]
    );
    // Teardown order of an explicit deregistration: loopback MD first.
    a.release_req(id).unwrap();
    a.unload_md(dloop).unwrap();
    a.deregister_mem(dmd).unwrap();
    a.deregister_mem(smd).unwrap();
}

#[test]
fn local_md_survives_deregistration_of_its_source() {
    // Agent teardown order: deregisterMem first, unloadMD of the loopback MD after.
    let a = engine("Self", false);
    let buf = [0u8; 64];
    let md = a.register_mem(buf.as_ptr() as u64, 64, 0, 0).unwrap();
    let lmd = a.load_local_md(md).unwrap();
    a.deregister_mem(md).unwrap();
    a.unload_md(lmd).unwrap();
}

#[test]
fn gen_notif_to_peer_and_self() {
    gen_notif_to_peer_and_self_with(&[]);
}

pub(super) fn gen_notif_to_peer_and_self_with(params: &[(&str, &str)]) {
    let p = pair_with(64, false, params);
    p.a.gen_notif(b"B", b"hi\0").unwrap();
    p.a.gen_notif(b"B", b"").unwrap();
    p.a.gen_notif(b"A", b"me").unwrap();
    assert_eq!(
        notifs_until(&p.b, 2),
        vec![
            (AgentName::from("A"), b"hi\0".to_vec()),
            (AgentName::from("A"), vec![])
        ]
    );
    assert_eq!(
        p.a.get_notifs(),
        vec![(AgentName::from("A"), b"me".to_vec())]
    );
    assert!(matches!(
        p.a.gen_notif(b"Nobody", b"x"),
        Err(Error::NotFound(_))
    ));
    // B never loaded A's info: it cannot send to A.
    assert!(matches!(p.b.gen_notif(b"A", b"x"), Err(Error::NotFound(_))));
}

#[test]
fn repost_while_active_is_refused_and_release_cancels() {
    let p = pair(64 << 20, false);
    let id = p.whole(Op::Write);
    // Without a progress thread a big post only advances a bounded amount.
    assert_eq!(p.a.post_xfer(id, Some(b"x")), Ok(Status::InProg));
    assert!(matches!(
        p.a.post_xfer(id, None),
        Err(Error::RepostActive(_))
    ));
    p.a.release_req(id).unwrap();
    let snapshot = p.bbuf.clone();
    assert_ne!(snapshot, p.abuf, "the transfer was really cut short");
    // Drive whatever is left in the queue: nothing may be written any more.
    let other = p.whole(Op::Write);
    p.a.release_req(other).unwrap();
    p.a.worker.drive(usize::MAX);
    assert_eq!(
        p.bbuf, snapshot,
        "no byte written after releaseReqH returned"
    );
    assert!(
        p.b.get_notifs().is_empty(),
        "a cancelled transfer sends no notification"
    );
    assert!(matches!(p.a.check_xfer(id), Err(Error::NotFound(_))));
}

#[test]
fn deregistration_mid_transfer_fails_it_without_further_writes() {
    let p = pair(64 << 20, false);
    let id = p.whole(Op::Write);
    assert_eq!(p.a.post_xfer(id, None), Ok(Status::InProg));
    let bmd_local = {
        // B's only registration.
        let mds = p.b.mds.read();
        *mds.keys().next().unwrap()
    };
    p.b.deregister_mem(bmd_local).unwrap();
    let snapshot = p.bbuf.clone();
    assert!(matches!(wait(&p.a, id), Err(Error::RemoteDisconnect(_))));
    assert_eq!(p.bbuf, snapshot);
    // A repost now fails up front: B no longer has the region.
    assert!(matches!(p.a.post_xfer(id, None), Err(Error::NotAllowed(_))));
}

#[test]
fn four_threads_post_at_once() {
    four_threads_post_at_once_with(&[]);
}

pub(super) fn four_threads_post_at_once_with(params: &[(&str, &str)]) {
    let a = Arc::new(engine_with("A", true, params));
    let b = Arc::new(engine_with("B", true, params));
    a.load_remote_conn_info(b"B", b.conn_info()).unwrap();
    let threads: Vec<_> = (0..4u8)
        .map(|t| {
            let (a, b) = (a.clone(), b.clone());
            std::thread::spawn(move || {
                let len = 3 << 20;
                let src: Vec<u8> = (0..len).map(|i| (i as u8).wrapping_mul(t + 1)).collect();
                let dst = vec![0u8; len];
                let (smd, rmd) = expose(&a, &b, b"B", &src, &dst);
                for _ in 0..10 {
                    let id = a
                        .prep_xfer(Op::Write, &[whole(&src, smd)], &[whole(&dst, rmd)], b"B")
                        .unwrap();
                    let _ = a.post_xfer(id, Some(&[t])).unwrap();
                    assert_eq!(wait(&a, id), Ok(Status::Success));
                    a.release_req(id).unwrap();
                }
                assert_eq!(src, dst);
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    let got = notifs_until(&b, 40);
    for t in 0..4u8 {
        assert_eq!(got.iter().filter(|(_, m)| m == &[t]).count(), 10);
    }
}

#[test]
fn bad_input_is_refused_with_the_right_error() {
    let p = pair(4096, false);
    let base = p.abuf.as_ptr() as u64;
    let rbase = p.bbuf.as_ptr() as u64;
    let l = |addr, len| Desc {
        addr,
        len,
        md: p.amd,
    };
    let r = |addr, len| Desc {
        addr,
        len,
        md: p.bmd_remote,
    };
    let err = |res: Result<ReqId>| res.unwrap_err();
    assert!(matches!(
        err(p.a.prep_xfer(Op::Write, &[l(base, 8)], &[], b"B")),
        Error::Mismatch(_)
    ));
    assert!(matches!(
        err(p
            .a
            .prep_xfer(Op::Write, &[l(base, 8)], &[r(rbase, 9)], b"B")),
        Error::Mismatch(_)
    ));
    assert!(matches!(
        err(p
            .a
            .prep_xfer(Op::Write, &[l(base, 4097)], &[r(rbase, 4097)], b"B")),
        Error::InvalidParam(_)
    ));
    assert!(matches!(
        err(p
            .a
            .prep_xfer(Op::Write, &[l(base, 8)], &[r(rbase + 4090, 8)], b"B")),
        Error::InvalidParam(_)
    ));
    assert!(matches!(
        err(p
            .a
            .prep_xfer(Op::Write, &[l(base, 8)], &[r(rbase, 8)], b"C")),
        Error::NotFound(_)
    ));
    let swapped = Desc {
        addr: base,
        len: 8,
        md: p.bmd_remote,
    };
    assert!(matches!(
        err(p.a.prep_xfer(Op::Write, &[swapped], &[swapped], b"B")),
        Error::InvalidParam(_)
    ));
    let unknown = Desc {
        addr: base,
        len: 8,
        md: 999_999,
    };
    assert!(matches!(
        err(p.a.prep_xfer(Op::Write, &[unknown], &[r(rbase, 8)], b"B")),
        Error::InvalidParam(_)
    ));
    // Requests and metadata that do not exist.
    assert!(matches!(
        p.a.post_xfer(12345, None),
        Err(Error::NotFound(_))
    ));
    assert!(matches!(p.a.check_xfer(0), Err(Error::NotFound(_))));
    assert!(matches!(p.a.release_req(7), Err(Error::NotFound(_))));
    assert!(matches!(p.a.unload_md(p.amd), Err(Error::InvalidParam(_))));
    assert!(matches!(
        p.a.deregister_mem(p.bmd_remote),
        Err(Error::InvalidParam(_))
    ));
    // Corrupt or foreign metadata.
    assert!(matches!(
        p.a.load_remote_conn_info(b"B", b"garbage"),
        Err(Error::InvalidParam(_))
    ));
    assert!(matches!(
        p.a.load_remote_conn_info(b"X", p.b.conn_info()),
        Err(Error::InvalidParam(_))
    ));
    assert!(matches!(
        p.a.load_remote_md(rbase, 8, 0, b"\x00\x01", b"B"),
        Err(Error::InvalidParam(_))
    ));
    let own_blob = p.a.public_data(p.amd).unwrap();
    assert!(
        matches!(
            p.a.load_remote_md(base, 8, 0, &own_blob, b"B"),
            Err(Error::InvalidParam(_))
        ),
        "A's region presented as B's"
    );
    let bmd = *p.b.mds.read().keys().next().unwrap();
    let blob = p.b.public_data(bmd).unwrap();
    assert!(matches!(
        p.a.load_remote_md(rbase, 4097, 0, &blob, b"B"),
        Err(Error::InvalidParam(_))
    ));
    // Invalid option values fail creation.
    let bad = Engine::new(EngineConfig {
        params: vec![("protocol".into(), "carrier-pigeon".into())],
        ..EngineConfig::default()
    });
    assert!(matches!(bad, Err(Error::InvalidParam(m)) if m.contains("protocol")));
}

#[test]
fn a_destroyed_peer_is_a_remote_disconnect() {
    let p = pair(4096, false);
    let id = p.whole(Op::Write);
    let Pair {
        a, b, abuf, bbuf, ..
    } = p;
    drop(b);
    assert!(matches!(
        a.post_xfer(id, None),
        Err(Error::RemoteDisconnect(_))
    ));
    assert!(matches!(
        a.gen_notif(b"B", b"x"),
        Err(Error::RemoteDisconnect(_))
    ));
    drop((abuf, bbuf));
}

#[test]
fn restarted_peer_replaces_old_info_and_same_info_is_a_no_op() {
    let a = engine("A", false);
    let b1 = engine("B", false);
    a.load_remote_conn_info(b"B", b1.conn_info()).unwrap();
    a.load_remote_conn_info(b"B", b1.conn_info()).unwrap();
    let buf = [0u8; 64];
    let md = b1.register_mem(buf.as_ptr() as u64, 64, 0, 0).unwrap();
    let old_blob = b1.public_data(md).unwrap();
    drop(b1);
    let b2 = engine("B", false);
    a.load_remote_conn_info(b"B", b2.conn_info()).unwrap();
    assert!(
        a.load_remote_md(buf.as_ptr() as u64, 64, 0, &old_blob, b"B")
            .is_err(),
        "metadata of the old engine is refused"
    );
    a.gen_notif(b"B", b"new").unwrap();
    assert_eq!(b2.get_notifs().len(), 1);
    a.disconnect(b"B").unwrap();
    assert!(matches!(a.connect(b"B"), Err(Error::NotFound(_))));
}
