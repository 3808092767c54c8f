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
use crate::{Family, LlamaConfig, ModelError, RopeConfig, RopeScaling};

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
    /// Vocabulary size: the byte-level tokenizer's 259, or more (rows no byte reaches, which
    /// give a model a real vocabulary's logits and LM head).
    pub vocab: usize,
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
    /// The model `neuroshard train` makes the shipped demo model from: 6 layers of width 256
    /// (about 4.6 M parameters, 9.1 MB in bf16), byte-level, untied.
    pub fn trained_demo() -> Self {
        Self {
            hidden: 256,
            intermediate: 704,
            layers: 6,
            heads: 8,
            kv_heads: 4,
            max_positions: 1024,
            vocab: BYTE_VOCAB,
            tie_embeddings: false,
            dtype: WireDType::BF16,
            files: 1,
            seed: 1,
        }
    }

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
            vocab: BYTE_VOCAB,
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

    /// A model of SmolLM2-135M's shape (30 layers of width 576, 9 query and 3 key/value
    /// heads, a vocabulary of 49,152, tied embeddings, bf16) with random weights: what the
    /// throughput benchmarks run on, the size a real small checkpoint computes at.
    pub fn smol() -> Self {
        Self {
            hidden: 576,
            intermediate: 1536,
            layers: 30,
            heads: 9,
            kv_heads: 3,
            max_positions: 8192,
            vocab: 49_152,
            tie_embeddings: true,
            dtype: WireDType::BF16,
            files: 1,
            seed: 135,
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
            vocab: BYTE_VOCAB,
            tie_embeddings: true,
            dtype: WireDType::F32,
            files: 1,
            seed: 1,
        }
    }

    /// The `config.json` this spec describes.
    pub fn config(&self) -> LlamaConfig {
        LlamaConfig {
            family: Family::Llama,
            hidden_size: self.hidden,
            intermediate_size: self.intermediate,
            num_hidden_layers: self.layers,
            num_attention_heads: self.heads,
            num_key_value_heads: Some(self.kv_heads),
            vocab_size: self.vocab,
            rms_norm_eps: 1e-5,
            rope: RopeConfig {
                theta: 10_000.0,
                scaling: RopeScaling::Default,
            },
            max_position_embeddings: self.max_positions,
            tie_word_embeddings: self.tie_embeddings,
            bos_token_id: Some(BYTE_BOS),
            eos_token_ids: vec![BYTE_EOS],
            head_dim: None,
            qkv_bias: false,
            o_bias: false,
            mlp_bias: false,
            qk_norm: false,
            sliding_window: None,
        }
    }

    /// Every tensor's name, shape and standard deviation (0 for a norm, which is all ones).
    fn tensors(&self) -> Vec<(String, Vec<usize>, f32)> {
        let fan_in = |n: usize| 1.0 / (n as f32).sqrt();
        // Residual branches are scaled down so the stream's norm grows slowly with depth.
        let residual = fan_in(2 * self.layers);
        layout(&self.config())
            .into_iter()
            .map(|t| {
                let std = match t.kind {
                    Kind::Norm => 0.0,
                    Kind::Bias => 0.02,
                    Kind::Embedding => 1.0,
                    Kind::Linear if t.name == "lm_head.weight" => 2.0 * fan_in(t.shape[1]),
                    Kind::Linear if t.name.ends_with("o_proj.weight") => {
                        fan_in(t.shape[1]) * residual
                    }
                    Kind::Linear if t.name.ends_with("down_proj.weight") => {
                        fan_in(t.shape[1]) * residual
                    }
                    Kind::Linear => fan_in(t.shape[1]),
                };
                (t.name, t.shape, std)
            })
            .collect()
    }
}

use crate::layout::{Kind, layout, shard_tensors};
pub use crate::layout::{shard_parameter_count, shard_weight_bytes};

/// Writes a model trained from `config` into `dir`: its `config.json` (with the LM head untied,
/// as training keeps the embeddings and the head apart) and `parameters` (every shard's flat
/// parameters, concatenated in layer order) as one safetensors file in `dtype`. Byte-level
/// models need no tokenizer file.
pub fn write_trained(
    dir: &Path,
    config: &LlamaConfig,
    parameters: &[f32],
    dtype: WireDType,
    metadata: HashMap<String, String>,
) -> Result<(), ModelError> {
    let config = LlamaConfig {
        tie_word_embeddings: false,
        ..config.clone()
    };
    let tensors = shard_tensors(&config, 0..config.num_hidden_layers, parameters)?
        .into_iter()
        .map(|(name, shape, values)| (name, shape, narrow_le(&values, dtype)))
        .collect();
    write_files(dir, &config, tensors, dtype, 1, metadata)
}

/// The trained demo model shipped in the repository (`models/demo`), file by file: the
/// [`ModelSpec::trained_demo`] shape trained by `neuroshard train` on the embedded public-domain
/// corpus (the README gives the command and seed that reproduce it), in bf16.
pub const DEMO_MODEL_FILES: [(&str, &[u8]); 2] = [
    (
        "config.json",
        include_bytes!("../../../models/demo/config.json"),
    ),
    (
        "model-00001-of-00001.safetensors",
        include_bytes!("../../../models/demo/model-00001-of-00001.safetensors"),
    ),
];

/// The prompt the shipped demo model is shown with: the opening of a text it learned.
pub const DEMO_PROMPT: &str = "Four score and seven years ago";

/// Writes the shipped trained demo model into `dir` (created if missing).
pub fn write_demo_model(dir: &Path) -> Result<(), ModelError> {
    std::fs::create_dir_all(dir).map_err(|e| ModelError::io(dir, e))?;
    for (name, bytes) in DEMO_MODEL_FILES {
        let path = dir.join(name);
        std::fs::write(&path, bytes).map_err(|e| ModelError::io(&path, e))?;
    }
    Ok(())
}

/// Writes `config.json` and the weights of `spec` into `dir` (created if missing).
pub fn write_model(dir: &Path, spec: &ModelSpec) -> Result<(), ModelError> {
    let tensors: Vec<(String, Vec<usize>, Vec<u8>)> = spec
        .tensors()
        .into_iter()
        .enumerate()
        .map(|(index, (name, shape, std))| {
            let values = sample(spec.seed, index as u64, shape.iter().product(), std);
            (name, shape, narrow_le(&values, spec.dtype))
        })
        .collect();
    let metadata = HashMap::from([("neuroshard_seed".to_string(), spec.seed.to_string())]);
    write_files(
        dir,
        &spec.config(),
        tensors,
        spec.dtype,
        spec.files,
        metadata,
    )
}

/// Writes `config.json` and `tensors` (name, stored shape, little-endian bytes in `dtype`)
/// spread over `files` safetensors files into `dir` (created if missing).
fn write_files(
    dir: &Path,
    config: &LlamaConfig,
    tensors: Vec<(String, Vec<usize>, Vec<u8>)>,
    dtype: WireDType,
    files: usize,
    mut metadata: HashMap<String, String>,
) -> Result<(), ModelError> {
    std::fs::create_dir_all(dir).map_err(|e| ModelError::io(dir, e))?;
    let text = serde_json::to_string_pretty(&config.to_json()).expect("config serialises");
    let config_path = dir.join("config.json");
    std::fs::write(&config_path, text).map_err(|e| ModelError::io(&config_path, e))?;
    metadata.insert("format".to_string(), "pt".to_string());
    let files = files.clamp(1, tensors.len());
    let per_file = tensors.len().div_ceil(files);
    let dtype = match dtype {
        WireDType::F32 => Dtype::F32,
        WireDType::F16 => Dtype::F16,
        WireDType::BF16 => Dtype::BF16,
        WireDType::Int8Block => {
            return Err(ModelError::Weights(
                "safetensors files hold f32, f16 or bf16 weights, not int8 blocks".into(),
            ));
        }
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
        safetensors::serialize_to_file(views, Some(metadata.clone()), &path)
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Device, KvCache, Shard, ShardInput, ShardOutput, TrainConfig, TrainShard};

    #[test]
    fn trained_parameters_written_out_load_back_as_the_same_model() {
        let src = tempfile::tempdir().unwrap();
        write_model(src.path(), &ModelSpec::tiny()).unwrap();
        let device = Device::default();
        let mut stage =
            TrainShard::load(src.path(), 0..4, &device, TrainConfig::default()).unwrap();
        let ids: Vec<u32> = b"a small step".iter().map(|&b| b as u32).collect();
        stage
            .forward("a", ShardInput::Tokens(ids[..11].to_vec()), Some(&ids[1..]))
            .unwrap();
        stage.backward("a", None).unwrap();
        stage.step().unwrap();
        let out = tempfile::tempdir().unwrap();
        let config = crate::ModelInfo::read(src.path()).unwrap().config;
        write_trained(
            out.path(),
            &config,
            &stage.parameters(),
            WireDType::F32,
            HashMap::new(),
        )
        .unwrap();
        let written = crate::ModelInfo::read(out.path()).unwrap().config;
        assert!(!written.tie_word_embeddings);
        let reloaded = Shard::load(out.path(), 0..4, &device).unwrap();
        let prompt = ShardInput::Tokens(ids.clone());
        let logits = |shard: &Shard| match shard
            .forward(&mut KvCache::new(), 0, 0..4, prompt.clone())
            .unwrap()
        {
            ShardOutput::Logits(l) => l,
            ShardOutput::Hidden(_) => panic!("expected logits"),
        };
        let (a, b) = (logits(stage.shard()), logits(&reloaded));
        let diff = a
            .iter()
            .zip(&b)
            .map(|(x, y)| (x - y).abs())
            .fold(0f32, f32::max);
        assert!(diff < 1e-4, "{diff}");
        let original = Shard::load(src.path(), 0..4, &device).unwrap();
        assert_ne!(logits(&original), b, "the written model is the trained one");
        let err = write_trained(
            out.path(),
            &config,
            &[0.0; 10],
            WireDType::F32,
            HashMap::new(),
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("10 parameter values for layers 0..4"), "{err}");
    }
}
