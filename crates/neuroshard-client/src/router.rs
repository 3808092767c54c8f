//! Chain planning and peer health, without IO.
//!
//! The router keeps, per peer, a smoothed RTT (RFC 6298's estimator), recent compute times,
//! success history, sessions placed there and a ban deadline, and a [`Reputation`] book of
//! verified results per node. Each candidate hop gets a score in [0, 1] that weighs capability
//! match, load, latency and reliability ([`ScoreWeights`]); [`Router::plan`] finds the chain of
//! lowest total cost (1 − score per hop) over layer boundaries (Dijkstra), so it also re-plans a
//! broken span. Callers pass `now` and the RNG.

use std::cmp::Ordering;
use std::collections::{BinaryHeap, HashMap, VecDeque};
use std::time::Duration;

use neuroshard_base::precision::Precision;
use neuroshard_base::{Invalid, LayerRange, NodeId};
use neuroshard_proof::{Reputation, SpotCheckPolicy};
use rand::Rng;
use tokio::time::Instant;

use neuroshard_net::convert::PeerRecord;
use neuroshard_net::pool::Target;

/// Router tuning.
#[derive(Debug, Clone, Copy)]
pub struct RouterConfig {
    /// Floor of the failover deadline. Default 200 ms: the seed's fixed deadline, kept as a floor.
    pub min_deadline: Duration,
    /// Deadline of calls to a peer with no RTT sample yet. Default 30 s: a first prefill on a
    /// slow CPU can take seconds, and a dead peer fails fast by refusing the connection anyway.
    pub first_call_deadline: Duration,
    /// How long a failed peer is skipped. Default 60 s: long enough to finish a generation
    /// without retrying it.
    pub ban: Duration,
    /// Load added per session this router already placed on a peer, which spreads sessions
    /// over replicas. Default 0.1: ten of our own sessions make a peer look saturated.
    pub session_load: f64,
    /// Expected ms added for a peer whose calls always failed. Default 200 ms.
    pub failure_penalty_ms: f64,
    /// Expected ms a relay adds to a hop to a relayed peer not yet measured. Default 30 ms: a
    /// second WAN leg.
    pub relay_hop_ms: f64,
    /// Expected hop time that scores 0.5 on latency. Default 100 ms: a WAN hop plus a token's
    /// compute on a mid-range GPU.
    pub latency_reference_ms: f64,
    /// Weights of the peer score.
    pub weights: ScoreWeights,
    /// Spot-check sampling and bans for failed checks.
    pub spot_checks: SpotCheckPolicy,
}

/// Weights of a peer's score terms; they need not sum to 1 (the score divides by their sum).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ScoreWeights {
    /// Share of the remaining layers the peer covers. Default 0.40: fewer hops matter most.
    pub capability: f64,
    /// 1 − load (its own report plus our sessions there). Default 0.25.
    pub load: f64,
    /// ref / (ref + expected hop ms). Default 0.20.
    pub latency: f64,
    /// Reliability from verified results ([`Reputation`]). Default 0.15.
    pub reliability: f64,
}

impl Default for ScoreWeights {
    fn default() -> Self {
        Self {
            capability: 0.40,
            load: 0.25,
            latency: 0.20,
            reliability: 0.15,
        }
    }
}

impl ScoreWeights {
    /// Names the first bad weight.
    pub fn validate(&self) -> Result<(), Invalid> {
        let all = [
            ("capability", self.capability),
            ("load", self.load),
            ("latency", self.latency),
            ("reliability", self.reliability),
        ];
        if let Some((name, w)) = all.iter().find(|(_, w)| !(w.is_finite() && *w >= 0.0)) {
            return Err(Invalid::new(
                format!("weights.{name}"),
                format!("{w} is not a finite non-negative number"),
            ));
        }
        if all.iter().map(|(_, w)| w).sum::<f64>() <= 0.0 {
            return Err(Invalid::new("weights", "at least one must be positive"));
        }
        Ok(())
    }
}

/// A peer's own figure for one token through `layers` of its layers, ms (0 where it announces
/// none).
fn announced_ms(record: &PeerRecord, layers: u32) -> f64 {
    f64::from(record.decode_ms_per_layer) * f64::from(layers)
}

/// Cost added per hop, so that of two chains with equal scores the shorter wins.
const HOP_COST: f64 = 0.01;

impl Default for RouterConfig {
    fn default() -> Self {
        Self {
            min_deadline: Duration::from_millis(200),
            first_call_deadline: Duration::from_secs(30),
            ban: Duration::from_secs(60),
            session_load: 0.1,
            failure_penalty_ms: 200.0,
            relay_hop_ms: 30.0,
            latency_reference_ms: 100.0,
            weights: ScoreWeights::default(),
            spot_checks: SpotCheckPolicy::default(),
        }
    }
}

/// Compute samples kept per peer; the deadline uses their maximum as its p99.
const COMPUTE_WINDOW: usize = 64;

/// Measured behaviour of one peer.
#[derive(Debug, Clone, Default)]
pub struct PeerHealth {
    /// Smoothed RTT in ms (network only: wall time minus the peer's reported compute).
    pub srtt_ms: Option<f64>,
    /// RTT variation in ms.
    pub rttvar_ms: f64,
    /// Recent compute times of single-token calls, ms.
    decode_ms: VecDeque<f64>,
    /// Recent compute time per token of multi-token calls, ms.
    per_token_ms: VecDeque<f64>,
    /// Calls that succeeded / failed.
    pub successes: u64,
    /// Calls that failed.
    pub failures: u64,
    /// Sessions this router placed here and has not closed.
    pub sessions: u64,
    /// Skipped until then.
    pub banned_until: Option<Instant>,
}

impl PeerHealth {
    /// Folds in one successful call (RFC 6298: α = 1/8, β = 1/4).
    fn observe(&mut self, rtt_ms: f64, compute_ms: f64, tokens: usize) {
        match self.srtt_ms {
            None => {
                self.srtt_ms = Some(rtt_ms);
                self.rttvar_ms = rtt_ms / 2.0;
            }
            Some(srtt) => {
                self.rttvar_ms = 0.75 * self.rttvar_ms + 0.25 * (srtt - rtt_ms).abs();
                self.srtt_ms = Some(0.875 * srtt + 0.125 * rtt_ms);
            }
        }
        let (window, value) = if tokens <= 1 {
            (&mut self.decode_ms, compute_ms)
        } else {
            (&mut self.per_token_ms, compute_ms / tokens as f64)
        };
        if window.len() == COMPUTE_WINDOW {
            window.pop_front();
        }
        window.push_back(value);
        self.successes += 1;
    }

    fn max(window: &VecDeque<f64>) -> Option<f64> {
        window.iter().copied().reduce(f64::max)
    }

    /// Expected compute for `tokens` new tokens, ms: from the calls this router timed, else
    /// `announced_ms` per token (the peer's own figure for the layers asked of it; 0 where it
    /// announces none).
    fn expected_compute_ms(&self, tokens: usize, announced_ms: f64) -> f64 {
        let decode = Self::max(&self.decode_ms);
        let per_token = Self::max(&self.per_token_ms)
            .or(decode)
            .unwrap_or(announced_ms);
        decode.unwrap_or(per_token) + per_token * tokens.saturating_sub(1) as f64
    }

    fn is_banned(&self, now: Instant) -> bool {
        self.banned_until.is_some_and(|t| now < t)
    }
}

/// One hop of a planned chain.
#[derive(Debug, Clone, PartialEq)]
pub struct Hop {
    /// The peer's `host:port`.
    pub addr: String,
    /// Its node id.
    pub node_id: NodeId,
    /// Layers it runs for this chain.
    pub layers: LayerRange,
    /// How it holds its weights, as it announces: its receipts' weights hash and a spot
    /// check's recomputation follow it.
    pub precision: Precision,
}

impl Hop {
    /// Where its calls go: this node at this address.
    pub fn target(&self) -> Target {
        Target::node(self.addr.as_str(), self.node_id)
    }
}

/// Peers of one model and what the router has measured of them.
#[derive(Debug)]
pub struct Router {
    config: RouterConfig,
    peers: HashMap<String, (PeerRecord, PeerHealth)>,
    reputation: Reputation,
}

#[derive(Debug, PartialEq)]
struct Frontier {
    cost: f64,
    layer: u32,
}

impl Eq for Frontier {}

impl Ord for Frontier {
    fn cmp(&self, other: &Self) -> Ordering {
        other
            .cost
            .total_cmp(&self.cost)
            .then(other.layer.cmp(&self.layer))
    }
}

impl PartialOrd for Frontier {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl Router {
    /// A router with no peers.
    pub fn new(config: RouterConfig) -> Self {
        Self {
            config,
            peers: HashMap::new(),
            reputation: Reputation::new(config.spot_checks),
        }
    }

    /// Replaces the peer list, keeping the health of peers still present.
    pub fn set_peers(&mut self, records: Vec<PeerRecord>) {
        let mut old = std::mem::take(&mut self.peers);
        for record in records {
            let health = old.remove(&record.addr).map(|(_, h)| h).unwrap_or_default();
            self.peers.insert(record.addr.clone(), (record, health));
        }
    }

    /// Peers known, and those not banned at `now`.
    pub fn peer_counts(&self, now: Instant) -> (usize, usize) {
        let healthy = self
            .peers
            .values()
            .filter(|(_, h)| !h.is_banned(now))
            .count();
        (self.peers.len(), healthy)
    }

    /// Whether the peers not banned at `now` together serve every layer of a model of
    /// `total_layers`: a chain can be planned.
    pub fn covers(&self, total_layers: u32, now: Instant) -> bool {
        let mut covered = vec![false; total_layers as usize];
        for (record, _) in self.peers.values().filter(|(_, h)| !h.is_banned(now)) {
            for layer in record.layers.to_range() {
                if let Some(c) = covered.get_mut(layer) {
                    *c = true;
                }
            }
        }
        total_layers > 0 && covered.iter().all(|&c| c)
    }

    /// Health of a peer.
    pub fn health(&self, addr: &str) -> Option<&PeerHealth> {
        self.peers.get(addr).map(|(_, h)| h)
    }

    /// Plans the cheapest chain of unbanned peers covering `span` for a call of `tokens` tokens.
    /// A little random jitter breaks ties between equal replicas.
    pub fn plan(
        &self,
        span: LayerRange,
        tokens: usize,
        now: Instant,
        rng: &mut impl Rng,
    ) -> Option<Vec<Hop>> {
        let width = (span.end - span.start) as usize + 1;
        let mut best = vec![f64::INFINITY; width];
        let mut via: Vec<Option<(String, u32)>> = vec![None; width];
        let mut heap = BinaryHeap::new();
        best[0] = 0.0;
        heap.push(Frontier {
            cost: 0.0,
            layer: span.start,
        });
        while let Some(Frontier { cost, layer }) = heap.pop() {
            if layer == span.end {
                break;
            }
            if cost > best[(layer - span.start) as usize] {
                continue;
            }
            for (addr, (record, health)) in &self.peers {
                if health.is_banned(now) || !record.layers.contains(layer) {
                    continue;
                }
                let end = record.layers.end.min(span.end);
                let capability = (end - layer) as f64 / (span.end - layer) as f64;
                let call = (tokens, end - layer);
                let score = self.score(record, health, capability, call);
                let next = cost + (1.0 - score) + HOP_COST + rng.random::<f64>() * 0.001;
                let slot = (end - span.start) as usize;
                if next < best[slot] {
                    best[slot] = next;
                    via[slot] = Some((addr.clone(), layer));
                    heap.push(Frontier {
                        cost: next,
                        layer: end,
                    });
                }
            }
        }
        let mut hops = Vec::new();
        let mut at = span.end;
        while at != span.start {
            let (addr, from) = via[(at - span.start) as usize].clone()?;
            let peer = &self.peers[&addr].0;
            let (node_id, precision) = (peer.node_id, peer.precision);
            let layers = LayerRange::new(from, at).ok()?;
            hops.push(Hop {
                addr,
                node_id,
                layers,
                precision,
            });
            at = from;
        }
        hops.reverse();
        Some(hops)
    }

    /// Score in [0, 1] of a hop on `record` covering `capability` of the remaining layers
    /// with a call of `tokens` tokens through `layers` layers: the weighted mean of
    /// capability, 1 − load, latency and verified reliability. Until the router has timed the
    /// peer, its latency counts the compute the peer announces (`decode_ms_per_layer`).
    pub fn score(
        &self,
        record: &PeerRecord,
        health: &PeerHealth,
        capability: f64,
        (tokens, layers): (usize, u32),
    ) -> f64 {
        let c = &self.config;
        let w = &c.weights;
        let calls = (health.successes + health.failures).max(1) as f64;
        // Unmeasured, a relayed peer is expected to cost the relay's extra hop; measured, its
        // round trip includes it.
        let prior_ms = if record.is_relayed() {
            1.0 + c.relay_hop_ms
        } else {
            1.0
        };
        let expected_ms = health.srtt_ms.unwrap_or(prior_ms)
            + health.expected_compute_ms(tokens, announced_ms(record, layers))
            + c.failure_penalty_ms * health.failures as f64 / calls;
        let latency = c.latency_reference_ms / (c.latency_reference_ms + expected_ms);
        let load = 1.0 - (record.load as f64 + c.session_load * health.sessions as f64).min(1.0);
        let reliability = self.reputation.reliability(&record.node_id);
        let total = w.capability + w.load + w.latency + w.reliability;
        (w.capability * capability
            + w.load * load
            + w.latency * latency
            + w.reliability * reliability)
            / total.max(f64::MIN_POSITIVE)
    }

    /// Verified results per node.
    pub fn reputation(&self) -> &Reputation {
        &self.reputation
    }

    /// Verified results per node, to record a check.
    pub fn reputation_mut(&mut self) -> &mut Reputation {
        &mut self.reputation
    }

    /// Bans the peer at `addr` until `until` (a ban already longer stays).
    pub fn ban(&mut self, addr: &str, until: Instant) {
        if let Some((_, health)) = self.peers.get_mut(addr) {
            health.banned_until = Some(health.banned_until.map_or(until, |t| t.max(until)));
        }
    }

    /// Drops `addr` from the peers until the next listing names it again.
    pub fn forget(&mut self, addr: &str) {
        self.peers.remove(addr);
    }

    /// Lifts `addr`'s ban: it is slow rather than gone, and no other peer can stand in.
    pub fn lift_ban(&mut self, addr: &str) {
        if let Some((_, health)) = self.peers.get_mut(addr) {
            health.banned_until = None;
        }
    }

    /// The failover deadline of a `tokens`-token call to `addr`:
    /// max(min, srtt + 4·rttvar + compute p99).
    pub fn deadline(&self, addr: &str, tokens: usize) -> Duration {
        let Some((_, health)) = self.peers.get(addr) else {
            return self.config.first_call_deadline;
        };
        match health.srtt_ms {
            None => self.config.first_call_deadline,
            Some(srtt) => {
                let ms = srtt + 4.0 * health.rttvar_ms + health.expected_compute_ms(tokens, 0.0);
                self.config
                    .min_deadline
                    .max(Duration::from_secs_f64(ms / 1000.0))
            }
        }
    }

    /// Records a successful call: wall time, the peer's reported compute, and token count.
    pub fn record_success(&mut self, addr: &str, wall: Duration, compute: Duration, tokens: usize) {
        if let Some((_, health)) = self.peers.get_mut(addr) {
            let wall_ms = wall.as_secs_f64() * 1000.0;
            let compute_ms = compute.as_secs_f64() * 1000.0;
            health.observe((wall_ms - compute_ms).max(0.0), compute_ms, tokens);
        }
    }

    /// Records a failed call and bans the peer for a while.
    pub fn record_failure(&mut self, addr: &str, now: Instant) {
        if let Some((_, health)) = self.peers.get_mut(addr) {
            health.failures += 1;
        }
        self.ban(addr, now + self.config.ban);
    }

    /// Counts a session placed on (or removed from) a peer.
    pub fn adjust_sessions(&mut self, addr: &str, delta: i64) {
        if let Some((_, health)) = self.peers.get_mut(addr) {
            health.sessions = health.sessions.saturating_add_signed(delta);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;
    use rand::rngs::StdRng;

    /// A made-up id that names the peer's address.
    fn id_of(addr: &str) -> NodeId {
        let mut bytes = [0; 32];
        bytes[..addr.len()].copy_from_slice(addr.as_bytes());
        NodeId(bytes)
    }

    fn peer(addr: &str, start: u32, end: u32) -> PeerRecord {
        PeerRecord {
            node_id: id_of(addr),
            addr: addr.into(),
            model_id: "m".into(),
            layers: LayerRange::new(start, end).unwrap(),
            total_layers: 6,
            load: 0.0,
            public_key: neuroshard_base::NodeKey::generate().public(),
            display_name: String::new(),
            relay: String::new(),
            precision: Default::default(),
            decode_ms_per_layer: 0.0,
        }
    }

    fn all() -> LayerRange {
        LayerRange::new(0, 6).unwrap()
    }

    #[test]
    fn plans_a_covering_chain_and_routes_around_bans() {
        let mut r = Router::new(RouterConfig::default());
        r.set_peers(vec![
            peer("a", 0, 2),
            peer("b", 2, 4),
            peer("b2", 2, 4),
            peer("c", 4, 6),
        ]);
        let mut rng = StdRng::seed_from_u64(1);
        let now = Instant::now();
        let chain = r.plan(all(), 1, now, &mut rng).unwrap();
        assert_eq!(chain.len(), 3);
        assert_eq!(chain.iter().map(|h| h.layers.len()).sum::<u32>(), 6);
        r.record_failure("b", now);
        r.record_failure("b2", now);
        assert!(r.plan(all(), 1, now, &mut rng).is_none());
        let later = now + Duration::from_secs(61);
        assert!(r.plan(all(), 1, later, &mut rng).is_some());
    }

    #[test]
    fn an_unmeasured_relayed_peer_is_expected_to_cost_the_relay_hop() {
        let r = Router::new(RouterConfig::default());
        let direct = peer("11.0.0.1:5000", 0, 6);
        let relayed = PeerRecord {
            addr: format!("relay://11.0.0.2:7000/{}", "ab".repeat(32)),
            ..peer("x", 0, 6)
        };
        assert!(relayed.is_relayed() && !direct.is_relayed());
        let fresh = PeerHealth::default();
        let (d, rl) = (
            r.score(&direct, &fresh, 1.0, (1, 4)),
            r.score(&relayed, &fresh, 1.0, (1, 4)),
        );
        assert!(rl < d, "relayed {rl} vs direct {d}");
        // Once measured, the measurement stands for both.
        let mut measured = PeerHealth::default();
        measured.observe(40.0, 1.0, 1);
        assert_eq!(
            r.score(&direct, &measured, 1.0, (1, 4)),
            r.score(&relayed, &measured, 1.0, (1, 4))
        );
    }

    /// Until a peer is timed, the router plans with the decode speed it announces; once timed,
    /// with what it measured.
    #[test]
    fn an_unmeasured_peer_is_planned_with_its_announced_speed() {
        let mut r = Router::new(RouterConfig::default());
        let announcing = |addr, ms| PeerRecord {
            decode_ms_per_layer: ms,
            ..peer(addr, 0, 6)
        };
        r.set_peers(vec![announcing("fast", 2.0), announcing("slow", 40.0)]);
        let now = Instant::now();
        let mut rng = StdRng::seed_from_u64(5);
        for _ in 0..20 {
            assert_eq!(r.plan(all(), 1, now, &mut rng).unwrap()[0].addr, "fast");
        }
        // The announced figure counts per layer asked: 2 ms over 6 layers is 12 ms.
        let (fast, fresh) = (announcing("fast", 2.0), PeerHealth::default());
        let by_layers = |layers| r.score(&fast, &fresh, 1.0, (1, layers));
        assert!(by_layers(1) > by_layers(6));
        // Timed, the peers are what they were measured to be.
        for _ in 0..3 {
            r.record_success(
                "fast",
                Duration::from_millis(300),
                Duration::from_millis(290),
                1,
            );
            r.record_success(
                "slow",
                Duration::from_millis(12),
                Duration::from_millis(10),
                1,
            );
        }
        for _ in 0..20 {
            assert_eq!(r.plan(all(), 1, now, &mut rng).unwrap()[0].addr, "slow");
        }
    }

    #[test]
    fn uses_part_of_a_wider_peer_to_repair_a_span() {
        let mut r = Router::new(RouterConfig::default());
        r.set_peers(vec![peer("wide", 0, 6)]);
        let chain = r
            .plan(
                LayerRange::new(2, 4).unwrap(),
                1,
                Instant::now(),
                &mut StdRng::seed_from_u64(2),
            )
            .unwrap();
        assert_eq!(
            chain,
            vec![Hop {
                addr: "wide".into(),
                node_id: id_of("wide"),
                layers: LayerRange::new(2, 4).unwrap(),
                precision: Precision::F32,
            }]
        );
    }

    #[test]
    fn deadline_follows_measured_rtt_and_compute() {
        let mut r = Router::new(RouterConfig::default());
        r.set_peers(vec![peer("a", 0, 6)]);
        assert_eq!(r.deadline("a", 1), Duration::from_secs(30));
        for _ in 0..20 {
            r.record_success("a", Duration::from_millis(10), Duration::from_millis(8), 1);
        }
        assert_eq!(r.deadline("a", 1), Duration::from_millis(200));
        for _ in 0..20 {
            r.record_success(
                "a",
                Duration::from_millis(900),
                Duration::from_millis(400),
                1,
            );
        }
        let d = r.deadline("a", 1);
        assert!(d > Duration::from_millis(800), "{d:?}");
    }

    #[test]
    fn verified_reliability_steers_routing_and_weights_are_configurable() {
        let mut r = Router::new(RouterConfig::default());
        r.set_peers(vec![peer("good", 0, 6), peer("cheat", 0, 6)]);
        let mut rng = StdRng::seed_from_u64(4);
        let now = Instant::now();
        for _ in 0..5 {
            r.reputation_mut().record_pass(&id_of("good"));
        }
        // A check failed long ago: no ban left, but the record remains.
        r.reputation_mut().record_failure(&id_of("cheat"));
        for _ in 0..10 {
            assert_eq!(r.plan(all(), 1, now, &mut rng).unwrap()[0].addr, "good");
        }
        let good = r.peers["good"].clone();
        let cheat = r.peers["cheat"].clone();
        assert!(r.score(&good.0, &good.1, 1.0, (1, 4)) > r.score(&cheat.0, &cheat.1, 1.0, (1, 4)));
        // With reliability weighted zero, the two are equal but for jitter.
        let mut config = RouterConfig::default();
        config.weights.reliability = 0.0;
        let mut r2 = Router::new(config);
        r2.set_peers(vec![peer("good", 0, 6), peer("cheat", 0, 6)]);
        r2.reputation_mut().record_failure(&id_of("cheat"));
        let picked: std::collections::HashSet<String> = (0..40)
            .map(|_| r2.plan(all(), 1, now, &mut rng).unwrap()[0].addr.clone())
            .collect();
        assert_eq!(picked.len(), 2);
        assert!(
            ScoreWeights {
                load: f64::NAN,
                ..ScoreWeights::default()
            }
            .validate()
            .is_err()
        );
    }

    #[test]
    fn sessions_spread_over_replicas() {
        let mut r = Router::new(RouterConfig::default());
        r.set_peers(vec![peer("x", 0, 6), peer("y", 0, 6)]);
        let mut rng = StdRng::seed_from_u64(3);
        let now = Instant::now();
        let first = r.plan(all(), 1, now, &mut rng).unwrap()[0].addr.clone();
        r.adjust_sessions(&first, 1);
        let second = r.plan(all(), 1, now, &mut rng).unwrap()[0].addr.clone();
        assert_ne!(first, second);
    }
}
