//! `neuroshard serve`: the OpenAI-compatible API over a swarm or one process.

use super::*;

#[derive(Args)]
pub(crate) struct ServeArgs {
    #[command(flatten)]
    swarm: SwarmArgs,
    #[command(flatten)]
    requester: RequesterArgs,
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
    /// Dtype of hidden states on the wire: f32, f16, bf16, or int8 (blockwise, for slow
    /// uplinks: 1.125 bytes a value at a relative error near 0.5 %).
    #[arg(long, default_value = "f16")]
    wire_dtype: String,
}

pub(crate) async fn run_serve(args: ServeArgs) -> anyhow::Result<()> {
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
        args.requester.apply(&mut client)?;
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
