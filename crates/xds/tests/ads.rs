//! The ADS server over real gRPC (tonic client and server on loopback): state of the world and
//! delta, ACK/NACK, push order, and exactly what one change sends.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use envoy_types::pb::envoy::config::cluster::v3::Cluster;
use envoy_types::pb::envoy::config::core::v3::Node;
use envoy_types::pb::envoy::config::endpoint::v3::ClusterLoadAssignment;
use envoy_types::pb::envoy::service::discovery::v3::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;
use envoy_types::pb::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse, DiscoveryRequest, DiscoveryResponse,
};
use envoy_types::pb::google::protobuf::Any;
use envoy_types::pb::google::rpc::Status as RpcStatus;
use envoy_types::util::pack_any;
use isthmus_xds::server::{AdsServer, CLUSTER, ENDPOINT, FixedGenerator};
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::Streaming;

/// The test's mesh: a fixed generator with helpers for the resources these tests use.
type Fixed = FixedGenerator;

trait Resources {
    fn cluster(&self, name: &str, timeout: i64);
    fn endpoints(&self, name: &str, tag: u32);
}

impl Resources for Fixed {
    fn cluster(&self, name: &str, timeout: i64) {
        let c = Cluster {
            name: name.into(),
            connect_timeout: Some(envoy_types::pb::google::protobuf::Duration {
                seconds: timeout,
                nanos: 0,
            }),
            ..Default::default()
        };
        self.put(CLUSTER, name, pack_any(c));
    }
    fn endpoints(&self, name: &str, tag: u32) {
        let e = ClusterLoadAssignment {
            cluster_name: name.into(),
            policy: Some(Default::default()),
            endpoints: vec![
                envoy_types::pb::envoy::config::endpoint::v3::LocalityLbEndpoints {
                    priority: tag,
                    ..Default::default()
                },
            ],
            ..Default::default()
        };
        self.put(ENDPOINT, name, pack_any(e));
    }
}

struct Harness {
    mesh: Arc<Fixed>,
    client_addr: std::net::SocketAddr,
    bump: watch::Sender<u64>,
    client: AggregatedDiscoveryServiceClient<tonic::transport::Channel>,
    proxies: Arc<Mutex<BTreeMap<u64, isthmus_xds::ProxyState>>>,
}

async fn start() -> Harness {
    let mesh = Arc::new(Fixed::default());
    mesh.cluster("a", 1);
    mesh.cluster("b", 1);
    mesh.endpoints("a", 0);
    mesh.endpoints("b", 0);
    mesh.endpoints("c", 0);
    let (bump, version) = watch::channel(1u64);
    let server = AdsServer::new(mesh.clone(), version);
    let proxies = server.proxies();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(server.into_service())
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );
    let client = AggregatedDiscoveryServiceClient::connect(format!("http://{addr}"))
        .await
        .unwrap();
    Harness {
        mesh,
        client_addr: addr,
        bump,
        client,
        proxies,
    }
}

impl Harness {
    /// A new delta ADS stream: its request sender and its responses.
    async fn delta(
        &mut self,
    ) -> (
        mpsc::Sender<DeltaDiscoveryRequest>,
        Streaming<DeltaDiscoveryResponse>,
    ) {
        let (tx, rx) = mpsc::channel(8);
        let stream = self
            .client
            .delta_aggregated_resources(ReceiverStream::new(rx))
            .await
            .unwrap()
            .into_inner();
        (tx, stream)
    }
}

fn node() -> Option<Node> {
    Some(Node {
        id: "sidecar~10.1.0.5~app-0.default~default.svc.cluster.local".into(),
        ..Default::default()
    })
}

async fn next<T>(s: &mut Streaming<T>) -> T {
    tokio::time::timeout(Duration::from_secs(5), s.message())
        .await
        .expect("response in time")
        .unwrap()
        .expect("stream open")
}

/// Asserts nothing arrives for a short while.
async fn quiet<T: std::fmt::Debug>(s: &mut Streaming<T>) {
    if let Ok(m) = tokio::time::timeout(Duration::from_millis(300), s.message()).await {
        panic!("unexpected message: {m:?}");
    }
}

fn names(r: &DiscoveryResponse) -> Vec<String> {
    r.resources
        .iter()
        .map(|a| {
            if a.type_url == CLUSTER {
                <Cluster as prost::Message>::decode(a.value.as_slice())
                    .unwrap()
                    .name
            } else {
                <ClusterLoadAssignment as prost::Message>::decode(a.value.as_slice())
                    .unwrap()
                    .cluster_name
            }
        })
        .collect()
}

#[tokio::test]
async fn state_of_the_world_ack_nack_and_ordered_pushes() {
    let mut h = start().await;
    let (tx, rx) = mpsc::channel(8);
    let mut stream = h
        .client
        .stream_aggregated_resources(ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();

    tx.send(DiscoveryRequest {
        node: node(),
        type_url: CLUSTER.into(),
        ..Default::default()
    })
    .await
    .unwrap();
    let cds = next(&mut stream).await;
    assert_eq!(names(&cds), vec!["a", "b"]);
    assert_eq!(cds.version_info, "v1");
    tx.send(DiscoveryRequest {
        type_url: CLUSTER.into(),
        response_nonce: cds.nonce.clone(),
        version_info: cds.version_info.clone(),
        ..Default::default()
    })
    .await
    .unwrap();

    tx.send(DiscoveryRequest {
        type_url: ENDPOINT.into(),
        resource_names: vec!["a".into()],
        ..Default::default()
    })
    .await
    .unwrap();
    let eds = next(&mut stream).await;
    assert_eq!(names(&eds), vec!["a"], "only the subscribed assignment");
    tx.send(DiscoveryRequest {
        type_url: ENDPOINT.into(),
        resource_names: vec!["a".into()],
        response_nonce: eds.nonce.clone(),
        ..Default::default()
    })
    .await
    .unwrap();
    quiet(&mut stream).await;

    // An endpoint change pushes EDS only; an endpoint of an unsubscribed cluster pushes nothing.
    h.mesh.endpoints("a", 1);
    h.mesh.endpoints("c", 1);
    h.bump.send(2).unwrap();
    let eds = next(&mut stream).await;
    assert_eq!(eds.type_url, ENDPOINT);
    assert_eq!(names(&eds), vec!["a"]);
    tx.send(DiscoveryRequest {
        type_url: ENDPOINT.into(),
        resource_names: vec!["a".into()],
        response_nonce: eds.nonce.clone(),
        ..Default::default()
    })
    .await
    .unwrap();
    quiet(&mut stream).await;

    // Cluster and endpoint both change: CDS comes first.
    h.mesh.cluster("a", 2);
    h.mesh.endpoints("a", 2);
    h.bump.send(3).unwrap();
    let first = next(&mut stream).await;
    let second = next(&mut stream).await;
    assert_eq!(
        (first.type_url.as_str(), second.type_url.as_str()),
        (CLUSTER, ENDPOINT)
    );

    // NACK the CDS: recorded, counted, not resent.
    tx.send(DiscoveryRequest {
        type_url: CLUSTER.into(),
        response_nonce: first.nonce.clone(),
        error_detail: Some(RpcStatus {
            code: 3,
            message: "bad cluster a".into(),
            details: vec![],
        }),
        ..Default::default()
    })
    .await
    .unwrap();
    tx.send(DiscoveryRequest {
        type_url: ENDPOINT.into(),
        resource_names: vec!["a".into()],
        response_nonce: second.nonce.clone(),
        ..Default::default()
    })
    .await
    .unwrap();
    quiet(&mut stream).await;
    let state = h.proxies.lock().unwrap().values().next().cloned().unwrap();
    assert_eq!(state.types[CLUSTER].nack.as_deref(), Some("bad cluster a"));
    assert_eq!(state.types[ENDPOINT].acked_version, "v3");
    assert_eq!(state.node_id, node().unwrap().id);

    // A stale nonce is ignored.
    tx.send(DiscoveryRequest {
        type_url: CLUSTER.into(),
        response_nonce: cds.nonce.clone(),
        ..Default::default()
    })
    .await
    .unwrap();
    quiet(&mut stream).await;
}

fn delta_names(r: &DeltaDiscoveryResponse) -> Vec<String> {
    r.resources.iter().map(|x| x.name.clone()).collect()
}

#[tokio::test]
async fn delta_sends_only_what_changed_and_resumes_after_reconnect() {
    let mut h = start().await;
    let (tx, mut stream) = h.delta().await;
    tx.send(DeltaDiscoveryRequest {
        node: node(),
        type_url: CLUSTER.into(),
        ..Default::default()
    })
    .await
    .unwrap();
    let cds = next(&mut stream).await;
    assert_eq!(delta_names(&cds), vec!["a", "b"]);
    tx.send(DeltaDiscoveryRequest {
        type_url: CLUSTER.into(),
        response_nonce: cds.nonce.clone(),
        ..Default::default()
    })
    .await
    .unwrap();
    tx.send(DeltaDiscoveryRequest {
        type_url: ENDPOINT.into(),
        resource_names_subscribe: vec!["a".into(), "b".into(), "c".into()],
        ..Default::default()
    })
    .await
    .unwrap();
    let eds = next(&mut stream).await;
    assert_eq!(delta_names(&eds), vec!["a", "b", "c"]);
    tx.send(DeltaDiscoveryRequest {
        type_url: ENDPOINT.into(),
        response_nonce: eds.nonce.clone(),
        ..Default::default()
    })
    .await
    .unwrap();
    quiet(&mut stream).await;

    // One endpoint changes: exactly that assignment is sent, nothing else.
    h.mesh.endpoints("b", 7);
    h.bump.send(2).unwrap();
    let one = next(&mut stream).await;
    assert_eq!(one.type_url, ENDPOINT);
    assert_eq!(delta_names(&one), vec!["b"]);
    assert!(one.removed_resources.is_empty());
    tx.send(DeltaDiscoveryRequest {
        type_url: ENDPOINT.into(),
        response_nonce: one.nonce.clone(),
        ..Default::default()
    })
    .await
    .unwrap();
    quiet(&mut stream).await;

    // A removal is a removal.
    h.mesh.remove(CLUSTER, "b");
    h.bump.send(3).unwrap();
    let removed = next(&mut stream).await;
    assert_eq!(removed.type_url, CLUSTER);
    assert!(removed.resources.is_empty());
    assert_eq!(removed.removed_resources, vec!["b"]);

    // Reconnect, telling the server what we have: only what differs comes back.
    drop(tx);
    let versions: std::collections::HashMap<String, String> = eds
        .resources
        .iter()
        .filter(|r| r.name != "b")
        .map(|r| (r.name.clone(), r.version.clone()))
        .chain(
            one.resources
                .iter()
                .map(|r| (r.name.clone(), r.version.clone())),
        )
        .collect();
    h.mesh.endpoints("c", 9);
    let (tx, mut stream) = h.delta().await;
    tx.send(DeltaDiscoveryRequest {
        node: node(),
        type_url: ENDPOINT.into(),
        resource_names_subscribe: vec!["a".into(), "b".into(), "c".into()],
        initial_resource_versions: versions,
        ..Default::default()
    })
    .await
    .unwrap();
    let resumed = next(&mut stream).await;
    assert_eq!(delta_names(&resumed), vec!["c"]);
}

#[tokio::test]
async fn the_client_nacks_a_response_that_does_not_decode() {
    let h = start().await;
    // A "cluster" whose bytes are not a Cluster.
    h.mesh.put(
        CLUSTER,
        "broken",
        Any {
            type_url: CLUSTER.into(),
            value: vec![0xff, 0xff, 0xff],
        },
    );
    let endpoint = format!("http://{}", h.client_addr);
    let channel = tonic::transport::Endpoint::from_shared(endpoint)
        .unwrap()
        .connect()
        .await
        .unwrap();
    let (tx, _rx) = watch::channel(Default::default());
    tokio::spawn(async move {
        let mut state = isthmus_xds::client::XdsState::default();
        isthmus_xds::client::run(
            channel,
            node().unwrap(),
            &isthmus_xds::client::WILDCARDS,
            &mut state,
            |s| Ok(s.clone()),
            &tx,
        )
        .await
    });
    let nacked = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            let nack = h
                .proxies
                .lock()
                .unwrap()
                .values()
                .find_map(|p| p.types.get(CLUSTER).and_then(|t| t.nack.clone()));
            if let Some(n) = nack {
                return n;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("NACK in time");
    assert!(nacked.contains("broken"), "{nacked}");
}

/// Clusters of about 1 KB each: several delta parts' worth.
const BIG: usize = 5 * isthmus_xds::server::MAX_CHUNK_BYTES / 1024;

fn big_clusters(mesh: &Fixed) {
    for i in 0..BIG {
        let c = Cluster {
            name: format!("big-{i:04}"),
            alt_stat_name: "x".repeat(1000),
            ..Default::default()
        };
        mesh.put(CLUSTER, &c.name.clone(), pack_any(c));
    }
}

#[tokio::test]
async fn large_delta_answers_come_in_bounded_parts_and_a_nack_of_any_part_counts() {
    use isthmus_xds::server::MAX_CHUNK_BYTES;
    use prost::Message;
    let mut h = start().await;
    big_clusters(&h.mesh);
    let (tx, mut stream) = h.delta().await;
    tx.send(DeltaDiscoveryRequest {
        node: node(),
        type_url: CLUSTER.into(),
        ..Default::default()
    })
    .await
    .unwrap();
    let mut names = Vec::new();
    let mut parts = Vec::new();
    while names.len() < BIG + 2 {
        let r = next(&mut stream).await;
        assert!(
            r.encoded_len() <= MAX_CHUNK_BYTES + 2048,
            "{}",
            r.encoded_len()
        );
        names.extend(delta_names(&r));
        parts.push(r);
    }
    assert!(parts.len() >= 4, "{} parts", parts.len());
    assert_eq!(names.len(), BIG + 2, "every cluster once");
    // The first part is NACKed and the last ACKed: the type stays rejected.
    tx.send(DeltaDiscoveryRequest {
        type_url: CLUSTER.into(),
        response_nonce: parts[0].nonce.clone(),
        error_detail: Some(RpcStatus {
            code: 3,
            message: "cannot run big-0000".into(),
            details: vec![],
        }),
        ..Default::default()
    })
    .await
    .unwrap();
    tx.send(DeltaDiscoveryRequest {
        type_url: CLUSTER.into(),
        response_nonce: parts.last().unwrap().nonce.clone(),
        ..Default::default()
    })
    .await
    .unwrap();
    quiet(&mut stream).await;
    let state = h.proxies.lock().unwrap().values().next().unwrap().clone();
    let cds = &state.types[CLUSTER];
    assert_eq!(cds.nack.as_deref(), Some("cannot run big-0000"));
    assert!(cds.acked_version.is_empty(), "{cds:?}");
}

/// A channel to the test server's client port.
async fn connect(h: &Harness) -> tonic::transport::Channel {
    tonic::transport::Endpoint::from_shared(format!("http://{}", h.client_addr))
        .unwrap()
        .connect()
        .await
        .unwrap()
}

#[tokio::test]
async fn a_resumed_session_keeps_every_resource_while_the_new_one_arrives() {
    use isthmus_xds::client::{XdsState, run};
    let h = start().await;
    big_clusters(&h.mesh);
    let channel = connect(&h).await;
    let (out, _rx) = watch::channel(Arc::new(0usize));
    let node = node().unwrap();
    let mut state = XdsState::default();
    // First session: everything arrives, in several parts.
    let session = run(
        channel.clone(),
        node.clone(),
        &isthmus_xds::client::WILDCARDS,
        &mut state,
        |s| Ok(s.clusters.len()),
        &out,
    );
    let _ = tokio::time::timeout(Duration::from_secs(2), session).await;
    assert_eq!(state.clusters.len(), BIG + 2);
    // One cluster goes away while the proxy is disconnected.
    h.mesh.remove(CLUSTER, &format!("big-{:04}", BIG - 1));
    h.bump.send(2).unwrap();
    // Second session: what is already here stays; only the removal comes.
    let kept = state.clusters["big-0000"].clone();
    let mut seen = Vec::new();
    let session = run(
        channel,
        node,
        &isthmus_xds::client::WILDCARDS,
        &mut state,
        |s| {
            seen.push(s.clusters.len());
            Ok(s.clusters.len())
        },
        &out,
    );
    let _ = tokio::time::timeout(Duration::from_secs(2), session).await;
    assert_eq!(state.clusters.len(), BIG + 1);
    assert!(
        seen.iter().all(|n| *n > BIG),
        "partial configuration on resume: {seen:?}"
    );
    assert!(
        Arc::ptr_eq(&kept, &state.clusters["big-0000"]),
        "an unchanged cluster is shared by the states before and after an update, not copied"
    );
}

#[tokio::test]
async fn a_session_counts_the_updates_it_takes_and_refuses() {
    use isthmus_xds::client::{XdsState, run};
    let h = start().await;
    big_clusters(&h.mesh);
    let channel = connect(&h).await;
    let (out, _rx) = watch::channel(Arc::new(0usize));
    let mut state = XdsState::default();
    // A proxy that cannot run what it gets refuses every part.
    let session = run(
        channel.clone(),
        node().unwrap(),
        &isthmus_xds::client::WILDCARDS,
        &mut state,
        |_| Err::<usize, _>("refused".to_string()),
        &out,
    );
    let _ = tokio::time::timeout(Duration::from_secs(2), session).await;
    let refused = state.updates.get(CLUSTER);
    assert!(state.clusters.is_empty());
    assert!(refused.rejected >= 4 && refused.success == 0, "{refused:?}");
    // The next session takes them; the counts go on from the first.
    let session = run(
        channel,
        node().unwrap(),
        &isthmus_xds::client::WILDCARDS,
        &mut state,
        |s| {
            // Connected while the stream is open.
            assert!(s.link.connected());
            Ok(s.clusters.len())
        },
        &out,
    );
    let _ = tokio::time::timeout(Duration::from_secs(2), session).await;
    let taken = state.updates.get(CLUSTER);
    assert_eq!(state.clusters.len(), BIG + 2);
    assert!(
        taken.success >= 4 && taken.rejected == refused.rejected,
        "{taken:?}"
    );
    // Two sessions, two streams, no longer connected once the second ended.
    let link = state.link.clone();
    assert_eq!((link.attempts(), link.streams()), (2, 2));
    assert!(!link.connected());
    // A control plane out of reach: a session that never opens its stream.
    let nowhere = tonic::transport::Endpoint::from_static("http://127.0.0.1:1").connect_lazy();
    let failed = run(
        nowhere,
        node().unwrap(),
        &isthmus_xds::client::WILDCARDS,
        &mut state,
        |s| Ok(s.clusters.len()),
        &out,
    )
    .await;
    assert!(failed.is_err());
    assert_eq!(
        (link.attempts(), link.streams(), link.connect_failures()),
        (3, 2, 1)
    );
    assert!(!link.connected());
}
