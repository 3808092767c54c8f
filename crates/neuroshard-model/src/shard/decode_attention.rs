//! One new position's attention over a session's cache, on the CPU.
//!
//! A decode step attends one query per head over every cached position. Through burn's
//! products that is a product of three rows by the keys, a softmax and another product, each
//! with its own dispatch and buffers, and at 2,048 positions it cost SmolLM2-135M 0.7 ms a
//! layer, a third of the step. Here the keys (held transposed, each head's dimension a run of
//! positions) and the values are read in place, in order, once for every query head of their
//! group, with the vector instructions the machine has.

use burn::tensor::{Tensor, TensorData};
use burn_flex::Flex;
use pulp::Simd;
use rayon::prelude::*;

use super::layers::Heads;

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
    let mut out = vec![0.0f32; heads.query * dim];
    let width = heads.query / kv * dim;
    out.par_chunks_mut(width)
        .zip(q.par_chunks(width))
        .enumerate()
        .for_each(|(head, (out, q))| {
            let (key, value) = (&key, &value);
            let one = Attention {
                q,
                key,
                value,
                head,
                dim,
                positions,
                out,
            };
            pulp::Arch::new().dispatch(one);
        });
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

    /// Run `i` of head `head`, `len` long.
    #[inline(always)]
    fn run(&self, head: usize, i: usize, len: usize) -> &'a [f32] {
        &self.data[self.start + head * self.head_stride + i * self.inner..][..len]
    }
}

/// The queries of one key/value head's group at one position, the cache they attend over,
/// and where their output goes.
struct Attention<'a> {
    q: &'a [f32],
    key: &'a Strided<'a>,
    value: &'a Strided<'a>,
    head: usize,
    dim: usize,
    positions: usize,
    out: &'a mut [f32],
}

impl pulp::WithSimd for Attention<'_> {
    type Output = ();

    /// The group's scores, position by position along each run of the transposed keys; their
    /// softmax; then the values, each position's run once for the whole group. Inlined into
    /// the instructions the machine has.
    #[inline(always)]
    fn with_simd<S: Simd>(self, _: S) {
        let Self {
            q,
            key,
            value,
            head,
            dim,
            positions: n,
            out,
        } = self;
        // Multiplied by dim^-0.5 rather than divided by its root, as transformers does.
        let scale = (dim as f64).powf(-0.5) as f32;
        let mut scores = vec![0.0f32; q.len() / dim * n];
        for d in 0..dim {
            let keys = key.run(head, d, n);
            for (scores, q) in scores.chunks_exact_mut(n).zip(q.chunks_exact(dim)) {
                let q = q[d];
                for (s, &k) in scores.iter_mut().zip(keys) {
                    *s = q.mul_add(k, *s);
                }
            }
        }
        for scores in scores.chunks_exact_mut(n) {
            softmax(scores, scale);
        }
        for t in 0..n {
            let values = value.run(head, t, dim);
            for (out, scores) in out.chunks_exact_mut(dim).zip(scores.chunks_exact(n)) {
                let p = scores[t];
                for (o, &v) in out.iter_mut().zip(values) {
                    *o = p.mul_add(v, *o);
                }
            }
        }
    }
}

/// `scores` times `scale`, then their softmax, in place.
#[inline(always)]
fn softmax(scores: &mut [f32], scale: f32) {
    let mut max = f32::NEG_INFINITY;
    for s in scores.iter_mut() {
        *s *= scale;
        max = max.max(*s);
    }
    let mut sum = 0.0f32;
    for s in scores.iter_mut() {
        *s = (*s - max).exp();
        sum += *s;
    }
    for s in scores.iter_mut() {
        *s /= sum;
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

    /// Read in place from views of larger buffers, as the cache lends them, the attention is
    /// burn's product, softmax and product within rounding; a layout the cache does not
    /// hold is left to burn.
    #[test]
    fn a_step_s_attention_over_the_cache_s_views_is_burn_s() {
        let heads = Heads {
            query: 6,
            kv: 2,
            dim: 8,
        };
        let (positions, capacity) = (37, 64);
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
}
