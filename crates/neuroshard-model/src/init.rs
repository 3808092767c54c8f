//! Writes a small deterministic Llama model in the Hugging Face layout, so the demo and the
//! tests need no download and always go through the real loading path.

use std::collections::HashMap;
use std::path::Path;

use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, Normal};
use safetensors::tensor::{Dtype, TensorView};

use crate::codec::{WireDType, narrow_le};
use crate::tokenizer::{BYTE_BOS, BYTE_EOS, BYTE_VOCAB};
use crate::{LlamaConfig, ModelError};

/// Sizes and storage of a generated model.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelSpec {
    /// Width of the residual stream.
    pub hidden: usize,
    /// Width of the SwiGLU layer.
    pub intermediate: usize,
    /// Decoder layers.
    pub layers: usize,
    /// Query heads.
    pub heads: usize,
    /// Key/value heads (fewer than `heads`: grouped-query attention).
    pub kv_heads: usize,
    /// Longest sequence.
    pub max_positions: usize,
    /// Whether the LM head reuses the embeddings.
    pub tie_embeddings: bool,
    /// Storage dtype of the weights.
    pub dtype: WireDType,
    /// Number of `*.safetensors` files the tensors are spread over.
    pub files: usize,
    /// Seed of the weights.
    pub seed: u64,
}

impl ModelSpec {
    /// The demo model: 6 layers of width 512 (about 19 M parameters), big enough that a token's
    /// compute (a few ms on a CPU) dwarfs a loopback hop, small enough to build in a second.
    pub fn demo() -> Self {
        Self {
            hidden: 512,
            intermediate: 1408,
            layers: 6,
            heads: 8,
            kv_heads: 4,
            max_positions: 2048,
            tie_embeddings: false,
            dtype: WireDType::BF16,
            files: 2,
            seed: 7,
        }
    }

    /// A model whose per-token compute is well over 20 ms on a 2-core CPU, for the swarm
    /// throughput benchmark.
    pub fn bench() -> Self {
        Self {
            hidden: 1536,
            intermediate: 4096,
            layers: 6,
            heads: 12,
            kv_heads: 4,
            ..Self::demo()
        }
    }

    /// A model small enough for unit tests.
    pub fn tiny() -> Self {
        Self {
            hidden: 64,
            intermediate: 160,
            layers: 4,
            heads: 4,
            kv_heads: 2,
            max_positions: 256,
            tie_embeddings: true,
            dtype: WireDType::F32,
            files: 1,
            seed: 1,
        }
    }

    /// The `config.json` this spec describes.
    pub fn config(&self) -> LlamaConfig {
        LlamaConfig {
            hidden_size: self.hidden,
            intermediate_size: self.intermediate,
            num_hidden_layers: self.layers,
            num_attention_heads: self.heads,
            num_key_value_heads: Some(self.kv_heads),
            vocab_size: BYTE_VOCAB,
            rms_norm_eps: 1e-5,
            rope_theta: 10_000.0,
            max_position_embeddings: self.max_positions,
            tie_word_embeddings: self.tie_embeddings,
            bos_token_id: Some(BYTE_BOS),
            eos_token_id: Some(BYTE_EOS),
            head_dim: None,
        }
    }

    /// Every tensor's name, shape and standard deviation (0 for a norm, which is all ones).
    fn tensors(&self) -> Vec<(String, Vec<usize>, f32)> {
        let c = self.config();
        let (h, i, v) = (c.hidden_size, c.intermediate_size, c.vocab_size);
        let (q, kv) = (
            c.num_attention_heads * c.head_dim(),
            c.kv_heads() * c.head_dim(),
        );
        let fan_in = |n: usize| 1.0 / (n as f32).sqrt();
        // Residual branches are scaled down so the stream's norm grows slowly with depth.
        let residual = fan_in(2 * self.layers);
        let mut out = vec![("model.embed_tokens.weight".to_string(), vec![v, h], 1.0)];
        for l in 0..self.layers {
            let p = format!("model.layers.{l}");
            out.extend([
                (format!("{p}.input_layernorm.weight"), vec![h], 0.0),
                (
                    format!("{p}.self_attn.q_proj.weight"),
                    vec![q, h],
                    fan_in(h),
                ),
                (
                    format!("{p}.self_attn.k_proj.weight"),
                    vec![kv, h],
                    fan_in(h),
                ),
                (
                    format!("{p}.self_attn.v_proj.weight"),
                    vec![kv, h],
                    fan_in(h),
                ),
                (
                    format!("{p}.self_attn.o_proj.weight"),
                    vec![h, q],
                    fan_in(q) * residual,
                ),
                (format!("{p}.post_attention_layernorm.weight"), vec![h], 0.0),
                (format!("{p}.mlp.gate_proj.weight"), vec![i, h], fan_in(h)),
                (format!("{p}.mlp.up_proj.weight"), vec![i, h], fan_in(h)),
                (
                    format!("{p}.mlp.down_proj.weight"),
                    vec![h, i],
                    fan_in(i) * residual,
                ),
            ]);
        }
        out.push(("model.norm.weight".to_string(), vec![h], 0.0));
        if !self.tie_embeddings {
            out.push(("lm_head.weight".to_string(), vec![v, h], 2.0 * fan_in(h)));
        }
        out
    }
}

/// Writes `config.json` and the weights of `spec` into `dir` (created if missing).
pub fn write_model(dir: &Path, spec: &ModelSpec) -> Result<(), ModelError> {
    std::fs::create_dir_all(dir).map_err(|e| ModelError::io(dir, e))?;
    let config = serde_json::to_string_pretty(&spec.config()).expect("config serialises");
    let config_path = dir.join("config.json");
    std::fs::write(&config_path, config).map_err(|e| ModelError::io(&config_path, e))?;
    let tensors: Vec<(String, Vec<usize>, Vec<u8>)> = spec
        .tensors()
        .into_iter()
        .enumerate()
        .map(|(index, (name, shape, std))| {
            let values = sample(spec.seed, index as u64, shape.iter().product(), std);
            (name, shape, narrow_le(&values, spec.dtype))
        })
        .collect();
    let files = spec.files.clamp(1, tensors.len());
    let per_file = tensors.len().div_ceil(files);
    let dtype = match spec.dtype {
        WireDType::F32 => Dtype::F32,
        WireDType::F16 => Dtype::F16,
        WireDType::BF16 => Dtype::BF16,
    };
    for (n, chunk) in tensors.chunks(per_file).enumerate() {
        let views = chunk
            .iter()
            .map(|(name, shape, bytes)| {
                let view = TensorView::new(dtype, shape.clone(), bytes)
                    .map_err(|e| ModelError::Weights(format!("{name}: {e}")))?;
                Ok((name.clone(), view))
            })
            .collect::<Result<Vec<_>, ModelError>>()?;
        let path = dir.join(format!("model-{:05}-of-{:05}.safetensors", n + 1, files));
        let metadata = HashMap::from([
            ("format".to_string(), "pt".to_string()),
            ("neuroshard_seed".to_string(), spec.seed.to_string()),
        ]);
        safetensors::serialize_to_file(views, Some(metadata), &path)
            .map_err(|e| ModelError::Weights(format!("{}: {e}", path.display())))?;
    }
    Ok(())
}

/// Deterministic N(0, std) values for tensor `index`; all ones when `std` is 0 (a norm).
fn sample(seed: u64, index: u64, len: usize, std: f32) -> Vec<f32> {
    if std == 0.0 {
        return vec![1.0; len];
    }
    let mut rng = ChaCha8Rng::seed_from_u64(seed.wrapping_mul(1_000_003).wrapping_add(index));
    let normal = Normal::new(0.0, std).expect("positive std");
    (0..len).map(|_| normal.sample(&mut rng)).collect()
}
