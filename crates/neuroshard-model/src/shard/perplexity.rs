//! Perplexity of a text under a whole model: how the quality cost of lighter weights is
//! measured.

use super::*;

/// Positions whose logits are taken at once: bounds the memory a long text's vocabulary rows
/// take.
const LOGIT_ROWS: usize = 64;

impl Shard {
    /// Perplexity of `ids` under this shard, which must hold the whole model: the exponential
    /// of the mean negative log-likelihood of each token after the first, given those before
    /// it.
    pub fn perplexity(&self, ids: &[u32]) -> Result<f64, ModelError> {
        let total = self.info.config.num_hidden_layers;
        if self.range != (0..total) {
            return Err(ModelError::LayerRange(format!(
                "perplexity needs the whole model's {total} layers; this shard holds {}..{}",
                self.range.start, self.range.end
            )));
        }
        if ids.len() < 2 {
            return Err(ModelError::Request(
                "perplexity needs at least two tokens".into(),
            ));
        }
        let input = ShardInput::Tokens(ids[..ids.len() - 1].to_vec());
        self.check_request(&self.range, &input)?;
        let predicted = ids.len() - 1;
        if predicted > self.info.config.max_positions() {
            return Err(ModelError::Request(format!(
                "{predicted} positions exceed the model's {} (max_position_embeddings)",
                self.info.config.max_positions()
            )));
        }
        let mut cache = KvCache::new();
        let hidden = self.hidden_states(&mut cache, 0, self.range(), input, predicted)?;
        let vocab = self.info.config.vocab_size;
        let mut nll = 0.0f64;
        for start in (0..predicted).step_by(LOGIT_ROWS) {
            let rows = LOGIT_ROWS.min(predicted - start);
            let logits = to_vec(self.logits(hidden.clone().narrow(1, start, rows)));
            for (row, &next) in logits.chunks(vocab).zip(&ids[start + 1..]) {
                let target = row.get(next as usize).ok_or_else(|| {
                    ModelError::Request(format!("token {next} is outside the vocabulary"))
                })?;
                nll += f64::from(crate::sampling::logsumexp(row) - target);
            }
        }
        Ok((nll / predicted as f64).exp())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::init::{ModelSpec, write_model};

    /// One pass over the text gives what a decode step per token gives.
    #[test]
    fn perplexity_in_one_pass_is_the_decode_steps_likelihood() {
        let dir = tempfile::tempdir().unwrap();
        write_model(dir.path(), &ModelSpec::tiny()).unwrap();
        let shard = Shard::load(dir.path(), 0..4, &Default::default()).unwrap();
        let ids: Vec<u32> = (0..90).map(|i| (i * 37 % 250) as u32).collect();
        let mut cache = KvCache::new();
        let mut nll = 0.0f64;
        for (pos, pair) in ids.windows(2).enumerate() {
            let input = ShardInput::Tokens(vec![pair[0]]);
            let ShardOutput::Logits(row) = shard.forward(&mut cache, pos, 0..4, input).unwrap()
            else {
                unreachable!("the whole model ends in logits")
            };
            nll += f64::from(crate::sampling::logsumexp(&row) - row[pair[1] as usize]);
        }
        let stepped = (nll / 89.0).exp();
        let whole = shard.perplexity(&ids).unwrap();
        assert!((whole / stepped - 1.0).abs() < 1e-4, "{whole} vs {stepped}");
        let part = Shard::load(dir.path(), 0..2, &Default::default()).unwrap();
        let err = part.perplexity(&ids).unwrap_err().to_string();
        assert!(err.contains("whole model"), "{err}");
        assert!(shard.perplexity(&ids[..1]).is_err());
    }
}
