//! Projections held below f32 on the CPU, multiplied without widening the whole matrix.
//!
//! A decode step multiplies a few rows by every weight once, so it waits on reading the
//! weights: held as bf16 (2 bytes) or int8 (1 byte and a scale per 32), each weight is read
//! once and widened in registers, output by output, on the compute threads. A prefill of many
//! rows is compute-bound instead: the matrix is widened once and multiplied by the backend.

use burn::module::Param;
use burn::tensor::{Tensor, TensorData};
use rayon::prelude::*;

use super::Precision;
use super::dense::{AHEAD, DENSE_ROWS, OUTPUTS_PER_TASK};
use neuroshard_base::precision::int8_block;

/// A projection's weights in Hugging Face's `[out, in]` order (each output's inputs together),
/// held below f32.
pub(crate) struct Packed {
    d_in: usize,
    d_out: usize,
    values: Values,
}

enum Values {
    /// bf16 or f16 bit patterns.
    Half { bits: Vec<u16>, bf16: bool },
    /// int8 values, and the scale of each block of `block` inputs of each output.
    Int8 {
        q: Vec<i8>,
        scales: Vec<f32>,
        block: usize,
    },
}

impl std::fmt::Debug for Packed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let held = match &self.values {
            Values::Half { bf16: true, .. } => "bf16",
            Values::Half { bf16: false, .. } => "f16",
            Values::Int8 { .. } => "int8",
        };
        write!(f, "Packed({held}, {} x {})", self.d_out, self.d_in)
    }
}

impl Packed {
    /// `weight`, `[d_out, d_in]` row-major as stored, held at `precision`; none for f32.
    pub(crate) fn new(
        precision: Precision,
        weight: &[f32],
        d_in: usize,
        d_out: usize,
    ) -> Option<Self> {
        let values = match precision {
            Precision::F32 => return None,
            Precision::Bf16 => Values::Half {
                bits: weight
                    .iter()
                    .map(|&v| half::bf16::from_f32(v).to_bits())
                    .collect(),
                bf16: true,
            },
            Precision::F16 => Values::Half {
                bits: weight
                    .iter()
                    .map(|&v| half::f16::from_f32(v).to_bits())
                    .collect(),
                bf16: false,
            },
            Precision::Int8 => {
                let block = int8_block(d_in);
                let mut q = Vec::with_capacity(weight.len());
                let scales = weight
                    .chunks(block)
                    .map(|values| {
                        let peak = values.iter().fold(0.0f32, |m, v| m.max(v.abs()));
                        let scale = peak / 127.0;
                        let inverse = if scale > 0.0 { 1.0 / scale } else { 0.0 };
                        q.extend(
                            values
                                .iter()
                                .map(|v| (v * inverse).round().clamp(-127.0, 127.0) as i8),
                        );
                        scale
                    })
                    .collect();
                Values::Int8 { q, scales, block }
            }
        };
        Some(Self {
            d_in,
            d_out,
            values,
        })
    }

    /// Where output `j`'s scales lie, for int8 blocks of `block` inputs.
    fn blocks(&self, j: usize, block: usize) -> std::ops::Range<usize> {
        j * self.d_in / block..(j + 1) * self.d_in / block
    }

    /// Output `j`'s weights widened into `out` (`d_in` long).
    fn widen_row(&self, j: usize, out: &mut [f32]) {
        let inputs = j * self.d_in..(j + 1) * self.d_in;
        match &self.values {
            Values::Half { bits, bf16: true } => {
                for (o, &b) in out.iter_mut().zip(&bits[inputs]) {
                    *o = bf16_to_f32(b);
                }
            }
            Values::Half { bits, bf16: false } => {
                for (o, &b) in out.iter_mut().zip(&bits[inputs]) {
                    *o = f16_to_f32(b);
                }
            }
            Values::Int8 { q, scales, block } => {
                let chunks = out.chunks_mut(*block).zip(q[inputs].chunks(*block));
                for ((o, q), &s) in chunks.zip(&scales[self.blocks(j, *block)]) {
                    for (o, &q) in o.iter_mut().zip(q) {
                        *o = s * f32::from(q);
                    }
                }
            }
        }
    }

    /// Asks memory for output `j`'s held values (and none past the last output), so that a
    /// row reading the weights as it goes does not wait on each output's.
    fn prefetch_row(&self, j: usize) {
        if j >= self.d_out {
            return;
        }
        let inputs = j * self.d_in..(j + 1) * self.d_in;
        match &self.values {
            Values::Half { bits, .. } => super::prefetch_run(&bits[inputs]),
            Values::Int8 { q, .. } => super::prefetch_run(&q[inputs]),
        }
    }

    /// Output `j` for the input row `x`.
    fn dot(&self, j: usize, x: &[f32]) -> f32 {
        let inputs = j * self.d_in..(j + 1) * self.d_in;
        match &self.values {
            Values::Half { bits, bf16: true } => lanes(x, &bits[inputs], bf16_to_f32),
            Values::Half { bits, bf16: false } => lanes(x, &bits[inputs], f16_to_f32),
            Values::Int8 { q, scales, block } => {
                let scales = &scales[self.blocks(j, *block)];
                scaled_blocks(x, &q[inputs], scales, *block, f32::from)
            }
        }
    }

    /// `x` (`[.., d_in]`) times the weights, plus `bias`: `[.., d_out]`.
    pub(crate) fn apply<const D: usize>(
        &self,
        x: Tensor<D>,
        bias: Option<&Param<Tensor<1>>>,
    ) -> Tensor<D> {
        let mut dims = x.dims();
        let rows = dims[..D - 1].iter().product::<usize>();
        let device = x.device();
        let out = if rows <= DENSE_ROWS {
            dims[D - 1] = self.d_out;
            let x = crate::layout::to_vec(x);
            Tensor::from_data(TensorData::new(self.fused(&x, rows), dims), &device)
        } else {
            let widened = Tensor::<2>::from_data(
                TensorData::new(self.widened(), [self.d_out, self.d_in]),
                &device,
            );
            x.matmul(widened.transpose().unsqueeze::<D>())
        };
        match bias {
            Some(b) => out + b.val().unsqueeze(),
            None => out,
        }
    }

    /// Output `j`'s held values as f32 in `out` (`d_in` long): bf16 and f16 widened, int8
    /// values without their scales, which [`Self::dot_unpacked`] applies per block as
    /// [`Self::dot`] does, so that both give the same sums.
    fn unpack_row(&self, j: usize, out: &mut [f32]) {
        match &self.values {
            Values::Half { .. } => self.widen_row(j, out),
            Values::Int8 { q, .. } => {
                let inputs = &q[j * self.d_in..(j + 1) * self.d_in];
                for (o, &q) in out.iter_mut().zip(inputs) {
                    *o = f32::from(q);
                }
            }
        }
    }

    /// [`Self::dot`] of output `j` with the row `x`, its values unpacked in `w` by
    /// [`Self::unpack_row`]: the same arithmetic in the same order, so the same value.
    fn dot_unpacked(&self, j: usize, w: &[f32], x: &[f32]) -> f32 {
        match &self.values {
            Values::Half { .. } => lanes(x, w, |v| v),
            Values::Int8 { scales, block, .. } => {
                let scales = &scales[self.blocks(j, *block)];
                scaled_blocks(x, w, scales, *block, |v| v)
            }
        }
    }

    /// `rows` rows of `x` times the weights, output by output on the compute threads:
    /// `[rows, d_out]`. With several rows, each output's weights are unpacked once and used
    /// for every row (a batch of sessions shares the read); one row reads them as it goes.
    fn fused(&self, x: &[f32], rows: usize) -> Vec<f32> {
        let mut by_output = vec![0.0f32; self.d_out * rows];
        let row = |r: usize| &x[r * self.d_in..(r + 1) * self.d_in];
        by_output
            .par_chunks_mut(OUTPUTS_PER_TASK * rows.max(1))
            .enumerate()
            .for_each_init(
                || vec![0.0f32; self.d_in],
                |unpacked, (task, out)| {
                    for (k, out) in out.chunks_mut(rows.max(1)).enumerate() {
                        let j = task * OUTPUTS_PER_TASK + k;
                        if rows == 1 {
                            self.prefetch_row(j + AHEAD);
                            out[0] = self.dot(j, row(0));
                            continue;
                        }
                        self.unpack_row(j, unpacked);
                        for (r, o) in out.iter_mut().enumerate() {
                            *o = self.dot_unpacked(j, unpacked, row(r));
                        }
                    }
                },
            );
        super::dense::by_rows(&by_output, rows, self.d_out)
    }

    /// Every weight widened to f32, `[d_out, d_in]`.
    fn widened(&self) -> Vec<f32> {
        let mut out = vec![0.0f32; self.d_out * self.d_in];
        out.par_chunks_mut(self.d_in)
            .enumerate()
            .for_each(|(j, row)| self.widen_row(j, row));
        out
    }
}

/// A bf16 bit pattern's value: the bits moved up, which the compiler puts in vector
/// instructions (the KV cache's bf16 reads widen through it too).
#[inline(always)]
pub(crate) fn bf16_to_f32(bits: u16) -> f32 {
    f32::from_bits(u32::from(bits) << 16)
}

/// An f16 bit pattern's value.
#[inline(always)]
pub(crate) fn f16_to_f32(bits: u16) -> f32 {
    half::f16::from_bits(bits).to_f32()
}

/// The dot product of `x` with int8 weights `w` (as held, or unpacked to f32) in blocks of
/// `block` inputs, each block's sum times its scale.
#[inline]
fn scaled_blocks<T: Copy>(
    x: &[f32],
    w: &[T],
    scales: &[f32],
    block: usize,
    widen: impl Fn(T) -> f32 + Copy,
) -> f32 {
    let chunks = x.chunks(block).zip(w.chunks(block));
    chunks
        .zip(scales)
        .map(|((x, w), s)| s * lanes(x, w, widen))
        .sum()
}

/// The dot product of `x` with `w` widened by `widen`, in eight independent sums so that the
/// compiler can keep them in vector lanes.
#[inline]
fn lanes<T: Copy>(x: &[f32], w: &[T], widen: impl Fn(T) -> f32) -> f32 {
    let mut sums = [0.0f32; 8];
    let (xs, ws) = (x.chunks_exact(8), w.chunks_exact(8));
    let tail: f32 = (xs.remainder().iter())
        .zip(ws.remainder())
        .map(|(&a, &b)| a * widen(b))
        .sum();
    for (xc, wc) in xs.zip(ws) {
        for l in 0..8 {
            sums[l] += xc[l] * widen(wc[l]);
        }
    }
    sums.iter().sum::<f32>() + tail
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Made-up weights `[d_out, d_in]` in [-0.5, 0.5).
    fn weights(d_in: usize, d_out: usize) -> Vec<f32> {
        (0..d_in * d_out)
            .map(|i| ((i * 7919) % 113) as f32 / 113.0 - 0.5)
            .collect()
    }

    /// Made-up input rows `[rows, d_in]` in [-1, 1).
    fn inputs(rows: usize, d_in: usize) -> Vec<f32> {
        (0..rows * d_in)
            .map(|i| ((i * 31) % 17) as f32 / 8.0 - 1.0)
            .collect()
    }

    /// The fused product and the widened one agree with the held weights' f32 product, at
    /// decode and prefill row counts, with and without a bias.
    #[test]
    fn fused_and_widened_products_are_the_held_weights_product() {
        let device = burn::tensor::Device::default();
        for (d_in, d_out, rows) in [(64, 48, 1), (40, 70, 3), (64, 48, 20)] {
            let (w, x) = (weights(d_in, d_out), inputs(rows, d_in));
            let bias: Vec<f32> = (0..d_out).map(|i| i as f32 / 10.0).collect();
            for p in [Precision::Bf16, Precision::F16, Precision::Int8] {
                let packed = Packed::new(p, &w, d_in, d_out).unwrap();
                let held = packed.widened();
                let mut expected = vec![0.0f32; rows * d_out];
                for r in 0..rows {
                    for j in 0..d_out {
                        let row = &held[j * d_in..(j + 1) * d_in];
                        let dot: f32 = row.iter().zip(&x[r * d_in..]).map(|(a, b)| a * b).sum();
                        expected[r * d_out + j] = dot + bias[j];
                    }
                }
                let input =
                    Tensor::<3>::from_data(TensorData::new(x.clone(), [1, rows, d_in]), &device);
                let b = Param::from_tensor(Tensor::<1>::from_data(
                    TensorData::new(bias.clone(), [d_out]),
                    &device,
                ));
                let got = crate::layout::to_vec(packed.apply(input, Some(&b)));
                let off = got
                    .iter()
                    .zip(&expected)
                    .map(|(a, b)| (a - b).abs())
                    .fold(0.0, f32::max);
                assert!(off < 1e-4, "{p} {d_in}x{d_out}, {rows} rows: {off}");
                // The held weights are the precision's rounding of the originals.
                let rounded = held
                    .iter()
                    .zip(&w)
                    .map(|(h, w)| (h - w).abs())
                    .fold(0.0, f32::max);
                assert!(rounded > 0.0 && rounded < 0.01, "{p}: {rounded}");
            }
        }
        assert!(Packed::new(Precision::F32, &[1.0], 1, 1).is_none());
    }

    /// A row multiplied with others (a batch of sessions) gets exactly the bits it gets
    /// alone: batched decode gives each session its own tokens.
    #[test]
    fn a_row_in_a_batch_gets_the_product_it_gets_alone() {
        let (d_in, d_out, rows) = (100, 40, 7);
        let (w, x) = (weights(d_in, d_out), inputs(rows, d_in));
        for p in [Precision::Bf16, Precision::F16, Precision::Int8] {
            let packed = Packed::new(p, &w, d_in, d_out).unwrap();
            let together = packed.fused(&x, rows);
            for r in 0..rows {
                let alone = packed.fused(&x[r * d_in..(r + 1) * d_in], 1);
                let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
                let batched = &together[r * d_out..(r + 1) * d_out];
                assert_eq!(bits(batched), bits(&alone), "{p}, row {r}");
            }
        }
    }

    /// A shard on the CPU packs its projections and head below f32 and keeps no weights in
    /// their `Linear`s; at f32 it packs none.
    #[test]
    fn a_cpu_shard_below_f32_packs_every_projection() {
        let dir = tempfile::tempdir().unwrap();
        crate::init::write_model(dir.path(), &crate::init::ModelSpec::tiny()).unwrap();
        let device = crate::default_device();
        assert!(crate::is_cpu(&device));
        for p in Precision::ALL {
            let shard = crate::Shard::load_at(dir.path(), 0..4, &device, p).unwrap();
            let w = &shard.weights;
            let packed = p != Precision::F32;
            assert!(w.layers.iter().all(|l| l.packed.is_some() == packed), "{p}");
            assert_eq!(w.packed_head.is_some(), packed, "{p}");
            if packed {
                assert_eq!(w.layers[0].q_proj.weight.val().dims(), [1, 1], "{p}");
            }
        }
    }
}
