//! Envoy's stats as an Istio sidecar exports them to Prometheus: only those its stats matcher
//! includes (Istio's defaults, plus a pod's ProxyConfig `proxyStatsMatcher`), named with
//! Istio's tags, so that `cluster.<name>.upstream_rq_200` is scraped as
//! `envoy_cluster_upstream_rq{cluster_name="<name>",response_code="200"}`.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::LazyLock;

use regex::Regex;

/// Kept whatever a pod asks for: the lifecycle and control-plane signals (Istio's bootstrap).
const PREFIXES: [&str; 5] = [
    "cluster_manager",
    "listener_manager",
    "server",
    "cluster.xds-grpc",
    "wasm",
];
const SUFFIXES: [&str; 5] = [
    "downstream_cx_active",
    "rbac.allowed",
    "rbac.denied",
    "shadow_allowed",
    "shadow_denied",
];
const REGEXPS: [&str; 1] = [r"vhost\..*\.route\..*"];

#[derive(Debug, thiserror::Error)]
#[error("proxyStatsMatcher.inclusionRegexps[{index}] {regex:?}")]
pub struct MatcherError {
    index: usize,
    regex: String,
    source: Box<regex::Error>,
}

/// Which Envoy stats reach Prometheus: Envoy's `stats_matcher` inclusion list as Istio fills
/// it. A name is in when it starts with one of the prefixes, ends with one of the suffixes or
/// is matched whole by one of the expressions.
#[derive(Debug, Clone)]
pub struct Inclusions {
    prefixes: Vec<String>,
    suffixes: Vec<String>,
    /// As written, and compiled to match whole names.
    regexps: Vec<(String, Regex)>,
}

impl Default for Inclusions {
    /// Istio's own list.
    fn default() -> Self {
        Inclusions {
            prefixes: PREFIXES.map(String::from).to_vec(),
            suffixes: SUFFIXES.map(String::from).to_vec(),
            regexps: REGEXPS
                .iter()
                .filter_map(|re| Some((re.to_string(), whole(re).ok()?)))
                .collect(),
        }
    }
}

/// Envoy matches a stats matcher's expression against the whole name. Compiled as written
/// first, so that an error shows the expression its author wrote.
fn whole(re: &str) -> Result<Regex, regex::Error> {
    Regex::new(re)?;
    Regex::new(&format!("^(?:{re})$"))
}

impl Inclusions {
    /// Istio's list and a pod's `proxyStatsMatcher` (`inclusionPrefixes`,
    /// `inclusionSuffixes`, `inclusionRegexps`).
    pub fn istio(
        prefixes: &[String],
        suffixes: &[String],
        regexps: &[String],
    ) -> Result<Inclusions, MatcherError> {
        let mut inclusions = Inclusions::default();
        inclusions.prefixes.extend_from_slice(prefixes);
        inclusions.suffixes.extend_from_slice(suffixes);
        for (index, re) in regexps.iter().enumerate() {
            let compiled = whole(re).map_err(|e| MatcherError {
                index,
                regex: re.clone(),
                source: Box::new(e),
            })?;
            inclusions.regexps.push((re.clone(), compiled));
        }
        Ok(inclusions)
    }

    pub fn includes(&self, name: &str) -> bool {
        self.prefixes.iter().any(|p| name.starts_with(p.as_str()))
            || self.suffixes.iter().any(|s| name.ends_with(s.as_str()))
            || self.regexps.iter().any(|(_, r)| r.is_match(name))
    }

    /// Envoy's bootstrap `stats_config` of these inclusions and Istio's tags.
    pub fn stats_config(&self) -> serde_json::Value {
        let patterns: Vec<serde_json::Value> = (self.prefixes.iter())
            .map(|p| serde_json::json!({ "prefix": p }))
            .chain(
                self.suffixes
                    .iter()
                    .map(|s| serde_json::json!({ "suffix": s })),
            )
            .chain(
                (self.regexps.iter())
                    .map(|(re, _)| serde_json::json!({ "safe_regex": { "regex": re } })),
            )
            .collect();
        let tags: Vec<serde_json::Value> = (TAGS.iter())
            .map(|(name, re)| serde_json::json!({ "tag_name": name, "regex": re.as_str() }))
            .collect();
        serde_json::json!({
            "stats_tags": tags,
            "use_all_default_tags": false,
            "stats_matcher": { "inclusion_list": { "patterns": patterns } },
        })
    }
}

/// Istio's `stats_tags` (its bootstrap, `use_all_default_tags: false`), in its order. In each,
/// the first group is cut from the name and the second one is the tag's value.
static TAGS: LazyLock<Vec<(&'static str, Regex)>> = LazyLock::new(|| {
    [
        (
            "cluster_name",
            r"^cluster\.((.+?(\..+?\.svc\.cluster\.local)?)\.)",
        ),
        ("tcp_prefix", r"^tcp\.((.*?)\.)\w+?$"),
        ("response_code", r"_rq(_(\d{3}))$"),
        ("response_code_class", r"_rq(_(\dxx))$"),
        // Istio writes `^listener(?=\.).*?\.http\.`; without look-ahead, this matches the same.
        (
            "http_conn_manager_listener_prefix",
            r"^listener\.(?:.*?\.)?http\.(((?:[_.[:digit:]]*|[_\[\]aAbBcCdDeEfF[:digit:]]*))\.)",
        ),
        (
            "http_conn_manager_prefix",
            r"^http\.(((?:[_.[:digit:]]*|[_\[\]aAbBcCdDeEfF[:digit:]]*))\.)",
        ),
        (
            "listener_address",
            r"^listener\.(((?:[_.[:digit:]]*|[_\[\]aAbBcCdDeEfF[:digit:]]*))\.)",
        ),
        ("authz_enforce_result", r"rbac(\.(allowed|denied))"),
        ("authz_dry_run_result", r"(\.shadow_(allowed|denied))"),
    ]
    .into_iter()
    .filter_map(|(name, re)| Some((name, Regex::new(re).ok()?)))
    .collect()
});

/// A stat's name with its tags taken out, and the tags, as Envoy's tag extraction does: every
/// rule looks at the full name, and what the rules cut is removed at the end.
fn extract_tags(name: &str) -> (String, Vec<(&'static str, &str)>) {
    let mut cut = vec![false; name.len()];
    let mut tags = Vec::new();
    for (tag, re) in TAGS.iter() {
        let Some(c) = re.captures(name) else { continue };
        // Envoy's rule: the second group is the value, or the first when there is no second.
        let Some(removed) = c.get(1) else { continue };
        let value = c.get(2).unwrap_or(removed);
        cut[removed.range()].iter_mut().for_each(|b| *b = true);
        tags.push((*tag, value.as_str()));
    }
    let kept = name
        .char_indices()
        .filter(|(i, _)| !cut[*i])
        .map(|(_, c)| c)
        .collect();
    (kept, tags)
}

/// Envoy's Prometheus name: `envoy_` and the name with what Prometheus does not allow as `_`.
fn metric_name(name: &str) -> String {
    let mut out = String::with_capacity(name.len() + 6);
    out.push_str("envoy_");
    out.extend(
        name.chars()
            .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' }),
    );
    out
}

fn escape_label(v: &str) -> String {
    v.replace('\\', r"\\")
        .replace('"', "\\\"")
        .replace('\n', r"\n")
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Counter,
    Gauge,
}

/// The Prometheus text of the included stats: one family per name after tag extraction, each
/// with its `# TYPE` line once, families and their samples in order.
pub fn prometheus<'a>(
    inclusions: &Inclusions,
    stats: impl IntoIterator<Item = (&'a str, u64, Kind)>,
) -> String {
    let mut families: BTreeMap<String, (Kind, Vec<String>)> = BTreeMap::new();
    for (name, value, kind) in stats {
        if !inclusions.includes(name) {
            continue;
        }
        let (base, tags) = extract_tags(name);
        let labels: Vec<String> = tags
            .iter()
            .map(|(k, v)| format!("{k}=\"{}\"", escape_label(v)))
            .collect();
        let sample = if labels.is_empty() {
            format!("{} {value}", metric_name(&base))
        } else {
            format!("{}{{{}}} {value}", metric_name(&base), labels.join(","))
        };
        families
            .entry(metric_name(&base))
            .or_insert_with(|| (kind, Vec::new()))
            .1
            .push(sample);
    }
    let mut out = String::new();
    for (name, (kind, mut samples)) in families {
        samples.sort_unstable();
        let kind = match kind {
            Kind::Counter => "counter",
            Kind::Gauge => "gauge",
        };
        let _ = writeln!(out, "# TYPE {name} {kind}");
        for s in samples {
            out.push_str(&s);
            out.push('\n');
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_lose_istios_tags_as_envoy_extracts_them() {
        let cases = [
            (
                "cluster.outbound|9080|v1|reviews.default.svc.cluster.local.upstream_rq_200",
                "cluster.upstream_rq",
                vec![
                    (
                        "cluster_name",
                        "outbound|9080|v1|reviews.default.svc.cluster.local",
                    ),
                    ("response_code", "200"),
                ],
            ),
            (
                "cluster.xds-grpc.upstream_rq_2xx",
                "cluster.upstream_rq",
                vec![("cluster_name", "xds-grpc"), ("response_code_class", "2xx")],
            ),
            (
                "cluster.PassthroughCluster.upstream_cx_total",
                "cluster.upstream_cx_total",
                vec![("cluster_name", "PassthroughCluster")],
            ),
            // Istio's expression stops at the first dot of a name outside the cluster domain.
            (
                "cluster.outbound|443||www.example.com.upstream_cx_total",
                "cluster.example.com.upstream_cx_total",
                vec![("cluster_name", "outbound|443||www")],
            ),
            (
                "http.10.0.0.1_8080.downstream_rq_total",
                "http.downstream_rq_total",
                vec![("http_conn_manager_prefix", "10.0.0.1_8080")],
            ),
            (
                "listener.10.0.0.1_8080.http.10.0.0.1_8080.downstream_rq_2xx",
                "listener.http.downstream_rq",
                vec![
                    ("response_code_class", "2xx"),
                    ("http_conn_manager_listener_prefix", "10.0.0.1_8080"),
                    ("listener_address", "10.0.0.1_8080"),
                ],
            ),
            (
                "listener.0.0.0.0_15006.downstream_cx_active",
                "listener.downstream_cx_active",
                vec![("listener_address", "0.0.0.0_15006")],
            ),
            (
                "tcp.inbound|9000||.idle_timeout",
                "tcp.idle_timeout",
                vec![("tcp_prefix", "inbound|9000||")],
            ),
            (
                "http.inbound_0.0.0.0_9080.rbac.denied",
                "http.inbound_0.0.0.0_9080.rbac",
                vec![("authz_enforce_result", "denied")],
            ),
            ("server.live", "server.live", vec![]),
        ];
        for (name, base, tags) in cases {
            assert_eq!(extract_tags(name), (base.to_string(), tags), "{name}");
        }
    }

    #[test]
    fn only_included_stats_are_exported_in_families() {
        let defaults = Inclusions::default();
        let stats = [
            ("server.live", 1, Kind::Gauge),
            ("cluster.xds-grpc.upstream_cx_total", 2, Kind::Counter),
            (
                "cluster.outbound|9080||reviews.default.svc.cluster.local.upstream_rq_total",
                7,
                Kind::Counter,
            ),
            (
                "cluster.outbound|9080||ratings.default.svc.cluster.local.upstream_rq_total",
                3,
                Kind::Counter,
            ),
            ("http.inbound_0.0.0.0_9080.rbac.allowed", 4, Kind::Counter),
            (
                "http.inbound_0.0.0.0_9080.downstream_rq_total",
                9,
                Kind::Counter,
            ),
        ];
        assert_eq!(
            prometheus(&defaults, stats),
            "# TYPE envoy_cluster_upstream_cx_total counter\n\
             envoy_cluster_upstream_cx_total{cluster_name=\"xds-grpc\"} 2\n\
             # TYPE envoy_http_inbound_0_0_0_0_9080_rbac counter\n\
             envoy_http_inbound_0_0_0_0_9080_rbac{authz_enforce_result=\"allowed\"} 4\n\
             # TYPE envoy_server_live gauge\n\
             envoy_server_live 1\n"
        );
        // A pod's `proxyStatsMatcher` adds to Istio's list.
        let outbound = Inclusions::istio(
            &["cluster.outbound".into()],
            &[],
            &[r"http\..*_total".into()],
        )
        .unwrap();
        let text = prometheus(&outbound, stats);
        assert!(
            text.contains(
                "# TYPE envoy_cluster_upstream_rq_total counter\n\
                 envoy_cluster_upstream_rq_total{cluster_name=\"outbound|9080||ratings.default.svc.cluster.local\"} 3\n\
                 envoy_cluster_upstream_rq_total{cluster_name=\"outbound|9080||reviews.default.svc.cluster.local\"} 7\n"
            ),
            "{text}"
        );
        assert!(
            text.contains("envoy_http_inbound_0_0_0_0_9080_downstream_rq_total 9\n"),
            "{text}"
        );
        // Matched whole, as Envoy matches: `http\..*_tot` is not a match for `…_total`.
        let partial = Inclusions::istio(&[], &[], &[r"http\..*_tot".into()]).unwrap();
        assert!(!prometheus(&partial, stats).contains("downstream_rq_total"));
    }

    #[test]
    fn a_bad_expression_is_named() {
        let err = Inclusions::istio(&[], &[], &["ok".into(), "(".into()]).unwrap_err();
        assert_eq!(
            err.to_string(),
            "proxyStatsMatcher.inclusionRegexps[1] \"(\""
        );
        let cause = std::error::Error::source(&err).map(ToString::to_string);
        assert!(cause.is_some_and(|c| c.contains("unclosed group")));
    }
}
