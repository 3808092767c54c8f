//! Connections and servers of the NeuroShard runtime: the pooled gRPC connections
//! ([`pool`]), the server every node and tracker runs ([`spawn_server`], over TCP and relayed
//! circuits, with its connection limits), bandwidth caps on both ([`bandwidth`]), transfer and latency [`metrics`], and the
//! one module where protobuf types meet domain types ([`convert`]).
//!
//! The runtime's error type, [`NodeError`], lives here too: every call of every role fails
//! with it, and it maps to a gRPC status in one place.

pub mod bandwidth;
pub mod convert;
mod error;
pub mod metrics;
pub mod pool;
mod server;
pub mod tls;

pub use error::{NodeError, Role};
pub use server::{Accepted, ServeWith, ServerLimits, spawn_server};

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

/// HTTP/2 frame size both ends accept: 1 MiB, so a megabyte of activations crosses in a frame
/// or two instead of 64 of the 16 KiB default.
pub const HTTP2_MAX_FRAME_BYTES: u32 = 1024 * 1024;
