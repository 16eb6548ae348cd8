//! Port of NIXL's `mooncake_backend_test` (ai-dynamo/nixl, `test/unit/plugins/mooncake`), run against this
//! crate's `libplugin_Mooncake.so` through its exported entry point `nixl_plugin_init`.
//!
//! The test itself is C++ (`tests/mooncake_backend_test.cc`), because a NIXL backend is a C++ object: it is
//! compiled here with g++ against the project's own ABI declarations in `nixl-headers/`, then run with the path
//! of the plugin built for this test run. It loads the plugin like NIXL does, creates two engines ("Agent1",
//! "Agent2") with and without a progress thread, and runs the original test's sequence (conn info exchange,
//! `genNotif` round trip, 64 x 1 MiB regions per side, READ and WRITE, with and without notification and handle
//! reuse, 10 iterations each) plus loopback, reverse-direction and agent-style teardown passes; then the whole
//! sequence again over VRAM on the fake CUDA driver (`scripts/build-fakes.sh`), regions on its devices 0 and 1.
//!
//! Environment: `MOONCAKE_PLUGIN_PATH` overrides the plugin path; `MOONCAKE_TEST_CXX` overrides the compiler
//! (default `g++`).

mod common;

use std::time::Duration;

/// Upper bound for the C++ test's run; it prints which phase it reached.
const RUN_TIMEOUT: Duration = Duration::from_secs(600);

#[test]
fn mooncake_backend_test() {
    let plugin = common::plugin_path();
    let program = common::build_cxx_program("mooncake_backend_test");
    println!("running: {} {}", program.display(), plugin.display());
    // The fake CUDA driver: the program adds a pass over VRAM with it.
    let fakes = common::fakes();
    let (status, output) = common::run_with_timeout_env(&program, &[&plugin], &fakes, RUN_TIMEOUT);
    print!("{output}");
    match status {
        None => panic!("mooncake_backend_test timed out after {RUN_TIMEOUT:?} (output above)"),
        Some(status) => assert!(
            status.success(),
            "mooncake_backend_test failed: {status} (output above)"
        ),
    }
    assert!(
        output.contains("mooncake_backend_test: PASS"),
        "the program did not reach its end"
    );
    assert!(
        output.contains("memory VRAM (fake CUDA driver)"),
        "the VRAM pass did not run"
    );
}

/// The stand-in `tests/nixl-upstream/mooncake_backend.h`, through which NIXL's own unmodified test builds against
/// this plugin (`scripts/nixl-upstream-test.sh`), used the way that test uses it: see
/// `tests/nixl_upstream_header.cc`.
#[test]
fn nixl_upstream_header_stand_in() {
    let plugin = common::plugin_path();
    let program = common::build_cxx_program("nixl_upstream_header");
    let plugin_env = [(
        "MOONCAKE_PLUGIN_PATH".to_string(),
        plugin.display().to_string(),
    )];
    let (status, output) =
        common::run_with_timeout_env(&program, &[], &plugin_env, Duration::from_secs(120));
    print!("{output}");
    assert_eq!(
        status.map(|s| s.success()),
        Some(true),
        "the program failed (output above)"
    );
    assert!(output.contains("nixl_upstream_header: PASS"));
}
