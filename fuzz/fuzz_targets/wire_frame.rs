//! The TCP protocol's decoders: a frame header, a segment table (checked
//! against the data a Write carries) and a Hello body. Each accepts or
//! refuses any input without a panic; what they accept round-trips and stays
//! within the protocol's limits.
#![no_main]

use libfuzzer_sys::fuzz_target;
use plugin_Mooncake::wire::frame::{
    self, HEADER_LEN, Header, Hello, MAX_DATA, MAX_HELLO, MAX_SEGS, SEG_LEN,
};

fuzz_target!(|data: &[u8]| {
    if let Some(raw) = data.first_chunk::<HEADER_LEN>()
        && let Ok(h) = Header::decode(raw)
    {
        assert_eq!(&h.encode(), raw, "a header that does not round-trip");
    }
    // A segment table: two bytes give the count (including wrong ones), the
    // third whether it belongs to a Write and with which data length.
    if let [c0, c1, mode, rest @ ..] = data {
        let count = usize::from(u16::from_le_bytes([*c0, *c1]));
        let data_len = match mode % 3 {
            0 => None,
            1 => Some(rest.len() as u64),
            _ => Some(u64::from(*mode) << 16),
        };
        let table = &rest[..rest.len().min(MAX_SEGS * SEG_LEN)];
        if let Ok(segs) = frame::decode_segs(table, count, data_len) {
            assert_eq!(segs.len(), count);
            assert!(count > 0 && count <= MAX_SEGS);
            let total: u64 = segs.iter().map(|s| u64::from(s.len)).sum();
            assert!(total <= MAX_DATA);
            assert!(data_len.is_none_or(|d| d == total));
            let mut again = Vec::new();
            frame::encode_segs(&segs, &mut again);
            assert_eq!(again, table);
        }
    }
    if let Ok(hello) = Hello::decode(data)
        && hello.name.len() + 34 <= MAX_HELLO as usize
    {
        assert_eq!(Hello::decode(&hello.encode()), Ok(hello));
    }
});
