//! The swarm's models in the app: listing them with their coverage, switching to one (its
//! layers fetched from a peer with progress, then kept), chatting over the swarm, and the
//! loopback API.

use std::time::Duration;

use neuroshard_api::{Backend, Piece, ServedModel};
use neuroshard_base::LayerRange;
use neuroshard_discovery::tracker::{TrackerConfig, TrackerHandle, start_tracker};
use neuroshard_model::init::{ModelSpec, write_model};
use neuroshard_node::node::{NodeConfig, start_node};
use neuroshard_settings::Settings;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::{Fixture, fixture, launch};
use crate::chat::ChatEvent;
use crate::desktop::Desktop;
use crate::status::AppState;

fn block_on<F: std::future::Future>(f: F) -> F::Output {
    tauri::async_runtime::block_on(f)
}

/// A tracker, and the fixture's app onboarded and registered with it.
fn with_tracker(f: &Fixture) -> TrackerHandle {
    let tracker = block_on(start_tracker(TrackerConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        ..TrackerConfig::default()
    }))
    .unwrap();
    f.ok::<Settings>(
        "finish_first_run",
        json!({"displayName": "Ada", "anonymous": false, "preset": "full"}),
    );
    f.ok::<Settings>(
        "update_settings",
        json!({"patch": {"network": {"tracker": tracker.url()}}}),
    );
    f.wait_for("the node serves", |s| s.state == AppState::Serving);
    tracker
}

/// The text and end of the answer `run_chat` writes to `body`.
fn chat(desktop: &Desktop, id: &str, body: Value) -> (String, Vec<ChatEvent>) {
    let mut events = Vec::new();
    block_on(desktop.run_chat(id, &body, |e| {
        events.push(e);
        true
    }))
    .unwrap();
    let text = events
        .iter()
        .filter_map(|e| match e {
            ChatEvent::Text { text } => Some(text.as_str()),
            ChatEvent::Done { .. } => None,
        })
        .collect();
    (text, events)
}

/// What the same request gives with the whole model in this process.
fn local_text(dir: &std::path::Path, prompt: &str, max_tokens: usize) -> String {
    block_on(async {
        let model = std::sync::Arc::new(ServedModel::load(dir, &Backend::Local).await.unwrap());
        let request = neuroshard_api::openai::Request::completion(&json!({
            "model": "x", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0
        }))
        .unwrap();
        let (mut rx, _) = model.start(&request).await.unwrap();
        let mut text = String::new();
        while let Some(piece) = rx.recv().await {
            if let Piece::Text(t) = piece.unwrap() {
                text.push_str(&t);
            }
        }
        text
    })
}

#[test]
fn a_swarm_model_is_listed_fetched_from_a_peer_with_progress_kept_and_served() {
    let f = fixture();
    let tracker = with_tracker(&f);
    // A peer serving another model, which the app has never seen.
    let other_dir = f.dir.path().join("other");
    let spec = ModelSpec {
        seed: 9,
        ..ModelSpec::trained_demo()
    };
    write_model(&other_dir, &spec).unwrap();
    let peer = block_on(start_node(NodeConfig {
        tracker: Some(tracker.url()),
        ..NodeConfig::new(&other_dir, LayerRange::new(0, 6).unwrap())
    }))
    .unwrap();
    let other = peer.model_id().to_string();
    let own = f.desktop.model().id;

    let models: Value = f.ok("swarm_models", json!({}));
    let listed = |id: &str| {
        models
            .as_array()
            .unwrap()
            .iter()
            .find(|m| m["id"] == id)
            .cloned()
            .unwrap_or_else(|| panic!("{id} listed: {models}"))
    };
    let theirs = listed(&other);
    assert_eq!(theirs["coverage"], json!([1, 1, 1, 1, 1, 1]));
    assert_eq!(theirs["complete"], true);
    assert_eq!(theirs["about"]["family"], "llama", "{theirs}");
    assert_eq!(theirs["about"]["hidden_size"], 256);
    assert_eq!(listed(&own)["coverage"], json!([1, 1, 1, 1]));

    // An older fetched model, unused for long, of 310 MB (a sparse file), under a disk cap of
    // 300 MiB: the fetch removes it to make room.
    let unused = f.dir.path().join("data/models/0123456789abcdef");
    std::fs::create_dir_all(&unused).unwrap();
    std::fs::File::create(unused.join("layers-0-6.f32"))
        .unwrap()
        .set_len(310_000_000)
        .unwrap();
    crate::storage::mark_used(&unused, 1);
    f.ok::<Settings>(
        "update_settings",
        json!({"patch": {"storage": {"cap_mib": 300}}}),
    );

    // Choosing it: the node goes on serving the old model while the files and then the layers
    // come, with progress in the status, then serves the new one.
    let mut watch = f.desktop.watch();
    f.ok::<Settings>(
        "update_settings",
        json!({"patch": {"model": {"source": "swarm", "id": other}, "layers": {"mode": "range", "start": 2, "end": 6}}}),
    );
    let mut progress = Vec::new();
    block_on(async {
        tokio::time::timeout(Duration::from_secs(60), async {
            loop {
                watch.changed().await.unwrap();
                let status = watch.borrow_and_update().clone();
                if let Some(fetch) = status.fetch {
                    progress.push(fetch);
                }
                if status.state == AppState::Serving
                    && status.model_id.as_deref() == Some(other.as_str())
                {
                    break;
                }
            }
        })
        .await
        .expect("the app serves the swarm model")
    });
    let layers: Vec<_> = progress.iter().filter(|p| p.layers.is_some()).collect();
    let bytes = 4 * neuroshard_model::init::shard_parameter_count(&spec.config(), 2..6) as u64;
    // The status is a watch: quick chunks may coalesce, but the fetch shows at least once.
    assert!(!layers.is_empty(), "progress along the way: {progress:?}");
    assert!(
        layers
            .iter()
            .all(|p| p.model_id == other && p.total_bytes == bytes)
    );
    assert!(
        layers
            .windows(2)
            .all(|w| w[0].done_bytes <= w[1].done_bytes)
    );
    let status: Value = f.ok("get_status", json!({}));
    assert_eq!(status["layers"], json!({"start": 2, "end": 6}));
    assert_eq!(status["total_layers"], 6);
    assert!(status["fetch"].is_null());
    let kept = f.dir.path().join("data/models").join(&other);
    assert!(kept.join("config.json").exists() && kept.join("layers-2-6.f32").exists());
    assert!(!unused.exists(), "the model used longest ago made room");
    let usage: Value = f.ok("storage_usage", json!({}));
    assert_eq!(usage["models"][0]["id"], json!(other), "{usage}");
    assert!(usage["used_bytes"].as_u64().unwrap() <= 300 << 20);
    // Layer choice and its memory estimate follow the chosen model.
    let plan: Value = f.ok(
        "plan_layers",
        json!({"choice": {"mode": "range", "start": 0, "end": 6}}),
    );
    assert_eq!(plan["total_layers"], 6);

    // The next start needs no peer: the peer has gone, the layers are read from disk.
    block_on(peer.shutdown());
    block_on(f.desktop.shutdown());
    let again = block_on(Desktop::open(launch(f.dir.path()))).unwrap();
    block_on(again.start_node()).unwrap();
    assert_eq!(again.model().id, other);
    let status = block_on(again.refresh());
    assert_eq!(status.model_id.as_deref(), Some(other.as_str()));
    block_on(again.shutdown());

    // A directory that is not a model is refused by name and nothing is stored.
    let err = f
        .invoke::<Value>(
            "update_settings",
            json!({"patch": {"model": {"source": "local", "dir": f.dir.path().join("nothing")}}}),
        )
        .unwrap_err();
    assert_eq!(err["field"], "model.dir", "{err}");
    let settings: Settings = f.ok("get_settings", json!({}));
    assert!(matches!(
        settings.model,
        neuroshard_settings::ModelChoice::Swarm { .. }
    ));
}

#[test]
fn the_chat_page_streams_an_answer_from_the_swarm_as_the_model_alone_gives_it() {
    let f = fixture();
    let _tracker = with_tracker(&f);
    let own = f.desktop.model();
    // The tiny test model has no chat template: it continues the last message.
    let body = json!({
        "model": own.id,
        "messages": [{"role": "user", "content": "hello swarm"}],
        "max_tokens": 12,
        "temperature": 0
    });
    let (text, events) = chat(&f.desktop, "first", body.clone());
    assert_eq!(text, local_text(&own.dir, "hello swarm", 12));
    match events.last().unwrap() {
        ChatEvent::Done {
            finish,
            usage,
            templated,
        } => {
            assert_eq!(*finish, "length");
            assert_eq!(usage.completion_tokens, 12);
            assert!(!templated);
        }
        other => panic!("ends with Done, not {other:?}"),
    }
    assert!(events.len() > 2, "streamed in pieces: {events:?}");

    // The page going away mid-answer ends its session on the node; so does its Stop button.
    let mut long = body.clone();
    long["max_tokens"] = json!(200);
    let mut seen = 0;
    block_on(f.desktop.run_chat("gone", &long, |_| {
        seen += 1;
        seen < 3
    }))
    .unwrap();
    assert_eq!(seen, 3, "no piece after the page went");
    sessions_freed(&f.desktop);
    let desktop = f.desktop.clone();
    let mut pieces = 0;
    block_on(f.desktop.run_chat("stopped", &long, |_| {
        pieces += 1;
        if pieces == 2 {
            assert!(desktop.stop_chat("stopped"));
        }
        true
    }))
    .unwrap();
    assert!(pieces < 20, "{pieces} pieces after Stop");
    assert!(!f.desktop.stop_chat("stopped"), "nothing left to stop");
    sessions_freed(&f.desktop);

    // A bad request names its parameter, as the API does.
    let mut bad = body;
    bad["n"] = json!(2);
    let err = block_on(f.desktop.run_chat("bad", &bad, |_| true)).unwrap_err();
    assert_eq!(err.field.as_deref(), Some("n"), "{err:?}");
}

/// Waits (10 s at most) until the node holds no session.
fn sessions_freed(desktop: &Desktop) {
    block_on(async {
        tokio::time::timeout(Duration::from_secs(10), async {
            while desktop.refresh().await.sessions != 0 {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await
        .expect("the node freed the session")
    });
}

/// One HTTP/1.1 request to `addr`: the status code and the body.
async fn http(addr: &str, method: &str, path: &str, body: &str) -> std::io::Result<(u16, String)> {
    let mut stream = tokio::net::TcpStream::connect(addr).await?;
    let request = format!(
        "{method} {path} HTTP/1.1\r\nhost: {addr}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(request.as_bytes()).await?;
    let mut reply = String::new();
    stream.read_to_string(&mut reply).await?;
    let status = reply[9..12].parse().unwrap();
    let body = reply
        .split_once("\r\n\r\n")
        .map_or("", |(_, b)| b)
        .to_string();
    Ok((status, body))
}

#[test]
fn the_api_setting_serves_the_swarm_on_loopback_and_stops_again() {
    let f = fixture();
    let _tracker = with_tracker(&f);
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    f.ok::<Settings>(
        "update_settings",
        json!({"patch": {"api": {"enabled": true, "port": port}}}),
    );
    f.wait_for("the API answers", |s| s.api_url.is_some());
    let status: Value = f.ok("get_status", json!({}));
    assert_eq!(status["api_url"], format!("http://127.0.0.1:{port}/v1"));
    let addr = format!("127.0.0.1:{port}");
    let (code, body) = block_on(http(&addr, "GET", "/v1/models", "")).unwrap();
    assert_eq!(code, 200, "{body}");
    assert!(body.contains("\"model\""), "{body}");
    let own = f.desktop.model();
    let request =
        json!({"model": "model", "prompt": "hello swarm", "max_tokens": 6, "temperature": 0});
    let (code, body) =
        block_on(http(&addr, "POST", "/v1/completions", &request.to_string())).unwrap();
    assert_eq!(code, 200, "{body}");
    let reply: Value = serde_json::from_str(body.trim()).unwrap_or_else(|e| panic!("{e}: {body}"));
    assert_eq!(
        reply["choices"][0]["text"],
        local_text(&own.dir, "hello swarm", 6)
    );

    f.ok::<Settings>(
        "update_settings",
        json!({"patch": {"api": {"enabled": false}}}),
    );
    f.wait_for("the API is off", |s| s.api_url.is_none());
    assert!(
        block_on(http(&addr, "GET", "/v1/models", "")).is_err(),
        "nothing listens"
    );
}
