//! Continuous batching of decode steps: calls of one token from concurrent sessions are run as
//! one forward pass (`Shard::forward_batch`), so they share every read of the weights, which is
//! what a decode step on a CPU or a GPU waits on.
//!
//! A decode call joins the node's batch queue instead of waiting for a compute turn of its own.
//! One worker takes the compute turns for the queue: it waits for a turn like any call (round
//! robin with the prompts of other requesters), then takes what is queued, at most
//! `max_batch` steps chosen round robin by requester key, and runs them together. Steps that
//! arrive while a batch computes make the next batch, so sessions join and leave between steps
//! and no step waits on a timer unless the owner sets a window.

use super::*;
use crate::duty::{MAX_WAITING_PER_REQUESTER, RoundRobin, Turn, too_many_waiting};
use crate::node::forward::{Computed, ForwardCall};
use crate::sessions::Checkout;
use neuroshard_base::sync::LockExt;
use neuroshard_model::BatchItem;
use tokio::sync::oneshot;

/// The key the batch worker waits for compute turns as: one requester among the others.
const WORKER: PublicKey = PublicKey([0; 32]);

/// How decode steps are batched.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Batching {
    /// Decode steps run in one pass at most; 1 runs each alone. Default 16.
    pub max_batch: usize,
    /// How long a batch waits at most, once its turn comes, for a step of every session that
    /// decoded here in the last [`DECODING_WITHIN`], while fewer are queued. Default 5 ms:
    /// sessions decoding together reach a node a moment apart (each after its hop before
    /// this one), and one batch of them all reads the weights once where a batch of the first
    /// and another of the rest read them twice; a lone session never waits. Zero: a batch is
    /// what arrived while the one before it computed.
    pub window: Duration,
}

/// A session that ran a decode step here this recently is expected to step again: a batch
/// waits for it. A session that ended costs at most the window per batch for this long.
pub(crate) const DECODING_WITHIN: Duration = Duration::from_secs(1);

/// How many steps a batch waits for, with `queued` waiting and `decoding` sessions decoding
/// here: one of each, at most `max_batch`; 0 when the steps queued already make it (a lone
/// session's step never waits).
pub(crate) fn steps_to_wait_for(queued: usize, decoding: usize, max_batch: usize) -> usize {
    let expected = decoding.min(max_batch);
    if queued >= expected { 0 } else { expected }
}

impl Batching {
    /// The first bad field and why.
    pub fn validate(&self) -> Result<(), (&'static str, &'static str)> {
        if self.max_batch == 0 {
            return Err((
                "batching.max_batch",
                "must be at least 1 (1 runs every step alone)",
            ));
        }
        if self.window > Duration::from_millis(100) {
            return Err((
                "batching.window",
                "must be at most 100 ms: every step waits it",
            ));
        }
        Ok(())
    }
}

impl Default for Batching {
    fn default() -> Self {
        Self {
            max_batch: 16,
            window: Duration::from_millis(5),
        }
    }
}

/// A decode call waiting in the queue, and where its result goes.
struct Job {
    call: ForwardCall,
    reply: oneshot::Sender<Result<Computed, NodeError>>,
}

/// Decode calls waiting, by requester, and whether a worker runs.
#[derive(Debug, Default)]
struct Queue {
    waiting: RoundRobin<Job>,
    running: bool,
}

impl Queue {
    /// Up to `max` waiting jobs, round robin by requester, skipping those whose caller left.
    fn take(&mut self, max: usize) -> Vec<Job> {
        std::iter::from_fn(|| self.waiting.pop(Job::waits))
            .take(max)
            .collect()
    }
}

impl Job {
    /// Whether its caller still waits.
    fn waits(&self) -> bool {
        !self.reply.is_closed()
    }
}

/// Restarts the batch worker for what is still queued when the running one ends without
/// having emptied the queue (it panicked).
struct WorkerGuard(Arc<NodeState>);

impl Drop for WorkerGuard {
    fn drop(&mut self) {
        if !std::thread::panicking() {
            return;
        }
        let mut q = self.0.batcher.queue.lock_or_recover();
        let runtime = tokio::runtime::Handle::try_current().ok();
        q.running = q.waiting.len() != 0 && runtime.is_some();
        if let (true, Some(runtime)) = (q.running, runtime) {
            runtime.spawn(self.0.clone().run_batches());
        }
    }
}

/// The node's batch queue, and how many batches and steps it ran.
#[derive(Debug, Default)]
pub(super) struct Batcher {
    queue: Mutex<Queue>,
    /// Woken when a step is queued, for a batch waiting for its sessions.
    arrived: tokio::sync::Notify,
    /// When each session decoding here last ran a step (those within [`DECODING_WITHIN`]).
    decoding: Mutex<std::collections::HashMap<String, Instant>>,
    batches: std::sync::atomic::AtomicU64,
    steps: std::sync::atomic::AtomicU64,
}

impl Batcher {
    /// Notes the sessions of a batch about to run as decoding now, and forgets those that
    /// have not stepped within [`DECODING_WITHIN`].
    fn stepped(&self, jobs: &[Job]) {
        let now = Instant::now();
        let mut decoding = self.decoding.lock_or_recover();
        decoding.retain(|_, at| now.duration_since(*at) < DECODING_WITHIN);
        for job in jobs {
            decoding.insert(job.call.session_id.clone(), now);
        }
    }

    /// Batches run and the steps they held.
    pub(super) fn counts(&self) -> (u64, u64) {
        (
            self.batches.load(Ordering::Relaxed),
            self.steps.load(Ordering::Relaxed),
        )
    }
}

impl std::fmt::Debug for Job {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Job")
            .field("session", &self.call.session_id)
            .finish()
    }
}

impl NodeState {
    /// Whether `call` joins the batch queue: a one-token inference step on a node that batches
    /// (and has no test fault, whose misbehaviour is per call).
    pub(super) fn batches(&self, call: &ForwardCall) -> bool {
        call.tokens == 1 && self.batching.max_batch > 1 && self.fault.is_none()
    }

    /// Runs a decode call as part of a batch: queues it, starting the worker if none runs, and
    /// waits for its result. Refused when its requester already has
    /// [`MAX_WAITING_PER_REQUESTER`] steps queued.
    pub(super) async fn compute_batched(
        self: Arc<Self>,
        call: ForwardCall,
    ) -> Result<Computed, NodeError> {
        let (reply, result) = oneshot::channel();
        let start = {
            let mut q = self.batcher.queue.lock_or_recover();
            let key = call.caller;
            let job = Job { call, reply };
            if q.waiting
                .push(key, job, MAX_WAITING_PER_REQUESTER, Job::waits)
                .is_err()
            {
                return Err(too_many_waiting(key));
            }
            !std::mem::replace(&mut q.running, true)
        };
        self.batcher.arrived.notify_waiters();
        if start {
            tokio::spawn(self.clone().run_batches());
        }
        result.await.map_err(|_| NodeError::ShuttingDown)?
    }

    /// The worker: a compute turn, then the steps queued by then, until none is left. If it
    /// dies (a panic), its guard starts another for what is still queued.
    async fn run_batches(self: Arc<Self>) {
        let _guard = WorkerGuard(self.clone());
        loop {
            // The wait comes before the turn is asked for: no other call waits on it.
            self.await_sessions().await;
            let turn = self.duty.turn(WORKER).await;
            let jobs = {
                let mut q = self.batcher.queue.lock_or_recover();
                let jobs = q.take(self.batching.max_batch);
                if jobs.is_empty() {
                    q.running = false;
                    return;
                }
                jobs
            };
            self.batcher.stepped(&jobs);
            let turn = match turn {
                Ok(turn) => turn,
                Err(e) => {
                    for job in jobs {
                        let _ = job.reply.send(Err(NodeError::Internal(e.to_string())));
                    }
                    continue;
                }
            };
            let mut checked = Vec::with_capacity(jobs.len());
            for job in jobs {
                match self.check_out_session(&job.call) {
                    Ok(checkout) => checked.push((job, checkout)),
                    Err(e) => drop(job.reply.send(Err(e))),
                }
            }
            self.busy.fetch_add(1, Ordering::Relaxed);
            let state = self.clone();
            let ran = tokio::task::spawn_blocking(move || state.compute_batch(checked, turn)).await;
            if let Err(e) = ran {
                tracing::error!("a batch's compute task failed: {}", panic_message(e));
            }
        }
    }

    /// Waits, at most the batching window, until a step of every session decoding here is
    /// queued ([`steps_to_wait_for`]).
    async fn await_sessions(&self) {
        let window = self.batching.window;
        let decoding = self.batcher.decoding.lock_or_recover().len();
        let deadline = Instant::now() + window;
        loop {
            // Registered before the count is read, so a step queued in between still wakes it.
            let arrived = self.batcher.arrived.notified();
            let queued = self.batcher.queue.lock_or_recover().waiting.len();
            if window.is_zero() || steps_to_wait_for(queued, decoding, self.batching.max_batch) == 0
            {
                return;
            }
            if tokio::time::timeout_at(deadline, arrived).await.is_err() {
                return;
            }
        }
    }

    /// The blocking half of a batch: runs the steps of each shard and layer range together,
    /// replies to each, checks every session back in (or drops them all after a panic), and
    /// ends the turn.
    fn compute_batch(&self, jobs: Vec<(Job, Checkout)>, turn: Turn) {
        let started = std::time::Instant::now();
        let mut groups: Vec<Vec<(Job, Checkout)>> = Vec::new();
        for job in jobs {
            let same = |g: &Vec<(Job, Checkout)>| {
                let first = &g[0].0.call;
                Arc::ptr_eq(&first.served, &job.0.call.served) && first.layers == job.0.call.layers
            };
            match groups.iter_mut().find(|g| same(g)) {
                Some(group) => group.push(job),
                None => groups.push(vec![job]),
            }
        }
        for group in groups {
            self.compute_group(group);
        }
        self.busy.fetch_sub(1, Ordering::Relaxed);
        turn.finish(started.elapsed());
    }

    /// One shard's and layer range's steps in one pass; each job gets its result.
    fn compute_group(&self, group: Vec<(Job, Checkout)>) {
        let started = std::time::Instant::now();
        let (jobs, mut checkouts): (Vec<Job>, Vec<Checkout>) = group.into_iter().unzip();
        self.batcher.batches.fetch_add(1, Ordering::Relaxed);
        let steps = jobs.len() as u64;
        self.batcher.steps.fetch_add(steps, Ordering::Relaxed);
        let ran = self.threads.install(|| {
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                run_group(&jobs, &mut checkouts)
            }))
        });
        let compute = started.elapsed();
        if let ([job], Ok(Ok(_))) = (jobs.as_slice(), &ran) {
            self.decode_speed
                .observe(compute, job.call.layers.len() as usize);
        }
        let failed = |why: String| -> Vec<Result<Computed, NodeError>> {
            jobs.iter()
                .map(|_| Err(NodeError::Internal(why.clone())))
                .collect()
        };
        let results = match ran {
            Ok(Ok((weights_hash, outs, chosen))) => {
                for checkout in checkouts {
                    self.sessions.checkin(checkout, Instant::now());
                }
                let computed = |(out, chosen): (Result<ShardOutput, _>, Result<_, _>)| {
                    Ok(Computed {
                        out: out?,
                        chosen: chosen?,
                        compute,
                        weights_hash,
                    })
                };
                outs.into_iter().zip(chosen).map(computed).collect()
            }
            Ok(Err(e)) => {
                for checkout in checkouts {
                    self.sessions.checkin(checkout, Instant::now());
                }
                failed(e.to_string())
            }
            Err(payload) => {
                for checkout in checkouts {
                    self.sessions.abandon(checkout);
                }
                let why = forward::panic_text(payload.as_ref());
                tracing::error!("a batch's compute panicked ({why}); its sessions were dropped");
                failed(format!("compute panicked ({why}); the session was dropped"))
            }
        };
        for (job, result) in jobs.into_iter().zip(results) {
            let _ = job.reply.send(result);
        }
    }
}

/// What one pass over a group of steps gives: the weights hash, each step's output, and each
/// step's chosen token where it asked for one.
type GroupRun = (
    [u8; 32],
    Vec<Result<ShardOutput, neuroshard_model::ModelError>>,
    Vec<Result<Option<neuroshard_model::Chosen>, NodeError>>,
);

/// Runs `jobs` (one shard, one layer range) on their checked-out caches in one pass, and
/// chooses the tokens asked for.
fn run_group(jobs: &[Job], checkouts: &mut [Checkout]) -> Result<GroupRun, NodeError> {
    let (served, layers) = (&jobs[0].call.served, jobs[0].call.layers);
    let shard = served.shard.lock_or_recover();
    let weights_hash = shard.weights_hash(layers.to_range())?;
    let items = jobs
        .iter()
        .zip(checkouts)
        .map(|(job, checkout)| BatchItem {
            cache: &mut checkout.cache,
            start_pos: job.call.start_pos,
            input: job.call.input.clone(),
        })
        .collect();
    let outs = shard.forward_batch(layers.to_range(), items);
    let chosen = jobs
        .iter()
        .zip(&outs)
        .map(|(job, out)| match (&job.call.sample, out) {
            (Some(sampler), Ok(ShardOutput::Logits(logits))) => {
                let position = (job.call.start_pos + 1) as u64;
                Ok(Some(sampler.choose(logits, position)?))
            }
            _ => Ok(None),
        })
        .collect();
    Ok((weights_hash, outs, chosen))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_batching_values_are_named_by_the_node_config() {
        let mut config = NodeConfig::new("model", LayerRange::new(0, 1).unwrap());
        config.batching.max_batch = 0;
        let err = config.validate().unwrap_err().to_string();
        assert!(err.contains("batching.max_batch"), "{err}");
        config.batching = Batching {
            max_batch: 8,
            window: Duration::from_secs(1),
        };
        let err = config.validate().unwrap_err().to_string();
        assert!(err.contains("batching.window"), "{err}");
        config.batching.window = Duration::from_millis(2);
        assert!(config.batching.validate().is_ok());
    }

    /// A batch waits for a step of each session decoding here, never past `max_batch`, and a
    /// lone session's step never waits.
    #[test]
    fn a_batch_waits_for_a_step_of_each_session_decoding_here() {
        assert_eq!(steps_to_wait_for(1, 0, 16), 0);
        assert_eq!(steps_to_wait_for(1, 1, 16), 0);
        assert_eq!(steps_to_wait_for(1, 8, 16), 8);
        assert_eq!(steps_to_wait_for(7, 8, 16), 8);
        assert_eq!(steps_to_wait_for(8, 8, 16), 0);
        assert_eq!(steps_to_wait_for(3, 20, 16), 16);
        assert_eq!(steps_to_wait_for(9, 8, 16), 0);
    }
}
