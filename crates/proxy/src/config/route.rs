//! Route configurations: virtual hosts chosen by `Host`, routes by path, headers and query.

use std::time::Duration;

use envoy_types::pb::envoy::config::core::v3::{HeaderValueOption, data_source};
use envoy_types::pb::envoy::config::route::v3::weighted_cluster::{ClusterWeight, cluster_weight};
use envoy_types::pb::envoy::config::route::v3::{
    HeaderMatcher, RetryPolicy, Route as PbRoute, RouteConfiguration, RouteMatch as PbRouteMatch,
    VirtualHost as PbVirtualHost, header_matcher, query_parameter_matcher, redirect_action, route,
    route_action, route_match,
};
use envoy_types::pb::envoy::r#type::matcher::v3::{StringMatcher, string_matcher};
use http::request::Parts;
use regex::Regex;

use super::CompileError;
use super::listener::pb_duration;

pub(crate) const KIND: &str = "route configuration";

#[derive(Debug)]
pub struct RouteTable {
    pub name: String,
    pub vhosts: Vec<VirtualHost>,
    exact: super::ByName<usize>,
    /// `*.example.com` patterns as (suffix, vhost), longest first.
    suffix: Vec<(String, usize)>,
    /// `example.*` patterns as (prefix, vhost), longest first.
    prefix: Vec<(String, usize)>,
    wildcard: Option<usize>,
}

#[derive(Debug)]
pub struct VirtualHost {
    pub name: String,
    pub routes: Vec<Route>,
    pub headers: HeaderEdits,
    /// `x-envoy-attempt-count` on each request to the upstream (`include_request_attempt_count`).
    pub attempt_count: bool,
    /// ... and on the response (`include_attempt_count_in_response`).
    pub attempt_count_in_response: bool,
}

#[derive(Debug)]
pub struct Route {
    pub name: String,
    matcher: RouteMatch,
    pub action: Action,
    pub headers: HeaderEdits,
    /// Fault injection for this route (the fault filter's per-route configuration).
    pub fault: Option<Fault>,
    /// The CORS filter's policy for this route.
    pub cors: Option<Box<super::cors::Cors>>,
    /// The decorator: the name of the spans of its requests.
    pub decorator: Option<Decorator>,
}

/// A route's span name, and whether the upstream is told it (`x-envoy-decorator-operation`).
#[derive(Debug, Clone)]
pub struct Decorator {
    pub operation: String,
    pub propagate: bool,
}

/// Envoy's HTTP fault filter: delay and/or abort a share of requests (parts per million).
#[derive(Debug, Clone, Default)]
pub struct Fault {
    pub delay: Option<(Duration, u32)>,
    pub abort: Option<(u16, u32)>,
}

impl Fault {
    /// Decodes an `envoy.filters.http.fault` configuration.
    pub fn decode(any: &envoy_types::pb::google::protobuf::Any) -> Result<Fault, String> {
        use envoy_types::pb::envoy::extensions::filters::common::fault::v3::fault_delay;
        use envoy_types::pb::envoy::extensions::filters::http::fault::v3::{
            HttpFault, fault_abort,
        };
        use envoy_types::pb::envoy::r#type::v3::FractionalPercent;
        use prost::Message;
        let f = HttpFault::decode(any.value.as_slice()).map_err(|e| format!("fault: {e}"))?;
        let ppm = |p: &Option<FractionalPercent>| ppm(p.as_ref());
        let delay = match &f.delay {
            None => None,
            Some(d) => match &d.fault_delay_secifier {
                Some(fault_delay::FaultDelaySecifier::FixedDelay(t)) => {
                    Some((pb_duration(t), ppm(&d.percentage)))
                }
                _ => return Err("only fixed fault delays are supported".into()),
            },
        };
        let abort = match &f.abort {
            None => None,
            Some(a) => match a.error_type {
                Some(fault_abort::ErrorType::HttpStatus(s)) => Some((
                    u16::try_from(s)
                        .ok()
                        .filter(|s| (200..600).contains(s))
                        .ok_or_else(|| format!("fault abort status {s} is invalid"))?,
                    ppm(&a.percentage),
                )),
                _ => return Err("only HTTP status fault aborts are supported".into()),
            },
        };
        Ok(Fault { delay, abort })
    }

    pub fn is_empty(&self) -> bool {
        self.delay.is_none() && self.abort.is_none()
    }
}

/// Envoy's fractional percent in parts per million (all of them when unset).
pub(crate) fn ppm(p: Option<&envoy_types::pb::envoy::r#type::v3::FractionalPercent>) -> u32 {
    p.map_or(1_000_000, |p| {
        let scale = match p.denominator {
            0 => 10_000,
            1 => 100,
            _ => 1,
        };
        p.numerator.saturating_mul(scale).min(1_000_000)
    })
}

/// Whether this request falls in a share given in parts per million.
pub fn roll(ppm: u32) -> bool {
    ppm >= 1_000_000 || rand::random_range(0..1_000_000) < ppm
}

/// The per-route configuration key of the fault filter.
pub const FAULT_FILTER: &str = "envoy.filters.http.fault";

/// Headers added and removed on requests and responses.
#[derive(Debug, Default, Clone)]
pub struct HeaderEdits {
    pub request_add: Vec<(http::HeaderName, http::HeaderValue, bool)>,
    pub request_remove: Vec<http::HeaderName>,
    pub response_add: Vec<(http::HeaderName, http::HeaderValue, bool)>,
    pub response_remove: Vec<http::HeaderName>,
}

#[derive(Debug)]
pub enum Action {
    Forward(Forward),
    Redirect(Redirect),
    Direct { status: u16, body: String },
}

#[derive(Debug)]
pub struct Forward {
    pub clusters: Clusters,
    /// None: no timeout (Envoy's `0s`).
    pub timeout: Option<Duration>,
    pub retry: Option<Retry>,
    pub prefix_rewrite: Option<String>,
    /// Envoy's `regex_rewrite`: every match of the pattern in the path replaced (Istio's
    /// `uriRegexRewrite`); the replacement in the regex crate's `${1}` syntax.
    pub regex_rewrite: Option<(Regex, String)>,
    pub host_rewrite: Option<String>,
    /// Clusters that get a copy of a share of the requests (parts per million).
    pub mirrors: Vec<(String, u32)>,
    /// What a consistent-hash cluster hashes, first that the request has.
    pub hash: Vec<HashKey>,
}

/// One of Envoy's route hash policies.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HashKey {
    Header(http::HeaderName),
    /// A cookie; with a TTL, a request without it gets one generated (session affinity).
    Cookie {
        name: String,
        ttl: Option<Duration>,
        path: String,
    },
    SourceIp,
    QueryParameter(String),
}

impl HashKey {
    fn compile(p: &route_action::HashPolicy) -> Result<HashKey, String> {
        use route_action::hash_policy::PolicySpecifier;
        match &p.policy_specifier {
            Some(PolicySpecifier::Header(h)) => {
                http::HeaderName::from_bytes(h.header_name.as_bytes())
                    .map(HashKey::Header)
                    .map_err(|_| format!("bad hash header name {:?}", h.header_name))
            }
            Some(PolicySpecifier::Cookie(c)) if !c.name.is_empty() => Ok(HashKey::Cookie {
                name: c.name.clone(),
                ttl: c.ttl.as_ref().map(pb_duration),
                path: c.path.clone(),
            }),
            Some(PolicySpecifier::ConnectionProperties(c)) if c.source_ip => Ok(HashKey::SourceIp),
            Some(PolicySpecifier::QueryParameter(q)) if !q.name.is_empty() => {
                Ok(HashKey::QueryParameter(q.name.clone()))
            }
            _ => Err(
                "only header, cookie, source IP and query parameter hash policies are supported"
                    .into(),
            ),
        }
    }

    /// The request's value for this key, if it has one.
    pub fn value<'a>(
        &self,
        parts: &'a http::request::Parts,
        source: std::net::IpAddr,
    ) -> Option<std::borrow::Cow<'a, str>> {
        use std::borrow::Cow;
        match self {
            HashKey::Header(h) => parts
                .headers
                .get(h)
                .and_then(|v| v.to_str().ok())
                .map(Cow::Borrowed),
            HashKey::Cookie { name, .. } => cookie(parts, name).map(Cow::Borrowed),
            HashKey::SourceIp => Some(Cow::Owned(source.to_string())),
            HashKey::QueryParameter(name) => query_param(parts, name).map(Cow::Borrowed),
        }
    }
}

/// A query parameter's raw value (`""` when it has none).
pub(crate) fn query_param<'a>(parts: &'a http::request::Parts, name: &str) -> Option<&'a str> {
    parts.uri.query()?.split('&').find_map(|kv| {
        let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
        (k == name).then_some(v)
    })
}

/// A cookie's value from the request's `Cookie` headers.
pub(crate) fn cookie<'a>(parts: &'a http::request::Parts, name: &str) -> Option<&'a str> {
    parts
        .headers
        .get_all(http::header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|kv| kv.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v)
}

#[derive(Debug)]
pub enum Clusters {
    One(String),
    Weighted(Vec<WeightedCluster>),
}

/// One cluster of a weighted split.
#[derive(Debug)]
pub struct WeightedCluster {
    pub name: String,
    pub weight: u32,
    /// What changes in the requests sent to it and their responses (an HTTP route's split,
    /// Istio's header operations of each destination).
    pub edits: Option<Box<ClusterEdits>>,
}

/// A weighted cluster's own header edits and host rewrite.
#[derive(Debug, Default)]
pub struct ClusterEdits {
    pub headers: HeaderEdits,
    pub host_rewrite: Option<String>,
}

impl Clusters {
    /// The cluster for this request or connection (weighted: at random by weight), and its
    /// own edits.
    pub fn pick(&self) -> (&str, Option<&ClusterEdits>) {
        match self {
            Clusters::One(c) => (c, None),
            Clusters::Weighted(list) => {
                let total: u64 = list.iter().map(|c| u64::from(c.weight)).sum();
                let mut n = rand::random_range(0..total.max(1));
                for c in list {
                    if n < u64::from(c.weight) {
                        return (&c.name, c.edits.as_deref());
                    }
                    n -= u64::from(c.weight);
                }
                list.last()
                    .map_or(("", None), |c| (c.name.as_str(), c.edits.as_deref()))
            }
        }
    }
}

#[derive(Debug, Clone)]
pub struct Retry {
    pub attempts: u32,
    pub connect_failure: bool,
    pub reset: bool,
    pub refused_stream: bool,
    pub server_error: bool,
    pub gateway_error: bool,
    pub status_codes: Vec<u16>,
    pub per_try_timeout: Option<Duration>,
}

impl Retry {
    /// Whether a response status is worth another attempt.
    pub fn on_status(&self, status: u16) -> bool {
        (self.server_error && status >= 500)
            || (self.gateway_error && matches!(status, 502..=504))
            || self.status_codes.contains(&status)
    }
}

#[derive(Debug)]
pub struct Redirect {
    pub status: u16,
    pub host: Option<String>,
    pub port: Option<u32>,
    pub path: Option<String>,
    pub scheme: Option<String>,
}

#[derive(Debug)]
pub(crate) struct RouteMatch {
    path: PathMatch,
    case_sensitive: bool,
    headers: Vec<HeaderMatch>,
    query: Vec<(String, Option<Text>)>,
}

#[derive(Debug)]
enum PathMatch {
    Prefix(String),
    Exact(String),
    Regex(Regex),
    SeparatedPrefix(String),
}

#[derive(Debug)]
pub(crate) struct HeaderMatch {
    name: String,
    test: HeaderTest,
    invert: bool,
}

#[derive(Debug)]
enum HeaderTest {
    Present(bool),
    Text(Text),
}

/// Envoy's `StringMatcher`.
#[derive(Debug)]
pub(crate) enum Text {
    Exact(String, bool),
    Prefix(String, bool),
    Suffix(String, bool),
    Contains(String, bool),
    Regex(Regex),
}

impl Text {
    pub(crate) fn matches(&self, v: &str) -> bool {
        let fold = |ignore: bool, s: &str| {
            if ignore {
                s.to_ascii_lowercase()
            } else {
                s.to_string()
            }
        };
        match self {
            Text::Exact(p, i) => fold(*i, v) == *p,
            Text::Prefix(p, i) => fold(*i, v).starts_with(p.as_str()),
            Text::Suffix(p, i) => fold(*i, v).ends_with(p.as_str()),
            Text::Contains(p, i) => fold(*i, v).contains(p.as_str()),
            Text::Regex(r) => r.is_match(v),
        }
    }
}

/// An RE2 substitution (`\1` for a group, `\\` for a backslash) in the regex crate's syntax.
fn substitution(re2: &str) -> String {
    let mut out = String::with_capacity(re2.len());
    let mut chars = re2.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' => match chars.next() {
                Some(d) if d.is_ascii_digit() => out.push_str(&format!("${{{d}}}")),
                Some(other) => out.push(other),
                None => out.push('\\'),
            },
            '$' => out.push_str("$$"),
            c => out.push(c),
        }
    }
    out
}

fn regex(pattern: &str) -> Result<Regex, String> {
    // Envoy's safe_regex matches the whole value.
    Regex::new(&format!("^(?:{pattern})$")).map_err(|e| format!("regex {pattern:?}: {e}"))
}

pub(crate) fn text(m: &StringMatcher) -> Result<Text, String> {
    let i = m.ignore_case;
    let fold = |s: &str| {
        if i {
            s.to_ascii_lowercase()
        } else {
            s.to_string()
        }
    };
    Ok(match &m.match_pattern {
        Some(string_matcher::MatchPattern::Exact(s)) => Text::Exact(fold(s), i),
        Some(string_matcher::MatchPattern::Prefix(s)) => Text::Prefix(fold(s), i),
        Some(string_matcher::MatchPattern::Suffix(s)) => Text::Suffix(fold(s), i),
        Some(string_matcher::MatchPattern::Contains(s)) => Text::Contains(fold(s), i),
        Some(string_matcher::MatchPattern::SafeRegex(r)) => Text::Regex(regex(&r.regex)?),
        Some(string_matcher::MatchPattern::Custom(_)) | None => {
            return Err("string matcher without a supported pattern".into());
        }
    })
}

pub fn compile(rc: &RouteConfiguration) -> Result<RouteTable, CompileError> {
    let err = |reason: String| CompileError::new(KIND, &rc.name, reason);
    let mut table = RouteTable {
        name: rc.name.clone(),
        vhosts: Vec::new(),
        exact: Default::default(),
        suffix: Vec::new(),
        prefix: Vec::new(),
        wildcard: None,
    };
    let config_headers = edits(
        &rc.request_headers_to_add,
        &rc.request_headers_to_remove,
        &rc.response_headers_to_add,
        &rc.response_headers_to_remove,
    )
    .map_err(&err)?;
    for (i, vh) in rc.virtual_hosts.iter().enumerate() {
        let v = virtual_host(vh, &config_headers)
            .map_err(|e| err(format!("virtual host {:?}: {e}", vh.name)))?;
        for d in &vh.domains {
            let d = d.to_ascii_lowercase();
            if d == "*" {
                table.wildcard.get_or_insert(i);
            } else if let Some(s) = d.strip_prefix('*') {
                table.suffix.push((s.to_string(), i));
            } else if let Some(p) = d.strip_suffix('*') {
                table.prefix.push((p.to_string(), i));
            } else if table.exact.insert(d.clone(), i).is_some() {
                return Err(err(format!(
                    "domain {d:?} is in more than one virtual host"
                )));
            }
        }
        table.vhosts.push(v);
    }
    table
        .suffix
        .sort_by_key(|(s, _)| std::cmp::Reverse(s.len()));
    table
        .prefix
        .sort_by_key(|(p, _)| std::cmp::Reverse(p.len()));
    Ok(table)
}

fn virtual_host(vh: &PbVirtualHost, outer: &HeaderEdits) -> Result<VirtualHost, String> {
    let mut headers = edits(
        &vh.request_headers_to_add,
        &vh.request_headers_to_remove,
        &vh.response_headers_to_add,
        &vh.response_headers_to_remove,
    )?;
    headers.extend(outer);
    // Sized exactly: collecting through a `Result` starts at four routes, and most virtual
    // hosts of a mesh have one.
    let mut routes = Vec::with_capacity(vh.routes.len());
    for r in &vh.routes {
        routes.push(
            compile_route(r, vh.retry_policy.as_ref())
                .map_err(|e| format!("route {:?}: {e}", r.name))?,
        );
    }
    Ok(VirtualHost {
        name: vh.name.clone(),
        routes,
        headers,
        attempt_count: vh.include_request_attempt_count,
        attempt_count_in_response: vh.include_attempt_count_in_response,
    })
}

impl HeaderEdits {
    fn is_empty(&self) -> bool {
        self.request_add.is_empty()
            && self.request_remove.is_empty()
            && self.response_add.is_empty()
            && self.response_remove.is_empty()
    }

    /// Outer scopes' edits apply after inner ones (Envoy: route, then virtual host, then config).
    fn extend(&mut self, outer: &HeaderEdits) {
        self.request_add.extend(outer.request_add.iter().cloned());
        self.request_remove
            .extend(outer.request_remove.iter().cloned());
        self.response_add.extend(outer.response_add.iter().cloned());
        self.response_remove
            .extend(outer.response_remove.iter().cloned());
    }

    pub fn apply_request(&self, h: &mut http::HeaderMap) {
        apply(h, &self.request_remove, &self.request_add);
    }

    pub fn apply_response(&self, h: &mut http::HeaderMap) {
        apply(h, &self.response_remove, &self.response_add);
    }
}

fn apply(
    h: &mut http::HeaderMap,
    remove: &[http::HeaderName],
    add: &[(http::HeaderName, http::HeaderValue, bool)],
) {
    for n in remove {
        h.remove(n);
    }
    for (n, v, append) in add {
        if *append {
            h.append(n.clone(), v.clone());
        } else {
            h.insert(n.clone(), v.clone());
        }
    }
}

#[allow(deprecated)]
fn edits(
    req_add: &[HeaderValueOption],
    req_remove: &[String],
    resp_add: &[HeaderValueOption],
    resp_remove: &[String],
) -> Result<HeaderEdits, String> {
    let adds = |list: &[HeaderValueOption]| {
        list.iter()
            .filter_map(|o| o.header.as_ref().map(|h| (h, o)))
            .map(|(h, o)| {
                let name = http::HeaderName::from_bytes(h.key.as_bytes())
                    .map_err(|_| format!("bad header name {:?}", h.key))?;
                let value = http::HeaderValue::from_str(&h.value)
                    .map_err(|_| format!("bad value for header {:?}", h.key))?;
                // APPEND_IF_EXISTS_OR_ADD is 0; the legacy `append` field overrides it.
                let append = o.append.as_ref().map_or(o.append_action == 0, |b| b.value);
                Ok((name, value, append))
            })
            .collect::<Result<Vec<_>, String>>()
    };
    let removes = |list: &[String]| {
        list.iter()
            .map(|n| {
                http::HeaderName::from_bytes(n.as_bytes())
                    .map_err(|_| format!("bad header name {n:?}"))
            })
            .collect::<Result<Vec<_>, String>>()
    };
    Ok(HeaderEdits {
        request_add: adds(req_add)?,
        request_remove: removes(req_remove)?,
        response_add: adds(resp_add)?,
        response_remove: removes(resp_remove)?,
    })
}

/// A route's weighted cluster, with its own header edits and host rewrite.
fn weighted_cluster(c: &ClusterWeight) -> Result<WeightedCluster, String> {
    let headers = edits(
        &c.request_headers_to_add,
        &c.request_headers_to_remove,
        &c.response_headers_to_add,
        &c.response_headers_to_remove,
    )
    .map_err(|e| format!("weighted cluster {:?}: {e}", c.name))?;
    let host_rewrite = c
        .host_rewrite_specifier
        .as_ref()
        .map(|cluster_weight::HostRewriteSpecifier::HostRewriteLiteral(h)| h.clone());
    let edits = (!headers.is_empty() || host_rewrite.is_some()).then(|| {
        Box::new(ClusterEdits {
            headers,
            host_rewrite,
        })
    });
    Ok(WeightedCluster {
        name: c.name.clone(),
        weight: c.weight.as_ref().map_or(0, |w| w.value),
        edits,
    })
}

fn compile_route(r: &PbRoute, vh_retry: Option<&RetryPolicy>) -> Result<Route, String> {
    let matcher = route_match(r.r#match.as_ref().ok_or("no match")?)?;
    let action = match r.action.as_ref().ok_or("no action")? {
        route::Action::Route(ra) => {
            let clusters = match &ra.cluster_specifier {
                Some(route_action::ClusterSpecifier::Cluster(c)) => Clusters::One(c.clone()),
                Some(route_action::ClusterSpecifier::WeightedClusters(w)) => Clusters::Weighted(
                    w.clusters
                        .iter()
                        .map(weighted_cluster)
                        .collect::<Result<_, _>>()?,
                ),
                _ => return Err("only cluster and weighted_clusters are supported".into()),
            };
            let timeout = match &ra.timeout {
                Some(d) => Some(pb_duration(d)).filter(|d| !d.is_zero()),
                None => Some(Duration::from_secs(15)),
            };
            Action::Forward(Forward {
                clusters,
                timeout,
                retry: ra.retry_policy.as_ref().or(vh_retry).map(retry),
                prefix_rewrite: (!ra.prefix_rewrite.is_empty()).then(|| ra.prefix_rewrite.clone()),
                regex_rewrite: ra
                    .regex_rewrite
                    .as_ref()
                    .map(|r| {
                        let pattern = r.pattern.as_ref().ok_or("regex_rewrite has no pattern")?;
                        let re = Regex::new(&pattern.regex)
                            .map_err(|e| format!("regex_rewrite {:?}: {e}", pattern.regex))?;
                        Ok::<_, String>((re, substitution(&r.substitution)))
                    })
                    .transpose()?,
                host_rewrite: match &ra.host_rewrite_specifier {
                    Some(route_action::HostRewriteSpecifier::HostRewriteLiteral(h)) => {
                        Some(h.clone())
                    }
                    Some(_) => return Err("only literal host rewrites are supported".into()),
                    None => None,
                },
                mirrors: ra
                    .request_mirror_policies
                    .iter()
                    .map(|m| {
                        if m.cluster.is_empty() {
                            return Err("only mirror policies naming a cluster are supported");
                        }
                        let share = m
                            .runtime_fraction
                            .as_ref()
                            .and_then(|f| f.default_value.as_ref());
                        Ok((m.cluster.clone(), ppm(share)))
                    })
                    .collect::<Result<_, _>>()?,
                hash: ra
                    .hash_policy
                    .iter()
                    .map(HashKey::compile)
                    .collect::<Result<_, _>>()?,
            })
        }
        route::Action::Redirect(rd) => Action::Redirect(Redirect {
            status: match rd.response_code {
                1 => 302,
                2 => 303,
                3 => 307,
                4 => 308,
                _ => 301,
            },
            host: (!rd.host_redirect.is_empty()).then(|| rd.host_redirect.clone()),
            port: (rd.port_redirect != 0).then_some(rd.port_redirect),
            path: match &rd.path_rewrite_specifier {
                Some(redirect_action::PathRewriteSpecifier::PathRedirect(p)) => Some(p.clone()),
                Some(_) => return Err("only path redirects are supported".into()),
                None => None,
            },
            scheme: match &rd.scheme_rewrite_specifier {
                Some(redirect_action::SchemeRewriteSpecifier::HttpsRedirect(true)) => {
                    Some("https".into())
                }
                Some(redirect_action::SchemeRewriteSpecifier::SchemeRedirect(s)) => Some(s.clone()),
                _ => None,
            },
        }),
        route::Action::DirectResponse(d) => Action::Direct {
            status: u16::try_from(d.status)
                .ok()
                .filter(|s| (200..600).contains(s))
                .ok_or_else(|| format!("direct response status {} is invalid", d.status))?,
            body: match d.body.as_ref().and_then(|b| b.specifier.as_ref()) {
                Some(data_source::Specifier::InlineString(s)) => s.clone(),
                Some(data_source::Specifier::InlineBytes(b)) => {
                    String::from_utf8_lossy(b).into_owned()
                }
                Some(_) => return Err("direct response bodies from files are not supported".into()),
                None => String::new(),
            },
        },
        _ => return Err("action is not supported".into()),
    };
    let fault = r
        .typed_per_filter_config
        .get(FAULT_FILTER)
        .map(Fault::decode)
        .transpose()?
        .filter(|f| !f.is_empty());
    let cors = r
        .typed_per_filter_config
        .get(super::cors::FILTER)
        .map(|c| super::cors::Cors::decode(c).map(Box::new))
        .transpose()?;
    Ok(Route {
        name: r.name.clone(),
        matcher,
        action,
        fault,
        cors,
        decorator: r
            .decorator
            .as_ref()
            .filter(|d| !d.operation.is_empty())
            .map(|d| Decorator {
                operation: d.operation.clone(),
                propagate: d.propagate.as_ref().is_none_or(|p| p.value),
            }),
        headers: edits(
            &r.request_headers_to_add,
            &r.request_headers_to_remove,
            &r.response_headers_to_add,
            &r.response_headers_to_remove,
        )?,
    })
}

fn retry(p: &RetryPolicy) -> Retry {
    let on: Vec<&str> = p.retry_on.split(',').map(str::trim).collect();
    let has = |s: &str| on.contains(&s);
    Retry {
        attempts: p.num_retries.as_ref().map_or(1, |n| n.value),
        connect_failure: has("connect-failure") || has("5xx") || has("gateway-error"),
        reset: has("reset") || has("5xx"),
        refused_stream: has("refused-stream"),
        server_error: has("5xx"),
        gateway_error: has("gateway-error"),
        status_codes: if has("retriable-status-codes") {
            p.retriable_status_codes
                .iter()
                .filter_map(|c| u16::try_from(*c).ok())
                .collect()
        } else {
            Vec::new()
        },
        per_try_timeout: p
            .per_try_timeout
            .as_ref()
            .map(pb_duration)
            .filter(|d| !d.is_zero()),
    }
}

pub(crate) fn route_match(m: &PbRouteMatch) -> Result<RouteMatch, String> {
    let case_sensitive = m.case_sensitive.as_ref().is_none_or(|b| b.value);
    let fold = |s: &str| {
        if case_sensitive {
            s.to_string()
        } else {
            s.to_ascii_lowercase()
        }
    };
    let path = match &m.path_specifier {
        Some(route_match::PathSpecifier::Prefix(p)) => PathMatch::Prefix(fold(p)),
        Some(route_match::PathSpecifier::Path(p)) => PathMatch::Exact(fold(p)),
        Some(route_match::PathSpecifier::SafeRegex(r)) => PathMatch::Regex(regex(&r.regex)?),
        Some(route_match::PathSpecifier::PathSeparatedPrefix(p)) => {
            PathMatch::SeparatedPrefix(fold(p))
        }
        _ => return Err("path matcher is not supported".into()),
    };
    let headers = m
        .headers
        .iter()
        .map(header_match)
        .collect::<Result<_, _>>()?;
    let query = m
        .query_parameters
        .iter()
        .map(|q| {
            let t = match &q.query_parameter_match_specifier {
                Some(query_parameter_matcher::QueryParameterMatchSpecifier::StringMatch(s)) => {
                    Some(text(s)?)
                }
                _ => None,
            };
            Ok((q.name.clone(), t))
        })
        .collect::<Result<_, String>>()?;
    Ok(RouteMatch {
        path,
        case_sensitive,
        headers,
        query,
    })
}

// The deprecated matchers are what older control planes send.
#[allow(deprecated)]
pub(crate) fn header_match(h: &HeaderMatcher) -> Result<HeaderMatch, String> {
    use header_matcher::HeaderMatchSpecifier as S;
    let test = match &h.header_match_specifier {
        Some(S::ExactMatch(s)) => HeaderTest::Text(Text::Exact(s.clone(), false)),
        Some(S::PrefixMatch(s)) => HeaderTest::Text(Text::Prefix(s.clone(), false)),
        Some(S::SuffixMatch(s)) => HeaderTest::Text(Text::Suffix(s.clone(), false)),
        Some(S::ContainsMatch(s)) => HeaderTest::Text(Text::Contains(s.clone(), false)),
        Some(S::SafeRegexMatch(r)) => HeaderTest::Text(Text::Regex(regex(&r.regex)?)),
        Some(S::StringMatch(s)) => HeaderTest::Text(text(s)?),
        Some(S::PresentMatch(p)) => HeaderTest::Present(*p),
        Some(S::RangeMatch(_)) => return Err("header range matches are not supported".into()),
        None => HeaderTest::Present(true),
    };
    Ok(HeaderMatch {
        name: h.name.to_ascii_lowercase(),
        test,
        invert: h.invert_match,
    })
}

impl RouteMatch {
    pub(crate) fn matches(&self, req: &Parts) -> bool {
        let path_only = req.uri.path();
        let path = if self.case_sensitive {
            std::borrow::Cow::Borrowed(path_only)
        } else {
            std::borrow::Cow::Owned(path_only.to_ascii_lowercase())
        };
        let path_ok = match &self.path {
            PathMatch::Prefix(p) => path.starts_with(p.as_str()),
            PathMatch::Exact(p) => *path == **p,
            PathMatch::Regex(r) => r.is_match(path_only),
            PathMatch::SeparatedPrefix(p) => {
                path.starts_with(p.as_str())
                    && matches!(path.as_bytes().get(p.len()), None | Some(b'/'))
            }
        };
        path_ok
            && self.headers.iter().all(|h| h.matches(req))
            && self
                .query
                .iter()
                .all(|(name, t)| match (query_param(req, name), t) {
                    (Some(v), Some(t)) => t.matches(v),
                    (Some(_), None) => true,
                    (None, _) => false,
                })
    }
}

impl HeaderMatch {
    pub(crate) fn matches(&self, req: &Parts) -> bool {
        let joined;
        let value: Option<&str> = match self.name.as_str() {
            ":method" => Some(req.method.as_str()),
            ":path" => req.uri.path_and_query().map(|p| p.as_str()),
            ":scheme" => Some(req.uri.scheme_str().unwrap_or("http")),
            ":authority" => crate::http::authority(req),
            name => {
                let mut all = req
                    .headers
                    .get_all(name)
                    .iter()
                    .filter_map(|v| v.to_str().ok());
                match (all.next(), all.next()) {
                    (Some(first), None) => Some(first),
                    (Some(first), Some(second)) => {
                        // Envoy matches repeated headers joined with commas.
                        joined = std::iter::once(first)
                            .chain(std::iter::once(second))
                            .chain(all)
                            .collect::<Vec<_>>()
                            .join(",");
                        Some(joined.as_str())
                    }
                    (None, _) => None,
                }
            }
        };
        let hit = match (&self.test, value) {
            (HeaderTest::Present(p), v) => v.is_some() == *p,
            (HeaderTest::Text(t), Some(v)) => t.matches(v),
            (HeaderTest::Text(_), None) => false,
        };
        hit != self.invert
    }
}

impl RouteTable {
    /// The virtual host for a `Host`/`:authority` (Envoy's order: exact, longest suffix
    /// wildcard, longest prefix wildcard, `*`).
    pub fn virtual_host(&self, host: &str) -> Option<&VirtualHost> {
        // Hosts come lower case nearly always: a copy only for the others.
        let host: std::borrow::Cow<'_, str> = if host.bytes().any(|b| b.is_ascii_uppercase()) {
            host.to_ascii_lowercase().into()
        } else {
            host.into()
        };
        let i = self.exact.get(host.as_ref()).copied().or_else(|| {
            self.suffix
                .iter()
                .find(|(s, _)| host.ends_with(s.as_str()) && host.len() > s.len())
                .or_else(|| {
                    self.prefix
                        .iter()
                        .find(|(p, _)| host.starts_with(p.as_str()) && host.len() > p.len())
                })
                .map(|(_, i)| *i)
                .or(self.wildcard)
        })?;
        self.vhosts.get(i)
    }
}

impl Route {
    /// The path prefix the route matched on, which a prefix rewrite replaces.
    pub fn prefix(&self) -> Option<&str> {
        match &self.matcher.path {
            PathMatch::Prefix(p) | PathMatch::SeparatedPrefix(p) => Some(p),
            _ => None,
        }
    }
}

impl VirtualHost {
    pub fn route(&self, req: &Parts) -> Option<&Route> {
        self.routes.iter().find(|r| r.matcher.matches(req))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use envoy_types::pb::envoy::config::route::v3::RouteAction;

    fn vh(name: &str, domains: &[&str], routes: Vec<PbRoute>) -> PbVirtualHost {
        PbVirtualHost {
            name: name.into(),
            domains: domains.iter().map(|d| d.to_string()).collect(),
            routes,
            ..Default::default()
        }
    }

    fn to(cluster: &str, m: PbRouteMatch) -> PbRoute {
        PbRoute {
            name: cluster.into(),
            r#match: Some(m),
            action: Some(route::Action::Route(RouteAction {
                cluster_specifier: Some(route_action::ClusterSpecifier::Cluster(cluster.into())),
                ..Default::default()
            })),
            ..Default::default()
        }
    }

    fn prefix(p: &str) -> PbRouteMatch {
        PbRouteMatch {
            path_specifier: Some(route_match::PathSpecifier::Prefix(p.into())),
            ..Default::default()
        }
    }

    fn req(uri: &str, headers: &[(&str, &str)]) -> Parts {
        let mut b = http::Request::builder().uri(uri);
        for (k, v) in headers {
            b = b.header(*k, *v);
        }
        b.body(()).unwrap().into_parts().0
    }

    fn cluster_of(r: &Route) -> &str {
        match &r.action {
            Action::Forward(f) => f.clusters.pick().0,
            _ => "",
        }
    }

    #[test]
    fn hosts_and_routes_match_like_envoy() {
        let jason = PbRouteMatch {
            headers: vec![HeaderMatcher {
                name: "end-user".into(),
                header_match_specifier: Some(header_matcher::HeaderMatchSpecifier::StringMatch(
                    StringMatcher {
                        match_pattern: Some(string_matcher::MatchPattern::Exact("jason".into())),
                        ..Default::default()
                    },
                )),
                ..Default::default()
            }],
            ..prefix("/")
        };
        let rc = RouteConfiguration {
            name: "9080".into(),
            virtual_hosts: vec![
                vh(
                    "reviews",
                    &["reviews", "reviews:9080", "reviews.ns.svc.cluster.local"],
                    vec![to("v2", jason), to("v1", prefix("/"))],
                ),
                vh("wild", &["*.example.com"], vec![to("wild", prefix("/"))]),
                vh("any", &["*"], vec![to("passthrough", prefix("/"))]),
            ],
            ..Default::default()
        };
        let t = compile(&rc).unwrap();
        let pick = |host: &str, r: &Parts| {
            t.virtual_host(host)
                .and_then(|v| v.route(r))
                .map(cluster_of)
                .unwrap_or("none")
                .to_string()
        };
        assert_eq!(pick("reviews:9080", &req("/", &[])), "v1");
        assert_eq!(pick("Reviews", &req("/x", &[("end-user", "jason")])), "v2");
        assert_eq!(pick("a.example.com", &req("/", &[])), "wild");
        assert_eq!(pick("example.com", &req("/", &[])), "passthrough");
        assert_eq!(pick("10.1.2.3:9080", &req("/", &[])), "passthrough");
    }

    #[test]
    fn re2_substitutions_read_as_the_regex_crates() {
        assert_eq!(substitution("/\\2/by/\\1"), "/${2}/by/${1}");
        assert_eq!(substitution("cost $5 \\\\ done\\"), "cost $$5 \\ done\\");
        let re = Regex::new("^/users/([^/]+)/(.*)$").unwrap();
        assert_eq!(
            re.replace_all("/users/ann/profile", substitution("/\\2/by/\\1").as_str()),
            "/profile/by/ann"
        );
    }

    #[test]
    fn unsupported_features_are_named() {
        let mut r = to("c", prefix("/"));
        if let Some(route::Action::Route(ra)) = r.action.as_mut() {
            ra.cluster_specifier = Some(route_action::ClusterSpecifier::ClusterHeader(
                "x-cluster".into(),
            ));
        }
        let rc = RouteConfiguration {
            name: "80".into(),
            virtual_hosts: vec![vh("h", &["*"], vec![r])],
            ..Default::default()
        };
        let e = compile(&rc).unwrap_err().to_string();
        assert!(
            e.contains("route configuration \"80\"") && e.contains("route \"c\""),
            "{e}"
        );
    }
}
