//! Where the app keeps things and how its node listens (from the environment), and the
//! machine's sensors the owner's rules read.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use neuroshard_base::Invalid;
use neuroshard_discovery::LanConfig;
use neuroshard_node::sensors::SystemSensors;
use neuroshard_settings::SettingsStore;
use neuroshard_settings::policy::{Machine, Temperatures};

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
    pub fn from_env() -> Result<Self, Invalid> {
        let var = |name: &str| std::env::var_os(name).filter(|v| !v.is_empty());
        let data_dir = neuroshard_node::identity::default_data_dir();
        let listen = match var("NEUROSHARD_LISTEN") {
            Some(v) => v.to_string_lossy().parse().map_err(|e| {
                let problem = format!("{v:?} is not an address such as 127.0.0.1:7420: {e}");
                Invalid::new("NEUROSHARD_LISTEN", problem)
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
                    let problem = format!("{other:?} is not one of on, off or loopback");
                    return Err(Invalid::new("NEUROSHARD_LAN", problem));
                }
            },
        })
    }
}

/// The real machine: the X server's screen-saver idle time (user-idle) and active window
/// (x11rb), the batteries the OS reports (starship-battery), and the temperatures and programs
/// a node reads anywhere.
#[derive(Debug, Default)]
pub struct SystemMachine {
    sensors: SystemSensors,
    full_screen: crate::fullscreen::FullScreen,
}

impl Machine for SystemMachine {
    fn fullscreen(&self) -> Option<bool> {
        self.full_screen.now()
    }

    fn temperatures(&self) -> Temperatures {
        self.sensors.temperatures()
    }

    fn running(&self, names: &[String]) -> Option<Vec<String>> {
        Some(self.sensors.running(names))
    }

    fn programs(&self) -> Vec<String> {
        self.sensors.programs()
    }

    fn idle(&self) -> Option<Duration> {
        user_idle::UserIdle::get_time().ok().map(|t| t.duration())
    }

    fn on_battery(&self) -> Option<bool> {
        let manager = starship_battery::Manager::new().ok()?;
        let mut batteries = manager.batteries().ok()?;
        Some(batteries.any(|b| b.is_ok_and(|b| b.state() == starship_battery::State::Discharging)))
    }
}
