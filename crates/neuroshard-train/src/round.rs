//! DiLoCo's exchange as a state machine with no IO: who is admitted, who sends and who waits,
//! what a replica's call is answered, when a round closes and with which contributions, and
//! when a replica is behind and must catch up instead.
//!
//! A node keeps one [`Mailbox`] per trained stage. Its driver (`node/outer.rs`) signs, sends,
//! waits and aggregates; every decision is made here:
//!
//! - [`Mailbox::post`]: the node's own contribution to the round in progress is ready.
//! - [`Mailbox::plan`]: of each pair of replicas that have met, the one with the lower key
//!   sends and the other waits for it, so each contribution crosses once each way; a replica
//!   not met yet is sent to.
//! - [`Mailbox::ask`]: a replica's call. Its contribution is kept when it is for the round in
//!   progress and its key is admitted; it is answered with this node's contribution for the
//!   round it asks (the current one once posted, or the one before for a late asker), or told
//!   to wait, or told the round this node is in.
//! - [`Gathered::reply`]: what a reply brought: a contribution, or news that the replica is
//!   further ahead.
//! - [`Mailbox::close`]: the round's contributions, deduplicated by key and in key order, so
//!   two replicas that heard the same contributions land on the same weights; or, when a
//!   replica is ahead, [`Close::CatchUp`] from it.

use std::collections::BTreeMap;

/// A replica's signing key, by which contributions are deduplicated and ordered.
pub type Key = [u8; 32];

/// Contributions of the round in progress, shared between the node's own sync and the
/// replicas' calls.
#[derive(Debug, Clone)]
pub struct Mailbox<C> {
    round: u64,
    /// This node's contribution to `round`, once it has reached the round's end.
    mine: Option<C>,
    /// Its contribution to the round before, for replicas that ask late.
    previous: Option<(u64, C)>,
    /// Other replicas' contributions to `round`, by key.
    received: BTreeMap<Key, C>,
}

impl<C> Default for Mailbox<C> {
    fn default() -> Self {
        Self {
            round: 0,
            mine: None,
            previous: None,
            received: BTreeMap::new(),
        }
    }
}

/// What a replica's call is answered.
#[derive(Debug, Clone, PartialEq)]
pub enum Answer<C> {
    /// Reply now: this node is in `round`, with its contribution to the round asked if it has
    /// one.
    Now {
        /// The round this node is in.
        round: u64,
        /// Its contribution to the round the caller asked for.
        contribution: Option<C>,
    },
    /// This node is still in the round's inner steps: ask again once it posts (or when the
    /// caller's patience runs out, answer `Now` with no contribution).
    Wait,
}

/// Whom a node sends its contribution to when it reaches the end of a round, and whom it waits
/// for.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Plan<A> {
    /// Send now.
    pub send: Vec<A>,
    /// Wait for their calls (replicas met before, with a lower key); send to those still
    /// missing after the timeout.
    pub wait_for: Vec<(A, Key)>,
}

/// What a node's sends brought back.
#[derive(Debug, Clone)]
pub struct Gathered<A, C> {
    /// Contributions from replies, by key.
    pub contributions: BTreeMap<Key, C>,
    /// The furthest round a replica said it is in, past this node's, and where.
    pub ahead: Option<(u64, A)>,
}

impl<A, C> Default for Gathered<A, C> {
    fn default() -> Self {
        Self {
            contributions: BTreeMap::new(),
            ahead: None,
        }
    }
}

impl<A, C> Gathered<A, C> {
    /// A reply from `addr`: the round it is in, and its checked contribution to this node's
    /// round `mine`, if it sent one.
    pub fn reply(&mut self, mine: u64, addr: A, round: u64, contribution: Option<(Key, C)>) {
        match contribution {
            Some((key, c)) => {
                self.contributions.insert(key, c);
            }
            None if round > mine && self.ahead.as_ref().is_none_or(|(r, _)| round > *r) => {
                self.ahead = Some((round, addr));
            }
            None => {}
        }
    }
}

/// How a round ends.
#[derive(Debug, Clone, PartialEq)]
pub enum Close<A, C> {
    /// Aggregate these contributions (this node's among them), in key order, and step.
    Aggregate(Vec<C>),
    /// A replica is further ahead: take its weights for its round instead.
    CatchUp {
        /// Its round.
        round: u64,
        /// Where it is.
        from: A,
    },
}

impl<C: Clone> Mailbox<C> {
    /// The round in progress.
    pub fn round(&self) -> u64 {
        self.round
    }

    /// Whether this node's contribution to the round is posted.
    pub fn posted(&self) -> bool {
        self.mine.is_some()
    }

    /// Moves to `round`, keeping this node's last contribution for late askers.
    pub fn enter(&mut self, round: u64) {
        if let Some(mine) = self.mine.take() {
            self.previous = Some((self.round, mine));
        }
        self.round = round;
        self.received.clear();
    }

    /// This node reached the end of the round: its contribution is `mine`.
    pub fn post(&mut self, mine: C) {
        self.mine = Some(mine);
    }

    /// Whom to send to and whom to wait for, of `replicas` (where each is, and its key if met
    /// before), for a node whose key is `own`.
    pub fn plan<A>(
        &self,
        own: &Key,
        replicas: impl IntoIterator<Item = (A, Option<Key>)>,
    ) -> Plan<A> {
        let mut plan = Plan {
            send: Vec::new(),
            wait_for: Vec::new(),
        };
        for (addr, key) in replicas {
            match key {
                // Its call came already, and got this node's contribution in the reply.
                Some(k) if self.received.contains_key(&k) => {}
                Some(k) if k < *own => plan.wait_for.push((addr, k)),
                _ => plan.send.push(addr),
            }
        }
        plan
    }

    /// Whether every key in `keys` has called with its contribution.
    pub fn heard(&self, keys: &[Key]) -> bool {
        keys.iter().all(|k| self.received.contains_key(k))
    }

    /// A replica's call for `round`, carrying its contribution (`None` for a probe); `admitted`:
    /// its key serves the same layers as far as this node knows; `may_wait`: the caller can be
    /// kept waiting (there is room, and it is not a probe). Returns whether the contribution
    /// was kept, and the answer.
    pub fn ask(
        &mut self,
        round: u64,
        theirs: Option<(Key, &C)>,
        admitted: bool,
        may_wait: bool,
    ) -> (bool, Answer<C>) {
        let mut kept = false;
        if let Some((key, c)) = theirs
            && round == self.round
            && admitted
            && !self.received.contains_key(&key)
        {
            self.received.insert(key, c.clone());
            kept = true;
        }
        let contribution = match (&self.mine, &self.previous) {
            (Some(mine), _) if round == self.round => Some(mine.clone()),
            (_, Some((r, previous))) if *r == round => Some(previous.clone()),
            _ => None,
        };
        // A probe, a caller in another round, no room to wait, or the answer is ready.
        let answer = if !may_wait || round != self.round || contribution.is_some() {
            Answer::Now {
                round: self.round,
                contribution,
            }
        } else {
            Answer::Wait
        };
        (kept, answer)
    }

    /// Ends the round: catch up from a replica that is ahead, or aggregate this node's
    /// contribution (`own`, its key `key`) with every one the replies and the calls brought,
    /// one per key, in key order. Once the step is taken the driver moves the mailbox on with
    /// [`Mailbox::enter`].
    pub fn close<A>(&self, key: Key, own: C, gathered: Gathered<A, C>) -> Close<A, C> {
        if let Some((round, from)) = gathered.ahead {
            return Close::CatchUp { round, from };
        }
        let mut all = gathered.contributions;
        for (k, c) in &self.received {
            all.entry(*k).or_insert_with(|| c.clone());
        }
        all.insert(key, own);
        Close::Aggregate(all.into_values().collect())
    }
}

#[cfg(test)]
mod tests;
