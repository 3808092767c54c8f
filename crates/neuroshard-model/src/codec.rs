//! The tensor codec: how hidden states and logits travel between nodes.
//!
//! A [`WireTensor`] carries a dtype, a shape and a payload. Receivers call [`WireTensor::validate`]
//! (through [`decode`]) before allocating anything: the shape times the dtype size must equal the
//! declared raw length, which must fit under [`MAX_TENSOR_BYTES`]. lz4 is applied only when it
//! actually shrinks the payload; dense activations rarely compress, so a small probe decides
//! whether compressing the whole payload is worth the time.

use bytes::Bytes;
use half::slice::HalfFloatSliceExt;
use half::{bf16, f16};

#[cfg(target_endian = "big")]
compile_error!("the tensor codec writes little-endian payloads by casting slices");

/// Largest tensor accepted or produced, in uncompressed bytes: the design's 100 MiB message cap.
pub const MAX_TENSOR_BYTES: usize = 100 * 1024 * 1024;

/// Highest rank accepted; activations are rank 3, logits rank 2.
pub const MAX_RANK: usize = 8;

/// Bytes of the prefix that is test-compressed before compressing a whole payload. 4 KiB is
/// enough to see whether the data has redundancy, and costs microseconds.
const LZ4_PROBE_BYTES: usize = 4096;

/// Values per block of [`WireDType::Int8Block`], each block with its own scale.
pub const INT8_BLOCK: usize = 32;

/// Element type of a payload on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum WireDType {
    /// IEEE 754 single precision.
    F32,
    /// IEEE 754 half precision.
    F16,
    /// bfloat16: f32's exponent range with 8 bits of mantissa.
    BF16,
    /// Blockwise int8: the values in blocks of [`INT8_BLOCK`] in their flat order, each block
    /// an f32 scale (its largest magnitude over 127) and then its values rounded to int8 in
    /// units of that scale; 1.125 bytes a value. Hidden states only: for a hop over a slow
    /// uplink, at a relative error near 0.5 % (f16's is 0.03 %). The scale is f32 so that
    /// any finite value travels, however large or small.
    Int8Block,
}

impl WireDType {
    /// Bytes per element of a fixed-width type; 1 for int8 blocks, whose scales come on top
    /// ([`Self::raw_bytes`] counts them).
    pub fn size(self) -> usize {
        match self {
            Self::F32 => 4,
            Self::F16 | Self::BF16 => 2,
            Self::Int8Block => 1,
        }
    }

    /// Bytes `elements` values take uncompressed; `None` when that overflows.
    pub fn raw_bytes(self, elements: usize) -> Option<usize> {
        match self {
            Self::Int8Block => elements
                .div_ceil(INT8_BLOCK)
                .checked_mul(4)?
                .checked_add(elements),
            other => elements.checked_mul(other.size()),
        }
    }

    /// Parses `f32`, `f16`, `bf16` or `int8` (blockwise).
    pub fn parse(name: &str) -> Result<Self, CodecError> {
        match name.to_ascii_lowercase().as_str() {
            "f32" | "fp32" | "float32" => Ok(Self::F32),
            "f16" | "fp16" | "float16" => Ok(Self::F16),
            "bf16" | "bfloat16" => Ok(Self::BF16),
            "int8" | "int8-block" | "int8_block" => Ok(Self::Int8Block),
            other => Err(CodecError::UnknownDType(other.to_string())),
        }
    }
}

/// A tensor as it travels: element type, shape and (maybe lz4-compressed) little-endian payload.
#[derive(Debug, Clone, PartialEq)]
pub struct WireTensor {
    /// Element type of the uncompressed payload.
    pub dtype: WireDType,
    /// Dimensions, outermost first.
    pub shape: Vec<usize>,
    /// The payload bytes, lz4 block-compressed when `lz4` is set.
    pub payload: Bytes,
    /// Whether `payload` is lz4-compressed.
    pub lz4: bool,
    /// Length of the uncompressed payload in bytes.
    pub raw_len: usize,
}

/// What is wrong with a tensor received from the network.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CodecError {
    /// The dtype field is missing or unknown.
    #[error("tensor dtype {0:?} is not one of f32, f16, bf16, int8 blocks")]
    UnknownDType(String),
    /// Too many dimensions.
    #[error("tensor rank {0} exceeds the maximum of {MAX_RANK}")]
    RankTooHigh(usize),
    /// The shape's element count overflows or exceeds the cap.
    #[error("tensor of shape {shape:?} is {bytes} bytes, over the {MAX_TENSOR_BYTES}-byte cap")]
    TooLarge {
        /// Declared shape.
        shape: Vec<usize>,
        /// Declared size (saturated on overflow).
        bytes: usize,
    },
    /// Shape x dtype size does not match the declared length.
    #[error(
        "tensor shape {shape:?} of {dtype:?} needs {expected} bytes but raw_len says {raw_len}"
    )]
    ShapeMismatch {
        /// Declared shape.
        shape: Vec<usize>,
        /// Declared dtype.
        dtype: WireDType,
        /// Bytes the shape implies.
        expected: usize,
        /// Declared uncompressed length.
        raw_len: usize,
    },
    /// An uncompressed payload whose length differs from the declared one.
    #[error("tensor payload is {actual} bytes but {expected} were declared")]
    PayloadLength {
        /// Declared bytes.
        expected: usize,
        /// Received bytes.
        actual: usize,
    },
    /// lz4 data that does not decompress to the declared length.
    #[error("tensor lz4 payload is corrupt: {0}")]
    Lz4(String),
    /// A value that is NaN or infinite.
    #[error("tensor holds a non-finite value at element {0}")]
    NonFinite(usize),
}

impl WireTensor {
    /// Number of elements the shape declares.
    pub fn num_elements(&self) -> usize {
        self.shape.iter().product()
    }

    /// Checks the declared shape, dtype and lengths without allocating.
    pub fn validate(&self) -> Result<(), CodecError> {
        if self.shape.len() > MAX_RANK {
            return Err(CodecError::RankTooHigh(self.shape.len()));
        }
        let bytes = self
            .shape
            .iter()
            .try_fold(1usize, |acc, &d| acc.checked_mul(d))
            .and_then(|elements| self.dtype.raw_bytes(elements));
        let too_large = || CodecError::TooLarge {
            shape: self.shape.clone(),
            bytes: bytes.unwrap_or(usize::MAX),
        };
        let expected = bytes.ok_or_else(too_large)?;
        if expected > MAX_TENSOR_BYTES {
            return Err(too_large());
        }
        if expected != self.raw_len {
            return Err(CodecError::ShapeMismatch {
                shape: self.shape.clone(),
                dtype: self.dtype,
                expected,
                raw_len: self.raw_len,
            });
        }
        if !self.lz4 && self.payload.len() != self.raw_len {
            return Err(CodecError::PayloadLength {
                expected: self.raw_len,
                actual: self.payload.len(),
            });
        }
        if self.lz4 && self.payload.len() > lz4_flex::block::get_maximum_output_size(self.raw_len) {
            return Err(CodecError::Lz4(format!(
                "{} compressed bytes cannot come from {} raw bytes",
                self.payload.len(),
                self.raw_len
            )));
        }
        Ok(())
    }
}

/// Encodes f32 values of the given shape as `dtype`, lz4-compressing only when that shrinks them.
pub fn encode(values: &[f32], shape: &[usize], dtype: WireDType) -> WireTensor {
    debug_assert_eq!(values.len(), shape.iter().product::<usize>());
    let raw = narrow_le(values, dtype);
    let raw_len = raw.len();
    let (payload, lz4) = match compress_if_smaller(&raw) {
        Some(compressed) => (compressed, true),
        None => (raw, false),
    };
    WireTensor {
        dtype,
        shape: shape.to_vec(),
        payload: Bytes::from(payload),
        lz4,
        raw_len,
    }
}

fn compress_if_smaller(raw: &[u8]) -> Option<Vec<u8>> {
    if raw.len() > LZ4_PROBE_BYTES {
        let probe = lz4_flex::block::compress(&raw[..LZ4_PROBE_BYTES]);
        if probe.len() >= LZ4_PROBE_BYTES {
            return None;
        }
    }
    let compressed = lz4_flex::block::compress(raw);
    (compressed.len() < raw.len()).then_some(compressed)
}

/// Validates and decodes a received tensor into f32 values, rejecting non-finite values.
pub fn decode(tensor: &WireTensor) -> Result<Vec<f32>, CodecError> {
    tensor.validate()?;
    let raw;
    let bytes: &[u8] = if tensor.lz4 {
        let mut buf = vec![0u8; tensor.raw_len];
        let written = lz4_flex::block::decompress_into(&tensor.payload, &mut buf)
            .map_err(|e| CodecError::Lz4(e.to_string()))?;
        if written != tensor.raw_len {
            return Err(CodecError::Lz4(format!(
                "decompressed to {written} bytes, expected {}",
                tensor.raw_len
            )));
        }
        raw = buf;
        &raw
    } else {
        &tensor.payload
    };
    let values = widen_le(bytes, tensor.dtype);
    if let Some(index) = values.iter().position(|v| !v.is_finite()) {
        return Err(CodecError::NonFinite(index));
    }
    Ok(values)
}

/// Narrows f32 values to little-endian `dtype` bytes (shared by the codec and the model writer).
pub(crate) fn narrow_le(values: &[f32], dtype: WireDType) -> Vec<u8> {
    match dtype {
        WireDType::F32 => bytemuck::cast_slice(values).to_vec(),
        WireDType::F16 => narrow_half::<f16>(values),
        WireDType::BF16 => narrow_half::<bf16>(values),
        WireDType::Int8Block => narrow_int8(values),
    }
}

/// Blockwise int8: per block of [`INT8_BLOCK`] values, an f32 scale and the rounded values.
fn narrow_int8(values: &[f32]) -> Vec<u8> {
    let mut out = Vec::with_capacity(WireDType::Int8Block.raw_bytes(values.len()).unwrap_or(0));
    for block in values.chunks(INT8_BLOCK) {
        let largest = block.iter().fold(0f32, |m, v| m.max(v.abs()));
        let scale = largest / 127.0;
        out.extend(scale.to_le_bytes());
        let inverse = if scale > 0.0 { 1.0 / scale } else { 0.0 };
        out.extend(
            block
                .iter()
                .map(|v| (v * inverse).round().clamp(-127.0, 127.0) as i8 as u8),
        );
    }
    out
}

/// Blockwise int8 bytes to f32 (a last block may be short).
fn widen_int8(bytes: &[u8]) -> Vec<f32> {
    let mut out = Vec::with_capacity(bytes.len());
    for block in bytes.chunks(INT8_BLOCK + 4) {
        let Some((scale, values)) = block.split_first_chunk::<4>() else {
            break;
        };
        let scale = f32::from_le_bytes(*scale);
        out.extend(values.iter().map(|&q| f32::from(q as i8) * scale));
    }
    out
}

fn narrow_half<H: bytemuck::Pod>(values: &[f32]) -> Vec<u8>
where
    [H]: HalfFloatSliceExt,
{
    let mut half = vec![H::zeroed(); values.len()];
    half.convert_from_f32_slice(values);
    bytemuck::cast_slice(&half).to_vec()
}

/// Widens little-endian `dtype` bytes to f32 (shared by the codec and the weight loader).
pub(crate) fn widen_le(bytes: &[u8], dtype: WireDType) -> Vec<f32> {
    match dtype {
        WireDType::F32 => match bytemuck::try_cast_slice::<u8, f32>(bytes) {
            Ok(values) => values.to_vec(),
            Err(_) => bytes
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect(),
        },
        WireDType::F16 => widen_half(bytes, f16::from_le_bytes),
        WireDType::BF16 => widen_half(bytes, bf16::from_le_bytes),
        WireDType::Int8Block => widen_int8(bytes),
    }
}

/// Half-precision bytes to f32: in place when the buffer is aligned (it almost always is),
/// through a copy otherwise.
fn widen_half<H: bytemuck::Pod>(bytes: &[u8], from_le: fn([u8; 2]) -> H) -> Vec<f32>
where
    [H]: HalfFloatSliceExt,
{
    let mut out = vec![0f32; bytes.len() / 2];
    match bytemuck::try_cast_slice::<u8, H>(bytes) {
        Ok(halves) => halves.convert_to_f32_slice(&mut out),
        Err(_) => {
            let halves: Vec<H> = bytes
                .chunks_exact(2)
                .map(|c| from_le([c[0], c[1]]))
                .collect();
            halves.convert_to_f32_slice(&mut out);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_every_dtype_within_its_precision() {
        let values: Vec<f32> = (0..600).map(|i| (i as f32 * 0.37).sin() * 3.0).collect();
        for (dtype, tol) in [
            (WireDType::F32, 0.0),
            (WireDType::F16, 3e-3),
            (WireDType::BF16, 2e-2),
            // Half of a block's step: 3 / 127 / 2.
            (WireDType::Int8Block, 1.2e-2),
        ] {
            let wire = encode(&values, &[2, 300], dtype);
            let back = decode(&wire).unwrap();
            let worst = values
                .iter()
                .zip(&back)
                .map(|(a, b)| (a - b).abs())
                .fold(0f32, f32::max);
            assert!(worst <= tol, "{dtype:?}: error {worst}");
        }
    }

    /// Relative L2 error of `back` against `values`.
    fn relative_l2(values: &[f32], back: &[f32]) -> f64 {
        let (mut err, mut norm) = (0f64, 0f64);
        for (a, b) in values.iter().zip(back) {
            err += f64::from(a - b).powi(2);
            norm += f64::from(*a).powi(2);
        }
        (err / norm).sqrt()
    }

    #[test]
    fn int8_blocks_are_an_eighth_over_a_byte_a_value_within_one_percent_of_f16() {
        use rand::SeedableRng;
        use rand_distr::Distribution;
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(1);
        // Hidden-state-like rows: Gaussian, with two outlier features twenty times the rest, as
        // a trained model's residual stream has a few.
        let normal = rand_distr::Normal::new(0.0f32, 1.0).unwrap();
        let mut values: Vec<f32> = (0..4 * 576).map(|_| normal.sample(&mut rng)).collect();
        for row in values.chunks_mut(576) {
            row[7] *= 20.0;
            row[300] *= 20.0;
        }
        let shape = [1, 4, 576];
        let int8 = encode(&values, &shape, WireDType::Int8Block);
        assert_eq!(int8.raw_len, 4 * 576 + 4 * (4 * 576 / INT8_BLOCK));
        let f16 = decode(&encode(&values, &shape, WireDType::F16)).unwrap();
        let back = decode(&int8).unwrap();
        let (e8, e16) = (relative_l2(&values, &back), relative_l2(&values, &f16));
        assert!(relative_l2(&f16, &back) <= 1e-2, "{e8} vs f16's {e16}");
        assert!(e16 < e8, "f16 is the finer of the two");
        // Values far past f16's range, and far below it, travel.
        let wide = [3e9, -1e9, 2e-9, 1.0];
        let back = decode(&encode(&wide, &[4], WireDType::Int8Block)).unwrap();
        assert!((back[0] - 3e9).abs() < 3e9 / 200.0, "{back:?}");
        let tiny = [2e-9, -1e-9];
        let back = decode(&encode(&tiny, &[2], WireDType::Int8Block)).unwrap();
        assert!(
            (back[0] - 2e-9).abs() < 2e-11 && (back[1] + 1e-9).abs() < 2e-11,
            "{back:?}"
        );
        // A short last block, zeros and the extremes round-trip.
        let odd = [0.0, -3.5, 127.0, 1e-3, -127.0];
        let back = decode(&encode(&odd, &[5], WireDType::Int8Block)).unwrap();
        assert_eq!(back.len(), 5);
        assert!(
            odd.iter().zip(&back).all(|(a, b)| (a - b).abs() <= 0.51),
            "{back:?}"
        );
        assert_eq!(
            decode(&encode(&[0.0; 40], &[40], WireDType::Int8Block)).unwrap(),
            [0.0; 40]
        );
        // A payload cut short of its shape is refused before decoding.
        let mut cut = encode(&values, &shape, WireDType::Int8Block);
        cut.raw_len -= 1;
        assert!(matches!(
            decode(&cut),
            Err(CodecError::ShapeMismatch { .. })
        ));
        // A non-finite scale is refused.
        let mut raw = int8.payload.to_vec();
        if int8.lz4 {
            raw = lz4_flex::block::decompress(&raw, int8.raw_len).unwrap();
        }
        raw[..4].copy_from_slice(&f32::INFINITY.to_le_bytes());
        let bad = WireTensor {
            payload: Bytes::from(raw),
            lz4: false,
            ..int8
        };
        assert!(matches!(decode(&bad), Err(CodecError::NonFinite(_))));
    }

    #[test]
    fn compresses_only_when_it_shrinks() {
        let zeros = vec![0f32; 8192];
        assert!(encode(&zeros, &[8192], WireDType::F32).lz4);
        let noisy: Vec<f32> = (0..8192u32)
            .map(|i| f32::from_bits(0x3f00_0000 | (i.wrapping_mul(2_654_435_761) >> 9)))
            .collect();
        let wire = encode(&noisy, &[8192], WireDType::F32);
        assert!(!wire.lz4);
        assert_eq!(decode(&wire).unwrap(), noisy);
        let wire = encode(&zeros, &[8192], WireDType::F16);
        assert_eq!(decode(&wire).unwrap(), zeros);
    }

    #[test]
    fn rejects_bad_tensors_before_allocating() {
        let good = encode(&[1.0, 2.0], &[2], WireDType::F32);
        let mut t = good.clone();
        t.shape = vec![3];
        assert!(matches!(decode(&t), Err(CodecError::ShapeMismatch { .. })));
        let mut t = good.clone();
        t.shape = vec![usize::MAX, 4];
        assert!(matches!(decode(&t), Err(CodecError::TooLarge { .. })));
        let mut t = good.clone();
        t.shape = vec![64 * 1024 * 1024];
        t.raw_len = 256 * 1024 * 1024;
        assert!(matches!(decode(&t), Err(CodecError::TooLarge { .. })));
        let mut t = good.clone();
        t.payload = Bytes::from_static(&[0, 0, 0]);
        assert!(matches!(decode(&t), Err(CodecError::PayloadLength { .. })));
        let mut t = good.clone();
        t.lz4 = true;
        t.payload = Bytes::from_static(&[0xff, 0xff, 0xff]);
        assert!(matches!(decode(&t), Err(CodecError::Lz4(_))));
        let t = encode(&[f32::NAN], &[1], WireDType::F32);
        assert_eq!(decode(&t), Err(CodecError::NonFinite(0)));
    }
}
