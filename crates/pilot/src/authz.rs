//! AuthorizationPolicy → Envoy RBAC filters on a sidecar's inbound chains, as Istio builds
//! them: one DENY filter, then one ALLOW filter (absent when no ALLOW policy applies: allow all),
//! and AUDIT as a LOG filter. Each rule is one Envoy policy: `to` and destination conditions
//! become permissions, `from` and source conditions principals.
//!
//! Request principals and `request.auth.*` match the verified JWT's payload, which the JWT
//! filter (see [`crate::authn`]) keeps in its metadata.
//!
//! TCP chains get the network RBAC filter with HTTP-only fields (hosts, methods, paths, request
//! principals, request headers) handled as Istio does, failing closed: an ALLOW rule that needs
//! them is dropped (it can never match), a DENY rule drops them (it matches more).

use envoy_types::pb::envoy::config::core::v3::CidrRange;
use envoy_types::pb::envoy::config::listener::v3::{Filter, filter};
use envoy_types::pb::envoy::config::rbac::v3::{
    Permission, Policy, Principal, Rbac, permission, principal, rbac,
};
use envoy_types::pb::envoy::config::route::v3::{HeaderMatcher, header_matcher};
use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3::{
    HttpFilter, http_filter,
};
use envoy_types::pb::envoy::r#type::matcher::v3::{
    ListMatcher, MetadataMatcher, OrMatcher, PathMatcher, RegexMatcher, StringMatcher,
    ValueMatcher, list_matcher, metadata_matcher, path_matcher, string_matcher, value_matcher,
};
use envoy_types::pb::google::protobuf::UInt32Value;
use envoy_types::util::pack_any;
use isthmus_config::istio::security::{Condition, Rule};

use crate::authn::{JWT_FILTER, JWT_PAYLOAD};
use crate::context::PushContext;
use crate::proxy::Proxy;

pub const HTTP_RBAC: &str = "envoy.filters.http.rbac";
pub const NETWORK_RBAC: &str = "envoy.filters.network.rbac";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Layer {
    Http,
    Tcp,
}

/// The RBAC configurations in evaluation order (DENY, ALLOW, AUDIT); CUSTOM is not built here.
fn rbacs(ctx: &PushContext, proxy: &Proxy, layer: Layer) -> Vec<(&'static str, Rbac)> {
    let policies = ctx.workload_policies(proxy, &ctx.snapshot.authorization_policies, |p| {
        let s = &p.spec;
        (
            s.selector.as_ref(),
            s.target_ref.is_some() || !s.target_refs.is_empty(),
        )
    });
    let mut out = Vec::new();
    for (action, envoy_action, label) in [
        ("DENY", rbac::Action::Deny, "deny"),
        ("ALLOW", rbac::Action::Allow, "allow"),
        ("AUDIT", rbac::Action::Log, "audit"),
    ] {
        let selected: Vec<_> = policies
            .iter()
            .filter(|p| p.object.spec.action() == action)
            .collect();
        if selected.is_empty() {
            continue;
        }
        let mut map = crate::maps::map();
        for p in selected {
            for (i, rule) in p.object.spec.rules.iter().enumerate() {
                let policy = policy_of(rule, action, layer, p.namespace(), ctx.domain());
                if let Some(policy) = policy {
                    map.insert(
                        format!("ns[{}]-policy[{}]-rule[{i}]", p.namespace(), p.name()),
                        policy,
                    );
                }
            }
        }
        out.push((
            label,
            Rbac {
                action: envoy_action as i32,
                policies: map,
                ..Default::default()
            },
        ));
    }
    out
}

/// HTTP RBAC filters for an inbound HTTP connection manager, before the router.
pub fn http_filters(ctx: &PushContext, proxy: &Proxy) -> Vec<HttpFilter> {
    use envoy_types::pb::envoy::extensions::filters::http::rbac::v3::Rbac as HttpRbac;
    rbacs(ctx, proxy, Layer::Http)
        .into_iter()
        .map(|(_, rules)| HttpFilter {
            name: HTTP_RBAC.into(),
            config_type: Some(http_filter::ConfigType::TypedConfig(pack_any(HttpRbac {
                rules: Some(rules),
                ..Default::default()
            }))),
            ..Default::default()
        })
        .collect()
}

/// Network RBAC filters for an inbound TCP chain, before the TCP proxy.
pub fn network_filters(ctx: &PushContext, proxy: &Proxy) -> Vec<Filter> {
    use envoy_types::pb::envoy::extensions::filters::network::rbac::v3::Rbac as NetworkRbac;
    rbacs(ctx, proxy, Layer::Tcp)
        .into_iter()
        .map(|(label, rules)| Filter {
            name: NETWORK_RBAC.into(),
            config_type: Some(filter::ConfigType::TypedConfig(pack_any(NetworkRbac {
                rules: Some(rules),
                stat_prefix: format!("tcp.{label}."),
                ..Default::default()
            }))),
        })
        .collect()
}

/// One rule as an Envoy policy; None when the rule can never match at this layer.
fn policy_of(
    rule: &Rule,
    action: &str,
    layer: Layer,
    namespace: &str,
    domain: &str,
) -> Option<Policy> {
    let drop_http = |has_http: bool| layer == Layer::Tcp && has_http;
    let mut permissions: Vec<Permission> = Vec::new();
    let mut principals: Vec<Principal> = Vec::new();

    // `to`: OR of operations, each an AND of its fields.
    let mut ops = Vec::new();
    for to in &rule.to {
        let Some(op) = &to.operation else { continue };
        let http_only = !op.hosts.is_empty()
            || !op.not_hosts.is_empty()
            || !op.methods.is_empty()
            || !op.not_methods.is_empty()
            || !op.paths.is_empty()
            || !op.not_paths.is_empty();
        if drop_http(http_only) && action == "ALLOW" {
            // This operation needs HTTP: at L4 it matches nothing.
            continue;
        }
        let mut and = Vec::new();
        let l7 = layer == Layer::Http;
        if l7 {
            push_or(&mut and, &op.hosts, |h| {
                perm_header(":authority", host_matcher(h))
            });
            push_not(&mut and, &op.not_hosts, |h| {
                perm_header(":authority", host_matcher(h))
            });
            push_or(&mut and, &op.methods, |m| perm_header(":method", exact(m)));
            push_not(&mut and, &op.not_methods, |m| {
                perm_header(":method", exact(m))
            });
            push_or(&mut and, &op.paths, perm_path);
            push_not(&mut and, &op.not_paths, perm_path);
        }
        push_or(&mut and, &op.ports, perm_port);
        push_not(&mut and, &op.not_ports, perm_port);
        ops.push(and_perm(and));
    }
    if !rule.to.is_empty() {
        if ops.is_empty() {
            return None;
        }
        permissions.push(or_perm(ops));
    }

    // `from`: OR of sources, each an AND of its fields.
    let mut sources = Vec::new();
    for from in &rule.from {
        let Some(src) = &from.source else { continue };
        let http_only =
            !src.request_principals.is_empty() || !src.not_request_principals.is_empty();
        if drop_http(http_only) && action == "ALLOW" {
            continue;
        }
        let mut and = Vec::new();
        push_or(&mut and, &src.principals, |p| {
            princ_authenticated(principal_matcher(p))
        });
        push_not(&mut and, &src.not_principals, |p| {
            princ_authenticated(principal_matcher(p))
        });
        push_or(&mut and, &src.namespaces, |n| {
            princ_authenticated(namespace_matcher(n))
        });
        push_not(&mut and, &src.not_namespaces, |n| {
            princ_authenticated(namespace_matcher(n))
        });
        push_or(&mut and, &src.ip_blocks, |c| princ_cidr(c, false));
        push_not(&mut and, &src.not_ip_blocks, |c| princ_cidr(c, false));
        push_or(&mut and, &src.remote_ip_blocks, |c| princ_cidr(c, true));
        push_not(&mut and, &src.not_remote_ip_blocks, |c| princ_cidr(c, true));
        push_or(&mut and, &src.service_accounts, |a| {
            princ_authenticated(service_account_matcher(a, namespace, domain))
        });
        push_not(&mut and, &src.not_service_accounts, |a| {
            princ_authenticated(service_account_matcher(a, namespace, domain))
        });
        if layer == Layer::Http {
            push_or(&mut and, &src.request_principals, request_principal);
            push_not(&mut and, &src.not_request_principals, |p| {
                request_principal(p)
            });
        }
        sources.push(and_princ(and));
    }
    if !rule.from.is_empty() {
        if sources.is_empty() {
            return None;
        }
        principals.push(or_princ(sources));
    }

    for c in &rule.when {
        match condition(c, layer, namespace, domain) {
            Some(Cond::Permission(p)) => permissions.push(p),
            Some(Cond::Principal(p)) => principals.push(p),
            // An HTTP condition at L4: an ALLOW can never match; a DENY ignores it.
            None if action == "ALLOW" => return None,
            None => {}
        }
    }
    Some(Policy {
        permissions: vec![and_perm(permissions)],
        principals: vec![and_princ(principals)],
        ..Default::default()
    })
}

enum Cond {
    Permission(Permission),
    Principal(Principal),
}

/// Istio's `when` keys; None for one that needs HTTP on a TCP chain.
fn condition(c: &Condition, layer: Layer, namespace: &str, domain: &str) -> Option<Cond> {
    let l7 = layer == Layer::Http;
    let key = c.key.as_str();
    let values = |f: &dyn Fn(&str) -> Principal| {
        let mut and = Vec::new();
        push_or(&mut and, &c.values, f);
        push_not(&mut and, &c.not_values, f);
        Cond::Principal(and_princ(and))
    };
    let pvalues = |f: &dyn Fn(&str) -> Permission| {
        let mut and = Vec::new();
        push_or(&mut and, &c.values, f);
        push_not(&mut and, &c.not_values, f);
        Cond::Permission(and_perm(and))
    };
    Some(match key {
        "source.ip" => values(&|v| princ_cidr(v, false)),
        "remote.ip" => values(&|v| princ_cidr(v, true)),
        "source.namespace" => values(&|v| princ_authenticated(namespace_matcher(v))),
        "source.principal" => values(&|v| princ_authenticated(principal_matcher(v))),
        "source.serviceAccount" => {
            values(&|v| princ_authenticated(service_account_matcher(v, namespace, domain)))
        }
        "destination.port" => pvalues(&perm_port),
        "destination.ip" => pvalues(&perm_cidr),
        "connection.sni" => pvalues(&|v| Permission {
            rule: Some(permission::Rule::RequestedServerName(host_matcher(v))),
        }),
        k if k.starts_with("request.headers[") && k.ends_with(']') => {
            if !l7 {
                return None;
            }
            let name = k["request.headers[".len()..k.len() - 1].to_ascii_lowercase();
            values(&|v| princ_header(&name, string_match(v)))
        }
        _ if !l7 => return None,
        "request.auth.principal" => values(&request_principal),
        "request.auth.audiences" => values(&|v| princ_claim(&["aud"], v)),
        "request.auth.presenter" => values(&|v| princ_claim(&["azp"], v)),
        k if k.starts_with("request.auth.claims[") && k.ends_with(']') => {
            // `request.auth.claims[a][b]`: the nested claim a.b.
            let inner = &k["request.auth.claims[".len()..k.len() - 1];
            let path: Vec<&str> = inner.split("][").collect();
            values(&|v| princ_claim(&path, v))
        }
        // What Istio does not support at all matches nothing.
        _ => values(&|_| princ_never()),
    })
}

/// A value in the verified JWT's payload (the JWT filter's metadata). The `metadata`
/// principal is what Istio emits (Envoy has since added `sourced_metadata`).
#[allow(deprecated)]
fn princ_payload(path: &[&str], value: ValueMatcher) -> Principal {
    let keys = std::iter::once(JWT_PAYLOAD).chain(path.iter().copied());
    Principal {
        identifier: Some(principal::Identifier::Metadata(MetadataMatcher {
            filter: JWT_FILTER.into(),
            path: keys
                .map(|k| metadata_matcher::PathSegment {
                    segment: Some(metadata_matcher::path_segment::Segment::Key(k.into())),
                })
                .collect(),
            value: Some(value),
            invert: false,
        })),
    }
}

fn value_string(m: StringMatcher) -> ValueMatcher {
    ValueMatcher {
        match_pattern: Some(value_matcher::MatchPattern::StringMatch(m)),
    }
}

/// A claim that is a string or a list of strings (`aud`, `groups`, `scope`): either matches.
fn princ_claim(path: &[&str], v: &str) -> Principal {
    let one = value_string(string_match(v));
    let list = ValueMatcher {
        match_pattern: Some(value_matcher::MatchPattern::ListMatch(Box::new(
            ListMatcher {
                match_pattern: Some(list_matcher::MatchPattern::OneOf(Box::new(one.clone()))),
            },
        ))),
    };
    princ_payload(
        path,
        ValueMatcher {
            match_pattern: Some(value_matcher::MatchPattern::OrMatch(OrMatcher {
                value_matchers: vec![one, list],
            })),
        },
    )
}

/// `<iss>/<sub>` of the verified JWT (split at the last `/`: issuers are often URLs), with
/// Istio's `*`, `prefix*` and `*suffix` forms.
fn request_principal(v: &str) -> Principal {
    let any = || {
        matcher(string_matcher::MatchPattern::SafeRegex(RegexMatcher {
            regex: ".+".into(),
            ..Default::default()
        }))
    };
    let (iss, sub) = match v.rsplit_once('/') {
        Some((iss, sub)) => (iss, Some(sub)),
        None => (v, None),
    };
    let (iss_m, sub_m) = if v == "*" {
        (any(), any())
    } else if let Some(rest) = v.strip_prefix('*') {
        match sub {
            Some(sub) if iss == "*" => (any(), exact(sub)),
            Some(sub) => (
                matcher(string_matcher::MatchPattern::Suffix(iss[1..].to_string())),
                exact(sub),
            ),
            None => (
                any(),
                matcher(string_matcher::MatchPattern::Suffix(rest.to_string())),
            ),
        }
    } else if let Some(rest) = v.strip_suffix('*') {
        match sub {
            Some("*") => (exact(iss), any()),
            Some(sub) => (
                exact(iss),
                matcher(string_matcher::MatchPattern::Prefix(
                    sub.trim_end_matches('*').to_string(),
                )),
            ),
            None => (
                matcher(string_matcher::MatchPattern::Prefix(rest.to_string())),
                any(),
            ),
        }
    } else {
        (exact(iss), exact(sub.unwrap_or_default()))
    };
    and_princ(vec![
        princ_payload(&["iss"], value_string(iss_m)),
        princ_payload(&["sub"], value_string(sub_m)),
    ])
}

/// Istio's `serviceAccounts`: `<namespace>/<name>`, or `<name>` in the policy's namespace.
fn service_account_matcher(v: &str, namespace: &str, domain: &str) -> StringMatcher {
    let (ns, sa) = v.split_once('/').unwrap_or((namespace, v));
    exact(&format!("spiffe://{domain}/ns/{ns}/sa/{sa}"))
}

fn push_or<T>(and: &mut Vec<T>, values: &[String], f: impl Fn(&str) -> T)
where
    T: Orable,
{
    if !values.is_empty() {
        and.push(T::or(values.iter().map(|v| f(v)).collect()));
    }
}

fn push_not<T>(and: &mut Vec<T>, values: &[String], f: impl Fn(&str) -> T)
where
    T: Orable,
{
    if !values.is_empty() {
        and.push(T::not(T::or(values.iter().map(|v| f(v)).collect())));
    }
}

trait Orable: Sized {
    fn or(items: Vec<Self>) -> Self;
    fn not(item: Self) -> Self;
}

impl Orable for Permission {
    fn or(items: Vec<Self>) -> Self {
        or_perm(items)
    }
    fn not(item: Self) -> Self {
        Permission {
            rule: Some(permission::Rule::NotRule(Box::new(item))),
        }
    }
}

impl Orable for Principal {
    fn or(items: Vec<Self>) -> Self {
        or_princ(items)
    }
    fn not(item: Self) -> Self {
        Principal {
            identifier: Some(principal::Identifier::NotId(Box::new(item))),
        }
    }
}

fn and_perm(rules: Vec<Permission>) -> Permission {
    if rules.is_empty() {
        return Permission {
            rule: Some(permission::Rule::Any(true)),
        };
    }
    Permission {
        rule: Some(permission::Rule::AndRules(permission::Set { rules })),
    }
}

fn or_perm(rules: Vec<Permission>) -> Permission {
    Permission {
        rule: Some(permission::Rule::OrRules(permission::Set { rules })),
    }
}

fn and_princ(ids: Vec<Principal>) -> Principal {
    if ids.is_empty() {
        return Principal {
            identifier: Some(principal::Identifier::Any(true)),
        };
    }
    Principal {
        identifier: Some(principal::Identifier::AndIds(principal::Set { ids })),
    }
}

fn or_princ(ids: Vec<Principal>) -> Principal {
    Principal {
        identifier: Some(principal::Identifier::OrIds(principal::Set { ids })),
    }
}

fn princ_never() -> Principal {
    Principal {
        identifier: Some(principal::Identifier::NotId(Box::new(Principal {
            identifier: Some(principal::Identifier::Any(true)),
        }))),
    }
}

fn matcher(p: string_matcher::MatchPattern) -> StringMatcher {
    StringMatcher {
        match_pattern: Some(p),
        ..Default::default()
    }
}

fn exact(v: &str) -> StringMatcher {
    matcher(string_matcher::MatchPattern::Exact(v.to_string()))
}

/// Istio's value syntax: `*` (present), `prefix*`, `*suffix`, exact.
fn string_match(v: &str) -> StringMatcher {
    if v == "*" {
        matcher(string_matcher::MatchPattern::SafeRegex(RegexMatcher {
            regex: ".+".into(),
            ..Default::default()
        }))
    } else if let Some(p) = v.strip_suffix('*') {
        matcher(string_matcher::MatchPattern::Prefix(p.to_string()))
    } else if let Some(s) = v.strip_prefix('*') {
        matcher(string_matcher::MatchPattern::Suffix(s.to_string()))
    } else {
        exact(v)
    }
}

/// Hosts compare without case, as `:authority` does.
fn host_matcher(v: &str) -> StringMatcher {
    StringMatcher {
        ignore_case: true,
        ..string_match(v)
    }
}

/// Principals are SPIFFE ids without the scheme in policies; the peer certificate has it.
fn principal_matcher(v: &str) -> StringMatcher {
    if v == "*" {
        return string_match(v);
    }
    let with_scheme = |s: &str| format!("spiffe://{s}");
    if let Some(p) = v.strip_suffix('*') {
        matcher(string_matcher::MatchPattern::Prefix(with_scheme(p)))
    } else if let Some(s) = v.strip_prefix('*') {
        matcher(string_matcher::MatchPattern::Suffix(s.to_string()))
    } else {
        exact(&with_scheme(v))
    }
}

fn namespace_matcher(ns: &str) -> StringMatcher {
    let re = if ns == "*" {
        ".*/ns/[^/]+/.*".to_string()
    } else if let Some(p) = ns.strip_suffix('*') {
        format!(".*/ns/{}[^/]*/.*", regex_escape(p))
    } else if let Some(s) = ns.strip_prefix('*') {
        format!(".*/ns/[^/]*{}/.*", regex_escape(s))
    } else {
        format!(".*/ns/{}/.*", regex_escape(ns))
    };
    matcher(string_matcher::MatchPattern::SafeRegex(RegexMatcher {
        regex: re,
        ..Default::default()
    }))
}

fn regex_escape(s: &str) -> String {
    let mut out = String::new();
    for c in s.chars() {
        if "\\.+*?()|[]{}^$".contains(c) {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

fn princ_authenticated(m: StringMatcher) -> Principal {
    Principal {
        identifier: Some(principal::Identifier::Authenticated(
            principal::Authenticated {
                principal_name: Some(m),
            },
        )),
    }
}

fn cidr(v: &str) -> CidrRange {
    let (ip, len) = match v.split_once('/') {
        Some((ip, len)) => (ip.to_string(), len.parse().unwrap_or(32)),
        None => (v.to_string(), if v.contains(':') { 128 } else { 32 }),
    };
    CidrRange {
        address_prefix: ip,
        prefix_len: Some(UInt32Value { value: len }),
    }
}

fn princ_cidr(v: &str, remote: bool) -> Principal {
    Principal {
        identifier: Some(if remote {
            principal::Identifier::RemoteIp(cidr(v))
        } else {
            principal::Identifier::DirectRemoteIp(cidr(v))
        }),
    }
}

fn princ_header(name: &str, m: StringMatcher) -> Principal {
    Principal {
        identifier: Some(principal::Identifier::Header(HeaderMatcher {
            name: name.to_string(),
            header_match_specifier: Some(header_matcher::HeaderMatchSpecifier::StringMatch(m)),
            ..Default::default()
        })),
    }
}

fn perm_header(name: &str, m: StringMatcher) -> Permission {
    Permission {
        rule: Some(permission::Rule::Header(HeaderMatcher {
            name: name.to_string(),
            header_match_specifier: Some(header_matcher::HeaderMatchSpecifier::StringMatch(m)),
            ..Default::default()
        })),
    }
}

/// Istio paths: exact, `prefix*`, `*suffix`, `*`, and the `{*}` (one segment) / `{**}` (any
/// segments) templates, which become a regex.
fn perm_path(p: &str) -> Permission {
    let m = if p.contains("{*}") || p.contains("{**}") {
        let mut re = String::new();
        let mut rest = p;
        while !rest.is_empty() {
            if let Some(r) = rest.strip_prefix("{**}") {
                re.push_str(".*");
                rest = r;
            } else if let Some(r) = rest.strip_prefix("{*}") {
                re.push_str("[^/]+");
                rest = r;
            } else {
                let c = rest.chars().next().unwrap_or_default();
                re.push_str(&regex_escape(&c.to_string()));
                rest = &rest[c.len_utf8()..];
            }
        }
        matcher(string_matcher::MatchPattern::SafeRegex(RegexMatcher {
            regex: re,
            ..Default::default()
        }))
    } else {
        string_match(p)
    };
    Permission {
        rule: Some(permission::Rule::UrlPath(PathMatcher {
            rule: Some(path_matcher::Rule::Path(m)),
        })),
    }
}

fn perm_port(p: &str) -> Permission {
    Permission {
        rule: Some(permission::Rule::DestinationPort(p.parse().unwrap_or(0))),
    }
}

fn perm_cidr(v: &str) -> Permission {
    Permission {
        rule: Some(permission::Rule::DestinationIp(cidr(v))),
    }
}
