//! Test support: the fakes of hardware libraries (`tests/fakes/`), built by
//! `scripts/build-fakes.sh`.

use std::process::Command;

/// Builds the fakes (when out of date) and returns the value of the line of
/// `build-fakes.sh`'s output that starts with `var=` (the fake's path).
pub fn fake_path(var: &str) -> String {
    let root = env!("CARGO_MANIFEST_DIR");
    let out = Command::new(format!("{root}/scripts/build-fakes.sh"))
        .output()
        .expect("scripts/build-fakes.sh runs");
    assert!(
        out.status.success(),
        "scripts/build-fakes.sh failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8(out.stdout).unwrap();
    let prefix = format!("{var}=");
    stdout
        .lines()
        .find_map(|l| l.strip_prefix(prefix.as_str()))
        .unwrap_or_else(|| panic!("build-fakes.sh prints {var}"))
        .to_owned()
}
