//! The name table (NDS) a proxy's agent answers DNS from, as Istio builds it: every service
//! the proxy may reach with its address — a headless service's ready endpoints instead, and
//! each of its pods with a hostname and subdomain by that per-pod name. Kubernetes services
//! carry their name and namespace, from which the agent makes the short forms.

use std::net::IpAddr;

use isthmus_registry::{Address, Resolution, ServiceSource};
use isthmus_xds::nds::{NameInfo, NameTable};

use crate::context::PushContext;
use crate::proxy::Proxy;

/// The registry names Istio's agent reads.
const KUBERNETES: &str = "Kubernetes";
const EXTERNAL: &str = "External";

/// `proxy`'s table: one entry per host ([`PushContext::services_for`] has one service per host).
pub fn name_table(ctx: &PushContext, proxy: &Proxy) -> NameTable {
    let mut out = NameTable::default();
    for imported in ctx.services_for(proxy) {
        let svc = imported.svc;
        let kubernetes = svc.source == ServiceSource::Kubernetes;
        let registry = if kubernetes { KUBERNETES } else { EXTERNAL };
        let mut ips: Vec<IpAddr> = svc.addresses(proxy.dns_auto_allocate).to_vec();
        if ips.is_empty() && svc.resolution == Resolution::Passthrough {
            let Some(first) = svc.ports.first() else {
                continue;
            };
            for e in svc.endpoints_for(first.port).filter(|e| e.healthy) {
                let Address::Ip(ip) = e.address else {
                    continue;
                };
                if !ips.contains(&ip) {
                    ips.push(ip);
                }
                // `<hostname>.<subdomain>.<namespace>.svc.<domain>`, as Kubernetes names a
                // StatefulSet's pods.
                let pod = e.workload.and_then(|w| ctx.registry.workloads.get(w));
                if let Some((host, sub)) =
                    pod.and_then(|p| Some((p.hostname.as_ref()?, p.subdomain.as_ref()?)))
                    && let Some((_, rest)) = svc.hostname.split_once('.')
                {
                    let short = format!("{host}.{sub}");
                    out.table.insert(
                        format!("{short}.{rest}"),
                        NameInfo {
                            ips: vec![ip.to_string()],
                            registry: registry.into(),
                            shortname: short,
                            namespace: svc.namespace.clone(),
                            alt_hosts: Vec::new(),
                        },
                    );
                }
            }
        }
        if ips.is_empty() {
            // A ServiceEntry without addresses, none allocated for this proxy: the app's
            // resolver finds it.
            continue;
        }
        // Kubernetes services carry what the agent makes `name`, `name.ns`, `name.ns.svc` of.
        let (shortname, namespace) = if kubernetes {
            (svc.name.clone(), svc.namespace.clone())
        } else {
            Default::default()
        };
        out.table.insert(
            svc.hostname.clone(),
            NameInfo {
                ips: ips.iter().map(ToString::to_string).collect(),
                registry: registry.into(),
                shortname,
                namespace,
                alt_hosts: Vec::new(),
            },
        );
    }
    out
}
