//! Reading tensors out of a Hugging Face model directory's `*.safetensors` files.
//!
//! Only headers are read up front; each tensor's bytes are read from its file when a shard asks
//! for it, so a node touches only the tensors of its layer range.

use std::collections::HashMap;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use safetensors::tensor::{Dtype, TensorInfo};

use crate::ModelError;
use crate::codec::{WireDType, widen_le};

/// Largest safetensors header accepted (the format's own limit is 100 MB).
const MAX_HEADER_BYTES: u64 = 100_000_000;

/// The index of a sharded checkpoint, which names the file of every tensor.
const INDEX_FILE: &str = "model.safetensors.index.json";

/// The `*.safetensors` files of a model directory, sorted by name: those the sharded
/// checkpoint's index names when it has one (a stray file beside them is not read), otherwise
/// every one in the directory.
pub(crate) fn safetensors_files(dir: &Path) -> Result<Vec<PathBuf>, ModelError> {
    let index_path = dir.join(INDEX_FILE);
    match std::fs::read_to_string(&index_path) {
        Ok(text) => return indexed_files(dir, &index_path, &text),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(ModelError::io(&index_path, e)),
    }
    let mut paths: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|e| ModelError::io(dir, e))?
        .filter_map(|entry| entry.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|ext| ext == "safetensors"))
        .collect();
    paths.sort();
    Ok(paths)
}

/// The files `model.safetensors.index.json` maps tensors to, each checked to exist.
fn indexed_files(dir: &Path, index_path: &Path, text: &str) -> Result<Vec<PathBuf>, ModelError> {
    let bad = |why: String| ModelError::Weights(format!("{}: {why}", index_path.display()));
    let index: serde_json::Value =
        serde_json::from_str(text).map_err(|e| bad(format!("not valid JSON: {e}")))?;
    let map = index
        .get("weight_map")
        .and_then(|m| m.as_object())
        .ok_or_else(|| bad("weight_map is missing".into()))?;
    let mut names: Vec<&str> = Vec::with_capacity(map.len());
    for (tensor, file) in map {
        let file = file
            .as_str()
            .filter(|f| !f.contains('/') && !f.contains('\\') && f.ends_with(".safetensors"))
            .ok_or_else(|| {
                bad(format!(
                    "weight_map.{tensor} is not a safetensors file name"
                ))
            })?;
        names.push(file);
    }
    names.sort_unstable();
    names.dedup();
    names
        .into_iter()
        .map(|name| {
            let path = dir.join(name);
            if path.is_file() {
                Ok(path)
            } else {
                Err(bad(format!("names {name}, which is missing")))
            }
        })
        .collect()
}

/// One `*.safetensors` file: its handle and where its data section starts.
#[derive(Debug)]
struct WeightFile {
    path: PathBuf,
    file: File,
    data_start: u64,
}

/// The tensors of a model directory, indexed by name across all its safetensors files.
#[derive(Debug)]
pub struct WeightFiles {
    /// The model directory.
    dir: PathBuf,
    files: Vec<WeightFile>,
    tensors: HashMap<String, (usize, TensorInfo)>,
}

impl WeightFiles {
    /// Indexes every `*.safetensors` file in `dir` (reading headers only).
    pub fn open(dir: &Path) -> Result<Self, ModelError> {
        let paths = safetensors_files(dir)?;
        if paths.is_empty() {
            return Err(ModelError::Weights(format!(
                "{} holds no *.safetensors file",
                dir.display()
            )));
        }
        let mut weights = Self {
            dir: dir.to_path_buf(),
            files: Vec::new(),
            tensors: HashMap::new(),
        };
        for path in paths {
            weights.index_file(path)?;
        }
        Ok(weights)
    }

    fn index_file(&mut self, path: PathBuf) -> Result<(), ModelError> {
        let file = File::open(&path).map_err(|e| ModelError::io(&path, e))?;
        let file_len = file.metadata().map_err(|e| ModelError::io(&path, e))?.len();
        let bad = |why: String| ModelError::Weights(format!("{}: {why}", path.display()));
        let mut len_bytes = [0u8; 8];
        file.read_exact_at(&mut len_bytes, 0)
            .map_err(|_| bad("too short for a safetensors header".into()))?;
        let header_len = u64::from_le_bytes(len_bytes);
        if header_len > MAX_HEADER_BYTES || header_len + 8 > file_len {
            return Err(bad(format!("header length {header_len} is invalid")));
        }
        let mut header = vec![0u8; header_len as usize];
        file.read_exact_at(&mut header, 8)
            .map_err(|e| ModelError::io(&path, e))?;
        let entries: HashMap<String, serde_json::Value> = serde_json::from_slice(&header)
            .map_err(|e| bad(format!("header is not valid JSON: {e}")))?;
        let data_start = 8 + header_len;
        let index = self.files.len();
        for (name, value) in entries {
            if name == "__metadata__" {
                continue;
            }
            let info: TensorInfo =
                serde_json::from_value(value).map_err(|e| bad(format!("tensor {name}: {e}")))?;
            let (start, end) = info.data_offsets;
            if start > end || data_start + end as u64 > file_len {
                return Err(bad(format!("tensor {name} points outside the file")));
            }
            self.tensors.insert(name, (index, info));
        }
        self.files.push(WeightFile {
            path,
            file,
            data_start,
        });
        Ok(())
    }

    /// Reads tensor `name`, checks its shape against what the config implies, and widens it to f32.
    pub fn read_f32(&self, name: &str, expected_shape: &[usize]) -> Result<Vec<f32>, ModelError> {
        let (file_index, info) = self.tensors.get(name).ok_or_else(|| {
            ModelError::Weights(format!(
                "tensor {name} is missing from {}, though config.json implies it",
                self.dir.display()
            ))
        })?;
        if info.shape != expected_shape {
            return Err(ModelError::Weights(format!(
                "tensor {name} has shape {:?} but config.json implies {:?}",
                info.shape, expected_shape
            )));
        }
        let elements: usize = info.shape.iter().product();
        let dtype = match info.dtype {
            Dtype::F32 => WireDType::F32,
            Dtype::F16 => WireDType::F16,
            Dtype::BF16 => WireDType::BF16,
            other => {
                return Err(ModelError::Weights(format!(
                    "tensor {name} has dtype {other:?}; only F32, F16 and BF16 are supported"
                )));
            }
        };
        let element_size = dtype.size();
        let (start, end) = info.data_offsets;
        if end - start != elements * element_size {
            return Err(ModelError::Weights(format!(
                "tensor {name} holds {} bytes but its shape and dtype need {}",
                end - start,
                elements * element_size
            )));
        }
        let file = &self.files[*file_index];
        let mut bytes = vec![0u8; end - start];
        file.file
            .read_exact_at(&mut bytes, file.data_start + start as u64)
            .map_err(|e| ModelError::io(&file.path, e))?;
        Ok(widen_le(&bytes, dtype))
    }
}
