//! The sidecar: Envoy's data path for the configuration Istio's control plane sends, and
//! pilot-agent's duties (certificate, readiness, merged metrics), in one process.
//!
//! - [`config`] compiles accepted xDS into what the data path runs (and NACKs what it cannot).
//! - [`serve`] accepts on 15001/15006 and picks listener and filter chain; [`tcp`] and
//!   [`http`] are the two network filters; [`upstream`] makes and pools upstream connections.
//! - [`identity`] holds the workload certificate; [`stats`], [`peer`] and [`trace`] are
//!   telemetry.
//! - [`admin`] serves 15000, 15020, 15021 and 15090; [`dns`] answers DNS on 15053; [`agent`]
//!   starts and drains it all.

pub mod access_log;
pub mod admin;
pub mod agent;
pub mod bootstrap;
pub mod config;
pub mod dns;
pub mod envoy_stats;
mod grpc_frames;
mod http;
pub mod identity;
mod idle;
mod inspect;
pub mod log_level;
pub mod peer;
mod peer_exchange;
pub mod pool;
mod serve;
pub mod stats;
mod tcp;
pub mod trace;
pub mod upstream;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use ::http::HeaderValue;
use tokio::sync::watch;

use crate::config::{Cluster, Config};
use crate::identity::PeerCert;
use crate::peer::{Peers, Workload};
use crate::serve::ConnInfo;
use crate::stats::{Parties, Stats};
use crate::upstream::Pools;

/// This proxy, as it presents itself to peers and in telemetry.
#[derive(Debug, Clone)]
pub struct Me {
    pub workload: Arc<Workload>,
    /// `spiffe://…` of the workload.
    pub principal_uri: Arc<str>,
    pub node_id: HeaderValue,
    pub metadata: HeaderValue,
    /// The same metadata as a TCP metadata exchange preamble.
    pub preamble: Arc<[u8]>,
}

/// What every connection of the proxy shares.
pub struct Shared {
    config: watch::Receiver<Arc<Config>>,
    pub pools: Arc<Pools>,
    pub stats: Arc<Stats>,
    pub me: Me,
    /// Peers' metadata headers, decoded once.
    pub peers: Peers,
    pub draining: watch::Receiver<bool>,
    connections: Arc<AtomicUsize>,
    /// Where sampled spans go, and the service they are reported as.
    pub spans: trace::Reporter,
    pub span_endpoint: Arc<trace::Endpoint>,
}

/// Counts a downstream connection while it lives (draining waits for them).
pub struct ConnectionGuard(Arc<AtomicUsize>);

impl Drop for ConnectionGuard {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Shared {
    /// The configuration in force now.
    pub fn config(&self) -> Arc<Config> {
        self.config.borrow().clone()
    }

    pub fn connection_guard(&self) -> ConnectionGuard {
        self.connections.fetch_add(1, Ordering::Relaxed);
        ConnectionGuard(self.connections.clone())
    }

    pub fn active_connections(&self) -> usize {
        self.connections.load(Ordering::Relaxed)
    }

    /// The labels of a request or connection: this workload on one side, the peer (from its
    /// certificate and metadata headers) and the cluster's service on the other, or where the
    /// cluster names no service host, the request's `host` (Istio's Host header fallback).
    /// Outbound, the principals are those of the upstream connection (`upstream`, None on
    /// plaintext), as Istio's stats filter reads them.
    fn parties(
        &self,
        info: &ConnInfo,
        cluster: Option<&Cluster>,
        source_peer: Option<Arc<Workload>>,
        destination_peer: Option<Arc<Workload>>,
        upstream: Option<&PeerCert>,
        host: Option<&str>,
    ) -> Parties {
        let mut service = cluster.and_then(|c| c.service.clone()).unwrap_or_default();
        if let Some(h) = host
            && service.host.is_empty()
        {
            let s = Arc::make_mut(&mut service);
            s.host = h.to_string();
            if s.name.is_empty() {
                s.name = h.to_string();
            }
        }
        if info.inbound() {
            let peer = info.peer.as_ref();
            Parties {
                source: certified(source_peer.unwrap_or_default(), peer),
                source_principal: peer.map(|p| p.principal.clone()).unwrap_or_default(),
                destination: self.me.workload.clone(),
                destination_principal: if peer.is_some() {
                    self.me.principal_uri.clone()
                } else {
                    Arc::default()
                },
                destination_service: service,
                mutual_tls: peer.is_some(),
            }
        } else {
            Parties {
                source: self.me.workload.clone(),
                source_principal: if upstream.is_some() {
                    self.me.principal_uri.clone()
                } else {
                    Arc::default()
                },
                destination: certified(destination_peer.unwrap_or_default(), upstream),
                destination_principal: upstream.map(|p| p.principal.clone()).unwrap_or_default(),
                destination_service: service,
                mutual_tls: false,
            }
        }
    }
}

/// A peer's workload in the namespace its certificate names, which Istio trusts over what its
/// metadata says.
fn certified(mut workload: Arc<Workload>, cert: Option<&PeerCert>) -> Arc<Workload> {
    if let Some(id) = cert.and_then(|c| c.identity.as_ref())
        && workload.namespace != id.namespace
    {
        Arc::make_mut(&mut workload).namespace = id.namespace.clone();
    }
    workload
}
