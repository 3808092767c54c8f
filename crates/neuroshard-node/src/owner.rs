//! The owner's settings applied to a running node, the same way for the desktop app and for a
//! headless node (`neuroshard node --settings FILE`): the transfer meter, the transfer cap, and
//! the rules (pause, snooze, battery, idle time, weekly schedule) that hold the node back.
//!
//! The rules are pure functions in `neuroshard_settings::policy`; this module reads the node's
//! byte counter, keeps the meter, and pauses or resumes the node as they decide.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use neuroshard_settings::meter::{self, Period, Usage};
use neuroshard_settings::policy::{self, Decision, Holds, Machine};
use neuroshard_settings::{Settings, SettingsStore};
use tokio_util::sync::CancellationToken;

use crate::lifecycle::RunState;
use crate::node::NodeHandle;

/// What the rules decided at one tick.
#[derive(Debug, Clone, PartialEq)]
pub struct Verdict {
    /// Whether the node may serve, or why not.
    pub decision: Decision,
    /// The reason, in words, where there is one ("on battery power").
    pub detail: Option<String>,
    /// The transfer-cap period as metered.
    pub period: Period,
}

/// The owner's side of a node: its transfer meter (kept in the data dir across restarts).
#[derive(Debug)]
pub struct Owner {
    usage: Usage,
    data_dir: PathBuf,
}

impl Owner {
    /// The meter saved in `data_dir`, or a fresh one.
    pub fn load(data_dir: &Path) -> Self {
        Self {
            usage: Usage::load(data_dir),
            data_dir: data_dir.to_path_buf(),
        }
    }

    /// Saves the meter now (at shutdown; ticks save it every 10 s).
    pub fn save(&self) {
        self.usage.save(&self.data_dir);
    }

    /// Meters the bytes `node` moved, sets its transfer budget so the node itself refuses new
    /// work once the period's cap is used up (even between two ticks), decides what the rules
    /// want at `now`, and pauses or resumes the node accordingly. A node that is draining or
    /// stopped is left as it is.
    pub fn tick(
        &mut self,
        node: &NodeHandle,
        settings: &Settings,
        holds: &mut Holds,
        machine: &dyn Machine,
        now: u64,
    ) -> Verdict {
        // The transport's own count: every byte of every connection, not only Forward payloads.
        let moved = node.transport_bytes();
        let (period, save) = meter::sample(&mut self.usage, settings, moved, now);
        if save {
            self.usage.save(&self.data_dir);
        }
        node.set_transfer_budget(period.budget(moved));
        let (decision, detail) =
            off_the_workers(|| policy::decide(settings, holds, machine, &period, now));
        let want = decision == Decision::Serving;
        // Read, then act: the watch's lock is not held while pausing writes to it.
        let state = node.status().borrow().state;
        match state {
            RunState::Serving if !want => node.pause(),
            RunState::Paused if want => node.resume(),
            _ => {}
        }
        Verdict {
            decision,
            detail,
            period,
        }
    }
}

/// Runs `f`, which reads the machine (sensor files, the process list, an X server's replies),
/// after telling a multi-threaded tokio runtime to hand this worker's other tasks to another,
/// so a slow read holds up no one else's task. Elsewhere (a current-thread runtime, a blocking
/// thread, no runtime) it runs `f` as it is.
fn off_the_workers<T>(f: impl FnOnce() -> T) -> T {
    use tokio::runtime::{Handle, RuntimeFlavor};
    match Handle::try_current() {
        Ok(handle) if handle.runtime_flavor() == RuntimeFlavor::MultiThread => {
            tokio::task::block_in_place(f)
        }
        _ => f(),
    }
}

/// How often a headless node reads its settings file and applies the rules.
pub const HEADLESS_TICK: Duration = Duration::from_secs(5);

/// Keeps a headless node to the settings in `path` until `cancel` fires: applies the caps,
/// compute share and threads and the display name whenever the file changes (a file that
/// fails to read or validate is reported by field and the last good settings stay), and every
/// `every` ([`HEADLESS_TICK`] for `neuroshard node`) meters the transfer cap and applies the
/// weekly schedule. Writing the file
/// is the owner's consent, so the first-run step of the app does not apply. A server has no
/// battery or idle sensors: rules on them hold the node back and say why.
pub async fn follow_settings_file(
    node: Arc<NodeHandle>,
    path: PathBuf,
    data_dir: PathBuf,
    machine: Box<dyn Machine>,
    every: Duration,
    cancel: CancellationToken,
) {
    let mut owner = Owner::load(&data_dir);
    let mut holds = Holds::default();
    let mut applied: Option<Settings> = None;
    let mut last = None;
    loop {
        match read_settings(&path) {
            Ok(settings) if applied.as_ref() != Some(&settings) => {
                node.apply_settings(&settings);
                tracing::info!("applied the settings in {}", path.display());
                applied = Some(settings);
            }
            Ok(_) => {}
            Err(e) => tracing::warn!("{}: {e}; keeping the settings as they were", path.display()),
        }
        if let Some(settings) = &applied {
            let verdict = owner.tick(
                &node,
                settings,
                &mut holds,
                machine.as_ref(),
                neuroshard_net::now_ms(),
            );
            let said = (verdict.decision, verdict.detail.clone());
            if last.as_ref() != Some(&said) {
                match &verdict.detail {
                    Some(why) => tracing::info!("owner's rules: {:?} ({why})", verdict.decision),
                    None => tracing::info!("owner's rules: {:?}", verdict.decision),
                }
                last = Some(said);
            }
        }
        tokio::select! {
            _ = cancel.cancelled() => break,
            _ = tokio::time::sleep(every) => {}
        }
    }
    owner.save();
}

/// The settings in `path`, validated, with the first-run step counted as done.
pub fn read_settings(path: &Path) -> Result<Settings, neuroshard_settings::SettingsError> {
    if let Err(source) = std::fs::metadata(path) {
        return Err(neuroshard_settings::SettingsError::Io {
            context: format!("reading {}", path.display()),
            source,
        });
    }
    let store = SettingsStore::open(path)?;
    let mut settings = store.get().clone();
    settings.profile.onboarded = true;
    Ok(settings)
}
