use std::time::Duration;

use ed25519_dalek::SigningKey;
use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};
use tokio_util::sync::CancellationToken;

use super::frame::{Frame, FrameError, MAX_PAYLOAD};
use super::*;

/// The longest a test waits for the link to change state.
const WAIT: Duration = Duration::from_secs(30);

fn key(seed: u8) -> SigningKey {
    SigningKey::from_bytes(&[seed; 32])
}

async fn decode(bytes: &[u8]) -> Result<Frame, FrameError> {
    let mut reader = bytes;
    Frame::read(&mut reader).await
}

#[tokio::test]
async fn every_frame_round_trips() {
    let frames = [
        Frame::Hello { nonce: [7; 32] },
        Frame::Register {
            key: [1; 32],
            signature: [2; 64],
        },
        Frame::Registered {
            observed: "11.77.0.1:40000".into(),
        },
        Frame::Connect { key: [3; 32] },
        Frame::Connected,
        Frame::Incoming { circuit: u64::MAX },
        Frame::Accept { circuit: 42 },
        Frame::Refused {
            reason: "no room · full".into(),
        },
        Frame::Ping,
        Frame::Pong,
    ];
    for frame in frames {
        let bytes = frame.encode();
        assert_eq!(decode(&bytes).await.unwrap(), frame);
        // Nothing past the frame is read: the circuit's bytes may follow it.
        let mut with_more = bytes.clone();
        with_more.extend_from_slice(b"circuit bytes");
        let mut reader = with_more.as_slice();
        assert_eq!(Frame::read(&mut reader).await.unwrap(), frame);
        assert_eq!(reader, b"circuit bytes");
    }
}

#[tokio::test]
async fn malformed_frames_are_refused_with_what_is_wrong() {
    assert_eq!(decode(&[0, 0, 0]).await, Err(FrameError::UnknownType(0)));
    assert_eq!(
        decode(&[200, 0, 0]).await,
        Err(FrameError::UnknownType(200))
    );
    // A payload over the cap handed to decode directly is refused too (found by fuzzing:
    // it decoded, and encoded back cut).
    assert!(matches!(
        Frame::decode(8, &[b'x'; MAX_PAYLOAD + 1]),
        Err(FrameError::TooLong { kind: 8, .. })
    ));
    // A length over the cap is refused from the header, before any allocation.
    assert_eq!(
        decode(&[8, 0xff, 0xff]).await,
        Err(FrameError::TooLong {
            kind: 8,
            len: 65535
        })
    );
    assert_eq!(
        decode(&[8, 1, 1]).await,
        Err(FrameError::TooLong {
            kind: 8,
            len: MAX_PAYLOAD + 1
        })
    );
    let mut short_hello = vec![1, 0, 31];
    short_hello.extend_from_slice(&[0; 31]);
    assert_eq!(
        decode(&short_hello).await,
        Err(FrameError::BadLength {
            name: "hello",
            len: 31,
            expected: 32
        })
    );
    let mut long_accept = vec![7, 0, 9];
    long_accept.extend_from_slice(&[0; 9]);
    assert!(matches!(
        decode(&long_accept).await,
        Err(FrameError::BadLength { name: "accept", .. })
    ));
    assert!(matches!(
        decode(&[9, 0, 1, 0]).await,
        Err(FrameError::BadLength { name: "ping", .. })
    ));
    assert_eq!(
        decode(&[8, 0, 2, 0xc3, 0x28]).await,
        Err(FrameError::NotUtf8("refused"))
    );
    assert_eq!(
        decode(&[]).await,
        Err(FrameError::Truncated { got: 0, want: 3 })
    );
    assert_eq!(
        decode(&[4, 0]).await,
        Err(FrameError::Truncated { got: 2, want: 3 })
    );
    assert_eq!(
        decode(&[4, 0, 32, 1, 2, 3]).await,
        Err(FrameError::Truncated { got: 6, want: 35 })
    );
    // Over-long text is cut to the cap on encoding, at a character boundary.
    let long = Frame::Refused {
        reason: "é".repeat(MAX_PAYLOAD),
    };
    match decode(&long.encode()).await.unwrap() {
        Frame::Refused { reason } => {
            assert!(reason.len() <= MAX_PAYLOAD && reason.chars().all(|c| c == 'é'))
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn relayed_addresses_parse_and_print() {
    let addr = RelayedAddr {
        relay: "11.77.0.11:7001".into(),
        key: key(9).verifying_key().to_bytes(),
    };
    let text = addr.to_string();
    assert!(text.starts_with("relay://11.77.0.11:7001/"));
    assert_eq!(RelayedAddr::parse(&text).unwrap().unwrap(), addr);
    assert!(RelayedAddr::parse("127.0.0.1:5000").is_none());
    // Multi-byte text of the right byte length, and a sign, are refused rather than sliced.
    let euros = format!("relay://h:1/a{}", "€".repeat(21));
    let signed = format!("relay://h:1/+{}", "0".repeat(63));
    for bad in [euros.as_str(), signed.as_str()] {
        assert!(RelayedAddr::parse(bad).unwrap().is_err(), "{bad}");
    }
    for bad in [
        "relay://",
        "relay://11.77.0.11:7001",
        "relay://11.77.0.11:7001/abc",
        "relay:///0000000000000000000000000000000000000000000000000000000000000000",
        "relay://host:1/zz00000000000000000000000000000000000000000000000000000000000000",
    ] {
        let err = RelayedAddr::parse(bad).unwrap().unwrap_err().to_string();
        assert!(err.contains(bad), "{err}");
    }
}

/// A relay, a node registered with it that echoes every circuit, and the node's address.
/// The node's link stops with `cancel`, the relay with a child of it, `relay_cancel` if given.
async fn relay_with_echo_node(
    config: RelayConfig,
    cancel: &CancellationToken,
    relay_cancel: Option<&CancellationToken>,
) -> (Relay, RelayedAddr, watch::Receiver<LinkState>) {
    let relay_cancel = relay_cancel.unwrap_or(cancel).clone();
    let relay = Relay::start(([127, 0, 0, 1], 0).into(), config, relay_cancel)
        .await
        .unwrap();
    let (circuits, incoming) = mpsc::channel(4);
    let mut state = spawn_link(relay.addr().to_string(), key(1), circuits, cancel.clone());
    let addr = registered(&mut state).await;
    tokio::spawn(echo(incoming));
    (relay, addr, state)
}

async fn registered(state: &mut watch::Receiver<LinkState>) -> RelayedAddr {
    let registration = state.wait_for(|s| matches!(s, LinkState::Registered { .. }));
    let seen = tokio::time::timeout(WAIT, registration)
        .await
        .expect("registered in time")
        .unwrap()
        .clone();
    match seen {
        LinkState::Registered { addr, .. } => addr,
        _ => unreachable!(),
    }
}

async fn echo(mut circuits: mpsc::Receiver<DuplexStream>) {
    while let Some(stream) = circuits.recv().await {
        tokio::spawn(async move {
            let (mut r, mut w) = tokio::io::split(stream);
            let _ = tokio::io::copy(&mut r, &mut w).await;
        });
    }
}

async fn round_trip(stream: &mut DuplexStream, message: &[u8]) -> Vec<u8> {
    stream.write_all(message).await.unwrap();
    let mut back = vec![0u8; message.len()];
    stream.read_exact(&mut back).await.unwrap();
    back
}

#[tokio::test]
async fn a_caller_reaches_a_registered_node_through_the_relay() {
    let cancel = CancellationToken::new();
    let (relay, addr, _state) = relay_with_echo_node(RelayConfig::default(), &cancel, None).await;
    assert_eq!(addr.key, key(1).verifying_key().to_bytes());
    assert_eq!(relay.stats().nodes, 1);
    let mut stream = dial(&addr).await.unwrap();
    let message: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
    assert_eq!(round_trip(&mut stream, &message).await, message);
    // Both ways crossed the relay, sealed: more bytes than the plaintext.
    let stats = relay.stats();
    assert_eq!(stats.circuits, 1);
    assert!(stats.bytes > 2 * message.len() as u64, "{stats:?}");
    // A second caller gets a circuit of its own.
    let mut other = dial(&addr).await.unwrap();
    assert_eq!(round_trip(&mut other, b"second").await, b"second");
    cancel.cancel();
}

#[tokio::test]
async fn the_relay_refuses_unknown_keys_and_forged_registrations() {
    let cancel = CancellationToken::new();
    let (relay, _addr, _state) = relay_with_echo_node(RelayConfig::default(), &cancel, None).await;
    let unknown = RelayedAddr {
        relay: relay.addr().to_string(),
        key: key(2).verifying_key().to_bytes(),
    };
    let err = dial(&unknown).await.unwrap_err().to_string();
    assert!(
        err.contains("refused") && err.contains("no node with key"),
        "{err}"
    );

    // Registering someone else's key without its signature is refused.
    let (mut stream, nonce) = open(&relay.addr().to_string()).await.unwrap();
    let forged = Frame::Register {
        key: key(2).verifying_key().to_bytes(),
        signature: key(3).sign(&frame::register_message(&nonce)).to_bytes(),
    };
    forged.write(&mut stream).await.unwrap();
    match Frame::read(&mut stream).await.unwrap() {
        Frame::Refused { reason } => assert!(reason.contains("signature"), "{reason}"),
        other => panic!("{other:?}"),
    }
    // A signature of another connection's nonce is a replay, refused the same way.
    let (mut stream, _) = open(&relay.addr().to_string()).await.unwrap();
    let replayed = Frame::Register {
        key: key(1).verifying_key().to_bytes(),
        signature: key(1).sign(&frame::register_message(&nonce)).to_bytes(),
    };
    replayed.write(&mut stream).await.unwrap();
    assert!(matches!(
        Frame::read(&mut stream).await.unwrap(),
        Frame::Refused { .. }
    ));
    // A connection that opens with garbage is refused and closed; the relay serves on.
    let (mut stream, _) = open(&relay.addr().to_string()).await.unwrap();
    stream.write_all(&[77, 0, 0]).await.unwrap();
    let mut rest = Vec::new();
    stream.read_to_end(&mut rest).await.unwrap();
    assert!(rest.is_empty());
    assert_eq!(relay.stats().nodes, 1);
    cancel.cancel();
}

/// Two ends of a secured circuit joined by a man in the middle that copies every byte,
/// records what passes towards the node, and flips one byte of it from `flip_at` on.
async fn secured_through_tap(
    caller_wants: SigningKey,
    node_holds: SigningKey,
    flip_at: Option<usize>,
) -> (
    Result<DuplexStream, secure::SecureError>,
    Result<DuplexStream, secure::SecureError>,
    Arc<Mutex<Vec<u8>>>,
) {
    let (caller_io, mut tap_caller) = tokio::io::duplex(1 << 20);
    let (mut tap_node, node_io) = tokio::io::duplex(1 << 20);
    let seen = Arc::new(Mutex::new(Vec::new()));
    let recorded = seen.clone();
    tokio::spawn(async move {
        let mut up = vec![0u8; 4096];
        let mut down = vec![0u8; 4096];
        loop {
            tokio::select! {
                n = tap_caller.read(&mut up) => {
                    let Ok(n @ 1..) = n else { return };
                    let start = recorded.lock().unwrap().len();
                    recorded.lock().unwrap().extend_from_slice(&up[..n]);
                    if let Some(at) = flip_at
                        && (start..start + n).contains(&at)
                    {
                        up[at - start] ^= 0x01;
                    }
                    if tap_node.write_all(&up[..n]).await.is_err() { return }
                }
                n = tap_node.read(&mut down) => {
                    let Ok(n @ 1..) = n else { return };
                    if tap_caller.write_all(&down[..n]).await.is_err() { return }
                }
            }
        }
    });
    let wanted = caller_wants.verifying_key().to_bytes();
    let (caller, node) = tokio::join!(
        secure::initiate(caller_io, &wanted),
        secure::respond(node_io, &node_holds)
    );
    (caller, node, seen)
}

#[tokio::test]
async fn the_relay_sees_only_sealed_bytes_and_cannot_alter_them_unnoticed() {
    let secret = b"the activations of layer 7 at position 12".repeat(4);
    // A tap that only watches: the plaintext never crosses it.
    let (caller, node, seen) = secured_through_tap(key(1), key(1), None).await;
    let (mut caller, mut node) = (caller.unwrap(), node.unwrap());
    caller.write_all(&secret).await.unwrap();
    let mut got = vec![0u8; secret.len()];
    node.read_exact(&mut got).await.unwrap();
    assert_eq!(got, secret);
    let seen = seen.lock().unwrap().clone();
    assert!(seen.len() > secret.len());
    assert!(!seen.windows(16).any(|w| secret.windows(16).any(|s| s == w)));

    // A tap that flips one byte after the handshake: the node's end closes instead of
    // delivering altered bytes.
    let handshake_bytes = seen.len() - (secret.len() + 2 + 16);
    let (caller, node, _) = secured_through_tap(key(1), key(1), Some(handshake_bytes + 10)).await;
    let (mut caller, mut node) = (caller.unwrap(), node.unwrap());
    caller.write_all(&secret).await.unwrap();
    let mut got = Vec::new();
    node.read_to_end(&mut got).await.unwrap();
    assert!(got.is_empty(), "altered bytes were delivered: {got:?}");
}

#[tokio::test]
async fn a_node_without_the_wanted_key_cannot_finish_the_handshake() {
    let (caller, node, _) = secured_through_tap(key(1), key(2), None).await;
    let err = caller.unwrap_err().to_string();
    assert!(err.contains("handshake"), "{err}");
    assert!(node.is_err());
}

#[tokio::test]
async fn a_node_reregisters_after_its_relay_restarts() {
    let cancel = CancellationToken::new();
    let relay_cancel = cancel.child_token();
    let (relay, addr, mut state) =
        relay_with_echo_node(RelayConfig::default(), &cancel, Some(&relay_cancel)).await;
    let port = relay.addr();
    let mut stream = dial(&addr).await.unwrap();
    assert_eq!(round_trip(&mut stream, b"before").await, b"before");

    relay_cancel.cancel();
    let reconnecting = state.wait_for(|s| matches!(s, LinkState::Connecting { .. }));
    tokio::time::timeout(WAIT, reconnecting)
        .await
        .expect("the link notices the relay is gone")
        .unwrap();
    // The same port again, as a restarted relay process would take it.
    let restarted = loop {
        match Relay::start(port, RelayConfig::default(), cancel.clone()).await {
            Ok(relay) => break relay,
            Err(_) => tokio::task::yield_now().await,
        }
    };
    assert_eq!(registered(&mut state).await, addr);
    assert_eq!(restarted.stats().nodes, 1);
    let mut stream = dial(&addr).await.unwrap();
    assert_eq!(round_trip(&mut stream, b"after").await, b"after");
    cancel.cancel();
}

#[tokio::test]
async fn relayed_bytes_keep_to_the_relay_cap() {
    let cancel = CancellationToken::new();
    // 50 KB/s with a one-second burst: 60 KB of echo (120 KB forwarded) needs 1.4 s or more.
    let config = RelayConfig {
        kbps: 50,
        ..RelayConfig::default()
    };
    let (relay, addr, _state) = relay_with_echo_node(config, &cancel, None).await;
    let mut stream = dial(&addr).await.unwrap();
    let message = vec![5u8; 60_000];
    let started = std::time::Instant::now();
    assert_eq!(round_trip(&mut stream, &message).await, message);
    let elapsed = started.elapsed();
    let forwarded = relay.stats().bytes;
    // Less the one-second burst, and 5 % for the handshake's bytes counted before the start.
    let floor = Duration::from_secs_f64((forwarded as f64 - 50_000.0) / 50_000.0 * 0.95);
    assert!(
        elapsed >= floor,
        "{forwarded} bytes in {elapsed:?}, cap allows {floor:?}"
    );
    assert!(floor >= Duration::from_secs(1));
    cancel.cancel();
}

#[tokio::test]
async fn circuits_are_capped_per_address_and_an_idle_one_is_closed() {
    let cancel = CancellationToken::new();
    let config = RelayConfig {
        max_circuits_per_ip: 3,
        idle_timeout: Duration::from_millis(300),
        ..RelayConfig::default()
    };
    let (relay, addr, _state) = relay_with_echo_node(config, &cancel, None).await;
    let mut open = Vec::new();
    for i in 0..3u8 {
        let mut stream = dial(&addr).await.unwrap();
        assert_eq!(round_trip(&mut stream, &[i; 8]).await, [i; 8]);
        open.push(stream);
    }
    let err = dial(&addr).await.unwrap_err().to_string();
    assert!(err.contains("127.0.0.1 holds 3 circuits"), "{err}");
    assert_eq!(relay.stats().circuits, 3);
    // Left idle, every circuit is closed, and its place freed.
    for mut stream in open {
        let mut rest = Vec::new();
        let closed = tokio::time::timeout(WAIT, stream.read_to_end(&mut rest)).await;
        assert!(closed.is_ok(), "an idle circuit stays open");
    }
    let mut again = dial(&addr).await.unwrap();
    assert_eq!(round_trip(&mut again, b"again").await, b"again");
    cancel.cancel();
}
