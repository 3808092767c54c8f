//! The server every node and tracker runs: TLS on every connection, bounded handshakes,
//! connection caps in all and per address, HTTP/2 and TCP keepalive, a deadline on every call
//! and a maximum connection age, so a stranger can hold neither descriptors nor calls without
//! a bound.

use std::sync::Arc;
use std::time::Duration;

use neuroshard_base::quota::{Held, Quota};

use crate::{HTTP2_MAX_FRAME_BYTES, bandwidth, tls};

mod metered;

/// Calls one connection may have in flight, as HTTP/2 streams; a client pools up to three
/// connections, so this bounds what one peer can make a server decode at once (their bodies
/// are bounded by the request-byte budget). Every stream admitted runs: none queues on the
/// server behind the others, where its body would sit in the connection's flow-control window
/// while the running calls waited for the rest of theirs and the connection stalled (17 calls
/// of 1 MiB at once did, when 16 ran and 48 more could queue). A client holds calls past this,
/// bodies unsent, once the server's settings arrive; before that a burst past it is refused
/// (REFUSED_STREAM), so it is as high as the bursts callers make.
const MAX_CALLS_PER_CONNECTION: u32 = 64;

/// Longest a call may run, queueing included: a 2,048-token prefill of a large shard on a
/// slow CPU, or a checkpoint upload, fits; a caller trickling its request is cut off.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(600);

/// HTTP/2 ping interval on idle connections, and how long an unanswered ping waits before the
/// connection is closed: a peer that vanished frees its slot within a minute.
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(30);
const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(20);

/// TCP keepalive on accepted sockets, for peers that vanish without a word.
const TCP_KEEPALIVE: Duration = Duration::from_secs(60);

/// A connection is told to go away after this long, and closed after the grace that follows:
/// no caller holds one connection (and the slot it takes) for ever. Pooled clients reconnect.
const MAX_CONNECTION_AGE: Duration = Duration::from_secs(3600);
const MAX_CONNECTION_AGE_GRACE: Duration = Duration::from_secs(600);

/// What a server holds at once for its callers, in all and per caller address. A connection
/// over a limit is closed as soon as it is accepted, before its handshake; a call whose body
/// would take the server over its request bytes is refused with RESOURCE_EXHAUSTED.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ServerLimits {
    /// Most connections open at once, relayed circuits included. Default 1,024.
    pub max_connections: usize,
    /// Most open connections from one IP address. Default 64: a household or a carrier's NAT
    /// of peers, each pooling a few connections.
    pub max_connections_per_ip: usize,
    /// Most bytes of request bodies held at once, before and while they decode. Default
    /// 512 MiB.
    pub max_request_bytes: usize,
    /// Most bytes of request bodies from one IP address held at once. Default 128 MiB: a
    /// message at the 101 MiB cap fits, a flood of them from one address does not.
    pub max_request_bytes_per_ip: usize,
}

impl Default for ServerLimits {
    fn default() -> Self {
        Self {
            max_connections: 1024,
            max_connections_per_ip: 64,
            max_request_bytes: 512 << 20,
            max_request_bytes_per_ip: 128 << 20,
        }
    }
}

impl ServerLimits {
    /// Names the first limit that is zero.
    pub fn validate(&self) -> Result<(), String> {
        let fields = [
            ("max_connections", self.max_connections),
            ("max_connections_per_ip", self.max_connections_per_ip),
            ("max_request_bytes", self.max_request_bytes),
            ("max_request_bytes_per_ip", self.max_request_bytes_per_ip),
        ];
        match fields.iter().find(|(_, v)| *v == 0) {
            Some((name, _)) => Err(format!("{name} must be positive")),
            None => Ok(()),
        }
    }
}

/// A connection's place among the open ones.
pub(crate) type Slot = Held;

/// How [`spawn_server`] serves: its TLS identity, the owner's bandwidth caps, its connection
/// limits, and its name for the log.
pub struct ServeWith {
    /// TLS 1.3 with the callers' node keys checked (see [`tls`]).
    pub tls: Arc<rustls::ServerConfig>,
    /// Caps on every byte sent and received.
    pub caps: Arc<bandwidth::BandwidthCaps>,
    /// Connections and request bytes held at once.
    pub limits: ServerLimits,
    /// Methods (gRPC paths) whose request bodies have a cap of their own, under the
    /// message cap every method has: a node sizes Forward and Backward from its model.
    pub body_caps: Vec<(&'static str, usize)>,
    /// "node", "tracker".
    pub name: &'static str,
}

/// Connections a server may be securing at once; more wait in the accept queue. A handshake
/// is a millisecond of work, so 64 keep a node responsive while a flood of slow handshakes
/// holds at most this many.
const MAX_HANDSHAKES: usize = 64;

/// Longest a caller may take over its TLS handshake before the connection is dropped.
const HANDSHAKE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// Serves `routes` on `listener`, and on every circuit that arrives on `relayed`, until `cancel`
/// fires, with the transport settings every NeuroShard server shares: TLS 1.3 with the callers'
/// node keys checked, Nagle off on accepted sockets (a decode step is one small message each
/// way, and delayed ACKs would add tens of milliseconds per hop), adaptive HTTP/2 windows and
/// 1 MiB frames for megabyte activations, and the bounds of this module: connections in all
/// and per address, calls and streams per connection, keepalives, a deadline per call and a
/// maximum connection age, and the request bytes held at once. Handlers learn who called with
/// [`tls::caller`].
///
/// Every accepted connection, relayed or not, keeps to the caps of `with`.
pub fn spawn_server(
    routes: tonic::service::Routes,
    listener: tokio::net::TcpListener,
    relayed: Option<tokio::sync::mpsc::Receiver<tokio::io::DuplexStream>>,
    with: ServeWith,
    cancel: tokio_util::sync::CancellationToken,
) -> tokio::task::JoinHandle<()> {
    use futures::StreamExt;
    let ServeWith {
        tls,
        caps,
        limits,
        body_caps,
        name,
    } = with;
    let connections = Quota::new(
        "connections",
        limits.max_connections,
        limits.max_connections_per_ip,
    );
    let request_bytes = Quota::new(
        "bytes of requests",
        limits.max_request_bytes,
        limits.max_request_bytes_per_ip,
    );
    let direct = tonic::transport::server::TcpIncoming::from(listener)
        .with_nodelay(Some(true))
        .with_keepalive(Some(TCP_KEEPALIVE))
        .map(|accepted| accepted.map(Accepted::Tcp));
    let relayed = futures::stream::iter(relayed)
        .flat_map(tokio_stream::wrappers::ReceiverStream::new)
        .map(|circuit| Ok(Accepted::Relayed(circuit)));
    let incoming = futures::stream::select(direct, relayed)
        .filter_map(move |accepted| std::future::ready(admit(accepted, &connections, name)))
        .map(move |(accepted, slot)| secure(accepted, slot, tls.clone(), caps.clone(), name))
        .buffer_unordered(MAX_HANDSHAKES)
        .filter_map(|secured| async move { secured });
    tokio::spawn(async move {
        let result = tonic::transport::Server::builder()
            .layer(metered::MeteredLayer::new(request_bytes, body_caps))
            .max_concurrent_streams(MAX_CALLS_PER_CONNECTION)
            .timeout(CALL_TIMEOUT)
            .http2_keepalive_interval(Some(KEEPALIVE_INTERVAL))
            .http2_keepalive_timeout(Some(KEEPALIVE_TIMEOUT))
            .max_connection_age(MAX_CONNECTION_AGE)
            .max_connection_age_grace(MAX_CONNECTION_AGE_GRACE)
            .http2_adaptive_window(Some(true))
            .max_frame_size(HTTP2_MAX_FRAME_BYTES)
            .add_routes(routes)
            .serve_with_incoming_shutdown(incoming, cancel.cancelled_owned())
            .await;
        if let Err(e) = result {
            tracing::error!("{name} server failed: {e}");
        }
    })
}

/// A secured server connection, bandwidth-capped under the encryption.
type ServerConn = tls::SecuredConn<bandwidth::Throttled<Accepted>>;

/// Gives an accepted connection its slot, or closes it (logged) when a limit is reached. An
/// accept error passes through without one.
#[allow(clippy::type_complexity)]
fn admit(
    accepted: std::io::Result<Accepted>,
    connections: &Arc<Quota>,
    name: &'static str,
) -> Option<(std::io::Result<Accepted>, Option<Slot>)> {
    let Ok(conn) = &accepted else {
        return Some((accepted, None));
    };
    let addr = conn.remote_addr();
    match Held::take(connections, addr.map(|a| a.ip().to_canonical()), 1) {
        Ok(slot) => Some((accepted, Some(slot))),
        Err(why) => {
            tracing::debug!("{name}: closed a connection from {addr:?}: {why}");
            None
        }
    }
}

/// Runs the server's side of the handshake on an accepted connection: the secured connection,
/// an accept error to pass on, or nothing when the caller failed its handshake (logged).
async fn secure(
    accepted: std::io::Result<Accepted>,
    slot: Option<Slot>,
    config: Arc<rustls::ServerConfig>,
    caps: Arc<bandwidth::BandwidthCaps>,
    name: &'static str,
) -> Option<std::io::Result<ServerConn>> {
    let conn = match accepted {
        Ok(conn) => conn,
        Err(e) => return Some(Err(e)),
    };
    let addr = conn.remote_addr();
    let throttled = bandwidth::Throttled::new(conn, caps);
    match tokio::time::timeout(HANDSHAKE_TIMEOUT, tls::accept(throttled, config)).await {
        Ok(Ok((stream, key))) => {
            let caller = tls::Caller { addr, key };
            Some(Ok(tls::SecuredConn::new(stream, caller, slot)))
        }
        Ok(Err(e)) => {
            tracing::debug!("{name}: refused a connection from {addr:?}: {e}");
            None
        }
        Err(_) => {
            tracing::debug!("{name}: {addr:?} did not finish its handshake in time");
            None
        }
    }
}

/// A connection a server accepted, or a client dialled: over TCP, or a circuit through a relay
/// (secured end to end; it has no peer address, so handlers see none).
pub enum Accepted {
    Tcp(tokio::net::TcpStream),
    Relayed(tokio::io::DuplexStream),
}

impl Accepted {
    /// The other end's address, for a direct connection.
    pub(crate) fn remote_addr(&self) -> Option<std::net::SocketAddr> {
        match self {
            Accepted::Tcp(s) => s.peer_addr().ok(),
            Accepted::Relayed(_) => None,
        }
    }
}

impl tokio::io::AsyncRead for Accepted {
    fn poll_read(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        match self.get_mut() {
            Accepted::Tcp(s) => std::pin::Pin::new(s).poll_read(cx, buf),
            Accepted::Relayed(s) => std::pin::Pin::new(s).poll_read(cx, buf),
        }
    }
}

impl tokio::io::AsyncWrite for Accepted {
    fn poll_write(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        match self.get_mut() {
            Accepted::Tcp(s) => std::pin::Pin::new(s).poll_write(cx, buf),
            Accepted::Relayed(s) => std::pin::Pin::new(s).poll_write(cx, buf),
        }
    }

    fn poll_flush(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        match self.get_mut() {
            Accepted::Tcp(s) => std::pin::Pin::new(s).poll_flush(cx),
            Accepted::Relayed(s) => std::pin::Pin::new(s).poll_flush(cx),
        }
    }

    fn poll_shutdown(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        match self.get_mut() {
            Accepted::Tcp(s) => std::pin::Pin::new(s).poll_shutdown(cx),
            Accepted::Relayed(s) => std::pin::Pin::new(s).poll_shutdown(cx),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_zero_limit_is_named() {
        let limits = ServerLimits {
            max_request_bytes_per_ip: 0,
            ..ServerLimits::default()
        };
        assert_eq!(
            limits.validate().unwrap_err(),
            "max_request_bytes_per_ip must be positive"
        );
    }
}
