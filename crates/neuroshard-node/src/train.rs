//! `neuroshard train`: pipeline stages × DiLoCo replicas of training nodes on this machine, on
//! the embedded public-domain corpus, byte by byte.
//!
//! Every replica drives its own chain (stage 0 of replica r, then stage 1 of replica r, ...)
//! on its own stream of windows of the corpus; each node takes AdamW inner steps, and every
//! `outer_every` steps the nodes of each stage swap compressed pseudo-gradients and take the
//! outer step. The report holds the loss curve, tokens per second and the bytes the replicas
//! exchanged next to what dense data-parallel training (a ring all-reduce of fp32 gradients
//! every step) and DiLoCo without compression would have sent.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use neuroshard_base::{LayerRange, NodeKey};
use neuroshard_model::codec::WireDType;
use neuroshard_model::init::{ModelSpec, write_trained};
use neuroshard_model::{ModelInfo, TextTokenizer, TrainConfig};
use rand::{Rng, SeedableRng};

use crate::demo::{model_dir_or, scratch_dir, split_layers};
use crate::node::{Compression, NodeHandle, TrainingConfig};
use crate::swarm::LocalSwarm;
use neuroshard_client::{Microbatch, SwarmClient};
use neuroshard_net::NodeError;
use neuroshard_train::run::{RunBody, RunManifest, RunStage};

/// What `neuroshard train` runs.
#[derive(Debug, Clone)]
pub struct TrainOptions {
    /// Pipeline stages the layers are split into.
    pub stages: u32,
    /// Replicas of every stage.
    pub replicas: usize,
    /// Inner steps every replica takes.
    pub steps: usize,
    /// Microbatches per inner step.
    pub batch: usize,
    /// Tokens per microbatch.
    pub sequence: usize,
    /// Inner steps per outer round.
    pub outer_every: u64,
    /// How pseudo-gradients travel.
    pub compression: Compression,
    /// AdamW learning rate at its peak.
    pub lr: f64,
    /// Inner steps of linear learning-rate warm-up.
    pub warmup: u64,
    /// Whether the learning rate then falls along a cosine to a tenth of its peak by the last
    /// step (otherwise it stays at its peak).
    pub decay: bool,
    /// DiLoCo's outer learning rate.
    pub outer_lr: f32,
    /// DiLoCo's outer Nesterov momentum.
    pub outer_momentum: f32,
    /// Seed of the model (when built in) and of the data order.
    pub seed: u64,
    /// Model to train; `None` writes the built-in `spec` with `seed`.
    pub model_dir: Option<PathBuf>,
    /// The built-in model's size.
    pub spec: ModelSpec,
    /// Write the trained model here (Hugging Face layout, bf16).
    pub save: Option<PathBuf>,
    /// The text trained on.
    pub corpus: String,
}

impl Default for TrainOptions {
    fn default() -> Self {
        Self {
            stages: 2,
            replicas: 2,
            steps: 100,
            batch: 4,
            sequence: 64,
            outer_every: 20,
            compression: Compression::TopK(neuroshard_train::sparse::TopK::DEFAULT_FRACTION),
            lr: 3e-3,
            warmup: 0,
            decay: true,
            outer_lr: TrainingConfig::default().outer_lr,
            outer_momentum: TrainingConfig::default().outer_momentum,
            seed: 1,
            model_dir: None,
            spec: ModelSpec::tiny(),
            save: None,
            corpus: neuroshard_train::CORPUS.to_string(),
        }
    }
}

impl TrainOptions {
    /// Names the first setting out of range.
    fn check(&self) -> Result<(), NodeError> {
        let bad = |what: String| Err(NodeError::Config(what));
        if self.stages == 0 || self.replicas == 0 || self.steps == 0 {
            return bad(format!(
                "stages ({}), replicas ({}) and steps ({}) must be positive",
                self.stages, self.replicas, self.steps
            ));
        }
        if !(self.lr.is_finite() && self.lr > 0.0) {
            return bad(format!("lr {}: give a positive learning rate", self.lr));
        }
        if !(self.outer_lr.is_finite() && self.outer_lr > 0.0) {
            return bad(format!(
                "outer_lr {}: give a positive learning rate",
                self.outer_lr
            ));
        }
        if !(0.0..1.0).contains(&self.outer_momentum) {
            return bad(format!(
                "outer_momentum {}: give a value in [0, 1)",
                self.outer_momentum
            ));
        }
        if self.outer_every == 0 {
            return bad("outer_every must be positive".into());
        }
        Ok(())
    }
}

/// What a training run did.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct TrainReport {
    /// Mean loss over the replicas at every inner step.
    pub losses: Vec<f32>,
    /// Parameters of the model.
    pub parameters: usize,
    /// Tokens trained on, every replica together.
    pub tokens: u64,
    /// Wall time of the training loop.
    pub seconds: f64,
    /// Outer rounds closed.
    pub outer_rounds: u64,
    /// Pseudo-gradient bytes the replicas sent each other.
    pub exchange_bytes: u64,
    /// What a ring all-reduce of fp32 gradients every inner step would have sent.
    pub dense_allreduce_bytes: u64,
    /// What DiLoCo with dense fp32 pseudo-gradients would have sent, in the same exchange.
    pub uncompressed_diloco_bytes: u64,
    /// Activation and gradient bytes between the stages of the pipelines.
    pub pipeline_bytes: u64,
}

impl TrainReport {
    /// Tokens per second of wall time.
    pub fn tokens_per_second(&self) -> f64 {
        self.tokens as f64 / self.seconds.max(1e-9)
    }
}

/// `count` windows of `len + 1` ids from `ids` at random offsets.
fn sample_windows(ids: &[u32], len: usize, count: usize, rng: &mut impl Rng) -> Vec<Microbatch> {
    (0..count)
        .map(|_| {
            let start = rng.random_range(0..ids.len() - len);
            Microbatch::from_window(&ids[start..start + len + 1])
        })
        .collect()
}

/// The node keys of a run, by replica then stage.
type RunKeys = Vec<Vec<Arc<NodeKey>>>;

/// The run the harness trains: one stage per range, `replicas` node keys each, and `trainer` as
/// the one key that sends microbatches; signed by a throwaway owner key. The node keys, by
/// replica then stage.
fn local_run(
    model_id: &str,
    ranges: &[LayerRange],
    replicas: usize,
    trainer: &NodeKey,
) -> Result<(RunManifest, RunKeys), NodeError> {
    let keys: RunKeys = (0..replicas)
        .map(|_| {
            ranges
                .iter()
                .map(|_| Arc::new(NodeKey::generate()))
                .collect()
        })
        .collect();
    let stages = ranges
        .iter()
        .enumerate()
        .map(|(s, &layers)| RunStage {
            layers,
            replicas: keys.iter().map(|chain| chain[s].id()).collect(),
        })
        .collect();
    let body = RunBody {
        run_id: "neuroshard-train".into(),
        model_id: model_id.to_string(),
        stages,
        trainers: vec![trainer.id()],
        allow_put_checkpoint: false,
    };
    let run = RunManifest::sign(body, &NodeKey::generate())
        .map_err(|e| NodeError::Config(e.to_string()))?;
    Ok((run, keys))
}

/// The training nodes: `options.replicas` chains of one node per range, on loopback, each
/// stage's replicas told of each other, all of `run` with the keys `keys` names.
async fn start_replicas(
    options: &TrainOptions,
    model_dir: &std::path::Path,
    ranges: &[LayerRange],
    (run, keys): (RunManifest, RunKeys),
    progress: &impl Fn(&str),
) -> Result<LocalSwarm, NodeError> {
    let training = TrainingConfig {
        run: Some(Arc::new(run)),
        inner: TrainConfig {
            lr: options.lr,
            warmup_steps: options.warmup,
            decay_steps: match options.decay {
                true => (options.steps as u64).saturating_sub(options.warmup).max(1),
                false => 0,
            },
            ..TrainConfig::default()
        },
        outer_every: options.outer_every,
        compression: options.compression,
        outer_lr: options.outer_lr,
        outer_momentum: options.outer_momentum,
        ..TrainingConfig::default()
    };
    let mut swarm = LocalSwarm::tracker_only().await?;
    for (r, chain) in keys.iter().enumerate() {
        for (range, key) in ranges.iter().zip(chain) {
            progress(&format!(
                "starting replica {r}'s node for layers {range}..."
            ));
            let train = |config: &mut crate::node::NodeConfig| {
                config.train = Some(training.clone());
                config.key = Some(key.clone());
            };
            swarm
                .add_node_with(model_dir, range.start, range.end, train)
                .await?;
        }
    }
    for s in 0..ranges.len() {
        let stage = swarm.nodes.iter().skip(s).step_by(ranges.len());
        let addrs: Vec<String> = stage.clone().map(NodeHandle::advertised).collect();
        for node in stage {
            node.set_training_replicas(addrs.clone());
        }
    }
    Ok(swarm)
}

/// Adds to `report` what the replicas exchanged, the parameters of one replica (`first`), and
/// what dense all-reduce and uncompressed DiLoCo would have sent instead.
fn count_exchange(
    report: &mut TrainReport,
    all: &[NodeHandle],
    first: &[NodeHandle],
    options: &TrainOptions,
) -> Result<(), NodeError> {
    for node in all {
        let snapshot = node.training_snapshot().ok_or_else(|| {
            NodeError::BadRequest(format!("node {} never trained", node.layers()))
        })?;
        report.exchange_bytes += snapshot.exchange_bytes_sent;
        report.outer_rounds = report.outer_rounds.max(snapshot.outer_round);
    }
    report.parameters = first
        .iter()
        .map(|n| n.training_snapshot().map_or(0, |s| s.parameters.len()))
        .sum();
    let n = options.replicas as u64;
    let fp32_bytes = 4 * report.parameters as u64;
    // A ring all-reduce has every replica send 2(n-1)/n of the gradient each step.
    report.dense_allreduce_bytes = options.steps as u64 * 2 * (n - 1) * fp32_bytes;
    // Dense DiLoCo: each replica's whole pseudo-gradient to each other replica, every round.
    report.uncompressed_diloco_bytes = report.outer_rounds * n * (n - 1) * fp32_bytes;
    Ok(())
}

impl TrainOptions {
    /// The corpus as the model's tokens, refused when it cannot fill one batch of windows.
    fn corpus_ids(&self, model_dir: &std::path::Path) -> Result<Vec<u32>, NodeError> {
        let ids = TextTokenizer::for_model_dir(model_dir)?.encode(&self.corpus)?;
        if ids.len() <= self.sequence + 1 || self.sequence == 0 || self.batch == 0 {
            return Err(NodeError::Config(format!(
                "a corpus of {} tokens cannot fill windows of {} (batch {})",
                ids.len(),
                self.sequence,
                self.batch
            )));
        }
        Ok(ids)
    }

    /// What the run does, in a line.
    fn describe(&self, stages: usize) -> String {
        format!(
            "training {stages} stages × {} replicas for {} steps of {} × {} tokens (outer round \
             every {} steps, {:?})",
            self.replicas,
            self.steps,
            self.batch,
            self.sequence,
            self.outer_every,
            self.compression
        )
    }
}

/// Writes the weights of one replica (`first`: its stages in order) as a model in `dir`.
fn save_replica(
    dir: &std::path::Path,
    first: &[NodeHandle],
    info: &ModelInfo,
    options: &TrainOptions,
) -> Result<(), NodeError> {
    let mut parameters = Vec::new();
    for node in first {
        parameters.extend(
            node.training_snapshot()
                .map(|s| s.parameters)
                .unwrap_or_default(),
        );
    }
    let metadata = HashMap::from([
        ("neuroshard_seed".to_string(), options.seed.to_string()),
        ("neuroshard_steps".to_string(), options.steps.to_string()),
    ]);
    write_trained(dir, &info.config, &parameters, WireDType::BF16, metadata)?;
    Ok(())
}

impl TrainReport {
    /// Counts one step of every replica; the mean loss.
    fn step(
        &mut self,
        results: Vec<Result<neuroshard_client::StepReport, NodeError>>,
    ) -> Result<f32, NodeError> {
        let replicas = results.len() as f32;
        let mut loss = 0.0;
        for result in results {
            let r = result?;
            loss += r.loss / replicas;
            self.tokens += r.tokens as u64;
            self.pipeline_bytes += r.bytes_sent + r.bytes_received;
        }
        self.losses.push(loss);
        Ok(loss)
    }
}

pub async fn run_training(
    options: TrainOptions,
    progress: impl Fn(&str),
) -> Result<TrainReport, NodeError> {
    options.check()?;
    let scratch = scratch_dir()?;
    let spec = ModelSpec {
        seed: options.seed,
        ..options.spec.clone()
    };
    let model_dir = model_dir_or(&scratch, options.model_dir.as_ref(), &spec)?;
    let info = ModelInfo::read(&model_dir)?;
    let ids = options.corpus_ids(&model_dir)?;
    let ranges = split_layers(info.config.num_hidden_layers as u32, options.stages);
    let trainer = Arc::new(NodeKey::generate());
    let run = local_run(&info.id, &ranges, options.replicas, &trainer)?;
    let swarm = start_replicas(&options, &model_dir, &ranges, run, &progress).await?;
    // nodes[r][s]: stage s of replica r.
    let nodes: Vec<&[NodeHandle]> = swarm.nodes.chunks(ranges.len()).collect();
    let client = SwarmClient::connect(swarm.vouched_client(trainer)).await?;
    let mut sessions = Vec::new();
    for chain in &nodes {
        sessions.push(client.train_session(chain.iter().map(NodeHandle::hop).collect())?);
    }
    progress(&options.describe(ranges.len()));
    let started = Instant::now();
    let mut report = TrainReport::default();
    let mut rngs: Vec<_> = (0..options.replicas)
        .map(|r| rand_chacha::ChaCha8Rng::seed_from_u64(options.seed ^ ((r as u64) << 32)))
        .collect();
    for step in 0..options.steps {
        let batches: Vec<Vec<Microbatch>> = rngs
            .iter_mut()
            .map(|rng| sample_windows(&ids, options.sequence, options.batch, rng))
            .collect();
        let steps = sessions
            .iter_mut()
            .zip(&batches)
            .map(|(session, batch)| session.step(batch));
        let loss = report.step(futures::future::join_all(steps).await)?;
        let every = (options.steps / 20).max(1);
        if step % every == 0 || step + 1 == options.steps {
            progress(&format!("step {:>5}  loss {loss:.4}", step + 1));
        }
    }
    report.seconds = started.elapsed().as_secs_f64();
    count_exchange(&mut report, &swarm.nodes, nodes[0], &options)?;
    if let Some(dir) = &options.save {
        save_replica(dir, nodes[0], &info, &options)?;
        progress(&format!("wrote the trained model to {}", dir.display()));
    }
    drop(sessions);
    drop(client);
    swarm.shutdown().await;
    Ok(report)
}
