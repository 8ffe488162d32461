use std::net::IpAddr;

use isthmus_config::{Loader, Snapshot};
use isthmus_registry::{Address, Protocol, Registry, Resolution};

const MESH: &str = r#"
apiVersion: v1
kind: Service
metadata: {name: reviews, namespace: bookinfo}
spec:
  clusterIP: 10.96.0.20
  selector: {app: reviews}
  ports:
  - {name: http, port: 9080, targetPort: http-api}
  - {name: metrics, port: 9090, targetPort: 19090}
  - {name: db, port: 5432, appProtocol: tcp}
---
apiVersion: v1
kind: Pod
metadata: {name: reviews-v1, namespace: bookinfo, labels: {app: reviews, version: v1}}
spec:
  serviceAccountName: bookinfo-reviews
  containers:
  - name: app
    ports: [{name: http-api, containerPort: 8080}]
status: {podIP: 10.244.0.5}
---
apiVersion: v1
kind: Pod
metadata: {name: reviews-v2, namespace: bookinfo, labels: {app: reviews, version: v2}}
spec:
  containers:
  - name: app
    ports: [{name: other, containerPort: 7070}]
status: {podIP: 10.244.0.6}
---
apiVersion: v1
kind: Pod
metadata: {name: pending, namespace: bookinfo, labels: {app: reviews}}
spec: {containers: [{name: app}]}
---
apiVersion: v1
kind: Service
metadata: {name: db, namespace: data}
spec:
  clusterIP: None
  selector: {app: db}
  ports: [{name: tcp-pg, port: 5432}]
---
apiVersion: v1
kind: Pod
metadata: {name: db-0, namespace: data, labels: {app: db}}
spec: {hostname: db-0, subdomain: db, containers: [{name: pg}]}
status: {podIP: 10.244.1.2}
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: ext, namespace: bookinfo}
spec:
  hosts: [api.example.com]
  ports: [{number: 443, name: https, protocol: HTTPS}]
  resolution: DNS
"#;

fn registry() -> Registry {
    let loaded = Loader::default().load_str("mesh.yaml", MESH);
    assert!(loaded.diagnostics.is_empty(), "{:?}", loaded.diagnostics);
    let snap: Snapshot = loaded.resources.into_iter().collect();
    Registry::build(&snap, "cluster.local")
}

#[test]
fn resolves_every_hostname_form() {
    let reg = registry();
    for name in [
        "reviews",
        "reviews.bookinfo",
        "reviews.bookinfo.svc",
        "reviews.bookinfo.svc.cluster.local",
    ] {
        let s = reg.resolve(name, "bookinfo").expect(name);
        assert_eq!(s.hostname, "reviews.bookinfo.svc.cluster.local");
    }
    // A bare name only resolves in the service's own namespace.
    assert!(reg.resolve("reviews", "default").is_none());
    assert!(reg.resolve("reviews.bookinfo", "default").is_some());
    let vip: IpAddr = "10.96.0.20".parse().unwrap();
    assert_eq!(reg.service_by_vip(vip).unwrap().name, "reviews");
}

#[test]
fn protocols_and_named_target_ports() {
    let reg = registry();
    let s = reg.resolve("reviews", "bookinfo").unwrap();
    assert_eq!(s.port(9080).unwrap().protocol, Protocol::Http);
    assert_eq!(s.port(9090).unwrap().protocol, Protocol::Unknown);
    assert_eq!(s.port(5432).unwrap().protocol, Protocol::Tcp);
    // Only reviews-v1 has the named port; the pending pod has no IP.
    let http: Vec<_> = s.endpoints_for(9080).collect();
    assert_eq!(http.len(), 1);
    assert_eq!(http[0].address, Address::Ip("10.244.0.5".parse().unwrap()));
    assert_eq!(http[0].port, 8080);
    assert_eq!(http[0].service_account, "bookinfo-reviews");
    // Numbered target ports apply to every selected pod.
    assert_eq!(s.endpoints_for(9090).count(), 2);
}

#[test]
fn headless_services_and_pod_hostnames() {
    let reg = registry();
    let db = reg.resolve("db.data", "bookinfo").unwrap();
    assert!(db.headless);
    assert_eq!(db.resolution, Resolution::Passthrough);
    let names: Vec<String> = reg.pod_hostnames().into_iter().map(|(h, _, _)| h).collect();
    assert_eq!(names, vec!["db-0.db.data.svc.cluster.local".to_string()]);
}

#[test]
fn service_entries_join_the_registry() {
    let reg = registry();
    let ext = reg.services_by_host("api.example.com").next().unwrap();
    assert_eq!(ext.resolution, Resolution::Dns);
    assert!(ext.mesh_external);
    let eps: Vec<_> = ext.endpoints_for(443).collect();
    assert_eq!(eps[0].address, Address::Dns("api.example.com".into()));
    assert_eq!(ext.port(443).unwrap().protocol, Protocol::Https);
}

/// ServiceEntry hosts without addresses get one in 240.240.0.0/16, the same for the same
/// mesh, distinct between hosts, for proxies that ask for them; wildcard hosts, `NONE`
/// resolution and entries with addresses get none.
#[test]
fn service_entries_without_addresses_are_allocated_one() {
    let extra = r#"
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: more, namespace: bookinfo}
spec:
  hosts: [db.example.com, cache.example.com, "*.wild.example.com"]
  ports: [{number: 3306, name: tcp, protocol: TCP}]
  resolution: DNS
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: passthrough, namespace: bookinfo}
spec:
  hosts: [none.example.com]
  ports: [{number: 3306, name: tcp, protocol: TCP}]
  resolution: NONE
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: fixed, namespace: bookinfo}
spec:
  hosts: [fixed.example.com]
  addresses: [192.0.2.10]
  ports: [{number: 3306, name: tcp, protocol: TCP}]
  resolution: DNS
"#;
    let build = || {
        let loaded = Loader::default().load_str("mesh.yaml", &format!("{MESH}---{extra}"));
        assert!(loaded.diagnostics.is_empty(), "{:?}", loaded.diagnostics);
        let snap: Snapshot = loaded.resources.into_iter().collect();
        Registry::build(&snap, "cluster.local")
    };
    let reg = build();
    let allocated = |host: &str| {
        let svc = reg.services_by_host(host).next().unwrap();
        (
            svc.auto_vip,
            svc.addresses(true).to_vec(),
            svc.addresses(false).to_vec(),
        )
    };
    let (db, cache) = (allocated("db.example.com"), allocated("cache.example.com"));
    for (vip, with, without) in [&db, &cache] {
        let vip = vip.expect("allocated");
        assert!(
            matches!(vip, IpAddr::V4(v) if v.octets()[..2] == [240, 240] && v.octets()[3] != 0 && v.octets()[3] != 255),
            "{vip}"
        );
        assert_eq!(with, &[vip]);
        assert!(without.is_empty());
    }
    assert_ne!(db.0, cache.0);
    assert_eq!(
        build()
            .services_by_host("db.example.com")
            .next()
            .unwrap()
            .auto_vip,
        db.0
    );
    for host in [
        "*.wild.example.com",
        "none.example.com",
        "fixed.example.com",
        "api.example.com",
    ] {
        let (vip, ..) = allocated(host);
        assert_eq!(vip.is_some(), host == "api.example.com", "{host}");
    }
    let fixed: IpAddr = "192.0.2.10".parse().unwrap();
    assert_eq!(allocated("fixed.example.com").1, [fixed]);
}

/// Istio's workload and canonical names: a Deployment's pod by its Deployment, other pods by
/// their own name; the canonical service and revision from the labels Istio's injector reads.
#[test]
fn workloads_are_named_as_istio_names_them() {
    let yaml = r#"
apiVersion: v1
kind: Pod
metadata: {name: reviews-v1-7d9c4-xk2p, namespace: a, labels: {pod-template-hash: 7d9c4, app: reviews, version: v1}}
status: {podIP: 10.1.0.1}
---
apiVersion: v1
kind: Pod
metadata: {name: db-0, namespace: a, labels: {app.kubernetes.io/name: db, service.istio.io/canonical-revision: r7}}
status: {podIP: 10.1.0.2}
---
apiVersion: v1
kind: Pod
metadata: {name: lone-1-2, namespace: a, labels: {pod-template-hash: other}}
status: {podIP: 10.1.0.3}
"#;
    let loaded = Loader::default().load_str("pods.yaml", yaml);
    assert!(loaded.diagnostics.is_empty(), "{:?}", loaded.diagnostics);
    let snap: Snapshot = loaded.resources.into_iter().collect();
    let reg = Registry::build(&snap, "cluster.local");
    let named: Vec<(&str, Option<&str>, Option<&str>)> = reg
        .workloads
        .iter()
        .map(|w| {
            (
                w.workload_name(),
                isthmus_registry::canonical_service(&w.labels),
                isthmus_registry::canonical_revision(&w.labels),
            )
        })
        .collect();
    assert_eq!(
        named,
        [
            ("reviews-v1", Some("reviews"), Some("v1")),
            ("db-0", Some("db"), Some("r7")),
            ("lone-1-2", None, None),
        ]
    );
}
