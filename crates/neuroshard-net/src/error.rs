//! Errors of the node runtime and how they map to gRPC statuses.

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

impl From<NodeError> for tonic::Status {
    fn from(err: NodeError) -> Self {
        use tonic::Code;
        let code = match &err {
            NodeError::Tensor(_)
            | NodeError::BadRequest(_)
            | NodeError::Config(_)
            | NodeError::Device(_) => Code::InvalidArgument,
            NodeError::UnknownSession(_) => Code::NotFound,
            NodeError::WrongLayers { .. }
            | NodeError::NotTraining(_)
            | NodeError::CheckpointChanged(_) => Code::FailedPrecondition,
            NodeError::SessionBusy(_) => Code::Aborted,
            NodeError::Full(_) | NodeError::TransferCap { .. } => Code::ResourceExhausted,
            NodeError::Model(ModelError::PositionGap { .. }) => Code::OutOfRange,
            NodeError::Model(ModelError::LayerRange(_) | ModelError::Request(_)) => {
                Code::InvalidArgument
            }
            NodeError::Model(_) => Code::Internal,
            NodeError::NoRoute(_)
            | NodeError::Connect { .. }
            | NodeError::ShuttingDown
            | NodeError::NotServing { .. } => Code::Unavailable,
            NodeError::Remote { status, .. } => status.code(),
            NodeError::Io { .. } | NodeError::Ledger(_) | NodeError::Internal(_) => Code::Internal,
            NodeError::Identity(_) => Code::Unauthenticated,
            NodeError::Receipt(_) => Code::InvalidArgument,
            NodeError::Verification { .. } => Code::DataLoss,
            NodeError::Dht(e) => {
                use neuroshard_dht::DhtError;
                use neuroshard_dht::store::StoreError;
                match e {
                    DhtError::NotServing => Code::Unavailable,
                    DhtError::Record(_) | DhtError::Store(StoreError::Record(_)) => {
                        Code::InvalidArgument
                    }
                    DhtError::Store(StoreError::Stale { .. }) => Code::AlreadyExists,
                    DhtError::Store(StoreError::Full(_) | StoreError::KeyFull { .. }) => {
                        Code::ResourceExhausted
                    }
                }
            }
        };
        tonic::Status::new(code, err.to_string())
    }
}
