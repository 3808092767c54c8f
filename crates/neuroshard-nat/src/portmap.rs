//! Port mapping on the home router through UPnP IGD (igd-next), as a task behind requests and a
//! watch of its state: the rest of the node asks for a port to be mapped and reads what
//! happened, and never touches igd itself.
//!
//! The task finds the gateway by SSDP (multicast, or unicast to a configured gateway), maps
//! the port for a lease, renews it at half the lease, maps afresh if a renewal is refused (the
//! router restarted and forgot it), and removes the mapping when asked, when a new port is
//! asked for, and when it stops.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use igd_next::aio::Gateway;
use igd_next::aio::tokio::{Tokio, search_gateway};
use igd_next::{AddPortError, PortMappingProtocol, SearchOptions};
use serde::Serialize;
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::NatError;

/// How the task maps.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PortMapConfig {
    /// Where the SSDP search goes: `None` multicasts it to 239.255.255.250:1900, as routers
    /// expect; an address sends it to that gateway alone. Default `None`.
    pub gateway: Option<IpAddr>,
    /// The lease asked for; renewed at half of it. Default 1 h (a node that dies leaves a
    /// forward behind for at most that long).
    pub lease: Duration,
    /// How long the gateway search may take. Default 5 s.
    pub search_timeout: Duration,
    /// The mapping's description in the router's table.
    pub description: String,
}

impl Default for PortMapConfig {
    fn default() -> Self {
        Self {
            gateway: None,
            lease: Duration::from_secs(3600),
            search_timeout: Duration::from_secs(5),
            description: "NeuroShard node".into(),
        }
    }
}

impl PortMapConfig {
    /// Names the first invalid field.
    pub fn validate(&self) -> Result<(), NatError> {
        if self.lease < Duration::from_secs(2) || self.lease > Duration::from_secs(604_800) {
            return Err(NatError::Config(format!(
                "portmap.lease: {:?} is not within 2 s..7 days",
                self.lease
            )));
        }
        if self.search_timeout.is_zero() {
            return Err(NatError::Config(
                "portmap.search_timeout: must be positive".into(),
            ));
        }
        if self.description.is_empty() || self.description.len() > 64 {
            return Err(NatError::Config(
                "portmap.description: must be 1..=64 bytes".into(),
            ));
        }
        Ok(())
    }
}

/// The transport of a mapping.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    /// TCP (the node's gRPC port).
    Tcp,
    /// UDP (its STUN port).
    Udp,
}

impl From<Protocol> for PortMappingProtocol {
    fn from(p: Protocol) -> Self {
        match p {
            Protocol::Tcp => PortMappingProtocol::TCP,
            Protocol::Udp => PortMappingProtocol::UDP,
        }
    }
}

/// What the task is doing, and what it last achieved.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum PortMapState {
    /// Nothing asked yet.
    Idle,
    /// Searching for the gateway and asking it for the mapping.
    Mapping,
    /// The router forwards `external` to `internal`.
    Mapped {
        /// The protocol mapped.
        protocol: Protocol,
        /// The router's address and port peers dial.
        external: SocketAddr,
        /// This host's address and port behind the router.
        internal: SocketAddr,
        /// The gateway's control URL.
        gateway: String,
        /// The lease asked for, in seconds.
        lease_secs: u32,
        /// Renewals so far.
        renewals: u32,
    },
    /// Mapping failed; the reason, for people.
    Failed {
        /// Why.
        why: String,
    },
    /// The mapping was removed (or there was none to remove).
    Removed,
}

enum Request {
    Map { protocol: Protocol, port: u16 },
    Remove,
}

/// The port-mapping task.
#[derive(Debug)]
pub struct PortMapper {
    requests: mpsc::Sender<Request>,
    state: watch::Receiver<PortMapState>,
    cancel: CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

impl std::fmt::Debug for Request {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Request::Map { protocol, port } => write!(f, "Map({protocol:?} {port})"),
            Request::Remove => write!(f, "Remove"),
        }
    }
}

impl PortMapper {
    /// Starts the task; it stops (removing its mapping) when `cancel` fires or on
    /// [`PortMapper::shutdown`].
    pub fn spawn(config: PortMapConfig, cancel: CancellationToken) -> Result<Self, NatError> {
        config.validate()?;
        let (requests, inbox) = mpsc::channel(8);
        let (state, watch) = watch::channel(PortMapState::Idle);
        let cancel = cancel.child_token();
        let task = tokio::spawn(run(config, inbox, state, cancel.clone()));
        Ok(Self {
            requests,
            state: watch,
            cancel,
            task,
        })
    }

    /// A watch of the task's state: every change is an event.
    pub fn state(&self) -> watch::Receiver<PortMapState> {
        self.state.clone()
    }

    /// Asks for `port` of this host to be mapped (replacing any earlier mapping) and waits for
    /// the outcome: [`PortMapState::Mapped`] or [`PortMapState::Failed`].
    pub async fn map(&self, protocol: Protocol, port: u16) -> PortMapState {
        let mut state = self.state.clone();
        state.borrow_and_update();
        if self
            .requests
            .send(Request::Map { protocol, port })
            .await
            .is_err()
        {
            return PortMapState::Failed {
                why: "the port-mapping task has stopped".into(),
            };
        }
        // The task moves to Mapping first, then to the outcome.
        let outcome = state
            .wait_for(|s| {
                matches!(s, PortMapState::Mapped { internal, .. } if internal.port() == port)
                    || matches!(s, PortMapState::Failed { .. })
            })
            .await;
        match outcome {
            Ok(s) => s.clone(),
            Err(_) => PortMapState::Failed {
                why: "the port-mapping task has stopped".into(),
            },
        }
    }

    /// Removes the mapping and waits until the router has been asked.
    pub async fn remove(&self) {
        let mut state = self.state.clone();
        state.borrow_and_update();
        if self.requests.send(Request::Remove).await.is_ok() {
            let _ = state.wait_for(|s| *s == PortMapState::Removed).await;
        }
    }

    /// Removes the mapping and ends the task.
    pub async fn shutdown(self) {
        self.cancel.cancel();
        let _ = self.task.await;
    }
}

/// A mapping the task holds.
struct Active {
    gateway: Gateway<Tokio>,
    protocol: Protocol,
    external: SocketAddr,
    internal: SocketAddr,
    renewals: u32,
    renew_at: Instant,
}

impl Active {
    fn state(&self, lease_secs: u32) -> PortMapState {
        PortMapState::Mapped {
            protocol: self.protocol,
            external: self.external,
            internal: self.internal,
            gateway: self.gateway.to_string(),
            lease_secs,
            renewals: self.renewals,
        }
    }
}

async fn run(
    config: PortMapConfig,
    mut inbox: mpsc::Receiver<Request>,
    state: watch::Sender<PortMapState>,
    cancel: CancellationToken,
) {
    let mut active: Option<Active> = None;
    // After a failed renewal: when to try again, for which port.
    let mut retry: Option<(Instant, Protocol, u16)> = None;
    loop {
        let renew_at = active.as_ref().map(|a| a.renew_at);
        tokio::select! {
            biased;
            _ = cancel.cancelled() => break,
            request = inbox.recv() => match request {
                None => break,
                Some(Request::Map { protocol, port }) => {
                    retry = None;
                    if let Some(old) = active.take() {
                        remove(&old).await;
                    }
                    state.send_replace(PortMapState::Mapping);
                    active = map_and_tell(&config, protocol, port, &state).await;
                }
                Some(Request::Remove) => {
                    retry = None;
                    if let Some(old) = active.take() {
                        remove(&old).await;
                    }
                    state.send_replace(PortMapState::Removed);
                }
            },
            _ = sleep_until(renew_at) => {
                let a = active.as_mut().expect("a renewal time only while mapped");
                if !renew(a, &config, &state).await {
                    // Mapped afresh at once.
                    retry = Some((Instant::now(), a.protocol, a.internal.port()));
                    active = None;
                }
            },
            _ = sleep_until(retry.map(|r| r.0)) => {
                let (_, protocol, port) = retry.take().expect("a retry time only when set");
                active = map_and_tell(&config, protocol, port, &state).await;
                if active.is_none() {
                    // The router may be rebooting: try again after a while.
                    let later = (config.lease / 2).min(Duration::from_secs(60));
                    retry = Some((Instant::now() + later, protocol, port));
                }
            },
        }
    }
    if let Some(old) = active.take() {
        remove(&old).await;
    }
    state.send_replace(PortMapState::Removed);
}

/// Renews the lease of mapping `a` and publishes it; false when the gateway refused.
async fn renew(
    a: &mut Active,
    config: &PortMapConfig,
    state: &watch::Sender<PortMapState>,
) -> bool {
    let lease_secs = config.lease.as_secs() as u32;
    let renewed = a
        .gateway
        .add_port(
            a.protocol.into(),
            a.external.port(),
            a.internal,
            lease_secs,
            &config.description,
        )
        .await;
    match renewed {
        Ok(()) => {
            a.renewals += 1;
            a.renew_at = Instant::now() + config.lease / 2;
            tracing::debug!("renewed the UPnP mapping {} -> {}", a.external, a.internal);
            state.send_replace(a.state(lease_secs));
            true
        }
        Err(e) => {
            tracing::warn!(
                "renewing the UPnP mapping {} failed ({e}); mapping afresh",
                a.external
            );
            false
        }
    }
}

/// Maps `port` and publishes the outcome: the mapping held, or why there is none.
async fn map_and_tell(
    config: &PortMapConfig,
    protocol: Protocol,
    port: u16,
    state: &watch::Sender<PortMapState>,
) -> Option<Active> {
    match establish(config, protocol, port).await {
        Ok(new) => {
            state.send_replace(new.state(config.lease.as_secs() as u32));
            Some(new)
        }
        Err(e) => {
            state.send_replace(PortMapState::Failed { why: e.to_string() });
            None
        }
    }
}

/// Sleeps until `at`; forever when there is no `at`.
async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// Finds the gateway and maps `port`: the same external port where it is free, else one the
/// router picks.
async fn establish(
    config: &PortMapConfig,
    protocol: Protocol,
    port: u16,
) -> Result<Active, NatError> {
    if port == 0 {
        return Err(NatError::Config("portmap: port 0 cannot be mapped".into()));
    }
    let mut options = SearchOptions::default();
    if let Some(ip) = config.gateway {
        options.broadcast_address = SocketAddr::new(ip, 1900);
    }
    options.timeout = Some(config.search_timeout);
    options.single_search_timeout = Some(config.search_timeout);
    let gateway = search_gateway(options)
        .await
        .map_err(|e| NatError::Upnp(format!("no UPnP gateway answered: {e}")))?;
    let internal = SocketAddr::new(crate::local_ip_toward(gateway.addr)?, port);
    let lease_secs = config.lease.as_secs() as u32;
    let description = &config.description;
    let external_port = match gateway
        .add_port(protocol.into(), port, internal, lease_secs, description)
        .await
    {
        Ok(()) => port,
        Err(AddPortError::PortInUse) => gateway
            .add_any_port(protocol.into(), internal, lease_secs, description)
            .await
            .map_err(|e| NatError::Upnp(format!("the router would not map {internal}: {e}")))?,
        Err(e) => {
            return Err(NatError::Upnp(format!(
                "the router would not map {internal}: {e}"
            )));
        }
    };
    let external_ip = gateway
        .get_external_ip()
        .await
        .map_err(|e| NatError::Upnp(format!("the router did not say its external address: {e}")))?;
    let external = SocketAddr::new(external_ip, external_port);
    tracing::info!("UPnP: {gateway} forwards {external} to {internal}");
    Ok(Active {
        gateway,
        protocol,
        external,
        internal,
        renewals: 0,
        renew_at: Instant::now() + config.lease / 2,
    })
}

/// Asks the router to drop the mapping (best effort: a router that is gone cannot be asked).
async fn remove(active: &Active) {
    let removed = tokio::time::timeout(
        Duration::from_secs(5),
        active
            .gateway
            .remove_port(active.protocol.into(), active.external.port()),
    )
    .await;
    match removed {
        Ok(Ok(())) => tracing::info!("UPnP: removed the mapping {}", active.external),
        Ok(Err(e)) => tracing::warn!("UPnP: removing the mapping {}: {e}", active.external),
        Err(_) => tracing::warn!(
            "UPnP: the router did not answer the removal of {}",
            active.external
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn invalid_settings_are_named() {
        let bad = |f: fn(&mut PortMapConfig)| {
            let mut c = PortMapConfig::default();
            f(&mut c);
            c.validate().unwrap_err().to_string()
        };
        assert!(bad(|c| c.lease = Duration::from_secs(1)).contains("portmap.lease"));
        assert!(bad(|c| c.search_timeout = Duration::ZERO).contains("portmap.search_timeout"));
        assert!(bad(|c| c.description = String::new()).contains("portmap.description"));
        PortMapConfig::default().validate().unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn no_gateway_is_a_named_failure_and_the_task_still_answers() {
        // A unicast search to an address nothing listens on: the search times out.
        let config = PortMapConfig {
            gateway: Some(IpAddr::from([127, 0, 0, 1])),
            search_timeout: Duration::from_millis(200),
            ..PortMapConfig::default()
        };
        let cancel = CancellationToken::new();
        let mapper = PortMapper::spawn(config, cancel).unwrap();
        match mapper.map(Protocol::Tcp, 7000).await {
            PortMapState::Failed { why } => assert!(why.contains("no UPnP gateway"), "{why}"),
            other => panic!("{other:?}"),
        }
        mapper.remove().await;
        assert_eq!(*mapper.state().borrow(), PortMapState::Removed);
        mapper.shutdown().await;
    }
}
