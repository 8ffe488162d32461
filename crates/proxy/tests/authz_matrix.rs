//! Authorization matrix: AuthorizationPolicy YAML → the control plane's RBAC filters (as a
//! proxy receives them) → the proxy's RBAC engine, for requests and connections that differ in
//! one field at a time. Each row is policy × request → allow/deny.

use std::net::SocketAddr;

use envoy_types::pb::envoy::config::listener::v3::filter;
use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3::http_filter;
use isthmus_config::{Loader, MeshConfig};
use isthmus_pilot::authz::{http_filters, network_filters};
use isthmus_pilot::context::PushContext;
use isthmus_pilot::proxy::{NodeMetadata, Proxy};
use isthmus_proxy::config::rbac::{Input, Rbac, allowed, compile};
use prost::Message;

const WORKLOAD: &str = r#"
apiVersion: v1
kind: Pod
metadata: {name: ratings-0, namespace: bookinfo, labels: {app: ratings}}
spec: {containers: [{name: ratings}, {name: istio-proxy}]}
status: {podIP: 10.200.0.20}
---
"#;

/// The HTTP and TCP RBAC filters the ratings pod's inbound chains get.
fn filters(policies: &str) -> (Vec<Rbac>, Vec<Rbac>) {
    let loaded = Loader::default().load_str("p.yaml", &format!("{WORKLOAD}{policies}"));
    assert!(!loaded.has_errors(), "{:?}", loaded.diagnostics);
    let ctx = PushContext::new(
        loaded.resources.into_iter().collect(),
        MeshConfig::default(),
        "cluster.local",
        None,
    );
    let proxy = Proxy::from_node(
        "sidecar~10.200.0.20~ratings-0.bookinfo~bookinfo.svc.cluster.local",
        &NodeMetadata::default(),
    )
    .unwrap();
    let http = http_filters(&ctx, &proxy)
        .iter()
        .map(|f| match &f.config_type {
            Some(http_filter::ConfigType::TypedConfig(any)) => {
                let r = envoy_types::pb::envoy::extensions::filters::http::rbac::v3::Rbac::decode(
                    any.value.as_slice(),
                )
                .unwrap();
                compile(r.rules.as_ref().unwrap()).unwrap()
            }
            _ => panic!("untyped"),
        })
        .collect();
    let tcp = network_filters(&ctx, &proxy)
        .iter()
        .map(|f| match &f.config_type {
            Some(filter::ConfigType::TypedConfig(any)) => {
                let r =
                    envoy_types::pb::envoy::extensions::filters::network::rbac::v3::Rbac::decode(
                        any.value.as_slice(),
                    )
                    .unwrap();
                compile(r.rules.as_ref().unwrap()).unwrap()
            }
            _ => panic!("untyped"),
        })
        .collect();
    (http, tcp)
}

struct Req {
    principal: Option<&'static str>,
    source: &'static str,
    port: u16,
    method: &'static str,
    path: &'static str,
    host: &'static str,
    headers: Vec<(&'static str, &'static str)>,
}

fn req() -> Req {
    Req {
        principal: Some("spiffe://cluster.local/ns/bookinfo/sa/bookinfo-reviews"),
        source: "10.200.0.30",
        port: 9080,
        method: "GET",
        path: "/ratings/0",
        host: "ratings:9080",
        headers: vec![],
    }
}

/// The decision for `r`, as an HTTP request or, without one, as a TCP connection.
fn decide(f: &[Rbac], r: &Req, http: bool) -> bool {
    let mut b = http::Request::builder()
        .method(r.method)
        .uri(r.path)
        .header("host", r.host);
    for (k, v) in &r.headers {
        b = b.header(*k, *v);
    }
    let parts = b.body(()).unwrap().into_parts().0;
    allowed(
        f,
        &Input {
            principal: r.principal,
            source: SocketAddr::new(r.source.parse().unwrap(), 40000),
            destination: SocketAddr::new("10.200.0.20".parse().unwrap(), r.port),
            server_name: None,
            request: http.then_some(&parts),
            metadata: None,
        },
    )
}

fn http_allows(f: &[Rbac], r: &Req) -> bool {
    decide(f, r, true)
}

fn tcp_allows(f: &[Rbac], r: &Req) -> bool {
    decide(f, r, false)
}

/// Rules of a policy, a change to the base request, whether it is allowed.
type Case = (&'static str, fn(&mut Req), bool);

fn policy(action: &str, rules: &str) -> String {
    format!(
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {{name: p-{}, namespace: bookinfo}}\nspec:\n  selector: {{matchLabels: {{app: ratings}}}}\n  action: {action}\n  rules:\n{rules}\n",
        action.to_ascii_lowercase()
    )
}

#[test]
fn no_policy_allows_everything() {
    let (http, tcp) = filters("");
    assert!(http.is_empty() && tcp.is_empty());
    assert!(http_allows(&http, &req()) && tcp_allows(&tcp, &req()));
}

#[test]
fn allow_rules_match_each_source_field() {
    let cases: &[Case] = &[
        // principals: exact, with the spiffe:// scheme added.
        (
            "  - from: [{source: {principals: [cluster.local/ns/bookinfo/sa/bookinfo-reviews]}}]",
            |_| {},
            true,
        ),
        (
            "  - from: [{source: {principals: [cluster.local/ns/bookinfo/sa/bookinfo-reviews]}}]",
            |r| r.principal = Some("spiffe://cluster.local/ns/bookinfo/sa/productpage"),
            false,
        ),
        (
            "  - from: [{source: {principals: [cluster.local/ns/bookinfo/sa/bookinfo-reviews]}}]",
            |r| r.principal = None,
            false,
        ),
        // prefix and suffix forms, and presence.
        (
            "  - from: [{source: {principals: [cluster.local/ns/bookinfo/*]}}]",
            |_| {},
            true,
        ),
        (
            "  - from: [{source: {principals: ['*/sa/bookinfo-reviews']}}]",
            |_| {},
            true,
        ),
        (
            "  - from: [{source: {principals: ['*']}}]",
            |r| r.principal = None,
            false,
        ),
        // notPrincipals.
        (
            "  - from: [{source: {notPrincipals: [cluster.local/ns/bookinfo/sa/bookinfo-reviews]}}]",
            |_| {},
            false,
        ),
        // namespaces and notNamespaces.
        (
            "  - from: [{source: {namespaces: [bookinfo]}}]",
            |_| {},
            true,
        ),
        ("  - from: [{source: {namespaces: [other]}}]", |_| {}, false),
        (
            "  - from: [{source: {notNamespaces: [bookinfo]}}]",
            |_| {},
            false,
        ),
        // ipBlocks and notIpBlocks.
        (
            "  - from: [{source: {ipBlocks: [10.200.0.0/24]}}]",
            |_| {},
            true,
        ),
        (
            "  - from: [{source: {ipBlocks: [10.9.0.0/16]}}]",
            |_| {},
            false,
        ),
        (
            "  - from: [{source: {notIpBlocks: [10.200.0.30]}}]",
            |_| {},
            false,
        ),
        (
            "  - from: [{source: {remoteIpBlocks: [10.200.0.30/32]}}]",
            |_| {},
            true,
        ),
        // serviceAccounts: namespace/name, or a name in the policy's namespace.
        (
            "  - from: [{source: {serviceAccounts: [bookinfo/bookinfo-reviews]}}]",
            |_| {},
            true,
        ),
        (
            "  - from: [{source: {serviceAccounts: [bookinfo-reviews]}}]",
            |_| {},
            true,
        ),
        (
            "  - from: [{source: {serviceAccounts: [other/bookinfo-reviews]}}]",
            |_| {},
            false,
        ),
        (
            "  - from: [{source: {notServiceAccounts: [bookinfo-reviews]}}]",
            |_| {},
            false,
        ),
        // requestPrincipals need JWT, which no request here carries.
        (
            "  - from: [{source: {requestPrincipals: ['*']}}]",
            |_| {},
            false,
        ),
        // Two sources are OR; fields within one are AND.
        (
            "  - from: [{source: {namespaces: [other]}}, {source: {ipBlocks: [10.200.0.30]}}]",
            |_| {},
            true,
        ),
        (
            "  - from: [{source: {namespaces: [bookinfo], ipBlocks: [10.9.0.0/16]}}]",
            |_| {},
            false,
        ),
    ];
    for (rules, change, want) in cases {
        let (http, _) = filters(&policy("ALLOW", rules));
        let mut r = req();
        change(&mut r);
        assert_eq!(http_allows(&http, &r), *want, "{rules}");
    }
}

#[test]
fn allow_rules_match_each_operation_field_and_condition() {
    let cases: &[Case] = &[
        ("  - to: [{operation: {methods: [GET]}}]", |_| {}, true),
        (
            "  - to: [{operation: {methods: [GET]}}]",
            |r| r.method = "POST",
            false,
        ),
        ("  - to: [{operation: {notMethods: [GET]}}]", |_| {}, false),
        ("  - to: [{operation: {paths: [/ratings/0]}}]", |_| {}, true),
        ("  - to: [{operation: {paths: [/ratings/*]}}]", |_| {}, true),
        ("  - to: [{operation: {paths: ['*/0']}}]", |_| {}, true),
        (
            "  - to: [{operation: {paths: [/reviews/*]}}]",
            |_| {},
            false,
        ),
        (
            "  - to: [{operation: {paths: ['/ratings/{*}']}}]",
            |_| {},
            true,
        ),
        ("  - to: [{operation: {paths: ['/{*}']}}]", |_| {}, false),
        ("  - to: [{operation: {paths: ['/{**}']}}]", |_| {}, true),
        ("  - to: [{operation: {notPaths: [/admin*]}}]", |_| {}, true),
        ("  - to: [{operation: {hosts: [ratings*]}}]", |_| {}, true),
        (
            "  - to: [{operation: {hosts: [RATINGS:9080]}}]",
            |_| {},
            true,
        ),
        (
            "  - to: [{operation: {notHosts: [ratings:9080]}}]",
            |_| {},
            false,
        ),
        ("  - to: [{operation: {ports: ['9080']}}]", |_| {}, true),
        ("  - to: [{operation: {ports: ['8080']}}]", |_| {}, false),
        ("  - to: [{operation: {notPorts: ['9080']}}]", |_| {}, false),
        // when: request headers, source and destination.
        (
            "  - when: [{key: 'request.headers[x-user]', values: [jason]}]",
            |r| r.headers.push(("x-user", "jason")),
            true,
        ),
        (
            "  - when: [{key: 'request.headers[x-user]', values: [jason]}]",
            |_| {},
            false,
        ),
        (
            "  - when: [{key: 'request.headers[x-user]', notValues: [jason]}]",
            |r| r.headers.push(("x-user", "bob")),
            true,
        ),
        (
            "  - when: [{key: source.ip, values: [10.200.0.30]}]",
            |_| {},
            true,
        ),
        (
            "  - when: [{key: source.namespace, values: [other]}]",
            |_| {},
            false,
        ),
        (
            "  - when: [{key: source.principal, values: [cluster.local/ns/bookinfo/sa/bookinfo-reviews]}]",
            |_| {},
            true,
        ),
        (
            "  - when: [{key: source.serviceAccount, values: [bookinfo/bookinfo-reviews]}]",
            |_| {},
            true,
        ),
        (
            "  - when: [{key: destination.port, values: ['9080']}]",
            |_| {},
            true,
        ),
        (
            "  - when: [{key: destination.ip, values: [10.200.0.0/16]}]",
            |_| {},
            true,
        ),
        // A rule with no fields matches everything; no rules at all match nothing.
        ("  - {}", |_| {}, true),
    ];
    for (rules, change, want) in cases {
        let (http, _) = filters(&policy("ALLOW", rules));
        let mut r = req();
        change(&mut r);
        assert_eq!(http_allows(&http, &r), *want, "{rules}");
    }
    let (http, _) = filters(
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: none, namespace: bookinfo}\nspec: {selector: {matchLabels: {app: ratings}}, action: ALLOW}\n",
    );
    assert!(
        !http_allows(&http, &req()),
        "ALLOW with no rules denies all"
    );
}

#[test]
fn deny_is_evaluated_before_allow_and_audit_never_blocks() {
    let both = format!(
        "{}---\n{}",
        policy("ALLOW", "  - from: [{source: {namespaces: [bookinfo]}}]"),
        policy("DENY", "  - to: [{operation: {methods: [DELETE]}}]")
    );
    let (http, _) = filters(&both);
    assert!(http_allows(&http, &req()));
    let mut del = req();
    del.method = "DELETE";
    assert!(!http_allows(&http, &del), "DENY wins over a matching ALLOW");
    let (http, _) = filters(&policy("AUDIT", "  - {}"));
    assert!(http_allows(&http, &req()));
}

#[test]
fn http_only_rules_fail_closed_on_tcp_ports() {
    // ALLOW that needs HTTP matches no TCP connection…
    let (_, tcp) = filters(&policy("ALLOW", "  - to: [{operation: {methods: [GET]}}]"));
    assert!(!tcp_allows(&tcp, &req()));
    // …while its L4 part still works when there is one.
    let (_, tcp) = filters(&policy(
        "ALLOW",
        "  - from: [{source: {principals: [cluster.local/ns/bookinfo/sa/bookinfo-reviews]}}]",
    ));
    assert!(tcp_allows(&tcp, &req()));
    let mut other = req();
    other.principal = Some("spiffe://cluster.local/ns/x/sa/y");
    assert!(!tcp_allows(&tcp, &other));
    // DENY that needs HTTP denies the whole connection.
    let (_, tcp) = filters(&policy("DENY", "  - to: [{operation: {paths: [/admin]}}]"));
    assert!(!tcp_allows(&tcp, &req()));
}
