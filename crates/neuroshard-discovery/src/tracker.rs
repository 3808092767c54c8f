//! The tracker: bootstrap list of live nodes, kept fresh by heartbeats.
//!
//! [`TrackerState`] is the logic, fed `now`; [`TrackerService`] serves it over gRPC and a sweeper
//! drops nodes silent for longer than the timeout.

use neuroshard_base::sync::LockExt;
use neuroshard_base::{NodeId, NodeKey};

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

mod state;
use neuroshard_net::{MAX_MESSAGE_BYTES, NodeError};
pub use state::{TrackerState, TrackerStats};

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
    /// Live nodes registered from one address at most. Default 64, as many connections as a
    /// server takes from one address: a household or a carrier's NAT, not a flood.
    pub max_per_ip: usize,
    /// Connections and request bytes held at once, in all and per address.
    pub server: neuroshard_net::ServerLimits,
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
            max_per_ip: 64,
            server: neuroshard_net::ServerLimits::default(),
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
        let source = neuroshard_net::tls::caller(&request)
            .and_then(|c| c.addr)
            .map(|a| a.ip().to_canonical());
        let req = request.into_inner();
        let node = req
            .node
            .ok_or_else(|| NodeError::BadRequest("register without node info".into()))?;
        let record = peer_from_proto(node)?;
        check_announcement("register", &record, req.timestamp_ms, &req.signature)?;
        tracing::info!(node = %record.node_id, addr = %record.addr, layers = %record.layers, "node registered");
        let (peers, warnings) = self.with_state(|s, now| s.register(record, source, now))?;
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
    let with = neuroshard_net::ServeWith {
        tls: identity,
        // Trackers run on servers, not on volunteers' lines: no caps.
        caps: neuroshard_net::bandwidth::BandwidthCaps::new(0, 0),
        limits: config.server,
        body_caps: Vec::new(),
        name: "tracker",
    };
    let task = neuroshard_net::spawn_server(
        tonic::service::Routes::new(server),
        listener,
        None,
        with,
        cancel.clone(),
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
