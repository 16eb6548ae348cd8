//! Engine tests: two engines in one process, driven the way NIXL drives them.

use super::*;
use std::time::Instant;

mod cma;
mod conformance;
mod gpudirect;
mod hardening;
mod rdma;
mod tcp;
mod vram;

/// The preferred route of `e` to `agent`.
fn route_of(e: &Engine, agent: &str) -> Arc<dyn Route> {
    e.route(agent.as_bytes()).expect("a route to the agent")
}

fn engine(name: &str, progress_thread: bool) -> Engine {
    engine_with(name, progress_thread, &[])
}

fn engine_with(name: &str, progress_thread: bool, params: &[(&str, &str)]) -> Engine {
    if params.contains(&("protocol", "rdma")) {
        // The fake NIC, made this process's verbs library first.
        crate::transport::rdma::testing::fake();
    }
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
fn descriptors_that_continue_each_other_join_into_one_segment() {
    let p = pair(64 << 10, true);
    let (a0, b0) = (p.abuf.as_ptr() as u64, p.bbuf.as_ptr() as u64);
    let d = |addr: u64, len: u64, md: MdId| Desc { addr, len, md };
    let segments = |local: &[Desc], remote: &[Desc]| {
        let id = p.a.prep_xfer(Op::Write, local, remote, b"B").unwrap();
        let plan = p.a.request(id, "test").unwrap().plan.clone();
        p.a.release_req(id).unwrap();
        plan.segments
            .iter()
            .map(|s| (s.local_addr - a0, s.remote_addr - b0, s.len))
            .collect::<Vec<_>>()
    };
    // Four consecutive 4 KiB blocks on both sides, then a gap on the remote
    // side only, then a zero-length one continuing it (joined), then one
    // back where the first began.
    let local: Vec<Desc> = [0u64, 4096, 8192, 12288, 16384, 20480, 0]
        .iter()
        .zip([4096u64, 4096, 4096, 4096, 4096, 0, 4096])
        .map(|(&o, n)| d(a0 + o, n, p.amd))
        .collect();
    let remote: Vec<Desc> = [0u64, 4096, 8192, 12288, 20480, 24576, 4096]
        .iter()
        .zip([4096u64, 4096, 4096, 4096, 4096, 0, 4096])
        .map(|(&o, n)| d(b0 + o, n, p.bmd_remote))
        .collect();
    assert_eq!(
        segments(&local, &remote),
        vec![(0, 0, 16384), (16384, 20480, 4096), (0, 4096, 4096)]
    );
    // Consecutive locally only, or remotely only: kept apart.
    let local: Vec<Desc> = (0..4).map(|i| d(a0 + i * 4096, 4096, p.amd)).collect();
    let remote: Vec<Desc> = (0..4)
        .map(|i| d(b0 + (3 - i) * 4096, 4096, p.bmd_remote))
        .collect();
    assert_eq!(segments(&local, &remote).len(), 4);
    let local_reversed: Vec<Desc> = (0..4)
        .map(|i| d(a0 + (3 - i) * 4096, 4096, p.amd))
        .collect();
    let remote_in_order: Vec<Desc> = (0..4)
        .map(|i| d(b0 + i * 4096, 4096, p.bmd_remote))
        .collect();
    assert_eq!(segments(&local_reversed, &remote_in_order).len(), 4);
    // And the joined plan moves the bytes where the descriptors say.
    let local: Vec<Desc> = [0u64, 4096, 8192, 40960]
        .iter()
        .map(|&o| d(a0 + o, 4096, p.amd))
        .collect();
    let remote: Vec<Desc> = [8192u64, 12288, 16384, 0]
        .iter()
        .map(|&o| d(b0 + o, 4096, p.bmd_remote))
        .collect();
    let id = p.a.prep_xfer(Op::Write, &local, &remote, b"B").unwrap();
    let _ = p.a.post_xfer(id, None).unwrap();
    assert_eq!(wait(&p.a, id), Ok(Status::Success));
    assert_eq!(p.bbuf[8192..20480], p.abuf[0..12288]);
    assert_eq!(p.bbuf[0..4096], p.abuf[40960..45056]);
    assert!(p.bbuf[4096..8192].iter().all(|&x| x == 0));
    assert!(p.bbuf[20480..].iter().all(|&x| x == 0));

    // A loopback transfer within one buffer: consecutive blocks join while
    // the two sides stay apart, not when the joined sides would overlap
    // (a shift by one block moves block by block, as the descriptors say).
    let a = engine("Joiner", true);
    let buf = vec![0u8; 64 << 10];
    let md = a
        .register_mem(buf.as_ptr() as u64, buf.len() as u64, 0, 0)
        .unwrap();
    let mine = a.load_local_md(md).unwrap();
    let base = buf.as_ptr() as u64;
    let loop_segments = |from: u64, to: u64| {
        let local: Vec<Desc> = (0..4)
            .map(|i| d(base + from + i * 4096, 4096, md))
            .collect();
        let remote: Vec<Desc> = (0..4)
            .map(|i| d(base + to + i * 4096, 4096, mine))
            .collect();
        let id = a.prep_xfer(Op::Write, &local, &remote, b"Joiner").unwrap();
        let n = a.request(id, "test").unwrap().plan.segments.len();
        a.release_req(id).unwrap();
        n
    };
    assert_eq!(loop_segments(0, 32768), 1, "apart: joined");
    assert_eq!(loop_segments(0, 4096), 4, "shifted by a block: kept apart");
    assert_eq!(loop_segments(4096, 0), 4, "shifted back: kept apart");
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
        Error::NotFound(_)
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

#[test]
fn a_plan_no_route_serves_is_refused_naming_the_transport_and_the_memory_kinds() {
    // Every transport serves GPU memory one way or another (same-host peers
    // by CUDA IPC beside cross-memory attach), none serves files.
    for (params, transport, mem_type, kind) in [
        (&[][..], "in-process copy", 4, "memory type 4"),
        (
            &[("protocol", "tcp"), ("ip_addr", "127.0.0.1")][..],
            "tcp",
            4,
            "memory type 4",
        ),
        (
            &[("protocol", "cma"), ("ip_addr", "127.0.0.1")][..],
            "cma",
            4,
            "memory type 4",
        ),
    ] {
        let p = pair_with(4096, false, params);
        // Metadata of B presenting memory of that kind (device 3): a
        // peer's metadata may say so whatever B registered.
        let info = ConnInfo::decode(p.b.conn_info()).unwrap();
        let vram = RegionPublic {
            owner: info.token,
            key: 42,
            addr: 0x7000_0000,
            len: 1 << 20,
            mem_type,
            dev_id: 3,
            ipc: None,
            rdma: None,
            vmm: None,
        };
        let vmd =
            p.a.load_remote_md(vram.addr, vram.len, vram.mem_type, &vram.encode(), b"B")
                .unwrap();
        let l = Desc {
            addr: p.abuf.as_ptr() as u64,
            len: 4096,
            md: p.amd,
        };
        let r = Desc {
            addr: vram.addr,
            len: 4096,
            md: vmd,
        };
        let dram = Desc {
            addr: p.bbuf.as_ptr() as u64,
            len: 4096,
            md: p.bmd_remote,
        };
        for remote in [vec![r], vec![dram, r]] {
            let local = vec![l; remote.len()];
            match p.a.prep_xfer(Op::Write, &local, &remote, b"B") {
                Err(Error::NotSupported(m)) => {
                    assert!(m.contains(transport), "{m}");
                    assert!(m.contains(&format!("local DRAM with remote {kind}")), "{m}");
                }
                other => panic!("expected NotSupported, got {other:?}"),
            }
        }
        assert_eq!(p.a.live_requests(), 0);
        // DRAM to DRAM on the same route still works.
        let _ = p.whole(Op::Write);
    }
}

#[test]
fn a_handle_of_another_engine_names_its_own_region_or_nothing() {
    // NIXL's own backend test asks engine A for the public data of a
    // registration engine B returned, then loads it on A as B's region.
    let a = engine("A", false);
    let b = engine("B", false);
    a.load_remote_conn_info(b"B", b.conn_info()).unwrap();
    let abuf = vec![1u8; 4096];
    let bbuf = vec![2u8; 8192];
    let amd = a.register_mem(abuf.as_ptr() as u64, 4096, 0, 0).unwrap();
    let bmd = b.register_mem(bbuf.as_ptr() as u64, 8192, 0, 0).unwrap();
    assert_ne!(amd, bmd, "handles are unique across the process");
    // Exactly B's region, owned by B: loading it as B's works.
    let via_a = a.public_data(bmd).unwrap();
    assert_eq!(via_a, b.public_data(bmd).unwrap());
    let rmd = a
        .load_remote_md(bbuf.as_ptr() as u64, 8192, 0, &via_a, b"B")
        .unwrap();
    let id = a
        .prep_xfer(
            Op::Write,
            &[whole(&abuf[..], amd)],
            &[Desc {
                addr: bbuf.as_ptr() as u64,
                len: 4096,
                md: rmd,
            }],
            b"B",
        )
        .unwrap();
    a.release_req(id).unwrap();
    // No other call acts on a foreign handle.
    assert!(matches!(a.deregister_mem(bmd), Err(Error::NotFound(_))));
    assert!(matches!(a.load_local_md(bmd), Err(Error::NotFound(_))));
    assert!(matches!(a.unload_md(bmd), Err(Error::NotFound(_))));
    assert!(matches!(
        a.prep_xfer(
            Op::Write,
            &[whole(&abuf[..], bmd)],
            &[whole(&bbuf[..4096], rmd)],
            b"B"
        ),
        Err(Error::NotFound(_))
    ));
    assert!(matches!(b.unload_md(rmd), Err(Error::NotFound(_))));
    // Still B's: deregistered there, it is gone everywhere.
    b.deregister_mem(bmd).unwrap();
    assert!(matches!(a.public_data(bmd), Err(Error::NotFound(_))));
    assert!(matches!(b.public_data(bmd), Err(Error::NotFound(_))));
    // A destroyed engine's registrations vanish too.
    drop(a);
    assert!(matches!(b.public_data(amd), Err(Error::NotFound(_))));
}
