//! Under a run, a replica adopts a later round only when a majority of its stage's replicas
//! sign the weights that round starts from: each answer to an ExchangeGradient carries the
//! responder's signed attestation of its round's starting weights (the SHA-256 of its
//! checkpoint of them), and a replica about to catch up gathers them first and checks the
//! weights it fetches against the hash a majority signed.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use neuroshard_base::{LayerRange, NodeId, PublicKey};
use neuroshard_proto as pb;
use neuroshard_train::run::RunManifest;

use super::outer::ask_replica;
use super::training::Trainer;
use super::{Fault, NodeState};
use neuroshard_net::NodeError;
use neuroshard_net::convert::span_to_proto;

/// How long a replica about to catch up waits for the others' attestations.
const ATTESTATION_TIMEOUT: Duration = Duration::from_secs(5);

/// A round and the SHA-256 of the weights it starts from.
pub(super) type RoundStart = (u64, [u8; 32]);

/// What an attestation's signature covers.
fn start_bytes(model_id: &str, layers: LayerRange, round: u64, hash: &[u8]) -> [u8; 32] {
    neuroshard_proof::content_hash(&[
        b"round-start",
        model_id.as_bytes(),
        &layers.start.to_le_bytes(),
        &layers.end.to_le_bytes(),
        &round.to_le_bytes(),
        hash,
    ])
}

impl NodeState {
    /// Rounds a forging test node adds to the round it answers and serves (none otherwise).
    pub(super) fn rounds_claimed_ahead(&self) -> u64 {
        match &self.fault {
            Some(Fault::ClaimsRoundsAhead(ahead)) => *ahead,
            _ => 0,
        }
    }

    /// Under a run, adds to `reply` this node's attestation of the weights its round starts
    /// from; unchanged without a run, before the stage is loaded, or when the round moved on
    /// meanwhile.
    pub(super) async fn attest(
        self: &Arc<Self>,
        layers: LayerRange,
        mut reply: pb::ExchangeGradientResponse,
    ) -> pb::ExchangeGradientResponse {
        if self.trainer.as_ref().is_none_or(|t| t.config.run.is_none()) {
            return reply;
        }
        reply.outer_step += self.rounds_claimed_ahead();
        let state = self.clone();
        let Ok(Ok(snapshot)) = tokio::task::spawn_blocking(move || state.snapshot()).await else {
            return reply;
        };
        if snapshot.round != reply.outer_step {
            return reply;
        }
        let hash = snapshot.manifest.hash;
        let digest = start_bytes(&self.model.id, layers, reply.outer_step, &hash);
        reply.start_hash = hash.to_vec();
        reply.attester_key = self.key.public().0.to_vec();
        reply.start_signature = self.key.sign(&digest).to_vec();
        reply
    }

    /// The attester and what it signed, if `reply` carries an attestation by a replica of
    /// `run`'s stage of `layers` whose signature holds.
    fn attested(
        &self,
        run: &RunManifest,
        layers: LayerRange,
        reply: &pb::ExchangeGradientResponse,
    ) -> Option<(NodeId, RoundStart)> {
        let key = PublicKey::from_slice(&reply.attester_key).ok()?;
        let hash: [u8; 32] = reply.start_hash.as_slice().try_into().ok()?;
        if !run.is_replica(layers, &key.id()) {
            return None;
        }
        let digest = start_bytes(&self.model.id, layers, reply.outer_step, &hash);
        key.verify(&digest, &reply.start_signature).ok()?;
        Some((key.id(), (reply.outer_step, hash)))
    }

    /// The latest round past `own` whose starting weights a majority of the stage's replicas
    /// sign, asking each replica this node knows; why none, naming the run.
    pub(super) async fn majority_round(
        self: &Arc<Self>,
        trainer: &Trainer,
        run: &RunManifest,
        layers: LayerRange,
        own: u64,
    ) -> Result<RoundStart, NodeError> {
        let probe = pb::ExchangeGradientRequest {
            model_id: self.model.id.clone(),
            layers: Some(span_to_proto(layers)),
            ..Default::default()
        };
        let asks = self.replica_addrs(layers).into_iter().map(|addr| {
            let to = self.replica_target(&addr);
            ask_replica(trainer, to, probe.clone(), ATTESTATION_TIMEOUT)
        });
        let mut votes: BTreeMap<RoundStart, BTreeSet<NodeId>> = BTreeMap::new();
        for (_, reply) in futures::future::join_all(asks).await {
            if let Ok(Ok(reply)) = reply
                && let Some((who, start)) = self.attested(run, layers, &reply)
            {
                votes.entry(start).or_default().insert(who);
            }
        }
        let replicas = run.stage(layers).map_or(0, |s| s.replicas.len());
        let needed = replicas / 2 + 1;
        votes
            .into_iter()
            .filter(|((round, _), signers)| *round > own && signers.len() >= needed)
            .map(|(start, _)| start)
            .max()
            .ok_or_else(|| {
                NodeError::Forbidden(format!(
                    "no round past {own} is signed by a majority ({needed} of {replicas}) of \
                     the replicas of layers {layers} in run {:?}: staying in round {own}",
                    run.run_id()
                ))
            })
    }
}
