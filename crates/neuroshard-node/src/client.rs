//! The client side of swarm inference: a session planned over a chain of peers, with failover.
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

use std::collections::BTreeMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use neuroshard_base::{LayerRange, NodeKey, PublicKey};
use neuroshard_dht::{Contact, Key};
use neuroshard_model::ShardInput;
use neuroshard_model::codec::{self, WireDType, WireTensor};
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
use tonic::transport::{Channel, Endpoint};

use crate::NodeError;

mod training;
use crate::convert::{
    PeerRecord, dtype_to_proto, peer_from_proto, span_to_proto, tensor_from_proto, tensor_hash,
    tensor_to_proto, tokens_hash,
};
use crate::discovery::{Discovery, DiscoveryConfig};
use crate::generate::Pipeline;
use crate::metrics::{Metrics, MetricsSnapshot};
use crate::outbox::{OutboxReport, ReceiptOutbox};
use crate::pool::{ConnectionPool, PoolConfig};
use crate::router::{Hop, Router, RouterConfig};
use crate::verify::LocalVerifier;
pub use training::{Microbatch, StepReport, TrainSession};

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
            pool: PoolConfig::default(),
            router: RouterConfig::default(),
            wire_dtype: WireDType::F16,
            max_failovers_per_step: 4,
            key: None,
            verify_with: None,
            tolerance: Tolerance::default(),
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
    rng: Mutex<StdRng>,
    next_session: std::sync::atomic::AtomicU64,
    key: Arc<NodeKey>,
    verifier: Option<Arc<LocalVerifier>>,
    outbox: ReceiptOutbox,
}

/// A client of the tracker at `url` (connected on first use), with the timeouts and reply cap
/// every caller shares.
pub fn tracker_client(url: &str) -> Result<TrackerClient<Channel>, NodeError> {
    let endpoint = Endpoint::from_shared(url.to_string())
        .map_err(|e| NodeError::Config(format!("tracker: {e}")))?
        .connect_timeout(Duration::from_secs(3))
        .timeout(Duration::from_secs(10));
    Ok(TrackerClient::new(endpoint.connect_lazy())
        .max_decoding_message_size(MAX_TRACKER_REPLY_BYTES))
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

impl SwarmClient {
    /// Learns the swarm's peers and model from the tracker, or else through the DHT.
    pub async fn connect(config: ClientConfig) -> Result<Self, NodeError> {
        let tracker = config.tracker.as_deref().map(tracker_client).transpose()?;
        crate::discovery::check_bootstrap(&config.bootstrap)?;
        let metrics = Arc::new(Metrics::default());
        config
            .router
            .weights
            .validate()
            .map_err(|e| NodeError::Config(format!("router.{e}")))?;
        config
            .router
            .spot_checks
            .validate()
            .map_err(|e| NodeError::Config(format!("router.spot_checks.{e}")))?;
        let pool = Arc::new(ConnectionPool::new(config.pool, metrics.clone()));
        pool.spawn_reaper();
        let verifier = match config.verify_with.clone() {
            Some(dir) => Some(Arc::new(
                tokio::task::spawn_blocking(move || LocalVerifier::load(&dir))
                    .await
                    .map_err(|e| NodeError::Config(format!("loading the verifier: {e}")))??,
            )),
            None => None,
        };
        let outbox = ReceiptOutbox::spawn(pool.clone());
        let cancel = CancellationToken::new();
        let key = config
            .key
            .clone()
            .unwrap_or_else(|| Arc::new(NodeKey::generate()));
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
            rng: Mutex::new(StdRng::from_os_rng()),
            next_session: std::sync::atomic::AtomicU64::new(0),
            key,
            verifier,
            config,
        };
        let peers = client.fetch_peers().await?;
        let (model_id, total_layers) = pick_model(&peers, client.config.model_id.as_deref())?;
        if let Some(verifier) = &client.verifier
            && verifier.model_id() != model_id
        {
            return Err(NodeError::Config(format!(
                "verify_with holds model {}, the swarm serves model {model_id}",
                verifier.model_id()
            )));
        }
        client.model_id = model_id;
        client.total_layers = total_layers;
        client.install_peers(peers);
        Ok(client)
    }

    /// The tracker's list while it answers with peers; else the DHT's providers of the model,
    /// joining the DHT first when the table is empty (through the tracker's last list, the
    /// bootstrap peers and the LAN).
    async fn fetch_peers(&self) -> Result<Vec<PeerRecord>, NodeError> {
        if let (Some(tracker), Some(url)) = (&self.tracker, &self.config.tracker) {
            match list_peers(tracker.clone(), url, self.config.model_id.as_deref()).await {
                Ok(peers) if !peers.is_empty() => {
                    // Kept to join the DHT through, should the tracker go.
                    *self.listed.lock().expect("listed lock") = peers.clone();
                    return Ok(peers);
                }
                Ok(_) => tracing::info!("the tracker lists no peers; asking the DHT"),
                Err(e) => tracing::warn!("{e}; asking the DHT"),
            }
        }
        let referred = if self.discovery.dht().stats().borrow().contacts == 0 {
            let listed = self.listed.lock().expect("listed lock").clone();
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
        let mut router = self.router.lock().expect("router lock");
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
            .lock()
            .expect("router lock")
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
    pub fn reputation(&self, node_id: &str) -> Reputation {
        self.router
            .lock()
            .expect("router lock")
            .reputation()
            .record(node_id)
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
            chain: Vec::new(),
            timings: BTreeMap::new(),
            events: Vec::new(),
            failovers_left: 0,
            broken: None,
        }
    }

    fn plan(&self, span: LayerRange, tokens: usize) -> Option<Vec<Hop>> {
        let mut router = self.router.lock().expect("router lock");
        let mut rng = self.rng.lock().expect("rng lock");
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

/// What a hop is sent.
#[derive(Debug, Clone)]
enum HopInput {
    Tokens(Vec<u32>),
    Hidden(WireTensor),
}

impl HopInput {
    fn tokens(&self) -> usize {
        match self {
            Self::Tokens(ids) => ids.len(),
            Self::Hidden(t) => t.shape.get(1).copied().unwrap_or(0),
        }
    }

    /// SHA-256 of the input as sent (what the worker hashes on receipt).
    fn hash(&self) -> [u8; 32] {
        match self {
            Self::Tokens(ids) => tokens_hash(ids),
            Self::Hidden(t) => tensor_hash(t),
        }
    }

    fn to_shard_input(&self) -> Result<ShardInput, NodeError> {
        Ok(match self {
            Self::Tokens(ids) => ShardInput::Tokens(ids.clone()),
            Self::Hidden(t) => ShardInput::Hidden(codec::decode(t)?),
        })
    }

    fn to_proto(&self) -> pb::forward_request::Input {
        match self {
            Self::Tokens(ids) => {
                pb::forward_request::Input::Tokens(pb::TokenIds { ids: ids.clone() })
            }
            Self::Hidden(t) => pb::forward_request::Input::Hidden(tensor_to_proto(t.clone())),
        }
    }
}

/// What a hop returns.
enum HopOutput {
    Hidden(WireTensor),
    Logits(Vec<f32>),
}

impl HopOutput {
    /// The row the worker fingerprinted: the last token's hidden state, or the logits.
    fn last_row(&self) -> Result<Vec<f32>, NodeError> {
        match self {
            Self::Hidden(t) => {
                let width = t.shape.last().copied().unwrap_or(0);
                let values = codec::decode(t)?;
                Ok(values[values.len().saturating_sub(width)..].to_vec())
            }
            Self::Logits(values) => Ok(values.clone()),
        }
    }
}

/// One hop of a session's chain and the inputs it has been sent.
#[derive(Debug)]
struct ChainHop {
    hop: Hop,
    log: Vec<(usize, HopInput)>,
    /// The peer missed a deadline with nobody to replace it: its next call gets the
    /// first-call deadline.
    patient: bool,
}

/// Latency figures of one hop over a session.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize)]
pub struct HopTiming {
    /// Node id of the peer.
    pub node_id: String,
    /// Its address.
    pub addr: String,
    /// Layers it ran.
    pub layers: String,
    /// Calls made (replays included).
    pub calls: u64,
    /// Wall time of those calls, ms.
    pub total_ms: f64,
    /// Compute the peer reported, ms.
    pub compute_ms: f64,
}

impl HopTiming {
    /// Mean wall time of a call, ms.
    pub fn mean_ms(&self) -> f64 {
        self.total_ms / self.calls.max(1) as f64
    }

    /// Mean network-and-codec overhead of a call (wall minus compute), ms.
    pub fn mean_overhead_ms(&self) -> f64 {
        (self.total_ms - self.compute_ms) / self.calls.max(1) as f64
    }
}

type StepFuture<'s> = Pin<Box<dyn Future<Output = Result<HopOutput, NodeError>> + Send + 's>>;

/// One generation over the swarm.
#[derive(Debug)]
pub struct SwarmSession<'c> {
    client: &'c SwarmClient,
    id: String,
    chain: Vec<ChainHop>,
    timings: BTreeMap<(LayerRange, String), HopTiming>,
    events: Vec<String>,
    failovers_left: usize,
    /// Set when a failover could not restore the chain; the session cannot continue.
    broken: Option<String>,
}

impl SwarmSession<'_> {
    /// The session id peers key their caches on.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The current chain.
    pub fn chain(&self) -> Vec<Hop> {
        self.chain.iter().map(|h| h.hop.clone()).collect()
    }

    /// Per-hop latency, ordered by layer.
    pub fn timings(&self) -> Vec<HopTiming> {
        self.timings.values().cloned().collect()
    }

    /// Failovers that happened, as readable lines.
    pub fn events(&self) -> &[String] {
        &self.events
    }

    /// Runs the new tokens at `start_pos` through the whole chain; logits of the last one.
    /// Long inputs go in chunks of [`PREFILL_CHUNK_TOKENS`].
    pub async fn forward(&mut self, start_pos: usize, ids: &[u32]) -> Result<Vec<f32>, NodeError> {
        if let Some(why) = &self.broken {
            return Err(NodeError::NoRoute(format!(
                "session {} is broken: {why}",
                self.id
            )));
        }
        if ids.is_empty() {
            return Err(NodeError::BadRequest("no tokens to run".into()));
        }
        if self.chain.is_empty() {
            let all = LayerRange::new(0, self.client.total_layers)
                .map_err(|e| NodeError::NoRoute(e.to_string()))?;
            let hops = self.plan_or_refresh(all, ids.len()).await?;
            self.chain = hops
                .into_iter()
                .map(|hop| ChainHop {
                    hop,
                    log: Vec::new(),
                    patient: false,
                })
                .collect();
        }
        let mut logits = Vec::new();
        for (n, chunk) in ids.chunks(PREFILL_CHUNK_TOKENS).enumerate() {
            let pos = start_pos + n * PREFILL_CHUNK_TOKENS;
            self.failovers_left = self.client.config.max_failovers_per_step;
            let input = HopInput::Tokens(chunk.to_vec());
            let out = self.run_from(0, self.client.total_layers, pos, input).await;
            match out {
                Ok(HopOutput::Logits(l)) => logits = l,
                Ok(HopOutput::Hidden(_)) => {
                    return Err(NodeError::BadRequest(
                        "the chain ended without logits".into(),
                    ));
                }
                Err(err) => {
                    if self.broken.is_none() && !is_peer_fault(&err) {
                        return Err(err);
                    }
                    self.broken.get_or_insert_with(|| err.to_string());
                    return Err(err);
                }
            }
        }
        Ok(logits)
    }

    async fn plan_or_refresh(
        &self,
        span: LayerRange,
        tokens: usize,
    ) -> Result<Vec<Hop>, NodeError> {
        if let Some(hops) = self.client.plan(span, tokens) {
            return Ok(hops);
        }
        self.client.refresh().await?;
        self.client
            .plan(span, tokens)
            .ok_or_else(|| NodeError::NoRoute(format!("no live peers cover layers {span}")))
    }

    /// Sends `input` through hops from index `i` until the hop ending at layer `stop`.
    fn run_from(
        &mut self,
        mut i: usize,
        stop: u32,
        pos: usize,
        mut input: HopInput,
    ) -> StepFuture<'_> {
        Box::pin(async move {
            loop {
                let result = match self.call(i, pos, &input).await {
                    Ok((output, receipt)) => self
                        .settle_hop(i, pos, &input, &output, receipt)
                        .await
                        .map(|()| output),
                    Err(err) => Err(err),
                };
                match result {
                    Ok(output) => {
                        self.chain[i].log.push((pos, input.clone()));
                        let end = self.chain[i].hop.layers.end;
                        match output {
                            out @ HopOutput::Logits(_) if end == self.client.total_layers => {
                                return Ok(out);
                            }
                            HopOutput::Hidden(t) if end == stop => return Ok(HopOutput::Hidden(t)),
                            HopOutput::Hidden(t) if end < stop => {
                                input = HopInput::Hidden(t);
                                i += 1;
                            }
                            _ => {
                                let addr = self.chain[i].hop.addr.clone();
                                let status = tonic::Status::internal(
                                    "reply does not fit the requested layers",
                                );
                                self.chain[i].log.pop();
                                self.fail_over(i, NodeError::Remote { peer: addr, status })
                                    .await?;
                            }
                        }
                    }
                    Err(err) if is_peer_fault(&err) || is_stale_listing(&err) => {
                        self.fail_over(i, err).await?
                    }
                    Err(err) => return Err(err),
                }
            }
        })
    }

    /// Replaces hop `i` after `err`: ban, re-plan its span, replay its log to the replacement.
    /// On failure the session is marked broken, since its chain no longer holds every cache.
    async fn fail_over(&mut self, i: usize, err: NodeError) -> Result<(), NodeError> {
        let result = self.try_fail_over(i, err).await;
        if let Err(e) = &result {
            self.broken.get_or_insert_with(|| e.to_string());
        }
        result
    }

    async fn try_fail_over(&mut self, i: usize, err: NodeError) -> Result<(), NodeError> {
        if self.failovers_left == 0 {
            return Err(err);
        }
        self.failovers_left -= 1;
        let addr = self.chain[i].hop.addr.clone();
        let span = self.chain[i].hop.layers;
        let stale = is_stale_listing(&err);
        {
            let mut router = self.client.router.lock().expect("router lock");
            if stale {
                // Not a failure: the peer serves other layers now. It is planned around until
                // the listing, read again below, says what it serves.
                router.forget(&addr);
            } else {
                router.record_failure(&addr, Instant::now());
            }
            self.client.update_peer_gauges(&router);
        }
        if stale {
            if let Err(e) = self.client.refresh().await {
                tracing::debug!("reading the peers again: {e}");
            }
        } else {
            self.client.pool.evict(&addr);
        }
        let hops = match self.plan_or_refresh(span, 1).await {
            Ok(hops) => hops,
            Err(NodeError::NoRoute(_)) if is_deadline_miss(&err) => {
                self.wait_longer(i, err);
                return Ok(());
            }
            Err(NodeError::NoRoute(_)) if is_unreachable(&err) => {
                // Down for a moment, as when its relay restarts: asked again after a pause
                // that doubles with each try.
                let tries = self.client.config.max_failovers_per_step - self.failovers_left;
                let pause = UNREACHABLE_PAUSE * 2u32.pow(tries.saturating_sub(1).min(4) as u32);
                self.wait_longer(i, err);
                tokio::time::sleep(pause).await;
                return Ok(());
            }
            Err(e) => return Err(e),
        };
        let broken = self.chain.remove(i);
        self.client
            .router
            .lock()
            .expect("router lock")
            .adjust_sessions(&addr, -1);
        self.events.push(format!(
            "hop {span} on {addr} failed ({err}); replaying {} calls to {}",
            broken.log.len(),
            hops.iter()
                .map(|h| format!("{} [{}]", h.addr, h.layers))
                .collect::<Vec<_>>()
                .join(", ")
        ));
        tracing::warn!("{}", self.events.last().expect("just pushed"));
        for (offset, hop) in hops.into_iter().enumerate() {
            self.chain.insert(
                i + offset,
                ChainHop {
                    hop,
                    log: Vec::new(),
                    patient: false,
                },
            );
        }
        for (pos, input) in broken.log {
            self.run_from(i, span.end, pos, input).await?;
        }
        Ok(())
    }

    /// Keeps hop `i`, whose peer missed its deadline or could not be reached while no other
    /// peer serves its span: a stalled peer (a GPU compiling kernels, a busy home PC) is slow,
    /// not gone, and one behind a restarting relay is back once it has registered again. Its ban is
    /// lifted and the call is sent again with the first-call deadline; the peer's cache takes
    /// the repeated positions as a replay. Each wait spends one of the session's failovers, so
    /// a peer that never answers still ends the generation.
    fn wait_longer(&mut self, i: usize, err: NodeError) {
        let addr = self.chain[i].hop.addr.clone();
        let span = self.chain[i].hop.layers;
        self.client
            .router
            .lock()
            .expect("router lock")
            .lift_ban(&addr);
        self.chain[i].patient = true;
        self.events.push(format!(
            "hop {span} on {addr} failed ({err}); no other peer serves {span}, so it is asked \
             again with the first-call deadline"
        ));
        tracing::warn!("{}", self.events.last().expect("just pushed"));
    }

    /// Spot-checks hop `i`'s reply if the sample says so, then countersigns its receipt. A
    /// failed check voids the receipt, bans the worker and returns the error to fail over.
    async fn settle_hop(
        &mut self,
        i: usize,
        pos: usize,
        input: &HopInput,
        output: &HopOutput,
        receipt: Receipt,
    ) -> Result<(), NodeError> {
        let client = self.client;
        let hop = self.chain[i].hop.clone();
        let spot_checked = match self.spot_check(i, pos, input, output, &receipt).await {
            Ok(checked) => checked,
            Err(reason) => {
                let reliability = {
                    let mut router = client.router.lock().expect("router lock");
                    let ban = router.reputation_mut().record_failure(&hop.node_id);
                    router.ban(&hop.addr, Instant::now() + ban);
                    client.update_peer_gauges(&router);
                    router.reputation().reliability(&hop.node_id)
                };
                let voided = receipt.countersign(
                    &client.key,
                    Verdict::Voided,
                    reliability as f32,
                    crate::now_ms(),
                );
                client.outbox.push(&hop.addr, voided).await;
                return Err(NodeError::Verification {
                    peer: format!(
                        "{} ({})",
                        hop.addr,
                        &hop.node_id[..hop.node_id.len().min(8)]
                    ),
                    reason,
                });
            }
        };
        let reliability = {
            let mut router = client.router.lock().expect("router lock");
            if spot_checked {
                router.reputation_mut().record_pass(&hop.node_id);
            }
            router.reputation().reliability(&hop.node_id)
        };
        let accepted = receipt.countersign(
            &client.key,
            Verdict::Accepted { spot_checked },
            reliability as f32,
            crate::now_ms(),
        );
        client.outbox.push(&hop.addr, accepted).await;
        Ok(())
    }

    /// Re-executes hop `i` if this client holds the model and the worker's sample is drawn.
    /// Ok(true) when checked and matching, Ok(false) when not checked, Err with the mismatch.
    async fn spot_check(
        &self,
        i: usize,
        pos: usize,
        input: &HopInput,
        output: &HopOutput,
        receipt: &Receipt,
    ) -> Result<bool, String> {
        let client = self.client;
        let hop = &self.chain[i].hop;
        let Some(verifier) = client.verifier.clone() else {
            return Ok(false);
        };
        let uniform: f64 = rand::random();
        let sampled = {
            let router = client.router.lock().expect("router lock");
            router.reputation().should_check(&hop.node_id, uniform)
        };
        if !sampled {
            return Ok(false);
        }
        let done = verifier.verified_up_to(&self.id, hop.layers);
        let inputs = (|| {
            let history = self.chain[i]
                .log
                .iter()
                .filter(|(p, _)| *p < pos && *p >= done)
                .map(|(p, input)| Ok((*p, input.to_shard_input()?)))
                .collect::<Result<Vec<_>, NodeError>>()?;
            Ok::<_, NodeError>((history, input.to_shard_input()?, output.last_row()?))
        })();
        let (history, current, received) = match inputs {
            Ok(inputs) => inputs,
            Err(e) => return Err(format!("its output does not decode: {e}")),
        };
        let (layers, session) = (hop.layers, self.id.clone());
        let truth = tokio::task::spawn_blocking(move || {
            verifier.recompute(&session, layers, history, pos, current)
        })
        .await;
        let truth = match truth {
            Ok(Ok(row)) => row,
            Ok(Err(e)) => {
                tracing::warn!("spot check of {} skipped: {e}", hop.addr);
                return Ok(false);
            }
            Err(e) => {
                tracing::warn!("spot check of {} skipped: {e}", hop.addr);
                return Ok(false);
            }
        };
        let tolerance = client.config.tolerance;
        receipt
            .body()
            .fingerprint
            .check(&truth, &tolerance)
            .map_err(|e| format!("its receipt's fingerprint: {e}"))?;
        Fingerprint::of(&received)
            .check(&truth, &tolerance)
            .map_err(|e| format!("its output: {e}"))?;
        Ok(true)
    }

    /// One Forward call to hop `i`, under that peer's adaptive deadline, with its receipt
    /// checked against the call.
    async fn call(
        &mut self,
        i: usize,
        pos: usize,
        input: &HopInput,
    ) -> Result<(HopOutput, Receipt), NodeError> {
        let client = self.client;
        let hop = self.chain[i].hop.clone();
        let tokens = input.tokens();
        let deadline = match std::mem::take(&mut self.chain[i].patient) {
            true => client.config.router.first_call_deadline,
            false => client
                .router
                .lock()
                .expect("router lock")
                .deadline(&hop.addr, tokens),
        };
        let request = pb::ForwardRequest {
            session_id: self.id.clone(),
            start_pos: pos as u64,
            layers: Some(span_to_proto(hop.layers)),
            input: Some(input.to_proto()),
            model_id: client.model_id.clone(),
            reply_dtype: dtype_to_proto(client.config.wire_dtype) as i32,
            nonce: rand::random::<[u8; 16]>().to_vec(),
            requester_key: client.key.public().0.to_vec(),
            ..Default::default()
        };
        let mut expected = Expectation {
            worker_id: hop.node_id.clone(),
            kind: WorkKind::Forward,
            requester: client.key.public(),
            nonce: request.nonce.as_slice().try_into().expect("16-byte nonce"),
            model_id: client.model_id.clone(),
            layers: hop.layers,
            session_id: self.id.clone(),
            start_pos: pos as u64,
            tokens: tokens as u32,
            input_hash: input.hash(),
            output_hash: [0; 32],
            weights_hash: None,
            flops: None,
            sent_ms: crate::now_ms(),
            now_ms: 0,
        };
        if let Some(verifier) = &client.verifier {
            expected.weights_hash = Some(verifier.weights_hash(hop.layers)?);
            expected.flops = Some(verifier.flops(hop.layers, pos, tokens));
        }
        let sent = request.encoded_len();
        let started = Instant::now();
        let remote = |status: tonic::Status| NodeError::Remote {
            peer: hop.addr.clone(),
            status,
        };
        let reply = async {
            let mut pooled = client.pool.client(&hop.addr).await?;
            pooled.client.forward(request).await.map_err(remote)
        };
        let result = match tokio::time::timeout(deadline, reply).await {
            Ok(result) => result,
            Err(_) => Err(remote(tonic::Status::deadline_exceeded(format!(
                "no reply within the {deadline:?} deadline"
            )))),
        };
        let wall = started.elapsed();
        client.metrics.record_rpc(wall, result.is_ok());
        let reply = result?.into_inner();
        client.metrics.record_bytes(sent, reply.encoded_len());
        let compute = Duration::from_micros(reply.compute_us);
        client
            .router
            .lock()
            .expect("router lock")
            .record_success(&hop.addr, wall, compute, tokens);
        let timing = self
            .timings
            .entry((hop.layers, hop.node_id.clone()))
            .or_insert_with(|| HopTiming {
                node_id: hop.node_id.clone(),
                addr: hop.addr.clone(),
                layers: hop.layers.to_string(),
                ..HopTiming::default()
            });
        timing.calls += 1;
        timing.total_ms += wall.as_secs_f64() * 1000.0;
        timing.compute_ms += compute.as_secs_f64() * 1000.0;
        let bad_reply = |e: NodeError| remote(tonic::Status::internal(format!("bad reply: {e}")));
        let output = match reply.output {
            Some(pb::forward_response::Output::Hidden(t)) => {
                let tensor = tensor_from_proto(t).map_err(bad_reply)?;
                expected.output_hash = tensor_hash(&tensor);
                HopOutput::Hidden(tensor)
            }
            Some(pb::forward_response::Output::Logits(t)) => {
                let tensor = tensor_from_proto(t).map_err(bad_reply)?;
                expected.output_hash = tensor_hash(&tensor);
                HopOutput::Logits(codec::decode(&tensor).map_err(|e| bad_reply(e.into()))?)
            }
            Some(pb::forward_response::Output::Loss(_)) | None => {
                return Err(bad_reply(NodeError::BadRequest(
                    "the reply holds neither hidden states nor logits".into(),
                )));
            }
        };
        expected.now_ms = crate::now_ms();
        let receipt = Receipt::from_wire(&reply.receipt)?;
        expected.check(&receipt)?;
        Ok((output, receipt))
    }

    /// Frees the session's caches on every hop (best effort) and its router placements.
    pub async fn close(mut self) {
        let chain = self.release();
        for hop in chain {
            end_remote_session(&self.client.pool, &hop.addr, &self.id).await;
        }
    }

    /// Takes the chain and removes its placements from the router and its verifier caches.
    fn release(&mut self) -> Vec<Hop> {
        if let Some(verifier) = &self.client.verifier {
            verifier.forget(&self.id);
        }
        let chain: Vec<Hop> = std::mem::take(&mut self.chain)
            .into_iter()
            .map(|h| h.hop)
            .collect();
        let mut router = self.client.router.lock().expect("router lock");
        for hop in &chain {
            router.adjust_sessions(&hop.addr, -1);
        }
        chain
    }
}

/// A session dropped without [`SwarmSession::close`] (an error, an early return) still frees
/// its router placements, and its remote caches in the background.
impl Drop for SwarmSession<'_> {
    fn drop(&mut self) {
        let chain = self.release();
        if chain.is_empty() {
            return;
        }
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            let pool = self.client.pool.clone();
            let id = self.id.clone();
            runtime.spawn(async move {
                for hop in chain {
                    end_remote_session(&pool, &hop.addr, &id).await;
                }
            });
        }
    }
}

/// Asks `addr` to drop session `id`'s cache, giving up after a second.
async fn end_remote_session(pool: &ConnectionPool, addr: &str, id: &str) {
    if let Ok(mut pooled) = pool.control_client(addr).await {
        let request = pb::EndSessionRequest {
            session_id: id.to_string(),
        };
        let _ =
            tokio::time::timeout(Duration::from_secs(1), pooled.client.end_session(request)).await;
    }
}

/// Whether `err` is a call that outlived its deadline (the peer may still be working on it).
/// Whether `err` says the peer could not be reached: it, or the relay in front of it, is down.
fn is_unreachable(err: &NodeError) -> bool {
    matches!(err, NodeError::Connect { .. }) || remote_code(err) == Some(tonic::Code::Unavailable)
}

/// The first pause before asking an unreachable peer that nobody can replace again; it doubles
/// with each try, so the session's failovers (4 by default) cover about 4 s.
const UNREACHABLE_PAUSE: std::time::Duration = std::time::Duration::from_millis(250);

fn is_deadline_miss(err: &NodeError) -> bool {
    remote_code(err) == Some(tonic::Code::DeadlineExceeded)
}

/// Whether `err` says the peer does not serve the layers asked for: the listing that named it
/// is out of date (it changed its layers since).
fn is_stale_listing(err: &NodeError) -> bool {
    remote_code(err) == Some(tonic::Code::FailedPrecondition)
}

/// The status code a remote peer answered with, if `err` is its answer.
fn remote_code(err: &NodeError) -> Option<tonic::Code> {
    match err {
        NodeError::Remote { status, .. } => Some(status.code()),
        _ => None,
    }
}

/// Whether an error is the peer's (so another peer may do better) rather than the request's.
fn is_peer_fault(err: &NodeError) -> bool {
    use tonic::Code;
    match err {
        NodeError::Connect { .. }
        | NodeError::Receipt(_)
        | NodeError::Verification { .. }
        | NodeError::Identity(_) => true,
        NodeError::Remote { status, .. } => !matches!(
            status.code(),
            Code::InvalidArgument
                | Code::OutOfRange
                | Code::FailedPrecondition
                | Code::PermissionDenied
        ),
        _ => false,
    }
}

impl Pipeline for SwarmSession<'_> {
    async fn step(&mut self, start_pos: usize, ids: &[u32]) -> Result<Vec<f32>, NodeError> {
        self.forward(start_pos, ids).await
    }
}
