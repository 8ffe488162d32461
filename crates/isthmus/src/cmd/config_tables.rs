//! istioctl's `proxy-config` tables, drawn from the JSON of a config dump: the same columns,
//! descriptions and order, so that output reads as istioctl's does.

use serde_json::Value;

use crate::cmd::render_table as render;

fn s(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Null => String::new(),
        other => other.to_string(),
    }
}

fn header(cols: &[&str]) -> Vec<String> {
    cols.iter().map(|c| c.to_string()).collect()
}

/// A cluster name's parts as istioctl sorts and shows them: `(direction, subset, host, port)`
/// for `outbound|9080|v1|reviews…`, the whole name as host otherwise.
fn subset_key(name: &str) -> (&str, &str, &str, u16) {
    match name.split('|').collect::<Vec<_>>().as_slice() {
        [dir, port, subset, host] => (dir, subset, host, port.parse().unwrap_or(0)),
        _ => ("", "", name, 0),
    }
}

/// Which Istio config made a resource (`filter_metadata.istio.config`), as `name.namespace`.
fn management(metadata: &Value) -> String {
    let Some(path) = metadata["filter_metadata"]["istio"]["config"].as_str() else {
        return String::new();
    };
    let pieces: Vec<&str> = path.split('/').collect();
    match pieces.as_slice() {
        [
            "",
            "apis",
            "networking.istio.io",
            "v1alpha3",
            "namespaces",
            ns,
            _,
            name,
        ] => {
            format!("{name}.{ns}")
        }
        _ => "<unknown>".into(),
    }
}

/// istioctl's cluster table: sorted by host, subset, port and direction.
pub(crate) fn clusters(clusters: &[Value]) -> String {
    let mut sorted: Vec<&Value> = clusters.iter().collect();
    sorted.sort_by_key(|c| {
        let (dir, subset, host, port) = subset_key(c["name"].as_str().unwrap_or(""));
        (host, subset, port, dir)
    });
    let mut rows = vec![header(&[
        "SERVICE FQDN",
        "PORT",
        "SUBSET",
        "DIRECTION",
        "TYPE",
        "DESTINATION RULE",
    ])];
    for c in sorted {
        let name = c["name"].as_str().unwrap_or("");
        // Envoy's JSON leaves out the default type, STATIC.
        let kind = c["type"].as_str().unwrap_or("STATIC").to_string();
        let rule = management(&c["metadata"]);
        rows.push(match subset_key(name) {
            ("", _, _, _) => vec![name.into(), "-".into(), "-".into(), "-".into(), kind, rule],
            (dir, subset, host, port) => vec![
                host.into(),
                port.to_string(),
                if subset.is_empty() { "-" } else { subset }.into(),
                dir.into(),
                kind,
                rule,
            ],
        });
    }
    render(&rows)
}

const HCM: &str = "envoy.filters.network.http_connection_manager";
const TCP_PROXY: &str = "envoy.filters.network.tcp_proxy";
const BLACKHOLE: &str = "BlackHoleCluster";

fn chains(l: &Value) -> impl Iterator<Item = &Value> {
    l["filter_chains"]
        .as_array()
        .into_iter()
        .flatten()
        .chain(l.get("default_filter_chain"))
}

/// HTTP, TCP, HTTP+TCP or UNKNOWN, by the filters of the listener's chains (a TCP proxy to
/// the BlackHoleCluster does not count).
pub(crate) fn listener_type(l: &Value) -> &'static str {
    let filters: Vec<&Value> = chains(l)
        .flat_map(|c| c["filters"].as_array().into_iter().flatten())
        .collect();
    let http = filters.iter().any(|f| f["name"] == HCM);
    let tcp = filters
        .iter()
        .any(|f| f["name"] == TCP_PROXY && !f["typed_config"].to_string().contains(BLACKHOLE));
    match (http, tcp) {
        (true, false) => "HTTP",
        (true, true) => "HTTP+TCP",
        (false, true) => "TCP",
        (false, false) => "UNKNOWN",
    }
}

/// Application protocol lists istioctl names.
const KNOWN_ALPNS: [(&str, &[&str]); 4] = [
    (
        "App: HTTP TLS",
        &[
            "http/1.0",
            "http/1.1",
            "h2c",
            "istio-http/1.0",
            "istio-http/1.1",
            "istio-h2",
        ],
    ),
    (
        "App: Istio HTTP Plain",
        &["istio", "istio-http/1.0", "istio-http/1.1", "istio-h2"],
    ),
    ("App: TCP TLS", &["istio-peer-exchange", "istio"]),
    ("App: HTTP", &["http/1.0", "http/1.1", "h2c"]),
];

fn chain_match(m: &Value) -> String {
    let list = |v: &Value| -> Vec<String> { v.as_array().into_iter().flatten().map(s).collect() };
    let mut parts = Vec::new();
    let names = list(&m["server_names"]);
    if !names.is_empty() {
        parts.push(format!("SNI: {}", names.join(",")));
    }
    if let Some(t) = m["transport_protocol"].as_str() {
        parts.push(format!("Trans: {t}"));
    }
    let alpns = list(&m["application_protocols"]);
    if !alpns.is_empty() {
        parts.push(
            KNOWN_ALPNS
                .iter()
                .find(|(_, known)| alpns == *known)
                .map_or_else(
                    || format!("App: {}", alpns.join(",")),
                    |(d, _)| d.to_string(),
                ),
        );
    }
    let port = m["destination_port"]
        .as_u64()
        .map(|p| format!(":{p}"))
        .unwrap_or_default();
    let ranges: Vec<String> = m["prefix_ranges"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|r| {
            format!(
                "{}/{}",
                s(&r["address_prefix"]),
                r["prefix_len"].as_u64().unwrap_or(0)
            )
        })
        .collect();
    if !ranges.is_empty() {
        parts.push(format!("Addr: {}{port}", ranges.join(",")));
    } else if !port.is_empty() {
        parts.push(format!("Addr: *{port}"));
    }
    if parts.is_empty() {
        "ALL".into()
    } else {
        parts.join("; ")
    }
}

/// A cluster as istioctl names a destination: the fixed ones (`PassthroughCluster`) alone.
fn cluster_destination(cluster: &str) -> String {
    if cluster.contains("Cluster") {
        cluster.into()
    } else {
        format!("Cluster: {cluster}")
    }
}

fn route_match(m: &Value) -> String {
    let mut conds = Vec::new();
    if let Some(p) = m["prefix"].as_str() {
        conds.push(format!("{p}*"));
    }
    if let Some(p) = m["path"].as_str() {
        conds.push(p.to_string());
    }
    if let Some(r) = m["safe_regex"]["regex"].as_str() {
        conds.push(format!("regex {r}"));
    }
    conds.join(" ")
}

/// An inline route configuration: the cluster when it sends everything to one, else its
/// virtual hosts' matches.
fn inline_routes(rc: &Value) -> String {
    let vhosts = rc["virtual_hosts"]
        .as_array()
        .map_or(&[][..], Vec::as_slice);
    if let [vh] = vhosts
        && vh["domains"] == serde_json::json!(["*"])
        && let Some([r]) = vh["routes"].as_array().map(Vec::as_slice)
        && r["match"]["prefix"] == "/"
        && let Some(c) = r["route"]["cluster"].as_str()
    {
        return cluster_destination(c);
    }
    let described: Vec<String> = vhosts
        .iter()
        .map(|vh| {
            let routes: Vec<String> = vh["routes"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|r| route_match(&r["match"]))
                .collect();
            let domains: Vec<String> = vh["domains"]
                .as_array()
                .into_iter()
                .flatten()
                .map(s)
                .collect();
            if domains == ["*"] {
                routes.join(", ")
            } else {
                format!("{} {}", domains.join("/"), routes.join(", "))
            }
        })
        .collect();
    format!("Inline Route: {}", described.join("; "))
}

fn chain_destination(chain: &Value) -> String {
    for f in chain["filters"].as_array().into_iter().flatten() {
        let tc = &f["typed_config"];
        if f["name"] == HCM {
            if tc["route_config"].is_object() {
                return inline_routes(&tc["route_config"]);
            }
            return match tc["rds"]["route_config_name"].as_str() {
                Some(r) if !r.is_empty() => format!("Route: {r}"),
                _ => "HTTP".into(),
            };
        }
        if f["name"] == TCP_PROXY && !tc.to_string().contains(BLACKHOLE) {
            return cluster_destination(tc["cluster"].as_str().unwrap_or(""));
        }
    }
    "Non-HTTP/Non-TCP".into()
}

/// istioctl's listener table: sorted by port, address and type; one row per filter chain.
pub(crate) fn listeners(listeners: &[Value]) -> String {
    let addr = |l: &Value| s(&l["address"]["socket_address"]["address"]);
    let port = |l: &Value| {
        l["address"]["socket_address"]["port_value"]
            .as_u64()
            .unwrap_or(0)
    };
    let mut sorted: Vec<&Value> = listeners.iter().collect();
    sorted.sort_by_key(|l| (port(l), addr(l), listener_type(l)));
    let mut rows = vec![header(&["ADDRESSES", "PORT", "MATCH", "DESTINATION"])];
    for l in sorted {
        let mut matches: Vec<(String, String)> = chains(l)
            .map(|c| (chain_match(&c["filter_chain_match"]), chain_destination(c)))
            .collect();
        matches.sort_by(|a, b| b.1.cmp(&a.1));
        for (m, dest) in matches {
            rows.push(vec![addr(l), port(l).to_string(), m, dest]);
        }
    }
    render(&rows)
}

/// A virtual host's domains as istioctl shortens them: without the `:port` forms and the
/// longer forms of a name also present, at most two and a count.
fn domains(domains: &[String]) -> String {
    match domains {
        [] => return String::new(),
        [one] => return one.clone(),
        _ => {}
    }
    let no_port: Vec<&String> = domains
        .iter()
        .filter(|d| !d.contains(':') || (d.matches(':').count() > 2 && d.ends_with(']')))
        .collect();
    let shown: Vec<&str> = no_port
        .iter()
        .filter(|d| {
            let longer_of = |suffix: &str| {
                d.strip_suffix(suffix)
                    .is_some_and(|short| no_port.iter().any(|o| o.as_str() == short))
            };
            !longer_of(".svc.cluster.local") && !longer_of(".svc")
        })
        .map(|d| d.as_str())
        .collect();
    if shown.len() > 2 {
        format!("{} + {} more...", shown[..2].join(", "), shown.len() - 2)
    } else {
        shown.join(", ")
    }
}

/// istioctl's route table: one row per route (those to `PassthroughCluster` left out), and
/// `404` for a virtual host without routes.
pub(crate) fn routes(routes: &[Value]) -> String {
    let mut sorted: Vec<&Value> = routes.iter().collect();
    // Numbered (outbound port) configurations first, in order; the others as they came.
    sorted.sort_by_key(|r| {
        r["name"]
            .as_str()
            .and_then(|n| n.parse::<u32>().ok())
            .unwrap_or(u32::MAX)
    });
    let mut rows = vec![header(&[
        "NAME",
        "VHOST NAME",
        "DOMAINS",
        "MATCH",
        "VIRTUAL SERVICE",
    ])];
    for r in sorted {
        for vh in r["virtual_hosts"].as_array().into_iter().flatten() {
            let list: Vec<String> = vh["domains"]
                .as_array()
                .into_iter()
                .flatten()
                .map(s)
                .collect();
            let row =
                |m: String, vs: String| vec![s(&r["name"]), s(&vh["name"]), domains(&list), m, vs];
            let routes = vh["routes"].as_array().map_or(&[][..], Vec::as_slice);
            if routes.is_empty() {
                rows.push(row("/*".into(), "404".into()));
            }
            for route in routes {
                if route["route"]["cluster"] == "PassthroughCluster" {
                    continue;
                }
                rows.push(row(
                    route_match(&route["match"]),
                    management(&route["metadata"]),
                ));
            }
        }
    }
    render(&rows)
}

/// istioctl's secret columns, read from the certificates themselves.
pub(crate) fn secrets(secrets: &[Value]) -> String {
    use base64::Engine;
    use x509_parser::prelude::{FromDer, X509Certificate};
    let mut rows = vec![
        [
            "RESOURCE NAME",
            "TYPE",
            "STATUS",
            "VALID CERT",
            "SERIAL NUMBER",
            "NOT AFTER",
            "NOT BEFORE",
        ]
        .map(String::from)
        .to_vec(),
    ];
    for sec in secrets {
        let name = s(&sec["name"]);
        let (kind, pem_b64) = if sec["secret"]["tls_certificate"].is_object() {
            (
                "Cert Chain",
                &sec["secret"]["tls_certificate"]["certificate_chain"]["inline_bytes"],
            )
        } else {
            (
                "CA",
                &sec["secret"]["validation_context"]["trusted_ca"]["inline_bytes"],
            )
        };
        let pem = base64::engine::general_purpose::STANDARD
            .decode(pem_b64.as_str().unwrap_or(""))
            .unwrap_or_default();
        let first = rustls_pki_types::pem::PemObject::pem_slice_iter(&pem)
            .next()
            .and_then(Result::ok);
        let parsed = first
            .as_ref()
            .and_then(|der: &rustls_pki_types::CertificateDer<'static>| {
                X509Certificate::from_der(der).ok().map(|(_, c)| {
                    let valid = c.validity().is_valid();
                    let time = |t: x509_parser::time::ASN1Time| {
                        isthmus_proxy::admin::rfc3339(
                            std::time::UNIX_EPOCH
                                + std::time::Duration::from_secs(t.timestamp().max(0) as u64),
                        )
                    };
                    (
                        valid,
                        c.raw_serial_as_string().replace(':', ""),
                        time(c.validity().not_after),
                        time(c.validity().not_before),
                    )
                })
            });
        let (valid, serial, after, before) =
            parsed.unwrap_or((false, String::new(), String::new(), String::new()));
        rows.push(vec![
            name,
            kind.into(),
            "ACTIVE".into(),
            valid.to_string(),
            serial,
            after,
            before,
        ]);
    }
    render(&rows)
}

/// istioctl's endpoint table. With the proxy's `/clusters?format=json` (`hosts`), the
/// outlier check is the proxy's own; from the control plane's view alone, every endpoint
/// passes it.
pub(crate) fn endpoints(assignments: &[Value], hosts: Option<&Value>) -> String {
    let mut rows = vec![header(&["ENDPOINT", "STATUS", "OUTLIER CHECK", "CLUSTER"])];
    let ejected = |cluster: &str, sa: &Value| {
        hosts
            .and_then(|h| h["cluster_statuses"].as_array())
            .into_iter()
            .flatten()
            .filter(|c| c["name"] == cluster)
            .flat_map(|c| c["host_statuses"].as_array().into_iter().flatten())
            .any(|h| {
                h["address"]["socket_address"] == *sa
                    && h["health_status"]["failed_outlier_check"] == true
            })
    };
    for a in assignments {
        let cluster = s(&a["cluster_name"]);
        for loc in a["endpoints"].as_array().into_iter().flatten() {
            for e in loc["lb_endpoints"].as_array().into_iter().flatten() {
                let sa = &e["endpoint"]["address"]["socket_address"];
                let outlier = if ejected(&cluster, sa) {
                    "FAILED"
                } else {
                    "OK"
                };
                rows.push(vec![
                    format!("{}:{}", s(&sa["address"]), s(&sa["port_value"])),
                    s(&e["health_status"]),
                    outlier.into(),
                    cluster.clone(),
                ]);
            }
        }
    }
    render(&rows)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// The outlier check comes from the proxy's own `/clusters`, matched by cluster and
    /// address; without it every endpoint passes.
    #[test]
    fn the_outlier_check_is_the_proxys_own() {
        let sa = |ip: &str| json!({"address": ip, "port_value": 8080});
        let assignments = [json!({
            "cluster_name": "outbound|8080||server.e2e.svc.cluster.local",
            "endpoints": [{"lb_endpoints": [
                {"endpoint": {"address": {"socket_address": sa("10.0.0.1")}}, "health_status": "HEALTHY"},
                {"endpoint": {"address": {"socket_address": sa("10.0.0.2")}}, "health_status": "HEALTHY"},
            ]}],
        })];
        let hosts = json!({"cluster_statuses": [{
            "name": "outbound|8080||server.e2e.svc.cluster.local",
            "host_statuses": [
                {"address": {"socket_address": sa("10.0.0.1")}, "health_status": {"eds_health_status": "HEALTHY"}},
                {"address": {"socket_address": sa("10.0.0.2")}, "health_status": {"eds_health_status": "HEALTHY", "failed_outlier_check": true}},
            ],
        }]});
        let table = endpoints(&assignments, Some(&hosts));
        let outlier = |ip: &str| {
            table
                .lines()
                .find(|l| l.starts_with(ip))
                .and_then(|l| l.split_whitespace().nth(2))
                .map(str::to_string)
        };
        assert_eq!(outlier("10.0.0.1:8080").as_deref(), Some("OK"), "{table}");
        assert_eq!(
            outlier("10.0.0.2:8080").as_deref(),
            Some("FAILED"),
            "{table}"
        );
        let plain = endpoints(&assignments, None);
        assert!(!plain.contains("FAILED"), "{plain}");
    }

    /// The cells of a table's rows (columns are apart by runs of spaces, cells hold single ones).
    fn cells(table: &str) -> Vec<Vec<String>> {
        table
            .lines()
            .map(|l| {
                l.split("  ")
                    .map(str::trim)
                    .filter(|c| !c.is_empty())
                    .map(String::from)
                    .collect()
            })
            .collect()
    }

    /// The first row of `table` whose first cell is `first`.
    fn row(table: &str, first: &str) -> Vec<String> {
        cells(table)
            .into_iter()
            .find(|cells| cells.first().is_some_and(|c| c == first))
            .unwrap_or_else(|| panic!("no row {first:?} in\n{table}"))
    }

    #[test]
    fn clusters_sort_by_host_and_name_their_destination_rule() {
        let dr = json!({"filter_metadata": {"istio": {"config": "/apis/networking.istio.io/v1alpha3/namespaces/bookinfo/destination-rule/reviews"}}});
        let clusters = [
            json!({"name": "xds-grpc", "type": "STATIC"}),
            json!({"name": "outbound|9080|v1|reviews.bookinfo.svc.cluster.local", "type": "EDS", "metadata": dr}),
            json!({"name": "BlackHoleCluster"}),
            json!({"name": "outbound|9080||reviews.bookinfo.svc.cluster.local", "type": "EDS", "metadata": dr}),
            json!({"name": "inbound|9080||", "type": "ORIGINAL_DST"}),
        ];
        let table = super::clusters(&clusters);
        let firsts: Vec<&str> = table
            .lines()
            .skip(1)
            .map(|l| l.split("  ").next().unwrap().trim())
            .collect();
        // istioctl's order: by host (inbound's is empty), then subset.
        assert_eq!(
            firsts,
            [
                "",
                "BlackHoleCluster",
                "reviews.bookinfo.svc.cluster.local",
                "reviews.bookinfo.svc.cluster.local",
                "xds-grpc"
            ],
            "{table}"
        );
        let lines: Vec<&str> = table.lines().collect();
        assert!(
            lines[3].contains(" - ") && lines[4].contains(" v1 "),
            "{table}"
        );
        assert_eq!(
            row(&table, "reviews.bookinfo.svc.cluster.local")[5],
            "reviews.bookinfo"
        );
        // No type set is Envoy's default, STATIC.
        assert_eq!(row(&table, "BlackHoleCluster")[4], "STATIC");
    }

    #[test]
    fn listeners_read_as_istioctl_describes_them() {
        let hcm = |tc: Value| json!({"name": HCM, "typed_config": tc});
        let tcp = |cluster: &str| json!({"name": TCP_PROXY, "typed_config": {"cluster": cluster}});
        let all = [
            json!({"address": {"socket_address": {"address": "0.0.0.0", "port_value": 15090}},
                   "filter_chains": [{"filters": [hcm(json!({"route_config": {"virtual_hosts": [{"domains": ["*"], "routes": [{"match": {"prefix": "/stats/prometheus"}, "route": {"cluster": "prometheus_stats"}}]}]}}))]}]}),
            json!({"address": {"socket_address": {"address": "0.0.0.0", "port_value": 15006}},
            "filter_chains": [
                {"filter_chain_match": {"transport_protocol": "tls", "application_protocols": ["istio-peer-exchange", "istio"], "destination_port": 7000}, "filters": [tcp("inbound|7000||")]},
                {"filter_chain_match": {"prefix_ranges": [{"address_prefix": "0.0.0.0", "prefix_len": 0}]}, "filters": [tcp("BlackHoleCluster")]},
                {"filter_chain_match": {"destination_port": 8080}, "filters": [hcm(json!({"route_config": {"virtual_hosts": [{"domains": ["*"], "routes": [{"match": {"prefix": "/"}, "route": {"cluster": "inbound|8080||"}}]}]}}))]},
            ]}),
            json!({"address": {"socket_address": {"address": "0.0.0.0", "port_value": 15001}},
                   "filter_chains": [{"filters": [tcp("PassthroughCluster")]}]}),
            json!({"address": {"socket_address": {"address": "0.0.0.0", "port_value": 9080}},
                   "filter_chains": [{"filter_chain_match": {"application_protocols": ["http/1.0", "http/1.1", "h2c"]}, "filters": [hcm(json!({"rds": {"route_config_name": "9080"}}))]}]}),
        ];
        let table = listeners(&all);
        let got: Vec<Vec<String>> = cells(&table).into_iter().skip(1).collect();
        let want = [
            ["0.0.0.0", "9080", "App: HTTP", "Route: 9080"],
            ["0.0.0.0", "15001", "ALL", "PassthroughCluster"],
            ["0.0.0.0", "15006", "Addr: 0.0.0.0/0", "Non-HTTP/Non-TCP"],
            [
                "0.0.0.0",
                "15006",
                "Addr: *:8080",
                "Cluster: inbound|8080||",
            ],
            [
                "0.0.0.0",
                "15006",
                "Trans: tls; App: TCP TLS; Addr: *:7000",
                "Cluster: inbound|7000||",
            ],
            [
                "0.0.0.0",
                "15090",
                "ALL",
                "Inline Route: /stats/prometheus*",
            ],
        ];
        assert_eq!(got, want, "{table}");
    }

    #[test]
    fn routes_show_short_domains_their_virtual_service_and_skip_passthrough() {
        let vs = json!({"filter_metadata": {"istio": {"config": "/apis/networking.istio.io/v1alpha3/namespaces/bookinfo/virtual-service/reviews"}}});
        let routes_in = [json!({"name": "9080", "virtual_hosts": [
            {"name": "reviews.bookinfo.svc.cluster.local:9080",
             "domains": ["reviews.bookinfo.svc.cluster.local", "reviews.bookinfo.svc.cluster.local:9080", "reviews", "reviews:9080", "reviews.bookinfo.svc", "reviews.bookinfo", "10.96.0.7", "10.96.0.7:9080"],
             "routes": [{"match": {"prefix": "/"}, "route": {"cluster": "outbound|9080|v1|reviews.bookinfo.svc.cluster.local"}, "metadata": vs},
                        {"match": {"path": "/exact"}, "route": {"cluster": "outbound|9080|v2|reviews.bookinfo.svc.cluster.local"}, "metadata": vs}]},
            {"name": "allow_any", "domains": ["*"], "routes": [{"match": {"prefix": "/"}, "route": {"cluster": "PassthroughCluster"}}]},
            {"name": "empty", "domains": ["x"]},
        ]})];
        let table = routes(&routes_in);
        let reviews = row(&table, "9080");
        assert_eq!(reviews[1], "reviews.bookinfo.svc.cluster.local:9080");
        assert_eq!(
            reviews[2], "reviews, reviews.bookinfo + 1 more...",
            "{table}"
        );
        assert_eq!(reviews[3], "/*");
        assert_eq!(reviews[4], "reviews.bookinfo");
        assert!(table.contains("/exact"), "{table}");
        assert!(!table.contains("allow_any"), "{table}");
        assert!(
            cells(&table).contains(
                &["9080", "empty", "x", "/*", "404"]
                    .map(String::from)
                    .to_vec()
            ),
            "{table}"
        );
    }
}
