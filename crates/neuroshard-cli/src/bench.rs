//! `neuroshard bench`: this machine's decode speed over a model's layers, at a short and a
//! long context, and a hop's overhead to a peer.

use super::*;
use neuroshard_node::bench::{batched_speed, decode_speed, hop_overhead, load};
use neuroshard_node::threads::{ComputeThreads, resolve};

#[derive(Args)]
pub(crate) struct BenchArgs {
    /// Hugging Face model directory.
    #[arg(long)]
    model: PathBuf,
    /// Layers to run, as A..B (default: every layer).
    #[arg(long)]
    layers: Option<LayerRange>,
    /// Contexts to measure a decode step at: positions held before it.
    #[arg(long, value_delimiter = ',', default_value = "128,2048")]
    contexts: Vec<usize>,
    /// Decode steps timed at each context.
    #[arg(long, default_value_t = 32)]
    steps: u32,
    /// Compute threads, as a node's --cpu-threads (0: every core but one).
    #[arg(long, default_value_t = 0)]
    cpu_threads: u16,
    /// A node (host:port) serving the same model to time a decode hop to.
    #[arg(long)]
    peer: Option<String>,
    /// Decode calls timed to the peer.
    #[arg(long, default_value_t = 32)]
    calls: u32,
    /// Sessions to step together, as a node batches them (e.g. 1,4,8), each at the shortest
    /// of --contexts: the aggregate tokens/s this machine reaches with no network.
    #[arg(long, value_delimiter = ',')]
    batch: Vec<usize>,
    /// How the layers' projection weights are held, as a node's --precision.
    #[arg(long, default_value = "f32")]
    precision: neuroshard_model::Precision,
}

pub(crate) async fn run_bench(args: BenchArgs) -> anyhow::Result<()> {
    let info = neuroshard_model::ModelInfo::read(&args.model)?;
    let all = LayerRange::new(0, info.config.num_hidden_layers as u32)?;
    let layers = args.layers.unwrap_or(all).to_range();
    let threads = ComputeThreads::new(args.cpu_threads)?;
    let (dir, range, contexts, steps, precision, batches) = (
        args.model.clone(),
        layers.clone(),
        args.contexts,
        args.steps,
        args.precision,
        args.batch,
    );
    let (decode, batched) = tokio::task::spawn_blocking(move || {
        let shard = load(&dir, range.clone(), precision)?;
        let decode = decode_speed(&shard, range.clone(), &contexts, steps, &threads)?;
        let context = contexts.iter().copied().min().unwrap_or(0);
        let batched = batched_speed(&shard, range, (context, &batches), steps, &threads)?;
        Ok::<_, neuroshard_net::NodeError>((decode, batched))
    })
    .await??;
    let hop = match &args.peer {
        Some(peer) => {
            let to = neuroshard_net::pool::Target::any(peer.clone());
            Some(hop_overhead(&to, info.config.hidden_size, args.calls).await?)
        }
        None => None,
    };
    let flatness = match (decode.first(), decode.last()) {
        (Some(short), Some(long)) => long.ms_per_token / short.ms_per_token,
        _ => 1.0,
    };
    let report = serde_json::json!({
        "model": info.id,
        "layers": format!("{}..{}", layers.start, layers.end),
        "compute_threads": resolve(args.cpu_threads),
        "precision": args.precision,
        "weight_bytes": neuroshard_model::init::shard_weight_bytes(
            &info.config,
            layers.clone(),
            args.precision,
        ),
        "device": match neuroshard_model::is_cpu(&neuroshard_model::default_device()) {
            true => "cpu",
            false => "gpu",
        },
        "decode": decode,
        "longest_over_shortest_context": flatness,
        // What a node serving these layers announces to routers (its start-up figure).
        "decode_ms_per_layer": decode.first().map(|d| d.ms_per_token / layers.len().max(1) as f64),
        "hop": hop,
        "batched": batched,
    });
    println!("{}", serde_json::to_string_pretty(&report)?);
    Ok(())
}
