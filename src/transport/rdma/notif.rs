//! The target side of notifications over RDMA: the peers whose queue
//! pairs connected to ours, and the reassembly of their notifications
//! from parts (see [`crate::wire::rdma::NotifPart`]): a notification is
//! delivered once every queue pair that carried its transfer's data has
//! delivered its part, after that data.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;

use crate::common::{AgentName, Endpoint};
use crate::wire::frame::MAX_NOTIF;
use crate::wire::rdma::NotifPart;

/// Most notifications of one peer being reassembled at once (beyond it,
/// the oldest goes).
const MAX_PARTIAL: usize = 4096;
/// A notification whose parts stopped coming (its post failed) is dropped
/// after this long.
const PARTIAL_TTL: Duration = Duration::from_secs(60);
/// How many delivered notification ids are remembered, so that a part sent
/// again after a failover does not deliver its notification twice.
const REMEMBERED: usize = 4096;

struct Partial {
    parts: u16,
    /// The parts that arrived whole (a part sent again after a failover
    /// counts once).
    done: std::collections::BTreeSet<u16>,
    msg: Vec<u8>,
    /// The message part's next chunk (chunks that come again are skipped).
    next_chunk: u32,
    /// When its first part came.
    since: Instant,
}

#[derive(Default)]
struct Reassembly {
    partial: HashMap<u64, Partial>,
    delivered: VecDeque<u64>,
    delivered_set: HashSet<u64>,
}

/// A peer engine whose queue pairs connected to ours.
pub struct PassivePeer {
    /// Its agent name (authenticated by its TCP handshake's token).
    pub name: AgentName,
    /// Its engine's token.
    pub token: u128,
    endpoint: Arc<Endpoint>,
    state: Mutex<Reassembly>,
}

impl PassivePeer {
    /// A peer of `endpoint`'s engine.
    pub fn new(name: AgentName, token: u128, endpoint: Arc<Endpoint>) -> PassivePeer {
        PassivePeer {
            name,
            token,
            endpoint,
            state: Mutex::new(Reassembly::default()),
        }
    }

    /// Takes one received part; delivers the notification it completes.
    pub fn part(&self, bytes: &[u8]) {
        let part = match NotifPart::decode(bytes) {
            Ok(p) => p,
            Err(e) => {
                log::warn!(
                    "Mooncake: agent {}: dropped a malformed RDMA notification part from agent {}: {e}",
                    self.endpoint.name,
                    self.name
                );
                return;
            }
        };
        let done = {
            let mut st = self.state.lock();
            if st.delivered_set.contains(&part.id) {
                return; // sent again after a failover: delivered already
            }
            let partial = &mut st.partial;
            if !partial.contains_key(&part.id) {
                // A new notification: the ones whose parts stopped coming go.
                let now = Instant::now();
                partial.retain(|_, p| now.duration_since(p.since) < PARTIAL_TTL);
                if partial.len() >= MAX_PARTIAL
                    && let Some(&oldest) = partial
                        .iter()
                        .min_by_key(|(_, p)| p.since)
                        .map(|(id, _)| id)
                {
                    log::warn!(
                        "Mooncake: agent {}: agent {} has {MAX_PARTIAL} notifications half-sent; \
                         dropping the oldest",
                        self.endpoint.name,
                        self.name
                    );
                    partial.remove(&oldest);
                }
            }
            let p = partial.entry(part.id).or_insert_with(|| Partial {
                parts: part.parts,
                done: Default::default(),
                msg: Vec::new(),
                next_chunk: 0,
                since: Instant::now(),
            });
            let fits = p.msg.len() + part.bytes.len() <= MAX_NOTIF as usize;
            let ok = p.parts == part.parts
                && (part.chunks == 0
                    || part.chunk < p.next_chunk
                    || (part.chunk == p.next_chunk && fits));
            if !ok {
                log::warn!(
                    "Mooncake: agent {}: inconsistent RDMA notification parts from agent {}; \
                     notification {} dropped",
                    self.endpoint.name,
                    self.name,
                    part.id
                );
                partial.remove(&part.id);
                return;
            }
            if part.chunks == 0 {
                p.done.insert(part.index);
            } else if part.chunk == p.next_chunk {
                p.msg.extend_from_slice(part.bytes);
                p.next_chunk += 1;
                if p.next_chunk == part.chunks {
                    p.done.insert(part.index);
                }
            }
            if p.done.len() >= p.parts as usize {
                let msg = partial.remove(&part.id).map(|p| p.msg);
                st.delivered.push_back(part.id);
                st.delivered_set.insert(part.id);
                if st.delivered.len() > REMEMBERED
                    && let Some(old) = st.delivered.pop_front()
                {
                    st.delivered_set.remove(&old);
                }
                msg
            } else {
                None
            }
        };
        if done.is_some() {
            // What the peer's NICs wrote into our GPU memory is visible to
            // GPU work before the notification says it is there.
            crate::cuda::gpudirect::flush_writes();
        }
        if let Some(msg) = done
            && let Err(why) = self.endpoint.inbox.push(self.name.clone(), msg)
        {
            log::warn!(
                "Mooncake: agent {}: refused an RDMA notification from agent {}: {why}",
                self.endpoint.name,
                self.name
            );
        }
    }
}

/// The peers of one engine by token.
pub type Peers = Mutex<HashMap<u128, Arc<PassivePeer>>>;
