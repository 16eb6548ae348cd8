//! Cutting a plan into the work requests of one post: slices of at most
//! the slice size, never crossing a memory-region piece on either side.

use super::mr::next_boundary;
use crate::transport::Plan;

/// One work request's worth of a plan.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Slice {
    /// Local start address.
    pub local_addr: u64,
    /// Remote start address.
    pub remote_addr: u64,
    /// Length in bytes (at most 2^31, a work request's limit).
    pub len: u32,
    /// Index into the plan's local regions.
    pub local: u32,
    /// Index into the plan's remote regions.
    pub remote: u32,
}

/// Where a region's registration pieces start: its first address and the
/// piece length (`u64::MAX` for one piece).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pieces {
    /// The region's first address.
    pub start: u64,
    /// Length of every piece but the last.
    pub len: u64,
}

/// The slices of `plan`, in order: each segment cut every `slice` bytes
/// (a shorter last slice of at most a quarter of `slice` is merged into the
/// one before it, as Mooncake does), and at the registration pieces of
/// its local (`local[i]`) and remote (`remote[i]`) region.
pub fn slices(plan: &Plan, slice: u64, local: &[Pieces], remote: &[Pieces]) -> Vec<Slice> {
    let slice = slice.clamp(1, 1 << 31);
    let mut out = Vec::with_capacity(plan.segments.len());
    for s in &plan.segments {
        let (lp, rp) = (local[s.local as usize], remote[s.remote as usize]);
        let mut off = 0;
        while off < s.len {
            let (la, ra) = (s.local_addr + off, s.remote_addr + off);
            let left = s.len - off;
            let mut n = if left <= slice + slice / 4 {
                left
            } else {
                slice
            };
            n = n.min(next_boundary(lp.start, lp.len, la) - la);
            n = n.min(next_boundary(rp.start, rp.len, ra) - ra);
            n = n.min(1 << 31);
            out.push(Slice {
                local_addr: la,
                remote_addr: ra,
                len: n as u32,
                local: s.local,
                remote: s.remote,
            });
            off += n;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::transport::{Op, Segment};

    fn plan(segs: &[(u64, u64, u64)]) -> Plan {
        Plan {
            op: Op::Write,
            segments: segs
                .iter()
                .map(|&(l, r, len)| Segment {
                    local: 0,
                    remote: 0,
                    local_addr: l,
                    remote_addr: r,
                    len,
                })
                .collect(),
            local_regions: Vec::new(),
            remote_regions: Vec::new(),
            remote_kinds: Vec::new(),
            remote_extent: Vec::new(),
            total_bytes: segs.iter().map(|s| s.2).sum(),
        }
    }

    const ONE: Pieces = Pieces {
        start: 0,
        len: u64::MAX,
    };

    fn lens(v: &[Slice]) -> Vec<u32> {
        v.iter().map(|s| s.len).collect()
    }

    #[test]
    fn cuts_every_slice_and_merges_a_short_tail() {
        let k = 64 << 10;
        let p = plan(&[(0x10000, 0x90000, 3 * k + 100), (0x1000, 0x2000, 10)]);
        let v = slices(&p, k, &[ONE], &[ONE]);
        assert_eq!(lens(&v), vec![k as u32, k as u32, k as u32 + 100, 10]);
        assert_eq!(v[1].local_addr, 0x10000 + k);
        assert_eq!(v[1].remote_addr, 0x90000 + k);
        // A tail over a quarter of a slice stays its own slice.
        let p = plan(&[(0, 0, k + k / 2)]);
        assert_eq!(
            lens(&slices(&p, k, &[ONE], &[ONE])),
            vec![k as u32, k as u32 / 2]
        );
        // Every byte once, in order.
        let p = plan(&[(7, 1_000_003, 1_000_000)]);
        let v = slices(&p, 4096, &[ONE], &[ONE]);
        assert_eq!(v.iter().map(|s| u64::from(s.len)).sum::<u64>(), 1_000_000);
        assert!(
            v.windows(2)
                .all(|w| w[0].local_addr + u64::from(w[0].len) == w[1].local_addr)
        );
    }

    #[test]
    fn never_crosses_a_registration_piece() {
        // Local pieces every 100 bytes from 1000, remote every 70 from 5000.
        let lp = Pieces {
            start: 1000,
            len: 100,
        };
        let rp = Pieces {
            start: 5000,
            len: 70,
        };
        let p = plan(&[(1050, 5010, 300)]);
        let v = slices(&p, 1 << 20, &[lp], &[rp]);
        for s in &v {
            let (l0, l1) = (s.local_addr, s.local_addr + u64::from(s.len) - 1);
            let (r0, r1) = (s.remote_addr, s.remote_addr + u64::from(s.len) - 1);
            assert_eq!((l0 - 1000) / 100, (l1 - 1000) / 100, "{s:?}");
            assert_eq!((r0 - 5000) / 70, (r1 - 5000) / 70, "{s:?}");
        }
        assert_eq!(v.iter().map(|s| u64::from(s.len)).sum::<u64>(), 300);
    }
}
