//! A node: one layer range of one model served over gRPC, with its session store, metrics,
//! lifecycle (pause, drain, caps, duty cycle), receipts and tracker heartbeat.
//!
//! This file holds the node's config, the served shard and where its weights come from (disk,
//! or fetched from a peer and kept), the state that serves `Forward`, the gRPC service and the
//! [`NodeHandle`]. Its submodules serve the rest: `checkpoint` (`GetCheckpoint`,
//! `PutCheckpoint`, `GetModelFile`), `training` and `outer` (the training stage and its DiLoCo
//! round).
//!
//! [`start_node`] loads the shard (off the reactor), binds, and returns a [`NodeHandle`]; the
//! server, the session sweeper and the heartbeat run as tasks tied to the handle's cancellation
//! token.

use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::Duration;

use neuroshard_base::{LayerRange, NodeId, NodeKey, PublicKey};
use neuroshard_dht::{Contact, Key};
use neuroshard_model::codec::{self, WireDType};
use neuroshard_model::{ModelInfo, Shard, ShardInput, ShardOutput};
use neuroshard_proof::{Countersignature, Fingerprint, Ledger, ReceiptBody, Settlement, WorkKind};
use neuroshard_proto as pb;
use pb::node_server::{Node, NodeServer};
use pb::tracker_client::TrackerClient;
use prost::Message;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tonic::transport::{Channel, Endpoint};
use tonic::{Request, Response, Status};

use crate::bandwidth::BandwidthCaps;
use crate::checkpoint::{Progress, TransferReport, fetch_weights};
use crate::convert::{
    PeerRecord, check_display_name, contact_of_peer, contact_to_proto, dtype_from_proto,
    peer_to_proto, span_from_proto, tensor_from_proto, tensor_hash, tensor_to_proto, tokens_hash,
};
use crate::discovery::{AnnounceStatus, DhtService, Discovery, DiscoveryConfig};
use crate::duty::DutyCycle;
use crate::ledger::LedgerHandle;
use crate::lifecycle::{Lifecycle, NodeEvent, NodeStatus, RunState};
use crate::metrics::{Metrics, MetricsSnapshot};
use crate::pool::{ConnectionPool, PoolConfig};
use crate::reach::{NatMode, ReachConfig, Reachability};
use crate::sessions::{SessionLimits, SessionStore};
use crate::settings::ComputeDevice;
use crate::threads::ComputeThreads;
use crate::{MAX_MESSAGE_BYTES, NodeError};
use neuroshard_nat::relay::{Relay, RelayConfig};

mod checkpoint;
mod outer;
mod training;
pub use outer::{Compression, TrainingConfig};
pub use training::{TrainingSnapshot, loss_tensor};

/// Most new tokens one Forward call may carry. Attention scratch grows with tokens × positions
/// and is not part of the KV budget, so long prompts are sent in chunks of at most this many.
pub const MAX_TOKENS_PER_CALL: usize = 2048;

/// Longest session id accepted: ids are client-chosen keys, not payloads.
const MAX_SESSION_ID_BYTES: usize = 128;

/// Countersignatures one SubmitReceipts call may carry: a few seconds of a busy client's hops.
pub const MAX_RECEIPTS_PER_SUBMIT: usize = 1024;

/// How long a layer change waits for the tracker to hear of it (the tracker client's own
/// timeout, and some).
const TRACKER_WAIT: Duration = Duration::from_secs(15);

/// File name of the ledger inside the data directory.
pub const LEDGER_FILE: &str = "ledger.sqlite";

/// Misbehaviours a test node can be told to show, to prove that requesters catch them. Not
/// reachable from the CLI or settings.
#[doc(hidden)]
#[derive(Debug, Clone, PartialEq)]
pub enum Fault {
    /// Adds Gaussian noise of `scale` × the output's RMS to every output.
    Noise {
        /// Noise relative to the output's RMS.
        scale: f32,
    },
    /// Skips the first layer of every call that runs two or more layers after layer 0.
    SkipLayer,
    /// Computes with the weights of the model in this directory while claiming its own.
    WrongWeights(PathBuf),
    /// Multiplies its pseudo-gradients by `scale` (negative flips them) before sending.
    BadPseudoGradient {
        /// The factor.
        scale: f32,
    },
    /// Flips a byte of this chunk in its first checkpoint transfer.
    CorruptChunk(usize),
    /// Cuts its first checkpoint transfer after this many chunks.
    CutCheckpointAfter(usize),
    /// Panics in the compute worker of every Forward call that starts at this token position
    /// or later.
    PanicFrom(usize),
}

/// Everything a node needs to start; checked by [`NodeConfig::validate`].
#[derive(Debug, Clone)]
pub struct NodeConfig {
    /// Hugging Face model directory.
    pub model_dir: PathBuf,
    /// Layers to serve.
    pub layers: LayerRange,
    /// Address to listen on; port 0 picks a free one.
    pub listen: SocketAddr,
    /// `host:port` peers should dial; defaults to the bound address (when bound to all
    /// interfaces, the one routed toward the internet, else 127.0.0.1).
    pub advertise: Option<String>,
    /// Tracker URL (`http://host:port`) to register with; none runs the node unlisted.
    pub tracker: Option<String>,
    /// KV cache budget. Default 1 GiB: room for tens of long sessions of a 7B model's layer
    /// third without swapping a 16 GiB home PC.
    pub kv_budget_bytes: u64,
    /// Idle time after which a session's cache is dropped. Default 5 min: longer than a user
    /// pauses between chat turns, short enough to free memory of abandoned sessions.
    pub session_idle: Duration,
    /// Heartbeat period. Default 10 s (the design's; the tracker drops nodes after 30 s).
    pub heartbeat: Duration,
    /// Where the node keeps its key (`node.key`) and receipt ledger (`ledger.sqlite`). None
    /// makes a fresh key and keeps the ledger in memory: for tests and throwaway nodes.
    pub data_dir: Option<PathBuf>,
    /// Upload cap in KB/s (1 KB = 1000 bytes), 0 for none; on every byte the server sends.
    /// Default none.
    pub upload_kbps: u32,
    /// Download cap in KB/s, 0 for none; on every byte the server receives. Default none.
    pub download_kbps: u32,
    /// Share of wall time the node computes, 1–100 %, as a duty cycle. Default 100: a headless
    /// server gives everything; the desktop app passes its owner's setting.
    pub compute_share_percent: u8,
    /// Start paused (refusing calls until resumed), as the desktop app does before its owner
    /// has finished the first run. Default false.
    pub start_paused: bool,
    /// Where compute runs: the GPU (wgpu; an error in a build without it or on a machine
    /// without one), the CPU, or `None` for burn's default (`BURN_DEVICE`, else wgpu where
    /// built, else the CPU). Default `None`.
    pub device: Option<ComputeDevice>,
    /// CPU threads for compute; 0 for every core but one. Default 0.
    pub cpu_threads: u16,
    /// Peers (`host:port`) asked for referrals when joining the DHT: how a node finds the
    /// swarm without a tracker. Default none.
    pub bootstrap: Vec<String>,
    /// DHT and LAN discovery.
    pub discovery: DiscoveryConfig,
    /// Answer STUN on UDP at the node's own port, so peers can learn their mapped address from
    /// any node and the swarm needs no third-party STUN server. A port that is taken only
    /// costs a warning. Default true.
    pub stun: bool,
    /// The name the node shows the swarm; none for an anonymous node. Default none.
    pub display_name: Option<String>,
    /// How the node makes itself reachable from behind a router, and tests that it is.
    /// Default: not at all (`NatMode::Off`), for nodes made in code; the CLI and the app
    /// default to the whole chain.
    pub reach: ReachConfig,
    /// Run a relay for nodes nobody can dial. Default none: relaying is opt-in.
    pub serve_relay: Option<RelayServe>,
    /// Take part in training (training Forward and Backward calls, AdamW inner steps) with
    /// these inner-optimizer settings. Default none: a node trains only when asked to, as
    /// training holds a second, trainable copy of the shard.
    pub train: Option<TrainingConfig>,
    /// A peer (`host:port` or relayed address) serving these layers to fetch their weights
    /// from (`GetCheckpoint`, hashed chunk by chunk) instead of reading them from `model_dir`,
    /// which then needs only `config.json`. Default none.
    pub weights_from: Option<String>,
    /// Test-only misbehaviour.
    #[doc(hidden)]
    pub fault: Option<Fault>,
}

impl NodeConfig {
    /// Defaults for serving `layers` of the model in `model_dir`.
    pub fn new(model_dir: impl Into<PathBuf>, layers: LayerRange) -> Self {
        Self {
            model_dir: model_dir.into(),
            layers,
            listen: "127.0.0.1:0".parse().expect("literal address"),
            advertise: None,
            tracker: None,
            kv_budget_bytes: 1 << 30,
            session_idle: Duration::from_secs(300),
            heartbeat: Duration::from_secs(10),
            data_dir: None,
            upload_kbps: 0,
            download_kbps: 0,
            compute_share_percent: 100,
            start_paused: false,
            device: None,
            cpu_threads: 0,
            bootstrap: Vec::new(),
            discovery: DiscoveryConfig::default(),
            stun: true,
            display_name: None,
            reach: ReachConfig::default(),
            serve_relay: None,
            train: None,
            weights_from: None,
            fault: None,
        }
    }

    /// Names the first invalid field.
    pub fn validate(&self) -> Result<(), NodeError> {
        let bad = |field: &str, why: &str| Err(NodeError::Config(format!("{field}: {why}")));
        if self.layers.is_empty() {
            return bad("layers", "must not be empty");
        }
        if self.kv_budget_bytes == 0 {
            return bad("kv_budget_bytes", "must be positive");
        }
        if self.session_idle.is_zero() {
            return bad("session_idle", "must be positive");
        }
        if !(1..=100).contains(&self.compute_share_percent) {
            return bad("compute_share_percent", "must be between 1 and 100");
        }
        if self.heartbeat.is_zero() {
            return bad("heartbeat", "must be positive");
        }
        if let Some(url) = &self.tracker
            && Endpoint::from_shared(url.clone()).is_err()
        {
            return bad("tracker", "is not a valid URL (expected http://host:port)");
        }
        crate::discovery::check_bootstrap(&self.bootstrap)?;
        if let Some(peer) = &self.weights_from {
            if peer.trim().is_empty() {
                return bad("weights_from", "must name a peer (host:port)");
            }
            if self.train.is_some() {
                return bad(
                    "weights_from",
                    "a training node reads its weights from disk (a late replica catches up \
                     from its replicas by itself)",
                );
            }
        }
        if let Some(name) = &self.display_name
            && let Err(why) = check_display_name(name)
        {
            return bad("display_name", &why);
        }
        self.discovery.validate().map_err(NodeError::Config)
    }
}

/// Where a node heard of its peers.
#[derive(Debug, Clone, Copy)]
enum PeerSource {
    Tracker,
    Dht,
}

/// The serving peers a node knows of, by source; it hands them out as referrals.
#[derive(Debug, Default)]
struct KnownPeers {
    tracker: Vec<PeerRecord>,
    dht: Vec<PeerRecord>,
}

impl KnownPeers {
    /// Every peer once, the tracker's announcement where both have one (its load is fresher).
    fn all(&self) -> Vec<PeerRecord> {
        let both = self.tracker.iter().chain(&self.dht).cloned().collect();
        crate::discovery::dedup_peers(both)
    }
}

/// A validated Forward request.
#[derive(Debug)]
struct ForwardCall {
    /// The shard it was checked against, which computes it even if a swap follows.
    served: Arc<Served>,
    session_id: String,
    start_pos: usize,
    layers: LayerRange,
    input: ShardInput,
    tokens: usize,
    reply_dtype: WireDType,
    /// SHA-256 of the input as received.
    input_hash: [u8; 32],
    /// Nonce and requester key, when the caller wants a receipt.
    proof: Option<([u8; 16], PublicKey)>,
}

/// The shard a node serves, replaced whole when its layers or device change: a call holds the
/// one it was checked against until it ends.
#[derive(Debug)]
struct Served {
    shard: Mutex<Shard>,
    range: LayerRange,
    device: Option<ComputeDevice>,
    on_gpu: bool,
    /// The shard that computes under [`Fault::WrongWeights`].
    wrong_shard: Option<Mutex<Shard>>,
}

/// Where a node's weights come from.
enum WeightSource {
    /// The model directory's safetensors files.
    Disk(PathBuf),
    /// A shard's flat parameters, fetched from a peer, of the model described.
    Fetched(Box<ModelInfo>, Vec<f32>),
}

/// The weights of `range` this machine holds: the model directory's safetensors, or the shard
/// fetched from peers and kept there; none when it holds neither.
fn weights_on_disk(
    dir: &Path,
    range: LayerRange,
) -> Result<Option<(ModelInfo, WeightSource)>, NodeError> {
    let model = ModelInfo::read(dir)?;
    if neuroshard_model::has_safetensors(dir)? {
        return Ok(Some((model, WeightSource::Disk(dir.to_path_buf()))));
    }
    let stored = neuroshard_model::fetched::load_shard(dir, &model.config, range.to_range())?;
    Ok(stored.map(|parameters| {
        (
            model.clone(),
            WeightSource::Fetched(Box::new(model), parameters),
        )
    }))
}

impl Served {
    /// Loads `range` of the model from `source` on `device` off the reactor, warming a GPU's
    /// kernels up, and (for a test node told to) the wrong weights beside it.
    async fn load(
        source: WeightSource,
        range: LayerRange,
        device: Option<ComputeDevice>,
        fault: Option<&Fault>,
    ) -> Result<Self, NodeError> {
        let resolved = match device {
            None => neuroshard_model::default_device(),
            Some(ComputeDevice::Cpu) => neuroshard_model::cpu_device(),
            Some(ComputeDevice::Gpu) => neuroshard_model::gpu_device().ok_or_else(|| {
                NodeError::Device(
                    "gpu asked for, but this build has no GPU backend (build with the `wgpu` \
                     feature)"
                        .into(),
                )
            })?,
        };
        let on_gpu = !neuroshard_model::is_cpu(&resolved);
        let wrong = match fault {
            Some(Fault::WrongWeights(dir)) => Some(dir.clone()),
            _ => None,
        };
        let (shard, wrong_shard) = tokio::task::spawn_blocking(move || {
            let shard = match source {
                WeightSource::Disk(dir) => Shard::load(&dir, range.to_range(), &resolved)?,
                WeightSource::Fetched(info, parameters) => {
                    Shard::from_parameters(*info, range.to_range(), &resolved, &parameters)?
                }
            };
            if on_gpu {
                shard.warm_up()?;
            }
            let wrong = match wrong {
                Some(dir) => Some(Mutex::new(Shard::load(&dir, range.to_range(), &resolved)?)),
                None => None,
            };
            Ok::<_, neuroshard_model::ModelError>((shard, wrong))
        })
        .await
        .map_err(|e| {
            let why = panic_message(e);
            if on_gpu {
                NodeError::Device(format!("the GPU could not be used: {why}"))
            } else {
                NodeError::Config(format!("loading the shard failed: {why}"))
            }
        })??;
        Ok(Self {
            shard: Mutex::new(shard),
            range,
            device,
            on_gpu,
            wrong_shard,
        })
    }
}

/// A relay the node runs for others.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RelayServe {
    /// Where it listens; port 0 picks one.
    pub listen: SocketAddr,
    /// Its caps.
    pub config: RelayConfig,
}

/// Shared state of a running node.
#[derive(Debug)]
pub struct NodeState {
    served: RwLock<Arc<Served>>,
    /// Held while a new shard loads, so swaps happen one at a time.
    resharding: tokio::sync::Mutex<()>,
    model_dir: PathBuf,
    model: ModelInfo,
    sessions: SessionStore,
    metrics: Arc<Metrics>,
    record: PeerRecord,
    display_name: RwLock<String>,
    /// The address announced: the configured one until the reachability test picks another.
    advertised: RwLock<String>,
    reachability: tokio::sync::watch::Sender<Reachability>,
    /// The port mapping or relay link that reachability relies on.
    kept: tokio::sync::Mutex<crate::reach::Kept>,
    peers: RwLock<KnownPeers>,
    busy: AtomicUsize,
    lifecycle: Lifecycle,
    caps: Arc<BandwidthCaps>,
    duty: DutyCycle,
    threads: ComputeThreads,
    key: Arc<NodeKey>,
    ledger: LedgerHandle,
    discovery: Discovery,
    /// Bumped to have the tracker heartbeat beat now (the node's layers changed).
    beat_now: tokio::sync::watch::Sender<u64>,
    /// The layers the followed tracker last accepted from this node, so a change can wait
    /// for it to hear of it.
    told: tokio::sync::watch::Sender<Option<LayerRange>>,
    /// The tracker followed, and what stops its heartbeat.
    tracker: tokio::sync::Mutex<Option<(String, CancellationToken)>>,
    heartbeat_every: Duration,
    /// Stops everything the node runs.
    cancel: CancellationToken,
    fault: Option<Fault>,
    /// The trainable copy of the shard, when the node trains.
    trainer: Option<training::Trainer>,
    /// The checkpoint of served weights last asked for through GetCheckpoint (by a node
    /// fetching its weights from this one), while a transfer still streams it.
    weights_snapshot: Mutex<Option<(LayerRange, std::sync::Weak<checkpoint::Snapshot>)>>,
}

impl NodeState {
    /// Load in [0, 1]: calls computing now (one compute slot per node); full when not serving,
    /// so routers that still list the node plan around it.
    fn load(&self) -> f32 {
        if self.lifecycle.state() != RunState::Serving {
            return 1.0;
        }
        self.busy.load(Ordering::Relaxed).min(1) as f32
    }

    /// The shard served now.
    fn served(&self) -> Arc<Served> {
        self.served.read().expect("served lock").clone()
    }

    /// What this node announces.
    pub fn record(&self) -> PeerRecord {
        PeerRecord {
            load: self.load(),
            layers: self.served().range,
            display_name: self.display_name.read().expect("name lock").clone(),
            addr: self.advertised.read().expect("address lock").clone(),
            ..self.record.clone()
        }
    }

    /// Follows the tracker at `url` instead of the one followed so far (`None`: none): the
    /// old heartbeat stops and the peers it listed are forgotten; the first beat to the new
    /// one (register, list peers) is awaited, then it beats on a timer. A tracker that does not
    /// answer is tried again every beat.
    async fn follow_tracker(self: &Arc<Self>, url: Option<String>) -> Result<(), NodeError> {
        let mut followed = self.tracker.lock().await;
        if followed.as_ref().map(|(u, _)| u) == url.as_ref() {
            return Ok(());
        }
        let stop = self.cancel.child_token();
        let heartbeat = url
            .as_deref()
            .map(|url| Heartbeat::new(self.clone(), url, stop.clone()))
            .transpose()?;
        if let Some((_, old)) = followed.take() {
            old.cancel();
            self.learn_peers(PeerSource::Tracker, Vec::new(), None);
            self.told.send_replace(None);
        }
        if let (Some(mut heartbeat), Some(url)) = (heartbeat, url) {
            heartbeat.beat().await;
            tokio::spawn(heartbeat.run(self.heartbeat_every));
            *followed = Some((url, stop));
        }
        Ok(())
    }

    /// Has the heartbeat tell the tracker (if one is followed) the layers served now, and
    /// waits until the tracker has accepted them, at most [`TRACKER_WAIT`].
    async fn tell_tracker(&self) {
        if self.tracker.lock().await.is_none() {
            return;
        }
        let layers = Some(self.served().range);
        let mut told = self.told.subscribe();
        self.beat_now.send_modify(|n| *n += 1);
        let heard = tokio::time::timeout(TRACKER_WAIT, told.wait_for(|t| *t == layers));
        tokio::select! {
            _ = self.cancel.cancelled() => {}
            heard = heard => if !matches!(heard, Ok(Ok(_))) {
                tracing::warn!("the tracker did not hear of the change within {TRACKER_WAIT:?}");
            }
        }
    }

    /// Runs the reachability self-test `config` asks for and announces the address it settles
    /// on. The peers asked to dial back, and offering relays, are the tracker's and the
    /// bootstrap peers.
    async fn test_reachability(
        &self,
        config: &NodeConfig,
        port: u16,
        circuits: tokio::sync::mpsc::Sender<tokio::io::DuplexStream>,
    ) {
        let advertised = self.advertised.read().expect("address lock").clone();
        if config.reach.mode == NatMode::Off {
            self.reachability.send_replace(Reachability::untested(
                &advertised,
                "Reachability is not tested (NAT traversal is off).",
            ));
            return;
        }
        let peers = reach_candidates(config).await;
        let subject = crate::reach::Subject {
            node_id: self.record.node_id.clone(),
            advertised,
            port,
            key: &self.key,
            circuits,
            cancel: self.cancel.clone(),
        };
        let (reach, kept) = crate::reach::establish(&subject, &config.reach, &peers).await;
        if reach.path != crate::reach::ReachPath::Unreachable {
            *self.advertised.write().expect("address lock") = reach.addr.clone();
        }
        *self.kept.lock().await = kept;
        self.reachability.send_replace(reach);
    }

    /// Puts the node's DHT records after a change of what it announces (`what`, for the log).
    /// Layers it served `before` and no longer does are put again with the current record,
    /// which readers refuse for those layers: the entries stop naming this node now instead
    /// of when they expire.
    async fn announce(&self, what: &'static str, before: Option<LayerRange>) {
        let me = self.announcement();
        let discovery = &self.discovery;
        if let Some(before) = before
            && let Err(e) = discovery.withdraw(&me, &self.key, before).await
        {
            tracing::warn!("withdrawing layers {before} from the DHT failed: {e}");
        }
        if let Err(e) = discovery.announce(&me, &self.key).await {
            tracing::warn!("announcing the new {what} failed: {e}");
        }
    }

    /// What the node puts in its DHT records: its record with the load of a node serving (0) or
    /// not (1), since records outlive any one call.
    fn announcement(&self) -> PeerRecord {
        let serving = self.lifecycle.state() == RunState::Serving;
        PeerRecord {
            load: if serving { 0.0 } else { 1.0 },
            ..self.record()
        }
    }

    /// Counters with the session and DHT figures filled in.
    pub fn metrics(&self) -> MetricsSnapshot {
        let (sessions, bytes) = self.sessions.usage();
        let dht = *self.discovery.dht().stats().borrow();
        MetricsSnapshot {
            dht_contacts: dht.contacts as u64,
            dht_records: dht.records as u64,
            ..self.metrics.snapshot(sessions, bytes)
        }
    }

    /// The serving peers this node knows of (from the tracker and the DHT), without itself.
    fn known_peers(&self) -> Vec<PeerRecord> {
        self.peers.read().expect("peers lock").all()
    }

    /// Replaces the peers learned from one source and updates the peer gauges; not once
    /// `unless` has fired (checked under the lock, so a heartbeat of a tracker no longer
    /// followed cannot bring its list back).
    fn learn_peers(
        &self,
        source: PeerSource,
        peers: Vec<PeerRecord>,
        unless: Option<&CancellationToken>,
    ) {
        let mut known = self.peers.write().expect("peers lock");
        if unless.is_some_and(CancellationToken::is_cancelled) {
            return;
        }
        let peers = peers
            .into_iter()
            .filter(|p| p.node_id != self.record.node_id)
            .collect();
        match source {
            PeerSource::Tracker => known.tracker = peers,
            PeerSource::Dht => known.dht = peers,
        }
        let count = known.all().len() as u64;
        self.metrics.peer_count.store(count, Ordering::Relaxed);
        self.metrics.healthy_peers.store(count, Ordering::Relaxed);
    }

    /// Serves one Forward call: validate, compute off the reactor, encode the reply.
    async fn forward(
        self: Arc<Self>,
        req: pb::ForwardRequest,
    ) -> Result<pb::ForwardResponse, NodeError> {
        if req.train {
            return self.train_forward(req).await;
        }
        let _admitted = self.lifecycle.admit()?;
        self.caps.check_budget()?;
        let received_ms = crate::now_ms();
        let call = self.parse_call(req)?;
        let receipt = ReceiptBody {
            version: neuroshard_proof::receipt::BODY_VERSION,
            kind: WorkKind::Forward,
            worker: self.key.public().0,
            requester: call.proof.map_or([0; 32], |(_, key)| key.0),
            model_id: self.model.id.clone(),
            weights_hash: [0; 32],
            layers: call.layers,
            session_id: call.session_id.clone(),
            start_pos: call.start_pos as u64,
            tokens: call.tokens as u32,
            flops: self.model.config.forward_flops(
                call.layers.to_range(),
                call.start_pos as u64,
                call.tokens as u64,
            ),
            input_hash: call.input_hash,
            output_hash: [0; 32],
            fingerprint: Fingerprint::of(&[]),
            nonce: call.proof.map_or([0; 16], |(nonce, _)| nonce),
            received_ms,
            replied_ms: 0,
        };
        let (tokens, reply_dtype, wants_receipt) =
            (call.tokens, call.reply_dtype, call.proof.is_some());
        let (out, compute, weights_hash) = self.clone().compute(call).await?;
        self.metrics.forward_calls.fetch_add(1, Ordering::Relaxed);
        self.metrics
            .tokens_served
            .fetch_add(tokens as u64, Ordering::Relaxed);
        let fingerprint = Fingerprint::of(last_row(&out, self.model.config.hidden_size));
        let (tensor, logits) = self.encode_output(out, tokens, reply_dtype);
        let receipt = wants_receipt.then(|| {
            let receipt = ReceiptBody {
                weights_hash,
                output_hash: tensor_hash(&tensor),
                fingerprint,
                replied_ms: crate::now_ms().max(received_ms),
                ..receipt
            }
            .sign(&self.key);
            self.ledger.issued(receipt.clone());
            receipt
        });
        use pb::forward_response::Output;
        let tensor = tensor_to_proto(tensor);
        Ok(pb::ForwardResponse {
            output: Some(if logits {
                Output::Logits(tensor)
            } else {
                Output::Hidden(tensor)
            }),
            compute_us: compute.as_micros() as u64,
            receipt: receipt.map(|r| r.to_wire()).unwrap_or_default(),
        })
    }

    /// Checks and stores countersigned receipts of this node's work.
    async fn submit_receipts(
        self: Arc<Self>,
        batch: Vec<Vec<u8>>,
    ) -> Result<pb::SubmitReceiptsResponse, NodeError> {
        if batch.len() > MAX_RECEIPTS_PER_SUBMIT {
            return Err(NodeError::BadRequest(format!(
                "{} countersigned receipts in one call; send at most {MAX_RECEIPTS_PER_SUBMIT}",
                batch.len()
            )));
        }
        let own = self.key.public();
        let (valid, rejected) = tokio::task::spawn_blocking(move || {
            let mut valid = Vec::new();
            let mut rejected = Vec::new();
            for checked in Countersignature::from_wire_batch(&batch, &own) {
                match checked {
                    Ok(cs) => valid.push(cs),
                    Err(e) => rejected.push(e.to_string()),
                }
            }
            (valid, rejected)
        })
        .await
        .map_err(|e| NodeError::BadRequest(format!("checking receipts failed: {e}")))?;
        let settled = self.ledger.settle(valid).await?;
        let stored = settled.iter().filter(|s| **s == Settlement::Stored).count();
        Ok(pb::SubmitReceiptsResponse {
            stored: stored as u32,
            already_settled: (settled.len() - stored) as u32,
            rejected,
        })
    }

    /// Checks a call's session id and (when given) model id.
    fn check_ids(&self, session_id: &str, model_id: &str) -> Result<(), NodeError> {
        if session_id.is_empty() || session_id.len() > MAX_SESSION_ID_BYTES {
            return Err(NodeError::BadRequest(format!(
                "session_id must be 1..={MAX_SESSION_ID_BYTES} bytes"
            )));
        }
        self.check_model(model_id)
    }

    /// Checks a call's model id, when it gives one.
    fn check_model(&self, model_id: &str) -> Result<(), NodeError> {
        if !model_id.is_empty() && model_id != self.model.id {
            return Err(NodeError::BadRequest(format!(
                "model {model_id} requested, this node serves model {}",
                self.model.id
            )));
        }
        Ok(())
    }

    /// Checks every field of a Forward request against this node, before any session work.
    fn parse_call(&self, req: pb::ForwardRequest) -> Result<ForwardCall, NodeError> {
        self.check_ids(&req.session_id, &req.model_id)?;
        let layers = span_from_proto(req.layers)?;
        let served = self.served();
        if !served.range.covers(&layers) {
            return Err(NodeError::WrongLayers {
                asked: layers,
                serves: served.range,
            });
        }
        let proof = parse_proof(&req.nonce, &req.requester_key)?;
        let input_hash = match &req.input {
            Some(pb::forward_request::Input::Tokens(t)) => tokens_hash(&t.ids),
            _ => [0; 32],
        };
        let (input, input_hash) = self.decode_input(req.input, input_hash)?;
        let reply_dtype = match req.reply_dtype {
            0 => WireDType::F16,
            v => dtype_from_proto(v)?,
        };
        let start_pos = usize::try_from(req.start_pos)
            .map_err(|_| NodeError::BadRequest("start_pos is out of range".into()))?;
        let tokens = input.tokens(self.model.config.hidden_size);
        if tokens > MAX_TOKENS_PER_CALL {
            return Err(NodeError::BadRequest(format!(
                "{tokens} tokens in one call; send at most {MAX_TOKENS_PER_CALL} per call"
            )));
        }
        Ok(ForwardCall {
            served,
            session_id: req.session_id,
            start_pos,
            layers,
            input,
            tokens,
            reply_dtype,
            input_hash,
            proof,
        })
    }

    /// Runs the call on the shard in a blocking task against the session's checked-out cache.
    ///
    /// The blocking task owns the whole call, check-in included, so a caller that gives up (and
    /// drops this future) cannot leave the session checked out.
    async fn compute(
        self: Arc<Self>,
        call: ForwardCall,
    ) -> Result<(ShardOutput, Duration, [u8; 32]), NodeError> {
        // Waited for before the session is checked out, so giving up here leaves nothing behind.
        let turn = self.duty.turn().await;
        let (mut checkout, created) = self.sessions.checkout(
            &call.session_id,
            call.start_pos,
            call.tokens,
            call.layers.len() as usize,
            Instant::now(),
        )?;
        if !Arc::ptr_eq(&call.served, &self.served()) {
            // The shard changed since the call was checked: its sessions were dropped, and a
            // cache made now on the old shard must not outlive it.
            self.sessions.abandon(checkout);
            return Err(NodeError::UnknownSession(call.session_id));
        }
        if created {
            self.metrics
                .sessions_started
                .fetch_add(1, Ordering::Relaxed);
        }
        self.busy.fetch_add(1, Ordering::Relaxed);
        let state = self;
        tokio::task::spawn_blocking(move || {
            let started = std::time::Instant::now();
            let threads = &state.threads;
            let out = threads.install(|| {
                std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    let served = &call.served;
                    let shard = served.shard.lock().unwrap_or_else(PoisonError::into_inner);
                    let weights_hash = shard.weights_hash(call.layers.to_range())?;
                    let out = state.run(
                        served,
                        &shard,
                        &mut checkout.cache,
                        call.start_pos,
                        call.layers,
                        call.input,
                    )?;
                    Ok::<_, NodeError>((out, weights_hash))
                }))
            });
            let compute = started.elapsed();
            state.busy.fetch_sub(1, Ordering::Relaxed);
            let result = match out {
                Ok(out) => {
                    state.sessions.checkin(checkout, Instant::now());
                    let (out, weights_hash) = out?;
                    Ok((out, compute, weights_hash))
                }
                Err(payload) => {
                    // The worker's fault, not the caller's: the caller fails over.
                    state.sessions.abandon(checkout);
                    let why = panic_text(payload.as_ref());
                    tracing::error!("a compute worker panicked ({why}); its session was dropped");
                    Err(NodeError::Internal(format!(
                        "compute panicked ({why}); the session was dropped"
                    )))
                }
            };
            // The cache is back before the next turn starts: a caller that gave up on this
            // call and asked again waits for its turn and then finds the session free.
            turn.finish(compute);
            result
        })
        .await
        .map_err(|e| NodeError::Internal(format!("compute task failed: {}", panic_message(e))))?
    }

    /// Runs the call on `shard` (or misbehaves, for a test node with a [`Fault`]).
    fn run(
        &self,
        served: &Served,
        shard: &Shard,
        cache: &mut neuroshard_model::KvCache,
        start_pos: usize,
        layers: LayerRange,
        input: ShardInput,
    ) -> Result<ShardOutput, NodeError> {
        let mut layers = layers.to_range();
        if let Some(Fault::PanicFrom(at)) = &self.fault
            && start_pos >= *at
        {
            panic!("injected fault at position {start_pos}");
        }
        let out = match (&self.fault, &served.wrong_shard) {
            (Some(Fault::WrongWeights(_)), Some(wrong)) => {
                let wrong = wrong.lock().unwrap_or_else(PoisonError::into_inner);
                wrong.forward(cache, start_pos, layers, input)?
            }
            (Some(Fault::SkipLayer), _) if layers.start > 0 && layers.len() >= 2 => {
                layers.start += 1;
                shard.forward(cache, start_pos, layers, input)?
            }
            _ => shard.forward(cache, start_pos, layers, input)?,
        };
        Ok(match (&self.fault, out) {
            (Some(Fault::Noise { scale }), ShardOutput::Hidden(v)) => {
                ShardOutput::Hidden(add_noise(v, *scale))
            }
            (Some(Fault::Noise { scale }), ShardOutput::Logits(v)) => {
                ShardOutput::Logits(add_noise(v, *scale))
            }
            (_, out) => out,
        })
    }

    /// The reply tensor, and whether it is logits: hidden states in the caller's dtype, logits
    /// always as f32.
    fn encode_output(
        &self,
        out: ShardOutput,
        tokens: usize,
        reply_dtype: WireDType,
    ) -> (codec::WireTensor, bool) {
        match out {
            ShardOutput::Hidden(values) => {
                let shape = [1, tokens, self.model.config.hidden_size];
                (codec::encode(&values, &shape, reply_dtype), false)
            }
            ShardOutput::Logits(values) => {
                let shape = [1, values.len()];
                (codec::encode(&values, &shape, WireDType::F32), true)
            }
        }
    }

    /// The input, and its hash (`tokens_hash` passes through for token input).
    fn decode_input(
        &self,
        input: Option<pb::forward_request::Input>,
        tokens_hash: [u8; 32],
    ) -> Result<(ShardInput, [u8; 32]), NodeError> {
        use pb::forward_request::Input;
        let hidden = self.model.config.hidden_size;
        match input {
            None => Err(NodeError::BadRequest("request has no input".into())),
            Some(Input::Tokens(t)) => Ok((ShardInput::Tokens(t.ids), tokens_hash)),
            Some(Input::Hidden(t)) => {
                let tensor = tensor_from_proto(t)?;
                let shape = tensor.shape.clone();
                if shape.len() != 3 || shape[0] != 1 || shape[1] == 0 || shape[2] != hidden {
                    return Err(NodeError::BadRequest(format!(
                        "hidden states must have shape [1, tokens, {hidden}], got {shape:?}"
                    )));
                }
                let hash = tensor_hash(&tensor);
                Ok((ShardInput::Hidden(codec::decode(&tensor)?), hash))
            }
        }
    }
}

/// The nonce and requester key of a call that wants a receipt; none when both are empty.
fn parse_proof(nonce: &[u8], requester: &[u8]) -> Result<Option<([u8; 16], PublicKey)>, NodeError> {
    if nonce.is_empty() && requester.is_empty() {
        return Ok(None);
    }
    let nonce: [u8; 16] = nonce.try_into().map_err(|_| {
        NodeError::BadRequest(format!("nonce must be 16 bytes, got {}", nonce.len()))
    })?;
    Ok(Some((nonce, PublicKey::from_slice(requester)?)))
}

/// The row a receipt fingerprints: the last token's hidden state, or the logits.
pub fn last_row(out: &ShardOutput, hidden: usize) -> &[f32] {
    match out {
        ShardOutput::Hidden(v) => &v[v.len().saturating_sub(hidden)..],
        ShardOutput::Logits(v) => v,
    }
}

/// `values` plus Gaussian noise of `scale` × their RMS.
fn add_noise(mut values: Vec<f32>, scale: f32) -> Vec<f32> {
    use rand_distr::Distribution;
    let rms = (values.iter().map(|v| v * v).sum::<f32>() / values.len().max(1) as f32).sqrt();
    let normal = rand_distr::Normal::new(0.0, (scale * rms).max(f32::MIN_POSITIVE))
        .expect("finite standard deviation");
    let mut rng = rand::rng();
    for v in &mut values {
        *v += normal.sample(&mut rng);
    }
    values
}

/// The gRPC face of a node.
#[derive(Debug, Clone)]
pub struct NodeService {
    state: Arc<NodeState>,
}

impl NodeService {
    /// Runs a compute call (`what`, for the log), counting its bytes and time.
    async fn counted<R: Message>(
        &self,
        what: &str,
        received: usize,
        call: impl Future<Output = Result<R, NodeError>>,
    ) -> Result<Response<R>, Status> {
        let started = std::time::Instant::now();
        let result = call.await;
        let sent = result.as_ref().map_or(0, |r| r.encoded_len());
        self.state.metrics.record_bytes(sent, received);
        self.state
            .metrics
            .record_rpc(started.elapsed(), result.is_ok());
        if let Err(e) = &result {
            tracing::debug!("{what} refused: {e}");
        }
        result.map(Response::new).map_err(Status::from)
    }
}

type CheckpointStream =
    Pin<Box<dyn futures::Stream<Item = Result<pb::CheckpointChunk, Status>> + Send>>;

#[tonic::async_trait]
impl Node for NodeService {
    async fn forward(
        &self,
        request: Request<pb::ForwardRequest>,
    ) -> Result<Response<pb::ForwardResponse>, Status> {
        let received = request.get_ref().encoded_len();
        let call = self.state.clone().forward(request.into_inner());
        self.counted("forward", received, call).await
    }

    async fn end_session(
        &self,
        request: Request<pb::EndSessionRequest>,
    ) -> Result<Response<pb::EndSessionResponse>, Status> {
        let existed = self.state.sessions.end(&request.into_inner().session_id);
        Ok(Response::new(pb::EndSessionResponse { existed }))
    }

    async fn backward(
        &self,
        request: Request<pb::BackwardRequest>,
    ) -> Result<Response<pb::BackwardResponse>, Status> {
        let received = request.get_ref().encoded_len();
        let call = self.state.clone().backward(request.into_inner());
        self.counted("backward", received, call).await
    }

    async fn exchange_gradient(
        &self,
        request: Request<pb::ExchangeGradientRequest>,
    ) -> Result<Response<pb::ExchangeGradientResponse>, Status> {
        let received = request.get_ref().encoded_len();
        let call = self.state.clone().exchange_gradient(request.into_inner());
        self.counted("exchange", received, call).await
    }

    type GetCheckpointStream = CheckpointStream;

    async fn get_checkpoint(
        &self,
        request: Request<pb::CheckpointRequest>,
    ) -> Result<Response<Self::GetCheckpointStream>, Status> {
        let messages = self
            .state
            .clone()
            .get_checkpoint(request.into_inner())
            .await?;
        let metrics = self.state.metrics.clone();
        let stream = futures::StreamExt::inspect(futures::stream::iter(messages), move |m| {
            if let Ok(chunk) = m {
                metrics.record_bytes(chunk.encoded_len(), 0);
            }
        });
        Ok(Response::new(Box::pin(stream)))
    }

    async fn put_checkpoint(
        &self,
        request: Request<tonic::Streaming<pb::CheckpointChunk>>,
    ) -> Result<Response<pb::PutCheckpointResponse>, Status> {
        let call = self.state.clone().put_checkpoint(request.into_inner());
        self.counted("put checkpoint", 0, call).await
    }

    async fn get_model_file(
        &self,
        request: Request<pb::ModelFileRequest>,
    ) -> Result<Response<pb::ModelFileResponse>, Status> {
        self.state
            .model_file(request.into_inner())
            .await
            .map(Response::new)
    }

    async fn ping(
        &self,
        _: Request<pb::PingRequest>,
    ) -> Result<Response<pb::PingResponse>, Status> {
        let now_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        Ok(Response::new(pb::PingResponse {
            node: Some(peer_to_proto(&self.state.record())),
            metrics: Some(self.state.metrics().into()),
            server_time_ms: now_ms,
        }))
    }

    async fn dial_back(
        &self,
        request: Request<pb::DialBackRequest>,
    ) -> Result<Response<pb::DialBackResponse>, Status> {
        let caller = request.remote_addr();
        Ok(Response::new(
            crate::reach::dial_back(caller, request.into_inner()).await,
        ))
    }

    async fn submit_receipts(
        &self,
        request: Request<pb::SubmitReceiptsRequest>,
    ) -> Result<Response<pb::SubmitReceiptsResponse>, Status> {
        let batch = request.into_inner().countersigned;
        let result = self.state.clone().submit_receipts(batch).await;
        result.map(Response::new).map_err(Status::from)
    }

    async fn get_peers(
        &self,
        request: Request<pb::GetPeersRequest>,
    ) -> Result<Response<pb::GetPeersResponse>, Status> {
        let reached_at = request.local_addr();
        let near = crate::convert::near_key(&request.into_inner().near)?;
        let dht = self.state.discovery.dht();
        let own = dht.local();
        let mut contacts = dht.closest(near.unwrap_or(own.key)).await;
        if dht.mode() == neuroshard_dht::Mode::Server {
            // A node that announces loopback (it was given no address to advertise) is named
            // by the address the caller reached it at.
            let addr = match reached_at {
                Some(at) if own.addr.ip().is_loopback() && !at.ip().is_loopback() => at,
                _ => own.addr,
            };
            contacts.insert(0, Contact { addr, ..own });
        }
        let mut peers = vec![self.state.record()];
        peers.extend(self.state.known_peers());
        Ok(Response::new(pb::GetPeersResponse {
            peers: peers.iter().map(peer_to_proto).collect(),
            contacts: contacts.iter().map(contact_to_proto).collect(),
        }))
    }
}

/// What a running node enforces, as its owner set it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct NodeLimits {
    /// Upload cap, KB/s; 0 for none.
    pub upload_kbps: u32,
    /// Download cap, KB/s; 0 for none.
    pub download_kbps: u32,
    /// Share of wall time it computes, %.
    pub compute_share_percent: u8,
    /// CPU threads for compute; 0 for every core but one.
    pub cpu_threads: u16,
    /// Bytes the transport has left before new work is refused; none without a transfer cap.
    pub transfer_left: Option<u64>,
}

/// A running node; dropping it does not stop the node, [`NodeHandle::shutdown`] does.
#[derive(Debug)]
pub struct NodeHandle {
    id: NodeId,
    addr: SocketAddr,
    stun: Option<SocketAddr>,
    relay: Option<Relay>,
    state: Arc<NodeState>,
    cancel: CancellationToken,
    server: tokio::task::JoinHandle<()>,
    /// How fetching the weights from a peer went, for a node started with `weights_from`.
    fetched: Option<TransferReport>,
}

impl NodeHandle {
    /// How fetching the weights from a peer went, for a node started with
    /// [`NodeConfig::weights_from`]; none for a node that read them from disk.
    pub fn weights_fetch(&self) -> Option<&TransferReport> {
        self.fetched.as_ref()
    }

    /// The trainable stage's flat parameters and accumulated gradient (a sum over the
    /// microbatches since the last inner step), in parameter order; none before the node's
    /// first training call or when it does not train.
    pub fn training_snapshot(&self) -> Option<TrainingSnapshot> {
        self.state.training_snapshot()
    }

    /// This node as a hop of a chain running its whole range.
    pub fn hop(&self) -> crate::router::Hop {
        crate::router::Hop {
            addr: self.advertised(),
            node_id: self.id().to_string(),
            layers: self.layers(),
        }
    }

    /// Replaces the replicas (`host:port`) the node exchanges pseudo-gradients with besides
    /// the peers of its layers it knows; nothing for a node that does not train.
    pub fn set_training_replicas(&self, replicas: Vec<String>) {
        if let Some(trainer) = &self.state.trainer {
            *trainer.replicas.write().expect("replicas lock") = replicas;
        }
    }

    /// The node's id.
    pub fn id(&self) -> NodeId {
        self.id
    }

    /// The bound address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Where the node answers STUN (UDP, its own port), if it does.
    pub fn stun_addr(&self) -> Option<SocketAddr> {
        self.stun
    }

    /// The advertised address: `host:port`, or `relay://RELAY/KEY` for a relayed node.
    pub fn advertised(&self) -> String {
        self.state.advertised.read().expect("address lock").clone()
    }

    /// The reachability self-test's outcome, as it changes.
    pub fn reachability(&self) -> tokio::sync::watch::Receiver<Reachability> {
        self.state.reachability.subscribe()
    }

    /// The relay this node runs for others, if it runs one.
    pub fn relay(&self) -> Option<&Relay> {
        self.relay.as_ref()
    }

    /// Layers served.
    pub fn layers(&self) -> LayerRange {
        self.state.served().range
    }

    /// Id of the model served.
    pub fn model_id(&self) -> &str {
        &self.state.model.id
    }

    /// Current counters.
    pub fn metrics(&self) -> MetricsSnapshot {
        self.state.metrics()
    }

    /// The node's public key.
    pub fn public_key(&self) -> PublicKey {
        self.state.key.public()
    }

    /// The receipt ledger.
    pub fn ledger(&self) -> &LedgerHandle {
        &self.state.ledger
    }

    /// Stops taking calls at once (calls in flight fail) and begins shutting the server down,
    /// without waiting: what a crash looks like to peers.
    pub fn kill(&self) {
        self.state.lifecycle.set(RunState::Stopped);
        self.cancel.cancel();
    }

    /// Refuses calls from now on (UNAVAILABLE, so clients fail over to replicas) until
    /// [`NodeHandle::resume`]; calls in flight finish. Sessions keep their caches until they
    /// expire, so a short pause costs a client no replay.
    pub fn pause(&self) {
        self.state.lifecycle.set(RunState::Paused);
    }

    /// Takes calls again after a pause or drain.
    pub fn resume(&self) {
        self.state.lifecycle.set(RunState::Serving);
    }

    /// Refuses new calls, waits for the calls in flight to finish, then pauses: "finish
    /// current requests, then pause".
    pub async fn drain(&self) {
        self.state.lifecycle.drain().await;
    }

    /// A watch of the run state and calls in flight.
    pub fn status(&self) -> tokio::sync::watch::Receiver<NodeStatus> {
        self.state.lifecycle.watch()
    }

    /// Changes the upload and download caps (KB/s, 0 for none) of the running node; open
    /// connections follow from their next read or write.
    pub fn set_bandwidth(&self, upload_kbps: u32, download_kbps: u32) {
        self.state.caps.set(upload_kbps, download_kbps);
    }

    /// Changes the share of wall time the node computes (1–100 %); the next call follows it.
    pub fn set_compute_share(&self, percent: u8) {
        self.state.duty.set_share(percent);
    }

    /// The limits in force.
    pub fn limits(&self) -> NodeLimits {
        let (upload_kbps, download_kbps) = self.state.caps.kbps();
        NodeLimits {
            upload_kbps,
            download_kbps,
            compute_share_percent: self.state.duty.share(),
            cpu_threads: self.state.threads.setting(),
            transfer_left: self.state.caps.budget_left(),
        }
    }

    /// Bytes the transport has moved, both ways, since the node started: every byte of every
    /// connection, which is what a transfer cap counts.
    pub fn transport_bytes(&self) -> u64 {
        self.state.caps.moved()
    }

    /// Caps [`NodeHandle::transport_bytes`]: once it reaches `bytes`, Forward calls are refused
    /// with RESOURCE_EXHAUSTED naming the figures; `None` lifts the cap.
    pub fn set_transfer_budget(&self, bytes: Option<u64>) {
        self.state.caps.set_budget(bytes);
    }

    /// Whether compute runs on a GPU (else on the CPU).
    pub fn on_gpu(&self) -> bool {
        self.state.served().on_gpu
    }

    /// Serves `layers` on `device` from now on, without a restart: the new shard loads while
    /// the old one serves, then replaces it. Calls in flight finish on the old shard; sessions
    /// are dropped (their caches belong to the old layers), so their callers fail over and
    /// replay. The tracker hears of the change at once, and the DHT entries of layers no
    /// longer served stop naming this node. A range the model does not have, or a device that
    /// cannot be used, is refused with the field named, and the old shard goes on serving.
    pub async fn reshard(
        &self,
        layers: LayerRange,
        device: Option<ComputeDevice>,
    ) -> Result<(), NodeError> {
        let state = &self.state;
        let total = state.model.config.num_hidden_layers as u32;
        if layers.is_empty() || layers.end > total {
            return Err(NodeError::Config(format!(
                "layers: {layers} is not within the model's {total} layers"
            )));
        }
        let _one_at_a_time = state.resharding.lock().await;
        let before = state.served();
        if before.range == layers && before.device == device {
            return Ok(());
        }
        let (_, source) = weights_on_disk(&state.model_dir, layers)?.ok_or_else(|| {
            NodeError::Config(format!(
                "layers: the weights of {layers} are not on this machine; fetch them first"
            ))
        })?;
        let next = Served::load(source, layers, device, state.fault.as_ref()).await?;
        let dropped = {
            // Sessions go while the swap is held: a call that sees the new shard finds none of
            // the old caches.
            let mut served = state.served.write().expect("served lock");
            *served = Arc::new(next);
            state.sessions.clear()
        };
        tracing::info!(
            "now serving layers {layers} (was {}); {dropped} sessions dropped",
            before.range
        );
        state.tell_tracker().await;
        state.announce("layers", Some(before.range)).await;
        Ok(())
    }

    /// Changes the CPU threads compute may use (0: every core but one); the next call follows.
    pub fn set_cpu_threads(&self, threads: u16) -> Result<(), NodeError> {
        self.state.threads.set(threads)
    }

    /// Applies what a running node changes without a restart: bandwidth caps, compute share,
    /// CPU threads, the display name, and the first-run rule: paused while the owner has not
    /// picked a name (or anonymity) and a preset. It never resumes by itself, so an owner's
    /// pause outlasts a settings change; the app resumes when the first run ends. Layers and
    /// device take a shard load ([`NodeHandle::reshard`], which the app plans for) and are not
    /// applied here.
    pub fn apply_settings(&self, settings: &crate::settings::Settings) {
        let bandwidth = &settings.bandwidth;
        self.set_bandwidth(bandwidth.upload_kbps, bandwidth.download_kbps);
        self.set_compute_share(settings.compute.gpu_share_percent);
        if let Err(e) = self.set_cpu_threads(settings.compute.cpu_threads) {
            tracing::warn!("keeping the compute threads as they were: {e}");
        }
        if !settings.profile.onboarded {
            self.pause();
        }
        let name = settings.profile.display_name.as_deref();
        if let Err(e) = self.set_display_name(name.filter(|_| !settings.profile.anonymous)) {
            tracing::warn!("keeping the display name as it was: {e}");
        }
    }

    /// Follows the tracker at `url` (or none) from now on, without a restart: registers with
    /// it before returning and heartbeats it; the old tracker's heartbeat stops. A URL that
    /// does not parse is refused, naming the field, and the old tracker stays.
    pub async fn set_tracker(&self, url: Option<&str>) -> Result<(), NodeError> {
        self.state.follow_tracker(url.map(str::to_string)).await
    }

    /// Asks `peers` (`host:port`) for referrals from now on, and joins the DHT through them at
    /// once, without a restart. A peer that does not read as `host:port` is refused, naming
    /// the field, and the old list stays.
    pub fn set_bootstrap(&self, peers: Vec<String>) -> Result<(), NodeError> {
        let discovery = &self.state.discovery;
        if discovery.bootstrap() == peers {
            return Ok(());
        }
        discovery.set_bootstrap(peers)?;
        let state = self.state.clone();
        tokio::spawn(async move {
            let known = state.known_peers();
            let joined = state.discovery.join(&known);
            tokio::select! {
                _ = state.cancel.cancelled() => {}
                _ = joined => {}
            }
        });
        Ok(())
    }

    /// The node's discovery: its DHT, LAN discovery and announcements.
    pub fn discovery(&self) -> &Discovery {
        &self.state.discovery
    }

    /// Signs and puts the node's DHT records now (they are also put on a timer).
    pub async fn announce(&self) -> Result<AnnounceStatus, NodeError> {
        self.state
            .discovery
            .announce(&self.state.announcement(), &self.state.key)
            .await
    }

    /// The serving peers this node knows of (from the tracker and the DHT), without itself.
    pub fn known_peers(&self) -> Vec<PeerRecord> {
        self.state.known_peers()
    }

    /// The name the node shows the swarm (none: anonymous); announced at once.
    pub fn set_display_name(&self, name: Option<&str>) -> Result<(), NodeError> {
        let name = name.unwrap_or_default();
        check_display_name(name)
            .map_err(|why| NodeError::Config(format!("display_name: {why}")))?;
        let mut current = self.state.display_name.write().expect("name lock");
        if *current != name {
            *current = name.to_string();
            drop(current);
            let state = self.state.clone();
            tokio::spawn(async move { state.announce("display name", None).await });
        }
        Ok(())
    }

    /// Events from now on (state changes).
    pub fn events(&self) -> tokio::sync::broadcast::Receiver<NodeEvent> {
        self.state.lifecycle.subscribe()
    }

    /// Stops the node and waits for its server to end.
    pub async fn shutdown(self) {
        if let Some(mapper) = self.state.kept.lock().await.mapper.take() {
            mapper.shutdown().await;
        }
        self.kill();
        let _ = self.server.await;
    }
}

/// What a panicked task said, for an error message.
fn panic_message(e: tokio::task::JoinError) -> String {
    match e.try_into_panic() {
        Ok(payload) => panic_text(payload.as_ref()),
        Err(e) => e.to_string(),
    }
}

/// The message a panic carried.
fn panic_text(payload: &(dyn std::any::Any + Send)) -> String {
    payload
        .downcast_ref::<String>()
        .cloned()
        .or_else(|| payload.downcast_ref::<&str>().map(|s| s.to_string()))
        .unwrap_or_else(|| "it panicked".into())
}

/// Loads the shard, binds, registers with the tracker (if any) and starts serving.
pub async fn start_node(config: NodeConfig) -> Result<NodeHandle, NodeError> {
    config.validate()?;
    let range = config.layers;
    let on_disk = if config.weights_from.is_some() && !config.model_dir.join("config.json").exists()
    {
        Ok(None)
    } else {
        weights_on_disk(&config.model_dir, range)
    };
    let (model, source, fetched) = match (on_disk, &config.weights_from) {
        (Ok(Some((model, source))), _) => (model, source, None),
        (Ok(None), None) => {
            return Err(NodeError::Config(format!(
                "{} holds neither safetensors weights nor the fetched weights of layers {range}; \
                 fetch them from a peer with weights_from",
                config.model_dir.display()
            )));
        }
        (Err(e), None) => return Err(e),
        (stored, Some(peer)) => {
            if let Err(e) = stored {
                tracing::warn!("fetching the weights again: {e}");
            }
            let (model, checkpoint, report) = fetch_weights(
                peer,
                &config.model_dir,
                range,
                log_fetch_progress(peer, range),
            )
            .await?;
            let source = WeightSource::Fetched(Box::new(model.clone()), checkpoint.parameters);
            (model, source, Some(report))
        }
    };
    let served = Served::load(source, range, config.device, config.fault.as_ref()).await?;
    let (key, ledger) = match &config.data_dir {
        Some(dir) => (
            crate::identity::load_or_create(dir)?,
            Ledger::open(&dir.join(LEDGER_FILE))?,
        ),
        None => (NodeKey::generate(), Ledger::in_memory()?),
    };
    let key = Arc::new(key);
    let ledger = LedgerHandle::spawn(ledger)?;
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .map_err(|e| NodeError::io(format!("binding {}", config.listen), e))?;
    let addr = listener
        .local_addr()
        .map_err(|e| NodeError::io("local address", e))?;
    let advertise = config.advertise.clone().unwrap_or_else(|| {
        // Bound to every interface: the one the routing table uses toward the internet (no
        // packet is sent), which is what peers on the LAN or through a router reach; loopback
        // on a machine with no route out.
        let ip = if addr.ip().is_unspecified() {
            neuroshard_nat::local_ip_toward(([192, 0, 2, 1], 9).into())
                .map_or_else(|_| "127.0.0.1".to_string(), |ip| ip.to_string())
        } else {
            addr.ip().to_string()
        };
        format!("{ip}:{}", addr.port())
    });
    let id = key.id();
    let cancel = CancellationToken::new();
    // Whatever started stops again if the node fails to start.
    let stop_on_error = cancel.clone().drop_guard();
    let stun = if config.stun {
        match neuroshard_nat::stun::Server::start(addr, cancel.clone()).await {
            Ok(server) => Some(server.addr()),
            Err(e) => {
                tracing::warn!("not answering STUN: {e}");
                None
            }
        }
    } else {
        None
    };
    let relay = match &config.serve_relay {
        Some(serve) => Some(
            Relay::start(serve.listen, serve.config, cancel.clone())
                .await
                .map_err(|e| NodeError::Config(format!("serve_relay: {e}")))?,
        ),
        None => None,
    };
    let relay_addr = relay.as_ref().map_or_else(String::new, |r| {
        let host = advertise
            .rsplit_once(':')
            .map_or(advertise.as_str(), |(h, _)| h);
        format!("{host}:{}", r.addr().port())
    });
    let metrics = Arc::new(Metrics::default());
    let discovery = start_discovery(&config, &advertise, &key, &metrics, cancel.clone()).await?;
    let trainer = config
        .train
        .clone()
        .map(|c| training::Trainer::new(c, metrics.clone()));
    let state = Arc::new(NodeState {
        sessions: SessionStore::new(SessionLimits {
            budget_bytes: config.kv_budget_bytes,
            idle_timeout: config.session_idle,
            bytes_per_token_layer: model.config.kv_bytes_per_token_layer() as u64,
        }),
        record: PeerRecord {
            node_id: id.to_string(),
            addr: advertise.clone(),
            model_id: model.id.clone(),
            layers: range,
            total_layers: model.config.num_hidden_layers as u32,
            load: 0.0,
            public_key: key.public(),
            display_name: String::new(),
            relay: relay_addr,
        },
        display_name: RwLock::new(config.display_name.clone().unwrap_or_default()),
        reachability: tokio::sync::watch::channel(Reachability::untested(
            &advertise,
            "Reachability is being tested.",
        ))
        .0,
        advertised: RwLock::new(advertise),
        kept: tokio::sync::Mutex::new(Default::default()),
        served: RwLock::new(Arc::new(served)),
        resharding: tokio::sync::Mutex::new(()),
        model_dir: config.model_dir.clone(),
        model,
        metrics,
        peers: RwLock::new(KnownPeers::default()),
        busy: AtomicUsize::new(0),
        lifecycle: Lifecycle::new(if config.start_paused {
            RunState::Paused
        } else {
            RunState::Serving
        }),
        caps: BandwidthCaps::new(config.upload_kbps, config.download_kbps),
        duty: DutyCycle::new(config.compute_share_percent),
        threads: ComputeThreads::new(config.cpu_threads)?,
        key,
        ledger,
        discovery,
        beat_now: tokio::sync::watch::channel(0).0,
        told: tokio::sync::watch::channel(None).0,
        tracker: tokio::sync::Mutex::new(None),
        heartbeat_every: config.heartbeat,
        cancel: cancel.clone(),
        fault: config.fault.clone(),
        trainer,
        weights_snapshot: Mutex::new(None),
    });
    tokio::spawn(sweep_sessions(
        state.clone(),
        config.session_idle / 4,
        cancel.clone(),
    ));
    let service = NodeServer::new(NodeService {
        state: state.clone(),
    })
    .max_decoding_message_size(MAX_MESSAGE_BYTES)
    .max_encoding_message_size(MAX_MESSAGE_BYTES);
    let routes = tonic::service::Routes::new(service)
        .add_service(DhtService::server(state.discovery.dht().clone()));
    let (circuits, relayed) = tokio::sync::mpsc::channel(16);
    let server = crate::spawn_server(
        routes,
        listener,
        Some(relayed),
        state.caps.clone(),
        cancel.clone(),
        "node",
    );
    state
        .test_reachability(&config, addr.port(), circuits)
        .await;
    state.follow_tracker(config.tracker.clone()).await?;
    tokio::spawn(run_discovery(state.clone(), cancel.clone()));
    tracing::info!(%addr, layers = %range, id = %id.short(), "node serving");
    stop_on_error.disarm();
    Ok(NodeHandle {
        id,
        addr,
        stun,
        relay,
        state,
        cancel,
        server,
        fetched,
    })
}

/// Logs a weights transfer from `peer` at every tenth of the way.
fn log_fetch_progress(peer: &str, layers: LayerRange) -> impl FnMut(Progress) + use<> {
    let peer = peer.to_string();
    let mut shown = None;
    move |p: Progress| {
        let tenth = p.done * 10 / p.total.max(1);
        if shown != Some(tenth) {
            shown = Some(tenth);
            tracing::info!(
                "fetching the weights of layers {layers} from {peer}: {}% ({:.1} of {:.1} MB)",
                tenth * 10,
                p.done as f64 / 1e6,
                p.total as f64 / 1e6
            );
        }
    }
}

/// The node's DHT: serving at its advertised address where that resolves to an `ip:port`, else
/// taking part as a client only.
async fn start_discovery(
    config: &NodeConfig,
    advertise: &str,
    key: &Arc<NodeKey>,
    metrics: &Arc<Metrics>,
    cancel: CancellationToken,
) -> Result<Discovery, NodeError> {
    let resolved = tokio::net::lookup_host(advertise)
        .await
        .ok()
        .and_then(|mut addrs| addrs.find(|a| !a.ip().is_unspecified() && a.port() != 0));
    if resolved.is_none() {
        tracing::warn!(
            "{advertise} does not resolve to an ip:port: taking part in the DHT as a client"
        );
    }
    let local = Contact {
        key: Key::of_node(&key.id()),
        addr: resolved.unwrap_or_else(|| SocketAddr::from(([0, 0, 0, 0], 0))),
    };
    let pool = Arc::new(ConnectionPool::new(PoolConfig::default(), metrics.clone()));
    pool.spawn_reaper();
    Discovery::start(
        local,
        resolved.map(|_| key.clone()),
        config.discovery.clone(),
        config.bootstrap.clone(),
        pool,
        cancel,
    )
}

/// Joins the DHT, keeps the node's records announced, and re-reads its model's providers every
/// sweep (joining again when the table has emptied or the LAN names someone new), until
/// cancelled.
async fn run_discovery(state: Arc<NodeState>, cancel: CancellationToken) {
    let discovery = &state.discovery;
    let join_then_keep_up = async {
        // Referrals are unsigned: they only lead into the DHT, whose signed records name the
        // peers this node hands out in turn.
        discovery.join(&state.known_peers()).await;
        let announcing = discovery.keep_announcing(
            &state.key,
            || state.announcement(),
            state.lifecycle.watch(),
            cancel.clone(),
        );
        tokio::join!(announcing, sweep_providers(&state));
    };
    tokio::select! {
        _ = cancel.cancelled() => {}
        _ = join_then_keep_up => {}
    }
}

/// Reads the node's model's providers from the DHT now and every sweep, joining again first
/// when the routing table has emptied or the LAN named someone new; forever.
async fn sweep_providers(state: &NodeState) {
    let discovery = &state.discovery;
    let mut lan = discovery.lan().map(|lan| lan.count());
    loop {
        let providers = discovery
            .providers(&state.model.id, state.record.total_layers)
            .await;
        state.learn_peers(PeerSource::Dht, providers, None);
        let lan_changed = async {
            match &mut lan {
                Some(count) => count.changed().await.is_ok(),
                None => std::future::pending().await,
            }
        };
        let rejoin = tokio::select! {
            _ = tokio::time::sleep(discovery.config().sweep_every) => false,
            true = lan_changed => true,
        };
        if rejoin || discovery.dht().stats().borrow().contacts == 0 {
            discovery.join(&state.known_peers()).await;
        }
    }
}

async fn sweep_sessions(state: Arc<NodeState>, period: Duration, cancel: CancellationToken) {
    let mut tick = tokio::time::interval(period.max(Duration::from_millis(10)));
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tick.tick() => {
                let expired = state.sessions.expire(Instant::now());
                if expired > 0 {
                    tracing::debug!(expired, "expired idle sessions");
                }
            }
        }
    }
}

/// The node's side of the tracker protocol: register, heartbeat, register again when the
/// tracker has forgotten the node (it restarted), and keep the peer list fresh.
struct Heartbeat {
    state: Arc<NodeState>,
    tracker: TrackerClient<Channel>,
    url: String,
    registered: bool,
    /// Fires when the node stops following this tracker.
    stop: CancellationToken,
}

impl Heartbeat {
    fn new(state: Arc<NodeState>, url: &str, stop: CancellationToken) -> Result<Self, NodeError> {
        Ok(Self {
            state,
            tracker: crate::client::tracker_client(url)?,
            url: url.to_string(),
            registered: false,
            stop,
        })
    }

    /// Beats every `period`, and when asked to, until stopped; a beat under way when the stop
    /// comes is dropped.
    async fn run(mut self, period: Duration) {
        let stop = self.stop.clone();
        let mut tick = tokio::time::interval(period);
        tick.tick().await;
        let mut asked = self.state.beat_now.subscribe();
        asked.borrow_and_update();
        loop {
            tokio::select! {
                biased;
                _ = stop.cancelled() => return,
                _ = tick.tick() => {}
                Ok(()) = asked.changed() => {}
            }
            tokio::select! {
                biased;
                _ = stop.cancelled() => return,
                _ = self.beat() => {}
            }
        }
    }

    async fn beat(&mut self) {
        let record = self.state.record();
        if self.registered {
            let timestamp_ms = crate::now_ms();
            let message = crate::tracker::announcement("heartbeat", &record, timestamp_ms);
            let request = pb::HeartbeatRequest {
                node_id: record.node_id.clone(),
                layers: Some(crate::convert::span_to_proto(record.layers)),
                load: record.load,
                timestamp_ms,
                signature: self.state.key.sign(&message).to_vec(),
            };
            match self.tracker.heartbeat(request).await {
                Ok(reply) if reply.get_ref().known => self.told(record.layers),
                Ok(_) => {
                    tracing::info!("tracker forgot this node (restarted?); registering again");
                    self.registered = false;
                }
                Err(status) => tracing::warn!("heartbeat failed: {}", status.message()),
            }
        }
        if !self.registered {
            let timestamp_ms = crate::now_ms();
            let message = crate::tracker::announcement("register", &record, timestamp_ms);
            let request = pb::RegisterRequest {
                node: Some(peer_to_proto(&record)),
                timestamp_ms,
                signature: self.state.key.sign(&message).to_vec(),
            };
            match self.tracker.register(request).await {
                Ok(reply) => {
                    for warning in &reply.get_ref().warnings {
                        tracing::warn!("tracker: {warning}");
                    }
                    self.registered = true;
                    self.told(record.layers);
                }
                Err(status) => {
                    tracing::warn!("registering with the tracker failed: {}", status.message())
                }
            }
        }
        self.refresh_peers(&record.model_id).await;
    }

    async fn refresh_peers(&mut self, model_id: &str) {
        let Ok(peers) =
            crate::client::list_peers(self.tracker.clone(), &self.url, Some(model_id)).await
        else {
            return;
        };
        let contacts = peers.iter().filter_map(contact_of_peer).collect();
        self.state.discovery.dht().add_candidates(contacts).await;
        self.state
            .learn_peers(PeerSource::Tracker, peers, Some(&self.stop));
    }

    /// Records that the tracker accepted `layers` from this node, unless it is no longer
    /// followed.
    fn told(&self, layers: LayerRange) {
        if !self.stop.is_cancelled() {
            self.state.told.send_replace(Some(layers));
        }
    }
}

/// Peers the reachability test may ask: the tracker's list and the bootstrap peers.
async fn reach_candidates(config: &NodeConfig) -> Vec<PeerRecord> {
    let mut peers = Vec::new();
    if let Some(url) = &config.tracker {
        match crate::client::tracker_client(url) {
            Ok(tracker) => match crate::client::list_peers(tracker, url, None).await {
                Ok(listed) => peers.extend(listed),
                Err(e) => tracing::warn!("reachability: listing the tracker's peers: {e}"),
            },
            Err(e) => tracing::warn!("reachability: {e}"),
        }
    }
    for addr in &config.bootstrap {
        let pinged = async { crate::convert::peer_from_proto(crate::reach::ping(addr).await?) };
        match tokio::time::timeout(Duration::from_secs(5), pinged).await {
            Ok(Ok(peer)) => peers.push(peer),
            Ok(Err(e)) => tracing::warn!("reachability: bootstrap peer {addr}: {e}"),
            Err(_) => tracing::warn!("reachability: bootstrap peer {addr} did not answer"),
        }
    }
    peers
}
