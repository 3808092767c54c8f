//! Settings that put the machine and its owner first: a temperature limit for the CPU and the
//! GPU, holding the node while listed programs (games, their launchers) or any full-screen
//! program run, and which desktop notifications to show. The rules over them are in
//! [`crate::policy`].

use serde::{Deserialize, Serialize};

use crate::{Preset, SettingsError};

/// Lowest limit a person may set, in °C: below it an idle machine would hold.
pub const MIN_LIMIT_C: u8 = 40;
/// Highest limit, in °C: past it the hardware throttles or shuts down by itself.
pub const MAX_LIMIT_C: u8 = 105;
/// Degrees below its limit a sensor must fall before a held node serves again.
pub const HYSTERESIS_C: f32 = 5.0;
/// Programs a list may name.
pub const MAX_PROGRAMS: usize = 100;
/// Characters a program's name may have.
pub const MAX_PROGRAM_CHARS: usize = 64;

/// Game launchers and runners a person may add with one click (offered, never set by default):
/// their executable names as the OS lists their processes.
pub const GAME_LAUNCHERS: &[&str] = &[
    "steam",
    "gamescope",
    "lutris",
    "heroic",
    "bottles",
    "EpicGamesLauncher.exe",
    "Battle.net.exe",
    "GalaxyClient.exe",
    "EADesktop.exe",
    "upc.exe",
];

/// Temperature limits: above one, the node drains and holds until the sensor has fallen
/// [`HYSTERESIS_C`] below it and the node has held at least `min_hold_secs`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ThermalSettings {
    /// Hottest the CPU may run, in °C; none for no limit. Default none.
    pub cpu_limit_c: Option<u8>,
    /// Hottest the GPU may run, in °C; none for no limit. Default none.
    pub gpu_limit_c: Option<u8>,
    /// Shortest hold, in seconds, so a node does not flap at the limit. Default 120.
    pub min_hold_secs: u32,
}

impl Default for ThermalSettings {
    fn default() -> Self {
        Self {
            cpu_limit_c: None,
            gpu_limit_c: None,
            min_hold_secs: 120,
        }
    }
}

/// Limits a preset suggests on the settings page, in °C (CPU, GPU): a lighter preset keeps
/// the machine cooler and quieter. Limits stay off until the owner sets them.
pub fn suggested_limits(preset: Preset) -> (u8, u8) {
    match preset {
        Preset::Light => (75, 70),
        Preset::Medium => (85, 80),
        Preset::Full => (95, 87),
    }
}

/// Programs whose running holds the node: games, whatever wants the whole machine.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct GamingSettings {
    /// Executable names (`steam`, `Game.exe`), matched without regard to case; while one runs
    /// the node holds. Default none.
    pub programs: Vec<String>,
    /// Hold while any program is full screen, where the desktop can tell. Default false.
    pub hold_when_fullscreen: bool,
}

/// Disk the app may keep for models fetched from peers and the receipt ledger.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct StorageSettings {
    /// Most MiB to keep; none for no cap. Default none. A fetch that needs room removes the
    /// models used longest ago first, never one in use.
    pub cap_mib: Option<u64>,
}

/// Smallest disk cap, in MiB: the ledger and a small model's files.
pub const MIN_DISK_CAP_MIB: u64 = 256;

impl StorageSettings {
    /// The cap in bytes; none for no cap.
    pub fn cap_bytes(&self) -> Option<u64> {
        self.cap_mib.map(|mib| mib.saturating_mul(1 << 20))
    }

    pub(crate) fn validate(&self) -> Result<(), SettingsError> {
        match self.cap_mib {
            Some(cap) if cap < MIN_DISK_CAP_MIB => Err(SettingsError::invalid(
                "storage.cap_mib",
                format!("must be at least {MIN_DISK_CAP_MIB} MiB, or none"),
            )),
            _ => Ok(()),
        }
    }
}

/// Desktop notifications, each of which the owner can turn off. All on by default.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct NotificationSettings {
    /// When the node is held because a sensor is over its limit.
    pub temperature: bool,
    /// When a model's layers have finished downloading from peers.
    pub layers_fetched: bool,
    /// When a requester verifies this node's first receipt.
    pub first_receipt: bool,
    /// When the way peers reach this node changes.
    pub reachability: bool,
}

impl Default for NotificationSettings {
    fn default() -> Self {
        Self {
            temperature: true,
            layers_fetched: true,
            first_receipt: true,
            reachability: true,
        }
    }
}

impl ThermalSettings {
    pub(crate) fn validate(&self) -> Result<(), SettingsError> {
        let limits = [
            ("thermal.cpu_limit_c", self.cpu_limit_c),
            ("thermal.gpu_limit_c", self.gpu_limit_c),
        ];
        for (field, limit) in limits {
            if let Some(c) = limit
                && !(MIN_LIMIT_C..=MAX_LIMIT_C).contains(&c)
            {
                let problem = format!("must be {MIN_LIMIT_C} to {MAX_LIMIT_C} °C, or none");
                return Err(SettingsError::invalid(field, problem));
            }
        }
        if self.min_hold_secs > 3600 {
            let problem = "must be at most 3600 seconds";
            return Err(SettingsError::invalid("thermal.min_hold_secs", problem));
        }
        Ok(())
    }
}

impl GamingSettings {
    pub(crate) fn validate(&self) -> Result<(), SettingsError> {
        if self.programs.len() > MAX_PROGRAMS {
            let problem = format!("must name at most {MAX_PROGRAMS} programs");
            return Err(SettingsError::invalid("gaming.programs", problem));
        }
        for (i, name) in self.programs.iter().enumerate() {
            let field = format!("gaming.programs[{i}]");
            let problem = if name.trim().is_empty() {
                "must not be blank".to_string()
            } else if name.chars().count() > MAX_PROGRAM_CHARS {
                format!("must be at most {MAX_PROGRAM_CHARS} characters")
            } else if name.contains(['/', '\\']) || name.chars().any(char::is_control) {
                "must be a program's name, not a path".to_string()
            } else {
                continue;
            };
            return Err(SettingsError::invalid(&field, problem));
        }
        Ok(())
    }
}
