//! Pausing and resuming a node through its handle, as the desktop tray does: a paused node
//! refuses work, clients fail over to a replica, and its status watch and events say so.

use neuroshard_model::init::ModelSpec;
use neuroshard_node::client::{ClientConfig, SwarmClient};
use neuroshard_node::generate::{GenerationReport, generate};
use neuroshard_node::lifecycle::{NodeEvent, RunState};
use neuroshard_tests::{Swarm, TestModel};

use crate::generation::{PROMPT, assert_same_generation, local_reference};

const NEW_TOKENS: usize = 6;

/// Generates through `swarm` with a client that has seen no failure yet.
async fn generate_with_a_new_client(swarm: &Swarm, expected: &GenerationReport) {
    let client = SwarmClient::connect(ClientConfig::new(swarm.tracker.url()))
        .await
        .unwrap();
    let mut session = client.session();
    let got = generate(&mut session, PROMPT, NEW_TOKENS, None, |_, _| {})
        .await
        .unwrap();
    assert_same_generation(&got, expected);
    session.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_node_is_failed_over_and_serves_again_when_resumed() {
    let model = TestModel::new(&ModelSpec::tiny());
    let expected = local_reference(&model, NEW_TOKENS).await;
    let swarm = Swarm::start(model.path(), &[(0, 4), (0, 4)]).await;
    let (first, second) = (&swarm.nodes[0], &swarm.nodes[1]);
    let mut events = first.events();

    first.pause();
    assert_eq!(first.status().borrow().state, RunState::Paused);
    generate_with_a_new_client(&swarm, &expected).await;
    assert_eq!(
        first.metrics().forward_calls,
        0,
        "a paused node computes nothing"
    );
    assert_eq!(second.metrics().forward_calls, NEW_TOKENS as u64);

    // Resumed, with the other replica paused: a new client is served by the first.
    first.resume();
    second.pause();
    generate_with_a_new_client(&swarm, &expected).await;
    assert_eq!(first.metrics().forward_calls, NEW_TOKENS as u64);
    assert_eq!(second.metrics().forward_calls, NEW_TOKENS as u64);

    let seen: Vec<_> = std::iter::from_fn(|| events.try_recv().ok()).collect();
    assert_eq!(
        seen,
        [RunState::Paused, RunState::Serving].map(|state| NodeEvent::StateChanged { state })
    );
    let status = *first.status().borrow();
    assert_eq!((status.state, status.in_flight), (RunState::Serving, 0));
    swarm.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_stays_paused_until_its_owner_finishes_the_first_run() {
    use neuroshard_node::settings::{Preset, Settings, SettingsStore};
    let model = TestModel::new(&ModelSpec::tiny());
    let swarm = Swarm::start(model.path(), &[(0, 4)]).await;
    let node = &swarm.nodes[0];
    let dir = tempfile::tempdir().unwrap();
    let mut store = SettingsStore::open(dir.path().join("settings.json")).unwrap();
    node.apply_settings(store.get());
    assert_eq!(
        node.status().borrow().state,
        RunState::Paused,
        "fresh install"
    );

    // The first run: a name and a preset, through one patch, as the app sends it.
    let light = serde_json::to_value(Settings::default().with_preset(Preset::Light)).unwrap();
    let patch = serde_json::json!({
        "profile": {"display_name": "Ada", "onboarded": true},
        "compute": light["compute"],
        "bandwidth": light["bandwidth"],
    });
    node.apply_settings(store.update(&patch).unwrap());
    node.resume();
    assert_eq!(node.status().borrow().state, RunState::Serving);
    assert_eq!(store.get().compute.gpu_share_percent, 25);
    let expected = local_reference(&model, NEW_TOKENS).await;
    generate_with_a_new_client(&swarm, &expected).await;
    // Onboarded settings applied again (a later change) leave a serving node serving.
    node.apply_settings(store.get());
    assert_eq!(node.status().borrow().state, RunState::Serving);
    swarm.shutdown().await;
}
