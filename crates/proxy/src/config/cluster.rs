//! Clusters: how endpoints are found, chosen and connected to.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use envoy_types::pb::envoy::config::cluster::v3::{
    Cluster as PbCluster, OutlierDetection, cluster,
};
use envoy_types::pb::envoy::config::core::v3::{TransportSocket, transport_socket};
use envoy_types::pb::envoy::config::endpoint::v3::{ClusterLoadAssignment, lb_endpoint};
use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::{
    CommonTlsContext, UpstreamTlsContext, common_tls_context,
};
use envoy_types::pb::envoy::extensions::upstreams::http::v3::{
    HttpProtocolOptions, http_protocol_options,
};
use envoy_types::pb::envoy::r#type::matcher::v3::string_matcher;
use envoy_types::pb::google::protobuf::{Struct, value};
use http::uri::Authority;
use prost::Message;

use super::CompileError;
use super::listener::{pb_duration, socket_addr, socket_address};
use crate::peer::Workload;
use crate::stats::{CounterCell, Stats};
use crate::upstream::{
    Address, ClusterState, EndpointState, Keepalive, Pools, TlsSpec, Transport, TransportSpec,
    UpstreamHttp,
};

pub(crate) const KIND: &str = "cluster";
/// The workload certificate and the mesh roots, as Istio's agent names them over SDS.
const SDS_WORKLOAD: &str = "default";
const SDS_ROOT: &str = "ROOTCA";
const TLS_MATCH_KEY: &str = "envoy.transport_socket_match";
const HTTP_OPTIONS: &str = "envoy.extensions.upstreams.http.v3.HttpProtocolOptions";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Discovery {
    Static,
    Eds,
    Dns,
    /// The connection's original destination is the endpoint.
    OriginalDst,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lb {
    RoundRobin,
    LeastRequest,
    Random,
    ClusterProvided,
    /// Consistent hashing (Envoy's RING_HASH and MAGLEV): a request's hash key picks the
    /// endpoint, and stays on it while that endpoint is up. Done by rendezvous hashing, which
    /// moves only the keys of an endpoint that leaves or joins, as a ring does.
    ConsistentHash,
}

#[derive(Debug)]
pub struct Endpoint {
    pub address: Address,
    /// `address` as requests to it name it, made once.
    pub authority: Option<Authority>,
    pub healthy: bool,
    /// The locality's priority: traffic goes to the lowest level that has an endpoint up
    /// (locality failover).
    pub priority: u32,
    /// Reached over mesh mTLS (its `tlsMode: istio` metadata matched).
    pub tls: bool,
    pub state: Arc<EndpointState>,
    /// Its workload, from Istio's `istio.workload` metadata: client-side telemetry names the
    /// destination by it when the answer does not (TCP, a peer without metadata exchange).
    pub workload: Option<Arc<Workload>>,
}

#[derive(Debug, Clone)]
pub struct Outlier {
    pub consecutive_5xx: u32,
    pub consecutive_gateway: u32,
    pub base_ejection: Duration,
    pub max_ejection_percent: u32,
}

/// Istio's clusters for traffic to no known service.
const CATCH_ALL: [&str; 5] = [
    "PassthroughCluster",
    "BlackHoleCluster",
    "InboundPassthroughCluster",
    "InboundPassthroughClusterIpv4",
    "InboundPassthroughClusterIpv6",
];

/// The services a cluster stands for (Istio's `istio` metadata), for metrics.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct ServiceRef {
    pub host: String,
    pub name: String,
    pub namespace: String,
}

#[derive(Debug)]
pub struct Cluster {
    pub name: String,
    pub discovery: Discovery,
    pub lb: Lb,
    plain: Arc<Transport>,
    mtls: Option<Arc<Transport>>,
    /// The cluster-level transport socket is mTLS: every host, also original destinations.
    all_mtls: bool,
    pub endpoints: Vec<Endpoint>,
    pub outlier: Option<Outlier>,
    pub service: Option<Arc<ServiceRef>>,
    /// Where peer metadata may not go: outside the mesh (Istio's `istio.external`, and the
    /// passthrough cluster), skipped in `IN_MESH` mode; and never (`istio.disable_mx`).
    pub external: bool,
    pub no_metadata_exchange: bool,
    /// Istio's TCP metadata exchange with upstreams that agree on this ALPN value (its
    /// `istio.metadata_exchange` cluster filter).
    pub tcp_metadata_exchange: Option<String>,
    /// Circuit breakers: requests in flight (HTTP) and connections (TCP) allowed.
    pub max_requests: usize,
    pub max_connections: usize,
    /// Retries in flight allowed: Envoy's `max_retries`, and its retry budget when set.
    pub max_retries: usize,
    pub retry_budget: Option<RetryBudget>,
    pub state: Arc<ClusterState>,
    round_robin: AtomicUsize,
    /// `cluster.<name>.upstream_rq_total`, and `upstream_rq_1xx` to `_5xx`.
    rq_total: CounterCell,
    rq_class: [CounterCell; 5],
}

/// The endpoint chosen for one request or connection.
pub struct Pick<'a> {
    pub address: Address,
    pub authority: Option<Authority>,
    pub transport: &'a Arc<Transport>,
    pub state: Option<&'a Arc<EndpointState>>,
    pub workload: Option<&'a Arc<Workload>>,
}

/// A consistent-hash key (a header's value, a client IP, …) as the number picks go by. The
/// hasher has fixed keys: every proxy maps a key to the same endpoint.
pub fn hash_key(value: impl std::hash::Hash) -> u64 {
    use std::hash::Hasher;
    let mut h = std::hash::DefaultHasher::new();
    value.hash(&mut h);
    h.finish()
}

/// The rendezvous weight of `address` for a hash key: the highest weight wins the key.
fn rendezvous(key: u64, address: &Address) -> u64 {
    hash_key((key, address))
}

/// Envoy's retry budget: retries in flight may be `percent` of the requests in flight, and at
/// least `min_concurrency`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RetryBudget {
    pub percent: f64,
    pub min_concurrency: usize,
}

impl Cluster {
    /// How many retries may be in flight now.
    pub fn retry_limit(&self) -> usize {
        let budget = self.retry_budget.map_or(usize::MAX, |b| {
            let active = self.state.requests.load(Ordering::Relaxed) as f64;
            ((active * b.percent / 100.0).ceil() as usize).max(b.min_concurrency)
        });
        self.max_retries.min(budget)
    }
}

/// Milliseconds since the proxy started: the clock of ejections.
pub fn now_ms() -> u64 {
    static START: OnceLock<Instant> = OnceLock::new();
    u64::try_from(START.get_or_init(Instant::now).elapsed().as_millis()).unwrap_or(u64::MAX)
}

/// Checks that a TLS context uses the workload identity (the only certificates this proxy
/// has) and returns the subject alternative names it requires of the peer.
pub(crate) fn mesh_tls(common: &CommonTlsContext) -> Result<Vec<String>, String> {
    if !common.tls_certificates.is_empty()
        || common
            .tls_certificate_sds_secret_configs
            .iter()
            .any(|s| s.name != SDS_WORKLOAD)
    {
        return Err(format!(
            "TLS certificates other than the workload's ({SDS_WORKLOAD:?}) are not supported"
        ));
    }
    let sans = match &common.validation_context_type {
        Some(common_tls_context::ValidationContextType::CombinedValidationContext(c)) => {
            if c.validation_context_sds_secret_config
                .as_ref()
                .is_some_and(|s| s.name != SDS_ROOT)
            {
                return Err(format!(
                    "validation contexts other than the mesh roots ({SDS_ROOT:?}) are not supported"
                ));
            }
            c.default_validation_context
                .as_ref()
                .map(|v| {
                    v.match_typed_subject_alt_names
                        .iter()
                        .filter_map(|m| match m.matcher.as_ref()?.match_pattern.as_ref()? {
                            string_matcher::MatchPattern::Exact(s) => Some(Ok(s.clone())),
                            _ => {
                                Some(Err("only exact subject alternative names are supported"
                                    .to_string()))
                            }
                        })
                        .collect::<Result<Vec<_>, _>>()
                })
                .transpose()?
                .unwrap_or_default()
        }
        Some(common_tls_context::ValidationContextType::ValidationContextSdsSecretConfig(s))
            if s.name == SDS_ROOT =>
        {
            Vec::new()
        }
        None => Vec::new(),
        Some(_) => {
            return Err(format!(
                "validation contexts other than the mesh roots ({SDS_ROOT:?}) are not supported"
            ));
        }
    };
    Ok(sans)
}

/// A transport socket: None for plaintext, the mesh TLS spec otherwise.
fn upstream_tls(ts: &TransportSocket) -> Result<Option<TlsSpec>, String> {
    let any = match &ts.config_type {
        Some(transport_socket::ConfigType::TypedConfig(any)) => any,
        None => return Ok(None),
    };
    if any.type_url.ends_with(".RawBuffer") {
        return Ok(None);
    }
    if !any.type_url.ends_with(".UpstreamTlsContext") {
        return Err(format!(
            "transport socket {} is not supported",
            any.type_url
        ));
    }
    let ctx = UpstreamTlsContext::decode(any.value.as_slice())
        .map_err(|e| format!("TLS context: {e}"))?;
    let common = ctx.common_tls_context.unwrap_or_default();
    let sans = mesh_tls(&common)?;
    Ok(Some(TlsSpec {
        sni: ctx.sni,
        sans,
        alpn: common.alpn_protocols,
    }))
}

fn struct_str<'a>(s: &'a Struct, key: &str) -> Option<&'a str> {
    match s.fields.get(key)?.kind.as_ref()? {
        value::Kind::StringValue(v) => Some(v),
        _ => None,
    }
}

/// Whether an endpoint's `envoy.transport_socket_match` metadata satisfies a match.
fn metadata_matches(criteria: &Struct, metadata: Option<&Struct>) -> bool {
    criteria.fields.iter().all(|(k, want)| {
        metadata
            .and_then(|m| m.fields.get(k))
            .is_some_and(|got| got == want)
    })
}

/// What the cluster's HTTP protocol options ask of upstream connections.
struct HttpOptions {
    protocol: UpstreamHttp,
    idle_timeout: Option<Duration>,
    max_requests_per_connection: Option<u32>,
    max_connection_duration: Option<Duration>,
}

fn http_options(c: &PbCluster) -> Result<HttpOptions, String> {
    use http_protocol_options::UpstreamProtocolOptions as Upstream;
    use http_protocol_options::explicit_http_config::ProtocolConfig;
    #[allow(deprecated)]
    let legacy = if c.http2_protocol_options.is_some() {
        UpstreamHttp::Http2
    } else {
        UpstreamHttp::Http1
    };
    let Some(any) = c.typed_extension_protocol_options.get(HTTP_OPTIONS) else {
        return Ok(HttpOptions {
            protocol: legacy,
            idle_timeout: None,
            max_requests_per_connection: None,
            max_connection_duration: None,
        });
    };
    let opts = HttpProtocolOptions::decode(any.value.as_slice())
        .map_err(|e| format!("{HTTP_OPTIONS}: {e}"))?;
    let protocol = match &opts.upstream_protocol_options {
        None => legacy,
        Some(Upstream::ExplicitHttpConfig(e)) => match e.protocol_config {
            Some(ProtocolConfig::Http2ProtocolOptions(_)) => UpstreamHttp::Http2,
            Some(ProtocolConfig::HttpProtocolOptions(_)) | None => UpstreamHttp::Http1,
            Some(ProtocolConfig::Http3ProtocolOptions(_)) => {
                return Err(format!("{HTTP_OPTIONS}: HTTP/3 upstream is not supported"));
            }
        },
        // As Envoy, the downstream's version whichever options are given.
        Some(Upstream::UseDownstreamProtocolConfig(_)) => UpstreamHttp::Downstream,
        Some(Upstream::AutoConfig(a)) => {
            if a.http3_protocol_options.is_some() {
                return Err(format!("{HTTP_OPTIONS}: HTTP/3 upstream is not supported"));
            }
            UpstreamHttp::Alpn
        }
    };
    let common = opts.common_http_protocol_options.as_ref();
    Ok(HttpOptions {
        protocol,
        idle_timeout: common
            .and_then(|o| o.idle_timeout.as_ref())
            .map(pb_duration),
        max_requests_per_connection: common
            .and_then(|o| o.max_requests_per_connection.as_ref())
            .map(|v| v.value)
            .filter(|n| *n > 0),
        max_connection_duration: common
            .and_then(|o| o.max_connection_duration.as_ref())
            .map(pb_duration)
            .filter(|d| !d.is_zero()),
    })
}

pub fn compile(
    c: &PbCluster,
    assignment: Option<&ClusterLoadAssignment>,
    pools: &Pools,
) -> Result<Cluster, CompileError> {
    let err = |reason: String| CompileError::new(KIND, &c.name, reason);
    let discovery = match &c.cluster_discovery_type {
        Some(cluster::ClusterDiscoveryType::Type(t)) => {
            match cluster::DiscoveryType::try_from(*t) {
                Ok(cluster::DiscoveryType::Static) => Discovery::Static,
                Ok(cluster::DiscoveryType::Eds) => Discovery::Eds,
                Ok(cluster::DiscoveryType::StrictDns | cluster::DiscoveryType::LogicalDns) => {
                    Discovery::Dns
                }
                Ok(cluster::DiscoveryType::OriginalDst) => Discovery::OriginalDst,
                _ => return Err(err(format!("discovery type {t} is not supported"))),
            }
        }
        None => Discovery::Static,
        Some(cluster::ClusterDiscoveryType::ClusterType(t)) => {
            return Err(err(format!(
                "custom cluster type {:?} is not supported",
                t.name
            )));
        }
    };
    let lb = match cluster::LbPolicy::try_from(c.lb_policy) {
        Ok(cluster::LbPolicy::RoundRobin) => Lb::RoundRobin,
        Ok(cluster::LbPolicy::LeastRequest) => Lb::LeastRequest,
        Ok(cluster::LbPolicy::Random) => Lb::Random,
        Ok(cluster::LbPolicy::ClusterProvided) => Lb::ClusterProvided,
        Ok(cluster::LbPolicy::RingHash | cluster::LbPolicy::Maglev) => Lb::ConsistentHash,
        Ok(other) => {
            return Err(err(format!(
                "load balancer {} is not supported",
                other.as_str_name()
            )));
        }
        Err(_) => return Err(err(format!("unknown load balancer {}", c.lb_policy))),
    };
    if (discovery == Discovery::OriginalDst) != (lb == Lb::ClusterProvided) {
        return Err(err(
            "ORIGINAL_DST clusters need CLUSTER_PROVIDED load balancing, and only they".into(),
        ));
    }
    let bind = c
        .upstream_bind_config
        .as_ref()
        .map(|b| {
            b.source_address
                .as_ref()
                .ok_or_else(|| "no source address".to_string())
                .and_then(socket_address)
                .map(|a| a.ip())
        })
        .transpose()
        .map_err(|e| err(format!("upstream bind: {e}")))?;
    let options = http_options(c).map_err(&err)?;
    let keepalive = c
        .upstream_connection_options
        .as_ref()
        .and_then(|o| o.tcp_keepalive.as_ref())
        .map(|k| {
            let seconds = |v: &Option<envoy_types::pb::google::protobuf::UInt32Value>| {
                v.as_ref().map(|s| Duration::from_secs(u64::from(s.value)))
            };
            Keepalive {
                time: seconds(&k.keepalive_time),
                interval: seconds(&k.keepalive_interval),
                probes: k.keepalive_probes.as_ref().map(|p| p.value),
            }
        });
    let spec = |tls: Option<TlsSpec>| -> Result<TransportSpec, String> {
        Ok(TransportSpec {
            bind,
            connect_timeout: c
                .connect_timeout
                .as_ref()
                .map_or(Duration::from_secs(5), pb_duration),
            tls,
            protocol: options.protocol,
            idle_timeout: options.idle_timeout,
            max_requests_per_connection: options.max_requests_per_connection,
            max_connection_duration: options.max_connection_duration,
            keepalive,
        })
    };
    // Cluster-level transport, then per-endpoint matches (Istio's auto mTLS).
    let cluster_tls = c
        .transport_socket
        .as_ref()
        .map(upstream_tls)
        .transpose()
        .map_err(&err)?
        .flatten();
    let mut matches: Vec<(&Struct, Option<TlsSpec>)> = Vec::new();
    for m in &c.transport_socket_matches {
        let tls = m
            .transport_socket
            .as_ref()
            .map(upstream_tls)
            .transpose()
            .map_err(|e| err(format!("transport socket match {:?}: {e}", m.name)))?
            .flatten();
        static EMPTY: OnceLock<Struct> = OnceLock::new();
        matches.push((
            m.r#match
                .as_ref()
                .unwrap_or(EMPTY.get_or_init(Struct::default)),
            tls,
        ));
    }
    let mtls_spec = cluster_tls
        .clone()
        .or_else(|| matches.iter().find_map(|(_, t)| t.clone()));
    let transport = |tls| {
        spec(tls)
            .and_then(|s| pools.transport(&c.name, s))
            .map_err(&err)
    };
    let plain = transport(None)?;
    let mtls = mtls_spec.map(|s| transport(Some(s))).transpose()?;
    if matches.iter().filter(|(_, t)| t.is_some()).count() > 1 {
        return Err(err(
            "more than one TLS transport socket match is not supported".into(),
        ));
    }

    let load = match discovery {
        Discovery::Eds => assignment,
        _ => c.load_assignment.as_ref(),
    };
    let mut endpoints = Vec::new();
    for locality in load.iter().flat_map(|a| a.endpoints.iter()) {
        for lbe in &locality.lb_endpoints {
            let Some(lb_endpoint::HostIdentifier::Endpoint(ep)) = &lbe.host_identifier else {
                continue;
            };
            let address = match socket_addr(ep.address.as_ref()) {
                Ok(a) => Address::Ip(a),
                Err(_) if discovery == Discovery::Dns => {
                    dns_address(ep.address.as_ref()).map_err(&err)?
                }
                Err(e) => return Err(err(format!("endpoint: {e}"))),
            };
            let tls_meta = lbe
                .metadata
                .as_ref()
                .and_then(|m| m.filter_metadata.get(TLS_MATCH_KEY));
            let tls = cluster_tls.is_some()
                || matches
                    .iter()
                    .find(|(criteria, _)| metadata_matches(criteria, tls_meta))
                    .is_some_and(|(_, t)| t.is_some());
            // HEALTHY (1) and UNKNOWN (0) take traffic; UNHEALTHY, DRAINING, TIMEOUT do not.
            let healthy = matches!(lbe.health_status, 0 | 1);
            let workload = lbe
                .metadata
                .as_ref()
                .and_then(|m| m.filter_metadata.get("istio"))
                .and_then(|istio| struct_str(istio, "workload"))
                .and_then(Workload::from_endpoint_label)
                .map(Arc::new);
            endpoints.push(Endpoint {
                state: pools.endpoint(&c.name, &address),
                authority: address.authority(),
                address,
                healthy,
                priority: locality.priority,
                tls,
                workload,
            });
        }
    }
    let outlier = c.outlier_detection.as_ref().map(outlier);
    let istio = c
        .metadata
        .as_ref()
        .and_then(|m| m.filter_metadata.get("istio"));
    let flag = |key: &str| {
        istio
            .and_then(|s| s.fields.get(key))
            .and_then(|v| v.kind.as_ref())
            == Some(&value::Kind::BoolValue(true))
    };
    // Upstream network filters: Istio's metadata exchange is the one it sets.
    let mut tcp_metadata_exchange = None;
    for f in &c.filters {
        let protocol = f
            .typed_config
            .as_ref()
            .and_then(super::listener::tcp_metadata_exchange)
            .ok_or_else(|| {
                err(format!(
                    "cluster filter {:?} ({}) is not supported",
                    f.name,
                    f.typed_config.as_ref().map_or("", |a| a.type_url.as_str())
                ))
            })?;
        tcp_metadata_exchange = Some(protocol.map_err(&err)?);
    }
    let (external, no_metadata_exchange) = (
        flag("external") || c.name == "PassthroughCluster",
        flag("disable_mx"),
    );
    let service = istio
        .and_then(|istio| match istio.fields.get("services")?.kind.as_ref()? {
            value::Kind::ListValue(l) => l.values.first().cloned(),
            _ => None,
        })
        .and_then(|v| match v.kind {
            Some(value::Kind::StructValue(s)) => {
                let host = struct_str(&s, "host").unwrap_or_default();
                Some(Arc::new(ServiceRef {
                    host: host.to_string(),
                    // Istio's: the host's first label when the metadata names none.
                    name: struct_str(&s, "name")
                        .unwrap_or_else(|| host.split('.').next().unwrap_or_default())
                        .to_string(),
                    namespace: struct_str(&s, "namespace").unwrap_or_default().to_string(),
                }))
            }
            _ => None,
        })
        // Istio's metrics name the destination of its catch-all clusters after them.
        .or_else(|| {
            CATCH_ALL.contains(&c.name.as_str()).then(|| {
                Arc::new(ServiceRef {
                    name: c.name.clone(),
                    ..ServiceRef::default()
                })
            })
        });
    // Envoy's defaults are 1,024 of each; Istio sets them from the DestinationRule.
    let th = c
        .circuit_breakers
        .as_ref()
        .and_then(|cb| cb.thresholds.iter().find(|t| t.priority == 0))
        .cloned()
        .unwrap_or_default();
    let get = |v: &Option<envoy_types::pb::google::protobuf::UInt32Value>| {
        v.as_ref().map_or(1024, |v| v.value as usize)
    };
    let (connections, pending, requests) = (
        get(&th.max_connections),
        get(&th.max_pending_requests),
        get(&th.max_requests),
    );
    Ok(Cluster {
        name: c.name.clone(),
        // One request per upstream connection, plus those waiting for one (HTTP/1.1's
        // accounting, which Istio's connectionPool settings are written against).
        max_requests: requests.min(connections.saturating_add(pending)),
        max_connections: connections,
        // Envoy's default is 3 retries in flight; Istio sets it from the DestinationRule.
        max_retries: th.max_retries.as_ref().map_or(3, |v| v.value as usize),
        retry_budget: th.retry_budget.as_ref().map(|b| RetryBudget {
            percent: b.budget_percent.as_ref().map_or(20.0, |p| p.value),
            min_concurrency: b
                .min_retry_concurrency
                .as_ref()
                .map_or(3, |v| v.value as usize),
        }),
        state: pools.cluster(&c.name),
        external,
        no_metadata_exchange,
        tcp_metadata_exchange,
        discovery,
        lb,
        plain,
        all_mtls: cluster_tls.is_some(),
        mtls,
        endpoints,
        outlier,
        service,
        round_robin: AtomicUsize::new(0),
        rq_total: CounterCell::default(),
        rq_class: Default::default(),
    })
}

fn dns_address(
    a: Option<&envoy_types::pb::envoy::config::core::v3::Address>,
) -> Result<Address, String> {
    use envoy_types::pb::envoy::config::core::v3::{address, socket_address};
    match a.and_then(|a| a.address.as_ref()) {
        Some(address::Address::SocketAddress(sa)) => match sa.port_specifier {
            Some(socket_address::PortSpecifier::PortValue(p)) => Ok(Address::Dns(
                sa.address.clone(),
                u16::try_from(p).map_err(|_| format!("port {p} out of range"))?,
            )),
            _ => Err(format!("endpoint {:?} has no port", sa.address)),
        },
        _ => Err("endpoint is not a socket address".into()),
    }
}

fn outlier(o: &OutlierDetection) -> Outlier {
    let v = |x: &Option<envoy_types::pb::google::protobuf::UInt32Value>, d: u32| {
        x.as_ref().map_or(d, |x| x.value)
    };
    let enforcing_5xx = v(&o.enforcing_consecutive_5xx, 100) > 0;
    let enforcing_gw = v(&o.enforcing_consecutive_gateway_failure, 0) > 0;
    Outlier {
        consecutive_5xx: if enforcing_5xx {
            v(&o.consecutive_5xx, 5)
        } else {
            0
        },
        consecutive_gateway: if enforcing_gw {
            v(&o.consecutive_gateway_failure, 5)
        } else {
            0
        },
        base_ejection: o
            .base_ejection_time
            .as_ref()
            .map_or(Duration::from_secs(30), pb_duration),
        max_ejection_percent: v(&o.max_ejection_percent, 10),
    }
}

#[derive(Debug, thiserror::Error)]
pub enum PickError {
    #[error("no healthy upstream")]
    NoHealthy,
    #[error("no original destination")]
    NoOriginalDst,
}

impl Cluster {
    pub(crate) fn transports(&self) -> impl Iterator<Item = &Arc<Transport>> {
        std::iter::once(&self.plain).chain(self.mtls.iter())
    }

    fn transport_for(&self, tls: bool) -> &Arc<Transport> {
        match (&self.mtls, tls) {
            (Some(t), true) => t,
            _ => &self.plain,
        }
    }

    /// Chooses an endpoint. `original_dst` serves ORIGINAL_DST clusters; `exclude` keeps
    /// retries off endpoints that already failed when others exist.
    /// An endpoint for a request: `hash` is its consistent-hash key, when the route has one.
    pub fn pick(
        &self,
        original_dst: Option<SocketAddr>,
        exclude: &[Address],
        hash: Option<u64>,
    ) -> Result<Pick<'_>, PickError> {
        if self.discovery == Discovery::OriginalDst {
            let address = Address::Ip(original_dst.ok_or(PickError::NoOriginalDst)?);
            return Ok(Pick {
                authority: address.authority(),
                address,
                transport: self.transport_for(self.all_mtls),
                state: None,
                workload: None,
            });
        }
        let now = now_ms();
        let up =
            |e: &&Endpoint| e.healthy && e.state.ejected_until_ms.load(Ordering::Relaxed) <= now;
        // Locality failover: the best priority level with an endpoint up takes the traffic.
        let level = self
            .endpoints
            .iter()
            .filter(up)
            .map(|e| e.priority)
            .min()
            .unwrap_or_default();
        // Endpoints tried already by this request are avoided while another is up. The
        // candidates are walked again rather than collected: no allocation per request.
        let eligible = |e: &&Endpoint| up(e) && e.priority == level;
        let fresh = |e: &&Endpoint| !exclude.contains(&e.address);
        let mut n = self.endpoints.iter().filter(eligible).filter(fresh).count();
        let avoid = n > 0;
        if !avoid {
            n = self.endpoints.iter().filter(eligible).count();
        }
        let candidates = || {
            self.endpoints
                .iter()
                .filter(eligible)
                .filter(move |e| !avoid || fresh(e))
        };
        let nth = |i: usize| candidates().nth(i).ok_or(PickError::NoHealthy);
        let chosen = match (n, self.lb) {
            (0, _) => return Err(PickError::NoHealthy),
            (1, _) => nth(0)?,
            (n, Lb::RoundRobin) => nth(self.round_robin.fetch_add(1, Ordering::Relaxed) % n)?,
            (_, Lb::ConsistentHash) if hash.is_some() => {
                let key = hash.unwrap_or_default();
                candidates()
                    .max_by_key(|e| rendezvous(key, &e.address))
                    .ok_or(PickError::NoHealthy)?
            }
            (n, Lb::Random | Lb::ClusterProvided | Lb::ConsistentHash) => {
                nth(rand::random_range(0..n))?
            }
            (n, Lb::LeastRequest) => {
                // Power of two choices.
                let a = rand::random_range(0..n);
                let b = (a + rand::random_range(1..n)) % n;
                let (ea, eb) = (nth(a)?, nth(b)?);
                if eb.state.active.load(Ordering::Relaxed) < ea.state.active.load(Ordering::Relaxed)
                {
                    eb
                } else {
                    ea
                }
            }
        };
        Ok(Pick {
            address: chosen.address.clone(),
            authority: chosen.authority.clone(),
            transport: self.transport_for(chosen.tls),
            state: Some(&chosen.state),
            workload: chosen.workload.as_ref(),
        })
    }

    /// Counts a request sent to this cluster (`cluster.<name>.upstream_rq_total`).
    pub fn count_request(&self, stats: &Stats) {
        self.rq_total.inc(
            stats,
            format_args!("cluster.{}.upstream_rq_total", self.name),
        );
    }

    /// Counts a response by its status class (`cluster.<name>.upstream_rq_2xx`).
    pub fn count_response(&self, stats: &Stats, status: u16) {
        let class = status / 100;
        let name = format_args!("cluster.{}.upstream_rq_{class}xx", self.name);
        match usize::from(class)
            .checked_sub(1)
            .and_then(|i| self.rq_class.get(i))
        {
            Some(cell) => cell.inc(stats, name),
            None => stats.inc(name),
        }
    }

    /// Records an outcome for outlier detection: `status` of a response, or None for a
    /// connection failure or reset (a gateway error).
    pub fn record(&self, state: &EndpointState, status: Option<u16>) {
        state.requests.fetch_add(1, Ordering::Relaxed);
        let failed5xx = status.is_none_or(|s| s >= 500);
        let gateway = status.is_none_or(|s| matches!(s, 502..=504));
        if !failed5xx {
            state.consecutive_errors.store(0, Ordering::Relaxed);
            return;
        }
        state.errors.fetch_add(1, Ordering::Relaxed);
        let n = state.consecutive_errors.fetch_add(1, Ordering::Relaxed) + 1;
        let Some(o) = &self.outlier else { return };
        let trips = (o.consecutive_5xx > 0 && n >= o.consecutive_5xx)
            || (gateway && o.consecutive_gateway > 0 && n >= o.consecutive_gateway);
        if !trips {
            return;
        }
        let now = now_ms();
        let ejected = self
            .endpoints
            .iter()
            .filter(|e| e.state.ejected_until_ms.load(Ordering::Relaxed) > now)
            .count();
        let total = self.endpoints.len().max(1);
        // Envoy always allows one ejection, whatever the percentage.
        if ejected > 0 && (ejected + 1) * 100 > total * o.max_ejection_percent as usize {
            return;
        }
        let times = state.ejections.fetch_add(1, Ordering::Relaxed) + 1;
        let ms = u64::try_from(o.base_ejection.as_millis())
            .unwrap_or(u64::MAX)
            .saturating_mul(u64::from(times));
        state
            .ejected_until_ms
            .store(now.saturating_add(ms), Ordering::Relaxed);
        state.consecutive_errors.store(0, Ordering::Relaxed);
    }

    /// Whether the endpoint at `addr` is ejected now (for `/clusters`).
    pub fn is_ejected(state: &EndpointState) -> bool {
        state.ejected_until_ms.load(Ordering::Relaxed) > now_ms()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use envoy_types::pb::envoy::config::core::v3::socket_address::PortSpecifier;
    use envoy_types::pb::envoy::config::core::v3::{Address as PbAddress, SocketAddress, address};
    use envoy_types::pb::envoy::config::endpoint::v3::{
        Endpoint as PbEndpoint, LbEndpoint, LocalityLbEndpoints,
    };

    fn static_cluster(lb: cluster::LbPolicy, ports: &[u16]) -> Cluster {
        let endpoint = |port: u16| LbEndpoint {
            host_identifier: Some(lb_endpoint::HostIdentifier::Endpoint(PbEndpoint {
                address: Some(PbAddress {
                    address: Some(address::Address::SocketAddress(SocketAddress {
                        address: "127.0.0.1".into(),
                        port_specifier: Some(PortSpecifier::PortValue(port.into())),
                        ..Default::default()
                    })),
                }),
                ..Default::default()
            })),
            ..Default::default()
        };
        let c = PbCluster {
            name: "c".into(),
            cluster_discovery_type: Some(cluster::ClusterDiscoveryType::Type(
                cluster::DiscoveryType::Static.into(),
            )),
            lb_policy: lb.into(),
            load_assignment: Some(ClusterLoadAssignment {
                cluster_name: "c".into(),
                endpoints: vec![LocalityLbEndpoints {
                    lb_endpoints: ports.iter().map(|p| endpoint(*p)).collect(),
                    ..Default::default()
                }],
                ..Default::default()
            }),
            ..Default::default()
        };
        compile(
            &c,
            None,
            &Pools::new(None, Arc::new(crate::stats::Stats::new())),
        )
        .expect("cluster")
    }

    fn port(p: &Pick<'_>) -> u16 {
        match &p.address {
            Address::Ip(a) => a.port(),
            Address::Dns(_, port) => *port,
        }
    }

    fn addr(port: u16) -> Address {
        Address::Ip(SocketAddr::from(([127, 0, 0, 1], port)))
    }

    #[test]
    fn a_retry_avoids_the_endpoints_it_tried_while_another_is_up() {
        for lb in [
            cluster::LbPolicy::LeastRequest,
            cluster::LbPolicy::RoundRobin,
            cluster::LbPolicy::Random,
        ] {
            let c = static_cluster(lb, &[1, 2, 3]);
            for _ in 0..20 {
                let p = c.pick(None, &[addr(1), addr(3)], None).expect("pick");
                assert_eq!(port(&p), 2, "{lb:?}");
            }
            // All tried: any endpoint rather than none.
            let p = c
                .pick(None, &[addr(1), addr(2), addr(3)], None)
                .expect("pick");
            assert!((1..=3).contains(&port(&p)));
        }
    }

    #[test]
    fn cluster_filters_set_the_tcp_metadata_exchange_and_others_are_refused() {
        use envoy_types::pb::envoy::config::cluster::v3::Filter;
        use envoy_types::pb::google::protobuf::Any;
        use isthmus_xds::typed_struct::{MetadataExchange, TCP_METADATA_EXCHANGE_TYPE_URL};
        let pools = Pools::new(None, Arc::new(crate::stats::Stats::new()));
        let with = |typed_config: Any| {
            let c = PbCluster {
                name: "outbound|7000||tcp.shop.svc.cluster.local".into(),
                cluster_discovery_type: Some(cluster::ClusterDiscoveryType::Type(
                    cluster::DiscoveryType::OriginalDst.into(),
                )),
                lb_policy: cluster::LbPolicy::ClusterProvided.into(),
                filters: vec![Filter {
                    name: "istio.metadata_exchange".into(),
                    typed_config: Some(typed_config),
                    ..Default::default()
                }],
                ..Default::default()
            };
            compile(&c, None, &pools).map(|c| c.tcp_metadata_exchange)
        };
        let typed_struct = |fields: serde_json::Value| -> Any {
            isthmus_xds::json::from_json(serde_json::json!({
                "@type": "type.googleapis.com/udpa.type.v1.TypedStruct",
                "type_url": TCP_METADATA_EXCHANGE_TYPE_URL,
                "value": fields,
            }))
            .unwrap()
        };
        // Istio's form, and older Istio's (the message itself).
        let istio = typed_struct(
            serde_json::json!({"protocol": "istio-peer-exchange", "enable_discovery": true}),
        );
        assert_eq!(with(istio).unwrap().as_deref(), Some("istio-peer-exchange"));
        let message = Any {
            type_url: TCP_METADATA_EXCHANGE_TYPE_URL.into(),
            value: MetadataExchange {
                protocol: "istio-peer-exchange".into(),
            }
            .encode_to_vec(),
        };
        assert_eq!(
            with(message).unwrap().as_deref(),
            Some("istio-peer-exchange")
        );
        let unnamed = with(typed_struct(serde_json::json!({}))).unwrap_err();
        assert!(
            unnamed.to_string().contains("names no protocol"),
            "{unnamed}"
        );
        let other = Any {
            type_url: "type.googleapis.com/envoy.extensions.filters.network.foo.v3.Foo".into(),
            value: Vec::new(),
        };
        let refused = with(other).unwrap_err().to_string();
        assert!(
            refused.contains("cluster filter \"istio.metadata_exchange\"")
                && refused.contains("network.foo.v3.Foo) is not supported"),
            "{refused}"
        );
    }

    #[test]
    fn metrics_name_the_service_from_metadata_or_the_catch_all_cluster() {
        let pools = Pools::new(None, Arc::new(crate::stats::Stats::new()));
        let named = |name: &str, metadata: Option<serde_json::Value>| {
            let c = PbCluster {
                name: name.into(),
                cluster_discovery_type: Some(cluster::ClusterDiscoveryType::Type(
                    cluster::DiscoveryType::OriginalDst.into(),
                )),
                lb_policy: cluster::LbPolicy::ClusterProvided.into(),
                metadata: metadata.map(|m| {
                    isthmus_xds::json::from_json(
                        serde_json::json!({"filter_metadata": {"istio": m}}),
                    )
                    .unwrap()
                }),
                ..Default::default()
            };
            compile(&c, None, &pools).expect("cluster").service
        };
        let passthrough = named("PassthroughCluster", None).expect("named");
        assert_eq!(
            (passthrough.name.as_str(), passthrough.host.as_str()),
            ("PassthroughCluster", "")
        );
        assert_eq!(named("outbound|80||x", None), None);
        let host_only = named(
            "outbound|80||reviews.bookinfo.svc.cluster.local",
            Some(serde_json::json!({"services": [{"host": "reviews.bookinfo.svc.cluster.local"}]})),
        )
        .expect("from metadata");
        assert_eq!(host_only.name, "reviews");
    }

    #[test]
    fn round_robin_takes_each_endpoint_in_turn() {
        let c = static_cluster(cluster::LbPolicy::RoundRobin, &[1, 2, 3]);
        let mut seen = [0; 4];
        for _ in 0..9 {
            seen[usize::from(port(&c.pick(None, &[], None).expect("pick")))] += 1;
        }
        assert_eq!(seen, [0, 3, 3, 3]);
    }

    #[test]
    fn least_request_prefers_the_idle_of_two() {
        let c = static_cluster(cluster::LbPolicy::LeastRequest, &[1, 2]);
        c.endpoints[0].state.active.store(5, Ordering::Relaxed);
        for _ in 0..20 {
            assert_eq!(port(&c.pick(None, &[], None).expect("pick")), 2);
        }
    }
}
