//! Shared set-up of NeuroShard's benchmarks: models on disk, nodes on loopback, raw requests.

use neuroshard_base::LayerRange;
use neuroshard_model::codec::{WireDType, encode};
use neuroshard_model::init::{ModelSpec, write_model};
use neuroshard_net::convert::{span_to_proto, tensor_to_proto};
use neuroshard_node::node::{NodeConfig, NodeHandle, start_node};
use neuroshard_node::swarm::LocalSwarm;
use neuroshard_proto as pb;

/// A model with hidden size 2048 and three thin layers: the benchmark serves the middle one, so a
/// call takes and returns hidden states of the decode-step width at little compute.
pub fn hop_model_spec() -> ModelSpec {
    ModelSpec {
        hidden: 2048,
        intermediate: 256,
        layers: 3,
        heads: 16,
        kv_heads: 4,
        max_positions: 1024,
        ..ModelSpec::demo()
    }
}

/// Writes `spec` into a temporary directory.
pub fn write_temp_model(spec: &ModelSpec) -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("temporary directory");
    write_model(dir.path(), spec).expect("model written");
    dir
}

/// A node config for `start..end` whose compute uses every core, as local generation on the
/// global thread pool does, so swarm and local figures compare like for like.
pub fn bench_config(dir: &std::path::Path, start: u32, end: u32) -> NodeConfig {
    let mut config = NodeConfig::new(dir, LayerRange::new(start, end).unwrap());
    config.cpu_threads = every_core();
    config
}

/// Compute threads on every core of this machine.
fn every_core() -> u16 {
    std::thread::available_parallelism().map_or(1, |n| u16::try_from(n.get()).unwrap_or(u16::MAX))
}

/// Starts an unlisted node serving `start..end` of the model in `dir`.
pub async fn start_bench_node(dir: &std::path::Path, start: u32, end: u32) -> NodeHandle {
    start_node(bench_config(dir, start, end))
        .await
        .expect("node starts")
}

/// A tracker and nodes serving `ranges` of the model in `dir`, on loopback, each computing on
/// every core ([`bench_config`]).
pub async fn start_bench_swarm(dir: &std::path::Path, ranges: &[(u32, u32)]) -> LocalSwarm {
    let mut swarm = LocalSwarm::tracker_only().await.expect("tracker starts");
    for &(start, end) in ranges {
        swarm
            .add_node_with(dir, start, end, |config| config.cpu_threads = every_core())
            .await
            .expect("node starts");
    }
    swarm
}

/// `n` values spread like activations: uniform noise in [-2, 2), which (like real hidden
/// states) lz4 cannot shrink, so the codec's probe keeps them raw.
pub fn activations(n: usize) -> Vec<f32> {
    use rand::{Rng, SeedableRng};
    let mut rng = rand::rngs::StdRng::seed_from_u64(42);
    (0..n).map(|_| rng.random_range(-2.0..2.0)).collect()
}

/// A Forward request carrying `tokens` fp16 hidden states of width `hidden` at `pos`.
pub fn hidden_request(
    session: &str,
    pos: u64,
    layers: LayerRange,
    tokens: usize,
    hidden: usize,
) -> pb::ForwardRequest {
    let values = activations(tokens * hidden);
    pb::ForwardRequest {
        session_id: session.into(),
        start_pos: pos,
        layers: Some(span_to_proto(layers)),
        input: Some(pb::forward_request::Input::Hidden(tensor_to_proto(encode(
            &values,
            &[1, tokens, hidden],
            WireDType::F16,
        )))),
        model_id: String::new(),
        reply_dtype: pb::Dtype::F16 as i32,
        ..Default::default()
    }
}

/// The wall time of `iters` Forward calls of `request` less the compute each reply reports:
/// what the transport costs (codec, protobuf, HTTP/2, the path).
pub async fn forward_overhead(
    client: &mut pb::node_client::NodeClient<tonic::transport::Channel>,
    request: &pb::ForwardRequest,
    iters: u64,
) -> std::time::Duration {
    let mut overhead = std::time::Duration::ZERO;
    for _ in 0..iters {
        let started = std::time::Instant::now();
        let reply = client
            .forward(request.clone())
            .await
            .expect("forward")
            .into_inner();
        overhead += started
            .elapsed()
            .saturating_sub(std::time::Duration::from_micros(reply.compute_us));
    }
    overhead
}

/// A home internet link as the home-link benchmark emulates it on loopback: each direction
/// delays every byte by `one_way` and carries at most `bits_per_s`, queueing what exceeds it.
#[derive(Debug, Clone, Copy)]
pub struct Link {
    /// Delay of each direction (half the round trip).
    pub one_way: std::time::Duration,
    /// Rate of each direction.
    pub bits_per_s: u64,
}

/// A loopback port whose connections [`serve_link`] carries over a [`Link`]: bound first, so a
/// node can advertise it before it starts.
pub async fn bind_link() -> (tokio::net::TcpListener, std::net::SocketAddr) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("loopback port");
    let addr = listener.local_addr().expect("bound address");
    (listener, addr)
}

/// Carries every connection made to `listener` to `target` over `link`, both ways, until the
/// runtime stops.
pub fn serve_link(listener: tokio::net::TcpListener, target: std::net::SocketAddr, link: Link) {
    tokio::spawn(async move {
        while let Ok((inbound, _)) = listener.accept().await {
            let Ok(outbound) = tokio::net::TcpStream::connect(target).await else {
                continue;
            };
            let _ = (inbound.set_nodelay(true), outbound.set_nodelay(true));
            let (from_client, to_client) = inbound.into_split();
            let (from_target, to_target) = outbound.into_split();
            tokio::spawn(carry(from_client, to_target, link));
            tokio::spawn(carry(from_target, to_client, link));
        }
    });
}

/// One direction of a link: each chunk read leaves when the line has sent what came before it
/// at the link's rate, and arrives the link's delay later.
async fn carry(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    link: Link,
) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::time::Instant;
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<(Instant, Vec<u8>)>();
    let writer = tokio::spawn(async move {
        while let Some((at, bytes)) = rx.recv().await {
            tokio::time::sleep_until(at).await;
            if to.write_all(&bytes).await.is_err() {
                break;
            }
        }
    });
    let mut line_free = Instant::now();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        let serialise = std::time::Duration::from_secs_f64(n as f64 * 8.0 / link.bits_per_s as f64);
        line_free = line_free.max(Instant::now()) + serialise;
        if tx
            .send((line_free + link.one_way, buf[..n].to_vec()))
            .is_err()
        {
            break;
        }
    }
    drop(tx);
    let _ = writer.await;
}

/// A tracker and nodes serving `ranges` of the model in `dir`, each computing on every core and
/// reached only through its own [`Link`].
pub async fn start_linked_swarm(
    dir: &std::path::Path,
    ranges: &[(u32, u32)],
    link: Link,
) -> LocalSwarm {
    let mut swarm = LocalSwarm::tracker_only().await.expect("tracker starts");
    for &(start, end) in ranges {
        let (listener, addr) = bind_link().await;
        let node = swarm
            .add_node_with(dir, start, end, |config| {
                config.cpu_threads = every_core();
                config.advertise = Some(addr.to_string());
            })
            .await
            .expect("node starts");
        serve_link(listener, node.addr(), link);
    }
    swarm
}
