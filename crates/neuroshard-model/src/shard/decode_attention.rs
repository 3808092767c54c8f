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

use burn::tensor::{DType, Tensor, TensorData};
use burn_flex::Flex;
use pulp::Simd;
use rayon::prelude::*;

use super::layers::Heads;
use crate::precision::{prefetch, prefetch_run};

/// The attention output `[1, 1, query * dim]` of the queries `q` (`[1, query, 1, dim]`, after
/// RoPE) over `keys` (`[1, kv, dim, positions]`) and `values` (`[1, kv, positions, dim]`) as
/// the cache holds them (f32, bf16 or f16); none where they are not held so (another backend,
/// or no cache).
pub(crate) fn attend(
    q: &Tensor<4>,
    keys: &Tensor<4>,
    values: &Tensor<4>,
    heads: Heads,
) -> Option<Tensor<3>> {
    let [_, kv, dim, positions] = keys.dims();
    let k = keys.clone().try_into_primitive::<Flex>().ok()?;
    let v = values.clone().try_into_primitive::<Flex>().ok()?;
    if k.dtype() != v.dtype() || kv != heads.kv || dim != heads.dim {
        return None;
    }
    // Keys: each head's dimension a run of positions; values: each position a run of dims.
    let (ks, vs) = (k.layout().strides(), v.layout().strides());
    if ks[3] != 1 || vs[3] != 1 || values.dims() != [1, kv, positions, dim] {
        return None;
    }
    let device = q.device();
    let q = crate::layout::to_vec(q.clone());
    if q.len() != heads.query * dim {
        return None;
    }
    let out = match k.dtype() {
        DType::F32 => attend_held::<f32>(&q, (&k, &v), heads, positions)?,
        DType::BF16 => attend_held::<half::bf16>(&q, (&k, &v), heads, positions)?,
        DType::F16 => attend_held::<half::f16>(&q, (&k, &v), heads, positions)?,
        _ => return None,
    };
    let shape = [1, 1, heads.query * dim];
    Some(Tensor::from_data(TensorData::new(out, shape), &device))
}

/// A value type the cache holds, widened to f32 as it is read.
trait Held: burn::tensor::Element + bytemuck::Pod + Sync {
    fn widen(self) -> f32;
}

impl Held for f32 {
    #[inline(always)]
    fn widen(self) -> f32 {
        self
    }
}

impl Held for half::bf16 {
    #[inline(always)]
    fn widen(self) -> f32 {
        crate::precision::bf16_to_f32(self.to_bits())
    }
}

impl Held for half::f16 {
    #[inline(always)]
    fn widen(self) -> f32 {
        crate::precision::f16_to_f32(self.to_bits())
    }
}

/// [`attend`]'s output for a cache holding `E`: the queries `q` over the `positions` held in
/// the keys and values `(k, v)`, whose layout is checked.
fn attend_held<E: Held>(
    q: &[f32],
    (k, v): (&burn_flex::FlexTensor, &burn_flex::FlexTensor),
    heads: Heads,
    positions: usize,
) -> Option<Vec<f32>> {
    let (kv, dim) = (heads.kv, heads.dim);
    let key = Strided::<E>::of(k, positions, dim)?;
    let value = Strided::<E>::of(v, dim, positions)?;
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
    Some(out)
}

/// A cache buffer read in place: element `(head, i, j)` at `start + head * head_stride + i *
/// inner + j`, with runs of `run` along `j` and `count` of them along `i`.
struct Strided<'a, E> {
    data: &'a [E],
    start: usize,
    head_stride: usize,
    inner: usize,
}

impl<'a, E: Held> Strided<'a, E> {
    /// The buffer behind `t` (`[1, heads, count, run]` with unit stride along the runs), when
    /// every element lies inside it.
    fn of(t: &'a burn_flex::FlexTensor, run: usize, count: usize) -> Option<Self> {
        let heads = t.layout().shape()[1];
        let strides = t.layout().strides();
        if heads == 0 || count == 0 || run == 0 {
            return None;
        }
        let s = Self {
            data: t.storage::<E>(),
            start: t.layout().start_offset(),
            head_stride: usize::try_from(strides[1]).ok()?,
            inner: usize::try_from(strides[2]).ok()?,
        };
        let last = s.start + (heads - 1) * s.head_stride + (count - 1) * s.inner + run;
        (last <= s.data.len()).then_some(s)
    }

    /// Where element `j` of run `i` of head `head` lies, for a prefetch: the address may be
    /// past the buffer.
    #[inline(always)]
    fn at(&self, head: usize, i: usize, j: usize) -> *const E {
        let offset = self.start + head * self.head_stride + i * self.inner + j;
        self.data.as_ptr().wrapping_add(offset)
    }

    /// Run `i` of head `head`, `len` long from element `from` of the run.
    #[inline(always)]
    fn run(&self, head: usize, i: usize, from: usize, len: usize) -> &'a [E] {
        &self.data[self.start + head * self.head_stride + i * self.inner + from..][..len]
    }
}

/// Positions attended as one task: at 2,048 positions a head has eight.
const SPAN: usize = 256;

/// The queries of one key/value head's group, the span of cached positions `from..from +
/// len` they attend over here, and the cache.
struct Attention<'a, E> {
    q: &'a [f32],
    key: &'a Strided<'a, E>,
    value: &'a Strided<'a, E>,
    head: usize,
    dim: usize,
    from: usize,
    len: usize,
}

/// Positions (for the scores) or dimensions (for the values) a tile spans: two vectors of f32,
/// so that a tile of a few queries has enough independent sums to keep the core's
/// multiply-adders busy.
const WIDTH: usize = 16;

/// Cache lines of each key run asked for ahead of the tile reading it.
const LINES_AHEAD: usize = 12;

/// One span's share of a group's attention: for each query its largest scaled score, the sum
/// of its scores' exponentials less that, and their weighted sum of values (`dim` each).
struct Part {
    max: Vec<f32>,
    sum: Vec<f32>,
    values: Vec<f32>,
}

impl<E: Held> pulp::WithSimd for Attention<'_, E> {
    type Output = Part;

    /// The group's queries a few at a time: each tile's scores, their exponentials, and their
    /// weighted values. Inlined into the instructions the machine has.
    #[inline(always)]
    fn with_simd<S: Simd>(self, _: S) -> Part {
        let group = self.q.len() / self.dim;
        let mut part = Part {
            max: Vec::with_capacity(group),
            sum: Vec::with_capacity(group),
            values: vec![0.0f32; group * self.dim],
        };
        let mut first = 0;
        while first < group {
            first += match group - first {
                1 => self.queries::<1>(first, &mut part),
                2 => self.queries::<2>(first, &mut part),
                3 => self.queries::<3>(first, &mut part),
                _ => self.queries::<4>(first, &mut part),
            };
        }
        part
    }
}

impl<E: Held> Attention<'_, E> {
    /// The share of the `Q` queries from `first` on, added to `part`; `Q`.
    #[inline(always)]
    fn queries<const Q: usize>(&self, first: usize, part: &mut Part) -> usize {
        let (n, dim) = (self.len, self.dim);
        // Multiplied by dim^-0.5 rather than divided by its root, as transformers does.
        let scale = (dim as f64).powf(-0.5) as f32;
        let mut scores = self.scores::<Q>(&self.q[first * dim..][..Q * dim]);
        for scores in scores.chunks_exact_mut(n) {
            let (max, sum) = exponentials(scores, scale);
            part.max.push(max);
            part.sum.push(sum);
        }
        self.values::<Q>(&scores, &mut part.values[first * dim..][..Q * dim]);
        Q
    }

    /// The scores `[Q, n]` of the queries `q` (`Q` of `dim`), in tiles of `Q` by [`WIDTH`]
    /// positions whose sums stay in registers over every dimension. Each score is summed over
    /// the dimensions in order.
    #[inline(always)]
    fn scores<const Q: usize>(&self, q: &[f32]) -> Vec<f32> {
        let (key, head, from, n, dim) = (self.key, self.head, self.from, self.len, self.dim);
        // Each run of keys (one per dimension) is asked of memory a few cache lines ahead of
        // the tile reading it: the runs are a few lines long, too short for the hardware to
        // see them coming.
        let line = 64 / std::mem::size_of::<E>();
        for d in 0..dim {
            prefetch_run(key.run(head, d, from, n.min(LINES_AHEAD * line)));
        }
        // Each dimension's values of the Q queries, side by side.
        let mut by_dim = vec![[0.0f32; Q]; dim];
        for (j, row) in q.chunks_exact(dim).enumerate() {
            for (d, &v) in row.iter().enumerate() {
                by_dim[d][j] = v;
            }
        }
        let mut out = vec![0.0f32; Q * n];
        for start in (0..n).step_by(WIDTH) {
            let ahead = start + LINES_AHEAD * line;
            if start % line == 0 && ahead < n {
                for d in 0..dim {
                    prefetch(key.at(head, d, from + ahead));
                }
            }
            let width = WIDTH.min(n - start);
            let mut sums = [[0.0f32; WIDTH]; Q];
            for (d, q) in by_dim.iter().enumerate() {
                let keys = widen(key.run(head, d, from + start, width));
                for (sums, &q) in sums.iter_mut().zip(q) {
                    for (s, &k) in sums.iter_mut().zip(&keys) {
                        *s = q.mul_add(k, *s);
                    }
                }
            }
            scatter(sums, &mut out, n, start, width);
        }
        out
    }

    /// The weighted sums `out` (`[Q, dim]`) of the values by the exponentials `p` (`[Q, n]`),
    /// in tiles of `Q` by [`WIDTH`] dimensions whose sums stay in registers over every
    /// position. Each sum is taken over the positions in order.
    #[inline(always)]
    fn values<const Q: usize>(&self, p: &[f32], out: &mut [f32]) {
        let (value, head, from, n, dim) = (self.value, self.head, self.from, self.len, self.dim);
        for start in (0..dim).step_by(WIDTH) {
            let width = WIDTH.min(dim - start);
            let mut sums = [[0.0f32; WIDTH]; Q];
            for t in 0..n {
                if start == 0 && t + 16 < n {
                    prefetch_run(value.run(head, from + t + 16, 0, dim));
                }
                let values = widen(value.run(head, from + t, start, width));
                for (j, sums) in sums.iter_mut().enumerate() {
                    let p = p[j * n + t];
                    for (s, &v) in sums.iter_mut().zip(&values) {
                        *s = p.mul_add(v, *s);
                    }
                }
            }
            scatter(sums, out, dim, start, width);
        }
    }
}

/// A tile's `sums` into the rows (`row` long) of `out`, at `start`, `width` of each. Copied
/// first: the tile's loop keeps its sums in registers only while nothing takes their address.
#[inline(always)]
fn scatter<const Q: usize>(
    sums: [[f32; WIDTH]; Q],
    out: &mut [f32],
    row: usize,
    start: usize,
    width: usize,
) {
    let done = sums;
    for (j, sums) in done.iter().enumerate() {
        out[j * row + start..][..width].copy_from_slice(&sums[..width]);
    }
}

/// A run of at most [`WIDTH`] held values as f32, zero past its end.
#[inline(always)]
fn widen<E: Held>(run: &[E]) -> [f32; WIDTH] {
    let mut out = [0.0f32; WIDTH];
    match run.first_chunk::<WIDTH>() {
        Some(whole) => {
            for (o, &e) in out.iter_mut().zip(whole) {
                *o = e.widen();
            }
        }
        None => {
            for (o, &e) in out.iter_mut().zip(run) {
                *o = e.widen();
            }
        }
    }
    out
}

/// `scores` times `scale`, then each one's exponential less the largest, in place; the
/// largest and the exponentials' sum. The largest and the sum are taken in `LANES` running
/// lanes and the exponentials in a loop of their own, so that all three go in vector
/// instructions (a running sum in one lane kept the exponentials one at a time).
#[inline(always)]
fn exponentials(scores: &mut [f32], scale: f32) -> (f32, f32) {
    const LANES: usize = 8;
    let mut max = [f32::NEG_INFINITY; LANES];
    let (chunks, rest) = scores.as_chunks_mut::<LANES>();
    for chunk in chunks {
        for (m, s) in max.iter_mut().zip(chunk) {
            *s *= scale;
            *m = m.max(*s);
        }
    }
    for (m, s) in max.iter_mut().zip(rest) {
        *s *= scale;
        *m = m.max(*s);
    }
    let max = max.into_iter().fold(f32::NEG_INFINITY, f32::max);
    for s in scores.iter_mut() {
        *s = exp(*s - max);
    }
    let mut sum = [0.0f32; LANES];
    let (chunks, rest) = scores.as_chunks::<LANES>();
    for chunk in chunks {
        for (total, s) in sum.iter_mut().zip(chunk) {
            *total += s;
        }
    }
    for (total, s) in sum.iter_mut().zip(rest) {
        *total += s;
    }
    (max, sum.into_iter().sum())
}

/// e^x for the x ≤ 0 of a score less the largest, within two units in the last place: Cephes'
/// `expf`, which the compiler puts in vector instructions where libm's call stays one value at
/// a time (at 2,048 positions, libm's took a fifth of a decode step). Below -87.3 the result
/// is that of -87.3, about 1e-38; a NaN stays one.
#[inline(always)]
fn exp(x: f32) -> f32 {
    // 1.5 × 2^23: added to a float below 2^22 in magnitude, it rounds it to the nearest whole
    // number, which the sum's low mantissa bits then hold. A `floor` and an `as i32` kept the
    // loop one value at a time.
    const ROUND: f32 = 12_582_912.0;
    let x = if x < -87.3 { -87.3 } else { x };
    let t = x.mul_add(std::f32::consts::LOG2_E, ROUND);
    let k = t - ROUND;
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
    // 2^k, built in the exponent bits from t's: k is in -126..=0 here.
    let scale = f32::from_bits(t.to_bits().wrapping_sub(ROUND.to_bits() - 127) << 23);
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

    /// Read in place from views of larger buffers, as the cache lends them, held as f32, bf16
    /// or f16, and in spans, the attention is burn's product, softmax and product (on the
    /// values as held) within rounding; a layout the cache does not hold is left to burn.
    #[test]
    fn a_step_s_attention_over_the_cache_s_views_is_burn_s() {
        // Groups of three queries (one tile) and of five (a tile of four and one of one);
        // heads of fewer dimensions than a tile and of a tile and a part.
        for (query, dim) in [(6, 8), (10, 24)] {
            let heads = Heads { query, kv: 2, dim };
            for float in [DType::F32, DType::BF16, DType::F16] {
                attention_is_burn_s(heads, float);
            }
        }
    }

    /// [`attend`] against burn's product, softmax and product, over three spans (the last a
    /// short one) of a cache holding `float`.
    fn attention_is_burn_s(heads: Heads, float: DType) {
        let (positions, capacity) = (2 * SPAN + 37, 3 * SPAN);
        let q = tensor([1, heads.query, 1, heads.dim], 1);
        let keys = tensor([1, heads.kv, heads.dim, capacity], 2)
            .cast(float)
            .narrow(3, 0, positions);
        let values = tensor([1, heads.kv, capacity, heads.dim], 3)
            .cast(float)
            .narrow(2, 0, positions);
        let got = attend(&q, &keys, &values, heads).expect("the cache's layout");
        let group = heads.query / heads.kv;
        let scores = q
            .clone()
            .reshape([1, heads.kv, group, heads.dim])
            .matmul(keys.clone().cast(DType::F32))
            * (heads.dim as f64).powf(-0.5);
        let expected = activation::softmax(scores, 3)
            .matmul(values.clone().cast(DType::F32))
            .reshape([1, 1, heads.query * heads.dim]);
        let (got, expected) = (crate::layout::to_vec(got), crate::layout::to_vec(expected));
        let off = got
            .iter()
            .zip(&expected)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0, f32::max);
        assert!(off < 1e-5, "{heads:?} {float:?}: {off}");
        // Keys held position by position are not the cache's: burn attends over them.
        let values = tensor([1, heads.kv, positions, heads.dim], 3);
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
