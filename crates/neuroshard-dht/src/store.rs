//! The records a node holds for the swarm: verified on the way in, merged per publisher,
//! bounded in count, bytes, entries per publisher and entries per source network, and dropped
//! when they expire.
//!
//! A key full of entries makes room only to spread its entries over more source networks
//! (/24 or /48, as the routing table counts them): a newcomer never pushes out a live entry by
//! claiming to live longer, so throwaway keys cannot crowd out a layer's honest providers, who
//! keep their places by refreshing them.

use std::collections::HashMap;

use neuroshard_base::PublicKey;

use crate::key::Key;
use crate::record::{Record, RecordError};
use crate::table::Prefix;

/// Bounds on what one node stores for others.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StoreLimits {
    /// Most keys held. Default 65,536.
    pub max_keys: usize,
    /// Most entries (publishers) under one key. Default 64.
    pub max_per_key: usize,
    /// Most entries one publisher holds here, over all keys. Default 1,024: a node serving
    /// every layer of a dozen 80-layer models.
    pub max_per_publisher: usize,
    /// Most entries under one key that arrived from one network prefix. Default 8.
    pub max_per_prefix_per_key: usize,
    /// Most entries that arrived from one network prefix, over all keys. Default 4,096.
    pub max_per_prefix: usize,
    /// Most bytes held: values, key names and a fixed overhead per entry. Default 64 MiB.
    pub max_bytes: usize,
}

impl Default for StoreLimits {
    fn default() -> Self {
        Self {
            max_keys: 65_536,
            max_per_key: 64,
            max_per_publisher: 1_024,
            max_per_prefix_per_key: 8,
            max_per_prefix: 4_096,
            max_bytes: 64 << 20,
        }
    }
}

/// What one entry costs the byte budget beyond its value and key name: the publisher, expiry,
/// signature and bookkeeping.
const ENTRY_OVERHEAD_BYTES: usize = 192;

/// Why a store was refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum StoreError {
    /// The record itself is bad.
    #[error(transparent)]
    Record(#[from] RecordError),
    /// The store holds its most keys.
    #[error("record store is full ({0} keys)")]
    Full(usize),
    /// The store holds its most bytes.
    #[error("record store is full ({0} bytes)")]
    FullBytes(usize),
    /// The key holds its most entries, spread over at least as many networks as this one
    /// would leave.
    #[error("{key} already holds {max} entries from as many networks")]
    KeyFull {
        /// The key.
        key: String,
        /// The limit.
        max: usize,
    },
    /// The publisher holds its most entries here.
    #[error("publisher {publisher} already holds {max} entries here")]
    PublisherFull {
        /// The publisher's id.
        publisher: String,
        /// The limit.
        max: usize,
    },
    /// The network the store came from holds its most entries, under this key or in all.
    #[error("{prefix} already holds {max} entries {scope}")]
    PrefixFull {
        /// The network.
        prefix: Prefix,
        /// The limit.
        max: usize,
        /// "under {key}" or "here".
        scope: String,
    },
    /// The publisher already stored a newer entry.
    #[error("{key}: this publisher's stored entry is newer")]
    Stale {
        /// The key.
        key: String,
    },
}

/// One publisher's entry under a key, with the network it arrived from (`None`: this node's
/// own; loopback, LAN and relayed callers share [`Prefix::Local`]).
#[derive(Clone, Debug)]
struct Entry {
    record: Record,
    origin: Option<Prefix>,
}

impl Entry {
    fn bytes(&self) -> usize {
        self.record.value.len() + self.record.key.to_string().len() + ENTRY_OVERHEAD_BYTES
    }
}

/// Running counts over every entry held.
#[derive(Clone, Debug, Default)]
struct Tally {
    per_publisher: HashMap<PublicKey, usize>,
    per_prefix: HashMap<Prefix, usize>,
    bytes: usize,
}

impl Tally {
    fn add(&mut self, entry: &Entry) {
        *self
            .per_publisher
            .entry(entry.record.publisher)
            .or_default() += 1;
        if let Some(p) = entry.origin {
            *self.per_prefix.entry(p).or_default() += 1;
        }
        self.bytes += entry.bytes();
    }

    fn sub(&mut self, entry: &Entry) {
        fn down<K: std::hash::Hash + Eq>(map: &mut HashMap<K, usize>, k: K) {
            if let Some(n) = map.get_mut(&k) {
                *n -= 1;
                if *n == 0 {
                    map.remove(&k);
                }
            }
        }
        down(&mut self.per_publisher, entry.record.publisher);
        if let Some(p) = entry.origin {
            down(&mut self.per_prefix, p);
        }
        self.bytes -= entry.bytes();
    }
}

/// A record store.
#[derive(Clone, Debug, Default)]
pub struct RecordStore {
    limits: StoreLimits,
    records: HashMap<Key, Vec<Entry>>,
    tally: Tally,
    /// When a full store last swept out expired entries: at most once a second, so a flood
    /// of stores into a full store does not walk every key each time.
    swept_ms: u64,
}

impl RecordStore {
    /// An empty store.
    pub fn new(limits: StoreLimits) -> Self {
        Self {
            limits,
            records: HashMap::new(),
            tally: Tally::default(),
            swept_ms: 0,
        }
    }

    /// Verifies and stores `record`, which arrived from `origin`, replacing the same
    /// publisher's older entry (which keeps the network it first arrived from).
    pub fn put(
        &mut self,
        record: Record,
        origin: Option<Prefix>,
        now_ms: u64,
    ) -> Result<(), StoreError> {
        record.verify(now_ms)?;
        self.put_verified(record, origin, now_ms)
    }

    /// [`RecordStore::put`] for a record the caller has just verified.
    pub(crate) fn put_verified(
        &mut self,
        record: Record,
        origin: Option<Prefix>,
        now_ms: u64,
    ) -> Result<(), StoreError> {
        let key = record.key.key();
        self.expire_key(&key, now_ms);
        let new = Entry { record, origin };
        if let Some(i) = self.position(&key, &new.record.publisher) {
            return self.replace(&key, i, new);
        }
        self.admit(&key, &new, now_ms)?;
        let entries = self.records.entry(key).or_default();
        if entries.len() >= self.limits.max_per_key {
            let i = make_room(entries, new.origin, self.limits.max_per_key, &new.record)?;
            self.tally.sub(&entries.swap_remove(i));
        }
        self.tally.add(&new);
        entries.push(new);
        Ok(())
    }

    fn position(&self, key: &Key, publisher: &PublicKey) -> Option<usize> {
        let entries = self.records.get(key)?;
        entries
            .iter()
            .position(|e| e.record.publisher == *publisher)
    }

    /// The publisher's newer entry takes the place of its older one.
    fn replace(&mut self, key: &Key, i: usize, mut new: Entry) -> Result<(), StoreError> {
        let entries = self.records.get_mut(key).expect("found under it");
        let old = &entries[i];
        if old.record.expires_ms > new.record.expires_ms {
            return Err(StoreError::Stale {
                key: new.record.key.to_string(),
            });
        }
        let bytes = self.tally.bytes - old.bytes() + new.bytes();
        if bytes > self.limits.max_bytes {
            return Err(StoreError::FullBytes(self.limits.max_bytes));
        }
        new.origin = old.origin;
        self.tally.sub(old);
        self.tally.add(&new);
        entries[i] = new;
        Ok(())
    }

    /// Checks the store-wide limits a new entry must fit.
    fn admit(&mut self, key: &Key, new: &Entry, now_ms: u64) -> Result<(), StoreError> {
        let limits = self.limits;
        let tally = &self.tally;
        let published = tally.per_publisher.get(&new.record.publisher);
        if published.copied().unwrap_or(0) >= limits.max_per_publisher {
            return Err(StoreError::PublisherFull {
                publisher: new.record.publisher_id().to_string(),
                max: limits.max_per_publisher,
            });
        }
        if let Some(p) = new.origin {
            let under_key = self
                .records
                .get(key)
                .map_or(0, |es| es.iter().filter(|e| e.origin == Some(p)).count());
            let (max, scope) = if under_key >= limits.max_per_prefix_per_key {
                (
                    limits.max_per_prefix_per_key,
                    format!("under {}", new.record.key),
                )
            } else if tally.per_prefix.get(&p).copied().unwrap_or(0) >= limits.max_per_prefix {
                (limits.max_per_prefix, "here".to_string())
            } else {
                (0, String::new())
            };
            if max > 0 {
                return Err(StoreError::PrefixFull {
                    prefix: p,
                    max,
                    scope,
                });
            }
        }
        let over_keys = !self.records.contains_key(key) && self.records.len() >= limits.max_keys;
        let over_bytes = self.tally.bytes + new.bytes() > limits.max_bytes;
        if (over_keys || over_bytes) && now_ms >= self.swept_ms.saturating_add(1000) {
            self.expire(now_ms);
            self.swept_ms = now_ms;
        }
        if !self.records.contains_key(key) && self.records.len() >= limits.max_keys {
            return Err(StoreError::Full(limits.max_keys));
        }
        if self.tally.bytes + new.bytes() > limits.max_bytes {
            return Err(StoreError::FullBytes(limits.max_bytes));
        }
        Ok(())
    }

    /// The live entries under `key`.
    pub fn get(&self, key: &Key, now_ms: u64) -> Vec<Record> {
        self.records
            .get(key)
            .map(|es| {
                es.iter()
                    .filter(|e| e.record.expires_ms > now_ms)
                    .map(|e| e.record.clone())
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Drops `publisher`'s entry under `key` (it withdrew).
    pub fn remove(&mut self, key: &Key, publisher: &PublicKey) {
        self.drop_where(key, |e| e.record.publisher == *publisher);
    }

    /// Drops the expired entries under `key`.
    fn expire_key(&mut self, key: &Key, now_ms: u64) -> usize {
        self.drop_where(key, |e| e.record.expires_ms <= now_ms)
    }

    fn drop_where(&mut self, key: &Key, gone: impl Fn(&Entry) -> bool) -> usize {
        let Some(entries) = self.records.get_mut(key) else {
            return 0;
        };
        let before = entries.len();
        let tally = &mut self.tally;
        entries.retain(|e| {
            let drop = gone(e);
            if drop {
                tally.sub(e);
            }
            !drop
        });
        let dropped = before - entries.len();
        if entries.is_empty() {
            self.records.remove(key);
        }
        dropped
    }

    /// Drops every expired entry; returns how many.
    pub fn expire(&mut self, now_ms: u64) -> usize {
        let keys: Vec<Key> = self.records.keys().copied().collect();
        keys.iter().map(|k| self.expire_key(k, now_ms)).sum()
    }

    /// When the next entry expires.
    pub fn next_expiry(&self) -> Option<u64> {
        self.iter().map(|r| r.expires_ms).min()
    }

    /// Keys held.
    pub fn len(&self) -> usize {
        self.records.len()
    }

    /// Whether nothing is held.
    pub fn is_empty(&self) -> bool {
        self.records.is_empty()
    }

    /// Bytes held, as the budget counts them.
    pub fn bytes(&self) -> usize {
        self.tally.bytes
    }

    /// Every entry held, for republishing.
    pub fn iter(&self) -> impl Iterator<Item = &Record> {
        self.records.values().flatten().map(|e| &e.record)
    }
}

/// Which entry of a full key goes for a newcomer from `origin`: the soonest to expire of the
/// network holding the most entries there, when taking it spreads the key over more networks;
/// otherwise the key is full to this newcomer.
fn make_room(
    entries: &[Entry],
    origin: Option<Prefix>,
    max: usize,
    record: &Record,
) -> Result<usize, StoreError> {
    // This node's own entries stand alone: each is a network of one, never crowded.
    let mut groups: HashMap<Prefix, usize> = HashMap::new();
    for p in entries.iter().filter_map(|e| e.origin) {
        *groups.entry(p).or_default() += 1;
    }
    let ours = origin.map_or(0, |p| groups.get(&p).copied().unwrap_or(0));
    let crowded = groups.into_iter().max_by_key(|&(p, n)| (n, p));
    let Some((crowded, _)) = crowded.filter(|&(_, most)| ours + 1 < most) else {
        return Err(StoreError::KeyFull {
            key: record.key.to_string(),
            max,
        });
    };
    Ok(entries
        .iter()
        .enumerate()
        .filter(|(_, e)| e.origin == Some(crowded))
        .min_by_key(|(_, e)| e.record.expires_ms)
        .map(|(i, _)| i)
        .expect("the crowded network holds entries"))
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

    fn net(a: u8) -> Option<Prefix> {
        Some(Prefix::V4([a, 0, 0]))
    }

    fn put(
        store: &mut RecordStore,
        key: RecordKey,
        value: Vec<u8>,
        ttl: u64,
        from: Option<Prefix>,
    ) -> Result<(), StoreError> {
        let record = Record::sign(key, value, NOW + ttl, &NodeKey::generate()).unwrap();
        store.put(record, from, NOW)
    }

    #[test]
    fn providers_merge_per_publisher_and_expire_on_their_own() {
        let mut store = RecordStore::new(StoreLimits::default());
        let (a, b) = (NodeKey::generate(), NodeKey::generate());
        let sign =
            |value: &[u8], ttl, k| Record::sign(layer(), value.to_vec(), NOW + ttl, k).unwrap();
        store.put(sign(b"a1", 1000, &a), None, NOW).unwrap();
        store.put(sign(b"b", 5000, &b), net(9), NOW).unwrap();
        store.put(sign(b"a2", 2000, &a), net(7), NOW).unwrap();
        let key = layer().key();
        let mut values: Vec<_> = store.get(&key, NOW).into_iter().map(|r| r.value).collect();
        values.sort();
        assert_eq!(
            values,
            [b"a2".to_vec(), b"b".to_vec()],
            "a's newer entry replaced its older"
        );
        assert!(matches!(
            store.put(sign(b"a0", 1500, &a), None, NOW),
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
        assert_eq!(store.bytes(), 0, "the byte count follows what is held");
    }

    #[test]
    fn a_full_key_makes_room_only_to_spread_over_more_networks() {
        let mut store = RecordStore::new(StoreLimits {
            max_keys: 1,
            max_per_key: 3,
            max_per_prefix_per_key: 2,
            ..StoreLimits::default()
        });
        put(&mut store, layer(), vec![1], 1000, net(1)).unwrap();
        put(&mut store, layer(), vec![2], 2000, net(1)).unwrap();
        let err = put(&mut store, layer(), vec![3], 9000, net(1)).unwrap_err();
        assert!(
            matches!(err, StoreError::PrefixFull { max: 2, .. }),
            "{err}"
        );
        assert!(err.to_string().contains("1.0.0.0/24"), "{err}");
        put(&mut store, layer(), vec![4], 500, net(2)).unwrap();
        // Full: a third network's entry takes the place of net 1's soonest to expire, however
        // short its own life.
        put(&mut store, layer(), vec![5], 100, net(3)).unwrap();
        let held = |store: &RecordStore| {
            let mut v: Vec<u8> = store
                .get(&layer().key(), NOW)
                .iter()
                .map(|r| r.value[0])
                .collect();
            v.sort();
            v
        };
        assert_eq!(held(&store), [2, 4, 5]);
        // One each now: a fourth network's newcomer, however long-lived, finds the key full.
        let err = put(&mut store, layer(), vec![6], 3_600_000, net(4)).unwrap_err();
        assert!(matches!(err, StoreError::KeyFull { max: 3, .. }), "{err}");
        let err = put(
            &mut store,
            RecordKey::Checkpoint("c".into()),
            vec![],
            10,
            None,
        );
        assert_eq!(err, Err(StoreError::Full(1)));
        let mut forged = Record::sign(layer(), vec![7], NOW + 9000, &NodeKey::generate()).unwrap();
        forged.value = vec![8];
        assert!(matches!(
            store.put(forged, None, NOW),
            Err(StoreError::Record(_))
        ));
        assert_eq!(held(&store), [2, 4, 5], "nothing stored was lost");
    }

    #[test]
    fn publishers_networks_and_bytes_have_quotas_freed_as_entries_expire() {
        let mut store = RecordStore::new(StoreLimits {
            max_per_publisher: 2,
            max_per_prefix: 3,
            // The five small entries and two 1,000-byte ones fit, a third large one only once
            // three small ones have expired.
            max_bytes: 4_100,
            ..StoreLimits::default()
        });
        let layer = |index| RecordKey::Layer {
            model: "m".into(),
            index,
        };
        let owner = NodeKey::generate();
        for index in 0..2 {
            let r = Record::sign(layer(index), vec![], NOW + 1000, &owner).unwrap();
            store.put(r, None, NOW).unwrap();
        }
        let third = Record::sign(layer(2), vec![], NOW + 1000, &owner).unwrap();
        let err = store.put(third.clone(), None, NOW).unwrap_err();
        assert!(
            matches!(err, StoreError::PublisherFull { max: 2, .. }),
            "{err}"
        );

        for index in 10..13 {
            put(&mut store, layer(index), vec![], 1000, net(5)).unwrap();
        }
        let err = put(&mut store, layer(13), vec![], 1000, net(5)).unwrap_err();
        assert!(
            matches!(err, StoreError::PrefixFull { max: 3, .. }),
            "{err}"
        );
        assert!(err.to_string().ends_with("here"), "{err}");

        for index in 20..22 {
            put(&mut store, layer(index), vec![0; 1000], 5000, None).unwrap();
        }
        let err = put(&mut store, layer(22), vec![0; 1000], 5000, None).unwrap_err();
        assert!(matches!(err, StoreError::FullBytes(_)), "{err}");
        assert_eq!(store.len(), 7, "refusals stored nothing");

        // Once the small entries expire, their publisher, network and bytes are free again.
        store.expire(NOW + 1000);
        let third = Record::sign(layer(2), vec![], NOW + 2000, &owner).unwrap();
        store.put(third, None, NOW + 1000).unwrap();
        let r = Record::sign(layer(13), vec![], NOW + 2000, &NodeKey::generate()).unwrap();
        store.put(r, net(5), NOW + 1000).unwrap();
        let r = Record::sign(layer(22), vec![0; 1000], NOW + 5000, &NodeKey::generate()).unwrap();
        store.put(r, None, NOW + 1000).unwrap();
    }
}
