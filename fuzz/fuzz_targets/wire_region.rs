//! A region's public data from a peer's metadata (`loadRemoteMD`): any blob
//! decodes to a region that does not wrap, or is an error; a decoded region
//! encodes back to the same region.
#![no_main]

use libfuzzer_sys::fuzz_target;
use plugin_Mooncake::wire::region::RegionPublic;

fuzz_target!(|blob: &[u8]| {
    if let Ok(r) = RegionPublic::decode(blob) {
        assert!(
            r.addr.checked_add(r.len).is_some(),
            "a wrapping region decoded"
        );
        assert_eq!(RegionPublic::decode(&r.encode()), Ok(r));
    }
});
