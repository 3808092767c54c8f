//! Serving `Forward`: each call checked whole against the served shard, computed off the
//! reactor on the compute threads against its session's cache, and answered with a receipt.

use super::*;
use crate::duty::Turn;
use crate::sessions::Checkout;
use neuroshard_base::sync::LockExt;
use neuroshard_model::{Chosen, Sampler};
use neuroshard_net::convert::{chosen_hash, chosen_to_proto, sample_from_proto};
use neuroshard_proof::Receipt;

/// A validated Forward request.
#[derive(Debug)]
pub(super) struct ForwardCall {
    /// The shard it was checked against, which computes it even if a swap follows.
    pub(super) served: Arc<Served>,
    /// The key the call's connection proved: its session's owner.
    pub(super) caller: PublicKey,
    pub(super) session_id: String,
    pub(super) start_pos: usize,
    pub(super) layers: LayerRange,
    pub(super) input: ShardInput,
    pub(super) tokens: usize,
    pub(super) reply_dtype: WireDType,
    /// SHA-256 of the input as received.
    pub(super) input_hash: [u8; 32],
    /// Nonce and requester key, when the caller wants a receipt.
    pub(super) proof: Option<([u8; 16], PublicKey)>,
    /// How to choose the next token, when the call ends the model and the caller wants the
    /// token rather than the logits.
    pub(super) sample: Option<Sampler>,
}

/// What a Forward computed: the shard's output and, where the call asked for it, the token
/// chosen from its logits.
pub(super) struct Computed {
    pub(super) out: ShardOutput,
    pub(super) chosen: Option<Chosen>,
    pub(super) compute: Duration,
    pub(super) weights_hash: [u8; 32],
}

impl NodeState {
    /// Serves one Forward call: validate, compute off the reactor, encode the reply.
    pub(super) async fn forward(
        self: Arc<Self>,
        req: pb::ForwardRequest,
        caller: PublicKey,
    ) -> Result<pb::ForwardResponse, NodeError> {
        if req.train {
            return self.train_forward(req, caller).await;
        }
        let _admitted = self.lifecycle.admit()?;
        self.caps.check_budget()?;
        let received_ms = neuroshard_net::now_ms();
        let call = self.parse_call(req, caller)?;
        let draft = self.draft_receipt(&call, received_ms);
        let (tokens, reply_dtype, wants_receipt) =
            (call.tokens, call.reply_dtype, call.proof.is_some());
        let computed = self.clone().compute(call).await?;
        self.metrics.forward_calls.fetch_add(1, Ordering::Relaxed);
        self.metrics
            .tokens_served
            .fetch_add(tokens as u64, Ordering::Relaxed);
        let Computed {
            out,
            chosen,
            compute,
            weights_hash,
        } = computed;
        // The receipt fingerprints the row computed, logits included where only the token
        // chosen from them goes back: a spot check recomputes that row either way.
        let fingerprint = Fingerprint::of(last_row(&out, self.model.config.hidden_size));
        let (output, output_hash) = match chosen {
            Some(chosen) => (
                pb::forward_response::Output::Sampled(chosen_to_proto(&chosen)),
                chosen_hash(&chosen),
            ),
            None => self.encode_output(out, tokens, reply_dtype),
        };
        let receipt =
            wants_receipt.then(|| self.sign_forward(draft, weights_hash, output_hash, fingerprint));
        Ok(pb::ForwardResponse {
            output: Some(output),
            compute_us: compute.as_micros() as u64,
            receipt: receipt.map(|r| r.to_wire()).unwrap_or_default(),
        })
    }

    /// A Forward's receipt as far as the call alone tells: the compute fills in the rest.
    fn draft_receipt(&self, call: &ForwardCall, received_ms: u64) -> ReceiptBody {
        ReceiptBody {
            version: neuroshard_proof::receipt::BODY_VERSION,
            kind: WorkKind::Forward,
            worker: self.key.public().0,
            requester: call.proof.map_or([0; 32], |(_, key)| key.0),
            model_id: self.model.id.clone(),
            weights_hash: [0; 32],
            layers: call.layers,
            session_id: call.session_id.clone(),
            start_pos: call.start_pos as u64,
            tokens: call.tokens as u32,
            flops: self.model.config.forward_flops(
                call.layers.to_range(),
                call.start_pos as u64,
                call.tokens as u64,
            ),
            input_hash: call.input_hash,
            output_hash: [0; 32],
            fingerprint: Fingerprint::of(&[]),
            nonce: call.proof.map_or([0; 16], |(nonce, _)| nonce),
            received_ms,
            replied_ms: 0,
        }
    }

    /// Completes a Forward's receipt with what the compute gave, signs it and records it in
    /// the ledger.
    fn sign_forward(
        &self,
        draft: ReceiptBody,
        weights_hash: [u8; 32],
        output_hash: [u8; 32],
        fingerprint: Fingerprint,
    ) -> Receipt {
        let received_ms = draft.received_ms;
        let (weights_hash, flops) = match &self.fault {
            Some(Fault::ClaimsWeights(claimed)) => (*claimed, draft.flops),
            Some(Fault::InflatesFlops(factor)) => (weights_hash, draft.flops * factor),
            _ => (weights_hash, draft.flops),
        };
        let receipt = ReceiptBody {
            weights_hash,
            flops,
            output_hash,
            fingerprint,
            replied_ms: neuroshard_net::now_ms().max(received_ms),
            ..draft
        }
        .sign(&self.key);
        self.ledger.issued(receipt.clone());
        receipt
    }

    /// Checks and stores countersigned receipts of this node's work, with the requester's
    /// credit pass when it shows one (empty `pass`: none). A pass that does not check out is
    /// named in the answer, and the receipts are stored as unvouched.
    pub(super) async fn submit_receipts(
        self: Arc<Self>,
        batch: Vec<Vec<u8>>,
        pass: Vec<u8>,
    ) -> Result<pb::SubmitReceiptsResponse, NodeError> {
        if batch.len() > MAX_RECEIPTS_PER_SUBMIT {
            return Err(NodeError::BadRequest(format!(
                "{} countersigned receipts in one call; send at most {MAX_RECEIPTS_PER_SUBMIT}",
                batch.len()
            )));
        }
        let own = self.key.public();
        let pass = match pass.is_empty() {
            true => Ok(None),
            false => CreditPass::from_wire(&pass, neuroshard_net::now_ms()).map(Some),
        };
        let (valid, rejected) = tokio::task::spawn_blocking(move || {
            let mut valid = Vec::new();
            let mut rejected = Vec::new();
            for checked in Countersignature::from_wire_batch(&batch, &own) {
                match checked {
                    Ok(cs) => valid.push(cs),
                    Err(e) => rejected.push(e.to_string()),
                }
            }
            (valid, rejected)
        })
        .await
        .map_err(|e| NodeError::BadRequest(format!("checking receipts failed: {e}")))?;
        let (pass, pass_refused) = match pass {
            Ok(pass) => (pass, String::new()),
            Err(e) => (None, e.to_string()),
        };
        let settled = self.ledger.settle(valid, pass).await?;
        let stored = settled.iter().filter(|s| **s == Settlement::Stored).count();
        Ok(pb::SubmitReceiptsResponse {
            stored: stored as u32,
            already_settled: (settled.len() - stored) as u32,
            rejected,
            pass_refused,
        })
    }

    /// Checks a call's session id and (when given) model id.
    pub(super) fn check_ids(&self, session_id: &str, model_id: &str) -> Result<(), NodeError> {
        if session_id.is_empty() || session_id.len() > MAX_SESSION_ID_BYTES {
            return Err(NodeError::BadRequest(format!(
                "session_id must be 1..={MAX_SESSION_ID_BYTES} bytes"
            )));
        }
        self.check_model(model_id)
    }

    /// Checks a call's model id, when it gives one.
    pub(super) fn check_model(&self, model_id: &str) -> Result<(), NodeError> {
        if !model_id.is_empty() && model_id != self.model.id {
            return Err(NodeError::BadRequest(format!(
                "model {model_id} requested, this node serves model {}",
                self.model.id
            )));
        }
        Ok(())
    }

    /// Checks every field of a Forward request against this node, before any session work.
    pub(super) fn parse_call(
        &self,
        req: pb::ForwardRequest,
        caller: PublicKey,
    ) -> Result<ForwardCall, NodeError> {
        self.check_ids(&req.session_id, &req.model_id)?;
        let layers = span_from_proto(req.layers)?;
        let served = self.served();
        if !served.range.covers(&layers) {
            return Err(NodeError::WrongLayers {
                asked: layers,
                serves: served.range,
            });
        }
        let proof = parse_proof(&req.nonce, &req.requester_key, &caller)?;
        let input_hash = match &req.input {
            Some(pb::forward_request::Input::Tokens(t)) => tokens_hash(&t.ids),
            _ => [0; 32],
        };
        let (input, input_hash) = self.decode_input(req.input, input_hash)?;
        let reply_dtype = match req.reply_dtype {
            0 => WireDType::F16,
            v => dtype_from_proto(v)?,
        };
        let start_pos = usize::try_from(req.start_pos)
            .map_err(|_| NodeError::BadRequest("start_pos is out of range".into()))?;
        let tokens = input.tokens(self.model.config.hidden_size);
        if tokens > MAX_TOKENS_PER_CALL {
            return Err(NodeError::BadRequest(format!(
                "{tokens} tokens in one call; send at most {MAX_TOKENS_PER_CALL} per call"
            )));
        }
        let max = self.model.config.max_positions();
        if start_pos.checked_add(tokens).is_none_or(|end| end > max) {
            return Err(NodeError::BadRequest(format!(
                "positions from {start_pos} for {tokens} tokens pass the model's {max} (max_position_embeddings)"
            )));
        }
        let sample = req.sample.map(sample_from_proto).transpose()?;
        if sample.is_some() && layers.end as usize != self.model.config.num_hidden_layers {
            return Err(NodeError::BadRequest(format!(
                "sample asks for a token, but layers {layers} do not end the model's {}",
                self.model.config.num_hidden_layers
            )));
        }
        Ok(ForwardCall {
            served,
            caller,
            session_id: req.session_id,
            start_pos,
            layers,
            input,
            tokens,
            reply_dtype,
            input_hash,
            proof,
            sample,
        })
    }

    /// Runs the call on the shard in a blocking task against the session's checked-out cache.
    ///
    /// The blocking task owns the whole call, check-in included, so a caller that gives up (and
    /// drops this future) cannot leave the session checked out.
    pub(super) async fn compute(self: Arc<Self>, call: ForwardCall) -> Result<Computed, NodeError> {
        if self.batches(&call) {
            return self.compute_batched(call).await;
        }
        // Waited for before the session is checked out, so giving up here leaves nothing behind.
        let turn = self.duty.turn(call.caller).await?;
        let checkout = self.check_out_session(&call)?;
        self.busy.fetch_add(1, Ordering::Relaxed);
        let state = self;
        tokio::task::spawn_blocking(move || state.compute_checked_out(call, checkout, turn))
            .await
            .map_err(|e| {
                NodeError::Internal(format!("compute task failed: {}", panic_message(e)))
            })?
    }

    /// Checks out the call's session cache, unless the shard changed since the call was
    /// checked; counts a session the call starts.
    pub(super) fn check_out_session(&self, call: &ForwardCall) -> Result<Checkout, NodeError> {
        let (checkout, created) = self.sessions.checkout(
            &call.session_id,
            call.caller,
            call.start_pos,
            call.tokens,
            call.layers.len() as usize,
            Instant::now(),
        )?;
        if !Arc::ptr_eq(&call.served, &self.served()) {
            // The shard changed since the call was checked: its sessions were dropped, and a
            // cache made now on the old shard must not outlive it.
            self.sessions.abandon(checkout);
            return Err(NodeError::UnknownSession(call.session_id.clone()));
        }
        if created {
            self.metrics
                .sessions_started
                .fetch_add(1, Ordering::Relaxed);
        }
        Ok(checkout)
    }

    /// The blocking half of [`Self::compute`]: runs the call on the compute threads, checks
    /// the session back in (or drops it after a panic), and ends the turn.
    fn compute_checked_out(
        &self,
        call: ForwardCall,
        mut checkout: Checkout,
        turn: Turn,
    ) -> Result<Computed, NodeError> {
        let ForwardCall {
            served,
            start_pos,
            layers,
            input,
            tokens,
            sample,
            ..
        } = call;
        let started = std::time::Instant::now();
        let out = self.threads.install(|| {
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                let (out, weights_hash) =
                    self.run_on_served(&served, &mut checkout.cache, start_pos, layers, input)?;
                let chosen = match (&sample, &out) {
                    (Some(sampler), ShardOutput::Logits(logits)) => {
                        let position = (start_pos + tokens) as u64;
                        Some(self.choose(sampler, logits, position)?)
                    }
                    _ => None,
                };
                Ok::<_, NodeError>((out, chosen, weights_hash))
            }))
        });
        let compute = started.elapsed();
        self.busy.fetch_sub(1, Ordering::Relaxed);
        let result = match out {
            Ok(out) => {
                if tokens == 1 && out.is_ok() {
                    self.decode_speed.observe(compute, layers.len() as usize);
                }
                self.sessions.checkin(checkout, Instant::now());
                let (out, chosen, weights_hash) = out?;
                Ok(Computed {
                    out,
                    chosen,
                    compute,
                    weights_hash,
                })
            }
            Err(payload) => {
                // The worker's fault, not the caller's: the caller fails over.
                self.sessions.abandon(checkout);
                let why = panic_text(payload.as_ref());
                tracing::error!("a compute worker panicked ({why}); its session was dropped");
                Err(NodeError::Internal(format!(
                    "compute panicked ({why}); the session was dropped"
                )))
            }
        };
        // The cache is back before the next turn starts: a caller that gave up on this
        // call and asked again waits for its turn and then finds the session free.
        turn.finish(compute);
        result
    }

    /// The token `sampler` chooses at `position` from `logits` (or, for a test node with
    /// [`Fault::WrongToken`], the one after it).
    fn choose(
        &self,
        sampler: &Sampler,
        logits: &[f32],
        position: u64,
    ) -> Result<Chosen, NodeError> {
        let mut chosen = sampler.choose(logits, position)?;
        if let Some(Fault::WrongToken) = &self.fault {
            // Another token, reported with its own true logit: only the choice is a lie.
            chosen.token = (chosen.token + 1) % logits.len() as u32;
            chosen.logit = logits[chosen.token as usize];
        }
        Ok(chosen)
    }

    /// Runs a call on the shard it was checked against; its output and the hash of the
    /// weights it ran on.
    fn run_on_served(
        &self,
        served: &Served,
        cache: &mut neuroshard_model::KvCache,
        start_pos: usize,
        layers: LayerRange,
        input: ShardInput,
    ) -> Result<(ShardOutput, [u8; 32]), NodeError> {
        let shard = served.shard.lock_or_recover();
        let weights_hash = shard.weights_hash(layers.to_range())?;
        let out = self.run(served, &shard, cache, start_pos, layers, input)?;
        Ok((out, weights_hash))
    }

    /// Runs the call on `shard` (or misbehaves, for a test node with a [`Fault`]).
    pub(super) fn run(
        &self,
        served: &Served,
        shard: &Shard,
        cache: &mut neuroshard_model::KvCache,
        start_pos: usize,
        layers: LayerRange,
        input: ShardInput,
    ) -> Result<ShardOutput, NodeError> {
        let mut layers = layers.to_range();
        if let Some(Fault::PanicFrom(at)) = &self.fault
            && start_pos >= *at
        {
            panic!("injected fault at position {start_pos}");
        }
        let out = match (&self.fault, &served.wrong_shard) {
            (Some(Fault::WrongWeights(_)), Some(wrong)) => {
                let wrong = wrong.lock_or_recover();
                wrong.forward(cache, start_pos, layers, input)?
            }
            (Some(Fault::SkipLayer), _) if layers.start > 0 && layers.len() >= 2 => {
                layers.start += 1;
                shard.forward(cache, start_pos, layers, input)?
            }
            _ => shard.forward(cache, start_pos, layers, input)?,
        };
        Ok(match (&self.fault, out) {
            (Some(Fault::Noise { scale }), ShardOutput::Hidden(v)) => {
                ShardOutput::Hidden(add_noise(v, *scale))
            }
            (Some(Fault::Noise { scale }), ShardOutput::Logits(v)) => {
                ShardOutput::Logits(add_noise(v, *scale))
            }
            (_, out) => out,
        })
    }

    /// The reply's output and its hash: hidden states in the caller's dtype, logits always as
    /// f32.
    pub(super) fn encode_output(
        &self,
        out: ShardOutput,
        tokens: usize,
        reply_dtype: WireDType,
    ) -> (pb::forward_response::Output, [u8; 32]) {
        use pb::forward_response::Output;
        let (tensor, logits) = match out {
            ShardOutput::Hidden(values) => {
                let shape = [1, tokens, self.model.config.hidden_size];
                (codec::encode(&values, &shape, reply_dtype), false)
            }
            ShardOutput::Logits(values) => {
                let shape = [1, values.len()];
                (codec::encode(&values, &shape, WireDType::F32), true)
            }
        };
        let hash = tensor_hash(&tensor);
        let tensor = tensor_to_proto(tensor);
        match logits {
            true => (Output::Logits(tensor), hash),
            false => (Output::Hidden(tensor), hash),
        }
    }

    /// The input, and its hash (`tokens_hash` passes through for token input).
    pub(super) fn decode_input(
        &self,
        input: Option<pb::forward_request::Input>,
        tokens_hash: [u8; 32],
    ) -> Result<(ShardInput, [u8; 32]), NodeError> {
        use pb::forward_request::Input;
        match input {
            None => Err(NodeError::BadRequest("request has no input".into())),
            Some(Input::Tokens(t)) => Ok((ShardInput::Tokens(t.ids), tokens_hash)),
            Some(Input::Hidden(t)) => {
                let (rows, hash) = self.decode_rows(t, "hidden states")?;
                Ok((ShardInput::Hidden(rows), hash))
            }
        }
    }

    /// Rows of the model's width (`what`: hidden states, an output gradient) and their hash.
    /// The shape is checked first, at most [`MAX_TOKENS_PER_CALL`] rows, so what a compressed
    /// payload may claim to expand to is sized from the served model before anything is
    /// decompressed.
    pub(super) fn decode_rows(
        &self,
        t: pb::Tensor,
        what: &str,
    ) -> Result<(Vec<f32>, [u8; 32]), NodeError> {
        let hidden = self.model.config.hidden_size;
        let tensor = tensor_from_proto(t)?;
        let shape = &tensor.shape;
        if shape.len() != 3 || shape[0] != 1 || shape[1] == 0 || shape[2] != hidden {
            return Err(NodeError::BadRequest(format!(
                "{what} must have shape [1, tokens, {hidden}], got {shape:?}"
            )));
        }
        if shape[1] > MAX_TOKENS_PER_CALL {
            return Err(NodeError::BadRequest(format!(
                "{what} of {} tokens; the cap is {MAX_TOKENS_PER_CALL} per call",
                shape[1]
            )));
        }
        let hash = tensor_hash(&tensor);
        Ok((codec::decode(&tensor)?, hash))
    }
}
/// The nonce and requester key of a call that wants a receipt; none when both are empty. The
/// requester is the key the call's connection proved (`caller`): a receipt names who asked,
/// not whom the caller says asked.
pub(super) fn parse_proof(
    nonce: &[u8],
    requester: &[u8],
    caller: &PublicKey,
) -> Result<Option<([u8; 16], PublicKey)>, NodeError> {
    if nonce.is_empty() && requester.is_empty() {
        return Ok(None);
    }
    let nonce: [u8; 16] = nonce.try_into().map_err(|_| {
        NodeError::BadRequest(format!("nonce must be 16 bytes, got {}", nonce.len()))
    })?;
    let requester = PublicKey::from_slice(requester)?;
    if requester != *caller {
        return Err(NodeError::Forbidden(format!(
            "the requester key {} is not the key this connection proved ({})",
            requester.id().short(),
            caller.id().short()
        )));
    }
    Ok(Some((nonce, requester)))
}

/// `values` plus Gaussian noise of `scale` × their RMS.
pub(super) fn add_noise(mut values: Vec<f32>, scale: f32) -> Vec<f32> {
    use rand_distr::Distribution;
    let rms = (values.iter().map(|v| v * v).sum::<f32>() / values.len().max(1) as f32).sqrt();
    let normal = rand_distr::Normal::new(0.0, (scale * rms).max(f32::MIN_POSITIVE))
        .expect("finite standard deviation");
    let mut rng = rand::rng();
    for v in &mut values {
        *v += normal.sample(&mut rng);
    }
    values
}

/// What a panicked task said, for an error message.
pub(super) fn panic_message(e: tokio::task::JoinError) -> String {
    match e.try_into_panic() {
        Ok(payload) => panic_text(payload.as_ref()),
        Err(e) => e.to_string(),
    }
}

/// The message a panic carried.
pub(super) fn panic_text(payload: &(dyn std::any::Any + Send)) -> String {
    payload
        .downcast_ref::<String>()
        .cloned()
        .or_else(|| payload.downcast_ref::<&str>().map(|s| s.to_string()))
        .unwrap_or_else(|| "it panicked".into())
}
