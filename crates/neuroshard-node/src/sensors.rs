//! What the machine's own sensors say, for the owner's rules on any node (the desktop app and
//! a headless one alike): the CPU's and the GPU's temperatures (hwmon and ACPI zones through
//! sysinfo, NVIDIA GPUs through NVML where the driver is present) and which listed programs
//! run.

use std::ffi::OsStr;
use std::path::Path;
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

use neuroshard_base::sync::LockExt;
use neuroshard_settings::policy::{Machine, Temperatures};
use std::collections::HashMap;

use sysinfo::{Components, Pid, ProcessRefreshKind, ProcessesToUpdate, System, UpdateKind};

/// The machine's sensors, read when asked. A server has no idle time or battery to read.
#[derive(Debug, Default)]
pub struct SystemSensors {
    components: Mutex<Option<Components>>,
    processes: Mutex<Option<System>>,
    /// NVML, once loaded; none where no NVIDIA driver is.
    nvml: OnceLock<Option<nvml_wrapper::Nvml>>,
}

/// What a temperature sensor measures, by its label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SensorKind {
    /// A CPU package, die or core.
    Cpu,
    /// A GPU.
    Gpu,
}

/// What the sensor labelled `label` (hwmon's chip and sensor names, as sysinfo joins them)
/// measures; none for a disk, a board, the chipset or a wireless card.
pub fn sensor_kind(label: &str) -> Option<SensorKind> {
    let label = label.to_ascii_lowercase();
    let any = |words: &[&str]| words.iter().any(|w| label.contains(w));
    if any(&["amdgpu", "radeon", "nouveau", "nvidia", "gpu"]) {
        Some(SensorKind::Gpu)
    } else if any(&[
        "coretemp",
        "k10temp",
        "zenpower",
        "cpu",
        "package id",
        "tctl",
        "tdie",
    ]) {
        Some(SensorKind::Cpu)
    } else {
        None
    }
}

/// The hottest CPU and GPU readings among `(label, °C)` pairs.
pub fn hottest<'a>(readings: impl IntoIterator<Item = (&'a str, f32)>) -> Temperatures {
    let mut out = Temperatures::default();
    for (label, c) in readings {
        let slot = match sensor_kind(label) {
            Some(SensorKind::Cpu) => &mut out.cpu_c,
            Some(SensorKind::Gpu) => &mut out.gpu_c,
            None => continue,
        };
        if c.is_finite() && slot.is_none_or(|hot| c > hot) {
            *slot = Some(c);
        }
    }
    out
}

/// Whether the process named `name` (Linux keeps 15 characters of it) running `exe` is the
/// program `listed`, without regard to case.
pub fn same_program(listed: &str, name: &OsStr, exe: Option<&Path>) -> bool {
    let name = name.to_string_lossy();
    let by_exe = exe
        .and_then(Path::file_name)
        .is_some_and(|f| f.to_string_lossy().eq_ignore_ascii_case(listed));
    let truncated = name.len() == 15 && listed.len() > 15 && listed.is_char_boundary(15);
    by_exe
        || name.eq_ignore_ascii_case(listed)
        || (truncated && name.eq_ignore_ascii_case(&listed[..15]))
}

impl SystemSensors {
    /// Sensors read on first use.
    pub fn new() -> Self {
        Self::default()
    }

    /// The hottest CPU and GPU sensors now.
    pub fn temperatures(&self) -> Temperatures {
        let mut components = self.components.lock_or_recover();
        let components = match components.as_mut() {
            Some(c) => {
                c.refresh(true);
                c
            }
            None => components.insert(Components::new_with_refreshed_list()),
        };
        let labelled = components
            .iter()
            .filter_map(|c| Some((c.label(), c.temperature()?)));
        let mut out = hottest(labelled);
        if let Some(nvidia) = self.nvidia() {
            out.gpu_c = Some(out.gpu_c.map_or(nvidia, |c| c.max(nvidia)));
        }
        out
    }

    /// The hottest NVIDIA GPU, where NVML loads.
    fn nvidia(&self) -> Option<f32> {
        let nvml = self
            .nvml
            .get_or_init(|| nvml_wrapper::Nvml::init().ok())
            .as_ref()?;
        let sensor = nvml_wrapper::enum_wrappers::device::TemperatureSensor::Gpu;
        (0..nvml.device_count().ok()?)
            .filter_map(|i| nvml.device_by_index(i).ok()?.temperature(sensor).ok())
            .max()
            .map(|c| c as f32)
    }

    /// Which of `names` run now, as `names` spells them.
    pub fn running(&self, names: &[String]) -> Vec<String> {
        self.with_processes(|processes| {
            names
                .iter()
                .filter(|listed| {
                    processes
                        .values()
                        .any(|p| same_program(listed, p.name(), p.exe()))
                })
                .cloned()
                .collect()
        })
    }

    /// The executable names of the programs running now, sorted, each once: processes with
    /// an executable (not kernel threads, nor the threads of a process).
    pub fn programs(&self) -> Vec<String> {
        let names = self.with_processes(|processes| {
            processes
                .values()
                .filter(|p| p.thread_kind().is_none())
                .filter_map(|p| p.exe()?.file_name())
                .map(|f| f.to_string_lossy().into_owned())
                .collect::<std::collections::BTreeSet<_>>()
        });
        names.into_iter().filter(|n| !n.is_empty()).collect()
    }

    /// `f` of the processes as they are now.
    fn with_processes<T>(&self, f: impl FnOnce(&HashMap<Pid, sysinfo::Process>) -> T) -> T {
        let mut system = self.processes.lock_or_recover();
        let system = system.get_or_insert_with(System::new);
        let kind = ProcessRefreshKind::nothing().with_exe(UpdateKind::OnlyIfNotSet);
        system.refresh_processes_specifics(ProcessesToUpdate::All, true, kind);
        f(system.processes())
    }
}

impl Machine for SystemSensors {
    fn idle(&self) -> Option<Duration> {
        None
    }

    fn on_battery(&self) -> Option<bool> {
        None
    }

    fn temperatures(&self) -> Temperatures {
        SystemSensors::temperatures(self)
    }

    fn running(&self, names: &[String]) -> Option<Vec<String>> {
        Some(SystemSensors::running(self, names))
    }

    fn programs(&self) -> Vec<String> {
        SystemSensors::programs(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sensors_are_told_apart_by_their_labels_and_the_hottest_counts() {
        let readings = [
            ("coretemp Package id 0", 61.0),
            ("coretemp Core 3", 66.0),
            ("amdgpu edge", 55.0),
            ("nvme Composite", 80.0),
            ("acpitz temp1", 90.0),
            ("k10temp Tctl", f32::NAN),
        ];
        let t = hottest(readings);
        assert_eq!((t.cpu_c, t.gpu_c), (Some(66.0), Some(55.0)));
        assert_eq!(
            hottest([("iwlwifi_1 temp1", 40.0)]),
            Temperatures::default()
        );
    }

    #[test]
    fn a_program_is_found_by_its_executable_or_its_truncated_name() {
        let exe = Path::new("/opt/games/Game.exe");
        assert!(same_program("game.exe", OsStr::new("x"), Some(exe)));
        assert!(same_program("Steam", OsStr::new("steam"), None));
        assert!(same_program(
            "EpicGamesLauncher.exe",
            OsStr::new("EpicGamesLaunch"),
            None
        ));
        assert!(!same_program("steam", OsStr::new("steamwebhelper"), None));
        assert!(!same_program(
            "EpicGames",
            OsStr::new("EpicGamesLaunch"),
            None
        ));
    }

    /// A process started under a listed name is found while it runs and not after.
    #[test]
    fn a_running_program_is_listed_while_it_runs() {
        let dir = tempfile::tempdir().unwrap();
        let game = dir.path().join("ns-test-game");
        std::fs::copy("/bin/sleep", &game).unwrap();
        let sensors = SystemSensors::new();
        let names = vec!["NS-TEST-GAME".to_string(), "not-running-here".to_string()];
        assert!(sensors.running(&names).is_empty());
        let mut child = std::process::Command::new(&game).arg("30").spawn().unwrap();
        let found = sensors.running(&names);
        let listed = sensors.programs();
        child.kill().unwrap();
        child.wait().unwrap();
        assert_eq!(found, vec!["NS-TEST-GAME".to_string()]);
        assert!(listed.contains(&"ns-test-game".to_string()), "{listed:?}");
        assert!(sensors.running(&names).is_empty());
    }
}
