//! Swarm decode throughput against the same model in one process, as a ratio from one run.
//!
//! The model (`ModelSpec::bench`, 6 layers of width 1536) needs well over 20 ms of compute per
//! token on a 2-core CPU. Each measured step decodes one token at a fixed position after a
//! 32-token prompt (nodes cut their cache back to that position, so every step does the same
//! work). Local and swarm steps are interleaved in rounds so machine noise hits both alike.

use std::time::{Duration, Instant};

use criterion::{Criterion, criterion_group};
use neuroshard_benches::{start_bench_swarm, write_temp_model};
use neuroshard_client::generate::{LocalPipeline, Pipeline};
use neuroshard_client::{ClientConfig, SwarmClient};
use neuroshard_model::init::ModelSpec;

const PROMPT_LEN: usize = 32;

fn swarm_vs_local(c: &mut Criterion) {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let dir = write_temp_model(&ModelSpec::bench());
    let prompt: Vec<u32> = (0..PROMPT_LEN as u32).map(|i| 65 + i % 26).collect();
    let swarm = runtime.block_on(start_bench_swarm(dir.path(), &[(0, 2), (2, 4), (4, 6)]));
    let client = runtime
        .block_on(SwarmClient::connect(ClientConfig::new(swarm.tracker.url())))
        .unwrap();
    let mut session = client.session();
    let mut local = LocalPipeline::load(dir.path()).unwrap();
    runtime.block_on(async {
        local.step(0, &prompt).await.unwrap();
        session.step(0, &prompt).await.unwrap();
    });

    let mut group = c.benchmark_group("decode_token");
    group
        .sample_size(10)
        .measurement_time(Duration::from_secs(10));
    group.bench_function("local", |b| {
        b.iter(|| runtime.block_on(local.step(PROMPT_LEN, &[66])).unwrap())
    });
    group.bench_function("swarm_3_nodes", |b| {
        b.iter(|| runtime.block_on(session.step(PROMPT_LEN, &[66])).unwrap())
    });
    group.finish();

    let (mut local_time, mut swarm_time) = (Duration::ZERO, Duration::ZERO);
    for _ in 0..5 {
        for _ in 0..4 {
            let started = Instant::now();
            runtime.block_on(local.step(PROMPT_LEN, &[66])).unwrap();
            local_time += started.elapsed();
            let started = Instant::now();
            runtime.block_on(session.step(PROMPT_LEN, &[66])).unwrap();
            swarm_time += started.elapsed();
        }
    }
    let per_token_ms = local_time.as_secs_f64() * 1000.0 / 20.0;
    println!(
        "swarm/local tokens per second: {:.3} (local {:.1} ms/token, swarm {:.1} ms/token, 20 interleaved steps each)",
        local_time.as_secs_f64() / swarm_time.as_secs_f64(),
        per_token_ms,
        swarm_time.as_secs_f64() * 1000.0 / 20.0
    );
    runtime.block_on(async {
        session.close().await;
        swarm.shutdown().await;
    });
}

criterion_group!(benches, swarm_vs_local);

fn main() {
    benches();
    Criterion::default().configure_from_args().final_summary();
}
