//! The transfer meter: bytes moved in the current transfer-cap period, kept across restarts.

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::Settings;
use crate::policy::MS_PER_DAY;

/// The meter's file in the data dir.
pub const USAGE_FILE: &str = "transfer.json";

/// Bytes moved in the current transfer-cap period, kept across restarts.
#[derive(Debug, Default, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Usage {
    period_start_ms: u64,
    bytes: u64,
    /// The node's byte counters at the last sample (not persisted: a new node starts at 0).
    #[serde(skip)]
    last_counter: u64,
    #[serde(skip)]
    last_saved_ms: u64,
}

impl Usage {
    /// The meter saved in `data_dir`; a fresh one when there is none or it is unreadable.
    pub fn load(data_dir: &Path) -> Self {
        std::fs::read(data_dir.join(USAGE_FILE))
            .ok()
            .and_then(|bytes| serde_json::from_slice(&bytes).ok())
            .unwrap_or_default()
    }

    /// Saves the meter in `data_dir`; a failure is logged (the next save tries again).
    pub fn save(&self, data_dir: &Path) {
        let path = data_dir.join(USAGE_FILE);
        let json = serde_json::to_vec(self).expect("usage serializes");
        if let Err(e) = std::fs::write(&path, json) {
            tracing::warn!("saving the transfer meter to {}: {e}", path.display());
        }
    }
}

/// The current transfer-cap period as the meter reads it.
#[derive(Debug, Default, Clone, Copy, PartialEq)]
pub struct Period {
    /// Bytes moved in it.
    pub bytes: u64,
    /// The cap, if the settings set one.
    pub cap_bytes: Option<u64>,
    /// When it ends, ms since the Unix epoch (with a cap).
    pub ends_ms: Option<u64>,
}

impl Period {
    /// The transport byte count at which the node must stop taking work, given its count now
    /// (`moved`): none without a cap.
    pub fn budget(&self, moved: u64) -> Option<u64> {
        self.cap_bytes
            .map(|cap| moved + cap.saturating_sub(self.bytes))
    }
}

/// Adds the bytes moved since the node's byte `counter` was last sampled to the period's
/// meter and starts a new period when the last one ended. Returns the period, and whether the
/// meter is due to be saved (every 10 s).
pub fn sample(usage: &mut Usage, settings: &Settings, counter: u64, now: u64) -> (Period, bool) {
    let moved = counter.checked_sub(usage.last_counter).unwrap_or(counter);
    usage.last_counter = counter;
    usage.bytes += moved;
    let cap = settings.bandwidth.transfer_cap;
    let period_ms = cap.map(|c| u64::from(c.every_days) * MS_PER_DAY);
    if usage.period_start_ms == 0 || period_ms.is_some_and(|p| now >= usage.period_start_ms + p) {
        usage.period_start_ms = now;
        usage.bytes = 0;
    }
    let save = now.saturating_sub(usage.last_saved_ms) >= 10_000;
    if save {
        usage.last_saved_ms = now;
    }
    let period = Period {
        bytes: usage.bytes,
        cap_bytes: cap.map(|c| u64::from(c.gigabytes) * 1_000_000_000),
        ends_ms: period_ms.map(|p| usage.period_start_ms + p),
    };
    (period, save)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::TransferCap;

    #[test]
    fn the_meter_counts_across_node_restarts_and_starts_a_new_period_when_one_ends() {
        let mut settings = Settings::default();
        settings.bandwidth.transfer_cap = Some(TransferCap {
            gigabytes: 1,
            every_days: 1,
        });
        let mut usage = Usage::default();
        let start = 1_000_000;
        let (_, save) = sample(&mut usage, &settings, 0, start);
        assert!(save, "the first sample is saved");
        let (status, save) = sample(&mut usage, &settings, 500, start + 1000);
        assert_eq!(status.bytes, 500);
        assert!(!save, "not again within 10 s");
        assert_eq!(status.cap_bytes, Some(1_000_000_000));
        assert_eq!(status.ends_ms, Some(start + MS_PER_DAY));
        // A new node's counter starts at 0 again: its bytes add on.
        let (status, _) = sample(&mut usage, &settings, 200, start + 2000);
        assert_eq!(status.bytes, 700);
        let (status, save) = sample(&mut usage, &settings, 300, start + MS_PER_DAY);
        assert_eq!(status.bytes, 0, "a new period");
        assert_eq!(status.ends_ms, Some(start + 2 * MS_PER_DAY));
        assert!(save);
    }
}
