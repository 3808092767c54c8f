//! Training one pipeline stage: forward over whole sequences with autodiff, backward from the
//! next stage's gradient (or from the loss on the last stage), gradient accumulation across
//! microbatches and AdamW inner steps.
//!
//! A stage keeps each microbatch's autodiff graph from its forward until its backward, so a
//! backward costs no recomputation. The gradient it accumulates is the **sum** over microbatches
//! of the gradient of each microbatch's mean token cross-entropy; a step applies AdamW to the
//! mean over those microbatches.
//!
//! Parameters and gradients can be read and written as one flat `f32` vector in the shard's
//! parameter order (embeddings, layers, final norm, head). Stages of one model concatenated in
//! layer order give the whole model's vector, which the gradient-equality tests and the DiLoCo
//! outer loop rely on.

use std::collections::HashMap;
use std::ops::Range;
use std::path::Path;

use burn::module::{Module, ModuleVisitor, Param};
use burn::nn::loss::CrossEntropyLossConfig;
use burn::optim::{AdamWConfig, GradientsAccumulator, GradientsParams, ModuleOptimizer};
use burn::tensor::{Device, Int, Tensor, TensorData};

use crate::layout::{Fill, flatten, to_vec};
use crate::shard::{Positions, Weights};
use crate::{ModelError, Shard, ShardInput};

/// Inner-optimizer settings of a stage.
#[derive(Debug, Clone, PartialEq)]
pub struct TrainConfig {
    /// AdamW learning rate at its peak.
    pub lr: f64,
    /// Inner steps over which the learning rate climbs linearly to `lr` (0: it starts there).
    pub warmup_steps: u64,
    /// Inner steps after the warm-up over which it falls along a half cosine to
    /// `lr × final_lr_fraction`, where it then stays (0: it stays at `lr`).
    pub decay_steps: u64,
    /// Where the decay ends, as a share of `lr`.
    pub final_lr_fraction: f64,
    /// AdamW decoupled weight decay.
    pub weight_decay: f32,
    /// Microbatches whose forward ran and whose backward has not, at most: each holds its
    /// activations until its backward.
    pub max_pending: usize,
    /// Longest sequence a microbatch may hold.
    pub max_sequence: usize,
}

impl Default for TrainConfig {
    fn default() -> Self {
        Self {
            lr: 3e-3,
            warmup_steps: 0,
            decay_steps: 0,
            final_lr_fraction: 0.1,
            weight_decay: 0.0,
            max_pending: 16,
            max_sequence: 512,
        }
    }
}

impl TrainConfig {
    /// The learning rate of inner step `step` (counting from 0).
    pub fn lr_at(&self, step: u64) -> f64 {
        if step < self.warmup_steps {
            return self.lr * (step + 1) as f64 / self.warmup_steps as f64;
        }
        if self.decay_steps == 0 {
            return self.lr;
        }
        let done = ((step - self.warmup_steps) as f64 / self.decay_steps as f64).min(1.0);
        let floor = self.final_lr_fraction;
        self.lr * (floor + (1.0 - floor) * 0.5 * (1.0 + (std::f64::consts::PI * done).cos()))
    }
}

/// What a training forward returns.
#[derive(Debug, Clone, PartialEq)]
pub enum TrainOutput {
    /// Hidden states `[tokens, hidden]` for the next stage.
    Hidden(Vec<f32>),
    /// Mean cross-entropy of the microbatch's targets (the last stage).
    Loss(f32),
}

/// One microbatch between its forward and its backward.
/// What a stage's forward ends in: the last stage's mean cross-entropy against `targets`, the
/// others' hidden states `[1, tokens, hidden]`; kept for the backward, and as the reply.
fn stage_output(
    shard: &Shard,
    hidden: Tensor<3>,
    targets: Option<Tensor<1, Int>>,
    tokens: usize,
) -> (Output, TrainOutput) {
    match targets {
        Some(targets) => {
            let vocab = shard.info.config.vocab_size;
            let logits = shard.logits(hidden).reshape([tokens, vocab]);
            let loss = CrossEntropyLossConfig::new()
                .init(&shard.device)
                .forward(logits, targets);
            let value = to_vec(loss.clone().detach())[0];
            (Output::Loss(loss), TrainOutput::Loss(value))
        }
        None => {
            let values = to_vec(hidden.clone().detach());
            (Output::Hidden(hidden), TrainOutput::Hidden(values))
        }
    }
}

struct Pending {
    /// Tokens in the microbatch.
    tokens: usize,
    /// The hidden-state input, tracked for its gradient (none on the first stage).
    input: Option<Tensor<3>>,
    /// What the forward produced: hidden states `[1, n, hidden]`, or the loss `[1]`.
    output: Output,
}

enum Output {
    Hidden(Tensor<3>),
    Loss(Tensor<1>),
}

/// A shard being trained: its weights on an autodiff device, an AdamW state, and the gradient
/// accumulated since the last step.
pub struct TrainShard {
    shard: Shard,
    config: TrainConfig,
    optim: ModuleOptimizer,
    accumulated: GradientsAccumulator<Weights>,
    microbatches: usize,
    pending: HashMap<String, Pending>,
    steps: u64,
}

impl std::fmt::Debug for TrainShard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TrainShard")
            .field("range", &self.shard.range)
            .field("microbatches", &self.microbatches)
            .field("pending", &self.pending.len())
            .field("steps", &self.steps)
            .finish()
    }
}

impl TrainShard {
    /// Loads layers `range` of the model in `dir` for training on `device` (autodiff is added).
    pub fn load(
        dir: &Path,
        range: Range<usize>,
        device: &Device,
        config: TrainConfig,
    ) -> Result<Self, ModelError> {
        let shard = Shard::load(dir, range, &device.clone().autodiff())?;
        Ok(Self::new(shard, config))
    }

    fn new(mut shard: Shard, config: TrainConfig) -> Self {
        shard.weights = shard.weights.train();
        let optim = AdamWConfig::new()
            .with_weight_decay(config.weight_decay)
            .with_epsilon(1e-8)
            .init();
        Self {
            shard,
            config,
            optim,
            accumulated: GradientsAccumulator::new(),
            microbatches: 0,
            pending: HashMap::new(),
            steps: 0,
        }
    }

    /// The shard being trained (its forward runs inference on the current weights).
    pub fn shard(&self) -> &Shard {
        &self.shard
    }

    /// Inner steps taken.
    pub fn steps(&self) -> u64 {
        self.steps
    }

    /// Microbatches whose backward has been accumulated since the last step.
    pub fn accumulated_microbatches(&self) -> usize {
        self.microbatches
    }

    /// Runs the whole shard on one microbatch and keeps its graph for [`Self::backward`].
    ///
    /// The first stage takes token ids, the others hidden states `[tokens, hidden]`. The last
    /// stage needs `targets` (one next-token id per position) and returns the mean
    /// cross-entropy; the others return hidden states. Running a microbatch id again replaces it.
    pub fn forward(
        &mut self,
        microbatch: &str,
        input: ShardInput,
        targets: Option<&[u32]>,
    ) -> Result<TrainOutput, ModelError> {
        let shard = &self.shard;
        let config = &shard.info.config;
        let range = shard.range.clone();
        shard.check_request(&range, &input)?;
        let tokens = input.tokens(config.hidden_size);
        if tokens > self.config.max_sequence {
            return Err(ModelError::Request(format!(
                "a microbatch of {tokens} tokens is longer than this stage's limit of {}",
                self.config.max_sequence
            )));
        }
        let last = range.end == config.num_hidden_layers;
        let targets = self.stage_targets(last, targets, tokens)?;
        if !self.pending.contains_key(microbatch) && self.pending.len() >= self.config.max_pending {
            return Err(ModelError::Request(format!(
                "{} microbatches are waiting for their backward; at most {} may",
                self.pending.len(),
                self.config.max_pending
            )));
        }
        let input_tensor = match &input {
            ShardInput::Hidden(_) => Some(shard.embed_input(input.clone(), tokens)?.require_grad()),
            ShardInput::Tokens(_) => None,
        };
        let mut hidden = match &input_tensor {
            Some(t) => t.clone(),
            None => shard.embed_input(input, tokens)?,
        };
        let positions = Positions::new(config, 0, tokens, &shard.device);
        for (layer, index) in shard.weights.layers.iter().zip(shard.range()) {
            hidden = layer.forward(hidden, None, &positions, index, shard.heads);
        }
        let (output, reply) = stage_output(shard, hidden, targets, tokens);
        self.pending.insert(
            microbatch.to_string(),
            Pending {
                tokens,
                input: input_tensor,
                output,
            },
        );
        Ok(reply)
    }

    /// The targets a stage takes: the last stage's, checked; none for the others.
    fn stage_targets(
        &self,
        last: bool,
        targets: Option<&[u32]>,
        tokens: usize,
    ) -> Result<Option<Tensor<1, Int>>, ModelError> {
        match (last, targets) {
            (true, Some(t)) => Ok(Some(self.check_targets(t, tokens)?)),
            (true, None) => Err(ModelError::Request(
                "the last stage needs the microbatch's targets".into(),
            )),
            (false, Some(_)) => Err(ModelError::Request(
                "targets go to the last stage only".into(),
            )),
            (false, None) => Ok(None),
        }
    }

    fn check_targets(&self, targets: &[u32], tokens: usize) -> Result<Tensor<1, Int>, ModelError> {
        let vocab = self.shard.info.config.vocab_size;
        if targets.len() != tokens {
            return Err(ModelError::Request(format!(
                "{} targets for {tokens} tokens; give one per token",
                targets.len()
            )));
        }
        if let Some(bad) = targets.iter().find(|&&t| t as usize >= vocab) {
            return Err(ModelError::Request(format!(
                "target id {bad} is outside the vocabulary of {vocab}"
            )));
        }
        let ids: Vec<i64> = targets.iter().map(|&t| t as i64).collect();
        Ok(Tensor::from_data(
            TensorData::new(ids, [tokens]),
            &self.shard.device,
        ))
    }

    /// Tokens of a microbatch waiting for its backward.
    pub fn pending_tokens(&self, microbatch: &str) -> Option<usize> {
        self.pending.get(microbatch).map(|p| p.tokens)
    }

    /// Backpropagates one microbatch and adds its parameter gradients to the accumulated ones.
    ///
    /// The last stage starts from its loss and takes no `grad_output`; the others take the
    /// gradient of their output hidden states, `[tokens, hidden]`. Returns the gradient of the
    /// input hidden states, except on the first stage, whose input is token ids.
    pub fn backward(
        &mut self,
        microbatch: &str,
        grad_output: Option<Vec<f32>>,
    ) -> Result<Option<Vec<f32>>, ModelError> {
        let Some(pending) = self.pending.get(microbatch) else {
            return Err(ModelError::Request(format!(
                "microbatch {microbatch:?} has no forward waiting for its backward"
            )));
        };
        let hidden = self.shard.info.config.hidden_size;
        let loss = match (&pending.output, grad_output) {
            (Output::Loss(loss), None) => loss.clone(),
            (Output::Loss(_), Some(_)) => {
                return Err(ModelError::Request(
                    "the last stage starts its backward from the loss; send no gradient".into(),
                ));
            }
            (Output::Hidden(_), None) => {
                return Err(ModelError::Request(
                    "the gradient of this stage's output is missing".into(),
                ));
            }
            (Output::Hidden(out), Some(grad)) => {
                let [_, tokens, _] = out.dims();
                if grad.len() != tokens * hidden {
                    return Err(ModelError::Request(format!(
                        "a gradient of {} values for an output of {tokens} × {hidden}",
                        grad.len()
                    )));
                }
                if let Some(i) = grad.iter().position(|v| !v.is_finite()) {
                    return Err(ModelError::Request(format!(
                        "the output gradient's value {i} is not finite"
                    )));
                }
                let grad = Tensor::<3>::from_data(
                    TensorData::new(grad, [1, tokens, hidden]),
                    &self.shard.device,
                );
                // d/dθ Σ out ⊙ grad is the vector-Jacobian product the chain rule needs.
                (out.clone() * grad).sum()
            }
        };
        let pending = self.pending.remove(microbatch).expect("looked up above");
        let mut grads = loss.backward();
        let grad_input = pending.input.as_ref().map(|input| {
            input
                .grad_remove(&mut grads)
                .map(to_vec)
                .unwrap_or_else(|| vec![0.0; input.dims().iter().product()])
        });
        let params = GradientsParams::from_grads(grads, &self.shard.weights);
        self.accumulated.accumulate(&self.shard.weights, params);
        self.microbatches += 1;
        Ok(grad_input)
    }

    /// Takes one AdamW step on the mean of the accumulated gradients, at the learning rate the
    /// schedule gives this step, and starts a new accumulation. Microbatches still waiting for their backward are dropped (their graphs
    /// hold the old weights).
    pub fn step(&mut self) -> Result<u64, ModelError> {
        if self.microbatches == 0 {
            return Err(ModelError::Request(
                "no microbatch's backward has run since the last step".into(),
            ));
        }
        let scale = 1.0 / self.microbatches as f64;
        let mut grads = self.accumulated.grads();
        let mut scaler = Scale {
            grads: &mut grads,
            scale,
        };
        self.shard.weights.visit(&mut scaler);
        let weights = std::mem::replace(&mut self.shard.weights, empty_weights());
        self.shard.weights = self
            .optim
            .step(self.config.lr_at(self.steps), weights, grads);
        self.microbatches = 0;
        self.pending.clear();
        self.steps += 1;
        Ok(self.steps)
    }

    /// The accumulated gradient (a sum over microbatches) as one flat vector in parameter
    /// order; zeros for parameters no backward reached.
    pub fn gradients(&mut self) -> Vec<f32> {
        let grads = self.accumulated.grads();
        let out = flatten(&self.shard.weights, Some(&grads));
        self.accumulated.accumulate(&self.shard.weights, grads);
        out
    }

    /// The parameters as one flat vector in parameter order.
    pub fn parameters(&self) -> Vec<f32> {
        self.shard.parameters()
    }

    /// Number of parameters (the length of [`Self::parameters`]).
    pub fn num_parameters(&self) -> usize {
        self.shard.num_parameters()
    }

    /// Replaces every parameter from a flat vector in parameter order. The optimizer state is
    /// kept, as DiLoCo's inner optimizer is across outer steps.
    pub fn set_parameters(&mut self, values: &[f32]) -> Result<(), ModelError> {
        let expected = self.num_parameters();
        if values.len() != expected {
            return Err(ModelError::Request(format!(
                "{} parameter values for a stage of {expected}",
                values.len()
            )));
        }
        if let Some(i) = values.iter().position(|v| !v.is_finite()) {
            return Err(ModelError::Request(format!(
                "parameter value {i} is not finite"
            )));
        }
        let mut fill = Fill {
            values,
            device: self.shard.device.clone(),
        };
        let weights = std::mem::replace(&mut self.shard.weights, empty_weights());
        self.shard.weights = weights.map(&mut fill);
        self.pending.clear();
        Ok(())
    }
}

fn empty_weights() -> Weights {
    Weights {
        embed: None,
        layers: Vec::new(),
        final_norm: None,
        lm_head: None,
        packed_head: None,
    }
}

/// Multiplies every gradient in place by `scale`.
struct Scale<'a> {
    grads: &'a mut GradientsParams,
    scale: f64,
}

impl ModuleVisitor for Scale<'_> {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        if let Some(grad) = self.grads.remove::<D>(param.id) {
            self.grads.register(param.id, grad.mul_scalar(self.scale));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::init::{ModelSpec, write_model};

    fn model() -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        write_model(dir.path(), &ModelSpec::tiny()).unwrap();
        dir
    }

    fn stage(dir: &Path, range: Range<usize>) -> TrainShard {
        TrainShard::load(dir, range, &Device::default(), TrainConfig::default()).unwrap()
    }

    /// A byte window of a sentence: inputs and next-byte targets.
    fn microbatch(offset: usize) -> (Vec<u32>, Vec<u32>) {
        let text = b"It was the best of times, it was the worst of times, it was the age of wisdom";
        let ids: Vec<u32> = text[offset..offset + 25]
            .iter()
            .map(|&b| b as u32)
            .collect();
        (ids[..24].to_vec(), ids[1..].to_vec())
    }

    fn loss(out: TrainOutput) -> f32 {
        match out {
            TrainOutput::Loss(l) => l,
            TrainOutput::Hidden(_) => panic!("expected a loss"),
        }
    }

    fn hidden(out: TrainOutput) -> Vec<f32> {
        match out {
            TrainOutput::Hidden(h) => h,
            TrainOutput::Loss(_) => panic!("expected hidden states"),
        }
    }

    /// Largest difference relative to the largest magnitude.
    fn relative_diff(a: &[f32], b: &[f32]) -> f32 {
        assert_eq!(a.len(), b.len());
        let scale = a.iter().fold(0f32, |m, v| m.max(v.abs())).max(1e-12);
        a.iter()
            .zip(b)
            .map(|(x, y)| (x - y).abs())
            .fold(0.0, f32::max)
            / scale
    }

    #[test]
    fn a_two_stage_backward_gives_the_whole_models_gradients() {
        let dir = model();
        let mut whole = stage(dir.path(), 0..4);
        let mut front = stage(dir.path(), 0..2);
        let mut back = stage(dir.path(), 2..4);
        assert_eq!(
            whole.num_parameters(),
            front.num_parameters() + back.num_parameters()
        );
        for (n, offset) in [0, 30].into_iter().enumerate() {
            let id = format!("mb{n}");
            let (inputs, targets) = microbatch(offset);
            let expected = loss(
                whole
                    .forward(&id, ShardInput::Tokens(inputs.clone()), Some(&targets))
                    .unwrap(),
            );
            assert!(whole.backward(&id, None).unwrap().is_none());
            let mid = hidden(
                front
                    .forward(&id, ShardInput::Tokens(inputs), None)
                    .unwrap(),
            );
            let got = loss(
                back.forward(&id, ShardInput::Hidden(mid), Some(&targets))
                    .unwrap(),
            );
            assert!((expected - got).abs() < 1e-5, "{expected} vs {got}");
            let grad_mid = back
                .backward(&id, None)
                .unwrap()
                .expect("an input gradient");
            assert_eq!(grad_mid.len(), 24 * 64);
            assert!(front.backward(&id, Some(grad_mid)).unwrap().is_none());
        }
        let whole_grads = whole.gradients();
        let mut split = front.gradients();
        split.extend(back.gradients());
        assert!(whole_grads.iter().any(|g| *g != 0.0));
        let diff = relative_diff(&whole_grads, &split);
        assert!(diff < 1e-4, "relative difference {diff}");
        // Reading the gradients does not consume them.
        assert_eq!(whole.gradients(), whole_grads);
    }

    #[test]
    fn adamw_steps_lower_the_loss() {
        let dir = model();
        let mut stage = stage(dir.path(), 0..4);
        let (inputs, targets) = microbatch(0);
        let mut losses = Vec::new();
        for step in 0..30 {
            let id = format!("mb{step}");
            losses.push(loss(
                stage
                    .forward(&id, ShardInput::Tokens(inputs.clone()), Some(&targets))
                    .unwrap(),
            ));
            stage.backward(&id, None).unwrap();
            assert_eq!(stage.step().unwrap(), step + 1);
        }
        let (first, last) = (losses[0], *losses.last().unwrap());
        assert!(last < 0.7 * first, "loss {first} → {last}");
    }

    #[test]
    fn parameters_round_trip_and_bad_values_are_refused() {
        let dir = model();
        let mut stage = stage(dir.path(), 2..4);
        let params = stage.parameters();
        assert_eq!(params.len(), stage.num_parameters());
        let shifted: Vec<f32> = params.iter().map(|p| p + 0.01).collect();
        stage.set_parameters(&shifted).unwrap();
        let back = stage.parameters();
        assert!(relative_diff(&shifted, &back) < 1e-6);
        let err = stage.set_parameters(&params[1..]).unwrap_err().to_string();
        assert!(err.contains("parameter values"), "{err}");
        let mut nan = params.clone();
        nan[7] = f32::NAN;
        let err = stage.set_parameters(&nan).unwrap_err().to_string();
        assert!(err.contains("value 7"), "{err}");
        assert!(relative_diff(&shifted, &stage.parameters()) < 1e-6);
        // The stage still trains after its parameters were replaced.
        let (inputs, targets) = microbatch(0);
        let hidden = vec![0.1; inputs.len() * 64];
        stage
            .forward("a", ShardInput::Hidden(hidden), Some(&targets))
            .unwrap();
        assert!(stage.backward("a", None).unwrap().is_some());
        stage.step().unwrap();
    }

    #[test]
    fn malformed_training_calls_are_refused_by_name() {
        let dir = model();
        let mut front = stage(dir.path(), 0..2);
        let mut back = stage(dir.path(), 2..4);
        let (inputs, targets) = microbatch(0);
        fn err<T: std::fmt::Debug>(r: Result<T, ModelError>) -> String {
            r.unwrap_err().to_string()
        }
        let e = err(back.forward("a", ShardInput::Hidden(vec![0.0; 24 * 64]), None));
        assert!(e.contains("targets"), "{e}");
        let e = err(back.forward(
            "a",
            ShardInput::Hidden(vec![0.0; 24 * 64]),
            Some(&targets[1..]),
        ));
        assert!(e.contains("23 targets for 24 tokens"), "{e}");
        let mut wild = targets.clone();
        wild[3] = 999;
        let e = err(back.forward("a", ShardInput::Hidden(vec![0.0; 24 * 64]), Some(&wild)));
        assert!(e.contains("target id 999"), "{e}");
        let e = err(front.forward("a", ShardInput::Tokens(inputs.clone()), Some(&targets)));
        assert!(e.contains("last stage only"), "{e}");
        let e = err(front.backward("nope", Some(vec![0.0; 24 * 64])));
        assert!(e.contains("\"nope\""), "{e}");
        front
            .forward("a", ShardInput::Tokens(inputs.clone()), None)
            .unwrap();
        let e = err(front.backward("a", Some(vec![0.0; 10])));
        assert!(e.contains("10 values"), "{e}");
        let mut grad = vec![0.0; 24 * 64];
        grad[5] = f32::INFINITY;
        let e = err(front.backward("a", Some(grad)));
        assert!(e.contains("value 5"), "{e}");
        let e = err(front.backward("a", None));
        assert!(e.contains("missing"), "{e}");
        // The refused backwards left the microbatch waiting; a good one still runs.
        assert!(
            front
                .backward("a", Some(vec![0.01; 24 * 64]))
                .unwrap()
                .is_none()
        );
        assert_eq!(front.accumulated_microbatches(), 1);
        let e = err(back.step());
        assert!(e.contains("no microbatch"), "{e}");
        let mut small = TrainShard::load(
            dir.path(),
            0..2,
            &Device::default(),
            TrainConfig {
                max_pending: 1,
                max_sequence: 30,
                ..TrainConfig::default()
            },
        )
        .unwrap();
        small
            .forward("a", ShardInput::Tokens(inputs.clone()), None)
            .unwrap();
        let e = err(small.forward("b", ShardInput::Tokens(inputs.clone()), None));
        assert!(e.contains("waiting for their backward"), "{e}");
        small
            .forward("a", ShardInput::Tokens(inputs), None)
            .unwrap();
        let e = err(small.forward("a", ShardInput::Tokens(vec![1; 31]), None));
        assert!(e.contains("31 tokens"), "{e}");
    }

    #[test]
    fn the_learning_rate_warms_up_then_falls_along_a_cosine_to_its_floor() {
        let config = TrainConfig {
            lr: 1e-3,
            warmup_steps: 10,
            decay_steps: 100,
            final_lr_fraction: 0.1,
            ..TrainConfig::default()
        };
        let close = |a: f64, b: f64| (a - b).abs() < 1e-12;
        assert!(close(config.lr_at(0), 1e-4));
        assert!(close(config.lr_at(9), 1e-3));
        assert!(close(config.lr_at(10), 1e-3));
        assert!(close(config.lr_at(60), 0.55e-3), "{}", config.lr_at(60));
        assert!(close(config.lr_at(110), 1e-4));
        assert!(close(config.lr_at(1000), 1e-4));
        let falling: Vec<f64> = (10..=110).map(|s| config.lr_at(s)).collect();
        assert!(falling.windows(2).all(|w| w[1] <= w[0]));
        assert!(close(TrainConfig::default().lr_at(500), 3e-3));
    }
}
