//! `neuroshard`: the headless runtime's command line. Parses arguments and calls the library.

use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::{Context, bail};
use clap::{Args, Parser, Subcommand, ValueEnum};
use neuroshard_base::LayerRange;
use neuroshard_model::codec::WireDType;
use neuroshard_model::init::{ModelSpec, write_model};
use neuroshard_model::{
    ChatMessage, ChatTemplate, SamplingParams, StopStrings, TextStream, TextTokenizer,
};
use neuroshard_node::client::{ClientConfig, HopTiming, SwarmClient};
use neuroshard_node::demo::{DemoOptions, run_demo};
use neuroshard_node::discovery::LanConfig;
use neuroshard_node::generate::{GenerateOptions, GenerationReport, LocalPipeline, generate_with};
use neuroshard_node::node::{NodeConfig, RelayServe, start_node};
use neuroshard_node::reach::{NatMode, ReachConfig};
use neuroshard_node::tracker::{TrackerConfig, start_tracker};
use neuroshard_proto as pb;

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
    },
    /// Show the Proof of Neural Work receipts in a node's ledger.
    Proofs(ProofsArgs),
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

#[derive(Args)]
struct TrainArgs {
    /// Pipeline stages the layers are split into.
    #[arg(long, default_value_t = 2)]
    stages: u32,
    /// Replicas of every stage (DiLoCo).
    #[arg(long, default_value_t = 2)]
    replicas: usize,
    /// Inner steps each replica takes.
    #[arg(long, default_value_t = 100)]
    steps: usize,
    /// Microbatches per inner step.
    #[arg(long, default_value_t = 4)]
    batch: usize,
    /// Tokens per microbatch.
    #[arg(long, default_value_t = 64)]
    sequence: usize,
    /// Inner steps per outer round (DiLoCo's H).
    #[arg(long, default_value_t = 20)]
    outer_every: u64,
    /// Share of pseudo-gradient coordinates sent (top-k with error feedback); 0 sends them
    /// all as f32 (DiLoCo without compression).
    #[arg(long, default_value_t = 0.1)]
    topk: f64,
    /// AdamW learning rate at its peak.
    #[arg(long, default_value_t = 3e-3)]
    lr: f64,
    /// Inner steps of linear learning-rate warm-up.
    #[arg(long, default_value_t = 0)]
    warmup: u64,
    /// Keep the learning rate at its peak instead of letting it fall along a cosine to a
    /// tenth by the last step.
    #[arg(long)]
    constant_lr: bool,
    /// DiLoCo's outer learning rate.
    #[arg(long, default_value_t = 0.7)]
    outer_lr: f32,
    /// DiLoCo's outer Nesterov momentum.
    #[arg(long, default_value_t = 0.9)]
    outer_momentum: f32,
    /// Seed of the built-in model and of the data order.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Train this model directory instead of a fresh built-in one.
    #[arg(long, conflicts_with = "size")]
    model: Option<PathBuf>,
    /// Size of the fresh built-in model.
    #[arg(long, value_enum, default_value_t = Size::Tiny)]
    size: Size,
    /// Write the trained model here (Hugging Face layout, bf16 safetensors).
    #[arg(long)]
    save: Option<PathBuf>,
    /// Print the report as JSON.
    #[arg(long)]
    json: bool,
}

#[derive(Clone, Copy, ValueEnum)]
enum Size {
    Demo,
    /// The shape of the shipped trained demo model, freshly initialised.
    TrainedDemo,
    Bench,
    Tiny,
}

impl Size {
    fn spec(self) -> ModelSpec {
        match self {
            Size::Demo => ModelSpec::demo(),
            Size::TrainedDemo => ModelSpec::trained_demo(),
            Size::Bench => ModelSpec::bench(),
            Size::Tiny => ModelSpec::tiny(),
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

#[derive(Args)]
struct ServeArgs {
    #[command(flatten)]
    swarm: SwarmArgs,
    /// Hugging Face model directory to serve (its tokenizer, chat template and model id); repeat
    /// for several models. Clients name a model by its directory's name.
    #[arg(long, required = true)]
    model: Vec<PathBuf>,
    /// Compute in this process instead of through a swarm.
    #[arg(long)]
    local: bool,
    /// Address to listen on. Beyond loopback an API key is required.
    #[arg(long, default_value = "127.0.0.1:8000")]
    listen: SocketAddr,
    /// Bearer key clients must send (also read from NEUROSHARD_API_KEY).
    #[arg(long, env = "NEUROSHARD_API_KEY", hide_env_values = true)]
    api_key: Option<String>,
    /// An origin browsers may call from (CORS); repeat for several. Off by default.
    #[arg(long)]
    cors_origin: Vec<String>,
    /// Dtype of hidden states on the wire: f32, f16 or bf16.
    #[arg(long, default_value = "f16")]
    wire_dtype: String,
}

#[derive(Args)]
struct NodeArgs {
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
    /// CPU threads for compute (0: every core but one).
    #[arg(long, default_value_t = 0)]
    cpu_threads: u16,
    /// Where compute runs; without it, burn's default (`BURN_DEVICE`, else the GPU where this
    /// build has one, else the CPU).
    #[arg(long, value_enum)]
    device: Option<neuroshard_node::settings::ComputeDevice>,
    /// Where the node keeps its key and receipt ledger (default: $NEUROSHARD_HOME or
    /// ~/.local/share/neuroshard).
    #[arg(long)]
    data_dir: Option<PathBuf>,
}

#[derive(Args)]
struct ProofsArgs {
    /// Data directory holding ledger.sqlite.
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Print totals, counts and the listed receipts as JSON.
    #[arg(long)]
    json: bool,
    /// Write every receipt to FILE: CSV, or JSON when FILE ends in .json.
    #[arg(long)]
    export: Option<PathBuf>,
    /// List only receipts of this status: pending, verified or voided.
    #[arg(long)]
    status: Option<String>,
    /// Receipts to list, newest first.
    #[arg(long, default_value_t = 20)]
    limit: u32,
    /// Receipts to skip before listing.
    #[arg(long, default_value_t = 0)]
    offset: u64,
}

#[derive(Args)]
struct GenerateArgs {
    #[command(flatten)]
    swarm: SwarmArgs,
    /// Model directory: required with --local; otherwise used for its tokenizer and model id.
    #[arg(long)]
    model: Option<PathBuf>,
    /// Run the whole model in this process (the reference).
    #[arg(long, requires = "model")]
    local: bool,
    /// Prompt text, tokenized as the model's tokenizer does (with the BOS it adds).
    #[arg(long, conflicts_with_all = ["prompt_ids", "chat"], required_unless_present_any = ["prompt_ids", "chat"])]
    prompt: Option<String>,
    /// Prompt as comma-separated token ids.
    #[arg(long, value_delimiter = ',', conflicts_with = "chat")]
    prompt_ids: Option<Vec<u32>>,
    /// A user message, put through the model's chat template (needs --model).
    #[arg(long, requires = "model")]
    chat: Option<String>,
    /// A system message before --chat.
    #[arg(long, requires = "chat")]
    system: Option<String>,
    /// Tokens to generate.
    #[arg(long, default_value_t = 32)]
    max_new_tokens: usize,
    /// Sampling temperature; 0 (the default) is greedy.
    #[arg(long, default_value_t = 0.0)]
    temperature: f32,
    /// Sample among the k most likely tokens only (0: all).
    #[arg(long, default_value_t = 0)]
    top_k: usize,
    /// Sample among the most likely tokens whose probability reaches p (1: all).
    #[arg(long, default_value_t = 1.0)]
    top_p: f32,
    /// Drop tokens less likely than this fraction of the most likely one (0: none).
    #[arg(long, default_value_t = 0.0)]
    min_p: f32,
    /// Penalty for tokens already in the text (1: none).
    #[arg(long, default_value_t = 1.0)]
    repetition_penalty: f32,
    /// Seed of the sampling draws: the same seed gives the same text.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Text that ends the generation (not printed); may be given more than once.
    #[arg(long)]
    stop: Vec<String>,
    /// Print JSON: generated ids and each step's top-5 logits.
    #[arg(long)]
    json: bool,
    /// Dtype of hidden states on the wire: f32, f16 or bf16.
    #[arg(long, default_value = "f16")]
    wire_dtype: String,
    /// Re-execute a sample of hops with the weights in --model (spot checks).
    #[arg(long, requires = "model")]
    spot_check: bool,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "neuroshard_node=info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    match Cli::parse().command {
        Command::Tracker { listen } => {
            let tracker = start_tracker(TrackerConfig {
                listen,
                ..TrackerConfig::default()
            })
            .await?;
            eprintln!("tracker listening on {}", tracker.addr);
            tokio::signal::ctrl_c().await?;
            tracker.shutdown().await;
        }
        Command::Node(args) => run_node(args).await?,
        Command::Relay { listen, kbps } => {
            let cancel = tokio_util::sync::CancellationToken::new();
            let config = neuroshard_nat::relay::RelayConfig {
                kbps,
                ..Default::default()
            };
            let relay = neuroshard_nat::relay::Relay::start(listen, config, cancel.clone()).await?;
            eprintln!("relay listening on {}", relay.addr());
            tokio::signal::ctrl_c().await?;
            cancel.cancel();
        }
        Command::Generate(args) => run_generate(args).await?,
        Command::Serve(args) => run_serve(args).await?,
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
            let report = run_demo(options, |line| eprintln!("{line}")).await?;
            print_demo(&report);
            if !report.matches_local() {
                bail!("the swarm's tokens differ from the local reference");
            }
        }
        Command::Status { node, tracker } => print_status(node, tracker).await?,
        Command::Identity {
            data_dir,
            regenerate,
        } => {
            let dir = data_dir.unwrap_or_else(neuroshard_node::identity::default_data_dir);
            let key = if regenerate {
                neuroshard_node::identity::regenerate(&dir)?
            } else {
                neuroshard_node::identity::load_or_create(&dir)?
            };
            println!("{}", key.id());
        }
        Command::Proofs(args) => print_proofs(args)?,
        Command::Train(args) => run_train(args).await?,
    }
    Ok(())
}

async fn run_node(args: NodeArgs) -> anyhow::Result<()> {
    let mut config = NodeConfig::new(&args.model, args.layers);
    config.listen = format!("{}:{}", args.host, args.port)
        .parse()
        .with_context(|| {
            format!(
                "--host {} --port {} is not a socket address",
                args.host, args.port
            )
        })?;
    config.advertise = args.advertise;
    config.weights_from = args.weights_from;
    config.reach = ReachConfig {
        mode: args.nat,
        stun_servers: args.stun_servers,
        relay: args.relay_via,
        ..ReachConfig::default()
    };
    config.serve_relay = args.serve_relay.map(|port| RelayServe {
        listen: SocketAddr::new(config.listen.ip(), port),
        config: neuroshard_nat::relay::RelayConfig {
            kbps: args.relay_kbps,
            ..Default::default()
        },
    });
    config.discovery.lan = args.swarm.lan();
    config.tracker = args.swarm.tracker;
    config.bootstrap = args.swarm.bootstrap;
    config.display_name = args.name;
    config.kv_budget_bytes = args.kv_budget_mib * 1024 * 1024;
    config.cpu_threads = args.cpu_threads;
    config.device = args.device;
    config.data_dir = Some(
        args.data_dir
            .unwrap_or_else(neuroshard_node::identity::default_data_dir),
    );
    eprintln!(
        "loading layers {} of {}...",
        args.layers,
        args.model.display()
    );
    let node = start_node(config).await?;
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
    tokio::signal::ctrl_c().await?;
    node.shutdown().await;
    Ok(())
}

async fn run_generate(args: GenerateArgs) -> anyhow::Result<()> {
    let tokenizer = match &args.model {
        Some(dir) => TextTokenizer::for_model_dir(dir)?,
        None => TextTokenizer::Bytes,
    };
    let info = args
        .model
        .as_deref()
        .map(neuroshard_model::ModelInfo::read)
        .transpose()?;
    let bos = info.as_ref().and_then(|i| i.config.bos_token_id);
    let prompt = match (&args.prompt_ids, &args.prompt, &args.chat) {
        (Some(ids), _, _) => ids.clone(),
        (None, Some(text), _) => tokenizer.encode_prompt(text, bos)?,
        (None, None, Some(message)) => {
            let dir = args.model.as_deref().context("--chat needs --model")?;
            let template = ChatTemplate::for_model_dir(dir)?.with_context(|| {
                format!(
                    "{} has no chat template (chat_template.jinja or tokenizer_config.json)",
                    dir.display()
                )
            })?;
            let mut messages: Vec<ChatMessage> = args
                .system
                .iter()
                .map(|s| ChatMessage::new("system", s))
                .collect();
            messages.push(ChatMessage::new("user", message));
            let text = template.render(&messages, true, &Default::default())?;
            tokenizer.encode_rendered(&text)?
        }
        (None, None, None) => bail!("give --prompt, --prompt-ids or --chat"),
    };
    let options = GenerateOptions {
        max_new_tokens: args.max_new_tokens,
        stop_ids: info
            .as_ref()
            .map(|i| i.config.eos_token_ids.clone())
            .unwrap_or_default(),
        sampling: SamplingParams {
            temperature: args.temperature,
            top_k: args.top_k,
            top_p: args.top_p,
            min_p: args.min_p,
            repetition_penalty: args.repetition_penalty,
            seed: args.seed,
        },
    };
    options.sampling.validate()?;
    // Text is printed as it arrives; --json prints only the report at the end.
    let mut printer = Printer::new(&tokenizer, &args.stop, !args.json);
    let (mut report, hops) = if args.local {
        let dir = args.model.as_ref().context("--local needs --model")?;
        let mut local = LocalPipeline::load(dir)?;
        let report = generate_with(&mut local, &prompt, &options, |_, steps| {
            printer.step(steps)
        })
        .await?;
        (report, Vec::new())
    } else {
        let mut config = ClientConfig::with_bootstrap(args.swarm.bootstrap.clone());
        config.tracker = args.swarm.tracker.clone();
        config.discovery.lan = args.swarm.lan();
        config.model_id = info.as_ref().map(|i| i.id.clone());
        config.wire_dtype = WireDType::parse(&args.wire_dtype)?;
        if args.spot_check {
            config.verify_with = args.model.clone();
        }
        let client = SwarmClient::connect(config).await?;
        let mut session = client.session();
        let report = generate_with(&mut session, &prompt, &options, |_, steps| {
            printer.step(steps)
        })
        .await?;
        let hops = session.timings();
        for event in session.events() {
            eprintln!("\nfailover: {event}");
        }
        session.close().await;
        let receipts = client.flush_receipts().await;
        if !args.json {
            eprintln!(
                "\nreceipts: {} countersigned and stored by their workers, {} refused, {} undelivered",
                receipts.stored,
                receipts.rejected.len(),
                receipts.undelivered
            );
        }
        (report, hops)
    };
    printer.finish(&mut report)?;
    if args.json {
        let json = serde_json::json!({
            "prompt_ids": report.prompt_ids,
            "generated_ids": report.generated_ids,
            "finish_reason": report.finish,
            "text": printer.text,
            "steps": report.steps.iter().map(|s| serde_json::json!({
                "token": s.token,
                "top5": s.top5.iter().map(|(id, logit)| serde_json::json!({"id": id, "logit": logit})).collect::<Vec<_>>(),
            })).collect::<Vec<_>>(),
            "prefill_ms": report.prefill_ms,
            "decode_tokens_per_s": report.decode_tokens_per_s,
            "hops": hops,
        });
        println!("{}", serde_json::to_string_pretty(&json)?);
    } else {
        print_speed(&report);
        print_hops(&hops);
    }
    Ok(())
}

async fn run_serve(args: ServeArgs) -> anyhow::Result<()> {
    use neuroshard_api::{ApiConfig, Backend, ServedModel, start_api};
    let config = ApiConfig {
        listen: args.listen,
        api_key: args.api_key.clone(),
        cors_origins: args.cors_origin.clone(),
        ..ApiConfig::default()
    };
    config.validate().map_err(|e| anyhow::anyhow!(e))?;
    let backend = if args.local {
        Backend::Local
    } else {
        let mut client = ClientConfig::with_bootstrap(args.swarm.bootstrap.clone());
        client.tracker = args.swarm.tracker.clone();
        client.discovery.lan = args.swarm.lan();
        client.wire_dtype = WireDType::parse(&args.wire_dtype)?;
        Backend::Swarm(Box::new(client))
    };
    let mut models = Vec::new();
    for dir in &args.model {
        eprintln!("loading {}...", dir.display());
        let model = ServedModel::load(dir, &backend)
            .await
            .map_err(|e| anyhow::anyhow!("{}: {}", dir.display(), e.message))?;
        models.push(model);
    }
    let names: Vec<String> = models.iter().map(|m| m.name.clone()).collect();
    let server = start_api(config, models)
        .await
        .map_err(|e| anyhow::anyhow!(e.message))?;
    eprintln!(
        "serving {} at http://{}/v1 (OpenAI-compatible)",
        names.join(", "),
        server.addr
    );
    tokio::signal::ctrl_c().await?;
    server.shutdown().await;
    Ok(())
}

/// Prints generated text as tokens arrive (whole characters only) and ends the generation at
/// a stop string, which is not printed.
struct Printer<'a> {
    stream: TextStream<'a>,
    stops: StopStrings,
    /// Everything shown (or, with --json, that would have been).
    text: String,
    show: bool,
    stopped: bool,
    error: Option<neuroshard_model::ModelError>,
}

impl<'a> Printer<'a> {
    fn new(tokenizer: &'a TextTokenizer, stops: &[String], show: bool) -> Self {
        Self {
            stream: TextStream::new(tokenizer),
            stops: StopStrings::new(stops),
            text: String::new(),
            show,
            stopped: false,
            error: None,
        }
    }

    /// Takes the newest step; returns whether generation goes on.
    fn step(&mut self, steps: &[neuroshard_node::generate::StepReport]) -> bool {
        let Some(step) = steps.last() else {
            return true;
        };
        match self.stream.push(step.token) {
            Ok(text) => self.show(&text),
            Err(e) => {
                self.error = Some(e);
                false
            }
        }
    }

    fn show(&mut self, text: &str) -> bool {
        let (shown, stop) = self.stops.push(text);
        self.text.push_str(&shown);
        if self.show {
            use std::io::Write;
            print!("{shown}");
            let _ = std::io::stdout().flush();
        }
        self.stopped |= stop;
        !stop
    }

    /// Prints what was held back and marks a stop-string ending in `report`.
    fn finish(&mut self, report: &mut GenerationReport) -> anyhow::Result<()> {
        if let Some(e) = self.error.take() {
            return Err(e.into());
        }
        if !self.stopped {
            let tail = self.stream.finish()?;
            self.show(&tail);
            let rest = self.stops.finish();
            self.text.push_str(&rest);
            if self.show {
                print!("{rest}");
            }
        }
        if self.stopped {
            report.finish = neuroshard_node::generate::Finish::Stop;
        }
        if self.show {
            println!();
        }
        Ok(())
    }
}

fn print_speed(report: &GenerationReport) {
    println!(
        "prefill {:.1} ms for {} tokens; decode {:.1} tokens/s",
        report.prefill_ms,
        report.prompt_ids.len(),
        report.decode_tokens_per_s
    );
}

fn print_hops(hops: &[HopTiming]) {
    if hops.is_empty() {
        return;
    }
    println!(
        "{:<10} {:<22} {:<8} {:>6} {:>10} {:>12}",
        "node", "address", "layers", "calls", "mean ms", "overhead ms"
    );
    for h in hops {
        println!(
            "{:<10} {:<22} {:<8} {:>6} {:>10.2} {:>12.2}",
            &h.node_id[..8.min(h.node_id.len())],
            h.addr,
            h.layers,
            h.calls,
            h.mean_ms(),
            h.mean_overhead_ms()
        );
    }
}

async fn run_train(args: TrainArgs) -> anyhow::Result<()> {
    use neuroshard_node::node::Compression;
    use neuroshard_node::train::{TrainOptions, run_training};
    let compression = match args.topk {
        0.0 => Compression::Dense,
        f if f > 0.0 && f <= 1.0 => Compression::TopK(f),
        f => bail!("--topk {f}: give a share in (0, 1], or 0 for none"),
    };
    let options = TrainOptions {
        stages: args.stages,
        replicas: args.replicas,
        steps: args.steps,
        batch: args.batch,
        sequence: args.sequence,
        outer_every: args.outer_every,
        compression,
        lr: args.lr,
        warmup: args.warmup,
        decay: !args.constant_lr,
        outer_lr: args.outer_lr,
        outer_momentum: args.outer_momentum,
        seed: args.seed,
        model_dir: args.model,
        spec: args.size.spec(),
        save: args.save,
        ..TrainOptions::default()
    };
    let report = run_training(options, |line| eprintln!("{line}")).await?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
        return Ok(());
    }
    let first = report.losses.first().copied().unwrap_or(f32::NAN);
    let last = report.losses.last().copied().unwrap_or(f32::NAN);
    let mb = |b: u64| b as f64 / 1e6;
    println!(
        "\nloss {first:.4} -> {last:.4} over {} steps",
        report.losses.len()
    );
    println!(
        "{} parameters, {} tokens in {:.1} s: {:.0} tokens/s",
        report.parameters,
        report.tokens,
        report.seconds,
        report.tokens_per_second()
    );
    println!(
        "replicas exchanged {:.3} MB in {} outer rounds; dense all-reduce every step would \
         have sent {:.3} MB ({:.0}x more), DiLoCo without compression {:.3} MB ({:.1}x more)",
        mb(report.exchange_bytes),
        report.outer_rounds,
        mb(report.dense_allreduce_bytes),
        report.dense_allreduce_bytes as f64 / report.exchange_bytes.max(1) as f64,
        mb(report.uncompressed_diloco_bytes),
        report.uncompressed_diloco_bytes as f64 / report.exchange_bytes.max(1) as f64,
    );
    println!(
        "activations and gradients between stages: {:.3} MB",
        mb(report.pipeline_bytes)
    );
    Ok(())
}

fn print_demo(report: &neuroshard_node::demo::DemoReport) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "\nnodes:");
    for n in &report.nodes {
        let _ = writeln!(
            out,
            "  {} at {} serves layers {}{}: receipts {} verified, {} pending, {} voided; credit {:.4}",
            n.id,
            n.addr,
            n.layers,
            if n.killed { " (killed)" } else { "" },
            n.receipts.verified,
            n.receipts.pending,
            n.receipts.voided,
            n.credit
        );
    }
    let _ = writeln!(out, "\nprompt:         {:?}", report.prompt);
    let _ = writeln!(out, "generated text: {:?}", report.text);
    let _ = writeln!(out, "generated ids:  {:?}", report.swarm.generated_ids);
    drop(out);
    print!("swarm: ");
    print_speed(&report.swarm);
    print!("local: ");
    print_speed(&report.local);
    for event in &report.events {
        println!("failover: {event}");
    }
    println!("\nper-hop latency (which node served which layers):");
    print_hops(&report.hops);
    println!(
        "\nswarm tokens {} the local reference",
        if report.matches_local() {
            "match"
        } else {
            "DIFFER FROM"
        }
    );
}

async fn print_status(node: Option<String>, tracker: Option<String>) -> anyhow::Result<()> {
    let json = if let Some(addr) = node {
        let mut client = pb::node_client::NodeClient::connect(format!("http://{addr}")).await?;
        let reply = client.ping(pb::PingRequest {}).await?.into_inner();
        let metrics: neuroshard_node::metrics::MetricsSnapshot =
            reply.metrics.unwrap_or_default().into();
        let node = reply
            .node
            .map(neuroshard_node::convert::peer_from_proto)
            .transpose()?;
        serde_json::json!({ "node": node, "metrics": metrics })
    } else if let Some(url) = tracker {
        let mut client = pb::tracker_client::TrackerClient::connect(url).await?;
        let stats = client.stats(pb::StatsRequest {}).await?.into_inner();
        serde_json::json!({
            "nodes": stats.nodes,
            "layers_covered": stats.layers_covered,
            "total_layers": stats.total_layers,
            "requests": stats.requests,
            "clone_warnings": stats.clone_warnings,
        })
    } else {
        bail!("give --node HOST:PORT or --tracker URL");
    };
    println!("{}", serde_json::to_string_pretty(&json)?);
    Ok(())
}

fn print_proofs(args: ProofsArgs) -> anyhow::Result<()> {
    use neuroshard_proof::{Ledger, Status};
    let dir = args
        .data_dir
        .unwrap_or_else(neuroshard_node::identity::default_data_dir);
    let path = dir.join(neuroshard_node::node::LEDGER_FILE);
    if !path.exists() {
        bail!(
            "no ledger at {}: has a node run with this data directory?",
            path.display()
        );
    }
    let ledger = Ledger::open(&path)?;
    if let Some(file) = &args.export {
        let out =
            std::fs::File::create(file).with_context(|| format!("creating {}", file.display()))?;
        let out = std::io::BufWriter::new(out);
        if file.extension().is_some_and(|e| e == "json") {
            ledger.export_json(out)?;
        } else {
            ledger.export_csv(out)?;
        }
        eprintln!("exported every receipt to {}", file.display());
    }
    let status = args
        .status
        .as_deref()
        .map(Status::parse)
        .transpose()
        .map_err(anyhow::Error::msg)?;
    let now = neuroshard_node::now_ms();
    let day_start = now - now % (24 * 3600 * 1000);
    let totals = ledger.totals(now, day_start)?;
    let counts = ledger.status_counts()?;
    let rows = ledger.page(status, args.offset, args.limit)?;
    if args.json {
        let json = serde_json::json!({ "totals": totals, "counts": counts, "receipts": rows });
        println!("{}", serde_json::to_string_pretty(&json)?);
        return Ok(());
    }
    println!(
        "receipts: {} verified, {} pending, {} voided",
        counts.verified, counts.pending, counts.voided
    );
    println!(
        "{:<18} {:>26} {:>26} {:>26}",
        "model", "today (UTC)", "last 7 days", "lifetime"
    );
    for t in &totals {
        let cell = |t: &neuroshard_proof::Totals| format!("{} rcpt {:.3} cr", t.receipts, t.credit);
        println!(
            "{:<18} {:>26} {:>26} {:>26}",
            t.model_id,
            cell(&t.today),
            cell(&t.week),
            cell(&t.lifetime)
        );
    }
    if !rows.is_empty() {
        println!(
            "\n{:<12} {:<9} {:<8} {:>6} {:>8} {:>12} {:>9}",
            "receipt", "status", "layers", "pos", "tokens", "GFLOP", "credit"
        );
    }
    for r in &rows {
        println!(
            "{:<12} {:<9} {:<8} {:>6} {:>8} {:>12.4} {:>9.4}",
            &r.id[..12],
            r.status.as_str(),
            format!("{}..{}", r.layer_start, r.layer_end),
            r.start_pos,
            r.tokens,
            r.flops as f64 / 1e9,
            r.credit
        );
    }
    Ok(())
}
