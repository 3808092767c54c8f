//! Training across the swarm, DiLoCo-style: each replica of a layer range takes local inner
//! steps, and every H steps the replicas exchange pseudo-gradients (parameters at the start of
//! the round minus parameters now) and take one outer step.
//!
//! - [`sparse`]: the pseudo-gradient codec: top-k with error feedback, fp16 values and
//!   gap-coded indices.
//! - [`outer`]: the robust aggregate (a coordinate-wise trimmed mean) and the outer Nesterov
//!   step.
//! - [`round`]: the exchange of a round as a state machine: who sends, who waits, what a call
//!   is answered, when a round closes and with what, when a replica must catch up.
//! - [`run`]: a training run's signed manifest: its stages, the keys of their replicas, and
//!   who may drive it.
//! - [`checkpoint`]: shards in transit as hashed chunks under a manifest, assembled in any
//!   order, resumed from the first missing chunk, handed over only when the whole checks out.

pub mod checkpoint;
pub mod outer;
pub mod round;
pub mod run;
pub mod sparse;

/// The corpus `neuroshard train` trains on, embedded: public-domain English (the Gettysburg
/// Address, the Preamble of the US Constitution, the opening of the Declaration of
/// Independence, the close of Lincoln's second inaugural address, Shakespeare's sonnets 18 and
/// 116, Genesis 1:1-5 and Psalm 23:1-4 in the King James Version), one passage per line.
pub const CORPUS: &str = include_str!("../corpus/public-domain.txt");
