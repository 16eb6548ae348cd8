//! Which NICs and ports the RDMA transport uses, and how peers address
//! them: the GID (RoCE) or LID (InfiniBand), the MTU, the limits, the NUMA
//! node.
//!
//! - Every port in state ACTIVE of every device, or only the devices the
//!   `device_name` option lists.
//! - RoCE GID choice ([`choose_gid`]): RoCEv2 before RoCEv1, an
//!   IPv4-mapped address before a global IPv6 one, only on a network
//!   interface that is up, never a link-local (`fe80::/10`) GID; the
//!   `gid_index` option overrides. InfiniBand ports are addressed by LID
//!   (their GID 0 is link-local by design, and fine there).
//! - The NUMA node comes from the device's sysfs directory
//!   (`<ibdev_path>/device/numa_node`).

use std::ffi::c_int;
use std::net::Ipv6Addr;
use std::sync::Arc;

use super::verbs::{self, Context, GidInfo, sys};
use crate::common::{Error, Result};

/// The link layer of a port.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum LinkLayer {
    /// InfiniBand: addressed by LID.
    Infiniband,
    /// RoCE: addressed by GID.
    Ethernet,
}

/// How a GID looks, for ranking.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Address {
    /// `fe80::/10`: never used on RoCE (not routable, often duplicated).
    LinkLocal,
    /// A global IPv6 address.
    GlobalV6,
    /// `::ffff:a.b.c.d`.
    V4Mapped,
}

fn address(gid: &sys::Gid) -> Option<Address> {
    let ip = Ipv6Addr::from(gid.raw);
    if ip.is_unspecified() {
        return None;
    }
    if ip.segments()[0] & 0xffc0 == 0xfe80 {
        return Some(Address::LinkLocal);
    }
    if ip.to_ipv4_mapped().is_some() {
        return Some(Address::V4Mapped);
    }
    Some(Address::GlobalV6)
}

/// The RoCE GID of `table` peers should use: RoCEv2 before RoCEv1 (an
/// unknown type ranks last), IPv4-mapped before global IPv6, never
/// link-local, never on an interface `iface_up` says is down; the lowest
/// index among equals. `None` when no entry qualifies.
pub fn choose_gid(table: &[GidInfo], iface_up: impl Fn(u32) -> bool) -> Option<GidInfo> {
    let version_rank = |t: Option<u32>| match t {
        Some(sys::GID_TYPE_ROCE_V2) => 2,
        Some(sys::GID_TYPE_ROCE_V1) => 1,
        _ => 0,
    };
    table
        .iter()
        .filter(|g| matches!(address(&g.gid), Some(a) if a != Address::LinkLocal))
        .filter(|g| g.ifindex.is_none_or(&iface_up))
        .max_by_key(|g| {
            (
                version_rank(g.gid_type),
                address(&g.gid),
                std::cmp::Reverse(g.index),
            )
        })
        .copied()
}

/// True unless the network interface `ifindex` is known to be down.
pub fn iface_up(ifindex: u32) -> bool {
    let mut name = [0 as libc::c_char; libc::IF_NAMESIZE];
    // SAFETY: `name` has the IF_NAMESIZE bytes if_indextoname may write.
    let p = unsafe { libc::if_indextoname(ifindex, name.as_mut_ptr()) };
    if p.is_null() {
        return false; // no such interface
    }
    // SAFETY: if_indextoname wrote a NUL-terminated name.
    let name = unsafe { std::ffi::CStr::from_ptr(name.as_ptr()) }.to_string_lossy();
    std::fs::read_to_string(format!("/sys/class/net/{name}/flags"))
        .ok()
        .and_then(|s| u32::from_str_radix(s.trim().trim_start_matches("0x"), 16).ok())
        .is_none_or(|flags| flags & libc::IFF_UP as u32 != 0)
}

/// The RoCE type of GID `index` of `port` from sysfs (for libraries
/// without `_ibv_query_gid_ex`): `gid_attrs/types/<index>` says
/// "RoCE v2" or "IB/RoCE v1".
fn sysfs_gid_type(ibdev_path: &str, port: u8, index: u32) -> Option<u32> {
    let s = std::fs::read_to_string(format!("{ibdev_path}/ports/{port}/gid_attrs/types/{index}"))
        .ok()?;
    Some(if s.contains("v2") {
        sys::GID_TYPE_ROCE_V2
    } else {
        sys::GID_TYPE_ROCE_V1
    })
}

/// The NUMA node of the memory at `addr` (`get_mempolicy` with
/// `MPOL_F_NODE | MPOL_F_ADDR`), `None` when the kernel does not say.
pub fn numa_node_of(addr: u64) -> Option<i32> {
    const MPOL_F_NODE: libc::c_ulong = 1;
    const MPOL_F_ADDR: libc::c_ulong = 2;
    let mut node: libc::c_int = -1;
    // SAFETY: get_mempolicy writes one int to `node` and reads nothing
    // else (no node mask: null with size 0); `addr` is only looked up.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_get_mempolicy,
            &mut node as *mut libc::c_int,
            std::ptr::null_mut::<libc::c_ulong>(),
            0 as libc::c_ulong,
            addr as *mut libc::c_void,
            MPOL_F_NODE | MPOL_F_ADDR,
        )
    };
    (rc == 0 && node >= 0).then_some(node)
}

/// The NUMA node of a device from `<ibdev_path>/device/numa_node`.
fn sysfs_numa(ibdev_path: &str) -> Option<i32> {
    std::fs::read_to_string(format!("{ibdev_path}/device/numa_node"))
        .ok()?
        .trim()
        .parse()
        .ok()
        .filter(|&n: &i32| n >= 0)
}

/// What the transport is told about devices (from the backend's options).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DeviceConfig {
    /// Only these devices (the `device_name` option, comma-separated);
    /// empty = every device with an active port.
    pub names: Vec<String>,
    /// The GID index to use on every RoCE port (the `gid_index` option)
    /// instead of our choice.
    pub gid_index: Option<u32>,
}

/// One usable port of one NIC.
pub struct Nic {
    /// The open device.
    pub ctx: Arc<Context>,
    /// The port number (from 1).
    pub port: u8,
    /// Its link layer.
    pub link: LinkLayer,
    /// Its LID (InfiniBand).
    pub lid: u16,
    /// The GID peers address (RoCE: the chosen one; InfiniBand: index 0).
    pub gid: GidInfo,
    /// The port's active MTU (`enum ibv_mtu`).
    pub mtu: c_int,
    /// The device's NUMA node, when sysfs says.
    pub numa: Option<i32>,
    /// The device's limits.
    pub limits: Limits,
}

/// The device limits the transport sizes itself by.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Largest memory region (`max_mr_size`).
    pub max_mr_size: u64,
    /// Work requests per queue (`max_qp_wr`).
    pub max_qp_wr: u32,
    /// Entries per completion queue (`max_cqe`).
    pub max_cqe: u32,
    /// Outstanding RDMA READs per QP, as initiator and as target.
    pub max_rd_atomic: u8,
    /// Scatter-gather entries per work request.
    pub max_sge: u32,
}

impl Nic {
    /// The device's name.
    pub fn name(&self) -> &str {
        self.ctx.name()
    }
}

impl std::fmt::Debug for Nic {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}:{} ({:?}, lid {}, gid[{}] {:?}, mtu {}, numa {:?})",
            self.name(),
            self.port,
            self.link,
            self.lid,
            self.gid.index,
            self.gid.gid,
            128 << self.mtu,
            self.numa
        )
    }
}

/// Opens the NICs `config` selects: every active port, with its address.
///
/// # Errors
/// [`Error::NotSupported`] with the reason when the verbs library is
/// missing, no device exists, a named device does not, or no port is
/// usable (each skipped port is logged with why).
pub fn discover(config: &DeviceConfig) -> Result<Vec<Nic>> {
    let verbs = verbs::verbs()?;
    let list = verbs.devices()?;
    if list.is_empty() {
        return Err(Error::NotSupported(format!(
            "RDMA is unavailable: {} lists no RDMA device",
            verbs.path
        )));
    }
    let names: Vec<String> = (0..list.len()).map(|i| list.name(i)).collect();
    for wanted in &config.names {
        if !names.contains(wanted) {
            return Err(Error::NotSupported(format!(
                "RDMA: device_name names {wanted:?}, which does not exist (devices: {})",
                names.join(", ")
            )));
        }
    }
    let mut nics = Vec::new();
    let mut skipped = Vec::new();
    for (i, name) in names.iter().enumerate() {
        if !config.names.is_empty() && !config.names.contains(name) {
            continue;
        }
        match open_ports(&list, i, config) {
            Ok(mut ports) if !ports.is_empty() => nics.append(&mut ports),
            Ok(_) => skipped.push(format!("{name}: no active port")),
            Err(e) => skipped.push(format!("{name}: {e}")),
        }
    }
    for why in &skipped {
        log::warn!("Mooncake: RDMA device skipped: {why}");
    }
    if nics.is_empty() {
        return Err(Error::NotSupported(format!(
            "RDMA is unavailable: no usable RDMA port ({})",
            skipped.join("; ")
        )));
    }
    Ok(nics)
}

fn open_ports(list: &verbs::DeviceList, i: usize, config: &DeviceConfig) -> Result<Vec<Nic>> {
    let ctx = list.open(i)?;
    let attr = ctx.query_device()?;
    let ibdev_path = list.ibdev_path(i);
    let limits = Limits {
        max_mr_size: attr.max_mr_size,
        max_qp_wr: attr.max_qp_wr.max(1) as u32,
        max_cqe: attr.max_cqe.max(1) as u32,
        max_rd_atomic: attr.max_qp_rd_atom.clamp(1, 255) as u8,
        max_sge: attr.max_sge.max(1) as u32,
    };
    let mut nics = Vec::new();
    for port in 1..=attr.phys_port_cnt {
        let pa = ctx.query_port(port)?;
        if pa.state != sys::PORT_ACTIVE {
            continue;
        }
        let link = match pa.link_layer {
            sys::LINK_LAYER_ETHERNET => LinkLayer::Ethernet,
            _ => LinkLayer::Infiniband,
        };
        let gid = match (link, config.gid_index) {
            (LinkLayer::Infiniband, _) => ctx.query_gid(port, 0),
            (LinkLayer::Ethernet, Some(index)) => ctx.query_gid(port, index),
            (LinkLayer::Ethernet, None) => {
                let table: Vec<GidInfo> = (0..pa.gid_tbl_len.max(0) as u32)
                    .filter_map(|idx| ctx.query_gid(port, idx))
                    .map(|mut g| {
                        if g.gid_type.is_none() {
                            g.gid_type = sysfs_gid_type(&ibdev_path, port, g.index);
                        }
                        g
                    })
                    .collect();
                let chosen = choose_gid(&table, iface_up);
                if chosen.is_none() {
                    log::warn!(
                        "Mooncake: RDMA {}:{port}: no usable GID (only link-local or on \
                         interfaces that are down: {table:?}); set gid_index to choose one",
                        ctx.name()
                    );
                }
                chosen
            }
        };
        let Some(gid) = gid else { continue };
        nics.push(Nic {
            ctx: ctx.clone(),
            port,
            link,
            lid: pa.lid,
            gid,
            mtu: pa.active_mtu,
            numa: sysfs_numa(&ibdev_path),
            limits,
        });
    }
    Ok(nics)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A GID table row: index, GID as text, type, ifindex.
    fn row(index: u32, gid: &str, ty: u32, ifindex: u32) -> GidInfo {
        GidInfo {
            index,
            gid: sys::Gid {
                raw: gid.parse::<Ipv6Addr>().unwrap().octets(),
            },
            gid_type: Some(ty),
            ifindex: Some(ifindex),
        }
    }

    const V1: u32 = sys::GID_TYPE_ROCE_V1;
    const V2: u32 = sys::GID_TYPE_ROCE_V2;

    /// The usual ConnectX port with one IPv4 address (`show_gids`).
    #[test]
    fn prefers_rocev2_ipv4_mapped() {
        let t = [
            row(0, "fe80::e42:a1ff:fe9e:1c4a", V1, 4),
            row(1, "fe80::e42:a1ff:fe9e:1c4a", V2, 4),
            row(2, "::ffff:10.0.0.1", V1, 4),
            row(3, "::ffff:10.0.0.1", V2, 4),
        ];
        assert_eq!(choose_gid(&t, |_| true).unwrap().index, 3);
    }

    /// A port with an IPv6 global address and IPv4 (order as the kernel
    /// adds them): IPv4-mapped RoCEv2 wins; without IPv4, global IPv6 v2.
    #[test]
    fn ipv4_before_global_ipv6_and_ipv6_before_nothing() {
        let t = [
            row(0, "fe80::bace:f6ff:fe12:3456", V1, 7),
            row(1, "fe80::bace:f6ff:fe12:3456", V2, 7),
            row(2, "2001:db8:1::5", V1, 7),
            row(3, "2001:db8:1::5", V2, 7),
            row(4, "::ffff:192.168.10.5", V1, 7),
            row(5, "::ffff:192.168.10.5", V2, 7),
        ];
        assert_eq!(choose_gid(&t, |_| true).unwrap().index, 5);
        assert_eq!(choose_gid(&t[..4], |_| true).unwrap().index, 3);
    }

    /// Link-local only (an interface without addresses, Mooncake #946):
    /// nothing qualifies, so the operator is told to pick one.
    #[test]
    fn never_link_local() {
        let t = [
            row(0, "fe80::e42:a1ff:fe9e:1c4a", V1, 4),
            row(1, "fe80::e42:a1ff:fe9e:1c4a", V2, 4),
        ];
        assert!(choose_gid(&t, |_| true).is_none());
    }

    /// A VLAN interface that is down carries the first IPv4 GIDs; the ones
    /// on the up interface win even at higher indices.
    #[test]
    fn skips_interfaces_that_are_down() {
        let t = [
            row(0, "fe80::e42:a1ff:fe9e:1c4a", V1, 4),
            row(1, "fe80::e42:a1ff:fe9e:1c4a", V2, 4),
            row(2, "::ffff:10.1.0.1", V1, 9),
            row(3, "::ffff:10.1.0.1", V2, 9),
            row(4, "::ffff:10.0.0.1", V1, 4),
            row(5, "::ffff:10.0.0.1", V2, 4),
        ];
        assert_eq!(choose_gid(&t, |i| i != 9).unwrap().index, 5);
        assert_eq!(choose_gid(&t, |_| true).unwrap().index, 3);
    }

    /// RoCEv1-only ports still work; unknown types rank last.
    #[test]
    fn rocev1_and_unknown_types() {
        let mut t = vec![row(0, "::ffff:10.0.0.1", V1, 4)];
        assert_eq!(choose_gid(&t, |_| true).unwrap().index, 0);
        t.push(GidInfo {
            gid_type: None,
            ..row(1, "::ffff:10.0.0.2", V1, 4)
        });
        assert_eq!(choose_gid(&t, |_| true).unwrap().index, 0);
    }

    #[test]
    fn memory_has_a_numa_node() {
        let v = vec![1u8; 4096];
        // Single-node machines say 0; the call must not fail on touched memory.
        assert!(numa_node_of(v.as_ptr() as u64).is_some_and(|n| n >= 0));
    }

    #[test]
    fn loopback_is_up() {
        // SAFETY: a NUL-terminated name.
        let lo = unsafe { libc::if_nametoindex(c"lo".as_ptr()) };
        assert!(lo > 0 && iface_up(lo));
        assert!(!iface_up(999_999));
    }
}
