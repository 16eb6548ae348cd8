//! RDMA between two engines of this process on the fake NIC
//! (`tests/fakes/ibverbs`): the bytes go through the NIC, notifications
//! follow the data over both queue pairs, the NIC refuses what the owner
//! deregistered, and restarted peers leave no queue pairs behind. (The
//! transport conformance suite runs on RDMA too, see `conformance.rs`.)

use super::*;
use crate::transport::rdma::{RdmaRoute, RdmaTransport, testing};

/// One fake device (the RDMA unit tests inject faults into the other).
const RDMA: &[(&str, &str)] = &[
    ("protocol", "rdma"),
    ("ip_addr", "127.0.0.1"),
    ("device_name", "fake_mlx5_0"),
];

fn rdma_of(e: &Engine) -> &RdmaTransport {
    e.transports
        .get::<RdmaTransport>()
        .expect("protocol=rdma runs the RDMA transport")
}

#[test]
fn bytes_cross_the_nic_and_the_notification_follows_them() {
    let p = pair_with(8 << 20, true, RDMA);
    let route = route_of(&p.a, "B");
    assert_eq!(route.transport(), "rdma", "{}", route.describe());
    assert!(route.as_any().downcast_ref::<RdmaRoute>().is_some());
    let sent = testing::fake().bytes("fake_mlx5_0", false);
    let mut abuf = p.abuf.clone();
    abuf.iter_mut()
        .enumerate()
        .for_each(|(i, x)| *x = (i * 7 % 253) as u8);
    // SAFETY: a test writes its own registered buffer between transfers.
    unsafe { std::ptr::copy_nonoverlapping(abuf.as_ptr(), p.abuf.as_ptr() as *mut u8, abuf.len()) };
    let id = p.whole(Op::Write);
    p.a.post_xfer(id, Some(b"written")).unwrap();
    let got = notifs_until(&p.b, 1);
    assert_eq!(got[0].1, b"written");
    // The notification came after every byte: they are all there now.
    assert!(
        p.bbuf == abuf,
        "the target's bytes when the notification arrived"
    );
    assert_eq!(wait(&p.a, id), Ok(Status::Success));
    let moved = testing::fake().bytes("fake_mlx5_0", false) - sent;
    assert!(moved >= 8 << 20, "only {moved} bytes crossed the fake NIC");
    // Slices of 64 KiB over 2 queue pairs: both carried data, both sent a
    // part of the notification.
    assert_eq!(
        route
            .as_any()
            .downcast_ref::<RdmaRoute>()
            .unwrap()
            .live_qps(),
        2
    );
    p.a.release_req(id).unwrap();
}

#[test]
fn a_region_the_owner_deregistered_is_refused_by_the_nic() {
    let p = pair_with(1 << 20, true, RDMA);
    let id = p.whole(Op::Write);
    assert_eq!(
        p.a.post_xfer(id, None).and_then(|_| wait(&p.a, id)),
        Ok(Status::Success)
    );
    // B deregisters; A still holds the metadata and the prepared request.
    let bmd = p.b.mds.read().iter().find_map(|(id, md)| match md {
        Md::Local(r) if r.addr == p.bbuf.as_ptr() as u64 => Some(*id),
        _ => None,
    });
    p.b.deregister_mem(bmd.expect("B's registration")).unwrap();
    let before = p.bbuf.clone();
    // SAFETY: the test changes its own buffer (no transfer runs now).
    unsafe { std::ptr::write_bytes(p.abuf.as_ptr() as *mut u8, 0x5a, p.abuf.len()) };
    for op in [Op::Write, Op::Read] {
        let id = p.whole(op);
        let outcome = p.a.post_xfer(id, None).and_then(|_| wait(&p.a, id));
        assert!(
            matches!(&outcome, Err(Error::NotAllowed(m)) if m.contains("refused the access")),
            "{op:?} of a deregistered region: {outcome:?}"
        );
        p.a.release_req(id).unwrap();
    }
    assert!(p.bbuf == before, "no byte of the refused WRITE landed");
    // The queue pairs broke on the error; the next transfer to a live
    // region connects new ones and works.
    let (src, dst) = (vec![9u8; 4096], vec![0u8; 4096]);
    let (smd, rmd) = expose(&p.a, &p.b, b"B", &src, &dst);
    let id =
        p.a.prep_xfer(Op::Write, &[whole(&src, smd)], &[whole(&dst, rmd)], b"B")
            .unwrap();
    assert_eq!(
        p.a.post_xfer(id, None).and_then(|_| wait(&p.a, id)),
        Ok(Status::Success)
    );
    assert!(dst == src, "a WRITE after the queue pairs were rebuilt");
}

#[test]
fn restarted_peers_leave_no_queue_pairs_behind() {
    let a = engine_with("A", true, RDMA);
    let src = vec![3u8; 64 << 10];
    let smd = a
        .register_mem(src.as_ptr() as u64, src.len() as u64, 0, 0)
        .unwrap();
    let live = || rdma_of(&a).live_qps();
    let fake_before = testing::fake().live_qps();
    for round in 0..30 {
        let b = engine_with("B", true, RDMA);
        let dst = vec![0u8; 64 << 10];
        let dmd = b
            .register_mem(dst.as_ptr() as u64, dst.len() as u64, 0, 0)
            .unwrap();
        a.load_remote_conn_info(b"B", b.conn_info()).unwrap();
        let rmd = a
            .load_remote_md(
                dst.as_ptr() as u64,
                dst.len() as u64,
                0,
                &b.public_data(dmd).unwrap(),
                b"B",
            )
            .unwrap();
        let id = a
            .prep_xfer(Op::Write, &[whole(&src, smd)], &[whole(&dst, rmd)], b"B")
            .unwrap();
        a.post_xfer(id, Some(b"n")).unwrap();
        assert_eq!(wait(&a, id), Ok(Status::Success), "round {round}");
        assert_eq!(notifs_until(&b, 1)[0].1, b"n");
        assert!(dst == src, "round {round}");
        a.release_req(id).unwrap();
        a.unload_md(rmd).unwrap();
        a.disconnect(b"B").unwrap();
        drop(b);
        // Our queue pairs to the old B go (at once, or once drained).
        let deadline = Instant::now() + Duration::from_secs(10);
        while live() > 0 {
            assert!(
                Instant::now() < deadline,
                "{} queue pairs left after round {round}",
                live()
            );
            std::thread::sleep(Duration::from_millis(1));
        }
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    while testing::fake().live_qps() > fake_before {
        assert!(
            Instant::now() < deadline,
            "the fake NIC holds {} queue pairs, {fake_before} before",
            testing::fake().live_qps()
        );
        std::thread::sleep(Duration::from_millis(1));
    }
}

#[test]
fn a_transfer_moves_to_the_other_nic_pair_when_a_link_fails() {
    let _alone = testing::exclusive();
    // Both fake NICs: NIC pairs (0, 0) and (1, 1), two queue pairs each.
    let both = &[("protocol", "rdma"), ("ip_addr", "127.0.0.1")];
    let p = pair_with(64 << 20, true, both);
    let mut abuf = p.abuf.clone();
    abuf.iter_mut()
        .enumerate()
        .for_each(|(i, x)| *x = (i * 13 % 251) as u8);
    // SAFETY: a test writes its own registered buffer between transfers.
    unsafe { std::ptr::copy_nonoverlapping(abuf.as_ptr(), p.abuf.as_ptr() as *mut u8, abuf.len()) };
    // 1 ms per work request: the 1024 slices over 4 queue pairs take about
    // 256 ms; the link of the second NICs fails 50 ms in.
    testing::fake().set_delay_us(1000);
    let id = p.whole(Op::Write);
    p.a.post_xfer(id, Some(b"moved")).unwrap();
    std::thread::sleep(Duration::from_millis(50));
    testing::fake().drop_link("fake_mlx5_1", true);
    let outcome = wait(&p.a, id);
    testing::fake().set_delay_us(0);
    testing::fake().drop_link("fake_mlx5_1", false);
    assert_eq!(
        outcome,
        Ok(Status::Success),
        "the WRITE survives a failed link"
    );
    assert!(
        p.bbuf == abuf,
        "every byte landed, through the NIC pair that works"
    );
    let got = notifs_until(&p.b, 1);
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].1, b"moved");
    std::thread::sleep(Duration::from_millis(100));
    assert!(p.b.get_notifs().is_empty(), "the notification came once");
    // The next transfer connects again, without the failed pair for now.
    p.a.release_req(id).unwrap();
    let id = p.whole(Op::Read);
    assert_eq!(
        p.a.post_xfer(id, None).and_then(|_| wait(&p.a, id)),
        Ok(Status::Success)
    );
}

/// Engines under `protocol=auto` that take each other for peers on other
/// hosts (so RDMA is offered on this machine), on the second fake NIC (its
/// byte counter is ours while we hold `testing::exclusive`).
fn auto_engine(name: &str) -> Engine {
    testing::fake();
    let params = [("ip_addr", "127.0.0.1"), ("device_name", "fake_mlx5_1")];
    Engine::with_transports(EngineConfig::new(name, &params), |c| c.other_host = true).unwrap()
}

/// Read-only memory: the fake NIC refuses to register it for peers to
/// write (as a real one does), so under `auto` the region has no RDMA keys.
static READ_ONLY: [u8; 65536] = {
    let mut b = [0u8; 65536];
    let mut i = 0;
    while i < b.len() {
        b[i] = (i % 241) as u8;
        i += 1;
    }
    b
};

#[test]
fn under_auto_what_rdma_cannot_move_goes_over_tcp() {
    let _alone = testing::exclusive();
    let (a, b) = (auto_engine("A"), auto_engine("B"));
    a.load_remote_conn_info(b"B", b.conn_info()).unwrap();
    let route = route_of(&a, "B");
    assert_eq!(route.transport(), "rdma", "{}", route.describe());
    // A region of B the NICs registered: READ over RDMA.
    let src = vec![7u8; 1 << 20];
    let dst = vec![0u8; 1 << 20];
    let (dmd, smd) = expose(&a, &b, b"B", &dst, &src);
    let _ = smd;
    let sent = testing::fake().bytes("fake_mlx5_1", false);
    let id = a
        .prep_xfer(Op::Read, &[whole(&dst, dmd)], &[whole(&src, smd)], b"B")
        .unwrap();
    assert_eq!(
        a.post_xfer(id, None).and_then(|_| wait(&a, id)),
        Ok(Status::Success)
    );
    assert!(dst == src);
    assert!(
        testing::fake().bytes("fake_mlx5_1", false) >= sent + (1 << 20),
        "over RDMA"
    );
    // A region the NICs refused (read-only memory): registered anyway, with
    // no RDMA keys; a READ of it goes over TCP, and works.
    let ro = b
        .register_mem(READ_ONLY.as_ptr() as u64, READ_ONLY.len() as u64, 0, 0)
        .unwrap();
    let blob = b.public_data(ro).unwrap();
    let rro = a
        .load_remote_md(
            READ_ONLY.as_ptr() as u64,
            READ_ONLY.len() as u64,
            0,
            &blob,
            b"B",
        )
        .unwrap();
    let out = vec![0u8; READ_ONLY.len()];
    let omd = a
        .register_mem(out.as_ptr() as u64, out.len() as u64, 0, 0)
        .unwrap();
    let sent = testing::fake().bytes("fake_mlx5_1", false);
    let id = a
        .prep_xfer(
            Op::Read,
            &[whole(&out, omd)],
            &[Desc {
                addr: READ_ONLY.as_ptr() as u64,
                len: READ_ONLY.len() as u64,
                md: rro,
            }],
            b"B",
        )
        .unwrap();
    assert_eq!(
        a.post_xfer(id, None).and_then(|_| wait(&a, id)),
        Ok(Status::Success)
    );
    assert!(out[..] == READ_ONLY[..], "the READ over TCP");
    assert_eq!(
        testing::fake().bytes("fake_mlx5_1", false),
        sent,
        "no byte of it crossed the NIC"
    );
}

#[test]
fn under_auto_a_peer_no_nic_pair_reaches_goes_over_tcp() {
    let _alone = testing::exclusive();
    let (a, b) = (auto_engine("A"), auto_engine("B"));
    a.load_remote_conn_info(b"B", b.conn_info()).unwrap();
    let src = vec![5u8; 1 << 20];
    let dst = vec![0u8; 1 << 20];
    let (dmd, smd) = expose(&a, &b, b"B", &dst, &src);
    let id = a
        .prep_xfer(Op::Read, &[whole(&dst, dmd)], &[whole(&src, smd)], b"B")
        .unwrap();
    // The queue pairs connect (over TCP), but no packet crosses the link.
    testing::fake().drop_link("fake_mlx5_1", true);
    let first = a.post_xfer(id, None).and_then(|_| wait(&a, id));
    let second = a.post_xfer(id, None).and_then(|_| wait(&a, id));
    testing::fake().drop_link("fake_mlx5_1", false);
    assert!(
        matches!(first, Err(Error::RemoteDisconnect(_))),
        "the transfer on the dead link fails: {first:?}"
    );
    assert_eq!(second, Ok(Status::Success), "the next goes over TCP");
    assert!(dst == src);
}
