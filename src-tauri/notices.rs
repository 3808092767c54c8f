//! What the app tells its owner outside its window, as desktop notifications: the node held
//! for a temperature, a model's layers finished downloading, the first verified receipt, and
//! reachability changed. Each can be turned off in the settings (`notifications`). Which
//! notices a status change brings is a pure function of the status before and after.

use neuroshard_base::LayerRange;
use neuroshard_settings::care::NotificationSettings;

use crate::status::DesktopStatus;

/// What a notice is about: each kind has its own switch in the settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NoticeKind {
    /// The node is held because a sensor is over its limit.
    Temperature,
    /// A model's layers finished downloading from peers.
    LayersFetched,
    /// The first receipt a requester verified.
    FirstReceipt,
    /// How peers reach this node changed.
    Reachability,
}

/// One desktop notification.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Notice {
    /// What it is about.
    pub kind: NoticeKind,
    /// Its title.
    pub title: String,
    /// Its text.
    pub body: String,
}

impl Notice {
    /// Whether the owner wants notices of this kind.
    pub fn wanted(&self, settings: &NotificationSettings) -> bool {
        match self.kind {
            NoticeKind::Temperature => settings.temperature,
            NoticeKind::LayersFetched => settings.layers_fetched,
            NoticeKind::FirstReceipt => settings.first_receipt,
            NoticeKind::Reachability => settings.reachability,
        }
    }

    /// Layers `range` of `model_id` are on disk and served.
    pub fn layers_fetched(model_id: &str, range: LayerRange) -> Self {
        Notice {
            kind: NoticeKind::LayersFetched,
            title: "Layers downloaded".into(),
            body: format!("Layers {range} of model {model_id} came from peers and are served now."),
        }
    }
}

/// The notices that going from `before` to `after` brings: a hold for a temperature that
/// begins, the first verified receipt, and a change from one tested reachability to another,
/// the last two only while the same node runs.
pub fn from_status(before: &DesktopStatus, after: &DesktopStatus) -> Vec<Notice> {
    let mut notices = Vec::new();
    if after.thermal_hold && !before.thermal_hold {
        notices.push(Notice {
            kind: NoticeKind::Temperature,
            title: "NeuroShard paused to cool down".into(),
            body: after.detail.clone().unwrap_or_default(),
        });
    }
    // Only between two statuses of one running node: a start, a restart or a shutdown
    // publishes a status without one, which tells nothing new.
    let same_node = before.node_id.is_some() && before.node_id == after.node_id;
    if same_node && before.receipts_verified == 0 && after.receipts_verified > 0 {
        notices.push(Notice {
            kind: NoticeKind::FirstReceipt,
            title: "Your first verified receipt".into(),
            body: "A requester verified the work this computer did. The Receipts page lists it."
                .into(),
        });
    }
    let tested = |s: &DesktopStatus| s.reachability != "untested";
    if same_node && before.reachability != after.reachability && tested(before) && tested(after) {
        notices.push(Notice {
            kind: NoticeKind::Reachability,
            title: "Reachability changed".into(),
            body: format!(
                "Peers now reach this computer: {} (was {}). {}",
                after.reachability, before.reachability, after.reachability_advice
            )
            .trim_end()
            .to_string(),
        });
    }
    notices
}

#[cfg(test)]
mod tests {
    use super::*;

    fn serving() -> DesktopStatus {
        DesktopStatus {
            node_id: Some(neuroshard_base::NodeId([7; 32])),
            reachability: "direct".into(),
            ..DesktopStatus::starting()
        }
    }

    #[test]
    fn a_hold_for_heat_the_first_receipt_and_a_reachability_change_bring_one_notice_each() {
        let before = serving();
        assert_eq!(from_status(&before, &before), vec![]);
        let hot = DesktopStatus {
            thermal_hold: true,
            detail: Some("CPU at 91 °C, above its 85 °C limit".into()),
            ..serving()
        };
        let notices = from_status(&before, &hot);
        assert_eq!(notices.len(), 1);
        assert_eq!(notices[0].kind, NoticeKind::Temperature);
        assert_eq!(notices[0].body, "CPU at 91 °C, above its 85 °C limit");
        assert_eq!(from_status(&hot, &hot), vec![], "once, as the hold begins");
        let paid = DesktopStatus {
            receipts_verified: 1,
            reachability: "relayed".into(),
            ..serving()
        };
        let kinds: Vec<_> = from_status(&before, &paid).iter().map(|n| n.kind).collect();
        assert_eq!(kinds, [NoticeKind::FirstReceipt, NoticeKind::Reachability]);
        let more = DesktopStatus {
            receipts_verified: 2,
            ..paid.clone()
        };
        assert_eq!(from_status(&paid, &more), vec![], "only the first receipt");
        // A node starting up (no id yet, reachability untested) tells of neither, nor does
        // one shutting down or testing its reachability again.
        let starting = DesktopStatus::starting();
        assert_eq!(from_status(&starting, &paid), vec![]);
        assert_eq!(from_status(&paid, &starting), vec![]);
        let retesting = DesktopStatus {
            reachability: "untested".into(),
            ..paid.clone()
        };
        assert_eq!(from_status(&paid, &retesting), vec![]);
        let mut off = NotificationSettings::default();
        let notice = &from_status(&before, &hot)[0];
        assert!(notice.wanted(&off));
        off.temperature = false;
        assert!(!notice.wanted(&off));
    }
}
