//! A seeded, single-threaded simulator that runs the same [`Kademlia`] state machine for
//! thousands of nodes over a simulated network with latency, churn and Sybil adversaries.
//!
//! Tables start warm, as in a network that has run for a while: each node's buckets are filled
//! from the true population (through [`crate::RoutingTable::observe`], so the diversity limits
//! apply). Then some nodes join through the protocol, records are put, a share of the nodes go
//! offline without a word, and gets run from live honest nodes.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, HashSet};
use std::net::{Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use neuroshard_base::NodeKey;
use rand::seq::index::sample;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::kad::{
    Config, Kademlia, Mode, NoAnswer, Outcome, Output, QueryId, QueryKind, Request, RequestId,
    Response,
};
use crate::key::Key;
use crate::record::{Record, RecordKey};
use crate::table::Contact;

/// The simulated clock starts here (ms since the epoch), so record expiry reads naturally.
const EPOCH_MS: u64 = 1_800_000_000_000;

/// What to simulate.
#[derive(Clone, Debug)]
pub struct SimConfig {
    /// Nodes, Sybils included.
    pub nodes: usize,
    /// Of those, nodes that join through the protocol after the others are warm.
    pub joins: usize,
    /// The seed; the same seed gives the same run.
    pub seed: u64,
    /// One-way latency, uniform in this range, ms.
    pub latency_ms: (u64, u64),
    /// Share of honest nodes that go offline after the puts, without a word.
    pub churn: f64,
    /// Share of nodes that are Sybils from one /16: they answer lookups with each other,
    /// never with records, and acknowledge stores they drop.
    pub sybils: f64,
    /// Records put.
    pub records: usize,
    /// Gets run.
    pub gets: usize,
    /// The protocol's tunables.
    pub kad: Config,
}

impl Default for SimConfig {
    fn default() -> Self {
        Self {
            nodes: 10_000,
            joins: 100,
            seed: 1,
            latency_ms: (10, 150),
            churn: 0.0,
            sybils: 0.0,
            records: 200,
            gets: 1_000,
            kad: Config {
                request_timeout_ms: 2_000,
                ..Config::default()
            },
        }
    }
}

/// What a run measured.
#[derive(Clone, Debug)]
pub struct SimReport {
    /// Nodes simulated.
    pub nodes: usize,
    /// Lookups run (joins, puts, gets).
    pub lookups: usize,
    /// Gets that found the record.
    pub get_success: f64,
    /// Rounds of the successful gets: median and 99th percentile.
    pub rounds_p50: u32,
    /// See `rounds_p50`.
    pub rounds_p99: u32,
    /// Simulated get latency, ms: median and 99th percentile.
    pub get_ms_p50: u64,
    /// See `get_ms_p50`.
    pub get_ms_p99: u64,
    /// Peers that acknowledged each put, on average.
    pub stored_mean: f64,
    /// Messages delivered.
    pub messages: u64,
    /// Wall time spent running lookups (not building the warm tables).
    pub wall: Duration,
    /// Lookups per second of wall time.
    pub lookups_per_s: f64,
    /// Routing-table entries over all nodes.
    pub table_entries: usize,
}

#[derive(Debug)]
enum Event {
    Deliver {
        to: usize,
        from: usize,
        id: RequestId,
        request: Request,
    },
    Reply {
        to: usize,
        id: RequestId,
        result: Result<Response, NoAnswer>,
    },
    Wake(usize),
}

struct SimNode {
    kad: Kademlia<ChaCha8Rng>,
    sybil: bool,
    online: bool,
    wake_at: u64,
}

/// The simulator.
pub struct Simulator {
    config: SimConfig,
    rng: ChaCha8Rng,
    nodes: Vec<SimNode>,
    index: HashMap<Key, usize>,
    /// Sybil contacts, to answer with the closest ones.
    sybils: Vec<Contact>,
    now: u64,
    queue: BinaryHeap<Reverse<(u64, u64)>>,
    events: HashMap<u64, Event>,
    seq: u64,
    done: HashMap<(usize, QueryId), (Outcome, u64)>,
    open: HashSet<(usize, QueryId)>,
    messages: u64,
}

fn public_ipv4(rng: &mut impl Rng) -> Ipv4Addr {
    loop {
        let ip = Ipv4Addr::from(rng.random::<u32>());
        let o = ip.octets();
        if !(ip.is_private()
            || ip.is_loopback()
            || ip.is_link_local()
            || ip.is_multicast()
            || ip.is_broadcast()
            || ip.is_unspecified()
            || o[0] == 0
            || o[0] >= 224
            || (o[0] == 45 && o[1] == 77))
        {
            return ip;
        }
    }
}

impl Simulator {
    /// Builds the population with warm tables.
    pub fn new(config: SimConfig) -> Self {
        let mut rng = ChaCha8Rng::seed_from_u64(config.seed);
        let sybil_count = (config.nodes as f64 * config.sybils).round() as usize;
        let mut nodes = Vec::with_capacity(config.nodes);
        let mut index = HashMap::new();
        let mut sybils = Vec::new();
        for i in 0..config.nodes {
            let sybil = i < sybil_count;
            let ip = if sybil {
                // One /16: 45.77.0.0/16.
                Ipv4Addr::new(45, 77, rng.random(), rng.random())
            } else {
                public_ipv4(&mut rng)
            };
            let contact = Contact {
                key: Key::random(&mut rng),
                addr: SocketAddr::new(ip.into(), 7420),
            };
            let node_rng = ChaCha8Rng::seed_from_u64(rng.random());
            index.insert(contact.key, i);
            if sybil {
                sybils.push(contact);
            }
            nodes.push(SimNode {
                kad: Kademlia::new(contact, Mode::Server, config.kad, node_rng, EPOCH_MS),
                sybil,
                online: true,
                wake_at: u64::MAX,
            });
        }
        let mut sim = Self {
            config,
            rng,
            nodes,
            index,
            sybils,
            now: EPOCH_MS,
            queue: BinaryHeap::new(),
            events: HashMap::new(),
            seq: 0,
            done: HashMap::new(),
            open: HashSet::new(),
            messages: 0,
        };
        sim.warm_tables();
        sim
    }

    /// Fills every warm node's buckets from the true population: for each bucket, up to 2k
    /// random members of its key range are offered to the table.
    fn warm_tables(&mut self) {
        let warm = self.config.nodes - self.config.joins.min(self.config.nodes);
        let mut sorted: Vec<Contact> = (0..warm).map(|i| self.nodes[i].kad.local()).collect();
        sorted.sort_by_key(|c| c.key);
        let k = self.config.kad.k;
        for i in 0..warm {
            let local = self.nodes[i].kad.local().key;
            for bucket in 0..256 {
                let lead = 255 - bucket;
                let (mut lo, mut hi) = (local.0, local.0);
                lo[lead / 8] ^= 0x80 >> (lead % 8);
                hi[lead / 8] ^= 0x80 >> (lead % 8);
                for bit in lead + 1..256 {
                    lo[bit / 8] &= !(0x80 >> (bit % 8));
                    hi[bit / 8] |= 0x80 >> (bit % 8);
                }
                let start = sorted.partition_point(|c| c.key.0 < lo);
                let end = sorted.partition_point(|c| c.key.0 <= hi);
                if start >= end {
                    continue;
                }
                let range = &sorted[start..end];
                let picks: Vec<usize> = if range.len() <= 2 * k {
                    (0..range.len()).collect()
                } else {
                    sample(&mut self.rng, range.len(), 2 * k).into_vec()
                };
                for p in picks {
                    self.nodes[i].kad.add_contact(range[p], EPOCH_MS);
                }
            }
            // Warming sends no pings: buckets fill to k and the rest wait as replacements.
            self.nodes[i].kad.drain();
        }
    }

    fn latency(&mut self) -> u64 {
        let (lo, hi) = self.config.latency_ms;
        self.rng.random_range(lo..=hi)
    }

    fn push(&mut self, at: u64, event: Event) {
        self.seq += 1;
        self.events.insert(self.seq, event);
        self.queue.push(Reverse((at, self.seq)));
    }

    fn take_outputs(&mut self, i: usize, outputs: Vec<Output>) {
        for output in outputs {
            match output {
                Output::Send { id, to, request } => {
                    if let Some(&j) = self.index.get(&to.key) {
                        let at = self.now + self.latency();
                        self.push(
                            at,
                            Event::Deliver {
                                to: j,
                                from: i,
                                id,
                                request,
                            },
                        );
                    }
                    // A contact nobody owns: the request times out.
                }
                Output::Done { query, outcome } => {
                    self.open.remove(&(i, query));
                    self.done.insert((i, query), (outcome, self.now));
                }
            }
        }
        self.schedule_wake(i);
    }

    fn schedule_wake(&mut self, i: usize) {
        let at = self.nodes[i].kad.next_wakeup().max(self.now);
        if at < self.nodes[i].wake_at {
            self.nodes[i].wake_at = at;
            self.push(at, Event::Wake(i));
        }
    }

    fn answer(&mut self, to: usize, from: usize, request: Request) -> Result<Response, NoAnswer> {
        if self.nodes[to].sybil {
            return Ok(match request {
                Request::Ping => Response::Pong,
                Request::Store { .. } => Response::Stored,
                Request::FindNode { target } => Response::Nodes {
                    closer: self.closest_sybils(&target),
                    records: Vec::new(),
                },
                Request::FindValue { key } => Response::Nodes {
                    closer: self.closest_sybils(&key.key()),
                    records: Vec::new(),
                },
            });
        }
        let sender = self.nodes[from].kad.local();
        let now = self.now;
        self.nodes[to]
            .kad
            .handle_request(Some(sender), Some(sender.addr.ip()), request, now)
            .map_err(NoAnswer::from)
    }

    /// The k Sybils closest to `target`, found with a bounded heap rather than a copy of all.
    fn closest_sybils(&self, target: &Key) -> Vec<Contact> {
        let k = self.config.kad.k;
        let mut best: BinaryHeap<(crate::key::Distance, usize)> = BinaryHeap::with_capacity(k + 1);
        for (i, c) in self.sybils.iter().enumerate() {
            best.push((target.distance(&c.key), i));
            if best.len() > k {
                best.pop();
            }
        }
        best.into_iter().map(|(_, i)| self.sybils[i]).collect()
    }

    /// Runs events until no query is under way anywhere (timers far in the future are left).
    fn run(&mut self, queries: &[(usize, QueryId)]) {
        self.open = queries
            .iter()
            .filter(|q| !self.done.contains_key(q))
            .copied()
            .collect();
        while !self.open.is_empty() {
            let Some(Reverse((at, seq))) = self.queue.pop() else {
                break;
            };
            let event = self.events.remove(&seq).expect("queued event");
            self.now = self.now.max(at);
            match event {
                Event::Deliver {
                    to,
                    from,
                    id,
                    request,
                } => {
                    if !self.nodes[to].online {
                        continue;
                    }
                    self.messages += 1;
                    let result = self.answer(to, from, request);
                    if !self.nodes[to].sybil {
                        let outputs = self.nodes[to].kad.drain();
                        self.take_outputs(to, outputs);
                    }
                    let at = self.now + self.latency();
                    self.push(
                        at,
                        Event::Reply {
                            to: from,
                            id,
                            result,
                        },
                    );
                }
                Event::Reply { to, id, result } => {
                    if !self.nodes[to].online {
                        continue;
                    }
                    self.messages += 1;
                    let now = self.now;
                    self.nodes[to].kad.handle_response(id, result, now);
                    let outputs = self.nodes[to].kad.drain();
                    self.take_outputs(to, outputs);
                }
                Event::Wake(i) => {
                    if self.nodes[i].wake_at != at || !self.nodes[i].online {
                        continue;
                    }
                    self.nodes[i].wake_at = u64::MAX;
                    let now = self.now;
                    let outputs = self.nodes[i].kad.poll(now);
                    self.take_outputs(i, outputs);
                }
            }
        }
    }

    fn honest_online(&mut self) -> usize {
        loop {
            let i = self.rng.random_range(0..self.nodes.len());
            if !self.nodes[i].sybil && self.nodes[i].online {
                return i;
            }
        }
    }

    /// Runs the scenario and reports.
    pub fn run_scenario(&mut self) -> SimReport {
        let started = Instant::now();
        let joins = self.join();
        self.run(&joins);
        let (puts, keys) = self.put();
        self.run(&puts);
        let stored: Vec<f64> = puts
            .iter()
            .filter_map(|q| self.done.get(q).map(|(o, _)| o.stored as f64))
            .collect();
        let stored_mean = stored.iter().sum::<f64>() / stored.len().max(1) as f64;
        self.churn();
        let gets = self.get(&keys);
        let queries: Vec<(usize, QueryId)> = gets.iter().map(|(q, _, _)| *q).collect();
        self.run(&queries);
        let lookups = joins.len() + puts.len() + gets.len();
        let mut report = self.report_gets(&gets);
        let wall = started.elapsed();
        report.lookups = lookups;
        report.stored_mean = stored_mean;
        report.wall = wall;
        report.lookups_per_s = lookups as f64 / wall.as_secs_f64().max(1e-9);
        report
    }

    /// The last `joins` nodes join through a random warm honest node; their bootstrap queries.
    fn join(&mut self) -> Vec<(usize, QueryId)> {
        let warm = self.config.nodes - self.config.joins.min(self.config.nodes);
        let mut joins = Vec::new();
        for i in warm..self.config.nodes {
            let via = loop {
                let j = self.rng.random_range(0..warm.max(1));
                if !self.nodes[j].sybil {
                    break j;
                }
            };
            let contact = self.nodes[via].kad.local();
            let now = self.now;
            self.nodes[i].kad.add_contact(contact, now);
            let q = self.nodes[i].kad.bootstrap(now);
            let outputs = self.nodes[i].kad.drain();
            self.take_outputs(i, outputs);
            joins.push((i, q));
        }
        joins
    }

    /// Random honest nodes put the scenario's records; their queries and the keys.
    fn put(&mut self) -> (Vec<(usize, QueryId)>, Vec<RecordKey>) {
        let mut puts = Vec::new();
        let mut keys = Vec::new();
        for r in 0..self.config.records {
            let i = self.honest_online();
            let signer = NodeKey::from_bytes(&self.rng.random());
            let key = RecordKey::Checkpoint(format!("sim-{r}"));
            let record = Record::sign(
                key.clone(),
                format!("value {r}").into_bytes(),
                self.now + 3_600_000,
                &signer,
            )
            .expect("small record");
            let now = self.now;
            let q = self.nodes[i].kad.put(record, now).expect("valid record");
            let outputs = self.nodes[i].kad.drain();
            self.take_outputs(i, outputs);
            puts.push((i, q));
            keys.push(key);
        }
        (puts, keys)
    }

    /// A share of the honest nodes vanish.
    fn churn(&mut self) {
        let honest: Vec<usize> = (0..self.nodes.len())
            .filter(|&i| !self.nodes[i].sybil)
            .collect();
        let gone = (honest.len() as f64 * self.config.churn).round() as usize;
        for p in sample(&mut self.rng, honest.len(), gone) {
            self.nodes[honest[p]].online = false;
        }
    }

    /// Live honest nodes get random records: each query, the key it wants and when it began.
    fn get(&mut self, keys: &[RecordKey]) -> Vec<((usize, QueryId), RecordKey, u64)> {
        let mut gets = Vec::new();
        for _ in 0..self.config.gets {
            if keys.is_empty() {
                break;
            }
            let i = self.honest_online();
            let key = keys[self.rng.random_range(0..keys.len())].clone();
            let now = self.now;
            let q = self.nodes[i].kad.get(key.clone(), now);
            let outputs = self.nodes[i].kad.drain();
            self.take_outputs(i, outputs);
            gets.push(((i, q), key, now));
        }
        gets
    }

    /// How the gets went: success rate, rounds and latency percentiles, and the swarm's
    /// totals. The caller fills in the scenario's lookups, stores and wall time.
    fn report_gets(&self, gets: &[((usize, QueryId), RecordKey, u64)]) -> SimReport {
        let mut rounds = Vec::new();
        let mut latencies = Vec::new();
        let mut found = 0;
        for (q, key, t0) in gets {
            if let Some((outcome, at)) = self.done.get(q) {
                debug_assert_eq!(outcome.kind, QueryKind::Get);
                if outcome.records.iter().any(|r| &r.key == key) {
                    found += 1;
                    rounds.push(u64::from(outcome.rounds));
                    latencies.push(at - t0);
                }
            }
        }
        rounds.sort_unstable();
        latencies.sort_unstable();
        let pct = |v: &[u64], p: f64| -> u64 {
            if v.is_empty() {
                return 0;
            }
            v[((v.len() - 1) as f64 * p).round() as usize]
        };
        SimReport {
            nodes: self.nodes.len(),
            lookups: 0,
            get_success: found as f64 / gets.len().max(1) as f64,
            rounds_p50: pct(&rounds, 0.5) as u32,
            rounds_p99: pct(&rounds, 0.99) as u32,
            get_ms_p50: pct(&latencies, 0.5),
            get_ms_p99: pct(&latencies, 0.99),
            stored_mean: 0.0,
            messages: self.messages,
            wall: Duration::ZERO,
            lookups_per_s: 0.0,
            table_entries: self.nodes.iter().map(|n| n.kad.table().len()).sum(),
        }
    }
}

/// Builds and runs one scenario.
pub fn simulate(config: SimConfig) -> SimReport {
    Simulator::new(config).run_scenario()
}
