//! What the app shows about the node: one serializable snapshot that the dashboard, the tray
//! and the tests all read, and the rates computed from successive metric samples.

use std::collections::VecDeque;

use neuroshard_base::LayerRange;
use neuroshard_net::metrics::MetricsSnapshot;
use neuroshard_settings::policy::{Decision, Temperatures};
use serde::Serialize;

/// The app's state as a person thinks of it; several can map to a paused node.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum AppState {
    /// The node is loading its shard or restarting with new layers.
    Starting,
    /// Taking work.
    Serving,
    /// Finishing the calls in flight, then pausing.
    Draining,
    /// Paused by its owner.
    Paused,
    /// Paused until a time.
    Snoozed,
    /// Waiting for the first run: nothing is lent before the owner chooses how much.
    Setup,
    /// Held by a rule: the transfer cap, a temperature, a program, the battery, idle time or
    /// the weekly schedule; `detail` says which.
    Waiting,
    /// The node could not start; `detail` says why.
    Error,
    /// No node runs (shut down).
    Offline,
}

impl From<Decision> for AppState {
    fn from(decision: Decision) -> Self {
        match decision {
            Decision::Setup => AppState::Setup,
            Decision::Paused => AppState::Paused,
            Decision::Snoozed => AppState::Snoozed,
            Decision::Waiting => AppState::Waiting,
            Decision::Serving => AppState::Serving,
        }
    }
}

/// Bandwidth in use against the caps.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct BandwidthStatus {
    /// Bytes per second sent, over the last few seconds.
    pub up_bps: f64,
    /// Bytes per second received.
    pub down_bps: f64,
    /// Upload cap, KB/s; 0 for none.
    pub up_cap_kbps: u32,
    /// Download cap, KB/s; 0 for none.
    pub down_cap_kbps: u32,
    /// Bytes moved, both ways, in the current transfer period.
    pub period_bytes: u64,
    /// The period's cap in bytes; none when uncapped.
    pub period_cap_bytes: Option<u64>,
    /// When the current period ends, ms since the Unix epoch; none when uncapped.
    pub period_ends_ms: Option<u64>,
}

/// Everything the dashboard and tray show, pushed as the `status` event.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct DesktopStatus {
    /// The state.
    pub state: AppState,
    /// Why, for errors and waits ("until 15:30", "outside the schedule").
    pub detail: Option<String>,
    /// Node id (hex), once the node runs.
    pub node_id: Option<neuroshard_base::NodeId>,
    /// Model served.
    pub model_id: Option<String>,
    /// Layers served.
    pub layers: Option<LayerRange>,
    /// Layers of the whole model.
    pub total_layers: Option<u32>,
    /// Token positions computed per second, over the last few seconds.
    pub tokens_per_s: f64,
    /// Sessions holding a cache.
    pub sessions: u64,
    /// Calls being served now.
    pub in_flight: usize,
    /// Median latency of the calls served, ms.
    pub latency_ms: f64,
    /// Peers known.
    pub peers: u64,
    /// Bandwidth against the caps.
    pub bandwidth: BandwidthStatus,
    /// The address peers are told to dial.
    pub address: Option<String>,
    /// Where compute runs: "gpu" or "cpu".
    pub device: Option<&'static str>,
    /// Why compute runs on the CPU though the settings ask for the GPU.
    pub device_note: Option<String>,
    /// The CPU's and the GPU's temperatures in whole °C, where a sensor can be read.
    pub temperatures: Temperatures,
    /// Whether the node is held because a sensor is over its limit (`detail` says which).
    pub thermal_hold: bool,
    /// How peers reach this node: "untested" until a peer has dialled back, then "direct",
    /// "mapped" (UPnP), "relayed" or "unreachable".
    pub reachability: String,
    /// What the owner can do about it, in plain words.
    pub reachability_advice: String,
    /// Verified receipts since local midnight.
    pub receipts_today: u64,
    /// Their credit.
    pub credit_today: f64,
    /// Receipts awaiting the requester's countersignature.
    pub receipts_pending: u64,
    /// Receipts requesters have verified, ever.
    pub receipts_verified: u64,
    /// A model's files or layers on their way from peers; none when nothing is fetched.
    pub fetch: Option<FetchStatus>,
    /// Where the OpenAI-compatible API answers (`http://127.0.0.1:8000/v1`), when it is on.
    pub api_url: Option<String>,
    /// Why the API is not serving though the settings turn it on.
    pub api_error: Option<String>,
}

/// A fetch from peers in progress.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct FetchStatus {
    /// The model.
    pub model_id: String,
    /// The layers whose weights come, or none while the model's small files come.
    pub layers: Option<LayerRange>,
    /// Bytes verified so far.
    pub done_bytes: u64,
    /// Bytes in all (0 until known).
    pub total_bytes: u64,
}

impl DesktopStatus {
    /// The status of an app whose node has not started yet.
    pub fn starting() -> Self {
        Self {
            state: AppState::Starting,
            detail: None,
            node_id: None,
            model_id: None,
            layers: None,
            total_layers: None,
            tokens_per_s: 0.0,
            sessions: 0,
            in_flight: 0,
            latency_ms: 0.0,
            peers: 0,
            bandwidth: BandwidthStatus::default(),
            address: None,
            device: None,
            device_note: None,
            temperatures: Temperatures::default(),
            thermal_hold: false,
            reachability: "untested".into(),
            reachability_advice: String::new(),
            receipts_today: 0,
            fetch: None,
            api_url: None,
            api_error: None,
            credit_today: 0.0,
            receipts_pending: 0,
            receipts_verified: 0,
        }
    }
}

/// Rates over a sliding window of metric samples.
#[derive(Debug, Default)]
pub struct Rates {
    samples: VecDeque<(u64, MetricsSnapshot)>,
}

/// Samples older than this drop out of the rates.
const RATE_WINDOW_MS: u64 = 5_000;

/// Per-second rates.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Rate {
    /// Token positions per second.
    pub tokens: f64,
    /// Bytes sent per second.
    pub sent: f64,
    /// Bytes received per second.
    pub received: f64,
}

impl Rates {
    /// Adds a sample taken at `at_ms` and returns the rates over the window. A sample whose
    /// counters went down (a restarted node) starts the window again.
    pub fn sample(&mut self, at_ms: u64, metrics: MetricsSnapshot) -> Rate {
        if let Some((_, last)) = self.samples.back()
            && (metrics.tokens_served < last.tokens_served
                || metrics.bytes_sent < last.bytes_sent
                || metrics.bytes_received < last.bytes_received)
        {
            self.samples.clear();
        }
        self.samples.push_back((at_ms, metrics));
        while self.samples.len() > 2
            && self
                .samples
                .front()
                .is_some_and(|(t, _)| at_ms.saturating_sub(*t) > RATE_WINDOW_MS)
        {
            self.samples.pop_front();
        }
        let (Some((t0, first)), Some((t1, last))) = (self.samples.front(), self.samples.back())
        else {
            return Rate::default();
        };
        let seconds = t1.saturating_sub(*t0) as f64 / 1000.0;
        if seconds <= 0.0 {
            return Rate::default();
        }
        let per_s = |a: u64, b: u64| b.saturating_sub(a) as f64 / seconds;
        Rate {
            tokens: per_s(first.tokens_served, last.tokens_served),
            sent: per_s(first.bytes_sent, last.bytes_sent),
            received: per_s(first.bytes_received, last.bytes_received),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn snap(tokens: u64, sent: u64) -> MetricsSnapshot {
        MetricsSnapshot {
            tokens_served: tokens,
            bytes_sent: sent,
            ..MetricsSnapshot::default()
        }
    }

    #[test]
    fn rates_cover_the_last_seconds_and_restart_with_the_node() {
        let mut rates = Rates::default();
        assert_eq!(rates.sample(0, snap(0, 0)), Rate::default());
        let r = rates.sample(1000, snap(10, 4000));
        assert_eq!((r.tokens, r.sent), (10.0, 4000.0));
        for s in 2..=10 {
            rates.sample(s * 1000, snap(10 + (s - 1) * 2, 4000));
        }
        let r = rates.sample(11_000, snap(30, 4000));
        assert!((r.tokens - 2.0).abs() < 1e-9, "old samples drop out: {r:?}");
        assert_eq!(r.sent, 0.0);
        let r = rates.sample(12_000, snap(1, 0));
        assert_eq!(r, Rate::default(), "a restarted node starts a new window");
    }
}
