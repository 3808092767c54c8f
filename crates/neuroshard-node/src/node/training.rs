//! Training on a node: the training Forward (the node's whole range with autodiff over one
//! microbatch, kept until its Backward), the Backward RPC, and AdamW inner steps. Both calls
//! earn receipts as inference does.
//!
//! A node trains only when its config asks ([`NodeConfig::train`](super::NodeConfig)); its
//! trainable copy of the shard is loaded on the first training call, on the served shard's
//! device, and loaded again after a change of layers.

use neuroshard_base::sync::LockExt;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use neuroshard_base::{LayerRange, NodeId, PublicKey};
use neuroshard_model::codec::{self, WireDType};
use neuroshard_model::{ShardInput, TrainOutput, TrainShard};
use neuroshard_proof::{Fingerprint, ReceiptBody, WorkKind};
use neuroshard_proto as pb;
use neuroshard_train::run::RunManifest;

use super::outer::{Exchange, Outer, TrainingConfig};
use super::{NodeState, Served, parse_proof};
use neuroshard_client::loss_tensor;
use neuroshard_net::NodeError;
use neuroshard_net::convert::{dtype_from_proto, span_from_proto, tensor_hash, tensor_to_proto};
use neuroshard_net::pool::ConnectionPool;

/// The node's trainable copy of its shard, made on the first training call, with its outer
/// loop and the connections it exchanges over.
#[derive(Debug)]
pub(super) struct Trainer {
    pub(super) config: TrainingConfig,
    pub(super) stage: Mutex<Option<Stage>>,
    pub(super) exchange: Exchange,
    pub(super) pool: Arc<ConnectionPool>,
    /// The last checkpoint served, for the round it starts.
    pub(super) snapshot: Mutex<Option<Arc<super::checkpoint::Snapshot>>>,
    /// A checkpoint being received through PutCheckpoint.
    pub(super) incoming: Mutex<Option<super::checkpoint::Incoming>>,
    /// Held while the stage loads and probes its replicas, so that happens once.
    loading: tokio::sync::Mutex<()>,
    /// Replicas to exchange with besides known peers: the config's, replaceable live.
    pub(super) replicas: std::sync::RwLock<Vec<String>>,
    /// Pseudo-gradient bytes this node has sent to replicas (requests and replies).
    pub(super) exchange_sent: std::sync::atomic::AtomicU64,
    /// Keys of the replicas met, by address, to skip asking one whose contribution came in.
    pub(super) replica_keys: Mutex<std::collections::HashMap<String, [u8; 32]>>,
    /// Room for replicas' calls waiting for this node's contribution.
    pub(super) waiting: tokio::sync::Semaphore,
    /// A test fault has fired (they fire once).
    pub(super) fault_fired: std::sync::atomic::AtomicBool,
}

#[derive(Debug)]
pub(super) struct Stage {
    pub(super) range: LayerRange,
    pub(super) shard: TrainShard,
    pub(super) outer: Outer,
}

/// Checks that a node of `model_id` training `layers` as `id` belongs to `run`: its signature
/// holds, it trains that model, and a stage of exactly those layers names the key.
pub(super) fn check_membership(
    run: &RunManifest,
    model_id: &str,
    layers: LayerRange,
    id: NodeId,
) -> Result<(), NodeError> {
    let bad = |problem: String| NodeError::Config(format!("run {:?}: {problem}", run.run_id()));
    run.verify().map_err(|e| NodeError::Config(e.to_string()))?;
    if run.body.model_id != model_id {
        return Err(bad(format!(
            "it trains model {}, this node serves {model_id}",
            run.body.model_id
        )));
    }
    match run.stage(layers) {
        None => Err(bad(format!("no stage is layers {layers}"))),
        Some(stage) if !stage.replicas.contains(&id) => Err(bad(format!(
            "this node ({}) is not a replica of layers {layers}",
            id.short()
        ))),
        Some(_) => Ok(()),
    }
}

/// What a training call asks to do, for the run's check of its caller.
#[derive(Debug, Clone, Copy)]
pub(super) enum RunRole {
    /// Send microbatches (training Forward and Backward).
    Trainer,
    /// Exchange pseudo-gradients for the stage of these layers.
    Replica(LayerRange),
    /// Push a checkpoint.
    Pusher,
}

impl Trainer {
    /// A trainer calling its replicas through `pool`.
    pub(super) fn new(config: TrainingConfig, pool: Arc<ConnectionPool>) -> Self {
        Self {
            stage: Mutex::new(None),
            exchange: Exchange::default(),
            pool,
            snapshot: Mutex::new(None),
            incoming: Mutex::new(None),
            loading: tokio::sync::Mutex::new(()),
            fault_fired: Default::default(),
            waiting: tokio::sync::Semaphore::new(super::outer::MAX_WAITING),
            exchange_sent: Default::default(),
            replica_keys: Default::default(),
            replicas: std::sync::RwLock::new(config.replicas.clone()),
            config,
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
        tokens: usize,
        steps: u64,
        /// The step closed the outer round.
        sync_due: bool,
        round: u64,
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
        caller: PublicKey,
    ) -> Result<pb::ForwardResponse, NodeError> {
        let _admitted = self.lifecycle.admit()?;
        self.caps.check_budget()?;
        self.check_run_key(&caller, RunRole::Trainer)?;
        let received_ms = neuroshard_net::now_ms();
        if req.start_pos != 0 {
            return Err(NodeError::BadRequest(
                "a training microbatch starts at position 0".into(),
            ));
        }
        let targets = req.targets.take().map(|t| t.ids);
        let forward = self.parse_call(req, caller)?;
        self.check_whole_range(&forward.served, forward.layers)?;
        self.ensure_stage(&forward.served).await?;
        let (tokens, input_hash) = (forward.tokens, forward.input_hash);
        let (call, work) = forward_work(forward, targets);
        let flops = self
            .model
            .config
            .forward_flops(call.layers.to_range(), 0, tokens as u64);
        let (done, compute, weights_hash) = self.clone().train_compute(&call, work, caller).await?;
        let Done::Forward(out) = done else {
            unreachable!("a forward gives a forward's result")
        };
        let (tensor, row, output) = self.train_forward_output(out, tokens, call.reply_dtype);
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
        caller: PublicKey,
    ) -> Result<pb::BackwardResponse, NodeError> {
        let _admitted = self.lifecycle.admit()?;
        self.caps.check_budget()?;
        self.check_run_key(&caller, RunRole::Trainer)?;
        let received_ms = neuroshard_net::now_ms();
        let (served, layers) = self.backward_range(&req)?;
        self.ensure_stage(&served).await?;
        let (call, work, input_hash) = self.backward_work(req, served, layers, &caller)?;
        let (done, compute, weights_hash) = self.clone().train_compute(&call, work, caller).await?;
        let Done::Backward {
            grad_input,
            tokens,
            steps,
            sync_due,
            mut round,
        } = done
        else {
            unreachable!("a backward gives a backward's result")
        };
        if sync_due {
            round = self.outer_sync().await?;
        }
        let hidden = self.model.config.hidden_size;
        let grad_tensor = grad_input
            .as_ref()
            .map(|g| codec::encode(g, &[1, tokens, hidden], call.reply_dtype));
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
            outer_step: round,
        })
    }

    /// A training Forward's reply: the encoded output (hidden states in the caller's dtype,
    /// or the loss), the row its receipt fingerprints, and the reply's output field.
    fn train_forward_output(
        &self,
        out: TrainOutput,
        tokens: usize,
        reply_dtype: WireDType,
    ) -> (codec::WireTensor, Vec<f32>, pb::forward_response::Output) {
        use pb::forward_response::Output;
        let hidden = self.model.config.hidden_size;
        match out {
            TrainOutput::Hidden(values) => {
                let tensor = codec::encode(&values, &[1, tokens, hidden], reply_dtype);
                let row = values[values.len().saturating_sub(hidden)..].to_vec();
                (tensor.clone(), row, Output::Hidden(tensor_to_proto(tensor)))
            }
            TrainOutput::Loss(loss) => (loss_tensor(loss), vec![loss], Output::Loss(loss)),
        }
    }

    /// A Backward's checks before its stage is loaded: the ids, and the node's whole range.
    fn backward_range(
        &self,
        req: &pb::BackwardRequest,
    ) -> Result<(Arc<Served>, LayerRange), NodeError> {
        self.check_ids(&req.session_id, &req.model_id)?;
        let layers = span_from_proto(req.layers)?;
        let served = self.served();
        self.check_whole_range(&served, layers)?;
        Ok((served, layers))
    }

    /// A Backward's checks once its stage is loaded: the proof, the output gradient and the
    /// reply dtype; the checked call, its work and the hash of the gradient received.
    fn backward_work(
        &self,
        req: pb::BackwardRequest,
        served: Arc<Served>,
        layers: LayerRange,
        caller: &PublicKey,
    ) -> Result<(Call, Work, [u8; 32]), NodeError> {
        let proof = parse_proof(&req.nonce, &req.requester_key, caller)?;
        let (grad, input_hash) = self.output_gradient(req.grad_output)?;
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
        Ok((call, work, input_hash))
    }

    /// The output gradient a Backward brings, checked against the model's width, and its hash;
    /// none (hash zero) for the last stage, whose gradient starts from its loss.
    fn output_gradient(
        &self,
        grad_output: Option<pb::Tensor>,
    ) -> Result<(Option<Vec<f32>>, [u8; 32]), NodeError> {
        match grad_output {
            None => Ok((None, [0; 32])),
            Some(t) => {
                let (rows, hash) = self.decode_rows(t, "the output gradient")?;
                Ok((Some(rows), hash))
            }
        }
    }

    /// The node's trainer, or why it has none.
    pub(super) fn trainer(&self) -> Result<&Trainer, NodeError> {
        self.trainer.as_ref().ok_or_else(|| {
            NodeError::NotTraining("this node does not train (start it with training on)".into())
        })
    }

    /// Refuses `caller` unless the node's run lets it act as `role` (any caller, without a run).
    pub(super) fn check_run_key(&self, caller: &PublicKey, role: RunRole) -> Result<(), NodeError> {
        let Some(run) = &self.trainer()?.config.run else {
            return Ok(());
        };
        let id = caller.id();
        let (allowed, what) = match role {
            RunRole::Trainer => (run.is_trainer(&id), "a trainer"),
            RunRole::Replica(layers) => (run.is_replica(layers, &id), "a replica of this stage"),
            RunRole::Pusher if !run.body.allow_put_checkpoint => {
                return Err(NodeError::Forbidden(format!(
                    "run {:?} does not allow pushing checkpoints",
                    run.run_id()
                )));
            }
            RunRole::Pusher => (run.is_trainer(&id), "a trainer"),
        };
        match allowed {
            true => Ok(()),
            false => Err(NodeError::Forbidden(format!(
                "key {} is not {what} of run {:?}",
                id.short(),
                run.run_id()
            ))),
        }
    }

    /// Training runs a node's whole range: its parameters move together.
    pub(super) fn check_whole_range(
        &self,
        served: &Served,
        layers: LayerRange,
    ) -> Result<(), NodeError> {
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
        caller: PublicKey,
    ) -> Result<(Done, Duration, [u8; 32]), NodeError> {
        let turn = self.duty.turn(caller).await?;
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
            result.map_err(|e| NodeError::Internal(format!("compute task failed: {e}")))?;
        turn.finish(compute);
        match out {
            Ok(out) => {
                let (done, weights_hash) = out?;
                Ok((done, compute, weights_hash))
            }
            Err(_) => {
                // The stage may be half-updated: drop it, to be loaded again.
                self.trainer()?.stage.lock_or_recover().take();
                Err(NodeError::BadRequest(
                    "training compute failed; the stage was dropped".into(),
                ))
            }
        }
    }

    /// Loads the trainable stage of `served` if it is not loaded (or holds other layers), and
    /// on a fresh load probes the replicas: a node that finds them in a later round fetches
    /// that round's weights from one of them instead of starting behind.
    pub(super) async fn ensure_stage(
        self: &Arc<Self>,
        served: &Arc<Served>,
    ) -> Result<(), NodeError> {
        let trainer = self.trainer()?;
        let _loading = trainer.loading.lock().await;
        let loaded = trainer
            .stage
            .lock_or_recover()
            .as_ref()
            .is_some_and(|s| s.range == served.range);
        if loaded {
            return Ok(());
        }
        let state = self.clone();
        let served = served.clone();
        tokio::task::spawn_blocking(move || state.load_stage(&served))
            .await
            .map_err(|e| NodeError::BadRequest(format!("loading the stage failed: {e}")))??;
        self.join_replicas().await
    }

    fn load_stage(&self, served: &Served) -> Result<(), NodeError> {
        let trainer = self.trainer()?;
        let device = served.shard.lock_or_recover().device().clone();
        let shard = self.threads.install(|| {
            TrainShard::load(
                &self.model_dir,
                served.range.to_range(),
                &device,
                trainer.config.inner.clone(),
            )
        })?;
        let outer = Outer::new(&trainer.config, shard.parameters(), shard.steps())?;
        *trainer.stage.lock_or_recover() = Some(Stage {
            range: served.range,
            shard,
            outer,
        });
        trainer.exchange.enter(0);
        Ok(())
    }

    /// Runs `work` on the trainable stage of `served`.
    fn run_training(
        &self,
        served: &Served,
        microbatch: &str,
        work: Work,
    ) -> Result<(Done, [u8; 32]), NodeError> {
        let trainer = self.trainer()?;
        let mut guard = trainer.stage.lock_or_recover();
        let stage = guard
            .as_mut()
            .filter(|s| s.range == served.range)
            .ok_or_else(|| NodeError::NotTraining("the trainable stage was dropped".into()))?;
        let weights_hash = stage.shard.shard().weights_hash(served.range.to_range())?;
        let done = match work {
            Work::Forward { input, targets } => {
                Done::Forward(stage.shard.forward(microbatch, input, targets.as_deref())?)
            }
            Work::Backward { grad, step } => {
                let tokens = stage.shard.pending_tokens(microbatch).unwrap_or(0);
                let grad_input = stage.shard.backward(microbatch, grad)?;
                if step {
                    stage.shard.step()?;
                }
                let steps = stage.shard.steps();
                Done::Backward {
                    grad_input,
                    tokens,
                    steps,
                    sync_due: step
                        && steps - stage.outer.steps_at_start >= trainer.config.outer_every,
                    round: stage.outer.round,
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
            replied_ms: neuroshard_net::now_ms().max(m.received_ms),
        }
        .sign(&self.key);
        self.ledger.issued(receipt.clone());
        receipt.to_wire()
    }

    /// The trainable stage's flat parameters and accumulated gradient, for tests and the
    /// outer loop; none before the first training call.
    pub(super) fn training_snapshot(&self) -> Option<TrainingSnapshot> {
        let trainer = self.trainer.as_ref()?;
        let mut stage = trainer.stage.lock_or_recover();
        let stage = stage.as_mut()?;
        Some(TrainingSnapshot {
            parameters: stage.shard.parameters(),
            gradients: stage.shard.gradients(),
            inner_steps: stage.shard.steps(),
            outer_round: stage.outer.round,
            exchange_bytes_sent: trainer
                .exchange_sent
                .load(std::sync::atomic::Ordering::Relaxed),
        })
    }
}

/// A training node's state, for tests and reports.
#[derive(Debug, Clone, PartialEq)]
pub struct TrainingSnapshot {
    /// Parameters in the stage's flat order.
    pub parameters: Vec<f32>,
    /// The gradient accumulated since the last inner step (a sum over microbatches).
    pub gradients: Vec<f32>,
    /// Inner steps taken.
    pub inner_steps: u64,
    /// The outer round in progress.
    pub outer_round: u64,
    /// Pseudo-gradient bytes sent to replicas so far.
    pub exchange_bytes_sent: u64,
}

/// A training Forward's checked call and its work: the microbatch's input and targets.
fn forward_work(forward: super::forward::ForwardCall, targets: Option<Vec<u32>>) -> (Call, Work) {
    let call = Call {
        served: forward.served,
        microbatch: forward.session_id,
        layers: forward.layers,
        proof: forward.proof,
        reply_dtype: forward.reply_dtype,
    };
    let work = Work::Forward {
        input: forward.input,
        targets,
    };
    (call, work)
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
