//! `neuroshard train`: pipeline stages × DiLoCo replicas on loopback, and the demo's report.

use super::*;

#[derive(Args)]
pub(crate) struct TrainArgs {
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

pub(crate) async fn run_train(args: TrainArgs) -> anyhow::Result<()> {
    use neuroshard_node::train::{TrainOptions, run_training};
    let compression = compression(args.topk)?;
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
    print_training(&report);
    Ok(())
}

/// `--topk`: a share in (0, 1] sends the top-k, 0 sends every coordinate as f32.
fn compression(topk: f64) -> anyhow::Result<neuroshard_node::node::Compression> {
    use neuroshard_node::node::Compression;
    Ok(match topk {
        0.0 => Compression::Dense,
        f if f > 0.0 && f <= 1.0 => Compression::TopK(f),
        f => bail!("--topk {f}: give a share in (0, 1], or 0 for none"),
    })
}

/// The training report for people: the loss, the speed, and the bytes exchanged beside what
/// dense all-reduce and uncompressed DiLoCo would have sent.
fn print_training(report: &neuroshard_node::train::TrainReport) {
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
}

pub(crate) fn print_demo(report: &neuroshard_node::demo::DemoReport) {
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
