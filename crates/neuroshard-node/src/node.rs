//! A node: one layer range of one model served over gRPC, with its session store, metrics,
//! lifecycle (pause, drain, caps, duty cycle), receipts and tracker heartbeat.
//!
//! This file holds the node's shared state ([`NodeState`]: the served shard, sessions, peers,
//! tracker and reachability); the rest sits beside it: `config` ([`NodeConfig`], test faults),
//! `served` (the shard and where its weights come from), `forward` (serving `Forward`),
//! `service` (the gRPC face), `handle` ([`NodeHandle`]), `startup` ([`start_node`]) and
//! `heartbeat` (the tracker protocol); `checkpoint` (`GetCheckpoint`, `PutCheckpoint`,
//! `GetModelFile`), `training` and `outer` (the training stage and its DiLoCo round).
//!
//! [`start_node`] loads the shard (off the reactor), binds, and returns a [`NodeHandle`]; the
//! server, the session sweeper and the heartbeat run as tasks tied to the handle's cancellation
//! token.

use neuroshard_base::sync::{LockExt, RwLockExt};
use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use neuroshard_base::{LayerRange, NodeId, NodeKey, PublicKey};
use neuroshard_dht::{Contact, Key};
use neuroshard_model::codec::{self, WireDType};
use neuroshard_model::{ModelInfo, Precision, Shard, ShardInput, ShardOutput};
use neuroshard_proof::{
    Countersignature, CreditPass, Fingerprint, Ledger, ReceiptBody, Settlement, WorkKind,
};
use neuroshard_proto as pb;
use pb::node_server::{Node, NodeServer};
use pb::tracker_client::TrackerClient;
use prost::Message;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;
use tonic::{Request, Response, Status};

use crate::duty::DutyCycle;
use crate::ledger::LedgerHandle;
use crate::lifecycle::{Lifecycle, NodeEvent, NodeStatus, RunState};
use crate::reach::{NatMode, ReachConfig, Reachability};
use crate::sessions::{SessionLimits, SessionStore};
use crate::threads::ComputeThreads;
use neuroshard_client::checkpoint::{Progress, TransferReport, fetch_weights};
use neuroshard_client::verify::last_row;
use neuroshard_discovery::{AnnounceStatus, DhtService, Discovery, DiscoveryConfig};
use neuroshard_nat::relay::{Relay, RelayConfig};
use neuroshard_net::bandwidth::BandwidthCaps;
use neuroshard_net::convert::{
    PeerRecord, check_display_name, contact_of_peer, contact_to_proto, dtype_from_proto,
    peer_to_proto, span_from_proto, tensor_from_proto, tensor_hash, tensor_to_proto, tokens_hash,
};
use neuroshard_net::metrics::{Metrics, MetricsSnapshot};
use neuroshard_net::pool::{ConnectionPool, PoolConfig, Target};
use neuroshard_net::{MAX_MESSAGE_BYTES, NodeError};
use neuroshard_settings::ComputeDevice;

mod attest;
mod batch;
mod checkpoint;
mod config;
mod forward;
mod handle;
mod heartbeat;
mod outer;
mod served;
mod service;
mod startup;
mod training;

pub use batch::Batching;
#[cfg(feature = "test-faults")]
pub use config::Fault;
#[cfg(not(feature = "test-faults"))]
use config::Fault;
pub use config::NodeConfig;
use forward::{panic_message, parse_proof};
pub use handle::{NodeHandle, NodeLimits};
use heartbeat::Heartbeat;
pub use outer::{Compression, TrainingConfig, contribution_bytes};
use served::{Served, WeightSource, weights_on_disk};
pub use service::NodeService;
use startup::reach_candidates;
pub use startup::start_node;
pub use training::TrainingSnapshot;

pub use neuroshard_net::MAX_TOKENS_PER_CALL;

/// Longest session id accepted: ids are client-chosen keys, not payloads.
const MAX_SESSION_ID_BYTES: usize = 128;

/// Countersignatures one SubmitReceipts call may carry: a few seconds of a busy client's hops.
pub const MAX_RECEIPTS_PER_SUBMIT: usize = 1024;

/// How long a layer change waits for the tracker to hear of it (the tracker client's own
/// timeout, and some).
const TRACKER_WAIT: Duration = Duration::from_secs(15);

/// File name of the ledger inside the data directory.
pub const LEDGER_FILE: &str = "ledger.sqlite";

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
        neuroshard_discovery::dedup_peers(both)
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
    /// Decode steps waiting to be run together, and how.
    batcher: batch::Batcher,
    batching: Batching,
    threads: ComputeThreads,
    /// What the node announces of its decode speed.
    decode_speed: crate::bench::DecodeSpeed,
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
    /// GetCheckpoint streams open at once, in all and per caller address.
    checkpoint_streams: Arc<neuroshard_base::quota::Quota>,
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
        self.served.read_or_recover().clone()
    }

    /// What this node announces.
    pub fn record(&self) -> PeerRecord {
        PeerRecord {
            load: self.load(),
            decode_ms_per_layer: self.decode_speed.ms_per_layer(),
            layers: self.served().range,
            display_name: self.display_name.read_or_recover().clone(),
            addr: self.advertised.read_or_recover().clone(),
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
        let advertised = self.advertised.read_or_recover().clone();
        if config.reach.mode == NatMode::Off {
            self.reachability.send_replace(Reachability::untested(
                &advertised,
                "Reachability is not tested (NAT traversal is off).",
            ));
            return;
        }
        let peers = reach_candidates(config).await;
        let subject = crate::reach::Subject {
            node_id: self.record.node_id,
            advertised,
            port,
            key: &self.key,
            circuits,
            cancel: self.cancel.clone(),
        };
        let (reach, kept) = crate::reach::establish(&subject, &config.reach, &peers).await;
        if reach.path != crate::reach::ReachPath::Unreachable {
            *self.advertised.write_or_recover() = reach.addr.clone();
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
        self.peers.read_or_recover().all()
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
        let mut known = self.peers.write_or_recover();
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
}
