//! Decode steps of several sessions in one pass (continuous batching): the rows share every
//! read of the weights, and each attends over its own cache at its own position. Sessions join
//! and leave between steps; a step is one token of each.

use std::ops::Range;

use burn::tensor::Tensor;

use super::layers::Row;
use super::{Positions, Shard, ShardInput, ShardOutput};
use crate::ModelError;
use crate::kv::KvCache;
use crate::layout::to_vec;

/// One session's decode step in a batch: its cache, the position of its new token, and the
/// token (or its hidden state).
#[derive(Debug)]
pub struct BatchItem<'a> {
    /// The session's cache.
    pub cache: &'a mut KvCache,
    /// Position of the new token.
    pub start_pos: usize,
    /// The new token, or its hidden state.
    pub input: ShardInput,
}

impl Shard {
    /// Runs `layers` on one new token of each item at once; what [`Shard::forward`] gives each
    /// alone, in item order. Each item is checked on its own first: one that fails gets its
    /// error and the others run.
    pub fn forward_batch(
        &self,
        layers: Range<usize>,
        items: Vec<BatchItem<'_>>,
    ) -> Vec<Result<ShardOutput, ModelError>> {
        let mut results: Vec<Option<Result<ShardOutput, ModelError>>> = Vec::new();
        let mut runs = Vec::new();
        for item in items {
            match self.check_step(&layers, item.cache, item.start_pos, &item.input) {
                Ok(()) => {
                    runs.push(item);
                    results.push(None);
                }
                Err(e) => results.push(Some(Err(e))),
            }
        }
        let mut outputs = match runs.is_empty() {
            true => Vec::new(),
            false => self.run_rows(layers, runs),
        }
        .into_iter();
        results
            .into_iter()
            .map(|r| match r {
                Some(err) => err,
                None => outputs.next().expect("an output per row run"),
            })
            .collect()
    }

    /// Checks one step and readies its cache, as [`Shard::forward`] does.
    fn check_step(
        &self,
        layers: &Range<usize>,
        cache: &mut KvCache,
        start_pos: usize,
        input: &ShardInput,
    ) -> Result<(), ModelError> {
        self.check_request(layers, input)?;
        let hidden = self.info.config.hidden_size;
        if input.tokens(hidden) != 1 {
            return Err(ModelError::Request(format!(
                "a batched step runs one token, not {}",
                input.tokens(hidden)
            )));
        }
        let max = self.info.config.max_positions();
        if start_pos >= max {
            return Err(ModelError::Request(format!(
                "position {start_pos} is past the model's {max} (max_position_embeddings)"
            )));
        }
        cache.prepare(layers.clone(), start_pos)
    }

    /// The checked rows through `layers`: their outputs in order.
    fn run_rows(
        &self,
        layers: Range<usize>,
        mut rows: Vec<BatchItem<'_>>,
    ) -> Vec<Result<ShardOutput, ModelError>> {
        let config = &self.info.config;
        let embedded = rows
            .iter_mut()
            .map(|row| {
                let input = std::mem::replace(&mut row.input, ShardInput::Tokens(Vec::new()));
                self.embed_input(input, 1)
            })
            .collect::<Result<Vec<_>, _>>();
        let mut hidden = match embedded {
            Ok(embedded) => Tensor::cat(embedded, 0),
            // Checked above, so not expected: every row is refused alike.
            Err(e) => {
                let why = e.to_string();
                return rows
                    .iter()
                    .map(|_| Err(ModelError::Request(why.clone())))
                    .collect();
            }
        };
        let positions: Vec<Positions> = rows
            .iter()
            .map(|row| Positions::new(config, row.start_pos, 1, &self.device))
            .collect();
        for index in layers.clone() {
            let layer = &self.weights.layers[index - self.range.start];
            let caches = rows.iter_mut().zip(&positions).map(|(row, positions)| Row {
                cache: Some(row.cache.layer_mut(index, self.cache_float())),
                positions,
            });
            hidden = layer.forward_rows(hidden, caches.collect(), index, self.heads);
        }
        let n = rows.len();
        let (values, output): (_, fn(Vec<f32>) -> ShardOutput) =
            match layers.end == config.num_hidden_layers {
                true => (to_vec(self.logits(hidden)), ShardOutput::Logits),
                false => (to_vec(hidden), ShardOutput::Hidden),
            };
        let width = values.len() / n;
        values
            .chunks(width)
            .map(|row| Ok(output(row.to_vec())))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::init::{ModelSpec, write_model};

    /// Greedy tokens of one session decoding alone after `prompt`.
    fn alone(shard: &Shard, prompt: &[u32], steps: usize) -> Vec<u32> {
        let mut cache = KvCache::new();
        let range = shard.range();
        let mut out = shard
            .forward(
                &mut cache,
                0,
                range.clone(),
                ShardInput::Tokens(prompt.to_vec()),
            )
            .unwrap();
        let mut tokens = Vec::new();
        for pos in prompt.len()..prompt.len() + steps {
            let ShardOutput::Logits(logits) = out else {
                panic!("logits")
            };
            let token = crate::argmax(&logits);
            tokens.push(token);
            out = shard
                .forward(
                    &mut cache,
                    pos,
                    range.clone(),
                    ShardInput::Tokens(vec![token]),
                )
                .unwrap();
        }
        tokens
    }

    #[test]
    fn batched_sessions_get_their_own_tokens_as_they_join_and_leave() {
        let dir = tempfile::tempdir().unwrap();
        write_model(dir.path(), &ModelSpec::tiny()).unwrap();
        let shard = Shard::load(dir.path(), 0..4, &Default::default()).unwrap();
        let prompts: [&[u32]; 4] = [&[1, 2, 3], &[40, 41, 42, 43, 44], &[7], &[100, 3, 100, 3]];
        // Session s joins at step s and leaves after 12 - s steps.
        let steps = |s: usize| 12 - s;
        let expected: Vec<Vec<u32>> = prompts
            .iter()
            .enumerate()
            .map(|(s, p)| alone(&shard, p, steps(s)))
            .collect();
        let mut caches: Vec<KvCache> = prompts.iter().map(|_| KvCache::new()).collect();
        let mut next: Vec<Option<u32>> = vec![None; prompts.len()];
        let mut got: Vec<Vec<u32>> = vec![Vec::new(); prompts.len()];
        for step in 0..16 {
            // Joiners prefill alone, as a node runs a prompt.
            if let Some(p) = prompts.get(step) {
                let out = shard
                    .forward(&mut caches[step], 0, 0..4, ShardInput::Tokens(p.to_vec()))
                    .unwrap();
                let ShardOutput::Logits(logits) = out else {
                    panic!("logits")
                };
                next[step] = Some(crate::argmax(&logits));
            }
            let live: Vec<usize> = (0..prompts.len())
                .filter(|&s| s <= step && got[s].len() < steps(s))
                .collect();
            let mut items = Vec::new();
            let mut order = Vec::new();
            for (s, cache) in caches.iter_mut().enumerate() {
                if !live.contains(&s) {
                    continue;
                }
                let token = next[s].expect("a token to run");
                got[s].push(token);
                if got[s].len() == steps(s) {
                    continue;
                }
                let start_pos = prompts[s].len() + got[s].len() - 1;
                items.push(BatchItem {
                    cache,
                    start_pos,
                    input: ShardInput::Tokens(vec![token]),
                });
                order.push(s);
            }
            for (s, out) in order.into_iter().zip(shard.forward_batch(0..4, items)) {
                let ShardOutput::Logits(logits) = out.unwrap() else {
                    panic!("logits")
                };
                next[s] = Some(crate::argmax(&logits));
            }
        }
        assert_eq!(got, expected);
    }

    #[test]
    fn a_bad_step_is_refused_alone_and_the_others_run() {
        let dir = tempfile::tempdir().unwrap();
        write_model(dir.path(), &ModelSpec::tiny()).unwrap();
        let shard = Shard::load(dir.path(), 0..2, &Default::default()).unwrap();
        let (mut a, mut b, mut c) = (KvCache::new(), KvCache::new(), KvCache::new());
        let items = vec![
            BatchItem {
                cache: &mut a,
                start_pos: 0,
                input: ShardInput::Tokens(vec![5]),
            },
            // A gap: b holds nothing yet.
            BatchItem {
                cache: &mut b,
                start_pos: 3,
                input: ShardInput::Tokens(vec![6]),
            },
            BatchItem {
                cache: &mut c,
                start_pos: 0,
                input: ShardInput::Tokens(vec![7, 8]),
            },
        ];
        let out = shard.forward_batch(0..2, items);
        assert!(matches!(&out[0], Ok(ShardOutput::Hidden(h)) if h.len() == 64));
        assert!(
            matches!(&out[1], Err(ModelError::PositionGap { .. })),
            "{:?}",
            out[1]
        );
        let err = out[2].as_ref().unwrap_err().to_string();
        assert!(err.contains("one token"), "{err}");
        assert_eq!((a.len(1), b.len(1), c.len(1)), (1, 0, 0));
    }
}
