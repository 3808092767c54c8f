//! The key/value cache of one inference session on one node.

use std::collections::BTreeMap;
use std::ops::Range;

use burn::tensor::Tensor;

use crate::ModelError;

/// Keys and values `[1, kv_heads, positions, head_dim]` of one layer.
pub type LayerKv = Option<(Tensor<4>, Tensor<4>)>;

#[derive(Debug, Default)]
struct LayerCache {
    kv: LayerKv,
    len: usize,
}

/// Per-layer keys and values of one session, with how many positions each layer holds.
#[derive(Debug, Default)]
pub struct KvCache {
    layers: BTreeMap<usize, LayerCache>,
}

impl KvCache {
    /// An empty cache.
    pub fn new() -> Self {
        Self::default()
    }

    /// Positions held by `layer` (0 if it was never run).
    pub fn len(&self, layer: usize) -> usize {
        self.layers.get(&layer).map_or(0, |l| l.len)
    }

    /// Whether no layer holds any position.
    pub fn is_empty(&self) -> bool {
        self.layers.values().all(|l| l.len == 0)
    }

    /// Positions summed over layers: what the cache's memory grows with.
    pub fn token_layers(&self) -> usize {
        self.layers.values().map(|l| l.len).sum()
    }

    /// Readies `layers` to take new tokens at `start_pos`: a gap is an error, and a cache that
    /// already holds positions at or past `start_pos` is cut back to it (a replayed call).
    pub fn prepare(&mut self, layers: Range<usize>, start_pos: usize) -> Result<(), ModelError> {
        if let Some(layer) = layers.clone().find(|&l| self.len(l) < start_pos) {
            return Err(ModelError::PositionGap {
                layer,
                held: self.len(layer),
                start: start_pos,
            });
        }
        for layer in layers {
            let entry = self.layers.entry(layer).or_default();
            if entry.len > start_pos {
                entry.kv = match entry.kv.take() {
                    Some((k, v)) if start_pos > 0 => {
                        Some((k.narrow(2, 0, start_pos), v.narrow(2, 0, start_pos)))
                    }
                    _ => None,
                };
                entry.len = start_pos;
            }
        }
        Ok(())
    }

    /// The cached keys and values of `layer`, for the layer to read and extend.
    pub fn layer_mut(&mut self, layer: usize) -> &mut LayerKv {
        &mut self.layers.entry(layer).or_default().kv
    }

    /// Records that `layers` now hold `tokens` more positions.
    pub fn advance(&mut self, layers: Range<usize>, tokens: usize) {
        for layer in layers {
            self.layers.entry(layer).or_default().len += tokens;
        }
    }
}
