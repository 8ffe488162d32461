//! `isthmus proxy-status`: istioctl's sync table, from the control plane's `/debug/syncz`.

use anyhow::{Context as _, Result, bail};
use clap::Args;
use serde_json::Value;

use crate::cmd::{http_get, render_table};
use crate::exit;

#[derive(Debug, Args)]
pub struct ProxyStatusArgs {
    /// Show only this proxy (`<pod>.<namespace>`), with its NACKs in full.
    proxy: Option<String>,
    /// The control plane's monitoring address (Istio's 15014).
    #[arg(
        long = "control-plane",
        default_value = "127.0.0.1:15014",
        env = "ISTHMUS_CONTROL_PLANE"
    )]
    control_plane: String,
}

pub fn run(a: ProxyStatusArgs) -> Result<i32> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the runtime")?;
    let body = runtime.block_on(http_get(&a.control_plane, "/debug/syncz"))?;
    let proxies: Vec<Value> =
        serde_json::from_slice(&body).context("control plane answered with invalid JSON")?;
    let rows: Vec<&Value> = proxies
        .iter()
        .filter(|p| a.proxy.as_deref().is_none_or(|want| pod_name(p) == want))
        .collect();
    if let Some(want) = &a.proxy
        && rows.is_empty()
    {
        bail!("proxy {want:?} is not connected to the control plane");
    }
    print!("{}", table(&rows));
    for p in rows.iter().filter(|_| a.proxy.is_some()) {
        if let Some(nacks) = p["nacks"].as_object() {
            for (t, msg) in nacks {
                println!("{t} rejected: {}", msg.as_str().unwrap_or(""));
            }
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
            "Kubernetes".into(),
            status(p, "CDS", "cluster"),
            status(p, "LDS", "listener"),
            status(p, "EDS", "endpoint"),
            status(p, "RDS", "route"),
            "IGNORED".into(),
            "isthmus".into(),
            env!("CARGO_PKG_VERSION").into(),
        ]);
    }
    render_table(&lines)
}
