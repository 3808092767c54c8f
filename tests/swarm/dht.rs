//! Discovery without a tracker: the DHT between real nodes on loopback, joining through a
//! bootstrap peer once the tracker is gone, LAN discovery over mDNS, and bad DHT messages.

use std::collections::BTreeSet;
use std::path::Path;
use std::time::Duration;

use futures::StreamExt;
use neuroshard_base::{LayerRange, NodeKey};
use neuroshard_client::generate::generate;
use neuroshard_client::{ClientConfig, SwarmClient};
use neuroshard_dht::{Record, RecordKey};
use neuroshard_discovery::{DiscoveryConfig, LanConfig};
use neuroshard_model::init::ModelSpec;
use neuroshard_node::node::{NodeConfig, NodeHandle, start_node};
use neuroshard_proto as pb;
use neuroshard_tests::{Swarm, TestModel, within};
use rand::{Rng, SeedableRng};

use crate::generation::{PROMPT, assert_same_generation, local_reference};

/// A node serving `layers` with no tracker, joining through `bootstrap`.
async fn start_free(
    model: &Path,
    layers: (u32, u32),
    bootstrap: Vec<String>,
    discovery: &DiscoveryConfig,
) -> NodeHandle {
    let mut config = NodeConfig::new(model, LayerRange::new(layers.0, layers.1).unwrap());
    config.bootstrap = bootstrap;
    config.discovery = discovery.clone();
    // All share one address, which a record store counts as one network: lift its share of a
    // key, 8, to the 64 entries a key holds.
    config.discovery.kad.store.max_per_prefix_per_key = 64;
    // Sixty-four nodes share one address here, each pooling connections to many of the
    // others: more than the 64 a node takes from one address on the internet.
    config.server.max_connections_per_ip = 1024;
    start_node(config).await.expect("node starts")
}

/// The ids of the nodes `node` reads from the DHT as providers of `index`.
async fn providers(node: &NodeHandle, model: &str, index: u32) -> BTreeSet<String> {
    let key = RecordKey::Layer {
        model: model.into(),
        index,
    };
    let outcome = node.discovery().dht().get(key).await.unwrap();
    outcome
        .records
        .iter()
        .map(|r| r.publisher_id().to_string())
        .collect()
}

/// Waits until `node`'s routing table holds at least `n` contacts.
async fn await_contacts(node: &NodeHandle, n: usize) {
    let mut stats = node.discovery().dht().stats();
    within(
        "routing table contacts",
        stats.wait_for(|s| s.contacts >= n),
    )
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sixty_four_nodes_put_and_get_records_that_expire_and_forget_a_provider_that_left() {
    let model = TestModel::new(&ModelSpec::tiny());
    let model_id = neuroshard_model::ModelInfo::read(model.path()).unwrap().id;
    // Short lifetimes so the test sees records lapse: each node signs its records again every
    // 8 s, and a record lives 20 s. A put signs its record before its lookup, so the lifetime
    // must outlast a lookup and its stores on a loaded machine (64 nodes re-announcing are
    // most of the load): with 12 s, stores on two busy cores arrived after their records had
    // expired.
    let discovery = DiscoveryConfig {
        record_ttl: Duration::from_secs(20),
        announce_every: Duration::from_secs(8),
        sweep_every: Duration::from_secs(3600),
        ..DiscoveryConfig::default()
    };
    let mut rng = rand::rngs::StdRng::seed_from_u64(64);
    let mut nodes: Vec<NodeHandle> = Vec::new();
    for i in 0..64u32 {
        // Each node joins through one node started before it.
        let bootstrap = match i {
            0 => Vec::new(),
            _ => vec![
                nodes[rng.random_range(0..i as usize)]
                    .advertised()
                    .to_string(),
            ],
        };
        let layer = i % 4;
        nodes.push(start_free(model.path(), (layer, layer + 1), bootstrap, &discovery).await);
    }
    // Each node announces right after joining: once all have, everyone is in.
    for node in &nodes {
        let mut announced = node.discovery().announced();
        within(
            "every node's first announcement",
            announced.wait_for(|a| a.rounds > 0),
        )
        .await
        .unwrap();
    }
    // Everyone is in: each node puts its records again, and they land at the k closest of all.
    // Eight at a time: 64 nodes storing at once on two cores would test the machine instead.
    let rounds: Vec<_> = futures::stream::iter(nodes.iter().map(|n| n.announce()))
        .buffer_unordered(8)
        .collect()
        .await;
    for status in rounds {
        let status = status.unwrap();
        assert_eq!(status.records, 2, "/nodes/{{id}} and one layer");
        // k = 20 closest, less any store that timed out on a loaded machine.
        assert!(status.least_stored >= 15, "{status:?}");
    }
    let serving = |nodes: &[NodeHandle], layer: u32| -> BTreeSet<String> {
        nodes
            .iter()
            .filter(|n| n.layers().start == layer)
            .map(|n| n.id().to_string())
            .collect()
    };
    // Any node reads every layer's 16 providers, each entry signed by its provider.
    for node in nodes.iter().step_by(7) {
        for layer in 0..4 {
            assert_eq!(
                providers(node, &model_id, layer).await,
                serving(&nodes, layer),
                "layer {layer} as node {} reads it",
                node.id().short()
            );
        }
    }
    // The same through what clients route over: one checked announcement per node.
    let all = nodes[11].discovery().providers(&model_id, 4).await;
    assert_eq!(all.len(), 64);
    for peer in &all {
        let node = nodes.iter().find(|n| n.id() == peer.node_id).unwrap();
        assert_eq!(
            (peer.addr.clone(), peer.layers),
            (node.advertised(), node.layers())
        );
    }
    // And every node's own record under /nodes/{id}, announcing its address.
    let (reader, subject) = (&nodes[40], &nodes[3]);
    let outcome = reader
        .discovery()
        .dht()
        .get(RecordKey::Node(subject.id()))
        .await
        .unwrap();
    assert_eq!(outcome.records.len(), 1);
    let announced = neuroshard_net::convert::peer_from_record(&outcome.records[0]).unwrap();
    assert_eq!(announced.addr, subject.advertised());
    assert_eq!(announced.layers, subject.layers());

    // A record put with a 6 s lifetime is found, then gone once it expires.
    let publisher = NodeKey::generate();
    let key = RecordKey::Checkpoint("run-1.step-400".into());
    let expires_ms = neuroshard_net::now_ms() + 6_000;
    let record = Record::sign(
        key.clone(),
        b"shard hashes".to_vec(),
        expires_ms,
        &publisher,
    )
    .unwrap();
    let put = nodes[5]
        .discovery()
        .dht()
        .put(record.clone())
        .await
        .unwrap();
    assert!(put.stored >= 15, "{put:?}");
    let got = nodes[50].discovery().dht().get(key.clone()).await.unwrap();
    assert_eq!(got.records, vec![record]);
    sleep_until_ms(expires_ms).await;
    let got = nodes[50].discovery().dht().get(key).await.unwrap();
    assert!(got.records.is_empty(), "expired records are not handed out");

    // A provider that leaves stays listed until its last record expires, then is gone while
    // the providers that stayed are still there.
    let leaver = nodes.remove(7);
    let (layer, leaver_id) = (leaver.layers().start, leaver.id().to_string());
    leaver.shutdown().await;
    let left_ms = neuroshard_net::now_ms();
    assert!(
        providers(&nodes[30], &model_id, layer)
            .await
            .contains(&leaver_id)
    );
    sleep_until_ms(left_ms + discovery.record_ttl.as_millis() as u64).await;
    let after = providers(&nodes[30], &model_id, layer).await;
    let stayed = serving(&nodes, layer);
    assert_eq!(after, stayed, "gone within its TTL, the others kept");
    assert_eq!(stayed.len(), 15);
    for node in nodes {
        node.shutdown().await;
    }
}

/// Waits until the wall clock reaches `ms`: records expire by wall-clock time.
async fn sleep_until_ms(ms: u64) {
    let now = neuroshard_net::now_ms();
    tokio::time::sleep(Duration::from_millis(ms.saturating_sub(now) + 50)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_the_tracker_dies_a_new_node_joins_through_a_bootstrap_peer_and_the_swarm_generates()
{
    let model = TestModel::new(&ModelSpec::tiny());
    let expected = local_reference(&model, 8).await;
    let Swarm {
        tracker, mut nodes, ..
    } = Swarm::start(model.path(), &[(0, 2), (2, 4)]).await.unwrap();
    // The nodes met through the tracker: each one's DHT table holds the other.
    for node in &nodes {
        await_contacts(node, 1).await;
    }
    let dead_tracker = tracker.url();
    tracker.shutdown().await;

    // A replica of 2..4 joins with only the dead tracker and one bootstrap peer; then the
    // original 2..4 leaves, so a generation must find the newcomer.
    let entry = nodes[0].advertised().to_string();
    let mut config = NodeConfig::new(model.path(), LayerRange::new(2, 4).unwrap());
    config.tracker = Some(dead_tracker.clone());
    config.bootstrap = vec![entry.clone()];
    let newcomer = start_node(config).await.unwrap();
    let mut announced = newcomer.discovery().announced();
    let stored = announced.wait_for(|a| a.rounds > 0 && a.least_stored > 0);
    within("the newcomer's stored announcement", stored)
        .await
        .unwrap();
    let entry_key = neuroshard_dht::Key::of_node(&nodes[0].id());
    let closest = newcomer.discovery().dht().closest(entry_key).await;
    assert_eq!(
        closest.first().map(|c| c.addr.to_string()),
        Some(entry.clone()),
        "the bootstrap peer is in the newcomer's table"
    );
    nodes.remove(1).shutdown().await;

    let mut config = ClientConfig::new(dead_tracker);
    config.bootstrap = vec![entry];
    let client = SwarmClient::connect(config).await.unwrap();
    let mut session = client.session();
    let got = generate(&mut session, PROMPT, 8, &[], |_, _| {})
        .await
        .unwrap();
    assert_same_generation(&got, &expected);
    assert!(
        session
            .chain()
            .iter()
            .any(|hop| hop.addr == newcomer.advertised()),
        "{:?}",
        session.chain()
    );
    session.close().await;
    newcomer.shutdown().await;
    for node in nodes {
        node.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_nodes_find_each_other_on_the_lan_and_serve_a_generation() {
    let model = TestModel::new(&ModelSpec::tiny());
    let expected = local_reference(&model, 8).await;
    // A service type of this test's own, on loopback: no other swarm on the machine answers.
    let lan = LanConfig {
        service: format!("_ns{:08x}._tcp.local.", rand::random::<u32>()),
        port: 5454,
        loopback: true,
    };
    let discovery = DiscoveryConfig {
        lan: Some(lan.clone()),
        ..DiscoveryConfig::default()
    };
    let a = start_free(model.path(), (0, 2), Vec::new(), &discovery).await;
    let b = start_free(model.path(), (2, 4), Vec::new(), &discovery).await;
    // Each finds the other over mDNS, with no tracker and no bootstrap list, and holds it in
    // its routing table.
    for (node, other) in [(&a, &b), (&b, &a)] {
        let lan = node.discovery().lan().unwrap();
        let mut count = lan.count();
        tokio::time::timeout(Duration::from_secs(20), count.wait_for(|&n| n > 0))
            .await
            .expect("found on the LAN")
            .unwrap();
        await_contacts(node, 1).await;
        let found = lan.found();
        assert_eq!(found.len(), 1);
        assert_eq!(found[0].addr.to_string(), other.advertised());
    }
    // A client that knows nothing but the LAN generates through both.
    let mut config = ClientConfig::with_bootstrap(Vec::new());
    config.discovery.lan = Some(lan);
    config.discovery.lan_wait = Duration::from_secs(20);
    let client = SwarmClient::connect(config).await.unwrap();
    let mut session = client.session();
    let got = generate(&mut session, PROMPT, 8, &[], |_, _| {})
        .await
        .unwrap();
    assert_same_generation(&got, &expected);
    let mut chain: Vec<String> = session.chain().into_iter().map(|h| h.addr).collect();
    chain.sort();
    let mut both = vec![a.advertised().to_string(), b.advertised().to_string()];
    both.sort();
    assert_eq!(chain, both);
    session.close().await;
    a.shutdown().await;
    b.shutdown().await;
}

/// A raw DHT client to `node`.
async fn dht_client(node: &NodeHandle) -> pb::dht_client::DhtClient<tonic::transport::Channel> {
    pb::dht_client::DhtClient::new(neuroshard_tests::channel(&node.advertised()).await)
}

/// A request's sender: `key`'s contact at `addr`, signed at `timestamp_ms`.
fn sender(key: &NodeKey, addr: &str, timestamp_ms: u64) -> Option<pb::DhtSender> {
    Some(neuroshard_net::convert::sender_to_proto(
        key,
        addr.parse().unwrap(),
        timestamp_ms,
    ))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_dht_messages_oversized_records_and_bad_signatures_get_clear_errors() {
    use neuroshard_net::convert::record_to_proto;
    let model = TestModel::new(&ModelSpec::tiny());
    let node = start_free(
        model.path(),
        (0, 4),
        Vec::new(),
        &DiscoveryConfig::default(),
    )
    .await;
    let mut announced = node.discovery().announced();
    within(
        "the node's first announcement",
        announced.wait_for(|a| a.rounds > 0),
    )
    .await
    .unwrap();
    let mut dht = dht_client(&node).await;
    let owner = NodeKey::generate();
    let now = neuroshard_net::now_ms;
    let key = RecordKey::Checkpoint("kept".into());
    let kept = Record::sign(key.clone(), b"v1".to_vec(), now() + 60_000, &owner).unwrap();
    dht.store(pb::StoreRequest {
        sender: None,
        record: Some(record_to_proto(&kept)),
    })
    .await
    .unwrap();
    let records_before = node.metrics().dht_records;

    let store = |record: pb::DhtRecord, sender: Option<pb::DhtSender>| pb::StoreRequest {
        sender,
        record: Some(record),
    };
    let signed = |value: Vec<u8>, expires_ms: u64| {
        record_to_proto(&Record::sign(key.clone(), value, expires_ms, &owner).unwrap())
    };
    let mut tampered = signed(b"v2".to_vec(), now() + 120_000);
    tampered.value = b"v3".to_vec();
    let mut oversized = record_to_proto(&kept);
    oversized.value = vec![7; 5000];
    let mut short_signature = record_to_proto(&kept);
    short_signature.signature.truncate(10);
    let stranger = NodeKey::generate();
    let not_owner = record_to_proto(
        &Record::sign(
            RecordKey::Node(owner.id()),
            vec![],
            now() + 60_000,
            &stranger,
        )
        .unwrap(),
    );
    let mut bad_key = record_to_proto(&kept);
    bad_key.key = "/layers/a b/1".into();
    let expired = signed(b"old".to_vec(), now() - 1);
    let older = signed(b"v0".to_vec(), now() + 30_000);
    let far = signed(b"far".to_vec(), now() + 3 * 24 * 3600 * 1000);
    let me = NodeKey::generate();
    let mut forged_sender = sender(&me, "127.0.0.1:9", now());
    forged_sender.as_mut().unwrap().signature[0] ^= 1;
    let cases: Vec<(pb::StoreRequest, tonic::Code, &str)> = vec![
        (
            store(tampered, None),
            tonic::Code::InvalidArgument,
            "signature does not match",
        ),
        (
            store(oversized, None),
            tonic::Code::InvalidArgument,
            "5000 bytes is over the 4096-byte limit",
        ),
        (
            store(short_signature, None),
            tonic::Code::InvalidArgument,
            "signature must be 64 bytes",
        ),
        (
            store(not_owner, None),
            tonic::Code::InvalidArgument,
            "not by that node",
        ),
        (
            store(bad_key, None),
            tonic::Code::InvalidArgument,
            "model id \"a b\" has ' '",
        ),
        (
            store(expired, None),
            tonic::Code::InvalidArgument,
            "expired",
        ),
        (store(far, None), tonic::Code::InvalidArgument, "beyond the"),
        (
            pb::StoreRequest {
                sender: None,
                record: None,
            },
            tonic::Code::InvalidArgument,
            "without a record",
        ),
        (
            store(record_to_proto(&kept), forged_sender),
            tonic::Code::Unauthenticated,
            "signature does not match",
        ),
        (
            store(
                record_to_proto(&kept),
                sender(&me, "127.0.0.1:9", now() - 600_000),
            ),
            tonic::Code::InvalidArgument,
            "signed at",
        ),
        (
            store(record_to_proto(&kept), sender(&me, "0.0.0.0:9", now())),
            tonic::Code::InvalidArgument,
            "not a dialable ip:port",
        ),
    ];
    for (request, code, says) in cases {
        let status = dht.store(request).await.unwrap_err();
        assert_eq!(status.code(), code, "{}", status.message());
        assert!(
            status.message().contains(says),
            "{says}: {}",
            status.message()
        );
    }
    let status = dht
        .find_node(pb::FindNodeRequest {
            sender: None,
            target: vec![1; 5],
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::InvalidArgument);
    assert!(
        status.message().contains("target must be 32 bytes, got 5"),
        "{}",
        status.message()
    );
    let status = dht
        .find_value(pb::FindValueRequest {
            sender: None,
            key: "/things/1".into(),
        })
        .await
        .unwrap_err();
    assert!(
        status.message().contains("is not /nodes"),
        "{}",
        status.message()
    );
    // An older version of a record held here counts as stored (what its publisher's put
    // wants holds already), and changes nothing: see the read below.
    dht.store(store(older, None)).await.unwrap();
    // A message far over the DHT's 64 KiB limit is refused before it is decoded.
    let mut huge = record_to_proto(&kept);
    huge.value = vec![0; 1 << 20];
    let status = dht.store(store(huge, None)).await.unwrap_err();
    assert_eq!(
        status.code(),
        tonic::Code::OutOfRange,
        "{}",
        status.message()
    );
    assert!(
        status.message().contains("too large"),
        "{}",
        status.message()
    );

    // A correctly signed sender enters the table only when it is the key its connection
    // proved and claims the address its request came from; one claiming another address (as
    // a peer behind NAT would), or signed by a key other than the caller's, is served as a
    // client.
    let contacts = node.metrics().dht_contacts;
    let ping = |sender| pb::DhtPingRequest { sender };
    let elsewhere = NodeKey::generate();
    let reply = dht
        .ping(ping(sender(&elsewhere, "10.1.2.3:7420", now())))
        .await
        .unwrap()
        .into_inner();
    let responder = reply.responder.expect("the answer names its responder");
    assert_eq!(responder.public_key, node.public_key().0.to_vec());
    assert_eq!(node.metrics().dht_contacts, contacts);
    let here = NodeKey::generate();
    dht.ping(ping(sender(&here, "127.0.0.1:9", now())))
        .await
        .unwrap();
    assert_eq!(
        node.metrics().dht_contacts,
        contacts,
        "not the caller's key"
    );
    let mut as_here = pb::dht_client::DhtClient::new(
        neuroshard_tests::channel_as(&node.advertised(), &here).await,
    );
    as_here
        .ping(ping(sender(&here, "127.0.0.1:9", now())))
        .await
        .unwrap();
    assert_eq!(node.metrics().dht_contacts, contacts + 1);

    // Nothing stored changed, and the node still serves the DHT and computes.
    assert_eq!(node.metrics().dht_records, records_before);
    let found = dht
        .find_value(pb::FindValueRequest {
            sender: None,
            key: key.to_string(),
        })
        .await
        .unwrap()
        .into_inner()
        .records;
    assert_eq!(found, vec![record_to_proto(&kept)]);
    let mut client = neuroshard_tests::node_client(&node).await;
    let reply = client
        .forward(pb::ForwardRequest {
            session_id: "after".into(),
            layers: Some(pb::LayerSpan { start: 0, end: 4 }),
            input: Some(pb::forward_request::Input::Tokens(pb::TokenIds {
                ids: vec![1, 2],
            })),
            ..Default::default()
        })
        .await
        .unwrap();
    assert!(reply.into_inner().output.is_some());
    node.shutdown().await;
}
