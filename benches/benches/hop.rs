//! Per-hop Forward overhead on loopback, beside codec-only time.
//!
//! `rpc_overhead` is the wall time of a Forward call minus the compute time the node reports:
//! client and server codec, protobuf, HTTP/2 and loopback TCP. `codec_only` is the tensor
//! codec's share: encoding and decoding the request tensor and the reply tensor. `memcpy` copies
//! the same fp16 payloads twice, the floor any codec is measured against.

use std::sync::Arc;
use std::time::Duration;

use criterion::{Criterion, criterion_group, criterion_main};
use neuroshard_base::LayerRange;
use neuroshard_benches::{
    activations, forward_overhead, hidden_request, hop_model_spec, start_bench_node,
    write_temp_model,
};
use neuroshard_model::codec::{WireDType, decode, encode};
use neuroshard_net::metrics::Metrics;
use neuroshard_net::pool::{ConnectionPool, PoolConfig};

fn hop_overhead(c: &mut Criterion) {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let dir = write_temp_model(&hop_model_spec());
    let hidden = hop_model_spec().hidden;
    let middle = LayerRange::new(1, 2).unwrap();
    let node = runtime.block_on(start_bench_node(dir.path(), 1, 2));
    // The client's own connection pool, so the channel is configured as in a swarm.
    let dialler = neuroshard_net::tls::Dialler::ephemeral().unwrap();
    let pool = ConnectionPool::new(PoolConfig::default(), Arc::new(Metrics::default()), dialler);
    let to = neuroshard_net::pool::Target::node(node.advertised(), node.id());
    let mut pooled = runtime.block_on(pool.client(&to)).unwrap();
    let client = &mut pooled.client;
    // A 16-token history so the decode step attends over a real cache.
    runtime
        .block_on(client.forward(hidden_request("decode", 0, middle, 16, hidden)))
        .unwrap();

    let mut group = c.benchmark_group("hop");
    group
        .sample_size(30)
        .measurement_time(Duration::from_secs(8));
    for (name, session, pos, tokens) in [
        ("decode_1x2048_f16", "decode", 16, 1),
        ("prefill_512x2048_f16", "prefill", 0, 512),
    ] {
        let request = hidden_request(session, pos, middle, tokens, hidden);
        group.bench_function(format!("{name}/rpc_overhead"), |b| {
            b.iter_custom(|iters| runtime.block_on(forward_overhead(client, &request, iters)))
        });
        let values = activations(tokens * hidden);
        let shape = [1, tokens, hidden];
        let payload = vec![1u8; tokens * hidden * 2];
        group.bench_function(format!("{name}/memcpy"), |b| {
            b.iter(|| {
                for _ in 0..2 {
                    std::hint::black_box(std::hint::black_box(&payload).clone());
                }
            })
        });
        group.bench_function(format!("{name}/codec_only"), |b| {
            b.iter(|| {
                for _ in 0..2 {
                    let wire = encode(&values, &shape, WireDType::F16);
                    std::hint::black_box(decode(&wire).unwrap());
                }
            })
        });
    }
    group.finish();
    runtime.block_on(node.shutdown());
}

criterion_group!(benches, hop_overhead);
criterion_main!(benches);
