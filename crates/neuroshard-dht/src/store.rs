//! The records a node holds for the swarm: verified on the way in, merged per publisher,
//! bounded in count, and dropped when they expire.

use std::collections::HashMap;

use neuroshard_base::PublicKey;

use crate::key::Key;
use crate::record::{Record, RecordError};

/// Bounds on what one node stores for others.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StoreLimits {
    /// Most keys held. Default 65,536.
    pub max_keys: usize,
    /// Most entries (publishers) under one key. Default 64: a layer with more providers keeps
    /// the ones that expire last.
    pub max_per_key: usize,
}

impl Default for StoreLimits {
    fn default() -> Self {
        Self {
            max_keys: 65_536,
            max_per_key: 64,
        }
    }
}

/// Why a store was refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum StoreError {
    /// The record itself is bad.
    #[error(transparent)]
    Record(#[from] RecordError),
    /// The store is full.
    #[error("record store is full ({0} keys)")]
    Full(usize),
    /// The key holds its most entries, all expiring later than this one.
    #[error("{key} already holds {max} entries that outlive this one")]
    KeyFull {
        /// The key.
        key: String,
        /// The limit.
        max: usize,
    },
    /// The publisher already stored a newer entry.
    #[error("{key}: this publisher's stored entry is newer")]
    Stale {
        /// The key.
        key: String,
    },
}

/// A record store.
#[derive(Clone, Debug, Default)]
pub struct RecordStore {
    limits: StoreLimits,
    records: HashMap<Key, Vec<Record>>,
}

impl RecordStore {
    /// An empty store.
    pub fn new(limits: StoreLimits) -> Self {
        Self {
            limits,
            records: HashMap::new(),
        }
    }

    /// Verifies and stores `record`, replacing the same publisher's older entry.
    pub fn put(&mut self, record: Record, now_ms: u64) -> Result<(), StoreError> {
        record.verify(now_ms)?;
        let key = record.key.key();
        if !self.records.contains_key(&key) && self.records.len() >= self.limits.max_keys {
            self.expire(now_ms);
            if self.records.len() >= self.limits.max_keys {
                return Err(StoreError::Full(self.limits.max_keys));
            }
        }
        let entries = self.records.entry(key).or_default();
        entries.retain(|r| r.expires_ms > now_ms);
        if let Some(old) = entries.iter_mut().find(|r| r.publisher == record.publisher) {
            if old.expires_ms > record.expires_ms {
                return Err(StoreError::Stale {
                    key: record.key.to_string(),
                });
            }
            *old = record;
            return Ok(());
        }
        if entries.len() >= self.limits.max_per_key {
            let (i, soonest) = entries
                .iter()
                .enumerate()
                .min_by_key(|(_, r)| r.expires_ms)
                .map(|(i, r)| (i, r.expires_ms))
                .expect("full, so not empty");
            if soonest >= record.expires_ms {
                return Err(StoreError::KeyFull {
                    key: record.key.to_string(),
                    max: self.limits.max_per_key,
                });
            }
            entries.swap_remove(i);
        }
        entries.push(record);
        Ok(())
    }

    /// The live entries under `key`.
    pub fn get(&self, key: &Key, now_ms: u64) -> Vec<Record> {
        self.records
            .get(key)
            .map(|rs| {
                rs.iter()
                    .filter(|r| r.expires_ms > now_ms)
                    .cloned()
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Drops `publisher`'s entry under `key` (it withdrew).
    pub fn remove(&mut self, key: &Key, publisher: &PublicKey) {
        if let Some(entries) = self.records.get_mut(key) {
            entries.retain(|r| r.publisher != *publisher);
            if entries.is_empty() {
                self.records.remove(key);
            }
        }
    }

    /// Drops every expired entry; returns how many.
    pub fn expire(&mut self, now_ms: u64) -> usize {
        let mut dropped = 0;
        self.records.retain(|_, entries| {
            let before = entries.len();
            entries.retain(|r| r.expires_ms > now_ms);
            dropped += before - entries.len();
            !entries.is_empty()
        });
        dropped
    }

    /// When the next entry expires.
    pub fn next_expiry(&self) -> Option<u64> {
        self.records.values().flatten().map(|r| r.expires_ms).min()
    }

    /// Keys held.
    pub fn len(&self) -> usize {
        self.records.len()
    }

    /// Whether nothing is held.
    pub fn is_empty(&self) -> bool {
        self.records.is_empty()
    }

    /// Every entry held, for republishing.
    pub fn iter(&self) -> impl Iterator<Item = &Record> {
        self.records.values().flatten()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::record::RecordKey;
    use neuroshard_base::NodeKey;

    const NOW: u64 = 1_800_000_000_000;

    fn layer() -> RecordKey {
        RecordKey::Layer {
            model: "m".into(),
            index: 3,
        }
    }

    #[test]
    fn providers_merge_per_publisher_and_expire_on_their_own() {
        let mut store = RecordStore::new(StoreLimits::default());
        let (a, b) = (NodeKey::generate(), NodeKey::generate());
        store
            .put(
                Record::sign(layer(), b"a1".to_vec(), NOW + 1000, &a).unwrap(),
                NOW,
            )
            .unwrap();
        store
            .put(
                Record::sign(layer(), b"b".to_vec(), NOW + 5000, &b).unwrap(),
                NOW,
            )
            .unwrap();
        store
            .put(
                Record::sign(layer(), b"a2".to_vec(), NOW + 2000, &a).unwrap(),
                NOW,
            )
            .unwrap();
        let key = layer().key();
        let mut values: Vec<_> = store.get(&key, NOW).into_iter().map(|r| r.value).collect();
        values.sort();
        assert_eq!(
            values,
            [b"a2".to_vec(), b"b".to_vec()],
            "a's newer entry replaced its older"
        );
        let stale = Record::sign(layer(), b"a0".to_vec(), NOW + 1500, &a).unwrap();
        assert!(matches!(
            store.put(stale, NOW),
            Err(StoreError::Stale { .. })
        ));

        assert_eq!(
            store.get(&key, NOW + 2000).len(),
            1,
            "a's entry expired, b's lives"
        );
        assert_eq!(store.expire(NOW + 2000), 1);
        assert_eq!(store.next_expiry(), Some(NOW + 5000));
        assert_eq!(store.expire(NOW + 5000), 1);
        assert!(store.is_empty());
    }

    #[test]
    fn limits_keep_the_longest_lived_entries_and_bad_records_change_nothing() {
        let mut store = RecordStore::new(StoreLimits {
            max_keys: 1,
            max_per_key: 2,
        });
        let keys: Vec<_> = (0..3).map(|_| NodeKey::generate()).collect();
        for (i, k) in keys.iter().enumerate() {
            let r = Record::sign(layer(), vec![i as u8], NOW + 1000 * (i as u64 + 1), k).unwrap();
            store.put(r, NOW).unwrap();
        }
        let mut held: Vec<_> = store
            .get(&layer().key(), NOW)
            .iter()
            .map(|r| r.value[0])
            .collect();
        held.sort();
        assert_eq!(held, [1, 2], "the soonest to expire made room");
        let short = Record::sign(layer(), vec![9], NOW + 500, &NodeKey::generate()).unwrap();
        assert!(matches!(
            store.put(short, NOW),
            Err(StoreError::KeyFull { .. })
        ));
        let other = Record::sign(
            RecordKey::Checkpoint("c".into()),
            vec![],
            NOW + 10,
            &keys[0],
        )
        .unwrap();
        assert_eq!(store.put(other, NOW), Err(StoreError::Full(1)));
        let mut forged = Record::sign(layer(), vec![7], NOW + 9000, &keys[0]).unwrap();
        forged.value = vec![8];
        assert!(matches!(store.put(forged, NOW), Err(StoreError::Record(_))));
        assert_eq!(
            store.get(&layer().key(), NOW).len(),
            2,
            "nothing stored was lost"
        );
    }
}
