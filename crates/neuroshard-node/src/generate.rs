//! Generation over any [`Pipeline`]: the swarm, or a local model as the reference. Greedy by
//! default; sampled at the client with a seed, so the swarm and a local run give the same
//! tokens for the same seed.

use std::future::Future;
use std::path::Path;
use std::time::Instant;

use neuroshard_model::{
    KvCache, ModelInfo, Sampler, SamplingParams, Shard, ShardInput, ShardOutput,
};

use crate::NodeError;

/// Something that turns new tokens at a position into the logits of the last one.
pub trait Pipeline {
    /// Runs `ids` at absolute positions `start_pos..`; returns the last token's logits.
    fn step(
        &mut self,
        start_pos: usize,
        ids: &[u32],
    ) -> impl Future<Output = Result<Vec<f32>, NodeError>> + Send;
}

/// The whole model in this process: the reference the swarm must match.
#[derive(Debug)]
pub struct LocalPipeline {
    shard: Shard,
    cache: KvCache,
}

impl LocalPipeline {
    /// Loads every layer of the model in `dir`.
    pub fn load(dir: &Path) -> Result<Self, NodeError> {
        let info = ModelInfo::read(dir)?;
        let device = neuroshard_model::default_device();
        let shard = Shard::load(dir, 0..info.config.num_hidden_layers, &device)?;
        if !neuroshard_model::is_cpu(&device) {
            // Kernels compiled now, not inside the first timed step.
            shard.warm_up()?;
        }
        Ok(Self {
            shard,
            cache: KvCache::new(),
        })
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

/// One generated token and the five best candidates it was chosen from.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct StepReport {
    /// The chosen token.
    pub token: u32,
    /// Top-5 `(token id, logit)`, best first.
    pub top5: Vec<(u32, f32)>,
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
    /// Per generated token: choice, top-5, time.
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
        sampling: SamplingParams::default(),
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
    if prompt.is_empty() {
        return Err(NodeError::BadRequest("the prompt is empty".into()));
    }
    let mut sampler = Sampler::new(options.sampling)?;
    let max_new = options.max_new_tokens;
    let mut steps: Vec<StepReport> = Vec::with_capacity(max_new);
    let mut history: Vec<u32> = prompt.to_vec();
    let mut prefill_ms = 0.0;
    let mut next: Vec<u32> = prompt.to_vec();
    let mut pos = 0;
    let mut finish = Finish::Length;
    while steps.len() < max_new {
        let started = Instant::now();
        let logits = pipeline.step(pos, &next).await?;
        let ms = started.elapsed().as_secs_f64() * 1000.0;
        pos += next.len();
        if logits.is_empty() {
            return Err(NodeError::BadRequest("empty logits".into()));
        }
        let token = sampler.choose(&logits, &history)?;
        if steps.is_empty() {
            prefill_ms = ms;
        }
        steps.push(StepReport {
            token,
            top5: top_k(&logits, 5),
            ms,
        });
        history.push(token);
        let go_on = on_token(pipeline, &steps);
        if options.stop_ids.contains(&token) || !go_on {
            finish = Finish::Stop;
            break;
        }
        next = vec![token];
    }
    let decode_ms: f64 = steps.iter().skip(1).map(|s| s.ms).sum();
    Ok(GenerationReport {
        prompt_ids: prompt.to_vec(),
        decode_tokens_per_s: if decode_ms > 0.0 {
            (steps.len() - 1) as f64 / (decode_ms / 1000.0)
        } else {
            0.0
        },
        generated_ids: history.split_off(prompt.len()),
        steps,
        prefill_ms,
        finish,
    })
}

/// The `k` largest logits with their ids, best first; ties go to the lower id.
pub fn top_k(logits: &[f32], k: usize) -> Vec<(u32, f32)> {
    let mut indexed: Vec<(u32, f32)> = logits
        .iter()
        .enumerate()
        .map(|(i, &v)| (i as u32, v))
        .collect();
    indexed.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
    indexed.truncate(k);
    indexed
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
