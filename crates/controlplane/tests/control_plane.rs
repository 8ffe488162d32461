//! The control plane as a whole: config directory in, ADS out over real gRPC; a broken file is
//! rejected while the last good config keeps being served; a valid change is pushed.

use std::time::Duration;

use envoy_types::pb::envoy::config::cluster::v3::Cluster;
use envoy_types::pb::envoy::config::core::v3::Node;
use envoy_types::pb::envoy::service::discovery::v3::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;
use envoy_types::pb::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse, DiscoveryRequest,
};
use isthmus_controlplane::{Options, start};
use isthmus_xds::server::CLUSTER;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

const MESH: &str = r#"
apiVersion: v1
kind: Service
metadata: {name: reviews, namespace: default}
spec:
  clusterIP: 10.96.0.11
  selector: {app: reviews}
  ports: [{name: http, port: 9080}]
---
apiVersion: v1
kind: Pod
metadata: {name: reviews-0, namespace: default, labels: {app: reviews}}
spec: {containers: [{name: app, image: app}]}
status: {podIP: 10.1.0.11}
"#;

/// The first CDS response on a secure-port stream for node `id`, sending `token` if given.
async fn secure_cds(
    channel: tonic::transport::Channel,
    id: &str,
    token: Option<&str>,
) -> Result<envoy_types::pb::envoy::service::discovery::v3::DiscoveryResponse, tonic::Status> {
    let mut client = AggregatedDiscoveryServiceClient::new(channel);
    let (tx, rx) = mpsc::channel(4);
    tx.send(DiscoveryRequest {
        node: Some(Node {
            id: id.into(),
            ..Default::default()
        }),
        type_url: CLUSTER.into(),
        ..Default::default()
    })
    .await
    .unwrap();
    let mut request = tonic::Request::new(ReceiverStream::new(rx));
    if let Some(t) = token {
        request
            .metadata_mut()
            .insert("authorization", format!("Bearer {t}").parse().unwrap());
    }
    let mut stream = client
        .stream_aggregated_resources(request)
        .await?
        .into_inner();
    Ok(next(&mut stream).await)
}

/// The control plane serving a new directory with `mesh` in it (the directory lives as long as
/// the returned guard).
async fn start_with(mesh: &str) -> (tempfile::TempDir, isthmus_controlplane::Running) {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("mesh.yaml"), mesh).unwrap();
    let cp = start(options(dir.path())).await.unwrap();
    (dir, cp)
}

/// The control plane on free loopback ports, serving `dir`, without the CA.
fn options(dir: &std::path::Path) -> Options {
    Options {
        config_dir: dir.to_path_buf(),
        xds_addr: "127.0.0.1:0".parse().unwrap(),
        http_addr: "127.0.0.1:0".parse().unwrap(),
        domain: "cluster.local".into(),
        mesh: Default::default(),
        inbound_passthrough: None,
        ca: None,
    }
}

async fn get(addr: std::net::SocketAddr, path: &str) -> String {
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(format!("GET {path} HTTP/1.0\r\nHost: x\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut out = String::new();
    tokio::time::timeout(Duration::from_secs(5), s.read_to_string(&mut out))
        .await
        .unwrap()
        .unwrap();
    out
}

async fn next(
    s: &mut tonic::Streaming<envoy_types::pb::envoy::service::discovery::v3::DiscoveryResponse>,
) -> envoy_types::pb::envoy::service::discovery::v3::DiscoveryResponse {
    tokio::time::timeout(Duration::from_secs(15), s.message())
        .await
        .expect("push in time")
        .unwrap()
        .unwrap()
}

fn cluster_names(
    r: &envoy_types::pb::envoy::service::discovery::v3::DiscoveryResponse,
) -> Vec<String> {
    r.resources
        .iter()
        .map(|a| {
            <Cluster as prost::Message>::decode(a.value.as_slice())
                .unwrap()
                .name
        })
        .collect()
}

#[tokio::test]
async fn serves_config_keeps_last_good_and_pushes_changes() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("mesh.yaml"), MESH).unwrap();
    let cp = start(options(dir.path())).await.unwrap();

    let mut client = AggregatedDiscoveryServiceClient::connect(format!("http://{}", cp.xds_addr))
        .await
        .unwrap();
    let (tx, rx) = mpsc::channel(8);
    let mut stream = client
        .stream_aggregated_resources(ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    let node = Node {
        id: "sidecar~10.1.0.11~reviews-0.default~default.svc.cluster.local".into(),
        ..Default::default()
    };
    tx.send(DiscoveryRequest {
        node: Some(node),
        type_url: CLUSTER.into(),
        ..Default::default()
    })
    .await
    .unwrap();
    let cds = next(&mut stream).await;
    let names = cluster_names(&cds);
    assert!(
        names.contains(&"outbound|9080||reviews.default.svc.cluster.local".to_string()),
        "{names:?}"
    );
    assert!(names.contains(&"inbound|9080||".to_string()), "{names:?}");
    tx.send(DiscoveryRequest {
        type_url: CLUSTER.into(),
        response_nonce: cds.nonce.clone(),
        ..Default::default()
    })
    .await
    .unwrap();

    // Broken YAML in the directory: rejected, nothing changes for the proxy.
    std::fs::write(
        dir.path().join("broken.yaml"),
        "apiVersion: v1\nkind: Service\nmetadata: {name: x\n",
    )
    .unwrap();
    // And an invalid VirtualService (weights do not add up) beside it.
    std::fs::write(
        dir.path().join("vs.yaml"),
        "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: r, namespace: default}\nspec:\n  hosts: [reviews]\n  http:\n  - route:\n    - destination: {host: reviews}\n      weight: 30\n    - destination: {host: reviews}\n      weight: 30\n",
    )
    .unwrap();
    assert!(
        tokio::time::timeout(Duration::from_millis(1500), stream.message())
            .await
            .is_err(),
        "no push for rejected config"
    );
    let configz = get(cp.http_addr, "/debug/configz").await;
    assert!(
        configz.contains("reviews") && !configz.contains("\"r\""),
        "{configz}"
    );

    // A valid new service is pushed.
    std::fs::write(
        dir.path().join("ratings.yaml"),
        "apiVersion: v1\nkind: Service\nmetadata: {name: ratings, namespace: default}\nspec:\n  clusterIP: 10.96.0.12\n  ports: [{name: http, port: 9080}]\n",
    )
    .unwrap();
    let cds = next(&mut stream).await;
    assert!(
        cluster_names(&cds)
            .contains(&"outbound|9080||ratings.default.svc.cluster.local".to_string())
    );
    tx.send(DiscoveryRequest {
        type_url: CLUSTER.into(),
        response_nonce: cds.nonce.clone(),
        ..Default::default()
    })
    .await
    .unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;

    let syncz = get(cp.http_addr, "/debug/syncz").await;
    assert!(
        syncz.contains("reviews-0.default") && syncz.contains("\"cluster_acked\": \"v"),
        "{syncz}"
    );
    let metrics = get(cp.http_addr, "/metrics").await;
    assert!(metrics.contains("pilot_xds 1"), "{metrics}");
    let dump = get(cp.http_addr, "/debug/config_dump?proxyID=reviews-0.default").await;
    assert!(
        dump.contains("outbound|9080||ratings.default.svc.cluster.local"),
        "{dump}"
    );
    assert!(get(cp.http_addr, "/ready").await.contains("200 OK"));
}

#[tokio::test]
async fn ca_and_xds_are_served_over_tls_on_the_secure_port() {
    use tonic::transport::{Certificate, ClientTlsConfig, Endpoint};
    let dir = tempfile::tempdir().unwrap();
    let ca_dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("mesh.yaml"), MESH).unwrap();
    let cp = start(Options {
        ca: Some(isthmus_controlplane::CaOptions {
            dir: ca_dir.path().to_path_buf(),
            secure_addr: "127.0.0.1:0".parse().unwrap(),
            trust_domain: "cluster.local".into(),
            dns_names: isthmus_controlplane::istiod_dns_names("istio-system"),
        }),
        ..options(dir.path())
    })
    .await
    .unwrap();
    // A client that trusts only root-cert.pem, and checks istiod's name.
    let root = std::fs::read_to_string(ca_dir.path().join("root-cert.pem")).unwrap();
    let channel = Endpoint::from_shared(format!("https://{}", cp.secure_addr.unwrap()))
        .unwrap()
        .tls_config(
            ClientTlsConfig::new()
                .ca_certificate(Certificate::from_pem(root.clone()))
                .domain_name("istiod.istio-system.svc"),
        )
        .unwrap()
        .connect()
        .await
        .unwrap();
    let token = isthmus_ca::TokenAuthority::load_or_create(ca_dir.path())
        .unwrap()
        .issue("default", "reviews", Duration::from_secs(60));
    let id = isthmus_ca::SpiffeId::new("cluster.local", "default", "reviews");
    let issued =
        isthmus_ca::workload::fetch(channel.clone(), &token, &id, Duration::from_secs(3600))
            .await
            .expect("certificate from the control plane's CA");
    assert_eq!(issued.chain.len(), 2);

    // xDS on the same TLS port: only for a caller that proves it may be the proxy it names.
    let reviews = "sidecar~10.1.0.11~reviews-0.default~default.svc.cluster.local";
    let status = secure_cds(channel.clone(), reviews, None)
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::Unauthenticated, "{status:?}");
    // A valid token, but for another namespace than the node's.
    let elsewhere = "sidecar~10.1.0.11~reviews-0.other~other.svc.cluster.local";
    let status = secure_cds(channel.clone(), elsewhere, Some(&token))
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::PermissionDenied, "{status:?}");
    assert!(status.message().contains("default/reviews"), "{status:?}");
    // The token of the node's own identity.
    secure_cds(channel.clone(), reviews, Some(&token))
        .await
        .expect("xDS with the service-account token");
    // Mutual TLS with the workload certificate, as the sidecar connects.
    let mtls = Endpoint::from_shared(format!("https://{}", cp.secure_addr.unwrap()))
        .unwrap()
        .tls_config(
            ClientTlsConfig::new()
                .ca_certificate(Certificate::from_pem(root.clone()))
                .domain_name("istiod.istio-system.svc")
                .identity(tonic::transport::Identity::from_pem(
                    issued.presented_chain(),
                    issued.key_pem.clone(),
                )),
        )
        .unwrap()
        .connect()
        .await
        .unwrap();
    let status = secure_cds(mtls.clone(), elsewhere, None).await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::PermissionDenied, "{status:?}");
    let mut client = AggregatedDiscoveryServiceClient::new(mtls);
    let (tx, rx) = mpsc::channel(4);
    tx.send(DiscoveryRequest {
        node: Some(Node {
            id: reviews.into(),
            ..Default::default()
        }),
        type_url: CLUSTER.into(),
        ..Default::default()
    })
    .await
    .unwrap();
    let mut stream = client
        .stream_aggregated_resources(ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    let cds = next(&mut stream).await;
    assert!(cluster_names(&cds).contains(&"inbound|9080||".to_string()));
    // The same proxies table serves both ports.
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(
        get(cp.http_addr, "/debug/syncz")
            .await
            .contains("reviews-0.default")
    );
}

#[tokio::test]
async fn the_proxy_client_follows_clusters_to_endpoints_and_listeners_to_routes() {
    client_follows_the_mesh(false).await;
}

#[tokio::test]
async fn the_state_of_the_world_client_follows_the_mesh_too() {
    client_follows_the_mesh(true).await;
}

async fn client_follows_the_mesh(sotw: bool) {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("mesh.yaml"), MESH).unwrap();
    let cp = start(options(dir.path())).await.unwrap();
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{}", cp.xds_addr))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let node = Node {
        id: "sidecar~10.1.0.11~reviews-0.default~default.svc.cluster.local".into(),
        ..Default::default()
    };
    let (tx, mut rx) = tokio::sync::watch::channel(Default::default());
    // And the agent's name table, as a proxy with DNS capture asks for it.
    let mut wildcards = isthmus_xds::client::WILDCARDS.to_vec();
    wildcards.push(isthmus_xds::nds::NAME_TABLE);
    tokio::spawn(async move {
        let mut state = isthmus_xds::client::XdsState::default();
        if sotw {
            isthmus_xds::client::run_sotw(
                channel,
                node,
                &wildcards,
                &mut state,
                |s| Ok(s.clone()),
                &tx,
            )
            .await
        } else {
            isthmus_xds::client::run(
                channel,
                node,
                &wildcards,
                &mut state,
                |s| Ok(s.clone()),
                &tx,
            )
            .await
        }
    });
    let wait =
        |rx: &mut tokio::sync::watch::Receiver<std::sync::Arc<isthmus_xds::client::XdsState>>,
         f: fn(&isthmus_xds::client::XdsState) -> bool| {
            let mut rx = rx.clone();
            async move {
                tokio::time::timeout(Duration::from_secs(10), rx.wait_for(|s| f(s)))
                    .await
                    .expect("state in time")
                    .unwrap()
                    .clone()
            }
        };
    let state = wait(&mut rx, |s| {
        s.endpoints
            .contains_key("outbound|9080||reviews.default.svc.cluster.local")
            && s.routes.contains_key("9080")
            && !s.name_tables.is_empty()
    })
    .await;
    assert!(state.listeners.contains_key("virtualInbound"));
    let names = state.name_tables.values().next().unwrap().decode().unwrap();
    assert_eq!(
        names.table["reviews.default.svc.cluster.local"].shortname,
        "reviews"
    );
    let eps = state.endpoints["outbound|9080||reviews.default.svc.cluster.local"]
        .decode()
        .unwrap();
    assert_eq!(eps.endpoints[0].lb_endpoints.len(), 1);

    // A second pod appears: the client sees two endpoints.
    std::fs::write(
        dir.path().join("pod2.yaml"),
        "apiVersion: v1\nkind: Pod\nmetadata: {name: reviews-1, namespace: default, labels: {app: reviews}}\nspec: {containers: [{name: app, image: app}]}\nstatus: {podIP: 10.1.0.12}\n",
    )
    .unwrap();
    wait(&mut rx, |s| {
        s.endpoints
            .get("outbound|9080||reviews.default.svc.cluster.local")
            .is_some_and(|e| {
                e.decode()
                    .unwrap()
                    .endpoints
                    .iter()
                    .map(|l| l.lb_endpoints.len())
                    .sum::<usize>()
                    == 2
            })
    })
    .await;
}

/// A delta ADS stream to the control plane at `addr`, and the sender of its requests.
async fn open_delta(
    addr: std::net::SocketAddr,
) -> (
    mpsc::UnboundedSender<DeltaDiscoveryRequest>,
    tonic::Streaming<DeltaDiscoveryResponse>,
) {
    let mut client = AggregatedDiscoveryServiceClient::connect(format!("http://{addr}"))
        .await
        .unwrap();
    let (tx, rx) = mpsc::unbounded_channel();
    let stream = client
        .delta_aggregated_resources(tokio_stream::wrappers::UnboundedReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    (tx, stream)
}

/// A delta ADS session that has received and ACKed everything of a proxy: clusters,
/// listeners, every endpoint assignment and route `9080`.
async fn delta_session(
    addr: std::net::SocketAddr,
    id: &str,
) -> (
    mpsc::UnboundedSender<DeltaDiscoveryRequest>,
    tonic::Streaming<DeltaDiscoveryResponse>,
) {
    use isthmus_xds::server::{ENDPOINT, LISTENER, ROUTE};
    let (tx, mut stream) = open_delta(addr).await;
    let node = Node {
        id: id.into(),
        ..Default::default()
    };
    for (type_url, names) in [
        (CLUSTER, vec![]),
        (LISTENER, vec![]),
        (
            ENDPOINT,
            vec![
                "outbound|9080||reviews.default.svc.cluster.local".to_string(),
                "outbound|9080||ratings.default.svc.cluster.local".to_string(),
            ],
        ),
        (ROUTE, vec!["9080".to_string()]),
    ] {
        tx.send(DeltaDiscoveryRequest {
            node: Some(node.clone()),
            type_url: type_url.into(),
            resource_names_subscribe: names,
            ..Default::default()
        })
        .unwrap();
        let r = next_delta(&mut stream).await;
        assert_eq!(r.type_url, type_url);
        assert!(!r.resources.is_empty(), "{type_url}");
        ack(&tx, &r);
    }
    (tx, stream)
}

async fn next_delta(s: &mut tonic::Streaming<DeltaDiscoveryResponse>) -> DeltaDiscoveryResponse {
    tokio::time::timeout(Duration::from_secs(15), s.message())
        .await
        .expect("push in time")
        .unwrap()
        .unwrap()
}

fn ack(tx: &mpsc::UnboundedSender<DeltaDiscoveryRequest>, r: &DeltaDiscoveryResponse) {
    tx.send(DeltaDiscoveryRequest {
        type_url: r.type_url.clone(),
        response_nonce: r.nonce.clone(),
        ..Default::default()
    })
    .unwrap();
}

#[tokio::test]
async fn one_new_endpoint_sends_one_assignment_to_each_proxy_and_nothing_else() {
    let (dir, cp) = start_with(&format!(
        "{MESH}---\napiVersion: v1\nkind: Service\nmetadata: {{name: ratings, namespace: default}}\nspec:\n  clusterIP: 10.96.0.12\n  selector: {{app: ratings}}\n  ports: [{{name: http, port: 9080}}]\n---\napiVersion: v1\nkind: Pod\nmetadata: {{name: ratings-0, namespace: default, labels: {{app: ratings}}}}\nspec: {{containers: [{{name: app, image: app}}]}}\nstatus: {{podIP: 10.1.0.21}}\n"
    )).await;
    // Two proxies of one scope (namespace `default`, no Sidecar): they share the outbound part.
    let (tx1, mut s1) = delta_session(
        cp.xds_addr,
        "sidecar~10.1.0.11~reviews-0.default~default.svc.cluster.local",
    )
    .await;
    let (tx2, mut s2) = delta_session(
        cp.xds_addr,
        "sidecar~10.1.0.21~ratings-0.default~default.svc.cluster.local",
    )
    .await;

    std::fs::write(
        dir.path().join("pod2.yaml"),
        "apiVersion: v1\nkind: Pod\nmetadata: {name: reviews-1, namespace: default, labels: {app: reviews}}\nspec: {containers: [{name: app, image: app}]}\nstatus: {podIP: 10.1.0.12}\n",
    )
    .unwrap();
    for (tx, s) in [(&tx1, &mut s1), (&tx2, &mut s2)] {
        let r = next_delta(s).await;
        assert_eq!(r.type_url, isthmus_xds::server::ENDPOINT);
        let names: Vec<&str> = r.resources.iter().map(|r| r.name.as_str()).collect();
        assert_eq!(names, ["outbound|9080||reviews.default.svc.cluster.local"]);
        assert!(r.removed_resources.is_empty());
        ack(tx, &r);
    }
    // Clusters, listeners, routes and the other assignment came out the same: nothing more.
    for s in [&mut s1, &mut s2] {
        assert!(
            tokio::time::timeout(Duration::from_millis(800), s.message())
                .await
                .is_err(),
            "only the one assignment is sent"
        );
    }
    let metrics = get(cp.http_addr, "/metrics").await;
    assert!(
        metrics.contains("pilot_proxy_convergence_time_count 2")
            && metrics.contains("pilot_debounce_time_count 1"),
        "{metrics}"
    );

    // A pod with a new identity is more than an endpoint: the cluster's SANs change too.
    std::fs::write(
        dir.path().join("pod3.yaml"),
        "apiVersion: v1\nkind: Pod\nmetadata: {name: reviews-2, namespace: default, labels: {app: reviews}}\nspec: {serviceAccountName: reviews-v2, containers: [{name: app, image: app}]}\nstatus: {podIP: 10.1.0.13}\n",
    )
    .unwrap();
    let cds = next_delta(&mut s1).await;
    assert_eq!(cds.type_url, CLUSTER);
    let names: Vec<&str> = cds.resources.iter().map(|r| r.name.as_str()).collect();
    assert_eq!(names, ["outbound|9080||reviews.default.svc.cluster.local"]);
    // The SANs sit in the packed TLS context: look for them in the resource's bytes.
    let bytes = &cds.resources[0].resource.as_ref().unwrap().value;
    let san = b"spiffe://cluster.local/ns/default/sa/reviews-v2";
    assert!(bytes.windows(san.len()).any(|w| w == san));
}

/// A delta stream of reviews-0's listeners.
async fn listener_session(
    addr: std::net::SocketAddr,
) -> (
    mpsc::UnboundedSender<DeltaDiscoveryRequest>,
    tonic::Streaming<DeltaDiscoveryResponse>,
) {
    let (tx, stream) = open_delta(addr).await;
    tx.send(DeltaDiscoveryRequest {
        node: Some(Node {
            id: "sidecar~10.1.0.11~reviews-0.default~default.svc.cluster.local".into(),
            ..Default::default()
        }),
        type_url: isthmus_xds::server::LISTENER.into(),
        ..Default::default()
    })
    .unwrap();
    (tx, stream)
}

/// The keys the JWT filter of a proxy's inbound HTTP chain carries (its first provider's).
fn inline_jwks(r: &DeltaDiscoveryResponse) -> Option<String> {
    use envoy_types::pb::envoy::config::core::v3::data_source;
    use envoy_types::pb::envoy::config::listener::v3::{Listener, filter};
    use envoy_types::pb::envoy::extensions::filters::http::jwt_authn::v3::{
        JwtAuthentication, jwt_provider,
    };
    use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3::{
        HttpConnectionManager, http_filter,
    };
    use prost::Message;
    r.resources.iter().find_map(|res| {
        let l = Listener::decode(res.resource.as_ref()?.value.as_slice()).ok()?;
        l.filter_chains
            .iter()
            .flat_map(|c| &c.filters)
            .find_map(|f| {
                let Some(filter::ConfigType::TypedConfig(any)) = &f.config_type else {
                    return None;
                };
                let hcm = HttpConnectionManager::decode(any.value.as_slice()).ok()?;
                hcm.http_filters.iter().find_map(|h| {
                    let Some(http_filter::ConfigType::TypedConfig(any)) = &h.config_type else {
                        return None;
                    };
                    let jwt = JwtAuthentication::decode(any.value.as_slice()).ok()?;
                    let p = jwt.providers.get("origins-0")?;
                    match &p.jwks_source_specifier {
                        Some(jwt_provider::JwksSourceSpecifier::LocalJwks(ds)) => {
                            match &ds.specifier {
                                Some(data_source::Specifier::InlineString(s)) => Some(s.clone()),
                                _ => None,
                            }
                        }
                        _ => None,
                    }
                })
            })
    })
}

#[tokio::test]
async fn jwks_uris_are_fetched_retried_and_pushed_inline() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    const JWKS: &str = r#"{"keys":[{"kty":"EC","crv":"P-256","kid":"k1","x":"f83OJ3D2xF1Bg8vub9tLe1gHMzV76e8Tus9uPHvRVEU","y":"x_FEzRu9m36HLN_tue659LNpXW6pCyStikYjKIWI5a0"}]}"#;
    // A JWKS server on loopback that fails until told otherwise.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let up = Arc::new(AtomicBool::new(false));
    let fetches = Arc::new(AtomicUsize::new(0));
    let (up2, fetches2) = (up.clone(), fetches.clone());
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            fetches2.fetch_add(1, Ordering::Relaxed);
            let up = up2.load(Ordering::Relaxed);
            tokio::spawn(async move {
                let mut buf = [0u8; 1024];
                let _ = s.read(&mut buf).await;
                let answer = if up {
                    format!(
                        "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{JWKS}",
                        JWKS.len()
                    )
                } else {
                    "HTTP/1.1 503 Service Unavailable\r\ncontent-length: 0\r\nconnection: close\r\n\r\n".into()
                };
                let _ = s.write_all(answer.as_bytes()).await;
            });
        }
    });
    let (_dir, cp) = start_with(&format!(
        "{MESH}---\napiVersion: security.istio.io/v1\nkind: RequestAuthentication\nmetadata: {{name: jwt, namespace: default}}\nspec:\n  selector: {{matchLabels: {{app: reviews}}}}\n  jwtRules:\n  - issuer: https://issuer.example.com\n    jwksUri: http://127.0.0.1:{port}/jwks.json\n"
    )).await;
    let (tx, mut stream) = listener_session(cp.xds_addr).await;
    let lds = next_delta(&mut stream).await;
    ack(&tx, &lds);
    // While the keys cannot be fetched, the provider has none: tokens are refused, not let in.
    assert_eq!(inline_jwks(&lds).as_deref(), Some(r#"{"keys":[]}"#));
    // Once the server answers, the retried fetch brings the keys, and they are pushed.
    up.store(true, Ordering::Relaxed);
    let lds = next_delta(&mut stream).await;
    assert_eq!(inline_jwks(&lds).as_deref(), Some(JWKS));
    ack(&tx, &lds);
    // Fetched keys are kept: no more fetches, and nothing more is pushed.
    let seen = fetches.load(Ordering::Relaxed);
    assert!(
        tokio::time::timeout(Duration::from_millis(2500), stream.message())
            .await
            .is_err()
    );
    assert_eq!(fetches.load(Ordering::Relaxed), seen);
}

#[tokio::test]
async fn a_jwks_file_beside_the_control_plane_is_read_and_inlined() {
    const JWKS: &str = r#"{"keys":[]}"#;
    let keys = tempfile::tempdir().unwrap();
    let file = keys.path().join("jwks.json");
    std::fs::write(
        &file,
        r#"{"keys":[{"kty":"oct","k":"c2VjcmV0","kid":"f"}]}"#,
    )
    .unwrap();
    let (_dir, cp) = start_with(&format!(
        "{MESH}---\napiVersion: security.istio.io/v1\nkind: RequestAuthentication\nmetadata: {{name: jwt, namespace: default}}\nspec:\n  jwtRules:\n  - issuer: file-issuer\n    jwksUri: file://{}\n",
        file.display()
    )).await;
    let (_tx, mut stream) = listener_session(cp.xds_addr).await;
    let lds = next_delta(&mut stream).await;
    let inline = inline_jwks(&lds).expect("a JWT filter");
    assert_ne!(inline, JWKS, "the file's keys, not the empty set");
    assert!(inline.contains("\"kid\":\"f\""), "{inline}");
}

/// A reload shares the resources of the files that did not change with the snapshot before
/// it (one copy in memory, however often the directory changes), and reads the changed file.
#[test]
fn reload_shares_unchanged_resources() {
    use isthmus_controlplane::source::DirSource;
    let dir = tempfile::tempdir().unwrap();
    let service = |name: &str| {
        format!(
            "apiVersion: v1\nkind: Service\nmetadata:\n  name: {name}\n  namespace: default\nspec:\n  ports:\n  - name: http\n    port: 80\n"
        )
    };
    std::fs::write(dir.path().join("a.yaml"), service("a")).unwrap();
    std::fs::write(dir.path().join("b.yaml"), service("b")).unwrap();
    let mut source = DirSource::new(dir.path());
    let (first, rejected) = source.reload();
    assert!(rejected.is_empty(), "{rejected:?}");
    std::fs::write(dir.path().join("b.yaml"), service("b2")).unwrap();
    let (second, _) = source.reload();
    let names = |s: &isthmus_config::Snapshot| -> Vec<String> {
        s.services.iter().map(|e| e.name().to_string()).collect()
    };
    assert_eq!(names(&first), ["a", "b"]);
    assert_eq!(names(&second), ["a", "b2"]);
    assert!(std::sync::Arc::ptr_eq(
        &first.services[0],
        &second.services[0]
    ));
}

/// The debug endpoints build a proxy's configuration from its node as it sent it, metadata
/// included: a proxy with `DNS_AUTO_ALLOCATE` has the address allocated to a ServiceEntry in
/// its name table (`/debug/ndsz`, as istiod's) and in its listeners (`/debug/config_dump`).
#[tokio::test]
async fn debug_endpoints_use_the_node_metadata_the_proxy_sent() {
    use envoy_types::pb::google::protobuf::{Struct, Value, value::Kind};
    let (_dir, cp) = start_with(&format!(
        "{MESH}---\napiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {{name: db, namespace: default}}\nspec:\n  hosts: [db.example.test]\n  ports: [{{number: 3306, name: tcp, protocol: TCP}}]\n  resolution: DNS\n"
    ))
    .await;
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{}", cp.xds_addr))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let text = |s: &str| Value {
        kind: Some(Kind::StringValue(s.into())),
    };
    let node = Node {
        id: "sidecar~10.1.0.11~reviews-0.default~default.svc.cluster.local".into(),
        metadata: Some(Struct {
            fields: [("DNS_AUTO_ALLOCATE".to_string(), text("true"))]
                .into_iter()
                .collect(),
        }),
        ..Default::default()
    };
    let (tx, mut rx) = tokio::sync::watch::channel(Default::default());
    tokio::spawn(async move {
        let mut state = isthmus_xds::client::XdsState::default();
        let wildcards = [
            isthmus_xds::server::CLUSTER,
            isthmus_xds::server::LISTENER,
            isthmus_xds::nds::NAME_TABLE,
        ];
        isthmus_xds::client::run(
            channel,
            node,
            &wildcards,
            &mut state,
            |s| Ok(s.clone()),
            &tx,
        )
        .await
    });
    let sent = tokio::time::timeout(
        Duration::from_secs(10),
        rx.wait_for(|s: &std::sync::Arc<isthmus_xds::client::XdsState>| !s.name_tables.is_empty()),
    )
    .await
    .expect("name table in time")
    .unwrap()
    .clone();
    let table = sent.name_tables.values().next().unwrap().decode().unwrap();
    let vip = table.table["db.example.test"].ips[0].clone();
    assert!(vip.starts_with("240.240."), "{vip}");

    let ndsz = get(cp.http_addr, "/debug/ndsz?proxyID=reviews-0.default").await;
    assert!(
        ndsz.contains("\"db.example.test\"") && ndsz.contains(&format!("\"{vip}\"")),
        "{ndsz}"
    );
    assert!(ndsz.contains("\"shortname\": \"reviews\""), "{ndsz}");
    let dump = get(cp.http_addr, "/debug/config_dump?proxyID=reviews-0.default").await;
    assert!(
        dump.contains(&format!("\"{vip}_3306\"")),
        "no listener on {vip}"
    );
}
