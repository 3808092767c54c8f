//! The tracker's logic, fed `now`: live nodes indexed so that no call walks all of them
//! (expiry in order of silence, listings per model and layer count), registrations capped per
//! address, announced addresses checked against where they came from, and each model's layer
//! count the one most addresses agree on rather than its first registrant's.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use neuroshard_base::NodeId;
use neuroshard_net::NodeError;
use neuroshard_net::convert::PeerRecord;
use tokio::time::Instant;

use super::{MAX_LISTED_PEERS, TrackerConfig};

#[derive(Debug)]
struct Tracked {
    record: PeerRecord,
    last_seen: Instant,
    /// The address it registered from (`None`: unknown, as for calls made in process).
    source: Option<IpAddr>,
}

/// A model's live nodes claiming one layer count: how many, and from how many addresses.
#[derive(Debug, Default)]
struct Claim {
    nodes: usize,
    per_source: HashMap<Option<IpAddr>, usize>,
}

/// Where a live node is filed: its model and layer count, then its first layer.
type Shelf = (String, u32);

/// Live nodes and request counts; all methods take `now`.
#[derive(Debug)]
pub struct TrackerState {
    nodes: HashMap<NodeId, Tracked>,
    /// Live nodes by when they were last heard from, the most silent first.
    by_age: BTreeSet<(Instant, NodeId)>,
    /// Live nodes by model and layer count, in order of first layer.
    shelves: HashMap<Shelf, BTreeSet<(u32, NodeId)>>,
    /// Per model, the layer counts its live nodes claim.
    claims: HashMap<String, BTreeMap<u32, Claim>>,
    /// Live nodes per address they registered from.
    per_source: HashMap<IpAddr, usize>,
    requests: u64,
    timeout: Duration,
    max_peers: usize,
    max_nodes: usize,
    max_per_ip: usize,
    clone_warnings: u64,
}

/// Tracker-wide figures.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct TrackerStats {
    /// Live nodes.
    pub nodes: u64,
    /// Per model: layers with at least one live node.
    pub layers_covered: BTreeMap<String, u32>,
    /// Per model: its layer count.
    pub total_layers: BTreeMap<String, u32>,
    /// Requests served.
    pub requests: u64,
    /// Registrations of an id live at another address.
    pub clone_warnings: u64,
}

/// Checks that an announced `host:port` is at the address the registration came from. A
/// hostname or a relayed address cannot be checked here and passes.
fn check_source(record: &PeerRecord, source: Option<IpAddr>) -> Result<(), NodeError> {
    let (Some(source), Ok(announced)) = (source, record.addr.parse::<SocketAddr>()) else {
        return Ok(());
    };
    if announced.ip().to_canonical() != source.to_canonical() {
        return Err(NodeError::BadRequest(format!(
            "node {} announces {} but registers from {source}: a node may only announce its \
             own address",
            record.node_id, record.addr
        )));
    }
    Ok(())
}

impl TrackerState {
    /// No nodes yet.
    pub fn new(config: &TrackerConfig) -> Self {
        Self {
            nodes: HashMap::new(),
            by_age: BTreeSet::new(),
            shelves: HashMap::new(),
            claims: HashMap::new(),
            per_source: HashMap::new(),
            requests: 0,
            timeout: config.node_timeout,
            max_peers: config.max_peers,
            max_nodes: config.max_nodes,
            max_per_ip: config.max_per_ip,
            clone_warnings: 0,
        }
    }

    /// Adds or refreshes a node registering from `source`; returns up to `max_peers` other
    /// listed nodes, same model first, and warnings for the node's operator. Refused when the
    /// tracker is full, when `source` holds its most live nodes, or when the announced address
    /// is not `source`. A node whose layer count disagrees with the one most addresses claim
    /// for its model is kept but not listed, and warned. An id live at another address is a
    /// copied identity: the newer announcement wins and both are warned about.
    pub fn register(
        &mut self,
        record: PeerRecord,
        source: Option<IpAddr>,
        now: Instant,
    ) -> Result<(Vec<PeerRecord>, Vec<String>), NodeError> {
        self.requests += 1;
        self.expire(now);
        check_source(&record, source)?;
        let known = self.nodes.get(&record.node_id);
        if known.is_none() && self.nodes.len() >= self.max_nodes {
            return Err(NodeError::Full(format!(
                "the tracker holds its maximum of {} nodes",
                self.max_nodes
            )));
        }
        if let Some(ip) = source
            && known.is_none_or(|t| t.source != Some(ip))
            && self.per_source.get(&ip).copied().unwrap_or(0) >= self.max_per_ip
        {
            return Err(NodeError::Full(format!(
                "{ip} already has {} live nodes registered, the most one address may",
                self.max_per_ip
            )));
        }
        let mut warnings = self.clone_warning(&record).into_iter().collect::<Vec<_>>();
        let (id, shelf) = (
            record.node_id,
            (record.model_id.clone(), record.total_layers),
        );
        self.forget(&id);
        self.file(Tracked {
            record,
            last_seen: now,
            source,
        });
        let listed = self.layer_count(&shelf.0);
        if listed != Some(shelf.1) {
            warnings.push(format!(
                "model {} has {} layers on the live nodes of most addresses, not {}: this node \
                 is not listed",
                shelf.0,
                listed.unwrap_or(0),
                shelf.1
            ));
        }
        let peers = self.listing(Some(&shelf.0), self.max_peers + 1);
        let others = self.listing(None, self.max_peers + 1);
        let peers = (peers.into_iter())
            .chain(others.into_iter().filter(|p| p.model_id != shelf.0))
            .filter(|p| p.node_id != id)
            .take(self.max_peers)
            .collect();
        Ok((peers, warnings))
    }

    /// The warning for an id live at another address than `record`'s, counted.
    fn clone_warning(&mut self, record: &PeerRecord) -> Option<String> {
        let live = self.nodes.get(&record.node_id)?;
        if live.record.addr == record.addr {
            return None;
        }
        self.clone_warnings += 1;
        let warning = format!(
            "node id {} is live at {} and now announced from {}: the identity was copied; \
             run `neuroshard identity --regenerate` on one of the machines",
            record.node_id, live.record.addr, record.addr
        );
        tracing::warn!("{warning}");
        Some(warning)
    }

    /// Files a node in every index.
    fn file(&mut self, t: Tracked) {
        let r = &t.record;
        let id = r.node_id;
        self.by_age.insert((t.last_seen, id));
        let shelf = (r.model_id.clone(), r.total_layers);
        self.shelves
            .entry(shelf)
            .or_default()
            .insert((r.layers.start, id));
        let claim = (self.claims.entry(r.model_id.clone()).or_default())
            .entry(r.total_layers)
            .or_default();
        claim.nodes += 1;
        *claim.per_source.entry(t.source).or_default() += 1;
        if let Some(ip) = t.source {
            *self.per_source.entry(ip).or_default() += 1;
        }
        self.nodes.insert(id, t);
    }

    /// Takes a node out of every index; what it was.
    fn forget(&mut self, id: &NodeId) -> Option<Tracked> {
        fn down<K: std::hash::Hash + Eq>(map: &mut HashMap<K, usize>, k: K) -> bool {
            let n = map.get_mut(&k).expect("counted when filed");
            *n -= 1;
            let empty = *n == 0;
            if empty {
                map.remove(&k);
            }
            empty
        }
        let t = self.nodes.remove(id)?;
        let r = &t.record;
        self.by_age.remove(&(t.last_seen, *id));
        let shelf = (r.model_id.clone(), r.total_layers);
        let nodes = self.shelves.get_mut(&shelf).expect("filed");
        nodes.remove(&(r.layers.start, *id));
        if nodes.is_empty() {
            self.shelves.remove(&shelf);
        }
        let counts = self.claims.get_mut(&r.model_id).expect("filed");
        let claim = counts.get_mut(&r.total_layers).expect("filed");
        claim.nodes -= 1;
        down(&mut claim.per_source, t.source);
        if claim.nodes == 0 {
            counts.remove(&r.total_layers);
            if counts.is_empty() {
                self.claims.remove(&r.model_id);
            }
        }
        if let Some(ip) = t.source {
            down(&mut self.per_source, ip);
        }
        Some(t)
    }

    /// The layer count of `model` its listed nodes have: the one claimed from the most
    /// addresses, then by the most nodes, then the smallest.
    fn layer_count(&self, model: &str) -> Option<u32> {
        let counts = self.claims.get(model)?;
        counts
            .iter()
            .max_by_key(|(count, c)| (c.per_source.len(), c.nodes, std::cmp::Reverse(**count)))
            .map(|(count, _)| *count)
    }

    /// Up to `n` listed nodes of `model` (of every model when `None`, model by model), in
    /// order of first layer.
    fn listing(&self, model: Option<&str>, n: usize) -> Vec<PeerRecord> {
        let models: Vec<&String> = match model {
            Some(m) => self
                .claims
                .get_key_value(m)
                .map(|(k, _)| k)
                .into_iter()
                .collect(),
            None => {
                let mut all: Vec<&String> = self.claims.keys().collect();
                all.sort();
                all
            }
        };
        let shelved = |m: &String| {
            let shelf = (m.clone(), self.layer_count(m).expect("a claimed model"));
            self.shelves.get(&shelf).into_iter().flatten()
        };
        models
            .into_iter()
            .flat_map(shelved)
            .take(n)
            .map(|(_, id)| self.nodes[id].record.clone())
            .collect()
    }

    /// Refreshes a node's layers and load; false when the node is unknown (register again).
    pub fn heartbeat(
        &mut self,
        id: &NodeId,
        layers: Option<neuroshard_base::LayerRange>,
        load: f32,
        now: Instant,
    ) -> bool {
        self.requests += 1;
        self.expire(now);
        let Some(mut node) = self.forget(id) else {
            return false;
        };
        node.last_seen = now;
        if let Some(layers) = layers.filter(|l| l.end <= node.record.total_layers) {
            node.record.layers = layers;
        }
        node.record.load = if load.is_finite() {
            load.clamp(0.0, 1.0)
        } else {
            1.0
        };
        self.file(node);
        true
    }

    /// Listed nodes serving `model` (all models when empty), at most [`MAX_LISTED_PEERS`].
    pub fn peers(&mut self, model: &str, now: Instant) -> Vec<PeerRecord> {
        self.requests += 1;
        self.expire(now);
        let model = (!model.is_empty()).then_some(model);
        self.listing(model, MAX_LISTED_PEERS)
    }

    /// Drops nodes silent for longer than the timeout, the most silent first; returns their
    /// ids.
    pub fn expire(&mut self, now: Instant) -> Vec<NodeId> {
        let mut stale = Vec::new();
        while let Some(&(seen, id)) = self.by_age.first()
            && now.duration_since(seen) > self.timeout
        {
            self.forget(&id);
            stale.push(id);
        }
        stale
    }

    /// Node count, coverage per model, request count.
    pub fn stats(&mut self, now: Instant) -> TrackerStats {
        self.requests += 1;
        self.expire(now);
        let mut covered = BTreeMap::new();
        let mut total = BTreeMap::new();
        for model in self.claims.keys() {
            let count = self.layer_count(model).expect("a claimed model");
            // Nodes in order of first layer: each adds what it covers past the furthest
            // layer covered so far.
            let (mut layers, mut reach) = (0, 0);
            let shelf = (model.clone(), count);
            for (_, id) in self.shelves.get(&shelf).into_iter().flatten() {
                let span = self.nodes[id].record.layers;
                let (start, end) = (span.start.max(reach), span.end.min(count));
                layers += end.saturating_sub(start);
                reach = reach.max(end);
            }
            total.insert(model.clone(), count);
            covered.insert(model.clone(), layers);
        }
        TrackerStats {
            nodes: self.nodes.len() as u64,
            layers_covered: covered,
            total_layers: total,
            requests: self.requests,
            clone_warnings: self.clone_warnings,
        }
    }

    /// The announcement of a live node.
    pub fn record(&self, id: &NodeId) -> Option<PeerRecord> {
        self.nodes.get(id).map(|t| t.record.clone())
    }

    /// Number of live nodes (as of the last call).
    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    /// Whether no node is known.
    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }
}

#[cfg(test)]
mod tests;
