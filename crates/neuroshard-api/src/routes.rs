//! The HTTP routes: `/v1/models`, `/v1/chat/completions`, `/v1/completions`, `/health`, the
//! bearer-key check, and Server-Sent Events in OpenAI's chunk format.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use axum::Json;
use axum::body::Bytes;
use axum::extract::{Request as HttpRequest, State};
use axum::http::header::AUTHORIZATION;
use axum::middleware::Next;
use axum::response::sse::{Event, Sse};
use axum::response::{IntoResponse, Response};
use futures::{Stream, StreamExt};
use serde_json::{Value, json};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_stream::wrappers::ReceiverStream;

use neuroshard_client::generate::Finish;

use crate::engine::{Piece, PieceReceiver, ServedModel};
use crate::openai::{
    ApiError, Prompt, Request, TokenLogprob, Usage, chat_logprobs, completion_logprobs,
};

/// What every handler shares.
pub(crate) struct ApiState {
    pub(crate) models: Vec<Arc<ServedModel>>,
    pub(crate) api_key: Option<String>,
    /// Generations running at once, at most.
    pub(crate) slots: Arc<Semaphore>,
    pub(crate) max_concurrent: usize,
}

type Shared = State<Arc<ApiState>>;

/// Refuses `/v1` calls without the bearer key, when one is set.
pub(crate) async fn require_key(
    State(state): Shared,
    request: HttpRequest,
    next: Next,
) -> Response {
    if let Some(key) = &state.api_key {
        let given = request
            .headers()
            .get(AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "));
        if !given.is_some_and(|g| constant_time_eq(g.as_bytes(), key.as_bytes())) {
            return ApiError::unauthorized().into_response();
        }
    }
    next.run(request).await
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// `GET /health`: the server is up, and which models can be served now.
pub(crate) async fn health(State(state): Shared) -> Json<Value> {
    let ready: Vec<&str> = state
        .models
        .iter()
        .filter(|m| m.available())
        .map(|m| m.name.as_str())
        .collect();
    Json(json!({"status": "ok", "models_ready": ready}))
}

/// `GET /v1/models`: the models every layer of which has a provider now.
pub(crate) async fn models(State(state): Shared) -> Json<Value> {
    let mut data = Vec::new();
    for model in &state.models {
        if model.ready().await {
            data.push(json!({
                "id": model.name,
                "object": "model",
                "created": 0,
                "owned_by": "neuroshard",
                "neuroshard_model_id": model.info.id,
                "context_length": model.info.config.max_positions(),
            }));
        }
    }
    Json(json!({"object": "list", "data": data}))
}

/// `POST /v1/chat/completions`.
pub(crate) async fn chat(State(state): Shared, body: Bytes) -> Response {
    let request = parse(&body).and_then(|v| Request::chat(&v));
    respond(state, request, Kind::Chat).await
}

/// `POST /v1/completions`.
pub(crate) async fn completions(State(state): Shared, body: Bytes) -> Response {
    let request = parse(&body).and_then(|v| Request::completion(&v));
    respond(state, request, Kind::Text).await
}

fn parse(body: &[u8]) -> Result<Value, ApiError> {
    serde_json::from_slice(body)
        .map_err(|e| ApiError::malformed(format!("the body is not valid JSON: {e}")))
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Kind {
    Chat,
    Text,
}

/// The names and stamps of one response.
struct Reply {
    id: String,
    created: u64,
    model: String,
    kind: Kind,
}

impl Reply {
    /// OpenAI's `object` of a whole reply or of a streamed chunk.
    fn object(&self, chunk: bool) -> &'static str {
        match (self.kind, chunk) {
            (Kind::Chat, false) => "chat.completion",
            (Kind::Chat, true) => "chat.completion.chunk",
            (Kind::Text, _) => "text_completion",
        }
    }

    fn chunk(&self, choice: Value) -> Value {
        json!({"id": self.id, "object": self.object(true), "created": self.created,
            "model": self.model, "choices": [choice]})
    }

    /// The last chunk when usage is asked for: no choices, the token counts.
    fn usage_chunk(&self, usage: Usage) -> Value {
        json!({"id": self.id, "object": self.object(true), "created": self.created,
            "model": self.model, "choices": [], "usage": usage})
    }

    /// A choice's `logprobs`: `null` where none were asked for, else the tokens' in this
    /// kind's shape (a completion's text offsets start at `offset` characters).
    fn logprobs(&self, tokens: Option<&[TokenLogprob]>, offset: usize) -> Value {
        match (tokens, self.kind) {
            (None, _) => Value::Null,
            (Some(tokens), Kind::Chat) => chat_logprobs(tokens),
            (Some(tokens), Kind::Text) => completion_logprobs(tokens, offset),
        }
    }

    /// A streamed piece of text (or the end), with the log-probabilities of the tokens that
    /// made it when they were asked for.
    fn delta(&self, text: &str, finish: Option<Finish>, logprobs: Value) -> Value {
        match self.kind {
            Kind::Chat => {
                let delta = if finish.is_some() {
                    json!({})
                } else {
                    json!({"content": text})
                };
                self.chunk(json!({"index": 0, "delta": delta, "logprobs": logprobs,
                        "finish_reason": finish.map(reason)}))
            }
            Kind::Text => self.chunk(json!({"index": 0, "text": text, "logprobs": logprobs,
                    "finish_reason": finish.map(reason)})),
        }
    }

    fn whole(&self, text: &str, finish: Finish, usage: Usage, logprobs: Value) -> Value {
        let choice = match self.kind {
            Kind::Chat => json!({"index": 0, "message": {"role": "assistant", "content": text},
                "logprobs": logprobs, "finish_reason": reason(finish)}),
            Kind::Text => json!({"index": 0, "text": text, "logprobs": logprobs,
                "finish_reason": reason(finish)}),
        };
        json!({"id": self.id, "object": self.object(false), "created": self.created, "model": self.model,
            "choices": [choice], "usage": usage})
    }
}

fn reason(finish: Finish) -> &'static str {
    match finish {
        Finish::Stop => "stop",
        Finish::Length => "length",
    }
}

async fn respond(state: Arc<ApiState>, request: Result<Request, ApiError>, kind: Kind) -> Response {
    match start(&state, request, kind).await {
        Ok(response) => response,
        Err(e) => {
            tracing::info!(status = e.status.as_u16(), "refused: {}", e.message);
            e.into_response()
        }
    }
}

async fn start(
    state: &Arc<ApiState>,
    request: Result<Request, ApiError>,
    kind: Kind,
) -> Result<Response, ApiError> {
    let request = request?;
    let model = state
        .models
        .iter()
        .find(|m| m.name == request.model)
        .cloned()
        .ok_or_else(|| ApiError::unknown_model(&request.model))?;
    let permit = state
        .slots
        .clone()
        .try_acquire_owned()
        .map_err(|_| ApiError::busy(state.max_concurrent))?;
    let (rx, prompt_tokens) = model.start(&request).await?;
    let reply = Reply {
        id: format!(
            "{}-{:016x}",
            if kind == Kind::Chat {
                "chatcmpl"
            } else {
                "cmpl"
            },
            rand::random::<u64>()
        ),
        created: SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs()),
        model: model.name.clone(),
        kind,
    };
    tracing::info!(
        model = %reply.model,
        prompt_tokens,
        stream = request.stream,
        chat = matches!(request.prompt, Prompt::Chat(_)),
        "generating"
    );
    if request.stream {
        let events = stream_events(reply, rx, request.include_usage, permit);
        return Ok(Sse::new(events).into_response());
    }
    whole_reply(reply, rx, request.logprobs.is_some(), permit).await
}

/// Collects a generation into one JSON reply.
async fn whole_reply(
    reply: Reply,
    mut rx: PieceReceiver,
    logprobs: bool,
    _permit: OwnedSemaphorePermit,
) -> Result<Response, ApiError> {
    let started = Instant::now();
    let mut text = String::new();
    let mut tokens = Vec::new();
    while let Some(piece) = rx.recv().await {
        match piece? {
            Piece::Text(t) => text.push_str(&t),
            Piece::Tokens(t) => tokens.extend(t),
            Piece::Done { finish, usage } => {
                log_done(&reply, finish, usage, started);
                let logprobs = reply.logprobs(logprobs.then_some(&tokens), 0);
                let whole = reply.whole(&text, finish, usage, logprobs);
                return Ok(Json(whole).into_response());
            }
        }
    }
    Err(ApiError::internal("the generation ended without a result"))
}

fn log_done(reply: &Reply, finish: Finish, usage: Usage, started: Instant) {
    tracing::info!(
        model = %reply.model,
        prompt_tokens = usage.prompt_tokens,
        completion_tokens = usage.completion_tokens,
        finish = reason(finish),
        ms = started.elapsed().as_millis() as u64,
        "done"
    );
}

/// A generation as Server-Sent Events: the role, each text piece (with its tokens'
/// log-probabilities when asked), the finish reason, usage when asked, then `data: [DONE]`.
/// An error mid-stream is sent as an error event, then DONE.
fn stream_events(
    reply: Reply,
    rx: PieceReceiver,
    include_usage: bool,
    permit: OwnedSemaphorePermit,
) -> impl Stream<Item = Result<Event, Infallible>> {
    let started = Instant::now();
    let first = (reply.kind == Kind::Chat).then(|| {
        reply.chunk(
            json!({"index": 0, "delta": {"role": "assistant", "content": ""},
                "logprobs": null, "finish_reason": null}),
        )
    });
    let reply = Arc::new(reply);
    // Log-probabilities wait for the text their tokens make; characters sent so far.
    let (mut tokens, mut offset): (Option<Vec<TokenLogprob>>, usize) = (None, 0);
    let pieces = ReceiverStream::new(rx).flat_map(move |piece| {
        // The permit lives as long as the stream: a client that leaves frees its slot.
        let _ = &permit;
        let events: Vec<Value> = match piece {
            Ok(Piece::Tokens(t)) => {
                tokens.get_or_insert_default().extend(t);
                vec![]
            }
            Ok(Piece::Text(text)) => {
                let logprobs = reply.logprobs(tokens.take().as_deref(), offset);
                offset += text.chars().count();
                vec![reply.delta(&text, None, logprobs)]
            }
            Ok(Piece::Done { finish, usage }) => {
                log_done(&reply, finish, usage, started);
                let logprobs = reply.logprobs(tokens.take().as_deref(), offset);
                let mut events = vec![reply.delta("", Some(finish), logprobs)];
                if include_usage {
                    events.push(reply.usage_chunk(usage));
                }
                events
            }
            Err(e) => vec![e.body()],
        };
        futures::stream::iter(events)
    });
    futures::stream::iter(first)
        .chain(pieces)
        .map(|value| Event::default().data(value.to_string()))
        .chain(futures::stream::once(async {
            Event::default().data("[DONE]")
        }))
        .map(Ok)
}
