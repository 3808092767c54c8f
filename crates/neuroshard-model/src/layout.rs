//! The flat parameter layout: every tensor of a model in one order (the embeddings, each
//! layer's in the order of `DecoderLayer`'s fields, the final norm, the LM head), which a
//! shard's flat parameters, checkpoints, `--weights-from`, weight hashes and DiLoCo's
//! pseudo-gradients all follow. One module, so they cannot drift apart.

use std::ops::Range;

use burn::module::{Module, ModuleMapper, ModuleVisitor, Param};
use burn::optim::GradientsParams;
use burn::tensor::{Device, Tensor, TensorData};

use crate::{LlamaConfig, ModelError};

/// What a tensor of the layout is.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) enum Kind {
    Embedding,
    Norm,
    /// A projection, stored `[out, in]` (burn holds it as `[in, out]`).
    Linear,
    /// A projection's bias, `[out]`.
    Bias,
}

/// One tensor of a model in the Hugging Face layout.
#[derive(Debug, Clone)]
pub(crate) struct Entry {
    pub(crate) name: String,
    /// The stored (Hugging Face) shape.
    pub(crate) shape: Vec<usize>,
    pub(crate) kind: Kind,
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
pub(crate) fn layout(c: &LlamaConfig) -> Vec<Entry> {
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

/// Bytes the weights of a shard of layers `range` take held at `precision`: its projections
/// (the LM head's included) at that precision, every other tensor as f32.
pub fn shard_weight_bytes(
    config: &LlamaConfig,
    range: Range<usize>,
    precision: crate::Precision,
) -> u64 {
    shard_entries(config, &range)
        .iter()
        .map(|e| {
            let count = e.shape.iter().product::<usize>() as u64;
            match e.kind {
                Kind::Linear => precision.projection_bytes(count, e.shape[1]),
                _ => count * 4,
            }
        })
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
            Kind::Linear => transpose(mine, e.shape[1], e.shape[0]),
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

/// Row-major `[rows, cols]` → `[cols, rows]`.
pub(crate) fn transpose(values: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    let mut out = vec![0f32; values.len()];
    for r in 0..rows {
        for c in 0..cols {
            out[c * rows + r] = values[r * cols + c];
        }
    }
    out
}

/// A tensor's values as a flat `Vec<f32>`.
pub(crate) fn to_vec<const D: usize>(t: Tensor<D>) -> Vec<f32> {
    t.into_data()
        .convert::<f32>()
        .try_into_vec::<f32>()
        .expect("f32 tensor data converts to a Vec<f32>")
}

/// Every parameter of `module` (or, given `grads`, its gradient, zeros where there is none)
/// as one flat vector in load order.
pub(crate) fn flatten<M: Module>(module: &M, grads: Option<&GradientsParams>) -> Vec<f32> {
    let mut flat = Flatten {
        grads,
        out: Vec::new(),
    };
    module.visit(&mut flat);
    flat.out
}

/// Appends every parameter (or its gradient, zeros where there is none) to `out`.
struct Flatten<'a> {
    grads: Option<&'a GradientsParams>,
    out: Vec<f32>,
}

impl ModuleVisitor for Flatten<'_> {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        match self.grads {
            None => self.out.extend(to_vec(param.val().detach())),
            Some(grads) => match grads.get::<D>(param.id) {
                Some(grad) => self.out.extend(to_vec(grad)),
                None => {
                    let n: usize = param.val().dims().iter().product();
                    self.out.extend(std::iter::repeat_n(0.0, n));
                }
            },
        }
    }
}

/// Replaces every parameter with the next values of a flat vector.
pub(crate) struct Fill<'a> {
    pub(crate) values: &'a [f32],
    pub(crate) device: Device,
}

impl ModuleMapper for Fill<'_> {
    fn map_float<const D: usize>(&mut self, param: Param<Tensor<D>>) -> Param<Tensor<D>> {
        let device = self.device.clone();
        let values = &mut self.values;
        param.map(|old| {
            let shape = old.dims();
            let n: usize = shape.iter().product();
            let (mine, rest) = values.split_at(n);
            *values = rest;
            Tensor::from_data(TensorData::new(mine.to_vec(), shape), &device).require_grad()
        })
    }
}
