//! End-to-end encryption across a relay: Noise NK over the spliced connection, keyed by the
//! node's ed25519 key taken to X25519.
//!
//! The caller knows the key it wants to reach; the handshake completes only with the holder of
//! its private half, and every later byte travels sealed (ChaCha20-Poly1305), so a relay can
//! neither read the stream nor alter it unnoticed. After the handshake each side gets a plain
//! in-memory stream (a tokio duplex) that a task seals onto, and opens from, the connection:
//! gRPC runs over it as over TCP.

use ed25519_dalek::{SigningKey, VerifyingKey};
use snow::StatelessTransportState;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, DuplexStream};

use super::frame::KeyBytes;

const PARAMS: &str = "Noise_NK_25519_ChaChaPoly_BLAKE2s";
const PROLOGUE: &[u8] = b"neuroshard relay circuit v1";
/// Noise's largest message.
const MAX_MESSAGE: usize = 65535;
/// Plaintext per sealed message: the largest message less the AEAD tag.
const MAX_PLAIN: usize = MAX_MESSAGE - 16;
/// Buffer of the in-memory stream handed to the application.
const DUPLEX_BYTES: usize = 256 * 1024;

/// Why a circuit could not be secured, or broke.
#[derive(Debug, thiserror::Error)]
pub enum SecureError {
    /// The key to reach is not a valid ed25519 key.
    #[error("{0} is not a valid ed25519 key")]
    BadKey(String),
    /// The handshake failed: the far end does not hold the key, or the bytes were altered.
    #[error("the end-to-end handshake with {key} failed: {why}")]
    Handshake {
        /// The key that was wanted (hex, shortened).
        key: String,
        /// What went wrong.
        why: String,
    },
}

/// The X25519 public key of an ed25519 public key.
fn x25519_public(key: &KeyBytes) -> Result<[u8; 32], SecureError> {
    let key = VerifyingKey::from_bytes(key).map_err(|_| SecureError::BadKey(short(key)))?;
    Ok(key.to_montgomery().to_bytes())
}

fn short(key: &KeyBytes) -> String {
    key[..4].iter().map(|b| format!("{b:02x}")).collect()
}

/// Secures `stream` as the caller: succeeds only if the far end holds `key`'s private half.
pub async fn initiate<S>(mut stream: S, key: &KeyBytes) -> Result<DuplexStream, SecureError>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let remote = x25519_public(key)?;
    let fail = |why: String| SecureError::Handshake {
        key: short(key),
        why,
    };
    let mut handshake = snow::Builder::new(PARAMS.parse().expect("valid noise params"))
        .prologue(PROLOGUE)
        .and_then(|b| b.remote_public_key(&remote))
        .and_then(|b| b.build_initiator())
        .map_err(|e| fail(e.to_string()))?;
    send_handshake(&mut handshake, &mut stream)
        .await
        .map_err(|e| fail(format!("sending: {e}")))?;
    let reply = read_message(&mut stream).await.map_err(|e| {
        fail(format!(
            "{e}: the far end does not hold the key, or the relay altered the handshake"
        ))
    })?;
    let mut payload = vec![0u8; MAX_MESSAGE];
    handshake
        .read_message(&reply, &mut payload)
        .map_err(|e| fail(format!("the answer does not open with the key ({e})")))?;
    let transport = handshake
        .into_stateless_transport_mode()
        .map_err(|e| fail(e.to_string()))?;
    Ok(pump(stream, transport))
}

/// Secures `stream` as the node holding `key`, once a caller's handshake arrives.
pub async fn respond<S>(mut stream: S, key: &SigningKey) -> Result<DuplexStream, SecureError>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let fail = |why: String| SecureError::Handshake {
        key: short(&key.verifying_key().to_bytes()),
        why,
    };
    let private = key.to_scalar_bytes();
    let mut handshake = snow::Builder::new(PARAMS.parse().expect("valid noise params"))
        .prologue(PROLOGUE)
        .and_then(|b| b.local_private_key(&private))
        .and_then(|b| b.build_responder())
        .map_err(|e| fail(e.to_string()))?;
    let hello = read_message(&mut stream)
        .await
        .map_err(|e| fail(format!("reading the caller's handshake: {e}")))?;
    let mut payload = vec![0u8; MAX_MESSAGE];
    handshake
        .read_message(&hello, &mut payload)
        .map_err(|e| fail(format!("the caller's handshake does not open ({e})")))?;
    send_handshake(&mut handshake, &mut stream)
        .await
        .map_err(|e| fail(format!("answering: {e}")))?;
    let transport = handshake
        .into_stateless_transport_mode()
        .map_err(|e| fail(e.to_string()))?;
    Ok(pump(stream, transport))
}

/// Writes the handshake's next message (with no payload) to `w`.
async fn send_handshake<W: AsyncWrite + Unpin>(
    handshake: &mut snow::HandshakeState,
    w: &mut W,
) -> std::io::Result<()> {
    let mut buf = vec![0u8; MAX_MESSAGE];
    let n = handshake
        .write_message(&[], &mut buf)
        .map_err(std::io::Error::other)?;
    write_message(w, &buf[..n]).await
}

async fn write_message<W: AsyncWrite + Unpin>(w: &mut W, message: &[u8]) -> std::io::Result<()> {
    let mut framed = Vec::with_capacity(2 + message.len());
    framed.extend_from_slice(&(message.len() as u16).to_be_bytes());
    framed.extend_from_slice(message);
    w.write_all(&framed).await?;
    w.flush().await
}

async fn read_message<R: AsyncRead + Unpin>(r: &mut R) -> std::io::Result<Vec<u8>> {
    let mut len = [0u8; 2];
    r.read_exact(&mut len).await?;
    let mut message = vec![0u8; u16::from_be_bytes(len) as usize];
    r.read_exact(&mut message).await?;
    Ok(message)
}

/// The application's end of a secured circuit; a task seals what it writes onto `stream` and
/// opens what arrives. A message that does not open ends the circuit.
fn pump<S>(stream: S, transport: StatelessTransportState) -> DuplexStream
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (app, inner) = tokio::io::duplex(DUPLEX_BYTES);
    let transport = std::sync::Arc::new(transport);
    let (mut plain_in, mut plain_out) = tokio::io::split(inner);
    let (mut wire_in, mut wire_out) = tokio::io::split(stream);
    let sealer = transport.clone();
    let seal = async move {
        let mut plain = vec![0u8; MAX_PLAIN];
        let mut sealed = vec![0u8; MAX_MESSAGE];
        let mut nonce = 0u64;
        loop {
            let n = plain_in.read(&mut plain).await?;
            if n == 0 {
                wire_out.shutdown().await?;
                return Ok::<_, std::io::Error>(());
            }
            let len = sealer
                .write_message(nonce, &plain[..n], &mut sealed)
                .map_err(std::io::Error::other)?;
            nonce += 1;
            write_message(&mut wire_out, &sealed[..len]).await?;
        }
    };
    let open = async move {
        let mut plain = vec![0u8; MAX_MESSAGE];
        let mut nonce = 0u64;
        loop {
            let sealed = match read_message(&mut wire_in).await {
                Ok(sealed) => sealed,
                Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
                    plain_out.shutdown().await?;
                    return Ok(());
                }
                Err(e) => return Err(e),
            };
            let n = transport
                .read_message(nonce, &sealed, &mut plain)
                .map_err(|_| {
                    std::io::Error::other("a sealed message did not open: altered in transit")
                })?;
            nonce += 1;
            plain_out.write_all(&plain[..n]).await?;
        }
    };
    tokio::spawn(async move {
        if let Err(e) = tokio::try_join!(seal, open) {
            tracing::debug!("relayed circuit closed: {e}");
        }
    });
    app
}
