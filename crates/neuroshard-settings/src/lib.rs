//! What a person sets: which layers to serve, how much of the machine and of the network to
//! give, when to run, and who they are in the swarm.
//!
//! One model ([`Settings`]) with commented defaults and a [`Settings::validate`] that names the
//! bad field. Changes arrive as JSON merge patches (RFC 7386) through [`SettingsStore::update`],
//! so the desktop app needs one command for every field. The store keeps the settings as JSON in
//! the OS config directory, writes them atomically, migrates files of older versions, and never
//! replaces a file it could not read or a value it refused: stored settings stay as they were.
//!
//! The owner's rules over them ([`policy`]: pause, snooze, battery, idle time, the weekly
//! schedule) and the transfer meter ([`meter`]) are pure functions here too, so the desktop app
//! and a headless node (`neuroshard node --settings FILE`) hold a node back the same way.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use serde_json::Value;

use neuroshard_base::LayerRange;
pub use neuroshard_base::precision::Precision;

pub mod care;
pub mod meter;
pub mod policy;

pub use care::{GamingSettings, NotificationSettings, StorageSettings, ThermalSettings};

/// Version of the settings file this build writes. Files carry it so a later build can migrate
/// them; see [`migrate`].
pub const SETTINGS_VERSION: u32 = 2;

/// File name of the settings inside the config directory.
pub const SETTINGS_FILE: &str = "settings.json";

pub use neuroshard_base::{MAX_DISPLAY_NAME_CHARS, is_host_port};

/// Why settings were refused or could not be read.
#[derive(Debug, thiserror::Error)]
pub enum SettingsError {
    /// A value is out of bounds or the wrong type; `field` is its dotted path.
    #[error("{field}: {message}")]
    Invalid {
        /// Dotted path of the field, such as `bandwidth.upload_kbps`.
        field: String,
        /// What is wrong with it.
        message: String,
    },
    /// The settings file exists but is not settings (corrupt, or from a newer version).
    #[error("{path}: {message}")]
    Unreadable {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        message: String,
    },
    /// Reading or writing the file failed.
    #[error("{context}: {source}")]
    Io {
        /// What was being done.
        context: String,
        /// The cause.
        source: std::io::Error,
    },
}

impl SettingsError {
    fn invalid(field: &str, message: impl Into<String>) -> Self {
        Self::Invalid {
            field: field.to_string(),
            message: message.into(),
        }
    }

    /// The dotted field path, for errors about one field.
    pub fn field(&self) -> Option<&str> {
        match self {
            Self::Invalid { field, .. } => Some(field),
            _ => None,
        }
    }
}

/// Everything a person can set. Every section has its defaults, so a file may name only what
/// differs from them.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Settings {
    /// File format version ([`SETTINGS_VERSION`]).
    pub version: u32,
    /// Who this node is to people.
    pub profile: Profile,
    /// Which layers to serve.
    pub layers: LayerChoice,
    /// How much of the machine to give.
    pub compute: ComputeSettings,
    /// How much of the network to give.
    pub bandwidth: BandwidthSettings,
    /// When to run.
    pub schedule: Schedule,
    /// Where to find the swarm.
    pub network: NetworkSettings,
    /// Which model to help serve.
    pub model: ModelChoice,
    /// The OpenAI-compatible API for tools on this machine.
    pub api: ApiSettings,
    /// Temperature limits for the CPU and the GPU.
    pub thermal: ThermalSettings,
    /// Programs whose running holds the node (games).
    pub gaming: GamingSettings,
    /// Which desktop notifications to show.
    pub notifications: NotificationSettings,
    /// Disk kept for fetched models and the ledger.
    pub storage: StorageSettings,
}

/// Which model to help serve.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "source", rename_all = "snake_case", deny_unknown_fields)]
pub enum ModelChoice {
    /// The model the app ships (the trained demo model): it serves on a machine with no swarm.
    #[default]
    Demo,
    /// A model the swarm serves, by the content id its peers announce; the chosen layers'
    /// weights are fetched from them and kept on disk.
    Swarm {
        /// The model's id (16 hex digits).
        id: String,
    },
    /// A Hugging Face model directory on this machine.
    Local {
        /// The directory, an absolute path.
        dir: PathBuf,
    },
}

/// The OpenAI-compatible API (`/v1/chat/completions` and the rest), on loopback only, so
/// local tools reach the swarm through this app.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ApiSettings {
    /// Serve it. Default false.
    pub enabled: bool,
    /// The loopback port. Default 8000, where OpenAI-compatible local servers listen.
    pub port: u16,
}

impl Default for ApiSettings {
    fn default() -> Self {
        Self {
            enabled: false,
            port: 8000,
        }
    }
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            version: SETTINGS_VERSION,
            profile: Profile::default(),
            layers: LayerChoice::Auto,
            compute: ComputeSettings::default(),
            bandwidth: BandwidthSettings::default(),
            schedule: Schedule::default(),
            network: NetworkSettings::default(),
            model: ModelChoice::default(),
            api: ApiSettings::default(),
            thermal: ThermalSettings::default(),
            gaming: GamingSettings::default(),
            notifications: NotificationSettings::default(),
            storage: StorageSettings::default(),
        }
    }
}

/// Who this node is to people, and whether its owner has been through the first run.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Profile {
    /// Name shown beside this node's id; none with `anonymous`.
    pub display_name: Option<String>,
    /// The owner chose to stay anonymous.
    pub anonymous: bool,
    /// The owner picked a name (or anonymity) and a preset. Until then the node stays paused:
    /// nothing is lent before the owner has said how much. Default false.
    pub onboarded: bool,
    /// Start the app when the user logs in. Default false: the owner opts in.
    pub launch_at_login: bool,
}

/// Which layers to serve.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "mode", rename_all = "snake_case", deny_unknown_fields)]
pub enum LayerChoice {
    /// The swarm's least-covered layers, as many as the memory budget holds.
    Auto,
    /// Exactly these layers, `start..end`.
    Range {
        /// First layer.
        start: u32,
        /// One past the last layer.
        end: u32,
    },
    /// This many layers, placed where the swarm has least coverage.
    Count {
        /// How many.
        count: u32,
    },
}

impl LayerChoice {
    /// The manual range, if one was chosen.
    pub fn range(&self) -> Option<LayerRange> {
        match *self {
            Self::Range { start, end } => LayerRange::new(start, end).ok(),
            _ => None,
        }
    }
}

/// Where compute runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ComputeDevice {
    /// The GPU through wgpu, where one is found.
    Gpu,
    /// The CPU backend.
    Cpu,
}

/// How much of the machine to give.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ComputeSettings {
    /// GPU or CPU. Default GPU: where there is none the node falls back to the CPU.
    pub device: ComputeDevice,
    /// Share of wall time the node may compute, 1–100 %, enforced as a duty cycle. Default 50 %:
    /// a gaming PC stays responsive while it serves.
    pub gpu_share_percent: u8,
    /// Most GPU memory for weights and caches, in MiB. Default 4096: a third of a 12 GiB card.
    pub vram_budget_mib: u64,
    /// CPU threads for compute; 0 means all cores but one. Default 0.
    pub cpu_threads: u16,
    /// How the served layers' projection weights are held: `f32` (default), `bf16` or `f16`
    /// (half the memory, so about twice the layers fit), or `int8` (a little over a quarter).
    pub precision: Precision,
}

impl Default for ComputeSettings {
    fn default() -> Self {
        Self {
            device: ComputeDevice::Gpu,
            gpu_share_percent: 50,
            vram_budget_mib: 4096,
            cpu_threads: 0,
            precision: Precision::F32,
        }
    }
}

/// How much of the network to give. 0 means no cap.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct BandwidthSettings {
    /// Upload cap in KB/s (1 KB = 1000 bytes); 0 for none. Default none.
    pub upload_kbps: u32,
    /// Download cap in KB/s; 0 for none. Default none.
    pub download_kbps: u32,
    /// Most traffic, both ways, per period; none for no cap. Default none.
    pub transfer_cap: Option<TransferCap>,
}

/// A cap of `gigabytes` every `every_days` days, like an ISP's monthly allowance.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TransferCap {
    /// Gigabytes (10^9 bytes) per period.
    pub gigabytes: u32,
    /// Length of the period in days.
    pub every_days: u16,
}

/// When to run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Schedule {
    /// Run only while the user is away. Default false.
    pub only_when_idle: bool,
    /// Minutes without input before the machine counts as idle. Default 5, as screen savers.
    pub idle_minutes: u16,
    /// Pause on battery power. Default true: lending a laptop's battery surprises people.
    pub pause_on_battery: bool,
    /// Weekly windows to run in; none means any time.
    pub weekly: Vec<ScheduleWindow>,
}

impl Default for Schedule {
    fn default() -> Self {
        Self {
            only_when_idle: false,
            idle_minutes: 5,
            pause_on_battery: true,
            weekly: Vec::new(),
        }
    }
}

/// Days of the week, Monday first (ISO 8601).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[allow(missing_docs)]
pub enum Weekday {
    Mon,
    Tue,
    Wed,
    Thu,
    Fri,
    Sat,
    Sun,
}

/// A window on one day, in minutes after local midnight: `start..end`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ScheduleWindow {
    /// The day.
    pub day: Weekday,
    /// First minute, 0–1439.
    pub start_minute: u16,
    /// Minute the window closes, 1–1440, after `start_minute`.
    pub end_minute: u16,
}

/// Where to find the swarm.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct NetworkSettings {
    /// Tracker URL; none to rely on bootstrap peers alone.
    pub tracker: Option<String>,
    /// Peers (`host:port`) to ask for more peers.
    pub bootstrap: Vec<String>,
}

/// How much to lend, chosen at first run and adjustable afterwards.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Preset {
    /// A quarter of the GPU, 256 KB/s up, 50 GB a month: unnoticeable on a home line.
    Light,
    /// Half the GPU, 1 MB/s up, 200 GB a month.
    Medium,
    /// Everything, no caps: a dedicated machine.
    Full,
}

impl Settings {
    /// These settings with `preset`'s compute and bandwidth.
    pub fn with_preset(mut self, preset: Preset) -> Self {
        let (share, up, down, cap) = match preset {
            Preset::Light => (25, 256, 1024, Some((50, 30))),
            Preset::Medium => (50, 1024, 4096, Some((200, 30))),
            Preset::Full => (100, 0, 0, None),
        };
        self.compute.gpu_share_percent = share;
        self.bandwidth = BandwidthSettings {
            upload_kbps: up,
            download_kbps: down,
            transfer_cap: cap.map(|(gigabytes, every_days)| TransferCap {
                gigabytes,
                every_days,
            }),
        };
        self
    }

    /// Checks every field; the error names the first bad one by its dotted path.
    pub fn validate(&self) -> Result<(), SettingsError> {
        let bad = |field: &str, message: &str| Err(SettingsError::invalid(field, message));
        if self.version != SETTINGS_VERSION {
            return bad("version", &format!("must be {SETTINGS_VERSION}"));
        }
        self.profile.validate()?;
        match self.layers {
            LayerChoice::Range { start, end } if start >= end => {
                return bad("layers.end", "must be greater than layers.start");
            }
            LayerChoice::Count { count: 0 } => return bad("layers.count", "must be at least 1"),
            _ => {}
        }
        let compute = &self.compute;
        if !(1..=100).contains(&compute.gpu_share_percent) {
            return bad("compute.gpu_share_percent", "must be between 1 and 100");
        }
        if compute.vram_budget_mib < 256 {
            return bad("compute.vram_budget_mib", "must be at least 256 MiB");
        }
        if compute.cpu_threads > 1024 {
            return bad(
                "compute.cpu_threads",
                "must be at most 1024 (0 for automatic)",
            );
        }
        if let Some(cap) = self.bandwidth.transfer_cap {
            if cap.gigabytes == 0 {
                return bad("bandwidth.transfer_cap.gigabytes", "must be at least 1");
            }
            if !(1..=366).contains(&cap.every_days) {
                return bad("bandwidth.transfer_cap.every_days", "must be 1 to 366 days");
            }
        }
        self.schedule.validate()?;
        self.thermal.validate()?;
        self.gaming.validate()?;
        self.storage.validate()?;
        self.network.validate()?;
        match &self.model {
            ModelChoice::Swarm { id } if !is_model_id(id) => {
                return bad("model.id", "must be a model id of 16 hex digits");
            }
            ModelChoice::Local { dir } if !dir.is_absolute() => {
                return bad("model.dir", "must be an absolute path");
            }
            _ => {}
        }
        if self.api.port == 0 {
            return bad("api.port", "must be a port from 1 to 65535");
        }
        Ok(())
    }
}

impl Profile {
    fn validate(&self) -> Result<(), SettingsError> {
        let Some(name) = &self.display_name else {
            return Ok(());
        };
        let field = "profile.display_name";
        if self.anonymous {
            return Err(SettingsError::invalid(
                field,
                "must be empty when anonymous",
            ));
        }
        if name.trim().is_empty() {
            return Err(SettingsError::invalid(field, "must not be blank"));
        }
        if name.chars().count() > MAX_DISPLAY_NAME_CHARS {
            return Err(SettingsError::invalid(
                field,
                format!("must be at most {MAX_DISPLAY_NAME_CHARS} characters"),
            ));
        }
        if name.chars().any(char::is_control) {
            return Err(SettingsError::invalid(
                field,
                "must not contain control characters",
            ));
        }
        Ok(())
    }
}

impl Schedule {
    fn validate(&self) -> Result<(), SettingsError> {
        if !(1..=1440).contains(&self.idle_minutes) {
            return Err(SettingsError::invalid(
                "schedule.idle_minutes",
                "must be 1 to 1440 minutes",
            ));
        }
        for (i, w) in self.weekly.iter().enumerate() {
            if w.start_minute >= 1440 {
                return Err(SettingsError::invalid(
                    &format!("schedule.weekly[{i}].start_minute"),
                    "must be 0 to 1439",
                ));
            }
            if w.end_minute <= w.start_minute || w.end_minute > 1440 {
                return Err(SettingsError::invalid(
                    &format!("schedule.weekly[{i}].end_minute"),
                    "must be after start_minute and at most 1440",
                ));
            }
        }
        Ok(())
    }
}

/// Whether `id` reads as a model's content id: 16 hex digits (safe as a folder name too).
pub fn is_model_id(id: &str) -> bool {
    id.len() == 16 && id.bytes().all(|b| b.is_ascii_hexdigit())
}

impl NetworkSettings {
    fn validate(&self) -> Result<(), SettingsError> {
        if let Some(url) = &self.tracker
            && let Err(e) = url.parse::<neuroshard_base::TrackerUrl>()
        {
            return Err(SettingsError::invalid("network.tracker", e.problem));
        }
        for (i, peer) in self.bootstrap.iter().enumerate() {
            if !is_host_port(peer) {
                return Err(SettingsError::invalid(
                    &format!("network.bootstrap[{i}]"),
                    "must be host:port",
                ));
            }
        }
        Ok(())
    }
}

/// Brings a settings document of an older version up to [`SETTINGS_VERSION`], step by step.
/// A file without a version predates versioning (hand-written for a headless node) and is
/// taken as version 0, whose fields are those of version 1. A newer version is refused: this
/// build would drop what it does not know.
pub fn migrate(mut doc: Value) -> Result<Value, SettingsError> {
    let object = doc
        .as_object_mut()
        .ok_or_else(|| SettingsError::invalid("settings", "must be a JSON object"))?;
    let version = match object.get("version") {
        None => 0,
        Some(v) => v
            .as_u64()
            .and_then(|v| u32::try_from(v).ok())
            .ok_or_else(|| SettingsError::invalid("version", "must be a whole number"))?,
    };
    if version > SETTINGS_VERSION {
        let problem = format!(
            "written by a newer NeuroShard (settings version {version}; this one knows up to \
             {SETTINGS_VERSION})"
        );
        return Err(SettingsError::invalid("version", problem));
    }
    // Version 0 -> 1: only the version field was added. 1 -> 2: the `thermal`, `gaming`,
    // `notifications` and `storage` sections were added, whose defaults (no limits, no
    // programs, every notification, no disk cap) fill a file without them.
    object.insert("version".into(), SETTINGS_VERSION.into());
    Ok(doc)
}

/// Turns a JSON document into settings, naming the field of a type error.
fn parse(doc: Value) -> Result<Settings, SettingsError> {
    let settings: Settings = serde_path_to_error::deserialize(doc).map_err(|e| {
        let field = e.path().to_string();
        SettingsError::Invalid {
            field: if field == "." {
                "settings".into()
            } else {
                field
            },
            message: e.into_inner().to_string(),
        }
    })?;
    settings.validate()?;
    Ok(settings)
}

/// The settings file: loaded once, updated by patches, always written whole and atomically.
#[derive(Debug)]
pub struct SettingsStore {
    path: PathBuf,
    current: Settings,
}

impl SettingsStore {
    /// `settings.json` in the OS config directory (`~/.config/neuroshard` on Linux), or in
    /// `$NEUROSHARD_CONFIG` when set.
    pub fn default_path() -> PathBuf {
        std::env::var_os("NEUROSHARD_CONFIG")
            .map(PathBuf::from)
            .or_else(|| dirs::config_dir().map(|d| d.join("neuroshard")))
            .unwrap_or_else(|| PathBuf::from(".neuroshard"))
            .join(SETTINGS_FILE)
    }

    /// Opens the settings at `path`: defaults when there is no file yet; an older file is
    /// migrated and written back. A corrupt or newer file is an error and is left as it is.
    pub fn open(path: impl Into<PathBuf>) -> Result<Self, SettingsError> {
        let path = path.into();
        let text = match std::fs::read_to_string(&path) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Ok(Self {
                    path,
                    current: Settings::default(),
                });
            }
            Err(source) => {
                return Err(SettingsError::Io {
                    context: format!("reading {}", path.display()),
                    source,
                });
            }
        };
        let unreadable = |message: String| SettingsError::Unreadable {
            path: path.clone(),
            message,
        };
        let doc: Value =
            serde_json::from_str(&text).map_err(|e| unreadable(format!("not JSON: {e}")))?;
        let was_current = doc.get("version") == Some(&Value::from(SETTINGS_VERSION));
        let current = migrate(doc)
            .and_then(parse)
            .map_err(|e| unreadable(e.to_string()))?;
        let store = Self { path, current };
        if !was_current {
            store.write(&store.current)?;
        }
        Ok(store)
    }

    /// The settings in force.
    pub fn get(&self) -> &Settings {
        &self.current
    }

    /// Where they are kept.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Applies a JSON merge patch (RFC 7386: objects merge, `null` restores a default or
    /// clears an option), validates the result, and writes it. On any error nothing changes,
    /// in memory or on disk.
    pub fn update(&mut self, patch: &Value) -> Result<&Settings, SettingsError> {
        let next = self.preview(patch)?;
        self.replace(next)
    }

    /// The settings `patch` would make, validated, without keeping them. A layer or model
    /// choice in a patch replaces the old one whole: their shapes (auto, range, count; demo,
    /// swarm, local) have different fields, which must not merge.
    pub fn preview(&self, patch: &Value) -> Result<Settings, SettingsError> {
        if !patch.is_object() {
            return Err(SettingsError::invalid(
                "settings",
                "a patch must be a JSON object",
            ));
        }
        let mut doc = serde_json::to_value(&self.current).expect("settings serialize");
        json_patch::merge(&mut doc, patch);
        for key in ["layers", "model"] {
            if let Some(choice) = patch.get(key).filter(|c| c.is_object()) {
                let mut whole = Value::Object(Default::default());
                json_patch::merge(&mut whole, choice);
                doc[key] = whole;
            }
        }
        let next = parse(doc)?;
        next.validate()?;
        Ok(next)
    }

    /// Validates and writes `settings` whole.
    pub fn replace(&mut self, settings: Settings) -> Result<&Settings, SettingsError> {
        settings.validate()?;
        self.write(&settings)?;
        self.current = settings;
        Ok(&self.current)
    }

    /// Writes to a temporary file beside the target, syncs it, then renames it over the
    /// target, so a crash leaves either the old file or the new one, never half of one.
    fn write(&self, settings: &Settings) -> Result<(), SettingsError> {
        let io = |context: &str, source| SettingsError::Io {
            context: format!("{context} {}", self.path.display()),
            source,
        };
        let dir = self.path.parent().unwrap_or(Path::new("."));
        std::fs::create_dir_all(dir).map_err(|e| io("creating the folder of", e))?;
        let mut file = tempfile::NamedTempFile::new_in(dir).map_err(|e| io("writing beside", e))?;
        serde_json::to_writer_pretty(&mut file, settings).map_err(|e| io("writing", e.into()))?;
        file.as_file().sync_all().map_err(|e| io("syncing", e))?;
        file.persist(&self.path)
            .map_err(|e| io("replacing", e.error))?;
        Ok(())
    }
}

#[cfg(test)]
mod tests;
