//! The chat page and the loopback API. Both run `neuroshard-api`'s request path (the
//! OpenAI-shaped request checks, the chat template, sampling, one swarm session per answer)
//! over the swarm this app is part of; the page gets the answer's pieces over a Tauri channel,
//! local tools over HTTP on loopback.

use neuroshard_base::sync::LockExt;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use neuroshard_api::engine::PieceReceiver;
use neuroshard_api::openai::{Prompt, Request};
use neuroshard_api::{ApiConfig, ApiError, ApiServer, Backend, Piece, ServedModel, Usage};
use neuroshard_client::ClientConfig;
use neuroshard_client::generate::Finish;
use neuroshard_model::ModelInfo;
use serde::Serialize;
use serde_json::Value;
use tokio::sync::oneshot;

use crate::desktop::{CommandError, Desktop};
use crate::models::{ModelAbout, SwarmModel, swarm_models};

/// How long the model list waits for a peer to say what a model is.
const ABOUT_TIMEOUT: Duration = Duration::from_secs(3);

/// The chat page's models and the loopback API server.
#[derive(Debug, Default)]
pub struct Chats {
    /// Models chatted with, by content id, each with its swarm client.
    served: tokio::sync::Mutex<HashMap<String, Arc<ServedModel>>>,
    /// What each model id's config says, once read.
    about: Mutex<HashMap<String, ModelAbout>>,
    /// The API server, with the port and model it serves.
    api: tokio::sync::Mutex<Option<(ApiServer, u16, String)>>,
    /// What the status shows of the API: its URL, or why it is not serving.
    api_shown: Mutex<(Option<String>, Option<String>)>,
    /// Answers being written, by the page's id for each, with the way to stop one.
    running: Mutex<HashMap<String, oneshot::Sender<()>>>,
}

/// A piece of a chat answer, as the page receives it.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum ChatEvent {
    /// More of the answer.
    Text {
        /// Whole characters, never part of a stop string.
        text: String,
    },
    /// The end of the answer.
    Done {
        /// `stop` (an end-of-sequence token or stop string) or `length`.
        finish: &'static str,
        /// Token counts.
        usage: Usage,
        /// The messages went through the model's chat template; false: the model has none
        /// and continued the last message as text.
        templated: bool,
    },
}

impl Chats {
    /// Forgets the swarm clients: the model or the way to the swarm changed.
    pub async fn model_changed(&self) {
        self.served.lock().await.clear();
    }

    /// Where the API answers, when it serves.
    pub fn api_url(&self) -> Option<String> {
        self.api_shown.lock_or_recover().0.clone()
    }

    /// Why the API is not serving though it is turned on.
    pub fn api_error(&self) -> Option<String> {
        self.api_shown.lock_or_recover().1.clone()
    }

    /// Stops the API server, if one runs.
    pub async fn stop_api(&self) {
        if let Some((server, _, _)) = self.api.lock().await.take() {
            server.shutdown().await;
        }
        *self.api_shown.lock_or_recover() = (None, None);
    }
}

impl Desktop {
    /// The models the swarm announces, with their coverage and what their configs say (read
    /// from disk, else asked of a provider once).
    pub async fn swarm_models(&self) -> Vec<SwarmModel> {
        let settings = self.settings();
        let peers = self.swarm_peers(&settings, None).await;
        let mut models = swarm_models(&peers);
        let own = self.model();
        for model in &mut models {
            let known = self.chats.about.lock_or_recover().get(&model.id).cloned();
            let about = match known {
                Some(about) => Some(about),
                None if model.id == own.id => Some(ModelAbout::of(&own.config)),
                None => {
                    let peer = peers
                        .iter()
                        .find(|p| p.model_id == model.id && !p.is_relayed());
                    match peer {
                        Some(peer) => {
                            let asked = neuroshard_client::checkpoint::peer_model_config(
                                &peer.addr, &model.id,
                            );
                            match tokio::time::timeout(ABOUT_TIMEOUT, asked).await {
                                Ok(Ok(config)) => Some(ModelAbout::of(&config)),
                                Ok(Err(e)) => {
                                    tracing::debug!("what model {} is: {e}", model.id);
                                    None
                                }
                                Err(_) => None,
                            }
                        }
                        None => None,
                    }
                }
            };
            if let Some(about) = &about {
                self.chats
                    .about
                    .lock_or_recover()
                    .insert(model.id.clone(), about.clone());
            }
            model.about = about;
        }
        models
    }

    /// Starts a chat answer: `body` is an OpenAI chat completion request whose `model` is a
    /// swarm model's id. A model without a chat template (a base model such as the demo)
    /// continues the last user message as plain text instead; the flag says which was done.
    /// The pieces come on the receiver; dropping it ends the session on every node of its
    /// chain.
    pub async fn chat(&self, body: &Value) -> Result<(PieceReceiver, bool), CommandError> {
        let mut request = Request::chat(body)?;
        let model = self.served_model(&request.model).await?;
        let templated = model.has_chat_template();
        if !templated && let Prompt::Chat(messages) = &request.prompt {
            let last = messages.iter().rev().find(|m| m.role == "user");
            request.prompt = Prompt::Text(last.map(|m| m.content.clone()).unwrap_or_default());
        }
        let (pieces, _) = model.start(&request).await?;
        Ok((pieces, templated))
    }

    /// Writes the answer to `body` (see [`Desktop::chat`]), handing each piece to `emit` as it
    /// comes, until the end, [`Desktop::stop_chat`] with the same `id`, or `emit` saying the
    /// page is gone (false); either of those ends the session at once.
    pub async fn run_chat(
        &self,
        id: &str,
        body: &Value,
        mut emit: impl FnMut(ChatEvent) -> bool,
    ) -> Result<(), CommandError> {
        let (mut pieces, templated) = self.chat(body).await?;
        let (stop, mut stopped) = oneshot::channel();
        self.chats
            .running
            .lock_or_recover()
            .insert(id.to_string(), stop);
        let result = loop {
            let piece = tokio::select! {
                piece = pieces.recv() => piece,
                _ = &mut stopped => break Ok(()),
            };
            match piece {
                Some(Ok(Piece::Text(text))) => {
                    if !emit(ChatEvent::Text { text }) {
                        break Ok(());
                    }
                }
                // Log-probabilities come only when asked for; the chat page does not ask.
                Some(Ok(Piece::Tokens(_))) => {}
                Some(Ok(Piece::Done { finish, usage })) => {
                    let finish = match finish {
                        Finish::Stop => "stop",
                        Finish::Length => "length",
                    };
                    emit(ChatEvent::Done {
                        finish,
                        usage,
                        templated,
                    });
                    break Ok(());
                }
                Some(Err(e)) => break Err(e.into()),
                None => break Err(ApiError::internal("the answer ended without a result").into()),
            }
        };
        self.chats.running.lock_or_recover().remove(id);
        result
    }

    /// Stops the answer `id` is writing; false when none is.
    pub fn stop_chat(&self, id: &str) -> bool {
        let stop = self.chats.running.lock_or_recover().remove(id);
        stop.is_some_and(|s| s.send(()).is_ok())
    }

    /// The model `id` with a swarm client, loaded once: the model this node serves, or
    /// another the swarm serves (its small files fetched from a peer first).
    async fn served_model(&self, id: &str) -> Result<Arc<ServedModel>, CommandError> {
        let mut served = self.chats.served.lock().await;
        if let Some(model) = served.get(id) {
            return Ok(model.clone());
        }
        let own = self.model();
        let dir = if own.id == id {
            own.dir
        } else {
            if !neuroshard_settings::is_model_id(id) {
                return Err(ApiError::unknown_model(id).into());
            }
            let dir = self.launch.data_dir.join("models").join(id);
            if ModelInfo::read(&dir).is_ok_and(|m| m.id == id) {
                dir
            } else {
                let peers = self.swarm_peers(&self.settings(), Some(id)).await;
                let peer = peers.first().ok_or_else(|| ApiError::unknown_model(id))?;
                neuroshard_client::checkpoint::fetch_model_files(&peer.addr, id, &dir)
                    .await
                    .map_err(|e| CommandError {
                        code: "model",
                        message: format!("fetching model {id}'s files: {e}"),
                        field: None,
                    })?;
                dir
            }
        };
        let model = Arc::new(ServedModel::load(&dir, &self.backend().await).await?);
        served.insert(id.to_string(), model.clone());
        Ok(model)
    }

    /// The swarm as this app finds it: its tracker or bootstrap peers, the LAN, and its own
    /// node (so a swarm of this machine alone still answers).
    async fn backend(&self) -> Backend {
        let settings = self.settings();
        let mut config = ClientConfig::with_bootstrap(settings.network.bootstrap.clone());
        config.tracker = settings.network.tracker.clone();
        config.discovery.lan = self.launch.lan.clone();
        if let Some(addr) = self.node_addr().await {
            let addr = match addr.ip().is_unspecified() {
                true => SocketAddr::from(([127, 0, 0, 1], addr.port())),
                false => addr,
            };
            config.bootstrap.push(addr.to_string());
        }
        Backend::Swarm(Box::new(config))
    }

    /// Serves the OpenAI-compatible API on loopback while the settings turn it on, for the
    /// model this node serves; restarts it when the port or the model changes.
    pub async fn sync_api(&self) {
        let settings = self.settings();
        let model = self.model();
        let mut api = self.chats.api.lock().await;
        let wanted = settings
            .api
            .enabled
            .then_some((settings.api.port, model.id.clone()));
        let running = api.as_ref().map(|(_, port, id)| (*port, id.clone()));
        if running == wanted {
            return;
        }
        if let Some((server, _, _)) = api.take() {
            server.shutdown().await;
        }
        let Some((port, _)) = wanted else {
            *self.chats.api_shown.lock_or_recover() = (None, None);
            drop(api);
            self.refresh().await;
            return;
        };
        let started = async {
            let served = ServedModel::load(&model.dir, &self.backend().await).await?;
            let config = ApiConfig {
                listen: SocketAddr::from(([127, 0, 0, 1], port)),
                ..ApiConfig::default()
            };
            neuroshard_api::start_api(config, vec![served]).await
        }
        .await;
        let shown = match started {
            Ok(server) => {
                let url = format!("http://{}/v1", server.addr);
                tracing::info!("the OpenAI-compatible API answers at {url}");
                *api = Some((server, port, model.id.clone()));
                (Some(url), None)
            }
            Err(e) => {
                tracing::warn!("the API is not serving: {}", e.message);
                (None, Some(e.message))
            }
        };
        *self.chats.api_shown.lock_or_recover() = shown;
        drop(api);
        self.refresh().await;
    }
}
