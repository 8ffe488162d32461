//! RequestAuthentication → Envoy's JWT filter on a sidecar's inbound HTTP chains, as Istio
//! builds it: one provider `origins-<i>` per JWT rule, each verified payload in the `payload`
//! key of the filter's metadata (which authorization matches), a request without a token let
//! through (`allow_missing`) and one with a token that fails refused.
//!
//! Keys are inline. A `jwksUri` is fetched by the control plane, as istiod does by default, and
//! handed over in [`PushContext::jwks`]; while it cannot be fetched the provider gets an empty
//! key set, so that tokens fail rather than pass (Istio's behaviour).

use std::collections::BTreeMap;
use std::time::Duration;

use envoy_types::pb::envoy::config::core::v3::{DataSource, data_source};
use envoy_types::pb::envoy::config::route::v3::{RouteMatch, route_match};
use envoy_types::pb::envoy::extensions::filters::http::jwt_authn::v3::{
    JwtAuthentication, JwtClaimToHeader, JwtHeader, JwtProvider, JwtRequirement,
    JwtRequirementAndList, JwtRequirementOrList, RequirementRule, jwt_provider, jwt_requirement,
    requirement_rule,
};
use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3::{
    HttpFilter, http_filter,
};
use envoy_types::pb::google::protobuf::Empty;
use envoy_types::util::pack_any;
use isthmus_config::Snapshot;
use isthmus_config::istio::security::JwtRule;

use crate::context::PushContext;
use crate::proxy::Proxy;

pub const JWT_FILTER: &str = "envoy.filters.http.jwt_authn";
/// The metadata key verified payloads are kept under.
pub const JWT_PAYLOAD: &str = "payload";
/// Claims whose string value is a space-separated list, whatever the rule says.
const SPACE_DELIMITED: [&str; 2] = ["permission", "scope"];
/// Istio's default time limit for fetching a JWKS.
pub const DEFAULT_FETCH_TIMEOUT: Duration = Duration::from_secs(5);
/// What a provider gets while its `jwksUri` cannot be fetched: no token verifies.
const NO_KEYS: &str = r#"{"keys":[]}"#;

/// JWKS documents by `jwksUri`, as fetched; the error where the fetch failed.
pub type JwksDocs = BTreeMap<String, Result<String, String>>;

/// Every `jwksUri` the configuration names, with the time limit to fetch it in.
pub fn jwks_uris(snapshot: &Snapshot) -> BTreeMap<String, Duration> {
    let mut out = BTreeMap::new();
    for ra in &snapshot.request_authentications {
        for rule in &ra.object.spec.jwt_rules {
            if rule.jwks_uri.is_empty() || !rule.jwks.is_empty() {
                continue;
            }
            let timeout = rule
                .timeout
                .as_ref()
                .map_or(DEFAULT_FETCH_TIMEOUT, |t| t.as_std());
            out.entry(rule.jwks_uri.clone())
                .and_modify(|t: &mut Duration| *t = (*t).max(timeout))
                .or_insert(timeout);
        }
    }
    out
}

/// The JWT filter for `proxy`'s inbound HTTP chains, when a RequestAuthentication applies.
pub fn http_filters(ctx: &PushContext, proxy: &Proxy) -> Vec<HttpFilter> {
    let policies = ctx.workload_policies(proxy, &ctx.snapshot.request_authentications, |p| {
        let s = &p.spec;
        (
            s.selector.as_ref(),
            s.target_ref.is_some() || !s.target_refs.is_empty(),
        )
    });
    let rules: Vec<&JwtRule> = policies
        .iter()
        .flat_map(|p| p.object.spec.jwt_rules.iter())
        .collect();
    if rules.is_empty() {
        return Vec::new();
    }
    vec![HttpFilter {
        name: JWT_FILTER.into(),
        config_type: Some(http_filter::ConfigType::TypedConfig(pack_any(
            jwt_authentication(ctx, &rules),
        ))),
        ..Default::default()
    }]
}

fn requires(t: jwt_requirement::RequiresType) -> JwtRequirement {
    JwtRequirement {
        requires_type: Some(t),
    }
}

fn provider_name(name: &str) -> JwtRequirement {
    requires(jwt_requirement::RequiresType::ProviderName(name.into()))
}

fn any_of(requirements: Vec<JwtRequirement>) -> JwtRequirement {
    requires(jwt_requirement::RequiresType::RequiresAny(
        JwtRequirementOrList { requirements },
    ))
}

fn jwt_authentication(ctx: &PushContext, rules: &[&JwtRule]) -> JwtAuthentication {
    let mut providers = crate::maps::map();
    // Each provider: its token, if present, must verify.
    let mut each = Vec::new();
    // Any provider verifying is enough; this covers providers sharing a token location, where
    // a token of one issuer is "unknown issuer" to the others.
    let mut any = Vec::new();
    for (i, rule) in rules.iter().enumerate() {
        let name = format!("origins-{i}");
        providers.insert(name.clone(), provider(ctx, rule));
        each.push(any_of(vec![
            provider_name(&name),
            requires(jwt_requirement::RequiresType::AllowMissing(Empty {})),
        ]));
        any.push(provider_name(&name));
    }
    let requirement = if each.len() == 1 {
        each.remove(0)
    } else {
        any.push(requires(jwt_requirement::RequiresType::RequiresAll(
            JwtRequirementAndList { requirements: each },
        )));
        any_of(any)
    };
    JwtAuthentication {
        providers,
        rules: vec![RequirementRule {
            r#match: Some(RouteMatch {
                path_specifier: Some(route_match::PathSpecifier::Prefix("/".into())),
                ..Default::default()
            }),
            requirement_type: Some(requirement_rule::RequirementType::Requires(requirement)),
        }],
        bypass_cors_preflight: true,
        ..Default::default()
    }
}

fn provider(ctx: &PushContext, rule: &JwtRule) -> JwtProvider {
    let jwks = if !rule.jwks.is_empty() {
        rule.jwks.clone()
    } else {
        match ctx.jwks.get(&rule.jwks_uri) {
            Some(Ok(doc)) => doc.clone(),
            _ => NO_KEYS.into(),
        }
    };
    let mut space_delimited: Vec<String> = rule
        .space_delimited_claims
        .iter()
        .cloned()
        .chain(SPACE_DELIMITED.iter().map(|c| c.to_string()))
        .collect();
    space_delimited.sort();
    space_delimited.dedup();
    JwtProvider {
        issuer: rule.issuer.clone(),
        audiences: rule.audiences.clone(),
        forward: rule.forward_original_token,
        forward_payload_header: rule.output_payload_to_header.clone(),
        payload_in_metadata: JWT_PAYLOAD.into(),
        normalize_payload_in_metadata: Some(jwt_provider::NormalizePayload {
            space_delimited_claims: space_delimited,
        }),
        from_headers: rule
            .from_headers
            .iter()
            .map(|h| JwtHeader {
                name: h.name.clone(),
                value_prefix: h.prefix.clone(),
            })
            .collect(),
        from_params: rule.from_params.clone(),
        from_cookies: rule.from_cookies.clone(),
        claim_to_headers: rule
            .output_claim_to_headers
            .iter()
            .map(|c| JwtClaimToHeader {
                header_name: c.header.clone(),
                claim_name: c.claim.clone(),
                ..Default::default()
            })
            .collect(),
        jwks_source_specifier: Some(jwt_provider::JwksSourceSpecifier::LocalJwks(DataSource {
            specifier: Some(data_source::Specifier::InlineString(jwks)),
            ..Default::default()
        })),
        ..Default::default()
    }
}
