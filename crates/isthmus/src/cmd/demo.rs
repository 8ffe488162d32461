//! `isthmus demo`: the whole mesh in one command — bring an example up on this machine, send
//! traffic from inside a meshed pod to every HTTP service (and every header-matched route of
//! its VirtualServices), show who answered and with which identity, then tear it all down.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context as _, Result, bail};
use clap::Args;
use isthmus_config::{Loader, Snapshot};
use isthmus_local::runtime::{PodStatus, Status};

use crate::cmd::local::{MeshArgs, UpArgs, start_detached, status_table};
use crate::cmd::render_table;
use crate::exit;

#[derive(Debug, Args)]
pub struct DemoArgs {
    /// The example to run.
    #[arg(default_value = "examples/bookinfo")]
    path: PathBuf,
    /// Requests per row.
    #[arg(long, default_value_t = 10)]
    count: u32,
    /// Leave the mesh running afterwards (`isthmus down --name demo` removes it).
    #[arg(long)]
    keep: bool,
    #[arg(long, default_value = "demo")]
    name: String,
}

/// Tears the mesh down however the demo ends.
struct Down(MeshArgs, bool);

impl Drop for Down {
    fn drop(&mut self) {
        if !self.1 {
            eprintln!("tearing the mesh down");
            let _ = crate::cmd::local::down(MeshArgs {
                name: self.0.name.clone(),
                state_dir: self.0.state_dir.clone(),
            });
        }
    }
}

/// One line of traffic to show.
struct Probe {
    url: String,
    header: Option<(String, String)>,
    what: String,
    /// Sent from this pod (name prefix) instead of the default client.
    from: Option<String>,
}

fn probes(snapshot: &Snapshot) -> Vec<Probe> {
    let mut out = Vec::new();
    for s in &snapshot.services {
        let ns = if s.namespace().is_empty() {
            "default"
        } else {
            s.namespace()
        };
        let Some(port) = s
            .object
            .spec
            .as_ref()
            .and_then(|sp| sp.ports.as_ref())
            .and_then(|ports| {
                ports.iter().find(|p| {
                    let name = p.name.as_deref().unwrap_or("");
                    let app = p.app_protocol.as_deref().unwrap_or("");
                    name.starts_with("http") || app.starts_with("http")
                })
            })
        else {
            continue;
        };
        let url = format!("http://{}.{ns}:{}/", s.name(), port.port);
        out.push(Probe {
            url: url.clone(),
            header: None,
            what: format!("GET {}:{}", s.name(), port.port),
            from: None,
        });
        // From the workloads an ALLOW policy names, to show it letting them in.
        for ap in snapshot
            .authorization_policies
            .iter()
            .filter(|p| p.namespace() == s.namespace() && p.object.spec.action() == "ALLOW")
        {
            let selects = ap.object.spec.selector.as_ref().is_some_and(|sel| {
                let svc_sel = s
                    .object
                    .spec
                    .as_ref()
                    .and_then(|sp| sp.selector.clone())
                    .unwrap_or_default();
                !sel.match_labels.is_empty()
                    && sel
                        .match_labels
                        .iter()
                        .all(|(k, v)| svc_sel.get(k) == Some(v))
            });
            if !selects {
                continue;
            }
            for principal in ap
                .object
                .spec
                .rules
                .iter()
                .flat_map(|r| r.from.iter())
                .filter_map(|f| f.source.as_ref())
                .flat_map(|src| src.principals.iter())
            {
                let Some(sa) = principal.rsplit_once("/sa/").map(|(_, sa)| sa) else {
                    continue;
                };
                if let Some(d) = snapshot.deployments.iter().find(|d| {
                    d.namespace() == s.namespace()
                        && d.object
                            .spec
                            .as_ref()
                            .and_then(|sp| sp.template.spec.as_ref())
                            .and_then(|p| p.service_account_name.as_deref())
                            == Some(sa)
                }) {
                    out.push(Probe {
                        url: url.clone(),
                        header: None,
                        what: format!("GET {}:{} from {}", s.name(), port.port, d.name()),
                        from: Some(d.name().to_string()),
                    });
                }
            }
        }
        // Each header-matched route of a VirtualService for this service.
        for vs in snapshot
            .virtual_services
            .iter()
            .filter(|v| v.namespace() == s.namespace())
            .filter(|v| v.object.spec.hosts.iter().any(|h| h == s.name()))
        {
            for route in &vs.object.spec.http {
                for m in &route.matches {
                    for (name, sm) in &m.headers {
                        if let Some(value) = &sm.exact {
                            out.push(Probe {
                                url: url.clone(),
                                header: Some((name.clone(), value.clone())),
                                what: format!("GET {}:{} {name}: {value}", s.name(), port.port),
                                from: None,
                            });
                        }
                    }
                }
            }
        }
    }
    out
}

/// The pod traffic starts from: bookinfo's front end, else the first meshed pod.
fn client(st: &Status) -> Option<&PodStatus> {
    st.pods
        .iter()
        .find(|p| p.sidecar && p.name.starts_with("productpage"))
        .or_else(|| st.pods.iter().find(|p| p.sidecar))
}

pub fn run(a: DemoArgs) -> Result<i32> {
    crate::cmd::require_root_and_tools()?;
    let loaded = Loader {
        default_namespace: Some("default".into()),
    }
    .load_paths(&[&a.path]);
    if loaded.has_errors() {
        for d in loaded.errors() {
            eprintln!("{d}");
        }
        bail!("{} has errors", a.path.display());
    }
    let snapshot: Snapshot = loaded.resources.into_iter().collect();
    let mesh = MeshArgs {
        name: a.name.clone(),
        state_dir: None,
    };
    let started = Instant::now();
    println!("isthmus demo: running {} on this machine", a.path.display());
    let up = UpArgs {
        paths: vec![a.path.clone()],
        mesh: MeshArgs {
            name: a.name.clone(),
            state_dir: None,
        },
        mesh_config: None,
        inbound_passthrough: None,
        foreground: false,
    };
    let _down = Down(mesh, a.keep);
    let st = start_detached(&up, true)?;
    println!(
        "\nmesh up in {:.1} s: control plane at {}, {} pods (network namespaces), sidecars injected\n",
        started.elapsed().as_secs_f64(),
        st.control_plane,
        st.pods.len()
    );
    print!("{}", status_table(&st));
    let from = client(&st).context("no meshed pod to send traffic from")?;
    println!(
        "\ntraffic from {}/{} through its sidecar ({} requests per row):\n",
        from.namespace, from.name, a.count
    );
    let exe = std::env::current_exe().context("locating the isthmus binary")?;
    let mut rows = vec![vec![
        "REQUEST".to_string(),
        "STATUS".into(),
        "ANSWERED BY".into(),
        "CALLER IDENTITY SEEN BY THE SERVER".into(),
        "MTLS".into(),
    ]];
    let mut all_ok = true;
    for p in probes(&snapshot) {
        let source = p
            .from
            .as_deref()
            .and_then(|prefix| st.pods.iter().find(|pod| pod.name.starts_with(prefix)))
            .unwrap_or(from);
        let mut cmd = std::process::Command::new("ip");
        cmd.args(["netns", "exec", &source.netns]).arg(&exe).args([
            "echo",
            "client",
            &p.url,
            "--count",
            &a.count.to_string(),
        ]);
        if let Some((k, v)) = &p.header {
            cmd.arg("-H").arg(format!("{k}: {v}"));
        }
        let out = cmd.output().context("running the echo client")?;
        let text = String::from_utf8_lossy(&out.stdout);
        let mut statuses: BTreeMap<String, u32> = BTreeMap::new();
        let mut answered: BTreeMap<String, u32> = BTreeMap::new();
        let mut identities: BTreeMap<String, u32> = BTreeMap::new();
        for line in text.lines() {
            if let Some(code) = line.split("StatusCode=").nth(1) {
                let code = code.split_whitespace().next().unwrap_or("").to_string();
                *statuses.entry(code).or_default() += 1;
            }
            if let Some(h) = line.split("Hostname=").nth(1) {
                *answered.entry(h.trim().to_string()).or_default() += 1;
            }
            if let Some(id) = line.split("Identity=").nth(1) {
                *identities.entry(id.trim().to_string()).or_default() += 1;
            }
        }
        // 403 is an AuthorizationPolicy at work; no answer or a 5xx is a failure.
        all_ok &= !statuses.is_empty() && statuses.keys().all(|c| c == "200" || c == "403");
        if statuses.contains_key("403") && !text.contains("RBAC: access denied") {
            all_ok = false;
        }
        let join = |m: &BTreeMap<String, u32>| {
            m.iter()
                .map(|(k, n)| format!("{k} ×{n}"))
                .collect::<Vec<_>>()
                .join(", ")
        };
        let mut status = if statuses.is_empty() {
            "no answer".into()
        } else {
            join(&statuses)
        };
        if statuses.contains_key("403") {
            status.push_str(" (denied by AuthorizationPolicy)");
        }
        rows.push(vec![
            p.what,
            status,
            join(&answered),
            identities.keys().cloned().collect::<Vec<_>>().join(", "),
            // A denial never reaches the app, which is what reports the identity.
            match (identities.is_empty(), statuses.contains_key("403")) {
                (false, _) => "yes",
                (true, true) => "-",
                (true, false) => "no",
            }
            .into(),
        ]);
    }
    print!("{}", render_table(&rows));
    println!(
        "\nRoutes follow the VirtualServices, every hop is mutual TLS with SPIFFE identities, the \
         server sees the caller's identity in x-forwarded-client-cert, and AuthorizationPolicies \
         decide on that identity."
    );
    Ok(if all_ok { exit::OK } else { exit::FAILURE })
}
