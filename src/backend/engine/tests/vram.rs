//! GPU memory on the fake CUDA driver: registration checks, device copies
//! in one process (VRAM to VRAM, to and from DRAM, mixed plans), the
//! notification after the device finished, deregistration and release
//! waiting for queued copies.

use super::*;
use crate::common::memory::{DRAM_SEG, VRAM_SEG};
use crate::cuda::testing::{DeviceBuffer, fake};

/// The paths GPU memory takes between two engines of this process: the
/// in-process copy (device copies), and TCP (staged through pinned host
/// buffers on both ends).
const PATHS: [&[(&str, &str)]; 2] = [&[], &[("protocol", "tcp"), ("ip_addr", "127.0.0.1")]];

/// Test `$name`: `$on(path)` for every path of [`PATHS`].
macro_rules! on_every_path {
    ($name:ident, $on:ident) => {
        #[test]
        fn $name() {
            for path in PATHS {
                $on(path);
            }
        }
    };
}

/// Asserts `got == want` without printing megabytes: names the first
/// differing byte. Extra arguments format the message.
macro_rules! same_bytes {
    ($got:expr, $want:expr, $($what:tt)+) => {{
        let (got, want): (&[u8], &[u8]) = (&$got[..], &$want[..]);
        if got != want {
            let at = got.iter().zip(want).position(|(a, b)| a != b);
            panic!(
                "{}: {} bytes, expected {}; first difference at {:?}",
                format!($($what)+),
                got.len(),
                want.len(),
                at
            );
        }
    }};
}

/// Engines `a` and `b` with progress threads on `path`, `a` knowing `b`.
fn connected(a: &str, b: &str, path: &[(&str, &str)]) -> (Engine, Engine) {
    let (ea, eb) = (engine_with(a, true, path), engine_with(b, true, path));
    ea.load_remote_conn_info(b.as_bytes(), eb.conn_info())
        .unwrap();
    (ea, eb)
}

pub(super) fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

/// Device memory of `ordinal` holding `data`.
pub(super) fn device_with(ordinal: i32, data: &[u8]) -> DeviceBuffer {
    let buf = fake().alloc(ordinal, data.len());
    fake().write(buf.ptr, data);
    buf
}

/// Registers `[addr, addr+len)` of `mem_type` on `owner` (agent `name`)
/// and loads it on `a`: returns (owner's id, `a`'s remote id).
pub(super) fn share(
    a: &Engine,
    owner: &Engine,
    name: &[u8],
    addr: u64,
    len: usize,
    mem: u32,
    dev: u64,
) -> (MdId, MdId) {
    let md = owner.register_mem(addr, len as u64, mem, dev).unwrap();
    let blob = owner.public_data(md).unwrap();
    let remote = a
        .load_remote_md(addr, len as u64, mem, &blob, name)
        .unwrap();
    (md, remote)
}

pub(super) fn desc(addr: u64, len: usize, md: MdId) -> Desc {
    Desc {
        addr,
        len: len as u64,
        md,
    }
}

#[test]
fn registration_checks_device_memory_device_and_allocation_bounds() {
    let gpu = fake();
    let e = engine("Reg", false);
    let buf = gpu.alloc(1, 1 << 20);
    // The whole allocation, and a range at an offset inside it.
    let whole = e.register_mem(buf.ptr, 1 << 20, VRAM_SEG, 1).unwrap();
    let inner = e.register_mem(buf.ptr + 4096, 8192, VRAM_SEG, 1).unwrap();
    // Another device than the memory's.
    match e.register_mem(buf.ptr, 4096, VRAM_SEG, 0) {
        Err(Error::InvalidParam(m)) => assert!(m.contains("device 1, not of devId 0"), "{m}"),
        other => panic!("wrong devId accepted: {other:?}"),
    }
    // Past the end of the allocation.
    match e.register_mem(buf.ptr + 4096, 1 << 20, VRAM_SEG, 1) {
        Err(Error::InvalidParam(m)) => assert!(m.contains("crosses the end"), "{m}"),
        other => panic!("a range past the allocation accepted: {other:?}"),
    }
    // Host memory claimed to be VRAM.
    let host = vec![0u8; 4096];
    match e.register_mem(host.as_ptr() as u64, 4096, VRAM_SEG, 0) {
        Err(Error::InvalidParam(m)) => assert!(m.contains("not GPU memory"), "{m}"),
        other => panic!("host memory accepted as VRAM: {other:?}"),
    }
    // A devId no int can hold, and a null address.
    assert!(matches!(
        e.register_mem(buf.ptr, 4096, VRAM_SEG, 1 << 40),
        Err(Error::InvalidParam(_))
    ));
    assert!(matches!(
        e.register_mem(0, 4096, VRAM_SEG, 0),
        Err(Error::InvalidParam(_))
    ));
    e.deregister_mem(inner).unwrap();
    e.deregister_mem(whole).unwrap();
}

on_every_path!(
    vram_to_vram_and_vram_with_dram_both_directions,
    vram_to_vram_and_vram_with_dram_both_directions_on
);

fn vram_to_vram_and_vram_with_dram_both_directions_on(path: &[(&str, &str)]) {
    let gpu = fake();
    let _knobs = gpu.exclusive();
    gpu.set_copy_delay_us(0);
    let (a, b) = connected("GA", "GB", path);
    let len = (3 << 20) + 123;
    let src = pattern(len, 1);
    // A's VRAM (device 0) and DRAM; B's VRAM (device 1) and DRAM.
    let a_gpu = device_with(0, &src);
    let a_host = pattern(len, 2);
    let b_gpu = device_with(1, &vec![0u8; len]);
    let mut b_host = vec![0u8; len];
    let a_gpu_md = a.register_mem(a_gpu.ptr, len as u64, VRAM_SEG, 0).unwrap();
    let a_host_md = a
        .register_mem(a_host.as_ptr() as u64, len as u64, DRAM_SEG, 0)
        .unwrap();
    let (_, b_gpu_r) = share(&a, &b, b"GB", b_gpu.ptr, len, VRAM_SEG, 1);
    let (_, b_host_r) = share(&a, &b, b"GB", b_host.as_mut_ptr() as u64, len, DRAM_SEG, 0);

    // VRAM -> VRAM (WRITE), with a notification.
    let id = a
        .prep_xfer(
            Op::Write,
            &[desc(a_gpu.ptr, len, a_gpu_md)],
            &[desc(b_gpu.ptr, len, b_gpu_r)],
            b"GB",
        )
        .unwrap();
    let _ = a.post_xfer(id, Some(b"v2v")).unwrap();
    assert_eq!(wait(&a, id), Ok(Status::Success));
    same_bytes!(gpu.read(b_gpu.ptr, len), src, "VRAM to VRAM");
    assert_eq!(
        notifs_until(&b, 1),
        vec![(AgentName::from("GA"), b"v2v".to_vec())]
    );
    a.release_req(id).unwrap();

    // DRAM -> remote VRAM (WRITE), then remote VRAM -> local VRAM (READ)
    // of what was written, at offsets.
    let id = a
        .prep_xfer(
            Op::Write,
            &[desc(a_host.as_ptr() as u64, len, a_host_md)],
            &[desc(b_gpu.ptr, len, b_gpu_r)],
            b"GB",
        )
        .unwrap();
    let _ = a.post_xfer(id, None).unwrap();
    assert_eq!(wait(&a, id), Ok(Status::Success));
    same_bytes!(gpu.read(b_gpu.ptr, len), a_host, "DRAM to VRAM");
    a.release_req(id).unwrap();
    let id = a
        .prep_xfer(
            Op::Read,
            &[desc(a_gpu.ptr + 5, len - 10, a_gpu_md)],
            &[desc(b_gpu.ptr + 3, len - 10, b_gpu_r)],
            b"GB",
        )
        .unwrap();
    let _ = a.post_xfer(id, None).unwrap();
    assert_eq!(wait(&a, id), Ok(Status::Success));
    let got = gpu.read(a_gpu.ptr, len);
    same_bytes!(
        &got[5..len - 5],
        &a_host[3..len - 7],
        "READ VRAM to VRAM at offsets"
    );
    same_bytes!(&got[..5], &src[..5], "nothing before the range");
    same_bytes!(&got[len - 5..], &src[len - 5..], "nothing after the range");
    a.release_req(id).unwrap();

    // Remote DRAM -> local VRAM (READ), VRAM -> remote DRAM (WRITE).
    let id = a
        .prep_xfer(
            Op::Read,
            &[desc(a_gpu.ptr, len, a_gpu_md)],
            &[desc(b_host.as_ptr() as u64, len, b_host_r)],
            b"GB",
        )
        .unwrap();
    let _ = a.post_xfer(id, None).unwrap();
    assert_eq!(wait(&a, id), Ok(Status::Success));
    same_bytes!(
        gpu.read(a_gpu.ptr, len),
        vec![0u8; len],
        "DRAM to VRAM by READ"
    );
    a.release_req(id).unwrap();
    gpu.write(a_gpu.ptr, &src);
    let id = a
        .prep_xfer(
            Op::Write,
            &[desc(a_gpu.ptr, len, a_gpu_md)],
            &[desc(b_host.as_ptr() as u64, len, b_host_r)],
            b"GB",
        )
        .unwrap();
    let _ = a.post_xfer(id, None).unwrap();
    assert_eq!(wait(&a, id), Ok(Status::Success));
    same_bytes!(b_host, src, "VRAM to DRAM");
    a.release_req(id).unwrap();
}

on_every_path!(
    a_mixed_plan_of_host_and_device_segments_moves_every_byte,
    a_mixed_plan_of_host_and_device_segments_moves_every_byte_on
);

fn a_mixed_plan_of_host_and_device_segments_moves_every_byte_on(path: &[(&str, &str)]) {
    let gpu = fake();
    // Alone: the fake's count of pending copies is global, and other tests
    // wait for theirs to show.
    let _knobs = gpu.exclusive();
    let (a, b) = connected("MA", "MB", path);
    let block = 4096 + 17;
    let n = 64;
    let len = block * n;
    let src_host = pattern(len, 5);
    let src_gpu = device_with(0, &pattern(len, 9));
    let dst_host = vec![0u8; len];
    let dst_gpu = device_with(1, &vec![0u8; len]);
    let host_md = a
        .register_mem(src_host.as_ptr() as u64, len as u64, DRAM_SEG, 0)
        .unwrap();
    let gpu_md = a
        .register_mem(src_gpu.ptr, len as u64, VRAM_SEG, 0)
        .unwrap();
    let (_, dh) = share(&a, &b, b"MB", dst_host.as_ptr() as u64, len, DRAM_SEG, 0);
    let (_, dg) = share(&a, &b, b"MB", dst_gpu.ptr, len, VRAM_SEG, 1);
    // Block i goes host->host, host->gpu, gpu->host or gpu->gpu by i % 4.
    let (mut local, mut remote) = (Vec::new(), Vec::new());
    for i in 0..n {
        let off = (i * block) as u64;
        let (l, r) = match i % 4 {
            0 => (
                desc(src_host.as_ptr() as u64 + off, block, host_md),
                desc(dst_host.as_ptr() as u64 + off, block, dh),
            ),
            1 => (
                desc(src_host.as_ptr() as u64 + off, block, host_md),
                desc(dst_gpu.ptr + off, block, dg),
            ),
            2 => (
                desc(src_gpu.ptr + off, block, gpu_md),
                desc(dst_host.as_ptr() as u64 + off, block, dh),
            ),
            _ => (
                desc(src_gpu.ptr + off, block, gpu_md),
                desc(dst_gpu.ptr + off, block, dg),
            ),
        };
        local.push(l);
        remote.push(r);
    }
    let id = a.prep_xfer(Op::Write, &local, &remote, b"MB").unwrap();
    let _ = a.post_xfer(id, Some(b"mixed")).unwrap();
    assert_eq!(wait(&a, id), Ok(Status::Success));
    assert_eq!(notifs_until(&b, 1).len(), 1);
    let (gsrc, gdst) = (gpu.read(src_gpu.ptr, len), gpu.read(dst_gpu.ptr, len));
    for i in 0..n {
        let r = i * block..(i + 1) * block;
        let want = if i % 4 < 2 {
            &src_host[r.clone()]
        } else {
            &gsrc[r.clone()]
        };
        let got = if i % 4 == 0 || i % 4 == 2 {
            &dst_host[r.clone()]
        } else {
            &gdst[r.clone()]
        };
        same_bytes!(got, want, "block {i} (kind pair {})", i % 4);
    }
}

on_every_path!(
    the_notification_arrives_only_after_the_device_finished_copying,
    the_notification_arrives_only_after_the_device_finished_copying_on
);

fn the_notification_arrives_only_after_the_device_finished_copying_on(path: &[(&str, &str)]) {
    let gpu = fake();
    let _knobs = gpu.exclusive();
    // Every device copy takes 2 ms: a notification sent when the copies
    // were queued (not finished) would arrive before the data.
    gpu.set_copy_delay_us(2000);
    let (a, b) = connected("NA", "NB", path);
    let (block, n) = (64 << 10, 16);
    let len = block * n;
    let src = device_with(0, &pattern(len, 3));
    let dst = device_with(1, &vec![0u8; len]);
    let smd = a.register_mem(src.ptr, len as u64, VRAM_SEG, 0).unwrap();
    let (_, dmd) = share(&a, &b, b"NB", dst.ptr, len, VRAM_SEG, 1);
    let local: Vec<Desc> = (0..n)
        .map(|i| desc(src.ptr + (i * block) as u64, block, smd))
        .collect();
    let remote: Vec<Desc> = (0..n)
        .map(|i| desc(dst.ptr + (i * block) as u64, block, dmd))
        .collect();
    let id = a.prep_xfer(Op::Write, &local, &remote, b"NB").unwrap();
    for round in 0..3u8 {
        gpu.write(src.ptr, &pattern(len, round));
        let _ = a.post_xfer(id, Some(&[round])).unwrap();
        // Poll only the receiver: the moment the notification shows, every
        // byte must be in place.
        let got = notifs_until(&b, 1);
        assert_eq!(got, vec![(AgentName::from("NA"), vec![round])]);
        same_bytes!(
            gpu.read(dst.ptr, len),
            pattern(len, round),
            "round {round}: notified before the data landed"
        );
        assert_eq!(wait(&a, id), Ok(Status::Success));
    }
    gpu.set_copy_delay_us(0);
}

#[test]
fn a_write_frame_of_gpu_memory_goes_out_while_the_device_copies_the_rest() {
    // Over TCP the initiator's WRITE frames of GPU memory are pipelined:
    // the target holds the frame's first bytes while the device is still
    // copying later pieces out of the frame. (Staged whole, nothing of a
    // frame would be sent before its last copy.)
    let gpu = fake();
    let _knobs = gpu.exclusive();
    let (a, b) = connected("PA", "PB", PATHS[1]);
    // One frame of 16 ranges, one device copy each, in reverse order so that
    // no two are adjacent.
    let (block, n) = (64 << 10, 16);
    let len = block * n;
    let data = pattern(len, 5);
    let src = device_with(0, &data);
    let dst = vec![0u8; len];
    let smd = a.register_mem(src.ptr, len as u64, VRAM_SEG, 0).unwrap();
    let (_, dmd) = share(&a, &b, b"PB", dst.as_ptr() as u64, len, DRAM_SEG, 0);
    let local: Vec<Desc> = (0..n)
        .map(|i| desc(src.ptr + ((n - 1 - i) * block) as u64, block, smd))
        .collect();
    let remote: Vec<Desc> = (0..n)
        .map(|i| desc(dst.as_ptr() as u64 + (i * block) as u64, block, dmd))
        .collect();
    let id = a.prep_xfer(Op::Write, &local, &remote, b"PB").unwrap();
    gpu.set_copy_delay_us(20_000);
    let before = gpu.copies();
    let _ = a.post_xfer(id, None).unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    let overlapped = loop {
        // SAFETY: a byte of our own buffer, which the target's receive may
        // be writing meanwhile (read as it is, never through a reference).
        let first = unsafe { std::ptr::read_volatile(dst.as_ptr()) };
        let copied = gpu.copies() - before;
        if first != 0 {
            break copied < n as u64;
        }
        assert!(Instant::now() < deadline, "no byte of the frame arrived");
        std::thread::sleep(Duration::from_millis(1));
    };
    assert_eq!(wait(&a, id), Ok(Status::Success));
    gpu.set_copy_delay_us(0);
    let want: Vec<u8> = (0..n)
        .flat_map(|i| data[(n - 1 - i) * block..(n - i) * block].to_vec())
        .collect();
    same_bytes!(dst, want, "the frame");
    assert!(
        overlapped,
        "the frame's first bytes arrived only after every device copy of it"
    );
}

/// Posts a device copy while the fake's streams are paused (so it stays
/// queued on the device), then runs `act` on another thread: `act` must
/// not return while the copy is queued, and after it returned no byte of
/// the copy may land (over TCP: no byte of the source goes on the wire);
/// then the link still works.
fn while_a_copy_is_queued(path: &[(&str, &str)], act: impl FnOnce(&Engine, MdId, ReqId) + Send) {
    let gpu = fake();
    let _knobs = gpu.exclusive();
    let (a, b) = connected("QA", "QB", path);
    // More than postXfer moves inline: the progress thread queues it.
    let len = 4 << 20;
    let src = device_with(0, &pattern(len, 7));
    let dst = device_with(1, &vec![0u8; len]);
    let smd = a.register_mem(src.ptr, len as u64, VRAM_SEG, 0).unwrap();
    let (_, dmd) = share(&a, &b, b"QB", dst.ptr, len, VRAM_SEG, 1);
    let id = a
        .prep_xfer(
            Op::Write,
            &[desc(src.ptr, len, smd)],
            &[desc(dst.ptr, len, dmd)],
            b"QB",
        )
        .unwrap();
    let paused = gpu.pause_streams();
    assert_eq!(a.post_xfer(id, None), Ok(Status::InProg));
    let deadline = Instant::now() + Duration::from_secs(60);
    while gpu.pending_copies() == 0 {
        assert!(
            Instant::now() < deadline,
            "the progress thread never queued the copy"
        );
        std::thread::yield_now();
    }
    let done = AtomicU64::new(0);
    std::thread::scope(|s| {
        let acting = s.spawn(|| {
            act(&a, smd, id);
            done.store(1, Ordering::SeqCst);
        });
        // The copy is queued on the device: the act must wait for it.
        for _ in 0..50 {
            std::thread::sleep(Duration::from_millis(2));
            assert_eq!(
                done.load(Ordering::SeqCst),
                0,
                "returned while a copy was queued on the device"
            );
        }
        drop(paused);
        acting.join().unwrap();
    });
    // Whatever ran, ran before the act returned: nothing changes after.
    let bytes = gpu.read(dst.ptr, len);
    std::thread::sleep(Duration::from_millis(20));
    same_bytes!(
        gpu.read(dst.ptr, len),
        bytes,
        "a copy landed after the act returned"
    );
    // The link is still in step (over TCP a frame cut short goes on whole,
    // as zeros): a WRITE to other memory of the peer lands whole.
    let again = device_with(0, &pattern(len, 9));
    let other = device_with(1, &vec![0u8; len]);
    let amd = a.register_mem(again.ptr, len as u64, VRAM_SEG, 0).unwrap();
    let (_, omd) = share(&a, &b, b"QB", other.ptr, len, VRAM_SEG, 1);
    let next = a
        .prep_xfer(
            Op::Write,
            &[desc(again.ptr, len, amd)],
            &[desc(other.ptr, len, omd)],
            b"QB",
        )
        .unwrap();
    let _ = a.post_xfer(next, None).unwrap();
    assert_eq!(wait(&a, next), Ok(Status::Success));
    same_bytes!(
        gpu.read(other.ptr, len),
        pattern(len, 9),
        "a WRITE after the act"
    );
}

#[test]
fn deregistration_waits_for_copies_queued_on_the_device() {
    for path in PATHS {
        while_a_copy_is_queued(path, |a, smd, _| a.deregister_mem(smd).unwrap());
    }
}

#[test]
fn release_in_flight_waits_for_copies_queued_on_the_device() {
    for path in PATHS {
        while_a_copy_is_queued(path, |a, _, id| a.release_req(id).unwrap());
    }
}

on_every_path!(
    a_prepped_20000_block_read_with_a_notification_reposted,
    a_prepped_20000_block_read_with_a_notification_reposted_on
);

fn a_prepped_20000_block_read_with_a_notification_reposted_on(path: &[(&str, &str)]) {
    // The vLLM shape: the decoder pulls many blocks with one READ and one
    // notification per request, reposting the prepped handle.
    let gpu = fake();
    // Alone: the fake's count of pending copies is global, and other tests
    // wait for theirs to show.
    let _knobs = gpu.exclusive();
    let (a, b) = connected("DA", "DB", path);
    let (block, n) = (256, 20_000);
    let len = block * n;
    let remote_data = pattern(len, 4);
    let theirs = device_with(1, &remote_data);
    let ours = device_with(0, &vec![0u8; len]);
    let our_md = a.register_mem(ours.ptr, len as u64, VRAM_SEG, 0).unwrap();
    let (_, their_md) = share(&a, &b, b"DB", theirs.ptr, len, VRAM_SEG, 1);
    // Every other block, reversed: descriptors are not contiguous.
    let picks: Vec<usize> = (0..n).rev().step_by(2).collect();
    let local: Vec<Desc> = picks
        .iter()
        .enumerate()
        .map(|(i, _)| desc(ours.ptr + (i * block) as u64, block, our_md))
        .collect();
    let remote: Vec<Desc> = picks
        .iter()
        .map(|&j| desc(theirs.ptr + (j * block) as u64, block, their_md))
        .collect();
    let id = a.prep_xfer(Op::Read, &local, &remote, b"DB").unwrap();
    let streams = gpu.live_streams();
    for round in 0..3u8 {
        let _ = a.post_xfer(id, Some(&[b'r', round])).unwrap();
        assert_eq!(wait(&a, id), Ok(Status::Success));
        assert_eq!(
            notifs_until(&b, 1),
            vec![(AgentName::from("DA"), vec![b'r', round])]
        );
    }
    let got = gpu.read(ours.ptr, len);
    for (i, &j) in picks.iter().enumerate() {
        same_bytes!(
            &got[i * block..(i + 1) * block],
            &remote_data[j * block..(j + 1) * block],
            "block {i}"
        );
    }
    assert!(
        got[picks.len() * block..].iter().all(|&x| x == 0),
        "nothing past the picked blocks"
    );
    assert!(
        gpu.live_streams() <= streams.max(8) + 8,
        "streams are pooled, not made per post"
    );
}

#[test]
fn gpu_memory_without_an_ipc_handle_is_refused_under_protocol_cma() {
    // Under protocol=cma a same-host peer's GPU memory goes by CUDA IPC
    // only; without a handle (VMM memory, IPC disabled) nothing is staged
    // over TCP. (Two engines of this process: the probe succeeds on our own
    // pid, and the driver could not open our own handle anyway.)
    let gpu = fake();
    let params = [("protocol", "cma"), ("ip_addr", "127.0.0.1")];
    let (a, b) = connected("HA", "HB", &params);
    let len = 1 << 20;
    let theirs = gpu.alloc(1, len);
    let md = b.register_mem(theirs.ptr, len as u64, VRAM_SEG, 1).unwrap();
    let mut public = RegionPublic::decode(&b.public_data(md).unwrap()).unwrap();
    assert!(
        public.ipc.is_some(),
        "cuMemAlloc memory is published with its IPC handle"
    );
    public.ipc = None;
    let remote = a
        .load_remote_md(theirs.ptr, len as u64, VRAM_SEG, &public.encode(), b"HB")
        .unwrap();
    let ours = vec![7u8; len];
    let local = a
        .register_mem(ours.as_ptr() as u64, len as u64, DRAM_SEG, 0)
        .unwrap();
    let id = a
        .prep_xfer(
            Op::Write,
            &[desc(ours.as_ptr() as u64, len, local)],
            &[desc(theirs.ptr, len, remote)],
            b"HB",
        )
        .unwrap();
    match a.post_xfer(id, None).and_then(|_| wait(&a, id)) {
        Err(Error::NotSupported(m)) => assert!(m.contains("protocol=cma"), "{m}"),
        other => panic!("cma without an IPC handle: {other:?}"),
    }
    same_bytes!(gpu.read(theirs.ptr, len), vec![0u8; len], "nothing moved");
}

/// Engines `a` and `b` of this process under `protocol=cma`, `a` having
/// loaded `b`'s VMM region `theirs` (`len` bytes on device 1, `chunks`
/// chunks, created shareable or not) and registered a DRAM buffer `ours`.
struct VmmPair {
    a: Engine,
    b: Engine,
    theirs: crate::cuda::testing::VmmBuffer,
    their_md: MdId,
    remote: MdId,
    ours: Vec<u8>,
    local: MdId,
}

fn vmm_pair(chunks: usize, shareable: bool) -> VmmPair {
    let gpu = fake();
    // Under protocol=cma a same-host peer's GPU memory goes by CUDA IPC
    // only. (Two engines of this process: the probe succeeds on our own pid,
    // and taking our own descriptors works as taking a peer's.)
    let params = [("protocol", "cma"), ("ip_addr", "127.0.0.1")];
    let (a, b) = connected("VA", "VB", &params);
    let theirs = gpu.alloc_vmm(1, CHUNK, chunks, shareable);
    let len = theirs.len;
    let their_md = b.register_mem(theirs.ptr, len as u64, VRAM_SEG, 1).unwrap();
    let blob = b.public_data(their_md).unwrap();
    let remote = a
        .load_remote_md(theirs.ptr, len as u64, VRAM_SEG, &blob, b"VB")
        .unwrap();
    let ours: Vec<u8> = (0..len).map(|i| (i * 31 + 7) as u8).collect();
    let local = a
        .register_mem(ours.as_ptr() as u64, len as u64, DRAM_SEG, 0)
        .unwrap();
    VmmPair {
        a,
        b,
        theirs,
        their_md,
        remote,
        ours,
        local,
    }
}

/// The fake's VMM chunks of the pair.
const CHUNK: usize = 2 << 20;

impl VmmPair {
    /// The peer's chunks' bytes (the fake's CPU view is per chunk).
    fn theirs(&self) -> Vec<u8> {
        let gpu = fake();
        (0..self.theirs.len / CHUNK)
            .flat_map(|i| gpu.read(self.theirs.ptr + (i * CHUNK) as u64, CHUNK))
            .collect()
    }

    /// Fills the peer's chunks with `byte`.
    fn fill_theirs(&self, byte: u8) {
        for i in 0..self.theirs.len / CHUNK {
            fake().write(self.theirs.ptr + (i * CHUNK) as u64, &vec![byte; CHUNK]);
        }
    }

    /// Prepares `op` of `len` bytes from offset `off` of both buffers.
    fn prep(&self, op: Op, off: usize, len: usize) -> ReqId {
        let at = |base: u64| base + off as u64;
        self.a
            .prep_xfer(
                op,
                &[desc(at(self.ours.as_ptr() as u64), len, self.local)],
                &[desc(at(self.theirs.ptr), len, self.remote)],
                b"VB",
            )
            .unwrap()
    }
}

#[test]
fn vmm_chunks_shared_by_descriptor_are_mapped_by_a_same_host_peer() {
    let gpu = fake();
    let _alone = gpu.exclusive();
    let p = vmm_pair(3, true);
    let public = RegionPublic::decode(&p.b.public_data(p.their_md).unwrap()).unwrap();
    let vmm = public.vmm.expect("shareable VMM chunks are published");
    assert_eq!(vmm.pieces.len(), 3);
    // Their descriptors are open here while the region is registered.
    let open = crate::common::memory::VmmShared::open_fds();
    assert!(open >= 3);
    assert!(public.ipc.is_none());
    let imports = gpu.live_vmm_imports();
    // A WRITE across both chunk boundaries, at unaligned offsets, then a
    // READ of it back into another part of our buffer.
    let (off, len) = (1000, p.theirs.len - 3000);
    let id = p.prep(Op::Write, off, len);
    p.a.post_xfer(id, Some(b"vmm")).unwrap();
    assert_eq!(wait(&p.a, id), Ok(Status::Success));
    let got = p.theirs();
    same_bytes!(got[off..off + len], p.ours[off..off + len], "written");
    assert!(got[..off].iter().all(|&x| x == 0), "nothing before");
    assert!(got[off + len..].iter().all(|&x| x == 0), "nothing after");
    assert_eq!(
        gpu.live_vmm_imports(),
        imports + 3,
        "the three chunks were mapped here, once"
    );
    p.fill_theirs(0x5a);
    let back = p.prep(Op::Read, 4096, 3 << 20);
    p.a.post_xfer(back, None).unwrap();
    assert_eq!(wait(&p.a, back), Ok(Status::Success));
    assert!(p.ours[4096..4096 + (3 << 20)].iter().all(|&x| x == 0x5a));
    assert_eq!(gpu.live_vmm_imports(), imports + 3, "the mapping is reused");
    // Deregistered by its owner: its descriptors are closed; refused,
    // nothing lands.
    p.b.deregister_mem(p.their_md).unwrap();
    assert_eq!(crate::common::memory::VmmShared::open_fds(), open - 3);
    p.fill_theirs(0);
    // (Refused at the post, or when the job finds it: the route's view of
    // the region may be new or cached.)
    let refused = p.a.post_xfer(id, None).and_then(|_| wait(&p.a, id));
    assert!(matches!(refused, Err(Error::NotAllowed(_))), "{refused:?}");
    assert!(p.theirs().iter().all(|&x| x == 0));
    // Closed once the requests that used them are released.
    let _ = p.a.release_req(id); // (it reports the request's failure)
    p.a.release_req(back).unwrap();
    assert_eq!(
        gpu.live_vmm_imports(),
        imports,
        "the mappings of a deregistered region are closed"
    );
}

#[test]
fn vmm_chunks_without_the_descriptor_handle_type_are_refused_under_protocol_cma() {
    let p = vmm_pair(2, false);
    let public = RegionPublic::decode(&p.b.public_data(p.their_md).unwrap()).unwrap();
    assert!(
        public.vmm.is_none() && public.ipc.is_none(),
        "nothing to share"
    );
    let id = p.prep(Op::Write, 0, p.theirs.len);
    match p.a.post_xfer(id, None).and_then(|_| wait(&p.a, id)) {
        Err(Error::NotSupported(m)) => assert!(m.contains("protocol=cma"), "{m}"),
        other => panic!("cma without shareable chunks: {other:?}"),
    }
    same_bytes!(p.theirs(), vec![0u8; p.theirs.len], "nothing moved");
}

#[test]
fn unloading_a_vmm_region_closes_its_mapping() {
    let gpu = fake();
    let _alone = gpu.exclusive();
    let p = vmm_pair(2, true);
    let imports = gpu.live_vmm_imports();
    let id = p.prep(Op::Write, 0, p.theirs.len);
    p.a.post_xfer(id, None).unwrap();
    assert_eq!(wait(&p.a, id), Ok(Status::Success));
    p.a.release_req(id).unwrap();
    assert_eq!(gpu.live_vmm_imports(), imports + 2, "mapped, and kept");
    p.a.unload_md(p.remote).unwrap();
    assert_eq!(
        gpu.live_vmm_imports(),
        imports,
        "closed with the unloaded region: the peer's memory is not held"
    );
}
