//! The NeuroShard node runtime.
//!
//! A node serves a contiguous layer range of one model over gRPC ([`node`]); a tracker keeps the
//! list of live nodes ([`tracker`]); a client plans a chain of nodes covering every layer
//! ([`router`]), talks to them through a [`pool`] of connections, and generates text through the
//! chain, re-planning around failed hops by replaying their inputs ([`client`]). [`generate`]
//! runs the same greedy loop over the swarm or over a local model, which is the reference.
//!
//! Layers: generated protobuf types stay in [`convert`] and the service impls; everything else
//! works on domain types ([`convert::PeerRecord`], `WireTensor`, `LayerRange`).

pub mod client;
pub mod convert;
pub mod demo;
mod error;
pub mod generate;
pub mod metrics;
pub mod node;
pub mod pool;
pub mod router;
pub mod sessions;
pub mod tracker;

pub use error::NodeError;

/// Largest gRPC message sent or accepted: the codec's 100 MiB tensor cap plus 1 MiB for the
/// envelope (ids, shape, receipt), so a tensor at the cap still fits and nothing larger does.
pub const MAX_MESSAGE_BYTES: usize = neuroshard_model::codec::MAX_TENSOR_BYTES + 1024 * 1024;

/// HTTP/2 frame size both ends accept: 1 MiB, so a megabyte of activations crosses in a frame
/// or two instead of 64 of the 16 KiB default.
pub(crate) const HTTP2_MAX_FRAME_BYTES: u32 = 1024 * 1024;

/// Accepted connections of a server, with Nagle's algorithm off: a decode step is one small
/// message each way, and delayed ACKs would add tens of milliseconds per hop.
pub(crate) fn incoming(listener: tokio::net::TcpListener) -> tonic::transport::server::TcpIncoming {
    tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true))
}
