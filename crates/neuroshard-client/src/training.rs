//! Pipeline training through the swarm: each microbatch runs forward through a chain of
//! training nodes (the last one computing the loss against the targets), then backward in
//! reverse, each node sending back the gradient of its input hidden states. Every call's receipt
//! is checked and countersigned as inference's are.

use neuroshard_base::sync::LockExt;
use std::time::Duration;

use neuroshard_base::LayerRange;
use neuroshard_model::LlamaConfig;
use neuroshard_model::codec::{WireDType, WireTensor};
use neuroshard_proof::{Expectation, Receipt, Verdict, WorkKind};
use neuroshard_proto as pb;
use prost::Message;

use super::SwarmClient;
use crate::router::Hop;
use neuroshard_net::NodeError;
use neuroshard_net::convert::{
    span_to_proto, tensor_from_proto, tensor_hash, tensor_to_proto, tokens_hash,
};

/// How long one training call may take. Training calls are not latency-routed: a microbatch of
/// a few hundred tokens through a home PC's layers takes seconds, not milliseconds.
const TRAIN_CALL_TIMEOUT: Duration = Duration::from_secs(120);

/// One training sequence: input ids and the next-token target of every position.
#[derive(Debug, Clone, PartialEq)]
pub struct Microbatch {
    /// Input token ids.
    pub inputs: Vec<u32>,
    /// The id that follows each input position.
    pub targets: Vec<u32>,
}

impl Microbatch {
    /// The microbatch that predicts each id of `window` from the ones before it.
    pub fn from_window(window: &[u32]) -> Self {
        Self {
            inputs: window[..window.len() - 1].to_vec(),
            targets: window[1..].to_vec(),
        }
    }
}

/// What a round of microbatches cost and gave.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct StepReport {
    /// Mean loss over the microbatches.
    pub loss: f32,
    /// Input tokens trained on.
    pub tokens: usize,
    /// Bytes of requests sent.
    pub bytes_sent: u64,
    /// Bytes of replies received.
    pub bytes_received: u64,
    /// Inner steps each node of the chain has taken, after this round.
    pub inner_steps: Vec<u64>,
}

/// A training run over one chain of nodes.
#[derive(Debug)]
pub struct TrainSession<'a> {
    client: &'a SwarmClient,
    id: String,
    chain: Vec<Hop>,
    next: u64,
}

impl SwarmClient {
    /// A training session over `chain`: nodes that train, whose ranges join up from layer 0 to
    /// the model's end, in order. Each node runs its whole range, so that its parameters move
    /// together.
    pub fn train_session(&self, chain: Vec<Hop>) -> Result<TrainSession<'_>, NodeError> {
        let mut next = 0;
        for hop in &chain {
            if hop.layers.start != next {
                return Err(NodeError::Config(format!(
                    "the training chain skips or repeats layers at {} ({} starts at {})",
                    next, hop.addr, hop.layers.start
                )));
            }
            next = hop.layers.end;
        }
        if next != self.total_layers {
            return Err(NodeError::Config(format!(
                "the training chain ends at layer {next}, the model has {}",
                self.total_layers
            )));
        }
        Ok(TrainSession {
            client: self,
            id: format!("train-{:016x}", rand::random::<u64>()),
            chain,
            next: 0,
        })
    }
}

impl TrainSession<'_> {
    /// The chain trained on.
    pub fn chain(&self) -> &[Hop] {
        &self.chain
    }

    /// Runs `batch` forward and backward and has every node take an inner step on the mean
    /// of the gradients.
    pub async fn step(&mut self, batch: &[Microbatch]) -> Result<StepReport, NodeError> {
        self.accumulate(batch, true).await
    }

    /// Runs `batch` forward and backward through the chain; the nodes add the gradients to
    /// their accumulation, and take an inner step after the last one when `step` is set.
    pub async fn accumulate(
        &mut self,
        batch: &[Microbatch],
        step: bool,
    ) -> Result<StepReport, NodeError> {
        if batch.is_empty() {
            return Err(NodeError::BadRequest("an empty batch".into()));
        }
        let mut report = StepReport::default();
        for (j, microbatch) in batch.iter().enumerate() {
            let id = format!("{}-{}", self.id, self.next);
            self.next += 1;
            let loss = self.forward(&id, microbatch, &mut report).await?;
            report.loss += loss / batch.len() as f32;
            report.tokens += microbatch.inputs.len();
            let last = j + 1 == batch.len();
            report.inner_steps = self
                .backward(&id, microbatch.inputs.len(), step && last, &mut report)
                .await?;
        }
        Ok(report)
    }

    /// A training Forward of `input` to `hop`; the last stage gets the targets for its loss.
    fn forward_request(
        &self,
        id: &str,
        hop: &Hop,
        input: pb::forward_request::Input,
        targets: Option<&[u32]>,
    ) -> pb::ForwardRequest {
        pb::ForwardRequest {
            session_id: id.to_string(),
            start_pos: 0,
            layers: Some(span_to_proto(hop.layers)),
            input: Some(input),
            model_id: self.client.model_id.clone(),
            reply_dtype: pb::Dtype::F32 as i32,
            nonce: rand::random::<[u8; 16]>().to_vec(),
            requester_key: self.client.key.public().0.to_vec(),
            train: true,
            targets: targets.map(|ids| pb::TokenIds { ids: ids.to_vec() }),
            sample: None,
        }
    }

    /// The microbatch forward through the chain; the last node's loss.
    async fn forward(
        &self,
        id: &str,
        microbatch: &Microbatch,
        report: &mut StepReport,
    ) -> Result<f32, NodeError> {
        use pb::forward_request::Input;
        use pb::forward_response::Output;
        let tokens = microbatch.inputs.len();
        let mut input = Input::Tokens(pb::TokenIds {
            ids: microbatch.inputs.clone(),
        });
        let mut input_hash = tokens_hash(&microbatch.inputs);
        for (i, hop) in self.chain.iter().enumerate() {
            let last = i + 1 == self.chain.len();
            let targets = last.then_some(microbatch.targets.as_slice());
            let request = self.forward_request(id, hop, input.clone(), targets);
            let expected = self.expect(hop, WorkKind::Forward, &request, tokens, input_hash);
            report.bytes_sent += request.encoded_len() as u64;
            let reply = self
                .call(hop, async |mut c| c.forward(request).await)
                .await?;
            report.bytes_received += reply.encoded_len() as u64;
            let bad = |what: &str| bad_reply(hop, what);
            let (output_hash, next) = match (reply.output, last) {
                (Some(Output::Hidden(t)), false) => {
                    let tensor = tensor_from_proto(t).map_err(|e| bad(&e.to_string()))?;
                    let hash = tensor_hash(&tensor);
                    (hash, Some(tensor))
                }
                (Some(Output::Loss(loss)), true) => {
                    if !loss.is_finite() {
                        return Err(bad("the loss is not finite"));
                    }
                    self.settle(
                        hop,
                        &reply.receipt,
                        expected,
                        tensor_hash(&loss_tensor(loss)),
                    )
                    .await?;
                    return Ok(loss);
                }
                _ => {
                    return Err(bad(
                        "the training forward's output is not what its stage gives",
                    ));
                }
            };
            self.settle(hop, &reply.receipt, expected, output_hash)
                .await?;
            let tensor = next.expect("hidden states");
            input_hash = tensor_hash(&tensor);
            input = Input::Hidden(tensor_to_proto(tensor));
        }
        unreachable!("the chain ends with a loss")
    }

    /// The microbatch backward through the chain in reverse; each node's inner step count.
    async fn backward(
        &self,
        id: &str,
        tokens: usize,
        step: bool,
        report: &mut StepReport,
    ) -> Result<Vec<u64>, NodeError> {
        let mut steps = vec![0; self.chain.len()];
        let mut grad: Option<pb::Tensor> = None;
        let mut input_hash = [0; 32];
        for (i, hop) in self.chain.iter().enumerate().rev() {
            let request = pb::BackwardRequest {
                session_id: id.to_string(),
                layers: Some(span_to_proto(hop.layers)),
                grad_output: grad.take(),
                model_id: self.client.model_id.clone(),
                step,
                nonce: rand::random::<[u8; 16]>().to_vec(),
                requester_key: self.client.key.public().0.to_vec(),
                reply_dtype: pb::Dtype::F32 as i32,
            };
            let expected = self.expect(hop, WorkKind::Backward, &request, tokens, input_hash);
            report.bytes_sent += request.encoded_len() as u64;
            let reply = self
                .call(hop, async |mut c| c.backward(request).await)
                .await?;
            report.bytes_received += reply.encoded_len() as u64;
            steps[i] = reply.inner_steps;
            let output_hash = match (reply.grad_input, i) {
                (None, 0) => [0; 32],
                (Some(t), i) if i > 0 => {
                    let tensor =
                        tensor_from_proto(t).map_err(|e| bad_reply(hop, &e.to_string()))?;
                    if tensor.dtype != WireDType::F32 || tensor.shape.get(1) != Some(&tokens) {
                        return Err(bad_reply(hop, "the input gradient has the wrong shape"));
                    }
                    let hash = tensor_hash(&tensor);
                    grad = Some(tensor_to_proto(tensor));
                    input_hash = hash;
                    hash
                }
                _ => {
                    return Err(bad_reply(
                        hop,
                        "the input gradient is missing or unexpected",
                    ));
                }
            };
            self.settle(hop, &reply.receipt, expected, output_hash)
                .await?;
        }
        Ok(steps)
    }

    /// One call to `hop` under the training timeout.
    async fn call<R>(
        &self,
        hop: &Hop,
        call: impl AsyncFnOnce(
            pb::node_client::NodeClient<tonic::transport::Channel>,
        ) -> Result<tonic::Response<R>, tonic::Status>,
    ) -> Result<R, NodeError> {
        let remote = |status: tonic::Status| NodeError::Remote {
            peer: hop.addr.clone(),
            status,
        };
        let reply = async {
            let pooled = self.client.pool.client(&hop.target()).await?;
            call(pooled.client.clone()).await.map_err(remote)
        };
        match tokio::time::timeout(TRAIN_CALL_TIMEOUT, reply).await {
            Ok(reply) => Ok(reply?.into_inner()),
            Err(_) => Err(remote(tonic::Status::deadline_exceeded(format!(
                "no reply within {TRAIN_CALL_TIMEOUT:?}"
            )))),
        }
    }

    /// What the receipt of `request` to `hop` must say; the output hash is filled in later.
    fn expect(
        &self,
        hop: &Hop,
        kind: WorkKind,
        request: &impl TrainingRequest,
        tokens: usize,
        input_hash: [u8; 32],
    ) -> Expectation {
        let (session_id, nonce) = request.ids();
        Expectation {
            worker_id: hop.node_id,
            kind,
            requester: self.client.key.public(),
            nonce: nonce.try_into().expect("16-byte nonce"),
            model_id: self.client.model_id.clone(),
            layers: hop.layers,
            session_id: session_id.to_string(),
            start_pos: 0,
            tokens: tokens as u32,
            input_hash,
            output_hash: [0; 32],
            weights_hash: None,
            flops: training_flops(self.client.model_config(), hop.layers, kind, tokens),
            sent_ms: neuroshard_net::now_ms(),
            now_ms: 0,
        }
    }

    /// Checks a training call's receipt against the call and queues its countersignature.
    async fn settle(
        &self,
        hop: &Hop,
        receipt: &[u8],
        expected: Expectation,
        output_hash: [u8; 32],
    ) -> Result<(), NodeError> {
        let receipt = Receipt::from_wire(receipt)?;
        let expected = Expectation {
            output_hash,
            now_ms: neuroshard_net::now_ms(),
            ..expected
        };
        expected.check(&receipt)?;
        let reliability = self
            .client
            .router
            .lock_or_recover()
            .reputation()
            .reliability(&hop.node_id);
        let accepted = receipt.countersign(
            &self.client.key,
            Verdict::Accepted {
                spot_checked: false,
            },
            reliability as f32,
            neuroshard_net::now_ms(),
        );
        self.client.outbox.push(&hop.target(), accepted).await;
        Ok(())
    }
}

/// The microbatch and nonce a training request carries.
trait TrainingRequest {
    fn ids(&self) -> (&str, &[u8]);
}

impl TrainingRequest for pb::ForwardRequest {
    fn ids(&self) -> (&str, &[u8]) {
        (&self.session_id, &self.nonce)
    }
}

impl TrainingRequest for pb::BackwardRequest {
    fn ids(&self) -> (&str, &[u8]) {
        (&self.session_id, &self.nonce)
    }
}

fn bad_reply(hop: &Hop, what: &str) -> NodeError {
    NodeError::Remote {
        peer: hop.addr.clone(),
        status: tonic::Status::internal(format!("bad reply: {what}")),
    }
}

/// A loss as the one-value tensor its receipt hashes.
pub fn loss_tensor(loss: f32) -> WireTensor {
    neuroshard_model::codec::encode(&[loss], &[1], WireDType::F32)
}

/// The FLOPs an honest stage reports for a training call: a forward pass over `tokens`, and
/// twice that for the backward pass.
fn training_flops(config: &LlamaConfig, layers: LayerRange, kind: WorkKind, tokens: usize) -> u64 {
    let forward = config.forward_flops(layers.to_range(), 0, tokens as u64);
    match kind {
        WorkKind::Forward => forward,
        WorkKind::Backward => 2 * forward,
    }
}
