//! Seeded fault schedules over a simulated swarm: every call may fail in any way, replies may
//! come late (the peer ran the call, the client gave up on it), plans may find nobody. After
//! every step that succeeds, its logits equal a fault-free run's, and every layer of every hop
//! in the chain has seen exactly the inputs, at exactly the positions, a fault-free run gives
//! that layer: the replayed inputs equal the original ones.

use std::collections::{BTreeMap, BTreeSet};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::*;
use neuroshard_base::NodeId;

const LAYERS: u32 = 6;
const SCHEDULES: u64 = 3000;

/// One value per token: the tokens themselves, or a hop's hidden states.
type Values = Vec<u64>;

#[derive(Debug, Clone, PartialEq)]
struct TestError(String);

impl std::fmt::Display for TestError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl From<ChainError> for TestError {
    fn from(e: ChainError) -> Self {
        Self(e.to_string())
    }
}

/// Every layer's inputs of one session, by position: a KV cache in miniature. A layer's output
/// hashes everything it has seen, so a missed or wrong replay changes every later output.
#[derive(Debug, Default, Clone, PartialEq)]
struct Caches(BTreeMap<u32, Vec<u64>>);

impl Caches {
    /// Runs `input` at `pos` through `layers`; a call at positions already seen overwrites
    /// them (a replay), a call past the end is a gap no correct client sends.
    fn run(&mut self, layers: LayerRange, pos: usize, input: &Values) -> Values {
        let mut values = input.clone();
        for layer in layers.start..layers.end {
            let seen = self.0.entry(layer).or_default();
            assert!(
                pos <= seen.len(),
                "layer {layer} got position {pos} after {}",
                seen.len()
            );
            seen.truncate(pos);
            for v in values.iter_mut() {
                seen.push(*v);
                *v = seen
                    .iter()
                    .fold(u64::from(layer) ^ 0x9e37_79b9_7f4a_7c15, |h, x| {
                        (h ^ x).wrapping_mul(0x0100_0000_01b3).rotate_left(17)
                    });
            }
        }
        values
    }
}

struct Peer {
    hop: Hop,
    caches: Caches,
}

/// A swarm of peers serving random spans, some banned.
struct Swarm {
    peers: Vec<Peer>,
    banned: BTreeSet<String>,
}

impl Swarm {
    /// Two to four random partitions of the layers, one peer per part.
    fn random(rng: &mut StdRng) -> Self {
        let mut peers = Vec::new();
        for _ in 0..rng.random_range(2..=4) {
            let mut start = 0;
            while start < LAYERS {
                let end = rng.random_range(start + 1..=LAYERS);
                let n = peers.len();
                peers.push(Peer {
                    hop: Hop {
                        addr: format!("peer{n}:1"),
                        node_id: NodeId([n as u8; 32]),
                        layers: LayerRange::new(start, end).expect("a span"),
                        precision: Default::default(),
                    },
                    caches: Caches::default(),
                });
                start = end;
            }
        }
        Self {
            peers,
            banned: BTreeSet::new(),
        }
    }

    fn peer(&mut self, addr: &str) -> &mut Peer {
        self.peers
            .iter_mut()
            .find(|p| p.hop.addr == addr)
            .expect("a known peer")
    }

    /// A random chain of peers not banned covering `span` exactly.
    fn plan(&self, span: LayerRange, rng: &mut StdRng) -> Option<Vec<Hop>> {
        let mut next: Vec<&Peer> = self
            .peers
            .iter()
            .filter(|p| p.hop.layers.start == span.start && p.hop.layers.end <= span.end)
            .filter(|p| !self.banned.contains(&p.hop.addr))
            .collect();
        while !next.is_empty() {
            let peer = next.swap_remove(rng.random_range(0..next.len()));
            let rest = match LayerRange::new(peer.hop.layers.end, span.end) {
                Ok(rest) => self.plan(rest, rng),
                Err(_) => Some(Vec::new()),
            };
            if let Some(mut hops) = rest {
                hops.insert(0, peer.hop.clone());
                return Some(hops);
            }
        }
        None
    }
}

/// How often things go wrong in one schedule.
struct Odds {
    call_fails: f64,
    plan_finds_nobody: f64,
}

/// Runs one step through the machine against the simulated swarm.
fn drive(
    chain: &mut Chain<Values, Values, TestError>,
    swarm: &mut Swarm,
    rng: &mut StdRng,
    odds: &Odds,
    pos: usize,
    input: Values,
) -> Result<Values, TestError> {
    let mut action = chain.start(pos, input);
    for _ in 0..10_000 {
        action = match action {
            Action::Call {
                hop, pos, input, ..
            } => {
                let hop = chain.links()[hop].hop.clone();
                call(chain, swarm, rng, odds, &hop, pos, &input)
            }
            Action::Replace { hop, span, .. } => {
                assert_eq!(chain.links()[hop].hop.layers, span);
                swarm.banned.insert(chain.links()[hop].hop.addr.clone());
                let plan = match rng.random_bool(odds.plan_finds_nobody) {
                    true => None,
                    false => swarm.plan(span, rng),
                };
                chain.replanned(match plan {
                    Some(hops) => Replan::Hops(hops),
                    None => Replan::NoRoute(TestError(format!("nobody serves {span}"))),
                })
            }
            Action::Wait { hop, .. } => {
                swarm.banned.remove(&chain.links()[hop].hop.addr);
                chain.resume()
            }
            Action::Done(logits) => return Ok(logits),
            Action::Fail(err) => return Err(err),
        };
    }
    panic!("the step never ended");
}

/// One call to `hop`, which may fail in any way, before or after running it.
fn call(
    chain: &mut Chain<Values, Values, TestError>,
    swarm: &mut Swarm,
    rng: &mut StdRng,
    odds: &Odds,
    hop: &Hop,
    pos: usize,
    input: &Values,
) -> Action<Values, Values, TestError> {
    let peer = swarm.peer(&hop.addr);
    assert_eq!(peer.hop.layers, hop.layers, "a hop runs its peer's layers");
    if rng.random_bool(odds.call_fails) {
        let fault = [
            Fault::Peer,
            Fault::Deadline,
            Fault::Unreachable,
            Fault::StaleListing,
            Fault::Request,
        ][rng.random_range(0..5)];
        // A late reply or a bad receipt: the peer did the work, the client does not take it.
        if matches!(fault, Fault::Peer | Fault::Deadline) && rng.random_bool(0.5) {
            peer.caches.run(hop.layers, pos, input);
        }
        return chain.failed(fault, TestError(format!("{fault:?} at {}", hop.addr)));
    }
    let output = peer.caches.run(hop.layers, pos, input);
    let misfit = rng.random_bool(odds.call_fails / 4.0);
    match hop.layers.end == LAYERS || misfit {
        true => chain.replied(Reply::Logits(output)),
        false => chain.replied(Reply::Hidden(output)),
    }
}

/// What the schedules went through, so the test can tell it exercised the hard cases.
#[derive(Debug, Default)]
struct Tally {
    steps_done: usize,
    steps_failed: usize,
    failovers: usize,
    nested: usize,
}

fn schedule(seed: u64, tally: &mut Tally) {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut swarm = Swarm::random(&mut rng);
    let odds = Odds {
        call_fails: [0.0, 0.05, 0.15, 0.3][rng.random_range(0..4)],
        plan_finds_nobody: [0.0, 0.2][rng.random_range(0..2)],
    };
    let all = LayerRange::new(0, LAYERS).expect("a span");
    let hops = swarm
        .plan(all, &mut rng)
        .expect("the swarm covers the model");
    let mut chain = Chain::new(hops, LAYERS, 4);
    let mut reference = Caches::default();
    let mut pos = 0;
    for step in 0..rng.random_range(1..8) {
        let tokens = if step == 0 { rng.random_range(1..5) } else { 1 };
        let input: Values = (0..tokens).map(|_| rng.random_range(0..50_000)).collect();
        let want = reference.run(all, pos, &input);
        let events = chain.events().len();
        let result = drive(&mut chain, &mut swarm, &mut rng, &odds, pos, input);
        let failovers = chain.events().len() - events;
        tally.failovers += failovers;
        tally.nested += usize::from(failovers >= 2);
        match result {
            Ok(logits) => {
                assert_eq!(
                    logits,
                    want,
                    "seed {seed} step {step}: {:?}",
                    chain.events()
                );
                check_caches(&chain, &mut swarm, &reference, seed);
                tally.steps_done += 1;
                pos += tokens;
            }
            Err(_) => {
                tally.steps_failed += 1;
                return;
            }
        }
    }
}

/// Every layer of every hop in the chain saw what the reference saw, and every hop's log holds
/// the inputs of its first layer.
fn check_caches(
    chain: &Chain<Values, Values, TestError>,
    swarm: &mut Swarm,
    reference: &Caches,
    seed: u64,
) {
    for link in chain.links() {
        let peer = swarm.peer(&link.hop.addr);
        for layer in link.hop.layers.start..link.hop.layers.end {
            assert_eq!(
                peer.caches.0.get(&layer),
                reference.0.get(&layer),
                "seed {seed}: layer {layer} on {} saw other inputs; {:?}",
                link.hop.addr,
                chain.events()
            );
        }
        let logged: Vec<u64> = link
            .log
            .entries()
            .iter()
            .flat_map(|(_, input)| input.iter().copied())
            .collect();
        let first = &reference.0[&link.hop.layers.start];
        assert_eq!(&logged, first, "seed {seed}: {}'s log", link.hop.addr);
    }
}

#[test]
fn every_seeded_fault_schedule_keeps_the_tokens_and_the_replayed_inputs() {
    let mut tally = Tally::default();
    for seed in 0..SCHEDULES {
        schedule(seed, &mut tally);
    }
    // The schedules reached the cases that matter: steps that finished after failovers,
    // replays that failed over in turn, and steps that ran out of failovers.
    assert!(tally.steps_done > 5000, "{tally:?}");
    assert!(tally.failovers > 1000, "{tally:?}");
    assert!(tally.nested > 100, "{tally:?}");
    assert!(tally.steps_failed > 100, "{tally:?}");
}

fn hop(addr: &str, start: u32, end: u32) -> Hop {
    let mut id = [0; 32];
    id[..addr.len()].copy_from_slice(addr.as_bytes());
    Hop {
        addr: addr.into(),
        node_id: NodeId(id),
        layers: LayerRange::new(start, end).expect("a span"),
        precision: Default::default(),
    }
}

#[test]
fn a_failed_hop_is_replaced_and_its_log_replayed_before_the_failed_input() {
    let mut chain: Chain<Values, Values, TestError> =
        Chain::new(vec![hop("a", 0, 3), hop("b", 3, 6)], 6, 4);
    let call = |hop, pos, input: Values| Action::Call {
        hop,
        pos,
        input,
        patient: false,
    };
    assert_eq!(chain.start(0, vec![1, 2]), call(0, 0, vec![1, 2]));
    assert_eq!(
        chain.replied(Reply::Hidden(vec![10, 20])),
        call(1, 0, vec![10, 20])
    );
    assert_eq!(chain.replied(Reply::Logits(vec![7])), Action::Done(vec![7]));
    assert_eq!(chain.start(2, vec![3]), call(0, 2, vec![3]));
    assert_eq!(chain.replied(Reply::Hidden(vec![30])), call(1, 2, vec![30]));
    let span = LayerRange::new(3, 6).expect("a span");
    assert_eq!(
        chain.failed(Fault::Peer, TestError("b broke".into())),
        Action::Replace {
            hop: 1,
            span,
            stale: false
        }
    );
    // b is replaced by c and d; b's log (position 0) goes first, then the failed input.
    let replan = Replan::Hops(vec![hop("c", 3, 4), hop("d", 4, 6)]);
    assert_eq!(chain.replanned(replan), call(1, 0, vec![10, 20]));
    assert_eq!(
        chain.replied(Reply::Hidden(vec![11, 21])),
        call(2, 0, vec![11, 21])
    );
    assert_eq!(chain.replied(Reply::Logits(vec![8])), call(1, 2, vec![30]));
    assert_eq!(chain.replied(Reply::Hidden(vec![31])), call(2, 2, vec![31]));
    assert_eq!(chain.replied(Reply::Logits(vec![9])), Action::Done(vec![9]));
    let addrs: Vec<&str> = chain.hops().map(|h| h.addr.as_str()).collect();
    assert_eq!(addrs, ["a", "c", "d"]);
    assert_eq!(chain.events().len(), 1);
    let c_then_d = format!(
        "replaying 1 calls to c [{}], d [{}]",
        hop("c", 3, 4).layers,
        hop("d", 4, 6).layers
    );
    assert!(
        chain.events()[0].contains(&c_then_d),
        "{:?}",
        chain.events()
    );
}

#[test]
fn a_slow_peer_nobody_replaces_is_asked_again_patiently_and_an_unreachable_one_after_a_pause() {
    let mut chain: Chain<Values, Values, TestError> = Chain::new(vec![hop("a", 0, 6)], 6, 4);
    chain.start(0, vec![1]);
    chain.failed(Fault::Deadline, TestError("late".into()));
    let no_route = || Replan::NoRoute(TestError("nobody".into()));
    let wait = chain.replanned(no_route());
    assert_eq!(
        wait,
        Action::Wait {
            hop: 0,
            pause: Duration::ZERO
        }
    );
    let again = chain.resume();
    assert!(
        matches!(again, Action::Call { patient: true, .. }),
        "{again:?}"
    );
    for pause_ms in [500, 1000, 2000] {
        chain.failed(Fault::Unreachable, TestError("down".into()));
        let wait = chain.replanned(no_route());
        assert_eq!(
            wait,
            Action::Wait {
                hop: 0,
                pause: Duration::from_millis(pause_ms)
            }
        );
        chain.resume();
    }
    // The budget of four is spent: the step fails and the chain is broken.
    let fail = chain.failed(Fault::Unreachable, TestError("down".into()));
    assert_eq!(fail, Action::Fail(TestError("down".into())));
    assert_eq!(chain.broken(), Some("down"));
    let again = chain.start(1, vec![2]);
    assert!(matches!(again, Action::Fail(TestError(e)) if e.contains("broken")));
}

#[test]
fn a_refused_request_fails_the_step_but_keeps_the_chain() {
    let mut chain: Chain<Values, Values, TestError> = Chain::new(vec![hop("a", 0, 6)], 6, 4);
    chain.start(0, vec![1]);
    let fail = chain.failed(Fault::Request, TestError("bad".into()));
    assert_eq!(fail, Action::Fail(TestError("bad".into())));
    assert_eq!(chain.broken(), None);
}
