//! What a directory of manifests becomes on this machine: pods (from Pods, Deployments with
//! their replicas, StatefulSets with stable names), each with an IP from the pod range, and
//! services with cluster IPs from the service range — Kubernetes' controllers in miniature.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;

use isthmus_config::{Kind, Resource, Snapshot};
use k8s_openapi::api::core::v1::{PodSpec, Service};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

/// The bridge's address, the pods' gateway, and where the control plane listens.
pub const GATEWAY: Ipv4Addr = Ipv4Addr::new(10, 200, 0, 1);
pub const POD_CIDR: &str = "10.200.0.0/16";
pub const SERVICE_CIDR: &str = "10.96.0.0/16";
const FIRST_POD: u32 = 10;
const FIRST_SERVICE: u32 = 10;
/// Istio's proxy user.
pub const PROXY_UID: u32 = 1337;

#[derive(Debug, thiserror::Error)]
pub enum PlanError {
    #[error("{0}")]
    Invalid(String),
    #[error("more pods than the pod range holds")]
    PodRangeFull,
}

#[derive(Debug, Clone)]
pub struct Container {
    pub name: String,
    pub argv: Vec<String>,
    pub env: Vec<(String, String)>,
    pub uid: Option<u32>,
    pub gid: Option<u32>,
}

#[derive(Debug, Clone)]
pub struct PodPlan {
    pub name: String,
    pub namespace: String,
    pub ip: Ipv4Addr,
    pub labels: BTreeMap<String, String>,
    pub annotations: BTreeMap<String, String>,
    pub service_account: String,
    /// A StatefulSet pod's `<hostname>.<subdomain>` (its headless service).
    pub hostname: Option<String>,
    pub subdomain: Option<String>,
    pub containers: Vec<Container>,
    pub sidecar: bool,
    /// The Pod object as the control plane sees it (IP, readiness, sidecar).
    pub object: k8s_openapi::api::core::v1::Pod,
}

impl PodPlan {
    pub fn key(&self) -> String {
        format!("{}.{}", self.name, self.namespace)
    }
}

#[derive(Debug, Clone)]
pub struct ServicePlan {
    pub name: String,
    pub namespace: String,
    /// None for headless services.
    pub cluster_ip: Option<Ipv4Addr>,
    /// (port, target port number or name, protocol).
    pub ports: Vec<(u16, TargetPort)>,
    pub selector: BTreeMap<String, String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TargetPort {
    Number(u16),
    Name(String),
}

#[derive(Debug, Clone)]
pub struct Plan {
    pub pods: Vec<PodPlan>,
    pub services: Vec<ServicePlan>,
    /// Every resource to give the control plane, Services with their cluster IPs and the
    /// realised Pods included.
    pub resources: Vec<serde_json::Value>,
    pub domain: String,
}

fn rand_suffix(n: usize) -> String {
    const ALPHABET: &[u8] = b"bcdfghjklmnpqrstvwxz2456789";
    (0..n)
        .map(|_| ALPHABET[rand::random_range(0..ALPHABET.len())] as char)
        .collect()
}

fn injection_enabled(snapshot: &Snapshot, namespace: &str, meta: &ObjectMeta) -> bool {
    let annotations = meta.annotations.clone().unwrap_or_default();
    let labels = meta.labels.clone().unwrap_or_default();
    let pod_says = annotations
        .get("sidecar.istio.io/inject")
        .or_else(|| labels.get("sidecar.istio.io/inject"))
        .map(String::as_str);
    match pod_says {
        Some("false") => false,
        Some("true") => true,
        _ => snapshot.namespaces.iter().any(|n| {
            n.name() == namespace
                && n.labels()
                    .get("istio-injection")
                    .is_some_and(|v| v == "enabled")
        }),
    }
}

/// What the downward API and `$(VAR)` references can see of a pod.
struct PodFacts<'a> {
    name: &'a str,
    namespace: &'a str,
    ip: Ipv4Addr,
    service_account: &'a str,
}

fn field_ref(path: &str, pod: &PodFacts<'_>) -> Option<String> {
    Some(match path {
        "status.podIP" => pod.ip.to_string(),
        "metadata.name" => pod.name.to_string(),
        "metadata.namespace" => pod.namespace.to_string(),
        "spec.serviceAccountName" => pod.service_account.to_string(),
        _ => return None,
    })
}

/// Kubernetes' `$(VAR)` expansion of commands and arguments (`$$` escapes).
fn expand(arg: &str, env: &[(String, String)]) -> String {
    let mut out = String::new();
    let mut rest = arg;
    while let Some(i) = rest.find('$') {
        out.push_str(&rest[..i]);
        let after = &rest[i + 1..];
        if let Some(tail) = after.strip_prefix('$') {
            out.push('$');
            rest = tail;
        } else if let Some(inner) = after.strip_prefix('(')
            && let Some(end) = inner.find(')')
            && let Some((_, v)) = env.iter().rev().find(|(k, _)| k == &inner[..end])
        {
            out.push_str(v);
            rest = &inner[end + 1..];
        } else {
            out.push('$');
            rest = after;
        }
    }
    out.push_str(rest);
    out
}

fn containers(spec: &PodSpec, pod: &PodFacts<'_>) -> Result<Vec<Container>, String> {
    let pod_uid = spec
        .security_context
        .as_ref()
        .and_then(|s| s.run_as_user)
        .and_then(|u| u32::try_from(u).ok());
    let pod_gid = spec
        .security_context
        .as_ref()
        .and_then(|s| s.run_as_group)
        .and_then(|g| u32::try_from(g).ok());
    spec.containers
        .iter()
        .filter(|c| c.name != "istio-proxy")
        .map(|c| {
            let env: Vec<(String, String)> = c
                .env
                .iter()
                .flatten()
                .filter_map(|e| {
                    let value = match (&e.value, &e.value_from) {
                        (Some(v), _) => v.clone(),
                        (None, Some(from)) => field_ref(&from.field_ref.as_ref()?.field_path, pod)?,
                        (None, None) => String::new(),
                    };
                    Some((e.name.clone(), value))
                })
                .collect();
            let mut argv: Vec<String> = c.command.clone().unwrap_or_default();
            argv.extend(c.args.clone().unwrap_or_default());
            let argv: Vec<String> = argv.iter().map(|a| expand(a, &env)).collect();
            if argv.is_empty() {
                return Err(format!(
                    "container {:?} has no command: the local runtime runs commands, not images",
                    c.name
                ));
            }
            let sc = c.security_context.as_ref();
            Ok(Container {
                name: c.name.clone(),
                argv,
                env,
                uid: sc
                    .and_then(|s| s.run_as_user)
                    .and_then(|u| u32::try_from(u).ok())
                    .or(pod_uid),
                gid: sc
                    .and_then(|s| s.run_as_group)
                    .and_then(|g| u32::try_from(g).ok())
                    .or(pod_gid),
            })
        })
        .collect()
}

struct Ips {
    next_pod: u32,
    next_service: u32,
    taken_services: Vec<Ipv4Addr>,
}

impl Ips {
    fn pod(&mut self) -> Result<Ipv4Addr, PlanError> {
        if self.next_pod >= 0xffff {
            return Err(PlanError::PodRangeFull);
        }
        let ip = Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 200, 0, 0)) + self.next_pod);
        self.next_pod += 1;
        Ok(ip)
    }

    fn service(&mut self) -> Ipv4Addr {
        loop {
            let ip = Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 96, 0, 0)) + self.next_service);
            self.next_service += 1;
            if !self.taken_services.contains(&ip) {
                return ip;
            }
        }
    }
}

/// Realises the resources: every pod gets a name, an IP and its containers.
pub fn plan(resources: &[Resource], domain: &str) -> Result<Plan, PlanError> {
    let snapshot: Snapshot = resources.iter().cloned().collect();
    let service_net: ipnet::Ipv4Net = SERVICE_CIDR
        .parse()
        .map_err(|_| PlanError::Invalid("service range".into()))?;
    let mut ips = Ips {
        next_pod: FIRST_POD,
        next_service: FIRST_SERVICE,
        taken_services: snapshot
            .services
            .iter()
            .filter_map(|s| s.object.spec.as_ref()?.cluster_ip.as_deref()?.parse().ok())
            .collect(),
    };
    let mut pods = Vec::new();
    let mut add_pod = |ns: &str,
                       name: String,
                       template_meta: &ObjectMeta,
                       spec: &PodSpec,
                       extra_labels: BTreeMap<String, String>,
                       ips: &mut Ips,
                       owner: &str|
     -> Result<(), PlanError> {
        let mut labels = template_meta.labels.clone().unwrap_or_default();
        labels.extend(extra_labels);
        let annotations = template_meta.annotations.clone().unwrap_or_default();
        let sidecar = injection_enabled(&snapshot, ns, template_meta);
        let ip = ips.pod()?;
        let service_account = spec
            .service_account_name
            .clone()
            .filter(|s| !s.is_empty())
            .unwrap_or_else(|| "default".into());
        let facts = PodFacts {
            name: &name,
            namespace: ns,
            ip,
            service_account: &service_account,
        };
        let containers = containers(spec, &facts)
            .map_err(|e| PlanError::Invalid(format!("{owner} in namespace {ns}: {e}")))?;
        if sidecar {
            // What the injector adds, so that the registry sees a meshed pod.
            labels.insert("security.istio.io/tlsMode".into(), "istio".into());
            // Istio's canonical service and revision, from the app's labels when it has them.
            let canonical = isthmus_registry::canonical_service(&labels)
                .unwrap_or_else(|| owner.rsplit(' ').next().unwrap_or(owner))
                .to_string();
            let revision = isthmus_registry::canonical_revision(&labels)
                .unwrap_or("latest")
                .to_string();
            labels
                .entry("service.istio.io/canonical-name".into())
                .or_insert(canonical);
            labels
                .entry("service.istio.io/canonical-revision".into())
                .or_insert(revision);
        }
        let mut object_spec = spec.clone();
        object_spec.service_account_name = Some(service_account.clone());
        if sidecar {
            object_spec
                .containers
                .push(k8s_openapi::api::core::v1::Container {
                    name: "istio-proxy".into(),
                    ..Default::default()
                });
        }
        let object = k8s_openapi::api::core::v1::Pod {
            metadata: ObjectMeta {
                name: Some(name.clone()),
                namespace: Some(ns.to_string()),
                labels: Some(labels.clone()),
                annotations: Some(annotations.clone()),
                ..Default::default()
            },
            spec: Some(object_spec),
            status: Some(k8s_openapi::api::core::v1::PodStatus {
                pod_ip: Some(ip.to_string()),
                pod_ips: Some(vec![k8s_openapi::api::core::v1::PodIP {
                    ip: ip.to_string(),
                }]),
                phase: Some("Running".into()),
                conditions: Some(vec![k8s_openapi::api::core::v1::PodCondition {
                    type_: "Ready".into(),
                    status: "True".into(),
                    ..Default::default()
                }]),
                ..Default::default()
            }),
        };
        pods.push(PodPlan {
            name,
            namespace: ns.to_string(),
            ip,
            labels,
            annotations,
            service_account,
            hostname: spec.hostname.clone(),
            subdomain: spec.subdomain.clone(),
            containers,
            sidecar,
            object,
        });
        Ok(())
    };
    let ns_of = |ns: &str| {
        if ns.is_empty() {
            "default".to_string()
        } else {
            ns.to_string()
        }
    };
    for p in &snapshot.pods {
        let spec = p.object.spec.clone().unwrap_or_default();
        add_pod(
            &ns_of(p.namespace()),
            p.name().to_string(),
            &p.object.metadata,
            &spec,
            BTreeMap::new(),
            &mut ips,
            &format!("Pod {}", p.name()),
        )?;
    }
    for d in &snapshot.deployments {
        let Some(spec) = d.object.spec.as_ref() else {
            continue;
        };
        let template = &spec.template;
        let pod_spec = template.spec.clone().unwrap_or_default();
        let hash = rand_suffix(10);
        for _ in 0..spec.replicas.unwrap_or(1).max(0) {
            let mut extra = BTreeMap::new();
            extra.insert("pod-template-hash".to_string(), hash.clone());
            add_pod(
                &ns_of(d.namespace()),
                format!("{}-{hash}-{}", d.name(), rand_suffix(5)),
                template.metadata.as_ref().unwrap_or(&ObjectMeta::default()),
                &pod_spec,
                extra,
                &mut ips,
                &format!("Deployment {}", d.name()),
            )?;
        }
    }
    for s in &snapshot.stateful_sets {
        let Some(spec) = s.object.spec.as_ref() else {
            continue;
        };
        let template = &spec.template;
        for i in 0..spec.replicas.unwrap_or(1).max(0) {
            let name = format!("{}-{i}", s.name());
            let mut pod_spec = template.spec.clone().unwrap_or_default();
            pod_spec.hostname = Some(name.clone());
            pod_spec.subdomain = spec.service_name.clone();
            let mut extra = BTreeMap::new();
            extra.insert(
                "statefulset.kubernetes.io/pod-name".to_string(),
                name.clone(),
            );
            add_pod(
                &ns_of(s.namespace()),
                name,
                template.metadata.as_ref().unwrap_or(&ObjectMeta::default()),
                &pod_spec,
                extra,
                &mut ips,
                &format!("StatefulSet {}", s.name()),
            )?;
        }
    }

    let mut services = Vec::new();
    let mut service_objects: BTreeMap<(String, String), Service> = BTreeMap::new();
    for s in &snapshot.services {
        let mut object = s.object.clone();
        let spec = object.spec.get_or_insert_with(Default::default);
        let headless = spec.cluster_ip.as_deref() == Some("None");
        let cluster_ip = if headless {
            None
        } else {
            match spec
                .cluster_ip
                .as_deref()
                .and_then(|ip| ip.parse::<Ipv4Addr>().ok())
            {
                Some(ip) if service_net.contains(&ip) => Some(ip),
                // Outside the runtime's service range: give it one inside.
                _ => Some(ips.service()),
            }
        };
        if let Some(ip) = cluster_ip {
            spec.cluster_ip = Some(ip.to_string());
            spec.cluster_ips = Some(vec![ip.to_string()]);
        }
        let ports = spec
            .ports
            .iter()
            .flatten()
            .filter_map(|p| {
                let port = u16::try_from(p.port).ok()?;
                let target = match &p.target_port {
                    Some(k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::Int(n)) => {
                        TargetPort::Number(u16::try_from(*n).ok()?)
                    }
                    Some(k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::String(s)) => {
                        TargetPort::Name(s.clone())
                    }
                    None => TargetPort::Number(port),
                };
                Some((port, target))
            })
            .collect();
        let ns = ns_of(s.namespace());
        services.push(ServicePlan {
            name: s.name().to_string(),
            namespace: ns.clone(),
            cluster_ip,
            ports,
            selector: spec.selector.clone().unwrap_or_default(),
        });
        object.metadata.namespace = Some(ns.clone());
        service_objects.insert((ns, s.name().to_string()), object);
    }

    // The control plane's view: everything as given, Services with their IPs, and the Pods.
    let mut out = Vec::new();
    for r in resources {
        let kind = r.object.kind();
        if kind == Kind::Service || kind == Kind::Pod {
            continue;
        }
        out.push(with_type(r.object.to_json(), &r.api_version, kind.name()));
    }
    for s in service_objects.values() {
        out.push(with_type(
            serde_json::to_value(s).unwrap_or_default(),
            "v1",
            "Service",
        ));
    }
    for p in &pods {
        out.push(with_type(
            serde_json::to_value(&p.object).unwrap_or_default(),
            "v1",
            "Pod",
        ));
    }
    Ok(Plan {
        pods,
        services,
        resources: out,
        domain: domain.to_string(),
    })
}

fn with_type(mut v: serde_json::Value, api_version: &str, kind: &str) -> serde_json::Value {
    if let serde_json::Value::Object(m) = &mut v {
        m.insert("apiVersion".into(), api_version.into());
        m.insert("kind".into(), kind.into());
    }
    v
}

impl Plan {
    /// The pods a service selects.
    pub fn endpoints<'a>(&'a self, svc: &'a ServicePlan) -> impl Iterator<Item = &'a PodPlan> {
        self.pods.iter().filter(move |p| {
            p.namespace == svc.namespace
                && !svc.selector.is_empty()
                && svc.selector.iter().all(|(k, v)| p.labels.get(k) == Some(v))
        })
    }

    /// A target port resolved on a pod (named ports from its containers).
    pub fn target_port(&self, pod: &PodPlan, target: &TargetPort) -> Option<u16> {
        match target {
            TargetPort::Number(n) => Some(*n),
            TargetPort::Name(name) => pod
                .object
                .spec
                .as_ref()?
                .containers
                .iter()
                .flat_map(|c| c.ports.iter().flatten())
                .find(|p| p.name.as_deref() == Some(name))
                .and_then(|p| u16::try_from(p.container_port).ok()),
        }
    }

    /// `/etc/hosts` of a pod: every service by every name Kubernetes' DNS answers for it from
    /// that pod's namespace (seed 004), headless services' pods by pod hostname, and itself.
    pub fn hosts_file(&self, pod: &PodPlan) -> String {
        let d = &self.domain;
        let mut out =
            String::from("127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n");
        let mut own = vec![pod.name.clone()];
        if let (Some(h), Some(sub)) = (&pod.hostname, &pod.subdomain) {
            own.insert(0, format!("{h}.{sub}.{}.svc.{d}", pod.namespace));
        }
        out.push_str(&format!("{}\t{}\n", pod.ip, own.join(" ")));
        for s in &self.services {
            let fqdn = format!("{}.{}.svc.{d}", s.name, s.namespace);
            let mut names = vec![
                fqdn.clone(),
                format!("{}.{}.svc", s.name, s.namespace),
                format!("{}.{}", s.name, s.namespace),
            ];
            if s.namespace == pod.namespace {
                names.push(s.name.clone());
            }
            match s.cluster_ip {
                Some(ip) => out.push_str(&format!("{ip}\t{}\n", names.join(" "))),
                None => {
                    for p in self.endpoints(s) {
                        out.push_str(&format!("{}\t{}\n", p.ip, names.join(" ")));
                        if p.subdomain.as_deref() == Some(s.name.as_str())
                            && let Some(h) = &p.hostname
                        {
                            let mut per_pod = vec![format!("{h}.{fqdn}")];
                            per_pod.push(format!("{h}.{}.{}.svc", s.name, s.namespace));
                            per_pod.push(format!("{h}.{}.{}", s.name, s.namespace));
                            if s.namespace == pod.namespace {
                                per_pod.push(format!("{h}.{}", s.name));
                            }
                            out.push_str(&format!("{}\t{}\n", p.ip, per_pod.join(" ")));
                        }
                    }
                }
            }
        }
        out
    }

    pub fn resolv_conf(&self, pod: &PodPlan) -> String {
        let d = &self.domain;
        format!(
            "search {}.svc.{d} svc.{d} {d}\nnameserver {GATEWAY}\noptions ndots:5\n",
            pod.namespace
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn expands_like_kubernetes() {
        let env = vec![("POD_IP".to_string(), "10.200.0.10".to_string())];
        assert_eq!(expand("--bind=$(POD_IP)", &env), "--bind=10.200.0.10");
        assert_eq!(expand("$$(POD_IP) $(NOPE) $", &env), "$(POD_IP) $(NOPE) $");
    }

    #[test]
    fn deployments_statefulsets_and_services_get_names_and_addresses() {
        let yaml = r#"
apiVersion: v1
kind: Namespace
metadata: {name: a, labels: {istio-injection: enabled}}
---
apiVersion: v1
kind: Service
metadata: {name: web, namespace: a}
spec:
  clusterIP: None
  selector: {app: web}
  ports: [{name: http, port: 80}]
---
apiVersion: v1
kind: Service
metadata: {name: api, namespace: a}
spec:
  selector: {app: api}
  ports: [{name: http, port: 8080, targetPort: 9090}]
---
apiVersion: apps/v1
kind: StatefulSet
metadata: {name: web, namespace: a}
spec:
  serviceName: web
  replicas: 2
  selector: {matchLabels: {app: web}}
  template:
    metadata: {labels: {app: web}, annotations: {sidecar.istio.io/inject: "false"}}
    spec:
      containers:
      - name: web
        command: [isthmus, echo, --bind, $(IP)]
        env: [{name: IP, valueFrom: {fieldRef: {fieldPath: status.podIP}}}]
---
apiVersion: apps/v1
kind: Deployment
metadata: {name: api, namespace: a}
spec:
  replicas: 3
  selector: {matchLabels: {app: api}}
  template:
    metadata: {labels: {app: api}}
    spec:
      containers: [{name: api, command: [sleep, "1"]}]
"#;
        let loaded = isthmus_config::Loader::default().load_str("t.yaml", yaml);
        assert!(!loaded.has_errors(), "{:?}", loaded.diagnostics);
        let plan = plan(&loaded.resources, "cluster.local").unwrap();
        assert_eq!(plan.pods.len(), 5);
        let web0 = plan.pods.iter().find(|p| p.name == "web-0").unwrap();
        assert!(!web0.sidecar);
        assert_eq!(web0.containers[0].argv[3], web0.ip.to_string());
        let api: Vec<_> = plan
            .pods
            .iter()
            .filter(|p| p.name.starts_with("api-"))
            .collect();
        assert!(
            api.iter()
                .all(|p| p.sidecar && p.labels.contains_key("pod-template-hash"))
        );
        let hosts = plan.hosts_file(web0);
        assert!(hosts.contains("web-1.web.a.svc.cluster.local"), "{hosts}");
        assert!(hosts.contains("api.a.svc.cluster.local"), "{hosts}");
        let svc = plan.services.iter().find(|s| s.name == "api").unwrap();
        assert!(svc.cluster_ip.is_some());
        assert_eq!(plan.endpoints(svc).count(), 3);
        assert!(
            plan.services
                .iter()
                .any(|s| s.name == "web" && s.cluster_ip.is_none())
        );
    }
}
