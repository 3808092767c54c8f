//! The tray: what it says and which icon it shows, as pure functions of the status, and the
//! menu that carries every action (Linux trays send no click events, so there is nothing to
//! click but the menu).

use serde::Serialize;

use crate::status::{AppState, DesktopStatus};

/// Which tray icon to show.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum TrayIcon {
    /// Taking work.
    Serving,
    /// Paused, snoozed, draining, waiting or not set up.
    Paused,
    /// The node could not start.
    Error,
    /// No node runs yet, or any more.
    Offline,
}

impl TrayIcon {
    /// The PNG for this state.
    pub fn png(self) -> &'static [u8] {
        match self {
            Self::Serving => include_bytes!("../icons/tray-serving.png"),
            Self::Paused => include_bytes!("../icons/tray-paused.png"),
            Self::Error => include_bytes!("../icons/tray-error.png"),
            Self::Offline => include_bytes!("../icons/tray-offline.png"),
        }
    }
}

/// Everything the tray shows.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct TrayView {
    /// The first, disabled menu line and the tooltip.
    pub status_line: String,
    /// "Pause now" or "Resume".
    pub toggle_label: &'static str,
    /// Whether the toggle does anything (not while starting, not before the first run).
    pub toggle_enabled: bool,
    /// "Finish current requests, then pause" is offered only while serving.
    pub drain_enabled: bool,
    /// Snoozing is offered while serving.
    pub snooze_enabled: bool,
    /// The icon.
    pub icon: TrayIcon,
}

/// "layers 8–15" (inclusive, as people count), or "layer 8".
pub fn layers_label(status: &DesktopStatus) -> Option<String> {
    let r = status.layers?;
    Some(if r.len() == 1 {
        format!("layer {}", r.start)
    } else {
        format!("layers {}–{}", r.start, r.end - 1)
    })
}

fn plural(n: u64, one: &str, many: &str) -> String {
    format!("{n} {}", if n == 1 { one } else { many })
}

/// The tray's status line for `status`, and its icon.
fn status_line(status: &DesktopStatus) -> (String, TrayIcon) {
    let receipts = plural(status.receipts_today, "receipt", "receipts") + " today";
    let detail = status.detail.as_deref();
    match status.state {
        AppState::Serving => {
            let layers = layers_label(status).unwrap_or_else(|| "layers".into());
            (
                format!(
                    "Serving {layers} · {:.1} tok/s · {receipts}",
                    status.tokens_per_s
                ),
                TrayIcon::Serving,
            )
        }
        AppState::Starting => ("Starting the node…".to_string(), TrayIcon::Offline),
        AppState::Draining => (
            format!(
                "Finishing {}, then pausing",
                plural(status.in_flight as u64, "request", "requests")
            ),
            TrayIcon::Paused,
        ),
        AppState::Paused => (format!("Paused · {receipts}"), TrayIcon::Paused),
        AppState::Snoozed => (
            match detail {
                Some(until) => format!("Snoozed {until} · {receipts}"),
                None => format!("Snoozed · {receipts}"),
            },
            TrayIcon::Paused,
        ),
        AppState::Setup => (
            "Open NeuroShard to finish setting up".to_string(),
            TrayIcon::Paused,
        ),
        AppState::Waiting => (
            format!("Waiting: {}", detail.unwrap_or("outside the schedule")),
            TrayIcon::Paused,
        ),
        AppState::Error => (
            format!("Error: {}", detail.unwrap_or("the node stopped")),
            TrayIcon::Error,
        ),
        AppState::Offline => ("Offline".to_string(), TrayIcon::Offline),
    }
}

/// What the tray shows for `status`.
pub fn view(status: &DesktopStatus) -> TrayView {
    let (line, icon) = status_line(status);
    let paused_by_owner = matches!(
        status.state,
        AppState::Paused | AppState::Snoozed | AppState::Draining
    );
    TrayView {
        status_line: line,
        toggle_label: if paused_by_owner {
            "Resume"
        } else {
            "Pause now"
        },
        toggle_enabled: paused_by_owner
            || matches!(status.state, AppState::Serving | AppState::Waiting),
        drain_enabled: status.state == AppState::Serving,
        snooze_enabled: status.state == AppState::Serving,
        icon,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use neuroshard_base::LayerRange;

    fn status(state: AppState) -> DesktopStatus {
        DesktopStatus {
            state,
            layers: Some(LayerRange::new(8, 16).unwrap()),
            tokens_per_s: 3.06,
            receipts_today: 42,
            ..DesktopStatus::starting()
        }
    }

    #[test]
    fn serving_shows_layers_rate_and_receipts_and_offers_pause() {
        let v = view(&status(AppState::Serving));
        assert_eq!(
            v.status_line,
            "Serving layers 8–15 · 3.1 tok/s · 42 receipts today"
        );
        assert_eq!(v.toggle_label, "Pause now");
        assert!(v.toggle_enabled && v.drain_enabled && v.snooze_enabled);
        assert_eq!(v.icon, TrayIcon::Serving);
    }

    #[test]
    fn the_toggle_label_follows_the_state() {
        for state in [AppState::Paused, AppState::Snoozed, AppState::Draining] {
            let v = view(&status(state));
            assert_eq!(v.toggle_label, "Resume", "{state:?}");
            assert!(v.toggle_enabled && !v.drain_enabled && !v.snooze_enabled);
            assert_eq!(v.icon, TrayIcon::Paused);
        }
        let setup = view(&status(AppState::Setup));
        assert!(
            !setup.toggle_enabled,
            "nothing to resume before the first run"
        );
        let starting = view(&status(AppState::Starting));
        assert!(!starting.toggle_enabled);
        assert_eq!(starting.icon, TrayIcon::Offline);
    }

    #[test]
    fn snooze_drain_error_and_single_layer_lines() {
        let mut s = status(AppState::Snoozed);
        s.detail = Some("until 15:30".into());
        s.receipts_today = 1;
        assert_eq!(
            view(&s).status_line,
            "Snoozed until 15:30 · 1 receipt today"
        );
        let mut d = status(AppState::Draining);
        d.in_flight = 1;
        assert_eq!(view(&d).status_line, "Finishing 1 request, then pausing");
        let mut e = status(AppState::Error);
        e.detail = Some("port 7420 is taken".into());
        let v = view(&e);
        assert_eq!(v.status_line, "Error: port 7420 is taken");
        assert_eq!(v.icon, TrayIcon::Error);
        let mut one = status(AppState::Serving);
        one.layers = Some(LayerRange::new(3, 4).unwrap());
        assert!(view(&one).status_line.starts_with("Serving layer 3 ·"));
    }
}
