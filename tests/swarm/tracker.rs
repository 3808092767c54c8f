//! Tracker liveness: silent nodes are dropped, and nodes come back after a tracker restart.

use std::time::Duration;

use neuroshard_model::init::ModelSpec;
use neuroshard_node::node::{NodeConfig, start_node};
use neuroshard_node::tracker::{TrackerConfig, TrackerService, start_tracker};
use neuroshard_proto as pb;
use neuroshard_tests::TestModel;
use pb::tracker_server::Tracker;
use tonic::Request;

fn peer(id: &str) -> pb::PeerInfo {
    pb::PeerInfo {
        node_id: id.into(),
        addr: "127.0.0.1:1".into(),
        model_id: "m".into(),
        layers: Some(pb::LayerSpan { start: 0, end: 2 }),
        total_layers: 4,
        load: 0.0,
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
    tracker
        .register(Request::new(pb::RegisterRequest {
            node: Some(peer("quiet")),
        }))
        .await
        .unwrap();
    tracker
        .register(Request::new(pb::RegisterRequest {
            node: Some(peer("chatty")),
        }))
        .await
        .unwrap();
    assert_eq!(*count.borrow_and_update(), 2);

    // 25 s in, both are alive; only "chatty" heartbeats.
    tokio::time::advance(Duration::from_secs(25)).await;
    let beat = |id: &str| pb::HeartbeatRequest {
        node_id: id.into(),
        layers: None,
        load: 0.2,
    };
    assert!(
        tracker
            .heartbeat(Request::new(beat("chatty")))
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
    count.wait_for(|&n| n == 1).await.unwrap();
    let peers = tracker
        .list_peers(Request::new(pb::ListPeersRequest::default()))
        .await
        .unwrap()
        .into_inner()
        .peers;
    assert_eq!(
        peers.iter().map(|p| p.node_id.as_str()).collect::<Vec<_>>(),
        vec!["chatty"]
    );
    assert!(
        !tracker
            .heartbeat(Request::new(beat("quiet")))
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
    let config = TrackerConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
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
    let mut client = pb::tracker_client::TrackerClient::connect(restarted.url())
        .await
        .unwrap();
    let stats = client
        .stats(pb::StatsRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(stats.nodes, 1);
    assert_eq!(stats.layers_covered[node.model_id()], 4);
    node.shutdown().await;
    restarted.shutdown().await;
}
