//! Records: values under a key, each signed by the node that publishes it and expiring on its
//! own. Several publishers may hold entries under one key (the providers of a layer); an entry
//! is identified by its key and publisher, and a newer one from the same publisher replaces it.

use std::fmt;
use std::str::FromStr;

use neuroshard_base::{NodeId, NodeKey, PublicKey};

use crate::key::Key;

/// Most bytes of a record's value.
pub const MAX_VALUE_BYTES: usize = 4096;

/// Longest a record may live: one hour ahead of the receiver's clock. Providers announce
/// every few minutes with a quarter-hour's life, so a longer claim buys an honest publisher
/// nothing, and a stranger's entry is gone within the hour once it stops storing.
pub const MAX_TTL_MS: u64 = 3600 * 1000;

/// Most bytes of a model or checkpoint id inside a key.
pub const MAX_NAME_BYTES: usize = 128;

/// What a record is about.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum RecordKey {
    /// `/nodes/{id}`: a node's info and addresses; only that node may publish it.
    Node(NodeId),
    /// `/layers/{model}/{index}`: the providers of one layer of one model, an entry each.
    Layer {
        /// The model id.
        model: String,
        /// The layer.
        index: u32,
    },
    /// `/checkpoints/{id}`: a checkpoint's metadata.
    Checkpoint(String),
}

impl RecordKey {
    /// Its point in the key space: the SHA-256 of its text form.
    pub fn key(&self) -> Key {
        Key::hash(self.to_string().as_bytes())
    }
}

impl fmt::Display for RecordKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RecordKey::Node(id) => write!(f, "/nodes/{id}"),
            RecordKey::Layer { model, index } => write!(f, "/layers/{model}/{index}"),
            RecordKey::Checkpoint(id) => write!(f, "/checkpoints/{id}"),
        }
    }
}

fn check_name(what: &str, name: &str) -> Result<(), RecordError> {
    if name.is_empty() || name.len() > MAX_NAME_BYTES {
        return Err(RecordError::BadKey(format!(
            "{what} must be 1 to {MAX_NAME_BYTES} bytes, not {}",
            name.len()
        )));
    }
    if let Some(c) = name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.')))
    {
        return Err(RecordError::BadKey(format!(
            "{what} {name:?} has {c:?}; only letters, digits, '-', '_' and '.' are allowed"
        )));
    }
    Ok(())
}

impl FromStr for RecordKey {
    type Err = RecordError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let parts: Vec<&str> = s.split('/').collect();
        match parts.as_slice() {
            ["", "nodes", id] => id
                .parse()
                .map(RecordKey::Node)
                .map_err(|e| RecordError::BadKey(format!("{s}: node id: {e}"))),
            ["", "layers", model, index] => {
                check_name("model id", model)?;
                let index = index
                    .parse()
                    .map_err(|e| RecordError::BadKey(format!("{s}: layer index: {e}")))?;
                Ok(RecordKey::Layer {
                    model: model.to_string(),
                    index,
                })
            }
            ["", "checkpoints", id] => {
                check_name("checkpoint id", id)?;
                Ok(RecordKey::Checkpoint(id.to_string()))
            }
            _ => Err(RecordError::BadKey(format!(
                "{s:?} is not /nodes/{{id}}, /layers/{{model}}/{{index}} or /checkpoints/{{id}}"
            ))),
        }
    }
}

/// Why a record was refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum RecordError {
    /// The key is malformed.
    #[error("bad record key: {0}")]
    BadKey(String),
    /// The value is over [`MAX_VALUE_BYTES`].
    #[error("record value of {bytes} bytes is over the {max}-byte limit")]
    TooLarge {
        /// Its size.
        bytes: usize,
        /// The limit.
        max: usize,
    },
    /// It expired.
    #[error("record for {key} expired at {expires_ms} (now {now_ms})")]
    Expired {
        /// Its key.
        key: String,
        /// When it expired, ms since the epoch.
        expires_ms: u64,
        /// The receiver's clock.
        now_ms: u64,
    },
    /// It claims to live longer than [`MAX_TTL_MS`].
    #[error("record for {key} expires {ahead_ms} ms ahead, beyond the {max_ms} ms limit")]
    TooFarAhead {
        /// Its key.
        key: String,
        /// How far ahead it expires.
        ahead_ms: u64,
        /// The limit.
        max_ms: u64,
    },
    /// The publisher field is not a public key.
    #[error("record publisher is not an ed25519 key: {0}")]
    BadPublisher(String),
    /// The signature does not match the publisher and contents.
    #[error("record for {key}: the signature does not match its publisher")]
    BadSignature {
        /// Its key.
        key: String,
    },
    /// A `/nodes/{id}` record published by another node.
    #[error("record for {key} is published by {publisher}, not by that node")]
    NotOwner {
        /// Its key.
        key: String,
        /// The publisher's id.
        publisher: NodeId,
    },
}

/// A signed record.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Record {
    /// What it is about.
    pub key: RecordKey,
    /// Its value (encoded by whoever reads the key; at most [`MAX_VALUE_BYTES`]).
    pub value: Vec<u8>,
    /// Who published it.
    pub publisher: PublicKey,
    /// When it expires, ms since the Unix epoch.
    pub expires_ms: u64,
    /// The publisher's ed25519 signature over [`Record::signed_bytes`].
    pub signature: [u8; 64],
}

impl Record {
    /// A record signed by `signer`, expiring at `expires_ms`.
    pub fn sign(
        key: RecordKey,
        value: Vec<u8>,
        expires_ms: u64,
        signer: &NodeKey,
    ) -> Result<Self, RecordError> {
        if value.len() > MAX_VALUE_BYTES {
            return Err(RecordError::TooLarge {
                bytes: value.len(),
                max: MAX_VALUE_BYTES,
            });
        }
        let publisher = signer.public();
        let signature = signer.sign(&Self::signed_bytes(&key, &value, &publisher, expires_ms));
        Ok(Self {
            key,
            value,
            publisher,
            expires_ms,
            signature,
        })
    }

    /// What the publisher signs: a domain tag, then the key, value, publisher and expiry, each
    /// length-prefixed so no two records sign the same bytes.
    pub fn signed_bytes(
        key: &RecordKey,
        value: &[u8],
        publisher: &PublicKey,
        expires_ms: u64,
    ) -> Vec<u8> {
        let key = key.to_string();
        let mut out = Vec::with_capacity(64 + key.len() + value.len());
        out.extend_from_slice(b"neuroshard-dht-record-v1\0");
        out.extend_from_slice(&(key.len() as u32).to_be_bytes());
        out.extend_from_slice(key.as_bytes());
        out.extend_from_slice(&(value.len() as u32).to_be_bytes());
        out.extend_from_slice(value);
        out.extend_from_slice(&publisher.0);
        out.extend_from_slice(&expires_ms.to_be_bytes());
        out
    }

    /// The publisher's node id.
    pub fn publisher_id(&self) -> NodeId {
        self.publisher.id()
    }

    /// Checks size, expiry against `now_ms`, ownership and the signature.
    pub fn verify(&self, now_ms: u64) -> Result<(), RecordError> {
        if self.value.len() > MAX_VALUE_BYTES {
            return Err(RecordError::TooLarge {
                bytes: self.value.len(),
                max: MAX_VALUE_BYTES,
            });
        }
        if self.expires_ms <= now_ms {
            return Err(RecordError::Expired {
                key: self.key.to_string(),
                expires_ms: self.expires_ms,
                now_ms,
            });
        }
        let ahead_ms = self.expires_ms - now_ms;
        if ahead_ms > MAX_TTL_MS {
            return Err(RecordError::TooFarAhead {
                key: self.key.to_string(),
                ahead_ms,
                max_ms: MAX_TTL_MS,
            });
        }
        if let RecordKey::Node(id) = &self.key
            && self.publisher_id() != *id
        {
            return Err(RecordError::NotOwner {
                key: self.key.to_string(),
                publisher: self.publisher_id(),
            });
        }
        let message = Self::signed_bytes(&self.key, &self.value, &self.publisher, self.expires_ms);
        self.publisher
            .verify(&message, &self.signature)
            .map_err(|_| RecordError::BadSignature {
                key: self.key.to_string(),
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: u64 = 1_800_000_000_000;

    #[test]
    fn keys_round_trip_and_bad_ones_are_named() {
        let id = NodeKey::generate().id();
        for key in [
            RecordKey::Node(id),
            RecordKey::Layer {
                model: "llama-3.1-8b".into(),
                index: 7,
            },
            RecordKey::Checkpoint("run-1.step-400".into()),
        ] {
            assert_eq!(key.to_string().parse::<RecordKey>().unwrap(), key);
        }
        for (bad, says) in [
            ("/nodes/xyz", "node id"),
            ("/layers/m/seven", "layer index"),
            ("/layers/a b/1", "' '"),
            ("/layers//1", "model id must be"),
            ("/things/1", "is not /nodes"),
            ("", "is not /nodes"),
        ] {
            let err = bad.parse::<RecordKey>().unwrap_err().to_string();
            assert!(err.contains(says), "{bad}: {err}");
        }
    }

    #[test]
    fn a_signed_record_verifies_and_any_change_breaks_it() {
        let owner = NodeKey::generate();
        let key = RecordKey::Node(owner.id());
        let record = Record::sign(key.clone(), b"addrs".to_vec(), NOW + 60_000, &owner).unwrap();
        record.verify(NOW).unwrap();

        let mut changed = record.clone();
        changed.value = b"other".to_vec();
        assert!(matches!(
            changed.verify(NOW),
            Err(RecordError::BadSignature { .. })
        ));
        let mut changed = record.clone();
        changed.expires_ms += 1;
        assert!(matches!(
            changed.verify(NOW),
            Err(RecordError::BadSignature { .. })
        ));

        assert!(matches!(
            record.verify(NOW + 60_000),
            Err(RecordError::Expired { .. })
        ));
        let far = Record::sign(key.clone(), vec![], NOW + MAX_TTL_MS + 1, &owner).unwrap();
        assert!(matches!(
            far.verify(NOW),
            Err(RecordError::TooFarAhead { .. })
        ));

        let other = NodeKey::generate();
        let forged = Record::sign(key, vec![], NOW + 60_000, &other).unwrap();
        let err = forged.verify(NOW).unwrap_err();
        assert!(matches!(err, RecordError::NotOwner { .. }), "{err}");

        let err = Record::sign(
            RecordKey::Checkpoint("c".into()),
            vec![0; MAX_VALUE_BYTES + 1],
            NOW + 1,
            &owner,
        )
        .unwrap_err();
        assert!(err.to_string().contains("4097 bytes"), "{err}");
    }
}
