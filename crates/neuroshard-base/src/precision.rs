//! How a shard holds its projection weights in memory: f32 (the default), bf16 or f16 (half
//! the bytes), or int8 with an f32 scale per block of 32 inputs of each output (a little over a
//! quarter). Settings, flags, announcements and the memory estimate share these names and sizes;
//! the model crate holds and computes the weights.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// Inputs of one output channel that share an int8 scale (fewer where the input width is not a
/// multiple of it: the largest power of two dividing it).
pub const INT8_BLOCK: usize = 32;

/// How a shard holds its projection weights.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    /// Four bytes a weight, exactly the checkpoint's values.
    #[default]
    F32,
    /// bfloat16: two bytes a weight; a bf16 checkpoint's values exactly.
    Bf16,
    /// IEEE half: two bytes a weight; an f16 checkpoint's values exactly.
    F16,
    /// Weight-only int8, symmetric, an f32 scale per [`INT8_BLOCK`] inputs of each output.
    Int8,
}

impl Precision {
    /// Every precision, f32 first.
    pub const ALL: [Precision; 4] = [Self::F32, Self::Bf16, Self::F16, Self::Int8];

    /// The name settings, flags and announcements use.
    pub fn name(self) -> &'static str {
        match self {
            Self::F32 => "f32",
            Self::Bf16 => "bf16",
            Self::F16 => "f16",
            Self::Int8 => "int8",
        }
    }

    /// Bytes `count` projection weights of `d_in` inputs each take held this way.
    pub fn projection_bytes(self, count: u64, d_in: usize) -> u64 {
        match self {
            Self::F32 => count * 4,
            Self::Bf16 | Self::F16 => count * 2,
            Self::Int8 => count + count / int8_block(d_in) as u64 * 4,
        }
    }
}

impl fmt::Display for Precision {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Precision {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::ALL
            .into_iter()
            .find(|p| p.name() == s)
            .ok_or_else(|| format!("unknown weight precision {s:?}: use f32, bf16, f16 or int8"))
    }
}

/// The int8 block for projections of `d_in` inputs: [`INT8_BLOCK`], or the largest power of
/// two dividing `d_in` when 32 does not.
pub fn int8_block(d_in: usize) -> usize {
    INT8_BLOCK.min(1 << d_in.trailing_zeros().min(5))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_parse_back_and_an_unknown_one_is_named() {
        for p in Precision::ALL {
            assert_eq!(p.name().parse::<Precision>().unwrap(), p);
            let json = serde_json::to_string(&p).unwrap();
            assert_eq!(json, format!("\"{}\"", p.name()));
        }
        let err = "int4".parse::<Precision>().unwrap_err();
        assert!(err.contains("int4") && err.contains("int8"), "{err}");
    }

    #[test]
    fn int8_blocks_divide_the_input_width() {
        assert_eq!(int8_block(576), 32);
        assert_eq!(int8_block(1536), 32);
        assert_eq!(int8_block(40), 8);
        assert_eq!(int8_block(7), 1);
        assert_eq!(
            Precision::Int8.projection_bytes(64 * 32, 64),
            64 * 32 + 64 * 4
        );
        assert_eq!(Precision::Bf16.projection_bytes(10, 5), 20);
    }
}
