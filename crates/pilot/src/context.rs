//! Everything translation needs about the mesh at one moment: the snapshot, the registry built
//! from it, MeshConfig, and the lookups Istio's push context answers (which DestinationRule
//! applies, which Sidecar scopes a proxy, which mTLS mode a port has).

use std::collections::BTreeMap;
use std::sync::Arc;

use isthmus_config::istio::common::WorkloadSelector;
use isthmus_config::resource::{DestinationRule, PeerAuthentication, Sidecar};
use isthmus_config::{Entry, HasMetadata, Kind, MeshConfig, Snapshot};
use isthmus_registry::host::{host_matches, resolve_config_host};
use isthmus_registry::{Locality, Port, Registry, Service, Workload};

use crate::authn::JwksDocs;
use crate::headers::ProxyHeaders;
use crate::proxy::Proxy;

/// How a proxy hands inbound traffic to its app (seeds 000–002).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InboundMode {
    /// To the pod IP, as the app would have received it without a sidecar (Istio ≥ 1.10).
    Passthrough,
    /// To 127.0.0.1 (`inboundTrafficPolicy.mode: LOCALHOST` or
    /// `PILOT_ENABLE_INBOUND_PASSTHROUGH=false`).
    Localhost,
}

/// PeerAuthentication's effective mode for a workload port.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MtlsMode {
    Disable,
    Permissive,
    Strict,
}

/// A service a proxy may reach, and the ports it may reach it on.
pub struct Imported<'a> {
    pub svc: &'a Service,
    pub ports: Vec<&'a Port>,
}

/// What the configuration proxies share depends on: proxies with equal scopes get the same
/// outbound clusters, endpoints, outbound listeners and routes (their namespace decides
/// visibility, DestinationRule and VirtualService lookups and short host names; their Sidecar
/// the egress hosts; their locality the failover priorities of endpoints).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Scope {
    pub namespace: String,
    /// The Sidecar resource (namespace, name) that applies, if any.
    pub sidecar: Option<(String, String)>,
    /// The proxy's locality: endpoints are prioritized from it (locality failover).
    pub locality: Option<Locality>,
    /// The pod's own `proxyHeaders`, which shape its listeners and routes.
    pub proxy_headers: Option<isthmus_config::mesh::ProxyHeaders>,
    /// The outbound listeners' tracing, access logs and stats filter, encoded: Telemetry resources that
    /// select the workload, and tracing's per-workload tags, make them differ.
    pub telemetry: Vec<u8>,
    /// Allocated addresses of ServiceEntries are in its listeners and routes.
    pub dns_auto_allocate: bool,
    /// Its TCP proxies' idle timeout (`IDLE_TIMEOUT`).
    pub idle_timeout: Option<std::time::Duration>,
    /// Which VirtualService matches with `sourceLabels` select the workload.
    pub source_selections: Vec<bool>,
}

#[derive(Debug, Clone)]
pub struct PushContext {
    pub snapshot: Snapshot,
    pub registry: Registry,
    pub mesh: MeshConfig,
    pub inbound_mode: InboundMode,
    /// Changes when anything outbound clusters, listeners and routes depend on changes (see
    /// [`PushContext::follow`]); a change of endpoints alone keeps it.
    pub outbound_epoch: u64,
    /// The keys RequestAuthentication `jwksUri`s pointed to when the control plane fetched
    /// them (istiod inlines them into the JWT filter, and so do we).
    pub jwks: JwksDocs,
    /// The headers proxies add, from the mesh's `proxyHeaders`.
    mesh_headers: ProxyHeaders,
}

/// The kinds that only make endpoints (and a proxy's own inbound configuration): a change in
/// them alone leaves outbound clusters, listeners and routes as they were, except through what
/// [`workload_inputs`] collects.
const WORKLOAD_KINDS: &[Kind] = &[
    Kind::Pod,
    Kind::WorkloadEntry,
    Kind::EndpointSlice,
    Kind::Node,
    Kind::Deployment,
    Kind::StatefulSet,
    Kind::DaemonSet,
    Kind::ReplicaSet,
    Kind::Job,
];

/// A hash of what outbound clusters read from a service's endpoints: the identities (SANs);
/// per port, whether it has endpoints and whether all have sidecars (headless auto mTLS); and,
/// for DNS clusters, which carry their endpoints inline, the endpoints themselves.
fn workload_inputs(svc: &Service) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    let mut accounts: Vec<&str> = svc
        .endpoints
        .iter()
        .map(|e| e.service_account.as_str())
        .collect();
    accounts.sort_unstable();
    accounts.dedup();
    accounts.hash(&mut h);
    for p in &svc.ports {
        (
            p.port,
            svc.endpoints_for(p.port).next().is_some(),
            svc.endpoints_for(p.port).all(|e| e.sidecar),
        )
            .hash(&mut h);
    }
    if crate::cluster::discovery(svc) == crate::cluster::Discovery::Dns {
        for e in &svc.endpoints {
            (
                &e.address,
                e.port,
                e.service_port,
                &e.locality,
                e.weight,
                e.healthy,
                e.sidecar,
                &e.labels,
            )
                .hash(&mut h);
        }
    }
    h.finish()
}

impl PushContext {
    /// `passthrough_env` is `PILOT_ENABLE_INBOUND_PASSTHROUGH` as set (`Some(false)` selects
    /// LOCALHOST like the mesh setting does).
    pub fn new(
        snapshot: Snapshot,
        mesh: MeshConfig,
        domain: &str,
        passthrough_env: Option<bool>,
    ) -> Self {
        let registry = Registry::build(&snapshot, domain);
        let inbound_mode = if mesh.inbound_localhost() || passthrough_env == Some(false) {
            InboundMode::Localhost
        } else {
            InboundMode::Passthrough
        };
        PushContext {
            mesh_headers: ProxyHeaders::resolve(
                mesh.default_config
                    .as_ref()
                    .and_then(|c| c.proxy_headers.as_ref()),
            ),
            snapshot,
            registry,
            mesh,
            inbound_mode,
            outbound_epoch: 0,
            jwks: JwksDocs::new(),
        }
    }

    /// Takes `previous`'s outbound epoch when only endpoints changed since it, the next one
    /// otherwise: generators keep outbound clusters, listeners and routes built for an epoch.
    pub fn follow(&mut self, previous: &PushContext) {
        let same = self.mesh == previous.mesh
            && self.inbound_mode == previous.inbound_mode
            && self.jwks == previous.jwks
            && self.registry.domain == previous.registry.domain
            && self
                .snapshot
                .same_except(&previous.snapshot, WORKLOAD_KINDS)
            && self.registry.services.len() == previous.registry.services.len()
            && self
                .registry
                .services
                .iter()
                .zip(&previous.registry.services)
                .all(|(a, b)| a.hostname == b.hostname && workload_inputs(a) == workload_inputs(b));
        self.outbound_epoch = if same {
            previous.outbound_epoch
        } else {
            previous.outbound_epoch + 1
        };
    }

    pub fn domain(&self) -> &str {
        &self.registry.domain
    }

    pub fn root_namespace(&self) -> &str {
        self.mesh.root_namespace()
    }

    /// The workload a proxy runs beside, found by its IP.
    pub fn workload_of(&self, proxy: &Proxy) -> Option<&Workload> {
        proxy
            .ips
            .iter()
            .find_map(|ip| self.registry.workload_by_ip(*ip))
    }

    /// The workload policies of `list` that apply to `proxy`: the root namespace's and those of
    /// its namespace, without a selector or with one matching its labels, in name order.
    /// `binding` gives a policy's selector, and whether it is bound by `targetRef` instead
    /// (then it attaches to gateways and waypoints, not to sidecars).
    pub fn workload_policies<'a, T: HasMetadata>(
        &'a self,
        proxy: &'a Proxy,
        list: &'a [Arc<Entry<T>>],
        binding: impl Fn(&T) -> (Option<&WorkloadSelector>, bool),
    ) -> Vec<&'a Entry<T>> {
        let labels = self.proxy_labels(proxy);
        let mut out: Vec<&Entry<T>> = list
            .iter()
            .map(|p| &**p)
            .filter(|p| p.namespace() == proxy.namespace || p.namespace() == self.root_namespace())
            .filter(|p| match binding(&p.object) {
                (_, true) => false,
                (selector, false) => {
                    selector.is_none_or(|s| selector_matches(&s.match_labels, labels))
                }
            })
            .collect();
        out.sort_by(|a, b| (a.namespace(), a.name()).cmp(&(b.namespace(), b.name())));
        out
    }

    /// The labels of a proxy's workload: its node metadata, else the registry's.
    pub fn proxy_labels<'a>(&'a self, proxy: &'a Proxy) -> &'a BTreeMap<String, String> {
        if !proxy.labels.is_empty() {
            return &proxy.labels;
        }
        self.workload_of(proxy).map_or(&proxy.labels, |w| &w.labels)
    }

    /// The Sidecar resource scoping `proxy`: one whose selector matches it in its namespace,
    /// else its namespace's selector-less one, else the root namespace's.
    pub fn sidecar_for<'a>(&'a self, proxy: &'a Proxy) -> Option<&'a Entry<Sidecar>> {
        let labels = self.proxy_labels(proxy);
        let sidecars = &self.snapshot.sidecars;
        let in_ns = |ns: &'a str| {
            sidecars
                .iter()
                .map(|s| &**s)
                .filter(move |s| s.namespace() == ns)
        };
        in_ns(&proxy.namespace)
            .find(|s| {
                s.object
                    .spec
                    .workload_selector
                    .as_ref()
                    .is_some_and(|sel| selector_matches(&sel.labels, labels))
            })
            .or_else(|| in_ns(&proxy.namespace).find(|s| s.object.spec.workload_selector.is_none()))
            .or_else(|| {
                in_ns(self.root_namespace()).find(|s| s.object.spec.workload_selector.is_none())
            })
    }

    /// The locality of a proxy's workload, when it has one.
    pub fn proxy_locality(&self, proxy: &Proxy) -> Option<Locality> {
        self.workload_of(proxy)
            .map(|w| w.locality.clone())
            .filter(|l| !l.is_empty())
    }

    /// The headers `proxy` adds: its pod's `proxyHeaders`, else the mesh's.
    pub fn proxy_headers(&self, proxy: &Proxy) -> std::borrow::Cow<'_, ProxyHeaders> {
        match &proxy.proxy_headers {
            Some(own) => std::borrow::Cow::Owned(ProxyHeaders::resolve(Some(own))),
            None => std::borrow::Cow::Borrowed(&self.mesh_headers),
        }
    }

    pub fn scope(&self, proxy: &Proxy) -> Scope {
        Scope {
            dns_auto_allocate: proxy.dns_auto_allocate,
            idle_timeout: proxy.idle_timeout,
            source_selections: crate::route::source_selections(self, proxy),
            proxy_headers: proxy.proxy_headers.clone(),
            locality: self.proxy_locality(proxy),
            namespace: proxy.namespace.clone(),
            sidecar: self
                .sidecar_for(proxy)
                .map(|s| (s.namespace().to_string(), s.name().to_string())),
            telemetry: {
                use prost::Message;
                let side = crate::telemetry::Side::Client;
                let mut key = Vec::new();
                if let Some(t) = crate::trace::hcm_tracing(self, proxy, side) {
                    t.encode_length_delimited(&mut key).unwrap_or_default();
                }
                for log in crate::access_log::access_logs(self, proxy, side) {
                    log.encode_length_delimited(&mut key).unwrap_or_default();
                }
                if let Some(s) = crate::metrics::stats_config(self, proxy, side) {
                    s.encode_length_delimited(&mut key).unwrap_or_default();
                }
                key
            },
        }
    }

    /// The services a proxy may reach, with the ports it may reach them on: visible to its
    /// namespace and, when its Sidecar has egress listeners, within their hosts — on the
    /// listener's port only when the listener names one, on every port otherwise.
    pub fn services_for(&self, proxy: &Proxy) -> Vec<Imported<'_>> {
        let export = &self.mesh.default_service_export_to;
        // A Sidecar without egress listeners imports everything, as Istio's does.
        let egress: Option<Vec<(String, String, Option<u16>)>> = self
            .sidecar_for(proxy)
            .filter(|s| !s.object.spec.egress.is_empty())
            .map(|s| {
                s.object
                    .spec
                    .egress
                    .iter()
                    .flat_map(|e| {
                        let port = e.port.as_ref().and_then(|p| u16::try_from(p.number).ok());
                        e.hosts.iter().map(move |h| (h, port))
                    })
                    .filter_map(|(h, port)| h.split_once('/').map(|(ns, host)| (ns, host, port)))
                    .map(|(ns, host, port)| {
                        let ns = if ns == "." { s.namespace() } else { ns };
                        (ns.to_string(), host.to_string(), port)
                    })
                    .collect()
            });
        let mut out: Vec<Imported<'_>> = self
            .registry
            .services
            .iter()
            .filter(|svc| svc.visible_to(&proxy.namespace, export))
            .filter_map(|svc| {
                let ports: Vec<&Port> = match &egress {
                    None => svc.ports.iter().collect(),
                    Some(listeners) => {
                        let matching: Vec<Option<u16>> = listeners
                            .iter()
                            .filter(|(ns, host, _)| {
                                (ns == "*" || ns == &svc.namespace)
                                    && host_matches(host, &svc.hostname)
                            })
                            .map(|(_, _, port)| *port)
                            .collect();
                        svc.ports
                            .iter()
                            .filter(|p| matching.iter().any(|m| m.is_none_or(|n| n == p.port)))
                            .collect()
                    }
                };
                (!ports.is_empty()).then_some(Imported { svc, ports })
            })
            .collect();
        out.sort_by(|a, b| {
            (&a.svc.hostname, &a.svc.namespace).cmp(&(&b.svc.hostname, &b.svc.namespace))
        });
        out.dedup_by(|a, b| a.svc.hostname == b.svc.hostname);
        out
    }

    /// Whether traffic to unknown destinations passes (ALLOW_ANY) for `proxy`: its Sidecar's
    /// `outboundTrafficPolicy` when set, else MeshConfig's.
    pub fn outbound_allow_any(&self, proxy: &Proxy) -> bool {
        self.sidecar_for(proxy)
            .and_then(|s| s.object.spec.outbound_traffic_policy.as_ref())
            .and_then(|p| p.mode.as_deref())
            .map_or_else(|| self.mesh.outbound_allow_any(), |m| m != "REGISTRY_ONLY")
    }

    /// The DestinationRule that applies to `svc` for a proxy in `proxy_ns`: the proxy's own
    /// namespace first, then the service's namespace (if exported to the proxy), then the root
    /// namespace; within one namespace an exact host beats a wildcard, then the oldest wins.
    pub fn destination_rule(
        &self,
        proxy_ns: &str,
        svc: &Service,
    ) -> Option<&Entry<DestinationRule>> {
        let candidates = |ns: &str, need_export: bool| {
            let mut matching: Vec<&Entry<DestinationRule>> = self
                .snapshot
                .destination_rules
                .iter()
                .map(|dr| &**dr)
                .filter(|dr| dr.namespace() == ns)
                .filter(|dr| dr.object.spec.workload_selector.is_none())
                .filter(|dr| !need_export || dr_exported(dr, proxy_ns, &self.mesh))
                .filter(|dr| {
                    let host = resolve_config_host(&dr.object.spec.host, ns, self.domain());
                    host_matches(&host, &svc.hostname)
                })
                .collect();
            matching.sort_by_key(|dr| {
                let host = resolve_config_host(&dr.object.spec.host, ns, self.domain());
                (host != svc.hostname, creation(dr))
            });
            matching.into_iter().next()
        };
        candidates(proxy_ns, false)
            .or_else(|| candidates(&svc.namespace, true))
            .or_else(|| candidates(self.root_namespace(), true))
    }

    /// The mTLS mode PeerAuthentication gives `port` of a workload: workload policy (port-level
    /// first), then namespace policy, then mesh policy (root namespace); PERMISSIVE by default.
    pub fn mtls_mode(
        &self,
        namespace: &str,
        labels: &BTreeMap<String, String>,
        port: u16,
    ) -> MtlsMode {
        let policies: Vec<&Entry<PeerAuthentication>> = {
            let ws = self.snapshot.peer_authentications.iter().filter(|p| {
                p.namespace() == namespace
                    && p.object.spec.selector.as_ref().is_some_and(|s| {
                        !s.match_labels.is_empty() && selector_matches(&s.match_labels, labels)
                    })
            });
            let ns = self
                .snapshot
                .peer_authentications
                .iter()
                .filter(|p| p.namespace() == namespace && p.object.spec.selector.is_none());
            let mesh = self.snapshot.peer_authentications.iter().filter(|p| {
                p.namespace() == self.root_namespace() && p.object.spec.selector.is_none()
            });
            ws.chain(ns).chain(mesh).map(|p| &**p).collect()
        };
        for p in &policies {
            if let Some(m) = p
                .object
                .spec
                .port_mode(u32::from(port))
                .and_then(|m| parse_mode(m.mode.as_deref()))
            {
                return m;
            }
            if let Some(m) = p
                .object
                .spec
                .mtls
                .as_ref()
                .and_then(|m| parse_mode(m.mode.as_deref()))
            {
                return m;
            }
        }
        MtlsMode::Permissive
    }
}

fn parse_mode(s: Option<&str>) -> Option<MtlsMode> {
    match s? {
        "DISABLE" => Some(MtlsMode::Disable),
        "PERMISSIVE" => Some(MtlsMode::Permissive),
        "STRICT" => Some(MtlsMode::Strict),
        _ => None, // UNSET inherits
    }
}

fn dr_exported(dr: &Entry<DestinationRule>, proxy_ns: &str, mesh: &MeshConfig) -> bool {
    let export = if dr.object.spec.export_to.is_empty() {
        &mesh.default_destination_rule_export_to
    } else {
        &dr.object.spec.export_to
    };
    export.is_empty()
        || export.iter().any(|e| match e.as_str() {
            "*" => true,
            "." => dr.namespace() == proxy_ns,
            ns => ns == proxy_ns,
        })
}

fn creation<T: isthmus_config::HasMetadata>(e: &Entry<T>) -> String {
    e.object
        .metadata()
        .creation_timestamp
        .as_ref()
        .map(|t| t.0.to_string())
        .unwrap_or_default()
}

pub fn selector_matches(
    selector: &BTreeMap<String, String>,
    labels: &BTreeMap<String, String>,
) -> bool {
    selector.iter().all(|(k, v)| labels.get(k) == Some(v))
}
