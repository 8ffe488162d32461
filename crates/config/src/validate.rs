//! Istio's validation webhook rules for its custom resources.
//!
//! Used by the schema analyzers (IST0106/IST0133, and the VirtualService reachability messages
//! IST0130/IST0131) and by the control plane, which refuses configuration that fails them.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::IpAddr;
use std::time::Duration as StdDuration;

use crate::istio::common::{Duration, WorkloadSelector};
use crate::istio::networking::*;
use crate::istio::security::*;
use crate::istio::telemetry::TelemetrySpec;
use crate::resource::Object;

/// A finding of the VirtualService reachability analysis.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reachability {
    /// A rule no request can reach: `(rule, reason)`.
    UnreachableRule { rule: String, reason: String },
    /// A match already covered by an earlier one: `(rule, match, earlier rule)`.
    IneffectiveMatch {
        rule: String,
        matched: String,
        duplicate_of: String,
    },
}

/// Validation results: errors make the resource invalid; warnings do not.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Report {
    pub errors: Vec<String>,
    pub warnings: Vec<String>,
    pub reachability: Vec<Reachability>,
}

impl Report {
    fn err(&mut self, e: impl Into<String>) {
        self.errors.push(e.into());
    }
    fn warn(&mut self, w: impl Into<String>) {
        self.warnings.push(w.into());
    }
    fn check(&mut self, r: Result<(), String>) {
        if let Err(e) = r {
            self.errors.push(e);
        }
    }
    pub fn is_valid(&self) -> bool {
        self.errors.is_empty()
    }
}

/// Validates a resource of an Istio kind. Kubernetes kinds have no Istio rules and pass.
pub fn validate(object: &Object) -> Report {
    let meta = object.metadata();
    let name = meta.name.as_deref().unwrap_or("");
    let ns = meta.namespace.as_deref().unwrap_or("");
    let mut r = Report::default();
    if let Some(v) = meta
        .annotations
        .as_ref()
        .and_then(|a| a.get("istio.io/dry-run"))
    {
        match object {
            Object::AuthorizationPolicy(ap) => match ap.spec.action() {
                "ALLOW" | "DENY" => {
                    if !matches!(v.as_str(), "true" | "false" | "1" | "0" | "t" | "f" | "TRUE" | "FALSE" | "True" | "False") {
                        r.err(format!("{ns}/{name} has annotation istio.io/dry-run with invalid value ({v})"));
                    }
                }
                action => r.err(format!(
                    "the annotation istio.io/dry-run currently only supports action ALLOW/DENY, found action {action} in {ns}/{name}"
                )),
            },
            _ => r.err(format!("{ns}/{name} has unsupported annotation istio.io/dry-run, please remove the annotation")),
        }
        return r;
    }
    match object {
        Object::VirtualService(o) => virtual_service(ns, &o.spec, &mut r),
        Object::DestinationRule(o) => destination_rule(ns, &o.spec, &mut r),
        Object::Gateway(o) => gateway(name, &o.spec, &mut r),
        Object::ServiceEntry(o) => service_entry(ns, &o.spec, &mut r),
        Object::Sidecar(o) => sidecar(ns, &o.spec, &mut r),
        Object::EnvoyFilter(o) => envoy_filter(&o.spec, &mut r),
        Object::WorkloadEntry(o) => workload_entry(&o.spec, &mut r),
        Object::WorkloadGroup(o) => workload_group(&o.spec, &mut r),
        Object::PeerAuthentication(o) => peer_authentication(&o.spec, &mut r),
        Object::RequestAuthentication(o) => request_authentication(&o.spec, &mut r),
        Object::AuthorizationPolicy(o) => authorization_policy(&o.spec, &mut r),
        Object::Telemetry(o) => telemetry(&o.spec, &mut r),
        Object::ProxyConfig(o) => {
            r.check(workload_selector(o.spec.selector.as_ref()));
            if o.spec.concurrency.is_some_and(|c| c < 0) {
                r.err("concurrency must be greater than or equal to 0");
            }
        }
        _ => {}
    }
    r
}

// ---------------------------------------------------------------------------------------------
// Names, hosts, ports

/// DNS-1123 label.
pub fn is_dns1123_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

fn is_wildcard_dns1123_label(s: &str) -> bool {
    if s == "*" {
        return true;
    }
    match s.strip_prefix('*') {
        Some(rest) => is_dns1123_label(&format!("a{rest}")),
        None => is_dns1123_label(s),
    }
}

fn dns1123_preconditions(name: &str) -> Result<(), String> {
    if name.len() > 255 {
        return Err(format!("domain name {name:?} too long (max 255)"));
    }
    if name.is_empty() {
        return Err("empty domain name not allowed".into());
    }
    Ok(())
}

fn dns1123_labels(domain: &str) -> Result<(), String> {
    let parts: Vec<&str> = domain.split('.').collect();
    let tld = parts[parts.len() - 1];
    if !tld.is_empty() && tld.parse::<i64>().is_ok() {
        return Err(format!(
            "domain name {domain:?} invalid (top level domain {tld:?} cannot be all-numeric)"
        ));
    }
    for (i, label) in parts.iter().enumerate() {
        if i == parts.len() - 1 && label.is_empty() {
            return Ok(());
        }
        if !is_dns1123_label(label) {
            return Err(format!(
                "domain name {domain:?} invalid (label {label:?} invalid)"
            ));
        }
    }
    Ok(())
}

/// A fully qualified domain name.
pub fn validate_fqdn(fqdn: &str) -> Result<(), String> {
    dns1123_preconditions(fqdn)?;
    dns1123_labels(fqdn)
}

/// A domain that may start with a wildcard label (`*.example.com`, `*`).
pub fn validate_wildcard_domain(domain: &str) -> Result<(), String> {
    dns1123_preconditions(domain)?;
    let (first, rest) = match domain.split_once('.') {
        Some((f, r)) => (f, Some(r)),
        None => (domain, None),
    };
    if !is_wildcard_dns1123_label(first) {
        return Err(format!(
            "domain name {domain:?} invalid (label {first:?} invalid)"
        ));
    }
    match rest {
        Some(r) => dns1123_labels(r),
        None => Ok(()),
    }
}

pub fn validate_port(port: i64) -> Result<(), String> {
    if (1..=65535).contains(&port) {
        Ok(())
    } else {
        Err(format!("port number {port} must be in the range 1..65535"))
    }
}

fn validate_port_name(name: &str) -> Result<(), String> {
    if is_dns1123_label(name) {
        Ok(())
    } else {
        Err(format!("invalid port name: {name}"))
    }
}

const PROTOCOLS: [&str; 12] = [
    "http",
    "http_proxy",
    "http2",
    "https",
    "grpc",
    "grpc-web",
    "mongo",
    "mysql",
    "redis",
    "tcp",
    "tls",
    "udp",
];

fn protocol_known(p: &str) -> bool {
    PROTOCOLS.contains(&p.to_ascii_lowercase().as_str())
}

fn validate_protocol(p: &str) -> Result<(), String> {
    if p.is_empty() || protocol_known(p) {
        Ok(())
    } else {
        Err(format!("unsupported protocol: {p}"))
    }
}

fn is_http_protocol(p: &str) -> bool {
    matches!(
        p.to_ascii_lowercase().as_str(),
        "http" | "http2" | "grpc" | "grpc-web" | "http_proxy"
    )
}

fn is_tls_protocol(p: &str) -> bool {
    matches!(p.to_ascii_lowercase().as_str(), "https" | "tls")
}

fn validate_ip(addr: &str) -> Result<(), String> {
    addr.parse::<IpAddr>()
        .map(|_| ())
        .map_err(|_| format!("{addr} is not a valid IP"))
}

/// An address (`1.2.3.4`) or a CIDR block (`10.0.0.0/8`).
pub fn validate_ip_subnet(subnet: &str) -> Result<(), String> {
    if subnet.matches('/').count() == 1 {
        return subnet
            .parse::<ipnet::IpNet>()
            .map(|_| ())
            .map_err(|_| format!("{subnet} is not a valid CIDR block"));
    }
    validate_ip(subnet)
}

fn validate_unix_address(addr: &str) -> Result<(), String> {
    if addr.is_empty() {
        return Err("unix address must not be empty".into());
    }
    if addr.starts_with('@') {
        return Ok(());
    }
    if !addr.starts_with('/') || addr.ends_with('/') {
        return Err(format!("{addr} is not an absolute path to a file"));
    }
    Ok(())
}

/// A protobuf duration used for a timeout: at least 1ms, millisecond precision.
pub fn validate_duration(d: &Duration) -> Result<(), String> {
    let v = d.as_std();
    if v < StdDuration::from_millis(1) {
        return Err("duration must be greater than 1ms".into());
    }
    if !v.subsec_nanos().is_multiple_of(1_000_000) {
        return Err("only durations to ms precision are supported".into());
    }
    Ok(())
}

fn validate_percent(v: i32) -> Result<(), String> {
    if (0..=100).contains(&v) {
        Ok(())
    } else {
        Err(format!("percentage {v} is not in range 0..100"))
    }
}

fn validate_percentage(p: Option<&Percent>) -> Result<(), String> {
    match p {
        Some(p) if p.value < 0.0 || p.value > 100.0 || (p.value > 0.0 && p.value < 0.0001) => {
            Err(format!(
                "percentage {} is neither 0.0, nor in range [0.0001, 100.0]",
                p.value
            ))
        }
        _ => Ok(()),
    }
}

/// Kubernetes label keys and values, as Istio's `labels.Instance.Validate` checks them.
pub fn validate_labels(labels: &BTreeMap<String, String>) -> Result<(), String> {
    for (k, v) in labels {
        if !is_qualified_name(k) {
            return Err(format!("invalid tag key: {k:?}"));
        }
        if !is_label_value(v) {
            return Err(format!("invalid tag value: {v:?}"));
        }
    }
    Ok(())
}

fn is_label_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
        && s.as_bytes()[0].is_ascii_alphanumeric()
        && s.as_bytes()[s.len() - 1].is_ascii_alphanumeric()
}

fn is_qualified_name(s: &str) -> bool {
    match s.rsplit_once('/') {
        Some((prefix, name)) => {
            !prefix.is_empty()
                && prefix.len() <= 253
                && prefix.split('.').all(is_dns1123_label)
                && is_label_name(name)
        }
        None => is_label_name(s),
    }
}

fn is_label_value(s: &str) -> bool {
    s.is_empty() || is_label_name(s)
}

fn workload_selector(sel: Option<&WorkloadSelector>) -> Result<(), String> {
    label_selector_map(sel.map(|s| &s.match_labels))
}

fn label_selector_map(sel: Option<&BTreeMap<String, String>>) -> Result<(), String> {
    for (k, v) in sel.into_iter().flatten() {
        if k.is_empty() {
            return Err(format!(
                "empty key is not supported in selector: \"{k}={v}\""
            ));
        }
        if k.contains('*') || v.contains('*') {
            return Err(format!(
                "wildcard is not supported in selector: \"{k}={v}\""
            ));
        }
    }
    Ok(())
}

fn validate_export_to(
    ns: &str,
    export_to: &[String],
    service_entry: bool,
    dr_with_selector: bool,
    r: &mut Report,
) {
    if export_to.is_empty() {
        return;
    }
    let mut set: HashSet<String> = HashSet::new();
    for e in export_to {
        let key = if e == "." { ns.to_string() } else { e.clone() };
        if set.contains(&key) {
            if &key != e {
                r.err(format!(
                    "duplicate entries in exportTo: . and current namespace {ns}"
                ));
            } else {
                r.err(format!("duplicate entries in exportTo for entry {e}"));
            }
            continue;
        }
        if service_entry && e == "~" {
            set.insert(key);
            continue;
        }
        if key == "*" || key == "~" || is_dns1123_label(&key) {
            if key == "~" {
                r.err("exportTo ~ (no namespace) is only valid for ServiceEntry".to_string());
                continue;
            }
            set.insert(key);
        } else {
            r.err(format!(
                "only .,*, or a valid DNS 1123 label is allowed as exportTo entry: {key}"
            ));
        }
    }
    if dr_with_selector && !set.is_empty() {
        if set.contains(ns) {
            if set.len() > 1 {
                r.err("destination rule with workload selector cannot have multiple entries in exportTo");
            }
        } else {
            r.err("destination rule with workload selector cannot have exportTo beyond current namespace");
        }
    }
    if set.contains("*") && export_to.len() > 1 {
        r.err("cannot have both public (*) and non-public exportTo values for a resource");
    }
    if set.contains("~") && export_to.len() > 1 {
        r.err("cannot export service entry to no one (~) and someone");
    }
}

// ---------------------------------------------------------------------------------------------
// VirtualService

const RETRY_ON: [&str; 14] = [
    "5xx",
    "gateway-error",
    "reset",
    "connect-failure",
    "retriable-4xx",
    "refused-stream",
    "retriable-status-codes",
    "retriable-headers",
    "envoy-ratelimited",
    "cancelled",
    "deadline-exceeded",
    "internal",
    "resource-exhausted",
    "unavailable",
];

const HTTP_METHODS: [&str; 9] = [
    "GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "CONNECT", "OPTIONS", "TRACE",
];

/// Header prefix for JWT claim routing.
pub const JWT_CLAIM_PREFIX: &str = "@request.auth.claims";

fn virtual_service(ns: &str, vs: &VirtualServiceSpec, r: &mut Report) {
    let delegate = vs.hosts.is_empty();
    if delegate {
        if !vs.gateways.is_empty() {
            r.err("delegate virtual service must have no gateways specified");
        }
        if !vs.tls.is_empty() {
            r.err("delegate virtual service must have no tls route specified");
        }
        if !vs.tcp.is_empty() {
            r.err("delegate virtual service must have no tcp route specified");
        }
    }
    let mut applies_to_mesh = vs.gateways.is_empty();
    let mut applies_to_gateway = false;
    if !vs.gateways.is_empty() {
        gateway_names(&vs.gateways, r);
        for g in &vs.gateways {
            if g == "mesh" {
                applies_to_mesh = true;
            } else {
                applies_to_gateway = true;
            }
        }
    }
    if !applies_to_gateway {
        for m in vs.http.iter().flat_map(|h| h.matches.iter()) {
            for key in m.headers.keys().chain(m.without_headers.keys()) {
                if key.starts_with(JWT_CLAIM_PREFIX) {
                    r.err(format!(
                        "JWT claim based routing (key: {key}) is only supported for gateway, found no gateways: [{}]",
                        vs.gateways.join(" ")
                    ));
                }
            }
        }
    }
    let mut all_hosts_valid = true;
    for h in &vs.hosts {
        if let Err(e) = validate_wildcard_domain(h) {
            if h.parse::<IpAddr>().is_err() {
                r.err(e);
                all_hosts_valid = false;
            }
        } else if applies_to_mesh && h == "*" {
            r.err("wildcard host * is not allowed for virtual services bound to the mesh gateway");
            all_hosts_valid = false;
        }
    }
    if all_hosts_valid {
        for (i, a) in vs.hosts.iter().enumerate() {
            for b in &vs.hosts[i + 1..] {
                if hosts_match(a, b) {
                    r.err(format!("duplicate hosts in virtual service: {a} & {b}"));
                }
            }
        }
    }
    if vs.http.is_empty() && vs.tcp.is_empty() && vs.tls.is_empty() {
        r.err("http, tcp or tls must be provided in virtual service");
    }
    for h in &vs.http {
        http_route(h, delegate, r);
    }
    for t in &vs.tls {
        if t.matches.is_empty() {
            r.err("TLS route must have at least one match condition");
        }
        for m in &t.matches {
            tls_match(m, vs, r);
        }
        if t.route.is_empty() {
            r.err("TLS route is required");
        }
        route_destinations(&t.route, r);
    }
    for t in &vs.tcp {
        for m in &t.matches {
            for s in &m.destination_subnets {
                r.check(validate_ip_subnet(s));
            }
            if m.port != 0 {
                r.check(validate_port(m.port.into()));
            }
            r.check(validate_labels(&m.source_labels));
            gateway_names(&m.gateways, r);
        }
        if t.route.is_empty() {
            r.err("TCP route is required");
        }
        route_destinations(&t.route, r);
    }
    validate_export_to(ns, &vs.export_to, false, false, r);
    unreachable_http(&vs.http, r);
    unreachable_simple(
        vs.tcp
            .iter()
            .map(|t| t.matches.iter().map(to_json).collect::<Vec<_>>()),
        r,
    );
    unreachable_simple(
        vs.tls
            .iter()
            .map(|t| t.matches.iter().map(to_json).collect::<Vec<_>>()),
        r,
    );
}

/// Istio's `host.Name.Matches`: the hosts overlap, wildcards considered.
fn hosts_match(a: &str, b: &str) -> bool {
    let m = |p: &str, h: &str| {
        p == "*" || p == h || p.strip_prefix('*').is_some_and(|s| h.ends_with(s))
    };
    m(a, b) || m(b, a)
}

fn gateway_names(names: &[String], r: &mut Report) {
    for g in names {
        match g.split_once('/') {
            None => {
                if let Some((name, ns)) = g.split_once('.') {
                    let ns = ns.split('.').next().unwrap_or(ns);
                    r.warn(format!(
                        "using legacy gatewayName format {g:?}; prefer the <namespace>/<name> format: \"{ns}/{name}\""
                    ));
                }
                r.check(validate_fqdn(g));
                return;
            }
            Some((ns, name)) => {
                if ns.is_empty() || name.is_empty() {
                    r.err("config namespace and gateway name cannot be empty");
                }
                if !is_dns1123_label(ns) {
                    r.err(format!("invalid value for namespace: {ns:?}"));
                }
                if !is_dns1123_label(name) {
                    r.err(format!("invalid value for gateway name: {name:?}"));
                }
            }
        }
    }
}

fn string_match_regex(sm: Option<&StringMatch>, place: &str, r: &mut Report) {
    let Some(re) = sm.and_then(|s| s.regex.as_deref()) else {
        return;
    };
    if re.is_empty() {
        r.err(format!("{place:?}: regex string match should not be empty"));
    } else if re.len() > 1024 {
        r.err(format!(
            "{place:?}: regex is too large, max length allowed is 1024"
        ));
    } else if let Err(e) = regex::Regex::new(re) {
        r.err(format!(
            "{place:?}: {e}; Istio uses RE2 style regex-based match (https://github.com/google/re2/wiki/Syntax)"
        ));
    }
}

fn string_match_oneof(sm: Option<&StringMatch>, place: &str, r: &mut Report) {
    if let Some(sm) = sm {
        let set = [&sm.exact, &sm.prefix, &sm.regex]
            .iter()
            .filter(|v| v.is_some())
            .count();
        if set > 1 {
            r.err(format!(
                "{place}: only one of exact, prefix or regex may be set"
            ));
        }
    }
}

fn header_value(v: &str) -> Result<(), String> {
    if !v.matches('%').count().is_multiple_of(2) {
        Err("single % not allowed.  Escape by doubling to %% or encase Envoy variable name in pair of %".into())
    } else {
        Ok(())
    }
}

fn header_name_for_request_set(name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err("header name cannot be empty".into());
    }
    if name.starts_with(':') && !name.eq_ignore_ascii_case(":authority") {
        return Err(format!(
            "invalid header {name:?}: header cannot have \":\" prefix"
        ));
    }
    Ok(())
}

fn header_name_for_op(name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err("header name cannot be empty".into());
    }
    if name.eq_ignore_ascii_case("host") {
        return Err(format!("invalid header {name:?}: cannot set Host header"));
    }
    if name.starts_with(':') {
        return Err(format!(
            "invalid header {name:?}: header cannot have \":\" prefix"
        ));
    }
    Ok(())
}

fn headers(h: Option<&Headers>, r: &mut Report) {
    let Some(h) = h else { return };
    if let Some(req) = &h.request {
        for (n, v) in req.add.iter().chain(req.set.iter()) {
            r.check(header_name_for_request_set(n));
            r.check(header_value(v));
        }
        for n in &req.remove {
            r.check(header_name_for_op(n));
        }
    }
    if let Some(resp) = &h.response {
        for (n, v) in resp.add.iter().chain(resp.set.iter()) {
            r.check(header_name_for_op(n));
            r.check(header_value(v));
        }
        for n in &resp.remove {
            r.check(header_name_for_op(n));
        }
    }
}

/// One `:authority` or `host` request header at most (it becomes the route's host rewrite).
fn authority_rewrite(h: &HttpRoute, r: &mut Report) {
    let request = h.headers.as_ref().and_then(|h| h.request.as_ref());
    let mut current: Option<&String> = None;
    for (k, v) in request.iter().flat_map(|q| q.set.iter().chain(&q.add)) {
        if !(k.eq_ignore_ascii_case(":authority") || k.eq_ignore_ascii_case("host")) {
            continue;
        }
        if let Some(have) = current {
            r.err(format!(
                "authority header cannot be set multiple times: have {have:?}, attempting to set {v:?}"
            ));
        }
        current = Some(v);
    }
}

fn http_route(h: &HttpRoute, delegate: bool, r: &mut Report) {
    // Mutually exclusive actions.
    if h.redirect.is_some() {
        if !h.route.is_empty() {
            r.err("HTTP route cannot contain both route and redirect");
        }
        if h.fault.is_some() {
            r.err("HTTP route cannot contain both fault and redirect");
        }
        if h.rewrite.is_some() {
            r.err("HTTP route rule cannot contain both rewrite and redirect");
        }
        if h.direct_response.is_some() {
            r.err("HTTP route cannot contain both redirect and direct_response");
        }
    } else if h.direct_response.is_some() && !h.route.is_empty() {
        r.err("HTTP route cannot contain both route and direct_response");
    }
    if h.delegate.is_some() {
        if delegate {
            r.err("http delegate only applies to a root virtual service");
        }
        if !h.route.is_empty() {
            r.err("HTTP route cannot contain both route and delegate");
        }
        if h.redirect.is_some() {
            r.err("HTTP route cannot contain both redirect and delegate");
        }
    } else if h.route.is_empty() && h.redirect.is_none() && h.direct_response.is_none() {
        r.err("HTTP route, redirect, direct_response or delegate is required");
    }
    for m in &h.matches {
        for (name, sm) in &m.headers {
            if name.is_empty() {
                r.err("header name cannot be empty");
            }
            string_match_regex(Some(sm), "headers", r);
        }
        for (name, sm) in &m.without_headers {
            if name.is_empty() {
                r.err("header name cannot be empty");
            }
            string_match_regex(Some(sm), "withoutHeaders", r);
        }
        for (place, sm) in [
            ("uri", &m.uri),
            ("scheme", &m.scheme),
            ("method", &m.method),
            ("authority", &m.authority),
        ] {
            string_match_oneof(sm.as_ref(), place, r);
            string_match_regex(sm.as_ref(), place, r);
        }
        for sm in m.query_params.values() {
            string_match_regex(Some(sm), "queryParams", r);
        }
        if m.port != 0 {
            r.check(validate_port(m.port.into()));
        }
        r.check(validate_labels(&m.source_labels));
        gateway_names(&m.gateways, r);
        if m.ignore_uri_case && m.uri.as_ref().is_some_and(|u| u.regex.is_some()) {
            r.err("ignoreUriCase can not be used with regex match");
        }
    }
    headers(h.headers.as_ref(), r);
    authority_rewrite(h, r);
    if let Some(c) = &h.cors_policy {
        for o in &c.allow_origins {
            let m = o
                .exact
                .as_deref()
                .or(o.prefix.as_deref())
                .or(o.regex.as_deref())
                .unwrap_or("");
            if m.is_empty() {
                r.err(format!(
                    "'{m}' is not a valid match type for CORS allow origins"
                ));
            }
            string_match_regex(Some(o), "corsPolicy.allowOrigins", r);
        }
        for m in &c.allow_methods {
            if !HTTP_METHODS.contains(&m.as_str()) {
                r.err(format!("{m:?} is not a supported HTTP method"));
            }
        }
        for n in c.allow_headers.iter().chain(&c.expose_headers) {
            if n.is_empty() {
                r.err("header name cannot be empty");
            }
        }
        if let Some(ma) = &c.max_age {
            r.check(validate_duration(ma));
            if ma.as_std().subsec_nanos() > 0 {
                r.err("max_age duration is accurate only to seconds precision");
            }
        }
        if let Some(u) = &c.unmatched_preflights
            && !matches!(u.as_str(), "UNSPECIFIED" | "FORWARD" | "IGNORE")
        {
            r.err(format!(
                "corsPolicy.unmatchedPreflights {u:?} is not one of UNSPECIFIED, FORWARD, IGNORE"
            ));
        }
    }
    if let Some(f) = &h.fault {
        if f.abort.is_none() && f.delay.is_none() {
            r.err("HTTP fault injection must have an abort and/or a delay");
        }
        if let Some(a) = &f.abort {
            r.check(validate_percentage(a.percentage.as_ref()));
            if a.grpc_status.is_some() {
                r.err("gRPC abort fault injection not supported yet");
            } else if a.http2_error.is_some() {
                r.err("HTTP/2 abort fault injection not supported yet");
            } else if let Some(s) = a.http_status
                && !(200..=600).contains(&s)
            {
                r.err(format!("HTTP status {s} is not in range 200-599"));
            }
        }
        if let Some(d) = &f.delay {
            r.check(validate_percentage(d.percentage.as_ref()));
            if let Some(fd) = &d.fixed_delay {
                r.check(validate_duration(fd));
            } else if let Some(ed) = &d.exponential_delay {
                r.check(validate_duration(ed));
                r.err("exponentialDelay not supported yet");
            }
        }
    }
    if let Some(mp) = h.mirror_percent
        && mp > 100
    {
        r.err(format!(
            "mirror_percent must have a max value of 100 (it has {mp})"
        ));
    }
    r.check(validate_percentage(h.mirror_percentage.as_ref()));
    if let Some(m) = &h.mirror {
        destination(m, r);
    }
    for m in &h.mirrors {
        destination(&m.destination, r);
        r.check(validate_percentage(m.percentage.as_ref()));
    }
    if let Some(rd) = &h.redirect {
        if rd.uri.is_empty()
            && rd.authority.is_empty()
            && rd.port.is_none()
            && rd.derive_port.is_none()
            && rd.scheme.is_empty()
        {
            r.err("redirect must specify URI, authority, scheme, or port");
        }
        if rd.redirect_code != 0 && !(300..=399).contains(&rd.redirect_code) {
            r.err(format!(
                "{} is not a valid redirect code, must be 3xx",
                rd.redirect_code
            ));
        }
        if !rd.scheme.is_empty() && rd.scheme != "http" && rd.scheme != "https" {
            r.err("invalid redirect scheme, must be \"http\" or \"https\"");
        }
        if let Some(p) = rd.port.filter(|p| *p > 0) {
            r.check(validate_port(p.into()));
        }
    }
    if let Some(dr) = &h.direct_response {
        if !(200..=599).contains(&dr.status) {
            r.err(format!(
                "directResponse.status must be a valid HTTP status code: {}",
                dr.status
            ));
        }
        if let Some(b) = &dr.body
            && b.string.is_some()
            && b.bytes.is_some()
        {
            r.err("directResponse.body may have only one of string or bytes");
        }
    }
    if let Some(rt) = &h.retries {
        if rt.attempts < 0 {
            r.err("attempts cannot be negative");
        }
        if rt.attempts == 0
            && (rt.per_try_timeout.is_some()
                || !rt.retry_on.is_empty()
                || rt.retry_remote_localities.is_some())
        {
            r.err("http retry policy configured when attempts are set to 0 (disabled)");
        }
        if let Some(pt) = &rt.per_try_timeout {
            r.check(validate_duration(pt));
        }
        if !rt.retry_on.is_empty() {
            for p in rt.retry_on.split(',') {
                let status_code = p.parse::<u16>().is_ok_and(|c| (100..=599).contains(&c));
                if !status_code && !RETRY_ON.contains(&p) {
                    r.err(format!("{p:?} is not a valid retryOn policy"));
                }
            }
        }
    }
    if let Some(rw) = &h.rewrite {
        if rw.uri.is_empty() && rw.authority.is_empty() && rw.uri_regex_rewrite.is_none() {
            r.err("rewrite must specify URI, authority, or both");
        }
        if !rw.uri.is_empty() && rw.uri_regex_rewrite.is_some() {
            r.err("rewrite may only contain one of URI or UriRegexRewrite");
        }
        if let Some(rr) = &rw.uri_regex_rewrite
            && let Err(e) = regex::Regex::new(&rr.match_)
        {
            r.err(format!("uriRegexRewrite.match: {e}"));
        }
        if !rw.authority.is_empty()
            && h.headers
                .as_ref()
                .and_then(|x| x.request.as_ref())
                .is_some_and(|req| {
                    req.set.keys().chain(req.add.keys()).any(|k| {
                        k.eq_ignore_ascii_case("host") || k.eq_ignore_ascii_case(":authority")
                    })
                })
        {
            r.err("authority rewrite cannot be set with a Host header operation");
        }
    }
    let mut total = 0i32;
    for d in &h.route {
        headers(d.headers.as_ref(), r);
        destination(&d.destination, r);
        r.check(validate_percent(d.weight));
        total += d.weight;
    }
    if h.route.len() > 1 && total != 100 {
        r.err(format!("total destination weight {total} != 100"));
    }
    if let Some(t) = &h.timeout {
        r.check(validate_duration(t));
    }
}

fn route_destinations(dests: &[RouteDestination], r: &mut Report) {
    let mut total = 0i32;
    for d in dests {
        destination(&d.destination, r);
        r.check(validate_percent(d.weight));
        total += d.weight;
    }
    if dests.len() > 1 && total != 100 {
        r.err(format!("total destination weight {total} != 100"));
    }
}

fn destination(d: &Destination, r: &mut Report) {
    if d.host == "*" {
        r.err(format!("invalid destination host {}", d.host));
    } else {
        r.check(validate_wildcard_domain(&d.host));
    }
    if !d.subset.is_empty() && !is_dns1123_label(&d.subset) {
        r.err(format!("subset name is invalid: {}", d.subset));
    }
    if let Some(p) = &d.port {
        r.check(validate_port(p.number.into()));
    }
}

fn tls_match(m: &TlsMatchAttributes, vs: &VirtualServiceSpec, r: &mut Report) {
    if m.sni_hosts.is_empty() {
        r.err("TLS match must have at least one SNI host");
    }
    for sni in &m.sni_hosts {
        if let Err(e) = validate_wildcard_domain(sni) {
            if let Ok(ip) = sni.parse::<IpAddr>() {
                r.warn(format!(
                    "using an IP address ({:?}) goes against SNI spec and most clients do not support this",
                    ip.to_string()
                ));
            } else {
                r.err(e);
            }
            continue;
        }
        let subset_of = |pattern: &str| {
            pattern == "*"
                || pattern == sni
                || pattern
                    .strip_prefix('*')
                    .is_some_and(|s| sni.ends_with(s) && sni.len() > s.len())
        };
        if !vs.hosts.iter().any(|h| subset_of(h)) {
            r.err(format!(
                "SNI host {sni:?} is not a compatible subset of any of the virtual service hosts: [{}]",
                vs.hosts.join(", ")
            ));
        }
    }
    for s in &m.destination_subnets {
        r.check(validate_ip_subnet(s));
    }
    if m.port != 0 {
        r.check(validate_port(m.port.into()));
    }
    r.check(validate_labels(&m.source_labels));
    gateway_names(&m.gateways, r);
}

fn to_json<T: serde::Serialize>(v: &T) -> String {
    serde_json::to_string(v).unwrap_or_default()
}

fn http_route_name(h: &HttpRoute, i: usize) -> String {
    if h.name.is_empty() {
        format!("#{i}")
    } else {
        format!("{:?}", h.name)
    }
}

fn match_name(m: &HttpMatchRequest, i: usize) -> String {
    if m.name.is_empty() {
        format!("#{i}")
    } else {
        format!("{:?}", m.name)
    }
}

/// A prefix match's effective fields, for the overlapping-prefix check.
struct PrefixMatch {
    route: String,
    matched: String,
    prefix: String,
    port: u32,
    method: String,
    authority: String,
    headers: BTreeMap<String, String>,
    query: BTreeMap<String, String>,
    without: BTreeMap<String, String>,
}

fn exact_or_prefix(sm: Option<&StringMatch>) -> String {
    match sm {
        Some(StringMatch { exact: Some(e), .. }) if !e.is_empty() => format!("exact:{e}"),
        Some(StringMatch {
            prefix: Some(p), ..
        }) if !p.is_empty() => format!("prefix:{p}"),
        _ => String::new(),
    }
}

fn covered(a: &PrefixMatch, b: &PrefixMatch) -> bool {
    let map_covered = |x: &BTreeMap<String, String>, y: &BTreeMap<String, String>| {
        x.len() == y.len()
            && x.iter().all(|(k, v)| {
                y.get(k)
                    .is_some_and(|yv| v == yv || v.starts_with(yv.as_str()))
            })
    };
    b.prefix.starts_with(&a.prefix)
        && b.port == a.port
        && (a.method == b.method || a.method.starts_with(&b.method))
        && (a.authority == b.authority || a.authority.starts_with(&b.authority))
        && map_covered(&a.headers, &b.headers)
        && map_covered(&a.query, &b.query)
        && map_covered(&a.without, &b.without)
}

fn unreachable_http(routes: &[HttpRoute], r: &mut Report) {
    let mut seen: HashMap<String, usize> = HashMap::new();
    let mut empty_seen = false;
    let mut prefixes: Vec<PrefixMatch> = Vec::new();
    for (rn, route) in routes.iter().enumerate() {
        if route.matches.is_empty() {
            if empty_seen {
                r.reachability.push(Reachability::UnreachableRule {
                    rule: http_route_name(route, rn),
                    reason: "only the last rule can have no matches".into(),
                });
            }
            empty_seen = true;
            continue;
        }
        let mut dups = 0;
        for (mn, m) in route.matches.iter().enumerate() {
            let mut unnamed = m.clone();
            unnamed.name.clear();
            let key = to_json(&unnamed);
            if let Some(&prev) = seen.get(&key) {
                r.reachability.push(Reachability::IneffectiveMatch {
                    rule: http_route_name(route, rn),
                    matched: match_name(m, mn),
                    duplicate_of: http_route_name(&routes[prev], prev),
                });
                dups += 1;
                continue;
            }
            seen.insert(key, rn);
            if let Some(p) = m
                .uri
                .as_ref()
                .and_then(|u| u.prefix.clone())
                .filter(|p| !p.is_empty())
            {
                let mut method = exact_or_prefix(m.method.as_ref());
                if method.is_empty() {
                    method = "exact:GET".into();
                }
                let conv = |hm: &BTreeMap<String, StringMatch>| {
                    hm.iter()
                        .map(|(k, v)| (k.clone(), exact_or_prefix(Some(v))))
                        .collect()
                };
                prefixes.push(PrefixMatch {
                    route: http_route_name(route, rn),
                    matched: match_name(m, mn),
                    prefix: p,
                    port: m.port,
                    method,
                    authority: exact_or_prefix(m.authority.as_ref()),
                    headers: conv(&m.headers),
                    query: conv(&m.query_params),
                    without: conv(&m.without_headers),
                });
            }
        }
        if dups == route.matches.len() {
            r.reachability.push(Reachability::UnreachableRule {
                rule: http_route_name(route, rn),
                reason: "all matches used by prior rules".into(),
            });
        }
    }
    for (i, a) in prefixes.iter().enumerate() {
        for b in &prefixes[i + 1..] {
            if a.prefix == b.prefix {
                continue;
            }
            if covered(a, b) {
                r.reachability.push(Reachability::IneffectiveMatch {
                    rule: b.route.clone(),
                    matched: format!("{} of prefix {}", b.matched, b.prefix),
                    duplicate_of: format!("{} of prefix {} on {}", a.matched, a.prefix, a.route),
                });
            }
        }
    }
}

/// TCP and TLS routes: duplicate matches and misplaced match-less rules.
fn unreachable_simple(routes: impl Iterator<Item = Vec<String>>, r: &mut Report) {
    let routes: Vec<Vec<String>> = routes.collect();
    let mut seen: HashMap<&str, usize> = HashMap::new();
    let mut empty_seen = false;
    for (rn, matches) in routes.iter().enumerate() {
        if matches.is_empty() {
            if empty_seen {
                r.reachability.push(Reachability::UnreachableRule {
                    rule: format!("#{rn}"),
                    reason: "only the last rule can have no matches".into(),
                });
            }
            empty_seen = true;
            continue;
        }
        let mut dups = 0;
        for (mn, m) in matches.iter().enumerate() {
            if let Some(&prev) = seen.get(m.as_str()) {
                r.reachability.push(Reachability::IneffectiveMatch {
                    rule: format!("#{rn}"),
                    matched: format!("#{mn}"),
                    duplicate_of: format!("#{prev}"),
                });
                dups += 1;
            } else {
                seen.insert(m, rn);
            }
        }
        if dups == matches.len() {
            r.reachability.push(Reachability::UnreachableRule {
                rule: format!("#{rn}"),
                reason: "all matches used by prior rules".into(),
            });
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Gateway

fn gateway(name: &str, g: &GatewaySpec, r: &mut Report) {
    if !is_dns1123_label(name) {
        r.err(format!("invalid gateway name: {name:?}"));
    }
    if g.servers.is_empty() {
        r.err("gateway must have at least one server");
    }
    let mut port_names = HashSet::new();
    for s in &g.servers {
        server(s, r);
        if let Some(p) = &s.port {
            if !port_names.insert(p.name.clone()) {
                r.err(format!(
                    "port names in servers must be unique: duplicate name {}",
                    p.name
                ));
            }
            if !is_http_protocol(&p.protocol) && s.tls.as_ref().is_some_and(|t| t.https_redirect) {
                r.warn("tls.httpsRedirect should only be used with http servers");
            }
        }
    }
}

fn server(s: &Server, r: &mut Report) {
    if s.hosts.is_empty() {
        r.err("server config must contain at least one host");
    }
    for h in &s.hosts {
        namespace_slash_host(h, true, r);
    }
    let port_ok = match &s.port {
        None => {
            r.err("port is required");
            false
        }
        Some(p) => {
            let before = r.errors.len();
            if !protocol_known(&p.protocol) {
                r.err(format!(
                    "invalid protocol {:?}, supported protocols are HTTP, HTTP2, GRPC, GRPC-WEB, MONGO, REDIS, MYSQL, TCP",
                    p.protocol
                ));
            }
            if p.number > 0 {
                r.check(validate_port(p.number.into()));
            }
            if p.name.is_empty() {
                r.err(format!(
                    "port name must be set: number:{} protocol:{:?}",
                    p.number, p.protocol
                ));
            }
            r.errors.len() == before
        }
    };
    if s.bind.starts_with("unix://") {
        r.check(validate_unix_address(&s.bind["unix://".len()..]));
        if s.port.as_ref().is_some_and(|p| p.number != 0) {
            r.err("port number must be 0 for unix domain socket");
        }
    } else if !s.bind.is_empty() {
        r.check(validate_ip(&s.bind));
    }
    server_tls(s.tls.as_ref(), r);
    if port_ok && let Some(p) = &s.port {
        let tls_proto = is_tls_protocol(&p.protocol);
        match &s.tls {
            None if tls_proto => r.err("server must have TLS settings for HTTPS/TLS protocols"),
            Some(t) if !tls_proto => {
                if is_http_protocol(&p.protocol) {
                    if !t.https_redirect
                        || !t.ca_certificates.is_empty()
                        || !t.private_key.is_empty()
                        || !t.server_certificate.is_empty()
                    {
                        r.err("server cannot have TLS settings for plain text HTTP ports");
                    }
                } else {
                    r.err("server cannot have TLS settings for non HTTPS/TLS ports");
                }
            }
            _ => {}
        }
    }
}

fn server_tls(t: Option<&ServerTlsSettings>, r: &mut Report) {
    let Some(t) = t else { return };
    let mode = t.mode.as_deref().unwrap_or("PASSTHROUGH");
    match mode {
        "ISTIO_MUTUAL" => {
            if !t.server_certificate.is_empty() {
                r.err("ISTIO_MUTUAL TLS cannot have associated server certificate");
            }
            if !t.private_key.is_empty() {
                r.err("ISTIO_MUTUAL TLS cannot have associated private key");
            }
            if !t.ca_certificates.is_empty() {
                r.err("ISTIO_MUTUAL TLS cannot have associated CA bundle");
            }
            if !t.credential_name.is_empty() {
                r.err("ISTIO_MUTUAL TLS cannot have associated credentialName");
            }
        }
        "PASSTHROUGH" | "AUTO_PASSTHROUGH"
            if !(t.server_certificate.is_empty()
                && t.private_key.is_empty()
                && t.ca_certificates.is_empty()
                && t.credential_name.is_empty()) =>
        {
            r.warn(format!(
                "{mode} mode does not use certificates, they will be ignored"
            ));
        }
        "SIMPLE" | "MUTUAL" if !t.credential_name.is_empty() => {}
        "SIMPLE" => {
            if t.server_certificate.is_empty() {
                r.err("SIMPLE TLS requires a server certificate");
            }
            if t.private_key.is_empty() {
                r.err("SIMPLE TLS requires a private key");
            }
        }
        "MUTUAL" => {
            if t.server_certificate.is_empty() {
                r.err("MUTUAL TLS requires a server certificate");
            }
            if t.private_key.is_empty() {
                r.err("MUTUAL TLS requires a private key");
            }
            if t.ca_certificates.is_empty() {
                r.err("MUTUAL TLS requires a client CA bundle");
            }
        }
        _ => {}
    }
}

fn namespace_slash_host(h: &str, is_gateway: bool, r: &mut Report) {
    let Some((ns, host)) = h.split_once('/') else {
        if is_gateway {
            hostname_part(h, true, r);
        } else {
            r.err("host must be of form namespace/dnsName");
        }
        return;
    };
    if ns.is_empty() || host.is_empty() {
        r.err("config namespace and dnsName in host entry cannot be empty");
    }
    let allowed_ns = if is_gateway {
        ns == "*" || ns == "."
    } else {
        ns == "*" || ns == "." || ns == "~"
    };
    if !allowed_ns && !is_dns1123_label(ns) {
        r.err(format!(
            "invalid namespace value {ns:?} in {}",
            if is_gateway { "gateway" } else { "sidecar" }
        ));
    }
    hostname_part(host, is_gateway, r);
}

fn hostname_part(host: &str, is_gateway: bool, r: &mut Report) {
    if host != "*" && !host.contains('.') {
        r.err("short names (non FQDN) are not allowed");
    }
    if let Err(e) = validate_wildcard_domain(host)
        && (!is_gateway || host.parse::<IpAddr>().is_err())
    {
        r.err(e);
    }
}

// ---------------------------------------------------------------------------------------------
// DestinationRule

fn destination_rule(ns: &str, d: &DestinationRuleSpec, r: &mut Report) {
    if d.host.is_empty() {
        if d.workload_selector.is_some() {
            r.err("mesh/namespace destination rule cannot have workloadSelector configured");
        }
        if !d.subsets.is_empty() {
            r.err("mesh/namespace destination rule cannot have subsets");
        }
        if !d.export_to.is_empty() {
            r.err("mesh/namespace destination rule cannot have exportTo configured");
        }
        if d.traffic_policy
            .as_ref()
            .is_some_and(|t| !t.port_level_settings.is_empty())
        {
            r.err("mesh/namespace destination rule cannot have portLevelSettings configured");
        }
    } else {
        r.check(validate_wildcard_domain(&d.host));
    }
    traffic_policy(d.traffic_policy.as_ref(), r);
    for s in &d.subsets {
        if s.name.is_empty() {
            r.err("subset name cannot be empty");
        } else if !is_dns1123_label(&s.name) {
            r.err(format!("subset name is invalid: {}", s.name));
        }
        r.check(validate_labels(&s.labels));
        traffic_policy(s.traffic_policy.as_ref(), r);
    }
    validate_export_to(ns, &d.export_to, false, d.workload_selector.is_some(), r);
    r.check(workload_selector(d.workload_selector.as_ref()));
}

fn traffic_policy(tp: Option<&TrafficPolicy>, r: &mut Report) {
    let Some(tp) = tp else { return };
    if tp.outlier_detection.is_none()
        && tp.connection_pool.is_none()
        && tp.load_balancer.is_none()
        && tp.tls.is_none()
        && tp.port_level_settings.is_empty()
        && tp.tunnel.is_none()
        && tp.proxy_protocol.is_none()
        && tp.retry_budget.is_none()
    {
        r.err("traffic policy must have at least one field");
        return;
    }
    outlier_detection(tp.outlier_detection.as_ref(), r);
    connection_pool(tp.connection_pool.as_ref(), r);
    load_balancer(tp.load_balancer.as_ref(), r);
    client_tls(tp.tls.as_ref(), r);
    for p in &tp.port_level_settings {
        if p.port.is_none() {
            r.err("portTrafficPolicy must have valid port");
        }
        if p.outlier_detection.is_none()
            && p.connection_pool.is_none()
            && p.load_balancer.is_none()
            && p.tls.is_none()
        {
            r.err("port traffic policy must have at least one field");
        } else {
            outlier_detection(p.outlier_detection.as_ref(), r);
            connection_pool(p.connection_pool.as_ref(), r);
            load_balancer(p.load_balancer.as_ref(), r);
            client_tls(p.tls.as_ref(), r);
        }
    }
}

fn outlier_detection(o: Option<&OutlierDetection>, r: &mut Report) {
    let Some(o) = o else { return };
    if let Some(d) = &o.base_ejection_time {
        r.check(validate_duration(d));
    }
    if o.consecutive_errors.is_some_and(|c| c != 0) {
        r.warn("outlier detection consecutive errors is deprecated, use consecutiveGatewayErrors or consecutive5xxErrors instead");
    }
    if !o.split_external_local_origin_errors
        && o.consecutive_local_origin_failures.is_some_and(|c| c > 0)
    {
        r.err("outlier detection consecutive local origin failures is specified, but split external local origin errors is set to false");
    }
    if let Some(d) = &o.interval {
        r.check(validate_duration(d));
    }
    r.check(validate_percent(o.max_ejection_percent.unwrap_or(0)));
    r.check(validate_percent(o.min_health_percent.unwrap_or(0)));
}

fn connection_pool(c: Option<&ConnectionPoolSettings>, r: &mut Report) {
    let Some(c) = c else { return };
    if c.http.is_none() && c.tcp.is_none() {
        r.err("connection pool must have at least one field");
        return;
    }
    if let Some(h) = &c.http {
        if h.http1_max_pending_requests < 0 {
            r.err("http1 max pending requests must be non-negative");
        }
        if h.http2_max_requests < 0 {
            r.err("http2 max requests must be non-negative");
        }
        if h.max_requests_per_connection < 0 {
            r.err("max requests per connection must be non-negative");
        }
        if h.max_retries < 0 {
            r.err("max retries must be non-negative");
        }
        if let Some(d) = &h.idle_timeout {
            r.check(validate_duration(d));
        }
        if h.h2_upgrade_policy.as_deref() == Some("UPGRADE") && h.use_client_protocol {
            r.err("use client protocol must not be true when H2UpgradePolicy is UPGRADE");
        }
    }
    if let Some(t) = &c.tcp {
        if t.max_connections < 0 {
            r.err("max connections must be non-negative");
        }
        if let Some(d) = &t.connect_timeout {
            r.check(validate_duration(d));
        }
    }
}

fn load_balancer(lb: Option<&LoadBalancerSettings>, r: &mut Report) {
    let Some(lb) = lb else { return };
    if let Some(c) = lb
        .consistent_hash
        .as_ref()
        .and_then(|c| c.http_cookie.as_ref())
    {
        if c.name.is_empty() {
            r.err("name required for HttpCookie");
        }
        if c.ttl.is_none() {
            r.err("ttl required for HttpCookie");
        }
    }
    r.check(locality_lb(lb.locality_lb_setting.as_ref()));
}

fn locality_lb(l: Option<&LocalityLbSetting>) -> Result<(), String> {
    let Some(l) = l else { return Ok(()) };
    if !l.distribute.is_empty() && !l.failover.is_empty() {
        return Err("can not simultaneously specify 'distribute' and 'failover'".into());
    }
    for d in &l.distribute {
        let mut total = 0u32;
        for w in d.to.values() {
            if *w == 0 || *w > 100 {
                return Err("locality weight must be in range [1, 100]".into());
            }
            total += w;
        }
        if total != 100 {
            return Err(format!("total locality weight {total} != 100"));
        }
    }
    for f in &l.failover {
        if f.from == f.to {
            return Err("locality lb failover settings must specify different regions".into());
        }
        if f.from.contains('/') || f.to.contains('/') {
            return Err("locality lb failover only specify region".into());
        }
        if f.from.contains('*') || f.to.contains('*') {
            return Err("locality lb failover region should not contain '*' wildcard".into());
        }
    }
    Ok(())
}

fn client_tls(t: Option<&ClientTlsSettings>, r: &mut Report) {
    let Some(t) = t else { return };
    let mode = t.mode.as_deref().unwrap_or("DISABLE");
    if (mode == "SIMPLE" || mode == "MUTUAL") && !t.credential_name.is_empty() {
        if !t.client_certificate.is_empty()
            || !t.ca_certificates.is_empty()
            || !t.private_key.is_empty()
        {
            r.err("cannot specify client certificates or CA certificate If credentialName is set");
        }
        return;
    }
    if mode == "MUTUAL" {
        if t.client_certificate.is_empty() {
            r.err("client certificate required for mutual tls");
        }
        if t.private_key.is_empty() {
            r.err("private key required for mutual tls");
        }
    }
}

// ---------------------------------------------------------------------------------------------
// ServiceEntry, WorkloadEntry, WorkloadGroup

fn service_entry(ns: &str, se: &ServiceEntrySpec, r: &mut Report) {
    if let Some(sel) = &se.workload_selector {
        r.check(label_selector_map(Some(&sel.labels)));
        if !se.endpoints.is_empty() {
            r.err("only one of WorkloadSelector or Endpoints is allowed in Service Entry");
        }
    }
    if se.hosts.is_empty() {
        r.err("service entry must have at least one host");
    }
    for h in &se.hosts {
        if h == "*" {
            r.err(format!("invalid host {h}"));
        } else {
            r.check(validate_wildcard_domain(h));
        }
    }
    let mut cidr = false;
    for a in &se.addresses {
        cidr |= a.contains('/');
        r.check(validate_ip_subnet(a));
    }
    let resolution = se.resolution.as_deref().unwrap_or("NONE");
    if cidr && resolution != "NONE" && resolution != "STATIC" {
        r.err("CIDR addresses are allowed only for NONE/STATIC resolution types");
    }
    let mut names = HashSet::new();
    let mut numbers = HashSet::new();
    for p in &se.ports {
        if !names.insert(p.name.clone()) {
            r.err(format!(
                "service entry port name {:?} already defined",
                p.name
            ));
        }
        if !numbers.insert(p.number) {
            r.err(format!("service entry port {} already defined", p.number));
        }
        if p.target_port != 0 {
            r.check(validate_port(p.target_port.into()));
        }
        r.check(validate_port_name(&p.name));
        r.check(validate_protocol(&p.protocol));
        r.check(validate_port(p.number.into()));
    }
    match resolution {
        "NONE" => {
            if !se.endpoints.is_empty() {
                r.err("no endpoints should be provided for resolution type none");
            }
        }
        "STATIC" => {
            let mut unix = false;
            for e in &se.endpoints {
                if let Some(path) = e.address.strip_prefix("unix://") {
                    unix = true;
                    r.check(validate_unix_address(path));
                    if !e.ports.is_empty() {
                        r.err(format!(
                            "unix endpoint {} must not include ports",
                            e.address
                        ));
                    }
                } else {
                    r.check(validate_ip(&e.address));
                    for (name, port) in &e.ports {
                        if !names.contains(name) {
                            r.err(format!(
                                "endpoint port {port} is not defined by the service entry"
                            ));
                        }
                    }
                }
                r.check(validate_labels(&e.labels));
            }
            if unix && se.ports.len() != 1 {
                r.err("exactly 1 service port required for unix endpoints");
            }
        }
        "DNS" | "DNS_ROUND_ROBIN" => {
            if se.endpoints.is_empty() {
                for h in &se.hosts {
                    if validate_fqdn(h).is_err() {
                        r.err(format!("hosts must be FQDN if no endpoints are provided for resolution mode {resolution}"));
                    }
                }
            }
            for e in &se.endpoints {
                if e.address.parse::<IpAddr>().is_err() && validate_fqdn(&e.address).is_err() {
                    r.err(format!(
                        "endpoint address {:?} is not a valid FQDN or an IP address",
                        e.address
                    ));
                }
                r.check(validate_labels(&e.labels));
                for (name, port) in &e.ports {
                    if !names.contains(name) {
                        r.err(format!(
                            "endpoint port {port} is not defined by the service entry"
                        ));
                    }
                    r.check(validate_port_name(name));
                    r.check(validate_port((*port).into()));
                }
            }
            if !se.addresses.is_empty()
                && se.hosts.len() > 1
                && se
                    .ports
                    .iter()
                    .any(|p| !is_http_protocol(&p.protocol) && !is_tls_protocol(&p.protocol))
            {
                r.warn("service entry can not have more than one host specified simultaneously with address and tcp port");
            }
        }
        other => r.err(format!("unsupported resolution type {other}")),
    }
    if resolution != "NONE"
        && se.hosts.len() > 1
        && se
            .ports
            .iter()
            .any(|p| !is_http_protocol(&p.protocol) && !is_tls_protocol(&p.protocol))
    {
        r.err("multiple hosts provided with non-HTTP, non-TLS ports");
    }
    validate_export_to(ns, &se.export_to, true, false, r);
}

fn workload_entry(we: &WorkloadEntrySpec, r: &mut Report) {
    if we.address.is_empty() {
        r.err("address must be set");
        return;
    }
    if let Some(path) = we.address.strip_prefix("unix://") {
        r.check(validate_unix_address(path));
        if !we.ports.is_empty() {
            r.err(format!(
                "unix endpoint {} must not include ports",
                we.address
            ));
        }
    } else if we.address.parse::<IpAddr>().is_err() && validate_fqdn(&we.address).is_err() {
        r.err(format!(
            "endpoint address {:?} is not a valid FQDN or an IP address",
            we.address
        ));
    }
    r.check(validate_labels(&we.labels));
    for (name, port) in &we.ports {
        r.check(validate_port_name(name));
        r.check(validate_port((*port).into()));
    }
}

fn workload_group(wg: &WorkloadGroupSpec, r: &mut Report) {
    if let Some(m) = &wg.metadata
        && let Err(e) = validate_labels(&m.labels)
    {
        r.err(format!("invalid labels: {e}"));
    }
}

// ---------------------------------------------------------------------------------------------
// Sidecar

fn sidecar(ns: &str, s: &SidecarSpec, r: &mut Report) {
    if let Some(sel) = &s.workload_selector
        && let Err(e) = label_selector_map(Some(&sel.labels))
    {
        r.err(e);
        return;
    }
    if s.egress.is_empty() && s.ingress.is_empty() && s.outbound_traffic_policy.is_none() {
        r.err("sidecar: empty configuration provided");
        return;
    }
    let mut ports = HashSet::new();
    for i in &s.ingress {
        let Some(p) = &i.port else {
            r.err("sidecar: port is required for ingress listeners");
            continue;
        };
        if !p.name.is_empty() {
            r.check(validate_port_name(&p.name));
        }
        r.check(validate_protocol(&p.protocol));
        r.check(validate_port(p.number.into()));
        if !i.bind.is_empty() {
            r.check(validate_ip(&i.bind));
        }
        if !ports.insert(p.number) {
            r.err("sidecar: ports on IP bound listeners must be unique");
        }
        if !i.default_endpoint.is_empty() {
            if let Some(path) = i.default_endpoint.strip_prefix("unix://") {
                r.check(validate_unix_address(path));
            } else {
                let form = "sidecar: defaultEndpoint must be of form 127.0.0.1:<port>, 0.0.0.0:<port>, unix://filepath, or unset";
                match i.default_endpoint.rsplit_once(':') {
                    None => r.err(form),
                    Some((host, port)) => {
                        if !host.is_empty() && host != "127.0.0.1" && host != "0.0.0.0" {
                            r.err(form);
                        }
                        match port.parse::<i64>() {
                            Ok(p) => r.check(validate_port(p)),
                            Err(e) => r.err(format!(
                                "sidecar: defaultEndpoint port ({port}) is not a number: {e}"
                            )),
                        }
                    }
                }
            }
        }
        if let Some(t) = &i.tls {
            if !t.subject_alt_names.is_empty() {
                r.err("sidecar: subjectAltNames is not supported in ingress tls");
            }
            if t.https_redirect {
                r.err("sidecar: httpsRedirect is not supported");
            }
            if !t.credential_name.is_empty() {
                r.err("sidecar: credentialName is not currently supported");
            }
            if let Some(m @ ("ISTIO_MUTUAL" | "AUTO_PASSTHROUGH")) = t.mode.as_deref() {
                r.err(format!(
                    "configuration is invalid: cannot set mode to {m} in sidecar ingress tls"
                ));
            }
            if !is_tls_protocol(&p.protocol) {
                r.err("server cannot have TLS settings for non HTTPS/TLS ports");
            }
            server_tls(Some(t), r);
        }
    }
    let mut ports = HashSet::new();
    let mut uds = HashSet::new();
    let mut catch_all = false;
    for (idx, e) in s.egress.iter().enumerate() {
        match &e.port {
            None => {
                if catch_all {
                    r.err("sidecar: egress can have only one listener with empty port");
                    continue;
                }
                if idx == s.egress.len() - 1 {
                    catch_all = true;
                } else {
                    r.err("sidecar: the egress listener with empty port should be the last listener in the list");
                }
            }
            Some(p) => {
                if !p.name.is_empty() {
                    r.check(validate_port_name(&p.name));
                }
                r.check(validate_protocol(&p.protocol));
                if p.number == 0 {
                    match e.bind.strip_prefix("unix://") {
                        Some(path) => r.check(validate_unix_address(path)),
                        None => r.err("sidecar: ports with 0 value must have a unix domain socket bind address"),
                    }
                    if !matches!(
                        e.capture_mode.as_deref(),
                        None | Some("DEFAULT") | Some("NONE")
                    ) {
                        r.err("sidecar: captureMode must be DEFAULT/NONE for unix domain socket listeners");
                    }
                    if !uds.insert(e.bind.clone()) {
                        r.err("sidecar: unix domain socket values for listeners must be unique");
                    }
                } else {
                    r.check(validate_port(p.number.into()));
                    if !e.bind.is_empty() {
                        r.check(validate_ip(&e.bind));
                    }
                    if !ports.insert(p.number) {
                        r.err("sidecar: ports on IP bound listeners must be unique");
                    }
                }
            }
        }
        if e.hosts.is_empty() {
            r.err("sidecar: egress listener must contain at least one host");
            continue;
        }
        let mut by_ns: HashMap<String, HashSet<String>> = HashMap::new();
        for h in &e.hosts {
            if let Some((hns, svc)) = h.split_once('/') {
                let hns = if hns == "." {
                    ns.to_string()
                } else {
                    hns.to_string()
                };
                let entry = by_ns.entry(hns).or_default();
                if svc != "*" {
                    if entry.contains(svc) || entry.contains("*") {
                        r.warn(format!("duplicated egress host: {h}"));
                    }
                } else if !entry.is_empty() {
                    r.warn(format!("duplicated egress host: {h}"));
                }
                entry.insert(svc.to_string());
            }
            namespace_slash_host(h, false, r);
        }
        if by_ns.get("*").is_some_and(|s| s.contains("*")) && by_ns.len() != 1 {
            r.warn("`*/*` host select all resources, no other hosts can be added");
        }
    }
    if let Some(tp) = &s.outbound_traffic_policy
        && let Some(ep) = &tp.egress_proxy
    {
        if tp.mode.as_deref() != Some("ALLOW_ANY") {
            r.err("sidecar: egress_proxy must be set only with ALLOW_ANY outbound_traffic_policy mode");
            return;
        }
        r.check(validate_fqdn(&ep.host));
        if ep.port.is_none() {
            r.err("sidecar: egress_proxy port must be non-nil");
            return;
        }
        destination(ep, r);
    }
}

// ---------------------------------------------------------------------------------------------
// EnvoyFilter

const APPLY_TO: [&str; 11] = [
    "LISTENER",
    "FILTER_CHAIN",
    "NETWORK_FILTER",
    "HTTP_FILTER",
    "ROUTE_CONFIGURATION",
    "VIRTUAL_HOST",
    "HTTP_ROUTE",
    "CLUSTER",
    "EXTENSION_CONFIG",
    "BOOTSTRAP",
    "LISTENER_FILTER",
];

fn envoy_filter(ef: &EnvoyFilterSpec, r: &mut Report) {
    if let Some(sel) = &ef.workload_selector
        && let Err(e) = label_selector_map(Some(&sel.labels))
    {
        r.err(e);
        return;
    }
    for cp in &ef.config_patches {
        let Some(apply_to) = cp.apply_to.as_deref().filter(|a| *a != "INVALID") else {
            r.err("Envoy filter: missing applyTo");
            continue;
        };
        if !APPLY_TO.contains(&apply_to) {
            r.err(format!("Envoy filter: unknown applyTo {apply_to:?}"));
            continue;
        }
        let Some(patch) = &cp.patch else {
            r.err("Envoy filter: missing patch");
            continue;
        };
        let Some(op) = patch.operation.as_deref().filter(|o| *o != "INVALID") else {
            r.err("Envoy filter: missing patch operation");
            continue;
        };
        if op != "REMOVE" && patch.value.is_none() {
            r.err("Envoy filter: missing patch value for non-remove operation");
            continue;
        }
        if let Some(m) = &cp.match_ {
            if let Some(pv) = m
                .proxy
                .as_ref()
                .map(|p| &p.proxy_version)
                .filter(|v| !v.is_empty())
                && let Err(e) = regex::Regex::new(pv)
            {
                r.err(format!(
                    "Envoy filter: invalid regex for proxy version, [{e}]"
                ));
                continue;
            }
            let has_object =
                m.listener.is_some() || m.route_configuration.is_some() || m.cluster.is_some();
            match apply_to {
                "LISTENER" | "FILTER_CHAIN" | "NETWORK_FILTER" | "HTTP_FILTER" if has_object => {
                    let Some(l) = &m.listener else {
                        r.err("Envoy filter: applyTo for listener class objects cannot have non listener match");
                        continue;
                    };
                    if let Some(f) = l.filter_chain.as_ref().and_then(|fc| fc.filter.as_ref()) {
                        if apply_to == "LISTENER" || apply_to == "FILTER_CHAIN" {
                            r.warn(format!(
                                "Envoy filter: filter match has no effect when used with {apply_to}"
                            ));
                        }
                        if f.name.is_empty() {
                            r.err("Envoy filter: filter match has no name to match on");
                            continue;
                        }
                        if let Some(sf) = &f.sub_filter {
                            if apply_to != "HTTP_FILTER" {
                                r.err("Envoy filter: subfilter match can be used with applyTo HTTP_FILTER only");
                                continue;
                            }
                            if f.name != "envoy.filters.network.http_connection_manager"
                                && f.name != "envoy.http_connection_manager"
                            {
                                r.err("Envoy filter: subfilter match requires filter match with envoy.filters.network.http_connection_manager");
                                continue;
                            }
                            if sf.name.is_empty() {
                                r.err("Envoy filter: subfilter match has no name to match on");
                                continue;
                            }
                        }
                    }
                }
                "ROUTE_CONFIGURATION" | "VIRTUAL_HOST" | "HTTP_ROUTE"
                    if has_object && m.route_configuration.is_none() =>
                {
                    r.err("Envoy filter: applyTo for http route class objects cannot have non route configuration match");
                }
                "CLUSTER" if has_object && m.cluster.is_none() => {
                    r.err("Envoy filter: applyTo for cluster class objects cannot have non cluster match");
                }
                _ => {}
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Security

fn peer_authentication(pa: &PeerAuthenticationSpec, r: &mut Report) {
    let empty_selector = pa
        .selector
        .as_ref()
        .is_none_or(|s| s.match_labels.is_empty());
    if empty_selector && !pa.port_level_mtls.is_empty() {
        r.err("mesh/namespace peer authentication cannot have port level mTLS");
    }
    if pa.port_level_mtls.keys().any(|p| p.0 == 0) {
        r.err("port cannot be 0");
    }
    r.check(workload_selector(pa.selector.as_ref()));
}

fn request_authentication(ra: &RequestAuthenticationSpec, r: &mut Report) {
    r.check(workload_selector(ra.selector.as_ref()));
    for rule in &ra.jwt_rules {
        if rule.issuer.is_empty() {
            r.err("issuer must be set");
        }
        if rule.audiences.iter().any(String::is_empty) {
            r.err("audience must be non-empty string");
        }
        let uri = &rule.jwks_uri;
        // `file://` is an isthmus extension: keys kept beside the control plane.
        if !(uri.is_empty()
            || uri.starts_with("http://")
            || uri.starts_with("https://")
            || uri.starts_with("file:///"))
        {
            r.err(format!(
                "jwks URI {:?} must use http, https or file",
                rule.jwks_uri
            ));
        }
        if !rule.jwks.is_empty() && serde_json::from_str::<serde_json::Value>(&rule.jwks).is_err() {
            r.err("jwks parse error: invalid JSON");
        }
        if rule.from_headers.iter().any(|h| h.name.is_empty()) {
            r.err("location header name must be non-empty string");
        }
        if rule.from_params.iter().any(String::is_empty) {
            r.err("location query must be non-empty string");
        }
    }
}

/// Attribute names allowed in AuthorizationPolicy `when` conditions.
fn validate_attribute(key: &str, values: &[String]) -> Result<(), String> {
    let ip_key = matches!(key, "source.ip" | "remote.ip" | "destination.ip");
    let known = ip_key
        || matches!(
            key,
            "source.namespace"
                | "source.principal"
                | "source.serviceAccount"
                | "request.auth.principal"
                | "request.auth.audiences"
                | "request.auth.presenter"
                | "destination.port"
                | "connection.sni"
        )
        || (key.starts_with("request.headers[") && key.ends_with(']'))
        || (key.starts_with("request.auth.claims[") && key.ends_with(']'))
        || key.starts_with("experimental.envoy.filters.");
    if !known {
        return Err(format!("unknown attribute ({key})"));
    }
    if ip_key {
        for v in values {
            validate_ip_subnet(v)?;
        }
    }
    if key == "destination.port" {
        validate_policy_ports(values)?;
    }
    Ok(())
}

fn validate_policy_ports(ports: &[String]) -> Result<(), String> {
    for p in ports {
        match p.parse::<i64>() {
            Ok(n) if (0..=65535).contains(&n) => {}
            _ => return Err(format!("invalid port: {p}")),
        }
    }
    Ok(())
}

fn check_empty(field: &str, values: &[String]) -> Result<(), String> {
    if values.iter().any(String::is_empty) {
        Err(format!("empty value not allowed, found in {field}"))
    } else {
        Ok(())
    }
}

fn authorization_policy(ap: &AuthorizationPolicySpec, r: &mut Report) {
    r.check(workload_selector(ap.selector.as_ref()));
    let action = ap.action();
    if action == "CUSTOM" {
        if ap.rules.is_empty() {
            r.err("CUSTOM action without `rules` is meaningless as it will never be triggered, add an empty rule `{}` if you want it be triggered for every request");
        } else if ap.provider.as_ref().is_none_or(|p| p.name.is_empty()) {
            r.err("`provider.name` must not be empty");
        }
        for rule in &ap.rules {
            for src in rule.from.iter().filter_map(|f| f.source.as_ref()) {
                for (bad, name) in [
                    (!src.namespaces.is_empty(), "From.Namespaces"),
                    (!src.not_namespaces.is_empty(), "From.NotNamespaces"),
                    (!src.principals.is_empty(), "From.Principals"),
                    (!src.not_principals.is_empty(), "From.NotPrincipals"),
                    (!src.request_principals.is_empty(), "From.RequestPrincipals"),
                    (
                        !src.not_request_principals.is_empty(),
                        "From.NotRequestPrincipals",
                    ),
                ] {
                    if bad {
                        r.err(format!(
                            "{name} is currently not supported with CUSTOM action"
                        ));
                    }
                }
            }
            for w in &rule.when {
                if w.key == "source.namespace"
                    || w.key == "source.principal"
                    || w.key.starts_with("request.auth.")
                {
                    r.err(format!(
                        "{} is currently not supported with CUSTOM action",
                        w.key
                    ));
                }
            }
        }
    }
    if ap.provider.is_some() && action != "CUSTOM" {
        r.err(format!(
            "`provider` must not be with non CUSTOM action, found {action}"
        ));
    }
    if action == "DENY" && ap.rules.is_empty() {
        r.err("DENY action without `rules` is meaningless as it will never be triggered, add an empty rule `{}` if you want it be triggered for every request");
    }
    for (i, rule) in ap.rules.iter().enumerate() {
        for from in &rule.from {
            let Some(src) = &from.source else {
                r.err(format!("`from.source` must not be nil, found at rule {i}"));
                continue;
            };
            let lists: [(&str, &Vec<String>); 10] = [
                ("Principals", &src.principals),
                ("RequestPrincipals", &src.request_principals),
                ("Namespaces", &src.namespaces),
                ("IpBlocks", &src.ip_blocks),
                ("RemoteIpBlocks", &src.remote_ip_blocks),
                ("NotPrincipals", &src.not_principals),
                ("NotRequestPrincipals", &src.not_request_principals),
                ("NotNamespaces", &src.not_namespaces),
                ("NotIpBlocks", &src.not_ip_blocks),
                ("NotRemoteIpBlocks", &src.not_remote_ip_blocks),
            ];
            if lists.iter().all(|(_, l)| l.is_empty()) {
                r.err(format!(
                    "`from.source` must not be empty, found at rule {i}"
                ));
            }
            for ips in [
                &src.ip_blocks,
                &src.not_ip_blocks,
                &src.remote_ip_blocks,
                &src.not_remote_ip_blocks,
            ] {
                for ip in ips {
                    r.check(validate_ip_subnet(ip));
                }
            }
            for (name, l) in lists {
                r.check(check_empty(name, l));
            }
        }
        for to in &rule.to {
            let Some(op) = &to.operation else {
                r.err(format!("`to.operation` must not be nil, found at rule {i}"));
                continue;
            };
            let lists: [(&str, &Vec<String>); 8] = [
                ("Ports", &op.ports),
                ("Methods", &op.methods),
                ("Paths", &op.paths),
                ("Hosts", &op.hosts),
                ("NotPorts", &op.not_ports),
                ("NotMethods", &op.not_methods),
                ("NotPaths", &op.not_paths),
                ("NotHosts", &op.not_hosts),
            ];
            if lists.iter().all(|(_, l)| l.is_empty()) {
                r.err(format!(
                    "`to.operation` must not be empty, found at rule {i}"
                ));
            }
            r.check(validate_policy_ports(&op.ports));
            r.check(validate_policy_ports(&op.not_ports));
            for (name, l) in lists {
                r.check(check_empty(name, l));
            }
        }
        for w in &rule.when {
            if w.key.is_empty() {
                r.err("`key` must not be empty");
            } else if w.values.is_empty() && w.not_values.is_empty() {
                r.err(format!(
                    "at least one of `values` or `notValues` must be set for key {}",
                    w.key
                ));
            } else {
                if let Err(e) = validate_attribute(&w.key, &w.values) {
                    r.err(format!("invalid `value` for `key` {}: {e}", w.key));
                }
                if let Err(e) = validate_attribute(&w.key, &w.not_values) {
                    r.err(format!("invalid `notValue` for `key` {}: {e}", w.key));
                }
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Telemetry

/// Istio's metric names in a Telemetry `match.metric`.
const ISTIO_METRICS: &[&str] = &[
    "ALL_METRICS",
    "REQUEST_COUNT",
    "REQUEST_DURATION",
    "REQUEST_SIZE",
    "RESPONSE_SIZE",
    "TCP_OPENED_CONNECTIONS",
    "TCP_CLOSED_CONNECTIONS",
    "TCP_SENT_BYTES",
    "TCP_RECEIVED_BYTES",
    "GRPC_REQUEST_MESSAGES",
    "GRPC_RESPONSE_MESSAGES",
];

fn telemetry_metrics_override(
    o: &crate::istio::telemetry::MetricsOverrides,
    at: &str,
    r: &mut Report,
) {
    if let Some(m) = &o.match_ {
        if let Some(metric) = &m.metric
            && !ISTIO_METRICS.contains(&metric.as_str())
        {
            r.err(format!(
                "{at}: match.metric {metric:?} is not one of Istio's metrics"
            ));
        }
        if let Some(mode) = &m.mode
            && !["CLIENT_AND_SERVER", "CLIENT", "SERVER"].contains(&mode.as_str())
        {
            r.err(format!(
                "{at}: match.mode {mode:?} is not CLIENT_AND_SERVER, CLIENT or SERVER"
            ));
        }
    }
    for (tag, t) in &o.tag_overrides {
        match t.operation.as_deref().unwrap_or("UPSERT") {
            "UPSERT" if t.value.is_empty() => r.err(format!(
                "{at}: tagOverrides.{tag}: value must be set when operation is UPSERT"
            )),
            "REMOVE" if !t.value.is_empty() => r.err(format!(
                "{at}: tagOverrides.{tag}: value may only be set when operation is UPSERT"
            )),
            "UPSERT" | "REMOVE" => {}
            op => r.err(format!(
                "{at}: tagOverrides.{tag}: operation {op:?} is not UPSERT or REMOVE"
            )),
        }
    }
}

fn telemetry(t: &TelemetrySpec, r: &mut Report) {
    r.check(workload_selector(t.selector.as_ref()));
    let providers_ok = |ps: &[crate::istio::telemetry::ProviderRef]| {
        if ps.iter().any(|p| p.name.is_empty()) {
            Err("providers.name may not be empty".to_string())
        } else {
            Ok(())
        }
    };
    for (i, m) in t.metrics.iter().enumerate() {
        r.check(providers_ok(&m.providers));
        for (j, o) in m.overrides.iter().enumerate() {
            telemetry_metrics_override(o, &format!("metrics[{i}].overrides[{j}]"), r);
        }
    }
    if t.tracing.len() > 1 {
        r.warn("multiple tracing is not currently supported");
    }
    for tr in &t.tracing {
        if tr.providers.len() > 1 {
            r.warn("multiple providers is not currently supported");
        }
        r.check(providers_ok(&tr.providers));
        if tr
            .random_sampling_percentage
            .is_some_and(|p| !(0.0..=100.0).contains(&p))
        {
            r.err("randomSamplingPercentage must be in range [0.0, 100.0]");
        }
    }
    if t.access_logging.len() > 1 {
        r.warn("multiple accessLogging is not currently supported");
    }
    for (i, l) in t.access_logging.iter().enumerate() {
        if l.providers.len() > 1 {
            r.warn(format!(
                "accessLogging[{i}]: multiple providers is not currently supported"
            ));
        }
        r.check(providers_ok(&l.providers));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn domains() {
        assert!(validate_wildcard_domain("*.example.com").is_ok());
        assert!(validate_wildcard_domain("reviews").is_ok());
        assert!(validate_wildcard_domain("a..b").is_err());
        assert!(validate_fqdn("istio.io.").is_ok());
        assert!(validate_fqdn("a.123").is_err());
    }

    #[test]
    fn labels() {
        let ok: BTreeMap<String, String> =
            [("app.kubernetes.io/name".to_string(), "v1".to_string())].into();
        assert!(validate_labels(&ok).is_ok());
        let bad: BTreeMap<String, String> = [("-x".to_string(), "v".to_string())].into();
        assert!(validate_labels(&bad).is_err());
    }
}
