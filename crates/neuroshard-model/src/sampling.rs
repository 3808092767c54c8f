//! Choosing the next token from logits: greedy, or sampled with the usual controls, from a
//! seeded generator so the same seed gives the same tokens wherever the logits come from.
//!
//! The steps run in the order transformers' logits processors do: repetition penalty, then
//! temperature, top-k, top-p and min-p, then a draw.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::ModelError;

/// How the next token is chosen. The default is greedy: temperature 0.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(default)]
pub struct SamplingParams {
    /// Softmax temperature; 0 picks the most likely token (greedy).
    pub temperature: f32,
    /// Keep only the `top_k` most likely tokens; 0 keeps all.
    pub top_k: usize,
    /// Keep the smallest set of tokens whose probability reaches `top_p`; 1 keeps all.
    pub top_p: f32,
    /// Drop tokens less likely than `min_p` times the most likely one; 0 keeps all.
    pub min_p: f32,
    /// Divide positive logits (multiply negative ones) of tokens already in the sequence;
    /// 1 is off (CTRL's penalty, as transformers applies it).
    pub repetition_penalty: f32,
    /// Seed of the draw.
    pub seed: u64,
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self {
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
            min_p: 0.0,
            repetition_penalty: 1.0,
            seed: 0,
        }
    }
}

impl SamplingParams {
    /// Checks every value, naming the bad one.
    pub fn validate(&self) -> Result<(), ModelError> {
        let bad = |what: &str| Err(ModelError::Request(format!("sampling: {what}")));
        if !self.temperature.is_finite() || self.temperature < 0.0 {
            return bad("temperature must be 0 or more");
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return bad("top_p must be in (0, 1]");
        }
        if !(0.0..=1.0).contains(&self.min_p) {
            return bad("min_p must be in [0, 1]");
        }
        if !self.repetition_penalty.is_finite() || self.repetition_penalty <= 0.0 {
            return bad("repetition_penalty must be positive");
        }
        Ok(())
    }

    /// Whether the choice is the most likely token, with no draw.
    pub fn is_greedy(&self) -> bool {
        self.temperature == 0.0
    }
}

/// Chooses tokens one after another with [`SamplingParams`] and its own seeded generator.
#[derive(Debug, Clone)]
pub struct Sampler {
    params: SamplingParams,
    rng: ChaCha8Rng,
}

impl Sampler {
    /// A sampler whose draws follow `params.seed`.
    pub fn new(params: SamplingParams) -> Result<Self, ModelError> {
        params.validate()?;
        Ok(Self {
            rng: ChaCha8Rng::seed_from_u64(params.seed),
            params,
        })
    }

    /// The next token after `history` (prompt and tokens so far) given its `logits`.
    pub fn choose(&mut self, logits: &[f32], history: &[u32]) -> Result<u32, ModelError> {
        if logits.is_empty() {
            return Err(ModelError::Request("no logits to choose from".into()));
        }
        let mut scores = logits.to_vec();
        self.penalise(&mut scores, history);
        if self.params.is_greedy() {
            return Ok(argmax(&scores));
        }
        let kept = self.candidates(&scores);
        let total: f64 = kept.iter().map(|c| c.1).sum();
        if !total.is_finite() || total <= 0.0 {
            return Ok(argmax(&scores));
        }
        let mut target = self.rng.random::<f64>() * total;
        for &(id, weight) in &kept {
            if target < weight {
                return Ok(id);
            }
            target -= weight;
        }
        Ok(kept.last().map_or(0, |c| c.0))
    }

    fn penalise(&self, scores: &mut [f32], history: &[u32]) {
        let p = self.params.repetition_penalty;
        if p == 1.0 {
            return;
        }
        let mut seen = vec![false; scores.len()];
        for &id in history {
            if let Some(s) = scores.get_mut(id as usize)
                && !std::mem::replace(&mut seen[id as usize], true)
            {
                *s = if *s > 0.0 { *s / p } else { *s * p };
            }
        }
    }

    /// The tokens left after temperature, top-k, top-p and min-p, most likely first, each with
    /// its unnormalised probability.
    fn candidates(&self, scores: &[f32]) -> Vec<(u32, f64)> {
        let SamplingParams {
            temperature,
            top_k,
            top_p,
            min_p,
            ..
        } = self.params;
        let mut order: Vec<(u32, f64)> = scores
            .iter()
            .enumerate()
            .filter(|(_, s)| s.is_finite())
            // In f64: a tiny temperature would overflow f32 to infinity (and NaN weights).
            .map(|(i, &s)| (i as u32, f64::from(s) / f64::from(temperature)))
            .collect();
        order.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
        if top_k > 0 {
            order.truncate(top_k);
        }
        let best = order.first().map_or(0.0, |c| c.1);
        let mut weights: Vec<(u32, f64)> = order
            .into_iter()
            .map(|(id, s)| (id, (s - best).exp()))
            .collect();
        let total: f64 = weights.iter().map(|w| w.1).sum();
        if top_p < 1.0 {
            let mut cumulative = 0.0;
            let keep = weights
                .iter()
                .position(|w| {
                    cumulative += w.1 / total;
                    cumulative >= f64::from(top_p)
                })
                .map_or(weights.len(), |i| i + 1);
            weights.truncate(keep);
        }
        if min_p > 0.0 {
            // The first weight is the most likely token's, exp(0) = 1.
            weights.retain(|w| w.1 >= f64::from(min_p));
        }
        weights
    }
}

/// The most likely token; ties go to the lower id.
pub fn argmax(scores: &[f32]) -> u32 {
    let mut best = 0;
    for (i, s) in scores.iter().enumerate() {
        if s.total_cmp(&scores[best]).is_gt() {
            best = i;
        }
    }
    best as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sampler(params: SamplingParams) -> Sampler {
        Sampler::new(params).unwrap()
    }

    const LOGITS: [f32; 5] = [1.0, 3.0, 2.5, -1.0, 3.0];

    #[test]
    fn temperature_zero_is_greedy_with_ties_to_the_lower_id() {
        let mut s = sampler(SamplingParams::default());
        assert_eq!(s.choose(&LOGITS, &[]).unwrap(), 1);
        assert_eq!(argmax(&LOGITS), 1);
    }

    #[test]
    fn the_same_seed_draws_the_same_tokens_and_another_seed_differs() {
        let params = SamplingParams {
            temperature: 1.5,
            seed: 7,
            ..SamplingParams::default()
        };
        let draw = |params| {
            let mut s = sampler(params);
            (0..64)
                .map(|_| s.choose(&LOGITS, &[]).unwrap())
                .collect::<Vec<_>>()
        };
        assert_eq!(draw(params), draw(params));
        assert_ne!(draw(params), draw(SamplingParams { seed: 8, ..params }));
        assert!(draw(params).iter().any(|&t| t != 1), "a draw, not greedy");
    }

    #[test]
    fn top_k_top_p_and_min_p_narrow_the_choice() {
        let only = |params: SamplingParams| {
            let mut s = sampler(SamplingParams {
                temperature: 1.0,
                ..params
            });
            let mut seen: Vec<u32> = (0..200).map(|_| s.choose(&LOGITS, &[]).unwrap()).collect();
            seen.sort();
            seen.dedup();
            seen
        };
        let top_k = SamplingParams {
            top_k: 2,
            ..SamplingParams::default()
        };
        assert_eq!(only(top_k), vec![1, 4]);
        let top_p = SamplingParams {
            top_p: 0.5,
            ..SamplingParams::default()
        };
        assert_eq!(only(top_p), vec![1, 4]);
        let min_p = SamplingParams {
            min_p: 0.5,
            ..SamplingParams::default()
        };
        assert_eq!(only(min_p), vec![1, 2, 4]);
    }

    #[test]
    fn a_tiny_temperature_is_all_but_greedy() {
        let mut s = sampler(SamplingParams {
            temperature: 1e-38,
            seed: 3,
            ..SamplingParams::default()
        });
        let logits = [40.0, 41.0, 39.0];
        assert!((0..32).all(|_| s.choose(&logits, &[]).unwrap() == 1));
    }

    #[test]
    fn repetition_penalty_turns_greedy_away_from_what_was_said() {
        let mut s = sampler(SamplingParams {
            repetition_penalty: 2.0,
            ..SamplingParams::default()
        });
        assert_eq!(s.choose(&LOGITS, &[1, 4, 1]).unwrap(), 2);
    }

    #[test]
    fn bad_values_are_named() {
        for (params, named) in [
            (
                SamplingParams {
                    temperature: -1.0,
                    ..Default::default()
                },
                "temperature",
            ),
            (
                SamplingParams {
                    top_p: 0.0,
                    ..Default::default()
                },
                "top_p",
            ),
            (
                SamplingParams {
                    min_p: 2.0,
                    ..Default::default()
                },
                "min_p",
            ),
            (
                SamplingParams {
                    repetition_penalty: 0.0,
                    ..Default::default()
                },
                "repetition_penalty",
            ),
        ] {
            let err = Sampler::new(params).unwrap_err().to_string();
            assert!(err.contains(named), "{err}");
        }
    }
}
