//! Proof of Neural Work across a swarm: receipts earned by honest work, cheaters caught and
//! routed around, and a ledger that keeps every acknowledged receipt through `kill -9`.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};

use neuroshard_base::{LayerRange, NodeKey};
use neuroshard_client::generate::generate;
use neuroshard_client::{ClientConfig, SwarmClient};
use neuroshard_model::init::ModelSpec;
use neuroshard_model::{LlamaConfig, ModelInfo};
use neuroshard_node::node::{Fault, NodeHandle};
use neuroshard_proof::{PassBody, Receipt, Status, Verdict};
use neuroshard_proto as pb;
use neuroshard_tests::{Swarm, TestModel, within};

use crate::generation::{PROMPT, assert_same_generation, local_reference};

const NEW_TOKENS: usize = 8;

/// FLOPs a node serving `layers` did for one generation of `NEW_TOKENS` after `PROMPT`: the
/// prompt in one call, then one call per further token.
fn generation_flops(config: &LlamaConfig, layers: LayerRange) -> u64 {
    let prompt = PROMPT.len() as u64;
    let mut flops = config.forward_flops(layers.to_range(), 0, prompt);
    for pos in prompt..prompt + NEW_TOKENS as u64 - 1 {
        flops += config.forward_flops(layers.to_range(), pos, 1);
    }
    flops
}

async fn status_counts(node: &NodeHandle) -> neuroshard_proof::StatusCounts {
    node.ledger().read(|l| l.status_counts()).await.unwrap()
}

fn verifying_client(swarm: &Swarm, model: &TestModel) -> ClientConfig {
    let mut config = ClientConfig::new(swarm.tracker.url());
    config.verify_with = Some(model.path_buf());
    config
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_hop_of_an_honest_swarm_earns_a_countersigned_receipt() {
    let model = TestModel::new(&ModelSpec::tiny());
    let config = ModelInfo::read(model.path()).unwrap().config;
    let expected = local_reference(&model, NEW_TOKENS).await;
    let swarm = Swarm::start(model.path(), &[(0, 2), (2, 3), (3, 4)])
        .await
        .unwrap();
    let client = SwarmClient::connect(verifying_client(&swarm, &model))
        .await
        .unwrap();
    let mut session = client.session();
    let got = generate(&mut session, PROMPT, NEW_TOKENS, &[], |_, _| {})
        .await
        .unwrap();
    assert_same_generation(&got, &expected);
    assert!(session.events().is_empty(), "{:?}", session.events());
    session.close().await;
    let report = client.flush_receipts().await;
    assert_eq!(report.stored, 3 * NEW_TOKENS as u64, "{report:?}");
    assert!(
        report.rejected.is_empty() && report.undelivered == 0,
        "{report:?}"
    );
    for node in &swarm.nodes {
        assert_eq!(
            status_counts(node).await,
            neuroshard_proof::StatusCounts {
                pending: 0,
                verified: NEW_TOKENS as u64,
                voided: 0
            },
            "node {}",
            node.layers()
        );
        let totals = node
            .ledger()
            .read(|l| l.totals(neuroshard_net::now_ms(), 0))
            .await
            .unwrap();
        assert_eq!(totals.len(), 1);
        let t = totals[0].lifetime;
        assert_eq!(totals[0].model_id, node.model_id());
        assert_eq!(t, totals[0].today, "all of it was done today");
        assert_eq!(t.receipts, NEW_TOKENS as u64);
        assert_eq!(t.tokens, (PROMPT.len() + NEW_TOKENS - 1) as u64);
        assert_eq!(t.flops, generation_flops(&config, node.layers()));
        // Credit is FLOPs in GFLOP times the reliability the client vouched for: above half
        // (new peers start at 0.5 and every checked hop passed), never above the work. No
        // trusted issuer vouches for this client, so it is kept apart, as unvouched.
        let gflop = t.flops as f64 / 1e9;
        assert!(t.unvouched > 0.5 * gflop && t.unvouched <= gflop, "{t:?}");
        assert_eq!(t.credit, 0.0, "{t:?}");
        let rows = node.ledger().read(|l| l.page(None, 0, 100)).await.unwrap();
        assert!(rows.iter().all(|r| r.requester == client.public_key().id()));
        assert!(
            rows.iter().any(|r| r.spot_checked),
            "new peers are re-executed"
        );
    }
    swarm.shutdown().await;
}

/// How a cheat is caught: by the requester's own re-execution (which voids the receipt) or
/// by checking the receipt against what the requester computes itself (which refuses it).
#[derive(Debug, Clone, Copy, PartialEq)]
enum Caught {
    SpotCheck,
    Receipt(&'static str),
}

/// Starts an honest 0..2, a cheater on 2..4, connects a client (which then knows only those
/// two, and verifies with the model's weights when `verifying`), adds an honest 2..4, and
/// generates.
async fn catch(fault: Fault, model: &TestModel, verifying: bool, how: Caught) {
    let expected = local_reference(model, NEW_TOKENS).await;
    let mut swarm = Swarm::start(model.path(), &[(0, 2)]).await.unwrap();
    let cheater = swarm
        .add_node_with(model.path(), 2, 4, |c| c.fault = Some(fault.clone()))
        .await
        .unwrap()
        .id();
    let config = match verifying {
        true => verifying_client(&swarm, model),
        false => ClientConfig::new(swarm.tracker.url()),
    };
    let client = SwarmClient::connect(config).await.unwrap();
    swarm.add_node(model.path(), 2, 4).await.unwrap();
    let mut session = client.session();
    let got = generate(&mut session, PROMPT, NEW_TOKENS, &[], |_, _| {})
        .await
        .unwrap();
    assert_same_generation(&got, &expected);
    let events = session.events().to_vec();
    let named = match how {
        Caught::SpotCheck => "spot check",
        Caught::Receipt(field) => field,
    };
    assert!(
        events.len() == 1 && events[0].contains(named),
        "{fault:?}: {events:?}"
    );
    assert!(
        session.chain().iter().all(|h| h.node_id != cheater),
        "routed around"
    );
    session.close().await;
    if how == Caught::SpotCheck {
        let record = client.reputation(&cheater);
        assert_eq!((record.failures, record.passes), (1, 0), "{fault:?}");
    }
    // Caught on its first call: the prompt.
    let cheat = &swarm.nodes[1];
    assert_eq!(cheat.metrics().forward_calls, 1, "{fault:?}");
    client.flush_receipts().await;
    let counts = status_counts(cheat).await;
    let voided = u64::from(how == Caught::SpotCheck);
    assert_eq!(
        (counts.verified, counts.voided, counts.pending),
        (0, voided, 1 - voided),
        "{fault:?}: a refused receipt is never countersigned"
    );
    if how == Caught::SpotCheck {
        let rows = cheat.ledger().read(|l| l.page(None, 0, 10)).await.unwrap();
        let evidence = rows[0].evidence.as_deref().unwrap_or_default();
        let shown = match fault {
            Fault::WrongToken => "the token chosen: token",
            _ => "fingerprint",
        };
        assert!(evidence.contains(shown), "{fault:?}: {evidence}");
    }
    let honest = status_counts(&swarm.nodes[2]).await;
    assert_eq!(honest.verified, NEW_TOKENS as u64);
    swarm.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_adding_noise_is_caught_and_routed_around() {
    let model = TestModel::new(&ModelSpec::tiny());
    catch(Fault::Noise { scale: 0.1 }, &model, true, Caught::SpotCheck).await;
}

/// An honest last hop drawing warm samples passes every spot check of its choices: the check
/// admits the token the recomputed logits give, with only the backends' rounding as slack.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_honest_last_hop_drawing_samples_passes_every_spot_check() {
    use neuroshard_client::generate::{GenerateOptions, LocalPipeline, generate_with};
    let model = TestModel::new(&ModelSpec::tiny());
    let swarm = Swarm::start(model.path(), &[(0, 2), (2, 4)]).await.unwrap();
    let client = SwarmClient::connect(verifying_client(&swarm, &model))
        .await
        .unwrap();
    let last = swarm.nodes[1].id();
    for seed in 0..4 {
        let options = GenerateOptions {
            max_new_tokens: 24,
            sampling: neuroshard_model::SamplingParams {
                temperature: 1.2,
                top_p: 0.95,
                seed,
                ..Default::default()
            },
            ..GenerateOptions::default()
        };
        let mut local = LocalPipeline::load(model.path()).unwrap();
        let expected = generate_with(&mut local, PROMPT, &options, |_, _| true)
            .await
            .unwrap();
        let mut session = client.session();
        let got = generate_with(&mut session, PROMPT, &options, |_, _| true)
            .await
            .unwrap();
        assert_eq!(got.generated_ids, expected.generated_ids, "seed {seed}");
        assert!(session.events().is_empty(), "{:?}", session.events());
        session.close().await;
    }
    let record = client.reputation(&last);
    assert_eq!(record.failures, 0);
    assert!(
        record.passes > 0,
        "its choices were re-executed: {record:?}"
    );
    swarm.shutdown().await;
}

/// The last hop chooses the token: one that computes honestly but sends another token is
/// caught by re-executing it, its receipt voided with the choice named.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_last_hop_choosing_another_token_is_caught_and_routed_around() {
    let model = TestModel::new(&ModelSpec::tiny());
    catch(Fault::WrongToken, &model, true, Caught::SpotCheck).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_skipping_a_layer_is_caught_and_routed_around() {
    let model = TestModel::new(&ModelSpec::tiny());
    catch(Fault::SkipLayer, &model, true, Caught::SpotCheck).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_with_wrong_weights_is_caught_and_routed_around() {
    let other = TestModel::new(&ModelSpec {
        seed: 99,
        ..ModelSpec::tiny()
    });
    let model = TestModel::new(&ModelSpec::tiny());
    let fault = Fault::WrongWeights(other.path_buf());
    catch(fault, &model, true, Caught::SpotCheck).await;
}

/// A client without the weights computes the FLOPs from the model's config itself, and one
/// with them the weights hash: a receipt claiming more work, or other weights, is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_receipt_claiming_more_flops_or_other_weights_is_refused() {
    let model = TestModel::new(&ModelSpec::tiny());
    catch(
        Fault::InflatesFlops(3),
        &model,
        false,
        Caught::Receipt("flops"),
    )
    .await;
    let weights = Caught::Receipt("weights_hash");
    catch(Fault::ClaimsWeights([7; 32]), &model, true, weights).await;
}

/// A client without the model's files takes its config from two peers, and two that disagree
/// fail the connection by name: no lone peer sets the FLOPs receipts are checked against.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn peers_serving_different_configs_fail_the_connection_by_name() {
    let (model, copy) = (
        TestModel::new(&ModelSpec::tiny()),
        TestModel::new(&ModelSpec::tiny()),
    );
    let mut swarm = Swarm::start(model.path(), &[(0, 2)]).await.unwrap();
    swarm.add_node(copy.path(), 2, 4).await.unwrap();
    let path = copy.path().join("config.json");
    let mut config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    config["intermediate_size"] = (2 * config["intermediate_size"].as_u64().unwrap()).into();
    std::fs::write(&path, config.to_string()).unwrap();
    // Both listed, and only the tracker asked: nodes of other tests on the LAN stay out.
    let mut listed = swarm.tracker.service.node_count();
    listed.wait_for(|n| *n == 2).await.unwrap();
    let info = ModelInfo::read(model.path()).unwrap();
    let mut asking = ClientConfig::new(swarm.tracker.url());
    asking.model_id = Some(info.id.clone());
    asking.discovery.lan = None;
    let err = SwarmClient::connect(asking).await.err().unwrap();
    assert!(
        err.to_string().contains("serve different config.json"),
        "{err}"
    );
    // A client that read the model's own files asks nobody.
    let mut own = ClientConfig::new(swarm.tracker.url());
    own.model_id = Some(info.id);
    own.model_config = Some(info.config);
    let report = request_from(own).await;
    assert_eq!(report.stored, 2 * 2, "{report:?}");
    swarm.shutdown().await;
}

/// Generates a few tokens as a client with `config` and returns its receipts to the worker.
async fn request_from(config: ClientConfig) -> neuroshard_client::outbox::OutboxReport {
    let client = SwarmClient::connect(config).await.unwrap();
    let mut session = client.session();
    generate(&mut session, PROMPT, 2, &[], |_, _| {})
        .await
        .unwrap();
    session.close().await;
    client.flush_receipts().await
}

/// A worker that sends itself requests under fresh keys and countersigns its own receipts
/// keeps them, but they earn nothing in the credit it shows; a requester holding the pass of
/// an issuer the worker trusts earns it credit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn self_countersigned_receipts_earn_no_shown_credit_and_a_pass_holder_s_do() {
    let model = TestModel::new(&ModelSpec::tiny());
    let layers = ModelInfo::read(model.path())
        .unwrap()
        .config
        .num_hidden_layers as u32;
    let issuer = NodeKey::generate();
    let mut swarm = Swarm::tracker_only().await.unwrap();
    swarm
        .add_node_with(model.path(), 0, layers, |c| {
            c.credit_issuers = vec![issuer.id()]
        })
        .await
        .unwrap();
    let worker = &swarm.nodes[0];
    let mut trusted = worker.ledger().read(|l| l.issuers()).await.unwrap();
    trusted.sort();
    let mut expected = vec![issuer.id(), swarm.tracker.id];
    expected.sort();
    assert_eq!(
        trusted, expected,
        "the configured issuer and the tracker named by key"
    );
    let shown = || async {
        let totals = worker
            .ledger()
            .read(|l| l.totals(neuroshard_net::now_ms(), 0))
            .await
            .unwrap();
        totals[0].lifetime
    };
    for _ in 0..3 {
        let report = request_from(ClientConfig::new(swarm.tracker.url())).await;
        assert_eq!(report.stored, 2, "{report:?}");
    }
    let minted = shown().await;
    assert_eq!(minted.receipts, 6);
    assert_eq!(
        minted.credit, 0.0,
        "fresh keys earn nothing shown: {minted:?}"
    );
    assert!(minted.unvouched > 0.0, "{minted:?}");
    let key = Arc::new(NodeKey::generate());
    let mut config = ClientConfig::new(swarm.tracker.url());
    config.key = Some(key.clone());
    let now = neuroshard_net::now_ms();
    config.pass = Some(PassBody::new(&issuer, key.public(), now, 30).sign(&issuer));
    let report = request_from(config).await;
    assert!(
        report.stored == 2 && report.rejected.is_empty(),
        "{report:?}"
    );
    let earned = shown().await;
    assert_eq!(earned.receipts, 8);
    assert!(earned.credit > 0.0, "{earned:?}");
    assert_eq!(earned.unvouched, minted.unvouched, "{earned:?}");
    let rows = worker
        .ledger()
        .read(|l| l.page(None, 0, 100))
        .await
        .unwrap();
    let vouched: Vec<_> = rows.iter().filter(|r| r.vouched).collect();
    assert_eq!(vouched.len(), 2);
    assert!(vouched.iter().all(|r| r.requester == key.id()));
    // A pass is its holder's alone: a client countersigning as another key is refused.
    let mut borrowed = ClientConfig::new(swarm.tracker.url());
    borrowed.pass = Some(PassBody::new(&issuer, key.public(), now, 30).sign(&issuer));
    let err = SwarmClient::connect(borrowed).await.err().unwrap();
    assert!(
        err.to_string().contains("pass: it vouches for key"),
        "{err}"
    );
    swarm.shutdown().await;
}

/// Set in the child process that runs the node this test kills.
const CHILD_ENV: &str = "NEUROSHARD_TEST_CHILD_NODE";

/// Receipts acknowledged before the kill is sent.
const ACKED_BEFORE_KILL: usize = 60;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_during_a_burst_of_receipts_loses_no_countersigned_receipt() {
    if let Ok(spec) = std::env::var(CHILD_ENV) {
        return run_child_node(&spec).await;
    }
    use tokio::io::AsyncBufReadExt;
    let model = TestModel::new(&ModelSpec::tiny());
    let data = tempfile::tempdir().unwrap();
    let mut child = tokio::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "proofs::kill_9_during_a_burst_of_receipts_loses_no_countersigned_receipt",
            "--exact",
            "--nocapture",
        ])
        .env(
            CHILD_ENV,
            format!("{}\n{}", model.path().display(), data.path().display()),
        )
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = tokio::io::BufReader::new(child.stdout.take().unwrap()).lines();
    let addr = loop {
        let line = lines
            .next_line()
            .await
            .unwrap()
            .expect("the child prints its address");
        if let Some(addr) = line.strip_prefix("CHILD-NODE ") {
            break addr.to_string();
        }
    };
    let requester = Arc::new(NodeKey::generate());
    let node =
        pb::node_client::NodeClient::new(neuroshard_tests::channel_as(&addr, &requester).await);
    let acked: Arc<Mutex<HashSet<String>>> = Arc::default();
    let (enough_tx, mut enough) = tokio::sync::watch::channel(false);
    let enough_tx = Arc::new(enough_tx);
    let mut burst = Vec::new();
    for worker in 0..3 {
        let (mut node, requester, acked, enough_tx) = (
            node.clone(),
            requester.clone(),
            acked.clone(),
            enough_tx.clone(),
        );
        burst.push(tokio::spawn(async move {
            for round in 0.. {
                let mut batch = Vec::new();
                for n in 0..4 {
                    let Ok(receipt) =
                        forward(&mut node, &requester, &format!("{worker}-{round}-{n}")).await
                    else {
                        return;
                    };
                    batch.push(receipt);
                }
                let request = pb::SubmitReceiptsRequest {
                    countersigned: batch
                        .iter()
                        .map(|r| {
                            r.countersign(
                                &requester,
                                Verdict::Accepted {
                                    spot_checked: false,
                                },
                                1.0,
                                1,
                            )
                            .to_wire()
                        })
                        .collect(),
                    pass: Vec::new(),
                };
                let Ok(reply) = node.submit_receipts(request).await else {
                    return;
                };
                assert_eq!(reply.get_ref().stored, 4, "{:?}", reply.get_ref());
                let mut acked = acked.lock().unwrap();
                acked.extend(batch.iter().map(|r| r.id().to_string()));
                if acked.len() >= ACKED_BEFORE_KILL {
                    enough_tx.send_replace(true);
                }
            }
        }));
    }
    within("enough receipts in flight", enough.wait_for(|&e| e))
        .await
        .unwrap();
    // SIGKILL while the workers are still forwarding and submitting.
    child.start_kill().unwrap();
    child.wait().await.unwrap();
    for task in burst {
        task.await.unwrap();
    }
    let acked = acked.lock().unwrap().clone();
    assert!(acked.len() >= ACKED_BEFORE_KILL);
    let ledger = neuroshard_proof::Ledger::open(&data.path().join("ledger.sqlite")).unwrap();
    ledger.integrity_check().unwrap();
    for id in &acked {
        let row = ledger
            .get(id)
            .unwrap()
            .unwrap_or_else(|| panic!("receipt {id} lost"));
        assert_eq!(row.status, Status::Verified);
    }
}

/// One Forward of three tokens in a fresh session, with a receipt.
async fn forward(
    node: &mut pb::node_client::NodeClient<tonic::transport::Channel>,
    requester: &NodeKey,
    session: &str,
) -> Result<Receipt, tonic::Status> {
    let reply = node
        .forward(pb::ForwardRequest {
            session_id: session.into(),
            start_pos: 0,
            layers: Some(pb::LayerSpan { start: 0, end: 4 }),
            input: Some(pb::forward_request::Input::Tokens(pb::TokenIds {
                ids: vec![1, 2, 3],
            })),
            nonce: rand::random::<[u8; 16]>().to_vec(),
            requester_key: requester.public().0.to_vec(),
            ..Default::default()
        })
        .await?;
    Ok(Receipt::from_wire(&reply.get_ref().receipt).expect("a valid receipt"))
}

/// The child side: a node with a data directory, until it is killed.
async fn run_child_node(spec: &str) {
    let (model, data) = spec.split_once('\n').unwrap();
    let mut config = neuroshard_node::node::NodeConfig::new(model, LayerRange::new(0, 4).unwrap());
    config.data_dir = Some(data.into());
    let node = neuroshard_node::node::start_node(config).await.unwrap();
    println!("CHILD-NODE {}", node.advertised());
    std::future::pending::<()>().await;
}
