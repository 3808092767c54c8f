//! Checkpoints as people download them, against transformers' own outputs.
//!
//! `tests/fixtures/reference` is made by `scripts/make-reference.py` (tiny random checkpoints of
//! every supported family and config layout, saved by transformers 5, with its prompt ids,
//! greedy tokens and logits) and `scripts/make-reference-tokenizers.py` (tokenizers and real chat
//! templates with transformers' ids and rendered prompts). Nothing here needs Python.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use neuroshard_client::generate::{GenerateOptions, LocalPipeline, Pipeline, generate_with};
use neuroshard_client::{ClientConfig, SwarmClient};
use neuroshard_model::codec::WireDType;
use neuroshard_model::{ChatMessage, ChatTemplate, ModelInfo, SamplingParams, TextTokenizer};
use neuroshard_tests::Swarm;
use serde::Deserialize;

/// Largest difference allowed between our logits and transformers'. Both compute in f32 from
/// the same weights; the sums run in another order, which moves logits of magnitude ≤ 15 by
/// about 1e-5 (5e-5 at most, measured). The fixtures' smallest gap between the best and second-best token is 0.05, so
/// this tolerance cannot hide a wrong token.
const LOGIT_TOLERANCE: f32 = 5e-4;

#[derive(Debug, Deserialize)]
pub(crate) struct Reference {
    pub(crate) case: String,
    max_new_tokens: usize,
    eos_token_ids: Vec<u32>,
    min_margin: f32,
    pub(crate) prompts: Vec<ReferencePrompt>,
}

#[derive(Debug, Deserialize)]
pub(crate) struct ReferencePrompt {
    pub(crate) ids: Vec<u32>,
    pub(crate) greedy: Vec<u32>,
    first_logits: Vec<f32>,
    last_logits: Vec<f32>,
}

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/reference")
}

/// Every model case: its directory and what transformers gave.
pub(crate) fn model_cases() -> Vec<(PathBuf, Reference)> {
    let mut dirs: Vec<PathBuf> = std::fs::read_dir(fixtures().join("models"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.join("reference.json").exists())
        .collect();
    dirs.sort();
    assert!(dirs.len() >= 10, "fixtures missing: {dirs:?}");
    dirs.into_iter()
        .map(|dir| {
            let text = std::fs::read_to_string(dir.join("reference.json")).unwrap();
            (dir, serde_json::from_str(&text).unwrap())
        })
        .collect()
}

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len(), "logit counts differ");
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

/// Greedy decoding step by step, as transformers' reference did: the tokens, the first step's
/// logits and the logits that chose the last token.
async fn greedy<P: Pipeline>(
    pipeline: &mut P,
    prompt: &[u32],
    max_new: usize,
    eos: &[u32],
) -> (Vec<u32>, Vec<f32>, Vec<f32>) {
    let mut tokens = Vec::new();
    let mut first = Vec::new();
    let mut last = Vec::new();
    let mut next = prompt.to_vec();
    let mut pos = 0;
    while tokens.len() < max_new {
        let logits = pipeline.step(pos, &next).await.unwrap();
        pos += next.len();
        let token = neuroshard_model::argmax(&logits);
        if first.is_empty() {
            first = logits.clone();
        }
        last = logits;
        tokens.push(token);
        if eos.contains(&token) {
            break;
        }
        next = vec![token];
    }
    (tokens, first, last)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_family_and_layout_matches_transformers_locally() {
    for (dir, reference) in model_cases() {
        let case = &reference.case;
        let info = ModelInfo::read(&dir).unwrap_or_else(|e| panic!("{case}: {e}"));
        let eos = info.config.eos_token_ids.clone();
        for id in &reference.eos_token_ids {
            assert!(eos.contains(id), "{case}: stops on {eos:?}, not {id}");
        }
        assert!(reference.min_margin > 4.0 * LOGIT_TOLERANCE, "{case}");
        let mut worst = 0f32;
        for prompt in &reference.prompts {
            let mut local = LocalPipeline::load(&dir).unwrap();
            let (tokens, first, last) =
                greedy(&mut local, &prompt.ids, reference.max_new_tokens, &eos).await;
            assert_eq!(tokens, prompt.greedy, "{case}: prompt {:?}", prompt.ids);
            worst = worst
                .max(max_diff(&first, &prompt.first_logits))
                .max(max_diff(&last, &prompt.last_logits));
            // The generation loop the CLI and the API use stops on the same tokens.
            let options = GenerateOptions {
                max_new_tokens: reference.max_new_tokens,
                stop_ids: eos.clone(),
                ..GenerateOptions::default()
            };
            let mut local = LocalPipeline::load(&dir).unwrap();
            let report = generate_with(&mut local, &prompt.ids, &options, |_, _| true)
                .await
                .unwrap();
            assert_eq!(report.generated_ids, prompt.greedy, "{case}");
        }
        assert!(worst <= LOGIT_TOLERANCE, "{case}: logits differ by {worst}");
        eprintln!("{case}: tokens equal, logits within {worst:.2e}");
    }
}

#[test]
fn every_family_rebuilds_from_its_flat_parameters_as_a_peer_sends_them() {
    let device = neuroshard_model::cpu_device();
    for (dir, reference) in model_cases() {
        let case = &reference.case;
        let whole = neuroshard_model::Shard::load(&dir, 0..3, &device).unwrap();
        let prompt = neuroshard_model::ShardInput::Tokens(reference.prompts[0].ids.clone());
        let logits = |shard: &neuroshard_model::Shard| {
            let mut cache = neuroshard_model::KvCache::new();
            match shard.forward(&mut cache, 0, 0..3, prompt.clone()).unwrap() {
                neuroshard_model::ShardOutput::Logits(l) => l,
                neuroshard_model::ShardOutput::Hidden(_) => panic!("{case}: no logits"),
            }
        };
        for part in [0..1, 1..3, 0..3] {
            let values = whole.parameters_of(part.clone()).unwrap();
            let info = ModelInfo::with_id(&dir, &whole.info().id).unwrap();
            let built =
                neuroshard_model::Shard::from_parameters(info, part.clone(), &device, &values)
                    .unwrap_or_else(|e| panic!("{case} {part:?}: {e}"));
            assert_eq!(
                built.weights_hash(part.clone()).unwrap(),
                whole.weights_hash(part.clone()).unwrap(),
                "{case} {part:?}"
            );
            if part == (0..3) {
                assert_eq!(logits(&built), logits(&whole), "{case}");
            }
        }
    }
}

/// A client whose hidden states cross every hop as f32, so the swarm computes what one process
/// does.
async fn exact_client(swarm: &Swarm) -> SwarmClient {
    let mut config = ClientConfig::new(swarm.tracker.url());
    config.wire_dtype = WireDType::F32;
    SwarmClient::connect(config).await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_family_and_layout_matches_transformers_through_a_three_node_swarm() {
    for (dir, reference) in model_cases() {
        let case = &reference.case;
        let swarm = Swarm::start(&dir, &[(0, 1), (1, 2), (2, 3)]).await.unwrap();
        let client = exact_client(&swarm).await;
        let eos = ModelInfo::read(&dir).unwrap().config.eos_token_ids;
        for prompt in &reference.prompts {
            let mut session = client.session();
            let (tokens, first, _) =
                greedy(&mut session, &prompt.ids, reference.max_new_tokens, &eos).await;
            assert_eq!(tokens, prompt.greedy, "{case}: prompt {:?}", prompt.ids);
            let diff = max_diff(&first, &prompt.first_logits);
            assert!(diff <= LOGIT_TOLERANCE, "{case}: logits differ by {diff}");
            session.close().await;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_seed_samples_the_same_tokens_locally_and_through_a_swarm() {
    let dir = fixtures().join("models/qwen2-bias");
    let prompt = &[17, 42, 99, 100, 230];
    let sampled = |seed| GenerateOptions {
        max_new_tokens: 24,
        stop_ids: Vec::new(),
        sampling: SamplingParams {
            temperature: 1.3,
            top_k: 40,
            top_p: 0.95,
            min_p: 0.02,
            repetition_penalty: 1.1,
            seed,
        },
        ..GenerateOptions::default()
    };
    let local = |options: GenerateOptions| {
        let dir = dir.clone();
        async move {
            let mut local = LocalPipeline::load(&dir).unwrap();
            generate_with(&mut local, prompt, &options, |_, _| true)
                .await
                .unwrap()
                .generated_ids
        }
    };
    let expected = local(sampled(11)).await;
    assert_eq!(expected.len(), 24);
    assert_ne!(
        expected,
        local(sampled(12)).await,
        "another seed, other tokens"
    );

    let swarm = Swarm::start(&dir, &[(0, 1), (1, 2), (2, 3)]).await.unwrap();
    let client = exact_client(&swarm).await;
    let mut session = client.session();
    let got = generate_with(&mut session, prompt, &sampled(11), |_, _| true)
        .await
        .unwrap();
    assert_eq!(got.generated_ids, expected);
    session.close().await;

    // Temperature 0 is greedy, whatever the seed.
    let greedy_options = GenerateOptions {
        max_new_tokens: 24,
        ..GenerateOptions::default()
    };
    let zero = GenerateOptions {
        sampling: SamplingParams {
            temperature: 0.0,
            seed: 99,
            ..SamplingParams::default()
        },
        ..greedy_options.clone()
    };
    assert_eq!(local(zero).await, local(greedy_options).await);
}

#[derive(Debug, Deserialize)]
struct TokenizerReference {
    name: String,
    encode: Vec<Encoded>,
    decode: Vec<Decoded>,
    chat: Vec<Chat>,
}

#[derive(Debug, Deserialize)]
struct Encoded {
    text: String,
    ids: Vec<u32>,
}

#[derive(Debug, Deserialize)]
struct Decoded {
    ids: Vec<u32>,
    skip_special_tokens: bool,
    text: String,
}

#[derive(Debug, Deserialize)]
struct Chat {
    messages: Vec<ChatMessage>,
    add_generation_prompt: bool,
    #[serde(default)]
    extra_context: BTreeMap<String, serde_json::Value>,
    text: String,
    ids: Vec<u32>,
}

#[test]
fn tokenizers_and_chat_templates_give_what_transformers_gives() {
    let mut templates = 0;
    let mut bos_added = (0, 0);
    for entry in std::fs::read_dir(fixtures().join("tokenizers")).unwrap() {
        let dir = entry.unwrap().path();
        let text = std::fs::read_to_string(dir.join("reference.json")).unwrap();
        let reference: TokenizerReference = serde_json::from_str(&text).unwrap();
        let name = &reference.name;
        let tokenizer = TextTokenizer::for_model_dir(&dir).unwrap();
        for case in &reference.encode {
            let ids = tokenizer.encode_prompt(&case.text, None).unwrap();
            assert_eq!(ids, case.ids, "{name}: {:?}", case.text);
        }
        let plain = tokenizer.encode("x").unwrap();
        let prompt = tokenizer.encode_prompt("x", None).unwrap();
        if prompt.len() > plain.len() {
            bos_added.0 += 1;
        } else {
            bos_added.1 += 1;
        }
        for case in &reference.decode {
            let text = tokenizer
                .decode_with(&case.ids, case.skip_special_tokens)
                .unwrap();
            assert_eq!(text, case.text, "{name}: {:?}", case.ids);
        }
        let template = ChatTemplate::for_model_dir(&dir).unwrap();
        assert_eq!(template.is_some(), !reference.chat.is_empty(), "{name}");
        for chat in &reference.chat {
            let template = template.as_ref().unwrap();
            let text = template
                .render(
                    &chat.messages,
                    chat.add_generation_prompt,
                    &chat.extra_context,
                )
                .unwrap();
            assert_eq!(text, chat.text, "{name}: {:?}", chat.messages);
            assert_eq!(
                tokenizer.encode_rendered(&text).unwrap(),
                chat.ids,
                "{name}"
            );
            templates += 1;
        }
    }
    assert!(templates >= 12, "three real templates, four chats each");
    assert!(bos_added.0 >= 2 && bos_added.1 >= 2, "{bos_added:?}");
}

/// Copies a fixture model into a scratch directory to break it.
fn broken_copy(case: &str, edit: impl FnOnce(&Path)) -> tempfile::TempDir {
    let scratch = tempfile::tempdir().unwrap();
    for entry in std::fs::read_dir(fixtures().join("models").join(case)).unwrap() {
        let path = entry.unwrap().path();
        std::fs::copy(&path, scratch.path().join(path.file_name().unwrap())).unwrap();
    }
    edit(scratch.path());
    scratch
}

fn edit_config(dir: &Path, edit: impl FnOnce(&mut serde_json::Value)) {
    let path = dir.join("config.json");
    let mut config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    edit(&mut config);
    std::fs::write(&path, config.to_string()).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn checkpoints_the_code_does_not_understand_are_refused_by_name_and_never_served() {
    let cases: Vec<(tempfile::TempDir, &str)> = vec![
        (
            broken_copy("llama-rope-parameters", |d| {
                edit_config(d, |c| c["rope_parameters"]["rope_type"] = "longrope".into())
            }),
            "config.json: rope_parameters.rope_type: \"longrope\" is not supported",
        ),
        (
            broken_copy("llama-rope-parameters", |d| {
                edit_config(d, |c| {
                    c["architectures"] = serde_json::json!(["GemmaForCausalLM"])
                })
            }),
            "config.json: architectures \"GemmaForCausalLM\" is not supported",
        ),
        (
            broken_copy("qwen2-bias", |d| {
                // Declared a Llama, a Qwen2's q/k/v biases would be left out: refuse instead.
                edit_config(d, |c| c["intermediate_size"] = 192.into())
            }),
            "mlp.gate_proj.weight has shape [128, 64] but config.json implies [192, 64]",
        ),
        (
            broken_copy("qwen3-qk-norm", |d| {
                edit_config(d, |c| {
                    c["architectures"] = serde_json::json!(["Qwen2ForCausalLM"])
                })
            }),
            "self_attn.q_proj.bias is missing",
        ),
        (
            broken_copy("llama-sharded", |d| {
                let index =
                    std::fs::read_to_string(d.join("model.safetensors.index.json")).unwrap();
                let file = serde_json::from_str::<serde_json::Value>(&index).unwrap()["weight_map"]
                    ["model.norm.weight"]
                    .as_str()
                    .unwrap()
                    .to_string();
                std::fs::remove_file(d.join(&file)).unwrap();
            }),
            "model.safetensors.index.json: names model-",
        ),
    ];
    for (dir, expected) in &cases {
        let err = neuroshard_model::Shard::load(dir.path(), 0..3, &neuroshard_model::cpu_device())
            .unwrap_err()
            .to_string();
        assert!(err.contains(expected), "{err}\nshould say {expected}");
        let mut config = neuroshard_node::node::NodeConfig::new(
            dir.path(),
            neuroshard_base::LayerRange::new(0, 3).unwrap(),
        );
        config.listen = "127.0.0.1:0".parse().unwrap();
        let refused = neuroshard_node::node::start_node(config).await;
        assert!(refused.is_err(), "a node served {expected}");
    }
    let bad_template = broken_copy("llama-rope-parameters", |d| {
        std::fs::write(
            d.join("chat_template.jinja"),
            "{% for m in messages %}{{ m }}",
        )
        .unwrap();
    });
    let err = ChatTemplate::for_model_dir(bad_template.path())
        .unwrap_err()
        .to_string();
    assert!(err.contains("chat template"), "{err}");
}
