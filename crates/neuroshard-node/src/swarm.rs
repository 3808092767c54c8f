//! A whole swarm on loopback: a tracker and nodes on ephemeral ports, in this process. The demo,
//! the training harness, the tests and the benchmarks all start their swarms here.

use std::path::Path;
use std::sync::Arc;

use neuroshard_base::{LayerRange, NodeKey, PublicKey};
use neuroshard_discovery::tracker::{TrackerConfig, TrackerHandle, start_tracker};
use neuroshard_net::NodeError;
use neuroshard_proof::{CreditPass, PassBody};

use crate::node::{NodeConfig, NodeHandle, start_node};

/// A tracker and nodes on loopback. The tracker's key issues credit passes, and every node,
/// dialling the tracker by key, trusts it.
#[derive(Debug)]
pub struct LocalSwarm {
    /// The tracker.
    pub tracker: TrackerHandle,
    /// The tracker's key.
    issuer: Arc<NodeKey>,
    /// The nodes, in start order.
    pub nodes: Vec<NodeHandle>,
}

impl LocalSwarm {
    /// Starts a tracker and one node per range of the model in `model`, each listed with the
    /// tracker.
    pub async fn start(model: &Path, ranges: &[(u32, u32)]) -> Result<Self, NodeError> {
        let mut swarm = Self::tracker_only().await?;
        for &(start, end) in ranges {
            swarm.add_node(model, start, end).await?;
        }
        Ok(swarm)
    }

    /// Starts a tracker with no nodes yet.
    pub async fn tracker_only() -> Result<Self, NodeError> {
        let issuer = Arc::new(NodeKey::generate());
        let tracker = start_tracker(TrackerConfig {
            listen: "127.0.0.1:0".parse().expect("literal address"),
            key: Some(issuer.clone()),
            ..TrackerConfig::default()
        })
        .await?;
        Ok(Self {
            tracker,
            issuer,
            nodes: Vec::new(),
        })
    }

    /// A day's credit pass from the tracker for the requester key `holder`: what the
    /// operator of a swarm's tracker hands the requesters it knows.
    pub fn pass_for(&self, holder: PublicKey) -> CreditPass {
        PassBody::new(&self.issuer, holder, neuroshard_net::now_ms(), 1).sign(&self.issuer)
    }

    /// A client of this swarm countersigning as `key` and holding the tracker's pass for it,
    /// so the nodes count its receipts as earned.
    pub fn vouched_client(&self, key: Arc<NodeKey>) -> neuroshard_client::ClientConfig {
        neuroshard_client::ClientConfig {
            pass: Some(self.pass_for(key.public())),
            key: Some(key),
            ..neuroshard_client::ClientConfig::new(self.tracker.url())
        }
    }

    /// Starts one more node serving `start..end`.
    pub async fn add_node(
        &mut self,
        model: &Path,
        start: u32,
        end: u32,
    ) -> Result<&NodeHandle, NodeError> {
        self.add_node_with(model, start, end, |_| {}).await
    }

    /// Starts one more node serving `start..end`, listed with the tracker, its config adjusted
    /// by `configure`.
    pub async fn add_node_with(
        &mut self,
        model: &Path,
        start: u32,
        end: u32,
        configure: impl FnOnce(&mut NodeConfig),
    ) -> Result<&NodeHandle, NodeError> {
        let range = LayerRange::new(start, end)
            .map_err(|e| NodeError::Config(format!("layers {start}..{end}: {e}")))?;
        let mut config = NodeConfig::new(model, range);
        config.tracker = Some(self.tracker.url());
        configure(&mut config);
        self.nodes.push(start_node(config).await?);
        Ok(self.nodes.last().expect("just pushed"))
    }

    /// The node advertised at `addr`.
    pub fn node_at(&self, addr: &str) -> Option<&NodeHandle> {
        self.nodes.iter().find(|n| n.advertised() == addr)
    }

    /// Stops every node, then the tracker.
    pub async fn shutdown(self) {
        for node in self.nodes {
            node.shutdown().await;
        }
        self.tracker.shutdown().await;
    }
}
