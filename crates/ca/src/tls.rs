//! mTLS between workloads with SPIFFE identities, on rustls.
//!
//! - [`SpiffeClientVerifier`] (used by servers): a client certificate must chain to the trust
//!   bundle and carry one SPIFFE identity in an accepted trust domain; that identity is what
//!   authorization sees.
//! - [`SpiffeServerVerifier`] (used by clients): the server certificate must chain to the trust
//!   bundle and carry one of the identities the control plane says the destination may have
//!   (Istio's `subjectAltNames`), trust-domain aliases included.
//! - [`CertStore`] holds the workload's current certificate; replacing it affects new
//!   handshakes only, so connections in use are not disturbed by rotation.
//!
//! Failures are logged with their reason (expired, not yet valid, unknown issuer, wrong trust
//! domain, unexpected identity) and fail the handshake.

use std::fmt;
use std::sync::{Arc, RwLock};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::sign::CertifiedKey;
use rustls::{CertificateError, DigitallySignedStruct, DistinguishedName, SignatureScheme};
use rustls_pki_types::TrustAnchor;
use rustls_pki_types::pem::PemObject;

use crate::identity::SpiffeId;

/// ALPN values Istio's proxies offer on mesh connections.
pub const ALPN_ISTIO: &[u8] = b"istio";
pub const ALPN_ISTIO_PEER_EXCHANGE: &[u8] = b"istio-peer-exchange";
pub const ALPN_ISTIO_HTTP11: &[u8] = b"istio-http/1.1";
pub const ALPN_ISTIO_H2: &[u8] = b"istio-h2";
pub const ALPN_H2: &[u8] = b"h2";
pub const ALPN_HTTP11: &[u8] = b"http/1.1";

/// Why a peer certificate was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Rejection {
    Expired,
    NotYetValid,
    /// Does not chain to the trust bundle (self-signed, another mesh's CA, …).
    UnknownIssuer,
    NoSpiffeIdentity,
    WrongTrustDomain {
        identity: String,
    },
    UnexpectedIdentity {
        identity: String,
        expected: Vec<String>,
    },
    Malformed(String),
}

impl fmt::Display for Rejection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Rejection::Expired => write!(f, "peer certificate expired"),
            Rejection::NotYetValid => write!(f, "peer certificate not yet valid"),
            Rejection::UnknownIssuer => {
                write!(
                    f,
                    "peer certificate does not chain to the mesh trust bundle"
                )
            }
            Rejection::NoSpiffeIdentity => {
                write!(f, "peer certificate has no single spiffe:// URI SAN")
            }
            Rejection::WrongTrustDomain { identity } => {
                write!(
                    f,
                    "peer identity {identity} is not in a trusted trust domain"
                )
            }
            Rejection::UnexpectedIdentity { identity, expected } => write!(
                f,
                "peer identity {identity} is not one of the expected [{}]",
                expected.join(", ")
            ),
            Rejection::Malformed(e) => write!(f, "peer certificate unreadable: {e}"),
        }
    }
}

impl std::error::Error for Rejection {}

impl From<Rejection> for rustls::Error {
    fn from(r: Rejection) -> Self {
        tracing::warn!(reason = %r, "mTLS handshake refused");
        let e = match r {
            Rejection::Expired => CertificateError::Expired,
            Rejection::NotYetValid => CertificateError::NotValidYet,
            Rejection::UnknownIssuer => CertificateError::UnknownIssuer,
            other => CertificateError::Other(rustls::OtherError(Arc::new(other))),
        };
        rustls::Error::InvalidCertificate(e)
    }
}

/// The roots a workload trusts and the trust domains whose identities it accepts.
pub struct TrustBundle {
    anchors: Vec<TrustAnchor<'static>>,
    subjects: Vec<DistinguishedName>,
    /// The mesh's trust domain first, then its aliases.
    pub trust_domains: Vec<String>,
}

impl TrustBundle {
    /// From PEM roots (several during a root rotation) and accepted trust domains.
    pub fn from_pem(roots_pem: &str, trust_domains: Vec<String>) -> Result<Self, Rejection> {
        let mut anchors = Vec::new();
        let mut subjects = Vec::new();
        for der in CertificateDer::pem_slice_iter(roots_pem.as_bytes()) {
            let der = der.map_err(|e| Rejection::Malformed(e.to_string()))?;
            let anchor = webpki::anchor_from_trusted_cert(&der)
                .map_err(|e| Rejection::Malformed(e.to_string()))?
                .to_owned();
            subjects.push(DistinguishedName::from(anchor.subject.to_vec()));
            anchors.push(anchor);
        }
        if anchors.is_empty() {
            return Err(Rejection::Malformed(
                "trust bundle has no certificate".into(),
            ));
        }
        Ok(TrustBundle {
            anchors,
            subjects,
            trust_domains,
        })
    }

    /// Verifies a peer chain for `usage` at `now` and returns the peer's identity.
    pub fn verify(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
        usage: webpki::KeyUsage,
    ) -> Result<SpiffeId, Rejection> {
        let cert = webpki::EndEntityCert::try_from(end_entity)
            .map_err(|e| Rejection::Malformed(e.to_string()))?;
        cert.verify_for_usage(
            algorithms().all,
            &self.anchors,
            intermediates,
            now,
            usage,
            None,
            None,
        )
        .map_err(|e| match e {
            webpki::Error::CertExpired { .. } => Rejection::Expired,
            webpki::Error::CertNotValidYet { .. } => Rejection::NotYetValid,
            // Another CA with the same name fails on the signature: it is still not ours.
            webpki::Error::UnknownIssuer | webpki::Error::InvalidSignatureForPublicKey => {
                Rejection::UnknownIssuer
            }
            other => Rejection::Malformed(format!("{other:?}")),
        })?;
        let id = peer_identity(end_entity)?;
        if !self.trust_domains.contains(&id.trust_domain) {
            return Err(Rejection::WrongTrustDomain {
                identity: id.to_string(),
            });
        }
        Ok(id)
    }
}

/// The SPIFFE identity of a certificate: its one `spiffe://` URI SAN.
pub fn peer_identity(der: &CertificateDer<'_>) -> Result<SpiffeId, Rejection> {
    use x509_parser::prelude::{FromDer, GeneralName, X509Certificate};
    let (_, cert) =
        X509Certificate::from_der(der).map_err(|e| Rejection::Malformed(e.to_string()))?;
    let san = cert
        .subject_alternative_name()
        .map_err(|e| Rejection::Malformed(e.to_string()))?;
    let uris: Vec<&str> = san
        .iter()
        .flat_map(|s| s.value.general_names.iter())
        .filter_map(|n| match n {
            GeneralName::URI(u) if u.starts_with("spiffe://") => Some(*u),
            _ => None,
        })
        .collect();
    match uris.as_slice() {
        [one] => one.parse().map_err(|_| Rejection::NoSpiffeIdentity),
        _ => Err(Rejection::NoSpiffeIdentity),
    }
}

/// The handshake-signature methods both verifiers share: the provider's algorithms.
macro_rules! handshake_signatures {
    () => {
        fn verify_tls12_signature(
            &self,
            message: &[u8],
            cert: &CertificateDer<'_>,
            dss: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, rustls::Error> {
            rustls::crypto::verify_tls12_signature(message, cert, dss, &algorithms())
        }

        fn verify_tls13_signature(
            &self,
            message: &[u8],
            cert: &CertificateDer<'_>,
            dss: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, rustls::Error> {
            rustls::crypto::verify_tls13_signature(message, cert, dss, &algorithms())
        }

        fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
            algorithms().supported_schemes()
        }
    };
}

fn algorithms() -> WebPkiSupportedAlgorithms {
    rustls::crypto::ring::default_provider().signature_verification_algorithms
}

/// The crypto provider for every mesh TLS config: one per process (a sidecar makes a config
/// per destination identity, and each would otherwise carry its own copy of the tables).
pub fn provider() -> Arc<CryptoProvider> {
    static PROVIDER: std::sync::OnceLock<Arc<CryptoProvider>> = std::sync::OnceLock::new();
    PROVIDER
        .get_or_init(|| Arc::new(rustls::crypto::ring::default_provider()))
        .clone()
}

/// Server side: requires and verifies client certificates.
#[derive(Clone)]
pub struct SpiffeClientVerifier {
    bundle: Arc<TrustBundle>,
}

impl SpiffeClientVerifier {
    pub fn new(bundle: Arc<TrustBundle>) -> Self {
        SpiffeClientVerifier { bundle }
    }
}

impl fmt::Debug for SpiffeClientVerifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SpiffeClientVerifier")
            .field("trust_domains", &self.bundle.trust_domains)
            .finish()
    }
}

impl ClientCertVerifier for SpiffeClientVerifier {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &self.bundle.subjects
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        self.bundle.verify(
            end_entity,
            intermediates,
            now,
            webpki::KeyUsage::client_auth(),
        )?;
        Ok(ClientCertVerified::assertion())
    }

    handshake_signatures!();
}

/// Client side: verifies that the server is one of the expected identities.
#[derive(Clone)]
pub struct SpiffeServerVerifier {
    bundle: Arc<TrustBundle>,
    /// Accepted identities as URIs; empty accepts any identity of a trusted trust domain.
    expected: Vec<String>,
}

impl SpiffeServerVerifier {
    /// `expected` are Istio `subjectAltNames` (`spiffe://td/ns/x/sa/y`); each is also accepted
    /// under every trust-domain alias of the bundle.
    pub fn new(bundle: Arc<TrustBundle>, expected: &[String]) -> Self {
        let mut all = Vec::new();
        for san in expected {
            all.push(san.clone());
            if let Ok(id) = san.parse::<SpiffeId>() {
                for td in &bundle.trust_domains {
                    let alias = SpiffeId {
                        trust_domain: td.clone(),
                        ..id.clone()
                    }
                    .to_string();
                    if !all.contains(&alias) {
                        all.push(alias);
                    }
                }
            }
        }
        SpiffeServerVerifier {
            bundle,
            expected: all,
        }
    }
}

impl fmt::Debug for SpiffeServerVerifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SpiffeServerVerifier")
            .field("expected", &self.expected)
            .finish()
    }
}

impl ServerCertVerifier for SpiffeServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let id = self.bundle.verify(
            end_entity,
            intermediates,
            now,
            webpki::KeyUsage::server_auth(),
        )?;
        let uri = id.to_string();
        if !self.expected.is_empty() && !self.expected.contains(&uri) {
            return Err(Rejection::UnexpectedIdentity {
                identity: uri,
                expected: self.expected.clone(),
            }
            .into());
        }
        Ok(ServerCertVerified::assertion())
    }

    handshake_signatures!();
}

/// A workload's current certificate and key, swappable while connections use the old one.
#[derive(Debug)]
pub struct CertStore {
    current: RwLock<Arc<CertifiedKey>>,
}

impl CertStore {
    pub fn new(key: CertifiedKey) -> Self {
        CertStore {
            current: RwLock::new(Arc::new(key)),
        }
    }

    /// Replaces the certificate for handshakes from now on.
    pub fn replace(&self, key: CertifiedKey) {
        let mut w = self.current.write().unwrap_or_else(|p| p.into_inner());
        *w = Arc::new(key);
    }

    pub fn current(&self) -> Arc<CertifiedKey> {
        self.current
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}

impl rustls::server::ResolvesServerCert for CertStore {
    fn resolve(&self, _hello: rustls::server::ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current())
    }
}

impl rustls::client::ResolvesClientCert for CertStore {
    fn resolve(
        &self,
        _root_hint_subjects: &[&[u8]],
        _sigschemes: &[SignatureScheme],
    ) -> Option<Arc<CertifiedKey>> {
        Some(self.current())
    }

    fn has_certs(&self) -> bool {
        true
    }
}

/// A [`CertifiedKey`] from a PEM chain (leaf first) and a PEM private key.
pub fn certified_key(chain_pem: &str, key_pem: &str) -> Result<CertifiedKey, Rejection> {
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(chain_pem.as_bytes())
        .collect::<Result<_, _>>()
        .map_err(|e| Rejection::Malformed(e.to_string()))?;
    let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes())
        .map_err(|e| Rejection::Malformed(e.to_string()))?;
    CertifiedKey::from_der(chain, key, &provider()).map_err(|e| Rejection::Malformed(e.to_string()))
}

/// A server config for mesh mTLS: client certificates required and verified.
pub fn server_config(
    bundle: Arc<TrustBundle>,
    certs: Arc<CertStore>,
    alpn: &[&[u8]],
) -> Result<rustls::ServerConfig, rustls::Error> {
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_client_cert_verifier(Arc::new(SpiffeClientVerifier::new(bundle)))
        .with_cert_resolver(certs);
    cfg.alpn_protocols = alpn.iter().map(|a| a.to_vec()).collect();
    Ok(cfg)
}

/// A client config for mesh mTLS to a destination with the `expected` identities.
pub fn client_config(
    bundle: Arc<TrustBundle>,
    expected: &[String],
    certs: Arc<CertStore>,
    alpn: &[&[u8]],
) -> Result<rustls::ClientConfig, rustls::Error> {
    let mut cfg = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(SpiffeServerVerifier::new(bundle, expected)))
        .with_client_cert_resolver(certs);
    cfg.alpn_protocols = alpn.iter().map(|a| a.to_vec()).collect();
    Ok(cfg)
}

/// The SPIFFE identity of the peer of an established connection (for authorization).
pub fn connection_peer(certs: Option<&[CertificateDer<'_>]>) -> Option<SpiffeId> {
    certs
        .and_then(|c| c.first())
        .and_then(|leaf| peer_identity(leaf).ok())
}
