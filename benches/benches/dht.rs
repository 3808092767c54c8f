//! DHT latency at 64 real nodes on loopback: p50 and p99 of puts and gets, each a full iterative
//! lookup over gRPC (a put then stores at the k = 20 closest). Requests go one at a time, so the
//! figures are latencies, not queueing. Prints a table; `cargo bench -p neuroshard-benches
//! --bench dht`.

use std::time::{Duration, Instant};

use neuroshard_base::{LayerRange, NodeKey};
use neuroshard_benches::write_temp_model;
use neuroshard_dht::{Record, RecordKey};
use neuroshard_model::init::ModelSpec;
use neuroshard_node::node::{NodeConfig, NodeHandle, start_node};
use rand::{Rng, SeedableRng};

/// Nodes in the swarm: the figure.
const NODES: usize = 64;
/// Records put, each from a random node.
const PUTS: usize = 200;
/// Gets, each from a random node, of a random record put before.
const GETS: usize = 1000;

fn percentile(sorted: &[Duration], p: f64) -> f64 {
    let i = ((sorted.len() - 1) as f64 * p).round() as usize;
    sorted[i].as_secs_f64() * 1000.0
}

fn report(what: &str, mut times: Vec<Duration>) {
    times.sort();
    println!(
        "{what:<4} {:>6} {:>9.2} {:>9.2}",
        times.len(),
        percentile(&times, 0.5),
        percentile(&times, 0.99)
    );
}

fn main() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(async {
        let model = write_temp_model(&ModelSpec::tiny());
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let mut nodes: Vec<NodeHandle> = Vec::new();
        for i in 0..NODES {
            let layer = (i % 4) as u32;
            let mut config =
                NodeConfig::new(model.path(), LayerRange::new(layer, layer + 1).unwrap());
            if i > 0 {
                config.bootstrap = vec![nodes[rng.random_range(0..i)].advertised().to_string()];
            }
            nodes.push(start_node(config).await.expect("node starts"));
        }
        for node in &nodes {
            let mut announced = node.discovery().announced();
            announced.wait_for(|a| a.rounds > 0).await.unwrap();
        }
        futures::future::join_all(nodes.iter().map(|n| n.announce())).await;

        let owner = NodeKey::generate();
        let expires_ms = neuroshard_net::now_ms() + 3_600_000;
        let mut puts = Vec::new();
        for i in 0..PUTS {
            let key = RecordKey::Checkpoint(format!("bench-{i}"));
            let record = Record::sign(key, vec![1; 200], expires_ms, &owner).unwrap();
            let node = &nodes[rng.random_range(0..NODES)];
            let started = Instant::now();
            let outcome = node.discovery().dht().put(record).await.unwrap();
            puts.push(started.elapsed());
            assert_eq!(outcome.stored, 20, "a put reaches k peers");
        }
        let mut gets = Vec::new();
        for _ in 0..GETS {
            let key = RecordKey::Checkpoint(format!("bench-{}", rng.random_range(0..PUTS)));
            let node = &nodes[rng.random_range(0..NODES)];
            let started = Instant::now();
            let outcome = node.discovery().dht().get(key).await.unwrap();
            gets.push(started.elapsed());
            assert_eq!(outcome.records.len(), 1, "every get finds its record");
        }
        println!("DHT at {NODES} loopback nodes (ms)");
        println!("{:<4} {:>6} {:>9} {:>9}", "op", "count", "p50", "p99");
        report("put", puts);
        report("get", gets);
        for node in nodes {
            node.shutdown().await;
        }
    });
}
