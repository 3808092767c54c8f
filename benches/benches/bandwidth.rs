//! The transport's bandwidth caps: bytes through a capped stream against the cap, and the same
//! stream uncapped, in one run. `capped_*` comes out at the cap plus the limiter's first burst
//! (a hundredth of a second's worth, taken again by the fresh 256 KB stream of every
//! iteration: one run measured 1.03x the cap at 1000 KB/s and 1.16x at 4000 KB/s); `uncapped` shows the limiter off costs nothing against the
//! cap. This is the throughput floor the caps test used to assert; timing belongs here.

use std::time::Duration;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use neuroshard_net::bandwidth::{BandwidthCaps, Throttled};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Bytes written per iteration.
const BYTES: usize = 256 * 1000;

/// Writes [`BYTES`] through a stream capped at `kbps` (0: none) to a reader that drains it.
async fn write_through(kbps: u32) {
    let (a, mut b) = tokio::io::duplex(1 << 20);
    let mut a = Throttled::new(a, BandwidthCaps::new(kbps, 0));
    let reader = tokio::spawn(async move {
        let mut sink = Vec::with_capacity(BYTES);
        b.read_to_end(&mut sink).await.map(|_| sink.len())
    });
    a.write_all(&vec![7u8; BYTES]).await.unwrap();
    a.shutdown().await.unwrap();
    assert_eq!(reader.await.unwrap().unwrap(), BYTES);
}

fn caps(c: &mut Criterion) {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let mut group = c.benchmark_group("bandwidth");
    group
        .throughput(Throughput::Bytes(BYTES as u64))
        .sample_size(10)
        .measurement_time(Duration::from_secs(10));
    for kbps in [1000, 4000] {
        group.bench_function(format!("capped_{kbps}kbps"), |b| {
            b.iter(|| runtime.block_on(write_through(kbps)))
        });
    }
    group.bench_function("uncapped", |b| {
        b.iter(|| runtime.block_on(write_through(0)))
    });
    group.finish();
}

criterion_group!(benches, caps);
criterion_main!(benches);
