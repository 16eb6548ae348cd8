//! A peer's connection info (`loadRemoteConnInfo`): any blob decodes or is an
//! error; a decoded one encodes back to the same value.
#![no_main]

use libfuzzer_sys::fuzz_target;
use plugin_Mooncake::wire::conn_info::ConnInfo;

fuzz_target!(|blob: &[u8]| {
    if let Ok(c) = ConnInfo::decode(blob) {
        assert_eq!(ConnInfo::decode(&c.encode()).as_ref(), Ok(&c));
    }
});
