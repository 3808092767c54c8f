//! The tracker: bootstrap list of live nodes, kept fresh by heartbeats.
//!
//! [`TrackerState`] is the logic, fed `now`; [`TrackerService`] serves it over gRPC and a sweeper
//! drops nodes silent for longer than the timeout.

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

use crate::convert::{PeerRecord, peer_from_proto, peer_to_proto, span_from_proto};
use crate::{MAX_MESSAGE_BYTES, NodeError};

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
}

impl Default for TrackerConfig {
    fn default() -> Self {
        Self {
            listen: "0.0.0.0:7700".parse().expect("literal address"),
            node_timeout: Duration::from_secs(30),
            max_peers: 50,
            heartbeat_interval: Duration::from_secs(10),
            max_nodes: 10_000,
        }
    }
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
    nodes: HashMap<String, Tracked>,
    requests: u64,
    timeout: Duration,
    max_peers: usize,
    max_nodes: usize,
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
        }
    }

    /// Adds or refreshes a node; returns up to `max_peers` other live nodes, same model first.
    /// Refused when the tracker is full, or when the node's layer count contradicts live nodes
    /// of the same model.
    pub fn register(
        &mut self,
        record: PeerRecord,
        now: Instant,
    ) -> Result<Vec<PeerRecord>, NodeError> {
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
        let model = record.model_id.clone();
        let id = record.node_id.clone();
        self.nodes.insert(
            id.clone(),
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
        peers.sort_by_key(|p| (p.model_id != model, p.layers.start, p.node_id.clone()));
        peers.truncate(self.max_peers);
        Ok(peers)
    }

    /// Refreshes a node's layers and load; false when the node is unknown (register again).
    pub fn heartbeat(
        &mut self,
        id: &str,
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
        peers.sort_by_key(|p| (p.layers.start, p.node_id.clone()));
        peers.truncate(MAX_LISTED_PEERS);
        peers
    }

    /// Drops nodes silent for longer than the timeout; returns their ids.
    pub fn expire(&mut self, now: Instant) -> Vec<String> {
        let timeout = self.timeout;
        let stale: Vec<String> = self
            .nodes
            .iter()
            .filter(|(_, t)| now.duration_since(t.last_seen) > timeout)
            .map(|(id, _)| id.clone())
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
        }
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
        let mut state = self.state.lock().expect("tracker lock");
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
        let node = request
            .into_inner()
            .node
            .ok_or_else(|| NodeError::BadRequest("register without node info".into()))?;
        let record = peer_from_proto(node)?;
        tracing::info!(node = %record.node_id, addr = %record.addr, layers = %record.layers, "node registered");
        let peers = self.with_state(|s, now| s.register(record, now))?;
        Ok(Response::new(pb::RegisterResponse {
            peers: peers.iter().map(peer_to_proto).collect(),
            heartbeat_interval_s: self.heartbeat_interval.as_secs() as u32,
        }))
    }

    async fn heartbeat(
        &self,
        request: Request<pb::HeartbeatRequest>,
    ) -> Result<Response<pb::HeartbeatResponse>, Status> {
        let req = request.into_inner();
        let layers = req.layers.map(|l| span_from_proto(Some(l))).transpose()?;
        let known = self.with_state(|s, now| s.heartbeat(&req.node_id, layers, req.load, now));
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
        }))
    }
}

/// A running tracker.
#[derive(Debug)]
pub struct TrackerHandle {
    /// Where it listens.
    pub addr: SocketAddr,
    /// Its service (for watching node counts).
    pub service: TrackerService,
    cancel: CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

impl TrackerHandle {
    /// `http://addr`, for clients and nodes.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
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
    let task = crate::spawn_server(
        tonic::service::Routes::new(server),
        listener,
        cancel.clone(),
        "tracker",
    );
    tracing::info!(%addr, "tracker listening");
    Ok(TrackerHandle {
        addr,
        service,
        cancel,
        task,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use neuroshard_base::LayerRange;

    fn record(id: &str, start: u32, end: u32) -> PeerRecord {
        PeerRecord {
            node_id: id.into(),
            addr: format!("127.0.0.1:{}", 9000 + start),
            model_id: "m".into(),
            layers: LayerRange::new(start, end).unwrap(),
            total_layers: 6,
            load: 0.0,
        }
    }

    #[test]
    fn register_returns_at_most_the_cap_and_never_the_caller() {
        let mut s = TrackerState::new(&TrackerConfig::default());
        let now = Instant::now();
        for i in 0..60 {
            s.register(record(&format!("n{i}"), 0, 2), now).unwrap();
        }
        let peers = s.register(record("me", 2, 4), now).unwrap();
        assert_eq!(peers.len(), 50);
        assert!(peers.iter().all(|p| p.node_id != "me"));
    }

    #[test]
    fn heartbeats_update_layers_and_stats_count_coverage() {
        let mut s = TrackerState::new(&TrackerConfig::default());
        let now = Instant::now();
        s.register(record("a", 0, 2), now).unwrap();
        s.register(record("b", 2, 4), now).unwrap();
        assert!(s.heartbeat("b", Some(LayerRange::new(2, 6).unwrap()), 0.5, now));
        assert!(!s.heartbeat("ghost", None, 0.0, now));
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
