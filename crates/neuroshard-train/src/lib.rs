//! Training across the swarm, DiLoCo-style: each replica of a layer range takes local inner
//! steps, and every H steps the replicas exchange pseudo-gradients (parameters at the start of
//! the round minus parameters now) and take one outer step.
//!
//! - [`sparse`]: the pseudo-gradient codec: top-k with error feedback, fp16 values and
//!   gap-coded indices.
//! - [`outer`]: the robust aggregate (a coordinate-wise trimmed mean) and the outer Nesterov
//!   step.
//! - [`checkpoint`]: shards in transit as hashed chunks under a manifest, assembled in any
//!   order, resumed from the first missing chunk, handed over only when the whole checks out.

pub mod checkpoint;
pub mod outer;
pub mod sparse;
