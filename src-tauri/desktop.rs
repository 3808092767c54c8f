//! The app's core, free of any window: the embedded node, the settings store, the owner's
//! holds (pause, snooze), the model served and the status snapshot. Tauri commands and the
//! tray are thin over this, and the tests drive it directly. The owner's rules and the transfer
//! meter are shared with a headless node (`neuroshard_settings::policy`, `neuroshard_node::owner`);
//! the receipts view (`receipts`) and the model choice (`models`) live beside it.

use neuroshard_base::NodeId;
use neuroshard_base::sync::LockExt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use neuroshard_model::ModelInfo;
use neuroshard_net::NodeError;
use neuroshard_node::lifecycle::{NodeStatus, RunState};
use neuroshard_node::node::{NodeConfig, NodeHandle, NodeLimits, start_node};
use neuroshard_settings::{
    ComputeDevice, LayerChoice, ModelChoice, Preset, Settings, SettingsStore,
};
use serde_json::Value;
use tokio::sync::{RwLock, watch};

pub use crate::error::CommandError;
pub use crate::launch::{DEFAULT_PORT, Launch, SystemMachine};
use crate::layers::{self, LayerPlan};
use crate::models::{demo_model, model_dir};
use crate::notices::Notice;
pub use crate::receipts::{MAX_PAGE, PeriodTotals, ReceiptPage};
use crate::status::{AppState, BandwidthStatus, DesktopStatus, FetchStatus, Rate, Rates};
use neuroshard_node::owner::Owner;
use neuroshard_proof::StatusCounts;
pub use neuroshard_settings::policy::{Decision, Machine, Snooze, Temperatures};
use neuroshard_settings::policy::{Holds, local_midnight};

const MIB: u64 = 1024 * 1024;

/// How long a restart waits for calls in flight before stopping the node anyway.
const RESTART_DRAIN: Duration = Duration::from_secs(10);

/// Notices kept for a slow listener; older ones are dropped.
const NOTICES_KEPT: usize = 16;

/// Marks that the close-to-tray notice has been shown.
const CLOSE_NOTICE_FILE: &str = "close-notice-shown";

/// The app's core; shared as `Arc<Desktop>`.
#[derive(Debug)]
pub struct Desktop {
    pub(crate) launch: Launch,
    machine: Arc<dyn Machine>,
    /// The model served by default: `$NEUROSHARD_MODEL_DIR`, else the shipped demo model.
    pub(crate) default_dir: PathBuf,
    /// The model the node serves, or is about to serve.
    pub(crate) model: Mutex<ModelInfo>,
    /// A model's files or layers on their way from peers.
    pub(crate) fetch: Mutex<Option<FetchStatus>>,
    /// The chat page's models and the loopback API.
    pub(crate) chats: crate::chat::Chats,
    settings: Mutex<SettingsStore>,
    pub(crate) node: RwLock<Option<NodeHandle>>,
    node_error: Mutex<Option<String>>,
    /// Why the node computes on the CPU though the settings ask for the GPU.
    device_note: Mutex<Option<String>>,
    /// The address the first node bound; a restart binds it again, so peers and the tracker
    /// see the same node at the same address, not a copied identity at a new one.
    bound: Mutex<Option<SocketAddr>>,
    holds: Mutex<Holds>,
    rates: Mutex<Rates>,
    /// Desktop notifications the owner wants, for the shell to show.
    notices: tokio::sync::broadcast::Sender<Notice>,
    owner: Mutex<Owner>,
    pub(crate) status: watch::Sender<DesktopStatus>,
}

impl Desktop {
    /// Opens the settings and the model (writing the demo model on first start). The node is
    /// started by [`Desktop::start_node`]. A corrupt settings file is an error and is left as
    /// it is on disk.
    pub async fn open(launch: Launch) -> Result<Arc<Self>, CommandError> {
        Self::open_on(launch, Arc::new(SystemMachine::default())).await
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
        let owner = Owner::load(&launch.data_dir);
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
            notices: tokio::sync::broadcast::Sender::new(NOTICES_KEPT),
            owner: Mutex::new(owner),
            status: watch::Sender::new(DesktopStatus::starting()),
        }))
    }

    /// The status, as it changes.
    pub fn watch(&self) -> watch::Receiver<DesktopStatus> {
        self.status.subscribe()
    }

    /// The desktop notifications the owner wants, as they come.
    pub fn notices(&self) -> tokio::sync::broadcast::Receiver<Notice> {
        self.notices.subscribe()
    }

    /// Sends `notice` to whoever shows notifications, unless the owner turned its kind off.
    pub(crate) fn notify(&self, notice: Notice) {
        if notice.wanted(&self.settings().notifications) {
            // None listening (no window yet, a test without a shell): nothing to show it.
            let _ = self.notices.send(notice);
        }
    }

    /// The settings in force.
    pub fn settings(&self) -> Settings {
        self.settings.lock_or_recover().get().clone()
    }

    /// Where the app keeps its data.
    pub fn data_dir(&self) -> &Path {
        &self.launch.data_dir
    }

    /// The model the node serves, or is about to serve.
    pub fn model(&self) -> ModelInfo {
        self.model.lock_or_recover().clone()
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
        let own = self.node.read().await.as_ref().map(|n| n.id());
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
            settings.compute.precision,
        )
        .map_err(|e| CommandError {
            code: "invalid_setting",
            message: e.problem,
            field: Some(e.field),
        })
    }

    /// Replicas per layer among the tracker's peers, else among those the running node found
    /// through the DHT; none known (all zero) leaves Auto to fill from the first layer.
    async fn coverage(&self, settings: &Settings, own: Option<NodeId>) -> Vec<u32> {
        let model = self.model();
        let mut peers = self.swarm_peers(settings, Some(&model.id)).await;
        peers.retain(|p| Some(p.node_id) != own);
        layers::coverage(&peers, &model.id, model.config.num_hidden_layers as u32)
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
        *self.node_error.lock_or_recover() = result.as_ref().err().map(|e| e.message.clone());
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
        config.listen = self.bound.lock_or_recover().unwrap_or(self.launch.listen);
        config.advertise = self.launch.advertise.clone();
        // The whole chain: the address as it is, UPnP, STUN, a relay a peer offers.
        config.reach.mode = neuroshard_node::reach::NatMode::Auto;
        config.discovery.lan = self.launch.lan.clone();
        config.data_dir = Some(self.launch.data_dir.clone());
        // Held back (first run, pause, snooze, schedule) from the first call; the next refresh
        // resumes a node that may serve.
        config.follow_settings(settings);
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
        *self.device_note.lock_or_recover() = note;
        *self.bound.lock_or_recover() = Some(node.addr());
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
            *self.device_note.lock_or_recover() = note;
            tracing::info!("node {} now serving layers {}", node.id(), plan.range);
            Ok(())
        }
        .await;
        *self.node_error.lock_or_recover() = result.as_ref().err().map(|e| e.message.clone());
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
            let next = self.settings.lock_or_recover().preview(patch)?;
            // Whether the choice fits the model needs no swarm coverage: no tracker call here,
            // the shard swap that applies it plans with the swarm.
            let none = vec![0; self.model().config.num_hidden_layers];
            self.plan_with(next.layers, &none, &next)?;
        }
        let (before, after) = {
            let mut store = self.settings.lock_or_recover();
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
            let mut store = self.settings.lock_or_recover();
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
        // Another precision reloads the shard and changes what the node announces: a restart,
        // as for another model.
        let model =
            before.model != after.model || before.compute.precision != after.compute.precision;
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
            // Another model (or precision): its files and layers may have to come from peers
            // first, while the node serves the old one; then the node restarts on the new one.
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
            let mut holds = self.holds.lock_or_recover();
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
        self.holds.lock_or_recover().paused = true;
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
        self.holds.lock_or_recover().snoozed_until_ms = Some(length.until(now_ms));
        self.refresh().await
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
        let now = neuroshard_net::now_ms();
        let settings = self.settings();
        let guard = self.node.read().await;
        let Some(node) = guard.as_ref() else {
            return self.publish(self.status_without_node());
        };
        let node_layers_total = self.model().config.num_hidden_layers as u32;
        let metrics = node.metrics();
        let rate = self.rates.lock_or_recover().sample(now, metrics.clone());
        let (verdict, thermal_hold, temperatures) = {
            let mut holds = self.holds.lock_or_recover();
            let verdict = self.owner.lock_or_recover().tick(
                node,
                &settings,
                &mut holds,
                self.machine.as_ref(),
                now,
            );
            (
                verdict,
                holds.thermal_since_ms.is_some(),
                holds.temperatures,
            )
        };
        let running = node.status().borrow().to_owned();
        let state = match running.state {
            RunState::Draining => AppState::Draining,
            RunState::Stopped => AppState::Offline,
            _ => AppState::from(verdict.decision),
        };
        let (detail, period) = (verdict.detail, verdict.period);
        // A ledger that cannot be read this tick keeps the figures shown before, rather than
        // showing none (and telling of a "first" receipt when it reads again).
        let receipts = receipts_today(node, now).await.map_or_else(
            || {
                let before = self.status.borrow();
                (
                    before.receipts_today,
                    before.credit_today,
                    before.receipts_pending,
                    before.receipts_verified,
                )
            },
            |(totals, counts)| {
                let today: u64 = totals.iter().map(|m| m.today.receipts).sum();
                let credit: f64 = totals.iter().map(|m| m.today.credit).sum();
                (today, credit, counts.pending, counts.verified)
            },
        );
        let reach = node.reachability().borrow().clone();
        let status = DesktopStatus {
            state,
            detail,
            node_id: Some(node.id()),
            model_id: Some(node.model_id().to_string()),
            layers: Some(node.layers()),
            total_layers: Some(node_layers_total),
            tokens_per_s: rate.tokens,
            sessions: metrics.sessions,
            in_flight: running.in_flight,
            latency_ms: metrics.rpc_latency_p50_ms,
            peers: metrics.peer_count,
            bandwidth: bandwidth_status(rate, &settings, &period),
            address: Some(node.advertised()),
            device: Some(if node.on_gpu() { "gpu" } else { "cpu" }),
            device_note: self.device_note.lock_or_recover().clone(),
            temperatures: temperatures.rounded(),
            thermal_hold,
            reachability: reach_path_name(reach.path).into(),
            reachability_advice: reach.advice,
            receipts_today: receipts.0,
            credit_today: receipts.1,
            receipts_pending: receipts.2,
            receipts_verified: receipts.3,
            fetch: self.fetch.lock_or_recover().clone(),
            api_url: self.chats.api_url(),
            api_error: self.chats.api_error(),
        };
        drop(guard);
        self.publish(status)
    }

    /// Names of the programs running now, for the settings page's picker.
    pub fn running_programs(&self) -> Vec<String> {
        self.machine.programs()
    }

    /// The status while no node runs: starting, or the error that stopped it.
    fn status_without_node(&self) -> DesktopStatus {
        let error = self.node_error.lock_or_recover().clone();
        let mut status = DesktopStatus {
            fetch: self.fetch.lock_or_recover().clone(),
            ..DesktopStatus::starting()
        };
        if let Some(e) = error {
            status.state = AppState::Error;
            status.detail = Some(e);
        }
        status
    }

    fn publish(&self, status: DesktopStatus) -> DesktopStatus {
        // Against the status it replaces, under the watch's lock: two refreshes at once cannot
        // both tell of one change.
        let mut notices = Vec::new();
        self.status.send_if_modified(|current| {
            let changed = *current != status;
            if changed {
                notices = crate::notices::from_status(current, &status);
                *current = status.clone();
            }
            changed
        });
        for notice in notices {
            self.notify(notice);
        }
        status
    }

    /// Saves the meter and stops the node.
    pub async fn shutdown(&self) {
        self.owner.lock_or_recover().save();
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

/// Today's verified totals per model (since local midnight) and the receipts still pending;
/// none when the ledger cannot be read.
async fn receipts_today(
    node: &NodeHandle,
    now: u64,
) -> Option<(Vec<neuroshard_proof::ModelTotals>, StatusCounts)> {
    let today = local_midnight(now);
    let read = node
        .ledger()
        .read(move |l| {
            let totals = l.totals(now, today)?;
            let counts = l.status_counts()?;
            Ok((totals, counts))
        })
        .await;
    read.map_err(|e| tracing::warn!("the ledger could not be read: {e}"))
        .ok()
}

/// The dashboard's bandwidth: the rates now, the owner's caps, and the transfer period.
fn bandwidth_status(
    rate: Rate,
    settings: &Settings,
    period: &neuroshard_settings::meter::Period,
) -> BandwidthStatus {
    BandwidthStatus {
        up_bps: rate.sent,
        down_bps: rate.received,
        up_cap_kbps: settings.bandwidth.upload_kbps,
        down_cap_kbps: settings.bandwidth.download_kbps,
        period_bytes: period.bytes,
        period_cap_bytes: period.cap_bytes,
        period_ends_ms: period.ends_ms,
    }
}
