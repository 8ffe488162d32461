//! `isthmus proxy-status`: istioctl's sync table, from the control plane's `/debug/syncz`;
//! for one proxy, also whether what it runs matches what the control plane computes for it.

use anyhow::{Context as _, Result, bail};
use clap::Args;
use serde_json::Value;

use crate::cmd::local::{MeshArgs, find_pod};
use crate::cmd::proxy_config::{dump_of, items};
use crate::cmd::{http_get_in, render_table};
use crate::exit;

#[derive(Debug, Args)]
pub struct ProxyStatusArgs {
    /// Show only this proxy (`<pod>.<namespace>`), with its NACKs in full.
    proxy: Option<String>,
    /// The control plane's monitoring address (Istio's 15014); by default the local runtime's
    /// when one is up, else 127.0.0.1:15014.
    #[arg(long = "control-plane", env = "ISTHMUS_CONTROL_PLANE")]
    control_plane: Option<String>,
    #[command(flatten)]
    mesh: MeshArgs,
}

pub fn run(a: ProxyStatusArgs) -> Result<i32> {
    let local =
        isthmus_local::runtime::read_status(&a.mesh.dir()).filter(|_| a.control_plane.is_none());
    let (netns, addr) = match (&local, &a.control_plane) {
        (Some(st), _) => (
            Some(st.node_netns.as_str()),
            format!("{}:15014", isthmus_local::plan::GATEWAY),
        ),
        (None, Some(cp)) => (None, cp.clone()),
        (None, None) => (None, "127.0.0.1:15014".to_string()),
    };
    let body = http_get_in(netns, &addr, "/debug/syncz")?;
    let proxies: Vec<Value> =
        serde_json::from_slice(&body).context("control plane answered with invalid JSON")?;
    // A local pod may be named loosely; the control plane knows it as `<pod>.<namespace>`.
    let want = match (&a.proxy, &local) {
        (Some(p), Some(st)) => {
            let pod = find_pod(st, p)?;
            Some(format!("{}.{}", pod.name, pod.namespace))
        }
        (p, _) => p.clone(),
    };
    let rows: Vec<&Value> = proxies
        .iter()
        .filter(|p| want.as_deref().is_none_or(|w| pod_name(p) == w))
        .collect();
    if let Some(want) = &want
        && rows.is_empty()
    {
        bail!("proxy {want:?} is not connected to the control plane");
    }
    print!("{}", table(&rows));
    for p in rows.iter().filter(|_| want.is_some()) {
        if let Some(nacks) = p["nacks"].as_object() {
            for (t, msg) in nacks {
                println!("{t} rejected: {}", msg.as_str().unwrap_or(""));
            }
        }
    }
    // One local proxy: compare what it runs with what the control plane computes for it.
    if let (Some(w), Some(_)) = (&want, &local) {
        let (running, _) = dump_of(w, None, &a.mesh)?;
        let computed: Value = serde_json::from_slice(&http_get_in(
            netns,
            &addr,
            &format!("/debug/config_dump?proxyID={w}"),
        )?)
        .context("invalid config dump")?;
        let mut all = true;
        for (label, suffix, list, field) in [
            (
                "Clusters",
                "ClustersConfigDump",
                "dynamic_active_clusters",
                &["cluster"][..],
            ),
            (
                "Listeners",
                "ListenersConfigDump",
                "dynamic_listeners",
                &["active_state", "listener"][..],
            ),
            (
                "Routes",
                "RoutesConfigDump",
                "dynamic_route_configs",
                &["route_config"][..],
            ),
        ] {
            let by_name = |d: &Value| -> std::collections::BTreeMap<String, Value> {
                items(d, suffix, list, field)
                    .into_iter()
                    .map(|v| (v["name"].as_str().unwrap_or("").to_string(), v))
                    .collect()
            };
            let (a_map, b_map) = (by_name(&running), by_name(&computed));
            if a_map == b_map {
                println!("{label} Match");
            } else {
                all = false;
                println!("{label} Don't Match");
                for (name, v) in &b_map {
                    match a_map.get(name) {
                        None => println!("  - {name}: computed, not running"),
                        Some(r) if r != v => println!("  ~ {name}: differs"),
                        _ => {}
                    }
                }
                for name in a_map.keys().filter(|n| !b_map.contains_key(*n)) {
                    println!("  + {name}: running, no longer computed");
                }
            }
        }
        if !all {
            return Ok(exit::FAILURE);
        }
    }
    Ok(exit::OK)
}

/// `<pod>.<namespace>` from the node id.
fn pod_name(p: &Value) -> &str {
    let id = p["proxy"].as_str().unwrap_or("");
    id.split('~').nth(2).unwrap_or(id)
}

/// istioctl's columns and states: SYNCED, NOT SENT, STALE (with the NACK when there is one).
fn table(rows: &[&Value]) -> String {
    let status = |p: &Value, short: &str, kind: &str| {
        let sent = p[format!("{kind}_sent")].as_str().unwrap_or("");
        let acked = p[format!("{kind}_acked")].as_str().unwrap_or("");
        if let Some(nack) = p["nacks"][short].as_str() {
            let first = nack.lines().next().unwrap_or("");
            format!("STALE (NACK: {first})")
        } else if sent.is_empty() {
            "NOT SENT".to_string()
        } else if sent == acked {
            "SYNCED".to_string()
        } else {
            "STALE".to_string()
        }
    };
    let mut lines = vec![
        [
            "NAME", "CLUSTER", "CDS", "LDS", "EDS", "RDS", "ECDS", "ISTIOD", "VERSION",
        ]
        .map(String::from)
        .to_vec(),
    ];
    for p in rows {
        lines.push(vec![
            pod_name(p).to_string(),
            p["cluster_id"].as_str().unwrap_or("").to_string(),
            status(p, "CDS", "cluster"),
            status(p, "LDS", "listener"),
            status(p, "EDS", "endpoint"),
            status(p, "RDS", "route"),
            "IGNORED".into(),
            "isthmus".into(),
            // The proxy's own version, as its node reported it.
            p["istio_version"].as_str().unwrap_or("").to_string(),
        ]);
    }
    render_table(&lines)
}
