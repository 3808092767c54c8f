//! The node's side of the tracker protocol.

use super::*;

/// The node's side of the tracker protocol: register, heartbeat, register again when the
/// tracker has forgotten the node (it restarted), and keep the peer list fresh.
pub(super) struct Heartbeat {
    pub(super) state: Arc<NodeState>,
    pub(super) tracker: TrackerClient<Channel>,
    pub(super) url: String,
    pub(super) registered: bool,
    /// Fires when the node stops following this tracker.
    pub(super) stop: CancellationToken,
}

impl Heartbeat {
    pub(super) fn new(
        state: Arc<NodeState>,
        url: &str,
        stop: CancellationToken,
    ) -> Result<Self, NodeError> {
        Ok(Self {
            state,
            tracker: neuroshard_client::tracker_client(url)?,
            url: url.to_string(),
            registered: false,
            stop,
        })
    }

    /// Beats every `period`, and when asked to, until stopped; a beat under way when the stop
    /// comes is dropped.
    pub(super) async fn run(mut self, period: Duration) {
        let stop = self.stop.clone();
        let mut tick = tokio::time::interval(period);
        tick.tick().await;
        let mut asked = self.state.beat_now.subscribe();
        asked.borrow_and_update();
        loop {
            tokio::select! {
                biased;
                _ = stop.cancelled() => return,
                _ = tick.tick() => {}
                Ok(()) = asked.changed() => {}
            }
            tokio::select! {
                biased;
                _ = stop.cancelled() => return,
                _ = self.beat() => {}
            }
        }
    }

    pub(super) async fn beat(&mut self) {
        let record = self.state.record();
        if self.registered {
            let timestamp_ms = neuroshard_net::now_ms();
            let message =
                neuroshard_discovery::tracker::announcement("heartbeat", &record, timestamp_ms);
            let request = pb::HeartbeatRequest {
                node_id: record.node_id.to_string(),
                layers: Some(neuroshard_net::convert::span_to_proto(record.layers)),
                load: record.load,
                timestamp_ms,
                signature: self.state.key.sign(&message).to_vec(),
            };
            match self.tracker.heartbeat(request).await {
                Ok(reply) if reply.get_ref().known => self.told(record.layers),
                Ok(_) => {
                    tracing::info!("tracker forgot this node (restarted?); registering again");
                    self.registered = false;
                }
                Err(status) => tracing::warn!("heartbeat failed: {}", status.message()),
            }
        }
        if !self.registered {
            let timestamp_ms = neuroshard_net::now_ms();
            let message =
                neuroshard_discovery::tracker::announcement("register", &record, timestamp_ms);
            let request = pb::RegisterRequest {
                node: Some(peer_to_proto(&record)),
                timestamp_ms,
                signature: self.state.key.sign(&message).to_vec(),
            };
            match self.tracker.register(request).await {
                Ok(reply) => {
                    for warning in &reply.get_ref().warnings {
                        tracing::warn!("tracker: {warning}");
                    }
                    self.registered = true;
                    self.told(record.layers);
                }
                Err(status) => {
                    tracing::warn!("registering with the tracker failed: {}", status.message())
                }
            }
        }
        self.refresh_peers(&record.model_id).await;
    }

    pub(super) async fn refresh_peers(&mut self, model_id: &str) {
        let Ok(peers) =
            neuroshard_client::list_peers(self.tracker.clone(), &self.url, Some(model_id)).await
        else {
            return;
        };
        let contacts = peers.iter().filter_map(contact_of_peer).collect();
        self.state.discovery.dht().add_candidates(contacts).await;
        self.state
            .learn_peers(PeerSource::Tracker, peers, Some(&self.stop));
    }

    /// Records that the tracker accepted `layers` from this node, unless it is no longer
    /// followed.
    pub(super) fn told(&self, layers: LayerRange) {
        if !self.stop.is_cancelled() {
            self.state.told.send_replace(Some(layers));
        }
    }
}
