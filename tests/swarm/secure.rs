//! The secure transport: nothing readable or alterable on the path, nodes dialled as their keys,
//! and calls bound to the key their connection proved.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use neuroshard_base::NodeKey;
use neuroshard_client::generate::generate;
use neuroshard_client::{ClientConfig, SwarmClient};
use neuroshard_model::init::ModelSpec;
use neuroshard_net::convert::span_to_proto;
use neuroshard_net::pool::Target;
use neuroshard_net::tls::Dialler;
use neuroshard_proto as pb;
use neuroshard_tests::{Swarm, TestModel, node_client_as};
use pb::forward_request::Input;
use tonic::Code;

fn tokens(session: &str, pos: u64, ids: &[u32]) -> pb::ForwardRequest {
    pb::ForwardRequest {
        session_id: session.into(),
        start_pos: pos,
        layers: Some(span_to_proto(
            neuroshard_base::LayerRange::new(0, 4).unwrap(),
        )),
        input: Some(Input::Tokens(pb::TokenIds { ids: ids.to_vec() })),
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_key_cannot_use_or_end_someone_else_s_session() {
    let model = TestModel::new(&ModelSpec::tiny());
    let swarm = Swarm::start(model.path(), &[(0, 4)]).await.unwrap();
    let node = &swarm.nodes[0];
    let (owner, stranger) = (NodeKey::generate(), NodeKey::generate());
    let mut mine = node_client_as(node, &owner).await;
    let mut theirs = node_client_as(node, &stranger).await;
    mine.forward(tokens("chat", 0, &[5, 6, 7])).await.unwrap();

    // Continuing it, restarting it and ending it are all refused by name.
    for status in [
        theirs.forward(tokens("chat", 3, &[9])).await.unwrap_err(),
        theirs
            .forward(tokens("chat", 0, &[9, 9]))
            .await
            .unwrap_err(),
        theirs
            .end_session(pb::EndSessionRequest {
                session_id: "chat".into(),
            })
            .await
            .unwrap_err(),
    ] {
        assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");
        assert!(
            status.message().contains("belongs to another key"),
            "{status:?}"
        );
    }

    // The owner's session is as it was: its next step gives what the same steps give in a
    // session nobody else touched.
    let next = mine.forward(tokens("chat", 3, &[8])).await.unwrap();
    mine.forward(tokens("clean", 0, &[5, 6, 7])).await.unwrap();
    let clean = mine.forward(tokens("clean", 3, &[8])).await.unwrap();
    assert_eq!(next.into_inner().output, clean.into_inner().output);
    // And the owner may end it.
    let ended = mine
        .end_session(pb::EndSessionRequest {
            session_id: "chat".into(),
        })
        .await
        .unwrap();
    assert!(ended.into_inner().existed);
    swarm.shutdown().await;
}

/// A man in the middle on loopback: relays each connection to `upstream`, keeps every byte it
/// relays, and flips one byte of what the client sends next once told to.
struct Proxy {
    addr: std::net::SocketAddr,
    upstream: Arc<Mutex<Option<std::net::SocketAddr>>>,
    seen: Arc<Mutex<Vec<u8>>>,
    tamper: Arc<AtomicBool>,
}

impl Proxy {
    async fn start() -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let proxy = Self {
            addr: listener.local_addr().unwrap(),
            upstream: Arc::default(),
            seen: Arc::default(),
            tamper: Arc::default(),
        };
        let (upstream, seen, tamper) = (
            proxy.upstream.clone(),
            proxy.seen.clone(),
            proxy.tamper.clone(),
        );
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let Some(to) = *upstream.lock().unwrap() else {
                    continue;
                };
                let Ok(server) = tokio::net::TcpStream::connect(to).await else {
                    continue;
                };
                let (client_read, client_write) = client.into_split();
                let (server_read, server_write) = server.into_split();
                tokio::spawn(relay(
                    client_read,
                    server_write,
                    seen.clone(),
                    tamper.clone(),
                ));
                tokio::spawn(relay(
                    server_read,
                    client_write,
                    seen.clone(),
                    Arc::default(),
                ));
            }
        });
        proxy
    }

    fn relay_to(&self, upstream: std::net::SocketAddr) {
        *self.upstream.lock().unwrap() = Some(upstream);
    }
}

/// Copies `from` to `to`, keeping the bytes in `seen`; when `tamper` is set, flips a byte in
/// the middle of the next chunk (inside a TLS record) and clears it.
async fn relay(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    seen: Arc<Mutex<Vec<u8>>>,
    tamper: Arc<AtomicBool>,
) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        seen.lock().unwrap().extend_from_slice(&buf[..n]);
        // Only a chunk that carries a call: window updates and pings are smaller.
        if n > 100 && tamper.swap(false, Ordering::SeqCst) {
            buf[n / 2] ^= 0x01;
        }
        if to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_man_in_the_middle_reads_nothing_and_breaks_only_the_call_it_touches() {
    let model = TestModel::new(&ModelSpec::tiny());
    let expected = crate::generation::local_reference(&model, 8).await;
    let mut swarm = Swarm::start(model.path(), &[(0, 2)]).await.unwrap();
    // The only node of layers 2..4 at first is listed at the proxy's address.
    let proxy = Proxy::start().await;
    let spied = swarm
        .add_node_with(model.path(), 2, 4, |c| {
            c.advertise = Some(proxy.addr.to_string())
        })
        .await
        .unwrap();
    let spied_id = spied.id();
    proxy.relay_to(spied.addr());
    let client = SwarmClient::connect(ClientConfig::new(swarm.tracker.url()))
        .await
        .unwrap();
    swarm.add_node(model.path(), 2, 4).await.unwrap();
    let mut session = client.session();
    let mut session_id = String::new();
    let tamper = proxy.tamper.clone();
    let got = generate(
        &mut session,
        crate::generation::PROMPT,
        8,
        &[],
        |s, step| {
            session_id = s.id().to_string();
            // Three tokens in, the next thing the client sends the spied node is altered.
            if step == 3 {
                tamper.store(true, Ordering::SeqCst);
            }
        },
    )
    .await
    .unwrap();

    // The altered call failed, the client went to the other replica, and the tokens are
    // those of a run nobody touched.
    crate::generation::assert_same_generation(&got, &expected);
    let events = session.events().to_vec();
    assert!(
        events.iter().any(|e| e.contains(&proxy.addr.to_string())),
        "{events:?}"
    );
    assert!(session.chain().iter().all(|h| h.node_id != spied_id));
    session.close().await;

    // What crossed the proxy carries neither the session id nor the model id in the clear.
    let seen = proxy.seen.lock().unwrap().clone();
    assert!(
        seen.len() > 4096,
        "the proxy relayed the calls: {} bytes",
        seen.len()
    );
    let model_id = neuroshard_model::ModelInfo::read(model.path()).unwrap().id;
    for marker in [session_id.as_str(), model_id.as_str()] {
        assert!(!marker.is_empty());
        assert!(
            !seen.windows(marker.len()).any(|w| w == marker.as_bytes()),
            "{marker:?} crossed in the clear"
        );
    }

    // A man in the middle answering with another node's key is refused at the handshake.
    let other = swarm.nodes.last().unwrap();
    proxy.relay_to(other.addr());
    let dialler = Dialler::ephemeral().unwrap();
    let to = Target::node(proxy.addr.to_string(), spied_id);
    let err = neuroshard_net::pool::connect(&to, &dialler, std::time::Duration::from_secs(5))
        .await
        .unwrap_err()
        .to_string();
    assert!(
        err.contains(&format!(
            "the peer is node {}, not node {spied_id} that was dialled",
            other.id()
        )),
        "{err}"
    );
    swarm.shutdown().await;
}
