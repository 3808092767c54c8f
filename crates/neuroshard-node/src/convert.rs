//! The one place generated protobuf types meet domain types.

use neuroshard_base::{LayerRange, PublicKey};
use neuroshard_model::codec::{WireDType, WireTensor};
use neuroshard_proto as pb;

use crate::NodeError;

/// What a peer announces about itself: where it is and what it serves.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct PeerRecord {
    /// Hex node id.
    pub node_id: String,
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
}

/// A wire dtype from its protobuf enum value.
pub fn dtype_from_proto(value: i32) -> Result<WireDType, NodeError> {
    match pb::Dtype::try_from(value) {
        Ok(pb::Dtype::F32) => Ok(WireDType::F32),
        Ok(pb::Dtype::F16) => Ok(WireDType::F16),
        Ok(pb::Dtype::Bf16) => Ok(WireDType::BF16),
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
    public_key.check_id(&p.node_id)?;
    let layers = span_from_proto(p.layers)?;
    if layers.end > p.total_layers {
        return Err(NodeError::BadRequest(format!(
            "peer layers {layers} exceed the model's {} layers",
            p.total_layers
        )));
    }
    Ok(PeerRecord {
        node_id: p.node_id,
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
    })
}

/// A peer announcement as a wire message.
pub fn peer_to_proto(p: &PeerRecord) -> pb::PeerInfo {
    pb::PeerInfo {
        node_id: p.node_id.clone(),
        addr: p.addr.clone(),
        model_id: p.model_id.clone(),
        layers: Some(span_to_proto(p.layers)),
        total_layers: p.total_layers,
        load: p.load,
        public_key: p.public_key.0.to_vec(),
    }
}
