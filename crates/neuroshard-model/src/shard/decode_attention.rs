//! One new position's attention over a session's cache, on the CPU.
//!
//! A decode step attends one query per head over every cached position. Through burn's
//! products that is a product of three rows by the keys, a softmax and another product, each
//! with its own dispatch and buffers, and at 2,048 positions it cost SmolLM2-135M 0.7 ms a
//! layer, a third of the step. Here the keys (held transposed, each head's dimension a run of
//! positions) and the values are read in place, in order, once for every query head of their
//! group, with the vector instructions the machine has.
//!
//! The step is bound by reading the cache (94 MB at 2,048 positions over 30 layers). So that
//! both threads read all the time, each head's positions go in spans of 256, one task each,
//! whose softmax shares are merged after (as flash-decoding does); the cache's short runs are
//! asked of memory ahead of their reading; and the exponentials are computed in vector
//! instructions.

use burn::tensor::{Tensor, TensorData};
use burn_flex::Flex;
use pulp::Simd;
use rayon::prelude::*;

use super::layers::Heads;
use crate::precision::prefetch_run;

/// The attention output `[1, 1, query * dim]` of the queries `q` (`[1, query, 1, dim]`, after
/// RoPE) over `keys` (`[1, kv, dim, positions]`) and `values` (`[1, kv, positions, dim]`) as
/// the cache holds them; none where they are not held so (another backend, or no cache).
pub(crate) fn attend(
    q: &Tensor<4>,
    keys: &Tensor<4>,
    values: &Tensor<4>,
    heads: Heads,
) -> Option<Tensor<3>> {
    let [_, kv, dim, positions] = keys.dims();
    let k = keys.clone().try_into_primitive::<Flex>().ok()?;
    let v = values.clone().try_into_primitive::<Flex>().ok()?;
    let float = burn::tensor::DType::F32;
    if k.dtype() != float || v.dtype() != float || kv != heads.kv || dim != heads.dim {
        return None;
    }
    // Keys: each head's dimension a run of positions; values: each position a run of dims.
    let (ks, vs) = (k.layout().strides(), v.layout().strides());
    if ks[3] != 1 || vs[3] != 1 || values.dims() != [1, kv, positions, dim] {
        return None;
    }
    let key = Strided::of(&k, ks, positions, dim)?;
    let value = Strided::of(&v, vs, dim, positions)?;
    let device = q.device();
    let q = crate::layout::to_vec(q.clone());
    if q.len() != heads.query * dim {
        return None;
    }
    let width = heads.query / kv * dim;
    // Each head's positions in spans of `SPAN`, so that two threads share three heads evenly;
    // the spans depend on the positions alone, so a session's output does not depend on the
    // threads or on the sessions beside it.
    let spans = positions.div_ceil(SPAN);
    let parts = (0..kv * spans)
        .into_par_iter()
        .map(|task| {
            let (head, span) = (task / spans, task % spans);
            let from = span * SPAN;
            pulp::Arch::new().dispatch(Attention {
                q: &q[head * width..][..width],
                key: &key,
                value: &value,
                head,
                dim,
                from,
                len: SPAN.min(positions - from),
            })
        })
        .collect::<Vec<_>>();
    let mut out = vec![0.0f32; heads.query * dim];
    for (out, parts) in out.chunks_exact_mut(width).zip(parts.chunks_exact(spans)) {
        merge(parts, out, dim);
    }
    let shape = [1, 1, heads.query * dim];
    Some(Tensor::from_data(TensorData::new(out, shape), &device))
}

/// A cache buffer read in place: element `(head, i, j)` at `start + head * head_stride + i *
/// inner + j`, with runs of `run` along `j` and `count` of them along `i`.
struct Strided<'a> {
    data: &'a [f32],
    start: usize,
    head_stride: usize,
    inner: usize,
}

impl<'a> Strided<'a> {
    /// The buffer behind `t` (`[1, heads, count, run]` with unit stride along the runs), when
    /// every element lies inside it.
    fn of(
        t: &'a burn_flex::FlexTensor,
        strides: &[isize],
        run: usize,
        count: usize,
    ) -> Option<Self> {
        let heads = t.layout().shape()[1];
        if heads == 0 || count == 0 || run == 0 {
            return None;
        }
        let s = Self {
            data: t.storage::<f32>(),
            start: t.layout().start_offset(),
            head_stride: usize::try_from(strides[1]).ok()?,
            inner: usize::try_from(strides[2]).ok()?,
        };
        let last = s.start + (heads - 1) * s.head_stride + (count - 1) * s.inner + run;
        (last <= s.data.len()).then_some(s)
    }

    /// Run `i` of head `head`, `len` long from element `from` of the run.
    #[inline(always)]
    fn run(&self, head: usize, i: usize, from: usize, len: usize) -> &'a [f32] {
        &self.data[self.start + head * self.head_stride + i * self.inner + from..][..len]
    }
}

/// Positions attended as one task: at 2,048 positions a head has eight.
const SPAN: usize = 256;

/// The queries of one key/value head's group, the span of cached positions `from..from +
/// len` they attend over here, and the cache.
struct Attention<'a> {
    q: &'a [f32],
    key: &'a Strided<'a>,
    value: &'a Strided<'a>,
    head: usize,
    dim: usize,
    from: usize,
    len: usize,
}

/// One span's share of a group's attention: for each query its largest scaled score, the sum
/// of its scores' exponentials less that, and their weighted sum of values (`dim` each).
struct Part {
    max: Vec<f32>,
    sum: Vec<f32>,
    values: Vec<f32>,
}

impl pulp::WithSimd for Attention<'_> {
    type Output = Part;

    /// The group's scores, position by position along each run of the transposed keys; their
    /// exponentials; then the values, each position's run once for the whole group. Inlined
    /// into the instructions the machine has.
    #[inline(always)]
    fn with_simd<S: Simd>(self, _: S) -> Part {
        let Self {
            q,
            key,
            value,
            head,
            dim,
            from,
            len: n,
        } = self;
        // Multiplied by dim^-0.5 rather than divided by its root, as transformers does.
        let scale = (dim as f64).powf(-0.5) as f32;
        let group = q.len() / dim;
        let mut scores = vec![0.0f32; group * n];
        for d in 0..dim {
            let keys = key.run(head, d, from, n);
            if d + 4 < dim {
                prefetch_run(key.run(head, d + 4, from, n));
            }
            for (scores, q) in scores.chunks_exact_mut(n).zip(q.chunks_exact(dim)) {
                let q = q[d];
                for (s, &k) in scores.iter_mut().zip(keys) {
                    *s = q.mul_add(k, *s);
                }
            }
        }
        let (mut max, mut sum) = (Vec::with_capacity(group), Vec::with_capacity(group));
        for scores in scores.chunks_exact_mut(n) {
            let (m, s) = exponentials(scores, scale);
            max.push(m);
            sum.push(s);
        }
        let mut values = vec![0.0f32; group * dim];
        for t in 0..n {
            let row = value.run(head, from + t, 0, dim);
            if t + 16 < n {
                prefetch_run(value.run(head, from + t + 16, 0, dim));
            }
            for (out, scores) in values.chunks_exact_mut(dim).zip(scores.chunks_exact(n)) {
                let p = scores[t];
                for (o, &v) in out.iter_mut().zip(row) {
                    *o = p.mul_add(v, *o);
                }
            }
        }
        Part { max, sum, values }
    }
}

/// `scores` times `scale`, then each one's exponential less the largest, in place; the
/// largest and the exponentials' sum.
#[inline(always)]
fn exponentials(scores: &mut [f32], scale: f32) -> (f32, f32) {
    let mut max = f32::NEG_INFINITY;
    for s in scores.iter_mut() {
        *s *= scale;
        max = max.max(*s);
    }
    let mut sum = 0.0f32;
    for s in scores.iter_mut() {
        *s = exp(*s - max);
        sum += *s;
    }
    (max, sum)
}

/// e^x for the x ≤ 0 of a score less the largest, within two units in the last place: Cephes'
/// `expf`, which the compiler puts in vector instructions where libm's call stays one value at
/// a time (at 2,048 positions, libm's took a fifth of a decode step). Below -87.3 the result
/// is that of -87.3, about 1e-38; a NaN stays one.
#[inline(always)]
fn exp(x: f32) -> f32 {
    let x = if x < -87.3 { -87.3 } else { x };
    let k = x.mul_add(std::f32::consts::LOG2_E, 0.5).floor();
    let r = k.mul_add(2.121_944_4e-4, k.mul_add(-0.693_359_4, x));
    let p = [
        1.398_199_9e-3,
        8.333_452e-3,
        4.166_579_6e-2,
        0.166_666_65,
        0.5,
    ]
    .into_iter()
    .fold(1.987_569_1e-4_f32, |p, c| p.mul_add(r, c));
    // 2^k, built in the exponent bits: k is in -126..=0 here.
    let scale = f32::from_bits(((k as i32 + 127) as u32) << 23);
    scale * (p * r).mul_add(r, r + 1.0)
}

/// A group's attention output from its spans' parts: each span's share reweighted to the
/// largest score over all of them, as one softmax over every position would give.
fn merge(parts: &[Part], out: &mut [f32], dim: usize) {
    for (query, out) in out.chunks_exact_mut(dim).enumerate() {
        let max = parts
            .iter()
            .map(|p| p.max[query])
            .fold(f32::NEG_INFINITY, f32::max);
        let mut sum = 0.0f32;
        for part in parts {
            let weight = (part.max[query] - max).exp();
            sum += weight * part.sum[query];
            let values = &part.values[query * dim..][..dim];
            for (o, &v) in out.iter_mut().zip(values) {
                *o += weight * v;
            }
        }
        for o in out.iter_mut() {
            *o /= sum;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::tensor::activation;

    fn tensor(shape: [usize; 4], seed: usize) -> Tensor<4> {
        let n = shape.iter().product::<usize>();
        let values = (0..n)
            .map(|i| ((i * 7919 + seed * 31) % 101) as f32 / 50.0 - 1.0)
            .collect::<Vec<_>>();
        Tensor::from_data(TensorData::new(values, shape), &crate::default_device())
    }

    /// Read in place from views of larger buffers, as the cache lends them, and in spans, the
    /// attention is burn's product, softmax and product within rounding; a layout the cache
    /// does not hold is left to burn.
    #[test]
    fn a_step_s_attention_over_the_cache_s_views_is_burn_s() {
        let heads = Heads {
            query: 6,
            kv: 2,
            dim: 8,
        };
        // Three spans, the last a short one.
        let (positions, capacity) = (2 * SPAN + 37, 3 * SPAN);
        let q = tensor([1, heads.query, 1, heads.dim], 1);
        let keys = tensor([1, heads.kv, heads.dim, capacity], 2).narrow(3, 0, positions);
        let values = tensor([1, heads.kv, capacity, heads.dim], 3).narrow(2, 0, positions);
        let got = attend(&q, &keys, &values, heads).expect("the cache's layout");
        let group = heads.query / heads.kv;
        let scores = q
            .clone()
            .reshape([1, heads.kv, group, heads.dim])
            .matmul(keys.clone())
            * (heads.dim as f64).powf(-0.5);
        let expected = activation::softmax(scores, 3)
            .matmul(values.clone())
            .reshape([1, 1, heads.query * heads.dim]);
        let (got, expected) = (crate::layout::to_vec(got), crate::layout::to_vec(expected));
        let off = got
            .iter()
            .zip(&expected)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0, f32::max);
        assert!(off < 1e-5, "{off}");
        // Keys held position by position are not the cache's: burn attends over them.
        let rows = tensor([1, heads.kv, positions, heads.dim], 2).swap_dims(2, 3);
        assert!(attend(&q, &rows, &values, heads).is_none());
    }

    /// The vector-friendly exponential is libm's within two units in the last place over
    /// every difference a score can have from the largest, and a NaN stays one.
    #[test]
    fn the_scores_exponential_is_libm_s() {
        let worst = (0..=870_000)
            .map(|i| -(i as f32) * 1e-4)
            .map(|x| ((exp(x) - x.exp()) / x.exp()).abs())
            .fold(0.0, f32::max);
        assert!(worst <= 2.0 * f32::EPSILON, "{worst}");
        assert!(exp(f32::NAN).is_nan());
        assert!(exp(f32::NEG_INFINITY) < 1e-37);
    }
}
