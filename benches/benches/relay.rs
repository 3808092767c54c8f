//! A hop through a relay against the same hop direct, on loopback, and the time from a node's
//! start until it is reachable by each path tried here.
//!
//! One node serves the middle layer of the hop model; it registers with a relay (uncapped) and
//! keeps its own port open, so the same node is called both ways in one run. `rpc_overhead` is
//! a Forward's wall time less the compute the node reports: for the relayed path it adds the
//! relay's two extra loopback legs, the splice and the end-to-end encryption. The prefill call
//! carries 2 MiB of fp16 each way, so its overhead is the path's throughput.
//!
//! `reachable/*` starts nodes whose self-test takes each path (`direct`: a peer dials its own
//! address back; `relayed`: registered with a relay and dialed back through it) and reports
//! the time the test took, from the node's `Reachability::took_ms`. The mapped (UPnP) path
//! needs a router: the NAT lab test prints its figure.

use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{Criterion, criterion_group, criterion_main};
use neuroshard_base::LayerRange;
use neuroshard_benches::{
    bench_config, forward_overhead, hidden_request, hop_model_spec, write_temp_model,
};
use neuroshard_nat::relay::{Relay, RelayConfig};
use neuroshard_net::metrics::Metrics;
use neuroshard_net::pool::{ConnectionPool, PoolConfig};
use neuroshard_node::node::start_node;
use neuroshard_node::reach::{NatMode, ReachConfig, ReachPath};
use tokio_util::sync::CancellationToken;

fn relayed_hop(c: &mut Criterion) {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let dir = write_temp_model(&hop_model_spec());
    let hidden = hop_model_spec().hidden;
    let middle = LayerRange::new(1, 2).unwrap();
    let cancel = CancellationToken::new();
    let uncapped = RelayConfig {
        kbps: 0,
        ..RelayConfig::default()
    };
    let relay = runtime
        .block_on(Relay::start(
            "127.0.0.1:0".parse().unwrap(),
            uncapped,
            cancel.clone(),
        ))
        .unwrap();
    let mut config = bench_config(dir.path(), 1, 2);
    config.reach = ReachConfig {
        mode: NatMode::Relay,
        relay: Some(relay.addr().to_string()),
        ..ReachConfig::default()
    };
    let node = runtime.block_on(start_node(config)).expect("node starts");
    assert_eq!(node.reachability().borrow().path, ReachPath::Relayed);
    let dialler = neuroshard_net::tls::Dialler::ephemeral().unwrap();
    let pool = ConnectionPool::new(PoolConfig::default(), Arc::new(Metrics::default()), dialler);
    let paths = [
        ("direct", node.addr().to_string()),
        ("relayed", node.advertised()),
    ];

    let mut group = c.benchmark_group("relay");
    group
        .sample_size(30)
        .measurement_time(Duration::from_secs(8));
    for (path, addr) in &paths {
        let to = neuroshard_net::pool::Target::node(addr.as_str(), node.id());
        let mut pooled = runtime.block_on(pool.client(&to)).unwrap();
        let client = &mut pooled.client;
        let session = format!("{path}-decode");
        runtime
            .block_on(client.forward(hidden_request(&session, 0, middle, 16, hidden)))
            .unwrap();
        for (name, session, pos, tokens) in [
            ("decode_1x2048_f16", session.as_str(), 16, 1),
            ("prefill_512x2048_f16", "prefill", 0, 512),
        ] {
            let request = hidden_request(session, pos, middle, tokens, hidden);
            group.bench_function(format!("{name}/{path}/rpc_overhead"), |b| {
                b.iter_custom(|iters| runtime.block_on(forward_overhead(client, &request, iters)))
            });
        }
    }
    group.finish();

    // Time to reachable: a helper to dial back, then nodes testing each path.
    let helper = runtime
        .block_on(start_node(bench_config(dir.path(), 0, 1)))
        .unwrap();
    for (path, mode) in [("direct", NatMode::Auto), ("relayed", NatMode::Relay)] {
        let mut took = Vec::new();
        for _ in 0..5 {
            let mut config = bench_config(dir.path(), 2, 3);
            config.bootstrap = vec![helper.advertised()];
            config.discovery.lan = None;
            config.reach = ReachConfig {
                mode,
                relay: Some(relay.addr().to_string()),
                ..ReachConfig::default()
            };
            let started = Instant::now();
            let node = runtime.block_on(start_node(config)).unwrap();
            let start_ms = started.elapsed().as_secs_f64() * 1000.0;
            let reach = node.reachability().borrow().clone();
            assert_ne!(reach.path, ReachPath::Unreachable, "{reach:?}");
            took.push((reach.took_ms, start_ms));
            runtime.block_on(node.shutdown());
        }
        took.sort_by_key(|t| t.0);
        let (test_ms, start_ms) = took[took.len() / 2];
        println!(
            "relay/reachable/{path}: self-test {test_ms} ms (median of 5), node start {start_ms:.0} ms"
        );
    }
    runtime.block_on(helper.shutdown());
    runtime.block_on(node.shutdown());
    cancel.cancel();
}

criterion_group!(benches, relayed_hop);
criterion_main!(benches);
