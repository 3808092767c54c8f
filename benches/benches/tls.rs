//! The cost of TLS bound to node keys (`neuroshard_net::tls`), on in-memory streams so only the
//! cryptography and framing are timed.
//!
//! - `tls/handshake`: a full mutual handshake (two certificates checked, node keys read back)
//!   with fresh certificates made once, as a node reuses its own.
//! - `tls/decode_4KiB/{tls,plain}`: one decode step's hidden state (2,048 fp16 values) written
//!   and read back once connected, through TLS and through the bare stream; their difference
//!   is what TLS adds to a hop per direction.

use std::time::{Duration, Instant};

use criterion::{Criterion, criterion_group, criterion_main};
use neuroshard_base::NodeKey;
use neuroshard_net::tls::{TlsIdentity, accept, client_config, connect, server_config};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

const DECODE_BYTES: usize = 4096;

/// Writes `payload` on `near` and reads it on `far`, `iters` times; the wall time.
async fn one_way<A, B>(near: &mut A, far: &mut B, payload: &[u8], iters: u64) -> Duration
where
    A: AsyncWrite + Unpin,
    B: AsyncRead + Unpin,
{
    let mut got = vec![0u8; payload.len()];
    let started = Instant::now();
    for _ in 0..iters {
        near.write_all(payload).await.unwrap();
        near.flush().await.unwrap();
        far.read_exact(&mut got).await.unwrap();
    }
    started.elapsed()
}

fn tls(c: &mut Criterion) {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let (a, b) = (NodeKey::generate(), NodeKey::generate());
    let server = server_config(&TlsIdentity::new(&a).unwrap()).unwrap();
    let client = client_config(&TlsIdentity::new(&b).unwrap(), Some(a.id())).unwrap();
    let handshake = || async {
        let (near, far) = tokio::io::duplex(64 * 1024);
        let (dialled, accepted) =
            tokio::join!(connect(near, client.clone()), accept(far, server.clone()));
        (dialled.unwrap().0, accepted.unwrap().0)
    };

    let mut group = c.benchmark_group("tls");
    group
        .sample_size(30)
        .measurement_time(Duration::from_secs(5));
    group.bench_function("handshake", |bench| {
        bench.iter(|| runtime.block_on(handshake()))
    });
    let payload = vec![0x3cu8; DECODE_BYTES];
    let (mut dialled, mut accepted) = runtime.block_on(handshake());
    group.bench_function("decode_4KiB/tls", |bench| {
        bench.iter_custom(|iters| {
            runtime.block_on(one_way(&mut dialled, &mut accepted, &payload, iters))
        })
    });
    let (mut near, mut far) = tokio::io::duplex(64 * 1024);
    group.bench_function("decode_4KiB/plain", |bench| {
        bench.iter_custom(|iters| runtime.block_on(one_way(&mut near, &mut far, &payload, iters)))
    });
    group.finish();
}

criterion_group!(benches, tls);
criterion_main!(benches);
