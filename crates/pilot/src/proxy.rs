//! The proxy a configuration is computed for, from its Envoy node: Istio's node id
//! `sidecar~<ip>~<pod>.<ns>~<ns>.svc.cluster.local` and its metadata.

use std::collections::BTreeMap;
use std::net::IpAddr;

use isthmus_config::mesh::ProxyHeaders;

/// What a proxy is: sidecar, gateway, …
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ProxyType {
    Sidecar,
    Router,
}

/// How inbound traffic reaches the proxy (`INTERCEPTION_MODE` metadata).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum InterceptionMode {
    #[default]
    Redirect,
    Tproxy,
    None,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Proxy {
    /// The whole node id.
    pub id: String,
    pub kind: ProxyType,
    pub ips: Vec<IpAddr>,
    /// `<pod>.<ns>`
    pub pod_name: String,
    pub namespace: String,
    /// The DNS domain of the node id (`<ns>.svc.cluster.local`).
    pub dns_domain: String,
    pub labels: BTreeMap<String, String>,
    pub service_account: String,
    pub cluster_id: String,
    pub interception_mode: InterceptionMode,
    pub istio_version: String,
    /// The pod's own `proxyHeaders` (ProxyConfig), in place of the mesh's.
    pub proxy_headers: Option<ProxyHeaders>,
    /// The pod's own ProxyConfig `tracing`, in place of the mesh's.
    pub tracing: Option<serde_json::Value>,
    /// ServiceEntry hosts without addresses are reached at the ones the registry allocated
    /// (`DNS_AUTO_ALLOCATE`, with the agent answering DNS for them).
    pub dns_auto_allocate: bool,
    /// Istio's `IDLE_TIMEOUT` metadata (`ISTIO_META_IDLE_TIMEOUT`): the idle timeout of its
    /// TCP proxies, over Envoy's hour.
    pub idle_timeout: Option<std::time::Duration>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("invalid node id {id:?}: {reason}")]
pub struct NodeError {
    pub id: String,
    pub reason: String,
}

/// The node metadata fields Istio's agent sends (a subset of `ISTIO_META_*`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NodeMetadata {
    pub namespace: Option<String>,
    pub labels: BTreeMap<String, String>,
    pub instance_ips: Vec<IpAddr>,
    pub service_account: Option<String>,
    pub cluster_id: Option<String>,
    pub interception_mode: Option<String>,
    pub istio_version: Option<String>,
    pub name: Option<String>,
    pub proxy_headers: Option<ProxyHeaders>,
    /// The pod's ProxyConfig `tracing` (sampling, custom tags, Zipkin address), in place of
    /// the mesh's `defaultConfig.tracing`.
    pub tracing: Option<serde_json::Value>,
    /// `DNS_AUTO_ALLOCATE`.
    pub dns_auto_allocate: bool,
    /// `IDLE_TIMEOUT`, a Go duration.
    pub idle_timeout: Option<String>,
}

impl Proxy {
    /// Parses an Istio node id and applies the node metadata.
    pub fn from_node(id: &str, meta: &NodeMetadata) -> Result<Proxy, NodeError> {
        let err = |reason: &str| NodeError {
            id: id.to_string(),
            reason: reason.to_string(),
        };
        let parts: Vec<&str> = id.split('~').collect();
        let [kind, ip, pod, domain] = parts.as_slice() else {
            return Err(err("expected <type>~<ip>~<pod>.<namespace>~<domain>"));
        };
        let kind = match *kind {
            "sidecar" => ProxyType::Sidecar,
            "router" => ProxyType::Router,
            other => return Err(err(&format!("unknown proxy type {other:?}"))),
        };
        let mut ips: Vec<IpAddr> = ip
            .split(',')
            .filter(|s| !s.is_empty())
            .map(|s| s.parse().map_err(|_| err(&format!("bad IP {s:?}"))))
            .collect::<Result<_, _>>()?;
        for extra in &meta.instance_ips {
            if !ips.contains(extra) {
                ips.push(*extra);
            }
        }
        let namespace = meta
            .namespace
            .clone()
            .or_else(|| pod.split_once('.').map(|(_, ns)| ns.to_string()))
            .or_else(|| domain.split('.').next().map(str::to_string))
            .filter(|ns| !ns.is_empty())
            .ok_or_else(|| err("no namespace"))?;
        Ok(Proxy {
            id: id.to_string(),
            kind,
            ips,
            pod_name: pod.to_string(),
            namespace,
            dns_domain: domain.to_string(),
            labels: meta.labels.clone(),
            service_account: meta
                .service_account
                .clone()
                .unwrap_or_else(|| "default".into()),
            cluster_id: meta
                .cluster_id
                .clone()
                .unwrap_or_else(|| "Kubernetes".into()),
            interception_mode: match meta.interception_mode.as_deref() {
                Some("TPROXY") => InterceptionMode::Tproxy,
                Some("NONE") => InterceptionMode::None,
                _ => InterceptionMode::Redirect,
            },
            istio_version: meta.istio_version.clone().unwrap_or_default(),
            proxy_headers: meta.proxy_headers.clone(),
            tracing: meta.tracing.clone(),
            dns_auto_allocate: meta.dns_auto_allocate,
            // As Istio, a value that does not parse is no timeout of the proxy's own.
            idle_timeout: meta
                .idle_timeout
                .as_deref()
                .and_then(|d| isthmus_config::istio::common::parse_go_duration(d).ok()),
        })
    }

    /// The workload name: the pod part of `<pod>.<ns>`.
    pub fn workload_name(&self) -> &str {
        self.pod_name
            .split_once('.')
            .map_or(self.pod_name.as_str(), |(p, _)| p)
    }

    /// The node id Istio's agent would send for a pod.
    pub fn node_id(ip: IpAddr, pod: &str, namespace: &str, domain: &str) -> String {
        format!("sidecar~{ip}~{pod}.{namespace}~{namespace}.svc.{domain}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_istio_node_ids() {
        let p = Proxy::from_node(
            "sidecar~10.1.0.5~reviews-v1-abc.bookinfo~bookinfo.svc.cluster.local",
            &NodeMetadata::default(),
        )
        .unwrap();
        assert_eq!(p.namespace, "bookinfo");
        assert_eq!(p.workload_name(), "reviews-v1-abc");
        assert_eq!(p.ips, vec!["10.1.0.5".parse::<IpAddr>().unwrap()]);
        assert!(Proxy::from_node("sidecar~x~y", &NodeMetadata::default()).is_err());
        assert!(Proxy::from_node("sidecar~nope~a.b~b.svc", &NodeMetadata::default()).is_err());
    }
}
