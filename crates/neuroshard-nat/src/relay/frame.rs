//! The relay's control frames: one type byte, a big-endian `u16` payload length, the payload.
//!
//! Frames open every connection to a relay and run its control link; once a circuit is
//! spliced, the connection carries the two ends' encrypted bytes and no frames. Payloads are
//! small and fixed per type, so a decoder refuses anything longer than [`MAX_PAYLOAD`] before
//! reading it.

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// The longest payload of any frame: a refusal's reason or an address.
pub const MAX_PAYLOAD: usize = 256;

/// A key as it travels: the 32 bytes of an ed25519 public key.
pub type KeyBytes = [u8; 32];

/// One control frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    /// Relay → anyone, first on every connection: the nonce a registration signs.
    Hello {
        /// Fresh per connection.
        nonce: [u8; 32],
    },
    /// Node → relay: "make me reachable here as `key`", signed over the hello's nonce.
    Register {
        /// The node's ed25519 key.
        key: KeyBytes,
        /// Its signature of [`register_message`].
        signature: [u8; 64],
    },
    /// Relay → node: registered; the address the relay sees the node at.
    Registered {
        /// `ip:port` as seen by the relay.
        observed: String,
    },
    /// Caller → relay: "splice me to the node with `key`".
    Connect {
        /// The key the caller wants to reach.
        key: KeyBytes,
    },
    /// Relay → caller: spliced; from the next byte on, the connection is the circuit.
    Connected,
    /// Relay → node over its control link: open a data connection for circuit `circuit`.
    Incoming {
        /// The circuit's unguessable id.
        circuit: u64,
    },
    /// Node → relay, first on a data connection: this connection is circuit `circuit`'s.
    Accept {
        /// The id named by [`Frame::Incoming`].
        circuit: u64,
    },
    /// Either way: the request was refused, and why.
    Refused {
        /// A reason for people.
        reason: String,
    },
    /// Either way over a control link: are you there?
    Ping,
    /// The answer to [`Frame::Ping`].
    Pong,
}

/// Why bytes are not a frame.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    /// The type byte names no frame.
    #[error("unknown relay frame type {0}")]
    UnknownType(u8),
    /// The length field exceeds [`MAX_PAYLOAD`].
    #[error("relay frame of type {kind} claims {len} payload bytes, more than {MAX_PAYLOAD}")]
    TooLong {
        /// The type byte.
        kind: u8,
        /// The claimed length.
        len: usize,
    },
    /// The payload's length is not the one its type has.
    #[error("relay {name} frame has {len} payload bytes, expected {expected}")]
    BadLength {
        /// The frame's name.
        name: &'static str,
        /// What arrived.
        len: usize,
        /// What the type has.
        expected: usize,
    },
    /// Text that is not UTF-8.
    #[error("relay {0} frame carries text that is not UTF-8")]
    NotUtf8(&'static str),
    /// The connection ended inside a frame.
    #[error("the connection ended inside a relay frame ({got} of {want} bytes)")]
    Truncated {
        /// Bytes read.
        got: usize,
        /// Bytes the frame needs.
        want: usize,
    },
    /// Reading or writing the socket failed.
    #[error("relay connection: {0}")]
    Io(String),
}

const HELLO: u8 = 1;
const REGISTER: u8 = 2;
const REGISTERED: u8 = 3;
const CONNECT: u8 = 4;
const CONNECTED: u8 = 5;
const INCOMING: u8 = 6;
const ACCEPT: u8 = 7;
const REFUSED: u8 = 8;
const PING: u8 = 9;
const PONG: u8 = 10;

/// What a node signs to register: a domain tag and the relay's nonce, so a registration
/// cannot be replayed to another connection.
pub fn register_message(nonce: &[u8; 32]) -> Vec<u8> {
    [b"neuroshard relay register v1:".as_slice(), nonce].concat()
}

/// The name and payload length of a frame type whose payload has a fixed length.
fn fixed_length(kind: u8) -> Option<(&'static str, usize)> {
    Some(match kind {
        HELLO => ("hello", 32),
        REGISTER => ("register", 96),
        CONNECT => ("connect", 32),
        CONNECTED => ("connected", 0),
        INCOMING => ("incoming", 8),
        ACCEPT => ("accept", 8),
        PING => ("ping", 0),
        PONG => ("pong", 0),
        _ => return None,
    })
}

impl Frame {
    /// The frame as bytes; text longer than [`MAX_PAYLOAD`] is cut at a character boundary.
    pub fn encode(&self) -> Vec<u8> {
        let (kind, payload): (u8, Vec<u8>) = match self {
            Frame::Hello { nonce } => (HELLO, nonce.to_vec()),
            Frame::Register { key, signature } => (REGISTER, [&key[..], &signature[..]].concat()),
            Frame::Registered { observed } => (REGISTERED, clip(observed)),
            Frame::Connect { key } => (CONNECT, key.to_vec()),
            Frame::Connected => (CONNECTED, Vec::new()),
            Frame::Incoming { circuit } => (INCOMING, circuit.to_be_bytes().to_vec()),
            Frame::Accept { circuit } => (ACCEPT, circuit.to_be_bytes().to_vec()),
            Frame::Refused { reason } => (REFUSED, clip(reason)),
            Frame::Ping => (PING, Vec::new()),
            Frame::Pong => (PONG, Vec::new()),
        };
        let mut bytes = Vec::with_capacity(3 + payload.len());
        bytes.push(kind);
        bytes.extend_from_slice(&(payload.len() as u16).to_be_bytes());
        bytes.extend_from_slice(&payload);
        bytes
    }

    /// The frame of type `kind` with `payload`, at most [`MAX_PAYLOAD`] bytes as on the wire.
    pub fn decode(kind: u8, payload: &[u8]) -> Result<Frame, FrameError> {
        if payload.len() > MAX_PAYLOAD {
            let len = payload.len();
            return Err(FrameError::TooLong { kind, len });
        }
        if let Some((name, expected)) = fixed_length(kind)
            && payload.len() != expected
        {
            return Err(FrameError::BadLength {
                name,
                len: payload.len(),
                expected,
            });
        }
        let text = |name: &'static str| {
            String::from_utf8(payload.to_vec()).map_err(|_| FrameError::NotUtf8(name))
        };
        let array32 = |bytes: &[u8]| -> [u8; 32] { bytes.try_into().expect("length checked") };
        let u64_be = || u64::from_be_bytes(payload.try_into().expect("length checked"));
        Ok(match kind {
            HELLO => Frame::Hello {
                nonce: array32(payload),
            },
            REGISTER => Frame::Register {
                key: array32(&payload[..32]),
                signature: payload[32..].try_into().expect("length checked"),
            },
            REGISTERED => Frame::Registered {
                observed: text("registered")?,
            },
            CONNECT => Frame::Connect {
                key: array32(payload),
            },
            CONNECTED => Frame::Connected,
            INCOMING => Frame::Incoming { circuit: u64_be() },
            ACCEPT => Frame::Accept { circuit: u64_be() },
            REFUSED => Frame::Refused {
                reason: text("refused")?,
            },
            PING => Frame::Ping,
            PONG => Frame::Pong,
            other => return Err(FrameError::UnknownType(other)),
        })
    }

    /// Reads one frame, reading no byte past it (the circuit's bytes may follow).
    pub async fn read<R: AsyncRead + Unpin>(reader: &mut R) -> Result<Frame, FrameError> {
        let mut header = [0u8; 3];
        read_exact(reader, &mut header).await?;
        let (kind, len) = header_of(&header)?;
        let mut payload = vec![0u8; len];
        read_exact(reader, &mut payload)
            .await
            .map_err(|e| match e {
                FrameError::Truncated { got, .. } => FrameError::Truncated {
                    got: 3 + got,
                    want: 3 + len,
                },
                other => other,
            })?;
        Frame::decode(kind, &payload)
    }

    /// Writes the frame and flushes.
    pub async fn write<W: AsyncWrite + Unpin>(&self, writer: &mut W) -> Result<(), FrameError> {
        writer
            .write_all(&self.encode())
            .await
            .map_err(|e| FrameError::Io(e.to_string()))?;
        writer
            .flush()
            .await
            .map_err(|e| FrameError::Io(e.to_string()))
    }
}

fn header_of(header: &[u8]) -> Result<(u8, usize), FrameError> {
    let kind = header[0];
    let len = u16::from_be_bytes([header[1], header[2]]) as usize;
    if !(HELLO..=PONG).contains(&kind) {
        return Err(FrameError::UnknownType(kind));
    }
    if len > MAX_PAYLOAD {
        return Err(FrameError::TooLong { kind, len });
    }
    Ok((kind, len))
}

async fn read_exact<R: AsyncRead + Unpin>(
    reader: &mut R,
    buf: &mut [u8],
) -> Result<(), FrameError> {
    let mut got = 0;
    while got < buf.len() {
        match reader.read(&mut buf[got..]).await {
            Ok(0) => {
                return Err(FrameError::Truncated {
                    got,
                    want: buf.len(),
                });
            }
            Ok(n) => got += n,
            Err(e) => return Err(FrameError::Io(e.to_string())),
        }
    }
    Ok(())
}

fn clip(text: &str) -> Vec<u8> {
    let mut end = text.len().min(MAX_PAYLOAD);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    text.as_bytes()[..end].to_vec()
}
