//! Reachability for nodes behind home routers.
//!
//! - [`portmap`]: a task that maps the node's port on the router through UPnP IGD (igd-next),
//!   renews the lease before it runs out and removes the mapping when it stops. The rest of the
//!   node talks to it through requests and a watch of its state, never to igd directly.
//! - [`stun`]: STUN (RFC 8489) with stun-rs: the address a NAT maps a socket to, asked of
//!   two or more servers to tell an endpoint-independent mapping from an endpoint-dependent
//!   one, and a server, so that every reachable node can answer STUN and the swarm needs no
//!   third-party server.
//! - [`relay`]: a relay that splices callers to nodes nobody can dial, the link such a node
//!   keeps to it, and the dialer, secured end to end with Noise to the node's key.

pub mod portmap;
pub mod relay;
pub mod stun;

use std::time::Duration;

/// What a reachability step can fail with; each names what it was doing.
#[derive(Debug, thiserror::Error)]
pub enum NatError {
    /// A STUN message was malformed, or was not the answer asked for.
    #[error("STUN from {from}: {why}")]
    Stun {
        /// Who sent it.
        from: String,
        /// What is wrong with it.
        why: crate::stun::StunFault,
    },
    /// A STUN server did not answer.
    #[error("STUN server {server} did not answer within {waited:?}")]
    StunTimeout {
        /// The server asked.
        server: String,
        /// How long the retransmissions took.
        waited: Duration,
    },
    /// The router's UPnP IGD could not be found or refused a request.
    #[error("UPnP: {0}")]
    Upnp(String),
    /// A relay refused, failed or broke the protocol; says which and how.
    #[error("{0}")]
    Relay(String),
    /// A setting is invalid; names it.
    #[error("invalid config: {0}")]
    Config(String),
    /// A socket operation failed.
    #[error("{context}: {source}")]
    Io {
        /// What was being done.
        context: String,
        /// The cause.
        source: std::io::Error,
    },
}

impl NatError {
    fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        Self::Io {
            context: context.into(),
            source,
        }
    }
}

/// The local address this host uses to reach `remote`: the routing table's choice, found by
/// connecting a UDP socket (no packet is sent).
pub fn local_ip_toward(remote: std::net::SocketAddr) -> Result<std::net::IpAddr, NatError> {
    let unspecified: std::net::SocketAddr = if remote.is_ipv4() {
        ([0, 0, 0, 0], 0).into()
    } else {
        (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
    };
    let socket = std::net::UdpSocket::bind(unspecified)
        .map_err(|e| NatError::io("binding a probe socket", e))?;
    socket
        .connect(remote)
        .map_err(|e| NatError::io(format!("finding the route to {remote}"), e))?;
    Ok(socket
        .local_addr()
        .map_err(|e| NatError::io("reading the probe socket's address", e))?
        .ip())
}
