//! Protocol tests over a small in-memory network, table properties, and the simulator's
//! figures at 10,000 nodes.

use std::collections::{HashMap, HashSet, VecDeque};
use std::net::SocketAddr;

use neuroshard_base::NodeKey;
use proptest::prelude::*;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

use crate::kad::{
    Config, DhtError, Kademlia, Mode, NoAnswer, Outcome, Output, QueryId, Request, Response,
};
use crate::key::Key;
use crate::record::{Record, RecordKey};
use crate::sim::{SimConfig, simulate};
use crate::store::StoreError;
use crate::table::{Contact, DiversityLimits, Observed, Refusal, RoutingTable};

const NOW: u64 = 1_800_000_000_000;

fn contact(rng: &mut ChaCha8Rng, ip: [u8; 4]) -> Contact {
    Contact {
        key: Key::random(rng),
        addr: SocketAddr::from((ip, 7420)),
    }
}

/// Nodes that deliver to each other at once, in order; offline nodes time out.
struct Net {
    nodes: Vec<Kademlia<ChaCha8Rng>>,
    index: HashMap<Key, usize>,
    offline: HashSet<usize>,
    done: HashMap<(usize, QueryId), Outcome>,
    /// Outputs a test took from a node (by polling it) that still need delivering.
    held: Vec<(usize, Output)>,
    now: u64,
}

impl Net {
    fn new(n: usize, seed: u64) -> Self {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let mut nodes = Vec::new();
        let mut index = HashMap::new();
        for i in 0..n {
            // A /24 of its own each, as nodes of the internet mostly are.
            let c = contact(&mut rng, [93, (i % 250) as u8, (i / 250) as u8, 1]);
            index.insert(c.key, i);
            let node_rng = ChaCha8Rng::seed_from_u64(i as u64);
            nodes.push(Kademlia::new(
                c,
                Mode::Server,
                Config::default(),
                node_rng,
                NOW,
            ));
        }
        let mut net = Self {
            nodes,
            index,
            offline: HashSet::new(),
            done: HashMap::new(),
            held: Vec::new(),
            now: NOW,
        };
        // Everyone joins through node 0.
        let first = net.nodes[0].local();
        for i in 1..n {
            net.nodes[i].add_contact(first, NOW);
            let q = net.nodes[i].bootstrap(NOW);
            net.settle(i, q);
        }
        net
    }

    /// Delivers everything until `query` on node `i` is done; returns its outcome.
    fn settle(&mut self, i: usize, query: QueryId) -> Outcome {
        let mut queue: VecDeque<(usize, Output)> = self.held.drain(..).collect();
        for (n, node) in self.nodes.iter_mut().enumerate() {
            queue.extend(node.drain().into_iter().map(|o| (n, o)));
        }
        loop {
            while let Some((from, output)) = queue.pop_front() {
                match output {
                    Output::Send { id, to, request } => {
                        let j = self.index[&to.key];
                        if self.offline.contains(&j) {
                            // Nobody answers; the requester's timer fires below.
                            continue;
                        }
                        let local = self.nodes[from].local();
                        let sender = (self.nodes[from].mode() == Mode::Server).then_some(local);
                        let origin = Some(local.addr.ip());
                        let result = self.nodes[j]
                            .handle_request(sender, origin, request, self.now)
                            .map_err(NoAnswer::from);
                        queue.extend(self.nodes[j].drain().into_iter().map(|o| (j, o)));
                        self.nodes[from].handle_response(id, result, self.now);
                        queue.extend(self.nodes[from].drain().into_iter().map(|o| (from, o)));
                    }
                    Output::Done { query, outcome } => {
                        self.done.insert((from, query), outcome);
                    }
                }
            }
            if let Some(outcome) = self.done.remove(&(i, query)) {
                return outcome;
            }
            // Only timeouts are left: jump to the next deadline.
            let next = (0..self.nodes.len())
                .filter(|n| !self.offline.contains(n))
                .filter(|&n| self.nodes[n].pending_requests() > 0)
                .map(|n| self.nodes[n].next_wakeup())
                .min()
                .expect("a query waits on a timer");
            self.now = self.now.max(next);
            for (n, node) in self.nodes.iter_mut().enumerate() {
                if !self.offline.contains(&n) {
                    queue.extend(node.poll(self.now).into_iter().map(|o| (n, o)));
                }
            }
        }
    }
}

#[test]
fn puts_and_gets_work_and_records_merge_across_publishers() {
    let mut net = Net::new(40, 1);
    for node in &net.nodes {
        assert_eq!(node.table().broken_invariant(), None);
        assert!(
            node.table().len() >= 20,
            "joined nodes know their neighbourhood"
        );
    }
    let key = RecordKey::Layer {
        model: "m".into(),
        index: 4,
    };
    let (a, b) = (NodeKey::generate(), NodeKey::generate());
    for (i, signer) in [(3, &a), (7, &b)] {
        let record = Record::sign(key.clone(), vec![i as u8], NOW + 60_000, signer).unwrap();
        let q = net.nodes[i].put(record, net.now).unwrap();
        let outcome = net.settle(i, q);
        assert_eq!(outcome.stored, 20, "stored at the k closest");
    }
    let q = net.nodes[30].get(key.clone(), net.now);
    let outcome = net.settle(30, q);
    let mut values: Vec<u8> = outcome.records.iter().map(|r| r.value[0]).collect();
    values.sort();
    // With quorum 1 the first holder answers; both providers are stored at the same k nodes.
    assert_eq!(values, [3, 7], "both providers' entries");
    assert!(outcome.rounds >= 1);
}

#[test]
fn a_provider_that_stops_republishing_is_gone_within_its_ttl() {
    let mut net = Net::new(30, 2);
    let key = RecordKey::Layer {
        model: "m".into(),
        index: 0,
    };
    let signer = NodeKey::generate();
    let ttl = 60_000;
    let record = Record::sign(key.clone(), b"p".to_vec(), NOW + ttl, &signer).unwrap();
    let q = net.nodes[5].put(record, net.now).unwrap();
    net.settle(5, q);
    net.nodes[5].withdraw(&key, &signer.public());
    let q = net.nodes[9].get(key.clone(), net.now);
    assert_eq!(net.settle(9, q).records.len(), 1, "live before its expiry");
    net.now = NOW + ttl;
    for n in 0..net.nodes.len() {
        net.nodes[n].poll(net.now);
    }
    let q = net.nodes[9].get(key, net.now);
    assert!(net.settle(9, q).records.is_empty(), "expired everywhere");
    assert!(net.nodes.iter().all(|n| n.store().is_empty()));
}

#[test]
fn records_are_put_again_on_the_republish_timer_until_they_expire() {
    let mut net = Net::new(30, 8);
    let key = RecordKey::Checkpoint("ck".into());
    let republish = Config::default().republish_ms;
    let record = Record::sign(
        key,
        b"m".to_vec(),
        NOW + republish + 1,
        &NodeKey::generate(),
    )
    .unwrap();
    let q = net.nodes[4].put(record, net.now).unwrap();
    net.settle(4, q);
    net.now = NOW + republish;
    let outputs = net.nodes[4].poll(net.now);
    let again = outputs.iter().find_map(|o| match o {
        Output::Send {
            request: Request::FindNode { .. },
            ..
        } => Some(()),
        _ => None,
    });
    assert!(again.is_some(), "the republish lookup starts");
    net.held = outputs.into_iter().map(|o| (4, o)).collect();
    // Deliver everything (the held outputs first) by settling an unrelated lookup; the
    // republish's own Done waits in `done`.
    let probe = net.nodes[1].find_node(Key([0; 32]), net.now);
    net.settle(1, probe);
    let republished = net
        .done
        .iter()
        .find(|((n, _), o)| *n == 4 && o.kind == crate::kad::QueryKind::Republish)
        .map(|(_, o)| o.clone());
    assert_eq!(republished.expect("republished").stored, 20);
    // Once expired it is not put again.
    net.now = NOW + 2 * republish;
    let outputs = net.nodes[4].poll(net.now);
    assert!(!outputs.iter().any(|o| matches!(
        o,
        Output::Send {
            request: Request::Store { .. },
            ..
        }
    )));
}

#[test]
fn lookups_route_around_nodes_that_went_silent() {
    let mut net = Net::new(40, 3);
    let key = RecordKey::Checkpoint("c1".into());
    let record = Record::sign(
        key.clone(),
        b"meta".to_vec(),
        NOW + 600_000,
        &NodeKey::generate(),
    )
    .unwrap();
    let q = net.nodes[1].put(record, net.now).unwrap();
    net.settle(1, q);
    for i in 10..20 {
        net.offline.insert(i);
    }
    let q = net.nodes[2].get(key, net.now);
    let outcome = net.settle(2, q);
    assert_eq!(outcome.records.len(), 1);
}

#[test]
fn bad_requests_and_answers_are_refused_and_nothing_stored_is_lost() {
    let mut net = Net::new(25, 4);
    let owner = NodeKey::generate();
    let key = RecordKey::Node(owner.id());
    let good = Record::sign(key.clone(), b"addr".to_vec(), NOW + 60_000, &owner).unwrap();
    let q = net.nodes[0].put(good.clone(), net.now).unwrap();
    net.settle(0, q);
    let holder = (0..net.nodes.len())
        .find(|&i| !net.nodes[i].store().get(&key.key(), NOW).is_empty() && i != 0)
        .expect("a holder");

    // A forged /nodes record, a tampered one and an oversized one are refused by name.
    let intruder = NodeKey::generate();
    let forged = Record::sign(key.clone(), b"evil".to_vec(), NOW + 90_000, &intruder).unwrap();
    let mut tampered = good.clone();
    tampered.value = b"evil".to_vec();
    tampered.expires_ms += 1;
    let mut oversized =
        Record::sign(RecordKey::Checkpoint("big".into()), vec![], NOW + 1, &owner).unwrap();
    oversized.value = vec![0; crate::record::MAX_VALUE_BYTES + 1];
    for (record, says) in [
        (forged, "not by that node"),
        (tampered, "signature does not match"),
        (oversized, "over the 4096-byte limit"),
    ] {
        let err = net.nodes[holder]
            .handle_request(None, None, Request::Store { record }, NOW)
            .unwrap_err();
        assert!(
            matches!(err, DhtError::Store(StoreError::Record(_))),
            "{err}"
        );
        assert!(err.to_string().contains(says), "{err}");
    }
    assert_eq!(
        net.nodes[holder].store().get(&key.key(), NOW),
        vec![good.clone()]
    );
    // An older version of the owner's record, arriving after the newer one (a put that raced
    // the next announcement), counts as stored and changes nothing.
    let older = Record::sign(key.clone(), b"old".to_vec(), NOW + 30_000, &owner).unwrap();
    assert!(matches!(
        net.nodes[holder].handle_request(None, None, Request::Store { record: older }, NOW),
        Ok(Response::Stored)
    ));
    assert_eq!(
        net.nodes[holder].store().get(&key.key(), NOW),
        vec![good.clone()]
    );

    // A peer answering a get with a forged record: the answer's record is dropped and counted.
    let q = net.nodes[3].get(key.clone(), NOW);
    let mut outputs = net.nodes[3].drain();
    let mut rejected_seen = false;
    let mut wrong_kind = true;
    while let Some(output) = outputs.pop() {
        match output {
            Output::Send { id, .. } => {
                // Every peer lies: half with a forged record, half with a reply of the wrong
                // kind; both are protocol errors.
                let reply = if wrong_kind {
                    Response::Stored
                } else {
                    let lie = Record::sign(key.clone(), b"evil".to_vec(), NOW + 90_000, &intruder)
                        .unwrap();
                    Response::Nodes {
                        closer: vec![],
                        records: vec![lie],
                    }
                };
                wrong_kind = !wrong_kind;
                net.nodes[3].handle_response(id, Ok(reply), NOW);
                outputs.extend(net.nodes[3].drain());
            }
            Output::Done { query, outcome } => {
                assert_eq!(query, q);
                assert!(outcome.rejected >= 2, "{outcome:?}");
                assert!(outcome.records.iter().all(|r| r.value != b"evil"));
                rejected_seen = true;
            }
        }
    }
    assert!(
        rejected_seen,
        "the get ended, with the forged record rejected"
    );
    // The node still serves.
    assert!(matches!(
        net.nodes[holder].handle_request(None, None, Request::Ping, NOW),
        Ok(Response::Pong)
    ));
}

/// Stores `count` records under `key`, each from a fresh key, at every node; returns how many
/// were refused with each error.
fn flood(
    net: &mut Net,
    key: &RecordKey,
    count: usize,
    ttl_ms: u64,
    origin: impl Fn(usize) -> std::net::IpAddr,
) -> HashMap<&'static str, usize> {
    let mut refused = HashMap::new();
    for i in 0..count {
        let record = Record::sign(
            key.clone(),
            vec![0xee; 64],
            NOW + ttl_ms,
            &NodeKey::generate(),
        );
        let record = record.unwrap();
        for node in net.nodes.iter_mut() {
            let store = Request::Store {
                record: record.clone(),
            };
            let why = match node.handle_request(None, Some(origin(i)), store, NOW) {
                Ok(_) => continue,
                Err(DhtError::Store(StoreError::Record(_))) => "record",
                Err(DhtError::Store(StoreError::PrefixFull { .. })) => "prefix",
                Err(DhtError::Store(StoreError::KeyFull { .. })) => "key",
                Err(DhtError::NotClosest { .. }) => "not closest",
                Err(e) => panic!("unexpected refusal: {e}"),
            };
            *refused.entry(why).or_default() += 1;
        }
    }
    refused
}

#[test]
fn a_flood_of_long_lived_records_from_64_fresh_keys_leaves_every_honest_provider_found() {
    let mut net = Net::new(30, 9);
    let key = RecordKey::Layer {
        model: "m".into(),
        index: 0,
    };
    let honest: Vec<NodeKey> = (0..3).map(|_| NodeKey::generate()).collect();
    for (i, signer) in honest.iter().enumerate() {
        // A provider's announcement: a quarter-hour's life, put from its own node.
        let record = Record::sign(key.clone(), vec![i as u8], NOW + 15 * 60_000, signer).unwrap();
        let q = net.nodes[i + 1].put(record, net.now).unwrap();
        net.settle(i + 1, q);
    }
    let honest_found = |net: &mut Net| {
        let q = net.nodes[20].get(key.clone(), net.now);
        let outcome = net.settle(20, q);
        let publishers: HashSet<_> = outcome.records.iter().map(|r| r.publisher).collect();
        honest
            .iter()
            .filter(|k| publishers.contains(&k.public()))
            .count()
    };
    assert_eq!(honest_found(&mut net), 3);
    let honest_held = |net: &Net| -> Vec<usize> {
        let honest: HashSet<_> = honest.iter().map(|k| k.public()).collect();
        let held = |node: &Kademlia<ChaCha8Rng>| node.store().get(&key.key(), NOW);
        let count = |node| {
            held(node)
                .iter()
                .filter(|r| honest.contains(&r.publisher))
                .count()
        };
        net.nodes.iter().map(count).collect()
    };
    let before = honest_held(&net);
    assert!(
        before.iter().filter(|&&n| n == 3).count() >= 20,
        "{before:?}"
    );

    // Day-long records are refused outright.
    let day = flood(&mut net, &key, 64, 24 * 3600 * 1000, |_| {
        [45, 77, 1, 9].into()
    });
    assert_eq!(day.get("record"), Some(&(64 * 30)), "{day:?}");
    // Hour-long ones from one /24: 8 per key at each holder, the rest refused.
    let one_net = flood(&mut net, &key, 64, 3600 * 1000, |i| {
        [45, 77, 1, i as u8].into()
    });
    assert!(
        one_net.get("prefix").is_some_and(|&n| n >= 56 * 20),
        "{one_net:?}"
    );
    // Hour-long ones from 64 different /24s fill the key and then crowd out only the one
    // network that holds several entries; the honest providers keep their places.
    let spread = flood(&mut net, &key, 64, 3600 * 1000, |i| {
        [46, i as u8, 0, 1].into()
    });
    assert!(spread.get("key").is_some_and(|&n| n > 0), "{spread:?}");
    assert_eq!(honest_held(&net), before, "no holder lost an honest entry");
    assert_eq!(
        honest_found(&mut net),
        3,
        "every honest provider is still found"
    );

    // An honest provider refreshing its entry keeps its place in a full key.
    let fresh = Record::sign(key.clone(), vec![7], NOW + 20 * 60_000, &honest[0]).unwrap();
    let q = net.nodes[1].put(fresh, net.now).unwrap();
    assert!(
        net.settle(1, q).stored > 0,
        "a refresh is never refused as full"
    );
    assert_eq!(honest_found(&mut net), 3);
}

#[test]
fn clients_ask_but_are_never_put_in_routing_tables() {
    let mut rng = ChaCha8Rng::seed_from_u64(5);
    let server = contact(&mut rng, [8, 8, 8, 8]);
    let client = contact(&mut rng, [9, 9, 9, 9]);
    let mut s = Kademlia::new(
        server,
        Mode::Server,
        Config::default(),
        ChaCha8Rng::seed_from_u64(1),
        NOW,
    );
    let mut c = Kademlia::new(
        client,
        Mode::Client,
        Config::default(),
        ChaCha8Rng::seed_from_u64(2),
        NOW,
    );
    // A client sends no sender contact; the server answers and keeps no entry.
    let reply = s
        .handle_request(None, None, Request::FindNode { target: client.key }, NOW)
        .unwrap();
    assert!(matches!(reply, Response::Nodes { .. }));
    assert!(s.table().is_empty());
    // Even a client claiming to be a server is only a sender the transport vouches for; a
    // client node itself serves nothing.
    assert_eq!(
        c.handle_request(Some(server), None, Request::Ping, NOW),
        Err(DhtError::NotServing)
    );
    c.add_contact(server, NOW);
    assert!(
        c.table().contains(&server.key),
        "clients keep a table of servers to ask"
    );
}

#[test]
fn a_full_bucket_pings_its_oldest_and_evicts_it_only_if_it_fails() {
    let mut rng = ChaCha8Rng::seed_from_u64(6);
    let local = Key::random(&mut rng);
    let mut table = RoutingTable::new(local, 2, DiversityLimits::default());
    let at = |rng: &mut ChaCha8Rng, n: u8| Contact {
        key: local.random_in_bucket(255, rng),
        addr: SocketAddr::from(([10, 0, 0, n], 7420)),
    };
    let (a, b, c, d) = (
        at(&mut rng, 1),
        at(&mut rng, 2),
        at(&mut rng, 3),
        at(&mut rng, 4),
    );
    assert_eq!(table.observe(a, 1), Observed::Added);
    assert_eq!(table.observe(b, 2), Observed::Added);
    assert_eq!(table.observe(c, 3), Observed::Full { ping: a });
    assert_eq!(
        table.observe(d, 4),
        Observed::Queued,
        "one liveness check at a time"
    );
    // a answers: it stays, newest now; the newcomers wait.
    assert_eq!(table.observe(a, 5), Observed::Refreshed);
    assert!(table.contains(&a.key) && !table.contains(&c.key));
    assert_eq!(
        table.bucket(255).map(|x| x.key).collect::<Vec<_>>(),
        [b.key, a.key]
    );
    // Next newcomer: b is oldest; it fails, the newest replacement takes its place.
    assert_eq!(table.observe(c, 6), Observed::Full { ping: b });
    assert_eq!(table.failed(&b.key), Some(c));
    assert!(!table.contains(&b.key) && table.contains(&c.key));
    assert_eq!(table.broken_invariant(), None);
}

#[test]
fn diversity_limits_cap_contacts_per_prefix() {
    let mut rng = ChaCha8Rng::seed_from_u64(7);
    let local = Key::random(&mut rng);
    let mut table = RoutingTable::new(local, 20, DiversityLimits::default());
    let in_bucket = |rng: &mut ChaCha8Rng, b: usize, host: u8| Contact {
        key: local.random_in_bucket(b, rng),
        addr: SocketAddr::from(([203, 0, 113, host], 7420)),
    };
    assert_eq!(
        table.observe(in_bucket(&mut rng, 255, 1), 0),
        Observed::Added
    );
    assert_eq!(
        table.observe(in_bucket(&mut rng, 255, 2), 0),
        Observed::Added
    );
    let third = table.observe(in_bucket(&mut rng, 255, 3), 0);
    assert!(
        matches!(third, Observed::Refused(Refusal::Diversity(p)) if p.to_string() == "203.0.113.0/24"),
        "{third:?}"
    );
    assert_eq!(
        table.observe(in_bucket(&mut rng, 254, 4), 0),
        Observed::Added,
        "another bucket"
    );
    assert!(
        matches!(
            table.observe(in_bucket(&mut rng, 253, 5), 0),
            Observed::Refused(_)
        ),
        "3 per table"
    );
    // Loopback and LAN addresses are exempt: a test swarm on one host works.
    for host in 1..=10 {
        let c = Contact {
            key: local.random_in_bucket(250, &mut rng),
            addr: SocketAddr::from(([127, 0, 0, host], 7000 + host as u16)),
        };
        assert_eq!(table.observe(c, 0), Observed::Added);
    }
    let v6 = |rng: &mut ChaCha8Rng, b: usize, last: u16| Contact {
        key: local.random_in_bucket(b, rng),
        addr: SocketAddr::new(
            std::net::Ipv6Addr::new(0x2001, 0xdb8, 0x1, 0x2, 0, 0, 0, last).into(),
            7420,
        ),
    };
    assert_eq!(table.observe(v6(&mut rng, 240, 1), 0), Observed::Added);
    assert_eq!(table.observe(v6(&mut rng, 240, 2), 0), Observed::Added);
    assert!(
        matches!(table.observe(v6(&mut rng, 240, 3), 0), Observed::Refused(_)),
        "per /48"
    );
    assert_eq!(table.broken_invariant(), None);
}

#[derive(Clone, Debug)]
enum Op {
    Observe {
        bucket: usize,
        net: u8,
        host: u8,
        t: u64,
    },
    Fail(usize),
    Remove(usize),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (240usize..256, 0u8..6, any::<u8>(), 0u64..4).prop_map(|(bucket, net, host, t)| Op::Observe { bucket, net, host, t }),
        1 => any::<usize>().prop_map(Op::Fail),
        1 => any::<usize>().prop_map(Op::Remove),
    ]
}

proptest! {
    #[test]
    fn table_invariants_hold_under_any_sequence(seed in any::<u64>(), ops in prop::collection::vec(op(), 1..300)) {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let local = Key::random(&mut rng);
        let mut table = RoutingTable::new(local, 4, DiversityLimits::default());
        let mut seen: Vec<Key> = Vec::new();
        let mut clock = 0;
        for op in ops {
            match op {
                Op::Observe { bucket, net, host, t } => {
                    clock += t;
                    // Reuse a known key now and then, so refreshes and moves happen.
                    let key = if !seen.is_empty() && host % 3 == 0 {
                        seen[host as usize % seen.len()]
                    } else {
                        local.random_in_bucket(bucket, &mut rng)
                    };
                    seen.push(key);
                    let addr = SocketAddr::from(([100, 64 + net, net, host], 7420));
                    table.observe(Contact { key, addr }, clock);
                }
                Op::Fail(i) if !seen.is_empty() => { table.failed(&seen[i % seen.len()]); }
                Op::Remove(i) if !seen.is_empty() => { table.remove(&seen[i % seen.len()]); }
                _ => {}
            }
            prop_assert_eq!(table.broken_invariant(), None);
        }
        // closest() is sorted by distance and holds what the table holds.
        let target = Key::random(&mut rng);
        let closest = table.closest(&target, 1000);
        prop_assert_eq!(closest.len(), table.len());
        prop_assert!(closest.windows(2).all(|w| target.distance(&w[0].key) < target.distance(&w[1].key)));
    }
}

#[test]
fn at_10000_nodes_gets_take_few_rounds() {
    let report = simulate(SimConfig::default());
    assert_eq!(report.nodes, 10_000);
    assert!(report.get_success >= 0.99, "{report:?}");
    assert!(
        report.rounds_p50 <= 3,
        "median rounds {}",
        report.rounds_p50
    );
    assert!(report.rounds_p99 <= 5, "p99 rounds {}", report.rounds_p99);
}

#[test]
fn gets_survive_20_percent_churn() {
    let report = simulate(SimConfig {
        churn: 0.2,
        seed: 2,
        ..SimConfig::default()
    });
    assert!(report.get_success >= 0.99, "{report:?}");
}

#[test]
fn gets_survive_20_percent_sybils_from_one_slash_16() {
    let report = simulate(SimConfig {
        sybils: 0.2,
        seed: 3,
        ..SimConfig::default()
    });
    assert!(report.get_success >= 0.95, "{report:?}");
}

#[test]
fn the_simulator_replays_exactly_from_its_seed() {
    let config = SimConfig {
        nodes: 500,
        joins: 20,
        records: 20,
        gets: 50,
        churn: 0.1,
        ..SimConfig::default()
    };
    let (a, b) = (simulate(config.clone()), simulate(config));
    assert_eq!(
        (a.messages, a.rounds_p99, a.get_ms_p99),
        (b.messages, b.rounds_p99, b.get_ms_p99)
    );
}

#[test]
fn candidates_enter_the_table_only_by_answering_and_never_move_a_known_contact() {
    let mut rng = ChaCha8Rng::seed_from_u64(9);
    let me = contact(&mut rng, [10, 0, 0, 1]);
    let mut kad = Kademlia::new(
        me,
        Mode::Server,
        Config::default(),
        ChaCha8Rng::seed_from_u64(1),
        NOW,
    );
    let (alive, dead) = (
        contact(&mut rng, [10, 0, 0, 2]),
        contact(&mut rng, [10, 0, 0, 3]),
    );
    kad.add_candidate(alive, NOW);
    kad.add_candidate(dead, NOW);
    kad.add_candidate(alive, NOW);
    let sends = |outputs: Vec<Output>| -> Vec<(crate::kad::RequestId, Contact, Request)> {
        outputs
            .into_iter()
            .filter_map(|o| match o {
                Output::Send { id, to, request } => Some((id, to, request)),
                Output::Done { .. } => None,
            })
            .collect()
    };
    let pings = sends(kad.drain());
    assert_eq!(pings.len(), 2, "one ping per candidate");
    assert!(pings.iter().all(|(_, _, r)| *r == Request::Ping));
    assert!(kad.table().is_empty(), "nobody enters unheard");
    assert_eq!(kad.candidates().len(), 2);

    // Meanwhile a lookup starts from the candidates.
    kad.find_node(Key::random(&mut rng), NOW);
    let mut asked: Vec<Contact> = sends(kad.drain())
        .into_iter()
        .map(|(_, to, _)| to)
        .collect();
    asked.sort_by_key(|c| c.addr);
    assert_eq!(asked, vec![alive, dead]);

    // The live one answers its ping and enters the table; the dead one is forgotten.
    for (id, to, _) in pings {
        let answer = if to == alive {
            Ok(Response::Pong)
        } else {
            Err(NoAnswer::TimedOut)
        };
        kad.handle_response(id, answer, NOW);
    }
    assert!(kad.table().contains(&alive.key));
    assert!(!kad.table().contains(&dead.key));
    assert!(kad.candidates().is_empty());

    // A source naming the known key at another address changes nothing and sends nothing.
    let liar = Contact {
        key: alive.key,
        addr: SocketAddr::from(([10, 9, 9, 9], 7420)),
    };
    kad.add_candidate(liar, NOW);
    assert!(
        sends(kad.drain())
            .iter()
            .all(|(_, _, r)| !matches!(r, Request::Ping))
    );
    assert_eq!(kad.table().closest(&alive.key, 1), vec![alive]);

    // However many are named, only the newest few wait.
    for _ in 0..crate::kad::MAX_CANDIDATES + 5 {
        kad.add_candidate(contact(&mut rng, [10, 1, 0, 1]), NOW);
    }
    assert_eq!(kad.candidates().len(), crate::kad::MAX_CANDIDATES);
}
