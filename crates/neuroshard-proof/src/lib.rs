//! Proof of Neural Work.
//!
//! Every Forward (and later Backward) reply carries a [`Receipt`] signed by the worker: what
//! was run (model, weights hash, layers, session, positions, tokens, FLOPs), hashes of input
//! and output, a [`Fingerprint`] of the output that survives backend nondeterminism, and the
//! requester's nonce. The requester checks it against what it sent and received
//! ([`Expectation`]), re-executes a sample of hops chosen by its [`Reputation`] book, and returns
//! a [`Countersignature`] with its verdict. The worker's [`Ledger`] keeps receipts and settles
//! them when countersigned; only countersigned, accepted receipts earn [`credit`], and the credit
//! shown as earned counts only those a trusted issuer vouches for ([`CreditPass`]).
//!
//! This crate does no network IO; the node crate carries receipts over gRPC.

pub mod fingerprint;
pub mod ledger;
pub mod pass;
pub mod receipt;
pub mod reputation;

pub use fingerprint::{Evidence, Fingerprint, Mismatch, Tolerance};
pub use ledger::{
    Ledger, LedgerError, ModelTotals, ReceiptRow, Settlement, Status, StatusCounts, Totals,
    UnknownStatus,
};
pub use pass::{CreditPass, PassBody, PassError};
pub use receipt::{
    Countersignature, Expectation, Receipt, ReceiptBody, ReceiptError, ReceiptId, Verdict,
    WorkKind, content_hash,
};
pub use reputation::{PeerRecord, Reputation, SpotCheckPolicy, credit};
