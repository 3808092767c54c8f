//! Rotary position embedding parameters and their inverse frequencies, as transformers computes
//! them (`modeling_rope_utils.py`): the same formulas, in f32 where transformers uses f32, so
//! the angles agree to the last bits.

use serde_json::{Map, Value, json};

use super::bad;
use crate::ModelError;

/// The RoPE base and scaling of a model.
#[derive(Debug, Clone, PartialEq)]
pub struct RopeConfig {
    /// The base wavelength. Default 10 000: the RoPE paper's value, transformers' default.
    pub theta: f64,
    /// How the frequencies are stretched for longer contexts.
    pub scaling: RopeScaling,
}

/// The RoPE types current Llama-family checkpoints use.
#[derive(Debug, Clone, PartialEq)]
pub enum RopeScaling {
    /// Plain RoPE.
    Default,
    /// Positions divided by `factor` (Kaiokendev's linear interpolation).
    Linear {
        /// The stretch.
        factor: f64,
    },
    /// Dynamic NTK: past `max_position_embeddings`, the base grows with the sequence length.
    Dynamic {
        /// The stretch at twice the trained length.
        factor: f64,
    },
    /// Llama 3.1's wavelength-dependent interpolation.
    Llama3 {
        /// The stretch of low frequencies.
        factor: f64,
        /// Wavelengths past `original / low_freq_factor` are fully stretched.
        low_freq_factor: f64,
        /// Wavelengths under `original / high_freq_factor` are kept.
        high_freq_factor: f64,
        /// The pre-training context length.
        original_max_position_embeddings: usize,
    },
    /// YaRN: interpolation blended with extrapolation by dimension, and a temperature.
    Yarn {
        /// The stretch.
        factor: f64,
        /// The pre-training context length.
        original_max_position_embeddings: usize,
        /// Rotations above which dimensions extrapolate. Default 32 (the paper's).
        beta_fast: f64,
        /// Rotations below which dimensions interpolate. Default 1 (the paper's).
        beta_slow: f64,
        /// Scale of cos and sin (from `attention_factor`, or derived from the factor and
        /// `mscale` / `mscale_all_dim` as transformers does).
        attention_factor: f64,
        /// Whether the correction range is rounded outward. Default true.
        truncate: bool,
    },
}

/// Keys every RoPE type may carry.
const COMMON_KEYS: [&str; 4] = ["rope_type", "type", "rope_theta", "partial_rotary_factor"];

/// Keys each RoPE type reads besides the common ones; any other key in `rope_parameters` is
/// refused by name. `None` for a type this build does not implement.
fn type_keys(rope_type: &str) -> Option<&'static [&'static str]> {
    Some(match rope_type {
        "default" => &[],
        "linear" | "dynamic" => &["factor"],
        "llama3" => &[
            "factor",
            "low_freq_factor",
            "high_freq_factor",
            "original_max_position_embeddings",
        ],
        "yarn" => &[
            "factor",
            "original_max_position_embeddings",
            "beta_fast",
            "beta_slow",
            "attention_factor",
            "mscale",
            "mscale_all_dim",
            "truncate",
        ],
        _ => return None,
    })
}

impl RopeConfig {
    /// Reads `rope_parameters` (transformers 5) or `rope_scaling` with a top-level `rope_theta`
    /// (older files), with transformers' precedence: `rope_scaling` over `rope_parameters`, the
    /// dict's own `rope_theta` over the top-level one.
    pub(crate) fn from_fields(
        raw: &Map<String, Value>,
        max_positions: usize,
    ) -> Result<Self, ModelError> {
        let (field, params) = match (raw.get("rope_scaling"), raw.get("rope_parameters")) {
            (Some(v @ Value::Object(_)), _) => ("rope_scaling", v),
            (_, Some(v @ Value::Object(_))) => ("rope_parameters", v),
            (Some(v), _) | (_, Some(v)) if !v.is_null() => {
                return Err(bad("rope_parameters", &format!("{v} is not an object")));
            }
            _ => ("rope_parameters", &Value::Null),
        };
        let empty = Map::new();
        let p = Params {
            field,
            params: params.as_object().unwrap_or(&empty),
            raw,
            max_positions,
        };
        let top_theta = match raw.get("rope_theta").filter(|v| !v.is_null()) {
            None => None,
            Some(v) => Some(
                v.as_f64()
                    .ok_or_else(|| bad("rope_theta", &format!("{v} is not a number")))?,
            ),
        };
        let theta = p.number("rope_theta")?.or(top_theta).unwrap_or(10_000.0);
        let rope_type = p.rope_type()?;
        if p.number("partial_rotary_factor")?.is_some_and(|f| f != 1.0) {
            return Err(bad(
                &p.name("partial_rotary_factor"),
                "only 1.0 is supported",
            ));
        }
        let scaling = match rope_type {
            "default" => RopeScaling::Default,
            "linear" => RopeScaling::Linear {
                factor: p.required("factor")?,
            },
            "dynamic" => RopeScaling::Dynamic {
                factor: p.required("factor")?,
            },
            "llama3" => RopeScaling::Llama3 {
                factor: p.required("factor")?,
                low_freq_factor: p.required("low_freq_factor")?,
                high_freq_factor: p.required("high_freq_factor")?,
                original_max_position_embeddings: p.original()?,
            },
            _ => p.yarn()?,
        };
        Ok(Self { theta, scaling })
    }

    /// `rope_parameters` as transformers 5 writes it.
    pub(crate) fn to_json(&self) -> Value {
        let mut out = json!({"rope_theta": self.theta});
        let extra = match &self.scaling {
            RopeScaling::Default => json!({"rope_type": "default"}),
            RopeScaling::Linear { factor } => json!({"rope_type": "linear", "factor": factor}),
            RopeScaling::Dynamic { factor } => json!({"rope_type": "dynamic", "factor": factor}),
            RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_position_embeddings,
            } => json!({"rope_type": "llama3", "factor": factor,
                "low_freq_factor": low_freq_factor, "high_freq_factor": high_freq_factor,
                "original_max_position_embeddings": original_max_position_embeddings}),
            RopeScaling::Yarn {
                factor,
                original_max_position_embeddings,
                beta_fast,
                beta_slow,
                attention_factor,
                truncate,
            } => json!({"rope_type": "yarn", "factor": factor,
                "original_max_position_embeddings": original_max_position_embeddings,
                "beta_fast": beta_fast, "beta_slow": beta_slow,
                "attention_factor": attention_factor, "truncate": truncate}),
        };
        if let (Some(out), Some(extra)) = (out.as_object_mut(), extra.as_object()) {
            out.extend(extra.clone());
        }
        out
    }

    /// Checks the numbers, naming the bad one.
    pub(crate) fn validate(&self) -> Result<(), ModelError> {
        let positive = |field: &str, v: f64| {
            if v.is_finite() && v > 0.0 {
                Ok(())
            } else {
                Err(bad(field, "must be a positive number"))
            }
        };
        positive("rope_theta", self.theta)?;
        match &self.scaling {
            RopeScaling::Default => Ok(()),
            RopeScaling::Linear { factor } | RopeScaling::Dynamic { factor } => {
                positive("rope_parameters.factor", *factor)
            }
            RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_position_embeddings,
            } => {
                positive("rope_parameters.factor", *factor)?;
                positive("rope_parameters.low_freq_factor", *low_freq_factor)?;
                positive(
                    "rope_parameters.original_max_position_embeddings",
                    *original_max_position_embeddings as f64,
                )?;
                if high_freq_factor <= low_freq_factor {
                    return Err(bad(
                        "rope_parameters.high_freq_factor",
                        "must be greater than low_freq_factor",
                    ));
                }
                Ok(())
            }
            RopeScaling::Yarn {
                factor,
                original_max_position_embeddings,
                attention_factor,
                ..
            } => {
                positive("rope_parameters.factor", *factor)?;
                positive("rope_parameters.attention_factor", *attention_factor)?;
                positive(
                    "rope_parameters.original_max_position_embeddings",
                    *original_max_position_embeddings as f64,
                )
            }
        }
    }

    /// The inverse frequencies of a head of width `dim` and the scale of cos and sin, for a call
    /// whose last position is `seq_len - 1` (only dynamic RoPE depends on it, as transformers
    /// recomputes it per call once the sequence outgrows `max_positions`).
    pub fn inv_freq(&self, dim: usize, seq_len: usize, max_positions: usize) -> (Vec<f32>, f32) {
        let base = match self.scaling {
            RopeScaling::Dynamic { factor } if seq_len > max_positions => {
                // In f32: transformers computes this from the position tensor.
                let ratio =
                    (factor as f32 * seq_len as f32) / max_positions as f32 - (factor - 1.0) as f32;
                let exponent = (dim as f64 / (dim as f64 - 2.0)) as f32;
                f64::from(self.theta as f32 * ratio.powf(exponent))
            }
            _ => self.theta,
        };
        let plain = plain_inv_freq(base, dim);
        match &self.scaling {
            RopeScaling::Default | RopeScaling::Dynamic { .. } => (plain, 1.0),
            RopeScaling::Linear { factor } => {
                (plain.iter().map(|f| f / *factor as f32).collect(), 1.0)
            }
            RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_position_embeddings,
            } => (
                llama3(
                    &plain,
                    *factor as f32,
                    *low_freq_factor,
                    *high_freq_factor,
                    *original_max_position_embeddings,
                ),
                1.0,
            ),
            RopeScaling::Yarn {
                factor,
                original_max_position_embeddings,
                beta_fast,
                beta_slow,
                attention_factor,
                truncate,
            } => {
                let (low, high) = yarn_correction_range(
                    *beta_fast,
                    *beta_slow,
                    dim,
                    base,
                    *original_max_position_embeddings,
                    *truncate,
                );
                let inv = yarn_inv_freq(base, dim, *factor as f32, low, high);
                (inv, *attention_factor as f32)
            }
        }
    }
}

/// The RoPE dict of a config being read, and the fields around it that it may defer to.
struct Params<'a> {
    /// `rope_scaling` or `rope_parameters`, for naming a bad field.
    field: &'static str,
    params: &'a Map<String, Value>,
    /// The whole config.
    raw: &'a Map<String, Value>,
    max_positions: usize,
}

impl Params<'_> {
    /// The dotted name of `key`, for errors.
    fn name(&self, key: &str) -> String {
        format!("{}.{key}", self.field)
    }

    /// A number the dict may hold.
    fn number(&self, key: &str) -> Result<Option<f64>, ModelError> {
        match self.params.get(key).filter(|v| !v.is_null()) {
            None => Ok(None),
            Some(v) => v
                .as_f64()
                .map(Some)
                .ok_or_else(|| bad(&self.name(key), &format!("{v} is not a number"))),
        }
    }

    /// A number the dict must hold.
    fn required(&self, key: &str) -> Result<f64, ModelError> {
        self.number(key)?
            .ok_or_else(|| bad(&self.name(key), "missing"))
    }

    /// The RoPE type, once every key of the dict is known to belong to it.
    fn rope_type(&self) -> Result<&str, ModelError> {
        let rope_type = self
            .params
            .get("rope_type")
            .or_else(|| self.params.get("type"))
            .and_then(Value::as_str)
            .unwrap_or("default");
        let keys = type_keys(rope_type).ok_or_else(|| {
            bad(
                &self.name("rope_type"),
                &format!(
                    "\"{rope_type}\" is not supported (default, linear, dynamic, llama3 and yarn are)"
                ),
            )
        })?;
        let known = |k: &str| COMMON_KEYS.contains(&k) || keys.contains(&k);
        if let Some(key) = self.params.keys().find(|k| !known(k)) {
            return Err(bad(
                &self.name(key),
                &format!("is not a parameter of {rope_type} RoPE this build implements"),
            ));
        }
        Ok(rope_type)
    }

    /// The context length the model was trained at; transformers lets a top-level
    /// `original_max_position_embeddings` win (Phi-3's layout).
    fn original(&self) -> Result<usize, ModelError> {
        let top = self
            .raw
            .get("original_max_position_embeddings")
            .and_then(Value::as_u64);
        let inner = self
            .number("original_max_position_embeddings")?
            .map(|v| v as u64);
        Ok(top.or(inner).unwrap_or(self.max_positions as u64) as usize)
    }

    /// YaRN's parameters, with transformers' defaults.
    fn yarn(&self) -> Result<RopeScaling, ModelError> {
        let original = self.original()?;
        let factor = match self.number("factor")? {
            Some(f) => f,
            None => self.max_positions as f64 / original as f64,
        };
        let attention_factor = match self.number("attention_factor")? {
            Some(a) => a,
            None => match (self.number("mscale")?, self.number("mscale_all_dim")?) {
                (Some(m), Some(all)) if m != 0.0 && all != 0.0 => {
                    yarn_mscale(factor, m) / yarn_mscale(factor, all)
                }
                _ => yarn_mscale(factor, 1.0),
            },
        };
        let truncate = match self.params.get("truncate") {
            None | Some(Value::Null) => true,
            Some(v) => v
                .as_bool()
                .ok_or_else(|| bad(&self.name("truncate"), "is not true or false"))?,
        };
        Ok(RopeScaling::Yarn {
            factor,
            original_max_position_embeddings: original,
            // transformers: `get("beta_fast") or 32`, so 0 also means the default.
            beta_fast: self
                .number("beta_fast")?
                .filter(|&b| b != 0.0)
                .unwrap_or(32.0),
            beta_slow: self
                .number("beta_slow")?
                .filter(|&b| b != 0.0)
                .unwrap_or(1.0),
            attention_factor,
            truncate,
        })
    }
}

/// YaRN's inverse frequencies: interpolated below the correction range `low..high`,
/// extrapolated above it, blended linearly within.
fn yarn_inv_freq(base: f64, dim: usize, factor: f32, low: f64, high: f64) -> Vec<f32> {
    pos_freqs(base, dim)
        .into_iter()
        .enumerate()
        .map(|(i, pos_freq)| {
            let extrapolated = 1.0 / pos_freq;
            let interpolated = 1.0 / (factor * pos_freq);
            let span = if low == high {
                high + 0.001 - low
            } else {
                high - low
            };
            let ramp = ((i as f32 - low as f32) / span as f32).clamp(0.0, 1.0);
            let keep = 1.0 - ramp;
            interpolated * (1.0 - keep) + extrapolated * keep
        })
        .collect()
}

/// `base^(2i / dim)` in f32, as transformers computes it from an f32 `arange`.
fn pos_freqs(base: f64, dim: usize) -> Vec<f32> {
    let base = base as f32;
    (0..dim / 2)
        .map(|i| base.powf((2 * i) as f32 / dim as f32))
        .collect()
}

/// `1 / base^(2i / dim)` in f32.
fn plain_inv_freq(base: f64, dim: usize) -> Vec<f32> {
    pos_freqs(base, dim).into_iter().map(|p| 1.0 / p).collect()
}

/// Llama 3.1's rescaling of `inv_freq` by wavelength.
fn llama3(inv_freq: &[f32], factor: f32, low: f64, high: f64, original: usize) -> Vec<f32> {
    let low_wavelen = (original as f64 / low) as f32;
    let high_wavelen = (original as f64 / high) as f32;
    inv_freq
        .iter()
        .map(|&f| {
            let wavelen = 2.0 * std::f32::consts::PI / f;
            let scaled = if wavelen > low_wavelen { f / factor } else { f };
            if wavelen < high_wavelen || wavelen > low_wavelen {
                return scaled;
            }
            let smooth = (original as f32 / wavelen - low as f32) / (high - low) as f32;
            (1.0 - smooth) * scaled / factor + smooth * scaled
        })
        .collect()
}

/// YaRN's `mscale`: `0.1 · mscale · ln(scale) + 1`, 1 when not stretched.
fn yarn_mscale(scale: f64, mscale: f64) -> f64 {
    if scale <= 1.0 {
        1.0
    } else {
        0.1 * mscale * scale.ln() + 1.0
    }
}

/// The dimensions between which YaRN blends interpolation into extrapolation.
fn yarn_correction_range(
    beta_fast: f64,
    beta_slow: f64,
    dim: usize,
    base: f64,
    original: usize,
    truncate: bool,
) -> (f64, f64) {
    let correction = |rotations: f64| {
        dim as f64 * (original as f64 / (rotations * 2.0 * std::f64::consts::PI)).ln()
            / (2.0 * base.ln())
    };
    let (mut low, mut high) = (correction(beta_fast), correction(beta_slow));
    if truncate {
        low = low.floor();
        high = high.ceil();
    }
    (low.max(0.0), high.min(dim as f64 - 1.0))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rope(params: Value) -> Result<RopeConfig, ModelError> {
        let raw = json!({"rope_parameters": params});
        RopeConfig::from_fields(raw.as_object().unwrap(), 256)
    }

    #[test]
    fn scalings_stretch_low_frequencies_and_keep_high_ones() {
        let plain = rope(json!({"rope_type": "default"}))
            .unwrap()
            .inv_freq(64, 1, 256)
            .0;
        let linear = rope(json!({"rope_type": "linear", "factor": 4.0})).unwrap();
        let linear = linear.inv_freq(64, 1, 256).0;
        assert_eq!(linear[5], plain[5] / 4.0);
        let llama3 = rope(
            json!({"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 64}),
        )
        .unwrap()
        .inv_freq(64, 1, 256)
        .0;
        assert_eq!(llama3[0], plain[0], "short wavelengths are kept");
        assert_eq!(
            llama3[31],
            plain[31] / 8.0,
            "long wavelengths are stretched"
        );
        let yarn = rope(json!({"rope_type": "yarn", "factor": 4.0,
            "original_max_position_embeddings": 64}))
        .unwrap();
        let (inv, scale) = yarn.inv_freq(64, 1, 256);
        assert_eq!(inv[0], plain[0]);
        assert!((inv[31] - plain[31] / 4.0).abs() < 1e-12);
        assert!((scale - (0.1 * 4f32.ln() + 1.0)).abs() < 1e-6);
    }

    #[test]
    fn dynamic_rope_changes_only_past_the_trained_length() {
        let dynamic = rope(json!({"rope_type": "dynamic", "factor": 2.0})).unwrap();
        let plain = plain_inv_freq(10_000.0, 64);
        assert_eq!(dynamic.inv_freq(64, 256, 256).0, plain);
        assert!(dynamic.inv_freq(64, 300, 256).0[10] < plain[10]);
    }

    #[test]
    fn unknown_types_and_keys_are_named() {
        let err = rope(json!({"rope_type": "su", "factor": 2.0})).unwrap_err();
        assert!(err.to_string().contains("\"su\""), "{err}");
        let err = rope(json!({"rope_type": "linear", "factor": 2.0, "finetuned": true}));
        let err = err.unwrap_err().to_string();
        assert!(err.contains("rope_parameters.finetuned"), "{err}");
    }
}
