//! Nodes reached through a relay, on loopback: a node finds a relay through the tracker,
//! passes the dial-back test through it, and serves in a chain whose tokens match the local
//! run; a relay restarted mid-session is ridden out with the same tokens.

use std::net::SocketAddr;

use neuroshard_base::NodeId;
use neuroshard_client::generate::generate;
use neuroshard_client::{ClientConfig, SwarmClient};
use neuroshard_model::init::ModelSpec;
use neuroshard_nat::relay::{Relay, RelayConfig};
use neuroshard_net::pool::Target;
use neuroshard_node::node::RelayServe;
use neuroshard_node::reach::{NatMode, ReachConfig, ReachPath};
use neuroshard_tests::{Swarm, TestModel};
use tokio_util::sync::CancellationToken;

use crate::generation::{PROMPT, assert_same_generation, local_reference};

const NEW_TOKENS: usize = 12;

fn loopback() -> SocketAddr {
    "127.0.0.1:0".parse().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_nobody_dials_is_reached_through_a_relay_a_peer_offers() {
    let model = TestModel::new(&ModelSpec::tiny());
    let expected = local_reference(&model, NEW_TOKENS).await;
    let mut swarm = Swarm::start(model.path(), &[]).await.unwrap();
    swarm
        .add_node_with(model.path(), 0, 2, |c| {
            c.serve_relay = Some(RelayServe {
                listen: loopback(),
                config: RelayConfig::default(),
            });
        })
        .await
        .unwrap();
    let public = swarm.nodes[0].advertised();
    // Relay mode skips the direct path, as a node behind a NAT would find it closed.
    swarm
        .add_node_with(model.path(), 2, 4, |c| {
            c.reach = ReachConfig {
                mode: NatMode::Relay,
                ..ReachConfig::default()
            };
        })
        .await
        .unwrap();
    let home = &swarm.nodes[1];
    let reach = home.reachability().borrow().clone();
    assert_eq!(reach.path, ReachPath::Relayed, "{reach:?}");
    let relay_port = swarm.nodes[0].relay().unwrap().addr().port();
    assert_eq!(
        reach.addr,
        format!(
            "relay://127.0.0.1:{relay_port}/{}",
            hex(home.public_key().0)
        )
    );
    assert_eq!(home.advertised(), reach.addr);
    assert_eq!(reach.checked_by.as_deref(), Some(public.as_str()));
    assert!(reach.advice.contains("relay"), "{}", reach.advice);

    let client = SwarmClient::connect(ClientConfig::new(swarm.tracker.url()))
        .await
        .unwrap();
    let mut session = client.session();
    let got = generate(&mut session, PROMPT, NEW_TOKENS, &[], |_, _| {})
        .await
        .unwrap();
    assert_same_generation(&got, &expected);
    let chain = session.chain();
    assert_eq!(chain.len(), 2);
    assert_eq!(
        chain[1].addr, reach.addr,
        "the upper half is reached relayed"
    );
    session.close().await;
    assert_eq!(home.metrics().forward_calls, NEW_TOKENS as u64);
    let relayed = swarm.nodes[0].relay().unwrap().stats();
    assert!(relayed.bytes > 0 && relayed.nodes == 1, "{relayed:?}");
    swarm.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_restarted_mid_session_is_ridden_out_with_the_same_tokens() {
    let model = TestModel::new(&ModelSpec::tiny());
    let expected = local_reference(&model, NEW_TOKENS).await;
    let first_life = CancellationToken::new();
    let relay = Relay::start(loopback(), RelayConfig::default(), first_life.clone())
        .await
        .unwrap();
    let relay_addr = relay.addr();
    let mut swarm = Swarm::start(model.path(), &[(0, 2)]).await.unwrap();
    swarm
        .add_node_with(model.path(), 2, 4, |c| {
            c.reach = ReachConfig {
                mode: NatMode::Relay,
                relay: Some(relay_addr.to_string()),
                ..ReachConfig::default()
            };
        })
        .await
        .unwrap();
    assert_eq!(
        swarm.nodes[1].reachability().borrow().path,
        ReachPath::Relayed
    );

    let client = SwarmClient::connect(ClientConfig::new(swarm.tracker.url()))
        .await
        .unwrap();
    let mut session = client.session();
    let second_life = CancellationToken::new();
    let (restarted_tx, restarted_rx) = tokio::sync::oneshot::channel();
    let mut restarted_tx = Some(restarted_tx);
    let got = generate(&mut session, PROMPT, NEW_TOKENS, &[], |_, step| {
        if step == 4
            && let Some(tx) = restarted_tx.take()
        {
            // The relay process dies and comes back on its port.
            first_life.cancel();
            let cancel = second_life.clone();
            tokio::spawn(async move {
                let relay = loop {
                    match Relay::start(relay_addr, RelayConfig::default(), cancel.clone()).await {
                        Ok(relay) => break relay,
                        Err(_) => tokio::task::yield_now().await,
                    }
                };
                let _ = tx.send(relay);
            });
        }
    })
    .await
    .unwrap();
    assert_same_generation(&got, &expected);
    let restarted = restarted_rx.await.unwrap();
    assert_eq!(restarted.stats().nodes, 1, "the home node registered again");
    assert!(
        restarted.stats().bytes > 0,
        "later tokens crossed the new relay"
    );
    assert!(
        session
            .events()
            .iter()
            .any(|e| e.contains("no other peer serves")),
        "{:?}",
        session.events()
    );
    session.close().await;
    second_life.cancel();
    swarm.shutdown().await;
}

fn hex(bytes: [u8; 32]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dial_back_proves_a_direct_path_and_dials_no_third_party() {
    let model = TestModel::new(&ModelSpec::tiny());
    let mut swarm = Swarm::start(model.path(), &[(0, 4)]).await.unwrap();
    let helper = swarm.nodes[0].advertised();
    swarm
        .add_node_with(model.path(), 0, 4, |c| {
            c.reach.mode = NatMode::Auto;
        })
        .await
        .unwrap();
    let node = &swarm.nodes[1];
    let reach = node.reachability().borrow().clone();
    assert_eq!(reach.path, ReachPath::Direct, "{reach:?}");
    assert_eq!(reach.checked_by.as_deref(), Some(helper.as_str()));
    assert_eq!(reach.addr, node.advertised());

    let id = node.id();
    let helper = Target::node(helper, swarm.nodes[0].id());
    let ask = |addr: String| {
        let helper = helper.clone();
        async move {
            neuroshard_node::reach::ask_dial_back(&helper, &addr, &id)
                .await
                .unwrap()
        }
    };
    // Another IP than the caller's: refused without dialing.
    let refused = ask("10.9.9.9:7000".into()).await;
    assert!(
        !refused.reached && refused.error.contains("not on the IP"),
        "{refused:?}"
    );
    // The right address but another node's id: dialed, and found out by the handshake.
    let wrong =
        neuroshard_node::reach::ask_dial_back(&helper, &node.advertised(), &NodeId([0xab; 32]))
            .await
            .unwrap();
    assert!(
        !wrong.reached
            && wrong
                .error
                .contains(&format!("the peer is node {id}, not node")),
        "{wrong:?}"
    );
    // A relayed address whose relay is not one: not reached, and nothing said about the port.
    let nowhere = ask(format!("relay://127.0.0.1:1/{}", "ab".repeat(32))).await;
    assert!(!nowhere.reached, "{nowhere:?}");
    assert!(
        nowhere.error.ends_with("was not reached through its relay"),
        "{nowhere:?}"
    );
    // Garbage is refused with what is wrong.
    let garbage = ask("relay://nowhere".into()).await;
    assert!(
        !garbage.reached && garbage.error.contains("relay://nowhere"),
        "{garbage:?}"
    );
    swarm.shutdown().await;
}
