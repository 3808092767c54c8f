//! Upload and download caps on every byte a node's server sends or receives.
//!
//! Each accepted connection is wrapped in [`Throttled`], which asks a shared GCRA limiter
//! (governor) for an allowance before each read or write and moves at most that many bytes, so
//! Forward traffic, receipts and pings all count, and nothing is read ahead of the cap. The caps
//! live in [`BandwidthCaps`] and can be changed while connections are open.

use neuroshard_base::sync::RwLockExt;
use std::future::Future;
use std::num::NonZeroU32;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::task::{Context, Poll, ready};

use governor::clock::Clock;
use governor::{DefaultDirectRateLimiter, Quota};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::Sleep;

/// Bytes asked for at once while a cap is set: small, so a cap holds within a few KB even over
/// a short window.
const CHUNK_BYTES: u32 = 4 * 1024;

/// Burst a limiter allows, as a fraction of a second of its rate: 10 ms, so a wake-up from a
/// 1 ms timer finds enough allowance for several chunks and fast caps are reached.
const BURST_DIVISOR: u32 = 100;

/// The node's upload and download caps (`None` is no cap), the bytes its transport has moved,
/// and the transfer budget those bytes count against.
#[derive(Debug)]
pub struct BandwidthCaps {
    upload: RwLock<Option<Arc<DefaultDirectRateLimiter>>>,
    download: RwLock<Option<Arc<DefaultDirectRateLimiter>>>,
    kbps: RwLock<(u32, u32)>,
    moved: AtomicU64,
    /// Most bytes `moved` may reach before new work is refused; `u64::MAX` for no budget.
    budget: AtomicU64,
}

impl Default for BandwidthCaps {
    fn default() -> Self {
        Self {
            upload: RwLock::default(),
            download: RwLock::default(),
            kbps: RwLock::default(),
            moved: AtomicU64::new(0),
            budget: AtomicU64::new(u64::MAX),
        }
    }
}

impl BandwidthCaps {
    /// Caps in KB/s (1 KB = 1000 bytes); 0 for none.
    pub fn new(upload_kbps: u32, download_kbps: u32) -> Arc<Self> {
        let caps = Arc::new(Self::default());
        caps.set(upload_kbps, download_kbps);
        caps
    }

    /// Replaces both caps; open connections follow from their next read or write.
    pub fn set(&self, upload_kbps: u32, download_kbps: u32) {
        *self.upload.write_or_recover() = limiter(upload_kbps);
        *self.download.write_or_recover() = limiter(download_kbps);
        *self.kbps.write_or_recover() = (upload_kbps, download_kbps);
    }

    /// The caps in force, KB/s (upload, download); 0 for none.
    pub fn kbps(&self) -> (u32, u32) {
        *self.kbps.read_or_recover()
    }

    /// Bytes the transport has sent and received, both ways, since the node started.
    pub fn moved(&self) -> u64 {
        self.moved.load(Ordering::Relaxed)
    }

    /// Sets the transfer budget: new work is refused once [`BandwidthCaps::moved`] reaches
    /// `bytes`; `None` lifts it.
    pub fn set_budget(&self, bytes: Option<u64>) {
        self.budget
            .store(bytes.unwrap_or(u64::MAX), Ordering::Relaxed);
    }

    /// Ok while the budget has room; the figures once it is used up.
    pub fn check_budget(&self) -> Result<(), crate::NodeError> {
        let (used, budget) = (self.moved(), self.budget.load(Ordering::Relaxed));
        if used >= budget {
            return Err(crate::NodeError::TransferCap { used, budget });
        }
        Ok(())
    }

    /// Bytes left in the budget; `None` without one.
    pub fn budget_left(&self) -> Option<u64> {
        let budget = self.budget.load(Ordering::Relaxed);
        (budget != u64::MAX).then(|| budget.saturating_sub(self.moved()))
    }

    fn count(&self, bytes: usize) {
        self.moved.fetch_add(bytes as u64, Ordering::Relaxed);
    }

    fn upload(&self) -> Option<Arc<DefaultDirectRateLimiter>> {
        self.upload.read_or_recover().clone()
    }

    fn download(&self) -> Option<Arc<DefaultDirectRateLimiter>> {
        self.download.read_or_recover().clone()
    }
}

fn limiter(kbps: u32) -> Option<Arc<DefaultDirectRateLimiter>> {
    let rate = NonZeroU32::new(kbps.saturating_mul(1000))?;
    let burst = (rate.get() / BURST_DIVISOR).max(CHUNK_BYTES);
    let quota = Quota::per_second(rate).allow_burst(NonZeroU32::new(burst).expect("positive"));
    Some(Arc::new(DefaultDirectRateLimiter::direct(quota)))
}

/// Allowance of one direction of one connection: bytes already paid for, and the wait for more.
#[derive(Default)]
struct Allowance {
    credit: usize,
    wait: Option<Pin<Box<Sleep>>>,
}

impl Allowance {
    /// How many of `want` bytes may move now: all of them without a cap, else the credit,
    /// buying a chunk from `limiter` first when there is none (waiting while it says so).
    fn poll(
        &mut self,
        limiter: Option<Arc<DefaultDirectRateLimiter>>,
        want: usize,
        cx: &mut Context<'_>,
    ) -> Poll<usize> {
        let Some(limiter) = limiter else {
            return Poll::Ready(want);
        };
        while self.credit == 0 && want > 0 {
            if let Some(wait) = &mut self.wait {
                ready!(wait.as_mut().poll(cx));
                self.wait = None;
            }
            let chunk = NonZeroU32::new(CHUNK_BYTES).expect("positive");
            match limiter.check_n(chunk) {
                Ok(Ok(())) | Err(_) => self.credit = CHUNK_BYTES as usize,
                Ok(Err(not_until)) => {
                    let delay = not_until.wait_time_from(limiter.clock().now());
                    self.wait = Some(Box::pin(tokio::time::sleep(delay)));
                }
            }
        }
        Poll::Ready(want.min(self.credit))
    }

    fn spend(&mut self, bytes: usize) {
        self.credit = self.credit.saturating_sub(bytes);
    }
}

/// A connection whose reads and writes keep to the node's caps.
pub struct Throttled<S> {
    inner: S,
    caps: Arc<BandwidthCaps>,
    up: Allowance,
    down: Allowance,
}

impl<S> Throttled<S> {
    /// Wraps `inner` under `caps`.
    pub fn new(inner: S, caps: Arc<BandwidthCaps>) -> Self {
        Self {
            inner,
            caps,
            up: Allowance::default(),
            down: Allowance::default(),
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Throttled<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        let allowed = ready!(this.down.poll(this.caps.download(), buf.remaining(), cx));
        let mut part = ReadBuf::new(buf.initialize_unfilled_to(allowed));
        ready!(Pin::new(&mut this.inner).poll_read(cx, &mut part))?;
        let read = part.filled().len();
        buf.advance(read);
        this.down.spend(read);
        this.caps.count(read);
        Poll::Ready(Ok(()))
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Throttled<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let this = self.get_mut();
        let allowed = ready!(this.up.poll(this.caps.upload(), buf.len(), cx));
        let written = ready!(Pin::new(&mut this.inner).poll_write(cx, &buf[..allowed]))?;
        this.up.spend(written);
        this.caps.count(written);
        Poll::Ready(Ok(written))
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

impl<S: tonic::transport::server::Connected> tonic::transport::server::Connected for Throttled<S> {
    type ConnectInfo = S::ConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.inner.connect_info()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn writes_keep_to_the_upload_cap() {
        let caps = BandwidthCaps::new(100, 0);
        let (a, mut b) = tokio::io::duplex(1 << 20);
        let mut a = Throttled::new(a, caps);
        let reader = tokio::spawn(async move {
            let mut sink = Vec::new();
            b.read_to_end(&mut sink).await.map(|_| sink.len())
        });
        let started = std::time::Instant::now();
        a.write_all(&vec![7u8; 50_000]).await.unwrap();
        a.shutdown().await.unwrap();
        let elapsed = started.elapsed().as_secs_f64();
        assert_eq!(reader.await.unwrap().unwrap(), 50_000);
        // 50 kB at 100 kB/s, less the first 4 KiB burst: at least 0.45 s.
        assert!(elapsed >= 0.45, "{elapsed}");
    }
}
