//! The key/value cache of one inference session on one node.
//!
//! Each layer's keys and values live in buffers that grow a block of positions at a time: a
//! decode step writes its position in place and attends over views of the positions held, so
//! a step copies nothing that came before it. Keys are held transposed, `[1, kv_heads,
//! head_dim, capacity]`, so the scores are a plain product with the queries (the product with
//! a transposed view of keys held row by row took seven times as long on the CPU backend);
//! values are held `[1, kv_heads, capacity, head_dim]`. A buffer that fills is copied once into
//! one a block larger. A session's memory (what the node's budget counts) is its capacity:
//! whole blocks.
//!
//! A shard whose weights are held below f32 on the CPU holds its cache as bf16 (f16 for f16
//! weights), as transformers does for a model loaded in that dtype: half the bytes, so twice
//! the context or sessions in the same budget, and half the reading of a decode step's
//! attention, which at 2,048 positions is bound by it.

use std::collections::BTreeMap;
use std::ops::Range;

use burn::tensor::{DType, Tensor, TensorCreationOptions};

use crate::ModelError;

/// Positions a layer's buffer grows by, by default: 64 positions of a 135 M model's layer
/// (3 key/value heads of 64) are 96 KiB in f32.
pub const BLOCK_POSITIONS: usize = 64;

/// Positions a cache growing by `block` takes room for when it holds `positions`: whole
/// blocks (saturating, so a count from the network cannot overflow it).
pub fn whole_blocks(positions: usize, block: usize) -> usize {
    let block = block.max(1);
    positions.div_ceil(block).saturating_mul(block)
}

/// How a layer's cache grows and holds its values: by `block` positions, as `float`.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Holding {
    pub(crate) block: usize,
    pub(crate) float: DType,
}

/// Keys and values of one layer: the buffers and how many of their positions are held.
#[derive(Debug, Default)]
pub struct LayerCache {
    /// Keys `[1, kv_heads, head_dim, capacity]` and values `[1, kv_heads, capacity,
    /// head_dim]`; none before the first call.
    kv: Option<(Tensor<4>, Tensor<4>)>,
    len: usize,
    /// Buffers allocated so far: one per block filled, not one per step.
    allocations: usize,
}

impl LayerCache {
    /// Positions the buffers hold room for.
    fn capacity(&self) -> usize {
        self.kv.as_ref().map_or(0, |(_, v)| v.dims()[2])
    }

    /// Writes the new keys and values `[1, kv_heads, n, head_dim]` after the positions held,
    /// as `holding.float`, growing the buffers by whole blocks of `holding.block` positions
    /// when they are full; returns views of every position held, the new ones included: the
    /// keys transposed (`[1, kv_heads, head_dim, positions]`) and the values, as held.
    pub(crate) fn append(
        &mut self,
        k: Tensor<4>,
        v: Tensor<4>,
        holding: Holding,
    ) -> (Tensor<4>, Tensor<4>) {
        let [_, heads, n, dim] = k.dims();
        let (start, end) = (self.len, self.len + n);
        let capacity = self.capacity();
        let float = holding.float;
        let (keys, values) = match self.kv.take() {
            Some(buffers) if capacity >= end && buffers.0.dtype() == float => buffers,
            old => {
                let capacity = whole_blocks(end, holding.block);
                let options = TensorCreationOptions::new(k.device()).with_dtype(float);
                self.allocations += 1;
                let keys = Tensor::zeros([1, heads, dim, capacity], options.clone());
                let values = Tensor::zeros([1, heads, capacity, dim], options);
                match old {
                    Some((old_k, old_v)) if start > 0 => (
                        keys.slice_assign(
                            [0..1, 0..heads, 0..dim, 0..start],
                            old_k.narrow(3, 0, start).cast(float),
                        ),
                        values.slice_assign(
                            [0..1, 0..heads, 0..start, 0..dim],
                            old_v.narrow(2, 0, start).cast(float),
                        ),
                    ),
                    _ => (keys, values),
                }
            }
        };
        let (k, v) = (k.cast(float), v.cast(float));
        // The buffers are this cache's alone here, so the backend writes them in place.
        let keys = keys.slice_assign([0..1, 0..heads, 0..dim, start..end], k.swap_dims(2, 3));
        let values = values.slice_assign([0..1, 0..heads, start..end, 0..dim], v);
        let views = (
            keys.clone().narrow(3, 0, end),
            values.clone().narrow(2, 0, end),
        );
        self.kv = Some((keys, values));
        self.len = end;
        views
    }
}

/// Per-layer keys and values of one session, with how many positions each layer holds.
#[derive(Debug)]
pub struct KvCache {
    layers: BTreeMap<usize, LayerCache>,
    block: usize,
}

impl Default for KvCache {
    fn default() -> Self {
        Self::with_block(BLOCK_POSITIONS)
    }
}

impl KvCache {
    /// An empty cache growing by [`BLOCK_POSITIONS`].
    pub fn new() -> Self {
        Self::default()
    }

    /// An empty cache growing by `block` positions (at least 1).
    pub fn with_block(block: usize) -> Self {
        Self {
            layers: BTreeMap::new(),
            block: block.max(1),
        }
    }

    /// Positions held by `layer` (0 if it was never run).
    pub fn len(&self, layer: usize) -> usize {
        self.layers.get(&layer).map_or(0, |l| l.len)
    }

    /// Whether no layer holds any position.
    pub fn is_empty(&self) -> bool {
        self.layers.values().all(|l| l.len == 0)
    }

    /// Positions summed over layers that the cache takes room for: what its memory grows
    /// with (whole blocks, the buffers' capacity where that is more).
    pub fn token_layers(&self) -> usize {
        self.layers
            .values()
            .map(|l| l.capacity().max(whole_blocks(l.len, self.block)))
            .sum()
    }

    /// Readies `layers` to take new tokens at `start_pos`: a gap is an error, and a cache that
    /// already holds positions at or past `start_pos` is cut back to it (a replayed call); its
    /// buffers stay, to be written over.
    pub fn prepare(&mut self, layers: Range<usize>, start_pos: usize) -> Result<(), ModelError> {
        if let Some(layer) = layers.clone().find(|&l| self.len(l) < start_pos) {
            return Err(ModelError::PositionGap {
                layer,
                held: self.len(layer),
                start: start_pos,
            });
        }
        for layer in layers {
            let entry = self.layers.entry(layer).or_default();
            entry.len = entry.len.min(start_pos);
        }
        Ok(())
    }

    /// The cache of `layer`, for the layer to read and extend, with how it grows and holds
    /// its values (as `float`).
    pub(crate) fn layer_mut(&mut self, layer: usize, float: DType) -> (&mut LayerCache, Holding) {
        let holding = Holding {
            block: self.block,
            float,
        };
        (self.layers.entry(layer).or_default(), holding)
    }

    /// Records that `layers` now hold `tokens` more positions without writing any: a test's
    /// stand-in for a call.
    pub fn advance(&mut self, layers: Range<usize>, tokens: usize) {
        for layer in layers {
            self.layers.entry(layer).or_default().len += tokens;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::init::{ModelSpec, write_model};
    use crate::{Precision, Shard, ShardInput, ShardOutput};

    fn logits(out: ShardOutput) -> Vec<f32> {
        match out {
            ShardOutput::Logits(l) => l,
            ShardOutput::Hidden(_) => panic!("expected logits"),
        }
    }

    /// Decodes `steps` tokens one at a time after a 5-token prompt; every step's logits.
    fn decode(shard: &Shard, cache: &mut KvCache, steps: usize) -> Vec<Vec<f32>> {
        let prompt = ShardInput::Tokens(vec![3, 14, 15, 92, 65]);
        let mut out = vec![logits(shard.forward(cache, 0, 0..4, prompt).unwrap())];
        for pos in 5..5 + steps {
            let next = ShardInput::Tokens(vec![(pos * 7 % 250) as u32]);
            out.push(logits(shard.forward(cache, pos, 0..4, next).unwrap()));
        }
        out
    }

    #[test]
    fn block_buffers_give_the_logits_of_an_exact_size_cache_and_count_whole_blocks() {
        let dir = tempfile::tempdir().unwrap();
        write_model(dir.path(), &ModelSpec::tiny()).unwrap();
        let shard = Shard::load(dir.path(), 0..4, &Default::default()).unwrap();
        // A block of one position is a buffer of exactly the positions held, copied whole at
        // every step: the cache as it was before blocks.
        let mut exact = KvCache::with_block(1);
        let expected = decode(&shard, &mut exact, 150);
        assert_eq!(exact.token_layers(), 155 * 4);
        for block in [5, 64] {
            let mut cache = KvCache::with_block(block);
            let got = decode(&shard, &mut cache, 150);
            for (step, (a, b)) in got.iter().zip(&expected).enumerate() {
                let diff = a
                    .iter()
                    .zip(b)
                    .map(|(x, y)| (x - y).abs())
                    .fold(0.0, f32::max);
                assert!(diff <= 1e-5, "block {block}, step {step}: {diff}");
            }
            assert_eq!(cache.len(3), 155);
            assert_eq!(cache.token_layers(), 155usize.div_ceil(block) * block * 4);
            // Grown a block at a time: the prompt's block, then one per block filled.
            let allocations = cache
                .layers
                .values()
                .map(|l| l.allocations)
                .collect::<Vec<_>>();
            assert_eq!(
                allocations,
                vec![155usize.div_ceil(block); 4],
                "block {block}"
            );
        }
        // A replay cut back into a block writes over it and gives the same logits again.
        let mut cache = KvCache::with_block(64);
        decode(&shard, &mut cache, 100);
        let again = logits(
            shard
                .forward(
                    &mut cache,
                    70,
                    0..4,
                    ShardInput::Tokens(vec![(70 * 7 % 250) as u32]),
                )
                .unwrap(),
        );
        let diff = again
            .iter()
            .zip(&expected[70 - 4])
            .map(|(x, y)| (x - y).abs())
            .fold(0.0, f32::max);
        assert!(diff <= 1e-5, "{diff}");
        assert_eq!((cache.len(0), cache.token_layers()), (71, 128 * 4));
    }

    /// A shard holding its weights below f32 holds its cache in half precision, half the
    /// bytes, and a decode step reading it in place gives the logits of a prefill of every
    /// position through burn's products, within rounding.
    #[test]
    fn a_shard_below_f32_holds_its_cache_in_half_precision() {
        let dir = tempfile::tempdir().unwrap();
        write_model(dir.path(), &ModelSpec::tiny()).unwrap();
        let device = Default::default();
        let f32_bytes = Shard::load(dir.path(), 0..4, &device)
            .unwrap()
            .kv_bytes_per_token_layer();
        for (precision, float) in [
            (Precision::Bf16, DType::BF16),
            (Precision::F16, DType::F16),
            (Precision::Int8, DType::BF16),
        ] {
            let shard = Shard::load_at(dir.path(), 0..4, &device, precision).unwrap();
            assert_eq!(shard.cache_float(), float);
            assert_eq!(shard.kv_bytes_per_token_layer() * 2, f32_bytes);
            let mut cache = KvCache::new();
            let steps = decode(&shard, &mut cache, 40);
            let (keys, values) = cache.layers[&2].kv.as_ref().unwrap();
            assert_eq!((keys.dtype(), values.dtype()), (float, float));
            // Every token of the last step, prefilled at once.
            let tokens = [3, 14, 15, 92, 65]
                .into_iter()
                .chain((5..5 + 40).map(|pos| (pos * 7 % 250) as u32))
                .collect::<Vec<_>>();
            let input = ShardInput::Tokens(tokens);
            let whole = logits(shard.forward(&mut KvCache::new(), 0, 0..4, input).unwrap());
            let diff = whole
                .iter()
                .zip(steps.last().unwrap())
                .map(|(x, y)| (x - y).abs())
                .fold(0.0, f32::max);
            assert!(diff <= 1e-4, "{precision}: {diff}");
        }
    }
}
