//! Whose fault an error is, as failover decides: the peer's (try another), the request's
//! (fail the step), a deadline missed, or a listing out of date.

use super::*;

/// Whose fault `err` is, for the failover chain.
pub(super) fn fault_of(err: &NodeError) -> Fault {
    if is_stale_listing(err) {
        Fault::StaleListing
    } else if !is_peer_fault(err) {
        Fault::Request
    } else if is_deadline_miss(err) {
        Fault::Deadline
    } else if is_unreachable(err) {
        Fault::Unreachable
    } else {
        Fault::Peer
    }
}

/// What the chain's own refusals are as the runtime's errors.
impl From<ChainError> for NodeError {
    fn from(err: ChainError) -> Self {
        match err {
            ChainError::Broken(_) => NodeError::NoRoute(err.to_string()),
            ChainError::Misfit { addr, .. } => NodeError::Remote {
                peer: addr,
                status: tonic::Status::internal("reply does not fit the requested layers"),
            },
            ChainError::NoLogits => NodeError::BadRequest(err.to_string()),
        }
    }
}

/// Whether `err` says the peer could not be reached: it, or the relay in front of it, is down.
pub(super) fn is_unreachable(err: &NodeError) -> bool {
    matches!(err, NodeError::Connect { .. }) || remote_code(err) == Some(tonic::Code::Unavailable)
}

/// Whether `err` is a call that outlived its deadline (the peer may still be working on it).
pub(super) fn is_deadline_miss(err: &NodeError) -> bool {
    remote_code(err) == Some(tonic::Code::DeadlineExceeded)
}

/// Whether `err` says the peer does not serve the layers asked for: the listing that named it
/// is out of date (it changed its layers since).
pub(super) fn is_stale_listing(err: &NodeError) -> bool {
    remote_code(err) == Some(tonic::Code::FailedPrecondition)
}

/// The status code a remote peer answered with, if `err` is its answer.
pub(super) fn remote_code(err: &NodeError) -> Option<tonic::Code> {
    match err {
        NodeError::Remote { status, .. } => Some(status.code()),
        _ => None,
    }
}

/// Whether an error is the peer's (so another peer may do better) rather than the request's.
pub(super) fn is_peer_fault(err: &NodeError) -> bool {
    use tonic::Code;
    match err {
        NodeError::Connect { .. }
        | NodeError::Receipt(_)
        | NodeError::Verification { .. }
        | NodeError::Identity(_) => true,
        NodeError::Remote { status, .. } => !matches!(
            status.code(),
            Code::InvalidArgument
                | Code::OutOfRange
                | Code::FailedPrecondition
                | Code::PermissionDenied
        ),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A peer's answer carrying `err`, as the client meets it.
    fn answered(err: NodeError) -> NodeError {
        NodeError::Remote {
            peer: "p".into(),
            status: tonic::Status::from(err),
        }
    }

    #[test]
    fn a_worker_s_own_failure_or_a_busy_node_is_failed_over_and_a_bad_request_is_not() {
        let range = LayerRange::new(0, 2).unwrap();
        for err in [
            NodeError::Internal("a compute worker panicked".into()),
            NodeError::Device("the GPU was lost".into()),
            NodeError::Full("KV cache budget".into()),
            NodeError::SessionBusy("s".into()),
        ] {
            let text = err.to_string();
            assert_eq!(fault_of(&answered(err)), Fault::Peer, "{text}");
        }
        let paused = answered(NodeError::NotServing { draining: false });
        assert_eq!(fault_of(&paused), Fault::Unreachable);
        let moved = answered(NodeError::WrongLayers {
            asked: range,
            serves: range,
        });
        assert_eq!(fault_of(&moved), Fault::StaleListing);
        let bad = answered(NodeError::BadRequest("token ids out of range".into()));
        assert_eq!(fault_of(&bad), Fault::Request);
    }
}
