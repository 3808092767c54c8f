//! Bad requests get clear gRPC errors, and the node keeps serving.

use bytes::Bytes;
use neuroshard_model::codec::{WireDType, encode};
use neuroshard_model::init::ModelSpec;
use neuroshard_net::convert::{span_to_proto, tensor_to_proto};
use neuroshard_proto as pb;
use neuroshard_tests::{Swarm, TestModel, node_client};
use pb::forward_request::Input;
use tonic::Code;

const HIDDEN: usize = 64;

fn request(session: &str, pos: u64, start: u32, end: u32, input: Input) -> pb::ForwardRequest {
    pb::ForwardRequest {
        session_id: session.into(),
        start_pos: pos,
        layers: Some(span_to_proto(
            neuroshard_base::LayerRange::new(start, end).unwrap(),
        )),
        input: Some(input),
        model_id: String::new(),
        reply_dtype: 0,
        ..Default::default()
    }
}

fn hidden_tensor(tokens: usize) -> pb::Tensor {
    let values: Vec<f32> = (0..tokens * HIDDEN)
        .map(|i| (i as f32 * 0.01).sin())
        .collect();
    tensor_to_proto(encode(&values, &[1, tokens, HIDDEN], WireDType::F16))
}

fn hidden(tokens: usize) -> Input {
    Input::Hidden(hidden_tensor(tokens))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_get_clear_errors_and_the_node_keeps_serving() {
    let model = TestModel::new(&ModelSpec::tiny());
    let swarm = Swarm::start(model.path(), &[(2, 4)]).await.unwrap();
    let node = &swarm.nodes[0];
    let mut client = node_client(node).await;

    // A session that works, before and after every bad call.
    let ok = client
        .forward(request("good", 0, 2, 4, hidden(3)))
        .await
        .unwrap()
        .into_inner();
    assert!(matches!(
        ok.output,
        Some(pb::forward_response::Output::Logits(_))
    ));

    let expect = |result: Result<tonic::Response<pb::ForwardResponse>, tonic::Status>,
                  code: Code,
                  words: &str| {
        let status = result.expect_err("the call must fail");
        assert_eq!(status.code(), code, "{status:?}");
        assert!(
            status.message().contains(words),
            "{:?} lacks {words:?}",
            status.message()
        );
    };

    // Malformed tensor: the payload is shorter than shape x dtype.
    let mut t = hidden_tensor(2);
    t.payload = Bytes::from_static(&[1, 2, 3]);
    expect(
        client
            .forward(request("bad1", 0, 2, 4, Input::Hidden(t)))
            .await,
        Code::InvalidArgument,
        "malformed tensor",
    );

    // Malformed tensor: a shape the model cannot take.
    let mut t = hidden_tensor(2);
    t.shape = vec![1, 4, 32];
    expect(
        client
            .forward(request("bad2", 0, 2, 4, Input::Hidden(t)))
            .await,
        Code::InvalidArgument,
        "[1, tokens, 64]",
    );

    // A packed shape of a million dimensions (1 MB on the wire, under this node's Forward cap;
    // 8 MB once decoded): refused by name from the wire bytes, before prost decodes it.
    let mut t = hidden_tensor(2);
    t.shape = vec![1; 1_000_000];
    expect(
        client
            .forward(request("bomb", 0, 2, 4, Input::Hidden(t)))
            .await,
        Code::InvalidArgument,
        "ForwardRequest.hidden.shape has 1000000 entries; at most 8",
    );
    // An lz4 payload of a few bytes claiming more rows than a call may carry: refused from
    // its shape, sized from the served model, before anything is decompressed.
    let mut t = hidden_tensor(1);
    t.shape = vec![1, 4096, HIDDEN as u64];
    t.compression = pb::Compression::Lz4 as i32;
    t.raw_len = 4096 * HIDDEN as u64 * 2;
    t.payload = Bytes::from_static(&[0xff, 0, 0, 0]);
    expect(
        client
            .forward(request("lz4", 0, 2, 4, Input::Hidden(t)))
            .await,
        Code::InvalidArgument,
        "hidden states of 4096 tokens; the cap is 2048 per call",
    );
    // A control call over 1 MiB is refused whole.
    let status = client
        .end_session(pb::EndSessionRequest {
            session_id: "x".repeat(2 << 20),
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert!(
        status.message().contains("EndSessionRequest of"),
        "{status:?}"
    );

    // Oversized tensor, declared: rejected from its header, before any allocation.
    let mut t = hidden_tensor(1);
    t.shape = vec![1, 1 << 20, HIDDEN as u64];
    t.raw_len = (1u64 << 20) * HIDDEN as u64 * 2;
    expect(
        client
            .forward(request("bad3", 0, 2, 4, Input::Hidden(t)))
            .await,
        Code::InvalidArgument,
        "cap",
    );

    // Oversized message, actually sent: a Forward is sized from the served model (2,048
    // tokens of its hidden states in f32, and framing), and refused as its bytes pass that.
    let mut t = hidden_tensor(1);
    t.payload = Bytes::from(vec![0u8; 4 << 20]);
    let status = client
        .forward(request("bad4", 0, 2, 4, Input::Hidden(t)))
        .await
        .expect_err("too large");
    assert_eq!(status.code(), Code::OutOfRange, "{status:?}");
    let cap = 2048 * HIDDEN * 4 + (1 << 20);
    assert!(
        status
            .message()
            .contains(&format!("Forward request of more than {cap} bytes")),
        "{status:?}"
    );

    // Unknown session: a later position for a session this node never saw.
    expect(
        client.forward(request("ghost", 5, 2, 4, hidden(1))).await,
        Code::NotFound,
        "unknown session",
    );

    // Wrong layer: this node serves 2..4. FAILED_PRECONDITION: the caller's listing is stale
    // (the node may have changed its layers), so it reads it again and plans around the node.
    expect(
        client.forward(request("good", 3, 0, 2, hidden(1))).await,
        Code::FailedPrecondition,
        "layers 0..2 requested, this node serves 2..4",
    );
    expect(
        client.forward(request("good", 3, 2, 5, hidden(1))).await,
        Code::FailedPrecondition,
        "this node serves 2..4",
    );

    // Position gap: "good" holds 3 positions, so position 5 would leave a hole.
    expect(
        client.forward(request("good", 5, 2, 4, hidden(1))).await,
        Code::OutOfRange,
        "position gap",
    );

    // A position past the model's (and past what usize adds up to): refused by name before any
    // session work, so the batch worker that runs decode steps is not the one to find it.
    for pos in [u64::MAX, 256] {
        expect(
            client.forward(request("good", pos, 2, 4, hidden(1))).await,
            Code::InvalidArgument,
            "max_position_embeddings",
        );
    }

    // Token ids where hidden states belong.
    let tokens = Input::Tokens(pb::TokenIds { ids: vec![1, 2] });
    expect(
        client.forward(request("bad5", 0, 2, 4, tokens)).await,
        Code::InvalidArgument,
        "layer 0",
    );

    // Still serving, with the good session intact at position 3.
    let ok = client
        .forward(request("good", 3, 2, 4, hidden(1)))
        .await
        .unwrap()
        .into_inner();
    assert!(matches!(
        ok.output,
        Some(pb::forward_response::Output::Logits(_))
    ));
    let ping = client.ping(pb::PingRequest {}).await.unwrap().into_inner();
    let metrics = ping.metrics.unwrap();
    assert_eq!(metrics.sessions, 1, "no bad call left a session behind");
    assert_eq!(metrics.forward_calls, 2);
    assert!(metrics.rpc_failures >= 8);
    swarm.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_kv_budget_answers_resource_exhausted() {
    let model = TestModel::new(&ModelSpec::tiny());
    let mut config = neuroshard_node::node::NodeConfig::new(
        model.path(),
        neuroshard_base::LayerRange::new(2, 4).unwrap(),
    );
    // Tiny config: 2 kv heads x 16 dims x 2 (k, v) x 4 bytes = 256 bytes per token-layer;
    // room for 3 blocks of 64 positions in one layer. A session's first token takes a block
    // in each of this node's two layers: "a" holds two of the three, "b" finds one.
    let block = neuroshard_model::BLOCK_POSITIONS as u64;
    config.kv_budget_bytes = 3 * block * 256;
    let node = neuroshard_node::node::start_node(config).await.unwrap();
    let mut client = node_client(&node).await;
    client
        .forward(request("a", 0, 2, 4, hidden(15)))
        .await
        .unwrap();
    let status = client
        .forward(request("b", 0, 2, 4, hidden(10)))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::ResourceExhausted);
    assert!(status.message().contains("KV cache budget"), "{status:?}");
    // Ending "a" frees its room.
    client
        .end_session(pb::EndSessionRequest {
            session_id: "a".into(),
        })
        .await
        .unwrap();
    client
        .forward(request("b", 0, 2, 4, hidden(10)))
        .await
        .unwrap();
    node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_that_does_not_train_refuses_every_training_call_by_name() {
    let model = TestModel::new(&ModelSpec::tiny());
    let swarm = Swarm::start(model.path(), &[(0, 4)]).await.unwrap();
    let mut client = node_client(&swarm.nodes[0]).await;
    let span = Some(pb::LayerSpan { start: 0, end: 4 });
    let refused = |status: tonic::Status| {
        assert_eq!(status.code(), Code::FailedPrecondition, "{status:?}");
        assert!(status.message().contains("does not train"), "{status:?}");
    };
    refused(
        client
            .backward(pb::BackwardRequest {
                session_id: "mb".into(),
                layers: span,
                ..Default::default()
            })
            .await
            .unwrap_err(),
    );
    refused(
        client
            .exchange_gradient(pb::ExchangeGradientRequest {
                layers: span,
                ..Default::default()
            })
            .await
            .unwrap_err(),
    );
    // GetCheckpoint serves the weights of any layers the node holds (how a joining node
    // fetches them) and refuses others by name.
    let mut stream = client
        .get_checkpoint(pb::CheckpointRequest {
            layers: Some(pb::LayerSpan { start: 1, end: 3 }),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let first = stream.message().await.unwrap().unwrap();
    assert!(first.manifest.is_some_and(|m| m.total_bytes > 0));
    let status = client
        .get_checkpoint(pb::CheckpointRequest {
            layers: Some(pb::LayerSpan { start: 2, end: 6 }),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert!(status.message().contains("2..6"), "{status:?}");
    let chunk = pb::CheckpointChunk {
        layers: span,
        ..Default::default()
    };
    refused(
        client
            .put_checkpoint(futures::stream::iter(vec![chunk]))
            .await
            .unwrap_err(),
    );
    // The node still serves inference.
    let reply = client
        .forward(request(
            "after",
            0,
            0,
            4,
            Input::Tokens(pb::TokenIds { ids: vec![1, 2] }),
        ))
        .await
        .unwrap();
    assert!(reply.into_inner().output.is_some());
    swarm.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_model_whose_config_and_tensors_disagree_is_refused() {
    let model = TestModel::new(&ModelSpec::tiny());
    let path = model.path().join("config.json");
    let text = std::fs::read_to_string(&path)
        .unwrap()
        .replace("\"hidden_size\": 64", "\"hidden_size\": 96");
    std::fs::write(&path, text).unwrap();
    let config = neuroshard_node::node::NodeConfig::new(
        model.path(),
        neuroshard_base::LayerRange::new(0, 2).unwrap(),
    );
    let err = neuroshard_node::node::start_node(config)
        .await
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("bad model weights") && err.contains("config.json implies"),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_node_computes_on_the_device_asked_for_or_says_why_not() {
    use neuroshard_settings::ComputeDevice;
    let model = TestModel::new(&ModelSpec::tiny());
    let config = |device| {
        let mut config = neuroshard_node::node::NodeConfig::new(
            model.path(),
            neuroshard_base::LayerRange::new(0, 2).unwrap(),
        );
        config.device = Some(device);
        config
    };
    let node = neuroshard_node::node::start_node(config(ComputeDevice::Cpu))
        .await
        .unwrap();
    assert!(!node.on_gpu());
    node.shutdown().await;
    if !neuroshard_model::GPU_BUILD {
        let err = neuroshard_node::node::start_node(config(ComputeDevice::Gpu))
            .await
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("device:") && err.contains("no GPU backend"),
            "{err}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_proof_fields_and_forged_receipts_get_clear_errors() {
    let model = TestModel::new(&ModelSpec::tiny());
    let swarm = Swarm::start(model.path(), &[(2, 4)]).await.unwrap();
    let node = &swarm.nodes[0];
    let requester = neuroshard_base::NodeKey::generate();
    let mut client = neuroshard_tests::node_client_as(node, &requester).await;
    let with_proof = |nonce: Vec<u8>, key: Vec<u8>| pb::ForwardRequest {
        nonce,
        requester_key: key,
        ..request("proof", 0, 2, 4, hidden(2))
    };

    let status = client
        .forward(with_proof(vec![1, 2, 3], requester.public().0.to_vec()))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(
        status.message().contains("nonce must be 16 bytes"),
        "{status:?}"
    );
    let status = client
        .forward(with_proof(vec![7; 16], vec![9; 5]))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated);
    assert!(status.message().contains("public key"), "{status:?}");
    // A receipt names the key the call's connection proved, not one the caller picks.
    let someone_else = neuroshard_base::NodeKey::generate();
    let status = client
        .forward(with_proof(vec![7; 16], someone_else.public().0.to_vec()))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied);
    assert!(
        status
            .message()
            .contains("is not the key this connection proved"),
        "{status:?}"
    );

    // A good call; then its receipt countersigned by a stranger, garbage, and a replay.
    let reply = client
        .forward(with_proof(vec![7; 16], requester.public().0.to_vec()))
        .await
        .unwrap()
        .into_inner();
    let receipt = neuroshard_proof::Receipt::from_wire(&reply.receipt).unwrap();
    assert_eq!(receipt.worker(), node.public_key());
    let accept = neuroshard_proof::Verdict::Accepted {
        spot_checked: false,
    };
    let stranger = neuroshard_base::NodeKey::generate();
    let submit = |items: Vec<Vec<u8>>| pb::SubmitReceiptsRequest {
        countersigned: items,
        pass: Vec::new(),
    };
    let reply = client
        .submit_receipts(submit(vec![
            receipt
                .countersign(&stranger, accept.clone(), 1.0, 1)
                .to_wire(),
            vec![1, 2, 3],
        ]))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(reply.stored, 0);
    assert!(
        reply.rejected[0].contains("bad signature"),
        "{:?}",
        reply.rejected
    );
    assert!(
        reply.rejected[1].contains("malformed"),
        "{:?}",
        reply.rejected
    );
    let good = receipt.countersign(&requester, accept, 1.0, 1).to_wire();
    // A pass that does not decode is named, and the receipt is stored all the same, unvouched.
    let first = client
        .submit_receipts(pb::SubmitReceiptsRequest {
            pass: vec![9; 40],
            ..submit(vec![good.clone()])
        })
        .await
        .unwrap()
        .into_inner();
    assert!(first.rejected.is_empty(), "{:?}", first.rejected);
    assert!(
        first.pass_refused.contains("malformed credit pass"),
        "{}",
        first.pass_refused
    );
    let again = client
        .submit_receipts(submit(vec![good]))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (first.stored, again.stored, again.already_settled),
        (1, 0, 1)
    );
    let status = client
        .submit_receipts(submit(vec![vec![0]; 1025]))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    let counts = node.ledger().read(|l| l.status_counts()).await.unwrap();
    assert_eq!((counts.verified, counts.pending), (1, 0));
    swarm.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_hands_out_its_model_files_and_nothing_else() {
    let model = TestModel::new(&ModelSpec::tiny());
    let swarm = Swarm::start(model.path(), &[(0, 4)]).await.unwrap();
    let node = &swarm.nodes[0];
    std::fs::write(model.path().join("secret.json"), b"{}").unwrap();
    let mut client = node_client(node).await;
    let ask = |name: &str, offset: u64| pb::ModelFileRequest {
        model_id: node.model_id().to_string(),
        name: name.into(),
        offset,
    };
    let config = std::fs::read(model.path().join("config.json")).unwrap();
    let reply = client
        .get_model_file(ask("config.json", 0))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (reply.data, reply.total_bytes),
        (config.clone(), config.len() as u64)
    );
    let tail = client
        .get_model_file(ask("config.json", 10))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(tail.data, config[10..]);
    let past = client
        .get_model_file(ask("config.json", u64::MAX))
        .await
        .unwrap()
        .into_inner();
    assert!(past.data.is_empty(), "an offset past the end reads nothing");
    for name in [
        "secret.json",
        "../config.json",
        "/etc/passwd",
        "identity.key",
        "",
    ] {
        let status = client.get_model_file(ask(name, 0)).await.unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument, "{name}: {status:?}");
        assert!(status.message().contains("not a model file"), "{status:?}");
    }
    let status = client
        .get_model_file(ask("tokenizer.json", 0))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::NotFound, "{status:?}");
    let status = client
        .get_model_file(pb::ModelFileRequest {
            model_id: "0123456789abcdef".into(),
            ..ask("config.json", 0)
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    drop(client);
    swarm.shutdown().await;
}
