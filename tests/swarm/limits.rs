//! Bandwidth caps on a node's transport: Forward traffic keeps to the cap in each direction,
//! and a cap changed on the running node applies at once. Throughput itself is measured by
//! `benches/benches/bandwidth.rs`.

use std::time::Instant;

use neuroshard_model::codec::{WireDType, encode};
use neuroshard_model::init::ModelSpec;
use neuroshard_net::convert::{span_to_proto, tensor_to_proto};
use neuroshard_proto as pb;
use neuroshard_tests::{Swarm, TestModel};
use pb::forward_request::Input;

/// The cap under test, KB/s.
const CAP_KBPS: u32 = 100;

/// Calls per measurement; each moves one [`TOKENS`] × 64 f32 tensor in the capped direction.
const CALLS: usize = 5;
const TOKENS: usize = 200;
const HIDDEN: usize = 64;

/// Measured rate may exceed the cap by this factor: the limiter's first burst (4 KiB) and one
/// chunk of credit, over 256 KB, are about 3 %.
const TOLERANCE: f64 = 1.10;

/// Bytes of one [`TOKENS`] × [`HIDDEN`] f32 tensor.
const TENSOR_BYTES: usize = TOKENS * HIDDEN * 4;

/// Runs [`CALLS`] Forward calls of hidden states through layers 1..3 (f32 each way, hidden states out); returns the
/// payload rate in KB/s.
async fn forward_rate(
    client: &mut pb::node_client::NodeClient<tonic::transport::Channel>,
    round: &str,
) -> f64 {
    let values: Vec<f32> = (0..TOKENS * HIDDEN)
        .map(|i| (i as f32 * 0.37).sin())
        .collect();
    let tensor = tensor_to_proto(encode(&values, &[1, TOKENS, HIDDEN], WireDType::F32));
    let started = Instant::now();
    for call in 0..CALLS {
        let reply = client
            .forward(pb::ForwardRequest {
                session_id: format!("{round}-{call}"),
                layers: Some(span_to_proto(
                    neuroshard_base::LayerRange::new(1, 3).unwrap(),
                )),
                input: Some(Input::Hidden(tensor.clone())),
                reply_dtype: pb::Dtype::F32 as i32,
                ..Default::default()
            })
            .await
            .unwrap();
        assert!(reply.get_ref().output.is_some());
    }
    (CALLS * TENSOR_BYTES) as f64 / 1000.0 / started.elapsed().as_secs_f64()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forward_traffic_keeps_to_the_caps_and_cap_changes_apply_live() {
    let model = TestModel::new(&ModelSpec::tiny());
    let mut swarm = Swarm::start(model.path(), &[]).await.unwrap();
    let node = swarm
        .add_node_with(model.path(), 1, 3, |c| c.upload_kbps = CAP_KBPS)
        .await
        .unwrap();
    let mut client =
        pb::node_client::NodeClient::new(neuroshard_tests::channel(&node.advertised()).await);
    let cap = f64::from(CAP_KBPS);

    let up = forward_rate(&mut client, "up").await;
    assert!(
        up <= cap * TOLERANCE,
        "upload {up:.1} KB/s over a {cap} KB/s cap"
    );

    // The same connection, the cap moved to the other direction on the running node.
    node.set_bandwidth(0, CAP_KBPS);
    let down = forward_rate(&mut client, "down").await;
    assert!(
        down <= cap * TOLERANCE,
        "download {down:.1} KB/s over a {cap} KB/s cap"
    );

    // Lifted, the node enforces no cap (how fast it then runs is a benchmark's question:
    // benches/benches/bandwidth.rs).
    node.set_bandwidth(0, 0);
    assert_eq!(
        (node.limits().upload_kbps, node.limits().download_kbps),
        (0, 0)
    );
    forward_rate(&mut client, "free").await;
    println!("cap {cap} KB/s: upload {up:.1}, download {down:.1} KB/s");
    swarm.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_used_up_transfer_budget_refuses_new_work_counting_every_transport_byte() {
    let model = TestModel::new(&ModelSpec::tiny());
    let mut swarm = Swarm::start(model.path(), &[]).await.unwrap();
    let node = swarm.add_node(model.path(), 1, 3).await.unwrap();
    let mut client =
        pb::node_client::NodeClient::new(neuroshard_tests::channel(&node.advertised()).await);
    let before = node.transport_bytes();
    forward_rate(&mut client, "counted").await;
    let moved = node.transport_bytes() - before;
    // CALLS tensors in and CALLS out, plus framing: the transport saw at least the payloads.
    assert!(
        moved >= (2 * CALLS * TENSOR_BYTES) as u64,
        "{moved} bytes counted"
    );

    // A budget already used up: the next Forward is refused with the figures.
    node.set_transfer_budget(Some(node.transport_bytes()));
    let values = vec![0.5f32; HIDDEN];
    let err = client
        .forward(pb::ForwardRequest {
            session_id: "over".into(),
            layers: Some(span_to_proto(
                neuroshard_base::LayerRange::new(1, 3).unwrap(),
            )),
            input: Some(Input::Hidden(tensor_to_proto(encode(
                &values,
                &[1, 1, HIDDEN],
                WireDType::F32,
            )))),
            reply_dtype: pb::Dtype::F32 as i32,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::ResourceExhausted, "{err}");
    assert!(err.message().contains("transfer cap reached"), "{err}");

    // Lifted (a new period), work is taken again.
    node.set_transfer_budget(None);
    forward_rate(&mut client, "after").await;
    swarm.shutdown().await;
}
