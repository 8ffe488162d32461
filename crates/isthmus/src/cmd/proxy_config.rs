//! `isthmus proxy-config`: a proxy's clusters, listeners, routes, endpoints and secrets in
//! istioctl's tables, from the proxy's admin port (pods of the local runtime) or from the
//! control plane's view of it.

use anyhow::{Context as _, Result};
use clap::{Args, ValueEnum};
use serde_json::Value;

use crate::cmd::config_tables as tables;
use crate::cmd::local::{MeshArgs, find_pod};
use crate::cmd::{http_get_in, http_in};
use crate::exit;
use hyper::Method;

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
    /// The proxy's log level; `--level` or `--reset` changes it.
    Log,
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
    filters: Filters,
    /// `log`: levels to set, as istioctl takes them: `[<logger>:]<level>,…` (`debug` for
    /// every logger, `http:debug,rbac:warning` for two; levels `trace`, `debug`, `info`,
    /// `warning`, `error`, `off`).
    #[arg(long)]
    level: Option<String>,
    /// `log`: back to Istio's default level, `warning`.
    #[arg(short = 'r', long, conflicts_with = "level")]
    reset: bool,
    #[command(flatten)]
    mesh: MeshArgs,
}

/// istioctl's filters: each applies to the sections it names, and keeps what matches all.
#[derive(Debug, Default, Args)]
pub struct Filters {
    /// Clusters whose name contains this host.
    #[arg(long)]
    fqdn: Option<String>,
    /// Clusters of this port, listeners on it, endpoints at it.
    #[arg(long)]
    port: Option<u16>,
    /// Clusters of this subset.
    #[arg(long)]
    subset: Option<String>,
    /// Clusters of this direction (`inbound`, `outbound`).
    #[arg(long)]
    direction: Option<String>,
    /// Listeners on this address, endpoints at it.
    #[arg(long)]
    address: Option<String>,
    /// Listeners of this type (`HTTP`, `TCP`, `HTTP+TCP`).
    #[arg(long = "type")]
    kind: Option<String>,
    /// The route configuration of this name (istioctl's `--name`; ours names the mesh).
    #[arg(long = "route-name")]
    route_name: Option<String>,
    /// Endpoints of this cluster.
    #[arg(long)]
    cluster: Option<String>,
    /// Endpoints of this health status (`HEALTHY`, `UNHEALTHY`, …).
    #[arg(long)]
    status: Option<String>,
}

impl Filters {
    fn cluster(&self, c: &Value) -> bool {
        let name = c["name"].as_str().unwrap_or("");
        let has = |part: &Option<String>| part.as_deref().is_none_or(|p| name.contains(p));
        has(&self.fqdn)
            && has(&self.subset)
            && has(&self.direction)
            && self.port.is_none_or(|p| name.contains(&format!("|{p}|")))
    }

    fn listener(&self, l: &Value) -> bool {
        let sa = &l["address"]["socket_address"];
        let address = sa["address"].as_str().unwrap_or("");
        self.address
            .as_deref()
            .is_none_or(|a| a.eq_ignore_ascii_case(address))
            && self
                .port
                .is_none_or(|p| sa["port_value"].as_u64() == Some(u64::from(p)))
            && self
                .kind
                .as_deref()
                .is_none_or(|t| t.eq_ignore_ascii_case(tables::listener_type(l)))
    }

    fn route(&self, r: &Value) -> bool {
        self.route_name.as_deref().is_none_or(|n| r["name"] == n)
    }

    /// An endpoint assignment with only the endpoints that pass, or none.
    fn endpoints(&self, a: &Value) -> Option<Value> {
        if self
            .cluster
            .as_deref()
            .is_some_and(|c| a["cluster_name"] != c)
        {
            return None;
        }
        let mut a = a.clone();
        for locality in a["endpoints"].as_array_mut().into_iter().flatten() {
            if let Some(list) = locality["lb_endpoints"].as_array_mut() {
                list.retain(|e| {
                    let sa = &e["endpoint"]["address"]["socket_address"];
                    self.address.as_deref().is_none_or(|x| sa["address"] == x)
                        && self
                            .port
                            .is_none_or(|p| sa["port_value"].as_u64() == Some(u64::from(p)))
                        && self.status.as_deref().is_none_or(|st| {
                            e["health_status"]
                                .as_str()
                                .unwrap_or("UNKNOWN")
                                .eq_ignore_ascii_case(st)
                        })
                });
            }
        }
        Some(a)
    }
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

/// The admin requests for `--level`: one for a level of every logger, one for the loggers
/// named (`paths=`), in that order; none to only list them.
fn logging_paths(level: Option<&str>) -> Vec<String> {
    let Some(level) = level else {
        return vec!["/logging".to_string()];
    };
    let (named, all): (Vec<&str>, Vec<&str>) = level
        .split(',')
        .filter(|p| !p.is_empty())
        .partition(|p| p.contains(':'));
    let mut paths: Vec<String> = all.iter().map(|l| format!("/logging?level={l}")).collect();
    if !named.is_empty() {
        paths.push(format!("/logging?paths={}", named.join(",")));
    }
    paths
}

/// `proxy-config log`: the levels in force, or set by `--level`, from the pod's admin port.
fn log(a: &ProxyConfigArgs) -> Result<i32> {
    let level = if a.reset {
        Some("warning")
    } else {
        a.level.as_deref()
    };
    let Some(st) =
        isthmus_local::runtime::read_status(&a.mesh.dir()).filter(|_| a.control_plane.is_none())
    else {
        anyhow::bail!("log levels are read from the admin port of a pod of the local runtime");
    };
    let pod = find_pod(&st, &a.proxy)?;
    let mut body = bytes::Bytes::new();
    for path in logging_paths(level) {
        body = http_in(Some(&pod.netns), Method::POST, "127.0.0.1:15000", &path)
            .with_context(|| format!("the log levels of {}/{}", pod.namespace, pod.name))?;
    }
    print!(
        "{}.{}:\n{}",
        pod.name,
        pod.namespace,
        String::from_utf8_lossy(&body)
    );
    Ok(exit::OK)
}

pub fn run(a: ProxyConfigArgs) -> Result<i32> {
    if a.section == Section::Log {
        return log(&a);
    }
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
    let f = &a.filters;
    let clusters: Vec<Value> = clusters.into_iter().filter(|c| f.cluster(c)).collect();
    let listeners: Vec<Value> = listeners.into_iter().filter(|l| f.listener(l)).collect();
    let routes: Vec<Value> = routes.into_iter().filter(|r| f.route(r)).collect();
    let endpoints: Vec<Value> = endpoints.iter().filter_map(|e| f.endpoints(e)).collect();
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
        // Answered by `log` before the dump is read.
        Section::Log => (Value::Null, String::new()),
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

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn log_levels_become_envoys_logging_requests() {
        assert_eq!(logging_paths(None), ["/logging"]);
        assert_eq!(logging_paths(Some("debug")), ["/logging?level=debug"]);
        assert_eq!(
            logging_paths(Some("info,http:debug,rbac:warning")),
            [
                "/logging?level=info",
                "/logging?paths=http:debug,rbac:warning"
            ]
        );
    }

    #[test]
    fn filters_keep_what_matches_every_flag_given() {
        let f = Filters {
            fqdn: Some("reviews.bookinfo".into()),
            port: Some(9080),
            direction: Some("outbound".into()),
            ..Default::default()
        };
        let keeps = |name: &str| f.cluster(&json!({ "name": name }));
        assert!(keeps("outbound|9080|v1|reviews.bookinfo.svc.cluster.local"));
        assert!(!keeps("outbound|9081||reviews.bookinfo.svc.cluster.local"));
        assert!(!keeps("inbound|9080||"));
        assert!(!keeps("outbound|9080||ratings.bookinfo.svc.cluster.local"));

        let http = json!({
            "address": {"socket_address": {"address": "0.0.0.0", "port_value": 9080}},
            "filter_chains": [{"filters": [{"name": "envoy.filters.network.http_connection_manager"}]}],
        });
        let by_type = |t: &str| Filters {
            kind: Some(t.into()),
            port: Some(9080),
            ..Default::default()
        };
        assert!(by_type("http").listener(&http));
        assert!(!by_type("TCP").listener(&http));

        let ep = |ip: &str, status: &str| json!({"endpoint": {"address": {"socket_address": {"address": ip, "port_value": 8080}}}, "health_status": status});
        let assignment = json!({
            "cluster_name": "outbound|8080||server.e2e.svc.cluster.local",
            "endpoints": [{"lb_endpoints": [ep("10.0.0.1", "HEALTHY"), ep("10.0.0.2", "UNHEALTHY")]}],
        });
        let unhealthy = Filters {
            status: Some("unhealthy".into()),
            ..Default::default()
        };
        let kept = unhealthy.endpoints(&assignment).unwrap();
        assert_eq!(
            kept["endpoints"][0]["lb_endpoints"],
            json!([ep("10.0.0.2", "UNHEALTHY")])
        );
        let other = Filters {
            cluster: Some("inbound|8080||".into()),
            ..Default::default()
        };
        assert!(other.endpoints(&assignment).is_none());
    }
}
