//! The control-plane process: watches the config directory (debounced as Istio's
//! `PILOT_DEBOUNCE_AFTER`=100 ms / `PILOT_DEBOUNCE_MAX`=10 s), rebuilds the push context,
//! serves ADS on 15010 and the HTTP monitoring port 15014 (`/ready`, `/metrics`, `/debug/*`).

pub mod auth;
pub mod generator;
pub mod grpc;
pub mod http;
pub mod jwks;
pub mod source;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use isthmus_config::MeshConfig;
use isthmus_pilot::PushContext;
use isthmus_pilot::authn::jwks_uris;
use isthmus_xds::AdsServer;
use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch};

use crate::generator::{PilotGenerator, Shared};
use crate::source::DirSource;

pub const DEBOUNCE_AFTER: Duration = Duration::from_millis(100);
pub const DEBOUNCE_MAX: Duration = Duration::from_secs(10);

#[derive(Debug, Clone)]
pub struct Options {
    pub config_dir: PathBuf,
    pub xds_addr: SocketAddr,
    pub http_addr: SocketAddr,
    pub domain: String,
    pub mesh: MeshConfig,
    /// `PILOT_ENABLE_INBOUND_PASSTHROUGH` when set.
    pub inbound_passthrough: Option<bool>,
    /// The CA and the TLS port (Istio's 15012) serving it beside xDS.
    pub ca: Option<CaOptions>,
}

/// Where the CA keeps its files and how it is served.
#[derive(Debug, Clone)]
pub struct CaOptions {
    pub dir: PathBuf,
    pub secure_addr: SocketAddr,
    pub trust_domain: String,
    /// DNS names of the serving certificate (istiod's by default).
    pub dns_names: Vec<String>,
}

/// The names Istio's clients use for istiod.
pub fn istiod_dns_names(namespace: &str) -> Vec<String> {
    vec![
        "istiod".into(),
        format!("istiod.{namespace}"),
        format!("istiod.{namespace}.svc"),
        format!("istiod.{namespace}.svc.cluster.local"),
        format!("istio-pilot.{namespace}.svc"),
    ]
}

/// Lifetime of the control plane's own serving certificate, reissued at each start.
const SERVING_CERT_TTL: Duration = Duration::from_secs(30 * 24 * 3600);

#[derive(Debug, thiserror::Error)]
pub enum ControlPlaneError {
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("cannot watch {dir}: {message}")]
    Watch { dir: PathBuf, message: String },
    #[error("CA: {0}")]
    Ca(#[from] isthmus_ca::CaError),
    #[error("TLS on {addr}: {message}")]
    Tls { addr: SocketAddr, message: String },
}

/// A started control plane.
pub struct Running {
    pub xds_addr: SocketAddr,
    /// The TLS port (CA and xDS), when the CA is on.
    pub secure_addr: Option<SocketAddr>,
    pub http_addr: SocketAddr,
    pub context: Shared,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    _watcher: notify::RecommendedWatcher,
}

impl Drop for Running {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

/// Loads the config, binds the ports and starts serving.
pub async fn start(opts: Options) -> Result<Running, ControlPlaneError> {
    let mut source = DirSource::new(&opts.config_dir);
    let (snapshot, rejected) = source.reload();
    report(&rejected);
    let build = {
        let opts = opts.clone();
        move |snapshot| {
            PushContext::new(
                snapshot,
                opts.mesh.clone(),
                &opts.domain,
                opts.inbound_passthrough,
            )
        }
    };
    let jwks = jwks::JwksCache::default();
    let mut first = build(snapshot);
    first.jwks = jwks.resolve(&jwks_uris(&first.snapshot)).await;
    let context: Shared = Arc::new(RwLock::new(Arc::new(first)));
    let (version_tx, version_rx) = watch::channel(1u64);

    let xds_listener = bind(opts.xds_addr).await?;
    let http_listener = bind(opts.http_addr).await?;
    let xds_addr = local(&xds_listener, opts.xds_addr);
    let http_addr = local(&http_listener, opts.http_addr);

    let ads = AdsServer::new(
        Arc::new(PilotGenerator::new(context.clone())),
        version_rx.clone(),
    );
    let timings = Arc::new(http::Timings::default());
    let state = http::State {
        proxies: ads.proxies(),
        counters: ads.counters.clone(),
        timings: timings.clone(),
        context: context.clone(),
        version: version_rx,
    };
    let mut tasks = Vec::new();
    let secure_ads = ads.clone();
    let counters = ads.counters.clone();
    tasks.push(tokio::spawn(grpc::serve(
        xds_listener,
        tonic::service::Routes::new(ads.into_service()),
        None,
    )));
    tasks.push(tokio::spawn(http::serve(http_listener, state)));
    let secure_addr = match &opts.ca {
        Some(ca) => {
            let (addr, task) = serve_secure(ca, secure_ads).await?;
            tasks.push(task);
            Some(addr)
        }
        None => None,
    };

    // File events → debounced reload → new push context → version bump.
    let (events_tx, mut events_rx) = mpsc::unbounded_channel::<()>();
    let watcher = watch_dir(&opts.config_dir, events_tx.clone())?;
    tasks.push(tokio::spawn(refresh_jwks(
        jwks.clone(),
        context.clone(),
        events_tx,
    )));
    let shared = context.clone();
    tasks.push(tokio::spawn(async move {
        let mut version = 1u64;
        while events_rx.recv().await.is_some() {
            let first_event = std::time::Instant::now();
            debounce(&mut events_rx).await;
            timings
                .debounce
                .observe(first_event.elapsed().as_secs_f64());
            let started = std::time::Instant::now();
            let (snapshot, rejected) = source.reload();
            report(&rejected);
            let mut next = build(snapshot);
            next.jwks = jwks.resolve(&jwks_uris(&next.snapshot)).await;
            let previous = shared.read().unwrap_or_else(|p| p.into_inner()).clone();
            next.follow(&previous);
            timings.init.observe(started.elapsed().as_secs_f64());
            *shared.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(next);
            version += 1;
            tracing::info!(version, "configuration reloaded");
            counters.push_started();
            if version_tx.send(version).is_err() {
                break;
            }
        }
    }));
    Ok(Running {
        xds_addr,
        secure_addr,
        http_addr,
        context,
        tasks,
        _watcher: watcher,
    })
}

/// The TLS port: Istio's CA API and xDS, with a serving certificate from the mesh CA.
async fn serve_secure(
    ca: &CaOptions,
    ads: AdsServer<PilotGenerator>,
) -> Result<(SocketAddr, tokio::task::JoinHandle<()>), ControlPlaneError> {
    let authority = Arc::new(isthmus_ca::Authority::load_or_create(
        &ca.dir,
        isthmus_ca::CaOptions {
            trust_domain: ca.trust_domain.clone(),
            ..Default::default()
        },
    )?);
    let tokens = Arc::new(isthmus_ca::TokenAuthority::load_or_create(&ca.dir)?);
    let (chain, key) = authority.issue_server(&ca.dns_names, SERVING_CERT_TTL)?;
    let listener = bind(ca.secure_addr).await?;
    let addr = local(&listener, ca.secure_addr);
    let tls = server_tls(&authority, chain, &key)
        .map_err(|message| ControlPlaneError::Tls { addr, message })?;
    let ads = ads.with_authorizer(Arc::new(auth::ProxyAuthorizer {
        tokens: tokens.clone(),
    }));
    let routes = tonic::service::Routes::new(
        isthmus_ca::service::CaService::new(authority, tokens).into_server(),
    )
    .add_service(ads.into_service());
    let task = tokio::spawn(grpc::serve(listener, routes, Some(tls)));
    Ok((addr, task))
}

/// TLS of the secure port: the serving chain, HTTP/2, and client certificates of the mesh
/// verified when sent but optional (the CA's callers have none yet: they send a token).
fn server_tls(
    authority: &isthmus_ca::Authority,
    chain: Vec<String>,
    key: &str,
) -> Result<tokio_rustls::TlsAcceptor, String> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let certs = chain
        .iter()
        .map(|pem| CertificateDer::from_pem_slice(pem.as_bytes()))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("serving certificate: {e}"))?;
    let key =
        PrivateKeyDer::from_pem_slice(key.as_bytes()).map_err(|e| format!("serving key: {e}"))?;
    let mut roots = rustls::RootCertStore::empty();
    for root in authority.roots_der() {
        roots
            .add(root)
            .map_err(|e| format!("mesh root certificate: {e}"))?;
    }
    let verifier = rustls::server::WebPkiClientVerifier::builder(Arc::new(roots))
        .allow_unauthenticated()
        .build()
        .map_err(|e| format!("client verifier: {e}"))?;
    let mut config = rustls::ServerConfig::builder()
        .with_client_cert_verifier(verifier)
        .with_single_cert(certs, key)
        .map_err(|e| format!("serving certificate: {e}"))?;
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(tokio_rustls::TlsAcceptor::from(Arc::new(config)))
}

/// Fetches the keys of `jwksUri`s again when due; new keys reload the configuration.
async fn refresh_jwks(jwks: jwks::JwksCache, context: Shared, events: mpsc::UnboundedSender<()>) {
    loop {
        tokio::time::sleep(jwks::RETRY).await;
        let current = context.read().unwrap_or_else(|p| p.into_inner()).clone();
        let uris = jwks_uris(&current.snapshot);
        drop(current);
        if jwks.refresh(&uris).await && events.send(()).is_err() {
            return;
        }
    }
}

/// Waits until events stop for [`DEBOUNCE_AFTER`], or [`DEBOUNCE_MAX`] has passed.
async fn debounce(events: &mut mpsc::UnboundedReceiver<()>) {
    let deadline = tokio::time::Instant::now() + DEBOUNCE_MAX;
    loop {
        let quiet = tokio::time::Instant::now() + DEBOUNCE_AFTER;
        match tokio::time::timeout_at(quiet.min(deadline), events.recv()).await {
            Ok(Some(())) if tokio::time::Instant::now() < deadline => continue,
            _ => return,
        }
    }
}

fn report(rejected: &[source::Rejected]) {
    for r in rejected {
        for e in &r.errors {
            tracing::error!(file = %r.file.display(), "config rejected, last good version kept: {e}");
        }
    }
}

fn watch_dir(
    dir: &std::path::Path,
    tx: mpsc::UnboundedSender<()>,
) -> Result<notify::RecommendedWatcher, ControlPlaneError> {
    use notify::Watcher;
    let err = |e: notify::Error| ControlPlaneError::Watch {
        dir: dir.to_path_buf(),
        message: e.to_string(),
    };
    let mut w = notify::recommended_watcher(move |ev: notify::Result<notify::Event>| {
        if ev.is_ok_and(|e| !e.kind.is_access()) {
            let _ = tx.send(());
        }
    })
    .map_err(err)?;
    w.watch(dir, notify::RecursiveMode::Recursive)
        .map_err(err)?;
    Ok(w)
}

/// Connections waiting to be accepted: every proxy of a large mesh reconnects at once when the
/// control plane restarts, and a busy server accepts them later rather than dropping them.
const LISTEN_BACKLOG: u32 = 4096;

async fn bind(addr: SocketAddr) -> Result<TcpListener, ControlPlaneError> {
    let err = |source| ControlPlaneError::Bind { addr, source };
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()
    } else {
        tokio::net::TcpSocket::new_v6()
    }
    .map_err(err)?;
    socket.set_reuseaddr(true).map_err(err)?;
    socket.bind(addr).map_err(err)?;
    socket.listen(LISTEN_BACKLOG).map_err(err)
}

fn local(l: &TcpListener, fallback: SocketAddr) -> SocketAddr {
    l.local_addr().unwrap_or(fallback)
}
