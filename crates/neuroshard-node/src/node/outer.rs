//! DiLoCo's outer loop on a node: every `outer_every` inner steps the replicas of a layer range
//! swap pseudo-gradients (parameters at the start of the round minus parameters now) through
//! `ExchangeGradient`, aggregate them robustly (a coordinate-wise trimmed mean) and take an
//! outer Nesterov step from the round's starting point.
//!
//! Every decision of the exchange (who sends, who waits, what a call is answered, what a round
//! closes with, when to catch up) is made by the IO-free [`neuroshard_train::round::Mailbox`],
//! tested over thousands of seeded schedules; this file signs, sends, waits and steps.
//!
//! - **Compression.** Top-k (10 % by default) with error feedback, fp16 values and gap-coded
//!   indices ([`neuroshard_train::sparse`]), or dense f32 for DiLoCo without compression.
//! - **The exchange.** A node that reaches the end of round r posts its contribution, then asks
//!   every replica for theirs, sending its own. A replica answers once its own contribution for
//!   r is ready (or after [`TrainingConfig::sync_timeout`]), keeping the caller's. Each side
//!   aggregates its own with every one it got, deduplicated by signing key and sorted, so two
//!   replicas that heard each other land on the same weights.
//! - **Who counts.** Contributions are signed; a request's is kept only from a key the node knows
//!   serves the same layers (from the tracker or the DHT, or met as a configured replica). A
//!   reply from a replica the node asked is always taken.
//! - **Late and behind.** A replica further behind than one round learns it from the replies
//!   and fetches the current round's weights from a peer that is ahead (`GetCheckpoint`)
//!   instead of holding the others up; a node probes its replicas the same way when it starts
//!   training.
//! - **Agreement, and where it ends.** Replicas that reach a round's end within the sync timeout
//!   of each other, and whose calls are answered, close it with the same contributions and land
//!   on the same weights. A call lost one way (a reply that never came back) splits them: one
//!   counted the other's contribution, the other did not. Nothing reconciles such a split yet;
//!   that needs the round's starting weights' hash in the exchange and a catch-up of the
//!   replicas that differ.

use neuroshard_base::sync::{LockExt, RwLockExt};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use neuroshard_base::{LayerRange, PublicKey};
use neuroshard_model::TrainConfig;
use neuroshard_proto as pb;
use neuroshard_train::outer::{Nesterov, default_trim, trimmed_mean};
use neuroshard_train::round::{Answer, Close, Gathered, Key, Mailbox, Plan};
use neuroshard_train::run::RunManifest;
use neuroshard_train::sparse::{Sparse, TopK};

use super::training::{RunRole, Trainer};
use super::{Fault, NodeState};
use neuroshard_net::NodeError;
use neuroshard_net::convert::{PeerRecord, span_to_proto};
use neuroshard_net::pool::Target;

/// Replicas' calls that may wait at once for this node's contribution.
pub(super) const MAX_WAITING: usize = 64;

/// How pseudo-gradients travel.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Compression {
    /// The largest `fraction` of coordinates (with error feedback), fp16, gap-coded indices.
    TopK(f64),
    /// Every coordinate as f32: DiLoCo without compression.
    Dense,
}

/// How a node trains: the inner optimizer and DiLoCo's outer loop.
#[derive(Debug, Clone, PartialEq)]
pub struct TrainingConfig {
    /// Inner optimizer (AdamW) and microbatch limits.
    pub inner: TrainConfig,
    /// Inner steps per outer round (DiLoCo's H). Default 20: the demo model's rounds last
    /// seconds, and fewer steps between syncs keep small replicas close.
    pub outer_every: u64,
    /// How pseudo-gradients travel. Default top-k of 10 %.
    pub compression: Compression,
    /// Outer learning rate. Default DiLoCo's 0.7.
    pub outer_lr: f32,
    /// Outer Nesterov momentum. Default DiLoCo's 0.9.
    pub outer_momentum: f32,
    /// Contributions dropped from each end of every coordinate before averaging; none for
    /// the default, a quarter rounded up (always keeping the middle).
    pub trim: Option<usize>,
    /// How long a node waits for a replica's contribution. Default 30 s.
    pub sync_timeout: Duration,
    /// Replicas (`host:port`) to exchange with besides the peers of the same layers the node
    /// knows from the tracker and the DHT. Default none.
    pub replicas: Vec<String>,
    /// Chunk size of the checkpoints the node serves. Default
    /// [`neuroshard_train::checkpoint::CHUNK_BYTES`] (4 MiB).
    pub checkpoint_chunk_bytes: u32,
    /// Longest a checkpoint stream to or from this node may go without moving a chunk before
    /// it is cut. Default [`neuroshard_train::checkpoint::CHUNK_DEADLINE`] (2 min).
    pub checkpoint_chunk_deadline: Duration,
    /// The run this node trains for, its manifest checked: microbatches and pushed checkpoints
    /// only from its trainers, exchanges only with its stage's replicas. Default none: the
    /// node trains with any caller, as a private test rig does (logged at start).
    pub run: Option<Arc<RunManifest>>,
}

impl Default for TrainingConfig {
    fn default() -> Self {
        Self {
            inner: TrainConfig::default(),
            outer_every: 20,
            compression: Compression::TopK(TopK::DEFAULT_FRACTION),
            outer_lr: Nesterov::DEFAULT_LR,
            outer_momentum: Nesterov::DEFAULT_MOMENTUM,
            trim: None,
            sync_timeout: Duration::from_secs(30),
            replicas: Vec::new(),
            checkpoint_chunk_bytes: neuroshard_train::checkpoint::CHUNK_BYTES,
            checkpoint_chunk_deadline: neuroshard_train::checkpoint::CHUNK_DEADLINE,
            run: None,
        }
    }
}

/// The outer-loop state of a stage, kept with its weights.
#[derive(Debug)]
pub(super) struct Outer {
    /// The round in progress.
    pub(super) round: u64,
    /// Parameters at the start of the round.
    pub(super) start: Vec<f32>,
    /// Inner steps taken when the round started.
    pub(super) steps_at_start: u64,
    nesterov: Nesterov,
    topk: Option<TopK>,
}

impl Outer {
    pub(super) fn new(
        config: &TrainingConfig,
        start: Vec<f32>,
        steps: u64,
    ) -> Result<Self, NodeError> {
        let len = start.len();
        let topk = match config.compression {
            Compression::TopK(fraction) => Some(
                TopK::new(len, fraction)
                    .map_err(|e| NodeError::Config(format!("train.compression: {e}")))?,
            ),
            Compression::Dense => None,
        };
        let mut nesterov = Nesterov::new(len);
        nesterov.lr = config.outer_lr;
        nesterov.momentum = config.outer_momentum;
        Ok(Self {
            round: 0,
            start,
            steps_at_start: steps,
            nesterov,
            topk,
        })
    }

    /// Starts round `round` from `start` (an outer step, or weights fetched from a peer).
    pub(super) fn restart(&mut self, round: u64, start: Vec<f32>, steps: u64) {
        self.round = round;
        self.start = start;
        self.steps_at_start = steps;
    }
}

/// A signed contribution as it travels.
#[derive(Debug, Clone)]
pub(super) struct Contribution {
    key: PublicKey,
    encoding: pb::GradientEncoding,
    payload: Arc<Vec<u8>>,
    signature: [u8; 64],
}

/// The round's mailbox (the exchange's decisions, [`neuroshard_train::round`]) and what wakes
/// those waiting on it.
#[derive(Debug)]
pub(super) struct Exchange {
    mailbox: Mutex<Mailbox<Contribution>>,
    changed: tokio::sync::watch::Sender<u64>,
}

impl Default for Exchange {
    fn default() -> Self {
        Self {
            mailbox: Mutex::new(Mailbox::default()),
            changed: tokio::sync::watch::channel(0).0,
        }
    }
}

impl Exchange {
    pub(super) fn lock(&self) -> std::sync::MutexGuard<'_, Mailbox<Contribution>> {
        self.mailbox.lock_or_recover()
    }

    fn bump(&self) {
        self.changed.send_modify(|n| *n += 1);
    }

    /// Moves the mailbox to `round`, keeping this node's last contribution for late askers.
    pub(super) fn enter(&self, round: u64) {
        self.lock().enter(round);
        self.bump();
    }
}

/// This node's contribution on its way to the replicas: the request carrying it, and the round
/// and layers their replies are checked against.
struct Outgoing {
    request: pb::ExchangeGradientRequest,
    round: u64,
    layers: LayerRange,
}

/// What a replica's signature over its contribution covers (for tests that sign their own).
pub fn contribution_bytes(
    model_id: &str,
    layers: LayerRange,
    round: u64,
    encoding: pb::GradientEncoding,
    payload: &[u8],
) -> [u8; 32] {
    neuroshard_proof::content_hash(&[
        b"exchange",
        model_id.as_bytes(),
        &layers.start.to_le_bytes(),
        &layers.end.to_le_bytes(),
        &round.to_le_bytes(),
        &(encoding as i32).to_le_bytes(),
        payload,
    ])
}

impl NodeState {
    /// The node's own signed contribution for `round`.
    fn sign_contribution(
        &self,
        layers: LayerRange,
        round: u64,
        encoding: pb::GradientEncoding,
        payload: Vec<u8>,
    ) -> Contribution {
        let digest = contribution_bytes(&self.model.id, layers, round, encoding, &payload);
        Contribution {
            key: self.key.public(),
            encoding,
            payload: Arc::new(payload),
            signature: self.key.sign(&digest),
        }
    }

    /// Checks a contribution's signature; None for an empty one (a probe or no answer).
    fn check_contribution(
        &self,
        layers: LayerRange,
        round: u64,
        encoding: i32,
        payload: Vec<u8>,
        key: &[u8],
        signature: &[u8],
    ) -> Result<Option<Contribution>, NodeError> {
        if payload.is_empty() {
            return Ok(None);
        }
        let encoding = pb::GradientEncoding::try_from(encoding).map_err(|_| {
            NodeError::BadRequest(format!("unknown pseudo-gradient encoding {encoding}"))
        })?;
        let key = PublicKey::from_slice(key)?;
        // Under a run, only its stage's replicas contribute, in calls and in replies alike.
        self.check_run_key(&key, RunRole::Replica(layers))?;
        let digest = contribution_bytes(&self.model.id, layers, round, encoding, &payload);
        key.verify(&digest, signature)?;
        Ok(Some(Contribution {
            key,
            encoding,
            payload: Arc::new(payload),
            signature: signature
                .try_into()
                .expect("a checked signature has 64 bytes"),
        }))
    }

    /// Serves ExchangeGradient: keeps the caller's contribution (from a known replica) and
    /// answers with this node's for the round asked, waiting for it when the node is still
    /// in that round's inner steps.
    pub(super) async fn exchange_gradient(
        self: Arc<Self>,
        req: pb::ExchangeGradientRequest,
        caller: PublicKey,
    ) -> Result<pb::ExchangeGradientResponse, NodeError> {
        let trainer = self.trainer()?;
        let layers = self.served().range;
        self.check_run_key(&caller, RunRole::Replica(layers))?;
        let (layers, round, theirs) = self.check_exchange(req)?;
        let exchange = &trainer.exchange;
        let mut changed = exchange.changed.subscribe();
        let wait = tokio::time::sleep(trainer.config.sync_timeout);
        tokio::pin!(wait);
        let known = self.replica_keys(layers);
        // Callers waiting for this node's contribution, at most MAX_WAITING at once; past that
        // (or for a probe) the answer is whatever is ready now.
        let permit = match theirs {
            Some(_) => trainer.waiting.try_acquire().ok(),
            None => None,
        };
        let reply = loop {
            let ready = answer_if_ready(trainer, round, theirs.as_ref(), &known, permit.is_some());
            if let Some(reply) = ready {
                break reply;
            }
            tokio::select! {
                _ = &mut wait => break answer_with(exchange.lock().round(), None),
                _ = self.cancel.cancelled() => return Err(NodeError::ShuttingDown),
                r = changed.changed() => if r.is_err() {
                    return Err(NodeError::ShuttingDown);
                },
            }
        };
        Ok(self.attest(layers, reply).await)
    }

    /// Checks an ExchangeGradient request: the model, the node's whole range, and the
    /// caller's contribution (signature and size); its layers, round and contribution (none
    /// for a probe).
    fn check_exchange(
        &self,
        req: pb::ExchangeGradientRequest,
    ) -> Result<(LayerRange, u64, Option<Contribution>), NodeError> {
        self.check_model(&req.model_id)?;
        let layers = neuroshard_net::convert::span_from_proto(req.layers)?;
        let served = self.served();
        self.check_whole_range(&served, layers)?;
        let round = req.outer_step;
        let theirs = self.check_contribution(
            layers,
            round,
            req.encoding,
            req.pseudo_gradient,
            &req.sender_key,
            &req.signature,
        )?;
        if let Some(c) = &theirs {
            self.decode_contribution(c)?;
        }
        Ok((layers, round, theirs))
    }

    /// Keys of the peers this node knows serve `layers` of its model.
    fn replica_keys(&self, layers: LayerRange) -> std::collections::BTreeSet<[u8; 32]> {
        self.replica_peers(layers).map(|p| p.public_key.0).collect()
    }

    /// The known peers that are replicas of `layers`: those serving the same layers of the
    /// model, and under a run only the keys its manifest names for the stage.
    fn replica_peers(&self, layers: LayerRange) -> impl Iterator<Item = PeerRecord> + use<'_> {
        let run = self.trainer.as_ref().and_then(|t| t.config.run.clone());
        self.known_peers().into_iter().filter(move |p| {
            p.layers == layers
                && p.model_id == self.model.id
                && run
                    .as_ref()
                    .is_none_or(|r| r.is_replica(layers, &p.node_id))
        })
    }

    /// A replica at `addr` as a node to dial: the node known there, whose key the handshake
    /// must show, or whoever answers at an address the owner configured.
    pub(super) fn replica_target(&self, addr: &str) -> Target {
        match self.known_peers().into_iter().find(|p| p.addr == addr) {
            Some(peer) => Target::node(addr, peer.node_id),
            None => Target::any(addr),
        }
    }

    /// Where to find replicas of `layers`: configured ones and known peers serving the same
    /// (under a run, those its manifest names; what a configured one contributes is checked
    /// against the manifest too).
    pub(super) fn replica_addrs(&self, layers: LayerRange) -> Vec<String> {
        let own = self.advertised.read_or_recover().clone();
        let mut addrs: Vec<String> = match self.trainer.as_ref() {
            Some(t) => t.replicas.read_or_recover().clone(),
            None => Vec::new(),
        };
        addrs.extend(self.replica_peers(layers).map(|p| p.addr));
        addrs.retain(|a| *a != own);
        addrs.sort();
        addrs.dedup();
        addrs
    }

    /// The dense pseudo-gradient a contribution stands for, checked against this stage's size.
    fn decode_contribution(&self, c: &Contribution) -> Result<Vec<f32>, NodeError> {
        let expected = self.stage_parameters()?;
        let bad = |why: String| NodeError::BadRequest(format!("pseudo-gradient: {why}"));
        let dense = match c.encoding {
            pb::GradientEncoding::GradientSparse => {
                let sparse =
                    Sparse::decode(&c.payload, expected as u64).map_err(|e| bad(e.to_string()))?;
                if sparse.len != expected as u64 {
                    return Err(bad(format!(
                        "{} coordinates for a stage of {expected}",
                        sparse.len
                    )));
                }
                sparse.to_dense()
            }
            pb::GradientEncoding::GradientDenseF32 => {
                if c.payload.len() != expected * 4 {
                    return Err(bad(format!(
                        "{} bytes of f32 for a stage of {expected} parameters",
                        c.payload.len()
                    )));
                }
                let dense: Vec<f32> = c
                    .payload
                    .chunks_exact(4)
                    .map(|b| f32::from_le_bytes(b.try_into().expect("4 bytes")))
                    .collect();
                if let Some(i) = dense.iter().position(|v| !v.is_finite()) {
                    return Err(bad(format!("coordinate {i} is not finite")));
                }
                dense
            }
        };
        Ok(dense)
    }

    /// Parameters of the trainable stage (loading it is the training calls' job).
    pub(super) fn stage_parameters(&self) -> Result<usize, NodeError> {
        let trainer = self.trainer()?;
        let stage = trainer.stage.lock_or_recover();
        stage
            .as_ref()
            .map(|s| s.shard.num_parameters())
            .ok_or_else(|| NodeError::NotTraining("this node has not started training".into()))
    }

    /// Closes the outer round in progress: posts this node's contribution, swaps with every
    /// replica, and steps from the round's start with the robust aggregate. A node more than a
    /// round behind a replica fetches that replica's weights instead.
    pub(super) async fn outer_sync(self: &Arc<Self>) -> Result<u64, NodeError> {
        let trainer = self.trainer()?;
        let state = self.clone();
        let (round, layers, mine) = tokio::task::spawn_blocking(move || state.contribute())
            .await
            .map_err(|e| NodeError::Internal(format!("compute task failed: {e}")))??;
        trainer.exchange.lock().post(mine.clone());
        trainer.exchange.bump();
        let out = Outgoing {
            request: self.exchange_request(round, layers, &mine),
            round,
            layers,
        };
        // Of each pair of replicas that have met, the one with the lower key sends and the
        // other waits for it (sending itself only if nothing came), so each contribution
        // crosses once each way. A replica whose contribution already came in got this
        // node's in the reply.
        let own = self.key.public().0;
        let Plan { send, wait_for } = self.plan_exchange(trainer, &own, layers);
        let mut gathered = Gathered::default();
        self.send_contribution(send, &out, &mut gathered).await;
        if !wait_for.is_empty() {
            self.wait_for_senders(wait_for, &out, &mut gathered).await;
        }
        let close = trainer.exchange.lock().close(own, mine, gathered);
        let contributions = match close {
            Close::CatchUp {
                round: theirs,
                from,
            } => {
                tracing::info!("round {round} is behind {from}'s {theirs}: fetching its weights");
                return self.catch_up(&from, layers).await;
            }
            Close::Aggregate(contributions) => contributions,
        };
        let state = self.clone();
        let round = tokio::task::spawn_blocking(move || state.aggregate(round, contributions))
            .await
            .map_err(|e| NodeError::Internal(format!("compute task failed: {e}")))??;
        trainer.exchange.enter(round);
        Ok(round)
    }

    /// The ExchangeGradient request carrying this node's contribution `mine` to `round`.
    fn exchange_request(
        &self,
        round: u64,
        layers: LayerRange,
        mine: &Contribution,
    ) -> pb::ExchangeGradientRequest {
        pb::ExchangeGradientRequest {
            model_id: self.model.id.clone(),
            layers: Some(span_to_proto(layers)),
            outer_step: round,
            pseudo_gradient: mine.payload.to_vec(),
            encoding: mine.encoding as i32,
            sender_key: mine.key.0.to_vec(),
            signature: mine.signature.to_vec(),
        }
    }

    /// Which replicas of `layers` this node sends its contribution to now, and which it waits
    /// for (by the keys met in their replies).
    fn plan_exchange(&self, trainer: &Trainer, own: &Key, layers: LayerRange) -> Plan<String> {
        let keys = trainer.replica_keys.lock_or_recover();
        let replicas = self.replica_addrs(layers).into_iter().map(|addr| {
            let key = keys.get(&addr).copied();
            (addr, key)
        });
        trainer.exchange.lock().plan(own, replicas)
    }

    /// Waits up to the sync timeout for the contributions of the replicas in `wait_for`; those
    /// still not heard from are then sent this node's contribution after all.
    async fn wait_for_senders(
        self: &Arc<Self>,
        mut wait_for: Vec<(String, Key)>,
        out: &Outgoing,
        gathered: &mut Gathered<String, Contribution>,
    ) {
        let Ok(trainer) = self.trainer() else {
            return;
        };
        let mut changed = trainer.exchange.changed.subscribe();
        let keys: Vec<Key> = wait_for.iter().map(|(_, k)| *k).collect();
        let waited = tokio::time::timeout(trainer.config.sync_timeout, async {
            while !trainer.exchange.lock().heard(&keys) {
                if changed.changed().await.is_err() {
                    break;
                }
            }
        })
        .await;
        if waited.is_err() {
            wait_for.retain(|(_, k)| !trainer.exchange.lock().heard(&[*k]));
            let late: Vec<String> = wait_for.into_iter().map(|(a, _)| a).collect();
            tracing::debug!("no contribution came from {late:?}: asking them");
            self.send_contribution(late, out, gathered).await;
        }
    }

    /// Sends this node's contribution (`request`) to each of `addrs` at once and gathers the
    /// contributions their replies carry, noting a replica that is further ahead.
    async fn send_contribution(
        self: &Arc<Self>,
        addrs: Vec<String>,
        out: &Outgoing,
        gathered: &mut Gathered<String, Contribution>,
    ) {
        let (round, layers) = (out.round, out.layers);
        let Ok(trainer) = self.trainer() else {
            return;
        };
        let timeout = trainer.config.sync_timeout + Duration::from_secs(5);
        let asks = addrs.into_iter().map(|addr| {
            let request = out.request.clone();
            trainer
                .exchange_sent
                .fetch_add(request.pseudo_gradient.len() as u64, Ordering::Relaxed);
            ask_replica(trainer, self.replica_target(&addr), request, timeout)
        });
        for (addr, reply) in futures::future::join_all(asks).await {
            let Some(reply) = exchanged(&addr, reply) else {
                continue;
            };
            let theirs = self.check_contribution(
                layers,
                round,
                reply.encoding,
                reply.pseudo_gradient,
                &reply.sender_key,
                &reply.signature,
            );
            match theirs {
                Ok(Some(c)) => {
                    trainer
                        .replica_keys
                        .lock_or_recover()
                        .insert(addr.clone(), c.key.0);
                    gathered.reply(round, addr, reply.outer_step, Some((c.key.0, c)));
                }
                Ok(None) => gathered.reply(round, addr, reply.outer_step, None),
                Err(e) => tracing::warn!("replica {addr} sent a bad contribution: {e}"),
            }
        }
    }

    /// This node's contribution to the round in progress: its pseudo-gradient, compressed and
    /// signed.
    fn contribute(&self) -> Result<(u64, LayerRange, Contribution), NodeError> {
        let trainer = self.trainer()?;
        let mut guard = trainer.stage.lock_or_recover();
        let stage = guard
            .as_mut()
            .ok_or_else(|| NodeError::NotTraining("this node has not started training".into()))?;
        let now = stage.shard.parameters();
        let mut delta: Vec<f32> = stage
            .outer
            .start
            .iter()
            .zip(&now)
            .map(|(s, p)| s - p)
            .collect();
        if let Some(Fault::BadPseudoGradient { scale }) = &self.fault {
            delta.iter_mut().for_each(|d| *d *= scale);
        }
        let (encoding, payload) = match &mut stage.outer.topk {
            Some(topk) => {
                let sparse = topk
                    .compress(&delta)
                    .map_err(|e| NodeError::BadRequest(format!("pseudo-gradient: {e}")))?;
                (pb::GradientEncoding::GradientSparse, sparse.encode())
            }
            None => (
                pb::GradientEncoding::GradientDenseF32,
                delta.iter().flat_map(|d| d.to_le_bytes()).collect(),
            ),
        };
        let round = stage.outer.round;
        let contribution = self.sign_contribution(stage.range, round, encoding, payload);
        Ok((round, stage.range, contribution))
    }

    /// The outer step: the trimmed mean of the contributions, Nesterov from the round's start.
    fn aggregate(&self, round: u64, contributions: Vec<Contribution>) -> Result<u64, NodeError> {
        let trainer = self.trainer()?;
        let dense = contributions
            .iter()
            .map(|c| self.decode_contribution(c))
            .collect::<Result<Vec<_>, _>>()?;
        let views: Vec<&[f32]> = dense.iter().map(Vec::as_slice).collect();
        let trim = trainer
            .config
            .trim
            .unwrap_or_else(|| default_trim(views.len()))
            .min(views.len().saturating_sub(1) / 2);
        let mean = trimmed_mean(&views, trim)
            .map_err(|e| NodeError::BadRequest(format!("aggregate: {e}")))?;
        let mut guard = trainer.stage.lock_or_recover();
        let stage = guard
            .as_mut()
            .ok_or_else(|| NodeError::NotTraining("this node has not started training".into()))?;
        if stage.outer.round != round {
            return Err(NodeError::BadRequest(format!(
                "round {round} closed twice (the stage is in round {})",
                stage.outer.round
            )));
        }
        let mut start = std::mem::take(&mut stage.outer.start);
        stage
            .outer
            .nesterov
            .step(&mut start, &mean)
            .map_err(|e| NodeError::BadRequest(format!("outer step: {e}")))?;
        stage.shard.set_parameters(&start)?;
        let steps = stage.shard.steps();
        stage.outer.restart(round + 1, start, steps);
        tracing::debug!(
            "outer round {round} closed with {} contributions (trim {trim})",
            views.len()
        );
        Ok(round + 1)
    }
}

/// The answer to an ExchangeGradient call if the mailbox has one now (keeping the caller's
/// contribution when it is admitted: from a known replica, or a configured one met before).
fn answer_if_ready(
    trainer: &Trainer,
    round: u64,
    theirs: Option<&Contribution>,
    known: &std::collections::BTreeSet<[u8; 32]>,
    may_wait: bool,
) -> Option<pb::ExchangeGradientResponse> {
    let exchange = &trainer.exchange;
    // Configured replicas are admitted once met in their replies.
    let met = trainer
        .replica_keys
        .lock_or_recover()
        .values()
        .any(|k| theirs.is_some_and(|c| c.key.0 == *k));
    let admitted = theirs.is_some_and(|c| known.contains(&c.key.0) || met);
    let offered = theirs.map(|c| (c.key.0, c));
    let (kept, answer) = exchange.lock().ask(round, offered, admitted, may_wait);
    if kept {
        // Wakes this node's own sync if it waits for this contribution.
        exchange.bump();
    }
    let Answer::Now {
        round: current,
        contribution,
    } = answer
    else {
        return None;
    };
    if let Some(a) = &contribution {
        trainer
            .exchange_sent
            .fetch_add(a.payload.len() as u64, Ordering::Relaxed);
    }
    Some(answer_with(current, contribution))
}

/// Sends `request` to the replica at `addr`, giving up after `timeout`; the address and the
/// reply.
pub(super) async fn ask_replica(
    trainer: &Trainer,
    to: Target,
    request: pb::ExchangeGradientRequest,
    timeout: Duration,
) -> (
    String,
    Result<Result<pb::ExchangeGradientResponse, NodeError>, tokio::time::error::Elapsed>,
) {
    let addr = to.addr.clone();
    let reply = tokio::time::timeout(timeout, async {
        let mut client = trainer.pool.client(&to).await?.client.clone();
        client
            .exchange_gradient(request)
            .await
            .map(tonic::Response::into_inner)
            .map_err(|status| NodeError::Remote {
                peer: addr.clone(),
                status,
            })
    })
    .await;
    (addr, reply)
}

/// The reply of the replica at `addr`, or none (logged) when it failed or timed out.
fn exchanged(
    addr: &str,
    reply: Result<Result<pb::ExchangeGradientResponse, NodeError>, tokio::time::error::Elapsed>,
) -> Option<pb::ExchangeGradientResponse> {
    match reply {
        Ok(Ok(reply)) => Some(reply),
        Ok(Err(e)) => {
            tracing::debug!("replica {addr} did not exchange: {e}");
            None
        }
        Err(_) => {
            tracing::debug!("replica {addr} did not answer in time");
            None
        }
    }
}

fn answer_with(round: u64, answer: Option<Contribution>) -> pb::ExchangeGradientResponse {
    match answer {
        None => pb::ExchangeGradientResponse {
            outer_step: round,
            ..Default::default()
        },
        Some(c) => pb::ExchangeGradientResponse {
            outer_step: round,
            pseudo_gradient: c.payload.to_vec(),
            encoding: c.encoding as i32,
            sender_key: c.key.0.to_vec(),
            signature: c.signature.to_vec(),
            ..Default::default()
        },
    }
}
