//! The compute share as a duty cycle: after computing for `t`, the node rests
//! `t × (100 − s) / s` before it computes again, so over time it computes `s` % of wall time
//! and the owner's GPU (or CPU) is free the rest of it.
//!
//! One turn at a time: a call holds its [`Turn`] from the end of the previous rest until its
//! compute is done, so concurrent calls cannot skip a rest. Waiting calls get their turns round
//! robin by requester key, each key's in the order they came, so one key's many calls cannot
//! hold another's back; a key may have at most [`MAX_WAITING_PER_REQUESTER`] calls waiting.

use neuroshard_base::PublicKey;
use neuroshard_base::sync::LockExt;
use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use neuroshard_net::NodeError;
use tokio::sync::oneshot;
use tokio::time::Instant;

/// Calls one requester key may have waiting for a turn: an API server's concurrent users, not
/// a flood.
pub const MAX_WAITING_PER_REQUESTER: usize = 64;

/// The node's duty cycle.
#[derive(Debug)]
pub struct DutyCycle {
    share_percent: AtomicU8,
    queue: Arc<Mutex<Queue>>,
}

/// Who holds and who waits for the turn.
#[derive(Debug)]
struct Queue {
    /// A turn is out: its call is resting before, or computing.
    out: bool,
    /// When the next compute may start.
    next_start: Instant,
    /// Calls waiting, by requester.
    waiting: RoundRobin<oneshot::Sender<Turn>>,
}

impl Queue {
    /// The next waiting call, round robin by requester; none when nobody waits.
    fn next_waiter(&mut self) -> Option<oneshot::Sender<Turn>> {
        self.waiting.pop(|n| !n.is_closed())
    }
}

/// Items waiting per requester key, handed out round robin by key and each key's in the order
/// they came: the compute turns' waiting calls, and the decode steps waiting to be batched.
#[derive(Debug)]
pub(crate) struct RoundRobin<T> {
    /// Requesters with items waiting, in the order they are next served.
    ring: VecDeque<PublicKey>,
    /// Each requester's items, oldest first.
    waiting: HashMap<PublicKey, VecDeque<T>>,
}

impl<T> Default for RoundRobin<T> {
    fn default() -> Self {
        Self {
            ring: VecDeque::new(),
            waiting: HashMap::new(),
        }
    }
}

impl<T> RoundRobin<T> {
    /// Queues `item` for `key`, unless `key` already has `cap` items that still wait (`live`
    /// says which do; the others are dropped here): then `item` comes back.
    pub(crate) fn push(
        &mut self,
        key: PublicKey,
        item: T,
        cap: usize,
        live: impl Fn(&T) -> bool,
    ) -> Result<(), T> {
        let items = self.waiting.entry(key).or_default();
        items.retain(|i| live(i));
        if items.len() >= cap {
            return Err(item);
        }
        items.push_back(item);
        if items.len() == 1 && !self.ring.contains(&key) {
            self.ring.push_back(key);
        }
        Ok(())
    }

    /// The next item that still waits, round robin by key.
    pub(crate) fn pop(&mut self, live: impl Fn(&T) -> bool) -> Option<T> {
        while let Some(key) = self.ring.pop_front() {
            let Some(items) = self.waiting.get_mut(&key) else {
                continue;
            };
            let next = items.pop_front();
            match items.is_empty() {
                true => drop(self.waiting.remove(&key)),
                false => self.ring.push_back(key),
            }
            if let Some(next) = next.filter(|n| live(n)) {
                return Some(next);
            }
        }
        None
    }

    /// Items waiting (some may have stopped waiting since).
    pub(crate) fn len(&self) -> usize {
        self.waiting.values().map(VecDeque::len).sum()
    }
}

/// The right to compute now; [`Turn::finish`] books the rest that follows. Dropped, it passes
/// to the next waiting call.
#[derive(Debug)]
pub struct Turn {
    /// `None` once handed back, so dropping does nothing more.
    queue: Option<Arc<Mutex<Queue>>>,
    share_percent: u8,
}

/// The refusal of a call whose requester already has [`MAX_WAITING_PER_REQUESTER`] waiting.
pub(crate) fn too_many_waiting(requester: PublicKey) -> NodeError {
    NodeError::Full(format!(
        "requester {} already has {MAX_WAITING_PER_REQUESTER} calls waiting for compute",
        requester.id().short()
    ))
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
            queue: Arc::new(Mutex::new(Queue {
                out: false,
                next_start: Instant::now(),
                waiting: RoundRobin::default(),
            })),
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

    /// Waits for `requester`'s turn (round robin among the requesters waiting) and for the
    /// previous call's rest to end. Refused when `requester` already has
    /// [`MAX_WAITING_PER_REQUESTER`] calls waiting.
    pub async fn turn(&self, requester: PublicKey) -> Result<Turn, NodeError> {
        let waiting = {
            let mut q = self.queue.lock_or_recover();
            if !q.out {
                q.out = true;
                None
            } else {
                let (handover, turn) = oneshot::channel();
                // Calls that gave up waiting no longer count.
                let live = |c: &oneshot::Sender<Turn>| !c.is_closed();
                if q.waiting
                    .push(requester, handover, MAX_WAITING_PER_REQUESTER, live)
                    .is_err()
                {
                    return Err(too_many_waiting(requester));
                }
                Some(turn)
            }
        };
        let mut turn = match waiting {
            None => Turn {
                queue: Some(self.queue.clone()),
                share_percent: 0,
            },
            // The queue outlives every waiter, and a turn is only dropped by handing it on.
            Some(turn) => turn.await.map_err(|_| NodeError::ShuttingDown)?,
        };
        // Most calls find the rest over (always at 100 %): no timer for them.
        let next_start = self.queue.lock_or_recover().next_start;
        if next_start > Instant::now() {
            tokio::time::sleep_until(next_start).await;
        }
        turn.share_percent = self.share();
        Ok(turn)
    }
}

impl Turn {
    /// Ends the turn after computing for `computed`: the next one starts after the rest.
    pub fn finish(self, computed: Duration) {
        if let Some(queue) = &self.queue {
            queue.lock_or_recover().next_start =
                Instant::now() + rest_after(computed, self.share_percent);
        }
    }
}

impl Drop for Turn {
    fn drop(&mut self) {
        let Some(queue) = self.queue.take() else {
            return;
        };
        let mut q = queue.lock_or_recover();
        while let Some(next) = q.next_waiter() {
            let turn = Turn {
                queue: Some(queue.clone()),
                share_percent: 0,
            };
            match next.send(turn) {
                Ok(()) => return,
                // Its call gave up just now: the turn goes to the next, not back through here.
                Err(mut unsent) => unsent.queue = None,
            }
        }
        q.out = false;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: PublicKey = PublicKey([1; 32]);

    /// Share of wall time spent computing over `calls` computes of `each`.
    async fn busy_fraction(share: u8, calls: u32, each: Duration) -> f64 {
        let duty = DutyCycle::new(share);
        let started = Instant::now();
        for _ in 0..calls {
            let turn = duty.turn(KEY).await.unwrap();
            tokio::time::advance(each).await;
            turn.finish(each);
        }
        // The last rest counts too: wait for a turn after it.
        drop(duty.turn(KEY).await.unwrap());
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
        let first = duty.turn(KEY).await.unwrap();
        let waiting = tokio::spawn({
            let duty = duty.clone();
            async move { duty.turn(KEY).await.unwrap().finish(Duration::ZERO) }
        });
        tokio::time::advance(Duration::from_millis(20)).await;
        first.finish(Duration::from_millis(20));
        waiting.await.unwrap();
        // The second call started only after the first's 20 ms compute and 20 ms rest.
        assert_eq!(started.elapsed(), Duration::from_millis(40));
        duty.set_share(100);
        let turn = duty.turn(KEY).await.unwrap();
        turn.finish(Duration::from_millis(5));
        drop(duty.turn(KEY).await.unwrap());
        assert_eq!(
            started.elapsed(),
            Duration::from_millis(40),
            "no rest at 100 %"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn waiting_calls_take_turns_round_robin_by_requester() {
        let duty = Arc::new(DutyCycle::new(100));
        let (a, b) = (PublicKey([1; 32]), PublicKey([2; 32]));
        let first = duty.turn(a).await.unwrap();
        let (order, mut seen) = tokio::sync::mpsc::unbounded_channel();
        let mut waiting = Vec::new();
        // Four more calls of a, then one of b, all while a's first computes.
        for (key, name) in [(a, "a1"), (a, "a2"), (a, "a3"), (a, "a4"), (b, "b1")] {
            let (duty, order) = (duty.clone(), order.clone());
            waiting.push(tokio::spawn(async move {
                let turn = duty.turn(key).await.unwrap();
                order.send(name).unwrap();
                turn.finish(Duration::ZERO);
            }));
            // Each is queued before the next is spawned.
            tokio::task::yield_now().await;
        }
        // One requester may not queue without bound.
        let many: Vec<_> = (0..MAX_WAITING_PER_REQUESTER - 4)
            .map(|_| {
                let duty = duty.clone();
                tokio::spawn(async move { drop(duty.turn(a).await) })
            })
            .collect();
        tokio::task::yield_now().await;
        let refused = duty.turn(a).await.unwrap_err();
        assert!(refused.to_string().contains("calls waiting"), "{refused}");
        drop(first);
        for task in waiting {
            task.await.unwrap();
        }
        let order: Vec<_> = std::iter::from_fn(|| seen.try_recv().ok()).collect();
        assert_eq!(order, ["a1", "b1", "a2", "a3", "a4"]);
        for task in many {
            task.await.unwrap();
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_call_that_gives_up_waiting_passes_its_turn_on() {
        let duty = Arc::new(DutyCycle::new(100));
        let first = duty.turn(KEY).await.unwrap();
        let gave_up = tokio::spawn({
            let duty = duty.clone();
            async move { drop(duty.turn(KEY).await) }
        });
        tokio::task::yield_now().await;
        gave_up.abort();
        let next = tokio::spawn({
            let duty = duty.clone();
            async move {
                duty.turn(PublicKey([2; 32]))
                    .await
                    .unwrap()
                    .finish(Duration::ZERO)
            }
        });
        tokio::task::yield_now().await;
        drop(first);
        next.await.unwrap();
        // Nothing holds the turn now.
        drop(duty.turn(KEY).await.unwrap());
    }
}
