//! `isthmus proxy-config`: a proxy's clusters, listeners, routes, endpoints and secrets in
//! istioctl's tables, from the proxy's admin port (pods of the local runtime) or from the
//! control plane's view of it.

use anyhow::{Context as _, Result};
use clap::{Args, ValueEnum};
use serde_json::Value;

use crate::cmd::config_tables as tables;
use crate::cmd::http_get_in;
use crate::cmd::local::{MeshArgs, find_pod};
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
    Bootstrap,
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

/// The dynamic and then the static items of one section of a dump.
fn both(dump: &Value, suffix: &str, dynamic: &str, field: &[&str], fixed: &str) -> Vec<Value> {
    let mut all = items(dump, suffix, dynamic, field);
    all.extend(items(dump, suffix, fixed, &field[field.len() - 1..]));
    all
}

pub fn run(a: ProxyConfigArgs) -> Result<i32> {
    let (dump, _) = dump_of(&a.proxy, a.control_plane.as_deref(), &a.mesh)?;
    let clusters = both(
        &dump,
        "ClustersConfigDump",
        "dynamic_active_clusters",
        &["cluster"],
        "static_clusters",
    );
    let listeners = both(
        &dump,
        "ListenersConfigDump",
        "dynamic_listeners",
        &["active_state", "listener"],
        "static_listeners",
    );
    let routes = both(
        &dump,
        "RoutesConfigDump",
        "dynamic_route_configs",
        &["route_config"],
        "static_route_configs",
    );
    let endpoints = items(
        &dump,
        "EndpointsConfigDump",
        "dynamic_endpoint_configs",
        &["endpoint_config"],
    );
    let secrets = items(&dump, "SecretsConfigDump", "dynamic_active_secrets", &[]);
    let (json, table) = match a.section {
        Section::Cluster => (Value::Array(clusters.clone()), tables::clusters(&clusters)),
        Section::Listener => (
            Value::Array(listeners.clone()),
            tables::listeners(&listeners),
        ),
        Section::Route => (Value::Array(routes.clone()), tables::routes(&routes)),
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
                tables::endpoints(&endpoints, hosts.as_ref()),
            )
        }
        Section::Secret => (Value::Array(secrets.clone()), tables::secrets(&secrets)),
        Section::Bootstrap => {
            let bootstrap = dump["configs"]
                .as_array()
                .into_iter()
                .flatten()
                .find(|c| {
                    c["@type"]
                        .as_str()
                        .is_some_and(|t| t.ends_with("BootstrapConfigDump"))
                })
                .cloned()
                .context("the config dump has no bootstrap: only a proxy has one")?;
            // istioctl prints the bootstrap as JSON whatever the format.
            let text = serde_json::to_string_pretty(&bootstrap)? + "\n";
            (bootstrap, text)
        }
        Section::All => (
            dump.clone(),
            [
                tables::clusters(&clusters),
                tables::listeners(&listeners),
                tables::routes(&routes),
                tables::secrets(&secrets),
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
