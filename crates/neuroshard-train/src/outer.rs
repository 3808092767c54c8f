//! DiLoCo's outer step: a robust aggregate of the replicas' pseudo-gradients, then Nesterov
//! momentum on the parameters the round started from.

/// Why an outer step cannot be taken.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum OuterError {
    /// No contributions at all.
    #[error("no pseudo-gradients to aggregate")]
    Empty,
    /// Contributions of different lengths.
    #[error("pseudo-gradient {which} has {got} coordinates, the first has {expected}")]
    WrongLength {
        /// Which contribution.
        which: usize,
        /// Its length.
        got: usize,
        /// The first one's.
        expected: usize,
    },
    /// Trimming would leave nothing.
    #[error("trimming {trim} from each end of {n} pseudo-gradients leaves none")]
    OverTrimmed {
        /// Trimmed from each end.
        trim: usize,
        /// Contributions.
        n: usize,
    },
}

/// How many values a trimmed mean of `n` drops from each end by default: a quarter, rounded
/// up, but never the middle one (3 replicas: the median; 8: 2 from each end).
pub fn default_trim(n: usize) -> usize {
    n.div_ceil(4).min(n.saturating_sub(1) / 2)
}

/// The coordinate-wise trimmed mean of `contributions`: at each coordinate, the `trim` lowest
/// and `trim` highest values are dropped and the rest averaged. A minority of replicas sending
/// scaled or sign-flipped values cannot pull a coordinate outside the honest values' range.
pub fn trimmed_mean(contributions: &[&[f32]], trim: usize) -> Result<Vec<f32>, OuterError> {
    let first = contributions.first().ok_or(OuterError::Empty)?;
    for (which, c) in contributions.iter().enumerate() {
        if c.len() != first.len() {
            return Err(OuterError::WrongLength {
                which,
                got: c.len(),
                expected: first.len(),
            });
        }
    }
    let n = contributions.len();
    if 2 * trim >= n {
        return Err(OuterError::OverTrimmed { trim, n });
    }
    let kept = (n - 2 * trim) as f32;
    let mut column = vec![0.0f32; n];
    Ok((0..first.len())
        .map(|i| {
            for (slot, c) in column.iter_mut().zip(contributions) {
                *slot = c[i];
            }
            column.sort_unstable_by(f32::total_cmp);
            column[trim..n - trim].iter().sum::<f32>() / kept
        })
        .collect())
}

/// The outer optimizer: SGD with Nesterov momentum on the pseudo-gradient.
#[derive(Debug, Clone)]
pub struct Nesterov {
    /// Outer learning rate. DiLoCo's default 0.7.
    pub lr: f32,
    /// Momentum. DiLoCo's default 0.9.
    pub momentum: f32,
    velocity: Vec<f32>,
}

impl Nesterov {
    /// DiLoCo's outer learning rate.
    pub const DEFAULT_LR: f32 = 0.7;
    /// DiLoCo's outer momentum.
    pub const DEFAULT_MOMENTUM: f32 = 0.9;

    /// An optimizer for `len` parameters with DiLoCo's defaults.
    pub fn new(len: usize) -> Self {
        Self {
            lr: Self::DEFAULT_LR,
            momentum: Self::DEFAULT_MOMENTUM,
            velocity: vec![0.0; len],
        }
    }

    /// One outer step: with the aggregated pseudo-gradient Δ, v ← μ·v + Δ and
    /// θ ← θ − lr·(Δ + μ·v), where θ holds the parameters the round started from.
    pub fn step(&mut self, params: &mut [f32], delta: &[f32]) -> Result<(), OuterError> {
        for (which, got) in [(0, params.len()), (1, delta.len())] {
            if got != self.velocity.len() {
                return Err(OuterError::WrongLength {
                    which,
                    got,
                    expected: self.velocity.len(),
                });
            }
        }
        for ((p, v), d) in params.iter_mut().zip(&mut self.velocity).zip(delta) {
            *v = self.momentum * *v + d;
            *p -= self.lr * (d + self.momentum * *v);
        }
        Ok(())
    }

    /// The momentum buffer, for checkpoints.
    pub fn velocity(&self) -> &[f32] {
        &self.velocity
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_trim_keeps_a_middle() {
        let trims: Vec<usize> = (1..=9).map(default_trim).collect();
        assert_eq!(trims, [0, 0, 1, 1, 2, 2, 2, 2, 3]);
    }

    #[test]
    fn a_bad_minority_cannot_move_the_trimmed_mean_outside_the_honest_range() {
        let honest: [&[f32]; 4] = [&[1.0, -2.0], &[1.2, -2.2], &[0.8, -1.8], &[1.1, -2.1]];
        for bad in [[-100.0f32, 200.0], [-1.0, 2.0], [1e6, 1e6]] {
            let mut all: Vec<&[f32]> = honest.to_vec();
            all.push(&bad);
            let mean = trimmed_mean(&all, default_trim(all.len())).unwrap();
            assert!((0.8..=1.2).contains(&mean[0]), "{bad:?}: {mean:?}");
            assert!((-2.2..=-1.8).contains(&mean[1]), "{bad:?}: {mean:?}");
        }
        // Untrimmed, the plain mean is dragged away.
        let bad = [-100.0f32, 200.0];
        let mut all: Vec<&[f32]> = honest.to_vec();
        all.push(&bad);
        assert!(trimmed_mean(&all, 0).unwrap()[0] < -10.0);
    }

    #[test]
    fn malformed_aggregates_are_refused() {
        assert_eq!(trimmed_mean(&[], 0), Err(OuterError::Empty));
        assert_eq!(
            trimmed_mean(&[&[1.0], &[1.0, 2.0]], 0),
            Err(OuterError::WrongLength {
                which: 1,
                got: 2,
                expected: 1
            })
        );
        assert_eq!(
            trimmed_mean(&[&[1.0], &[2.0]], 1),
            Err(OuterError::OverTrimmed { trim: 1, n: 2 })
        );
        assert!(Nesterov::new(2).step(&mut [0.0; 3], &[0.0; 2]).is_err());
    }

    #[test]
    fn nesterov_follows_its_update_rule() {
        let mut outer = Nesterov::new(1);
        let mut theta = [1.0f32];
        outer.step(&mut theta, &[0.5]).unwrap();
        // v = 0.5; θ = 1 − 0.7·(0.5 + 0.9·0.5) = 0.335
        assert!((theta[0] - 0.335).abs() < 1e-6);
        outer.step(&mut theta, &[0.5]).unwrap();
        // v = 0.95; θ = 0.335 − 0.7·(0.5 + 0.855) = −0.6135
        assert!((theta[0] + 0.6135).abs() < 1e-6);
        assert!((outer.velocity()[0] - 0.95).abs() < 1e-6);
    }
}
