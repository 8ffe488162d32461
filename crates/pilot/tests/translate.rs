//! Golden files of the per-proxy configuration for `testdata/mesh.yaml`. Set
//! `ISTHMUS_UPDATE_GOLDEN=1` to rewrite them after an intended change, then review the diff.

use isthmus_config::{Loader, MeshConfig, Snapshot};
use isthmus_pilot::{NodeMetadata, Proxy, PushContext};
use isthmus_xds::json::to_json;

fn context() -> PushContext {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/testdata");
    let loaded = Loader::default().load_paths(&[dir.join("mesh.yaml")]);
    assert!(loaded.errors().next().is_none(), "{:?}", loaded.diagnostics);
    let snapshot: Snapshot = loaded.resources.into_iter().collect();
    PushContext::new(snapshot, MeshConfig::default(), "cluster.local", None)
}

fn proxy(ip: &str, pod: &str, ns: &str) -> Proxy {
    proxy_with_metadata(ip, pod, ns, &NodeMetadata::default())
}

/// A proxy whose node sent `meta`.
fn proxy_with_metadata(ip: &str, pod: &str, ns: &str, meta: &NodeMetadata) -> Proxy {
    let id = Proxy::node_id(ip.parse().unwrap(), pod, ns, "cluster.local");
    Proxy::from_node(&id, meta).unwrap()
}

fn golden(name: &str, ctx: &PushContext, p: &Proxy) -> serde_json::Value {
    let clusters: Vec<_> = isthmus_pilot::cluster::clusters(ctx, p)
        .iter()
        .map(|c| to_json(c).unwrap())
        .collect();
    let endpoints: Vec<_> = isthmus_pilot::endpoint::endpoints(ctx, p, &[])
        .iter()
        .map(|e| to_json(e).unwrap())
        .collect();
    let routes: Vec<_> = isthmus_pilot::route::routes(ctx, p, &[])
        .iter()
        .map(|r| to_json(r).unwrap())
        .collect();
    let listeners: Vec<_> = isthmus_pilot::listener::listeners(ctx, p)
        .iter()
        .map(|l| to_json(l).unwrap())
        .collect();
    let got = serde_json::json!({
        "clusters": clusters,
        "endpoints": endpoints,
        "listeners": listeners,
        "routes": routes,
    });
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/golden")
        .join(format!("{name}.json"));
    let text = serde_json::to_string_pretty(&got).unwrap() + "\n";
    if std::env::var_os("ISTHMUS_UPDATE_GOLDEN").is_some() {
        std::fs::write(&path, &text).unwrap();
    }
    let want = std::fs::read_to_string(&path).unwrap_or_default();
    assert!(
        want == text,
        "{name}: translation differs from {}; rerun with ISTHMUS_UPDATE_GOLDEN=1 and review",
        path.display()
    );
    got
}

/// The cluster of a proxy named `name`.
fn cluster_named(
    ctx: &PushContext,
    p: &Proxy,
    name: &str,
) -> envoy_types::pb::envoy::config::cluster::v3::Cluster {
    isthmus_pilot::cluster::clusters(ctx, p)
        .into_iter()
        .find(|c| c.name == name)
        .unwrap_or_else(|| panic!("no cluster {name}"))
}

fn names(v: &serde_json::Value, key: &str, field: &str) -> Vec<String> {
    v[key]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c[field].as_str().unwrap().to_string())
        .collect()
}

#[test]
fn productpage_sidecar() {
    let ctx = context();
    let v = golden(
        "productpage",
        &ctx,
        &proxy("10.1.0.10", "productpage-v1-0", "bookinfo"),
    );
    let clusters = names(&v, "clusters", "name");
    for want in [
        "BlackHoleCluster",
        "InboundPassthroughCluster",
        "PassthroughCluster",
        "inbound|9080||",
        "outbound|9080|v1|reviews.bookinfo.svc.cluster.local",
        "outbound|9080|v2|reviews.bookinfo.svc.cluster.local",
        "outbound|9080||reviews.bookinfo.svc.cluster.local",
        "outbound|5432||db.data.svc.cluster.local",
    ] {
        assert!(
            clusters.contains(&want.to_string()),
            "missing {want}: {clusters:?}"
        );
    }
    // Subset endpoints: v1 is reviews-v1-0 on the named target port.
    let v1 = v["endpoints"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["cluster_name"] == "outbound|9080|v1|reviews.bookinfo.svc.cluster.local")
        .unwrap();
    let addr = &v1["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"]["socket_address"];
    assert_eq!(addr["address"], "10.1.0.11");
    assert_eq!(addr["port_value"], 9081);
    assert_eq!(
        v1["endpoints"][0]["lb_endpoints"].as_array().unwrap().len(),
        1
    );
    // The inbound cluster passes through to the pod IP from 127.0.0.6.
    let inbound = v["clusters"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == "inbound|9080||")
        .unwrap();
    assert_eq!(inbound["type"], "ORIGINAL_DST");
    assert_eq!(
        inbound["upstream_bind_config"]["source_address"]["address"],
        "127.0.0.6"
    );
}

#[test]
fn routes_follow_the_virtual_service_and_seed_004_host_forms() {
    let ctx = context();
    let p = proxy("10.1.0.10", "productpage-v1-0", "bookinfo");
    let routes = isthmus_pilot::route::routes(&ctx, &p, &["9080".to_string()]);
    assert_eq!(routes.len(), 1);
    let v = to_json(&routes[0]).unwrap();
    assert_eq!(v["name"], "9080");
    let vh = v["virtual_hosts"]
        .as_array()
        .unwrap()
        .iter()
        .find(|h| h["name"] == "reviews.bookinfo.svc.cluster.local:9080")
        .unwrap();
    let domains: Vec<&str> = vh["domains"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d.as_str().unwrap())
        .collect();
    for d in [
        "reviews",
        "reviews:9080",
        "reviews.bookinfo",
        "reviews.bookinfo.svc.cluster.local",
        "10.96.0.11",
        "10.96.0.11:9080",
    ] {
        assert!(domains.contains(&d), "missing {d} in {domains:?}");
    }
    let jason = &vh["routes"][0];
    assert_eq!(jason["match"]["headers"][0]["name"], "end-user");
    assert_eq!(
        jason["route"]["cluster"],
        "outbound|9080|v2|reviews.bookinfo.svc.cluster.local"
    );
    let split = &vh["routes"][1]["route"];
    assert_eq!(
        split["weighted_clusters"]["clusters"]
            .as_array()
            .unwrap()
            .len(),
        2
    );
    assert_eq!(split["timeout"], "3s");
    assert_eq!(split["retry_policy"]["num_retries"], 3);
    assert_eq!(
        v["virtual_hosts"].as_array().unwrap().last().unwrap()["name"],
        "allow_any"
    );

    // From another namespace the bare short name is not a domain.
    let other = proxy("10.1.1.30", "nc-0", "data");
    let routes = isthmus_pilot::route::routes(&ctx, &other, &["9080".to_string()]);
    let v = to_json(&routes[0]).unwrap();
    let vh = v["virtual_hosts"]
        .as_array()
        .unwrap()
        .iter()
        .find(|h| h["name"] == "reviews.bookinfo.svc.cluster.local:9080")
        .unwrap();
    let domains: Vec<&str> = vh["domains"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d.as_str().unwrap())
        .collect();
    assert!(
        !domains.contains(&"reviews") && domains.contains(&"reviews.bookinfo"),
        "{domains:?}"
    );
}

#[test]
fn listeners_capture_outbound_and_apply_peer_authentication_inbound() {
    let ctx = context();
    let find = |v: &serde_json::Value, name: &str| {
        v["listeners"]
            .as_array()
            .unwrap()
            .iter()
            .find(|l| l["name"] == name)
            .cloned()
            .unwrap_or_else(|| panic!("no listener {name}"))
    };
    let v = golden(
        "productpage",
        &ctx,
        &proxy("10.1.0.10", "productpage-v1-0", "bookinfo"),
    );
    let out = find(&v, "virtualOutbound");
    assert_eq!(out["use_original_dst"], true);
    assert_eq!(out["address"]["socket_address"]["port_value"], 15001);
    assert_eq!(find(&v, "0.0.0.0_9080")["bind_to_port"], false);
    // STRICT in bookinfo: port 9080 accepts TLS only, and so do undeclared ports.
    let inbound = find(&v, "virtualInbound");
    let chains: Vec<&str> = inbound["filter_chains"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["name"].as_str().unwrap())
        .collect();
    assert_eq!(
        chains,
        vec!["inbound|9080||-tls", "virtualInbound-catchall-tls"]
    );

    // PERMISSIVE (no policy) in data: both, and the TCP service listens by VIP.
    let v = golden("nc", &ctx, &proxy("10.1.1.30", "nc-0", "data"));
    let inbound = find(&v, "virtualInbound");
    let chains: Vec<&str> = inbound["filter_chains"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["name"].as_str().unwrap())
        .collect();
    assert_eq!(
        chains,
        vec![
            "inbound|5000||-tls",
            "inbound|5000||",
            "virtualInbound-catchall-tls",
            "virtualInbound-catchall"
        ]
    );
    let tcp = find(&v, "10.96.1.30_5000");
    assert_eq!(
        tcp["filter_chains"][0]["filters"][1]["typed_config"]["cluster"],
        "outbound|5000||nc.data.svc.cluster.local"
    );
    // Istio's stats filter before the TCP proxy, on both sides; inbound, after Istio's TCP
    // metadata exchange, which outbound is a filter of the cluster.
    assert_eq!(tcp["filter_chains"][0]["filters"][0]["name"], "istio.stats");
    for chain in inbound["filter_chains"].as_array().unwrap() {
        let exchange = &chain["filters"][0];
        assert_eq!(exchange["name"], "istio.metadata_exchange", "{chain}");
        assert_eq!(
            exchange["typed_config"]["type_url"],
            "type.googleapis.com/envoy.tcp.metadataexchange.config.MetadataExchange"
        );
        assert_eq!(
            exchange["typed_config"]["value"]["protocol"],
            "istio-peer-exchange"
        );
        assert_eq!(chain["filters"][1]["name"], "istio.stats", "{chain}");
    }
}

#[test]
fn sidecar_default_endpoint_goes_to_localhost_and_headless_is_original_dst() {
    let ctx = context();
    let v = golden("nc", &ctx, &proxy("10.1.1.30", "nc-0", "data"));
    let clusters = v["clusters"].as_array().unwrap();
    let inbound = clusters
        .iter()
        .find(|c| c["name"] == "inbound|5000||")
        .unwrap();
    assert_eq!(inbound["type"], "STATIC");
    let addr = &inbound["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"]
        ["socket_address"];
    assert_eq!(addr["address"], "127.0.0.1");
    let db = clusters
        .iter()
        .find(|c| c["name"] == "outbound|5432||db.data.svc.cluster.local")
        .unwrap();
    assert_eq!(db["type"], "ORIGINAL_DST");
}

#[test]
fn localhost_mode_sends_inbound_to_loopback() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/testdata");
    let loaded = Loader::default().load_paths(&[dir.join("mesh.yaml")]);
    let snapshot: Snapshot = loaded.resources.into_iter().collect();
    // PILOT_ENABLE_INBOUND_PASSTHROUGH=false (seeds 000-001).
    let ctx = PushContext::new(
        snapshot,
        MeshConfig::default(),
        "cluster.local",
        Some(false),
    );
    let p = proxy("10.1.0.10", "productpage-v1-0", "bookinfo");
    let c = cluster_named(&ctx, &p, "inbound|9080||");
    let v = to_json(&c).unwrap();
    assert_eq!(v["type"], "STATIC");
    assert_eq!(
        v["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"]["socket_address"]
            ["address"],
        "127.0.0.1"
    );
}

/// The mesh of `testdata/mesh.yaml` with `extra` documents added.
fn context_with(extra: &str) -> PushContext {
    context_with_mesh(extra, MeshConfig::default())
}

fn context_with_mesh(extra: &str, mesh: MeshConfig) -> PushContext {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/testdata");
    let mut loaded = Loader::default().load_paths(&[dir.join("mesh.yaml")]);
    loaded
        .resources
        .extend(Loader::default().load_str("extra.yaml", extra).resources);
    let snapshot: Snapshot = loaded.resources.into_iter().collect();
    PushContext::new(snapshot, mesh, "cluster.local", None)
}

#[test]
fn the_outbound_epoch_moves_unless_only_endpoints_changed() {
    let base = context();
    let pod = |name: &str, ip: &str, sa: &str| {
        format!(
            "apiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: bookinfo, labels: {{app: reviews, version: v1, security.istio.io/tlsMode: istio}}}}\nspec: {{serviceAccountName: {sa}, containers: [{{name: app, image: app, ports: [{{name: web, containerPort: 9081}}]}}]}}\nstatus: {{podIP: {ip}, conditions: [{{type: Ready, status: \"True\"}}]}}\n"
        )
    };
    let sa = base
        .registry
        .services
        .iter()
        .find(|s| s.name == "reviews")
        .and_then(|s| s.endpoints.first())
        .map(|e| e.service_account.clone())
        .expect("reviews has an endpoint");
    // Another reviews pod with the same identity: endpoints only.
    let mut same = context_with(&pod("reviews-extra", "10.1.9.9", &sa));
    same.follow(&base);
    assert_eq!(same.outbound_epoch, base.outbound_epoch);
    assert_ne!(
        isthmus_pilot::endpoint::endpoints(&same, &proxy("10.1.0.1", "x", "bookinfo"), &[]),
        isthmus_pilot::endpoint::endpoints(&base, &proxy("10.1.0.1", "x", "bookinfo"), &[]),
    );
    // A new identity changes the clusters' SANs.
    let mut other_sa = context_with(&pod("reviews-extra", "10.1.9.9", "someone-else"));
    other_sa.follow(&base);
    assert_eq!(other_sa.outbound_epoch, base.outbound_epoch + 1);
    // Config beside the pods.
    let mut new_service = context_with(
        "apiVersion: v1\nkind: Service\nmetadata: {name: extra, namespace: bookinfo}\nspec: {ports: [{name: http, port: 80}]}\n",
    );
    new_service.follow(&base);
    assert_eq!(new_service.outbound_epoch, base.outbound_epoch + 1);
}

#[test]
fn a_sidecar_scopes_egress_by_host_and_port_and_sets_the_outbound_policy() {
    let ctx = context_with(
        "apiVersion: v1\nkind: Service\nmetadata: {name: multi, namespace: scoped}\nspec:\n  clusterIP: 10.96.9.9\n  ports: [{name: http-a, port: 80}, {name: http-b, port: 8080}]\n---\napiVersion: networking.istio.io/v1\nkind: Sidecar\nmetadata: {name: default, namespace: scoped}\nspec:\n  outboundTrafficPolicy: {mode: REGISTRY_ONLY}\n  egress:\n  - port: {number: 8080, protocol: HTTP, name: http}\n    hosts: [./multi.scoped.svc.cluster.local]\n  - hosts: [istio-system/*]\n",
    );
    let names = |ns: &str| -> Vec<String> {
        isthmus_pilot::cluster::clusters(&ctx, &proxy("10.9.0.1", "x", ns))
            .into_iter()
            .map(|c| c.name)
            .collect()
    };
    let scoped = names("scoped");
    assert!(
        scoped.contains(&"outbound|8080||multi.scoped.svc.cluster.local".to_string()),
        "{scoped:?}"
    );
    assert!(
        !scoped.contains(&"outbound|80||multi.scoped.svc.cluster.local".to_string()),
        "port 80 is not imported: {scoped:?}"
    );
    assert!(!scoped.iter().any(|n| n.contains("bookinfo")), "{scoped:?}");
    let elsewhere = names("bookinfo");
    assert!(elsewhere.contains(&"outbound|80||multi.scoped.svc.cluster.local".to_string()));

    // REGISTRY_ONLY from the Sidecar: unknown destinations go nowhere, for its proxies only.
    let catch_all = |ns: &str| {
        let l = isthmus_pilot::listener::listeners(&ctx, &proxy("10.9.0.1", "x", ns))
            .into_iter()
            .find(|l| l.name == "virtualOutbound")
            .expect("virtualOutbound");
        to_json(&l).unwrap().to_string()
    };
    assert!(catch_all("scoped").contains("BlackHoleCluster"));
    assert!(catch_all("bookinfo").contains("PassthroughCluster"));
    let routes = isthmus_pilot::route::routes(&ctx, &proxy("10.9.0.1", "x", "scoped"), &[]);
    let r8080 = routes
        .iter()
        .find(|r| r.name == "8080")
        .expect("route 8080");
    assert!(r8080.virtual_hosts.iter().any(|v| v.name == "block_all"));
    assert!(
        !routes.iter().any(|r| r.name == "80"),
        "no route for port 80"
    );
}

#[test]
fn mirrors_become_request_mirror_policies_with_their_share() {
    let ctx = context_with(
        "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: pp, namespace: bookinfo}\nspec:\n  hosts: [productpage]\n  http:\n  - route:\n    - destination: {host: productpage}\n    mirror: {host: reviews, subset: v2}\n    mirrorPercentage: {value: 25.0}\n",
    );
    let routes = isthmus_pilot::route::routes(&ctx, &proxy("10.1.0.9", "x", "bookinfo"), &[]);
    let json = routes
        .iter()
        .map(|r| to_json(r).unwrap().to_string())
        .collect::<String>();
    assert!(
        json.contains("\"request_mirror_policies\":[{\"cluster\":\"outbound|9080|v2|reviews.bookinfo.svc.cluster.local\",\"runtime_fraction\":{\"default_value\":{\"denominator\":\"MILLION\",\"numerator\":250000}"),
        "{json}"
    );
}

#[test]
fn consistent_hash_sets_ring_hash_and_the_routes_hash_policy() {
    let ctx = context_with(
        "apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {name: pp, namespace: bookinfo}\nspec:\n  host: productpage\n  trafficPolicy:\n    loadBalancer:\n      consistentHash: {httpHeaderName: x-user}\n",
    );
    let p = proxy("10.1.0.9", "x", "bookinfo");
    let cluster = cluster_named(
        &ctx,
        &p,
        "outbound|9080||productpage.bookinfo.svc.cluster.local",
    );
    assert_eq!(
        cluster.lb_policy,
        envoy_types::pb::envoy::config::cluster::v3::cluster::LbPolicy::RingHash as i32
    );
    let json: String = isthmus_pilot::route::routes(&ctx, &p, &["9080".to_string()])
        .iter()
        .map(|r| to_json(r).unwrap().to_string())
        .collect();
    assert!(
        json.contains("\"hash_policy\":[{\"header\":{\"header_name\":\"x-user\"}}]"),
        "{json}"
    );
}

#[test]
fn http_connection_pool_limits_become_protocol_options() {
    let ctx = context_with(
        "apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {name: pp, namespace: bookinfo}\nspec:\n  host: productpage\n  trafficPolicy:\n    connectionPool:\n      http: {maxRequestsPerConnection: 1, idleTimeout: 30s}\n",
    );
    let cluster = cluster_named(
        &ctx,
        &proxy("10.1.0.9", "x", "bookinfo"),
        "outbound|9080||productpage.bookinfo.svc.cluster.local",
    );
    let json = to_json(&cluster).unwrap().to_string();
    assert!(
        json.contains("\"common_http_protocol_options\":{\"idle_timeout\":\"30s\",\"max_requests_per_connection\":1}"),
        "{json}"
    );
}

/// Istio's upstream HTTP version: HTTP/2 for gRPC and HTTP/2 ports or when `h2UpgradePolicy`
/// upgrades (the DestinationRule's, else the mesh's, whose default does not), the request's own
/// version on sniffed ports, with `useClientProtocol` and to passthrough destinations, HTTP/1.1
/// otherwise.
#[test]
fn the_upstream_http_version_follows_the_port_and_the_h2_upgrade_policy() {
    let extra = "apiVersion: v1\nkind: Service\nmetadata: {name: web, namespace: proto}\nspec:\n  clusterIP: 10.96.7.1\n  selector: {app: web}\n  ports: [{name: http, port: 80}, {name: grpc-api, port: 90}, {port: 100}]\n---\napiVersion: v1\nkind: Pod\nmetadata: {name: web-0, namespace: proto, labels: {app: web, security.istio.io/tlsMode: istio}}\nspec: {containers: [{name: app, image: app}]}\nstatus: {podIP: 10.7.0.5, conditions: [{type: Ready, status: \"True\"}]}\n---\napiVersion: v1\nkind: Service\nmetadata: {name: up, namespace: proto}\nspec: {clusterIP: 10.96.7.2, ports: [{name: http, port: 80}]}\n---\napiVersion: v1\nkind: Service\nmetadata: {name: keep, namespace: proto}\nspec: {clusterIP: 10.96.7.3, ports: [{name: http, port: 80}]}\n---\napiVersion: v1\nkind: Service\nmetadata: {name: client, namespace: proto}\nspec: {clusterIP: 10.96.7.4, ports: [{name: http, port: 80}]}\n---\napiVersion: networking.istio.io/v1beta1\nkind: DestinationRule\nmetadata: {name: up, namespace: proto}\nspec: {host: up, trafficPolicy: {connectionPool: {http: {h2UpgradePolicy: UPGRADE}}}}\n---\napiVersion: networking.istio.io/v1beta1\nkind: DestinationRule\nmetadata: {name: keep, namespace: proto}\nspec: {host: keep, trafficPolicy: {connectionPool: {http: {h2UpgradePolicy: DO_NOT_UPGRADE}}}}\n---\napiVersion: networking.istio.io/v1beta1\nkind: DestinationRule\nmetadata: {name: client, namespace: proto}\nspec: {host: client, trafficPolicy: {connectionPool: {http: {useClientProtocol: true}}}}\n";
    let versions = |ctx: &PushContext| -> Vec<(String, &'static str)> {
        isthmus_pilot::cluster::clusters(ctx, &proxy("10.7.0.5", "web-0", "proto"))
            .into_iter()
            .filter(|c| {
                c.name.contains("proto.svc")
                    || c.name.starts_with("inbound|")
                    || c.name.ends_with("PassthroughCluster")
            })
            .map(|c| {
                let json = to_json(&c).unwrap().to_string();
                let h2 = json.contains("\"explicit_http_config\":{\"http2_protocol_options\"");
                // A cluster that speaks HTTP/2 over mesh mTLS offers it in ALPN, as Istio's,
                // and every outbound cluster has Istio's TCP metadata exchange.
                if c.name.starts_with("outbound|") {
                    assert!(
                        json.contains("\"filters\":[{\"name\":\"istio.metadata_exchange\""),
                        "{json}"
                    );
                    assert_eq!(
                        h2,
                        json.contains(
                            "\"alpn_protocols\":[\"istio-peer-exchange\",\"istio\",\"h2\"]"
                        ),
                        "{json}"
                    );
                }
                let version = if h2 {
                    "h2"
                } else if json.contains("\"use_downstream_protocol_config\"") {
                    "downstream"
                } else {
                    assert!(!json.contains("protocol_options\":{\"@type"), "{json}");
                    "http/1.1"
                };
                (c.name, version)
            })
            .collect()
    };
    // Cluster, then its version with the mesh's default and with `h2UpgradePolicy: UPGRADE`
    // mesh-wide: inbound to the app, and sniffed ports, are never upgraded.
    let want = [
        ("InboundPassthroughCluster", "downstream", "downstream"),
        ("PassthroughCluster", "downstream", "downstream"),
        ("inbound|100||", "downstream", "downstream"),
        ("inbound|80||", "http/1.1", "http/1.1"),
        ("inbound|90||", "h2", "h2"),
        (
            "outbound|100||web.proto.svc.cluster.local",
            "downstream",
            "downstream",
        ),
        (
            "outbound|80||client.proto.svc.cluster.local",
            "downstream",
            "downstream",
        ),
        (
            "outbound|80||keep.proto.svc.cluster.local",
            "http/1.1",
            "http/1.1",
        ),
        ("outbound|80||up.proto.svc.cluster.local", "h2", "h2"),
        ("outbound|80||web.proto.svc.cluster.local", "http/1.1", "h2"),
        ("outbound|90||web.proto.svc.cluster.local", "h2", "h2"),
    ];
    let upgrade = MeshConfig {
        h2_upgrade_policy: Some("UPGRADE".into()),
        ..Default::default()
    };
    for (mesh, column) in [(MeshConfig::default(), 1), (upgrade, 2)] {
        let mut got = versions(&context_with_mesh(extra, mesh));
        got.sort();
        let expected: Vec<(String, &str)> = want
            .iter()
            .map(|w| (w.0.to_string(), if column == 1 { w.1 } else { w.2 }))
            .collect();
        assert_eq!(got, expected, "column {column}");
    }
}

#[test]
fn outlier_detection_prioritizes_endpoints_by_the_proxys_locality() {
    let pod = |name: &str, app: &str, ip: &str, locality: &str| {
        format!(
            "---\napiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: loc, labels: {{app: {app}, istio-locality: {locality}}}}}\nspec: {{containers: [{{name: app, image: app}}]}}\nstatus: {{podIP: {ip}, conditions: [{{type: Ready, status: \"True\"}}]}}\n"
        )
    };
    let mesh = |dr: &str| {
        format!(
            "apiVersion: v1\nkind: Service\nmetadata: {{name: svc, namespace: loc}}\nspec:\n  clusterIP: 10.96.7.7\n  selector: {{app: svc}}\n  ports: [{{name: http, port: 80}}]\n{}{}{}{}{dr}",
            pod("near", "svc", "10.7.0.1", "r1.z1"),
            pod("same-region", "svc", "10.7.0.2", "r1.z2"),
            pod("far", "svc", "10.7.0.3", "r2.z9"),
            pod("client", "client", "10.7.0.9", "r1.z1"),
        )
    };
    let dr = "---\napiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {name: svc, namespace: loc}\nspec:\n  host: svc\n  trafficPolicy:\n    outlierDetection: {consecutive5xxErrors: 1}\n";
    let priorities = |ctx: &PushContext| -> Vec<(String, u32)> {
        let client = proxy("10.7.0.9", "client", "loc");
        let cla = isthmus_pilot::endpoint::endpoints(ctx, &client, &[])
            .into_iter()
            .find(|a| a.cluster_name == "outbound|80||svc.loc.svc.cluster.local")
            .expect("assignment");
        let mut out: Vec<(String, u32)> = cla
            .endpoints
            .iter()
            .map(|l| {
                let loc = l.locality.as_ref().unwrap();
                (format!("{}/{}", loc.region, loc.zone), l.priority)
            })
            .collect();
        out.sort();
        out
    };
    assert_eq!(
        priorities(&context_with(&mesh(dr))),
        [
            ("r1/z1".to_string(), 0),
            ("r1/z2".to_string(), 2),
            ("r2/z9".to_string(), 3)
        ]
    );
    // Without outlier detection nothing is prioritized, as in Istio.
    assert!(
        priorities(&context_with(&mesh("")))
            .iter()
            .all(|(_, p)| *p == 0)
    );
}

#[test]
fn source_ip_hashing_reaches_the_tcp_proxy() {
    let ctx = context_with(
        "apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {name: nc, namespace: data}\nspec:\n  host: nc\n  trafficPolicy:\n    loadBalancer:\n      consistentHash: {useSourceIp: true}\n",
    );
    let json: String = isthmus_pilot::listener::listeners(&ctx, &proxy("10.9.0.1", "x", "data"))
        .iter()
        .filter(|l| l.name.ends_with("_5000"))
        .map(|l| to_json(l).unwrap().to_string())
        .collect();
    assert!(
        json.contains("\"hash_policy\":[{\"source_ip\":{}}]"),
        "{json}"
    );
}

/// Istio's TCP traffic shifting: a VirtualService's `tcp` routes, first applicable one wins,
/// `sourceLabels` per workload, the port's own cluster when none applies.
/// The `tcp_proxy` of the outbound listener of `nc:5000` (a TCP service of the test mesh).
fn nc_tcp_proxy(ctx: &PushContext, p: &Proxy) -> serde_json::Value {
    let l = isthmus_pilot::listener::listeners(ctx, p)
        .into_iter()
        .find(|l| l.name == "10.96.1.30_5000")
        .expect("nc's listener");
    let json = to_json(&l).unwrap();
    json["filter_chains"][0]["filters"]
        .as_array()
        .unwrap()
        .iter()
        .find(|f| f["name"] == "envoy.filters.network.tcp_proxy")
        .expect("tcp_proxy")["typed_config"]
        .clone()
}

#[test]
fn tcp_routes_shift_connections_by_weight_and_source() {
    let vs = |matches: &str| {
        format!(
            "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {{name: nc, namespace: data}}\nspec:\n  hosts: [nc]\n  tcp:\n  - match: [{{port: 5000, sourceLabels: {{app: productpage}}}}]\n    route: [{{destination: {{host: nc, subset: v2}}}}]\n  - match: [{matches}]\n    route:\n    - {{destination: {{host: nc, subset: v1}}, weight: 80}}\n    - {{destination: {{host: nc.data.svc.cluster.local, subset: v2}}, weight: 20}}\n    - {{destination: {{host: nc, subset: v3}}, weight: 0}}\n"
        )
    };
    let ctx = context_with(&vs("{port: 5000, destinationSubnets: [10.96.0.0/16]}"));
    let other = proxy("10.9.0.1", "x", "data");
    let tp = nc_tcp_proxy(&ctx, &other);
    assert_eq!(
        tp["weighted_clusters"]["clusters"],
        serde_json::json!([
            {"name": "outbound|5000|v1|nc.data.svc.cluster.local", "weight": 80},
            {"name": "outbound|5000|v2|nc.data.svc.cluster.local", "weight": 20},
        ]),
        "{tp}"
    );
    assert_eq!(
        tp["stat_prefix"],
        "outbound|5000||nc.data.svc.cluster.local"
    );
    // The productpage workload is the route's source: all its connections to v2.
    let productpage = proxy("10.1.0.10", "productpage-v1-0", "bookinfo");
    let tp = nc_tcp_proxy(&ctx, &productpage);
    assert_eq!(
        tp["cluster"], "outbound|5000|v2|nc.data.svc.cluster.local",
        "{tp}"
    );
    // Its scope says so: its namespace's other proxies do not share its listeners.
    let scope = |p: &Proxy| ctx.scope(p);
    assert_ne!(
        scope(&productpage),
        scope(&proxy("10.9.0.2", "y", "bookinfo"))
    );
    // Matches for another port or another subnet leave the port's own cluster.
    for other_match in ["{port: 6000}", "{destinationSubnets: [192.168.0.0/16]}"] {
        let ctx = context_with(&vs(other_match));
        let tp = nc_tcp_proxy(&ctx, &other);
        assert_eq!(
            tp["cluster"], "outbound|5000||nc.data.svc.cluster.local",
            "{other_match}: {tp}"
        );
    }
}

/// TLS ports, as Istio's: external HTTPS hosts without addresses share `0.0.0.0_443` and are
/// told apart by SNI, other names passing through; a VirtualService's `tls` routes send each
/// SNI they name to their destinations.
#[test]
fn tls_ports_route_by_sni() {
    let ctx = context_with(
        "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {name: github, namespace: data}\nspec:\n  hosts: [api.github.com]\n  ports: [{number: 443, name: https, protocol: HTTPS}]\n  resolution: DNS\n  location: MESH_EXTERNAL\n---\napiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {name: google, namespace: data}\nspec:\n  hosts: [www.google.com]\n  ports: [{number: 443, name: tls, protocol: TLS}]\n  resolution: DNS\n  location: MESH_EXTERNAL\n---\napiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {name: tenants, namespace: data}\nspec:\n  hosts: [tenants.internal]\n  addresses: [10.96.9.9]\n  ports: [{number: 8443, name: tls, protocol: TLS}]\n  resolution: STATIC\n  endpoints: [{address: 10.2.0.1, labels: {tenant: a}}, {address: 10.2.0.2, labels: {tenant: b}}]\n---\napiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: tenants, namespace: data}\nspec:\n  hosts: [tenants.internal]\n  tls:\n  - match: [{port: 8443, sniHosts: [a.tenants.internal]}, {port: 9999, sniHosts: [x.tenants.internal]}]\n    route: [{destination: {host: tenants.internal, subset: a}}]\n  - match: [{sniHosts: [\"*.tenants.internal\"]}, {sniHosts: [a.tenants.internal]}]\n    route:\n    - {destination: {host: tenants.internal, subset: a}, weight: 50}\n    - {destination: {host: tenants.internal, subset: b}, weight: 50}\n",
    );
    let listeners: Vec<serde_json::Value> =
        isthmus_pilot::listener::listeners(&ctx, &proxy("10.9.0.1", "x", "data"))
            .iter()
            .map(|l| to_json(l).unwrap())
            .collect();
    let find = |name: &str| {
        listeners
            .iter()
            .find(|l| l["name"] == name)
            .unwrap_or_else(|| panic!("no listener {name}"))
    };
    let tcp_proxy = |chain: &serde_json::Value| {
        chain["filters"]
            .as_array()
            .unwrap()
            .iter()
            .find(|f| f["name"] == "envoy.filters.network.tcp_proxy")
            .expect("tcp_proxy")["typed_config"]
            .clone()
    };
    let shared = find("0.0.0.0_443");
    assert_eq!(
        shared["listener_filters"][0]["name"],
        "envoy.filters.listener.tls_inspector"
    );
    let by_sni: Vec<(serde_json::Value, serde_json::Value)> = shared["filter_chains"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            (
                c["filter_chain_match"]["server_names"].clone(),
                tcp_proxy(c)["cluster"].clone(),
            )
        })
        .collect();
    assert_eq!(
        by_sni,
        [
            (
                serde_json::json!(["api.github.com"]),
                serde_json::json!("outbound|443||api.github.com")
            ),
            (
                serde_json::json!(["www.google.com"]),
                serde_json::json!("outbound|443||www.google.com")
            ),
        ],
        "{shared}"
    );
    // Other names pass through, counted by Istio's stats filter as every chain.
    assert_eq!(
        tcp_proxy(&shared["default_filter_chain"])["cluster"],
        "PassthroughCluster"
    );
    assert_eq!(
        shared["default_filter_chain"]["filters"][0]["name"],
        "istio.stats"
    );
    // The VirtualService's routes: one chain per applicable match, the first of a name wins.
    let tenants = find("10.96.9.9_8443");
    let chains = tenants["filter_chains"].as_array().unwrap();
    assert_eq!(chains.len(), 2, "{tenants}");
    assert_eq!(
        chains[0]["filter_chain_match"]["server_names"],
        serde_json::json!(["a.tenants.internal"])
    );
    assert_eq!(
        tcp_proxy(&chains[0])["cluster"],
        "outbound|8443|a|tenants.internal"
    );
    assert_eq!(
        chains[1]["filter_chain_match"]["server_names"],
        serde_json::json!(["*.tenants.internal"])
    );
    assert_eq!(
        tcp_proxy(&chains[1])["weighted_clusters"]["clusters"],
        serde_json::json!([
            {"name": "outbound|8443|a|tenants.internal", "weight": 50},
            {"name": "outbound|8443|b|tenants.internal", "weight": 50},
        ])
    );
    assert!(tenants.get("default_filter_chain").is_none(), "{tenants}");
}

/// The routes of productpage's virtual host for a reviews-v1 sidecar, with a VirtualService
/// for productpage whose `http` routes are `http` (YAML, as the list's items).
fn productpage_vs_routes(http: &str) -> serde_json::Value {
    let ctx = context_with(&format!(
        "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {{name: productpage, namespace: bookinfo}}\nspec:\n  hosts: [productpage]\n  http:\n{http}"
    ));
    productpage_routes(&ctx, &proxy("10.1.0.11", "reviews-v1-0", "bookinfo"))
}

/// The routes of productpage's virtual host in a proxy's route configuration of port 9080.
fn productpage_routes(ctx: &PushContext, p: &Proxy) -> serde_json::Value {
    let routes = isthmus_pilot::route::routes(ctx, p, &["9080".to_string()]);
    let json = to_json(&routes[0]).unwrap();
    json["virtual_hosts"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["name"] == "productpage.bookinfo.svc.cluster.local:9080")
        .expect("productpage's virtual host")["routes"]
        .clone()
}

/// A DestinationRule's `ISTIO_MUTUAL` with its own `sni` and `subjectAltNames`: Istio's mTLS
/// with those instead of the derived ones.
#[test]
fn istio_mutual_takes_the_rules_sni_and_subject_alt_names() {
    let ctx = context_with(
        "apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {name: nc, namespace: data}\nspec:\n  host: nc\n  trafficPolicy:\n    tls: {mode: ISTIO_MUTUAL, sni: nc.internal, subjectAltNames: [\"spiffe://cluster.local/ns/data/sa/nc-server\"]}\n",
    );
    let cluster = cluster_named(
        &ctx,
        &proxy("10.9.0.1", "x", "data"),
        "outbound|5000||nc.data.svc.cluster.local",
    );
    let json = to_json(&cluster).unwrap();
    let tls = &json["transport_socket"]["typed_config"];
    assert_eq!(tls["sni"], "nc.internal", "{json}");
    let text = tls.to_string();
    assert!(
        text.contains("spiffe://cluster.local/ns/data/sa/nc-server")
            && text.contains("istio-peer-exchange"),
        "{text}"
    );
}

/// Istio's one Envoy route per match of a VirtualService route (its matches are alternatives),
/// named after the route and the match.
#[test]
fn each_match_of_a_route_is_a_route() {
    let routes = productpage_vs_routes(
        "  - name: app\n    match:\n    - {name: exact, uri: {exact: /productpage}}\n    - uri: {prefix: /static}\n    - {uri: {prefix: /elsewhere}, port: 7070}\n    route: [{destination: {host: productpage, subset: v1}}]\n  - name: rest\n    route: [{destination: {host: productpage}}]\n",
    );
    let summary: Vec<(String, serde_json::Value, String)> = routes
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            (
                r["name"].as_str().unwrap_or_default().to_string(),
                r["match"].clone(),
                r["route"]["cluster"]
                    .as_str()
                    .unwrap_or_default()
                    .to_string(),
            )
        })
        .collect();
    let v1 = "outbound|9080|v1|productpage.bookinfo.svc.cluster.local".to_string();
    assert_eq!(
        summary,
        [
            (
                "app.exact".into(),
                serde_json::json!({"path": "/productpage"}),
                v1.clone()
            ),
            ("app".into(), serde_json::json!({"prefix": "/static"}), v1),
            (
                "rest".into(),
                serde_json::json!({"prefix": "/"}),
                "outbound|9080||productpage.bookinfo.svc.cluster.local".into()
            ),
        ]
    );
}

/// A VirtualService's `headers`: `set` replaces, `add` appends, `remove` removes, the route's
/// and its one destination's together.
#[test]
fn virtual_service_headers_become_route_header_operations() {
    let route = productpage_vs_routes("  - headers:\n      request: {set: {x-a: \"1\"}, remove: [x-b]}\n      response: {add: {x-c: \"3\"}, remove: [server]}\n    route:\n    - destination: {host: productpage}\n      headers: {request: {add: {x-d: \"4\"}}}\n    rewrite: {uriRegexRewrite: {match: \"^/a/(.*)$\", rewrite: \"/b/\\\\1\"}}\n")[0].clone();
    assert_eq!(
        route["request_headers_to_add"],
        serde_json::json!([
            {"header": {"key": "x-a", "value": "1"}, "append_action": "OVERWRITE_IF_EXISTS_OR_ADD"},
            {"header": {"key": "x-d", "value": "4"}},
        ]),
        "{route}"
    );
    assert_eq!(
        route["request_headers_to_remove"],
        serde_json::json!(["x-b"])
    );
    assert_eq!(
        route["response_headers_to_add"],
        serde_json::json!([{"header": {"key": "x-c", "value": "3"}}])
    );
    assert_eq!(
        route["response_headers_to_remove"],
        serde_json::json!(["server"])
    );
    // And `uriRegexRewrite` as Envoy's `regex_rewrite`.
    assert_eq!(
        route["route"]["regex_rewrite"],
        serde_json::json!({"pattern": {"regex": "^/a/(.*)$"}, "substitution": "/b/\\1"}),
        "{route}"
    );
}

/// TCP keepalive on upstream connections: the mesh's `tcpKeepalive`, each field a
/// DestinationRule sets over it; `tcp.maxConnectionDuration` as the cluster's
/// `max_connection_duration` and the TCP proxy's `max_downstream_connection_duration`, and
/// `tcp.idleTimeout` as the TCP proxy's, as Istio writes them.
#[test]
fn tcp_connection_pool_settings_reach_the_cluster_and_the_tcp_proxy() {
    let rule = "apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {name: nc, namespace: data}\nspec:\n  host: nc\n  trafficPolicy:\n    connectionPool:\n      tcp: {maxConnectionDuration: 30m, idleTimeout: 2h, tcpKeepalive: {time: 60s, probes: 5}}\n";
    let mesh: MeshConfig = serde_json::from_value(
        serde_json::json!({"tcpKeepalive": {"time": "600s", "interval": "20s"}}),
    )
    .unwrap();
    let p = proxy("10.9.0.1", "x", "data");
    let name = "outbound|5000||nc.data.svc.cluster.local";
    let cluster = to_json(&cluster_named(
        &context_with_mesh(rule, mesh.clone()),
        &p,
        name,
    ))
    .unwrap();
    assert_eq!(
        cluster["upstream_connection_options"],
        serde_json::json!({"tcp_keepalive": {"keepalive_probes": 5, "keepalive_time": 60, "keepalive_interval": 20}}),
        "{cluster}"
    );
    assert_eq!(
        cluster["typed_extension_protocol_options"]["envoy.extensions.upstreams.http.v3.HttpProtocolOptions"]
            ["common_http_protocol_options"]["max_connection_duration"],
        "1800s",
        "{cluster}"
    );
    // The mesh's alone, and none without either.
    let mesh_only = to_json(&cluster_named(&context_with_mesh("", mesh), &p, name)).unwrap();
    assert_eq!(
        mesh_only["upstream_connection_options"],
        serde_json::json!({"tcp_keepalive": {"keepalive_time": 600, "keepalive_interval": 20}})
    );
    let neither = to_json(&cluster_named(&context(), &p, name)).unwrap();
    assert!(
        neither.get("upstream_connection_options").is_none(),
        "{neither}"
    );
    // The idle timeout of connections to the service, and Envoy's hour without one.
    assert_eq!(
        nc_tcp_proxy(&context_with(rule), &p)["idle_timeout"],
        "7200s"
    );
    assert!(nc_tcp_proxy(&context(), &p).get("idle_timeout").is_none());
    // The longest life of a connection to it.
    assert_eq!(
        nc_tcp_proxy(&context_with(rule), &p)["max_downstream_connection_duration"],
        "1800s"
    );
    // A proxy's own `IDLE_TIMEOUT` (ISTIO_META_IDLE_TIMEOUT) on every TCP proxy it has,
    // inbound, outbound and passthrough; the rule's over it.
    let meta = NodeMetadata {
        idle_timeout: Some("30m".into()),
        ..Default::default()
    };
    let own = proxy_with_metadata("10.9.0.1", "x", "data", &meta);
    assert_eq!(
        nc_tcp_proxy(&context_with(rule), &own)["idle_timeout"],
        "7200s"
    );
    let listeners: Vec<serde_json::Value> = isthmus_pilot::listener::listeners(&context(), &own)
        .iter()
        .map(|l| to_json(l).unwrap())
        .collect();
    let mut tcp_proxies = Vec::new();
    collect_typed(
        &serde_json::Value::Array(listeners),
        "TcpProxy",
        &mut tcp_proxies,
    );
    assert!(tcp_proxies.len() > 3, "{tcp_proxies:?}");
    for tp in &tcp_proxies {
        assert_eq!(tp["idle_timeout"], "1800s", "{tp}");
    }
}

/// Every `typed_config` under `v` whose type name ends with `kind`.
fn collect_typed(v: &serde_json::Value, kind: &str, out: &mut Vec<serde_json::Value>) {
    match v {
        serde_json::Value::Object(m) => {
            if m.get("@type")
                .and_then(|t| t.as_str())
                .is_some_and(|t| t.ends_with(kind))
            {
                out.push(v.clone());
            }
            m.values().for_each(|x| collect_typed(x, kind, out));
        }
        serde_json::Value::Array(a) => a.iter().for_each(|x| collect_typed(x, kind, out)),
        _ => {}
    }
}

/// The destinations of a split carry their own header operations on their weighted clusters;
/// an `:authority` or `host` set becomes a host rewrite, and no pseudo-header reaches Envoy's
/// header lists (it refuses them), as Istio's.
#[test]
fn split_destinations_carry_their_headers_and_authority_is_a_host_rewrite() {
    let route = productpage_vs_routes("  - headers: {request: {set: {\":authority\": pp.internal, x-a: \"1\"}}}\n    route:\n    - destination: {host: productpage}\n      weight: 80\n      headers: {request: {set: {x-dest: pp}, remove: [x-b]}, response: {add: {x-from: pp}}}\n    - destination: {host: details}\n      weight: 20\n      headers: {request: {set: {host: details.internal}}}\n")[0].clone();
    assert_eq!(
        route["route"]["host_rewrite_literal"], "pp.internal",
        "{route}"
    );
    assert_eq!(
        route["request_headers_to_add"],
        serde_json::json!([{"header": {"key": "x-a", "value": "1"}, "append_action": "OVERWRITE_IF_EXISTS_OR_ADD"}]),
        "{route}"
    );
    assert_eq!(
        route["route"]["weighted_clusters"]["clusters"],
        serde_json::json!([
            {
                "name": "outbound|9080||productpage.bookinfo.svc.cluster.local",
                "weight": 80,
                "request_headers_to_add": [{"header": {"key": "x-dest", "value": "pp"}, "append_action": "OVERWRITE_IF_EXISTS_OR_ADD"}],
                "request_headers_to_remove": ["x-b"],
                "response_headers_to_add": [{"header": {"key": "x-from", "value": "pp"}}],
            },
            {
                "name": "outbound|9080||details.bookinfo.svc.cluster.local",
                "weight": 20,
                "host_rewrite_literal": "details.internal",
            },
        ]),
        "{route}"
    );
}

/// A VirtualService redirect's `scheme` and `derivePort`: Envoy's scheme redirect, and the
/// listener's port for `FROM_REQUEST_PORT` (Envoy's default, the protocol's, otherwise).
#[test]
fn redirects_carry_their_scheme_and_derived_port() {
    let routes = productpage_vs_routes(
        "  - match: [{uri: {prefix: /keep}}]\n    redirect: {scheme: https, derivePort: FROM_REQUEST_PORT}\n  - redirect: {scheme: https, authority: secure.example, redirectCode: 308}\n",
    );
    assert_eq!(
        routes[0]["redirect"],
        serde_json::json!({"scheme_redirect": "https", "port_redirect": 9080}),
        "{routes}"
    );
    assert_eq!(
        routes[1]["redirect"],
        serde_json::json!({"scheme_redirect": "https", "host_redirect": "secure.example", "response_code": "PERMANENT_REDIRECT"}),
        "{routes}"
    );
}

/// A VirtualService `corsPolicy`: Envoy's CORS policy on the route, as Istio writes it, with the
/// CORS filter after the fault filter in the outbound connection manager.
#[test]
fn cors_policies_become_the_routes_cors_filter_configuration() {
    let ctx = context_with(
        "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: productpage, namespace: bookinfo}\nspec:\n  hosts: [productpage]\n  http:\n  - corsPolicy:\n      allowOrigins: [{exact: \"https://app.example.com\"}, {regex: \"https://.*\\\\.example\\\\.org\"}]\n      allowMethods: [GET, POST]\n      allowHeaders: [x-custom, content-type]\n      exposeHeaders: [x-total]\n      maxAge: 24h\n      allowCredentials: true\n      unmatchedPreflights: IGNORE\n    route: [{destination: {host: productpage}}]\n",
    );
    let p = proxy("10.1.0.11", "reviews-v1-0", "bookinfo");
    let route = productpage_routes(&ctx, &p)[0].clone();
    assert_eq!(
        route["typed_per_filter_config"]["envoy.filters.http.cors"],
        serde_json::json!({
            "@type": "type.googleapis.com/envoy.extensions.filters.http.cors.v3.CorsPolicy",
            "allow_origin_string_match": [
                {"exact": "https://app.example.com"},
                {"safe_regex": {"regex": "https://.*\\.example\\.org"}},
            ],
            "allow_methods": "GET,POST",
            "allow_headers": "x-custom,content-type",
            "expose_headers": "x-total",
            "max_age": "86400",
            "allow_credentials": true,
            "filter_enabled": {"default_value": {"numerator": 100}},
            "forward_not_matching_preflights": false,
        }),
        "{route}"
    );
    let listeners = isthmus_pilot::listener::listeners(&ctx, &p);
    let json = to_json(
        listeners
            .iter()
            .find(|l| l.name == "0.0.0.0_9080")
            .expect("the 9080 listener"),
    )
    .unwrap();
    let filters: Vec<&str> = json["filter_chains"][0]["filters"][0]["typed_config"]["http_filters"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["name"].as_str().unwrap())
        .collect();
    assert_eq!(
        filters[..2],
        ["envoy.filters.http.fault", "envoy.filters.http.cors"],
        "{filters:?}"
    );
}

/// HTTP route matches with `sourceLabels` and `sourceNamespace` apply to their sources only.
#[test]
fn http_routes_match_their_sources() {
    let ctx = context_with(
        "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: productpage, namespace: bookinfo}\nspec:\n  hosts: [productpage]\n  http:\n  - name: from-reviews-v2\n    match: [{sourceLabels: {app: reviews, version: v2}}]\n    route: [{destination: {host: productpage, port: {number: 9080}}}]\n    timeout: 3s\n  - name: from-data\n    match: [{sourceNamespace: data}]\n    route: [{destination: {host: productpage}}]\n    timeout: 4s\n  - name: default\n    route: [{destination: {host: productpage}}]\n",
    );
    let route_names = |p: &Proxy| -> Vec<String> {
        productpage_routes(&ctx, p)
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r["name"].as_str().unwrap_or_default().to_string())
            .collect()
    };
    assert_eq!(
        route_names(&proxy("10.1.0.12", "reviews-v2-0", "bookinfo")),
        ["from-reviews-v2", "default"]
    );
    assert_eq!(
        route_names(&proxy("10.1.0.11", "reviews-v1-0", "bookinfo")),
        ["default"]
    );
    assert_eq!(
        route_names(&proxy("10.1.1.30", "nc-0", "data")),
        ["from-data", "default"]
    );
    // A VirtualService with no HTTP route for the sidecar leaves the service's default route.
    let tcp_only = context_with(
        "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: productpage, namespace: bookinfo}\nspec:\n  hosts: [productpage]\n  tcp:\n  - route: [{destination: {host: productpage}}]\n  http:\n  - match: [{port: 7070}]\n    route: [{destination: {host: productpage}}]\n",
    );
    let routes = productpage_routes(&tcp_only, &proxy("10.1.0.11", "reviews-v1-0", "bookinfo"));
    assert_eq!(
        routes[0]["route"]["cluster"], "outbound|9080||productpage.bookinfo.svc.cluster.local",
        "{routes}"
    );
}

#[test]
fn request_authentication_puts_the_jwt_filter_before_rbac_which_matches_its_payload() {
    let ctx = context_with(
        "apiVersion: security.istio.io/v1\nkind: RequestAuthentication\nmetadata: {name: jwt, namespace: bookinfo}\nspec:\n  selector: {matchLabels: {app: productpage}}\n  jwtRules:\n  - issuer: https://auth.example.com\n    jwksUri: https://auth.example.com/jwks.json\n---\napiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: jwt, namespace: bookinfo}\nspec:\n  selector: {matchLabels: {app: productpage}}\n  rules:\n  - from: [{source: {requestPrincipals: [https://auth.example.com/alice]}}]\n",
    );
    let inbound = isthmus_pilot::listener::listeners(
        &ctx,
        &proxy("10.1.0.10", "productpage-v1-0", "bookinfo"),
    )
    .into_iter()
    .find(|l| l.name == "virtualInbound")
    .unwrap();
    let json = to_json(&inbound).unwrap().to_string();
    let jwt = json
        .find("\"envoy.filters.http.jwt_authn\"")
        .expect("a JWT filter");
    let rbac = json
        .find("\"envoy.filters.http.rbac\"")
        .expect("an RBAC filter");
    assert!(jwt < rbac, "authentication runs before authorization");
    // Istio's provider: payload in metadata, the keys inline (not fetched here: none), a
    // missing token allowed and a bad one refused.
    for part in [
        "\"origins-0\"",
        "\"payload_in_metadata\":\"payload\"",
        "\"inline_string\":\"{\\\"keys\\\":[]}\"",
        "\"allow_missing\":{}",
        "\"space_delimited_claims\":[\"permission\",\"scope\"]",
        // `iss/sub` split at the last slash, matched in the payload.
        "\"filter\":\"envoy.filters.http.jwt_authn\",\"path\":[{\"key\":\"payload\"},{\"key\":\"iss\"}],\"value\":{\"string_match\":{\"exact\":\"https://auth.example.com\"}}",
        "{\"key\":\"sub\"}],\"value\":{\"string_match\":{\"exact\":\"alice\"}}",
    ] {
        assert!(json.contains(part), "{part} in {json}");
    }
    // Another workload gets neither.
    let other =
        isthmus_pilot::listener::listeners(&ctx, &proxy("10.1.0.11", "reviews-v1-0", "bookinfo"));
    let other: String = other
        .iter()
        .map(|l| to_json(l).unwrap().to_string())
        .collect();
    assert!(other.contains("\"virtualInbound\"") && !other.contains("jwt_authn"));
}

#[test]
fn a_tproxy_sidecar_connects_to_its_app_from_the_callers_address() {
    let ctx = context();
    let meta = NodeMetadata {
        interception_mode: Some("TPROXY".into()),
        ..Default::default()
    };
    let tproxy = proxy_with_metadata("10.1.0.10", "productpage-v1-0", "bookinfo", &meta);
    let inbound = |p: &Proxy| {
        let l = isthmus_pilot::listener::listeners(&ctx, p)
            .into_iter()
            .find(|l| l.name == "virtualInbound")
            .unwrap();
        to_json(&l).unwrap().to_string()
    };
    let clusters = |p: &Proxy| -> String {
        isthmus_pilot::cluster::inbound_clusters(&ctx, p)
            .iter()
            .map(|c| to_json(c).unwrap().to_string())
            .collect()
    };
    let json = inbound(&tproxy);
    assert!(
        json.contains("\"envoy.filters.listener.original_src\""),
        "{json}"
    );
    assert!(
        json.contains("\"mark\":1337") && json.contains("\"transparent\":true"),
        "{json}"
    );
    assert!(!clusters(&tproxy).contains("127.0.0.6"));
    // REDIRECT (the default) keeps Istio's 127.0.0.6 and no original_src.
    let redirect = proxy("10.1.0.10", "productpage-v1-0", "bookinfo");
    assert!(!inbound(&redirect).contains("original_src"));
    assert!(clusters(&redirect).contains("127.0.0.6"));
}

#[test]
fn in_mesh_metadata_exchange_sends_no_peer_metadata_to_external_services() {
    let loaded = isthmus_config::Loader::default().load_str(
        "external.yaml",
        r#"
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: api, namespace: default}
spec:
  hosts: [api.example.com]
  location: MESH_EXTERNAL
  ports: [{number: 80, name: http, protocol: HTTP}]
  resolution: DNS
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: api, namespace: default}
spec:
  host: api.example.com
  subsets: [{name: v1, labels: {version: v1}}]
"#,
    );
    assert!(loaded.errors().next().is_none(), "{:?}", loaded.diagnostics);
    let ctx = PushContext::new(
        loaded.resources.into_iter().collect(),
        MeshConfig::default(),
        "cluster.local",
        None,
    );
    let proxy_with = |mode: Option<&str>| {
        let meta = NodeMetadata {
            proxy_headers: mode.map(|m| {
                serde_json::from_value(serde_json::json!({"metadataExchangeHeaders": {"mode": m}}))
                    .unwrap()
            }),
            ..NodeMetadata::default()
        };
        proxy_with_metadata("10.0.0.9", "app", "default", &meta)
    };
    // Istio marks the external service's cluster, not its subsets'.
    let clusters: Vec<serde_json::Value> =
        isthmus_pilot::cluster::clusters(&ctx, &proxy_with(None))
            .iter()
            .map(|c| to_json(c).unwrap())
            .collect();
    let external = |name: &str| {
        clusters
            .iter()
            .find(|c| c["name"] == name)
            .map(|c| c["metadata"]["filter_metadata"]["istio"]["external"].clone())
            .unwrap_or_else(|| panic!("no {name}"))
    };
    assert_eq!(external("outbound|80||api.example.com"), true);
    assert_eq!(
        external("outbound|80|v1|api.example.com"),
        serde_json::Value::Null
    );
    // The outbound connection manager carries Istio's peer metadata filter; IN_MESH adds
    // `skip_external_clusters`.
    let propagation = |mode: Option<&str>| {
        let listeners: Vec<serde_json::Value> =
            isthmus_pilot::listener::listeners(&ctx, &proxy_with(mode))
                .iter()
                .map(|l| to_json(l).unwrap())
                .collect();
        let port = listeners
            .iter()
            .find(|l| l["name"] == "0.0.0.0_80")
            .expect("the port's listener");
        let filters = &port["filter_chains"][0]["filters"][0]["typed_config"]["http_filters"];
        let mx = filters
            .as_array()
            .unwrap()
            .iter()
            .find(|f| f["name"] == "istio.metadata_exchange")
            .unwrap_or_else(|| panic!("{filters}"));
        assert_eq!(
            mx["typed_config"]["type_url"],
            "type.googleapis.com/io.istio.http.peer_metadata.Config"
        );
        mx["typed_config"]["value"]["upstream_propagation"].clone()
    };
    assert_eq!(
        propagation(None),
        serde_json::json!([{"istio_headers": {}}])
    );
    assert_eq!(
        propagation(Some("IN_MESH")),
        serde_json::json!([{"istio_headers": {"skip_external_clusters": true}}])
    );
}

#[test]
fn routes_and_clusters_name_the_istio_config_they_come_from() {
    // A VirtualService of namespace `data` for bookinfo's productpage: its short destination
    // `reviews` is data's reviews, as Istio resolves a rule's short names in its own namespace.
    let ctx = context_with(
        "apiVersion: v1\nkind: Service\nmetadata: {name: reviews, namespace: data}\nspec:\n  selector: {app: reviews}\n  ports: [{name: http, port: 9080}]\n---\napiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: canary, namespace: data}\nspec:\n  hosts: [productpage.bookinfo.svc.cluster.local]\n  http:\n  - route:\n    - destination: {host: reviews}\n",
    );
    let p = proxy("10.1.0.9", "x", "bookinfo");
    let routes: Vec<_> = isthmus_pilot::route::routes(&ctx, &p, &["9080".to_string()])
        .iter()
        .map(|r| to_json(r).unwrap())
        .collect();
    let vhost = |name: &str| {
        routes[0]["virtual_hosts"]
            .as_array()
            .unwrap()
            .iter()
            .find(|v| v["name"] == name)
            .cloned()
            .unwrap_or_else(|| panic!("no virtual host {name}"))
    };
    let pp = vhost("productpage.bookinfo.svc.cluster.local:9080");
    assert_eq!(
        pp["routes"][0]["route"]["cluster"],
        "outbound|9080||reviews.data.svc.cluster.local"
    );
    assert_eq!(
        pp["routes"][0]["metadata"]["filter_metadata"]["istio"]["config"],
        "/apis/networking.istio.io/v1alpha3/namespaces/data/virtual-service/canary"
    );
    // bookinfo's own VirtualService for reviews marks each of its routes.
    let reviews = vhost("reviews.bookinfo.svc.cluster.local:9080");
    for r in reviews["routes"].as_array().unwrap() {
        assert_eq!(
            r["metadata"]["filter_metadata"]["istio"]["config"],
            "/apis/networking.istio.io/v1alpha3/namespaces/bookinfo/virtual-service/reviews"
        );
    }
    // Clusters name their DestinationRule, subsets included; others name none.
    let clusters: Vec<_> = isthmus_pilot::cluster::clusters(&ctx, &p)
        .iter()
        .map(|c| to_json(c).unwrap())
        .collect();
    let config = |name: &str| {
        let c = clusters
            .iter()
            .find(|c| c["name"] == name)
            .unwrap_or_else(|| panic!("no cluster {name}"));
        c["metadata"]["filter_metadata"]["istio"]["config"].clone()
    };
    let dr = "/apis/networking.istio.io/v1alpha3/namespaces/bookinfo/destination-rule/reviews";
    assert_eq!(
        config("outbound|9080||reviews.bookinfo.svc.cluster.local"),
        dr
    );
    assert_eq!(
        config("outbound|9080|v1|reviews.bookinfo.svc.cluster.local"),
        dr
    );
    assert!(config("outbound|9080||productpage.bookinfo.svc.cluster.local").is_null());
}

const ZIPKIN_SERVICE: &str = "apiVersion: v1\nkind: Service\nmetadata: {name: zipkin, namespace: istio-system}\nspec:\n  ports: [{name: http-query, port: 9411}]\n";

/// The network filters of every filter chain of a proxy's listeners, each chain's with
/// whether it is inbound.
fn chains(ctx: &PushContext, p: &Proxy) -> Vec<(bool, Vec<serde_json::Value>)> {
    let mut out = Vec::new();
    for l in isthmus_pilot::listener::listeners(ctx, p) {
        let l = to_json(&l).unwrap();
        let inbound = l["name"] == "virtualInbound";
        for chain in l["filter_chains"].as_array().into_iter().flatten() {
            out.push((inbound, chain["filters"].as_array().unwrap().clone()));
        }
    }
    out
}

/// The `tracing` of every HTTP connection manager of a proxy's listeners, by direction:
/// (outbound, inbound), each listed once per connection manager.
fn hcm_tracing(ctx: &PushContext, p: &Proxy) -> (Vec<serde_json::Value>, Vec<serde_json::Value>) {
    let mut out = (Vec::new(), Vec::new());
    for (inbound, filters) in chains(ctx, p) {
        for f in filters {
            if f["name"] == "envoy.filters.network.http_connection_manager" {
                let t = f["typed_config"]["tracing"].clone();
                if inbound { &mut out.1 } else { &mut out.0 }.push(t);
            }
        }
    }
    out
}

fn tag<'a>(t: &'a serde_json::Value, name: &str) -> &'a serde_json::Value {
    let tags = t["custom_tags"].as_array().unwrap();
    let found = tags.iter().find(|c| c["tag"] == name);
    &found.unwrap_or_else(|| panic!("no tag {name} in {tags:?}"))["literal"]["value"]
}

#[test]
fn tracing_follows_telemetry_resources_and_the_mesh_config() {
    let mesh: MeshConfig = serde_json::from_value(serde_json::json!({
        "extensionProviders": [{"name": "zipkin", "zipkin": {
            "service": "zipkin.istio-system.svc.cluster.local", "port": 9411}}],
    }))
    .unwrap();
    let telemetry = "---\napiVersion: telemetry.istio.io/v1\nkind: Telemetry\nmetadata: {name: mesh-default, namespace: istio-system}\nspec:\n  tracing:\n  - providers: [{name: zipkin}]\n    randomSamplingPercentage: 10\n---\napiVersion: telemetry.istio.io/v1\nkind: Telemetry\nmetadata: {name: reviews, namespace: bookinfo}\nspec:\n  selector: {matchLabels: {app: reviews}}\n  tracing:\n  - randomSamplingPercentage: 50\n    customTags: {team: {literal: {value: books}}}\n";
    let ctx = context_with_mesh(&format!("{ZIPKIN_SERVICE}{telemetry}"), mesh.clone());
    let productpage = proxy("10.1.0.10", "productpage-v1-0", "bookinfo");
    let (out, inb) = hcm_tracing(&ctx, &productpage);
    assert!(!out.is_empty() && !inb.is_empty());
    for t in out.iter().chain(&inb) {
        let z = &t["provider"]["typed_config"];
        assert_eq!(t["provider"]["name"], "envoy.tracers.zipkin");
        assert_eq!(
            z["@type"],
            "type.googleapis.com/envoy.config.trace.v3.ZipkinConfig"
        );
        assert_eq!(
            z["collector_cluster"],
            "outbound|9411||zipkin.istio-system.svc.cluster.local"
        );
        assert_eq!(z["collector_endpoint"], "/api/v2/spans");
        assert_eq!(z["collector_endpoint_version"], "HTTP_JSON");
        assert_eq!(z["trace_id_128bit"], true);
        assert_eq!(t["random_sampling"]["value"], 10.0);
        assert_eq!(t["client_sampling"]["value"], 100.0);
        assert_eq!(tag(t, "istio.canonical_service"), "productpage");
        assert_eq!(tag(t, "istio.canonical_revision"), "v1");
        assert_eq!(tag(t, "istio.namespace"), "bookinfo");
    }
    // Inbound routes name the spans after the service and port.
    let v = golden("productpage", &context(), &productpage);
    let text = v["listeners"].to_string();
    assert!(text.contains("\"operation\":\"productpage.bookinfo.svc.cluster.local:9080/*\""));
    // The workload's Telemetry overrides the sampling and adds its tag; the provider stays.
    let reviews = proxy("10.1.0.11", "reviews-v1-0", "bookinfo");
    let (out, _) = hcm_tracing(&ctx, &reviews);
    assert_eq!(out[0]["random_sampling"]["value"], 50.0);
    assert_eq!(tag(&out[0], "team"), "books");
    assert_eq!(tag(&out[0], "istio.canonical_service"), "reviews");
    // Proxies of one namespace with different tracing tags do not share outbound config.
    assert_ne!(ctx.scope(&productpage), ctx.scope(&reviews));
    // A pod's own ProxyConfig sampling (`proxy.istio.io/config`, in its node metadata) stands
    // where no Telemetry sets one.
    let meta = NodeMetadata {
        tracing: Some(serde_json::json!({"sampling": 50.0})),
        ..Default::default()
    };
    let own = proxy_with_metadata("10.1.0.10", "productpage-v1-0", "bookinfo", &meta);
    let no_rate = telemetry.replace("    randomSamplingPercentage: 10\n", "");
    let plain = context_with_mesh(&format!("{ZIPKIN_SERVICE}{no_rate}"), mesh.clone());
    assert_eq!(
        hcm_tracing(&plain, &own).0[0]["random_sampling"]["value"],
        50.0
    );
    assert_eq!(
        hcm_tracing(&plain, &productpage).0[0]["random_sampling"]["value"],
        1.0
    );

    // Client side only: outbound traced, inbound not.
    let client_only = telemetry.replace(
        "  - providers: [{name: zipkin}]\n",
        "  - providers: [{name: zipkin}]\n    match: {mode: CLIENT}\n",
    );
    let ctx = context_with_mesh(&format!("{ZIPKIN_SERVICE}{client_only}"), mesh.clone());
    let (out, inb) = hcm_tracing(&ctx, &productpage);
    assert!(out.iter().all(|t| t.is_object()), "{out:?}");
    assert!(inb.iter().all(serde_json::Value::is_null), "{inb:?}");
    // Span reporting disabled for the namespace: no tracing.
    let disabled = format!(
        "{telemetry}---\napiVersion: telemetry.istio.io/v1\nkind: Telemetry\nmetadata: {{name: quiet, namespace: bookinfo}}\nspec:\n  tracing:\n  - disableSpanReporting: true\n"
    );
    let ctx = context_with_mesh(&format!("{ZIPKIN_SERVICE}{disabled}"), mesh.clone());
    let (out, inb) = hcm_tracing(&ctx, &productpage);
    assert!(out.iter().chain(&inb).all(serde_json::Value::is_null));
    // Zipkin with W3C context too, as `traceContextOption` asks.
    let mut w3c = mesh.clone();
    w3c.extension_providers[0]
        .provider
        .get_mut("zipkin")
        .unwrap()["traceContextOption"] = "USE_B3_WITH_W3C_PROPAGATION".into();
    let (out, _) = hcm_tracing(
        &context_with_mesh(&format!("{ZIPKIN_SERVICE}{telemetry}"), w3c),
        &productpage,
    );
    assert_eq!(
        out[0]["provider"]["typed_config"]["trace_context_option"],
        "USE_B3_WITH_W3C_PROPAGATION"
    );
    // A provider whose service is not in the mesh: untraced, not broken.
    let ctx = context_with_mesh(telemetry, mesh);
    let (out, _) = hcm_tracing(&ctx, &productpage);
    assert!(out.iter().all(serde_json::Value::is_null));

    // No Telemetry: Istio's older mesh settings, `enableTracing` with a Zipkin address.
    let legacy: MeshConfig = serde_json::from_value(serde_json::json!({
        "enableTracing": true,
        "defaultConfig": {"tracing": {"sampling": 100, "zipkin": {"address": "zipkin.istio-system:9411"}}},
    }))
    .unwrap();
    let ctx = context_with_mesh(ZIPKIN_SERVICE, legacy.clone());
    let (out, _) = hcm_tracing(&ctx, &productpage);
    assert_eq!(out[0]["random_sampling"]["value"], 100.0);
    assert_eq!(
        out[0]["provider"]["typed_config"]["collector_cluster"],
        "outbound|9411||zipkin.istio-system.svc.cluster.local"
    );
    let mut off = legacy;
    off.enable_tracing = Some(false);
    let ctx = context_with_mesh(ZIPKIN_SERVICE, off);
    let (out, _) = hcm_tracing(&ctx, &productpage);
    assert!(out.iter().all(serde_json::Value::is_null));
    // And none of it by default.
    let (out, inb) = hcm_tracing(&context(), &productpage);
    assert!(out.iter().chain(&inb).all(serde_json::Value::is_null));
}

#[test]
fn opentelemetry_providers_export_over_grpc_or_http_to_the_collectors_cluster() {
    let collector = "apiVersion: v1\nkind: Service\nmetadata: {name: otel-collector, namespace: observability}\nspec:\n  ports: [{name: grpc-otlp, port: 4317}, {name: http-otlp, port: 4318}]\n---\napiVersion: telemetry.istio.io/v1\nkind: Telemetry\nmetadata: {name: mesh-default, namespace: istio-system}\nspec:\n  tracing:\n  - providers: [{name: otel}]\n";
    let mesh = |provider: serde_json::Value| -> MeshConfig {
        serde_json::from_value(serde_json::json!({
            "extensionProviders": [{"name": "otel", "opentelemetry": provider}],
        }))
        .unwrap()
    };
    let productpage = proxy("10.1.0.10", "productpage-v1-0", "bookinfo");
    let grpc = mesh(serde_json::json!({
        "service": "otel-collector.observability.svc.cluster.local", "port": 4317,
        "grpc": {"timeout": "3s", "initialMetadata": [{"name": "x-tenant", "value": "books"}]},
    }));
    let (out, inb) = hcm_tracing(&context_with_mesh(collector, grpc), &productpage);
    for t in out.iter().chain(&inb) {
        assert_eq!(t["provider"]["name"], "envoy.tracers.opentelemetry");
        let c = &t["provider"]["typed_config"];
        assert_eq!(
            c["@type"],
            "type.googleapis.com/envoy.config.trace.v3.OpenTelemetryConfig"
        );
        assert_eq!(c["service_name"], "productpage.bookinfo");
        let g = &c["grpc_service"];
        assert_eq!(
            g["envoy_grpc"]["cluster_name"],
            "outbound|4317||otel-collector.observability.svc.cluster.local"
        );
        assert_eq!(
            g["envoy_grpc"]["authority"],
            "otel-collector.observability.svc.cluster.local"
        );
        assert_eq!(g["timeout"], "3s");
        assert_eq!(g["initial_metadata"][0]["key"], "x-tenant");
        assert_eq!(tag(t, "istio.canonical_service"), "productpage");
    }
    let http = mesh(serde_json::json!({
        "service": "otel-collector.observability.svc.cluster.local", "port": 4318,
        "http": {"path": "/v1/traces", "timeout": "2s"},
    }));
    let (out, _) = hcm_tracing(&context_with_mesh(collector, http), &productpage);
    let h = &out[0]["provider"]["typed_config"]["http_service"];
    assert_eq!(
        h["http_uri"]["uri"],
        "otel-collector.observability.svc.cluster.local/v1/traces"
    );
    assert_eq!(
        h["http_uri"]["cluster"],
        "outbound|4318||otel-collector.observability.svc.cluster.local"
    );
    assert_eq!(h["http_uri"]["timeout"], "2s");
    // Kinds without tracing here (Datadog) leave the workload untraced.
    let datadog: MeshConfig = serde_json::from_value(serde_json::json!({
        "extensionProviders": [{"name": "otel", "datadog": {"service": "dd.observability.svc.cluster.local", "port": 8126}}],
    }))
    .unwrap();
    let (out, _) = hcm_tracing(&context_with_mesh(collector, datadog), &productpage);
    assert!(out.iter().all(serde_json::Value::is_null));
}

/// The access logs of every connection manager and TCP proxy of a proxy's listeners, by
/// direction: (outbound, inbound), one list per filter.
fn access_logs(ctx: &PushContext, p: &Proxy) -> (Vec<serde_json::Value>, Vec<serde_json::Value>) {
    let mut out = (Vec::new(), Vec::new());
    for (inbound, filters) in chains(ctx, p) {
        for f in filters
            .iter()
            .filter(|f| f["name"] != "istio.stats" && f["name"] != "istio.metadata_exchange")
        {
            let logs = f["typed_config"]["access_log"].clone();
            if inbound { &mut out.1 } else { &mut out.0 }.push(logs);
        }
    }
    out
}

#[test]
fn access_logging_follows_telemetry_providers_match_filter_and_disabled() {
    let productpage = proxy("10.1.0.10", "productpage-v1-0", "bookinfo");
    let on = "apiVersion: telemetry.istio.io/v1\nkind: Telemetry\nmetadata: {name: mesh-default, namespace: istio-system}\nspec:\n  accessLogging:\n  - providers: [{name: envoy}]\n";
    let (out, inb) = access_logs(&context_with(on), &productpage);
    assert!(!out.is_empty() && !inb.is_empty());
    for logs in out.iter().chain(&inb) {
        let log = &logs[0]["typed_config"];
        assert_eq!(log["path"], "/dev/stdout", "{logs}");
        assert!(
            log["log_format"]["text_format_source"]["inline_string"]
                .as_str()
                .unwrap()
                .starts_with("[%START_TIME%]")
        );
    }
    // Errors only, on the server side only, as CEL filters and `match` say.
    let errors = "apiVersion: telemetry.istio.io/v1\nkind: Telemetry\nmetadata: {name: mesh-default, namespace: istio-system}\nspec:\n  accessLogging:\n  - providers: [{name: envoy}]\n    match: {mode: SERVER}\n    filter: {expression: \"response.code >= 400 || response.duration > duration(\\\"1s\\\")\"}\n";
    let (out, inb) = access_logs(&context_with(errors), &productpage);
    assert!(out.iter().all(serde_json::Value::is_null), "{out:?}");
    let filter = &inb[0][0]["filter"]["or_filter"]["filters"];
    assert_eq!(filter[0]["status_code_filter"]["comparison"]["op"], "GE");
    assert_eq!(
        filter[0]["status_code_filter"]["comparison"]["value"]["default_value"],
        400
    );
    assert_eq!(
        filter[1]["duration_filter"]["comparison"]["value"]["default_value"],
        1001
    );
    // A filter it cannot express logs every request rather than none.
    let cel = errors.replace(">= 400 ||", "in [400, 500] ||");
    let (_, inb) = access_logs(&context_with(&cel), &productpage);
    assert!(inb[0][0]["filter"].is_null() && inb[0][0]["typed_config"].is_object());
    // The namespace turns them off for its workloads.
    let off = format!(
        "{on}---\napiVersion: telemetry.istio.io/v1\nkind: Telemetry\nmetadata: {{name: quiet, namespace: bookinfo}}\nspec:\n  accessLogging:\n  - disabled: true\n"
    );
    let (out, inb) = access_logs(&context_with(&off), &productpage);
    assert!(out.iter().chain(&inb).all(serde_json::Value::is_null));
    // An envoyFileAccessLog extension provider with JSON labels, as the mesh's default.
    let mesh: MeshConfig = serde_json::from_value(serde_json::json!({
        "extensionProviders": [{"name": "json-log", "envoyFileAccessLog": {
            "path": "/dev/stderr",
            "logFormat": {"labels": {"code": "%RESPONSE_CODE%", "path": "%REQ(:PATH)%"}}}}],
        "defaultProviders": {"accessLogging": ["json-log"]},
    }))
    .unwrap();
    let (out, _) = access_logs(&context_with_mesh("", mesh), &productpage);
    let log = &out[0][0]["typed_config"];
    assert_eq!(log["path"], "/dev/stderr");
    assert_eq!(log["log_format"]["json_format"]["code"], "%RESPONSE_CODE%");
    // None of it by default.
    let (out, inb) = access_logs(&context(), &productpage);
    assert!(out.iter().chain(&inb).all(serde_json::Value::is_null));
}

/// The `istio.stats` filters of a proxy's listeners by direction, (outbound, inbound): their
/// `stats.PluginConfig`, one per connection manager or TCP proxy; and how many of those have
/// none.
type StatsFilters = (Vec<serde_json::Value>, Vec<serde_json::Value>, usize);

fn stats_filters(ctx: &PushContext, p: &Proxy) -> StatsFilters {
    let mut out = (Vec::new(), Vec::new(), 0);
    for (inbound, filters) in chains(ctx, p) {
        let terminal = filters.last().unwrap();
        // An HTTP chain's filter is among the connection manager's HTTP filters.
        let candidates = if terminal["name"] == "envoy.filters.network.http_connection_manager" {
            terminal["typed_config"]["http_filters"].as_array().unwrap()
        } else {
            &filters
        };
        let found: Vec<serde_json::Value> = candidates
            .iter()
            .filter(|f| f["name"] == "istio.stats")
            .map(|f| f["typed_config"]["value"].clone())
            .collect();
        if found.is_empty() {
            out.2 += 1;
        }
        if inbound { &mut out.1 } else { &mut out.0 }.extend(found);
    }
    out
}

#[test]
fn metrics_follow_telemetry_overrides_per_metric_and_side() {
    let productpage = proxy("10.1.0.10", "productpage-v1-0", "bookinfo");
    // By default (MeshConfig's `prometheus`): every connection manager and TCP proxy reports,
    // the inbound side not trusting the Host header.
    let (out, inb, without) = stats_filters(&context(), &productpage);
    assert_eq!(without, 0);
    assert!(!out.is_empty() && !inb.is_empty());
    assert!(out.iter().all(|c| *c == serde_json::json!({})), "{out:?}");
    assert!(
        inb.iter()
            .all(|c| *c == serde_json::json!({"disable_host_header_fallback": true})),
        "{inb:?}"
    );
    // Root namespace: no client-side metrics; the namespace: a label from the request and one
    // fewer on the server's request count, request sizes dropped.
    let telemetry = r#"apiVersion: telemetry.istio.io/v1
kind: Telemetry
metadata: {name: mesh-default, namespace: istio-system}
spec:
  metrics:
  - providers: [{name: prometheus}]
    overrides:
    - match: {metric: ALL_METRICS, mode: CLIENT}
      disabled: true
---
apiVersion: telemetry.istio.io/v1
kind: Telemetry
metadata: {name: ns, namespace: bookinfo}
spec:
  metrics:
  - reportingInterval: 500ms
    overrides:
    - match: {metric: REQUEST_COUNT, mode: SERVER}
      tagOverrides:
        request_host: {value: request.host}
        request_protocol: {operation: REMOVE}
    - match: {metric: REQUEST_SIZE, mode: SERVER}
      disabled: true
"#;
    let (out, inb, _) = stats_filters(&context_with(telemetry), &productpage);
    assert!(out.is_empty(), "client side disabled: {out:?}");
    let want = serde_json::json!({
        "disable_host_header_fallback": true,
        "tcp_reporting_duration": "0.5s",
        "metrics": [
            {"name": "request_bytes", "drop": true},
            {"name": "requests_total", "dimensions": {"request_host": "request.host"},
             "tags_to_remove": ["request_protocol"]},
        ],
    });
    assert!(!inb.is_empty() && inb.iter().all(|c| *c == want), "{inb:?}");
    // A provider that is not Prometheus's reports nothing here.
    let stackdriver = "apiVersion: telemetry.istio.io/v1\nkind: Telemetry\nmetadata: {name: mesh-default, namespace: istio-system}\nspec:\n  metrics:\n  - providers: [{name: stackdriver}]\n";
    let mesh: MeshConfig = serde_json::from_value(serde_json::json!({
        "extensionProviders": [{"name": "stackdriver", "stackdriver": {}}],
    }))
    .unwrap();
    let (out, inb, _) = stats_filters(&context_with_mesh(stackdriver, mesh), &productpage);
    assert!(out.is_empty() && inb.is_empty());
    // Every metric disabled on both sides, then a workload's Telemetry turning one back on.
    let off = "apiVersion: telemetry.istio.io/v1\nkind: Telemetry\nmetadata: {name: mesh-default, namespace: istio-system}\nspec:\n  metrics:\n  - overrides: [{match: {metric: ALL_METRICS}, disabled: true}]\n";
    let (out, inb, _) = stats_filters(&context_with(off), &productpage);
    assert!(out.is_empty() && inb.is_empty());
    let back = format!(
        "{off}---\napiVersion: telemetry.istio.io/v1\nkind: Telemetry\nmetadata: {{name: pp, namespace: bookinfo}}\nspec:\n  selector: {{matchLabels: {{app: productpage}}}}\n  metrics:\n  - overrides: [{{match: {{metric: REQUEST_DURATION}}, disabled: false}}]\n"
    );
    let (out, _, _) = stats_filters(&context_with(&back), &productpage);
    assert!(!out.is_empty(), "turned back on for productpage");
    assert!(
        out.iter()
            .all(|c| c["metrics"] == serde_json::json!([{"name": "request_duration_milliseconds"}])),
        "{out:?}"
    );
}

/// The agent's name table: services by their address with what the agent needs for short
/// names, a headless service by its pods and each pod by its own name, ServiceEntries by
/// their addresses (none without); what a Sidecar leaves out is not in it.
#[test]
fn the_name_table_holds_what_the_proxy_may_reach_by_address() {
    let ctx = context_with(
        "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {name: api, namespace: bookinfo}\nspec:\n  hosts: [api.example.test]\n  addresses: [240.240.0.1]\n  ports: [{number: 80, name: http, protocol: HTTP}]\n  resolution: DNS\n---\napiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {name: plain, namespace: bookinfo}\nspec:\n  hosts: [plain.example.test]\n  ports: [{number: 80, name: http, protocol: HTTP}, {number: 5000, name: tcp, protocol: TCP}]\n  resolution: DNS\n---\napiVersion: networking.istio.io/v1\nkind: Sidecar\nmetadata: {name: default, namespace: data}\nspec:\n  egress:\n  - hosts: [./*]\n",
    );
    let table =
        isthmus_pilot::nds::name_table(&ctx, &proxy("10.1.0.10", "productpage-v1-0", "bookinfo"))
            .table;
    let reviews = &table["reviews.bookinfo.svc.cluster.local"];
    assert_eq!(
        (
            reviews.ips.len(),
            reviews.registry.as_str(),
            reviews.shortname.as_str(),
            reviews.namespace.as_str()
        ),
        (1, "Kubernetes", "reviews", "bookinfo")
    );
    assert_eq!(table["db.data.svc.cluster.local"].ips, ["10.1.1.20"]);
    let pod = &table["db-0.db.data.svc.cluster.local"];
    assert_eq!(
        (pod.ips.as_slice(), pod.shortname.as_str()),
        (&["10.1.1.20".to_string()][..], "db-0.db")
    );
    let api = &table["api.example.test"];
    assert_eq!(
        (
            api.ips.as_slice(),
            api.registry.as_str(),
            api.shortname.as_str()
        ),
        (&["240.240.0.1".to_string()][..], "External", "")
    );
    assert!(!table.contains_key("plain.example.test"), "{table:?}");

    // With `DNS_AUTO_ALLOCATE`, the entry without addresses has the allocated one, in the
    // name table and in the listener its port gets.
    let meta = NodeMetadata {
        dns_auto_allocate: true,
        ..Default::default()
    };
    let auto = proxy_with_metadata("10.1.0.10", "productpage-v1-0", "bookinfo", &meta);
    let vip = ctx
        .registry
        .services_by_host("plain.example.test")
        .next()
        .and_then(|s| s.auto_vip)
        .expect("allocated")
        .to_string();
    let table = isthmus_pilot::nds::name_table(&ctx, &auto).table;
    assert_eq!(table["plain.example.test"].ips, std::slice::from_ref(&vip));
    assert_eq!(table["api.example.test"].ips, ["240.240.0.1"]);
    let listeners = |p: &Proxy| -> Vec<String> {
        isthmus_pilot::listener::listeners(&ctx, p)
            .into_iter()
            .map(|l| l.name)
            .collect()
    };
    assert!(
        listeners(&auto).contains(&format!("{vip}_5000")),
        "{:?}",
        listeners(&auto)
    );
    let plain_proxy = proxy("10.1.0.10", "productpage-v1-0", "bookinfo");
    assert!(
        !listeners(&plain_proxy)
            .iter()
            .any(|l| l.starts_with("240.240.")),
        "{:?}",
        listeners(&plain_proxy)
    );
    assert_ne!(ctx.scope(&auto), ctx.scope(&plain_proxy));

    // The data namespace's Sidecar imports its own namespace only (nc-0 has one of its own).
    let scoped = isthmus_pilot::nds::name_table(&ctx, &proxy("10.1.1.20", "db-0", "data")).table;
    let hosts: Vec<&String> = scoped.keys().collect();
    assert!(
        hosts.iter().all(|h| h.ends_with(".data.svc.cluster.local")),
        "{hosts:?}"
    );
    assert!(
        scoped.contains_key("nc.data.svc.cluster.local"),
        "{hosts:?}"
    );
}
