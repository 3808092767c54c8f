//! Training through the swarm: a pipeline backward that gives single-process autodiff's
//! gradients, a loss that falls, receipts for every training call, and bad calls refused.

use neuroshard_model::init::ModelSpec;
use neuroshard_model::{Device, ShardInput, TrainConfig, TrainOutput, TrainShard};
use neuroshard_node::client::{ClientConfig, Microbatch, SwarmClient};
use neuroshard_node::node::NodeHandle;
use neuroshard_node::router::Hop;
use neuroshard_proto as pb;
use neuroshard_tests::{Swarm, TestModel, node_client};

/// Public-domain text (the Gettysburg Address, 1863) as bytes.
const TEXT: &str = "Four score and seven years ago our fathers brought forth on this continent, a \
new nation, conceived in Liberty, and dedicated to the proposition that all men are created \
equal. Now we are engaged in a great civil war, testing whether that nation, or any nation so \
conceived and so dedicated, can long endure.";

/// `count` windows of `len` + 1 bytes of `TEXT`, starting `stride` apart from `first`.
fn windows(first: usize, count: usize, len: usize, stride: usize) -> Vec<Microbatch> {
    let bytes: Vec<u32> = TEXT.bytes().map(u32::from).collect();
    (0..count)
        .map(|i| {
            let start = (first + i * stride) % (bytes.len() - len - 1);
            Microbatch::from_window(&bytes[start..start + len + 1])
        })
        .collect()
}

async fn training_swarm(model: &TestModel) -> Swarm {
    let mut swarm = Swarm::start(model.path(), &[]).await;
    for (start, end) in [(0, 2), (2, 4)] {
        swarm
            .add_node_with(model.path(), start, end, |c| {
                c.train = Some(TrainConfig::default())
            })
            .await;
    }
    swarm
}

async fn client(swarm: &Swarm) -> SwarmClient {
    SwarmClient::connect(ClientConfig::new(swarm.tracker.url()))
        .await
        .unwrap()
}

/// The swarm's nodes as a training chain, in start order.
fn chain(swarm: &Swarm) -> Vec<Hop> {
    let hop = |node: &NodeHandle| Hop {
        addr: node.advertised(),
        node_id: node.id().to_string(),
        layers: node.layers(),
    };
    swarm.nodes.iter().map(hop).collect()
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
        swarm_grads.extend(node.training_snapshot().expect("the node trained").1);
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
    swarm.add_node(model.path(), 0, 4).await;
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
    let wrong = neuroshard_node::convert::tensor_to_proto(neuroshard_model::codec::encode(
        &[0.0; 3 * 32],
        &[1, 3, 32],
        neuroshard_model::codec::WireDType::F32,
    ));
    let e = first.backward(backward(Some(wrong))).await.unwrap_err();
    assert!(e.message().contains("shape"), "{e}");
    let right = neuroshard_node::convert::tensor_to_proto(neuroshard_model::codec::encode(
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
