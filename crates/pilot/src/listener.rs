//! LDS: a sidecar's listeners, in Istio's shape.
//!
//! - `virtualOutbound` on 15001 receives every captured outbound connection and hands it, by its
//!   original destination, to the per-port listeners below (`use_original_dst`); what matches
//!   none goes to `PassthroughCluster` (ALLOW_ANY) or `BlackHoleCluster` (REGISTRY_ONLY).
//! - Per service port, a listener that does not bind: `0.0.0.0_<port>` with the HTTP connection
//!   manager and route configuration `"<port>"` for HTTP ports, `<vip>_<port>` with a TCP proxy to
//!   `outbound|<port>||<host>` for TCP ports.
//! - `virtualInbound` on 15006: per workload port a filter chain matched on the destination
//!   port, mTLS or plaintext per PeerAuthentication (STRICT: TLS only; PERMISSIVE: both;
//!   DISABLE: plaintext only), HTTP or TCP per the port's protocol, to `inbound|<port>||`; other
//!   ports pass through to `InboundPassthroughCluster`.

use std::collections::BTreeMap;

use envoy_types::pb::envoy::config::core::v3::{
    CidrRange, TrafficDirection, TransportSocket, transport_socket,
};
use envoy_types::pb::envoy::config::listener::v3::{
    Filter, FilterChain, FilterChainMatch, Listener, ListenerFilter, filter, listener_filter,
};
use envoy_types::pb::envoy::config::route::v3::{
    Route, RouteAction, RouteConfiguration, RouteMatch, VirtualHost, route, route_action,
    route_match,
};
use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3::{
    HttpConnectionManager, HttpFilter, Rds, http_connection_manager, http_filter,
};
use envoy_types::pb::envoy::extensions::filters::network::tcp_proxy::v3::{TcpProxy, tcp_proxy};
use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::DownstreamTlsContext;
use envoy_types::pb::google::protobuf::{Any, BoolValue, UInt32Value, Value};
use envoy_types::util::pack_any;
use isthmus_registry::Protocol;

use crate::cluster::{
    ads, boolean, duration, istio_common_tls, list_value, socket, struct_value, strukt,
    tcp_metadata_exchange,
};
use crate::context::{MtlsMode, PushContext};
use crate::headers::ProxyHeaders;
use crate::names::{
    BLACKHOLE_CLUSTER, INBOUND_PASSTHROUGH_CLUSTER, INBOUND_PORT, OUTBOUND_PORT,
    PASSTHROUGH_CLUSTER, TPROXY_MARK, VIRTUAL_INBOUND, VIRTUAL_OUTBOUND, inbound_cluster,
    outbound_cluster,
};
use crate::proxy::{InterceptionMode, Proxy};
use crate::telemetry::Side;
use isthmus_xds::typed_struct::{
    METADATA_EXCHANGE_FILTER, PEER_METADATA_TYPE_URL, STATS_FILTER, STATS_TYPE_URL, TypedStruct,
};

/// Every listener of `proxy`, sorted by name.
pub fn listeners(ctx: &PushContext, proxy: &Proxy) -> Vec<Listener> {
    let mut out = shared_listeners(ctx, proxy);
    out.extend(inbound_listeners(ctx, proxy));
    out.sort_by(|a, b| a.name.cmp(&b.name));
    out
}

/// The listeners every proxy of `proxy`'s [`Scope`](crate::context::Scope) has alike: outbound
/// ones and `virtualOutbound`.
pub fn shared_listeners(ctx: &PushContext, proxy: &Proxy) -> Vec<Listener> {
    let mut out = outbound(ctx, proxy);
    out.push(virtual_outbound(ctx, proxy));
    with_telemetry(ctx, proxy, out, Side::Client)
}

/// The listeners of `proxy`'s own workload: `virtualInbound`.
pub fn inbound_listeners(ctx: &PushContext, proxy: &Proxy) -> Vec<Listener> {
    with_telemetry(ctx, proxy, vec![virtual_inbound(ctx, proxy)], Side::Server)
}

/// Access logs and Istio's stats filter on every connection manager and TCP proxy; tracing on
/// the connection managers.
fn with_telemetry(
    ctx: &PushContext,
    proxy: &Proxy,
    mut listeners: Vec<Listener>,
    side: Side,
) -> Vec<Listener> {
    let logs = crate::access_log::access_logs(ctx, proxy, side);
    let tracing = crate::trace::hcm_tracing(ctx, proxy, side);
    let stats = crate::metrics::stats_config(ctx, proxy, side).map(|config| {
        pack_any(TypedStruct {
            type_url: STATS_TYPE_URL.into(),
            value: Some(config),
        })
    });
    for l in &mut listeners {
        edit_filters(
            l,
            |hcm| {
                hcm.access_log.extend(logs.iter().cloned());
                hcm.tracing.clone_from(&tracing);
                if let Some(config) = &stats {
                    // Before the router, after the peer metadata that labels it.
                    let at = hcm.http_filters.len().saturating_sub(1);
                    hcm.http_filters.insert(
                        at,
                        HttpFilter {
                            name: STATS_FILTER.into(),
                            config_type: Some(http_filter::ConfigType::TypedConfig(config.clone())),
                            ..Default::default()
                        },
                    );
                }
            },
            |tp| tp.access_log.extend(logs.iter().cloned()),
        );
        if let Some(config) = &stats {
            for chain in l
                .filter_chains
                .iter_mut()
                .chain(l.default_filter_chain.as_mut())
            {
                if chain.filters.last().is_some_and(|f| {
                    matches!(&f.config_type, Some(filter::ConfigType::TypedConfig(a)) if a.type_url.ends_with(".TcpProxy"))
                }) {
                    let at = chain.filters.len() - 1;
                    chain.filters.insert(at, network_filter(STATS_FILTER, config.clone()));
                }
            }
        }
    }
    listeners
}

/// Changes every HTTP connection manager and TCP proxy of a listener.
fn edit_filters(
    l: &mut Listener,
    mut http: impl FnMut(&mut HttpConnectionManager),
    mut tcp: impl FnMut(&mut TcpProxy),
) {
    use prost::Message;
    for chain in l
        .filter_chains
        .iter_mut()
        .chain(l.default_filter_chain.as_mut())
    {
        for f in &mut chain.filters {
            let Some(filter::ConfigType::TypedConfig(any)) = &mut f.config_type else {
                continue;
            };
            if any.type_url.ends_with(".HttpConnectionManager")
                && let Ok(mut hcm) = HttpConnectionManager::decode(any.value.as_slice())
            {
                http(&mut hcm);
                *any = pack_any(hcm);
            } else if any.type_url.ends_with(".TcpProxy")
                && let Ok(mut tp) = TcpProxy::decode(any.value.as_slice())
            {
                tcp(&mut tp);
                *any = pack_any(tp);
            }
        }
    }
}

/// Protocols the HTTP inspector recognises, and the ALPN values of HTTP over mesh mTLS.
const SNIFFED_HTTP: &[&str] = &["http/1.1", "h2c"];
const MTLS_HTTP_ALPN: &[&str] = &[
    "h2",
    "http/1.1",
    "istio-http/1.0",
    "istio-http/1.1",
    "istio-h2",
];

/// One inbound chain variant of a port: name suffix, ALPN to match over mTLS, protocols
/// sniffed on plaintext, filters.
type Variant = (&'static str, Vec<String>, Vec<String>, Vec<Filter>);

/// MeshConfig `protocolDetectionTimeout`: how long the inspectors wait for the client to speak
/// (Istio's default: not at all, i.e. no timeout).
fn detection_timeout(ctx: &PushContext) -> Option<std::time::Duration> {
    ctx.mesh
        .protocol_detection_timeout
        .as_ref()
        .map(|d| d.as_std())
        .filter(|d| !d.is_zero())
}

fn outbound(ctx: &PushContext, proxy: &Proxy) -> Vec<Listener> {
    let mut by_name: BTreeMap<String, Listener> = BTreeMap::new();
    let headers = ctx.proxy_headers(proxy);
    for imported in ctx.services_for(proxy) {
        let svc = imported.svc;
        for port in imported.ports {
            if port.protocol == Protocol::Unknown {
                // Undeclared protocol: sniff. Per service address, HTTP (as the inspector
                // recognises it) to the port's routes, anything else to the TCP cluster.
                let name = format!("0.0.0.0_{}", port.port);
                let cluster = outbound_cluster(port.port, "", &svc.hostname);
                let l = by_name.entry(name.clone()).or_insert_with(|| Listener {
                    name: name.clone(),
                    address: Some(socket("0.0.0.0", port.port)),
                    bind_to_port: Some(BoolValue { value: false }),
                    traffic_direction: TrafficDirection::Outbound as i32,
                    listener_filters: vec![http_inspector()],
                    listener_filters_timeout: Some(duration(
                        detection_timeout(ctx).unwrap_or_default(),
                    )),
                    continue_on_listener_filters_timeout: true,
                    ..Default::default()
                });
                if !l
                    .listener_filters
                    .iter()
                    .any(|f| f.name == "envoy.filters.listener.http_inspector")
                {
                    l.listener_filters.push(http_inspector());
                    l.continue_on_listener_filters_timeout = true;
                }
                let prefix: Vec<CidrRange> = if svc.headless {
                    Vec::new()
                } else {
                    svc.addresses(proxy.dns_auto_allocate)
                        .iter()
                        .map(|v| CidrRange {
                            address_prefix: v.to_string(),
                            prefix_len: Some(UInt32Value {
                                value: if v.is_ipv4() { 32 } else { 128 },
                            }),
                        })
                        .collect()
                };
                l.filter_chains.push(FilterChain {
                    name: format!("{cluster}-http"),
                    filter_chain_match: Some(FilterChainMatch {
                        prefix_ranges: prefix.clone(),
                        application_protocols: SNIFFED_HTTP.iter().map(|s| s.to_string()).collect(),
                        ..Default::default()
                    }),
                    filters: vec![http_connection_manager_rds(
                        &headers,
                        &name,
                        &port.port.to_string(),
                    )],
                    ..Default::default()
                });
                l.filter_chains.push(FilterChain {
                    name: cluster.clone(),
                    filter_chain_match: (!prefix.is_empty()).then(|| FilterChainMatch {
                        prefix_ranges: prefix,
                        ..Default::default()
                    }),
                    filters: vec![outbound_tcp_proxy(ctx, proxy, svc, port.port)],
                    ..Default::default()
                });
            } else if port.protocol.is_http() {
                let name = format!("0.0.0.0_{}", port.port);
                // A sniffing listener for the port exists: add this port's HTTP for all.
                if let Some(l) = by_name.get_mut(&name)
                    && !l
                        .filter_chains
                        .iter()
                        .any(|c| c.filter_chain_match.is_none())
                {
                    l.filter_chains.push(FilterChain {
                        filters: vec![http_connection_manager_rds(
                            &headers,
                            &name,
                            &port.port.to_string(),
                        )],
                        ..Default::default()
                    });
                }
                by_name.entry(name.clone()).or_insert_with(|| Listener {
                    name: name.clone(),
                    address: Some(socket("0.0.0.0", port.port)),
                    filter_chains: vec![FilterChain {
                        filters: vec![http_connection_manager_rds(
                            &headers,
                            &name,
                            &port.port.to_string(),
                        )],
                        ..Default::default()
                    }],
                    bind_to_port: Some(BoolValue { value: false }),
                    traffic_direction: TrafficDirection::Outbound as i32,
                    ..Default::default()
                });
            } else if matches!(port.protocol, Protocol::Tls | Protocol::Https) {
                tls_port(ctx, proxy, svc, port.port, &mut by_name);
            } else if port.protocol != Protocol::Udp {
                let ip = service_vip(svc, proxy).unwrap_or_else(|| "0.0.0.0".to_string());
                let name = format!("{ip}_{}", port.port);
                by_name.entry(name.clone()).or_insert_with(|| Listener {
                    name: name.clone(),
                    address: Some(socket(&ip, port.port)),
                    filter_chains: vec![FilterChain {
                        filters: vec![outbound_tcp_proxy(ctx, proxy, svc, port.port)],
                        ..Default::default()
                    }],
                    bind_to_port: Some(BoolValue { value: false }),
                    traffic_direction: TrafficDirection::Outbound as i32,
                    ..Default::default()
                });
            }
        }
    }
    by_name.into_values().collect()
}

/// The address a service's own outbound listeners take: its (first) VIP; None for headless
/// and VIP-less services, whose listeners match on the port alone (`0.0.0.0`).
fn service_vip(svc: &isthmus_registry::Service, proxy: &Proxy) -> Option<String> {
    svc.addresses(proxy.dns_auto_allocate)
        .first()
        .filter(|_| !svc.headless)
        .map(ToString::to_string)
}

/// A service's TLS port, as Istio's: the TLS inspector reads the SNI, and the service's
/// VirtualService `tls` routes that apply send each SNI they name to their destinations. Without
/// such routes, the port's cluster — by the SNI of the service's host where the listener is
/// shared by every service on the port (no VIP: ServiceEntries of external HTTPS hosts), where
/// other names go to the passthrough (or blackhole) cluster.
fn tls_port(
    ctx: &PushContext,
    proxy: &Proxy,
    svc: &isthmus_registry::Service,
    port: u16,
    by_name: &mut BTreeMap<String, Listener>,
) {
    let vip = service_vip(svc, proxy);
    let ip = vip.clone().unwrap_or_else(|| "0.0.0.0".to_string());
    let name = format!("{ip}_{port}");
    let l = by_name.entry(name.clone()).or_insert_with(|| Listener {
        name,
        address: Some(socket(&ip, port)),
        bind_to_port: Some(BoolValue { value: false }),
        traffic_direction: TrafficDirection::Outbound as i32,
        ..Default::default()
    });
    if !l.listener_filters.iter().any(|f| f.name == TLS_INSPECTOR) {
        l.listener_filters.push(tls_inspector());
    }
    let mut routed = crate::route::tls_routes(ctx, proxy, svc, port);
    if routed.is_empty() {
        let sni = if vip.is_none() {
            vec![svc.hostname.clone()]
        } else {
            Vec::new()
        };
        routed.push(crate::route::TlsChain {
            server_names: sni,
            prefix_ranges: Vec::new(),
            clusters: vec![(outbound_cluster(port, "", &svc.hostname), 1)],
        });
    }
    for chain in routed {
        l.filter_chains.push(FilterChain {
            filter_chain_match: Some(FilterChainMatch {
                server_names: chain.server_names,
                prefix_ranges: chain
                    .prefix_ranges
                    .iter()
                    .map(|n| CidrRange {
                        address_prefix: n.network().to_string(),
                        prefix_len: Some(UInt32Value {
                            value: u32::from(n.prefix_len()),
                        }),
                    })
                    .collect(),
                ..Default::default()
            }),
            filters: vec![outbound_tcp_proxy_to(
                ctx,
                proxy,
                svc,
                port,
                &chain.clusters,
            )],
            ..Default::default()
        });
    }
    if vip.is_none() && l.default_filter_chain.is_none() {
        let catch_all = if ctx.outbound_allow_any(proxy) {
            PASSTHROUGH_CLUSTER
        } else {
            BLACKHOLE_CLUSTER
        };
        l.default_filter_chain = Some(FilterChain {
            name: "PassthroughFilterChain".into(),
            filters: vec![tcp_proxy_filter(catch_all, proxy)],
            ..Default::default()
        });
    }
}

const TLS_INSPECTOR: &str = "envoy.filters.listener.tls_inspector";

fn tls_inspector() -> ListenerFilter {
    listener_filter_of(
        TLS_INSPECTOR,
        pack_any(envoy_types::pb::envoy::extensions::filters::listener::tls_inspector::v3::TlsInspector::default()),
    )
}

fn virtual_outbound(ctx: &PushContext, proxy: &Proxy) -> Listener {
    let catch_all = if ctx.outbound_allow_any(proxy) {
        PASSTHROUGH_CLUSTER
    } else {
        BLACKHOLE_CLUSTER
    };
    Listener {
        name: VIRTUAL_OUTBOUND.into(),
        address: Some(socket("0.0.0.0", OUTBOUND_PORT)),
        use_original_dst: Some(BoolValue { value: true }),
        filter_chains: vec![FilterChain {
            name: "virtualOutbound-catchall-tcp".into(),
            filters: vec![tcp_proxy_filter(catch_all, proxy)],
            ..Default::default()
        }],
        listener_filters: vec![listener_filter_of(
            "envoy.filters.listener.original_dst",
            pack_any(envoy_types::pb::envoy::extensions::filters::listener::original_dst::v3::OriginalDst {}),
        )],
        traffic_direction: TrafficDirection::Outbound as i32,
        ..Default::default()
    }
}

fn virtual_inbound(ctx: &PushContext, proxy: &Proxy) -> Listener {
    let headers = ctx.proxy_headers(proxy);
    let mut chains = Vec::new();
    let mut sniffing = false;
    // Authentication first: authorization reads what it verified.
    let mut http_authz = crate::authn::http_filters(ctx, proxy);
    http_authz.extend(crate::authz::http_filters(ctx, proxy));
    // Istio's inbound TCP chains: the metadata exchange, authorization, then the proxy.
    let mut tcp_front = vec![network_filter(
        METADATA_EXCHANGE_FILTER,
        tcp_metadata_exchange(),
    )];
    tcp_front.extend(crate::authz::network_filters(ctx, proxy));
    let passthrough = || {
        let mut f = tcp_front.clone();
        f.push(tcp_proxy_filter(INBOUND_PASSTHROUGH_CLUSTER, proxy));
        f
    };
    if let Some(workload) = ctx.workload_of(proxy) {
        // Per target port: its protocol and, when a service declares it, the span name.
        let mut ports: BTreeMap<u16, (Protocol, Option<String>)> = BTreeMap::new();
        for svc in ctx.registry.services_for_workload(workload) {
            for p in &svc.ports {
                if let Some(target) = crate::endpoint::target_port(p, workload) {
                    ports.entry(target).or_insert_with(|| {
                        (
                            p.protocol,
                            Some(crate::route::trace_operation(&svc.hostname, p.port)),
                        )
                    });
                }
            }
        }
        for ing in ctx
            .sidecar_for(proxy)
            .iter()
            .flat_map(|s| s.object.spec.ingress.iter())
        {
            if let Some(p) = ing.port.as_ref()
                && let Ok(n) = u16::try_from(p.number)
            {
                ports.insert(n, (Protocol::parse(&p.protocol), None));
            }
        }
        for (port, (protocol, operation)) in ports {
            let mode = ctx.mtls_mode(&workload.namespace, &workload.labels, port);
            let cluster = inbound_cluster(port);
            let http = || {
                vec![http_connection_manager_inline(
                    &headers,
                    &cluster,
                    port,
                    operation.clone(),
                    http_authz.clone(),
                )]
            };
            let tcp = || {
                let mut f = tcp_front.clone();
                f.push(tcp_proxy_filter(&cluster, proxy));
                f
            };
            let variants: Vec<Variant> = if protocol == Protocol::Unknown {
                sniffing = true;
                vec![
                    (
                        "-http",
                        MTLS_HTTP_ALPN.iter().map(|s| s.to_string()).collect(),
                        SNIFFED_HTTP.iter().map(|s| s.to_string()).collect(),
                        http(),
                    ),
                    ("", Vec::new(), Vec::new(), tcp()),
                ]
            } else if protocol.is_http() {
                vec![("", Vec::new(), Vec::new(), http())]
            } else {
                vec![("", Vec::new(), Vec::new(), tcp())]
            };
            for (suffix, alpn, sniffed, filters) in variants {
                if mode != MtlsMode::Disable {
                    chains.push(FilterChain {
                        name: format!("{cluster}-tls{suffix}"),
                        filter_chain_match: Some(FilterChainMatch {
                            destination_port: Some(UInt32Value {
                                value: u32::from(port),
                            }),
                            transport_protocol: "tls".into(),
                            application_protocols: alpn,
                            ..Default::default()
                        }),
                        filters: filters.clone(),
                        transport_socket: Some(inbound_tls()),
                        ..Default::default()
                    });
                }
                if mode != MtlsMode::Strict {
                    chains.push(FilterChain {
                        name: format!("{cluster}{suffix}"),
                        filter_chain_match: Some(FilterChainMatch {
                            destination_port: Some(UInt32Value {
                                value: u32::from(port),
                            }),
                            transport_protocol: "raw_buffer".into(),
                            application_protocols: sniffed,
                            ..Default::default()
                        }),
                        filters,
                        ..Default::default()
                    });
                }
            }
        }
    }
    // Ports no service declares pass through, under the workload's mTLS mode (port 0 has
    // no port-level setting): STRICT accepts only mTLS there too.
    let mode = ctx.workload_of(proxy).map_or(MtlsMode::Permissive, |w| {
        ctx.mtls_mode(&w.namespace, &w.labels, 0)
    });
    if mode != MtlsMode::Disable {
        chains.push(FilterChain {
            name: "virtualInbound-catchall-tls".into(),
            filter_chain_match: Some(FilterChainMatch {
                transport_protocol: "tls".into(),
                ..Default::default()
            }),
            filters: passthrough(),
            transport_socket: Some(inbound_tls()),
            ..Default::default()
        });
    }
    if mode != MtlsMode::Strict {
        chains.push(FilterChain {
            name: "virtualInbound-catchall".into(),
            filter_chain_match: (mode == MtlsMode::Permissive).then(|| FilterChainMatch {
                transport_protocol: "raw_buffer".into(),
                ..Default::default()
            }),
            filters: passthrough(),
            ..Default::default()
        });
    }
    let mut listener_filters = vec![
        listener_filter_of(
            "envoy.filters.listener.original_dst",
            pack_any(envoy_types::pb::envoy::extensions::filters::listener::original_dst::v3::OriginalDst {}),
        ),
        tls_inspector(),
    ];
    if sniffing {
        listener_filters.push(http_inspector());
    }
    // TPROXY: connections arrive without NAT, and the app sees the caller's own address:
    // the proxy connects from it, marked so that the replies come back (Istio's 1337).
    let tproxy = proxy.interception_mode == InterceptionMode::Tproxy;
    if tproxy {
        listener_filters.push(listener_filter_of(
            "envoy.filters.listener.original_src",
            pack_any(
                envoy_types::pb::envoy::extensions::filters::listener::original_src::v3::OriginalSrc {
                    mark: TPROXY_MARK,
                    ..Default::default()
                },
            ),
        ));
    }
    Listener {
        name: VIRTUAL_INBOUND.into(),
        address: Some(socket("0.0.0.0", INBOUND_PORT)),
        use_original_dst: Some(BoolValue { value: true }),
        transparent: tproxy.then_some(BoolValue { value: true }),
        filter_chains: chains,
        listener_filters,
        listener_filters_timeout: Some(duration(std::time::Duration::from_secs(5))),
        continue_on_listener_filters_timeout: true,
        traffic_direction: TrafficDirection::Inbound as i32,
        ..Default::default()
    }
}

/// Mesh mTLS on inbound: a client certificate from the mesh is required.
fn inbound_tls() -> TransportSocket {
    let tls = DownstreamTlsContext {
        common_tls_context: Some(istio_common_tls(&[], &["h2", "http/1.1"])),
        require_client_certificate: Some(BoolValue { value: true }),
        ..Default::default()
    };
    TransportSocket {
        name: "envoy.transport_sockets.tls".into(),
        config_type: Some(transport_socket::ConfigType::TypedConfig(pack_any(tls))),
    }
}

fn http_inspector() -> ListenerFilter {
    listener_filter_of(
        "envoy.filters.listener.http_inspector",
        pack_any(envoy_types::pb::envoy::extensions::filters::listener::http_inspector::v3::HttpInspector::default()),
    )
}

fn listener_filter_of(name: &str, config: Any) -> ListenerFilter {
    ListenerFilter {
        name: name.into(),
        config_type: Some(listener_filter::ConfigType::TypedConfig(config)),
        ..Default::default()
    }
}

fn network_filter(name: &str, config: Any) -> Filter {
    Filter {
        name: name.into(),
        config_type: Some(filter::ConfigType::TypedConfig(config)),
    }
}

/// `tcp_proxy` to `cluster`, with the proxy's own idle timeout (`IDLE_TIMEOUT`), if any.
fn tcp_proxy_filter(cluster: &str, proxy: &Proxy) -> Filter {
    tcp_proxy_to(
        cluster,
        tcp_proxy::ClusterSpecifier::Cluster(cluster.into()),
        false,
        proxy.idle_timeout.map(crate::cluster::duration),
        None,
    )
}

/// `tcp_proxy` to `clusters`, its stats under `stat_prefix`; `source_ip`: consistent hashing
/// by the client's IP; `idle_timeout`: over Envoy's default hour; `max_duration`: a
/// connection's longest life.
fn tcp_proxy_to(
    stat_prefix: &str,
    clusters: tcp_proxy::ClusterSpecifier,
    source_ip: bool,
    idle_timeout: Option<envoy_types::pb::google::protobuf::Duration>,
    max_duration: Option<envoy_types::pb::google::protobuf::Duration>,
) -> Filter {
    use envoy_types::pb::envoy::r#type::v3::{HashPolicy, hash_policy};
    network_filter(
        "envoy.filters.network.tcp_proxy",
        pack_any(TcpProxy {
            stat_prefix: stat_prefix.into(),
            cluster_specifier: Some(clusters),
            hash_policy: source_ip
                .then_some(HashPolicy {
                    policy_specifier: Some(hash_policy::PolicySpecifier::SourceIp(
                        hash_policy::SourceIp {},
                    )),
                })
                .into_iter()
                .collect(),
            idle_timeout,
            max_downstream_connection_duration: max_duration,
            ..Default::default()
        }),
    )
}

/// A service port's outbound TCP proxy: to the clusters its VirtualService's `tcp` routes
/// give, by weight, else to the port's cluster.
fn outbound_tcp_proxy(
    ctx: &PushContext,
    proxy: &Proxy,
    svc: &isthmus_registry::Service,
    port: u16,
) -> Filter {
    let clusters = crate::route::tcp_clusters(ctx, proxy, svc, port);
    outbound_tcp_proxy_to(ctx, proxy, svc, port, &clusters)
}

/// A service port's outbound TCP proxy to `clusters` (weighted when more than one), named
/// after the port's cluster; by the client's IP when the service's DestinationRule hashes on
/// it (`consistentHash.useSourceIp`), as Istio sets it.
fn outbound_tcp_proxy_to(
    ctx: &PushContext,
    proxy: &Proxy,
    svc: &isthmus_registry::Service,
    port: u16,
    clusters: &[(String, u32)],
) -> Filter {
    let stat_prefix = outbound_cluster(port, "", &svc.hostname);
    let clusters = match clusters {
        [(one, _)] => tcp_proxy::ClusterSpecifier::Cluster(one.clone()),
        many => tcp_proxy::ClusterSpecifier::WeightedClusters(tcp_proxy::WeightedCluster {
            clusters: many
                .iter()
                .map(
                    |(name, weight)| tcp_proxy::weighted_cluster::ClusterWeight {
                        name: name.clone(),
                        weight: *weight,
                        ..Default::default()
                    },
                )
                .collect(),
        }),
    };
    // The DestinationRule's `connectionPool.tcp` (its top-level policy, as Istio's):
    // `idleTimeout`, else the proxy's own, over Envoy's hour; `maxConnectionDuration`.
    let tcp = ctx
        .destination_rule(&proxy.namespace, svc)
        .and_then(|dr| dr.object.spec.traffic_policy.as_ref())
        .and_then(|p| p.connection_pool.as_ref())
        .and_then(|c| c.tcp.as_ref());
    let idle = tcp
        .and_then(|t| t.idle_timeout.as_ref())
        .map(|d| d.as_std())
        .or(proxy.idle_timeout)
        .map(crate::cluster::duration);
    let max_duration = tcp
        .and_then(|t| t.max_connection_duration.as_ref())
        .map(|d| crate::cluster::duration(d.as_std()));
    tcp_proxy_to(
        &stat_prefix,
        clusters,
        crate::route::hashes_source_ip(ctx, proxy, svc),
        idle,
        max_duration,
    )
}

fn router(headers: &ProxyHeaders) -> HttpFilter {
    HttpFilter {
        name: "envoy.filters.http.router".into(),
        config_type: Some(http_filter::ConfigType::TypedConfig(pack_any(
            headers.router(),
        ))),
        ..Default::default()
    }
}

/// Istio's peer metadata filter (`istio.metadata_exchange`): inbound reads the caller's
/// `x-envoy-peer-metadata` and answers with this workload's; outbound sends this workload's
/// (not to services outside the mesh, in `IN_MESH` mode) and reads the answer's.
fn metadata_exchange(headers: &ProxyHeaders, inbound: bool) -> HttpFilter {
    let object = |fields: Vec<(&str, Value)>| struct_value(strukt(fields));
    let istio_headers =
        |settings: Vec<(&str, Value)>| object(vec![("istio_headers", object(settings))]);
    let side = if inbound { "downstream" } else { "upstream" };
    let settings = if !inbound && headers.metadata_in_mesh_only {
        vec![("skip_external_clusters", boolean(true))]
    } else {
        Vec::new()
    };
    let discovery = format!("{side}_discovery");
    let propagation = format!("{side}_propagation");
    let config = strukt([
        (
            discovery.as_str(),
            list_value(vec![
                istio_headers(Vec::new()),
                object(vec![("workload_discovery", object(Vec::new()))]),
            ]),
        ),
        (
            propagation.as_str(),
            list_value(vec![istio_headers(settings)]),
        ),
    ]);
    let typed = TypedStruct {
        type_url: PEER_METADATA_TYPE_URL.into(),
        value: Some(config),
    };
    HttpFilter {
        name: METADATA_EXCHANGE_FILTER.into(),
        config_type: Some(http_filter::ConfigType::TypedConfig(pack_any(typed))),
        // A sidecar older than this filter runs the listener without it rather than refusing
        // it: control planes are upgraded before their sidecars.
        is_optional: true,
        ..Default::default()
    }
}

/// A filter whose configuration is per route (the fault filter for VirtualService `fault`, the
/// CORS filter for `corsPolicy`): in the chain with `empty` as its own.
fn per_route_filter(name: &str, empty: Any) -> HttpFilter {
    HttpFilter {
        name: name.into(),
        config_type: Some(http_filter::ConfigType::TypedConfig(empty)),
        ..Default::default()
    }
}

fn http_connection_manager_rds(
    headers: &ProxyHeaders,
    listener: &str,
    route_config: &str,
) -> Filter {
    let mut hcm = HttpConnectionManager {
        // Istio's: the listener's direction and name (`outbound_0.0.0.0_9080`), which its
        // users' queries of `envoy_http_*` stats name.
        stat_prefix: format!("outbound_{listener}"),
        route_specifier: Some(http_connection_manager::RouteSpecifier::Rds(Rds {
            config_source: Some(ads()),
            route_config_name: route_config.into(),
        })),
        // Fault, then CORS, as in Istio's chain.
        http_filters: vec![
            per_route_filter(
                crate::route::FAULT_FILTER,
                pack_any(envoy_types::pb::envoy::extensions::filters::http::fault::v3::HttpFault::default()),
            ),
            per_route_filter(
                crate::route::CORS_FILTER,
                pack_any(envoy_types::pb::envoy::extensions::filters::http::cors::v3::Cors::default()),
            ),
            metadata_exchange(headers, false),
            router(headers),
        ],
        ..Default::default()
    };
    headers.apply(&mut hcm, false);
    network_filter(
        "envoy.filters.network.http_connection_manager",
        pack_any(hcm),
    )
}

/// Inbound HTTP: an inline route to the inbound cluster, any host, behind the authorization
/// filters.
fn http_connection_manager_inline(
    headers: &ProxyHeaders,
    cluster: &str,
    port: u16,
    operation: Option<String>,
    mut filters: Vec<HttpFilter>,
) -> Filter {
    filters.push(metadata_exchange(headers, true));
    filters.push(router(headers));
    let routes = RouteConfiguration {
        name: cluster.into(),
        virtual_hosts: vec![VirtualHost {
            name: format!("inbound|http|{port}"),
            domains: vec!["*".into()],
            routes: vec![Route {
                name: "default".into(),
                r#match: Some(RouteMatch {
                    path_specifier: Some(route_match::PathSpecifier::Prefix("/".into())),
                    ..Default::default()
                }),
                action: Some(route::Action::Route(RouteAction {
                    cluster_specifier: Some(route_action::ClusterSpecifier::Cluster(
                        cluster.into(),
                    )),
                    timeout: Some(duration(std::time::Duration::ZERO)),
                    ..Default::default()
                })),
                decorator: operation.map(crate::route::decorator),
                ..Default::default()
            }],
            ..Default::default()
        }],
        validate_clusters: Some(BoolValue { value: false }),
        ..Default::default()
    };
    let mut hcm = HttpConnectionManager {
        stat_prefix: format!("inbound_0.0.0.0_{port}"),
        route_specifier: Some(http_connection_manager::RouteSpecifier::RouteConfig(routes)),
        http_filters: filters,
        ..Default::default()
    };
    // Istio's inbound: `istio-envoy`, and the caller's identity reaches the app in XFCC.
    headers.apply(&mut hcm, true);
    network_filter(
        "envoy.filters.network.http_connection_manager",
        pack_any(hcm),
    )
}
