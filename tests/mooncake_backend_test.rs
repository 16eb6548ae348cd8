//! Port of NIXL's `mooncake_backend_test` (ai-dynamo/nixl, `test/unit/plugins/mooncake`), run against this
//! crate's `libplugin_Mooncake.so` through its exported entry point `nixl_plugin_init`.
//!
//! The test itself is C++ (`tests/mooncake_backend_test.cc`), because a NIXL backend is a C++ object: it is
//! compiled here with g++ against the project's own ABI declarations in `nixl-headers/`, then run with the path
//! of the plugin built for this test run. It loads the plugin like NIXL does, creates two engines ("Agent1",
//! "Agent2") with and without a progress thread, and runs the original test's sequence (conn info exchange,
//! `genNotif` round trip, 64 x 1 MiB regions per side, READ and WRITE, with and without notification and handle
//! reuse, 10 iterations each) plus loopback, reverse-direction and agent-style teardown passes.
//!
//! Environment: `MOONCAKE_PLUGIN_PATH` overrides the plugin path; `MOONCAKE_TEST_CXX` overrides the compiler
//! (default `g++`).

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant, SystemTime};

/// The plugin's file name: NIXL derives the backend name "Mooncake" from it.
const PLUGIN_FILE: &str = "libplugin_Mooncake.so";

/// Upper bound for the C++ test's run; it prints which phase it reached.
const RUN_TIMEOUT: Duration = Duration::from_secs(600);

/// The plugin to test: `$MOONCAKE_PLUGIN_PATH`, else the newest of `target/<profile>/deps/` (where cargo puts
/// the cdylib it builds for tests) and `target/<profile>/`, both derived from this test binary's location.
fn plugin_path() -> PathBuf {
    if let Some(path) = std::env::var_os("MOONCAKE_PLUGIN_PATH") {
        let path = PathBuf::from(path);
        assert!(
            path.is_file(),
            "MOONCAKE_PLUGIN_PATH={} is not a file",
            path.display()
        );
        return path;
    }
    let exe = std::env::current_exe().expect("cannot locate the test binary");
    let deps = exe
        .parent()
        .expect("the test binary has no parent directory");
    let mut candidates = vec![deps.join(PLUGIN_FILE)];
    if let Some(profile) = deps.parent() {
        candidates.push(profile.join(PLUGIN_FILE));
    }
    let modified = |p: &Path| {
        std::fs::metadata(p)
            .and_then(|m| m.modified())
            .unwrap_or(SystemTime::UNIX_EPOCH)
    };
    candidates
        .iter()
        .filter(|p| p.is_file())
        .max_by_key(|p| modified(p))
        .cloned()
        .unwrap_or_else(|| {
            panic!(
                "{PLUGIN_FILE} not found (looked for {:?}); build the cdylib or set MOONCAKE_PLUGIN_PATH",
                candidates
            )
        })
}

/// Compiles `tests/mooncake_backend_test.cc` into `CARGO_TARGET_TMPDIR` and returns the executable's path.
fn build_test_program() -> PathBuf {
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
    let source = manifest.join("tests").join("mooncake_backend_test.cc");
    let headers = manifest.join("nixl-headers");
    let out_dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR"));
    std::fs::create_dir_all(&out_dir).expect("cannot create CARGO_TARGET_TMPDIR");
    let exe = out_dir.join("mooncake_backend_test");
    // Build under a private name, then rename: concurrent runs never see a half-written binary.
    let partial = out_dir.join(format!(
        "mooncake_backend_test.{}.partial",
        std::process::id()
    ));

    let cxx = std::env::var("MOONCAKE_TEST_CXX").unwrap_or_else(|_| "g++".to_string());
    let mut cmd = Command::new(&cxx);
    cmd.arg("-std=c++20")
        .arg("-O1")
        .arg("-g")
        .arg("-Wall")
        .arg("-Wextra")
        .arg(format!("-I{}", headers.display()))
        .arg("-o")
        .arg(&partial)
        .arg(&source)
        .arg("-ldl")
        .arg("-pthread");
    println!("compiling: {cmd:?}");
    let output = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run the C++ compiler `{cxx}`: {e}"));
    print!("{}", String::from_utf8_lossy(&output.stdout));
    print!("{}", String::from_utf8_lossy(&output.stderr));
    assert!(
        output.status.success(),
        "compiling {} failed: {}",
        source.display(),
        output.status
    );
    std::fs::rename(&partial, &exe).expect("cannot move the compiled test into place");
    exe
}

#[test]
fn mooncake_backend_test() {
    let plugin = plugin_path();
    let program = build_test_program();
    println!("running: {} {}", program.display(), plugin.display());

    // stdout and stderr go to one log file (no pipe to drain while waiting with a timeout).
    let log_path = PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("mooncake_backend_test.{}.log", std::process::id()));
    let log = File::create(&log_path).expect("cannot create the log file");
    let mut child = Command::new(&program)
        .arg(&plugin)
        .stdin(Stdio::null())
        .stdout(Stdio::from(
            log.try_clone().expect("cannot clone the log file handle"),
        ))
        .stderr(Stdio::from(log))
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {}: {e}", program.display()));

    let start = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().expect("cannot wait for the test program") {
            break Some(status);
        }
        if start.elapsed() > RUN_TIMEOUT {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(50));
    };

    let output = std::fs::read(&log_path).unwrap_or_default();
    let _ = std::fs::remove_file(&log_path);
    print!("{}", String::from_utf8_lossy(&output));
    match status {
        None => panic!("mooncake_backend_test timed out after {RUN_TIMEOUT:?} (output above)"),
        Some(status) => assert!(
            status.success(),
            "mooncake_backend_test failed: {status} (output above)"
        ),
    }
}
