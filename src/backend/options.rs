//! Backend options: the `customParams` NIXL hands to `create_engine`, the
//! `NIXL_MOONCAKE_<OPTION>` environment variables, their defaults (reported
//! through `get_backend_options`), and their validation.
//!
//! Frameworks (vLLM, SGLang, Dynamo) create every backend but UCX with no
//! parameters, so each option can also come from the environment:
//! `customParams` > environment > default.

use std::net::IpAddr;
use std::time::Duration;

use log::warn;

use crate::common::{Error, Result};
pub use crate::transport::Protocol;

/// One documented option: its name, default and meaning.
#[derive(Debug, Clone, Copy)]
pub struct OptionSpec {
    /// The key in `customParams`.
    pub name: &'static str,
    /// The default value, as reported by `get_backend_options`.
    pub default: &'static str,
    /// What the option means (README and manifest carry the same text).
    pub help: &'static str,
}

/// Every option this backend understands, in the order they are documented.
pub const OPTION_SPECS: &[OptionSpec] = &[
    OptionSpec {
        name: "protocol",
        default: "auto",
        help: "transport to use: auto picks per peer (same process: direct copy, \
               same host: cross-memory attach and CUDA IPC for GPU memory, else TCP); \
               tcp, cma (with CUDA IPC) or rdma force that transport for every peer",
    },
    OptionSpec {
        name: "ip_addr",
        default: "",
        help: "IP address to listen on and publish; empty: the first UP non-loopback \
               IPv4 address, else 127.0.0.1",
    },
    OptionSpec {
        name: "port",
        default: "0",
        help: "TCP port to listen on; 0 picks an ephemeral port",
    },
    OptionSpec {
        name: "streams",
        default: "auto",
        help: "TCP connections per peer: a number from 1 to 64, or auto \
               (the core count, clamped to 2..8)",
    },
    OptionSpec {
        name: "timeout_ms",
        default: "30000",
        help: "a peer that neither answers nor takes data for this long while transfers \
               to it are outstanding is declared dead (NIXL_ERR_REMOTE_DISCONNECT); 0 disables",
    },
    OptionSpec {
        name: "busy_poll_us",
        default: "30",
        help: "after serving a TCP request, the target's connection busy-polls this many \
               microseconds for the next one before it sleeps: back-to-back small transfers \
               then need no thread wake-up; 0 disables (at most one connection per engine \
               polls at a time, an idle engine never)",
    },
    OptionSpec {
        name: "device_name",
        default: "",
        help: "RDMA device(s) to use, comma-separated (e.g. mlx5_0); empty: all active devices",
    },
    OptionSpec {
        name: "gid_index",
        default: "auto",
        help: "RoCE GID index to use on every RDMA port; auto: RoCEv2 with an IPv4-mapped \
               address on an interface that is up, else a global IPv6 one, never link-local",
    },
    OptionSpec {
        name: "slice_size",
        default: "65536",
        help: "bytes per RDMA work request (4096 to 16777216): transfers are cut in slices \
               of this size, spread over the queue pairs and NICs",
    },
];

/// Validated options of one engine.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Options {
    /// Transport selection for cross-process peers.
    pub protocol: Protocol,
    /// Address to listen on; `None` means pick one automatically.
    pub ip_addr: Option<IpAddr>,
    /// TCP port; 0 = ephemeral.
    pub port: u16,
    /// TCP streams per peer; `None` = per core count.
    pub streams: Option<usize>,
    /// Stall timeout; zero disables.
    pub timeout: Duration,
    /// How long a served TCP connection busy-polls for the next request.
    pub busy_poll: Duration,
    /// RDMA devices to use; empty = all.
    pub device_names: Vec<String>,
    /// RoCE GID index; `None` = our choice.
    pub gid_index: Option<u32>,
    /// Bytes per RDMA work request.
    pub slice_size: u64,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            protocol: Protocol::Auto,
            ip_addr: None,
            port: 0,
            streams: None,
            timeout: Duration::from_secs(30),
            busy_poll: Duration::from_micros(30),
            device_names: Vec::new(),
            gid_index: None,
            slice_size: 64 << 10,
        }
    }
}

/// Where an option's effective value came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    /// Nobody set it.
    Default,
    /// The `NIXL_MOONCAKE_<OPTION>` environment variable.
    Env(String),
    /// NIXL's `customParams`.
    Param,
}

impl std::fmt::Display for Source {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Source::Default => f.write_str("default"),
            Source::Env(var) => write!(f, "env {var}"),
            Source::Param => f.write_str("customParams"),
        }
    }
}

/// Parameters NIXL itself passes to every backend (its gtest passes
/// `engine_config`), which carry nothing for us: accepted without a warning.
const IGNORED_PARAMS: &[&str] = &["engine_config"];

/// The environment variable for option `name`: `NIXL_MOONCAKE_<NAME>`.
pub fn env_var(name: &str) -> String {
    format!("NIXL_MOONCAKE_{}", name.to_ascii_uppercase())
}

/// Validated options with where each came from.
#[derive(Debug, Clone)]
pub struct Resolved {
    /// The effective options.
    pub options: Options,
    /// Per documented option, in [`OPTION_SPECS`] order: its effective value
    /// (as written) and its source.
    pub sources: Vec<(&'static str, String, Source)>,
}

impl Resolved {
    /// One line listing every option, its value and its source.
    pub fn describe(&self) -> String {
        self.sources
            .iter()
            .map(|(name, value, source)| format!("{name}={value:?} ({source})"))
            .collect::<Vec<_>>()
            .join(", ")
    }
}

impl Options {
    /// Parses `customParams` alone (no environment). Unknown keys are logged
    /// as warnings and ignored; an invalid value is an error naming the option.
    ///
    /// # Errors
    /// [`Error::InvalidParam`] when a known option has a value it cannot take.
    pub fn parse<'a>(params: impl IntoIterator<Item = (&'a str, &'a str)>) -> Result<Options> {
        Ok(Self::resolve(params, |_| None)?.options)
    }

    /// Resolves every option: `customParams` first, else the environment
    /// variable [`env_var`] as `env` reports it, else the default.
    ///
    /// # Errors
    /// [`Error::InvalidParam`] naming the option and, for a value from the
    /// environment, the variable.
    pub fn resolve<'a>(
        params: impl IntoIterator<Item = (&'a str, &'a str)>,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<Resolved> {
        let mut opts = Options::default();
        let mut sources: Vec<(&'static str, String, Source)> = OPTION_SPECS
            .iter()
            .map(|s| (s.name, s.default.to_string(), Source::Default))
            .collect();
        for (i, spec) in OPTION_SPECS.iter().enumerate() {
            let var = env_var(spec.name);
            if let Some(value) = env(&var) {
                opts.apply(spec.name, &value).map_err(|e| match e {
                    Error::InvalidParam(m) => {
                        Error::InvalidParam(format!("environment variable {var}: {m}"))
                    }
                    other => other,
                })?;
                sources[i] = (spec.name, value.trim().to_string(), Source::Env(var));
            }
        }
        for (key, value) in params {
            match OPTION_SPECS.iter().position(|s| s.name == key) {
                Some(i) => {
                    opts.apply(key, value)?;
                    sources[i] = (
                        OPTION_SPECS[i].name,
                        value.trim().to_string(),
                        Source::Param,
                    );
                }
                None if IGNORED_PARAMS.contains(&key) => {
                    log::debug!("Mooncake: parameter {key:?} carries nothing for this backend")
                }
                None => {
                    warn!("Mooncake: ignoring unknown backend option {key:?} (value {value:?})")
                }
            }
        }
        Ok(Resolved {
            options: opts,
            sources,
        })
    }

    /// Resolves `customParams` against the process environment.
    ///
    /// # Errors
    /// As [`Self::resolve`].
    pub fn from_params_and_env<'a>(
        params: impl IntoIterator<Item = (&'a str, &'a str)>,
    ) -> Result<Resolved> {
        Self::resolve(params, |var| std::env::var(var).ok())
    }

    /// Sets option `key` (one of [`OPTION_SPECS`]) from `value`.
    fn apply(&mut self, key: &str, value: &str) -> Result<()> {
        let opts = self;
        let value = value.trim();
        match key {
            "protocol" => {
                opts.protocol = Protocol::parse(value)
                    .ok_or_else(|| invalid(key, value, "expected one of auto, tcp, cma, rdma"))?;
            }
            "ip_addr" => {
                opts.ip_addr = if value.is_empty() {
                    None
                } else {
                    Some(
                        value
                            .parse()
                            .map_err(|_| invalid(key, value, "expected an IPv4 or IPv6 address"))?,
                    )
                };
            }
            "port" => {
                opts.port = value
                    .parse()
                    .map_err(|_| invalid(key, value, "expected a port number 0-65535"))?;
            }
            "streams" => {
                opts.streams = if value.eq_ignore_ascii_case("auto") {
                    None
                } else {
                    match value.parse::<usize>() {
                        Ok(n @ 1..=64) => Some(n),
                        _ => {
                            return Err(invalid(
                                key,
                                value,
                                "expected auto or a number from 1 to 64",
                            ));
                        }
                    }
                };
            }
            "timeout_ms" => {
                let ms: u64 = value
                    .parse()
                    .map_err(|_| invalid(key, value, "expected milliseconds (0 disables)"))?;
                opts.timeout = Duration::from_millis(ms);
            }
            "busy_poll_us" => {
                let us: u64 = value
                    .parse()
                    .ok()
                    .filter(|&us| us <= 1_000_000)
                    .ok_or_else(|| {
                        invalid(key, value, "expected microseconds from 0 (off) to 1000000")
                    })?;
                opts.busy_poll = Duration::from_micros(us);
            }
            "device_name" => {
                opts.device_names = value
                    .split(',')
                    .map(str::trim)
                    .filter(|d| !d.is_empty())
                    .map(String::from)
                    .collect();
                if let Some(bad) = opts.device_names.iter().find(|d| {
                    !d.chars()
                        .all(|c| c.is_ascii_alphanumeric() || "_-.:".contains(c))
                }) {
                    return Err(invalid(
                        key,
                        value,
                        &format!("device name {bad:?} has characters no RDMA device name has"),
                    ));
                }
            }
            "gid_index" => {
                opts.gid_index = if value.eq_ignore_ascii_case("auto") || value.is_empty() {
                    None
                } else {
                    Some(
                        value
                            .parse::<u8>()
                            .map(u32::from)
                            .map_err(|_| invalid(key, value, "expected auto or 0 to 255"))?,
                    )
                };
            }
            "slice_size" => {
                opts.slice_size = value
                    .parse::<u64>()
                    .ok()
                    .filter(|n| (4096..=16 << 20).contains(n))
                    .ok_or_else(|| invalid(key, value, "expected bytes from 4096 to 16777216"))?;
            }
            _ => return Err(invalid(key, value, "not an option of this backend")),
        }
        Ok(())
    }
}

impl Options {
    /// What the transports are configured with.
    pub fn transport_config(&self) -> crate::transport::Config {
        crate::transport::Config {
            protocol: self.protocol,
            ip_addr: self.ip_addr,
            port: self.port,
            streams: self.streams,
            timeout: self.timeout,
            busy_poll: self.busy_poll,
            rdma: crate::transport::rdma::RdmaConfig {
                devices: crate::transport::rdma::device::DeviceConfig {
                    names: self.device_names.clone(),
                    gid_index: self.gid_index,
                },
                slice: self.slice_size,
                ..Default::default()
            },
            ..Default::default()
        }
    }
}

fn invalid(key: &str, value: &str, why: &str) -> Error {
    Error::InvalidParam(format!("backend option {key}={value:?}: {why}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_parse_to_default_options() {
        let parsed = Options::parse(OPTION_SPECS.iter().map(|s| (s.name, s.default))).unwrap();
        assert_eq!(parsed, Options::default());
    }

    #[test]
    fn values_are_parsed() {
        let o = Options::parse([
            ("protocol", "TCP"),
            ("ip_addr", "127.0.0.1"),
            ("port", "12345"),
            ("streams", "3"),
            ("timeout_ms", "1500"),
            ("busy_poll_us", "0"),
            ("device_name", "mlx5_0, mlx5_1"),
        ])
        .unwrap();
        assert_eq!(o.protocol, Protocol::Tcp);
        assert_eq!(o.ip_addr, Some("127.0.0.1".parse().unwrap()));
        assert_eq!(o.port, 12345);
        assert_eq!(o.streams, Some(3));
        assert_eq!(o.timeout, Duration::from_millis(1500));
        assert_eq!(o.busy_poll, Duration::ZERO);
        assert_eq!(o.device_names, vec!["mlx5_0", "mlx5_1"]);
    }

    #[test]
    fn invalid_values_name_the_option() {
        for (k, v) in [
            ("protocol", "bogus"),
            ("ip_addr", "1.2.3"),
            ("port", "70000"),
            ("port", "-1"),
            ("streams", "0"),
            ("streams", "many"),
            ("timeout_ms", "soon"),
            ("busy_poll_us", "-5"),
            ("busy_poll_us", "2000000"),
            ("device_name", "mlx5 0;rm"),
            ("gid_index", "256"),
            ("gid_index", "-1"),
            ("slice_size", "4095"),
            ("slice_size", "big"),
        ] {
            let err = Options::parse([(k, v)]).unwrap_err();
            assert!(matches!(err, Error::InvalidParam(_)));
            assert!(err.to_string().contains(k), "{err} should name {k}");
        }
    }

    #[test]
    fn unknown_options_are_ignored() {
        assert_eq!(
            Options::parse([("no_such_option", "1")]).unwrap(),
            Options::default()
        );
    }

    fn env_of(vars: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let vars: Vec<(String, String)> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        move |name| vars.iter().find(|(k, _)| k == name).map(|(_, v)| v.clone())
    }

    #[test]
    fn every_option_comes_from_its_environment_variable() {
        let r = Options::resolve(
            [],
            env_of(&[
                ("NIXL_MOONCAKE_PROTOCOL", "tcp"),
                ("NIXL_MOONCAKE_IP_ADDR", "127.0.0.1"),
                ("NIXL_MOONCAKE_PORT", "4321"),
                ("NIXL_MOONCAKE_STREAMS", "5"),
                ("NIXL_MOONCAKE_TIMEOUT_MS", "700"),
                ("NIXL_MOONCAKE_BUSY_POLL_US", "0"),
                ("NIXL_MOONCAKE_DEVICE_NAME", "mlx5_3"),
                ("NIXL_MOONCAKE_GID_INDEX", "3"),
                ("NIXL_MOONCAKE_SLICE_SIZE", "131072"),
            ]),
        )
        .unwrap();
        let o = &r.options;
        assert_eq!(o.gid_index, Some(3));
        assert_eq!(o.slice_size, 128 << 10);
        assert_eq!(o.protocol, Protocol::Tcp);
        assert_eq!(o.ip_addr, Some("127.0.0.1".parse().unwrap()));
        assert_eq!(o.port, 4321);
        assert_eq!(o.streams, Some(5));
        assert_eq!(o.timeout, Duration::from_millis(700));
        assert_eq!(o.busy_poll, Duration::ZERO);
        assert_eq!(o.device_names, vec!["mlx5_3"]);
        assert!(
            r.sources
                .iter()
                .all(|(name, _, src)| *src == Source::Env(env_var(name)))
        );
    }

    #[test]
    fn params_win_over_the_environment_which_wins_over_defaults() {
        let r = Options::resolve(
            [("protocol", "cma")],
            env_of(&[
                ("NIXL_MOONCAKE_PROTOCOL", "tcp"),
                ("NIXL_MOONCAKE_PORT", "99"),
            ]),
        )
        .unwrap();
        assert_eq!(r.options.protocol, Protocol::Cma);
        assert_eq!(r.options.port, 99);
        assert_eq!(r.options.streams, None);
        let line = r.describe();
        assert!(line.contains("protocol=\"cma\" (customParams)"), "{line}");
        assert!(
            line.contains("port=\"99\" (env NIXL_MOONCAKE_PORT)"),
            "{line}"
        );
        assert!(line.contains("streams=\"auto\" (default)"), "{line}");
    }

    #[test]
    fn an_invalid_environment_value_names_the_variable() {
        let err = Options::resolve([], env_of(&[("NIXL_MOONCAKE_STREAMS", "lots")])).unwrap_err();
        assert!(matches!(err, Error::InvalidParam(_)));
        assert!(err.to_string().contains("NIXL_MOONCAKE_STREAMS"), "{err}");
        // A valid parameter does not hide it: every source is checked.
        assert!(
            Options::resolve(
                [("streams", "2")],
                env_of(&[("NIXL_MOONCAKE_STREAMS", "lots")])
            )
            .is_err()
        );
    }
}
