//! Helpers shared by the integration tests: finding the built plugin,
//! compiling a C++ test program against `nixl-headers/`, and running a
//! program with a deadline.

#![allow(dead_code)] // each test binary uses a different subset

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::time::{Duration, Instant, SystemTime};

/// The plugin's file name: NIXL derives the backend name "Mooncake" from it.
pub const PLUGIN_FILE: &str = "libplugin_Mooncake.so";

/// The plugin to test: `$MOONCAKE_PLUGIN_PATH`, else the newest of
/// `target/<profile>/deps/` (where cargo puts the cdylib it builds for tests)
/// and `target/<profile>/`, both derived from this test binary's location.
pub fn plugin_path() -> PathBuf {
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
            panic!("{PLUGIN_FILE} not found (looked for {candidates:?}); build the cdylib or set MOONCAKE_PLUGIN_PATH")
        })
}

/// Compiles `tests/<name>.cc` against `nixl-headers/` into
/// `CARGO_TARGET_TMPDIR/<name>` and returns the executable's path.
/// `MOONCAKE_TEST_CXX` overrides the compiler (default `g++`).
pub fn build_cxx_program(name: &str) -> PathBuf {
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
    let source = manifest.join("tests").join(format!("{name}.cc"));
    let out_dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR"));
    std::fs::create_dir_all(&out_dir).expect("cannot create CARGO_TARGET_TMPDIR");
    let exe = out_dir.join(name);
    // Build under a private name, then rename: concurrent runs never see a half-written binary.
    let partial = out_dir.join(format!("{name}.{}.partial", std::process::id()));
    let cxx = std::env::var("MOONCAKE_TEST_CXX").unwrap_or_else(|_| "g++".to_string());
    let mut cmd = Command::new(&cxx);
    cmd.args(["-std=c++20", "-O1", "-g", "-Wall", "-Wextra"])
        .arg(format!("-I{}", manifest.join("nixl-headers").display()))
        .arg("-o")
        .arg(&partial)
        .arg(&source)
        .args(["-ldl", "-pthread"]);
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
    std::fs::rename(&partial, &exe).expect("cannot move the compiled program into place");
    exe
}

/// Runs `program args...` with stdout and stderr captured together, killing
/// it after `timeout`. Returns the exit status (`None` on timeout) and output.
pub fn run_with_timeout(
    program: &Path,
    args: &[&Path],
    timeout: Duration,
) -> (Option<ExitStatus>, String) {
    run_with_timeout_env(program, args, &[], timeout)
}

/// [`run_with_timeout`] with `env` added to the program's environment.
pub fn run_with_timeout_env(
    program: &Path,
    args: &[&Path],
    env: &[(String, String)],
    timeout: Duration,
) -> (Option<ExitStatus>, String) {
    // One log file for both streams: no pipe to drain while waiting.
    let name = program.file_name().unwrap_or_default().to_string_lossy();
    let log_path = PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("{name}.{}.log", std::process::id()));
    let log = File::create(&log_path).expect("cannot create the log file");
    let mut child = Command::new(program)
        .args(args)
        .envs(env.iter().map(|(k, v)| (k, v)))
        .stdin(Stdio::null())
        .stdout(Stdio::from(
            log.try_clone().expect("cannot clone the log file handle"),
        ))
        .stderr(Stdio::from(log))
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {}: {e}", program.display()));
    let start = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().expect("cannot wait for the program") {
            break Some(status);
        }
        if start.elapsed() > timeout {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let output = std::fs::read(&log_path).unwrap_or_default();
    let _ = std::fs::remove_file(&log_path);
    (status, String::from_utf8_lossy(&output).into_owned())
}

/// The `NAME=/abs/path` lines `scripts/build-fakes.sh` prints (it builds the
/// fakes of hardware libraries when they are out of date).
#[allow(dead_code)] // not every test binary uses the fakes
pub fn fakes() -> Vec<(String, String)> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let out = Command::new(root.join("scripts/build-fakes.sh"))
        .output()
        .expect("scripts/build-fakes.sh runs");
    assert!(
        out.status.success(),
        "scripts/build-fakes.sh failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect()
}
