//! Tracker liveness: silent nodes are dropped, and nodes come back after a tracker restart.

use std::time::Duration;

use neuroshard_base::NodeKey;
use neuroshard_discovery::tracker::{TrackerConfig, TrackerService, start_tracker};
use neuroshard_model::init::ModelSpec;
use neuroshard_node::node::{NodeConfig, start_node};
use neuroshard_proto as pb;
use neuroshard_tests::{TestModel, signed_heartbeat, signed_register, within};
use pb::tracker_server::Tracker;
use tonic::Request;

fn peer() -> pb::PeerInfo {
    pb::PeerInfo {
        addr: "127.0.0.1:1".into(),
        model_id: "m".into(),
        layers: Some(pb::LayerSpan { start: 0, end: 2 }),
        total_layers: 4,
        ..Default::default()
    }
}

#[tokio::test(start_paused = true)]
async fn the_tracker_drops_a_silent_node_after_its_timeout() {
    let tracker = TrackerService::new(&TrackerConfig::default());
    let cancel = tokio_util::sync::CancellationToken::new();
    tokio::spawn(
        tracker
            .clone()
            .sweep(Duration::from_secs(10), cancel.clone()),
    );
    let mut count = tracker.node_count();
    let (quiet, chatty) = (NodeKey::generate(), NodeKey::generate());
    for key in [&quiet, &chatty] {
        tracker
            .register(Request::new(signed_register(key, peer())))
            .await
            .unwrap();
    }
    assert_eq!(*count.borrow_and_update(), 2);

    // 25 s in, both are alive; only "chatty" heartbeats.
    tokio::time::advance(Duration::from_secs(25)).await;
    let beat = |key: &NodeKey| signed_heartbeat(key, &peer(), 0.2);
    assert!(
        tracker
            .heartbeat(Request::new(beat(&chatty)))
            .await
            .unwrap()
            .into_inner()
            .known
    );
    let stats = tracker
        .stats(Request::new(pb::StatsRequest {}))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(stats.nodes, 2);

    // Past 30 s of silence the sweeper drops "quiet" without anyone asking.
    tokio::time::advance(Duration::from_secs(10)).await;
    within(
        "the sweeper to drop the quiet node",
        count.wait_for(|&n| n == 1),
    )
    .await
    .unwrap();
    let peers = tracker
        .list_peers(Request::new(pb::ListPeersRequest::default()))
        .await
        .unwrap()
        .into_inner()
        .peers;
    assert_eq!(
        peers.iter().map(|p| p.node_id.as_str()).collect::<Vec<_>>(),
        vec![chatty.id().to_string()]
    );
    assert!(
        !tracker
            .heartbeat(Request::new(beat(&quiet)))
            .await
            .unwrap()
            .into_inner()
            .known
    );
    cancel.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_registers_again_after_a_tracker_restart() {
    let model = TestModel::new(&ModelSpec::tiny());
    // The tracker keeps its key across the restart, as `neuroshard tracker --data-dir` does.
    let config = TrackerConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        key: Some(std::sync::Arc::new(NodeKey::generate())),
        ..TrackerConfig::default()
    };
    let tracker = start_tracker(config.clone()).await.unwrap();
    let addr = tracker.addr;
    let mut node_config = NodeConfig::new(
        model.path(),
        neuroshard_base::LayerRange::new(0, 4).unwrap(),
    );
    node_config.tracker = Some(tracker.url());
    node_config.heartbeat = Duration::from_millis(50);
    let node = start_node(node_config).await.unwrap();
    assert_eq!(
        *tracker.service.node_count().borrow(),
        1,
        "registered on start"
    );
    tracker.shutdown().await;

    let restarted = start_tracker(TrackerConfig {
        listen: addr,
        ..config
    })
    .await
    .unwrap();
    let mut count = restarted.service.node_count();
    tokio::time::timeout(Duration::from_secs(20), count.wait_for(|&n| n == 1))
        .await
        .expect("the node registers again within a few heartbeats")
        .unwrap();
    let mut client = neuroshard_client::tracker_client(&restarted.url()).unwrap();
    let stats = client
        .stats(pb::StatsRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(stats.nodes, 1);
    assert_eq!(stats.layers_covered[node.model_id()], 4);
    node.shutdown().await;
    let url = restarted.url();
    restarted.shutdown().await;

    // Another key at the tracker's address is refused by whoever pinned the tracker's.
    let impostor = start_tracker(TrackerConfig {
        listen: addr,
        key: Some(std::sync::Arc::new(NodeKey::generate())),
        ..TrackerConfig::default()
    })
    .await
    .unwrap();
    let status = neuroshard_client::tracker_client(&url)
        .unwrap()
        .stats(pb::StatsRequest {})
        .await
        .unwrap_err();
    assert!(
        status
            .to_string()
            .contains(&format!("the peer is node {}, not node", impostor.id)),
        "{status}"
    );
    impostor.shutdown().await;
}

#[tokio::test]
async fn the_tracker_rejects_ids_that_do_not_match_their_key_and_warns_of_clones() {
    let tracker = TrackerService::new(&TrackerConfig::default());
    let (key, thief) = (NodeKey::generate(), NodeKey::generate());
    // An id that is not the hash of the key presented.
    let mut request = signed_register(&key, peer());
    request.node.as_mut().unwrap().node_id = thief.id().to_string();
    let status = tracker.register(Request::new(request)).await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::Unauthenticated, "{status:?}");
    assert!(
        status.message().contains("does not belong to the key"),
        "{status:?}"
    );
    // The right id, but signed by another key.
    let mut request = signed_register(&key, peer());
    request.signature = thief.sign(b"something else").to_vec();
    let status = tracker.register(Request::new(request)).await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::Unauthenticated, "{status:?}");
    // A registration captured long ago.
    let mut request = signed_register(&key, peer());
    request.timestamp_ms -= 3_600_000;
    assert!(tracker.register(Request::new(request)).await.is_err());
    // A heartbeat signed by someone else cannot move the node's layers.
    tracker
        .register(Request::new(signed_register(&key, peer())))
        .await
        .unwrap();
    let mut beat = signed_heartbeat(&key, &peer(), 0.1);
    beat.signature = thief.sign(b"x").to_vec();
    assert!(tracker.heartbeat(Request::new(beat)).await.is_err());
    // The same key announced from a second live address is a clone.
    let mut elsewhere = peer();
    elsewhere.addr = "10.1.2.3:7000".into();
    let reply = tracker
        .register(Request::new(signed_register(&key, elsewhere)))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(reply.warnings.len(), 1, "{:?}", reply.warnings);
    let stats = tracker
        .stats(Request::new(pb::StatsRequest {}))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(stats.clone_warnings, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_running_node_moves_between_trackers_without_a_restart() {
    let model = TestModel::new(&ModelSpec::tiny());
    let node = start_node(NodeConfig::new(
        model.path(),
        neuroshard_base::LayerRange::new(0, 4).unwrap(),
    ))
    .await
    .unwrap();
    let start = || {
        start_tracker(TrackerConfig {
            listen: "127.0.0.1:0".parse().unwrap(),
            ..TrackerConfig::default()
        })
    };
    let (first, second) = (start().await.unwrap(), start().await.unwrap());
    let listed = |url: String| async move {
        let tracker = neuroshard_client::tracker_client(&url).unwrap();
        neuroshard_client::list_peers(tracker, &url, None)
            .await
            .unwrap()
            .into_iter()
            .map(|p| p.node_id)
            .collect::<Vec<_>>()
    };
    let id = node.id();
    // Following a tracker registers with it before the call returns.
    node.set_tracker(Some(&first.url())).await.unwrap();
    assert_eq!(listed(first.url()).await, std::slice::from_ref(&id));
    // A URL that does not parse is refused by name; the node stays with the first tracker.
    let err = node.set_tracker(Some("not a url")).await.unwrap_err();
    assert!(err.to_string().contains("tracker"), "{err}");
    node.set_tracker(Some(&second.url())).await.unwrap();
    assert_eq!(listed(second.url()).await, [id]);
    node.set_tracker(None).await.unwrap();
    node.shutdown().await;
    first.shutdown().await;
    second.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_registration_flood_from_one_address_is_capped_and_honest_nodes_still_register() {
    let tracker = start_tracker(TrackerConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        ..TrackerConfig::default()
    })
    .await
    .unwrap();
    let addr = tracker.addr.to_string();
    let flooder: std::net::IpAddr = [127, 0, 0, 2].into();
    let channel = neuroshard_tests::channel_from(flooder, &addr, &NodeKey::generate())
        .await
        .unwrap();
    let mut client = pb::tracker_client::TrackerClient::new(channel);
    let (mut accepted, mut capped) = (0, 0);
    for port in 0..200u16 {
        let fake = pb::PeerInfo {
            addr: format!("127.0.0.2:{}", 20_000 + port),
            ..peer()
        };
        match client
            .register(signed_register(&NodeKey::generate(), fake))
            .await
        {
            Ok(_) => accepted += 1,
            Err(status) => {
                assert_eq!(status.code(), tonic::Code::ResourceExhausted, "{status}");
                assert!(
                    status.message().contains("127.0.0.2 already has 64"),
                    "{status}"
                );
                capped += 1;
            }
        }
    }
    assert_eq!((accepted, capped), (64, 136));
    // An announcement of someone else's address is refused whatever the count.
    let elsewhere = pb::PeerInfo {
        addr: "127.0.0.9:7000".into(),
        ..peer()
    };
    let status = pb::tracker_client::TrackerClient::new(
        neuroshard_tests::channel_from([127, 0, 0, 3].into(), &addr, &NodeKey::generate())
            .await
            .unwrap(),
    )
    .register(signed_register(&NodeKey::generate(), elsewhere))
    .await
    .unwrap_err();
    assert!(
        status
            .message()
            .contains("a node may only announce its own address"),
        "{status}"
    );

    // Honest nodes from their own address still register, and are listed.
    let model = TestModel::new(&ModelSpec::tiny());
    let mut config = NodeConfig::new(
        model.path(),
        neuroshard_base::LayerRange::new(0, 4).unwrap(),
    );
    config.tracker = Some(tracker.url());
    let node = start_node(config).await.unwrap();
    let mut count = tracker.service.node_count();
    within(
        "the honest node's registration",
        count.wait_for(|&n| n == 65),
    )
    .await
    .unwrap();
    let url = tracker.url();
    let listed = neuroshard_client::list_peers(
        neuroshard_client::tracker_client(&url).unwrap(),
        &url,
        Some(node.model_id()),
    )
    .await
    .unwrap();
    assert!(
        listed.iter().any(|p| p.node_id == node.id()),
        "the honest node is listed"
    );
    node.shutdown().await;
    tracker.shutdown().await;
}

/// Every node measures its decode speed on its shard before it registers, and the tracker
/// lists the figure for routers to plan with before they have timed the node.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_announce_the_decode_speed_they_measured() {
    let model = TestModel::new(&ModelSpec::tiny());
    let swarm = neuroshard_tests::Swarm::start(model.path(), &[(0, 1), (1, 4)])
        .await
        .unwrap();
    let url = swarm.tracker.url();
    let tracker = neuroshard_client::tracker_client(&url).unwrap();
    let listed = neuroshard_client::list_peers(tracker, &url, None)
        .await
        .unwrap();
    assert_eq!(listed.len(), 2);
    for peer in &listed {
        let ms = peer.decode_ms_per_layer;
        assert!(ms.is_finite() && ms > 0.0, "{}: {ms}", peer.layers);
    }
    swarm.shutdown().await;
}
