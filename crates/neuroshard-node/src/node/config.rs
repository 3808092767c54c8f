//! What a node is started with: [`NodeConfig`], checked by [`NodeConfig::validate`], and the
//! faults a test node can be told to show.

use super::*;

/// Misbehaviours a test node can be told to show, to prove that requesters catch them. Only a
/// build with the `test-faults` feature can set one ([`NodeConfig::fault`]); the CLI, the app
/// and settings cannot.
#[doc(hidden)]
#[derive(Debug, Clone, PartialEq)]
#[cfg_attr(not(feature = "test-faults"), allow(dead_code))]
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
    /// Answers every ExchangeGradient as though this many rounds ahead, attesting its own
    /// weights for the round it claims: a replica of the run forging progress.
    ClaimsRoundsAhead(u64),
    /// Computes honestly but signs receipts claiming this many times the FLOPs done.
    InflatesFlops(u64),
    /// Computes honestly but signs receipts claiming these weights.
    ClaimsWeights([u8; 32]),
    /// Computes honestly (its receipt fingerprints the true logits) but, asked to choose the
    /// next token, replies with the token after the one the logits give.
    WrongToken,
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
    /// makes a fresh key (or takes [`NodeConfig::key`]) and keeps the ledger in memory: for
    /// tests and throwaway nodes.
    pub data_dir: Option<PathBuf>,
    /// The node's key, for a node without a data directory whose key must be known before it
    /// starts (a training run's manifest names its replicas' keys). Default none.
    pub key: Option<Arc<NodeKey>>,
    /// Issuers whose countersignatures, and those of the holders of their credit passes, count
    /// as earned credit in the ledger's totals, besides the tracker when `tracker` names its
    /// key (`http://ID@host:port`). Default none.
    pub credit_issuers: Vec<NodeId>,
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
    /// What the node's server holds at once for its callers, in all and per address:
    /// connections (default 1,024 and 64) and request bytes (512 and 128 MiB).
    pub server: neuroshard_net::ServerLimits,
    /// Days the ledger keeps each receipt's row; older ones are rolled up into daily
    /// totals, which every total keeps counting. 0 keeps every row; otherwise at least
    /// [`neuroshard_proof::ledger::MIN_RETENTION_DAYS`]. Default 90: a quarter's receipts to
    /// page through and export, and a ledger that anyone's calls cannot grow without bound.
    pub ledger_retention_days: u32,
    /// How concurrent sessions' decode steps run together: at most 16 in one pass by default.
    pub batching: super::Batching,
    /// How the served shard holds its projection weights (f32 by default; bf16 and f16 halve
    /// them, int8 takes a little over a quarter). Announced to peers and committed to in every
    /// receipt's weights hash.
    pub precision: Precision,
    /// Test-only misbehaviour (the `test-faults` feature).
    #[cfg(feature = "test-faults")]
    #[doc(hidden)]
    pub fault: Option<Fault>,
}

impl NodeConfig {
    /// The issuers whose vouching counts: the configured ones and the tracker named by key.
    pub(super) fn trusted_issuers(&self) -> Vec<NodeId> {
        let tracker = self
            .tracker
            .as_deref()
            .and_then(|url| url.parse::<neuroshard_base::TrackerUrl>().ok())
            .and_then(|url| url.id);
        self.credit_issuers.iter().copied().chain(tracker).collect()
    }

    /// The misbehaviour this node is told to show: none in a build without `test-faults`.
    pub(super) fn fault(&self) -> Option<Fault> {
        #[cfg(feature = "test-faults")]
        return self.fault.clone();
        #[cfg(not(feature = "test-faults"))]
        None
    }

    /// Takes what the owner's settings say a node starts with, for the desktop app and for
    /// `neuroshard node --settings FILE`: the network and the display name where nothing set
    /// them yet, the caps, the compute share, threads and weight precision, and a paused start (the owner's
    /// rules resume it at once when they allow).
    pub fn follow_settings(&mut self, settings: &neuroshard_settings::Settings) {
        if self.tracker.is_none() {
            self.tracker = settings.network.tracker.clone();
        }
        if self.bootstrap.is_empty() {
            self.bootstrap = settings.network.bootstrap.clone();
        }
        if self.display_name.is_none() && !settings.profile.anonymous {
            self.display_name = settings.profile.display_name.clone();
        }
        self.upload_kbps = settings.bandwidth.upload_kbps;
        self.download_kbps = settings.bandwidth.download_kbps;
        self.compute_share_percent = settings.compute.gpu_share_percent;
        self.cpu_threads = settings.compute.cpu_threads;
        self.precision = settings.compute.precision;
        self.start_paused = true;
    }
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
            key: None,
            credit_issuers: Vec::new(),
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
            server: neuroshard_net::ServerLimits::default(),
            ledger_retention_days: 90,
            batching: super::Batching::default(),
            precision: Precision::F32,
            #[cfg(feature = "test-faults")]
            fault: None,
        }
    }

    /// Names the first invalid field.
    pub fn validate(&self) -> Result<(), NodeError> {
        let bad = |field: &str, why: &str| Err(NodeError::Config(format!("{field}: {why}")));
        if self.layers.is_empty() {
            return bad("layers", "must not be empty");
        }
        if let Err(why) = self.server.validate() {
            return bad("server", &why);
        }
        let min = neuroshard_proof::ledger::MIN_RETENTION_DAYS;
        if (1..min).contains(&self.ledger_retention_days) {
            return bad(
                "ledger_retention_days",
                &format!(
                    "must be 0 (keep every row) or at least {min}: the week's totals read rows"
                ),
            );
        }
        if let Err((field, why)) = self.batching.validate() {
            return bad(field, why);
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
        if let Some(url) = &self.tracker {
            url.parse::<neuroshard_base::TrackerUrl>()?;
        }
        neuroshard_discovery::check_bootstrap(&self.bootstrap)?;
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
        if self.precision != Precision::F32 && self.train.is_some() {
            return bad(
                "precision",
                "a training node keeps f32 weights: its optimizer steps are smaller than bf16 or \
                 int8 can hold",
            );
        }
        if let Some(name) = &self.display_name {
            check_display_name(name)?;
        }
        Ok(self.discovery.validate()?)
    }
}
