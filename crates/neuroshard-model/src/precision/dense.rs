//! f32 projections of a few rows on the CPU: a decode step of one session or of a batch.
//!
//! burn's product of a few rows by a weight matrix runs on one thread and pads the rows to its
//! tile: over SmolLM2-135M's 30 layers on 2 cores, one session's decode step took 86 ms and a
//! batch of eight 161 ms, where reading the weights, the same for both, should be most of a
//! step; here they take 37 and 67 ms. The CPU shard holds each f32 projection as
//! the checkpoint stores it, each output's inputs together (burn sees the transposed view), so
//! here each output's weights stream from memory once and serve every row from registers,
//! blocks of outputs on the compute threads, with the vector instructions the machine has
//! (chosen at run time). Every output's sum is formed the same way whichever rows share the
//! product, so a session gets the same bits alone as in a batch.

use burn::tensor::{DType, Tensor, TensorData};
use burn_flex::Flex;
use pulp::Simd;
use rayon::prelude::*;

/// Rows multiplied here (and by the packed projections); more (a prefill) are compute-bound
/// and go to burn's product.
pub(crate) const DENSE_ROWS: usize = 16;

/// Outputs one compute task takes.
pub(super) const OUTPUTS_PER_TASK: usize = 64;

/// How many outputs ahead the first row asks memory for the weights it will read (and the
/// packed projections' one row too). Each output's weights are a few KB, too short a run for
/// the hardware's prefetcher to keep ahead of: asked two groups ahead, a decode step of one
/// session took 23 % less at f32 (52.5 to 40.3 ms), 14 % less at bf16 and 9 % at int8.
pub(super) const AHEAD: usize = 16;

/// `x` (`[.., d_in]`, at most [`DENSE_ROWS`] rows) times `weight` (`[d_in, d_out]`, held as
/// the transposed view of `[d_out, d_in]` in the CPU backend's memory): `[.., d_out]`; none for
/// a weight held otherwise, before `x` is read.
pub(crate) fn product<const D: usize>(weight: &Tensor<2>, x: &Tensor<D>) -> Option<Tensor<D>> {
    let [d_in, d_out] = weight.dims();
    let mut dims = x.dims();
    let rows = dims[..D - 1].iter().product::<usize>();
    let held = weight.clone().try_into_primitive::<Flex>().ok()?;
    let layout = held.layout();
    let by_output = layout.strides() == [1, d_in as isize] && layout.start_offset() == 0;
    if held.dtype() != DType::F32 || !by_output || dims[D - 1] != d_in {
        return None;
    }
    let w = held.storage::<f32>();
    if !(1..=DENSE_ROWS).contains(&rows) || w.len() != d_in * d_out {
        return None;
    }
    let out = multiply(w, &crate::layout::to_vec(x.clone()), rows, d_in, d_out);
    dims[D - 1] = d_out;
    Some(Tensor::from_data(TensorData::new(out, dims), &x.device()))
}

/// The product of `x` `[rows, d_in]` and the weights `w` `[d_out, d_in]`, blocks of outputs
/// on the compute threads.
fn multiply(w: &[f32], x: &[f32], rows: usize, d_in: usize, d_out: usize) -> Vec<f32> {
    let mut by_output = vec![0.0f32; d_out * rows];
    by_output
        .par_chunks_mut(OUTPUTS_PER_TASK * rows)
        .enumerate()
        .for_each(|(task, out)| {
            let first = task * OUTPUTS_PER_TASK;
            let outputs = out.len() / rows;
            let w = &w[first * d_in..(first + outputs) * d_in];
            pulp::Arch::new().dispatch(Block { w, x, d_in, out });
        });
    by_rows(&by_output, rows, d_out)
}

/// Products held output by output (`[d_out, rows]`) as rows (`[rows, d_out]`).
pub(super) fn by_rows(by_output: &[f32], rows: usize, d_out: usize) -> Vec<f32> {
    let mut out = vec![0.0f32; rows * d_out];
    for (j, column) in by_output.chunks(rows.max(1)).enumerate() {
        for (r, &v) in column.iter().enumerate() {
            out[r * d_out + j] = v;
        }
    }
    out
}

/// Some outputs' weights (`[outputs, d_in]`) times every row of `x`, into `out`
/// (`[outputs, rows]`), on this thread.
struct Block<'a> {
    w: &'a [f32],
    x: &'a [f32],
    d_in: usize,
    out: &'a mut [f32],
}

impl pulp::WithSimd for Block<'_> {
    type Output = ();

    /// Eight outputs at a time, their weights read from memory once (with the first row) and
    /// then from the cache for the other rows, up to four at a time; within those, a few
    /// outputs at a time, so that each weight loaded serves every row of the tile from
    /// registers. Inlined into the instructions the machine has.
    #[inline(always)]
    fn with_simd<S: Simd>(self, simd: S) {
        let Self { w, x, d_in, out } = self;
        let (outputs, rows) = (w.len() / d_in, x.len() / d_in);
        for from in (0..outputs).step_by(8) {
            let to = (from + 8).min(outputs);
            let mut r = 0;
            while r < rows {
                // The first row alone streams the eight outputs' weights from memory side by
                // side; the other rows find them in the cache.
                let take = if r == 0 { 1 } else { (rows - r).min(4) };
                let x = &x[r * d_in..(r + take) * d_in];
                let tile = Tile {
                    w,
                    x,
                    d_in,
                    rows,
                    first_row: r,
                };
                let done = match take {
                    1 => tile.outputs::<S, 1, 8>(simd, from..to, out),
                    2 => tile.outputs::<S, 2, 4>(simd, from..to, out),
                    3 => tile.outputs::<S, 3, 2>(simd, from..to, out),
                    _ => tile.outputs::<S, 4, 2>(simd, from..to, out),
                };
                match take {
                    1 => tile.outputs::<S, 1, 1>(simd, done..to, out),
                    2 => tile.outputs::<S, 2, 1>(simd, done..to, out),
                    3 => tile.outputs::<S, 3, 1>(simd, done..to, out),
                    _ => tile.outputs::<S, 4, 1>(simd, done..to, out),
                };
                r += take;
            }
        }
    }
}

/// A few rows of `x` and a block of outputs' weights.
struct Tile<'a> {
    w: &'a [f32],
    x: &'a [f32],
    d_in: usize,
    /// Rows of the whole product, and where this tile's first lies among them.
    rows: usize,
    first_row: usize,
}

impl Tile<'_> {
    /// Outputs of `range`, `J` at a time, for this tile's `R` rows, into `out`
    /// (`[outputs, rows]`); returns the first output left (fewer than `J` remain).
    ///
    /// Each output's sum for each row: vector lanes of fused multiply-adds over the inputs,
    /// the lanes summed, then the inputs left over one by one.
    #[inline(always)]
    fn outputs<S: Simd, const R: usize, const J: usize>(
        &self,
        simd: S,
        range: std::ops::Range<usize>,
        out: &mut [f32],
    ) -> usize {
        let (d_in, lanes) = (self.d_in, S::F32_LANES);
        let (vectors, whole) = (d_in / lanes, d_in / lanes * lanes);
        let mut j = range.start;
        while j + J <= range.end {
            let weights: [&[f32]; J] = std::array::from_fn(|o| &self.w[(j + o) * d_in..][..d_in]);
            let inputs: [&[f32]; R] = std::array::from_fn(|r| &self.x[r * d_in..][..d_in]);
            let (w, x) = (
                weights.map(|run| whole_vectors::<S>(run, vectors)),
                inputs.map(|run| whole_vectors::<S>(run, vectors)),
            );
            let mut acc = [[simd.splat_f32s(0.0); J]; R];
            for i in 0..vectors {
                // The first row streams the weights from memory: ask for the outputs after
                // these ahead, a cache line of each at a time.
                if R == 1 && (i * lanes) % 16 == 0 {
                    for o in 0..J {
                        let ahead = (j + AHEAD + o) * d_in + i * lanes;
                        super::prefetch(self.w.as_ptr().wrapping_add(ahead));
                    }
                }
                let wv: [S::f32s; J] = std::array::from_fn(|o| w[o][i]);
                for r in 0..R {
                    let xv = x[r][i];
                    for o in 0..J {
                        acc[r][o] = simd.mul_add_f32s(xv, wv[o], acc[r][o]);
                    }
                }
            }
            for (r, acc) in acc.iter().enumerate() {
                for (o, &a) in acc.iter().enumerate() {
                    let sum = (whole..d_in).fold(simd.reduce_sum_f32s(a), |sum, k| {
                        inputs[r][k].mul_add(weights[o][k], sum)
                    });
                    out[(j + o) * self.rows + self.first_row + r] = sum;
                }
            }
            j += J;
        }
        j
    }
}

/// The first `vectors` whole vectors of `run`, each slice exactly that long, so that a loop
/// over them indexes every one without a check.
#[inline(always)]
fn whole_vectors<S: Simd>(run: &[f32], vectors: usize) -> &[S::f32s] {
    &S::as_simd_f32s(&run[..vectors * S::F32_LANES]).0[..vectors]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn values(n: usize, seed: usize) -> Vec<f32> {
        (0..n)
            .map(|i| ((i * 7919 + seed) % 113) as f32 / 113.0 - 0.5)
            .collect()
    }

    /// The product is the plain sum of products, for widths that fill whole register tiles
    /// and widths that leave some outputs over, at every row count a decode batch has.
    #[test]
    fn the_product_is_each_output_s_sum_and_a_row_s_bits_do_not_depend_on_the_batch() {
        let device = crate::default_device();
        for (d_in, d_out) in [(40, 200), (64, 48), (33, 7)] {
            let w = values(d_in * d_out, 1);
            // Held as the checkpoint stores it, `[d_out, d_in]`, seen as `[d_in, d_out]`.
            let by_output = crate::layout::transpose(&w, d_in, d_out);
            let weight = Tensor::<2>::from_data(TensorData::new(by_output, [d_out, d_in]), &device)
                .transpose();
            let x = values(DENSE_ROWS * d_in, 2);
            let rows_of = |r: usize, n: usize| {
                let x = x[r * d_in..(r + n) * d_in].to_vec();
                let x = Tensor::<2>::from_data(TensorData::new(x, [n, d_in]), &device);
                product(&weight, &x).map(crate::layout::to_vec)
            };
            let together = rows_of(0, DENSE_ROWS).expect("a CPU f32 weight");
            for r in 0..DENSE_ROWS {
                let row = &x[r * d_in..(r + 1) * d_in];
                for j in 0..d_out {
                    let sum: f32 = (0..d_in).map(|k| row[k] * w[k * d_out + j]).sum();
                    let got = together[r * d_out + j];
                    assert!(
                        (got - sum).abs() < 1e-4,
                        "{d_in}x{d_out} ({r}, {j}): {got} {sum}"
                    );
                }
                // The row alone, and first of three: the same bits as among sixteen.
                for rows in [1, 3].into_iter().filter(|n| r + n <= DENSE_ROWS) {
                    let alone = rows_of(r, rows).unwrap();
                    let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
                    let batched = &together[r * d_out..(r + 1) * d_out];
                    assert_eq!(bits(&alone[..d_out]), bits(batched), "row {r} of {rows}");
                }
            }
        }
    }
}
