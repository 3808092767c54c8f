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

/// Element type of a payload on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum WireDType {
    /// IEEE 754 single precision.
    F32,
    /// IEEE 754 half precision.
    F16,
    /// bfloat16: f32's exponent range with 8 bits of mantissa.
    BF16,
}

impl WireDType {
    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            Self::F32 => 4,
            Self::F16 | Self::BF16 => 2,
        }
    }

    /// Parses `f32`, `f16` or `bf16`.
    pub fn parse(name: &str) -> Result<Self, CodecError> {
        match name.to_ascii_lowercase().as_str() {
            "f32" | "fp32" | "float32" => Ok(Self::F32),
            "f16" | "fp16" | "float16" => Ok(Self::F16),
            "bf16" | "bfloat16" => Ok(Self::BF16),
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
    #[error("tensor dtype {0:?} is not one of f32, f16, bf16")]
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
            .try_fold(self.dtype.size(), |acc, &d| acc.checked_mul(d));
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
    }
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
