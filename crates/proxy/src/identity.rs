//! The workload identity: the certificate fetched from the CA with the pod's token, the mesh
//! roots, the TLS configurations built from them, and renewal at half-life (Istio's agent).

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, SystemTime};

use isthmus_ca::identity::SpiffeId;
use isthmus_ca::tls::{CertStore, TrustBundle, certified_key};
use isthmus_ca::workload::{Issued, fetch, renewal_delay};

#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    #[error("reading the token {path}: {source}")]
    Token {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("certificate from the CA: {0}")]
    Fetch(#[from] isthmus_ca::workload::FetchError),
    #[error("certificate from the CA is unusable: {0}")]
    Unusable(String),
}

/// The certificate the peer of an mTLS connection presented: the client's where this proxy
/// terminates it, the server's where this proxy makes it.
#[derive(Debug, Clone)]
pub struct PeerCert {
    pub identity: Option<SpiffeId>,
    /// The identity spelled out (`spiffe://…`, empty without one), as metrics label it: once
    /// per connection rather than on each of its requests.
    pub principal: Arc<str>,
    /// SHA-256 of the leaf, hex (the `Hash=` of `x-forwarded-client-cert`).
    pub hash: String,
}

impl PeerCert {
    /// The leaf of a handshake's peer certificates, None without one.
    pub fn of(certs: Option<&[rustls::pki_types::CertificateDer<'_>]>) -> Option<PeerCert> {
        let leaf = certs?.first()?;
        let identity = isthmus_ca::tls::peer_identity(leaf).ok();
        let digest = ring::digest::digest(&ring::digest::SHA256, leaf);
        Some(PeerCert {
            principal: identity
                .as_ref()
                .map(|i| i.to_string().into())
                .unwrap_or_default(),
            identity,
            hash: digest.as_ref().iter().map(|b| format!("{b:02x}")).collect(),
        })
    }
}

/// Where the certificate comes from.
#[derive(Clone)]
pub struct CaClient {
    pub channel: tonic::transport::Channel,
    /// Read for every request: the kubelet rotates projected tokens.
    pub token_path: PathBuf,
    pub ttl: Duration,
}

impl CaClient {
    async fn issue(&self, id: &SpiffeId) -> Result<Issued, IdentityError> {
        let token = tokio::fs::read_to_string(&self.token_path)
            .await
            .map_err(|source| IdentityError::Token {
                path: self.token_path.clone(),
                source,
            })?;
        Ok(fetch(self.channel.clone(), token.trim(), id, self.ttl).await?)
    }
}

pub struct Identity {
    pub id: SpiffeId,
    pub certs: Arc<CertStore>,
    pub bundle: Arc<TrustBundle>,
    /// PEM of the mesh roots, as the proxy trusts them.
    pub roots_pem: String,
    issued: RwLock<(Issued, SystemTime)>,
    servers: Mutex<HashMap<Vec<Vec<u8>>, Arc<rustls::ServerConfig>>>,
    /// Client configs by expected identities and ALPN: a mesh's clusters mostly expect the
    /// same few identities, and share one config each.
    clients: Mutex<HashMap<ClientKey, Arc<rustls::ClientConfig>>>,
    /// One session store for every upstream TLS configuration: rustls' default gives each its
    /// own 256-entry table (≈ 14 KB), and a sidecar has one per expected identity and one per
    /// HTTP pool. Sessions are keyed by SNI, which is per cluster, and rustls resumes one only
    /// under the verifier that made it.
    sessions: Arc<rustls::client::ClientSessionMemoryCache>,
}

/// What makes a client config: the identities a peer may have, and the ALPN offered.
type ClientKey = (Vec<String>, Vec<Vec<u8>>);

/// Upstream server names whose TLS sessions are kept for resumption.
const SESSIONS: usize = 256;

impl std::fmt::Debug for Identity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Identity").field("id", &self.id).finish()
    }
}

impl Identity {
    /// Gets the first certificate.
    pub async fn fetch(
        ca: &CaClient,
        id: SpiffeId,
        roots_pem: String,
        trust_domains: Vec<String>,
    ) -> Result<Identity, IdentityError> {
        let issued = ca.issue(&id).await?;
        Identity::new(id, roots_pem, trust_domains, issued)
    }

    /// The identity `issued` proves, trusting `roots_pem` for `trust_domains`.
    pub fn new(
        id: SpiffeId,
        roots_pem: String,
        trust_domains: Vec<String>,
        issued: Issued,
    ) -> Result<Identity, IdentityError> {
        let bundle = TrustBundle::from_pem(&roots_pem, trust_domains)
            .map_err(|e| IdentityError::Unusable(format!("mesh roots: {e}")))?;
        let key = certified_key(&issued.presented_chain(), &issued.key_pem)
            .map_err(|e| IdentityError::Unusable(e.to_string()))?;
        Ok(Identity {
            id,
            certs: Arc::new(CertStore::new(key)),
            bundle: Arc::new(bundle),
            roots_pem,
            issued: RwLock::new((issued, SystemTime::now())),
            servers: Mutex::default(),
            clients: Mutex::default(),
            sessions: Arc::new(rustls::client::ClientSessionMemoryCache::new(SESSIONS)),
        })
    }

    /// Renews at half-life forever; on failure retries with backoff while the old certificate
    /// is still in use.
    pub async fn renew_forever(self: Arc<Self>, ca: CaClient) {
        let mut backoff = Duration::from_secs(1);
        loop {
            // Half-life counts from when the certificate arrived: the CA backdates
            // certificates, which would make short-lived ones look half-spent already.
            let (start, na) = {
                let i = self.issued.read().unwrap_or_else(|p| p.into_inner());
                (i.0.not_before.max(i.1), i.0.not_after)
            };
            tokio::time::sleep(renewal_delay(start, na, SystemTime::now())).await;
            match self.renew(&ca).await {
                Ok(()) => {
                    backoff = Duration::from_secs(1);
                    tracing::info!(identity = %self.id, "certificate renewed");
                }
                Err(e) => {
                    // The old certificate serves until it expires: say how long that is.
                    let expires_in = na
                        .duration_since(SystemTime::now())
                        .map_or_else(|_| "expired".to_string(), |d| format!("{}s", d.as_secs()));
                    tracing::warn!(
                        error = %e,
                        retry_in = ?backoff,
                        identity = %self.id,
                        expires_in,
                        "certificate renewal failed; the current certificate stays in use until it expires"
                    );
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(60));
                }
            }
        }
    }

    async fn renew(&self, ca: &CaClient) -> Result<(), IdentityError> {
        let issued = ca.issue(&self.id).await?;
        let key = certified_key(&issued.presented_chain(), &issued.key_pem)
            .map_err(|e| IdentityError::Unusable(e.to_string()))?;
        self.certs.replace(key);
        *self.issued.write().unwrap_or_else(|p| p.into_inner()) = (issued, SystemTime::now());
        Ok(())
    }

    /// The current certificate and when it was installed.
    pub fn issued(&self) -> (Issued, SystemTime) {
        self.issued
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Client TLS to a peer that must be one of `sans` (any mesh identity when empty), shared
    /// by every caller with the same identities and ALPN. Clone the config to vary the ALPN:
    /// clones share the verifier, so a session made by one resumes under the others.
    pub fn client_config(
        &self,
        sans: &[String],
        alpn: Vec<Vec<u8>>,
    ) -> Result<Arc<rustls::ClientConfig>, String> {
        let key = (sans.to_vec(), alpn);
        let mut clients = self.clients.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(c) = clients.get(&key) {
            return Ok(c.clone());
        }
        let alpn: Vec<&[u8]> = key.1.iter().map(Vec::as_slice).collect();
        let mut cfg =
            isthmus_ca::tls::client_config(self.bundle.clone(), sans, self.certs.clone(), &alpn)
                .map_err(|e| e.to_string())?;
        cfg.resumption = rustls::client::Resumption::store(self.sessions.clone());
        let cfg = Arc::new(cfg);
        // Configs that no transport holds any more go when a new one comes.
        clients.retain(|_, c| Arc::strong_count(c) > 1);
        clients.insert(key, cfg.clone());
        Ok(cfg)
    }

    /// Server TLS requiring a mesh client certificate. The mesh ALPN values are always
    /// accepted too, so that a peer offering only them is not refused.
    pub fn server_config(&self, alpn: &[Vec<u8>]) -> Result<Arc<rustls::ServerConfig>, String> {
        let mut servers = self.servers.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(c) = servers.get(alpn) {
            return Ok(c.clone());
        }
        let mut all: Vec<&[u8]> = alpn.iter().map(Vec::as_slice).collect();
        for extra in [
            isthmus_ca::tls::ALPN_ISTIO_PEER_EXCHANGE,
            isthmus_ca::tls::ALPN_ISTIO,
        ] {
            if !all.contains(&extra) {
                all.push(extra);
            }
        }
        let cfg = Arc::new(
            isthmus_ca::tls::server_config(self.bundle.clone(), self.certs.clone(), &all)
                .map_err(|e| e.to_string())?,
        );
        servers.insert(alpn.to_vec(), cfg.clone());
        Ok(cfg)
    }
}
