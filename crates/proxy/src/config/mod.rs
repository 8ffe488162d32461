//! The Envoy configuration the proxy runs, compiled from the xDS it accepted.
//!
//! Compiling is where the proxy decides whether it can implement what it was sent: anything it
//! cannot (an unknown filter, a load balancer it lacks, TLS it has no certificates for) is an
//! error that becomes the NACK's detail, and the previous configuration stays in force.
//! References between resources (a listener naming a route configuration, a route naming a
//! cluster) are resolved per request, so resources may arrive in any order, as in Envoy.

pub mod cluster;
pub mod cors;
pub mod istio_stats;
pub mod jwt;
pub mod listener;
pub mod rbac;
pub mod route;

use std::collections::HashMap;
use std::sync::Arc;

use isthmus_xds::client::{Received, XdsResource, XdsState};

pub use crate::upstream::Pools;
pub use cluster::{Cluster, Endpoint};
pub use listener::{FilterChain, Listener, NetworkFilter};
pub use route::RouteTable;

/// Per-request dynamic metadata: filter name → that filter's values (Envoy's
/// `filter_metadata`), written by one filter (JWT) and read by another (RBAC).
pub type DynamicMetadata = serde_json::Map<String, serde_json::Value>;

/// A resource the proxy cannot run, named for the NACK.
#[derive(Debug, thiserror::Error)]
#[error("{kind} {name:?}: {reason}")]
pub struct CompileError {
    pub kind: &'static str,
    pub name: String,
    pub reason: String,
}

impl CompileError {
    fn new(kind: &'static str, name: &str, reason: impl Into<String>) -> Self {
        CompileError {
            kind,
            name: name.to_string(),
            reason: reason.into(),
        }
    }
}

/// A received resource decoded again (it decoded when it was accepted).
fn decoded<T: XdsResource>(
    kind: &'static str,
    name: &str,
    r: &Received<T>,
) -> Result<T, CompileError> {
    r.decode()
        .map_err(|e| CompileError::new(kind, name, format!("does not decode: {e}")))
}

/// Resources by name, looked up on every request: hashed with foldhash, whose keys here come
/// from the configuration, at a fraction of SipHash's cost.
pub type ByName<V> = HashMap<String, V, foldhash::fast::RandomState>;

/// One consistent configuration; swapped whole on every accepted update.
#[derive(Debug, Default)]
pub struct Config {
    pub listeners: Vec<Arc<Listener>>,
    pub routes: ByName<Arc<RouteTable>>,
    pub clusters: ByName<Arc<Cluster>>,
    /// What it was compiled from, for `/config_dump`.
    pub xds: Arc<XdsState>,
}

impl Config {
    /// Compiles every resource; `pools` keeps connections and counters of unchanged clusters.
    pub fn compile(xds: &XdsState, pools: &Pools) -> Result<Config, CompileError> {
        let listeners = xds
            .listeners
            .iter()
            .map(|(name, l)| listener::compile(&decoded(listener::KIND, name, l)?).map(Arc::new))
            .collect::<Result<Vec<_>, _>>()?;
        let routes = xds
            .routes
            .iter()
            .map(|(name, r)| {
                let r = route::compile(&decoded(route::KIND, name, r)?)?;
                Ok((name.clone(), Arc::new(r)))
            })
            .collect::<Result<ByName<_>, CompileError>>()?;
        let clusters = xds
            .clusters
            .iter()
            .map(|(name, c)| {
                // An EDS cluster names one assignment (its service name, or its own).
                let assignment = c
                    .follows()
                    .first()
                    .and_then(|eds| Some((eds, xds.endpoints.get(eds)?)))
                    .map(|(eds, a)| decoded("endpoint assignment", eds, a))
                    .transpose()?;
                let c = decoded(cluster::KIND, name, c)?;
                Ok((
                    name.clone(),
                    Arc::new(cluster::compile(&c, assignment.as_ref(), pools)?),
                ))
            })
            .collect::<Result<ByName<_>, CompileError>>()?;
        pools.retain(clusters.values());
        Ok(Config {
            listeners,
            routes,
            clusters,
            xds: Arc::new(xds.clone()),
        })
    }

    /// The listener bound at `port` (15001, 15006, …).
    pub fn bound_listener(&self, port: u16) -> Option<&Arc<Listener>> {
        self.listeners
            .iter()
            .find(|l| l.bind && l.address.port() == port)
    }

    /// The listener an original destination is handed to by a `use_original_dst` listener:
    /// the one with exactly that address, else the wildcard one on that port (Envoy's rule),
    /// among listeners of the same traffic direction — so that `virtualInbound` never hands
    /// an inbound connection to the outbound `0.0.0.0_<port>` listener.
    pub fn listener_for(
        &self,
        dst: std::net::SocketAddr,
        direction: listener::Direction,
    ) -> Option<&Arc<Listener>> {
        let candidates = || {
            self.listeners.iter().filter(move |l| {
                !l.bind
                    && (l.direction == direction
                        || l.direction == listener::Direction::Unspecified
                        || direction == listener::Direction::Unspecified)
            })
        };
        candidates().find(|l| l.address == dst).or_else(|| {
            candidates().find(|l| l.address.port() == dst.port() && l.address.ip().is_unspecified())
        })
    }
}
