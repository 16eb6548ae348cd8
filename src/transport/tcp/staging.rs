//! GPU memory over TCP: frames whose memory is on a device move through a
//! pinned host buffer ([`cuda::HostBuffer`]).
//!
//! - Sending (an initiator's WRITE, a target's READ answer): the device
//!   copies the frame's ranges into the buffer ([`gather`]), waited for,
//!   then the buffer goes out on the socket.
//! - Receiving (a target's WRITE, an initiator's READ answer): the frame is
//!   received into the buffer, then the device copies it into the ranges
//!   ([`scatter`]), waited for, before the frame is acknowledged (target) or
//!   settled (initiator): an acknowledgement, and so a notification, means
//!   the bytes are in device memory.
//!
//! Both run under the caller's pins (and cancel lock), so deregistration and
//! release wait for the device copies as they wait for a system call.
//! Frames of one post travel on several streams at once, so the device
//! copies of one frame overlap the socket I/O of others.

use super::io::RawRange;
use crate::common::{LocalRegion, Result};
use crate::cuda::{self, Copier, HostBuffer};

/// The context to stage with, when one of `regions` is GPU memory.
pub fn device_context<'a>(regions: impl IntoIterator<Item = &'a LocalRegion>) -> Option<usize> {
    regions
        .into_iter()
        .find_map(|r| r.device.as_ref().map(|d| d.context))
}

/// A staging buffer for `len` bytes.
///
/// # Errors
/// Why the driver could not give one.
pub fn buffer(context: usize, len: usize) -> Result<HostBuffer> {
    HostBuffer::take(cuda::driver()?, context, len)
}

/// Copies `ranges` one after the other into the start of `bounce`, and
/// waits until the device is done.
///
/// # Errors
/// The device's error.
///
/// # Safety
/// Every range must stay allocated (registered and pinned) for the call,
/// and their total must fit in `bounce`.
pub unsafe fn gather(context: usize, ranges: &[RawRange], bounce: &HostBuffer) -> Result<()> {
    let mut copier = Copier::new(cuda::driver()?, context)?;
    let mut at = bounce.addr();
    for r in ranges.iter().filter(|r| r.len > 0) {
        // SAFETY: the caller keeps the range allocated; the buffer is ours
        // and fits (the caller's promise); both until the wait below.
        unsafe { copier.copy(at, r.addr, r.len as u64) }?;
        at += r.len as u64;
    }
    debug_assert!(at <= bounce.addr() + bounce.len() as u64);
    copier.wait()
}

/// Copies the start of `bounce` into `ranges` one after the other, and
/// waits until the device is done.
///
/// # Errors
/// The device's error.
///
/// # Safety
/// As [`gather`]; no other code reads or writes the ranges meanwhile.
pub unsafe fn scatter(context: usize, bounce: &HostBuffer, ranges: &[RawRange]) -> Result<()> {
    let mut copier = Copier::new(cuda::driver()?, context)?;
    let mut at = bounce.addr();
    for r in ranges.iter().filter(|r| r.len > 0) {
        // SAFETY: as in `gather`; nothing else touches the ranges.
        unsafe { copier.copy(r.addr, at, r.len as u64) }?;
        at += r.len as u64;
    }
    debug_assert!(at <= bounce.addr() + bounce.len() as u64);
    copier.wait()
}

/// Most bytes a target stages at a time (its buffers' size).
pub const STAGE_BYTES: usize = 1 << 20;

/// The part `[offset, offset+len)` of the concatenation of `ranges`.
pub fn window(ranges: &[RawRange], offset: usize, len: usize) -> Vec<RawRange> {
    let (mut skip, mut left) = (offset, len);
    let mut out = Vec::new();
    for r in ranges {
        if left == 0 {
            break;
        }
        if skip >= r.len {
            skip -= r.len;
            continue;
        }
        let n = (r.len - skip).min(left);
        out.push(RawRange {
            addr: r.addr + skip as u64,
            len: n,
        });
        left -= n;
        skip = 0;
    }
    out
}

/// The whole of `bounce`'s first `len` bytes as one range.
pub fn range_of(bounce: &HostBuffer, len: usize) -> RawRange {
    RawRange {
        addr: bounce.addr(),
        len,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn windows_cut_the_concatenation_of_ranges() {
        let r = |addr, len| RawRange { addr, len };
        let ranges = [r(100, 10), r(200, 0), r(300, 5), r(400, 20)];
        assert_eq!(window(&ranges, 0, 10), vec![r(100, 10)]);
        assert_eq!(
            window(&ranges, 8, 10),
            vec![r(108, 2), r(300, 5), r(400, 3)]
        );
        assert_eq!(window(&ranges, 15, 20), vec![r(400, 20)]);
        assert_eq!(window(&ranges, 30, 100), vec![r(415, 5)]);
        assert!(window(&ranges, 35, 1).is_empty());
        let total: usize = (0..35)
            .step_by(7)
            .map(|o| window(&ranges, o, 7).iter().map(|w| w.len).sum::<usize>())
            .sum();
        assert_eq!(total, 35);
    }
}
