//! Envoy's JWT authentication filter (`envoy.filters.http.jwt_authn`), as Istio configures it
//! from RequestAuthentication: providers (issuer, audiences, keys, where the token travels) and
//! per-path requirements over them. A verified token's payload becomes dynamic metadata, which
//! RBAC matches (`requestPrincipals`, `request.auth.*`); a token that fails answers 401.
//!
//! Keys are always inline (`local_jwks`): the control plane fetches `jwksUri`, as istiod does by
//! default, so the proxy never makes a request of its own on the data path.

use std::collections::HashMap;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use envoy_types::pb::envoy::config::core::v3::{DataSource, data_source};
use envoy_types::pb::envoy::extensions::filters::http::jwt_authn::v3::{
    JwtAuthentication, JwtProvider, JwtRequirement, jwt_provider, jwt_requirement, requirement_rule,
};
use http::HeaderName;
use http::request::Parts;
use jsonwebtoken::jwk::JwkSet;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde_json::{Map, Value};

use super::DynamicMetadata;
use super::route::{RouteMatch, cookie, query_param, route_match};

pub const FILTER: &str = "envoy.filters.http.jwt_authn";
/// Envoy's default clock skew allowance for `exp` and `nbf`.
const DEFAULT_CLOCK_SKEW_SECS: u32 = 60;
/// Larger JWKS documents are refused rather than parsed.
const MAX_JWKS_BYTES: usize = 1 << 20;

#[derive(Debug)]
pub struct JwtAuthn {
    /// Sorted by name.
    providers: Vec<Provider>,
    rules: Vec<(RouteMatch, Option<Requirement>)>,
    bypass_cors_preflight: bool,
}

#[derive(Debug)]
struct Provider {
    name: String,
    issuer: String,
    audiences: Vec<String>,
    keys: Vec<Key>,
    locations: Vec<Location>,
    forward: bool,
    payload_header: Option<HeaderName>,
    claim_headers: Vec<(HeaderName, String)>,
    payload_in_metadata: Option<String>,
    space_delimited: Vec<String>,
    clock_skew: u32,
    require_expiration: bool,
}

struct Key {
    kid: Option<String>,
    alg: Option<Algorithm>,
    key: DecodingKey,
}

impl std::fmt::Debug for Key {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Key")
            .field("kid", &self.kid)
            .field("alg", &self.alg)
            .finish_non_exhaustive()
    }
}

#[derive(Debug)]
enum Location {
    Header { name: HeaderName, prefix: String },
    Param(String),
    Cookie(String),
}

#[derive(Debug)]
enum Requirement {
    Provider {
        index: usize,
        /// Overrides the provider's audiences.
        audiences: Option<Vec<String>>,
    },
    Any {
        items: Vec<Requirement>,
        allow_missing: bool,
        allow_failed: bool,
    },
    All(Vec<Requirement>),
}

/// Why a token was not accepted, with Envoy's wording (the 401's body).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    Missing,
    UnknownIssuer,
    Failed(&'static str),
}

impl Failure {
    pub fn text(self) -> &'static str {
        match self {
            Failure::Missing => "Jwt is missing",
            Failure::UnknownIssuer => "Jwt issuer is not configured",
            Failure::Failed(s) => s,
        }
    }
}

const BAD_FORMAT: &str =
    "Jwt is not in the form of Header.Payload.Signature with two dots and 3 sections";
const VERIFICATION_FAILS: &str = "Jwt verification fails";
const KID_ALG_MISMATCH: &str = "Jwks doesn't have key to match kid or alg from Jwt";

/// A provider's verified token.
#[derive(Debug, Clone)]
struct Verified {
    /// The header the token came in, to strip when it is not forwarded.
    header: Option<HeaderName>,
    /// The payload segment, as the token carried it.
    encoded_payload: String,
    payload: Map<String, Value>,
}

fn keys_of(source: Option<&DataSource>, provider: &str) -> Result<Vec<Key>, String> {
    let text = match source.and_then(|s| s.specifier.as_ref()) {
        Some(data_source::Specifier::InlineString(s)) => s.clone(),
        Some(data_source::Specifier::InlineBytes(b)) => String::from_utf8(b.clone())
            .map_err(|_| format!("JWT provider {provider:?}: local_jwks is not UTF-8"))?,
        Some(data_source::Specifier::Filename(path)) => {
            let meta = std::fs::metadata(path)
                .map_err(|e| format!("JWT provider {provider:?}: local_jwks {path}: {e}"))?;
            if meta.len() > MAX_JWKS_BYTES as u64 {
                return Err(format!(
                    "JWT provider {provider:?}: local_jwks {path} is larger than {MAX_JWKS_BYTES} bytes"
                ));
            }
            std::fs::read_to_string(path)
                .map_err(|e| format!("JWT provider {provider:?}: local_jwks {path}: {e}"))?
        }
        _ => return Err(format!("JWT provider {provider:?}: local_jwks has no data")),
    };
    if text.len() > MAX_JWKS_BYTES {
        return Err(format!(
            "JWT provider {provider:?}: local_jwks is larger than {MAX_JWKS_BYTES} bytes"
        ));
    }
    let set: JwkSet = serde_json::from_str(&text)
        .map_err(|e| format!("JWT provider {provider:?}: local_jwks is not a JWKS: {e}"))?;
    set.keys
        .iter()
        .map(|jwk| {
            let key = DecodingKey::from_jwk(jwk).map_err(|e| {
                format!(
                    "JWT provider {provider:?}: key {:?}: {e}",
                    jwk.common.key_id.as_deref().unwrap_or("")
                )
            })?;
            let alg = jwk
                .common
                .key_algorithm
                .and_then(|a| a.to_string().parse::<Algorithm>().ok());
            Ok(Key {
                kid: jwk.common.key_id.clone(),
                alg,
                key,
            })
        })
        .collect()
}

fn header_name(name: &str, what: &str) -> Result<HeaderName, String> {
    HeaderName::from_bytes(name.as_bytes()).map_err(|_| format!("bad {what} header name {name:?}"))
}

fn provider(name: &str, p: &JwtProvider) -> Result<Provider, String> {
    let keys = match &p.jwks_source_specifier {
        Some(jwt_provider::JwksSourceSpecifier::LocalJwks(ds)) => keys_of(Some(ds), name)?,
        Some(jwt_provider::JwksSourceSpecifier::RemoteJwks(_)) => {
            return Err(format!(
                "JWT provider {name:?}: remote_jwks is not supported (the control plane inlines the keys)"
            ));
        }
        None => return Err(format!("JWT provider {name:?} has no JWKS")),
    };
    if p.subjects.is_some() || p.max_lifetime.is_some() {
        return Err(format!(
            "JWT provider {name:?}: subjects and max_lifetime are not supported"
        ));
    }
    let mut locations = Vec::new();
    for h in &p.from_headers {
        locations.push(Location::Header {
            name: header_name(&h.name, "JWT")?,
            prefix: h.value_prefix.clone(),
        });
    }
    locations.extend(p.from_params.iter().cloned().map(Location::Param));
    locations.extend(p.from_cookies.iter().cloned().map(Location::Cookie));
    if locations.is_empty() {
        // Envoy's default: `Authorization: Bearer <token>` or `?access_token=<token>`.
        locations.push(Location::Header {
            name: http::header::AUTHORIZATION,
            prefix: "Bearer ".into(),
        });
        locations.push(Location::Param("access_token".into()));
    }
    let claim_headers = p
        .claim_to_headers
        .iter()
        .map(|c| Ok((header_name(&c.header_name, "claim")?, c.claim_name.clone())))
        .collect::<Result<_, String>>()?;
    Ok(Provider {
        name: name.to_string(),
        issuer: p.issuer.clone(),
        audiences: p.audiences.clone(),
        keys,
        locations,
        forward: p.forward,
        payload_header: (!p.forward_payload_header.is_empty())
            .then(|| header_name(&p.forward_payload_header, "payload"))
            .transpose()?,
        claim_headers,
        payload_in_metadata: (!p.payload_in_metadata.is_empty())
            .then(|| p.payload_in_metadata.clone()),
        space_delimited: p
            .normalize_payload_in_metadata
            .as_ref()
            .map(|n| n.space_delimited_claims.clone())
            .unwrap_or_default(),
        clock_skew: if p.clock_skew_seconds == 0 {
            DEFAULT_CLOCK_SKEW_SECS
        } else {
            p.clock_skew_seconds
        },
        require_expiration: p.require_expiration,
    })
}

fn requirement(r: &JwtRequirement, names: &[String]) -> Result<Option<Requirement>, String> {
    use jwt_requirement::RequiresType as T;
    let index_of = |n: &str| {
        names
            .iter()
            .position(|p| p == n)
            .ok_or_else(|| format!("JWT requirement names unknown provider {n:?}"))
    };
    let all_providers = || {
        (0..names.len())
            .map(|index| Requirement::Provider {
                index,
                audiences: None,
            })
            .collect::<Vec<_>>()
    };
    Ok(Some(match &r.requires_type {
        Some(T::ProviderName(n)) => Requirement::Provider {
            index: index_of(n)?,
            audiences: None,
        },
        Some(T::ProviderAndAudiences(p)) => Requirement::Provider {
            index: index_of(&p.provider_name)?,
            audiences: Some(p.audiences.clone()),
        },
        Some(T::RequiresAny(list)) => {
            let (mut items, mut allow_missing, mut allow_failed) = (Vec::new(), false, false);
            for r in &list.requirements {
                match &r.requires_type {
                    Some(T::AllowMissing(_)) => allow_missing = true,
                    Some(T::AllowMissingOrFailed(_)) => allow_failed = true,
                    _ => items.extend(requirement(r, names)?),
                }
            }
            Requirement::Any {
                items,
                allow_missing,
                allow_failed,
            }
        }
        Some(T::RequiresAll(list)) => Requirement::All(
            list.requirements
                .iter()
                .map(|r| requirement(r, names))
                .collect::<Result<Vec<_>, _>>()?
                .into_iter()
                .flatten()
                .collect(),
        ),
        Some(T::AllowMissing(_)) => Requirement::Any {
            items: all_providers(),
            allow_missing: true,
            allow_failed: false,
        },
        Some(T::AllowMissingOrFailed(_)) => Requirement::Any {
            items: all_providers(),
            allow_missing: true,
            allow_failed: true,
        },
        None => return Ok(None),
        Some(_) => return Err("JWT requirement kind is not supported".into()),
    }))
}

pub fn compile(c: &JwtAuthentication) -> Result<JwtAuthn, String> {
    if c.filter_state_rules.is_some() || !c.requirement_map.is_empty() {
        return Err("jwt_authn: filter_state_rules and requirement_map are not supported".into());
    }
    let mut named: Vec<(&String, &JwtProvider)> = c.providers.iter().collect();
    named.sort_by(|a, b| a.0.cmp(b.0));
    let providers = named
        .iter()
        .map(|(n, p)| provider(n, p))
        .collect::<Result<Vec<_>, _>>()?;
    let names: Vec<String> = providers.iter().map(|p| p.name.clone()).collect();
    let rules = c
        .rules
        .iter()
        .map(|rule| {
            let m = route_match(rule.r#match.as_ref().ok_or("JWT rule without a match")?)?;
            let req = match &rule.requirement_type {
                Some(requirement_rule::RequirementType::Requires(r)) => requirement(r, &names)?,
                Some(requirement_rule::RequirementType::RequirementName(_)) => {
                    return Err("JWT rule: requirement_name is not supported".to_string());
                }
                None => None,
            };
            Ok((m, req))
        })
        .collect::<Result<Vec<_>, String>>()?;
    Ok(JwtAuthn {
        providers,
        rules,
        bypass_cors_preflight: c.bypass_cors_preflight,
    })
}

impl Location {
    fn extract<'a>(&self, parts: &'a Parts) -> Option<&'a str> {
        match self {
            Location::Header { name, prefix } => {
                let v = parts.headers.get(name)?.to_str().ok()?.trim();
                let p = prefix.as_str();
                // The scheme (`Bearer `) compares without case, as HTTP auth schemes do.
                (v.len() >= p.len() && v.is_char_boundary(p.len()))
                    .then(|| v.split_at(p.len()))
                    .filter(|(head, _)| head.eq_ignore_ascii_case(p))
                    .map(|(_, token)| token.trim())
            }
            Location::Param(name) => query_param(parts, name),
            Location::Cookie(name) => cookie(parts, name),
        }
        .filter(|t| !t.is_empty())
    }
}

fn decode_segment(s: &str) -> Option<Map<String, Value>> {
    let bytes = URL_SAFE_NO_PAD.decode(s.trim_end_matches('=')).ok()?;
    match serde_json::from_slice(&bytes).ok()? {
        Value::Object(m) => Some(m),
        _ => None,
    }
}

impl Provider {
    /// Finds this provider's token and verifies it.
    fn check(&self, parts: &Parts, audiences: Option<&[String]>) -> Result<Verified, Failure> {
        let (token, header) = self
            .locations
            .iter()
            .find_map(|l| {
                l.extract(parts).map(|t| {
                    let h = match l {
                        Location::Header { name, .. } => Some(name.clone()),
                        _ => None,
                    };
                    (t, h)
                })
            })
            .ok_or(Failure::Missing)?;
        let segments: Vec<&str> = token.split('.').collect();
        let [_, encoded_payload, _] = segments[..] else {
            return Err(Failure::Failed(BAD_FORMAT));
        };
        let payload = decode_segment(encoded_payload).ok_or(Failure::Failed(BAD_FORMAT))?;
        let iss = payload.get("iss").and_then(Value::as_str);
        if !self.issuer.is_empty() && iss != Some(self.issuer.as_str()) {
            return Err(Failure::UnknownIssuer);
        }
        let head = jsonwebtoken::decode_header(token).map_err(|_| Failure::Failed(BAD_FORMAT))?;
        let candidates: Vec<&Key> = self
            .keys
            .iter()
            .filter(|k| match (&head.kid, &k.kid) {
                (Some(a), Some(b)) => a == b,
                _ => true,
            })
            .filter(|k| k.alg.is_none_or(|a| a == head.alg))
            .collect();
        if candidates.is_empty() {
            return Err(Failure::Failed(KID_ALG_MISMATCH));
        }
        let audiences = audiences.unwrap_or(&self.audiences);
        let mut v = Validation::new(head.alg);
        v.leeway = u64::from(self.clock_skew);
        v.required_spec_claims.clear();
        if self.require_expiration {
            v.required_spec_claims.insert("exp".into());
        }
        v.validate_nbf = true;
        if audiences.is_empty() {
            v.validate_aud = false;
        } else {
            // A token without `aud` is not for any of them.
            v.required_spec_claims.insert("aud".into());
            v.set_audience(audiences);
        }
        let mut last = Failure::Failed(VERIFICATION_FAILS);
        for k in candidates {
            use jsonwebtoken::errors::ErrorKind as E;
            match jsonwebtoken::decode::<Value>(token, &k.key, &v) {
                Ok(_) => {
                    return Ok(Verified {
                        header,
                        encoded_payload: encoded_payload.to_string(),
                        payload,
                    });
                }
                Err(e) => {
                    last = match e.kind() {
                        E::ExpiredSignature => return Err(Failure::Failed("Jwt is expired")),
                        E::ImmatureSignature => return Err(Failure::Failed("Jwt not yet valid")),
                        E::InvalidAudience => {
                            return Err(Failure::Failed("Audiences in Jwt are not allowed"));
                        }
                        E::MissingRequiredClaim(c) if c == "aud" => {
                            return Err(Failure::Failed("Audiences in Jwt are not allowed"));
                        }
                        E::MissingRequiredClaim(_) => {
                            return Err(Failure::Failed("Jwt is missing a required claim"));
                        }
                        // A key of another kind or a bad signature: try the next key.
                        _ => Failure::Failed(VERIFICATION_FAILS),
                    }
                }
            }
        }
        Err(last)
    }
}

/// A provider, with the audiences a requirement asks of it instead of its own.
type Check<'a> = (usize, Option<&'a [String]>);

/// Per request: each provider is checked once however often requirements name it.
struct Checks<'a, 'p> {
    authn: &'a JwtAuthn,
    parts: &'p Parts,
    done: HashMap<Check<'a>, Result<Verified, Failure>>,
}

impl<'a> Checks<'a, '_> {
    fn eval(&mut self, r: &'a Requirement) -> Result<(), Failure> {
        match r {
            Requirement::Provider { index, audiences } => {
                let key = (*index, audiences.as_deref());
                if !self.done.contains_key(&key) {
                    let outcome = self.authn.providers[*index].check(self.parts, key.1);
                    self.done.insert(key, outcome);
                }
                self.done[&key].as_ref().map(|_| ()).map_err(|f| *f)
            }
            Requirement::All(items) => items.iter().try_for_each(|r| self.eval(r)),
            Requirement::Any {
                items,
                allow_missing,
                allow_failed,
            } => {
                // Envoy's aggregation: a real failure outranks an unknown issuer, which
                // outranks a missing token; only a missing one is allowed by `allow_missing`.
                let mut worst = Failure::Missing;
                for r in items {
                    match self.eval(r) {
                        Ok(()) => return Ok(()),
                        Err(f @ Failure::Failed(_)) => {
                            if !matches!(worst, Failure::Failed(_)) {
                                worst = f;
                            }
                        }
                        Err(Failure::UnknownIssuer) => {
                            if worst == Failure::Missing {
                                worst = Failure::UnknownIssuer;
                            }
                        }
                        Err(Failure::Missing) => {}
                    }
                }
                if *allow_failed || (*allow_missing && worst == Failure::Missing) {
                    Ok(())
                } else {
                    Err(worst)
                }
            }
        }
    }
}

fn claim<'a>(payload: &'a Map<String, Value>, name: &str) -> Option<&'a Value> {
    let mut parts = name.split('.');
    let mut v = payload.get(parts.next()?)?;
    for p in parts {
        v = v.as_object()?.get(p)?;
    }
    Some(v)
}

impl JwtAuthn {
    fn is_cors_preflight(parts: &Parts) -> bool {
        parts.method == http::Method::OPTIONS
            && parts.headers.contains_key(http::header::ORIGIN)
            && parts
                .headers
                .contains_key(http::header::ACCESS_CONTROL_REQUEST_METHOD)
    }

    /// Verifies the request's tokens against the first rule whose match it meets. On success
    /// the verified payloads go to `metadata` and the token and claim headers are updated.
    pub fn verify(&self, parts: &mut Parts, metadata: &mut DynamicMetadata) -> Result<(), Failure> {
        if self.bypass_cors_preflight && Self::is_cors_preflight(parts) {
            return Ok(());
        }
        let Some(req) = self
            .rules
            .iter()
            .find(|(m, _)| m.matches(parts))
            .and_then(|(_, r)| r.as_ref())
        else {
            return Ok(());
        };
        let mut checks = Checks {
            authn: self,
            parts,
            done: HashMap::new(),
        };
        checks.eval(req)?;
        let mut verified: Vec<(usize, Verified)> = checks
            .done
            .into_iter()
            .filter_map(|((i, _), r)| r.ok().map(|v| (i, v)))
            .collect();
        verified.sort_by_key(|(i, _)| *i);
        for (i, v) in verified {
            self.providers[i].apply(v, parts, metadata);
        }
        Ok(())
    }
}

impl Provider {
    fn apply(&self, v: Verified, parts: &mut Parts, metadata: &mut DynamicMetadata) {
        if !self.forward
            && let Some(h) = &v.header
        {
            parts.headers.remove(h);
        }
        if let Some(h) = &self.payload_header
            && let Ok(value) = http::HeaderValue::from_str(&v.encoded_payload)
        {
            parts.headers.insert(h.clone(), value);
        }
        for (h, name) in &self.claim_headers {
            let text = match claim(&v.payload, name) {
                Some(Value::String(s)) => s.clone(),
                Some(n @ (Value::Number(_) | Value::Bool(_))) => n.to_string(),
                _ => continue,
            };
            if let Ok(value) = http::HeaderValue::from_str(&text) {
                parts.headers.insert(h.clone(), value);
            }
        }
        if let Some(key) = &self.payload_in_metadata {
            let mut payload = v.payload;
            for c in &self.space_delimited {
                if let Some(Value::String(s)) = payload.get(c) {
                    let list = s.split(' ').filter(|w| !w.is_empty());
                    let list = list.map(|w| Value::String(w.to_string())).collect();
                    payload.insert(c.clone(), Value::Array(list));
                }
            }
            let ns = metadata
                .entry(FILTER)
                .or_insert_with(|| Value::Object(Map::new()));
            if let Value::Object(m) = ns {
                m.insert(key.clone(), Value::Object(payload));
            }
        }
    }
}
