//! Generation through a swarm against the local reference, with failover and replicas.

use neuroshard_base::LayerRange;
use neuroshard_client::generate::{
    GenerateOptions, GenerationReport, LocalPipeline, Pipeline, generate, generate_with,
};
use neuroshard_client::{ClientConfig, SwarmClient, SwarmSession};
use neuroshard_model::SamplingParams;
use neuroshard_model::codec::WireDType;
use neuroshard_model::init::ModelSpec;
use neuroshard_net::NodeError;
use neuroshard_net::metrics::MetricsSnapshot;
use neuroshard_node::node::{NodeConfig, start_node};
use neuroshard_tests::{Swarm, TestModel};

/// Largest difference allowed between a swarm logit and the local one. Hidden states cross
/// each hop as f16 (11-bit mantissa, relative error ≤ 2^-11); over two hops of a model whose
/// logits span about ±10 that moves logits by well under 0.05.
const LOGIT_TOLERANCE: f32 = 0.05;

pub(crate) const PROMPT: &[u32] = &[256, 84, 104, 101, 32, 115, 119, 97, 114, 109];

pub(crate) async fn local_reference(model: &TestModel, tokens: usize) -> GenerationReport {
    let mut local = LocalPipeline::load(model.path()).unwrap();
    generate(&mut local, PROMPT, tokens, &[], |_, _| {})
        .await
        .unwrap()
}

pub(crate) fn assert_same_generation(swarm: &GenerationReport, local: &GenerationReport) {
    assert_eq!(swarm.generated_ids, local.generated_ids);
    for (s, l) in swarm.steps.iter().zip(&local.steps) {
        for ((sid, slogit), (lid, llogit)) in s.top.iter().zip(&l.top) {
            assert_eq!(sid, lid, "top-5 ids differ");
            assert!(
                (slogit - llogit).abs() <= LOGIT_TOLERANCE,
                "logit {slogit} vs {llogit}"
            );
        }
    }
}

/// A swarm of three nodes over the six layers of `model`, and a client of it.
async fn three_nodes_and_a_client(model: &TestModel) -> (Swarm, SwarmClient) {
    let swarm = Swarm::start(model.path(), &[(0, 2), (2, 4), (4, 6)])
        .await
        .unwrap();
    let client = SwarmClient::connect(ClientConfig::new(swarm.tracker.url()))
        .await
        .unwrap();
    (swarm, client)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_node_swarm_matches_local_generation() {
    let model = TestModel::new(&ModelSpec::demo());
    let expected = local_reference(&model, 24).await;
    let (swarm, client) = three_nodes_and_a_client(&model).await;
    let mut session = client.session();
    let got = generate(&mut session, PROMPT, 24, &[], |_, _| {})
        .await
        .unwrap();
    assert_same_generation(&got, &expected);
    let chain = session.chain();
    assert_eq!(chain.len(), 3);
    assert!(session.events().is_empty());
    let timings = session.timings();
    assert_eq!(timings.len(), 3);
    assert!(timings.iter().all(|t| t.calls == 24));
    session.close().await;
    // Every node served each step once, and says so through Ping's metrics.
    for node in &swarm.nodes {
        let m = node.metrics();
        assert_eq!(m.forward_calls, 24);
        assert!(m.bytes_received > 0 && m.bytes_sent > 0);
        assert_eq!(m.sessions, 0, "closing the session frees the caches");
    }
    let client_metrics = client.metrics();
    assert_eq!(client_metrics.rpc_count, 72);
    assert_eq!(client_metrics.pool_size, 3);
    assert_eq!(
        client_metrics.active_connections, 3,
        "one reused channel per peer"
    );
    swarm.shutdown().await;
}

/// The swarm with the token chosen at the client from the whole logits, as before the last
/// hop chose it.
struct ChosenAtClient<'s, 'c>(&'s mut SwarmSession<'c>);

impl Pipeline for ChosenAtClient<'_, '_> {
    async fn step(&mut self, start_pos: usize, ids: &[u32]) -> Result<Vec<f32>, NodeError> {
        self.0.forward(start_pos, ids).await
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_last_hop_chooses_the_token_the_client_would_and_no_hop_sends_the_vocabulary() {
    // A vocabulary of 8,192: its logits in f32 are 32 KiB a token, sixteen times the bound.
    let spec = ModelSpec {
        vocab: 8192,
        ..ModelSpec::demo()
    };
    let hidden = spec.hidden as u64;
    let model = TestModel::new(&spec);
    let (swarm, client) = three_nodes_and_a_client(&model).await;
    // Hidden states in f16 on the wire move a logit by up to LOGIT_TOLERANCE, enough to move
    // a seeded draw over the boundary between two tokens: a client that sends them in f32
    // computes what a local run does, bit for bit.
    let exact = SwarmClient::connect(ClientConfig {
        wire_dtype: WireDType::F32,
        ..ClientConfig::new(swarm.tracker.url())
    })
    .await
    .unwrap();
    let sampled = SamplingParams {
        temperature: 0.9,
        top_k: 50,
        top_p: 0.95,
        repetition_penalty: 1.3,
        seed: 42,
        ..SamplingParams::default()
    };
    let mut greedy_ids = Vec::new();
    for sampling in [SamplingParams::default(), sampled] {
        const TOKENS: usize = 16;
        let options = GenerateOptions {
            max_new_tokens: TOKENS,
            stop_ids: Vec::new(),
            sampling,
            ..GenerateOptions::default()
        };
        let mut local = LocalPipeline::load(model.path()).unwrap();
        let expected = generate_with(&mut local, PROMPT, &options, |_, _| true)
            .await
            .unwrap();
        let mut session = client.session();
        let at_client = generate_with(
            &mut ChosenAtClient(&mut session),
            PROMPT,
            &options,
            |_, _| true,
        )
        .await
        .unwrap();
        session.close().await;
        let metrics = || swarm.nodes.iter().map(|n| n.metrics()).collect::<Vec<_>>();
        let mut after_prefill: Vec<MetricsSnapshot> = Vec::new();
        let mut session = client.session();
        let at_last_hop = generate_with(&mut session, PROMPT, &options, |_, steps| {
            if steps.len() == 1 {
                after_prefill = metrics();
            }
            true
        })
        .await
        .unwrap();
        session.close().await;
        let after_decode = metrics();
        // The same hidden states, so the same draws, wherever the token is chosen.
        assert_eq!(
            at_last_hop.generated_ids, at_client.generated_ids,
            "{sampling:?}"
        );
        let mut session = exact.session();
        let lossless = generate_with(&mut session, PROMPT, &options, |_, _| true)
            .await
            .unwrap();
        session.close().await;
        assert_eq!(
            lossless.generated_ids, expected.generated_ids,
            "{sampling:?}"
        );
        assert_eq!(lossless.steps.len(), expected.steps.len());
        for (got, want) in lossless.steps.iter().zip(&expected.steps) {
            assert_eq!(got.top, want.top);
        }
        // Through f16, candidates past the first may swap places with near ties; each one both
        // lists have has the same logit.
        for (got, want) in at_last_hop.steps.iter().zip(&at_client.steps) {
            assert_eq!(got.top.len(), 5);
            assert_eq!(got.top[0].0, want.top[0].0);
            for (id, logit) in &got.top {
                if let Some((_, l)) = want.top.iter().find(|c| c.0 == *id) {
                    assert!((logit - l).abs() <= LOGIT_TOLERANCE, "{logit} vs {l}");
                }
            }
        }
        match sampling.is_greedy() {
            true => greedy_ids = expected.generated_ids.clone(),
            false => assert_ne!(expected.generated_ids, greedy_ids, "a draw, not greedy"),
        }
        // Every hop, the last included, moves at most 2 × hidden + 1 KiB a decode token each
        // way: a hidden state in f16 and a receipt, or the token and its five candidates.
        let bound = 2 * hidden + 1024;
        for (i, (now, then)) in after_decode.iter().zip(&after_prefill).enumerate() {
            let calls = now.forward_calls - then.forward_calls;
            assert_eq!(calls, TOKENS as u64 - 1);
            let sent = (now.bytes_sent - then.bytes_sent) / calls;
            let received = (now.bytes_received - then.bytes_received) / calls;
            println!("hop {i}: {sent} bytes sent, {received} received per decode token");
            assert!(
                sent <= bound && received <= bound,
                "hop {i}: {sent} / {received}"
            );
        }
    }
    swarm.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_the_middle_node_mid_generation_keeps_the_tokens() {
    let model = TestModel::new(&ModelSpec::demo());
    let expected = local_reference(&model, 20).await;
    let mut swarm = Swarm::start(model.path(), &[(0, 2), (2, 4), (4, 6)])
        .await
        .unwrap();
    swarm.add_node(model.path(), 2, 4).await.unwrap();
    let client = SwarmClient::connect(ClientConfig::new(swarm.tracker.url()))
        .await
        .unwrap();
    let mut session = client.session();
    let mut victim = None;
    let got = generate(&mut session, PROMPT, 20, &[], |s, n| {
        if n == 8 {
            let middle = s.chain()[1].clone();
            assert_eq!((middle.layers.start, middle.layers.end), (2, 4));
            swarm.node_at(&middle.addr).unwrap().kill();
            victim = Some(middle.addr);
        }
    })
    .await
    .unwrap();
    assert_same_generation(&got, &expected);
    let victim = victim.unwrap();
    assert_eq!(session.events().len(), 1, "{:?}", session.events());
    assert!(session.events()[0].contains(&victim));
    assert!(session.chain().iter().all(|h| h.addr != victim));
    // Downstream kept its cache: the last node was never replayed to.
    let last = swarm.nodes.iter().find(|n| n.layers().start == 4).unwrap();
    assert_eq!(last.metrics().forward_calls, 20);
    // The replacement got the whole history replayed with its positions, then the new steps.
    let spare = swarm
        .nodes
        .iter()
        .find(|n| n.layers().start == 2 && n.advertised() != victim)
        .unwrap();
    assert_eq!(spare.metrics().forward_calls, 8 + 12);
    session.close().await;
    swarm.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_spread_over_replicas() {
    let model = TestModel::new(&ModelSpec::tiny());
    let swarm = Swarm::start(model.path(), &[(0, 2), (2, 4), (2, 4)])
        .await
        .unwrap();
    let client = SwarmClient::connect(ClientConfig::new(swarm.tracker.url()))
        .await
        .unwrap();
    let mut sessions = Vec::new();
    for _ in 0..4 {
        let mut session = client.session();
        generate(&mut session, PROMPT, 2, &[], |_, _| {})
            .await
            .unwrap();
        sessions.push(session);
    }
    let replicas: Vec<u64> = swarm
        .nodes
        .iter()
        .filter(|n| n.layers().start == 2)
        .map(|n| n.metrics().sessions_started)
        .collect();
    assert_eq!(
        replicas,
        vec![2, 2],
        "four open sessions split evenly over two replicas"
    );
    for session in sessions {
        session.close().await;
    }
    swarm.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_that_never_answers_is_replaced_at_its_deadline() {
    let model = TestModel::new(&ModelSpec::tiny());
    let expected = local_reference(&model, 6).await;
    let mut swarm = Swarm::start(model.path(), &[(0, 2)]).await.unwrap();
    // A peer that accepts connections and never says a word, announced for layers 2..4.
    let black_hole = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let hole_addr = black_hole.local_addr().unwrap().to_string();
    let held = tokio::spawn(async move {
        let mut open = Vec::new();
        while let Ok((socket, _)) = black_hole.accept().await {
            open.push(socket);
        }
    });
    let mut tracker = neuroshard_client::tracker_client(&swarm.tracker.url()).unwrap();
    let nodes = tracker
        .list_peers(neuroshard_proto::ListPeersRequest::default())
        .await
        .unwrap()
        .into_inner()
        .peers;
    let mut fake = nodes[0].clone();
    fake.addr = hole_addr.clone();
    fake.layers = Some(neuroshard_proto::LayerSpan { start: 2, end: 4 });
    let fake_key = neuroshard_base::NodeKey::generate();
    tracker
        .register(neuroshard_tests::signed_register(&fake_key, fake))
        .await
        .unwrap();

    let mut config = ClientConfig::new(swarm.tracker.url());
    config.router.first_call_deadline = std::time::Duration::from_millis(300);
    let client = SwarmClient::connect(config).await.unwrap();
    // The real replica of 2..4 joins only now: the first plan can only use the silent peer.
    swarm.add_node(model.path(), 2, 4).await.unwrap();
    let mut session = client.session();
    let got = generate(&mut session, PROMPT, 6, &[], |_, _| {})
        .await
        .unwrap();
    assert_same_generation(&got, &expected);
    assert_eq!(session.events().len(), 1);
    assert!(
        session.events()[0].contains(&hole_addr) && session.events()[0].contains("deadline"),
        "{:?}",
        session.events()
    );
    session.close().await;
    held.abort();
    swarm.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_that_panics_mid_call_is_failed_over_with_the_tokens_unchanged() {
    use neuroshard_node::node::Fault;
    let model = TestModel::new(&ModelSpec::tiny());
    let expected = local_reference(&model, 8).await;
    let mut swarm = Swarm::start(model.path(), &[(0, 2)]).await.unwrap();
    // Its compute worker panics from the fourth generated token on.
    let prompt_len = expected.prompt_ids.len();
    let faulty = swarm
        .add_node_with(model.path(), 2, 4, |c| {
            c.fault = Some(Fault::PanicFrom(prompt_len + 3))
        })
        .await
        .unwrap()
        .advertised();
    // A deadline that outlasts the panic hook's backtrace, so the panic's reply is what the
    // client acts on.
    let mut config = ClientConfig::new(swarm.tracker.url());
    config.router.min_deadline = std::time::Duration::from_secs(20);
    let client = SwarmClient::connect(config).await.unwrap();
    // The healthy replica of 2..4 joins only now: the first plan can only use the faulty one.
    swarm.add_node(model.path(), 2, 4).await.unwrap();
    let mut session = client.session();
    let got = generate(&mut session, PROMPT, 8, &[], |_, _| {})
        .await
        .unwrap();
    assert_same_generation(&got, &expected);
    let events = session.events().to_vec();
    assert_eq!(events.len(), 1, "{events:?}");
    assert!(
        events[0].contains(&faulty) && events[0].contains("panicked"),
        "{events:?}"
    );
    assert!(session.chain().iter().all(|h| h.addr != faulty));
    session.close().await;
    // The node outlives its worker's panic and still answers.
    let node = swarm
        .nodes
        .iter()
        .find(|n| n.advertised() == faulty)
        .unwrap();
    assert_eq!(
        node.status().borrow().state,
        neuroshard_node::lifecycle::RunState::Serving
    );
    swarm.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_request_fails_without_banning_healthy_peers() {
    let model = TestModel::new(&ModelSpec {
        max_positions: 1024,
        ..ModelSpec::tiny()
    });
    let swarm = Swarm::start(model.path(), &[(0, 2), (2, 4)]).await.unwrap();
    let client = SwarmClient::connect(ClientConfig::new(swarm.tracker.url()))
        .await
        .unwrap();
    let mut session = client.session();
    let err = session.forward(0, &[9999]).await.unwrap_err().to_string();
    assert!(err.contains("9999") && err.contains("vocabulary"), "{err}");
    assert!(
        session.events().is_empty(),
        "no failover for the caller's own mistake"
    );
    let m = client.metrics();
    assert_eq!((m.peer_count, m.healthy_peers), (2, 2));
    // The same session goes on at the same position with a valid token.
    let logits = session.forward(0, &[1, 2, 3]).await.unwrap();
    assert_eq!(logits.len(), neuroshard_model::BYTE_VOCAB);
    // A prompt longer than one call is sent in chunks and matches the local model.
    let long: Vec<u32> = (0..neuroshard_client::PREFILL_CHUNK_TOKENS as u32 + 40)
        .map(|i| i % 250)
        .collect();
    let mut local = LocalPipeline::load(model.path()).unwrap();
    let expected = neuroshard_client::generate::Pipeline::step(&mut local, 0, &long)
        .await
        .unwrap();
    let mut chunked = client.session();
    let got = chunked.forward(0, &long).await.unwrap();
    let worst = got
        .iter()
        .zip(&expected)
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    assert!(worst <= LOGIT_TOLERANCE, "{worst}");
    session.close().await;
    chunked.close().await;
    swarm.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_peer_nobody_can_replace_is_waited_for_instead_of_failing_the_generation() {
    let model = TestModel::new(&ModelSpec::demo());
    let expected = local_reference(&model, 4).await;
    let swarm = Swarm::start(model.path(), &[(0, 6)]).await.unwrap();
    let mut config = ClientConfig::new(swarm.tracker.url());
    // A 10 ms floor under the deadline, so that the rest below outlasts it on any machine.
    config.router.min_deadline = std::time::Duration::from_millis(10);
    let client = SwarmClient::connect(config).await.unwrap();
    let mut session = client.session();
    // From the first token on, the node computes at a 1 % share: after each call it rests 99
    // times as long as it computed, so the next call misses the deadline the earlier calls
    // taught the client, and no other node serves its layers.
    let node = &swarm.nodes[0];
    let got = generate(&mut session, PROMPT, 4, &[], |_, n| {
        if n == 1 {
            node.set_compute_share(1);
        }
    })
    .await
    .unwrap();
    assert_same_generation(&got, &expected);
    assert!(
        session
            .events()
            .iter()
            .any(|e| e.contains("deadline") && e.contains("asked again")),
        "{:?}",
        session.events()
    );
    session.close().await;
    swarm.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_fetching_its_weights_from_a_peer_serves_as_one_reading_them_from_disk() {
    use neuroshard_client::checkpoint::fetch_weights;
    use neuroshard_model::init::shard_parameter_count;
    let model = TestModel::new(&ModelSpec::demo());
    let config = neuroshard_model::ModelInfo::read(model.path())
        .unwrap()
        .config;
    let expected = local_reference(&model, 12).await;
    let mut swarm = Swarm::start(model.path(), &[(0, 2), (2, 6)]).await.unwrap();
    let source = swarm.nodes[1].advertised();
    // A model directory holding config.json alone: the weights come from the peer.
    let bare = tempfile::tempdir().unwrap();
    std::fs::copy(
        model.path().join("config.json"),
        bare.path().join("config.json"),
    )
    .unwrap();

    // Any layers inside the peer's range, with progress after every verified chunk.
    let mut progress = Vec::new();
    let range = LayerRange::new(4, 6).unwrap();
    let (info, checkpoint, report) =
        fetch_weights(&source, bare.path(), range, |p| progress.push(p))
            .await
            .unwrap();
    assert_eq!(info.id, swarm.nodes[1].model_id());
    let bytes = 4 * shard_parameter_count(&config, 4..6) as u64;
    assert_eq!(checkpoint.parameters.len() as u64 * 4, bytes);
    assert!(report.chunks > 1, "{report:?}");
    assert_eq!(progress.len(), report.chunks);
    assert!(progress.windows(2).all(|w| w[0].done < w[1].done));
    assert_eq!(
        progress.last().map(|p| (p.done, p.total)),
        Some((bytes, bytes))
    );
    // Layers the peer does not hold, and a config of another model, are refused by name.
    let e = fetch_weights(&source, bare.path(), LayerRange::new(0, 3).unwrap(), |_| {})
        .await
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("serves layers 2..6, which do not hold 0..3"),
        "{e}"
    );
    let other = TestModel::new(&ModelSpec::tiny());
    let e = fetch_weights(&source, other.path(), range, |_| {})
        .await
        .unwrap_err()
        .to_string();
    assert!(e.contains("serves a model of 6 layers"), "{e}");

    // A node started on the bare directory fetches layers 2..6 and, once the peer it fetched
    // them from has left, serves the same generation.
    let model_id = swarm.nodes[0].model_id().to_string();
    let fetched = swarm
        .add_node_with(bare.path(), 2, 6, |c| c.weights_from = Some(source.clone()))
        .await
        .unwrap();
    let report = fetched.weights_fetch().unwrap().clone();
    assert_eq!(report.requests, 1, "{report:?}");
    assert_eq!(report.chunks_moved, report.chunks);
    assert_eq!(
        report.total_bytes,
        4 * shard_parameter_count(&config, 2..6) as u64
    );
    assert_eq!(fetched.model_id(), model_id);
    let fetched_addr = fetched.advertised();
    // A node on an empty directory takes the model's files from the peer too, and keeps the
    // weights it fetched.
    let empty = tempfile::tempdir().unwrap();
    let keeper = swarm
        .add_node_with(empty.path(), 2, 6, |c| {
            c.weights_from = Some(source.clone())
        })
        .await
        .unwrap();
    assert_eq!(keeper.model_id(), model_id);
    let kept_addr = keeper.advertised();
    assert_eq!(
        std::fs::read(empty.path().join("config.json")).unwrap(),
        std::fs::read(model.path().join("config.json")).unwrap()
    );
    assert!(empty.path().join("layers-2-6.f32").exists());
    let left = swarm.nodes.remove(1);
    left.shutdown().await;
    let client = SwarmClient::connect(ClientConfig::new(swarm.tracker.url()))
        .await
        .unwrap();
    let mut session = client.session();
    let got = generate(&mut session, PROMPT, 12, &[], |_, _| {})
        .await
        .unwrap();
    assert_same_generation(&got, &expected);
    assert!(
        session
            .chain()
            .iter()
            .any(|hop| hop.addr == fetched_addr || hop.addr == kept_addr),
        "{:?}",
        session.chain()
    );
    session.close().await;

    // With every peer that had layers 2..6 gone, a node on the kept directory starts from disk
    // (no peer to fetch from) and serves the same generation.
    for node in swarm.nodes.drain(1..) {
        node.shutdown().await;
    }
    let restarted = swarm.add_node(empty.path(), 2, 6).await.unwrap();
    assert!(restarted.weights_fetch().is_none(), "read from disk");
    assert_eq!(restarted.model_id(), model_id);
    let client = SwarmClient::connect(ClientConfig::new(swarm.tracker.url()))
        .await
        .unwrap();
    let mut session = client.session();
    let got = generate(&mut session, PROMPT, 12, &[], |_, _| {})
        .await
        .unwrap();
    assert_same_generation(&got, &expected);
    session.close().await;
    // A range the directory does not hold is named, not served wrong.
    let e = start_node(NodeConfig::new(
        empty.path(),
        LayerRange::new(0, 2).unwrap(),
    ))
    .await
    .unwrap_err()
    .to_string();
    assert!(e.contains("fetched weights of layers 0..2"), "{e}");
    swarm.shutdown().await;
}
