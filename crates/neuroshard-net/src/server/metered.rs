//! Request bodies metered against the server's byte budget: every frame a call's body brings
//! is counted, in all and per caller address, until the call is done with its body, and a
//! frame that would pass a cap fails the call with RESOURCE_EXHAUSTED. A stream's count stops
//! growing at one message cap's worth (tonic holds one message of it at a time) but is not
//! given back until the stream ends, so a long upload holds up to 101 MiB of its address's
//! share. A method with a cap of its own (a node's Forward and Backward, sized from its model)
//! is refused with OUT_OF_RANGE past it.

use std::net::IpAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use tonic::body::Body as TonicBody;
use tonic::codegen::http;

use crate::MAX_MESSAGE_BYTES;
use neuroshard_base::quota::{Held, Quota};

/// Most bytes one body is counted for: a message at the cap and its gRPC framing.
const BODY_WINDOW_BYTES: usize = MAX_MESSAGE_BYTES + 5;

/// Wraps a server's routes so every request body is metered against `quota`, and a body of
/// a method in `caps` (gRPC path, most bytes) is refused past its cap.
#[derive(Clone)]
pub(super) struct MeteredLayer {
    quota: Arc<Quota>,
    caps: Arc<[(&'static str, usize)]>,
}

impl MeteredLayer {
    pub(super) fn new(quota: Arc<Quota>, caps: Vec<(&'static str, usize)>) -> Self {
        let caps = caps.into();
        Self { quota, caps }
    }
}

impl<S> tower::Layer<S> for MeteredLayer {
    type Service = Metering<S>;

    fn layer(&self, inner: S) -> Metering<S> {
        Metering {
            inner,
            quota: self.quota.clone(),
            caps: self.caps.clone(),
        }
    }
}

/// The service [`MeteredLayer`] makes.
#[derive(Clone)]
pub(super) struct Metering<S> {
    inner: S,
    quota: Arc<Quota>,
    caps: Arc<[(&'static str, usize)]>,
}

impl<S> tower::Service<http::Request<TonicBody>> for Metering<S>
where
    S: tower::Service<http::Request<TonicBody>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<TonicBody>) -> Self::Future {
        let ip = request
            .extensions()
            .get::<crate::tls::Caller>()
            .and_then(|c| c.addr)
            .map(|a| a.ip().to_canonical());
        let path = request.uri().path();
        let cap = self.caps.iter().find(|(p, _)| *p == path).copied();
        let (parts, body) = request.into_parts();
        let body = TonicBody::new(Metered {
            inner: body,
            quota: self.quota.clone(),
            ip,
            held: None,
            cap,
            received: 0,
        });
        self.inner.call(http::Request::from_parts(parts, body))
    }
}

/// A request body whose bytes are counted against the quota while it lives.
struct Metered {
    inner: TonicBody,
    quota: Arc<Quota>,
    ip: Option<IpAddr>,
    held: Option<Held>,
    /// The method and the most bytes its body may have, where it has a cap of its own.
    cap: Option<(&'static str, usize)>,
    received: usize,
}

impl Metered {
    /// Counts `n` more bytes, up to the body's window; refuses a body past its method's cap.
    fn count(&mut self, n: usize) -> Result<(), tonic::Status> {
        self.received = self.received.saturating_add(n);
        if let Some((method, max)) = self.cap
            && self.received > max
        {
            return Err(tonic::Status::out_of_range(format!(
                "a {method} request of more than {max} bytes: this server takes no more"
            )));
        }
        let counted = self.held.as_ref().map_or(0, Held::amount);
        let more = n.min(BODY_WINDOW_BYTES.saturating_sub(counted));
        if more == 0 {
            return Ok(());
        }
        let taken = match &mut self.held {
            Some(held) => held.grow(more),
            None => Held::take(&self.quota, self.ip, more).map(|h| self.held = Some(h)),
        };
        taken.map_err(|why| tonic::Status::resource_exhausted(format!("request refused: {why}")))
    }
}

impl Body for Metered {
    type Data = Bytes;
    type Error = tonic::Status;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, tonic::Status>>> {
        let this = self.get_mut();
        let frame = match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => frame,
            other => return other,
        };
        if let Some(data) = frame.data_ref()
            && let Err(status) = this.count(data.len())
        {
            return Poll::Ready(Some(Err(status)));
        }
        Poll::Ready(Some(Ok(frame)))
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
