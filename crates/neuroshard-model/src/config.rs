//! The Hugging Face `config.json` of a Llama-family decoder, in either layout transformers
//! writes: the older top-level `rope_theta` / `rope_scaling`, or transformers 5's
//! `rope_parameters`.
//!
//! Every field that changes the model's math is read or refused by name; a checkpoint this crate
//! does not understand never loads and runs wrong. Fields that do not change the math (dtype,
//! `use_cache`, `initializer_range`, ...) are left alone.

use serde_json::{Map, Value, json};

use crate::ModelError;

mod rope;

pub use rope::{RopeConfig, RopeScaling};

/// The decoder families this crate runs, chosen from `architectures` (or `model_type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    /// `LlamaForCausalLM`: Llama 2, 3, 3.1, 3.2, TinyLlama, SmolLM2.
    Llama,
    /// `MistralForCausalLM`: Llama layers with an optional sliding window.
    Mistral,
    /// `Qwen2ForCausalLM`: Qwen2 and 2.5, with biases on the q/k/v projections.
    Qwen2,
    /// `Qwen3ForCausalLM`: an RMSNorm on each head's queries and keys before RoPE.
    Qwen3,
}

impl Family {
    const ALL: [(Family, &'static str, &'static str); 4] = [
        (Family::Llama, "LlamaForCausalLM", "llama"),
        (Family::Mistral, "MistralForCausalLM", "mistral"),
        (Family::Qwen2, "Qwen2ForCausalLM", "qwen2"),
        (Family::Qwen3, "Qwen3ForCausalLM", "qwen3"),
    ];

    /// The `architectures` entry transformers writes for this family.
    pub fn architecture(self) -> &'static str {
        Self::ALL
            .iter()
            .find(|f| f.0 == self)
            .map(|f| f.1)
            .unwrap_or("")
    }

    /// The `model_type` transformers writes for this family.
    pub fn model_type(self) -> &'static str {
        Self::ALL
            .iter()
            .find(|f| f.0 == self)
            .map(|f| f.2)
            .unwrap_or("")
    }

    fn from_config(raw: &Map<String, Value>) -> Result<Self, ModelError> {
        if let Some(list) = raw.get("architectures").filter(|v| !v.is_null()) {
            let names: Vec<&str> = list
                .as_array()
                .map(|a| a.iter().filter_map(Value::as_str).collect())
                .unwrap_or_default();
            let [name] = names[..] else {
                return Err(bad("architectures", "must list exactly one architecture"));
            };
            return Self::ALL
                .iter()
                .find(|f| f.1 == name)
                .map(|f| f.0)
                .ok_or_else(|| unsupported("architectures", name));
        }
        match raw.get("model_type").and_then(Value::as_str) {
            Some(kind) => Self::ALL
                .iter()
                .find(|f| f.2 == kind)
                .map(|f| f.0)
                .ok_or_else(|| unsupported("model_type", kind)),
            None => Err(bad(
                "architectures",
                "missing (and no model_type): the model family is unknown",
            )),
        }
    }
}

/// Hyper-parameters of a Llama-family decoder, read from a Hugging Face `config.json`.
#[derive(Debug, Clone, PartialEq)]
pub struct LlamaConfig {
    /// Which decoder family the layers follow.
    pub family: Family,
    /// Width of the residual stream.
    pub hidden_size: usize,
    /// Width of the SwiGLU feed-forward layer.
    pub intermediate_size: usize,
    /// Number of decoder layers.
    pub num_hidden_layers: usize,
    /// Number of query heads.
    pub num_attention_heads: usize,
    /// Number of key/value heads; fewer than query heads means grouped-query attention.
    /// Absent in older configs, where it equals `num_attention_heads`.
    pub num_key_value_heads: Option<usize>,
    /// Vocabulary size of the embedding and LM head.
    pub vocab_size: usize,
    /// Epsilon of every RMSNorm. Default 1e-6: the value transformers' Llama config defaults to.
    pub rms_norm_eps: f64,
    /// Rotary position embedding: base and scaling.
    pub rope: RopeConfig,
    /// Longest sequence the model supports (bounds the KV cache; dynamic RoPE extends it).
    pub max_position_embeddings: usize,
    /// Whether the LM head reuses the embedding matrix.
    pub tie_word_embeddings: bool,
    /// Beginning-of-sequence token.
    pub bos_token_id: Option<u32>,
    /// End-of-sequence tokens; generation stops on any of them.
    pub eos_token_ids: Vec<u32>,
    /// Explicit per-head width; defaults to `hidden_size / num_attention_heads`.
    pub head_dim: Option<usize>,
    /// Biases on the query, key and value projections (Qwen2; `attention_bias` elsewhere).
    pub qkv_bias: bool,
    /// Bias on the output projection (`attention_bias` in Llama and Qwen3).
    pub o_bias: bool,
    /// Biases on the feed-forward projections (`mlp_bias` in Llama).
    pub mlp_bias: bool,
    /// RMSNorm on each head's queries and keys (Qwen3).
    pub qk_norm: bool,
    /// Sliding-window attention: the window, and which layers use it (the others see every
    /// earlier position).
    pub sliding_window: Option<SlidingWindow>,
}

/// Which layers attend only to the last `size` positions.
#[derive(Debug, Clone, PartialEq)]
pub struct SlidingWindow {
    /// Positions a query sees, itself included.
    pub size: usize,
    /// Per layer, whether it uses the window.
    pub layers: Vec<bool>,
}

/// A config error naming the field.
fn bad(field: &str, why: &str) -> ModelError {
    ModelError::Config(format!("config.json: {field}: {why}"))
}

/// A value the code does not implement, named with the field.
fn unsupported(field: &str, value: impl std::fmt::Display) -> ModelError {
    ModelError::Config(format!(
        "config.json: {field} \"{value}\" is not supported (this build runs \
         LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM and Qwen3ForCausalLM)"
    ))
}

/// Typed access to the raw JSON object, naming the field in every error.
struct Fields<'a>(&'a Map<String, Value>);

impl Fields<'_> {
    fn get(&self, field: &str) -> Option<&Value> {
        self.0.get(field).filter(|v| !v.is_null())
    }

    fn usize(&self, field: &str) -> Result<Option<usize>, ModelError> {
        self.get(field)
            .map(|v| {
                v.as_u64()
                    .and_then(|n| usize::try_from(n).ok())
                    .ok_or_else(|| bad(field, &format!("{v} is not a whole number")))
            })
            .transpose()
    }

    fn required(&self, field: &str) -> Result<usize, ModelError> {
        self.usize(field)?.ok_or_else(|| bad(field, "missing"))
    }

    fn f64(&self, field: &str) -> Result<Option<f64>, ModelError> {
        self.get(field)
            .map(|v| {
                v.as_f64()
                    .ok_or_else(|| bad(field, &format!("{v} is not a number")))
            })
            .transpose()
    }

    fn bool(&self, field: &str) -> Result<Option<bool>, ModelError> {
        self.get(field)
            .map(|v| {
                v.as_bool()
                    .ok_or_else(|| bad(field, &format!("{v} is not true or false")))
            })
            .transpose()
    }

    fn token(&self, field: &str) -> Result<Option<u32>, ModelError> {
        self.usize(field)?
            .map(|n| u32::try_from(n).map_err(|_| bad(field, "is not a token id")))
            .transpose()
    }
}

/// Token ids given as one number or a list of numbers (`eos_token_id`).
pub(crate) fn token_list(value: Option<&Value>, field: &str) -> Result<Vec<u32>, ModelError> {
    let one = |v: &Value| {
        v.as_u64()
            .and_then(|n| u32::try_from(n).ok())
            .ok_or_else(|| bad(field, &format!("{v} is not a token id")))
    };
    match value {
        None | Some(Value::Null) => Ok(Vec::new()),
        Some(Value::Array(items)) => items.iter().map(one).collect(),
        Some(v) => Ok(vec![one(v)?]),
    }
}

impl LlamaConfig {
    /// Parses and validates a `config.json` body.
    pub fn from_json(text: &str) -> Result<Self, ModelError> {
        let raw: Map<String, Value> = serde_json::from_str(text)
            .map_err(|e| ModelError::Config(format!("config.json: {e}")))?;
        let config = Self::from_fields(&raw)?;
        config.validate()?;
        Ok(config)
    }

    fn from_fields(raw: &Map<String, Value>) -> Result<Self, ModelError> {
        let f = Fields(raw);
        let family = Family::from_config(raw)?;
        refuse_unimplemented(&f)?;
        let layers = f.required("num_hidden_layers")?;
        let attention_bias = f.bool("attention_bias")?.unwrap_or(false);
        let head_dim = match (f.usize("head_dim")?, family) {
            // Qwen3's config class defaults head_dim to 128 rather than deriving it.
            (None, Family::Qwen3) => Some(128),
            (dim, _) => dim,
        };
        let max_positions = f.usize("max_position_embeddings")?.unwrap_or(2048);
        Ok(Self {
            family,
            hidden_size: f.required("hidden_size")?,
            intermediate_size: f.required("intermediate_size")?,
            num_hidden_layers: layers,
            num_attention_heads: f.required("num_attention_heads")?,
            num_key_value_heads: f.usize("num_key_value_heads")?,
            vocab_size: f.required("vocab_size")?,
            rms_norm_eps: f.f64("rms_norm_eps")?.unwrap_or(1e-6),
            rope: RopeConfig::from_fields(raw, max_positions)?,
            max_position_embeddings: max_positions,
            tie_word_embeddings: f.bool("tie_word_embeddings")?.unwrap_or(false),
            bos_token_id: f.token("bos_token_id")?,
            eos_token_ids: token_list(f.get("eos_token_id"), "eos_token_id")?,
            head_dim,
            qkv_bias: match family {
                Family::Qwen2 => true,
                Family::Mistral => false,
                Family::Llama | Family::Qwen3 => attention_bias,
            },
            o_bias: matches!(family, Family::Llama | Family::Qwen3) && attention_bias,
            mlp_bias: family == Family::Llama && f.bool("mlp_bias")?.unwrap_or(false),
            qk_norm: family == Family::Qwen3,
            sliding_window: sliding_window(&f, family, layers)?,
        })
    }

    /// The config as transformers 5 writes it (`rope_parameters`, `architectures`), for the
    /// models this crate generates.
    pub fn to_json(&self) -> Value {
        let mut out = json!({
            "architectures": [self.family.architecture()],
            "model_type": self.family.model_type(),
            "hidden_act": "silu",
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.kv_heads(),
            "head_dim": self.head_dim,
            "vocab_size": self.vocab_size,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_parameters": self.rope.to_json(),
            "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": self.tie_word_embeddings,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": match self.eos_token_ids[..] {
                [one] => json!(one),
                ref many => json!(many),
            },
        });
        if matches!(self.family, Family::Llama | Family::Qwen3) {
            out["attention_bias"] = json!(self.o_bias);
        }
        if self.family == Family::Llama {
            out["mlp_bias"] = json!(self.mlp_bias);
        }
        if let Some(window) = &self.sliding_window {
            out["sliding_window"] = json!(window.size);
            if self.family != Family::Mistral {
                out["use_sliding_window"] = json!(true);
                let types: Vec<&str> = window
                    .layers
                    .iter()
                    .map(|&s| {
                        if s {
                            "sliding_attention"
                        } else {
                            "full_attention"
                        }
                    })
                    .collect();
                out["layer_types"] = json!(types);
            }
        }
        out
    }

    /// Number of key/value heads.
    pub fn kv_heads(&self) -> usize {
        self.num_key_value_heads.unwrap_or(self.num_attention_heads)
    }

    /// Width of one attention head.
    pub fn head_dim(&self) -> usize {
        self.head_dim
            .unwrap_or(self.hidden_size / self.num_attention_heads.max(1))
    }

    /// The window `layer` attends within, if it uses one.
    pub fn window(&self, layer: usize) -> Option<usize> {
        let window = self.sliding_window.as_ref()?;
        window
            .layers
            .get(layer)
            .copied()
            .unwrap_or(false)
            .then_some(window.size)
    }

    /// Positions a session may reach: `max_position_embeddings`, stretched by dynamic RoPE's
    /// factor (its point is running past the trained length).
    pub fn max_positions(&self) -> usize {
        match self.rope.scaling {
            RopeScaling::Dynamic { factor } if factor > 1.0 => {
                (self.max_position_embeddings as f64 * factor) as usize
            }
            _ => self.max_position_embeddings,
        }
    }

    /// Bytes of KV cache one token takes in one layer (keys and values), each value held in
    /// `value_bytes` (4 for f32, 2 for bf16).
    pub fn kv_bytes_per_token_layer(&self, value_bytes: usize) -> usize {
        2 * self.kv_heads() * self.head_dim() * value_bytes
    }

    /// Floating-point operations of running `layers` on `tokens` new tokens after `start_pos`
    /// (saturating: a call's positions come from the network)
    /// cached ones, counting a multiply-add as two: 2 × the weights of each layer per token, one
    /// per bias value and four per value a head norm scales, the attention scores and weighted
    /// sum (4 × query width per visible position), and the LM head on the last token when
    /// `layers` ends the model. Embedding lookups and the layer norms are free.
    pub fn forward_flops(
        &self,
        layers: std::ops::Range<usize>,
        start_pos: u64,
        tokens: u64,
    ) -> u64 {
        let hidden = self.hidden_size as u64;
        let q_width = (self.num_attention_heads * self.head_dim()) as u64;
        let kv_width = (self.kv_heads() * self.head_dim()) as u64;
        let weights = hidden * q_width * 2
            + hidden * kv_width * 2
            + 3 * hidden * self.intermediate_size as u64;
        let per_token = {
            let biases = u64::from(self.qkv_bias) * (q_width + 2 * kv_width)
                + u64::from(self.o_bias) * hidden
                + u64::from(self.mlp_bias) * (2 * self.intermediate_size as u64 + hidden);
            let head_norms = u64::from(self.qk_norm) * 4 * (q_width + kv_width);
            2 * weights + biases + head_norms
        };
        let mut flops = 0u64;
        for layer in layers.clone() {
            // Positions each new token attends to, summed over the new tokens.
            let visible: u64 = match self.window(layer) {
                None => tokens
                    .saturating_mul(start_pos)
                    .saturating_add(tokens.saturating_mul(tokens.saturating_add(1)) / 2),
                Some(w) => (start_pos..start_pos.saturating_add(tokens))
                    .map(|p| p.saturating_add(1).min(w as u64))
                    .sum(),
            };
            flops = flops
                .saturating_add(per_token.saturating_mul(tokens))
                .saturating_add((4 * q_width).saturating_mul(visible));
        }
        if layers.end == self.num_hidden_layers {
            flops = flops.saturating_add(2 * hidden * self.vocab_size as u64);
        }
        flops
    }

    /// Checks that the numbers describe a model this crate can run, naming the bad field.
    pub fn validate(&self) -> Result<(), ModelError> {
        let fail = |field: &str, why: &str| Err(bad(field, why));
        let query_width = self.num_attention_heads.saturating_mul(self.head_dim());
        for (field, value, max) in [
            ("hidden_size", self.hidden_size, MAX_WIDTH),
            ("intermediate_size", self.intermediate_size, MAX_WIDTH),
            ("num_hidden_layers", self.num_hidden_layers, MAX_LAYERS),
            ("num_attention_heads", self.num_attention_heads, MAX_WIDTH),
            ("vocab_size", self.vocab_size, MAX_VOCAB),
            (
                "max_position_embeddings",
                self.max_position_embeddings,
                MAX_POSITIONS,
            ),
            ("num_key_value_heads", self.kv_heads(), MAX_WIDTH),
            ("num_attention_heads × head_dim", query_width, MAX_WIDTH),
        ] {
            if value == 0 {
                return fail(field, "must be positive");
            }
            if value > max {
                return fail(field, &format!("is {value}; at most {max} is read"));
            }
        }
        if !self.num_attention_heads.is_multiple_of(self.kv_heads()) {
            return fail(
                "num_key_value_heads",
                "must divide num_attention_heads (grouped-query attention)",
            );
        }
        if self.head_dim.is_none() && !self.hidden_size.is_multiple_of(self.num_attention_heads) {
            return fail("num_attention_heads", "must divide hidden_size");
        }
        if self.head_dim() < 2 || !self.head_dim().is_multiple_of(2) {
            return fail("head_dim", "must be even for rotary embeddings");
        }
        if self.rms_norm_eps.is_nan() || self.rms_norm_eps <= 0.0 {
            return fail("rms_norm_eps", "must be positive");
        }
        if let Some(id) = self
            .eos_token_ids
            .iter()
            .find(|&&id| id as usize >= self.vocab_size)
        {
            return fail(
                "eos_token_id",
                &format!("{id} is outside the vocabulary of {}", self.vocab_size),
            );
        }
        if let Some(w) = &self.sliding_window
            && (w.size == 0 || w.layers.len() != self.num_hidden_layers)
        {
            return fail(
                "sliding_window",
                "must be positive, with one entry per layer",
            );
        }
        self.rope.validate()
    }
}

/// Largest width read (hidden and intermediate sizes, heads, a query's width): 2^20, over ten
/// times any model published, so FLOPs and tensor sizes stay far from overflowing.
const MAX_WIDTH: usize = 1 << 20;

/// Most decoder layers read.
const MAX_LAYERS: usize = 1 << 16;

/// Largest vocabulary read: 2^24, far over the 256k of today's largest.
const MAX_VOCAB: usize = 1 << 24;

/// Largest context read: 2^26 positions.
const MAX_POSITIONS: usize = 1 << 26;

/// Fields whose presence changes the math in a way this crate does not implement.
fn refuse_unimplemented(f: &Fields<'_>) -> Result<(), ModelError> {
    if let Some(act) = f.get("hidden_act")
        && act.as_str() != Some("silu")
    {
        return Err(bad(
            "hidden_act",
            &format!("{act} is not supported (only silu)"),
        ));
    }
    if f.get("quantization_config").is_some() {
        return Err(bad(
            "quantization_config",
            "quantized checkpoints are not supported (f32, f16 and bf16 weights only)",
        ));
    }
    let partial = f.f64("partial_rotary_factor")?;
    if partial.is_some_and(|p| p != 1.0) {
        return Err(bad("partial_rotary_factor", "only 1.0 is supported"));
    }
    Ok(())
}

/// The sliding window, as each family's config class decides it.
fn sliding_window(
    f: &Fields<'_>,
    family: Family,
    layers: usize,
) -> Result<Option<SlidingWindow>, ModelError> {
    let Some(size) = f.usize("sliding_window")? else {
        return Ok(None);
    };
    let per_layer = match family {
        // Mistral applies its window to every layer.
        Family::Mistral => vec![true; layers],
        Family::Qwen2 | Family::Qwen3 => {
            if !f.bool("use_sliding_window")?.unwrap_or(false) {
                return Ok(None);
            }
            match f.get("layer_types") {
                Some(types) => layer_types(types, layers)?,
                None => {
                    let from = f.usize("max_window_layers")?.unwrap_or(28);
                    (0..layers).map(|i| i >= from).collect()
                }
            }
        }
        // Llama's attention has no window; a stray field is refused rather than ignored.
        Family::Llama => {
            return Err(bad(
                "sliding_window",
                "Llama attention has no sliding window",
            ));
        }
    };
    Ok(per_layer.contains(&true).then_some(SlidingWindow {
        size,
        layers: per_layer,
    }))
}

fn layer_types(types: &Value, layers: usize) -> Result<Vec<bool>, ModelError> {
    let list = types
        .as_array()
        .filter(|a| a.len() == layers)
        .ok_or_else(|| bad("layer_types", "must list one type per layer"))?;
    list.iter()
        .map(|t| match t.as_str() {
            Some("full_attention") => Ok(false),
            Some("sliding_attention") => Ok(true),
            _ => Err(unsupported("layer_types", t)),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(extra: &str) -> Result<LlamaConfig, ModelError> {
        LlamaConfig::from_json(&format!(
            r#"{{"hidden_size":64,"intermediate_size":128,"num_hidden_layers":2,
            "num_attention_heads":4,"num_key_value_heads":2,"vocab_size":100{extra}}}"#
        ))
    }

    #[test]
    fn parses_a_hugging_face_config_and_defaults_missing_keys() {
        let config = config(r#","architectures":["LlamaForCausalLM"]"#).unwrap();
        assert_eq!(config.family, Family::Llama);
        assert_eq!(config.head_dim(), 16);
        assert_eq!(config.kv_heads(), 2);
        assert_eq!(config.rope.theta, 10_000.0);
        assert!(config.eos_token_ids.is_empty());
    }

    #[test]
    fn names_the_bad_field() {
        let err = config(r#","model_type":"llama","num_key_value_heads":3"#)
            .unwrap_err()
            .to_string();
        assert!(err.contains("num_key_value_heads"), "{err}");
    }

    #[test]
    fn reads_both_rope_layouts_and_eos_lists() {
        let new = config(
            r#","model_type":"llama","rope_parameters":{"rope_theta":500000.0,"rope_type":"default"},
            "eos_token_id":[5,7]"#,
        )
        .unwrap();
        assert_eq!(new.rope.theta, 500_000.0);
        assert_eq!(new.eos_token_ids, vec![5, 7]);
        let old =
            config(r#","model_type":"llama","rope_theta":1000000.0,"eos_token_id":3"#).unwrap();
        assert_eq!(old.rope.theta, 1e6);
        assert_eq!(old.eos_token_ids, vec![3]);
        let scaled = config(
            r#","model_type":"llama","rope_theta":500000.0,"rope_scaling":{"type":"llama3",
            "factor":8.0,"low_freq_factor":1.0,"high_freq_factor":4.0,
            "original_max_position_embeddings":8192}"#,
        )
        .unwrap();
        assert_eq!(scaled.rope.theta, 500_000.0);
        assert!(matches!(scaled.rope.scaling, RopeScaling::Llama3 { .. }));
    }

    #[test]
    fn chooses_the_family_and_its_extra_tensors() {
        let qwen2 = config(r#","architectures":["Qwen2ForCausalLM"]"#).unwrap();
        assert!(qwen2.qkv_bias && !qwen2.o_bias && !qwen2.qk_norm);
        let qwen3 = config(r#","architectures":["Qwen3ForCausalLM"],"head_dim":32"#).unwrap();
        assert!(qwen3.qk_norm && !qwen3.qkv_bias);
        assert_eq!(qwen3.head_dim(), 32);
        let mistral =
            config(r#","architectures":["MistralForCausalLM"],"sliding_window":8"#).unwrap();
        assert_eq!(mistral.window(1), Some(8));
        let mistral = config(r#","architectures":["MistralForCausalLM"],"sliding_window":null"#);
        assert_eq!(mistral.unwrap().window(0), None);
        let qwen = config(
            r#","model_type":"qwen2","sliding_window":8,"use_sliding_window":true,
            "max_window_layers":1"#,
        )
        .unwrap();
        assert_eq!((qwen.window(0), qwen.window(1)), (None, Some(8)));
    }

    #[test]
    fn flops_count_a_familys_biases_and_head_norms() {
        let llama = config(r#","architectures":["LlamaForCausalLM"]"#).unwrap();
        let qwen2 = config(r#","architectures":["Qwen2ForCausalLM"]"#).unwrap();
        let qwen3 = config(r#","architectures":["Qwen3ForCausalLM"],"head_dim":16"#).unwrap();
        let flops = |c: &LlamaConfig| c.forward_flops(0..1, 0, 3);
        // q/k/v biases: 64 + 2 × 32 values per token; head norms: 4 per value of q and k.
        assert_eq!(flops(&qwen2) - flops(&llama), 3 * (64 + 2 * 32));
        assert_eq!(flops(&qwen3) - flops(&llama), 3 * 4 * (64 + 32));
        // Positions from the network saturate rather than overflow.
        assert_eq!(llama.forward_flops(0..2, u64::MAX, 4096), u64::MAX);
    }

    #[test]
    fn refuses_what_it_does_not_implement_by_name() {
        for (extra, named) in [
            (r#","architectures":["GPT2LMHeadModel"]"#, "GPT2LMHeadModel"),
            ("", "architectures"),
            (r#","model_type":"gemma""#, "gemma"),
            (
                r#","model_type":"llama","rope_parameters":{"rope_type":"longrope","factor":2.0}"#,
                "longrope",
            ),
            (r#","model_type":"llama","hidden_act":"gelu""#, "hidden_act"),
            (
                r#","model_type":"llama","partial_rotary_factor":0.5"#,
                "partial_rotary_factor",
            ),
            (
                r#","model_type":"llama","quantization_config":{}"#,
                "quantization_config",
            ),
            (
                r#","model_type":"llama","eos_token_id":[1,"x"]"#,
                "eos_token_id",
            ),
            (
                r#","model_type":"llama","sliding_window":16"#,
                "sliding_window",
            ),
            (
                r#","model_type":"llama","head_dim":2097152"#,
                "num_attention_heads × head_dim",
            ),
            (
                r#","model_type":"llama","max_position_embeddings":1000000000000"#,
                "max_position_embeddings",
            ),
            (
                r#","model_type":"llama","rope_parameters":{"rope_type":"linear"}"#,
                "factor",
            ),
        ] {
            let err = config(extra).unwrap_err().to_string();
            assert!(err.contains(named), "{extra}: {err}");
        }
    }

    #[test]
    fn written_configs_read_back_the_same() {
        let config = config(
            r#","architectures":["Qwen2ForCausalLM"],"eos_token_id":[5,7],"sliding_window":8,
            "use_sliding_window":true,"max_window_layers":1,
            "rope_scaling":{"rope_type":"yarn","factor":4.0,"original_max_position_embeddings":64}"#,
        )
        .unwrap();
        let again = LlamaConfig::from_json(&config.to_json().to_string()).unwrap();
        assert_eq!(again, config);
    }
}
