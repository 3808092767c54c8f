//! `neuroshard status` and `neuroshard proofs`: a node's or tracker's metrics, and the receipts
//! this install earned.

use super::*;
use std::path::Path;

#[derive(Args)]
pub(crate) struct ProofsArgs {
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

pub(crate) async fn print_status(
    node: Option<String>,
    tracker: Option<String>,
) -> anyhow::Result<()> {
    let json = if let Some(addr) = node {
        let dialler = neuroshard_net::tls::Dialler::ephemeral()?;
        let to = neuroshard_net::pool::Target::any(addr);
        let channel =
            neuroshard_net::pool::connect(&to, &dialler, std::time::Duration::from_secs(5)).await?;
        let mut client = pb::node_client::NodeClient::new(channel);
        let reply = client.ping(pb::PingRequest {}).await?.into_inner();
        let metrics: neuroshard_net::metrics::MetricsSnapshot =
            reply.metrics.unwrap_or_default().into();
        let node = reply
            .node
            .map(neuroshard_net::convert::peer_from_proto)
            .transpose()?;
        serde_json::json!({ "node": node, "metrics": metrics })
    } else if let Some(url) = tracker {
        let mut client = neuroshard_client::tracker_client(&url)?;
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

pub(crate) fn print_proofs(args: ProofsArgs) -> anyhow::Result<()> {
    use neuroshard_proof::Status;
    let ledger = open_ledger(args.data_dir)?;
    if let Some(file) = &args.export {
        export_receipts(&ledger, file)?;
    }
    let status = args.status.as_deref().map(Status::parse).transpose()?;
    let now = neuroshard_net::now_ms();
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
    print_totals(&totals);
    let issuers = ledger.issuers()?;
    if issuers.is_empty() {
        println!(
            "credit counts only receipts of requesters a trusted issuer vouches for; none is trusted"
        );
    } else {
        let names: Vec<String> = issuers.iter().map(|id| id.short()).collect();
        println!(
            "credit counts only receipts of requesters vouched for by {}",
            names.join(", ")
        );
    }
    print_receipts(&rows);
    Ok(())
}

/// The ledger in `data_dir` (default: the install's), which a node must have made.
fn open_ledger(data_dir: Option<PathBuf>) -> anyhow::Result<neuroshard_proof::Ledger> {
    let dir = data_dir.unwrap_or_else(neuroshard_node::identity::default_data_dir);
    let path = dir.join(neuroshard_node::node::LEDGER_FILE);
    if !path.exists() {
        bail!(
            "no ledger at {}: has a node run with this data directory?",
            path.display()
        );
    }
    Ok(neuroshard_proof::Ledger::open(&path)?)
}

/// `--export FILE`: every receipt, as JSON when FILE ends in .json, else as CSV.
fn export_receipts(ledger: &neuroshard_proof::Ledger, file: &Path) -> anyhow::Result<()> {
    let out =
        std::fs::File::create(file).with_context(|| format!("creating {}", file.display()))?;
    let out = std::io::BufWriter::new(out);
    if file.extension().is_some_and(|e| e == "json") {
        ledger.export_json(out)?;
    } else {
        ledger.export_csv(out)?;
    }
    eprintln!("exported every receipt to {}", file.display());
    Ok(())
}

/// The table of receipts and credit per model: today, the last 7 days, and lifetime.
fn print_totals(totals: &[neuroshard_proof::ModelTotals]) {
    println!(
        "{:<18} {:>36} {:>36} {:>36}",
        "model", "today (UTC)", "last 7 days", "lifetime"
    );
    for t in totals {
        let cell = |t: &neuroshard_proof::Totals| {
            format!(
                "{} rcpt {:.3} cr ({:.3} unvouched)",
                t.receipts, t.credit, t.unvouched
            )
        };
        println!(
            "{:<18} {:>36} {:>36} {:>36}",
            t.model_id,
            cell(&t.today),
            cell(&t.week),
            cell(&t.lifetime)
        );
    }
}

/// The listed receipts, one a line under a header (none without receipts).
fn print_receipts(rows: &[neuroshard_proof::ReceiptRow]) {
    if !rows.is_empty() {
        println!(
            "\n{:<12} {:<9} {:<8} {:>6} {:>8} {:>12} {:>9}",
            "receipt", "status", "layers", "pos", "tokens", "GFLOP", "credit"
        );
    }
    for r in rows {
        let note = match (&r.evidence, r.vouched) {
            (Some(evidence), _) => format!("  voided: {evidence}"),
            (None, false) if r.status == neuroshard_proof::Status::Verified => {
                "  unvouched".to_string()
            }
            _ => String::new(),
        };
        println!(
            "{:<12} {:<9} {:<8} {:>6} {:>8} {:>12.4} {:>9.4}{note}",
            &r.id[..12],
            r.status.as_str(),
            format!("{}..{}", r.layer_start, r.layer_end),
            r.start_pos,
            r.tokens,
            r.flops as f64 / 1e9,
            r.credit
        );
    }
}
