//! The NAT lab's processes inside its namespaces (the lab test runs this with `ip netns exec`).
//!
//! - `stun-server ADDR`: answers STUN on ADDR until stdin closes.
//! - `home PORT`: serves "home\n" to every TCP connection on PORT; maps PORT through the
//!   router's UPnP IGD when `LAB_GATEWAY` names the gateway (lease `LAB_LEASE_SECS`), printing
//!   each state of the mapping; asks the STUN servers in `LAB_STUN` (comma-separated) and
//!   prints the report; on "stop" from stdin, removes the mapping and prints that it did.
//!
//! - `tracker ADDR`: a tracker.
//! - `relay ADDR`: a relay alone.
//! - `node MODEL START END ADDR`: a node serving layers START..END, registering with the
//!   tracker `LAB_TRACKER`; its reachability mode is `LAB_NAT` (default auto), its relay
//!   `LAB_RELAY_VIA` and its UPnP gateway `LAB_GATEWAY`, where set. Prints its id, address
//!   and reachability. The flood tests run it outside the lab too, for a node in a process
//!   of its own.
//! - `generate TRACKER TOKENS PAUSE_AT`: generates through the swarm, printing `paused` after
//!   token PAUSE_AT and going on when stdin says "go"; prints the tokens and failover events.
//!
//! Every line for the test starts with `LAB ` and carries JSON. Each runs until stdin closes.

use std::net::SocketAddr;
use std::time::Duration;

use neuroshard_nat::portmap::{PortMapConfig, PortMapState, PortMapper, Protocol};
use neuroshard_nat::stun::{self, Retransmit};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio_util::sync::CancellationToken;

fn say(kind: &str, value: impl serde::Serialize) {
    println!(
        "LAB {kind} {}",
        serde_json::to_string(&value).expect("serializable")
    );
}

/// Waits for "stop" on stdin, or its end.
async fn until_stop(
    stdin: &mut tokio::io::Lines<BufReader<tokio::io::Stdin>>,
) -> std::io::Result<()> {
    while let Some(line) = stdin.next_line().await? {
        if line == "stop" {
            break;
        }
    }
    Ok(())
}

fn env(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.is_empty())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut stdin = BufReader::new(tokio::io::stdin()).lines();
    let cancel = CancellationToken::new();
    match args.iter().map(String::as_str).collect::<Vec<_>>()[..] {
        ["stun-server", addr] => {
            let server = stun::Server::start(addr.parse()?, cancel.clone()).await?;
            say("stun-server", server.addr());
            until_stop(&mut stdin).await?;
            cancel.cancel();
            server.stopped().await;
        }
        ["home", port] => {
            let port: u16 = port.parse()?;
            let listener = tokio::net::TcpListener::bind(("0.0.0.0", port)).await?;
            tokio::spawn(async move {
                while let Ok((mut socket, _)) = listener.accept().await {
                    let _ = socket.write_all(b"home\n").await;
                }
            });
            let mapper = match env("LAB_GATEWAY") {
                Some(gateway) => {
                    let lease = env("LAB_LEASE_SECS").map_or(Ok(60), |s| s.parse())?;
                    let config = PortMapConfig {
                        gateway: Some(gateway.parse()?),
                        lease: Duration::from_secs(lease),
                        ..PortMapConfig::default()
                    };
                    let mapper = PortMapper::spawn(config, cancel.clone())?;
                    let mut states = mapper.state();
                    tokio::spawn(async move {
                        loop {
                            let state = states.borrow_and_update().clone();
                            if state != PortMapState::Idle {
                                say("portmap", state);
                            }
                            if states.changed().await.is_err() {
                                return;
                            }
                        }
                    });
                    mapper.map(Protocol::Tcp, port).await;
                    Some(mapper)
                }
                None => None,
            };
            if let Some(servers) = env("LAB_STUN") {
                let servers = servers
                    .split(',')
                    .map(str::parse)
                    .collect::<Result<Vec<SocketAddr>, _>>()?;
                say("stun", stun::probe(&servers, Retransmit::default()).await?);
            }
            until_stop(&mut stdin).await?;
            if let Some(mapper) = mapper {
                let last = mapper.state();
                mapper.shutdown().await;
                // The printer task may not have run yet when the process ends: the final state
                // is said here too (a repeated line is harmless to the reader).
                say("portmap", last.borrow().clone());
            }
            say("stopped", ());
        }
        ["tracker", addr] => {
            let tracker = neuroshard_discovery::tracker::start_tracker(
                neuroshard_discovery::tracker::TrackerConfig {
                    listen: addr.parse()?,
                    ..Default::default()
                },
            )
            .await?;
            say("tracker", tracker.addr);
            until_stop(&mut stdin).await?;
        }
        ["relay", addr] => {
            let relay = neuroshard_nat::relay::Relay::start(
                addr.parse()?,
                neuroshard_nat::relay::RelayConfig::default(),
                cancel.clone(),
            )
            .await?;
            say("relay", relay.addr());
            until_stop(&mut stdin).await?;
        }
        ["node", model, start, end, addr] => {
            use neuroshard_node::node::{NodeConfig, start_node};
            let layers = neuroshard_base::LayerRange::new(start.parse()?, end.parse()?)?;
            let mut config = NodeConfig::new(model, layers);
            config.listen = addr.parse()?;
            config.tracker = env("LAB_TRACKER");
            config.discovery.lan = None;
            config.reach.mode = env("LAB_NAT")
                .unwrap_or_else(|| "auto".into())
                .parse()
                .map_err(anyhow::Error::msg)?;
            config.reach.relay = env("LAB_RELAY_VIA");
            config.reach.portmap.gateway = env("LAB_GATEWAY").map(|g| g.parse()).transpose()?;
            let node = start_node(config).await?;
            let reach = node.reachability().borrow().clone();
            say(
                "node",
                serde_json::json!({
                    "id": node.id().to_string(),
                    "addr": node.advertised(),
                    "reach": reach,
                }),
            );
            until_stop(&mut stdin).await?;
            node.shutdown().await;
            say("stopped", ());
        }
        ["generate", tracker, tokens, pause_at] => {
            use neuroshard_client::{ClientConfig, SwarmClient};
            let (tokens, pause_at): (usize, usize) = (tokens.parse()?, pause_at.parse()?);
            let client = SwarmClient::connect(ClientConfig::new(tracker.to_string())).await?;
            let mut session = client.session();
            let prompt = [256, 84, 104, 101, 32, 115, 119, 97, 114, 109];
            let report = neuroshard_client::generate::generate(
                &mut session,
                &prompt,
                tokens,
                &[],
                |_, step| {
                    if step == pause_at {
                        say("paused", step);
                        // The test restarts a process meanwhile; blocking this worker is fine.
                        let mut line = String::new();
                        let _ = std::io::stdin().read_line(&mut line);
                    }
                },
            )
            .await?;
            let chain: Vec<String> = session.chain().into_iter().map(|h| h.addr).collect();
            say(
                "generated",
                serde_json::json!({
                    "ids": report.generated_ids,
                    "chain": chain,
                    "events": session.events(),
                }),
            );
            session.close().await;
        }
        _ => anyhow::bail!(
            "usage: nat-lab-peer stun-server ADDR | home PORT | tracker ADDR | relay ADDR | \
             node MODEL START END ADDR | generate TRACKER TOKENS PAUSE_AT"
        ),
    }
    Ok(())
}
