//! Conversions between the generated protobuf types and the domain types: tensors, dtypes,
//! layer spans, peer records and DHT records. The gRPC services and clients (node, tracker,
//! discovery, checkpoints) still build and read some protobuf messages themselves; their
//! fields meet the domain here.

use std::net::SocketAddr;

use neuroshard_base::{LayerRange, NodeId, NodeKey, PublicKey};
use neuroshard_dht::{Contact, Key, Record, RecordKey};
use neuroshard_model::codec::{WireDType, WireTensor};
use neuroshard_model::{Chosen, Precision, Sampler, SamplingParams};
use neuroshard_proto as pb;

use crate::NodeError;

/// Longest display name a peer may announce, in bytes: the settings' 40 characters at up to 4
/// bytes each.
pub const MAX_DISPLAY_NAME_BYTES: usize = 4 * neuroshard_base::MAX_DISPLAY_NAME_CHARS;

/// Most layers an announced model may have: the largest open models have about 130, and a peer
/// claiming billions would make readers look up every one.
pub const MAX_TOTAL_LAYERS: u32 = 1024;

/// Whether `name` may be shown to the swarm as a `display_name`; the reason when not.
pub fn check_display_name(name: &str) -> Result<(), neuroshard_base::Invalid> {
    if name.len() > MAX_DISPLAY_NAME_BYTES || name.chars().any(char::is_control) {
        let problem =
            format!("must be at most {MAX_DISPLAY_NAME_BYTES} bytes without control characters");
        return Err(neuroshard_base::Invalid::new("display_name", problem));
    }
    Ok(())
}

/// What a peer announces about itself: where it is and what it serves.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct PeerRecord {
    /// Its node id, the hash of `public_key`.
    pub node_id: NodeId,
    /// `host:port` of its gRPC server.
    pub addr: String,
    /// Id of the model it serves.
    pub model_id: String,
    /// Layers it serves.
    pub layers: LayerRange,
    /// Layers of the whole model.
    pub total_layers: u32,
    /// 0 idle .. 1 saturated.
    pub load: f32,
    /// Its ed25519 key; `node_id` is the key's hash.
    #[serde(skip)]
    pub public_key: PublicKey,
    /// The name its owner shows the swarm; empty for an anonymous node.
    pub display_name: String,
    /// `host:port` of the relay it runs for nodes nobody can dial; empty if none.
    pub relay: String,
    /// How it holds its projection weights.
    pub precision: Precision,
    /// Its decode compute per token per layer, ms, as it measures it; 0 where not measured.
    pub decode_ms_per_layer: f32,
}

impl PeerRecord {
    /// Whether peers reach it through a relay (an extra hop each way).
    pub fn is_relayed(&self) -> bool {
        self.addr.starts_with(neuroshard_nat::relay::SCHEME)
    }
}

/// A wire dtype from its protobuf enum value.
pub fn dtype_from_proto(value: i32) -> Result<WireDType, NodeError> {
    match pb::Dtype::try_from(value) {
        Ok(pb::Dtype::F32) => Ok(WireDType::F32),
        Ok(pb::Dtype::F16) => Ok(WireDType::F16),
        Ok(pb::Dtype::Bf16) => Ok(WireDType::BF16),
        Ok(pb::Dtype::Int8Block) => Ok(WireDType::Int8Block),
        _ => Err(
            neuroshard_model::codec::CodecError::UnknownDType(format!("enum value {value}")).into(),
        ),
    }
}

/// The protobuf enum value of a wire dtype.
pub fn dtype_to_proto(dtype: WireDType) -> pb::Dtype {
    match dtype {
        WireDType::F32 => pb::Dtype::F32,
        WireDType::F16 => pb::Dtype::F16,
        WireDType::BF16 => pb::Dtype::Bf16,
        WireDType::Int8Block => pb::Dtype::Int8Block,
    }
}

/// A received tensor as a domain tensor; shape and lengths are checked, nothing is allocated.
pub fn tensor_from_proto(t: pb::Tensor) -> Result<WireTensor, NodeError> {
    let dtype = dtype_from_proto(t.dtype)?;
    let lz4 = match pb::Compression::try_from(t.compression) {
        Ok(pb::Compression::None) => false,
        Ok(pb::Compression::Lz4) => true,
        Err(_) => {
            return Err(NodeError::BadRequest(format!(
                "tensor compression {} is unknown",
                t.compression
            )));
        }
    };
    let to_usize = |v: u64| usize::try_from(v).unwrap_or(usize::MAX);
    let tensor = WireTensor {
        dtype,
        shape: t.shape.into_iter().map(to_usize).collect(),
        payload: t.payload,
        lz4,
        raw_len: to_usize(t.raw_len),
    };
    tensor.validate()?;
    Ok(tensor)
}

/// A domain tensor as a protobuf message.
pub fn tensor_to_proto(t: WireTensor) -> pb::Tensor {
    pb::Tensor {
        dtype: dtype_to_proto(t.dtype) as i32,
        shape: t.shape.iter().map(|&d| d as u64).collect(),
        payload: t.payload,
        compression: if t.lz4 {
            pb::Compression::Lz4
        } else {
            pb::Compression::None
        } as i32,
        raw_len: t.raw_len as u64,
    }
}

/// SHA-256 of a tensor as it travels: dtype, shape, compression and payload. Worker and
/// requester hash the same bytes, so neither decodes anything to compare.
pub fn tensor_hash(t: &WireTensor) -> [u8; 32] {
    let shape: Vec<u8> = t
        .shape
        .iter()
        .flat_map(|&d| (d as u64).to_le_bytes())
        .collect();
    neuroshard_proof::content_hash(&[
        b"tensor",
        &[dtype_to_proto(t.dtype) as u8, t.lz4 as u8],
        &shape,
        &(t.raw_len as u64).to_le_bytes(),
        &t.payload,
    ])
}

/// SHA-256 of token ids as sent.
pub fn tokens_hash(ids: &[u32]) -> [u8; 32] {
    let bytes: Vec<u8> = ids.iter().flat_map(|id| id.to_le_bytes()).collect();
    neuroshard_proof::content_hash(&[b"tokens", &bytes])
}

/// A sampler as a Forward request carries it to the node that ends the model.
pub fn sample_to_proto(sampler: &Sampler) -> pb::Sample {
    let p = sampler.params();
    pb::Sample {
        temperature: p.temperature,
        top_k: u32::try_from(p.top_k).unwrap_or(u32::MAX),
        top_p: p.top_p,
        min_p: p.min_p,
        repetition_penalty: p.repetition_penalty,
        seed: p.seed,
        seen: sampler.seen().to_vec(),
        top: sampler.top() as u32,
    }
}

/// The sampler a Forward request describes, every value checked by name.
pub fn sample_from_proto(s: pb::Sample) -> Result<Sampler, NodeError> {
    let params = SamplingParams {
        temperature: s.temperature,
        top_k: s.top_k as usize,
        top_p: s.top_p,
        min_p: s.min_p,
        repetition_penalty: s.repetition_penalty,
        seed: s.seed,
    };
    Ok(Sampler::with_parts(params, s.seen, s.top as usize)?)
}

/// A chosen token as the reply carries it.
pub fn chosen_to_proto(chosen: &Chosen) -> pb::SampledToken {
    pb::SampledToken {
        token: chosen.token,
        top_ids: chosen.top.iter().map(|c| c.0).collect(),
        top_logits: chosen.top.iter().map(|c| c.1).collect(),
        logsumexp: chosen.logsumexp,
        logit: chosen.logit,
    }
}

/// A reply's chosen token, checked against the vocabulary and the candidates asked for.
pub fn chosen_from_proto(
    s: pb::SampledToken,
    vocab: usize,
    asked_top: usize,
) -> Result<Chosen, NodeError> {
    let bad = |why: String| Err(NodeError::BadRequest(format!("sampled token: {why}")));
    if s.top_ids.len() != asked_top || s.top_logits.len() != asked_top {
        return bad(format!(
            "{} candidate ids and {} logits, {asked_top} asked",
            s.top_ids.len(),
            s.top_logits.len()
        ));
    }
    if let Some(id) = std::iter::once(&s.token)
        .chain(&s.top_ids)
        .find(|&&id| id as usize >= vocab)
    {
        return bad(format!("token {id} is outside the vocabulary of {vocab}"));
    }
    if s.top_logits
        .iter()
        .chain([&s.logsumexp, &s.logit])
        .any(|v| v.is_nan())
    {
        return bad("a logit is NaN".into());
    }
    Ok(Chosen {
        token: s.token,
        logit: s.logit,
        top: s.top_ids.into_iter().zip(s.top_logits).collect(),
        logsumexp: s.logsumexp,
    })
}

/// SHA-256 of a chosen token as it travels: what a receipt's output hash covers when the node
/// that ends the model chose the token.
pub fn chosen_hash(chosen: &Chosen) -> [u8; 32] {
    let mut bytes = Vec::with_capacity(8 + 8 * chosen.top.len());
    bytes.extend(chosen.token.to_le_bytes());
    bytes.extend(chosen.logsumexp.to_bits().to_le_bytes());
    bytes.extend(chosen.logit.to_bits().to_le_bytes());
    for (id, logit) in &chosen.top {
        bytes.extend(id.to_le_bytes());
        bytes.extend(logit.to_bits().to_le_bytes());
    }
    neuroshard_proof::content_hash(&[b"sampled", &bytes])
}

/// A layer span from the wire.
pub fn span_from_proto(span: Option<pb::LayerSpan>) -> Result<LayerRange, NodeError> {
    let span = span.ok_or_else(|| NodeError::BadRequest("layer span is missing".into()))?;
    LayerRange::new(span.start, span.end).map_err(|e| NodeError::BadRequest(e.to_string()))
}

/// A layer range as a wire span.
pub fn span_to_proto(range: LayerRange) -> pb::LayerSpan {
    pb::LayerSpan {
        start: range.start,
        end: range.end,
    }
}

/// A peer announcement from the wire.
pub fn peer_from_proto(p: pb::PeerInfo) -> Result<PeerRecord, NodeError> {
    if p.addr.is_empty() || p.node_id.is_empty() {
        return Err(NodeError::BadRequest(
            "peer info lacks node_id or addr".into(),
        ));
    }
    let public_key = PublicKey::from_slice(&p.public_key)?;
    let node_id = public_key.check_id(&p.node_id)?;
    if let Some(relayed) = neuroshard_nat::relay::RelayedAddr::parse(&p.addr) {
        let relayed = relayed.map_err(|e| NodeError::BadRequest(format!("peer addr: {e}")))?;
        if relayed.key != public_key.0 {
            return Err(NodeError::BadRequest(format!(
                "peer addr {} names a key other than the peer's",
                p.addr
            )));
        }
    }
    if p.relay.len() > 255 || (!p.relay.is_empty() && !p.relay.contains(':')) {
        return Err(NodeError::BadRequest(format!(
            "peer relay {:?} is not a host:port",
            p.relay.chars().take(64).collect::<String>()
        )));
    }
    let layers = span_from_proto(p.layers)?;
    let precision = precision_from_proto(&p.precision)?;
    check_display_name(&p.display_name)
        .map_err(|why| NodeError::BadRequest(format!("peer {why}")))?;
    if p.total_layers > MAX_TOTAL_LAYERS {
        return Err(NodeError::BadRequest(format!(
            "peer announces a model of {} layers; at most {MAX_TOTAL_LAYERS} are served",
            p.total_layers
        )));
    }
    if layers.end > p.total_layers {
        return Err(NodeError::BadRequest(format!(
            "peer layers {layers} exceed the model's {} layers",
            p.total_layers
        )));
    }
    Ok(PeerRecord {
        node_id,
        addr: p.addr,
        model_id: p.model_id,
        layers,
        total_layers: p.total_layers,
        load: if p.load.is_finite() {
            p.load.clamp(0.0, 1.0)
        } else {
            1.0
        },
        public_key,
        display_name: p.display_name,
        relay: p.relay,
        precision,
        // A figure that is no number of milliseconds is no figure.
        decode_ms_per_layer: match p.decode_ms_per_layer {
            ms if ms.is_finite() && ms > 0.0 => ms,
            _ => 0.0,
        },
    })
}

/// A peer's announced weight precision: empty for f32 (what nodes before the field held).
pub fn precision_from_proto(name: &str) -> Result<Precision, NodeError> {
    match name {
        "" => Ok(Precision::F32),
        name => name.parse::<Precision>().map_err(|e| {
            NodeError::BadRequest(format!(
                "peer precision: {}",
                e.chars().take(120).collect::<String>()
            ))
        }),
    }
}

/// A weight precision as a peer announces it: empty for f32.
pub fn precision_to_proto(precision: Precision) -> String {
    match precision {
        Precision::F32 => String::new(),
        other => other.name().to_string(),
    }
}

/// A peer announcement as a wire message.
pub fn peer_to_proto(p: &PeerRecord) -> pb::PeerInfo {
    pb::PeerInfo {
        node_id: p.node_id.to_string(),
        addr: p.addr.clone(),
        model_id: p.model_id.clone(),
        layers: Some(span_to_proto(p.layers)),
        total_layers: p.total_layers,
        load: p.load,
        public_key: p.public_key.0.to_vec(),
        display_name: p.display_name.clone(),
        relay: p.relay.clone(),
        precision: precision_to_proto(p.precision),
        decode_ms_per_layer: p.decode_ms_per_layer,
    }
}

/// The value of a node's `/nodes/{id}` and `/layers/...` records: its announcement.
pub fn peer_record_value(p: &PeerRecord) -> Vec<u8> {
    use prost::Message;
    peer_to_proto(p).encode_to_vec()
}

/// The announcement a `/nodes/{id}` or `/layers/{model}/{index}` record carries, checked against
/// the record: a node may describe only itself, and only as serving the layer it is filed
/// under.
pub fn peer_from_record(record: &Record) -> Result<PeerRecord, NodeError> {
    use prost::Message;
    let bad = |why: String| NodeError::BadRequest(format!("record {}: {why}", record.key));
    let info = pb::PeerInfo::decode(record.value.as_slice())
        .map_err(|e| bad(format!("value is not a peer announcement: {e}")))?;
    let peer = peer_from_proto(info).map_err(|e| bad(e.to_string()))?;
    if peer.public_key != record.publisher {
        return Err(bad("describes a node other than its publisher".into()));
    }
    match &record.key {
        RecordKey::Layer { model, index } => {
            if &peer.model_id != model || !peer.layers.contains(*index) {
                return Err(bad(format!(
                    "announces model {} layers {}",
                    peer.model_id, peer.layers
                )));
            }
        }
        RecordKey::Node(_) => {}
        RecordKey::Checkpoint(_) => return Err(bad("is not a peer announcement".into())),
    }
    Ok(peer)
}

/// A 32-byte DHT key from the wire.
pub fn key_from_proto(field: &str, bytes: &[u8]) -> Result<Key, NodeError> {
    let bytes: [u8; 32] = bytes.try_into().map_err(|_| {
        NodeError::BadRequest(format!("{field} must be 32 bytes, got {}", bytes.len()))
    })?;
    Ok(Key(bytes))
}

/// An `ip:port` a DHT peer is dialled at; a host name or port 0 is refused.
fn dht_addr(field: &str, addr: &str) -> Result<SocketAddr, NodeError> {
    match addr.parse::<SocketAddr>() {
        Ok(a) if a.port() != 0 && !a.ip().is_unspecified() => Ok(a),
        _ => Err(NodeError::BadRequest(format!(
            "{field} {addr:?} is not a dialable ip:port"
        ))),
    }
}

/// A DHT contact from the wire.
pub fn contact_from_proto(c: pb::DhtContact) -> Result<Contact, NodeError> {
    Ok(Contact {
        key: key_from_proto("contact node_id", &c.node_id)?,
        addr: dht_addr("contact addr", &c.addr)?,
    })
}

/// The contacts of a reply; malformed ones are dropped.
pub fn contacts_from_proto(contacts: Vec<pb::DhtContact>) -> Vec<Contact> {
    contacts
        .into_iter()
        .filter_map(|c| contact_from_proto(c).ok())
        .collect()
}

/// The 32-byte key a referral request names, if any.
pub fn near_key(bytes: &[u8]) -> Result<Option<Key>, NodeError> {
    if bytes.is_empty() {
        return Ok(None);
    }
    key_from_proto("near", bytes).map(Some)
}

/// A DHT contact as a wire message.
pub fn contact_to_proto(c: &Contact) -> pb::DhtContact {
    pb::DhtContact {
        node_id: c.key.0.to_vec(),
        addr: c.addr.to_string(),
    }
}

/// A peer's announcement as a DHT contact, where its address is an `ip:port`.
pub fn contact_of_peer(p: &PeerRecord) -> Option<Contact> {
    Some(Contact {
        key: Key::of_node(&p.node_id),
        addr: dht_addr("addr", &p.addr).ok()?,
    })
}

/// A DHT record from the wire: its fields are checked for form here; the signature, expiry and
/// size against the receiver's clock by [`Record::verify`] where it is stored or read.
pub fn record_from_proto(r: pb::DhtRecord) -> Result<Record, NodeError> {
    let key: RecordKey = r.key.parse().map_err(neuroshard_dht::DhtError::from)?;
    let publisher = PublicKey::from_slice(&r.publisher)?;
    let signature: [u8; 64] = r.signature.as_slice().try_into().map_err(|_| {
        NodeError::BadRequest(format!(
            "record {key}: signature must be 64 bytes, got {}",
            r.signature.len()
        ))
    })?;
    Ok(Record {
        key,
        value: r.value,
        publisher,
        expires_ms: r.expires_ms,
        signature,
    })
}

/// A DHT record as a wire message.
pub fn record_to_proto(r: &Record) -> pb::DhtRecord {
    pb::DhtRecord {
        key: r.key.to_string(),
        value: r.value.clone(),
        publisher: r.publisher.0.to_vec(),
        expires_ms: r.expires_ms,
        signature: r.signature.to_vec(),
    }
}

/// What a DHT server signs to vouch for its contact in each request: its key, its address and
/// the time.
fn sender_message(public_key: &PublicKey, addr: &str, timestamp_ms: u64) -> [u8; 32] {
    neuroshard_proof::content_hash(&[
        b"neuroshard-dht-sender-v1",
        &public_key.0,
        addr.as_bytes(),
        &timestamp_ms.to_le_bytes(),
    ])
}

/// This node's contact, signed at `timestamp_ms`, for the requests it sends.
pub fn sender_to_proto(key: &NodeKey, addr: SocketAddr, timestamp_ms: u64) -> pb::DhtSender {
    let addr = addr.to_string();
    let public_key = key.public();
    pb::DhtSender {
        signature: key
            .sign(&sender_message(&public_key, &addr, timestamp_ms))
            .to_vec(),
        public_key: public_key.0.to_vec(),
        addr,
        timestamp_ms,
    }
}

/// The contact a request's sender vouches for: signed by the key its id derives from, within
/// `max_skew_ms` of `now_ms`. `None` for a client, which sends none.
pub fn sender_from_proto(
    sender: Option<pb::DhtSender>,
    now_ms: u64,
    max_skew_ms: u64,
) -> Result<Option<Contact>, NodeError> {
    let Some(s) = sender else {
        return Ok(None);
    };
    let public_key = PublicKey::from_slice(&s.public_key)?;
    let addr = dht_addr("sender addr", &s.addr)?;
    if now_ms.abs_diff(s.timestamp_ms) > max_skew_ms {
        return Err(NodeError::BadRequest(format!(
            "sender signed at {} ms, this node's clock reads {now_ms} ms",
            s.timestamp_ms
        )));
    }
    public_key.verify(
        &sender_message(&public_key, &s.addr, s.timestamp_ms),
        &s.signature,
    )?;
    Ok(Some(Contact {
        key: Key::of_node(&public_key.id()),
        addr,
    }))
}
