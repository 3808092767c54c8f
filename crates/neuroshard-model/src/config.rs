//! The Hugging Face `config.json` of a Llama-family model.

use serde::{Deserialize, Serialize};

use crate::ModelError;

/// Hyper-parameters read from a Hugging Face `config.json` (Llama, Mistral, Qwen2-style keys).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LlamaConfig {
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
    #[serde(default)]
    pub num_key_value_heads: Option<usize>,
    /// Vocabulary size of the embedding and LM head.
    pub vocab_size: usize,
    /// Epsilon of every RMSNorm. Default 1e-6: the Llama 2 value.
    #[serde(default = "default_rms_eps")]
    pub rms_norm_eps: f64,
    /// Base of the rotary position embedding. Default 10 000: the RoPE paper's value.
    #[serde(default = "default_rope_theta")]
    pub rope_theta: f64,
    /// Longest sequence the model supports (bounds the RoPE table and the KV cache).
    #[serde(default = "default_max_positions")]
    pub max_position_embeddings: usize,
    /// Whether the LM head reuses the embedding matrix.
    #[serde(default)]
    pub tie_word_embeddings: bool,
    /// Beginning-of-sequence token, prepended to prompts when present.
    #[serde(default)]
    pub bos_token_id: Option<u32>,
    /// End-of-sequence token; generation stops on it.
    #[serde(default)]
    pub eos_token_id: Option<u32>,
    /// Explicit per-head width; defaults to `hidden_size / num_attention_heads`.
    #[serde(default)]
    pub head_dim: Option<usize>,
}

fn default_rms_eps() -> f64 {
    1e-6
}

fn default_rope_theta() -> f64 {
    10_000.0
}

fn default_max_positions() -> usize {
    2048
}

impl LlamaConfig {
    /// Parses and validates a `config.json` body.
    pub fn from_json(text: &str) -> Result<Self, ModelError> {
        let config: Self = serde_json::from_str(text)
            .map_err(|e| ModelError::Config(format!("config.json: {e}")))?;
        config.validate()?;
        Ok(config)
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

    /// Bytes of f32 KV cache one token takes in one layer (keys and values).
    pub fn kv_bytes_per_token_layer(&self) -> usize {
        2 * self.kv_heads() * self.head_dim() * std::mem::size_of::<f32>()
    }

    /// Floating-point operations of running `layers` on `tokens` new tokens after `start_pos`
    /// cached ones, counting a multiply-add as two: 2 × the weights of each layer per token, the
    /// attention scores and weighted sum (4 × query width per visible position), and the LM
    /// head on the last token when `layers` ends the model. Embedding lookups are free.
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
        // Positions each new token attends to, summed: start+1, start+2, ... start+tokens.
        let visible = tokens * start_pos + tokens * (tokens + 1) / 2;
        let per_layer = 2 * weights * tokens + 4 * q_width * visible;
        let mut flops = per_layer.saturating_mul(layers.len() as u64);
        if layers.end == self.num_hidden_layers {
            flops += 2 * hidden * self.vocab_size as u64;
        }
        flops
    }

    /// Checks that the numbers describe a model this crate can run, naming the bad field.
    pub fn validate(&self) -> Result<(), ModelError> {
        let bad = |field: &str, why: &str| Err(ModelError::Config(format!("{field}: {why}")));
        for (field, value) in [
            ("hidden_size", self.hidden_size),
            ("intermediate_size", self.intermediate_size),
            ("num_hidden_layers", self.num_hidden_layers),
            ("num_attention_heads", self.num_attention_heads),
            ("vocab_size", self.vocab_size),
            ("max_position_embeddings", self.max_position_embeddings),
            ("num_key_value_heads", self.kv_heads()),
        ] {
            if value == 0 {
                return bad(field, "must be positive");
            }
        }
        if !self.num_attention_heads.is_multiple_of(self.kv_heads()) {
            return bad(
                "num_key_value_heads",
                "must divide num_attention_heads (grouped-query attention)",
            );
        }
        if self.head_dim.is_none() && !self.hidden_size.is_multiple_of(self.num_attention_heads) {
            return bad("num_attention_heads", "must divide hidden_size");
        }
        if !self.head_dim().is_multiple_of(2) {
            return bad("head_dim", "must be even for rotary embeddings");
        }
        if self.rms_norm_eps.is_nan() || self.rms_norm_eps <= 0.0 {
            return bad("rms_norm_eps", "must be positive");
        }
        if self.rope_theta.is_nan() || self.rope_theta <= 0.0 {
            return bad("rope_theta", "must be positive");
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_a_hugging_face_config_and_defaults_missing_keys() {
        let text = r#"{"hidden_size":64,"intermediate_size":128,"num_hidden_layers":2,
            "num_attention_heads":4,"num_key_value_heads":2,"vocab_size":100,
            "architectures":["LlamaForCausalLM"]}"#;
        let config = LlamaConfig::from_json(text).unwrap();
        assert_eq!(config.head_dim(), 16);
        assert_eq!(config.kv_heads(), 2);
        assert_eq!(config.rope_theta, 10_000.0);
    }

    #[test]
    fn names_the_bad_field() {
        let text = r#"{"hidden_size":64,"intermediate_size":128,"num_hidden_layers":2,
            "num_attention_heads":4,"num_key_value_heads":3,"vocab_size":100}"#;
        let err = LlamaConfig::from_json(text).unwrap_err().to_string();
        assert!(err.contains("num_key_value_heads"), "{err}");
    }
}
