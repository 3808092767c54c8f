//! Receipts: what a worker signs for each unit of work, and what the requester signs back.
//!
//! A receipt travels as an envelope of the exact body bytes the worker signed plus the
//! signature, so nobody re-encodes what was signed. Bodies and countersignatures are encoded
//! with postcard. A receipt's id is the SHA-256 of its body bytes; the requester's fresh nonce
//! makes every id unique.

use neuroshard_base::{LayerRange, NodeId, NodeKey, PublicKey};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::fingerprint::{Evidence, Fingerprint, Tolerance};

/// Version of the body layout; bumped when fields change.
pub const BODY_VERSION: u8 = 1;

/// Largest envelope accepted: a body is a few hundred bytes plus the ids it names.
pub const MAX_RECEIPT_BYTES: usize = 4096;

/// Domain separation of countersignatures, so a signature over a receipt id means nothing else.
const COUNTERSIGN_DOMAIN: &[u8] = b"neuroshard-countersign-v2";

/// Clock difference tolerated between requester and worker. Five minutes: home PCs' clocks
/// drift, and the nonce, not the time, is what makes a receipt fresh.
pub const CLOCK_SKEW_MS: u64 = 5 * 60 * 1000;

/// A receipt's id: SHA-256 of its signed body.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct ReceiptId(pub [u8; 32]);

impl std::fmt::Display for ReceiptId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&hex::encode(self.0))
    }
}

/// Which RPC the work was.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum WorkKind {
    /// A Forward call.
    Forward,
    /// A Backward call.
    Backward,
}

/// What the worker attests to.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ReceiptBody {
    /// Layout version ([`BODY_VERSION`]).
    pub version: u8,
    /// Forward or Backward.
    pub kind: WorkKind,
    /// The worker's key; its hash is the worker's node id.
    pub worker: [u8; 32],
    /// The requester's key: only it can countersign.
    pub requester: [u8; 32],
    /// Model id.
    pub model_id: String,
    /// Hash of the weights the layers use (`Shard::weights_hash`).
    pub weights_hash: [u8; 32],
    /// Layers run.
    pub layers: LayerRange,
    /// The requester's session.
    pub session_id: String,
    /// Absolute position of the first new token.
    pub start_pos: u64,
    /// New tokens.
    pub tokens: u32,
    /// Floating-point operations of the call (`LlamaConfig::forward_flops`).
    pub flops: u64,
    /// SHA-256 of the input as received.
    pub input_hash: [u8; 32],
    /// SHA-256 of the output as sent.
    pub output_hash: [u8; 32],
    /// Fingerprint of the last output row.
    pub fingerprint: Fingerprint,
    /// The requester's nonce for this call.
    pub nonce: [u8; 16],
    /// Worker clock when the call arrived, ms since the Unix epoch.
    pub received_ms: u64,
    /// Worker clock when the reply was made.
    pub replied_ms: u64,
}

/// A body signed by its worker.
#[derive(Debug, Clone, PartialEq)]
pub struct Receipt {
    body: ReceiptBody,
    bytes: Vec<u8>,
    signature: Vec<u8>,
}

#[derive(Serialize, Deserialize)]
struct Envelope {
    body: Vec<u8>,
    signature: Vec<u8>,
}

/// Why a receipt or countersignature was refused.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ReceiptError {
    /// The bytes do not decode, or a field is out of bounds.
    #[error("malformed receipt: {0}")]
    Malformed(String),
    /// A signature does not verify.
    #[error("bad signature: {0}")]
    Signature(#[from] neuroshard_base::KeyError),
    /// The receipt was signed by another node than the one called.
    #[error("receipt signed by node {signer}, but the call went to node {expected}")]
    WrongWorker {
        /// Id of the signing key.
        signer: String,
        /// Id of the node called.
        expected: String,
    },
    /// The nonce is not the one sent with this call: a replayed or misdirected receipt.
    #[error("receipt carries nonce {got}, this call sent {sent}")]
    WrongNonce {
        /// Nonce in the receipt.
        got: String,
        /// Nonce sent.
        sent: String,
    },
    /// A void whose evidence shows no mismatch.
    #[error("void refused: {0}")]
    Void(String),
    /// A field disagrees with the call.
    #[error("receipt field {field} is {got}, the call implies {expected}")]
    Field {
        /// Field name.
        field: &'static str,
        /// What the receipt says.
        got: String,
        /// What the requester knows.
        expected: String,
    },
}

impl ReceiptBody {
    /// Signs the body.
    pub fn sign(self, key: &NodeKey) -> Receipt {
        let bytes = postcard::to_stdvec(&self).expect("receipt bodies serialize");
        let signature = key.sign(&bytes).to_vec();
        Receipt {
            body: self,
            bytes,
            signature,
        }
    }

    fn check_bounds(&self) -> Result<(), ReceiptError> {
        let malformed = |why: String| Err(ReceiptError::Malformed(why));
        if self.version != BODY_VERSION {
            return malformed(format!(
                "body version {} (this node reads {BODY_VERSION})",
                self.version
            ));
        }
        if self.layers.is_empty() {
            return malformed(format!("empty layer range {}", self.layers));
        }
        if self.replied_ms < self.received_ms {
            return malformed("replied before it was received".into());
        }
        self.fingerprint
            .validate(None)
            .map_err(|e| ReceiptError::Malformed(e.to_string()))
    }
}

impl Receipt {
    /// Reads an envelope from the network: bounds, signature by the key inside, then fields.
    pub fn from_wire(bytes: &[u8]) -> Result<Self, ReceiptError> {
        let receipt = Self::parse(bytes)?;
        receipt
            .worker()
            .verify(&receipt.bytes, &receipt.signature)?;
        Ok(receipt)
    }

    /// Decodes and bounds-checks an envelope without checking its signature.
    fn parse(bytes: &[u8]) -> Result<Self, ReceiptError> {
        if bytes.len() > MAX_RECEIPT_BYTES {
            return Err(ReceiptError::Malformed(format!(
                "{} bytes (at most {MAX_RECEIPT_BYTES})",
                bytes.len()
            )));
        }
        let envelope: Envelope = postcard::from_bytes(bytes)
            .map_err(|e| ReceiptError::Malformed(format!("envelope: {e}")))?;
        let body: ReceiptBody = postcard::from_bytes(&envelope.body)
            .map_err(|e| ReceiptError::Malformed(format!("body: {e}")))?;
        body.check_bounds()?;
        PublicKey::from_slice(&body.worker)?;
        Ok(Self {
            body,
            bytes: envelope.body,
            signature: envelope.signature,
        })
    }

    /// The envelope to send.
    pub fn to_wire(&self) -> Vec<u8> {
        postcard::to_stdvec(&Envelope {
            body: self.bytes.clone(),
            signature: self.signature.clone(),
        })
        .expect("envelopes serialize")
    }

    /// What the worker attests to.
    pub fn body(&self) -> &ReceiptBody {
        &self.body
    }

    /// The id: SHA-256 of the signed body bytes.
    pub fn id(&self) -> ReceiptId {
        ReceiptId(Sha256::digest(&self.bytes).into())
    }

    /// The worker's key.
    pub fn worker(&self) -> PublicKey {
        PublicKey(self.body.worker)
    }

    /// Countersigns the receipt with the requester's key.
    pub fn countersign(
        &self,
        key: &NodeKey,
        verdict: Verdict,
        reliability: f32,
        now_ms: u64,
    ) -> Countersignature {
        let mut cs = Countersignature {
            receipt: self.clone(),
            verdict,
            reliability: reliability.clamp(0.0, 1.0),
            signed_ms: now_ms,
            signature: Vec::new(),
        };
        cs.signature = key.sign(&cs.signed_bytes()).to_vec();
        cs
    }
}

/// What the requester concluded about a receipt's work.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Verdict {
    /// The receipt checked out; `spot_checked` when the work was also re-executed.
    Accepted {
        /// Whether the hop was re-executed and matched.
        spot_checked: bool,
    },
    /// Re-execution did not match: the work earns nothing. The evidence must show the
    /// mismatch, or the worker refuses the void.
    Voided(Evidence),
}

impl Verdict {
    /// For a void, the mismatch its evidence shows against `receipt`'s fingerprint (judged with
    /// the default tolerance); none for an acceptance.
    pub fn void_reason(&self, receipt: &Receipt) -> Result<Option<String>, ReceiptError> {
        match self {
            Self::Accepted { .. } => Ok(None),
            Self::Voided(evidence) => evidence
                .shows(&receipt.body.fingerprint, &Tolerance::default())
                .map(Some)
                .map_err(ReceiptError::Void),
        }
    }
}

/// A receipt with the requester's verdict, signed by the requester.
#[derive(Debug, Clone, PartialEq)]
pub struct Countersignature {
    /// The worker's receipt.
    pub receipt: Receipt,
    /// The requester's verdict.
    pub verdict: Verdict,
    /// The requester's reliability estimate of the worker in [0, 1] (see [`crate::credit`]).
    pub reliability: f32,
    /// Requester clock when it signed.
    pub signed_ms: u64,
    signature: Vec<u8>,
}

#[derive(Serialize, Deserialize)]
struct CountersignatureWire {
    receipt: Vec<u8>,
    verdict: Verdict,
    reliability: f32,
    signed_ms: u64,
    signature: Vec<u8>,
}

impl Countersignature {
    fn signed_bytes(&self) -> Vec<u8> {
        let mut bytes = COUNTERSIGN_DOMAIN.to_vec();
        bytes.extend_from_slice(&self.receipt.id().0);
        bytes.extend(
            postcard::to_stdvec(&(&self.verdict, self.reliability, self.signed_ms))
                .expect("serializes"),
        );
        bytes
    }

    /// Reads a countersigned receipt from the network, checking both signatures, and that the
    /// receipt is `worker`'s.
    pub fn from_wire(bytes: &[u8], worker: &PublicKey) -> Result<Self, ReceiptError> {
        let cs = Self::parse(bytes, worker)?;
        cs.receipt
            .worker()
            .verify(&cs.receipt.bytes, &cs.receipt.signature)?;
        cs.requester().verify(&cs.signed_bytes(), &cs.signature)?;
        Ok(cs)
    }

    /// Reads a batch of countersigned receipts for `worker`, checking all their signatures
    /// with one ed25519 batch verification (about twice as fast as one by one); when the batch
    /// fails, each is checked alone to tell which are bad.
    pub fn from_wire_batch(
        items: &[Vec<u8>],
        worker: &PublicKey,
    ) -> Vec<Result<Self, ReceiptError>> {
        let parsed: Vec<Result<Self, ReceiptError>> = items
            .iter()
            .map(|bytes| Self::parse(bytes, worker))
            .collect();
        let good: Vec<&Self> = parsed.iter().filter_map(|p| p.as_ref().ok()).collect();
        if good.is_empty() || batch_verify(&good).is_ok() {
            return parsed;
        }
        items
            .iter()
            .map(|bytes| Self::from_wire(bytes, worker))
            .collect()
    }

    fn requester(&self) -> PublicKey {
        PublicKey(self.receipt.body.requester)
    }

    fn parse(bytes: &[u8], worker: &PublicKey) -> Result<Self, ReceiptError> {
        if bytes.len() > 2 * MAX_RECEIPT_BYTES {
            return Err(ReceiptError::Malformed(format!(
                "countersignature of {} bytes",
                bytes.len()
            )));
        }
        let wire: CountersignatureWire = postcard::from_bytes(bytes)
            .map_err(|e| ReceiptError::Malformed(format!("countersignature: {e}")))?;
        let receipt = Receipt::parse(&wire.receipt)?;
        if receipt.worker() != *worker {
            return Err(ReceiptError::WrongWorker {
                signer: receipt.worker().id().to_string(),
                expected: worker.id().to_string(),
            });
        }
        if !(0.0..=1.0).contains(&wire.reliability) {
            return Err(ReceiptError::Malformed(format!(
                "reliability {} is outside 0..=1",
                wire.reliability
            )));
        }
        PublicKey::from_slice(&receipt.body.requester)?;
        wire.verdict.void_reason(&receipt)?;
        Ok(Self {
            receipt,
            verdict: wire.verdict,
            reliability: wire.reliability,
            signed_ms: wire.signed_ms,
            signature: wire.signature,
        })
    }

    /// The bytes to send.
    pub fn to_wire(&self) -> Vec<u8> {
        postcard::to_stdvec(&CountersignatureWire {
            receipt: self.receipt.to_wire(),
            verdict: self.verdict.clone(),
            reliability: self.reliability,
            signed_ms: self.signed_ms,
            signature: self.signature.clone(),
        })
        .expect("countersignatures serialize")
    }
}

/// Verifies the worker's and the requester's signatures of every countersignature at once.
fn batch_verify(batch: &[&Countersignature]) -> Result<(), ()> {
    let signed: Vec<Vec<u8>> = batch.iter().map(|cs| cs.signed_bytes()).collect();
    let mut messages: Vec<&[u8]> = Vec::with_capacity(2 * batch.len());
    let mut signatures = Vec::with_capacity(2 * batch.len());
    let mut keys = Vec::with_capacity(2 * batch.len());
    for (cs, signed) in batch.iter().zip(&signed) {
        for (message, signature, key) in [
            (
                &cs.receipt.bytes[..],
                &cs.receipt.signature,
                cs.receipt.body.worker,
            ),
            (&signed[..], &cs.signature, cs.receipt.body.requester),
        ] {
            messages.push(message);
            signatures.push(ed25519_dalek::Signature::from_slice(signature).map_err(|_| ())?);
            keys.push(ed25519_dalek::VerifyingKey::from_bytes(&key).map_err(|_| ())?);
        }
    }
    ed25519_dalek::verify_batch(&messages, &signatures, &keys).map_err(|_| ())
}

/// What the requester knows about a call, to check its receipt against.
#[derive(Debug, Clone)]
pub struct Expectation {
    /// Node id of the peer called.
    pub worker_id: NodeId,
    /// Forward or Backward.
    pub kind: WorkKind,
    /// The requester's key.
    pub requester: PublicKey,
    /// Nonce sent with the call.
    pub nonce: [u8; 16],
    /// Model id asked for.
    pub model_id: String,
    /// Layers asked for.
    pub layers: LayerRange,
    /// Session id.
    pub session_id: String,
    /// Start position.
    pub start_pos: u64,
    /// New tokens sent.
    pub tokens: u32,
    /// SHA-256 of the input sent.
    pub input_hash: [u8; 32],
    /// SHA-256 of the output received.
    pub output_hash: [u8; 32],
    /// Weights hash, when the requester knows the model's weights.
    pub weights_hash: Option<[u8; 32]>,
    /// FLOPs, as the requester computes them from the model's config.
    pub flops: u64,
    /// Requester clock when the call was sent.
    pub sent_ms: u64,
    /// Requester clock when the reply came.
    pub now_ms: u64,
}

impl Expectation {
    /// Checks every field of `receipt` (whose signature [`Receipt::from_wire`] checked).
    pub fn check(&self, receipt: &Receipt) -> Result<(), ReceiptError> {
        let body = &receipt.body;
        let signer = receipt.worker().id();
        if signer != self.worker_id {
            return Err(ReceiptError::WrongWorker {
                signer: signer.to_string(),
                expected: self.worker_id.to_string(),
            });
        }
        if body.nonce != self.nonce {
            return Err(ReceiptError::WrongNonce {
                got: hex::encode(body.nonce),
                sent: hex::encode(self.nonce),
            });
        }
        field("kind", &body.kind, &self.kind)?;
        field(
            "requester",
            &hex::encode(body.requester),
            &hex::encode(self.requester.0),
        )?;
        field("model_id", &body.model_id, &self.model_id)?;
        field("layers", &body.layers, &self.layers)?;
        field("session_id", &body.session_id, &self.session_id)?;
        field("start_pos", &body.start_pos, &self.start_pos)?;
        field("tokens", &body.tokens, &self.tokens)?;
        field(
            "input_hash",
            &hex::encode(body.input_hash),
            &hex::encode(self.input_hash),
        )?;
        field(
            "output_hash",
            &hex::encode(body.output_hash),
            &hex::encode(self.output_hash),
        )?;
        if let Some(expected) = self.weights_hash {
            field(
                "weights_hash",
                &hex::encode(body.weights_hash),
                &hex::encode(expected),
            )?;
        }
        field("flops", &body.flops, &self.flops)?;
        let earliest = self.sent_ms.saturating_sub(CLOCK_SKEW_MS);
        let latest = self.now_ms.saturating_add(CLOCK_SKEW_MS);
        if body.received_ms < earliest || body.replied_ms > latest {
            return Err(ReceiptError::Field {
                field: "timestamps",
                got: format!("{}..{}", body.received_ms, body.replied_ms),
                expected: format!("within {earliest}..{latest}"),
            });
        }
        Ok(())
    }
}

fn field<T: PartialEq + std::fmt::Display + ?Sized>(
    name: &'static str,
    got: &T,
    expected: &T,
) -> Result<(), ReceiptError> {
    if got == expected {
        return Ok(());
    }
    Err(ReceiptError::Field {
        field: name,
        got: got.to_string(),
        expected: expected.to_string(),
    })
}

impl std::fmt::Display for WorkKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Forward => "forward",
            Self::Backward => "backward",
        })
    }
}

/// SHA-256 over labelled parts, each length-prefixed so no two inputs collide.
pub fn content_hash(parts: &[&[u8]]) -> [u8; 32] {
    let mut hash = Sha256::new();
    for part in parts {
        hash.update((part.len() as u64).to_le_bytes());
        hash.update(part);
    }
    hash.finalize().into()
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) fn body(worker: &NodeKey, requester: &NodeKey, nonce: u8) -> ReceiptBody {
        ReceiptBody {
            version: BODY_VERSION,
            kind: WorkKind::Forward,
            worker: worker.public().0,
            requester: requester.public().0,
            model_id: "m1".into(),
            weights_hash: [7; 32],
            layers: LayerRange::new(2, 4).unwrap(),
            session_id: "s".into(),
            start_pos: 10,
            tokens: 1,
            flops: 1_000_000,
            input_hash: [1; 32],
            output_hash: [2; 32],
            fingerprint: Fingerprint::of(&[1.0, -3.0, 2.0]),
            nonce: [nonce; 16],
            received_ms: 1_000_000,
            replied_ms: 1_000_005,
        }
    }

    /// A void whose evidence shows the receipt of [`body`] wrong: the recomputed row's largest
    /// entry has the other sign.
    pub(crate) fn void() -> Verdict {
        Verdict::Voided(Evidence::Receipt {
            recomputed: Fingerprint::of(&[1.0, 3.0, 2.0]),
        })
    }

    fn expectation(worker: &NodeKey, requester: &NodeKey, nonce: u8) -> Expectation {
        let b = body(worker, requester, nonce);
        Expectation {
            worker_id: worker.id(),
            kind: WorkKind::Forward,
            requester: requester.public(),
            nonce: b.nonce,
            model_id: b.model_id,
            layers: b.layers,
            session_id: b.session_id,
            start_pos: b.start_pos,
            tokens: b.tokens,
            input_hash: b.input_hash,
            output_hash: b.output_hash,
            weights_hash: Some(b.weights_hash),
            flops: b.flops,
            sent_ms: 999_990,
            now_ms: 1_000_010,
        }
    }

    #[test]
    fn an_honest_receipt_passes_and_round_trips() {
        let (w, r) = (NodeKey::generate(), NodeKey::generate());
        let receipt = body(&w, &r, 1).sign(&w);
        let wire = receipt.to_wire();
        let back = Receipt::from_wire(&wire).unwrap();
        assert_eq!(back, receipt);
        assert_eq!(back.id(), receipt.id());
        expectation(&w, &r, 1).check(&back).unwrap();
        let cs = back.countersign(&r, Verdict::Accepted { spot_checked: true }, 0.9, 1_000_020);
        let cs_back = Countersignature::from_wire(&cs.to_wire(), &w.public()).unwrap();
        assert_eq!(cs_back, cs);
    }

    #[test]
    fn a_forged_signature_is_rejected() {
        let (w, r, thief) = (
            NodeKey::generate(),
            NodeKey::generate(),
            NodeKey::generate(),
        );
        // Signed by another key but claiming to be `w`'s.
        let forged = body(&w, &r, 1).sign(&thief);
        assert!(matches!(
            Receipt::from_wire(&forged.to_wire()),
            Err(ReceiptError::Signature(_))
        ));
        // A countersignature not made by the receipt's requester.
        let receipt = body(&w, &r, 1).sign(&w);
        let cs = receipt.countersign(
            &thief,
            Verdict::Accepted {
                spot_checked: false,
            },
            1.0,
            5,
        );
        assert!(matches!(
            Countersignature::from_wire(&cs.to_wire(), &w.public()),
            Err(ReceiptError::Signature(_))
        ));
        // Garbage and oversized envelopes.
        assert!(matches!(
            Receipt::from_wire(&[1, 2, 3]),
            Err(ReceiptError::Malformed(_))
        ));
        assert!(matches!(
            Receipt::from_wire(&vec![0; MAX_RECEIPT_BYTES + 1]),
            Err(ReceiptError::Malformed(_))
        ));
    }

    #[test]
    fn batches_verify_at_once_and_still_name_the_bad_one() {
        let (w, r, thief) = (
            NodeKey::generate(),
            NodeKey::generate(),
            NodeKey::generate(),
        );
        let good: Vec<Vec<u8>> = (0..5)
            .map(|n| {
                body(&w, &r, n)
                    .sign(&w)
                    .countersign(&r, void(), 0.5, 9)
                    .to_wire()
            })
            .collect();
        let all = Countersignature::from_wire_batch(&good, &w.public());
        assert!(all.iter().all(|c| c.is_ok()));
        let mut mixed = good.clone();
        mixed[2] = body(&w, &r, 7)
            .sign(&w)
            .countersign(&thief, void(), 0.5, 9)
            .to_wire();
        let checked = Countersignature::from_wire_batch(&mixed, &w.public());
        let bad: Vec<usize> = (0..5).filter(|&i| checked[i].is_err()).collect();
        assert_eq!(bad, vec![2]);
    }

    #[test]
    fn a_void_must_show_a_mismatch() {
        let (w, r) = (NodeKey::generate(), NodeKey::generate());
        let receipt = body(&w, &r, 1).sign(&w);
        let shown = receipt.countersign(&r, void(), 0.5, 9);
        let back = Countersignature::from_wire(&shown.to_wire(), &w.public()).unwrap();
        let reason = back.verdict.void_reason(&back.receipt).unwrap().unwrap();
        assert!(reason.contains("receipt's fingerprint"), "{reason}");
        // Evidence that recomputed the very row the receipt fingerprints shows nothing.
        let agreeing = Verdict::Voided(Evidence::Receipt {
            recomputed: Fingerprint::of(&[1.0, -3.0, 2.0]),
        });
        let cs = receipt.countersign(&r, agreeing, 0.5, 9);
        let err = Countersignature::from_wire(&cs.to_wire(), &w.public()).unwrap_err();
        assert!(matches!(err, ReceiptError::Void(_)), "{err}");
        // An output void shows a mismatch only where the receipt matched and the output not.
        let claimed = Fingerprint::of(&[1.0, -3.0, 2.0]);
        let output = |received: &[f32]| {
            Verdict::Voided(Evidence::Output {
                recomputed: claimed.clone(),
                received: Fingerprint::of(received),
            })
        };
        let cs = receipt.countersign(&r, output(&[1.0, 3.0, 2.0]), 0.5, 9);
        Countersignature::from_wire(&cs.to_wire(), &w.public()).unwrap();
        let output = Verdict::Voided(Evidence::Output {
            recomputed: Fingerprint::of(&[5.0, 1.0, 1.0]),
            received: Fingerprint::of(&[1.0, 3.0, 2.0]),
        });
        let cs = receipt.countersign(&r, output, 0.5, 9);
        assert!(matches!(
            Countersignature::from_wire(&cs.to_wire(), &w.public()),
            Err(ReceiptError::Void(_))
        ));
    }

    #[test]
    fn a_replayed_receipt_or_wrong_nonce_is_rejected() {
        let (w, r) = (NodeKey::generate(), NodeKey::generate());
        let earlier = body(&w, &r, 1).sign(&w);
        // The same receipt presented for a later call, which sent nonce 2.
        let err = expectation(&w, &r, 2).check(&earlier).unwrap_err();
        assert!(matches!(err, ReceiptError::WrongNonce { .. }), "{err}");
    }

    #[test]
    fn a_tampered_field_is_rejected() {
        let (w, r) = (NodeKey::generate(), NodeKey::generate());
        let receipt = body(&w, &r, 1).sign(&w);
        // Changing any signed field after signing breaks the signature.
        let mut tampered = receipt.clone();
        tampered.body.flops *= 10;
        tampered.bytes = postcard::to_stdvec(&tampered.body).unwrap();
        assert!(matches!(
            Receipt::from_wire(&tampered.to_wire()),
            Err(ReceiptError::Signature(_))
        ));
        // A signed body whose fields disagree with the call is refused field by field.
        for change in [
            (|b: &mut ReceiptBody| b.layers = LayerRange::new(2, 3).unwrap())
                as fn(&mut ReceiptBody),
            |b| b.tokens = 2,
            |b| b.start_pos = 11,
            |b| b.output_hash = [9; 32],
            |b| b.weights_hash = [8; 32],
            |b| b.flops = 1,
            |b| b.model_id = "m2".into(),
            |b| b.received_ms = 1,
        ] {
            let mut b = body(&w, &r, 1);
            change(&mut b);
            let signed = Receipt::from_wire(&b.sign(&w).to_wire()).unwrap();
            let err = expectation(&w, &r, 1).check(&signed).unwrap_err();
            assert!(matches!(err, ReceiptError::Field { .. }), "{err}");
        }
    }

    #[test]
    fn an_id_that_does_not_match_the_key_is_rejected() {
        let (w, r, other) = (
            NodeKey::generate(),
            NodeKey::generate(),
            NodeKey::generate(),
        );
        let receipt = body(&w, &r, 1).sign(&w);
        // The call went to `other`, but `w` answered.
        let mut expected = expectation(&w, &r, 1);
        expected.worker_id = other.id();
        assert!(matches!(
            expected.check(&receipt),
            Err(ReceiptError::WrongWorker { .. })
        ));
        // A worker refuses a countersigned receipt that is not its own.
        let cs = receipt.countersign(&r, void(), 0.0, 5);
        assert!(matches!(
            Countersignature::from_wire(&cs.to_wire(), &other.public()),
            Err(ReceiptError::WrongWorker { .. })
        ));
    }
}
