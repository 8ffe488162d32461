//! The ADS server: Envoy's `AggregatedDiscoveryService`, state of the world and delta, over one
//! stream per proxy.
//!
//! What to send comes from a [`Generator`]; when the mesh changes, the owner bumps a version on a
//! watch channel and every stream recomputes its subscribed types in Envoy's safe order
//! (CDS → EDS → LDS → RDS), sending only what changed. Each response carries a nonce; a request
//! that answers an older nonce is stale and ignored; an `error_detail` is a NACK, which is
//! logged, counted and kept for `proxy-status`, and the rejected version is not resent.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use envoy_types::pb::envoy::config::core::v3::Node;
use envoy_types::pb::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DiscoveryRequest, DiscoveryResponse,
};
use envoy_types::pb::google::protobuf::Any;
use futures::{Stream, StreamExt};
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::codegen::http;
use tonic::{Request, Response, Status};

use crate::nds::NAME_TABLE;
use crate::wire::{DeltaOut, EncodedRuns, Messages, resource_len};

pub const CLUSTER: &str = "type.googleapis.com/envoy.config.cluster.v3.Cluster";
pub const ENDPOINT: &str = "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment";
pub const LISTENER: &str = "type.googleapis.com/envoy.config.listener.v3.Listener";
pub const ROUTE: &str = "type.googleapis.com/envoy.config.route.v3.RouteConfiguration";
pub const SECRET: &str = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret";

/// Push order: a cluster exists before its endpoints, listeners before the routes they name;
/// the agent's name table last, as Istio pushes it.
pub const PUSH_ORDER: [&str; 6] = [CLUSTER, ENDPOINT, LISTENER, ROUTE, SECRET, NAME_TABLE];

/// Types whose empty subscription means "everything" (wildcard).
fn wildcard_type(type_url: &str) -> bool {
    matches!(type_url, CLUSTER | LISTENER | NAME_TABLE)
}

/// A resource with its name and content version, computed once when it is built so that
/// every proxy it goes to compares versions without re-encoding it, and refers to its name
/// without a copy.
#[derive(Debug, Clone, PartialEq)]
pub struct Versioned {
    pub name: Arc<str>,
    pub any: Any,
    pub version: u64,
    /// Its length as a delta response's `Resource`, reckoned once for every stream it goes to.
    encoded_len: usize,
}

impl Versioned {
    /// Versions by a hash of the encoded bytes: generators must encode alike what is alike
    /// (protobuf map fields iterate in the map's order; see pilot's `maps`).
    pub fn new(name: &str, any: Any) -> Self {
        use std::hash::{Hash, Hasher};
        let mut h = std::collections::hash_map::DefaultHasher::new();
        any.type_url.hash(&mut h);
        any.value.hash(&mut h);
        Self::with_version(name, any, h.finish())
    }

    pub(crate) fn with_version(name: &str, any: Any, version: u64) -> Self {
        Versioned {
            encoded_len: crate::wire::resource_inner_len(name, version, &any),
            name: name.into(),
            version,
            any,
        }
    }

    /// The length of the `Resource` message, without its own key and length.
    pub(crate) fn encoded_len(&self) -> usize {
        self.encoded_len
    }
}

/// Resources by name.
pub type Resources = BTreeMap<String, Arc<Versioned>>;

/// Hashing of the names a stream tracks: every proxy's thousands of names share long prefixes
/// (`outbound|8080||…`), which makes ordered comparisons cost more than a hash.
type NameHasher = foldhash::fast::RandomState;

/// The resource names a proxy subscribed to.
pub type Names = HashSet<Arc<str>, NameHasher>;

/// Produces the resources a proxy should have.
pub trait Generator: Send + Sync + 'static {
    /// What the generator makes of a stream's node, once per stream.
    type Proxy: Send + Sync + 'static;

    /// The proxy behind `node` (from the stream's first request), or why it cannot be served.
    fn proxy(&self, node: &Node) -> Result<Self::Proxy, String>;

    /// Every resource of `type_url` for `proxy`, in parts with distinct names. Parts that stay
    /// the same `Arc` between calls are known unchanged, so generators share and reuse them
    /// between proxies and pushes. `names` is the proxy's subscription (empty for wildcard
    /// types); a generator may return more, the server filters.
    fn generate(
        &self,
        proxy: &Self::Proxy,
        type_url: &str,
        names: &Names,
    ) -> Result<Vec<Arc<Resources>>, String>;
}

/// A generator serving a fixed set of resources that its owner edits (static configurations,
/// tests); changes are pushed when the server's version is bumped.
#[derive(Debug, Default)]
pub struct FixedGenerator {
    resources: Mutex<BTreeMap<String, Arc<Resources>>>,
}

impl FixedGenerator {
    pub fn put(&self, type_url: &str, name: &str, any: Any) {
        let mut all = self.resources.lock().unwrap_or_else(|p| p.into_inner());
        Arc::make_mut(all.entry(type_url.into()).or_default())
            .insert(name.into(), Arc::new(Versioned::new(name, any)));
    }

    pub fn remove(&self, type_url: &str, name: &str) {
        let mut all = self.resources.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(m) = all.get_mut(type_url) {
            Arc::make_mut(m).remove(name);
        }
    }
}

impl Generator for FixedGenerator {
    type Proxy = ();

    fn proxy(&self, _: &Node) -> Result<(), String> {
        Ok(())
    }

    fn generate(&self, _: &(), type_url: &str, _: &Names) -> Result<Vec<Arc<Resources>>, String> {
        let all = self.resources.lock().unwrap_or_else(|p| p.into_inner());
        Ok(all.get(type_url).cloned().into_iter().collect())
    }
}

/// Decides, on an authenticated port, whether a stream's caller may be the proxy its first
/// request names (Istio's istiod checks the caller's identity against the node's namespace).
pub trait Authorizer: Send + Sync + 'static {
    /// `certs`: the client's TLS chain, already verified by the handshake, when it sent one;
    /// `metadata`: the stream's gRPC metadata (a bearer token); `node`: from the first request.
    fn authorize(
        &self,
        certs: Option<&[tonic::transport::CertificateDer<'static>]>,
        metadata: &tonic::metadata::MetadataMap,
        node: Option<&Node>,
    ) -> Result<(), Status>;
}

/// How long a stream may take to send its first request on an authenticated port.
const FIRST_REQUEST_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(15);

/// What the server knows of one connected proxy, for `proxy-status`.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct ProxyState {
    pub node_id: String,
    /// The node as the proxy sent it (its metadata shapes its configuration), for the debug
    /// endpoints that build what it was sent.
    #[serde(skip)]
    pub node: Option<Arc<Node>>,
    /// The node's `CLUSTER_ID` and `ISTIO_VERSION` metadata.
    pub cluster_id: String,
    pub proxy_version: String,
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
#[derive(Debug)]
pub struct Counters {
    pub pushes: AtomicU64,
    pub nacks: AtomicU64,
    pub connections: AtomicU64,
    /// Istio's `pilot_proxy_convergence_time`: from the start of a push to the proxy's ACK of
    /// what the push sent it, in seconds.
    pub convergence: prometheus_client::metrics::histogram::Histogram,
    push_started: Mutex<Option<std::time::Instant>>,
}

/// Istio's buckets for push latencies, in seconds.
pub const PUSH_BUCKETS: [f64; 9] = [0.01, 0.05, 0.1, 0.5, 1.0, 3.0, 5.0, 10.0, 20.0];

impl Default for Counters {
    fn default() -> Self {
        Counters {
            pushes: AtomicU64::default(),
            nacks: AtomicU64::default(),
            connections: AtomicU64::default(),
            convergence: prometheus_client::metrics::histogram::Histogram::new(PUSH_BUCKETS),
            push_started: Mutex::default(),
        }
    }
}

impl Counters {
    /// Marks the start of a push; the owner calls it right before it bumps the version.
    pub fn push_started(&self) {
        *self.push_started.lock().unwrap_or_else(|p| p.into_inner()) =
            Some(std::time::Instant::now());
    }

    fn push_start(&self) -> Option<std::time::Instant> {
        *self.push_started.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// The ADS service. Clones share their proxies and counters, so one control plane can serve
/// the same ADS on several ports (plaintext 15010, TLS 15012).
pub struct AdsServer<G> {
    generator: Arc<G>,
    authorizer: Option<Arc<dyn Authorizer>>,
    version: watch::Receiver<u64>,
    proxies: Arc<Mutex<BTreeMap<u64, ProxyState>>>,
    next_id: Arc<AtomicU64>,
    permits: Arc<tokio::sync::Semaphore>,
    diffs: Arc<DiffMemo>,
    encoded: Arc<EncodedRuns>,
    pub counters: Arc<Counters>,
}

impl<G> Clone for AdsServer<G> {
    fn clone(&self) -> Self {
        AdsServer {
            generator: self.generator.clone(),
            authorizer: self.authorizer.clone(),
            version: self.version.clone(),
            proxies: self.proxies.clone(),
            next_id: self.next_id.clone(),
            permits: self.permits.clone(),
            diffs: self.diffs.clone(),
            encoded: self.encoded.clone(),
            counters: self.counters.clone(),
        }
    }
}

impl<G: Generator> AdsServer<G> {
    /// `version` changes whenever the mesh does.
    pub fn new(generator: Arc<G>, version: watch::Receiver<u64>) -> Self {
        AdsServer {
            generator,
            authorizer: None,
            version,
            proxies: Arc::default(),
            next_id: Arc::new(AtomicU64::new(1)),
            permits: Arc::new(tokio::sync::Semaphore::new(PUSH_CONCURRENCY)),
            diffs: Arc::default(),
            encoded: Arc::default(),
            counters: Arc::default(),
        }
    }

    /// The same server (same proxies and counters), admitting only streams `authorizer`
    /// accepts.
    pub fn with_authorizer(mut self, authorizer: Arc<dyn Authorizer>) -> Self {
        self.authorizer = Some(authorizer);
        self
    }

    /// The first request of a stream, read and checked when the server authorizes callers.
    async fn admit<Req: prost::Message + Default + 'static>(
        &self,
        request: Request<Messages<Req>>,
        node: fn(&Req) -> Option<&Node>,
    ) -> Result<(Option<Req>, Messages<Req>), Status> {
        let Some(authorizer) = &self.authorizer else {
            return Ok((None, request.into_inner()));
        };
        let certs = request.extensions().get::<PeerCertificates>().cloned();
        let metadata = request.metadata().clone();
        let mut stream = request.into_inner();
        let first = tokio::time::timeout(FIRST_REQUEST_TIMEOUT, stream.message())
            .await
            .map_err(|_| Status::deadline_exceeded("no discovery request in time"))??
            .ok_or_else(|| Status::cancelled("stream closed before its first request"))?;
        authorizer.authorize(
            certs.as_ref().map(|c| c.0.as_slice()),
            &metadata,
            node(&first),
        )?;
        Ok((Some(first), stream))
    }

    /// A handle on the per-proxy state, for debug endpoints.
    pub fn proxies(&self) -> Arc<Mutex<BTreeMap<u64, ProxyState>>> {
        self.proxies.clone()
    }

    pub fn into_service(self) -> AdsService<G> {
        AdsService {
            server: self,
            delta: true,
        }
    }
}

/// The TLS client certificates of a stream's connection, put in the request's extensions by
/// the server that terminated TLS.
#[derive(Debug, Clone)]
pub struct PeerCertificates(pub Arc<Vec<tonic::transport::CertificateDer<'static>>>);

/// Requests from a proxy are small; anything larger is not an Envoy talking.
const MAX_REQUEST_BYTES: usize = 4 << 20;
/// HTTP/2 receive window of xDS clients: a large mesh's push should not be paced by
/// WINDOW_UPDATE round trips (Envoy's default is 256 MiB).
pub const CLIENT_WINDOW: u32 = 16 << 20;
/// Largest HTTP/2 frame xDS clients accept: a delta response part ([`MAX_CHUNK_BYTES`]) then
/// goes in one DATA frame instead of 32 of HTTP/2's default 16 KB, a system call and a wake-up
/// on each side for the whole part.
pub const CLIENT_MAX_FRAME: u32 = 512 << 10;

/// Delta responses are split at about this size. A part's resources are encoded once for every
/// stream that sends them ([`crate::wire::EncodedRuns`]); a part only one proxy gets is a
/// buffer of that stream's own until it is written, so this bounds what one stream holds in
/// encoded responses of its own beyond its HTTP/2 send buffer. Fewer parts are fewer responses
/// and acknowledgements for both sides (docs/benchmarks.md has the sizes tried).
pub const MAX_CHUNK_BYTES: usize = 512 << 10;

/// Largest response a client accepts (a big mesh's full CDS fits well within).
pub const MAX_RESPONSE_BYTES: usize = 64 << 20;

/// The responses of one ADS stream.
pub type ResponseStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

/// Per-type subscription and what was last sent.
#[derive(Default)]
struct Subscription {
    /// Subscribed names; those of resources sent are the resources' own, shared.
    names: Names,
    /// At most this many of `names` are not a resource's own (subscribed before the resource
    /// existed, or not found): while there are none, a response need not look for them.
    unowned: usize,
    /// Name → content version of what the proxy has (delta) or was last sent (SotW); the
    /// names are the resources' own, shared.
    sent: HashMap<Arc<str>, u64, NameHasher>,
    /// The generator's parts `sent` reflects: a part that is still the same `Arc` needs no look.
    parts: Vec<Arc<Resources>>,
    nonce: String,
    /// The nonces of the earlier responses when the last change went out in several (delta):
    /// their ACKs are implied by the last one's, but a NACK of any counts.
    chunk_nonces: Vec<String>,
    /// A response was sent that the proxy has not answered yet.
    awaiting: bool,
    /// When the push that sent the last response began (None for answers to requests).
    push_start: Option<std::time::Instant>,
    /// The version was NACKed: do not resend it until the mesh changes.
    rejected: Option<u64>,
}

struct Conn<G: Generator> {
    id: u64,
    generator: Arc<G>,
    permits: Arc<tokio::sync::Semaphore>,
    diffs: Arc<DiffMemo>,
    encoded: Arc<EncodedRuns>,
    proxies: Arc<Mutex<BTreeMap<u64, ProxyState>>>,
    counters: Arc<Counters>,
    node: Option<Arc<Node>>,
    /// The generator's view of `node`, made when the node is learnt.
    proxy: Option<Result<G::Proxy, String>>,
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

    fn awaiting_answers(&self) -> bool {
        self.subs.values().any(|s| s.awaiting)
    }

    /// The generator's parts of one type for this proxy (unfiltered).
    fn parts(&self, type_url: &str) -> Result<Vec<Arc<Resources>>, String> {
        let proxy = self.proxy.as_ref().ok_or("no node")?.as_ref()?;
        let empty = Names::default();
        let names = self.subs.get(type_url).map_or(&empty, |s| &s.names);
        self.generator.generate(proxy, type_url, names)
    }
}

impl Subscription {
    /// Whether the proxy wants `name` (everything, for a wildcard subscription).
    fn wants(&self, type_url: &str, name: &str) -> bool {
        (wildcard_type(type_url) && self.names.is_empty()) || self.names.contains(name)
    }
}

/// The subscribed resources of `parts`.
fn wanted<'a>(
    sub: &'a Subscription,
    type_url: &'a str,
    parts: &'a [Arc<Resources>],
) -> impl Iterator<Item = (&'a String, &'a Arc<Versioned>)> + 'a {
    parts
        .iter()
        .flat_map(|p| p.iter())
        .filter(move |(n, _)| sub.wants(type_url, n))
}

fn same_parts(a: &[Arc<Resources>], b: &[Arc<Resources>]) -> bool {
    a.len() == b.len() && a.iter().zip(b).all(|(x, y)| Arc::ptr_eq(x, y))
}

/// What changed between two versions of a shared part: computed once, used by every proxy
/// that had the old one (an endpoint change is then O(change) per proxy, not O(mesh)).
struct PartDiff {
    /// Names added or with a new version.
    changed: Vec<String>,
    /// Names no longer in the part.
    removed: Vec<String>,
}

impl PartDiff {
    fn between(old: &Resources, new: &Resources) -> PartDiff {
        PartDiff {
            changed: new
                .iter()
                .filter(|(n, v)| old.get(*n).is_none_or(|o| o.version != v.version))
                .map(|(n, _)| n.clone())
                .collect(),
            removed: old
                .keys()
                .filter(|n| !new.contains_key(*n))
                .cloned()
                .collect(),
        }
    }
}

/// Old part, new part, and their diff.
type MemoEntry = (Arc<Resources>, Arc<Resources>, Arc<PartDiff>);

/// Recent part diffs, keyed by the parts themselves (held, so their addresses stay theirs).
#[derive(Default)]
struct DiffMemo {
    entries: Mutex<Vec<MemoEntry>>,
}

/// Parts smaller than this are diffed in place rather than memoized (per-proxy parts).
const MEMO_MIN_PART: usize = 64;
/// Diffs kept: a few pushes' worth of shared parts.
const MEMO_ENTRIES: usize = 256;

impl DiffMemo {
    fn get(&self, old: &Arc<Resources>, new: &Arc<Resources>) -> Arc<PartDiff> {
        if new.len() < MEMO_MIN_PART {
            return Arc::new(PartDiff::between(old, new));
        }
        let mut entries = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((_, _, d)) = entries
            .iter()
            .find(|(o, n, _)| Arc::ptr_eq(o, old) && Arc::ptr_eq(n, new))
        {
            return d.clone();
        }
        let d = Arc::new(PartDiff::between(old, new));
        if entries.len() >= MEMO_ENTRIES {
            entries.drain(..MEMO_ENTRIES / 2);
        }
        entries.push((old.clone(), new.clone(), d.clone()));
        d
    }
}

impl<G: Generator> Drop for Conn<G> {
    fn drop(&mut self) {
        let mut all = self.proxies.lock().unwrap_or_else(|p| p.into_inner());
        all.remove(&self.id);
    }
}

fn version_string(v: u64) -> String {
    format!("v{v}")
}

impl<G: Generator> AdsServer<G> {
    /// Serves one state-of-the-world stream.
    async fn stream_aggregated_resources(
        &self,
        request: Request<Messages<DiscoveryRequest>>,
    ) -> Result<Response<ResponseStream<DiscoveryResponse>>, Status> {
        let (first, requests) = self.admit(request, |r| r.node.as_ref()).await?;
        let conn = self.conn(false);
        Ok(serve_stream(
            requests,
            first,
            self.version.clone(),
            conn,
            Conn::sotw_request,
            Conn::sotw_push,
        ))
    }

    async fn delta_aggregated_resources(
        &self,
        request: Request<Messages<DeltaDiscoveryRequest>>,
    ) -> Result<Response<ResponseStream<DeltaOut>>, Status> {
        let (first, requests) = self.admit(request, |r| r.node.as_ref()).await?;
        let conn = self.conn(true);
        Ok(serve_stream(
            requests,
            first,
            self.version.clone(),
            conn,
            Conn::delta_request,
            Conn::delta_push,
        ))
    }
}

const ADS_SERVICE: &str = "envoy.service.discovery.v3.AggregatedDiscoveryService";
/// The gRPC paths of the two ADS methods.
pub const SOTW_PATH: &str =
    "/envoy.service.discovery.v3.AggregatedDiscoveryService/StreamAggregatedResources";
pub const DELTA_PATH: &str =
    "/envoy.service.discovery.v3.AggregatedDiscoveryService/DeltaAggregatedResources";

/// Envoy's `AggregatedDiscoveryService` over gRPC: the two streaming methods, with delta
/// responses encoded from the shared resources ([`DeltaOut`]).
pub struct AdsService<G> {
    server: AdsServer<G>,
    /// Delta xDS offered (a control plane of state of the world only answers it Unimplemented).
    delta: bool,
}

impl<G> AdsService<G> {
    /// The same service offering state of the world only, as control planes before delta xDS:
    /// clients have to fall back to it.
    pub fn without_delta(self) -> Self {
        AdsService {
            delta: false,
            ..self
        }
    }
}

impl<G> Clone for AdsService<G> {
    fn clone(&self) -> Self {
        AdsService {
            server: self.server.clone(),
            delta: self.delta,
        }
    }
}

impl<G> tonic::server::NamedService for AdsService<G> {
    const NAME: &'static str = ADS_SERVICE;
}

impl<G: Generator> tonic::codegen::Service<http::Request<tonic::body::Body>> for AdsService<G> {
    type Response = http::Response<tonic::body::Body>;
    type Error = std::convert::Infallible;
    type Future = tonic::codegen::BoxFuture<Self::Response, Self::Error>;

    fn poll_ready(
        &mut self,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<tonic::body::Body>) -> Self::Future {
        let ads = self.server.clone();
        // Some(delta) for the methods offered.
        let method = match req.uri().path() {
            SOTW_PATH => Some(false),
            DELTA_PATH if self.delta => Some(true),
            _ => None,
        };
        Box::pin(async move {
            Ok(match method {
                Some(false) => crate::wire::response(
                    ads.stream_aggregated_resources(crate::wire::requests(req, MAX_REQUEST_BYTES))
                        .await,
                ),
                Some(true) => crate::wire::response(
                    ads.delta_aggregated_resources(crate::wire::requests(req, MAX_REQUEST_BYTES))
                        .await,
                ),
                _ => Status::unimplemented("no such method").into_http(),
            })
        })
    }
}

/// How many proxies may have a push (or their first configuration) in flight at once, as
/// Istio's `PILOT_PUSH_THROTTLE`: a stream holds a permit from the moment it builds responses
/// until the proxy has answered them all, so the control plane's memory holds at most this
/// many proxies' worth of unsent configuration, however many are connected.
pub const PUSH_CONCURRENCY: usize = 100;
/// A proxy that does not answer within this long gives its permit back.
const PUSH_HOLD_MAX: std::time::Duration = std::time::Duration::from_secs(10);

/// The part of a request the stream loop needs before handing it on.
trait AdsRequest {
    /// Only acknowledges (or rejects) a response: it needs no push permit, and must never wait
    /// for one (the permits it would wait for are released by such requests).
    fn answers_only(&self) -> bool;
}

impl AdsRequest for DiscoveryRequest {
    fn answers_only(&self) -> bool {
        !self.response_nonce.is_empty()
    }
}

impl AdsRequest for DeltaDiscoveryRequest {
    fn answers_only(&self) -> bool {
        !self.response_nonce.is_empty()
            && self.resource_names_subscribe.is_empty()
            && self.resource_names_unsubscribe.is_empty()
    }
}

/// Runs one ADS stream: answers requests, and pushes when the mesh version changes, until
/// either side goes away.
fn serve_stream<G, Req, Resp>(
    mut requests: Messages<Req>,
    first: Option<Req>,
    mut version: watch::Receiver<u64>,
    mut conn: Conn<G>,
    on_request: fn(&mut Conn<G>, Req, u64) -> Vec<Resp>,
    on_push: fn(&mut Conn<G>, u64) -> Vec<Resp>,
) -> Response<ResponseStream<Resp>>
where
    G: Generator,
    Req: prost::Message + Default + AdsRequest + 'static,
    Resp: Send + 'static,
{
    let (tx, rx) = mpsc::channel(4);
    let permits = conn.permits.clone();
    tokio::spawn(async move {
        let mut permit: Option<(tokio::sync::OwnedSemaphorePermit, tokio::time::Instant)> = None;
        if let Some(req) = first {
            let Ok(p) = permits.clone().acquire_owned().await else {
                return;
            };
            permit = Some((p, tokio::time::Instant::now()));
            let current = *version.borrow();
            for resp in on_request(&mut conn, req, current) {
                if tx.send(resp).await.is_err() {
                    return;
                }
            }
        }
        loop {
            if permit.is_some() && !conn.awaiting_answers() {
                permit = None;
            }
            let deadline = permit.as_ref().map(|(_, t)| *t + PUSH_HOLD_MAX);
            tokio::select! {
                req = requests.message() => {
                    let Ok(Some(req)) = req else { break };
                    if permit.is_none() && !req.answers_only() {
                        let Ok(p) = permits.clone().acquire_owned().await else { break };
                        permit = Some((p, tokio::time::Instant::now()));
                    }
                    let current = *version.borrow();
                    for resp in on_request(&mut conn, req, current) {
                        if tx.send(resp).await.is_err() { return; }
                    }
                }
                changed = version.changed() => {
                    if changed.is_err() { break; }
                    if permit.is_none() {
                        let Ok(p) = permits.clone().acquire_owned().await else { break };
                        permit = Some((p, tokio::time::Instant::now()));
                    }
                    let current = *version.borrow_and_update();
                    for resp in on_push(&mut conn, current) {
                        if tx.send(resp).await.is_err() { return; }
                    }
                }
                _ = tokio::time::sleep_until(deadline.unwrap_or_else(tokio::time::Instant::now)),
                    if deadline.is_some() => {
                    permit = None;
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
            permits: self.permits.clone(),
            diffs: self.diffs.clone(),
            encoded: self.encoded.clone(),
            proxies: self.proxies.clone(),
            counters: self.counters.clone(),
            node: None,
            proxy: None,
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
            let meta = |key: &str| {
                let v = n.metadata.as_ref()?.fields.get(key)?;
                match &v.kind {
                    Some(envoy_types::pb::google::protobuf::value::Kind::StringValue(s)) => {
                        Some(s.clone())
                    }
                    _ => None,
                }
            };
            let (cluster_id, version) = (meta("CLUSTER_ID"), meta("ISTIO_VERSION"));
            self.proxy = Some(self.generator.proxy(&n));
            let n = Arc::new(n);
            self.node = Some(n.clone());
            self.state(|s| {
                s.node = Some(n);
                s.node_id = id;
                s.cluster_id = cluster_id.unwrap_or_default();
                s.proxy_version = version.unwrap_or_default();
            });
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
        if nonce != sub.nonce && (error.is_none() || !sub.chunk_nonces.iter().any(|n| n == nonce)) {
            return false; // answers an older response, or an earlier part of the last
        }
        sub.awaiting = false;
        if let Some(e) = error {
            tracing::warn!(
                proxy = self.node.as_ref().map_or("", |n| n.id.as_str()),
                type_url,
                error = e,
                "NACK"
            );
            self.counters.nacks.fetch_add(1, Ordering::Relaxed);
            sub.rejected = Some(version);
            // The other parts' answers no longer make it accepted.
            sub.nonce.clear();
            sub.chunk_nonces.clear();
            let e = e.to_string();
            self.state(|s| s.types.entry(type_url.to_string()).or_default().nack = Some(e));
            return false;
        }
        if let Some(start) = sub.push_start.take() {
            self.counters
                .convergence
                .observe(start.elapsed().as_secs_f64());
        }
        self.state(|s| {
            let t = s.types.entry(type_url.to_string()).or_default();
            t.acked_version = t.sent_version.clone();
            t.nack = None;
        });
        true
    }

    fn sotw_request(&mut self, req: DiscoveryRequest, version: u64) -> Vec<DiscoveryResponse> {
        self.sotw_answer(req, version).into_iter().collect()
    }

    fn sotw_answer(&mut self, req: DiscoveryRequest, version: u64) -> Option<DiscoveryResponse> {
        self.learn_node(req.node);
        let type_url = req.type_url.clone();
        let names: Names = req.resource_names.into_iter().map(Arc::from).collect();
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
        let parts = match self.parts(type_url) {
            Ok(p) => p,
            Err(e) => {
                tracing::error!(type_url, error = e, "cannot generate resources");
                return None;
            }
        };
        let sub = self.subs.entry(type_url.to_string()).or_default();
        if !force && (same_parts(&sub.parts, &parts) || sub.rejected == Some(version)) {
            return None;
        }
        let hashes: HashMap<Arc<str>, u64, NameHasher> = wanted(sub, type_url, &parts)
            .map(|(_, v)| (v.name.clone(), v.version))
            .collect();
        let unchanged = sub.sent == hashes;
        sub.parts = parts.clone();
        if !force && unchanged {
            return None;
        }
        let resources: Vec<Any> = wanted(sub, type_url, &parts)
            .map(|(_, v)| v.any.clone())
            .collect();
        sub.sent = hashes;
        sub.rejected = None;
        let (v, nonce) = self.record_send(type_url, version, resources.len(), !force);
        Some(DiscoveryResponse {
            version_info: v,
            resources,
            type_url: type_url.to_string(),
            nonce,
            ..Default::default()
        })
    }

    /// Gives a response its nonce and records what is being sent; returns version and nonce.
    /// `pushed`: sent by a push rather than in answer to a request.
    fn record_send(
        &mut self,
        type_url: &str,
        version: u64,
        count: usize,
        pushed: bool,
    ) -> (String, String) {
        let nonce = self.next_nonce();
        let push_start = if pushed {
            self.counters.push_start()
        } else {
            None
        };
        if let Some(s) = self.subs.get_mut(type_url) {
            s.nonce = nonce.clone();
            s.awaiting = true;
            s.push_start = push_start;
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

    fn delta_request(&mut self, req: DeltaDiscoveryRequest, version: u64) -> Vec<DeltaOut> {
        self.learn_node(req.node);
        let type_url = req.type_url.clone();
        if !req.response_nonce.is_empty() {
            let error = req.error_detail.as_ref().map(|s| s.message.as_str());
            if !self.acknowledge(&type_url, &req.response_nonce, error, version) {
                return Vec::new();
            }
            if req.resource_names_subscribe.is_empty() && req.resource_names_unsubscribe.is_empty()
            {
                return Vec::new();
            }
        }
        let first = !self.subs.contains_key(&type_url);
        let by_name = !req.resource_names_subscribe.is_empty()
            && !req.resource_names_subscribe.iter().any(|n| n == "*");
        let only_adds = !first && req.resource_names_unsubscribe.is_empty() && by_name;
        // Looked up before the names are taken in, so that each name is the resource's own.
        let parts = if by_name {
            match self.parts(&type_url) {
                Ok(p) => Some(p),
                Err(e) if only_adds => {
                    tracing::error!(type_url, error = e, "cannot generate resources");
                    return Vec::new();
                }
                // The subscription is still taken; the response below says what failed.
                Err(_) => None,
            }
        } else {
            None
        };
        let sub = self.subs.entry(type_url.clone()).or_default();
        for n in req.resource_names_unsubscribe {
            sub.names.remove(n.as_str());
            sub.sent.remove(n.as_str());
        }
        // Proxies subscribe to thousands of names, in a few requests: grow the set once each.
        sub.names.reserve(req.resource_names_subscribe.len());
        let mut added = Vec::new();
        let mut finder = parts.as_deref().map(Finder::new);
        for n in req.resource_names_subscribe {
            if n == "*" || sub.names.contains(n.as_str()) {
                continue;
            }
            let found = finder.as_mut().and_then(|f| f.find(&n)).cloned();
            sub.unowned += usize::from(found.is_none());
            sub.names.insert(
                found
                    .as_ref()
                    .map_or_else(|| Arc::from(n), |v| v.name.clone()),
            );
            added.extend(found);
        }
        if first {
            // A reconnecting proxy says what it has; versions are our content hashes.
            for (n, v) in req.initial_resource_versions {
                if let Ok(h) = v.parse() {
                    sub.sent.insert(n.into(), h);
                }
            }
        }
        match parts {
            Some(parts) if only_adds && !added.is_empty() => {
                self.delta_added(&type_url, version, parts, added)
            }
            _ => self.delta_response(&type_url, version, true),
        }
    }

    /// The answer to a subscription that only adds names: those resources, when nothing else
    /// changed since the last response (a proxy subscribing to the endpoints of the clusters it
    /// just received, chunk by chunk, should not make the whole type be compared again).
    /// `changed`: the resources of `parts` that the proxy newly subscribed to.
    fn delta_added(
        &mut self,
        type_url: &str,
        version: u64,
        parts: Vec<Arc<Resources>>,
        mut changed: Vec<Arc<Versioned>>,
    ) -> Vec<DeltaOut> {
        let Some(sub) = self.subs.get_mut(type_url) else {
            return Vec::new();
        };
        if !same_parts(&sub.parts, &parts) {
            return self.delta_response(type_url, version, true);
        }
        // Those the proxy already has (a reconnect's initial versions) are not sent again.
        changed.retain(|v| sub.sent.get(&*v.name) != Some(&v.version));
        sub.sent.reserve(changed.len());
        for r in &changed {
            sub.sent.insert(r.name.clone(), r.version);
        }
        sub.rejected = None;
        self.respond(type_url, version, vec![changed], Vec::new(), false)
    }

    /// The changed and removed resources of one type; nothing when there are none (unless
    /// `force`, for the first answer to a subscription).
    fn delta_response(&mut self, type_url: &str, version: u64, force: bool) -> Vec<DeltaOut> {
        let parts = match self.parts(type_url) {
            Ok(p) => p,
            Err(e) => {
                tracing::error!(type_url, error = e, "cannot generate resources");
                return Vec::new();
            }
        };
        let diffs = self.diffs.clone();
        let sub = self.subs.entry(type_url.to_string()).or_default();
        if !force && (same_parts(&sub.parts, &parts) || sub.rejected == Some(version)) {
            return Vec::new();
        }
        let (changed, removed) = if force || sub.parts.len() != parts.len() {
            delta_full(sub, type_url, &parts)
        } else {
            delta_parts(sub, type_url, &parts, &diffs)
        };
        sub.parts = parts;
        sub.sent.reserve(changed.iter().map(Vec::len).sum());
        for r in changed.iter().flatten() {
            sub.sent.insert(r.name.clone(), r.version);
        }
        for n in &removed {
            sub.sent.remove(n.as_str());
        }
        // Keep the subscribed names the resources' own: one copy of each name.
        if sub.unowned > 0 {
            for r in changed.iter().flatten() {
                if sub
                    .names
                    .get(&*r.name)
                    .is_some_and(|n| !Arc::ptr_eq(n, &r.name))
                {
                    sub.names.replace(r.name.clone());
                    sub.unowned = sub.unowned.saturating_sub(1);
                }
            }
        }
        if changed.iter().all(Vec::is_empty) && removed.is_empty() && !force {
            return Vec::new();
        }
        sub.rejected = None;
        self.respond(type_url, version, changed, removed, !force)
    }

    /// Sends `changed` (by part) and `removed` in responses of at most [`MAX_CHUNK_BYTES`] each
    /// (one resource larger than that goes alone), removals last, once whatever replaces them is
    /// in place. When they need more than one response, a response carries resources of one
    /// part only, so that the proxies that share a part share its responses' encoding.
    /// `pushed`: sent by a push rather than in answer to a request.
    fn respond(
        &mut self,
        type_url: &str,
        version: u64,
        changed: Vec<Vec<Arc<Versioned>>>,
        removed: Vec<String>,
        pushed: bool,
    ) -> Vec<DeltaOut> {
        let count = self.subs.get(type_url).map_or(0, |sub| sub.sent.len());
        let mut chunks = runs(changed);
        let earlier: Vec<String> = (1..chunks.len()).map(|_| self.next_nonce()).collect();
        let (v, last_nonce) = self.record_send(type_url, version, count, pushed);
        if let Some(sub) = self.subs.get_mut(type_url) {
            sub.chunk_nonces = earlier.clone();
        }
        let last = chunks.pop().unwrap_or_default();
        let mut out: Vec<DeltaOut> = chunks
            .into_iter()
            .zip(earlier)
            .map(|(resources, nonce)| DeltaOut {
                system_version_info: v.clone(),
                resources: self.encoded.get(resources),
                type_url: type_url.to_string(),
                nonce,
                ..Default::default()
            })
            .collect();
        out.push(DeltaOut {
            system_version_info: v,
            resources: self.encoded.get(last),
            type_url: type_url.to_string(),
            removed_resources: removed,
            nonce: last_nonce,
        });
        out
    }

    fn delta_push(&mut self, version: u64) -> Vec<DeltaOut> {
        let types: Vec<String> = ordered(self.subs.keys());
        types
            .iter()
            .flat_map(|t| self.delta_response(t, version, false))
            .collect()
    }
}

/// The responses' runs of resources for `changed` (by part): one run when they all fit in
/// one response; else each part's runs, never spanning two parts, so that a run of a shared
/// part is the same for every proxy that gets it.
fn runs(changed: Vec<Vec<Arc<Versioned>>>) -> Vec<Vec<Arc<Versioned>>> {
    let mut size = 0;
    let fits = changed.iter().flatten().all(|r| {
        size += resource_len(r);
        size <= MAX_CHUNK_BYTES
    });
    if fits {
        chunks(changed.into_iter().flatten().collect())
    } else {
        changed.into_iter().flat_map(chunks).collect()
    }
}

/// Looks subscribed names up in the generator's parts. A proxy subscribes to the endpoints of
/// the clusters it has just received in their order, which is the parts' order: a name that
/// follows the one found last is found by one step forward rather than by a search.
struct Finder<'a> {
    parts: &'a [Arc<Resources>],
    /// What follows the name found last, in its part.
    next: Option<std::collections::btree_map::Range<'a, String, Arc<Versioned>>>,
}

impl<'a> Finder<'a> {
    fn new(parts: &'a [Arc<Resources>]) -> Self {
        Finder { parts, next: None }
    }

    fn find(&mut self, name: &str) -> Option<&'a Arc<Versioned>> {
        use std::ops::Bound;
        if let Some(next) = &mut self.next {
            let mut ahead = next.clone();
            if let Some((k, v)) = ahead.next()
                && k == name
            {
                *next = ahead;
                return Some(v);
            }
        }
        for p in self.parts {
            let mut from = p.range::<str, _>((Bound::Included(name), Bound::Unbounded));
            if let Some((k, v)) = from.next()
                && k == name
            {
                self.next = Some(from);
                return Some(v);
            }
        }
        None
    }
}

/// Splits resources into runs of at most [`MAX_CHUNK_BYTES`] (none when there are none).
fn chunks(resources: Vec<Arc<Versioned>>) -> Vec<Vec<Arc<Versioned>>> {
    let mut out = Vec::new();
    let mut current = Vec::new();
    let mut size = 0;
    for r in resources {
        let n = resource_len(&r);
        if !current.is_empty() && size + n > MAX_CHUNK_BYTES {
            out.push(std::mem::take(&mut current));
            size = 0;
        }
        size += n;
        current.push(r);
    }
    if !current.is_empty() {
        out.push(current);
    }
    out
}

/// Delta against what the proxy has, looking at every resource: the changed resources by part,
/// and the names removed.
fn delta_full(
    sub: &Subscription,
    type_url: &str,
    parts: &[Arc<Resources>],
) -> (Vec<Vec<Arc<Versioned>>>, Vec<String>) {
    let changed = parts
        .iter()
        .map(|p| {
            wanted(sub, type_url, std::slice::from_ref(p))
                .filter(|(n, v)| sub.sent.get(n.as_str()) != Some(&v.version))
                .map(|(_, v)| v.clone())
                .collect()
        })
        .collect();
    let mut removed: Vec<String> = sub
        .sent
        .keys()
        .filter(|n| !sub.wants(type_url, n) || !parts.iter().any(|p| p.contains_key(&***n)))
        .map(|n| n.to_string())
        .collect();
    // In name order, as the parts list their resources, whatever order the set hashes in.
    removed.sort_unstable();
    (changed, removed)
}

/// Delta against what the proxy has, looking only at the parts that are new since it was
/// last computed, through their shared diffs: the changed resources by part, and the names
/// removed.
fn delta_parts(
    sub: &Subscription,
    type_url: &str,
    parts: &[Arc<Resources>],
    diffs: &DiffMemo,
) -> (Vec<Vec<Arc<Versioned>>>, Vec<String>) {
    let mut changed = Vec::new();
    let mut removed = Vec::new();
    for (old, new) in sub.parts.iter().zip(parts) {
        if Arc::ptr_eq(old, new) {
            continue;
        }
        let d = diffs.get(old, new);
        let mut part = Vec::new();
        for n in d.changed.iter().filter(|n| sub.wants(type_url, n)) {
            if let Some(v) = new.get(n)
                && sub.sent.get(n.as_str()) != Some(&v.version)
            {
                part.push(v.clone());
            }
        }
        changed.push(part);
        for n in &d.removed {
            if sub.sent.contains_key(n.as_str()) && !parts.iter().any(|p| p.contains_key(n)) {
                removed.push(n.clone());
            }
        }
    }
    (changed, removed)
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

#[cfg(test)]
mod tests {
    use super::*;

    fn part(prefix: &str, count: usize, size: usize) -> Vec<Arc<Versioned>> {
        (0..count)
            .map(|i| {
                let any = Any {
                    type_url: CLUSTER.into(),
                    value: vec![1; size],
                };
                Arc::new(Versioned::new(&format!("{prefix}-{i}"), any))
            })
            .collect()
    }

    fn names(runs: &[Vec<Arc<Versioned>>]) -> Vec<Vec<String>> {
        runs.iter()
            .map(|r| r.iter().map(|v| v.name.to_string()).collect())
            .collect()
    }

    #[test]
    fn names_are_found_in_any_order_and_across_parts() {
        let resources = |p: Vec<Arc<Versioned>>| -> Arc<Resources> {
            Arc::new(p.into_iter().map(|v| (v.name.to_string(), v)).collect())
        };
        let parts = [resources(part("a", 12, 10)), resources(part("b", 3, 10))];
        let mut finder = Finder::new(&parts);
        // In order, out of order, across parts, missing, and back again.
        for name in [
            "a-0", "a-1", "a-10", "a-11", "a-2", "b-0", "a-5", "a-6", "b-2", "c-0", "a-3", "a-0",
        ] {
            let found = finder.find(name).map(|v| v.name.to_string());
            let want = parts
                .iter()
                .find_map(|p| p.get(name))
                .map(|v| v.name.to_string());
            assert_eq!(found, want, "{name}");
        }
    }

    #[test]
    fn subscribed_names_are_the_resources_own() {
        let generator = Arc::new(FixedGenerator::default());
        let any = || Any {
            type_url: ENDPOINT.into(),
            value: vec![1],
        };
        generator.put(ENDPOINT, "a", any());
        generator.put(ENDPOINT, "b", any());
        let (_version, rx) = watch::channel(1);
        let server = AdsServer::new(generator.clone(), rx);
        let mut conn = server.conn(true);
        let subscribe = |names: &[&str]| DeltaDiscoveryRequest {
            node: Some(Node::default()),
            type_url: ENDPOINT.into(),
            resource_names_subscribe: names.iter().map(|n| n.to_string()).collect(),
            ..Default::default()
        };
        let own = |conn: &Conn<FixedGenerator>, name: &str| {
            let parts = conn.parts(ENDPOINT).unwrap();
            let resource = &parts[0][name];
            let sub = &conn.subs[ENDPOINT];
            Arc::ptr_eq(sub.names.get(name).unwrap(), &resource.name)
        };
        // The first subscription finds the resources: their names are taken, none left to look for.
        let sent = conn.delta_request(subscribe(&["a", "b", "c"]), 1);
        assert_eq!(sent.len(), 1);
        assert!(own(&conn, "a") && own(&conn, "b"));
        assert_eq!(conn.subs[ENDPOINT].unowned, 1, "c does not exist yet");
        // Once c exists, the response that sends it makes its name the resource's.
        generator.put(ENDPOINT, "c", any());
        let sent = conn.delta_response(ENDPOINT, 2, false);
        assert_eq!(sent.len(), 1);
        assert!(own(&conn, "c"));
        assert_eq!(conn.subs[ENDPOINT].unowned, 0);
    }

    #[test]
    fn a_response_carries_one_part_only_when_they_need_several() {
        // Small: one response, both parts in it.
        let small = runs(vec![part("shared", 3, 100), part("own", 1, 100)]);
        assert_eq!(
            names(&small),
            [["shared-0", "shared-1", "shared-2", "own-0"]]
        );
        // Large: the shared part's runs are its own, whatever follows; the proxy's own part
        // goes in a run of its own.
        let shared = part("shared", 3 * MAX_CHUNK_BYTES / 2000, 1000);
        let alone = runs(vec![shared.clone()]);
        let with_own = runs(vec![shared, part("own", 1, 100)]);
        assert!(alone.len() >= 2, "{} runs", alone.len());
        assert_eq!(with_own.len(), alone.len() + 1);
        assert_eq!(names(&with_own[..alone.len()]), names(&alone));
        assert_eq!(names(&with_own[alone.len()..]), [["own-0"]]);
        assert!(
            with_own
                .iter()
                .all(|r| r.iter().map(|v| resource_len(v)).sum::<usize>() <= MAX_CHUNK_BYTES)
        );
        assert!(runs(vec![Vec::new(), Vec::new()]).is_empty());
    }
}
