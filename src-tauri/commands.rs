//! The commands the front end invokes: thin over [`Desktop`]. Every failure reaches the page
//! as `{code, message, field}`.

use std::path::PathBuf;
use std::sync::Arc;

use neuroshard_proof::ledger::SeriesPoint;
use neuroshard_settings::{LayerChoice, Preset, Settings};
use serde_json::Value;
use tauri::ipc::Channel;
use tauri::{Runtime, State};

use crate::chat::ChatEvent;
use crate::desktop::{CommandError, Desktop, PeriodTotals, ReceiptPage, Snooze};
use crate::layers::LayerPlan;
use crate::models::SwarmModel;
use crate::status::DesktopStatus;

type Core<'a> = State<'a, Arc<Desktop>>;
type Reply<T> = Result<T, CommandError>;

/// The status now.
#[tauri::command]
pub async fn get_status(core: Core<'_>) -> Reply<DesktopStatus> {
    Ok(core.refresh().await)
}

/// The settings in force.
#[tauri::command]
pub fn get_settings(core: Core<'_>) -> Settings {
    core.settings()
}

/// Applies a JSON merge patch to the settings; a bad value names its field and changes
/// nothing. Launch at login follows `profile.launch_at_login`.
#[tauri::command]
pub async fn update_settings<R: Runtime>(
    app: tauri::AppHandle<R>,
    core: Core<'_>,
    patch: Value,
) -> Reply<Settings> {
    let settings = core.inner().update_settings(&patch).await?;
    crate::shell::apply_launch_at_login(&app, settings.profile.launch_at_login);
    Ok(settings)
}

/// The first run's choices; the node starts serving.
#[tauri::command]
pub async fn finish_first_run(
    core: Core<'_>,
    display_name: Option<String>,
    anonymous: bool,
    preset: Preset,
) -> Reply<Settings> {
    core.inner()
        .finish_first_run(display_name, anonymous, preset)
        .await
}

/// The range and memory a layer choice would take, before it is applied.
#[tauri::command]
pub async fn plan_layers(core: Core<'_>, choice: LayerChoice) -> Reply<LayerPlan> {
    core.plan_layers(choice).await
}

/// The disk the app keeps (fetched models, the ledger) against the owner's cap.
#[tauri::command]
pub fn storage_usage(core: Core<'_>) -> crate::storage::Usage {
    core.storage_usage()
}

/// What the settings page offers for the rules that hold the node: the programs running now,
/// the common game launchers, and each preset's suggested temperature limits.
#[tauri::command]
pub fn program_choices(core: Core<'_>) -> ProgramChoices {
    use neuroshard_settings::{Preset, care};
    ProgramChoices {
        running: core.running_programs(),
        launchers: care::GAME_LAUNCHERS.iter().map(|l| l.to_string()).collect(),
        suggested_limits: [Preset::Light, Preset::Medium, Preset::Full]
            .map(|p| (p, care::suggested_limits(p)))
            .to_vec(),
    }
}

/// What an owner may pick from to hold the node.
#[derive(Debug, serde::Serialize)]
pub struct ProgramChoices {
    /// Programs running now, sorted.
    pub running: Vec<String>,
    /// Game launchers, offered rather than set.
    pub launchers: Vec<String>,
    /// Each preset's suggested limits, °C (CPU, GPU).
    pub suggested_limits: Vec<(neuroshard_settings::Preset, (u8, u8))>,
}

/// Pauses now or resumes.
#[tauri::command]
pub async fn set_paused(core: Core<'_>, paused: bool) -> Reply<DesktopStatus> {
    Ok(core.set_paused(paused).await)
}

/// Finishes the calls in flight, then pauses.
#[tauri::command]
pub async fn drain(core: Core<'_>) -> Reply<DesktopStatus> {
    Ok(core.inner().drain().await)
}

/// Pauses for a while.
#[tauri::command]
pub async fn snooze(core: Core<'_>, length: Snooze) -> Reply<DesktopStatus> {
    Ok(core.snooze(length, neuroshard_net::now_ms()).await)
}

/// A page of receipts, newest first.
#[tauri::command]
pub async fn receipts(
    core: Core<'_>,
    status: Option<String>,
    page: u32,
    per_page: u32,
) -> Reply<ReceiptPage> {
    core.receipts(status.as_deref(), page, per_page).await
}

/// Verified totals: today, 7 days, ever.
#[tauri::command]
pub async fn receipt_totals(core: Core<'_>) -> Reply<PeriodTotals> {
    core.totals(neuroshard_net::now_ms()).await
}

/// Throughput and credit over `24h` or `7d`.
#[tauri::command]
pub async fn series(core: Core<'_>, range: String) -> Reply<Vec<SeriesPoint>> {
    core.series(&range, neuroshard_net::now_ms()).await
}

/// Writes every receipt as CSV (into `dir`, else Downloads); returns the file's path.
#[tauri::command]
pub async fn export_receipts(core: Core<'_>, dir: Option<PathBuf>) -> Reply<String> {
    let path = core.export_csv(dir, neuroshard_net::now_ms()).await?;
    Ok(path.display().to_string())
}

/// The models the swarm announces, with how many providers each layer has.
#[tauri::command]
pub async fn swarm_models(core: Core<'_>) -> Reply<Vec<SwarmModel>> {
    Ok(core.swarm_models().await)
}

/// Writes the answer to an OpenAI chat completion `request` (its `model`: a swarm model's
/// id), sending its pieces over `on_event` as they come; resolves when it ends.
#[tauri::command]
pub async fn chat(
    core: Core<'_>,
    id: String,
    request: Value,
    on_event: Channel<ChatEvent>,
) -> Reply<()> {
    core.run_chat(&id, &request, |event| on_event.send(event).is_ok())
        .await
}

/// Stops the answer `id` is writing.
#[tauri::command]
pub fn stop_chat(core: Core<'_>, id: String) -> bool {
    core.stop_chat(&id)
}

/// The handler for every command, for the app and for the tests' mock runtime.
pub fn handler<R: Runtime>() -> impl Fn(tauri::ipc::Invoke<R>) -> bool + Send + Sync + 'static {
    tauri::generate_handler![
        get_status,
        get_settings,
        update_settings,
        finish_first_run,
        plan_layers,
        program_choices,
        storage_usage,
        set_paused,
        drain,
        snooze,
        receipts,
        receipt_totals,
        series,
        export_receipts,
        swarm_models,
        chat,
        stop_chat,
    ]
}
