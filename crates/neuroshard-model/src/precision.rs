//! Holding and computing with a shard's projection weights at a lighter [`Precision`]:
//! embeddings, norms and biases stay f32, and so do activations, the KV cache and every sum, so
//! only the weights' own rounding differs.
//!
//! On the CPU a projection's held weights are multiplied as they are read ([`Packed`]); on
//! another backend they are held as burn's bf16, f16 or quantized tensors and widened for each
//! product.

use burn::nn::Linear;
use burn::tensor::quantization::{QuantScheme, QuantStore, QuantValue, ScaleDtype};
use burn::tensor::{DType, FloatDType, Tensor};
use neuroshard_base::precision::int8_block;

pub use neuroshard_base::precision::{INT8_BLOCK, Precision};

mod dense;
mod packed;
pub(crate) use packed::{Packed, bf16_to_f32, f16_to_f32};

/// A projection's `[in, out]` weight as `precision` holds it.
pub(crate) fn hold(precision: Precision, weight: Tensor<2>) -> Tensor<2> {
    match precision {
        Precision::F32 => weight,
        Precision::Bf16 => weight.cast(FloatDType::BF16),
        Precision::F16 => weight.cast(FloatDType::F16),
        Precision::Int8 => {
            let [d_in, _] = weight.dims();
            weight.quantize_dynamic(&int8_scheme(d_in))
        }
    }
}

/// Symmetric int8 with an f32 scale per block of consecutive inputs of one output: burn holds a
/// projection as `[in, out]`, so a block is `[block, 1]`.
fn int8_scheme(d_in: usize) -> QuantScheme {
    QuantScheme::default()
        .with_value(QuantValue::Q8S)
        .with_store(QuantStore::Native)
        .per_block([int8_block(d_in) as u8, 1], ScaleDtype::F32)
}

/// `linear` applied to `x`, with held half-precision weights widened to f32 for the product
/// (int8 weights are dequantized by burn's quantized matmul).
pub(crate) fn project<const D: usize>(linear: &Linear, x: Tensor<D>) -> Tensor<D> {
    let weight = linear.weight.val();
    let bias = linear.bias.as_ref().map(|b| b.val());
    match weight.dtype() {
        DType::BF16 | DType::F16 => {
            burn::tensor::module::linear(x, weight.cast(FloatDType::F32), bias)
        }
        _ if crate::is_cpu(&weight.device()) => cpu_product(weight, x, bias),
        _ => linear.forward(x),
    }
}

/// `x` times an f32 `weight` plus `bias` on the CPU: a few rows by [`dense::product`], more
/// as one product of rows by the weight as held (burn's `linear` would first copy a
/// transposed view whole).
fn cpu_product<const D: usize>(
    weight: Tensor<2>,
    x: Tensor<D>,
    bias: Option<Tensor<1>>,
) -> Tensor<D> {
    let out = match dense::product(&weight, &x) {
        Some(out) => out,
        None => {
            let mut dims = x.dims();
            let rows = dims[..D - 1].iter().product::<usize>();
            let [d_in, d_out] = weight.dims();
            dims[D - 1] = d_out;
            x.reshape([rows, d_in]).matmul(weight).reshape(dims)
        }
    };
    match bias {
        Some(b) => out + b.unsqueeze(),
        None => out,
    }
}

/// Asks memory for the cache line at `at` ahead of its reading, where the hardware would not
/// see a stream coming. A hint only: any address, even past an allocation, is harmless.
#[inline(always)]
pub(crate) fn prefetch<T>(at: *const T) {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::x86_64::{_MM_HINT_T0, _mm_prefetch};
        // SAFETY: SSE is part of x86-64, and a prefetch reads nothing into the program and
        // cannot fault, whatever the address.
        unsafe { _mm_prefetch::<_MM_HINT_T0>(at.cast()) };
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = at;
}

/// Asks memory for all of `run`, a cache line at a time: runs a few KB long, too short for the
/// hardware to see a stream coming (an output's weights, a cache head's positions).
#[inline(always)]
pub(crate) fn prefetch_run<T>(run: &[T]) {
    let at = run.as_ptr().cast::<u8>();
    for line in (0..std::mem::size_of_val(run)).step_by(64) {
        prefetch(at.wrapping_add(line));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::tensor::{Device, TensorData};

    /// Each precision's product stays within its rounding of the f32 one, for widths that are
    /// and are not multiples of the block.
    #[test]
    fn held_projections_compute_within_their_rounding() {
        let device = Device::default();
        for (d_in, d_out) in [(64, 48), (40, 24)] {
            let w: Vec<f32> = (0..d_in * d_out)
                .map(|i| ((i * 7919) % 113) as f32 / 113.0 - 0.5)
                .collect();
            let x: Vec<f32> = (0..3 * d_in)
                .map(|i| ((i * 31) % 17) as f32 / 8.0 - 1.0)
                .collect();
            let weight = Tensor::<2>::from_data(TensorData::new(w, [d_in, d_out]), &device);
            let x = Tensor::<2>::from_data(TensorData::new(x, [3, d_in]), &device);
            let exact = x
                .clone()
                .matmul(weight.clone())
                .into_data()
                .try_to_vec::<f32>()
                .unwrap();
            let norm = exact.iter().map(|v| v * v).sum::<f32>().sqrt();
            for (p, bound) in [
                (Precision::F32, 0.0),
                (Precision::Bf16, 8e-3),
                (Precision::F16, 1e-3),
                (Precision::Int8, 1e-2),
            ] {
                let linear = Linear {
                    weight: burn::module::Param::from_tensor(hold(p, weight.clone())),
                    bias: None,
                };
                let got = project(&linear, x.clone())
                    .into_data()
                    .try_to_vec::<f32>()
                    .unwrap();
                let err = got
                    .iter()
                    .zip(&exact)
                    .map(|(a, b)| (a - b).powi(2))
                    .sum::<f32>();
                let rel = err.sqrt() / norm;
                assert!(rel <= bound, "{p} {d_in}x{d_out}: relative error {rel}");
                if p != Precision::F32 {
                    assert!(rel > 0.0, "{p} rounds");
                }
            }
        }
    }
}
