//! Training on a node: the training Forward (the node's whole range with autodiff over one
//! microbatch, kept until its Backward), the Backward RPC, and AdamW inner steps. Both calls
//! earn receipts as inference does.
//!
//! A node trains only when its config asks ([`NodeConfig::train`](super::NodeConfig)); its
//! trainable copy of the shard is loaded on the first training call, on the served shard's
//! device, and loaded again after a change of layers.

use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use neuroshard_base::LayerRange;
use neuroshard_model::codec::{self, WireDType};
use neuroshard_model::{ShardInput, TrainConfig, TrainOutput, TrainShard};
use neuroshard_proof::{Fingerprint, ReceiptBody, WorkKind};
use neuroshard_proto as pb;

use super::{NodeState, Served, parse_proof};
use crate::NodeError;
use crate::convert::{
    dtype_from_proto, span_from_proto, tensor_from_proto, tensor_hash, tensor_to_proto,
};

/// The node's trainable copy of its shard, made on the first training call.
#[derive(Debug)]
pub(super) struct Trainer {
    config: TrainConfig,
    stage: Mutex<Option<Stage>>,
}

#[derive(Debug)]
struct Stage {
    range: LayerRange,
    shard: TrainShard,
}

impl Trainer {
    pub(super) fn new(config: TrainConfig) -> Self {
        Self {
            config,
            stage: Mutex::new(None),
        }
    }
}

/// What a training call runs once its checks passed.
enum Work {
    Forward {
        input: ShardInput,
        targets: Option<Vec<u32>>,
    },
    Backward {
        grad: Option<Vec<f32>>,
        step: bool,
    },
}

/// What it gave back.
enum Done {
    Forward(TrainOutput),
    Backward {
        grad_input: Option<Vec<f32>>,
        steps: u64,
    },
}

/// A checked training call.
struct Call {
    served: Arc<Served>,
    microbatch: String,
    layers: LayerRange,
    proof: Option<([u8; 16], neuroshard_base::PublicKey)>,
    reply_dtype: WireDType,
}

impl NodeState {
    /// Serves a training Forward: the node's whole range on one microbatch, graph kept.
    pub(super) async fn train_forward(
        self: Arc<Self>,
        mut req: pb::ForwardRequest,
    ) -> Result<pb::ForwardResponse, NodeError> {
        let _admitted = self.lifecycle.admit()?;
        self.caps.check_budget()?;
        self.trainer()?;
        let received_ms = crate::now_ms();
        if req.start_pos != 0 {
            return Err(NodeError::BadRequest(
                "a training microbatch starts at position 0".into(),
            ));
        }
        let targets = req.targets.take().map(|t| t.ids);
        let forward = self.parse_call(req)?;
        self.check_whole_range(&forward.served, forward.layers)?;
        let tokens = forward.tokens;
        let call = Call {
            served: forward.served,
            microbatch: forward.session_id,
            layers: forward.layers,
            proof: forward.proof,
            reply_dtype: forward.reply_dtype,
        };
        let flops = self
            .model
            .config
            .forward_flops(call.layers.to_range(), 0, tokens as u64);
        let input_hash = forward.input_hash;
        let work = Work::Forward {
            input: forward.input,
            targets,
        };
        let (done, compute, weights_hash) = self.clone().train_compute(&call, work).await?;
        let Done::Forward(out) = done else {
            unreachable!("a forward gives a forward's result")
        };
        let hidden = self.model.config.hidden_size;
        let (tensor, row, output) = match out {
            TrainOutput::Hidden(values) => {
                let tensor = codec::encode(&values, &[1, tokens, hidden], call.reply_dtype);
                let row = values[values.len().saturating_sub(hidden)..].to_vec();
                (tensor.clone(), row, Output::Hidden(tensor_to_proto(tensor)))
            }
            TrainOutput::Loss(loss) => (loss_tensor(loss), vec![loss], Output::Loss(loss)),
        };
        use pb::forward_response::Output;
        let receipt = self.sign_training(
            &call,
            WorkKind::Forward,
            Measures {
                tokens,
                flops,
                input_hash,
                output_hash: tensor_hash(&tensor),
                fingerprint: Fingerprint::of(&row),
                weights_hash,
                received_ms,
            },
        );
        Ok(pb::ForwardResponse {
            output: Some(output),
            compute_us: compute.as_micros() as u64,
            receipt,
        })
    }

    /// Serves a Backward: backpropagates a microbatch whose training Forward ran here.
    pub(super) async fn backward(
        self: Arc<Self>,
        req: pb::BackwardRequest,
    ) -> Result<pb::BackwardResponse, NodeError> {
        let _admitted = self.lifecycle.admit()?;
        self.caps.check_budget()?;
        self.trainer()?;
        let received_ms = crate::now_ms();
        self.check_ids(&req.session_id, &req.model_id)?;
        let layers = span_from_proto(req.layers)?;
        let served = self.served();
        self.check_whole_range(&served, layers)?;
        let proof = parse_proof(&req.nonce, &req.requester_key)?;
        let hidden = self.model.config.hidden_size;
        let (grad, input_hash, tokens) = match req.grad_output {
            None => (None, [0; 32], None),
            Some(t) => {
                let tensor = tensor_from_proto(t)?;
                let shape = tensor.shape.clone();
                if shape.len() != 3 || shape[0] != 1 || shape[1] == 0 || shape[2] != hidden {
                    return Err(NodeError::BadRequest(format!(
                        "the output gradient must have shape [1, tokens, {hidden}], got {shape:?}"
                    )));
                }
                let hash = tensor_hash(&tensor);
                (Some(codec::decode(&tensor)?), hash, Some(shape[1]))
            }
        };
        let reply_dtype = match req.reply_dtype {
            0 => WireDType::F32,
            v => dtype_from_proto(v)?,
        };
        let call = Call {
            served,
            microbatch: req.session_id,
            layers,
            proof,
            reply_dtype,
        };
        let work = Work::Backward {
            grad,
            step: req.step,
        };
        let (done, compute, weights_hash) = self.clone().train_compute(&call, work).await?;
        let Done::Backward { grad_input, steps } = done else {
            unreachable!("a backward gives a backward's result")
        };
        let tokens = tokens
            .or(grad_input.as_ref().map(|g| g.len() / hidden))
            .unwrap_or(0);
        let grad_tensor = grad_input
            .as_ref()
            .map(|g| codec::encode(g, &[1, tokens, hidden], reply_dtype));
        let row = grad_input
            .as_deref()
            .map_or(&[][..], |g| &g[g.len().saturating_sub(hidden)..]);
        let receipt = self.sign_training(
            &call,
            WorkKind::Backward,
            Measures {
                tokens,
                // A backward costs about twice its forward.
                flops: 2 * self
                    .model
                    .config
                    .forward_flops(layers.to_range(), 0, tokens as u64),
                input_hash,
                output_hash: grad_tensor.as_ref().map_or([0; 32], tensor_hash),
                fingerprint: Fingerprint::of(row),
                weights_hash,
                received_ms,
            },
        );
        Ok(pb::BackwardResponse {
            grad_input: grad_tensor.map(tensor_to_proto),
            compute_us: compute.as_micros() as u64,
            receipt,
            inner_steps: steps,
        })
    }

    /// The node's trainer, or why it has none.
    fn trainer(&self) -> Result<&Trainer, NodeError> {
        self.trainer.as_ref().ok_or_else(|| {
            NodeError::NotTraining("this node does not train (start it with training on)".into())
        })
    }

    /// Training runs a node's whole range: its parameters move together.
    fn check_whole_range(&self, served: &Served, layers: LayerRange) -> Result<(), NodeError> {
        if layers != served.range {
            return Err(NodeError::WrongLayers {
                asked: layers,
                serves: served.range,
            });
        }
        Ok(())
    }

    /// Runs a training call off the reactor, in the node's compute threads and turn.
    async fn train_compute(
        self: Arc<Self>,
        call: &Call,
        work: Work,
    ) -> Result<(Done, Duration, [u8; 32]), NodeError> {
        let turn = self.duty.turn().await;
        self.busy.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let served = call.served.clone();
        let microbatch = call.microbatch.clone();
        let state = self.clone();
        let result = tokio::task::spawn_blocking(move || {
            let started = std::time::Instant::now();
            let out = state.threads.install(|| {
                std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    state.run_training(&served, &microbatch, work)
                }))
            });
            let compute = started.elapsed();
            (out, compute)
        })
        .await;
        self.busy.fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
        let (out, compute) =
            result.map_err(|e| NodeError::BadRequest(format!("compute task failed: {e}")))?;
        turn.finish(compute);
        match out {
            Ok(out) => {
                let (done, weights_hash) = out?;
                Ok((done, compute, weights_hash))
            }
            Err(_) => {
                // The stage may be half-updated: drop it, to be loaded again.
                self.trainer()?
                    .stage
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .take();
                Err(NodeError::BadRequest(
                    "training compute failed; the stage was dropped".into(),
                ))
            }
        }
    }

    /// Runs `work` on the trainable stage of `served`, loading it first if needed.
    fn run_training(
        &self,
        served: &Served,
        microbatch: &str,
        work: Work,
    ) -> Result<(Done, [u8; 32]), NodeError> {
        let trainer = self.trainer()?;
        let mut stage = trainer.stage.lock().unwrap_or_else(PoisonError::into_inner);
        if stage.as_ref().is_none_or(|s| s.range != served.range) {
            let device = served
                .shard
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .device()
                .clone();
            let shard = TrainShard::load(
                &self.model_dir,
                served.range.to_range(),
                &device,
                trainer.config.clone(),
            )?;
            *stage = Some(Stage {
                range: served.range,
                shard,
            });
        }
        let stage = &mut stage.as_mut().expect("loaded above").shard;
        let weights_hash = stage.shard().weights_hash(served.range.to_range())?;
        let done = match work {
            Work::Forward { input, targets } => {
                Done::Forward(stage.forward(microbatch, input, targets.as_deref())?)
            }
            Work::Backward { grad, step } => {
                let grad_input = stage.backward(microbatch, grad)?;
                if step {
                    stage.step()?;
                }
                Done::Backward {
                    grad_input,
                    steps: stage.steps(),
                }
            }
        };
        Ok((done, weights_hash))
    }

    /// Signs and records the receipt of a training call, when the caller asked for one.
    fn sign_training(&self, call: &Call, kind: WorkKind, m: Measures) -> Vec<u8> {
        let Some((nonce, requester)) = call.proof else {
            return Vec::new();
        };
        let receipt = ReceiptBody {
            version: neuroshard_proof::receipt::BODY_VERSION,
            kind,
            worker: self.key.public().0,
            requester: requester.0,
            model_id: self.model.id.clone(),
            weights_hash: m.weights_hash,
            layers: call.layers,
            session_id: call.microbatch.clone(),
            start_pos: 0,
            tokens: m.tokens as u32,
            flops: m.flops,
            input_hash: m.input_hash,
            output_hash: m.output_hash,
            fingerprint: m.fingerprint,
            nonce,
            received_ms: m.received_ms,
            replied_ms: crate::now_ms().max(m.received_ms),
        }
        .sign(&self.key);
        self.ledger.issued(receipt.clone());
        receipt.to_wire()
    }

    /// The trainable stage's flat parameters and accumulated gradient, for tests and the
    /// outer loop; none before the first training call.
    pub(super) fn training_snapshot(&self) -> Option<(Vec<f32>, Vec<f32>)> {
        let trainer = self.trainer.as_ref()?;
        let mut stage = trainer.stage.lock().unwrap_or_else(PoisonError::into_inner);
        let stage = &mut stage.as_mut()?.shard;
        Some((stage.parameters(), stage.gradients()))
    }
}

/// What a training receipt attests besides the call.
struct Measures {
    tokens: usize,
    flops: u64,
    input_hash: [u8; 32],
    output_hash: [u8; 32],
    fingerprint: Fingerprint,
    weights_hash: [u8; 32],
    received_ms: u64,
}

/// A loss as the one-value tensor its receipt hashes.
pub fn loss_tensor(loss: f32) -> codec::WireTensor {
    codec::encode(&[loss], &[1], WireDType::F32)
}
