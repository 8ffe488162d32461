//! `isthmus precheck`: the LocalhostListener check of seeds 001–002 on a running mesh. For
//! each meshed pod, the TCP sockets listening in its network namespace (from
//! `/proc/<pid>/net/tcp{,6}`: no exec into the app, no port-forward) are matched against the
//! target ports of the Services that select it; a port bound only on loopback would be
//! unreachable from other pods once inbound traffic goes to the pod IP (Istio ≥ 1.10).

use std::net::{IpAddr, SocketAddr};

use anyhow::{Context as _, Result};
use clap::{Args, ValueEnum};
use isthmus_analyze::Message;
use isthmus_analyze::message::ResourceRef;
use isthmus_config::{Kind, Loader, MeshConfig, Snapshot};
use isthmus_local::runtime::{self, Status};
use isthmus_pilot::context::{InboundMode, PushContext};
use isthmus_pilot::proxy::{NodeMetadata, Proxy};

use crate::cmd::analyze::MessageOut;
use crate::cmd::local::MeshArgs;
use crate::cmd::read_yaml;
use crate::exit;

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Output {
    Log,
    Json,
}

#[derive(Debug, Args)]
pub struct PrecheckArgs {
    #[command(flatten)]
    mesh: MeshArgs,
    #[arg(short = 'o', long, value_enum, default_value_t = Output::Log)]
    output: Output,
}

/// A pod as the check sees it: where it is and what listens in its namespace.
pub struct PodSockets {
    pub name: String,
    pub namespace: String,
    pub ip: IpAddr,
    pub listening: Vec<SocketAddr>,
}

/// The IST0143 findings: ports a Service exposes that listen only on loopback. Ports a Sidecar
/// sends to `127.0.0.1` (its `defaultEndpoint`), and every port in LOCALHOST mode, are fine:
/// there the sidecar forwards to loopback.
pub fn localhost_listeners(ctx: &PushContext, pods: &[PodSockets]) -> Vec<Message> {
    let mut out = Vec::new();
    if ctx.inbound_mode == InboundMode::Localhost {
        return out;
    }
    for pod in pods {
        let Some(workload) = ctx.registry.workload_by_ip(pod.ip) else {
            continue;
        };
        if !workload.sidecar {
            continue;
        }
        let mut ports: Vec<u16> = ctx
            .registry
            .services_for_workload(workload)
            .iter()
            .flat_map(|s| s.ports.iter())
            .filter_map(|p| isthmus_pilot::endpoint::target_port(p, workload))
            .collect();
        let proxy = Proxy::from_node(
            &Proxy::node_id(pod.ip, &pod.name, &pod.namespace, ctx.domain()),
            &NodeMetadata {
                labels: workload.labels.clone(),
                ..Default::default()
            },
        );
        if let Ok(proxy) = &proxy
            && let Some(sidecar) = ctx.sidecar_for(proxy)
        {
            for ing in &sidecar.object.spec.ingress {
                if ing.default_endpoint.starts_with("127.0.0.1:")
                    && let Some(p) = ing.port.as_ref()
                {
                    ports.retain(|x| u32::from(*x) != p.number);
                }
            }
        }
        ports.sort_unstable();
        ports.dedup();
        for port in isthmus_local::sockets::localhost_only(&pod.listening, &ports) {
            let origin = ctx
                .snapshot
                .pods
                .iter()
                .find(|p| p.name() == pod.name && p.namespace() == pod.namespace)
                .map(|p| p.origin.clone())
                .unwrap_or_default();
            out.push(Message::new(
                "LocalhostListener",
                Some(ResourceRef {
                    kind: Kind::Pod.name().to_string(),
                    namespace: pod.namespace.clone(),
                    name: pod.name.clone(),
                    // Running pods are not files: no file:line.
                    origin: isthmus_config::Origin {
                        file: String::new(),
                        ..origin
                    },
                }),
                vec![i64::from(port).into()],
            ));
        }
    }
    out
}

fn sockets_of(st: &Status) -> Vec<PodSockets> {
    st.pods
        .iter()
        .filter(|p| p.sidecar)
        .filter_map(|p| {
            // Any process of the pod sees the pod's network namespace.
            let pid = p.containers.iter().find_map(|c| c.pid)?;
            let listening = match isthmus_local::sockets::listening(&pid.to_string()) {
                Ok(l) => l,
                Err(e) => {
                    eprintln!("warning: pod {}/{}: {e}", p.namespace, p.name);
                    return None;
                }
            };
            Some(PodSockets {
                name: p.name.clone(),
                namespace: p.namespace.clone(),
                ip: p.ip.parse().ok()?,
                listening,
            })
        })
        .collect()
}

pub fn run(a: PrecheckArgs) -> Result<i32> {
    let dir = a.mesh.dir();
    let st = runtime::read_status(&dir).with_context(|| {
        format!(
            "mesh {:?} is not up (no status in {})",
            a.mesh.name,
            dir.display()
        )
    })?;
    let state = runtime::read_state(&dir).unwrap_or_default();
    let loaded = Loader::default().load_paths(&[dir.join("config")]);
    let snapshot: Snapshot = loaded.resources.into_iter().collect();
    let mesh: MeshConfig = match &state.mesh_config {
        Some(p) => read_yaml(p)?,
        None => MeshConfig::default(),
    };
    let ctx = PushContext::new(snapshot, mesh, "cluster.local", state.inbound_passthrough);
    let messages = localhost_listeners(&ctx, &sockets_of(&st));
    match a.output {
        Output::Json => {
            let items: Vec<MessageOut> = messages.iter().map(MessageOut::from).collect();
            println!("{}", serde_json::to_string_pretty(&items)?);
        }
        Output::Log => {
            for m in &messages {
                println!("{m}");
            }
        }
    }
    if messages.is_empty() {
        if a.output == Output::Log {
            println!(
                "✔ No issues found when checking the cluster. Istio is safe to install or upgrade!"
            );
        }
        Ok(exit::OK)
    } else {
        eprintln!(
            "Error: Issues found when checking the cluster. Istio may not be safe to install or upgrade.\nSee https://istio.io/latest/docs/reference/config/analysis for more information about causes and resolutions."
        );
        Ok(exit::FAILURE)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MESH: &str = r#"
apiVersion: v1
kind: Service
metadata: {name: nc, namespace: data}
spec:
  selector: {app: nc}
  ports: [{name: tcp, port: 5000}]
---
apiVersion: v1
kind: Pod
metadata: {name: nc-0, namespace: data, labels: {app: nc, security.istio.io/tlsMode: istio}}
spec: {containers: [{name: nc}, {name: istio-proxy}]}
status: {podIP: 10.200.0.10}
---
apiVersion: v1
kind: Pod
metadata: {name: nc-1, namespace: data, labels: {app: nc, security.istio.io/tlsMode: istio}}
spec: {containers: [{name: nc}, {name: istio-proxy}]}
status: {podIP: 10.200.0.11}
"#;

    const FIX: &str = r#"
---
apiVersion: networking.istio.io/v1
kind: Sidecar
metadata: {name: nc, namespace: data}
spec:
  workloadSelector: {labels: {app: nc}}
  ingress:
  - port: {number: 5000, protocol: TCP, name: tcp}
    defaultEndpoint: 127.0.0.1:5000
"#;

    fn ctx(yaml: &str, passthrough: Option<bool>) -> PushContext {
        let loaded = Loader::default().load_str("mesh.yaml", yaml);
        assert!(!loaded.has_errors(), "{:?}", loaded.diagnostics);
        PushContext::new(
            loaded.resources.into_iter().collect(),
            MeshConfig::default(),
            "cluster.local",
            passthrough,
        )
    }

    fn pods() -> Vec<PodSockets> {
        vec![
            PodSockets {
                name: "nc-0".into(),
                namespace: "data".into(),
                ip: "10.200.0.10".parse().unwrap(),
                // Seed 002: `nc -l 127.0.0.1 5000`, plus the sidecar's own ports.
                listening: vec![
                    "127.0.0.1:5000".parse().unwrap(),
                    "0.0.0.0:15006".parse().unwrap(),
                ],
            },
            PodSockets {
                name: "nc-1".into(),
                namespace: "data".into(),
                ip: "10.200.0.11".parse().unwrap(),
                listening: vec!["0.0.0.0:5000".parse().unwrap()],
            },
        ]
    }

    #[test]
    fn reports_loopback_only_service_ports_as_istio_does() {
        let msgs = localhost_listeners(&ctx(MESH, None), &pods());
        let lines: Vec<String> = msgs.iter().map(ToString::to_string).collect();
        assert_eq!(
            lines,
            vec![
                "Error [IST0143] (Pod data/nc-0) Port 5000 is exposed in a Service but listens on localhost. It will not be exposed to other pods."
            ]
        );
    }

    #[test]
    fn quiet_with_a_sidecar_default_endpoint_or_localhost_mode() {
        assert!(localhost_listeners(&ctx(&format!("{MESH}{FIX}"), None), &pods()).is_empty());
        assert!(localhost_listeners(&ctx(MESH, Some(false)), &pods()).is_empty());
    }
}
