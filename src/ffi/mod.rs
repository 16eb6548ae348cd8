//! The boundary with NIXL: the C++ shim (`shim/`), the `cxx` bridge it calls
//! through (`bridge.rs`), and the two exported C entry points.
//!
//! Nothing here makes decisions: calls are translated, results turned into
//! `nixl_status_t`, panics caught.

mod bridge;

use std::ffi::c_void;

unsafe extern "C" {
    /// Defined in `shim/plugin.cc`: the plugin's static `nixlBackendPlugin`.
    fn mooncake_rs_shim_plugin() -> *mut c_void;
}

/// NIXL's required entry point: returns the plugin description
/// (`nixlBackendPlugin*`). May run several times per process; returns the
/// same static object every time.
#[unsafe(no_mangle)]
pub extern "C" fn nixl_plugin_init() -> *mut c_void {
    crate::logging::init();
    // SAFETY: the shim function takes no arguments, cannot throw (it only
    // returns the address of a static) and is always linked into this library.
    unsafe { mooncake_rs_shim_plugin() }
}

/// NIXL's optional exit point. Engines own all state, so there is nothing
/// to tear down here.
#[unsafe(no_mangle)]
pub extern "C" fn nixl_plugin_fini() {}
