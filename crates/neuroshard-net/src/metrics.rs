//! Counters a node or client keeps, readable through Ping and as JSON status.

use neuroshard_base::sync::LockExt;
use std::collections::VecDeque;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use neuroshard_proto as pb;

/// Latency samples kept for percentiles: enough for a stable p99, small enough to sort per read.
const LATENCY_WINDOW: usize = 1024;

/// Live counters; every field is cheap to bump from any task.
#[derive(Debug, Default)]
pub struct Metrics {
    /// Open gRPC channels to peers.
    pub active_connections: AtomicU64,
    /// Peers with at least one pooled channel.
    pub pool_size: AtomicU64,
    /// Encoded bytes written in requests or replies.
    pub bytes_sent: AtomicU64,
    /// Encoded bytes read from requests or replies.
    pub bytes_received: AtomicU64,
    /// RPCs finished (served or made).
    pub rpc_count: AtomicU64,
    /// RPCs that failed.
    pub rpc_failures: AtomicU64,
    /// Peers known.
    pub peer_count: AtomicU64,
    /// Peers known and not banned.
    pub healthy_peers: AtomicU64,
    /// Forward calls served.
    pub forward_calls: AtomicU64,
    /// Inference sessions opened.
    pub sessions_started: AtomicU64,
    /// Token positions computed by Forward calls served.
    pub tokens_served: AtomicU64,
    latencies_us: Mutex<VecDeque<u64>>,
}

/// A point-in-time copy of [`Metrics`], plus session figures, for Ping and JSON status.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize)]
pub struct MetricsSnapshot {
    /// Open gRPC channels to peers.
    pub active_connections: u64,
    /// Peers with at least one pooled channel.
    pub pool_size: u64,
    /// Encoded bytes sent.
    pub bytes_sent: u64,
    /// Encoded bytes received.
    pub bytes_received: u64,
    /// RPCs finished.
    pub rpc_count: u64,
    /// RPCs failed.
    pub rpc_failures: u64,
    /// Share of RPCs that succeeded (1.0 before any).
    pub rpc_success_rate: f64,
    /// Median RPC latency over the last 1024 calls.
    pub rpc_latency_p50_ms: f64,
    /// 99th percentile RPC latency over the last 1024 calls.
    pub rpc_latency_p99_ms: f64,
    /// Peers known.
    pub peer_count: u64,
    /// Peers known and not banned.
    pub healthy_peers: u64,
    /// Sessions holding a KV cache now.
    pub sessions: u64,
    /// Bytes of KV cache held now.
    pub kv_cache_bytes: u64,
    /// Forward calls served.
    pub forward_calls: u64,
    /// Sessions opened.
    pub sessions_started: u64,
    /// Token positions computed by Forward calls served.
    pub tokens_served: u64,
    /// Contacts in the DHT routing table.
    pub dht_contacts: u64,
    /// DHT records held for the swarm.
    pub dht_records: u64,
}

impl Metrics {
    /// Records one finished RPC.
    pub fn record_rpc(&self, latency: Duration, ok: bool) {
        self.rpc_count.fetch_add(1, Ordering::Relaxed);
        if !ok {
            self.rpc_failures.fetch_add(1, Ordering::Relaxed);
        }
        let mut window = self.latencies_us.lock_or_recover();
        if window.len() == LATENCY_WINDOW {
            window.pop_front();
        }
        window.push_back(latency.as_micros() as u64);
    }

    /// Adds to the byte counters.
    pub fn record_bytes(&self, sent: usize, received: usize) {
        self.bytes_sent.fetch_add(sent as u64, Ordering::Relaxed);
        self.bytes_received
            .fetch_add(received as u64, Ordering::Relaxed);
    }

    /// Copies the counters; `sessions` and `kv_cache_bytes` come from the session store.
    pub fn snapshot(&self, sessions: u64, kv_cache_bytes: u64) -> MetricsSnapshot {
        let load = |c: &AtomicU64| c.load(Ordering::Relaxed);
        let mut sorted: Vec<u64> = self
            .latencies_us
            .lock_or_recover()
            .iter()
            .copied()
            .collect();
        sorted.sort_unstable();
        let percentile = |p: f64| {
            if sorted.is_empty() {
                return 0.0;
            }
            let index = ((sorted.len() - 1) as f64 * p).round() as usize;
            sorted[index] as f64 / 1000.0
        };
        let count = load(&self.rpc_count);
        let failures = load(&self.rpc_failures);
        MetricsSnapshot {
            active_connections: load(&self.active_connections),
            pool_size: load(&self.pool_size),
            bytes_sent: load(&self.bytes_sent),
            bytes_received: load(&self.bytes_received),
            rpc_count: count,
            rpc_failures: failures,
            rpc_success_rate: if count == 0 {
                1.0
            } else {
                (count - failures) as f64 / count as f64
            },
            rpc_latency_p50_ms: percentile(0.5),
            rpc_latency_p99_ms: percentile(0.99),
            peer_count: load(&self.peer_count),
            healthy_peers: load(&self.healthy_peers),
            sessions,
            kv_cache_bytes,
            forward_calls: load(&self.forward_calls),
            sessions_started: load(&self.sessions_started),
            tokens_served: load(&self.tokens_served),
            dht_contacts: 0,
            dht_records: 0,
        }
    }
}

/// Converts between two structs with the same metric fields, both ways.
macro_rules! convert_fields {
    ($a:ty, $b:ty, [$($field:ident),* $(,)?]) => {
        impl From<$a> for $b {
            fn from(m: $a) -> Self {
                Self { $($field: m.$field),* }
            }
        }

        impl From<$b> for $a {
            fn from(m: $b) -> Self {
                Self { $($field: m.$field),* }
            }
        }
    };
}

convert_fields!(
    MetricsSnapshot,
    pb::Metrics,
    [
        active_connections,
        pool_size,
        bytes_sent,
        bytes_received,
        rpc_count,
        rpc_failures,
        rpc_success_rate,
        rpc_latency_p50_ms,
        rpc_latency_p99_ms,
        peer_count,
        healthy_peers,
        sessions,
        kv_cache_bytes,
        forward_calls,
        sessions_started,
        tokens_served,
        dht_contacts,
        dht_records,
    ]
);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_and_success_rate() {
        let m = Metrics::default();
        for ms in 1..=100 {
            m.record_rpc(Duration::from_millis(ms), ms != 100);
        }
        let s = m.snapshot(0, 0);
        assert_eq!(s.rpc_count, 100);
        assert!((s.rpc_success_rate - 0.99).abs() < 1e-9);
        assert!((s.rpc_latency_p50_ms - 50.0).abs() <= 1.0);
        assert!(s.rpc_latency_p99_ms >= 98.0);
    }
}
