//! Listeners: address, listener filters, filter chains and how a connection picks one.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use envoy_types::pb::envoy::config::core::v3::{Address, SocketAddress, address, socket_address};
use envoy_types::pb::envoy::config::listener::v3::{
    Filter, FilterChain as PbFilterChain, Listener as PbListener, filter, listener_filter,
};
use envoy_types::pb::envoy::extensions::filters::http::router::v3::Router;
use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3::http_connection_manager::ServerHeaderTransformation;
use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3::{
    HttpConnectionManager, http_connection_manager, http_filter,
};
use envoy_types::pb::envoy::extensions::filters::network::tcp_proxy::v3::{TcpProxy, tcp_proxy};
use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::DownstreamTlsContext;
use envoy_types::pb::google::protobuf::Any;
use http::HeaderValue;
use ipnet::IpNet;
use prost::Message;

use super::CompileError;
use super::cluster::mesh_tls;
use super::jwt::JwtAuthn;
use super::rbac::{self, Rbac};
use super::route::{self, Clusters, RouteTable};
use crate::access_log::AccessLog;
use crate::peer::Exchange;
use crate::stats::CounterCell;
use envoy_types::pb::envoy::extensions::filters::http::jwt_authn::v3::JwtAuthentication;
use envoy_types::pb::envoy::extensions::filters::http::rbac::v3::Rbac as HttpRbac;
use envoy_types::pb::envoy::extensions::filters::network::rbac::v3::Rbac as NetworkRbac;
use isthmus_xds::typed_struct::{
    MetadataExchange, PEER_METADATA_TYPE_URL, STATS_TYPE_URL, TCP_METADATA_EXCHANGE_TYPE_URL,
    TypedStruct, is_typed_struct,
};

use super::istio_stats::StatsConfig;

pub(crate) const KIND: &str = "listener";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    Outbound,
    Inbound,
    Unspecified,
}

#[derive(Debug)]
pub struct Listener {
    pub name: String,
    pub address: SocketAddr,
    /// False for the per-port listeners that only receive connections handed over by
    /// `virtualOutbound` (`bind_to_port: false`).
    pub bind: bool,
    pub use_original_dst: bool,
    pub direction: Direction,
    /// `tls_inspector` present: the transport protocol, SNI and ALPN are known before matching.
    pub inspect_tls: bool,
    /// `http_inspector` present: plaintext HTTP/1.x and h2c are recognised before matching.
    pub inspect_http: bool,
    /// How long the inspectors wait for the first bytes; None: as long as it takes
    /// (`listener_filters_timeout: 0s`, Istio's default protocol detection).
    pub inspect_timeout: Option<Duration>,
    pub continue_on_timeout: bool,
    /// `original_src` (TPROXY mode): upstream connections come from the client's address,
    /// with this socket mark.
    pub original_src_mark: Option<u32>,
    pub chains: Vec<Arc<FilterChain>>,
    pub default_chain: Option<Arc<FilterChain>>,
}

/// What is known about a connection when its filter chain is chosen.
#[derive(Debug, Clone, Default)]
pub struct ConnectionFacts {
    pub destination: Option<SocketAddr>,
    pub source: Option<SocketAddr>,
    /// `tls` or `raw_buffer`, when inspected.
    pub transport: Option<&'static str>,
    pub server_name: Option<String>,
    pub alpn: Vec<String>,
}

#[derive(Debug, Default)]
pub struct ChainMatch {
    pub destination_port: Option<u16>,
    pub prefix_ranges: Vec<IpNet>,
    pub server_names: Vec<String>,
    pub transport_protocol: Option<String>,
    pub application_protocols: Vec<String>,
    pub source_prefix_ranges: Vec<IpNet>,
    pub source_ports: Vec<u16>,
}

impl ChainMatch {
    /// Whether matching needs the first bytes of the connection.
    pub fn needs_inspection(&self) -> bool {
        !self.server_names.is_empty()
            || self.transport_protocol.is_some()
            || !self.application_protocols.is_empty()
    }
}

#[derive(Debug)]
pub struct FilterChain {
    pub name: String,
    pub matcher: ChainMatch,
    /// Terminate TLS with the workload certificate before the filter.
    pub tls: Option<DownstreamTls>,
    /// Network RBAC, decided once per connection.
    pub rbac: Vec<Rbac>,
    pub filter: NetworkFilter,
}

#[derive(Debug, Clone)]
pub struct DownstreamTls {
    pub alpn: Vec<Vec<u8>>,
    pub require_client_certificate: bool,
}

#[derive(Debug)]
pub enum NetworkFilter {
    Http(Arc<Hcm>),
    Tcp {
        cluster: Clusters,
        stat_prefix: String,
        /// Consistent-hash clusters pick by the client's IP (`hash_policy: source_ip`).
        hash_source_ip: bool,
        access_logs: Vec<Arc<AccessLog>>,
        /// No byte either way for this long closes the connection (None: never).
        idle_timeout: Option<Duration>,
        /// A connection this old is closed (None: never).
        max_duration: Option<Duration>,
        /// Istio's metrics of the connection, when the chain has the stats filter.
        stats: Option<Arc<StatsConfig>>,
        /// Istio's TCP metadata exchange with the client, under this ALPN value.
        metadata_exchange: Option<String>,
    },
}

#[derive(Debug)]
pub enum RouteSource {
    Rds(String),
    Inline(Arc<RouteTable>),
}

/// How the client certificate reaches the app (Envoy's `forward_client_cert_details`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ForwardClientCert {
    Sanitize,
    ForwardOnly,
    AppendForward,
    SanitizeSet,
    AlwaysForwardOnly,
}

/// `http.<stat_prefix>.…` counters of the per-request path.
#[derive(Debug, Default)]
pub struct HcmCounters {
    pub downstream_rq_total: CounterCell,
    pub jwt_allowed: CounterCell,
    pub jwt_denied: CounterCell,
    pub rbac_allowed: CounterCell,
    pub rbac_denied: CounterCell,
}

/// The `server` header of responses (Envoy's `server_name` and `server_header_transformation`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ServerHeader {
    /// Replaces whatever the upstream sent (Envoy's default, as `envoy`).
    Overwrite(HeaderValue),
    AppendIfAbsent(HeaderValue),
    PassThrough,
}

impl ServerHeader {
    pub fn apply(&self, h: &mut http::HeaderMap) {
        match self {
            ServerHeader::Overwrite(v) => {
                h.insert(http::header::SERVER, v.clone());
            }
            ServerHeader::AppendIfAbsent(v) => {
                h.entry(http::header::SERVER).or_insert_with(|| v.clone());
            }
            ServerHeader::PassThrough => {}
        }
    }
}

#[derive(Debug)]
pub struct Hcm {
    pub stat_prefix: String,
    /// What Istio's peer metadata filter does here (nothing without it).
    pub exchange: Exchange,
    /// The counters a request may touch, found by name once.
    pub counters: HcmCounters,
    /// A connection without traffic for this long is closed, gracefully (None: never).
    pub idle_timeout: Option<Duration>,
    pub routes: RouteSource,
    pub forward_client_cert: ForwardClientCert,
    /// `set_current_client_cert_details`: subject, URI, DNS.
    pub xfcc_subject: bool,
    pub xfcc_uri: bool,
    pub xfcc_dns: bool,
    pub generate_request_id: bool,
    /// JWT verification, before RBAC, which reads what it found.
    pub jwt: Option<JwtAuthn>,
    /// HTTP RBAC, decided per request before routing.
    pub rbac: Vec<Rbac>,
    pub access_logs: Vec<Arc<AccessLog>>,
    /// Istio's metrics of each request, when the stats filter is among the HTTP filters.
    pub stats: Option<Arc<StatsConfig>>,
    /// Spans and B3 context, when the connection manager traces with a tracer this proxy runs.
    pub tracing: Option<crate::trace::Tracing>,
    /// The fault filter's own configuration, for routes without one.
    pub fault: Option<route::Fault>,
    /// The CORS filter is in the chain: routes' CORS policies apply.
    pub cors: bool,
    pub server: ServerHeader,
    /// The router adds `x-envoy-upstream-service-time` and `x-envoy-expected-rq-timeout-ms`
    /// (not its `suppress_envoy_headers`).
    pub envoy_headers: bool,
}

fn access_logs(
    list: &[envoy_types::pb::envoy::config::accesslog::v3::AccessLog],
) -> Result<Vec<Arc<AccessLog>>, String> {
    list.iter()
        .map(|a| AccessLog::compile(a).map(Arc::new))
        .collect()
}

pub fn compile(l: &PbListener) -> Result<Listener, CompileError> {
    let err = |reason: String| CompileError::new(KIND, &l.name, reason);
    let address = socket_addr(l.address.as_ref()).map_err(err)?;
    let mut inspect_tls = false;
    let mut inspect_http = false;
    let mut original_src_mark = None;
    for f in &l.listener_filters {
        match f.name.as_str() {
            "envoy.filters.listener.original_dst" => {}
            "envoy.filters.listener.original_src" => {
                use envoy_types::pb::envoy::extensions::filters::listener::original_src::v3::OriginalSrc;
                let c = match &f.config_type {
                    Some(listener_filter::ConfigType::TypedConfig(any)) => {
                        OriginalSrc::decode(any.value.as_slice())
                            .map_err(|e| err(format!("original_src: {e}")))?
                    }
                    _ => OriginalSrc::default(),
                };
                if c.bind_port {
                    return Err(err("original_src: bind_port is not supported".into()));
                }
                original_src_mark = Some(c.mark);
            }
            "envoy.filters.listener.tls_inspector" => inspect_tls = true,
            "envoy.filters.listener.http_inspector" => inspect_http = true,
            other => {
                let typed = match &f.config_type {
                    Some(listener_filter::ConfigType::TypedConfig(any)) => any.type_url.as_str(),
                    _ => "",
                };
                return Err(err(format!(
                    "listener filter {other:?} ({typed}) is not supported"
                )));
            }
        }
    }
    let chains = l
        .filter_chains
        .iter()
        .map(|c| chain(c).map(Arc::new))
        .collect::<Result<Vec<_>, String>>()
        .map_err(err)?;
    let default_chain = l
        .default_filter_chain
        .as_ref()
        .map(|c| chain(c).map(Arc::new))
        .transpose()
        .map_err(err)?;
    Ok(Listener {
        name: l.name.clone(),
        address,
        bind: l.bind_to_port.as_ref().is_none_or(|b| b.value),
        use_original_dst: l.use_original_dst.as_ref().is_some_and(|b| b.value),
        direction: match l.traffic_direction {
            1 => Direction::Inbound,
            2 => Direction::Outbound,
            _ => Direction::Unspecified,
        },
        inspect_tls,
        inspect_http,
        inspect_timeout: match &l.listener_filters_timeout {
            None => Some(Duration::from_secs(15)),
            Some(d) => Some(pb_duration(d)).filter(|d| !d.is_zero()),
        },
        continue_on_timeout: l.continue_on_listener_filters_timeout,
        original_src_mark,
        chains,
        default_chain,
    })
}

pub(crate) fn pb_duration(d: &envoy_types::pb::google::protobuf::Duration) -> Duration {
    Duration::new(
        u64::try_from(d.seconds).unwrap_or(0),
        u32::try_from(d.nanos).unwrap_or(0),
    )
}

pub(crate) fn socket_addr(a: Option<&Address>) -> Result<SocketAddr, String> {
    let Some(address::Address::SocketAddress(sa)) = a.and_then(|a| a.address.as_ref()) else {
        return Err("address is not a socket address".into());
    };
    socket_address(sa)
}

pub(crate) fn socket_address(sa: &SocketAddress) -> Result<SocketAddr, String> {
    let ip: IpAddr = sa
        .address
        .parse()
        .map_err(|_| format!("address {:?} is not an IP address", sa.address))?;
    let port = match sa.port_specifier {
        Some(socket_address::PortSpecifier::PortValue(p)) => {
            u16::try_from(p).map_err(|_| format!("port {p} out of range"))?
        }
        Some(socket_address::PortSpecifier::NamedPort(ref n)) => {
            return Err(format!("named port {n:?} is not supported"));
        }
        None => 0,
    };
    Ok(SocketAddr::new(ip, port))
}

fn chain(c: &PbFilterChain) -> Result<FilterChain, String> {
    let name = &c.name;
    let m = c.filter_chain_match.clone().unwrap_or_default();
    let cidrs = |ranges: &[envoy_types::pb::envoy::config::core::v3::CidrRange]| {
        ranges
            .iter()
            .map(|r| {
                let len = r.prefix_len.as_ref().map_or(0, |l| l.value);
                format!("{}/{len}", r.address_prefix)
                    .parse::<IpNet>()
                    .map_err(|_| format!("filter chain {name:?}: bad CIDR {r:?}"))
            })
            .collect::<Result<Vec<_>, String>>()
    };
    let matcher = ChainMatch {
        destination_port: m
            .destination_port
            .as_ref()
            .map(|p| u16::try_from(p.value))
            .transpose()
            .map_err(|_| format!("filter chain {name:?}: destination port out of range"))?,
        prefix_ranges: cidrs(&m.prefix_ranges)?,
        server_names: m.server_names.clone(),
        transport_protocol: (!m.transport_protocol.is_empty())
            .then(|| m.transport_protocol.clone()),
        application_protocols: m.application_protocols.clone(),
        source_prefix_ranges: cidrs(&m.source_prefix_ranges)?,
        source_ports: m
            .source_ports
            .iter()
            .filter_map(|p| u16::try_from(*p).ok())
            .collect(),
    };
    let tls = match &c.transport_socket {
        None => None,
        Some(ts) => match &ts.config_type {
            Some(
                envoy_types::pb::envoy::config::core::v3::transport_socket::ConfigType::TypedConfig(
                    any,
                ),
            ) if any.type_url.ends_with(".DownstreamTlsContext") => {
                let ctx = DownstreamTlsContext::decode(any.value.as_slice())
                    .map_err(|e| format!("filter chain {name:?}: TLS context: {e}"))?;
                let common = ctx.common_tls_context.unwrap_or_default();
                mesh_tls(&common).map_err(|e| format!("filter chain {name:?}: {e}"))?;
                Some(DownstreamTls {
                    alpn: common
                        .alpn_protocols
                        .iter()
                        .map(|a| a.as_bytes().to_vec())
                        .collect(),
                    require_client_certificate: ctx
                        .require_client_certificate
                        .as_ref()
                        .is_some_and(|b| b.value),
                })
            }
            Some(
                envoy_types::pb::envoy::config::core::v3::transport_socket::ConfigType::TypedConfig(
                    any,
                ),
            ) if any.type_url.ends_with(".RawBuffer") => None,
            _ => {
                return Err(format!(
                    "filter chain {name:?}: transport socket {:?} is not supported",
                    ts.name
                ));
            }
        },
    };
    // Connection-level RBAC filters and Istio's stats filter, then one terminal filter.
    let Some((last, before)) = c.filters.split_last() else {
        return Err(format!("filter chain {name:?} has no network filter"));
    };
    let mut rbac = Vec::new();
    let mut stats = None;
    let mut exchange = None;
    for f in before {
        let any = typed(f).map_err(|e| format!("filter chain {name:?}: {e}"))?;
        if let Some(config) = stats_filter(any) {
            stats = Some(config.map_err(|e| format!("filter chain {name:?}: {e}"))?);
            continue;
        }
        if let Some(protocol) = tcp_metadata_exchange(any) {
            exchange = Some(protocol.map_err(|e| format!("filter chain {name:?}: {e}"))?);
            continue;
        }
        if !any.type_url.ends_with(".network.rbac.v3.RBAC") {
            return Err(format!(
                "filter chain {name:?}: network filter {:?} ({}) is not supported before the terminal filter",
                f.name, any.type_url
            ));
        }
        let r = NetworkRbac::decode(any.value.as_slice())
            .map_err(|e| format!("filter chain {name:?}: rbac: {e}"))?;
        if let Some(rules) = &r.rules {
            rbac.push(rbac::compile(rules).map_err(|e| format!("filter chain {name:?}: {e}"))?);
        }
    }
    let mut filter = network_filter(last).map_err(|e| format!("filter chain {name:?}: {e}"))?;
    match &mut filter {
        NetworkFilter::Tcp {
            stats: s,
            metadata_exchange,
            ..
        } => {
            *s = stats;
            *metadata_exchange = exchange;
        }
        // Over HTTP, peers exchange metadata in headers (the connection manager's filter).
        NetworkFilter::Http(_) if exchange.is_some() => {
            return Err(format!(
                "filter chain {name:?}: istio.metadata_exchange is supported before tcp_proxy only"
            ));
        }
        NetworkFilter::Http(_) => {}
    }
    Ok(FilterChain {
        name: name.clone(),
        matcher,
        tls,
        rbac,
        filter,
    })
}

/// Istio's stats filter's configuration, when `any` is one (HTTP or network).
fn stats_filter(any: &Any) -> Option<Result<Arc<StatsConfig>, String>> {
    if !is_typed_struct(&any.type_url) {
        return None;
    }
    let typed = TypedStruct::decode(any.value.as_slice()).ok()?;
    (typed.type_url == STATS_TYPE_URL)
        .then(|| StatsConfig::compile(&typed.value.unwrap_or_default()).map(Arc::new))
}

/// The ALPN value of Istio's TCP metadata exchange, when `any` configures it (a network or a
/// cluster filter).
pub(crate) fn tcp_metadata_exchange(any: &Any) -> Option<Result<String, String>> {
    let protocol = if any.type_url == TCP_METADATA_EXCHANGE_TYPE_URL {
        MetadataExchange::decode(any.value.as_slice())
            .map(|m| m.protocol)
            .map_err(|e| format!("istio.metadata_exchange: {e}"))
    } else if is_typed_struct(&any.type_url) {
        let typed = TypedStruct::decode(any.value.as_slice()).ok()?;
        if typed.type_url != TCP_METADATA_EXCHANGE_TYPE_URL {
            return None;
        }
        Ok(typed
            .value
            .and_then(|v| match v.fields.get("protocol")?.kind.clone()? {
                envoy_types::pb::google::protobuf::value::Kind::StringValue(p) => Some(p),
                _ => None,
            })
            .unwrap_or_default())
    } else {
        return None;
    };
    Some(protocol.and_then(|p| {
        if p.is_empty() {
            Err("istio.metadata_exchange names no protocol".into())
        } else {
            Ok(p)
        }
    }))
}

fn typed(f: &Filter) -> Result<&Any, String> {
    match &f.config_type {
        Some(filter::ConfigType::TypedConfig(any)) => Ok(any),
        _ => Err(format!("filter {:?} has no typed config", f.name)),
    }
}

fn network_filter(f: &Filter) -> Result<NetworkFilter, String> {
    let any = typed(f)?;
    if any.type_url.ends_with(".TcpProxy") {
        let tp = TcpProxy::decode(any.value.as_slice()).map_err(|e| format!("tcp_proxy: {e}"))?;
        let cluster = match tp.cluster_specifier {
            Some(tcp_proxy::ClusterSpecifier::Cluster(c)) => Clusters::One(c),
            // Istio's TCP traffic shifting: each connection to one cluster, by weight.
            Some(tcp_proxy::ClusterSpecifier::WeightedClusters(w)) => {
                let list: Vec<route::WeightedCluster> = w
                    .clusters
                    .into_iter()
                    .map(|c| route::WeightedCluster {
                        name: c.name,
                        weight: c.weight,
                        edits: None,
                    })
                    .collect();
                if list.iter().all(|c| c.weight == 0) {
                    return Err("tcp_proxy weighted clusters have no weight".into());
                }
                Clusters::Weighted(list)
            }
            None => return Err("tcp_proxy names no cluster".into()),
        };
        use envoy_types::pb::envoy::r#type::v3::hash_policy::PolicySpecifier;
        let mut hash_source_ip = false;
        for h in &tp.hash_policy {
            match h.policy_specifier {
                Some(PolicySpecifier::SourceIp(_)) => hash_source_ip = true,
                _ => {
                    return Err(
                        "tcp_proxy hash policies other than source_ip are not supported".into(),
                    );
                }
            }
        }
        return Ok(NetworkFilter::Tcp {
            cluster,
            stat_prefix: tp.stat_prefix,
            hash_source_ip,
            access_logs: access_logs(&tp.access_log)?,
            idle_timeout: crate::idle::timeout(tp.idle_timeout.as_ref().map(pb_duration)),
            max_duration: tp
                .max_downstream_connection_duration
                .as_ref()
                .map(pb_duration)
                .filter(|d| !d.is_zero()),
            stats: None,
            metadata_exchange: None,
        });
    }
    if any.type_url.ends_with(".HttpConnectionManager") {
        let hcm = HttpConnectionManager::decode(any.value.as_slice())
            .map_err(|e| format!("http_connection_manager: {e}"))?;
        return http_connection_manager(hcm).map(|h| NetworkFilter::Http(Arc::new(h)));
    }
    Err(format!(
        "network filter {:?} ({}) is not supported",
        f.name, any.type_url
    ))
}

fn http_connection_manager(hcm: HttpConnectionManager) -> Result<Hcm, String> {
    let mut has_router = false;
    let mut envoy_headers = true;
    let mut rbac_filters = Vec::new();
    let mut jwt = None;
    let mut fault = None;
    let mut cors = false;
    let mut exchange = Exchange::default();
    let mut stats = None;
    for f in &hcm.http_filters {
        let (type_url, value) = match &f.config_type {
            Some(http_filter::ConfigType::TypedConfig(any)) => (any.type_url.as_str(), &any.value),
            _ => ("", &Vec::new()),
        };
        if let Some(http_filter::ConfigType::TypedConfig(any)) = &f.config_type
            && let Some(config) = stats_filter(any)
        {
            stats = Some(config?);
        } else if type_url.ends_with(".router.v3.Router") || f.name == "envoy.filters.http.router" {
            has_router = true;
            if !value.is_empty() {
                let r = Router::decode(value.as_slice()).map_err(|e| format!("router: {e}"))?;
                envoy_headers = !r.suppress_envoy_headers;
            }
        } else if type_url.ends_with(".fault.v3.HTTPFault") {
            // Configured per route; a filter-level fault applies where a route has none.
            if let Some(http_filter::ConfigType::TypedConfig(any)) = &f.config_type {
                fault = Some(route::Fault::decode(any)?).filter(|f| !f.is_empty());
            }
        } else if type_url.ends_with(".cors.v3.Cors") {
            // Configured per route only.
            cors = true;
        } else if type_url.ends_with(".jwt_authn.v3.JwtAuthentication") {
            let c = JwtAuthentication::decode(value.as_slice())
                .map_err(|e| format!("jwt_authn: {e}"))?;
            jwt = Some(super::jwt::compile(&c)?);
        } else if is_typed_struct(type_url)
            && let Ok(typed) = TypedStruct::decode(value.as_slice())
            && typed.type_url == PEER_METADATA_TYPE_URL
        {
            exchange = Exchange::from_config(&typed.value.unwrap_or_default())?;
        } else if type_url.ends_with(".http.rbac.v3.RBAC") {
            let r = HttpRbac::decode(value.as_slice()).map_err(|e| format!("rbac: {e}"))?;
            if let Some(rules) = &r.rules {
                rbac_filters.push(rbac::compile(rules)?);
            }
        } else if !f.is_optional {
            return Err(format!(
                "HTTP filter {:?} ({type_url}) is not supported",
                f.name
            ));
        }
    }
    if !has_router {
        return Err("http_connection_manager has no router filter".into());
    }
    let routes = match hcm.route_specifier {
        Some(http_connection_manager::RouteSpecifier::Rds(rds)) => {
            RouteSource::Rds(rds.route_config_name)
        }
        Some(http_connection_manager::RouteSpecifier::RouteConfig(rc)) => {
            RouteSource::Inline(Arc::new(route::compile(&rc).map_err(|e| e.to_string())?))
        }
        _ => {
            return Err("http_connection_manager: only RDS and inline routes are supported".into());
        }
    };
    let details = hcm.set_current_client_cert_details.unwrap_or_default();
    let server_name = if hcm.server_name.is_empty() {
        HeaderValue::from_static("envoy")
    } else {
        HeaderValue::from_str(&hcm.server_name).map_err(|_| {
            format!(
                "server_name {:?} is not a valid header value",
                hcm.server_name
            )
        })?
    };
    let server = match ServerHeaderTransformation::try_from(hcm.server_header_transformation) {
        Ok(ServerHeaderTransformation::Overwrite) => ServerHeader::Overwrite(server_name),
        Ok(ServerHeaderTransformation::AppendIfAbsent) => ServerHeader::AppendIfAbsent(server_name),
        Ok(ServerHeaderTransformation::PassThrough) => ServerHeader::PassThrough,
        Err(_) => {
            return Err(format!(
                "server_header_transformation {} is not a known value",
                hcm.server_header_transformation
            ));
        }
    };
    Ok(Hcm {
        stat_prefix: hcm.stat_prefix,
        exchange,
        counters: HcmCounters::default(),
        idle_timeout: crate::idle::timeout(
            hcm.common_http_protocol_options
                .as_ref()
                .and_then(|o| o.idle_timeout.as_ref())
                .map(pb_duration),
        ),
        routes,
        forward_client_cert: match hcm.forward_client_cert_details {
            1 => ForwardClientCert::ForwardOnly,
            2 => ForwardClientCert::AppendForward,
            3 => ForwardClientCert::SanitizeSet,
            4 => ForwardClientCert::AlwaysForwardOnly,
            _ => ForwardClientCert::Sanitize,
        },
        xfcc_subject: details.subject.is_some_and(|b| b.value),
        xfcc_uri: details.uri,
        xfcc_dns: details.dns,
        generate_request_id: hcm.generate_request_id.as_ref().is_none_or(|b| b.value),
        jwt,
        rbac: rbac_filters,
        access_logs: access_logs(&hcm.access_log)?,
        stats,
        tracing: hcm
            .tracing
            .as_ref()
            .map(crate::trace::Tracing::compile)
            .transpose()?
            .flatten(),
        fault,
        cors,
        server,
        envoy_headers,
    })
}

/// How well one criterion of a chain matches a connection.
enum Spec {
    /// The chain does not constrain it.
    Any,
    /// It matches, with this specificity (higher wins).
    Match(u32),
    No,
}

impl Listener {
    /// Whether any chain still in play for `facts` needs the first bytes to decide.
    pub fn needs_inspection(&self, facts: &ConnectionFacts) -> bool {
        (self.inspect_tls || self.inspect_http)
            && narrow_by_address(self.chains.iter().collect(), facts)
                .iter()
                .any(|c| c.matcher.needs_inspection())
    }

    /// Envoy's filter-chain selection: each criterion in turn keeps the most specific chains
    /// that match it, or those that do not constrain it; a criterion that leaves none means no
    /// chain (the default chain, if any) — less specific chains are not reconsidered.
    pub fn select(&self, facts: &ConnectionFacts) -> Option<&Arc<FilterChain>> {
        let mut c = narrow_by_address(self.chains.iter().collect(), facts);
        c = narrow(c, |m| {
            if m.server_names.is_empty() {
                return Spec::Any;
            }
            let Some(sni) = facts.server_name.as_deref() else {
                return Spec::No;
            };
            m.server_names
                .iter()
                .filter_map(|n| server_name_match(n, sni))
                .max()
                .map_or(Spec::No, Spec::Match)
        });
        c = narrow(c, |m| match (&m.transport_protocol, facts.transport) {
            (None, _) => Spec::Any,
            (Some(want), Some(got)) if want == got => Spec::Match(1),
            (Some(want), None) if want == "raw_buffer" => Spec::Match(1),
            _ => Spec::No,
        });
        c = narrow(c, |m| {
            if m.application_protocols.is_empty() {
                Spec::Any
            } else if m
                .application_protocols
                .iter()
                .any(|p| facts.alpn.contains(p))
            {
                Spec::Match(1)
            } else {
                Spec::No
            }
        });
        c = narrow(c, |m| {
            let Some(src) = facts.source else {
                return Spec::Any;
            };
            prefix_spec(&m.source_prefix_ranges, src.ip())
        });
        c = narrow(c, |m| match facts.source {
            Some(src) if !m.source_ports.is_empty() => {
                if m.source_ports.contains(&src.port()) {
                    Spec::Match(1)
                } else {
                    Spec::No
                }
            }
            _ => Spec::Any,
        });
        c.first().copied().or(self.default_chain.as_ref())
    }
}

fn narrow_by_address<'a>(
    chains: Vec<&'a Arc<FilterChain>>,
    facts: &ConnectionFacts,
) -> Vec<&'a Arc<FilterChain>> {
    let c = narrow(chains, |m| match (m.destination_port, facts.destination) {
        (None, _) => Spec::Any,
        (Some(p), Some(d)) if p == d.port() => Spec::Match(1),
        _ => Spec::No,
    });
    narrow(c, |m| match facts.destination {
        Some(d) => prefix_spec(&m.prefix_ranges, d.ip()),
        None if m.prefix_ranges.is_empty() => Spec::Any,
        None => Spec::No,
    })
}

fn prefix_spec(ranges: &[IpNet], ip: IpAddr) -> Spec {
    if ranges.is_empty() {
        return Spec::Any;
    }
    let ip = match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    };
    ranges
        .iter()
        .filter(|r| r.contains(&ip))
        .map(|r| u32::from(r.prefix_len()))
        .max()
        .map_or(Spec::No, Spec::Match)
}

/// Exact names beat wildcards; longer wildcards beat shorter ones.
fn server_name_match(pattern: &str, sni: &str) -> Option<u32> {
    let sni = sni.to_ascii_lowercase();
    let pattern = pattern.to_ascii_lowercase();
    if pattern == sni {
        return Some(u32::MAX);
    }
    let suffix = pattern.strip_prefix('*')?;
    (sni.ends_with(suffix) && sni.len() > suffix.len())
        .then(|| u32::try_from(suffix.len()).unwrap_or(0))
}

fn narrow(
    chains: Vec<&Arc<FilterChain>>,
    spec: impl Fn(&ChainMatch) -> Spec,
) -> Vec<&Arc<FilterChain>> {
    let mut best: Option<u32> = None;
    let mut matched = Vec::new();
    let mut any = Vec::new();
    for c in chains {
        match spec(&c.matcher) {
            Spec::Match(s) => {
                if best.is_none_or(|b| s > b) {
                    best = Some(s);
                    matched.clear();
                }
                if best == Some(s) {
                    matched.push(c);
                }
            }
            Spec::Any => any.push(c),
            Spec::No => {}
        }
    }
    if matched.is_empty() { any } else { matched }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chain(name: &str, port: Option<u16>, transport: Option<&str>) -> Arc<FilterChain> {
        Arc::new(FilterChain {
            name: name.into(),
            matcher: ChainMatch {
                destination_port: port,
                transport_protocol: transport.map(str::to_string),
                ..Default::default()
            },
            tls: None,
            rbac: Vec::new(),
            filter: NetworkFilter::Tcp {
                cluster: Clusters::One(name.into()),
                stat_prefix: name.into(),
                hash_source_ip: false,
                access_logs: Vec::new(),
                idle_timeout: None,
                max_duration: None,
                stats: None,
                metadata_exchange: None,
            },
        })
    }

    fn listener(chains: Vec<Arc<FilterChain>>) -> Listener {
        Listener {
            name: "virtualInbound".into(),
            address: "0.0.0.0:15006".parse().unwrap(),
            bind: true,
            use_original_dst: true,
            direction: Direction::Inbound,
            inspect_tls: true,
            inspect_http: false,
            inspect_timeout: Some(Duration::from_secs(1)),
            continue_on_timeout: true,
            original_src_mark: None,
            chains,
            default_chain: None,
        }
    }

    fn facts(port: u16, transport: Option<&'static str>) -> ConnectionFacts {
        ConnectionFacts {
            destination: Some(SocketAddr::new([10, 0, 0, 1].into(), port)),
            transport,
            ..Default::default()
        }
    }

    #[test]
    fn most_specific_chain_wins_without_falling_back() {
        let l = listener(vec![
            chain("strict-tls", Some(9080), Some("tls")),
            chain("permissive-tls", Some(8080), Some("tls")),
            chain("permissive-raw", Some(8080), Some("raw_buffer")),
            chain("catchall", None, None),
        ]);
        let pick = |port, t| l.select(&facts(port, t)).map(|c| c.name.as_str());
        assert_eq!(pick(9080, Some("tls")), Some("strict-tls"));
        // STRICT: plaintext to the port matches no chain; the catch-all is not reconsidered.
        assert_eq!(pick(9080, Some("raw_buffer")), None);
        assert_eq!(pick(8080, Some("raw_buffer")), Some("permissive-raw"));
        assert_eq!(pick(8080, Some("tls")), Some("permissive-tls"));
        assert_eq!(pick(7000, Some("tls")), Some("catchall"));
        assert!(l.needs_inspection(&facts(8080, None)));
    }

    #[test]
    fn server_names_prefer_exact_then_longest_wildcard() {
        assert_eq!(server_name_match("a.b.c", "A.b.c"), Some(u32::MAX));
        assert_eq!(server_name_match("*.b.c", "a.b.c"), Some(4));
        assert_eq!(server_name_match("*.b.c", "b.c"), None);
    }

    /// A connection manager with RDS and the router.
    fn routed_hcm() -> HttpConnectionManager {
        HttpConnectionManager {
            route_specifier: Some(http_connection_manager::RouteSpecifier::Rds(
                Default::default(),
            )),
            http_filters: vec![envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3::HttpFilter {
                name: "envoy.filters.http.router".into(),
                ..Default::default()
            }],
            ..Default::default()
        }
    }

    fn hcm_with(f: impl FnOnce(&mut HttpConnectionManager)) -> Result<Hcm, String> {
        let mut hcm = routed_hcm();
        f(&mut hcm);
        http_connection_manager(hcm)
    }

    /// Istio's TCP metadata exchange is a filter of TCP chains; over HTTP, headers do it.
    #[test]
    fn the_tcp_metadata_exchange_goes_with_tcp_proxy_only() {
        let filter = |name: &str, any: Any| Filter {
            name: name.into(),
            config_type: Some(filter::ConfigType::TypedConfig(any)),
        };
        let exchange = || {
            let any: Any = isthmus_xds::json::from_json(serde_json::json!({
                "@type": "type.googleapis.com/udpa.type.v1.TypedStruct",
                "type_url": TCP_METADATA_EXCHANGE_TYPE_URL,
                "value": {"protocol": "istio-peer-exchange", "enable_discovery": true},
            }))
            .unwrap();
            filter("istio.metadata_exchange", any)
        };
        let terminal = |tcp: bool| {
            let any = if tcp {
                envoy_types::util::pack_any(TcpProxy {
                    stat_prefix: "inbound|7000||".into(),
                    cluster_specifier: Some(tcp_proxy::ClusterSpecifier::Cluster(
                        "inbound|7000||".into(),
                    )),
                    ..Default::default()
                })
            } else {
                envoy_types::util::pack_any(routed_hcm())
            };
            filter("terminal", any)
        };
        let compiled = |tcp: bool| {
            super::chain(&PbFilterChain {
                name: "inbound|7000||".into(),
                filters: vec![exchange(), terminal(tcp)],
                ..Default::default()
            })
        };
        match compiled(true).map(|c| c.filter) {
            Ok(NetworkFilter::Tcp {
                metadata_exchange, ..
            }) => assert_eq!(metadata_exchange.as_deref(), Some("istio-peer-exchange")),
            other => panic!("{other:?}"),
        }
        let refused = compiled(false).unwrap_err();
        assert!(
            refused.contains("istio.metadata_exchange is supported before tcp_proxy only"),
            "{refused}"
        );
    }

    #[test]
    fn the_server_header_follows_the_connection_manager() {
        let server = |f: fn(&mut HttpConnectionManager)| hcm_with(f).map(|h| h.server);
        let value = HeaderValue::from_static;
        assert_eq!(server(|_| {}), Ok(ServerHeader::Overwrite(value("envoy"))));
        assert_eq!(
            server(|h| {
                h.server_name = "istio-envoy".into();
                h.server_header_transformation = ServerHeaderTransformation::AppendIfAbsent as i32;
            }),
            Ok(ServerHeader::AppendIfAbsent(value("istio-envoy")))
        );
        assert_eq!(
            server(
                |h| h.server_header_transformation = ServerHeaderTransformation::PassThrough as i32
            ),
            Ok(ServerHeader::PassThrough)
        );
        let bad = server(|h| h.server_name = "two\nlines".into()).unwrap_err();
        assert!(bad.contains("server_name"), "{bad}");
        let bad = server(|h| h.server_header_transformation = 7).unwrap_err();
        assert!(bad.contains("server_header_transformation 7"), "{bad}");

        let mut map = http::HeaderMap::new();
        map.insert(http::header::SERVER, value("app"));
        ServerHeader::AppendIfAbsent(value("istio-envoy")).apply(&mut map);
        assert_eq!(map[http::header::SERVER], "app");
        ServerHeader::Overwrite(value("envoy")).apply(&mut map);
        assert_eq!(map[http::header::SERVER], "envoy");
        // With no router configuration, the router adds its headers (Envoy's default).
        assert!(hcm_with(|_| {}).is_ok_and(|h| h.envoy_headers));
    }
}
