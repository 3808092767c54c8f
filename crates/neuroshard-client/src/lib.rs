//! The client side of the swarm: a session planned over a chain of peers, with failover
//! ([`router`] plans the chain), generation and sampling ([`generate`]), spot checks
//! ([`verify`]), the receipt [`outbox`], the training client, and fetching weights and
//! checkpoints from peers ([`checkpoint`]).
//!
//! Each hop of a [`SwarmSession`] keeps a replay log of the inputs it was sent, with their
//! absolute positions. When a hop fails or misses its deadline, the peer is banned, the hop's
//! layer span is re-planned (possibly over several peers), and the log is replayed to the
//! replacement before the current input is sent. Hops downstream keep their caches: the
//! replacement recomputes exactly the states they already consumed.
//!
//! Every reply carries a receipt. The session checks it against the call (signature, worker
//! id, nonce, hashes, fields), re-executes a sample of hops when it holds the model
//! ([`LocalVerifier`]), and countersigns it through the [`ReceiptOutbox`]. A failed check voids
//! the receipt, bans the worker for an escalating time, and redoes the hop elsewhere.
//!
//! This file holds the client config, the tracker helpers and [`SwarmClient`] (peers, model,
//! routing); `session` the session and its failover, `settle` the receipts and spot checks,
//! `faults` whose fault an error is, `training` the training session.

use neuroshard_base::sync::LockExt;
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use neuroshard_base::{LayerRange, NodeId, NodeKey, PublicKey};
use neuroshard_dht::{Contact, Key};
use neuroshard_model::codec::{self, WireDType, WireTensor};
use neuroshard_model::{Chosen, LlamaConfig, Sampler, ShardInput};
use neuroshard_proof::{
    Expectation, Fingerprint, PeerRecord as Reputation, Receipt, Tolerance, Verdict, WorkKind,
};
use neuroshard_proto as pb;
use pb::tracker_client::TrackerClient;
use prost::Message;
use rand::SeedableRng;
use rand::rngs::StdRng;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;

use neuroshard_net::NodeError;

pub mod chain;
pub mod checkpoint;
mod faults;
pub mod generate;
pub mod outbox;
pub mod router;
mod session;
mod settle;
mod training;
pub mod verify;
use crate::chain::{Action, Chain, ChainError, Fault, Replan, Reply};
use crate::generate::Pipeline;
use crate::outbox::{OutboxReport, ReceiptOutbox};
use crate::router::{Hop, Router, RouterConfig};
use crate::verify::LocalVerifier;
use faults::*;
use neuroshard_discovery::{Discovery, DiscoveryConfig};
use neuroshard_net::convert::{
    PeerRecord, chosen_from_proto, chosen_hash, dtype_to_proto, peer_from_proto, sample_to_proto,
    span_to_proto, tensor_from_proto, tensor_hash, tensor_to_proto, tokens_hash,
};
use neuroshard_net::metrics::{Metrics, MetricsSnapshot};
use neuroshard_net::pool::{ConnectionPool, PoolConfig, Target};
use session::{HopInput, HopOutput};
pub use session::{HopTiming, SwarmSession};
pub use training::{Microbatch, StepReport, TrainSession, loss_tensor};

/// Largest tracker reply read: 1000 listed peers at the longest allowed fields fit.
const MAX_TRACKER_REPLY_BYTES: usize = 1024 * 1024;

/// Tokens sent per Forward call when a prompt is longer: under the node's per-call cap, and
/// small enough that a prefill streams through the chain in pieces.
pub const PREFILL_CHUNK_TOKENS: usize = 512;

/// Client settings.
#[derive(Debug, Clone)]
pub struct ClientConfig {
    /// Tracker URL; none to find peers through the DHT alone.
    pub tracker: Option<String>,
    /// Peers (`host:port`) to ask for referrals into the DHT, used when there is no tracker or
    /// it does not answer. Default none.
    pub bootstrap: Vec<String>,
    /// DHT and LAN discovery (the client takes part as a DHT client: it asks, never serves).
    pub discovery: DiscoveryConfig,
    /// Model to use; `None` picks the model the swarm serves (it must serve exactly one).
    pub model_id: Option<String>,
    /// The config of `model_id`, read from the model's own files (as a directory whose id is
    /// `model_id` gives it): the FLOPs every receipt claims are checked against it. None: the
    /// config the model's peers serve. Default none.
    pub model_config: Option<LlamaConfig>,
    /// Connection pool limits.
    pub pool: PoolConfig,
    /// Routing and failover tuning.
    pub router: RouterConfig,
    /// Dtype of hidden states on the wire. Default f16: half of f32's bytes, and its 11-bit
    /// mantissa keeps greedy tokens identical on the models tested (bf16 has only 8 bits).
    pub wire_dtype: WireDType,
    /// Failovers allowed within one step before it fails. Default 4.
    pub max_failovers_per_step: usize,
    /// The key that countersigns receipts. None: a fresh key for this client.
    pub key: Option<Arc<NodeKey>>,
    /// A directory holding the model, to re-execute sampled hops (spot checks). None: receipts
    /// are still checked and countersigned, but no work is re-executed.
    pub verify_with: Option<std::path::PathBuf>,
    /// How close a re-executed hop must be to the worker's output.
    pub tolerance: Tolerance,
    /// An issuer's pass for `key`, shown with the countersignatures this client returns, so
    /// workers that trust the issuer count them as earned. Default none.
    pub pass: Option<neuroshard_proof::CreditPass>,
}

impl ClientConfig {
    /// Defaults for a swarm whose tracker is at `tracker`.
    pub fn new(tracker: impl Into<String>) -> Self {
        Self {
            tracker: Some(tracker.into()),
            ..Self::with_bootstrap(Vec::new())
        }
    }

    /// Defaults for a swarm found through the DHT from the `bootstrap` peers (`host:port`),
    /// with no tracker.
    pub fn with_bootstrap(bootstrap: Vec<String>) -> Self {
        Self {
            tracker: None,
            bootstrap,
            discovery: DiscoveryConfig::default(),
            model_id: None,
            model_config: None,
            pool: PoolConfig::default(),
            router: RouterConfig::default(),
            wire_dtype: WireDType::F16,
            max_failovers_per_step: 4,
            key: None,
            verify_with: None,
            tolerance: Tolerance::default(),
            pass: None,
        }
    }
}

impl ClientConfig {
    /// Names the first field that is wrong for a client countersigning as `key`.
    fn validate(&self, key: &NodeKey) -> Result<(), NodeError> {
        let bad = |why: String| Err(NodeError::Config(why));
        if let Err(e) = self.router.weights.validate() {
            return bad(format!("router.{e}"));
        }
        if let Err(e) = self.router.spot_checks.validate() {
            return bad(format!("router.spot_checks.{e}"));
        }
        if self.model_config.is_some() && self.model_id.is_none() {
            return bad("model_config: give the model_id whose config it is".into());
        }
        match &self.pass {
            Some(pass) if pass.holder() != key.public() => bad(format!(
                "pass: it vouches for key {}, this client countersigns as {}",
                pass.holder().id(),
                key.id()
            )),
            _ => Ok(()),
        }
    }
}

/// A connection to a swarm: tracker and DHT, pooled peer channels, and the router's
/// measurements.
#[derive(Debug)]
pub struct SwarmClient {
    config: ClientConfig,
    tracker: Option<TrackerClient<Channel>>,
    /// The tracker's last list.
    listed: Mutex<Vec<PeerRecord>>,
    discovery: Discovery,
    cancel: CancellationToken,
    pool: Arc<ConnectionPool>,
    router: Mutex<Router>,
    metrics: Arc<Metrics>,
    model_id: String,
    total_layers: u32,
    /// The model's config: what the FLOPs a receipt claims are checked against. Set by
    /// [`Self::connect`].
    model_config: Option<Arc<LlamaConfig>>,
    rng: Mutex<StdRng>,
    next_session: std::sync::atomic::AtomicU64,
    key: Arc<NodeKey>,
    verifier: Option<Arc<LocalVerifier>>,
    outbox: ReceiptOutbox,
}

/// A client of the tracker at `url` (connected on first use), with the timeouts and reply cap
/// every caller shares. The tracker must prove the key the URL names, or else the key it first
/// answered with.
pub fn tracker_client(url: &str) -> Result<TrackerClient<Channel>, NodeError> {
    let url: neuroshard_base::TrackerUrl = url.parse()?;
    let dialler = neuroshard_net::tls::Dialler::ephemeral()?;
    let to = Target {
        addr: url.authority,
        node: url.id,
    };
    let channel = neuroshard_net::pool::connect_lazy(&to, &dialler, Duration::from_secs(10))?;
    Ok(TrackerClient::new(channel).max_decoding_message_size(MAX_TRACKER_REPLY_BYTES))
}

/// The live peers the tracker lists, of `model_id` or of every model; records that do not
/// check out (bad key, bad layers) are left out.
pub async fn list_peers(
    mut tracker: TrackerClient<Channel>,
    url: &str,
    model_id: Option<&str>,
) -> Result<Vec<PeerRecord>, NodeError> {
    let request = pb::ListPeersRequest {
        model_id: model_id.unwrap_or_default().to_string(),
    };
    let reply = tracker
        .list_peers(request)
        .await
        .map_err(|status| NodeError::Remote {
            peer: format!("tracker {url}"),
            status,
        })?;
    Ok(reply
        .into_inner()
        .peers
        .into_iter()
        .filter_map(|p| peer_from_proto(p).ok())
        .collect())
}

/// The local copy of the model that spot checks re-execute hops with, if the client holds one.
async fn load_verifier(
    dir: Option<std::path::PathBuf>,
) -> Result<Option<Arc<LocalVerifier>>, NodeError> {
    let Some(dir) = dir else {
        return Ok(None);
    };
    let verifier = tokio::task::spawn_blocking(move || LocalVerifier::load(&dir))
        .await
        .map_err(|e| NodeError::Config(format!("loading the verifier: {e}")))??;
    Ok(Some(Arc::new(verifier)))
}

impl SwarmClient {
    /// Learns the swarm's peers and model from the tracker, or else through the DHT.
    pub async fn connect(config: ClientConfig) -> Result<Self, NodeError> {
        let tracker = config.tracker.as_deref().map(tracker_client).transpose()?;
        neuroshard_discovery::check_bootstrap(&config.bootstrap)?;
        let metrics = Arc::new(Metrics::default());
        let key = config
            .key
            .clone()
            .unwrap_or_else(|| Arc::new(NodeKey::generate()));
        config.validate(&key)?;
        // Calls prove the key receipts are countersigned with: the nodes bind sessions to it.
        let dialler = neuroshard_net::tls::Dialler::new(&key)?;
        let pool = Arc::new(ConnectionPool::new(config.pool, metrics.clone(), dialler));
        pool.spawn_reaper();
        let verifier = load_verifier(config.verify_with.clone()).await?;
        let outbox = ReceiptOutbox::spawn(pool.clone(), config.pass.as_ref());
        let cancel = CancellationToken::new();
        let discovery = Discovery::start(
            Contact {
                key: Key::of_node(&key.id()),
                addr: std::net::SocketAddr::from(([0, 0, 0, 0], 0)),
            },
            None,
            config.discovery.clone(),
            config.bootstrap.clone(),
            pool.clone(),
            cancel.clone(),
        )?;
        let mut client = Self {
            listed: Mutex::new(Vec::new()),
            discovery,
            cancel,
            outbox,
            router: Mutex::new(Router::new(config.router)),
            tracker,
            pool,
            metrics,
            model_id: String::new(),
            total_layers: 0,
            model_config: None,
            rng: Mutex::new(StdRng::from_os_rng()),
            next_session: std::sync::atomic::AtomicU64::new(0),
            key,
            verifier,
            config,
        };
        client.learn_model().await?;
        Ok(client)
    }

    /// The model's config, learned when connecting.
    fn model_config(&self) -> &LlamaConfig {
        self.model_config
            .as_deref()
            .expect("connect learns the model's config before a client is handed out")
    }

    /// Finds the swarm's peers and settles which model this client runs.
    async fn learn_model(&mut self) -> Result<(), NodeError> {
        let peers = self.fetch_peers().await?;
        let (model_id, total_layers) = pick_model(&peers, self.config.model_id.as_deref())?;
        if let Some(verifier) = &self.verifier
            && verifier.model_id() != model_id
        {
            return Err(NodeError::Config(format!(
                "verify_with holds model {}, the swarm serves model {model_id}",
                verifier.model_id()
            )));
        }
        let config = match (&self.verifier, &self.config.model_config) {
            (Some(verifier), _) => verifier.config().clone(),
            (None, Some(config)) => config.clone(),
            (None, None) => peer_config(&self.pool, &peers, &model_id).await?,
        };
        if config.num_hidden_layers != total_layers as usize {
            return Err(NodeError::BadRequest(format!(
                "model {model_id}'s config.json has {} layers, its peers announce {total_layers}",
                config.num_hidden_layers
            )));
        }
        self.model_config = Some(Arc::new(config));
        self.model_id = model_id;
        self.total_layers = total_layers;
        self.install_peers(peers);
        Ok(())
    }

    /// The tracker's list while it answers with peers; else the DHT's providers of the model,
    /// joining the DHT first when the table is empty (through the tracker's last list, the
    /// bootstrap peers and the LAN).
    async fn fetch_peers(&self) -> Result<Vec<PeerRecord>, NodeError> {
        if let (Some(tracker), Some(url)) = (&self.tracker, &self.config.tracker) {
            match list_peers(tracker.clone(), url, self.config.model_id.as_deref()).await {
                Ok(peers) if !peers.is_empty() => {
                    // Kept to join the DHT through, should the tracker go.
                    *self.listed.lock_or_recover() = peers.clone();
                    return Ok(peers);
                }
                Ok(_) => tracing::info!("the tracker lists no peers; asking the DHT"),
                Err(e) => tracing::warn!("{e}; asking the DHT"),
            }
        }
        let referred = if self.discovery.dht().stats().borrow().contacts == 0 {
            let listed = self.listed.lock_or_recover().clone();
            self.discovery.join(&listed).await
        } else {
            Vec::new()
        };
        let (model, total_layers) = if self.model_id.is_empty() {
            pick_model(&referred, self.config.model_id.as_deref())?
        } else {
            (self.model_id.clone(), self.total_layers)
        };
        // Referrals only name the model; the peers routed over are those whose signed records
        // the DHT holds.
        Ok(self.discovery.providers(&model, total_layers).await)
    }

    fn install_peers(&self, peers: Vec<PeerRecord>) {
        let peers = peers
            .into_iter()
            .filter(|p| p.model_id == self.model_id)
            .collect();
        let mut router = self.router.lock_or_recover();
        router.set_peers(peers);
        self.update_peer_gauges(&router);
    }

    fn update_peer_gauges(&self, router: &Router) {
        use std::sync::atomic::Ordering::Relaxed;
        let (known, healthy) = router.peer_counts(Instant::now());
        self.metrics.peer_count.store(known as u64, Relaxed);
        self.metrics.healthy_peers.store(healthy as u64, Relaxed);
    }

    /// Re-reads the peer list (tracker, else DHT), keeping measurements of known peers.
    pub async fn refresh(&self) -> Result<(), NodeError> {
        let peers = self.fetch_peers().await?;
        self.install_peers(peers);
        Ok(())
    }

    /// Whether the peers known now serve every layer of the model (no peer is banned out of
    /// the chain): what an API lists as servable.
    pub fn covers_every_layer(&self) -> bool {
        self.router
            .lock_or_recover()
            .covers(self.total_layers, Instant::now())
    }

    /// Id of the model the client generates with.
    pub fn model_id(&self) -> &str {
        &self.model_id
    }

    /// The key this client countersigns with.
    pub fn public_key(&self) -> PublicKey {
        self.key.public()
    }

    /// Verified results of a node, as this client has seen them.
    pub fn reputation(&self, node_id: &NodeId) -> Reputation {
        self.router.lock_or_recover().reputation().record(node_id)
    }

    /// Sends every queued countersigned receipt and reports the totals delivered so far.
    pub async fn flush_receipts(&self) -> OutboxReport {
        self.outbox.flush().await
    }

    /// Client-side counters.
    pub fn metrics(&self) -> MetricsSnapshot {
        self.metrics.snapshot(0, 0)
    }

    /// A new inference session; its chain is planned on the first step.
    pub fn session(&self) -> SwarmSession<'_> {
        let n = self
            .next_session
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        SwarmSession {
            client: self,
            id: format!("{:016x}-{n}", rand::random::<u64>()),
            chain: Chain::new(
                Vec::new(),
                self.total_layers,
                self.config.max_failovers_per_step,
            ),
            timings: BTreeMap::new(),
            sampler: None,
        }
    }

    fn plan(&self, span: LayerRange, tokens: usize) -> Option<Vec<Hop>> {
        let mut router = self.router.lock_or_recover();
        let mut rng = self.rng.lock_or_recover();
        let hops = router.plan(span, tokens, Instant::now(), &mut *rng)?;
        for hop in &hops {
            router.adjust_sessions(&hop.addr, 1);
        }
        Some(hops)
    }
}

impl Drop for SwarmClient {
    /// Stops the client's DHT actor and LAN browser.
    fn drop(&mut self) {
        self.cancel.cancel();
    }
}

/// The `config.json` of `model_id` as its peers serve it: asked of up to [`CONFIG_TRIES`]
/// nodes until two answer (or the only one does), and two that answer must agree, so no lone
/// peer sets the FLOPs every hop's receipt is checked against.
async fn peer_config(
    pool: &ConnectionPool,
    peers: &[PeerRecord],
    model_id: &str,
) -> Result<LlamaConfig, NodeError> {
    let mut last = NodeError::NoRoute(format!("no peer serves model {model_id}"));
    let mut first: Option<(&str, LlamaConfig)> = None;
    let mut asked = std::collections::HashSet::new();
    for peer in peers.iter().filter(|p| p.model_id == model_id) {
        if asked.len() == CONFIG_TRIES || !asked.insert(peer.node_id) {
            continue;
        }
        match one_peer_config(pool, peer, model_id).await {
            Ok(config) => match &first {
                None => first = Some((&peer.addr, config)),
                Some((_, agreed)) if *agreed == config => return Ok(config),
                Some((addr, _)) => {
                    return Err(NodeError::BadRequest(format!(
                        "{addr} and {} serve different config.json for model {model_id}",
                        peer.addr
                    )));
                }
            },
            Err(e) => {
                tracing::warn!("{} gave no config for model {model_id}: {e}", peer.addr);
                last = e;
            }
        }
    }
    first.map(|(_, config)| config).ok_or(last)
}

/// The `config.json` of `model_id` from `peer`.
async fn one_peer_config(
    pool: &ConnectionPool,
    peer: &PeerRecord,
    model_id: &str,
) -> Result<LlamaConfig, NodeError> {
    let target = Target::node(peer.addr.as_str(), peer.node_id);
    let mut pooled = pool.control_client(&target).await?;
    let bytes =
        checkpoint::fetch_model_file(&mut pooled.client, &peer.addr, model_id, "config.json")
            .await?
            .ok_or_else(|| NodeError::BadRequest(format!("{} has no config.json", peer.addr)))?;
    let text = String::from_utf8(bytes)
        .map_err(|_| NodeError::BadRequest(format!("{}'s config.json is not UTF-8", peer.addr)))?;
    Ok(LlamaConfig::from_json(&text)?)
}

/// Peers asked for the model's config before connecting fails.
const CONFIG_TRIES: usize = 3;

fn pick_model(peers: &[PeerRecord], wanted: Option<&str>) -> Result<(String, u32), NodeError> {
    let mut models: BTreeMap<&str, u32> = BTreeMap::new();
    for p in peers {
        models.insert(&p.model_id, p.total_layers);
    }
    match wanted {
        Some(id) => models
            .get(id)
            .map(|&layers| (id.to_string(), layers))
            .ok_or_else(|| NodeError::NoRoute(format!("no peer serves model {id}"))),
        None => match models.len() {
            0 => Err(NodeError::NoRoute(
                "no peers found: the tracker, the bootstrap peers and the LAN named none".into(),
            )),
            1 => {
                let (id, layers) = models.into_iter().next().expect("one model");
                Ok((id.to_string(), layers))
            }
            _ => Err(NodeError::NoRoute(format!(
                "the swarm serves several models ({}); pick one",
                models.keys().copied().collect::<Vec<_>>().join(", ")
            ))),
        },
    }
}
