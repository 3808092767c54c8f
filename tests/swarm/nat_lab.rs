//! The NAT lab (`scripts/nat-lab.sh`): a home namespace behind a router namespace that
//! masquerades it and runs miniupnpd as a real UPnP IGD, and a public namespace with two STUN
//! servers (ours and coturn). The processes inside are `nat-lab-peer` and Debian's daemons.
//!
//! Where this machine cannot make namespaces (not root, no nftables), each test says so on
//! stderr, in capitals, and passes without running.

use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use serde_json::Value;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader, Lines};
use tokio::process::{Child, ChildStdin, ChildStdout, Command};

const HOME_PORT: u16 = 7000;
const WAN_IP: &str = "11.77.0.1";
const STUN_A: &str = "11.77.0.10:3478";
const STUN_B: &str = "11.77.0.11:3478";
/// How long a lab step may take before the test fails.
const STEP: Duration = Duration::from_secs(30);

/// A lab, torn down when dropped.
struct Lab {
    name: String,
}

fn script() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../scripts/nat-lab.sh")
}

impl Lab {
    /// Builds lab `suffix` with the script's `env`; `None` (after saying why) where this
    /// machine cannot.
    fn up(suffix: &str, env: &[(&str, &str)]) -> Option<Self> {
        let name = format!("nl{}{suffix}", std::process::id() % 100_000);
        let check = std::process::Command::new("bash")
            .arg(script())
            .arg("check")
            .env("LAB", &name)
            .output()
            .expect("bash runs");
        if !check.status.success() {
            eprintln!(
                "NAT LAB SKIPPED: {}",
                String::from_utf8_lossy(&check.stdout).trim()
            );
            return None;
        }
        let up = std::process::Command::new("bash")
            .arg(script())
            .arg("up")
            .env("LAB", &name)
            .envs(env.iter().copied())
            .output()
            .expect("bash runs");
        let lab = Self { name };
        assert!(
            up.status.success(),
            "nat-lab.sh up failed: {}{}",
            String::from_utf8_lossy(&up.stdout),
            String::from_utf8_lossy(&up.stderr)
        );
        Some(lab)
    }

    /// `program args` inside namespace `ns` (pub, router or home).
    fn exec(&self, ns: &str, program: &str, args: &[&str]) -> Command {
        let mut command = Command::new("ip");
        command
            .args(["netns", "exec", &format!("{}-{ns}", self.name), program])
            .args(args)
            .kill_on_drop(true);
        command
    }

    /// A `nat-lab-peer` inside `ns`.
    fn peer(&self, ns: &str, args: &[&str], env: &[(&str, String)]) -> Peer {
        let mut command = self.exec(ns, env!("CARGO_BIN_EXE_nat-lab-peer"), args);
        command.envs(env.iter().map(|(k, v)| (*k, v.as_str())));
        Peer::spawn(command)
    }

    /// What `program args` in `ns` printed; fails the test if it failed.
    async fn run(&self, ns: &str, program: &str, args: &[&str]) -> String {
        let out = self.exec(ns, program, args).output().await.unwrap();
        assert!(
            out.status.success(),
            "{program} {args:?} in {ns}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Whether the router forwards `port` (a rule in miniupnpd's chain).
    async fn forwards(&self, port: u16) -> bool {
        let chain = self
            .run(
                "router",
                "nft",
                &["list", "chain", "inet", "miniupnpd", "prerouting_miniupnpd"],
            )
            .await;
        chain.contains(&format!("dport {port} "))
    }

    /// Waits until the router's forward of `port` is there or not, as `wanted`.
    async fn until_forwards(&self, port: u16, wanted: bool) {
        let deadline = tokio::time::Instant::now() + STEP;
        while self.forwards(port).await != wanted {
            assert!(
                tokio::time::Instant::now() < deadline,
                "the router's forward of port {port} is still {}",
                if wanted { "missing" } else { "there" }
            );
            // miniupnpd's lease timer runs on wall time: the test can only look again.
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// The first line a TCP connection from the public side to `addr` reads, or None when the
    /// connection fails (the error is logged).
    async fn dial_from_public(&self, host: &str, port: u16) -> Option<String> {
        let out = self
            .exec(
                "pub",
                "timeout",
                &[
                    "5",
                    "bash",
                    "-c",
                    &format!("exec 3<>/dev/tcp/{host}/{port} && head -n1 <&3"),
                ],
            )
            .output()
            .await
            .unwrap();
        if out.status.success() {
            Some(String::from_utf8_lossy(&out.stdout).trim().to_string())
        } else {
            let why = String::from_utf8_lossy(&out.stderr);
            eprintln!("dialing {host}:{port} from the public side: {}", why.trim());
            None
        }
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        let _ = std::process::Command::new("bash")
            .arg(script())
            .arg("down")
            .env("LAB", &self.name)
            .output();
    }
}

/// A `nat-lab-peer` process and its `LAB kind {json}` lines.
pub(crate) struct Peer {
    child: Child,
    stdin: Option<ChildStdin>,
    lines: Lines<BufReader<ChildStdout>>,
}

impl Peer {
    /// Starts `command` (a `nat-lab-peer`, killed when dropped) with its stdin and stdout
    /// piped.
    pub(crate) fn spawn(mut command: Command) -> Self {
        command
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .kill_on_drop(true);
        let mut child = command.spawn().expect("nat-lab-peer starts");
        let stdin = child.stdin.take();
        let lines = BufReader::new(child.stdout.take().unwrap()).lines();
        Peer {
            child,
            stdin,
            lines,
        }
    }

    /// The process id.
    pub(crate) fn pid(&self) -> u32 {
        self.child.id().expect("running")
    }

    /// The next `kind` line's JSON whose value `matches`, skipping others.
    pub(crate) async fn until(
        &mut self,
        kind: &str,
        mut matches: impl FnMut(&Value) -> bool,
    ) -> Value {
        let prefix = format!("LAB {kind} ");
        let read = async {
            while let Some(line) = self.lines.next_line().await.unwrap() {
                if let Some(json) = line.strip_prefix(&prefix) {
                    let value: Value = serde_json::from_str(json).unwrap();
                    if matches(&value) {
                        return value;
                    }
                }
            }
            panic!("nat-lab-peer ended before a {kind} line");
        };
        tokio::time::timeout(STEP, read)
            .await
            .unwrap_or_else(|_| panic!("no {kind} line within {STEP:?}"))
    }

    /// Waits for the process to end (its output closes).
    async fn ended(&mut self) {
        let read = async { while self.lines.next_line().await.unwrap().is_some() {} };
        tokio::time::timeout(STEP, read)
            .await
            .unwrap_or_else(|_| panic!("nat-lab-peer did not end within {STEP:?}"));
    }

    async fn say(&mut self, line: &str) {
        let stdin = self.stdin.as_mut().unwrap();
        stdin
            .write_all(format!("{line}\n").as_bytes())
            .await
            .unwrap();
        stdin.flush().await.unwrap();
    }
}

/// How many STUN servers in a report saw the router's address.
fn servers_seeing_the_router(report: &Value) -> usize {
    let mapped = report["mapped"].as_array().unwrap();
    let router = format!("{WAN_IP}:");
    mapped
        .iter()
        .filter(|pair| pair[1].as_str().unwrap().starts_with(&router))
        .count()
}

fn state(value: &Value) -> &str {
    value["state"].as_str().unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upnp_maps_the_home_port_renews_and_removes_it_and_stun_sees_the_router() {
    let Some(lab) = Lab::up("a", &[]) else {
        return;
    };
    let mut ours = lab.peer("pub", &["stun-server", STUN_A], &[]);
    ours.until("stun-server", |_| true).await;
    let _coturn = lab
        .exec(
            "pub",
            "turnserver",
            &[
                "-n",
                "--stun-only",
                "--no-cli",
                "--listening-ip",
                "11.77.0.11",
                "--listening-port",
                "3478",
                "--log-file",
                "stdout",
            ],
        )
        .stdout(Stdio::null())
        .spawn()
        .expect("coturn starts");

    // A 4 s lease: renewed every 2 s.
    let mut home = lab.peer(
        "home",
        &["home", &HOME_PORT.to_string()],
        &[
            ("LAB_GATEWAY", "192.168.77.1".into()),
            ("LAB_LEASE_SECS", "4".into()),
            ("LAB_STUN", format!("{STUN_A},{STUN_B}")),
        ],
    );
    let mapped = home.until("portmap", |v| state(v) != "mapping").await;
    assert_eq!(state(&mapped), "mapped", "{mapped}");
    assert_eq!(mapped["external"], format!("{WAN_IP}:{HOME_PORT}"));
    assert_eq!(mapped["internal"], format!("192.168.77.10:{HOME_PORT}"));
    assert!(lab.forwards(HOME_PORT).await);

    // Both STUN servers see the router's address, the same port from each: an
    // endpoint-independent mapping.
    let report = home.until("stun", |_| true).await;
    assert_eq!(report["failed"], Value::Array(vec![]), "{report}");
    assert_eq!(servers_seeing_the_router(&report), 2, "{report}");
    assert_eq!(report["mapping"], "endpoint_independent", "{report}");

    // A public peer reaches the home port through the mapping.
    assert_eq!(
        lab.dial_from_public(WAN_IP, HOME_PORT).await,
        Some("home".into())
    );

    // A mapping nobody renews lapses with its 4 s lease; ours, renewed, outlives it.
    lab.run(
        "home",
        "upnpc",
        &[
            "-e",
            "control",
            "-a",
            "192.168.77.10",
            "7001",
            "7001",
            "TCP",
            "4",
        ],
    )
    .await;
    lab.until_forwards(7001, true).await;
    lab.until_forwards(7001, false).await;
    let renewed = home
        .until("portmap", |v| v["renewals"].as_u64() >= Some(3))
        .await;
    assert_eq!(state(&renewed), "mapped");
    assert!(
        lab.forwards(HOME_PORT).await,
        "renewed past its first lease"
    );

    // Stopping removes the mapping from the router; the port is closed to the public again.
    home.say("stop").await;
    home.until("portmap", |v| state(v) == "removed").await;
    home.until("stopped", |_| true).await;
    assert!(!lab.forwards(HOME_PORT).await);
    assert!(lab.dial_from_public(WAN_IP, HOME_PORT).await.is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_upnp_and_behind_a_port_per_destination_nat_the_home_node_is_told_so() {
    let Some(lab) = Lab::up("b", &[("MINIUPNPD", "off"), ("NAT_MAPPING", "dependent")]) else {
        return;
    };
    let mut first = lab.peer("pub", &["stun-server", STUN_A], &[]);
    let mut second = lab.peer("pub", &["stun-server", STUN_B], &[]);
    first.until("stun-server", |_| true).await;
    second.until("stun-server", |_| true).await;
    let mut home = lab.peer(
        "home",
        &["home", &HOME_PORT.to_string()],
        &[
            ("LAB_GATEWAY", "192.168.77.1".into()),
            ("LAB_STUN", format!("{STUN_A},{STUN_B}")),
        ],
    );
    let failed = home.until("portmap", |v| state(v) != "mapping").await;
    assert_eq!(state(&failed), "failed", "{failed}");
    assert!(
        failed["why"].as_str().unwrap().contains("no UPnP gateway"),
        "{failed}"
    );
    let report = home.until("stun", |_| true).await;
    assert_eq!(report["mapping"], "endpoint_dependent", "{report}");
    assert_eq!(servers_seeing_the_router(&report), 2, "{report}");
    // Nothing forwards the home port: a public peer cannot dial it.
    assert!(lab.dial_from_public(WAN_IP, HOME_PORT).await.is_none());
    home.say("stop").await;
    home.until("stopped", |_| true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_node_answers_stun_on_its_own_port() {
    use neuroshard_nat::stun::{self, Mapping, Retransmit};
    let model = neuroshard_tests::TestModel::new(&neuroshard_model::init::ModelSpec::tiny());
    let config = neuroshard_node::node::NodeConfig::new(
        model.path(),
        neuroshard_base::LayerRange::new(0, 4).unwrap(),
    );
    let node = neuroshard_node::node::start_node(config).await.unwrap();
    let server = node.stun_addr().expect("the node answers STUN");
    assert_eq!(server, node.addr(), "on the node's own port");
    // Junk on the port is dropped; the node answers the next request all the same.
    let junk = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    junk.send_to(b"junk", server).await.unwrap();
    let report = stun::probe(&[server], Retransmit::default()).await.unwrap();
    assert_eq!(report.mapped, [(server, report.local)], "{report:?}");
    assert_eq!(report.mapping, Some(Mapping::None));
    node.shutdown().await;
}

const TRACKER_URL: &str = "http://11.77.0.10:7700";

/// A tracker and a public node serving layers 0..2 in the public namespace.
struct LabSwarm {
    tracker: Peer,
    public: Peer,
}

impl LabSwarm {
    /// The public side, and a home node serving layers 2..4 on port 7000 with `home_env`
    /// added (its UPnP gateway is the router), and the home node's first line.
    async fn start(
        lab: &Lab,
        model: &neuroshard_tests::TestModel,
        home_env: &[(&str, String)],
    ) -> (Self, Peer, Value) {
        let model_dir = model.path().to_str().unwrap();
        let mut tracker = lab.peer("pub", &["tracker", "11.77.0.10:7700"], &[]);
        tracker.until("tracker", |_| true).await;
        let mut public = lab.peer(
            "pub",
            &["node", model_dir, "0", "2", "11.77.0.10:7100"],
            &[
                ("LAB_TRACKER", TRACKER_URL.into()),
                ("LAB_NAT", "off".into()),
            ],
        );
        let public_node = public.until("node", |_| true).await;
        assert_eq!(public_node["reach"]["path"], "untested", "{public_node}");
        let mut env = vec![
            ("LAB_TRACKER", TRACKER_URL.to_string()),
            ("LAB_GATEWAY", "192.168.77.1".into()),
        ];
        env.extend(home_env.iter().cloned());
        let mut home = lab.peer("home", &["node", model_dir, "2", "4", "0.0.0.0:7000"], &env);
        let home_node = home.until("node", |_| true).await;
        eprintln!(
            "nat lab: the home node's reachability: {}",
            home_node["reach"]
        );
        (Self { tracker, public }, home, home_node)
    }

    /// Stops `home` (waiting until it has) and the public side.
    async fn stop(&mut self, home: &mut Peer) {
        home.say("stop").await;
        home.until("stopped", |_| true).await;
        self.public.say("stop").await;
        self.tracker.say("stop").await;
    }
}

/// The address a relayed node announces through `relay`.
fn relayed_through(reach: &Value, relay: &str) -> bool {
    reach["addr"]
        .as_str()
        .is_some_and(|a| a.starts_with(&format!("relay://{relay}/")))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_upnp_the_home_node_is_relayed_and_serves_through_a_relay_restart() {
    use neuroshard_model::init::ModelSpec;
    const TOKENS: usize = 12;
    let Some(lab) = Lab::up("c", &[("MINIUPNPD", "off")]) else {
        return;
    };
    let model = neuroshard_tests::TestModel::new(&ModelSpec::tiny());
    let expected = crate::generation::local_reference(&model, TOKENS).await;
    const RELAY: &str = "11.77.0.11:7101";
    let mut relay = lab.peer("pub", &["relay", RELAY], &[]);
    relay.until("relay", |_| true).await;
    // The home node tries the chain: its own address (a public peer's dial-back cannot reach
    // it), UPnP (no IGD answers), STUN (the router's address; nothing forwards the port), and
    // lands on the relay.
    let (mut others, mut home, home_node) =
        LabSwarm::start(&lab, &model, &[("LAB_RELAY_VIA", RELAY.into())]).await;
    let reach = &home_node["reach"];
    assert_eq!(reach["path"], "relayed", "{home_node}");
    assert!(relayed_through(reach, RELAY), "{home_node}");
    assert_eq!(reach["checked_by"], "11.77.0.10:7100", "{home_node}");
    assert!(
        reach["stun_mapped"]
            .as_str()
            .is_some_and(|m| m.starts_with(&format!("{WAN_IP}:"))),
        "STUN saw the router: {home_node}"
    );
    let advice = reach["advice"].as_str().unwrap();
    assert!(
        advice.contains("enable UPnP") && advice.contains("7000"),
        "{advice}"
    );
    // Nothing forwards the home port: the relay is the only way in.
    assert!(lab.dial_from_public(WAN_IP, 7000).await.is_none());

    // A generation from the public side with the home node in the chain, through the relay,
    // which is stopped after token 4 and started again only once the client goes on: the
    // client's next call finds no way to the home node and asks again, the home node
    // registers with the new relay, and the tokens are the local run's.
    let mut client = lab.peer(
        "pub",
        &["generate", TRACKER_URL, &TOKENS.to_string(), "4"],
        &[],
    );
    client.until("paused", |_| true).await;
    relay.say("stop").await;
    relay.ended().await;
    drop(relay);
    client.say("go").await;
    let mut restarted = lab.peer("pub", &["relay", RELAY], &[]);
    restarted.until("relay", |_| true).await;
    let generated = client.until("generated", |_| true).await;
    let ids: Vec<u32> = serde_json::from_value(generated["ids"].clone()).unwrap();
    assert_eq!(ids, expected.generated_ids, "{generated}");
    let chain = generated["chain"].as_array().unwrap();
    assert!(
        chain.iter().any(|a| a
            .as_str()
            .unwrap()
            .starts_with(&format!("relay://{RELAY}/"))),
        "the home node served in the chain: {generated}"
    );
    let events = generated["events"].to_string();
    assert!(events.contains("no other peer serves"), "{generated}");
    restarted.say("stop").await;
    others.stop(&mut home).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_upnp_the_home_node_is_mapped_and_a_public_peer_dials_it_directly() {
    use neuroshard_model::init::ModelSpec;
    const TOKENS: usize = 6;
    let Some(lab) = Lab::up("d", &[]) else {
        return;
    };
    let model = neuroshard_tests::TestModel::new(&ModelSpec::tiny());
    let expected = crate::generation::local_reference(&model, TOKENS).await;
    let (mut others, mut home, home_node) = LabSwarm::start(&lab, &model, &[]).await;
    let reach = &home_node["reach"];
    assert_eq!(reach["path"], "mapped", "{home_node}");
    assert_eq!(reach["addr"], format!("{WAN_IP}:7000"), "{home_node}");
    assert_eq!(reach["checked_by"], "11.77.0.10:7100", "{home_node}");
    assert!(
        lab.forwards(7000).await,
        "miniupnpd forwards the node's port"
    );

    let mut client = lab.peer(
        "pub",
        &["generate", TRACKER_URL, &TOKENS.to_string(), "99"],
        &[],
    );
    let generated = client.until("generated", |_| true).await;
    let ids: Vec<u32> = serde_json::from_value(generated["ids"].clone()).unwrap();
    assert_eq!(ids, expected.generated_ids, "{generated}");
    assert_eq!(
        generated["chain"][1],
        format!("{WAN_IP}:7000"),
        "the public side dialed the home node directly: {generated}"
    );
    // Stopping the node removes its mapping.
    others.stop(&mut home).await;
    assert!(!lab.forwards(7000).await);
}
