//! The target side of notifications over RDMA: the peers whose queue
//! pairs connected to ours, and the reassembly of their notifications
//! from parts (see [`crate::wire::rdma::NotifPart`]): a notification is
//! delivered once every queue pair that carried its transfer's data has
//! delivered its part, after that data.

use std::collections::HashMap;
use std::sync::Arc;

use parking_lot::Mutex;

use crate::common::{AgentName, Endpoint};
use crate::wire::frame::MAX_NOTIF;
use crate::wire::rdma::NotifPart;

/// Most notifications of one peer being reassembled at once.
const MAX_PARTIAL: usize = 4096;

struct Partial {
    parts: u16,
    /// The parts that arrived whole (a part sent again after a failover
    /// counts once).
    done: std::collections::BTreeSet<u16>,
    msg: Vec<u8>,
    /// The message part's next chunk (chunks that come again are skipped).
    next_chunk: u32,
}

/// A peer engine whose queue pairs connected to ours.
pub struct PassivePeer {
    /// Its agent name (authenticated by its TCP handshake's token).
    pub name: AgentName,
    /// Its engine's token.
    pub token: u128,
    endpoint: Arc<Endpoint>,
    partial: Mutex<HashMap<u64, Partial>>,
}

impl PassivePeer {
    /// A peer of `endpoint`'s engine.
    pub fn new(name: AgentName, token: u128, endpoint: Arc<Endpoint>) -> PassivePeer {
        PassivePeer {
            name,
            token,
            endpoint,
            partial: Mutex::new(HashMap::new()),
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
            let mut partial = self.partial.lock();
            if !partial.contains_key(&part.id) && partial.len() >= MAX_PARTIAL {
                log::warn!(
                    "Mooncake: agent {}: agent {} has {MAX_PARTIAL} notifications half-sent; \
                     dropping a part of another",
                    self.endpoint.name,
                    self.name
                );
                return;
            }
            let p = partial.entry(part.id).or_insert_with(|| Partial {
                parts: part.parts,
                done: Default::default(),
                msg: Vec::new(),
                next_chunk: 0,
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
                partial.remove(&part.id).map(|p| p.msg)
            } else {
                None
            }
        };
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
