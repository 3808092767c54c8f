//! What this machine contributes (`neuroshard bench`): decode tokens per second over a model's
//! layers at a short and a long context, on the compute threads a node would use, and the
//! overhead of one hop to a peer (the wall time of a Forward minus the compute the peer
//! reports). An owner sees what their node adds; the figures are the capability a router can
//! plan with.

use std::ops::Range;
use std::path::Path;
use std::time::{Duration, Instant};

use neuroshard_model::codec::{self, WireDType};
use neuroshard_model::{KvCache, Shard, ShardInput};
use neuroshard_net::NodeError;
use neuroshard_net::convert::{peer_from_proto, span_to_proto, tensor_to_proto};
use neuroshard_net::pool::Target;
use neuroshard_proto as pb;

use crate::threads::ComputeThreads;

/// Tokens a prefill runs per call, as a client sends them.
const PREFILL_CHUNK: usize = 512;

/// Decode speed at one context length.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct DecodeFigure {
    /// Positions already held when each measured token runs.
    pub context: usize,
    /// Mean time of one decode step, ms.
    pub ms_per_token: f64,
    /// Decode steps per second.
    pub tokens_per_s: f64,
}

/// A hop's cost to a peer.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct HopFigure {
    /// The peer's address.
    pub peer: String,
    /// The layers it ran.
    pub layers: String,
    /// Decode calls timed.
    pub calls: u32,
    /// Mean wall time of a call, ms.
    pub wall_ms: f64,
    /// Mean compute the peer reported, ms.
    pub compute_ms: f64,
    /// Mean wall minus compute: network, TLS, HTTP/2 and codecs, ms.
    pub overhead_ms: f64,
}

/// Decode tokens per second over `layers` of `shard` at each of `contexts`, `steps` steps
/// each, on `threads`. Each step runs one token at position `context` (the cache is cut back
/// to it between steps), so every step attends over exactly `context` positions.
pub fn decode_speed(
    shard: &Shard,
    layers: Range<usize>,
    contexts: &[usize],
    steps: u32,
    threads: &ComputeThreads,
) -> Result<Vec<DecodeFigure>, NodeError> {
    let input = |tokens: usize| made_up_input(shard, &layers, tokens);
    let mut figures = Vec::with_capacity(contexts.len());
    for &context in contexts {
        let mut cache = KvCache::new();
        let mut pos = 0;
        while pos < context {
            let n = (context - pos).min(PREFILL_CHUNK);
            threads.install(|| shard.forward(&mut cache, pos, layers.clone(), input(n)))?;
            pos += n;
        }
        // One step first: a backend's kernels and buffers are ready before the clock runs.
        threads.install(|| shard.forward(&mut cache, context, layers.clone(), input(1)))?;
        let started = Instant::now();
        for _ in 0..steps.max(1) {
            threads.install(|| shard.forward(&mut cache, context, layers.clone(), input(1)))?;
        }
        let ms = started.elapsed().as_secs_f64() * 1000.0 / f64::from(steps.max(1));
        figures.push(DecodeFigure {
            context,
            ms_per_token: ms,
            tokens_per_s: 1000.0 / ms,
        });
    }
    Ok(figures)
}

/// Decode speed of several sessions stepped together.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct BatchFigure {
    /// Sessions in each step.
    pub sessions: usize,
    /// Mean time of one step of every session, ms.
    pub ms_per_step: f64,
    /// Tokens per second over all sessions.
    pub tokens_per_s: f64,
}

/// Decode tokens per second over `layers` of `shard` with each of `batches` sessions stepped
/// together (`Shard::forward_batch`, as a node batches the steps that meet), each session
/// holding `context` positions, `steps` steps each, on `threads`: what a node could reach
/// with no network and no clients, the bound of a swarm's aggregate.
pub fn batched_speed(
    shard: &Shard,
    layers: Range<usize>,
    (context, batches): (usize, &[usize]),
    steps: u32,
    threads: &ComputeThreads,
) -> Result<Vec<BatchFigure>, NodeError> {
    let input = |tokens: usize| made_up_input(shard, &layers, tokens);
    let mut figures = Vec::with_capacity(batches.len());
    for &sessions in batches {
        let mut caches: Vec<KvCache> = (0..sessions.max(1)).map(|_| KvCache::new()).collect();
        for cache in caches.iter_mut().filter(|_| context > 0) {
            threads.install(|| shard.forward(cache, 0, layers.clone(), input(context)))?;
        }
        let step = |caches: &mut Vec<KvCache>| {
            let items = caches.iter_mut().map(|cache| neuroshard_model::BatchItem {
                cache,
                start_pos: context,
                input: input(1),
            });
            let items = items.collect();
            threads
                .install(|| shard.forward_batch(layers.clone(), items))
                .into_iter()
                .collect::<Result<Vec<_>, _>>()
        };
        step(&mut caches)?;
        let started = Instant::now();
        for _ in 0..steps.max(1) {
            step(&mut caches)?;
        }
        let ms = started.elapsed().as_secs_f64() * 1000.0 / f64::from(steps.max(1));
        figures.push(BatchFigure {
            sessions: caches.len(),
            ms_per_step: ms,
            tokens_per_s: 1000.0 * caches.len() as f64 / ms,
        });
    }
    Ok(figures)
}

/// `tokens` made-up tokens into `layers`: ids into the first layer, hidden states into any
/// other.
fn made_up_input(shard: &Shard, layers: &Range<usize>, tokens: usize) -> ShardInput {
    match layers.start {
        0 => ShardInput::Tokens(vec![1; tokens]),
        _ => ShardInput::Hidden(vec![0.01; tokens * shard.info().config.hidden_size]),
    }
}

/// Positions held when a node measures its decode speed at start, and the steps timed: a
/// short context, so the figure is the weights' cost, and a fraction of a second on a CPU.
const STARTUP_CONTEXT: usize = 32;
const STARTUP_STEPS: u32 = 4;

/// Layers a node times at start: its layers cost alike, so two give the figure per layer
/// without making a node of many large layers wait on all of them before it serves.
const STARTUP_LAYERS: usize = 2;

/// Of the calls a node serves, the weight a new decode call's time gets in its figure.
const SMOOTHING: f32 = 0.125;

/// A node's decode compute per token per layer, ms: what it announces
/// (`PeerInfo.decode_ms_per_layer`) for routers to plan with before they have timed it. It is
/// measured on the served shard at start, as `neuroshard bench` measures, then follows the
/// one-token calls the node serves. 0 until measured.
#[derive(Debug, Default)]
pub struct DecodeSpeed(std::sync::Mutex<f32>);

impl DecodeSpeed {
    /// Measures the first of `layers` of `shard` (at most [`STARTUP_LAYERS`]) on `threads`: a
    /// short decode, as [`decode_speed`] runs it.
    pub fn measure(
        &self,
        shard: &Shard,
        layers: Range<usize>,
        threads: &ComputeThreads,
    ) -> Result<f32, NodeError> {
        let layers = layers.start..layers.end.min(layers.start + STARTUP_LAYERS);
        let count = layers.len().max(1) as f64;
        let figures = decode_speed(shard, layers, &[STARTUP_CONTEXT], STARTUP_STEPS, threads)?;
        let ms = figures.first().map_or(0.0, |f| f.ms_per_token / count) as f32;
        *self.lock() = ms;
        Ok(ms)
    }

    /// Folds in a one-token call over `layers` layers that took `compute`.
    pub fn observe(&self, compute: Duration, layers: usize) {
        let ms = compute.as_secs_f32() * 1000.0 / layers.max(1) as f32;
        let mut figure = self.lock();
        *figure = match *figure {
            0.0 => ms,
            old => old + SMOOTHING * (ms - old),
        };
    }

    /// The figure now, ms per token per layer (0: not measured).
    pub fn ms_per_layer(&self) -> f32 {
        *self.lock()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, f32> {
        self.0
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// Loads `layers` of the model in `dir` as a local run does, held at `precision`: on the
/// default device, warmed up off the CPU.
pub fn load(
    dir: &Path,
    layers: Range<usize>,
    precision: neuroshard_model::Precision,
) -> Result<Shard, NodeError> {
    neuroshard_client::generate::LocalPipeline::load_layers(dir, layers, precision)
}

/// The overhead of a decode hop to the node at `peer`, which serves a model of width `hidden`:
/// asks what it serves, runs a one-token prefill, then `calls` one-token decode calls of its
/// whole range, and ends the session.
pub async fn hop_overhead(
    peer: &Target,
    hidden: usize,
    calls: u32,
) -> Result<HopFigure, NodeError> {
    let dialler = neuroshard_net::tls::Dialler::ephemeral()?;
    let channel = neuroshard_net::pool::connect(peer, &dialler, Duration::from_secs(10)).await?;
    let mut client = pb::node_client::NodeClient::new(channel);
    let remote = |status| NodeError::Remote {
        peer: peer.addr.clone(),
        status,
    };
    let ping = client.ping(pb::PingRequest {}).await.map_err(remote)?;
    let info = ping
        .into_inner()
        .node
        .ok_or_else(|| NodeError::BadRequest(format!("{peer} did not say what it serves")))?;
    let info = peer_from_proto(info)?;
    let session = format!("bench-{:016x}", rand::random::<u64>());
    let request = |pos: u64| pb::ForwardRequest {
        session_id: session.clone(),
        start_pos: pos,
        layers: Some(span_to_proto(info.layers)),
        input: Some(match info.layers.start {
            0 => pb::forward_request::Input::Tokens(pb::TokenIds { ids: vec![1] }),
            _ => pb::forward_request::Input::Hidden(tensor_to_proto(codec::encode(
                &vec![0.01; hidden],
                &[1, 1, hidden],
                WireDType::F16,
            ))),
        }),
        model_id: info.model_id.clone(),
        reply_dtype: pb::Dtype::F16 as i32,
        ..Default::default()
    };
    client.forward(request(0)).await.map_err(remote)?;
    let (mut wall, mut compute) = (Duration::ZERO, Duration::ZERO);
    for _ in 0..calls.max(1) {
        let started = Instant::now();
        let reply = client.forward(request(1)).await.map_err(remote)?;
        wall += started.elapsed();
        compute += Duration::from_micros(reply.into_inner().compute_us);
    }
    let end = pb::EndSessionRequest {
        session_id: session,
    };
    let _ = client.end_session(end).await;
    let per = |d: Duration| d.as_secs_f64() * 1000.0 / f64::from(calls.max(1));
    Ok(HopFigure {
        peer: peer.addr.clone(),
        layers: info.layers.to_string(),
        calls: calls.max(1),
        wall_ms: per(wall),
        compute_ms: per(compute),
        overhead_ms: per(wall.saturating_sub(compute)),
    })
}
