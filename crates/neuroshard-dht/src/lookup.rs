//! One iterative lookup: the candidates closest to a target, α queries in flight per path, and
//! the termination rule (the k closest live candidates have all answered, or there is no one
//! left to ask). With several disjoint paths each candidate belongs to the one path that learned
//! of it first, so a peer that lies can mislead only its own path.

use crate::key::{Distance, Key};
use crate::record::Record;
use crate::table::Contact;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    Waiting,
    InFlight,
    Answered,
    Failed,
}

#[derive(Clone, Debug)]
struct Candidate {
    contact: Contact,
    distance: Distance,
    state: State,
    path: usize,
    /// 1 for contacts from our own table; a contact learned from a depth-d answer has d + 1.
    depth: u32,
}

/// A lookup in progress.
#[derive(Clone, Debug)]
pub(crate) struct Lookup {
    target: Key,
    local: Key,
    k: usize,
    alpha: usize,
    paths: usize,
    /// Sorted by distance to the target; one entry per key.
    candidates: Vec<Candidate>,
    records: Vec<Record>,
    holders: usize,
    quorum: Option<usize>,
    found_at: Option<u32>,
    queried: usize,
    failed: usize,
}

impl Lookup {
    /// A lookup for `target` starting from `seeds`, spread over `paths` disjoint paths. With a
    /// `quorum` it ends once that many peers have answered with records.
    pub fn new(
        target: Key,
        local: Key,
        seeds: Vec<Contact>,
        k: usize,
        alpha: usize,
        paths: usize,
        quorum: Option<usize>,
    ) -> Self {
        let mut lookup = Self {
            target,
            local,
            k,
            alpha: alpha.max(1),
            paths: paths.max(1),
            candidates: Vec::new(),
            records: Vec::new(),
            holders: 0,
            quorum,
            found_at: None,
            queried: 0,
            failed: 0,
        };
        let mut seeds = seeds;
        seeds.sort_by_key(|c| target.distance(&c.key));
        for (i, c) in seeds.into_iter().enumerate() {
            lookup.insert(c, i % lookup.paths, 1);
        }
        lookup
    }

    fn insert(&mut self, contact: Contact, path: usize, depth: u32) {
        if contact.key == self.local {
            return;
        }
        let distance = self.target.distance(&contact.key);
        match self
            .candidates
            .binary_search_by_key(&distance, |c| c.distance)
        {
            Ok(_) => {} // known already, on whichever path found it first
            Err(at) => self.candidates.insert(
                at,
                Candidate {
                    contact,
                    distance,
                    state: State::Waiting,
                    path,
                    depth,
                },
            ),
        }
    }

    fn position(&self, key: &Key) -> Option<usize> {
        let distance = self.target.distance(key);
        self.candidates
            .binary_search_by_key(&distance, |c| c.distance)
            .ok()
    }

    /// The contacts to ask now; they are marked in flight.
    pub fn next(&mut self) -> Vec<Contact> {
        if self.found() {
            return Vec::new();
        }
        let mut out = Vec::new();
        for path in 0..self.paths {
            let mut in_flight = self
                .candidates
                .iter()
                .filter(|c| c.path == path && c.state == State::InFlight)
                .count();
            let mut live = 0;
            for c in self.candidates.iter_mut().filter(|c| c.path == path) {
                if in_flight >= self.alpha || live >= self.k {
                    break;
                }
                match c.state {
                    State::Failed => continue,
                    State::Waiting => {
                        c.state = State::InFlight;
                        in_flight += 1;
                        self.queried += 1;
                        out.push(c.contact);
                    }
                    State::InFlight | State::Answered => {}
                }
                live += 1;
            }
        }
        out
    }

    /// `from` answered with contacts closer to the target and, for a value lookup, records.
    pub fn on_answer(&mut self, from: &Key, closer: Vec<Contact>, records: Vec<Record>) {
        let Some(i) = self.position(from) else {
            return;
        };
        if self.candidates[i].state != State::InFlight {
            return;
        }
        self.candidates[i].state = State::Answered;
        let (path, depth) = (self.candidates[i].path, self.candidates[i].depth);
        for c in closer.into_iter().take(self.k) {
            self.insert(c, path, depth + 1);
        }
        if !records.is_empty() {
            self.holders += 1;
            for r in records {
                merge(&mut self.records, r);
            }
            if self.found() && self.found_at.is_none() {
                self.found_at = Some(depth);
            }
        }
    }

    /// A query to `from` failed or timed out.
    pub fn on_failure(&mut self, from: &Key) {
        if let Some(i) = self.position(from)
            && self.candidates[i].state == State::InFlight
        {
            self.candidates[i].state = State::Failed;
            self.failed += 1;
        }
    }

    fn found(&self) -> bool {
        self.quorum.is_some_and(|q| self.holders >= q)
    }

    /// A path is done when none of its k closest live candidates is left to ask or still
    /// out: they have all answered (or, short of k, everyone known has).
    fn path_done(&self, path: usize) -> bool {
        !self
            .candidates
            .iter()
            .filter(|c| c.path == path && c.state != State::Failed)
            .take(self.k)
            .any(|c| matches!(c.state, State::Waiting | State::InFlight))
    }

    /// Whether the lookup has ended.
    pub fn is_done(&self) -> bool {
        self.found() || (0..self.paths).all(|p| self.path_done(p))
    }

    /// Whether queries are still out.
    pub fn in_flight(&self) -> usize {
        self.candidates
            .iter()
            .filter(|c| c.state == State::InFlight)
            .count()
    }

    /// The k closest candidates that answered, closest first.
    fn answered(&self) -> impl Iterator<Item = &Candidate> {
        self.candidates
            .iter()
            .filter(|c| c.state == State::Answered)
            .take(self.k)
    }

    /// The k closest contacts that answered, closest first.
    pub fn closest(&self) -> Vec<Contact> {
        self.answered().map(|c| c.contact).collect()
    }

    /// Rounds the lookup took: the depth of the answer that found the value, or for a node
    /// lookup the deepest of the k closest answers.
    pub fn rounds(&self) -> u32 {
        self.found_at
            .unwrap_or_else(|| self.answered().map(|c| c.depth).max().unwrap_or(0))
    }

    /// Records found, one per publisher.
    pub fn take_records(&mut self) -> Vec<Record> {
        std::mem::take(&mut self.records)
    }

    /// Peers asked, and how many of them failed.
    pub fn counts(&self) -> (usize, usize) {
        (self.queried, self.failed)
    }

    /// The target.
    pub fn target(&self) -> Key {
        self.target
    }
}

/// Adds `record` to `records`, keeping one entry per key and publisher: the one that expires
/// last.
pub(crate) fn merge(records: &mut Vec<Record>, record: Record) {
    match records
        .iter_mut()
        .find(|r| r.publisher == record.publisher && r.key == record.key)
    {
        Some(old) if old.expires_ms < record.expires_ms => *old = record,
        Some(_) => {}
        None => records.push(record),
    }
}
