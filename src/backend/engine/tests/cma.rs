//! The engine over cross-memory attach: two engines in this process forced
//! onto it (`protocol=cma`; the probe reads our own pid's cookie).

use super::*;
use crate::transport::cma::CmaRoute;
use crate::transport::tcp::PeerLink;

const CMA: &[(&str, &str)] = &[("protocol", "cma"), ("ip_addr", "127.0.0.1")];

#[test]
fn the_route_is_cross_memory_attach() {
    let p = pair_with(64, false, CMA);
    let route = route_of(&p.a, "B");
    assert!(
        route
            .as_any()
            .downcast_ref::<CmaRoute>()
            .is_some_and(|cma| cma.pid() == std::process::id())
    );
}

#[test]
fn a_peer_that_does_not_accept_cma_is_refused_under_cma_and_tcp_under_auto() {
    let a = engine_with("A", false, CMA);
    let b = engine_with("B", false, &[("protocol", "tcp"), ("ip_addr", "127.0.0.1")]);
    a.load_remote_conn_info(b"B", b.conn_info()).unwrap();
    match a.connect(b"B") {
        Err(Error::NotSupported(m)) => assert!(m.contains("cross-memory attach"), "{m}"),
        other => panic!("expected NotSupported, got {other:?}"),
    }
    // Under auto, a same-host peer that publishes no probe is reached over TCP
    // (pretend it lives in another process, or auto would copy in-process).
    let auto = engine_with("C", false, &[("ip_addr", "127.0.0.1")]);
    let mut info = ConnInfo::decode(b.conn_info()).unwrap();
    info.pid = u32::MAX >> 2;
    auto.load_remote_conn_info(b"B", &info.encode()).unwrap();
    assert!(route_of(&auto, "B").as_any().is::<PeerLink>());
}

#[test]
fn memory_unmapped_behind_a_registration_fails_cleanly() {
    let p = pair_with(4096, false, CMA);
    let page = 4096usize;
    // SAFETY: an anonymous private mapping of 4 pages, unmapped below.
    let map = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            4 * page,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        )
    };
    assert_ne!(map, libc::MAP_FAILED);
    let base = map as u64;
    let bmd = p.b.register_mem(base, 4 * page as u64, 0, 0).unwrap();
    let rmd =
        p.a.load_remote_md(
            base,
            4 * page as u64,
            0,
            &p.b.public_data(bmd).unwrap(),
            b"B",
        )
        .unwrap();
    // The peer frees the last two pages without deregistering them.
    // SAFETY: unmapping pages of our own mapping that nothing else uses.
    assert_eq!(
        unsafe { libc::munmap((base + 2 * page as u64) as *mut _, 2 * page) },
        0
    );
    let src = vec![9u8; 4 * page];
    let smd =
        p.a.register_mem(src.as_ptr() as u64, src.len() as u64, 0, 0)
            .unwrap();
    let id =
        p.a.prep_xfer(
            Op::Write,
            &[whole(&src, smd)],
            &[Desc {
                addr: base,
                len: 4 * page as u64,
                md: rmd,
            }],
            b"B",
        )
        .unwrap();
    let result = p.a.post_xfer(id, Some(b"no")).and_then(|_| wait(&p.a, id));
    assert!(matches!(result, Err(Error::NotAllowed(_))), "{result:?}");
    assert!(
        p.b.get_notifs().is_empty(),
        "a failed transfer sends no notification"
    );
    // SAFETY: the first two pages are still mapped; read them, then unmap.
    let head = unsafe { std::slice::from_raw_parts(base as *const u8, 2 * page) };
    assert!(
        head.iter().all(|&x| x == 9),
        "the partial transfer landed where it could"
    );
    // SAFETY: unmapping the rest of our own mapping; nothing refers to it any more.
    unsafe { libc::munmap(map, 2 * page) };
}

#[test]
fn release_cancels_without_writing_afterwards() {
    let p = pair_with(64 << 20, false, CMA);
    let id = p.whole(Op::Write);
    assert_eq!(p.a.post_xfer(id, Some(b"x")), Ok(Status::InProg));
    p.a.release_req(id).unwrap();
    let snapshot = p.bbuf.clone();
    assert_ne!(snapshot, p.abuf, "the transfer was really cut short");
    p.a.worker.drive(usize::MAX);
    assert_eq!(p.bbuf, snapshot);
    assert!(p.b.get_notifs().is_empty());
}

#[test]
fn a_peer_whose_engine_is_gone_is_never_written_even_if_its_process_lives() {
    let p = pair_with(4096, true, CMA);
    let id = p.whole(Op::Write);
    let _ = p.a.post_xfer(id, None).unwrap();
    assert_eq!(wait(&p.a, id), Ok(Status::Success));
    let Pair {
        a, b, abuf, bbuf, ..
    } = p;
    // B's engine goes away; its memory stays mapped (same process), so a
    // write would land unnoticed: B's control page says its engine is gone
    // the moment its destruction returned, so every post must be refused.
    drop(b);
    assert!(
        route_of(&a, "B").is_down(),
        "A does not see at once that B's engine is gone"
    );
    let snapshot = bbuf.clone();
    let failed = a.post_xfer(id, None).and_then(|_| wait(&a, id));
    assert!(
        matches!(failed, Err(Error::RemoteDisconnect(_))),
        "{failed:?}"
    );
    assert_eq!(bbuf, snapshot);
    drop((abuf, bbuf));
}
