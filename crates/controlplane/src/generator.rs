//! Pilot as an xDS generator: the Envoy node becomes a [`Proxy`], the current push context
//! answers for it.
//!
//! Most of a sidecar's configuration is what every proxy of its [`Scope`] (namespace, Sidecar
//! and locality) gets alike: that part is built once per scope and push context and shared by all
//! of them; only the proxy's own inbound clusters and listener are built per proxy. A shared
//! part rebuilt for a new push context that came out the same is replaced by the previous one,
//! so the ADS server sees the same `Arc` and skips it for every proxy at once. When only
//! endpoints changed (the push context kept its outbound epoch), a scope keeps its clusters,
//! listeners and routes, and endpoint assignments are rebuilt only where their inputs changed.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, RwLock, Weak};

use envoy_types::pb::envoy::config::core::v3::Node;
use envoy_types::pb::google::protobuf::{Struct, value};
use envoy_types::util::pack_any;
use isthmus_pilot::{NodeMetadata, Proxy, PushContext, Scope};
use isthmus_xds::Generator;
use isthmus_xds::nds::NAME_TABLE;
use isthmus_xds::server::{CLUSTER, ENDPOINT, LISTENER, ROUTE, Resources, Versioned};

/// The push context being served, swapped whole on every accepted change.
pub type Shared = Arc<RwLock<Arc<PushContext>>>;

pub struct PilotGenerator {
    pub context: Shared,
    scopes: Mutex<HashMap<Scope, Arc<Mutex<Option<Cached>>>>>,
    assignments: Mutex<AssignmentCache>,
    clusters: Mutex<ClusterCache>,
    /// The passthrough and blackhole clusters, alike for every proxy and push context.
    fixed_clusters: Resources,
    /// Hashes cache keys (assignment inputs; a proxy and its workload): fast, and seeded per
    /// process so that no input can be crafted to collide with another's key.
    keys: foldhash::quality::RandomState,
    inbound: Mutex<InboundCache>,
}

/// Per proxy: its inbound clusters and listeners, kept while the outbound epoch (all config
/// but endpoints) and the proxy's own node and workload stay the same, so an endpoint change
/// builds nothing per proxy. Emptied when the epoch moves on.
#[derive(Default)]
struct InboundCache {
    epoch: u64,
    by_node: HashMap<String, Inbound>,
}

#[derive(Clone)]
struct Inbound {
    /// Hash of the proxy and its workload.
    key: u64,
    clusters: Arc<Resources>,
    listeners: Arc<Resources>,
}

/// A scope's shared parts, and the push context they were built from.
struct Cached {
    context: Weak<PushContext>,
    outbound_epoch: u64,
    parts: ScopeParts,
}

/// Outbound clusters by [`OutboundInputs::key`](isthmus_pilot::cluster::OutboundInputs::key),
/// for the push context they were built in: scopes that see the same services under the same
/// DestinationRules share each cluster, built once (and so the encodings of their responses).
#[derive(Default)]
struct ClusterCache {
    context: Weak<PushContext>,
    by_inputs: HashMap<(usize, u16, usize, usize), Arc<Versioned>>,
}

/// Endpoint assignments by [`Assignment::key`](isthmus_pilot::endpoint::Assignment::key),
/// shared by every scope and kept from one push context to the next, so a changed endpoint
/// rebuilds one assignment. What the last two push contexts did not use is dropped.
#[derive(Default)]
struct AssignmentCache {
    context: Weak<PushContext>,
    current: HashMap<u64, Arc<Versioned>>,
    previous: HashMap<u64, Arc<Versioned>>,
}

impl AssignmentCache {
    /// The assignment `a` whose key is `key`.
    fn get(
        &mut self,
        ctx: &Arc<PushContext>,
        key: u64,
        a: &isthmus_pilot::endpoint::Assignment<'_>,
    ) -> Arc<Versioned> {
        if !std::ptr::eq(self.context.as_ptr(), Arc::as_ptr(ctx)) {
            self.context = Arc::downgrade(ctx);
            self.previous = std::mem::take(&mut self.current);
        }
        if let Some(v) = self.current.get(&key) {
            return v.clone();
        }
        let v = self
            .previous
            .remove(&key)
            .unwrap_or_else(|| Arc::new(Versioned::new(&a.name, pack_any(a.build()))));
        self.current.insert(key, v.clone());
        v
    }
}

#[derive(Clone)]
struct ScopeParts {
    clusters: Arc<Resources>,
    endpoints: Arc<Resources>,
    listeners: Arc<Resources>,
    routes: Arc<Resources>,
}

impl PilotGenerator {
    pub fn new(context: Shared) -> Self {
        PilotGenerator {
            context,
            scopes: Mutex::default(),
            assignments: Mutex::default(),
            clusters: Mutex::default(),
            fixed_clusters: Arc::unwrap_or_clone(versioned(
                isthmus_pilot::cluster::fixed_clusters(),
                |c| &c.name,
            )),
            keys: Default::default(),
            inbound: Mutex::default(),
        }
    }

    pub fn current(&self) -> Arc<PushContext> {
        self.context
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// The shared parts of `proxy`'s scope under `ctx`, built by the first proxy that asks.
    fn shared(&self, ctx: &Arc<PushContext>, proxy: &Proxy) -> ScopeParts {
        let slot = self
            .scopes
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(ctx.scope(proxy))
            .or_default()
            .clone();
        let mut cached = slot.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(c) = cached.as_ref()
            && std::ptr::eq(c.context.as_ptr(), Arc::as_ptr(ctx))
        {
            return c.parts.clone();
        }
        let endpoints = {
            // Keyed before taking the cache, which every scope shares: scopes key in parallel.
            let keyed: Vec<_> = isthmus_pilot::endpoint::assignments(ctx, proxy)
                .into_iter()
                .map(|a| (a.key(&self.keys), a))
                .collect();
            let mut cache = self.assignments.lock().unwrap_or_else(|p| p.into_inner());
            Arc::new(
                keyed
                    .into_iter()
                    .map(|(key, a)| {
                        let v = cache.get(ctx, key, &a);
                        (a.name, v)
                    })
                    .collect(),
            )
        };
        let built = match cached.as_ref() {
            // Only endpoints changed since: the rest of the scope stands.
            Some(old) if old.outbound_epoch == ctx.outbound_epoch => ScopeParts {
                endpoints,
                ..old.parts.clone()
            },
            _ => ScopeParts {
                clusters: self.outbound_clusters(ctx, proxy),
                endpoints,
                listeners: versioned(isthmus_pilot::listener::shared_listeners(ctx, proxy), |l| {
                    &l.name
                }),
                routes: versioned(isthmus_pilot::route::routes(ctx, proxy, &[]), |r| &r.name),
            },
        };
        let parts = match cached.as_ref() {
            Some(old) => ScopeParts {
                clusters: keep_if_same(&old.parts.clusters, built.clusters),
                endpoints: keep_if_same(&old.parts.endpoints, built.endpoints),
                listeners: keep_if_same(&old.parts.listeners, built.listeners),
                routes: keep_if_same(&old.parts.routes, built.routes),
            },
            None => built,
        };
        *cached = Some(Cached {
            context: Arc::downgrade(ctx),
            outbound_epoch: ctx.outbound_epoch,
            parts: parts.clone(),
        });
        parts
    }

    /// The clusters of `proxy`'s scope under `ctx`: each outbound one from the cache when another
    /// scope has built it. Scopes that see the same clusters then get the same resources, and
    /// share the encodings of their responses too.
    fn outbound_clusters(&self, ctx: &Arc<PushContext>, proxy: &Proxy) -> Arc<Resources> {
        let cached = |key| {
            let mut cache = self.clusters.lock().unwrap_or_else(|p| p.into_inner());
            if !std::ptr::eq(cache.context.as_ptr(), Arc::as_ptr(ctx)) {
                cache.context = Arc::downgrade(ctx);
                cache.by_inputs.clear();
            }
            cache.by_inputs.get(&key).cloned()
        };
        let mut all = self.fixed_clusters.clone();
        for inputs in isthmus_pilot::cluster::outbound_inputs(ctx, proxy) {
            let key = inputs.key();
            // Built outside the lock: scopes build in parallel; the first one kept is shared.
            let v = cached(key).unwrap_or_else(|| {
                let c = inputs.build();
                let built = packed(&c.name.clone(), c);
                let mut cache = self.clusters.lock().unwrap_or_else(|p| p.into_inner());
                if std::ptr::eq(cache.context.as_ptr(), Arc::as_ptr(ctx)) {
                    cache.by_inputs.entry(key).or_insert(built).clone()
                } else {
                    built
                }
            });
            all.insert(v.name.to_string(), v);
        }
        Arc::new(all)
    }

    /// `proxy`'s inbound clusters and listeners under `ctx`, from the cache when still valid.
    fn inbound(&self, ctx: &PushContext, proxy: &Proxy) -> Inbound {
        use std::hash::BuildHasher;
        let key = self.keys.hash_one((proxy, ctx.workload_of(proxy)));
        {
            let mut cache = self.inbound.lock().unwrap_or_else(|p| p.into_inner());
            if cache.epoch != ctx.outbound_epoch {
                cache.epoch = ctx.outbound_epoch;
                cache.by_node.clear();
            }
            if let Some(i) = cache.by_node.get(&proxy.id)
                && i.key == key
            {
                return i.clone();
            }
        }
        let built = Inbound {
            key,
            clusters: versioned(isthmus_pilot::cluster::inbound_clusters(ctx, proxy), |c| {
                &c.name
            }),
            listeners: versioned(
                isthmus_pilot::listener::inbound_listeners(ctx, proxy),
                |l| &l.name,
            ),
        };
        let mut cache = self.inbound.lock().unwrap_or_else(|p| p.into_inner());
        if cache.epoch == ctx.outbound_epoch {
            cache.by_node.insert(proxy.id.clone(), built.clone());
        }
        built
    }
}

/// Resources packed and versioned, by the name `name` gives each.
fn versioned<T: prost::Name>(resources: Vec<T>, name: impl Fn(&T) -> &String) -> Arc<Resources> {
    Arc::new(
        resources
            .into_iter()
            .map(|r| {
                let name = name(&r).clone();
                let v = packed(&name, r);
                (name, v)
            })
            .collect(),
    )
}

fn packed<T: prost::Name>(name: &str, resource: T) -> Arc<Versioned> {
    Arc::new(Versioned::new(name, pack_any(resource)))
}

/// The previous part when the new one has the same names and versions.
fn keep_if_same(old: &Arc<Resources>, new: Arc<Resources>) -> Arc<Resources> {
    let same = Arc::ptr_eq(old, &new)
        || old.len() == new.len()
            && old
                .iter()
                .zip(new.iter())
                .all(|((a, x), (b, y))| a == b && x.version == y.version);
    if same { old.clone() } else { new }
}

impl Generator for PilotGenerator {
    type Proxy = Proxy;

    fn proxy(&self, node: &Node) -> Result<Proxy, String> {
        proxy_of(node)
    }

    fn generate(
        &self,
        proxy: &Proxy,
        type_url: &str,
        _names: &isthmus_xds::server::Names,
    ) -> Result<Vec<Arc<Resources>>, String> {
        let ctx = self.current();
        Ok(match type_url {
            CLUSTER => vec![
                self.shared(&ctx, proxy).clusters,
                self.inbound(&ctx, proxy).clusters,
            ],
            ENDPOINT => vec![self.shared(&ctx, proxy).endpoints],
            LISTENER => vec![
                self.shared(&ctx, proxy).listeners,
                self.inbound(&ctx, proxy).listeners,
            ],
            ROUTE => vec![self.shared(&ctx, proxy).routes],
            // Built when asked: only the proxies whose agents answer DNS subscribe. Unnamed, as
            // Istio's.
            NAME_TABLE => {
                let table = isthmus_pilot::nds::name_table(&ctx, proxy);
                vec![Arc::new(Resources::from([(
                    String::new(),
                    packed("", table),
                )]))]
            }
            // Secrets come with the proxy's SDS.
            _ => Vec::new(),
        })
    }
}

/// The proxy behind an Envoy node (Istio's node id and `ISTIO_META_*` metadata).
pub fn proxy_of(node: &Node) -> Result<Proxy, String> {
    Proxy::from_node(&node.id, &metadata(node.metadata.as_ref())?).map_err(|e| e.to_string())
}

/// The service account a node's metadata names (`SERVICE_ACCOUNT`), if any.
pub fn service_account_of(node: &Node) -> Option<String> {
    metadata(node.metadata.as_ref()).ok()?.service_account
}

fn metadata(md: Option<&Struct>) -> Result<NodeMetadata, String> {
    let Some(md) = md else {
        return Ok(NodeMetadata::default());
    };
    let string = |k: &str| match md.fields.get(k).and_then(|v| v.kind.as_ref()) {
        Some(value::Kind::StringValue(s)) => Some(s.clone()),
        _ => None,
    };
    let labels = match md.fields.get("LABELS").and_then(|v| v.kind.as_ref()) {
        Some(value::Kind::StructValue(s)) => s
            .fields
            .iter()
            .filter_map(|(k, v)| match &v.kind {
                Some(value::Kind::StringValue(s)) => Some((k.clone(), s.clone())),
                _ => None,
            })
            .collect(),
        _ => BTreeMap::new(),
    };
    // The pod's ProxyConfig, of which the configuration reads `proxyHeaders`.
    let proxy_headers = match md.fields.get("PROXY_CONFIG").and_then(|v| v.kind.as_ref()) {
        Some(value::Kind::StructValue(pc)) => match pc.fields.get("proxyHeaders") {
            Some(v) => Some(
                isthmus_xds::json::to_json(v)
                    .map_err(|e| e.to_string())
                    .and_then(|j| serde_json::from_value(j).map_err(|e| e.to_string()))
                    .map_err(|e| format!("node metadata PROXY_CONFIG.proxyHeaders: {e}"))?,
            ),
            None => None,
        },
        _ => None,
    };
    let tracing = match md.fields.get("PROXY_CONFIG").and_then(|v| v.kind.as_ref()) {
        Some(value::Kind::StructValue(pc)) => pc
            .fields
            .get("tracing")
            .map(|v| {
                isthmus_xds::json::to_json(v)
                    .map_err(|e| format!("node metadata PROXY_CONFIG.tracing: {e}"))
            })
            .transpose()?,
        _ => None,
    };
    Ok(NodeMetadata {
        tracing,
        namespace: string("NAMESPACE"),
        labels,
        instance_ips: string("INSTANCE_IPS")
            .unwrap_or_default()
            .split(',')
            .filter_map(|s| s.trim().parse().ok())
            .collect(),
        service_account: string("SERVICE_ACCOUNT"),
        cluster_id: string("CLUSTER_ID"),
        interception_mode: string("INTERCEPTION_MODE"),
        istio_version: string("ISTIO_VERSION"),
        name: string("NAME"),
        proxy_headers,
        dns_auto_allocate: string("DNS_AUTO_ALLOCATE")
            .is_some_and(|v| v.eq_ignore_ascii_case("true")),
        idle_timeout: string("IDLE_TIMEOUT"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use envoy_types::pb::envoy::config::cluster::v3::Cluster;
    use isthmus_config::{Loader, MeshConfig, Snapshot};
    use isthmus_pilot::NodeMetadata;
    use prost::Message;

    const MESH: &str = "\
apiVersion: v1
kind: Service
metadata: {name: web, namespace: a}
spec:
  ports: [{name: http, port: 80}]
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: web-for-c, namespace: c}
spec:
  host: web.a.svc.cluster.local
  exportTo: [\".\"]
  trafficPolicy:
    connectionPool:
      tcp: {maxConnections: 10}
";

    fn proxy(ip: &str, ns: &str) -> Proxy {
        let id = Proxy::node_id(ip.parse().unwrap(), "pod", ns, "cluster.local");
        Proxy::from_node(&id, &NodeMetadata::default()).unwrap()
    }

    #[test]
    fn scopes_that_see_a_cluster_alike_share_it() {
        let loaded = Loader::default().load_str("mesh.yaml", MESH);
        assert!(loaded.errors().next().is_none(), "{:?}", loaded.diagnostics);
        let snapshot: Snapshot = loaded.resources.into_iter().collect();
        let ctx = PushContext::new(snapshot, MeshConfig::default(), "cluster.local", None);
        let generator = PilotGenerator::new(Arc::new(RwLock::new(Arc::new(ctx))));
        let web = "outbound|80||web.a.svc.cluster.local";
        let cluster = |ip: &str, ns: &str| {
            let parts = generator
                .generate(&proxy(ip, ns), CLUSTER, &Default::default())
                .unwrap();
            parts[0][web].clone()
        };
        let (a, b, c) = (
            cluster("10.0.0.1", "a"),
            cluster("10.0.0.2", "b"),
            cluster("10.0.0.3", "c"),
        );
        assert!(Arc::ptr_eq(&a, &b), "namespaces a and b see web alike");
        let passthrough = |ip: &str, ns: &str| {
            let parts = generator
                .generate(&proxy(ip, ns), CLUSTER, &Default::default())
                .unwrap();
            parts[0]["PassthroughCluster"].clone()
        };
        assert!(Arc::ptr_eq(
            &passthrough("10.0.0.1", "a"),
            &passthrough("10.0.0.3", "c")
        ));
        assert!(!Arc::ptr_eq(&a, &c), "c has a DestinationRule of its own");
        let max_connections = |v: &Versioned| {
            let c = Cluster::decode(v.any.value.as_slice()).unwrap();
            c.circuit_breakers.unwrap().thresholds[0]
                .max_connections
                .unwrap()
                .value
        };
        assert_eq!(max_connections(&c), 10);
        assert_ne!(max_connections(&a), 10);
    }

    fn node(ip: &str, proxy_config: serde_json::Value) -> Node {
        let pc: Struct = isthmus_xds::json::from_json(proxy_config).unwrap();
        Node {
            id: Proxy::node_id(ip.parse().unwrap(), "pod", "a", "cluster.local"),
            metadata: Some(Struct {
                fields: [(
                    "PROXY_CONFIG".to_string(),
                    envoy_types::pb::google::protobuf::Value {
                        kind: Some(value::Kind::StructValue(pc)),
                    },
                )]
                .into(),
            }),
            ..Default::default()
        }
    }

    /// `ISTIO_META_IDLE_TIMEOUT` reaches the control plane as `IDLE_TIMEOUT`, a Go duration;
    /// one that does not parse is none, as in Istio.
    #[test]
    fn the_idle_timeout_comes_from_the_node_metadata() {
        let with = |v: &str| {
            let mut n = node("10.0.0.1", serde_json::json!({}));
            if let Some(md) = n.metadata.as_mut() {
                md.fields.insert(
                    "IDLE_TIMEOUT".into(),
                    envoy_types::pb::google::protobuf::Value {
                        kind: Some(value::Kind::StringValue(v.into())),
                    },
                );
            }
            proxy_of(&n).unwrap().idle_timeout
        };
        assert_eq!(with("1h30m"), Some(std::time::Duration::from_secs(5400)));
        assert_eq!(with("soon"), None);
    }

    /// A pod's `proxyHeaders` reach the control plane in its node metadata and shape its
    /// listeners, which it then shares with no pod of other headers.
    #[test]
    fn a_pods_proxy_headers_come_from_its_node_metadata() {
        let loaded = Loader::default().load_str("mesh.yaml", MESH);
        let snapshot: Snapshot = loaded.resources.into_iter().collect();
        let ctx = PushContext::new(snapshot, MeshConfig::default(), "cluster.local", None);
        let generator = PilotGenerator::new(Arc::new(RwLock::new(Arc::new(ctx))));
        let own = proxy_of(&node(
            "10.0.0.1",
            serde_json::json!({"proxyHeaders": {"server": {"value": "my-proxy"}}}),
        ))
        .unwrap();
        assert_eq!(
            own.proxy_headers
                .as_ref()
                .and_then(|h| h.server.as_ref())
                .map(|s| s.value.as_str()),
            Some("my-proxy")
        );
        let plain = proxy_of(&node("10.0.0.2", serde_json::json!({"concurrency": 2}))).unwrap();
        assert_eq!(plain.proxy_headers, None);
        // Its tracing settings come the same way.
        let traced = proxy_of(&node(
            "10.0.0.4",
            serde_json::json!({"tracing": {"sampling": 50.0}}),
        ))
        .unwrap();
        assert_eq!(traced.tracing, Some(serde_json::json!({"sampling": 50.0})));
        assert_eq!(plain.tracing, None);
        let server_name = |p: &Proxy| {
            let parts = generator
                .generate(p, LISTENER, &Default::default())
                .unwrap();
            let l = envoy_types::pb::envoy::config::listener::v3::Listener::decode(
                parts[0]["0.0.0.0_80"].any.value.as_slice(),
            )
            .unwrap();
            let json = isthmus_xds::json::to_json(&l).unwrap();
            json["filter_chains"][0]["filters"][0]["typed_config"]["server_name"].clone()
        };
        assert_eq!(server_name(&own), "my-proxy");
        assert_eq!(
            server_name(&plain),
            serde_json::Value::Null,
            "Envoy's default"
        );

        let bad = proxy_of(&node(
            "10.0.0.3",
            serde_json::json!({"proxyHeaders": {"server": "my-proxy"}}),
        ))
        .unwrap_err();
        assert!(bad.contains("PROXY_CONFIG.proxyHeaders"), "{bad}");
    }
}
