//! The DHT actor: one task owns a node's [`Kademlia`] state machine and does its IO.
//!
//! Its `select!` loop takes, in turn: commands from the [`DhtHandle`] (inbound requests from the
//! gRPC service, queries, contacts learned elsewhere), the answers of the requests it sent, and
//! the state machine's next deadline. After each event it polls the state machine and carries out
//! what it returns: each request to a peer goes out on a task of its own through the connection
//! pool, and each finished query answers whoever is waiting for it.

use neuroshard_base::sync::LockExt;
use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use neuroshard_base::{NodeId, NodeKey, PublicKey};
use neuroshard_dht::{
    Contact, DhtError, Kademlia, Key, Mode, NoAnswer, Outcome, Output, QueryId, Record, RecordKey,
    Request, RequestId, Response,
};
use neuroshard_proto as pb;
use pb::dht_client::DhtClient;
use rand::SeedableRng;
use rand::rngs::StdRng;
use tokio::sync::{mpsc, oneshot, watch};
use tokio_util::sync::CancellationToken;

use neuroshard_net::NodeError;
use neuroshard_net::convert::{
    contacts_from_proto, record_from_proto, record_to_proto, sender_from_proto, sender_to_proto,
};
use neuroshard_net::pool::{ConnectionPool, Target};

/// Commands waiting for the actor: inbound requests and local queries. 1024 holds a burst from
/// many peers at once; past it inbound requests are refused as busy rather than queued without
/// bound.
const COMMAND_QUEUE: usize = 1024;

/// Answers of sent requests waiting for the actor. The state machine keeps at most α requests in
/// flight per lookup, so 256 covers dozens of concurrent queries.
const ANSWER_QUEUE: usize = 256;

/// Longest the actor sleeps between looks at the wall clock. Deadlines are wall-clock times (the
/// records' expiry is), and a laptop that slept overnight wakes with its timers late: a second
/// bounds how late.
const MAX_NAP: Duration = Duration::from_secs(1);

/// How long a signed sender contact is reused before it is signed again: well inside the
/// receivers' 5-minute clock skew window, and one signature a minute instead of one per request.
const SENDER_RESIGN_MS: u64 = 60_000;

/// Largest DHT reply read: k contacts plus a key's 64 entries of at most 4 KiB each.
pub const MAX_DHT_REPLY_BYTES: usize = 512 * 1024;

/// What the actor reports about itself.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct DhtStats {
    /// Contacts in the routing table.
    pub contacts: usize,
    /// Records held for the swarm.
    pub records: usize,
}

/// This node's contact, signed by its key, for what it sends and answers; signed again once a
/// minute.
#[derive(Debug)]
pub struct SignedContact {
    key: Arc<NodeKey>,
    addr: std::net::SocketAddr,
    signed: std::sync::Mutex<Option<pb::DhtSender>>,
}

impl SignedContact {
    /// `key`'s contact at `addr`.
    pub fn new(key: Arc<NodeKey>, addr: std::net::SocketAddr) -> Self {
        Self {
            key,
            addr,
            signed: std::sync::Mutex::new(None),
        }
    }

    /// The contact, signed within the last minute.
    pub fn current(&self) -> pb::DhtSender {
        let now = neuroshard_net::now_ms();
        let mut signed = self.signed.lock_or_recover();
        match &*signed {
            Some(s) if now.saturating_sub(s.timestamp_ms) < SENDER_RESIGN_MS => s.clone(),
            _ => {
                let fresh = sender_to_proto(&self.key, self.addr, now);
                *signed = Some(fresh.clone());
                fresh
            }
        }
    }
}

/// Checks that an answer comes from the key asked: signed by it, within the clock skew the
/// senders get.
fn check_responder(to: &Contact, responder: Option<pb::DhtSender>) -> Result<(), NoAnswer> {
    let skew = crate::tracker::ANNOUNCE_SKEW_MS;
    let bad = |why: String| Err(NoAnswer::BadAnswer(format!("{}: {why}", to.addr)));
    match sender_from_proto(responder, neuroshard_net::now_ms(), skew) {
        Ok(Some(c)) if c.key == to.key => Ok(()),
        Ok(Some(_)) => bad("answered as another node".into()),
        Ok(None) => bad("answered without naming itself".into()),
        Err(e) => bad(e.to_string()),
    }
}

enum Command {
    Inbound {
        sender: Option<Contact>,
        origin: Option<IpAddr>,
        request: Request,
        reply: oneshot::Sender<Result<Response, DhtError>>,
    },
    AddContacts(Vec<Contact>),
    Query {
        op: QueryOp,
        reply: oneshot::Sender<Result<Outcome, NodeError>>,
    },
    Closest {
        target: Key,
        reply: oneshot::Sender<Vec<Contact>>,
    },
    Withdraw {
        key: RecordKey,
        publisher: PublicKey,
    },
}

enum QueryOp {
    Bootstrap,
    Get(RecordKey),
    Put(Record),
}

/// A cheap handle on a running DHT actor.
#[derive(Debug, Clone)]
pub struct DhtHandle {
    commands: mpsc::Sender<Command>,
    local: Contact,
    signer: Option<Arc<SignedContact>>,
    stats: watch::Receiver<DhtStats>,
}

impl std::fmt::Debug for Command {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Command::Inbound { .. } => "Inbound",
            Command::AddContacts(_) => "AddContacts",
            Command::Query { .. } => "Query",
            Command::Closest { .. } => "Closest",
            Command::Withdraw { .. } => "Withdraw",
        })
    }
}

impl DhtHandle {
    /// Starts the actor for a node at `local` (its key and dialable address), signing what it
    /// sends with `key` when it serves, until `cancel` fires.
    pub fn spawn(
        local: Contact,
        key: Option<Arc<NodeKey>>,
        config: neuroshard_dht::Config,
        pool: Arc<ConnectionPool>,
        cancel: CancellationToken,
    ) -> Self {
        let signer = key.map(|key| Arc::new(SignedContact::new(key, local.addr)));
        let mode = if signer.is_some() {
            Mode::Server
        } else {
            Mode::Client
        };
        let (commands_tx, commands) = mpsc::channel(COMMAND_QUEUE);
        let (answers_tx, answers) = mpsc::channel(ANSWER_QUEUE);
        let (stats_tx, stats) = watch::channel(DhtStats::default());
        let kad = Kademlia::new(
            local,
            mode,
            config,
            StdRng::from_os_rng(),
            neuroshard_net::now_ms(),
        );
        let actor = DhtActor {
            kad,
            commands,
            answers,
            answers_tx,
            waiting: HashMap::new(),
            transport: Arc::new(Transport {
                pool,
                signer: signer.clone(),
                timeout: Duration::from_millis(config.request_timeout_ms),
            }),
            stats: stats_tx,
        };
        tokio::spawn(actor.run(cancel));
        Self {
            commands: commands_tx,
            local,
            signer,
            stats,
        }
    }

    /// This node's contact.
    pub fn local(&self) -> Contact {
        self.local
    }

    /// Whether it serves the DHT or only asks.
    pub fn mode(&self) -> Mode {
        if self.signer.is_some() {
            Mode::Server
        } else {
            Mode::Client
        }
    }

    /// This node's signed contact; none for a client.
    pub fn signed_contact(&self) -> Option<pb::DhtSender> {
        self.signer.as_ref().map(|s| s.current())
    }

    /// A watch of the table and store sizes.
    pub fn stats(&self) -> watch::Receiver<DhtStats> {
        self.stats.clone()
    }

    /// Answers a request from a peer (`sender` as a server, from the address `origin`);
    /// refused as busy when the actor's queue is full.
    pub async fn handle_request(
        &self,
        sender: Option<Contact>,
        origin: Option<IpAddr>,
        request: Request,
    ) -> Result<Response, NodeError> {
        let (reply, answer) = oneshot::channel();
        self.commands
            .try_send(Command::Inbound {
                sender,
                origin,
                request,
                reply,
            })
            .map_err(|e| match e {
                mpsc::error::TrySendError::Full(_) => {
                    NodeError::Full("the DHT is busy; try again shortly".into())
                }
                mpsc::error::TrySendError::Closed(_) => NodeError::ShuttingDown,
            })?;
        Ok(answer.await.map_err(|_| NodeError::ShuttingDown)??)
    }

    /// Peers heard of outside the DHT (tracker, referrals, LAN): each is pinged, and enters the
    /// routing table once it answers as itself.
    pub async fn add_candidates(&self, contacts: Vec<Contact>) {
        if !contacts.is_empty() {
            let _ = self.commands.send(Command::AddContacts(contacts)).await;
        }
    }

    /// The contacts this node knows closest to `target`, at most k.
    pub async fn closest(&self, target: Key) -> Vec<Contact> {
        let (reply, answer) = oneshot::channel();
        if self
            .commands
            .send(Command::Closest { target, reply })
            .await
            .is_err()
        {
            return Vec::new();
        }
        answer.await.unwrap_or_default()
    }

    async fn query(&self, op: QueryOp) -> Result<Outcome, NodeError> {
        let (reply, answer) = oneshot::channel();
        self.commands
            .send(Command::Query { op, reply })
            .await
            .map_err(|_| NodeError::ShuttingDown)?;
        answer.await.map_err(|_| NodeError::ShuttingDown)?
    }

    /// Looks up this node's own key: fills the buckets near it and tells its neighbours.
    pub async fn bootstrap(&self) -> Result<Outcome, NodeError> {
        self.query(QueryOp::Bootstrap).await
    }

    /// The records under `key`, one per publisher, verified.
    pub async fn get(&self, key: RecordKey) -> Result<Outcome, NodeError> {
        self.query(QueryOp::Get(key)).await
    }

    /// Stores `record` at the k peers closest to its key; `stored` counts those that took it.
    pub async fn put(&self, record: Record) -> Result<Outcome, NodeError> {
        self.query(QueryOp::Put(record)).await
    }

    /// Stops republishing `publisher`'s record under `key` and drops it here.
    pub async fn withdraw(&self, key: RecordKey, publisher: PublicKey) {
        let _ = self
            .commands
            .send(Command::Withdraw { key, publisher })
            .await;
    }
}

/// Sends the state machine's requests to peers.
#[derive(Debug)]
struct Transport {
    pool: Arc<ConnectionPool>,
    /// Signs the sender contact; none for a client, which sends none.
    signer: Option<Arc<SignedContact>>,
    timeout: Duration,
}

impl Transport {
    /// Sends `request` to `to` and returns its answer, or why there is none.
    async fn call(&self, to: Contact, request: Request) -> Result<Response, NoAnswer> {
        let sender = self.signer.as_ref().map(|s| s.current());
        let exchange = async {
            let channel = self
                .pool
                .control_channel(&Target::node(to.addr.to_string(), NodeId(to.key.0)))
                .await
                .map_err(|e| NoAnswer::Unreachable(e.to_string()))?;
            let client = DhtClient::new(channel).max_decoding_message_size(MAX_DHT_REPLY_BYTES);
            exchange(client, &to, sender, request).await
        };
        tokio::time::timeout(self.timeout, exchange)
            .await
            .unwrap_or(Err(NoAnswer::TimedOut))
    }
}

/// One request and its answer, checked to come from `to`.
async fn exchange(
    mut client: DhtClient<tonic::transport::Channel>,
    to: &Contact,
    sender: Option<pb::DhtSender>,
    request: Request,
) -> Result<Response, NoAnswer> {
    let status = |s: tonic::Status| {
        let why = format!("{}: {}", to.addr, s.message());
        match s.code() {
            tonic::Code::Unavailable => NoAnswer::Unreachable(why),
            _ => NoAnswer::Refused(why),
        }
    };
    match request {
        Request::Ping => {
            let request = pb::DhtPingRequest { sender };
            let reply = client.ping(request).await.map_err(status)?.into_inner();
            check_responder(to, reply.responder)?;
            Ok(Response::Pong)
        }
        Request::FindNode { target } => {
            let target = target.0.to_vec();
            let request = pb::FindNodeRequest { sender, target };
            let reply = client
                .find_node(request)
                .await
                .map_err(status)?
                .into_inner();
            check_responder(to, reply.responder)?;
            Ok(nodes(reply.closer, Vec::new()))
        }
        Request::FindValue { key } => {
            let key = key.to_string();
            let request = pb::FindValueRequest { sender, key };
            let reply = client
                .find_value(request)
                .await
                .map_err(status)?
                .into_inner();
            check_responder(to, reply.responder)?;
            Ok(nodes(reply.closer, reply.records))
        }
        Request::Store { record } => {
            let record = Some(record_to_proto(&record));
            let request = pb::StoreRequest { sender, record };
            let reply = client.store(request).await.map_err(status)?.into_inner();
            check_responder(to, reply.responder)?;
            Ok(Response::Stored)
        }
    }
}

/// A lookup's answer: closer contacts and the records found. Malformed records are dropped
/// here; well-formed ones with a bad signature or expiry are the state machine's to count and
/// drop.
fn nodes(closer: Vec<pb::DhtContact>, records: Vec<pb::DhtRecord>) -> Response {
    Response::Nodes {
        closer: contacts_from_proto(closer),
        records: records
            .into_iter()
            .filter_map(|r| record_from_proto(r).ok())
            .collect(),
    }
}

struct DhtActor {
    kad: Kademlia<StdRng>,
    commands: mpsc::Receiver<Command>,
    answers: mpsc::Receiver<(RequestId, Result<Response, NoAnswer>)>,
    answers_tx: mpsc::Sender<(RequestId, Result<Response, NoAnswer>)>,
    waiting: HashMap<QueryId, oneshot::Sender<Result<Outcome, NodeError>>>,
    transport: Arc<Transport>,
    stats: watch::Sender<DhtStats>,
}

impl DhtActor {
    /// The event loop: one event, then whatever the state machine asks for, until cancelled or
    /// every handle is gone.
    async fn run(mut self, cancel: CancellationToken) {
        loop {
            let now = neuroshard_net::now_ms();
            let nap =
                Duration::from_millis(self.kad.next_wakeup().saturating_sub(now)).min(MAX_NAP);
            tokio::select! {
                _ = cancel.cancelled() => return,
                command = self.commands.recv() => match command {
                    Some(command) => self.on_command(command),
                    None => return,
                },
                Some((id, result)) = self.answers.recv() => {
                    self.kad.handle_response(id, result, neuroshard_net::now_ms());
                }
                _ = tokio::time::sleep(nap) => {}
            }
            self.carry_out();
        }
    }

    fn on_command(&mut self, command: Command) {
        let now = neuroshard_net::now_ms();
        match command {
            Command::Inbound {
                sender,
                origin,
                request,
                reply,
            } => {
                let response = self.kad.handle_request(sender, origin, request, now);
                self.publish_stats();
                let _ = reply.send(response);
            }
            Command::AddContacts(contacts) => {
                for contact in contacts {
                    self.kad.add_candidate(contact, now);
                }
            }
            Command::Query { op, reply } => {
                let started = match op {
                    QueryOp::Bootstrap => Ok(self.kad.bootstrap(now)),
                    QueryOp::Get(key) => Ok(self.kad.get(key, now)),
                    QueryOp::Put(record) => self
                        .kad
                        .put(record, now)
                        .map_err(|e| NodeError::Dht(e.into())),
                };
                match started {
                    Ok(query) => {
                        self.waiting.insert(query, reply);
                    }
                    Err(e) => {
                        let _ = reply.send(Err(e));
                    }
                }
            }
            Command::Closest { target, reply } => {
                let k = self.kad.config().k;
                let _ = reply.send(self.kad.table().closest(&target, k));
            }
            Command::Withdraw { key, publisher } => self.kad.withdraw(&key, &publisher),
        }
    }

    /// Publishes the table and store sizes, before any answer that follows from them.
    fn publish_stats(&self) {
        let now = DhtStats {
            contacts: self.kad.table().len(),
            records: self.kad.store().len(),
        };
        self.stats.send_if_modified(|s| {
            let changed = *s != now;
            *s = now;
            changed
        });
    }

    /// Polls the state machine and does what it asks: send requests, answer finished queries.
    /// The stats are published first, so whoever a finished query wakes sees them.
    fn carry_out(&mut self) {
        let outputs = self.kad.poll(neuroshard_net::now_ms());
        self.publish_stats();
        for output in outputs {
            match output {
                Output::Send { id, to, request } => {
                    let transport = self.transport.clone();
                    let answers = self.answers_tx.clone();
                    tokio::spawn(async move {
                        let result = transport.call(to, request).await;
                        let _ = answers.send((id, result)).await;
                    });
                }
                Output::Done { query, outcome } => {
                    if let Some(waiter) = self.waiting.remove(&query) {
                        let _ = waiter.send(Ok(outcome));
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_answer_counts_only_from_the_key_that_was_asked() {
        let asked = NodeKey::generate();
        let to = Contact {
            key: Key::of_node(&asked.id()),
            addr: "127.0.0.1:7000".parse().unwrap(),
        };
        let signed_by =
            |key: &NodeKey| Some(sender_to_proto(key, to.addr, neuroshard_net::now_ms()));
        check_responder(&to, signed_by(&asked)).unwrap();
        let err = check_responder(&to, signed_by(&NodeKey::generate())).unwrap_err();
        assert!(
            matches!(&err, NoAnswer::BadAnswer(why) if why.contains("answered as another node")),
            "{err}"
        );
        let err = check_responder(&to, None).unwrap_err();
        assert!(
            matches!(&err, NoAnswer::BadAnswer(why) if why.contains("without naming itself")),
            "{err}"
        );
        let mut forged = signed_by(&asked).unwrap();
        forged.timestamp_ms += 1;
        let err = check_responder(&to, Some(forged)).unwrap_err();
        assert!(
            matches!(&err, NoAnswer::BadAnswer(why) if why.contains("signature")),
            "{err}"
        );
    }
}
