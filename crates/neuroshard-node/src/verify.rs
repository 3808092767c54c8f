//! Spot checks: re-executing a hop locally to check a worker's output.
//!
//! The requester holds the model's weights and recomputes a sampled hop from that hop's replay
//! log: the earlier inputs are run as one prefill to rebuild the cache, then the checked input
//! alone, which gives exactly the row the worker fingerprinted. Cost grows with the session's
//! length, which is why hops are sampled ([`neuroshard_proof::Reputation::check_rate`]).

use std::path::Path;
use std::sync::Mutex;

use neuroshard_base::LayerRange;
use neuroshard_model::{KvCache, LlamaConfig, Shard, ShardInput};

use crate::NodeError;
use crate::node::{MAX_TOKENS_PER_CALL, last_row};

/// The whole model, loaded by a requester to re-execute sampled hops.
#[derive(Debug)]
pub struct LocalVerifier {
    shard: Mutex<Shard>,
    config: LlamaConfig,
}

impl LocalVerifier {
    /// Loads every layer of the model in `dir`.
    pub fn load(dir: &Path) -> Result<Self, NodeError> {
        let info = neuroshard_model::ModelInfo::read(dir)?;
        let layers = info.config.num_hidden_layers;
        let shard = Shard::load(dir, 0..layers, &neuroshard_model::default_device())?;
        Ok(Self {
            shard: Mutex::new(shard),
            config: info.config,
        })
    }

    /// Id of the model loaded.
    pub fn model_id(&self) -> String {
        self.lock().info().id.clone()
    }

    /// The weights hash an honest worker reports for `layers`.
    pub fn weights_hash(&self, layers: LayerRange) -> Result<[u8; 32], NodeError> {
        Ok(self.lock().weights_hash(layers.to_range())?)
    }

    /// The FLOPs an honest worker reports.
    pub fn flops(&self, layers: LayerRange, start_pos: usize, tokens: usize) -> u64 {
        self.config
            .forward_flops(layers.to_range(), start_pos as u64, tokens as u64)
    }

    /// The last output row of running `layers` on `input` at `pos`, after `history` (the hop's
    /// earlier inputs with their positions, in order, covering 0..pos).
    pub fn recompute(
        &self,
        layers: LayerRange,
        history: Vec<(usize, ShardInput)>,
        pos: usize,
        input: ShardInput,
    ) -> Result<Vec<f32>, NodeError> {
        let shard = self.lock();
        let hidden = self.config.hidden_size;
        let mut cache = KvCache::new();
        let mut next = 0;
        for (start, batch) in merge_history(history, hidden) {
            if start != next {
                return Err(NodeError::BadRequest(format!(
                    "replay log has a gap at position {next}"
                )));
            }
            next = start + batch.tokens(hidden);
            shard.forward(&mut cache, start, layers.to_range(), batch)?;
        }
        if next != pos {
            return Err(NodeError::BadRequest(format!(
                "replay log ends at position {next}, the checked call starts at {pos}"
            )));
        }
        let out = shard.forward(&mut cache, pos, layers.to_range(), input)?;
        Ok(last_row(&out, hidden).to_vec())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Shard> {
        self.shard
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// Joins consecutive inputs of one kind into prefill batches of at most
/// [`MAX_TOKENS_PER_CALL`] tokens.
fn merge_history(history: Vec<(usize, ShardInput)>, hidden: usize) -> Vec<(usize, ShardInput)> {
    let mut out: Vec<(usize, ShardInput)> = Vec::new();
    for (pos, input) in history {
        let tokens = input.tokens(hidden);
        if let Some((start, last)) = out.last_mut() {
            let end = *start + last.tokens(hidden);
            if end == pos && last.tokens(hidden) + tokens <= MAX_TOKENS_PER_CALL {
                match (last, &input) {
                    (ShardInput::Tokens(a), ShardInput::Tokens(b)) => {
                        a.extend_from_slice(b);
                        continue;
                    }
                    (ShardInput::Hidden(a), ShardInput::Hidden(b)) => {
                        a.extend_from_slice(b);
                        continue;
                    }
                    _ => {}
                }
            }
        }
        out.push((pos, input));
    }
    out
}
