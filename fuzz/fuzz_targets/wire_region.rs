//! A region's public data from a peer's metadata (`loadRemoteMD`): any blob
//! decodes to a region that does not wrap (and, for GPU memory with a CUDA
//! IPC handle or VMM chunks, lies inside what they name), or is an error; a
//! decoded region encodes back to the same region.
#![no_main]

use libfuzzer_sys::fuzz_target;
use plugin_Mooncake::wire::region::RegionPublic;

fuzz_target!(|blob: &[u8]| {
    if let Ok(r) = RegionPublic::decode(blob) {
        assert!(
            r.addr.checked_add(r.len).is_some(),
            "a wrapping region decoded"
        );
        if let Some(ipc) = r.ipc {
            assert!(
                r.addr >= ipc.base
                    && ipc.base.checked_add(ipc.size).is_some()
                    && r.addr + r.len <= ipc.base + ipc.size,
                "a region outside its IPC allocation decoded"
            );
        }
        if let Some(vmm) = &r.vmm {
            let end = vmm.base().checked_add(vmm.size());
            assert!(
                end.is_some_and(|end| r.addr >= vmm.base() && r.addr + r.len <= end),
                "a region outside its VMM chunks decoded"
            );
        }
        assert_eq!(RegionPublic::decode(&r.encode()), Ok(r));
    }
});
