//! Handshakes over in-memory streams: both ends learn each other's key, a dialler reaching
//! another node than it meant is refused by name, forged certificates are refused, and what
//! crosses the wire is neither readable nor alterable.

use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};

use super::*;

const SECRET: &[u8] = b"the prompt nobody on the path may read";

/// Listens with `server` and dials expecting `expected`; each side's result.
async fn handshake(
    server: &TlsIdentity,
    client: &TlsIdentity,
    expected: Option<NodeId>,
) -> (Result<PublicKey, TlsError>, Result<PublicKey, TlsError>) {
    let (near, far) = tokio::io::duplex(64 * 1024);
    let (server_config, client_config) = (
        server_config(server).unwrap(),
        client_config(client, expected).unwrap(),
    );
    let (dialled, accepted) =
        tokio::join!(connect(near, client_config), accept(far, server_config));
    (dialled.map(|(_, k)| k), accepted.map(|(_, k)| k))
}

#[tokio::test]
async fn both_ends_learn_the_key_of_the_node_they_talk_to() {
    let (a, b) = (NodeKey::generate(), NodeKey::generate());
    let (server, client) = (TlsIdentity::new(&a).unwrap(), TlsIdentity::new(&b).unwrap());
    let (dialled, accepted) = handshake(&server, &client, Some(a.id())).await;
    assert_eq!(dialled.unwrap(), a.public());
    assert_eq!(accepted.unwrap(), b.public());
    // A caller that names no node (a first contact) still learns who answered.
    let (dialled, _) = handshake(&server, &client, None).await;
    assert_eq!(dialled.unwrap(), a.public());
}

#[tokio::test]
async fn dialling_one_node_and_reaching_another_fails_naming_both() {
    let (a, b, meant) = (
        NodeKey::generate(),
        NodeKey::generate(),
        NodeKey::generate(),
    );
    let (server, client) = (TlsIdentity::new(&a).unwrap(), TlsIdentity::new(&b).unwrap());
    let (dialled, accepted) = handshake(&server, &client, Some(meant.id())).await;
    assert_eq!(
        dialled.unwrap_err(),
        TlsError::WrongPeer {
            expected: meant.id().to_string(),
            found: a.id().to_string(),
        }
    );
    assert!(accepted.is_err(), "the listener sees the dialler give up");
}

#[tokio::test]
async fn forged_certificates_are_refused_by_both_ends() {
    let (node, thief) = (NodeKey::generate(), NodeKey::generate());
    // The node's key in the extension, signed by another key.
    let claimed = TlsIdentity::made(node.public(), |m| thief.sign(m), Vec::new()).unwrap();
    let err = peer_key(claimed.cert.as_ref()).unwrap_err();
    assert!(
        err.to_string().contains("signature that does not hold"),
        "{err}"
    );
    // A critical extension nobody knows.
    let mut strange =
        rcgen::CustomExtension::from_oid_content(&[1, 3, 6, 1, 4, 1, 99, 1], vec![5, 0]);
    strange.set_criticality(true);
    let odd = TlsIdentity::made(node.public(), |m| node.sign(m), vec![strange]).unwrap();
    let err = peer_key(odd.cert.as_ref()).unwrap_err();
    assert!(err.to_string().contains("critical extension"), "{err}");
    // Garbage.
    assert!(matches!(
        peer_key(b"not a certificate"),
        Err(TlsError::BadCertificate(_))
    ));

    let honest = TlsIdentity::new(&node).unwrap();
    let (dialled, _) = handshake(&claimed, &honest, None).await;
    assert!(
        dialled
            .unwrap_err()
            .to_string()
            .contains("signature that does not hold"),
        "a dialler refuses a listener with a forged certificate"
    );
    let (_, accepted) = handshake(&honest, &claimed, None).await;
    assert!(accepted.is_err(), "a listener refuses a forged caller");
}

/// Pumps bytes from `from` to `to`, keeping a copy; once `armed`, flips one bit of the last
/// byte of the next chunk that passes (a record's authentication tag).
async fn pump(
    mut from: tokio::io::ReadHalf<DuplexStream>,
    mut to: tokio::io::WriteHalf<DuplexStream>,
    armed: Arc<std::sync::atomic::AtomicBool>,
) -> Vec<u8> {
    use std::sync::atomic::Ordering;
    let mut seen = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        seen.extend_from_slice(&buf[..n]);
        if armed.swap(false, Ordering::SeqCst) {
            buf[n - 1] ^= 1;
        }
        if to.write_all(&buf[..n]).await.is_err() {
            break;
        }
    }
    let _ = to.shutdown().await;
    seen
}

/// A dialler and a listener with a recording proxy between them; once both have finished the
/// handshake the dialler sends `SECRET` (with one bit flipped on the way if `tamper`) and the
/// listener echoes it. What the listener read, and what crossed toward it.
async fn through_proxy(tamper: bool) -> (std::io::Result<Vec<u8>>, Vec<u8>) {
    let (a, b) = (NodeKey::generate(), NodeKey::generate());
    let server = server_config(&TlsIdentity::new(&a).unwrap()).unwrap();
    let client = client_config(&TlsIdentity::new(&b).unwrap(), Some(a.id())).unwrap();
    let (client_end, proxy_near) = tokio::io::duplex(64 * 1024);
    let (proxy_far, server_end) = tokio::io::duplex(64 * 1024);
    let (near_read, near_write) = tokio::io::split(proxy_near);
    let (far_read, far_write) = tokio::io::split(proxy_far);
    let armed = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let upstream = tokio::spawn(pump(near_read, far_write, armed.clone()));
    let downstream = tokio::spawn(pump(far_read, near_write, Arc::default()));
    let (accepted, ready) = tokio::sync::oneshot::channel();
    let listener = tokio::spawn(async move {
        let (mut tls, _) = accept(server_end, server)
            .await
            .map_err(std::io::Error::other)?;
        let _ = accepted.send(());
        let mut got = vec![0u8; SECRET.len()];
        tls.read_exact(&mut got).await?;
        tls.write_all(&got).await?;
        tls.flush().await?;
        Ok::<_, std::io::Error>(got)
    });
    let (mut tls, _) = connect(client_end, client).await.unwrap();
    // Every handshake byte has reached the listener: the next ones carry the secret.
    ready.await.unwrap();
    armed.store(tamper, std::sync::atomic::Ordering::SeqCst);
    tls.write_all(SECRET).await.unwrap();
    tls.flush().await.unwrap();
    let mut echo = vec![0u8; SECRET.len()];
    let _ = tls.read_exact(&mut echo).await;
    drop(tls);
    let read = listener.await.unwrap();
    let seen = upstream.await.unwrap();
    downstream.abort();
    (read, seen)
}

#[tokio::test]
async fn the_wire_shows_no_plaintext_and_a_flipped_byte_fails_the_read() {
    let (read, seen) = through_proxy(false).await;
    assert_eq!(read.unwrap(), SECRET);
    assert!(
        !seen.windows(SECRET.len()).any(|w| w == SECRET),
        "the secret crossed in the clear"
    );
    let (read, _) = through_proxy(true).await;
    assert!(read.is_err(), "a tampered record was accepted: {read:?}");
}
