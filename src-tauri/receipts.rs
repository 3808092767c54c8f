//! The receipts view: pages of the ledger, totals over periods, the chart's series and the CSV
//! export, read from the running node's ledger or, with no node, from the ledger file.

use std::path::PathBuf;

use chrono::{Local, TimeZone};
use neuroshard_node::node::LEDGER_FILE;
use neuroshard_proof::ledger::{Ledger, LedgerError, ReceiptRow, SeriesPoint, Status, Totals};
use serde::Serialize;

use crate::desktop::Desktop;
use crate::error::CommandError;
use neuroshard_settings::policy::{MS_PER_DAY, MS_PER_HOUR, local_midnight};

/// Receipts a page of the receipts table may hold.
pub const MAX_PAGE: u32 = 200;

/// Totals of verified work over the periods the receipts view shows, all models together.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct PeriodTotals {
    /// Since local midnight.
    pub today: Totals,
    /// The last 7 days.
    pub week: Totals,
    /// Ever.
    pub lifetime: Totals,
}

/// One page of the receipts table.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ReceiptPage {
    /// Newest first.
    pub rows: Vec<ReceiptRow>,
    /// Receipts matching the filter, on every page.
    pub total: u64,
    /// This page, from 0.
    pub page: u32,
    /// Rows per page.
    pub per_page: u32,
}

impl Desktop {
    /// Receipts, newest first, `per_page` at a time, optionally of one status.
    pub async fn receipts(
        &self,
        status: Option<&str>,
        page: u32,
        per_page: u32,
    ) -> Result<ReceiptPage, CommandError> {
        if per_page == 0 || per_page > MAX_PAGE {
            return Err(CommandError::bad_request(format!(
                "per_page is {per_page}; ask for 1 to {MAX_PAGE} rows"
            )));
        }
        let status = status
            .map(Status::parse)
            .transpose()
            .map_err(|e| CommandError::bad_request(e.to_string()))?;
        let offset = u64::from(page) * u64::from(per_page);
        let (rows, counts) = self
            .ledger(move |l| Ok((l.page(status, offset, per_page)?, l.status_counts()?)))
            .await?;
        let total = match status {
            None => counts.pending + counts.verified + counts.voided,
            Some(Status::Pending) => counts.pending,
            Some(Status::Verified) => counts.verified,
            Some(Status::Voided) => counts.voided,
        };
        Ok(ReceiptPage {
            rows,
            total,
            page,
            per_page,
        })
    }

    /// Verified totals for today, the last 7 days and ever.
    pub async fn totals(&self, now_ms: u64) -> Result<PeriodTotals, CommandError> {
        let midnight = local_midnight(now_ms);
        let per_model = self.ledger(move |l| l.totals(now_ms, midnight)).await?;
        let mut sum = PeriodTotals::default();
        for m in per_model {
            for (into, from) in [
                (&mut sum.today, m.today),
                (&mut sum.week, m.week),
                (&mut sum.lifetime, m.lifetime),
            ] {
                into.receipts += from.receipts;
                into.tokens += from.tokens;
                into.flops += from.flops;
                into.credit += from.credit;
                into.unvouched += from.unvouched;
            }
        }
        Ok(sum)
    }

    /// Tokens and credit per hour over the last 24 hours (`"24h"`) or per day over the last 7
    /// days (`"7d"`), oldest first, ending with the current hour or day.
    pub async fn series(&self, range: &str, now_ms: u64) -> Result<Vec<SeriesPoint>, CommandError> {
        let (since, bucket, count) = match range {
            "24h" => (
                now_ms / MS_PER_HOUR * MS_PER_HOUR - 23 * MS_PER_HOUR,
                MS_PER_HOUR,
                24,
            ),
            "7d" => (
                local_midnight(now_ms).saturating_sub(6 * MS_PER_DAY),
                MS_PER_DAY,
                7,
            ),
            other => {
                return Err(CommandError::bad_request(format!(
                    "range {other:?} is not 24h or 7d"
                )));
            }
        };
        self.ledger(move |l| l.series(since, bucket, count)).await
    }

    /// Writes every receipt as CSV into `dir` (the Downloads folder when none) and returns the
    /// file's path.
    pub async fn export_csv(
        &self,
        dir: Option<PathBuf>,
        now_ms: u64,
    ) -> Result<PathBuf, CommandError> {
        let dir = dir
            .or_else(dirs::download_dir)
            .or_else(dirs::home_dir)
            .unwrap_or_else(|| self.launch.data_dir.clone());
        let day = Local
            .timestamp_millis_opt(now_ms as i64)
            .single()
            .map(|t| t.format("%Y-%m-%d").to_string())
            .unwrap_or_default();
        let path = dir.join(format!("neuroshard-receipts-{day}.csv"));
        let target = path.clone();
        self.ledger(move |l| {
            let file = std::fs::File::create(&target)
                .map_err(|e| LedgerError::Export(format!("{}: {e}", target.display())))?;
            l.export_csv(std::io::BufWriter::new(file))
        })
        .await?;
        Ok(path)
    }

    /// Runs `f` on the node's ledger, or on the ledger file when no node runs.
    async fn ledger<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Ledger) -> Result<T, LedgerError> + Send + 'static,
    ) -> Result<T, CommandError> {
        if let Some(node) = self.node.read().await.as_ref() {
            return Ok(node.ledger().read(f).await?);
        }
        let path = self.launch.data_dir.join(LEDGER_FILE);
        tokio::task::spawn_blocking(move || f(&Ledger::open(&path)?))
            .await
            .map_err(|e| CommandError::new("ledger", e.to_string()))?
            .map_err(CommandError::from)
    }
}
