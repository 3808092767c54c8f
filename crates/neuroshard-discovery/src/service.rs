//! The gRPC face of a node's DHT: checks each request's form and its sender, hands it to the
//! actor, and signs each answer with the node's contact.

use neuroshard_net::tls::Caller;

use neuroshard_dht::{Contact, Key, Request, Response};
use neuroshard_proto as pb;
use pb::dht_server::{Dht, DhtServer};
use tonic::{Status, async_trait};

use super::dht::{DhtHandle, MAX_DHT_REPLY_BYTES};
use neuroshard_net::NodeError;
use neuroshard_net::convert::{
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

/// The sender a request vouches for, if it may enter the routing table: signed by its key
/// (a bad signature is an error), the key the request's connection proved, and claiming the
/// address the request came from. A peer behind NAT claims an address it is not seen at, and
/// a client dials with a key of its own; both are served as clients.
fn vouched_sender(
    sender: Option<pb::DhtSender>,
    remote: Option<Caller>,
) -> Result<Option<Contact>, NodeError> {
    let sender = sender_from_proto(
        sender,
        neuroshard_net::now_ms(),
        crate::tracker::ANNOUNCE_SKEW_MS,
    )?;
    Ok(sender.filter(|c| {
        remote.is_some_and(|r| {
            c.key == Key::of_node(&r.key.id())
                && r.addr
                    .is_some_and(|a| a.ip().to_canonical() == c.addr.ip().to_canonical())
        })
    }))
}

impl DhtService {
    /// The service over `dht`, with its message limits.
    pub fn server(dht: DhtHandle) -> DhtServer<Self> {
        DhtServer::new(Self { dht })
            .max_decoding_message_size(MAX_DHT_REQUEST_BYTES)
            .max_encoding_message_size(MAX_DHT_REPLY_BYTES)
    }

    /// Checks the sender and answers `request` through the actor, with the node's signed
    /// contact for the caller to check.
    async fn serve(
        &self,
        remote: Option<Caller>,
        sender: Option<pb::DhtSender>,
        request: Request,
    ) -> Result<(Response, Option<pb::DhtSender>), NodeError> {
        let origin = remote.and_then(|r| r.addr).map(|a| a.ip().to_canonical());
        let sender = vouched_sender(sender, remote)?;
        let response = self.dht.handle_request(sender, origin, request).await?;
        Ok((response, self.dht.signed_contact()))
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
        let remote = neuroshard_net::tls::caller(&request);
        let sender = request.into_inner().sender;
        let (_, responder) = self.serve(remote, sender, Request::Ping).await?;
        Ok(tonic::Response::new(pb::DhtPingResponse { responder }))
    }

    async fn find_node(
        &self,
        request: tonic::Request<pb::FindNodeRequest>,
    ) -> Result<tonic::Response<pb::FindNodeResponse>, Status> {
        let remote = neuroshard_net::tls::caller(&request);
        let request = request.into_inner();
        let target = key_from_proto("target", &request.target)?;
        let (response, responder) = self
            .serve(remote, request.sender, Request::FindNode { target })
            .await?;
        let (closer, _) = nodes(response)?;
        Ok(tonic::Response::new(pb::FindNodeResponse {
            closer,
            responder,
        }))
    }

    async fn find_value(
        &self,
        request: tonic::Request<pb::FindValueRequest>,
    ) -> Result<tonic::Response<pb::FindValueResponse>, Status> {
        let remote = neuroshard_net::tls::caller(&request);
        let request = request.into_inner();
        let key = request
            .key
            .parse()
            .map_err(|e| NodeError::Dht(neuroshard_dht::DhtError::Record(e)))?;
        let (response, responder) = self
            .serve(remote, request.sender, Request::FindValue { key })
            .await?;
        let (closer, records) = nodes(response)?;
        Ok(tonic::Response::new(pb::FindValueResponse {
            closer,
            records,
            responder,
        }))
    }

    async fn store(
        &self,
        request: tonic::Request<pb::StoreRequest>,
    ) -> Result<tonic::Response<pb::StoreResponse>, Status> {
        let remote = neuroshard_net::tls::caller(&request);
        let request = request.into_inner();
        let record = request
            .record
            .ok_or_else(|| NodeError::BadRequest("store without a record".into()))?;
        let record = record_from_proto(record)?;
        let (_, responder) = self
            .serve(remote, request.sender, Request::Store { record })
            .await?;
        Ok(tonic::Response::new(pb::StoreResponse { responder }))
    }
}
