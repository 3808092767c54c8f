//! The Tauri shell: one instance, the main window that closes to the tray, the tray menu, and
//! the status pushed to the page and the tray as it changes.

use std::sync::Arc;

use tauri::image::Image;
use tauri::menu::{IsMenuItem, Menu, MenuEvent, MenuItem, PredefinedMenuItem, Submenu};
use tauri::tray::{TrayIcon, TrayIconBuilder};
use tauri::{AppHandle, Emitter, Manager, RunEvent, Runtime, WindowEvent};

use crate::desktop::{Desktop, Launch, Snooze};
use crate::status::DesktopStatus;
use crate::tray;

/// The event carrying [`DesktopStatus`] to the page.
pub const STATUS_EVENT: &str = "status";
/// The event asking the page to show a screen (`dashboard`, `settings`, `receipts`).
pub const NAVIGATE_EVENT: &str = "navigate";

/// Turns launch at login on or off, where the autostart plugin is loaded (not in tests).
pub fn apply_launch_at_login<R: Runtime>(app: &AppHandle<R>, on: bool) {
    let Some(autostart) = app.try_state::<tauri_plugin_autostart::AutoLaunchManager>() else {
        return;
    };
    let result = if on {
        autostart.enable()
    } else {
        autostart.disable()
    };
    if let Err(e) = result {
        tracing::warn!("launch at login: {e}");
    }
}

/// Shows the main window and asks the page for `screen`.
fn open<R: Runtime>(app: &AppHandle<R>, screen: &str) {
    if let Some(window) = app.get_webview_window("main") {
        let _ = window.show();
        let _ = window.unminimize();
        let _ = window.set_focus();
    }
    let _ = app.emit(NAVIGATE_EVENT, screen);
}

/// The tray's menu items whose text or state follows the status.
struct TrayItems<R: Runtime> {
    icon: TrayIcon<R>,
    status: MenuItem<R>,
    toggle: MenuItem<R>,
    drain: MenuItem<R>,
    snooze: Submenu<R>,
    /// What the tray shows now; a status that changes nothing it shows redraws nothing.
    shown: Option<tray::TrayView>,
}

impl<R: Runtime> TrayItems<R> {
    fn show(&mut self, status: &DesktopStatus) {
        let view = tray::view(status);
        if self.shown.as_ref() == Some(&view) {
            return;
        }
        let _ = self.status.set_text(&view.status_line);
        let _ = self.toggle.set_text(view.toggle_label);
        let _ = self.toggle.set_enabled(view.toggle_enabled);
        let _ = self.drain.set_enabled(view.drain_enabled);
        let _ = self.snooze.set_enabled(view.snooze_enabled);
        let _ = self.icon.set_tooltip(Some(&view.status_line));
        if self.shown.as_ref().map(|v| v.icon) != Some(view.icon)
            && let Ok(image) = Image::from_bytes(view.icon.png())
        {
            let _ = self.icon.set_icon(Some(image));
        }
        self.shown = Some(view);
    }
}

fn build_tray<R: Runtime>(app: &AppHandle<R>) -> tauri::Result<TrayItems<R>> {
    let item = |id: &str, text: &str| MenuItem::with_id(app, id, text, true, None::<&str>);
    let status = MenuItem::with_id(app, "status", "Starting the node…", false, None::<&str>)?;
    let toggle = item("toggle", "Pause now")?;
    let drain = item("drain", "Finish current requests, then pause")?;
    let snooze = Submenu::with_id_and_items(
        app,
        "snooze",
        "Snooze",
        true,
        &[
            &item("snooze_1h", "For 1 hour")?,
            &item("snooze_3h", "For 3 hours")?,
            &item("snooze_tomorrow", "Until tomorrow")?,
        ],
    )?;
    let separator = || PredefinedMenuItem::separator(app);
    let entries: [&dyn IsMenuItem<R>; 11] = [
        &status,
        &separator()?,
        &toggle,
        &drain,
        &snooze,
        &separator()?,
        &item("dashboard", "Open dashboard")?,
        &item("settings", "Settings…")?,
        &item("receipts", "Receipts")?,
        &separator()?,
        &item("quit", "Quit NeuroShard")?,
    ];
    let menu = Menu::with_items(app, &entries)?;
    let icon = TrayIconBuilder::with_id("main")
        .icon(Image::from_bytes(tray::TrayIcon::Offline.png())?)
        .tooltip("NeuroShard")
        .menu(&menu)
        .show_menu_on_left_click(true)
        .on_menu_event(on_menu)
        .build(app)?;
    Ok(TrayItems {
        icon,
        status,
        toggle,
        drain,
        snooze,
        shown: None,
    })
}

fn on_menu<R: Runtime>(app: &AppHandle<R>, event: MenuEvent) {
    let desktop = app.state::<Arc<Desktop>>().inner().clone();
    let now = neuroshard_net::now_ms();
    match event.id().as_ref() {
        "toggle" => {
            let paused = tray::view(&desktop.watch().borrow()).toggle_label == "Pause now";
            tauri::async_runtime::spawn(async move { desktop.set_paused(paused).await });
        }
        "drain" => {
            tauri::async_runtime::spawn(async move { desktop.drain().await });
        }
        id @ ("snooze_1h" | "snooze_3h" | "snooze_tomorrow") => {
            let length = match id {
                "snooze_1h" => Snooze::OneHour,
                "snooze_3h" => Snooze::ThreeHours,
                _ => Snooze::Tomorrow,
            };
            tauri::async_runtime::spawn(async move { desktop.snooze(length, now).await });
        }
        screen @ ("dashboard" | "settings" | "receipts") => open(app, screen),
        "quit" => app.exit(0),
        _ => {}
    }
}

/// Pushes every status change to the page and the tray.
fn forward_status<R: Runtime>(app: AppHandle<R>, desktop: &Desktop, mut items: TrayItems<R>) {
    let mut watch = desktop.watch();
    tauri::async_runtime::spawn(async move {
        loop {
            let status = watch.borrow_and_update().clone();
            items.show(&status);
            let _ = app.emit(STATUS_EVENT, &status);
            if watch.changed().await.is_err() {
                return;
            }
        }
    });
}

/// Shows the notices the owner wants as desktop notifications, as they come.
fn show_notices<R: Runtime>(app: AppHandle<R>, desktop: &Desktop) {
    use tauri_plugin_notification::NotificationExt;
    let mut notices = desktop.notices();
    tauri::async_runtime::spawn(async move {
        loop {
            match notices.recv().await {
                Ok(notice) => {
                    let shown = app
                        .notification()
                        .builder()
                        .title(&notice.title)
                        .body(&notice.body)
                        .show();
                    if let Err(e) = shown {
                        tracing::warn!("a notification could not be shown: {e}");
                    }
                }
                Err(tokio::sync::broadcast::error::RecvError::Lagged(missed)) => {
                    tracing::warn!("{missed} notifications were dropped");
                }
                Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
            }
        }
    });
}

/// Runs the desktop app until the owner quits.
pub fn run() {
    init_logging();
    let launch = match Launch::from_env() {
        Ok(launch) => launch,
        Err(e) => {
            eprintln!("neuroshard-desktop: {e}");
            std::process::exit(2);
        }
    };
    // One runtime for the node and for Tauri, alive until the process ends.
    let runtime: &'static tokio::runtime::Runtime = Box::leak(Box::new(
        tokio::runtime::Runtime::new().expect("starting the async runtime"),
    ));
    tauri::async_runtime::set(runtime.handle().clone());
    let _entered = runtime.enter();
    let desktop = match runtime.block_on(Desktop::open(launch)) {
        Ok(desktop) => desktop,
        Err(e) => {
            eprintln!("neuroshard-desktop: {}", e.message);
            std::process::exit(1);
        }
    };
    let app = build_app(&desktop);
    app.run(move |_app, event| {
        if let RunEvent::Exit = event {
            runtime.block_on(desktop.shutdown());
        }
    });
}

/// Logs to stderr, filtered by `RUST_LOG` or else at info with the webview's chatter quieted.
fn init_logging() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "info,tao=warn,wry=warn".into()),
        )
        .init();
}

/// The app: one instance, launch at login, notifications, the commands, and the main window
/// that closes to the tray.
fn build_app(desktop: &Arc<Desktop>) -> tauri::App {
    tauri::Builder::default()
        .plugin(tauri_plugin_single_instance::init(|app, _argv, _cwd| {
            open(app, "dashboard");
        }))
        .plugin(tauri_plugin_autostart::init(
            tauri_plugin_autostart::MacosLauncher::LaunchAgent,
            None,
        ))
        .plugin(tauri_plugin_notification::init())
        .manage(desktop.clone())
        .invoke_handler(crate::commands::handler())
        .setup({
            let desktop = desktop.clone();
            move |app| set_up(app.handle(), &desktop)
        })
        .on_window_event(close_to_tray)
        .build(tauri::generate_context!())
        .expect("building the app from tauri.conf.json")
}

/// Once the app is up: the tray and the status pushed to it, launch at login as set, the
/// ticker, and the node starting in the background.
fn set_up(app: &AppHandle, desktop: &Arc<Desktop>) -> Result<(), Box<dyn std::error::Error>> {
    let handle = app.clone();
    let items = build_tray(&handle)?;
    forward_status(handle.clone(), desktop, items);
    show_notices(handle.clone(), desktop);
    apply_launch_at_login(&handle, desktop.settings().profile.launch_at_login);
    desktop.spawn_ticker();
    let starting = desktop.clone();
    tauri::async_runtime::spawn(async move {
        if let Err(e) = starting.start_node().await {
            tracing::error!("the node did not start: {}", e.message);
        }
    });
    Ok(())
}

/// Closing the window hides it to the tray; the first time ever, a notice says the node is
/// still running.
fn close_to_tray(window: &tauri::Window, event: &WindowEvent) {
    if let WindowEvent::CloseRequested { api, .. } = event {
        api.prevent_close();
        let _ = window.hide();
        let desktop = window.state::<Arc<Desktop>>();
        if desktop.first_close() {
            use tauri_plugin_notification::NotificationExt;
            let _ = window
                .notification()
                .builder()
                .title("NeuroShard is still running")
                .body("It keeps serving from the tray. Use the tray menu to pause or quit.")
                .show();
        }
    }
}
