//! A model fetched from peers rather than downloaded: its small files (config, tokenizer, chat
//! template) beside the flat parameters of the layers it was given, kept so the next start
//! needs no peer. `fetched.json` names the model's content id (the one its peers serve it
//! under) and the stored shard with its SHA-256, checked on every load.

use std::io::Write;
use std::ops::Range;
use std::path::Path;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::{LlamaConfig, ModelError};

/// The record of a fetched model in its directory.
pub const FETCHED_FILE: &str = "fetched.json";

/// The model files a peer hands a newcomer: all it needs beside the weights to serve and to
/// chat. `config.json` is required; the others are sent where the peer has them.
pub const MODEL_FILES: &[&str] = &[
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
];

/// The largest model file taken from a peer: a tokenizer of a 256k vocabulary is under 35 MB.
pub const MAX_MODEL_FILE_BYTES: u64 = 48 * 1024 * 1024;

/// What `fetched.json` holds.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FetchedModel {
    /// The content id the swarm serves the model under.
    pub model_id: String,
    /// The layers kept on disk, if any.
    pub shard: Option<StoredShard>,
}

/// One shard's flat parameters on disk (little-endian f32, in the shard's parameter order).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StoredShard {
    /// First layer.
    pub start: usize,
    /// One past the last layer.
    pub end: usize,
    /// The file, in the model directory.
    pub file: String,
    /// SHA-256 of the file, hex.
    pub sha256: String,
}

impl FetchedModel {
    /// The record in `dir`; none for a directory that is not a fetched model.
    pub fn read(dir: &Path) -> Result<Option<Self>, ModelError> {
        let path = dir.join(FETCHED_FILE);
        match std::fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes)
                .map(Some)
                .map_err(|e| ModelError::Weights(format!("{}: {e}", path.display()))),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(ModelError::io(&path, e)),
        }
    }

    fn write(&self, dir: &Path) -> Result<(), ModelError> {
        let json = serde_json::to_vec_pretty(self).expect("the record serializes");
        write_atomic(&dir.join(FETCHED_FILE), &json)
    }
}

/// Marks `dir` as the fetched model `model_id`, keeping a shard already stored for it.
pub fn mark_fetched(dir: &Path, model_id: &str) -> Result<(), ModelError> {
    let shard = FetchedModel::read(dir)?
        .filter(|m| m.model_id == model_id)
        .and_then(|m| m.shard);
    FetchedModel {
        model_id: model_id.to_string(),
        shard,
    }
    .write(dir)
}

/// The stored parameters of `range` of the fetched model in `dir`: none when that range is not
/// stored; an error naming the file when it is but does not match its hash or the model.
pub fn load_shard(
    dir: &Path,
    config: &LlamaConfig,
    range: Range<usize>,
) -> Result<Option<Vec<f32>>, ModelError> {
    let Some(StoredShard {
        start,
        end,
        file,
        sha256,
    }) = FetchedModel::read(dir)?.and_then(|m| m.shard)
    else {
        return Ok(None);
    };
    if (start, end) != (range.start, range.end) {
        return Ok(None);
    }
    let path = dir.join(&file);
    let bytes = std::fs::read(&path).map_err(|e| ModelError::io(&path, e))?;
    if hex::encode(Sha256::digest(&bytes)) != sha256 {
        return Err(ModelError::Weights(format!(
            "{} does not match the SHA-256 it was saved with; it is damaged",
            path.display()
        )));
    }
    let expected = crate::init::shard_parameter_count(config, range.clone());
    if bytes.len() != expected * 4 {
        return Err(ModelError::Weights(format!(
            "{} holds {} bytes; layers {start}..{end} take {}",
            path.display(),
            bytes.len(),
            expected * 4
        )));
    }
    Ok(Some(
        bytes
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes(b.try_into().expect("4 bytes")))
            .collect(),
    ))
}

/// Stores `parameters` of `range` in the fetched model `dir` (replacing the shard kept before),
/// written whole before the record names it.
pub fn save_shard(
    dir: &Path,
    model_id: &str,
    range: Range<usize>,
    parameters: &[f32],
) -> Result<(), ModelError> {
    let bytes: Vec<u8> = parameters.iter().flat_map(|p| p.to_le_bytes()).collect();
    let file = format!("layers-{}-{}.f32", range.start, range.end);
    write_atomic(&dir.join(&file), &bytes)?;
    let before = FetchedModel::read(dir)?.and_then(|m| m.shard);
    FetchedModel {
        model_id: model_id.to_string(),
        shard: Some(StoredShard {
            start: range.start,
            end: range.end,
            file: file.clone(),
            sha256: hex::encode(Sha256::digest(&bytes)),
        }),
    }
    .write(dir)?;
    if let Some(old) = before.filter(|old| old.file != file) {
        let _ = std::fs::remove_file(dir.join(old.file));
    }
    Ok(())
}

/// Writes `bytes` to `path` through a temporary file in the same directory and a rename, so a
/// crash leaves the old file or the new one, never half of one.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), ModelError> {
    let dir = path.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).map_err(|e| ModelError::io(dir, e))?;
    let mut temp = tempfile::NamedTempFile::new_in(dir).map_err(|e| ModelError::io(dir, e))?;
    temp.write_all(bytes)
        .and_then(|()| temp.as_file().sync_all())
        .map_err(|e| ModelError::io(path, e))?;
    temp.persist(path)
        .map_err(|e| ModelError::io(path, e.error))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stored_shard_comes_back_and_a_damaged_one_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let config = crate::init::ModelSpec::tiny().config();
        std::fs::write(dir.path().join("config.json"), config.to_json().to_string()).unwrap();
        let count = crate::init::shard_parameter_count(&config, 0..2);
        let parameters: Vec<f32> = (0..count).map(|i| i as f32 * 0.5).collect();
        assert_eq!(load_shard(dir.path(), &config, 0..2).unwrap(), None);
        save_shard(dir.path(), "abc", 0..2, &parameters).unwrap();
        assert_eq!(
            load_shard(dir.path(), &config, 0..2).unwrap().as_deref(),
            Some(&parameters[..])
        );
        assert_eq!(load_shard(dir.path(), &config, 0..3).unwrap(), None);
        let info = crate::ModelInfo::read(dir.path()).unwrap();
        assert_eq!(
            info.id, "abc",
            "a fetched model keeps the id its peers serve"
        );

        let count = crate::init::shard_parameter_count(&config, 2..4);
        save_shard(dir.path(), "abc", 2..4, &vec![1.0; count]).unwrap();
        assert!(
            !dir.path().join("layers-0-2.f32").exists(),
            "one shard kept"
        );
        let file = dir.path().join("layers-2-4.f32");
        let mut bytes = std::fs::read(&file).unwrap();
        bytes[3] ^= 1;
        std::fs::write(&file, bytes).unwrap();
        let err = load_shard(dir.path(), &config, 2..4)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("layers-2-4.f32") && err.contains("damaged"),
            "{err}"
        );
    }
}
