//! A contiguous range of Llama decoder layers, loaded from a Hugging Face directory.
//!
//! The first shard also holds the token embeddings; the last one holds the final norm and the
//! LM head. Every call runs a sub-range of the shard's layers on the hidden states of the new
//! tokens of one session, reading and extending that session's [`KvCache`].

use std::ops::Range;
use std::path::Path;

use burn::module::Module;
use burn::nn::{Embedding, Linear, RmsNorm};
use burn::tensor::{DType, Device, Int, Tensor, TensorData};

use sha2::{Digest, Sha256};

mod batch;
mod decode_attention;
mod layers;
mod loader;
mod perplexity;

pub use batch::BatchItem;
pub use layers::DecoderLayer;
pub(crate) use layers::{Heads, Positions};
use loader::{Loader, Source};

use crate::kv::KvCache;
use crate::layout::to_vec;
use crate::weights::WeightFiles;
use crate::{LlamaConfig, ModelError, ModelInfo, Precision};

/// What a shard is asked to run on.
#[derive(Debug, Clone, PartialEq)]
pub enum ShardInput {
    /// Token ids of the new tokens (only for a shard starting at layer 0).
    Tokens(Vec<u32>),
    /// Hidden states of the new tokens, row-major `[tokens, hidden]`.
    Hidden(Vec<f32>),
}

impl ShardInput {
    /// Number of new tokens, given the model's hidden size.
    pub fn tokens(&self, hidden: usize) -> usize {
        match self {
            Self::Tokens(ids) => ids.len(),
            Self::Hidden(values) => values.len() / hidden.max(1),
        }
    }
}

/// What a shard returns.
#[derive(Debug, Clone, PartialEq)]
pub enum ShardOutput {
    /// Hidden states after the last requested layer, row-major `[tokens, hidden]`.
    Hidden(Vec<f32>),
    /// Logits of the last new token, `[vocab]` (the request ran the final layer).
    Logits(Vec<f32>),
}

/// The parameters of a shard, in a fixed order: embeddings (first shard), layers, final norm and
/// LM head (last shard). Concatenating the shards of a model in layer order gives the whole
/// model's order, which flat parameter and gradient vectors rely on.
#[derive(Module, Debug)]
pub(crate) struct Weights {
    pub(crate) embed: Option<Embedding>,
    pub(crate) layers: Vec<DecoderLayer>,
    pub(crate) final_norm: Option<RmsNorm>,
    pub(crate) lm_head: Option<Linear>,
    /// The LM head's weights held below f32 on the CPU (its `Linear` then holds none).
    #[module(skip)]
    pub(crate) packed_head: Option<std::sync::Arc<crate::precision::Packed>>,
}

/// The layers `[range.start, range.end)` of a model, plus embeddings and head where they belong.
#[derive(Debug)]
pub struct Shard {
    pub(crate) info: ModelInfo,
    pub(crate) range: Range<usize>,
    pub(crate) weights: Weights,
    pub(crate) heads: Heads,
    pub(crate) device: Device,
    /// How the projections are held.
    precision: Precision,
    digests: WeightDigests,
}

/// SHA-256 of the f32 values of each part of a shard, in load order.
#[derive(Debug, Default)]
struct WeightDigests {
    embed: Option<[u8; 32]>,
    layers: Vec<[u8; 32]>,
    head: Option<[u8; 32]>,
}

impl Shard {
    /// Loads layers `range` of the model in `dir` onto `device`.
    pub fn load(dir: &Path, range: Range<usize>, device: &Device) -> Result<Self, ModelError> {
        Self::load_at(dir, range, device, Precision::F32)
    }

    /// Loads layers `range` of the model in `dir` onto `device`, holding the projections at
    /// `precision`.
    pub fn load_at(
        dir: &Path,
        range: Range<usize>,
        device: &Device,
        precision: Precision,
    ) -> Result<Self, ModelError> {
        let info = ModelInfo::read(dir)?;
        check_range(&info.config, &range)?;
        let weights = WeightFiles::open(dir)?;
        Self::build(info, range, device, Source::Files(&weights), precision)
    }

    /// Builds layers `range` of the model `info` describes on `device` from the shard's flat
    /// parameters in load order (what [`Self::parameters`] gives, as a checkpoint carries them),
    /// for a node that fetched its weights from a peer instead of reading them from disk.
    pub fn from_parameters(
        info: ModelInfo,
        range: Range<usize>,
        device: &Device,
        parameters: &[f32],
    ) -> Result<Self, ModelError> {
        Self::from_parameters_at(info, range, device, parameters, Precision::F32)
    }

    /// [`Self::from_parameters`] with the projections held at `precision`.
    pub fn from_parameters_at(
        info: ModelInfo,
        range: Range<usize>,
        device: &Device,
        parameters: &[f32],
        precision: Precision,
    ) -> Result<Self, ModelError> {
        check_range(&info.config, &range)?;
        if let Some(i) = parameters.iter().position(|v| !v.is_finite()) {
            return Err(ModelError::Weights(format!(
                "parameter value {i} is not finite"
            )));
        }
        let tensors = crate::layout::shard_tensors(&info.config, range.clone(), parameters)?
            .into_iter()
            .map(|(name, shape, values)| (name, (shape, values)))
            .collect();
        Self::build(info, range, device, Source::Memory(&tensors), precision)
    }

    fn build(
        info: ModelInfo,
        range: Range<usize>,
        device: &Device,
        weights: Source<'_>,
        precision: Precision,
    ) -> Result<Self, ModelError> {
        let config = &info.config;
        let loader = Loader {
            weights,
            config,
            device,
            precision,
            digest: Default::default(),
        };
        let embed = (range.start == 0).then(|| loader.embedding()).transpose()?;
        let mut digests = WeightDigests {
            embed: embed.as_ref().map(|_| loader.take_digest()),
            ..WeightDigests::default()
        };
        let mut layers = Vec::with_capacity(range.len());
        for i in range.clone() {
            layers.push(loader.layer(i)?);
            digests.layers.push(loader.take_digest());
        }
        let last = range.end == config.num_hidden_layers;
        let final_norm = last.then(|| loader.norm("model.norm.weight")).transpose()?;
        let (lm_head, packed_head) = match last.then(|| loader.lm_head()).transpose()? {
            Some((head, packed)) => (Some(head), packed.map(std::sync::Arc::new)),
            None => (None, None),
        };
        digests.head = last.then(|| loader.take_digest());
        let heads = Heads {
            query: config.num_attention_heads,
            kv: config.kv_heads(),
            dim: config.head_dim(),
        };
        Ok(Self {
            info,
            range,
            weights: Weights {
                embed,
                layers,
                final_norm,
                lm_head,
                packed_head,
            },
            heads,
            device: device.clone(),
            precision,
            digests,
        })
    }

    /// Every parameter as one flat vector in load order: the embeddings, each layer's tensors,
    /// the final norm and the LM head, projections as burn holds them (`[in, out]`).
    pub fn parameters(&self) -> Vec<f32> {
        crate::layout::flatten(&self.weights, None)
    }

    /// The parameters a shard of `layers` (inside this one) would hold, as
    /// [`Self::parameters`] orders them: what [`Self::from_parameters`] builds that shard from.
    /// Refused for a shard held below f32: its values are no longer the checkpoint's.
    pub fn parameters_of(&self, layers: Range<usize>) -> Result<Vec<f32>, ModelError> {
        self.check_inside(&layers)?;
        if self.precision != Precision::F32 {
            return Err(ModelError::Weights(format!(
                "this shard holds its projections as {}, not the checkpoint's values",
                self.precision
            )));
        }
        let w = &self.weights;
        let mut out = Vec::new();
        if layers.start == 0
            && let Some(embed) = &w.embed
        {
            out.extend(crate::layout::flatten(embed, None));
        }
        let local = layers.start - self.range.start..layers.end - self.range.start;
        for layer in &w.layers[local] {
            out.extend(crate::layout::flatten(layer, None));
        }
        if layers.end == self.info.config.num_hidden_layers {
            if let Some(norm) = &w.final_norm {
                out.extend(crate::layout::flatten(norm, None));
            }
            if let Some(head) = &w.lm_head {
                out.extend(crate::layout::flatten(head, None));
            }
        }
        Ok(out)
    }

    fn check_inside(&self, layers: &Range<usize>) -> Result<(), ModelError> {
        let inside = self.range.start <= layers.start && layers.end <= self.range.end;
        if layers.start >= layers.end || !inside {
            return Err(ModelError::LayerRange(format!(
                "layers {}..{} are not inside this shard's {}..{}",
                layers.start, layers.end, self.range.start, self.range.end
            )));
        }
        Ok(())
    }

    /// Number of parameters (the length of [`Self::parameters`]).
    pub fn num_parameters(&self) -> usize {
        self.weights.num_params()
    }

    /// Hash of the weights that running `layers` uses: the embeddings when it starts at layer 0,
    /// each layer's tensors, and the final norm and head when it ends the model, and the
    /// precision they are held at unless f32. Any holder of those layers at that precision
    /// computes the same value, so a requester can check a worker's claim.
    pub fn weights_hash(&self, layers: Range<usize>) -> Result<[u8; 32], ModelError> {
        self.weights_hash_at(layers, self.precision)
    }

    /// [`Self::weights_hash`] as a holder at `precision` reports it (quantizing is
    /// deterministic, so the values are the same for every holder of those layers).
    pub fn weights_hash_at(
        &self,
        layers: Range<usize>,
        precision: Precision,
    ) -> Result<[u8; 32], ModelError> {
        self.check_inside(&layers)?;
        let mut hash = Sha256::new();
        hash.update(b"neuroshard-weights-v1");
        if precision != Precision::F32 {
            hash.update(precision.name());
        }
        if layers.start == 0 {
            hash.update(self.digests.embed.unwrap_or_default());
        }
        for digest in
            &self.digests.layers[layers.start - self.range.start..layers.end - self.range.start]
        {
            hash.update(digest);
        }
        if layers.end == self.info.config.num_hidden_layers {
            hash.update(self.digests.head.unwrap_or_default());
        }
        Ok(hash.finalize().into())
    }

    /// How the projections are held.
    pub fn precision(&self) -> Precision {
        self.precision
    }

    /// How a session's cache holds keys and values on this shard: as the weights' half
    /// precision where they are held below f32 on the CPU (bf16 for int8 weights), and as f32
    /// where they are f32 or on a GPU, whose products on a cache held otherwise would widen it
    /// every step.
    pub fn cache_float(&self) -> DType {
        match self.precision {
            _ if !crate::is_cpu(&self.device) => DType::F32,
            Precision::F32 => DType::F32,
            Precision::Bf16 | Precision::Int8 => DType::BF16,
            Precision::F16 => DType::F16,
        }
    }

    /// Bytes of a session's cache one position takes in one layer on this shard.
    pub fn kv_bytes_per_token_layer(&self) -> usize {
        let value = self.cache_float().size();
        self.info.config.kv_bytes_per_token_layer(value)
    }

    /// The model this shard belongs to.
    pub fn info(&self) -> &ModelInfo {
        &self.info
    }

    /// The device the shard computes on.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// The layers this shard holds.
    pub fn range(&self) -> Range<usize> {
        self.range.clone()
    }

    /// Runs a short prefill and one decode step over every layer on a scratch cache. A GPU
    /// compiles its kernels on first use, which takes longer than a caller's deadline; warmed
    /// up at load, the first real call runs at speed.
    pub fn warm_up(&self) -> Result<(), ModelError> {
        const PREFILL: usize = 8;
        let hidden = self.info.config.hidden_size;
        let input = |tokens: usize| match self.range.start {
            0 => ShardInput::Tokens(vec![1; tokens]),
            _ => ShardInput::Hidden(vec![0.0; tokens * hidden]),
        };
        let mut cache = KvCache::new();
        self.forward(&mut cache, 0, self.range(), input(PREFILL))?;
        self.forward(&mut cache, PREFILL, self.range(), input(1))?;
        Ok(())
    }

    /// Runs `layers` (absolute indices inside [`Self::range`]) on the new tokens at `start_pos`.
    ///
    /// The cache must hold exactly `start_pos` positions for each of those layers; a cache that
    /// holds more is cut back first, so a retried call is idempotent.
    pub fn forward(
        &self,
        cache: &mut KvCache,
        start_pos: usize,
        layers: Range<usize>,
        input: ShardInput,
    ) -> Result<ShardOutput, ModelError> {
        let config = &self.info.config;
        self.check_request(&layers, &input)?;
        let tokens = input.tokens(config.hidden_size);
        if start_pos.saturating_add(tokens) > config.max_positions() {
            return Err(ModelError::Request(format!(
                "positions {start_pos}..{} exceed the model's {} (max_position_embeddings)",
                start_pos.saturating_add(tokens),
                config.max_positions()
            )));
        }
        let hidden = self.hidden_states(cache, start_pos, layers.clone(), input, tokens)?;
        if layers.end == config.num_hidden_layers {
            let last = hidden.narrow(1, tokens - 1, 1);
            return Ok(ShardOutput::Logits(to_vec(self.logits(last))));
        }
        Ok(ShardOutput::Hidden(to_vec(hidden)))
    }

    /// The `[1, tokens, hidden]` states after `layers` of a checked request of `tokens` new
    /// tokens at `start_pos`, extending `cache`.
    fn hidden_states(
        &self,
        cache: &mut KvCache,
        start_pos: usize,
        layers: Range<usize>,
        input: ShardInput,
        tokens: usize,
    ) -> Result<Tensor<3>, ModelError> {
        cache.prepare(layers.clone(), start_pos)?;
        let mut hidden = self.embed_input(input, tokens)?;
        let context = Positions::new(&self.info.config, start_pos, tokens, &self.device);
        for index in layers {
            let layer = &self.weights.layers[index - self.range.start];
            let entry = cache.layer_mut(index, self.cache_float());
            hidden = layer.forward(hidden, Some(entry), &context, index, self.heads);
        }
        Ok(hidden)
    }

    /// Final norm and LM head: `[1, n, hidden]` → `[1, n, vocab]`. Only on the last shard.
    pub(crate) fn logits(&self, hidden: Tensor<3>) -> Tensor<3> {
        let norm = self.weights.final_norm.as_ref();
        let head = self.weights.lm_head.as_ref();
        let (norm, head) = norm
            .zip(head)
            .expect("the last shard has a final norm and head");
        match &self.weights.packed_head {
            Some(packed) => packed.apply(norm.forward(hidden), None),
            None => crate::precision::project(head, norm.forward(hidden)),
        }
    }

    pub(crate) fn check_request(
        &self,
        layers: &Range<usize>,
        input: &ShardInput,
    ) -> Result<(), ModelError> {
        let hidden = self.info.config.hidden_size;
        if layers.start >= layers.end
            || layers.start < self.range.start
            || layers.end > self.range.end
        {
            return Err(ModelError::LayerRange(format!(
                "layers {}..{} are not inside this shard's {}..{}",
                layers.start, layers.end, self.range.start, self.range.end
            )));
        }
        match input {
            ShardInput::Tokens(ids) => {
                if layers.start != 0 {
                    return Err(ModelError::Request(format!(
                        "token ids can only enter at layer 0, not layer {}",
                        layers.start
                    )));
                }
                if ids.is_empty() {
                    return Err(ModelError::Request("no token ids".into()));
                }
                let vocab = self.info.config.vocab_size;
                if let Some(bad) = ids.iter().find(|&&id| id as usize >= vocab) {
                    return Err(ModelError::Request(format!(
                        "token id {bad} is outside the vocabulary of {vocab}"
                    )));
                }
            }
            ShardInput::Hidden(values) => {
                if layers.start == 0 {
                    return Err(ModelError::Request(
                        "layer 0 takes token ids, not hidden states".into(),
                    ));
                }
                if values.is_empty() || values.len() % hidden != 0 {
                    return Err(ModelError::Request(format!(
                        "hidden states of {} values are not a whole number of {hidden}-wide rows",
                        values.len()
                    )));
                }
            }
        }
        Ok(())
    }

    /// Input as `[1, tokens, hidden]`.
    pub(crate) fn embed_input(
        &self,
        input: ShardInput,
        tokens: usize,
    ) -> Result<Tensor<3>, ModelError> {
        let hidden = self.info.config.hidden_size;
        match input {
            ShardInput::Tokens(ids) => {
                let embed = self.weights.embed.as_ref().ok_or_else(|| {
                    ModelError::LayerRange("this shard does not hold the embeddings".into())
                })?;
                let ids: Vec<i64> = ids.iter().map(|&id| id as i64).collect();
                let ids =
                    Tensor::<2, Int>::from_data(TensorData::new(ids, [1, tokens]), &self.device);
                Ok(embed.forward(ids))
            }
            ShardInput::Hidden(values) => Ok(Tensor::from_data(
                TensorData::new(values, [1, tokens, hidden]),
                &self.device,
            )),
        }
    }
}

/// Whether `range` is a non-empty part of the model's layers.
fn check_range(config: &LlamaConfig, range: &Range<usize>) -> Result<(), ModelError> {
    if range.start >= range.end || range.end > config.num_hidden_layers {
        return Err(ModelError::LayerRange(format!(
            "layers {}..{} are not a non-empty part of the model's 0..{}",
            range.start, range.end, config.num_hidden_layers
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::init::{ModelSpec, write_model};

    fn tiny_model() -> (tempfile::TempDir, Device) {
        let dir = tempfile::tempdir().unwrap();
        write_model(dir.path(), &ModelSpec::tiny()).unwrap();
        (dir, Device::default())
    }

    fn logits(out: ShardOutput) -> Vec<f32> {
        match out {
            ShardOutput::Logits(l) => l,
            ShardOutput::Hidden(_) => panic!("expected logits"),
        }
    }

    fn hidden(out: ShardOutput) -> Vec<f32> {
        match out {
            ShardOutput::Hidden(h) => h,
            ShardOutput::Logits(_) => panic!("expected hidden states"),
        }
    }

    fn max_diff(a: &[f32], b: &[f32]) -> f32 {
        assert_eq!(a.len(), b.len());
        a.iter()
            .zip(b)
            .map(|(x, y)| (x - y).abs())
            .fold(0.0, f32::max)
    }

    #[test]
    fn split_shards_match_the_whole_model() {
        let (dir, device) = tiny_model();
        let whole = Shard::load(dir.path(), 0..4, &device).unwrap();
        let front = Shard::load(dir.path(), 0..2, &device).unwrap();
        let back = Shard::load(dir.path(), 2..4, &device).unwrap();
        let prompt = ShardInput::Tokens(vec![72, 101, 108, 108, 111]);
        let expected = logits(
            whole
                .forward(&mut KvCache::new(), 0, 0..4, prompt.clone())
                .unwrap(),
        );
        let mid = hidden(
            front
                .forward(&mut KvCache::new(), 0, 0..2, prompt.clone())
                .unwrap(),
        );
        assert_eq!(mid.len(), 5 * 64);
        let got = logits(
            back.forward(&mut KvCache::new(), 0, 2..4, ShardInput::Hidden(mid))
                .unwrap(),
        );
        assert_eq!(got.len(), crate::BYTE_VOCAB);
        assert!(max_diff(&expected, &got) < 1e-5);
    }

    #[test]
    fn a_shard_built_from_another_shards_parameters_is_the_same_shard() {
        let device = Device::default();
        for tie in [false, true] {
            let dir = tempfile::tempdir().unwrap();
            let spec = ModelSpec {
                tie_embeddings: tie,
                ..ModelSpec::tiny()
            };
            write_model(dir.path(), &spec).unwrap();
            let whole = Shard::load(dir.path(), 0..4, &device).unwrap();
            assert_eq!(whole.parameters().len(), whole.num_parameters());
            let info = || ModelInfo::with_id(dir.path(), &whole.info().id).unwrap();
            for part in [0..2, 1..3, 2..4, 0..4] {
                let values = whole.parameters_of(part.clone()).unwrap();
                assert_eq!(
                    values.len(),
                    crate::init::shard_parameter_count(&whole.info().config, part.clone())
                );
                let built = Shard::from_parameters(info(), part.clone(), &device, &values).unwrap();
                assert_eq!(built.parameters(), values, "tied {tie}, layers {part:?}");
                assert_eq!(
                    built.weights_hash(part.clone()).unwrap(),
                    whole.weights_hash(part.clone()).unwrap(),
                    "tied {tie}, layers {part:?}"
                );
            }
            let built = Shard::from_parameters(info(), 0..4, &device, &whole.parameters()).unwrap();
            let prompt = ShardInput::Tokens(vec![72, 101, 108, 108, 111]);
            let run = |s: &Shard| {
                logits(
                    s.forward(&mut KvCache::new(), 0, 0..4, prompt.clone())
                        .unwrap(),
                )
            };
            assert_eq!(run(&built), run(&whole));
        }
        let (dir, device) = tiny_model();
        let front = Shard::load(dir.path(), 0..2, &device).unwrap();
        let info = ModelInfo::with_id(dir.path(), "x").unwrap();
        let mut values = front.parameters();
        let e = Shard::from_parameters(info.clone(), 0..2, &device, &values[1..]).unwrap_err();
        assert!(
            e.to_string().contains("parameter values for layers 0..2"),
            "{e}"
        );
        values[7] = f32::NAN;
        let e = Shard::from_parameters(info.clone(), 0..2, &device, &values).unwrap_err();
        assert!(
            e.to_string().contains("parameter value 7 is not finite"),
            "{e}"
        );
        let e = Shard::from_parameters(info, 3..9, &device, &values).unwrap_err();
        assert!(e.to_string().contains("layers 3..9"), "{e}");
        let e = front.parameters_of(1..3).unwrap_err();
        assert!(
            e.to_string().contains("not inside this shard's 0..2"),
            "{e}"
        );
    }

    #[test]
    fn cached_decoding_matches_a_full_prefill() {
        let (dir, device) = tiny_model();
        let shard = Shard::load(dir.path(), 0..4, &device).unwrap();
        let ids = vec![3, 14, 15, 92, 65, 35];
        let full = logits(
            shard
                .forward(
                    &mut KvCache::new(),
                    0,
                    0..4,
                    ShardInput::Tokens(ids.clone()),
                )
                .unwrap(),
        );
        let mut cache = KvCache::new();
        shard
            .forward(&mut cache, 0, 0..4, ShardInput::Tokens(ids[..4].to_vec()))
            .unwrap();
        shard
            .forward(&mut cache, 4, 0..4, ShardInput::Tokens(vec![ids[4]]))
            .unwrap();
        let step = logits(
            shard
                .forward(&mut cache, 5, 0..4, ShardInput::Tokens(vec![ids[5]]))
                .unwrap(),
        );
        assert!(max_diff(&full, &step) < 1e-4, "{}", max_diff(&full, &step));
        assert_eq!(cache.len(3), 6);
        // A replayed call at an earlier position cuts the cache back and gives the same result.
        let again = logits(
            shard
                .forward(&mut cache, 5, 0..4, ShardInput::Tokens(vec![ids[5]]))
                .unwrap(),
        );
        assert_eq!(step, again);
    }

    #[test]
    fn rejects_gaps_wrong_layers_and_bad_inputs() {
        let (dir, device) = tiny_model();
        let shard = Shard::load(dir.path(), 0..2, &device).unwrap();
        let mut cache = KvCache::new();
        let one = ShardInput::Tokens(vec![1]);
        let err = shard.forward(&mut cache, 3, 0..2, one.clone()).unwrap_err();
        assert!(
            matches!(
                err,
                ModelError::PositionGap {
                    held: 0,
                    start: 3,
                    ..
                }
            ),
            "{err}"
        );
        let err = shard.forward(&mut cache, 0, 1..3, one.clone()).unwrap_err();
        assert!(matches!(err, ModelError::LayerRange(_)), "{err}");
        let err = shard
            .forward(&mut cache, 0, 0..2, ShardInput::Tokens(vec![9999]))
            .unwrap_err();
        assert!(err.to_string().contains("9999"), "{err}");
        let err = shard
            .forward(&mut cache, 0, 0..2, ShardInput::Hidden(vec![0.0; 64]))
            .unwrap_err();
        assert!(matches!(err, ModelError::Request(_)), "{err}");
        assert!(cache.is_empty());
    }

    #[test]
    fn weight_hashes_agree_across_shards_and_tell_models_apart() {
        let device = Device::default();
        let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        write_model(a.path(), &ModelSpec::tiny()).unwrap();
        write_model(
            b.path(),
            &ModelSpec {
                seed: 9,
                ..ModelSpec::tiny()
            },
        )
        .unwrap();
        let whole = Shard::load(a.path(), 0..4, &device).unwrap();
        let part = Shard::load(a.path(), 1..4, &device).unwrap();
        let other = Shard::load(b.path(), 1..4, &device).unwrap();
        for range in [1..3, 2..4, 3..4] {
            assert_eq!(
                whole.weights_hash(range.clone()).unwrap(),
                part.weights_hash(range.clone()).unwrap()
            );
            assert_ne!(
                part.weights_hash(range.clone()).unwrap(),
                other.weights_hash(range).unwrap()
            );
        }
        assert_ne!(
            whole.weights_hash(0..2).unwrap(),
            whole.weights_hash(1..2).unwrap()
        );
        assert!(part.weights_hash(0..2).is_err());
    }

    #[test]
    fn flops_grow_with_layers_tokens_and_context() {
        let config = ModelSpec::tiny().config();
        let one = config.forward_flops(1..2, 0, 1);
        assert!(one > 0);
        assert_eq!(config.forward_flops(1..3, 0, 1), 2 * one);
        assert!(config.forward_flops(1..2, 100, 1) > one);
        assert!(
            config.forward_flops(3..4, 0, 1) > one,
            "the last shard runs the head"
        );
    }

    #[test]
    fn loads_half_precision_weights() {
        let device = Device::default();
        let f32_dir = tempfile::tempdir().unwrap();
        let bf16_dir = tempfile::tempdir().unwrap();
        let spec = ModelSpec::tiny();
        write_model(f32_dir.path(), &spec).unwrap();
        write_model(
            bf16_dir.path(),
            &ModelSpec {
                dtype: crate::codec::WireDType::BF16,
                files: 3,
                ..spec
            },
        )
        .unwrap();
        let prompt = ShardInput::Tokens(vec![5, 6, 7]);
        let a = logits(
            Shard::load(f32_dir.path(), 0..4, &device)
                .unwrap()
                .forward(&mut KvCache::new(), 0, 0..4, prompt.clone())
                .unwrap(),
        );
        let b = logits(
            Shard::load(bf16_dir.path(), 0..4, &device)
                .unwrap()
                .forward(&mut KvCache::new(), 0, 0..4, prompt.clone())
                .unwrap(),
        );
        let spread = a.iter().fold(0f32, |m, v| m.max(v.abs()));
        assert!(
            max_diff(&a, &b) < 0.05 * spread,
            "{} vs spread {spread}",
            max_diff(&a, &b)
        );
    }

    #[test]
    fn rejects_a_config_that_disagrees_with_the_tensors() {
        let (dir, device) = tiny_model();
        let path = dir.path().join("config.json");
        let text = std::fs::read_to_string(&path).unwrap();
        std::fs::write(
            &path,
            text.replace("\"intermediate_size\": 160", "\"intermediate_size\": 192"),
        )
        .unwrap();
        let err = Shard::load(dir.path(), 0..2, &device)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("mlp.gate_proj.weight") && err.contains("[192, 64]"),
            "{err}"
        );
        std::fs::write(
            &path,
            text.replace("\"num_hidden_layers\": 4", "\"num_hidden_layers\": 5"),
        )
        .unwrap();
        let err = Shard::load(dir.path(), 3..5, &device)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("model.layers.4") && err.contains("missing"),
            "{err}"
        );
    }
}
