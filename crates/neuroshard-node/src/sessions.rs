//! Inference sessions on a node: one KV cache each, within a memory budget, expiring when idle.
//!
//! A call checks its session's cache out of the store (reserving the bytes its new tokens will
//! take), computes off the reactor, and checks it back in. The store only does bookkeeping
//! under a short lock; time comes in as `now`, so expiry is testable with paused time.

use neuroshard_base::sync::LockExt;
use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use neuroshard_base::PublicKey;
use neuroshard_model::{KvCache, whole_blocks};
use tokio::time::Instant;

use neuroshard_net::NodeError;

/// Budget and lifetime of sessions.
#[derive(Debug, Clone, Copy)]
pub struct SessionLimits {
    /// Bytes of KV cache all sessions together may hold.
    pub budget_bytes: u64,
    /// A session untouched this long is dropped.
    pub idle_timeout: Duration,
    /// KV bytes one token takes in one layer (keys and values) on the shard served first.
    pub bytes_per_token_layer: u64,
    /// Positions a session's cache grows by (`neuroshard_model::BLOCK_POSITIONS`): a session
    /// holds, and the budget counts, whole blocks.
    pub block_positions: usize,
}

#[derive(Debug)]
struct Entry {
    /// The key that opened it: only its calls may use or end it.
    owner: PublicKey,
    /// Distinguishes this session from an earlier one of the same id that was ended while a
    /// call still had it checked out.
    generation: u64,
    /// `None` while a call has it checked out.
    cache: Option<KvCache>,
    /// Token-layers held, or reserved while checked out.
    token_layers: u64,
    last_used: Instant,
}

/// A session's cache, out of the store for one call.
#[derive(Debug)]
pub struct Checkout {
    /// The session.
    pub id: String,
    /// Its cache.
    pub cache: KvCache,
    generation: u64,
}

/// All sessions of a node.
#[derive(Debug)]
pub struct SessionStore {
    limits: SessionLimits,
    /// KV bytes one token takes in one layer on the shard served now: it holds its cache in
    /// its own precision, and [`Self::clear`] changes it with the shard.
    bytes_per_token_layer: AtomicU64,
    sessions: Mutex<HashMap<String, Entry>>,
    generations: std::sync::atomic::AtomicU64,
}

impl SessionStore {
    /// An empty store.
    pub fn new(limits: SessionLimits) -> Self {
        Self {
            limits,
            bytes_per_token_layer: AtomicU64::new(limits.bytes_per_token_layer),
            sessions: Mutex::new(HashMap::new()),
            generations: std::sync::atomic::AtomicU64::new(0),
        }
    }

    /// Takes session `id`'s cache for a call by `caller` adding `tokens` positions at
    /// `start_pos` to `layers` layers. A session is created by a call at position 0 and belongs
    /// to its caller; a call by another key is refused, and so is a later position for an
    /// unknown session and a call that would overflow the budget.
    pub fn checkout(
        &self,
        id: &str,
        caller: PublicKey,
        start_pos: usize,
        tokens: usize,
        layers: usize,
        now: Instant,
    ) -> Result<(Checkout, bool), NodeError> {
        let mut sessions = self.sessions.lock_or_recover();
        let block = self.limits.block_positions;
        let has = sessions.get(id).map_or(0, |e| e.token_layers);
        let reserved = whole_blocks(start_pos.saturating_add(tokens), block).saturating_mul(layers);
        let need = (reserved as u64).saturating_sub(has);
        let created = match sessions.get(id) {
            Some(entry) if entry.owner != caller => return Err(not_owner(id)),
            None if start_pos > 0 => return Err(NodeError::UnknownSession(id.to_string())),
            None => true,
            Some(entry) if entry.cache.is_none() => {
                return Err(NodeError::SessionBusy(id.to_string()));
            }
            Some(_) => false,
        };
        if self.held(&sessions) + need > self.budget_token_layers() {
            Self::expire_locked(&mut sessions, self.limits.idle_timeout, now);
            let budget = self.budget_token_layers();
            make_fair_room(&mut sessions, caller, need, budget);
            let held = self.held(&sessions);
            if held + need > self.budget_token_layers() {
                let mib = |t: u64| (t * self.token_layer_bytes()) as f64 / 1048576.0;
                return Err(NodeError::Full(format!(
                    "KV cache budget of {:.1} MiB is full: {} sessions hold {:.1} MiB and this call needs {:.1} MiB more",
                    self.limits.budget_bytes as f64 / 1048576.0,
                    sessions.len(),
                    mib(held),
                    mib(need)
                )));
            }
        }
        let entry = sessions.entry(id.to_string()).or_insert_with(|| Entry {
            owner: caller,
            generation: self
                .generations
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed),
            cache: Some(KvCache::with_block(block)),
            token_layers: 0,
            last_used: now,
        });
        entry.token_layers += need;
        entry.last_used = now;
        let cache = entry.cache.take().expect("checked above");
        Ok((
            Checkout {
                id: id.to_string(),
                cache,
                generation: entry.generation,
            },
            created,
        ))
    }

    /// Returns a cache after a call (successful or not); an empty new session is dropped.
    pub fn checkin(&self, checkout: Checkout, now: Instant) {
        let mut sessions = self.sessions.lock_or_recover();
        let Some(entry) = sessions.get_mut(&checkout.id) else {
            return;
        };
        if entry.generation != checkout.generation {
            // Ended (and maybe restarted) while this call ran: the cache is stale.
            return;
        }
        if checkout.cache.is_empty() {
            sessions.remove(&checkout.id);
            return;
        }
        entry.token_layers = checkout.cache.token_layers() as u64;
        entry.cache = Some(checkout.cache);
        entry.last_used = now;
    }

    /// Drops a checked-out session whose call failed without a usable cache.
    pub fn abandon(&self, checkout: Checkout) {
        let mut sessions = self.sessions.lock_or_recover();
        if sessions
            .get(&checkout.id)
            .is_some_and(|e| e.generation == checkout.generation)
        {
            sessions.remove(&checkout.id);
        }
    }

    /// Drops a session at the request of `caller`, its owner; whether it existed. Another
    /// key's request is refused and changes nothing.
    pub fn end(&self, id: &str, caller: &PublicKey) -> Result<bool, NodeError> {
        let mut sessions = self.sessions.lock_or_recover();
        match sessions.get(id) {
            Some(entry) if entry.owner != *caller => Err(not_owner(id)),
            Some(_) => Ok(sessions.remove(id).is_some()),
            None => Ok(false),
        }
    }

    /// Drops every session (the node now serves other layers, whose cache takes
    /// `bytes_per_token_layer` a position in a layer); how many. Calls in flight find theirs
    /// gone when they check in, and their caches are dropped.
    pub fn clear(&self, bytes_per_token_layer: u64) -> usize {
        let mut sessions = self.sessions.lock_or_recover();
        let count = sessions.len();
        sessions.clear();
        self.bytes_per_token_layer
            .store(bytes_per_token_layer, Ordering::Relaxed);
        count
    }

    /// KV bytes one token takes in one layer now.
    fn token_layer_bytes(&self) -> u64 {
        self.bytes_per_token_layer.load(Ordering::Relaxed).max(1)
    }

    /// Drops sessions idle longer than the timeout; how many.
    pub fn expire(&self, now: Instant) -> usize {
        let mut sessions = self.sessions.lock_or_recover();
        Self::expire_locked(&mut sessions, self.limits.idle_timeout, now)
    }

    fn expire_locked(sessions: &mut HashMap<String, Entry>, idle: Duration, now: Instant) -> usize {
        let before = sessions.len();
        sessions.retain(|_, e| e.cache.is_none() || now.duration_since(e.last_used) <= idle);
        before - sessions.len()
    }

    /// Sessions held and their KV bytes.
    pub fn usage(&self) -> (u64, u64) {
        let sessions = self.sessions.lock_or_recover();
        (
            sessions.len() as u64,
            self.held(&sessions) * self.token_layer_bytes(),
        )
    }

    fn held(&self, sessions: &HashMap<String, Entry>) -> u64 {
        sessions.values().map(|e| e.token_layers).sum()
    }

    fn budget_token_layers(&self) -> u64 {
        self.limits.budget_bytes / self.token_layer_bytes()
    }
}

/// Frees room for `caller`'s `need` while it holds less than its fair share (the budget split
/// evenly among the requesters holding sessions, itself included): the least recently used
/// idle sessions of whichever requester holds the most go, while that one holds more than its
/// share. Their clients find them gone and replay, as after a restart. Returns how many went.
fn make_fair_room(
    sessions: &mut HashMap<String, Entry>,
    caller: PublicKey,
    need: u64,
    budget: u64,
) -> usize {
    let mut evicted = 0;
    loop {
        let mut per_owner: HashMap<PublicKey, u64> = HashMap::new();
        for e in sessions.values() {
            *per_owner.entry(e.owner).or_default() += e.token_layers;
        }
        if per_owner.values().sum::<u64>() + need <= budget {
            if evicted > 0 {
                tracing::info!("dropped {evicted} sessions of a requester over its KV share");
            }
            return evicted;
        }
        let requesters = per_owner.len() as u64 + u64::from(!per_owner.contains_key(&caller));
        let share = budget / requesters.max(1);
        if per_owner.get(&caller).copied().unwrap_or(0) + need > share {
            return evicted;
        }
        let hog = (per_owner.iter())
            .filter(|(owner, held)| **owner != caller && **held > share)
            .max_by_key(|(_, held)| **held)
            .map(|(owner, _)| *owner);
        let idle = |hog: PublicKey| {
            (sessions.iter()).filter(move |(_, e)| e.owner == hog && e.cache.is_some())
        };
        // Only when dropping all of its idle sessions would make the room: none goes for
        // nothing.
        let total: u64 = per_owner.values().sum();
        let hog = hog.filter(|&h| {
            let freed: u64 = idle(h).map(|(_, e)| e.token_layers).sum();
            total - freed + need <= budget
        });
        let victim = hog.and_then(|hog| {
            idle(hog)
                .min_by_key(|(_, e)| e.last_used)
                .map(|(id, _)| id.clone())
        });
        let Some(victim) = victim else {
            return evicted;
        };
        sessions.remove(&victim);
        evicted += 1;
    }
}

/// A call on session `id` by a key other than the one that opened it.
fn not_owner(id: &str) -> NodeError {
    NodeError::Forbidden(format!("session {id:?} belongs to another key"))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The key the tests' sessions belong to.
    fn owner() -> PublicKey {
        PublicKey([1; 32])
    }

    fn store() -> SessionStore {
        SessionStore::new(SessionLimits {
            budget_bytes: 100 * 8,
            idle_timeout: Duration::from_secs(60),
            bytes_per_token_layer: 8,
            block_positions: 1,
        })
    }

    #[test]
    fn unknown_sessions_and_busy_sessions_are_refused() {
        let s = store();
        let now = Instant::now();
        assert!(matches!(
            s.checkout("a", owner(), 3, 1, 1, now),
            Err(NodeError::UnknownSession(_))
        ));
        let (_held, created) = s.checkout("a", owner(), 0, 1, 1, now).unwrap();
        assert!(created);
        assert!(matches!(
            s.checkout("a", owner(), 1, 1, 1, now),
            Err(NodeError::SessionBusy(_))
        ));
    }

    #[test]
    fn budget_is_enforced_and_idle_sessions_make_room() {
        let s = store();
        let t0 = Instant::now();
        let (c, _) = s.checkout("a", owner(), 0, 30, 3, t0).unwrap();
        assert_eq!(s.usage().1, 90 * 8);
        let err = s.checkout("b", owner(), 0, 20, 1, t0).unwrap_err();
        assert!(matches!(err, NodeError::Full(_)), "{err}");
        assert!(err.to_string().contains("budget"));
        // Give "a" back holding what it reserved, then let it go idle past the timeout.
        let mut cache = c.cache;
        cache.advance(0..3, 30);
        s.checkin(Checkout { cache, ..c }, t0);
        let later = t0 + Duration::from_secs(61);
        assert!(s.checkout("b", owner(), 0, 20, 1, later).is_ok());
        assert_eq!(s.usage().0, 1);
    }

    /// A shard whose cache takes half the bytes a position (bf16 beside f32) holds twice the
    /// positions in the same budget once the store is cleared for it.
    #[test]
    fn a_shard_with_a_smaller_cache_holds_more_in_the_same_budget() {
        let s = store();
        let t0 = Instant::now();
        let err = s.checkout("a", owner(), 0, 150, 1, t0).unwrap_err();
        assert!(matches!(err, NodeError::Full(_)), "{err}");
        assert_eq!(s.clear(4), 0);
        let (c, _) = s.checkout("a", owner(), 0, 150, 1, t0).unwrap();
        let mut cache = c.cache;
        cache.advance(0..1, 150);
        s.checkin(Checkout { cache, ..c }, t0);
        assert_eq!(s.usage(), (1, 150 * 4));
        assert!(
            s.checkout("b", owner(), 0, 60, 1, t0).is_err(),
            "200 is the budget"
        );
    }

    #[test]
    fn a_call_finishing_after_its_session_ended_does_not_resurrect_it() {
        let s = store();
        let now = Instant::now();
        let (old, _) = s.checkout("a", owner(), 0, 1, 1, now).unwrap();
        assert!(s.end("a", &owner()).unwrap());
        let (fresh, created) = s.checkout("a", owner(), 0, 2, 1, now).unwrap();
        assert!(created);
        let mut stale = old.cache;
        stale.advance(0..1, 1);
        s.checkin(
            Checkout {
                cache: stale,
                ..old
            },
            now,
        );
        assert!(
            matches!(
                s.checkout("a", owner(), 0, 1, 1, now),
                Err(NodeError::SessionBusy(_))
            ),
            "the new call still owns it"
        );
        let mut cache = fresh.cache;
        cache.advance(0..1, 2);
        s.checkin(Checkout { cache, ..fresh }, now);
        assert_eq!(s.usage(), (1, 2 * 8));
    }

    #[test]
    fn only_the_key_that_opened_a_session_may_use_or_end_it() {
        let s = store();
        let now = Instant::now();
        let (c, _) = s.checkout("a", owner(), 0, 2, 1, now).unwrap();
        let mut cache = c.cache;
        cache.advance(0..1, 2);
        s.checkin(Checkout { cache, ..c }, now);
        let stranger = PublicKey([2; 32]);
        for err in [
            s.checkout("a", stranger, 2, 1, 1, now).unwrap_err(),
            // At position 0 too: it would otherwise restart the owner's session.
            s.checkout("a", stranger, 0, 1, 1, now).unwrap_err(),
            s.end("a", &stranger).unwrap_err(),
        ] {
            assert!(matches!(err, NodeError::Forbidden(_)), "{err}");
            assert!(err.to_string().contains("belongs to another key"), "{err}");
        }
        assert_eq!(s.usage(), (1, 2 * 8), "the owner's session is unchanged");
        let (c, created) = s.checkout("a", owner(), 2, 1, 1, now).unwrap();
        assert!(!created);
        assert_eq!(c.cache.token_layers(), 2);
    }

    #[test]
    fn a_requester_under_its_share_makes_room_from_the_one_over_it() {
        let s = store();
        let (a, b) = (owner(), PublicKey([9; 32]));
        let t0 = Instant::now();
        for (i, id) in ["a1", "a2"].iter().enumerate() {
            let (c, _) = s
                .checkout(id, a, 0, 40, 1, t0 + Duration::from_secs(i as u64))
                .unwrap();
            let mut cache = c.cache;
            cache.advance(0..1, 40);
            s.checkin(Checkout { cache, ..c }, t0 + Duration::from_secs(i as u64));
        }
        // b asks for 30 of 100 with a holding 80: a's least recently used session goes.
        let later = t0 + Duration::from_secs(5);
        assert!(s.checkout("b1", b, 0, 30, 1, later).is_ok());
        assert!(matches!(
            s.checkout("a1", a, 40, 1, 1, later),
            Err(NodeError::UnknownSession(_))
        ));
        // a, at its half already, gets no room from b.
        let err = s.checkout("a3", a, 0, 40, 1, later).unwrap_err();
        assert!(err.to_string().contains("budget"), "{err}");
        assert_eq!(s.usage().0, 2, "a2 and b1");
    }

    #[test]
    fn sessions_hold_whole_blocks_free_them_when_they_end_and_are_refused_past_the_budget() {
        // 100 token-layers of budget in blocks of 16 positions, over 2 layers.
        let s = SessionStore::new(SessionLimits {
            block_positions: 16,
            ..store().limits
        });
        let now = Instant::now();
        let (c, _) = s.checkout("a", owner(), 0, 1, 2, now).unwrap();
        assert_eq!(
            s.usage().1,
            16 * 2 * 8,
            "one token takes a block in each layer"
        );
        let mut cache = c.cache;
        cache.advance(0..2, 1);
        s.checkin(Checkout { cache, ..c }, now);
        assert_eq!(s.usage().1, 16 * 2 * 8);
        // Positions 1..16 fit the block held; the 17th takes a second.
        let (c, _) = s.checkout("a", owner(), 1, 15, 2, now).unwrap();
        assert_eq!(s.usage().1, 16 * 2 * 8);
        let mut cache = c.cache;
        cache.advance(0..2, 15);
        s.checkin(Checkout { cache, ..c }, now);
        let (c, _) = s.checkout("a", owner(), 16, 1, 2, now).unwrap();
        assert_eq!(s.usage().1, 32 * 2 * 8);
        let mut cache = c.cache;
        cache.advance(0..2, 1);
        s.checkin(Checkout { cache, ..c }, now);
        // 64 held of 100: another session's two blocks in two layers (64) do not fit.
        let err = s.checkout("b", owner(), 0, 17, 2, now).unwrap_err();
        assert!(matches!(err, NodeError::Full(_)), "{err}");
        assert_eq!(
            tonic::Status::from(err).code(),
            tonic::Code::ResourceExhausted
        );
        assert!(s.end("a", &owner()).unwrap());
        assert_eq!(s.usage(), (0, 0), "its blocks are free");
        assert!(s.checkout("b", owner(), 0, 17, 2, now).is_ok());
    }
}
