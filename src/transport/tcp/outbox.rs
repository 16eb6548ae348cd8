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
//!   its transfer instead, and is forgotten).
//!
//! Each entry remembers the connection set it was queued on; those of a set
//! that failed are queued again, first, on the next one.
//!
//! A target of an older build acknowledges nothing: its notifications are
//! forgotten once written, as before.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use parking_lot::{Condvar, Mutex};

/// One unacknowledged notification.
struct Entry {
    msg: std::sync::Arc<[u8]>,
    /// The connection set it was last queued on.
    set: u64,
}

/// Unacknowledged notifications of one link, by sequence number.
pub(super) struct Outbox {
    /// The link's id, sent with every notification (random: unique for the
    /// sender engine with overwhelming probability, across restarts too).
    pub(super) id: u64,
    next: AtomicU64,
    unacked: Mutex<BTreeMap<u64, Entry>>,
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
    /// is acknowledged.
    pub(super) fn keep(&self, seq: u64, msg: &std::sync::Arc<[u8]>, set: u64) {
        let entry = Entry {
            msg: msg.clone(),
            set,
        };
        self.unacked.lock().insert(seq, entry);
    }

    /// Forgets notification `seq`: acknowledged, refused for good, or not
    /// to be sent again.
    pub(super) fn forget(&self, seq: u64) {
        let mut unacked = self.unacked.lock();
        if unacked.remove(&seq).is_some() && unacked.is_empty() {
            self.drained.notify_all();
        }
    }

    /// True when nothing waits for an acknowledgement.
    pub(super) fn is_empty(&self) -> bool {
        self.unacked.lock().is_empty()
    }

    /// How many wait for an acknowledgement.
    #[cfg(test)]
    pub(super) fn len(&self) -> usize {
        self.unacked.lock().len()
    }

    /// The notifications queued on sets other than `set` (which failed), now
    /// counted as queued on `set`, oldest first: the caller queues them there.
    pub(super) fn claim(&self, set: u64) -> Vec<(u64, std::sync::Arc<[u8]>)> {
        self.unacked
            .lock()
            .iter_mut()
            .filter(|(_, e)| e.set != set)
            .map(|(seq, e)| {
                e.set = set;
                (*seq, e.msg.clone())
            })
            .collect()
    }

    /// Empties the outbox; returns how many notifications and bytes it held.
    pub(super) fn take_all(&self) -> (usize, usize) {
        let mut unacked = self.unacked.lock();
        let taken = (unacked.len(), unacked.values().map(|e| e.msg.len()).sum());
        unacked.clear();
        self.drained.notify_all();
        taken
    }

    /// Waits until every notification was acknowledged, or `within` passed;
    /// true when the outbox is empty.
    pub(super) fn wait_drained(&self, within: Duration) -> bool {
        let deadline = Instant::now() + within;
        let mut unacked = self.unacked.lock();
        while !unacked.is_empty() {
            if self.drained.wait_until(&mut unacked, deadline).timed_out() {
                break;
            }
        }
        unacked.is_empty()
    }
}

/// Sequence numbers of one link that a window remembers: a number more than
/// this far behind the link's highest counts as delivered. A link sends a
/// number again only while it is unacknowledged, and sends the unacknowledged
/// ones first on new connections, so its numbers arrive at most a few
/// in-flight notifications out of order.
const WINDOW: u64 = 4096;
/// Links remembered by one target; beyond it the least recently used goes.
const MAX_LINKS: usize = 4096;

/// The numbers of one link delivered lately: a bitmap over
/// `[base, base + WINDOW)`.
struct Window {
    base: u64,
    bits: [u64; (WINDOW / 64) as usize],
    used: u64,
}

impl Window {
    /// Records `seq`; false when it was delivered before (or is too old).
    fn admit(&mut self, seq: u64) -> bool {
        if seq < self.base {
            return false;
        }
        if seq >= self.base + WINDOW {
            // Slide: the numbers that fall out are forgotten.
            let new_base = seq + 1 - WINDOW;
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
        guard.by_link.get(&(sender, link)).is_some_and(|w| {
            seq < w.base
                || (seq < w.base + WINDOW
                    && w.bits[((seq % WINDOW) / 64) as usize] & (1 << (seq % 64)) != 0)
        })
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
        outbox.keep(b, &msg, 7);
        outbox.keep(a, &msg, 8);
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
        outbox.keep(a, &msg, 1);
        assert_eq!(outbox.take_all(), (1, 5));
        assert_eq!(outbox.len(), 0);
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
