//! The NeuroShard node: a process that serves a contiguous layer range of one model over gRPC
//! ([`node`]), with its session store, lifecycle (pause, drain, caps, duty cycle), receipt
//! ledger, identity, reachability, and the training stage with its DiLoCo round.
//!
//! It stands on the other runtime crates: `neuroshard-net` (connections, the server, the
//! protobuf conversions, the error type), `neuroshard-discovery` (tracker, DHT, LAN),
//! `neuroshard-client` (chains, failover, generation; a node is a client of its peers when it
//! fetches weights or checks receipts) and `neuroshard-settings`. [`swarm`] starts a whole
//! swarm on loopback, which [`demo`], [`train`], the tests and the benchmarks use.

pub mod bench;
pub mod demo;
pub mod duty;
pub mod identity;
pub mod ledger;
pub mod lifecycle;
pub mod node;
pub mod owner;
pub mod reach;
pub mod sensors;
pub mod sessions;
pub mod swarm;
pub mod threads;
pub mod train;
