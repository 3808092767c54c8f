//! Loopback swarm tests: one binary, one module per area.

mod api;
mod bad_input;
mod dht;
mod flood;
mod generation;
mod lifecycle;
mod limits;
mod nat_lab;
mod pool;
mod precision;
mod proofs;
mod reference;
mod relay;
mod runs;
mod secure;
mod throughput;
mod tracker;
mod training;
