//! Prints the DHT simulator's figures: lookup rounds, get success under churn and Sybils,
//! simulator lookups per second, and routing-table memory per 1,000 entries.
//!
//! `cargo run --release -p neuroshard-dht --bin dht-sim -- [NODES]`

use std::alloc::{GlobalAlloc, Layout, System};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};

use neuroshard_dht::sim::{SimConfig, simulate};
use neuroshard_dht::{Contact, DiversityLimits, Key, RoutingTable};
use rand::SeedableRng;

struct Counting;

static LIVE: AtomicUsize = AtomicUsize::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LIVE.fetch_add(layout.size(), Ordering::Relaxed);
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

/// Heap bytes of a table holding `entries` contacts (k per bucket, over the nearest buckets).
fn table_bytes(entries: usize) -> (usize, usize) {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(7);
    let local = Key::random(&mut rng);
    let before = LIVE.load(Ordering::Relaxed);
    let mut table = RoutingTable::new(local, 20, DiversityLimits::default());
    let mut bucket = 255;
    let mut n = 0u32;
    while table.len() < entries {
        for _ in 0..20 {
            n += 1;
            let addr = SocketAddr::from(([10, (n >> 16) as u8, (n >> 8) as u8, n as u8], 7420));
            table.observe(
                Contact {
                    key: local.random_in_bucket(bucket, &mut rng),
                    addr,
                },
                0,
            );
        }
        bucket -= 1;
    }
    let bytes = LIVE.load(Ordering::Relaxed) - before;
    let len = table.len();
    drop(table);
    (bytes, len)
}

fn main() {
    let nodes: usize = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(10_000);
    let (bytes, len) = table_bytes(1000);
    println!(
        "routing table: {:.1} KiB per 1,000 entries ({bytes} bytes for {len}, buckets included)",
        bytes as f64 / len as f64 * 1000.0 / 1024.0
    );
    for (name, churn, sybils) in [
        ("baseline", 0.0, 0.0),
        ("20% churn", 0.2, 0.0),
        ("20% Sybils from one /16", 0.0, 0.2),
    ] {
        let report = simulate(SimConfig {
            nodes,
            churn,
            sybils,
            ..SimConfig::default()
        });
        println!(
            "{name:>26}: {} nodes, gets {:.2}% found, rounds p50 {} p99 {}, get {} ms p50 {} ms p99, \
             {:.1} stores/put, {} lookups at {:.0} lookups/s, {} messages",
            report.nodes,
            report.get_success * 100.0,
            report.rounds_p50,
            report.rounds_p99,
            report.get_ms_p50,
            report.get_ms_p99,
            report.stored_mean,
            report.lookups,
            report.lookups_per_s,
            report.messages,
        );
    }
}
