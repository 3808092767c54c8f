//! `neuroshard`: the headless runtime's command line. Parses arguments and calls the library;
//! each command's arguments and runner live in a module of its own.

mod bench;
mod credit;
mod generate;
mod node;
mod report;
mod serve;
mod train;

use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::{Context, bail};
use clap::{Args, Parser, Subcommand, ValueEnum};
use neuroshard_base::LayerRange;
use neuroshard_client::generate::{
    GenerateOptions, GenerationReport, LocalPipeline, generate_with,
};
use neuroshard_client::{ClientConfig, HopTiming, SwarmClient};
use neuroshard_discovery::LanConfig;
use neuroshard_discovery::tracker::{TrackerConfig, start_tracker};
use neuroshard_model::codec::WireDType;
use neuroshard_model::init::{ModelSpec, write_model};
use neuroshard_model::{
    ChatMessage, ChatTemplate, SamplingParams, StopStrings, TextStream, TextTokenizer,
};
use neuroshard_node::demo::{DemoOptions, run_demo};
use neuroshard_node::node::{NodeConfig, RelayServe, start_node};
use neuroshard_node::reach::{NatMode, ReachConfig};
use neuroshard_proto as pb;

/// What the runtime logs unless `RUST_LOG` says otherwise: the crates split out of the node
/// runtime, at `info`.
const DEFAULT_LOG: &str = "neuroshard_node=info,neuroshard_net=info,neuroshard_discovery=info,\
                           neuroshard_client=info,neuroshard_settings=info";

use bench::{BenchArgs, run_bench};
use credit::{PassArgs, RequesterArgs, issue_pass};
use generate::{GenerateArgs, print_hops, print_speed, run_generate};
use node::{NodeArgs, run_node};
use report::{ProofsArgs, print_proofs, print_status};
use serve::{ServeArgs, run_serve};
use train::{TrainArgs, print_demo, run_train};

#[derive(Parser)]
#[command(name = "neuroshard", version, about = "Run and use a NeuroShard swarm")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run a tracker: the bootstrap list of live nodes.
    Tracker {
        /// Address to listen on.
        #[arg(long, default_value = "0.0.0.0:7700")]
        listen: SocketAddr,
        /// Directory of the tracker's key, kept across restarts: nodes and clients pin the key
        /// its URL names. Default: a `tracker` folder in the user's data directory.
        #[arg(long)]
        data_dir: Option<PathBuf>,
    },
    /// Serve a layer range of a model.
    Node(NodeArgs),
    /// Run only a relay, for nodes nobody can dial (a node can also run one: `node
    /// --serve-relay`).
    Relay {
        /// Address to listen on.
        #[arg(long, default_value = "0.0.0.0:7701")]
        listen: SocketAddr,
        /// Cap on relayed bytes, both ways together, in KB/s (0: none).
        #[arg(long, default_value_t = 1000)]
        kbps: u32,
    },
    /// Generate text through the swarm, or locally with --local.
    Generate(GenerateArgs),
    /// Serve an OpenAI-compatible HTTP API (chat and completions, streaming) over the swarm,
    /// or over the whole model in this process with --local.
    Serve(ServeArgs),
    /// Write the built-in deterministic model (Hugging Face layout) to DIR.
    InitModel {
        /// Target directory.
        dir: PathBuf,
        /// Which built-in size.
        #[arg(long, value_enum, default_value_t = Size::Demo)]
        size: Size,
    },
    /// Start a tracker and nodes on this machine and generate through them.
    Demo {
        /// Nodes splitting the model's layers.
        #[arg(long, default_value_t = 3)]
        nodes: usize,
        /// Stop the middle node mid-generation to show failover.
        #[arg(long)]
        kill_one: bool,
        /// Prompt text.
        #[arg(long, default_value = neuroshard_model::init::DEMO_PROMPT)]
        prompt: String,
        /// Tokens (bytes, for the byte-level demo model) to generate.
        #[arg(long, default_value_t = 64)]
        max_new_tokens: usize,
        /// Use this model directory instead of the shipped trained demo model.
        #[arg(long)]
        model: Option<PathBuf>,
    },
    /// Train a model on this machine through the swarm's training path: pipeline stages ×
    /// DiLoCo replicas on loopback, on the embedded public-domain corpus.
    Train(TrainArgs),
    /// Show this install's node id, or make a new key with --regenerate (for a copied install).
    Identity {
        /// Data directory holding node.key.
        #[arg(long)]
        data_dir: Option<PathBuf>,
        /// Replace the key (the old file is kept as node.key.replaced-<ms>).
        #[arg(long)]
        regenerate: bool,
        /// Print the public key (hex) instead of the node id: what an issuer needs to make
        /// this key a credit pass.
        #[arg(long)]
        public_key: bool,
    },
    /// Issue a credit pass: vouch, as this install's key, that a requester key is a real
    /// requester, so nodes that trust this key count the receipts it countersigns as earned.
    Pass(PassArgs),
    /// Show the Proof of Neural Work receipts in a node's ledger.
    Proofs(ProofsArgs),
    /// Measure this machine: decode tokens/s over a model's layers at a short and a long
    /// context, on a node's compute threads, and a decode hop's overhead to a peer.
    Bench(BenchArgs),
    /// Print a node's metrics (via Ping) or a tracker's stats as JSON.
    Status {
        /// Node address host:port.
        #[arg(long, conflicts_with = "tracker")]
        node: Option<String>,
        /// Tracker URL.
        #[arg(long)]
        tracker: Option<String>,
    },
}

#[derive(Clone, Copy, ValueEnum)]
enum Size {
    Demo,
    /// The shape of the shipped trained demo model, freshly initialised.
    TrainedDemo,
    Bench,
    Tiny,
    /// SmolLM2-135M's shape (30 layers, vocabulary 49,152), random weights: 270 MB.
    Smol,
}

impl Size {
    fn spec(self) -> ModelSpec {
        match self {
            Size::Demo => ModelSpec::demo(),
            Size::TrainedDemo => ModelSpec::trained_demo(),
            Size::Bench => ModelSpec::bench(),
            Size::Tiny => ModelSpec::tiny(),
            Size::Smol => ModelSpec::smol(),
        }
    }
}

/// How a node or client finds the swarm.
#[derive(Args)]
struct SwarmArgs {
    /// Tracker URL, e.g. http://tracker-host:7700; without one (or while it does not answer)
    /// peers are found through the DHT, from --bootstrap peers or the LAN.
    #[arg(long)]
    tracker: Option<String>,
    /// A peer (host:port) to join the DHT through; repeat or separate with commas.
    #[arg(long, value_delimiter = ',')]
    bootstrap: Vec<String>,
    /// Neither announce nor look for peers on the LAN (mDNS).
    #[arg(long)]
    no_lan: bool,
}

impl SwarmArgs {
    /// LAN discovery unless --no-lan.
    fn lan(&self) -> Option<LanConfig> {
        (!self.no_lan).then(LanConfig::default)
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    init_logging();
    match Cli::parse().command {
        Command::Tracker { listen, data_dir } => run_tracker(listen, data_dir).await?,
        Command::Node(args) => run_node(args).await?,
        Command::Relay { listen, kbps } => run_relay(listen, kbps).await?,
        Command::Generate(args) => run_generate(args).await?,
        Command::Serve(args) => run_serve(args).await?,
        Command::Bench(args) => run_bench(args).await?,
        Command::InitModel { dir, size } => {
            write_model(&dir, &size.spec())?;
            println!("wrote model to {}", dir.display());
        }
        Command::Demo {
            nodes,
            kill_one,
            prompt,
            max_new_tokens,
            model,
        } => {
            let options = DemoOptions {
                nodes,
                kill_one,
                prompt,
                max_new_tokens,
                model_dir: model,
            };
            run_demo_command(options).await?;
        }
        Command::Status { node, tracker } => print_status(node, tracker).await?,
        Command::Identity {
            data_dir,
            regenerate,
            public_key,
        } => print_identity(data_dir, regenerate, public_key)?,
        Command::Pass(args) => issue_pass(args)?,
        Command::Proofs(args) => print_proofs(args)?,
        Command::Train(args) => run_train(args).await?,
    }
    Ok(())
}

/// Logs to stderr, filtered by `RUST_LOG` or else [`DEFAULT_LOG`].
fn init_logging() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| DEFAULT_LOG.into()),
        )
        .with_writer(std::io::stderr)
        .init();
}

/// A tracker's data directory: the one given, else a `tracker` folder in the user's data
/// directory.
fn tracker_dir(given: Option<PathBuf>) -> PathBuf {
    given.unwrap_or_else(|| neuroshard_node::identity::default_data_dir().join("tracker"))
}

/// `neuroshard tracker`: serves the tracker on `listen`, as the key kept in `data_dir`, until
/// Ctrl-C.
async fn run_tracker(listen: SocketAddr, data_dir: Option<PathBuf>) -> anyhow::Result<()> {
    let dir = tracker_dir(data_dir);
    let key = neuroshard_node::identity::load_or_create(&dir)?;
    let tracker = start_tracker(TrackerConfig {
        listen,
        key: Some(std::sync::Arc::new(key)),
        ..TrackerConfig::default()
    })
    .await?;
    eprintln!("tracker listening on {}", tracker.addr);
    // The URL to hand out names the key nodes and clients pin; bound to every interface, the
    // host is whatever name others reach this machine by.
    let host = match tracker.addr.ip().is_unspecified() {
        true => format!("HOST:{}", tracker.addr.port()),
        false => tracker.addr.to_string(),
    };
    eprintln!("tracker URL: http://{}@{host}", tracker.id);
    tokio::signal::ctrl_c().await?;
    tracker.shutdown().await;
    Ok(())
}

/// `neuroshard relay`: relays on `listen`, capped at `kbps`, until Ctrl-C.
async fn run_relay(listen: SocketAddr, kbps: u32) -> anyhow::Result<()> {
    let cancel = tokio_util::sync::CancellationToken::new();
    let config = neuroshard_nat::relay::RelayConfig {
        kbps,
        ..Default::default()
    };
    let relay = neuroshard_nat::relay::Relay::start(listen, config, cancel.clone()).await?;
    eprintln!("relay listening on {}", relay.addr());
    tokio::signal::ctrl_c().await?;
    cancel.cancel();
    Ok(())
}

/// `neuroshard demo`: runs the demo, prints its report, and fails when the swarm's tokens
/// differ from the local reference.
async fn run_demo_command(options: DemoOptions) -> anyhow::Result<()> {
    let report = run_demo(options, |line| eprintln!("{line}")).await?;
    print_demo(&report);
    if !report.matches_local() {
        bail!("the swarm's tokens differ from the local reference");
    }
    Ok(())
}

/// `neuroshard identity`: prints the install's node id (or its public key), making a new key
/// with `regenerate`.
fn print_identity(
    data_dir: Option<PathBuf>,
    regenerate: bool,
    public_key: bool,
) -> anyhow::Result<()> {
    let dir = data_dir.unwrap_or_else(neuroshard_node::identity::default_data_dir);
    let key = if regenerate {
        neuroshard_node::identity::regenerate(&dir)?
    } else {
        neuroshard_node::identity::load_or_create(&dir)?
    };
    match public_key {
        true => println!("{}", hex::encode(key.public().0)),
        false => println!("{}", key.id()),
    }
    Ok(())
}
