//! OpenAI's request, response and error shapes, and the checks that turn a request into a
//! generation (every unsupported parameter is refused by name, never ignored).

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value, json};

use neuroshard_model::{ChatMessage, SamplingParams};

/// An error as OpenAI's API returns it: a status and `{"error": {message, type, param, code}}`.
#[derive(Debug, Clone, PartialEq)]
pub struct ApiError {
    /// The HTTP status.
    pub status: StatusCode,
    /// What went wrong, for a person.
    pub message: String,
    /// OpenAI's error type (`invalid_request_error`, ...).
    pub kind: &'static str,
    /// The request parameter at fault.
    pub param: Option<String>,
    /// A machine-readable code (`model_not_found`, `context_length_exceeded`, ...).
    pub code: Option<&'static str>,
}

impl ApiError {
    /// A bad request naming the parameter.
    pub fn invalid(param: &str, message: impl Into<String>) -> Self {
        Self {
            status: StatusCode::BAD_REQUEST,
            message: message.into(),
            kind: "invalid_request_error",
            param: Some(param.to_string()),
            code: None,
        }
    }

    /// A request the server cannot take as a whole (bad JSON).
    pub fn malformed(message: impl Into<String>) -> Self {
        Self {
            param: None,
            ..Self::invalid("", message)
        }
    }

    /// A model nobody serves here.
    pub fn unknown_model(model: &str) -> Self {
        Self {
            status: StatusCode::NOT_FOUND,
            message: format!("The model `{model}` does not exist or is not served here"),
            kind: "invalid_request_error",
            param: Some("model".into()),
            code: Some("model_not_found"),
        }
    }

    /// Missing or wrong bearer key.
    pub fn unauthorized() -> Self {
        Self {
            status: StatusCode::UNAUTHORIZED,
            message: "Incorrect or missing API key: send `Authorization: Bearer KEY`".into(),
            kind: "invalid_request_error",
            param: None,
            code: Some("invalid_api_key"),
        }
    }

    /// The swarm has no chain for the model now.
    pub fn unavailable(message: impl Into<String>) -> Self {
        Self {
            status: StatusCode::SERVICE_UNAVAILABLE,
            message: message.into(),
            kind: "service_unavailable",
            param: None,
            code: None,
        }
    }

    /// Too many generations at once.
    pub fn busy(limit: usize) -> Self {
        Self {
            status: StatusCode::TOO_MANY_REQUESTS,
            message: format!("{limit} generations are running; try again shortly"),
            kind: "rate_limit_error",
            param: None,
            code: None,
        }
    }

    /// A failure of ours.
    pub fn internal(message: impl Into<String>) -> Self {
        Self {
            status: StatusCode::INTERNAL_SERVER_ERROR,
            message: message.into(),
            kind: "server_error",
            param: None,
            code: None,
        }
    }

    /// The JSON body.
    pub fn body(&self) -> Value {
        json!({"error": {
            "message": self.message,
            "type": self.kind,
            "param": self.param,
            "code": self.code,
        }})
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.status, axum::Json(self.body())).into_response()
    }
}

impl From<neuroshard_net::NodeError> for ApiError {
    fn from(e: neuroshard_net::NodeError) -> Self {
        use neuroshard_net::NodeError;
        match e {
            NodeError::BadRequest(m) => Self::invalid("", m),
            NodeError::Model(neuroshard_model::ModelError::Request(m)) => Self::invalid("", m),
            e @ (NodeError::NoRoute(_)
            | NodeError::Connect { .. }
            | NodeError::Remote { .. }
            | NodeError::Full(_)) => Self::unavailable(e.to_string()),
            e => Self::internal(e.to_string()),
        }
    }
}

impl From<neuroshard_model::ModelError> for ApiError {
    fn from(e: neuroshard_model::ModelError) -> Self {
        match e {
            neuroshard_model::ModelError::Request(m) => Self::invalid("", m),
            e => Self::internal(e.to_string()),
        }
    }
}

/// What a prompt is: chat messages (through the chat template) or text.
#[derive(Debug, Clone, PartialEq)]
pub enum Prompt {
    /// `/v1/chat/completions`.
    Chat(Vec<ChatMessage>),
    /// `/v1/completions`.
    Text(String),
}

/// A checked request: everything a generation needs.
#[derive(Debug, Clone, PartialEq)]
pub struct Request {
    /// The model's id as `/v1/models` lists it.
    pub model: String,
    /// Messages or text.
    pub prompt: Prompt,
    /// Tokens to generate at most; `None`: up to the context length.
    pub max_tokens: Option<usize>,
    /// How tokens are chosen.
    pub sampling: SamplingParams,
    /// Texts that end the generation (not returned).
    pub stop: Vec<String>,
    /// Server-sent events instead of one JSON reply.
    pub stream: bool,
    /// With `stream`: a last chunk carrying `usage`.
    pub include_usage: bool,
    /// Log-probabilities of the generated tokens, with this many of the most likely
    /// alternatives at each; `None`: not asked for.
    pub logprobs: Option<usize>,
}

/// Parameters taken with their default meaning; any other value of theirs is refused.
const NEUTRAL: [(&str, f64); 2] = [("presence_penalty", 0.0), ("frequency_penalty", 0.0)];

/// Parameters accepted and not acted on: they do not change the output.
const IGNORED: [&str; 3] = ["user", "metadata", "store"];

impl Request {
    /// Checks a chat completion request's JSON, naming the first bad parameter.
    pub fn chat(body: &Value) -> Result<Self, ApiError> {
        let object = as_object(body)?;
        let messages = object
            .get("messages")
            .ok_or_else(|| ApiError::invalid("messages", "messages is required"))?;
        let messages = parse_messages(messages)?;
        Self::parse(object, Prompt::Chat(messages), &["messages"])
    }

    /// Checks a (legacy) completion request's JSON.
    pub fn completion(body: &Value) -> Result<Self, ApiError> {
        let object = as_object(body)?;
        let prompt = match object.get("prompt") {
            Some(Value::String(text)) => text.clone(),
            Some(Value::Array(items)) if items.len() == 1 && items[0].is_string() => {
                items[0].as_str().unwrap_or_default().to_string()
            }
            Some(_) => {
                return Err(ApiError::invalid(
                    "prompt",
                    "prompt must be one string (batches of prompts are not supported)",
                ));
            }
            None => return Err(ApiError::invalid("prompt", "prompt is required")),
        };
        let echo = object.get("echo").and_then(Value::as_bool).unwrap_or(false);
        if echo {
            return Err(ApiError::invalid("echo", "echo is not supported"));
        }
        Self::parse(object, Prompt::Text(prompt), &["prompt", "echo"])
    }

    fn parse(o: &Map<String, Value>, prompt: Prompt, own: &[&str]) -> Result<Self, ApiError> {
        refuse_unknown(o, own)?;
        let model = match o.get("model") {
            Some(Value::String(m)) if !m.is_empty() => m.clone(),
            _ => return Err(ApiError::invalid("model", "model is required")),
        };
        refuse_unsupported(o)?;
        let logprobs = logprobs(o, matches!(prompt, Prompt::Chat(_)))?;
        let max_tokens = match (o.get("max_completion_tokens"), o.get("max_tokens")) {
            (Some(v), _) if !v.is_null() => Some(count(v, "max_completion_tokens")?),
            (_, Some(v)) if !v.is_null() => Some(count(v, "max_tokens")?),
            _ => None,
        };
        let (sampling, stop) = (sampling(o)?, stop(o)?);
        let stream = match o.get("stream") {
            None | Some(Value::Null) => false,
            Some(Value::Bool(b)) => *b,
            Some(_) => return Err(ApiError::invalid("stream", "stream must be true or false")),
        };
        let include_usage = o
            .get("stream_options")
            .and_then(|s| s.get("include_usage"))
            .and_then(Value::as_bool)
            .unwrap_or(false);
        Ok(Self {
            model,
            prompt,
            max_tokens,
            sampling,
            stop,
            stream,
            include_usage,
            logprobs,
        })
    }
}

/// Refuses a parameter this server does not know, naming it.
fn refuse_unknown(o: &Map<String, Value>, own: &[&str]) -> Result<(), ApiError> {
    const KNOWN: [&str; 17] = [
        "model",
        "max_tokens",
        "max_completion_tokens",
        "temperature",
        "top_p",
        "top_k",
        "min_p",
        "repetition_penalty",
        "seed",
        "stop",
        "stream",
        "stream_options",
        "n",
        "logprobs",
        "top_logprobs",
        "presence_penalty",
        "frequency_penalty",
    ];
    match o.keys().find(|k| {
        !KNOWN.contains(&k.as_str()) && !IGNORED.contains(&k.as_str()) && !own.contains(&k.as_str())
    }) {
        Some(key) => Err(ApiError::invalid(key, format!("{key} is not supported"))),
        None => Ok(()),
    }
}

/// Most alternatives a chat request's `top_logprobs` may ask for (OpenAI's bound, and what a
/// node's reply carries at most).
pub const MAX_TOP_LOGPROBS: usize = 20;

/// Most alternatives a completion request's `logprobs` may ask for (OpenAI's bound).
pub const MAX_COMPLETION_LOGPROBS: usize = 5;

/// The alternatives asked for at each token, if log-probabilities are: a chat request's
/// `logprobs: true` with `top_logprobs: N` (0 to 20, and only with logprobs), a completion
/// request's `logprobs: N` (0 to 5).
fn logprobs(o: &Map<String, Value>, chat: bool) -> Result<Option<usize>, ApiError> {
    let number = |name: &str, max: usize| -> Result<Option<usize>, ApiError> {
        match o.get(name) {
            None | Some(Value::Null) => Ok(None),
            Some(v) => match v.as_u64().and_then(|n| usize::try_from(n).ok()) {
                Some(n) if n <= max => Ok(Some(n)),
                _ => Err(ApiError::invalid(
                    name,
                    format!("{name} must be an integer from 0 to {max}"),
                )),
            },
        }
    };
    if !chat {
        if o.get("top_logprobs").is_some_and(|v| !v.is_null()) {
            let problem = "top_logprobs is a chat parameter; a completion takes logprobs: N";
            return Err(ApiError::invalid("top_logprobs", problem));
        }
        return number("logprobs", MAX_COMPLETION_LOGPROBS);
    }
    let asked = match o.get("logprobs") {
        None | Some(Value::Null) => false,
        Some(Value::Bool(b)) => *b,
        Some(_) => {
            return Err(ApiError::invalid(
                "logprobs",
                "logprobs must be true or false",
            ));
        }
    };
    match (asked, number("top_logprobs", MAX_TOP_LOGPROBS)?) {
        (true, top) => Ok(Some(top.unwrap_or(0))),
        (false, Some(n)) if n > 0 => Err(ApiError::invalid(
            "top_logprobs",
            "top_logprobs needs logprobs set to true",
        )),
        (false, _) => Ok(None),
    }
}

/// A generated token's log-probability and the most likely alternatives at its position.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenLogprob {
    /// The token chosen.
    pub chosen: Candidate,
    /// The most likely tokens, best first (as many as asked).
    pub top: Vec<Candidate>,
}

/// A token with its log-probability under the model (the raw logits' softmax, before the
/// sampling parameters change them, as OpenAI reports it).
#[derive(Debug, Clone, PartialEq)]
pub struct Candidate {
    /// The bytes the token stands for (which may end inside a character).
    pub bytes: Vec<u8>,
    /// Natural log of its probability.
    pub logprob: f32,
}

impl Candidate {
    /// The token's text (a partial character shows as U+FFFD, as OpenAI shows it).
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.bytes).into_owned()
    }

    fn chat_json(&self) -> Value {
        json!({"token": self.text(), "logprob": self.logprob, "bytes": self.bytes})
    }
}

/// A chat choice's `logprobs`: `{"content": [{token, logprob, bytes, top_logprobs}]}`.
pub fn chat_logprobs(tokens: &[TokenLogprob]) -> Value {
    let content: Vec<Value> = tokens
        .iter()
        .map(|t| {
            let mut entry = t.chosen.chat_json();
            entry["top_logprobs"] = t.top.iter().map(Candidate::chat_json).collect();
            entry
        })
        .collect();
    json!({"content": content, "refusal": null})
}

/// A completion choice's `logprobs`: `{tokens, token_logprobs, top_logprobs, text_offset}`,
/// the offsets counted in characters from `offset` (where these tokens' text starts).
pub fn completion_logprobs(tokens: &[TokenLogprob], offset: usize) -> Value {
    let mut at = offset;
    let text_offset: Vec<usize> = tokens
        .iter()
        .map(|t| {
            let start = at;
            at += t.chosen.text().chars().count();
            start
        })
        .collect();
    let top: Vec<Value> = tokens
        .iter()
        .map(|t| {
            let alternatives: Map<String, Value> =
                t.top.iter().map(|c| (c.text(), json!(c.logprob))).collect();
            Value::Object(alternatives)
        })
        .collect();
    json!({
        "tokens": tokens.iter().map(|t| t.chosen.text()).collect::<Vec<_>>(),
        "token_logprobs": tokens.iter().map(|t| t.chosen.logprob).collect::<Vec<_>>(),
        "top_logprobs": top,
        "text_offset": text_offset,
    })
}

/// Refuses known parameters asked for values this server cannot honour: more than one choice,
/// penalties other than neutral.
fn refuse_unsupported(o: &Map<String, Value>) -> Result<(), ApiError> {
    if let Some(n) = o.get("n").filter(|v| !v.is_null())
        && n.as_u64() != Some(1)
    {
        return Err(ApiError::invalid("n", "only n = 1 is supported"));
    }
    for (name, neutral) in NEUTRAL {
        if let Some(v) = o.get(name).filter(|v| !v.is_null())
            && v.as_f64() != Some(neutral)
        {
            return Err(ApiError::invalid(name, format!("{name} is not supported")));
        }
    }
    Ok(())
}

/// The sampling parameters asked for, checked.
fn sampling(o: &Map<String, Value>) -> Result<SamplingParams, ApiError> {
    let sampling = SamplingParams {
        temperature: number(o, "temperature", 1.0)?,
        top_p: number(o, "top_p", 1.0)?,
        top_k: match o.get("top_k").filter(|v| !v.is_null()) {
            None => 0,
            Some(v) => match v.as_i64() {
                Some(-1) => 0,
                _ => count(v, "top_k")?,
            },
        },
        min_p: number(o, "min_p", 0.0)?,
        repetition_penalty: number(o, "repetition_penalty", 1.0)?,
        // No seed: a fresh one, as OpenAI's output varies between calls.
        seed: match o.get("seed").filter(|v| !v.is_null()) {
            None => rand::random(),
            Some(v) => v
                .as_i64()
                .map(|s| s as u64)
                .ok_or_else(|| ApiError::invalid("seed", "seed must be an integer"))?,
        },
    };
    sampling
        .validate()
        .map_err(|e| ApiError::invalid(sampling_param(&e.to_string()), e.to_string()))?;
    Ok(sampling)
}

/// The stop texts asked for: none, one, or a list of up to 4.
fn stop(o: &Map<String, Value>) -> Result<Vec<String>, ApiError> {
    match o.get("stop") {
        None | Some(Value::Null) => Ok(Vec::new()),
        Some(Value::String(s)) => Ok(vec![s.clone()]),
        Some(Value::Array(items)) if items.len() <= 4 => items
            .iter()
            .map(|s| {
                s.as_str()
                    .map(str::to_string)
                    .ok_or_else(|| ApiError::invalid("stop", "stop must hold strings"))
            })
            .collect(),
        Some(_) => Err(ApiError::invalid(
            "stop",
            "stop must be a string or a list of up to 4 strings",
        )),
    }
}

/// The request parameter a sampling error names.
fn sampling_param(message: &str) -> &'static str {
    ["temperature", "top_p", "min_p", "repetition_penalty"]
        .into_iter()
        .find(|p| message.contains(p))
        .unwrap_or("temperature")
}

fn as_object(body: &Value) -> Result<&Map<String, Value>, ApiError> {
    body.as_object()
        .ok_or_else(|| ApiError::malformed("the request body must be a JSON object"))
}

fn count(v: &Value, name: &str) -> Result<usize, ApiError> {
    v.as_u64()
        .filter(|&n| n > 0)
        .map(|n| n as usize)
        .ok_or_else(|| ApiError::invalid(name, format!("{name} must be a positive integer")))
}

fn number(o: &Map<String, Value>, name: &str, default: f32) -> Result<f32, ApiError> {
    match o.get(name) {
        None | Some(Value::Null) => Ok(default),
        Some(v) => v
            .as_f64()
            .map(|f| f as f32)
            .ok_or_else(|| ApiError::invalid(name, format!("{name} must be a number"))),
    }
}

/// Messages with text content: a string, or a list of `{"type": "text", "text": ...}` parts.
fn parse_messages(value: &Value) -> Result<Vec<ChatMessage>, ApiError> {
    let items = value
        .as_array()
        .filter(|a| !a.is_empty())
        .ok_or_else(|| ApiError::invalid("messages", "messages must be a non-empty list"))?;
    items
        .iter()
        .enumerate()
        .map(|(i, m)| {
            let field = |f: &str| format!("messages[{i}].{f}");
            let role = m
                .get("role")
                .and_then(Value::as_str)
                .filter(|r| ["system", "developer", "user", "assistant"].contains(r))
                .ok_or_else(|| {
                    ApiError::invalid(
                        &field("role"),
                        "role must be system, developer, user or assistant",
                    )
                })?;
            let content = match m.get("content") {
                Some(Value::String(text)) => text.clone(),
                Some(Value::Array(parts)) => parts
                    .iter()
                    .map(
                        |p| match (p.get("type").and_then(Value::as_str), p.get("text")) {
                            (Some("text"), Some(Value::String(t))) => Ok(t.as_str()),
                            _ => Err(ApiError::invalid(
                                &field("content"),
                                "only text content parts are supported",
                            )),
                        },
                    )
                    .collect::<Result<String, _>>()?,
                _ => {
                    return Err(ApiError::invalid(
                        &field("content"),
                        "content must be text or a list of text parts",
                    ));
                }
            };
            // Templates know "system"; OpenAI's newer "developer" role means the same.
            let role = if role == "developer" { "system" } else { role };
            Ok(ChatMessage::new(role, &content))
        })
        .collect()
}

/// Token counts of a finished generation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Usage {
    /// Tokens of the prompt (after the chat template).
    pub prompt_tokens: usize,
    /// Tokens generated.
    pub completion_tokens: usize,
    /// Both.
    pub total_tokens: usize,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chat(extra: Value) -> Result<Request, ApiError> {
        let mut body = json!({"model": "m", "messages": [{"role": "user", "content": "hi"}]});
        body.as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        Request::chat(&body)
    }

    #[test]
    fn reads_openai_parameters() {
        let r = chat(
            json!({"max_completion_tokens": 7, "temperature": 0.5, "top_p": 0.9,
            "seed": 3, "stop": ["\n", "END"], "stream": true,
            "stream_options": {"include_usage": true}, "n": 1, "user": "u"}),
        )
        .unwrap();
        assert_eq!(r.max_tokens, Some(7));
        assert_eq!(r.sampling.temperature, 0.5);
        assert_eq!(r.sampling.seed, 3);
        assert_eq!(r.stop, vec!["\n".to_string(), "END".to_string()]);
        assert!(r.stream && r.include_usage);
        assert_eq!(r.prompt, Prompt::Chat(vec![ChatMessage::new("user", "hi")]));
    }

    #[test]
    fn reads_logprobs_as_each_endpoint_asks_for_them() {
        let asked = |extra| chat(extra).unwrap().logprobs;
        assert_eq!(asked(json!({})), None);
        assert_eq!(asked(json!({"logprobs": false, "top_logprobs": 0})), None);
        assert_eq!(asked(json!({"logprobs": true})), Some(0));
        assert_eq!(
            asked(json!({"logprobs": true, "top_logprobs": 20})),
            Some(20)
        );
        let completion = |extra: Value| {
            let mut body = json!({"model": "m", "prompt": "hi"});
            body.as_object_mut()
                .unwrap()
                .extend(extra.as_object().unwrap().clone());
            Request::completion(&body)
        };
        assert_eq!(
            completion(json!({"logprobs": 5})).unwrap().logprobs,
            Some(5)
        );
        assert_eq!(
            completion(json!({"logprobs": null})).unwrap().logprobs,
            None
        );
        for (extra, param) in [
            (json!({"logprobs": 6}), "logprobs"),
            (json!({"logprobs": true}), "logprobs"),
            (json!({"top_logprobs": 2}), "top_logprobs"),
        ] {
            let err = completion(extra.clone()).unwrap_err();
            assert_eq!(
                err.param.as_deref(),
                Some(param),
                "{extra}: {}",
                err.message
            );
        }
    }

    #[test]
    fn writes_logprobs_in_each_endpoint_s_shape() {
        let candidate = |text: &[u8], logprob| Candidate {
            bytes: text.to_vec(),
            logprob,
        };
        let tokens = vec![
            TokenLogprob {
                chosen: candidate(b" caf", -0.5),
                top: vec![candidate(b" caf", -0.5), candidate(b" tea", -1.5)],
            },
            // The first byte of "é": its own bytes, its text a replacement character.
            TokenLogprob {
                chosen: candidate(&[0xC3], -0.25),
                top: vec![],
            },
        ];
        let chat = chat_logprobs(&tokens);
        assert_eq!(
            chat["content"][0],
            json!({"token": " caf", "logprob": -0.5, "bytes": [32, 99, 97, 102],
                "top_logprobs": [
                    {"token": " caf", "logprob": -0.5, "bytes": [32, 99, 97, 102]},
                    {"token": " tea", "logprob": -1.5, "bytes": [32, 116, 101, 97]}]})
        );
        assert_eq!(chat["content"][1]["token"], "\u{FFFD}");
        assert_eq!(chat["content"][1]["bytes"], json!([0xC3]));
        let text = completion_logprobs(&tokens, 3);
        assert_eq!(text["tokens"], json!([" caf", "\u{FFFD}"]));
        assert_eq!(text["token_logprobs"], json!([-0.5, -0.25]));
        assert_eq!(text["top_logprobs"][0], json!({" caf": -0.5, " tea": -1.5}));
        assert_eq!(text["text_offset"], json!([3, 7]));
    }

    #[test]
    fn names_what_it_refuses() {
        for (extra, param) in [
            (json!({"n": 2}), "n"),
            (json!({"max_tokens": -1}), "max_tokens"),
            (json!({"temperature": -0.5}), "temperature"),
            (json!({"tools": []}), "tools"),
            (json!({"logprobs": 1}), "logprobs"),
            (
                json!({"logprobs": true, "top_logprobs": 21}),
                "top_logprobs",
            ),
            (json!({"top_logprobs": 2}), "top_logprobs"),
            (json!({"presence_penalty": 0.5}), "presence_penalty"),
            (json!({"stop": 3}), "stop"),
            (
                json!({"messages": [{"role": "robot", "content": "x"}]}),
                "messages[0].role",
            ),
        ] {
            let err = chat(extra.clone()).unwrap_err();
            assert_eq!(err.status, StatusCode::BAD_REQUEST, "{extra}");
            assert_eq!(
                err.param.as_deref(),
                Some(param),
                "{extra}: {}",
                err.message
            );
        }
    }
}
