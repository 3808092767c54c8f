//! Keys and the XOR metric: node ids and record keys share one 256-bit space, and the distance
//! between two keys is their XOR read as a big-endian number.

use std::fmt;

use neuroshard_base::NodeId;
use rand::Rng;
use sha2::{Digest, Sha256};

/// A point in the 256-bit key space: a node's id, or the SHA-256 of a record key.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Key(pub [u8; 32]);

impl Key {
    /// A node's key: its id, which is already the hash of its public key.
    pub fn of_node(id: &NodeId) -> Self {
        Self(id.0)
    }

    /// The key of arbitrary bytes: their SHA-256.
    pub fn hash(bytes: &[u8]) -> Self {
        Self(Sha256::digest(bytes).into())
    }

    /// A random key.
    pub fn random(rng: &mut impl Rng) -> Self {
        Self(rng.random())
    }

    /// The XOR distance to `other`.
    pub fn distance(&self, other: &Key) -> Distance {
        let mut d = [0u8; 32];
        for (i, byte) in d.iter_mut().enumerate() {
            *byte = self.0[i] ^ other.0[i];
        }
        Distance(d)
    }

    /// A random key whose distance from `self` falls in bucket `bucket` (0..256): it shares
    /// the first `255 - bucket` bits, differs at the next, and is random after.
    pub fn random_in_bucket(&self, bucket: usize, rng: &mut impl Rng) -> Key {
        debug_assert!(bucket < 256);
        let mut d: [u8; 32] = rng.random();
        let lead = 255 - bucket; // leading zero bits of the distance
        for bit in 0..lead {
            d[bit / 8] &= !(0x80 >> (bit % 8));
        }
        d[lead / 8] |= 0x80 >> (lead % 8);
        let mut out = self.0;
        for (o, x) in out.iter_mut().zip(d) {
            *o ^= x;
        }
        Key(out)
    }
}

impl fmt::Debug for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Key({})", hex::encode(&self.0[..4]))
    }
}

impl fmt::Display for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex::encode(self.0))
    }
}

/// The XOR of two keys; compares as a 256-bit big-endian number.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Debug)]
pub struct Distance(pub [u8; 32]);

impl Distance {
    /// Leading zero bits: the length of the prefix the two keys share.
    pub fn leading_zeros(&self) -> u32 {
        let mut n = 0;
        for byte in self.0 {
            if byte == 0 {
                n += 8;
            } else {
                return n + byte.leading_zeros();
            }
        }
        n
    }

    /// The routing-table bucket for this distance: `255 - leading_zeros`, so bucket 255 holds
    /// half the key space and bucket 0 the single closest key; `None` for a distance of zero.
    pub fn bucket(&self) -> Option<usize> {
        let zeros = self.leading_zeros();
        (zeros < 256).then(|| 255 - zeros as usize)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use rand::SeedableRng;

    fn key() -> impl Strategy<Value = Key> {
        any::<[u8; 32]>().prop_map(Key)
    }

    proptest! {
        #[test]
        fn distance_is_a_metric(a in key(), b in key(), c in key()) {
            prop_assert_eq!(a.distance(&b), b.distance(&a));
            prop_assert_eq!(a.distance(&a), Distance([0; 32]));
            prop_assert_eq!(a == b, a.distance(&b) == Distance([0; 32]));
            // XOR satisfies the triangle inequality: d(a,c) <= d(a,b) + d(b,c), and more
            // strongly d(a,c) = d(a,b) XOR d(b,c).
            let ab = a.distance(&b).0;
            let bc = b.distance(&c).0;
            let mut x = [0u8; 32];
            for i in 0..32 { x[i] = ab[i] ^ bc[i]; }
            prop_assert_eq!(a.distance(&c), Distance(x));
        }

        #[test]
        fn ordering_by_distance_is_unidirectional(target in key(), a in key(), b in key()) {
            // For a given target and distance there is exactly one key: two different keys are
            // never at the same distance, so sorting by distance is a strict order.
            prop_assume!(a != b);
            prop_assert_ne!(target.distance(&a), target.distance(&b));
        }

        #[test]
        fn distance_order_is_numeric_order(a in key(), b in key(), c in key()) {
            let (ab, ac) = (a.distance(&b), a.distance(&c));
            let num = |d: Distance| (u128::from_be_bytes(d.0[..16].try_into().unwrap()),
                                     u128::from_be_bytes(d.0[16..].try_into().unwrap()));
            prop_assert_eq!(ab.cmp(&ac), num(ab).cmp(&num(ac)));
        }

        #[test]
        fn random_in_bucket_lands_in_that_bucket(local in key(), bucket in 0usize..256, seed in any::<u64>()) {
            let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
            let k = local.random_in_bucket(bucket, &mut rng);
            prop_assert_eq!(local.distance(&k).bucket(), Some(bucket));
        }
    }

    #[test]
    fn buckets_count_shared_prefix_bits() {
        let zero = Key([0; 32]);
        let mut top = [0u8; 32];
        top[0] = 0x80;
        assert_eq!(zero.distance(&Key(top)).bucket(), Some(255));
        let mut last = [0u8; 32];
        last[31] = 1;
        assert_eq!(zero.distance(&Key(last)).bucket(), Some(0));
        assert_eq!(zero.distance(&zero).bucket(), None);
    }
}
