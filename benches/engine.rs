//! Micro-benchmarks of the engine, with criterion.
//!
//! ```sh
//! cargo bench --bench engine                         # everything
//! cargo bench --bench engine -- copy                 # one group (a name filter)
//! cargo bench --bench engine -- --warm-up-time 1 --measurement-time 2   # quick look
//! ```
//!
//! Groups:
//! - `requests`: the request slab (`RequestSlab`): insert + remove, get;
//! - `wire`: metadata encodings, `ConnInfo` (as a real engine publishes it) and
//!   `RegionPublic`, encode and decode;
//! - `notifs`: the notification inbox (`Inbox`): push a burst, drain it;
//! - `copy`: the same-process copy path through the public `Engine` API, the
//!   way NIXL drives it (two engines, register, load the remote's metadata,
//!   `prep_xfer` once, then `post_xfer` + `check_xfer` until done per
//!   iteration), progress thread on as NIXL's Python API defaults to:
//!   one 4 KiB, 1 MiB and 64 MiB descriptor, and 4096 scattered 4 KiB ones;
//! - `tcp`: the TCP transport between two engines of this process over
//!   loopback: 4 KiB WRITE round trips, 16 MiB WRITE and READ;
//! - `frame`: the TCP frame codec (`wire::frame`): header encode/decode, and a
//!   1024-segment table encode/decode (the largest a frame carries).
//!
//! Throughput is reported in bytes (copy) or elements (notifications).

use std::hint::black_box;
use std::sync::Arc;

use criterion::{BatchSize, Criterion, Throughput, criterion_group, criterion_main};
use plugin_Mooncake::backend::requests::RequestSlab;
use plugin_Mooncake::backend::{AgentName, Desc, Engine, EngineConfig, MdId, ReqId, Status};
use plugin_Mooncake::common::Inbox;
use plugin_Mooncake::transport::Op;
use plugin_Mooncake::wire::conn_info::ConnInfo;
use plugin_Mooncake::wire::frame::{self, Header, Kind, Seg};
use plugin_Mooncake::wire::region::RegionPublic;

const KIB: usize = 1 << 10;
const MIB: usize = 1 << 20;

// ---- request slab -----------------------------------------------------------

fn requests(c: &mut Criterion) {
    let mut g = c.benchmark_group("requests");
    // A slab with a realistic population of live requests (vLLM keeps
    // hundreds in flight); the engine stores `Arc`s, so do we.
    let slab: RequestSlab<Arc<u64>> = RequestSlab::default();
    let live: Vec<u64> = (0..1024).map(|i| slab.insert(Arc::new(i))).collect();
    let value = Arc::new(7u64);

    g.bench_function("insert+remove", |b| {
        b.iter(|| {
            let id = slab.insert(value.clone());
            black_box(slab.remove(black_box(id)))
        })
    });
    let mut i = 0usize;
    g.bench_function("get", |b| {
        b.iter(|| {
            i = (i + 1) & 1023;
            black_box(slab.get(black_box(live[i])))
        })
    });
    g.finish();
}

// ---- wire encodings -----------------------------------------------------------

fn wire(c: &mut Criterion) {
    let mut g = c.benchmark_group("wire");
    // The connection info a real engine publishes (whatever endpoints this
    // build serves), as its peers decode it.
    let publisher = Engine::new(EngineConfig {
        progress_thread: false,
        ..EngineConfig::new("vllm-prefill-worker-0", &[("ip_addr", "127.0.0.1")])
    })
    .expect("engine");
    let info = ConnInfo::decode(publisher.conn_info()).expect("own connection info decodes");
    let info_blob = info.encode();
    assert_eq!(ConnInfo::decode(&info_blob).unwrap(), info);
    let region = RegionPublic {
        owner: info.token,
        key: 0xfeed_beef_dead_cafe,
        addr: 0x7f12_3456_0000,
        len: 64 << 20,
        mem_type: 0,
        dev_id: 0,
        ipc: None,
        rdma: None,
        vmm: None,
    };
    let region_blob = region.encode();
    assert_eq!(RegionPublic::decode(&region_blob).unwrap(), region);

    g.bench_function("conn_info/encode", |b| b.iter(|| black_box(&info).encode()));
    g.bench_function("conn_info/decode", |b| {
        b.iter(|| ConnInfo::decode(black_box(&info_blob)).unwrap())
    });
    g.bench_function("region/encode", |b| b.iter(|| black_box(&region).encode()));
    g.bench_function("region/decode", |b| {
        b.iter(|| RegionPublic::decode(black_box(&region_blob)).unwrap())
    });
    g.finish();
}

// ---- notification inbox --------------------------------------------------------------

fn notifs(c: &mut Criterion) {
    const BURST: usize = 64;
    let mut g = c.benchmark_group("notifs");
    g.throughput(Throughput::Elements(BURST as u64));
    let inbox = Inbox::default();
    let from = AgentName::from("vllm-decode-worker-0");
    // vLLM's payload: "<request id>:<tp rank>".
    let msgs: Vec<Vec<u8>> = (0..BURST)
        .map(|i| format!("cmpl-{i:032x}-0:0").into_bytes())
        .collect();
    g.bench_function("push+drain/64", |b| {
        b.iter_batched(
            || msgs.clone(),
            |msgs| {
                for m in msgs {
                    inbox.push(from.clone(), m).expect("room in the inbox");
                }
                black_box(inbox.drain())
            },
            BatchSize::SmallInput,
        )
    });
    g.finish();
}

// ---- same-process copy path --------------------------------------------------------------

/// Two engines in this process where `a` knows `b`; one registered buffer each.
/// Field order matters: the engines drop before the memory they registered.
struct Pair {
    a: Engine,
    _b: Engine,
    abuf: Vec<u8>,
    bbuf: Vec<u8>,
    amd: MdId,
    bmd_remote: MdId,
}

fn engine(name: &str, params: &[(&str, &str)]) -> Engine {
    Engine::new(EngineConfig::new(name, params)).expect("engine")
}

fn pair(len: usize, params: &[(&str, &str)]) -> Pair {
    let a = engine("A", params);
    let b = engine("B", params);
    a.load_remote_conn_info(b"B", b.conn_info())
        .expect("loadRemoteConnInfo");
    let abuf: Vec<u8> = (0..len).map(|i| (i * 7 + 3) as u8).collect();
    let bbuf = vec![0u8; len];
    let amd = a
        .register_mem(abuf.as_ptr() as u64, len as u64, 0, 0)
        .expect("registerMem A");
    let bmd = b
        .register_mem(bbuf.as_ptr() as u64, len as u64, 0, 0)
        .expect("registerMem B");
    let blob = b.public_data(bmd).expect("getPublicData");
    let bmd_remote = a
        .load_remote_md(bbuf.as_ptr() as u64, len as u64, 0, &blob, b"B")
        .expect("loadRemoteMD");
    Pair {
        a,
        _b: b,
        abuf,
        bbuf,
        amd,
        bmd_remote,
    }
}

impl Pair {
    /// Block `i` of A (local) and block `j` of B (remote), `block` bytes each.
    fn descs(&self, block: usize, i: usize, j: usize) -> (Desc, Desc) {
        let l = Desc {
            addr: self.abuf.as_ptr() as u64 + (i * block) as u64,
            len: block as u64,
            md: self.amd,
        };
        let r = Desc {
            addr: self.bbuf.as_ptr() as u64 + (j * block) as u64,
            len: block as u64,
            md: self.bmd_remote,
        };
        (l, r)
    }
}

/// One post of a prepared request, polled to completion as NIXL's agent does.
fn post_and_wait(e: &Engine, id: ReqId) {
    match e.post_xfer(id, None).expect("postXfer") {
        Status::Success => {}
        Status::InProg => loop {
            match e.check_xfer(id).expect("checkXfer") {
                Status::InProg => std::hint::spin_loop(),
                Status::Success => break,
                other => panic!("checkXfer returned {other:?}"),
            }
        },
        other => panic!("postXfer returned {other:?}"),
    }
}

fn copy(c: &mut Criterion) {
    let mut g = c.benchmark_group("copy");
    // (name, block size, descriptors, scattered)
    let cases: [(&str, usize, usize, bool); 4] = [
        ("write/4KiB", 4 * KIB, 1, false),
        ("write/1MiB", MIB, 1, false),
        ("write/64MiB", 64 * MIB, 1, false),
        ("write/4096x4KiB", 4 * KIB, 4096, true),
    ];
    for (name, block, n, scattered) in cases {
        // Scattered: every other block of A to every other block of B, in
        // reverse order, so no two descriptors can be merged.
        let span = if scattered { 2 * n } else { n };
        let p = pair(span * block, &[]);
        let (l, r): (Vec<Desc>, Vec<Desc>) = (0..n)
            .map(|i| {
                if scattered {
                    p.descs(block, 2 * i, 2 * (n - 1 - i))
                } else {
                    p.descs(block, i, i)
                }
            })
            .unzip();
        let id = p.a.prep_xfer(Op::Write, &l, &r, b"B").expect("prepXfer");

        // The path really moves the data.
        post_and_wait(&p.a, id);
        for (l, r) in l.iter().zip(&r) {
            let src = &p.abuf[(l.addr - p.abuf.as_ptr() as u64) as usize..][..block];
            let dst = &p.bbuf[(r.addr - p.bbuf.as_ptr() as u64) as usize..][..block];
            assert!(src == dst, "{name}: data not copied");
        }

        g.throughput(Throughput::Bytes((n * block) as u64));
        g.sample_size(if n * block >= 64 * MIB { 10 } else { 50 });
        g.bench_function(name, |b| b.iter(|| post_and_wait(&p.a, id)));
        p.a.release_req(id).expect("releaseReqH");
    }
    g.finish();
}

// ---- TCP frames --------------------------------------------------------------------

fn frame(c: &mut Criterion) {
    let mut g = c.benchmark_group("frame");
    let header = Header::new(Kind::Write, 20 * 1024 + (1 << 20), 42, 1024);
    let raw = header.encode();
    g.bench_function("header/encode", |b| b.iter(|| black_box(&header).encode()));
    g.bench_function("header/decode", |b| {
        b.iter(|| Header::decode(black_box(&raw)).unwrap())
    });
    let segs: Vec<Seg> = (0..1024u64)
        .map(|i| Seg {
            key: 0xfeed,
            addr: 0x7f00_0000_0000 + i * 8192,
            len: 1024,
        })
        .collect();
    let mut table = Vec::new();
    frame::encode_segs(&segs, &mut table);
    g.throughput(Throughput::Elements(segs.len() as u64));
    g.bench_function("segs_1024/encode", |b| {
        b.iter_batched_ref(
            || Vec::with_capacity(table.len()),
            |out| frame::encode_segs(black_box(&segs), out),
            BatchSize::SmallInput,
        )
    });
    g.bench_function("segs_1024/decode", |b| {
        b.iter(|| frame::decode_segs(black_box(&table), 1024, Some(1 << 20)).unwrap())
    });
    g.finish();
}

// ---- the TCP path ---------------------------------------------------------------------

/// Two engines in this process forced onto TCP over loopback: 4 KiB WRITE
/// round trips (post to done), and a 16 MiB WRITE and READ.
fn tcp(c: &mut Criterion) {
    let mut g = c.benchmark_group("tcp");
    let p = pair(16 * MIB, &[("protocol", "tcp"), ("ip_addr", "127.0.0.1")]);
    for (name, op, block) in [
        ("write_4k", Op::Write, 4 * KIB),
        ("write_16m", Op::Write, 16 * MIB),
        ("read_16m", Op::Read, 16 * MIB),
    ] {
        let (l, r) = p.descs(block, 0, 0);
        let id = p.a.prep_xfer(op, &[l], &[r], b"B").expect("prepXfer");
        g.throughput(Throughput::Bytes(block as u64));
        g.bench_function(name, |b| b.iter(|| post_and_wait(&p.a, id)));
        p.a.release_req(id).expect("releaseReqH");
    }
    g.finish();
}

criterion_group!(benches, requests, wire, notifs, frame, copy, tcp);
criterion_main!(benches);
