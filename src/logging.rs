//! Logging: `log` + `env_logger`, quiet by default (warnings and errors),
//! configured by `RUST_LOG` or else by NIXL's own `NIXL_LOG_LEVEL`.

use std::sync::Once;

static INIT: Once = Once::new();

/// Maps NIXL's level names to a `log` filter.
pub fn filter_for_nixl_level(level: &str) -> &'static str {
    match level.trim().to_ascii_uppercase().as_str() {
        "TRACE" => "trace",
        "DEBUG" => "debug",
        "INFO" => "info",
        "WARN" | "WARNING" => "warn",
        "ERROR" | "FATAL" => "error",
        _ => "warn",
    }
}

/// Installs the logger once per process. Does nothing if the host process
/// already installed a `log` logger.
pub fn init() {
    INIT.call_once(|| {
        let filter = std::env::var("RUST_LOG").ok().unwrap_or_else(|| {
            filter_for_nixl_level(&std::env::var("NIXL_LOG_LEVEL").unwrap_or_default()).to_owned()
        });
        let _ = env_logger::Builder::new()
            .parse_filters(&filter)
            .format_target(false)
            .try_init();
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nixl_levels_map_to_filters() {
        assert_eq!(filter_for_nixl_level("INFO"), "info");
        assert_eq!(filter_for_nixl_level("debug"), "debug");
        assert_eq!(filter_for_nixl_level("FATAL"), "error");
        assert_eq!(filter_for_nixl_level(""), "warn");
        assert_eq!(filter_for_nixl_level("nonsense"), "warn");
    }
}
