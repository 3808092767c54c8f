//! Building a shard's burn modules from named tensors (a model directory's safetensors files,
//! or tensors in memory), each checked against the shape the config implies, with a digest of
//! the values read.

use std::collections::HashMap;

use burn::module::Param;
use burn::nn::{Embedding, Linear, RmsNorm};
use burn::tensor::{Device, Tensor, TensorData};
use sha2::{Digest, Sha256};

use super::DecoderLayer;
use crate::layout::transpose;
use crate::precision::Packed;
use crate::weights::WeightFiles;
use crate::{LlamaConfig, ModelError};

/// Where a shard's named tensors come from.
pub(crate) enum Source<'a> {
    /// A model directory's safetensors files.
    Files(&'a WeightFiles),
    /// Tensors in memory by name: stored shape and f32 values.
    Memory(&'a HashMap<String, (Vec<usize>, Vec<f32>)>),
}

impl Source<'_> {
    pub(crate) fn read_f32(&self, name: &str, shape: &[usize]) -> Result<Vec<f32>, ModelError> {
        match self {
            Source::Files(files) => files.read_f32(name, shape),
            Source::Memory(tensors) => match tensors.get(name) {
                None => Err(ModelError::Weights(format!("tensor {name} is missing"))),
                Some((stored, _)) if stored != shape => Err(ModelError::Weights(format!(
                    "tensor {name} has shape {stored:?} but config.json implies {shape:?}"
                ))),
                Some((_, values)) => Ok(values.clone()),
            },
        }
    }
}

/// Builds burn modules from named tensors, checking each shape against the config.
pub(crate) struct Loader<'a> {
    pub(crate) weights: Source<'a>,
    pub(crate) config: &'a LlamaConfig,
    pub(crate) device: &'a Device,
    /// How the projections are held.
    pub(crate) precision: crate::Precision,
    /// Hash of the values read since the last [`Loader::take_digest`].
    pub(crate) digest: std::cell::RefCell<Sha256>,
}

impl Loader<'_> {
    /// Reads a tensor as f32 and folds its values into the running digest.
    pub(crate) fn read(&self, name: &str, shape: &[usize]) -> Result<Vec<f32>, ModelError> {
        let values = self.weights.read_f32(name, shape)?;
        let mut digest = self.digest.borrow_mut();
        digest.update(name.as_bytes());
        digest.update(bytemuck::cast_slice::<f32, u8>(&values));
        Ok(values)
    }

    /// The digest of the values read since the last call.
    pub(crate) fn take_digest(&self) -> [u8; 32] {
        std::mem::take(&mut *self.digest.borrow_mut())
            .finalize()
            .into()
    }

    pub(crate) fn tensor<const D: usize>(
        &self,
        name: &str,
        shape: [usize; D],
    ) -> Result<Tensor<D>, ModelError> {
        let values = self.read(name, &shape)?;
        Ok(Tensor::from_data(
            TensorData::new(values, shape),
            self.device,
        ))
    }

    /// A Hugging Face `[out, in]` projection with its `[out]` bias (f32) when the config says
    /// the family has one: as a burn `[in, out]` linear layer held at the loader's precision
    /// (on the CPU at f32, the transposed view of the weights as stored), or, where the shard
    /// packs its projections (below f32, on the CPU), as a `Linear` keeping only the bias and
    /// the weights packed beside it.
    pub(crate) fn projection(
        &self,
        prefix: &str,
        d_in: usize,
        d_out: usize,
        bias: bool,
    ) -> Result<(Linear, Option<Packed>), ModelError> {
        let values = self.read(&format!("{prefix}.weight"), &[d_out, d_in])?;
        let bias = bias
            .then(|| self.tensor(&format!("{prefix}.bias"), [d_out]))
            .transpose()?
            .map(Param::from_tensor);
        let packed = match crate::is_cpu(self.device) {
            true => Packed::new(self.precision, &values, d_in, d_out),
            false => None,
        };
        let weight = match packed {
            Some(_) => Tensor::zeros([1, 1], self.device),
            // As stored, each output's inputs together, for the few-row product to stream;
            // burn multiplies by the transposed view.
            None if crate::is_cpu(self.device) && self.precision == crate::Precision::F32 => {
                Tensor::from_data(TensorData::new(values, [d_out, d_in]), self.device).transpose()
            }
            None => {
                let weight = transpose(&values, d_out, d_in);
                let weight = Tensor::from_data(TensorData::new(weight, [d_in, d_out]), self.device);
                crate::precision::hold(self.precision, weight)
            }
        };
        let weight = Param::from_tensor(weight);
        Ok((Linear { weight, bias }, packed))
    }

    pub(crate) fn norm(&self, name: &str) -> Result<RmsNorm, ModelError> {
        self.norm_of(name, self.config.hidden_size)
    }

    pub(crate) fn norm_of(&self, name: &str, width: usize) -> Result<RmsNorm, ModelError> {
        Ok(RmsNorm {
            gamma: Param::from_tensor(self.tensor(name, [width])?),
            epsilon: self.config.rms_norm_eps,
        })
    }

    pub(crate) fn embedding(&self) -> Result<Embedding, ModelError> {
        let shape = [self.config.vocab_size, self.config.hidden_size];
        Ok(Embedding {
            weight: Param::from_tensor(self.tensor("model.embed_tokens.weight", shape)?),
        })
    }

    pub(crate) fn lm_head(&self) -> Result<(Linear, Option<Packed>), ModelError> {
        let name = if self.config.tie_word_embeddings {
            "model.embed_tokens"
        } else {
            "lm_head"
        };
        self.projection(name, self.config.hidden_size, self.config.vocab_size, false)
    }

    pub(crate) fn layer(&self, index: usize) -> Result<DecoderLayer, ModelError> {
        let c = self.config;
        let p = format!("model.layers.{index}");
        let (hidden, inter) = (c.hidden_size, c.intermediate_size);
        let q_width = c.num_attention_heads * c.head_dim();
        let kv_width = c.kv_heads() * c.head_dim();
        let head_norm = |name: &str| {
            c.qk_norm
                .then(|| self.norm_of(&format!("{p}.self_attn.{name}.weight"), c.head_dim()))
                .transpose()
        };
        // Read in the order of the fields, which is the flat parameter order.
        let input_norm = self.norm(&format!("{p}.input_layernorm.weight"))?;
        let attn = |name: &str, d_in, d_out, bias| {
            self.projection(&format!("{p}.self_attn.{name}"), d_in, d_out, bias)
        };
        let q = attn("q_proj", hidden, q_width, c.qkv_bias)?;
        let k = attn("k_proj", hidden, kv_width, c.qkv_bias)?;
        let v = attn("v_proj", hidden, kv_width, c.qkv_bias)?;
        let (q_norm, k_norm) = (head_norm("q_norm")?, head_norm("k_norm")?);
        let o = attn("o_proj", q_width, hidden, c.o_bias)?;
        let post_attention_norm = self.norm(&format!("{p}.post_attention_layernorm.weight"))?;
        let mlp = |name: &str, d_in, d_out| {
            self.projection(&format!("{p}.mlp.{name}"), d_in, d_out, c.mlp_bias)
        };
        let gate = mlp("gate_proj", hidden, inter)?;
        let up = mlp("up_proj", hidden, inter)?;
        let down = mlp("down_proj", inter, hidden)?;
        let packed = match (q.1, k.1, v.1, o.1, gate.1, up.1, down.1) {
            (Some(q), Some(k), Some(v), Some(o), Some(g), Some(u), Some(d)) => {
                Some(std::sync::Arc::new([q, k, v, o, g, u, d]))
            }
            _ => None,
        };
        Ok(DecoderLayer {
            input_norm,
            q_proj: q.0,
            k_proj: k.0,
            v_proj: v.0,
            q_norm,
            k_norm,
            o_proj: o.0,
            post_attention_norm,
            gate_proj: gate.0,
            up_proj: up.0,
            down_proj: down.0,
            packed,
        })
    }
}
