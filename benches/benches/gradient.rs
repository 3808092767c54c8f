//! The pseudo-gradient codec's throughput per core: top-k (10 %) with error feedback and the
//! wire encoding, on the pseudo-gradient of 4 M parameters (16 MB of fp32, about one layer of a
//! 1B model), single-threaded; and the decode on the receiving side. Criterion reports MB/s of
//! dense fp32 input. The encoded size against the dense form is printed once.

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use neuroshard_train::sparse::{Sparse, TopK};
use rand::{Rng, SeedableRng};

const PARAMS: usize = 4 << 20;

fn codec(c: &mut Criterion) {
    let mut rng = rand::rngs::StdRng::seed_from_u64(11);
    let delta: Vec<f32> = (0..PARAMS)
        .map(|_| rng.random_range(-1e-3f32..1e-3))
        .collect();
    let mut topk = TopK::new(PARAMS, TopK::DEFAULT_FRACTION).unwrap();
    let sample = topk.compress(&delta).unwrap();
    let wire = sample.encode();
    println!(
        "gradient/size: {} bytes encoded vs {} dense fp32 ({:.1}x smaller) and {} dense fp16",
        wire.len(),
        sample.dense_bytes(),
        sample.dense_bytes() as f64 / wire.len() as f64,
        PARAMS * 2
    );
    let mut group = c.benchmark_group("gradient");
    group
        .sample_size(10)
        .throughput(Throughput::Bytes((PARAMS * 4) as u64));
    group.bench_function("topk10_compress_and_encode", |b| {
        b.iter(|| std::hint::black_box(topk.compress(&delta).unwrap().encode()))
    });
    group.bench_function("decode_and_densify", |b| {
        b.iter(|| std::hint::black_box(Sparse::decode(&wire, PARAMS as u64).unwrap().to_dense()))
    });
    group.finish();
}

criterion_group!(benches, codec);
criterion_main!(benches);
