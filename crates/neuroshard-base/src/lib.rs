//! Identifiers and layer ranges shared by every NeuroShard crate. No IO lives here.

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

/// A node's identity on the swarm: 256 random bits, shown as hex.
///
/// The proof-of-work issue derives it from an ed25519 public key; until then it is random per
/// process start.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct NodeId(pub [u8; 32]);

impl NodeId {
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

#[cfg(test)]
mod tests {
    use super::*;

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
    fn node_ids_round_trip_through_hex() {
        let id = NodeId::random();
        assert_eq!(id.to_string().parse::<NodeId>().unwrap(), id);
    }
}
