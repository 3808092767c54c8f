//! The Llama-family decoder layer and what every layer of a call shares: RMSNorm, grouped-query
//! attention with RoPE (the config's scaling) and, where the family has them, biases, per-head
//! q/k norms and a sliding window, then a SwiGLU MLP.

use burn::module::Module;
use burn::nn::{Linear, RmsNorm};
use burn::tensor::activation::{silu, softmax};
use burn::tensor::{Device, Tensor, TensorData};

use crate::LlamaConfig;
use crate::kv::{Holding, LayerCache};
use crate::precision::{Packed, project};
use std::sync::Arc;

/// One decoder block: pre-norm attention with grouped-query heads, then a SwiGLU MLP.
#[derive(Module, Debug)]
pub struct DecoderLayer {
    pub(crate) input_norm: RmsNorm,
    pub(crate) q_proj: Linear,
    pub(crate) k_proj: Linear,
    pub(crate) v_proj: Linear,
    /// Qwen3's RMSNorm over each query head, before RoPE.
    pub(crate) q_norm: Option<RmsNorm>,
    /// Qwen3's RMSNorm over each key head, before RoPE.
    pub(crate) k_norm: Option<RmsNorm>,
    pub(crate) o_proj: Linear,
    pub(crate) post_attention_norm: RmsNorm,
    pub(crate) gate_proj: Linear,
    pub(crate) up_proj: Linear,
    pub(crate) down_proj: Linear,
    /// The projections (q, k, v, o, gate, up, down) held below f32 on the CPU, when the shard
    /// holds them so: their `Linear`s then keep only the biases.
    #[module(skip)]
    pub(crate) packed: Option<Arc<[Packed; 7]>>,
}

/// Each projection's place in [`DecoderLayer::packed`].
const Q: usize = 0;
const K: usize = 1;
const V: usize = 2;
const O: usize = 3;
const GATE: usize = 4;
const UP: usize = 5;
const DOWN: usize = 6;

/// Head geometry shared by every layer.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Heads {
    pub(crate) query: usize,
    pub(crate) kv: usize,
    pub(crate) dim: usize,
}

/// One session's row of a batched call through a layer: its cache (with how it grows and holds
/// its values), if any, and its positions.
pub(crate) struct Row<'a> {
    pub(crate) cache: Option<(&'a mut LayerCache, Holding)>,
    pub(crate) positions: &'a Positions,
}

impl DecoderLayer {
    /// Projection `which` (its `Linear` is `linear`) applied to `x`.
    fn project(&self, which: usize, linear: &Linear, x: Tensor<3>) -> Tensor<3> {
        match &self.packed {
            Some(packed) => packed[which].apply(x, linear.bias.as_ref()),
            None => project(linear, x),
        }
    }

    /// `[1, n, hidden]` → `[1, n, hidden]`, appending this call's keys and values to `cache`
    /// (with how it grows and holds them), if any.
    pub(crate) fn forward(
        &self,
        x: Tensor<3>,
        cache: Option<(&mut LayerCache, Holding)>,
        positions: &Positions,
        index: usize,
        heads: Heads,
    ) -> Tensor<3> {
        self.forward_rows(x, vec![Row { cache, positions }], index, heads)
    }

    /// `[b, n, hidden]` → same: `b` sessions at once, row `i` reading and extending `rows[i]`'s
    /// cache at its own positions. The projections and the MLP run on every row together (one
    /// read of the weights); attention runs row by row, each over its own cache.
    pub(crate) fn forward_rows(
        &self,
        x: Tensor<3>,
        rows: Vec<Row<'_>>,
        index: usize,
        heads: Heads,
    ) -> Tensor<3> {
        let attended = self.attention(self.input_norm.forward(x.clone()), rows, index, heads);
        let x = x + attended;
        let h = self.post_attention_norm.forward(x.clone());
        let gate = self.project(GATE, &self.gate_proj, h.clone());
        let up = self.project(UP, &self.up_proj, h);
        let mlp = self.project(DOWN, &self.down_proj, silu(gate) * up);
        x + mlp
    }

    /// Grouped-query attention of each row over its cached and new positions:
    /// `[b, n, hidden]` → same.
    fn attention(&self, x: Tensor<3>, rows: Vec<Row<'_>>, index: usize, heads: Heads) -> Tensor<3> {
        let q = self.project(Q, &self.q_proj, x.clone());
        let k = self.project(K, &self.k_proj, x.clone());
        let v = self.project(V, &self.v_proj, x);
        let mut out: Vec<Tensor<3>> = rows
            .into_iter()
            .enumerate()
            .map(|(i, row)| {
                let one = |t: &Tensor<3>| t.clone().narrow(0, i, 1);
                let mask = row.positions.mask(index);
                self.attend(
                    [one(&q), one(&k), one(&v)],
                    row.cache,
                    &row.positions.rope,
                    mask,
                    heads,
                )
            })
            .collect();
        let out = match out.len() {
            1 => out.pop().expect("one row"),
            _ => Tensor::cat(out, 0),
        };
        self.project(O, &self.o_proj, out)
    }

    /// One row's attention from its projections `[1, n, heads * dim]` (queries, keys, values)
    /// to `[1, n, query_heads * dim]`, before the output projection.
    ///
    /// Queries are grouped as `[1, kv_heads, group * n, dim]` so that each key/value head is used
    /// by its group of query heads without copying keys and values per query head.
    fn attend(
        &self,
        [q, k, v]: [Tensor<3>; 3],
        cache: Option<(&mut LayerCache, Holding)>,
        rope: &Rope,
        mask: Option<&Tensor<2>>,
        heads: Heads,
    ) -> Tensor<3> {
        let [_, n, _] = q.dims();
        let Heads { query, kv, dim } = heads;
        let group = query / kv;
        // [1, heads, n, dim], each head normed first where the family does (Qwen3).
        let split = |t: Tensor<3>, h: usize, norm: Option<&RmsNorm>| {
            let t = t.reshape([1, n, h, dim]);
            let t = match norm {
                Some(norm) => norm.forward(t),
                None => t,
            };
            t.swap_dims(1, 2)
        };
        let q = rope.apply(split(q, query, self.q_norm.as_ref()));
        let k = rope.apply(split(k, kv, self.k_norm.as_ref()));
        let v = split(v, kv, None);
        // Keys transposed: [1, kv, dim, total].
        let (keys, v) = match cache {
            Some((cache, holding)) => cache.append(k, v, holding),
            None => (k.swap_dims(2, 3), v),
        };
        if n == 1
            && mask.is_none()
            && let Some(out) = super::decode_attention::attend(&q, &keys, &v, heads)
        {
            return out;
        }
        // A cache held below f32 is widened for burn's products.
        let float = burn::tensor::DType::F32;
        let (keys, v) = (keys.cast(float), v.cast(float));
        let total = keys.dims()[3];
        // [1, kv, group * n, dim]
        let q = q.reshape([1, kv, group * n, dim]);
        // Multiplied by dim^-0.5 rather than divided by its root, as transformers does.
        let mut scores = q.matmul(keys) * (dim as f64).powf(-0.5);
        if let Some(mask) = mask {
            // The mask is [n, total]; rows of the grouped queries repeat every n.
            let mask = mask
                .clone()
                .repeat_dim(0, group)
                .reshape([1, 1, group * n, total]);
            scores = scores + mask;
        }
        softmax(scores, 3)
            .matmul(v)
            .reshape([1, query, n, dim])
            .swap_dims(1, 2)
            .reshape([1, n, query * dim])
    }
}

/// What every layer of one call needs about its positions `start..start + n`: the rotary
/// tables and the attention masks (full causal, and within the sliding window where the model
/// has one).
pub(crate) struct Positions {
    pub(crate) rope: Rope,
    /// The causal mask of layers without a window.
    pub(crate) full: Option<Tensor<2>>,
    /// The mask of windowed layers (the model has one window size).
    pub(crate) windowed: Option<Tensor<2>>,
    /// Per layer, whether it uses the window.
    pub(crate) sliding: Vec<bool>,
}

impl Positions {
    pub(crate) fn new(config: &LlamaConfig, start: usize, n: usize, device: &Device) -> Self {
        let window = config.sliding_window.as_ref();
        Self {
            rope: Rope::new(config, start, n, device),
            full: causal_mask(start, n, None, device),
            windowed: window.and_then(|w| causal_mask(start, n, Some(w.size), device)),
            sliding: window.map(|w| w.layers.clone()).unwrap_or_default(),
        }
    }

    /// The additive mask layer `index` attends with (`None`: every position is visible).
    pub(crate) fn mask(&self, index: usize) -> Option<&Tensor<2>> {
        match self.sliding.get(index) {
            Some(true) => self.windowed.as_ref(),
            _ => self.full.as_ref(),
        }
    }
}

/// Rotary position embedding in the Hugging Face (rotate-half) layout, for positions
/// `start..start + n`.
pub(crate) struct Rope {
    pub(crate) cos: Tensor<4>,
    pub(crate) sin: Tensor<4>,
    pub(crate) half: usize,
}

impl Rope {
    /// The tables as transformers builds them: `position × inv_freq` in f32, its cos and sin,
    /// times the scaling's attention factor.
    pub(crate) fn new(config: &LlamaConfig, start: usize, n: usize, device: &Device) -> Self {
        let dim = config.head_dim();
        let half = dim / 2;
        let (inv_freq, scale) =
            config
                .rope
                .inv_freq(dim, start + n, config.max_position_embeddings);
        let mut cos = Vec::with_capacity(n * dim);
        let mut sin = Vec::with_capacity(n * dim);
        for pos in start..start + n {
            let angles: Vec<f64> = inv_freq.iter().map(|f| f64::from(pos as f32 * f)).collect();
            for _ in 0..2 {
                cos.extend(angles.iter().map(|a| a.cos() as f32 * scale));
                sin.extend(angles.iter().map(|a| a.sin() as f32 * scale));
            }
        }
        let table = |values| Tensor::from_data(TensorData::new(values, [1, 1, n, dim]), device);
        Self {
            cos: table(cos),
            sin: table(sin),
            half,
        }
    }

    /// `[1, heads, n, dim]` → same, rotated by position.
    pub(crate) fn apply(&self, x: Tensor<4>) -> Tensor<4> {
        let [_, _, _, dim] = x.dims();
        let first = x.clone().narrow(3, 0, self.half);
        let second = x.clone().narrow(3, self.half, dim - self.half);
        let rotated = Tensor::cat(vec![second.neg(), first], 3);
        x * self.cos.clone() + rotated * self.sin.clone()
    }
}

/// Additive mask `[n, start + n]` for new tokens at `start..start + n`: a query at position `p`
/// sees keys `j <= p`, and with a window only those with `p - j < window` (transformers'
/// `kv_idx > q_idx - sliding_window`). `None` when every cached position is visible (one new
/// token inside the window).
pub(crate) fn causal_mask(
    start: usize,
    n: usize,
    window: Option<usize>,
    device: &Device,
) -> Option<Tensor<2>> {
    let total = start + n;
    let window = window.unwrap_or(usize::MAX);
    if n == 1 && total <= window {
        return None;
    }
    let values: Vec<f32> = (0..n)
        .flat_map(|i| {
            let p = start + i;
            (0..total).map(move |j| if j <= p && p - j < window { 0.0 } else { -1e9 })
        })
        .collect();
    Some(Tensor::from_data(
        TensorData::new(values, [n, total]),
        device,
    ))
}
