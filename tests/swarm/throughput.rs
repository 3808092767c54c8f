//! What `neuroshard bench` measures: decode speed over a model's layers at two contexts, with
//! sessions stepped together, and a decode hop's overhead to a node.

use neuroshard_model::init::ModelSpec;
use neuroshard_net::pool::Target;
use neuroshard_node::bench::{batched_speed, decode_speed, hop_overhead, load};
use neuroshard_node::threads::ComputeThreads;
use neuroshard_tests::{Swarm, TestModel};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bench_measures_decode_at_each_context_and_a_hop_to_a_node() {
    let model = TestModel::new(&ModelSpec::tiny());
    let shard = load(model.path(), 1..3, neuroshard_model::Precision::F32).unwrap();
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
    // Sessions stepped together: one figure per batch size, tokens/s over all of them.
    let batched = batched_speed(&shard, 1..3, (8, &[1, 3]), 2, &threads).unwrap();
    assert_eq!(
        batched.iter().map(|b| b.sessions).collect::<Vec<_>>(),
        [1, 3]
    );
    for b in &batched {
        let per_s = 1000.0 * b.sessions as f64 / b.ms_per_step;
        assert!(
            b.ms_per_step > 0.0 && (b.tokens_per_s - per_s).abs() < 1e-6,
            "{b:?}"
        );
    }
    let err = batched_speed(&shard, 1..3, (300, &[2]), 1, &threads).unwrap_err();
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

/// Hidden states as blockwise int8: within 1 % (relative L2) of f16 on the demo model's real
/// hidden states, and what that does to its greedy tokens through three nodes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn int8_hidden_states_stay_within_one_percent_of_f16_through_a_swarm() {
    use neuroshard_client::generate::generate;
    use neuroshard_client::{ClientConfig, SwarmClient};
    use neuroshard_model::codec::{WireDType, decode, encode};
    use neuroshard_model::{KvCache, Shard, ShardInput, ShardOutput};

    let model = TestModel::new(&ModelSpec::demo());
    let prompt: Vec<u32> = "The swarm runs layer by layer"
        .bytes()
        .map(u32::from)
        .collect();
    let front = Shard::load(model.path(), 0..2, &Default::default()).unwrap();
    let rows = match front
        .forward(
            &mut KvCache::new(),
            0,
            0..2,
            ShardInput::Tokens(prompt.clone()),
        )
        .unwrap()
    {
        ShardOutput::Hidden(rows) => rows,
        ShardOutput::Logits(_) => unreachable!("layers 0..2 of 6"),
    };
    let shape = [1, prompt.len(), ModelSpec::demo().hidden];
    let f16 = decode(&encode(&rows, &shape, WireDType::F16)).unwrap();
    let int8 = decode(&encode(&rows, &shape, WireDType::Int8Block)).unwrap();
    let l2 = |a: &[f32], b: &[f32]| {
        let err: f64 = a.iter().zip(b).map(|(x, y)| f64::from(x - y).powi(2)).sum();
        let norm: f64 = a.iter().map(|x| f64::from(*x).powi(2)).sum();
        (err / norm).sqrt()
    };
    let error = l2(&f16, &int8);
    println!("int8 hidden states against f16: relative L2 {error:.5}");
    assert!(error <= 1e-2, "{error}");

    let swarm = Swarm::start(model.path(), &[(0, 2), (2, 4), (4, 6)])
        .await
        .unwrap();
    let mut runs = Vec::new();
    for dtype in [WireDType::F16, WireDType::Int8Block] {
        let mut config = ClientConfig::new(swarm.tracker.url());
        config.wire_dtype = dtype;
        let client = SwarmClient::connect(config).await.unwrap();
        let mut session = client.session();
        let report = generate(&mut session, &prompt, 24, &[], |_, _| {})
            .await
            .unwrap();
        session.close().await;
        let received: u64 = swarm.nodes.iter().map(|n| n.metrics().bytes_received).sum();
        runs.push((report.generated_ids, received));
    }
    let same = runs[0]
        .0
        .iter()
        .zip(&runs[1].0)
        .take_while(|(a, b)| a == b)
        .count();
    println!(
        "greedy tokens through 3 nodes: int8 agrees with f16 on the first {same} of 24; nodes received {} / {} bytes",
        runs[1].1 - runs[0].1,
        runs[0].1
    );
    assert!(same >= 1, "the first token agrees");
    assert!(
        runs[1].1 - runs[0].1 < runs[0].1 * 3 / 4,
        "int8 hidden states take fewer bytes than f16"
    );
    swarm.shutdown().await;
}

/// Six sessions decode through three batching nodes at once, three of them joining after the
/// first has made four tokens and each leaving after its own length: every session gets the
/// greedy tokens it gets alone, and the nodes ran steps of several sessions in one pass.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batched_sessions_joining_and_leaving_get_the_tokens_they_get_alone() {
    use neuroshard_client::generate::{GenerateOptions, LocalPipeline, generate, generate_with};
    use neuroshard_client::{ClientConfig, SwarmClient};
    use neuroshard_node::node::Batching;

    let model = TestModel::new(&ModelSpec::demo());
    let prompts: Vec<Vec<u32>> = (0..6u32)
        .map(|i| (0..3 + i).map(|j| 40 + 7 * i + j).collect())
        .collect();
    let lengths: Vec<usize> = (0..6).map(|i| 6 + 2 * i).collect();
    let mut expected = Vec::new();
    for (prompt, &length) in prompts.iter().zip(&lengths) {
        let mut local = LocalPipeline::load(model.path()).unwrap();
        let report = generate(&mut local, prompt, length, &[], |_, _| {})
            .await
            .unwrap();
        expected.push(report.generated_ids);
    }
    let mut swarm = Swarm::start(model.path(), &[]).await.unwrap();
    for (start, end) in [(0, 2), (2, 4), (4, 6)] {
        swarm
            .add_node_with(model.path(), start, end, |c| {
                // A window, so that steps arriving a moment apart on this busy machine still
                // meet in one batch.
                c.batching = Batching {
                    max_batch: 16,
                    window: std::time::Duration::from_millis(5),
                };
            })
            .await
            .unwrap();
    }
    let client = SwarmClient::connect(ClientConfig::new(swarm.tracker.url()))
        .await
        .unwrap();
    let (made, watch) = tokio::sync::watch::channel(0usize);
    let runs = prompts
        .iter()
        .zip(&lengths)
        .enumerate()
        .map(|(i, (prompt, &length))| {
            let (client, made, mut watch) = (&client, &made, watch.clone());
            async move {
                if i >= 3 {
                    watch.wait_for(|&n| n >= 4).await.unwrap();
                }
                let options = GenerateOptions {
                    max_new_tokens: length,
                    ..GenerateOptions::default()
                };
                let mut session = client.session();
                let report = generate_with(&mut session, prompt, &options, |_, steps| {
                    if i == 0 {
                        made.send_replace(steps.len());
                    }
                    true
                })
                .await
                .unwrap();
                session.close().await;
                report.generated_ids
            }
        });
    let got = futures::future::join_all(runs).await;
    assert_eq!(got, expected);
    let counts: Vec<(u64, u64)> = swarm.nodes.iter().map(|n| n.batched()).collect();
    println!("batches and steps per node: {counts:?}");
    assert!(
        counts.iter().all(|&(batches, steps)| steps > batches),
        "every node ran some steps together: {counts:?}"
    );
    swarm.shutdown().await;
}
