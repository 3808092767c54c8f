//! NeuroShard's model side: Llama-family decoder shards in burn and how their tensors travel.
//!
//! - [`LlamaConfig`] reads a Hugging Face `config.json`.
//! - [`Shard`] loads a contiguous layer range from the directory's `*.safetensors` files (only
//!   that range's tensors are read) and runs it, RMSNorm → grouped-query attention with RoPE →
//!   SwiGLU, against a per-session [`KvCache`]. Tensors are burn's device-dispatched tensors:
//!   the CPU backend (burn-flex) by default, wgpu with the `wgpu` feature.
//! - [`codec`] is the wire format of activations and logits.
//! - [`TrainShard`] trains a shard as one pipeline stage: forward with autodiff, backward from
//!   the next stage's gradient or the loss, AdamW inner steps.
//! - [`init`] writes the built-in deterministic model; [`TextTokenizer`] turns text into ids.
//! - [`fetched`] keeps a model fetched from peers (its small files and one stored shard).

mod chat;
pub mod codec;
mod config;
pub mod fetched;
pub mod init;
mod kv;
mod layout;
mod precision;
pub mod sampling;
mod shard;
mod tokenizer;
mod train;
mod weights;

use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

pub use burn::tensor::Device;
pub use chat::{ChatMessage, ChatTemplate};
pub use config::{Family, LlamaConfig, RopeConfig, RopeScaling, SlidingWindow};
pub use kv::{BLOCK_POSITIONS, KvCache, whole_blocks};
pub use precision::{INT8_BLOCK, Precision};
pub use sampling::{Chosen, Sampler, SamplingParams, argmax};
pub use shard::{BatchItem, Shard, ShardInput, ShardOutput};
pub use tokenizer::{BYTE_BOS, BYTE_EOS, BYTE_VOCAB, StopStrings, TextStream, TextTokenizer};
pub use train::{TrainConfig, TrainOutput, TrainShard};

/// Why loading or running a model failed.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// `config.json` is missing, malformed or describes an impossible model.
    #[error("bad model config: {0}")]
    Config(String),
    /// The safetensors files disagree with the config or are corrupt.
    #[error("bad model weights: {0}")]
    Weights(String),
    /// The tokenizer could not be loaded or failed.
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    /// Layers outside what the shard or model holds.
    #[error("wrong layers: {0}")]
    LayerRange(String),
    /// A request the shard cannot run (bad ids, bad hidden-state width, too long).
    #[error("bad request: {0}")]
    Request(String),
    /// New tokens would leave a hole in the cache.
    #[error("position gap: layer {layer} holds {held} positions but the request starts at {start}")]
    PositionGap {
        /// First layer with the gap.
        layer: usize,
        /// Positions it holds.
        held: usize,
        /// Where the request starts.
        start: usize,
    },
}

impl ModelError {
    fn io(path: &Path, source: std::io::Error) -> Self {
        Self::Io {
            path: path.to_path_buf(),
            source,
        }
    }
}

/// A model directory's config and content id.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelInfo {
    /// The parsed `config.json`.
    pub config: LlamaConfig,
    /// Hex id of the model: a hash of `config.json` and every safetensors header, so nodes
    /// serving different weights layouts or seeds never chain together.
    pub id: String,
    /// The directory.
    pub dir: PathBuf,
}

impl ModelInfo {
    /// Reads and validates `dir/config.json` and fingerprints the safetensors headers; a model
    /// fetched from peers (no safetensors, a [`fetched::FETCHED_FILE`]) keeps the id its peers
    /// serve it under.
    pub fn read(dir: &Path) -> Result<Self, ModelError> {
        let (text, config) = read_config(dir)?;
        let files = weights::safetensors_files(dir)?;
        if files.is_empty()
            && let Some(fetched) = fetched::FetchedModel::read(dir)?
        {
            return Ok(Self {
                config,
                id: fetched.model_id,
                dir: dir.to_path_buf(),
            });
        }
        let mut hash = Sha256::new();
        hash.update(text.as_bytes());
        for file in files {
            hash.update(safetensors_header(&file)?);
        }
        let digest = hash.finalize();
        Ok(Self {
            config,
            id: hex::encode(&digest[..8]),
            dir: dir.to_path_buf(),
        })
    }

    /// The model whose `config.json` is in `dir`, under the id `id` a peer serves it as: for a
    /// node that fetches its weights from that peer and so has no safetensors to fingerprint.
    pub fn with_id(dir: &Path, id: &str) -> Result<Self, ModelError> {
        Ok(Self {
            config: read_config(dir)?.1,
            id: id.to_string(),
            dir: dir.to_path_buf(),
        })
    }
}

/// Whether `dir` holds safetensors weights (a downloaded model, not a fetched one).
pub fn has_safetensors(dir: &Path) -> Result<bool, ModelError> {
    Ok(!weights::safetensors_files(dir)?.is_empty())
}

/// `dir/config.json`: its text and the config it describes, with the end-of-sequence tokens of
/// `generation_config.json` added (generation stops on any of either).
fn read_config(dir: &Path) -> Result<(String, LlamaConfig), ModelError> {
    let path = dir.join("config.json");
    let text = std::fs::read_to_string(&path).map_err(|e| ModelError::io(&path, e))?;
    let mut config = LlamaConfig::from_json(&text)?;
    let generation = dir.join("generation_config.json");
    match std::fs::read_to_string(&generation) {
        Ok(body) => {
            let value: serde_json::Value = serde_json::from_str(&body)
                .map_err(|e| ModelError::Config(format!("{}: {e}", generation.display())))?;
            let eos = config::token_list(value.get("eos_token_id"), "eos_token_id")
                .map_err(|e| ModelError::Config(format!("{}: {e}", generation.display())))?;
            for id in eos {
                if !config.eos_token_ids.contains(&id) {
                    config.eos_token_ids.push(id);
                }
            }
            config.validate()?;
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(ModelError::io(&generation, e)),
    }
    Ok((text, config))
}

fn safetensors_header(path: &Path) -> Result<Vec<u8>, ModelError> {
    use std::io::Read;
    let mut file = std::fs::File::open(path).map_err(|e| ModelError::io(path, e))?;
    let mut len = [0u8; 8];
    file.read_exact(&mut len)
        .map_err(|e| ModelError::io(path, e))?;
    let len = u64::from_le_bytes(len).min(100_000_000);
    let mut header = Vec::new();
    file.take(len)
        .read_to_end(&mut header)
        .map_err(|e| ModelError::io(path, e))?;
    canonical_header(&header)
        .map_err(|e| ModelError::Weights(format!("{}: header: {e}", path.display())))
}

/// A safetensors header in one form whatever order its writer listed keys in (the metadata
/// often comes from a hash map): every object's keys sorted, so the same model written twice
/// has the same id.
fn canonical_header(header: &[u8]) -> Result<Vec<u8>, serde_json::Error> {
    fn sorted(value: serde_json::Value) -> serde_json::Value {
        use serde_json::Value;
        match value {
            Value::Object(map) => {
                let by_key: std::collections::BTreeMap<String, Value> =
                    map.into_iter().map(|(k, v)| (k, sorted(v))).collect();
                Value::Object(by_key.into_iter().collect())
            }
            Value::Array(items) => Value::Array(items.into_iter().map(sorted).collect()),
            other => other,
        }
    }
    serde_json::to_vec(&sorted(serde_json::from_slice(header)?))
}

/// The device compute runs on: burn's default (wgpu when built with it and a GPU is found,
/// otherwise the CPU backend); `BURN_DEVICE` overrides it.
pub fn default_device() -> Device {
    Device::default()
}

/// Whether this build can compute on a GPU: it was built with the `wgpu` feature.
pub const GPU_BUILD: bool = cfg!(feature = "wgpu");

/// The CPU backend's device (burn-flex).
pub fn cpu_device() -> Device {
    Device::flex()
}

/// The GPU: wgpu's default adapter (a discrete GPU where there is one). `None` in a build
/// without the `wgpu` feature. The adapter opens on first use, so a machine without one
/// fails when a shard loads onto it.
pub fn gpu_device() -> Option<Device> {
    #[cfg(feature = "wgpu")]
    return Some(Device::wgpu(Default::default()));
    #[cfg(not(feature = "wgpu"))]
    None
}

/// Whether `device` is the CPU backend's.
pub fn is_cpu(device: &Device) -> bool {
    *device == cpu_device()
}

#[cfg(test)]
mod id_tests {
    use super::*;

    #[test]
    fn a_header_s_key_order_does_not_change_the_model_id() {
        let a = br#"{"__metadata__":{"format":"pt","seed":"1"},"w":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}"#;
        let b = br#"{"w":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},"__metadata__":{"seed":"1","format":"pt"}}"#;
        assert_eq!(canonical_header(a).unwrap(), canonical_header(b).unwrap());
        assert!(canonical_header(b"not json").is_err());
        // The built-in model written again and again has one id (its metadata is a hash map).
        let ids: std::collections::HashSet<String> = (0..8)
            .map(|_| {
                let dir = tempfile::tempdir().unwrap();
                init::write_model(dir.path(), &init::ModelSpec::tiny()).unwrap();
                ModelInfo::read(dir.path()).unwrap().id
            })
            .collect();
        assert_eq!(ids.len(), 1, "{ids:?}");
    }
}
