//! Connections and servers of the NeuroShard runtime: the pooled gRPC connections
//! ([`pool`]), the server every node and tracker runs ([`spawn_server`], over TCP and relayed
//! circuits), bandwidth caps on both ([`bandwidth`]), transfer and latency [`metrics`], and the
//! one module where protobuf types meet domain types ([`convert`]).
//!
//! The runtime's error type, [`NodeError`], lives here too: every call of every role fails
//! with it, and it maps to a gRPC status in one place.

pub mod bandwidth;
pub mod convert;
mod error;
pub mod metrics;
pub mod pool;
pub mod tls;

pub use error::{NodeError, Role};

/// Most new tokens one Forward call may carry. Attention scratch grows with tokens × positions
/// and is not part of the KV budget, so long prompts are sent in chunks of at most this many.
pub const MAX_TOKENS_PER_CALL: usize = 2048;

/// Wall-clock time in ms since the Unix epoch (0 if the clock is before it).
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Largest gRPC message sent or accepted: the codec's 100 MiB tensor cap plus 1 MiB for the
/// envelope (ids, shape, receipt), so a tensor at the cap still fits and nothing larger does.
pub const MAX_MESSAGE_BYTES: usize = neuroshard_model::codec::MAX_TENSOR_BYTES + 1024 * 1024;

/// Calls one connection may have in flight; a client pools up to three connections, so this
/// bounds what one peer can make a server decode at once.
const MAX_CALLS_PER_CONNECTION: usize = 16;

/// HTTP/2 frame size both ends accept: 1 MiB, so a megabyte of activations crosses in a frame
/// or two instead of 64 of the 16 KiB default.
pub const HTTP2_MAX_FRAME_BYTES: u32 = 1024 * 1024;

/// Connections a server may be securing at once; more wait in the accept queue. A handshake
/// is a millisecond of work, so 64 keep a node responsive while a flood of slow handshakes
/// holds at most this many.
const MAX_HANDSHAKES: usize = 64;

/// Longest a caller may take over its TLS handshake before the connection is dropped.
const HANDSHAKE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// Serves `routes` on `listener`, and on every circuit that arrives on `relayed`, until `cancel`
/// fires, with the transport settings every NeuroShard server shares: TLS 1.3 with the callers'
/// node keys checked (`tls`, see [`tls`]), Nagle off on accepted sockets (a decode step is one
/// small message each way, and delayed ACKs would add tens of milliseconds per hop), adaptive
/// HTTP/2 windows and 1 MiB frames for megabyte activations, and a cap on calls in flight per
/// connection. Handlers learn who called with [`tls::caller`].
///
/// Every accepted connection, relayed or not, keeps to `caps`.
pub fn spawn_server(
    routes: tonic::service::Routes,
    listener: tokio::net::TcpListener,
    relayed: Option<tokio::sync::mpsc::Receiver<tokio::io::DuplexStream>>,
    tls: std::sync::Arc<rustls::ServerConfig>,
    caps: std::sync::Arc<bandwidth::BandwidthCaps>,
    cancel: tokio_util::sync::CancellationToken,
    name: &'static str,
) -> tokio::task::JoinHandle<()> {
    use futures::StreamExt;
    let direct = tonic::transport::server::TcpIncoming::from(listener)
        .with_nodelay(Some(true))
        .map(|accepted| accepted.map(Accepted::Tcp));
    let relayed = futures::stream::iter(relayed)
        .flat_map(tokio_stream::wrappers::ReceiverStream::new)
        .map(|circuit| Ok(Accepted::Relayed(circuit)));
    let incoming = futures::stream::select(direct, relayed)
        .map(move |accepted| secure(accepted, tls.clone(), caps.clone(), name))
        .buffer_unordered(MAX_HANDSHAKES)
        .filter_map(|secured| async move { secured });
    tokio::spawn(async move {
        let result = tonic::transport::Server::builder()
            .concurrency_limit_per_connection(MAX_CALLS_PER_CONNECTION)
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

/// Runs the server's side of the handshake on an accepted connection: the secured connection,
/// an accept error to pass on, or nothing when the caller failed its handshake (logged).
async fn secure(
    accepted: std::io::Result<Accepted>,
    config: std::sync::Arc<rustls::ServerConfig>,
    caps: std::sync::Arc<bandwidth::BandwidthCaps>,
    name: &'static str,
) -> Option<std::io::Result<ServerConn>> {
    let conn = match accepted {
        Ok(conn) => conn,
        Err(e) => return Some(Err(e)),
    };
    let addr = conn.remote_addr();
    let throttled = bandwidth::Throttled::new(conn, caps);
    match tokio::time::timeout(HANDSHAKE_TIMEOUT, tls::accept(throttled, config)).await {
        Ok(Ok((stream, key))) => Some(Ok(tls::SecuredConn::new(stream, tls::Caller { addr, key }))),
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
    fn remote_addr(&self) -> Option<std::net::SocketAddr> {
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
