//! A training run's manifest, signed by the run's owner: which model it trains, how its layers
//! are split into stages, the keys of each stage's replicas, the keys that may drive it (send
//! its microbatches), and whether a checkpoint may be pushed into it.
//!
//! A node training for a run accepts training calls only from the run's keys: microbatches
//! (training Forward and Backward) and pushed checkpoints from its trainers, pseudo-gradient
//! exchanges from the replicas of its own stage. Keys are named by their node ids, which the
//! key-bound TLS handshake proves for every caller.
//!
//! The file is JSON: `{"body": {...}, "owner": "<hex key>", "signature": "<hex>"}`, the
//! signature covering the body's JSON as written by [`RunManifest::sign`].

use neuroshard_base::{LayerRange, NodeId, NodeKey, PublicKey};
use serde::{Deserialize, Serialize};

/// What the owner signs, before the body's JSON.
const SIGNING_PREFIX: &[u8] = b"neuroshard-run-manifest:v1\n";

/// Longest run id.
pub const MAX_RUN_ID_BYTES: usize = 64;

/// What a run is.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RunBody {
    /// The run's name, as its nodes log it.
    pub run_id: String,
    /// The content id of the model it trains.
    pub model_id: String,
    /// Its layer split, in layer order.
    pub stages: Vec<RunStage>,
    /// The keys that may send microbatches (and push checkpoints, when allowed).
    pub trainers: Vec<NodeId>,
    /// Whether a trainer may push a checkpoint into a stage (PutCheckpoint). Off by default:
    /// a push replaces a stage's weights outright.
    #[serde(default)]
    pub allow_put_checkpoint: bool,
}

/// One stage of a run: its layers and the replicas that train them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RunStage {
    /// The stage's layers.
    pub layers: LayerRange,
    /// The keys of its replicas.
    pub replicas: Vec<NodeId>,
}

/// A run's body and its owner's signature of it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RunManifest {
    /// What the run is.
    pub body: RunBody,
    /// The owner's key, hex.
    pub owner: String,
    /// The owner's signature of the body, hex.
    pub signature: String,
}

/// Why a manifest was refused, or a key may not do what it asked.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RunError {
    /// The file is not a manifest.
    #[error("run manifest: {0}")]
    Malformed(String),
    /// The signature does not hold for the body and the owner's key.
    #[error("run manifest of {run:?}: the owner's signature does not hold")]
    BadSignature {
        /// The run named.
        run: String,
    },
    /// The body says something impossible.
    #[error("run manifest of {run:?}: {problem}")]
    Invalid {
        /// The run named.
        run: String,
        /// What is wrong.
        problem: String,
    },
}

impl RunManifest {
    /// `body`, checked and signed by `owner`.
    pub fn sign(body: RunBody, owner: &NodeKey) -> Result<Self, RunError> {
        check(&body)?;
        let signature = owner.sign(&signed_bytes(&body)?);
        Ok(Self {
            body,
            owner: hex::encode(owner.public().0),
            signature: hex::encode(signature),
        })
    }

    /// Reads a manifest from its JSON, checking the body and the signature.
    pub fn from_json(text: &str) -> Result<Self, RunError> {
        let manifest: Self =
            serde_json::from_str(text).map_err(|e| RunError::Malformed(e.to_string()))?;
        manifest.verify()?;
        Ok(manifest)
    }

    /// The manifest as JSON, for a file.
    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(self).expect("plain data serializes")
    }

    /// Checks the body and that the owner's signature holds.
    pub fn verify(&self) -> Result<(), RunError> {
        check(&self.body)?;
        let bad = || RunError::BadSignature {
            run: self.body.run_id.clone(),
        };
        let owner = hex::decode(&self.owner)
            .ok()
            .and_then(|bytes| PublicKey::from_slice(&bytes).ok())
            .ok_or_else(|| RunError::Malformed(format!("owner {:?} is not a key", self.owner)))?;
        let signature = hex::decode(&self.signature).map_err(|_| bad())?;
        owner
            .verify(&signed_bytes(&self.body)?, &signature)
            .map_err(|_| bad())
    }

    /// The run's name.
    pub fn run_id(&self) -> &str {
        &self.body.run_id
    }

    /// The stage training exactly `layers`, if the run has one.
    pub fn stage(&self, layers: LayerRange) -> Option<&RunStage> {
        self.body.stages.iter().find(|s| s.layers == layers)
    }

    /// Whether `key` may send the run's microbatches.
    pub fn is_trainer(&self, key: &NodeId) -> bool {
        self.body.trainers.contains(key)
    }

    /// Whether `key` is a replica of the stage of `layers`.
    pub fn is_replica(&self, layers: LayerRange, key: &NodeId) -> bool {
        self.stage(layers).is_some_and(|s| s.replicas.contains(key))
    }
}

/// The bytes the owner signs: a fixed prefix, then the body's JSON.
fn signed_bytes(body: &RunBody) -> Result<Vec<u8>, RunError> {
    let json = serde_json::to_vec(body).map_err(|e| RunError::Malformed(e.to_string()))?;
    Ok([SIGNING_PREFIX, &json].concat())
}

/// What a body must be: a run id, stages that tile the layers from 0 without gaps, each with a
/// replica, and a trainer.
fn check(body: &RunBody) -> Result<(), RunError> {
    let invalid = |problem: String| RunError::Invalid {
        run: body.run_id.chars().take(MAX_RUN_ID_BYTES).collect(),
        problem,
    };
    if body.run_id.is_empty() || body.run_id.len() > MAX_RUN_ID_BYTES {
        return Err(invalid(format!(
            "run_id must be 1..={MAX_RUN_ID_BYTES} bytes"
        )));
    }
    if body.model_id.is_empty() {
        return Err(invalid("model_id is empty".into()));
    }
    if body.stages.is_empty() {
        return Err(invalid("it has no stages".into()));
    }
    let mut next = 0;
    for (i, stage) in body.stages.iter().enumerate() {
        if stage.layers.start != next {
            return Err(invalid(format!(
                "stages[{i}] starts at layer {}, not {next}: stages tile the layers in order",
                stage.layers.start
            )));
        }
        if stage.replicas.is_empty() {
            return Err(invalid(format!("stages[{i}] has no replicas")));
        }
        next = stage.layers.end;
    }
    if body.trainers.is_empty() {
        return Err(invalid("it has no trainers".into()));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn body(replicas: Vec<NodeId>, trainer: NodeId) -> RunBody {
        RunBody {
            run_id: "run-1".into(),
            model_id: "0123456789abcdef".into(),
            stages: vec![
                RunStage {
                    layers: LayerRange::new(0, 2).unwrap(),
                    replicas: replicas.clone(),
                },
                RunStage {
                    layers: LayerRange::new(2, 4).unwrap(),
                    replicas: vec![NodeId([9; 32])],
                },
            ],
            trainers: vec![trainer],
            allow_put_checkpoint: false,
        }
    }

    #[test]
    fn a_signed_manifest_reads_back_and_names_its_keys() {
        let (owner, a, b, trainer) = (
            NodeKey::generate(),
            NodeId([1; 32]),
            NodeId([2; 32]),
            NodeId([3; 32]),
        );
        let manifest = RunManifest::sign(body(vec![a, b], trainer), &owner).unwrap();
        let read = RunManifest::from_json(&manifest.to_json()).unwrap();
        assert_eq!(read, manifest);
        let first = LayerRange::new(0, 2).unwrap();
        assert!(read.is_replica(first, &a) && read.is_replica(first, &b));
        assert!(!read.is_replica(first, &trainer));
        assert!(!read.is_replica(LayerRange::new(0, 4).unwrap(), &a));
        assert!(read.is_trainer(&trainer) && !read.is_trainer(&a));
    }

    #[test]
    fn a_changed_body_or_another_owner_breaks_the_signature() {
        let owner = NodeKey::generate();
        let manifest =
            RunManifest::sign(body(vec![NodeId([1; 32])], NodeId([3; 32])), &owner).unwrap();
        let mut widened = manifest.clone();
        widened.body.trainers.push(NodeId([7; 32]));
        let mut reowned = manifest.clone();
        reowned.owner = hex::encode(NodeKey::generate().public().0);
        let mut opened = manifest.clone();
        opened.body.allow_put_checkpoint = true;
        for bad in [widened, reowned, opened] {
            let err = RunManifest::from_json(&bad.to_json()).unwrap_err();
            assert_eq!(
                err,
                RunError::BadSignature {
                    run: "run-1".into()
                }
            );
        }
        let err = RunManifest::from_json("{\"body\": 1}").unwrap_err();
        assert!(matches!(err, RunError::Malformed(_)), "{err}");
    }

    #[test]
    fn impossible_bodies_are_refused_by_what_is_wrong() {
        let owner = NodeKey::generate();
        let good = body(vec![NodeId([1; 32])], NodeId([3; 32]));
        let mut gap = good.clone();
        gap.stages[1].layers = LayerRange::new(3, 4).unwrap();
        let mut empty = good.clone();
        empty.stages[0].replicas.clear();
        let mut nobody = good.clone();
        nobody.trainers.clear();
        let mut unnamed = good.clone();
        unnamed.run_id.clear();
        for (bad, says) in [
            (gap, "starts at layer 3, not 2"),
            (empty, "stages[0] has no replicas"),
            (nobody, "no trainers"),
            (unnamed, "run_id must be"),
        ] {
            let err = RunManifest::sign(bad, &owner).unwrap_err();
            assert!(err.to_string().contains(says), "{err}");
        }
    }
}
