//! STUN (RFC 8489) Binding over UDP, with stun-rs for the codec.
//!
//! A client sends Binding requests from one socket to two or more servers. Each answers with
//! the address the request came from, as the last NAT on the way mapped it. The same mapped
//! address from servers at different IPs means the NAT maps endpoint-independently (a peer that
//! learns the address can reach the node through it once the node has sent there); different
//! ones mean the mapping depends on the destination, and only a relay helps. The [`Server`]
//! answers Binding requests, so every reachable node can be a STUN server for the swarm.

use std::net::{IpAddr, SocketAddr};
use std::num::NonZeroU32;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use serde::Serialize;
use stun_rs::attributes::stun::{
    ErrorCode, Fingerprint, MappedAddress, Software, XorMappedAddress,
};
use stun_rs::methods::BINDING;
use stun_rs::{
    MessageClass, MessageDecoderBuilder, MessageEncoderBuilder, StunMessage, StunMessageBuilder,
    TransactionId,
};
use tokio::net::UdpSocket;
use tokio_util::sync::CancellationToken;

use crate::NatError;

/// The standard STUN port.
pub const STUN_PORT: u16 = 3478;

/// Largest datagram read; STUN messages over UDP stay below the path MTU.
const MAX_DATAGRAM: usize = 1500;

/// Binding requests a server answers per second for one source address, after a burst of
/// [`PER_SOURCE_BURST`]: a client's probe and its retransmits fit, a reflection does not.
const PER_SOURCE_PER_SECOND: u32 = 5;
const PER_SOURCE_BURST: u32 = 10;

/// Binding requests a server answers per second from everyone, so sources forged by the
/// thousand reflect at most this many small answers.
const ALL_PER_SECOND: u32 = 200;

/// Sources whose rates a server tracks; past this many the stale are forgotten, and if all
/// are fresh (a forged flood), all are.
const MAX_TRACKED_SOURCES: usize = 65_536;

/// The rate limits a [`Server`] answers under.
struct Limits {
    per_source_quota: governor::Quota,
    per_source: governor::DefaultKeyedRateLimiter<IpAddr>,
    all: governor::DefaultDirectRateLimiter,
}

impl Limits {
    fn new() -> Self {
        let rate = |n| NonZeroU32::new(n).expect("a non-zero literal");
        let per_source = governor::Quota::per_second(rate(PER_SOURCE_PER_SECOND))
            .allow_burst(rate(PER_SOURCE_BURST));
        Self {
            per_source_quota: per_source,
            per_source: governor::RateLimiter::keyed(per_source),
            all: governor::RateLimiter::direct(governor::Quota::per_second(rate(ALL_PER_SECOND))),
        }
    }

    /// Whether a request from `ip` is answered: its source's share first, so a flooding
    /// source does not spend everyone's.
    fn allow(&mut self, ip: IpAddr) -> bool {
        if self.per_source.len() >= MAX_TRACKED_SOURCES {
            self.per_source.retain_recent();
            if self.per_source.len() >= MAX_TRACKED_SOURCES {
                self.per_source = governor::RateLimiter::keyed(self.per_source_quota);
            }
        }
        self.per_source.check_key(&ip).is_ok() && self.all.check().is_ok()
    }
}

/// Retransmission of Binding requests (RFC 8489 §6.2.1, shortened: a node asks at start-up and
/// a silent server should not hold it for the RFC's 39.5 s).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Retransmit {
    /// Wait after the first send; doubles after each. Default 250 ms.
    pub rto: Duration,
    /// Sends before giving up. Default 5 (7.75 s in all).
    pub attempts: u32,
}

impl Default for Retransmit {
    fn default() -> Self {
        Self {
            rto: Duration::from_millis(250),
            attempts: 5,
        }
    }
}

/// How a NAT maps this host's socket, as the servers that answered saw it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Mapping {
    /// The servers saw the socket's own address: no NAT in between.
    None,
    /// One mapped address for every server: a peer can reach the node through it.
    EndpointIndependent,
    /// A different mapped address per server: only a relay helps.
    EndpointDependent,
}

/// What a [`probe`] learned.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct StunReport {
    /// The socket the requests came from.
    pub local: SocketAddr,
    /// Each server that answered, and the mapped address it saw.
    pub mapped: Vec<(SocketAddr, SocketAddr)>,
    /// Each server that did not, and why.
    pub failed: Vec<(SocketAddr, String)>,
    /// The mapping, where the answers tell: the socket's own address from any server, or
    /// answers from at least two server IPs.
    pub mapping: Option<Mapping>,
}

impl StunReport {
    /// The address peers see, where every server saw the same one.
    pub fn external(&self) -> Option<SocketAddr> {
        let first = self.mapped.first()?.1;
        self.mapped
            .iter()
            .all(|(_, m)| *m == first)
            .then_some(first)
    }
}

/// What is wrong with a datagram that was taken for STUN.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StunFault {
    /// The bytes do not decode as a STUN message.
    #[error("not a STUN message: {0}")]
    NotStun(String),
    /// The FINGERPRINT attribute is misplaced, malformed or does not match.
    #[error("the FINGERPRINT {0}")]
    Fingerprint(String),
    /// A method other than Binding.
    #[error("method {0} is not Binding")]
    NotBinding(String),
    /// The answer is to a transaction this side did not start.
    #[error("the answer is to another transaction")]
    OtherTransaction,
    /// The server answered with an error.
    #[error("error response {0}")]
    ErrorResponse(String),
    /// A request where a response belongs, or the other way round.
    #[error("a {found} where a {expected} belongs")]
    WrongClass {
        /// The class received.
        found: String,
        /// What belongs there.
        expected: &'static str,
    },
    /// The response names no address, or a malformed one.
    #[error("the response has no XOR-MAPPED-ADDRESS or MAPPED-ADDRESS it can read{0}")]
    NoAddress(String),
}

/// Decodes a message from the network, checking its FINGERPRINT where it has one.
/// MESSAGE-INTEGRITY is not checked: Binding here carries no credentials (the answer is the
/// asker's own address), so a request or response that has one is taken as if it had none.
fn decode(bytes: &[u8]) -> Result<StunMessage, StunFault> {
    let (message, _) = MessageDecoderBuilder::default()
        .build()
        .decode(bytes)
        .map_err(|e| StunFault::NotStun(e.to_string()))?;
    if let Some(fingerprint) = message.get::<Fingerprint>() {
        let fault = |why: String| StunFault::Fingerprint(why);
        let fingerprint = fingerprint
            .as_fingerprint()
            .map_err(|e| fault(format!("is malformed: {e}")))?;
        let covered = stun_rs::get_input_text::<Fingerprint>(bytes)
            .ok_or_else(|| fault("attribute is misplaced".into()))?;
        if !fingerprint.validate(&covered) {
            return Err(fault("does not match the message".into()));
        }
    }
    Ok(message)
}

fn encode(message: &StunMessage) -> Vec<u8> {
    let mut buf = [0u8; 256];
    let n = MessageEncoderBuilder::default()
        .build()
        .encode(&mut buf, message)
        .expect("a Binding message of at most three attributes fits 256 bytes");
    buf[..n].to_vec()
}

/// A Binding request with a fresh random transaction id, and its bytes.
pub fn binding_request() -> (TransactionId, Vec<u8>) {
    let tid = TransactionId::default();
    let request = StunMessageBuilder::new(BINDING, MessageClass::Request)
        .with_transaction_id(tid)
        .with_attribute(Fingerprint::default())
        .build();
    (tid, encode(&request))
}

/// The mapped address a Binding success response to `tid` carries; what is wrong otherwise.
pub fn parse_binding_response(bytes: &[u8], tid: &TransactionId) -> Result<SocketAddr, StunFault> {
    let message = decode(bytes)?;
    if message.method() != BINDING {
        return Err(StunFault::NotBinding(format!("{:?}", message.method())));
    }
    if message.transaction_id() != tid {
        return Err(StunFault::OtherTransaction);
    }
    match message.class() {
        MessageClass::SuccessResponse => {}
        MessageClass::ErrorResponse => {
            let code = message
                .get::<ErrorCode>()
                .and_then(|a| a.as_error_code().ok())
                .map(|e| format!("{:?}", e.error_code()))
                .unwrap_or_else(|| "with no ERROR-CODE".into());
            return Err(StunFault::ErrorResponse(code));
        }
        class => {
            return Err(StunFault::WrongClass {
                found: format!("{class:?}"),
                expected: "response",
            });
        }
    }
    fn malformed(e: impl std::fmt::Display) -> StunFault {
        StunFault::NoAddress(format!(" ({e})"))
    }
    if let Some(attribute) = message.get::<XorMappedAddress>() {
        let xor = attribute.as_xor_mapped_address().map_err(malformed)?;
        return Ok(*xor.socket_address());
    }
    if let Some(attribute) = message.get::<MappedAddress>() {
        let plain = attribute.as_mapped_address().map_err(malformed)?;
        return Ok(*plain.socket_address());
    }
    Err(StunFault::NoAddress(String::new()))
}

/// A STUN server's answer to a datagram from `peer`: a Binding success response naming the
/// peer's address; what is wrong with the datagram otherwise.
pub fn answer(request: &[u8], peer: SocketAddr) -> Result<Vec<u8>, StunFault> {
    let message = decode(request)?;
    if message.method() != BINDING || message.class() != MessageClass::Request {
        return Err(StunFault::WrongClass {
            found: format!("{:?} of method {:?}", message.class(), message.method()),
            expected: "Binding request",
        });
    }
    // A dual-stack socket sees IPv4 peers as ::ffff:a.b.c.d; they are told their IPv4 address.
    let peer = SocketAddr::new(peer.ip().to_canonical(), peer.port());
    let software = Software::new(concat!("neuroshard ", env!("CARGO_PKG_VERSION")))
        .expect("a short ASCII name");
    let response = StunMessageBuilder::new(BINDING, MessageClass::SuccessResponse)
        .with_transaction_id(*message.transaction_id())
        .with_attribute(XorMappedAddress::from(peer))
        .with_attribute(software)
        .with_attribute(Fingerprint::default())
        .build();
    Ok(encode(&response))
}

/// Asks `server` which address `socket` is mapped to, retransmitting as `retransmit` says.
/// Datagrams from elsewhere, and answers to other transactions, are skipped.
pub async fn query(
    socket: &UdpSocket,
    server: SocketAddr,
    retransmit: Retransmit,
) -> Result<SocketAddr, NatError> {
    let (tid, request) = binding_request();
    let mut wait = retransmit.rto;
    let mut waited = Duration::ZERO;
    let mut buf = vec![0u8; MAX_DATAGRAM];
    for _ in 0..retransmit.attempts.max(1) {
        socket
            .send_to(&request, server)
            .await
            .map_err(|e| NatError::io(format!("sending a STUN request to {server}"), e))?;
        let deadline = tokio::time::Instant::now() + wait;
        while let Ok(received) = tokio::time::timeout_at(deadline, socket.recv_from(&mut buf)).await
        {
            let (len, from) = received
                .map_err(|e| NatError::io(format!("reading STUN answers from {server}"), e))?;
            if from != server {
                continue;
            }
            match parse_binding_response(&buf[..len], &tid) {
                Ok(mapped) => return Ok(mapped),
                Err(StunFault::OtherTransaction) => continue,
                Err(why) => {
                    return Err(NatError::Stun {
                        from: server.to_string(),
                        why,
                    });
                }
            }
        }
        waited += wait;
        wait *= 2;
    }
    Err(NatError::StunTimeout {
        server: server.to_string(),
        waited,
    })
}

/// Asks every server in turn from one fresh socket (on the address routed toward the first),
/// and classifies the mapping from the answers. Servers that fail are listed, not fatal.
pub async fn probe(servers: &[SocketAddr], retransmit: Retransmit) -> Result<StunReport, NatError> {
    let first = *servers
        .first()
        .ok_or_else(|| NatError::Config("stun: no servers to ask".into()))?;
    let ip = crate::local_ip_toward(first)?;
    let socket = UdpSocket::bind(SocketAddr::new(ip, 0))
        .await
        .map_err(|e| NatError::io("binding the STUN socket", e))?;
    let local = socket
        .local_addr()
        .map_err(|e| NatError::io("reading the STUN socket's address", e))?;
    let mut report = StunReport {
        local,
        mapped: Vec::new(),
        failed: Vec::new(),
        mapping: None,
    };
    for &server in servers {
        match query(&socket, server, retransmit).await {
            Ok(mapped) => report.mapped.push((server, mapped)),
            Err(e) => report.failed.push((server, e.to_string())),
        }
    }
    report.mapping = classify(local, &report.mapped);
    Ok(report)
}

/// The mapping the answers show: none where any server saw the socket's own address; else,
/// given answers from at least two server IPs, whether they all saw one address.
pub fn classify(local: SocketAddr, mapped: &[(SocketAddr, SocketAddr)]) -> Option<Mapping> {
    if mapped.iter().any(|(_, m)| *m == local) {
        return Some(Mapping::None);
    }
    let mut ips: Vec<_> = mapped.iter().map(|(server, _)| server.ip()).collect();
    ips.sort();
    ips.dedup();
    if ips.len() < 2 {
        return None;
    }
    let first = mapped[0].1;
    Some(if mapped.iter().all(|(_, m)| *m == first) {
        Mapping::EndpointIndependent
    } else {
        Mapping::EndpointDependent
    })
}

/// A STUN server on a UDP socket: it answers Binding requests with the requester's address,
/// at most [`PER_SOURCE_PER_SECOND`] a second per source and [`ALL_PER_SECOND`] in all, and
/// drops anything else, counting it.
#[derive(Debug)]
pub struct Server {
    addr: SocketAddr,
    answered: Arc<AtomicU64>,
    refused: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl Server {
    /// Binds `listen` and answers until `cancel`.
    pub async fn start(listen: SocketAddr, cancel: CancellationToken) -> Result<Self, NatError> {
        let socket = UdpSocket::bind(listen)
            .await
            .map_err(|e| NatError::io(format!("binding the STUN server on {listen}"), e))?;
        let addr = socket
            .local_addr()
            .map_err(|e| NatError::io("reading the STUN server's address", e))?;
        let answered = Arc::new(AtomicU64::new(0));
        let refused = Arc::new(AtomicU64::new(0));
        let task = tokio::spawn(serve(socket, answered.clone(), refused.clone(), cancel));
        tracing::info!(%addr, "answering STUN");
        Ok(Self {
            addr,
            answered,
            refused,
            task,
        })
    }

    /// The bound address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Binding requests answered so far.
    pub fn answered(&self) -> u64 {
        self.answered.load(Ordering::Relaxed)
    }

    /// Datagrams dropped so far (not a Binding request, malformed, or over a rate limit).
    pub fn refused(&self) -> u64 {
        self.refused.load(Ordering::Relaxed)
    }

    /// Waits for the server to end after its cancellation.
    pub async fn stopped(self) {
        let _ = self.task.await;
    }
}

async fn serve(
    socket: UdpSocket,
    answered: Arc<AtomicU64>,
    refused: Arc<AtomicU64>,
    cancel: CancellationToken,
) {
    let mut buf = vec![0u8; MAX_DATAGRAM];
    let mut limits = Limits::new();
    loop {
        let (len, peer) = tokio::select! {
            _ = cancel.cancelled() => return,
            received = socket.recv_from(&mut buf) => match received {
                Ok(received) => received,
                // An ICMP error from an earlier send surfaces here on some systems: not fatal.
                Err(e) => {
                    tracing::debug!("STUN server: {e}");
                    continue;
                }
            },
        };
        if !limits.allow(peer.ip().to_canonical()) {
            refused.fetch_add(1, Ordering::Relaxed);
            continue;
        }
        match answer(&buf[..len], peer) {
            Ok(response) => {
                answered.fetch_add(1, Ordering::Relaxed);
                if let Err(e) = socket.send_to(&response, peer).await {
                    tracing::debug!("STUN server: answering {peer}: {e}");
                }
            }
            Err(why) => {
                tracing::debug!("STUN server: dropped a datagram from {peer}: {why}");
                refused.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}

#[cfg(test)]
mod tests;
