//! The pseudo-gradient codec: top-k with error feedback, fp16 values, gap-coded indices.
//!
//! Each outer round a replica sends only the `k` largest coordinates (10 % by default) of its
//! pseudo-gradient plus what it left unsent before; the rest stays in its residual for later
//! rounds (error feedback; without it top-k training diverges). Values travel as fp16, and the
//! rounding error joins the residual too. Indices are sorted and sent as LEB128 varints of the
//! gaps between them, about one byte each at 10 % density.
//!
//! Wire form: `len` (varint), `count` (varint), `count` gap varints (the first index, then each
//! index minus the previous minus one), then `count` little-endian fp16 values.

use half::f16;

/// Why bytes are not a compressed pseudo-gradient, or a request cannot be met.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum SparseError {
    /// The top-k fraction is outside (0, 1].
    #[error("top-k fraction {0} is not in (0, 1]")]
    BadFraction(f64),
    /// A gradient's length is not the one the codec was made for.
    #[error("pseudo-gradient has {got} coordinates, expected {expected}")]
    WrongLength {
        /// What arrived.
        got: usize,
        /// What the layer range has.
        expected: usize,
    },
    /// The message ended early.
    #[error("compressed pseudo-gradient ends inside its {0}")]
    Truncated(&'static str),
    /// A varint is longer than a u64.
    #[error("compressed pseudo-gradient has an over-long varint in its {0}")]
    Overlong(&'static str),
    /// More coordinates than the receiver's layers have.
    #[error("compressed pseudo-gradient claims {len} coordinates, the layers have {max}")]
    TooLong {
        /// Claimed.
        len: u64,
        /// The receiver's.
        max: u64,
    },
    /// More entries than coordinates.
    #[error("compressed pseudo-gradient claims {count} entries of {len} coordinates")]
    TooMany {
        /// Claimed entries.
        count: u64,
        /// Coordinates.
        len: u64,
    },
    /// An index at or past the end.
    #[error("entry {entry} of the compressed pseudo-gradient names coordinate {index} of {len}")]
    IndexOutOfRange {
        /// Which entry.
        entry: usize,
        /// The index it names.
        index: u64,
        /// Coordinates.
        len: u64,
    },
    /// A value that is NaN or infinite.
    #[error("entry {entry} (coordinate {index}) of the compressed pseudo-gradient is not finite")]
    NotFinite {
        /// Which entry.
        entry: usize,
        /// Its coordinate.
        index: u64,
    },
    /// A pseudo-gradient to compress that holds NaN or infinity (a diverged replica); refused
    /// before it can enter the residual and poison every later round.
    #[error("pseudo-gradient coordinate {0} is not finite")]
    NotFiniteInput(usize),
    /// Bytes after the values.
    #[error("compressed pseudo-gradient has {0} bytes past its values")]
    Trailing(usize),
}

/// A compressed pseudo-gradient: `len` coordinates, of which those at `indices` (increasing)
/// hold `values`, the others zero.
#[derive(Debug, Clone, PartialEq)]
pub struct Sparse {
    /// Coordinates in all.
    pub len: u64,
    /// The coordinates sent, increasing.
    pub indices: Vec<u64>,
    /// Their values.
    pub values: Vec<f16>,
}

impl Sparse {
    /// The dense vector it stands for.
    pub fn to_dense(&self) -> Vec<f32> {
        let mut dense = vec![0.0; self.len as usize];
        for (&i, v) in self.indices.iter().zip(&self.values) {
            dense[i as usize] = v.to_f32();
        }
        dense
    }

    /// The wire form.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(16 + self.indices.len() * 3);
        put_varint(&mut out, self.len);
        put_varint(&mut out, self.indices.len() as u64);
        let mut next = 0u64;
        for &i in &self.indices {
            put_varint(&mut out, i - next);
            next = i + 1;
        }
        for v in &self.values {
            out.extend_from_slice(&v.to_le_bytes());
        }
        out
    }

    /// Parses the wire form of a pseudo-gradient of at most `max_len` coordinates, checking
    /// every index and value before anything is allocated for them.
    pub fn decode(bytes: &[u8], max_len: u64) -> Result<Sparse, SparseError> {
        let mut at = 0;
        let len = take_varint(bytes, &mut at, "length")?;
        if len > max_len {
            return Err(SparseError::TooLong { len, max: max_len });
        }
        let count = take_varint(bytes, &mut at, "entry count")?;
        if count > len {
            return Err(SparseError::TooMany { count, len });
        }
        // Each entry takes at least three bytes (a gap and a value): a count the message
        // cannot hold is refused before allocating for it.
        if count.saturating_mul(3) > (bytes.len() - at) as u64 {
            return Err(SparseError::Truncated("entries"));
        }
        let mut indices = Vec::with_capacity(count as usize);
        let mut next = 0u64;
        for entry in 0..count as usize {
            let gap = take_varint(bytes, &mut at, "indices")?;
            let index =
                next.checked_add(gap)
                    .filter(|&i| i < len)
                    .ok_or(SparseError::IndexOutOfRange {
                        entry,
                        index: next.saturating_add(gap),
                        len,
                    })?;
            indices.push(index);
            next = index + 1;
        }
        let value_bytes = bytes
            .get(at..at + 2 * count as usize)
            .ok_or(SparseError::Truncated("values"))?;
        let mut values = Vec::with_capacity(count as usize);
        for (entry, pair) in value_bytes.chunks_exact(2).enumerate() {
            let value = f16::from_le_bytes([pair[0], pair[1]]);
            if !value.is_finite() {
                return Err(SparseError::NotFinite {
                    entry,
                    index: indices[entry],
                });
            }
            values.push(value);
        }
        let trailing = bytes.len() - at - value_bytes.len();
        if trailing > 0 {
            return Err(SparseError::Trailing(trailing));
        }
        Ok(Sparse {
            len,
            indices,
            values,
        })
    }

    /// Bytes the same pseudo-gradient takes dense in fp32, as data-parallel all-reduce sends it.
    pub fn dense_bytes(&self) -> u64 {
        self.len * 4
    }
}

/// Top-k compression with error feedback, for one replica's pseudo-gradients of a fixed length.
#[derive(Debug, Clone)]
pub struct TopK {
    fraction: f64,
    residual: Vec<f32>,
}

impl TopK {
    /// The design's default share of coordinates sent: 10 %.
    pub const DEFAULT_FRACTION: f64 = 0.1;

    /// A compressor for pseudo-gradients of `len` coordinates sending `fraction` of them.
    pub fn new(len: usize, fraction: f64) -> Result<Self, SparseError> {
        if !(fraction > 0.0 && fraction <= 1.0) {
            return Err(SparseError::BadFraction(fraction));
        }
        Ok(Self {
            fraction,
            residual: vec![0.0; len],
        })
    }

    /// Coordinates sent per round.
    pub fn k(&self) -> usize {
        ((self.residual.len() as f64 * self.fraction).ceil() as usize).min(self.residual.len())
    }

    /// What was left unsent so far.
    pub fn residual(&self) -> &[f32] {
        &self.residual
    }

    /// Compresses `delta` plus the residual: the `k` largest in magnitude go out as fp16, and
    /// everything not sent (including fp16 rounding) stays for the next round.
    pub fn compress(&mut self, delta: &[f32]) -> Result<Sparse, SparseError> {
        if delta.len() != self.residual.len() {
            return Err(SparseError::WrongLength {
                got: delta.len(),
                expected: self.residual.len(),
            });
        }
        if let Some(i) = delta.iter().position(|d| !d.is_finite()) {
            return Err(SparseError::NotFiniteInput(i));
        }
        for (r, d) in self.residual.iter_mut().zip(delta) {
            *r += d;
        }
        let k = self.k();
        let acc = &self.residual;
        let mut order: Vec<u32> = (0..acc.len() as u32).collect();
        if k < order.len() && k > 0 {
            order.select_nth_unstable_by(k - 1, |&a, &b| {
                acc[b as usize].abs().total_cmp(&acc[a as usize].abs())
            });
        }
        order.truncate(k);
        order.sort_unstable();
        let mut values = Vec::with_capacity(k);
        for &i in &order {
            // Beyond fp16's range a value is clipped to its largest, the rest kept as residual.
            let kept = self.residual[i as usize].clamp(-f16::MAX.to_f32(), f16::MAX.to_f32());
            let value = f16::from_f32(kept);
            self.residual[i as usize] -= value.to_f32();
            values.push(value);
        }
        Ok(Sparse {
            len: self.residual.len() as u64,
            indices: order.into_iter().map(u64::from).collect(),
            values,
        })
    }
}

fn put_varint(out: &mut Vec<u8>, mut value: u64) {
    while value >= 0x80 {
        out.push((value as u8) | 0x80);
        value >>= 7;
    }
    out.push(value as u8);
}

fn take_varint(bytes: &[u8], at: &mut usize, what: &'static str) -> Result<u64, SparseError> {
    let mut value = 0u64;
    for shift in (0..64).step_by(7) {
        let byte = *bytes.get(*at).ok_or(SparseError::Truncated(what))?;
        *at += 1;
        let bits = u64::from(byte & 0x7f);
        if shift == 63 && bits > 1 {
            return Err(SparseError::Overlong(what));
        }
        value |= bits << shift;
        if byte & 0x80 == 0 {
            return Ok(value);
        }
    }
    Err(SparseError::Overlong(what))
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    fn noise(len: usize, seed: u64) -> Vec<f32> {
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        (0..len).map(|_| rng.random_range(-1.0f32..1.0)).collect()
    }

    #[test]
    fn top_k_sends_the_largest_and_keeps_the_rest_as_residual() {
        let mut topk = TopK::new(10, 0.2).unwrap();
        let delta = [0.1, -5.0, 0.2, 3.0, -0.3, 0.0, 1.0, -1.5, 0.4, 0.05];
        let sent = topk.compress(&delta).unwrap();
        assert_eq!(sent.indices, [1, 3]);
        assert_eq!(sent.values, [f16::from_f32(-5.0), f16::from_f32(3.0)]);
        assert_eq!(topk.residual()[1], 0.0);
        assert_eq!(topk.residual()[6], 1.0);
        // Next round the residual competes: 1.0 and -1.5 left over outweigh a small delta.
        let sent = topk.compress(&[0.0; 10]).unwrap();
        assert_eq!(sent.indices, [6, 7]);
    }

    #[test]
    fn error_feedback_sends_every_coordinate_eventually() {
        let len = 1000;
        let mut topk = TopK::new(len, TopK::DEFAULT_FRACTION).unwrap();
        assert_eq!(topk.k(), 100);
        let mut sent = vec![0.0f64; len];
        let mut total = vec![0.0f64; len];
        for round in 0..30 {
            let delta = noise(len, round);
            for (t, d) in total.iter_mut().zip(&delta) {
                *t += f64::from(*d);
            }
            let sparse = topk.compress(&delta).unwrap();
            for (s, v) in sent.iter_mut().zip(sparse.to_dense()) {
                *s += f64::from(v);
            }
        }
        // Sent plus residual is everything, to rounding: nothing is lost, only delayed.
        for i in 0..len {
            let kept = sent[i] + f64::from(topk.residual()[i]);
            assert!((kept - total[i]).abs() < 1e-3, "coordinate {i}");
        }
    }

    #[test]
    fn the_wire_form_round_trips_and_is_small() {
        let len = 100_000;
        let mut topk = TopK::new(len, TopK::DEFAULT_FRACTION).unwrap();
        let sparse = topk.compress(&noise(len, 7)).unwrap();
        let bytes = sparse.encode();
        assert_eq!(Sparse::decode(&bytes, len as u64).unwrap(), sparse);
        // fp16 values and about a byte per gap: under a ninth of the dense fp32 form.
        assert!(
            (bytes.len() as u64) * 9 < sparse.dense_bytes(),
            "{} bytes vs {} dense",
            bytes.len(),
            sparse.dense_bytes()
        );
        let empty = Sparse {
            len: 5,
            indices: vec![],
            values: vec![],
        };
        assert_eq!(Sparse::decode(&empty.encode(), 5).unwrap(), empty);
    }

    #[test]
    fn malformed_messages_are_refused_with_what_is_wrong() {
        let good = Sparse {
            len: 300,
            indices: vec![0, 2, 299],
            values: [1.0, -2.0, 0.5].map(f16::from_f32).to_vec(),
        };
        let bytes = good.encode();
        assert_eq!(
            Sparse::decode(&bytes, 299),
            Err(SparseError::TooLong { len: 300, max: 299 })
        );
        assert_eq!(
            Sparse::decode(&bytes[..bytes.len() - 1], 300),
            Err(SparseError::Truncated("values"))
        );
        assert_eq!(
            Sparse::decode(&[bytes.as_slice(), &[0]].concat(), 300),
            Err(SparseError::Trailing(1))
        );
        assert_eq!(
            Sparse::decode(&[], 300),
            Err(SparseError::Truncated("length"))
        );
        // len 4, 5 entries.
        assert_eq!(
            Sparse::decode(&[4, 5], 300),
            Err(SparseError::TooMany { count: 5, len: 4 })
        );
        // len 4, 2 entries: index 1, then a gap past the end.
        let past = [4, 2, 1, 7, 0, 0, 0, 0];
        assert_eq!(
            Sparse::decode(&past, 300),
            Err(SparseError::IndexOutOfRange {
                entry: 1,
                index: 9,
                len: 4
            })
        );
        // A count the message cannot hold is refused before allocating.
        let mut huge = Vec::new();
        put_varint(&mut huge, u64::MAX / 2);
        put_varint(&mut huge, u64::MAX / 4);
        assert_eq!(
            Sparse::decode(&huge, u64::MAX),
            Err(SparseError::Truncated("entries"))
        );
        assert_eq!(
            Sparse::decode(&[0xff; 11], u64::MAX),
            Err(SparseError::Overlong("length"))
        );
        let nan = [2, 1, 1, 0x00, 0x7e];
        assert_eq!(
            Sparse::decode(&nan, 300),
            Err(SparseError::NotFinite { entry: 0, index: 1 })
        );
        let mut topk = TopK::new(3, 0.5).unwrap();
        assert_eq!(
            topk.compress(&[1.0, f32::NAN, 0.0]).unwrap_err(),
            SparseError::NotFiniteInput(1)
        );
        assert!(topk.residual().iter().all(|r| *r == 0.0), "nothing entered");
        assert_eq!(
            TopK::new(10, 1.5).unwrap_err(),
            SparseError::BadFraction(1.5)
        );
        assert_eq!(
            TopK::new(10, 0.5).unwrap().compress(&[1.0; 3]).unwrap_err(),
            SparseError::WrongLength {
                got: 3,
                expected: 10
            }
        );
    }
}
