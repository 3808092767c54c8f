//! The models the swarm serves, as the model picker and the chat page show them, and where to
//! fetch a chosen model's layers from: pure functions over the peers the tracker or the DHT
//! list.

use std::collections::BTreeMap;

use neuroshard_base::LayerRange;
use neuroshard_model::LlamaConfig;
use neuroshard_node::convert::PeerRecord;
use serde::Serialize;

/// A model the swarm announces.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SwarmModel {
    /// Its content id.
    pub id: String,
    /// Layers of the whole model.
    pub total_layers: u32,
    /// Providers of each layer.
    pub coverage: Vec<u32>,
    /// Nodes serving some of it.
    pub providers: usize,
    /// Whether every layer has a provider, so it can answer end to end now.
    pub complete: bool,
    /// What its config says, once read from a peer or from disk.
    pub about: Option<ModelAbout>,
}

/// What a model's `config.json` says, for people.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ModelAbout {
    /// `llama`, `mistral`, `qwen2`, `qwen3`.
    pub family: String,
    /// Parameters in all.
    pub parameters: u64,
    /// Width of the residual stream.
    pub hidden_size: usize,
    /// Longest sequence.
    pub context: usize,
}

impl ModelAbout {
    /// From the model's config.
    pub fn of(config: &LlamaConfig) -> Self {
        let layers = config.num_hidden_layers;
        Self {
            family: format!("{:?}", config.family).to_lowercase(),
            parameters: neuroshard_model::init::shard_parameter_count(config, 0..layers) as u64,
            hidden_size: config.hidden_size,
            context: config.max_positions(),
        }
    }
}

/// The models `peers` serve, the most provided first (ties by id).
pub fn swarm_models(peers: &[PeerRecord]) -> Vec<SwarmModel> {
    let mut by_model: BTreeMap<&str, Vec<&PeerRecord>> = BTreeMap::new();
    for peer in peers {
        by_model.entry(&peer.model_id).or_default().push(peer);
    }
    let mut models: Vec<SwarmModel> = by_model
        .into_iter()
        .map(|(id, serving)| {
            // The layer count most of its peers announce (a peer may lie).
            let mut counts: BTreeMap<u32, usize> = BTreeMap::new();
            for p in &serving {
                *counts.entry(p.total_layers).or_default() += 1;
            }
            let total = counts
                .into_iter()
                .max_by_key(|&(_, n)| n)
                .map_or(0, |(t, _)| t);
            let coverage = crate::layers::coverage(peers, id, total);
            SwarmModel {
                id: id.to_string(),
                total_layers: total,
                complete: total > 0 && coverage.iter().all(|&c| c > 0),
                coverage,
                providers: serving.len(),
                about: None,
            }
        })
        .collect();
    models.sort_by(|a, b| b.providers.cmp(&a.providers).then(a.id.cmp(&b.id)));
    models
}

/// Where to fetch `range` of `model_id` from: consecutive pieces, each from a peer serving it,
/// as few as can be (at each layer, the peer whose range reaches furthest; direct peers before
/// relayed ones). The error names the first layer no peer serves.
pub fn sources(
    peers: &[PeerRecord],
    model_id: &str,
    range: LayerRange,
) -> Result<Vec<(String, LayerRange)>, String> {
    let mut pieces = Vec::new();
    let mut at = range.start;
    while at < range.end {
        let best = peers
            .iter()
            .filter(|p| p.model_id == model_id && p.layers.start <= at && p.layers.end > at)
            .max_by_key(|p| (p.layers.end.min(range.end), !p.is_relayed()))
            .ok_or_else(|| format!("no peer serves layer {at} of model {model_id}"))?;
        let end = best.layers.end.min(range.end);
        pieces.push((
            best.addr.clone(),
            LayerRange::new(at, end).expect("at < end"),
        ));
        at = end;
    }
    Ok(pieces)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peer(model: &str, start: u32, end: u32, total: u32) -> PeerRecord {
        let key = neuroshard_base::NodeKey::generate();
        PeerRecord {
            node_id: key.id().to_string(),
            addr: format!("10.0.0.{start}:{end}"),
            model_id: model.into(),
            layers: LayerRange::new(start, end).unwrap(),
            total_layers: total,
            load: 0.0,
            public_key: key.public(),
            display_name: String::new(),
            relay: String::new(),
        }
    }

    #[test]
    fn models_are_grouped_with_their_coverage() {
        let peers = [
            peer("aa", 0, 4, 8),
            peer("aa", 4, 8, 8),
            peer("aa", 2, 6, 8),
            peer("bb", 0, 3, 6),
        ];
        let models = swarm_models(&peers);
        assert_eq!(models.len(), 2);
        assert_eq!(models[0].id, "aa");
        assert_eq!(models[0].coverage, [1, 1, 2, 2, 2, 2, 1, 1]);
        assert!(models[0].complete);
        assert_eq!(models[1].coverage, [1, 1, 1, 0, 0, 0]);
        assert!(!models[1].complete, "layers 3..6 have no provider");
    }

    #[test]
    fn a_range_is_fetched_in_as_few_pieces_as_its_providers_allow() {
        let peers = [
            peer("aa", 0, 3, 8),
            peer("aa", 0, 5, 8),
            peer("aa", 4, 8, 8),
            peer("bb", 0, 8, 8),
        ];
        let got = sources(&peers, "aa", LayerRange::new(1, 7).unwrap()).unwrap();
        let ranges: Vec<String> = got.iter().map(|(_, r)| r.to_string()).collect();
        assert_eq!(ranges, ["1..5", "5..7"]);
        assert_eq!(got[0].0, "10.0.0.0:5");
        let e = sources(&peers[..2], "aa", LayerRange::new(2, 8).unwrap()).unwrap_err();
        assert_eq!(e, "no peer serves layer 5 of model aa");
    }
}
