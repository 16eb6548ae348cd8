//! RDMA: reliable-connected queue pairs over the verbs library, loaded at
//! run time (a host without rdma-core runs the plugin over TCP).
//!
//! - [`verbs`]: the library and safe owners of its objects.
//! - [`device`]: which NICs and ports we use, their GIDs and limits.
//! - [`mr`], [`reg`]: every host-memory region registered on every NIC
//!   (in pieces of at most the NIC's largest region), its keys published
//!   with the region, its deregistration waiting for our posts in flight.
//! - [`connect`]: connecting a queue pair to a peer's.
//! - [`nic`]: per NIC one completion queue and one completion thread.
//! - [`qp`]: a queue pair's work (credits, batches, selective signalling)
//!   and its receive buffers.
//! - [`route`], [`slice`], [`xfer`]: a peer's endpoints, a post cut into
//!   slices striped over them.
//! - [`notif`]: notifications delivered after the data, in parts.
//!
//! Connection setup goes through the peer's TCP listener as a control
//! service ([`SERVICE`]): the initiator sends its queue pairs' addresses
//! with a fresh generation, the target creates, connects and arms its own,
//! and answers with theirs.

pub mod connect;
pub mod device;
pub mod mr;
pub mod nic;
pub mod notif;
pub mod qp;
pub mod reg;
pub mod route;
pub mod slice;
pub mod verbs;
pub mod xfer;

#[cfg(test)]
pub mod testing;
#[cfg(test)]
mod tests;

use std::any::Any;
use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use parking_lot::{Mutex, RwLock};

use self::connect::Timing;
use self::device::{DeviceConfig, LinkLayer};
use self::nic::NicWorker;
use self::notif::PassivePeer;
use self::qp::{QpConn, Side};
use self::reg::RegionReg;
pub use self::route::RdmaRoute;
use super::tcp::{ControlService, TcpTransport};
use super::{Route, Transport};
use crate::common::memory::RegionWatch;
use crate::common::peers::Claim;
use crate::common::{AgentName, Endpoint, Error, LocalRegion, MemKind, Result};
use crate::wire::conn_info::{ConnInfo, RdmaNic};
use crate::wire::rdma::{ConnectReply, ConnectRequest};

/// The TCP control service number of RDMA connection setup.
pub const SERVICE: u64 = 1;

/// What the RDMA transport is configured with.
#[derive(Debug, Clone)]
pub struct RdmaConfig {
    /// Which devices, and the GID override.
    pub devices: DeviceConfig,
    /// Bytes per work request (the `slice_size` option).
    pub slice: u64,
    /// RC queue pairs per pair of NICs.
    pub qps_per_pair: usize,
    /// Send queue depth of each queue pair.
    pub depth: usize,
    /// Transport timing of the queue pairs.
    pub timing: Timing,
    /// True under `protocol=rdma`: a region the NICs refuse fails its
    /// registration (under `auto` it is only reachable over TCP).
    pub required: bool,
}

impl Default for RdmaConfig {
    fn default() -> Self {
        RdmaConfig {
            devices: DeviceConfig::default(),
            slice: 64 << 10,
            qps_per_pair: 2,
            depth: 128,
            timing: Timing::default(),
            required: false,
        }
    }
}

/// Target queue pairs are kept by (peer engine token, its NIC, our NIC).
type PassiveKey = (u128, u8, u8);

/// One generation of target queue pairs for one key: when it connected,
/// and its queue pairs.
type Generation = (Instant, Vec<Arc<QpConn>>);

/// Generations kept per key: the newest, and the ones before (whose queue
/// pairs the initiator may still be draining after it reconnected).
const GENERATIONS: usize = 3;
/// Most keys (pairs of NICs) one peer engine may hold.
const KEYS_PER_PEER: usize = 64;

/// State shared by the transport, its routes and its threads.
pub(crate) struct Shared {
    endpoint: Arc<Endpoint>,
    workers: Vec<Arc<NicWorker>>,
    tcp: Arc<TcpTransport>,
    config: RdmaConfig,
    /// Our regions' registrations, by access key.
    regs: RwLock<HashMap<u64, Arc<RegionReg>>>,
    /// Peers whose queue pairs connected to ours, by engine token.
    peers: notif::Peers,
    /// The target queue pairs, by (peer token, its NIC, our NIC).
    passive: Mutex<HashMap<PassiveKey, VecDeque<Generation>>>,
    /// Ids of the notifications we send.
    next_notif: AtomicU64,
    /// Set once a GPU region could not be registered on our NICs (said
    /// once as a warning; the next ones at info level, as a model's many
    /// regions would repeat it).
    gpu_refused: AtomicBool,
}

/// The RDMA transport of one engine.
pub struct RdmaTransport {
    shared: Arc<Shared>,
}

impl RdmaTransport {
    /// Opens the NICs `config` selects and serves RDMA connection setup on
    /// `tcp`'s listener for the engine of `endpoint`.
    ///
    /// # Errors
    /// [`Error::NotSupported`] with the reason when RDMA cannot be used
    /// here (no verbs library, no device, no usable port).
    pub fn start(
        endpoint: Arc<Endpoint>,
        tcp: Arc<TcpTransport>,
        config: RdmaConfig,
    ) -> Result<RdmaTransport> {
        let nics = device::discover(&config.devices)?;
        let mut workers: Vec<Arc<NicWorker>> = Vec::with_capacity(nics.len());
        for (i, nic) in nics.into_iter().enumerate() {
            log::info!("Mooncake: agent {}: RDMA on {nic:?}", endpoint.name);
            match NicWorker::start(i, nic) {
                Ok(w) => workers.push(w),
                Err(e) => {
                    for w in &workers {
                        w.stop(Instant::now());
                    }
                    return Err(e);
                }
            }
        }
        let mut first = [0u8; 8];
        getrandom::fill(&mut first).expect("the OS random source works");
        let shared = Arc::new(Shared {
            endpoint: endpoint.clone(),
            workers,
            tcp: tcp.clone(),
            config,
            regs: RwLock::new(HashMap::new()),
            peers: Mutex::new(HashMap::new()),
            passive: Mutex::new(HashMap::new()),
            next_notif: AtomicU64::new(u64::from_le_bytes(first) >> 1),
            gpu_refused: AtomicBool::new(false),
        });
        tcp.offer(SERVICE, Arc::new(Service(Arc::downgrade(&shared))));
        endpoint
            .registry
            .watch(Arc::new(Watch(Arc::downgrade(&shared))));
        Ok(RdmaTransport { shared })
    }

    /// The pairs of (our NIC, its NIC) that reach a peer publishing
    /// `remote` (see [`nic_pairs`]).
    pub fn pairs(&self, remote: &[RdmaNic]) -> Vec<(usize, usize)> {
        let ours: Vec<(LinkLayer, [u8; 16])> = self
            .shared
            .workers
            .iter()
            .map(|w| (w.nic.link, w.nic.gid.gid.raw))
            .collect();
        nic_pairs(&ours, remote)
    }

    /// A route to agent `peer` (engine `token`) over `pairs`, connecting
    /// through its TCP listener at `addr`, with `control` (its TCP link)
    /// for notifications outside transfers and its liveness; with
    /// `fallback` (`protocol=auto`: the same TCP link) for what RDMA cannot
    /// move.
    pub fn route(
        &self,
        (peer, token, addr): (AgentName, u128, SocketAddr),
        pairs: Vec<(usize, usize)>,
        control: Arc<dyn Route>,
        fallback: bool,
    ) -> RdmaRoute {
        let fallback = fallback.then(|| control.clone());
        RdmaRoute::new(
            self.shared.clone(),
            (peer, token, addr),
            pairs,
            control,
            fallback,
        )
    }

    /// Live queue pairs on our NICs (for tests).
    pub fn live_qps(&self) -> usize {
        self.shared.workers.iter().map(|w| w.live_qps()).sum()
    }
}

/// The pairs of (our NIC, its NIC) that reach each other, rail-aligned:
/// pair `i` is our NIC `i % ours` with its NIC `i % theirs`, for as many
/// pairs as the larger side has NICs, keeping those of the same link layer
/// (and, on InfiniBand, the same subnet prefix: the GID's first 8 bytes).
/// `ours` gives each of our NICs' link layer and GID.
pub fn nic_pairs(ours: &[(LinkLayer, [u8; 16])], theirs: &[RdmaNic]) -> Vec<(usize, usize)> {
    if ours.is_empty() || theirs.is_empty() {
        return Vec::new();
    }
    let reach = |l: usize, r: usize| {
        let ((link, gid), b) = (&ours[l], &theirs[r]);
        match link {
            LinkLayer::Infiniband => b.infiniband && gid[..8] == b.gid[..8],
            LinkLayer::Ethernet => !b.infiniband,
        }
    };
    (0..ours.len().max(theirs.len()))
        .map(|i| (i % ours.len(), i % theirs.len()))
        .filter(|&(l, r)| reach(l, r))
        .collect()
}

impl Transport for RdmaTransport {
    fn name(&self) -> &'static str {
        "rdma"
    }

    fn publish(&self, info: &mut ConnInfo) {
        info.rdma = self
            .shared
            .workers
            .iter()
            .map(|w| RdmaNic {
                infiniband: w.nic.link == LinkLayer::Infiniband,
                lid: w.nic.lid,
                gid: w.nic.gid.gid.raw,
                mtu: w.nic.mtu,
                numa: w.nic.numa.unwrap_or(-1),
            })
            .collect();
    }

    fn forget(&self, peer: &AgentName) {
        let tokens: Vec<u128> = self
            .shared
            .peers
            .lock()
            .values()
            .filter(|p| &p.name == peer)
            .map(|p| p.token)
            .collect();
        for t in tokens {
            self.shared.drop_peer(t);
        }
    }

    /// Every queue pair goes to ERR at once (on every NIC), their flushes
    /// come back (at most 2 s), then the completion threads stop and the
    /// regions are deregistered: the NICs do nothing more for this engine.
    fn shutdown(&self) {
        for w in &self.shared.workers {
            w.retire_all();
        }
        let deadline = Instant::now() + Duration::from_secs(2);
        for w in &self.shared.workers {
            w.stop(deadline);
        }
        self.shared.passive.lock().clear();
        let regs: Vec<_> = self.shared.regs.write().drain().map(|(_, r)| r).collect();
        for r in regs {
            // The queue pairs are in ERR and their threads gone: nothing of
            // ours is on a NIC any more (a post still waiting for its
            // connection never reaches one).
            r.revoke_within(Duration::from_millis(100));
        }
    }

    fn as_any(&self) -> &dyn Any {
        self
    }
}

impl Shared {
    /// True when GPU memory may go to our NICs directly (GPUDirect RDMA):
    /// the verbs library registers dmabufs.
    pub(crate) fn gpudirect(&self) -> bool {
        self.workers
            .first()
            .is_some_and(|w| w.pd.context().verbs().api.reg_dmabuf_mr.is_some())
    }

    /// Retires every target queue pair of the peer engine `token`.
    fn drop_peer(&self, token: u128) {
        self.peers.lock().remove(&token);
        let gone: Vec<VecDeque<Generation>> = {
            let mut p = self.passive.lock();
            let keys: Vec<_> = p.keys().filter(|k| k.0 == token).copied().collect();
            keys.into_iter().filter_map(|k| p.remove(&k)).collect()
        };
        for (_, qps) in gone.into_iter().flatten() {
            self.retire_all(&qps);
        }
    }

    fn retire_all(&self, qps: &[Arc<QpConn>]) {
        for q in qps {
            self.workers[q.nic].retire(q);
        }
    }

    /// Retires the oldest generation of target queue pairs on our NIC
    /// `nic` (to make room for a new one). False when there is none.
    fn evict_oldest(&self, nic: u8) -> bool {
        let victim = {
            let mut p = self.passive.lock();
            let oldest = p
                .iter()
                .filter(|(k, g)| k.2 == nic && !g.is_empty())
                .min_by_key(|(_, g)| g.front().map(|(t, _)| *t))
                .map(|(k, _)| *k);
            oldest.and_then(|k| {
                let g = p.get_mut(&k)?;
                let victim = g.pop_front();
                if g.is_empty() {
                    p.remove(&k);
                }
                victim
            })
        };
        if let Some((_, qps)) = &victim {
            // A peer left with no queue pairs is forgotten.
            let token = qps.first().map(|q| q.recv_peer_token());
            if let Some(Some(t)) = token
                && !self.passive.lock().keys().any(|k| k.0 == t)
            {
                self.peers.lock().remove(&t);
            }
        }
        match victim {
            Some((_, qps)) => {
                log::warn!(
                    "Mooncake: agent {}: RDMA: the completion queue of our NIC {nic} is full; \
                     closing the oldest peer connection ({} queue pairs)",
                    self.endpoint.name,
                    qps.len()
                );
                self.retire_all(&qps);
                true
            }
            None => false,
        }
    }

    /// Serves a peer's connection request: creates, connects and arms our
    /// queue pairs for its own.
    fn accept(
        &self,
        peer: &AgentName,
        token: u128,
        req: &ConnectRequest,
    ) -> std::result::Result<ConnectReply, String> {
        let w = self
            .workers
            .get(req.to_nic as usize)
            .ok_or_else(|| format!("we have no RDMA NIC {}", req.to_nic))?;
        if req.from_nic as usize >= crate::wire::conn_info::MAX_RDMA_NICS {
            return Err(format!("its NIC {} is beyond any NIC list", req.from_nic));
        }
        {
            let p = self.passive.lock();
            let key = (token, req.from_nic, req.to_nic);
            if !p.contains_key(&key) && p.keys().filter(|k| k.0 == token).count() >= KEYS_PER_PEER {
                return Err(format!("it holds {KEYS_PER_PEER} NIC pairs already"));
            }
        }
        // A restarted peer (same name, new engine): its old queue pairs go,
        // unless the old engine is the one whose connection info we loaded
        // and the new one is not (a name claimed by another engine).
        let new_verified = matches!(self.endpoint.peers.check(peer, token), Claim::Verified);
        let stale: Vec<u128> = self
            .peers
            .lock()
            .values()
            .filter(|p| &p.name == peer && p.token != token)
            .filter(|p| {
                new_verified || !matches!(self.endpoint.peers.check(peer, p.token), Claim::Verified)
            })
            .map(|p| p.token)
            .collect();
        for t in stale {
            self.drop_peer(t);
        }
        let passive = self
            .peers
            .lock()
            .entry(token)
            .or_insert_with(|| {
                Arc::new(PassivePeer::new(peer.clone(), token, self.endpoint.clone()))
            })
            .clone();
        let mut qps: Vec<Arc<QpConn>> = Vec::new();
        let mut addrs = Vec::new();
        let fail = |qps: &[Arc<QpConn>], e: Error| {
            self.retire_all(qps);
            e.to_string()
        };
        for a in &req.qps {
            let created = w
                .create_qp(req.from_nic as usize, Side::Recv(passive.clone()))
                .or_else(|e| {
                    // Full: the least recently connected peer makes room.
                    if self.evict_oldest(req.to_nic) {
                        w.create_qp(req.from_nic as usize, Side::Recv(passive.clone()))
                    } else {
                        Err(e)
                    }
                });
            let q = match created {
                Ok(q) => q,
                Err(e) => return Err(fail(&qps, e)),
            };
            let psn = connect::random_psn();
            let armed = connect::connect(&q.qp, &w.nic, psn, a, self.config.timing)
                .and_then(|()| q.post_receives());
            w.attach(&q);
            qps.push(q.clone());
            if let Err(e) = armed {
                return Err(fail(&qps, e));
            }
            addrs.push(connect::address(&q.qp, &w.nic, psn));
        }
        let old = {
            let mut p = self.passive.lock();
            let g = p.entry((token, req.from_nic, req.to_nic)).or_default();
            g.push_back((Instant::now(), qps));
            let mut old = Vec::new();
            while g.len() > GENERATIONS {
                old.extend(g.pop_front().map(|(_, q)| q).into_iter().flatten());
            }
            old
        };
        self.retire_all(&old);
        Ok(ConnectReply {
            generation: req.generation,
            qps: addrs,
        })
    }
}

/// Serves RDMA connection setup on the TCP listener.
struct Service(Weak<Shared>);

impl ControlService for Service {
    fn call(
        &self,
        peer: &AgentName,
        peer_token: u128,
        request: &[u8],
    ) -> std::result::Result<Vec<u8>, String> {
        let shared = self.0.upgrade().ok_or("RDMA is shut down")?;
        let req = ConnectRequest::decode(request).map_err(|e| e.to_string())?;
        shared
            .accept(peer, peer_token, &req)
            .map(|r| r.encode())
            .inspect_err(|why| {
                log::warn!(
                    "Mooncake: agent {}: refused RDMA setup from agent {peer}: {why}",
                    shared.endpoint.name
                )
            })
    }
}

/// Registers host-memory regions on every NIC and publishes their keys, and
/// GPU regions too when the verbs library registers dmabufs (GPUDirect
/// RDMA); deregisters them after our posts in flight drained.
struct Watch(Weak<Shared>);

impl RegionWatch for Watch {
    fn registered(&self, region: &LocalRegion) -> Result<()> {
        let Some(shared) = self.0.upgrade() else {
            return Ok(());
        };
        let gpu = matches!(region.kind(), MemKind::Vram { .. });
        if !(region.kind() == MemKind::Dram || gpu && shared.gpudirect()) {
            return Ok(());
        }
        match RegionReg::register(region, &shared.workers) {
            Ok(reg) => {
                let _ = region.rdma.set(Arc::new(reg.public_keys()));
                shared.regs.write().insert(region.key, Arc::new(reg));
                Ok(())
            }
            // GPU memory stays registered with NIXL: transfers of it are
            // staged over TCP (protocol=auto) or refused (rdma).
            Err(e) if gpu => {
                let level = if shared.gpu_refused.swap(true, Ordering::Relaxed) {
                    log::Level::Info
                } else {
                    log::Level::Warn
                };
                log::log!(
                    level,
                    "Mooncake: {e}; peers reach this GPU region without GPUDirect RDMA \
                     (staged over TCP under protocol=auto)"
                );
                Ok(())
            }
            Err(e) if shared.config.required => Err(e),
            Err(e) => {
                log::warn!("Mooncake: {e}; peers reach this region over TCP only");
                Ok(())
            }
        }
    }

    fn revoke(&self, region: &LocalRegion) {
        let Some(shared) = self.0.upgrade() else {
            return;
        };
        let reg = shared.regs.write().remove(&region.key);
        if let Some(reg) = reg {
            reg.revoke();
        }
    }
}

#[cfg(test)]
mod pair_tests {
    use super::*;

    fn nic(infiniband: bool, prefix: u8) -> RdmaNic {
        let mut gid = [0u8; 16];
        gid[0] = 0xfe;
        gid[1] = 0x80;
        gid[7] = prefix;
        RdmaNic {
            infiniband,
            lid: 1,
            gid,
            mtu: 5,
            numa: 0,
        }
    }

    fn ours(n: &RdmaNic) -> (LinkLayer, [u8; 16]) {
        let link = if n.infiniband {
            LinkLayer::Infiniband
        } else {
            LinkLayer::Ethernet
        };
        (link, n.gid)
    }

    #[test]
    fn rail_aligned_and_only_what_reaches() {
        let roce = [nic(false, 0), nic(false, 0)];
        let mine: Vec<_> = roce.iter().map(ours).collect();
        assert_eq!(nic_pairs(&mine, &roce), vec![(0, 0), (1, 1)]);
        // One NIC here, four there: every one of theirs, from ours.
        let four = [nic(false, 0), nic(false, 0), nic(false, 0), nic(false, 0)];
        assert_eq!(
            nic_pairs(&mine[..1], &four),
            vec![(0, 0), (0, 1), (0, 2), (0, 3)]
        );
        // Another link layer never pairs.
        let ib = [nic(true, 1), nic(true, 1)];
        assert!(nic_pairs(&mine, &ib).is_empty());
        // InfiniBand: only within one subnet.
        let ib_mine: Vec<_> = ib.iter().map(ours).collect();
        let mixed = [nic(true, 1), nic(true, 2)];
        assert_eq!(nic_pairs(&ib_mine, &mixed), vec![(0, 0)]);
        assert!(nic_pairs(&ib_mine, &[]).is_empty());
    }
}
