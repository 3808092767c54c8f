//! Generation over any [`Pipeline`]: the swarm, or a local model as the reference. Greedy by
//! default, or sampled with a seed; the swarm chooses the token at the node that runs the last
//! layer and a local run here, the same token for the same seed (`neuroshard_model::Sampler`).

use std::future::Future;
use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use neuroshard_model::{
    Chosen, KvCache, ModelInfo, Precision, Sampler, SamplingParams, Shard, ShardInput, ShardOutput,
};

pub use neuroshard_model::sampling::top_k;

use neuroshard_net::NodeError;

/// Something that turns new tokens at a position into the logits of the last one, or the
/// token chosen after it.
pub trait Pipeline: Send {
    /// Runs `ids` at absolute positions `start_pos..`; returns the last token's logits.
    fn step(
        &mut self,
        start_pos: usize,
        ids: &[u32],
    ) -> impl Future<Output = Result<Vec<f32>, NodeError>> + Send;

    /// Runs `ids` at `start_pos..` and chooses the token after them as `sampler` says. Here,
    /// from the whole logits; a swarm chooses at the node that runs the last layer, so only
    /// the token and its candidates travel back.
    fn choose(
        &mut self,
        start_pos: usize,
        ids: &[u32],
        sampler: &Sampler,
    ) -> impl Future<Output = Result<Chosen, NodeError>> + Send {
        async move {
            let logits = self.step(start_pos, ids).await?;
            Ok(sampler.choose(&logits, (start_pos + ids.len()) as u64)?)
        }
    }
}

/// The whole model in this process: the reference the swarm must match.
#[derive(Debug)]
pub struct LocalPipeline {
    shard: Arc<Shard>,
    cache: KvCache,
}

impl LocalPipeline {
    /// Loads every layer of the model in `dir`.
    pub fn load(dir: &Path) -> Result<Self, NodeError> {
        Ok(Self::new(Arc::new(Self::load_shard(dir)?)))
    }

    /// Every layer of the model in `dir`, on the default device (warmed up on a GPU), to
    /// share between sessions.
    pub fn load_shard(dir: &Path) -> Result<Shard, NodeError> {
        let info = ModelInfo::read(dir)?;
        Self::load_layers(dir, 0..info.config.num_hidden_layers, Precision::F32)
    }

    /// Layers `range` of the model in `dir`, its projections held at `precision`, on the
    /// default device (warmed up on a GPU).
    pub fn load_layers(
        dir: &Path,
        range: std::ops::Range<usize>,
        precision: Precision,
    ) -> Result<Shard, NodeError> {
        let device = neuroshard_model::default_device();
        let shard = Shard::load_at(dir, range, &device, precision)?;
        if !neuroshard_model::is_cpu(&device) {
            // Kernels compiled now, not inside the first timed step.
            shard.warm_up()?;
        }
        Ok(shard)
    }

    /// A session of its own over a loaded whole-model `shard`.
    pub fn new(shard: Arc<Shard>) -> Self {
        Self {
            shard,
            cache: KvCache::new(),
        }
    }

    /// The model.
    pub fn info(&self) -> &ModelInfo {
        self.shard.info()
    }
}

impl Pipeline for LocalPipeline {
    /// Computes on the calling thread: the local reference has no reactor to keep free.
    async fn step(&mut self, start_pos: usize, ids: &[u32]) -> Result<Vec<f32>, NodeError> {
        let input = ShardInput::Tokens(ids.to_vec());
        match self
            .shard
            .forward(&mut self.cache, start_pos, self.shard.range(), input)?
        {
            ShardOutput::Logits(logits) => Ok(logits),
            ShardOutput::Hidden(_) => unreachable!("a shard holding every layer returns logits"),
        }
    }
}

/// Candidates a step reports at least.
pub const REPORTED: usize = 5;

/// One generated token and the best candidates it was chosen from.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct StepReport {
    /// The chosen token.
    pub token: u32,
    /// The chosen token's raw logit.
    pub logit: f32,
    /// `log Σ exp(logit)` over the vocabulary: a token's log-probability is its logit minus
    /// this.
    pub logsumexp: f32,
    /// The best `(token id, logit)` candidates, best first: [`REPORTED`], or
    /// [`GenerateOptions::candidates`] where that is more.
    pub top: Vec<(u32, f32)>,
    /// Wall time of the step, ms.
    pub ms: f64,
}

/// Everything a generation produced and how long it took.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct GenerationReport {
    /// Prompt token ids.
    pub prompt_ids: Vec<u32>,
    /// Generated token ids.
    pub generated_ids: Vec<u32>,
    /// Per generated token: choice, candidates, time.
    pub steps: Vec<StepReport>,
    /// Prefill (prompt) time, ms.
    pub prefill_ms: f64,
    /// Decode tokens per second (tokens after the first over their time).
    pub decode_tokens_per_s: f64,
    /// Why generation ended.
    pub finish: Finish,
}

/// Why a generation ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Finish {
    /// An end-of-sequence token, or the caller saw a stop string.
    Stop,
    /// `max_new_tokens` were generated.
    Length,
}

/// How a generation runs: its length, what ends it, and how tokens are chosen.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct GenerateOptions {
    /// Tokens to generate at most.
    pub max_new_tokens: usize,
    /// Tokens that end the generation (the model's end-of-sequence tokens); the stop token is
    /// kept as the last generated token.
    pub stop_ids: Vec<u32>,
    /// Greedy (the default) or sampled.
    pub sampling: SamplingParams,
    /// Candidates each step reports when more than [`REPORTED`] (at most 20): what OpenAI's
    /// `top_logprobs` asks for.
    pub candidates: usize,
}

/// Greedy decoding of up to `max_new` tokens after `prompt`, stopping after any of `stop`.
/// `on_step` sees the pipeline after each generated token (for progress and fault injection).
pub async fn generate<P: Pipeline>(
    pipeline: &mut P,
    prompt: &[u32],
    max_new: usize,
    stop: &[u32],
    mut on_step: impl FnMut(&P, usize),
) -> Result<GenerationReport, NodeError> {
    let options = GenerateOptions {
        max_new_tokens: max_new,
        stop_ids: stop.to_vec(),
        ..Default::default()
    };
    generate_with(pipeline, prompt, &options, |p, steps| {
        on_step(p, steps.len());
        true
    })
    .await
}

/// Generates after `prompt` as `options` say. `on_token` sees the pipeline and the steps so far
/// after each token, and ends the generation early by returning false (a stop string).
pub async fn generate_with<P: Pipeline>(
    pipeline: &mut P,
    prompt: &[u32],
    options: &GenerateOptions,
    mut on_token: impl FnMut(&P, &[StepReport]) -> bool,
) -> Result<GenerationReport, NodeError> {
    let mut generation = Generation::new(prompt, options)?;
    while generation.step(pipeline).await?.is_some() {
        if !on_token(pipeline, &generation.steps) {
            generation.stop();
        }
    }
    Ok(generation.report())
}

/// A generation taken one token at a time, for callers that do IO between tokens (a stream
/// to a client): [`Generation::step`] returns each new token until the generation ends.
#[derive(Debug)]
pub struct Generation {
    options: GenerateOptions,
    sampler: Sampler,
    prompt_len: usize,
    /// The prompt and the tokens so far.
    history: Vec<u32>,
    steps: Vec<StepReport>,
    /// What the next step runs: the prompt, then the last token.
    next: Vec<u32>,
    pos: usize,
    finish: Option<Finish>,
}

impl Generation {
    /// A generation after `prompt`; the options are checked here.
    pub fn new(prompt: &[u32], options: &GenerateOptions) -> Result<Self, NodeError> {
        if prompt.is_empty() {
            return Err(NodeError::BadRequest("the prompt is empty".into()));
        }
        let mut sampler =
            Sampler::new(options.sampling)?.reporting(options.candidates.max(REPORTED));
        sampler.saw_all(prompt);
        Ok(Self {
            sampler,
            options: options.clone(),
            prompt_len: prompt.len(),
            history: prompt.to_vec(),
            steps: Vec::with_capacity(options.max_new_tokens.min(4096)),
            next: prompt.to_vec(),
            pos: 0,
            finish: (options.max_new_tokens == 0).then_some(Finish::Length),
        })
    }

    /// Runs one step: the prompt first, then each token. `None` once the generation ended (an
    /// end-of-sequence token was the last, `max_new_tokens` were made, or [`Self::stop`]).
    pub async fn step<P: Pipeline>(
        &mut self,
        pipeline: &mut P,
    ) -> Result<Option<&StepReport>, NodeError> {
        if self.finish.is_some() {
            return Ok(None);
        }
        let started = Instant::now();
        let chosen = pipeline.choose(self.pos, &self.next, &self.sampler).await?;
        let ms = started.elapsed().as_secs_f64() * 1000.0;
        self.pos += self.next.len();
        let token = chosen.token;
        self.sampler.saw(token);
        self.history.push(token);
        self.next = vec![token];
        self.steps.push(StepReport {
            token,
            logit: chosen.logit,
            logsumexp: chosen.logsumexp,
            top: chosen.top,
            ms,
        });
        if self.options.stop_ids.contains(&token) {
            self.finish = Some(Finish::Stop);
        } else if self.steps.len() >= self.options.max_new_tokens {
            self.finish = Some(Finish::Length);
        }
        Ok(self.steps.last())
    }

    /// Ends the generation here (the caller saw a stop string): it finishes as `Stop`.
    pub fn stop(&mut self) {
        self.finish = Some(Finish::Stop);
    }

    /// Tokens of the prompt.
    pub fn prompt_tokens(&self) -> usize {
        self.prompt_len
    }

    /// Tokens generated so far.
    pub fn generated(&self) -> &[u32] {
        &self.history[self.prompt_len..]
    }

    /// Why the generation ended, once it has.
    pub fn finish(&self) -> Option<Finish> {
        self.finish
    }

    /// What was generated and how long it took.
    pub fn report(self) -> GenerationReport {
        let decode_ms: f64 = self.steps.iter().skip(1).map(|s| s.ms).sum();
        let decode_tokens_per_s = if decode_ms > 0.0 {
            (self.steps.len() - 1) as f64 / (decode_ms / 1000.0)
        } else {
            0.0
        };
        let mut history = self.history;
        GenerationReport {
            generated_ids: history.split_off(self.prompt_len),
            prompt_ids: history,
            prefill_ms: self.steps.first().map_or(0.0, |s| s.ms),
            decode_tokens_per_s,
            steps: self.steps,
            finish: self.finish.unwrap_or(Finish::Length),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn top_k_orders_by_logit_then_id() {
        assert_eq!(
            top_k(&[0.5, 2.0, 2.0, -1.0], 3),
            vec![(1, 2.0), (2, 2.0), (0, 0.5)]
        );
    }
}
