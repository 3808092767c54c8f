//! The compute share as a duty cycle: after computing for `t`, the node rests
//! `t × (100 − s) / s` before it computes again, so over time it computes `s` % of wall time
//! and the owner's GPU (or CPU) is free the rest of it.
//!
//! One turn at a time: a call holds its [`Turn`] from the end of the previous rest until its
//! compute is done, so concurrent calls cannot skip a rest.

use std::sync::Arc;
use std::sync::atomic::{AtomicU8, Ordering};
use std::time::Duration;

use tokio::sync::{Mutex, OwnedMutexGuard};
use tokio::time::Instant;

/// The node's duty cycle.
#[derive(Debug)]
pub struct DutyCycle {
    share_percent: AtomicU8,
    /// When the next compute may start.
    next_start: Arc<Mutex<Instant>>,
}

/// The right to compute now; [`Turn::finish`] books the rest that follows.
#[derive(Debug)]
pub struct Turn {
    next_start: OwnedMutexGuard<Instant>,
    share_percent: u8,
}

/// Rest owed after computing for `computed` at `share_percent` (1–100).
pub fn rest_after(computed: Duration, share_percent: u8) -> Duration {
    let share = u32::from(share_percent.clamp(1, 100));
    computed * (100 - share) / share
}

impl DutyCycle {
    /// A duty cycle at `share_percent` (clamped to 1–100).
    pub fn new(share_percent: u8) -> Self {
        Self {
            share_percent: AtomicU8::new(share_percent.clamp(1, 100)),
            next_start: Arc::new(Mutex::new(Instant::now())),
        }
    }

    /// Changes the share; the next turn follows it.
    pub fn set_share(&self, share_percent: u8) {
        self.share_percent
            .store(share_percent.clamp(1, 100), Ordering::Relaxed);
    }

    /// The share in force, 1–100 %.
    pub fn share(&self) -> u8 {
        self.share_percent.load(Ordering::Relaxed)
    }

    /// Waits for the previous call's compute and rest to end.
    pub async fn turn(&self) -> Turn {
        let next_start = self.next_start.clone().lock_owned().await;
        // Most calls find the rest over (always at 100 %): no timer for them.
        if *next_start > Instant::now() {
            tokio::time::sleep_until(*next_start).await;
        }
        Turn {
            next_start,
            share_percent: self.share_percent.load(Ordering::Relaxed),
        }
    }
}

impl Turn {
    /// Ends the turn after computing for `computed`: the next one starts after the rest.
    pub fn finish(mut self, computed: Duration) {
        *self.next_start = Instant::now() + rest_after(computed, self.share_percent);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Share of wall time spent computing over `calls` computes of `each`.
    async fn busy_fraction(share: u8, calls: u32, each: Duration) -> f64 {
        let duty = DutyCycle::new(share);
        let started = Instant::now();
        for _ in 0..calls {
            let turn = duty.turn().await;
            tokio::time::advance(each).await;
            turn.finish(each);
        }
        // The last rest counts too: wait for a turn after it.
        drop(duty.turn().await);
        (each * calls).as_secs_f64() / started.elapsed().as_secs_f64()
    }

    #[tokio::test(start_paused = true)]
    async fn busy_time_falls_as_the_share_falls() {
        // 100 ms computes: the timer wheel rounds rests up to whole milliseconds.
        let each = Duration::from_millis(100);
        for share in [100, 75, 50, 25, 10] {
            let fraction = busy_fraction(share, 8, each).await;
            assert!(
                (fraction - f64::from(share) / 100.0).abs() < 0.01,
                "share {share} %: busy {fraction:.3}"
            );
        }
    }

    #[tokio::test(start_paused = true)]
    async fn concurrent_calls_take_turns_and_share_changes_apply() {
        let duty = Arc::new(DutyCycle::new(50));
        let started = Instant::now();
        let first = duty.turn().await;
        let waiting = tokio::spawn({
            let duty = duty.clone();
            async move { duty.turn().await.finish(Duration::ZERO) }
        });
        tokio::time::advance(Duration::from_millis(20)).await;
        first.finish(Duration::from_millis(20));
        waiting.await.unwrap();
        // The second call started only after the first's 20 ms compute and 20 ms rest.
        assert_eq!(started.elapsed(), Duration::from_millis(40));
        duty.set_share(100);
        let turn = duty.turn().await;
        turn.finish(Duration::from_millis(5));
        drop(duty.turn().await);
        assert_eq!(
            started.elapsed(),
            Duration::from_millis(40),
            "no rest at 100 %"
        );
    }
}
