//! Whose fault an error is, as failover decides: the peer's (try another), the request's
//! (fail the step), a deadline missed, or a listing out of date.

use super::*;

/// Whether `err` is a call that outlived its deadline (the peer may still be working on it).
/// Whether `err` says the peer could not be reached: it, or the relay in front of it, is down.
pub(super) fn is_unreachable(err: &NodeError) -> bool {
    matches!(err, NodeError::Connect { .. }) || remote_code(err) == Some(tonic::Code::Unavailable)
}

/// The first pause before asking an unreachable peer that nobody can replace again; it doubles
/// with each try, so the session's failovers (4 by default) cover about 4 s.
pub(super) const UNREACHABLE_PAUSE: std::time::Duration = std::time::Duration::from_millis(250);

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
