//! The notification inbox: messages delivered to this agent, in arrival order,
//! drained by `getNotifs`.
//!
//! Its memory is bounded: the bytes waiting (and those a transport is
//! receiving, see [`Inbox::reserve`]) may not exceed a total and a
//! per-sender limit, so a peer cannot exhaust our memory with
//! notifications the application does not drain. Over either limit a
//! notification is refused with a reason the sender is told.

use std::collections::HashMap;

use parking_lot::Mutex;

use super::AgentName;

/// A received notification: the sender's agent name and the message bytes.
pub type Notification = (AgentName, Vec<u8>);

/// Default limit of the bytes waiting in one inbox.
pub const TOTAL_LIMIT: usize = 256 << 20;
/// Default limit of the bytes waiting from one sender.
pub const SENDER_LIMIT: usize = 64 << 20;

#[derive(Debug, Default)]
struct State {
    queue: Vec<Notification>,
    /// Bytes waiting or reserved, in total and per sender.
    total: usize,
    by_sender: HashMap<AgentName, usize>,
}

/// A thread-safe FIFO of received notifications.
#[derive(Debug)]
pub struct Inbox {
    state: Mutex<State>,
    total_limit: usize,
    sender_limit: usize,
}

impl Default for Inbox {
    fn default() -> Self {
        Inbox::with_limits(TOTAL_LIMIT, SENDER_LIMIT)
    }
}

/// Room for one notification of a sender, taken before its bytes are read
/// (given back if dropped unused).
#[must_use]
#[derive(Debug)]
pub struct Reservation<'a> {
    inbox: &'a Inbox,
    from: AgentName,
    len: usize,
}

impl Reservation<'_> {
    /// Delivers `msg` (at most the reserved length) in the reserved room.
    pub fn deliver(mut self, msg: Vec<u8>) {
        debug_assert!(msg.len() <= self.len);
        // The message keeps its bytes' room; the drop gives back the rest.
        self.len -= msg.len().min(self.len);
        self.inbox.state.lock().queue.push((self.from.clone(), msg));
    }
}

impl Drop for Reservation<'_> {
    fn drop(&mut self) {
        release(&mut self.inbox.state.lock(), &self.from, self.len);
    }
}

fn release(s: &mut State, from: &AgentName, len: usize) {
    s.total -= len;
    if let Some(n) = s.by_sender.get_mut(from) {
        *n -= len;
        if *n == 0 {
            s.by_sender.remove(from);
        }
    }
}

impl Inbox {
    /// An inbox holding at most `total` bytes, and `per_sender` from one sender.
    pub fn with_limits(total: usize, per_sender: usize) -> Inbox {
        Inbox {
            state: Mutex::new(State::default()),
            total_limit: total,
            sender_limit: per_sender,
        }
    }

    /// Takes room for a notification of `len` bytes from `from`.
    ///
    /// # Errors
    /// Why there is no room (a sentence for the sender).
    pub fn reserve(&self, from: &AgentName, len: usize) -> Result<Reservation<'_>, String> {
        let mut s = self.state.lock();
        let mine = s.by_sender.get(from).copied().unwrap_or(0);
        if mine + len > self.sender_limit {
            return Err(format!(
                "{mine} bytes of notifications from agent {from} wait undrained; {len} more \
                 would exceed its limit of {} bytes",
                self.sender_limit
            ));
        }
        if s.total + len > self.total_limit {
            return Err(format!(
                "{} bytes of notifications wait undrained; {len} more would exceed the limit \
                 of {} bytes",
                s.total, self.total_limit
            ));
        }
        s.total += len;
        *s.by_sender.entry(from.clone()).or_default() += len;
        Ok(Reservation {
            inbox: self,
            from: from.clone(),
            len,
        })
    }

    /// Appends one notification, if there is room for it.
    ///
    /// # Errors
    /// Why there is no room (see [`Self::reserve`]).
    pub fn push(&self, from: AgentName, msg: Vec<u8>) -> Result<(), String> {
        self.reserve(&from, msg.len())?.deliver(msg);
        Ok(())
    }

    /// Takes every notification received so far, oldest first.
    pub fn drain(&self) -> Vec<Notification> {
        let mut s = self.state.lock();
        let queue = std::mem::take(&mut s.queue);
        for (from, msg) in &queue {
            release(&mut s, from, msg.len());
        }
        queue
    }

    /// Number of notifications waiting.
    pub fn len(&self) -> usize {
        self.state.lock().queue.len()
    }

    /// True when nothing is waiting.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Bytes waiting or reserved.
    pub fn bytes(&self) -> usize {
        self.state.lock().total
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn a_delivered_notification_keeps_no_copy_of_its_sender_s_name() {
        let inbox = Inbox::default();
        let a = AgentName::from("A");
        inbox.push(a.clone(), b"one".to_vec()).unwrap();
        inbox.reserve(&a, 10).unwrap().deliver(b"two".to_vec());
        drop(inbox.reserve(&a, 10).unwrap());
        assert_eq!(inbox.bytes(), 6);
        drop(inbox.drain());
        assert_eq!(inbox.bytes(), 0);
        assert_eq!(a.copies(), 1, "a copy of the name leaked");
    }

    #[test]
    fn keeps_order_and_bytes() {
        let inbox = Inbox::default();
        let a = AgentName::from(&b"A"[..]);
        inbox.push(a.clone(), b"".to_vec()).unwrap();
        inbox.push(a.clone(), b"x\0\xffy".to_vec()).unwrap();
        let got = inbox.drain();
        assert_eq!(got, vec![(a.clone(), vec![]), (a, b"x\0\xffy".to_vec())]);
        assert!(inbox.is_empty());
        assert_eq!(inbox.bytes(), 0);
    }

    #[test]
    fn memory_is_bounded_per_sender_and_in_total_until_drained() {
        let inbox = Inbox::with_limits(100, 60);
        let (a, b, c) = (
            AgentName::from("a"),
            AgentName::from("b"),
            AgentName::from("c"),
        );
        inbox.push(a.clone(), vec![1; 50]).unwrap();
        let e = inbox.push(a.clone(), vec![1; 11]).unwrap_err();
        assert!(
            e.contains("agent \"a\"") && e.contains("limit of 60"),
            "{e}"
        );
        inbox.push(b.clone(), vec![2; 40]).unwrap();
        let e = inbox.push(c.clone(), vec![3; 11]).unwrap_err();
        assert!(e.contains("limit of 100"), "{e}");
        // A reservation holds room until used or dropped.
        let r = inbox.reserve(&c, 10).unwrap();
        assert!(inbox.push(c.clone(), vec![3; 1]).is_err());
        drop(r);
        inbox.push(c.clone(), vec![3; 10]).unwrap();
        assert_eq!(inbox.drain().len(), 3);
        assert_eq!(inbox.bytes(), 0);
        inbox.push(a, vec![1; 60]).unwrap();
    }

    #[test]
    fn concurrent_producers_and_consumers_lose_and_double_nothing() {
        let inbox = Arc::new(Inbox::default());
        let producers: Vec<_> = (0..4u8)
            .map(|p| {
                let inbox = inbox.clone();
                std::thread::spawn(move || {
                    let name = AgentName::from(&[p][..]);
                    for i in 0..5000u32 {
                        inbox.push(name.clone(), i.to_le_bytes().to_vec()).unwrap();
                    }
                })
            })
            .collect();
        let mut seen = vec![Vec::new(); 4];
        let mut total = 0;
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
        while total < 20_000 && std::time::Instant::now() < deadline {
            for (from, msg) in inbox.drain() {
                seen[from.as_bytes()[0] as usize].push(u32::from_le_bytes(msg.try_into().unwrap()));
                total += 1;
            }
            std::thread::yield_now();
        }
        for p in producers {
            p.join().unwrap();
        }
        for (from, msg) in inbox.drain() {
            seen[from.as_bytes()[0] as usize].push(u32::from_le_bytes(msg.try_into().unwrap()));
        }
        for s in seen {
            assert_eq!(
                s,
                (0..5000).collect::<Vec<_>>(),
                "each producer's messages in order, once"
            );
        }
    }
}
