//! Checkpoints, server side: `GetCheckpoint` streams the training stage's weights at the start
//! of its current outer round (or, on a node that does not train, the weights it serves, for
//! any layers inside its range: how a joining node fetches its weights instead of reading them
//! from disk), `PutCheckpoint` takes a stage's weights (resuming a cut transfer), and a node
//! behind its replicas catches up from one of them.

use neuroshard_base::sync::LockExt;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use neuroshard_base::{LayerRange, PublicKey};
use neuroshard_model::fetched::MODEL_FILES;
use neuroshard_proto as pb;
use neuroshard_train::checkpoint::{Assembly, Manifest, whole_hash};

use super::training::{RunRole, Trainer};
use super::{Fault, NodeState, Served};
use neuroshard_client::checkpoint::{
    Checkpoint, fetch_checkpoint, manifest_from_proto, manifest_to_proto, parameter_bytes,
};
use neuroshard_net::NodeError;
use neuroshard_net::convert::{span_from_proto, span_to_proto};

/// GetCheckpoint streams a node serves at once: each holds a snapshot of up to the shard's
/// weights until it ends.
pub(super) const MAX_STREAMS: usize = 8;

/// GetCheckpoint streams one caller address may hold open at once.
pub(super) const MAX_STREAMS_PER_IP: usize = 2;

/// Most chunk numbers one request may name.
const MAX_CHUNKS_ASKED: usize = 1 << 16;

/// A stage's checkpoint as served: the round, its bytes and their manifest.
#[derive(Debug)]
pub(crate) struct Snapshot {
    pub(super) round: u64,
    bytes: Vec<u8>,
    pub(super) manifest: Manifest,
}

impl Snapshot {
    /// The checkpoint of `parameters` starting round `round`, cut into chunks of `chunk_bytes`.
    fn new(round: u64, parameters: &[f32], chunk_bytes: u32) -> Arc<Self> {
        let bytes = parameter_bytes(parameters);
        let manifest = Manifest::of(&bytes, chunk_bytes);
        Arc::new(Self {
            round,
            bytes,
            manifest,
        })
    }
}

/// The chunks of one GetCheckpoint reply, cut from the snapshot as they are sent.
#[derive(Debug)]
pub(crate) struct Chunks {
    snapshot: Arc<Snapshot>,
    wanted: Vec<usize>,
    next: usize,
    model_id: String,
    layers: LayerRange,
    /// Test faults: a chunk to corrupt, a message count after which the stream breaks.
    corrupt: Option<usize>,
    cut: Option<usize>,
}

impl Iterator for Chunks {
    type Item = Result<pb::CheckpointChunk, tonic::Status>;

    fn next(&mut self) -> Option<Self::Item> {
        let n = self.next;
        let &index = self.wanted.get(n)?;
        self.next += 1;
        if self.cut == Some(n) {
            self.wanted.clear();
            // The stream ends here with an error, as a dropped connection would.
            return Some(Err(tonic::Status::unavailable("the connection dropped")));
        }
        let snapshot = &self.snapshot;
        let range = snapshot
            .manifest
            .range(index)
            .expect("chunk numbers were checked");
        let mut data = snapshot.bytes[range.start as usize..range.end as usize].to_vec();
        if self.corrupt == Some(index) {
            data[0] ^= 0x5a;
        }
        Some(Ok(pb::CheckpointChunk {
            model_id: self.model_id.clone(),
            layers: Some(span_to_proto(self.layers)),
            manifest: (n == 0).then(|| manifest_to_proto(&snapshot.manifest, snapshot.round)),
            index: index as u32,
            data,
        }))
    }
}

/// Bytes of a model file one GetModelFile reply carries.
pub(crate) const MODEL_FILE_PIECE: u64 = 4 * 1024 * 1024;

/// A checkpoint arriving through PutCheckpoint.
#[derive(Debug)]
pub(crate) struct Incoming {
    round: u64,
    assembly: Assembly,
}

/// The chunk numbers a GetCheckpoint asks for (all of them when it names none), sorted and
/// deduplicated, each checked against the checkpoint's `chunks`.
fn chunks_wanted(asked: &[u32], chunks: usize) -> Result<Vec<usize>, NodeError> {
    if asked.len() > MAX_CHUNKS_ASKED {
        return Err(NodeError::BadRequest(format!(
            "{} chunks asked for in one request; ask for at most {MAX_CHUNKS_ASKED}",
            asked.len()
        )));
    }
    let mut wanted: Vec<usize> = match asked.is_empty() {
        true => (0..chunks).collect(),
        false => asked.iter().map(|&i| i as usize).collect(),
    };
    wanted.sort_unstable();
    wanted.dedup();
    if let Some(&bad) = wanted.iter().find(|&&i| i >= chunks) {
        return Err(NodeError::BadRequest(format!(
            "chunk {bad} asked for; the checkpoint has {chunks}"
        )));
    }
    Ok(wanted)
}

/// Once the transfer is over: the checkpoint received whole, taken to be adopted, or else
/// (Err) the chunk numbers still missing.
fn take_whole(trainer: &Trainer) -> Result<Result<Incoming, Vec<u32>>, NodeError> {
    let mut incoming = trainer.incoming.lock_or_recover();
    let Some(current) = incoming.as_ref() else {
        return Err(NodeError::BadRequest(
            "no checkpoint manifest arrived".into(),
        ));
    };
    let missing = current.assembly.missing();
    if !missing.is_empty() {
        return Ok(Err(missing.into_iter().map(|i| i as u32).collect()));
    }
    Ok(Ok(incoming.take().expect("checked above")))
}

impl NodeState {
    /// Serves GetModelFile: a piece of one of the model's small files (a name outside
    /// [`MODEL_FILES`] is refused, so no other file of the machine is ever read).
    pub(super) async fn model_file(
        &self,
        req: pb::ModelFileRequest,
    ) -> Result<pb::ModelFileResponse, tonic::Status> {
        self.check_model(&req.model_id)
            .map_err(tonic::Status::from)?;
        if !MODEL_FILES.contains(&req.name.as_str()) {
            return Err(tonic::Status::invalid_argument(format!(
                "{:?} is not a model file a node hands out ({})",
                req.name,
                MODEL_FILES.join(", ")
            )));
        }
        let path = self.model_dir.join(&req.name);
        let read = tokio::task::spawn_blocking(move || -> std::io::Result<(Vec<u8>, u64)> {
            use std::io::{Read, Seek};
            let mut file = std::fs::File::open(&path)?;
            let total = file.metadata()?.len();
            file.seek(std::io::SeekFrom::Start(req.offset.min(total)))?;
            let mut data = Vec::new();
            file.take(MODEL_FILE_PIECE).read_to_end(&mut data)?;
            Ok((data, total))
        })
        .await
        .map_err(|e| tonic::Status::internal(e.to_string()))?;
        match read {
            Ok((data, total_bytes)) => {
                self.metrics.record_bytes(data.len(), 0);
                Ok(pb::ModelFileResponse { data, total_bytes })
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Err(tonic::Status::not_found(
                format!("this node's model has no {}", req.name),
            )),
            Err(e) => Err(tonic::Status::internal(format!(
                "reading {}: {e}",
                req.name
            ))),
        }
    }

    /// The checkpoint of the round in progress, made once per round.
    pub(super) fn snapshot(&self) -> Result<Arc<Snapshot>, NodeError> {
        let trainer = self.trainer()?;
        let stage = trainer.stage.lock_or_recover();
        let stage = stage
            .as_ref()
            .ok_or_else(|| NodeError::NotTraining("this node has not started training".into()))?;
        let mut cached = trainer.snapshot.lock_or_recover();
        let round = stage.outer.round + self.rounds_claimed_ahead();
        if let Some(s) = cached.as_ref().filter(|s| s.round == round) {
            return Ok(s.clone());
        }
        let snapshot = Snapshot::new(
            round,
            &stage.outer.start,
            trainer.config.checkpoint_chunk_bytes,
        );
        *cached = Some(snapshot.clone());
        Ok(snapshot)
    }

    /// The checkpoint of the served weights of `layers` (round 0). Transfers of the same
    /// layers share one while any is streaming; the last to end frees it (made again, the
    /// bytes and hashes are the same, so a resumed transfer still matches).
    fn weights_snapshot(&self, layers: LayerRange) -> Result<Arc<Snapshot>, NodeError> {
        let mut cached = self.weights_snapshot.lock_or_recover();
        if let Some(s) = cached
            .as_ref()
            .filter(|(range, _)| *range == layers)
            .and_then(|(_, s)| s.upgrade())
        {
            return Ok(s);
        }
        let served = self.served();
        let parameters = served
            .shard
            .lock_or_recover()
            .parameters_of(layers.to_range())?;
        let snapshot = Snapshot::new(0, &parameters, neuroshard_train::checkpoint::CHUNK_BYTES);
        *cached = Some((layers, Arc::downgrade(&snapshot)));
        Ok(snapshot)
    }

    /// Serves GetCheckpoint: the manifest, then the chunks asked for (all by default). A
    /// training node serves its stage's round-start weights (its whole range); any other node
    /// the weights it serves, of any layers inside its range.
    pub(super) async fn get_checkpoint(
        self: Arc<Self>,
        req: pb::CheckpointRequest,
    ) -> Result<Chunks, NodeError> {
        // A paused node or one past its transfer cap hands out no weights; what streams
        // counts toward the cap as every byte the transport moves does.
        drop(self.lifecycle.admit()?);
        self.caps.check_budget()?;
        self.check_model(&req.model_id)?;
        let layers = span_from_proto(req.layers)?;
        let training = self.trainer.is_some();
        self.check_checkpoint_layers(layers, training)?;
        let state = self.clone();
        let snapshot = tokio::task::spawn_blocking(move || match training {
            true => state.snapshot(),
            false => state.weights_snapshot(layers),
        })
        .await
        .map_err(|e| NodeError::BadRequest(format!("checkpoint task failed: {e}")))??;
        if !req.whole_hash.is_empty() && req.whole_hash != snapshot.manifest.hash {
            return Err(NodeError::CheckpointChanged(format!(
                "the checkpoint asked for is gone: this node is in round {} now",
                snapshot.round
            )));
        }
        let wanted = chunks_wanted(&req.chunks, snapshot.manifest.chunks())?;
        let (corrupt, cut) = self.checkpoint_faults(&wanted);
        Ok(Chunks {
            snapshot,
            wanted,
            next: 0,
            model_id: self.model.id.clone(),
            layers,
            corrupt,
            cut,
        })
    }

    /// Serves PutCheckpoint: assembles the chunks (keeping a cut transfer's for the next
    /// request under the same manifest) and, once whole and verified, makes them the stage's
    /// weights and round.
    pub(super) async fn put_checkpoint(
        self: Arc<Self>,
        mut chunks: tonic::Streaming<pb::CheckpointChunk>,
        caller: PublicKey,
    ) -> Result<pb::PutCheckpointResponse, NodeError> {
        use futures::StreamExt;
        let trainer = self.trainer()?;
        self.check_run_key(&caller, RunRole::Pusher)?;
        let served = self.served();
        self.ensure_stage(&served).await?;
        let mut layers_seen: Option<LayerRange> = None;
        let mut received = 0u64;
        let deadline = self.chunk_deadline();
        // A transfer cut, or stalled past the deadline: what arrived is kept.
        while let Ok(Some(Ok(message))) = tokio::time::timeout(deadline, chunks.next()).await {
            let (layers, accepted) = self.accept_chunk(trainer, &served, message)?;
            layers_seen = Some(layers);
            received += accepted;
        }
        if layers_seen.is_none() {
            return Err(NodeError::BadRequest("no checkpoint chunk arrived".into()));
        }
        let whole = match take_whole(trainer)? {
            Ok(whole) => whole,
            Err(missing) => {
                return Ok(pb::PutCheckpointResponse {
                    bytes_received: received,
                    missing,
                    outer_step: 0,
                });
            }
        };
        let round = whole.round;
        let bytes = whole
            .assembly
            .finish()
            .map_err(|e| NodeError::BadRequest(e.to_string()))?;
        let checkpoint = Checkpoint::from_bytes(round, &bytes)?;
        let round = self.adopt(checkpoint).await?;
        Ok(pb::PutCheckpointResponse {
            bytes_received: received,
            missing: Vec::new(),
            outer_step: round,
        })
    }

    /// How long a checkpoint stream to or from this node may go without moving a chunk.
    pub(super) fn chunk_deadline(&self) -> std::time::Duration {
        self.trainer
            .as_ref()
            .map_or(neuroshard_train::checkpoint::CHUNK_DEADLINE, |t| {
                t.config.checkpoint_chunk_deadline
            })
    }

    /// Checks the layers a GetCheckpoint asks for: a training node serves its whole range,
    /// any other node any layers inside its range.
    fn check_checkpoint_layers(&self, layers: LayerRange, training: bool) -> Result<(), NodeError> {
        let served = self.served();
        match training {
            true => self.check_whole_range(&served, layers)?,
            false if layers.is_empty() || !served.range.covers(&layers) => {
                return Err(NodeError::WrongLayers {
                    asked: layers,
                    serves: served.range,
                });
            }
            false => {}
        }
        Ok(())
    }

    /// The test faults a GetCheckpoint reply carries (a chunk to corrupt, a message count to
    /// cut after); they fire on a training node's first transfer only.
    fn checkpoint_faults(&self, wanted: &[usize]) -> (Option<usize>, Option<usize>) {
        let trainer = self.trainer.as_ref();
        let fire = || trainer.is_some_and(|t| !t.fault_fired.swap(true, Ordering::Relaxed));
        match &self.fault {
            Some(Fault::CorruptChunk(c)) if wanted.contains(c) && fire() => (Some(*c), None),
            Some(Fault::CutCheckpointAfter(c)) if *c < wanted.len() && fire() => (None, Some(*c)),
            _ => (None, None),
        }
    }

    /// Takes one PutCheckpoint message into the checkpoint being received: checks its model
    /// and layers, starts a new assembly on a new manifest, and keeps the chunk. Its layers,
    /// and the bytes kept (none for a refused chunk).
    fn accept_chunk(
        &self,
        trainer: &Trainer,
        served: &Served,
        message: pb::CheckpointChunk,
    ) -> Result<(LayerRange, u64), NodeError> {
        self.check_model(&message.model_id)?;
        let layers = span_from_proto(message.layers)?;
        self.check_whole_range(served, layers)?;
        let mut incoming = trainer.incoming.lock_or_recover();
        if let Some(manifest) = message.manifest {
            self.begin_incoming(&mut incoming, manifest)?;
        }
        let Some(current) = incoming.as_mut() else {
            return Err(NodeError::BadRequest(
                "a checkpoint chunk came before its manifest".into(),
            ));
        };
        match current
            .assembly
            .accept(message.index as usize, &message.data)
        {
            Ok(()) => Ok((layers, message.data.len() as u64)),
            // A corrupted chunk is refused by number and listed as missing below.
            Err(e) => {
                tracing::warn!("PutCheckpoint: {e}");
                Ok((layers, 0))
            }
        }
    }

    /// Checks a manifest against the stage's size and, unless it is the one being received
    /// (a resumed transfer), starts assembling it afresh.
    fn begin_incoming(
        &self,
        incoming: &mut Option<Incoming>,
        manifest: pb::CheckpointManifest,
    ) -> Result<(), NodeError> {
        let (manifest, round) = manifest_from_proto(manifest)?;
        let expected = self.stage_parameters()? as u64 * 4;
        if manifest.total_bytes != expected {
            return Err(NodeError::BadRequest(format!(
                "a checkpoint of {} bytes for a stage of {expected}",
                manifest.total_bytes
            )));
        }
        let same = incoming
            .as_ref()
            .is_some_and(|i| i.assembly.manifest() == &manifest && i.round == round);
        if !same {
            let assembly = Assembly::new(manifest, expected)
                .map_err(|e| NodeError::BadRequest(e.to_string()))?;
            *incoming = Some(Incoming { round, assembly });
        }
        Ok(())
    }

    /// Makes `checkpoint` the stage's weights and the start of its round.
    async fn adopt(self: &Arc<Self>, checkpoint: Checkpoint) -> Result<u64, NodeError> {
        let trainer = self.trainer()?;
        let state = self.clone();
        let round = checkpoint.round;
        tokio::task::spawn_blocking(move || -> Result<(), NodeError> {
            let trainer = state.trainer()?;
            let mut stage = trainer.stage.lock_or_recover();
            let stage = stage.as_mut().ok_or_else(|| {
                NodeError::NotTraining("this node has not started training".into())
            })?;
            stage.shard.set_parameters(&checkpoint.parameters)?;
            let steps = stage.shard.steps();
            stage
                .outer
                .restart(checkpoint.round, checkpoint.parameters, steps);
            Ok(())
        })
        .await
        .map_err(|e| NodeError::BadRequest(format!("checkpoint task failed: {e}")))??;
        trainer.exchange.enter(round);
        Ok(round)
    }

    /// Fetches the weights of the round `addr` is in and adopts them. Under a run, only the
    /// weights of a round a majority of the stage's replicas sign, checked against the hash
    /// they signed; else nothing changes and the error says why.
    pub(super) async fn catch_up(
        self: &Arc<Self>,
        addr: &str,
        layers: LayerRange,
    ) -> Result<u64, NodeError> {
        let trainer = self.trainer()?;
        let expected = self.stage_parameters()? as u64 * 4;
        let signed = match &trainer.config.run {
            Some(run) => {
                let own = trainer.exchange.lock().round();
                Some(self.majority_round(trainer, run, layers, own).await?)
            }
            None => None,
        };
        let mut client = trainer
            .pool
            .client(&self.replica_target(addr))
            .await?
            .client
            .clone();
        let (checkpoint, report) =
            fetch_checkpoint(&mut client, &self.model.id, layers, expected, |p| {
                tracing::debug!("catching up from {addr}: {} of {} bytes", p.done, p.total);
            })
            .await?;
        if checkpoint.parameters.len() as u64 * 4 != expected {
            return Err(NodeError::BadRequest(format!(
                "{addr} sent {} parameters for a stage of {}",
                checkpoint.parameters.len(),
                expected / 4
            )));
        }
        if let Some((round, hash)) = signed {
            let got = whole_hash(&parameter_bytes(&checkpoint.parameters));
            if (checkpoint.round, got) != (round, hash) {
                return Err(NodeError::Forbidden(format!(
                    "{addr} sent weights of round {} that are not those a majority of the \
                     stage signed for round {round}",
                    checkpoint.round
                )));
            }
        }
        tracing::info!(
            "caught up with {addr} at round {} ({} bytes, {} requests)",
            checkpoint.round,
            report.total_bytes,
            report.requests
        );
        self.adopt(checkpoint).await
    }

    /// Asks the replicas which round they are in; one in a later round is caught up with.
    pub(super) async fn join_replicas(self: &Arc<Self>) -> Result<(), NodeError> {
        let trainer = self.trainer()?;
        let layers = self.served().range;
        let probe = pb::ExchangeGradientRequest {
            model_id: self.model.id.clone(),
            layers: Some(span_to_proto(layers)),
            ..Default::default()
        };
        // A probe carries no contribution: the replies say only which round each replica is in.
        let mut gathered = neuroshard_train::round::Gathered::<String, ()>::default();
        for addr in self.replica_addrs(layers) {
            let timeout = std::time::Duration::from_secs(5);
            let to = self.replica_target(&addr);
            match super::outer::ask_replica(trainer, to, probe.clone(), timeout).await {
                (addr, Ok(Ok(reply))) => gathered.reply(0, addr, reply.outer_step, None),
                (addr, Ok(Err(e))) => {
                    tracing::debug!("replica {addr} did not answer the probe: {e}")
                }
                (addr, Err(_)) => {
                    tracing::debug!("replica {addr} did not answer the probe in time")
                }
            }
        }
        if let Some((round, addr)) = gathered.ahead {
            tracing::info!("replicas are in round {round}: fetching the weights from {addr}");
            match self.catch_up(&addr, layers).await {
                // A round the run's replicas do not sign by majority: train on from here.
                Err(e @ NodeError::Forbidden(_)) => tracing::warn!("not catching up: {e}"),
                other => {
                    other?;
                }
            }
        }
        Ok(())
    }
}
