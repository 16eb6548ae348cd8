//! `plugin-manifest/Mooncake.toml` must say exactly what the built plugin
//! reports: the test loads the library through its exported entry point (a
//! small C++ program, `tests/plugin_describe.cc`) and compares every field.

mod common;

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use plugin_Mooncake::backend::options::{OPTION_SPECS, env_var};
use serde::Deserialize;

#[derive(Deserialize)]
struct Manifest {
    plugin: Plugin,
    option: Vec<OptionEntry>,
}

#[derive(Deserialize)]
struct Plugin {
    name: String,
    file: String,
    reported_name: String,
    version: String,
    nixl_plugin_api_version: i64,
    nixl_versions_tested: Vec<String>,
    memory_types: Vec<String>,
    supports_remote: bool,
    supports_local: bool,
    supports_notifications: bool,
}

#[derive(Deserialize)]
struct OptionEntry {
    name: String,
    env: String,
    default: String,
    meaning: String,
}

fn manifest() -> Manifest {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("plugin-manifest/Mooncake.toml");
    let text = std::fs::read_to_string(&path).expect("the manifest exists");
    toml::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn mem_code(name: &str) -> i64 {
    match name {
        "DRAM" => 0,
        "VRAM" => 1,
        "BLK" => 2,
        "OBJ" => 3,
        "FILE" => 4,
        other => panic!("unknown memory type {other} in the manifest"),
    }
}

#[test]
fn manifest_matches_the_built_plugin() {
    let m = manifest();
    let plugin = common::plugin_path();
    assert_eq!(
        plugin.file_name().unwrap().to_str(),
        Some(m.plugin.file.as_str())
    );
    assert_eq!(m.plugin.file, format!("libplugin_{}.so", m.plugin.name));

    let program = common::build_cxx_program("plugin_describe");
    let (status, output) = common::run_with_timeout(&program, &[&plugin], Duration::from_secs(120));
    assert!(
        status.is_some_and(|s| s.success()),
        "plugin_describe failed:\n{output}"
    );
    let json_line = output
        .lines()
        .rev()
        .find(|l| l.starts_with('{'))
        .expect("a JSON line");
    let got: serde_json::Value = serde_json::from_str(json_line).expect("valid JSON");

    assert_eq!(got["api_version"], m.plugin.nixl_plugin_api_version);
    assert_eq!(got["name"], m.plugin.reported_name.as_str());
    assert_eq!(got["version"], m.plugin.version.as_str());
    assert_eq!(m.plugin.version, env!("CARGO_PKG_VERSION"));
    assert_eq!(got["fini_exported"], true);
    assert_eq!(got["supports_remote"], m.plugin.supports_remote);
    assert_eq!(got["supports_local"], m.plugin.supports_local);
    assert_eq!(
        got["supports_notifications"],
        m.plugin.supports_notifications
    );
    let mems: Vec<i64> = m.plugin.memory_types.iter().map(|t| mem_code(t)).collect();
    assert_eq!(got["mems"], serde_json::json!(mems));
    assert_eq!(got["engine_mems"], serde_json::json!(mems));
    assert!(!m.plugin.nixl_versions_tested.is_empty());

    let reported: BTreeMap<String, String> =
        serde_json::from_value(got["options"].clone()).expect("options are a string map");
    let declared: BTreeMap<String, String> = m
        .option
        .iter()
        .map(|o| (o.name.clone(), o.default.clone()))
        .collect();
    assert_eq!(reported, declared, "options and defaults");
}

#[test]
fn manifest_meanings_match_the_code_and_the_readme() {
    let m = manifest();
    assert_eq!(m.option.len(), OPTION_SPECS.len());
    let readme = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("README.md"))
        .expect("README.md exists");
    for (entry, spec) in m.option.iter().zip(OPTION_SPECS) {
        assert_eq!(entry.name, spec.name);
        assert_eq!(
            entry.env,
            env_var(spec.name),
            "variable of option {}",
            spec.name
        );
        assert!(
            readme.contains(&format!("`{}`", entry.env)),
            "README names the variable {}",
            entry.env
        );
        assert_eq!(entry.default, spec.default);
        let help: String = spec.help.split_whitespace().collect::<Vec<_>>().join(" ");
        assert_eq!(entry.meaning, help, "meaning of option {}", spec.name);
        assert!(
            readme.contains(&format!("`{}`", spec.name)),
            "README documents option {}",
            spec.name
        );
    }
}
