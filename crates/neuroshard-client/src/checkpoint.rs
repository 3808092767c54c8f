//! Checkpoints over the wire, client side: fetching a training stage's weights from a peer
//! (`GetCheckpoint`) and pushing them to one (`PutCheckpoint`), chunk by hashed chunk, resuming
//! where a cut transfer stopped and asking again for a chunk that arrives corrupted.
//!
//! A checkpoint's bytes are the stage's flat parameters (little-endian f32, in the stage's
//! parameter order) at the start of an outer round; the manifest names the round.

use std::path::Path;
use std::time::Duration;

use futures::StreamExt;
use neuroshard_base::LayerRange;
use neuroshard_model::ModelInfo;
use neuroshard_model::fetched::{MAX_MODEL_FILE_BYTES, MODEL_FILES, mark_fetched, write_atomic};
use neuroshard_proto as pb;
use neuroshard_train::checkpoint::{Assembly, CHUNK_DEADLINE, MAX_CHECKPOINT_BYTES, Manifest};
use pb::node_client::NodeClient;
use tonic::transport::Channel;

use neuroshard_net::convert::{span_from_proto, span_to_proto};
use neuroshard_net::{MAX_MESSAGE_BYTES, NodeError};

/// Requests one transfer may take before giving up.
pub const MAX_ATTEMPTS: usize = 6;

/// A stage's weights at the start of an outer round.
#[derive(Debug, Clone, PartialEq)]
pub struct Checkpoint {
    /// The outer round they start.
    pub round: u64,
    /// Flat parameters, in the stage's order.
    pub parameters: Vec<f32>,
}

impl Checkpoint {
    /// The bytes a checkpoint travels as.
    pub fn to_bytes(&self) -> Vec<u8> {
        parameter_bytes(&self.parameters)
    }

    /// The checkpoint of round `round` from its bytes; every value must be finite.
    pub fn from_bytes(round: u64, bytes: &[u8]) -> Result<Self, NodeError> {
        if !bytes.len().is_multiple_of(4) {
            return Err(NodeError::BadRequest(format!(
                "a checkpoint of {} bytes is not a whole number of f32 values",
                bytes.len()
            )));
        }
        let parameters: Vec<f32> = bytes
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes(b.try_into().expect("4 bytes")))
            .collect();
        if let Some(i) = parameters.iter().position(|v| !v.is_finite()) {
            return Err(NodeError::BadRequest(format!(
                "checkpoint parameter {i} is not finite"
            )));
        }
        Ok(Self { round, parameters })
    }
}

/// Flat parameters as a checkpoint's bytes: little-endian f32, in order.
pub fn parameter_bytes(parameters: &[f32]) -> Vec<u8> {
    parameters.iter().flat_map(|p| p.to_le_bytes()).collect()
}

/// How a transfer went: what a progress display and a test look at.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct TransferReport {
    /// Requests made (1 when nothing went wrong).
    pub requests: usize,
    /// Chunks moved, including any sent again.
    pub chunks_moved: usize,
    /// Chunks in the checkpoint.
    pub chunks: usize,
    /// Bytes in the checkpoint.
    pub total_bytes: u64,
    /// What went wrong on the way and was recovered from, in order.
    pub recovered: Vec<String>,
}

/// Progress of a transfer: bytes verified so far of the total.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Progress {
    /// Bytes in verified chunks.
    pub done: u64,
    /// Bytes in all.
    pub total: u64,
}

/// The wire form of a manifest for round `round`.
pub fn manifest_to_proto(m: &Manifest, round: u64) -> pb::CheckpointManifest {
    pb::CheckpointManifest {
        total_bytes: m.total_bytes,
        chunk_bytes: m.chunk_bytes,
        chunk_hashes: m.chunk_hashes.iter().map(|h| h.to_vec()).collect(),
        whole_hash: m.hash.to_vec(),
        outer_step: round,
    }
}

/// A manifest and its round from the wire, checked for the shape of every hash and size.
pub fn manifest_from_proto(m: pb::CheckpointManifest) -> Result<(Manifest, u64), NodeError> {
    let hash = |bytes: &[u8], what: &str| -> Result<[u8; 32], NodeError> {
        bytes.try_into().map_err(|_| {
            NodeError::BadRequest(format!(
                "checkpoint manifest: {what} has {} bytes, not 32",
                bytes.len()
            ))
        })
    };
    let manifest = Manifest {
        total_bytes: m.total_bytes,
        chunk_bytes: m.chunk_bytes,
        chunk_hashes: m
            .chunk_hashes
            .iter()
            .enumerate()
            .map(|(i, h)| hash(h, &format!("the hash of chunk {i}")))
            .collect::<Result<_, _>>()?,
        hash: hash(&m.whole_hash, "the whole hash")?,
    };
    manifest
        .check()
        .map_err(|e| NodeError::BadRequest(e.to_string()))?;
    Ok((manifest, m.outer_step))
}

/// Fetches the checkpoint of `layers` from the node `client` talks to, at most `max_bytes`,
/// telling `progress` after every verified chunk. A cut transfer asks again for the missing
/// chunks only; a corrupted chunk is refused by number and asked for again; a checkpoint that
/// changed on the server (a new round began) starts over.
pub async fn fetch_checkpoint(
    client: &mut NodeClient<Channel>,
    model_id: &str,
    layers: LayerRange,
    max_bytes: u64,
    mut progress: impl FnMut(Progress),
) -> Result<(Checkpoint, TransferReport), NodeError> {
    let mut report = TransferReport::default();
    let mut assembly: Option<(Assembly, u64)> = None;
    while report.requests < MAX_ATTEMPTS {
        report.requests += 1;
        let request = checkpoint_request(model_id, layers, assembly.as_ref().map(|(a, _)| a));
        let asked = tokio::time::timeout(CHUNK_DEADLINE, client.get_checkpoint(request));
        let mut stream = match asked.await.unwrap_or_else(|_| Err(stalled())) {
            Ok(stream) => stream.into_inner(),
            Err(status)
                if status.code() == tonic::Code::FailedPrecondition && assembly.is_some() =>
            {
                report.recovered.push(format!(
                    "the checkpoint changed on the server ({}); starting over",
                    status.message()
                ));
                assembly = None;
                continue;
            }
            Err(status) => {
                return Err(NodeError::Remote {
                    peer: "checkpoint source".into(),
                    status,
                });
            }
        };
        loop {
            let next = tokio::time::timeout(CHUNK_DEADLINE, stream.next());
            let message = match next.await.unwrap_or_else(|_| Some(Err(stalled()))) {
                None => break,
                Some(Ok(message)) => message,
                Some(Err(status)) => {
                    report
                        .recovered
                        .push(format!("the transfer was cut: {}", status.message()));
                    break;
                }
            };
            let limit = max_bytes.min(MAX_CHECKPOINT_BYTES);
            if let Some(done) = take_chunk(message, &mut assembly, &mut report, limit)? {
                progress(done);
            }
        }
        if let Some(checkpoint) = finished(&mut assembly)? {
            return Ok((checkpoint, report));
        }
    }
    Err(NodeError::BadRequest(format!(
        "the checkpoint did not arrive whole in {MAX_ATTEMPTS} requests: {}",
        report.recovered.join("; ")
    )))
}

/// The status of a transfer that moved no chunk within the deadline.
fn stalled() -> tonic::Status {
    tonic::Status::deadline_exceeded(format!("no chunk within {}s", CHUNK_DEADLINE.as_secs()))
}

/// The checkpoint, once `assembly` holds every chunk (and it is taken); none while chunks are
/// missing.
fn finished(assembly: &mut Option<(Assembly, u64)>) -> Result<Option<Checkpoint>, NodeError> {
    if !assembly
        .as_ref()
        .is_some_and(|(a, _)| a.missing().is_empty())
    {
        return Ok(None);
    }
    let (a, round) = assembly.take().expect("checked above");
    let bytes = a
        .finish()
        .map_err(|e| NodeError::BadRequest(e.to_string()))?;
    Ok(Some(Checkpoint::from_bytes(round, &bytes)?))
}

/// What to ask for: the whole checkpoint, or the chunks `assembly` still lacks of the one it
/// is assembling.
fn checkpoint_request(
    model_id: &str,
    layers: LayerRange,
    assembly: Option<&Assembly>,
) -> pb::CheckpointRequest {
    pb::CheckpointRequest {
        model_id: model_id.to_string(),
        layers: Some(span_to_proto(layers)),
        chunks: assembly.map_or_else(Vec::new, |a| {
            a.missing().into_iter().map(|i| i as u32).collect()
        }),
        whole_hash: assembly.map_or_else(Vec::new, |a| a.manifest().hash.to_vec()),
    }
}

/// Takes one streamed message: its manifest (which starts the assembly, or must match it) and
/// its chunk (a bad one is noted in `report` to ask for again). The progress a good chunk made.
fn take_chunk(
    message: pb::CheckpointChunk,
    assembly: &mut Option<(Assembly, u64)>,
    report: &mut TransferReport,
    limit: u64,
) -> Result<Option<Progress>, NodeError> {
    if let Some(manifest) = message.manifest {
        let (manifest, round) = manifest_from_proto(manifest)?;
        match &*assembly {
            Some((a, _)) if a.manifest() == &manifest => {}
            Some(_) => {
                return Err(NodeError::BadRequest(
                    "the server sent another checkpoint's manifest mid-transfer".into(),
                ));
            }
            None => {
                report.chunks = manifest.chunks();
                report.total_bytes = manifest.total_bytes;
                let new = Assembly::new(manifest, limit)
                    .map_err(|e| NodeError::BadRequest(e.to_string()))?;
                *assembly = Some((new, round));
            }
        }
    }
    let Some((a, _)) = assembly.as_mut() else {
        return Err(NodeError::BadRequest(
            "a checkpoint chunk came before its manifest".into(),
        ));
    };
    report.chunks_moved += 1;
    match a.accept(message.index as usize, &message.data) {
        Ok(()) => Ok(Some(Progress {
            done: a.received_bytes(),
            total: a.manifest().total_bytes,
        })),
        Err(e) => {
            report.recovered.push(format!("{e}; asking for it again"));
            Ok(None)
        }
    }
}

/// How long dialing a peer for its weights may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// A client of the node at `peer` (an address the owner gave: whoever answers there is pinned
/// for the channel), with the runtime's message limits.
async fn node_client(peer: &str) -> Result<NodeClient<Channel>, NodeError> {
    let dialler = neuroshard_net::tls::Dialler::ephemeral()?;
    let to = neuroshard_net::pool::Target::any(peer);
    let channel = neuroshard_net::pool::connect(&to, &dialler, CONNECT_TIMEOUT).await?;
    Ok(NodeClient::new(channel)
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES))
}

/// One of the model's small files from the node `client` talks to, in pieces, at most
/// [`MAX_MODEL_FILE_BYTES`]; none when the peer's model has no such file.
pub async fn fetch_model_file(
    client: &mut NodeClient<Channel>,
    peer: &str,
    model_id: &str,
    name: &str,
) -> Result<Option<Vec<u8>>, NodeError> {
    let mut data = Vec::new();
    loop {
        let request = pb::ModelFileRequest {
            model_id: model_id.to_string(),
            name: name.to_string(),
            offset: data.len() as u64,
        };
        let reply = match client.get_model_file(request).await {
            Ok(reply) => reply.into_inner(),
            Err(status) if status.code() == tonic::Code::NotFound => return Ok(None),
            Err(status) => {
                return Err(NodeError::Remote {
                    peer: peer.to_string(),
                    status,
                });
            }
        };
        if reply.total_bytes > MAX_MODEL_FILE_BYTES {
            return Err(NodeError::BadRequest(format!(
                "{peer} offers a {name} of {} bytes; at most {MAX_MODEL_FILE_BYTES} are taken",
                reply.total_bytes
            )));
        }
        let before = data.len() as u64;
        data.extend_from_slice(&reply.data);
        let have = data.len() as u64;
        if have > reply.total_bytes || (have == before && have < reply.total_bytes) {
            return Err(NodeError::BadRequest(format!(
                "{peer} sent {name} in pieces that do not add up to its {} bytes",
                reply.total_bytes
            )));
        }
        if have == reply.total_bytes {
            return Ok(Some(data));
        }
    }
}

/// The `config.json` of the model `model_id` the node at `peer` serves: what a list of the
/// swarm's models shows of each.
pub async fn peer_model_config(
    peer: &str,
    model_id: &str,
) -> Result<neuroshard_model::LlamaConfig, NodeError> {
    let mut client = node_client(peer).await?;
    let bytes = fetch_model_file(&mut client, peer, model_id, "config.json")
        .await?
        .ok_or_else(|| NodeError::BadRequest(format!("{peer} has no config.json")))?;
    let text = String::from_utf8(bytes)
        .map_err(|_| NodeError::BadRequest(format!("{peer}'s config.json is not UTF-8")))?;
    Ok(neuroshard_model::LlamaConfig::from_json(&text)?)
}

/// Fetches the model's small files (see [`MODEL_FILES`]) from the node at `peer` into `dir`,
/// each written whole, and marks `dir` as the fetched model `model_id`. `config.json` must come
/// and describe a model this runtime runs; the others come where the peer has them.
pub async fn fetch_model_files(peer: &str, model_id: &str, dir: &Path) -> Result<(), NodeError> {
    let mut client = node_client(peer).await?;
    fetch_files_with(&mut client, peer, model_id, dir).await
}

async fn fetch_files_with(
    client: &mut NodeClient<Channel>,
    peer: &str,
    model_id: &str,
    dir: &Path,
) -> Result<(), NodeError> {
    for &name in MODEL_FILES {
        match fetch_model_file(client, peer, model_id, name).await? {
            Some(data) => write_atomic(&dir.join(name), &data)?,
            None if name == "config.json" => {
                return Err(NodeError::BadRequest(format!(
                    "{peer} has no config.json for model {model_id}"
                )));
            }
            None => {}
        }
    }
    // The config must describe a model this runtime can run before anything is served from it.
    ModelInfo::with_id(dir, model_id)?;
    mark_fetched(dir, model_id)?;
    Ok(())
}

/// Fetches the weights of consecutive layer pieces of the model `model` from the peers that
/// serve them (`sources`: each peer with the layers it gives, in order, together one range),
/// verified chunk by chunk (see [`fetch_checkpoint`]), as the flat parameters of the whole
/// range. `progress` counts bytes over all the pieces.
pub async fn fetch_layers(
    sources: &[(String, LayerRange)],
    model: &ModelInfo,
    mut progress: impl FnMut(Progress),
) -> Result<(Vec<f32>, TransferReport), NodeError> {
    let counts: Vec<usize> = sources
        .iter()
        .map(|(_, layers)| {
            neuroshard_model::init::shard_parameter_count(&model.config, layers.to_range())
        })
        .collect();
    let total: u64 = counts.iter().map(|&c| c as u64 * 4).sum();
    let mut parameters = Vec::with_capacity(counts.iter().sum());
    let mut report = TransferReport::default();
    for ((peer, layers), count) in sources.iter().zip(counts) {
        let mut client = node_client(peer).await?;
        let before = parameters.len() as u64 * 4;
        let (checkpoint, piece) = fetch_checkpoint(
            &mut client,
            &model.id,
            *layers,
            count as u64 * 4,
            |p: Progress| {
                progress(Progress {
                    done: before + p.done,
                    total,
                })
            },
        )
        .await?;
        if checkpoint.parameters.len() != count {
            return Err(NodeError::BadRequest(format!(
                "{peer} sent {} parameters for layers {layers}, which hold {count}",
                checkpoint.parameters.len()
            )));
        }
        parameters.extend_from_slice(&checkpoint.parameters);
        report.requests += piece.requests;
        report.chunks += piece.chunks;
        report.chunks_moved += piece.chunks_moved;
        report.total_bytes += piece.total_bytes;
        report.recovered.extend(piece.recovered);
    }
    Ok((parameters, report))
}

/// Fetches the weights of `layers` from the node at `peer`, for a node that starts without
/// them on disk: asks the peer (Ping) which model it serves and which layers, takes the
/// model's small files from it when `dir` has no `config.json`, checks the config against
/// what the peer serves, streams the layers' checkpoint (verified chunk by chunk, see
/// [`fetch_checkpoint`]) and keeps it in `dir` for the next start. Returns the model under the
/// peer's id, the parameters and how the transfer went.
pub async fn fetch_weights(
    peer: &str,
    dir: &Path,
    layers: LayerRange,
    progress: impl FnMut(Progress),
) -> Result<(ModelInfo, Checkpoint, TransferReport), NodeError> {
    let mut client = node_client(peer).await?;
    let info = client
        .ping(pb::PingRequest {})
        .await
        .map_err(|status| NodeError::Remote {
            peer: peer.to_string(),
            status,
        })?
        .into_inner()
        .node
        .ok_or_else(|| NodeError::BadRequest(format!("{peer} did not say what it serves")))?;
    if !dir.join("config.json").exists() {
        fetch_files_with(&mut client, peer, &info.model_id, dir).await?;
    }
    let model = ModelInfo::with_id(dir, &info.model_id)?;
    let total = model.config.num_hidden_layers;
    if info.total_layers as usize != total {
        return Err(NodeError::Config(format!(
            "weights_from: {peer} serves a model of {} layers; {} says {total}",
            info.total_layers,
            dir.join("config.json").display()
        )));
    }
    let serves = span_from_proto(info.layers)?;
    if !serves.covers(&layers) {
        return Err(NodeError::Config(format!(
            "weights_from: {peer} serves layers {serves}, which do not hold {layers}"
        )));
    }
    let (parameters, report) =
        fetch_layers(&[(peer.to_string(), layers)], &model, progress).await?;
    keep_fetched(dir, &model.id, layers, &parameters);
    Ok((
        model,
        Checkpoint {
            round: 0,
            parameters,
        },
        report,
    ))
}

/// Stores fetched weights in `dir` for the next start; a failure costs a fetch then, so it is
/// logged, not fatal.
pub fn keep_fetched(dir: &Path, model_id: &str, layers: LayerRange, parameters: &[f32]) {
    if let Err(e) =
        neuroshard_model::fetched::save_shard(dir, model_id, layers.to_range(), parameters)
    {
        tracing::warn!("keeping the fetched weights of layers {layers}: {e}");
    }
}

/// Pushes `checkpoint` of `layers` to the node `client` talks to in chunks of `chunk_bytes`,
/// sending again whatever the receiver says is still missing.
pub async fn push_checkpoint(
    client: &mut NodeClient<Channel>,
    model_id: &str,
    layers: LayerRange,
    checkpoint: &Checkpoint,
    chunk_bytes: u32,
) -> Result<(pb::PutCheckpointResponse, TransferReport), NodeError> {
    let bytes = checkpoint.to_bytes();
    let manifest = Manifest::of(&bytes, chunk_bytes);
    let mut report = TransferReport {
        chunks: manifest.chunks(),
        total_bytes: manifest.total_bytes,
        ..TransferReport::default()
    };
    let mut wanted: Vec<usize> = (0..manifest.chunks()).collect();
    while report.requests < MAX_ATTEMPTS {
        report.requests += 1;
        let mut messages = Vec::with_capacity(wanted.len());
        for (n, &index) in wanted.iter().enumerate() {
            let range = manifest
                .range(index)
                .map_err(|e| NodeError::BadRequest(e.to_string()))?;
            let data = bytes[range.start as usize..range.end as usize].to_vec();
            messages.push(pb::CheckpointChunk {
                model_id: model_id.to_string(),
                layers: Some(span_to_proto(layers)),
                manifest: (n == 0).then(|| manifest_to_proto(&manifest, checkpoint.round)),
                index: index as u32,
                data,
            });
        }
        report.chunks_moved += messages.len();
        let reply = client
            .put_checkpoint(futures::stream::iter(messages))
            .await
            .map_err(|status| NodeError::Remote {
                peer: "checkpoint receiver".into(),
                status,
            })?
            .into_inner();
        if reply.missing.is_empty() {
            return Ok((reply, report));
        }
        report.recovered.push(format!(
            "the receiver is missing chunks {:?}; sending them again",
            reply.missing
        ));
        wanted = reply.missing.iter().map(|&i| i as usize).collect();
        if wanted.iter().any(|&i| i >= manifest.chunks()) {
            return Err(NodeError::BadRequest(
                "the receiver asked for a chunk the checkpoint does not have".into(),
            ));
        }
    }
    Err(NodeError::BadRequest(format!(
        "the checkpoint was not taken whole in {MAX_ATTEMPTS} requests"
    )))
}
