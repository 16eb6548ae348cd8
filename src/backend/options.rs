//! Backend options: the `customParams` NIXL hands to `create_engine`, their
//! defaults (reported through `get_backend_options`), and their validation.

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
               same host: cross-memory attach, else TCP); tcp, cma or rdma force that \
               transport for every peer",
    },
    OptionSpec {
        name: "ip_addr",
        default: "",
        help: "IP address to listen on and publish; empty: NIXL_MOONCAKE_IP_ADDR, \
               else the first UP non-loopback IPv4 address, else 127.0.0.1",
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
        help: "a peer that answers nothing for this long while transfers to it are \
               outstanding is declared dead (NIXL_ERR_REMOTE_DISCONNECT); 0 disables",
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
        }
    }
}

impl Options {
    /// Parses `customParams`. Unknown keys are logged as warnings and ignored;
    /// an invalid value is an error naming the option.
    ///
    /// # Errors
    /// [`Error::InvalidParam`] when a known option has a value it cannot take.
    pub fn parse<'a>(params: impl IntoIterator<Item = (&'a str, &'a str)>) -> Result<Options> {
        let mut opts = Options::default();
        for (key, value) in params {
            let value = value.trim();
            match key {
                "protocol" => {
                    opts.protocol = Protocol::parse(value).ok_or_else(|| {
                        invalid(key, value, "expected one of auto, tcp, cma, rdma")
                    })?;
                }
                "ip_addr" => {
                    opts.ip_addr =
                        if value.is_empty() {
                            None
                        } else {
                            Some(value.parse().map_err(|_| {
                                invalid(key, value, "expected an IPv4 or IPv6 address")
                            })?)
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
                _ => warn!("Mooncake: ignoring unknown backend option {key:?} (value {value:?})"),
            }
        }
        Ok(opts)
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
}
