//! A session over a chain of peers: each step runs hop by hop, a hop that fails or misses its
//! deadline is replaced and the span's inputs replayed to the replacement at the same
//! positions, and every reply's receipt is settled (`settle`) before the next step.

use super::*;
use neuroshard_base::sync::LockExt;

/// What a hop is sent.
#[derive(Debug, Clone)]
pub(super) enum HopInput {
    Tokens(Vec<u32>),
    Hidden(WireTensor),
}

impl HopInput {
    pub(super) fn tokens(&self) -> usize {
        match self {
            Self::Tokens(ids) => ids.len(),
            Self::Hidden(t) => t.shape.get(1).copied().unwrap_or(0),
        }
    }

    /// SHA-256 of the input as sent (what the worker hashes on receipt).
    pub(super) fn hash(&self) -> [u8; 32] {
        match self {
            Self::Tokens(ids) => tokens_hash(ids),
            Self::Hidden(t) => tensor_hash(t),
        }
    }

    pub(super) fn to_shard_input(&self) -> Result<ShardInput, NodeError> {
        Ok(match self {
            Self::Tokens(ids) => ShardInput::Tokens(ids.clone()),
            Self::Hidden(t) => ShardInput::Hidden(codec::decode(t)?),
        })
    }

    pub(super) fn to_proto(&self) -> pb::forward_request::Input {
        match self {
            Self::Tokens(ids) => {
                pb::forward_request::Input::Tokens(pb::TokenIds { ids: ids.clone() })
            }
            Self::Hidden(t) => pb::forward_request::Input::Hidden(tensor_to_proto(t.clone())),
        }
    }
}

/// What a hop returns.
pub(super) enum HopOutput {
    Hidden(WireTensor),
    Logits(Vec<f32>),
    /// The token the last hop chose from its logits (the call carried a sampler).
    Chosen(Chosen),
}

/// What the chain ends with: the last token's logits, or the token chosen after it.
#[derive(Debug, Clone, PartialEq)]
pub(super) enum Last {
    Logits(Vec<f32>),
    Chosen(Chosen),
}

impl HopOutput {
    /// The row the worker fingerprinted: the last token's hidden state, or the logits.
    pub(super) fn last_row(&self) -> Result<Vec<f32>, NodeError> {
        match self {
            Self::Hidden(t) => {
                let width = t.shape.last().copied().unwrap_or(0);
                let values = codec::decode(t)?;
                Ok(values[values.len().saturating_sub(width)..].to_vec())
            }
            Self::Logits(values) => Ok(values.clone()),
            Self::Chosen(_) => Err(NodeError::BadRequest(
                "a chosen token has no row; its receipt fingerprints the logits".into(),
            )),
        }
    }
}

/// Latency figures of one hop over a session.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct HopTiming {
    /// Node id of the peer.
    pub node_id: NodeId,
    /// Its address.
    pub addr: String,
    /// Layers it ran.
    pub layers: String,
    /// Calls made (replays included).
    pub calls: u64,
    /// Wall time of those calls, ms.
    pub total_ms: f64,
    /// Compute the peer reported, ms.
    pub compute_ms: f64,
}

impl HopTiming {
    /// Mean wall time of a call, ms.
    pub fn mean_ms(&self) -> f64 {
        self.total_ms / self.calls.max(1) as f64
    }

    /// Mean network-and-codec overhead of a call (wall minus compute), ms.
    pub fn mean_overhead_ms(&self) -> f64 {
        (self.total_ms - self.compute_ms) / self.calls.max(1) as f64
    }
}

/// A Forward reply's output, decoded; its hash goes into `expected`. `sampler`: what the call
/// asked the last hop to choose with, if it did; `vocab`: the model's.
fn hop_output(
    output: Option<pb::forward_response::Output>,
    expected: &mut Expectation,
    sampler: Option<&Sampler>,
    vocab: usize,
) -> Result<HopOutput, NodeError> {
    use pb::forward_response::Output;
    match output {
        Some(Output::Sampled(s)) => {
            let top = sampler.map(Sampler::top).ok_or_else(|| {
                NodeError::BadRequest("a chosen token came back, none was asked for".into())
            })?;
            let chosen = chosen_from_proto(s, vocab, top)?;
            expected.output_hash = chosen_hash(&chosen);
            Ok(HopOutput::Chosen(chosen))
        }
        Some(Output::Hidden(t)) => {
            let tensor = tensor_from_proto(t)?;
            expected.output_hash = tensor_hash(&tensor);
            Ok(HopOutput::Hidden(tensor))
        }
        Some(Output::Logits(t)) => {
            let tensor = tensor_from_proto(t)?;
            expected.output_hash = tensor_hash(&tensor);
            Ok(HopOutput::Logits(codec::decode(&tensor)?))
        }
        Some(Output::Loss(_)) | None => Err(NodeError::BadRequest(
            "the reply holds neither hidden states, logits nor a token".into(),
        )),
    }
}

/// One generation over the swarm.
#[derive(Debug)]
pub struct SwarmSession<'c> {
    pub(super) client: &'c SwarmClient,
    pub(super) id: String,
    /// The chain and its replay logs; it decides what each reply or failure leads to.
    pub(super) chain: Chain<HopInput, Last, NodeError>,
    pub(super) timings: BTreeMap<(LayerRange, NodeId), HopTiming>,
    /// How the last hop chooses the token of the step in progress; none: it returns logits.
    pub(super) sampler: Option<Sampler>,
}

impl SwarmSession<'_> {
    /// The session id peers key their caches on.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The current chain.
    pub fn chain(&self) -> Vec<Hop> {
        self.chain.hops().cloned().collect()
    }

    /// Per-hop latency, ordered by layer.
    pub fn timings(&self) -> Vec<HopTiming> {
        self.timings.values().cloned().collect()
    }

    /// Failovers that happened, as readable lines.
    pub fn events(&self) -> &[String] {
        self.chain.events()
    }

    /// Runs the new tokens at `start_pos` through the whole chain; logits of the last one.
    /// Long inputs go in chunks of [`PREFILL_CHUNK_TOKENS`].
    pub async fn forward(&mut self, start_pos: usize, ids: &[u32]) -> Result<Vec<f32>, NodeError> {
        self.sampler = None;
        match self.run(start_pos, ids).await? {
            Last::Logits(logits) => Ok(logits),
            Last::Chosen(_) => Err(NodeError::BadRequest(
                "the last hop chose a token; logits were asked for".into(),
            )),
        }
    }

    /// Runs the new tokens at `start_pos` through the whole chain, and has the last hop choose
    /// the token after them as `sampler` says: a few bytes back instead of the vocabulary's
    /// logits.
    pub async fn forward_choosing(
        &mut self,
        start_pos: usize,
        ids: &[u32],
        sampler: &Sampler,
    ) -> Result<Chosen, NodeError> {
        self.sampler = Some(sampler.clone());
        let last = self.run(start_pos, ids).await;
        self.sampler = None;
        match last? {
            Last::Chosen(chosen) => Ok(chosen),
            // A node of an earlier version ignores the sampler: the token is chosen here.
            Last::Logits(logits) => Ok(sampler.choose(&logits, (start_pos + ids.len()) as u64)?),
        }
    }

    async fn run(&mut self, start_pos: usize, ids: &[u32]) -> Result<Last, NodeError> {
        if ids.is_empty() {
            return Err(NodeError::BadRequest("no tokens to run".into()));
        }
        if self.chain.links().is_empty() && self.chain.broken().is_none() {
            let all = LayerRange::new(0, self.client.total_layers)
                .map_err(|e| NodeError::NoRoute(e.to_string()))?;
            let hops = self.plan_or_refresh(all, ids.len()).await?;
            self.chain.set_hops(hops);
        }
        let mut last = Last::Logits(Vec::new());
        for (n, chunk) in ids.chunks(PREFILL_CHUNK_TOKENS).enumerate() {
            let pos = start_pos + n * PREFILL_CHUNK_TOKENS;
            last = self.step(pos, HopInput::Tokens(chunk.to_vec())).await?;
        }
        Ok(last)
    }

    /// Drives the chain through one input: makes the calls and plans it asks for, and feeds
    /// their results back until it is done or fails.
    async fn step(&mut self, pos: usize, input: HopInput) -> Result<Last, NodeError> {
        let mut action = self.chain.start(pos, input);
        loop {
            let logged = self.chain.events().len();
            action = match action {
                Action::Call {
                    hop,
                    pos,
                    input,
                    patient,
                } => {
                    let result = match self.call(hop, pos, &input, patient).await {
                        Ok((output, receipt)) => self
                            .settle_hop(hop, pos, &input, &output, receipt)
                            .await
                            .map(|()| output),
                        Err(err) => Err(err),
                    };
                    match result {
                        Ok(HopOutput::Hidden(t)) => {
                            self.chain.replied(Reply::Hidden(HopInput::Hidden(t)))
                        }
                        Ok(HopOutput::Logits(l)) => {
                            self.chain.replied(Reply::Logits(Last::Logits(l)))
                        }
                        Ok(HopOutput::Chosen(c)) => {
                            self.chain.replied(Reply::Logits(Last::Chosen(c)))
                        }
                        Err(err) => self.chain.failed(fault_of(&err), err),
                    }
                }
                Action::Replace { hop, span, stale } => {
                    let plan = self.replace(hop, span, stale).await;
                    self.chain.replanned(plan)
                }
                Action::Wait { hop, pause } => {
                    let addr = &self.chain.links()[hop].hop.addr;
                    self.client.router.lock_or_recover().lift_ban(addr);
                    tokio::time::sleep(pause).await;
                    self.chain.resume()
                }
                Action::Done(logits) => return Ok(logits),
                Action::Fail(err) => return Err(err),
            };
            for event in &self.chain.events()[logged..] {
                tracing::warn!("{event}");
            }
        }
    }

    pub(super) async fn plan_or_refresh(
        &self,
        span: LayerRange,
        tokens: usize,
    ) -> Result<Vec<Hop>, NodeError> {
        if let Some(hops) = self.client.plan(span, tokens) {
            return Ok(hops);
        }
        self.client.refresh().await?;
        self.client
            .plan(span, tokens)
            .ok_or_else(|| NodeError::NoRoute(format!("no live peers cover layers {span}")))
    }

    /// Counts hop `i`'s failure against its peer (or, for a stale listing, forgets the peer
    /// and reads the listing again), then plans the hop's span anew.
    async fn replace(&mut self, i: usize, span: LayerRange, stale: bool) -> Replan<NodeError> {
        let hop = self.chain.links()[i].hop.clone();
        let addr = hop.addr.clone();
        {
            let mut router = self.client.router.lock_or_recover();
            if stale {
                // Not a failure: the peer serves other layers now. It is planned around until
                // the listing, read again below, says what it serves.
                router.forget(&addr);
            } else {
                router.record_failure(&addr, Instant::now());
            }
            self.client.update_peer_gauges(&router);
        }
        if stale {
            if let Err(e) = self.client.refresh().await {
                tracing::debug!("reading the peers again: {e}");
            }
        } else {
            self.client.pool.evict(&hop.target());
        }
        match self.plan_or_refresh(span, 1).await {
            Ok(hops) => {
                let mut router = self.client.router.lock_or_recover();
                router.adjust_sessions(&addr, -1);
                Replan::Hops(hops)
            }
            Err(e @ NodeError::NoRoute(_)) => Replan::NoRoute(e),
            Err(e) => Replan::Failed(e),
        }
    }

    /// One Forward call to hop `i`, under that peer's adaptive deadline, with its receipt
    /// checked against the call.
    pub(super) async fn call(
        &mut self,
        i: usize,
        pos: usize,
        input: &HopInput,
        patient: bool,
    ) -> Result<(HopOutput, Receipt), NodeError> {
        let client = self.client;
        let hop = self.chain.links()[i].hop.clone();
        let tokens = input.tokens();
        let deadline = match patient {
            true => client.config.router.first_call_deadline,
            false => client.router.lock_or_recover().deadline(&hop.addr, tokens),
        };
        let (request, mut expected) = self.forward_request(&hop, pos, input)?;
        let sent = request.encoded_len();
        let started = Instant::now();
        let remote = |status: tonic::Status| NodeError::Remote {
            peer: hop.addr.clone(),
            status,
        };
        let reply = async {
            let mut pooled = client.pool.client(&hop.target()).await?;
            pooled.client.forward(request).await.map_err(remote)
        };
        let result = match tokio::time::timeout(deadline, reply).await {
            Ok(result) => result,
            Err(_) => Err(remote(tonic::Status::deadline_exceeded(format!(
                "no reply within the {deadline:?} deadline"
            )))),
        };
        let wall = started.elapsed();
        client.metrics.record_rpc(wall, result.is_ok());
        let reply = result?.into_inner();
        client.metrics.record_bytes(sent, reply.encoded_len());
        let compute = Duration::from_micros(reply.compute_us);
        client
            .router
            .lock_or_recover()
            .record_success(&hop.addr, wall, compute, tokens);
        self.record_timing(&hop, wall, compute);
        let vocab = client.model_config().vocab_size;
        let output = hop_output(reply.output, &mut expected, self.sampler.as_ref(), vocab)
            .map_err(|e| remote(tonic::Status::internal(format!("bad reply: {e}"))))?;
        expected.now_ms = neuroshard_net::now_ms();
        let receipt = Receipt::from_wire(&reply.receipt)?;
        expected.check(&receipt)?;
        Ok((output, receipt))
    }

    /// The Forward request for `hop` at `pos`, and what its receipt must say.
    fn forward_request(
        &self,
        hop: &Hop,
        pos: usize,
        input: &HopInput,
    ) -> Result<(pb::ForwardRequest, Expectation), NodeError> {
        let client = self.client;
        let tokens = input.tokens();
        let ends_model = hop.layers.end == client.total_layers;
        let sample = self.sampler.as_ref().filter(|_| ends_model);
        let request = pb::ForwardRequest {
            session_id: self.id.clone(),
            start_pos: pos as u64,
            layers: Some(span_to_proto(hop.layers)),
            input: Some(input.to_proto()),
            model_id: client.model_id.clone(),
            reply_dtype: dtype_to_proto(client.config.wire_dtype) as i32,
            nonce: rand::random::<[u8; 16]>().to_vec(),
            requester_key: client.key.public().0.to_vec(),
            sample: sample.map(sample_to_proto),
            ..Default::default()
        };
        let mut expected = Expectation {
            worker_id: hop.node_id,
            kind: WorkKind::Forward,
            requester: client.key.public(),
            nonce: request.nonce.as_slice().try_into().expect("16-byte nonce"),
            model_id: client.model_id.clone(),
            layers: hop.layers,
            session_id: self.id.clone(),
            start_pos: pos as u64,
            tokens: tokens as u32,
            input_hash: input.hash(),
            output_hash: [0; 32],
            weights_hash: None,
            flops: client.model_config().forward_flops(
                hop.layers.to_range(),
                pos as u64,
                tokens as u64,
            ),
            sent_ms: neuroshard_net::now_ms(),
            now_ms: 0,
        };
        if let Some(verifier) = &client.verifier {
            expected.weights_hash = Some(verifier.weights_hash(hop.layers, hop.precision)?);
        }
        Ok((request, expected))
    }

    /// Adds a call's wall and compute time to `hop`'s figures.
    fn record_timing(&mut self, hop: &Hop, wall: Duration, compute: Duration) {
        let timing = self
            .timings
            .entry((hop.layers, hop.node_id))
            .or_insert_with(|| HopTiming {
                node_id: hop.node_id,
                addr: hop.addr.clone(),
                layers: hop.layers.to_string(),
                calls: 0,
                total_ms: 0.0,
                compute_ms: 0.0,
            });
        timing.calls += 1;
        timing.total_ms += wall.as_secs_f64() * 1000.0;
        timing.compute_ms += compute.as_secs_f64() * 1000.0;
    }

    /// Frees the session's caches on every hop (best effort) and its router placements.
    pub async fn close(mut self) {
        let chain = self.release();
        for hop in chain {
            end_remote_session(&self.client.pool, &hop.target(), &self.id).await;
        }
    }

    /// Takes the chain and removes its placements from the router and its verifier caches.
    pub(super) fn release(&mut self) -> Vec<Hop> {
        if let Some(verifier) = &self.client.verifier {
            verifier.forget(&self.id);
        }
        let chain = self.chain.take_hops();
        let mut router = self.client.router.lock_or_recover();
        for hop in &chain {
            router.adjust_sessions(&hop.addr, -1);
        }
        chain
    }
}

/// A session dropped without [`SwarmSession::close`] (an error, an early return) still frees
/// its router placements, and its remote caches in the background.
impl Drop for SwarmSession<'_> {
    fn drop(&mut self) {
        let chain = self.release();
        if chain.is_empty() {
            return;
        }
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            let pool = self.client.pool.clone();
            let id = self.id.clone();
            runtime.spawn(async move {
                for hop in chain {
                    end_remote_session(&pool, &hop.target(), &id).await;
                }
            });
        }
    }
}

/// Asks `addr` to drop session `id`'s cache, giving up after a second.
pub(super) async fn end_remote_session(pool: &ConnectionPool, addr: &Target, id: &str) {
    if let Ok(mut pooled) = pool.control_client(addr).await {
        let request = pb::EndSessionRequest {
            session_id: id.to_string(),
        };
        let _ =
            tokio::time::timeout(Duration::from_secs(1), pooled.client.end_session(request)).await;
    }
}

impl Pipeline for SwarmSession<'_> {
    async fn step(&mut self, start_pos: usize, ids: &[u32]) -> Result<Vec<f32>, NodeError> {
        self.forward(start_pos, ids).await
    }

    async fn choose(
        &mut self,
        start_pos: usize,
        ids: &[u32],
        sampler: &Sampler,
    ) -> Result<Chosen, NodeError> {
        self.forward_choosing(start_pos, ids, sampler).await
    }
}
