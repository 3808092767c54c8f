//! Helpers for NeuroShard's loopback tests: a model on disk, a tracker and nodes on ephemeral
//! ports, and raw gRPC clients.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::time::Duration;

use neuroshard_model::init::{ModelSpec, write_model};
use neuroshard_node::node::NodeHandle;
use neuroshard_proto::node_client::NodeClient;
use tonic::transport::Channel;

/// The longest any wait in the tests may take: a wait that never ends fails its test, naming
/// what it waited for, instead of hanging CI.
pub const WAIT: Duration = Duration::from_secs(60);

/// Awaits `wait`, failing the test (naming `what`) if it takes longer than [`WAIT`].
pub async fn within<F: Future>(what: &str, wait: F) -> F::Output {
    tokio::time::timeout(WAIT, wait)
        .await
        .unwrap_or_else(|_| panic!("waited {WAIT:?} for {what}"))
}

/// A model written to a temporary directory.
pub struct TestModel {
    dir: tempfile::TempDir,
}

impl TestModel {
    /// Writes `spec` to a fresh temporary directory.
    pub fn new(spec: &ModelSpec) -> Self {
        let dir = tempfile::tempdir().expect("temporary directory");
        write_model(dir.path(), spec).expect("model written");
        Self { dir }
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// The directory, owned.
    pub fn path_buf(&self) -> PathBuf {
        self.dir.path().to_path_buf()
    }
}

/// The loopback swarm every test starts: a tracker and nodes on ephemeral ports.
pub use neuroshard_node::swarm::LocalSwarm as Swarm;

/// A channel to the node or tracker at `addr` (`host:port` or a relayed address), secured as
/// every NeuroShard client's is, proving this process's throwaway key.
pub async fn channel(addr: &str) -> Channel {
    let dialler = neuroshard_net::tls::Dialler::ephemeral().expect("a certificate");
    connect_as(addr, &dialler).await
}

/// A channel to `addr` proving `key`: a caller other than the test's usual one.
pub async fn channel_as(addr: &str, key: &neuroshard_base::NodeKey) -> Channel {
    let dialler = neuroshard_net::tls::Dialler::new(key).expect("a certificate");
    connect_as(addr, &dialler).await
}

async fn connect_as(addr: &str, dialler: &neuroshard_net::tls::Dialler) -> Channel {
    let to = neuroshard_net::pool::Target::any(addr);
    neuroshard_net::pool::connect(&to, dialler, Duration::from_secs(5))
        .await
        .expect("connects")
}

/// A channel to the node or tracker at `addr` (`host:port`) proving `key`, its connection
/// made from the local address `source` (on loopback, any of 127.0.0.0/8): a caller at
/// another address than the test's own. The handshake's failure is returned, for callers the
/// server refuses.
pub async fn channel_from(
    source: std::net::IpAddr,
    addr: &str,
    key: &neuroshard_base::NodeKey,
) -> Result<Channel, tonic::transport::Error> {
    let dialler = neuroshard_net::tls::Dialler::new(key).expect("a certificate");
    let target: std::net::SocketAddr = addr.parse().expect("an ip:port");
    let connector = tower::service_fn(move |_: tonic::transport::Uri| {
        let dialler = dialler.clone();
        async move {
            let socket = tokio::net::TcpSocket::new_v4()?;
            socket.bind((source, 0).into())?;
            let tcp = socket.connect(target).await?;
            let (secured, _) = dialler
                .connect(tcp, &neuroshard_net::tls::Pin::to(None))
                .await
                .map_err(std::io::Error::other)?;
            Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(secured))
        }
    });
    tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .expect("a valid address")
        .connect_with_connector(connector)
        .await
}

/// A raw gRPC client to a node.
pub async fn node_client(node: &NodeHandle) -> NodeClient<Channel> {
    raw_client(channel(&node.advertised()).await)
}

/// A raw gRPC client to a node, calling as `key`.
pub async fn node_client_as(
    node: &NodeHandle,
    key: &neuroshard_base::NodeKey,
) -> NodeClient<Channel> {
    raw_client(channel_as(&node.advertised(), key).await)
}

fn raw_client(channel: Channel) -> NodeClient<Channel> {
    NodeClient::new(channel)
        .max_decoding_message_size(neuroshard_net::MAX_MESSAGE_BYTES)
        .max_encoding_message_size(512 * 1024 * 1024)
}

/// A registration of `info` signed by `key` now; `info` gets the key's id and public key.
pub fn signed_register(
    key: &neuroshard_base::NodeKey,
    mut info: neuroshard_proto::PeerInfo,
) -> neuroshard_proto::RegisterRequest {
    info.node_id = key.id().to_string();
    info.public_key = key.public().0.to_vec();
    let record = neuroshard_net::convert::peer_from_proto(info.clone()).expect("valid peer");
    let timestamp_ms = neuroshard_net::now_ms();
    let message = neuroshard_discovery::tracker::announcement("register", &record, timestamp_ms);
    neuroshard_proto::RegisterRequest {
        node: Some(info),
        timestamp_ms,
        signature: key.sign(&message).to_vec(),
    }
}

/// A heartbeat of the node `info` describes (registered by [`signed_register`]), signed now.
pub fn signed_heartbeat(
    key: &neuroshard_base::NodeKey,
    info: &neuroshard_proto::PeerInfo,
    load: f32,
) -> neuroshard_proto::HeartbeatRequest {
    let mut info = info.clone();
    info.node_id = key.id().to_string();
    info.public_key = key.public().0.to_vec();
    info.load = load;
    let record = neuroshard_net::convert::peer_from_proto(info.clone()).expect("valid peer");
    let timestamp_ms = neuroshard_net::now_ms();
    let message = neuroshard_discovery::tracker::announcement("heartbeat", &record, timestamp_ms);
    neuroshard_proto::HeartbeatRequest {
        node_id: info.node_id,
        layers: info.layers,
        load,
        timestamp_ms,
        signature: key.sign(&message).to_vec(),
    }
}
