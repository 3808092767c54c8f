//! Choosing the next token from logits: greedy, or sampled with the usual controls, from a
//! generator seeded by the seed and the position, so the same seed gives the same tokens
//! wherever the logits are (the client, or the node that ran the last layer) and whatever was
//! retried before.
//!
//! The steps run in the order transformers' logits processors do: repetition penalty, then
//! temperature, top-k, top-p and min-p, then a draw.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::ModelError;

/// The most candidates a choice reports with their logits (OpenAI's `top_logprobs` cap).
pub const MAX_TOP: usize = 20;

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

    /// Whether the tokens already in the sequence change the choice.
    pub fn penalises(&self) -> bool {
        self.repetition_penalty != 1.0
    }
}

/// The token chosen for one position, and the best candidates it was chosen from.
#[derive(Debug, Clone, PartialEq)]
pub struct Chosen {
    /// The chosen token.
    pub token: u32,
    /// The chosen token's raw logit: with `logsumexp`, its log-probability.
    pub logit: f32,
    /// The most likely tokens with their raw logits, best first (as many as asked).
    pub top: Vec<(u32, f32)>,
    /// `log Σ exp(logit)` over the vocabulary: a token's log-probability is its logit minus
    /// this.
    pub logsumexp: f32,
}

/// Chooses tokens with [`SamplingParams`]: what the choice at a position needs besides the
/// logits. The draw at a position is seeded by the seed and the position alone, so whoever
/// holds the logits (the client, or the node that ran the last layer) chooses the same token.
#[derive(Debug, Clone, PartialEq)]
pub struct Sampler {
    params: SamplingParams,
    /// Distinct token ids already in the sequence, sorted; kept only while the repetition
    /// penalty is on (nothing else reads them).
    seen: Vec<u32>,
    /// How many of the best candidates a choice reports.
    top: usize,
}

impl Sampler {
    /// A sampler with `params` that reports no candidates.
    pub fn new(params: SamplingParams) -> Result<Self, ModelError> {
        Self::with_parts(params, Vec::new(), 0)
    }

    /// A sampler as a request describes it: `seen` (the distinct ids already in the sequence;
    /// any order, duplicates allowed) and `top` candidates to report, at most [`MAX_TOP`].
    pub fn with_parts(
        params: SamplingParams,
        mut seen: Vec<u32>,
        top: usize,
    ) -> Result<Self, ModelError> {
        params.validate()?;
        if top > MAX_TOP {
            return Err(ModelError::Request(format!(
                "sampling: at most {MAX_TOP} top candidates, not {top}"
            )));
        }
        seen.sort_unstable();
        seen.dedup();
        if !params.penalises() {
            seen.clear();
        }
        Ok(Self { params, seen, top })
    }

    /// The same sampler, reporting `top` candidates (capped at [`MAX_TOP`]).
    pub fn reporting(mut self, top: usize) -> Self {
        self.top = top.min(MAX_TOP);
        self
    }

    /// The parameters.
    pub fn params(&self) -> &SamplingParams {
        &self.params
    }

    /// The distinct ids the penalty applies to (empty while it is off).
    pub fn seen(&self) -> &[u32] {
        &self.seen
    }

    /// Candidates a choice reports.
    pub fn top(&self) -> usize {
        self.top
    }

    /// Notes that `token` is now in the sequence (for the repetition penalty).
    pub fn saw(&mut self, token: u32) {
        if self.params.penalises()
            && let Err(at) = self.seen.binary_search(&token)
        {
            self.seen.insert(at, token);
        }
    }

    /// Notes every token of `ids` (a prompt).
    pub fn saw_all(&mut self, ids: &[u32]) {
        for &id in ids {
            self.saw(id);
        }
    }

    /// Chooses the token at `position` (its index in the sequence) given the logits of the
    /// token before it.
    pub fn choose(&self, logits: &[f32], position: u64) -> Result<Chosen, ModelError> {
        if logits.is_empty() {
            return Err(ModelError::Request("no logits to choose from".into()));
        }
        let scores = self.penalised(logits);
        let token = match self.params.is_greedy() {
            true => argmax(&scores),
            false => self.draw(&scores, position),
        };
        Ok(Chosen {
            token,
            logit: logits[token as usize],
            top: top_k(logits, self.top),
            logsumexp: logsumexp(logits),
        })
    }

    /// Whether `token` is what [`Self::choose`] gives from `truth` at `position` once each
    /// logit may be off by `slack` (a backend's rounding): a near tie admits either token, and
    /// a draw admits a token whose share could reach the draw once every weight moves as far
    /// as the slack allows, and only such a token.
    pub fn admits(&self, truth: &[f32], position: u64, token: u32, slack: f32) -> bool {
        let scores = self.penalised(truth);
        let Some(&score) = scores.get(token as usize) else {
            return false;
        };
        // The penalty scales a seen token's logit, and its error, by up to max(p, 1/p); two
        // logits each off by the slack can differ by twice it.
        let p = self.params.repetition_penalty;
        let apart = 2.0 * f64::from(slack * p.max(1.0 / p));
        let best = scores[argmax(&scores) as usize];
        if self.params.is_greedy() {
            return f64::from(score) >= f64::from(best) - apart;
        }
        let kept = self.candidates(&scores);
        let total: f64 = kept.iter().map(|c| c.1).sum();
        if !total.is_finite() || total <= 0.0 {
            return token == argmax(&scores);
        }
        // In units of log weight, as `candidates` weighs tokens: exp((s - best) / T).
        let temperature = f64::from(self.params.temperature);
        let spread = apart / temperature;
        let own = (f64::from(score) - f64::from(best)) / temperature;
        let kept_own = kept.iter().any(|c| c.0 == token);
        // A token left out here may have been kept there only if it was near the cut.
        let last = kept.last().map_or(f64::NEG_INFINITY, |c| c.1.ln());
        if !kept_own && own < last - spread {
            return false;
        }
        // Weight certainly ahead of the token, and weight possibly ahead of it or its own.
        let (mut ahead, mut through) = (0.0, if kept_own { 0.0 } else { own.exp() });
        for &(_, weight) in &kept {
            let log = weight.ln();
            if log > own + spread {
                ahead += weight;
            }
            if log >= own - spread {
                through += weight;
            }
        }
        // Each probability moves by at most exp(±slack / T) against the others: the share
        // ahead is at least A / (A + rest · e^spread), and the share through the token at most
        // B / (B + rest · e^-spread).
        let draw = self.target(position);
        let low = ahead / (ahead + (total - ahead).max(0.0) * spread.exp());
        let high = through / (through + (total - through).max(0.0) * (-spread).exp());
        (ahead == 0.0 || low <= draw) && draw < high
    }

    fn draw(&self, scores: &[f32], position: u64) -> u32 {
        let kept = self.candidates(scores);
        let total: f64 = kept.iter().map(|c| c.1).sum();
        if !total.is_finite() || total <= 0.0 {
            return argmax(scores);
        }
        let mut target = self.target(position) * total;
        for &(id, weight) in &kept {
            if target < weight {
                return id;
            }
            target -= weight;
        }
        kept.last().map_or(0, |c| c.0)
    }

    /// The uniform draw in [0, 1) for `position`: the seed's stream `position`.
    fn target(&self, position: u64) -> f64 {
        let mut rng = ChaCha8Rng::seed_from_u64(self.params.seed);
        rng.set_stream(position);
        rng.random::<f64>()
    }

    fn penalised(&self, logits: &[f32]) -> Vec<f32> {
        let mut scores = logits.to_vec();
        let p = self.params.repetition_penalty;
        if p == 1.0 {
            return scores;
        }
        for &id in &self.seen {
            if let Some(s) = scores.get_mut(id as usize) {
                *s = if *s > 0.0 { *s / p } else { *s * p };
            }
        }
        scores
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
        let by_weight = |a: &(u32, f64), b: &(u32, f64)| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0));
        // Only the top k need an order: select them first (a vocabulary is 50 to 250 thousand).
        if top_k > 0 && top_k < order.len() {
            order.select_nth_unstable_by(top_k - 1, by_weight);
            order.truncate(top_k);
        }
        order.sort_by(by_weight);
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

/// The `k` largest logits with their ids, best first; ties go to the lower id.
pub fn top_k(logits: &[f32], k: usize) -> Vec<(u32, f32)> {
    let mut indexed: Vec<(u32, f32)> = logits
        .iter()
        .enumerate()
        .map(|(i, &v)| (i as u32, v))
        .collect();
    let k = k.min(indexed.len());
    let order = |a: &(u32, f32), b: &(u32, f32)| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0));
    if k > 0 && k < indexed.len() {
        indexed.select_nth_unstable_by(k - 1, order);
    }
    indexed.truncate(k);
    indexed.sort_by(order);
    indexed
}

/// `log Σ exp(v)` over the finite values, computed stably in f64.
pub fn logsumexp(logits: &[f32]) -> f32 {
    let best = logits
        .iter()
        .copied()
        .filter(|v| v.is_finite())
        .fold(f32::NEG_INFINITY, f32::max);
    if !best.is_finite() {
        return best;
    }
    let sum: f64 = logits
        .iter()
        .filter(|v| v.is_finite())
        .map(|&v| f64::from(v - best).exp())
        .sum();
    (f64::from(best) + sum.ln()) as f32
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
        let s = sampler(SamplingParams::default());
        assert_eq!(s.choose(&LOGITS, 0).unwrap().token, 1);
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
            let s = sampler(params);
            (0..64)
                .map(|p| s.choose(&LOGITS, p).unwrap().token)
                .collect::<Vec<_>>()
        };
        assert_eq!(draw(params), draw(params));
        assert_ne!(draw(params), draw(SamplingParams { seed: 8, ..params }));
        assert!(draw(params).iter().any(|&t| t != 1), "a draw, not greedy");
    }

    #[test]
    fn top_k_top_p_and_min_p_narrow_the_choice() {
        let only = |params: SamplingParams| {
            let s = sampler(SamplingParams {
                temperature: 1.0,
                ..params
            });
            let mut seen: Vec<u32> = (0..200)
                .map(|p| s.choose(&LOGITS, p).unwrap().token)
                .collect();
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
        let s = sampler(SamplingParams {
            temperature: 1e-38,
            seed: 3,
            ..SamplingParams::default()
        });
        let logits = [40.0, 41.0, 39.0];
        assert!((0..32).all(|p| s.choose(&logits, p).unwrap().token == 1));
    }

    #[test]
    fn repetition_penalty_turns_greedy_away_from_what_was_said() {
        let params = SamplingParams {
            repetition_penalty: 2.0,
            ..SamplingParams::default()
        };
        let s = Sampler::with_parts(params, vec![4, 1, 4], 0).unwrap();
        assert_eq!(s.seen(), [1, 4]);
        assert_eq!(s.choose(&LOGITS, 0).unwrap().token, 2);
        let mut grown = sampler(params);
        grown.saw_all(&[1, 4, 1]);
        assert_eq!(grown, s);
        // Off, the penalty keeps no list: a request need not carry one.
        let mut off = sampler(SamplingParams::default());
        off.saw_all(&[1, 4]);
        assert!(off.seen().is_empty());
    }

    #[test]
    fn a_choice_reports_its_best_candidates_and_the_normaliser() {
        let s = sampler(SamplingParams::default()).reporting(3);
        let chosen = s.choose(&LOGITS, 0).unwrap();
        assert_eq!(chosen.top, vec![(1, 3.0), (4, 3.0), (2, 2.5)]);
        let total: f32 = LOGITS.iter().map(|l| (l - chosen.logsumexp).exp()).sum();
        assert!((total - 1.0).abs() < 1e-6, "{total}");
        assert!(Sampler::with_parts(SamplingParams::default(), vec![], MAX_TOP + 1).is_err());
    }

    #[test]
    fn a_draw_depends_on_its_position_not_on_what_came_before() {
        let s = sampler(SamplingParams {
            temperature: 1.0,
            seed: 11,
            ..SamplingParams::default()
        });
        let forward: Vec<u32> = (0..32)
            .map(|p| s.choose(&LOGITS, p).unwrap().token)
            .collect();
        let mut backward: Vec<u32> = (0..32)
            .rev()
            .map(|p| s.choose(&LOGITS, p).unwrap().token)
            .collect();
        backward.reverse();
        assert_eq!(forward, backward);
    }

    #[test]
    fn a_check_admits_the_choice_and_near_ties_but_not_another_token() {
        let greedy = sampler(SamplingParams::default());
        assert!(greedy.admits(&LOGITS, 0, 1, 0.0));
        // 4 ties 1; 2 is 0.5 below.
        assert!(greedy.admits(&LOGITS, 0, 4, 0.0));
        assert!(!greedy.admits(&LOGITS, 0, 2, 0.1));
        assert!(greedy.admits(&LOGITS, 0, 2, 0.6));
        assert!(!greedy.admits(&LOGITS, 0, 99, 1.0));
        let sampled = sampler(SamplingParams {
            temperature: 1.0,
            top_k: 3,
            seed: 5,
            ..SamplingParams::default()
        });
        for p in 0..64 {
            let chosen = sampled.choose(&LOGITS, p).unwrap().token;
            assert!(sampled.admits(&LOGITS, p, chosen, 1e-4));
            // Tokens 0 and 3 are outside the top 3.
            assert!(!sampled.admits(&LOGITS, p, 3, 1e-4));
            assert!(!sampled.admits(&LOGITS, p, 0, 1e-4));
        }
        // A real vocabulary's logits: mostly well below zero (an RMS near 8), drawn at 0.7.
        use rand::SeedableRng;
        use rand_distr::Distribution;
        let mut rng = ChaCha8Rng::seed_from_u64(3);
        let normal = rand_distr::Normal::new(-8.0f32, 3.0).unwrap();
        let logits: Vec<f32> = (0..1000).map(|_| normal.sample(&mut rng)).collect();
        let warm = sampler(SamplingParams {
            temperature: 0.7,
            seed: 9,
            ..SamplingParams::default()
        });
        for p in 0..32 {
            let chosen = warm.choose(&logits, p).unwrap().token;
            for (slack, most) in [(1e-3, 3), (0.02, 10)] {
                assert!(warm.admits(&logits, p, chosen, slack));
                let admitted = (0..1000)
                    .filter(|&t| warm.admits(&logits, p, t, slack))
                    .count();
                // A backend's rounding lets a draw near a boundary go either way, never to
                // any token at all.
                assert!(admitted <= most, "position {p}, slack {slack}: {admitted}");
            }
        }
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
