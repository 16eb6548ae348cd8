//! The transport conformance suite: what every transport must do, written
//! once and run against each (`conformance!` below). A new transport gets
//! the whole suite by adding one line with the options that select it.
//!
//! Each test drives two engines of this process, the way NIXL drives them:
//! data both ways at awkward sizes and offsets (with guard bytes around the
//! destination), many descriptors, notifications that arrive only after
//! the data, reposts, concurrent threads, cancel, deregistration during a
//! transfer, and the target's death during a transfer.

use super::*;

/// Runs the suite against the transport that `params` select.
macro_rules! conformance {
    ($transport:ident, $params:expr) => {
        mod $transport {
            const PARAMS: &[(&str, &str)] = $params;

            macro_rules! case {
                ($name:ident) => {
                    #[test]
                    fn $name() {
                        super::$name(PARAMS);
                    }
                };
            }

            case!(write_and_read_with_notifications_both_progress_modes);
            case!(data_both_ways_at_awkward_sizes_and_offsets);
            case!(many_noncontiguous_descriptors);
            case!(notifications_arrive_only_after_the_data);
            case!(reposting_gives_one_notification_per_post);
            case!(four_threads_post_at_once);
            case!(gen_notif_to_peer_and_self);
            case!(release_in_flight_reads_and_writes_nothing_afterwards);
            case!(deregistration_in_flight_stops_every_access);
            case!(target_death_in_flight_writes_nothing_afterwards);
        }
    };
}

// The in-process copy (`auto` between engines of one process).
conformance!(inproc, &[]);
conformance!(tcp, &[("protocol", "tcp"), ("ip_addr", "127.0.0.1")]);
// Cross-memory attach: the probe reads our own pid's cookie.
conformance!(cma, &[("protocol", "cma"), ("ip_addr", "127.0.0.1")]);
// RDMA on the fake NIC (tests/fakes/ibverbs), one device: the RDMA unit
// tests inject faults into the other.
conformance!(
    rdma,
    &[
        ("protocol", "rdma"),
        ("ip_addr", "127.0.0.1"),
        ("device_name", "fake_mlx5_0")
    ]
);

/// Two engines with progress threads, where `A` knows `B`.
fn two(params: &[(&str, &str)]) -> (Engine, Engine) {
    let a = engine_with("A", true, params);
    let b = engine_with("B", true, params);
    a.load_remote_conn_info(b"B", b.conn_info()).unwrap();
    (a, b)
}

/// Without progress threads: a large transfer then moves only inside
/// `postXfer`/`checkXfer` (copy transports: in bounded steps), so the test
/// can act between its steps.
fn two_unthreaded(params: &[(&str, &str)]) -> (Engine, Engine) {
    let a = engine_with("A", false, params);
    let b = engine_with("B", false, params);
    a.load_remote_conn_info(b"B", b.conn_info()).unwrap();
    (a, b)
}

/// Registers `buf` on `b` and loads its metadata on `a`: returns `b`'s id
/// of the registration and `a`'s id of the remote region.
fn expose_on_b(a: &Engine, b: &Engine, buf: &[u8]) -> (MdId, MdId) {
    let bmd = b
        .register_mem(buf.as_ptr() as u64, buf.len() as u64, 0, 0)
        .unwrap();
    let blob = b.public_data(bmd).unwrap();
    let rmd = a
        .load_remote_md(buf.as_ptr() as u64, buf.len() as u64, 0, &blob, b"B")
        .unwrap();
    (bmd, rmd)
}

/// A byte pattern that differs per `seed` and per position.
fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u32).wrapping_mul(2_654_435_761).to_le_bytes()[1] ^ seed)
        .collect()
}

/// A one-descriptor request of `len` bytes between `local[loff..]` (A's
/// registration `lmd`) and `remote[roff..]` (B's region, loaded as `rmd`).
#[allow(clippy::too_many_arguments)]
fn one_desc(
    a: &Engine,
    op: Op,
    local: &[u8],
    lmd: MdId,
    loff: usize,
    remote: &[u8],
    rmd: MdId,
    roff: usize,
    len: usize,
) -> ReqId {
    let l = Desc {
        addr: local.as_ptr() as u64 + loff as u64,
        len: len as u64,
        md: lmd,
    };
    let r = Desc {
        addr: remote.as_ptr() as u64 + roff as u64,
        len: len as u64,
        md: rmd,
    };
    a.prep_xfer(op, &[l], &[r], b"B").unwrap()
}

pub(super) fn data_both_ways_at_awkward_sizes_and_offsets(params: &[(&str, &str)]) {
    let (a, b) = two(params);
    let cap = (3 << 20) + 8192;
    let mut abuf = vec![0u8; cap];
    let mut bbuf = vec![0u8; cap];
    let (amd, bmd) = expose(&a, &b, b"B", &abuf, &bbuf);
    let cases = [
        (1usize, 1usize, 3usize),
        (3, 0, 7),
        (4095, 5, 1),
        (4097, 4095, 2),
        (65_537, 13, 33),
        ((1 << 20) + 7, 3, 4093),
        ((3 << 20) + 1, 4099, 0),
    ];
    for (round, &(len, loff, roff)) in cases.iter().enumerate() {
        for op in [Op::Write, Op::Read] {
            let seed = (round * 2 + (op == Op::Read) as usize) as u8;
            abuf.copy_from_slice(&pattern(cap, seed));
            bbuf.copy_from_slice(&pattern(cap, seed ^ 0xA5));
            let (mut a_want, mut b_want) = (abuf.clone(), bbuf.clone());
            match op {
                Op::Write => b_want[roff..roff + len].copy_from_slice(&abuf[loff..loff + len]),
                Op::Read => a_want[loff..loff + len].copy_from_slice(&bbuf[roff..roff + len]),
            }
            let id = one_desc(&a, op, &abuf, amd, loff, &bbuf, bmd, roff, len);
            let _ = a.post_xfer(id, Some(&[seed])).unwrap();
            assert_eq!(wait(&a, id), Ok(Status::Success), "{op:?} of {len} bytes");
            assert_eq!(
                notifs_until(&b, 1),
                vec![(AgentName::from("A"), vec![seed])]
            );
            let what = format!("{op:?} of {len} bytes at offsets {loff}/{roff}");
            assert!(abuf == a_want, "{what}: A's buffer (incl. guards) is wrong");
            assert!(bbuf == b_want, "{what}: B's buffer (incl. guards) is wrong");
            a.release_req(id).unwrap();
        }
    }
}

pub(super) fn notifications_arrive_only_after_the_data(params: &[(&str, &str)]) {
    // The target looks at its memory the moment the notification shows up,
    // without the initiator checking its request first.
    let (a, b) = two(params);
    let len = 8 << 20;
    let mut local = vec![0u8; len];
    let mut remote = vec![0u8; len];
    let (lmd, rmd) = expose(&a, &b, b"B", &local, &remote);
    for round in 0..8u8 {
        let op = if round % 2 == 0 { Op::Write } else { Op::Read };
        match op {
            Op::Write => local.copy_from_slice(&pattern(len, round)),
            Op::Read => remote.copy_from_slice(&pattern(len, round)),
        }
        let id = one_desc(&a, op, &local, lmd, 0, &remote, rmd, 0, len);
        let _ = a.post_xfer(id, Some(&[round])).unwrap();
        assert_eq!(
            notifs_until(&b, 1),
            vec![(AgentName::from("A"), vec![round])]
        );
        assert!(
            local == remote,
            "round {round} ({op:?}): the notification arrived before the data"
        );
        assert_eq!(wait(&a, id), Ok(Status::Success));
        a.release_req(id).unwrap();
    }
}

pub(super) fn release_in_flight_reads_and_writes_nothing_afterwards(params: &[(&str, &str)]) {
    let (a, b) = two(params);
    let len = 64 << 20;
    // WRITE: once released, the source is never read again, so bytes
    // written into it afterwards never reach the target.
    let mut src = vec![0x11u8; len];
    let dst = vec![0u8; len];
    let (smd, dmd) = expose(&a, &b, b"B", &src, &dst);
    // READ: once released, nothing lands in the local buffer.
    let local = vec![0x22u8; len];
    let remote = vec![0x33u8; len];
    let (lmd, rmd) = expose(&a, &b, b"B", &local, &remote);
    // A follow-up transfer on the same route after each release: every frame
    // or step of the cancelled one was handled by the time it completes.
    let fsrc = vec![0x44u8; 16 << 20];
    let fdst = vec![0u8; 16 << 20];
    let (fsmd, fdmd) = expose(&a, &b, b"B", &fsrc, &fdst);
    let follow_up = one_desc(&a, Op::Write, &fsrc, fsmd, 0, &fdst, fdmd, 0, fsrc.len());

    let w = one_desc(&a, Op::Write, &src, smd, 0, &dst, dmd, 0, len);
    let _ = a.post_xfer(w, Some(b"released write")).unwrap();
    let started = Instant::now();
    a.release_req(w).unwrap();
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "release blocked"
    );
    src.fill(0xEE);
    let r = one_desc(&a, Op::Read, &local, lmd, 0, &remote, rmd, 0, len);
    let _ = a.post_xfer(r, Some(b"released read")).unwrap();
    a.release_req(r).unwrap();
    let snapshot = local.clone();
    let _ = a.post_xfer(follow_up, Some(b"after")).unwrap();
    assert_eq!(wait(&a, follow_up), Ok(Status::Success));
    let mut got = Vec::new();
    while !got.contains(&b"after".to_vec()) {
        got.extend(notifs_until(&b, 1).into_iter().map(|(_, m)| m));
    }
    assert!(
        !dst.contains(&0xEE),
        "a released WRITE read its source afterwards"
    );
    assert!(local == snapshot, "a released READ wrote afterwards");
    // A release can come after the transfer completed (a loaded host may
    // pause this thread between post and release): then, and only then, its
    // notification arrives, after all of its data.
    if got.contains(&b"released write".to_vec()) {
        assert!(dst.iter().all(|&x| x == 0x11), "notified before the data");
    }
    if got.contains(&b"released read".to_vec()) {
        assert!(local.iter().all(|&x| x == 0x33), "notified before the data");
    }
    assert_eq!(a.live_requests(), 1);
}

pub(super) fn write_and_read_with_notifications_both_progress_modes(params: &[(&str, &str)]) {
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

pub(super) fn reposting_gives_one_notification_per_post(params: &[(&str, &str)]) {
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

pub(super) fn many_noncontiguous_descriptors(params: &[(&str, &str)]) {
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

pub(super) fn gen_notif_to_peer_and_self(params: &[(&str, &str)]) {
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

pub(super) fn four_threads_post_at_once(params: &[(&str, &str)]) {
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

pub(super) fn deregistration_in_flight_stops_every_access(params: &[(&str, &str)]) {
    let (a, b) = two_unthreaded(params);
    let len = 64 << 20;
    let src = pattern(len, 7);
    let dst = vec![0u8; len];
    let smd = a
        .register_mem(src.as_ptr() as u64, len as u64, 0, 0)
        .unwrap();
    let (bmd, rmd) = expose_on_b(&a, &b, &dst);
    let w = one_desc(&a, Op::Write, &src, smd, 0, &dst, rmd, 0, len);
    let _ = a.post_xfer(w, Some(b"never")).unwrap();
    b.deregister_mem(bmd).unwrap();
    // After deregisterMem returned, not one more byte may land.
    let snapshot = dst.clone();
    let result = wait(&a, w);
    assert!(dst == snapshot, "written after deregisterMem returned");
    if result.is_ok() {
        assert!(dst == src, "completed before the deregistration");
    }
    // A repost, and a READ of the region, are refused.
    let refused = a.post_xfer(w, None).and_then(|_| wait(&a, w));
    assert!(matches!(refused, Err(Error::NotAllowed(_))), "{refused:?}");
    let local = vec![0x5Au8; len];
    let lmd = a
        .register_mem(local.as_ptr() as u64, len as u64, 0, 0)
        .unwrap();
    let r = one_desc(&a, Op::Read, &local, lmd, 0, &dst, rmd, 0, len);
    let refused = a.post_xfer(r, None).and_then(|_| wait(&a, r));
    assert!(matches!(refused, Err(Error::NotAllowed(_))), "{refused:?}");
    assert!(local.iter().all(|&x| x == 0x5A), "a refused READ wrote");
    assert!(
        !b.get_notifs().iter().any(|(_, m)| m == b"never") || result.is_ok(),
        "a notification for data that did not land"
    );
}

pub(super) fn target_death_in_flight_writes_nothing_afterwards(params: &[(&str, &str)]) {
    let (a, b) = two_unthreaded(params);
    let len = 64 << 20;
    let src = pattern(len, 9);
    let dst = vec![0u8; len];
    let smd = a
        .register_mem(src.as_ptr() as u64, len as u64, 0, 0)
        .unwrap();
    let (_, rmd) = expose_on_b(&a, &b, &dst);
    let w = one_desc(&a, Op::Write, &src, smd, 0, &dst, rmd, 0, len);
    let _ = a.post_xfer(w, None).unwrap();
    // B's engine is destroyed; its memory (our `dst`) stays mapped, so a
    // write after this point would land unnoticed.
    drop(b);
    let snapshot = dst.clone();
    let result = wait(&a, w);
    assert!(
        dst == snapshot,
        "written after the target's engine was destroyed"
    );
    match result {
        Ok(_) => assert!(dst == src, "completed before the destruction"),
        Err(e) => assert!(matches!(e, Error::RemoteDisconnect(_)), "{e:?}"),
    }
    let later = a.post_xfer(w, None).and_then(|_| wait(&a, w));
    assert!(
        matches!(later, Err(Error::RemoteDisconnect(_))),
        "{later:?}"
    );
    assert!(dst == snapshot);
}
