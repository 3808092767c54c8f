//! Training through the swarm: a pipeline backward that gives single-process autodiff's
//! gradients, a loss that falls, receipts for every training call, and bad calls refused.

use neuroshard_base::NodeKey;
use neuroshard_client::checkpoint::{Checkpoint, fetch_checkpoint, push_checkpoint};
use neuroshard_client::router::Hop;
use neuroshard_client::{ClientConfig, Microbatch, SwarmClient};
use neuroshard_model::init::ModelSpec;
use neuroshard_model::{Device, ShardInput, TrainConfig, TrainOutput, TrainShard};
use neuroshard_net::NodeError;
use neuroshard_node::node::NodeHandle;
use neuroshard_node::node::{Compression, Fault, TrainingConfig};
use neuroshard_proto as pb;
use neuroshard_tests::{Swarm, TestModel, node_client, node_client_as};
use neuroshard_train::run::{RunBody, RunManifest, RunStage};
use std::sync::Arc;

/// Public-domain text (the Gettysburg Address, 1863) as bytes.
const TEXT: &str = "Four score and seven years ago our fathers brought forth on this continent, a \
new nation, conceived in Liberty, and dedicated to the proposition that all men are created \
equal. Now we are engaged in a great civil war, testing whether that nation, or any nation so \
conceived and so dedicated, can long endure.";

/// `count` windows of `len` + 1 bytes of `TEXT`, starting `stride` apart from `first`.
pub(crate) fn windows(first: usize, count: usize, len: usize, stride: usize) -> Vec<Microbatch> {
    let bytes: Vec<u32> = TEXT.bytes().map(u32::from).collect();
    (0..count)
        .map(|i| {
            let start = (first + i * stride) % (bytes.len() - len - 1);
            Microbatch::from_window(&bytes[start..start + len + 1])
        })
        .collect()
}

async fn training_swarm(model: &TestModel) -> Swarm {
    let mut swarm = Swarm::start(model.path(), &[]).await.unwrap();
    for (start, end) in [(0, 2), (2, 4)] {
        swarm
            .add_node_with(model.path(), start, end, |c| {
                c.train = Some(TrainingConfig::default())
            })
            .await
            .unwrap();
    }
    swarm
}

async fn client(swarm: &Swarm) -> SwarmClient {
    SwarmClient::connect(ClientConfig::new(swarm.tracker.url()))
        .await
        .unwrap()
}

/// The swarm's nodes as a training chain, in start order.
pub(crate) fn chain(swarm: &Swarm) -> Vec<Hop> {
    swarm.nodes.iter().map(NodeHandle::hop).collect()
}

fn relative_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    let scale = a.iter().fold(0f32, |m, v| m.max(v.abs())).max(1e-12);
    let diff = a
        .iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max);
    diff / scale
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backward_through_the_swarm_gives_single_process_gradients_and_earns_receipts() {
    let model = TestModel::new(&ModelSpec::tiny());
    let swarm = training_swarm(&model).await;
    let client = client(&swarm).await;
    let mut session = client.train_session(chain(&swarm)).unwrap();
    let batch = windows(0, 2, 24, 40);
    let report = session.accumulate(&batch, false).await.unwrap();
    assert_eq!(report.tokens, 48);
    assert_eq!(report.inner_steps, vec![0, 0]);

    let mut whole = TrainShard::load(
        model.path(),
        0..4,
        &Device::default(),
        TrainConfig::default(),
    )
    .unwrap();
    let mut expected_loss = 0.0;
    for (i, mb) in batch.iter().enumerate() {
        let id = i.to_string();
        let out = whole
            .forward(
                &id,
                ShardInput::Tokens(mb.inputs.clone()),
                Some(&mb.targets),
            )
            .unwrap();
        let TrainOutput::Loss(loss) = out else {
            panic!("the whole model gives a loss")
        };
        expected_loss += loss / batch.len() as f32;
        whole.backward(&id, None).unwrap();
    }
    assert!(
        (report.loss - expected_loss).abs() < 1e-4,
        "{} vs {expected_loss}",
        report.loss
    );
    let mut swarm_grads = Vec::new();
    for node in &swarm.nodes {
        swarm_grads.extend(
            node.training_snapshot()
                .expect("the node trained")
                .gradients,
        );
    }
    let expected = whole.gradients();
    let diff = relative_diff(&expected, &swarm_grads);
    assert!(
        diff < 1e-4,
        "the swarm's gradients differ from autodiff's by {diff}"
    );

    // One receipt per training call: 2 nodes × 2 microbatches × (forward + backward).
    let receipts = client.flush_receipts().await;
    assert_eq!(receipts.stored, 8, "{receipts:?}");
    for node in &swarm.nodes {
        let counts = node.ledger().read(|l| l.status_counts()).await.unwrap();
        assert_eq!(counts.verified, 4, "node {}", node.layers());
        let rows = node.ledger().read(|l| l.page(None, 0, 100)).await.unwrap();
        assert_eq!(
            rows.iter().filter(|r| r.kind == "backward").count(),
            2,
            "{rows:?}"
        );
    }
    swarm.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn training_through_the_swarm_lowers_the_loss_by_a_third() {
    let model = TestModel::new(&ModelSpec::tiny());
    let swarm = training_swarm(&model).await;
    let client = client(&swarm).await;
    let mut session = client.train_session(chain(&swarm)).unwrap();
    let mut losses = Vec::new();
    for step in 0..40 {
        let report = session.step(&windows(step * 37, 2, 32, 101)).await.unwrap();
        assert_eq!(report.inner_steps, vec![step as u64 + 1; 2]);
        losses.push(report.loss);
    }
    let first = losses[0];
    let last: f32 = losses[35..].iter().sum::<f32>() / 5.0;
    assert!(last < 0.7 * first, "loss {first} → {last}: {losses:?}");
    swarm.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_training_calls_are_refused_by_name_and_the_node_keeps_training() {
    let model = TestModel::new(&ModelSpec::tiny());
    let mut swarm = training_swarm(&model).await;
    swarm.add_node(model.path(), 0, 4).await.unwrap();
    let tokens = |ids: Vec<u32>| Some(pb::forward_request::Input::Tokens(pb::TokenIds { ids }));
    let forward = |start, end, ids: Vec<u32>| pb::ForwardRequest {
        session_id: "mb".into(),
        layers: Some(pb::LayerSpan { start, end }),
        input: tokens(ids),
        train: true,
        ..Default::default()
    };
    let refused = async |node: &NodeHandle, req: pb::ForwardRequest| {
        node_client(node).await.forward(req).await.unwrap_err()
    };
    let e = refused(&swarm.nodes[2], forward(0, 4, vec![1, 2, 3])).await;
    assert_eq!(e.code(), tonic::Code::FailedPrecondition);
    assert!(e.message().contains("does not train"), "{e}");
    let e = refused(&swarm.nodes[0], forward(0, 1, vec![1, 2, 3])).await;
    assert_eq!(e.code(), tonic::Code::FailedPrecondition, "{e}");
    let e = refused(
        &swarm.nodes[0],
        pb::ForwardRequest {
            start_pos: 3,
            ..forward(0, 2, vec![1, 2, 3])
        },
    )
    .await;
    assert!(e.message().contains("position 0"), "{e}");
    let e = refused(
        &swarm.nodes[1],
        pb::ForwardRequest {
            input: Some(pb::forward_request::Input::Hidden(pb::Tensor::default())),
            ..forward(2, 4, vec![])
        },
    )
    .await;
    assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e}");

    let mut first = node_client(&swarm.nodes[0]).await;
    let backward = |grad: Option<pb::Tensor>| pb::BackwardRequest {
        session_id: "mb".into(),
        layers: Some(pb::LayerSpan { start: 0, end: 2 }),
        grad_output: grad,
        ..Default::default()
    };
    let e = first.backward(backward(None)).await.unwrap_err();
    assert!(e.message().contains("\"mb\""), "{e}");
    first.forward(forward(0, 2, vec![1, 2, 3])).await.unwrap();
    let e = first.backward(backward(None)).await.unwrap_err();
    assert!(e.message().contains("missing"), "{e}");
    let wrong = neuroshard_net::convert::tensor_to_proto(neuroshard_model::codec::encode(
        &[0.0; 3 * 32],
        &[1, 3, 32],
        neuroshard_model::codec::WireDType::F32,
    ));
    let e = first.backward(backward(Some(wrong))).await.unwrap_err();
    assert!(e.message().contains("shape"), "{e}");
    let right = neuroshard_net::convert::tensor_to_proto(neuroshard_model::codec::encode(
        &[0.01; 3 * 64],
        &[1, 3, 64],
        neuroshard_model::codec::WireDType::F32,
    ));
    let reply = first
        .backward(pb::BackwardRequest {
            step: true,
            ..backward(Some(right))
        })
        .await
        .unwrap()
        .into_inner();
    assert!(reply.grad_input.is_none());
    assert_eq!(reply.inner_steps, 1);
    swarm.shutdown().await;
}

/// Starts `configs.len()` replicas of the whole model, each told of the others.
async fn replicas(model: &TestModel, configs: Vec<(TrainingConfig, Option<Fault>)>) -> Swarm {
    let configs = configs.into_iter().map(|(t, f)| (t, f, None)).collect();
    replicas_with(model, configs).await
}

/// [`replicas`], each with its key when one is given.
pub(crate) async fn replicas_with(
    model: &TestModel,
    configs: Vec<(TrainingConfig, Option<Fault>, Option<Arc<NodeKey>>)>,
) -> Swarm {
    let mut swarm = Swarm::start(model.path(), &[]).await.unwrap();
    for (train, fault, key) in configs {
        swarm
            .add_node_with(model.path(), 0, 4, |c| {
                c.train = Some(train);
                c.fault = fault;
                c.key = key;
            })
            .await
            .unwrap();
    }
    let addrs: Vec<String> = swarm.nodes.iter().map(|n| n.advertised()).collect();
    for node in &swarm.nodes {
        node.set_training_replicas(addrs.clone());
    }
    swarm
}

/// Trains every replica of `swarm` for `steps` inner steps at once, each on its own slice of
/// the text; each replica's losses.
async fn train_replicas(swarm: &Swarm, steps: usize) -> Result<Vec<Vec<f32>>, NodeError> {
    train_replicas_as(swarm, steps, None).await
}

/// [`train_replicas`] driven by `trainer`'s key (a fresh one when none).
pub(crate) async fn train_replicas_as(
    swarm: &Swarm,
    steps: usize,
    trainer: Option<Arc<NodeKey>>,
) -> Result<Vec<Vec<f32>>, NodeError> {
    let client = SwarmClient::connect(ClientConfig {
        key: trainer,
        ..ClientConfig::new(swarm.tracker.url())
    })
    .await?;
    let runs = chain(swarm).into_iter().enumerate().map(|(r, hop)| {
        let client = &client;
        async move {
            let mut session = client.train_session(vec![hop])?;
            let mut losses = Vec::new();
            for step in 0..steps {
                let batch = windows(r * 61 + step * 37, 2, 32, 101);
                let report = session.step(&batch).await?;
                losses.push(report.loss);
            }
            Ok::<_, NodeError>(losses)
        }
    });
    futures::future::join_all(runs).await.into_iter().collect()
}

pub(crate) fn diloco(compression: Compression) -> TrainingConfig {
    TrainingConfig {
        outer_every: 5,
        compression,
        ..TrainingConfig::default()
    }
}

/// Mean of the last five losses of every replica in `runs`.
fn final_loss(runs: &[Vec<f32>]) -> f32 {
    let tail: Vec<f32> = runs
        .iter()
        .flat_map(|r| r[r.len() - 5..].to_vec())
        .collect();
    tail.iter().sum::<f32>() / tail.len() as f32
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compressed_diloco_ends_within_five_percent_of_uncompressed() {
    let model = TestModel::new(&ModelSpec::tiny());
    let mut finals = Vec::new();
    for compression in [Compression::Dense, Compression::TopK(0.1)] {
        let swarm = replicas(&model, vec![(diloco(compression), None); 2]).await;
        let runs = train_replicas(&swarm, 30).await.unwrap();
        for node in &swarm.nodes {
            let snapshot = node.training_snapshot().unwrap();
            assert_eq!(snapshot.outer_round, 6, "{compression:?}");
        }
        // Replicas that heard each other start every round from the same weights.
        let starts: Vec<_> = {
            let mut starts = Vec::new();
            for node in &swarm.nodes {
                let mut c = node_client(node).await;
                let (checkpoint, _) = fetch_checkpoint(&mut c, "", node.layers(), u64::MAX, |_| {})
                    .await
                    .unwrap();
                starts.push(checkpoint);
            }
            starts
        };
        assert_eq!(starts[0].round, 6);
        assert_eq!(starts[0], starts[1], "{compression:?}");
        let loss = final_loss(&runs);
        assert!(loss < 0.7 * runs[0][0], "{compression:?}: {runs:?}");
        finals.push(loss);
        swarm.shutdown().await;
    }
    let (dense, compressed) = (finals[0], finals[1]);
    eprintln!("final loss: dense DiLoCo {dense:.4}, top-10 % DiLoCo {compressed:.4}");
    assert!(
        (compressed - dense).abs() <= 0.05 * dense,
        "compressed {compressed} vs dense {dense}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_sending_flipped_and_scaled_pseudo_gradients_does_not_stop_the_loss_falling() {
    let model = TestModel::new(&ModelSpec::tiny());
    let bad = Some(Fault::BadPseudoGradient { scale: -10.0 });
    let config = diloco(Compression::TopK(0.1));
    let swarm = replicas(
        &model,
        vec![
            (config.clone(), None),
            (config.clone(), None),
            (config, bad),
        ],
    )
    .await;
    let runs = train_replicas(&swarm, 30).await.unwrap();
    for honest in &runs[..2] {
        let last = honest[honest.len() - 5..].iter().sum::<f32>() / 5.0;
        assert!(last < 0.7 * honest[0], "{runs:?}");
    }
    swarm.shutdown().await;

    // The same swarm with a plain mean (nothing trimmed) is derailed: the test can fail.
    let plain = TrainingConfig {
        trim: Some(0),
        ..diloco(Compression::TopK(0.1))
    };
    let bad = Some(Fault::BadPseudoGradient { scale: -10.0 });
    let swarm = replicas(
        &model,
        vec![(plain.clone(), None), (plain.clone(), None), (plain, bad)],
    )
    .await;
    match train_replicas(&swarm, 30).await {
        Ok(runs) => {
            let honest = &runs[0];
            let last = honest[honest.len() - 5..].iter().sum::<f32>() / 5.0;
            // NaN counts as derailed too.
            let fell = last < 0.7 * honest[0];
            assert!(!fell, "a plain mean survived: {runs:?}");
        }
        Err(e) => assert!(e.to_string().contains("not finite"), "{e}"),
    }
    swarm.shutdown().await;
}

/// A run of `model` in one stage (layers 0..4) trained by the node of key `node`, driven by
/// `trainer`, and taking pushed checkpoints if `allow_put`.
pub(crate) fn one_stage_run(
    model: &TestModel,
    node: &NodeKey,
    trainer: &NodeKey,
    allow_put: bool,
) -> Arc<RunManifest> {
    let body = RunBody {
        run_id: "run-1".into(),
        model_id: neuroshard_model::ModelInfo::read(model.path()).unwrap().id,
        stages: vec![RunStage {
            layers: neuroshard_base::LayerRange::new(0, 4).unwrap(),
            replicas: vec![node.id()],
        }],
        trainers: vec![trainer.id()],
        allow_put_checkpoint: allow_put,
    };
    Arc::new(RunManifest::sign(body, &NodeKey::generate()).unwrap())
}

/// A node training layers 0..4 for a run whose trainer (returned) has taken one step, its
/// checkpoints in 64 KiB chunks.
pub(crate) async fn checkpoint_node(
    model: &TestModel,
    fault: Option<Fault>,
    allow_put: bool,
) -> (Swarm, Arc<NodeKey>) {
    checkpoint_node_with(model, fault, allow_put, |_| {}).await
}

/// [`checkpoint_node`] with its training config adjusted by `configure`.
pub(crate) async fn checkpoint_node_with(
    model: &TestModel,
    fault: Option<Fault>,
    allow_put: bool,
    configure: impl FnOnce(&mut TrainingConfig),
) -> (Swarm, Arc<NodeKey>) {
    let (key, trainer) = (Arc::new(NodeKey::generate()), Arc::new(NodeKey::generate()));
    let run = one_stage_run(model, &key, &trainer, allow_put);
    let mut swarm = Swarm::start(model.path(), &[]).await.unwrap();
    swarm
        .add_node_with(model.path(), 0, 4, |c| {
            c.key = Some(key);
            let mut train = TrainingConfig {
                checkpoint_chunk_bytes: 64 << 10,
                run: Some(run),
                ..TrainingConfig::default()
            };
            configure(&mut train);
            c.train = Some(train);
            c.fault = fault;
        })
        .await
        .unwrap();
    let client = SwarmClient::connect(ClientConfig {
        key: Some(trainer.clone()),
        ..ClientConfig::new(swarm.tracker.url())
    })
    .await
    .unwrap();
    let mut session = client.train_session(chain(&swarm)).unwrap();
    session.step(&windows(0, 1, 16, 1)).await.unwrap();
    (swarm, trainer)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_corrupted_checkpoint_chunk_is_named_and_fetched_again() {
    let model = TestModel::new(&ModelSpec::tiny());
    let (swarm, _) = checkpoint_node(&model, Some(Fault::CorruptChunk(1)), false).await;
    let node = &swarm.nodes[0];
    let mut c = node_client(node).await;
    let mut seen = Vec::new();
    let (checkpoint, report) =
        fetch_checkpoint(&mut c, "", node.layers(), u64::MAX, |p| seen.push(p.done))
            .await
            .unwrap();
    assert!(report.chunks >= 3, "{report:?}");
    assert_eq!(report.requests, 2, "{report:?}");
    assert_eq!(report.chunks_moved, report.chunks + 1, "{report:?}");
    assert_eq!(report.recovered.len(), 1, "{report:?}");
    assert!(
        report.recovered[0].contains("chunk 1 (bytes 65536..131072) does not match its hash"),
        "{report:?}"
    );
    assert_eq!(seen.len(), report.chunks);
    assert_eq!(*seen.last().unwrap(), report.total_bytes);
    assert_eq!(checkpoint.round, 0);
    let start = node.training_snapshot().unwrap();
    assert_eq!(checkpoint.parameters.len(), start.parameters.len());
    swarm.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cut_checkpoint_transfer_resumes_with_the_missing_chunks_only() {
    let model = TestModel::new(&ModelSpec::tiny());
    let (swarm, trainer) = checkpoint_node(&model, Some(Fault::CutCheckpointAfter(2)), true).await;
    let node = &swarm.nodes[0];
    // The run allows pushes, from its trainer only.
    let mut c = node_client_as(node, &trainer).await;
    let (whole, report) = fetch_checkpoint(&mut c, "", node.layers(), u64::MAX, |_| {})
        .await
        .unwrap();
    assert_eq!(report.requests, 2, "{report:?}");
    assert_eq!(
        report.chunks_moved, report.chunks,
        "no chunk is sent twice: {report:?}"
    );
    assert!(report.recovered[0].contains("cut"), "{report:?}");

    // PutCheckpoint: a transfer cut after two chunks keeps them and says what is missing;
    // sending the rest applies the checkpoint.
    let pushed = Checkpoint {
        round: 7,
        parameters: whole.parameters.iter().map(|p| p * 0.5).collect(),
    };
    let bytes = pushed.to_bytes();
    let manifest = neuroshard_train_manifest(&bytes);
    let first_two: Vec<pb::CheckpointChunk> = (0..2)
        .map(|i| pb::CheckpointChunk {
            manifest: (i == 0)
                .then(|| neuroshard_client::checkpoint::manifest_to_proto(&manifest, pushed.round)),
            index: i as u32,
            data: bytes[i * (64 << 10)..(i + 1) * (64 << 10)].to_vec(),
            layers: Some(pb::LayerSpan { start: 0, end: 4 }),
            ..Default::default()
        })
        .collect();
    let reply = c
        .put_checkpoint(futures::stream::iter(first_two))
        .await
        .unwrap()
        .into_inner();
    let chunks = manifest.chunk_hashes.len() as u32;
    assert_eq!(reply.missing, (2..chunks).collect::<Vec<_>>());
    let (reply, report) = push_checkpoint(&mut c, "", node.layers(), &pushed, 64 << 10)
        .await
        .unwrap();
    assert!(reply.missing.is_empty());
    assert_eq!(reply.outer_step, 7);
    assert_eq!(report.requests, 1);
    let snapshot = node.training_snapshot().unwrap();
    assert_eq!(snapshot.outer_round, 7);
    assert_eq!(snapshot.parameters, pushed.parameters);
    // A corrupted chunk in a push is listed as missing, by number.
    let mut bad = pb::CheckpointChunk {
        manifest: Some(neuroshard_client::checkpoint::manifest_to_proto(
            &manifest, 8,
        )),
        index: 0,
        data: bytes[..64 << 10].to_vec(),
        layers: Some(pb::LayerSpan { start: 0, end: 4 }),
        ..Default::default()
    };
    bad.data[10] ^= 1;
    let reply = c
        .put_checkpoint(futures::stream::iter(vec![bad]))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(reply.missing, (0..chunks).collect::<Vec<_>>());
    assert_eq!(node.training_snapshot().unwrap().outer_round, 7);
    // A stranger's push is refused by name and changes nothing.
    let mut theirs = node_client_as(node, &NodeKey::generate()).await;
    let stranger = Checkpoint {
        round: 99,
        parameters: vec![0.0; pushed.parameters.len()],
    };
    let err = push_checkpoint(&mut theirs, "", node.layers(), &stranger, 64 << 10)
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("is not a trainer of run"), "{err}");
    let snapshot = node.training_snapshot().unwrap();
    assert_eq!(snapshot.outer_round, 7);
    assert_eq!(snapshot.parameters, pushed.parameters);
    swarm.shutdown().await;
}

fn neuroshard_train_manifest(bytes: &[u8]) -> neuroshard_train::checkpoint::Manifest {
    neuroshard_train::checkpoint::Manifest::of(bytes, 64 << 10)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn neuroshard_train_runs_two_stages_by_two_replicas_and_saves_a_model_that_loads() {
    use neuroshard_node::train::{TrainOptions, run_training};
    let out = tempfile::tempdir().unwrap();
    let options = TrainOptions {
        steps: 20,
        outer_every: 5,
        batch: 2,
        sequence: 32,
        save: Some(out.path().join("trained")),
        ..TrainOptions::default()
    };
    let report = run_training(options, |_| {}).await.unwrap();
    assert_eq!(report.losses.len(), 20);
    assert!(
        report.losses[19] < 0.7 * report.losses[0],
        "{:?}",
        report.losses
    );
    assert_eq!(report.outer_rounds, 4);
    assert_eq!(report.tokens, 2 * 20 * 2 * 32);
    assert!(report.exchange_bytes > 0);
    assert!(report.exchange_bytes < report.uncompressed_diloco_bytes);
    assert!(report.uncompressed_diloco_bytes < report.dense_allreduce_bytes);
    let trained = out.path().join("trained");
    let shard = neuroshard_model::Shard::load(&trained, 0..4, &Device::default()).unwrap();
    assert_eq!(
        neuroshard_model::ModelInfo::read(&trained)
            .unwrap()
            .config
            .num_hidden_layers,
        4
    );
    drop(shard);
    // Settings out of range are refused by name before anything starts.
    for (options, named) in [
        (
            TrainOptions {
                outer_momentum: 1.5,
                ..TrainOptions::default()
            },
            "outer_momentum 1.5",
        ),
        (
            TrainOptions {
                lr: f64::NAN,
                ..TrainOptions::default()
            },
            "lr NaN",
        ),
        (
            TrainOptions {
                replicas: 0,
                ..TrainOptions::default()
            },
            "replicas (0)",
        ),
    ] {
        let e = run_training(options, |_| {}).await.unwrap_err().to_string();
        assert!(e.contains(named), "{e}");
    }
}

/// Mean next-byte cross-entropy of the model in `dir` over the corpus, in windows of 256.
fn corpus_loss(dir: &std::path::Path) -> f32 {
    let mut stage =
        TrainShard::load(dir, 0..6, &Device::default(), TrainConfig::default()).unwrap();
    let bytes: Vec<u32> = neuroshard_train::CORPUS.bytes().map(u32::from).collect();
    let windows: Vec<&[u32]> = bytes.chunks(257).filter(|w| w.len() > 1).collect();
    let mut total = 0.0;
    for w in &windows {
        let input = ShardInput::Tokens(w[..w.len() - 1].to_vec());
        // One microbatch id, replaced each time: no backward follows.
        match stage.forward("window", input, Some(&w[1..])).unwrap() {
            TrainOutput::Loss(loss) => total += loss,
            TrainOutput::Hidden(_) => panic!("the whole model ends in a loss"),
        }
    }
    total / windows.len() as f32
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_shipped_demo_model_has_learned_its_corpus_and_the_demo_prints_it() {
    use neuroshard_model::init::{DEMO_MODEL_FILES, DEMO_PROMPT, write_demo_model};
    use neuroshard_node::demo::{DemoOptions, run_demo};
    let size: usize = DEMO_MODEL_FILES.iter().map(|(_, b)| b.len()).sum();
    assert!(size <= 10_000_000, "the shipped model is {size} bytes");
    let trained = tempfile::tempdir().unwrap();
    write_demo_model(trained.path()).unwrap();
    // The same shape and seed untrained, for contrast.
    let fresh = TestModel::new(&ModelSpec::trained_demo());
    let (trained_loss, fresh_loss) = (corpus_loss(trained.path()), corpus_loss(fresh.path()));
    assert!(
        trained_loss < 0.3 && trained_loss * 20.0 < fresh_loss,
        "corpus loss: trained {trained_loss}, untrained {fresh_loss}"
    );

    // `neuroshard demo` with its defaults: three nodes continue the Gettysburg Address, byte
    // for byte as the corpus goes on.
    let report = run_demo(
        DemoOptions {
            nodes: 3,
            kill_one: false,
            prompt: DEMO_PROMPT.to_string(),
            max_new_tokens: 100,
            model_dir: None,
        },
        |_| {},
    )
    .await
    .unwrap();
    assert!(report.matches_local());
    let corpus = neuroshard_train::CORPUS;
    assert!(corpus.starts_with(DEMO_PROMPT));
    assert_eq!(
        report.text,
        corpus[DEMO_PROMPT.len()..DEMO_PROMPT.len() + 100]
    );
}
