//! Envoy's CORS filter (`envoy.filters.http.cors`) with a route's policy (what Istio makes of a
//! VirtualService `corsPolicy`): a preflight from an allowed origin is answered by the proxy,
//! and the responses to other requests from it carry the policy's `access-control-*` headers.

use envoy_types::pb::envoy::extensions::filters::http::cors::v3::CorsPolicy;
use envoy_types::pb::google::protobuf::Any;
use http::header::{
    ACCESS_CONTROL_ALLOW_CREDENTIALS, ACCESS_CONTROL_ALLOW_HEADERS, ACCESS_CONTROL_ALLOW_METHODS,
    ACCESS_CONTROL_ALLOW_ORIGIN, ACCESS_CONTROL_EXPOSE_HEADERS, ACCESS_CONTROL_MAX_AGE,
    ACCESS_CONTROL_REQUEST_HEADERS, ACCESS_CONTROL_REQUEST_METHOD, ORIGIN,
};
use http::request::Parts;
use http::{HeaderMap, HeaderName, HeaderValue, Method};
use prost::Message;

use super::route::{Text, ppm, roll, text};

/// The filter's name, the key of its per-route configuration.
pub const FILTER: &str = "envoy.filters.http.cors";

const REQUEST_PRIVATE_NETWORK: HeaderName =
    HeaderName::from_static("access-control-request-private-network");
const ALLOW_PRIVATE_NETWORK: HeaderName =
    HeaderName::from_static("access-control-allow-private-network");

#[derive(Debug)]
pub struct Cors {
    origins: Vec<Text>,
    allow_methods: Option<HeaderValue>,
    allow_headers: Option<HeaderValue>,
    expose_headers: Option<HeaderValue>,
    max_age: Option<HeaderValue>,
    allow_credentials: bool,
    allow_private_network: bool,
    /// Preflights from other origins go on to the app (Envoy's default) or are answered
    /// without the allow headers (Istio's `unmatchedPreflights: IGNORE`).
    forward_unmatched_preflights: bool,
    /// Shares of requests (parts per million) the policy is enforced on, and only counted on.
    enabled: u32,
    shadow: u32,
}

/// What the policy makes of a request that names its origin.
#[derive(Debug)]
pub struct Verdict {
    /// The origin is one the policy allows (Envoy's `cors.origin_valid`, else `origin_invalid`).
    pub allowed: Option<HeaderValue>,
    /// The policy is enforced (not only counted) on this request.
    pub enforced: bool,
    /// A preflight the proxy answers itself (200), with these headers.
    pub answer: Option<HeaderMap>,
}

impl Cors {
    /// Decodes the filter's per-route configuration.
    pub fn decode(any: &Any) -> Result<Cors, String> {
        let p = CorsPolicy::decode(any.value.as_slice()).map_err(|e| format!("cors: {e}"))?;
        let value = |name: &str, v: &str| {
            (!v.is_empty())
                .then(|| {
                    HeaderValue::from_str(v)
                        .map_err(|_| format!("cors {name} {v:?} is not a valid header value"))
                })
                .transpose()
        };
        let share = |f: &Option<
            envoy_types::pb::envoy::config::core::v3::RuntimeFractionalPercent,
        >| { f.as_ref().map(|f| ppm(f.default_value.as_ref())) };
        let (enabled, shadow) = match (share(&p.filter_enabled), share(&p.shadow_enabled)) {
            // Neither: enforced on every request.
            (None, None) => (1_000_000, 0),
            (e, s) => (e.unwrap_or(0), s.unwrap_or(0)),
        };
        Ok(Cors {
            origins: p
                .allow_origin_string_match
                .iter()
                .map(text)
                .collect::<Result<_, _>>()
                .map_err(|e| format!("cors allow_origin_string_match: {e}"))?,
            allow_methods: value("allow_methods", &p.allow_methods)?,
            allow_headers: value("allow_headers", &p.allow_headers)?,
            expose_headers: value("expose_headers", &p.expose_headers)?,
            max_age: value("max_age", &p.max_age)?,
            allow_credentials: p.allow_credentials.is_some_and(|b| b.value),
            allow_private_network: p.allow_private_network_access.is_some_and(|b| b.value),
            forward_unmatched_preflights: p.forward_not_matching_preflights.is_none_or(|b| b.value),
            enabled,
            shadow,
        })
    }

    /// The policy's verdict on a request, if it is one the policy speaks to: it names an
    /// origin and falls in the enforced or counted share.
    pub fn request(&self, parts: &Parts) -> Option<Verdict> {
        let origin = parts.headers.get(ORIGIN).filter(|o| !o.is_empty())?;
        let enforced = roll(self.enabled);
        if !enforced && !roll(self.shadow) {
            return None;
        }
        let allowed = origin
            .to_str()
            .is_ok_and(|o| self.origins.iter().any(|m| m.matches("*") || m.matches(o)))
            .then(|| origin.clone());
        let preflight = parts.method == Method::OPTIONS
            && parts
                .headers
                .get(ACCESS_CONTROL_REQUEST_METHOD)
                .is_some_and(|m| !m.is_empty());
        let answer =
            (enforced && preflight && (allowed.is_some() || !self.forward_unmatched_preflights))
                .then(|| self.preflight(parts, allowed.as_ref()));
        Some(Verdict {
            allowed,
            enforced,
            answer,
        })
    }

    /// The headers of the proxy's answer to a preflight.
    fn preflight(&self, parts: &Parts, origin: Option<&HeaderValue>) -> HeaderMap {
        let mut h = HeaderMap::new();
        if let Some(o) = origin {
            h.insert(ACCESS_CONTROL_ALLOW_ORIGIN, o.clone());
        }
        if self.allow_credentials {
            h.insert(
                ACCESS_CONTROL_ALLOW_CREDENTIALS,
                HeaderValue::from_static("true"),
            );
        }
        // `*` allows whatever the preflight asks for, said back by name.
        let echo = |allowed: &Option<HeaderValue>, asked: HeaderName| match allowed {
            Some(v) if v == "*" => parts.headers.get(asked).cloned(),
            other => other.clone(),
        };
        if let Some(v) = echo(&self.allow_methods, ACCESS_CONTROL_REQUEST_METHOD) {
            h.insert(ACCESS_CONTROL_ALLOW_METHODS, v);
        }
        if let Some(v) = echo(&self.allow_headers, ACCESS_CONTROL_REQUEST_HEADERS) {
            h.insert(ACCESS_CONTROL_ALLOW_HEADERS, v);
        }
        if let Some(v) = &self.max_age {
            h.insert(ACCESS_CONTROL_MAX_AGE, v.clone());
        }
        if self.allow_private_network
            && parts
                .headers
                .get(REQUEST_PRIVATE_NETWORK)
                .is_some_and(|v| v == "true")
        {
            h.insert(ALLOW_PRIVATE_NETWORK, HeaderValue::from_static("true"));
        }
        h
    }

    /// The headers on the response to an allowed origin's request.
    pub fn respond(&self, origin: HeaderValue, h: &mut HeaderMap) {
        h.insert(ACCESS_CONTROL_ALLOW_ORIGIN, origin);
        if self.allow_credentials {
            h.insert(
                ACCESS_CONTROL_ALLOW_CREDENTIALS,
                HeaderValue::from_static("true"),
            );
        }
        if let Some(v) = &self.expose_headers {
            h.insert(ACCESS_CONTROL_EXPOSE_HEADERS, v.clone());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use envoy_types::pb::envoy::config::core::v3::RuntimeFractionalPercent;
    use envoy_types::pb::envoy::r#type::matcher::v3::{StringMatcher, string_matcher};
    use envoy_types::pb::envoy::r#type::v3::FractionalPercent;
    use envoy_types::pb::google::protobuf::BoolValue;

    fn policy(p: CorsPolicy) -> Cors {
        Cors::decode(&Any {
            type_url: "type.googleapis.com/envoy.extensions.filters.http.cors.v3.CorsPolicy".into(),
            value: p.encode_to_vec(),
        })
        .unwrap()
    }

    fn example() -> CorsPolicy {
        CorsPolicy {
            allow_origin_string_match: vec![
                StringMatcher {
                    match_pattern: Some(string_matcher::MatchPattern::Exact(
                        "https://app.example.com".into(),
                    )),
                    ..Default::default()
                },
                StringMatcher {
                    match_pattern: Some(string_matcher::MatchPattern::Suffix(
                        ".trusted.example".into(),
                    )),
                    ..Default::default()
                },
            ],
            allow_methods: "GET,POST".into(),
            allow_headers: "x-custom".into(),
            expose_headers: "x-total".into(),
            max_age: "86400".into(),
            allow_credentials: Some(BoolValue { value: true }),
            ..Default::default()
        }
    }

    fn request(method: Method, headers: &[(&str, &str)]) -> Parts {
        let mut b = http::Request::builder().method(method).uri("/api");
        for (k, v) in headers {
            b = b.header(*k, *v);
        }
        b.body(()).unwrap().into_parts().0
    }

    #[test]
    fn a_preflight_from_an_allowed_origin_is_answered_with_the_policy() {
        let cors = policy(example());
        let v = cors
            .request(&request(
                Method::OPTIONS,
                &[
                    ("origin", "https://app.example.com"),
                    ("access-control-request-method", "POST"),
                ],
            ))
            .unwrap();
        let h = v.answer.unwrap();
        assert_eq!(h["access-control-allow-origin"], "https://app.example.com");
        assert_eq!(h["access-control-allow-methods"], "GET,POST");
        assert_eq!(h["access-control-allow-headers"], "x-custom");
        assert_eq!(h["access-control-max-age"], "86400");
        assert_eq!(h["access-control-allow-credentials"], "true");
        assert!(!h.contains_key("access-control-expose-headers"));
    }

    #[test]
    fn requests_from_allowed_origins_get_the_allow_headers_and_others_nothing() {
        let cors = policy(example());
        let v = cors
            .request(&request(
                Method::GET,
                &[("origin", "https://a.trusted.example")],
            ))
            .unwrap();
        assert!(v.enforced && v.answer.is_none());
        let mut h = HeaderMap::new();
        cors.respond(v.allowed.unwrap(), &mut h);
        assert_eq!(
            h["access-control-allow-origin"],
            "https://a.trusted.example"
        );
        assert_eq!(h["access-control-expose-headers"], "x-total");
        assert_eq!(h["access-control-allow-credentials"], "true");

        let other = cors
            .request(&request(Method::GET, &[("origin", "https://evil.example")]))
            .unwrap();
        assert!(other.allowed.is_none() && other.answer.is_none());
        // No origin: not a cross-origin request.
        assert!(cors.request(&request(Method::GET, &[])).is_none());
    }

    #[test]
    fn unmatched_preflights_go_on_unless_the_policy_answers_them() {
        let preflight = request(
            Method::OPTIONS,
            &[
                ("origin", "https://evil.example"),
                ("access-control-request-method", "DELETE"),
            ],
        );
        let forwarded = policy(example()).request(&preflight).unwrap();
        assert!(forwarded.allowed.is_none() && forwarded.answer.is_none());
        let answered = policy(CorsPolicy {
            forward_not_matching_preflights: Some(BoolValue { value: false }),
            ..example()
        })
        .request(&preflight)
        .unwrap();
        let h = answered.answer.unwrap();
        assert!(!h.contains_key("access-control-allow-origin"));
        assert_eq!(h["access-control-allow-methods"], "GET,POST");
    }

    #[test]
    fn wildcards_allow_any_origin_and_echo_what_the_preflight_asks() {
        let cors = policy(CorsPolicy {
            allow_origin_string_match: vec![StringMatcher {
                match_pattern: Some(string_matcher::MatchPattern::Exact("*".into())),
                ..Default::default()
            }],
            allow_methods: "*".into(),
            allow_headers: "*".into(),
            ..Default::default()
        });
        let h = cors
            .request(&request(
                Method::OPTIONS,
                &[
                    ("origin", "https://anywhere.example"),
                    ("access-control-request-method", "PATCH"),
                    ("access-control-request-headers", "x-a,x-b"),
                ],
            ))
            .unwrap()
            .answer
            .unwrap();
        assert_eq!(h["access-control-allow-origin"], "https://anywhere.example");
        assert_eq!(h["access-control-allow-methods"], "PATCH");
        assert_eq!(h["access-control-allow-headers"], "x-a,x-b");
    }

    #[test]
    fn a_disabled_policy_only_counts_in_shadow_mode() {
        let off = |shadow: u32| RuntimeFractionalPercent {
            default_value: Some(FractionalPercent {
                numerator: shadow,
                denominator: 0,
            }),
            ..Default::default()
        };
        let get = request(Method::GET, &[("origin", "https://app.example.com")]);
        let disabled = policy(CorsPolicy {
            filter_enabled: Some(off(0)),
            ..example()
        });
        assert!(disabled.request(&get).is_none());
        let shadow = policy(CorsPolicy {
            filter_enabled: Some(off(0)),
            shadow_enabled: Some(off(100)),
            ..example()
        });
        let v = shadow.request(&get).unwrap();
        assert!(!v.enforced && v.allowed.is_some());
    }

    #[test]
    fn header_values_that_cannot_be_sent_are_refused() {
        let err = Cors::decode(&Any {
            type_url: String::new(),
            value: CorsPolicy {
                allow_methods: "GET\nPOST".into(),
                ..Default::default()
            }
            .encode_to_vec(),
        })
        .unwrap_err();
        assert!(err.contains("allow_methods"), "{err}");
    }
}
