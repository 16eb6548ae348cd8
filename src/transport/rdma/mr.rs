//! Memory registration on the NICs: a region is registered on every NIC
//! the transport uses, cut into pieces of at most the NIC's `max_mr_size`
//! (never truncated), with relaxed ordering where the library supports it.
//!
//! The pieces start at fixed multiples of the piece length from the
//! region's start, so a peer finds the rkey of any address from the
//! piece length and the list of rkeys alone
//! ([`RdmaKeys`](crate::wire::region::RdmaKeys)); transfers
//! are cut at piece boundaries on both sides.

use std::os::fd::BorrowedFd;
use std::sync::Arc;

use super::verbs::{Mr, Pd, sys};
use crate::common::{Error, Result};

/// The access every data region gets: written locally (READ answers land
/// in it), read and written by peers.
pub const DATA_ACCESS: i32 = sys::ACCESS_LOCAL_WRITE
    | sys::ACCESS_REMOTE_WRITE
    | sys::ACCESS_REMOTE_READ
    | sys::ACCESS_RELAXED_ORDERING;

/// The pieces `[addr, addr + len)` is registered in, at most `max` bytes
/// each: `(start, length)` in address order.
pub fn pieces(addr: u64, len: u64, max: u64) -> Vec<(u64, u64)> {
    let max = max.max(1);
    let mut out = Vec::with_capacity(len.div_ceil(max) as usize);
    let mut at = 0;
    while at < len {
        let n = (len - at).min(max);
        out.push((addr + at, n));
        at += n;
    }
    out
}

/// One region's registration on one NIC.
pub struct RegionMrs {
    /// Start of the region.
    pub addr: u64,
    /// Length of every piece but the last.
    pub piece_len: u64,
    /// The pieces, in address order.
    pub mrs: Vec<Mr>,
}

impl RegionMrs {
    /// Registers `[addr, addr + len)` on `pd` in pieces of at most
    /// `max_mr_size` bytes.
    ///
    /// # Errors
    /// When the NIC refuses a piece (the pieces registered so far are
    /// deregistered).
    ///
    /// # Safety
    /// The range must stay mapped until the result is dropped, and peers
    /// holding the rkeys may read and write it until then.
    pub unsafe fn register(pd: &Arc<Pd>, addr: u64, len: u64, max_mr_size: u64) -> Result<Self> {
        if len == 0 {
            return Err(Error::InvalidParam(
                "RDMA: cannot register an empty region".into(),
            ));
        }
        let mut mrs = Vec::new();
        for (start, n) in pieces(addr, len, max_mr_size) {
            // SAFETY: a sub-range of what the caller keeps mapped.
            mrs.push(unsafe { pd.reg_mr(start, n as usize, DATA_ACCESS) }?);
        }
        Ok(RegionMrs {
            addr,
            piece_len: max_mr_size.min(len),
            mrs,
        })
    }

    /// Registers GPU memory `[addr, addr + len)` on `pd` in pieces as
    /// [`Self::register`] does, through dmabuf `fd`, whose byte 0 is
    /// address `fd_base` (GPUDirect RDMA; the addresses stay the iova peers
    /// and work requests use).
    ///
    /// # Errors
    /// When the NIC refuses a piece (those registered so far are
    /// deregistered).
    ///
    /// # Safety
    /// The memory must stay allocated until the result is dropped, and
    /// peers holding the rkeys may read and write it until then.
    pub unsafe fn register_dmabuf(
        pd: &Arc<Pd>,
        fd: BorrowedFd<'_>,
        fd_base: u64,
        addr: u64,
        len: u64,
        max_mr_size: u64,
    ) -> Result<Self> {
        if len == 0 || addr < fd_base {
            return Err(Error::InvalidParam(format!(
                "RDMA: cannot register {addr:#x}+{len} through a dmabuf from {fd_base:#x}"
            )));
        }
        let mut mrs = Vec::new();
        for (start, n) in pieces(addr, len, max_mr_size) {
            // SAFETY: a sub-range of what the caller keeps allocated.
            mrs.push(unsafe {
                pd.reg_dmabuf_mr(fd, start - fd_base, n as usize, start, DATA_ACCESS)
            }?);
        }
        Ok(RegionMrs {
            addr,
            piece_len: max_mr_size.min(len),
            mrs,
        })
    }

    /// The lkey covering `[addr, addr + len)`, or `None` when the range is
    /// outside the region or crosses a piece boundary.
    pub fn lkey(&self, addr: u64, len: u64) -> Option<u32> {
        self.piece(addr, len).map(|m| m.lkey)
    }

    /// The rkey covering `[addr, addr + len)` (as [`Self::lkey`]).
    pub fn rkey(&self, addr: u64, len: u64) -> Option<u32> {
        self.piece(addr, len).map(|m| m.rkey)
    }

    fn piece(&self, addr: u64, len: u64) -> Option<&Mr> {
        let off = addr.checked_sub(self.addr)?;
        let mr = self.mrs.get((off / self.piece_len) as usize)?;
        (addr.checked_add(len)? <= mr.addr + mr.len as u64).then_some(mr)
    }

    /// The rkey of each piece, in order (what peers are told).
    pub fn rkeys(&self) -> Vec<u32> {
        self.mrs.iter().map(|m| m.rkey).collect()
    }
}

/// The next piece boundary after `addr` in a region starting at
/// `region_addr` cut every `piece_len` bytes (`u64::MAX` when beyond the
/// address space).
pub fn next_boundary(region_addr: u64, piece_len: u64, addr: u64) -> u64 {
    let piece_len = piece_len.max(1);
    let off = addr.saturating_sub(region_addr);
    (off / piece_len + 1)
        .checked_mul(piece_len)
        .and_then(|b| b.checked_add(region_addr))
        .unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pieces_cover_the_range_exactly() {
        assert_eq!(
            pieces(0x1000, 10, 4),
            vec![(0x1000, 4), (0x1004, 4), (0x1008, 2)]
        );
        assert_eq!(pieces(0x1000, 8, 4), vec![(0x1000, 4), (0x1004, 4)]);
        assert_eq!(pieces(0x1000, 3, u64::MAX), vec![(0x1000, 3)]);
        assert!(pieces(0x1000, 0, 4).is_empty());
    }

    #[test]
    fn boundaries() {
        assert_eq!(next_boundary(1000, 100, 1050), 1100);
        assert_eq!(next_boundary(1000, 100, 1100), 1200);
        assert_eq!(next_boundary(1000, u64::MAX, 5000), u64::MAX);
    }
}
