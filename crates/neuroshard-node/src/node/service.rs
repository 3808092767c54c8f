//! The gRPC face of a node: each RPC counted, timed and handed to the node's state.

use super::*;

/// The key `request`'s connection proved: every connection a node serves is secured, so a call
/// without one did not come through the server.
fn caller_key<T>(request: &Request<T>) -> Result<PublicKey, Status> {
    neuroshard_net::tls::caller(request)
        .map(|c| c.key)
        .ok_or_else(|| Status::unauthenticated("the call came without a proven key"))
}

/// The gRPC face of a node.
#[derive(Debug, Clone)]
pub struct NodeService {
    pub(super) state: Arc<NodeState>,
}

impl NodeService {
    /// Runs a compute call (`what`, for the log), counting its bytes and time.
    pub(super) async fn counted<R: Message>(
        &self,
        what: &str,
        received: usize,
        call: impl Future<Output = Result<R, NodeError>>,
    ) -> Result<Response<R>, Status> {
        let started = std::time::Instant::now();
        let result = call.await;
        let sent = result.as_ref().map_or(0, |r| r.encoded_len());
        self.state.metrics.record_bytes(sent, received);
        self.state
            .metrics
            .record_rpc(started.elapsed(), result.is_ok());
        if let Err(e) = &result {
            tracing::debug!("{what} refused: {e}");
        }
        result.map(Response::new).map_err(Status::from)
    }
}

pub(super) type CheckpointStream =
    Pin<Box<dyn futures::Stream<Item = Result<pb::CheckpointChunk, Status>> + Send>>;

#[tonic::async_trait]
impl Node for NodeService {
    async fn forward(
        &self,
        request: Request<pb::ForwardRequest>,
    ) -> Result<Response<pb::ForwardResponse>, Status> {
        let (received, caller) = (request.get_ref().encoded_len(), caller_key(&request)?);
        let call = self.state.clone().forward(request.into_inner(), caller);
        self.counted("forward", received, call).await
    }

    async fn end_session(
        &self,
        request: Request<pb::EndSessionRequest>,
    ) -> Result<Response<pb::EndSessionResponse>, Status> {
        let caller = caller_key(&request)?;
        let existed = self
            .state
            .sessions
            .end(&request.into_inner().session_id, &caller)?;
        Ok(Response::new(pb::EndSessionResponse { existed }))
    }

    async fn backward(
        &self,
        request: Request<pb::BackwardRequest>,
    ) -> Result<Response<pb::BackwardResponse>, Status> {
        let (received, caller) = (request.get_ref().encoded_len(), caller_key(&request)?);
        let call = self.state.clone().backward(request.into_inner(), caller);
        self.counted("backward", received, call).await
    }

    async fn exchange_gradient(
        &self,
        request: Request<pb::ExchangeGradientRequest>,
    ) -> Result<Response<pb::ExchangeGradientResponse>, Status> {
        let (received, caller) = (request.get_ref().encoded_len(), caller_key(&request)?);
        let call = self
            .state
            .clone()
            .exchange_gradient(request.into_inner(), caller);
        self.counted("exchange", received, call).await
    }

    type GetCheckpointStream = CheckpointStream;

    async fn get_checkpoint(
        &self,
        request: Request<pb::CheckpointRequest>,
    ) -> Result<Response<Self::GetCheckpointStream>, Status> {
        let ip = neuroshard_net::tls::caller(&request)
            .and_then(|c| c.addr)
            .map(|a| a.ip().to_canonical());
        let held = neuroshard_base::quota::Held::take(&self.state.checkpoint_streams, ip, 1)
            .map_err(|why| NodeError::Full(format!("no checkpoint stream now: {why}")))?;
        let messages = self
            .state
            .clone()
            .get_checkpoint(request.into_inner())
            .await?;
        // Chunks are made one at a time as the caller takes them; a caller that takes none for
        // the deadline ends the stream, and the snapshot it held is freed.
        let (metrics, deadline) = (self.state.metrics.clone(), self.state.chunk_deadline());
        let (sender, receiver) = tokio::sync::mpsc::channel(1);
        tokio::spawn(async move {
            let _held = held;
            for message in messages {
                let bytes = message.as_ref().map_or(0, |c| c.encoded_len());
                if sender.send_timeout(message, deadline).await.is_err() {
                    return;
                }
                metrics.record_bytes(bytes, 0);
            }
        });
        let stream = tokio_stream::wrappers::ReceiverStream::new(receiver);
        Ok(Response::new(Box::pin(stream)))
    }

    async fn put_checkpoint(
        &self,
        request: Request<tonic::Streaming<pb::CheckpointChunk>>,
    ) -> Result<Response<pb::PutCheckpointResponse>, Status> {
        let caller = caller_key(&request)?;
        let call = self
            .state
            .clone()
            .put_checkpoint(request.into_inner(), caller);
        self.counted("put checkpoint", 0, call).await
    }

    async fn get_model_file(
        &self,
        request: Request<pb::ModelFileRequest>,
    ) -> Result<Response<pb::ModelFileResponse>, Status> {
        self.state
            .model_file(request.into_inner())
            .await
            .map(Response::new)
    }

    async fn ping(
        &self,
        _: Request<pb::PingRequest>,
    ) -> Result<Response<pb::PingResponse>, Status> {
        let now_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        Ok(Response::new(pb::PingResponse {
            node: Some(peer_to_proto(&self.state.record())),
            metrics: Some(self.state.metrics().into()),
            server_time_ms: now_ms,
        }))
    }

    async fn dial_back(
        &self,
        request: Request<pb::DialBackRequest>,
    ) -> Result<Response<pb::DialBackResponse>, Status> {
        let caller = neuroshard_net::tls::caller(&request).and_then(|c| c.addr);
        Ok(Response::new(
            crate::reach::dial_back(caller, request.into_inner()).await,
        ))
    }

    async fn submit_receipts(
        &self,
        request: Request<pb::SubmitReceiptsRequest>,
    ) -> Result<Response<pb::SubmitReceiptsResponse>, Status> {
        let request = request.into_inner();
        let result = self
            .state
            .clone()
            .submit_receipts(request.countersigned, request.pass)
            .await;
        result.map(Response::new).map_err(Status::from)
    }

    async fn get_peers(
        &self,
        request: Request<pb::GetPeersRequest>,
    ) -> Result<Response<pb::GetPeersResponse>, Status> {
        let reached_at = request.local_addr();
        let near = neuroshard_net::convert::near_key(&request.into_inner().near)?;
        let dht = self.state.discovery.dht();
        let own = dht.local();
        let mut contacts = dht.closest(near.unwrap_or(own.key)).await;
        if dht.mode() == neuroshard_dht::Mode::Server {
            // A node that announces loopback (it was given no address to advertise) is named
            // by the address the caller reached it at.
            let addr = match reached_at {
                Some(at) if own.addr.ip().is_loopback() && !at.ip().is_loopback() => at,
                _ => own.addr,
            };
            contacts.insert(0, Contact { addr, ..own });
        }
        // At most what a caller's codec reads of a referral.
        let mut peers = vec![self.state.record()];
        let room = neuroshard_proto::checked::MAX_PEERS - 1;
        peers.extend(self.state.known_peers().into_iter().take(room));
        Ok(Response::new(pb::GetPeersResponse {
            peers: peers.iter().map(peer_to_proto).collect(),
            contacts: contacts.iter().map(contact_to_proto).collect(),
        }))
    }
}
