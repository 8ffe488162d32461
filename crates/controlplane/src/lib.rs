//! The control-plane process: watches the config directory (debounced as Istio's
//! `PILOT_DEBOUNCE_AFTER`=100 ms / `PILOT_DEBOUNCE_MAX`=10 s), rebuilds the push context,
//! serves ADS on 15010 and the HTTP monitoring port 15014 (`/ready`, `/metrics`, `/debug/*`).

pub mod generator;
pub mod http;
pub mod source;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use isthmus_config::MeshConfig;
use isthmus_pilot::PushContext;
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
}

#[derive(Debug, thiserror::Error)]
pub enum ControlPlaneError {
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("cannot watch {dir}: {message}")]
    Watch { dir: PathBuf, message: String },
}

/// A started control plane.
pub struct Running {
    pub xds_addr: SocketAddr,
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
            Arc::new(PushContext::new(
                snapshot,
                opts.mesh.clone(),
                &opts.domain,
                opts.inbound_passthrough,
            ))
        }
    };
    let context: Shared = Arc::new(RwLock::new(build(snapshot)));
    let (version_tx, version_rx) = watch::channel(1u64);

    let xds_listener = bind(opts.xds_addr).await?;
    let http_listener = bind(opts.http_addr).await?;
    let xds_addr = local(&xds_listener, opts.xds_addr);
    let http_addr = local(&http_listener, opts.http_addr);

    let ads = AdsServer::new(
        Arc::new(PilotGenerator {
            context: context.clone(),
        }),
        version_rx.clone(),
    );
    let state = http::State {
        proxies: ads.proxies(),
        counters: ads.counters.clone(),
        context: context.clone(),
        version: version_rx,
    };
    let mut tasks = Vec::new();
    let service = ads.into_service();
    tasks.push(tokio::spawn(async move {
        let incoming = tokio_stream::wrappers::TcpListenerStream::new(xds_listener);
        if let Err(e) = tonic::transport::Server::builder()
            .add_service(service)
            .serve_with_incoming(incoming)
            .await
        {
            tracing::error!(error = %e, "xDS server stopped");
        }
    }));
    tasks.push(tokio::spawn(http::serve(http_listener, state)));

    // File events → debounced reload → new push context → version bump.
    let (events_tx, mut events_rx) = mpsc::unbounded_channel::<()>();
    let watcher = watch_dir(&opts.config_dir, events_tx)?;
    let shared = context.clone();
    tasks.push(tokio::spawn(async move {
        let mut version = 1u64;
        while events_rx.recv().await.is_some() {
            debounce(&mut events_rx).await;
            let (snapshot, rejected) = source.reload();
            report(&rejected);
            let next = build(snapshot);
            *shared.write().unwrap_or_else(|p| p.into_inner()) = next;
            version += 1;
            tracing::info!(version, "configuration reloaded");
            if version_tx.send(version).is_err() {
                break;
            }
        }
    }));
    Ok(Running {
        xds_addr,
        http_addr,
        context,
        tasks,
        _watcher: watcher,
    })
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

async fn bind(addr: SocketAddr) -> Result<TcpListener, ControlPlaneError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| ControlPlaneError::Bind { addr, source })
}

fn local(l: &TcpListener, fallback: SocketAddr) -> SocketAddr {
    l.local_addr().unwrap_or(fallback)
}
