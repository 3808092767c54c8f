//! Proof of Neural Work costs, as shares measured in one run.
//!
//! `receipt/per_hop` is everything a receipt adds to one decode hop of the demo model (width
//! 512): the worker fingerprints and hashes its output and signs; the requester checks the
//! signature, hashes and fields and countersigns; the worker checks the countersignature. It is
//! set against the wall time of one hop of a decode step through a 3-node demo swarm.
//!
//! The spot-check figures time 24-token generations through the same swarm with no
//! re-execution, with the policy's floor rate (5 %, where a peer with a long valid streak
//! settles), and with every hop re-executed (a new peer's probation), interleaved in rounds.

use std::time::{Duration, Instant};

use criterion::{Criterion, criterion_group};
use neuroshard_base::{LayerRange, NodeKey};
use neuroshard_benches::{activations, start_bench_swarm, write_temp_model};
use neuroshard_client::generate::{Pipeline, generate};
use neuroshard_client::{ClientConfig, SwarmClient};
use neuroshard_model::codec::{WireDType, encode};
use neuroshard_model::init::ModelSpec;
use neuroshard_net::convert::tensor_hash;
use neuroshard_proof::{
    Countersignature, Expectation, Fingerprint, Receipt, ReceiptBody, Verdict, WorkKind,
};

const PROMPT_LEN: usize = 16;
const NEW_TOKENS: usize = 24;

fn receipt_body(
    worker: &NodeKey,
    requester: &NodeKey,
    row: &[f32],
    output_hash: [u8; 32],
) -> ReceiptBody {
    ReceiptBody {
        version: neuroshard_proof::receipt::BODY_VERSION,
        kind: WorkKind::Forward,
        worker: worker.public().0,
        requester: requester.public().0,
        model_id: "0123456789abcdef".into(),
        weights_hash: [3; 32],
        layers: LayerRange::new(2, 4).unwrap(),
        session_id: "0123456789abcdef-0".into(),
        start_pos: 40,
        tokens: 1,
        flops: 80_000_000,
        input_hash: [4; 32],
        output_hash,
        fingerprint: Fingerprint::of(row),
        nonce: [5; 16],
        received_ms: 1_000,
        replied_ms: 1_007,
    }
}

/// Per hop: time a receipt adds on the hop's path, and off it (countersigning and settling).
fn receipt_cost(c: &mut Criterion) -> (Duration, Duration) {
    let (worker, requester) = (NodeKey::generate(), NodeKey::generate());
    let row = activations(512);
    let wire = encode(&row, &[1, 1, 512], WireDType::F16);
    let expected = Expectation {
        worker_id: worker.id(),
        kind: WorkKind::Forward,
        requester: requester.public(),
        nonce: [5; 16],
        model_id: "0123456789abcdef".into(),
        layers: LayerRange::new(2, 4).unwrap(),
        session_id: "0123456789abcdef-0".into(),
        start_pos: 40,
        tokens: 1,
        input_hash: [4; 32],
        output_hash: tensor_hash(&wire),
        weights_hash: Some([3; 32]),
        flops: 80_000_000,
        sent_ms: 1_000,
        now_ms: 1_010,
    };
    // On the hop's path: the worker fingerprints, hashes and signs; the requester checks.
    let on_path = || {
        let receipt = receipt_body(&worker, &requester, &row, tensor_hash(&wire)).sign(&worker);
        let got = Receipt::from_wire(&receipt.to_wire()).unwrap();
        let mut check = expected.clone();
        check.output_hash = tensor_hash(&wire);
        check.check(&got).unwrap();
        got
    };
    // Off the path, in batches of 64: countersigning, and the worker's check before storing.
    let receipts: Vec<Receipt> = (0..64).map(|_| on_path()).collect();
    let settle = || {
        let batch: Vec<Vec<u8>> = receipts
            .iter()
            .map(|r| {
                r.countersign(
                    &requester,
                    Verdict::Accepted {
                        spot_checked: false,
                    },
                    1.0,
                    2_000,
                )
                .to_wire()
            })
            .collect();
        let checked = Countersignature::from_wire_batch(&batch, &worker.public());
        assert!(checked.iter().all(|c| c.is_ok()));
    };
    let mut group = c.benchmark_group("receipt");
    group.bench_function("on_path", |b| b.iter(on_path));
    group.bench_function("settle_64", |b| b.iter(settle));
    group.finish();
    let time = |f: &dyn Fn(), n: u32| {
        let started = Instant::now();
        for _ in 0..n {
            f();
        }
        started.elapsed() / n
    };
    let on = time(&|| drop(std::hint::black_box(on_path())), 400);
    let off = time(&settle, 10) / 64;
    (on, off)
}

fn proof_costs(c: &mut Criterion) {
    let (on_path, settle) = receipt_cost(c);
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let dir = write_temp_model(&ModelSpec::demo());
    let swarm = runtime.block_on(start_bench_swarm(dir.path(), &[(0, 2), (2, 4), (4, 6)]));
    let prompt: Vec<u32> = (0..PROMPT_LEN as u32).map(|i| 65 + i % 26).collect();
    let client = |probation: u64, verify: bool| {
        let mut config = ClientConfig::new(swarm.tracker.url());
        config.router.spot_checks.probation = probation;
        if verify {
            config.verify_with = Some(dir.path().to_path_buf());
        }
        runtime.block_on(SwarmClient::connect(config)).unwrap()
    };
    // Probation 0: the floor rate from the first hop. Probation MAX: every hop re-executed.
    let clients = [client(0, false), client(0, true), client(u64::MAX, true)];

    // One decode hop's wall time: a decode step at a fixed position, over three hops.
    let mut session = clients[0].session();
    runtime.block_on(session.step(0, &prompt)).unwrap();
    let started = Instant::now();
    for _ in 0..40 {
        runtime.block_on(session.step(PROMPT_LEN, &[66])).unwrap();
    }
    let per_hop = started.elapsed() / 40 / 3;
    runtime.block_on(session.close());
    let share = |d: Duration| 100.0 * d.as_secs_f64() / per_hop.as_secs_f64();
    println!(
        "receipt per decode hop of {:.2} ms: on the path {:.1} µs ({:.2} %), settling off the path {:.1} µs ({:.2} %), together {:.2} %",
        per_hop.as_secs_f64() * 1e3,
        on_path.as_secs_f64() * 1e6,
        share(on_path),
        settle.as_secs_f64() * 1e6,
        share(settle),
        share(on_path + settle)
    );

    let mut totals = [Duration::ZERO; 3];
    for _ in 0..4 {
        for (client, total) in clients.iter().zip(&mut totals) {
            let mut session = client.session();
            let started = Instant::now();
            runtime
                .block_on(generate(&mut session, &prompt, NEW_TOKENS, &[], |_, _| {}))
                .unwrap();
            *total += started.elapsed();
            runtime.block_on(session.close());
        }
    }
    let share = |t: Duration| 100.0 * (t.as_secs_f64() / totals[0].as_secs_f64() - 1.0);
    println!(
        "spot checks, {NEW_TOKENS}-token generations after a {PROMPT_LEN}-token prompt, 4 interleaved rounds: \
         none {:.0} ms; floor rate (5 %) +{:.1} %; every hop (probation) +{:.1} %",
        totals[0].as_secs_f64() * 1000.0 / 4.0,
        share(totals[1]),
        share(totals[2])
    );
    runtime.block_on(swarm.shutdown());
}

criterion_group!(benches, proof_costs);

fn main() {
    benches();
    Criterion::default().configure_from_args().final_summary();
}
