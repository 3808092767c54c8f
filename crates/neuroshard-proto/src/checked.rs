//! The codec every generated client and server uses: prost's, after a look at the wire bytes.
//!
//! prost materialises a message whole before any check the service runs: a packed repeated
//! field of one-byte varints grows eightfold into a `Vec<u64>`, so a 90 MB `Tensor.shape`
//! costs the node most of a gigabyte before "rank 12,000,000" can be refused. This codec
//! walks the encoded message first (no allocation) and refuses, by name, a message over its
//! type's size cap or a repeated field with more entries than its cap allows. Messages this
//! table does not name decode as prost decodes them, under the service's own size cap.

use std::any::TypeId;
use std::marker::PhantomData;

use prost::Message;
use prost::bytes::Buf;
use tonic::Status;
use tonic::codec::{Codec, DecodeBuf, Decoder};
use tonic_prost::ProstEncoder;

use crate::v1;

/// Largest control request (session ends, pings, peer and file requests, receipts): 1 MiB.
pub const MAX_CONTROL_BYTES: usize = 1 << 20;

/// Most dimensions of a tensor's shape (as `neuroshard_model::codec::MAX_RANK`).
pub const MAX_SHAPE: usize = 8;

/// Most token ids in one call (as `neuroshard_net::MAX_TOKENS_PER_CALL`).
pub const MAX_TOKEN_IDS: usize = 2048;

/// Most distinct token ids a sampling request may name as already seen (a long context's).
pub const MAX_SEEN_IDS: usize = 131_072;

/// Most candidates a sampled reply lists (as `neuroshard_model::sampling::MAX_TOP`).
pub const MAX_TOP: usize = 20;

/// Most countersigned receipts in one submission (as the node's `MAX_RECEIPTS_PER_SUBMIT`).
pub const MAX_SUBMITTED: usize = 1024;

/// Most chunk indices or hashes in a checkpoint request, manifest or answer: 2^16 chunks of
/// 4 MiB cover 256 GiB of weights.
pub const MAX_CHUNKS: usize = 1 << 16;

/// Most peers in a referral (GetPeers), a tracker's list or a registration's answer.
pub const MAX_PEERS: usize = 1 << 14;

/// Most DHT contacts or records in one answer: k is 20 and a key holds at most 64 records.
pub const MAX_DHT_ENTRIES: usize = 256;

/// How a repeated field's entries are counted.
#[derive(Debug, Clone, Copy)]
enum Entries {
    /// Packed varints: one entry per byte without its continuation bit.
    Packed,
    /// One entry per occurrence (strings, bytes, messages).
    Each,
}

/// A repeated field reached through `path` (field numbers, outermost first), with a cap.
#[derive(Debug, Clone, Copy)]
struct Repeated {
    name: &'static str,
    path: &'static [u32],
    entries: Entries,
    max: usize,
}

/// What a message type may hold.
#[derive(Debug, Clone, Copy)]
struct Limits {
    /// Largest encoding; none for the service's own cap.
    max_bytes: Option<usize>,
    fields: &'static [Repeated],
    /// Whether it is an answer: a bad one is the peer's fault (INTERNAL, which callers fail
    /// over on); a bad request is the caller's (INVALID_ARGUMENT).
    reply: bool,
}

const fn packed(name: &'static str, path: &'static [u32], max: usize) -> Repeated {
    Repeated {
        name,
        path,
        entries: Entries::Packed,
        max,
    }
}

const fn each(name: &'static str, path: &'static [u32], max: usize) -> Repeated {
    Repeated {
        name,
        path,
        entries: Entries::Each,
        max,
    }
}

const CONTROL: Limits = Limits {
    max_bytes: Some(MAX_CONTROL_BYTES),
    fields: &[],
    reply: false,
};

const fn request(fields: &'static [Repeated]) -> Limits {
    Limits {
        max_bytes: None,
        fields,
        reply: false,
    }
}

const fn reply(fields: &'static [Repeated]) -> Limits {
    Limits {
        max_bytes: None,
        fields,
        reply: true,
    }
}

const FORWARD_REQUEST: Limits = request(&[
    packed("ForwardRequest.tokens.ids", &[4, 1], MAX_TOKEN_IDS),
    packed("ForwardRequest.hidden.shape", &[5, 2], MAX_SHAPE),
    packed("ForwardRequest.targets.ids", &[11, 1], MAX_TOKEN_IDS),
    packed("ForwardRequest.sample.seen", &[12, 7], MAX_SEEN_IDS),
]);

const FORWARD_RESPONSE: Limits = reply(&[
    packed("ForwardResponse.hidden.shape", &[1, 2], MAX_SHAPE),
    packed("ForwardResponse.logits.shape", &[2, 2], MAX_SHAPE),
    packed("ForwardResponse.sampled.top_ids", &[6, 2], MAX_TOP),
]);

const BACKWARD_REQUEST: Limits = request(&[packed(
    "BackwardRequest.grad_output.shape",
    &[3, 2],
    MAX_SHAPE,
)]);

const BACKWARD_RESPONSE: Limits = reply(&[packed(
    "BackwardResponse.grad_input.shape",
    &[1, 2],
    MAX_SHAPE,
)]);

const SUBMIT_RECEIPTS: Limits = Limits {
    fields: &[each(
        "SubmitReceiptsRequest.countersigned",
        &[1],
        MAX_SUBMITTED,
    )],
    ..CONTROL
};

const CHECKPOINT_REQUEST: Limits = Limits {
    fields: &[packed("CheckpointRequest.chunks", &[3], MAX_CHUNKS)],
    ..CONTROL
};

const CHECKPOINT_CHUNK: Limits = request(&[each(
    "CheckpointChunk.manifest.chunk_hashes",
    &[3, 3],
    MAX_CHUNKS,
)]);

const PUT_CHECKPOINT_RESPONSE: Limits =
    reply(&[packed("PutCheckpointResponse.missing", &[2], MAX_CHUNKS)]);

const GET_PEERS_RESPONSE: Limits = reply(&[
    each("GetPeersResponse.peers", &[1], MAX_PEERS),
    each("GetPeersResponse.contacts", &[2], MAX_DHT_ENTRIES),
]);

const SUBMIT_RECEIPTS_RESPONSE: Limits =
    reply(&[each("SubmitReceiptsResponse.rejected", &[3], MAX_SUBMITTED)]);

const PEER_LIST: Limits = reply(&[each("peers", &[1], MAX_PEERS)]);

const REGISTER_RESPONSE: Limits = reply(&[
    each("RegisterResponse.peers", &[1], MAX_PEERS),
    each("RegisterResponse.warnings", &[3], MAX_DHT_ENTRIES),
]);

const FIND_NODE_RESPONSE: Limits = reply(&[each("FindNodeResponse.closer", &[1], MAX_DHT_ENTRIES)]);

const FIND_VALUE_RESPONSE: Limits = reply(&[
    each("FindValueResponse.closer", &[1], MAX_DHT_ENTRIES),
    each("FindValueResponse.records", &[2], MAX_DHT_ENTRIES),
]);

/// The limits of message type `t`, if the table names it.
fn limits(t: TypeId) -> Option<Limits> {
    let table: [(TypeId, Limits); 19] = [
        (TypeId::of::<v1::GetPeersResponse>(), GET_PEERS_RESPONSE),
        (
            TypeId::of::<v1::SubmitReceiptsResponse>(),
            SUBMIT_RECEIPTS_RESPONSE,
        ),
        (TypeId::of::<v1::ListPeersResponse>(), PEER_LIST),
        (TypeId::of::<v1::RegisterResponse>(), REGISTER_RESPONSE),
        (TypeId::of::<v1::FindNodeResponse>(), FIND_NODE_RESPONSE),
        (TypeId::of::<v1::FindValueResponse>(), FIND_VALUE_RESPONSE),
        (TypeId::of::<v1::ForwardRequest>(), FORWARD_REQUEST),
        (TypeId::of::<v1::ForwardResponse>(), FORWARD_RESPONSE),
        (TypeId::of::<v1::BackwardRequest>(), BACKWARD_REQUEST),
        (TypeId::of::<v1::BackwardResponse>(), BACKWARD_RESPONSE),
        (TypeId::of::<v1::SubmitReceiptsRequest>(), SUBMIT_RECEIPTS),
        (TypeId::of::<v1::CheckpointRequest>(), CHECKPOINT_REQUEST),
        (TypeId::of::<v1::CheckpointChunk>(), CHECKPOINT_CHUNK),
        (
            TypeId::of::<v1::PutCheckpointResponse>(),
            PUT_CHECKPOINT_RESPONSE,
        ),
        (TypeId::of::<v1::EndSessionRequest>(), CONTROL),
        (TypeId::of::<v1::PingRequest>(), CONTROL),
        (TypeId::of::<v1::GetPeersRequest>(), CONTROL),
        (TypeId::of::<v1::DialBackRequest>(), CONTROL),
        (TypeId::of::<v1::ModelFileRequest>(), CONTROL),
    ];
    table.into_iter().find(|(id, _)| *id == t).map(|(_, l)| l)
}

/// Checks the encoding of a `U` against its type's limits; the error names what is wrong.
pub fn check<U: 'static>(bytes: &[u8]) -> Result<(), String> {
    let Some(limits) = limits(TypeId::of::<U>()) else {
        return Ok(());
    };
    let name = std::any::type_name::<U>()
        .rsplit("::")
        .next()
        .unwrap_or("message");
    if let Some(max) = limits.max_bytes
        && bytes.len() > max
    {
        return Err(format!("{name} of {} bytes; at most {max}", bytes.len()));
    }
    for field in limits.fields {
        let n = count(bytes, field.path, field.entries)?;
        if n > field.max {
            return Err(format!(
                "{} has {n} entries; at most {} are read",
                field.name, field.max
            ));
        }
    }
    Ok(())
}

/// Entries of the repeated field at `path` inside the message `bytes`, summed over every
/// occurrence of each message on the way.
fn count(bytes: &[u8], path: &[u32], entries: Entries) -> Result<usize, String> {
    let Some((&first, rest)) = path.split_first() else {
        return Ok(0);
    };
    let mut total = 0usize;
    for field in Fields::new(bytes) {
        let (number, payload) = field?;
        if number != first {
            continue;
        }
        total = total.saturating_add(match (rest.is_empty(), payload) {
            (false, Some(inner)) => count(inner, rest, entries)?,
            (false, None) => 0,
            (true, Some(packed)) if matches!(entries, Entries::Packed) => {
                packed.iter().filter(|b| **b & 0x80 == 0).count()
            }
            (true, _) => 1,
        });
    }
    Ok(total)
}

/// The fields of an encoded message: each field's number, and its payload when it is
/// length-delimited.
struct Fields<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl<'a> Fields<'a> {
    fn new(bytes: &'a [u8]) -> Self {
        Self { bytes, at: 0 }
    }

    fn varint(&mut self) -> Result<u64, String> {
        let mut value = 0u64;
        for shift in (0..64).step_by(7) {
            let byte = *self
                .bytes
                .get(self.at)
                .ok_or("the message ends inside a varint")?;
            self.at += 1;
            value |= u64::from(byte & 0x7f) << shift;
            if byte & 0x80 == 0 {
                return Ok(value);
            }
        }
        Err("a varint runs past ten bytes".into())
    }

    fn skip(&mut self, n: u64) -> Result<&'a [u8], String> {
        let end = usize::try_from(n)
            .ok()
            .and_then(|n| self.at.checked_add(n))
            .filter(|&end| end <= self.bytes.len())
            .ok_or("a field runs past the end of the message")?;
        let taken = &self.bytes[self.at..end];
        self.at = end;
        Ok(taken)
    }
}

impl<'a> Iterator for Fields<'a> {
    type Item = Result<(u32, Option<&'a [u8]>), String>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.at >= self.bytes.len() {
            return None;
        }
        let field = (|| {
            let key = self.varint()?;
            let number = u32::try_from(key >> 3).map_err(|_| "a field number is out of range")?;
            let payload = match key & 7 {
                0 => self.varint().map(|_| None)?,
                1 => self.skip(8).map(|_| None)?,
                2 => {
                    let len = self.varint()?;
                    Some(self.skip(len)?)
                }
                5 => self.skip(4).map(|_| None)?,
                wire => return Err(format!("wire type {wire} is not read")),
            };
            Ok((number, payload))
        })();
        if field.is_err() {
            self.at = self.bytes.len();
        }
        Some(field)
    }
}

/// The status for a message [`check`] refused: the caller's fault for a request, the peer's
/// for a reply.
fn refused<U: 'static>(why: String) -> Status {
    match limits(TypeId::of::<U>()).is_some_and(|l| l.reply) {
        true => Status::internal(format!("bad reply: {why}")),
        false => Status::invalid_argument(why),
    }
}

/// prost's answer, worded as tonic's own codec words it: a request that does not decode is
/// the caller's fault (INVALID_ARGUMENT), a reply the peer's (INTERNAL).
fn decoded<U: 'static>(result: Result<U, prost::DecodeError>) -> Result<Option<U>, Status> {
    result.map(Some).map_err(|e| {
        let message = e.to_string();
        match std::any::type_name::<U>().ends_with("Request") {
            true => Status::invalid_argument(message),
            false => Status::internal(message),
        }
    })
}

/// prost's codec with [`check`] before every decode.
#[derive(Debug, Clone)]
pub struct CheckedCodec<T, U>(PhantomData<(T, U)>);

impl<T, U> Default for CheckedCodec<T, U> {
    fn default() -> Self {
        Self(PhantomData)
    }
}

impl<T, U> Codec for CheckedCodec<T, U>
where
    T: Message + Send + 'static,
    U: Message + Default + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = ProstEncoder<T>;
    type Decoder = CheckedDecoder<U>;

    fn encoder(&mut self) -> Self::Encoder {
        ProstEncoder::default()
    }

    fn decoder(&mut self) -> Self::Decoder {
        CheckedDecoder(PhantomData)
    }
}

/// Decodes a `U` after [`check`].
#[derive(Debug, Clone)]
pub struct CheckedDecoder<U>(PhantomData<U>);

impl<U: Message + Default + 'static> Decoder for CheckedDecoder<U> {
    type Item = U;
    type Error = Status;

    fn decode(&mut self, buf: &mut DecodeBuf<'_>) -> Result<Option<U>, Status> {
        // tonic hands a whole message in one contiguous buffer; prost then decodes from it,
        // splitting `bytes` fields off the buffer rather than copying them.
        let checked = match buf.chunk().len() == buf.remaining() {
            true => check::<U>(buf.chunk()),
            false => {
                let copied = buf.copy_to_bytes(buf.remaining());
                return match check::<U>(&copied) {
                    Ok(()) => decoded(U::decode(copied)),
                    Err(why) => Err(refused::<U>(why)),
                };
            }
        };
        if let Err(why) = checked {
            // Consumed, so a stream that goes on reading does not meet the same bytes again.
            buf.advance(buf.remaining());
            return Err(refused::<U>(why));
        }
        decoded(U::decode(&mut *buf))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tensor(shape: Vec<u64>) -> v1::Tensor {
        v1::Tensor {
            shape,
            payload: vec![0; 8].into(),
            ..Default::default()
        }
    }

    fn forward(input: v1::forward_request::Input) -> Vec<u8> {
        v1::ForwardRequest {
            session_id: "s".into(),
            input: Some(input),
            ..Default::default()
        }
        .encode_to_vec()
    }

    #[test]
    fn an_honest_request_passes_and_a_packed_field_over_its_cap_is_refused_by_name() {
        use v1::forward_request::Input;
        let honest = forward(Input::Hidden(tensor(vec![1, 4, 64])));
        check::<v1::ForwardRequest>(&honest).unwrap();
        // Twelve million one-byte dimensions: 12 MB on the wire, 96 MB once prost decodes them.
        let bomb = forward(Input::Hidden(tensor(vec![1; 12_000_000])));
        let err = check::<v1::ForwardRequest>(&bomb).unwrap_err();
        assert!(
            err.contains("ForwardRequest.hidden.shape has 12000000 entries"),
            "{err}"
        );
        let ids = forward(Input::Tokens(v1::TokenIds {
            ids: (0..3000).collect(),
        }));
        let err = check::<v1::ForwardRequest>(&ids).unwrap_err();
        assert!(err.contains("ForwardRequest.tokens.ids has 3000"), "{err}");
        let reply = v1::ForwardResponse {
            output: Some(v1::forward_response::Output::Logits(tensor(vec![1; 9]))),
            ..Default::default()
        }
        .encode_to_vec();
        let err = check::<v1::ForwardResponse>(&reply).unwrap_err();
        assert!(err.contains("ForwardResponse.logits.shape has 9"), "{err}");
    }

    #[test]
    fn control_requests_are_capped_and_repeated_entries_counted() {
        let ping = v1::PingRequest::default().encode_to_vec();
        check::<v1::PingRequest>(&ping).unwrap();
        let big = v1::EndSessionRequest {
            session_id: "x".repeat(MAX_CONTROL_BYTES + 1),
        }
        .encode_to_vec();
        let err = check::<v1::EndSessionRequest>(&big).unwrap_err();
        assert!(err.contains("EndSessionRequest of"), "{err}");
        let receipts = |n: usize| {
            v1::SubmitReceiptsRequest {
                countersigned: vec![vec![1]; n],
                ..Default::default()
            }
            .encode_to_vec()
        };
        check::<v1::SubmitReceiptsRequest>(&receipts(MAX_SUBMITTED)).unwrap();
        let err = check::<v1::SubmitReceiptsRequest>(&receipts(MAX_SUBMITTED + 1)).unwrap_err();
        assert!(err.contains("countersigned has 1025 entries"), "{err}");
        // A referral of empty peers: 2 bytes each on the wire, a whole PeerInfo each once decoded.
        let referral = |n: usize| {
            v1::GetPeersResponse {
                peers: vec![v1::PeerInfo::default(); n],
                ..Default::default()
            }
            .encode_to_vec()
        };
        check::<v1::GetPeersResponse>(&referral(MAX_PEERS)).unwrap();
        let err = check::<v1::GetPeersResponse>(&referral(MAX_PEERS + 1)).unwrap_err();
        assert!(err.contains("GetPeersResponse.peers has 16385"), "{err}");
        // Types the table does not name pass as they are; truncated bytes are refused.
        check::<v1::StatsRequest>(&[0xff; 3]).unwrap();
        let cut = &forward(v1::forward_request::Input::Hidden(tensor(vec![1, 2])))[..6];
        assert!(check::<v1::ForwardRequest>(cut).is_err());
    }
}

/// Not a test: a measurement, run by hand. `cargo test -p neuroshard-proto packed_shape_bomb
/// -- --ignored --nocapture` prints the peak resident memory before and after refusing a
/// Forward whose hidden.shape is a 90 MB packed field; with `PROST=1`, after prost decoding it
/// as the codec did before this check.
#[cfg(test)]
mod measure {
    use super::*;

    fn peak_mib() -> u64 {
        let status = std::fs::read_to_string("/proc/self/status").unwrap();
        let line = status.lines().find(|l| l.starts_with("VmHWM")).unwrap();
        line.split_whitespace()
            .nth(1)
            .unwrap()
            .parse::<u64>()
            .unwrap()
            / 1024
    }

    #[test]
    #[ignore = "a measurement, run by hand"]
    fn packed_shape_bomb_peak_memory() {
        fn varint(mut v: u64, out: &mut Vec<u8>) {
            while v >= 0x80 {
                out.push((v as u8) | 0x80);
                v >>= 7;
            }
            out.push(v as u8);
        }
        let n = 90_000_000u64;
        let mut inner = vec![0x12];
        varint(n, &mut inner);
        inner.resize(inner.len() + n as usize, 1);
        let mut bytes = vec![0x2a];
        varint(inner.len() as u64, &mut bytes);
        bytes.extend_from_slice(&inner);
        drop(inner);
        let before = peak_mib();
        let t = std::time::Instant::now();
        if std::env::var("PROST").is_ok() {
            let m = v1::ForwardRequest::decode(&bytes[..]).unwrap();
            drop(m);
        } else {
            assert!(check::<v1::ForwardRequest>(&bytes).is_err());
        }
        eprintln!(
            "{} bytes: peak resident memory {before} -> {} MiB in {:?}",
            bytes.len(),
            peak_mib(),
            t.elapsed()
        );
    }
}
