//! Writes a small deterministic Llama model in the Hugging Face layout, so the demo and the
//! tests need no download and always go through the real loading path.

use std::collections::HashMap;
use std::ops::Range;
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
            family: Family::Llama,
            hidden_size: self.hidden,
            intermediate_size: self.intermediate,
            num_hidden_layers: self.layers,
            num_attention_heads: self.heads,
            num_key_value_heads: Some(self.kv_heads),
            vocab_size: BYTE_VOCAB,
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

/// What a tensor of the layout is.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Kind {
    Embedding,
    Norm,
    /// A projection, stored `[out, in]` (burn holds it as `[in, out]`).
    Linear,
    /// A projection's bias, `[out]`.
    Bias,
}

/// One tensor of a model in the Hugging Face layout.
#[derive(Debug, Clone)]
struct Entry {
    name: String,
    /// The stored (Hugging Face) shape.
    shape: Vec<usize>,
    kind: Kind,
}

impl Entry {
    fn new(name: &str, shape: Vec<usize>, kind: Kind) -> Self {
        Self {
            name: name.to_string(),
            shape,
            kind,
        }
    }
}

/// Every tensor of a model in load order (the order of a shard's flat parameters): the
/// embeddings, each layer's, the final norm and, unless tied, the LM head.
fn layout(c: &LlamaConfig) -> Vec<Entry> {
    let (h, v) = (c.hidden_size, c.vocab_size);
    let mut out = vec![Entry::new(
        "model.embed_tokens.weight",
        vec![v, h],
        Kind::Embedding,
    )];
    for l in 0..c.num_hidden_layers {
        out.extend(layer_layout(c, l));
    }
    out.push(Entry::new("model.norm.weight", vec![h], Kind::Norm));
    if !c.tie_word_embeddings {
        out.push(Entry::new("lm_head.weight", vec![v, h], Kind::Linear));
    }
    out
}

/// The tensors of layer `l` in the order of `DecoderLayer`'s fields, with the biases and head
/// norms its family has.
fn layer_layout(c: &LlamaConfig, l: usize) -> Vec<Entry> {
    let (h, i, d) = (c.hidden_size, c.intermediate_size, c.head_dim());
    let (q, kv) = (c.num_attention_heads * d, c.kv_heads() * d);
    let p = format!("model.layers.{l}");
    let mut out = vec![Entry::new(
        &format!("{p}.input_layernorm.weight"),
        vec![h],
        Kind::Norm,
    )];
    let linear = |out: &mut Vec<Entry>, name: &str, d_out: usize, d_in: usize, bias: bool| {
        let name = format!("{p}.{name}");
        out.push(Entry::new(
            &format!("{name}.weight"),
            vec![d_out, d_in],
            Kind::Linear,
        ));
        if bias {
            out.push(Entry::new(&format!("{name}.bias"), vec![d_out], Kind::Bias));
        }
    };
    linear(&mut out, "self_attn.q_proj", q, h, c.qkv_bias);
    linear(&mut out, "self_attn.k_proj", kv, h, c.qkv_bias);
    linear(&mut out, "self_attn.v_proj", kv, h, c.qkv_bias);
    if c.qk_norm {
        for norm in ["q_norm", "k_norm"] {
            let name = format!("{p}.self_attn.{norm}.weight");
            out.push(Entry::new(&name, vec![d], Kind::Norm));
        }
    }
    linear(&mut out, "self_attn.o_proj", h, q, c.o_bias);
    let name = format!("{p}.post_attention_layernorm.weight");
    out.push(Entry::new(&name, vec![h], Kind::Norm));
    linear(&mut out, "mlp.gate_proj", i, h, c.mlp_bias);
    linear(&mut out, "mlp.up_proj", i, h, c.mlp_bias);
    linear(&mut out, "mlp.down_proj", h, i, c.mlp_bias);
    out
}

/// The tensors a shard of layers `range` holds, in its flat parameters' order: the embeddings
/// on the first shard, each layer's tensors, and the final norm and LM head on the last (a
/// shard holds the head even when it is tied to the embeddings).
fn shard_entries(config: &LlamaConfig, range: &Range<usize>) -> Vec<Entry> {
    let last = config.num_hidden_layers;
    let untied = LlamaConfig {
        tie_word_embeddings: false,
        ..config.clone()
    };
    let held = |name: &str| match name {
        "model.embed_tokens.weight" => range.start == 0,
        "model.norm.weight" | "lm_head.weight" => range.end == last,
        layer => layer
            .strip_prefix("model.layers.")
            .and_then(|rest| rest.split('.').next())
            .and_then(|n| n.parse::<usize>().ok())
            .is_some_and(|n| range.contains(&n)),
    };
    layout(&untied)
        .into_iter()
        .filter(|e| held(&e.name))
        .collect()
}

/// Parameters a shard of layers `range` holds (the length of its flat parameters).
pub fn shard_parameter_count(config: &LlamaConfig, range: Range<usize>) -> usize {
    shard_entries(config, &range)
        .iter()
        .map(|e| e.shape.iter().product::<usize>())
        .sum()
}

/// A tensor by name: its stored shape and f32 values.
pub(crate) type NamedTensor = (String, Vec<usize>, Vec<f32>);

/// The tensors of layers `range` of a model as a shard holds them, in order, named and shaped
/// as stored (Hugging Face `[out, in]` projections), from the shard's flat `parameters` (the
/// head under the embeddings' name when they are tied, as a shard loads it from there).
pub(crate) fn shard_tensors(
    config: &LlamaConfig,
    range: Range<usize>,
    parameters: &[f32],
) -> Result<Vec<NamedTensor>, ModelError> {
    let entries = shard_entries(config, &range);
    let expected: usize = entries
        .iter()
        .map(|e| e.shape.iter().product::<usize>())
        .sum();
    if parameters.len() != expected {
        return Err(ModelError::Weights(format!(
            "{} parameter values for layers {}..{}, which hold {expected}",
            parameters.len(),
            range.start,
            range.end
        )));
    }
    let mut rest = parameters;
    let mut tensors = Vec::with_capacity(entries.len());
    for e in entries {
        let (mine, tail) = rest.split_at(e.shape.iter().product());
        rest = tail;
        let values = match e.kind {
            // burn's [in, out] back to the stored [out, in].
            Kind::Linear => crate::shard::transpose(mine, e.shape[1], e.shape[0]),
            Kind::Embedding | Kind::Norm | Kind::Bias => mine.to_vec(),
        };
        let name = match e.name.as_str() {
            "lm_head.weight" if config.tie_word_embeddings => "model.embed_tokens.weight".into(),
            _ => e.name,
        };
        tensors.push((name, e.shape, values));
    }
    Ok(tensors)
}

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
