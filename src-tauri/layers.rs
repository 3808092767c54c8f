//! Which layers this machine serves, and what they cost in memory: pure functions over the
//! model's config and the swarm's coverage, so the settings screen can show the estimate
//! before anything is applied.

use neuroshard_base::{Invalid, LayerRange};
use neuroshard_model::LlamaConfig;
use neuroshard_model::Precision;
use neuroshard_model::init::shard_weight_bytes;
use neuroshard_net::convert::PeerRecord;
use neuroshard_settings::LayerChoice;
use serde::Serialize;

/// Key/value cache kept per served layer for in-flight sessions: 64 sessions of 512 positions,
/// the working set of a busy home node.
const KV_POSITIONS_PER_LAYER: u64 = 64 * 512;

/// What serving a range costs, in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct MemoryEstimate {
    /// Weights of the layers, plus embeddings on the first shard and the head on the last.
    pub weights_bytes: u64,
    /// The key/value cache budgeted for sessions.
    pub cache_bytes: u64,
    /// Both.
    pub total_bytes: u64,
}

/// A planned range and its cost, as the settings screen shows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct LayerPlan {
    /// Layers to serve.
    pub range: LayerRange,
    /// Layers of the whole model.
    pub total_layers: u32,
    /// Memory the range takes.
    pub memory: MemoryEstimate,
}

/// Memory to serve `range` of a model with config `c`: the parameters the shard holds (its
/// family's biases and norms included, and the LM head on the last shard even when tied, as
/// shards hold it) with the projections at `precision`, and the cache budget.
pub fn estimate(c: &LlamaConfig, range: LayerRange, precision: Precision) -> MemoryEstimate {
    let layers = u64::from(range.len());
    let weights_bytes = shard_weight_bytes(c, range.to_range(), precision);
    // Counted at f32, as a GPU holds it: on the CPU a shard below f32 holds half that, so
    // the estimate is an upper bound wherever the node ends up computing.
    let per_position = c.kv_bytes_per_token_layer(std::mem::size_of::<f32>()) as u64;
    let cache_bytes = layers * KV_POSITIONS_PER_LAYER * per_position;
    MemoryEstimate {
        weights_bytes,
        cache_bytes,
        total_bytes: weights_bytes + cache_bytes,
    }
}

/// How many replicas of each layer the swarm has, from the peers serving `model_id`.
pub fn coverage(peers: &[PeerRecord], model_id: &str, total_layers: u32) -> Vec<u32> {
    let mut counts = vec![0; total_layers as usize];
    for peer in peers.iter().filter(|p| p.model_id == model_id) {
        for layer in peer.layers.to_range() {
            if let Some(count) = counts.get_mut(layer) {
                *count += 1;
            }
        }
    }
    counts
}

/// The `len` consecutive layers with the fewest replicas in total; ties go to the earliest
/// window, so nodes that join an empty swarm fill it from the front.
fn least_covered(coverage: &[u32], len: u32) -> LayerRange {
    let total = coverage.len() as u32;
    let len = len.clamp(1, total.max(1));
    let best = (0..=total - len)
        .min_by_key(|&start| {
            coverage[start as usize..(start + len) as usize]
                .iter()
                .map(|&c| u64::from(c))
                .sum::<u64>()
        })
        .unwrap_or(0);
    LayerRange {
        start: best,
        end: best + len,
    }
}

/// The most layers that fit in `budget_bytes` held at `precision`, at least one.
fn layers_within(
    c: &LlamaConfig,
    coverage: &[u32],
    budget_bytes: u64,
    precision: Precision,
) -> u32 {
    let total = c.num_hidden_layers as u32;
    (1..=total)
        .rev()
        .find(|&len| {
            estimate(c, least_covered(coverage, len), precision).total_bytes <= budget_bytes
        })
        .unwrap_or(1)
}

/// Turns the owner's choice into a range: a manual range as given (it must lie in the model),
/// a count or Auto where the swarm is thinnest, Auto as many layers as `budget_bytes` holds.
pub fn plan(
    c: &LlamaConfig,
    choice: LayerChoice,
    coverage: &[u32],
    budget_bytes: u64,
    precision: Precision,
) -> Result<LayerPlan, Invalid> {
    let total = c.num_hidden_layers as u32;
    let refused = |problem: String| Invalid::new("layers", problem);
    let range = match choice {
        LayerChoice::Range { start, end } => {
            if end > total {
                let problem = format!("layers {start}..{end} go past the model's {total} layers");
                return Err(refused(problem));
            }
            LayerRange::new(start, end).map_err(|e| refused(e.to_string()))?
        }
        LayerChoice::Count { count } => {
            if count > total {
                return Err(refused(format!(
                    "{count} layers asked, the model has {total}"
                )));
            }
            least_covered(coverage, count)
        }
        LayerChoice::Auto => least_covered(
            coverage,
            layers_within(c, coverage, budget_bytes, precision),
        ),
    };
    Ok(LayerPlan {
        range,
        total_layers: total,
        memory: estimate(c, range, precision),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use neuroshard_model::init::ModelSpec;

    #[test]
    fn auto_takes_the_least_covered_window_that_fits_the_budget() {
        let c = ModelSpec::demo().config();
        let total = c.num_hidden_layers as u32;
        let mut cover = vec![3; total as usize];
        cover[total as usize - 2] = 0;
        cover[total as usize - 1] = 0;
        let two = estimate(
            &c,
            LayerRange::new(total - 2, total).unwrap(),
            Precision::F32,
        );
        let plan = plan(
            &c,
            LayerChoice::Auto,
            &cover,
            two.total_bytes,
            Precision::F32,
        )
        .unwrap();
        assert_eq!(plan.range, LayerRange::new(total - 2, total).unwrap());
        assert_eq!(plan.memory, two);
        let all = plan_all(&c, &cover);
        assert_eq!(
            all.range.len(),
            total,
            "an unlimited budget serves everything"
        );
    }

    fn plan_all(c: &LlamaConfig, cover: &[u32]) -> LayerPlan {
        plan(c, LayerChoice::Auto, cover, u64::MAX, Precision::F32).unwrap()
    }

    #[test]
    fn counts_go_where_coverage_is_thinnest_and_ranges_are_checked() {
        let c = ModelSpec::demo().config();
        let total = c.num_hidden_layers as u32;
        let mut cover = vec![1; total as usize];
        cover[1] = 0;
        let p = plan(
            &c,
            LayerChoice::Count { count: 1 },
            &cover,
            0,
            Precision::F32,
        )
        .unwrap();
        assert_eq!(p.range, LayerRange::new(1, 2).unwrap());
        let err = plan(
            &c,
            LayerChoice::Range {
                start: 0,
                end: total + 1,
            },
            &cover,
            0,
            Precision::F32,
        )
        .unwrap_err();
        assert_eq!(err.field, "layers");
        assert!(err.problem.contains("past the model"), "{err}");
        let first = estimate(&c, LayerRange::new(0, 1).unwrap(), Precision::F32);
        let middle = estimate(&c, LayerRange::new(1, 2).unwrap(), Precision::F32);
        assert!(
            first.weights_bytes > middle.weights_bytes,
            "the first shard holds the embeddings"
        );
    }

    /// The estimate counts the bytes each precision holds, so a lighter one fits more layers
    /// in the same budget.
    #[test]
    fn lighter_weights_are_estimated_at_their_bytes_and_fit_more_layers() {
        let c = ModelSpec::demo().config();
        let middle = LayerRange::new(1, 2).unwrap();
        let (h, i) = (c.hidden_size as u64, c.intermediate_size as u64);
        let q = (c.num_attention_heads * c.head_dim()) as u64;
        let kv = (c.kv_heads() * c.head_dim()) as u64;
        let projections = h * q + 2 * h * kv + q * h + 3 * h * i;
        let norms = 2 * h;
        let at = |p| estimate(&c, middle, p).weights_bytes;
        assert_eq!(at(Precision::F32), 4 * (projections + norms));
        assert_eq!(at(Precision::Bf16), 2 * projections + 4 * norms);
        assert_eq!(
            at(Precision::Int8),
            projections + projections / 32 * 4 + 4 * norms
        );
        let cover = vec![0; c.num_hidden_layers];
        // What three layers take at bf16: less than three at f32, though the cache, the same
        // at every precision, is most of it for this model.
        let budget = estimate(&c, LayerRange::new(0, 3).unwrap(), Precision::Bf16).total_bytes;
        let fits = |p| {
            plan(&c, LayerChoice::Auto, &cover, budget, p)
                .unwrap()
                .range
                .len()
        };
        assert_eq!(fits(Precision::F32), 2);
        assert_eq!(fits(Precision::Bf16), 3);
        assert!(fits(Precision::Int8) >= 3);
    }
}
