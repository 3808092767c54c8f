//! Retention: settled receipts past the owner's retention leave their rows for daily totals,
//! which every total keeps counting.

use rusqlite::params;

use super::{Ledger, LedgerError, MS_PER_DAY, ModelTotals, Totals, VOUCHED, sql};

impl Ledger {
    /// Rolls the receipts created before `before_ms` up into per-day totals and deletes their
    /// rows, in one transaction; returns how many rows went. Lifetime totals and status counts
    /// keep them (their vouching as it stood when rolled up); the page, the export and the
    /// chart list only rows kept. A receipt still pending then was never countersigned and is
    /// rolled up as pending, so a caller that never settles cannot grow the ledger either.
    pub fn prune(&mut self, before_ms: u64) -> Result<usize, LedgerError> {
        let tx = self.conn.transaction().map_err(sql("starting a prune"))?;
        tx.execute(
            &format!(
                "INSERT INTO rollups (day_ms, model_id, status, vouched, receipts, tokens, flops,
                                      credit)
                 SELECT created_ms / {MS_PER_DAY} * {MS_PER_DAY}, model_id, status, {VOUCHED},
                        COUNT(*), SUM(tokens), SUM(flops), SUM(credit)
                 FROM receipts WHERE created_ms < ?1
                 GROUP BY 1, 2, 3, 4
                 ON CONFLICT (day_ms, model_id, status, vouched) DO UPDATE SET
                     receipts = receipts + excluded.receipts, tokens = tokens + excluded.tokens,
                     flops = flops + excluded.flops, credit = credit + excluded.credit"
            ),
            params![before_ms as i64],
        )
        .map_err(sql("rolling up old receipts"))?;
        let gone = tx
            .execute(
                "DELETE FROM receipts WHERE created_ms < ?1",
                params![before_ms as i64],
            )
            .map_err(sql("pruning old receipts"))?;
        tx.commit().map_err(sql("committing a prune"))?;
        Ok(gone)
    }

    /// The verified totals of rolled-up receipts, per model.
    pub(super) fn rolled_up(&self) -> Result<Vec<(String, Totals)>, LedgerError> {
        let mut stmt = self
            .conn
            .prepare_cached(
                "SELECT model_id, SUM(receipts), SUM(tokens), SUM(flops),
                        SUM(CASE WHEN vouched THEN credit END),
                        SUM(CASE WHEN NOT vouched THEN credit END)
                 FROM rollups WHERE status = 'verified' GROUP BY model_id",
            )
            .map_err(sql("preparing rolled-up totals"))?;
        let rows = stmt
            .query_map([], |r| {
                Ok((
                    r.get::<_, String>(0)?,
                    Totals {
                        receipts: r.get::<_, Option<i64>>(1)?.unwrap_or(0) as u64,
                        tokens: r.get::<_, Option<i64>>(2)?.unwrap_or(0) as u64,
                        flops: r.get::<_, Option<i64>>(3)?.unwrap_or(0) as u64,
                        credit: r.get::<_, Option<f64>>(4)?.unwrap_or(0.0),
                        unvouched: r.get::<_, Option<f64>>(5)?.unwrap_or(0.0),
                    },
                ))
            })
            .map_err(sql("reading rolled-up totals"))?;
        rows.collect::<Result<_, _>>()
            .map_err(sql("reading rolled-up totals"))
    }

    /// Adds the rolled-up receipts to the lifetime totals in `all`, models in order.
    pub(super) fn add_rolled_up(&self, all: &mut Vec<ModelTotals>) -> Result<(), LedgerError> {
        for (model_id, old) in self.rolled_up()? {
            let at = match all.iter().position(|t| t.model_id == model_id) {
                Some(at) => at,
                None => {
                    all.push(ModelTotals {
                        model_id,
                        today: Totals::default(),
                        week: Totals::default(),
                        lifetime: Totals::default(),
                    });
                    all.len() - 1
                }
            };
            let life = &mut all[at].lifetime;
            life.receipts += old.receipts;
            life.tokens += old.tokens;
            life.flops += old.flops;
            life.credit += old.credit;
            life.unvouched += old.unvouched;
        }
        all.sort_by(|a, b| a.model_id.cmp(&b.model_id));
        Ok(())
    }
}
