//! Connecting an RC queue pair to a peer's: the addresses the two sides
//! exchange over the TCP control link, and the RESET -> INIT -> RTR -> RTS
//! transitions (and ERR for draining).

use super::device::{LinkLayer, Nic};
use super::mr::DATA_ACCESS;
use super::verbs::{Qp, sys};
use crate::common::Result;
use crate::wire::rdma::QpAddress;

/// Transport timing of the connected QPs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timing {
    /// Local ACK timeout exponent: 4.096 us * 2^timeout per try.
    pub timeout: u8,
    /// Retries before a silent peer fails the work (`RETRY_EXC_ERR`).
    pub retry_cnt: u8,
    /// Retries of a receiver-not-ready NAK; 7 = forever.
    pub rnr_retry: u8,
    /// The RNR delay code we ask senders to wait (12 = 0.64 ms).
    pub min_rnr_timer: u8,
}

impl Default for Timing {
    /// About 67 ms per try and 7 retries: a dead peer fails outstanding
    /// work in about half a second (the TCP control link usually says so
    /// first). Receivers always have buffers posted, so RNR never ends.
    fn default() -> Self {
        Timing {
            timeout: 14,
            retry_cnt: 7,
            rnr_retry: 7,
            min_rnr_timer: 12,
        }
    }
}

/// A random 24-bit PSN.
pub fn random_psn() -> u32 {
    let mut b = [0u8; 4];
    getrandom::fill(&mut b).expect("the OS random source works");
    u32::from_le_bytes(b) & 0x00ff_ffff
}

/// Our address for `qp` on `nic`, with first PSN `psn`.
pub fn address(qp: &Qp, nic: &Nic, psn: u32) -> QpAddress {
    QpAddress {
        qpn: qp.qp_num,
        psn,
        lid: nic.lid,
        gid: nic.gid.gid.raw,
        mtu: nic.mtu,
        rd_atomic: nic.limits.max_rd_atomic,
    }
}

/// Moves `qp` (in RESET) on `nic` to RTS, connected to `remote`, sending
/// from `local_psn`.
///
/// # Errors
/// When the NIC refuses a transition (the QP is left as it was then).
pub fn connect(qp: &Qp, nic: &Nic, local_psn: u32, remote: &QpAddress, t: Timing) -> Result<()> {
    // Our READs outstanding at once: what both devices allow; as target,
    // what ours serves.
    let rd_atomic = nic.limits.max_rd_atomic.min(remote.rd_atomic.max(1));
    let init = sys::QpAttr {
        qp_state: sys::QPS_INIT,
        pkey_index: 0,
        port_num: nic.port,
        qp_access_flags: (DATA_ACCESS & !sys::ACCESS_RELAXED_ORDERING) as u32,
        ..Default::default()
    };
    qp.modify(
        &init,
        sys::QP_STATE | sys::QP_PKEY_INDEX | sys::QP_PORT | sys::QP_ACCESS_FLAGS,
        "to INIT",
    )?;
    let mut rtr = sys::QpAttr {
        qp_state: sys::QPS_RTR,
        path_mtu: nic.mtu.min(remote.mtu).max(sys::MTU_256),
        dest_qp_num: remote.qpn,
        rq_psn: remote.psn,
        max_dest_rd_atomic: nic.limits.max_rd_atomic,
        min_rnr_timer: t.min_rnr_timer,
        ..Default::default()
    };
    rtr.ah_attr.port_num = nic.port;
    rtr.ah_attr.dlid = remote.lid;
    if nic.link == LinkLayer::Ethernet {
        rtr.ah_attr.is_global = 1;
        rtr.ah_attr.grh.dgid = sys::Gid { raw: remote.gid };
        rtr.ah_attr.grh.sgid_index = nic.gid.index as u8;
        rtr.ah_attr.grh.hop_limit = 64;
    }
    qp.modify(
        &rtr,
        sys::QP_STATE
            | sys::QP_AV
            | sys::QP_PATH_MTU
            | sys::QP_DEST_QPN
            | sys::QP_RQ_PSN
            | sys::QP_MAX_DEST_RD_ATOMIC
            | sys::QP_MIN_RNR_TIMER,
        "to RTR",
    )?;
    let rts = sys::QpAttr {
        qp_state: sys::QPS_RTS,
        timeout: t.timeout,
        retry_cnt: t.retry_cnt,
        rnr_retry: t.rnr_retry,
        sq_psn: local_psn,
        max_rd_atomic: rd_atomic,
        ..Default::default()
    };
    qp.modify(
        &rts,
        sys::QP_STATE
            | sys::QP_TIMEOUT
            | sys::QP_RETRY_CNT
            | sys::QP_RNR_RETRY
            | sys::QP_SQ_PSN
            | sys::QP_MAX_QP_RD_ATOMIC,
        "to RTS",
    )
}

/// Moves `qp` to ERR: every outstanding work request completes (flushed),
/// so it can be drained and destroyed. Never RESET with work outstanding:
/// that drops work requests without completions.
///
/// # Errors
/// When the NIC refuses.
pub fn to_error(qp: &Qp) -> Result<()> {
    let attr = sys::QpAttr {
        qp_state: sys::QPS_ERR,
        ..Default::default()
    };
    qp.modify(&attr, sys::QP_STATE, "to ERR")
}
