//! `neuroshard demo`: a tracker and a few nodes on this machine, generating through the chain.

use std::path::{Path, PathBuf};

use neuroshard_base::LayerRange;
use neuroshard_model::TextTokenizer;
use neuroshard_model::init::{ModelSpec, write_demo_model, write_model};

use crate::swarm::LocalSwarm;
use neuroshard_client::generate::{GenerationReport, LocalPipeline, generate};
use neuroshard_client::{HopTiming, SwarmClient};
use neuroshard_net::NodeError;

/// What the demo runs.
#[derive(Debug, Clone)]
pub struct DemoOptions {
    /// Nodes splitting the layers between them.
    pub nodes: usize,
    /// Stop the middle node of the chain halfway through, to show failover (a spare replica of
    /// its layers is started so the swarm can recover).
    pub kill_one: bool,
    /// Prompt text.
    pub prompt: String,
    /// Tokens to generate.
    pub max_new_tokens: usize,
    /// Model directory; `None` writes the shipped trained demo model to a temporary directory.
    pub model_dir: Option<PathBuf>,
}

/// A node of the demo swarm.
#[derive(Debug, Clone, serde::Serialize)]
pub struct DemoNode {
    /// Short node id.
    pub id: String,
    /// Address.
    pub addr: String,
    /// Layers served.
    pub layers: String,
    /// Whether the demo killed it.
    pub killed: bool,
    /// Receipts in its ledger by status, after the generation.
    pub receipts: neuroshard_proof::StatusCounts,
    /// Credit its verified receipts earned.
    pub credit: f64,
}

/// What the demo saw.
#[derive(Debug, Clone, serde::Serialize)]
pub struct DemoReport {
    /// The swarm.
    pub nodes: Vec<DemoNode>,
    /// The prompt.
    pub prompt: String,
    /// Generated text.
    pub text: String,
    /// The swarm generation.
    pub swarm: GenerationReport,
    /// The same generation in one process.
    pub local: GenerationReport,
    /// Per-hop latency.
    pub hops: Vec<HopTiming>,
    /// Failovers.
    pub events: Vec<String>,
}

impl DemoReport {
    /// Whether the swarm produced the local reference's tokens.
    pub fn matches_local(&self) -> bool {
        self.swarm.generated_ids == self.local.generated_ids
    }
}

/// Splits `total` layers into `parts` contiguous ranges of near-equal size.
pub fn split_layers(total: u32, parts: u32) -> Vec<LayerRange> {
    let parts = parts.clamp(1, total);
    (0..parts)
        .map(|i| LayerRange {
            start: total * i / parts,
            end: total * (i + 1) / parts,
        })
        .collect()
}

/// A temporary directory for a built-in model.
pub(crate) fn scratch_dir() -> Result<tempfile::TempDir, NodeError> {
    tempfile::tempdir().map_err(|e| NodeError::io("creating a temporary directory", e))
}

/// `given`, or the built-in model of `spec` written into `scratch`.
pub(crate) fn model_dir_or(
    scratch: &tempfile::TempDir,
    given: Option<&PathBuf>,
    spec: &ModelSpec,
) -> Result<PathBuf, NodeError> {
    match given {
        Some(dir) => Ok(dir.clone()),
        None => {
            let dir = scratch.path().join("model");
            write_model(&dir, spec)?;
            Ok(dir)
        }
    }
}

/// Runs the demo, reporting progress lines through `progress`.
pub async fn run_demo(
    options: DemoOptions,
    progress: impl Fn(&str),
) -> Result<DemoReport, NodeError> {
    let scratch = scratch_dir()?;
    let model_dir = demo_model_dir(&scratch, options.model_dir.as_ref(), &progress)?;
    let info = neuroshard_model::ModelInfo::read(&model_dir)?;
    let tokenizer = TextTokenizer::for_model_dir(&model_dir)?;
    let prompt = tokenizer.encode_prompt(&options.prompt, info.config.bos_token_id)?;

    let (ranges, victim_range) = demo_ranges(info.config.num_hidden_layers as u32, &options);
    let local = start_swarm(&model_dir, &ranges, &progress).await?;
    let nodes = &local.nodes;

    progress("generating in one process (the reference)...");
    let local_report = generate_locally(
        &model_dir,
        &prompt,
        options.max_new_tokens,
        &info.config.eos_token_ids,
    )
    .await?;

    progress("generating through the swarm...");
    let client = spot_checking_client(&local, &model_dir).await?;
    let mut session = client.session();
    let mut killed: Option<String> = None;
    let kill_at = (options.max_new_tokens / 2).max(1);
    let swarm = generate(
        &mut session,
        &prompt,
        options.max_new_tokens,
        &info.config.eos_token_ids,
        |s, n| {
            if options.kill_one && n == kill_at && killed.is_none() {
                killed = kill_in_chain(&s.chain(), nodes, victim_range, n, &progress);
            }
        },
    )
    .await?;
    let hops = session.timings();
    let events = session.events().to_vec();
    session.close().await;
    client.flush_receipts().await;
    let report = DemoReport {
        nodes: demo_nodes(nodes, killed.as_deref()).await?,
        prompt: options.prompt.clone(),
        text: tokenizer.decode(&swarm.generated_ids)?,
        swarm,
        local: local_report,
        hops,
        events,
    };
    local.shutdown().await;
    Ok(report)
}

/// The layer ranges of the demo's nodes, and the middle one, whose node the demo may kill: it
/// gets a spare replica when the demo kills one.
fn demo_ranges(total_layers: u32, options: &DemoOptions) -> (Vec<LayerRange>, LayerRange) {
    let mut ranges = split_layers(total_layers, options.nodes as u32);
    let victim_range = ranges[ranges.len() / 2];
    if options.kill_one {
        ranges.push(victim_range);
    }
    (ranges, victim_range)
}

/// `given`, or the shipped trained demo model written into `scratch`.
fn demo_model_dir(
    scratch: &tempfile::TempDir,
    given: Option<&PathBuf>,
    progress: &impl Fn(&str),
) -> Result<PathBuf, NodeError> {
    match given {
        Some(dir) => Ok(dir.clone()),
        None => {
            progress("writing the shipped trained demo model (6 layers, width 256)...");
            let dir = scratch.path().join("model");
            write_demo_model(&dir)?;
            Ok(dir)
        }
    }
}

/// The reference generation: the whole model in this process, the pipeline dropped after.
async fn generate_locally(
    model_dir: &Path,
    prompt: &[u32],
    max_new_tokens: usize,
    eos_token_ids: &[u32],
) -> Result<GenerationReport, NodeError> {
    let mut pipeline = LocalPipeline::load(model_dir)?;
    let report = generate(
        &mut pipeline,
        prompt,
        max_new_tokens,
        eos_token_ids,
        |_, _| {},
    )
    .await?;
    drop(pipeline);
    Ok(report)
}

/// A client of `swarm`; the demo holds the model, so it spot-checks the nodes it uses, and
/// holds the tracker's credit pass, so the nodes count its receipts as earned.
async fn spot_checking_client(
    swarm: &LocalSwarm,
    model_dir: &Path,
) -> Result<SwarmClient, NodeError> {
    let key = std::sync::Arc::new(neuroshard_base::NodeKey::generate());
    let mut client_config = swarm.vouched_client(key);
    client_config.verify_with = Some(model_dir.to_path_buf());
    SwarmClient::connect(client_config).await
}

/// Kills the node of `chain` serving `victim` (else the chain's middle one) after token `n`;
/// its address.
fn kill_in_chain(
    chain: &[neuroshard_client::router::Hop],
    nodes: &[crate::node::NodeHandle],
    victim: LayerRange,
    n: usize,
    progress: &impl Fn(&str),
) -> Option<String> {
    let middle = chain
        .iter()
        .find(|h| h.layers == victim)
        .or(chain.get(chain.len() / 2))?;
    let node = nodes.iter().find(|n| n.advertised() == middle.addr)?;
    progress(&format!(
        "killing node {} (layers {}) after token {n}",
        node.id().short(),
        node.layers()
    ));
    node.kill();
    Some(node.advertised().to_string())
}

/// A tracker and one node per range of the model in `model_dir`, on loopback.
async fn start_swarm(
    model_dir: &std::path::Path,
    ranges: &[LayerRange],
    progress: &impl Fn(&str),
) -> Result<LocalSwarm, NodeError> {
    let mut local = LocalSwarm::tracker_only().await?;
    for (i, range) in ranges.iter().enumerate() {
        progress(&format!("starting node {} with layers {range}...", i + 1));
        local.add_node(model_dir, range.start, range.end).await?;
    }
    Ok(local)
}

/// What each node's ledger holds after the generation; `killed`: the address stopped midway.
async fn demo_nodes(
    nodes: &[crate::node::NodeHandle],
    killed: Option<&str>,
) -> Result<Vec<DemoNode>, NodeError> {
    let mut demo_nodes = Vec::new();
    for n in nodes {
        let receipts = n.ledger().read(|l| l.status_counts()).await?;
        let totals = n
            .ledger()
            .read(|l| l.totals(neuroshard_net::now_ms(), 0))
            .await?;
        demo_nodes.push(DemoNode {
            id: n.id().short(),
            addr: n.advertised().to_string(),
            layers: n.layers().to_string(),
            killed: killed == Some(n.advertised().as_str()),
            receipts,
            credit: totals.iter().map(|t| t.lifetime.credit).sum(),
        });
    }
    Ok(demo_nodes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_layers_evenly_and_contiguously() {
        let ranges = split_layers(6, 3);
        assert_eq!(
            ranges.iter().map(|r| (r.start, r.end)).collect::<Vec<_>>(),
            vec![(0, 2), (2, 4), (4, 6)]
        );
        assert_eq!(split_layers(7, 3).last().unwrap().end, 7);
        assert_eq!(split_layers(2, 5).len(), 2);
    }
}
