//! [`NodeHandle`]: what the owner of a running node holds to watch it, change its settings live,
//! pause, drain, reshard and stop it.

use super::*;
use neuroshard_base::sync::RwLockExt;

/// What a running node enforces, as its owner set it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct NodeLimits {
    /// Upload cap, KB/s; 0 for none.
    pub upload_kbps: u32,
    /// Download cap, KB/s; 0 for none.
    pub download_kbps: u32,
    /// Share of wall time it computes, %.
    pub compute_share_percent: u8,
    /// CPU threads for compute; 0 for every core but one.
    pub cpu_threads: u16,
    /// Bytes the transport has left before new work is refused; none without a transfer cap.
    pub transfer_left: Option<u64>,
}

/// A running node; dropping it does not stop the node, [`NodeHandle::shutdown`] does.
#[derive(Debug)]
pub struct NodeHandle {
    pub(super) id: NodeId,
    pub(super) addr: SocketAddr,
    pub(super) stun: Option<SocketAddr>,
    pub(super) relay: Option<Relay>,
    pub(super) state: Arc<NodeState>,
    pub(super) cancel: CancellationToken,
    pub(super) server: tokio::task::JoinHandle<()>,
    /// How fetching the weights from a peer went, for a node started with `weights_from`.
    pub(super) fetched: Option<TransferReport>,
}

impl NodeHandle {
    /// How fetching the weights from a peer went, for a node started with
    /// [`NodeConfig::weights_from`]; none for a node that read them from disk.
    pub fn weights_fetch(&self) -> Option<&TransferReport> {
        self.fetched.as_ref()
    }

    /// The trainable stage's flat parameters and accumulated gradient (a sum over the
    /// microbatches since the last inner step), in parameter order; none before the node's
    /// first training call or when it does not train.
    pub fn training_snapshot(&self) -> Option<TrainingSnapshot> {
        self.state.training_snapshot()
    }

    /// This node as a hop of a chain running its whole range.
    pub fn hop(&self) -> neuroshard_client::router::Hop {
        neuroshard_client::router::Hop {
            addr: self.advertised(),
            node_id: self.id(),
            layers: self.layers(),
            precision: self.state.served().precision,
        }
    }

    /// Replaces the replicas (`host:port`) the node exchanges pseudo-gradients with besides
    /// the peers of its layers it knows; nothing for a node that does not train.
    pub fn set_training_replicas(&self, replicas: Vec<String>) {
        if let Some(trainer) = &self.state.trainer {
            *trainer.replicas.write_or_recover() = replicas;
        }
    }

    /// The node's id.
    pub fn id(&self) -> NodeId {
        self.id
    }

    /// The bound address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Where the node answers STUN (UDP, its own port), if it does.
    pub fn stun_addr(&self) -> Option<SocketAddr> {
        self.stun
    }

    /// The advertised address: `host:port`, or `relay://RELAY/KEY` for a relayed node.
    pub fn advertised(&self) -> String {
        self.state.advertised.read_or_recover().clone()
    }

    /// The reachability self-test's outcome, as it changes.
    pub fn reachability(&self) -> tokio::sync::watch::Receiver<Reachability> {
        self.state.reachability.subscribe()
    }

    /// The relay this node runs for others, if it runs one.
    pub fn relay(&self) -> Option<&Relay> {
        self.relay.as_ref()
    }

    /// Layers served.
    pub fn layers(&self) -> LayerRange {
        self.state.served().range
    }

    /// Id of the model served.
    pub fn model_id(&self) -> &str {
        &self.state.model.id
    }

    /// Decode batches run so far and the steps they held: steps over batches is the mean
    /// batch size.
    pub fn batched(&self) -> (u64, u64) {
        self.state.batcher.counts()
    }

    /// Current counters.
    pub fn metrics(&self) -> MetricsSnapshot {
        self.state.metrics()
    }

    /// The node's public key.
    pub fn public_key(&self) -> PublicKey {
        self.state.key.public()
    }

    /// The receipt ledger.
    pub fn ledger(&self) -> &LedgerHandle {
        &self.state.ledger
    }

    /// Stops taking calls at once (calls in flight fail) and begins shutting the server down,
    /// without waiting: what a crash looks like to peers.
    pub fn kill(&self) {
        self.state.lifecycle.set(RunState::Stopped);
        self.cancel.cancel();
    }

    /// Refuses calls from now on (UNAVAILABLE, so clients fail over to replicas) until
    /// [`NodeHandle::resume`]; calls in flight finish. Sessions keep their caches until they
    /// expire, so a short pause costs a client no replay.
    pub fn pause(&self) {
        self.state.lifecycle.set(RunState::Paused);
    }

    /// Takes calls again after a pause or drain.
    pub fn resume(&self) {
        self.state.lifecycle.set(RunState::Serving);
    }

    /// Refuses new calls, waits for the calls in flight to finish, then pauses: "finish
    /// current requests, then pause".
    pub async fn drain(&self) {
        self.state.lifecycle.drain().await;
    }

    /// A watch of the run state and calls in flight.
    pub fn status(&self) -> tokio::sync::watch::Receiver<NodeStatus> {
        self.state.lifecycle.watch()
    }

    /// Changes the upload and download caps (KB/s, 0 for none) of the running node; open
    /// connections follow from their next read or write.
    pub fn set_bandwidth(&self, upload_kbps: u32, download_kbps: u32) {
        self.state.caps.set(upload_kbps, download_kbps);
    }

    /// Changes the share of wall time the node computes (1–100 %); the next call follows it.
    pub fn set_compute_share(&self, percent: u8) {
        self.state.duty.set_share(percent);
    }

    /// The limits in force.
    pub fn limits(&self) -> NodeLimits {
        let (upload_kbps, download_kbps) = self.state.caps.kbps();
        NodeLimits {
            upload_kbps,
            download_kbps,
            compute_share_percent: self.state.duty.share(),
            cpu_threads: self.state.threads.setting(),
            transfer_left: self.state.caps.budget_left(),
        }
    }

    /// Bytes the transport has moved, both ways, since the node started: every byte of every
    /// connection, which is what a transfer cap counts.
    pub fn transport_bytes(&self) -> u64 {
        self.state.caps.moved()
    }

    /// Caps [`NodeHandle::transport_bytes`]: once it reaches `bytes`, Forward calls are refused
    /// with RESOURCE_EXHAUSTED naming the figures; `None` lifts the cap.
    pub fn set_transfer_budget(&self, bytes: Option<u64>) {
        self.state.caps.set_budget(bytes);
    }

    /// Whether compute runs on a GPU (else on the CPU).
    pub fn on_gpu(&self) -> bool {
        self.state.served().on_gpu
    }

    /// Serves `layers` on `device` from now on, without a restart: the new shard loads while
    /// the old one serves, then replaces it. Calls in flight finish on the old shard; sessions
    /// are dropped (their caches belong to the old layers), so their callers fail over and
    /// replay. The tracker hears of the change at once, and the DHT entries of layers no
    /// longer served stop naming this node. A range the model does not have, or a device that
    /// cannot be used, is refused with the field named, and the old shard goes on serving.
    pub async fn reshard(
        &self,
        layers: LayerRange,
        device: Option<ComputeDevice>,
    ) -> Result<(), NodeError> {
        let state = &self.state;
        let total = state.model.config.num_hidden_layers as u32;
        if layers.is_empty() || layers.end > total {
            return Err(NodeError::Config(format!(
                "layers: {layers} is not within the model's {total} layers"
            )));
        }
        let _one_at_a_time = state.resharding.lock().await;
        let before = state.served();
        if before.range == layers && before.device == device {
            return Ok(());
        }
        let (_, source) = weights_on_disk(&state.model_dir, layers)?.ok_or_else(|| {
            NodeError::Config(format!(
                "layers: the weights of {layers} are not on this machine; fetch them first"
            ))
        })?;
        let held = (device, before.precision);
        let next = Served::load(source, layers, held, state.fault.as_ref()).await?;
        let kv_bytes = next.shard.lock_or_recover().kv_bytes_per_token_layer() as u64;
        let dropped = {
            // Sessions go while the swap is held: a call that sees the new shard finds none of
            // the old caches.
            let mut served = state.served.write_or_recover();
            *served = Arc::new(next);
            state.sessions.clear(kv_bytes)
        };
        tracing::info!(
            "now serving layers {layers} (was {}); {dropped} sessions dropped",
            before.range
        );
        state.tell_tracker().await;
        state.announce("layers", Some(before.range)).await;
        Ok(())
    }

    /// Changes the CPU threads compute may use (0: every core but one); the next call follows.
    pub fn set_cpu_threads(&self, threads: u16) -> Result<(), NodeError> {
        self.state.threads.set(threads)
    }

    /// Applies what a running node changes without a restart: bandwidth caps, compute share,
    /// CPU threads, the display name, and the first-run rule: paused while the owner has not
    /// picked a name (or anonymity) and a preset. It never resumes by itself, so an owner's
    /// pause outlasts a settings change; the app resumes when the first run ends. Layers and
    /// device take a shard load ([`NodeHandle::reshard`], which the app plans for) and are not
    /// applied here.
    pub fn apply_settings(&self, settings: &neuroshard_settings::Settings) {
        let bandwidth = &settings.bandwidth;
        self.set_bandwidth(bandwidth.upload_kbps, bandwidth.download_kbps);
        self.set_compute_share(settings.compute.gpu_share_percent);
        if let Err(e) = self.set_cpu_threads(settings.compute.cpu_threads) {
            tracing::warn!("keeping the compute threads as they were: {e}");
        }
        if !settings.profile.onboarded {
            self.pause();
        }
        let name = settings.profile.display_name.as_deref();
        if let Err(e) = self.set_display_name(name.filter(|_| !settings.profile.anonymous)) {
            tracing::warn!("keeping the display name as it was: {e}");
        }
    }

    /// Follows the tracker at `url` (or none) from now on, without a restart: registers with
    /// it before returning and heartbeats it; the old tracker's heartbeat stops. A URL that
    /// does not parse is refused, naming the field, and the old tracker stays.
    pub async fn set_tracker(&self, url: Option<&str>) -> Result<(), NodeError> {
        self.state.follow_tracker(url.map(str::to_string)).await
    }

    /// Asks `peers` (`host:port`) for referrals from now on, and joins the DHT through them at
    /// once, without a restart. A peer that does not read as `host:port` is refused, naming
    /// the field, and the old list stays.
    pub fn set_bootstrap(&self, peers: Vec<String>) -> Result<(), NodeError> {
        let discovery = &self.state.discovery;
        if discovery.bootstrap() == peers {
            return Ok(());
        }
        discovery.set_bootstrap(peers)?;
        let state = self.state.clone();
        tokio::spawn(async move {
            let known = state.known_peers();
            let joined = state.discovery.join(&known);
            tokio::select! {
                _ = state.cancel.cancelled() => {}
                _ = joined => {}
            }
        });
        Ok(())
    }

    /// The node's discovery: its DHT, LAN discovery and announcements.
    pub fn discovery(&self) -> &Discovery {
        &self.state.discovery
    }

    /// Signs and puts the node's DHT records now (they are also put on a timer).
    pub async fn announce(&self) -> Result<AnnounceStatus, NodeError> {
        self.state
            .discovery
            .announce(&self.state.announcement(), &self.state.key)
            .await
    }

    /// The serving peers this node knows of (from the tracker and the DHT), without itself.
    pub fn known_peers(&self) -> Vec<PeerRecord> {
        self.state.known_peers()
    }

    /// The name the node shows the swarm (none: anonymous); announced at once.
    pub fn set_display_name(&self, name: Option<&str>) -> Result<(), NodeError> {
        let name = name.unwrap_or_default();
        check_display_name(name)?;
        let mut current = self.state.display_name.write_or_recover();
        if *current != name {
            *current = name.to_string();
            drop(current);
            let state = self.state.clone();
            tokio::spawn(async move { state.announce("display name", None).await });
        }
        Ok(())
    }

    /// Events from now on (state changes).
    pub fn events(&self) -> tokio::sync::broadcast::Receiver<NodeEvent> {
        self.state.lifecycle.subscribe()
    }

    /// Stops the node and waits for its server to end.
    pub async fn shutdown(self) {
        if let Some(mapper) = self.state.kept.lock().await.mapper.take() {
            mapper.shutdown().await;
        }
        self.kill();
        let _ = self.server.await;
    }
}
