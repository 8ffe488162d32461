//! Request authentication: RequestAuthentication and AuthorizationPolicy YAML → the control
//! plane's JWT and RBAC filters (as a proxy receives them) → the proxy's engines, for requests
//! that differ in their token. Each case is policy × token → 200, 401 (with Envoy's reason) or
//! 403; the headers the app would see are checked too.

use std::net::SocketAddr;

use envoy_types::pb::envoy::extensions::filters::http::jwt_authn::v3::JwtAuthentication;
use envoy_types::pb::envoy::extensions::filters::http::rbac::v3::Rbac as HttpRbac;
use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3::http_filter;
use http::request::Parts;
use isthmus_config::{Loader, MeshConfig};
use isthmus_pilot::authn::JwksDocs;
use isthmus_pilot::context::PushContext;
use isthmus_pilot::proxy::{NodeMetadata, Proxy};
use isthmus_proxy::config::DynamicMetadata;
use isthmus_proxy::config::jwt::{self, JwtAuthn};
use isthmus_proxy::config::rbac::{self, Input, Rbac};
use isthmus_testkit::jwt::Issuer;
use prost::Message;
use serde_json::json;

const WORKLOAD: &str = r#"
apiVersion: v1
kind: Pod
metadata: {name: ratings-0, namespace: bookinfo, labels: {app: ratings}}
spec: {containers: [{name: ratings}, {name: istio-proxy}]}
status: {podIP: 10.200.0.20}
---
"#;

struct Filters {
    jwt: Option<JwtAuthn>,
    rbac: Vec<Rbac>,
}

/// The ratings pod's inbound HTTP filters for `config`, compiled as the proxy does.
fn filters(config: &str, jwks: JwksDocs) -> Filters {
    let loaded = Loader::default().load_str("p.yaml", &format!("{WORKLOAD}{config}"));
    assert!(!loaded.has_errors(), "{:?}", loaded.diagnostics);
    let mut ctx = PushContext::new(
        loaded.resources.into_iter().collect(),
        MeshConfig::default(),
        "cluster.local",
        None,
    );
    ctx.jwks = jwks;
    let proxy = Proxy::from_node(
        "sidecar~10.200.0.20~ratings-0.bookinfo~bookinfo.svc.cluster.local",
        &NodeMetadata::default(),
    )
    .unwrap();
    let mut out = Filters {
        jwt: None,
        rbac: Vec::new(),
    };
    let authn = isthmus_pilot::authn::http_filters(&ctx, &proxy);
    let authz = isthmus_pilot::authz::http_filters(&ctx, &proxy);
    for f in authn.iter().chain(&authz) {
        let Some(http_filter::ConfigType::TypedConfig(any)) = &f.config_type else {
            panic!("untyped filter {}", f.name);
        };
        if any.type_url.ends_with("JwtAuthentication") {
            let c = JwtAuthentication::decode(any.value.as_slice()).unwrap();
            out.jwt = Some(jwt::compile(&c).unwrap());
        } else {
            let r = HttpRbac::decode(any.value.as_slice()).unwrap();
            out.rbac
                .push(rbac::compile(r.rules.as_ref().unwrap()).unwrap());
        }
    }
    out
}

/// What the proxy answers, and the request as it would reach the app.
fn send(f: &Filters, uri: &str, headers: &[(&str, &str)]) -> (u16, &'static str, Parts) {
    let mut b = http::Request::builder()
        .uri(uri)
        .header("host", "ratings:9080");
    for (k, v) in headers {
        b = b.header(*k, *v);
    }
    let mut parts = b.body(()).unwrap().into_parts().0;
    let mut metadata = DynamicMetadata::new();
    if let Some(j) = &f.jwt
        && let Err(failure) = j.verify(&mut parts, &mut metadata)
    {
        return (401, failure.text(), parts);
    }
    let input = Input {
        principal: Some("spiffe://cluster.local/ns/bookinfo/sa/bookinfo-reviews"),
        source: SocketAddr::new("10.200.0.30".parse().unwrap(), 40000),
        destination: SocketAddr::new("10.200.0.20".parse().unwrap(), 9080),
        server_name: None,
        request: Some(&parts),
        metadata: Some(&metadata),
    };
    let status = if rbac::allowed(&f.rbac, &input) {
        200
    } else {
        403
    };
    (status, "", parts)
}

fn bearer(token: &str) -> String {
    format!("Bearer {token}")
}

fn request_authentication(issuer: &Issuer, extra: &str) -> String {
    format!(
        "apiVersion: security.istio.io/v1\nkind: RequestAuthentication\nmetadata: {{name: jwt, namespace: bookinfo}}\nspec:\n  selector: {{matchLabels: {{app: ratings}}}}\n  jwtRules:\n  - issuer: {}\n    jwks: '{}'\n{extra}---\n",
        issuer.iss,
        issuer.jwks()
    )
}

fn allow(rules: &str) -> String {
    format!(
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {{name: allow, namespace: bookinfo}}\nspec:\n  selector: {{matchLabels: {{app: ratings}}}}\n  rules:\n{rules}\n"
    )
}

#[test]
fn a_token_must_verify_when_present_and_no_token_passes_authentication() {
    let iss = Issuer::new("https://issuer.example.com", "k1");
    let f = filters(
        &request_authentication(&iss, "    audiences: [ratings]\n"),
        JwksDocs::new(),
    );
    let good = iss.token(json!({"sub": "alice", "aud": "ratings"}));
    let (status, _, parts) = send(&f, "/", &[("authorization", &bearer(&good))]);
    assert_eq!(status, 200);
    assert!(
        !parts.headers.contains_key("authorization"),
        "the token is not forwarded by default"
    );
    assert_eq!(send(&f, "/", &[]).0, 200, "no token, no policy: allowed");

    let other_key = Issuer::new("https://issuer.example.com", "k1");
    let cases: Vec<(String, &str)> = vec![
        (
            iss.token(json!({"sub": "alice", "aud": "ratings", "exp": 1_000_000})),
            "Jwt is expired",
        ),
        (
            iss.token(json!({"sub": "alice", "aud": "other"})),
            "Audiences in Jwt are not allowed",
        ),
        (
            iss.token(json!({"sub": "alice"})),
            "Audiences in Jwt are not allowed",
        ),
        (
            iss.token(json!({"sub": "alice", "aud": "ratings", "nbf": 4_000_000_000u64})),
            "Jwt not yet valid",
        ),
        (
            Issuer::new("https://elsewhere.example.com", "k1")
                .token(json!({"sub": "alice", "aud": "ratings"})),
            "Jwt issuer is not configured",
        ),
        (
            other_key.token(json!({"sub": "alice", "aud": "ratings"})),
            "Jwt verification fails",
        ),
        (
            "not-a-jwt".into(),
            "Jwt is not in the form of Header.Payload.Signature with two dots and 3 sections",
        ),
    ];
    for (token, reason) in cases {
        let (status, text, _) = send(&f, "/", &[("authorization", &bearer(&token))]);
        assert_eq!((status, text), (401, reason));
    }
    // The query parameter is the other default location.
    let uri = format!("/?access_token={good}");
    assert_eq!(send(&f, &uri, &[]).0, 200);
    let bad = format!(
        "/?access_token={}",
        other_key.token(json!({"aud": "ratings"}))
    );
    assert_eq!(send(&f, &bad, &[]).0, 401);
}

#[test]
fn request_principals_and_claims_decide_authorization() {
    let iss = Issuer::new("https://issuer.example.com", "k1");
    let token = iss.token(json!({
        "sub": "alice", "aud": ["ratings", "reviews"], "azp": "web",
        "groups": ["dev", "ops"], "scope": "read write", "org": {"team": "blue"}
    }));
    let with = [("authorization", bearer(&token))];
    let with: Vec<(&str, &str)> = with.iter().map(|(k, v)| (*k, v.as_str())).collect();
    type Case = (&'static str, bool);
    let cases: &[Case] = &[
        ("  - from: [{source: {requestPrincipals: ['*']}}]", true),
        (
            "  - from: [{source: {requestPrincipals: [https://issuer.example.com/alice]}}]",
            true,
        ),
        (
            "  - from: [{source: {requestPrincipals: [https://issuer.example.com/bob]}}]",
            false,
        ),
        (
            "  - from: [{source: {requestPrincipals: ['https://issuer.example.com/*']}}]",
            true,
        ),
        (
            "  - from: [{source: {requestPrincipals: ['*/alice']}}]",
            true,
        ),
        (
            "  - from: [{source: {requestPrincipals: ['*.com/alice']}}]",
            true,
        ),
        (
            "  - from: [{source: {requestPrincipals: ['*.org/alice']}}]",
            false,
        ),
        ("  - from: [{source: {notRequestPrincipals: ['*']}}]", false),
        (
            "  - when: [{key: request.auth.principal, values: [https://issuer.example.com/alice]}]",
            true,
        ),
        (
            "  - when: [{key: request.auth.audiences, values: [reviews]}]",
            true,
        ),
        (
            "  - when: [{key: request.auth.audiences, values: [details]}]",
            false,
        ),
        (
            "  - when: [{key: request.auth.presenter, values: [web]}]",
            true,
        ),
        (
            "  - when: [{key: 'request.auth.claims[groups]', values: [ops]}]",
            true,
        ),
        (
            "  - when: [{key: 'request.auth.claims[groups]', values: [qa]}]",
            false,
        ),
        // `scope` is a space-separated list: each word is a value.
        (
            "  - when: [{key: 'request.auth.claims[scope]', values: [write]}]",
            true,
        ),
        (
            "  - when: [{key: 'request.auth.claims[org][team]', values: [blue]}]",
            true,
        ),
        (
            "  - when: [{key: 'request.auth.claims[org][team]', values: [red]}]",
            false,
        ),
    ];
    for (rules, want_with_token) in cases {
        let config = format!("{}{}", request_authentication(&iss, ""), allow(rules));
        let f = filters(&config, JwksDocs::new());
        let got = send(&f, "/", &with).0 == 200;
        assert_eq!(got, *want_with_token, "{rules} with a token");
        // Without a token there is no request principal and no claim.
        let without = send(&f, "/", &[]).0 == 200;
        let want_without = rules.contains("notRequestPrincipals");
        assert_eq!(without, want_without, "{rules} without a token");
    }
}

#[test]
fn token_locations_and_what_reaches_the_app_follow_the_rule() {
    let iss = Issuer::new("issuer-a", "k1");
    let extra = "    fromHeaders: [{name: x-jwt, prefix: 'Token '}]\n    fromParams: [jwt]\n    forwardOriginalToken: true\n    outputPayloadToHeader: x-jwt-payload\n    outputClaimToHeaders: [{header: x-sub, claim: sub}]\n";
    let f = filters(&request_authentication(&iss, extra), JwksDocs::new());
    let token = iss.token(json!({"sub": "carol"}));
    let value = format!("Token {token}");
    let (status, _, parts) = send(&f, "/", &[("x-jwt", &value)]);
    assert_eq!(status, 200);
    assert_eq!(
        parts.headers["x-jwt"],
        value.as_str(),
        "forwardOriginalToken keeps it"
    );
    assert_eq!(parts.headers["x-sub"], "carol");
    assert_eq!(
        parts.headers["x-jwt-payload"],
        token.split('.').nth(1).unwrap(),
        "the payload as the token carried it"
    );
    assert_eq!(send(&f, &format!("/p?jwt={token}"), &[]).0, 200);
    // The default location is not looked at when locations are given.
    let bad = Issuer::new("issuer-a", "k1").token(json!({"sub": "x"}));
    assert_eq!(send(&f, "/", &[("authorization", &bearer(&bad))]).0, 200);
    assert_eq!(send(&f, "/", &[("x-jwt", &format!("Token {bad}"))]).0, 401);
}

#[test]
fn two_issuers_each_verify_their_tokens() {
    let a = Issuer::new("issuer-a", "ka");
    let b = Issuer::new("issuer-b", "kb");
    let config = format!(
        "apiVersion: security.istio.io/v1\nkind: RequestAuthentication\nmetadata: {{name: jwt, namespace: bookinfo}}\nspec:\n  jwtRules:\n  - issuer: issuer-a\n    jwks: '{}'\n  - issuer: issuer-b\n    jwks: '{}'\n---\n{}",
        a.jwks(),
        b.jwks(),
        allow("  - from: [{source: {requestPrincipals: [issuer-b/*]}}]")
    );
    let f = filters(&config, JwksDocs::new());
    let ta = a.token(json!({"sub": "x"}));
    let tb = b.token(json!({"sub": "y"}));
    assert_eq!(send(&f, "/", &[("authorization", &bearer(&tb))]).0, 200);
    // issuer-a's token verifies but its principal is not allowed.
    assert_eq!(send(&f, "/", &[("authorization", &bearer(&ta))]).0, 403);
    let forged = Issuer::new("issuer-b", "kb").token(json!({"sub": "y"}));
    assert_eq!(send(&f, "/", &[("authorization", &bearer(&forged))]).0, 401);
}

#[test]
fn keys_that_could_not_be_fetched_refuse_tokens_and_fetched_ones_verify_them() {
    let iss = Issuer::new("issuer-u", "k1");
    let config = "apiVersion: security.istio.io/v1\nkind: RequestAuthentication\nmetadata: {name: jwt, namespace: bookinfo}\nspec:\n  jwtRules:\n  - issuer: issuer-u\n    jwksUri: http://127.0.0.1:9/jwks.json\n---\n";
    let token = iss.token(json!({"sub": "x"}));
    let auth = [("authorization", bearer(&token))];
    let auth: Vec<(&str, &str)> = auth.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let failed = JwksDocs::from([(
        "http://127.0.0.1:9/jwks.json".to_string(),
        Err("connect: refused".to_string()),
    )]);
    let f = filters(config, failed);
    assert_eq!(send(&f, "/", &auth).0, 401);
    assert_eq!(send(&f, "/", &[]).0, 200);
    let fetched = JwksDocs::from([("http://127.0.0.1:9/jwks.json".to_string(), Ok(iss.jwks()))]);
    let f = filters(config, fetched);
    assert_eq!(send(&f, "/", &auth).0, 200);
}
