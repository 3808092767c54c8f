//! Client connections to peers: reused, at most a few per peer, closed when idle.
//!
//! A tonic `Channel` multiplexes calls over one HTTP/2 connection; a second or third one is
//! opened only when every pooled channel to that peer already has a call in flight, so large
//! prefills do not queue behind each other on one TCP stream.

use neuroshard_base::NodeId;
use neuroshard_base::sync::LockExt;
use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use neuroshard_proto::node_client::NodeClient;
use tokio::time::Instant;
use tonic::transport::{Channel, Endpoint};

use crate::metrics::Metrics;
use crate::tls::{Dialler, Pin};
use crate::{MAX_MESSAGE_BYTES, NodeError};

/// A node to dial: its address, and the node expected to answer there when the caller knows it
/// (from a signed record, a hop, a contact). A node that proves another key is refused; with
/// none named, the first key that answers is pinned for the channel's later connections.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Target {
    /// `host:port`, or `relay://RELAY/KEY`.
    pub addr: String,
    /// The node expected there.
    pub node: Option<NodeId>,
}

impl Target {
    /// Node `node` at `addr`.
    pub fn node(addr: impl Into<String>, node: NodeId) -> Self {
        Self {
            addr: addr.into(),
            node: Some(node),
        }
    }

    /// Whoever answers at `addr` (a bootstrap address, a helper the owner named).
    pub fn any(addr: impl Into<String>) -> Self {
        Self {
            addr: addr.into(),
            node: None,
        }
    }
}

impl std::fmt::Display for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.node {
            Some(node) => write!(f, "{} ({})", self.addr, node.short()),
            None => f.write_str(&self.addr),
        }
    }
}

/// Pool limits.
#[derive(Debug, Clone, Copy)]
pub struct PoolConfig {
    /// Channels per peer. Default 3 (the seed design's).
    pub max_per_peer: usize,
    /// A peer unused this long has its channels closed. Default 60 s (the seed design's).
    pub idle_timeout: Duration,
    /// Limit on establishing a TCP + HTTP/2 connection. Default 3 s: a home peer that takes
    /// longer is better replaced.
    pub connect_timeout: Duration,
}

impl Default for PoolConfig {
    fn default() -> Self {
        Self {
            max_per_peer: 3,
            idle_timeout: Duration::from_secs(60),
            connect_timeout: Duration::from_secs(3),
        }
    }
}

#[derive(Debug)]
struct Pooled {
    channel: Channel,
    in_flight: Arc<AtomicUsize>,
}

#[derive(Debug, Default)]
struct PeerChannels {
    channels: Vec<Pooled>,
    last_used: Option<Instant>,
}

/// A client to one peer, counted as in flight on its channel until dropped (unless it is a
/// control client, which never makes a channel busy).
#[derive(Debug)]
pub struct PooledClient {
    /// The gRPC client.
    pub client: NodeClient<Channel>,
    in_flight: Option<Arc<AtomicUsize>>,
}

impl PooledClient {
    fn new(channel: Channel, in_flight: Option<Arc<AtomicUsize>>) -> Self {
        Self {
            client: NodeClient::new(channel)
                .max_decoding_message_size(MAX_MESSAGE_BYTES)
                .max_encoding_message_size(MAX_MESSAGE_BYTES),
            in_flight,
        }
    }
}

impl Drop for PooledClient {
    fn drop(&mut self) {
        if let Some(in_flight) = &self.in_flight {
            in_flight.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

/// Channels to peers, keyed by address and the node expected there, dialled as one key.
#[derive(Debug)]
pub struct ConnectionPool {
    config: PoolConfig,
    peers: Mutex<HashMap<Target, PeerChannels>>,
    metrics: Arc<Metrics>,
    dialler: Dialler,
}

impl ConnectionPool {
    /// An empty pool reporting into `metrics`, whose connections prove `dialler`'s key.
    pub fn new(config: PoolConfig, metrics: Arc<Metrics>, dialler: Dialler) -> Self {
        Self {
            config,
            peers: Mutex::new(HashMap::new()),
            metrics,
            dialler,
        }
    }

    /// A client to `addr`: an idle pooled channel, else a new one while under the cap, else the
    /// least busy pooled channel.
    pub async fn client(&self, addr: &Target) -> Result<PooledClient, NodeError> {
        if let Some(client) = self.reuse(addr) {
            return Ok(client);
        }
        let channel = self.open(addr).await?;
        // Another task may have filled the pool meanwhile; then its channels serve. Evicted
        // meanwhile, the new channel serves this call unpooled.
        let picked = {
            let mut peers = self.peers.lock_or_recover();
            peers
                .get_mut(addr)
                .and_then(|peer| Self::pick(peer, true, self.config.max_per_peer))
        };
        Ok(picked.unwrap_or_else(|| PooledClient::new(channel, None)))
    }

    /// Connects to `addr`, pooling the channel while the peer is under the cap.
    async fn open(&self, addr: &Target) -> Result<Channel, NodeError> {
        let channel = self.connect(addr).await?;
        {
            let mut peers = self.peers.lock_or_recover();
            let peer = peers.entry(addr.clone()).or_default();
            if peer.channels.len() < self.config.max_per_peer {
                peer.channels.push(Pooled {
                    channel: channel.clone(),
                    in_flight: Arc::new(AtomicUsize::new(0)),
                });
            }
            peer.last_used = Some(Instant::now());
        }
        self.update_gauges();
        Ok(channel)
    }

    /// A client to `addr` for small control calls (receipts, session ends). It rides an
    /// existing channel, busy or not, since HTTP/2 multiplexes it beside a Forward, and it does
    /// not count as in flight, so it never makes the next Forward open a connection. A new
    /// connection is made only when the peer has none.
    pub async fn control_client(&self, addr: &Target) -> Result<PooledClient, NodeError> {
        Ok(PooledClient::new(self.control_channel(addr).await?, None))
    }

    /// The channel a [`ConnectionPool::control_client`] rides, for the other services a node
    /// serves (the DHT): it never counts as in flight.
    pub async fn control_channel(&self, addr: &Target) -> Result<Channel, NodeError> {
        let pooled = {
            let mut peers = self.peers.lock_or_recover();
            peers.get_mut(addr).and_then(|peer| {
                peer.last_used = Some(Instant::now());
                Some(peer.channels.first()?.channel.clone())
            })
        };
        match pooled {
            Some(channel) => Ok(channel),
            None => self.open(addr).await,
        }
    }

    /// A channel to `addr` with no call in flight, or the least busy one when at the cap.
    fn reuse(&self, addr: &Target) -> Option<PooledClient> {
        let mut peers = self.peers.lock_or_recover();
        Self::pick(peers.get_mut(addr)?, false, self.config.max_per_peer)
    }

    /// The least busy channel of `peer`; unless `any`, only an idle one or one at the cap.
    fn pick(peer: &mut PeerChannels, any: bool, max_per_peer: usize) -> Option<PooledClient> {
        let full = peer.channels.len() >= max_per_peer;
        let best = peer
            .channels
            .iter()
            .min_by_key(|p| p.in_flight.load(Ordering::Relaxed))?;
        if !any && !full && best.in_flight.load(Ordering::Relaxed) > 0 {
            return None;
        }
        best.in_flight.fetch_add(1, Ordering::Relaxed);
        let client = PooledClient::new(best.channel.clone(), Some(best.in_flight.clone()));
        peer.last_used = Some(Instant::now());
        Some(client)
    }

    async fn connect(&self, addr: &Target) -> Result<Channel, NodeError> {
        connect(addr, &self.dialler, self.config.connect_timeout).await
    }

    /// Closes every channel to `addr` (after a transport failure), so the next call reconnects.
    pub fn evict(&self, addr: &Target) {
        self.peers.lock_or_recover().remove(addr);
        self.update_gauges();
    }

    /// Closes channels of peers idle longer than the idle timeout; how many peers.
    pub fn reap(&self, now: Instant) -> usize {
        let idle = self.config.idle_timeout;
        let mut peers = self.peers.lock_or_recover();
        let before = peers.len();
        peers.retain(|_, p| {
            let busy = p
                .channels
                .iter()
                .any(|c| c.in_flight.load(Ordering::Relaxed) > 0);
            busy || p.last_used.is_some_and(|t| now.duration_since(t) <= idle)
        });
        let reaped = before - peers.len();
        drop(peers);
        self.update_gauges();
        reaped
    }

    /// Channels to `addr` now pooled.
    pub fn channels_to(&self, addr: &Target) -> usize {
        self.peers
            .lock_or_recover()
            .get(addr)
            .map_or(0, |p| p.channels.len())
    }

    fn update_gauges(&self) {
        let peers = self.peers.lock_or_recover();
        let channels: usize = peers.values().map(|p| p.channels.len()).sum();
        self.metrics
            .active_connections
            .store(channels as u64, Ordering::Relaxed);
        self.metrics
            .pool_size
            .store(peers.len() as u64, Ordering::Relaxed);
    }

    /// Reaps idle peers every quarter idle-timeout until the pool is dropped.
    pub fn spawn_reaper(self: &Arc<Self>) {
        let pool = Arc::downgrade(self);
        let period = self.config.idle_timeout / 4;
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(period);
            tick.tick().await;
            loop {
                tick.tick().await;
                let Some(pool) = pool.upgrade() else { return };
                pool.reap(Instant::now());
            }
        });
    }
}

/// A channel to the node at `to` with the transport settings every NeuroShard client shares:
/// `host:port` over TCP, or `relay://RELAY/KEY` through the relay, secured end to end to KEY;
/// TLS 1.3 over either, proving `dialler`'s key and checking the node key that answers
/// ([`crate::tls`]). Callers see the same gRPC channel either way.
pub async fn connect(
    to: &Target,
    dialler: &Dialler,
    connect_timeout: Duration,
) -> Result<Channel, NodeError> {
    let addr = to.addr.as_str();
    let (endpoint, dial) = (endpoint(addr)?, connector(to, dialler));
    match tokio::time::timeout(connect_timeout, endpoint.connect_with_connector(dial)).await {
        Ok(connected) => connected.map_err(|e| refused(&to.to_string(), describe(&e))),
        Err(_) => Err(refused(
            &to.to_string(),
            format!("no connection within {connect_timeout:?}"),
        )),
    }
}

/// A channel to `to` that connects on its first call, as [`connect`] does, and gives up on a
/// call after `timeout`.
pub fn connect_lazy(
    to: &Target,
    dialler: &Dialler,
    timeout: Duration,
) -> Result<Channel, NodeError> {
    let endpoint = endpoint(&to.addr)?.timeout(timeout);
    Ok(endpoint.connect_with_connector_lazy(connector(to, dialler)))
}

/// The HTTP/2 settings of a channel to `addr`. Its authority is not dialed: the connector
/// reaches the node.
fn endpoint(addr: &str) -> Result<Endpoint, NodeError> {
    let url = match neuroshard_nat::relay::RelayedAddr::parse(addr) {
        Some(_) => "http://relayed.invalid".to_string(),
        None => format!("http://{addr}"),
    };
    Ok(Endpoint::from_shared(url)
        .map_err(|e| refused(addr, e.to_string()))?
        // Megabyte activations would otherwise stall on HTTP/2's 64 KiB default window;
        // the adaptive window grows it to the link's bandwidth-delay product.
        .http2_adaptive_window(true)
        .max_frame_size(crate::HTTP2_MAX_FRAME_BYTES))
}

/// Connecting to `addr` failed for `message`.
fn refused(addr: &str, message: String) -> NodeError {
    NodeError::Connect {
        peer: addr.to_string(),
        message,
    }
}

/// What reaches `to` for a channel: a TCP connection with Nagle off, or a circuit through
/// its relay, then the TLS handshake, checking each connection against the channel's pin.
fn connector(
    to: &Target,
    dialler: &Dialler,
) -> impl tower::Service<
    tonic::transport::Uri,
    Response = hyper_util::rt::TokioIo<tokio_rustls::client::TlsStream<crate::Accepted>>,
    Error = std::io::Error,
    Future = impl Send,
> + Clone
+ Send
+ 'static {
    let (addr, dialler, pin) = (to.addr.clone(), dialler.clone(), Pin::to(to.node));
    tower::service_fn(move |_: tonic::transport::Uri| {
        let (addr, dialler, pin) = (addr.clone(), dialler.clone(), pin.clone());
        async move {
            let stream = match neuroshard_nat::relay::RelayedAddr::parse(&addr) {
                Some(relayed) => {
                    let relayed = relayed.map_err(std::io::Error::other)?;
                    let circuit = neuroshard_nat::relay::dial(&relayed)
                        .await
                        .map_err(std::io::Error::other)?;
                    crate::Accepted::Relayed(circuit)
                }
                None => {
                    let tcp = tokio::net::TcpStream::connect(&addr).await?;
                    tcp.set_nodelay(true)?;
                    crate::Accepted::Tcp(tcp)
                }
            };
            let (secured, _) = dialler
                .connect(stream, &pin)
                .await
                .map_err(std::io::Error::other)?;
            Ok(hyper_util::rt::TokioIo::new(secured))
        }
    })
}

/// A transport error with its causes, which name what failed (the relay's refusal, the
/// handshake) where tonic's own message says only "transport error".
fn describe(error: &(dyn std::error::Error + 'static)) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}
