//! TLS 1.3 with both ends authenticated by their node keys, in the manner of libp2p's TLS
//! handshake specification: each side presents a self-signed certificate for a fresh
//! certificate key, carrying an extension in which its ed25519 node key signs that certificate
//! key. A side accepts the other's certificate only when the extension's signature holds, and
//! (when it dialled a particular node) when the node key hashes to the id it meant to reach.
//! No certificate authority is involved: a node is its key.
//!
//! - [`TlsIdentity`]: this side's certificate and certificate key, made from its [`NodeKey`]
//!   (a client without an identity makes a throwaway one).
//! - [`peer_key`]: the node key a peer's certificate proves, or what is wrong with it.
//! - [`connect`] and [`accept`]: the handshake over any stream, each returning the peer's key.
//!
//! The extension follows the specification's layout, so the certificates read as libp2p's
//! do: OID 1.3.6.1.4.1.53594.1.1, a DER `SEQUENCE { publicKey OCTET STRING, signature OCTET
//! STRING }` where `publicKey` is the protobuf-encoded ed25519 key and `signature` the node
//! key's signature over `libp2p-tls-handshake:` followed by the certificate's
//! SubjectPublicKeyInfo. Only ed25519 is used and accepted, for certificate and node keys alike.

use std::sync::Arc;

use neuroshard_base::{NodeId, NodeKey, PublicKey};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{DigitallySignedStruct, DistinguishedName, SignatureScheme};
use tokio::io::{AsyncRead, AsyncWrite};
use x509_parser::prelude::{FromDer, X509Certificate};

/// The public key extension's OID, as libp2p's specification allocates it.
const EXTENSION_OID: [u64; 9] = [1, 3, 6, 1, 4, 1, 53594, 1, 1];

/// What the node key signs, before the certificate key's SubjectPublicKeyInfo.
const SIGNING_PREFIX: &[u8] = b"libp2p-tls-handshake:";

/// The protobuf encoding of an ed25519 key's header: field 1 (type) = 1 (Ed25519), field 2
/// (data) of 32 bytes. The key follows.
const ED25519_KEY_HEADER: [u8; 4] = [0x08, 0x01, 0x12, 0x20];

/// The application protocol spoken inside: gRPC's HTTP/2.
const ALPN: &[u8] = b"h2";

/// The name a client puts in its hello. Peers are not named by DNS: the verifier checks the
/// node key instead, so any fixed name serves.
const SERVER_NAME: &str = "neuroshard.invalid";

/// Why a certificate or handshake was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TlsError {
    /// The certificate does not parse, or breaks the rules of the scheme.
    #[error("the peer's certificate {0}")]
    BadCertificate(String),
    /// The certificate proves a node key other than the one the dialler meant to reach.
    #[error("the peer is node {found}, not node {expected} that was dialled")]
    WrongPeer {
        /// The id dialled.
        expected: String,
        /// The id its certificate proves.
        found: String,
    },
    /// The handshake failed (a broken stream, a protocol error, a refused certificate).
    #[error("TLS handshake: {0}")]
    Handshake(String),
    /// This side could not make its own certificate.
    #[error("making this node's certificate: {0}")]
    Certificate(String),
}

/// This side's certificate, made for its node key, and the certificate key it holds.
#[derive(Debug)]
pub struct TlsIdentity {
    cert: CertificateDer<'static>,
    key: PrivatePkcs8KeyDer<'static>,
    id: NodeId,
}

impl TlsIdentity {
    /// A certificate for a fresh ed25519 certificate key, carrying `node`'s signature of it.
    pub fn new(node: &NodeKey) -> Result<Self, TlsError> {
        Self::made(node.public(), |message| node.sign(message), Vec::new())
    }

    /// A certificate whose extension names `claimed` with the signature `sign` gives, and any
    /// `extra` extensions: [`TlsIdentity::new`] with the node's own key, and none extra.
    fn made(
        claimed: PublicKey,
        sign: impl Fn(&[u8]) -> [u8; 64],
        extra: Vec<rcgen::CustomExtension>,
    ) -> Result<Self, TlsError> {
        let fail = |e: rcgen::Error| TlsError::Certificate(e.to_string());
        let cert_key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ED25519).map_err(fail)?;
        let spki = rcgen::PublicKeyData::subject_public_key_info(&cert_key);
        let signature = sign(&[SIGNING_PREFIX, &spki].concat());
        let encoded_key = [&ED25519_KEY_HEADER[..], &claimed.0].concat();
        let content = yasna::encode_der(&(encoded_key, signature.to_vec()));
        // Not marked critical (the specification allows either): rustls checks this side's
        // own certificate with webpki, which refuses critical extensions it does not know.
        // The peers' checks demand the extension all the same.
        let extension = rcgen::CustomExtension::from_oid_content(&EXTENSION_OID, content);
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).map_err(fail)?;
        params.distinguished_name = rcgen::DistinguishedName::new();
        params.custom_extensions.push(extension);
        params.custom_extensions.extend(extra);
        let cert = params.self_signed(&cert_key).map_err(fail)?;
        Ok(Self {
            cert: cert.der().clone(),
            key: PrivatePkcs8KeyDer::from(cert_key.serialize_der()),
            id: claimed.id(),
        })
    }

    /// The node id this certificate proves.
    pub fn id(&self) -> NodeId {
        self.id
    }

    fn chain(&self) -> (Vec<CertificateDer<'static>>, PrivateKeyDer<'static>) {
        (
            vec![self.cert.clone()],
            PrivateKeyDer::Pkcs8(self.key.clone_key()),
        )
    }
}

/// The node key a peer's certificate proves: the certificate must be in date, self-signed
/// with ed25519, carry the key extension exactly once with a signature that holds, and have
/// no other critical extension.
pub fn peer_key(cert: &[u8]) -> Result<PublicKey, TlsError> {
    let bad = |why: &str| TlsError::BadCertificate(why.to_string());
    let (rest, x509) =
        X509Certificate::from_der(cert).map_err(|e| bad(&format!("does not parse: {e}")))?;
    if !rest.is_empty() {
        return Err(bad("has bytes after its end"));
    }
    if !x509.validity().is_valid() {
        return Err(bad("is not valid at this time"));
    }
    let spki = x509.public_key();
    if spki.algorithm.algorithm != x509_parser::oid_registry::OID_SIG_ED25519
        || x509.signature_algorithm.algorithm != x509_parser::oid_registry::OID_SIG_ED25519
    {
        return Err(bad("is not an ed25519 certificate"));
    }
    let cert_key = ring::signature::UnparsedPublicKey::new(
        &ring::signature::ED25519,
        spki.subject_public_key.data.as_ref(),
    );
    cert_key
        .verify(x509.tbs_certificate.as_ref(), &x509.signature_value.data)
        .map_err(|_| bad("is not signed by its own key"))?;
    let oid = x509_parser::der_parser::oid::Oid::from(&EXTENSION_OID).expect("a valid OID");
    let mut found = None;
    for extension in x509.extensions() {
        if extension.oid == oid {
            if found.is_some() {
                return Err(bad("carries the key extension twice"));
            }
            found = Some(extension.value);
        } else if extension.critical {
            return Err(bad(&format!(
                "carries a critical extension {} this node does not know",
                extension.oid
            )));
        }
    }
    let content = found.ok_or_else(|| bad("carries no node key extension"))?;
    let (encoded_key, signature): (Vec<u8>, Vec<u8>) = yasna::decode_der(content)
        .map_err(|_| bad("has a node key extension that does not parse"))?;
    let key = match encoded_key.strip_prefix(&ED25519_KEY_HEADER[..]) {
        Some(key) if key.len() == 32 => PublicKey::from_slice(key),
        _ => return Err(bad("names a node key that is not ed25519")),
    }
    .map_err(|e| bad(&e.to_string()))?;
    key.verify(&[SIGNING_PREFIX, spki.raw].concat(), &signature)
        .map_err(|_| bad("carries a node key signature that does not hold"))?;
    Ok(key)
}

/// Checks the TLS 1.3 handshake signature `dss` over `message` with the certificate's key.
fn verify_handshake(
    message: &[u8],
    cert: &CertificateDer<'_>,
    dss: &DigitallySignedStruct,
) -> Result<HandshakeSignatureValid, rustls::Error> {
    if dss.scheme != SignatureScheme::ED25519 {
        return Err(rustls::Error::PeerIncompatible(
            rustls::PeerIncompatible::NoSignatureSchemesInCommon,
        ));
    }
    let (_, x509) = X509Certificate::from_der(cert.as_ref())
        .map_err(|_| rustls::Error::InvalidCertificate(rustls::CertificateError::BadEncoding))?;
    let key = ring::signature::UnparsedPublicKey::new(
        &ring::signature::ED25519,
        x509.public_key().subject_public_key.data.as_ref(),
    );
    key.verify(message, dss.signature())
        .map_err(|_| rustls::Error::InvalidCertificate(rustls::CertificateError::BadSignature))?;
    Ok(HandshakeSignatureValid::assertion())
}

/// Refuses a certificate in rustls's terms, keeping the reason.
fn refuse(e: TlsError) -> rustls::Error {
    rustls::Error::InvalidCertificate(rustls::CertificateError::Other(rustls::OtherError(
        Arc::new(e),
    )))
}

/// The key of a peer that presented one self-signed certificate, as [`peer_key`] reads it.
fn lone_key(
    end_entity: &CertificateDer<'_>,
    intermediates: &[CertificateDer<'_>],
) -> Result<PublicKey, rustls::Error> {
    if !intermediates.is_empty() {
        return Err(refuse(TlsError::BadCertificate(
            "comes with a chain; one self-signed certificate is expected".into(),
        )));
    }
    peer_key(end_entity.as_ref()).map_err(refuse)
}

/// The handshake signature checks both verifiers share: TLS 1.3 and ed25519 only.
macro_rules! handshake_signatures {
    () => {
        fn verify_tls12_signature(
            &self,
            _message: &[u8],
            _cert: &CertificateDer<'_>,
            _dss: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, rustls::Error> {
            Err(rustls::Error::PeerIncompatible(
                rustls::PeerIncompatible::Tls12NotOfferedOrEnabled,
            ))
        }

        fn verify_tls13_signature(
            &self,
            message: &[u8],
            cert: &CertificateDer<'_>,
            dss: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, rustls::Error> {
            verify_handshake(message, cert, dss)
        }

        fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
            vec![SignatureScheme::ED25519]
        }
    };
}

/// The dialler's check of the node it reached: a valid certificate of the node it meant.
#[derive(Debug)]
struct ExpectNode(Option<NodeId>);

impl ServerCertVerifier for ExpectNode {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let found = lone_key(end_entity, intermediates)?.id();
        match self.0 {
            Some(expected) if expected != found => Err(refuse(TlsError::WrongPeer {
                expected: expected.to_string(),
                found: found.to_string(),
            })),
            _ => Ok(ServerCertVerified::assertion()),
        }
    }

    handshake_signatures!();
}

/// The listener's check of a caller: any node key, proven by a valid certificate. Who may do
/// what is decided per call, by that key.
#[derive(Debug)]
struct AnyNode;

impl ClientCertVerifier for AnyNode {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        lone_key(end_entity, intermediates)?;
        Ok(ClientCertVerified::assertion())
    }

    handshake_signatures!();
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// A dialler's configuration: TLS 1.3 only, this side's certificate, and the check that the
/// node reached is `expected` (any valid node when none).
pub fn client_config(
    identity: &TlsIdentity,
    expected: Option<NodeId>,
) -> Result<Arc<rustls::ClientConfig>, TlsError> {
    let (chain, key) = identity.chain();
    let mut config = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| TlsError::Certificate(e.to_string()))?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(ExpectNode(expected)))
        .with_client_auth_cert(chain, key)
        .map_err(|e| TlsError::Certificate(e.to_string()))?;
    config.alpn_protocols = vec![ALPN.to_vec()];
    Ok(Arc::new(config))
}

/// A listener's configuration: TLS 1.3 only, this side's certificate, and a certificate
/// demanded of every caller.
pub fn server_config(identity: &TlsIdentity) -> Result<Arc<rustls::ServerConfig>, TlsError> {
    let (chain, key) = identity.chain();
    let mut config = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| TlsError::Certificate(e.to_string()))?
        .with_client_cert_verifier(Arc::new(AnyNode))
        .with_single_cert(chain, key)
        .map_err(|e| TlsError::Certificate(e.to_string()))?;
    config.alpn_protocols = vec![ALPN.to_vec()];
    Ok(Arc::new(config))
}

/// The key behind the certificate a finished handshake saw.
fn presented(certs: Option<&[CertificateDer<'_>]>) -> Result<PublicKey, TlsError> {
    let cert = certs
        .and_then(|c| c.first())
        .ok_or_else(|| TlsError::Handshake("the peer presented no certificate".into()))?;
    peer_key(cert.as_ref())
}

/// Why a handshake failed, with a refused certificate's own reason.
fn handshake_error(e: std::io::Error) -> TlsError {
    let inner = e.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>());
    if let Some(rustls::Error::InvalidCertificate(rustls::CertificateError::Other(other))) = inner
        && let Some(reason) = other.0.downcast_ref::<TlsError>()
    {
        return reason.clone();
    }
    TlsError::Handshake(e.to_string())
}

/// Runs the dialler's side of the handshake over `stream`; the stream and the peer's key.
pub async fn connect<S: AsyncRead + AsyncWrite + Unpin>(
    stream: S,
    config: Arc<rustls::ClientConfig>,
) -> Result<(tokio_rustls::client::TlsStream<S>, PublicKey), TlsError> {
    let name = ServerName::try_from(SERVER_NAME).expect("a valid name");
    let tls = tokio_rustls::TlsConnector::from(config)
        .connect(name, stream)
        .await
        .map_err(handshake_error)?;
    let key = presented(tls.get_ref().1.peer_certificates())?;
    Ok((tls, key))
}

/// Runs the listener's side of the handshake over `stream`; the stream and the caller's key.
pub async fn accept<S: AsyncRead + AsyncWrite + Unpin>(
    stream: S,
    config: Arc<rustls::ServerConfig>,
) -> Result<(tokio_rustls::server::TlsStream<S>, PublicKey), TlsError> {
    let tls = tokio_rustls::TlsAcceptor::from(config)
        .accept(stream)
        .await
        .map_err(handshake_error)?;
    let key = presented(tls.get_ref().1.peer_certificates())?;
    Ok((tls, key))
}

/// Who called, as a server's handlers see it: the address the call came from (none through a
/// relay) and the node key the caller's certificate proved.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Caller {
    /// The caller's socket address, for a direct connection.
    pub addr: Option<std::net::SocketAddr>,
    /// The key its certificate proved.
    pub key: PublicKey,
}

/// The caller of `request`, on a connection a [`crate::spawn_server`] secured.
pub fn caller<T>(request: &tonic::Request<T>) -> Option<Caller> {
    request.extensions().get::<Caller>().copied()
}

/// A connection a server accepted and secured, knowing who is at the other end, and holding
/// its place among the server's open connections until it is dropped.
pub struct SecuredConn<S> {
    tls: tokio_rustls::server::TlsStream<S>,
    caller: Caller,
    _slot: Option<crate::server::Slot>,
}

impl<S> SecuredConn<S> {
    /// `tls`, from `caller`, in `slot`.
    pub(crate) fn new(
        tls: tokio_rustls::server::TlsStream<S>,
        caller: Caller,
        slot: Option<crate::server::Slot>,
    ) -> Self {
        Self {
            tls,
            caller,
            _slot: slot,
        }
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncRead for SecuredConn<S> {
    fn poll_read(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.get_mut().tls).poll_read(cx, buf)
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncWrite for SecuredConn<S> {
    fn poll_write(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.get_mut().tls).poll_write(cx, buf)
    }

    fn poll_flush(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.get_mut().tls).poll_flush(cx)
    }

    fn poll_shutdown(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.get_mut().tls).poll_shutdown(cx)
    }
}

impl<S> tonic::transport::server::Connected for SecuredConn<S> {
    type ConnectInfo = Caller;

    fn connect_info(&self) -> Caller {
        self.caller
    }
}

/// Who this side is when it dials: its certificate, made once from its node key, from which
/// each connection's configuration is made for the node it expects.
#[derive(Debug, Clone)]
pub struct Dialler {
    identity: Arc<TlsIdentity>,
}

impl Dialler {
    /// Dials as `key`: a node as itself, a client as the key it countersigns receipts with,
    /// so the nodes it calls know who called.
    pub fn new(key: &NodeKey) -> Result<Self, TlsError> {
        Ok(Self {
            identity: Arc::new(TlsIdentity::new(key)?),
        })
    }

    /// A throwaway key, made once per process, for callers that have no key of their own to
    /// present (one-off tools, tests).
    pub fn ephemeral() -> Result<Self, TlsError> {
        static EPHEMERAL: std::sync::OnceLock<Dialler> = std::sync::OnceLock::new();
        if let Some(dialler) = EPHEMERAL.get() {
            return Ok(dialler.clone());
        }
        let dialler = Self::new(&NodeKey::generate())?;
        Ok(EPHEMERAL.get_or_init(|| dialler).clone())
    }

    /// Secures `stream` to the node `pin` expects, and pins the node that answered when it
    /// expected none yet; the node's key.
    pub async fn connect<S: AsyncRead + AsyncWrite + Unpin>(
        &self,
        stream: S,
        pin: &Pin,
    ) -> Result<(tokio_rustls::client::TlsStream<S>, PublicKey), TlsError> {
        let (tls, key) = connect(stream, client_config(&self.identity, pin.node())?).await?;
        pin.hold(key.id())?;
        Ok((tls, key))
    }
}

/// The node a channel expects at the other end: the one its caller named (from a signed
/// record, a hop, a configured key), or else the first that answers, which every later
/// connection of the channel must then be.
#[derive(Debug, Clone, Default)]
pub struct Pin(Arc<std::sync::OnceLock<NodeId>>);

impl Pin {
    /// Expecting `node`, or whoever answers first when none.
    pub fn to(node: Option<NodeId>) -> Self {
        let pin = Self::default();
        if let Some(node) = node {
            let _ = pin.0.set(node);
        }
        pin
    }

    /// The node expected, once known.
    pub fn node(&self) -> Option<NodeId> {
        self.0.get().copied()
    }

    /// Checks that `found` is the node expected, pinning it if none was yet.
    fn hold(&self, found: NodeId) -> Result<(), TlsError> {
        let expected = *self.0.get_or_init(|| found);
        if expected != found {
            return Err(TlsError::WrongPeer {
                expected: expected.to_string(),
                found: found.to_string(),
            });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests;
