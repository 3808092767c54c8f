//! The connection pool: reuse, a cap per peer, idle close, reconnect, and the key expected at
//! each address.

use std::sync::Arc;
use std::time::Duration;

use neuroshard_base::NodeKey;
use neuroshard_model::init::ModelSpec;
use neuroshard_net::metrics::Metrics;
use neuroshard_net::pool::{ConnectionPool, PoolConfig, Target};
use neuroshard_net::tls::Dialler;
use neuroshard_proto as pb;
use neuroshard_tests::{Swarm, TestModel};
use tokio::time::Instant;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn channels_are_reused_capped_closed_when_idle_and_reopened() {
    let model = TestModel::new(&ModelSpec::tiny());
    let swarm = Swarm::start(model.path(), &[(0, 4)]).await.unwrap();
    let addr = Target::node(swarm.nodes[0].advertised(), swarm.nodes[0].id());
    let metrics = Arc::new(Metrics::default());
    let dialler = Dialler::ephemeral().unwrap();
    let pool = ConnectionPool::new(PoolConfig::default(), metrics.clone(), dialler);

    // Sequential calls share one channel.
    for _ in 0..3 {
        let mut c = pool.client(&addr).await.unwrap();
        c.client.ping(pb::PingRequest {}).await.unwrap();
    }
    assert_eq!(pool.channels_to(&addr), 1);

    // Control calls ride the existing channel and never make it busy.
    let mut control = pool.control_client(&addr).await.unwrap();
    let busy = pool.client(&addr).await.unwrap();
    control.client.ping(pb::PingRequest {}).await.unwrap();
    let mut second = pool.control_client(&addr).await.unwrap();
    second.client.ping(pb::PingRequest {}).await.unwrap();
    assert_eq!(pool.channels_to(&addr), 1);
    drop((control, busy, second));

    // Calls held open at once get more channels, never more than three.
    let mut held = Vec::new();
    for _ in 0..5 {
        held.push(pool.client(&addr).await.unwrap());
    }
    assert_eq!(pool.channels_to(&addr), 3);
    for c in &mut held {
        c.client.ping(pb::PingRequest {}).await.unwrap();
    }
    let snapshot = metrics.snapshot(0, 0);
    assert_eq!((snapshot.active_connections, snapshot.pool_size), (3, 1));

    // Busy channels survive the reaper; idle ones are closed after the idle timeout.
    let later = Instant::now() + Duration::from_secs(61);
    assert_eq!(pool.reap(later), 0);
    drop(held);
    assert_eq!(pool.reap(Instant::now() + Duration::from_secs(30)), 0);
    assert_eq!(pool.reap(later), 1);
    assert_eq!(pool.channels_to(&addr), 0);
    assert_eq!(metrics.snapshot(0, 0).active_connections, 0);

    // The next call reconnects.
    let mut c = pool.client(&addr).await.unwrap();
    c.client.ping(pb::PingRequest {}).await.unwrap();
    assert_eq!(pool.channels_to(&addr), 1);
    drop(c);
    swarm.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_is_dialled_as_its_key_and_another_key_there_fails_the_connection() {
    let model = TestModel::new(&ModelSpec::tiny());
    let swarm = Swarm::start(model.path(), &[(0, 2), (2, 4)]).await.unwrap();
    let (first, second) = (&swarm.nodes[0], &swarm.nodes[1]);
    let pool = ConnectionPool::new(
        PoolConfig::default(),
        Arc::new(Metrics::default()),
        Dialler::new(&NodeKey::generate()).unwrap(),
    );
    // The first node's address, expecting the second node: refused by the handshake, naming
    // both, and nothing is pooled.
    let wrong = Target::node(first.advertised(), second.id());
    let err = pool.client(&wrong).await.unwrap_err().to_string();
    assert!(
        err.contains(&format!(
            "the peer is node {}, not node {} that was dialled",
            first.id(),
            second.id()
        )),
        "{err}"
    );
    assert_eq!(pool.channels_to(&wrong), 0);
    // The right key at the same address is served.
    let right = Target::node(first.advertised(), first.id());
    let mut client = pool.client(&right).await.unwrap();
    let reply = client.client.ping(pb::PingRequest {}).await.unwrap();
    assert_eq!(
        reply.into_inner().node.unwrap().node_id,
        first.id().to_string()
    );
    assert_eq!(pool.channels_to(&right), 1);
    drop(client);
    swarm.shutdown().await;
}
