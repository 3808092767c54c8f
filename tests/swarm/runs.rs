//! Training runs: a run's keys admit its trainers and replicas and nobody else, and a replica
//! adopts a later round only when a majority of its stage signs it.

use std::sync::Arc;

use neuroshard_base::NodeKey;
use neuroshard_client::checkpoint::{Checkpoint, fetch_checkpoint, push_checkpoint};
use neuroshard_client::{ClientConfig, SwarmClient};
use neuroshard_model::init::ModelSpec;
use neuroshard_node::node::{Compression, Fault, TrainingConfig};
use neuroshard_proto as pb;
use neuroshard_tests::{Swarm, TestModel, node_client, node_client_as};
use neuroshard_train::run::{RunBody, RunManifest, RunStage};

use crate::training::{
    chain, checkpoint_node, diloco, one_stage_run, replicas_with, train_replicas_as, windows,
};

/// A run of one stage (layers 0..4) whose replicas are `keys`, driven by `trainer`.
fn replicated_run(model: &TestModel, keys: &[Arc<NodeKey>], trainer: &NodeKey) -> Arc<RunManifest> {
    let body = RunBody {
        run_id: "run-3".into(),
        model_id: neuroshard_model::ModelInfo::read(model.path()).unwrap().id,
        stages: vec![RunStage {
            layers: neuroshard_base::LayerRange::new(0, 4).unwrap(),
            replicas: keys.iter().map(|k| k.id()).collect(),
        }],
        trainers: vec![trainer.id()],
        allow_put_checkpoint: false,
    };
    Arc::new(RunManifest::sign(body, &NodeKey::generate()).unwrap())
}

/// Replicas `keys` of a run started with `config` (and `faults`, by index), told of each
/// other.
async fn run_replicas(
    model: &TestModel,
    config: &TrainingConfig,
    keys: &[Arc<NodeKey>],
    faults: &[Option<Fault>],
) -> Swarm {
    let configs = keys
        .iter()
        .zip(faults)
        .map(|(key, fault)| (config.clone(), fault.clone(), Some(key.clone())))
        .collect();
    replicas_with(model, configs).await
}

/// Starts the run's replica of `key` late, told of the others, and sends it one microbatch
/// as `trainer`: its first training call loads the stage and asks the others their round.
async fn join_late(
    swarm: &mut Swarm,
    model: &TestModel,
    config: &TrainingConfig,
    key: &Arc<NodeKey>,
    trainer: &Arc<NodeKey>,
) {
    swarm
        .add_node_with(model.path(), 0, 4, |c| {
            c.train = Some(config.clone());
            c.key = Some(key.clone());
        })
        .await
        .unwrap();
    let addrs: Vec<String> = swarm.nodes.iter().map(|n| n.advertised()).collect();
    swarm.nodes.last().unwrap().set_training_replicas(addrs);
    let client = SwarmClient::connect(ClientConfig {
        key: Some(trainer.clone()),
        ..ClientConfig::new(swarm.tracker.url())
    })
    .await
    .unwrap();
    let hop = chain(swarm).pop().unwrap();
    let mut session = client.train_session(vec![hop]).unwrap();
    session
        .accumulate(&windows(0, 1, 32, 1), false)
        .await
        .unwrap();
}

/// A run of three replicas of the whole model: their keys, its trainer, and the training
/// config that names it.
fn three_replica_run(model: &TestModel) -> (Vec<Arc<NodeKey>>, Arc<NodeKey>, TrainingConfig) {
    let keys: Vec<Arc<NodeKey>> = (0..3).map(|_| Arc::new(NodeKey::generate())).collect();
    let trainer = Arc::new(NodeKey::generate());
    let config = TrainingConfig {
        run: Some(replicated_run(model, &keys, &trainer)),
        ..diloco(Compression::TopK(0.1))
    };
    (keys, trainer, config)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_later_round_one_replica_claims_is_not_adopted_without_a_majority() {
    let model = TestModel::new(&ModelSpec::tiny());
    let (keys, trainer, config) = three_replica_run(&model);
    // Of the run's three replicas, the first claims to be 40 rounds ahead, signing its own
    // weights for that round; the second is honest. Both have taken a step (round 0).
    let faults = [Some(Fault::ClaimsRoundsAhead(40)), None];
    let mut swarm = run_replicas(&model, &config, &keys[..2], &faults).await;
    train_replicas_as(&swarm, 1, Some(trainer.clone()))
        .await
        .unwrap();
    join_late(&mut swarm, &model, &config, &keys[2], &trainer).await;
    // One signature of three is no majority: the late replica stays in round 0 with the
    // model's own weights, as the honest replica started.
    let late = swarm.nodes.last().unwrap().training_snapshot().unwrap();
    assert_eq!(late.outer_round, 0);
    let mut honest = node_client(&swarm.nodes[1]).await;
    let (start, _) = fetch_checkpoint(&mut honest, "", swarm.nodes[1].layers(), u64::MAX, |_| {})
        .await
        .unwrap();
    assert_eq!(start.round, 0);
    assert_eq!(late.parameters.len(), start.parameters.len());
    let moved = late
        .parameters
        .iter()
        .zip(&start.parameters)
        .filter(|(a, b)| a != b)
        .count();
    // The late replica's one microbatch moved nothing yet (it accumulated, no step).
    assert_eq!(moved, 0, "the late replica adopted someone's weights");
    swarm.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_that_joins_late_starts_from_the_current_round() {
    let model = TestModel::new(&ModelSpec::tiny());
    // A run of three replicas: two train, and the third, joining late, adopts the round the
    // two (a majority) sign.
    let (keys, trainer, config) = three_replica_run(&model);
    let mut swarm = run_replicas(&model, &config, &keys[..2], &[None, None]).await;
    train_replicas_as(&swarm, 10, Some(trainer.clone()))
        .await
        .unwrap();
    join_late(&mut swarm, &model, &config, &keys[2], &trainer).await;
    // Its first training call loaded the stage and found the others in round 2.
    let late = swarm.nodes.last().unwrap();
    let snapshot = late.training_snapshot().unwrap();
    assert_eq!(snapshot.outer_round, 2);
    let mut got = Vec::new();
    for node in [&swarm.nodes[0], late] {
        let mut c = node_client(node).await;
        got.push(
            fetch_checkpoint(&mut c, "", node.layers(), u64::MAX, |_| {})
                .await
                .unwrap()
                .0,
        );
    }
    assert_eq!(got[0], got[1]);
    assert_eq!(snapshot.parameters, got[0].parameters);
    swarm.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn strangers_cannot_train_exchange_or_push_into_a_run_and_change_nothing() {
    let model = TestModel::new(&ModelSpec::tiny());
    let (swarm, trainer) = checkpoint_node(&model, None, false).await;
    let node = &swarm.nodes[0];
    let before = node.training_snapshot().unwrap();
    assert_eq!(before.inner_steps, 1, "the run's trainer trains");
    let stranger = NodeKey::generate();
    let mut theirs = node_client_as(node, &stranger).await;
    let refused = |status: tonic::Status, says: &str| {
        assert_eq!(status.code(), tonic::Code::PermissionDenied, "{status:?}");
        assert!(status.message().contains(says), "{says}: {status:?}");
    };
    let not_trainer = "is not a trainer of run \"run-1\"";
    let microbatch = pb::ForwardRequest {
        session_id: "mb".into(),
        layers: Some(pb::LayerSpan { start: 0, end: 4 }),
        input: Some(pb::forward_request::Input::Tokens(pb::TokenIds {
            ids: vec![1, 2, 3],
        })),
        targets: Some(pb::TokenIds { ids: vec![2, 3, 4] }),
        train: true,
        ..Default::default()
    };
    refused(
        theirs.forward(microbatch.clone()).await.unwrap_err(),
        not_trainer,
    );
    let step = pb::BackwardRequest {
        session_id: "mb".into(),
        layers: Some(pb::LayerSpan { start: 0, end: 4 }),
        step: true,
        ..Default::default()
    };
    refused(theirs.backward(step).await.unwrap_err(), not_trainer);
    // A contribution to a later round, signed by the stranger: a forged claim of progress.
    let layers = neuroshard_base::LayerRange::new(0, 4).unwrap();
    let model_id = neuroshard_model::ModelInfo::read(model.path()).unwrap().id;
    let payload = vec![0u8; 16];
    let later = before.outer_round + 5;
    let digest = neuroshard_node::node::contribution_bytes(
        &model_id,
        layers,
        later,
        pb::GradientEncoding::GradientDenseF32,
        &payload,
    );
    let forged = pb::ExchangeGradientRequest {
        model_id,
        layers: Some(pb::LayerSpan { start: 0, end: 4 }),
        outer_step: later,
        pseudo_gradient: payload,
        encoding: pb::GradientEncoding::GradientDenseF32 as i32,
        sender_key: stranger.public().0.to_vec(),
        signature: stranger.sign(&digest).to_vec(),
    };
    refused(
        theirs.exchange_gradient(forged).await.unwrap_err(),
        "is not a replica of this stage of run \"run-1\"",
    );
    // Pushing a checkpoint is off for this run, for its trainer too.
    let pushed = Checkpoint {
        round: 9,
        parameters: vec![0.5; before.parameters.len()],
    };
    for key in [&stranger, &*trainer] {
        let mut c = node_client_as(node, key).await;
        let err = push_checkpoint(&mut c, "", node.layers(), &pushed, 64 << 10)
            .await
            .unwrap_err()
            .to_string();
        assert!(err.contains("does not allow pushing checkpoints"), "{err}");
    }
    // Nothing moved: weights, optimizer steps and round.
    let after = node.training_snapshot().unwrap();
    assert_eq!(
        (after.parameters, after.inner_steps, after.outer_round),
        (before.parameters, before.inner_steps, before.outer_round)
    );
    // The trainer still trains.
    let mut mine = node_client_as(node, &trainer).await;
    mine.forward(microbatch).await.unwrap();
    // A node the manifest does not name cannot join the run.
    let run = one_stage_run(&model, &NodeKey::generate(), &trainer, false);
    let mut swarm = swarm;
    let err = swarm
        .add_node_with(model.path(), 0, 4, |c| {
            c.train = Some(TrainingConfig {
                run: Some(run),
                ..TrainingConfig::default()
            })
        })
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("is not a replica of layers 0..4"), "{err}");
    swarm.shutdown().await;
}
