//! The receipt ledger: an embedded SQLite database in WAL mode.
//!
//! A worker records each receipt it signs as pending, and settles it when the requester's
//! countersignature arrives: verified (earning credit) or voided. Settling commits with
//! `synchronous=FULL` before the worker acknowledges it, so an acknowledged countersignature
//! survives `kill -9` and power loss. A file that is not a ledger is refused with an error and
//! left as it is.
//!
//! Credit shown as earned counts only receipts that a worker could not have countersigned for
//! itself: those of a requester that is one of the issuers the owner trusts, or that showed a
//! trusted issuer's [`CreditPass`] when it countersigned (see [`crate::pass`]). The rest is
//! kept, and summed apart as unvouched.

use std::path::Path;

use neuroshard_base::NodeId;
use rusqlite::{Connection, OptionalExtension, params};
use serde::Serialize;

use crate::pass::CreditPass;
use crate::receipt::{Countersignature, Receipt, Verdict};
use crate::reputation::credit;

/// Schema version stored in `PRAGMA user_version`: 2 added a void's evidence, the issuer that
/// vouched for a requester, and the issuers the owner trusts.
const SCHEMA_VERSION: i64 = 3;

/// How long a writer waits for another connection's lock. 5 s: the CLI reading a busy node's
/// ledger waits for a commit rather than failing.
const BUSY_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// Most rows one page query returns.
pub const MAX_PAGE: u32 = 1000;

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS receipts (
    id TEXT PRIMARY KEY,
    kind TEXT NOT NULL,
    model_id TEXT NOT NULL,
    layer_start INTEGER NOT NULL,
    layer_end INTEGER NOT NULL,
    session_id TEXT NOT NULL,
    start_pos INTEGER NOT NULL,
    tokens INTEGER NOT NULL,
    flops INTEGER NOT NULL,
    requester TEXT NOT NULL,
    created_ms INTEGER NOT NULL,
    status TEXT NOT NULL CHECK (status IN ('pending', 'verified', 'voided')),
    spot_checked INTEGER NOT NULL DEFAULT 0,
    reliability REAL,
    credit REAL NOT NULL DEFAULT 0,
    settled_ms INTEGER,
    receipt BLOB NOT NULL,
    countersignature BLOB
);
CREATE INDEX IF NOT EXISTS receipts_by_time ON receipts (created_ms);
CREATE INDEX IF NOT EXISTS receipts_by_status ON receipts (status, created_ms);
";

/// From version 1 to 2, in the same transaction as the version bump.
const MIGRATE_TO_2: &str = "
ALTER TABLE receipts ADD COLUMN evidence TEXT;
ALTER TABLE receipts ADD COLUMN voucher TEXT;
CREATE TABLE IF NOT EXISTS issuers (id TEXT PRIMARY KEY NOT NULL);
";

/// From version 2 to 3: receipts past the retention, rolled up per day, model, status and
/// whether a trusted issuer vouched for them when they were rolled up.
const MIGRATE_TO_3: &str = "
CREATE TABLE IF NOT EXISTS rollups (
    day_ms INTEGER NOT NULL,
    model_id TEXT NOT NULL,
    status TEXT NOT NULL,
    vouched INTEGER NOT NULL,
    receipts INTEGER NOT NULL,
    tokens INTEGER NOT NULL,
    flops INTEGER NOT NULL,
    credit REAL NOT NULL,
    PRIMARY KEY (day_ms, model_id, status, vouched)
);
";

/// Shortest retention: the week's totals read rows, so rows of the last 7 days stay.
pub const MIN_RETENTION_DAYS: u32 = 8;

/// Whether a row's credit counts as earned: its requester is a trusted issuer, or showed one's
/// pass.
const VOUCHED: &str = "(requester IN (SELECT id FROM issuers)
    OR COALESCE(voucher IN (SELECT id FROM issuers), 0))";

/// Why the ledger failed.
#[derive(Debug, thiserror::Error)]
pub enum LedgerError {
    /// SQLite refused an operation.
    #[error("ledger {what}: {source}")]
    Sqlite {
        /// What was being done.
        what: String,
        /// SQLite's error.
        source: rusqlite::Error,
    },
    /// The file is a database of another kind or a newer version.
    #[error("ledger schema: {0}")]
    Schema(String),
    /// Writing an export failed.
    #[error("ledger export: {0}")]
    Export(String),
}

fn sql(what: impl Into<String>) -> impl FnOnce(rusqlite::Error) -> LedgerError {
    let what = what.into();
    move |source| LedgerError::Sqlite { what, source }
}

/// Where a receipt stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    /// Signed by this node; no countersignature yet.
    Pending,
    /// Countersigned as accepted: earns credit.
    Verified,
    /// Countersigned as voided: a failed check.
    Voided,
}

impl Status {
    /// The stored name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Pending => "pending",
            Self::Verified => "verified",
            Self::Voided => "voided",
        }
    }

    /// Parses a stored or typed name.
    pub fn parse(name: &str) -> Result<Self, UnknownStatus> {
        match name {
            "pending" => Ok(Self::Pending),
            "verified" => Ok(Self::Verified),
            "voided" => Ok(Self::Voided),
            other => Err(UnknownStatus(other.to_string())),
        }
    }
}

/// A receipt status name that is not one of [`Status`]'s.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("receipt status {0:?} is not pending, verified or voided")]
pub struct UnknownStatus(pub String);

/// One receipt as the app lists it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ReceiptRow {
    /// Receipt id (hex).
    pub id: String,
    /// forward or backward.
    pub kind: String,
    /// Model id.
    pub model_id: String,
    /// First layer.
    pub layer_start: u32,
    /// End of the layer range.
    pub layer_end: u32,
    /// Session id.
    pub session_id: String,
    /// First position.
    pub start_pos: u64,
    /// Tokens.
    pub tokens: u64,
    /// FLOPs.
    pub flops: u64,
    /// Requester node id.
    pub requester: NodeId,
    /// When the work was done, ms since the Unix epoch.
    pub created_ms: u64,
    /// Status.
    pub status: Status,
    /// Whether the requester re-executed the work.
    pub spot_checked: bool,
    /// The requester's reliability estimate when it countersigned.
    pub reliability: Option<f64>,
    /// Credit of the work (FLOPs times the requester's reliability estimate), counted as
    /// earned only when `vouched`.
    pub credit: f64,
    /// When the countersignature was stored.
    pub settled_ms: Option<u64>,
    /// For a void, the mismatch its evidence showed.
    pub evidence: Option<String>,
    /// Whether a trusted issuer vouches for its requester, so its credit counts as earned.
    pub vouched: bool,
}

/// Sums over verified receipts.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct Totals {
    /// Verified receipts.
    pub receipts: u64,
    /// Tokens they cover.
    pub tokens: u64,
    /// FLOPs.
    pub flops: u64,
    /// Credit earned: of the receipts a trusted issuer vouches for.
    pub credit: f64,
    /// Credit countersigned by requesters no trusted issuer vouches for: kept, not counted.
    pub unvouched: f64,
}

/// Totals of one model over the periods the app shows.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ModelTotals {
    /// Model id.
    pub model_id: String,
    /// Since the start of today.
    pub today: Totals,
    /// The last 7 days.
    pub week: Totals,
    /// Ever.
    pub lifetime: Totals,
}

/// Receipts per status.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct StatusCounts {
    /// Pending.
    pub pending: u64,
    /// Verified.
    pub verified: u64,
    /// Voided.
    pub voided: u64,
}

/// Work done in one bucket of a time series, for the app's chart.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct SeriesPoint {
    /// Start of the bucket, ms since the Unix epoch.
    pub start_ms: u64,
    /// Token positions computed (pending and verified receipts; voided work does not count).
    pub tokens: u64,
    /// Credit of the verified receipts a trusted issuer vouches for.
    pub credit: f64,
}

/// What settling one countersignature did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Settlement {
    /// Stored now.
    Stored,
    /// It was settled before (a resent batch): nothing changed.
    AlreadySettled,
}

/// The ledger of one node.
#[derive(Debug)]
pub struct Ledger {
    conn: Connection,
}

const MS_PER_DAY: u64 = 24 * 3600 * 1000;

impl Ledger {
    /// Opens (or creates) the ledger at `path`.
    pub fn open(path: &Path) -> Result<Self, LedgerError> {
        let conn = Connection::open(path).map_err(sql(format!("opening {}", path.display())))?;
        Self::setup(conn, true)
    }

    /// A ledger in memory, for nodes without a data directory.
    pub fn in_memory() -> Result<Self, LedgerError> {
        Self::setup(
            Connection::open_in_memory().map_err(sql("opening in memory"))?,
            false,
        )
    }

    fn setup(conn: Connection, wal: bool) -> Result<Self, LedgerError> {
        conn.busy_timeout(BUSY_TIMEOUT)
            .map_err(sql("setting the busy timeout"))?;
        let version: i64 = conn
            .query_row("PRAGMA user_version", [], |r| r.get(0))
            .map_err(|e| LedgerError::Schema(format!("the file is not a SQLite ledger ({e})")))?;
        if version > SCHEMA_VERSION {
            return Err(LedgerError::Schema(format!(
                "schema version {version} is newer than this build's {SCHEMA_VERSION}"
            )));
        }
        if wal {
            let mode: String = conn
                .query_row("PRAGMA journal_mode=WAL", [], |r| r.get(0))
                .map_err(sql("switching to WAL"))?;
            if mode != "wal" {
                return Err(LedgerError::Schema(format!(
                    "journal mode is {mode}, not wal"
                )));
            }
        }
        conn.execute_batch("PRAGMA synchronous=FULL; PRAGMA foreign_keys=ON;")
            .map_err(sql("setting pragmas"))?;
        Self::migrate(&conn, version)?;
        Ok(Self { conn })
    }

    /// Brings a ledger of `version` (0 for a new file) to [`SCHEMA_VERSION`] in one
    /// transaction, keeping every row. The transaction takes the write lock first and reads the
    /// version again, so of two processes opening an old ledger at once one migrates and the
    /// other finds it done.
    fn migrate(conn: &Connection, version: i64) -> Result<(), LedgerError> {
        if version == SCHEMA_VERSION {
            return Ok(());
        }
        conn.execute_batch("BEGIN IMMEDIATE")
            .map_err(sql("locking for the schema"))?;
        let migrated = (|| {
            let version: i64 = conn
                .query_row("PRAGMA user_version", [], |r| r.get(0))
                .map_err(sql("reading the schema version"))?;
            if version == SCHEMA_VERSION {
                return Ok(());
            }
            conn.execute_batch(SCHEMA)
                .map_err(sql("creating the schema"))?;
            if version < 2 {
                conn.execute_batch(MIGRATE_TO_2)
                    .map_err(sql("migrating to version 2"))?;
            }
            if version < 3 {
                conn.execute_batch(MIGRATE_TO_3)
                    .map_err(sql("migrating to version 3"))?;
            }
            conn.pragma_update(None, "user_version", SCHEMA_VERSION)
                .map_err(sql("writing the schema version"))
        })();
        let end = if migrated.is_ok() {
            "COMMIT"
        } else {
            "ROLLBACK"
        };
        conn.execute_batch(end)
            .map_err(sql("committing the schema"))?;
        migrated
    }

    /// Sets the issuers the owner trusts: receipts countersigned by them, or by holders of
    /// their passes, count as earned.
    pub fn set_issuers(&mut self, issuers: &[NodeId]) -> Result<(), LedgerError> {
        let tx = self.conn.transaction().map_err(sql("beginning"))?;
        tx.execute("DELETE FROM issuers", [])
            .map_err(sql("clearing the issuers"))?;
        for id in issuers {
            tx.execute(
                "INSERT OR IGNORE INTO issuers (id) VALUES (?1)",
                [id.to_string()],
            )
            .map_err(sql("storing an issuer"))?;
        }
        tx.commit().map_err(sql("committing the issuers"))
    }

    /// The issuers the owner trusts.
    pub fn issuers(&self) -> Result<Vec<NodeId>, LedgerError> {
        let mut stmt = self
            .conn
            .prepare_cached("SELECT id FROM issuers ORDER BY id")
            .map_err(sql("preparing the issuers"))?;
        let ids = stmt
            .query_map([], |r| r.get::<_, String>(0))
            .map_err(sql("reading the issuers"))?;
        ids.map(|id| {
            let id = id.map_err(sql("reading the issuers"))?;
            id.parse()
                .map_err(|e| LedgerError::Schema(format!("issuer {id}: {e}")))
        })
        .collect()
    }

    /// Records receipts this node signed, as pending (one transaction).
    pub fn record_issued(&mut self, receipts: &[Receipt]) -> Result<(), LedgerError> {
        let tx = self.conn.transaction().map_err(sql("beginning"))?;
        {
            let mut insert = tx
                .prepare_cached(
                    "INSERT OR IGNORE INTO receipts (id, kind, model_id, layer_start, layer_end,
                     session_id, start_pos, tokens, flops, requester, created_ms, status, receipt)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, 'pending', ?12)",
                )
                .map_err(sql("preparing the insert"))?;
            for receipt in receipts {
                let b = receipt.body();
                let requester = neuroshard_base::PublicKey(b.requester).id().to_string();
                insert
                    .execute(params![
                        receipt.id().to_string(),
                        b.kind.to_string(),
                        b.model_id,
                        b.layers.start,
                        b.layers.end,
                        b.session_id,
                        b.start_pos as i64,
                        b.tokens,
                        b.flops as i64,
                        requester,
                        b.replied_ms as i64,
                        receipt.to_wire(),
                    ])
                    .map_err(sql("recording a receipt"))?;
            }
        }
        tx.commit().map_err(sql("committing receipts"))
    }

    /// Stores countersignatures (checked by [`Countersignature::from_wire`]) in one durable
    /// transaction. A receipt settles once: a second countersignature of it changes nothing.
    /// `pass` (checked by [`CreditPass::from_wire`]) vouches for the countersignatures of its
    /// holder.
    pub fn settle(
        &mut self,
        batch: &[Countersignature],
        pass: Option<&CreditPass>,
        now_ms: u64,
    ) -> Result<Vec<Settlement>, LedgerError> {
        let issued: Vec<Receipt> = batch.iter().map(|cs| cs.receipt.clone()).collect();
        self.record_issued(&issued)?;
        let tx = self.conn.transaction().map_err(sql("beginning"))?;
        let mut out = Vec::with_capacity(batch.len());
        {
            let mut update = tx
                .prepare_cached(
                    "UPDATE receipts SET status = ?2, spot_checked = ?3, reliability = ?4,
                     credit = ?5, settled_ms = ?6, countersignature = ?7, evidence = ?8,
                     voucher = ?9
                     WHERE id = ?1 AND status = 'pending'",
                )
                .map_err(sql("preparing the update"))?;
            for cs in batch {
                let body = cs.receipt.body();
                let (status, checked, earned) = match &cs.verdict {
                    Verdict::Accepted { spot_checked } => (
                        Status::Verified,
                        *spot_checked,
                        credit(body.flops, cs.reliability),
                    ),
                    Verdict::Voided(_) => (Status::Voided, true, 0.0),
                };
                // Checked when it was read; a void that showed no mismatch never gets here.
                let evidence = cs.verdict.void_reason(&cs.receipt).unwrap_or_default();
                let voucher = pass
                    .filter(|p| p.holder().0 == body.requester)
                    .map(|p| p.issuer().to_string());
                let changed = update
                    .execute(params![
                        cs.receipt.id().to_string(),
                        status.as_str(),
                        checked,
                        cs.reliability as f64,
                        earned,
                        now_ms as i64,
                        cs.to_wire(),
                        evidence,
                        voucher,
                    ])
                    .map_err(sql("settling a receipt"))?;
                out.push(if changed == 1 {
                    Settlement::Stored
                } else {
                    Settlement::AlreadySettled
                });
            }
        }
        tx.commit().map_err(sql("committing settlements"))?;
        Ok(out)
    }

    /// Verified totals per model: since `day_start_ms`, over the 7 days before `now_ms`, and ever.
    /// Credit counts only vouched receipts; the rest is summed as unvouched.
    pub fn totals(&self, now_ms: u64, day_start_ms: u64) -> Result<Vec<ModelTotals>, LedgerError> {
        let week_start = now_ms.saturating_sub(7 * MS_PER_DAY);
        let period = |since: &str| {
            let when = |what: &str| format!("SUM(CASE WHEN created_ms >= {since} THEN {what} END)");
            [
                format!("SUM(created_ms >= {since})"),
                when("tokens"),
                when("flops"),
                when(&format!("CASE WHEN {VOUCHED} THEN credit END")),
                when(&format!("CASE WHEN NOT {VOUCHED} THEN credit END")),
            ]
            .join(", ")
        };
        let query = format!(
            "SELECT model_id, {}, {}, {} FROM receipts WHERE status = 'verified'
             GROUP BY model_id ORDER BY model_id",
            period("?1"),
            period("?2"),
            period("0")
        );
        let mut stmt = self
            .conn
            .prepare_cached(&query)
            .map_err(sql("preparing totals"))?;
        let totals = |r: &rusqlite::Row, at: usize| -> rusqlite::Result<Totals> {
            Ok(Totals {
                receipts: r.get::<_, Option<i64>>(at)?.unwrap_or(0) as u64,
                tokens: r.get::<_, Option<i64>>(at + 1)?.unwrap_or(0) as u64,
                flops: r.get::<_, Option<i64>>(at + 2)?.unwrap_or(0) as u64,
                credit: r.get::<_, Option<f64>>(at + 3)?.unwrap_or(0.0),
                unvouched: r.get::<_, Option<f64>>(at + 4)?.unwrap_or(0.0),
            })
        };
        let rows = stmt
            .query_map(params![day_start_ms as i64, week_start as i64], |r| {
                Ok(ModelTotals {
                    model_id: r.get(0)?,
                    today: totals(r, 1)?,
                    week: totals(r, 6)?,
                    lifetime: totals(r, 11)?,
                })
            })
            .map_err(sql("reading totals"))?;
        let mut all: Vec<ModelTotals> = rows
            .collect::<Result<_, _>>()
            .map_err(sql("reading totals"))?;
        self.add_rolled_up(&mut all)?;
        Ok(all)
    }

    /// `buckets` consecutive buckets of `bucket_ms` each, the first starting at `since_ms`; a
    /// bucket without work is there with zeros, so a chart's x axis is the bucket index.
    pub fn series(
        &self,
        since_ms: u64,
        bucket_ms: u64,
        buckets: usize,
    ) -> Result<Vec<SeriesPoint>, LedgerError> {
        let bucket_ms = bucket_ms.max(1);
        let mut points: Vec<SeriesPoint> = (0..buckets as u64)
            .map(|i| SeriesPoint {
                start_ms: since_ms + i * bucket_ms,
                ..SeriesPoint::default()
            })
            .collect();
        let mut stmt = self
            .conn
            .prepare_cached(&format!(
                "SELECT (created_ms - ?1) / ?2 AS bucket, SUM(tokens),
                       SUM(CASE WHEN status = 'verified' AND {VOUCHED} THEN credit ELSE 0 END)
                     FROM receipts WHERE created_ms >= ?1 AND status != 'voided'
                     GROUP BY bucket"
            ))
            .map_err(sql("preparing the series"))?;
        let rows = stmt
            .query_map(params![since_ms as i64, bucket_ms as i64], |r| {
                Ok((
                    r.get::<_, i64>(0)?,
                    r.get::<_, Option<i64>>(1)?.unwrap_or(0) as u64,
                    r.get::<_, Option<f64>>(2)?.unwrap_or(0.0),
                ))
            })
            .map_err(sql("reading the series"))?;
        for row in rows {
            let (bucket, tokens, credit) = row.map_err(sql("reading the series"))?;
            if let Some(point) = usize::try_from(bucket).ok().and_then(|b| points.get_mut(b)) {
                point.tokens = tokens;
                point.credit = credit;
            }
        }
        Ok(points)
    }

    /// Receipts per status.
    pub fn status_counts(&self) -> Result<StatusCounts, LedgerError> {
        let mut counts = StatusCounts::default();
        let mut stmt = self
            .conn
            .prepare_cached(
                "SELECT status, SUM(n) FROM (
                     SELECT status, COUNT(*) AS n FROM receipts GROUP BY status
                     UNION ALL SELECT status, SUM(receipts) FROM rollups GROUP BY status)
                 GROUP BY status",
            )
            .map_err(sql("preparing counts"))?;
        let rows = stmt
            .query_map([], |r| {
                Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)? as u64))
            })
            .map_err(sql("counting"))?;
        for row in rows {
            let (status, n) = row.map_err(sql("counting"))?;
            match Status::parse(&status) {
                Ok(Status::Pending) => counts.pending = n,
                Ok(Status::Verified) => counts.verified = n,
                Ok(Status::Voided) => counts.voided = n,
                Err(e) => return Err(LedgerError::Schema(e.to_string())),
            }
        }
        Ok(counts)
    }

    /// A page of receipts, newest first, optionally of one status.
    pub fn page(
        &self,
        status: Option<Status>,
        offset: u64,
        limit: u32,
    ) -> Result<Vec<ReceiptRow>, LedgerError> {
        let mut stmt = self
            .conn
            .prepare_cached(&format!(
                "SELECT {} FROM receipts WHERE (?1 IS NULL OR status = ?1)
                     ORDER BY created_ms DESC, id LIMIT ?2 OFFSET ?3",
                row_columns()
            ))
            .map_err(sql("preparing the page"))?;
        let rows = stmt
            .query_map(
                params![
                    status.map(Status::as_str),
                    limit.min(MAX_PAGE),
                    offset.min(i64::MAX as u64) as i64
                ],
                row_from_sql,
            )
            .map_err(sql("reading a page"))?;
        rows.collect::<Result<_, _>>()
            .map_err(sql("reading a page"))
    }

    /// The receipt with this id, if stored.
    pub fn get(&self, id: &str) -> Result<Option<ReceiptRow>, LedgerError> {
        self.conn
            .query_row(
                &format!("SELECT {} FROM receipts WHERE id = ?1", row_columns()),
                [id],
                row_from_sql,
            )
            .optional()
            .map_err(sql("reading a receipt"))
    }

    /// Every receipt, oldest first, as CSV with a header row.
    pub fn export_csv(&self, out: impl std::io::Write) -> Result<(), LedgerError> {
        let mut writer = csv::Writer::from_writer(out);
        for row in self.all()? {
            writer
                .serialize(row)
                .map_err(|e| LedgerError::Export(e.to_string()))?;
        }
        writer
            .flush()
            .map_err(|e| LedgerError::Export(e.to_string()))
    }

    /// Every receipt, oldest first, as a JSON array.
    pub fn export_json(&self, out: impl std::io::Write) -> Result<(), LedgerError> {
        serde_json::to_writer_pretty(out, &self.all()?)
            .map_err(|e| LedgerError::Export(e.to_string()))
    }

    fn all(&self) -> Result<Vec<ReceiptRow>, LedgerError> {
        let mut stmt = self
            .conn
            .prepare_cached(&format!(
                "SELECT {} FROM receipts ORDER BY created_ms, id",
                row_columns()
            ))
            .map_err(sql("preparing the export"))?;
        let rows = stmt.query_map([], row_from_sql).map_err(sql("exporting"))?;
        rows.collect::<Result<_, _>>().map_err(sql("exporting"))
    }

    /// SQLite's own consistency check: `Ok` when it answers "ok".
    pub fn integrity_check(&self) -> Result<(), LedgerError> {
        let answer: String = self
            .conn
            .query_row("PRAGMA integrity_check", [], |r| r.get(0))
            .map_err(sql("checking integrity"))?;
        if answer == "ok" {
            Ok(())
        } else {
            Err(LedgerError::Schema(format!("integrity check: {answer}")))
        }
    }
}

/// The columns [`row_from_sql`] reads, in its order.
fn row_columns() -> String {
    format!(
        "id, kind, model_id, layer_start, layer_end, session_id, start_pos, tokens, flops,
         requester, created_ms, status, spot_checked, reliability, credit, settled_ms, evidence,
         {VOUCHED}"
    )
}

fn row_from_sql(r: &rusqlite::Row) -> rusqlite::Result<ReceiptRow> {
    let status: String = r.get(11)?;
    let requester: String = r.get(9)?;
    let unreadable = |column, e: Box<dyn std::error::Error + Send + Sync>| {
        rusqlite::Error::FromSqlConversionFailure(column, rusqlite::types::Type::Text, e)
    };
    Ok(ReceiptRow {
        id: r.get(0)?,
        kind: r.get(1)?,
        model_id: r.get(2)?,
        layer_start: r.get(3)?,
        layer_end: r.get(4)?,
        session_id: r.get(5)?,
        start_pos: r.get::<_, i64>(6)? as u64,
        tokens: r.get::<_, i64>(7)? as u64,
        flops: r.get::<_, i64>(8)? as u64,
        requester: requester.parse().map_err(|e| unreadable(9, Box::new(e)))?,
        created_ms: r.get::<_, i64>(10)? as u64,
        status: Status::parse(&status).map_err(|e| unreadable(11, Box::new(e)))?,
        spot_checked: r.get(12)?,
        reliability: r.get(13)?,
        credit: r.get(14)?,
        settled_ms: r.get::<_, Option<i64>>(15)?.map(|v| v as u64),
        evidence: r.get(16)?,
        vouched: r.get(17)?,
    })
}

mod retention;

#[cfg(test)]
mod tests;
