use super::*;
use neuroshard_base::LayerRange;

/// A made-up id that reads back as `name`.
fn id(name: &str) -> NodeId {
    let mut bytes = [0; 32];
    bytes[..name.len()].copy_from_slice(name.as_bytes());
    NodeId(bytes)
}

fn record(name: &str, start: u32, end: u32) -> PeerRecord {
    PeerRecord {
        node_id: id(name),
        addr: format!("127.0.0.1:{}", 9000 + start),
        model_id: "m".into(),
        layers: LayerRange::new(start, end).unwrap(),
        total_layers: 6,
        load: 0.0,
        public_key: neuroshard_base::NodeKey::generate().public(),
        display_name: String::new(),
        relay: String::new(),
        precision: Default::default(),
        decode_ms_per_layer: 0.0,
    }
}

/// `record` announced from `ip`, at that address.
fn from(name: &str, start: u32, end: u32, ip: [u8; 4]) -> (PeerRecord, Option<IpAddr>) {
    let mut r = record(name, start, end);
    let ip = IpAddr::from(ip);
    r.addr = format!("{ip}:7000");
    (r, Some(ip))
}

#[test]
fn an_id_live_at_two_addresses_is_a_clone() {
    let mut s = TrackerState::new(&TrackerConfig::default());
    let now = Instant::now();
    let home = record("a", 0, 2);
    let mut copy = home.clone();
    copy.addr = "10.0.0.9:7000".into();
    assert!(s.register(home.clone(), None, now).unwrap().1.is_empty());
    assert!(
        s.register(home.clone(), None, now).unwrap().1.is_empty(),
        "a re-registration is not a clone"
    );
    let warnings = s.register(copy.clone(), None, now).unwrap().1;
    assert_eq!(warnings.len(), 1);
    assert!(warnings[0].contains("--regenerate"), "{}", warnings[0]);
    assert_eq!(s.stats(now).clone_warnings, 1);
    // Once the first address has gone silent, moving is not cloning.
    let later = now + Duration::from_secs(31);
    assert!(s.register(home, None, later).unwrap().1.is_empty());
}

#[test]
fn register_returns_at_most_the_cap_and_never_the_caller() {
    let mut s = TrackerState::new(&TrackerConfig::default());
    let now = Instant::now();
    for i in 0..60 {
        s.register(record(&format!("n{i}"), 0, 2), None, now)
            .unwrap();
    }
    let mut other = record("x", 0, 2);
    other.model_id = "other".into();
    s.register(other, None, now).unwrap();
    let (peers, _) = s.register(record("me", 2, 4), None, now).unwrap();
    assert_eq!(peers.len(), 50);
    assert!(
        peers
            .iter()
            .all(|p| p.node_id != id("me") && p.model_id == "m")
    );
    let mut lone = record("y", 0, 2);
    lone.model_id = "lone".into();
    let (peers, _) = s.register(lone, None, now).unwrap();
    assert_eq!(peers.len(), 50, "other models fill the list");
}

#[test]
fn heartbeats_update_layers_and_stats_count_coverage() {
    let mut s = TrackerState::new(&TrackerConfig::default());
    let now = Instant::now();
    s.register(record("a", 0, 2), None, now).unwrap();
    s.register(record("b", 2, 4), None, now).unwrap();
    s.register(record("c", 1, 3), None, now).unwrap();
    assert_eq!(s.stats(now).layers_covered["m"], 4);
    assert!(s.heartbeat(&id("b"), Some(LayerRange::new(2, 6).unwrap()), 0.5, now));
    assert!(!s.heartbeat(&id("ghost"), None, 0.0, now));
    let stats = s.stats(now);
    assert_eq!(stats.nodes, 3);
    assert_eq!(stats.layers_covered["m"], 6);
    assert_eq!(stats.requests, 7);
}

#[test]
fn silent_nodes_expire_in_order_and_a_heartbeat_keeps_one() {
    let mut s = TrackerState::new(&TrackerConfig::default());
    let t0 = Instant::now();
    for (i, name) in ["a", "b", "c"].iter().enumerate() {
        s.register(record(name, 0, 2), None, t0 + Duration::from_secs(i as u64))
            .unwrap();
    }
    assert!(s.heartbeat(&id("a"), None, 0.0, t0 + Duration::from_secs(20)));
    assert_eq!(s.expire(t0 + Duration::from_secs(32)), vec![id("b")]);
    assert_eq!(s.expire(t0 + Duration::from_secs(40)), vec![id("c")]);
    assert_eq!(s.len(), 1);
    assert_eq!(s.expire(t0 + Duration::from_secs(51)), vec![id("a")]);
    assert!(s.is_empty() && s.peers("", t0).is_empty());
}

#[test]
fn a_flood_from_one_address_is_capped_and_others_still_register() {
    let config = TrackerConfig {
        max_nodes: 100,
        max_per_ip: 8,
        ..TrackerConfig::default()
    };
    let mut s = TrackerState::new(&config);
    let now = Instant::now();
    let flooder = [203, 0, 113, 9];
    for i in 0..8 {
        let (r, ip) = from(&format!("f{i}"), 0, 2, flooder);
        s.register(r, ip, now).unwrap();
    }
    for i in 8..200 {
        let (r, ip) = from(&format!("f{i}"), 0, 2, flooder);
        let err = s.register(r, ip, now).unwrap_err();
        assert!(matches!(err, NodeError::Full(_)), "{err}");
        assert!(
            err.to_string().contains("203.0.113.9 already has 8"),
            "{err}"
        );
    }
    // A node already live at the capped address refreshes itself.
    let (r, ip) = from("f3", 2, 4, flooder);
    s.register(r, ip, now).unwrap();
    for (i, ip) in [[198, 51, 100, 1], [198, 51, 100, 2]]
        .into_iter()
        .enumerate()
    {
        let (r, ip) = from(&format!("honest{i}"), 2 * i as u32, 2 * i as u32 + 2, ip);
        s.register(r, ip, now).unwrap();
    }
    assert_eq!(s.len(), 10);
    // Once the flood's nodes go silent, the address may register again.
    assert!(s.heartbeat(&id("honest0"), None, 0.0, now + Duration::from_secs(20)));
    let later = now + Duration::from_secs(31);
    let (r, ip) = from("f200", 0, 2, flooder);
    s.register(r, ip, later).unwrap();
    assert_eq!(s.len(), 2, "the flood's nodes expired, honest0 lives");
}

#[test]
fn an_announced_address_must_be_where_the_node_registers_from() {
    let mut s = TrackerState::new(&TrackerConfig::default());
    let now = Instant::now();
    let (mut r, ip) = from("a", 0, 2, [198, 51, 100, 1]);
    r.addr = "192.0.2.77:7000".into();
    let err = s.register(r, ip, now).unwrap_err().to_string();
    assert!(
        err.contains("announces 192.0.2.77:7000 but registers from 198.51.100.1"),
        "{err}"
    );
    let (mut relayed, ip) = from("b", 0, 2, [198, 51, 100, 1]);
    relayed.addr = format!("relay://relay.example:7400/{}", id("b"));
    s.register(relayed, ip, now).unwrap();
    let (mapped, ip) = from("c", 0, 2, [198, 51, 100, 1]);
    s.register(mapped, ip, now).unwrap();
    assert_eq!(s.len(), 2);
}

#[test]
fn a_model_s_layer_count_is_the_one_most_addresses_claim_and_only_its_nodes_are_listed() {
    let config = TrackerConfig {
        max_nodes: 5,
        ..TrackerConfig::default()
    };
    let mut s = TrackerState::new(&config);
    let now = Instant::now();
    // A squatter registers first with a made-up layer count.
    let (mut squat, ip) = from("squat", 0, 2, [203, 0, 113, 9]);
    squat.total_layers = 4000;
    assert!(s.register(squat.clone(), ip, now).unwrap().1.is_empty());
    // Honest nodes from two addresses claim 6; the first ties and wins on the smaller count.
    for (i, ip) in [[198, 51, 100, 1], [198, 51, 100, 2]]
        .into_iter()
        .enumerate()
    {
        let (r, ip) = from(&format!("h{i}"), 0, 6, ip);
        let (_, warnings) = s.register(r, ip, now).unwrap();
        assert!(warnings.is_empty(), "{warnings:?}");
    }
    let listed: Vec<_> = s.peers("m", now).iter().map(|p| p.node_id).collect();
    assert_eq!(listed, [id("h0"), id("h1")]);
    assert_eq!(s.stats(now).total_layers["m"], 6);
    let (_, warnings) = s.register(squat, ip, now).unwrap();
    assert!(warnings[0].contains("has 6 layers"), "{warnings:?}");
    assert!(s.peers("", now).iter().all(|p| p.node_id != id("squat")));
    // The tracker's cap holds however the nodes are split.
    for i in 0..2 {
        s.register(record(&format!("x{i}"), 0, 2), None, now)
            .unwrap();
    }
    assert!(matches!(
        s.register(record("y", 0, 2), None, now),
        Err(NodeError::Full(_))
    ));
}
