//! The only crate that compiles `proto/neuroshard.proto`.
//!
//! It is compiled with `protox` (a pure-Rust protobuf compiler), so no `protoc` is needed.
//! Other crates convert these generated types to domain types at their edges. The one piece of
//! logic here is the codec every service decodes through ([`checked`]): sizes and repeated
//! fields checked on the wire before prost allocates.

pub mod checked;

/// Generated messages and services of package `neuroshard.v1`; every client and server
/// decodes through [`checked::CheckedCodec`].
#[allow(missing_docs, clippy::all)]
pub mod v1 {
    tonic::include_proto!("neuroshard.v1");
}

pub use v1::*;
