//! A fingerprint of one output row that survives backend nondeterminism, after TOPLOC.
//!
//! Two honest runs of the same layers on the same input differ in the last bits: fp16 weights
//! against fp32, a GPU's reduction order against a CPU's. A hash of the output cannot tell that
//! apart from cheating, so receipts also carry the row's largest entries (index and a coarse
//! value, in units of the row's RMS) and its RMS. A verifier that recomputes the row checks the
//! claimed entries against its own values within a [`Tolerance`].

use serde::{Deserialize, Serialize};

/// Entries kept. Sixteen of the largest entries of a hidden state or logits row pin it down:
/// noise, a skipped layer or other weights move most of them by far more than the tolerance.
pub const TOP_K: usize = 16;

/// Steps per RMS of the quantised values: 1/256 of the RMS is below any tolerance used.
const STEPS_PER_RMS: f32 = 256.0;

/// The largest entries of a row and its scale.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Fingerprint {
    /// Root mean square of the row.
    pub rms: f32,
    /// Indices of the largest entries by magnitude, largest first.
    pub indices: Vec<u32>,
    /// Their values in steps of rms/256, rounded.
    pub values: Vec<i16>,
}

/// How far a recomputed row may be from a fingerprint and still match.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Tolerance {
    /// Largest relative difference of the RMS. Default 2 %.
    pub rms: f32,
    /// Largest difference of one entry, in RMS units. Default 0.05: fp16 weights move entries
    /// of the test models by under 0.01, noise of 10 % of the RMS by 0.08 on average.
    pub entry: f32,
    /// Entries allowed past `entry` (near-ties between backends). Default 2 of 16.
    pub outliers: usize,
    /// Largest mean difference over all entries, in RMS units. Default 0.02.
    pub mean: f32,
    /// A claimed index must be at least this share of the recomputed k-th largest magnitude,
    /// so the claim names entries that really are among the largest. Default 0.8.
    pub rank: f32,
}

impl Default for Tolerance {
    fn default() -> Self {
        Self {
            rms: 0.02,
            entry: 0.05,
            outliers: 2,
            mean: 0.02,
            rank: 0.8,
        }
    }
}

/// Why a fingerprint did not match a recomputed row.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum Mismatch {
    /// The fingerprint is not well formed for a row of that width.
    #[error("malformed fingerprint: {0}")]
    Malformed(String),
    /// The scales differ.
    #[error("row RMS {claimed} differs from the recomputed {actual}")]
    Scale {
        /// Claimed RMS.
        claimed: f32,
        /// Recomputed RMS.
        actual: f32,
    },
    /// Entries differ.
    #[error(
        "{bad} of {k} entries differ by more than the tolerance (mean difference {mean:.4} RMS)"
    )]
    Entries {
        /// Entries out of tolerance.
        bad: usize,
        /// Entries compared.
        k: usize,
        /// Mean difference in RMS units.
        mean: f32,
    },
}

impl Fingerprint {
    /// The fingerprint of `row`.
    pub fn of(row: &[f32]) -> Self {
        let rms = rms(row);
        let mut order: Vec<u32> = (0..row.len() as u32).collect();
        let magnitude = |i: &u32| row[*i as usize].abs();
        let k = TOP_K.min(row.len());
        if k > 0 && k < row.len() {
            order.select_nth_unstable_by(k - 1, |a, b| magnitude(b).total_cmp(&magnitude(a)));
        }
        order.truncate(k);
        order.sort_by(|a, b| magnitude(b).total_cmp(&magnitude(a)).then(a.cmp(b)));
        let scale = if rms > 0.0 { STEPS_PER_RMS / rms } else { 0.0 };
        let values = order
            .iter()
            .map(|&i| (row[i as usize] * scale).round().clamp(-32768.0, 32767.0) as i16)
            .collect();
        Self {
            rms,
            indices: order,
            values,
        }
    }

    /// Checks the shape of a fingerprint received from the network.
    pub fn validate(&self, width: Option<usize>) -> Result<(), Mismatch> {
        let bad = |why: String| Err(Mismatch::Malformed(why));
        if self.indices.len() != self.values.len() || self.indices.len() > TOP_K {
            return bad(format!(
                "{} indices and {} values (at most {TOP_K} of each, as many of one as the other)",
                self.indices.len(),
                self.values.len()
            ));
        }
        if !self.rms.is_finite() || self.rms < 0.0 {
            return bad(format!(
                "RMS {} is not a finite non-negative number",
                self.rms
            ));
        }
        if let Some(width) = width
            && let Some(i) = self.indices.iter().find(|&&i| i as usize >= width)
        {
            return bad(format!("index {i} is outside a row of {width}"));
        }
        Ok(())
    }

    /// Whether `row` (recomputed, or as received) is the row this fingerprint describes.
    pub fn check(&self, row: &[f32], tolerance: &Tolerance) -> Result<(), Mismatch> {
        self.validate(Some(row.len()))?;
        let k = TOP_K.min(row.len());
        if self.indices.len() != k {
            return Err(Mismatch::Malformed(format!(
                "{} entries for a row of {} (expected {k})",
                self.indices.len(),
                row.len()
            )));
        }
        let actual = rms(row);
        if (self.rms - actual).abs() > tolerance.rms * actual.max(f32::MIN_POSITIVE) {
            return Err(Mismatch::Scale {
                claimed: self.rms,
                actual,
            });
        }
        if k == 0 || actual == 0.0 {
            return Ok(());
        }
        let kth = Self::of(row)
            .indices
            .last()
            .map_or(0.0, |&i| row[i as usize].abs());
        let (mut bad, mut total) = (0, 0.0);
        for (&i, &q) in self.indices.iter().zip(&self.values) {
            let truth = row[i as usize];
            let claimed = q as f32 / STEPS_PER_RMS * self.rms;
            let diff = (claimed - truth).abs() / actual;
            total += diff;
            if diff > tolerance.entry || truth.abs() < tolerance.rank * kth {
                bad += 1;
            }
        }
        let mean = total / k as f32;
        if bad > tolerance.outliers || mean > tolerance.mean {
            return Err(Mismatch::Entries { bad, k, mean });
        }
        Ok(())
    }
    /// Whether the row this fingerprint describes is within `tolerance` of the row `other`
    /// describes, judged from the two fingerprints alone: what a worker can check of a void's
    /// evidence without the row. An entry of this one that is not among `other`'s largest
    /// counts as out of tolerance, as [`Self::check`] counts an entry that is not among the
    /// row's largest.
    pub fn compare(&self, other: &Fingerprint, tolerance: &Tolerance) -> Result<(), Mismatch> {
        self.validate(None)?;
        other.validate(None)?;
        if self.indices.len() != other.indices.len() {
            return Err(Mismatch::Malformed(format!(
                "{} entries against {}",
                self.indices.len(),
                other.indices.len()
            )));
        }
        let actual = other.rms;
        if (self.rms - actual).abs() > tolerance.rms * actual.max(f32::MIN_POSITIVE) {
            return Err(Mismatch::Scale {
                claimed: self.rms,
                actual,
            });
        }
        let k = self.indices.len();
        if k == 0 || actual == 0.0 {
            return Ok(());
        }
        let value = |f: &Fingerprint, q: i16| q as f32 / STEPS_PER_RMS * f.rms;
        // An entry `other` does not list is at most as large as the smallest one it does.
        let smallest = other
            .values
            .iter()
            .map(|&q| value(other, q).abs())
            .fold(f32::INFINITY, f32::min);
        let (mut bad, mut total) = (0, 0.0);
        for (&i, &q) in self.indices.iter().zip(&self.values) {
            let claimed = value(self, q);
            match other.indices.iter().position(|&j| j == i) {
                Some(at) => {
                    let diff = (claimed - value(other, other.values[at])).abs() / actual;
                    total += diff;
                    if diff > tolerance.entry {
                        bad += 1;
                    }
                }
                None => {
                    total += (claimed.abs() - smallest).max(0.0) / actual;
                    bad += 1;
                }
            }
        }
        let mean = total / k as f32;
        if bad > tolerance.outliers || mean > tolerance.mean {
            return Err(Mismatch::Entries { bad, k, mean });
        }
        Ok(())
    }
}

/// What a requester shows when it voids a receipt: the fingerprint comparison that failed, so
/// the worker (and anyone it shows the void to) sees the mismatch, and a void that shows none
/// is refused.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Evidence {
    /// The receipt's fingerprint does not describe the row the requester recomputed.
    Receipt {
        /// Fingerprint of the recomputed row.
        recomputed: Fingerprint,
    },
    /// The receipt's fingerprint matched, but the output the requester received did not.
    Output {
        /// Fingerprint of the recomputed row.
        recomputed: Fingerprint,
        /// Fingerprint of the row received.
        received: Fingerprint,
    },
    /// The receipt's fingerprint matched the recomputed logits, but the token chosen from
    /// them (or its candidates' logits) did not follow from them.
    Choice {
        /// Fingerprint of the recomputed logits.
        recomputed: Fingerprint,
        /// What did not follow, in words.
        what: String,
    },
}

impl Evidence {
    /// Checks that the evidence shows a mismatch with `claimed` (the receipt's fingerprint):
    /// Ok with the mismatch it shows, in words; Err saying why it shows none.
    pub fn shows(&self, claimed: &Fingerprint, tolerance: &Tolerance) -> Result<String, String> {
        // An output or choice void says the receipt was right and what was sent was not.
        if let Self::Output { recomputed, .. } | Self::Choice { recomputed, .. } = self
            && let Err(m) = claimed.compare(recomputed, tolerance)
        {
            return Err(format!(
                "its evidence says the receipt's fingerprint matched, but it shows {m}"
            ));
        }
        let (label, got, recomputed) = match self {
            Self::Receipt { recomputed } => ("the receipt's fingerprint", claimed, recomputed),
            Self::Output {
                recomputed,
                received,
            } => ("the output's fingerprint", received, recomputed),
            // The choice is the requester's word, as a received row's fingerprint is.
            Self::Choice { what, .. } => {
                return match what.is_empty() {
                    true => Err("its evidence names no wrong choice".into()),
                    false => Ok(format!("the token chosen: {what}")),
                };
            }
        };
        match got.compare(recomputed, tolerance) {
            Err(Mismatch::Malformed(why)) => Err(format!("malformed evidence: {why}")),
            Err(mismatch) => Ok(format!("{label}: {mismatch}")),
            Ok(()) => Err(format!(
                "its evidence shows {label} matching the recomputed row"
            )),
        }
    }
}

fn rms(row: &[f32]) -> f32 {
    if row.is_empty() {
        return 0.0;
    }
    let sum: f64 = row.iter().map(|&v| (v as f64) * (v as f64)).sum();
    (sum / row.len() as f64).sqrt() as f32
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;
    use rand_distr::{Distribution, Normal};

    fn row(seed: u64, n: usize) -> Vec<f32> {
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let normal = Normal::new(0.0f32, 1.0).unwrap();
        (0..n).map(|_| normal.sample(&mut rng)).collect()
    }

    #[test]
    fn two_fingerprints_compare_as_their_rows_do() {
        let tolerance = Tolerance::default();
        let a = row(1, 512);
        let truth = Fingerprint::of(&a);
        let close: Vec<f32> = a.iter().map(|v| v * 1.001).collect();
        Fingerprint::of(&close).compare(&truth, &tolerance).unwrap();
        let noise = row(2, 512);
        let noisy: Vec<f32> = a.iter().zip(&noise).map(|(v, n)| v + 0.1 * n).collect();
        assert!(Fingerprint::of(&noisy).compare(&truth, &tolerance).is_err());
        let other = row(3, 512);
        assert!(matches!(
            Fingerprint::of(&other).compare(&truth, &tolerance),
            Err(Mismatch::Entries { .. } | Mismatch::Scale { .. })
        ));
        let short = Fingerprint::of(&a[..8]);
        assert!(matches!(
            short.compare(&truth, &tolerance),
            Err(Mismatch::Malformed(_))
        ));
    }

    #[test]
    fn accepts_small_differences_and_rejects_noise() {
        let a = row(1, 512);
        let fp = Fingerprint::of(&a);
        assert_eq!(fp.indices.len(), TOP_K);
        let tol = Tolerance::default();
        assert_eq!(fp.check(&a, &tol), Ok(()));
        let rounded: Vec<f32> = a.iter().map(|&v| half::f16::from_f32(v).to_f32()).collect();
        assert_eq!(fp.check(&rounded, &tol), Ok(()));
        let noise = row(2, 512);
        let noisy: Vec<f32> = a.iter().zip(&noise).map(|(v, n)| v + 0.1 * n).collect();
        assert!(matches!(
            fp.check(&noisy, &tol),
            Err(Mismatch::Entries { .. })
        ));
        let scaled: Vec<f32> = a.iter().map(|v| v * 1.1).collect();
        assert!(matches!(
            fp.check(&scaled, &tol),
            Err(Mismatch::Scale { .. })
        ));
        assert!(fp.check(&row(3, 512), &tol).is_err());
    }

    #[test]
    fn rejects_malformed_fingerprints() {
        let a = row(4, 64);
        let mut fp = Fingerprint::of(&a);
        fp.indices[0] = 64;
        assert!(matches!(
            fp.check(&a, &Tolerance::default()),
            Err(Mismatch::Malformed(_))
        ));
        let mut fp = Fingerprint::of(&a);
        fp.values.pop();
        assert!(fp.validate(None).is_err());
        fp.rms = f32::NAN;
        assert!(fp.validate(None).is_err());
    }
}

/// The same computation on other weights' precision or another backend matches; cheating
/// does not. Runs layers 0..3 of the tiny test model and fingerprints the last hidden row.
#[cfg(test)]
mod model_tests {
    use super::*;
    use neuroshard_model::codec::WireDType;
    use neuroshard_model::init::{ModelSpec, write_model};
    use neuroshard_model::{KvCache, Shard, ShardInput, ShardOutput};
    use std::path::Path;

    const PROMPT: [u32; 5] = [10, 20, 30, 40, 50];

    fn model(dtype: WireDType, seed: u64) -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        write_model(
            dir.path(),
            &ModelSpec {
                dtype,
                seed,
                ..ModelSpec::tiny()
            },
        )
        .unwrap();
        dir
    }

    fn hidden(out: ShardOutput) -> Vec<f32> {
        match out {
            ShardOutput::Hidden(h) => h,
            ShardOutput::Logits(_) => panic!("expected hidden states"),
        }
    }

    fn last_row(values: &[f32]) -> Vec<f32> {
        let width = ModelSpec::tiny().hidden;
        values[values.len() - width..].to_vec()
    }

    /// Hidden states after layers 0..3, skipping `skip` if given.
    fn run(dir: &Path, device: &burn::tensor::Device, skip: Option<usize>) -> Vec<f32> {
        let shard = Shard::load(dir, 0..4, device).unwrap();
        let mut cache = KvCache::new();
        let mut h = ShardInput::Tokens(PROMPT.to_vec());
        for layer in 0..3 {
            if Some(layer) == skip {
                continue;
            }
            h = ShardInput::Hidden(hidden(
                shard.forward(&mut cache, 0, layer..layer + 1, h).unwrap(),
            ));
        }
        match h {
            ShardInput::Hidden(values) => last_row(&values),
            ShardInput::Tokens(_) => unreachable!(),
        }
    }

    #[test]
    fn accepts_fp16_weights_and_rejects_noise_skipped_layers_and_other_weights() {
        let cpu = burn::tensor::Device::flex();
        let tol = Tolerance::default();
        let honest = run(model(WireDType::F32, 1).path(), &cpu, None);
        let fp = Fingerprint::of(&honest);
        let half = run(model(WireDType::F16, 1).path(), &cpu, None);
        assert_eq!(fp.check(&half, &tol), Ok(()), "fp32 claim, fp16 recompute");
        assert_eq!(
            Fingerprint::of(&half).check(&honest, &tol),
            Ok(()),
            "fp16 claim, fp32 recompute"
        );
        let skipped = run(model(WireDType::F32, 1).path(), &cpu, Some(1));
        assert!(
            Fingerprint::of(&skipped).check(&honest, &tol).is_err(),
            "a skipped layer"
        );
        let other = run(model(WireDType::F32, 9).path(), &cpu, None);
        assert!(
            Fingerprint::of(&other).check(&honest, &tol).is_err(),
            "other weights"
        );
        let mut rng = <rand::rngs::StdRng as rand::SeedableRng>::seed_from_u64(5);
        let normal = rand_distr::Normal::new(0.0f32, 0.1 * fp.rms).unwrap();
        let noisy: Vec<f32> = honest
            .iter()
            .map(|v| v + rand_distr::Distribution::sample(&normal, &mut rng))
            .collect();
        assert!(
            Fingerprint::of(&noisy).check(&honest, &tol).is_err(),
            "10 % noise"
        );
    }

    /// CPU against wgpu (a GPU, or Mesa's software Vulkan): `scripts/test-wgpu.sh`.
    #[cfg(feature = "wgpu")]
    #[test]
    fn accepts_cpu_against_wgpu() {
        let dir = model(WireDType::BF16, 1);
        let cpu = run(dir.path(), &burn::tensor::Device::flex(), None);
        let gpu = run(
            dir.path(),
            &burn::tensor::Device::wgpu(Default::default()),
            None,
        );
        let tol = Tolerance::default();
        assert_eq!(Fingerprint::of(&cpu).check(&gpu, &tol), Ok(()));
        assert_eq!(Fingerprint::of(&gpu).check(&cpu, &tol), Ok(()));
    }
}
