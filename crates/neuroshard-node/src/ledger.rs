//! The ledger actor: one thread owns the SQLite connection; the node talks to it through a
//! bounded channel. Pending receipts are batched into one transaction; settling replies only
//! after its transaction is durable.

use neuroshard_proof::{Countersignature, CreditPass, Ledger, LedgerError, Receipt, Settlement};
use tokio::sync::{mpsc, oneshot};

use neuroshard_net::NodeError;

/// Commands queued at most. 4096 pending receipts cover seconds of decode traffic; beyond
/// that a receipt is not recorded as pending (it is still stored when countersigned).
const LEDGER_QUEUE: usize = 4096;

/// Pending receipts written per transaction at most.
const ISSUE_BATCH: usize = 256;

type ReadFn = Box<dyn FnOnce(&Ledger) + Send>;

enum Command {
    Issued(Box<Receipt>),
    Settle(
        Vec<Countersignature>,
        Option<CreditPass>,
        oneshot::Sender<Result<Vec<Settlement>, LedgerError>>,
    ),
    Read(ReadFn),
}

/// A cheap handle to the ledger thread.
#[derive(Debug, Clone)]
pub struct LedgerHandle {
    tx: mpsc::Sender<Command>,
}

impl LedgerHandle {
    /// Moves `ledger` onto its own thread; it ends when every handle is dropped. With a
    /// `retention` of days, settled receipts older than that are rolled up into daily totals
    /// at start and every few hours after ([`Ledger::prune`]).
    pub fn spawn(ledger: Ledger, retention: Option<u32>) -> Result<Self, NodeError> {
        let (tx, rx) = mpsc::channel(LEDGER_QUEUE);
        std::thread::Builder::new()
            .name("ledger".into())
            .spawn(move || run(ledger, rx, retention))
            .map_err(|e| NodeError::io("starting the ledger thread", e))?;
        Ok(Self { tx })
    }

    /// Records a receipt this node signed, as pending, without waiting.
    pub fn issued(&self, receipt: Receipt) {
        if self
            .tx
            .try_send(Command::Issued(Box::new(receipt)))
            .is_err()
        {
            tracing::warn!("ledger queue full; a receipt is not recorded until countersigned");
        }
    }

    /// Stores countersignatures, vouched for by `pass` where its holder signed them; returns
    /// once they are durable.
    pub async fn settle(
        &self,
        batch: Vec<Countersignature>,
        pass: Option<CreditPass>,
    ) -> Result<Vec<Settlement>, NodeError> {
        let (reply, answer) = oneshot::channel();
        self.send(Command::Settle(batch, pass, reply)).await?;
        Ok(answer.await.map_err(|_| NodeError::ShuttingDown)??)
    }

    /// Runs a read on the ledger thread (after every write queued before it).
    pub async fn read<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Ledger) -> Result<T, LedgerError> + Send + 'static,
    ) -> Result<T, NodeError> {
        let (reply, answer) = oneshot::channel();
        self.send(Command::Read(Box::new(move |ledger| {
            let _ = reply.send(f(ledger));
        })))
        .await?;
        Ok(answer.await.map_err(|_| NodeError::ShuttingDown)??)
    }

    async fn send(&self, command: Command) -> Result<(), NodeError> {
        self.tx
            .send(command)
            .await
            .map_err(|_| NodeError::ShuttingDown)
    }
}

/// How often the ledger thread rolls up receipts past the retention.
const PRUNE_EVERY: std::time::Duration = std::time::Duration::from_secs(6 * 3600);

/// Rolls up the receipts settled more than `days` ago.
fn prune(ledger: &mut Ledger, days: u32) {
    let before = neuroshard_net::now_ms().saturating_sub(u64::from(days) * 24 * 3600 * 1000);
    match ledger.prune(before) {
        Ok(0) => {}
        Ok(n) => tracing::info!("rolled {n} receipts older than {days} days into daily totals"),
        Err(e) => tracing::error!("pruning the ledger failed: {e}"),
    }
}

/// The thread: batch pending receipts, answer settles and reads in queue order, and prune.
fn run(mut ledger: Ledger, mut rx: mpsc::Receiver<Command>, retention: Option<u32>) {
    let mut batch = Vec::new();
    let mut pruned = std::time::Instant::now();
    if let Some(days) = retention {
        prune(&mut ledger, days);
    }
    while let Some(command) = rx.blocking_recv() {
        if let Some(days) = retention.filter(|_| pruned.elapsed() >= PRUNE_EVERY) {
            prune(&mut ledger, days);
            pruned = std::time::Instant::now();
        }
        let mut next = Some(command);
        while let Some(Command::Issued(receipt)) = next {
            batch.push(*receipt);
            next = if batch.len() < ISSUE_BATCH {
                rx.try_recv().ok()
            } else {
                None
            };
        }
        if !batch.is_empty() {
            if let Err(e) = ledger.record_issued(&batch) {
                tracing::error!("recording {} receipts failed: {e}", batch.len());
            }
            batch.clear();
        }
        match next {
            Some(Command::Settle(items, pass, reply)) => {
                let now = neuroshard_net::now_ms();
                let _ = reply.send(ledger.settle(&items, pass.as_ref(), now));
            }
            Some(Command::Read(f)) => f(&ledger),
            Some(Command::Issued(_)) | None => {}
        }
    }
}
