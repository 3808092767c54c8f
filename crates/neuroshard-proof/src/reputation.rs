//! Spot-check sampling and reputation, from verified results only.
//!
//! After BOINC's adaptive replication: a new peer's work is re-executed on every hop until it
//! has a streak of valid results; after that the rate falls as 1/streak, never below a floor.
//! A failed check resets the streak, cuts reliability and bans the peer for a time that doubles
//! with each offence. No IO and no clock: callers pass a uniform sample and apply the ban.

use std::collections::HashMap;
use std::time::Duration;

use neuroshard_base::NodeId;

/// Sampling and ban settings.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SpotCheckPolicy {
    /// Valid results in a row before sampling starts to fall. Default 8: a cheater that starts
    /// cheating at once is caught on its first hop, and one prompt plus a few tokens earn trust.
    pub probation: u64,
    /// Lowest sampling rate. Default 0.05: one hop in twenty, so a peer that cheats on a share
    /// p of hops is caught after about 20/p hops.
    pub floor: f64,
    /// Ban after a first failed check. Default 10 min.
    pub first_ban: Duration,
    /// Longest ban. Default 7 days.
    pub max_ban: Duration,
}

impl Default for SpotCheckPolicy {
    fn default() -> Self {
        Self {
            probation: 8,
            floor: 0.05,
            first_ban: Duration::from_secs(600),
            max_ban: Duration::from_secs(7 * 24 * 3600),
        }
    }
}

impl SpotCheckPolicy {
    /// Names the first bad field.
    pub fn validate(&self) -> Result<(), neuroshard_base::Invalid> {
        use neuroshard_base::Invalid;
        if !(self.floor > 0.0 && self.floor <= 1.0) {
            return Err(Invalid::new(
                "floor",
                format!("{} is not in (0, 1]", self.floor),
            ));
        }
        if self.first_ban.is_zero() || self.max_ban < self.first_ban {
            return Err(Invalid::new(
                "first_ban",
                "must be positive and at most max_ban",
            ));
        }
        Ok(())
    }
}

/// Verified results of one peer.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PeerRecord {
    /// Checks passed.
    pub passes: u64,
    /// Checks failed.
    pub failures: u64,
    /// Checks passed since the last failure.
    pub streak: u64,
}

impl PeerRecord {
    /// Reliability in [0, 1]: (passes + 1) / (passes + 5·failures + 2). A new peer stands at 0.5;
    /// ten passes bring it to 0.92; one failure weighs as much as five passes.
    pub fn reliability(&self) -> f64 {
        (self.passes as f64 + 1.0) / (self.passes as f64 + 5.0 * self.failures as f64 + 2.0)
    }
}

/// Reputation of every peer met, keyed by node id.
#[derive(Debug, Clone, Default)]
pub struct Reputation {
    policy: SpotCheckPolicy,
    peers: HashMap<NodeId, PeerRecord>,
}

impl Reputation {
    /// An empty book.
    pub fn new(policy: SpotCheckPolicy) -> Self {
        Self {
            policy,
            peers: HashMap::new(),
        }
    }

    /// The record of `peer` (zeros if unknown).
    pub fn record(&self, peer: &NodeId) -> PeerRecord {
        self.peers.get(peer).copied().unwrap_or_default()
    }

    /// Reliability of `peer` (see [`PeerRecord::reliability`]).
    pub fn reliability(&self, peer: &NodeId) -> f64 {
        self.record(peer).reliability()
    }

    /// Share of `peer`'s hops to re-execute now.
    pub fn check_rate(&self, peer: &NodeId) -> f64 {
        let streak = self.record(peer).streak;
        if streak < self.policy.probation {
            return 1.0;
        }
        (self.policy.probation as f64 / streak as f64).max(self.policy.floor)
    }

    /// Whether to re-execute this hop, given a uniform sample in [0, 1).
    pub fn should_check(&self, peer: &NodeId, uniform: f64) -> bool {
        uniform < self.check_rate(peer)
    }

    /// Records a passed check.
    pub fn record_pass(&mut self, peer: &NodeId) {
        let record = self.peers.entry(*peer).or_default();
        record.passes += 1;
        record.streak += 1;
    }

    /// Records a failed check; returns how long to ban the peer: the first ban doubled for each
    /// earlier failure, capped.
    pub fn record_failure(&mut self, peer: &NodeId) -> Duration {
        let record = self.peers.entry(*peer).or_default();
        record.failures += 1;
        record.streak = 0;
        let doublings = (record.failures - 1).min(30) as u32;
        self.policy
            .first_ban
            .saturating_mul(1 << doublings)
            .min(self.policy.max_ban)
    }
}

/// Credit of one accepted receipt: work in GFLOP times the requester's reliability estimate of
/// the worker. Normalising by FLOPs (not wall time) pays a slow CPU and a fast GPU the same for
/// the same work; the reliability factor pays peers with a verified record more than new ones.
/// A voided receipt earns nothing.
pub fn credit(flops: u64, reliability: f32) -> f64 {
    flops as f64 / 1e9 * reliability.clamp(0.0, 1.0) as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    const P: NodeId = NodeId([1; 32]);
    const NEW: NodeId = NodeId([2; 32]);

    #[test]
    fn sampling_starts_at_every_hop_and_falls_to_the_floor() {
        let mut book = Reputation::new(SpotCheckPolicy::default());
        assert_eq!(book.check_rate(&P), 1.0);
        for _ in 0..8 {
            assert!(book.should_check(&P, 0.99));
            book.record_pass(&P);
        }
        assert_eq!(book.check_rate(&P), 1.0);
        for _ in 0..8 {
            book.record_pass(&P);
        }
        assert_eq!(book.check_rate(&P), 0.5);
        for _ in 0..1000 {
            book.record_pass(&P);
        }
        assert_eq!(book.check_rate(&P), 0.05);
        assert!(!book.should_check(&P, 0.06));
        assert!(book.reliability(&P) > 0.99);
    }

    #[test]
    fn failures_reset_trust_and_bans_escalate() {
        let mut book = Reputation::new(SpotCheckPolicy::default());
        for _ in 0..20 {
            book.record_pass(&P);
        }
        let before = book.reliability(&P);
        assert_eq!(book.record_failure(&P), Duration::from_secs(600));
        assert!(book.reliability(&P) < before - 0.15);
        assert_eq!(book.check_rate(&P), 1.0);
        assert_eq!(book.record_failure(&P), Duration::from_secs(1200));
        assert_eq!(book.record_failure(&P), Duration::from_secs(2400));
        for _ in 0..40 {
            book.record_failure(&P);
        }
        assert_eq!(book.record_failure(&P), Duration::from_secs(7 * 24 * 3600));
        assert_eq!(book.reliability(&NEW), 0.5);
    }

    #[test]
    fn credit_follows_flops_and_reliability() {
        assert_eq!(credit(2_000_000_000, 1.0), 2.0);
        assert_eq!(credit(2_000_000_000, 0.5), 1.0);
        assert_eq!(credit(2_000_000_000, 7.0), 2.0);
    }
}
