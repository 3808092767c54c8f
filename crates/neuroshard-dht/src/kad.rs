//! The Kademlia protocol as a state machine. It never does IO and never reads a clock: the
//! caller passes `now` in, delivers inbound requests and the answers to outbound ones, and sends
//! the requests it is handed. Timers are deadlines the caller sleeps until
//! ([`Kademlia::next_wakeup`]) before calling [`Kademlia::poll`]. The RNG is injected, so a
//! seeded simulator replays exactly.

use std::collections::{HashMap, VecDeque};
use std::net::IpAddr;

use neuroshard_base::PublicKey;
use rand::Rng;

use crate::key::Key;
use crate::lookup::{Lookup, merge};
use crate::record::{Record, RecordError, RecordKey};
use crate::store::{RecordStore, StoreError, StoreLimits};
use crate::table::{Contact, DiversityLimits, Observed, Prefix, RoutingTable};

/// Tunables; the defaults are DESIGN.md's.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Config {
    /// Bucket size and replication factor. Default 20.
    pub k: usize,
    /// Queries in flight per lookup path. Default 3.
    pub alpha: usize,
    /// Disjoint lookup paths (S/Kademlia); 1 for plain Kademlia. Default 1.
    pub disjoint_paths: usize,
    /// A request unanswered for this long has failed. Default 5 s.
    pub request_timeout_ms: u64,
    /// How often records put through this node are put again, so they reach the nodes that
    /// became closest since. Default 20 min.
    pub republish_ms: u64,
    /// Buckets no lookup went through for this long get one for a random key. Default 10 min.
    pub refresh_ms: u64,
    /// A get ends once this many peers have answered with records. Default 1; more gathers
    /// provider entries from more holders.
    pub quorum: usize,
    /// Network-prefix limits of the routing table.
    pub diversity: DiversityLimits,
    /// Bounds on the records stored for others.
    pub store: StoreLimits,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            k: 20,
            alpha: 3,
            disjoint_paths: 1,
            request_timeout_ms: 5_000,
            republish_ms: 20 * 60 * 1000,
            refresh_ms: 10 * 60 * 1000,
            quorum: 1,
            diversity: DiversityLimits::default(),
            store: StoreLimits::default(),
        }
    }
}

/// How a node takes part.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// Reachable: it answers requests and may sit in others' routing tables.
    Server,
    /// Behind NAT or a relay: it asks but is never put in a routing table and stores nothing.
    Client,
}

/// A DHT request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Request {
    /// Are you alive?
    Ping,
    /// The k contacts you know closest to `target`.
    FindNode {
        /// The key sought.
        target: Key,
    },
    /// The records under `key`, or the k contacts closest to it.
    FindValue {
        /// The record key.
        key: RecordKey,
    },
    /// Store this record.
    Store {
        /// The record.
        record: Record,
    },
}

/// An answer to a [`Request`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Response {
    /// To [`Request::Ping`].
    Pong,
    /// To [`Request::FindNode`], or to [`Request::FindValue`].
    Nodes {
        /// Contacts closer to the target.
        closer: Vec<Contact>,
        /// Records under the key sought ([`Request::FindValue`] only).
        records: Vec<Record>,
    },
    /// To [`Request::Store`].
    Stored,
}

/// Why an inbound request was refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum DhtError {
    /// This node is a client and serves no DHT requests.
    #[error("this node takes part in the DHT as a client and serves no requests")]
    NotServing,
    /// The record could not be stored.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The record is bad.
    #[error(transparent)]
    Record(#[from] RecordError),
    /// This node knows `k` others closer to the record's key, so it is not one of the nodes
    /// that hold it.
    #[error("{key}: this node knows {k} nodes closer to it and does not hold it")]
    NotClosest {
        /// The record's key.
        key: String,
        /// The replication factor.
        k: usize,
    },
}

/// Why an outbound request brought no usable answer.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum NoAnswer {
    /// No answer before the request's deadline.
    #[error("no answer in time")]
    TimedOut,
    /// The peer could not be reached (refused connection, broken link).
    #[error("unreachable: {0}")]
    Unreachable(String),
    /// The peer answered with an error.
    #[error("refused: {0}")]
    Refused(String),
    /// The answer did not come from the key asked, or did not parse.
    #[error("bad answer: {0}")]
    BadAnswer(String),
}

impl From<DhtError> for NoAnswer {
    fn from(e: DhtError) -> Self {
        Self::Refused(e.to_string())
    }
}

/// Names an outbound request.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RequestId(pub u64);

/// Names a query (a lookup, get or put).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct QueryId(pub u64);

/// What a query was for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum QueryKind {
    /// Joining: a lookup of our own key.
    Bootstrap,
    /// A bucket refresh.
    Refresh,
    /// A node lookup asked for.
    FindNode,
    /// A get.
    Get,
    /// A put.
    Put,
    /// A put again, on the republish timer.
    Republish,
}

/// How a query ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Outcome {
    /// What it was.
    pub kind: QueryKind,
    /// The target key.
    pub target: Key,
    /// The k closest peers that answered.
    pub closest: Vec<Contact>,
    /// Records found (gets), one per publisher, including this node's own store.
    pub records: Vec<Record>,
    /// Peers that stored the record (puts).
    pub stored: usize,
    /// Lookup rounds.
    pub rounds: u32,
    /// Peers asked.
    pub queried: usize,
    /// Peers that failed or timed out.
    pub failed: usize,
    /// Answers dropped because they broke the protocol (bad records, wrong kinds).
    pub rejected: usize,
}

/// What the caller must do.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Output {
    /// Send `request` to `to` and report the answer with [`Kademlia::handle_response`].
    Send {
        /// The request's id.
        id: RequestId,
        /// The peer.
        to: Contact,
        /// The request.
        request: Request,
    },
    /// A query ended.
    Done {
        /// Which.
        query: QueryId,
        /// How.
        outcome: Outcome,
    },
}

/// Peers heard of outside the DHT that may wait for their first answer: four buckets' worth.
/// Past it the oldest is forgotten, so a flood of referrals cannot grow the node.
pub const MAX_CANDIDATES: usize = 80;

#[derive(Clone, Copy, Debug)]
enum Purpose {
    Lookup(QueryId),
    Store(QueryId),
    Liveness,
    /// The first ping of a peer heard of outside the DHT.
    Candidate,
}

#[derive(Clone, Debug)]
struct Pending {
    to: Contact,
    deadline_ms: u64,
    purpose: Purpose,
}

#[derive(Clone, Debug)]
enum Phase {
    Lookup,
    Storing { outstanding: usize },
}

#[derive(Clone, Debug)]
struct Query {
    kind: QueryKind,
    lookup: Lookup,
    get: Option<RecordKey>,
    put: Option<Record>,
    phase: Phase,
    stored: usize,
    rejected: usize,
}

/// One node's Kademlia.
#[derive(Debug)]
pub struct Kademlia<R> {
    config: Config,
    local: Contact,
    mode: Mode,
    table: RoutingTable,
    store: RecordStore,
    rng: R,
    queries: HashMap<QueryId, Query>,
    pending: HashMap<RequestId, Pending>,
    candidates: Vec<Contact>,
    outputs: VecDeque<Output>,
    next_id: u64,
    published: HashMap<(Key, PublicKey), Record>,
    next_republish_ms: u64,
    next_refresh_ms: u64,
}

impl<R: Rng> Kademlia<R> {
    /// A node at `local`, taking part as `mode`, with an empty table.
    pub fn new(local: Contact, mode: Mode, config: Config, rng: R, now_ms: u64) -> Self {
        Self {
            table: RoutingTable::new(local.key, config.k, config.diversity),
            store: RecordStore::new(config.store),
            config,
            local,
            mode,
            rng,
            queries: HashMap::new(),
            pending: HashMap::new(),
            candidates: Vec::new(),
            outputs: VecDeque::new(),
            next_id: 0,
            published: HashMap::new(),
            next_republish_ms: now_ms + config.republish_ms,
            next_refresh_ms: now_ms + config.refresh_ms,
        }
    }

    /// This node.
    pub fn local(&self) -> Contact {
        self.local
    }

    /// How it takes part.
    pub fn mode(&self) -> Mode {
        self.mode
    }

    /// Its routing table.
    pub fn table(&self) -> &RoutingTable {
        &self.table
    }

    /// Its record store.
    pub fn store(&self) -> &RecordStore {
        &self.store
    }

    /// Its tunables.
    pub fn config(&self) -> &Config {
        &self.config
    }

    fn next_id(&mut self) -> u64 {
        self.next_id += 1;
        self.next_id
    }

    /// A peer vouched for outside the DHT (the simulator's warm start, a test): it enters the
    /// table as if it had just answered.
    pub fn add_contact(&mut self, contact: Contact, now_ms: u64) -> Observed {
        self.observe(contact, now_ms)
    }

    /// A peer heard of from a source that cannot vouch for it: a referral, the LAN, a
    /// tracker's list. It is pinged and enters the table once it answers (the caller checks
    /// that the answer comes from its key); meanwhile it seeds lookups. A key already in the
    /// table keeps its address, so a lying source cannot move it.
    pub fn add_candidate(&mut self, contact: Contact, now_ms: u64) {
        let known = contact.key == self.local.key
            || self.table.contains(&contact.key)
            || self.candidates.iter().any(|c| c.key == contact.key);
        if known {
            return;
        }
        if self.candidates.len() >= MAX_CANDIDATES {
            self.candidates.remove(0);
        }
        self.candidates.push(contact);
        self.send(contact, Request::Ping, Purpose::Candidate, now_ms);
    }

    /// Peers heard of and not yet answering.
    pub fn candidates(&self) -> &[Contact] {
        &self.candidates
    }

    fn observe(&mut self, contact: Contact, now_ms: u64) -> Observed {
        let observed = self.table.observe(contact, now_ms);
        if let Observed::Full { ping } = observed {
            self.send(ping, Request::Ping, Purpose::Liveness, now_ms);
        }
        observed
    }

    fn send(&mut self, to: Contact, request: Request, purpose: Purpose, now_ms: u64) {
        let id = RequestId(self.next_id());
        self.pending.insert(
            id,
            Pending {
                to,
                deadline_ms: now_ms + self.config.request_timeout_ms,
                purpose,
            },
        );
        self.outputs.push_back(Output::Send { id, to, request });
    }

    fn start(
        &mut self,
        kind: QueryKind,
        target: Key,
        get: Option<RecordKey>,
        put: Option<Record>,
        now_ms: u64,
    ) -> QueryId {
        let id = QueryId(self.next_id());
        self.table.touch(&target, now_ms);
        let mut seeds = self.table.closest(&target, self.config.k);
        seeds.extend(self.candidates.iter().copied());
        let quorum = get.as_ref().map(|_| self.config.quorum.max(1));
        let lookup = Lookup::new(
            target,
            self.local.key,
            seeds,
            self.config.k,
            self.config.alpha,
            self.config.disjoint_paths,
            quorum,
        );
        self.queries.insert(
            id,
            Query {
                kind,
                lookup,
                get,
                put,
                phase: Phase::Lookup,
                stored: 0,
                rejected: 0,
            },
        );
        self.drive(id, now_ms);
        id
    }

    /// Joins: looks up our own key, which fills the buckets near us and tells our neighbours
    /// about us.
    pub fn bootstrap(&mut self, now_ms: u64) -> QueryId {
        let target = self.local.key;
        self.start(QueryKind::Bootstrap, target, None, None, now_ms)
    }

    /// Finds the k peers closest to `target`.
    pub fn find_node(&mut self, target: Key, now_ms: u64) -> QueryId {
        self.start(QueryKind::FindNode, target, None, None, now_ms)
    }

    /// Finds the records under `key`.
    pub fn get(&mut self, key: RecordKey, now_ms: u64) -> QueryId {
        let target = key.key();
        self.start(QueryKind::Get, target, Some(key), None, now_ms)
    }

    /// Stores `record` at the k peers closest to its key (and here, for a server), and puts it
    /// again every republish interval until it expires. A newer record from the same publisher
    /// under the same key takes its place.
    pub fn put(&mut self, record: Record, now_ms: u64) -> Result<QueryId, RecordError> {
        record.verify(now_ms)?;
        let target = record.key.key();
        if self.mode == Mode::Server {
            let _ = self.store.put(record.clone(), None, now_ms);
        }
        self.published
            .insert((target, record.publisher), record.clone());
        Ok(self.start(QueryKind::Put, target, None, Some(record), now_ms))
    }

    /// Stops republishing `publisher`'s record under `key` and drops it here; copies elsewhere
    /// live until they expire.
    pub fn withdraw(&mut self, key: &RecordKey, publisher: &PublicKey) {
        let target = key.key();
        self.published.remove(&(target, *publisher));
        self.store.remove(&target, publisher);
    }

    /// Answers an inbound request. `sender` is the peer as a server, `None` for a client: only
    /// servers are put in the routing table. `origin` is the address the request came from,
    /// which stores are counted against (`None` when unknown, as through a relay).
    pub fn handle_request(
        &mut self,
        sender: Option<Contact>,
        origin: Option<IpAddr>,
        request: Request,
        now_ms: u64,
    ) -> Result<Response, DhtError> {
        if self.mode == Mode::Client {
            return Err(DhtError::NotServing);
        }
        if let Some(sender) = sender {
            self.observe(sender, now_ms);
        }
        let exclude = sender.map(|s| s.key);
        let closer = |table: &RoutingTable, target: &Key, k: usize| {
            let mut closest = table.closest(target, k + 1);
            closest.retain(|c| Some(c.key) != exclude);
            closest.truncate(k);
            closest
        };
        match request {
            Request::Ping => Ok(Response::Pong),
            Request::FindNode { target } => Ok(Response::Nodes {
                closer: closer(&self.table, &target, self.config.k),
                records: Vec::new(),
            }),
            Request::FindValue { key } => {
                let target = key.key();
                Ok(Response::Nodes {
                    closer: closer(&self.table, &target, self.config.k),
                    records: self.store.get(&target, now_ms),
                })
            }
            Request::Store { record } => {
                record.verify(now_ms).map_err(StoreError::from)?;
                self.check_closest(&record, exclude)?;
                // A stranger's store always counts against a network; callers the limits
                // cannot place share one. Only this node's own entries count against none.
                let origin = origin.and_then(|ip| self.config.diversity.prefix(ip));
                let origin = Some(origin.unwrap_or(Prefix::Local));
                match self.store.put_verified(record, origin, now_ms) {
                    // The publisher's newer entry is here already, which is what its put wants:
                    // a store that raced the publisher's next announcement is not a failure.
                    Ok(()) | Err(StoreError::Stale { .. }) => Ok(Response::Stored),
                    Err(e) => Err(e.into()),
                }
            }
        }
    }

    /// Refuses a record whose key has `k` known nodes closer than this one (the sender aside,
    /// since a publisher stores at the k closest other than itself): storing only what it is
    /// responsible for keeps a node from being filled with records of the whole key space.
    fn check_closest(&self, record: &Record, sender: Option<Key>) -> Result<(), DhtError> {
        let target = record.key.key();
        let ours = target.distance(&self.local.key);
        let k = self.config.k;
        let closer = self
            .table
            .closest(&target, k + 1)
            .iter()
            .filter(|c| Some(c.key) != sender && target.distance(&c.key) < ours)
            .count();
        if closer >= k {
            return Err(DhtError::NotClosest {
                key: record.key.to_string(),
                k,
            });
        }
        Ok(())
    }

    /// Delivers the answer to an outbound request: a response, or why it failed (an error
    /// reply, a broken connection, a timeout the caller noticed). Unknown ids are ignored.
    pub fn handle_response(
        &mut self,
        id: RequestId,
        result: Result<Response, NoAnswer>,
        now_ms: u64,
    ) {
        let Some(pending) = self.pending.remove(&id) else {
            return;
        };
        // A candidate that answered is in the table now; one that failed is forgotten.
        self.candidates.retain(|c| c.key != pending.to.key);
        match &result {
            Ok(_) => {
                self.observe(pending.to, now_ms);
            }
            Err(_) => {
                self.table.failed(&pending.to.key);
            }
        }
        match pending.purpose {
            Purpose::Liveness | Purpose::Candidate => {}
            Purpose::Lookup(qid) => self.on_lookup_answer(qid, &pending.to.key, result, now_ms),
            Purpose::Store(qid) => {
                let Some(query) = self.queries.get_mut(&qid) else {
                    return;
                };
                if matches!(result, Ok(Response::Stored)) {
                    query.stored += 1;
                }
                if let Phase::Storing { outstanding } = &mut query.phase {
                    *outstanding -= 1;
                }
                self.drive(qid, now_ms);
            }
        }
    }

    /// A lookup's answer from `from`: closer contacts to ask next, records that are the one
    /// wanted and verify (others counted as rejected), or a failure.
    fn on_lookup_answer(
        &mut self,
        qid: QueryId,
        from: &Key,
        result: Result<Response, NoAnswer>,
        now_ms: u64,
    ) {
        let Some(query) = self.queries.get_mut(&qid) else {
            return;
        };
        match result {
            Ok(Response::Nodes { closer, records }) => {
                let mut good = Vec::new();
                for r in records {
                    let wanted = query.get.as_ref() == Some(&r.key);
                    if wanted && r.verify(now_ms).is_ok() {
                        good.push(r);
                    } else {
                        query.rejected += 1;
                    }
                }
                let closer: Vec<_> = closer
                    .into_iter()
                    .filter(|c| c.key != self.local.key && c.addr.port() != 0)
                    .take(self.config.k)
                    .collect();
                query.lookup.on_answer(from, closer, good);
            }
            Ok(_) => {
                query.rejected += 1;
                query.lookup.on_failure(from);
            }
            Err(_) => query.lookup.on_failure(from),
        }
        self.drive(qid, now_ms);
    }

    fn drive(&mut self, qid: QueryId, now_ms: u64) {
        let Some(query) = self.queries.get_mut(&qid) else {
            return;
        };
        match query.phase {
            Phase::Lookup => {
                if !query.lookup.is_done() {
                    let ask = query.lookup.next();
                    let request = match &query.get {
                        Some(key) => Request::FindValue { key: key.clone() },
                        None => Request::FindNode {
                            target: query.lookup.target(),
                        },
                    };
                    let stuck = ask.is_empty() && query.lookup.in_flight() == 0;
                    for to in ask {
                        self.send(to, request.clone(), Purpose::Lookup(qid), now_ms);
                    }
                    if !stuck {
                        return;
                    }
                }
                let query = self.queries.get_mut(&qid).expect("present");
                if let Some(record) = query.put.clone() {
                    let targets = query.lookup.closest();
                    query.phase = Phase::Storing {
                        outstanding: targets.len(),
                    };
                    if !targets.is_empty() {
                        for to in targets {
                            let request = Request::Store {
                                record: record.clone(),
                            };
                            self.send(to, request, Purpose::Store(qid), now_ms);
                        }
                        return;
                    }
                }
                self.finish(qid, now_ms);
            }
            Phase::Storing { outstanding } => {
                if outstanding == 0 {
                    self.finish(qid, now_ms);
                }
            }
        }
    }

    fn finish(&mut self, qid: QueryId, now_ms: u64) {
        let Some(mut query) = self.queries.remove(&qid) else {
            return;
        };
        let mut records = query.lookup.take_records();
        if let Some(key) = &query.get {
            for r in self.store.get(&key.key(), now_ms) {
                merge(&mut records, r);
            }
        }
        let (queried, failed) = query.lookup.counts();
        // Requests still out belong to nobody now; their answers are ignored.
        self.pending.retain(
            |_, p| !matches!(p.purpose, Purpose::Lookup(q) | Purpose::Store(q) if q == qid),
        );
        self.outputs.push_back(Output::Done {
            query: qid,
            outcome: Outcome {
                kind: query.kind,
                target: query.lookup.target(),
                closest: query.lookup.closest(),
                records,
                stored: query.stored,
                rounds: query.lookup.rounds(),
                queried,
                failed,
                rejected: query.rejected,
            },
        });
    }

    /// Runs the timers due at `now_ms` (request timeouts, expiry, republishing, refresh) and
    /// returns everything the caller must do.
    pub fn poll(&mut self, now_ms: u64) -> Vec<Output> {
        let mut expired: Vec<RequestId> = self
            .pending
            .iter()
            .filter(|(_, p)| p.deadline_ms <= now_ms)
            .map(|(id, _)| *id)
            .collect();
        expired.sort();
        for id in expired {
            self.handle_response(id, Err(NoAnswer::TimedOut), now_ms);
        }
        if self.store.next_expiry().is_some_and(|t| t <= now_ms) {
            self.store.expire(now_ms);
        }
        if now_ms >= self.next_republish_ms {
            self.next_republish_ms = now_ms + self.config.republish_ms;
            self.published.retain(|_, r| r.expires_ms > now_ms);
            let mut again: Vec<Record> = self.published.values().cloned().collect();
            again.sort_by_key(|r| (r.key.to_string(), r.publisher.0));
            for record in again {
                let target = record.key.key();
                self.start(QueryKind::Republish, target, None, Some(record), now_ms);
            }
        }
        if now_ms >= self.next_refresh_ms {
            self.next_refresh_ms = now_ms + self.config.refresh_ms;
            if !self.table.is_empty() {
                for bucket in self.table.stale_buckets(now_ms, self.config.refresh_ms) {
                    let target = self.local.key.random_in_bucket(bucket, &mut self.rng);
                    self.start(QueryKind::Refresh, target, None, None, now_ms);
                }
            }
        }
        self.outputs.drain(..).collect()
    }

    /// Outputs queued since the last [`Kademlia::poll`], without running timers.
    pub fn drain(&mut self) -> Vec<Output> {
        self.outputs.drain(..).collect()
    }

    /// When [`Kademlia::poll`] next has work: now while outputs wait, else the earliest
    /// request deadline, record expiry, republish or refresh.
    pub fn next_wakeup(&self) -> u64 {
        if !self.outputs.is_empty() {
            return 0;
        }
        [
            Some(self.next_republish_ms),
            Some(self.next_refresh_ms),
            self.pending.values().map(|p| p.deadline_ms).min(),
            self.store.next_expiry(),
        ]
        .into_iter()
        .flatten()
        .min()
        .expect("the timers are always set")
    }

    /// Requests out.
    pub fn pending_requests(&self) -> usize {
        self.pending.len()
    }

    /// Queries under way.
    pub fn active_queries(&self) -> usize {
        self.queries.len()
    }
}
