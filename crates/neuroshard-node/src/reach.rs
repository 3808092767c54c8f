//! How a node makes itself reachable, and the self-test that says whether it is.
//!
//! The chain, tried in order by [`NatMode::Auto`]: the address the node already has (a peer
//! dials it back), a UPnP port mapping on the router, STUN's mapped address (reachable only
//! where the router forwards the port), then a relay found through the tracker or the DHT.
//! Each step is proved by a peer dialing the node back at the address it would announce; the
//! outcome, with advice for the owner, is the node's [`Reachability`]. What to try next given
//! what was learned is decided by the IO-free [`Plan`]; this file makes the probes.

use std::net::SocketAddr;
use std::time::Duration;

use neuroshard_nat::portmap::{PortMapConfig, PortMapState, PortMapper, Protocol};
use neuroshard_nat::relay::{LinkState, RelayedAddr};
use neuroshard_nat::stun::{Mapping, Retransmit};
use neuroshard_proto as pb;
use serde::Serialize;
use tokio::io::DuplexStream;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use neuroshard_net::NodeError;
use neuroshard_net::convert::PeerRecord;
use neuroshard_net::pool::Target;
use neuroshard_net::tls::Dialler;

mod plan;
pub use plan::{Learned, Plan, Probe, ProbeFailed};

/// How long a dial-back may take: connecting, then a ping.
pub const DIAL_BACK_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a relay may take to register the node.
const RELAY_WAIT: Duration = Duration::from_secs(10);
/// Peers asked to dial back before giving up on asking.
const ASK_AT_MOST: usize = 3;

/// Which reachability steps a node tries.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum NatMode {
    /// The chain in order: the address as is, UPnP, STUN, relay.
    Auto,
    /// A UPnP port mapping only.
    Upnp,
    /// STUN's mapped address only (for a router that forwards the port by hand).
    Stun,
    /// A relay only.
    Relay,
    /// None: the node announces its address untested. The default for nodes made in code
    /// (tests, servers with a public address); the CLI and the app default to `auto`.
    #[default]
    Off,
}

impl std::str::FromStr for NatMode {
    type Err = neuroshard_base::Invalid;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(match s {
            "auto" => NatMode::Auto,
            "upnp" => NatMode::Upnp,
            "stun" => NatMode::Stun,
            "relay" => NatMode::Relay,
            "off" => NatMode::Off,
            other => {
                let problem = format!("{other:?} is not auto, upnp, stun, relay or off");
                return Err(neuroshard_base::Invalid::new("nat mode", problem));
            }
        })
    }
}

/// How peers reach the node.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ReachPath {
    /// Not tested (yet, or `--nat off`).
    Untested,
    /// At its own address, or at a port its router forwards by hand.
    Direct,
    /// At a port its router forwards through UPnP.
    Mapped,
    /// Through a relay: an extra hop each way.
    Relayed,
    /// By no path that was tried.
    Unreachable,
}

/// The self-test's outcome, as the node's status shows it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Reachability {
    /// How peers reach the node.
    pub path: ReachPath,
    /// The address it announces.
    pub addr: String,
    /// Plain advice for its owner.
    pub advice: String,
    /// The address STUN saw, where asked.
    pub stun_mapped: Option<String>,
    /// The NAT's mapping as STUN classified it, where it could.
    pub nat_mapping: Option<Mapping>,
    /// The peer that dialed back, where one did.
    pub checked_by: Option<String>,
    /// From the start of the test until the node was reachable (or the test gave up), ms.
    pub took_ms: u64,
}

impl Reachability {
    /// Not tested: the node announces `addr` as it is.
    pub fn untested(addr: &str, advice: &str) -> Self {
        Self {
            path: ReachPath::Untested,
            addr: addr.to_string(),
            advice: advice.to_string(),
            stun_mapped: None,
            nat_mapping: None,
            checked_by: None,
            took_ms: 0,
        }
    }
}

/// What the self-test needs to know.
#[derive(Debug, Clone, Default)]
pub struct ReachConfig {
    /// Which steps to try.
    pub mode: NatMode,
    /// STUN servers; none asks the peers, each of which answers STUN at its own port.
    pub stun_servers: Vec<SocketAddr>,
    /// The relay to use (`host:port`); none picks one that a peer announces.
    pub relay: Option<String>,
    /// How UPnP maps.
    pub portmap: PortMapConfig,
}

/// What the self-test leaves running: the port mapping or relay link the node relies on.
#[derive(Debug, Default)]
pub(crate) struct Kept {
    pub mapper: Option<PortMapper>,
    pub link: Option<tokio::sync::watch::Receiver<LinkState>>,
    /// Ends the relay link.
    pub stop: Option<CancellationToken>,
}

/// The node running the self-test.
pub(crate) struct Subject<'a> {
    pub node_id: neuroshard_base::NodeId,
    /// The address it would announce without NAT traversal.
    pub advertised: String,
    /// Its gRPC port.
    pub port: u16,
    pub key: &'a neuroshard_base::NodeKey,
    /// Where relayed circuits go (the node's server).
    pub circuits: mpsc::Sender<DuplexStream>,
    pub cancel: CancellationToken,
}

/// Runs the steps `config.mode` names against `peers` (who is asked to dial back, and who may
/// relay); the outcome and what must keep running for it to hold.
pub(crate) async fn establish(
    subject: &Subject<'_>,
    config: &ReachConfig,
    peers: &[PeerRecord],
) -> (Reachability, Kept) {
    let started = tokio::time::Instant::now();
    let mut kept = Kept::default();
    let mut reach = run_chain(subject, config, peers, &mut kept).await;
    reach.took_ms = started.elapsed().as_millis() as u64;
    tracing::info!(
        path = ?reach.path,
        addr = %reach.addr,
        took_ms = reach.took_ms,
        "reachability: {}",
        reach.advice
    );
    (reach, kept)
}

/// Drives the [`Plan`]: makes the probes it asks for and keeps the mapping or link its
/// outcome relies on; releases the others.
async fn run_chain(
    subject: &Subject<'_>,
    config: &ReachConfig,
    peers: &[PeerRecord],
    kept: &mut Kept,
) -> Reachability {
    let helpers: Vec<&PeerRecord> = peers
        .iter()
        .filter(|p| p.node_id != subject.node_id && !p.is_relayed())
        .collect();
    let mut plan = new_plan(subject, config, &helpers);
    // The mapping or link made last, until the plan keeps or drops it.
    let mut made = Kept::default();
    let mut probe = plan.start();
    loop {
        let learned = match probe {
            Probe::Done { reach, keep } => {
                match keep {
                    true => *kept = made,
                    false => release(made).await,
                }
                return reach;
            }
            Probe::DialBack(addr) => {
                let asked = dial_back_by_any(helpers.clone(), addr, subject.node_id);
                Learned::DialBack(asked.await)
            }
            Probe::MapPort => {
                release(std::mem::take(&mut made)).await;
                Learned::Mapped(map_port(subject, config, &mut made).await)
            }
            Probe::Stun => {
                release(std::mem::take(&mut made)).await;
                Learned::Stun(ask_stun(config, &helpers).await)
            }
            Probe::Link(relay) => {
                release(std::mem::take(&mut made)).await;
                Learned::Linked(link_relay(subject, &relay, &mut made).await)
            }
        };
        probe = plan.learn(learned);
    }
}

/// The plan for `subject`: peers in `helpers` dial back, and the relays to try are the
/// configured one first, then those the helpers offer.
fn new_plan(subject: &Subject<'_>, config: &ReachConfig, helpers: &[&PeerRecord]) -> Plan {
    let relays: Vec<String> = config
        .relay
        .iter()
        .cloned()
        .chain(
            helpers
                .iter()
                .filter(|p| !p.relay.is_empty())
                .map(|p| p.relay.clone()),
        )
        .collect();
    Plan::new(
        config.mode,
        &subject.advertised,
        subject.port,
        !helpers.is_empty(),
        relays,
    )
}

/// Asks STUN servers (the configured ones, else the helpers) what address the router shows,
/// and how the NAT maps.
async fn ask_stun(
    config: &ReachConfig,
    helpers: &[&PeerRecord],
) -> Result<(Option<SocketAddr>, Option<Mapping>), ProbeFailed> {
    let servers = stun_servers(config, helpers).await;
    match servers.is_empty() {
        true => Err(ProbeFailed::Stun("no server to ask".into())),
        false => neuroshard_nat::stun::probe(&servers, Retransmit::default())
            .await
            .map(|report| (report.external(), report.mapping))
            .map_err(|e| ProbeFailed::Stun(e.to_string())),
    }
}

/// Registers with the relay at `relay`; the relayed address, with the link left in `made`.
async fn link_relay(
    subject: &Subject<'_>,
    relay: &str,
    made: &mut Kept,
) -> Result<String, ProbeFailed> {
    match link_to(subject, relay).await {
        Ok((addr, link, stop)) => {
            made.link = Some(link);
            made.stop = Some(stop);
            Ok(addr.to_string())
        }
        Err(e) => Err(e),
    }
}

/// Maps the node's port with UPnP; the external address, with the mapper left in `made`.
async fn map_port(
    subject: &Subject<'_>,
    config: &ReachConfig,
    made: &mut Kept,
) -> Result<String, ProbeFailed> {
    let mapper = PortMapper::spawn(config.portmap.clone(), subject.cancel.clone())
        .map_err(|e| ProbeFailed::Upnp(e.to_string()))?;
    match mapper.map(Protocol::Tcp, subject.port).await {
        PortMapState::Mapped { external, .. } => {
            made.mapper = Some(mapper);
            Ok(external.to_string())
        }
        state => {
            mapper.shutdown().await;
            Err(ProbeFailed::Upnp(match state {
                PortMapState::Failed { why } => why,
                other => format!("the mapping ended {other:?}"),
            }))
        }
    }
}

/// Undoes a mapping or link the outcome does not rely on.
async fn release(made: Kept) {
    if let Some(mapper) = made.mapper {
        mapper.shutdown().await;
    }
    // Not announced, so not kept registered there either.
    if let Some(stop) = made.stop {
        stop.cancel();
    }
}

fn on_loopback(addr: &str) -> bool {
    addr.parse::<SocketAddr>()
        .is_ok_and(|a| a.ip().is_loopback())
        || addr.starts_with("localhost:")
}

/// Registers with `relay` and waits until it says so; the relayed address and the link.
async fn link_to(
    subject: &Subject<'_>,
    relay: &str,
) -> Result<
    (
        RelayedAddr,
        tokio::sync::watch::Receiver<LinkState>,
        CancellationToken,
    ),
    ProbeFailed,
> {
    let cancel = subject.cancel.child_token();
    let mut link = neuroshard_nat::relay::spawn_link(
        relay.to_string(),
        subject.key.signing_key(),
        subject.circuits.clone(),
        cancel.clone(),
    );
    let registered = tokio::time::timeout(
        RELAY_WAIT,
        link.wait_for(|s| matches!(s, LinkState::Registered { .. })),
    )
    .await
    .ok()
    .and_then(Result::ok)
    .map(|state| state.clone());
    let addr = match registered {
        Some(LinkState::Registered { addr, .. }) => Some(addr),
        _ => None,
    };
    match addr {
        Some(addr) => Ok((addr, link, cancel)),
        None => {
            let why = match &*link.borrow() {
                LinkState::Connecting {
                    last_error: Some(e),
                    ..
                } => e.clone(),
                _ => format!("no registration within {RELAY_WAIT:?}"),
            };
            cancel.cancel();
            Err(ProbeFailed::Relay {
                relay: relay.to_string(),
                why,
            })
        }
    }
}

/// STUN servers: the configured ones, else the peers' own ports (every node answers STUN there).
async fn stun_servers(config: &ReachConfig, helpers: &[&PeerRecord]) -> Vec<SocketAddr> {
    if !config.stun_servers.is_empty() {
        return config.stun_servers.clone();
    }
    let mut servers = Vec::new();
    for peer in helpers.iter().take(4) {
        if let Ok(mut addrs) = tokio::net::lookup_host(&peer.addr).await
            && let Some(addr) = addrs.next()
        {
            servers.push(addr);
        }
    }
    servers
}

/// Asks up to [`ASK_AT_MOST`] of `helpers` in turn to dial `node_id` back at `addr`: Some(Ok(the
/// peer that reached it)), Some(Err(why the first peer that answered could not)), or None when no
/// peer could be asked.
async fn dial_back_by_any(
    helpers: Vec<&PeerRecord>,
    addr: String,
    node_id: neuroshard_base::NodeId,
) -> Option<Result<String, ProbeFailed>> {
    for helper in helpers.into_iter().take(ASK_AT_MOST) {
        let to = Target::node(helper.addr.as_str(), helper.node_id);
        match ask_dial_back(&to, &addr, &node_id).await {
            Ok(reply) if reply.reached => return Some(Ok(helper.addr.clone())),
            Ok(reply) => return Some(Err(ProbeFailed::NotReached(reply.error))),
            Err(e) => tracing::debug!("asking {} to dial back: {e}", helper.addr),
        }
    }
    None
}

/// Asks the node at `helper` to dial `node_id` back at `addr`.
pub async fn ask_dial_back(
    helper: &Target,
    addr: &str,
    node_id: &neuroshard_base::NodeId,
) -> Result<pb::DialBackResponse, NodeError> {
    let dialler = Dialler::ephemeral()?;
    let channel = neuroshard_net::pool::connect(helper, &dialler, Duration::from_secs(3)).await?;
    let mut client = pb::node_client::NodeClient::new(channel);
    let request = pb::DialBackRequest {
        addr: addr.to_string(),
        node_id: node_id.to_string(),
    };
    match tokio::time::timeout(DIAL_BACK_TIMEOUT * 2, client.dial_back(request)).await {
        Ok(Ok(reply)) => Ok(reply.into_inner()),
        Ok(Err(status)) => Err(NodeError::Remote {
            peer: helper.to_string(),
            status,
        }),
        Err(_) => Err(NodeError::Connect {
            peer: helper.to_string(),
            message: "no answer to the dial-back request".into(),
        }),
    }
}

/// Dial-backs a node runs at once; more are refused as busy.
static DIAL_BACKS: tokio::sync::Semaphore = tokio::sync::Semaphore::const_new(4);

/// The answering side: dials `addr` if the rules allow, pings it, and checks who answers.
/// Only an address on the caller's own IP, or a relayed one, is dialed. A relayed address
/// names its relay, which may be anyone's host: its failures are reported without detail, so
/// the test tells nothing about a third party's ports, and only a few run at once.
pub(crate) async fn dial_back(
    caller: Option<SocketAddr>,
    request: pb::DialBackRequest,
) -> pb::DialBackResponse {
    let not = |error: String| pb::DialBackResponse {
        reached: false,
        error,
        rtt_ms: 0.0,
    };
    let addr = request.addr;
    if addr.len() > 300 {
        return not("the address is longer than 300 bytes".into());
    }
    let relayed = match RelayedAddr::parse(&addr) {
        Some(Err(e)) => return not(e.to_string()),
        Some(Ok(_)) => true,
        None => {
            let Ok(target) = addr.parse::<SocketAddr>() else {
                return not(format!("{addr:?} is not an ip:port"));
            };
            match caller {
                Some(caller) if caller.ip() == target.ip() => {}
                Some(caller) => {
                    return not(format!(
                        "{addr} is not on the IP this request came from ({})",
                        caller.ip()
                    ));
                }
                None => return not("the request's own address is unknown".into()),
            }
            false
        }
    };
    let Ok(_permit) = DIAL_BACKS.try_acquire() else {
        return not("busy: too many dial-backs at once, ask again later".into());
    };
    let Ok(node_id) = request.node_id.parse() else {
        return not(format!("{:?} is not a node id", request.node_id));
    };
    let started = tokio::time::Instant::now();
    // The handshake proves the node: another key at the address fails the connection.
    let to = Target::node(addr.as_str(), node_id);
    match tokio::time::timeout(DIAL_BACK_TIMEOUT, ping(&to)).await {
        Err(_) | Ok(Err(_)) if relayed => not(format!("{addr} was not reached through its relay")),
        Err(_) => not(format!(
            "{addr} did not answer within {DIAL_BACK_TIMEOUT:?}"
        )),
        Ok(Err(e)) => not(e.to_string()),
        Ok(Ok(node)) if node.node_id == request.node_id => pb::DialBackResponse {
            reached: true,
            error: String::new(),
            rtt_ms: started.elapsed().as_secs_f64() * 1000.0,
        },
        Ok(Ok(other)) => not(format!("{addr} is another node ({})", other.node_id)),
    }
}

/// Pings the node at `to` over a fresh connection (not pooled: the point is to connect); its
/// record as it answers.
pub(crate) async fn ping(to: &Target) -> Result<pb::PeerInfo, NodeError> {
    let addr = &to.addr;
    let dialler = Dialler::ephemeral()?;
    let channel = neuroshard_net::pool::connect(to, &dialler, Duration::from_secs(3)).await?;
    let reply = pb::node_client::NodeClient::new(channel)
        .ping(pb::PingRequest {})
        .await
        .map_err(|status| NodeError::Remote {
            peer: addr.to_string(),
            status,
        })?;
    reply
        .into_inner()
        .node
        .ok_or_else(|| NodeError::BadRequest(format!("{addr} answered a ping without its record")))
}
