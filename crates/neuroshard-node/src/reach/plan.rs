//! The reachability self-test's plan, with no IO: given what was learned so far, what to try
//! next (ask a peer to dial back, map the port with UPnP, ask STUN, register with a relay) and,
//! at the end, the outcome with advice for the owner. `reach.rs` drives it.

use std::collections::VecDeque;
use std::net::SocketAddr;

use neuroshard_nat::stun::Mapping;

use super::{ASK_AT_MOST, NatMode, ReachPath, Reachability, on_loopback};

/// What the driver does next.
#[derive(Debug, Clone, PartialEq)]
pub enum Probe {
    /// Ask a peer to dial the node back at `addr`; answer with [`Learned::DialBack`].
    DialBack(String),
    /// Map the node's port on the router with UPnP; answer with [`Learned::Mapped`].
    MapPort,
    /// Ask STUN servers what address the router shows; answer with [`Learned::Stun`].
    Stun,
    /// Register with the relay at this address; answer with [`Learned::Linked`].
    Link(String),
    /// The test is over. `keep`: keep the UPnP mapping or relay link last made (the outcome
    /// relies on it); otherwise whatever was made is released.
    Done {
        /// The outcome.
        reach: Reachability,
        /// Whether the last mapping or link stays.
        keep: bool,
    },
}

/// What the last probe learned.
#[derive(Debug, Clone, PartialEq)]
pub enum Learned {
    /// Some(Ok(the peer that dialed back)), Some(Err(why the first peer that answered could
    /// not)), or None when no peer could be asked.
    DialBack(Option<Result<String, ProbeFailed>>),
    /// The external address UPnP mapped, or why it did not.
    Mapped(Result<String, ProbeFailed>),
    /// The address STUN saw and the NAT's mapping, or why STUN could not tell.
    Stun(Result<(Option<SocketAddr>, Option<Mapping>), ProbeFailed>),
    /// The relayed address, or why the relay did not register the node.
    Linked(Result<String, ProbeFailed>),
}

/// Why a probe found no way in; the plan puts it in the owner's advice.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProbeFailed {
    /// The peer asked to dial back could not reach the node, in its words.
    #[error("{0}")]
    NotReached(String),
    /// UPnP mapped nothing.
    #[error("UPnP failed: {0}")]
    Upnp(String),
    /// STUN could not tell the address.
    #[error("STUN: {0}")]
    Stun(String),
    /// The relay did not register the node.
    #[error("relay {relay}: {why}")]
    Relay {
        /// The relay asked.
        relay: String,
        /// What went wrong.
        why: String,
    },
}

/// Where the plan stands: what it asked last.
#[derive(Debug, Clone, PartialEq)]
enum Stage {
    Start,
    Direct,
    Upnp,
    UpnpAsk(String),
    Stun,
    StunAsk(String),
    Relay,
    RelayAsk { addr: String, relay: String },
    Done,
}

/// The self-test of one node.
#[derive(Debug, Clone)]
pub struct Plan {
    mode: NatMode,
    advertised: String,
    port: u16,
    /// Whether any peer can be asked to dial back.
    helpers: bool,
    relays: VecDeque<String>,
    relay_offered: bool,
    stage: Stage,
    why_not: Vec<String>,
    reach: Reachability,
}

impl Plan {
    /// A test of the node announcing `advertised` with its gRPC `port`, trying what `mode`
    /// names; `helpers`: whether peers can be asked to dial back; `relays`: the configured relay
    /// first, then those peers offer.
    pub fn new(
        mode: NatMode,
        advertised: &str,
        port: u16,
        helpers: bool,
        relays: Vec<String>,
    ) -> Self {
        Self {
            mode,
            advertised: advertised.to_string(),
            port,
            helpers,
            relay_offered: !relays.is_empty(),
            relays: relays.into_iter().take(ASK_AT_MOST).collect(),
            stage: Stage::Start,
            why_not: Vec::new(),
            reach: Reachability::untested(advertised, ""),
        }
    }

    /// The first probe.
    pub fn start(&mut self) -> Probe {
        match self.mode {
            NatMode::Off => self.done(
                ReachPath::Untested,
                "Reachability is not tested (NAT traversal is off).".into(),
            ),
            NatMode::Auto => {
                self.stage = Stage::Direct;
                Probe::DialBack(self.advertised.clone())
            }
            _ => self.after_direct(),
        }
    }

    /// What the last probe learned; the next probe.
    pub fn learn(&mut self, learned: Learned) -> Probe {
        let stage = std::mem::replace(&mut self.stage, Stage::Done);
        match (stage, learned) {
            (Stage::Direct, Learned::DialBack(asked)) => self.after_direct_dial_back(asked),
            (Stage::Upnp, Learned::Mapped(mapped)) => self.after_upnp(mapped),
            (Stage::UpnpAsk(external), Learned::DialBack(asked)) => {
                self.after_upnp_dial_back(external, asked)
            }
            (Stage::Stun, Learned::Stun(seen)) => self.after_stun(seen),
            (Stage::StunAsk(forwarded), Learned::DialBack(asked)) => {
                self.after_stun_dial_back(forwarded, asked)
            }
            (Stage::Relay, Learned::Linked(linked)) => self.after_link(linked),
            (Stage::RelayAsk { addr, relay }, Learned::DialBack(asked)) => {
                self.after_relay_dial_back(addr, relay, asked)
            }
            (stage, learned) => panic!("{learned:?} does not answer the probe of {stage:?}"),
        }
    }

    /// A peer dialed the node's own address back: it is reachable directly; else on to UPnP.
    fn after_direct_dial_back(&mut self, asked: Option<Result<String, ProbeFailed>>) -> Probe {
        match asked {
            Some(Ok(by)) => {
                self.reach.checked_by = Some(by);
                let advice = format!("Peers reach this node directly at {}.", self.advertised);
                self.done(ReachPath::Direct, advice)
            }
            _ => self.after_direct(),
        }
    }

    /// UPnP mapped a port: ask a peer to dial it; it did not: on to STUN.
    fn after_upnp(&mut self, mapped: Result<String, ProbeFailed>) -> Probe {
        match mapped {
            Ok(external) => {
                self.stage = Stage::UpnpAsk(external.clone());
                Probe::DialBack(external)
            }
            Err(why) => {
                self.why_not.push(why.to_string());
                self.stun()
            }
        }
    }

    /// The UPnP mapping refused a peer's dial: on to STUN; else the mapping is the way in.
    fn after_upnp_dial_back(
        &mut self,
        external: String,
        asked: Option<Result<String, ProbeFailed>>,
    ) -> Probe {
        if let Some(Err(e)) = asked {
            let why = format!("the UPnP mapping {external} was not reachable ({e})");
            self.why_not.push(why);
            return self.stun();
        }
        self.reach.checked_by = asked.and_then(Result::ok);
        let advice = format!("Your router forwards {external} to this node through UPnP.");
        self.reach.addr = external;
        self.keep(ReachPath::Mapped, advice)
    }

    /// STUN saw the router's address: ask a peer to dial the node's port there (reachable only
    /// if the router forwards it by hand); STUN saw nothing or failed: on to the relays.
    fn after_stun(
        &mut self,
        seen: Result<(Option<SocketAddr>, Option<Mapping>), ProbeFailed>,
    ) -> Probe {
        let (mapped, nat) = match seen {
            Ok(seen) => seen,
            Err(why) => {
                self.why_not.push(why.to_string());
                return self.relay();
            }
        };
        self.reach.nat_mapping = nat;
        let Some(mapped) = mapped else {
            return self.relay();
        };
        self.reach.stun_mapped = Some(mapped.to_string());
        // Reachable there only if the router forwards the node's port by hand.
        let forwarded = SocketAddr::new(mapped.ip(), self.port).to_string();
        self.stage = Stage::StunAsk(forwarded.clone());
        Probe::DialBack(forwarded)
    }

    /// A peer dialed the port the router may forward: reachable directly; else on to relays.
    fn after_stun_dial_back(
        &mut self,
        forwarded: String,
        asked: Option<Result<String, ProbeFailed>>,
    ) -> Probe {
        match asked {
            Some(Ok(by)) => {
                self.reach.checked_by = Some(by);
                let advice = format!("Your router forwards {forwarded} to this node.");
                self.reach.addr = forwarded;
                self.done(ReachPath::Direct, advice)
            }
            Some(Err(e)) => {
                self.why_not
                    .push(format!("{forwarded} is not forwarded ({e})"));
                self.relay()
            }
            None => {
                self.why_not.push("no peer could dial back".into());
                self.relay()
            }
        }
    }

    /// The relay registered the node: ask a peer to dial the relayed address; it refused: the
    /// next relay.
    fn after_link(&mut self, linked: Result<String, ProbeFailed>) -> Probe {
        match linked {
            Ok(addr) => {
                let relay = self.relays.pop_front().expect("the relay just linked");
                self.stage = Stage::RelayAsk {
                    addr: addr.clone(),
                    relay,
                };
                Probe::DialBack(addr)
            }
            Err(why) => {
                self.relays.pop_front();
                self.why_not.push(why.to_string());
                self.relay()
            }
        }
    }

    /// The relayed address refused a peer's dial: the next relay; else the relay is the way
    /// in.
    fn after_relay_dial_back(
        &mut self,
        addr: String,
        relay: String,
        asked: Option<Result<String, ProbeFailed>>,
    ) -> Probe {
        if let Some(Err(e)) = asked {
            self.why_not
                .push(format!("relayed at {addr}, not reachable: {e}"));
            return self.relay();
        }
        self.reach.checked_by = asked.and_then(Result::ok);
        self.reach.addr = addr;
        let advice = format!(
            "Peers reach this node through the relay at {relay}, an extra hop. For a \
             direct path, enable UPnP on your router or forward TCP port {} to this PC.",
            self.port
        );
        self.keep(ReachPath::Relayed, advice)
    }

    /// After the node's own address: a loopback address ends the test, else UPnP.
    fn after_direct(&mut self) -> Probe {
        if self.mode == NatMode::Auto && on_loopback(&self.advertised) {
            let advice = "The node announces a loopback address: only this machine reaches it, \
                          and there is no router to traverse.";
            return self.done(ReachPath::Untested, advice.into());
        }
        if matches!(self.mode, NatMode::Auto | NatMode::Upnp) {
            self.stage = Stage::Upnp;
            return Probe::MapPort;
        }
        self.stun()
    }

    fn stun(&mut self) -> Probe {
        if matches!(self.mode, NatMode::Auto | NatMode::Stun) {
            self.stage = Stage::Stun;
            return Probe::Stun;
        }
        self.relay()
    }

    /// The next relay to try, or the end.
    fn relay(&mut self) -> Probe {
        if matches!(self.mode, NatMode::Auto | NatMode::Relay) {
            if let Some(relay) = self.relays.front() {
                self.stage = Stage::Relay;
                return Probe::Link(relay.clone());
            }
            if !self.relay_offered {
                self.why_not.push("no peer offers a relay".into());
            }
        }
        self.finish()
    }

    /// Nothing worked: unknown without a peer to ask, else unreachable.
    fn finish(&mut self) -> Probe {
        let port = self.port;
        let why_not = self.why_not.join("; ");
        if !self.helpers {
            let advice = format!(
                "No peer was there to dial this node back, so its reachability is unknown. \
                 If peers cannot reach it, enable UPnP on your router or forward TCP port \
                 {port} to this PC. ({why_not})"
            );
            return self.done(ReachPath::Untested, advice);
        }
        let advice = format!(
            "Peers cannot reach this node. Enable UPnP on your router, or forward TCP port \
             {port} to this PC. ({why_not})"
        );
        self.done(ReachPath::Unreachable, advice)
    }

    fn done(&mut self, path: ReachPath, advice: String) -> Probe {
        self.end(path, advice, false)
    }

    fn keep(&mut self, path: ReachPath, advice: String) -> Probe {
        self.end(path, advice, true)
    }

    fn end(&mut self, path: ReachPath, advice: String, keep: bool) -> Probe {
        self.stage = Stage::Done;
        let mut reach = self.reach.clone();
        reach.path = path;
        reach.advice = advice;
        Probe::Done { reach, keep }
    }
}

#[cfg(test)]
mod tests {
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};

    use super::*;

    const MODES: [NatMode; 5] = [
        NatMode::Auto,
        NatMode::Upnp,
        NatMode::Stun,
        NatMode::Relay,
        NatMode::Off,
    ];

    fn dial_back(rng: &mut StdRng, helpers: bool) -> Learned {
        Learned::DialBack(match rng.random_range(0..3) {
            _ if !helpers => None,
            0 => Some(Ok("peer:1".into())),
            1 => Some(Err(ProbeFailed::NotReached("refused".into()))),
            _ => None,
        })
    }

    /// Every answer to every probe at random: the plan ends, tries only what its mode names, at
    /// most three relays, and claims a path only on the evidence of the probe before.
    #[test]
    fn every_seeded_schedule_ends_within_the_mode_with_a_path_its_evidence_supports() {
        let mut outcomes = std::collections::BTreeMap::new();
        for seed in 0..5000 {
            let mut rng = StdRng::seed_from_u64(seed);
            let mode = MODES[rng.random_range(0..MODES.len())];
            let helpers = rng.random_bool(0.8);
            let relays: Vec<String> = (0..rng.random_range(0..5))
                .map(|i| format!("relay{i}:7"))
                .collect();
            let advertised = ["10.0.0.2:7", "127.0.0.1:7"][rng.random_range(0..2)];
            let mut plan = Plan::new(mode, advertised, 7, helpers, relays);
            let mut probe = plan.start();
            let mut trail: Vec<Probe> = Vec::new();
            let (reach, keep) = loop {
                assert!(trail.len() < 20, "seed {seed}: the plan never ends");
                let learned = match &probe {
                    Probe::Done { reach, keep } => break (reach.clone(), *keep),
                    Probe::DialBack(_) => dial_back(&mut rng, helpers),
                    Probe::MapPort => Learned::Mapped(match rng.random_bool(0.5) {
                        true => Ok("203.0.113.5:7".into()),
                        false => Err(ProbeFailed::Upnp("no gateway".into())),
                    }),
                    Probe::Stun => Learned::Stun(match rng.random_range(0..3) {
                        0 => Ok((Some("203.0.113.5:4000".parse().unwrap()), None)),
                        1 => Ok((None, None)),
                        _ => Err(ProbeFailed::Stun("timed out".into())),
                    }),
                    Probe::Link(_) => Learned::Linked(match rng.random_bool(0.5) {
                        true => Ok(format!("relay://r/{seed}")),
                        false => Err(ProbeFailed::Relay {
                            relay: "r".into(),
                            why: "refused".into(),
                        }),
                    }),
                };
                trail.push(probe.clone());
                probe = plan.learn(learned);
            };
            let tried = |f: fn(&Probe) -> bool| trail.iter().any(f);
            if mode != NatMode::Auto && mode != NatMode::Upnp {
                assert!(!tried(|p| *p == Probe::MapPort), "seed {seed}");
            }
            if mode != NatMode::Auto && mode != NatMode::Stun {
                assert!(!tried(|p| *p == Probe::Stun), "seed {seed}");
            }
            if mode != NatMode::Auto && mode != NatMode::Relay {
                assert!(!tried(|p| matches!(p, Probe::Link(_))), "seed {seed}");
            }
            if mode == NatMode::Off {
                assert!(trail.is_empty());
            }
            let links = trail.iter().filter(|p| matches!(p, Probe::Link(_))).count();
            assert!(links <= ASK_AT_MOST, "seed {seed}");
            // A claimed path follows the probe that supports it; only a mapping or a link is
            // kept, and only when it is the outcome.
            let before = trail.iter().rev().nth(1);
            match reach.path {
                ReachPath::Mapped => assert_eq!(before, Some(&Probe::MapPort), "seed {seed}"),
                ReachPath::Relayed => {
                    assert!(matches!(before, Some(Probe::Link(_))), "seed {seed}")
                }
                ReachPath::Direct => {
                    assert!(
                        matches!(trail.last(), Some(Probe::DialBack(_))),
                        "seed {seed}"
                    )
                }
                ReachPath::Unreachable => assert!(helpers, "seed {seed}: nobody was asked"),
                ReachPath::Untested => {}
            }
            assert_eq!(
                keep,
                matches!(reach.path, ReachPath::Mapped | ReachPath::Relayed),
                "seed {seed}"
            );
            *outcomes.entry(format!("{:?}", reach.path)).or_insert(0) += 1;
        }
        assert_eq!(outcomes.len(), 5, "every path reached: {outcomes:?}");
    }

    #[test]
    fn auto_tries_the_address_upnp_stun_then_relays_and_names_every_failure() {
        let relays = vec!["r1:7".to_string()];
        let mut plan = Plan::new(NatMode::Auto, "10.0.0.2:7", 7, true, relays);
        assert_eq!(plan.start(), Probe::DialBack("10.0.0.2:7".into()));
        let refused = || Learned::DialBack(Some(Err(ProbeFailed::NotReached("refused".into()))));
        assert_eq!(plan.learn(refused()), Probe::MapPort);
        let upnp = Learned::Mapped(Err(ProbeFailed::Upnp("no gateway".into())));
        assert_eq!(plan.learn(upnp), Probe::Stun);
        let seen = Learned::Stun(Ok((Some("203.0.113.5:4000".parse().unwrap()), None)));
        assert_eq!(plan.learn(seen), Probe::DialBack("203.0.113.5:7".into()));
        assert_eq!(plan.learn(refused()), Probe::Link("r1:7".into()));
        let linked = Learned::Linked(Ok("relay://r1/k".into()));
        assert_eq!(plan.learn(linked), Probe::DialBack("relay://r1/k".into()));
        let Probe::Done { reach, keep } = plan.learn(refused()) else {
            panic!("the end");
        };
        assert!(!keep);
        assert_eq!(reach.path, ReachPath::Unreachable);
        assert_eq!(reach.stun_mapped.as_deref(), Some("203.0.113.5:4000"));
        for why in [
            "UPnP failed: no gateway",
            "203.0.113.5:7 is not forwarded (refused)",
            "relayed at relay://r1/k, not reachable: refused",
        ] {
            assert!(reach.advice.contains(why), "{}", reach.advice);
        }
    }
}
