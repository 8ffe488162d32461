//! The proxy's side of ADS, delta (`run`) or state of the world (`run_sotw`): subscribe to
//! clusters and listeners (and Istio's name table when the agent answers DNS), follow them to the endpoints and route configurations they name,
//! keep the latest of each, ACK what decodes and compiles and NACK what does not (the previous
//! good resource stays in force), and publish every accepted state on a watch channel.

use std::collections::{BTreeMap, BTreeSet};
use std::marker::PhantomData;
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::atomic::{AtomicBool, AtomicU64};

use envoy_types::pb::envoy::config::cluster::v3::Cluster;
use envoy_types::pb::envoy::config::core::v3::Node;
use envoy_types::pb::envoy::config::endpoint::v3::ClusterLoadAssignment;
use envoy_types::pb::envoy::config::listener::v3::{Listener, filter};
use envoy_types::pb::envoy::config::route::v3::RouteConfiguration;
use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3::{
    HttpConnectionManager, http_connection_manager,
};
use envoy_types::pb::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse, DiscoveryRequest, DiscoveryResponse,
};
use envoy_types::pb::google::protobuf::Any;
use envoy_types::pb::google::rpc::Status as RpcStatus;
use futures::FutureExt;
use prost::Message;
use prost::bytes::Bytes;
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;

use crate::nds::{NAME_TABLE, NameTable};
use crate::server::{CLUSTER, ENDPOINT, LISTENER, ROUTE};

/// What a proxy subscribes to by wildcard: every cluster and listener.
pub const WILDCARDS: [&str; 2] = [CLUSTER, LISTENER];

/// Everything the proxy has accepted, by name. Resources are shared: an update applies to a
/// copy of the state, and the compiled configuration keeps one for `/config_dump`, without
/// either copying what did not change.
#[derive(Debug, Clone, Default)]
pub struct XdsState {
    pub clusters: BTreeMap<String, Arc<Received<Cluster>>>,
    pub endpoints: BTreeMap<String, Arc<Received<ClusterLoadAssignment>>>,
    pub listeners: BTreeMap<String, Arc<Received<Listener>>>,
    pub routes: BTreeMap<String, Arc<Received<RouteConfiguration>>>,
    /// Istio's name table, for the agent's DNS proxy (one, by Istio's control plane unnamed).
    pub name_tables: BTreeMap<String, Arc<Received<NameTable>>>,
    /// Last accepted system version per type.
    pub versions: BTreeMap<String, String>,
    /// Per type, each resource's version as delta xDS sent it: what a new session resumes from
    /// (`initial_resource_versions`).
    pub resource_versions: BTreeMap<String, BTreeMap<String, String>>,
    /// Responses accepted and rejected per type. Every copy of the state shares them: they
    /// count the proxy's sessions, not one version.
    pub updates: Arc<UpdateCounts>,
    /// The connection to the control plane, shared the same way.
    pub link: Arc<Link>,
}

/// The sessions with the control plane, as Envoy counts its `xds-grpc` cluster's connections
/// and streams and its `control_plane.connected_state`.
#[derive(Debug, Default)]
pub struct Link {
    attempts: AtomicU64,
    connect_failures: AtomicU64,
    streams: AtomicU64,
    connected: AtomicBool,
}

impl Link {
    /// Sessions started; each connects anew.
    pub fn attempts(&self) -> u64 {
        self.attempts.load(Relaxed)
    }
    /// Sessions whose stream never opened because the control plane was out of reach.
    pub fn connect_failures(&self) -> u64 {
        self.connect_failures.load(Relaxed)
    }
    /// Streams the control plane opened.
    pub fn streams(&self) -> u64 {
        self.streams.load(Relaxed)
    }
    /// Whether a stream is open now.
    pub fn connected(&self) -> bool {
        self.connected.load(Relaxed)
    }

    /// Counts a session's start and opens its stream at `path`, sending `requests`; the link
    /// is connected until the returned guard is dropped.
    async fn open<Req, Resp>(
        self: &Arc<Self>,
        channel: &mut tonic::transport::Channel,
        path: &'static str,
        requests: mpsc::Receiver<Req>,
    ) -> Result<(crate::wire::Messages<Resp>, Connected), tonic::Status>
    where
        Req: prost::Message + Send + 'static,
        Resp: prost::Message + Default,
    {
        self.attempts.fetch_add(1, Relaxed);
        let call = crate::wire::call::<_, Resp, _>(
            channel,
            path,
            ReceiverStream::new(requests),
            crate::server::MAX_RESPONSE_BYTES,
        );
        match call.await {
            Ok(r) => {
                self.streams.fetch_add(1, Relaxed);
                self.connected.store(true, Relaxed);
                Ok((r, Connected(self.clone())))
            }
            Err(status) => {
                // tonic's status for a connection that could not be made.
                if status.code() == tonic::Code::Unavailable {
                    self.connect_failures.fetch_add(1, Relaxed);
                }
                Err(status)
            }
        }
    }
}

/// An open stream: the link is connected while this lives.
struct Connected(Arc<Link>);

impl Drop for Connected {
    fn drop(&mut self) {
        self.0.connected.store(false, Relaxed);
    }
}

/// Envoy's `update_success` and `update_rejected`, per type URL.
#[derive(Debug, Default)]
pub struct UpdateCounts(std::sync::Mutex<BTreeMap<String, UpdateCount>>);

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct UpdateCount {
    pub success: u64,
    pub rejected: u64,
}

impl UpdateCounts {
    fn record(&self, type_url: &str, accepted: bool) {
        let mut counts = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let count = counts.entry(type_url.to_string()).or_default();
        if accepted {
            count.success += 1;
        } else {
            count.rejected += 1;
        }
    }

    pub fn get(&self, type_url: &str) -> UpdateCount {
        let counts = self.0.lock().unwrap_or_else(|p| p.into_inner());
        counts.get(type_url).copied().unwrap_or_default()
    }
}

impl XdsState {
    /// Clusters and listeners are in, and so is everything they refer to (every cluster's
    /// endpoint assignment, every listener's route configuration): what Envoy's init manager
    /// waits for before it reports ready.
    pub fn warmed(&self) -> bool {
        self.versions.contains_key(CLUSTER)
            && self.versions.contains_key(LISTENER)
            && self
                .clusters
                .values()
                .flat_map(|c| c.follows())
                .all(|n| self.endpoints.contains_key(n))
            && self
                .listeners
                .values()
                .flat_map(|l| l.follows())
                .all(|n| self.routes.contains_key(n))
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("ADS stream: {0}")]
    Stream(#[from] tonic::Status),
    #[error("ADS stream closed by the control plane")]
    Closed,
}

/// Runs one ADS session until the stream ends. `state` carries what was accepted across
/// sessions: a new session tells the control plane what it has (`initial_resource_versions`),
/// which then sends what changed and what is gone, so a reconnect keeps serving the old
/// configuration while the new one arrives, however many responses that takes. Every
/// accepted state is compiled by `compile`; a response whose state does not compile is NACKed
/// with the error as detail and leaves `state` as it was. Compiled states go to `out`.
/// `wildcards` are the types subscribed whole ([`WILDCARDS`], and [`NAME_TABLE`] for DNS).
pub async fn run<T, F>(
    mut channel: tonic::transport::Channel,
    node: Node,
    wildcards: &[&'static str],
    state: &mut XdsState,
    mut compile: F,
    out: &watch::Sender<Arc<T>>,
) -> Result<(), ClientError>
where
    F: FnMut(&XdsState) -> Result<T, String>,
{
    let (tx, rx) = mpsc::channel(16);
    for &type_url in wildcards {
        let _ = tx
            .send(DeltaDiscoveryRequest {
                node: Some(node.clone()),
                type_url: type_url.into(),
                initial_resource_versions: state
                    .resource_versions
                    .get(type_url)
                    .into_iter()
                    .flatten()
                    .map(|(n, v)| (n.clone(), v.clone()))
                    .collect(),
                ..Default::default()
            })
            .await;
    }
    let link = state.link.clone();
    let (mut responses, _connected) = link
        .open::<_, DeltaDiscoveryResponse>(&mut channel, crate::server::DELTA_PATH, rx)
        .await?;
    let mut subscribed: BTreeMap<&'static str, BTreeSet<String>> = BTreeMap::new();
    while let Some(first) = responses.message().await? {
        // Responses that have already arrived (the parts of one large update) are applied
        // together and compiled once; each is still answered on its own.
        let mut batch = vec![first];
        let mut ended = None;
        while batch.len() < MAX_BATCH {
            match responses.message().now_or_never() {
                Some(Ok(Some(r))) => batch.push(r),
                Some(Ok(None)) => {
                    ended = Some(ClientError::Closed);
                    break;
                }
                Some(Err(e)) => {
                    ended = Some(e.into());
                    break;
                }
                None => break,
            }
        }
        let incoming: Vec<Vec<Incoming<'_>>> = batch
            .iter()
            .map(|resp| {
                resp.resources
                    .iter()
                    .map(|r| Incoming {
                        name: Some(&r.name),
                        version: Some(&r.version),
                        any: r.resource.as_ref(),
                    })
                    .collect()
            })
            .collect();
        let updates: Vec<Update<'_>> = batch
            .iter()
            .zip(&incoming)
            .map(|(resp, incoming)| Update {
                type_url: &resp.type_url,
                version: &resp.system_version_info,
                resources: incoming,
                removed: &resp.removed_resources,
                replace: false,
            })
            .collect();
        let (nacks, follows) = accept_all(state, &updates, &mut compile, out);
        for (resp, nack) in batch.iter().zip(nacks) {
            let _ = tx
                .send(DeltaDiscoveryRequest {
                    type_url: resp.type_url.clone(),
                    response_nonce: resp.nonce.clone(),
                    error_detail: nack.map(rejection),
                    ..Default::default()
                })
                .await;
        }
        for (type_url, names) in follows {
            follow_up(&tx, state, &mut subscribed, type_url, names).await;
        }
        if let Some(e) = ended {
            return Err(e);
        }
    }
    Err(ClientError::Closed)
}

/// A NACK's detail.
fn rejection(message: String) -> RpcStatus {
    RpcStatus {
        code: tonic::Code::InvalidArgument as i32,
        message,
        details: vec![],
    }
}

/// Responses applied together at most (each is a copy of the state less to make).
const MAX_BATCH: usize = 64;

/// Keeps a dependent subscription in step with the state: clusters name endpoints, listeners
/// name routes. The session's first subscription of a type says what of it is already here.
async fn follow_up(
    tx: &mpsc::Sender<DeltaDiscoveryRequest>,
    state: &XdsState,
    subscribed: &mut BTreeMap<&'static str, BTreeSet<String>>,
    type_url: &'static str,
    names: BTreeSet<String>,
) {
    let initial = if subscribed.contains_key(type_url) {
        Default::default()
    } else {
        state
            .resource_versions
            .get(type_url)
            .into_iter()
            .flatten()
            .filter(|(n, _)| names.contains(*n))
            .map(|(n, v)| (n.clone(), v.clone()))
            .collect()
    };
    let current = subscribed.entry(type_url).or_default();
    let subscribe: Vec<String> = names.difference(current).cloned().collect();
    let unsubscribe: Vec<String> = current.difference(&names).cloned().collect();
    if !subscribe.is_empty() || !unsubscribe.is_empty() {
        *current = names;
        let _ = tx
            .send(DeltaDiscoveryRequest {
                type_url: type_url.into(),
                resource_names_subscribe: subscribe,
                resource_names_unsubscribe: unsubscribe,
                initial_resource_versions: initial,
                ..Default::default()
            })
            .await;
    }
}

/// A received resource under the name it goes by.
type Named<T> = (String, Arc<Received<T>>);

/// One resource of a response: its name and version when the protocol gives them (delta),
/// and its body.
struct Incoming<'a> {
    name: Option<&'a str>,
    version: Option<&'a str>,
    any: Option<&'a Any>,
}

/// A resource kind a proxy subscribes to.
pub trait XdsResource: Message + prost::Name + Default {
    /// The name the resource gives itself (state of the world sends no names beside them).
    fn own_name(&self) -> String;
    /// The resources of the next type it refers to: a cluster's endpoint assignment, a
    /// listener's route configurations.
    fn follows(&self) -> Vec<String> {
        Vec::new()
    }
}

impl XdsResource for Cluster {
    fn own_name(&self) -> String {
        self.name.clone()
    }

    fn follows(&self) -> Vec<String> {
        self.eds_cluster_config
            .iter()
            .map(|e| {
                if e.service_name.is_empty() {
                    self.name.clone()
                } else {
                    e.service_name.clone()
                }
            })
            .collect()
    }
}

impl XdsResource for ClusterLoadAssignment {
    fn own_name(&self) -> String {
        self.cluster_name.clone()
    }
}

impl XdsResource for Listener {
    fn own_name(&self) -> String {
        self.name.clone()
    }

    fn follows(&self) -> Vec<String> {
        route_names(self)
    }
}

impl XdsResource for RouteConfiguration {
    fn own_name(&self) -> String {
        self.name.clone()
    }
}

impl XdsResource for NameTable {
    /// Istio's control plane names it nothing.
    fn own_name(&self) -> String {
        String::new()
    }
}

/// A resource as the control plane sent it, kept encoded: the generated structs are several
/// times the size of the bytes (a `Cluster` alone is over 3 KB before any field is set), and a
/// proxy needs them only to compile or dump its configuration, when they are decoded again.
/// What the resource refers to is taken when it is first decoded.
#[derive(Debug)]
pub struct Received<T> {
    body: Bytes,
    follows: Box<[String]>,
    kind: PhantomData<fn() -> T>,
}

impl<T: XdsResource> Received<T> {
    fn new(body: Bytes, decoded: &T) -> Self {
        Received {
            body,
            follows: decoded.follows().into(),
            kind: PhantomData,
        }
    }

    pub fn decode(&self) -> Result<T, prost::DecodeError> {
        T::decode(self.body.clone())
    }

    /// The encoded resource.
    pub fn body(&self) -> &[u8] {
        &self.body
    }

    /// The names of the resources of the next type it refers to.
    pub fn follows(&self) -> &[String] {
        &self.follows
    }
}

impl<T: XdsResource> From<T> for Received<T> {
    fn from(resource: T) -> Self {
        Received::new(resource.encode_to_vec().into(), &resource)
    }
}

/// Applies a response's resources to the state, all or nothing (a response that does not
/// decode changes nothing); `replace` drops what the type
/// held before. Returns the dependent subscription the new state implies (EDS names after
/// CDS, RDS names after LDS).
fn apply(
    state: &mut XdsState,
    type_url: &str,
    resources: &[Incoming<'_>],
    removed: &[String],
    replace: bool,
) -> Result<Follow, String> {
    fn decode<T: XdsResource>(
        type_url: &str,
        resources: &[Incoming<'_>],
    ) -> Result<Vec<Named<T>>, String> {
        resources
            .iter()
            .map(|r| {
                let label = r.name.unwrap_or("(unnamed)");
                let any = r
                    .any
                    .ok_or_else(|| format!("resource {label:?} has no body"))?;
                if any.type_url != type_url {
                    return Err(format!(
                        "resource {label:?} is a {}, not a {type_url}",
                        any.type_url
                    ));
                }
                T::decode(any.value.as_slice())
                    .map(|m| {
                        let body = Bytes::copy_from_slice(&any.value);
                        (
                            r.name.map_or_else(|| m.own_name(), str::to_string),
                            Arc::new(Received::new(body, &m)),
                        )
                    })
                    .map_err(|e| format!("resource {label:?} does not decode: {e}"))
            })
            .collect()
    }
    fn merge<T>(
        map: &mut BTreeMap<String, T>,
        new: Vec<(String, T)>,
        removed: &[String],
        replace: bool,
    ) {
        if replace {
            map.clear();
        }
        for n in removed {
            map.remove(n);
        }
        map.extend(new);
    }
    // Called once the response decoded: a response that does not leaves the state as it was.
    let remember = |state: &mut XdsState| {
        let versions = state
            .resource_versions
            .entry(type_url.to_string())
            .or_default();
        merge(
            versions,
            resources
                .iter()
                .filter_map(|r| Some((r.name?.to_string(), r.version?.to_string())))
                .collect(),
            removed,
            replace,
        );
    };
    match type_url {
        CLUSTER => {
            let new = decode::<Cluster>(type_url, resources)?;
            remember(state);
            merge(&mut state.clusters, new, removed, replace);
            let eds = state
                .clusters
                .values()
                .flat_map(|c| c.follows().iter().cloned())
                .collect();
            Ok(Some((ENDPOINT, eds)))
        }
        ENDPOINT => {
            let new = decode::<ClusterLoadAssignment>(type_url, resources)?;
            remember(state);
            merge(&mut state.endpoints, new, removed, replace);
            Ok(None)
        }
        LISTENER => {
            let new = decode::<Listener>(type_url, resources)?;
            remember(state);
            merge(&mut state.listeners, new, removed, replace);
            let rds = state
                .listeners
                .values()
                .flat_map(|l| l.follows().iter().cloned())
                .collect();
            Ok(Some((ROUTE, rds)))
        }
        ROUTE => {
            let new = decode::<RouteConfiguration>(type_url, resources)?;
            remember(state);
            merge(&mut state.routes, new, removed, replace);
            Ok(None)
        }
        NAME_TABLE => {
            let new = decode::<NameTable>(type_url, resources)?;
            remember(state);
            merge(&mut state.name_tables, new, removed, replace);
            Ok(None)
        }
        other => Err(format!("unexpected type {other}")),
    }
}

/// One response, as both protocols deliver it.
struct Update<'a> {
    type_url: &'a str,
    version: &'a str,
    resources: &'a [Incoming<'a>],
    removed: &'a [String],
    replace: bool,
}

type Follow = Option<(&'static str, BTreeSet<String>)>;

/// Applies responses to a copy of the state and compiles it once: a response that does not
/// apply is NACKed alone; if the result does not compile, all are NACKed and the state is
/// untouched; accepted, the copy becomes the state and the compiled configuration is
/// published. Returns each response's NACK, and the dependent subscriptions the new state
/// implies.
fn accept_all<T, F>(
    state: &mut XdsState,
    updates: &[Update<'_>],
    compile: &mut F,
    out: &watch::Sender<Arc<T>>,
) -> (
    Vec<Option<String>>,
    BTreeMap<&'static str, BTreeSet<String>>,
)
where
    F: FnMut(&XdsState) -> Result<T, String>,
{
    let mut next = state.clone();
    let mut nacks = Vec::with_capacity(updates.len());
    let mut follows = BTreeMap::new();
    for u in updates {
        // `apply` changes nothing when it fails.
        match apply(&mut next, u.type_url, u.resources, u.removed, u.replace) {
            Ok(follow) => {
                next.versions
                    .insert(u.type_url.to_string(), u.version.to_string());
                follows.extend(follow);
                nacks.push(None);
            }
            Err(e) => {
                tracing::warn!(type_url = %u.type_url, error = %e, "rejecting xDS response");
                nacks.push(Some(e));
            }
        }
    }
    if nacks.iter().all(Option::is_some) {
        tally(state, updates, &nacks);
        return (nacks, BTreeMap::new());
    }
    let (nacks, follows) = match compile(&next) {
        Ok(compiled) => {
            *state = next;
            out.send_replace(Arc::new(compiled));
            (nacks, follows)
        }
        Err(e) => {
            tracing::warn!(error = %e, "rejecting xDS responses");
            (
                updates.iter().map(|_| Some(e.clone())).collect(),
                BTreeMap::new(),
            )
        }
    };
    tally(state, updates, &nacks);
    (nacks, follows)
}

fn tally(state: &XdsState, updates: &[Update<'_>], nacks: &[Option<String>]) {
    for (u, nack) in updates.iter().zip(nacks) {
        state.updates.record(u.type_url, nack.is_none());
    }
}

/// Runs one state-of-the-world ADS session (for control planes without delta xDS), with the
/// same contract as [`run`]: every response holds all resources of its type, which replace
/// what the type held; an ACK or NACK carries the version and nonce, and the names of the
/// resources subscribed.
pub async fn run_sotw<T, F>(
    mut channel: tonic::transport::Channel,
    node: Node,
    wildcards: &[&'static str],
    state: &mut XdsState,
    mut compile: F,
    out: &watch::Sender<Arc<T>>,
) -> Result<(), ClientError>
where
    F: FnMut(&XdsState) -> Result<T, String>,
{
    let (tx, rx) = mpsc::channel(16);
    for &type_url in wildcards {
        let _ = tx
            .send(DiscoveryRequest {
                node: Some(node.clone()),
                type_url: type_url.into(),
                ..Default::default()
            })
            .await;
    }
    let link = state.link.clone();
    let (mut responses, _connected) = link
        .open::<_, DiscoveryResponse>(&mut channel, crate::server::SOTW_PATH, rx)
        .await?;
    // Per type: the names subscribed (empty: wildcard), the last accepted version and nonce.
    let mut names: BTreeMap<&'static str, BTreeSet<String>> = BTreeMap::new();
    let mut accepted: BTreeMap<String, String> = BTreeMap::new();
    let mut nonces: BTreeMap<&'static str, String> = BTreeMap::new();
    while let Some(resp) = responses.message().await? {
        let incoming: Vec<Incoming<'_>> = resp
            .resources
            .iter()
            .map(|any| Incoming {
                name: None,
                version: None,
                any: Some(any),
            })
            .collect();
        let update = Update {
            type_url: &resp.type_url,
            version: &resp.version_info,
            resources: &incoming,
            removed: &[],
            replace: true,
        };
        let (nacks, follows) = accept_all(state, &[update], &mut compile, out);
        let nack = nacks.into_iter().next().flatten();
        let follow = follows.into_iter().next();
        if nack.is_none() {
            accepted.insert(resp.type_url.clone(), resp.version_info.clone());
        }
        let type_key = [CLUSTER, ENDPOINT, LISTENER, ROUTE]
            .into_iter()
            .find(|t| *t == resp.type_url);
        if let Some(t) = type_key {
            nonces.insert(t, resp.nonce.clone());
        }
        let _ = tx
            .send(DiscoveryRequest {
                type_url: resp.type_url.clone(),
                version_info: accepted.get(&resp.type_url).cloned().unwrap_or_default(),
                response_nonce: resp.nonce.clone(),
                resource_names: type_key
                    .and_then(|t| names.get(t))
                    .map(|n| n.iter().cloned().collect())
                    .unwrap_or_default(),
                error_detail: nack.map(rejection),
                ..Default::default()
            })
            .await;
        // A changed dependent subscription is a new request with the whole list.
        if let Some((type_url, wanted)) = follow
            && names.get(type_url) != Some(&wanted)
        {
            names.insert(type_url, wanted.clone());
            let _ = tx
                .send(DiscoveryRequest {
                    type_url: type_url.into(),
                    version_info: accepted.get(type_url).cloned().unwrap_or_default(),
                    response_nonce: nonces.get(type_url).cloned().unwrap_or_default(),
                    resource_names: wanted.into_iter().collect(),
                    ..Default::default()
                })
                .await;
        }
    }
    Err(ClientError::Closed)
}

/// The RDS route configurations a listener's HTTP connection managers name.
pub fn route_names(l: &Listener) -> Vec<String> {
    l.filter_chains
        .iter()
        .flat_map(|c| c.filters.iter())
        .filter_map(|f| match &f.config_type {
            Some(filter::ConfigType::TypedConfig(any))
                if any.type_url.ends_with(".HttpConnectionManager") =>
            {
                HttpConnectionManager::decode(any.value.as_slice()).ok()
            }
            _ => None,
        })
        .filter_map(|hcm| match hcm.route_specifier {
            Some(http_connection_manager::RouteSpecifier::Rds(rds)) => Some(rds.route_config_name),
            _ => None,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use envoy_types::pb::envoy::config::cluster::v3::cluster::EdsClusterConfig;
    use envoy_types::pb::envoy::config::listener::v3::{Filter, FilterChain};
    use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3::Rds;
    use envoy_types::util::pack_any;

    use super::*;

    /// What a received resource refers to is what the proxy subscribes to next, and what
    /// compiling a cluster looks its endpoints up by.
    #[test]
    fn a_received_resource_keeps_its_body_and_what_it_refers_to() {
        let eds = |service_name: &str| Cluster {
            name: "outbound|80||a.default.svc.cluster.local".into(),
            eds_cluster_config: Some(EdsClusterConfig {
                service_name: service_name.into(),
                ..Default::default()
            }),
            ..Default::default()
        };
        let own = Received::from(eds(""));
        assert_eq!(own.follows(), ["outbound|80||a.default.svc.cluster.local"]);
        assert_eq!(own.decode().unwrap(), eds(""));
        assert_eq!(Received::from(eds("svc-a")).follows(), ["svc-a"]);
        let static_cluster = Cluster {
            name: "BlackHoleCluster".into(),
            ..Default::default()
        };
        assert!(Received::from(static_cluster).follows().is_empty());

        let hcm = HttpConnectionManager {
            route_specifier: Some(http_connection_manager::RouteSpecifier::Rds(Rds {
                route_config_name: "8080".into(),
                ..Default::default()
            })),
            ..Default::default()
        };
        let listener = Listener {
            name: "0.0.0.0_8080".into(),
            filter_chains: vec![FilterChain {
                filters: vec![Filter {
                    name: "envoy.filters.network.http_connection_manager".into(),
                    config_type: Some(filter::ConfigType::TypedConfig(pack_any(hcm))),
                }],
                ..Default::default()
            }],
            ..Default::default()
        };
        let received = Received::from(listener.clone());
        assert_eq!(received.follows(), ["8080"]);
        assert_eq!(received.body(), listener.encode_to_vec());

        // Warmed once what the clusters and listeners name is in too.
        let mut state = XdsState::default();
        state.versions.insert(CLUSTER.into(), "1".into());
        state.versions.insert(LISTENER.into(), "1".into());
        state
            .clusters
            .insert("c".into(), Arc::new(Received::from(eds("svc-a"))));
        state.listeners.insert("l".into(), Arc::new(received));
        assert!(!state.warmed());
        state.endpoints.insert(
            "svc-a".into(),
            Arc::new(Received::from(ClusterLoadAssignment::default())),
        );
        assert!(!state.warmed(), "the route configuration is missing");
        state.routes.insert(
            "8080".into(),
            Arc::new(Received::from(RouteConfiguration::default())),
        );
        assert!(state.warmed());
    }
}
