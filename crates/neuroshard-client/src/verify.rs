//! Spot checks: re-executing a hop locally to check a worker's output.
//!
//! The requester holds the model's weights and recomputes a sampled hop from that hop's replay
//! log: the inputs since its last check of that hop are run as one prefill to bring its own
//! cache up to date, then the checked input alone, which gives exactly the row the worker
//! fingerprinted. Caches are kept per (session, layers), so over a session each position is
//! recomputed at most once per checked span, in batches; the sample rate
//! ([`neuroshard_proof::Reputation::check_rate`]) decides how soon a bad hop is seen.
//!
//! A hop announcing lighter weights (bf16, f16, int8) is recomputed with the model held at that
//! precision (loaded on first need): quantizing is deterministic, so an honest worker's row is
//! matched to the backends' rounding, as at f32.

use neuroshard_base::sync::LockExt;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use neuroshard_base::LayerRange;
use neuroshard_model::{KvCache, LlamaConfig, Precision, Shard, ShardInput};

use neuroshard_model::ShardOutput;
use neuroshard_net::MAX_TOKENS_PER_CALL;
use neuroshard_net::NodeError;

/// The whole model, loaded by a requester to re-execute sampled hops.
#[derive(Debug)]
pub struct LocalVerifier {
    dir: PathBuf,
    /// The model at f32.
    shard: Arc<Mutex<Shard>>,
    /// The model at each lighter precision a checked hop announced.
    lighter: Mutex<HashMap<Precision, Arc<Mutex<Shard>>>>,
    config: LlamaConfig,
    caches: Mutex<HashMap<HopKey, VerifiedPrefix>>,
}

/// A hop's cache: its session, layers and precision.
type HopKey = (String, LayerRange, Precision);

/// The verifier's cache of one hop of one session: positions `0..next` are computed.
#[derive(Debug)]
struct VerifiedPrefix {
    cache: KvCache,
    next: usize,
}

/// Hop caches kept at most; beyond it all are dropped (a check then starts over). 64 covers
/// the hops of a handful of concurrent sessions.
const MAX_CACHES: usize = 64;

impl LocalVerifier {
    /// Loads every layer of the model in `dir`.
    pub fn load(dir: &Path) -> Result<Self, NodeError> {
        let info = neuroshard_model::ModelInfo::read(dir)?;
        let layers = info.config.num_hidden_layers;
        let shard = Shard::load(dir, 0..layers, &neuroshard_model::default_device())?;
        Ok(Self {
            dir: dir.to_path_buf(),
            shard: Arc::new(Mutex::new(shard)),
            lighter: Mutex::new(HashMap::new()),
            config: info.config,
            caches: Mutex::new(HashMap::new()),
        })
    }

    /// The model held at `precision`, loaded the first time it is asked for.
    fn shard_at(&self, precision: Precision) -> Result<Arc<Mutex<Shard>>, NodeError> {
        if precision == Precision::F32 {
            return Ok(self.shard.clone());
        }
        if let Some(shard) = self.lighter.lock_or_recover().get(&precision) {
            return Ok(shard.clone());
        }
        let layers = self.config.num_hidden_layers;
        let device = neuroshard_model::default_device();
        let shard = Arc::new(Mutex::new(Shard::load_at(
            &self.dir,
            0..layers,
            &device,
            precision,
        )?));
        let mut lighter = self.lighter.lock_or_recover();
        Ok(lighter.entry(precision).or_insert(shard).clone())
    }

    /// The model's config.
    pub fn config(&self) -> &LlamaConfig {
        &self.config
    }

    /// Id of the model loaded.
    pub fn model_id(&self) -> String {
        self.lock().info().id.clone()
    }

    /// The weights hash an honest worker holding `layers` at `precision` reports.
    pub fn weights_hash(
        &self,
        layers: LayerRange,
        precision: Precision,
    ) -> Result<[u8; 32], NodeError> {
        Ok(self.lock().weights_hash_at(layers.to_range(), precision)?)
    }

    /// Positions of `session`'s hop over `layers` at `precision` already recomputed: history
    /// before it need not be passed again.
    pub fn verified_up_to(&self, session: &str, layers: LayerRange, precision: Precision) -> usize {
        let caches = self.caches.lock_or_recover();
        caches
            .get(&(session.to_string(), layers, precision))
            .map_or(0, |c| c.next)
    }

    /// Drops the caches of a finished session.
    pub fn forget(&self, session: &str) {
        let mut caches = self.caches.lock_or_recover();
        caches.retain(|(s, _, _), _| s != session);
    }

    /// The last output row of running `layers` held at `precision` on `input` at `pos` in
    /// `session`, after `history`: the hop's inputs with their positions, in order, from
    /// [`Self::verified_up_to`] to `pos`.
    pub fn recompute(
        &self,
        (session, layers, precision): (&str, LayerRange, Precision),
        history: Vec<(usize, ShardInput)>,
        pos: usize,
        input: ShardInput,
    ) -> Result<Vec<f32>, NodeError> {
        let held = self.shard_at(precision)?;
        let key = (session.to_string(), layers, precision);
        let taken = {
            let mut caches = self.caches.lock_or_recover();
            caches.remove(&key)
        };
        let VerifiedPrefix {
            mut cache,
            mut next,
        } = taken.filter(|c| c.next <= pos).unwrap_or(VerifiedPrefix {
            cache: KvCache::new(),
            next: 0,
        });
        let shard = held.lock_or_recover();
        let hidden = self.config.hidden_size;
        let history = history.into_iter().filter(|(p, _)| *p >= next).collect();
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
        let tokens = input.tokens(hidden);
        let out = shard.forward(&mut cache, pos, layers.to_range(), input)?;
        let row = last_row(&out, hidden).to_vec();
        let mut caches = self.caches.lock_or_recover();
        if caches.len() >= MAX_CACHES {
            caches.clear();
        }
        caches.insert(
            key,
            VerifiedPrefix {
                cache,
                next: pos + tokens,
            },
        );
        Ok(row)
    }

    /// The f32 model, which names the model and its weights' digests.
    fn lock(&self) -> std::sync::MutexGuard<'_, Shard> {
        self.shard.lock_or_recover()
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

/// The row a receipt fingerprints: the last token's hidden state, or the logits.
pub fn last_row(out: &ShardOutput, hidden: usize) -> &[f32] {
    match out {
        ShardOutput::Hidden(v) => &v[v.len().saturating_sub(hidden)..],
        ShardOutput::Logits(v) => v,
    }
}
