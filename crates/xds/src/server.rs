//! The ADS server: Envoy's `AggregatedDiscoveryService`, state of the world and delta, over one
//! stream per proxy.
//!
//! What to send comes from a [`Generator`]; when the mesh changes, the owner bumps a version on a
//! watch channel and every stream recomputes its subscribed types in Envoy's safe order
//! (CDS → EDS → LDS → RDS), sending only what changed. Each response carries a nonce; a request
//! that answers an older nonce is stale and ignored; an `error_detail` is a NACK, which is
//! logged, counted and kept for `proxy-status`, and the rejected version is not resent.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use envoy_types::pb::envoy::config::core::v3::Node;
use envoy_types::pb::envoy::service::discovery::v3::aggregated_discovery_service_server::{
    AggregatedDiscoveryService, AggregatedDiscoveryServiceServer,
};
use envoy_types::pb::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse, DiscoveryRequest, DiscoveryResponse, Resource,
};
use envoy_types::pb::google::protobuf::Any;
use futures::{Stream, StreamExt};
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

pub const CLUSTER: &str = "type.googleapis.com/envoy.config.cluster.v3.Cluster";
pub const ENDPOINT: &str = "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment";
pub const LISTENER: &str = "type.googleapis.com/envoy.config.listener.v3.Listener";
pub const ROUTE: &str = "type.googleapis.com/envoy.config.route.v3.RouteConfiguration";
pub const SECRET: &str = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret";

/// Push order: a cluster exists before its endpoints, listeners before the routes they name.
pub const PUSH_ORDER: [&str; 5] = [CLUSTER, ENDPOINT, LISTENER, ROUTE, SECRET];

/// Types whose empty subscription means "everything" (wildcard).
fn wildcard_type(type_url: &str) -> bool {
    matches!(type_url, CLUSTER | LISTENER)
}

/// Produces the resources a proxy should have.
pub trait Generator: Send + Sync + 'static {
    /// Every resource of `type_url` for `node`, by name. `names` is the proxy's subscription
    /// (empty for wildcard types); a generator may return more, the server filters.
    fn generate(
        &self,
        node: &Node,
        type_url: &str,
        names: &BTreeSet<String>,
    ) -> Result<BTreeMap<String, Any>, String>;
}

/// A generator serving a fixed set of resources that its owner edits (static configurations,
/// tests); changes are pushed when the server's version is bumped.
#[derive(Debug, Default)]
pub struct FixedGenerator {
    resources: Mutex<BTreeMap<String, BTreeMap<String, Any>>>,
}

impl FixedGenerator {
    pub fn put(&self, type_url: &str, name: &str, any: Any) {
        self.resources
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(type_url.into())
            .or_default()
            .insert(name.into(), any);
    }

    pub fn remove(&self, type_url: &str, name: &str) {
        if let Some(m) = self
            .resources
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get_mut(type_url)
        {
            m.remove(name);
        }
    }
}

impl Generator for FixedGenerator {
    fn generate(
        &self,
        _: &Node,
        type_url: &str,
        _: &BTreeSet<String>,
    ) -> Result<BTreeMap<String, Any>, String> {
        Ok(self
            .resources
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(type_url)
            .cloned()
            .unwrap_or_default())
    }
}

/// What the server knows of one connected proxy, for `proxy-status`.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct ProxyState {
    pub node_id: String,
    pub delta: bool,
    /// Per type: the version sent last, the version acknowledged last, the last NACK.
    pub types: BTreeMap<String, TypeState>,
}

#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct TypeState {
    pub sent_version: String,
    pub sent_nonce: String,
    pub acked_version: String,
    pub nack: Option<String>,
    pub resources: usize,
}

/// Counters the control plane exports as metrics.
#[derive(Debug, Default)]
pub struct Counters {
    pub pushes: AtomicU64,
    pub nacks: AtomicU64,
    pub connections: AtomicU64,
}

/// The ADS service. Clones share their proxies and counters, so one control plane can serve
/// the same ADS on several ports (plaintext 15010, TLS 15012).
pub struct AdsServer<G> {
    generator: Arc<G>,
    version: watch::Receiver<u64>,
    proxies: Arc<Mutex<BTreeMap<u64, ProxyState>>>,
    next_id: Arc<AtomicU64>,
    pub counters: Arc<Counters>,
}

impl<G> Clone for AdsServer<G> {
    fn clone(&self) -> Self {
        AdsServer {
            generator: self.generator.clone(),
            version: self.version.clone(),
            proxies: self.proxies.clone(),
            next_id: self.next_id.clone(),
            counters: self.counters.clone(),
        }
    }
}

impl<G: Generator> AdsServer<G> {
    /// `version` changes whenever the mesh does.
    pub fn new(generator: Arc<G>, version: watch::Receiver<u64>) -> Self {
        AdsServer {
            generator,
            version,
            proxies: Arc::default(),
            next_id: Arc::new(AtomicU64::new(1)),
            counters: Arc::default(),
        }
    }

    /// A handle on the per-proxy state, for debug endpoints.
    pub fn proxies(&self) -> Arc<Mutex<BTreeMap<u64, ProxyState>>> {
        self.proxies.clone()
    }

    pub fn into_service(self) -> AggregatedDiscoveryServiceServer<Self> {
        AggregatedDiscoveryServiceServer::new(self).max_decoding_message_size(MAX_REQUEST_BYTES)
    }
}

/// Requests from a proxy are small; anything larger is not an Envoy talking.
const MAX_REQUEST_BYTES: usize = 4 << 20;
/// Largest response a client accepts (a big mesh's full CDS fits well within).
pub const MAX_RESPONSE_BYTES: usize = 64 << 20;

type ResponseStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

/// Per-type subscription and what was last sent.
#[derive(Default)]
struct Subscription {
    names: BTreeSet<String>,
    /// Name → content hash of what the proxy has (delta) or was last sent (SotW).
    sent: BTreeMap<String, u64>,
    nonce: String,
    /// The version was NACKed: do not resend it until the mesh changes.
    rejected: Option<u64>,
}

struct Conn<G> {
    id: u64,
    generator: Arc<G>,
    proxies: Arc<Mutex<BTreeMap<u64, ProxyState>>>,
    counters: Arc<Counters>,
    node: Option<Node>,
    subs: HashMap<String, Subscription>,
    nonce: u64,
}

impl<G: Generator> Conn<G> {
    fn state<R>(&self, f: impl FnOnce(&mut ProxyState) -> R) -> R {
        let mut all = self.proxies.lock().unwrap_or_else(|p| p.into_inner());
        f(all.entry(self.id).or_default())
    }

    fn next_nonce(&mut self) -> String {
        self.nonce += 1;
        format!("{}-{}", self.id, self.nonce)
    }

    /// The resources of one type for this proxy, filtered to its subscription.
    fn resources(&self, type_url: &str) -> Result<BTreeMap<String, Any>, String> {
        let node = self.node.as_ref().ok_or("no node")?;
        let sub = self.subs.get(type_url);
        let empty = BTreeSet::new();
        let names = sub.map_or(&empty, |s| &s.names);
        let mut all = self.generator.generate(node, type_url, names)?;
        if !(wildcard_type(type_url) && names.is_empty()) {
            all.retain(|n, _| names.contains(n));
        }
        Ok(all)
    }
}

impl<G> Drop for Conn<G> {
    fn drop(&mut self) {
        let mut all = self.proxies.lock().unwrap_or_else(|p| p.into_inner());
        all.remove(&self.id);
    }
}

/// A content version of a resource. Protobuf encodings of map fields follow hash-map order, so
/// equal resources can encode differently; the hash is taken over the canonical JSON (sorted
/// keys) instead, falling back to the bytes for types the descriptors do not know.
fn hash(any: &Any) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    match crate::json::any_to_json(any) {
        Ok(v) => v.to_string().hash(&mut h),
        Err(_) => any.value.hash(&mut h),
    }
    h.finish()
}

fn version_string(v: u64) -> String {
    format!("v{v}")
}

#[tonic::async_trait]
impl<G: Generator> AggregatedDiscoveryService for AdsServer<G> {
    type StreamAggregatedResourcesStream = ResponseStream<DiscoveryResponse>;
    type DeltaAggregatedResourcesStream = ResponseStream<DeltaDiscoveryResponse>;

    async fn stream_aggregated_resources(
        &self,
        request: Request<Streaming<DiscoveryRequest>>,
    ) -> Result<Response<Self::StreamAggregatedResourcesStream>, Status> {
        let conn = self.conn(false);
        Ok(serve_stream(
            request.into_inner(),
            self.version.clone(),
            conn,
            Conn::sotw_request,
            Conn::sotw_push,
        ))
    }

    async fn delta_aggregated_resources(
        &self,
        request: Request<Streaming<DeltaDiscoveryRequest>>,
    ) -> Result<Response<Self::DeltaAggregatedResourcesStream>, Status> {
        let conn = self.conn(true);
        Ok(serve_stream(
            request.into_inner(),
            self.version.clone(),
            conn,
            Conn::delta_request,
            Conn::delta_push,
        ))
    }
}

/// Runs one ADS stream: answers requests, and pushes when the mesh version changes, until
/// either side goes away.
fn serve_stream<G, Req, Resp>(
    mut requests: Streaming<Req>,
    mut version: watch::Receiver<u64>,
    mut conn: Conn<G>,
    on_request: fn(&mut Conn<G>, Req, u64) -> Option<Resp>,
    on_push: fn(&mut Conn<G>, u64) -> Vec<Resp>,
) -> Response<ResponseStream<Resp>>
where
    G: Generator,
    Req: prost::Message + Default + 'static,
    Resp: Send + 'static,
{
    let (tx, rx) = mpsc::channel(16);
    tokio::spawn(async move {
        loop {
            tokio::select! {
                req = requests.message() => {
                    let Ok(Some(req)) = req else { break };
                    let current = *version.borrow();
                    if let Some(resp) = on_request(&mut conn, req, current)
                        && tx.send(resp).await.is_err()
                    {
                        break;
                    }
                }
                changed = version.changed() => {
                    if changed.is_err() { break; }
                    let current = *version.borrow_and_update();
                    for resp in on_push(&mut conn, current) {
                        if tx.send(resp).await.is_err() { return; }
                    }
                }
            }
        }
    });
    Response::new(Box::pin(ReceiverStream::new(rx).map(Ok)))
}

impl<G: Generator> AdsServer<G> {
    fn conn(&self, delta: bool) -> Conn<G> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        self.counters.connections.fetch_add(1, Ordering::Relaxed);
        let conn = Conn {
            id,
            generator: self.generator.clone(),
            proxies: self.proxies.clone(),
            counters: self.counters.clone(),
            node: None,
            subs: HashMap::new(),
            nonce: 0,
        };
        conn.state(|s| s.delta = delta);
        conn
    }
}

impl<G: Generator> Conn<G> {
    /// Records the node the first time it is seen.
    fn learn_node(&mut self, node: Option<Node>) {
        if self.node.is_none()
            && let Some(n) = node
        {
            let id = n.id.clone();
            self.node = Some(n);
            self.state(|s| s.node_id = id);
        }
    }

    /// Handles an ACK or NACK; returns false when the request is stale or a NACK.
    fn acknowledge(
        &mut self,
        type_url: &str,
        nonce: &str,
        error: Option<&str>,
        version: u64,
    ) -> bool {
        let Some(sub) = self.subs.get_mut(type_url) else {
            return true;
        };
        if nonce != sub.nonce {
            return false; // answers an older response
        }
        if let Some(e) = error {
            tracing::warn!(
                proxy = self.node.as_ref().map_or("", |n| n.id.as_str()),
                type_url,
                error = e,
                "NACK"
            );
            self.counters.nacks.fetch_add(1, Ordering::Relaxed);
            sub.rejected = Some(version);
            let e = e.to_string();
            self.state(|s| s.types.entry(type_url.to_string()).or_default().nack = Some(e));
            return false;
        }
        self.state(|s| {
            let t = s.types.entry(type_url.to_string()).or_default();
            t.acked_version = t.sent_version.clone();
            t.nack = None;
        });
        true
    }

    fn sotw_request(&mut self, req: DiscoveryRequest, version: u64) -> Option<DiscoveryResponse> {
        self.learn_node(req.node);
        let type_url = req.type_url.clone();
        let names: BTreeSet<String> = req.resource_names.into_iter().collect();
        if !req.response_nonce.is_empty() {
            let error = req.error_detail.as_ref().map(|s| s.message.as_str());
            if !self.acknowledge(&type_url, &req.response_nonce, error, version) {
                return None;
            }
            // A plain ACK with the same subscription needs no answer.
            if self.subs.get(&type_url).is_some_and(|s| s.names == names) {
                return None;
            }
        }
        self.subs.entry(type_url.clone()).or_default().names = names;
        self.sotw_response(&type_url, version, true)
    }

    /// A full response for one type, or nothing when unchanged (unless `force`).
    fn sotw_response(
        &mut self,
        type_url: &str,
        version: u64,
        force: bool,
    ) -> Option<DiscoveryResponse> {
        let resources = match self.resources(type_url) {
            Ok(r) => r,
            Err(e) => {
                tracing::error!(type_url, error = e, "cannot generate resources");
                return None;
            }
        };
        let hashes: BTreeMap<String, u64> = resources
            .iter()
            .map(|(n, a)| (n.clone(), hash(a)))
            .collect();
        let sub = self.subs.entry(type_url.to_string()).or_default();
        if !force && (sub.sent == hashes || sub.rejected == Some(version)) {
            return None;
        }
        sub.sent = hashes;
        sub.rejected = None;
        let (v, nonce) = self.record_send(type_url, version, resources.len());
        Some(DiscoveryResponse {
            version_info: v,
            resources: resources.into_values().collect(),
            type_url: type_url.to_string(),
            nonce,
            ..Default::default()
        })
    }

    /// Gives a response its nonce and records what is being sent; returns version and nonce.
    fn record_send(&mut self, type_url: &str, version: u64, count: usize) -> (String, String) {
        let nonce = self.next_nonce();
        if let Some(s) = self.subs.get_mut(type_url) {
            s.nonce = nonce.clone();
        }
        let v = version_string(version);
        self.state(|s| {
            let t = s.types.entry(type_url.to_string()).or_default();
            t.sent_version = v.clone();
            t.sent_nonce = nonce.clone();
            t.resources = count;
        });
        self.counters.pushes.fetch_add(1, Ordering::Relaxed);
        (v, nonce)
    }

    fn sotw_push(&mut self, version: u64) -> Vec<DiscoveryResponse> {
        let types: Vec<String> = ordered(self.subs.keys());
        types
            .iter()
            .filter_map(|t| self.sotw_response(t, version, false))
            .collect()
    }

    fn delta_request(
        &mut self,
        req: DeltaDiscoveryRequest,
        version: u64,
    ) -> Option<DeltaDiscoveryResponse> {
        self.learn_node(req.node);
        let type_url = req.type_url.clone();
        if !req.response_nonce.is_empty() {
            let error = req.error_detail.as_ref().map(|s| s.message.as_str());
            if !self.acknowledge(&type_url, &req.response_nonce, error, version) {
                return None;
            }
            if req.resource_names_subscribe.is_empty() && req.resource_names_unsubscribe.is_empty()
            {
                return None;
            }
        }
        let first = !self.subs.contains_key(&type_url);
        let sub = self.subs.entry(type_url.clone()).or_default();
        for n in req.resource_names_unsubscribe {
            sub.names.remove(&n);
            sub.sent.remove(&n);
        }
        sub.names.extend(
            req.resource_names_subscribe
                .into_iter()
                .filter(|n| n != "*"),
        );
        if first {
            // A reconnecting proxy says what it has; versions are our content hashes.
            for (n, v) in req.initial_resource_versions {
                if let Ok(h) = v.parse() {
                    sub.sent.insert(n, h);
                }
            }
        }
        self.delta_response(&type_url, version, true)
    }

    /// The changed and removed resources of one type; nothing when there are none (unless
    /// `force`, for the first answer to a subscription).
    fn delta_response(
        &mut self,
        type_url: &str,
        version: u64,
        force: bool,
    ) -> Option<DeltaDiscoveryResponse> {
        let resources = match self.resources(type_url) {
            Ok(r) => r,
            Err(e) => {
                tracing::error!(type_url, error = e, "cannot generate resources");
                return None;
            }
        };
        let sub = self.subs.entry(type_url.to_string()).or_default();
        if !force && sub.rejected == Some(version) {
            return None;
        }
        let mut changed = Vec::new();
        for (name, any) in &resources {
            let h = hash(any);
            if sub.sent.get(name) != Some(&h) {
                changed.push(Resource {
                    name: name.clone(),
                    version: h.to_string(),
                    resource: Some(any.clone()),
                    ..Default::default()
                });
                sub.sent.insert(name.clone(), h);
            }
        }
        let removed: Vec<String> = sub
            .sent
            .keys()
            .filter(|n| !resources.contains_key(*n))
            .cloned()
            .collect();
        for n in &removed {
            sub.sent.remove(n);
        }
        if changed.is_empty() && removed.is_empty() && !force {
            return None;
        }
        sub.rejected = None;
        let (v, nonce) = self.record_send(type_url, version, resources.len());
        Some(DeltaDiscoveryResponse {
            system_version_info: v,
            resources: changed,
            type_url: type_url.to_string(),
            removed_resources: removed,
            nonce,
            ..Default::default()
        })
    }

    fn delta_push(&mut self, version: u64) -> Vec<DeltaDiscoveryResponse> {
        let types: Vec<String> = ordered(self.subs.keys());
        types
            .iter()
            .filter_map(|t| self.delta_response(t, version, false))
            .collect()
    }
}

/// Subscribed types in push order (unknown types last, by name).
fn ordered<'a>(types: impl Iterator<Item = &'a String>) -> Vec<String> {
    let mut v: Vec<String> = types.cloned().collect();
    v.sort_by_key(|t| {
        (
            PUSH_ORDER
                .iter()
                .position(|p| p == t)
                .unwrap_or(PUSH_ORDER.len()),
            t.clone(),
        )
    });
    v
}
