//! GPUDirect RDMA on the fakes: GPU memory of the fake CUDA driver exported
//! as dmabufs and registered on the fake NIC, so the NIC moves it between
//! engines without staging, never the CPU; without dmabuf support GPU
//! memory is refused under `protocol=rdma` and staged over TCP under `auto`.

use super::vram::{desc as d, device_with, pattern, share};
use super::*;
use crate::common::memory::{DRAM_SEG, VRAM_SEG};
use crate::cuda::testing::fake as gpu;
use crate::transport::rdma::testing;

const RDMA: &[(&str, &str)] = &[
    ("protocol", "rdma"),
    ("ip_addr", "127.0.0.1"),
    ("device_name", "fake_mlx5_0"),
];

fn moved(a: &Engine, op: Op, local: Desc, remote: Desc, notif: Option<&[u8]>) -> Result<Status> {
    let id = a.prep_xfer(op, &[local], &[remote], b"GB")?;
    let out = a.post_xfer(id, notif).and_then(|_| wait(a, id));
    a.release_req(id).unwrap();
    out
}

#[test]
fn gpu_memory_crosses_the_nic_directly() {
    let g = gpu();
    let _alone = g.exclusive();
    let (a, b) = (engine_with("GA", true, RDMA), engine_with("GB", true, RDMA));
    a.load_remote_conn_info(b"GB", b.conn_info()).unwrap();
    let dmabufs = testing::fake().live_dmabuf_mrs();
    let len = 4 << 20;
    let data = pattern(len, 3);
    let src = device_with(0, &data);
    let dst = device_with(1, &vec![0u8; len]);
    let back = device_with(0, &vec![0u8; len]);
    let smd = a.register_mem(src.ptr, len as u64, VRAM_SEG, 0).unwrap();
    let bmd = a.register_mem(back.ptr, len as u64, VRAM_SEG, 0).unwrap();
    let (dmd, dremote) = share(&a, &b, b"GB", dst.ptr, len, VRAM_SEG, 1);
    assert!(
        testing::fake().live_dmabuf_mrs() >= dmabufs + 3,
        "each GPU region registered on the NIC as a dmabuf"
    );
    let route = route_of(&a, "GB");
    assert!(route.serves(MemKind::Vram { device: 0 }, MemKind::Vram { device: 1 }));

    // WRITE with a notification: every byte is there when it shows, and
    // the bytes went through the NIC (no staging, no CPU).
    let sent = testing::fake().bytes("fake_mlx5_0", false);
    let flushes = g.rdma_flushes();
    let id = a
        .prep_xfer(
            Op::Write,
            &[d(src.ptr, len, smd)],
            &[d(dst.ptr, len, dremote)],
            b"GB",
        )
        .unwrap();
    a.post_xfer(id, Some(b"in VRAM")).unwrap();
    assert_eq!(notifs_until(&b, 1)[0].1, b"in VRAM");
    assert!(
        g.read(dst.ptr, len) == data,
        "the data was in place at the notification"
    );
    assert!(
        g.rdma_flushes() > flushes,
        "flushed before the notification was delivered"
    );
    assert_eq!(wait(&a, id), Ok(Status::Success));
    a.release_req(id).unwrap();
    assert!(testing::fake().bytes("fake_mlx5_0", false) >= sent + len as u64);

    // READ back into our GPU memory, and into host memory; a WRITE from
    // host memory; a WRITE small enough to go inline from host memory
    // (never from GPU memory: the CPU would read it).
    let flushes = g.rdma_flushes();
    assert_eq!(
        moved(
            &a,
            Op::Read,
            d(back.ptr, len, bmd),
            d(dst.ptr, len, dremote),
            None
        ),
        Ok(Status::Success)
    );
    assert!(g.read(back.ptr, len) == data, "READ into GPU memory");
    assert!(
        g.rdma_flushes() > flushes,
        "flushed before the READ was done"
    );
    let host = vec![0u8; len];
    let hmd = a
        .register_mem(host.as_ptr() as u64, len as u64, DRAM_SEG, 0)
        .unwrap();
    assert_eq!(
        moved(
            &a,
            Op::Read,
            d(host.as_ptr() as u64, len, hmd),
            d(dst.ptr, len, dremote),
            None
        ),
        Ok(Status::Success)
    );
    assert!(host == data, "READ of GPU memory into host memory");
    let other = pattern(len, 9);
    // SAFETY: our own registered buffer, no transfer runs on it now.
    unsafe { std::ptr::copy_nonoverlapping(other.as_ptr(), host.as_ptr() as *mut u8, len) };
    assert_eq!(
        moved(
            &a,
            Op::Write,
            d(host.as_ptr() as u64, len, hmd),
            d(dst.ptr, len, dremote),
            None
        ),
        Ok(Status::Success)
    );
    assert!(
        g.read(dst.ptr, len) == other,
        "WRITE from host memory into GPU memory"
    );
    for n in [1usize, 32, 64] {
        assert_eq!(
            moved(
                &a,
                Op::Write,
                d(src.ptr + 100, n, smd),
                d(dst.ptr + 7, n, dremote),
                None
            ),
            Ok(Status::Success)
        );
        assert!(g.read(dst.ptr + 7, n) == data[100..100 + n], "{n} bytes");
    }

    // A notification sent apart from the data (genNotif, over the TCP
    // link) is flushed for too.
    let flushes = g.rdma_flushes();
    a.gen_notif(b"GB", b"apart").unwrap();
    assert_eq!(notifs_until(&b, 1)[0].1, b"apart");
    assert!(
        g.rdma_flushes() > flushes,
        "flushed before genNotif's notification"
    );

    // Deregistered: the NIC refuses it, and the dmabuf registrations go.
    b.deregister_mem(dmd).unwrap();
    assert!(
        moved(
            &a,
            Op::Write,
            d(src.ptr, len, smd),
            d(dst.ptr, len, dremote),
            None
        )
        .is_err()
    );
    a.deregister_mem(smd).unwrap();
    a.deregister_mem(bmd).unwrap();
    assert_eq!(
        testing::fake().live_dmabuf_mrs(),
        dmabufs,
        "every dmabuf MR deregistered"
    );
}

#[test]
fn a_nic_that_refuses_the_dmabuf_is_given_the_address() {
    // (The way nvidia-peermem serves; the fake NIC, like a kernel without
    // peermem, cannot pin device memory by address: both are tried, and the
    // region stays registered with NIXL, refused under rdma.)
    let g = gpu();
    let _alone = g.exclusive();
    let _nic = testing::exclusive();
    let (a, b) = (engine_with("GA", true, RDMA), engine_with("GB", true, RDMA));
    a.load_remote_conn_info(b"GB", b.conn_info()).unwrap();
    let len = 1 << 20;
    let src = device_with(0, &pattern(len, 1));
    testing::fake().refuse_dmabuf(true);
    let refused = testing::fake().refused_registrations();
    let smd = a.register_mem(src.ptr, len as u64, VRAM_SEG, 0);
    testing::fake().refuse_dmabuf(false);
    assert_eq!(
        testing::fake().refused_registrations() - refused,
        2,
        "the dmabuf, then the address"
    );
    let smd = smd.expect("registered with NIXL without the NIC");
    let dst = vec![0u8; len];
    let (_, dremote) = share(&a, &b, b"GB", dst.as_ptr() as u64, len, DRAM_SEG, 0);
    let e = moved(
        &a,
        Op::Write,
        d(src.ptr, len, smd),
        d(dst.as_ptr() as u64, len, dremote),
        None,
    )
    .expect_err("not on the NIC, refused under rdma");
    assert!(e.message().contains("local region"), "{e:?}");
    assert!(dst.iter().all(|&x| x == 0));
}

#[test]
fn without_dmabuf_gpu_memory_is_refused_under_rdma_and_staged_under_auto() {
    let g = gpu();
    let _alone = g.exclusive();
    let _nic = testing::exclusive();
    let _no = g.refuse_dmabuf();
    let len = 1 << 20;
    let data = pattern(len, 5);
    for auto in [false, true] {
        let (a, b) = if auto {
            let e = |n: &str| {
                testing::fake();
                let params = [("ip_addr", "127.0.0.1"), ("device_name", "fake_mlx5_1")];
                Engine::with_transports(EngineConfig::new(n, &params), |c| c.other_host = true)
                    .unwrap()
            };
            (e("GA"), e("GB"))
        } else {
            (engine_with("GA", true, RDMA), engine_with("GB", true, RDMA))
        };
        a.load_remote_conn_info(b"GB", b.conn_info()).unwrap();
        let src = device_with(0, &data);
        let dst = device_with(1, &vec![0u8; len]);
        // Registration works (the NIC cannot take it: one warning line).
        let smd = a.register_mem(src.ptr, len as u64, VRAM_SEG, 0).unwrap();
        let (_, dremote) = share(&a, &b, b"GB", dst.ptr, len, VRAM_SEG, 1);
        let dev = if auto { "fake_mlx5_1" } else { "fake_mlx5_0" };
        let sent = testing::fake().bytes(dev, false);
        let out = moved(
            &a,
            Op::Write,
            d(src.ptr, len, smd),
            d(dst.ptr, len, dremote),
            None,
        );
        if auto {
            assert_eq!(out, Ok(Status::Success), "staged over TCP");
            assert!(g.read(dst.ptr, len) == data);
            assert_eq!(
                testing::fake().bytes(dev, false),
                sent,
                "nothing crossed the NIC"
            );
        } else {
            let e = out.expect_err("refused under protocol=rdma");
            assert!(e.message().contains("is not registered on"), "{e:?}");
            assert!(
                g.read(dst.ptr, len).iter().all(|&x| x == 0),
                "nothing landed"
            );
        }
    }
}
