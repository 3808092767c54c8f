//! Decode over home links: three nodes of a SmolLM2-135M-shaped model, each reached over its
//! own emulated link of 20 ms round trip and 20 Mbit/s each way (`neuroshard_benches::Link`,
//! a loopback proxy: these machines have no netem), against the same model in one process.
//!
//! Prints, from one run: decode ms/token through the links with the token chosen at the last
//! hop, and with the vocabulary's logits sent back to be chosen at the client (as before);
//! each against the floor of compute plus one round trip per hop; the bytes a decode token
//! moves over each hop; and the time to first token of a 512-token prompt.
//! `cargo bench -p neuroshard-benches --bench homelink`

use std::time::{Duration, Instant};

use neuroshard_benches::{Link, start_linked_swarm, write_temp_model};
use neuroshard_client::generate::{LocalPipeline, Pipeline};
use neuroshard_client::{ClientConfig, SwarmClient, SwarmSession};
use neuroshard_model::init::ModelSpec;
use neuroshard_model::{Sampler, SamplingParams};

const PROMPT_LEN: usize = 32;
const STEPS: u32 = 12;
const HOPS: u32 = 3;
const RTT: Duration = Duration::from_millis(20);

/// Mean time of `STEPS` decode steps at one position (nodes cut their caches back to it).
async fn decode_ms<P: Pipeline>(pipeline: &mut P, sampler: Option<&Sampler>) -> f64 {
    let started = Instant::now();
    for _ in 0..STEPS {
        match sampler {
            Some(sampler) => drop(pipeline.choose(PROMPT_LEN, &[66], sampler).await.unwrap()),
            None => drop(pipeline.step(PROMPT_LEN, &[66]).await.unwrap()),
        }
    }
    started.elapsed().as_secs_f64() * 1000.0 / f64::from(STEPS)
}

/// Bytes the nodes sent and received per decode step while `run` ran.
async fn bytes_per_step<F: std::future::Future<Output = f64>>(
    swarm: &neuroshard_node::swarm::LocalSwarm,
    run: F,
) -> (f64, Vec<(u64, u64)>) {
    let before: Vec<_> = swarm.nodes.iter().map(|n| n.metrics()).collect();
    let ms = run.await;
    let per_hop = swarm
        .nodes
        .iter()
        .zip(&before)
        .map(|(n, b)| {
            let now = n.metrics();
            let calls = (now.forward_calls - b.forward_calls).max(1);
            (
                (now.bytes_sent - b.bytes_sent) / calls,
                (now.bytes_received - b.bytes_received) / calls,
            )
        })
        .collect();
    (ms, per_hop)
}

fn main() {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let dir = write_temp_model(&ModelSpec::smol());
    let prompt: Vec<u32> = (0..PROMPT_LEN as u32).map(|i| 65 + i % 26).collect();
    let long: Vec<u32> = (0..512u32).map(|i| 65 + i % 26).collect();
    let link = Link {
        one_way: RTT / 2,
        bits_per_s: 20_000_000,
    };
    let greedy = Sampler::new(SamplingParams::default())
        .unwrap()
        .reporting(5);
    runtime.block_on(async {
        let mut local = LocalPipeline::load(dir.path()).unwrap();
        local.step(0, &prompt).await.unwrap();
        let compute = decode_ms(&mut local, None).await;
        let mut fresh_local = LocalPipeline::load(dir.path()).unwrap();
        let started = Instant::now();
        fresh_local.step(0, &long).await.unwrap();
        let local_prefill = started.elapsed().as_secs_f64() * 1000.0;
        drop(fresh_local);

        let swarm = start_linked_swarm(dir.path(), &[(0, 10), (10, 20), (20, 30)], link).await;
        let client = SwarmClient::connect(ClientConfig::new(swarm.tracker.url()))
            .await
            .unwrap();
        let mut session: SwarmSession<'_> = client.session();
        session.step(0, &prompt).await.unwrap();
        let floor = compute + f64::from(HOPS) * RTT.as_secs_f64() * 1000.0;
        let (chosen, chosen_bytes) =
            bytes_per_step(&swarm, decode_ms(&mut session, Some(&greedy))).await;
        let (logits, logits_bytes) = bytes_per_step(&swarm, decode_ms(&mut session, None)).await;
        session.close().await;

        let mut fresh = client.session();
        let started = Instant::now();
        fresh.choose(0, &long, &greedy).await.unwrap();
        let first_token = started.elapsed().as_secs_f64() * 1000.0;
        fresh.close().await;

        println!("links: {HOPS} hops, each {} ms round trip, 20 Mbit/s each way", RTT.as_millis());
        println!("local decode: {compute:.1} ms/token; floor (compute + hops x RTT): {floor:.1} ms");
        println!(
            "swarm decode, token chosen at the last hop: {chosen:.1} ms/token = {:.2}x the floor (target <= 1.1); bytes per hop (sent, received) by node: {chosen_bytes:?}",
            chosen / floor
        );
        println!(
            "swarm decode, logits back to the client: {logits:.1} ms/token = {:.2}x the floor; bytes per hop: {logits_bytes:?}",
            logits / floor
        );
        println!(
            "time to first token, 512-token prompt: {first_token:.0} ms through the links, {local_prefill:.0} ms local prefill"
        );
        swarm.shutdown().await;
    });
}
