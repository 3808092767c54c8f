//! Finding peers and layer providers with or without a tracker: the [`tracker`] (server and
//! client), the DHT driver, LAN discovery and referrals.
//!
//! Every reachable node serves a Kademlia DHT ([`neuroshard_dht`], driven over gRPC by the
//! [`dht`] actor and [`service`]) and publishes signed, expiring records of itself: `/nodes/{id}`
//! and one `/layers/{model}/{index}` entry per layer it serves. A client (or a node) finds the
//! providers of a model by reading the layer keys. Peers get into the DHT from wherever they are
//! first heard of:
//!
//! - the tracker's list, while there is a tracker;
//! - configured bootstrap peers, asked for referrals with `GetPeers`;
//! - the LAN, over mDNS ([`lan`]);
//! - every DHT request a serving peer sends, signed by its key.
//!
//! So the swarm keeps finding its providers when the tracker is gone.

pub mod dht;
pub mod lan;
mod service;
pub mod tracker;

use neuroshard_base::sync::RwLockExt;
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use neuroshard_base::{LayerRange, NodeId, NodeKey};
use neuroshard_dht::{Contact, Key, Record, RecordKey};
use neuroshard_proto as pb;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

pub use dht::{DhtHandle, DhtStats};
pub use lan::{Lan, LanConfig};
pub use service::DhtService;

use neuroshard_net::NodeError;
use neuroshard_net::convert::{
    PeerRecord, contact_of_peer, contacts_from_proto, peer_from_proto, peer_from_record,
    peer_record_value,
};
use neuroshard_net::pool::{ConnectionPool, Target};

/// How long a referral request may take: a bootstrap peer slower than this is skipped.
const REFERRAL_TIMEOUT: Duration = Duration::from_secs(3);

/// Lookups run at once when reading a model's providers or putting a node's records, and
/// referral requests when joining: an 80-layer model takes ten rounds, and a home line stays
/// responsive.
const PARALLEL_GETS: usize = 8;

/// Shortest time between two announcement rounds, so a changing table or state cannot make a
/// node put its records in a loop.
const MIN_ANNOUNCE_GAP: Duration = Duration::from_secs(1);

/// Discovery tunables.
#[derive(Debug, Clone, PartialEq)]
pub struct DiscoveryConfig {
    /// Kademlia's; the defaults are DESIGN.md's (k = 20, α = 3), with gets gathering entries
    /// from 3 holders: a layer's providers each stored at their own view of the k closest, and
    /// one holder may lack some.
    pub kad: neuroshard_dht::Config,
    /// Lifetime of the records a node publishes. Default 15 min: a provider that leaves
    /// without a word drops out of `/layers` within it, and clients meanwhile route around it
    /// on their first failed call.
    pub record_ttl: Duration,
    /// How often a node signs and puts its records again. Default 5 min: a third of the TTL,
    /// so two lost rounds still leave a live record.
    pub announce_every: Duration,
    /// How often a node reads its model's providers from the DHT (for referrals and the
    /// coverage the app's Auto layers follow). Default 5 min.
    pub sweep_every: Duration,
    /// LAN discovery over mDNS; none to turn it off. Default none: it multicasts, which an
    /// embedding program opts into (the CLI's `node` and the desktop app do).
    pub lan: Option<LanConfig>,
    /// How long a client with no tracker and no bootstrap peers waits for the LAN to name a
    /// peer. Default 3 s: mDNS answers within about a second.
    pub lan_wait: Duration,
}

impl Default for DiscoveryConfig {
    fn default() -> Self {
        Self {
            kad: neuroshard_dht::Config {
                quorum: 3,
                ..neuroshard_dht::Config::default()
            },
            record_ttl: Duration::from_secs(15 * 60),
            announce_every: Duration::from_secs(5 * 60),
            sweep_every: Duration::from_secs(5 * 60),
            lan: None,
            lan_wait: Duration::from_secs(3),
        }
    }
}

impl DiscoveryConfig {
    /// Names the first invalid field.
    pub fn validate(&self) -> Result<(), neuroshard_base::Invalid> {
        use neuroshard_base::Invalid;
        let ttl = self.record_ttl.as_millis() as u64;
        if ttl == 0 || ttl > neuroshard_dht::record::MAX_TTL_MS {
            let problem = "must be between 1 ms and 1 h";
            return Err(Invalid::new("discovery.record_ttl", problem));
        }
        if self.announce_every.is_zero() || self.announce_every >= self.record_ttl {
            let problem = "must be positive and shorter than record_ttl";
            return Err(Invalid::new("discovery.announce_every", problem));
        }
        if self.sweep_every.is_zero() {
            return Err(Invalid::new("discovery.sweep_every", "must be positive"));
        }
        if self.kad.k == 0 || self.kad.alpha == 0 || self.kad.disjoint_paths == 0 {
            let problem = "k, alpha and disjoint_paths must be positive";
            return Err(Invalid::new("discovery.kad", problem));
        }
        Ok(())
    }

    /// The state machine's tunables. Its own republishing is off: it puts a record again with
    /// the same expiry, while [`Discovery::keep_announcing`] signs fresh ones more often.
    fn kad(&self) -> neuroshard_dht::Config {
        neuroshard_dht::Config {
            republish_ms: u64::MAX / 4,
            ..self.kad
        }
    }
}

/// Checks bootstrap peers: each must read as `host:port`.
pub fn check_bootstrap(peers: &[String]) -> Result<(), NodeError> {
    match peers.iter().find(|p| !neuroshard_base::is_host_port(p)) {
        Some(peer) => Err(NodeError::Config(format!(
            "bootstrap: {peer:?} is not host:port"
        ))),
        None => Ok(()),
    }
}

/// What the last announcement achieved.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct AnnounceStatus {
    /// Announcement rounds so far.
    pub rounds: u64,
    /// Records put in the last round.
    pub records: usize,
    /// The fewest peers any of them reached.
    pub least_stored: usize,
    /// When they expire, ms since the epoch.
    pub expires_ms: u64,
}

/// A node's or client's way into the swarm without a tracker.
#[derive(Debug)]
pub struct Discovery {
    dht: DhtHandle,
    pool: Arc<ConnectionPool>,
    bootstrap: std::sync::RwLock<Vec<String>>,
    lan: Option<Lan>,
    config: DiscoveryConfig,
    announced: watch::Sender<AnnounceStatus>,
}

impl Discovery {
    /// Starts the DHT for `local` (serving it when `key` is given; a client otherwise) and, if
    /// configured, LAN discovery; `bootstrap` peers (`host:port`) are asked on [`Self::join`].
    pub fn start(
        local: Contact,
        key: Option<Arc<NodeKey>>,
        config: DiscoveryConfig,
        bootstrap: Vec<String>,
        pool: Arc<ConnectionPool>,
        cancel: CancellationToken,
    ) -> Result<Self, NodeError> {
        config.validate()?;
        let serving = key.is_some();
        let dht = DhtHandle::spawn(local, key, config.kad(), pool.clone(), cancel.clone());
        let lan = match &config.lan {
            Some(lan) => Some(Lan::start(
                lan,
                serving.then_some(local),
                dht.clone(),
                cancel,
            )?),
            None => None,
        };
        Ok(Self {
            dht,
            pool,
            bootstrap: std::sync::RwLock::new(bootstrap),
            lan,
            config,
            announced: watch::channel(AnnounceStatus::default()).0,
        })
    }

    /// The DHT.
    pub fn dht(&self) -> &DhtHandle {
        &self.dht
    }

    /// The bootstrap peers asked on [`Self::join`].
    pub fn bootstrap(&self) -> Vec<String> {
        self.bootstrap.read_or_recover().clone()
    }

    /// Replaces the bootstrap peers (checked as `host:port`) for the next [`Self::join`].
    pub fn set_bootstrap(&self, peers: Vec<String>) -> Result<(), NodeError> {
        check_bootstrap(&peers)?;
        *self.bootstrap.write_or_recover() = peers;
        Ok(())
    }

    /// LAN discovery, when on.
    pub fn lan(&self) -> Option<&Lan> {
        self.lan.as_ref()
    }

    /// The tunables.
    pub fn config(&self) -> &DiscoveryConfig {
        &self.config
    }

    /// A watch of the announcements made.
    pub fn announced(&self) -> watch::Receiver<AnnounceStatus> {
        self.announced.subscribe()
    }

    /// Joins the DHT: the `known` peers (from a tracker) become candidates; each bootstrap peer
    /// and each peer found on the LAN is asked for referrals, whose contacts become candidates
    /// too; then a lookup of this node's own key through them fills the table. Returns the
    /// serving peers the referrals named (unsigned: for picking a model, not for routing).
    pub async fn join(&self, known: &[PeerRecord]) -> Vec<PeerRecord> {
        let mut seeds: Vec<Target> = self.bootstrap().into_iter().map(Target::any).collect();
        if let Some(lan) = &self.lan {
            if known.is_empty() && seeds.is_empty() {
                let mut count = lan.count();
                let _ =
                    tokio::time::timeout(self.config.lan_wait, count.wait_for(|&n| n > 0)).await;
            }
            // A LAN announcement is signed: its key is the node to expect.
            seeds.extend(
                lan.found()
                    .iter()
                    .map(|c| Target::node(c.addr.to_string(), NodeId(c.key.0))),
            );
        }
        seeds.sort();
        seeds.dedup();
        let tracked = known.iter().filter_map(contact_of_peer).collect();
        self.dht.add_candidates(tracked).await;
        let own = self.dht.local().key;
        let asks = seeds
            .into_iter()
            .map(|addr| async move { self.referrals(&addr, own).await });
        let mut answers = futures::stream::iter(asks).buffer_unordered(PARALLEL_GETS);
        let mut peers = Vec::new();
        while let Some(answer) = answers.next().await {
            match answer {
                Ok((named, contacts)) => {
                    self.dht.add_candidates(contacts).await;
                    peers.extend(named);
                }
                Err(e) => tracing::debug!("no referrals: {e}"),
            }
        }
        if let Err(e) = self.dht.bootstrap().await {
            tracing::debug!("joining the DHT: {e}");
        }
        dedup_peers(peers)
    }

    /// Asks the peer at `addr` for the peers it knows and its DHT contacts closest to `near`.
    async fn referrals(
        &self,
        to: &Target,
        near: Key,
    ) -> Result<(Vec<PeerRecord>, Vec<Contact>), NodeError> {
        let addr = &to.addr;
        let ask = async {
            let mut pooled = self.pool.control_client(to).await?;
            let reply = pooled
                .client
                .get_peers(pb::GetPeersRequest {
                    near: near.0.to_vec(),
                })
                .await
                .map_err(|status| NodeError::Remote {
                    peer: addr.to_string(),
                    status,
                })?
                .into_inner();
            let peers = reply
                .peers
                .into_iter()
                .filter_map(|p| peer_from_proto(p).ok())
                .collect::<Vec<_>>();
            let mut contacts = contacts_from_proto(reply.contacts);
            contacts.extend(peers.iter().filter_map(contact_of_peer));
            Ok((peers, contacts))
        };
        tokio::time::timeout(REFERRAL_TIMEOUT, ask)
            .await
            .unwrap_or_else(|_| {
                Err(NodeError::Connect {
                    peer: addr.to_string(),
                    message: format!("no referrals within {REFERRAL_TIMEOUT:?}"),
                })
            })
    }

    /// The providers of every layer of `model` the DHT knows of, one per node.
    pub async fn providers(&self, model: &str, total_layers: u32) -> Vec<PeerRecord> {
        let gets = (0..total_layers).map(|index| {
            let key = RecordKey::Layer {
                model: model.to_string(),
                index,
            };
            self.dht.get(key)
        });
        let outcomes: Vec<_> = futures::stream::iter(gets)
            .buffer_unordered(PARALLEL_GETS)
            .collect()
            .await;
        let mut peers = Vec::new();
        for outcome in outcomes {
            match outcome {
                Ok(outcome) => peers.extend(outcome.records.iter().filter_map(|r| {
                    peer_from_record(r)
                        .inspect_err(|e| tracing::debug!("dropping a provider entry: {e}"))
                        .ok()
                })),
                Err(e) => tracing::debug!("reading providers: {e}"),
            }
        }
        dedup_peers(peers)
    }

    /// Signs and puts this node's records, `me` as `/nodes/{id}` and under each layer it
    /// serves; returns what they reached.
    pub async fn announce(
        &self,
        me: &PeerRecord,
        key: &NodeKey,
    ) -> Result<AnnounceStatus, NodeError> {
        let mut keys = vec![RecordKey::Node(key.id())];
        keys.extend(layer_keys(me, me.layers.to_range()));
        let count = keys.len();
        let (least_stored, expires_ms) = self.put_signed(me, key, keys).await?;
        let mut status = AnnounceStatus::default();
        self.announced.send_modify(|s| {
            s.rounds += 1;
            s.records = count;
            s.least_stored = least_stored;
            s.expires_ms = expires_ms;
            status = *s;
        });
        Ok(status)
    }

    /// Puts `me` under the layer keys of `layers` that it no longer serves: readers refuse an
    /// entry whose record does not cover the layer it is filed under, so the node stops being
    /// named as their provider now rather than when the old entries expire. Returns the fewest
    /// peers that stored one.
    pub async fn withdraw(
        &self,
        me: &PeerRecord,
        key: &NodeKey,
        layers: LayerRange,
    ) -> Result<usize, NodeError> {
        let gone = layers.to_range().filter(|&i| !me.layers.contains(i as u32));
        let keys: Vec<_> = layer_keys(me, gone).collect();
        if keys.is_empty() {
            return Ok(0);
        }
        Ok(self.put_signed(me, key, keys).await?.0)
    }

    /// Signs `me` under each of `keys`, expiring one record TTL from now, and puts them;
    /// returns the fewest peers that stored one, and the expiry.
    async fn put_signed(
        &self,
        me: &PeerRecord,
        key: &NodeKey,
        keys: Vec<RecordKey>,
    ) -> Result<(usize, u64), NodeError> {
        let expires_ms = neuroshard_net::now_ms() + self.config.record_ttl.as_millis() as u64;
        let value = peer_record_value(me);
        let records = keys
            .into_iter()
            .map(|k| Record::sign(k, value.clone(), expires_ms, key))
            .collect::<Result<Vec<_>, _>>()
            .map_err(neuroshard_dht::DhtError::from)?;
        let mut puts = futures::stream::iter(records.into_iter().map(|r| self.dht.put(r)))
            .buffer_unordered(PARALLEL_GETS);
        let mut least_stored = usize::MAX;
        while let Some(outcome) = puts.next().await {
            least_stored = least_stored.min(outcome?.stored);
        }
        Ok((least_stored, expires_ms))
    }

    /// Announces `me()` every [`DiscoveryConfig::announce_every`] until `cancel`; at once when
    /// `changed` fires and `me()` then differs from what was announced (the node paused, say),
    /// and, after a round that reached nobody, when the routing table changes.
    pub async fn keep_announcing<T>(
        &self,
        key: &NodeKey,
        me: impl Fn() -> PeerRecord,
        mut changed: watch::Receiver<T>,
        cancel: CancellationToken,
    ) {
        let mut table = self.dht.stats();
        let mut first = true;
        loop {
            let announced = me();
            let reached = match self.announce(&announced, key).await {
                Ok(status) if status.least_stored > 0 => {
                    let (records, peers) = (status.records, status.least_stored);
                    let line = "announced to the DHT";
                    if std::mem::take(&mut first) {
                        tracing::info!("{line}: {records} records, each stored by {peers}+ peers");
                    } else {
                        tracing::debug!("{line}: {records} records, each stored by {peers}+ peers");
                    }
                    true
                }
                Ok(_) => {
                    tracing::debug!("announced to the DHT, but no peer stored the records yet");
                    false
                }
                Err(e) => {
                    tracing::warn!("announcing to the DHT failed: {e}");
                    false
                }
            };
            table.borrow_and_update();
            // A round that reached nobody is tried again when the table changes, but at most
            // once a second however often it does.
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = tokio::time::sleep(MIN_ANNOUNCE_GAP) => {}
            }
            let next = tokio::time::Instant::now() + self.config.announce_every;
            loop {
                tokio::select! {
                    _ = cancel.cancelled() => return,
                    _ = tokio::time::sleep_until(next) => break,
                    Ok(()) = changed.changed() => if me() != announced { break },
                    Ok(()) = table.changed(), if !reached => break,
                }
            }
        }
    }
}

/// The `/layers/{model}/{index}` keys of layers `indices` of `me`'s model.
fn layer_keys(
    me: &PeerRecord,
    indices: impl Iterator<Item = usize>,
) -> impl Iterator<Item = RecordKey> {
    indices.map(|index| RecordKey::Layer {
        model: me.model_id.clone(),
        index: index as u32,
    })
}

/// One record per node, the first seen, in node id order.
pub fn dedup_peers(peers: Vec<PeerRecord>) -> Vec<PeerRecord> {
    let mut by_id: BTreeMap<NodeId, PeerRecord> = BTreeMap::new();
    for p in peers {
        by_id.entry(p.node_id).or_insert(p);
    }
    by_id.into_values().collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn invalid_timings_are_named() {
        let config = DiscoveryConfig {
            announce_every: Duration::from_secs(900),
            ..DiscoveryConfig::default()
        };
        assert_eq!(
            config.validate().unwrap_err().field,
            "discovery.announce_every"
        );
        let config = DiscoveryConfig {
            record_ttl: Duration::from_secs(2 * 24 * 3600),
            ..DiscoveryConfig::default()
        };
        assert_eq!(config.validate().unwrap_err().field, "discovery.record_ttl");
        DiscoveryConfig::default().validate().unwrap();
    }

    #[test]
    fn a_record_describes_only_its_publisher_serving_the_layer_it_is_filed_under() {
        let key = NodeKey::generate();
        let me = PeerRecord {
            node_id: key.id(),
            addr: "127.0.0.1:7000".into(),
            model_id: "m".into(),
            layers: neuroshard_base::LayerRange::new(2, 4).unwrap(),
            total_layers: 6,
            load: 0.0,
            public_key: key.public(),
            display_name: "Ada".into(),
            relay: String::new(),
            precision: Default::default(),
            decode_ms_per_layer: 1.5,
        };
        let expires = neuroshard_net::now_ms() + 60_000;
        let sign = |k: RecordKey, value: Vec<u8>, signer: &NodeKey| {
            Record::sign(k, value, expires, signer).unwrap()
        };
        let layer = |model: &str, index| RecordKey::Layer {
            model: model.into(),
            index,
        };
        let value = peer_record_value(&me);
        assert_eq!(
            peer_from_record(&sign(layer("m", 3), value.clone(), &key)).unwrap(),
            me
        );
        assert_eq!(
            peer_from_record(&sign(RecordKey::Node(key.id()), value.clone(), &key)).unwrap(),
            me
        );
        let refused = |record: Record| peer_from_record(&record).unwrap_err().to_string();
        let err = refused(sign(layer("m", 5), value.clone(), &key));
        assert!(err.contains("announces model m layers 2..4"), "{err}");
        let err = refused(sign(layer("other", 3), value.clone(), &key));
        assert!(err.contains("announces model m"), "{err}");
        let err = refused(sign(layer("m", 3), value.clone(), &NodeKey::generate()));
        assert!(err.contains("other than its publisher"), "{err}");
        let err = refused(sign(RecordKey::Checkpoint("c".into()), value, &key));
        assert!(err.contains("not a peer announcement"), "{err}");
        let err = refused(sign(layer("m", 3), vec![0xff; 9], &key));
        assert!(err.contains("value is not a peer announcement"), "{err}");
        let huge = PeerRecord {
            total_layers: 5000,
            ..me.clone()
        };
        let err = refused(sign(layer("m", 3), peer_record_value(&huge), &key));
        assert!(err.contains("at most 1024"), "{err}");
    }
}
