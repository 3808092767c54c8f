//! The model the app serves: the swarm's models as the model picker and the chat page show
//! them, where to fetch a chosen model's layers from (pure functions over the peers the tracker
//! or the DHT list), and making the chosen model the served one (fetching its files and layers
//! with progress in the status), or the shipped demo model by default.

use neuroshard_base::sync::LockExt;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use neuroshard_base::LayerRange;
use neuroshard_client::checkpoint;
use neuroshard_model::fetched::{self, FetchedModel};
use neuroshard_model::{LlamaConfig, ModelInfo};
use neuroshard_net::convert::PeerRecord;
use neuroshard_settings::{ModelChoice, Settings};
use serde::Serialize;

use crate::desktop::Desktop;
use crate::error::{CommandError, model_error};
use crate::launch::Launch;
use crate::layers::LayerPlan;
use crate::status::FetchStatus;

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

/// A layer of a model that no known peer serves.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("no peer serves layer {layer} of model {model_id}")]
pub struct Unserved {
    /// The first layer nobody serves.
    pub layer: u32,
    /// The model.
    pub model_id: String,
}

/// Where to fetch `range` of `model_id` from: consecutive pieces, each from a peer serving it,
/// as few as can be (at each layer, the peer whose range reaches furthest; direct peers before
/// relayed ones). The error names the first layer no peer serves.
pub fn sources(
    peers: &[PeerRecord],
    model_id: &str,
    range: LayerRange,
) -> Result<Vec<(String, LayerRange)>, Unserved> {
    let mut pieces = Vec::new();
    let mut at = range.start;
    while at < range.end {
        let best = peers
            .iter()
            .filter(|p| p.model_id == model_id && p.layers.start <= at && p.layers.end > at)
            .max_by_key(|p| (p.layers.end.min(range.end), !p.is_relayed()))
            .ok_or_else(|| Unserved {
                layer: at,
                model_id: model_id.to_string(),
            })?;
        let end = best.layers.end.min(range.end);
        pieces.push((
            best.addr.clone(),
            LayerRange::new(at, end).expect("at < end"),
        ));
        at = end;
    }
    Ok(pieces)
}

impl Desktop {
    /// The peers serving `model_id` (every model: none) that the tracker lists, else those the
    /// running node found through the DHT.
    pub(crate) async fn swarm_peers(
        &self,
        settings: &Settings,
        model_id: Option<&str>,
    ) -> Vec<PeerRecord> {
        let mut peers = match self.node.read().await.as_ref() {
            Some(node) => node.known_peers(),
            None => Vec::new(),
        };
        if let Some(url) = &settings.network.tracker {
            match neuroshard_client::tracker_client(url) {
                Ok(client) => match neuroshard_client::list_peers(client, url, model_id).await {
                    Ok(list) => peers = list,
                    Err(e) => tracing::warn!("the swarm's peers from the tracker unknown: {e}"),
                },
                Err(e) => tracing::warn!("the swarm's peers unknown: {e}"),
            }
        }
        if let Some(id) = model_id {
            peers.retain(|p| p.model_id == id);
        }
        peers
    }

    /// Makes the model the settings choose the one served and plans its layers: a local
    /// directory is read; a swarm model's small files and planned layers are fetched from its
    /// peers (with progress in the status) unless they are on disk from before.
    pub(crate) async fn prepare(&self, settings: &Settings) -> Result<LayerPlan, CommandError> {
        let dir = model_dir(&self.launch, &self.default_dir, &settings.model);
        let swarm_id = match &settings.model {
            ModelChoice::Swarm { id } => Some(id.clone()),
            _ => None,
        };
        let peers = match &swarm_id {
            Some(id) => self.swarm_peers(settings, Some(id)).await,
            None => Vec::new(),
        };
        if let Some(id) = &swarm_id
            && FetchedModel::read(&dir)
                .ok()
                .flatten()
                .is_none_or(|f| &f.model_id != id)
        {
            let peer = peers
                .iter()
                .find(|p| !p.is_relayed())
                .or(peers.first())
                .ok_or_else(|| model_error(format!("no peer serves model {id} now")))?;
            self.make_room(settings, id, 0).await?;
            self.set_fetch(Some(FetchStatus {
                model_id: id.clone(),
                layers: None,
                done_bytes: 0,
                total_bytes: 0,
            }));
            let fetched = checkpoint::fetch_model_files(&peer.addr, id, &dir).await;
            self.set_fetch(None);
            fetched.map_err(|e| model_error(format!("fetching model {id}: {e}")))?;
        }
        let model = ModelInfo::read(&dir).map_err(|e| CommandError {
            field: matches!(settings.model, ModelChoice::Local { .. }).then(|| "model.dir".into()),
            ..model_error(format!("{}: {e}", dir.display()))
        })?;
        let switched = model.id != self.model().id;
        *self.model.lock_or_recover() = model.clone();
        if swarm_id.is_some() {
            crate::storage::mark_used(&dir, neuroshard_net::now_ms());
        }
        if switched {
            self.chats.model_changed().await;
        }
        let plan = self.plan_layers(settings.layers).await?;
        if swarm_id.is_some() {
            self.fetch_layers(&model, &peers, plan.range).await?;
        }
        Ok(plan)
    }

    /// Fetches the weights of `range` of the swarm model `model` from `peers` and keeps them,
    /// unless they are on disk already.
    pub(crate) async fn fetch_layers(
        &self,
        model: &ModelInfo,
        peers: &[PeerRecord],
        range: LayerRange,
    ) -> Result<(), CommandError> {
        match fetched::load_shard(&model.dir, &model.config, range.to_range()) {
            Ok(Some(_)) => return Ok(()),
            Ok(None) => {}
            Err(e) => tracing::warn!("fetching the layers again: {e}"),
        }
        let sources = crate::models::sources(peers, &model.id, range)
            .map_err(|e| model_error(e.to_string()))?;
        let mut status = FetchStatus {
            model_id: model.id.clone(),
            layers: Some(range),
            done_bytes: 0,
            total_bytes: 4 * neuroshard_model::init::shard_parameter_count(
                &model.config,
                range.to_range(),
            ) as u64,
        };
        self.make_room(&self.settings(), &model.id, status.total_bytes)
            .await?;
        self.set_fetch(Some(status.clone()));
        let fetched = checkpoint::fetch_layers(&sources, model, |p| {
            status.done_bytes = p.done;
            status.total_bytes = p.total;
            self.set_fetch(Some(status.clone()));
        })
        .await;
        self.set_fetch(None);
        let (parameters, report) = fetched.map_err(|e| {
            model_error(format!(
                "fetching layers {range} of model {}: {e}",
                model.id
            ))
        })?;
        tracing::info!(
            "fetched layers {range} of model {} ({} bytes in {} requests)",
            model.id,
            report.total_bytes,
            report.requests
        );
        let dir = model.dir.clone();
        let id = model.id.clone();
        tokio::task::spawn_blocking(move || {
            fetched::save_shard(&dir, &id, range.to_range(), &parameters)
        })
        .await
        .map_err(|e| model_error(e.to_string()))?
        .map_err(|e| model_error(format!("keeping the fetched layers: {e}")))?;
        self.notify(crate::notices::Notice::layers_fetched(&model.id, range));
        Ok(())
    }

    /// Makes room under the disk cap for `need` more bytes of model `fetching`, removing the
    /// models used longest ago but never it, the model chosen, nor the one the running node
    /// still serves (it goes on serving while a new model comes); refused, naming the cap,
    /// where that cannot make room.
    async fn make_room(
        &self,
        settings: &Settings,
        fetching: &str,
        need: u64,
    ) -> Result<(), CommandError> {
        let chosen = self.model().id;
        let running = self
            .node
            .read()
            .await
            .as_ref()
            .map(|n| n.model_id().to_string());
        let mut keep = vec![chosen.as_str(), fetching];
        keep.extend(running.as_deref());
        let cap = settings.storage.cap_bytes();
        crate::storage::make_room(&self.launch.data_dir, &keep, need, cap)
            .map(drop)
            .map_err(|message| CommandError {
                code: "invalid_setting",
                message,
                field: Some("storage.cap_mib".into()),
            })
    }

    /// What the app keeps on disk against the cap.
    pub fn storage_usage(&self) -> crate::storage::Usage {
        let cap = self.settings().storage.cap_bytes();
        crate::storage::usage(&self.launch.data_dir, cap)
    }

    /// Shows a fetch's progress at once, between the status refreshes.
    fn set_fetch(&self, fetch: Option<FetchStatus>) {
        *self.fetch.lock_or_recover() = fetch.clone();
        self.status.send_if_modified(|status| {
            let changed = status.fetch != fetch;
            status.fetch = fetch;
            changed
        });
    }
}

/// The shipped trained demo model under the data dir, written the first time (and again over
/// a damaged copy, or an older demo model an earlier version wrote there).
pub(crate) async fn demo_model(data_dir: &Path) -> Result<PathBuf, CommandError> {
    let dir = data_dir.join("models").join("demo");
    let shipped = neuroshard_model::init::DEMO_MODEL_FILES;
    let current = shipped
        .iter()
        .all(|(name, bytes)| std::fs::read(dir.join(name)).is_ok_and(|b| b == *bytes));
    if current {
        return Ok(dir);
    }
    let target = dir.clone();
    tokio::task::spawn_blocking(move || {
        // Weights files of an older demo model would be read beside the new ones.
        if let Ok(entries) = std::fs::read_dir(&target) {
            for entry in entries.flatten() {
                if entry.path().extension().is_some_and(|e| e == "safetensors") {
                    let _ = std::fs::remove_file(entry.path());
                }
            }
        }
        neuroshard_model::init::write_demo_model(&target)
    })
    .await
    .map_err(|e| CommandError::new("model", e.to_string()))?
    .map_err(|e| CommandError::new("model", format!("writing the demo model: {e}")))?;
    Ok(dir)
}

/// Where the model `choice` names lives: the default model's directory, a local one, or the
/// swarm model's under the data dir (named by its id, which the settings checked is hex).
pub(crate) fn model_dir(launch: &Launch, default_dir: &Path, choice: &ModelChoice) -> PathBuf {
    match choice {
        ModelChoice::Demo => default_dir.to_path_buf(),
        ModelChoice::Local { dir } => dir.clone(),
        ModelChoice::Swarm { id } => launch.data_dir.join("models").join(id),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peer(model: &str, start: u32, end: u32, total: u32) -> PeerRecord {
        let key = neuroshard_base::NodeKey::generate();
        PeerRecord {
            node_id: key.id(),
            addr: format!("10.0.0.{start}:{end}"),
            model_id: model.into(),
            layers: LayerRange::new(start, end).unwrap(),
            total_layers: total,
            load: 0.0,
            public_key: key.public(),
            display_name: String::new(),
            relay: String::new(),
            precision: Default::default(),
            decode_ms_per_layer: 0.0,
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
        assert_eq!(e.layer, 5);
        assert_eq!(e.to_string(), "no peer serves layer 5 of model aa");
    }
}
