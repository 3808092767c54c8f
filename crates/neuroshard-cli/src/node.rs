//! `neuroshard node`: one node serving a layer range.

use super::*;
use neuroshard_node::node::NodeHandle;
use neuroshard_settings::ComputeDevice;

#[derive(Args)]
pub(crate) struct NodeArgs {
    /// Hugging Face model directory; with --weights-from it may start empty (the model's files
    /// come from the peer) and keeps the fetched weights for the next start.
    #[arg(long)]
    model: PathBuf,
    /// Layers to serve, as A..B.
    #[arg(long)]
    layers: LayerRange,
    /// Fetch the layers' weights from this peer (host:port) serving them when --model does not
    /// hold them; the transfer's progress is logged.
    #[arg(long)]
    weights_from: Option<String>,
    #[command(flatten)]
    swarm: SwarmArgs,
    /// The name this node shows the swarm (anonymous without one).
    #[arg(long)]
    name: Option<String>,
    /// An issuer (node id) whose credit passes this node trusts: receipts countersigned by it
    /// or by holders of its passes count as earned; repeat for several. The tracker named by
    /// key in --tracker (http://ID@host:port) is trusted too.
    #[arg(long = "credit-issuer")]
    credit_issuers: Vec<neuroshard_base::NodeId>,
    /// Port to listen on (0 picks one).
    #[arg(long, default_value_t = 0)]
    port: u16,
    /// Interface to listen on.
    #[arg(long, default_value = "0.0.0.0")]
    host: String,
    /// host:port other machines should dial (defaults to the listen address).
    #[arg(long)]
    advertise: Option<String>,
    /// How to become reachable from behind a router: auto tries the address as it is, then
    /// UPnP, then STUN, then a relay, each proved by a peer dialing back.
    #[arg(long, default_value = "auto", value_parser = clap::value_parser!(NatMode))]
    nat: NatMode,
    /// A STUN server (ip:port) to ask; repeat for more (default: the peers, which answer
    /// STUN on their own ports).
    #[arg(long = "stun-server")]
    stun_servers: Vec<SocketAddr>,
    /// The relay (host:port) to use when nothing else works (default: one a peer offers).
    #[arg(long)]
    relay_via: Option<String>,
    /// Run a relay for nodes nobody can dial, on this port (0 picks one).
    #[arg(long)]
    serve_relay: Option<u16>,
    /// Cap on relayed bytes, both ways together, in KB/s (0: none).
    #[arg(long, default_value_t = 1000)]
    relay_kbps: u32,
    /// KV cache budget in MiB.
    #[arg(long, default_value_t = 1024)]
    kv_budget_mib: u64,
    /// Days the ledger keeps each settled receipt's row before rolling it into daily totals
    /// (0: keep every row; otherwise at least 8).
    #[arg(long, default_value_t = 90)]
    ledger_retention_days: u32,
    /// CPU threads for compute (0: every core but one).
    #[arg(long, default_value_t = 0)]
    cpu_threads: u16,
    /// Decode steps of concurrent sessions run in one pass at most (1: each alone).
    #[arg(long, default_value_t = 16)]
    max_batch: usize,
    /// How long a batch waits at most for as many decode steps as the last batch took, ms (at
    /// most 100; 0: a batch is what arrived while the one before it computed). A lone
    /// session's step never waits.
    #[arg(long, default_value_t = 5)]
    batch_window_ms: u64,
    /// How the shard holds its projection weights: f32, bf16 or f16 (half the memory), or
    /// int8 (a little over a quarter, an f32 scale per 32 weights); default the settings' or
    /// f32. On the CPU the held weights are multiplied as they are read, so a decode step also
    /// takes less time (about 0.7x f32's, measured).
    #[arg(long)]
    precision: Option<neuroshard_model::Precision>,
    /// Where compute runs; without it, burn's default (`BURN_DEVICE`, else the GPU where this
    /// build has one, else the CPU).
    #[arg(long, value_enum)]
    device: Option<Device>,
    /// Where the node keeps its key and receipt ledger (default: $NEUROSHARD_HOME or
    /// ~/.local/share/neuroshard).
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// The owner's settings.json, as the desktop app writes it: bandwidth caps, the transfer
    /// cap, compute share and threads, the weekly schedule and the display name apply from the
    /// start and again whenever the file changes. Flags given here win over its network
    /// section and name.
    #[arg(long)]
    settings: Option<PathBuf>,
}

pub(crate) async fn run_node(args: NodeArgs) -> anyhow::Result<()> {
    let mut config = NodeConfig::new(&args.model, args.layers);
    config.listen = listen_addr(&args.host, args.port)?;
    config.advertise = args.advertise;
    config.weights_from = args.weights_from;
    config.reach = ReachConfig {
        mode: args.nat,
        stun_servers: args.stun_servers,
        relay: args.relay_via,
        ..ReachConfig::default()
    };
    config.serve_relay = args
        .serve_relay
        .map(|port| relay_serve(config.listen, port, args.relay_kbps));
    config.discovery.lan = args.swarm.lan();
    config.tracker = args.swarm.tracker;
    config.bootstrap = args.swarm.bootstrap;
    config.display_name = args.name;
    config.credit_issuers = args.credit_issuers;
    config.kv_budget_bytes = args.kv_budget_mib * 1024 * 1024;
    config.ledger_retention_days = args.ledger_retention_days;
    config.cpu_threads = args.cpu_threads;
    config.batching.max_batch = args.max_batch;
    config.batching.window = std::time::Duration::from_millis(args.batch_window_ms);
    config.device = args.device.map(Device::compute_device);
    let data_dir = args
        .data_dir
        .unwrap_or_else(neuroshard_node::identity::default_data_dir);
    config.data_dir = Some(data_dir.clone());
    if let Some(path) = &args.settings {
        let settings = neuroshard_node::owner::read_settings(path)
            .with_context(|| format!("--settings {}", path.display()))?;
        config.follow_settings(&settings);
    }
    if let Some(precision) = args.precision {
        config.precision = precision;
    }
    eprintln!(
        "loading layers {} of {}...",
        args.layers,
        args.model.display()
    );
    let node = start_node(config).await?;
    announce_started(&node)?;
    serve_until_ctrl_c(node, args.settings, data_dir).await
}

/// The address to listen on, from `--host` and `--port`.
fn listen_addr(host: &str, port: u16) -> anyhow::Result<SocketAddr> {
    format!("{host}:{port}")
        .parse()
        .with_context(|| format!("--host {host} --port {port} is not a socket address"))
}

/// `--serve-relay PORT`: a relay on the node's listen interface, capped at `kbps`.
fn relay_serve(listen: SocketAddr, port: u16, kbps: u32) -> RelayServe {
    RelayServe {
        listen: SocketAddr::new(listen.ip(), port),
        config: neuroshard_nat::relay::RelayConfig {
            kbps,
            ..Default::default()
        },
    }
}

/// Tells the owner (on stderr) what the started node serves, any relay it runs, and how
/// peers reach it.
fn announce_started(node: &NodeHandle) -> anyhow::Result<()> {
    eprintln!(
        "node {} serving layers {} of model {} at {} on the {}",
        node.id().short(),
        node.layers(),
        node.model_id(),
        node.advertised(),
        if node.on_gpu() { "GPU" } else { "CPU" }
    );
    if let Some(relay) = node.relay() {
        eprintln!("relaying for others on port {}", relay.addr().port());
    }
    let reach = node.reachability().borrow().clone();
    eprintln!("reachability {}", serde_json::to_string(&reach)?);
    Ok(())
}

/// Serves until Ctrl-C, following the owner's settings file when one was given; then stops
/// the node.
async fn serve_until_ctrl_c(
    node: NodeHandle,
    settings: Option<PathBuf>,
    data_dir: PathBuf,
) -> anyhow::Result<()> {
    let node = std::sync::Arc::new(node);
    let owner = tokio_util::sync::CancellationToken::new();
    let follow = settings.map(|path| {
        eprintln!("following the settings in {}", path.display());
        tokio::spawn(neuroshard_node::owner::follow_settings_file(
            node.clone(),
            path,
            data_dir,
            Box::new(neuroshard_node::sensors::SystemSensors::new()),
            neuroshard_node::owner::HEADLESS_TICK,
            owner.clone(),
        ))
    });
    tokio::signal::ctrl_c().await?;
    owner.cancel();
    if let Some(follow) = follow {
        let _ = follow.await;
    }
    if let Ok(node) = std::sync::Arc::try_unwrap(node) {
        node.shutdown().await;
    }
    Ok(())
}

/// `--device`: the settings' [`ComputeDevice`], as the command line names it.
#[derive(Clone, Copy, ValueEnum)]
pub(crate) enum Device {
    /// The GPU through wgpu, where one is found.
    Gpu,
    /// The CPU backend.
    Cpu,
}

impl Device {
    /// The settings' name for this device.
    fn compute_device(self) -> ComputeDevice {
        match self {
            Device::Gpu => ComputeDevice::Gpu,
            Device::Cpu => ComputeDevice::Cpu,
        }
    }
}
