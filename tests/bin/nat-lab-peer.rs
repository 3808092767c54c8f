//! The NAT lab's processes inside its namespaces (the lab test runs this with `ip netns exec`).
//!
//! - `stun-server ADDR`: answers STUN on ADDR until stdin closes.
//! - `home PORT`: serves "home\n" to every TCP connection on PORT; maps PORT through the
//!   router's UPnP IGD when `LAB_GATEWAY` names the gateway (lease `LAB_LEASE_SECS`), printing
//!   each state of the mapping; asks the STUN servers in `LAB_STUN` (comma-separated) and
//!   prints the report; on "stop" from stdin, removes the mapping and prints that it did.
//!
//! Every line for the test starts with `LAB ` and carries JSON.

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

fn env(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.is_empty())
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut stdin = BufReader::new(tokio::io::stdin()).lines();
    let cancel = CancellationToken::new();
    match args.iter().map(String::as_str).collect::<Vec<_>>()[..] {
        ["stun-server", addr] => {
            let server = stun::Server::start(addr.parse()?, cancel.clone()).await?;
            say("stun-server", server.addr());
            while stdin.next_line().await?.is_some() {}
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
            while let Some(line) = stdin.next_line().await? {
                if line == "stop" {
                    break;
                }
            }
            if let Some(mapper) = mapper {
                mapper.shutdown().await;
            }
            say("stopped", ());
        }
        _ => anyhow::bail!("usage: nat-lab-peer stun-server ADDR | home PORT"),
    }
    Ok(())
}
