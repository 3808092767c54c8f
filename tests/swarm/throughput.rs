//! What `neuroshard bench` measures: decode speed over a model's layers at two contexts, and a
//! decode hop's overhead to a node.

use neuroshard_model::init::ModelSpec;
use neuroshard_net::pool::Target;
use neuroshard_node::bench::{decode_speed, hop_overhead, load};
use neuroshard_node::threads::ComputeThreads;
use neuroshard_tests::{Swarm, TestModel};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bench_measures_decode_at_each_context_and_a_hop_to_a_node() {
    let model = TestModel::new(&ModelSpec::tiny());
    let shard = load(model.path(), 1..3).unwrap();
    let threads = ComputeThreads::new(1).unwrap();
    let figures = decode_speed(&shard, 1..3, &[8, 96], 4, &threads).unwrap();
    assert_eq!(
        figures.iter().map(|f| f.context).collect::<Vec<_>>(),
        [8, 96]
    );
    for f in &figures {
        assert!(f.ms_per_token > 0.0, "{f:?}");
        assert!(
            (f.tokens_per_s * f.ms_per_token - 1000.0).abs() < 1e-6,
            "{f:?}"
        );
    }
    // Positions past the model's 256 are refused by name, not run.
    let err = decode_speed(&shard, 1..3, &[300], 1, &threads).unwrap_err();
    assert!(err.to_string().contains("max_position_embeddings"), "{err}");

    let swarm = Swarm::start(model.path(), &[(0, 2), (2, 4)]).await.unwrap();
    for (node, layers) in swarm.nodes.iter().zip(["0..2", "2..4"]) {
        let before = node.metrics().forward_calls;
        let to = Target::node(node.advertised(), node.id());
        let hop = hop_overhead(&to, ModelSpec::tiny().hidden, 5)
            .await
            .unwrap();
        assert_eq!((hop.layers.as_str(), hop.calls), (layers, 5));
        assert!(
            hop.wall_ms >= hop.compute_ms && hop.compute_ms > 0.0,
            "{hop:?}"
        );
        assert_eq!(
            node.metrics().forward_calls - before,
            6,
            "a prefill and five steps"
        );
        assert_eq!(node.metrics().sessions, 0, "the bench's session is ended");
    }
    swarm.shutdown().await;
}
