//! Identifiers and layer ranges shared by every NeuroShard crate. No IO lives here.

pub mod precision;
pub mod quota;
pub mod sync;

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// A half-open range `[start, end)` of transformer layers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct LayerRange {
    /// First layer.
    pub start: u32,
    /// One past the last layer.
    pub end: u32,
}

/// Why a layer range is invalid.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LayerRangeError {
    /// Not of the form `A..B`.
    #[error("layer range {0:?} is not of the form A..B")]
    Syntax(String),
    /// `start >= end`.
    #[error("layer range {start}..{end} is empty")]
    Empty {
        /// First layer.
        start: u32,
        /// One past the last.
        end: u32,
    },
}

impl LayerRange {
    /// A range; errors when empty.
    pub fn new(start: u32, end: u32) -> Result<Self, LayerRangeError> {
        if start >= end {
            return Err(LayerRangeError::Empty { start, end });
        }
        Ok(Self { start, end })
    }

    /// Number of layers.
    pub fn len(&self) -> u32 {
        self.end.saturating_sub(self.start)
    }

    /// Whether the range holds no layer.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Whether `other` lies inside this range.
    pub fn covers(&self, other: &LayerRange) -> bool {
        self.start <= other.start && other.end <= self.end
    }

    /// Whether `layer` lies inside this range.
    pub fn contains(&self, layer: u32) -> bool {
        self.start <= layer && layer < self.end
    }

    /// As a `usize` range, for indexing.
    pub fn to_range(&self) -> std::ops::Range<usize> {
        self.start as usize..self.end as usize
    }
}

impl fmt::Display for LayerRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}..{}", self.start, self.end)
    }
}

impl FromStr for LayerRange {
    type Err = LayerRangeError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let syntax = || LayerRangeError::Syntax(s.to_string());
        let (a, b) = s.trim().split_once("..").ok_or_else(syntax)?;
        let start = a.trim().parse().map_err(|_| syntax())?;
        let end = b.trim().parse().map_err(|_| syntax())?;
        Self::new(start, end)
    }
}

/// A node's identity on the swarm: the SHA-256 of its ed25519 key ([`NodeId::of_key`]), shown
/// and serialized as 64 hex digits.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct NodeId(pub [u8; 32]);

impl fmt::Debug for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "NodeId({})", self.short())
    }
}

impl Serialize for NodeId {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for NodeId {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

impl NodeId {
    /// The id of a public key: its SHA-256, so an id cannot be claimed without the key.
    pub fn of_key(key: &PublicKey) -> Self {
        use sha2::Digest;
        Self(sha2::Sha256::digest(key.0).into())
    }

    /// A fresh random id.
    pub fn random() -> Self {
        Self(rand::random())
    }

    /// The first 8 hex digits, for logs and tables.
    pub fn short(&self) -> String {
        hex::encode(&self.0[..4])
    }
}

impl fmt::Display for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex::encode(self.0))
    }
}

impl FromStr for NodeId {
    type Err = hex::FromHexError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let mut bytes = [0u8; 32];
        hex::decode_to_slice(s, &mut bytes)?;
        Ok(Self(bytes))
    }
}

/// Why a key or signature was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyError {
    /// The bytes are not an ed25519 public key.
    #[error("{0} is not a valid ed25519 public key")]
    BadPublicKey(String),
    /// The signature does not verify under the key.
    #[error("the signature does not match the message and key of {0}")]
    BadSignature(String),
    /// A node claimed an id that is not the hash of its key.
    #[error("node id {claimed} does not belong to the key presented (its id is {actual})")]
    IdMismatch {
        /// The id claimed.
        claimed: String,
        /// The id of the key.
        actual: String,
    },
}

/// An ed25519 public key, as carried on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct PublicKey(pub [u8; 32]);

impl PublicKey {
    /// Reads a key from wire bytes, checking its length and that it is a curve point.
    pub fn from_slice(bytes: &[u8]) -> Result<Self, KeyError> {
        let bytes: [u8; 32] = bytes
            .try_into()
            .map_err(|_| KeyError::BadPublicKey(format!("a {}-byte value", bytes.len())))?;
        ed25519_dalek::VerifyingKey::from_bytes(&bytes)
            .map_err(|_| KeyError::BadPublicKey(hex::encode(bytes)))?;
        Ok(Self(bytes))
    }

    /// The id this key owns.
    pub fn id(&self) -> NodeId {
        NodeId::of_key(self)
    }

    /// Checks that `claimed` is this key's id.
    pub fn check_id(&self, claimed: &str) -> Result<NodeId, KeyError> {
        let actual = self.id();
        if claimed.eq_ignore_ascii_case(&actual.to_string()) {
            Ok(actual)
        } else {
            Err(KeyError::IdMismatch {
                claimed: claimed.chars().take(80).collect(),
                actual: actual.to_string(),
            })
        }
    }

    /// Verifies an ed25519 signature of `message` (strict: no malleable signatures).
    pub fn verify(&self, message: &[u8], signature: &[u8]) -> Result<(), KeyError> {
        let bad = || KeyError::BadSignature(self.id().short());
        let key = ed25519_dalek::VerifyingKey::from_bytes(&self.0).map_err(|_| bad())?;
        let signature = ed25519_dalek::Signature::from_slice(signature).map_err(|_| bad())?;
        key.verify_strict(message, &signature).map_err(|_| bad())
    }
}

/// A node's private signing key. Made once per install and never copied between machines.
pub struct NodeKey(ed25519_dalek::SigningKey);

impl NodeKey {
    /// A new random key.
    pub fn generate() -> Self {
        Self::from_bytes(&rand::random())
    }

    /// The key with this 32-byte secret.
    pub fn from_bytes(secret: &[u8; 32]) -> Self {
        Self(ed25519_dalek::SigningKey::from_bytes(secret))
    }

    /// The 32-byte secret, for storing.
    pub fn to_bytes(&self) -> [u8; 32] {
        self.0.to_bytes()
    }

    /// The public half.
    pub fn public(&self) -> PublicKey {
        PublicKey(self.0.verifying_key().to_bytes())
    }

    /// The id of this key.
    pub fn id(&self) -> NodeId {
        self.public().id()
    }

    /// The ed25519 key itself, for protocols that take one (the relay's registration and
    /// end-to-end handshake).
    pub fn signing_key(&self) -> ed25519_dalek::SigningKey {
        self.0.clone()
    }

    /// Signs `message`.
    pub fn sign(&self, message: &[u8]) -> [u8; 64] {
        use ed25519_dalek::Signer;
        self.0.sign(message).to_bytes()
    }
}

impl fmt::Debug for NodeKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "NodeKey({})", self.id().short())
    }
}

/// A configuration or input value refused, naming the field and what is wrong with it: what
/// every `validate` of the project returns.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {problem}")]
pub struct Invalid {
    /// The field, as its owner writes it (`weights.load`, `NEUROSHARD_LISTEN`).
    pub field: String,
    /// What is wrong with its value.
    pub problem: String,
}

impl Invalid {
    /// `field` is refused because of `problem`.
    pub fn new(field: impl Into<String>, problem: impl Into<String>) -> Self {
        Self {
            field: field.into(),
            problem: problem.into(),
        }
    }
}

/// Longest display name: it is shown in other people's peer lists, not a profile page.
pub const MAX_DISPLAY_NAME_CHARS: usize = 40;

/// Whether `peer` reads as `host:port` with a nonzero port.
pub fn is_host_port(peer: &str) -> bool {
    peer.rsplit_once(':')
        .is_some_and(|(host, port)| !host.is_empty() && port.parse::<u16>().is_ok_and(|p| p != 0))
}

/// A tracker's address as a URL: `http://host:port`, or `http://ID@host:port` naming the node
/// id of the key the tracker must prove (what `neuroshard tracker` prints). Without an id, the
/// first key that answers is pinned for the connection's life.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TrackerUrl {
    /// `host:port`.
    pub authority: String,
    /// The key it must prove, when the URL names one.
    pub id: Option<NodeId>,
}

impl FromStr for TrackerUrl {
    type Err = Invalid;

    fn from_str(url: &str) -> Result<Self, Invalid> {
        let bad = |problem: &str| Invalid::new("tracker", format!("{url:?} {problem}"));
        let rest = url
            .strip_prefix("http://")
            .ok_or_else(|| bad("is not an http://host:port URL"))?;
        let rest = rest.strip_suffix('/').unwrap_or(rest);
        let (id, authority) = match rest.split_once('@') {
            Some((id, authority)) => (
                Some(
                    id.parse::<NodeId>()
                        .map_err(|_| bad("names a key that is not a 64-digit hex node id"))?,
                ),
                authority,
            ),
            None => (None, rest),
        };
        if !is_host_port(authority) || authority.contains('/') {
            return Err(bad("is not an http://host:port URL"));
        }
        Ok(Self {
            authority: authority.to_string(),
            id,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tracker_urls_name_an_address_and_maybe_the_key_to_pin() {
        let plain: TrackerUrl = "http://tracker.example:7700".parse().unwrap();
        assert_eq!(
            (plain.authority.as_str(), plain.id),
            ("tracker.example:7700", None)
        );
        let id = NodeId([0xab; 32]);
        let pinned: TrackerUrl = format!("http://{id}@127.0.0.1:7700/").parse().unwrap();
        assert_eq!(
            (pinned.authority.as_str(), pinned.id),
            ("127.0.0.1:7700", Some(id))
        );
        for (bad, says) in [
            ("tracker:7700", "not an http://host:port URL"),
            ("http://tracker", "not an http://host:port URL"),
            ("http://tracker:7700/path", "not an http://host:port URL"),
            ("http://abc@tracker:7700", "not a 64-digit hex node id"),
        ] {
            let err = bad.parse::<TrackerUrl>().unwrap_err();
            assert_eq!(err.field, "tracker");
            assert!(err.problem.contains(says), "{bad}: {err}");
        }
    }

    #[test]
    fn parses_ranges_and_rejects_bad_ones() {
        let r: LayerRange = "2..6".parse().unwrap();
        assert_eq!((r.start, r.end, r.len()), (2, 6, 4));
        assert!(r.covers(&LayerRange::new(3, 6).unwrap()));
        assert!(!r.covers(&LayerRange::new(1, 3).unwrap()));
        assert!(matches!(
            "6..2".parse::<LayerRange>(),
            Err(LayerRangeError::Empty { .. })
        ));
        assert!(matches!(
            "6-2".parse::<LayerRange>(),
            Err(LayerRangeError::Syntax(_))
        ));
    }

    #[test]
    fn ids_belong_to_keys_and_signatures_verify() {
        let key = NodeKey::generate();
        let public = key.public();
        assert_eq!(public.check_id(&key.id().to_string()), Ok(key.id()));
        let other = NodeKey::generate();
        assert!(matches!(
            public.check_id(&other.id().to_string()),
            Err(KeyError::IdMismatch { .. })
        ));
        let signature = key.sign(b"hello");
        assert_eq!(public.verify(b"hello", &signature), Ok(()));
        assert!(public.verify(b"hellO", &signature).is_err());
        assert!(other.public().verify(b"hello", &signature).is_err());
        assert!(PublicKey::from_slice(&[1, 2, 3]).is_err());
        let restored = NodeKey::from_bytes(&key.to_bytes());
        assert_eq!(restored.id(), key.id());
    }

    #[test]
    fn node_ids_round_trip_through_hex() {
        let id = NodeId::random();
        assert_eq!(id.to_string().parse::<NodeId>().unwrap(), id);
    }
}
