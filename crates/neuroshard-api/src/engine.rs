//! The models the API serves and how one request's tokens are made: a swarm session or a local
//! session runs a [`Generation`] and sends text pieces over a bounded channel; the sender
//! notices a client that went away at the next token (or while waiting for it) and ends the
//! session, which frees its KV caches on every node of the chain.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use tokio::sync::mpsc;

use neuroshard_client::generate::{
    Finish, GenerateOptions, Generation, LocalPipeline, Pipeline, StepReport,
};
use neuroshard_client::{ClientConfig, SwarmClient};
use neuroshard_model::{ChatTemplate, ModelInfo, Shard, StopStrings, TextStream, TextTokenizer};

use crate::openai::{ApiError, Candidate, Prompt, Request, TokenLogprob, Usage};

/// Where a model's tokens are computed.
#[derive(Debug, Clone)]
pub enum Backend {
    /// Through a swarm found with these settings (the model id is set per model).
    Swarm(Box<ClientConfig>),
    /// The whole model in this process.
    Local,
}

/// How a model computes.
enum Engine {
    Swarm(Arc<SwarmClient>),
    Local(Arc<Shard>),
}

/// A model the API serves: its tokenizer, chat template and engine.
pub struct ServedModel {
    /// The id clients pass: the model directory's name.
    pub name: String,
    /// The model's config and content id.
    pub info: ModelInfo,
    tokenizer: TextTokenizer,
    template: Option<ChatTemplate>,
    engine: Engine,
}

impl std::fmt::Debug for ServedModel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServedModel")
            .field("name", &self.name)
            .field("id", &self.info.id)
            .finish()
    }
}

/// Pieces of one generation, in order.
#[derive(Debug, Clone, PartialEq)]
pub enum Piece {
    /// Text to show (whole characters; never part of a stop string).
    Text(String),
    /// When log-probabilities were asked for: those of the tokens the next text piece (or the
    /// end) shows, every generated token but an end-of-sequence one.
    Tokens(Vec<TokenLogprob>),
    /// The end.
    Done {
        /// `stop` or `length`.
        finish: Finish,
        /// Token counts.
        usage: Usage,
    },
}

/// The sending end of a generation's pieces.
pub type PieceSender = mpsc::Sender<Result<Piece, ApiError>>;

/// The receiving end of a generation's pieces.
pub type PieceReceiver = mpsc::Receiver<Result<Piece, ApiError>>;

/// Text pieces a generation may queue ahead of a slow client.
const PIECES_AHEAD: usize = 32;

/// How long a generation waits for a client that stopped reading before it ends the session
/// (its KV caches on every node and its slot are then freed). A reading client takes a piece
/// in microseconds; 30 s covers a congested link.
const STALLED_CLIENT: std::time::Duration = std::time::Duration::from_secs(30);

impl ServedModel {
    /// Reads the model directory `dir` (config, tokenizer, chat template) and connects its
    /// engine: the swarm that serves this model, or the whole model loaded here.
    pub async fn load(dir: &Path, backend: &Backend) -> Result<Self, ApiError> {
        let info = ModelInfo::read(dir).map_err(|e| ApiError::internal(e.to_string()))?;
        let tokenizer =
            TextTokenizer::for_model_dir(dir).map_err(|e| ApiError::internal(e.to_string()))?;
        let template =
            ChatTemplate::for_model_dir(dir).map_err(|e| ApiError::internal(e.to_string()))?;
        let engine = match backend {
            Backend::Swarm(config) => {
                let mut config = (**config).clone();
                config.model_id = Some(info.id.clone());
                config.model_config = Some(info.config.clone());
                Engine::Swarm(Arc::new(SwarmClient::connect(config).await?))
            }
            Backend::Local => {
                let dir: PathBuf = dir.to_path_buf();
                let shard = tokio::task::spawn_blocking(move || LocalPipeline::load_shard(&dir))
                    .await
                    .map_err(|e| ApiError::internal(e.to_string()))??;
                Engine::Local(Arc::new(shard))
            }
        };
        Ok(Self {
            name: model_name(dir),
            info,
            tokenizer,
            template,
            engine,
        })
    }

    /// Whether the model has a chat template (base models have none).
    pub fn has_chat_template(&self) -> bool {
        self.template.is_some()
    }

    /// Whether a request can be served end to end now (every layer has a provider).
    pub fn available(&self) -> bool {
        match &self.engine {
            Engine::Swarm(client) => client.covers_every_layer(),
            Engine::Local(_) => true,
        }
    }

    /// Whether a request can be served, looking for providers again (the tracker, else the
    /// DHT) when the peers known now do not cover every layer.
    pub async fn ready(&self) -> bool {
        if self.available() {
            return true;
        }
        if let Engine::Swarm(client) = &self.engine
            && let Err(e) = client.refresh().await
        {
            tracing::debug!("refreshing {}: {e}", self.name);
        }
        self.available()
    }

    /// The prompt's token ids: messages through the chat template, text through the tokenizer.
    pub fn prompt_ids(&self, prompt: &Prompt) -> Result<Vec<u32>, ApiError> {
        let bos = self.info.config.bos_token_id;
        let ids = match prompt {
            Prompt::Text(text) => self.tokenizer.encode_prompt(text, bos)?,
            Prompt::Chat(messages) => {
                let template = self.template.as_ref().ok_or_else(|| {
                    ApiError::invalid(
                        "messages",
                        format!("{} has no chat template; use /v1/completions", self.name),
                    )
                })?;
                let text = template
                    .render(messages, true, &Default::default())
                    .map_err(|e| ApiError::invalid("messages", e.to_string()))?;
                self.tokenizer.encode_rendered(&text)?
            }
        };
        if ids.is_empty() {
            return Err(ApiError::invalid("prompt", "the prompt is empty"));
        }
        Ok(ids)
    }

    /// The generation settings of `request` after a prompt of `prompt_len` tokens, checked
    /// against the context length.
    pub fn options(
        &self,
        request: &Request,
        prompt_len: usize,
    ) -> Result<GenerateOptions, ApiError> {
        let context = self.info.config.max_positions();
        let asked = request.max_tokens.unwrap_or(1);
        if prompt_len.saturating_add(asked) > context {
            let param = match (request.max_tokens, &request.prompt) {
                (Some(_), _) => "max_tokens",
                (None, Prompt::Chat(_)) => "messages",
                (None, Prompt::Text(_)) => "prompt",
            };
            return Err(ApiError {
                code: Some("context_length_exceeded"),
                ..ApiError::invalid(
                    param,
                    format!(
                        "{} takes at most {context} tokens; the prompt is {prompt_len} and \
                         {asked} more were asked for",
                        self.name
                    ),
                )
            });
        }
        Ok(GenerateOptions {
            // Without max_tokens, up to the context's end (an end-of-sequence token comes first).
            max_new_tokens: request.max_tokens.unwrap_or(context - prompt_len),
            stop_ids: self.info.config.eos_token_ids.clone(),
            sampling: request.sampling,
            candidates: request.logprobs.unwrap_or(0),
        })
    }

    /// Starts `request` on this model: checks that a chain covers it, the prompt and the
    /// context, then runs the generation in a task of its own. Its pieces come on the returned
    /// receiver, with the prompt's token count; dropping the receiver ends the session.
    pub async fn start(
        self: &Arc<Self>,
        request: &Request,
    ) -> Result<(PieceReceiver, usize), ApiError> {
        if !self.ready().await {
            return Err(ApiError::unavailable(format!(
                "no chain of peers covers every layer of {} right now",
                self.name
            )));
        }
        let prompt = self.prompt_ids(&request.prompt)?;
        let options = self.options(request, prompt.len())?;
        let (tx, rx) = Self::channel();
        let prompt_tokens = prompt.len();
        let asked = Asked {
            stop: request.stop.clone(),
            logprobs: request.logprobs,
        };
        tokio::spawn(self.clone().generate(prompt, options, asked, tx));
        Ok((rx, prompt_tokens))
    }

    /// Runs a generation, sending its pieces to `tx`; returns when it ends or the receiver is
    /// gone (the session is closed either way).
    pub async fn generate(
        self: Arc<Self>,
        prompt: Vec<u32>,
        options: GenerateOptions,
        asked: Asked,
        tx: PieceSender,
    ) {
        let result = match &self.engine {
            Engine::Swarm(client) => {
                let mut session = client.session();
                let result = self.run(&mut session, &prompt, &options, &asked, &tx).await;
                session.close().await;
                result
            }
            Engine::Local(shard) => {
                // The local model computes on the calling thread: keep it off the reactor.
                let shard = shard.clone();
                let model = self.clone();
                let tx = tx.clone();
                let handle = tokio::runtime::Handle::current();
                tokio::task::spawn_blocking(move || {
                    let mut pipeline = LocalPipeline::new(shard);
                    handle.block_on(model.run(&mut pipeline, &prompt, &options, &asked, &tx))
                })
                .await
                .unwrap_or_else(|e| Err(ApiError::internal(e.to_string())))
            }
        };
        if let Err(e) = result {
            let _ = tx.send_timeout(Err(e), STALLED_CLIENT).await;
        }
    }

    async fn run<P: Pipeline>(
        &self,
        pipeline: &mut P,
        prompt: &[u32],
        options: &GenerateOptions,
        asked: &Asked,
        tx: &PieceSender,
    ) -> Result<(), ApiError> {
        let mut generation = Generation::new(prompt, options)?;
        let mut stream = TextStream::new(&self.tokenizer);
        let mut stops = StopStrings::new(&asked.stop);
        let mut stopped = false;
        let mut logprobs = Vec::new();
        loop {
            let (token, logprob) = tokio::select! {
                step = generation.step(pipeline) => match step? {
                    Some(step) => (step.token, asked.logprobs.map(|top| self.logprob(step, top))),
                    None => break,
                },
                () = tx.closed() => return Ok(()),
            };
            // An end-of-sequence token is not text.
            if options.stop_ids.contains(&token) {
                continue;
            }
            logprobs.extend(logprob);
            let (shown, stop) = stops.push(&stream.push(token)?);
            if !shown.is_empty() && !deliver_text(tx, shown, &mut logprobs).await {
                return Ok(());
            }
            if stop {
                generation.stop();
                stopped = true;
            }
        }
        if !stopped {
            let (shown, stop) = stops.push(&stream.finish()?);
            let tail = if stop { shown } else { shown + &stops.finish() };
            if !tail.is_empty() && !deliver_text(tx, tail, &mut logprobs).await {
                return Ok(());
            }
        }
        if !logprobs.is_empty() && !deliver(tx, Piece::Tokens(logprobs)).await {
            return Ok(());
        }
        let completion = generation.generated().len();
        let done = Piece::Done {
            finish: generation.finish().unwrap_or(Finish::Length),
            usage: Usage {
                prompt_tokens: prompt.len(),
                completion_tokens: completion,
                total_tokens: prompt.len() + completion,
            },
        };
        deliver(tx, done).await;
        Ok(())
    }

    /// A generated token's log-probability and its `top` best alternatives.
    fn logprob(&self, step: &StepReport, top: usize) -> TokenLogprob {
        let candidate = |id, logit: f32| Candidate {
            bytes: self.tokenizer.token_bytes(id),
            logprob: logit - step.logsumexp,
        };
        TokenLogprob {
            chosen: candidate(step.token, step.logit),
            top: step
                .top
                .iter()
                .take(top)
                .map(|&(id, l)| candidate(id, l))
                .collect(),
        }
    }

    /// A channel for one generation's pieces.
    pub fn channel() -> (PieceSender, PieceReceiver) {
        mpsc::channel(PIECES_AHEAD)
    }
}

/// What a request asks of its text besides the generation's options.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Asked {
    /// Texts that end the generation (not shown).
    pub stop: Vec<String>,
    /// Log-probabilities, with this many alternatives at each token.
    pub logprobs: Option<usize>,
}

/// Hands `text` to the client's stream, after the log-probabilities of the tokens that made
/// it, if any; false when the client left or stopped reading.
async fn deliver_text(tx: &PieceSender, text: String, logprobs: &mut Vec<TokenLogprob>) -> bool {
    if !logprobs.is_empty() && !deliver(tx, Piece::Tokens(std::mem::take(logprobs))).await {
        return false;
    }
    deliver(tx, Piece::Text(text)).await
}

/// Hands `piece` to the client's stream; false when the client left or stopped reading.
async fn deliver(tx: &PieceSender, piece: Piece) -> bool {
    match tx.send_timeout(Ok(piece), STALLED_CLIENT).await {
        Ok(()) => true,
        Err(mpsc::error::SendTimeoutError::Timeout(_)) => {
            tracing::info!("a client stopped reading for {STALLED_CLIENT:?}; ending its session");
            false
        }
        Err(mpsc::error::SendTimeoutError::Closed(_)) => false,
    }
}

/// The name a model is served under: its directory's name.
fn model_name(dir: &Path) -> String {
    dir.canonicalize()
        .ok()
        .as_deref()
        .unwrap_or(dir)
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "model".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_client_that_stops_reading_ends_the_generation_after_a_bound() {
        let (tx, rx) = mpsc::channel(1);
        assert!(deliver(&tx, Piece::Text("a".into())).await, "room for one");
        let started = tokio::time::Instant::now();
        assert!(!deliver(&tx, Piece::Text("b".into())).await, "nobody reads");
        assert_eq!(started.elapsed(), STALLED_CLIENT);
        drop(rx);
        assert!(
            !deliver(&tx, Piece::Text("c".into())).await,
            "the client left"
        );
    }
}
