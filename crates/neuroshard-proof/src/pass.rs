//! Credit passes: an issuer's signed word that a requester key is a real requester.
//!
//! Keys cost nothing, so a worker can send itself requests under fresh keys and countersign its
//! own receipts. No node can tell such a key from a stranger's by looking at it. What it can
//! tell is whether a key it trusts vouches for the requester: an issuer (a swarm's tracker,
//! or any key the owner names) signs a pass for each requester key it knows to be someone
//! else, and the credit a node shows as earned counts only receipts countersigned by a trusted
//! issuer or by a holder of its pass. A worker's fresh keys hold no pass, so what they
//! countersign is kept but not counted.

use neuroshard_base::{NodeId, NodeKey, PublicKey};
use serde::{Deserialize, Serialize};

/// Version of the pass layout.
pub const PASS_VERSION: u8 = 1;

/// Largest pass accepted: two keys, two times and a signature fit in well under this.
pub const MAX_PASS_BYTES: usize = 512;

/// Domain separation of pass signatures.
const PASS_DOMAIN: &[u8] = b"neuroshard-credit-pass-v1";

/// What an issuer vouches for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PassBody {
    /// Layout version ([`PASS_VERSION`]).
    pub version: u8,
    /// The issuer's key.
    pub issuer: [u8; 32],
    /// The requester key vouched for.
    pub holder: [u8; 32],
    /// First moment the pass is good, ms since the Unix epoch.
    pub not_before_ms: u64,
    /// Last moment the pass is good.
    pub not_after_ms: u64,
}

/// A pass signed by its issuer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CreditPass {
    body: PassBody,
    signature: Vec<u8>,
}

#[derive(Serialize, Deserialize)]
struct PassWire {
    body: PassBody,
    signature: Vec<u8>,
}

/// Why a pass was refused.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum PassError {
    /// The bytes do not decode, or a field is out of bounds.
    #[error("malformed credit pass: {0}")]
    Malformed(String),
    /// The issuer's signature does not verify.
    #[error("credit pass signature: {0}")]
    Signature(#[from] neuroshard_base::KeyError),
    /// The pass is not good at this moment.
    #[error(
        "credit pass is good from {from_ms} to {until_ms} (ms since the epoch), not at {now_ms}"
    )]
    Expired {
        /// Start of its validity.
        from_ms: u64,
        /// End of its validity.
        until_ms: u64,
        /// The moment it was checked.
        now_ms: u64,
    },
}

impl PassBody {
    /// A pass from `issuer` for `holder`, good from `now_ms` for `days` days.
    pub fn new(issuer: &NodeKey, holder: PublicKey, now_ms: u64, days: u64) -> Self {
        Self {
            version: PASS_VERSION,
            issuer: issuer.public().0,
            holder: holder.0,
            not_before_ms: now_ms,
            not_after_ms: now_ms.saturating_add(days.saturating_mul(24 * 3600 * 1000)),
        }
    }

    fn signed_bytes(&self) -> Vec<u8> {
        let mut bytes = PASS_DOMAIN.to_vec();
        bytes.extend(postcard::to_stdvec(self).expect("pass bodies serialize"));
        bytes
    }

    /// Signs the body with the issuer's key (which must be the one it names).
    pub fn sign(self, issuer: &NodeKey) -> CreditPass {
        debug_assert_eq!(issuer.public().0, self.issuer);
        let signature = issuer.sign(&self.signed_bytes()).to_vec();
        CreditPass {
            body: self,
            signature,
        }
    }
}

impl CreditPass {
    /// Reads a pass from the network or a file: bounds, the issuer's signature, and that it is
    /// good at `now_ms`, give or take the clock skew receipts allow.
    pub fn from_wire(bytes: &[u8], now_ms: u64) -> Result<Self, PassError> {
        if bytes.len() > MAX_PASS_BYTES {
            return Err(PassError::Malformed(format!(
                "{} bytes (at most {MAX_PASS_BYTES})",
                bytes.len()
            )));
        }
        let wire: PassWire = postcard::from_bytes(bytes)
            .map_err(|e| PassError::Malformed(format!("decoding: {e}")))?;
        let body = wire.body;
        if body.version != PASS_VERSION {
            return Err(PassError::Malformed(format!(
                "version {} (this node reads {PASS_VERSION})",
                body.version
            )));
        }
        PublicKey::from_slice(&body.holder)?;
        PublicKey::from_slice(&body.issuer)?.verify(&body.signed_bytes(), &wire.signature)?;
        // Clocks of issuer and worker may differ as a requester's and a worker's may.
        let skew = crate::receipt::CLOCK_SKEW_MS;
        if now_ms.saturating_add(skew) < body.not_before_ms
            || now_ms.saturating_sub(skew) > body.not_after_ms
        {
            return Err(PassError::Expired {
                from_ms: body.not_before_ms,
                until_ms: body.not_after_ms,
                now_ms,
            });
        }
        Ok(Self {
            body,
            signature: wire.signature,
        })
    }

    /// The bytes to send or store.
    pub fn to_wire(&self) -> Vec<u8> {
        postcard::to_stdvec(&PassWire {
            body: self.body.clone(),
            signature: self.signature.clone(),
        })
        .expect("passes serialize")
    }

    /// The pass as text for a file: hex of [`Self::to_wire`].
    pub fn to_text(&self) -> String {
        hex::encode(self.to_wire())
    }

    /// Reads a pass written by [`Self::to_text`].
    pub fn from_text(text: &str, now_ms: u64) -> Result<Self, PassError> {
        let bytes =
            hex::decode(text.trim()).map_err(|e| PassError::Malformed(format!("not hex: {e}")))?;
        Self::from_wire(&bytes, now_ms)
    }

    /// What the pass says.
    pub fn body(&self) -> &PassBody {
        &self.body
    }

    /// The issuer's node id.
    pub fn issuer(&self) -> NodeId {
        PublicKey(self.body.issuer).id()
    }

    /// The requester key vouched for.
    pub fn holder(&self) -> PublicKey {
        PublicKey(self.body.holder)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DAY: u64 = 24 * 3600 * 1000;

    #[test]
    fn a_pass_round_trips_and_is_good_only_in_its_window() {
        let (issuer, holder) = (NodeKey::generate(), NodeKey::generate());
        let pass = PassBody::new(&issuer, holder.public(), 10 * DAY, 30).sign(&issuer);
        let back = CreditPass::from_text(&pass.to_text(), 11 * DAY).unwrap();
        assert_eq!(back, pass);
        assert_eq!(back.issuer(), issuer.id());
        assert_eq!(back.holder(), holder.public());
        let skew = crate::receipt::CLOCK_SKEW_MS;
        CreditPass::from_wire(&pass.to_wire(), 10 * DAY - skew).unwrap();
        for at in [10 * DAY - skew - 1, 40 * DAY + skew + 1] {
            assert!(matches!(
                CreditPass::from_wire(&pass.to_wire(), at),
                Err(PassError::Expired { .. })
            ));
        }
    }

    #[test]
    fn a_forged_or_altered_pass_is_refused() {
        let (issuer, holder, thief) = (
            NodeKey::generate(),
            NodeKey::generate(),
            NodeKey::generate(),
        );
        // Signed by another key than the issuer it names.
        let mut forged = PassBody::new(&issuer, holder.public(), 0, 1).sign(&issuer);
        forged.signature = thief
            .sign(&PassBody::new(&issuer, holder.public(), 0, 1).signed_bytes())
            .to_vec();
        assert!(matches!(
            CreditPass::from_wire(&forged.to_wire(), 1),
            Err(PassError::Signature(_))
        ));
        // A pass for one holder given to another.
        let mut moved = PassBody::new(&issuer, holder.public(), 0, 1).sign(&issuer);
        moved.body.holder = thief.public().0;
        assert!(matches!(
            CreditPass::from_wire(&moved.to_wire(), 1),
            Err(PassError::Signature(_))
        ));
        for garbage in [&[1u8, 2, 3][..], &[0; MAX_PASS_BYTES + 1]] {
            assert!(matches!(
                CreditPass::from_wire(garbage, 1),
                Err(PassError::Malformed(_))
            ));
        }
        assert!(CreditPass::from_text("zz", 1).is_err());
    }
}
