//! Our declarations of the verbs ABI (`<infiniband/verbs.h>`, rdma-core):
//! the structs, fields and constants the RDMA transport uses, written from
//! the header's definitions for x86-64 and aarch64 Linux.
//!
//! We declare them ourselves rather than run bindgen at build time, so that
//! `cargo build` needs neither libclang nor rdma-core's headers and still
//! yields a plugin with RDMA. Every size, offset and constant below is
//! checked against the system's real header by the test suite
//! ([`LAYOUT`], compared by `layout_matches_the_system_header` in
//! `super::tests`, which compiles a C program against `verbs.h`).
//!
//! Structs whose tail we never touch and never allocate ourselves
//! ([`Context`], [`Qp`], [`Cq`], [`Device`]) are declared as prefixes: we
//! only read them through pointers the library returned.

#![allow(missing_docs)] // field names are the header's; see verbs.h

use std::ffi::{c_char, c_int, c_uint, c_void};

/// `union ibv_gid`: 16 bytes, 8-aligned (it also has two `__be64` views).
#[repr(C, align(8))]
#[derive(Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct Gid {
    pub raw: [u8; 16],
}

impl std::fmt::Debug for Gid {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", std::net::Ipv6Addr::from(self.raw))
    }
}

/// `struct ibv_device` (what `ibv_get_device_list` returns).
#[repr(C)]
pub struct Device {
    pub _ops: [*mut c_void; 2],
    pub node_type: c_int,
    pub transport_type: c_int,
    pub name: [c_char; 64],
    pub dev_name: [c_char; 64],
    pub dev_path: [c_char; 256],
    pub ibdev_path: [c_char; 256],
}

/// `struct ibv_context_ops`: 37 function pointers; we call four of them,
/// as the header's inline functions do.
#[repr(C)]
pub struct ContextOps {
    pub _compat_before_poll_cq: [*mut c_void; 11],
    pub poll_cq: Option<unsafe extern "C" fn(*mut Cq, c_int, *mut Wc) -> c_int>,
    pub req_notify_cq: Option<unsafe extern "C" fn(*mut Cq, c_int) -> c_int>,
    pub _compat_before_post_send: [*mut c_void; 12],
    pub post_send: Option<unsafe extern "C" fn(*mut Qp, *mut SendWr, *mut *mut SendWr) -> c_int>,
    pub post_recv: Option<unsafe extern "C" fn(*mut Qp, *mut RecvWr, *mut *mut RecvWr) -> c_int>,
    pub _compat_after_post_recv: [*mut c_void; 5],
}

/// `struct ibv_context` (prefix: up to `num_comp_vectors`).
#[repr(C)]
pub struct Context {
    pub device: *mut Device,
    pub ops: ContextOps,
    pub cmd_fd: c_int,
    pub async_fd: c_int,
    pub num_comp_vectors: c_int,
}

/// `struct ibv_device_attr`.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct DeviceAttr {
    pub fw_ver: [c_char; 64],
    pub node_guid: u64,
    pub sys_image_guid: u64,
    pub max_mr_size: u64,
    pub page_size_cap: u64,
    pub vendor_id: u32,
    pub vendor_part_id: u32,
    pub hw_ver: u32,
    pub max_qp: c_int,
    pub max_qp_wr: c_int,
    pub device_cap_flags: c_uint,
    pub max_sge: c_int,
    pub max_sge_rd: c_int,
    pub max_cq: c_int,
    pub max_cqe: c_int,
    pub max_mr: c_int,
    pub max_pd: c_int,
    pub max_qp_rd_atom: c_int,
    pub max_ee_rd_atom: c_int,
    pub max_res_rd_atom: c_int,
    pub max_qp_init_rd_atom: c_int,
    pub max_ee_init_rd_atom: c_int,
    pub atomic_cap: c_int,
    pub max_ee: c_int,
    pub max_rdd: c_int,
    pub max_mw: c_int,
    pub max_raw_ipv6_qp: c_int,
    pub max_raw_ethy_qp: c_int,
    pub max_mcast_grp: c_int,
    pub max_mcast_qp_attach: c_int,
    pub max_total_mcast_qp_attach: c_int,
    pub max_ah: c_int,
    pub max_fmr: c_int,
    pub max_map_per_fmr: c_int,
    pub max_srq: c_int,
    pub max_srq_wr: c_int,
    pub max_srq_sge: c_int,
    pub max_pkeys: u16,
    pub local_ca_ack_delay: u8,
    pub phys_port_cnt: u8,
}

/// `struct ibv_port_attr` (the exported `ibv_query_port` fills it; the
/// header zeroes it first, and so do we).
#[repr(C)]
#[derive(Clone, Copy, Default)]
pub struct PortAttr {
    pub state: c_int,
    pub max_mtu: c_int,
    pub active_mtu: c_int,
    pub gid_tbl_len: c_int,
    pub port_cap_flags: u32,
    pub max_msg_sz: u32,
    pub bad_pkey_cntr: u32,
    pub qkey_viol_cntr: u32,
    pub pkey_tbl_len: u16,
    pub lid: u16,
    pub sm_lid: u16,
    pub lmc: u8,
    pub max_vl_num: u8,
    pub sm_sl: u8,
    pub subnet_timeout: u8,
    pub init_type_reply: u8,
    pub active_width: u8,
    pub active_speed: u8,
    pub phys_state: u8,
    pub link_layer: u8,
    pub flags: u8,
    pub port_cap_flags2: u16,
}

/// `struct ibv_gid_entry`.
#[repr(C)]
#[derive(Clone, Copy, Default, Debug)]
pub struct GidEntry {
    pub gid: Gid,
    pub gid_index: u32,
    pub port_num: u32,
    pub gid_type: u32,
    pub ndev_ifindex: u32,
}

/// `struct ibv_pd` (opaque to us).
#[repr(C)]
pub struct Pd {
    pub context: *mut Context,
    pub handle: u32,
}

/// `struct ibv_mr`.
#[repr(C)]
pub struct Mr {
    pub context: *mut Context,
    pub pd: *mut Pd,
    pub addr: *mut c_void,
    pub length: usize,
    pub handle: u32,
    pub lkey: u32,
    pub rkey: u32,
}

/// `struct ibv_comp_channel`.
#[repr(C)]
pub struct CompChannel {
    pub context: *mut Context,
    pub fd: c_int,
    pub refcnt: c_int,
}

/// `struct ibv_cq` (prefix: up to `cqe`).
#[repr(C)]
pub struct Cq {
    pub context: *mut Context,
    pub channel: *mut CompChannel,
    pub cq_context: *mut c_void,
    pub handle: u32,
    pub cqe: c_int,
}

/// `struct ibv_qp` (prefix: up to `qp_type`).
#[repr(C)]
pub struct Qp {
    pub context: *mut Context,
    pub qp_context: *mut c_void,
    pub pd: *mut Pd,
    pub send_cq: *mut Cq,
    pub recv_cq: *mut Cq,
    pub srq: *mut c_void,
    pub handle: u32,
    pub qp_num: u32,
    pub state: c_int,
    pub qp_type: c_int,
}

/// `struct ibv_qp_cap`.
#[repr(C)]
#[derive(Clone, Copy, Default, Debug)]
pub struct QpCap {
    pub max_send_wr: u32,
    pub max_recv_wr: u32,
    pub max_send_sge: u32,
    pub max_recv_sge: u32,
    pub max_inline_data: u32,
}

/// `struct ibv_qp_init_attr`.
#[repr(C)]
pub struct QpInitAttr {
    pub qp_context: *mut c_void,
    pub send_cq: *mut Cq,
    pub recv_cq: *mut Cq,
    pub srq: *mut c_void,
    pub cap: QpCap,
    pub qp_type: c_int,
    pub sq_sig_all: c_int,
}

/// `struct ibv_global_route`.
#[repr(C)]
#[derive(Clone, Copy, Default)]
pub struct GlobalRoute {
    pub dgid: Gid,
    pub flow_label: u32,
    pub sgid_index: u8,
    pub hop_limit: u8,
    pub traffic_class: u8,
}

/// `struct ibv_ah_attr`.
#[repr(C)]
#[derive(Clone, Copy, Default)]
pub struct AhAttr {
    pub grh: GlobalRoute,
    pub dlid: u16,
    pub sl: u8,
    pub src_path_bits: u8,
    pub static_rate: u8,
    pub is_global: u8,
    pub port_num: u8,
}

/// `struct ibv_qp_attr`.
#[repr(C)]
#[derive(Clone, Copy, Default)]
pub struct QpAttr {
    pub qp_state: c_int,
    pub cur_qp_state: c_int,
    pub path_mtu: c_int,
    pub path_mig_state: c_int,
    pub qkey: u32,
    pub rq_psn: u32,
    pub sq_psn: u32,
    pub dest_qp_num: u32,
    pub qp_access_flags: c_uint,
    pub cap: QpCap,
    pub ah_attr: AhAttr,
    pub alt_ah_attr: AhAttr,
    pub pkey_index: u16,
    pub alt_pkey_index: u16,
    pub en_sqd_async_notify: u8,
    pub sq_draining: u8,
    pub max_rd_atomic: u8,
    pub max_dest_rd_atomic: u8,
    pub min_rnr_timer: u8,
    pub port_num: u8,
    pub timeout: u8,
    pub retry_cnt: u8,
    pub rnr_retry: u8,
    pub alt_port_num: u8,
    pub alt_timeout: u8,
    pub rate_limit: u32,
}

/// `struct ibv_sge`.
#[repr(C)]
#[derive(Clone, Copy, Default, Debug)]
pub struct Sge {
    pub addr: u64,
    pub length: u32,
    pub lkey: u32,
}

/// The `rdma` member of `ibv_send_wr.wr`.
#[repr(C)]
#[derive(Clone, Copy, Default, Debug)]
pub struct RdmaWr {
    pub remote_addr: u64,
    pub rkey: u32,
}

/// `struct ibv_send_wr`. Of its unions we use `imm_data` and `wr.rdma`;
/// the rest is padding of the right size.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct SendWr {
    pub wr_id: u64,
    pub next: *mut SendWr,
    pub sg_list: *mut Sge,
    pub num_sge: c_int,
    pub opcode: c_uint,
    pub send_flags: c_uint,
    /// Network byte order.
    pub imm_data: u32,
    pub rdma: RdmaWr,
    /// The rest of the `wr` union (its `atomic` member is the largest).
    pub _wr_rest: [u64; 2],
    pub _qp_type: u32,
    /// The `bind_mw`/`tso` union.
    pub _bind_mw: [u64; 6],
}

impl Default for SendWr {
    fn default() -> Self {
        SendWr {
            wr_id: 0,
            next: std::ptr::null_mut(),
            sg_list: std::ptr::null_mut(),
            num_sge: 0,
            opcode: 0,
            send_flags: 0,
            imm_data: 0,
            rdma: RdmaWr::default(),
            _wr_rest: [0; 2],
            _qp_type: 0,
            _bind_mw: [0; 6],
        }
    }
}

/// `struct ibv_recv_wr`.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct RecvWr {
    pub wr_id: u64,
    pub next: *mut RecvWr,
    pub sg_list: *mut Sge,
    pub num_sge: c_int,
}

/// `struct ibv_wc`.
#[repr(C)]
#[derive(Clone, Copy, Default, Debug)]
pub struct Wc {
    pub wr_id: u64,
    pub status: c_int,
    pub opcode: c_int,
    pub vendor_err: u32,
    pub byte_len: u32,
    /// Network byte order.
    pub imm_data: u32,
    pub qp_num: u32,
    pub src_qp: u32,
    pub wc_flags: c_uint,
    pub pkey_index: u16,
    pub slid: u16,
    pub sl: u8,
    pub dlid_path_bits: u8,
}

// --- constants (values of the header's enums) ------------------------------

pub const NODE_CA: c_int = 1;
pub const PORT_ACTIVE: c_int = 4;
pub const LINK_LAYER_UNSPECIFIED: u8 = 0;
pub const LINK_LAYER_INFINIBAND: u8 = 1;
pub const LINK_LAYER_ETHERNET: u8 = 2;
pub const GID_TYPE_IB: u32 = 0;
pub const GID_TYPE_ROCE_V1: u32 = 1;
pub const GID_TYPE_ROCE_V2: u32 = 2;

pub const ACCESS_LOCAL_WRITE: c_int = 1;
pub const ACCESS_REMOTE_WRITE: c_int = 1 << 1;
pub const ACCESS_REMOTE_READ: c_int = 1 << 2;
pub const ACCESS_RELAXED_ORDERING: c_int = 1 << 20;

pub const QPT_RC: c_int = 2;
pub const QPS_RESET: c_int = 0;
pub const QPS_INIT: c_int = 1;
pub const QPS_RTR: c_int = 2;
pub const QPS_RTS: c_int = 3;
pub const QPS_ERR: c_int = 6;

pub const QP_STATE: c_int = 1;
pub const QP_ACCESS_FLAGS: c_int = 1 << 3;
pub const QP_PKEY_INDEX: c_int = 1 << 4;
pub const QP_PORT: c_int = 1 << 5;
pub const QP_AV: c_int = 1 << 7;
pub const QP_PATH_MTU: c_int = 1 << 8;
pub const QP_TIMEOUT: c_int = 1 << 9;
pub const QP_RETRY_CNT: c_int = 1 << 10;
pub const QP_RNR_RETRY: c_int = 1 << 11;
pub const QP_RQ_PSN: c_int = 1 << 12;
pub const QP_MAX_QP_RD_ATOMIC: c_int = 1 << 13;
pub const QP_MIN_RNR_TIMER: c_int = 1 << 15;
pub const QP_SQ_PSN: c_int = 1 << 16;
pub const QP_MAX_DEST_RD_ATOMIC: c_int = 1 << 17;
pub const QP_DEST_QPN: c_int = 1 << 20;

pub const WR_RDMA_WRITE: c_uint = 0;
pub const WR_RDMA_WRITE_WITH_IMM: c_uint = 1;
pub const WR_SEND: c_uint = 2;
pub const WR_SEND_WITH_IMM: c_uint = 3;
pub const WR_RDMA_READ: c_uint = 4;

pub const SEND_FENCE: c_uint = 1;
pub const SEND_SIGNALED: c_uint = 1 << 1;
pub const SEND_INLINE: c_uint = 1 << 3;

pub const WC_SUCCESS: c_int = 0;
pub const WC_LOC_LEN_ERR: c_int = 1;
pub const WC_LOC_PROT_ERR: c_int = 4;
pub const WC_WR_FLUSH_ERR: c_int = 5;
pub const WC_REM_INV_REQ_ERR: c_int = 9;
pub const WC_REM_ACCESS_ERR: c_int = 10;
pub const WC_REM_OP_ERR: c_int = 11;
pub const WC_RETRY_EXC_ERR: c_int = 12;
pub const WC_RNR_RETRY_EXC_ERR: c_int = 13;

pub const WC_SEND: c_int = 0;
pub const WC_RDMA_WRITE: c_int = 1;
pub const WC_RDMA_READ: c_int = 2;
pub const WC_RECV: c_int = 1 << 7;
pub const WC_RECV_RDMA_WITH_IMM: c_int = (1 << 7) + 1;
pub const WC_WITH_IMM: c_uint = 1 << 1;

/// `enum ibv_mtu`: 1 = 256 bytes ... 5 = 4096 bytes.
pub const MTU_256: c_int = 1;
pub const MTU_4096: c_int = 5;

/// One checked fact: a C expression over `verbs.h` and the value our
/// declarations give it.
pub type Fact = (&'static str, u64);

/// Declares [`LAYOUT`]: sizes and offsets as C expressions paired with the
/// Rust values, and constants paired with ours.
macro_rules! layout {
    (
        sizes { $($cty:literal => $rty:ty;)* }
        offsets { $($cstruct:literal, $cfield:literal => $rstruct:ty, $($rfield:ident).+;)* }
        consts { $($cname:literal => $rconst:expr;)* }
    ) => {
        /// Every size, offset and constant of this module, as (C expression
        /// over `<infiniband/verbs.h>`, our value).
        pub const LAYOUT: &[Fact] = &[
            $((concat!("sizeof(", $cty, ")"), std::mem::size_of::<$rty>() as u64),)*
            $((concat!("offsetof(", $cstruct, ", ", $cfield, ")"),
               std::mem::offset_of!($rstruct, $($rfield).+) as u64),)*
            $(($cname, $rconst as u64),)*
        ];
    };
}

layout! {
    sizes {
        "union ibv_gid" => Gid;
        "struct ibv_device_attr" => DeviceAttr;
        "struct ibv_port_attr" => PortAttr;
        "struct ibv_gid_entry" => GidEntry;
        "struct ibv_context_ops" => ContextOps;
        "struct ibv_mr" => Mr;
        "struct ibv_comp_channel" => CompChannel;
        "struct ibv_qp_cap" => QpCap;
        "struct ibv_qp_init_attr" => QpInitAttr;
        "struct ibv_global_route" => GlobalRoute;
        "struct ibv_ah_attr" => AhAttr;
        "struct ibv_qp_attr" => QpAttr;
        "struct ibv_sge" => Sge;
        "struct ibv_send_wr" => SendWr;
        "struct ibv_recv_wr" => RecvWr;
        "struct ibv_wc" => Wc;
    }
    offsets {
        "struct ibv_device", "node_type" => Device, node_type;
        "struct ibv_device", "name" => Device, name;
        "struct ibv_device", "ibdev_path" => Device, ibdev_path;
        "struct ibv_context", "ops" => Context, ops;
        "struct ibv_context", "cmd_fd" => Context, cmd_fd;
        "struct ibv_context", "async_fd" => Context, async_fd;
        "struct ibv_context", "num_comp_vectors" => Context, num_comp_vectors;
        "struct ibv_context_ops", "poll_cq" => ContextOps, poll_cq;
        "struct ibv_context_ops", "req_notify_cq" => ContextOps, req_notify_cq;
        "struct ibv_context_ops", "post_send" => ContextOps, post_send;
        "struct ibv_context_ops", "post_recv" => ContextOps, post_recv;
        "struct ibv_device_attr", "max_mr_size" => DeviceAttr, max_mr_size;
        "struct ibv_device_attr", "max_qp_wr" => DeviceAttr, max_qp_wr;
        "struct ibv_device_attr", "max_sge" => DeviceAttr, max_sge;
        "struct ibv_device_attr", "max_cqe" => DeviceAttr, max_cqe;
        "struct ibv_device_attr", "max_qp_rd_atom" => DeviceAttr, max_qp_rd_atom;
        "struct ibv_device_attr", "max_qp_init_rd_atom" => DeviceAttr, max_qp_init_rd_atom;
        "struct ibv_device_attr", "phys_port_cnt" => DeviceAttr, phys_port_cnt;
        "struct ibv_port_attr", "active_mtu" => PortAttr, active_mtu;
        "struct ibv_port_attr", "gid_tbl_len" => PortAttr, gid_tbl_len;
        "struct ibv_port_attr", "lid" => PortAttr, lid;
        "struct ibv_port_attr", "link_layer" => PortAttr, link_layer;
        "struct ibv_gid_entry", "gid_type" => GidEntry, gid_type;
        "struct ibv_gid_entry", "ndev_ifindex" => GidEntry, ndev_ifindex;
        "struct ibv_pd", "context" => Pd, context;
        "struct ibv_mr", "length" => Mr, length;
        "struct ibv_mr", "lkey" => Mr, lkey;
        "struct ibv_mr", "rkey" => Mr, rkey;
        "struct ibv_comp_channel", "fd" => CompChannel, fd;
        "struct ibv_cq", "channel" => Cq, channel;
        "struct ibv_cq", "cq_context" => Cq, cq_context;
        "struct ibv_cq", "cqe" => Cq, cqe;
        "struct ibv_qp", "qp_num" => Qp, qp_num;
        "struct ibv_qp", "state" => Qp, state;
        "struct ibv_qp_init_attr", "cap" => QpInitAttr, cap;
        "struct ibv_qp_init_attr", "qp_type" => QpInitAttr, qp_type;
        "struct ibv_qp_init_attr", "sq_sig_all" => QpInitAttr, sq_sig_all;
        "struct ibv_ah_attr", "dlid" => AhAttr, dlid;
        "struct ibv_ah_attr", "is_global" => AhAttr, is_global;
        "struct ibv_ah_attr", "port_num" => AhAttr, port_num;
        "struct ibv_global_route", "sgid_index" => GlobalRoute, sgid_index;
        "struct ibv_global_route", "hop_limit" => GlobalRoute, hop_limit;
        "struct ibv_qp_attr", "path_mtu" => QpAttr, path_mtu;
        "struct ibv_qp_attr", "rq_psn" => QpAttr, rq_psn;
        "struct ibv_qp_attr", "sq_psn" => QpAttr, sq_psn;
        "struct ibv_qp_attr", "dest_qp_num" => QpAttr, dest_qp_num;
        "struct ibv_qp_attr", "qp_access_flags" => QpAttr, qp_access_flags;
        "struct ibv_qp_attr", "ah_attr" => QpAttr, ah_attr;
        "struct ibv_qp_attr", "pkey_index" => QpAttr, pkey_index;
        "struct ibv_qp_attr", "max_rd_atomic" => QpAttr, max_rd_atomic;
        "struct ibv_qp_attr", "max_dest_rd_atomic" => QpAttr, max_dest_rd_atomic;
        "struct ibv_qp_attr", "min_rnr_timer" => QpAttr, min_rnr_timer;
        "struct ibv_qp_attr", "port_num" => QpAttr, port_num;
        "struct ibv_qp_attr", "timeout" => QpAttr, timeout;
        "struct ibv_qp_attr", "retry_cnt" => QpAttr, retry_cnt;
        "struct ibv_qp_attr", "rnr_retry" => QpAttr, rnr_retry;
        "struct ibv_send_wr", "next" => SendWr, next;
        "struct ibv_send_wr", "sg_list" => SendWr, sg_list;
        "struct ibv_send_wr", "num_sge" => SendWr, num_sge;
        "struct ibv_send_wr", "opcode" => SendWr, opcode;
        "struct ibv_send_wr", "send_flags" => SendWr, send_flags;
        "struct ibv_send_wr", "imm_data" => SendWr, imm_data;
        "struct ibv_send_wr", "wr.rdma.remote_addr" => SendWr, rdma.remote_addr;
        "struct ibv_send_wr", "wr.rdma.rkey" => SendWr, rdma.rkey;
        "struct ibv_recv_wr", "next" => RecvWr, next;
        "struct ibv_recv_wr", "sg_list" => RecvWr, sg_list;
        "struct ibv_recv_wr", "num_sge" => RecvWr, num_sge;
        "struct ibv_wc", "status" => Wc, status;
        "struct ibv_wc", "opcode" => Wc, opcode;
        "struct ibv_wc", "byte_len" => Wc, byte_len;
        "struct ibv_wc", "imm_data" => Wc, imm_data;
        "struct ibv_wc", "qp_num" => Wc, qp_num;
        "struct ibv_wc", "src_qp" => Wc, src_qp;
        "struct ibv_wc", "wc_flags" => Wc, wc_flags;
    }
    consts {
        "IBV_NODE_CA" => NODE_CA;
        "IBV_PORT_ACTIVE" => PORT_ACTIVE;
        "IBV_LINK_LAYER_UNSPECIFIED" => LINK_LAYER_UNSPECIFIED;
        "IBV_LINK_LAYER_INFINIBAND" => LINK_LAYER_INFINIBAND;
        "IBV_LINK_LAYER_ETHERNET" => LINK_LAYER_ETHERNET;
        "IBV_GID_TYPE_IB" => GID_TYPE_IB;
        "IBV_GID_TYPE_ROCE_V1" => GID_TYPE_ROCE_V1;
        "IBV_GID_TYPE_ROCE_V2" => GID_TYPE_ROCE_V2;
        "IBV_ACCESS_LOCAL_WRITE" => ACCESS_LOCAL_WRITE;
        "IBV_ACCESS_REMOTE_WRITE" => ACCESS_REMOTE_WRITE;
        "IBV_ACCESS_REMOTE_READ" => ACCESS_REMOTE_READ;
        "IBV_ACCESS_RELAXED_ORDERING" => ACCESS_RELAXED_ORDERING;
        "IBV_QPT_RC" => QPT_RC;
        "IBV_QPS_RESET" => QPS_RESET;
        "IBV_QPS_INIT" => QPS_INIT;
        "IBV_QPS_RTR" => QPS_RTR;
        "IBV_QPS_RTS" => QPS_RTS;
        "IBV_QPS_ERR" => QPS_ERR;
        "IBV_QP_STATE" => QP_STATE;
        "IBV_QP_ACCESS_FLAGS" => QP_ACCESS_FLAGS;
        "IBV_QP_PKEY_INDEX" => QP_PKEY_INDEX;
        "IBV_QP_PORT" => QP_PORT;
        "IBV_QP_AV" => QP_AV;
        "IBV_QP_PATH_MTU" => QP_PATH_MTU;
        "IBV_QP_TIMEOUT" => QP_TIMEOUT;
        "IBV_QP_RETRY_CNT" => QP_RETRY_CNT;
        "IBV_QP_RNR_RETRY" => QP_RNR_RETRY;
        "IBV_QP_RQ_PSN" => QP_RQ_PSN;
        "IBV_QP_MAX_QP_RD_ATOMIC" => QP_MAX_QP_RD_ATOMIC;
        "IBV_QP_MIN_RNR_TIMER" => QP_MIN_RNR_TIMER;
        "IBV_QP_SQ_PSN" => QP_SQ_PSN;
        "IBV_QP_MAX_DEST_RD_ATOMIC" => QP_MAX_DEST_RD_ATOMIC;
        "IBV_QP_DEST_QPN" => QP_DEST_QPN;
        "IBV_WR_RDMA_WRITE" => WR_RDMA_WRITE;
        "IBV_WR_RDMA_WRITE_WITH_IMM" => WR_RDMA_WRITE_WITH_IMM;
        "IBV_WR_SEND" => WR_SEND;
        "IBV_WR_SEND_WITH_IMM" => WR_SEND_WITH_IMM;
        "IBV_WR_RDMA_READ" => WR_RDMA_READ;
        "IBV_SEND_FENCE" => SEND_FENCE;
        "IBV_SEND_SIGNALED" => SEND_SIGNALED;
        "IBV_SEND_INLINE" => SEND_INLINE;
        "IBV_WC_SUCCESS" => WC_SUCCESS;
        "IBV_WC_LOC_LEN_ERR" => WC_LOC_LEN_ERR;
        "IBV_WC_LOC_PROT_ERR" => WC_LOC_PROT_ERR;
        "IBV_WC_WR_FLUSH_ERR" => WC_WR_FLUSH_ERR;
        "IBV_WC_REM_INV_REQ_ERR" => WC_REM_INV_REQ_ERR;
        "IBV_WC_REM_ACCESS_ERR" => WC_REM_ACCESS_ERR;
        "IBV_WC_REM_OP_ERR" => WC_REM_OP_ERR;
        "IBV_WC_RETRY_EXC_ERR" => WC_RETRY_EXC_ERR;
        "IBV_WC_RNR_RETRY_EXC_ERR" => WC_RNR_RETRY_EXC_ERR;
        "IBV_WC_SEND" => WC_SEND;
        "IBV_WC_RDMA_WRITE" => WC_RDMA_WRITE;
        "IBV_WC_RDMA_READ" => WC_RDMA_READ;
        "IBV_WC_RECV" => WC_RECV;
        "IBV_WC_RECV_RDMA_WITH_IMM" => WC_RECV_RDMA_WITH_IMM;
        "IBV_WC_WITH_IMM" => WC_WITH_IMM;
        "IBV_MTU_256" => MTU_256;
        "IBV_MTU_4096" => MTU_4096;
    }
}
