//! The runtime's network: a namespace of its own holding a bridge (the pods' gateway), and a
//! namespace per pod joined to it by a veth pair created inside those namespaces — the host's
//! interfaces, routes and rules are never touched. Service IPs exist only as DNAT rules inside
//! pod namespaces (kube-proxy's job for pods without a sidecar).

use std::process::{Command, Stdio};

use crate::plan::{GATEWAY, Plan, PodPlan};

#[derive(Debug, thiserror::Error)]
#[error("{command}: {message}")]
pub struct NetError {
    pub command: String,
    pub message: String,
}

/// Runs a command, failing with its stderr.
pub fn run(args: &[&str]) -> Result<String, NetError> {
    run_input(args, None)
}

pub fn run_input(args: &[&str], input: Option<&str>) -> Result<String, NetError> {
    use std::io::Write;
    let err = |message: String| NetError {
        command: args.join(" "),
        message,
    };
    let mut child = Command::new(args[0])
        .args(&args[1..])
        .stdin(if input.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| err(e.to_string()))?;
    if let (Some(text), Some(mut stdin)) = (input, child.stdin.take()) {
        stdin
            .write_all(text.as_bytes())
            .map_err(|e| err(e.to_string()))?;
    }
    let out = child.wait_with_output().map_err(|e| err(e.to_string()))?;
    if !out.status.success() {
        return Err(err(String::from_utf8_lossy(&out.stderr).trim().to_string()));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Names of one mesh's namespaces and links; `id` keeps parallel meshes apart.
#[derive(Debug, Clone)]
pub struct Names {
    pub id: String,
}

impl Names {
    pub fn node(&self) -> String {
        format!("isthmus-{}-node", self.id)
    }

    pub fn pod(&self, pod: &PodPlan) -> String {
        format!("isthmus-{}-{}-{}", self.id, pod.namespace, pod.name)
    }

    /// The bridge side of pod `index`'s veth (interface names are at most 15 bytes).
    fn veth(&self, index: usize) -> String {
        format!("v{}{index}", &self.id[..self.id.len().min(6)])
    }
}

pub fn create_node(names: &Names) -> Result<(), NetError> {
    let ns = names.node();
    run(&["ip", "netns", "add", &ns])?;
    run(&["ip", "-n", &ns, "link", "set", "lo", "up"])?;
    run(&["ip", "-n", &ns, "link", "add", "br0", "type", "bridge"])?;
    run(&[
        "ip",
        "-n",
        &ns,
        "addr",
        "add",
        &format!("{GATEWAY}/16"),
        "dev",
        "br0",
    ])?;
    run(&["ip", "-n", &ns, "link", "set", "br0", "up"])?;
    Ok(())
}

pub fn create_pod(names: &Names, pod: &PodPlan, index: usize) -> Result<String, NetError> {
    let node = names.node();
    let ns = names.pod(pod);
    let veth = names.veth(index);
    run(&["ip", "netns", "add", &ns])?;
    run(&["ip", "-n", &ns, "link", "set", "lo", "up"])?;
    // Both ends are born in our namespaces: the host never sees them.
    run(&[
        "ip", "-n", &node, "link", "add", &veth, "type", "veth", "peer", "name", "eth0", "netns",
        &ns,
    ])?;
    run(&[
        "ip", "-n", &node, "link", "set", &veth, "master", "br0", "up",
    ])?;
    run(&[
        "ip",
        "-n",
        &ns,
        "addr",
        "add",
        &format!("{}/16", pod.ip),
        "dev",
        "eth0",
    ])?;
    run(&["ip", "-n", &ns, "link", "set", "eth0", "up"])?;
    run(&[
        "ip",
        "-n",
        &ns,
        "route",
        "add",
        "default",
        "via",
        &GATEWAY.to_string(),
    ])?;
    Ok(ns)
}

/// kube-proxy for one pod: cluster IPs DNATed to endpoints (chosen at random), in the pod's
/// own namespace, after the sidecar's capture when there is one.
pub fn install_service_rules(plan: &Plan, pod_ns: &str) -> Result<(), NetError> {
    let mut rules = String::from("*nat\n:ISTHMUS-SERVICES - [0:0]\n");
    // A service without endpoints refuses connections, as kube-proxy's filter rules do.
    let mut rejects = String::new();
    for svc in &plan.services {
        let Some(vip) = svc.cluster_ip else { continue };
        for (port, target) in &svc.ports {
            let backends: Vec<(String, u16)> = plan
                .endpoints(svc)
                .filter_map(|p| Some((p.ip.to_string(), plan.target_port(p, target)?)))
                .collect();
            let n = backends.len();
            for (i, (ip, tp)) in backends.iter().enumerate() {
                let left = n - i;
                let statistic = if left > 1 {
                    format!(
                        " -m statistic --mode random --probability {:.5}",
                        1.0 / left as f64
                    )
                } else {
                    String::new()
                };
                rules.push_str(&format!(
                    "-A ISTHMUS-SERVICES -d {vip}/32 -p tcp --dport {port}{statistic} -j DNAT --to-destination {ip}:{tp}\n"
                ));
            }
            if n == 0 {
                rejects.push_str(&format!(
                    "-A ISTHMUS-NO-ENDPOINTS -d {vip}/32 -p tcp --dport {port} -j REJECT --reject-with tcp-reset\n"
                ));
            }
        }
    }
    rules.push_str("-A OUTPUT -j ISTHMUS-SERVICES\nCOMMIT\n");
    // Looked at for a connection's first packet only, as kube-proxy does: a filter chain is
    // otherwise walked by every packet the pod sends, one rule per service without endpoints.
    if !rejects.is_empty() {
        rules.push_str(&format!(
            "*filter\n:ISTHMUS-NO-ENDPOINTS - [0:0]\n{rejects}\
             -A OUTPUT -m conntrack --ctstate NEW -j ISTHMUS-NO-ENDPOINTS\nCOMMIT\n"
        ));
    }
    run_input(
        &[
            "ip",
            "netns",
            "exec",
            pod_ns,
            "iptables-restore",
            "--noflush",
        ],
        Some(&rules),
    )?;
    Ok(())
}

/// Deletes a namespace (its links and rules go with it). Missing is fine.
pub fn delete_netns(name: &str) {
    let _ = run(&["ip", "netns", "del", name]);
    let _ = std::fs::remove_dir_all(format!("/etc/netns/{name}"));
}

/// `ip netns exec` bind-mounts `/etc/netns/<ns>/*` over `/etc/*`: the pod's hosts and resolv.
pub fn write_pod_files(ns: &str, hosts: &str, resolv: &str) -> std::io::Result<()> {
    let dir = std::path::PathBuf::from(format!("/etc/netns/{ns}"));
    std::fs::create_dir_all(&dir)?;
    std::fs::write(dir.join("hosts"), hosts)?;
    std::fs::write(dir.join("resolv.conf"), resolv)?;
    Ok(())
}
