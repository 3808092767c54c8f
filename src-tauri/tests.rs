//! The commands over Tauri's mock runtime, with a real embedded node on loopback.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use neuroshard_node::lifecycle::RunState;
use neuroshard_settings::Settings;
use serde::de::DeserializeOwned;
use serde_json::{Value, json};
use tauri::ipc::{CallbackFn, InvokeBody};
use tauri::test::{
    INVOKE_KEY, MockRuntime, get_ipc_response, mock_builder, mock_context, noop_assets,
};
use tauri::webview::InvokeRequest;
use tauri::{App, WebviewWindow, WebviewWindowBuilder};

use crate::desktop::{Desktop, Launch, Machine, Temperatures};

/// A machine whose idle time, power, CPU temperature and programs the test sets.
#[derive(Debug, Default)]
struct FakeMachine {
    idle_secs: std::sync::atomic::AtomicU64,
    on_battery: std::sync::atomic::AtomicBool,
    /// Whole °C; 0 for a sensor that cannot be read.
    cpu_c: std::sync::atomic::AtomicU32,
    running: std::sync::Mutex<Vec<String>>,
}

impl Machine for FakeMachine {
    fn idle(&self) -> Option<Duration> {
        Some(Duration::from_secs(self.idle_secs.load(Relaxed)))
    }

    fn on_battery(&self) -> Option<bool> {
        Some(self.on_battery.load(Relaxed))
    }

    fn temperatures(&self) -> Temperatures {
        let c = self.cpu_c.load(Relaxed);
        Temperatures {
            cpu_c: (c > 0).then_some(c as f32),
            gpu_c: None,
        }
    }

    fn running(&self, names: &[String]) -> Option<Vec<String>> {
        let running = self.running.lock().unwrap();
        Some(
            names
                .iter()
                .filter(|n| running.contains(n))
                .cloned()
                .collect(),
        )
    }

    fn programs(&self) -> Vec<String> {
        self.running.lock().unwrap().clone()
    }
}

use crate::status::{AppState, DesktopStatus};

struct Fixture {
    dir: tempfile::TempDir,
    machine: Arc<FakeMachine>,
    desktop: Arc<Desktop>,
    _app: App<MockRuntime>,
    webview: WebviewWindow<MockRuntime>,
}

fn launch(dir: &Path) -> Launch {
    Launch {
        data_dir: dir.join("data"),
        settings_path: dir.join("config").join("settings.json"),
        model_dir: Some(dir.join("model")),
        listen: "127.0.0.1:0".parse().unwrap(),
        advertise: None,
        lan: None,
    }
}

/// A desktop core with a started node (tiny model), behind a mock app with every command.
fn fixture() -> Fixture {
    fixture_with(|_| {})
}

/// [`fixture`], with `prepare` run on the fixture's folder before the app opens.
fn fixture_with(prepare: impl FnOnce(&Path)) -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    prepare(dir.path());
    neuroshard_model::init::write_model(
        &dir.path().join("model"),
        &neuroshard_model::init::ModelSpec::tiny(),
    )
    .unwrap();
    let machine = Arc::new(FakeMachine::default());
    let desktop = tauri::async_runtime::block_on(async {
        let desktop = Desktop::open_on(launch(dir.path()), machine.clone())
            .await
            .unwrap();
        desktop.start_node().await.unwrap();
        desktop
    });
    let app = mock_builder()
        .manage(desktop.clone())
        .invoke_handler(crate::commands::handler())
        .build(mock_context(noop_assets()))
        .unwrap();
    let webview = WebviewWindowBuilder::new(&app, "main", Default::default())
        .build()
        .unwrap();
    Fixture {
        dir,
        machine,
        desktop,
        _app: app,
        webview,
    }
}

impl Fixture {
    fn invoke<T: DeserializeOwned>(&self, cmd: &str, args: Value) -> Result<T, Value> {
        get_ipc_response(
            &self.webview,
            InvokeRequest {
                cmd: cmd.into(),
                callback: CallbackFn(0),
                error: CallbackFn(1),
                url: "tauri://localhost".parse().unwrap(),
                body: InvokeBody::Json(args),
                headers: Default::default(),
                invoke_key: INVOKE_KEY.to_string(),
            },
        )
        .map(|body| {
            body.deserialize::<T>()
                .expect("reply of the expected shape")
        })
    }

    fn ok<T: DeserializeOwned>(&self, cmd: &str, args: Value) -> T {
        self.invoke(cmd, args)
            .unwrap_or_else(|e| panic!("{cmd} failed: {e}"))
    }

    fn state(&self) -> String {
        self.ok::<Value>("get_status", json!({}))["state"]
            .as_str()
            .unwrap()
            .to_string()
    }

    /// Waits (30 s at most) until the published status satisfies `done`.
    fn wait_for(&self, what: &str, done: impl FnMut(&DesktopStatus) -> bool) {
        let mut watch = self.desktop.watch();
        tauri::async_runtime::block_on(async {
            tokio::time::timeout(Duration::from_secs(30), watch.wait_for(done))
                .await
                .unwrap_or_else(|_| panic!("timed out: {what}"))
                .unwrap();
        });
    }

    fn node(&self) -> ((u32, u32, u8, u16), RunState) {
        let (l, state) =
            tauri::async_runtime::block_on(self.desktop.node_limits()).expect("a node runs");
        (
            (
                l.upload_kbps,
                l.download_kbps,
                l.compute_share_percent,
                l.cpu_threads,
            ),
            state,
        )
    }
}

#[test]
fn settings_commands_validate_persist_and_reach_the_node() {
    let f = fixture();
    let settings: Settings = f.ok("get_settings", json!({}));
    assert!(!settings.profile.onboarded);
    assert_eq!(f.state(), "setup");
    assert_eq!(
        f.node().1,
        RunState::Paused,
        "nothing is lent before the first run"
    );

    let err = f
        .invoke::<Value>(
            "finish_first_run",
            json!({"displayName": "  ", "anonymous": false, "preset": "light"}),
        )
        .unwrap_err();
    assert_eq!(err["field"], "profile.display_name");
    let stored = f.dir.path().join("config").join("settings.json");
    assert!(!stored.exists(), "a refused first run writes nothing");

    let s: Settings = f.ok(
        "finish_first_run",
        json!({"displayName": "Ada", "anonymous": false, "preset": "light"}),
    );
    assert_eq!(s.profile.display_name.as_deref(), Some("Ada"));
    assert_eq!(f.state(), "serving");
    assert_eq!(
        f.node(),
        ((256, 1024, 25, 0), RunState::Serving),
        "the Light preset"
    );

    let before = std::fs::read(&stored).unwrap();
    for (patch, field) in [
        (
            json!({"bandwidth": {"upload_kbps": "lots"}}),
            "bandwidth.upload_kbps",
        ),
        (
            json!({"compute": {"gpu_share_percent": 0}}),
            "compute.gpu_share_percent",
        ),
        (
            json!({"layers": {"mode": "range", "start": 0, "end": 99}}),
            "layers",
        ),
        (
            json!({"bandwidth": {"transfer_cap": {"gigabytes": 0, "every_days": 30}}}),
            "bandwidth.transfer_cap.gigabytes",
        ),
    ] {
        let err = f
            .invoke::<Value>("update_settings", json!({ "patch": patch }))
            .unwrap_err();
        assert_eq!(err["code"], "invalid_setting", "{err}");
        assert_eq!(err["field"], field, "{err}");
        assert!(!err["message"].as_str().unwrap().is_empty());
    }
    assert_eq!(
        std::fs::read(&stored).unwrap(),
        before,
        "refused patches change nothing stored"
    );
    assert_eq!(f.node().0, (256, 1024, 25, 0), "nor the node");

    let s: Settings = f.ok(
        "update_settings",
        json!({"patch": {"bandwidth": {"upload_kbps": 64, "download_kbps": 0}, "compute": {"gpu_share_percent": 80, "cpu_threads": 2}}}),
    );
    assert_eq!(s.bandwidth.upload_kbps, 64);
    assert_eq!(
        f.node().0,
        (64, 0, 80, 2),
        "caps, share and threads reach the running node"
    );
    let reread = neuroshard_settings::SettingsStore::open(&stored).unwrap();
    assert_eq!(reread.get(), &s, "persisted");
}

#[test]
fn pause_snooze_drain_and_resume_reach_the_node() {
    let f = fixture();
    f.ok::<Settings>(
        "finish_first_run",
        json!({"displayName": null, "anonymous": true, "preset": "full"}),
    );
    assert_eq!(f.state(), "serving");
    let paused: Value = f.ok("set_paused", json!({"paused": true}));
    assert_eq!(paused["state"], "paused");
    assert_eq!(f.node().1, RunState::Paused);
    let resumed: Value = f.ok("set_paused", json!({"paused": false}));
    assert_eq!(resumed["state"], "serving");
    assert_eq!(f.node().1, RunState::Serving);

    let snoozed: Value = f.ok("snooze", json!({"length": "three_hours"}));
    assert_eq!(snoozed["state"], "snoozed");
    assert!(snoozed["detail"].as_str().unwrap().starts_with("until "));
    assert_eq!(f.node().1, RunState::Paused);
    let err = f
        .invoke::<Value>("snooze", json!({"length": "forever"}))
        .unwrap_err();
    assert!(err.to_string().contains("forever"), "{err}");
    f.ok::<Value>("set_paused", json!({"paused": false}));
    assert_eq!(f.node().1, RunState::Serving, "resuming ends the snooze");

    let drained: Value = f.ok("drain", json!({}));
    assert!(
        ["draining", "paused"].contains(&drained["state"].as_str().unwrap()),
        "{drained}"
    );
    f.wait_for("no calls in flight: the drain ends in a pause", |s| {
        s.state == AppState::Paused
    });
    assert_eq!(f.node().1, RunState::Paused);
}

#[test]
fn receipts_series_plans_and_export_answer_or_name_the_problem() {
    let f = fixture();
    let page: Value = f.ok(
        "receipts",
        json!({"status": null, "page": 0, "perPage": 25}),
    );
    assert_eq!(page["total"], 0);
    let err = f
        .invoke::<Value>("receipts", json!({"status": null, "page": 0, "perPage": 0}))
        .unwrap_err();
    assert_eq!(err["code"], "bad_request");
    let err = f
        .invoke::<Value>(
            "receipts",
            json!({"status": "lost", "page": 0, "perPage": 5}),
        )
        .unwrap_err();
    assert!(err["message"].as_str().unwrap().contains("lost"));
    let totals: Value = f.ok("receipt_totals", json!({}));
    assert_eq!(totals["lifetime"]["receipts"], 0);
    let day: Vec<Value> = f.ok("series", json!({"range": "24h"}));
    let week: Vec<Value> = f.ok("series", json!({"range": "7d"}));
    assert_eq!((day.len(), week.len()), (24, 7));
    assert_eq!(
        f.invoke::<Value>("series", json!({"range": "1y"}))
            .unwrap_err()["code"],
        "bad_request"
    );
    let plan: Value = f.ok(
        "plan_layers",
        json!({"choice": {"mode": "count", "count": 1}}),
    );
    assert_eq!(
        plan["range"]["end"].as_u64().unwrap() - plan["range"]["start"].as_u64().unwrap(),
        1
    );
    assert!(plan["memory"]["total_bytes"].as_u64().unwrap() > 0);
    let out = f.dir.path().join("export");
    std::fs::create_dir_all(&out).unwrap();
    let path: String = f.ok("export_receipts", json!({"dir": out}));
    let csv = std::fs::read_to_string(&path).unwrap();
    assert!(
        csv.is_empty() || csv.starts_with("id,kind,model_id"),
        "{csv}"
    );
    let err = f
        .invoke::<Value>(
            "export_receipts",
            json!({"dir": f.dir.path().join("missing")}),
        )
        .unwrap_err();
    assert!(
        err["message"].as_str().unwrap().contains("missing"),
        "{err}"
    );
}

#[test]
fn a_layer_or_device_change_swaps_the_shard_of_the_running_node_without_a_restart() {
    let f = fixture();
    f.ok::<Settings>(
        "finish_first_run",
        json!({"displayName": "Ada", "anonymous": false, "preset": "full"}),
    );
    f.wait_for("the node serves", |s| s.state == AppState::Serving);
    let running = tauri::async_runtime::block_on(f.desktop.node_status()).unwrap();
    f.ok::<Settings>(
        "update_settings",
        json!({"patch": {"layers": {"mode": "range", "start": 1, "end": 2}}}),
    );
    f.wait_for("the node serves layers 1..2", |s| {
        s.state == AppState::Serving && s.layers.is_some_and(|l| (l.start, l.end) == (1, 2))
    });
    f.ok::<Settings>(
        "update_settings",
        json!({"patch": {"compute": {"device": "cpu"}, "layers": {"mode": "count", "count": 3}}}),
    );
    f.wait_for("the node serves 3 layers on the CPU", |s| {
        s.layers.is_some_and(|l| l.end - l.start == 3) && s.device == Some("cpu")
    });
    // The same node all along: a restart would have stopped it.
    assert_eq!(running.borrow().state, RunState::Serving);
    assert!(!running.has_changed().unwrap(), "{:?}", *running.borrow());
    // A change the model cannot take is refused by name before it reaches the node.
    let err = f
        .invoke::<Value>(
            "update_settings",
            json!({"patch": {"layers": {"mode": "range", "start": 2, "end": 9}}}),
        )
        .unwrap_err();
    assert_eq!(err["field"], "layers", "{err}");
    assert_eq!(f.node().1, RunState::Serving);
}

#[test]
fn bootstrap_peers_take_the_node_into_the_swarm_and_it_announces_its_display_name() {
    let f = fixture();
    // A peer with no tracker, which the app knows of only as a bootstrap peer.
    let peer = tauri::async_runtime::block_on(neuroshard_node::node::start_node(
        neuroshard_node::node::NodeConfig::new(
            f.dir.path().join("model"),
            neuroshard_base::LayerRange::new(0, 4).unwrap(),
        ),
    ))
    .unwrap();
    let mut held = peer.discovery().dht().stats();
    let own_keys = tauri::async_runtime::block_on(async {
        let mut announced = peer.discovery().announced();
        announced.wait_for(|a| a.rounds > 0).await.unwrap();
        held.borrow_and_update().records
    });
    assert_eq!(own_keys, 5, "/nodes/{{id}} and four layers");
    f.ok::<Settings>(
        "finish_first_run",
        json!({"displayName": "Ada", "anonymous": false, "preset": "full"}),
    );
    f.ok::<Settings>(
        "update_settings",
        json!({"patch": {"network": {"bootstrap": [peer.advertised()]}}}),
    );
    // The running node joins through the peer, which then holds its /nodes/{id} record.
    let id = neuroshard_node::identity::load_or_create(&f.dir.path().join("data"))
        .unwrap()
        .id();
    let record = tauri::async_runtime::block_on(async {
        tokio::time::timeout(
            Duration::from_secs(30),
            held.wait_for(|s| s.records > own_keys),
        )
        .await
        .expect("the app's node announced to its bootstrap peer")
        .unwrap();
        let key = neuroshard_dht::RecordKey::Node(id);
        peer.discovery().dht().get(key).await.unwrap().records
    });
    assert_eq!(record.len(), 1);
    let announced = neuroshard_net::convert::peer_from_record(&record[0]).unwrap();
    assert_eq!(announced.display_name, "Ada");
    let addr = tauri::async_runtime::block_on(f.desktop.node_addr()).unwrap();
    assert_eq!(announced.addr, addr.to_string());
    tauri::async_runtime::block_on(peer.shutdown());
}

#[test]
fn the_device_setting_picks_where_compute_runs_and_the_status_says_why() {
    let f = fixture();
    f.ok::<Settings>(
        "finish_first_run",
        json!({"displayName": "Ada", "anonymous": false, "preset": "full"}),
    );
    let status: Value = f.ok("get_status", json!({}));
    assert_eq!(
        Settings::default().compute.device,
        neuroshard_settings::ComputeDevice::Gpu
    );
    if neuroshard_model::GPU_BUILD {
        // A machine without a usable adapter falls back to the CPU and says so.
        assert!(status["device"] == "gpu" || status["device_note"].is_string());
    } else {
        assert_eq!(status["device"], "cpu");
        let note = status["device_note"].as_str().expect("a note says why");
        assert!(note.contains("CPU only"), "{note}");
    }
    f.ok::<Settings>(
        "update_settings",
        json!({"patch": {"compute": {"device": "cpu"}}}),
    );
    f.wait_for("the node moved to the CPU, with no note", |s| {
        s.state == AppState::Serving && s.device == Some("cpu") && s.device_note.is_none()
    });
    let err = f
        .invoke::<Value>(
            "update_settings",
            json!({"patch": {"compute": {"device": "tpu"}}}),
        )
        .unwrap_err();
    assert!(err["message"].as_str().unwrap().contains("tpu"), "{err}");
}

#[test]
fn the_ui_fixtures_match_the_rust_types() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("ui/tests/fixtures");
    let defaults: Value =
        serde_json::from_str(&std::fs::read_to_string(root.join("default-settings.json")).unwrap())
            .unwrap();
    assert_eq!(defaults, serde_json::to_value(Settings::default()).unwrap());
    let status: Value =
        serde_json::from_str(&std::fs::read_to_string(root.join("serving-status.json")).unwrap())
            .unwrap();
    fn keys(v: &Value, prefix: &str, out: &mut Vec<String>) {
        if let Value::Object(map) = v {
            for (k, v) in map {
                let path = format!("{prefix}.{k}");
                out.push(path.clone());
                keys(v, &path, out);
            }
        }
    }
    let (mut ours, mut theirs) = (Vec::new(), Vec::new());
    let mut sample = DesktopStatus::starting();
    sample.layers = Some(neuroshard_base::LayerRange::new(0, 1).unwrap());
    keys(&serde_json::to_value(sample).unwrap(), "", &mut ours);
    keys(&status, "", &mut theirs);
    ours.sort();
    theirs.sort();
    assert_eq!(
        ours, theirs,
        "the page's status fixture has the fields the app sends"
    );
}

#[test]
fn battery_and_idle_rules_hold_the_node_back_and_let_it_go() {
    let f = fixture();
    f.ok::<Settings>(
        "finish_first_run",
        json!({"displayName": "Ada", "anonymous": false, "preset": "medium"}),
    );
    assert_eq!(f.state(), "serving");
    f.machine.on_battery.store(true, Relaxed);
    let status: Value = f.ok("get_status", json!({}));
    assert_eq!(status["state"], "waiting");
    assert_eq!(status["detail"], "on battery power");
    assert_eq!(f.node().1, RunState::Paused);
    f.ok::<Settings>(
        "update_settings",
        json!({"patch": {"schedule": {"pause_on_battery": false, "only_when_idle": true, "idle_minutes": 5}}}),
    );
    f.machine.idle_secs.store(60, Relaxed);
    let status: Value = f.ok("get_status", json!({}));
    assert_eq!(status["state"], "waiting", "{status}");
    assert!(status["detail"].as_str().unwrap().contains("5 min"));
    assert_eq!(f.node().1, RunState::Paused);
    f.machine.idle_secs.store(301, Relaxed);
    assert_eq!(f.state(), "serving", "away for 5 minutes: serve");
    assert_eq!(f.node().1, RunState::Serving);
}

/// Above its limit the node is paused (calls in flight finish, new ones fail over), the
/// dashboard says why and shows the temperature, and it serves again only 5 °C below the
/// limit; a listed program holds it the same way, and the picker offers what runs.
#[test]
fn a_temperature_limit_and_a_listed_program_hold_the_node_and_let_it_go() {
    let f = fixture();
    f.ok::<Settings>(
        "finish_first_run",
        json!({"displayName": "Ada", "anonymous": false, "preset": "medium"}),
    );
    f.machine.cpu_c.store(70, Relaxed);
    let status: Value = f.ok("get_status", json!({}));
    assert_eq!(status["state"], "serving");
    assert_eq!(status["temperatures"]["cpu_c"], 70.0);
    f.ok::<Settings>(
        "update_settings",
        json!({"patch": {"thermal": {"cpu_limit_c": 80, "min_hold_secs": 0}}}),
    );
    let mut notices = f.desktop.notices();
    f.machine.cpu_c.store(86, Relaxed);
    let status: Value = f.ok("get_status", json!({}));
    assert_eq!(status["state"], "waiting", "{status}");
    assert_eq!(status["detail"], "CPU at 86 °C, above its 80 °C limit");
    assert_eq!(status["thermal_hold"], true);
    assert_eq!(f.node().1, RunState::Paused);
    let notice = notices
        .try_recv()
        .expect("a notice that the node cools down");
    assert_eq!(notice.body, "CPU at 86 °C, above its 80 °C limit");
    // Under the limit but within the hysteresis: still held.
    f.machine.cpu_c.store(78, Relaxed);
    let status: Value = f.ok("get_status", json!({}));
    assert_eq!(
        status["detail"],
        "cooling down: CPU at 78 °C, serves again below 75 °C"
    );
    assert_eq!(f.node().1, RunState::Paused);
    f.machine.cpu_c.store(74, Relaxed);
    assert_eq!(f.state(), "serving");
    assert_eq!(f.node().1, RunState::Serving);
    // Turned off, the next hold brings no notice.
    f.ok::<Settings>(
        "update_settings",
        json!({"patch": {"notifications": {"temperature": false}}}),
    );
    f.machine.cpu_c.store(90, Relaxed);
    assert_eq!(f.state(), "waiting");
    f.machine.cpu_c.store(60, Relaxed);
    assert_eq!(f.state(), "serving");
    assert!(notices.try_recv().is_err(), "no notice once turned off");

    f.machine.running.lock().unwrap().push("Game.exe".into());
    let choices: Value = f.ok("program_choices", json!({}));
    assert_eq!(choices["running"], json!(["Game.exe"]));
    assert!(
        choices["launchers"]
            .as_array()
            .unwrap()
            .contains(&json!("steam"))
    );
    f.ok::<Settings>(
        "update_settings",
        json!({"patch": {"gaming": {"programs": ["Game.exe"]}}}),
    );
    let status: Value = f.ok("get_status", json!({}));
    assert_eq!(status["detail"], "Game.exe is running");
    assert_eq!(f.node().1, RunState::Paused);
    f.machine.running.lock().unwrap().clear();
    assert_eq!(f.state(), "serving");
    // A refused value names its field and changes nothing.
    let err = f
        .invoke::<Settings>(
            "update_settings",
            json!({"patch": {"thermal": {"gpu_limit_c": 200}}}),
        )
        .unwrap_err();
    assert_eq!(err["field"], "thermal.gpu_limit_c", "{err}");
    let settings: Settings = f.ok("get_settings", json!({}));
    assert_eq!(settings.thermal.gpu_limit_c, None);
    assert_eq!(settings.thermal.cpu_limit_c, Some(80));
}

#[test]
fn a_used_up_transfer_cap_holds_the_node_until_its_period_ends() {
    const DAY_MS: u64 = 24 * 3600 * 1000;
    let f = fixture_with(|dir| {
        let data = dir.join("data");
        std::fs::create_dir_all(&data).unwrap();
        let meter = json!({"period_start_ms": neuroshard_net::now_ms() - DAY_MS, "bytes": 1_000_000_000u64});
        std::fs::write(data.join("transfer.json"), meter.to_string()).unwrap();
    });
    f.ok::<Settings>(
        "finish_first_run",
        json!({"displayName": "Ada", "anonymous": false, "preset": "full"}),
    );
    let status: Value = f.ok("get_status", json!({}));
    assert_eq!(status["state"], "serving", "Full has no transfer cap");
    assert!(
        status["bandwidth"]["period_bytes"].as_u64().unwrap() >= 1_000_000_000,
        "the meter survives a restart: {status}"
    );
    let cap = |gigabytes: u32, every_days: u16| {
        f.ok::<Settings>(
            "update_settings",
            json!({"patch": {"bandwidth": {"transfer_cap": {"gigabytes": gigabytes, "every_days": every_days}}}}),
        );
        f.ok::<Value>("get_status", json!({}))
    };
    let status = cap(1, 30);
    assert_eq!(status["state"], "waiting", "{status}");
    assert!(
        status["detail"]
            .as_str()
            .unwrap()
            .starts_with("transfer cap used up until")
    );
    assert_eq!(status["bandwidth"]["period_cap_bytes"], 1_000_000_000u64);
    assert_eq!(f.node().1, RunState::Paused);
    let left = |f: &Fixture| {
        tauri::async_runtime::block_on(f.desktop.node_limits())
            .unwrap()
            .0
            .transfer_left
    };
    assert_eq!(left(&f), Some(0), "the transport itself refuses new work");
    assert_eq!(cap(2, 30)["state"], "serving", "a larger cap lets it serve");
    let room = left(&f).expect("a budget under a cap");
    assert!(
        (900_000_000..=1_000_000_000).contains(&room),
        "about 1 GB left of 2: {room}"
    );
    assert_eq!(cap(1, 30)["state"], "waiting");
    let status = cap(1, 1);
    assert_eq!(
        status["state"], "serving",
        "a one-day period has ended: a new one starts"
    );
    assert!(status["bandwidth"]["period_bytes"].as_u64().unwrap() < 1_000_000_000);
    assert_eq!(f.node().1, RunState::Serving);
    f.ok::<Settings>(
        "update_settings",
        json!({"patch": {"bandwidth": {"transfer_cap": null}}}),
    );
    f.ok::<Value>("get_status", json!({}));
    assert_eq!(left(&f), None, "no cap, no budget");
}

#[test]
fn the_demo_model_is_the_shipped_one_and_replaces_an_older_or_damaged_copy() {
    use neuroshard_model::init::{DEMO_MODEL_FILES, ModelSpec, write_model};
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    let data = tempfile::tempdir().unwrap();
    let dir = data.path().join("models").join("demo");
    // What an earlier version wrote: another model, its weights in two files.
    let older = ModelSpec {
        files: 2,
        ..ModelSpec::tiny()
    };
    write_model(&dir, &older).unwrap();
    let names = || {
        let mut names: Vec<String> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    };
    let shipped = || {
        DEMO_MODEL_FILES
            .iter()
            .all(|(name, bytes)| std::fs::read(dir.join(name)).unwrap() == *bytes)
    };
    assert_eq!(
        rt.block_on(crate::models::demo_model(data.path())).unwrap(),
        dir
    );
    assert_eq!(names(), ["config.json", "model-00001-of-00001.safetensors"]);
    assert!(shipped());
    // A damaged copy is written again.
    std::fs::write(dir.join("model-00001-of-00001.safetensors"), b"not weights").unwrap();
    rt.block_on(crate::models::demo_model(data.path())).unwrap();
    assert!(shipped());
}

mod chat;
