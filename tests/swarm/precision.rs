//! Lighter weights: bf16, f16 and int8 shards keep their perplexity within the bounds
//! on the real-checkpoint fixtures and the trained demo model, and a node holding int8 serves
//! exactly what a local int8 run gives, with every hop spot-checked at its announced precision.

use neuroshard_client::generate::{LocalPipeline, Pipeline, generate};
use neuroshard_client::{ClientConfig, SwarmClient};
use neuroshard_model::init::{ModelSpec, shard_weight_bytes};
use neuroshard_model::{KvCache, ModelInfo, Precision, Shard, ShardInput, ShardOutput};
use neuroshard_net::NodeError;
use neuroshard_proof::Fingerprint;
use neuroshard_tests::{Swarm, TestModel};

use crate::generation::PROMPT;

/// Text the demo model never saw: the verses after those of its corpus (Genesis 1:6-8 and
/// Psalm 23:5-6, King James Version).
const HELD_OUT: &str = "And God said, Let there be a firmament in the midst of the waters, and \
    let it divide the waters from the waters. And God made the firmament, and divided the \
    waters which were under the firmament from the waters which were above the firmament: and \
    it was so. And God called the firmament Heaven. And the evening and the morning were the \
    second day. Thou preparest a table before me in the presence of mine enemies: thou \
    anointest my head with oil; my cup runneth over. Surely goodness and mercy shall follow me \
    all the days of my life: and I will dwell in the house of the LORD for ever.";

/// Most a precision's perplexity may move from f32's, as a share (the bounds).
fn bound(precision: Precision) -> f64 {
    match precision {
        Precision::F32 => 0.0,
        Precision::Bf16 | Precision::F16 => 0.01,
        Precision::Int8 => 0.03,
    }
}

/// Perplexity of the texts `texts` (token ids each) under the model in `dir` held at each
/// precision: over every token predicted, each text from its own start.
fn perplexities(dir: &std::path::Path, texts: &[Vec<u32>]) -> Vec<(Precision, f64)> {
    let layers = ModelInfo::read(dir).unwrap().config.num_hidden_layers;
    let predicted: usize = texts.iter().map(|t| t.len() - 1).sum();
    Precision::ALL
        .into_iter()
        .map(|p| {
            let shard = Shard::load_at(dir, 0..layers, &Default::default(), p).unwrap();
            assert_eq!(shard.precision(), p);
            let nll: f64 = (texts.iter())
                .map(|t| shard.perplexity(t).unwrap().ln() * (t.len() - 1) as f64)
                .sum();
            (p, (nll / predicted as f64).exp())
        })
        .collect()
}

#[test]
fn lighter_weights_keep_perplexity_within_bounds_on_the_fixtures_and_the_demo_model() {
    let mut texts: Vec<(String, std::path::PathBuf, Vec<Vec<u32>>)> =
        (crate::reference::model_cases().into_iter())
            .map(|(dir, reference)| {
                // Each prompt and the model's own greedy continuation of it: text it predicts
                // well, where rounding its weights costs the most.
                let ids = (reference.prompts.iter())
                    .map(|p| p.ids.iter().chain(&p.greedy).copied().collect())
                    .collect();
                (reference.case, dir, ids)
            })
            .collect();
    let demo = tempfile::tempdir().unwrap();
    neuroshard_model::init::write_demo_model(demo.path()).unwrap();
    let tokenizer = neuroshard_model::TextTokenizer::for_model_dir(demo.path()).unwrap();
    let ids = tokenizer.encode_prompt(HELD_OUT, Some(neuroshard_model::BYTE_BOS));
    texts.push((
        "demo (held-out text)".into(),
        demo.path().into(),
        vec![ids.unwrap()],
    ));
    let mut worst = [0.0f64; 4];
    for (case, dir, ids) in &texts {
        let got = perplexities(dir, ids);
        let f32 = got[0].1;
        let line: Vec<String> = (got.iter())
            .map(|(p, ppl)| format!("{p} {ppl:.4} ({:+.3}%)", (ppl / f32 - 1.0) * 100.0))
            .collect();
        let tokens: usize = ids.iter().map(Vec::len).sum();
        eprintln!("{case}: {tokens} tokens: {}", line.join(", "));
        for (i, (p, ppl)) in got.into_iter().enumerate() {
            let moved = (ppl / f32 - 1.0).abs();
            worst[i] = worst[i].max(moved);
            assert!(
                moved <= bound(p),
                "{case}: {p} perplexity {ppl} is {:.2}% from f32's {f32}",
                moved * 100.0
            );
        }
    }
    eprintln!(
        "largest change from f32: bf16 {:.3}%, f16 {:.3}%, int8 {:.3}%",
        worst[1] * 100.0,
        worst[2] * 100.0,
        worst[3] * 100.0
    );
    assert!(
        worst[3] > 0.0,
        "int8 rounds the weights, so perplexity moves"
    );
}

#[test]
fn a_shard_holds_its_precisions_bytes_and_refuses_to_hand_out_rounded_weights() {
    let model = TestModel::new(&ModelSpec::tiny());
    let config = ModelInfo::read(model.path()).unwrap().config;
    let bytes = |p| shard_weight_bytes(&config, 1..3, p);
    // Only the projections halve: the norms (two a layer) stay f32 on both sides.
    let norms = 2 * 2 * config.hidden_size as u64;
    assert_eq!(
        bytes(Precision::Bf16) * 2 - bytes(Precision::F32),
        4 * norms
    );
    assert!(bytes(Precision::Int8) < bytes(Precision::Bf16));
    let int8 = Shard::load_at(model.path(), 0..4, &Default::default(), Precision::Int8).unwrap();
    let err = int8.parameters_of(0..4).unwrap_err().to_string();
    assert!(err.contains("int8"), "{err}");
    let f32 = Shard::load(model.path(), 0..4, &Default::default()).unwrap();
    // Every holder at a precision reports one weights hash, another at each precision.
    let hashes: std::collections::HashSet<_> = Precision::ALL
        .into_iter()
        .map(|p| f32.weights_hash_at(1..3, p).unwrap())
        .collect();
    assert_eq!(hashes.len(), 4);
    assert_eq!(
        int8.weights_hash(1..3).unwrap(),
        f32.weights_hash_at(1..3, Precision::Int8).unwrap()
    );
    // Recomputed at the precision a holder announces, its row is matched to the backends'
    // rounding; at f32 it would differ by the weights' rounding, far more.
    let row = |shard: &Shard| {
        let input = ShardInput::Tokens(vec![3, 1, 4, 1, 5]);
        match shard
            .forward(&mut Default::default(), 0, 0..4, input)
            .unwrap()
        {
            ShardOutput::Logits(l) => l,
            ShardOutput::Hidden(_) => unreachable!("the whole model ends in logits"),
        }
    };
    let again = Shard::load_at(model.path(), 0..4, &Default::default(), Precision::Int8).unwrap();
    let (exact, rounded, recomputed) = (row(&f32), row(&int8), row(&again));
    let rms = Fingerprint::of(&exact).rms;
    let off = |a: &[f32], b: &[f32]| {
        a.iter()
            .zip(b)
            .map(|(x, y)| (x - y).abs())
            .fold(0.0, f32::max)
            / rms
    };
    assert!(
        off(&rounded, &recomputed) < 1e-5,
        "{}",
        off(&rounded, &recomputed)
    );
    assert!(off(&rounded, &exact) > 1e-3, "{}", off(&rounded, &exact));
    eprintln!(
        "int8 logits: {:.2e} x RMS from a recomputation at int8, {:.2e} from f32",
        off(&rounded, &recomputed),
        off(&rounded, &exact)
    );
}

/// A node holding int8 between two at f32: the client, holding the model, checks every hop at
/// the precision each announces, and the tokens are a local int8 run's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_int8_node_serves_a_local_int8_runs_tokens_and_passes_every_spot_check() {
    const NEW_TOKENS: usize = 8;
    let model = TestModel::new(&ModelSpec::tiny());
    let mut swarm = Swarm::start(model.path(), &[(0, 1), (3, 4)]).await.unwrap();
    let int8 = swarm
        .add_node_with(model.path(), 1, 3, |c| c.precision = Precision::Int8)
        .await
        .unwrap();
    assert_eq!(int8.hop().precision, Precision::Int8);
    let int8_id = int8.id();
    // Locally: layers 1..3 at int8 and the rest at f32, as the chain holds them.
    let mut local = MixedPipeline::load(model.path());
    let expected = generate(&mut local, PROMPT, NEW_TOKENS, &[], |_, _| {})
        .await
        .unwrap();
    let mut config = ClientConfig::new(swarm.tracker.url());
    config.verify_with = Some(model.path_buf());
    config.router.spot_checks.probation = 1_000;
    let client = SwarmClient::connect(config).await.unwrap();
    let mut session = client.session();
    let got = generate(&mut session, PROMPT, NEW_TOKENS, &[], |_, _| {})
        .await
        .unwrap();
    assert_eq!(got.generated_ids, expected.generated_ids);
    assert!(session.events().is_empty(), "{:?}", session.events());
    let chain = session.chain().to_vec();
    session.close().await;
    assert!(
        chain
            .iter()
            .any(|h| h.node_id == int8_id && h.precision == Precision::Int8),
        "{chain:?}"
    );
    let record = client.reputation(&int8_id);
    assert_eq!(
        (record.passes, record.failures),
        (NEW_TOKENS as u64, 0),
        "every hop of the int8 node was checked and passed"
    );
    let report = client.flush_receipts().await;
    assert!(report.rejected.is_empty(), "{report:?}");
    swarm.shutdown().await;
}

/// A local run of the tiny model with layers 1..3 held at int8 and the rest at f32.
struct MixedPipeline {
    parts: Vec<(Shard, KvCache)>,
}

impl MixedPipeline {
    fn load(dir: &std::path::Path) -> Self {
        let at = |range: std::ops::Range<usize>, p| {
            let shard = LocalPipeline::load_layers(dir, range, p).unwrap();
            (shard, KvCache::new())
        };
        Self {
            parts: vec![
                at(0..1, Precision::F32),
                at(1..3, Precision::Int8),
                at(3..4, Precision::F32),
            ],
        }
    }
}

impl Pipeline for MixedPipeline {
    async fn step(&mut self, start_pos: usize, ids: &[u32]) -> Result<Vec<f32>, NodeError> {
        let mut input = ShardInput::Tokens(ids.to_vec());
        for (shard, cache) in &mut self.parts {
            input = match shard.forward(cache, start_pos, shard.range(), input)? {
                ShardOutput::Hidden(h) => ShardInput::Hidden(h),
                ShardOutput::Logits(logits) => return Ok(logits),
            };
        }
        unreachable!("the last part ends the model")
    }
}
