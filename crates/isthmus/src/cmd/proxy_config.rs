//! `isthmus proxy-config`: a proxy's clusters, listeners, routes and endpoints in istioctl's
//! tables, from the control plane's config dump of that proxy.

use anyhow::{Context as _, Result};
use clap::{Args, ValueEnum};
use serde_json::Value;

use crate::cmd::{http_get, render_table as render};
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
    /// The proxy: `<pod>.<namespace>`.
    proxy: String,
    #[arg(short = 'o', long, value_enum, default_value_t = Output::Short)]
    output: Output,
    /// The control plane's monitoring address (Istio's 15014).
    #[arg(
        long = "control-plane",
        default_value = "127.0.0.1:15014",
        env = "ISTHMUS_CONTROL_PLANE"
    )]
    control_plane: String,
}

pub fn run(a: ProxyConfigArgs) -> Result<i32> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the runtime")?;
    let path = format!("/debug/config_dump?proxyID={}", a.proxy);
    let body = runtime.block_on(http_get(&a.control_plane, &path))?;
    let dump: Value = serde_json::from_slice(&body).context("invalid config dump")?;
    let config = |suffix: &str, field: &str| -> Vec<Value> {
        dump["configs"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|c| c["@type"].as_str().is_some_and(|t| t.ends_with(suffix)))
            .and_then(|c| c[field].as_array().cloned())
            .unwrap_or_default()
    };
    let clusters: Vec<Value> = config("ClustersConfigDump", "dynamic_active_clusters")
        .into_iter()
        .map(|c| c["cluster"].clone())
        .collect();
    let listeners: Vec<Value> = config("ListenersConfigDump", "dynamic_listeners")
        .into_iter()
        .map(|l| l["active_state"]["listener"].clone())
        .collect();
    let routes: Vec<Value> = config("RoutesConfigDump", "dynamic_route_configs")
        .into_iter()
        .map(|r| r["route_config"].clone())
        .collect();
    let endpoints: Vec<Value> = config("EndpointsConfigDump", "dynamic_endpoint_configs")
        .into_iter()
        .map(|e| e["endpoint_config"].clone())
        .collect();
    let (json, table) = match a.section {
        Section::Cluster => (Value::Array(clusters.clone()), cluster_table(&clusters)),
        Section::Listener => (Value::Array(listeners.clone()), listener_table(&listeners)),
        Section::Route => (Value::Array(routes.clone()), route_table(&routes)),
        Section::Endpoint => (Value::Array(endpoints.clone()), endpoint_table(&endpoints)),
        Section::All => (
            dump.clone(),
            [
                cluster_table(&clusters),
                listener_table(&listeners),
                route_table(&routes),
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
            let matched = match (
                m["destination_port"].as_u64(),
                m["transport_protocol"].as_str(),
            ) {
                (Some(p), Some(t)) => format!("Port: {p}; Trans: {t}"),
                (Some(p), None) => format!("Port: {p}"),
                _ => "ALL".into(),
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

fn endpoint_table(assignments: &[Value]) -> String {
    let mut rows = vec![
        vec!["ENDPOINT", "STATUS", "OUTLIER CHECK", "CLUSTER"]
            .into_iter()
            .map(String::from)
            .collect::<Vec<_>>(),
    ];
    for a in assignments {
        for loc in a["endpoints"].as_array().into_iter().flatten() {
            for e in loc["lb_endpoints"].as_array().into_iter().flatten() {
                let sa = &e["endpoint"]["address"]["socket_address"];
                rows.push(vec![
                    format!("{}:{}", s(&sa["address"]), s(&sa["port_value"])),
                    s(&e["health_status"]),
                    "OK".into(),
                    s(&a["cluster_name"]),
                ]);
            }
        }
    }
    render(&rows)
}
