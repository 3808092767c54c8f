//! `neuroshard generate`: text through the swarm or one process, streamed as it comes, or as
//! JSON with the ids and each step's top-5 logits.

use super::*;

#[derive(Args)]
pub(crate) struct GenerateArgs {
    #[command(flatten)]
    swarm: SwarmArgs,
    #[command(flatten)]
    requester: RequesterArgs,
    /// Model directory: required with --local; otherwise used for its tokenizer and model id.
    #[arg(long)]
    model: Option<PathBuf>,
    /// Run the whole model in this process (the reference).
    #[arg(long, requires = "model")]
    local: bool,
    /// With --local: how the projection weights are held, as a node's --precision.
    #[arg(long, requires = "local", default_value = "f32")]
    precision: neuroshard_model::Precision,
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
    /// Dtype of hidden states on the wire: f32, f16, bf16, or int8 (blockwise, for slow
    /// uplinks: 1.125 bytes a value at a relative error near 0.5 %).
    #[arg(long, default_value = "f16")]
    wire_dtype: String,
    /// Re-execute a sample of hops with the weights in --model (spot checks).
    #[arg(long, requires = "model")]
    spot_check: bool,
    /// Through the swarm: run this many generations of the prompt at once, each its own
    /// session of one client, and print their decode speeds and the aggregate as JSON (a
    /// benchmark of concurrent users, as an API server sees them).
    #[arg(long, default_value_t = 1, conflicts_with = "local",
        value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..=256))]
    sessions: usize,
}

pub(crate) async fn run_generate(args: GenerateArgs) -> anyhow::Result<()> {
    let tokenizer = match &args.model {
        Some(dir) => TextTokenizer::for_model_dir(dir)?,
        None => TextTokenizer::Bytes,
    };
    let info = args
        .model
        .as_deref()
        .map(neuroshard_model::ModelInfo::read)
        .transpose()?;
    let prompt = prompt_ids(&args, &tokenizer, info.as_ref())?;
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
        ..GenerateOptions::default()
    };
    options.sampling.validate()?;
    // Text is printed as it arrives; --json prints only the report at the end.
    let mut printer = Printer::new(&tokenizer, &args.stop, !args.json);
    let (mut report, hops) = if args.local {
        let dir = args.model.as_ref().context("--local needs --model")?;
        let info = neuroshard_model::ModelInfo::read(dir)?;
        let layers = 0..info.config.num_hidden_layers;
        let shard = LocalPipeline::load_layers(dir, layers, args.precision)?;
        let mut local = LocalPipeline::new(std::sync::Arc::new(shard));
        let report = generate_with(&mut local, &prompt, &options, |_, steps| {
            printer.step(steps)
        })
        .await?;
        (report, Vec::new())
    } else {
        match on_swarm(&args, info.as_ref(), &prompt, &options, &mut printer).await? {
            Some(ran) => ran,
            // --sessions printed its own report.
            None => return Ok(()),
        }
    };
    printer.finish(&mut report)?;
    if args.json {
        print_json(&report, &printer.text, &hops)?;
    } else {
        print_speed(&report);
        print_hops(&hops);
    }
    Ok(())
}

/// The prompt's token ids: as given, the text tokenized, or a chat message put through the
/// model's template.
fn prompt_ids(
    args: &GenerateArgs,
    tokenizer: &TextTokenizer,
    info: Option<&neuroshard_model::ModelInfo>,
) -> anyhow::Result<Vec<u32>> {
    let bos = info.and_then(|i| i.config.bos_token_id);
    Ok(match (&args.prompt_ids, &args.prompt, &args.chat) {
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
    })
}

/// Generates through the swarm; the report and each hop's timings (none with --sessions,
/// which prints its own).
async fn on_swarm(
    args: &GenerateArgs,
    info: Option<&neuroshard_model::ModelInfo>,
    prompt: &[u32],
    options: &GenerateOptions,
    printer: &mut Printer<'_>,
) -> anyhow::Result<Option<(GenerationReport, Vec<HopTiming>)>> {
    let mut config = ClientConfig::with_bootstrap(args.swarm.bootstrap.clone());
    config.tracker = args.swarm.tracker.clone();
    config.discovery.lan = args.swarm.lan();
    config.model_id = info.map(|i| i.id.clone());
    config.model_config = info.map(|i| i.config.clone());
    config.wire_dtype = WireDType::parse(&args.wire_dtype)?;
    if args.spot_check {
        config.verify_with = args.model.clone();
    }
    args.requester.apply(&mut config)?;
    let client = SwarmClient::connect(config).await?;
    if args.sessions > 1 {
        concurrent(&client, args.sessions, prompt, options).await?;
        return Ok(None);
    }
    let mut session = client.session();
    let report = generate_with(&mut session, prompt, options, |_, steps| {
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
        if let Some(why) = &receipts.pass_refused {
            eprintln!("credit pass refused (the receipts count as unvouched): {why}");
        }
    }
    Ok(Some((report, hops)))
}

/// Runs `sessions` generations of `prompt` at once through `client` and prints each one's
/// decode tokens/s and their sum as JSON.
async fn concurrent(
    client: &SwarmClient,
    sessions: usize,
    prompt: &[u32],
    options: &GenerateOptions,
) -> anyhow::Result<()> {
    let runs = (0..sessions).map(|_| async {
        let mut session = client.session();
        let report = generate_with(&mut session, prompt, options, |_, _| true).await;
        for event in session.events() {
            eprintln!("failover: {event}");
        }
        session.close().await;
        report
    });
    let reports = futures::future::try_join_all(runs).await?;
    let speeds: Vec<f64> = reports.iter().map(|r| r.decode_tokens_per_s).collect();
    let json = serde_json::json!({
        "sessions": sessions,
        "decode_tokens_per_s": speeds,
        "aggregate_decode_tokens_per_s": speeds.iter().sum::<f64>(),
        "generated_ids": reports.iter().map(|r| &r.generated_ids).collect::<Vec<_>>(),
    });
    println!("{}", serde_json::to_string_pretty(&json)?);
    client.flush_receipts().await;
    Ok(())
}

/// The report as JSON: ids, each step's top-5 logits, speed and hops.
fn print_json(report: &GenerationReport, text: &str, hops: &[HopTiming]) -> anyhow::Result<()> {
    let json = serde_json::json!({
        "prompt_ids": report.prompt_ids,
        "generated_ids": report.generated_ids,
        "finish_reason": report.finish,
        "text": text,
        "steps": report.steps.iter().map(|s| serde_json::json!({
            "token": s.token,
            "top5": s.top.iter().take(5).map(|(id, logit)| serde_json::json!({"id": id, "logit": logit})).collect::<Vec<_>>(),
        })).collect::<Vec<_>>(),
        "prefill_ms": report.prefill_ms,
        "decode_tokens_per_s": report.decode_tokens_per_s,
        "hops": hops,
    });
    println!("{}", serde_json::to_string_pretty(&json)?);
    Ok(())
}

/// Prints generated text as tokens arrive (whole characters only) and ends the generation at
/// a stop string, which is not printed.
pub(crate) struct Printer<'a> {
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
    fn step(&mut self, steps: &[neuroshard_client::generate::StepReport]) -> bool {
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
            report.finish = neuroshard_client::generate::Finish::Stop;
        }
        if self.show {
            println!();
        }
        Ok(())
    }
}

pub(crate) fn print_speed(report: &GenerationReport) {
    println!(
        "prefill {:.1} ms for {} tokens; decode {:.1} tokens/s",
        report.prefill_ms,
        report.prompt_ids.len(),
        report.decode_tokens_per_s
    );
}

pub(crate) fn print_hops(hops: &[HopTiming]) {
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
            h.node_id.short(),
            h.addr,
            h.layers,
            h.calls,
            h.mean_ms(),
            h.mean_overhead_ms()
        );
    }
}
