//! Training through the swarm against one process, and what DiLoCo's replicas send.
//!
//! - **Throughput.** One inner step (2 microbatches of 64 tokens, forward, backward, AdamW) of
//!   a 4-layer model with hidden size 256, split over two loopback nodes driven by a
//!   `TrainSession`, against the same step on one `TrainShard` holding every layer. Both run
//!   in the same process on the same cores; the ratio of their tokens per second is printed.
//! - **Layout.** `neuroshard train`'s 2 stages × 2 replicas (four loopback nodes, outer rounds
//!   included) of that model against one process taking the same number of inner steps on the
//!   same number of tokens.
//! - **Traffic.** `neuroshard train`'s 2 stages × 2 replicas for 100 steps (an outer round
//!   every 20), with top-k 10 % and with dense pseudo-gradients: bytes per outer sync against
//!   dense data-parallel all-reduce of the same 20 steps, and the two runs against each other.

use criterion::{Criterion, criterion_group, criterion_main};
use neuroshard_client::{ClientConfig, Microbatch, SwarmClient};
use neuroshard_model::codec::WireDType;
use neuroshard_model::init::{ModelSpec, write_model};
use neuroshard_model::{Device, ShardInput, TrainConfig, TrainShard};
use neuroshard_node::node::{Compression, NodeConfig, TrainingConfig};
use neuroshard_node::swarm::LocalSwarm;
use neuroshard_node::train::{TrainOptions, run_training};

const SEQUENCE: usize = 64;
const BATCH: usize = 2;

fn spec() -> ModelSpec {
    ModelSpec {
        hidden: 256,
        intermediate: 704,
        layers: 4,
        heads: 8,
        kv_heads: 4,
        max_positions: 512,
        vocab: neuroshard_model::BYTE_VOCAB,
        tie_embeddings: false,
        dtype: WireDType::F32,
        files: 1,
        seed: 3,
    }
}

fn batch(step: usize) -> Vec<Microbatch> {
    let ids: Vec<u32> = neuroshard_train::CORPUS.bytes().map(u32::from).collect();
    (0..BATCH)
        .map(|i| {
            let start = (step * 131 + i * 977) % (ids.len() - SEQUENCE - 1);
            Microbatch::from_window(&ids[start..start + SEQUENCE + 1])
        })
        .collect()
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap()
}

fn local_step(shard: &mut TrainShard, batch: &[Microbatch]) {
    for (i, mb) in batch.iter().enumerate() {
        let id = i.to_string();
        shard
            .forward(
                &id,
                ShardInput::Tokens(mb.inputs.clone()),
                Some(&mb.targets),
            )
            .unwrap();
        shard.backward(&id, None).unwrap();
    }
    shard.step().unwrap();
}

fn throughput(c: &mut Criterion) {
    let rt = runtime();
    let dir = tempfile::tempdir().unwrap();
    write_model(dir.path(), &spec()).unwrap();
    let mut local =
        TrainShard::load(dir.path(), 0..4, &Device::default(), TrainConfig::default()).unwrap();
    let swarm = rt.block_on(async {
        let mut swarm = LocalSwarm::tracker_only().await.unwrap();
        for (start, end) in [(0, 2), (2, 4)] {
            let train = |config: &mut NodeConfig| {
                config.train = Some(TrainingConfig {
                    outer_every: u64::MAX,
                    ..TrainingConfig::default()
                })
            };
            swarm
                .add_node_with(dir.path(), start, end, train)
                .await
                .unwrap();
        }
        swarm
    });
    let client = rt
        .block_on(SwarmClient::connect(ClientConfig::new(swarm.tracker.url())))
        .unwrap();
    let chain = swarm.nodes.iter().map(|n| n.hop()).collect();
    let mut session = client.train_session(chain).unwrap();
    // Warm both up (the nodes load their trainable copies on the first call).
    rt.block_on(session.step(&batch(0))).unwrap();
    local_step(&mut local, &batch(0));

    let steps = 8;
    let tokens = (steps * BATCH * SEQUENCE) as f64;
    let started = std::time::Instant::now();
    for s in 0..steps {
        local_step(&mut local, &batch(s));
    }
    let local_rate = tokens / started.elapsed().as_secs_f64();
    let started = std::time::Instant::now();
    for s in 0..steps {
        rt.block_on(session.step(&batch(s))).unwrap();
    }
    let swarm_rate = tokens / started.elapsed().as_secs_f64();
    println!(
        "training/tokens_per_s: swarm (2 loopback stages) {swarm_rate:.0}, one process \
         {local_rate:.0}, ratio {:.2}",
        swarm_rate / local_rate
    );

    let mut group = c.benchmark_group("training");
    group.sample_size(10);
    let mut n = 0;
    group.bench_function("local_step_2x64_tokens", |b| {
        b.iter(|| {
            n += 1;
            local_step(&mut local, &batch(n))
        })
    });
    group.bench_function("swarm_step_2x64_tokens", |b| {
        b.iter(|| {
            n += 1;
            rt.block_on(session.step(&batch(n))).unwrap()
        })
    });
    group.finish();
    drop(session);
    rt.block_on(swarm.shutdown());
}

fn layout(_: &mut Criterion) {
    let rt = runtime();
    let dir = tempfile::tempdir().unwrap();
    write_model(dir.path(), &spec()).unwrap();
    let steps = 40;
    let options = TrainOptions {
        steps,
        batch: BATCH,
        sequence: SEQUENCE,
        model_dir: Some(dir.path().to_path_buf()),
        ..TrainOptions::default()
    };
    let report = rt.block_on(run_training(options, |_| {})).unwrap();
    let mut local =
        TrainShard::load(dir.path(), 0..4, &Device::default(), TrainConfig::default()).unwrap();
    local_step(&mut local, &batch(0));
    let started = std::time::Instant::now();
    for s in 0..2 * steps {
        local_step(&mut local, &batch(s));
    }
    let local_rate = (2 * steps * BATCH * SEQUENCE) as f64 / started.elapsed().as_secs_f64();
    println!(
        "training/tokens_per_s: 2 stages × 2 replicas (4 loopback nodes, {} outer rounds) {:.0}, \
         one process taking the same steps {local_rate:.0}, ratio {:.2}",
        report.outer_rounds,
        report.tokens_per_second(),
        report.tokens_per_second() / local_rate
    );
}

fn traffic(_: &mut Criterion) {
    let rt = runtime();
    let mut per_sync = Vec::new();
    for compression in [Compression::TopK(0.1), Compression::Dense] {
        let options = TrainOptions {
            steps: 100,
            outer_every: 20,
            compression,
            ..TrainOptions::default()
        };
        let report = rt.block_on(run_training(options, |_| {})).unwrap();
        let rounds = report.outer_rounds.max(1) as f64;
        let sent = report.exchange_bytes as f64 / rounds;
        let dense = report.dense_allreduce_bytes as f64 / rounds;
        println!(
            "training/traffic {compression:?}: {sent:.0} bytes per outer sync of {} parameters \
             (2 replicas × 2 stages, {rounds} rounds); dense all-reduce of the same 20 steps \
             {dense:.0} ({:.0}x); loss {:.3} -> {:.3}",
            report.parameters,
            dense / sent,
            report.losses[0],
            report.losses[report.losses.len() - 1],
        );
        per_sync.push(sent);
    }
    println!(
        "training/traffic: DiLoCo without compression sends {:.1}x the bytes of top-k 10 %",
        per_sync[1] / per_sync[0]
    );
}

criterion_group!(benches, throughput, layout, traffic);
criterion_main!(benches);
