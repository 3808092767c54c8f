//! Relays: how a node nobody can dial stays reachable.
//!
//! - A reachable node that opts in runs a [`Relay`]: a TCP port that splices callers to the
//!   nodes registered with it, under a cap on the bytes per second it forwards.
//! - A node that cannot be dialed keeps a control connection to a relay ([`spawn_link`]),
//!   registered under its key with a signature. For each caller the relay asks it, over that
//!   link, to open a data connection, and splices the two.
//! - A caller reaches such a node at its relayed address, `relay://RELAY/KEY` ([`RelayedAddr`]),
//!   with [`dial`]: connect to the relay, ask for the key, then run a Noise handshake to that
//!   key through the splice ([`secure`]). The caller gets a byte stream to run gRPC over.
//!
//! The relay only ever sees sealed bytes, and a node that does not hold the key cannot finish
//! the handshake, so the caller knows it talks to the key it asked for.

pub mod frame;
pub mod secure;
#[cfg(test)]
mod tests;

use neuroshard_base::quota::{Held, Quota as Share};
use neuroshard_base::sync::LockExt;
use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::num::NonZeroU32;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ed25519_dalek::{Signer, SigningKey, VerifyingKey};
use governor::{DefaultDirectRateLimiter, RateLimiter};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, DuplexStream};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot, watch};
use tokio_util::sync::CancellationToken;

pub use frame::{Frame, FrameError, KeyBytes};

use crate::NatError;

/// How long a side may take to send its first frame, and a node to answer an incoming circuit.
const FRAME_TIMEOUT: Duration = Duration::from_secs(5);
/// A control link pings this often, and is given up when a ping goes unanswered this long.
const PING_EVERY: Duration = Duration::from_secs(10);
/// Circuits a node opens at once for its relay; further requests meanwhile are dropped.
const OPENING_AT_ONCE: usize = 32;
/// Bytes forwarded per read.
const CHUNK: usize = 16 * 1024;

/// The scheme of a relayed address.
pub const SCHEME: &str = "relay://";

/// Where a relayed node is reached: its relay and its key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RelayedAddr {
    /// The relay's `host:port`.
    pub relay: String,
    /// The node's ed25519 key.
    pub key: KeyBytes,
}

impl RelayedAddr {
    /// `relay://RELAY/KEYHEX` parsed; `None` for an address of another form (a direct
    /// `host:port`), an error for a relayed address that is malformed.
    pub fn parse(addr: &str) -> Option<Result<RelayedAddr, NatError>> {
        let rest = addr.strip_prefix(SCHEME)?;
        let bad = |why: &str| NatError::Relay(format!("relayed address {addr:?}: {why}"));
        Some((|| {
            let (relay, key) = rest
                .rsplit_once('/')
                .ok_or_else(|| bad("expected relay://HOST:PORT/KEY"))?;
            if relay.is_empty() || !relay.contains(':') {
                return Err(bad("the relay is not a host:port"));
            }
            let mut bytes = [0u8; 32];
            if key.len() != 64 || !key.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Err(bad("the key is not 64 hex digits"));
            }
            for (i, byte) in bytes.iter_mut().enumerate() {
                *byte = u8::from_str_radix(&key[2 * i..2 * i + 2], 16)
                    .map_err(|_| bad("the key is not 64 hex digits"))?;
            }
            Ok(RelayedAddr {
                relay: relay.to_string(),
                key: bytes,
            })
        })())
    }
}

impl std::fmt::Display for RelayedAddr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{SCHEME}{}/", self.relay)?;
        self.key.iter().try_for_each(|b| write!(f, "{b:02x}"))
    }
}

/// Limits of a relay.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RelayConfig {
    /// Bytes per second forwarded over all circuits, both ways together, in KB/s (1000
    /// bytes); 0 for no cap. Default 1000 KB/s: a home uplink's share, not all of it.
    pub kbps: u32,
    /// Nodes registered at once. Default 64.
    pub max_nodes: usize,
    /// Circuits open at once. Default 256.
    pub max_circuits: usize,
    /// Nodes registered at once from one IP address. Default 8.
    pub max_nodes_per_ip: usize,
    /// Circuits open at once for callers at one IP address. Default 16.
    pub max_circuits_per_ip: usize,
    /// A circuit that carries no byte either way for this long is closed. Default 5 min: a
    /// gRPC connection over it pings every 30 s, so only a dead or silent one goes.
    pub idle_timeout: Duration,
}

impl Default for RelayConfig {
    fn default() -> Self {
        Self {
            kbps: 1000,
            max_nodes: 64,
            max_circuits: 256,
            max_nodes_per_ip: 8,
            max_circuits_per_ip: 16,
            idle_timeout: Duration::from_secs(300),
        }
    }
}

/// What a relay has done so far.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RelayStats {
    /// Nodes registered now.
    pub nodes: usize,
    /// Circuits open now.
    pub circuits: usize,
    /// Bytes forwarded, both ways.
    pub bytes: u64,
}

struct Registered {
    /// Distinguishes this registration from a later one of the same key.
    generation: u64,
    to_node: mpsc::Sender<Frame>,
}

struct Shared {
    config: RelayConfig,
    nodes: Mutex<HashMap<KeyBytes, Registered>>,
    pending: Mutex<HashMap<u64, oneshot::Sender<TcpStream>>>,
    /// Connections that have not sent their first frame yet.
    opening: Arc<Share>,
    /// Registrations, counted per address (their total is `nodes`' length).
    registrations: Arc<Share>,
    circuits: Arc<Share>,
    bytes: AtomicU64,
    generation: AtomicU64,
    limiter: Option<DefaultDirectRateLimiter>,
}

/// A running relay; it stops when its cancellation token fires.
#[derive(Clone)]
pub struct Relay {
    addr: SocketAddr,
    shared: Arc<Shared>,
}

impl std::fmt::Debug for Relay {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Relay")
            .field("addr", &self.addr)
            .field("stats", &self.stats())
            .finish()
    }
}

impl Relay {
    /// Listens on `listen` (port 0 picks one) until `cancel` fires.
    pub async fn start(
        listen: SocketAddr,
        config: RelayConfig,
        cancel: CancellationToken,
    ) -> Result<Relay, NatError> {
        let listener = tokio::net::TcpListener::bind(listen)
            .await
            .map_err(|e| NatError::io(format!("binding the relay to {listen}"), e))?;
        let addr = listener
            .local_addr()
            .map_err(|e| NatError::io("reading the relay's address", e))?;
        let limiter = NonZeroU32::new(config.kbps.saturating_mul(1000)).map(|rate| {
            // A burst of at least one chunk, else a chunk could never pass.
            let burst = rate.max(NonZeroU32::new(CHUNK as u32).expect("non-zero"));
            RateLimiter::direct(governor::Quota::per_second(rate).allow_burst(burst))
        });
        let shared = Arc::new(Shared {
            config,
            nodes: Mutex::new(HashMap::new()),
            pending: Mutex::new(HashMap::new()),
            opening: Share::new("opening connections", OPENING_AT_ONCE * 8, OPENING_AT_ONCE),
            registrations: Share::new("registrations", usize::MAX, config.max_nodes_per_ip),
            circuits: Share::new("circuits", config.max_circuits, config.max_circuits_per_ip),
            bytes: AtomicU64::new(0),
            generation: AtomicU64::new(0),
            limiter,
        });
        let accepting = shared.clone();
        tokio::spawn(async move {
            loop {
                let (stream, peer) = tokio::select! {
                    _ = cancel.cancelled() => return,
                    accepted = listener.accept() => match accepted {
                        Ok(accepted) => accepted,
                        Err(e) => {
                            // Out of descriptors, most likely: give connections time to end.
                            tracing::warn!("relay accept failed: {e}");
                            tokio::time::sleep(Duration::from_millis(100)).await;
                            continue;
                        }
                    },
                };
                let _ = stream.set_nodelay(true);
                let shared = accepting.clone();
                let cancel = cancel.clone();
                tokio::spawn(async move {
                    tokio::select! {
                        _ = cancel.cancelled() => {}
                        result = shared.serve(stream, peer) => if let Err(e) = result {
                            tracing::debug!("relay connection from {peer}: {e}");
                        }
                    }
                });
            }
        });
        tracing::info!(%addr, kbps = config.kbps, "relay listening");
        Ok(Relay { addr, shared })
    }

    /// The bound address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Counts so far.
    pub fn stats(&self) -> RelayStats {
        RelayStats {
            nodes: self.shared.nodes.lock_or_recover().len(),
            circuits: self.shared.circuits.used(),
            bytes: self.shared.bytes.load(Ordering::Relaxed),
        }
    }
}

impl Shared {
    async fn serve(
        self: Arc<Self>,
        mut stream: TcpStream,
        peer: SocketAddr,
    ) -> Result<(), NatError> {
        let ip = peer.ip().to_canonical();
        let opening = Held::take(&self.opening, Some(ip), 1).map_err(NatError::Relay)?;
        let nonce: [u8; 32] = rand::random();
        write_frame(&mut stream, &Frame::Hello { nonce }).await?;
        let first = tokio::time::timeout(FRAME_TIMEOUT, Frame::read(&mut stream))
            .await
            .map_err(|_| NatError::Relay(format!("{peer} sent nothing")))?
            .map_err(|e| NatError::Relay(e.to_string()))?;
        drop(opening);
        match first {
            Frame::Register { key, signature } => {
                let checked = VerifyingKey::from_bytes(&key)
                    .map_err(|_| "the key is not a valid ed25519 key".to_string())
                    .and_then(|k| {
                        k.verify_strict(
                            &frame::register_message(&nonce),
                            &ed25519_dalek::Signature::from_bytes(&signature),
                        )
                        .map_err(|_| "the signature does not check out".to_string())
                    });
                match checked {
                    Ok(()) => self.control(stream, peer, key).await,
                    Err(reason) => refuse(&mut stream, reason).await,
                }
            }
            Frame::Connect { key } => self.connect(stream, ip, key).await,
            Frame::Accept { circuit } => {
                let waiting = self.pending.lock_or_recover().remove(&circuit);
                match waiting {
                    Some(waiting) => {
                        let _ = waiting.send(stream);
                        Ok(())
                    }
                    None => {
                        refuse(&mut stream, format!("no circuit {circuit:#x} is waiting")).await
                    }
                }
            }
            other => {
                refuse(
                    &mut stream,
                    format!("a connection cannot open with {other:?}"),
                )
                .await
            }
        }
    }

    /// Keeps a registered node's control link: incoming circuits go out, pings are answered,
    /// and the registration ends with the connection.
    async fn control(
        &self,
        stream: TcpStream,
        peer: SocketAddr,
        key: KeyBytes,
    ) -> Result<(), NatError> {
        let mut stream = stream;
        let ip = peer.ip().to_canonical();
        let _registration = match Held::take(&self.registrations, Some(ip), 1) {
            Ok(held) => held,
            Err(reason) => return refuse(&mut stream, reason).await,
        };
        let generation = self.generation.fetch_add(1, Ordering::Relaxed);
        let (to_node, mut outgoing) = mpsc::channel(64);
        let full = {
            let mut nodes = self.nodes.lock_or_recover();
            let full = nodes.len() >= self.config.max_nodes && !nodes.contains_key(&key);
            if !full {
                // A node that reconnects replaces its old link, which then ends.
                nodes.insert(
                    key,
                    Registered {
                        generation,
                        to_node,
                    },
                );
            }
            full
        };
        if full {
            let reason = format!("this relay is full ({} nodes)", self.config.max_nodes);
            return refuse(&mut stream, reason).await;
        }
        let (reader, mut writer) = stream.into_split();
        let mut frames = frame_reader(reader);
        let result = async {
            write_frame(&mut writer, &Frame::Registered { observed: peer.to_string() }).await?;
            let mut silent = tokio::time::interval(PING_EVERY * 3);
            silent.tick().await;
            loop {
                tokio::select! {
                    out = outgoing.recv() => match out {
                        Some(frame) => write_frame(&mut writer, &frame).await?,
                        None => return Ok(()),
                    },
                    got = frames.recv() => match got {
                        Some(Ok(Frame::Ping)) => {
                            silent.reset();
                            write_frame(&mut writer, &Frame::Pong).await?;
                        }
                        Some(Ok(Frame::Pong)) => silent.reset(),
                        Some(Ok(other)) => {
                            return Err(NatError::Relay(format!("unexpected {other:?} on a control link")));
                        }
                        Some(Err(e)) => return Err(NatError::Relay(e.to_string())),
                        None => return Ok(()),
                    },
                    _ = silent.tick() => {
                        return Err(NatError::Relay(format!("{peer} went silent")));
                    }
                }
            }
        }
        .await;
        let mut nodes = self.nodes.lock_or_recover();
        if nodes.get(&key).is_some_and(|r| r.generation == generation) {
            nodes.remove(&key);
        }
        result
    }

    /// Splices a caller to the node registered as `key`, once the node has opened a data
    /// connection for the circuit.
    async fn connect(
        &self,
        mut caller: TcpStream,
        ip: IpAddr,
        key: KeyBytes,
    ) -> Result<(), NatError> {
        let to_node = self
            .nodes
            .lock_or_recover()
            .get(&key)
            .map(|r| r.to_node.clone());
        let Some(to_node) = to_node else {
            let short: String = key[..4].iter().map(|b| format!("{b:02x}")).collect();
            return refuse(
                &mut caller,
                format!("no node with key {short}… is registered here"),
            )
            .await;
        };
        // Held until the circuit ends, however it ends.
        let _slot = match Held::take(&self.circuits, Some(ip), 1) {
            Ok(slot) => slot,
            Err(reason) => {
                let reason = format!("this relay has no room for another circuit: {reason}");
                return refuse(&mut caller, reason).await;
            }
        };
        let circuit: u64 = rand::random();
        let (handover, node_side) = oneshot::channel();
        self.pending.lock_or_recover().insert(circuit, handover);
        // A node that stops reading its link cannot hold the caller: the whole opening is timed.
        let opened = tokio::time::timeout(FRAME_TIMEOUT, async {
            to_node.send(Frame::Incoming { circuit }).await.ok()?;
            node_side.await.ok()
        })
        .await
        .ok()
        .flatten();
        self.pending.lock_or_recover().remove(&circuit);
        let Some(node) = opened else {
            return refuse(
                &mut caller,
                "the node did not answer through its link".into(),
            )
            .await;
        };
        write_frame(&mut caller, &Frame::Connected).await?;
        let (caller_in, caller_out) = caller.into_split();
        let (node_in, node_out) = node.into_split();
        let last = AtomicU64::new(0);
        let started = tokio::time::Instant::now();
        let splice = async {
            tokio::join!(
                self.forward(caller_in, node_out, (&last, started)),
                self.forward(node_in, caller_out, (&last, started)),
            )
        };
        tokio::select! {
            _ = splice => {}
            _ = idle(&last, started, self.config.idle_timeout) => {
                tracing::debug!("relay: closed a circuit idle for {:?}", self.config.idle_timeout);
            }
        }
        Ok(())
    }

    /// Copies `from` to `to` under the relay's cap until either ends, noting in `last` when
    /// it last moved bytes (ms after the circuit started).
    async fn forward<R, W>(
        &self,
        mut from: R,
        mut to: W,
        (last, started): (&AtomicU64, tokio::time::Instant),
    ) -> std::io::Result<()>
    where
        R: AsyncRead + Unpin,
        W: AsyncWrite + Unpin,
    {
        let mut buf = vec![0u8; CHUNK];
        loop {
            let n = from.read(&mut buf).await?;
            last.store(started.elapsed().as_millis() as u64, Ordering::Relaxed);
            if n == 0 {
                return to.shutdown().await;
            }
            if let Some(limiter) = &self.limiter {
                let n = NonZeroU32::new(n as u32).expect("non-zero read");
                // A chunk never exceeds the burst, so this only waits.
                let _ = limiter.until_n_ready(n).await;
            }
            to.write_all(&buf[..n]).await?;
            self.bytes.fetch_add(n as u64, Ordering::Relaxed);
        }
    }
}

/// Returns once `timeout` has passed since `last` (ms after `started`) last moved.
async fn idle(last: &AtomicU64, started: tokio::time::Instant, timeout: Duration) {
    loop {
        let moved = started + Duration::from_millis(last.load(Ordering::Relaxed));
        if moved.elapsed() >= timeout {
            return;
        }
        tokio::time::sleep_until(moved + timeout).await;
    }
}

async fn write_frame<W: AsyncWrite + Unpin>(w: &mut W, frame: &Frame) -> Result<(), NatError> {
    frame
        .write(w)
        .await
        .map_err(|e| NatError::Relay(e.to_string()))
}

async fn refuse(stream: &mut TcpStream, reason: String) -> Result<(), NatError> {
    write_frame(
        stream,
        &Frame::Refused {
            reason: reason.clone(),
        },
    )
    .await?;
    Err(NatError::Relay(format!("refused: {reason}")))
}

/// Frames read off `reader` by a task of their own, so callers can wait on them in a select
/// without losing half a frame; the channel closes at the end of the stream or after an error.
fn frame_reader<R: AsyncRead + Unpin + Send + 'static>(
    mut reader: R,
) -> mpsc::Receiver<Result<Frame, FrameError>> {
    let (tx, rx) = mpsc::channel(16);
    tokio::spawn(async move {
        loop {
            // Ends with its receiver too, so a silent peer's socket is not held forever.
            let frame = tokio::select! {
                _ = tx.closed() => return,
                frame = Frame::read(&mut reader) => frame,
            };
            let end = frame.is_err();
            if end && matches!(frame, Err(FrameError::Truncated { got: 0, .. })) {
                return;
            }
            if tx.send(frame).await.is_err() || end {
                return;
            }
        }
    });
    rx
}

/// Opens a connection to `relay` and reads its hello.
async fn open(relay: &str) -> Result<(TcpStream, [u8; 32]), NatError> {
    let mut stream = tokio::time::timeout(FRAME_TIMEOUT, TcpStream::connect(relay))
        .await
        .map_err(|_| {
            NatError::Relay(format!(
                "relay {relay} did not accept within {FRAME_TIMEOUT:?}"
            ))
        })?
        .map_err(|e| NatError::io(format!("connecting to relay {relay}"), e))?;
    let _ = stream.set_nodelay(true);
    match read_frame(&mut stream, relay).await? {
        Frame::Hello { nonce } => Ok((stream, nonce)),
        other => Err(NatError::Relay(format!(
            "relay {relay} opened with {other:?}"
        ))),
    }
}

async fn read_frame(stream: &mut TcpStream, relay: &str) -> Result<Frame, NatError> {
    match tokio::time::timeout(FRAME_TIMEOUT, Frame::read(stream)).await {
        Err(_) => Err(NatError::Relay(format!("relay {relay} did not answer"))),
        Ok(Err(e)) => Err(NatError::Relay(format!("relay {relay}: {e}"))),
        Ok(Ok(Frame::Refused { reason })) => {
            Err(NatError::Relay(format!("relay {relay} refused: {reason}")))
        }
        Ok(Ok(frame)) => Ok(frame),
    }
}

/// Reaches the node at `addr` through its relay, secured end to end to its key: a stream to
/// run gRPC over. Fails if the relay refuses or the far end does not hold the key.
pub async fn dial(addr: &RelayedAddr) -> Result<DuplexStream, NatError> {
    let (mut stream, _) = open(&addr.relay).await?;
    write_frame(&mut stream, &Frame::Connect { key: addr.key }).await?;
    match read_frame(&mut stream, &addr.relay).await? {
        Frame::Connected => {}
        other => {
            return Err(NatError::Relay(format!(
                "relay {} answered {other:?}",
                addr.relay
            )));
        }
    }
    secure::initiate(stream, &addr.key)
        .await
        .map_err(|e| NatError::Relay(e.to_string()))
}

/// Where a node's link to its relay stands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LinkState {
    /// Connecting, or reconnecting after a failure.
    Connecting {
        /// The relay.
        relay: String,
        /// Why the last attempt ended, if one did.
        last_error: Option<String>,
    },
    /// Registered: callers reach the node at `addr`.
    Registered {
        /// The node's relayed address.
        addr: RelayedAddr,
        /// Where the relay sees the node.
        observed: String,
    },
    /// Stopped.
    Stopped,
}

/// Keeps `key` registered at `relay` until `cancel` fires, reconnecting with backoff (from
/// 100 ms, doubling to 5 s) whenever the link drops or the relay goes silent. Each circuit a
/// caller opens goes to `circuits`, secured end to end; the watch says where the link stands.
pub fn spawn_link(
    relay: String,
    key: SigningKey,
    circuit_tx: mpsc::Sender<DuplexStream>,
    cancel: CancellationToken,
) -> watch::Receiver<LinkState> {
    let (state_tx, state) = watch::channel(LinkState::Connecting {
        relay: relay.clone(),
        last_error: None,
    });
    let key = Arc::new(key);
    tokio::spawn(async move {
        let mut backoff = Duration::from_millis(100);
        loop {
            let run = run_link(&relay, &key, &state_tx, &circuit_tx, &cancel);
            let error = tokio::select! {
                _ = cancel.cancelled() => break,
                result = run => match result {
                    Ok(registered) => {
                        if registered {
                            backoff = Duration::from_millis(100);
                        }
                        "the relay closed the link".to_string()
                    }
                    Err(e) => e.to_string(),
                },
            };
            tracing::warn!("relay link to {relay}: {error}; reconnecting in {backoff:?}");
            state_tx.send_replace(LinkState::Connecting {
                relay: relay.clone(),
                last_error: Some(error),
            });
            tokio::select! {
                _ = cancel.cancelled() => break,
                _ = tokio::time::sleep(backoff) => {}
            }
            backoff = (backoff * 2).min(Duration::from_secs(5));
        }
        state_tx.send_replace(LinkState::Stopped);
    });
    state
}

/// One life of a link: register, then serve the relay's requests until the link ends.
/// Ok(true) if it got registered before ending cleanly.
async fn run_link(
    relay: &str,
    key: &Arc<SigningKey>,
    state: &watch::Sender<LinkState>,
    circuits: &mpsc::Sender<DuplexStream>,
    cancel: &CancellationToken,
) -> Result<bool, NatError> {
    let (mut stream, nonce) = open(relay).await?;
    let signature = key.sign(&frame::register_message(&nonce)).to_bytes();
    let public = key.verifying_key().to_bytes();
    write_frame(
        &mut stream,
        &Frame::Register {
            key: public,
            signature,
        },
    )
    .await?;
    let observed = match read_frame(&mut stream, relay).await? {
        Frame::Registered { observed } => observed,
        other => return Err(NatError::Relay(format!("relay {relay} answered {other:?}"))),
    };
    let addr = RelayedAddr {
        relay: relay.to_string(),
        key: public,
    };
    tracing::info!(%addr, %observed, "registered with relay");
    state.send_replace(LinkState::Registered { addr, observed });
    let (reader, mut writer) = stream.into_split();
    let mut frames = frame_reader(reader);
    let mut ping = tokio::time::interval(PING_EVERY);
    ping.tick().await;
    let mut answered = true;
    let opening = Arc::new(tokio::sync::Semaphore::new(OPENING_AT_ONCE));
    loop {
        tokio::select! {
            got = frames.recv() => match got {
                Some(Ok(Frame::Incoming { circuit })) => {
                    // A relay asking for more circuits at once than this gets the rest dropped:
                    // it cannot make the node open connections without bound.
                    let Ok(permit) = opening.clone().try_acquire_owned() else {
                        tracing::warn!("relay {relay} asks for over {OPENING_AT_ONCE} circuits at once");
                        continue;
                    };
                    let relay = relay.to_string();
                    let key = key.clone();
                    let circuits = circuits.clone();
                    let cancel = cancel.clone();
                    tokio::spawn(async move {
                        let accepted = tokio::select! {
                            _ = cancel.cancelled() => return,
                            accepted = accept_circuit(&relay, circuit, &key) => accepted,
                        };
                        drop(permit);
                        match accepted {
                            Ok(stream) => { let _ = circuits.send(stream).await; }
                            Err(e) => tracing::warn!("relayed circuit {circuit:#x}: {e}"),
                        }
                    });
                }
                Some(Ok(Frame::Ping)) => write_frame(&mut writer, &Frame::Pong).await?,
                Some(Ok(Frame::Pong)) => answered = true,
                Some(Ok(other)) => {
                    return Err(NatError::Relay(format!("relay {relay} sent {other:?} on the link")));
                }
                Some(Err(e)) => return Err(NatError::Relay(format!("relay {relay}: {e}"))),
                None => return Ok(true),
            },
            _ = ping.tick() => {
                if !answered {
                    return Err(NatError::Relay(format!("relay {relay} stopped answering pings")));
                }
                answered = false;
                write_frame(&mut writer, &Frame::Ping).await?;
            }
        }
    }
}

/// Opens the data connection of `circuit` and answers the caller's handshake on it.
async fn accept_circuit(
    relay: &str,
    circuit: u64,
    key: &SigningKey,
) -> Result<DuplexStream, NatError> {
    let (mut stream, _) = open(relay).await?;
    write_frame(&mut stream, &Frame::Accept { circuit }).await?;
    tokio::time::timeout(FRAME_TIMEOUT, secure::respond(stream, key))
        .await
        .map_err(|_| {
            NatError::Relay(format!(
                "circuit {circuit:#x}: the caller sent no handshake"
            ))
        })?
        .map_err(|e| NatError::Relay(e.to_string()))
}
