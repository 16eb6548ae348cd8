//! The notification inbox: messages delivered to this agent, in arrival order,
//! drained by `getNotifs`.

use parking_lot::Mutex;

use super::AgentName;

/// A received notification: the sender's agent name and the message bytes.
pub type Notification = (AgentName, Vec<u8>);

/// A thread-safe FIFO of received notifications.
#[derive(Debug, Default)]
pub struct Inbox {
    queue: Mutex<Vec<Notification>>,
}

impl Inbox {
    /// Appends one notification.
    pub fn push(&self, from: AgentName, msg: Vec<u8>) {
        self.queue.lock().push((from, msg));
    }

    /// Takes every notification received so far, oldest first.
    pub fn drain(&self) -> Vec<Notification> {
        std::mem::take(&mut *self.queue.lock())
    }

    /// Number of notifications waiting.
    pub fn len(&self) -> usize {
        self.queue.lock().len()
    }

    /// True when nothing is waiting.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn keeps_order_and_bytes() {
        let inbox = Inbox::default();
        let a = AgentName::from(&b"A"[..]);
        inbox.push(a.clone(), b"".to_vec());
        inbox.push(a.clone(), b"x\0\xffy".to_vec());
        let got = inbox.drain();
        assert_eq!(got, vec![(a.clone(), vec![]), (a, b"x\0\xffy".to_vec())]);
        assert!(inbox.is_empty());
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
                        inbox.push(name.clone(), i.to_le_bytes().to_vec());
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
