//! RDS: the outbound HTTP route configurations of a sidecar, one per port (named `"9080"`), as
//! Istio builds them.
//!
//! Each service with an HTTP port gets a virtual host whose domains are every hostname form the
//! caller may use (seed 004: the bare name only from the service's own namespace; each with and
//! without `:port`; the cluster IPs). A VirtualService for the host replaces the default route
//! with its own matches and destinations. A headless service matches any host on its port (the
//! pod hostnames and pod IPs of seed 004 go to its ORIGINAL_DST cluster). Last comes
//! `allow_any` (PassthroughCluster) or, under REGISTRY_ONLY, a 502 to the BlackHoleCluster.

use std::collections::BTreeMap;

use envoy_types::pb::envoy::config::core::v3::{
    DataSource, HeaderValue, HeaderValueOption, Metadata, RuntimeFractionalPercent, data_source,
};
use envoy_types::pb::envoy::config::route::v3::route_action::{
    self, ClusterSpecifier, HostRewriteSpecifier, RequestMirrorPolicy,
};
use envoy_types::pb::envoy::config::route::v3::weighted_cluster::{ClusterWeight, cluster_weight};
use envoy_types::pb::envoy::config::route::v3::{
    Decorator, DirectResponseAction, HeaderMatcher, QueryParameterMatcher, RedirectAction,
    RetryPolicy, Route, RouteAction, RouteConfiguration, RouteMatch, VirtualHost, WeightedCluster,
    header_matcher, query_parameter_matcher, redirect_action, route, route_match,
};
use envoy_types::pb::envoy::r#type::matcher::v3::{
    RegexMatchAndSubstitute, RegexMatcher, StringMatcher, string_matcher,
};
use envoy_types::pb::google::protobuf::{Duration as PbDuration, UInt32Value};
use isthmus_config::Entry;
use isthmus_config::istio::networking::{
    CorsPolicy, Destination, HeaderOperations, Headers, HttpMatchRequest, HttpRoute,
    RouteDestination, StringMatch,
};
use isthmus_config::resource::VirtualService;
use isthmus_registry::Service;
use isthmus_registry::host::{host_matches, resolve_config_host, virtual_host_domains};

use crate::cluster::duration as pb;
use crate::context::PushContext;
use crate::names::{PASSTHROUGH_CLUSTER, config_path, outbound_cluster};
use crate::proxy::Proxy;
use envoy_types::pb::envoy::extensions::filters::http::cors::v3::CorsPolicy as EnvoyCors;
use envoy_types::pb::envoy::extensions::filters::http::fault::v3::HttpFault;
use envoy_types::util::pack_any;
use isthmus_registry::Protocol;

/// The route configurations for the requested names (all of the proxy's HTTP ports when
/// `names` is empty), sorted by name.
pub fn routes(ctx: &PushContext, proxy: &Proxy, names: &[String]) -> Vec<RouteConfiguration> {
    let mut ports: BTreeMap<u16, Vec<&Service>> = BTreeMap::new();
    for imported in ctx.services_for(proxy) {
        // Sniffed ports route their HTTP too.
        for p in imported
            .ports
            .iter()
            .filter(|p| p.protocol.is_http() || p.protocol == Protocol::Unknown)
        {
            ports.entry(p.port).or_default().push(imported.svc);
        }
    }
    ports
        .into_iter()
        .filter(|(port, _)| names.is_empty() || names.iter().any(|n| n == &port.to_string()))
        .map(|(port, svcs)| route_config(ctx, proxy, port, &svcs))
        .collect()
}

fn route_config(
    ctx: &PushContext,
    proxy: &Proxy,
    port: u16,
    svcs: &[&Service],
) -> RouteConfiguration {
    let mut vhosts: Vec<VirtualHost> = Vec::new();
    let mut headless_wildcard = None;
    let attempt_count = ctx.proxy_headers(proxy).attempt_count;
    for svc in svcs {
        // A VirtualService without HTTP routes for this sidecar and port (only `tcp` or `tls`
        // routes, or matches for other ports or sources) leaves the default route, as Istio's.
        let routed: Vec<Route> = virtual_service_for(ctx, proxy, svc)
            .map(|vs| {
                let config = config_metadata(vs);
                vs.object
                    .spec
                    .http
                    .iter()
                    .filter(|r| applies_to_sidecar(ctx, proxy, r, port))
                    .flat_map(|r| http_routes(ctx, proxy, r, port, vs.namespace()))
                    .map(|mut route| {
                        route.decorator = Some(decorator(route_operation(&route, vs.name(), port)));
                        route.metadata = Some(config.clone());
                        route
                    })
                    .collect()
            })
            .unwrap_or_default();
        let routes = match routed {
            some if !some.is_empty() => some,
            _ => vec![Route {
                decorator: Some(decorator(trace_operation(&svc.hostname, port))),
                ..default_route(
                    &outbound_cluster(port, "", &svc.hostname),
                    hash_policy(
                        ctx,
                        proxy,
                        &Destination {
                            host: svc.hostname.clone(),
                            ..Default::default()
                        },
                        &svc.namespace,
                    ),
                )
            }],
        };
        if svc.headless && svc.is_kubernetes() && headless_wildcard.is_none() {
            headless_wildcard = Some(outbound_cluster(port, "", &svc.hostname));
        }
        vhosts.push(VirtualHost {
            name: format!("{}:{port}", svc.hostname),
            domains: virtual_host_domains(
                &svc.hostname,
                &svc.namespace,
                &proxy.namespace,
                ctx.domain(),
                port,
                svc.addresses(proxy.dns_auto_allocate),
            ),
            routes,
            include_request_attempt_count: attempt_count,
            ..Default::default()
        });
    }
    vhosts.sort_by(|a, b| a.name.cmp(&b.name));
    let fallback = if ctx.outbound_allow_any(proxy) {
        VirtualHost {
            name: "allow_any".into(),
            domains: vec!["*".into()],
            routes: vec![Route {
                name: "allow_any".into(),
                r#match: Some(prefix_match("/")),
                action: Some(route::Action::Route(RouteAction {
                    cluster_specifier: Some(ClusterSpecifier::Cluster(
                        headless_wildcard.unwrap_or_else(|| PASSTHROUGH_CLUSTER.into()),
                    )),
                    timeout: Some(PbDuration::default()),
                    ..Default::default()
                })),
                ..Default::default()
            }],
            include_request_attempt_count: attempt_count,
            ..Default::default()
        }
    } else {
        VirtualHost {
            name: "block_all".into(),
            domains: vec!["*".into()],
            routes: vec![Route {
                name: "block_all".into(),
                r#match: Some(prefix_match("/")),
                action: Some(route::Action::DirectResponse(DirectResponseAction {
                    status: 502,
                    ..Default::default()
                })),
                ..Default::default()
            }],
            include_request_attempt_count: attempt_count,
            ..Default::default()
        }
    };
    vhosts.push(fallback);
    RouteConfiguration {
        name: port.to_string(),
        virtual_hosts: vhosts,
        validate_clusters: Some(envoy_types::pb::google::protobuf::BoolValue { value: false }),
        ..Default::default()
    }
}

/// The VirtualService bound to the mesh gateway whose hosts include the service, visible to the
/// proxy's namespace; the oldest wins, as in Istio.
fn virtual_service_for<'a>(
    ctx: &'a PushContext,
    proxy: &Proxy,
    svc: &Service,
) -> Option<&'a Entry<VirtualService>> {
    ctx.snapshot
        .virtual_services
        .iter()
        .filter(|vs| {
            let spec = &vs.object.spec;
            let mesh_bound = spec.gateways.is_empty() || spec.gateways.iter().any(|g| g == "mesh");
            let exported = spec.export_to.is_empty()
                || spec.export_to.iter().any(|e| {
                    e == "*"
                        || e == &proxy.namespace
                        || (e == "." && vs.namespace() == proxy.namespace)
                });
            mesh_bound
                && exported
                && spec.hosts.iter().any(|h| {
                    let h = resolve_config_host(h, vs.namespace(), ctx.domain());
                    host_matches(&h, &svc.hostname)
                })
        })
        .map(|vs| &**vs)
        .next()
}

/// The span name of a service's requests on a port, as Istio's decorators write it.
pub fn trace_operation(host: &str, port: u16) -> String {
    format!("{host}:{port}/*")
}

pub fn decorator(operation: String) -> Decorator {
    Decorator {
        operation,
        ..Default::default()
    }
}

/// A VirtualService route's span name: its one destination's host (else the VirtualService's
/// name), the port, and the path its match covers.
fn route_operation(r: &Route, vs_name: &str, port: u16) -> String {
    let path = match r.r#match.as_ref().and_then(|m| m.path_specifier.as_ref()) {
        Some(route_match::PathSpecifier::Prefix(p)) => format!("{p}*"),
        Some(route_match::PathSpecifier::Path(p)) => p.clone(),
        Some(route_match::PathSpecifier::SafeRegex(r)) => r.regex.clone(),
        _ => "/*".to_string(),
    };
    let host = match &r.action {
        Some(route::Action::Route(RouteAction {
            cluster_specifier: Some(ClusterSpecifier::Cluster(c)),
            ..
        })) => c
            .rsplit('|')
            .next()
            .filter(|h| !h.is_empty() && c.starts_with("outbound|")),
        _ => None,
    };
    format!("{}:{port}{path}", host.unwrap_or(vs_name))
}

/// `filter_metadata.istio.config` naming the VirtualService a route comes from, as Istio marks
/// it.
fn config_metadata(vs: &Entry<VirtualService>) -> Metadata {
    let path = config_path("virtual-service", vs.namespace(), vs.name());
    Metadata {
        filter_metadata: crate::maps::map_of([(
            "istio".to_string(),
            crate::cluster::strukt([("config", crate::cluster::string(&path))]),
        )]),
        ..Default::default()
    }
}

/// Routes whose matches are all for another port, bound to gateways only, or for other
/// sources do not apply.
fn applies_to_sidecar(ctx: &PushContext, proxy: &Proxy, r: &HttpRoute, port: u16) -> bool {
    r.matches.is_empty()
        || r.matches
            .iter()
            .any(|m| applies(ctx, proxy, port, &http_conditions(m)))
}

fn http_conditions(m: &HttpMatchRequest) -> Conditions<'_> {
    Conditions {
        port: m.port,
        gateways: &m.gateways,
        source_labels: &m.source_labels,
        source_namespace: &m.source_namespace,
    }
}

fn default_route(cluster: &str, hash_policy: Vec<route_action::HashPolicy>) -> Route {
    Route {
        name: "default".into(),
        r#match: Some(prefix_match("/")),
        action: Some(route::Action::Route(RouteAction {
            cluster_specifier: Some(ClusterSpecifier::Cluster(cluster.into())),
            // Istio disables Envoy's 15 s default: no timeout unless a VirtualService sets one.
            timeout: Some(PbDuration::default()),
            retry_policy: Some(default_retries()),
            hash_policy,
            ..Default::default()
        })),
        ..Default::default()
    }
}

/// Istio's default retry policy: 2 attempts on connection-level failures.
fn default_retries() -> RetryPolicy {
    RetryPolicy {
        retry_on: "connect-failure,refused-stream,unavailable,cancelled,retriable-status-codes"
            .into(),
        num_retries: Some(UInt32Value { value: 2 }),
        host_selection_retry_max_attempts: 5,
        retriable_status_codes: vec![503],
        ..Default::default()
    }
}

/// A VirtualService HTTP route as Istio's: one Envoy route per match that applies (the matches
/// are alternatives), each named `<route>.<match>` when the match has a name; one for every
/// request when it has no match.
fn http_routes(
    ctx: &PushContext,
    proxy: &Proxy,
    r: &HttpRoute,
    port: u16,
    vs_ns: &str,
) -> Vec<Route> {
    let route = http_route(ctx, proxy, r, port, vs_ns);
    if r.matches.is_empty() {
        return vec![Route {
            r#match: Some(prefix_match("/")),
            ..route
        }];
    }
    r.matches
        .iter()
        .filter(|m| applies(ctx, proxy, port, &http_conditions(m)))
        .map(|m| Route {
            name: if m.name.is_empty() {
                r.name.clone()
            } else {
                format!("{}.{}", r.name, m.name)
            },
            r#match: Some(route_match_of(m)),
            ..route.clone()
        })
        .collect()
}

/// A VirtualService HTTP route's action and edits, without its match.
fn http_route(ctx: &PushContext, proxy: &Proxy, r: &HttpRoute, port: u16, vs_ns: &str) -> Route {
    let action = if let Some(redirect) = &r.redirect {
        route::Action::Redirect(RedirectAction {
            host_redirect: redirect.authority.clone(),
            // Envoy cannot take the port from the request, but the route is the listener
            // port's: `FROM_REQUEST_PORT` is that port, as Istio writes it. Envoy's own
            // choice is the protocol's default (`FROM_PROTOCOL_DEFAULT`).
            port_redirect: match (redirect.port, redirect.derive_port.as_deref()) {
                (Some(p), _) => p,
                (None, Some("FROM_REQUEST_PORT")) => u32::from(port),
                _ => 0,
            },
            scheme_rewrite_specifier: (!redirect.scheme.is_empty()).then(|| {
                redirect_action::SchemeRewriteSpecifier::SchemeRedirect(redirect.scheme.clone())
            }),
            response_code: match redirect.redirect_code {
                302 => redirect_action::RedirectResponseCode::Found as i32,
                303 => redirect_action::RedirectResponseCode::SeeOther as i32,
                307 => redirect_action::RedirectResponseCode::TemporaryRedirect as i32,
                308 => redirect_action::RedirectResponseCode::PermanentRedirect as i32,
                _ => redirect_action::RedirectResponseCode::MovedPermanently as i32,
            },
            path_rewrite_specifier: (!redirect.uri.is_empty())
                .then(|| redirect_action::PathRewriteSpecifier::PathRedirect(redirect.uri.clone())),
            ..Default::default()
        })
    } else if let Some(direct) = &r.direct_response {
        route::Action::DirectResponse(DirectResponseAction {
            status: direct.status,
            body: direct
                .body
                .as_ref()
                .and_then(|b| b.string.clone())
                .map(|s| DataSource {
                    specifier: Some(data_source::Specifier::InlineString(s)),
                    ..Default::default()
                }),
            ..Default::default()
        })
    } else {
        route::Action::Route(route_action(ctx, proxy, r, port, vs_ns))
    };
    // The route's header operations, and its one destination's (Istio's merge of the two;
    // the destinations of a split have theirs on their weighted clusters).
    let edits = HeaderEdits::of(r.headers.iter().chain(match r.route.as_slice() {
        [one] => one.headers.as_ref(),
        _ => None,
    }));
    let mut action = action;
    if let (route::Action::Route(ra), Some(host)) = (&mut action, &edits.authority)
        && ra.host_rewrite_specifier.is_none()
    {
        ra.host_rewrite_specifier = Some(HostRewriteSpecifier::HostRewriteLiteral(host.clone()));
    }
    Route {
        name: r.name.clone(),
        action: Some(action),
        typed_per_filter_config: crate::maps::map_of(
            r.fault
                .as_ref()
                .map(|f| (FAULT_FILTER.to_string(), pack_any(fault(f))))
                .into_iter()
                .chain(
                    r.cors_policy
                        .as_ref()
                        .map(|c| (CORS_FILTER.to_string(), pack_any(cors(c)))),
                ),
        ),
        request_headers_to_add: edits.request_add,
        request_headers_to_remove: edits.request_remove,
        response_headers_to_add: edits.response_add,
        response_headers_to_remove: edits.response_remove,
        ..Default::default()
    }
}

/// VirtualService `headers` as Envoy's header edits, as Istio translates them: `set` replaces
/// any value and `add` goes beside it; an `:authority` or `host` set or add becomes the host
/// rewrite, and pseudo-headers and `host` are left out of the lists (Envoy refuses them).
#[derive(Debug, Default)]
struct HeaderEdits {
    request_add: Vec<HeaderValueOption>,
    request_remove: Vec<String>,
    response_add: Vec<HeaderValueOption>,
    response_remove: Vec<String>,
    authority: Option<String>,
}

impl HeaderEdits {
    fn of<'a>(all: impl Iterator<Item = &'a Headers>) -> HeaderEdits {
        let mut edits = HeaderEdits::default();
        for h in all {
            if let Some(req) = &h.request {
                edits.authority = req
                    .set
                    .iter()
                    .chain(&req.add)
                    .filter(|(k, _)| {
                        k.eq_ignore_ascii_case(":authority") || k.eq_ignore_ascii_case("host")
                    })
                    .map(|(_, v)| v.clone())
                    .next_back()
                    .or(edits.authority.take());
                edits.request_add.extend(header_adds(req));
                edits
                    .request_remove
                    .extend(req.remove.iter().filter(|n| modifiable(n)).cloned());
            }
            if let Some(resp) = &h.response {
                edits.response_add.extend(header_adds(resp));
                edits
                    .response_remove
                    .extend(resp.remove.iter().filter(|n| modifiable(n)).cloned());
            }
        }
        edits
    }
}

/// Envoy edits neither pseudo-headers nor `host`.
fn modifiable(name: &str) -> bool {
    !name.starts_with(':') && !name.eq_ignore_ascii_case("host")
}

/// A VirtualService's `set` (replacing any value) and `add` (beside any value) headers.
fn header_adds(ops: &HeaderOperations) -> Vec<HeaderValueOption> {
    use envoy_types::pb::envoy::config::core::v3::header_value_option::HeaderAppendAction;
    let option = |(key, value): (&String, &String), action: HeaderAppendAction| HeaderValueOption {
        header: Some(HeaderValue {
            key: key.clone(),
            value: value.clone(),
            ..Default::default()
        }),
        append_action: action as i32,
        ..Default::default()
    };
    ops.set
        .iter()
        .map(|kv| option(kv, HeaderAppendAction::OverwriteIfExistsOrAdd))
        .chain(
            ops.add
                .iter()
                .map(|kv| option(kv, HeaderAppendAction::AppendIfExistsOrAdd)),
        )
        .filter(|o| o.header.as_ref().is_some_and(|h| modifiable(&h.key)))
        .collect()
}

pub const FAULT_FILTER: &str = "envoy.filters.http.fault";
pub const CORS_FILTER: &str = "envoy.filters.http.cors";

/// A VirtualService `corsPolicy` as Envoy's per-route CORS policy, as Istio writes it.
fn cors(c: &CorsPolicy) -> EnvoyCors {
    use envoy_types::pb::envoy::config::core::v3::RuntimeFractionalPercent;
    use envoy_types::pb::envoy::r#type::v3::{FractionalPercent, fractional_percent};
    use envoy_types::pb::google::protobuf::BoolValue;
    let exact = |o: &String| StringMatch {
        exact: Some(o.clone()),
        ..Default::default()
    };
    let origins: Vec<StringMatch> = if c.allow_origins.is_empty() {
        // The deprecated `allowOrigin`: exact origins.
        c.allow_origin.iter().map(exact).collect()
    } else {
        c.allow_origins.clone()
    };
    EnvoyCors {
        allow_origin_string_match: origins.iter().map(string).collect(),
        allow_methods: c.allow_methods.join(","),
        allow_headers: c.allow_headers.join(","),
        expose_headers: c.expose_headers.join(","),
        max_age: c
            .max_age
            .as_ref()
            .map(|d| d.as_std().as_secs().to_string())
            .unwrap_or_default(),
        allow_credentials: c.allow_credentials.map(|value| BoolValue { value }),
        filter_enabled: Some(RuntimeFractionalPercent {
            default_value: Some(FractionalPercent {
                numerator: 100,
                denominator: fractional_percent::DenominatorType::Hundred as i32,
            }),
            ..Default::default()
        }),
        // Istio forwards preflights from other origins to the app unless told to ignore them.
        forward_not_matching_preflights: Some(BoolValue {
            value: c.unmatched_preflights.as_deref() != Some("IGNORE"),
        }),
        ..Default::default()
    }
}

/// Istio's percentage (a double, or the legacy integer; 100 when unset) as Envoy's parts per
/// million.
fn fraction(
    p: Option<&isthmus_config::istio::networking::Percent>,
    legacy: Option<f64>,
) -> envoy_types::pb::envoy::r#type::v3::FractionalPercent {
    use envoy_types::pb::envoy::r#type::v3::{FractionalPercent, fractional_percent};
    let value = p.map(|p| p.value).or(legacy).unwrap_or(100.0);
    FractionalPercent {
        numerator: (value.clamp(0.0, 100.0) * 10_000.0).round() as u32,
        denominator: fractional_percent::DenominatorType::Million as i32,
    }
}

/// A VirtualService `fault` as Envoy's per-route fault filter configuration.
fn fault(f: &isthmus_config::istio::networking::HttpFaultInjection) -> HttpFault {
    use envoy_types::pb::envoy::extensions::filters::common::fault::v3::{
        FaultDelay as EnvoyDelay, fault_delay,
    };
    use envoy_types::pb::envoy::extensions::filters::http::fault::v3::{
        FaultAbort as EnvoyAbort, fault_abort,
    };
    let percent = |p: Option<&isthmus_config::istio::networking::Percent>, legacy: Option<i32>| {
        Some(fraction(p, legacy.map(f64::from)))
    };
    HttpFault {
        delay: f.delay.as_ref().and_then(|d| {
            Some(EnvoyDelay {
                fault_delay_secifier: Some(fault_delay::FaultDelaySecifier::FixedDelay(pb(d
                    .fixed_delay
                    .as_ref()?
                    .as_std()))),
                percentage: percent(d.percentage.as_ref(), d.percent),
            })
        }),
        abort: f.abort.as_ref().and_then(|a| {
            Some(EnvoyAbort {
                error_type: Some(fault_abort::ErrorType::HttpStatus(
                    u32::try_from(a.http_status?).ok()?,
                )),
                percentage: percent(a.percentage.as_ref(), None),
                ..Default::default()
            })
        }),
        ..Default::default()
    }
}

/// The cluster of a VirtualService destination: its host as the VirtualService's namespace
/// resolves it, its subset, and its port — else the service's only port, else `port`, the one
/// being routed.
fn destination_cluster(
    ctx: &PushContext,
    proxy: &Proxy,
    d: &Destination,
    port: u16,
    vs_ns: &str,
) -> String {
    let host = resolve_config_host(&d.host, vs_ns, ctx.domain());
    let dport = d
        .port
        .as_ref()
        .and_then(|p| u16::try_from(p.number).ok())
        .or_else(|| {
            ctx.registry
                .services_by_host(&host)
                .find(|s| s.visible_to(&proxy.namespace, &ctx.mesh.default_service_export_to))
                .and_then(|s| (s.ports.len() == 1).then(|| s.ports[0].port))
        })
        .unwrap_or(port);
    outbound_cluster(dport, &d.subset, &host)
}

/// A route's destinations as clusters and weights, each with what goes with it: those of
/// weight 0 left out, unless all are (then each weighs 1), as Istio's.
fn weighted_destinations<'a, T>(
    ctx: &PushContext,
    proxy: &Proxy,
    destinations: impl Iterator<Item = (&'a Destination, i32, T)> + Clone,
    port: u16,
    vs_ns: &str,
) -> Vec<(String, u32, T)> {
    let all_zero = destinations.clone().all(|(_, w, _)| w <= 0);
    destinations
        .filter(|(_, w, _)| all_zero || *w > 0)
        .map(|(d, w, with)| {
            let weight = if all_zero {
                1
            } else {
                u32::try_from(w).unwrap_or(0)
            };
            (
                destination_cluster(ctx, proxy, d, port, vs_ns),
                weight,
                with,
            )
        })
        .collect()
}

/// The clusters and weights of a `tcp` or `tls` route.
fn route_clusters(
    ctx: &PushContext,
    proxy: &Proxy,
    route: &[RouteDestination],
    port: u16,
    vs_ns: &str,
) -> Vec<(String, u32)> {
    weighted_destinations(
        ctx,
        proxy,
        route.iter().map(|d| (&d.destination, d.weight, ())),
        port,
        vs_ns,
    )
    .into_iter()
    .map(|(cluster, weight, ())| (cluster, weight))
    .collect()
}

/// The clusters a service port's TCP connections go to, with their weights: those of the
/// first `tcp` route of the service's VirtualService that applies to this sidecar on the
/// port (Istio's TCP traffic shifting), else the port's own cluster.
pub(crate) fn tcp_clusters(
    ctx: &PushContext,
    proxy: &Proxy,
    svc: &Service,
    port: u16,
) -> Vec<(String, u32)> {
    if let Some(vs) = virtual_service_for(ctx, proxy, svc) {
        let route = vs.object.spec.tcp.iter().find(|r| {
            r.matches.is_empty()
                || r.matches.iter().any(|m| {
                    applies(
                        ctx,
                        proxy,
                        port,
                        &Conditions {
                            port: m.port,
                            gateways: &m.gateways,
                            source_labels: &m.source_labels,
                            source_namespace: &m.source_namespace,
                        },
                    ) && within(&m.destination_subnets, svc, proxy)
                })
        });
        if let Some(r) = route.filter(|r| !r.route.is_empty()) {
            return route_clusters(ctx, proxy, &r.route, port, vs.namespace());
        }
    }
    vec![(outbound_cluster(port, "", &svc.hostname), 1)]
}

/// `destinationSubnets` of a TCP match: none, or one holding an address of the service (its
/// listener takes no other destination).
fn within(subnets: &[String], svc: &Service, proxy: &Proxy) -> bool {
    subnets.is_empty()
        || subnets.iter().filter_map(|s| subnet(s)).any(|n| {
            svc.addresses(proxy.dns_auto_allocate)
                .iter()
                .any(|a| n.contains(a))
        })
}

/// A `destinationSubnets` entry: a CIDR or one address (validation has refused the rest).
fn subnet(s: &str) -> Option<ipnet::IpNet> {
    s.parse::<ipnet::IpNet>()
        .or_else(|_| s.parse::<std::net::IpAddr>().map(ipnet::IpNet::from))
        .ok()
}

/// One filter chain of a service's TLS port: the SNIs and destination subnets it matches (any,
/// when empty), and where its connections go, by weight.
pub(crate) struct TlsChain {
    pub server_names: Vec<String>,
    pub prefix_ranges: Vec<ipnet::IpNet>,
    pub clusters: Vec<(String, u32)>,
}

/// The chains of the `tls` routes of a service's VirtualService on `port`: one per match that
/// applies to this sidecar, in order; a match like an earlier one adds nothing (Envoy refuses
/// listeners with the same match twice).
pub(crate) fn tls_routes(
    ctx: &PushContext,
    proxy: &Proxy,
    svc: &Service,
    port: u16,
) -> Vec<TlsChain> {
    let Some(vs) = virtual_service_for(ctx, proxy, svc) else {
        return Vec::new();
    };
    let mut out: Vec<TlsChain> = Vec::new();
    for r in vs.object.spec.tls.iter().filter(|r| !r.route.is_empty()) {
        let clusters = route_clusters(ctx, proxy, &r.route, port, vs.namespace());
        for m in &r.matches {
            let conditions = Conditions {
                port: m.port,
                gateways: &m.gateways,
                source_labels: &m.source_labels,
                source_namespace: &m.source_namespace,
            };
            if !applies(ctx, proxy, port, &conditions) {
                continue;
            }
            let chain = TlsChain {
                server_names: m.sni_hosts.clone(),
                prefix_ranges: m
                    .destination_subnets
                    .iter()
                    .filter_map(|s| subnet(s))
                    .collect(),
                clusters: clusters.clone(),
            };
            if !out.iter().any(|c| {
                c.server_names == chain.server_names && c.prefix_ranges == chain.prefix_ranges
            }) {
                out.push(chain);
            }
        }
    }
    out
}

/// What a route match asks of the sidecar, beyond the request itself.
struct Conditions<'a> {
    port: u32,
    gateways: &'a [String],
    source_labels: &'a BTreeMap<String, String>,
    source_namespace: &'a str,
}

/// Whether a match applies to this sidecar on `port`: its port if it names one, the mesh if
/// it names gateways, and the proxy's workload labels and namespace if it names a source.
fn applies(ctx: &PushContext, proxy: &Proxy, port: u16, c: &Conditions<'_>) -> bool {
    (c.port == 0 || c.port == u32::from(port))
        && (c.gateways.is_empty() || c.gateways.iter().any(|g| g == "mesh"))
        && from_source(ctx, proxy, c.source_labels, c.source_namespace)
}

/// Whether `sourceLabels` and `sourceNamespace` select this proxy.
fn from_source(
    ctx: &PushContext,
    proxy: &Proxy,
    labels: &BTreeMap<String, String>,
    namespace: &str,
) -> bool {
    (namespace.is_empty() || namespace == proxy.namespace)
        && (labels.is_empty()
            || ctx
                .workload_of(proxy)
                .is_some_and(|w| labels.iter().all(|(k, v)| w.labels.get(k) == Some(v))))
}

/// Which of the VirtualServices' route matches with `sourceLabels` select this proxy: its
/// routes and TCP proxies differ from those of its namespace's other proxies by that alone.
pub(crate) fn source_selections(ctx: &PushContext, proxy: &Proxy) -> Vec<bool> {
    let mut out = Vec::new();
    for vs in &ctx.snapshot.virtual_services {
        let spec = &vs.object.spec;
        let http = spec
            .http
            .iter()
            .flat_map(|r| &r.matches)
            .map(|m| &m.source_labels);
        let tcp = spec
            .tcp
            .iter()
            .flat_map(|r| &r.matches)
            .map(|m| &m.source_labels);
        let tls = spec
            .tls
            .iter()
            .flat_map(|r| &r.matches)
            .map(|m| &m.source_labels);
        for labels in http.chain(tcp).chain(tls).filter(|l| !l.is_empty()) {
            out.push(from_source(ctx, proxy, labels, ""));
        }
    }
    out
}

fn route_action(
    ctx: &PushContext,
    proxy: &Proxy,
    r: &HttpRoute,
    port: u16,
    vs_ns: &str,
) -> RouteAction {
    let weighted = weighted_destinations(
        ctx,
        proxy,
        r.route
            .iter()
            .map(|d| (&d.destination, d.weight, d.headers.as_ref())),
        port,
        vs_ns,
    );
    let specifier = match weighted.as_slice() {
        [(one, _, _)] => ClusterSpecifier::Cluster(one.clone()),
        // Each destination of a split with its own header operations, as Istio's.
        many => ClusterSpecifier::WeightedClusters(WeightedCluster {
            clusters: many
                .iter()
                .map(|(name, weight, headers)| {
                    let edits = HeaderEdits::of(headers.iter().copied());
                    ClusterWeight {
                        name: name.clone(),
                        weight: Some(UInt32Value { value: *weight }),
                        request_headers_to_add: edits.request_add,
                        request_headers_to_remove: edits.request_remove,
                        response_headers_to_add: edits.response_add,
                        response_headers_to_remove: edits.response_remove,
                        host_rewrite_specifier: edits
                            .authority
                            .map(cluster_weight::HostRewriteSpecifier::HostRewriteLiteral),
                        ..Default::default()
                    }
                })
                .collect(),
            ..Default::default()
        }),
    };
    let hash_policy = r
        .route
        .first()
        .map(|d| hash_policy(ctx, proxy, &d.destination, vs_ns))
        .unwrap_or_default();
    let retry_policy = match &r.retries {
        Some(retries) if retries.attempts == 0 => None,
        Some(retries) => Some(RetryPolicy {
            retry_on: if retries.retry_on.is_empty() {
                default_retries().retry_on
            } else {
                retries.retry_on.clone()
            },
            num_retries: Some(UInt32Value {
                value: u32::try_from(retries.attempts).unwrap_or(0),
            }),
            per_try_timeout: retries.per_try_timeout.as_ref().map(|d| pb(d.as_std())),
            host_selection_retry_max_attempts: 5,
            retriable_status_codes: vec![503],
            ..Default::default()
        }),
        None => Some(default_retries()),
    };
    let rewrite = r.rewrite.as_ref();
    RouteAction {
        cluster_specifier: Some(specifier),
        timeout: Some(
            r.timeout
                .as_ref()
                .map_or_else(PbDuration::default, |d| pb(d.as_std())),
        ),
        retry_policy,
        hash_policy,
        prefix_rewrite: rewrite.map(|w| w.uri.clone()).unwrap_or_default(),
        regex_rewrite: rewrite
            .and_then(|w| w.uri_regex_rewrite.as_ref())
            .map(|rr| RegexMatchAndSubstitute {
                pattern: Some(regex(&rr.match_)),
                substitution: rr.rewrite.clone(),
            }),
        host_rewrite_specifier: rewrite
            .filter(|w| !w.authority.is_empty())
            .map(|w| HostRewriteSpecifier::HostRewriteLiteral(w.authority.clone())),
        // `mirror` with `mirrorPercentage` (or the legacy `mirrorPercent`), and `mirrors`.
        request_mirror_policies: r
            .mirror
            .iter()
            .map(|m| {
                let legacy = r.mirror_percent.map(f64::from);
                (m, fraction(r.mirror_percentage.as_ref(), legacy))
            })
            .chain(
                r.mirrors
                    .iter()
                    .map(|m| (&m.destination, fraction(m.percentage.as_ref(), None))),
            )
            .map(|(d, share)| RequestMirrorPolicy {
                cluster: destination_cluster(ctx, proxy, d, port, vs_ns),
                runtime_fraction: Some(RuntimeFractionalPercent {
                    default_value: Some(share),
                    ..Default::default()
                }),
                ..Default::default()
            })
            .collect(),
        ..Default::default()
    }
}

/// Whether `svc`'s DestinationRule (for `proxy`) hashes on the client's IP.
pub(crate) fn hashes_source_ip(ctx: &PushContext, proxy: &Proxy, svc: &Service) -> bool {
    let d = Destination {
        host: svc.hostname.clone(),
        ..Default::default()
    };
    hash_policy(ctx, proxy, &d, &svc.namespace).iter().any(|h| {
        matches!(
            &h.policy_specifier,
            Some(route_action::hash_policy::PolicySpecifier::ConnectionProperties(c)) if c.source_ip
        )
    })
}

/// The hash policy of a destination whose DestinationRule load-balances by consistent hash
/// (the subset's setting first), as Istio puts it on the route.
fn hash_policy(
    ctx: &PushContext,
    proxy: &Proxy,
    d: &Destination,
    vs_ns: &str,
) -> Vec<route_action::HashPolicy> {
    use route_action::hash_policy::{
        ConnectionProperties, Cookie, Header, PolicySpecifier, QueryParameter,
    };
    let host = resolve_config_host(&d.host, vs_ns, ctx.domain());
    let Some(svc) = ctx
        .registry
        .services_by_host(&host)
        .find(|s| s.visible_to(&proxy.namespace, &ctx.mesh.default_service_export_to))
    else {
        return Vec::new();
    };
    let Some(dr) = ctx.destination_rule(&proxy.namespace, svc) else {
        return Vec::new();
    };
    let spec = &dr.object.spec;
    let subset_lb = spec
        .subsets
        .iter()
        .find(|s| !d.subset.is_empty() && s.name == d.subset)
        .and_then(|s| s.traffic_policy.as_ref())
        .and_then(|p| p.load_balancer.as_ref());
    let lb = subset_lb.or_else(|| {
        spec.traffic_policy
            .as_ref()
            .and_then(|p| p.load_balancer.as_ref())
    });
    let Some(ch) = lb.and_then(|l| l.consistent_hash.as_ref()) else {
        return Vec::new();
    };
    let specifier = if let Some(h) = &ch.http_header_name {
        PolicySpecifier::Header(Header {
            header_name: h.clone(),
            ..Default::default()
        })
    } else if let Some(c) = &ch.http_cookie {
        PolicySpecifier::Cookie(Cookie {
            name: c.name.clone(),
            path: c.path.clone(),
            ttl: c.ttl.as_ref().map(|t| pb(t.as_std())),
            ..Default::default()
        })
    } else if ch.use_source_ip == Some(true) {
        PolicySpecifier::ConnectionProperties(ConnectionProperties { source_ip: true })
    } else if let Some(q) = &ch.http_query_parameter_name {
        PolicySpecifier::QueryParameter(QueryParameter { name: q.clone() })
    } else {
        return Vec::new();
    };
    vec![route_action::HashPolicy {
        policy_specifier: Some(specifier),
        ..Default::default()
    }]
}

fn route_match_of(m: &HttpMatchRequest) -> RouteMatch {
    let path_specifier = match &m.uri {
        Some(StringMatch { exact: Some(e), .. }) => {
            Some(route_match::PathSpecifier::Path(e.clone()))
        }
        Some(StringMatch {
            prefix: Some(p), ..
        }) => Some(route_match::PathSpecifier::Prefix(p.clone())),
        Some(StringMatch { regex: Some(r), .. }) => {
            Some(route_match::PathSpecifier::SafeRegex(regex(r)))
        }
        _ => Some(route_match::PathSpecifier::Prefix("/".into())),
    };
    let mut headers: Vec<HeaderMatcher> = m
        .headers
        .iter()
        .map(|(name, sm)| header(name, sm, false))
        .collect();
    headers.extend(
        m.without_headers
            .iter()
            .map(|(name, sm)| header(name, sm, true)),
    );
    if let Some(method) = &m.method {
        headers.push(header(":method", method, false));
    }
    if let Some(authority) = &m.authority {
        headers.push(header(":authority", authority, false));
    }
    if let Some(scheme) = &m.scheme {
        headers.push(header(":scheme", scheme, false));
    }
    RouteMatch {
        path_specifier,
        case_sensitive: m
            .ignore_uri_case
            .then_some(envoy_types::pb::google::protobuf::BoolValue { value: false }),
        headers,
        query_parameters: m
            .query_params
            .iter()
            .map(|(name, sm)| QueryParameterMatcher {
                name: name.clone(),
                query_parameter_match_specifier: Some(
                    query_parameter_matcher::QueryParameterMatchSpecifier::StringMatch(string(sm)),
                ),
            })
            .collect(),
        ..Default::default()
    }
}

fn header(name: &str, sm: &StringMatch, invert: bool) -> HeaderMatcher {
    let empty = sm.exact.is_none() && sm.prefix.is_none() && sm.regex.is_none();
    HeaderMatcher {
        name: name.to_string(),
        invert_match: invert,
        header_match_specifier: Some(if empty {
            header_matcher::HeaderMatchSpecifier::PresentMatch(true)
        } else {
            header_matcher::HeaderMatchSpecifier::StringMatch(string(sm))
        }),
        ..Default::default()
    }
}

fn string(sm: &StringMatch) -> StringMatcher {
    let pattern = if let Some(e) = &sm.exact {
        string_matcher::MatchPattern::Exact(e.clone())
    } else if let Some(p) = &sm.prefix {
        string_matcher::MatchPattern::Prefix(p.clone())
    } else if let Some(r) = &sm.regex {
        string_matcher::MatchPattern::SafeRegex(regex(r))
    } else {
        string_matcher::MatchPattern::Prefix(String::new())
    };
    StringMatcher {
        match_pattern: Some(pattern),
        ..Default::default()
    }
}

fn regex(r: &str) -> RegexMatcher {
    RegexMatcher {
        regex: r.to_string(),
        ..Default::default()
    }
}

fn prefix_match(p: &str) -> RouteMatch {
    RouteMatch {
        path_specifier: Some(route_match::PathSpecifier::Prefix(p.into())),
        ..Default::default()
    }
}
