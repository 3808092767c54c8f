//! Pausing and resuming a node through its handle, as the desktop tray does: a paused node
//! refuses work, clients fail over to a replica, and its status watch and events say so.

use neuroshard_client::generate::{GenerationReport, generate};
use neuroshard_client::{ClientConfig, SwarmClient};
use neuroshard_model::init::ModelSpec;
use neuroshard_node::lifecycle::{NodeEvent, RunState};
use neuroshard_node::node::NodeConfig;
use neuroshard_tests::{Swarm, TestModel, within};

use crate::generation::{PROMPT, assert_same_generation, local_reference};

const NEW_TOKENS: usize = 6;

/// Generates through `swarm` with a client that has seen no failure yet.
async fn generate_with_a_new_client(swarm: &Swarm, expected: &GenerationReport) {
    let client = SwarmClient::connect(ClientConfig::new(swarm.tracker.url()))
        .await
        .unwrap();
    let mut session = client.session();
    let got = generate(&mut session, PROMPT, NEW_TOKENS, &[], |_, _| {})
        .await
        .unwrap();
    assert_same_generation(&got, expected);
    session.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_node_is_failed_over_and_serves_again_when_resumed() {
    let model = TestModel::new(&ModelSpec::tiny());
    let expected = local_reference(&model, NEW_TOKENS).await;
    let swarm = Swarm::start(model.path(), &[(0, 4), (0, 4)]).await.unwrap();
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
    use neuroshard_settings::{Preset, Settings, SettingsStore};
    let model = TestModel::new(&ModelSpec::tiny());
    let swarm = Swarm::start(model.path(), &[(0, 4)]).await.unwrap();
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_changes_its_layers_live_and_the_swarm_follows() {
    use neuroshard_base::LayerRange;
    use neuroshard_client::generate::{LocalPipeline, Pipeline};

    let model = TestModel::new(&ModelSpec::tiny());
    let expected = local_reference(&model, NEW_TOKENS).await;
    let swarm = Swarm::start(model.path(), &[(0, 2), (2, 4), (2, 4)])
        .await
        .unwrap();
    for node in &swarm.nodes {
        let mut announced = node.discovery().announced();
        within(
            "the node's first stored announcement",
            announced.wait_for(|a| a.least_stored > 0),
        )
        .await
        .unwrap();
    }
    let client = SwarmClient::connect(ClientConfig::new(swarm.tracker.url()))
        .await
        .unwrap();
    let mut local = LocalPipeline::load(model.path()).unwrap();
    let close = |got: &[f32], want: &[f32]| {
        let worst = got
            .iter()
            .zip(want)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        assert!(worst <= 0.05, "logits differ by {worst}");
    };
    let mut session = client.session();
    let want = local.step(0, PROMPT).await.unwrap();
    close(&session.forward(0, PROMPT).await.unwrap(), &want);

    // The node running the session's upper half moves to the lower half while the session
    // is open: same address, same identity, no restart.
    let upper = session.chain()[1].clone();
    assert_eq!(upper.layers, LayerRange::new(2, 4).unwrap());
    let mover = swarm.node_at(&upper.addr).unwrap();
    let (id, addr) = (mover.id(), mover.addr());
    let status = mover.status();
    mover
        .reshard(LayerRange::new(0, 2).unwrap(), None)
        .await
        .unwrap();
    assert_eq!((mover.id(), mover.addr()), (id, addr));
    assert_eq!(mover.layers(), LayerRange::new(0, 2).unwrap());
    assert!(!status.has_changed().unwrap(), "the node kept serving");

    // The session's next token: the mover refuses its old span by name, the client reads the
    // listing again, fails over to the other upper-half replica and replays, and the logits
    // still match. The mover is not counted as failed: nobody is banned.
    let next = argmax(&want);
    let want = local.step(PROMPT.len(), &[next]).await.unwrap();
    close(
        &session.forward(PROMPT.len(), &[next]).await.unwrap(),
        &want,
    );
    assert!(
        session
            .events()
            .iter()
            .any(|e| e.contains("layers 2..4 requested, this node serves 0..2")),
        "{:?}",
        session.events()
    );
    let m = client.metrics();
    assert_eq!((m.peer_count, m.healthy_peers), (3, 3));
    session.close().await;

    // The tracker lists the new layers, and the DHT no longer names the mover for 2..4.
    let url = swarm.tracker.url();
    let tracker = neuroshard_client::tracker_client(&url).unwrap();
    let listed = neuroshard_client::list_peers(tracker, &url, Some(mover.model_id()))
        .await
        .unwrap();
    let moved = listed.iter().find(|p| p.node_id == id).unwrap();
    assert_eq!(moved.layers, LayerRange::new(0, 2).unwrap());
    let providers = swarm.nodes[0]
        .discovery()
        .providers(mover.model_id(), 4)
        .await;
    let moved = providers.iter().find(|p| p.node_id == id).unwrap();
    assert_eq!(moved.layers, LayerRange::new(0, 2).unwrap());
    for index in 2..4 {
        let key = neuroshard_dht::RecordKey::Layer {
            model: mover.model_id().to_string(),
            index,
        };
        let records = swarm.nodes[0].discovery().dht().get(key).await.unwrap();
        let named: Vec<_> = records
            .records
            .iter()
            .filter_map(|r| neuroshard_net::convert::peer_from_record(r).ok())
            .map(|p| p.node_id)
            .collect();
        assert!(!named.contains(&id), "layer {index}: {named:?}");
    }

    // With the old lower half paused, the same client's next session runs its lower half on
    // the mover.
    swarm.nodes[0].pause();
    let before = mover.metrics().forward_calls;
    let mut session = client.session();
    let got = generate(&mut session, PROMPT, NEW_TOKENS, &[], |_, _| {})
        .await
        .unwrap();
    assert_same_generation(&got, &expected);
    session.close().await;
    assert_eq!(mover.metrics().forward_calls, before + NEW_TOKENS as u64);

    // A range the model does not have is refused by name; the mover serves on as it was.
    let err = mover
        .reshard(LayerRange::new(2, 9).unwrap(), None)
        .await
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("layers: 2..9") && err.contains("4 layers"),
        "{err}"
    );
    assert_eq!(mover.layers(), LayerRange::new(0, 2).unwrap());
    swarm.shutdown().await;
}

fn argmax(logits: &[f32]) -> u32 {
    let best = logits
        .iter()
        .enumerate()
        .max_by(|a, b| a.1.total_cmp(b.1))
        .unwrap();
    best.0 as u32
}

/// A headless node started with `--settings FILE` keeps to the file as the desktop app's node
/// does, and follows its changes: caps apply, a rule that cannot be met holds the node back
/// with its reason, and lifting the rule resumes it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_headless_node_keeps_to_its_settings_file_and_follows_its_changes() {
    use neuroshard_node::owner::{follow_settings_file, read_settings};
    use neuroshard_settings::policy::{Machine, Temperatures};
    use std::sync::atomic::{AtomicU32, Ordering::Relaxed};
    use std::time::Duration;

    /// A server's sensors as the test sets them (no idle time or battery, a CPU temperature),
    /// and the programs that really run.
    #[derive(Debug)]
    struct Sensors(
        std::sync::Arc<AtomicU32>,
        neuroshard_node::sensors::SystemSensors,
    );

    impl Machine for Sensors {
        fn idle(&self) -> Option<Duration> {
            None
        }

        fn on_battery(&self) -> Option<bool> {
            None
        }

        fn temperatures(&self) -> Temperatures {
            Temperatures {
                cpu_c: Some(self.0.load(Relaxed) as f32),
                gpu_c: None,
            }
        }

        fn running(&self, names: &[String]) -> Option<Vec<String>> {
            Some(self.1.running(names))
        }
    }

    let model = TestModel::new(&ModelSpec::tiny());
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("settings.json");
    let write = |json: serde_json::Value| std::fs::write(&path, json.to_string()).unwrap();
    // A server cannot read its idle time, so "only when idle" holds it back.
    write(serde_json::json!({
        "version": 1,
        "bandwidth": {"upload_kbps": 256, "download_kbps": 512},
        "schedule": {"only_when_idle": true},
    }));
    let node = neuroshard_node::node::start_node(NodeConfig::new(
        model.path(),
        neuroshard_base::LayerRange::new(0, 4).unwrap(),
    ))
    .await
    .unwrap();
    let node = std::sync::Arc::new(node);
    let status = node.status();
    let cancel = tokio_util::sync::CancellationToken::new();
    let cpu_c = std::sync::Arc::new(AtomicU32::new(60));
    let follow = tokio::spawn(follow_settings_file(
        node.clone(),
        path.clone(),
        dir.path().to_path_buf(),
        Box::new(Sensors(cpu_c.clone(), Default::default())),
        Duration::from_millis(50),
        cancel.clone(),
    ));
    wait_for_state(status.clone(), RunState::Paused).await;
    let limits = node.limits();
    assert_eq!((limits.upload_kbps, limits.download_kbps), (256, 512));

    write(serde_json::json!({"version": 1, "bandwidth": {"upload_kbps": 128}}));
    wait_for_state(status.clone(), RunState::Serving).await;
    assert_eq!(node.limits().upload_kbps, 128);

    // A value the settings refuse is named; the node keeps what it had.
    write(serde_json::json!({"version": 1, "bandwidth": {"upload_kbps": "fast"}}));
    let err = read_settings(&path).unwrap_err().to_string();
    assert!(err.contains("bandwidth.upload_kbps"), "{err}");
    assert!(read_settings(&dir.path().join("missing.json")).is_err());

    // Over its temperature limit the node holds; 5 °C under it, it serves again.
    write(serde_json::json!({
        "version": 2,
        "bandwidth": {"upload_kbps": 128},
        "thermal": {"cpu_limit_c": 80, "min_hold_secs": 0},
    }));
    cpu_c.store(90, Relaxed);
    wait_for_state(status.clone(), RunState::Paused).await;
    cpu_c.store(70, Relaxed);
    wait_for_state(status.clone(), RunState::Serving).await;

    // A listed program holds the node while it runs: a real process, found by its name (a link,
    // not a copy, which another test's fork could keep open for writing as it starts).
    let game = dir.path().join("ns-swarm-game");
    std::os::unix::fs::symlink("/bin/sleep", &game).unwrap();
    write(serde_json::json!({
        "version": 2,
        "bandwidth": {"upload_kbps": 128},
        "gaming": {"programs": ["NS-Swarm-Game"]},
    }));
    let child = KillOnDrop(std::process::Command::new(&game).arg("60").spawn().unwrap());
    wait_for_state(status.clone(), RunState::Paused).await;
    drop(child);
    wait_for_state(status.clone(), RunState::Serving).await;

    cancel.cancel();
    follow.await.unwrap();
    assert!(
        dir.path().join("transfer.json").exists(),
        "the meter is saved"
    );
    assert_eq!(node.limits().upload_kbps, 128);
    std::sync::Arc::try_unwrap(node).unwrap().shutdown().await;
}

/// A child process killed and reaped when dropped, also when a test fails.
struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Waits until the node's status reads `state`, for at most 20 s.
async fn wait_for_state(
    mut status: tokio::sync::watch::Receiver<neuroshard_node::lifecycle::NodeStatus>,
    state: RunState,
) {
    let changed = status.wait_for(|s| s.state == state);
    tokio::time::timeout(std::time::Duration::from_secs(20), changed)
        .await
        .expect("the node's state changes within 20 s")
        .unwrap();
}
