//! The tracker: bootstrap list of live nodes, kept fresh by heartbeats.
//!
//! [`TrackerState`] is the logic, fed `now`; [`TrackerService`] serves it over gRPC and a sweeper
//! drops nodes silent for longer than the timeout.

use neuroshard_base::sync::LockExt;
use neuroshard_base::{NodeId, NodeKey};
use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use neuroshard_proto as pb;
use pb::tracker_server::{Tracker, TrackerServer};
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};

use neuroshard_net::convert::{PeerRecord, peer_from_proto, peer_to_proto, span_from_proto};
use neuroshard_net::{MAX_MESSAGE_BYTES, NodeError};

/// Tracker settings.
#[derive(Debug, Clone)]
pub struct TrackerConfig {
    /// Address to listen on.
    pub listen: SocketAddr,
    /// A node silent this long is dropped. Default 30 s: three missed 10 s heartbeats.
    pub node_timeout: Duration,
    /// Peers returned by Register. Default 50: enough to plan chains, small enough per reply.
    pub max_peers: usize,
    /// Heartbeat interval told to nodes. Default 10 s (the design's).
    pub heartbeat_interval: Duration,
    /// Live nodes tracked at most; registrations beyond it are refused. Default 10 000: a
    /// large public swarm, and a bound on what one flooding client can make the tracker hold.
    pub max_nodes: usize,
    /// The key the tracker proves to everyone who dials it, which its URL names
    /// ([`TrackerHandle::url`]). Keep it across restarts (`neuroshard tracker --data-dir`):
    /// nodes and clients pin it. Default none: a fresh key each start.
    pub key: Option<Arc<NodeKey>>,
}

impl Default for TrackerConfig {
    fn default() -> Self {
        Self {
            listen: "0.0.0.0:7700".parse().expect("literal address"),
            node_timeout: Duration::from_secs(30),
            max_peers: 50,
            heartbeat_interval: Duration::from_secs(10),
            max_nodes: 10_000,
            key: None,
        }
    }
}

/// Registrations and heartbeats signed further than this from the tracker's clock are refused,
/// so a captured one cannot be replayed later. 5 min: home PCs' clocks drift.
pub const ANNOUNCE_SKEW_MS: u64 = 5 * 60 * 1000;

/// What a node signs to register (`kind` "register") or heartbeat ("heartbeat"): its id, the
/// address, model, layers and load it announces, and the time.
pub fn announcement(kind: &str, record: &PeerRecord, timestamp_ms: u64) -> [u8; 32] {
    let layers = record.layers.to_string();
    neuroshard_proof::content_hash(&[
        b"neuroshard-announce-v1",
        kind.as_bytes(),
        record.node_id.to_string().as_bytes(),
        record.addr.as_bytes(),
        record.relay.as_bytes(),
        record.model_id.as_bytes(),
        layers.as_bytes(),
        &record.load.to_le_bytes(),
        &timestamp_ms.to_le_bytes(),
    ])
}

/// Checks a signed announcement: a fresh timestamp and the record's key.
fn check_announcement(
    kind: &str,
    record: &PeerRecord,
    timestamp_ms: u64,
    signature: &[u8],
) -> Result<(), NodeError> {
    let now = neuroshard_net::now_ms();
    if now.abs_diff(timestamp_ms) > ANNOUNCE_SKEW_MS {
        return Err(NodeError::BadRequest(format!(
            "{kind} signed at {timestamp_ms} ms, the tracker's clock reads {now} ms"
        )));
    }
    let message = announcement(kind, record, timestamp_ms);
    Ok(record.public_key.verify(&message, signature)?)
}

/// Peers one ListPeers reply carries at most (about 100 KiB of announcements).
pub const MAX_LISTED_PEERS: usize = 1000;

/// Largest request the tracker decodes: announcements are small, so a flood of huge ones is
/// refused before it is read.
const MAX_TRACKER_REQUEST_BYTES: usize = 64 * 1024;

#[derive(Debug)]
struct Tracked {
    record: PeerRecord,
    last_seen: Instant,
}

/// Live nodes and request counts; all methods take `now`.
#[derive(Debug)]
pub struct TrackerState {
    nodes: HashMap<NodeId, Tracked>,
    requests: u64,
    timeout: Duration,
    max_peers: usize,
    max_nodes: usize,
    clone_warnings: u64,
}

/// Tracker-wide figures.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct TrackerStats {
    /// Live nodes.
    pub nodes: u64,
    /// Per model: layers with at least one live node.
    pub layers_covered: BTreeMap<String, u32>,
    /// Per model: its layer count.
    pub total_layers: BTreeMap<String, u32>,
    /// Requests served.
    pub requests: u64,
    /// Registrations of an id live at another address.
    pub clone_warnings: u64,
}

impl TrackerState {
    /// No nodes yet.
    pub fn new(config: &TrackerConfig) -> Self {
        Self {
            nodes: HashMap::new(),
            requests: 0,
            timeout: config.node_timeout,
            max_peers: config.max_peers,
            max_nodes: config.max_nodes,
            clone_warnings: 0,
        }
    }

    /// Adds or refreshes a node; returns up to `max_peers` other live nodes, same model first,
    /// and warnings for the node's operator. Refused when the tracker is full, or when the
    /// node's layer count contradicts live nodes of the same model. An id live at another
    /// address is a copied identity: the newer announcement wins and both are warned about.
    pub fn register(
        &mut self,
        record: PeerRecord,
        now: Instant,
    ) -> Result<(Vec<PeerRecord>, Vec<String>), NodeError> {
        self.requests += 1;
        self.expire(now);
        if !self.nodes.contains_key(&record.node_id) && self.nodes.len() >= self.max_nodes {
            return Err(NodeError::Full(format!(
                "the tracker holds its maximum of {} nodes",
                self.max_nodes
            )));
        }
        if let Some(other) = self.nodes.values().find(|t| {
            t.record.model_id == record.model_id
                && t.record.total_layers != record.total_layers
                && t.record.node_id != record.node_id
        }) {
            return Err(NodeError::BadRequest(format!(
                "model {} has {} layers on live nodes, not {}",
                record.model_id, other.record.total_layers, record.total_layers
            )));
        }
        let mut warnings = Vec::new();
        if let Some(live) = self.nodes.get(&record.node_id)
            && live.record.addr != record.addr
        {
            self.clone_warnings += 1;
            let warning = format!(
                "node id {} is live at {} and now announced from {}: the identity was copied; \
                 run `neuroshard identity --regenerate` on one of the machines",
                record.node_id, live.record.addr, record.addr
            );
            tracing::warn!("{warning}");
            warnings.push(warning);
        }
        let model = record.model_id.clone();
        let id = record.node_id;
        self.nodes.insert(
            id,
            Tracked {
                record,
                last_seen: now,
            },
        );
        let mut peers: Vec<PeerRecord> = self
            .nodes
            .values()
            .filter(|t| t.record.node_id != id)
            .map(|t| t.record.clone())
            .collect();
        peers.sort_by_key(|p| (p.model_id != model, p.layers.start, p.node_id));
        peers.truncate(self.max_peers);
        Ok((peers, warnings))
    }

    /// Refreshes a node's layers and load; false when the node is unknown (register again).
    pub fn heartbeat(
        &mut self,
        id: &NodeId,
        layers: Option<neuroshard_base::LayerRange>,
        load: f32,
        now: Instant,
    ) -> bool {
        self.requests += 1;
        self.expire(now);
        let Some(node) = self.nodes.get_mut(id) else {
            return false;
        };
        node.last_seen = now;
        if let Some(layers) = layers.filter(|l| l.end <= node.record.total_layers) {
            node.record.layers = layers;
        }
        node.record.load = if load.is_finite() {
            load.clamp(0.0, 1.0)
        } else {
            1.0
        };
        true
    }

    /// Live nodes serving `model` (all models when empty).
    pub fn peers(&mut self, model: &str, now: Instant) -> Vec<PeerRecord> {
        self.requests += 1;
        self.expire(now);
        let mut peers: Vec<PeerRecord> = self
            .nodes
            .values()
            .filter(|t| model.is_empty() || t.record.model_id == model)
            .map(|t| t.record.clone())
            .collect();
        peers.sort_by_key(|p| (p.layers.start, p.node_id));
        peers.truncate(MAX_LISTED_PEERS);
        peers
    }

    /// Drops nodes silent for longer than the timeout; returns their ids.
    pub fn expire(&mut self, now: Instant) -> Vec<NodeId> {
        let timeout = self.timeout;
        let stale: Vec<NodeId> = self
            .nodes
            .iter()
            .filter(|(_, t)| now.duration_since(t.last_seen) > timeout)
            .map(|(id, _)| *id)
            .collect();
        for id in &stale {
            self.nodes.remove(id);
        }
        stale
    }

    /// Node count, coverage per model, request count.
    pub fn stats(&mut self, now: Instant) -> TrackerStats {
        self.requests += 1;
        self.expire(now);
        let mut covered: BTreeMap<String, Vec<bool>> = BTreeMap::new();
        let mut total = BTreeMap::new();
        for t in self.nodes.values() {
            let r = &t.record;
            total.insert(r.model_id.clone(), r.total_layers);
            let layers = covered
                .entry(r.model_id.clone())
                .or_insert_with(|| vec![false; r.total_layers as usize]);
            for l in r.layers.to_range() {
                if let Some(slot) = layers.get_mut(l) {
                    *slot = true;
                }
            }
        }
        TrackerStats {
            nodes: self.nodes.len() as u64,
            layers_covered: covered
                .into_iter()
                .map(|(m, l)| (m, l.iter().filter(|&&c| c).count() as u32))
                .collect(),
            total_layers: total,
            requests: self.requests,
            clone_warnings: self.clone_warnings,
        }
    }

    /// The announcement of a live node.
    pub fn record(&self, id: &NodeId) -> Option<PeerRecord> {
        self.nodes.get(id).map(|t| t.record.clone())
    }

    /// Number of live nodes (as of the last call).
    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    /// Whether no node is known.
    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }
}

/// gRPC face of a [`TrackerState`].
#[derive(Debug, Clone)]
pub struct TrackerService {
    state: Arc<Mutex<TrackerState>>,
    nodes_tx: Arc<watch::Sender<usize>>,
    heartbeat_interval: Duration,
}

impl TrackerService {
    /// A tracker with no nodes.
    pub fn new(config: &TrackerConfig) -> Self {
        Self {
            state: Arc::new(Mutex::new(TrackerState::new(config))),
            nodes_tx: Arc::new(watch::channel(0).0),
            heartbeat_interval: config.heartbeat_interval,
        }
    }

    /// Watches the live node count (updated on every change the tracker sees).
    pub fn node_count(&self) -> watch::Receiver<usize> {
        self.nodes_tx.subscribe()
    }

    fn with_state<T>(&self, f: impl FnOnce(&mut TrackerState, Instant) -> T) -> T {
        let mut state = self.state.lock_or_recover();
        let out = f(&mut state, Instant::now());
        self.nodes_tx.send_if_modified(|n| {
            let changed = *n != state.len();
            *n = state.len();
            changed
        });
        out
    }

    /// Drops silent nodes every `period` until cancelled.
    pub async fn sweep(self, period: Duration, cancel: CancellationToken) {
        let mut tick = tokio::time::interval(period);
        loop {
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = tick.tick() => {
                    let dropped = self.with_state(|s, now| s.expire(now));
                    for id in dropped {
                        tracing::info!(node = %id, "dropped silent node");
                    }
                }
            }
        }
    }
}

#[tonic::async_trait]
impl Tracker for TrackerService {
    async fn register(
        &self,
        request: Request<pb::RegisterRequest>,
    ) -> Result<Response<pb::RegisterResponse>, Status> {
        let req = request.into_inner();
        let node = req
            .node
            .ok_or_else(|| NodeError::BadRequest("register without node info".into()))?;
        let record = peer_from_proto(node)?;
        check_announcement("register", &record, req.timestamp_ms, &req.signature)?;
        tracing::info!(node = %record.node_id, addr = %record.addr, layers = %record.layers, "node registered");
        let (peers, warnings) = self.with_state(|s, now| s.register(record, now))?;
        Ok(Response::new(pb::RegisterResponse {
            peers: peers.iter().map(peer_to_proto).collect(),
            heartbeat_interval_s: self.heartbeat_interval.as_secs() as u32,
            warnings,
        }))
    }

    async fn heartbeat(
        &self,
        request: Request<pb::HeartbeatRequest>,
    ) -> Result<Response<pb::HeartbeatResponse>, Status> {
        let req = request.into_inner();
        let layers = span_from_proto(req.layers)?;
        let id: NodeId = req
            .node_id
            .parse()
            .map_err(|_| NodeError::BadRequest("heartbeat node_id is not 64 hex digits".into()))?;
        let Some(mut record) = self.with_state(|s, _| s.record(&id)) else {
            return Ok(Response::new(pb::HeartbeatResponse { known: false }));
        };
        record.layers = layers;
        record.load = req.load;
        check_announcement("heartbeat", &record, req.timestamp_ms, &req.signature)?;
        let known = self.with_state(|s, now| s.heartbeat(&id, Some(layers), req.load, now));
        Ok(Response::new(pb::HeartbeatResponse { known }))
    }

    async fn list_peers(
        &self,
        request: Request<pb::ListPeersRequest>,
    ) -> Result<Response<pb::ListPeersResponse>, Status> {
        let model = request.into_inner().model_id;
        let peers = self.with_state(|s, now| s.peers(&model, now));
        Ok(Response::new(pb::ListPeersResponse {
            peers: peers.iter().map(peer_to_proto).collect(),
        }))
    }

    async fn stats(
        &self,
        _request: Request<pb::StatsRequest>,
    ) -> Result<Response<pb::StatsResponse>, Status> {
        let stats = self.with_state(|s, now| s.stats(now));
        Ok(Response::new(pb::StatsResponse {
            nodes: stats.nodes,
            layers_covered: stats.layers_covered.into_iter().collect(),
            total_layers: stats.total_layers.into_iter().collect(),
            requests: stats.requests,
            clone_warnings: stats.clone_warnings,
        }))
    }
}

/// A running tracker.
#[derive(Debug)]
pub struct TrackerHandle {
    /// Where it listens.
    pub addr: SocketAddr,
    /// The node id of the key it proves.
    pub id: NodeId,
    /// Its service (for watching node counts).
    pub service: TrackerService,
    cancel: CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

impl TrackerHandle {
    /// `http://ID@addr`, for clients and nodes: its address and the key they pin it by.
    pub fn url(&self) -> String {
        format!("http://{}@{}", self.id, self.addr)
    }

    /// Stops serving and waits for the server to end.
    pub async fn shutdown(self) {
        self.cancel.cancel();
        let _ = self.task.await;
    }
}

/// Binds and serves a tracker until its handle shuts it down.
pub async fn start_tracker(config: TrackerConfig) -> Result<TrackerHandle, NodeError> {
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .map_err(|e| NodeError::io(format!("binding tracker on {}", config.listen), e))?;
    let addr = listener
        .local_addr()
        .map_err(|e| NodeError::io("tracker address", e))?;
    let service = TrackerService::new(&config);
    let cancel = CancellationToken::new();
    tokio::spawn(
        service
            .clone()
            .sweep(config.node_timeout / 3, cancel.clone()),
    );
    let server = TrackerServer::new(service.clone())
        .max_decoding_message_size(MAX_TRACKER_REQUEST_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES);
    let key = config
        .key
        .clone()
        .unwrap_or_else(|| Arc::new(NodeKey::generate()));
    let identity =
        neuroshard_net::tls::server_config(&neuroshard_net::tls::TlsIdentity::new(&key)?)?;
    let task = neuroshard_net::spawn_server(
        tonic::service::Routes::new(server),
        listener,
        None,
        identity,
        // Trackers run on servers, not on volunteers' lines: no caps.
        neuroshard_net::bandwidth::BandwidthCaps::new(0, 0),
        cancel.clone(),
        "tracker",
    );
    tracing::info!(%addr, id = %key.id(), "tracker listening");
    Ok(TrackerHandle {
        addr,
        id: key.id(),
        service,
        cancel,
        task,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use neuroshard_base::LayerRange;

    /// A made-up id that reads back as `name`.
    fn id(name: &str) -> NodeId {
        let mut bytes = [0; 32];
        bytes[..name.len()].copy_from_slice(name.as_bytes());
        NodeId(bytes)
    }

    fn record(name: &str, start: u32, end: u32) -> PeerRecord {
        PeerRecord {
            node_id: id(name),
            addr: format!("127.0.0.1:{}", 9000 + start),
            model_id: "m".into(),
            layers: LayerRange::new(start, end).unwrap(),
            total_layers: 6,
            load: 0.0,
            public_key: neuroshard_base::NodeKey::generate().public(),
            display_name: String::new(),
            relay: String::new(),
        }
    }

    #[test]
    fn an_id_live_at_two_addresses_is_a_clone() {
        let mut s = TrackerState::new(&TrackerConfig::default());
        let now = Instant::now();
        let home = record("a", 0, 2);
        let mut copy = home.clone();
        copy.addr = "10.0.0.9:7000".into();
        assert!(s.register(home.clone(), now).unwrap().1.is_empty());
        assert!(
            s.register(home.clone(), now).unwrap().1.is_empty(),
            "a re-registration is not a clone"
        );
        let warnings = s.register(copy.clone(), now).unwrap().1;
        assert_eq!(warnings.len(), 1);
        assert!(warnings[0].contains("--regenerate"), "{}", warnings[0]);
        assert_eq!(s.stats(now).clone_warnings, 1);
        // Once the first address has gone silent, moving is not cloning.
        let later = now + Duration::from_secs(31);
        assert!(s.register(home, later).unwrap().1.is_empty());
    }

    #[test]
    fn register_returns_at_most_the_cap_and_never_the_caller() {
        let mut s = TrackerState::new(&TrackerConfig::default());
        let now = Instant::now();
        for i in 0..60 {
            s.register(record(&format!("n{i}"), 0, 2), now).unwrap();
        }
        let (peers, _) = s.register(record("me", 2, 4), now).unwrap();
        assert_eq!(peers.len(), 50);
        assert!(peers.iter().all(|p| p.node_id != id("me")));
    }

    #[test]
    fn heartbeats_update_layers_and_stats_count_coverage() {
        let mut s = TrackerState::new(&TrackerConfig::default());
        let now = Instant::now();
        s.register(record("a", 0, 2), now).unwrap();
        s.register(record("b", 2, 4), now).unwrap();
        assert!(s.heartbeat(&id("b"), Some(LayerRange::new(2, 6).unwrap()), 0.5, now));
        assert!(!s.heartbeat(&id("ghost"), None, 0.0, now));
        let stats = s.stats(now);
        assert_eq!(stats.nodes, 2);
        assert_eq!(stats.layers_covered["m"], 6);
        assert_eq!(stats.requests, 5);
    }

    #[test]
    fn refuses_contradicting_layer_counts_and_floods() {
        let config = TrackerConfig {
            max_nodes: 2,
            ..TrackerConfig::default()
        };
        let mut s = TrackerState::new(&config);
        let now = Instant::now();
        s.register(record("a", 0, 2), now).unwrap();
        let mut liar = record("b", 2, 4);
        liar.total_layers = 4000;
        let err = s.register(liar, now).unwrap_err().to_string();
        assert!(err.contains("6 layers"), "{err}");
        s.register(record("b", 2, 4), now).unwrap();
        assert!(matches!(
            s.register(record("c", 4, 6), now),
            Err(NodeError::Full(_))
        ));
        // A known node may always refresh itself.
        s.register(record("b", 2, 6), now).unwrap();
        assert_eq!(s.len(), 2);
    }
}
