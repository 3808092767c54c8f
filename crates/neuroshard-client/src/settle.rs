//! Settling a hop's reply: the sampled spot check (re-executing the hop locally) and the
//! countersigned receipt, or a voided one and a banned worker when the check fails.

use super::*;
use neuroshard_base::sync::LockExt;
use neuroshard_proof::{Evidence, Mismatch};

/// Why a spot check condemned a hop's reply.
#[derive(Debug, thiserror::Error)]
pub(super) enum CheckFailed {
    /// The reply or the inputs kept for it do not decode.
    #[error("its output does not decode: {0}")]
    Undecodable(NodeError),
    /// The receipt's fingerprint does not match the recomputed row.
    #[error("its receipt's fingerprint: {0}")]
    Receipt(Mismatch, Box<Evidence>),
    /// The reply itself does not match the recomputed row.
    #[error("its output: {0}")]
    Output(Mismatch, Box<Evidence>),
    /// The token chosen (or its candidates) does not follow from the recomputed logits.
    #[error("its token: {0}")]
    Choice(String, Box<Evidence>),
}

impl CheckFailed {
    /// What a void shows the worker; none where there is nothing to compare (an undecodable
    /// reply is failed over, but not voided).
    fn evidence(&self) -> Option<Evidence> {
        match self {
            Self::Undecodable(_) => None,
            Self::Receipt(_, e) | Self::Output(_, e) | Self::Choice(_, e) => {
                Some(Evidence::clone(e))
            }
        }
    }
}

impl SwarmSession<'_> {
    /// Spot-checks hop `i`'s reply if the sample says so, then countersigns its receipt. A
    /// failed check voids the receipt, bans the worker and returns the error to fail over.
    pub(super) async fn settle_hop(
        &mut self,
        i: usize,
        pos: usize,
        input: &HopInput,
        output: &HopOutput,
        receipt: Receipt,
    ) -> Result<(), NodeError> {
        let client = self.client;
        let hop = self.chain.links()[i].hop.clone();
        let spot_checked = match self.spot_check(i, pos, input, output, &receipt).await {
            Ok(checked) => checked,
            Err(reason) => {
                let reliability = {
                    let mut router = client.router.lock_or_recover();
                    let ban = router.reputation_mut().record_failure(&hop.node_id);
                    router.ban(&hop.addr, Instant::now() + ban);
                    client.update_peer_gauges(&router);
                    router.reputation().reliability(&hop.node_id)
                };
                if let Some(evidence) = reason.evidence() {
                    let voided = receipt.countersign(
                        &client.key,
                        Verdict::Voided(evidence),
                        reliability as f32,
                        neuroshard_net::now_ms(),
                    );
                    client.outbox.push(&hop.target(), voided).await;
                }
                return Err(NodeError::Verification {
                    peer: format!("{} ({})", hop.addr, hop.node_id.short()),
                    reason: reason.to_string(),
                });
            }
        };
        let reliability = {
            let mut router = client.router.lock_or_recover();
            if spot_checked {
                router.reputation_mut().record_pass(&hop.node_id);
            }
            router.reputation().reliability(&hop.node_id)
        };
        let accepted = receipt.countersign(
            &client.key,
            Verdict::Accepted { spot_checked },
            reliability as f32,
            neuroshard_net::now_ms(),
        );
        client.outbox.push(&hop.target(), accepted).await;
        Ok(())
    }

    /// Re-executes hop `i` if this client holds the model and the worker's sample is drawn.
    /// Ok(true) when checked and matching, Ok(false) when not checked, Err with the mismatch.
    pub(super) async fn spot_check(
        &self,
        i: usize,
        pos: usize,
        input: &HopInput,
        output: &HopOutput,
        receipt: &Receipt,
    ) -> Result<bool, CheckFailed> {
        let client = self.client;
        let hop = &self.chain.links()[i].hop;
        let Some(verifier) = client.verifier.clone() else {
            return Ok(false);
        };
        let uniform: f64 = rand::random();
        let sampled = {
            let router = client.router.lock_or_recover();
            router.reputation().should_check(&hop.node_id, uniform)
        };
        if !sampled {
            return Ok(false);
        }
        let done = verifier.verified_up_to(&self.id, hop.layers, hop.precision);
        let history = self.chain.links()[i]
            .log
            .entries()
            .iter()
            .filter(|(p, _)| *p < pos && *p >= done)
            .map(|(p, input)| Ok((*p, input.to_shard_input()?)))
            .collect::<Result<Vec<_>, NodeError>>()
            .map_err(CheckFailed::Undecodable)?;
        let current = input.to_shard_input().map_err(CheckFailed::Undecodable)?;
        let received = match output {
            HopOutput::Chosen(chosen) => Received::Chosen(chosen, pos + input.tokens()),
            _ => Received::Row(output.last_row().map_err(CheckFailed::Undecodable)?),
        };
        let (layers, precision, session) = (hop.layers, hop.precision, self.id.clone());
        let truth = tokio::task::spawn_blocking(move || {
            verifier.recompute((&session, layers, precision), history, pos, current)
        })
        .await;
        let skipped = |e: &dyn std::fmt::Display| {
            tracing::warn!("spot check of {} skipped: {e}", hop.addr);
            Ok(false)
        };
        let truth = match truth {
            Ok(Ok(row)) => row,
            Ok(Err(e)) => return skipped(&e),
            Err(e) => return skipped(&e),
        };
        self.judge(receipt, &truth, received)?;
        Ok(true)
    }

    /// Compares a reply and its receipt with the recomputed row `truth`.
    fn judge(
        &self,
        receipt: &Receipt,
        truth: &[f32],
        received: Received<'_>,
    ) -> Result<(), CheckFailed> {
        let tolerance = &self.client.config.tolerance;
        check_receipt(receipt, truth, tolerance)?;
        match received {
            Received::Row(row) => check_row(truth, &row, tolerance),
            Received::Chosen(chosen, position) => {
                let sampler = self.sampler.as_ref().ok_or_else(|| {
                    CheckFailed::Undecodable(NodeError::BadRequest(
                        "a chosen token without a sampler".into(),
                    ))
                })?;
                check_choice(truth, chosen, sampler, position as u64, tolerance)
            }
        }
    }
}

/// What a spot check compares with the recomputed row.
enum Received<'a> {
    /// The row the worker sent (the last token's hidden state, or the logits).
    Row(Vec<f32>),
    /// The token the worker chose at this position.
    Chosen(&'a Chosen, usize),
}

/// Checks the receipt's fingerprint against the recomputed row; a mismatch comes with the
/// evidence a void shows.
fn check_receipt(
    receipt: &Receipt,
    truth: &[f32],
    tolerance: &neuroshard_proof::Tolerance,
) -> Result<(), CheckFailed> {
    if let Err(m) = receipt.body().fingerprint.check(truth, tolerance) {
        let recomputed = Fingerprint::of(truth);
        return Err(CheckFailed::Receipt(
            m,
            Box::new(Evidence::Receipt { recomputed }),
        ));
    }
    Ok(())
}

/// Checks the row received against the recomputed one (after the receipt matched).
fn check_row(
    truth: &[f32],
    received: &[f32],
    tolerance: &neuroshard_proof::Tolerance,
) -> Result<(), CheckFailed> {
    let recomputed = Fingerprint::of(truth);
    if let Err(m) = Fingerprint::of(received).check(truth, tolerance) {
        let received = Fingerprint::of(received);
        let evidence = Evidence::Output {
            recomputed,
            received,
        };
        return Err(CheckFailed::Output(m, Box::new(evidence)));
    }
    Ok(())
}

/// Checks a token chosen at `position` against the recomputed logits (after the receipt
/// matched): the logits it reports (its candidates' and its own) must be the recomputed ones,
/// each within the tolerance of one entry (`entry` × the row's RMS), as must the log-sum-exp
/// its log-probabilities are taken against; and the token must be a choice the sampler admits.
fn check_choice(
    truth: &[f32],
    chosen: &Chosen,
    sampler: &Sampler,
    position: u64,
    tolerance: &neuroshard_proof::Tolerance,
) -> Result<(), CheckFailed> {
    let recomputed = Fingerprint::of(truth);
    let bound = tolerance.entry * recomputed.rms;
    let own = (chosen.token, chosen.logit);
    let off = std::iter::once(&own)
        .chain(&chosen.top)
        .find(|&&(id, logit)| {
            truth
                .get(id as usize)
                .is_none_or(|t| (t - logit).abs() > bound)
        });
    let logsumexp = neuroshard_model::sampling::logsumexp(truth);
    // The token is judged with the slack its candidates show (twice their largest difference,
    // at least a thousandth of the RMS): the backends' rounding, not the whole tolerance,
    // which at a warm temperature would admit far more tokens than the draw could give.
    let floor = 1e-3 * recomputed.rms;
    let shown = chosen
        .top
        .iter()
        .filter_map(|&(id, logit)| truth.get(id as usize).map(|t| (t - logit).abs()))
        .fold(0.0, f32::max);
    let slack = (2.0 * shown).clamp(floor, bound.max(floor));
    let what = match off {
        Some((id, logit)) => format!(
            "candidate {id} claims logit {logit}, recomputed {:?}",
            truth.get(*id as usize)
        ),
        None if (logsumexp - chosen.logsumexp).abs() > bound => format!(
            "log-sum-exp claimed {}, recomputed {logsumexp}",
            chosen.logsumexp
        ),
        None if !sampler.admits(truth, position, chosen.token, slack) => {
            let expected = sampler
                .choose(truth, position)
                .map_or_else(|e| e.to_string(), |c| c.token.to_string());
            format!(
                "token {} chosen, the recomputed logits give {expected}",
                chosen.token
            )
        }
        None => return Ok(()),
    };
    let evidence = Evidence::Choice {
        recomputed,
        what: what.clone(),
    };
    Err(CheckFailed::Choice(what, Box::new(evidence)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use neuroshard_model::SamplingParams;

    /// A last hop's reported log-probabilities are checked with its token: its own logit and
    /// the log-sum-exp must be the recomputed ones, as its candidates' must.
    #[test]
    fn a_choice_is_checked_with_the_log_probabilities_it_reports() {
        let truth: Vec<f32> = (0..64).map(|i| ((i * 37) % 64) as f32 / 8.0).collect();
        let sampler = Sampler::new(SamplingParams {
            temperature: 1.0,
            seed: 3,
            ..SamplingParams::default()
        })
        .unwrap()
        .reporting(5);
        let tolerance = neuroshard_proof::Tolerance::default();
        let honest = sampler.choose(&truth, 9).unwrap();
        let check = |chosen: &Chosen| check_choice(&truth, chosen, &sampler, 9, &tolerance);
        assert!(check(&honest).is_ok());
        let claims = |chosen: Chosen, shown: &str| match check(&chosen) {
            Err(CheckFailed::Choice(what, _)) => assert!(what.contains(shown), "{what}"),
            other => panic!("{chosen:?} passed: {other:?}"),
        };
        let raised = Chosen {
            logit: honest.logit + 1.0,
            ..honest.clone()
        };
        claims(raised, &format!("candidate {} claims logit", honest.token));
        let spread = Chosen {
            logsumexp: honest.logsumexp - 1.0,
            ..honest.clone()
        };
        claims(spread, "log-sum-exp claimed");
    }
}
