//! What RDMA peers send besides data: a connection request or reply from
//! the TCP control link, and a notification part from a receive buffer.
//! Any blob decodes (with every queue pair's number, PSN and MTU in range,
//! and a part's length consistent) or is an error; what decodes encodes
//! back to the same value.
#![no_main]

use libfuzzer_sys::fuzz_target;
use plugin_Mooncake::wire::rdma::{ConnectReply, ConnectRequest, MAX_QPS, NotifPart};

fuzz_target!(|blob: &[u8]| {
    if let Ok(r) = ConnectRequest::decode(blob) {
        assert!(!r.qps.is_empty() && r.qps.len() <= MAX_QPS);
        assert!(r.qps.iter().all(|q| q.qpn < 1 << 24 && (1..=5).contains(&q.mtu)));
        assert_eq!(ConnectRequest::decode(&r.encode()), Ok(r));
    }
    if let Ok(r) = ConnectReply::decode(blob) {
        assert!(!r.qps.is_empty() && r.qps.len() <= MAX_QPS);
        assert_eq!(ConnectReply::decode(&r.encode()), Ok(r));
    }
    if let Ok(p) = NotifPart::decode(blob) {
        assert!(p.parts >= 1);
        assert!(p.chunks == 0 || p.chunk < p.chunks);
        let mut again = Vec::new();
        p.encode_into(&mut again);
        assert_eq!(NotifPart::decode(&again), Ok(p));
    }
});
