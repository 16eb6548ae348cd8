//! Our verbs calls against the fake NIC (`tests/fakes/ibverbs`), through
//! the same dlopen'd FFI path the plugin uses: discovery, GID choice,
//! registration, QP connection, the data-path opcodes, and the errors a
//! real NIC reports.

use std::sync::Arc;
use std::time::{Duration, Instant};

use super::connect::{self, Timing};
use super::device::{self, DeviceConfig, LinkLayer, Nic};
use super::mr::RegionMrs;
use super::testing::fake;
use super::verbs::{Cq, Pd, Qp, sys};
use crate::common::Error;

/// The tests of this module run one at a time (and apart from other
/// tests that inject faults): see [`super::testing::exclusive`].
use super::testing::exclusive;

fn nics() -> Vec<Nic> {
    fake();
    device::discover(&DeviceConfig::default()).expect("the fake NICs")
}

/// Two QPs, on the two fake NICs, connected to each other.
struct Pair {
    nics: Vec<Nic>,
    pds: [Arc<Pd>; 2],
    cqs: [Arc<Cq>; 2],
    qps: [Qp; 2],
}

fn pair() -> Pair {
    let nics = nics();
    let pds = [
        nics[0].ctx.alloc_pd().unwrap(),
        nics[1].ctx.alloc_pd().unwrap(),
    ];
    let cqs = [
        nics[0].ctx.create_cq(256, None).unwrap(),
        nics[1].ctx.create_cq(256, None).unwrap(),
    ];
    let cap = sys::QpCap {
        max_send_wr: 64,
        max_recv_wr: 64,
        max_send_sge: 1,
        max_recv_sge: 1,
        max_inline_data: 64,
    };
    let qps = [
        pds[0].create_rc_qp(&cqs[0], &cqs[0], cap).unwrap(),
        pds[1].create_rc_qp(&cqs[1], &cqs[1], cap).unwrap(),
    ];
    let psn = [connect::random_psn(), connect::random_psn()];
    let addr = [
        connect::address(&qps[0], &nics[0], psn[0]),
        connect::address(&qps[1], &nics[1], psn[1]),
    ];
    let t = Timing {
        timeout: 10,
        retry_cnt: 3,
        ..Timing::default()
    };
    connect::connect(&qps[0], &nics[0], psn[0], &addr[1], t).unwrap();
    connect::connect(&qps[1], &nics[1], psn[1], &addr[0], t).unwrap();
    Pair {
        nics,
        pds,
        cqs,
        qps,
    }
}

/// Waits (bounded) for `n` completions on `cq`.
fn completions(cq: &Cq, n: usize) -> Vec<sys::Wc> {
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut out = Vec::new();
    let mut buf = [sys::Wc::default(); 16];
    while out.len() < n {
        let got = cq.poll(&mut buf).unwrap();
        out.extend_from_slice(&buf[..got]);
        assert!(
            Instant::now() < deadline,
            "{} of {n} completions after 10 s: {out:?}",
            out.len()
        );
        if got == 0 {
            std::thread::sleep(Duration::from_millis(1));
        }
    }
    out
}

/// Posts one work request of `opcode` from `qp`.
fn post(qp: &Qp, wr_id: u64, opcode: u32, local: (u64, u32, u32), remote: (u64, u32), imm: u32) {
    let mut sge = sys::Sge {
        addr: local.0,
        length: local.1,
        lkey: local.2,
    };
    let mut wr = sys::SendWr {
        wr_id,
        sg_list: &mut sge,
        num_sge: 1,
        opcode,
        send_flags: sys::SEND_SIGNALED,
        imm_data: imm.to_be(),
        rdma: sys::RdmaWr {
            remote_addr: remote.0,
            rkey: remote.1,
        },
        ..Default::default()
    };
    // SAFETY: the SGE and WR live for the call; the buffers stay registered
    // and untouched until the test waits for the completion.
    unsafe { qp.post_send(&mut wr) }.unwrap();
}

fn post_recv(qp: &Qp, wr_id: u64, local: (u64, u32, u32)) {
    let mut sge = sys::Sge {
        addr: local.0,
        length: local.1,
        lkey: local.2,
    };
    let mut wr = sys::RecvWr {
        wr_id,
        next: std::ptr::null_mut(),
        sg_list: &mut sge,
        num_sge: 1,
    };
    // SAFETY: as in `post`.
    unsafe { qp.post_recv(&mut wr) }.unwrap();
}

#[test]
fn discovers_the_fake_nics_and_chooses_gids() {
    let _alone = exclusive();
    let nics = nics();
    assert_eq!(nics.len(), 2, "{nics:?}");
    assert_eq!(nics[0].name(), "fake_mlx5_0");
    assert_eq!(nics[0].link, LinkLayer::Ethernet);
    // RoCEv2, IPv4-mapped, on an interface that is up: index 3 of the
    // fake's table (link-local v1, v2, then IPv4 v1, v2).
    assert_eq!(nics[0].gid.index, 3);
    assert_eq!(
        std::net::Ipv6Addr::from(nics[1].gid.gid.raw).to_ipv4_mapped(),
        Some(std::net::Ipv4Addr::new(127, 0, 0, 2))
    );
    assert_eq!(nics[0].mtu, sys::MTU_4096);
    assert_eq!(nics[0].numa, Some(0));
    assert!(nics[0].limits.max_mr_size > 0 && nics[0].limits.max_qp_wr > 0);

    let one = device::discover(&DeviceConfig {
        names: vec!["fake_mlx5_1".into()],
        gid_index: Some(2),
    })
    .unwrap();
    assert_eq!(one.len(), 1);
    assert_eq!(one[0].name(), "fake_mlx5_1");
    assert_eq!(one[0].gid.index, 2, "gid_index overrides our choice");

    let err = device::discover(&DeviceConfig {
        names: vec!["mlx5_9".into()],
        gid_index: None,
    })
    .unwrap_err();
    assert!(
        matches!(&err, Error::NotSupported(m) if m.contains("mlx5_9") && m.contains("fake_mlx5_0")),
        "{err}"
    );
}

#[test]
fn write_read_and_send_after_data_through_our_ffi() {
    let _alone = exclusive();
    let p = pair();
    let (mut a, mut b) = (vec![0u8; 1 << 20], vec![0u8; 1 << 20]);
    for (i, x) in a.iter_mut().enumerate() {
        *x = (i % 251) as u8;
    }
    let max = p.nics[0].limits.max_mr_size;
    // SAFETY: both vectors outlive their registrations (dropped first below).
    let ma = unsafe { RegionMrs::register(&p.pds[0], a.as_mut_ptr() as u64, a.len() as u64, max) }
        .unwrap();
    // SAFETY: as above.
    let mb = unsafe { RegionMrs::register(&p.pds[1], b.as_mut_ptr() as u64, b.len() as u64, max) }
        .unwrap();
    let (a0, b0) = (a.as_ptr() as u64, b.as_ptr() as u64);
    let sent_before = fake().bytes("fake_mlx5_0", false);

    // A receive for the notification, then WRITE 64 KiB at an odd offset
    // followed by a SEND with immediate on the same QP.
    post_recv(
        &p.qps[1],
        77,
        (b0 + 900_000, 64, mb.lkey(b0 + 900_000, 64).unwrap()),
    );
    let wkey = mb.rkey(b0 + 4097, 65536).unwrap();
    post(
        &p.qps[0],
        1,
        sys::WR_RDMA_WRITE,
        (a0 + 13, 65536, ma.lkey(a0 + 13, 65536).unwrap()),
        (b0 + 4097, wkey),
        0,
    );
    post(
        &p.qps[0],
        2,
        sys::WR_SEND_WITH_IMM,
        (a0, 16, ma.lkey(a0, 16).unwrap()),
        (0, 0),
        0xfeed,
    );
    let recv = completions(&p.cqs[1], 1);
    assert_eq!(recv[0].wr_id, 77);
    assert_eq!(recv[0].status, sys::WC_SUCCESS);
    assert_eq!(recv[0].opcode, sys::WC_RECV);
    assert_eq!(u32::from_be(recv[0].imm_data), 0xfeed);
    // The receive completed: the WRITE before it on the QP has landed.
    assert!(b[4097..4097 + 65536] == a[13..13 + 65536], "written bytes");
    let sent = completions(&p.cqs[0], 2);
    assert_eq!(
        sent.iter().map(|w| (w.wr_id, w.status)).collect::<Vec<_>>(),
        vec![(1, sys::WC_SUCCESS), (2, sys::WC_SUCCESS)]
    );

    // READ it back into another place of `a`.
    let rkey = mb.rkey(b0 + 4097, 65536).unwrap();
    post(
        &p.qps[0],
        3,
        sys::WR_RDMA_READ,
        (a0 + 500_000, 65536, ma.lkey(a0 + 500_000, 65536).unwrap()),
        (b0 + 4097, rkey),
        0,
    );
    let read = completions(&p.cqs[0], 1);
    assert_eq!((read[0].wr_id, read[0].status), (3, sys::WC_SUCCESS));
    assert!(
        a[500_000..500_000 + 65536] == a[13..13 + 65536],
        "read bytes"
    );
    assert!(fake().bytes("fake_mlx5_0", false) >= sent_before + 2 * 65536);
    drop((ma, mb));
}

#[test]
fn a_dmabuf_registered_through_our_ffi_takes_writes_at_its_iova() {
    let _alone = exclusive();
    let p = pair();
    // A dmabuf stand-in: a memfd of 3 pages (the fake NIC maps the
    // descriptor, as a NIC maps a dmabuf the CUDA driver exported).
    // SAFETY: a fresh memfd we own.
    let fd = unsafe {
        let name = c"dmabuf-test";
        let raw = libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC);
        assert!(raw >= 0);
        <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(raw)
    };
    let page = 4096u64;
    use std::os::fd::{AsFd, AsRawFd};
    // SAFETY: our own descriptor.
    assert_eq!(
        unsafe { libc::ftruncate(fd.as_raw_fd(), 3 * page as i64) },
        0
    );
    let (offset, len, iova) = (page + 64, 1000usize, 0x5a00_0000_0000u64 + page + 64);
    // SAFETY: the memfd stays open until the region is dropped below.
    let mr =
        unsafe { p.pds[1].reg_dmabuf_mr(fd.as_fd(), offset, len, iova, super::mr::DATA_ACCESS) }
            .unwrap();
    assert_eq!(mr.addr, iova, "addressed by its iova");
    let mut a = vec![0u8; len];
    for (i, x) in a.iter_mut().enumerate() {
        *x = (i % 239) as u8 + 1;
    }
    let max = p.nics[0].limits.max_mr_size;
    // SAFETY: `a` outlives its registration (dropped first below).
    let ma =
        unsafe { RegionMrs::register(&p.pds[0], a.as_mut_ptr() as u64, len as u64, max) }.unwrap();
    let a0 = a.as_ptr() as u64;
    post(
        &p.qps[0],
        1,
        sys::WR_RDMA_WRITE,
        (a0, len as u32, ma.lkey(a0, len as u64).unwrap()),
        (iova, mr.rkey),
        0,
    );
    post(
        &p.qps[0],
        2,
        sys::WR_RDMA_WRITE,
        (a0, 16, ma.lkey(a0, 16).unwrap()),
        (iova + len as u64 - 8, mr.rkey),
        0,
    );
    let wc = completions(&p.cqs[0], 2);
    assert_eq!(wc[0].status, sys::WC_SUCCESS);
    assert_ne!(wc[1].status, sys::WC_SUCCESS, "past the region's end");
    // What landed is in the buffer at `offset`.
    let mut got = vec![0u8; len];
    // SAFETY: reads our own memfd into our own buffer.
    let n = unsafe {
        libc::pread(
            fd.as_raw_fd(),
            got.as_mut_ptr().cast(),
            len,
            offset as libc::off_t,
        )
    };
    assert_eq!(n, len as isize);
    assert!(got == a, "the bytes are in the dmabuf at its offset");
    drop(ma);
    drop(mr);
}

#[test]
fn remote_access_errors_then_flush() {
    let _alone = exclusive();
    let p = pair();
    let mut a = vec![1u8; 8192];
    let mut b = vec![0u8; 8192];
    let max = p.nics[0].limits.max_mr_size;
    // SAFETY: the vectors outlive the registrations.
    let ma = unsafe { RegionMrs::register(&p.pds[0], a.as_mut_ptr() as u64, 8192, max) }.unwrap();
    // SAFETY: as above.
    let mb = unsafe { RegionMrs::register(&p.pds[1], b.as_mut_ptr() as u64, 8192, max) }.unwrap();
    let (a0, b0) = (a.as_ptr() as u64, b.as_ptr() as u64);
    let lkey = ma.lkey(a0, 4096).unwrap();
    let rkey = mb.rkey(b0, 4096).unwrap();
    // Out of the region's range: refused by the target NIC, and the next
    // work request is flushed.
    post(
        &p.qps[0],
        1,
        sys::WR_RDMA_WRITE,
        (a0, 4096, lkey),
        (b0 + 6000, rkey),
        0,
    );
    post(
        &p.qps[0],
        2,
        sys::WR_RDMA_WRITE,
        (a0, 4096, lkey),
        (b0, rkey),
        0,
    );
    let wc = completions(&p.cqs[0], 2);
    assert_eq!(
        wc.iter().map(|w| (w.wr_id, w.status)).collect::<Vec<_>>(),
        vec![(1, sys::WC_REM_ACCESS_ERR), (2, sys::WC_WR_FLUSH_ERR)],
        "{}",
        fake().path
    );
    assert!(b.iter().all(|&x| x == 0), "no byte landed");
    drop((ma, mb));

    // A deregistered region is refused on the NIC.
    let p = pair();
    // SAFETY: as above.
    let ma = unsafe { RegionMrs::register(&p.pds[0], a.as_mut_ptr() as u64, 8192, max) }.unwrap();
    // SAFETY: as above.
    let mb = unsafe { RegionMrs::register(&p.pds[1], b.as_mut_ptr() as u64, 8192, max) }.unwrap();
    let rkey = mb.rkey(b0, 4096).unwrap();
    drop(mb);
    post(
        &p.qps[0],
        3,
        sys::WR_RDMA_WRITE,
        (a0, 4096, ma.lkey(a0, 4096).unwrap()),
        (b0, rkey),
        0,
    );
    let wc = completions(&p.cqs[0], 1);
    assert_eq!((wc[0].wr_id, wc[0].status), (3, sys::WC_REM_ACCESS_ERR));
    assert!(b.iter().all(|&x| x == 0), "no byte landed");
    drop(ma);
}

#[test]
fn dead_link_fails_work_and_error_state_flushes() {
    let _alone = exclusive();
    let p = pair();
    let mut a = vec![1u8; 4096];
    let mut b = vec![0u8; 4096];
    let max = p.nics[0].limits.max_mr_size;
    // SAFETY: the vectors outlive the registrations.
    let ma = unsafe { RegionMrs::register(&p.pds[0], a.as_mut_ptr() as u64, 4096, max) }.unwrap();
    // SAFETY: as above.
    let mb = unsafe { RegionMrs::register(&p.pds[1], b.as_mut_ptr() as u64, 4096, max) }.unwrap();
    let (a0, b0) = (a.as_ptr() as u64, b.as_ptr() as u64);
    let local = (a0, 4096, ma.lkey(a0, 4096).unwrap());
    let remote = (b0, mb.rkey(b0, 4096).unwrap());

    fake().drop_link("fake_mlx5_1", true);
    let started = Instant::now();
    post(&p.qps[0], 1, sys::WR_RDMA_WRITE, local, remote, 0);
    let wc = completions(&p.cqs[0], 1);
    fake().drop_link("fake_mlx5_1", false);
    assert_eq!(wc[0].status, sys::WC_RETRY_EXC_ERR);
    assert!(started.elapsed() < Duration::from_secs(5));

    // The target QP, moved to ERR, flushes its posted receive.
    post_recv(&p.qps[1], 9, (b0, 64, mb.lkey(b0, 64).unwrap()));
    connect::to_error(&p.qps[1]).unwrap();
    let wc = completions(&p.cqs[1], 1);
    assert_eq!((wc[0].wr_id, wc[0].status), (9, sys::WC_WR_FLUSH_ERR));
    drop((ma, mb));
}

#[test]
fn completion_channel_wakes_a_sleeping_poller() {
    let _alone = exclusive();
    let nics = nics();
    let ch = nics[0].ctx.comp_channel().unwrap();
    let cq = nics[0].ctx.create_cq(16, Some(&ch)).unwrap();
    let pd = nics[0].ctx.alloc_pd().unwrap();
    let peer_pd = nics[1].ctx.alloc_pd().unwrap();
    let peer_cq = nics[1].ctx.create_cq(16, None).unwrap();
    let cap = sys::QpCap {
        max_send_wr: 4,
        max_recv_wr: 4,
        max_send_sge: 1,
        max_recv_sge: 1,
        max_inline_data: 0,
    };
    let qp = pd.create_rc_qp(&cq, &cq, cap).unwrap();
    let peer = peer_pd.create_rc_qp(&peer_cq, &peer_cq, cap).unwrap();
    let t = Timing::default();
    connect::connect(&qp, &nics[0], 1, &connect::address(&peer, &nics[1], 2), t).unwrap();
    connect::connect(&peer, &nics[1], 2, &connect::address(&qp, &nics[0], 1), t).unwrap();
    let mut a = vec![7u8; 4096];
    let mut b = vec![0u8; 4096];
    let max = nics[0].limits.max_mr_size;
    // SAFETY: the vectors outlive the registrations.
    let ma = unsafe { RegionMrs::register(&pd, a.as_mut_ptr() as u64, 4096, max) }.unwrap();
    // SAFETY: as above.
    let mb = unsafe { RegionMrs::register(&peer_pd, b.as_mut_ptr() as u64, 4096, max) }.unwrap();
    let (a0, b0) = (a.as_ptr() as u64, b.as_ptr() as u64);

    cq.arm().unwrap();
    post(
        &qp,
        5,
        sys::WR_RDMA_WRITE,
        (a0, 4096, ma.lkey(a0, 4096).unwrap()),
        (b0, mb.rkey(b0, 4096).unwrap()),
        0,
    );
    let mut pfd = libc::pollfd {
        fd: ch.fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one live pollfd.
    let ready = unsafe { libc::poll(&mut pfd, 1, 10_000) };
    assert_eq!(ready, 1, "the channel's fd became readable");
    assert!(ch.take_event(&cq));
    let wc = completions(&cq, 1);
    assert_eq!((wc[0].wr_id, wc[0].status), (5, sys::WC_SUCCESS));
    assert!(b.iter().all(|&x| x == 7));
    drop((ma, mb));
}
