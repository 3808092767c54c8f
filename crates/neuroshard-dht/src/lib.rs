//! Kademlia for NeuroShard, modelled on libp2p's: a state machine without IO that takes events
//! and `now` and returns messages to send and deadlines, with its RNG injected; and a seeded
//! simulator that runs thousands of them.
//!
//! - [`key`]: the 256-bit key space and XOR metric.
//! - [`table`]: the routing table (k-buckets, replacement cache, liveness checks, /24 and /48
//!   diversity limits).
//! - [`record`]: owner-signed, expiring records under `/nodes/{id}`, `/layers/{model}/{index}`
//!   and `/checkpoints/{id}`; [`store`] holds them for the swarm.
//! - [`kad`]: the protocol (FIND_NODE, FIND_VALUE, STORE, PING; iterative lookups with α in
//!   flight and optional disjoint paths; republishing and bucket refresh).
//! - [`sim`]: the simulator, with latency, churn and Sybil adversaries.

pub mod kad;
pub mod key;
mod lookup;
pub mod record;
pub mod sim;
pub mod store;
pub mod table;

pub use kad::{
    Config, DhtError, Kademlia, Mode, NoAnswer, Outcome, Output, QueryId, QueryKind, Request,
    RequestId, Response,
};
pub use key::{Distance, Key};
pub use record::{Record, RecordError, RecordKey};
pub use table::{Contact, DiversityLimits, Observed, RoutingTable};

#[cfg(test)]
mod tests;
