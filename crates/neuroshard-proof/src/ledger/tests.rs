use super::*;
use crate::pass::PassBody;
use crate::receipt::tests::{body, void};
use neuroshard_base::NodeKey;

fn receipt(w: &NodeKey, r: &NodeKey, nonce: u8, at: u64) -> Receipt {
    let mut b = body(w, r, nonce);
    b.received_ms = at;
    b.replied_ms = at;
    b.sign(w)
}

#[test]
fn settles_once_and_sums_by_period_and_status() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ledger.sqlite");
    let (w, r) = (NodeKey::generate(), NodeKey::generate());
    let now = 100 * MS_PER_DAY;
    let today = receipt(&w, &r, 1, now - 1000);
    let last_week = receipt(&w, &r, 2, now - 3 * MS_PER_DAY);
    let long_ago = receipt(&w, &r, 3, now - 30 * MS_PER_DAY);
    let cheated = receipt(&w, &r, 4, now - 500);
    let unsettled = receipt(&w, &r, 5, now - 400);
    {
        let mut ledger = Ledger::open(&path).unwrap();
        ledger.set_issuers(&[r.id()]).unwrap();
        ledger
            .record_issued(&[today.clone(), unsettled.clone(), cheated.clone()])
            .unwrap();
        let accept = |rc: &Receipt| {
            rc.countersign(
                &r,
                Verdict::Accepted {
                    spot_checked: false,
                },
                1.0,
                now,
            )
        };
        let batch = vec![
            accept(&today),
            accept(&last_week),
            accept(&long_ago),
            cheated.countersign(&r, void(), 0.2, now),
        ];
        assert_eq!(
            ledger.settle(&batch, None, now).unwrap(),
            vec![Settlement::Stored; 4]
        );
        assert_eq!(
            ledger.settle(&batch[..1], None, now).unwrap(),
            vec![Settlement::AlreadySettled]
        );
    }
    let ledger = Ledger::open(&path).unwrap();
    ledger.integrity_check().unwrap();
    assert_eq!(
        ledger.status_counts().unwrap(),
        StatusCounts {
            pending: 1,
            verified: 3,
            voided: 1
        }
    );
    let totals = ledger.totals(now, now - 3600 * 1000).unwrap();
    assert_eq!(totals.len(), 1);
    let t = &totals[0];
    assert_eq!(
        (t.today.receipts, t.week.receipts, t.lifetime.receipts),
        (1, 2, 3)
    );
    assert_eq!(t.lifetime.flops, 3_000_000);
    assert!((t.lifetime.credit - 0.003).abs() < 1e-12);
    let per_receipt = t.lifetime.tokens / 3;
    let series = ledger.series(now - 4 * MS_PER_DAY, MS_PER_DAY, 4).unwrap();
    let tokens: Vec<u64> = series.iter().map(|p| p.tokens).collect();
    assert_eq!(
        tokens,
        [0, per_receipt, 0, 2 * per_receipt],
        "pending work counts, voided work does not"
    );
    assert!(
        (series[3].credit - 0.001).abs() < 1e-12,
        "only verified credit"
    );
    assert_eq!(series[2].start_ms, now - 2 * MS_PER_DAY);
    let voided = ledger.page(Some(Status::Voided), 0, 10).unwrap();
    assert_eq!(voided.len(), 1);
    assert_eq!(voided[0].id, cheated.id().to_string());
    assert_eq!(voided[0].credit, 0.0);
    let evidence = voided[0].evidence.as_deref().unwrap();
    assert!(evidence.contains("receipt's fingerprint"), "{evidence}");
    let page = ledger.page(None, 1, 2).unwrap();
    assert_eq!(page.len(), 2);
    assert_eq!(
        page[0].id,
        cheated.id().to_string(),
        "newest first, after skipping one"
    );
    let mut csv = Vec::new();
    ledger.export_csv(&mut csv).unwrap();
    let csv = String::from_utf8(csv).unwrap();
    assert_eq!(csv.lines().count(), 6);
    assert!(csv.starts_with("id,kind,model_id"));
    let mut json = Vec::new();
    ledger.export_json(&mut json).unwrap();
    let parsed: serde_json::Value = serde_json::from_slice(&json).unwrap();
    assert_eq!(parsed.as_array().unwrap().len(), 5);
}

#[test]
fn a_file_that_is_not_a_ledger_is_refused_and_kept() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ledger.sqlite");
    std::fs::write(&path, b"this is not a database at all, just some text").unwrap();
    let err = Ledger::open(&path).unwrap_err();
    assert!(err.to_string().contains("not a SQLite ledger"), "{err}");
    assert_eq!(
        std::fs::read(&path).unwrap(),
        b"this is not a database at all, just some text"
    );
}

/// A worker that countersigns its own receipts under fresh keys keeps them, but they earn
/// nothing shown: only a trusted issuer, or a holder of its pass, adds to the credit.
#[test]
fn only_requesters_a_trusted_issuer_vouches_for_earn_shown_credit() {
    let mut ledger = Ledger::in_memory().unwrap();
    let (worker, issuer, gateway) = (
        NodeKey::generate(),
        NodeKey::generate(),
        NodeKey::generate(),
    );
    let now = 100 * MS_PER_DAY;
    ledger.set_issuers(&[issuer.id()]).unwrap();
    let accept = |requester: &NodeKey, nonce: u8| {
        receipt(&worker, requester, nonce, now - 1000).countersign(
            requester,
            Verdict::Accepted {
                spot_checked: false,
            },
            1.0,
            now,
        )
    };
    // Ten throwaway keys of the worker's own, and one that shows a pass for someone else.
    let sybils: Vec<Countersignature> = (0..10).map(|n| accept(&NodeKey::generate(), n)).collect();
    ledger.settle(&sybils, None, now).unwrap();
    let other = NodeKey::generate();
    let stolen = PassBody::new(&issuer, other.public(), now - 1, 1).sign(&issuer);
    ledger
        .settle(&[accept(&NodeKey::generate(), 20)], Some(&stolen), now)
        .unwrap();
    let shown = |l: &Ledger| l.totals(now, 0).unwrap()[0].lifetime;
    let t = shown(&ledger);
    assert_eq!((t.receipts, t.credit), (11, 0.0), "{t:?}");
    assert!((t.unvouched - 0.011).abs() < 1e-12, "{t:?}");
    // The issuer's own countersignature, and one from the holder of its pass, count.
    let pass = PassBody::new(&issuer, gateway.public(), now - 1, 1).sign(&issuer);
    ledger.settle(&[accept(&issuer, 30)], None, now).unwrap();
    ledger
        .settle(&[accept(&gateway, 31)], Some(&pass), now)
        .unwrap();
    let t = shown(&ledger);
    assert_eq!(t.receipts, 13);
    assert!((t.credit - 0.002).abs() < 1e-12, "{t:?}");
    let series = ledger.series(now - MS_PER_DAY, MS_PER_DAY, 1).unwrap();
    assert!((series[0].credit - 0.002).abs() < 1e-12, "{series:?}");
    let rows = ledger.page(None, 0, 100).unwrap();
    assert_eq!(rows.iter().filter(|r| r.vouched).count(), 2);
    // Trusting no issuer shows nothing as earned; the rows stay.
    ledger.set_issuers(&[]).unwrap();
    assert_eq!(shown(&ledger).credit, 0.0);
    assert_eq!(ledger.issuers().unwrap(), vec![]);
}

/// A ledger written by the first schema opens with every row kept and settles on.
#[test]
fn a_version_1_ledger_is_migrated_with_its_rows() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ledger.sqlite");
    let (w, r) = (NodeKey::generate(), NodeKey::generate());
    let pending = receipt(&w, &r, 1, 5000);
    {
        let conn = Connection::open(&path).unwrap();
        conn.execute_batch(SCHEMA).unwrap();
        conn.pragma_update(None, "user_version", 1).unwrap();
        conn.execute(
            "INSERT INTO receipts (id, kind, model_id, layer_start, layer_end, session_id,
             start_pos, tokens, flops, requester, created_ms, status, receipt)
             VALUES (?1, 'forward', 'm1', 2, 4, 's', 10, 1, 1000000, ?2, 5000, 'pending', ?3)",
            params![
                pending.id().to_string(),
                r.id().to_string(),
                pending.to_wire()
            ],
        )
        .unwrap();
    }
    let mut ledger = Ledger::open(&path).unwrap();
    assert_eq!(ledger.status_counts().unwrap().pending, 1);
    ledger.set_issuers(&[r.id()]).unwrap();
    let cs = pending.countersign(&r, Verdict::Accepted { spot_checked: true }, 1.0, 6000);
    assert_eq!(
        ledger.settle(&[cs], None, 6000).unwrap(),
        vec![Settlement::Stored]
    );
    assert!(ledger.totals(6000, 0).unwrap()[0].lifetime.credit > 0.0);
    let version: i64 = ledger
        .conn
        .query_row("PRAGMA user_version", [], |r| r.get(0))
        .unwrap();
    assert_eq!(version, SCHEMA_VERSION);
}

#[test]
fn pruning_rolls_old_receipts_up_and_keeps_every_total() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ledger.sqlite");
    let (w, r) = (NodeKey::generate(), NodeKey::generate());
    let now = 400 * MS_PER_DAY;
    let old: Vec<Receipt> = (0..20u8)
        .map(|i| receipt(&w, &r, i, now - (100 + u64::from(i % 4)) * MS_PER_DAY))
        .collect();
    let recent = receipt(&w, &r, 50, now - 1000);
    let old_pending = receipt(&w, &r, 51, now - 200 * MS_PER_DAY);
    let mut ledger = Ledger::open(&path).unwrap();
    ledger.set_issuers(&[r.id()]).unwrap();
    ledger
        .record_issued(std::slice::from_ref(&old_pending))
        .unwrap();
    let accept = |rc: &Receipt| {
        let verdict = Verdict::Accepted {
            spot_checked: false,
        };
        rc.countersign(&r, verdict, 1.0, now)
    };
    let mut batch: Vec<_> = old.iter().map(accept).collect();
    batch.push(accept(&recent));
    batch.push(old[0].countersign(&r, void(), 0.5, now));
    ledger.settle(&batch, None, now).unwrap();
    let before = (
        ledger.totals(now, now - 3600 * 1000).unwrap(),
        ledger.status_counts().unwrap(),
    );

    // Everything from before 90 days ago goes, the receipt never countersigned too; the
    // recent one stays.
    assert_eq!(ledger.prune(now - 90 * MS_PER_DAY).unwrap(), 21);
    let after = (
        ledger.totals(now, now - 3600 * 1000).unwrap(),
        ledger.status_counts().unwrap(),
    );
    assert_eq!(after, before, "totals and counts are kept");
    assert_eq!(ledger.page(None, 0, MAX_PAGE).unwrap().len(), 1);
    assert!(ledger.get(&old_pending.id().to_string()).unwrap().is_none());
    // Pruning again moves nothing, and a reopened ledger reads the same.
    assert_eq!(ledger.prune(now - 90 * MS_PER_DAY).unwrap(), 0);
    drop(ledger);
    let ledger = Ledger::open(&path).unwrap();
    assert_eq!(ledger.totals(now, now - 3600 * 1000).unwrap(), before.0);
    ledger.integrity_check().unwrap();
}
