//! The OpenAI-compatible API over a loopback swarm, spoken to as plain HTTP/1.1 so the bytes on
//! the wire (JSON bodies, Server-Sent Event framing, statuses) are what is checked.

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use neuroshard_api::{ApiConfig, ApiServer, Backend, ServedModel, start_api};
use neuroshard_client::ClientConfig;
use neuroshard_client::generate::{
    GenerateOptions, GenerationReport, LocalPipeline, generate_with,
};
use neuroshard_model::{ChatMessage, ChatTemplate, ModelInfo, SamplingParams, TextTokenizer};
use neuroshard_tests::Swarm;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Every wait on the server is bounded.
const DEADLINE: Duration = Duration::from_secs(60);

/// A chat template that passes the messages' text through, so the shipped demo model (which
/// learned one text, byte by byte) continues what the user wrote.
const TEMPLATE: &str = "{% for m in messages %}{{ m['content'] }}{% endfor %}";

/// The shipped demo model with a chat template, in a scratch directory named `demo`.
fn demo_model() -> tempfile::TempDir {
    let scratch = tempfile::tempdir().unwrap();
    let dir = scratch.path().join("demo");
    neuroshard_model::init::write_demo_model(&dir).unwrap();
    std::fs::write(dir.join("chat_template.jinja"), TEMPLATE).unwrap();
    scratch
}

struct Api {
    swarm: Swarm,
    server: ApiServer,
    model: tempfile::TempDir,
}

impl Api {
    async fn start(key: Option<&str>) -> Self {
        let model = demo_model();
        let dir = model.path().join("demo");
        let swarm = Swarm::start(&dir, &[(0, 2), (2, 4), (4, 6)]).await.unwrap();
        let backend = Backend::Swarm(Box::new(ClientConfig::new(swarm.tracker.url())));
        let served = ServedModel::load(&dir, &backend).await.unwrap();
        let config = ApiConfig {
            listen: "127.0.0.1:0".parse().unwrap(),
            api_key: key.map(str::to_string),
            ..ApiConfig::default()
        };
        let server = start_api(config, vec![served]).await.unwrap();
        Self {
            swarm,
            server,
            model,
        }
    }

    fn dir(&self) -> std::path::PathBuf {
        self.model.path().join("demo")
    }

    async fn post(&self, path: &str, body: &Value) -> Reply {
        http(
            self.server.addr,
            "POST",
            path,
            Some(&body.to_string()),
            None,
        )
        .await
    }

    /// Sessions open on the swarm's nodes.
    fn open_sessions(&self) -> u64 {
        self.swarm.nodes.iter().map(|n| n.metrics().sessions).sum()
    }
}

/// A response: status, headers, and the body with any chunked framing removed.
#[derive(Debug)]
struct Reply {
    status: u16,
    head: String,
    body: Vec<u8>,
}

impl Reply {
    fn json(&self) -> Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&self.body)))
    }
}

async fn http(
    addr: SocketAddr,
    method: &str,
    path: &str,
    body: Option<&str>,
    key: Option<&str>,
) -> Reply {
    tokio::time::timeout(DEADLINE, async {
        let mut stream = TcpStream::connect(addr).await.unwrap();
        let body = body.unwrap_or("");
        let auth = key.map_or(String::new(), |k| format!("Authorization: Bearer {k}\r\n"));
        let request = format!(
            "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\n\
             {auth}Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        );
        stream.write_all(request.as_bytes()).await.unwrap();
        let mut raw = Vec::new();
        stream.read_to_end(&mut raw).await.unwrap();
        parse_reply(&raw)
    })
    .await
    .expect("the API answered in time")
}

fn parse_reply(raw: &[u8]) -> Reply {
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("a header");
    let head = String::from_utf8_lossy(&raw[..split]).to_string();
    let status = head[9..12].parse().unwrap();
    let mut body = raw[split + 4..].to_vec();
    if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        body = dechunk(&body);
    }
    Reply { status, head, body }
}

/// Removes HTTP/1.1 chunked framing.
fn dechunk(mut raw: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    loop {
        let line = raw.windows(2).position(|w| w == b"\r\n").unwrap();
        let size =
            usize::from_str_radix(std::str::from_utf8(&raw[..line]).unwrap().trim(), 16).unwrap();
        if size == 0 {
            return out;
        }
        out.extend_from_slice(&raw[line + 2..line + 2 + size]);
        raw = &raw[line + 2 + size + 2..];
    }
}

/// The events of an SSE body, checked to be exactly `data: {payload}\n\n` each.
fn events(body: &[u8]) -> Vec<String> {
    let text = std::str::from_utf8(body).unwrap();
    assert!(text.ends_with("data: [DONE]\n\n"), "{text:?}");
    text.split_terminator("\n\n")
        .map(|event| {
            let data = event
                .strip_prefix("data: ")
                .unwrap_or_else(|| panic!("not a data event: {event:?}"));
            assert!(!data.contains('\n'), "one line per event: {event:?}");
            data.to_string()
        })
        .collect()
}

/// What the client library's generation gives for `prompt` with `options`: the reference.
async fn reference(dir: &Path, prompt: &str, options: &GenerateOptions) -> (Vec<u32>, String) {
    let report = reference_report(dir, prompt, options).await;
    let tokenizer = TextTokenizer::for_model_dir(dir).unwrap();
    let text = tokenizer.decode(&report.generated_ids).unwrap();
    (report.prompt_ids, text)
}

/// The reference generation's whole report.
async fn reference_report(dir: &Path, prompt: &str, options: &GenerateOptions) -> GenerationReport {
    let template = ChatTemplate::for_model_dir(dir).unwrap().unwrap();
    let text = template
        .render(
            &[ChatMessage::new("user", prompt)],
            true,
            &Default::default(),
        )
        .unwrap();
    let tokenizer = TextTokenizer::for_model_dir(dir).unwrap();
    let ids = tokenizer.encode_rendered(&text).unwrap();
    let mut local = LocalPipeline::load(dir).unwrap();
    generate_with(&mut local, &ids, options, |_, _| true)
        .await
        .unwrap()
}

fn chat_body(prompt: &str, extra: Value) -> Value {
    let mut body = json!({"model": "demo", "messages": [{"role": "user", "content": prompt}]});
    body.as_object_mut()
        .unwrap()
        .extend(extra.as_object().unwrap().clone());
    body
}

const PROMPT: &str = "Four score and seven years ago";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chat_completions_equal_generate_and_stream_as_openai_does() {
    let api = Api::start(None).await;
    let greedy = GenerateOptions {
        max_new_tokens: 24,
        stop_ids: ModelInfo::read(&api.dir()).unwrap().config.eos_token_ids,
        ..GenerateOptions::default()
    };
    let (ids, expected) = reference(&api.dir(), PROMPT, &greedy).await;
    assert!(expected.starts_with(" our fathers"), "{expected:?}");

    let whole = api
        .post(
            "/v1/chat/completions",
            &chat_body(PROMPT, json!({"max_tokens": 24, "temperature": 0})),
        )
        .await;
    assert_eq!(
        whole.status,
        200,
        "{}",
        String::from_utf8_lossy(&whole.body)
    );
    let json = whole.json();
    assert_eq!(json["object"], "chat.completion");
    assert_eq!(json["model"], "demo");
    assert_eq!(json["choices"][0]["message"]["content"], expected.as_str());
    assert_eq!(json["choices"][0]["finish_reason"], "length");
    assert_eq!(json["usage"]["prompt_tokens"], ids.len());
    assert_eq!(json["usage"]["completion_tokens"], 24);
    assert_eq!(json["usage"]["total_tokens"], ids.len() + 24);

    let streamed = api
        .post(
            "/v1/chat/completions",
            &chat_body(
                PROMPT,
                json!({"max_tokens": 24, "temperature": 0, "stream": true,
                    "stream_options": {"include_usage": true}}),
            ),
        )
        .await;
    assert_eq!(streamed.status, 200);
    assert!(
        streamed.head.contains("text/event-stream"),
        "{}",
        streamed.head
    );
    let events = events(&streamed.body);
    assert_eq!(events.last().unwrap(), "[DONE]");
    let chunks: Vec<Value> = events[..events.len() - 1]
        .iter()
        .map(|e| serde_json::from_str(e).unwrap())
        .collect();
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    assert!(
        chunks
            .iter()
            .all(|c| c["object"] == "chat.completion.chunk")
    );
    let text: String = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
        .collect();
    assert_eq!(text, expected);
    let finish = &chunks[chunks.len() - 2];
    assert_eq!(finish["choices"][0]["finish_reason"], "length");
    assert_eq!(chunks.last().unwrap()["usage"]["completion_tokens"], 24);

    // A stop string ends it, unprinted, with finish_reason stop.
    let stop_at = "brought";
    let stopped = api
        .post(
            "/v1/chat/completions",
            &chat_body(
                PROMPT,
                json!({"max_tokens": 24, "temperature": 0, "stop": [stop_at]}),
            ),
        )
        .await
        .json();
    let cut = &expected[..expected.find(stop_at).unwrap()];
    assert_eq!(stopped["choices"][0]["message"]["content"], cut);
    assert_eq!(stopped["choices"][0]["finish_reason"], "stop");

    // Completions take text through the tokenizer.
    let completion = api
        .post(
            "/v1/completions",
            &json!({"model": "demo", "prompt": PROMPT, "max_tokens": 8, "temperature": 0}),
        )
        .await
        .json();
    assert_eq!(completion["object"], "text_completion");
    assert_eq!(completion["usage"]["completion_tokens"], 8);

    let models = http(api.server.addr, "GET", "/v1/models", None, None)
        .await
        .json();
    assert_eq!(models["data"][0]["id"], "demo");
    let health = http(api.server.addr, "GET", "/health", None, None).await;
    assert_eq!(health.status, 200);
    api.server.shutdown().await;
}

/// One token's log-probability and its best alternatives', as the reference computes them.
type Expected = (u32, f32, Vec<(u32, f32)>);

/// Checks a chat reply's `logprobs.content` entries against the reference.
fn assert_logprobs(content: &[Value], expected: &[Expected], tokenizer: &TextTokenizer) {
    assert_eq!(content.len(), expected.len(), "{content:?}");
    let close = |got: &Value, want: f32| {
        let got = got.as_f64().unwrap() as f32;
        assert!(
            (got - want).abs() <= 0.05,
            "logprob {got}, reference {want}"
        );
    };
    for (entry, (token, logprob, top)) in content.iter().zip(expected) {
        assert_eq!(entry["bytes"], json!(tokenizer.token_bytes(*token)));
        close(&entry["logprob"], *logprob);
        let alternatives = entry["top_logprobs"].as_array().unwrap();
        assert_eq!(alternatives.len(), top.len());
        for (alternative, (id, logprob)) in alternatives.iter().zip(top) {
            assert_eq!(alternative["bytes"], json!(tokenizer.token_bytes(*id)));
            close(&alternative["logprob"], *logprob);
        }
    }
}

/// Log-probabilities come from what the last hop returns with its token (the drawn token's own
/// logit and the best candidates'), and equal the local model's, in both endpoints' shapes and
/// streamed with the text they make.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logprobs_are_the_model_s_as_openai_reports_them() {
    let api = Api::start(None).await;
    let eos = ModelInfo::read(&api.dir()).unwrap().config.eos_token_ids;
    let tokenizer = TextTokenizer::for_model_dir(&api.dir()).unwrap();
    let options = GenerateOptions {
        max_new_tokens: 16,
        stop_ids: eos.clone(),
        sampling: SamplingParams {
            temperature: 1.5,
            seed: 5,
            ..SamplingParams::default()
        },
        candidates: 3,
    };
    let report = reference_report(&api.dir(), PROMPT, &options).await;
    let expected: Vec<Expected> = report
        .steps
        .iter()
        .filter(|s| !eos.contains(&s.token))
        .map(|s| {
            let top = s.top.iter().take(3).map(|&(id, l)| (id, l - s.logsumexp));
            (s.token, s.logit - s.logsumexp, top.collect())
        })
        .collect();
    assert!(
        expected.iter().any(|(token, _, top)| top[0].0 != *token),
        "the draw should pick a token other than the most likely at least once"
    );
    let asked = json!({"max_tokens": 16, "temperature": 1.5, "seed": 5, "logprobs": true,
        "top_logprobs": 3});

    let whole = api
        .post("/v1/chat/completions", &chat_body(PROMPT, asked.clone()))
        .await
        .json();
    let content = whole["choices"][0]["logprobs"]["content"]
        .as_array()
        .unwrap();
    assert_logprobs(content, &expected, &tokenizer);

    // Streamed: each text chunk carries the tokens whose bytes make its text.
    let mut streaming = asked.clone();
    streaming["stream"] = json!(true);
    let reply = api
        .post("/v1/chat/completions", &chat_body(PROMPT, streaming))
        .await;
    let mut content = Vec::new();
    for event in events(&reply.body).iter().filter(|e| *e != "[DONE]") {
        let chunk: Value = serde_json::from_str(event).unwrap();
        let choice = &chunk["choices"][0];
        let Some(entries) = choice["logprobs"]["content"].as_array() else {
            continue;
        };
        let bytes: Vec<u8> = entries
            .iter()
            .flat_map(|e| serde_json::from_value::<Vec<u8>>(e["bytes"].clone()).unwrap())
            .collect();
        let text = choice["delta"]["content"].as_str().unwrap_or_default();
        assert_eq!(String::from_utf8_lossy(&bytes), text, "{chunk}");
        content.extend(entries.iter().cloned());
    }
    assert_logprobs(&content, &expected, &tokenizer);

    // Completions: logprobs N, OpenAI's legacy shape.
    let body = json!({"model": "demo", "prompt": PROMPT, "max_tokens": 4, "temperature": 0,
        "logprobs": 2});
    let completion = api.post("/v1/completions", &body).await.json();
    let logprobs = &completion["choices"][0]["logprobs"];
    assert_eq!(
        logprobs["tokens"].as_array().unwrap().len(),
        4,
        "{logprobs}"
    );
    for (lp, top) in logprobs["token_logprobs"]
        .as_array()
        .unwrap()
        .iter()
        .zip(logprobs["top_logprobs"].as_array().unwrap())
    {
        // Greedy: the token is the most likely, so its log-probability is the best shown.
        let best = top
            .as_object()
            .unwrap()
            .values()
            .map(|v| v.as_f64().unwrap());
        assert_eq!(top.as_object().unwrap().len(), 2);
        assert!((best.fold(f64::MIN, f64::max) - lp.as_f64().unwrap()).abs() < 1e-6);
    }
    // Not asked for: null, as OpenAI sends it.
    let plain = api
        .post(
            "/v1/chat/completions",
            &chat_body(PROMPT, json!({"max_tokens": 2})),
        )
        .await
        .json();
    assert_eq!(plain["choices"][0]["logprobs"], Value::Null);
    api.server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn eight_concurrent_streams_each_give_what_they_would_alone() {
    let api = Api::start(None).await;
    let eos = ModelInfo::read(&api.dir()).unwrap().config.eos_token_ids;
    let sampled = |seed| GenerateOptions {
        max_new_tokens: 16,
        stop_ids: eos.clone(),
        sampling: SamplingParams {
            temperature: 0.9,
            seed,
            ..SamplingParams::default()
        },
        ..GenerateOptions::default()
    };
    let mut expected = Vec::new();
    for seed in 0..8 {
        expected.push(reference(&api.dir(), PROMPT, &sampled(seed)).await.1);
    }
    let requests = (0..8u64).map(|seed| {
        let body = chat_body(
            PROMPT,
            json!({"max_tokens": 16, "temperature": 0.9, "seed": seed, "stream": true}),
        );
        let addr = api.server.addr;
        async move {
            http(
                addr,
                "POST",
                "/v1/chat/completions",
                Some(&body.to_string()),
                None,
            )
            .await
        }
    });
    let replies = futures::future::join_all(requests).await;
    for (seed, reply) in replies.iter().enumerate() {
        assert_eq!(reply.status, 200);
        let text: String = events(&reply.body)
            .iter()
            .filter(|e| *e != "[DONE]")
            .filter_map(|e| {
                let chunk: Value = serde_json::from_str(e).unwrap();
                chunk["choices"][0]["delta"]["content"]
                    .as_str()
                    .map(str::to_string)
            })
            .collect();
        assert_eq!(text, expected[seed], "seed {seed}");
    }
    api.server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_leaves_mid_stream_frees_its_sessions_and_others_go_on() {
    let api = Api::start(None).await;
    let body = chat_body(
        PROMPT,
        json!({"max_tokens": 200, "temperature": 0, "stream": true}),
    );
    let mut leaving = TcpStream::connect(api.server.addr).await.unwrap();
    let text = body.to_string();
    let request = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\n\r\n{text}",
        text.len()
    );
    leaving.write_all(request.as_bytes()).await.unwrap();
    // Read until a few tokens have arrived: the chain is open on every node.
    let mut seen = Vec::new();
    tokio::time::timeout(DEADLINE, async {
        while seen.windows(8).filter(|w| w == b"content\"").count() < 4 {
            let mut buf = [0u8; 4096];
            let n = leaving.read(&mut buf).await.unwrap();
            assert!(n > 0, "the stream ended early");
            seen.extend_from_slice(&buf[..n]);
        }
    })
    .await
    .unwrap();
    assert_eq!(api.open_sessions(), 3, "one session on each node");
    drop(leaving);
    // The server notices at the next token and ends the session on every node.
    tokio::time::timeout(DEADLINE, async {
        while api.open_sessions() > 0 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("every node freed the session");
    let after = api
        .post(
            "/v1/chat/completions",
            &chat_body(PROMPT, json!({"max_tokens": 4})),
        )
        .await;
    assert_eq!(after.status, 200, "others go on");
    api.server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_get_openai_errors_and_the_server_keeps_serving() {
    let api = Api::start(Some("sk-test")).await;
    let addr = api.server.addr;
    let post = |body: String, key: Option<&'static str>| async move {
        http(addr, "POST", "/v1/chat/completions", Some(&body), key).await
    };
    let good = chat_body(PROMPT, json!({"max_tokens": 2}));
    for (body, key, status, param) in [
        (good.to_string(), None, 401, None),
        (good.to_string(), Some("sk-wrong"), 401, None),
        ("{not json".to_string(), Some("sk-test"), 400, None),
        (
            chat_body(PROMPT, json!({"model": "nope"})).to_string(),
            Some("sk-test"),
            404,
            Some("model"),
        ),
        (
            chat_body(PROMPT, json!({"n": 2})).to_string(),
            Some("sk-test"),
            400,
            Some("n"),
        ),
        (
            chat_body(PROMPT, json!({"max_tokens": -5})).to_string(),
            Some("sk-test"),
            400,
            Some("max_tokens"),
        ),
        (
            chat_body(&"x".repeat(1100), json!({})).to_string(),
            Some("sk-test"),
            400,
            Some("messages"),
        ),
        (
            chat_body(PROMPT, json!({"max_tokens": 2000})).to_string(),
            Some("sk-test"),
            400,
            Some("max_tokens"),
        ),
    ] {
        let reply = post(body.clone(), key).await;
        assert_eq!(
            reply.status,
            status,
            "{body}: {}",
            String::from_utf8_lossy(&reply.body)
        );
        let error = &reply.json()["error"];
        assert!(
            error["message"].as_str().is_some_and(|m| !m.is_empty()),
            "{error}"
        );
        assert!(error["type"].is_string(), "{error}");
        if let Some(param) = param {
            assert_eq!(error["param"], param, "{error}");
        }
    }
    let reply = post(good.to_string(), Some("sk-test")).await;
    assert_eq!(reply.status, 200, "the server keeps serving");
    // A public address without a key is refused before anything starts.
    let open = ApiConfig {
        listen: "0.0.0.0:0".parse().unwrap(),
        ..ApiConfig::default()
    };
    let refused = open.validate().unwrap_err();
    assert_eq!(refused.field, "listen");
    assert!(refused.problem.contains("API key"), "{refused}");
    api.server.shutdown().await;
}
