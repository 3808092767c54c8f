//! The gRPC face of a node's DHT: checks each request's form and its sender's signature, then
//! hands it to the actor.

use neuroshard_dht::{Request, Response};
use neuroshard_proto as pb;
use pb::dht_server::{Dht, DhtServer};
use tonic::{Status, async_trait};

use super::dht::{DhtHandle, MAX_DHT_REPLY_BYTES};
use crate::NodeError;
use crate::convert::{
    contact_to_proto, key_from_proto, record_from_proto, record_to_proto, sender_from_proto,
};

/// Largest DHT request decoded: a store of a 4 KiB record with its envelope fits many times
/// over; anything larger is refused before it is read.
const MAX_DHT_REQUEST_BYTES: usize = 64 * 1024;

/// Serves the DHT of one node.
#[derive(Debug, Clone)]
pub struct DhtService {
    dht: DhtHandle,
}

impl DhtService {
    /// The service over `dht`, with its message limits.
    pub fn server(dht: DhtHandle) -> DhtServer<Self> {
        DhtServer::new(Self { dht })
            .max_decoding_message_size(MAX_DHT_REQUEST_BYTES)
            .max_encoding_message_size(MAX_DHT_REPLY_BYTES)
    }

    /// Checks the sender and answers `request` through the actor.
    async fn serve(
        &self,
        sender: Option<pb::DhtSender>,
        request: Request,
    ) -> Result<Response, NodeError> {
        let sender = sender_from_proto(sender, crate::now_ms(), crate::tracker::ANNOUNCE_SKEW_MS)?;
        self.dht.handle_request(sender, request).await
    }
}

/// The contacts (and records) of a lookup answer.
fn nodes(response: Response) -> Result<(Vec<pb::DhtContact>, Vec<pb::DhtRecord>), Status> {
    match response {
        Response::Nodes { closer, records } => Ok((
            closer.iter().map(contact_to_proto).collect(),
            records.iter().map(record_to_proto).collect(),
        )),
        other => Err(Status::internal(format!(
            "the DHT answered a lookup with {other:?}"
        ))),
    }
}

#[async_trait]
impl Dht for DhtService {
    async fn ping(
        &self,
        request: tonic::Request<pb::DhtPingRequest>,
    ) -> Result<tonic::Response<pb::DhtPingResponse>, Status> {
        self.serve(request.into_inner().sender, Request::Ping)
            .await?;
        Ok(tonic::Response::new(pb::DhtPingResponse {}))
    }

    async fn find_node(
        &self,
        request: tonic::Request<pb::FindNodeRequest>,
    ) -> Result<tonic::Response<pb::FindNodeResponse>, Status> {
        let request = request.into_inner();
        let target = key_from_proto("target", &request.target)?;
        let response = self
            .serve(request.sender, Request::FindNode { target })
            .await?;
        let (closer, _) = nodes(response)?;
        Ok(tonic::Response::new(pb::FindNodeResponse { closer }))
    }

    async fn find_value(
        &self,
        request: tonic::Request<pb::FindValueRequest>,
    ) -> Result<tonic::Response<pb::FindValueResponse>, Status> {
        let request = request.into_inner();
        let key = request
            .key
            .parse()
            .map_err(|e| NodeError::Dht(neuroshard_dht::DhtError::Record(e)))?;
        let response = self
            .serve(request.sender, Request::FindValue { key })
            .await?;
        let (closer, records) = nodes(response)?;
        Ok(tonic::Response::new(pb::FindValueResponse {
            closer,
            records,
        }))
    }

    async fn store(
        &self,
        request: tonic::Request<pb::StoreRequest>,
    ) -> Result<tonic::Response<pb::StoreResponse>, Status> {
        let request = request.into_inner();
        let record = request
            .record
            .ok_or_else(|| NodeError::BadRequest("store without a record".into()))?;
        let record = record_from_proto(record)?;
        self.serve(request.sender, Request::Store { record })
            .await?;
        Ok(tonic::Response::new(pb::StoreResponse {}))
    }
}
