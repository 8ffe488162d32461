//! `isthmus proxy-config`: a proxy's clusters, listeners, routes, endpoints and secrets in
//! istioctl's tables, from the proxy's admin port (pods of the local runtime) or from the
//! control plane's view of it.

use anyhow::{Context as _, Result};
use clap::{Args, ValueEnum};
use serde_json::Value;

use crate::cmd::local::{MeshArgs, find_pod};
use crate::cmd::{http_get_in, render_table as render};
use crate::exit;

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Section {
    #[value(alias = "clusters")]
    Cluster,
    #[value(alias = "listeners")]
    Listener,
    #[value(alias = "routes")]
    Route,
    #[value(alias = "endpoints")]
    Endpoint,
    #[value(alias = "secrets")]
    Secret,
    All,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Output {
    Short,
    Json,
}

#[derive(Debug, Args)]
pub struct ProxyConfigArgs {
    /// What to show.
    section: Section,
    /// The proxy: a pod of the local runtime (`name`, `name.namespace`, a unique prefix), or
    /// `<pod>.<namespace>` as the control plane knows it.
    proxy: String,
    #[arg(short = 'o', long, value_enum, default_value_t = Output::Short)]
    output: Output,
    /// Read from this control plane's monitoring address (Istio's 15014) instead of the proxy.
    #[arg(long = "control-plane", env = "ISTHMUS_CONTROL_PLANE")]
    control_plane: Option<String>,
    #[command(flatten)]
    mesh: MeshArgs,
}

/// A proxy's config dump: from its admin port when it is a pod of the local runtime, else
/// what the control plane computes for it.
pub(crate) fn dump_of(
    proxy: &str,
    control_plane: Option<&str>,
    mesh: &MeshArgs,
) -> Result<(Value, String)> {
    if let Some((body, name)) = pod_admin(proxy, control_plane, mesh, "/config_dump")? {
        let dump = serde_json::from_slice(&body).context("invalid config dump")?;
        return Ok((dump, name));
    }
    let addr = control_plane.unwrap_or("127.0.0.1:15014");
    let body = http_get_in(None, addr, &format!("/debug/config_dump?proxyID={proxy}"))?;
    Ok((
        serde_json::from_slice(&body).context("invalid config dump")?,
        proxy.to_string(),
    ))
}

/// `path` from the admin port of `proxy` when it is a pod of the local runtime (and no
/// control plane was named), with the pod's `name.namespace`; None otherwise.
fn pod_admin(
    proxy: &str,
    control_plane: Option<&str>,
    mesh: &MeshArgs,
    path: &str,
) -> Result<Option<(bytes::Bytes, String)>> {
    if control_plane.is_some() {
        return Ok(None);
    }
    let Some(st) = isthmus_local::runtime::read_status(&mesh.dir()) else {
        return Ok(None);
    };
    let pod = find_pod(&st, proxy)?;
    let body = http_get_in(Some(&pod.netns), "127.0.0.1:15000", path)
        .with_context(|| format!("reading the admin port of {}/{}", pod.namespace, pod.name))?;
    Ok(Some((body, format!("{}.{}", pod.name, pod.namespace))))
}

/// The items of one section of a dump (`ClustersConfigDump`, `dynamic_active_clusters`), each
/// unwrapped from its `field` (`cluster`).
pub(crate) fn items(dump: &Value, suffix: &str, list: &str, field: &[&str]) -> Vec<Value> {
    dump["configs"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|c| c["@type"].as_str().is_some_and(|t| t.ends_with(suffix)))
        .and_then(|c| c[list].as_array().cloned())
        .unwrap_or_default()
        .into_iter()
        .map(|mut v| {
            for f in field {
                v = v[*f].clone();
            }
            v
        })
        .collect()
}

pub fn run(a: ProxyConfigArgs) -> Result<i32> {
    let (dump, _) = dump_of(&a.proxy, a.control_plane.as_deref(), &a.mesh)?;
    let clusters = items(
        &dump,
        "ClustersConfigDump",
        "dynamic_active_clusters",
        &["cluster"],
    );
    let listeners = items(
        &dump,
        "ListenersConfigDump",
        "dynamic_listeners",
        &["active_state", "listener"],
    );
    let routes = items(
        &dump,
        "RoutesConfigDump",
        "dynamic_route_configs",
        &["route_config"],
    );
    let endpoints = items(
        &dump,
        "EndpointsConfigDump",
        "dynamic_endpoint_configs",
        &["endpoint_config"],
    );
    let secrets = items(&dump, "SecretsConfigDump", "dynamic_active_secrets", &[]);
    let (json, table) = match a.section {
        Section::Cluster => (Value::Array(clusters.clone()), cluster_table(&clusters)),
        Section::Listener => (Value::Array(listeners.clone()), listener_table(&listeners)),
        Section::Route => (Value::Array(routes.clone()), route_table(&routes)),
        Section::Endpoint => {
            // The proxy's own view of its endpoints' health, as istioctl reads it; the
            // control plane has none.
            let hosts = pod_admin(
                &a.proxy,
                a.control_plane.as_deref(),
                &a.mesh,
                "/clusters?format=json",
            )?
            .map(|(body, _)| serde_json::from_slice(&body))
            .transpose()
            .context("invalid /clusters?format=json")?;
            (
                Value::Array(endpoints.clone()),
                endpoint_table(&endpoints, hosts.as_ref()),
            )
        }
        Section::Secret => (Value::Array(secrets.clone()), secret_table(&secrets)),
        Section::All => (
            dump.clone(),
            [
                cluster_table(&clusters),
                listener_table(&listeners),
                route_table(&routes),
                secret_table(&secrets),
            ]
            .join("\n"),
        ),
    };
    match a.output {
        Output::Json => println!("{}", serde_json::to_string_pretty(&json)?),
        Output::Short => print!("{table}"),
    }
    Ok(exit::OK)
}

/// istioctl's secret columns, read from the certificates themselves.
fn secret_table(secrets: &[Value]) -> String {
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

fn s(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Null => String::new(),
        other => other.to_string(),
    }
}

/// istioctl's cluster columns.
fn cluster_table(clusters: &[Value]) -> String {
    let mut rows = vec![
        vec![
            "SERVICE FQDN",
            "PORT",
            "SUBSET",
            "DIRECTION",
            "TYPE",
            "DESTINATION RULE",
        ]
        .into_iter()
        .map(String::from)
        .collect::<Vec<_>>(),
    ];
    for c in clusters {
        let name = s(&c["name"]);
        let kind = if c["type"].is_null() {
            "EDS".to_string()
        } else {
            s(&c["type"])
        };
        let parts: Vec<&str> = name.split('|').collect();
        let row = match parts.as_slice() {
            [dir @ ("outbound" | "inbound"), port, subset, host] => vec![
                host.to_string(),
                port.to_string(),
                if subset.is_empty() {
                    "-".into()
                } else {
                    subset.to_string()
                },
                dir.to_string(),
                kind,
                String::new(),
            ],
            _ => vec![
                name,
                "-".into(),
                "-".into(),
                "-".into(),
                kind,
                String::new(),
            ],
        };
        rows.push(row);
    }
    render(&rows)
}

fn listener_table(listeners: &[Value]) -> String {
    let mut rows = vec![
        vec!["ADDRESSES", "PORT", "MATCH", "DESTINATION"]
            .into_iter()
            .map(String::from)
            .collect::<Vec<_>>(),
    ];
    for l in listeners {
        let addr = &l["address"]["socket_address"];
        for chain in l["filter_chains"].as_array().into_iter().flatten() {
            let m = &chain["filter_chain_match"];
            let mut parts = Vec::new();
            if let Some(p) = m["destination_port"].as_u64() {
                parts.push(format!("Port: {p}"));
            }
            if let Some(t) = m["transport_protocol"].as_str() {
                parts.push(format!("Trans: {t}"));
            }
            if let Some(a) = m["application_protocols"].as_array() {
                let a: Vec<String> = a.iter().map(s).collect();
                parts.push(format!("App: {}", a.join(",")));
            }
            let matched = if parts.is_empty() {
                "ALL".to_string()
            } else {
                parts.join("; ")
            };
            let filter = &chain["filters"][0]["typed_config"];
            let dest = if let Some(c) = filter["cluster"].as_str() {
                format!("Cluster: {c}")
            } else if let Some(r) = filter["rds"]["route_config_name"].as_str() {
                format!("Route: {r}")
            } else if let Some(r) = filter["route_config"]["name"].as_str() {
                format!("Inline Route: {r}")
            } else {
                String::new()
            };
            rows.push(vec![
                s(&addr["address"]),
                s(&addr["port_value"]),
                matched,
                dest,
            ]);
        }
    }
    render(&rows)
}

fn route_table(routes: &[Value]) -> String {
    let mut rows = vec![
        vec!["NAME", "VHOST NAME", "DOMAINS", "MATCH", "VIRTUAL SERVICE"]
            .into_iter()
            .map(String::from)
            .collect::<Vec<_>>(),
    ];
    for r in routes {
        for vh in r["virtual_hosts"].as_array().into_iter().flatten() {
            let domains = vh["domains"].as_array().map_or(0, Vec::len);
            let first = s(&vh["domains"][0]);
            let shown = if domains > 1 {
                format!("{first} + {} more...", domains - 1)
            } else {
                first
            };
            for route in vh["routes"].as_array().into_iter().flatten() {
                let m = &route["match"];
                let matched = ["prefix", "path", "safe_regex"]
                    .iter()
                    .find_map(|k| {
                        m.get(*k).map(|v| {
                            if *k == "safe_regex" {
                                s(&v["regex"])
                            } else {
                                s(v)
                            }
                        })
                    })
                    .unwrap_or_default();
                rows.push(vec![
                    s(&r["name"]),
                    s(&vh["name"]),
                    shown.clone(),
                    matched,
                    String::new(),
                ]);
            }
        }
    }
    render(&rows)
}

/// istioctl's endpoint table. With the proxy's `/clusters?format=json` (`hosts`), the
/// outlier check is the proxy's own; from the control plane's view alone, every endpoint
/// passes it.
fn endpoint_table(assignments: &[Value], hosts: Option<&Value>) -> String {
    let mut rows = vec![
        vec!["ENDPOINT", "STATUS", "OUTLIER CHECK", "CLUSTER"]
            .into_iter()
            .map(String::from)
            .collect::<Vec<_>>(),
    ];
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
        let table = endpoint_table(&assignments, Some(&hosts));
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
        let plain = endpoint_table(&assignments, None);
        assert!(!plain.contains("FAILED"), "{plain}");
    }
}
