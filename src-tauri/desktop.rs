//! The app's core, free of any window: the embedded node, the settings store, the owner's
//! holds (pause, snooze), the transfer meter and the status snapshot. Tauri commands and the
//! tray are thin over this, and the tests drive it directly.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::{Datelike, Local, TimeZone, Timelike};
use neuroshard_base::LayerRange;
use neuroshard_model::ModelInfo;
use neuroshard_model::fetched::{self, FetchedModel};
use neuroshard_node::NodeError;
use neuroshard_node::checkpoint;
use neuroshard_node::convert::PeerRecord;
use neuroshard_node::discovery::LanConfig;
use neuroshard_node::lifecycle::{NodeStatus, RunState};
use neuroshard_node::node::{LEDGER_FILE, NodeConfig, NodeHandle, NodeLimits, start_node};
use neuroshard_node::settings::{
    ComputeDevice, LayerChoice, ModelChoice, Preset, ScheduleWindow, Settings, SettingsError,
    SettingsStore, Weekday,
};
use neuroshard_proof::ledger::{Ledger, LedgerError, ReceiptRow, SeriesPoint, Status, Totals};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use tokio::sync::{RwLock, watch};

use crate::layers::{self, LayerPlan};
use crate::status::{AppState, BandwidthStatus, DesktopStatus, FetchStatus, Rates};

const MS_PER_HOUR: u64 = 3600 * 1000;
const MS_PER_DAY: u64 = 24 * MS_PER_HOUR;
const MIB: u64 = 1024 * 1024;

/// How long a restart waits for calls in flight before stopping the node anyway.
const RESTART_DRAIN: Duration = Duration::from_secs(10);

/// Receipts a page of the receipts table may hold.
pub const MAX_PAGE: u32 = 200;

/// A failed command, as the front end receives it: a stable code, a sentence, and for a bad
/// setting the dotted path of the field, so the form can show the message beside it.
#[derive(Debug, Clone, PartialEq, Serialize, thiserror::Error)]
#[error("{message}")]
pub struct CommandError {
    /// `invalid_setting`, `settings_unreadable`, `io`, `node`, `bad_request`.
    pub code: &'static str,
    /// What is wrong, for people.
    pub message: String,
    /// The setting at fault, such as `bandwidth.upload_kbps`.
    pub field: Option<String>,
}

impl CommandError {
    fn new(code: &'static str, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
            field: None,
        }
    }

    /// A request the app cannot act on (an unknown snooze, a page too large).
    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new("bad_request", message)
    }
}

impl From<SettingsError> for CommandError {
    fn from(e: SettingsError) -> Self {
        match &e {
            SettingsError::Invalid { field, message } => Self {
                code: "invalid_setting",
                message: message.clone(),
                field: Some(field.clone()),
            },
            SettingsError::Unreadable { .. } => Self::new("settings_unreadable", e.to_string()),
            SettingsError::Io { .. } => Self::new("io", e.to_string()),
        }
    }
}

impl From<NodeError> for CommandError {
    fn from(e: NodeError) -> Self {
        Self::new("node", e.to_string())
    }
}

impl From<LedgerError> for CommandError {
    fn from(e: LedgerError) -> Self {
        Self::new("ledger", e.to_string())
    }
}

/// Where the app keeps things and how its node listens; from the environment, so tests and
/// packagers can move every path.
#[derive(Debug, Clone)]
pub struct Launch {
    /// Identity key, ledger, transfer meter: the CLI's data dir (`$NEUROSHARD_HOME`, else
    /// `~/.local/share/neuroshard`), so `neuroshard proofs` reads the app's ledger.
    pub data_dir: PathBuf,
    /// The settings file (`$NEUROSHARD_CONFIG`/settings.json, else the OS config dir).
    pub settings_path: PathBuf,
    /// The model (`$NEUROSHARD_MODEL_DIR`); none for the demo model, written on first start.
    pub model_dir: Option<PathBuf>,
    /// Where the node listens (`$NEUROSHARD_LISTEN`, default `0.0.0.0:7420`).
    pub listen: SocketAddr,
    /// `host:port` announced to peers (`$NEUROSHARD_ADVERTISE`); none to derive it.
    pub advertise: Option<String>,
    /// LAN discovery over mDNS: on by default; `$NEUROSHARD_LAN` set to `off` turns it off and
    /// `loopback` keeps it on this machine (tests).
    pub lan: Option<LanConfig>,
}

/// The port a desktop node listens on unless told otherwise.
pub const DEFAULT_PORT: u16 = 7420;

impl Launch {
    /// From the environment, with the OS directories as defaults.
    pub fn from_env() -> Result<Self, String> {
        let var = |name: &str| std::env::var_os(name).filter(|v| !v.is_empty());
        let data_dir = neuroshard_node::identity::default_data_dir();
        let listen = match var("NEUROSHARD_LISTEN") {
            Some(v) => v.to_string_lossy().parse().map_err(|e| {
                format!("NEUROSHARD_LISTEN {v:?} is not an address such as 127.0.0.1:7420: {e}")
            })?,
            None => SocketAddr::from(([0, 0, 0, 0], DEFAULT_PORT)),
        };
        Ok(Self {
            data_dir,
            settings_path: SettingsStore::default_path(),
            model_dir: var("NEUROSHARD_MODEL_DIR").map(PathBuf::from),
            listen,
            advertise: var("NEUROSHARD_ADVERTISE").map(|v| v.to_string_lossy().into_owned()),
            lan: match var("NEUROSHARD_LAN").as_deref().and_then(|v| v.to_str()) {
                Some("off") => None,
                Some("loopback") => Some(LanConfig {
                    loopback: true,
                    ..LanConfig::default()
                }),
                None | Some("on") => Some(LanConfig::default()),
                Some(other) => {
                    return Err(format!(
                        "NEUROSHARD_LAN {other:?} is not one of on, off or loopback"
                    ));
                }
            },
        })
    }
}

/// What the machine says about its user and power, for "only when idle" and "not on battery".
pub trait Machine: Send + Sync + std::fmt::Debug {
    /// Time since the user's last input; none where it cannot be read (no X server).
    fn idle(&self) -> Option<Duration>;
    /// Whether the machine runs on a discharging battery; none where it cannot be read.
    fn on_battery(&self) -> Option<bool>;
}

/// The real machine: the X server's screen-saver idle time (user-idle) and the batteries the
/// OS reports (starship-battery).
#[derive(Debug, Default)]
pub struct SystemMachine;

impl Machine for SystemMachine {
    fn idle(&self) -> Option<Duration> {
        user_idle::UserIdle::get_time().ok().map(|t| t.duration())
    }

    fn on_battery(&self) -> Option<bool> {
        let manager = starship_battery::Manager::new().ok()?;
        let mut batteries = manager.batteries().ok()?;
        Some(batteries.any(|b| b.is_ok_and(|b| b.state() == starship_battery::State::Discharging)))
    }
}

/// Why the owner holds the node back.
#[derive(Debug, Default)]
struct Holds {
    /// Paused from the tray or the dashboard.
    paused: bool,
    /// Snoozed until then, ms since the Unix epoch.
    snoozed_until_ms: Option<u64>,
}

/// Bytes moved in the current transfer-cap period, kept across restarts.
#[derive(Debug, Default, Clone, Copy, PartialEq, Serialize, Deserialize)]
struct Usage {
    period_start_ms: u64,
    bytes: u64,
    /// The node's byte counters at the last sample (not persisted: a new node starts at 0).
    #[serde(skip)]
    last_counter: u64,
    #[serde(skip)]
    last_saved_ms: u64,
}

const USAGE_FILE: &str = "transfer.json";
const CLOSE_NOTICE_FILE: &str = "close-notice-shown";

/// Totals of verified work over the periods the receipts view shows, all models together.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct PeriodTotals {
    /// Since local midnight.
    pub today: Totals,
    /// The last 7 days.
    pub week: Totals,
    /// Ever.
    pub lifetime: Totals,
}

/// One page of the receipts table.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ReceiptPage {
    /// Newest first.
    pub rows: Vec<ReceiptRow>,
    /// Receipts matching the filter, on every page.
    pub total: u64,
    /// This page, from 0.
    pub page: u32,
    /// Rows per page.
    pub per_page: u32,
}

/// Snooze lengths the tray offers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Snooze {
    /// One hour.
    OneHour,
    /// Three hours.
    ThreeHours,
    /// Until 08:00 tomorrow, local time.
    Tomorrow,
}

/// The app's core; shared as `Arc<Desktop>`.
#[derive(Debug)]
pub struct Desktop {
    pub(crate) launch: Launch,
    machine: Arc<dyn Machine>,
    /// The model served by default: `$NEUROSHARD_MODEL_DIR`, else the shipped demo model.
    default_dir: PathBuf,
    /// The model the node serves, or is about to serve.
    model: Mutex<ModelInfo>,
    /// A model's files or layers on their way from peers.
    fetch: Mutex<Option<FetchStatus>>,
    /// The chat page's models and the loopback API.
    pub(crate) chats: crate::chat::Chats,
    settings: Mutex<SettingsStore>,
    node: RwLock<Option<NodeHandle>>,
    node_error: Mutex<Option<String>>,
    /// Why the node computes on the CPU though the settings ask for the GPU.
    device_note: Mutex<Option<String>>,
    /// The address the first node bound; a restart binds it again, so peers and the tracker
    /// see the same node at the same address, not a copied identity at a new one.
    bound: Mutex<Option<SocketAddr>>,
    holds: Mutex<Holds>,
    rates: Mutex<Rates>,
    usage: Mutex<Usage>,
    status: watch::Sender<DesktopStatus>,
}

impl Desktop {
    /// Opens the settings and the model (writing the demo model on first start). The node is
    /// started by [`Desktop::start_node`]. A corrupt settings file is an error and is left as
    /// it is on disk.
    pub async fn open(launch: Launch) -> Result<Arc<Self>, CommandError> {
        Self::open_on(launch, Arc::new(SystemMachine)).await
    }

    /// [`Desktop::open`] on a given machine (tests pass a fake one).
    pub async fn open_on(
        launch: Launch,
        machine: Arc<dyn Machine>,
    ) -> Result<Arc<Self>, CommandError> {
        let store = SettingsStore::open(&launch.settings_path)?;
        std::fs::create_dir_all(&launch.data_dir).map_err(|e| {
            CommandError::new("io", format!("creating {}: {e}", launch.data_dir.display()))
        })?;
        let default_dir = match &launch.model_dir {
            Some(dir) => dir.clone(),
            None => demo_model(&launch.data_dir).await?,
        };
        // The chosen model where it is on disk already; the node's start fetches a swarm model
        // that is not.
        let chosen = model_dir(&launch, &default_dir, &store.get().model);
        let model = ModelInfo::read(&chosen)
            .or_else(|_| ModelInfo::read(&default_dir))
            .map_err(|e| CommandError::new("model", format!("{}: {e}", default_dir.display())))?;
        let usage = std::fs::read(launch.data_dir.join(USAGE_FILE))
            .ok()
            .and_then(|bytes| serde_json::from_slice(&bytes).ok())
            .unwrap_or_default();
        Ok(Arc::new(Self {
            launch,
            machine,
            default_dir,
            model: Mutex::new(model),
            fetch: Mutex::new(None),
            chats: crate::chat::Chats::default(),
            settings: Mutex::new(store),
            node: RwLock::new(None),
            node_error: Mutex::new(None),
            device_note: Mutex::new(None),
            bound: Mutex::new(None),
            holds: Mutex::new(Holds::default()),
            rates: Mutex::new(Rates::default()),
            usage: Mutex::new(usage),
            status: watch::Sender::new(DesktopStatus::starting()),
        }))
    }

    /// The status, as it changes.
    pub fn watch(&self) -> watch::Receiver<DesktopStatus> {
        self.status.subscribe()
    }

    /// The settings in force.
    pub fn settings(&self) -> Settings {
        self.settings.lock().expect("settings lock").get().clone()
    }

    /// Where the app keeps its data.
    pub fn data_dir(&self) -> &Path {
        &self.launch.data_dir
    }

    /// The model the node serves, or is about to serve.
    pub fn model(&self) -> ModelInfo {
        self.model.lock().expect("model lock").clone()
    }

    /// The address the running node is bound to.
    pub async fn node_addr(&self) -> Option<SocketAddr> {
        self.node.read().await.as_ref().map(NodeHandle::addr)
    }

    /// A watch of the running node's state: it ends in `Stopped` when that node stops.
    pub async fn node_status(&self) -> Option<watch::Receiver<NodeStatus>> {
        self.node.read().await.as_ref().map(NodeHandle::status)
    }

    /// What the running node enforces: caps (KB/s) and compute share (%), and its run state.
    pub async fn node_limits(&self) -> Option<(NodeLimits, RunState)> {
        let node = self.node.read().await;
        let node = node.as_ref()?;
        let state = node.status().borrow().state;
        Some((node.limits(), state))
    }

    /// Plans the layers for `choice` with the current settings and the swarm's coverage.
    pub async fn plan_layers(&self, choice: LayerChoice) -> Result<LayerPlan, CommandError> {
        let settings = self.settings();
        let own = self.node.read().await.as_ref().map(|n| n.id().to_string());
        let coverage = self.coverage(&settings, own).await;
        self.plan_with(choice, &coverage, &settings)
    }

    fn plan_with(
        &self,
        choice: LayerChoice,
        coverage: &[u32],
        settings: &Settings,
    ) -> Result<LayerPlan, CommandError> {
        layers::plan(
            &self.model().config,
            choice,
            coverage,
            settings.compute.vram_budget_mib.saturating_mul(MIB),
        )
        .map_err(|message| CommandError {
            code: "invalid_setting",
            message,
            field: Some("layers".into()),
        })
    }

    /// Replicas per layer among the tracker's peers, else among those the running node found
    /// through the DHT; none known (all zero) leaves Auto to fill from the first layer.
    async fn coverage(&self, settings: &Settings, own: Option<String>) -> Vec<u32> {
        let model = self.model();
        let mut peers = self.swarm_peers(settings, Some(&model.id)).await;
        peers.retain(|p| Some(&p.node_id) != own.as_ref());
        layers::coverage(&peers, &model.id, model.config.num_hidden_layers as u32)
    }

    /// The peers serving `model_id` (every model: none) that the tracker lists, else those the
    /// running node found through the DHT.
    pub(crate) async fn swarm_peers(
        &self,
        settings: &Settings,
        model_id: Option<&str>,
    ) -> Vec<PeerRecord> {
        let mut peers = match self.node.read().await.as_ref() {
            Some(node) => node.known_peers(),
            None => Vec::new(),
        };
        if let Some(url) = &settings.network.tracker {
            match neuroshard_node::client::tracker_client(url) {
                Ok(client) => {
                    match neuroshard_node::client::list_peers(client, url, model_id).await {
                        Ok(list) => peers = list,
                        Err(e) => tracing::warn!("the swarm's peers from the tracker unknown: {e}"),
                    }
                }
                Err(e) => tracing::warn!("the swarm's peers unknown: {e}"),
            }
        }
        if let Some(id) = model_id {
            peers.retain(|p| p.model_id == id);
        }
        peers
    }

    /// Makes the model the settings choose the one served and plans its layers: a local
    /// directory is read; a swarm model's small files and planned layers are fetched from its
    /// peers (with progress in the status) unless they are on disk from before.
    async fn prepare(&self, settings: &Settings) -> Result<LayerPlan, CommandError> {
        let dir = model_dir(&self.launch, &self.default_dir, &settings.model);
        let swarm_id = match &settings.model {
            ModelChoice::Swarm { id } => Some(id.clone()),
            _ => None,
        };
        let peers = match &swarm_id {
            Some(id) => self.swarm_peers(settings, Some(id)).await,
            None => Vec::new(),
        };
        if let Some(id) = &swarm_id
            && FetchedModel::read(&dir)
                .ok()
                .flatten()
                .is_none_or(|f| &f.model_id != id)
        {
            let peer = peers
                .iter()
                .find(|p| !p.is_relayed())
                .or(peers.first())
                .ok_or_else(|| model_error(format!("no peer serves model {id} now")))?;
            self.set_fetch(Some(FetchStatus {
                model_id: id.clone(),
                layers: None,
                done_bytes: 0,
                total_bytes: 0,
            }));
            let fetched = checkpoint::fetch_model_files(&peer.addr, id, &dir).await;
            self.set_fetch(None);
            fetched.map_err(|e| model_error(format!("fetching model {id}: {e}")))?;
        }
        let model = ModelInfo::read(&dir).map_err(|e| CommandError {
            field: matches!(settings.model, ModelChoice::Local { .. }).then(|| "model.dir".into()),
            ..model_error(format!("{}: {e}", dir.display()))
        })?;
        let switched = model.id != self.model().id;
        *self.model.lock().expect("model lock") = model.clone();
        if switched {
            self.chats.model_changed().await;
        }
        let plan = self.plan_layers(settings.layers).await?;
        if swarm_id.is_some() {
            self.fetch_layers(&model, &peers, plan.range).await?;
        }
        Ok(plan)
    }

    /// Fetches the weights of `range` of the swarm model `model` from `peers` and keeps them,
    /// unless they are on disk already.
    async fn fetch_layers(
        &self,
        model: &ModelInfo,
        peers: &[PeerRecord],
        range: LayerRange,
    ) -> Result<(), CommandError> {
        match fetched::load_shard(&model.dir, &model.config, range.to_range()) {
            Ok(Some(_)) => return Ok(()),
            Ok(None) => {}
            Err(e) => tracing::warn!("fetching the layers again: {e}"),
        }
        let sources = crate::models::sources(peers, &model.id, range).map_err(model_error)?;
        let mut status = FetchStatus {
            model_id: model.id.clone(),
            layers: Some(range),
            done_bytes: 0,
            total_bytes: 4 * neuroshard_model::init::shard_parameter_count(
                &model.config,
                range.to_range(),
            ) as u64,
        };
        self.set_fetch(Some(status.clone()));
        let fetched = checkpoint::fetch_layers(&sources, model, |p| {
            status.done_bytes = p.done;
            status.total_bytes = p.total;
            self.set_fetch(Some(status.clone()));
        })
        .await;
        self.set_fetch(None);
        let (parameters, report) = fetched.map_err(|e| {
            model_error(format!(
                "fetching layers {range} of model {}: {e}",
                model.id
            ))
        })?;
        tracing::info!(
            "fetched layers {range} of model {} ({} bytes in {} requests)",
            model.id,
            report.total_bytes,
            report.requests
        );
        let dir = model.dir.clone();
        let id = model.id.clone();
        tokio::task::spawn_blocking(move || {
            fetched::save_shard(&dir, &id, range.to_range(), &parameters)
        })
        .await
        .map_err(|e| model_error(e.to_string()))?
        .map_err(|e| model_error(format!("keeping the fetched layers: {e}")))
    }

    /// Shows a fetch's progress at once, between the status refreshes.
    fn set_fetch(&self, fetch: Option<FetchStatus>) {
        *self.fetch.lock().expect("fetch lock") = fetch.clone();
        self.status.send_if_modified(|status| {
            let changed = status.fetch != fetch;
            status.fetch = fetch;
            changed
        });
    }

    /// Starts the node with the layers the settings choose (stopping the one running, after
    /// its calls in flight or 10 s); on failure the status says why.
    pub async fn start_node(self: &Arc<Self>) -> Result<(), CommandError> {
        let settings = self.settings();
        let result = match self.prepare(&settings).await {
            Ok(plan) => {
                let mut slot = self.node.write().await;
                if let Some(old) = slot.take() {
                    tokio::time::timeout(RESTART_DRAIN, old.drain()).await.ok();
                    old.shutdown().await;
                }
                self.launch_node(&settings, plan).await.map(|node| {
                    *slot = Some(node);
                })
            }
            Err(e) => Err(e),
        };
        *self.node_error.lock().expect("error lock") =
            result.as_ref().err().map(|e| e.message.clone());
        self.refresh().await;
        // The API serves the model the node serves.
        self.sync_api().await;
        result
    }

    async fn launch_node(
        &self,
        settings: &Settings,
        plan: LayerPlan,
    ) -> Result<NodeHandle, CommandError> {
        let mut config = NodeConfig::new(self.model().dir, plan.range);
        config.listen = self
            .bound
            .lock()
            .expect("bound lock")
            .unwrap_or(self.launch.listen);
        config.advertise = self.launch.advertise.clone();
        config.tracker = settings.network.tracker.clone();
        // The whole chain: the address as it is, UPnP, STUN, a relay a peer offers.
        config.reach.mode = neuroshard_node::reach::NatMode::Auto;
        config.bootstrap = settings.network.bootstrap.clone();
        config.discovery.lan = self.launch.lan.clone();
        config.display_name = settings
            .profile
            .display_name
            .clone()
            .filter(|_| !settings.profile.anonymous);
        config.data_dir = Some(self.launch.data_dir.clone());
        config.upload_kbps = settings.bandwidth.upload_kbps;
        config.download_kbps = settings.bandwidth.download_kbps;
        config.compute_share_percent = settings.compute.gpu_share_percent;
        config.cpu_threads = settings.compute.cpu_threads;
        // Held back (first run, pause, snooze, schedule) from the first call; the next refresh
        // resumes a node that may serve.
        config.start_paused = true;
        let (device, mut note) = device_for(settings);
        config.device = Some(device);
        let node = match start_node(config.clone()).await {
            Err(e @ NodeError::Device(_)) => {
                note = Some(cpu_fallback(&e));
                config.device = Some(ComputeDevice::Cpu);
                start_node(config).await?
            }
            started => started?,
        };
        *self.device_note.lock().expect("note lock") = note;
        *self.bound.lock().expect("bound lock") = Some(node.addr());
        node.apply_settings(settings);
        tracing::info!("node {} serving layers {}", node.id(), plan.range);
        Ok(node)
    }

    /// Moves the running node to the layers and device the settings choose, swapping its shard
    /// live (no restart: same port, identity and pause state); with no node running, starts
    /// one. On failure the node serves on as it was and the status says why.
    pub async fn reshard(self: &Arc<Self>) -> Result<(), CommandError> {
        let settings = self.settings();
        let result = async {
            let plan = self.plan_layers(settings.layers).await?;
            let model = self.model();
            if let ModelChoice::Swarm { id } = &settings.model {
                let peers = self.swarm_peers(&settings, Some(id)).await;
                self.fetch_layers(&model, &peers, plan.range).await?;
            }
            let slot = self.node.read().await;
            let Some(node) = slot.as_ref() else {
                drop(slot);
                return self.start_node().await;
            };
            let (device, mut note) = device_for(&settings);
            match node.reshard(plan.range, Some(device)).await {
                Err(e @ NodeError::Device(_)) => {
                    note = Some(cpu_fallback(&e));
                    node.reshard(plan.range, Some(ComputeDevice::Cpu)).await?;
                }
                moved => moved?,
            }
            *self.device_note.lock().expect("note lock") = note;
            tracing::info!("node {} now serving layers {}", node.id(), plan.range);
            Ok(())
        }
        .await;
        *self.node_error.lock().expect("error lock") =
            result.as_ref().err().map(|e| e.message.clone());
        self.refresh().await;
        result
    }

    /// Applies a JSON merge patch to the settings. A bad value is refused with its field named
    /// and nothing changes. Every change reaches the running node without a restart: caps,
    /// compute share, threads and name at once; a tracker is followed and bootstrap peers are
    /// joined through at once; layers, memory budget and device by a live shard swap with the
    /// new plan.
    pub async fn update_settings(
        self: &Arc<Self>,
        patch: &Value,
    ) -> Result<Settings, CommandError> {
        if let Some(ModelChoice::Local { dir }) = patch
            .get("model")
            .and_then(|m| serde_json::from_value(m.clone()).ok())
        {
            // A directory that is not a model is refused before anything is stored.
            ModelInfo::read(&dir).map_err(|e| CommandError {
                code: "invalid_setting",
                message: format!("{} is not a model this app can serve: {e}", dir.display()),
                field: Some("model.dir".into()),
            })?;
        }
        // Layers chosen with another model are planned against that model when it is
        // prepared (a failure then shows in the status); with this model, checked now.
        if patch.get("layers").is_some_and(|choice| !choice.is_null())
            && patch.get("model").is_none_or(Value::is_null)
        {
            let next = self
                .settings
                .lock()
                .expect("settings lock")
                .preview(patch)?;
            // Whether the choice fits the model needs no swarm coverage: no tracker call here,
            // the shard swap that applies it plans with the swarm.
            let none = vec![0; self.model().config.num_hidden_layers];
            self.plan_with(next.layers, &none, &next)?;
        }
        let (before, after) = {
            let mut store = self.settings.lock().expect("settings lock");
            let before = store.get().clone();
            let after = store.update(patch)?.clone();
            (before, after)
        };
        self.apply(&before, &after).await;
        Ok(after)
    }

    /// The first run: a display name (or anonymity) and a preset; the node starts serving.
    pub async fn finish_first_run(
        self: &Arc<Self>,
        display_name: Option<String>,
        anonymous: bool,
        preset: Preset,
    ) -> Result<Settings, CommandError> {
        let (before, after) = {
            let mut store = self.settings.lock().expect("settings lock");
            let before = store.get().clone();
            let mut next = before.clone().with_preset(preset);
            next.profile.anonymous = anonymous;
            next.profile.display_name = if anonymous {
                None
            } else {
                display_name.map(|n| n.trim().to_string())
            };
            if !anonymous
                && next
                    .profile
                    .display_name
                    .as_deref()
                    .unwrap_or("")
                    .is_empty()
            {
                return Err(CommandError {
                    code: "invalid_setting",
                    message: "pick a display name, or choose to stay anonymous".into(),
                    field: Some("profile.display_name".into()),
                });
            }
            next.profile.onboarded = true;
            let after = store.replace(next)?.clone();
            (before, after)
        };
        self.apply(&before, &after).await;
        Ok(after)
    }

    async fn apply(self: &Arc<Self>, before: &Settings, after: &Settings) {
        let reshard = before.layers != after.layers
            || before.compute.device != after.compute.device
            || (after.layers == LayerChoice::Auto
                && before.compute.vram_budget_mib != after.compute.vram_budget_mib);
        let tracker = before.network.tracker != after.network.tracker;
        let model = before.model != after.model;
        if before.network != after.network {
            // The chat page's swarm clients were found through the old settings.
            self.chats.model_changed().await;
        }
        if let Some(node) = self.node.read().await.as_ref() {
            node.apply_settings(after);
            if before.network.bootstrap != after.network.bootstrap
                && let Err(e) = node.set_bootstrap(after.network.bootstrap.clone())
            {
                tracing::error!("keeping the bootstrap peers as they were: {e}");
            }
        }
        if model {
            // Another model: its files and layers may have to come from peers first, while the
            // node serves the old one; then the node restarts on the new one.
            let desktop = self.clone();
            tokio::spawn(async move {
                if let Err(e) = desktop.start_node().await {
                    tracing::error!("switching models failed: {e}");
                }
            });
        } else if reshard || tracker {
            // Registering with a tracker and loading a shard take a while: off the caller. The
            // settings are read there, so the last of several quick changes wins.
            let desktop = self.clone();
            tokio::spawn(async move {
                let url = desktop.settings().network.tracker;
                if tracker
                    && let Some(node) = desktop.node.read().await.as_ref()
                    && let Err(e) = node.set_tracker(url.as_deref()).await
                {
                    tracing::error!("keeping the tracker as it was: {e}");
                }
                if reshard && let Err(e) = desktop.reshard().await {
                    tracing::error!("moving the node to its new layers failed: {e}");
                }
            });
        }
        if before.api != after.api || before.network != after.network {
            let desktop = self.clone();
            tokio::spawn(async move { desktop.sync_api().await });
        }
        self.refresh().await;
    }

    /// Pauses now (calls in flight finish) or resumes, clearing any snooze.
    pub async fn set_paused(&self, paused: bool) -> DesktopStatus {
        {
            let mut holds = self.holds.lock().expect("holds lock");
            holds.paused = paused;
            holds.snoozed_until_ms = None;
        }
        if let Some(node) = self.node.read().await.as_ref() {
            if paused {
                node.pause();
            } else {
                node.resume();
            }
        }
        self.refresh().await
    }

    /// "Finish current requests, then pause": refuses new calls at once; the node pauses when
    /// the calls in flight are done.
    pub async fn drain(self: &Arc<Self>) -> DesktopStatus {
        self.holds.lock().expect("holds lock").paused = true;
        let desktop = self.clone();
        tokio::spawn(async move {
            if let Some(node) = desktop.node.read().await.as_ref() {
                node.drain().await;
            }
            desktop.refresh().await;
        });
        // The drain has begun once the node leaves Serving.
        if let Some(node) = self.node.read().await.as_ref() {
            let mut watch = node.status();
            let _ = watch.wait_for(|s| s.state != RunState::Serving).await;
        }
        self.refresh().await
    }

    /// Pauses until the snooze ends; the next tick after that resumes.
    pub async fn snooze(&self, length: Snooze, now_ms: u64) -> DesktopStatus {
        let until = match length {
            Snooze::OneHour => now_ms + MS_PER_HOUR,
            Snooze::ThreeHours => now_ms + 3 * MS_PER_HOUR,
            Snooze::Tomorrow => tomorrow_at(now_ms, 8),
        };
        self.holds.lock().expect("holds lock").snoozed_until_ms = Some(until);
        self.refresh().await
    }

    /// Receipts, newest first, `per_page` at a time, optionally of one status.
    pub async fn receipts(
        &self,
        status: Option<&str>,
        page: u32,
        per_page: u32,
    ) -> Result<ReceiptPage, CommandError> {
        if per_page == 0 || per_page > MAX_PAGE {
            return Err(CommandError::bad_request(format!(
                "per_page is {per_page}; ask for 1 to {MAX_PAGE} rows"
            )));
        }
        let status = status
            .map(Status::parse)
            .transpose()
            .map_err(CommandError::bad_request)?;
        let offset = u64::from(page) * u64::from(per_page);
        let (rows, counts) = self
            .ledger(move |l| Ok((l.page(status, offset, per_page)?, l.status_counts()?)))
            .await?;
        let total = match status {
            None => counts.pending + counts.verified + counts.voided,
            Some(Status::Pending) => counts.pending,
            Some(Status::Verified) => counts.verified,
            Some(Status::Voided) => counts.voided,
        };
        Ok(ReceiptPage {
            rows,
            total,
            page,
            per_page,
        })
    }

    /// Verified totals for today, the last 7 days and ever.
    pub async fn totals(&self, now_ms: u64) -> Result<PeriodTotals, CommandError> {
        let midnight = local_midnight(now_ms);
        let per_model = self.ledger(move |l| l.totals(now_ms, midnight)).await?;
        let mut sum = PeriodTotals::default();
        for m in per_model {
            for (into, from) in [
                (&mut sum.today, m.today),
                (&mut sum.week, m.week),
                (&mut sum.lifetime, m.lifetime),
            ] {
                into.receipts += from.receipts;
                into.tokens += from.tokens;
                into.flops += from.flops;
                into.credit += from.credit;
            }
        }
        Ok(sum)
    }

    /// Tokens and credit per hour over the last 24 hours (`"24h"`) or per day over the last 7
    /// days (`"7d"`), oldest first, ending with the current hour or day.
    pub async fn series(&self, range: &str, now_ms: u64) -> Result<Vec<SeriesPoint>, CommandError> {
        let (since, bucket, count) = match range {
            "24h" => (
                now_ms / MS_PER_HOUR * MS_PER_HOUR - 23 * MS_PER_HOUR,
                MS_PER_HOUR,
                24,
            ),
            "7d" => (
                local_midnight(now_ms).saturating_sub(6 * MS_PER_DAY),
                MS_PER_DAY,
                7,
            ),
            other => {
                return Err(CommandError::bad_request(format!(
                    "range {other:?} is not 24h or 7d"
                )));
            }
        };
        self.ledger(move |l| l.series(since, bucket, count)).await
    }

    /// Writes every receipt as CSV into `dir` (the Downloads folder when none) and returns the
    /// file's path.
    pub async fn export_csv(
        &self,
        dir: Option<PathBuf>,
        now_ms: u64,
    ) -> Result<PathBuf, CommandError> {
        let dir = dir
            .or_else(dirs::download_dir)
            .or_else(dirs::home_dir)
            .unwrap_or_else(|| self.launch.data_dir.clone());
        let day = Local
            .timestamp_millis_opt(now_ms as i64)
            .single()
            .map(|t| t.format("%Y-%m-%d").to_string())
            .unwrap_or_default();
        let path = dir.join(format!("neuroshard-receipts-{day}.csv"));
        let target = path.clone();
        self.ledger(move |l| {
            let file = std::fs::File::create(&target)
                .map_err(|e| LedgerError::Export(format!("{}: {e}", target.display())))?;
            l.export_csv(std::io::BufWriter::new(file))
        })
        .await?;
        Ok(path)
    }

    /// Runs `f` on the node's ledger, or on the ledger file when no node runs.
    async fn ledger<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Ledger) -> Result<T, LedgerError> + Send + 'static,
    ) -> Result<T, CommandError> {
        if let Some(node) = self.node.read().await.as_ref() {
            return Ok(node.ledger().read(f).await?);
        }
        let path = self.launch.data_dir.join(LEDGER_FILE);
        tokio::task::spawn_blocking(move || f(&Ledger::open(&path)?))
            .await
            .map_err(|e| CommandError::new("ledger", e.to_string()))?
            .map_err(CommandError::from)
    }

    /// True the first time the window is closed to the tray, so the notice shows once ever.
    pub fn first_close(&self) -> bool {
        let marker = self.launch.data_dir.join(CLOSE_NOTICE_FILE);
        if marker.exists() {
            return false;
        }
        std::fs::write(&marker, b"").is_ok()
    }

    /// Samples the node, applies the holds (snooze ends, transfer cap, schedule), and publishes
    /// the status. The app calls it every second and after every command.
    pub async fn refresh(&self) -> DesktopStatus {
        let now = neuroshard_node::now_ms();
        let settings = self.settings();
        let guard = self.node.read().await;
        let Some(node) = guard.as_ref() else {
            let error = self.node_error.lock().expect("error lock").clone();
            let mut status = DesktopStatus {
                fetch: self.fetch.lock().expect("fetch lock").clone(),
                ..DesktopStatus::starting()
            };
            if let Some(e) = error {
                status.state = AppState::Error;
                status.detail = Some(e);
            }
            return self.publish(status);
        };
        let node_layers_total = self.model().config.num_hidden_layers as u32;
        let metrics = node.metrics();
        let rate = self
            .rates
            .lock()
            .expect("rates lock")
            .sample(now, metrics.clone());
        // The transport's own count: every byte of every connection, not only Forward payloads.
        let moved = node.transport_bytes();
        let bandwidth = self.meter(&settings, moved, now);
        // The node itself refuses new work once the period's cap is used up, even between two
        // refreshes of the app.
        node.set_transfer_budget(
            bandwidth
                .period_cap_bytes
                .map(|cap| moved + cap.saturating_sub(bandwidth.period_bytes)),
        );
        let (state, detail) = self.decide(&settings, &bandwidth, now);
        let running = node.status().borrow().to_owned();
        let want = state == AppState::Serving;
        let state = match running.state {
            RunState::Serving if !want => {
                node.pause();
                state
            }
            RunState::Paused if want => {
                node.resume();
                state
            }
            RunState::Draining => AppState::Draining,
            RunState::Stopped => AppState::Offline,
            _ => state,
        };
        let today = local_midnight(now);
        let (today_totals, pending) = node
            .ledger()
            .read(move |l| {
                let totals = l.totals(now, today)?;
                let counts = l.status_counts()?;
                Ok((totals, counts.pending))
            })
            .await
            .unwrap_or_default();
        let reach = node.reachability().borrow().clone();
        let status = DesktopStatus {
            state,
            detail,
            node_id: Some(node.id().to_string()),
            model_id: Some(node.model_id().to_string()),
            layers: Some(node.layers()),
            total_layers: Some(node_layers_total),
            tokens_per_s: rate.tokens,
            sessions: metrics.sessions,
            in_flight: running.in_flight,
            latency_ms: metrics.rpc_latency_p50_ms,
            peers: metrics.peer_count,
            bandwidth: BandwidthStatus {
                up_bps: rate.sent,
                down_bps: rate.received,
                ..bandwidth
            },
            address: Some(node.advertised()),
            device: Some(if node.on_gpu() { "gpu" } else { "cpu" }),
            device_note: self.device_note.lock().expect("note lock").clone(),
            reachability: reach_path_name(reach.path).into(),
            reachability_advice: reach.advice,
            receipts_today: today_totals.iter().map(|m| m.today.receipts).sum(),
            credit_today: today_totals.iter().map(|m| m.today.credit).sum(),
            receipts_pending: pending,
            fetch: self.fetch.lock().expect("fetch lock").clone(),
            api_url: self.chats.api_url(),
            api_error: self.chats.api_error(),
        };
        drop(guard);
        self.publish(status)
    }

    fn publish(&self, status: DesktopStatus) -> DesktopStatus {
        self.status.send_if_modified(|current| {
            let changed = *current != status;
            if changed {
                *current = status.clone();
            }
            changed
        });
        status
    }

    /// What the owner's holds and the settings want, before looking at the node.
    fn decide(
        &self,
        settings: &Settings,
        bandwidth: &BandwidthStatus,
        now: u64,
    ) -> (AppState, Option<String>) {
        if !settings.profile.onboarded {
            return (AppState::Setup, None);
        }
        {
            let mut holds = self.holds.lock().expect("holds lock");
            if holds.paused {
                return (AppState::Paused, None);
            }
            match holds.snoozed_until_ms {
                Some(until) if until > now => {
                    return (
                        AppState::Snoozed,
                        Some(format!("until {}", clock(until, now))),
                    );
                }
                Some(_) => holds.snoozed_until_ms = None,
                None => {}
            }
        }
        if let (Some(cap), Some(ends)) = (bandwidth.period_cap_bytes, bandwidth.period_ends_ms)
            && bandwidth.period_bytes >= cap
        {
            return (
                AppState::Waiting,
                Some(format!("transfer cap used up until {}", clock(ends, now))),
            );
        }
        let schedule = &settings.schedule;
        if schedule.pause_on_battery && self.machine.on_battery() == Some(true) {
            return (AppState::Waiting, Some("on battery power".into()));
        }
        if schedule.only_when_idle {
            let wanted = Duration::from_secs(u64::from(schedule.idle_minutes) * 60);
            match self.machine.idle() {
                Some(idle) if idle >= wanted => {}
                Some(_) => {
                    return (
                        AppState::Waiting,
                        Some(format!(
                            "runs after {} min without input",
                            schedule.idle_minutes
                        )),
                    );
                }
                None => {
                    return (
                        AppState::Waiting,
                        Some("idle time cannot be read here".into()),
                    );
                }
            }
        }
        let local = Local
            .timestamp_millis_opt(now as i64)
            .single()
            .unwrap_or_else(Local::now);
        let weekday = WEEKDAYS[local.weekday().num_days_from_monday() as usize];
        let minute = (local.hour() * 60 + local.minute()) as u16;
        if !in_schedule(&settings.schedule.weekly, weekday, minute) {
            return (
                AppState::Waiting,
                Some("outside the weekly schedule".into()),
            );
        }
        (AppState::Serving, None)
    }

    /// Adds the bytes moved since the last sample to the period's meter, starts a new period
    /// when the last one ended, and saves the meter now and then.
    fn meter(&self, settings: &Settings, counter: u64, now: u64) -> BandwidthStatus {
        let mut usage = self.usage.lock().expect("usage lock");
        let moved = counter.checked_sub(usage.last_counter).unwrap_or(counter);
        usage.last_counter = counter;
        usage.bytes += moved;
        let cap = settings.bandwidth.transfer_cap;
        let period_ms = cap.map(|c| u64::from(c.every_days) * MS_PER_DAY);
        if usage.period_start_ms == 0 || period_ms.is_some_and(|p| now >= usage.period_start_ms + p)
        {
            usage.period_start_ms = now;
            usage.bytes = 0;
        }
        if now.saturating_sub(usage.last_saved_ms) >= 10_000 {
            usage.last_saved_ms = now;
            self.save_usage(&usage);
        }
        BandwidthStatus {
            up_cap_kbps: settings.bandwidth.upload_kbps,
            down_cap_kbps: settings.bandwidth.download_kbps,
            period_bytes: usage.bytes,
            period_cap_bytes: cap.map(|c| u64::from(c.gigabytes) * 1_000_000_000),
            period_ends_ms: period_ms.map(|p| usage.period_start_ms + p),
            ..BandwidthStatus::default()
        }
    }

    fn save_usage(&self, usage: &Usage) {
        let path = self.launch.data_dir.join(USAGE_FILE);
        let json = serde_json::to_vec(usage).expect("usage serializes");
        if let Err(e) = std::fs::write(&path, json) {
            tracing::warn!("saving the transfer meter to {}: {e}", path.display());
        }
    }

    /// Saves the meter and stops the node.
    pub async fn shutdown(&self) {
        let usage = *self.usage.lock().expect("usage lock");
        self.save_usage(&usage);
        self.chats.stop_api().await;
        if let Some(node) = self.node.write().await.take() {
            node.shutdown().await;
        }
        self.publish(DesktopStatus {
            state: AppState::Offline,
            ..DesktopStatus::starting()
        });
    }

    /// Refreshes the status every second until the app ends.
    pub fn spawn_ticker(self: &Arc<Self>) {
        let desktop = Arc::downgrade(self);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
            loop {
                tick.tick().await;
                let Some(desktop) = desktop.upgrade() else {
                    return;
                };
                desktop.refresh().await;
            }
        });
    }
}

const WEEKDAYS: [Weekday; 7] = [
    Weekday::Mon,
    Weekday::Tue,
    Weekday::Wed,
    Weekday::Thu,
    Weekday::Fri,
    Weekday::Sat,
    Weekday::Sun,
];

/// The device to compute on: the GPU where asked for and this build has one, else the CPU, with
/// a note saying why.
fn device_for(settings: &Settings) -> (ComputeDevice, Option<String>) {
    match settings.compute.device {
        ComputeDevice::Gpu if !neuroshard_model::GPU_BUILD => (
            ComputeDevice::Cpu,
            Some("this build computes on the CPU only".to_string()),
        ),
        device => (device, None),
    }
}

/// The note for a GPU that failed to start: compute falls back to the CPU.
fn cpu_fallback(e: &NodeError) -> String {
    tracing::warn!("computing on the CPU: {e}");
    format!("no usable GPU, computing on the CPU ({e})")
}

/// Whether `minute` of `day` falls in one of the weekly windows; no windows means any time.
pub fn in_schedule(weekly: &[ScheduleWindow], day: Weekday, minute: u16) -> bool {
    weekly.is_empty()
        || weekly
            .iter()
            .any(|w| w.day == day && (w.start_minute..w.end_minute).contains(&minute))
}

/// Local midnight before `now_ms`, in ms since the Unix epoch.
pub fn local_midnight(now_ms: u64) -> u64 {
    let now = Local
        .timestamp_millis_opt(now_ms as i64)
        .single()
        .unwrap_or_else(Local::now);
    now.date_naive()
        .and_hms_opt(0, 0, 0)
        .and_then(|t| Local.from_local_datetime(&t).earliest())
        .map_or(now_ms - now_ms % MS_PER_DAY, |t| {
            t.timestamp_millis() as u64
        })
}

/// `hour`:00 local time on the day after `now_ms`.
fn tomorrow_at(now_ms: u64, hour: u64) -> u64 {
    let midnight = local_midnight(now_ms);
    local_midnight(midnight + MS_PER_DAY + 2 * MS_PER_HOUR) + hour * MS_PER_HOUR
}

/// "15:30" for a time today, "Tue 08:00" for a later day.
fn clock(at_ms: u64, now_ms: u64) -> String {
    let Some(at) = Local.timestamp_millis_opt(at_ms as i64).single() else {
        return String::new();
    };
    if local_midnight(at_ms) == local_midnight(now_ms) {
        at.format("%H:%M").to_string()
    } else {
        at.format("%a %H:%M").to_string()
    }
}

/// The shipped trained demo model under the data dir, written the first time (and again over
/// a damaged copy, or an older demo model an earlier version wrote there).
pub(crate) async fn demo_model(data_dir: &Path) -> Result<PathBuf, CommandError> {
    let dir = data_dir.join("models").join("demo");
    let shipped = neuroshard_model::init::DEMO_MODEL_FILES;
    let current = shipped
        .iter()
        .all(|(name, bytes)| std::fs::read(dir.join(name)).is_ok_and(|b| b == *bytes));
    if current {
        return Ok(dir);
    }
    let target = dir.clone();
    tokio::task::spawn_blocking(move || {
        // Weights files of an older demo model would be read beside the new ones.
        if let Ok(entries) = std::fs::read_dir(&target) {
            for entry in entries.flatten() {
                if entry.path().extension().is_some_and(|e| e == "safetensors") {
                    let _ = std::fs::remove_file(entry.path());
                }
            }
        }
        neuroshard_model::init::write_demo_model(&target)
    })
    .await
    .map_err(|e| CommandError::new("model", e.to_string()))?
    .map_err(|e| CommandError::new("model", format!("writing the demo model: {e}")))?;
    Ok(dir)
}

/// Where the model `choice` names lives: the default model's directory, a local one, or the
/// swarm model's under the data dir (named by its id, which the settings checked is hex).
fn model_dir(launch: &Launch, default_dir: &Path, choice: &ModelChoice) -> PathBuf {
    match choice {
        ModelChoice::Demo => default_dir.to_path_buf(),
        ModelChoice::Local { dir } => dir.clone(),
        ModelChoice::Swarm { id } => launch.data_dir.join("models").join(id),
    }
}

fn model_error(message: impl Into<String>) -> CommandError {
    CommandError::new("model", message)
}

/// The status's name of a reachability path.
fn reach_path_name(path: neuroshard_node::reach::ReachPath) -> &'static str {
    use neuroshard_node::reach::ReachPath;
    match path {
        ReachPath::Untested => "untested",
        ReachPath::Direct => "direct",
        ReachPath::Mapped => "mapped",
        ReachPath::Relayed => "relayed",
        ReachPath::Unreachable => "unreachable",
    }
}
