//! Notifications that must not be lost to a broken connection: the sender's
//! outbox (what a [`super::PeerLink`] sent and its peer has not acknowledged
//! yet, kept across its connection sets) and the target's record of what it
//! delivered (so that one sent again is delivered once).
//!
//! Each link numbers its notifications 1, 2, 3, ... and sends the numbers
//! with its own random id (Notif's `tag` and `aux`). A target that
//! acknowledges notifications (it says so in its HelloOk) answers each with
//! a `NotifAck` (or a `NotifRefused`) and delivers a (sender, link, number)
//! once ([`Delivered`]). Until acknowledged a notification stays in the
//! sender's [`Outbox`]:
//!
//! - one outside any transfer (`genNotif`) from the moment it is queued (the
//!   caller was told it is on its way);
//! - a transfer's from the moment its first byte is sent (the transfer
//!   completes once it is written; one cut short while being written fails
//!   its transfer instead, and is forgotten): while it is being written it
//!   is not sent again elsewhere.
//!
//! Each entry remembers the connection set it was queued on; those of a set
//! that failed are queued again on the next one (first, when that set was
//! opened for them). At most [`MAX_UNACKED`] notifications or
//! [`MAX_UNACKED_BYTES`] wait at once; the link gives them up (with a log
//! line) once it could not bring them to the peer for a while.
//!
//! A target of an older build acknowledges nothing: its notifications are
//! forgotten once written, as before.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use parking_lot::{Condvar, Mutex};

/// Most unacknowledged notifications of one link: beyond, `genNotif` fails.
pub(super) const MAX_UNACKED: usize = 16384;
/// Most bytes of unacknowledged notifications of one link: as much as a
/// target's inbox takes from all its senders, so that a sender is never
/// refused here what the target would still take.
pub(super) const MAX_UNACKED_BYTES: usize = 256 << 20;

/// One unacknowledged notification.
struct Entry {
    msg: std::sync::Arc<[u8]>,
    /// The connection set it was last queued on.
    set: u64,
    /// A transfer's notification being written: not to be sent elsewhere
    /// until it was (or to be forgotten if that fails).
    writing: bool,
}

/// The entries, their bytes, and since when the link failed to bring them
/// to the peer.
#[derive(Default)]
struct Entries {
    by_seq: BTreeMap<u64, Entry>,
    bytes: usize,
    stuck_since: Option<Instant>,
}

/// Unacknowledged notifications of one link, by sequence number.
pub(super) struct Outbox {
    /// The link's id, sent with every notification (random: unique for the
    /// sender engine with overwhelming probability, across restarts too).
    pub(super) id: u64,
    next: AtomicU64,
    unacked: Mutex<Entries>,
    /// Signalled when an entry goes.
    drained: Condvar,
    /// A thread is bringing the link back to send them again.
    pub(super) redelivering: AtomicBool,
}

impl Default for Outbox {
    fn default() -> Self {
        Outbox {
            id: crate::common::memory::random_u64(),
            next: AtomicU64::new(1),
            unacked: Mutex::default(),
            drained: Condvar::new(),
            redelivering: AtomicBool::new(false),
        }
    }
}

impl Outbox {
    /// The next sequence number (never 0: that means "no acknowledgement").
    pub(super) fn next_seq(&self) -> u64 {
        self.next.fetch_add(1, Ordering::Relaxed)
    }

    /// Keeps `msg` (number `seq`, queued on connection set `set`) until it
    /// is acknowledged; `writing`: a transfer's, being written now.
    pub(super) fn keep(&self, seq: u64, msg: &std::sync::Arc<[u8]>, set: u64, writing: bool) {
        let mut e = self.unacked.lock();
        e.bytes += msg.len();
        let entry = Entry {
            msg: msg.clone(),
            set,
            writing,
        };
        if let Some(old) = e.by_seq.insert(seq, entry) {
            e.bytes -= old.msg.len();
        }
    }

    /// Keeps `msg` like [`Outbox::keep`] unless the link holds its limit
    /// of unacknowledged notifications already.
    ///
    /// # Errors
    /// A sentence saying how many wait.
    pub(super) fn admit(
        &self,
        seq: u64,
        msg: &std::sync::Arc<[u8]>,
        set: u64,
    ) -> std::result::Result<(), String> {
        let mut e = self.unacked.lock();
        Self::check_room(&e, msg.len())?;
        e.bytes += msg.len();
        let entry = Entry {
            msg: msg.clone(),
            set,
            writing: false,
        };
        if let Some(old) = e.by_seq.insert(seq, entry) {
            e.bytes -= old.msg.len();
        }
        Ok(())
    }

    /// Whether a notification of `len` bytes would fit now.
    ///
    /// # Errors
    /// As [`Outbox::admit`].
    pub(super) fn room_for(&self, len: usize) -> std::result::Result<(), String> {
        Self::check_room(&self.unacked.lock(), len)
    }

    fn check_room(e: &Entries, len: usize) -> std::result::Result<(), String> {
        if e.by_seq.len() >= MAX_UNACKED || e.bytes + len > MAX_UNACKED_BYTES {
            return Err(format!(
                "{} notifications ({} bytes) to this agent wait for its acknowledgement \
                 (at most {MAX_UNACKED}, {MAX_UNACKED_BYTES} bytes)",
                e.by_seq.len(),
                e.bytes
            ));
        }
        Ok(())
    }

    /// A transfer's notification `seq` was written whole: from now on it is
    /// sent again like the others if its connections fail.
    pub(super) fn written(&self, seq: u64) {
        if let Some(e) = self.unacked.lock().by_seq.get_mut(&seq) {
            e.writing = false;
        }
    }

    /// Forgets notification `seq`: not to be sent again.
    pub(super) fn forget(&self, seq: u64) {
        self.remove(seq, false);
    }

    /// The peer answered notification `seq` (acknowledged or refused for
    /// good): forgotten, and the link is not stuck.
    pub(super) fn acked(&self, seq: u64) {
        self.remove(seq, true);
    }

    fn remove(&self, seq: u64, answered: bool) {
        let mut e = self.unacked.lock();
        if let Some(old) = e.by_seq.remove(&seq) {
            e.bytes -= old.msg.len();
            if answered {
                e.stuck_since = None;
            }
            if e.by_seq.is_empty() {
                e.stuck_since = None;
                self.drained.notify_all();
            }
        }
    }

    /// True when nothing waits for an acknowledgement.
    pub(super) fn is_empty(&self) -> bool {
        self.unacked.lock().by_seq.is_empty()
    }

    /// How many wait for an acknowledgement.
    #[cfg(test)]
    pub(super) fn len(&self) -> usize {
        self.unacked.lock().by_seq.len()
    }

    /// True when a notification that may be sent again is not queued on
    /// connection set `set`.
    pub(super) fn unclaimed(&self, set: u64) -> bool {
        let e = self.unacked.lock();
        e.by_seq.values().any(|e| e.set != set && !e.writing)
    }

    /// The notifications queued on sets other than `set` (which failed), now
    /// counted as queued on `set`, oldest first: the caller queues them there.
    /// One being written is left where it is.
    pub(super) fn claim(&self, set: u64) -> Vec<(u64, std::sync::Arc<[u8]>)> {
        self.unacked
            .lock()
            .by_seq
            .iter_mut()
            .filter(|(_, e)| e.set != set && !e.writing)
            .map(|(seq, e)| {
                e.set = set;
                (*seq, e.msg.clone())
            })
            .collect()
    }

    /// Since when the link has failed to bring its notifications to the
    /// peer (no acknowledgement came since): set now unless it was; `None`
    /// when nothing waits.
    pub(super) fn stuck_since(&self) -> Option<Instant> {
        let mut e = self.unacked.lock();
        if e.by_seq.is_empty() {
            return None;
        }
        Some(*e.stuck_since.get_or_insert_with(Instant::now))
    }

    /// Empties the outbox; returns how many notifications and bytes it held.
    pub(super) fn take_all(&self) -> (usize, usize) {
        let mut e = self.unacked.lock();
        let taken = (e.by_seq.len(), e.bytes);
        *e = Entries::default();
        self.drained.notify_all();
        taken
    }

    /// Waits until every notification was acknowledged, or `within` passed;
    /// true when the outbox is empty.
    pub(super) fn wait_drained(&self, within: Duration) -> bool {
        let deadline = Instant::now() + within;
        let mut e = self.unacked.lock();
        while !e.by_seq.is_empty() {
            if self.drained.wait_until(&mut e, deadline).timed_out() {
                break;
            }
        }
        e.by_seq.is_empty()
    }
}

/// Sequence numbers of one link that a window remembers: a number more than
/// this far behind the link's highest counts as delivered. A link sends a
/// number again only while it is unacknowledged, and sends the unacknowledged
/// ones first on new connections, so its numbers arrive at most a few
/// in-flight notifications out of order.
/// Larger than the most a link keeps unacknowledged ([`MAX_UNACKED`]), so
/// that one sent again behind all of those is still recognised.
const WINDOW: u64 = 32768;
/// Links remembered by one target (4 KiB each); beyond it the least
/// recently used goes.
const MAX_LINKS: usize = 1024;
const _: () = assert!(WINDOW > MAX_UNACKED as u64);

/// The numbers of one link delivered lately: a bitmap over
/// `[base, base + WINDOW)`.
struct Window {
    base: u64,
    bits: [u64; (WINDOW / 64) as usize],
    used: u64,
}

impl Window {
    /// True when `seq` was delivered before (or is too old to tell).
    fn contains(&self, seq: u64) -> bool {
        seq < self.base
            || (seq - self.base < WINDOW
                && self.bits[((seq % WINDOW) / 64) as usize] & (1 << (seq % 64)) != 0)
    }

    /// Records `seq`; false when it was delivered before (or is too old).
    fn admit(&mut self, seq: u64) -> bool {
        if seq < self.base {
            return false;
        }
        if seq - self.base >= WINDOW {
            // Slide: the numbers that fall out are forgotten.
            let new_base = seq - (WINDOW - 1);
            let gone = (new_base - self.base).min(WINDOW);
            for s in self.base..self.base + gone {
                self.bits[((s % WINDOW) / 64) as usize] &= !(1 << (s % 64));
            }
            self.base = new_base;
        }
        let (word, bit) = (((seq % WINDOW) / 64) as usize, 1u64 << (seq % 64));
        let new = self.bits[word] & bit == 0;
        self.bits[word] |= bit;
        new
    }
}

/// What a target delivered, per (sender engine token, link id).
#[derive(Default)]
pub(super) struct Delivered {
    links: Mutex<Windows>,
}

/// The windows by (sender engine token, link id), and a use counter.
#[derive(Default)]
struct Windows {
    by_link: HashMap<(u128, u64), Window>,
    clock: u64,
}

impl Delivered {
    /// Runs `deliver` unless notification `seq` of link `link` of the sender
    /// engine `sender` was delivered before, and records it; both under one
    /// lock, so a number carried by two connections is delivered once. A
    /// `seq` of 0 (a sender that numbers nothing) is always delivered.
    pub(super) fn deliver_once(&self, sender: u128, link: u64, seq: u64, deliver: impl FnOnce()) {
        if seq == 0 {
            return deliver();
        }
        let mut guard = self.links.lock();
        let Windows {
            by_link: links,
            clock,
        } = &mut *guard;
        *clock += 1;
        if links.len() >= MAX_LINKS
            && !links.contains_key(&(sender, link))
            && let Some(oldest) = links.iter().min_by_key(|(_, w)| w.used).map(|(k, _)| *k)
        {
            links.remove(&oldest);
        }
        let window = links.entry((sender, link)).or_insert_with(|| Window {
            base: seq.saturating_sub(WINDOW - 1).max(1),
            bits: [0; (WINDOW / 64) as usize],
            used: 0,
        });
        window.used = *clock;
        if window.admit(seq) {
            deliver();
        }
    }

    /// True when notification `seq` (nonzero) of that link was delivered
    /// before (a cheap check before reading its body).
    pub(super) fn seen(&self, sender: u128, link: u64, seq: u64) -> bool {
        let guard = self.links.lock();
        guard
            .by_link
            .get(&(sender, link))
            .is_some_and(|w| w.contains(seq))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn entries_go_when_forgotten_and_drain_wakes_waiters() {
        let outbox = Arc::new(Outbox::default());
        let msg: Arc<[u8]> = Arc::from(&b"hello"[..]);
        let (a, b) = (outbox.next_seq(), outbox.next_seq());
        assert_eq!((a, b), (1, 2));
        outbox.keep(b, &msg, 7, false);
        outbox.keep(a, &msg, 8, false);
        assert_eq!(outbox.claim(8).iter().map(|e| e.0).collect::<Vec<_>>(), [b]);
        assert_eq!(
            outbox.claim(9).iter().map(|e| e.0).collect::<Vec<_>>(),
            [a, b]
        );
        assert!(outbox.claim(9).is_empty(), "claimed for 9 already");
        assert!(!outbox.wait_drained(Duration::from_millis(1)));
        let o = outbox.clone();
        let waiter = std::thread::spawn(move || o.wait_drained(Duration::from_secs(60)));
        outbox.forget(a);
        outbox.forget(a);
        outbox.forget(b);
        assert!(waiter.join().expect("the waiter"));
        assert!(outbox.is_empty());
        outbox.keep(a, &msg, 1, false);
        assert_eq!(outbox.take_all(), (1, 5));
        assert_eq!(outbox.len(), 0);
        // A transfer's notification being written is not claimed elsewhere.
        outbox.keep(a, &msg, 1, true);
        assert!(!outbox.unclaimed(2) && outbox.claim(2).is_empty());
        outbox.written(a);
        assert!(outbox.unclaimed(2));
        assert_eq!(outbox.claim(2).len(), 1);
        // Stuck since the first time asked, until an acknowledgement.
        outbox.keep(b, &msg, 2, false);
        let t = outbox.stuck_since().expect("something waits");
        assert_eq!(outbox.stuck_since(), Some(t));
        outbox.forget(a);
        assert_eq!(outbox.stuck_since(), Some(t), "forgotten is not answered");
        outbox.keep(a, &msg, 2, false);
        outbox.acked(a);
        assert_ne!(outbox.stuck_since(), Some(t), "progress");
        outbox.acked(b);
        assert_eq!(outbox.stuck_since(), None);
    }

    #[test]
    fn the_unacknowledged_are_bounded() {
        let outbox = Outbox::default();
        let msg: Arc<[u8]> = Arc::from(vec![0u8; 1 << 20]);
        for i in 0..(MAX_UNACKED_BYTES >> 20) as u64 {
            outbox.admit(i + 1, &msg, 1).unwrap();
        }
        assert!(outbox.admit(1000, &msg, 1).is_err(), "bytes");
        let small: Arc<[u8]> = Arc::from(&b"x"[..]);
        let outbox = Outbox::default();
        for i in 0..MAX_UNACKED as u64 {
            outbox.admit(i + 1, &small, 1).unwrap();
        }
        assert!(outbox.admit(u64::MAX, &small, 1).is_err(), "count");
        outbox.forget(1);
        assert!(outbox.admit(u64::MAX, &small, 1).is_ok());
    }

    #[test]
    fn each_number_is_delivered_once_in_any_order_within_the_window() {
        let d = Delivered::default();
        let count = std::cell::Cell::new(0);
        let deliver = |sender: u128, link: u64, seq: u64| {
            let before = count.get();
            d.deliver_once(sender, link, seq, || count.set(count.get() + 1));
            count.get() > before
        };
        assert!(deliver(1, 1, 5));
        assert!(!deliver(1, 1, 5), "again");
        assert!(deliver(1, 1, 3), "older, not seen: delivered");
        assert!(deliver(1, 2, 5), "another link of the sender");
        assert!(deliver(2, 1, 5), "another sender");
        assert!(deliver(1, 1, 0) && deliver(1, 1, 0), "unnumbered: always");
        assert!(d.seen(1, 1, 3) && !d.seen(1, 1, 4));
        // Far ahead: the window slides, what fell out counts as delivered.
        assert!(deliver(1, 1, 5 + 3 * WINDOW));
        assert!(!deliver(1, 1, 6), "fell out of the window");
        assert!(deliver(1, 1, 4 + 3 * WINDOW), "inside the window, not seen");
        assert!(!deliver(1, 1, 4 + 3 * WINDOW));
        // A slide by less than the window keeps what stays inside.
        assert!(deliver(1, 1, 5 + 3 * WINDOW + 10));
        assert!(!deliver(1, 1, 5 + 3 * WINDOW));
        assert!(deliver(1, 1, 5 + 3 * WINDOW + 1));
        // Numbers at the top of the range (a hostile peer's) do not overflow.
        assert!(deliver(3, 1, u64::MAX));
        assert!(!deliver(3, 1, u64::MAX) && d.seen(3, 1, u64::MAX));
        assert!(deliver(3, 1, u64::MAX - 1) && !d.seen(3, 1, u64::MAX - 2));
        assert!(!deliver(3, 1, 1), "far below the window");
        assert!(deliver(4, 1, 1) && deliver(4, 1, u64::MAX));
        assert!(
            d.seen(4, 1, 2),
            "slid past: an old number counts as delivered"
        );
    }

    #[test]
    fn the_least_recently_used_link_goes_beyond_the_limit() {
        let d = Delivered::default();
        for link in 0..MAX_LINKS as u64 {
            d.deliver_once(9, link, 1, || {});
        }
        d.deliver_once(9, 0, 2, || {}); // link 0 used last
        d.deliver_once(9, MAX_LINKS as u64, 1, || {});
        assert_eq!(d.links.lock().by_link.len(), MAX_LINKS);
        assert!(d.seen(9, 0, 1), "recently used: kept");
        assert!(!d.seen(9, 1, 1), "least recently used: gone");
    }
}
