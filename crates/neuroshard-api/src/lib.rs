//! An OpenAI-compatible HTTP API over a NeuroShard swarm, or over one local process.
//!
//! - [`openai`] holds the wire shapes: requests are checked whole before anything runs, and
//!   every parameter the server does not implement is refused by name (400), never ignored.
//! - [`engine`] holds the served models (tokenizer, chat template, and a swarm client or the
//!   whole model loaded here) and runs one generation per request, each in its own session.
//! - `routes` is the axum router: `/v1/models`, `/v1/chat/completions`, `/v1/completions`
//!   (streamed as Server-Sent Events in OpenAI's chunk format, or whole), `/health`, and the
//!   bearer-key check.
//!
//! Bound beyond loopback the server needs a key; CORS is off unless origins are given.

pub mod engine;
pub mod openai;
mod routes;

use std::net::SocketAddr;
use std::sync::Arc;

use axum::Router;
use axum::extract::DefaultBodyLimit;
use axum::routing::{get, post};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

pub use engine::{Backend, Piece, ServedModel};
pub use openai::{ApiError, Usage};

/// Request bodies above this are refused before they are read whole: a chat of a long
/// context is well under it.
const MAX_BODY_BYTES: usize = 4 * 1024 * 1024;

/// How the API server runs.
#[derive(Debug, Clone)]
pub struct ApiConfig {
    /// Where to listen. Default loopback port 8000 (the port OpenAI-compatible local servers
    /// commonly use).
    pub listen: SocketAddr,
    /// The bearer key clients must send; required when `listen` is not loopback.
    pub api_key: Option<String>,
    /// Origins a browser may call from; empty: CORS off.
    pub cors_origins: Vec<String>,
    /// Generations running at once; more get 429. Default 64: eight times the concurrent
    /// sessions a home node batches well, so a small swarm queues rather than refuses.
    pub max_concurrent: usize,
}

impl Default for ApiConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 8000)),
            api_key: None,
            cors_origins: Vec::new(),
            max_concurrent: 64,
        }
    }
}

impl ApiConfig {
    /// Names the bad setting: a public address without a key, no room for a generation, a
    /// malformed origin.
    pub fn validate(&self) -> Result<(), neuroshard_base::Invalid> {
        use neuroshard_base::Invalid;
        if !self.listen.ip().is_loopback() && self.api_key.as_deref().is_none_or(str::is_empty) {
            let problem = format!(
                "{} is reachable from other machines; set an API key (--api-key or \
                 NEUROSHARD_API_KEY) or listen on loopback",
                self.listen
            );
            return Err(Invalid::new("listen", problem));
        }
        if self.max_concurrent == 0 {
            return Err(Invalid::new("max_concurrent", "must be at least 1"));
        }
        if let Some(bad) = self
            .cors_origins
            .iter()
            .find(|o| o.parse::<axum::http::HeaderValue>().is_err())
        {
            let problem = format!("{bad:?} is not a valid origin");
            return Err(Invalid::new("cors_origins", problem));
        }
        Ok(())
    }
}

/// A running API server.
#[derive(Debug)]
pub struct ApiServer {
    /// The address it listens on.
    pub addr: SocketAddr,
    cancel: CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

impl ApiServer {
    /// Stops accepting, lets requests in flight end, and waits for the server to stop.
    pub async fn shutdown(self) {
        self.cancel.cancel();
        let _ = self.task.await;
    }
}

/// Starts serving `models` as `config` says.
pub async fn start_api(config: ApiConfig, models: Vec<ServedModel>) -> Result<ApiServer, ApiError> {
    config
        .validate()
        .map_err(|e| ApiError::internal(e.to_string()))?;
    if models.is_empty() {
        return Err(ApiError::internal("no model to serve"));
    }
    let state = Arc::new(routes::ApiState {
        models: models.into_iter().map(Arc::new).collect(),
        api_key: config.api_key.clone().filter(|k| !k.is_empty()),
        slots: Arc::new(Semaphore::new(config.max_concurrent)),
        max_concurrent: config.max_concurrent,
    });
    let v1 = Router::new()
        .route("/v1/models", get(routes::models))
        .route("/v1/chat/completions", post(routes::chat))
        .route("/v1/completions", post(routes::completions))
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            routes::require_key,
        ));
    let mut app = Router::new()
        .route("/health", get(routes::health))
        .merge(v1)
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .with_state(state);
    if !config.cors_origins.is_empty() {
        use axum::http::{HeaderValue, Method, header};
        let origins: Vec<HeaderValue> = config
            .cors_origins
            .iter()
            .filter_map(|o| o.parse().ok())
            .collect();
        app = app.layer(
            tower_http::cors::CorsLayer::new()
                .allow_origin(origins)
                .allow_methods([Method::GET, Method::POST])
                .allow_headers([header::AUTHORIZATION, header::CONTENT_TYPE]),
        );
    }
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .map_err(|e| ApiError::internal(format!("listening on {}: {e}", config.listen)))?;
    let addr = listener
        .local_addr()
        .map_err(|e| ApiError::internal(e.to_string()))?;
    let cancel = CancellationToken::new();
    let stop = cancel.clone();
    let task = tokio::spawn(async move {
        let served = axum::serve(listener, app)
            .with_graceful_shutdown(async move { stop.cancelled().await })
            .await;
        if let Err(e) = served {
            tracing::warn!("the API server stopped: {e}");
        }
    });
    tracing::info!(%addr, "OpenAI-compatible API listening");
    Ok(ApiServer { addr, cancel, task })
}
