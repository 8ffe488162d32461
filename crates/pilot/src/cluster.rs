//! CDS: the clusters of a sidecar, in Istio's names and shapes.
//!
//! - `outbound|<port>||<host>` for every port of every service the proxy may reach, and
//!   `outbound|<port>|<subset>|<host>` for each DestinationRule subset; EDS for Kubernetes
//!   services, ORIGINAL_DST for headless ones, STRICT_DNS for DNS ServiceEntries.
//! - `inbound|<port>||` for each port the proxy's workload serves: the original destination
//!   (the pod IP, Istio ≥ 1.10) bound from 127.0.0.6, or 127.0.0.1 under LOCALHOST mode or a
//!   Sidecar ingress `defaultEndpoint`.
//! - `PassthroughCluster`, `BlackHoleCluster`, `InboundPassthroughCluster`.

use std::collections::BTreeMap;

use envoy_types::pb::envoy::config::cluster::v3::circuit_breakers::Thresholds;
use envoy_types::pb::envoy::config::cluster::v3::cluster::{
    ClusterDiscoveryType, CommonLbConfig, DiscoveryType, EdsClusterConfig, LbPolicy,
    TransportSocketMatch,
};
use envoy_types::pb::envoy::config::cluster::v3::{
    CircuitBreakers, Cluster, OutlierDetection, UpstreamConnectionOptions,
};
use envoy_types::pb::envoy::config::core::v3::HttpProtocolOptions as CommonHttpOptions;
use envoy_types::pb::envoy::config::core::v3::{
    Address, AggregatedConfigSource, ApiVersion, BindConfig, ConfigSource, Metadata, SocketAddress,
    TransportSocket, address, config_source, socket_address, transport_socket,
};
use envoy_types::pb::envoy::config::endpoint::v3::{
    ClusterLoadAssignment, Endpoint as EnvoyEndpoint, LbEndpoint, LocalityLbEndpoints, lb_endpoint,
};
use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::{
    CertificateValidationContext, CommonTlsContext, SdsSecretConfig, SubjectAltNameMatcher,
    UpstreamTlsContext, common_tls_context, subject_alt_name_matcher,
};
use envoy_types::pb::envoy::r#type::matcher::v3::{StringMatcher, string_matcher};
use envoy_types::pb::google::protobuf::{
    Any, Duration as PbDuration, ListValue, Struct, UInt32Value, Value, value,
};
use envoy_types::util::pack_any;
use isthmus_config::istio::networking::{
    ClientTlsSettings, HttpSettings, Subset, TcpKeepalive, TrafficPolicy,
};
use isthmus_config::resource::DestinationRule;
use isthmus_config::{Entry, MeshConfig};
use isthmus_registry::{Protocol, Resolution, Service};
use isthmus_xds::typed_struct::{
    METADATA_EXCHANGE_FILTER, TCP_METADATA_EXCHANGE_TYPE_URL, TypedStruct,
};

use crate::context::{InboundMode, PushContext};
use crate::names::{
    BLACKHOLE_CLUSTER, INBOUND_PASSTHROUGH_BIND_V4, INBOUND_PASSTHROUGH_CLUSTER,
    PASSTHROUGH_CLUSTER, config_path, inbound_cluster, outbound_cluster,
};
use crate::proxy::{InterceptionMode, Proxy};

/// Istio's default connect timeout (MeshConfig `connectTimeout`).
const CONNECT_TIMEOUT_SECS: i64 = 10;
/// Istio sets circuit-breaker limits to the maximum unless a DestinationRule lowers them.
const UNLIMITED: u32 = u32::MAX;
/// The SDS secret names the proxy's agent serves.
pub const SDS_DEFAULT: &str = "default";
pub const SDS_ROOTCA: &str = "ROOTCA";
/// Endpoint metadata key/value that selects the mTLS transport socket (auto mTLS).
pub const TLS_MODE_KEY: &str = "tlsMode";

/// One outbound cluster of a proxy before it is built: a service port, optionally a subset,
/// and the traffic policy that applies.
pub(crate) struct Outbound<'a> {
    pub svc: &'a Service,
    pub port: u16,
    pub subset: Option<&'a Subset>,
    pub policy: Option<&'a TrafficPolicy>,
    /// The DestinationRule that applies; `policy` is its (or its subset's) traffic policy.
    pub rule: Option<&'a Entry<DestinationRule>>,
}

impl Outbound<'_> {
    pub fn name(&self) -> String {
        outbound_cluster(
            self.port,
            self.subset.map_or("", |s| s.name.as_str()),
            &self.svc.hostname,
        )
    }
}

/// The outbound clusters of `proxy`: every port of every service it may reach, and each
/// DestinationRule subset of it (CDS builds them, EDS serves the EDS ones).
pub(crate) fn outbound_clusters<'a>(ctx: &'a PushContext, proxy: &Proxy) -> Vec<Outbound<'a>> {
    let mut out = Vec::new();
    for imported in ctx.services_for(proxy) {
        let svc = imported.svc;
        let rule = ctx.destination_rule(&proxy.namespace, svc);
        let dr_spec = rule.map(|d| &d.object.spec);
        let base = dr_spec.and_then(|d| d.traffic_policy.as_ref());
        let subsets = dr_spec.map(|d| d.subsets.as_slice()).unwrap_or_default();
        for port in imported.ports {
            out.push(Outbound {
                svc,
                port: port.port,
                subset: None,
                policy: base,
                rule,
            });
            for subset in subsets {
                let policy = subset.traffic_policy.as_ref().or(base);
                out.push(Outbound {
                    svc,
                    port: port.port,
                    subset: Some(subset),
                    policy,
                    rule,
                });
            }
        }
    }
    out
}

/// How a service's cluster finds its endpoints.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Discovery {
    /// Headless: whatever pod IP the app resolved (seed 004).
    OriginalDst,
    Dns,
    Eds,
}

pub(crate) fn discovery(svc: &Service) -> Discovery {
    if svc.headless && svc.is_kubernetes() {
        Discovery::OriginalDst
    } else if svc.resolution == Resolution::Dns {
        Discovery::Dns
    } else {
        Discovery::Eds
    }
}

/// Every cluster of `proxy`, sorted by name.
pub fn clusters(ctx: &PushContext, proxy: &Proxy) -> Vec<Cluster> {
    let mut out = shared_clusters(ctx, proxy);
    out.extend(inbound_clusters(ctx, proxy));
    out.sort_by(|a, b| a.name.cmp(&b.name));
    out.dedup_by(|a, b| a.name == b.name);
    out
}

/// The clusters every proxy of `proxy`'s [`Scope`](crate::context::Scope) has alike: outbound
/// ones and the passthrough/blackhole ones.
fn shared_clusters(ctx: &PushContext, proxy: &Proxy) -> Vec<Cluster> {
    let mut out: Vec<Cluster> = outbound_inputs(ctx, proxy)
        .iter()
        .map(OutboundInputs::build)
        .collect();
    out.extend(fixed_clusters());
    out
}

/// An outbound cluster before it is built. It depends only on its service port, subset and
/// traffic policy, which proxies of other scopes may share (namespaces that see the same
/// services and DestinationRules), so a caller can build it once for all of them by
/// [`OutboundInputs::key`].
pub struct OutboundInputs<'a> {
    ctx: &'a PushContext,
    outbound: Outbound<'a>,
}

impl OutboundInputs<'_> {
    /// Names the inputs within their push context: the addresses of its service, subset and
    /// DestinationRule there (which make the policy), and the port. Equal keys of one push
    /// context build equal clusters.
    pub fn key(&self) -> (usize, u16, usize, usize) {
        let o = &self.outbound;
        (
            std::ptr::from_ref(o.svc) as usize,
            o.port,
            o.subset.map_or(0, |s| std::ptr::from_ref(s) as usize),
            o.rule.map_or(0, |r| std::ptr::from_ref(r) as usize),
        )
    }

    pub fn build(&self) -> Cluster {
        let o = &self.outbound;
        outbound(self.ctx, o, port_policy(o.policy, o.port))
    }
}

/// The outbound clusters of `proxy`'s scope, unbuilt.
pub fn outbound_inputs<'a>(ctx: &'a PushContext, proxy: &Proxy) -> Vec<OutboundInputs<'a>> {
    outbound_clusters(ctx, proxy)
        .into_iter()
        .map(|outbound| OutboundInputs { ctx, outbound })
        .collect()
}

/// `PassthroughCluster`, `InboundPassthroughCluster` and `BlackHoleCluster`: every sidecar's.
pub fn fixed_clusters() -> Vec<Cluster> {
    vec![
        passthrough(PASSTHROUGH_CLUSTER, None),
        passthrough(
            INBOUND_PASSTHROUGH_CLUSTER,
            Some(INBOUND_PASSTHROUGH_BIND_V4),
        ),
        Cluster {
            name: BLACKHOLE_CLUSTER.into(),
            cluster_discovery_type: Some(ClusterDiscoveryType::Type(DiscoveryType::Static as i32)),
            connect_timeout: Some(secs(CONNECT_TIMEOUT_SECS)),
            ..Default::default()
        },
    ]
}

/// A port-level policy overriding the fields it sets.
fn port_policy(policy: Option<&TrafficPolicy>, port: u16) -> Option<TrafficPolicy> {
    let p = policy?;
    let level = p
        .port_level_settings
        .iter()
        .find(|l| l.port.as_ref().is_some_and(|s| s.number == u32::from(port)))?;
    let mut merged = p.clone();
    merged.port_level_settings.clear();
    if level.load_balancer.is_some() {
        merged.load_balancer = level.load_balancer.clone();
    }
    if level.connection_pool.is_some() {
        merged.connection_pool = level.connection_pool.clone();
    }
    if level.outlier_detection.is_some() {
        merged.outlier_detection = level.outlier_detection.clone();
    }
    if level.tls.is_some() {
        merged.tls = level.tls.clone();
    }
    Some(merged)
}

fn outbound(ctx: &PushContext, o: &Outbound<'_>, port_level: Option<TrafficPolicy>) -> Cluster {
    let (svc, port) = (o.svc, o.port);
    let subset = o.subset.map_or("", |s| s.name.as_str());
    let policy = port_level.as_ref().or(o.policy);
    let name = o.name();
    let mut c = Cluster {
        name: name.clone(),
        connect_timeout: Some(connect_timeout(policy)),
        circuit_breakers: Some(circuit_breakers(policy)),
        common_lb_config: Some(CommonLbConfig::default()),
        metadata: Some(service_metadata(svc, subset)),
        filters: vec![envoy_types::pb::envoy::config::cluster::v3::Filter {
            name: METADATA_EXCHANGE_FILTER.into(),
            typed_config: Some(tcp_metadata_exchange()),
            ..Default::default()
        }],
        ..Default::default()
    };
    if let Some(istio) = c
        .metadata
        .as_mut()
        .and_then(|m| m.filter_metadata.get_mut("istio"))
    {
        // A service outside the mesh: Istio marks its cluster (not its subsets' ones), and a
        // sidecar in `IN_MESH` metadata exchange sends it no peer metadata.
        if svc.mesh_external && o.subset.is_none() {
            istio.fields.insert("external".into(), boolean(true));
        }
        if let Some(rule) = o.rule {
            let path = config_path("destination-rule", rule.namespace(), rule.name());
            istio.fields.insert("config".into(), string(&path));
        }
    }
    let discovery = discovery(svc);
    if discovery == Discovery::OriginalDst {
        c.cluster_discovery_type = Some(ClusterDiscoveryType::Type(
            DiscoveryType::OriginalDst as i32,
        ));
        c.lb_policy = LbPolicy::ClusterProvided as i32;
    } else if discovery == Discovery::Dns {
        c.cluster_discovery_type =
            Some(ClusterDiscoveryType::Type(DiscoveryType::StrictDns as i32));
        // Not named after workloads: the cluster is built once for every scope that sees it
        // from its service and policy alone (`OutboundInputs::key`).
        c.load_assignment = Some(crate::endpoint::load_assignment(
            svc,
            port,
            o.subset.map(|s| &s.labels),
            &name,
            &[],
        ));
        c.lb_policy = lb_policy(policy) as i32;
    } else {
        c.cluster_discovery_type = Some(ClusterDiscoveryType::Type(DiscoveryType::Eds as i32));
        c.eds_cluster_config = Some(EdsClusterConfig {
            eds_config: Some(ads()),
            service_name: name.clone(),
        });
        c.lb_policy = lb_policy(policy) as i32;
    }
    if let Some(od) = policy.and_then(|p| p.outlier_detection.as_ref()) {
        c.outlier_detection = Some(outlier(od));
    }
    let protocol = svc
        .ports
        .iter()
        .find(|p| p.port == port)
        .map_or(Protocol::Unknown, |p| p.protocol);
    let http = outbound_http(protocol, policy, &ctx.mesh);
    set_protocol_options(&mut c, http, policy);
    c.upstream_connection_options = upstream_keepalive(ctx.mesh.tcp_keepalive.as_ref(), policy);
    let tls = policy.and_then(|p| p.tls.as_ref());
    match tls.and_then(|t| t.mode.as_deref()) {
        Some("ISTIO_MUTUAL") => {
            c.transport_socket = Some(istio_mtls(svc, port, subset, http, ctx, tls));
        }
        Some("DISABLE") => {}
        Some("SIMPLE" | "MUTUAL") => {
            c.transport_socket = tls.map(|t| user_tls(t, svc));
        }
        // Headless: the connection's destination has no endpoint metadata to match, so auto
        // mTLS decides for the cluster — mTLS when every endpoint of the port has a sidecar.
        _ if ctx.mesh.auto_mtls()
            && !svc.mesh_external
            && discovery == Discovery::OriginalDst
            && svc.endpoints_for(port).next().is_some()
            && svc.endpoints_for(port).all(|e| e.sidecar) =>
        {
            c.transport_socket = Some(istio_mtls(svc, port, subset, http, ctx, None));
        }
        // Unset: auto mTLS, by endpoint label.
        _ if ctx.mesh.auto_mtls() && !svc.mesh_external => {
            c.transport_socket_matches = vec![
                TransportSocketMatch {
                    name: "tlsMode-istio".into(),
                    r#match: Some(strukt([(TLS_MODE_KEY, string("istio"))])),
                    transport_socket: Some(istio_mtls(svc, port, subset, http, ctx, None)),
                },
                TransportSocketMatch {
                    name: "tlsMode-disabled".into(),
                    r#match: Some(Struct::default()),
                    transport_socket: Some(raw_buffer()),
                },
            ];
        }
        _ => {}
    }
    c
}

/// The clusters of `proxy`'s own workload (`inbound|<port>||`).
pub fn inbound_clusters(ctx: &PushContext, proxy: &Proxy) -> Vec<Cluster> {
    let Some(workload) = ctx.workload_of(proxy) else {
        return Vec::new();
    };
    let sidecar = ctx.sidecar_for(proxy);
    let mut ports: BTreeMap<u16, Option<String>> = BTreeMap::new();
    let mut protocols: BTreeMap<u16, Protocol> = BTreeMap::new();
    // The service a port serves, for telemetry (Istio's `istio` cluster metadata).
    let mut served: BTreeMap<u16, &Service> = BTreeMap::new();
    for svc in ctx.registry.services_for_workload(workload) {
        for p in &svc.ports {
            if let Some(target) = crate::endpoint::target_port(p, workload) {
                ports.entry(target).or_insert(None);
                served.entry(target).or_insert(svc);
                protocols.entry(target).or_insert(p.protocol);
            }
        }
    }
    // Sidecar ingress listeners declare ports and where they go.
    for ing in sidecar.iter().flat_map(|s| s.object.spec.ingress.iter()) {
        if let Some(p) = ing.port.as_ref().and_then(|p| u16::try_from(p.number).ok()) {
            let dest = (!ing.default_endpoint.is_empty()).then(|| ing.default_endpoint.clone());
            ports.insert(p, dest);
        }
    }
    ports
        .into_iter()
        .map(|(port, default_endpoint)| {
            let name = inbound_cluster(port);
            let localhost = ctx.inbound_mode == InboundMode::Localhost
                || default_endpoint
                    .as_deref()
                    .is_some_and(|e| e.starts_with("127.0.0.1:"));
            let mut c = Cluster {
                name: name.clone(),
                connect_timeout: Some(secs(CONNECT_TIMEOUT_SECS)),
                circuit_breakers: Some(circuit_breakers(None)),
                common_lb_config: Some(CommonLbConfig::default()),
                metadata: served.get(&port).map(|svc| service_metadata(svc, "")),
                ..Default::default()
            };
            if localhost {
                let target = default_endpoint
                    .as_deref()
                    .and_then(|e| e.rsplit_once(':'))
                    .and_then(|(_, p)| p.parse().ok())
                    .unwrap_or(port);
                c.cluster_discovery_type =
                    Some(ClusterDiscoveryType::Type(DiscoveryType::Static as i32));
                c.load_assignment = Some(ClusterLoadAssignment {
                    cluster_name: name,
                    endpoints: vec![LocalityLbEndpoints {
                        lb_endpoints: vec![LbEndpoint {
                            host_identifier: Some(lb_endpoint::HostIdentifier::Endpoint(
                                EnvoyEndpoint {
                                    address: Some(socket("127.0.0.1", target)),
                                    ..Default::default()
                                },
                            )),
                            ..Default::default()
                        }],
                        ..Default::default()
                    }],
                    ..Default::default()
                });
            } else {
                // Passthrough: to the destination the connection had, the pod IP.
                c.cluster_discovery_type = Some(ClusterDiscoveryType::Type(
                    DiscoveryType::OriginalDst as i32,
                ));
                c.lb_policy = LbPolicy::ClusterProvided as i32;
                // From 127.0.0.6, so that capture lets it through; under TPROXY the listener's
                // `original_src` connects from the caller's address instead.
                if proxy.interception_mode != InterceptionMode::Tproxy {
                    c.upstream_bind_config = Some(bind(INBOUND_PASSTHROUGH_BIND_V4));
                }
            }
            let protocol = protocols.get(&port).copied().unwrap_or(Protocol::Unknown);
            set_protocol_options(&mut c, UpstreamHttp::for_port(protocol), None);
            c
        })
        .collect()
}

/// The HTTP version a cluster's requests travel upstream in, as Istio decides it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum UpstreamHttp {
    Http1,
    Http2,
    /// The version each request came in (Envoy's `use_downstream_protocol_config`).
    Downstream,
}

impl UpstreamHttp {
    /// What the port's protocol alone says: HTTP/2 for gRPC and HTTP/2 ports, the request's
    /// own version on ports whose protocol is sniffed, HTTP/1.1 otherwise.
    fn for_port(protocol: Protocol) -> UpstreamHttp {
        if protocol.is_http2() {
            UpstreamHttp::Http2
        } else if protocol == Protocol::Unknown {
            UpstreamHttp::Downstream
        } else {
            UpstreamHttp::Http1
        }
    }
}

/// An outbound cluster's version: the DestinationRule's `useClientProtocol` keeps the
/// request's; its `h2UpgradePolicy` upgrades or not; otherwise the mesh's `h2UpgradePolicy`
/// upgrades HTTP ports (Istio's default, DO_NOT_UPGRADE, does not), and the port decides.
fn outbound_http(
    protocol: Protocol,
    policy: Option<&TrafficPolicy>,
    mesh: &MeshConfig,
) -> UpstreamHttp {
    let pool = http_pool(policy);
    if pool.is_some_and(|h| h.use_client_protocol) {
        return UpstreamHttp::Downstream;
    }
    let upgrade = match pool.and_then(|h| h.h2_upgrade_policy.as_deref()) {
        Some("UPGRADE") => true,
        Some("DO_NOT_UPGRADE") => false,
        _ => protocol.is_http() && mesh.h2_upgrade(),
    };
    if upgrade {
        UpstreamHttp::Http2
    } else {
        UpstreamHttp::for_port(protocol)
    }
}

/// The DestinationRule's HTTP connection pool settings.
fn http_pool(policy: Option<&TrafficPolicy>) -> Option<&HttpSettings> {
    policy
        .and_then(|p| p.connection_pool.as_ref())
        .and_then(|p| p.http.as_ref())
}

/// The cluster's `HttpProtocolOptions`, as Istio sets them: the upstream version (above), and
/// the DestinationRule's connection pool limits per connection (`http.maxRequestsPerConnection`,
/// `http.idleTimeout`, `tcp.maxConnectionDuration`). Nothing when HTTP/1.1 needs no limits, Envoy's
/// default.
fn set_protocol_options(c: &mut Cluster, http: UpstreamHttp, policy: Option<&TrafficPolicy>) {
    let pool = http_pool(policy);
    let max_requests = pool
        .map(|h| h.max_requests_per_connection)
        .filter(|n| *n > 0)
        .and_then(|n| u32::try_from(n).ok());
    let idle = pool.and_then(|h| h.idle_timeout.as_ref());
    let max_duration = policy
        .and_then(|p| p.connection_pool.as_ref())
        .and_then(|c| c.tcp.as_ref())
        .and_then(|t| t.max_connection_duration.as_ref());
    let common = (max_requests.is_some() || idle.is_some() || max_duration.is_some()).then(|| {
        CommonHttpOptions {
            max_requests_per_connection: max_requests.map(|value| UInt32Value { value }),
            idle_timeout: idle.map(|d| duration(d.as_std())),
            max_connection_duration: max_duration.map(|d| duration(d.as_std())),
            ..Default::default()
        }
    });
    put_protocol_options(c, http, common);
}

/// Envoy's `HttpProtocolOptions` on `c`: the upstream version, and the per-connection limits
/// of `common`. Nothing when HTTP/1.1 needs no limits, Envoy's default.
fn put_protocol_options(c: &mut Cluster, http: UpstreamHttp, common: Option<CommonHttpOptions>) {
    use envoy_types::pb::envoy::config::core::v3::{Http1ProtocolOptions, Http2ProtocolOptions};
    use envoy_types::pb::envoy::extensions::upstreams::http::v3::{
        HttpProtocolOptions, http_protocol_options,
    };
    use http_protocol_options::explicit_http_config::ProtocolConfig;
    if http == UpstreamHttp::Http1 && common.is_none() {
        return;
    }
    let explicit = |protocol_config| {
        http_protocol_options::UpstreamProtocolOptions::ExplicitHttpConfig(
            http_protocol_options::ExplicitHttpConfig {
                protocol_config: Some(protocol_config),
            },
        )
    };
    let opts = HttpProtocolOptions {
        common_http_protocol_options: common,
        // Envoy requires the protocol to be stated once options are given.
        upstream_protocol_options: Some(match http {
            UpstreamHttp::Http1 => explicit(ProtocolConfig::HttpProtocolOptions(
                Http1ProtocolOptions::default(),
            )),
            UpstreamHttp::Http2 => explicit(ProtocolConfig::Http2ProtocolOptions(
                Http2ProtocolOptions::default(),
            )),
            UpstreamHttp::Downstream => {
                http_protocol_options::UpstreamProtocolOptions::UseDownstreamProtocolConfig(
                    http_protocol_options::UseDownstreamHttpConfig {
                        http_protocol_options: Some(Http1ProtocolOptions::default()),
                        http2_protocol_options: Some(Http2ProtocolOptions::default()),
                        ..Default::default()
                    },
                )
            }
        }),
        ..Default::default()
    };
    c.typed_extension_protocol_options.insert(
        "envoy.extensions.upstreams.http.v3.HttpProtocolOptions".into(),
        pack_any(opts),
    );
}

fn passthrough(name: &str, bind_from: Option<&str>) -> Cluster {
    let mut c = Cluster {
        name: name.into(),
        cluster_discovery_type: Some(ClusterDiscoveryType::Type(
            DiscoveryType::OriginalDst as i32,
        )),
        lb_policy: LbPolicy::ClusterProvided as i32,
        connect_timeout: Some(secs(CONNECT_TIMEOUT_SECS)),
        circuit_breakers: Some(circuit_breakers(None)),
        upstream_bind_config: bind_from.map(bind),
        ..Default::default()
    };
    // As Istio's: requests go on in the version they came in, and idle connections to
    // destinations seen once are closed after five minutes.
    put_protocol_options(
        &mut c,
        UpstreamHttp::Downstream,
        Some(CommonHttpOptions {
            idle_timeout: Some(secs(300)),
            ..Default::default()
        }),
    );
    c
}

fn lb_policy(policy: Option<&TrafficPolicy>) -> LbPolicy {
    let lb = policy.and_then(|p| p.load_balancer.as_ref());
    if let Some(ch) = lb.and_then(|l| l.consistent_hash.as_ref()) {
        return if ch.maglev.is_some() {
            LbPolicy::Maglev
        } else {
            LbPolicy::RingHash
        };
    }
    match lb.and_then(|l| l.simple.as_deref()) {
        Some("ROUND_ROBIN") => LbPolicy::RoundRobin,
        Some("RANDOM") => LbPolicy::Random,
        Some("PASSTHROUGH") => LbPolicy::ClusterProvided,
        // LEAST_CONN, LEAST_REQUEST and unset: Istio's default is least request.
        _ => LbPolicy::LeastRequest,
    }
}

fn connect_timeout(policy: Option<&TrafficPolicy>) -> PbDuration {
    policy
        .and_then(|p| p.connection_pool.as_ref())
        .and_then(|c| c.tcp.as_ref())
        .and_then(|t| t.connect_timeout.as_ref())
        .map_or_else(|| secs(CONNECT_TIMEOUT_SECS), |d| duration(d.as_std()))
}

/// TCP keepalive on upstream connections, as Istio sets it: the mesh's `tcpKeepalive`, each
/// field that the DestinationRule's `connectionPool.tcp.tcpKeepalive` sets over it; an empty
/// one turns keepalive on with the system's timings. None when neither says anything.
fn upstream_keepalive(
    mesh: Option<&TcpKeepalive>,
    policy: Option<&TrafficPolicy>,
) -> Option<UpstreamConnectionOptions> {
    use envoy_types::pb::envoy::config::core::v3::TcpKeepalive as EnvoyKeepalive;
    let rule = policy
        .and_then(|p| p.connection_pool.as_ref())
        .and_then(|c| c.tcp.as_ref())
        .and_then(|t| t.tcp_keepalive.as_ref());
    if mesh.is_none() && rule.is_none() {
        return None;
    }
    let seconds = |d: &isthmus_config::istio::common::Duration| UInt32Value {
        value: u32::try_from(d.as_std().as_secs()).unwrap_or(u32::MAX),
    };
    let mut k = EnvoyKeepalive::default();
    for set in mesh.into_iter().chain(rule) {
        if set.probes > 0 {
            k.keepalive_probes = Some(UInt32Value { value: set.probes });
        }
        if let Some(t) = &set.time {
            k.keepalive_time = Some(seconds(t));
        }
        if let Some(i) = &set.interval {
            k.keepalive_interval = Some(seconds(i));
        }
    }
    Some(UpstreamConnectionOptions {
        tcp_keepalive: Some(k),
        ..Default::default()
    })
}

fn circuit_breakers(policy: Option<&TrafficPolicy>) -> CircuitBreakers {
    let pool = policy.and_then(|p| p.connection_pool.as_ref());
    let limit = |v: Option<i32>| {
        Some(UInt32Value {
            value: v.filter(|n| *n > 0).map_or(UNLIMITED, |n| n as u32),
        })
    };
    let tcp = pool.and_then(|p| p.tcp.as_ref());
    let http = pool.and_then(|p| p.http.as_ref());
    CircuitBreakers {
        thresholds: vec![Thresholds {
            max_connections: limit(tcp.map(|t| t.max_connections)),
            max_pending_requests: limit(http.map(|h| h.http1_max_pending_requests)),
            max_requests: limit(http.map(|h| h.http2_max_requests)),
            max_retries: limit(http.map(|h| h.max_retries)),
            // Retries in flight stay within a fifth of the requests in flight (at least 3), so
            // a failing upstream does not turn every request into several: Envoy's budget.
            retry_budget: Some(
                envoy_types::pb::envoy::config::cluster::v3::circuit_breakers::thresholds::RetryBudget {
                    budget_percent: Some(envoy_types::pb::envoy::r#type::v3::Percent { value: 20.0 }),
                    min_retry_concurrency: Some(UInt32Value { value: 3 }),
                    ..Default::default()
                },
            ),
            track_remaining: true,
            ..Default::default()
        }],
        ..Default::default()
    }
}

fn outlier(od: &isthmus_config::istio::networking::OutlierDetection) -> OutlierDetection {
    let u32v = |v: u32| Some(UInt32Value { value: v });
    let consecutive = od
        .consecutive_5xx_errors
        .or(od.consecutive_errors.and_then(|e| u32::try_from(e).ok()));
    OutlierDetection {
        consecutive_5xx: consecutive.map_or(u32v(0), u32v),
        enforcing_consecutive_5xx: Some(UInt32Value {
            value: if consecutive.unwrap_or(0) > 0 { 100 } else { 0 },
        }),
        consecutive_gateway_failure: od.consecutive_gateway_errors.and_then(u32v),
        enforcing_consecutive_gateway_failure: od
            .consecutive_gateway_errors
            .map(|_| UInt32Value { value: 100 }),
        interval: od.interval.as_ref().map(|d| duration(d.as_std())),
        base_ejection_time: od.base_ejection_time.as_ref().map(|d| duration(d.as_std())),
        max_ejection_percent: od
            .max_ejection_percent
            .and_then(|p| u32::try_from(p).ok())
            .and_then(u32v),
        split_external_local_origin_errors: od.split_external_local_origin_errors,
        consecutive_local_origin_failure: od.consecutive_local_origin_failures.and_then(u32v),
        // Istio disables success-rate ejection.
        enforcing_success_rate: u32v(0),
        ..Default::default()
    }
}

/// Istio mTLS to a mesh destination: the workload certificate and root from SDS, the
/// destination's identities as accepted SANs, Istio's ALPN and SNI — the SANs and SNI of the
/// DestinationRule's `ISTIO_MUTUAL` settings (`rule`) where it names them, as Istio's.
fn istio_mtls(
    svc: &Service,
    port: u16,
    subset: &str,
    http: UpstreamHttp,
    ctx: &PushContext,
    rule: Option<&ClientTlsSettings>,
) -> TransportSocket {
    let sans = match rule {
        Some(r) if !r.subject_alt_names.is_empty() => r.subject_alt_names.clone(),
        _ if svc.subject_alt_names.is_empty() => service_accounts(svc, ctx),
        _ => svc.subject_alt_names.clone(),
    };
    let sni = match rule {
        Some(r) if !r.sni.is_empty() => r.sni.clone(),
        _ => format!("outbound_.{port}_.{subset}_.{}", svc.hostname),
    };
    let tls = UpstreamTlsContext {
        // As Istio, a cluster that speaks HTTP/2 says so in ALPN too.
        common_tls_context: Some(istio_common_tls(
            &sans,
            if http == UpstreamHttp::Http2 {
                &["istio-peer-exchange", "istio", "h2"]
            } else {
                &["istio-peer-exchange", "istio"]
            },
        )),
        sni,
        ..Default::default()
    };
    TransportSocket {
        name: "envoy.transport_sockets.tls".into(),
        config_type: Some(transport_socket::ConfigType::TypedConfig(pack_any(tls))),
    }
}

/// The workload certificate and root from SDS; peers' URI SANs must be one of `sans` (any
/// identity of the trust bundle when empty).
pub(crate) fn istio_common_tls(sans: &[String], alpn: &[&str]) -> CommonTlsContext {
    CommonTlsContext {
        tls_certificate_sds_secret_configs: vec![sds(SDS_DEFAULT)],
        validation_context_type: Some(
            common_tls_context::ValidationContextType::CombinedValidationContext(
                common_tls_context::CombinedCertificateValidationContext {
                    default_validation_context: Some(CertificateValidationContext {
                        match_typed_subject_alt_names: sans
                            .iter()
                            .map(|s| SubjectAltNameMatcher {
                                san_type: subject_alt_name_matcher::SanType::Uri as i32,
                                matcher: Some(StringMatcher {
                                    match_pattern: Some(string_matcher::MatchPattern::Exact(
                                        s.clone(),
                                    )),
                                    ..Default::default()
                                }),
                                ..Default::default()
                            })
                            .collect(),
                        ..Default::default()
                    }),
                    validation_context_sds_secret_config: Some(sds(SDS_ROOTCA)),
                    ..Default::default()
                },
            ),
        ),
        alpn_protocols: alpn.iter().map(|a| a.to_string()).collect(),
        ..Default::default()
    }
}

/// TLS origination configured by the user (SIMPLE / MUTUAL with files or a credential).
fn user_tls(t: &ClientTlsSettings, svc: &Service) -> TransportSocket {
    let tls = UpstreamTlsContext {
        sni: if t.sni.is_empty() {
            svc.hostname.clone()
        } else {
            t.sni.clone()
        },
        common_tls_context: Some(CommonTlsContext::default()),
        ..Default::default()
    };
    TransportSocket {
        name: "envoy.transport_sockets.tls".into(),
        config_type: Some(transport_socket::ConfigType::TypedConfig(pack_any(tls))),
    }
}

/// The SPIFFE identities of a service's endpoints (what Istio puts in `subjectAltNames`).
fn service_accounts(svc: &Service, ctx: &PushContext) -> Vec<String> {
    let td = ctx.mesh.trust_domain();
    let mut out: Vec<String> = svc
        .endpoints
        .iter()
        .filter(|e| !e.service_account.is_empty())
        .map(|e| {
            format!(
                "spiffe://{td}/ns/{}/sa/{}",
                svc.namespace, e.service_account
            )
        })
        .collect();
    out.sort();
    out.dedup();
    out
}

fn raw_buffer() -> TransportSocket {
    TransportSocket {
        name: "envoy.transport_sockets.raw_buffer".into(),
        config_type: Some(transport_socket::ConfigType::TypedConfig(pack_any(
            envoy_types::pb::envoy::extensions::transport_sockets::raw_buffer::v3::RawBuffer {},
        ))),
    }
}

fn sds(name: &str) -> SdsSecretConfig {
    SdsSecretConfig {
        name: name.into(),
        sds_config: Some(ads()),
    }
}

/// Config source: the ADS stream the proxy already has.
pub fn ads() -> ConfigSource {
    ConfigSource {
        config_source_specifier: Some(config_source::ConfigSourceSpecifier::Ads(
            AggregatedConfigSource {},
        )),
        initial_fetch_timeout: Some(PbDuration {
            seconds: 0,
            nanos: 0,
        }),
        resource_api_version: ApiVersion::V3 as i32,
        ..Default::default()
    }
}

/// `filter_metadata.istio.services`: which service a cluster belongs to (for telemetry).
fn service_metadata(svc: &Service, subset: &str) -> Metadata {
    let mut service = vec![
        ("host", string(&svc.hostname)),
        ("name", string(&svc.name)),
        ("namespace", string(&svc.namespace)),
    ];
    if !subset.is_empty() {
        service.push(("subset", string(subset)));
    }
    let services = list_value(vec![struct_value(strukt(service))]);
    Metadata {
        filter_metadata: crate::maps::map_of([("istio".into(), strukt([("services", services)]))]),
        ..Default::default()
    }
}

/// Istio's TCP metadata exchange (`istio.metadata_exchange`), as a filter of inbound TCP chains
/// and of outbound clusters: peers that agree on `istio-peer-exchange` in ALPN tell each other
/// who they are before the connection's bytes.
pub(crate) fn tcp_metadata_exchange() -> Any {
    pack_any(TypedStruct {
        type_url: TCP_METADATA_EXCHANGE_TYPE_URL.into(),
        value: Some(strukt([
            ("protocol", string("istio-peer-exchange")),
            ("enable_discovery", boolean(true)),
        ])),
    })
}

pub(crate) fn boolean(b: bool) -> Value {
    Value {
        kind: Some(value::Kind::BoolValue(b)),
    }
}

pub(crate) fn string(s: &str) -> Value {
    Value {
        kind: Some(value::Kind::StringValue(s.to_string())),
    }
}

pub(crate) fn struct_value(s: Struct) -> Value {
    Value {
        kind: Some(value::Kind::StructValue(s)),
    }
}

pub(crate) fn list_value(values: Vec<Value>) -> Value {
    Value {
        kind: Some(value::Kind::ListValue(ListValue { values })),
    }
}

pub(crate) fn strukt<'a>(fields: impl IntoIterator<Item = (&'a str, Value)>) -> Struct {
    Struct {
        fields: crate::maps::map_of(fields.into_iter().map(|(k, v)| (k.to_string(), v))),
    }
}

pub(crate) fn socket(ip: &str, port: u16) -> Address {
    Address {
        address: Some(address::Address::SocketAddress(SocketAddress {
            address: ip.to_string(),
            port_specifier: Some(socket_address::PortSpecifier::PortValue(u32::from(port))),
            ..Default::default()
        })),
    }
}

fn bind(ip: &str) -> BindConfig {
    BindConfig {
        source_address: Some(SocketAddress {
            address: ip.to_string(),
            port_specifier: Some(socket_address::PortSpecifier::PortValue(0)),
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn secs(s: i64) -> PbDuration {
    PbDuration {
        seconds: s,
        nanos: 0,
    }
}

pub(crate) fn duration(d: std::time::Duration) -> PbDuration {
    PbDuration {
        seconds: i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
        nanos: i32::try_from(d.subsec_nanos()).unwrap_or(0),
    }
}
