//! Errors of the node runtime, whose doing each is ([`Role`]), and how they map to gRPC
//! statuses.
//!
//! One enum serves the node, the tracker and the client: a node is also a client (a replica
//! fetches checkpoints from its peers inside a Backward call, the reachability self-test asks
//! peers to dial back), so an error from either side travels through the other. What differs by
//! role is who is at fault, and that is [`NodeError::role`]: it decides the status code, and so
//! whether the caller fails over to another peer (the worker's fault or a busy node) or fails
//! the step (the request's fault).

use neuroshard_model::ModelError;
use neuroshard_model::codec::CodecError;

/// Everything a node, tracker or client call can fail with.
#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    /// A tensor from the network failed validation.
    #[error("malformed tensor: {0}")]
    Tensor(#[from] CodecError),
    /// A request field is missing or out of bounds.
    #[error("bad request: {0}")]
    BadRequest(String),
    /// The session is not on this node (never started here, or expired).
    #[error("unknown session {0:?}: it expired or never started on this node")]
    UnknownSession(String),
    /// Another call of the same session is still running.
    #[error("session {0:?} is busy with another call")]
    SessionBusy(String),
    /// The caller's key may not make this call: a session another key opened, a requester key
    /// other than the one its connection proved.
    #[error("not allowed: {0}")]
    Forbidden(String),
    /// A capacity limit is reached (KV cache budget, tracker size).
    #[error("{0}")]
    Full(String),
    /// The call asked for layers this node does not serve, perhaps since it changed them
    /// after the caller's listing: FAILED_PRECONDITION, on which callers read the listing
    /// again and plan around the node without counting it as a failure.
    #[error("layers {asked} requested, this node serves {serves}")]
    WrongLayers {
        /// The span asked for.
        asked: neuroshard_base::LayerRange,
        /// The span served.
        serves: neuroshard_base::LayerRange,
    },
    /// The node failed at its own work (a compute worker panicked or its task died): the
    /// caller's request was fine, and another node may serve it. INTERNAL, on which clients
    /// fail over.
    #[error("internal error: {0}")]
    Internal(String),
    /// The model refused or failed the request.
    #[error(transparent)]
    Model(#[from] ModelError),
    /// A settings value is invalid; names the field.
    #[error("invalid config: {0}")]
    Config(String),
    /// The compute device asked for cannot be used (no GPU backend in this build, or the GPU
    /// failed to start); computing elsewhere may work.
    #[error("device: {0}")]
    Device(String),
    /// No chain of peers covers the model's layers.
    #[error("no route: {0}")]
    NoRoute(String),
    /// A remote peer or tracker failed.
    #[error("{peer}: {status}")]
    Remote {
        /// Who failed.
        peer: String,
        /// What it answered.
        status: tonic::Status,
    },
    /// A network or file operation failed.
    #[error("{context}: {source}")]
    Io {
        /// What was being done.
        context: String,
        /// The cause.
        source: std::io::Error,
    },
    /// Connecting to a peer failed.
    #[error("connecting to {peer}: {message}")]
    Connect {
        /// Who.
        peer: String,
        /// Why.
        message: String,
    },
    /// The node is shutting down.
    #[error("node is shutting down")]
    ShuttingDown,
    /// The node's owner paused it, or it is finishing its calls before pausing.
    #[error("node is not serving: {}", if *.draining {
        "finishing its current requests, then pausing"
    } else {
        "paused by its owner"
    })]
    NotServing {
        /// Whether it is finishing its calls (else paused or stopped).
        draining: bool,
    },
    /// The owner's transfer cap for this period is used up.
    #[error(
        "transfer cap reached: {used} of {budget} bytes moved this period; no new work until it ends"
    )]
    TransferCap {
        /// Bytes moved through the transport against the budget.
        used: u64,
        /// The budget.
        budget: u64,
    },
    /// A key, signature or claimed id did not check out.
    #[error("identity: {0}")]
    Identity(#[from] neuroshard_base::KeyError),
    /// A receipt was missing, malformed or did not match the call.
    #[error("receipt: {0}")]
    Receipt(#[from] neuroshard_proof::ReceiptError),
    /// A spot check re-executed a hop and the worker's output did not match.
    #[error("spot check of {peer} failed: {reason}")]
    Verification {
        /// The worker.
        peer: String,
        /// What differed.
        reason: String,
    },
    /// The receipt ledger failed.
    #[error(transparent)]
    Ledger(#[from] neuroshard_proof::LedgerError),
    /// The checkpoint a transfer was fetching has been replaced (a new round began).
    #[error("{0}")]
    CheckpointChanged(String),
    /// A training call reached a node that does not train.
    #[error("{0}")]
    NotTraining(String),
    /// A DHT request or record was refused.
    #[error("dht: {0}")]
    Dht(#[from] neuroshard_dht::DhtError),
}

/// This side could not make its certificate (the only TLS error met outside a handshake).
impl From<crate::tls::TlsError> for NodeError {
    fn from(e: crate::tls::TlsError) -> Self {
        NodeError::Config(e.to_string())
    }
}

/// A refused setting is an invalid config, naming its field.
impl From<neuroshard_base::Invalid> for NodeError {
    fn from(invalid: neuroshard_base::Invalid) -> Self {
        NodeError::Config(invalid.to_string())
    }
}

impl NodeError {
    /// Shorthand for an IO error with context.
    pub fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        Self::Io {
            context: context.into(),
            source,
        }
    }
}

/// Whose doing an error is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// The request is wrong (malformed, out of bounds, for layers or a session this node does
    /// not have): another node would refuse it too. INVALID_ARGUMENT and its kin.
    Caller,
    /// The node cannot take the call now (full, busy, paused, shutting down, over its transfer
    /// cap): another node, or this one later, may. RESOURCE_EXHAUSTED, ABORTED or UNAVAILABLE.
    Busy,
    /// The node failed at its own work (a panicked worker, the model, the device, its disk,
    /// config or ledger): the request was fine and another node may serve it. INTERNAL.
    Worker,
    /// A peer this side called failed or could not be reached, or no peer serves what is
    /// needed. The peer's own code, or UNAVAILABLE.
    Peer,
}

impl NodeError {
    /// Whose doing this error is.
    pub fn role(&self) -> Role {
        use neuroshard_dht::DhtError;
        use neuroshard_dht::store::StoreError;
        match self {
            Self::Tensor(_)
            | Self::BadRequest(_)
            | Self::UnknownSession(_)
            | Self::Forbidden(_)
            | Self::WrongLayers { .. }
            | Self::Identity(_)
            | Self::Receipt(_)
            | Self::CheckpointChanged(_)
            | Self::NotTraining(_) => Role::Caller,
            Self::Model(ModelError::PositionGap { .. })
            | Self::Model(ModelError::LayerRange(_) | ModelError::Request(_)) => Role::Caller,
            Self::Dht(DhtError::Record(_) | DhtError::Store(StoreError::Record(_)))
            | Self::Dht(DhtError::Store(StoreError::Stale { .. }))
            | Self::Dht(DhtError::NotClosest { .. }) => Role::Caller,
            Self::SessionBusy(_)
            | Self::Full(_)
            | Self::ShuttingDown
            | Self::NotServing { .. }
            | Self::TransferCap { .. }
            | Self::Dht(DhtError::NotServing)
            | Self::Dht(DhtError::Store(
                StoreError::Full(_)
                | StoreError::FullBytes(_)
                | StoreError::KeyFull { .. }
                | StoreError::PublisherFull { .. }
                | StoreError::PrefixFull { .. },
            )) => Role::Busy,
            Self::Internal(_)
            | Self::Model(_)
            | Self::Config(_)
            | Self::Device(_)
            | Self::Io { .. }
            | Self::Ledger(_) => Role::Worker,
            Self::NoRoute(_)
            | Self::Remote { .. }
            | Self::Connect { .. }
            | Self::Verification { .. } => Role::Peer,
        }
    }

    /// The status code this error answers a call with: by [`role`](Self::role) first, then the
    /// code within it that tells the caller what to do.
    pub fn code(&self) -> tonic::Code {
        use neuroshard_dht::DhtError;
        use neuroshard_dht::store::StoreError;
        use tonic::Code;
        match (self.role(), self) {
            (Role::Caller, Self::UnknownSession(_)) => Code::NotFound,
            // Read the listing again and plan around this node (see `WrongLayers`).
            (
                Role::Caller,
                Self::WrongLayers { .. } | Self::NotTraining(_) | Self::CheckpointChanged(_),
            ) => Code::FailedPrecondition,
            (Role::Caller, Self::Model(ModelError::PositionGap { .. })) => Code::OutOfRange,
            (Role::Caller, Self::Identity(_)) => Code::Unauthenticated,
            (Role::Caller, Self::Forbidden(_)) => Code::PermissionDenied,
            (Role::Caller, Self::Dht(DhtError::Store(StoreError::Stale { .. }))) => {
                Code::AlreadyExists
            }
            (Role::Caller, _) => Code::InvalidArgument,
            (Role::Busy, Self::SessionBusy(_)) => Code::Aborted,
            (
                Role::Busy,
                Self::ShuttingDown | Self::NotServing { .. } | Self::Dht(DhtError::NotServing),
            ) => Code::Unavailable,
            (Role::Busy, _) => Code::ResourceExhausted,
            (Role::Worker, _) => Code::Internal,
            (Role::Peer, Self::Remote { status, .. }) => status.code(),
            (Role::Peer, Self::Verification { .. }) => Code::DataLoss,
            (Role::Peer, _) => Code::Unavailable,
        }
    }
}

impl From<NodeError> for tonic::Status {
    fn from(err: NodeError) -> Self {
        tonic::Status::new(err.code(), err.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tonic::Code;

    /// One error of each kind a served call can end in, with the code the caller must see.
    fn served() -> Vec<(NodeError, Role, Code)> {
        let range = neuroshard_base::LayerRange::new(0, 2).unwrap();
        vec![
            (
                NodeError::BadRequest("x".into()),
                Role::Caller,
                Code::InvalidArgument,
            ),
            (
                NodeError::UnknownSession("s".into()),
                Role::Caller,
                Code::NotFound,
            ),
            (
                NodeError::WrongLayers {
                    asked: range,
                    serves: range,
                },
                Role::Caller,
                Code::FailedPrecondition,
            ),
            (
                NodeError::Model(ModelError::PositionGap {
                    layer: 0,
                    held: 1,
                    start: 3,
                }),
                Role::Caller,
                Code::OutOfRange,
            ),
            (
                NodeError::SessionBusy("s".into()),
                Role::Busy,
                Code::Aborted,
            ),
            (
                NodeError::Full("kv".into()),
                Role::Busy,
                Code::ResourceExhausted,
            ),
            (
                NodeError::NotServing { draining: true },
                Role::Busy,
                Code::Unavailable,
            ),
            (
                NodeError::TransferCap { used: 2, budget: 1 },
                Role::Busy,
                Code::ResourceExhausted,
            ),
            (
                NodeError::Forbidden("another key's session".into()),
                Role::Caller,
                Code::PermissionDenied,
            ),
            (
                NodeError::Internal("panic".into()),
                Role::Worker,
                Code::Internal,
            ),
            (
                NodeError::Model(ModelError::Weights("nan".into())),
                Role::Worker,
                Code::Internal,
            ),
            // The node's own setup or device failing mid-call is not the request's fault.
            (
                NodeError::Device("lost".into()),
                Role::Worker,
                Code::Internal,
            ),
            (NodeError::Config("x".into()), Role::Worker, Code::Internal),
            (
                NodeError::Remote {
                    peer: "p".into(),
                    status: tonic::Status::deadline_exceeded("slow"),
                },
                Role::Peer,
                Code::DeadlineExceeded,
            ),
            (
                NodeError::NoRoute("none".into()),
                Role::Peer,
                Code::Unavailable,
            ),
        ]
    }

    #[test]
    fn each_error_answers_with_the_code_of_whose_doing_it_is() {
        for (err, role, code) in served() {
            assert_eq!(err.role(), role, "{err}");
            let status = tonic::Status::from(err);
            assert_eq!(status.code(), code, "{}", status.message());
        }
    }
}
