//! Credit passes on the command line: `neuroshard pass` issues one, and `--requester-dir`
//! makes `generate` and `serve` countersign as a kept key and show the pass kept beside it.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use clap::Args;
use neuroshard_base::PublicKey;
use neuroshard_client::ClientConfig;
use neuroshard_proof::{CreditPass, PassBody};

/// The file in a requester directory that holds its credit pass.
pub(crate) const PASS_FILE: &str = "credit.pass";

/// Who countersigns the receipts of a client's calls.
#[derive(Args)]
pub(crate) struct RequesterArgs {
    /// Countersign receipts as the key kept in this directory (node.key, made if missing),
    /// showing the credit pass in its credit.pass if there is one: workers that trust the
    /// pass's issuer then count the receipts as earned. Default: a fresh key each run.
    #[arg(long)]
    requester_dir: Option<PathBuf>,
}

impl RequesterArgs {
    /// Sets `config`'s key and pass from the requester directory, if one is given.
    pub(crate) fn apply(&self, config: &mut ClientConfig) -> anyhow::Result<()> {
        let Some(dir) = &self.requester_dir else {
            return Ok(());
        };
        let key = neuroshard_node::identity::load_or_create(dir)?;
        let path = dir.join(PASS_FILE);
        config.pass = match std::fs::read_to_string(&path) {
            Ok(text) => Some(
                CreditPass::from_text(&text, neuroshard_net::now_ms())
                    .with_context(|| format!("{}", path.display()))?,
            ),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
        };
        config.key = Some(Arc::new(key));
        Ok(())
    }
}

/// `neuroshard pass`'s arguments.
#[derive(Args)]
pub(crate) struct PassArgs {
    /// The issuer's data directory (its node.key): a tracker's --data-dir, or any install
    /// whose id workers list with --credit-issuer. Default: the tracker's default, a
    /// `tracker` folder in the user's data directory.
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// The requester's public key, as `neuroshard identity --public-key --data-dir DIR`
    /// prints it for the requester's directory.
    #[arg(long)]
    holder: String,
    /// Days the pass is good for.
    #[arg(long, default_value_t = 30)]
    days: u64,
}

/// Prints a pass from the key in `data_dir` for `holder`; the requester keeps it as
/// `credit.pass` in its --requester-dir.
pub(crate) fn issue_pass(args: PassArgs) -> anyhow::Result<()> {
    let bytes = hex::decode(args.holder.trim()).context("--holder is not hex")?;
    let holder = PublicKey::from_slice(&bytes).context("--holder")?;
    if args.days == 0 {
        anyhow::bail!("--days must be at least 1");
    }
    let dir = crate::tracker_dir(args.data_dir);
    // A pass from a key nobody trusts is worth nothing: never make one here.
    let key_file = neuroshard_node::identity::key_path(&dir);
    if !key_file.exists() {
        anyhow::bail!(
            "no issuer key at {}: give --data-dir of the tracker (or node) whose key vouches",
            key_file.display()
        );
    }
    let issuer = neuroshard_node::identity::load_or_create(&dir)?;
    let pass = PassBody::new(&issuer, holder, neuroshard_net::now_ms(), args.days).sign(&issuer);
    println!("{}", pass.to_text());
    eprintln!(
        "a {}-day credit pass from {} for requester {}: save it as {PASS_FILE} in the requester's --requester-dir",
        args.days,
        issuer.id(),
        holder.id()
    );
    Ok(())
}
