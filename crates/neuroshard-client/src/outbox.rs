//! The receipt outbox: countersigned receipts on their way back to their workers.
//!
//! One task batches countersignatures per worker and sends them with `SubmitReceipts` when a
//! batch fills, on a timer, or when asked to flush. A batch that fails is retried on the next
//! rounds and given up after a few, counted as undelivered. Every batch shows the client's credit
//! pass, if it holds one, so its countersignatures count as earned where the issuer is trusted.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use neuroshard_proof::{Countersignature, CreditPass};
use neuroshard_proto as pb;
use tokio::sync::{mpsc, oneshot};

use neuroshard_net::pool::{ConnectionPool, Target};

/// Countersignatures queued at most before pushing waits.
const OUTBOX_QUEUE: usize = 4096;

/// Countersignatures per SubmitReceipts call: a few KiB each, so a call stays well under a
/// megabyte.
const OUTBOX_BATCH: usize = 64;

/// Longest a countersignature waits before it is sent. 250 ms: receipts reach the worker's
/// ledger while the user still watches the generation.
const OUTBOX_INTERVAL: Duration = Duration::from_millis(250);

/// Rounds a failing batch is retried before it is given up.
const OUTBOX_ATTEMPTS: u32 = 5;

/// Deadline of one SubmitReceipts call.
const SUBMIT_TIMEOUT: Duration = Duration::from_secs(10);

/// What the outbox has delivered since it started.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize)]
pub struct OutboxReport {
    /// Stored by their workers.
    pub stored: u64,
    /// Already stored before (a resent batch).
    pub already_settled: u64,
    /// Refused by workers, with their reasons.
    pub rejected: Vec<String>,
    /// Given up after repeated failures.
    pub undelivered: u64,
    /// Why a worker last refused the client's credit pass (its receipts then count there as
    /// unvouched); none while every worker took it.
    pub pass_refused: Option<String>,
}

enum Command {
    Push(Target, Box<Countersignature>),
    Flush(oneshot::Sender<OutboxReport>),
}

/// A cheap handle to the outbox task.
#[derive(Debug, Clone)]
pub struct ReceiptOutbox {
    tx: mpsc::Sender<Command>,
}

struct Pending {
    items: Vec<Countersignature>,
    failures: u32,
}

impl ReceiptOutbox {
    /// Starts the outbox task; it ends when every handle is dropped, after a last flush.
    pub fn spawn(pool: Arc<ConnectionPool>, pass: Option<&CreditPass>) -> Self {
        let (tx, rx) = mpsc::channel(OUTBOX_QUEUE);
        let pass = pass.map(CreditPass::to_wire).unwrap_or_default();
        tokio::spawn(run(Courier { pool, pass }, rx));
        Self { tx }
    }

    /// Queues a countersignature for the worker at `addr`.
    pub async fn push(&self, addr: &Target, cs: Countersignature) {
        let _ = self
            .tx
            .send(Command::Push(addr.clone(), Box::new(cs)))
            .await;
    }

    /// Sends everything queued and reports the totals so far.
    pub async fn flush(&self) -> OutboxReport {
        let (reply, answer) = oneshot::channel();
        if self.tx.send(Command::Flush(reply)).await.is_err() {
            return OutboxReport::default();
        }
        answer.await.unwrap_or_default()
    }
}

/// What sends a batch: the pool, and the credit pass shown with every batch (empty for none).
struct Courier {
    pool: Arc<ConnectionPool>,
    pass: Vec<u8>,
}

/// The task: one `select!` over commands and the send timer.
async fn run(pool: Courier, mut rx: mpsc::Receiver<Command>) {
    let mut queues: HashMap<Target, Pending> = HashMap::new();
    let mut report = OutboxReport::default();
    let mut tick = tokio::time::interval(OUTBOX_INTERVAL);
    loop {
        tokio::select! {
            command = rx.recv() => match command {
                Some(Command::Push(addr, cs)) => {
                    let queue = queues.entry(addr.clone()).or_insert(Pending { items: Vec::new(), failures: 0 });
                    queue.items.push(*cs);
                    if queue.items.len() >= OUTBOX_BATCH {
                        send(&pool, &addr, queue, &mut report).await;
                    }
                }
                Some(Command::Flush(reply)) => {
                    send_all(&pool, &mut queues, &mut report).await;
                    let _ = reply.send(report.clone());
                }
                None => {
                    send_all(&pool, &mut queues, &mut report).await;
                    return;
                }
            },
            _ = tick.tick() => send_all(&pool, &mut queues, &mut report).await,
        }
    }
}

async fn send_all(
    pool: &Courier,
    queues: &mut HashMap<Target, Pending>,
    report: &mut OutboxReport,
) {
    for (addr, queue) in queues.iter_mut() {
        send(pool, addr, queue, report).await;
    }
    queues.retain(|_, q| !q.items.is_empty());
}

/// Sends `queue` to `addr` in batches; keeps what failed for a later round.
async fn send(courier: &Courier, addr: &Target, queue: &mut Pending, report: &mut OutboxReport) {
    while !queue.items.is_empty() {
        let n = queue.items.len().min(OUTBOX_BATCH);
        let request = pb::SubmitReceiptsRequest {
            countersigned: queue.items[..n].iter().map(|cs| cs.to_wire()).collect(),
            pass: courier.pass.clone(),
        };
        let pool = &courier.pool;
        let reply = async {
            let mut pooled = pool.control_client(addr).await.map_err(|e| e.to_string())?;
            pooled
                .client
                .submit_receipts(request)
                .await
                .map_err(|s| s.message().to_string())
        };
        match tokio::time::timeout(SUBMIT_TIMEOUT, reply).await {
            Ok(Ok(reply)) => {
                let reply = reply.into_inner();
                report.stored += reply.stored as u64;
                report.already_settled += reply.already_settled as u64;
                report.rejected.extend(reply.rejected);
                if !reply.pass_refused.is_empty()
                    && report.pass_refused.as_deref() != Some(&reply.pass_refused)
                {
                    tracing::warn!(%addr, "the worker refused this client's credit pass: {}", reply.pass_refused);
                    report.pass_refused = Some(reply.pass_refused);
                }
                queue.items.drain(..n);
                queue.failures = 0;
            }
            failed => {
                queue.failures += 1;
                let why = match failed {
                    Ok(Err(e)) => e,
                    _ => "timed out".into(),
                };
                if queue.failures >= OUTBOX_ATTEMPTS {
                    tracing::warn!(%addr, "giving up {} countersigned receipts: {why}", queue.items.len());
                    report.undelivered += queue.items.len() as u64;
                    queue.items.clear();
                }
                return;
            }
        }
    }
}
