//! The routing table: 256 buckets of at most k contacts each, ordered by when each was last
//! heard from, with a replacement cache per bucket, liveness checks before eviction, and limits
//! on how many contacts may share a network prefix.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};

use crate::key::Key;

/// A peer that takes part in the DHT as a server: its key and where to dial it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Contact {
    /// Its key (node id).
    pub key: Key,
    /// Its dialable address.
    pub addr: SocketAddr,
}

/// How many contacts may share a network prefix (/24 for IPv4, /48 for IPv6), so one operator
/// with one address block cannot fill a table.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DiversityLimits {
    /// Most contacts per prefix in one bucket. Default 2.
    pub per_bucket: usize,
    /// Most contacts per prefix in the whole table. Default 3.
    pub per_table: usize,
    /// Loopback, private and link-local addresses are exempt: they can only come from this
    /// machine or its LAN. Default true.
    pub exempt_local: bool,
}

impl Default for DiversityLimits {
    fn default() -> Self {
        Self {
            per_bucket: 2,
            per_table: 3,
            exempt_local: true,
        }
    }
}

/// A network prefix the diversity limits count by.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Prefix {
    /// An IPv4 /24.
    V4([u8; 3]),
    /// An IPv6 /48.
    V6([u8; 6]),
    /// Callers the limits cannot place (loopback, LAN, relayed), counted together where a
    /// record store counts networks; the routing table exempts them instead.
    Local,
}

impl std::fmt::Display for Prefix {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Prefix::V4([a, b, c]) => write!(f, "{a}.{b}.{c}.0/24"),
            Prefix::Local => write!(f, "loopback, LAN and relayed callers"),
            Prefix::V6(p) => {
                let seg = |i: usize| u16::from_be_bytes([p[i], p[i + 1]]);
                write!(f, "{:x}:{:x}:{:x}::/48", seg(0), seg(2), seg(4))
            }
        }
    }
}

impl DiversityLimits {
    /// The prefix `ip` counts against, or `None` where it is exempt.
    pub fn prefix(&self, ip: IpAddr) -> Option<Prefix> {
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4),
            v4 => v4,
        };
        match ip {
            IpAddr::V4(v4) => {
                if self.exempt_local && (v4.is_loopback() || v4.is_private() || v4.is_link_local())
                {
                    return None;
                }
                let o = v4.octets();
                Some(Prefix::V4([o[0], o[1], o[2]]))
            }
            IpAddr::V6(v6) => {
                let o = v6.octets();
                let unique_local = o[0] & 0xfe == 0xfc;
                let link_local = o[0] == 0xfe && o[1] & 0xc0 == 0x80;
                if self.exempt_local && (v6.is_loopback() || unique_local || link_local) {
                    return None;
                }
                Some(Prefix::V6([o[0], o[1], o[2], o[3], o[4], o[5]]))
            }
        }
    }
}

/// What [`RoutingTable::observe`] did with a contact.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Observed {
    /// Already in the table: now the most recently seen of its bucket.
    Refreshed,
    /// Added to a bucket with room.
    Added,
    /// Its bucket is full: it waits in the replacement cache, and the bucket's least recently
    /// seen contact must answer a ping ([`RoutingTable::observe`] again) or be evicted
    /// ([`RoutingTable::failed`]).
    Full {
        /// The contact to ping.
        ping: Contact,
    },
    /// Its bucket is full and a liveness check is already under way: it waits in the
    /// replacement cache.
    Queued,
    /// Not taken.
    Refused(Refusal),
}

/// Why a contact was not taken.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Refusal {
    /// It is this node.
    OwnKey,
    /// Its network prefix is at its limit in the bucket or the table.
    Diversity(Prefix),
}

#[derive(Clone, Debug)]
struct Entry {
    contact: Contact,
    last_seen_ms: u64,
    failures: u8,
}

#[derive(Clone, Debug, Default)]
struct Bucket {
    /// Least recently seen first.
    entries: Vec<Entry>,
    /// Newest last; at most k.
    replacements: Vec<Contact>,
    /// The entry being pinged because a newcomer waits.
    pinging: Option<Key>,
    /// When a lookup last went through this bucket's range.
    touched_ms: u64,
}

/// A contact that failed this many requests in a row is dropped even with no replacement.
const MAX_FAILURES: u8 = 3;

/// A node's routing table.
#[derive(Clone, Debug)]
pub struct RoutingTable {
    local: Key,
    k: usize,
    limits: DiversityLimits,
    buckets: Vec<Bucket>,
    prefixes: HashMap<Prefix, usize>,
    len: usize,
}

impl RoutingTable {
    /// An empty table for the node `local`, with buckets of `k`.
    pub fn new(local: Key, k: usize, limits: DiversityLimits) -> Self {
        Self {
            local,
            k,
            limits,
            buckets: vec![Bucket::default(); 256],
            prefixes: HashMap::new(),
            len: 0,
        }
    }

    /// This node's key.
    pub fn local(&self) -> Key {
        self.local
    }

    /// Contacts held.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether no contact is held.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Whether `key` is in the table.
    pub fn contains(&self, key: &Key) -> bool {
        self.bucket_of(key).is_some_and(|b| {
            self.buckets[b]
                .entries
                .iter()
                .any(|e| e.contact.key == *key)
        })
    }

    /// Every contact, bucket by bucket.
    pub fn contacts(&self) -> impl Iterator<Item = &Contact> {
        self.buckets
            .iter()
            .flat_map(|b| b.entries.iter().map(|e| &e.contact))
    }

    /// Contacts in bucket `index`, least recently seen first.
    pub fn bucket(&self, index: usize) -> impl Iterator<Item = &Contact> {
        self.buckets[index].entries.iter().map(|e| &e.contact)
    }

    /// Contacts waiting in bucket `index`'s replacement cache.
    pub fn replacements(&self, index: usize) -> &[Contact] {
        &self.buckets[index].replacements
    }

    fn bucket_of(&self, key: &Key) -> Option<usize> {
        self.local.distance(key).bucket()
    }

    /// Whether one more contact from `prefix` fits bucket `b` and the whole table.
    fn fits(&self, b: usize, prefix: Option<Prefix>) -> bool {
        let Some(p) = prefix else {
            return true;
        };
        let in_bucket = self.buckets[b]
            .entries
            .iter()
            .filter(|e| self.limits.prefix(e.contact.addr.ip()) == Some(p))
            .count();
        in_bucket < self.limits.per_bucket
            && self.prefixes.get(&p).copied().unwrap_or(0) < self.limits.per_table
    }

    /// A contact was heard from (it sent a request or answered one). See [`Observed`].
    pub fn observe(&mut self, contact: Contact, now_ms: u64) -> Observed {
        let Some(b) = self.bucket_of(&contact.key) else {
            return Observed::Refused(Refusal::OwnKey);
        };
        let prefix = self.limits.prefix(contact.addr.ip());
        let known = self.buckets[b]
            .entries
            .iter()
            .position(|e| e.contact.key == contact.key);
        if let Some(pos) = known {
            self.refresh(b, pos, contact, prefix, now_ms);
            return Observed::Refreshed;
        }
        if !self.fits(b, prefix) {
            let p = prefix.expect("only a counted prefix can be full");
            return Observed::Refused(Refusal::Diversity(p));
        }
        let bucket = &mut self.buckets[b];
        if bucket.entries.len() < self.k {
            if bucket.entries.capacity() == 0 {
                bucket.entries.reserve_exact(self.k);
            }
            bucket.entries.push(Entry {
                contact,
                last_seen_ms: now_ms,
                failures: 0,
            });
            if let Some(p) = prefix {
                *self.prefixes.entry(p).or_default() += 1;
            }
            self.len += 1;
            return Observed::Added;
        }
        bucket.replacements.retain(|c| c.key != contact.key);
        bucket.replacements.push(contact);
        if bucket.replacements.len() > self.k {
            bucket.replacements.remove(0);
        }
        if bucket.pinging.is_some() {
            return Observed::Queued;
        }
        let oldest = bucket.entries[0].contact;
        bucket.pinging = Some(oldest.key);
        Observed::Full { ping: oldest }
    }

    /// A known contact heard from again: moved to the bucket's end as the latest seen, at its
    /// new address if that fits the limits like a newcomer's would (else at the old one).
    fn refresh(
        &mut self,
        b: usize,
        pos: usize,
        contact: Contact,
        prefix: Option<Prefix>,
        now_ms: u64,
    ) {
        let mut entry = self.buckets[b].entries.remove(pos);
        let old = self.limits.prefix(entry.contact.addr.ip());
        if old == prefix || self.fits(b, prefix) {
            if old != prefix {
                if let Some(old) = old {
                    Self::uncount(&mut self.prefixes, old);
                }
                if let Some(p) = prefix {
                    *self.prefixes.entry(p).or_default() += 1;
                }
            }
            entry.contact.addr = contact.addr;
        }
        entry.last_seen_ms = now_ms;
        entry.failures = 0;
        let bucket = &mut self.buckets[b];
        bucket.entries.push(entry);
        if bucket.pinging == Some(contact.key) {
            bucket.pinging = None;
        }
    }

    fn uncount(prefixes: &mut HashMap<Prefix, usize>, p: Prefix) {
        if let Some(n) = prefixes.get_mut(&p) {
            *n -= 1;
            if *n == 0 {
                prefixes.remove(&p);
            }
        }
    }

    /// A request to `key` failed or timed out. A contact that failed its liveness check, or
    /// failed while a replacement waits, or failed [`MAX_FAILURES`] times in a row, is evicted
    /// and the newest replacement that fits the limits takes its place; that one is returned.
    pub fn failed(&mut self, key: &Key) -> Option<Contact> {
        let b = self.bucket_of(key)?;
        let bucket = &mut self.buckets[b];
        let pos = bucket.entries.iter().position(|e| e.contact.key == *key)?;
        bucket.entries[pos].failures = bucket.entries[pos].failures.saturating_add(1);
        let pinged = bucket.pinging == Some(*key);
        if pinged {
            bucket.pinging = None;
        }
        let evict = pinged
            || !bucket.replacements.is_empty()
            || bucket.entries[pos].failures >= MAX_FAILURES;
        if !evict {
            return None;
        }
        self.evict(b, pos)
    }

    /// Drops `key` from the table (a peer that misbehaved or left), promoting a replacement.
    pub fn remove(&mut self, key: &Key) -> bool {
        let Some(b) = self.bucket_of(key) else {
            return false;
        };
        let Some(pos) = self.buckets[b]
            .entries
            .iter()
            .position(|e| e.contact.key == *key)
        else {
            self.buckets[b].replacements.retain(|c| c.key != *key);
            return false;
        };
        self.evict(b, pos);
        true
    }

    fn evict(&mut self, b: usize, pos: usize) -> Option<Contact> {
        let gone = self.buckets[b].entries.remove(pos);
        if self.buckets[b].pinging == Some(gone.contact.key) {
            self.buckets[b].pinging = None;
        }
        if let Some(p) = self.limits.prefix(gone.contact.addr.ip()) {
            Self::uncount(&mut self.prefixes, p);
        }
        self.len -= 1;
        while let Some(next) = self.buckets[b].replacements.pop() {
            if matches!(self.observe(next, 0), Observed::Added) {
                // Promoted; it has not been heard from since it was queued, so it is the least
                // recently seen.
                let bucket = &mut self.buckets[b];
                let entry = bucket.entries.pop().expect("just added");
                bucket.entries.insert(0, entry);
                return Some(next);
            }
        }
        None
    }

    /// The `n` contacts closest to `target`, closest first.
    pub fn closest(&self, target: &Key, n: usize) -> Vec<Contact> {
        let mut all: Vec<_> = self
            .contacts()
            .map(|c| (target.distance(&c.key), *c))
            .collect();
        if all.len() > n && n > 0 {
            all.select_nth_unstable_by_key(n - 1, |(d, _)| *d);
            all.truncate(n);
        }
        all.sort_unstable_by_key(|(d, _)| *d);
        all.into_iter().map(|(_, c)| c).take(n).collect()
    }

    /// A lookup went through the range of bucket `index` (refresh bookkeeping).
    pub fn touch(&mut self, target: &Key, now_ms: u64) {
        if let Some(b) = self.bucket_of(target) {
            self.buckets[b].touched_ms = now_ms;
        }
    }

    /// Buckets no lookup has gone through for `interval_ms`, from the farthest down to the
    /// nearest non-empty one: the ones a refresh should look up a random key in.
    pub fn stale_buckets(&self, now_ms: u64, interval_ms: u64) -> Vec<usize> {
        let Some(nearest) = self.buckets.iter().position(|b| !b.entries.is_empty()) else {
            return Vec::new();
        };
        (nearest..256)
            .rev()
            .filter(|&b| now_ms.saturating_sub(self.buckets[b].touched_ms) >= interval_ms)
            .collect()
    }

    /// The first of the table's invariants that does not hold, described; none when all
    /// hold. For tests.
    #[doc(hidden)]
    pub fn broken_invariant(&self) -> Option<String> {
        let mut prefixes: HashMap<Prefix, usize> = HashMap::new();
        let mut len = 0;
        for (i, bucket) in self.buckets.iter().enumerate() {
            if bucket.entries.len() > self.k {
                return Some(format!("bucket {i} holds {} > k", bucket.entries.len()));
            }
            if bucket.replacements.len() > self.k {
                return Some(format!(
                    "bucket {i} caches {} replacements > k",
                    bucket.replacements.len()
                ));
            }
            let mut in_bucket: HashMap<Prefix, usize> = HashMap::new();
            for e in &bucket.entries {
                if self.bucket_of(&e.contact.key) != Some(i) {
                    return Some(format!("{:?} sits in bucket {i}", e.contact.key));
                }
                if bucket
                    .entries
                    .iter()
                    .filter(|o| o.contact.key == e.contact.key)
                    .count()
                    > 1
                {
                    return Some(format!("{:?} twice in bucket {i}", e.contact.key));
                }
                if let Some(p) = self.limits.prefix(e.contact.addr.ip()) {
                    *in_bucket.entry(p).or_default() += 1;
                    *prefixes.entry(p).or_default() += 1;
                }
                len += 1;
            }
            if let Some((p, n)) = in_bucket.iter().find(|(_, n)| **n > self.limits.per_bucket) {
                return Some(format!("bucket {i} holds {n} contacts from {p}"));
            }
            if bucket
                .entries
                .windows(2)
                .any(|w| w[0].last_seen_ms > w[1].last_seen_ms)
            {
                return Some(format!("bucket {i} is out of last-seen order"));
            }
        }
        if let Some((p, n)) = prefixes.iter().find(|(_, n)| **n > self.limits.per_table) {
            return Some(format!("the table holds {n} contacts from {p}"));
        }
        if prefixes != self.prefixes {
            return Some("prefix counts drifted".into());
        }
        if len != self.len {
            return Some(format!("len {} but {len} entries", self.len));
        }
        None
    }
}
