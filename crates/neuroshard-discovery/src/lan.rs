//! LAN discovery over mDNS (DNS-SD): a serving node announces its DHT contact as a service
//! instance; every node and client browses for the others and hands what it finds to its DHT.

use neuroshard_base::sync::LockExt;
use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};

use mdns_sd::{IfKind, ServiceDaemon, ServiceEvent, ServiceInfo};
use neuroshard_base::NodeId;
use neuroshard_dht::{Contact, Key};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::dht::DhtHandle;
use neuroshard_net::NodeError;

/// The DNS-SD service type NeuroShard nodes announce.
pub const SERVICE_TYPE: &str = "_neuroshard._tcp.local.";

/// Peers remembered from the LAN at most: a home or office LAN has far fewer nodes, and anyone
/// on it can announce as many as they like.
const MAX_LAN_PEERS: usize = 256;

/// The standard mDNS port (RFC 6762).
pub const MDNS_PORT: u16 = 5353;

/// How to look for peers on the LAN.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LanConfig {
    /// DNS-SD service type. Default [`SERVICE_TYPE`]; tests use one of their own so that
    /// swarms on one machine do not meet.
    pub service: String,
    /// UDP port. Default 5353, the standard one, so that other mDNS responders on the machine
    /// share it.
    pub port: u16,
    /// Announce and browse on the loopback interface only: for swarms on one machine (tests).
    /// Default false: every interface but loopback.
    pub loopback: bool,
}

impl Default for LanConfig {
    fn default() -> Self {
        Self {
            service: SERVICE_TYPE.to_string(),
            port: MDNS_PORT,
            loopback: false,
        }
    }
}

/// A running mDNS responder and browser.
pub struct Lan {
    daemon: ServiceDaemon,
    /// By service instance name.
    found: Arc<Mutex<BTreeMap<String, Contact>>>,
    count: watch::Receiver<usize>,
}

fn mdns_error(e: mdns_sd::Error) -> NodeError {
    NodeError::Config(format!("lan discovery: {e}"))
}

/// The mDNS daemon on the interfaces `config` names, announcing `me` when it serves.
fn announce(config: &LanConfig, me: Option<Contact>) -> Result<ServiceDaemon, NodeError> {
    let daemon = ServiceDaemon::new_with_port(config.port).map_err(mdns_error)?;
    if config.loopback {
        daemon.disable_interface(IfKind::All).map_err(mdns_error)?;
        daemon
            .enable_interface(IfKind::LoopbackV4)
            .map_err(mdns_error)?;
    } else {
        daemon
            .disable_interface(vec![IfKind::LoopbackV4, IfKind::LoopbackV6])
            .map_err(mdns_error)?;
    }
    if let Some(mut me) = me {
        // A node that advertises loopback is announced with each interface's address.
        if me.addr.ip().is_loopback() && !config.loopback {
            me.addr.set_ip(IpAddr::from([0, 0, 0, 0]));
        }
        daemon
            .register(service_info(&config.service, me)?)
            .map_err(mdns_error)?;
    }
    Ok(daemon)
}

/// Records what a browse event says in `found` (at most [`MAX_LAN_PEERS`], never this node
/// itself); the contact when it is new.
fn take_event(
    event: ServiceEvent,
    found: &Mutex<BTreeMap<String, Contact>>,
    own: Option<Key>,
) -> Option<Contact> {
    match event {
        ServiceEvent::ServiceResolved(service) => match contact_of(&service) {
            Some(contact) if Some(contact.key) != own => {
                let mut found = found.lock_or_recover();
                let room =
                    found.len() < MAX_LAN_PEERS || found.contains_key(service.get_fullname());
                let new = room
                    && found.insert(service.get_fullname().to_string(), contact) != Some(contact);
                new.then_some(contact)
            }
            _ => None,
        },
        ServiceEvent::ServiceRemoved(_, name) => {
            found.lock_or_recover().remove(&name);
            None
        }
        _ => None,
    }
}

impl Lan {
    /// Announces `me` (a serving node; none for a client) and browses for others, adding each
    /// one found to `dht`, until `cancel` fires.
    pub fn start(
        config: &LanConfig,
        me: Option<Contact>,
        dht: DhtHandle,
        cancel: CancellationToken,
    ) -> Result<Self, NodeError> {
        let daemon = announce(config, me)?;
        let events = daemon.browse(&config.service).map_err(mdns_error)?;
        let found = Arc::new(Mutex::new(BTreeMap::new()));
        let (count_tx, count) = watch::channel(0);
        let own = me.map(|c| c.key);
        let shared = found.clone();
        let stopping = daemon.clone();
        tokio::spawn(async move {
            loop {
                let event = tokio::select! {
                    _ = cancel.cancelled() => break,
                    event = events.recv_async() => match event {
                        Ok(event) => event,
                        Err(_) => break,
                    },
                };
                if let Some(contact) = take_event(event, &shared, own) {
                    tracing::info!(peer = %contact.addr, "found a peer on the LAN");
                    dht.add_candidates(vec![contact]).await;
                }
                count_tx.send_if_modified(|n| {
                    let now = shared.lock_or_recover().len();
                    let changed = *n != now;
                    *n = now;
                    changed
                });
            }
            let _ = stopping.shutdown();
        });
        Ok(Self {
            daemon,
            found,
            count,
        })
    }

    /// The peers found so far.
    pub fn found(&self) -> Vec<Contact> {
        self.found.lock_or_recover().values().copied().collect()
    }

    /// A watch of how many peers are found (it changes as they come and go).
    pub fn count(&self) -> watch::Receiver<usize> {
        self.count.clone()
    }
}

impl std::fmt::Debug for Lan {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Lan").field("found", &self.found).finish()
    }
}

impl Drop for Lan {
    fn drop(&mut self) {
        let _ = self.daemon.shutdown();
    }
}

/// The service instance announcing `me`: named by the first 16 hex digits of its id, the full
/// id in the TXT record. An unspecified address lets the responder fill in each interface's.
fn service_info(service: &str, me: Contact) -> Result<ServiceInfo, NodeError> {
    let id = hex::encode(me.key.0);
    let instance = &id[..16];
    let host = format!("neuroshard-{instance}.local.");
    let properties = [("id", id.as_str()), ("v", "1")];
    let ip = me.addr.ip();
    let info = if ip.is_unspecified() {
        ServiceInfo::new(
            service,
            instance,
            &host,
            "",
            me.addr.port(),
            &properties[..],
        )
        .map(ServiceInfo::enable_addr_auto)
    } else {
        ServiceInfo::new(
            service,
            instance,
            &host,
            ip,
            me.addr.port(),
            &properties[..],
        )
    };
    info.map_err(mdns_error)
}

/// The DHT contact a resolved instance announces; none when its id or address is missing.
fn contact_of(service: &mdns_sd::ResolvedService) -> Option<Contact> {
    let id: NodeId = service.get_property_val_str("id")?.parse().ok()?;
    let ip = service
        .get_addresses_v4()
        .into_iter()
        .min()
        .map(IpAddr::V4)?;
    (service.get_port() != 0).then(|| Contact {
        key: Key::of_node(&id),
        addr: SocketAddr::new(ip, service.get_port()),
    })
}
