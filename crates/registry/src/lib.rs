//! The mesh as a model: services and their hostnames, ports and protocols, workloads and the
//! endpoints that back each service port.
//!
//! Built from a [`Snapshot`] of Kubernetes Services, Pods, EndpointSlices and Istio
//! ServiceEntries/WorkloadEntries. The control plane translates this model into xDS; the
//! analyzers and the local runtime read it too.

#![forbid(unsafe_code)]

pub mod host;
pub mod protocol;

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;

use isthmus_config::istio::networking::WorkloadEntrySpec;
use isthmus_config::k8s_openapi::api::core::v1::{Pod, Service as KubeService};
use isthmus_config::k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use isthmus_config::{Entry, Snapshot};

pub use host::DEFAULT_DOMAIN;
pub use protocol::Protocol;

/// Label Istio puts on workloads that run a sidecar (`istio`) so clients can use mTLS.
pub const TLS_MODE_LABEL: &str = "security.istio.io/tlsMode";
/// Annotation restricting a Kubernetes Service's visibility, like ServiceEntry's `exportTo`.
pub const EXPORT_TO_ANNOTATION: &str = "networking.istio.io/exportTo";
/// Pod label carrying `region/zone/subzone` (Istio's `istio-locality`, dots or slashes).
pub const LOCALITY_LABEL: &str = "istio-locality";

/// Where a service was declared.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ServiceSource {
    Kubernetes,
    ServiceEntry,
}

/// How clients reach a service's endpoints.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Resolution {
    /// The proxy load-balances across the endpoints it is given (EDS).
    ClientSideLb,
    /// The destination address is used as is (headless services, `resolution: NONE`).
    Passthrough,
    /// Endpoints are DNS names resolved by the proxy (`resolution: DNS`, ExternalName).
    Dns,
    DnsRoundRobin,
}

/// A service port's target: a number, or the name of a container port.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum TargetPort {
    Number(u16),
    Name(String),
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Port {
    pub name: String,
    pub port: u16,
    pub target: TargetPort,
    pub protocol: Protocol,
}

/// `region/zone/subzone`; empty parts are unknown.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Locality {
    pub region: String,
    pub zone: String,
    pub subzone: String,
}

impl Locality {
    /// Parses `region/zone/subzone` or `region.zone.subzone`.
    pub fn parse(s: &str) -> Locality {
        let sep = if s.contains('/') { '/' } else { '.' };
        let mut it = s.split(sep).map(str::to_string);
        Locality {
            region: it.next().unwrap_or_default(),
            zone: it.next().unwrap_or_default(),
            subzone: it.next().unwrap_or_default(),
        }
    }
    pub fn is_empty(&self) -> bool {
        self.region.is_empty() && self.zone.is_empty() && self.subzone.is_empty()
    }
}

impl std::fmt::Display for Locality {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}/{}", self.region, self.zone, self.subzone)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum WorkloadKind {
    Pod,
    WorkloadEntry,
}

/// Something that runs and has addresses: a Pod or a WorkloadEntry.
#[derive(Debug, Clone, PartialEq, Hash)]
pub struct Workload {
    pub kind: WorkloadKind,
    pub name: String,
    pub namespace: String,
    pub ips: Vec<IpAddr>,
    pub labels: BTreeMap<String, String>,
    pub annotations: BTreeMap<String, String>,
    pub service_account: String,
    /// Named container ports (`http-api` → 8080).
    pub named_ports: BTreeMap<String, u16>,
    /// `spec.hostname` and `spec.subdomain` (the per-pod DNS name of headless services).
    pub hostname: Option<String>,
    pub subdomain: Option<String>,
    pub locality: Locality,
    pub network: String,
    pub weight: u32,
    pub ready: bool,
    /// The workload runs an Istio-style sidecar and accepts mTLS.
    pub sidecar: bool,
}

/// Istio's canonical service of a workload with `labels`, as its injector derives it: the
/// `service.istio.io/canonical-name` label, else `app.kubernetes.io/name`, else `app`.
pub fn canonical_service(labels: &BTreeMap<String, String>) -> Option<&str> {
    first_label(
        labels,
        &[
            "service.istio.io/canonical-name",
            "app.kubernetes.io/name",
            "app",
        ],
    )
}

/// Istio's canonical revision: `service.istio.io/canonical-revision`, else
/// `app.kubernetes.io/version`, else `version` (Istio's `latest` when none).
pub fn canonical_revision(labels: &BTreeMap<String, String>) -> Option<&str> {
    first_label(
        labels,
        &[
            "service.istio.io/canonical-revision",
            "app.kubernetes.io/version",
            "version",
        ],
    )
}

fn first_label<'a>(labels: &'a BTreeMap<String, String>, keys: &[&str]) -> Option<&'a str> {
    keys.iter().find_map(|k| labels.get(*k)).map(String::as_str)
}

impl Workload {
    /// Istio's workload name: a Deployment's pod (`reviews-v1-7d9c4-xk2p`, labelled with its
    /// ReplicaSet's `pod-template-hash`) goes by the Deployment's name, anything else by its own.
    pub fn workload_name(&self) -> &str {
        match self.labels.get("pod-template-hash") {
            Some(hash) if self.kind == WorkloadKind::Pod => self
                .name
                .rsplit_once('-')
                .and_then(|(rest, _)| rest.strip_suffix(hash.as_str()))
                .and_then(|rest| rest.strip_suffix('-'))
                .unwrap_or(&self.name),
            _ => &self.name,
        }
    }

    pub fn ip(&self) -> Option<IpAddr> {
        self.ips.first().copied()
    }
    /// `spiffe://<trust-domain>/ns/<ns>/sa/<sa>`.
    pub fn spiffe_id(&self, trust_domain: &str) -> String {
        let sa = if self.service_account.is_empty() {
            "default"
        } else {
            &self.service_account
        };
        format!("spiffe://{trust_domain}/ns/{}/sa/{sa}", self.namespace)
    }
    fn matches(&self, namespace: &str, selector: &BTreeMap<String, String>) -> bool {
        self.namespace == namespace
            && selector
                .iter()
                .all(|(k, v)| self.labels.get(k).is_some_and(|l| l == v))
    }
}

/// An endpoint address: an IP, or a DNS name the proxy resolves.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Address {
    Ip(IpAddr),
    Dns(String),
}

impl std::fmt::Display for Address {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Address::Ip(ip) => write!(f, "{ip}"),
            Address::Dns(h) => f.write_str(h),
        }
    }
}

/// One backend of one service port.
#[derive(Debug, Clone, PartialEq)]
pub struct Endpoint {
    /// Index into [`Registry::workloads`], when the endpoint is a known workload.
    pub workload: Option<usize>,
    pub address: Address,
    /// The port traffic is sent to (the resolved target port).
    pub port: u16,
    /// The service port this endpoint serves.
    pub service_port: u16,
    pub locality: Locality,
    pub weight: u32,
    pub healthy: bool,
    pub service_account: String,
    pub sidecar: bool,
    pub labels: BTreeMap<String, String>,
}

/// A service: a Kubernetes Service, or one host of a ServiceEntry.
#[derive(Debug, Clone, PartialEq)]
pub struct Service {
    /// The fully qualified hostname (`reviews.default.svc.cluster.local`, or a ServiceEntry host).
    pub hostname: String,
    pub name: String,
    pub namespace: String,
    pub source: ServiceSource,
    pub vips: Vec<IpAddr>,
    /// `clusterIP: None`: clients address pods directly.
    pub headless: bool,
    /// `type: ExternalName` target.
    pub external_name: Option<String>,
    pub ports: Vec<Port>,
    /// `None` when the service has no selector (endpoints are given explicitly).
    pub selector: Option<BTreeMap<String, String>>,
    pub labels: BTreeMap<String, String>,
    /// Namespaces the service is visible to (`*`, `.`, `~` or names); empty means the mesh
    /// default.
    pub export_to: Vec<String>,
    pub resolution: Resolution,
    pub mesh_external: bool,
    pub subject_alt_names: Vec<String>,
    pub endpoints: Vec<Endpoint>,
    /// For a ServiceEntry host without addresses: the one this registry allocated it, which
    /// proxies that ask for it (`DNS_AUTO_ALLOCATE`) use as its address.
    pub auto_vip: Option<IpAddr>,
}

impl Service {
    /// Its addresses for a proxy that does (`auto`) or does not use allocated ones.
    pub fn addresses(&self, auto: bool) -> &[IpAddr] {
        match &self.auto_vip {
            Some(vip) if auto && self.vips.is_empty() => std::slice::from_ref(vip),
            _ => &self.vips,
        }
    }

    pub fn port(&self, number: u16) -> Option<&Port> {
        self.ports.iter().find(|p| p.port == number)
    }
    pub fn endpoints_for(&self, service_port: u16) -> impl Iterator<Item = &Endpoint> {
        self.endpoints
            .iter()
            .filter(move |e| e.service_port == service_port)
    }
    /// Whether a proxy in `namespace` can see this service.
    pub fn visible_to(&self, namespace: &str, mesh_default: &[String]) -> bool {
        let export = if self.export_to.is_empty() {
            mesh_default
        } else {
            &self.export_to
        };
        if export.is_empty() {
            return true;
        }
        export.iter().any(|e| match e.as_str() {
            "*" => true,
            "." => namespace == self.namespace,
            "~" => false,
            ns => ns == namespace,
        })
    }
    /// Kubernetes service name for headless pod hostnames and `name.ns` forms.
    pub fn is_kubernetes(&self) -> bool {
        self.source == ServiceSource::Kubernetes
    }
}

/// The mesh: every service and workload, with lookups by host and by address.
#[derive(Debug, Clone, Default)]
pub struct Registry {
    pub domain: String,
    pub services: Vec<Service>,
    pub workloads: Vec<Workload>,
    by_host: HashMap<String, Vec<usize>>,
    by_ip: HashMap<IpAddr, usize>,
    by_vip: HashMap<IpAddr, usize>,
    /// Workloads by namespace: a selector only picks workloads of its own namespace.
    by_namespace: HashMap<String, Vec<usize>>,
    /// Services by the workloads among their endpoints (workload index → service indices).
    by_workload: HashMap<usize, Vec<usize>>,
}

impl Registry {
    /// Builds the registry from a snapshot. `domain` is the cluster domain (`cluster.local`).
    pub fn build(snapshot: &Snapshot, domain: &str) -> Registry {
        let mut reg = Registry {
            domain: domain.to_string(),
            ..Default::default()
        };
        let node_localities: HashMap<&str, Locality> = snapshot
            .nodes
            .iter()
            .map(|n| (n.name(), node_locality(n.labels())))
            .collect();
        for p in &snapshot.pods {
            if let Some(w) = pod_workload(p, &node_localities) {
                reg.workloads.push(w);
            }
        }
        for we in &snapshot.workload_entries {
            reg.workloads.push(entry_workload(
                we.name(),
                we.namespace(),
                &we.object.spec,
                we.labels(),
            ));
        }
        for (i, w) in reg.workloads.iter().enumerate() {
            for ip in &w.ips {
                reg.by_ip.entry(*ip).or_insert(i);
            }
            reg.by_namespace
                .entry(w.namespace.clone())
                .or_default()
                .push(i);
        }
        for s in &snapshot.services {
            let svc = reg.kube_service(s, snapshot);
            reg.add_service(svc);
        }
        for se in &snapshot.service_entries {
            for svc in reg.service_entry_services(se) {
                reg.add_service(svc);
            }
        }
        reg.allocate_addresses();
        reg
    }

    /// Gives every ServiceEntry host that has no address, is not a wildcard and is resolved
    /// (not `NONE`) one in 240.240.0.0/16 (Istio's range for them): by a hash of the host, so
    /// that it stays while the mesh changes around it, the next free one on a collision. Hosts
    /// are taken in order, so the same mesh always allocates alike.
    fn allocate_addresses(&mut self) {
        // Fourth octets 1 to 254 of every third: no network or broadcast-looking addresses.
        const SLOTS: u32 = 256 * 254;
        let slot_ip = |n: u32| {
            IpAddr::V4(std::net::Ipv4Addr::new(
                240,
                240,
                (n / 254) as u8,
                (n % 254 + 1) as u8,
            ))
        };
        let mut wanting: Vec<usize> = (0..self.services.len())
            .filter(|&i| {
                let s = &self.services[i];
                s.source == ServiceSource::ServiceEntry
                    && s.vips.is_empty()
                    && !s.hostname.starts_with('*')
                    && s.resolution != Resolution::Passthrough
            })
            .collect();
        wanting.sort_by(|&a, &b| {
            let (a, b) = (&self.services[a], &self.services[b]);
            (&a.hostname, &a.namespace).cmp(&(&b.hostname, &b.namespace))
        });
        let mut taken: std::collections::HashSet<IpAddr> = self.by_vip.keys().copied().collect();
        let mut by_host: HashMap<String, IpAddr> = HashMap::new();
        for i in wanting {
            let host = self.services[i].hostname.clone();
            let vip = *by_host.entry(host).or_insert_with_key(|h| {
                // FNV-1a: small, and the same on every platform and run.
                let hash = h.bytes().fold(0x811c_9dc5_u32, |h, b| {
                    (h ^ u32::from(b)).wrapping_mul(0x0100_0193)
                });
                let start = hash % SLOTS;
                let free = (0..SLOTS)
                    .map(|k| slot_ip((start + k) % SLOTS))
                    .find(|ip| !taken.contains(ip))
                    .unwrap_or_else(|| slot_ip(start));
                taken.insert(free);
                free
            });
            self.services[i].auto_vip = Some(vip);
        }
    }

    fn add_service(&mut self, svc: Service) {
        let idx = self.services.len();
        let mut selected: Vec<usize> = svc.endpoints.iter().filter_map(|e| e.workload).collect();
        selected.sort_unstable();
        selected.dedup();
        for w in selected {
            self.by_workload.entry(w).or_default().push(idx);
        }
        self.by_host
            .entry(svc.hostname.clone())
            .or_default()
            .push(idx);
        for vip in &svc.vips {
            self.by_vip.entry(*vip).or_insert(idx);
        }
        self.services.push(svc);
    }

    /// Services with this exact hostname (a ServiceEntry host may be declared in several
    /// namespaces).
    pub fn services_by_host(&self, hostname: &str) -> impl Iterator<Item = &Service> {
        self.by_host
            .get(hostname)
            .into_iter()
            .flatten()
            .map(|&i| &self.services[i])
    }

    /// The service for a host as written in config in `namespace`, preferring the one declared
    /// in that namespace.
    pub fn service_for_config_host(&self, host: &str, namespace: &str) -> Option<&Service> {
        let fqdn = host::resolve_config_host(host, namespace, &self.domain);
        let mut found = self.services_by_host(&fqdn);
        let first = found.next()?;
        if first.namespace == namespace {
            return Some(first);
        }
        found.find(|s| s.namespace == namespace).or(Some(first))
    }

    /// The service a pod in `namespace` reaches by `name` through its DNS search path.
    pub fn resolve(&self, name: &str, namespace: &str) -> Option<&Service> {
        host::search_candidates(name, namespace, &self.domain)
            .iter()
            .find_map(|c| self.services_by_host(c).next())
    }

    /// The service whose cluster IP is `ip`.
    pub fn service_by_vip(&self, ip: IpAddr) -> Option<&Service> {
        self.by_vip.get(&ip).map(|&i| &self.services[i])
    }

    pub fn workload_by_ip(&self, ip: IpAddr) -> Option<&Workload> {
        self.by_ip.get(&ip).map(|&i| &self.workloads[i])
    }

    pub fn workload(&self, namespace: &str, name: &str) -> Option<&Workload> {
        self.workloads
            .iter()
            .find(|w| w.namespace == namespace && w.name == name)
    }

    /// The services that select a workload (its inbound ports come from these).
    pub fn services_for_workload(&self, w: &Workload) -> Vec<&Service> {
        self.workload_index(w)
            .and_then(|i| self.by_workload.get(&i))
            .into_iter()
            .flatten()
            .map(|&s| &self.services[s])
            .collect()
    }

    /// Where `w` is in `workloads`: normally it is one of them, found by its IP.
    fn workload_index(&self, w: &Workload) -> Option<usize> {
        w.ips
            .iter()
            .filter_map(|ip| self.by_ip.get(ip).copied())
            .find(|&i| std::ptr::eq(&self.workloads[i], w) || self.workloads[i] == *w)
            .or_else(|| self.workloads.iter().position(|x| x == w))
    }

    /// Per-pod hostnames of headless services: `hostname.subdomain.ns.svc.domain` → workload.
    pub fn pod_hostnames(&self) -> Vec<(String, &Workload, &Service)> {
        let mut out = Vec::new();
        for s in self
            .services
            .iter()
            .filter(|s| s.headless && s.is_kubernetes())
        {
            for w in &self.workloads {
                if w.namespace == s.namespace
                    && w.subdomain.as_deref() == Some(s.name.as_str())
                    && let Some(h) = &w.hostname
                {
                    out.push((format!("{h}.{}", s.hostname), w, s));
                }
            }
        }
        out
    }

    fn kube_service(&self, e: &Entry<KubeService>, snapshot: &Snapshot) -> Service {
        let name = e.name().to_string();
        let namespace = e.namespace().to_string();
        let spec = e.object.spec.clone().unwrap_or_default();
        let headless = spec.cluster_ip.as_deref() == Some("None");
        let mut vips: Vec<IpAddr> = Vec::new();
        for ip in spec
            .cluster_ips
            .iter()
            .flatten()
            .chain(spec.cluster_ip.iter())
        {
            if let Ok(ip) = ip.parse::<IpAddr>()
                && !vips.contains(&ip)
            {
                vips.push(ip);
            }
        }
        let external_name = (spec.type_.as_deref() == Some("ExternalName"))
            .then(|| spec.external_name.clone())
            .flatten();
        let ports: Vec<Port> = spec
            .ports
            .iter()
            .flatten()
            .filter_map(|p| {
                let port = u16::try_from(p.port).ok()?;
                let name = p.name.clone().unwrap_or_default();
                let target = match &p.target_port {
                    Some(IntOrString::Int(n)) => TargetPort::Number(u16::try_from(*n).ok()?),
                    Some(IntOrString::String(s)) => match s.parse::<u16>() {
                        Ok(n) => TargetPort::Number(n),
                        Err(_) => TargetPort::Name(s.clone()),
                    },
                    None => TargetPort::Number(port),
                };
                Some(Port {
                    protocol: Protocol::for_kube_port(
                        port,
                        &name,
                        p.protocol.as_deref(),
                        p.app_protocol.as_deref(),
                    ),
                    name,
                    port,
                    target,
                })
            })
            .collect();
        let selector = spec.selector.clone().filter(|s| !s.is_empty());
        let export_to = e
            .annotations()
            .get(EXPORT_TO_ANNOTATION)
            .map(|v| v.split(',').map(|s| s.trim().to_string()).collect())
            .unwrap_or_default();
        let resolution = if external_name.is_some() {
            Resolution::Dns
        } else if headless {
            Resolution::Passthrough
        } else {
            Resolution::ClientSideLb
        };
        let mut svc = Service {
            hostname: host::service_fqdn(&name, &namespace, &self.domain),
            name,
            namespace,
            source: ServiceSource::Kubernetes,
            vips,
            headless,
            external_name,
            ports,
            selector,
            labels: e.labels().clone(),
            export_to,
            resolution,
            mesh_external: false,
            subject_alt_names: vec![],
            endpoints: vec![],
            auto_vip: None,
        };
        svc.endpoints = match &svc.selector {
            Some(sel) => self.selected_endpoints(&svc.namespace, sel, &svc.ports),
            None => slice_endpoints(&svc, snapshot, self),
        };
        svc
    }

    /// Endpoints of workloads selected by labels, one per (workload, service port).
    fn selected_endpoints(
        &self,
        namespace: &str,
        selector: &BTreeMap<String, String>,
        ports: &[Port],
    ) -> Vec<Endpoint> {
        let mut out = Vec::new();
        let in_namespace = self
            .by_namespace
            .get(namespace)
            .map_or(&[][..], Vec::as_slice);
        for &i in in_namespace {
            let w = &self.workloads[i];
            if !w.matches(namespace, selector) {
                continue;
            }
            let Some(ip) = w.ip() else { continue };
            for p in ports {
                let target = match &p.target {
                    TargetPort::Number(n) => *n,
                    TargetPort::Name(n) => match w.named_ports.get(n) {
                        Some(n) => *n,
                        None => continue,
                    },
                };
                out.push(workload_endpoint(i, w, Address::Ip(ip), target, p.port));
            }
        }
        out
    }

    fn service_entry_services(
        &self,
        e: &Entry<isthmus_config::resource::ServiceEntry>,
    ) -> Vec<Service> {
        let spec = &e.object.spec;
        let namespace = e.namespace().to_string();
        let resolution = match spec.resolution.as_deref() {
            Some("STATIC") => Resolution::ClientSideLb,
            Some("DNS") => Resolution::Dns,
            Some("DNS_ROUND_ROBIN") => Resolution::DnsRoundRobin,
            _ => Resolution::Passthrough,
        };
        let ports: Vec<Port> = spec
            .ports
            .iter()
            .filter_map(|p| {
                let port = u16::try_from(p.number).ok()?;
                let target = match p.target_port {
                    0 => port,
                    t => u16::try_from(t).ok()?,
                };
                Some(Port {
                    name: p.name.clone(),
                    port,
                    target: TargetPort::Number(target),
                    protocol: Protocol::parse(&p.protocol),
                })
            })
            .collect();
        let vips: Vec<IpAddr> = spec
            .addresses
            .iter()
            .filter_map(|a| a.split('/').next()?.parse().ok())
            .collect();
        spec.hosts
            .iter()
            .map(|h| {
                let mut endpoints = Vec::new();
                for ep in &spec.endpoints {
                    let address = match ep.address.parse::<IpAddr>() {
                        Ok(ip) => Address::Ip(ip),
                        Err(_) if ep.address.starts_with("unix://") => continue,
                        Err(_) => Address::Dns(ep.address.clone()),
                    };
                    for p in &ports {
                        let target = ep
                            .ports
                            .get(&p.name)
                            .and_then(|n| u16::try_from(*n).ok())
                            .unwrap_or(match p.target {
                                TargetPort::Number(n) => n,
                                TargetPort::Name(_) => p.port,
                            });
                        endpoints.push(Endpoint {
                            workload: None,
                            address: address.clone(),
                            port: target,
                            service_port: p.port,
                            locality: Locality::parse(&ep.locality),
                            weight: ep.weight.max(1),
                            healthy: true,
                            service_account: ep.service_account.clone(),
                            sidecar: ep.labels.get(TLS_MODE_LABEL).is_some_and(|v| v == "istio"),
                            labels: ep.labels.clone(),
                        });
                    }
                }
                if let Some(sel) = &spec.workload_selector {
                    endpoints.extend(self.selected_endpoints(&namespace, &sel.labels, &ports));
                }
                if endpoints.is_empty() && resolution == Resolution::Dns && !h.starts_with('*') {
                    for p in &ports {
                        endpoints.push(Endpoint {
                            workload: None,
                            address: Address::Dns(h.clone()),
                            port: p.port,
                            service_port: p.port,
                            locality: Locality::default(),
                            weight: 1,
                            healthy: true,
                            service_account: String::new(),
                            sidecar: false,
                            labels: BTreeMap::new(),
                        });
                    }
                }
                Service {
                    hostname: h.clone(),
                    name: h.clone(),
                    namespace: namespace.clone(),
                    source: ServiceSource::ServiceEntry,
                    vips: vips.clone(),
                    headless: false,
                    external_name: None,
                    ports: ports.clone(),
                    selector: spec.workload_selector.as_ref().map(|s| s.labels.clone()),
                    labels: e.labels().clone(),
                    export_to: spec.export_to.clone(),
                    resolution,
                    mesh_external: spec.location.as_deref() != Some("MESH_INTERNAL"),
                    subject_alt_names: spec.subject_alt_names.clone(),
                    endpoints,
                    auto_vip: None,
                }
            })
            .collect()
    }
}

fn workload_endpoint(
    i: usize,
    w: &Workload,
    address: Address,
    port: u16,
    svc_port: u16,
) -> Endpoint {
    Endpoint {
        workload: Some(i),
        address,
        port,
        service_port: svc_port,
        locality: w.locality.clone(),
        weight: w.weight,
        healthy: w.ready,
        service_account: w.service_account.clone(),
        sidecar: w.sidecar,
        labels: w.labels.clone(),
    }
}

/// Endpoints of a selector-less Service from its EndpointSlices.
fn slice_endpoints(svc: &Service, snapshot: &Snapshot, reg: &Registry) -> Vec<Endpoint> {
    let mut out = Vec::new();
    for slice in &snapshot.endpoint_slices {
        if slice.namespace() != svc.namespace
            || slice.labels().get("kubernetes.io/service-name") != Some(&svc.name)
        {
            continue;
        }
        let slice_ports = slice.object.ports.clone().unwrap_or_default();
        for ep in &slice.object.endpoints {
            let ready = ep.conditions.as_ref().and_then(|c| c.ready).unwrap_or(true);
            for addr in &ep.addresses {
                let Ok(ip) = addr.parse::<IpAddr>() else {
                    continue;
                };
                let workload = reg.by_ip.get(&ip).copied();
                for p in &svc.ports {
                    let Some(sp) = slice_ports
                        .iter()
                        .find(|sp| sp.name.as_deref().unwrap_or("") == p.name)
                    else {
                        continue;
                    };
                    let Some(port) = sp.port.and_then(|n| u16::try_from(n).ok()) else {
                        continue;
                    };
                    let w = workload.map(|i| &reg.workloads[i]);
                    out.push(Endpoint {
                        workload,
                        address: Address::Ip(ip),
                        port,
                        service_port: p.port,
                        locality: w.map(|w| w.locality.clone()).unwrap_or_default(),
                        weight: 1,
                        healthy: ready,
                        service_account: w.map(|w| w.service_account.clone()).unwrap_or_default(),
                        sidecar: w.is_some_and(|w| w.sidecar),
                        labels: w.map(|w| w.labels.clone()).unwrap_or_default(),
                    });
                }
            }
        }
    }
    out
}

fn node_locality(labels: &BTreeMap<String, String>) -> Locality {
    let get = |k: &str| labels.get(k).cloned().unwrap_or_default();
    Locality {
        region: get("topology.kubernetes.io/region"),
        zone: get("topology.kubernetes.io/zone"),
        subzone: get("topology.istio.io/subzone"),
    }
}

/// A Pod with an address becomes a workload; pods not yet scheduled have none.
fn pod_workload(p: &Entry<Pod>, nodes: &HashMap<&str, Locality>) -> Option<Workload> {
    let status = p.object.status.as_ref();
    let mut ips: Vec<IpAddr> = Vec::new();
    if let Some(s) = status {
        for ip in s
            .pod_ips
            .iter()
            .flatten()
            .map(|i| i.ip.as_str())
            .chain(s.pod_ip.as_deref())
        {
            if let Ok(ip) = ip.parse()
                && !ips.contains(&ip)
            {
                ips.push(ip);
            }
        }
    }
    let spec = p.object.spec.clone().unwrap_or_default();
    let labels = p.labels().clone();
    let annotations = p.annotations().clone();
    let named_ports = spec
        .containers
        .iter()
        .flat_map(|c| c.ports.iter().flatten())
        .filter_map(|cp| Some((cp.name.clone()?, u16::try_from(cp.container_port).ok()?)))
        .collect();
    let ready = status
        .and_then(|s| s.conditions.as_ref())
        .and_then(|c| c.iter().find(|c| c.type_ == "Ready"))
        .map(|c| c.status == "True")
        .unwrap_or(true)
        && p.object.metadata.deletion_timestamp.is_none();
    let locality = match labels.get(LOCALITY_LABEL) {
        Some(l) => Locality::parse(l),
        None => spec
            .node_name
            .as_deref()
            .and_then(|n| nodes.get(n).cloned())
            .unwrap_or_default(),
    };
    let sidecar = labels.get(TLS_MODE_LABEL).is_some_and(|v| v == "istio")
        || spec.containers.iter().any(|c| c.name == "istio-proxy")
        || spec
            .init_containers
            .iter()
            .flatten()
            .any(|c| c.name == "istio-proxy");
    let network = labels
        .get("topology.istio.io/network")
        .cloned()
        .unwrap_or_default();
    Some(Workload {
        kind: WorkloadKind::Pod,
        name: p.name().to_string(),
        namespace: p.namespace().to_string(),
        ips,
        labels,
        annotations,
        service_account: spec
            .service_account_name
            .clone()
            .unwrap_or_else(|| "default".into()),
        named_ports,
        hostname: spec.hostname.clone(),
        subdomain: spec.subdomain.clone(),
        locality,
        network,
        weight: 1,
        ready,
        sidecar,
    })
}

fn entry_workload(
    name: &str,
    namespace: &str,
    spec: &WorkloadEntrySpec,
    meta_labels: &BTreeMap<String, String>,
) -> Workload {
    let mut labels = meta_labels.clone();
    labels.extend(spec.labels.clone());
    let ips = spec.address.parse().into_iter().collect();
    Workload {
        kind: WorkloadKind::WorkloadEntry,
        name: name.to_string(),
        namespace: namespace.to_string(),
        ips,
        sidecar: labels.get(TLS_MODE_LABEL).is_some_and(|v| v == "istio"),
        labels,
        annotations: BTreeMap::new(),
        service_account: if spec.service_account.is_empty() {
            "default".into()
        } else {
            spec.service_account.clone()
        },
        named_ports: spec
            .ports
            .iter()
            .filter_map(|(k, v)| Some((k.clone(), u16::try_from(*v).ok()?)))
            .collect(),
        hostname: None,
        subdomain: None,
        locality: Locality::parse(&spec.locality),
        network: spec.network.clone(),
        weight: spec.weight.max(1),
        ready: true,
    }
}
