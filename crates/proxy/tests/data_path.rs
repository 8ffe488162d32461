//! The proxy's data path through real sockets, in a network namespace of the test's own: a
//! real ADS server (tonic) feeds hand-written Envoy resources, iptables redirects a service
//! range to 15001, and upstreams are real HTTP servers. Covers HTTP/1.1 (keep-alive, chunked,
//! hop-by-hop headers, request ids), WebSocket upgrades, HTTP/2 and gRPC trailers, TCP, NACK of
//! what the proxy cannot run, configuration updates under load, and draining.

use std::collections::{BTreeMap, BTreeSet};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use envoy_types::pb::envoy::config::cluster::v3::{Cluster, cluster};
use envoy_types::pb::envoy::config::core::v3::{
    Address, Http2ProtocolOptions, SocketAddress, TrafficDirection, address, socket_address,
};
use envoy_types::pb::envoy::config::endpoint::v3::{
    ClusterLoadAssignment, Endpoint, LbEndpoint, LocalityLbEndpoints, lb_endpoint,
};
use envoy_types::pb::envoy::config::listener::v3::{
    Filter, FilterChain, Listener, ListenerFilter, filter, listener_filter,
};
use envoy_types::pb::envoy::config::route::v3::{
    Route, RouteAction, RouteConfiguration, RouteMatch, VirtualHost, WeightedCluster, route,
    route_action, route_match, weighted_cluster,
};
use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3::{
    HttpConnectionManager, HttpFilter, Rds, http_connection_manager, http_filter,
};
use envoy_types::pb::envoy::extensions::filters::network::tcp_proxy::v3::{TcpProxy, tcp_proxy};
use envoy_types::pb::envoy::extensions::upstreams::http::v3::http_protocol_options::explicit_http_config::ProtocolConfig;
use envoy_types::pb::envoy::extensions::upstreams::http::v3::{
    HttpProtocolOptions, http_protocol_options,
};
use envoy_types::pb::google::protobuf::{Any, BoolValue, UInt32Value};
use envoy_types::util::pack_any;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper_util::rt::{TokioExecutor, TokioIo};
use isthmus_proxy::agent::{Options, Ports};
use isthmus_testkit::{Netns, is_root};
use isthmus_xds::server::{AdsServer, CLUSTER, FixedGenerator, LISTENER, ROUTE};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::watch;

type Fixed = FixedGenerator;

fn sock(ip: &str, port: u16) -> Address {
    Address {
        address: Some(address::Address::SocketAddress(SocketAddress {
            address: ip.into(),
            port_specifier: Some(socket_address::PortSpecifier::PortValue(u32::from(port))),
            ..Default::default()
        })),
    }
}

/// Envoy's retry policy on 5xx answers, `n` retries.
fn retry_5xx(n: u32) -> envoy_types::pb::envoy::config::route::v3::RetryPolicy {
    envoy_types::pb::envoy::config::route::v3::RetryPolicy {
        retry_on: "5xx".into(),
        num_retries: Some(UInt32Value { value: n }),
        ..Default::default()
    }
}

fn typed(name: &str, any: Any) -> Filter {
    Filter {
        name: name.into(),
        config_type: Some(filter::ConfigType::TypedConfig(any)),
    }
}

fn tcp_proxy(cluster: &str) -> Filter {
    tcp_proxy_with(cluster, |_| {})
}

/// A `tcp_proxy` to `cluster`, with what `edit` sets besides.
fn tcp_proxy_with(cluster: &str, edit: impl FnOnce(&mut TcpProxy)) -> Filter {
    let mut tp = TcpProxy {
        stat_prefix: cluster.into(),
        cluster_specifier: Some(tcp_proxy::ClusterSpecifier::Cluster(cluster.into())),
        ..Default::default()
    };
    edit(&mut tp);
    typed("envoy.filters.network.tcp_proxy", pack_any(tp))
}

/// A counter's value in the admin's `/stats` text.
fn stat_value(stats: &str, name: &str) -> Option<u64> {
    stats
        .lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(": ")?.parse().ok())
}

/// Istio's stats filter with this `stats.PluginConfig` (HTTP or network: the same shape).
fn stats_filter(config: serde_json::Value) -> Any {
    use isthmus_xds::typed_struct::{STATS_TYPE_URL, TypedStruct};
    pack_any(TypedStruct {
        type_url: STATS_TYPE_URL.into(),
        value: Some(isthmus_xds::json::from_json(config).unwrap()),
    })
}

/// A connection manager routing by RDS, with Istio's stats filter as the pilot puts it.
fn hcm(route_config: &str) -> Filter {
    hcm_with_stats(route_config, Some(serde_json::json!({})))
}

fn hcm_with_stats(route_config: &str, stats: Option<serde_json::Value>) -> Filter {
    let mut http_filters: Vec<HttpFilter> = stats
        .map(|config| HttpFilter {
            name: "istio.stats".into(),
            config_type: Some(http_filter::ConfigType::TypedConfig(stats_filter(config))),
            ..Default::default()
        })
        .into_iter()
        .collect();
    http_filters.push(HttpFilter {
        name: "envoy.filters.http.router".into(),
        config_type: Some(http_filter::ConfigType::TypedConfig(pack_any(
            envoy_types::pb::envoy::extensions::filters::http::router::v3::Router::default(),
        ))),
        ..Default::default()
    });
    typed(
        "envoy.filters.network.http_connection_manager",
        pack_any(HttpConnectionManager {
            stat_prefix: route_config.into(),
            route_specifier: Some(http_connection_manager::RouteSpecifier::Rds(Rds {
                route_config_name: route_config.into(),
                ..Default::default()
            })),
            http_filters,
            ..Default::default()
        }),
    )
}

/// A per-port listener that `virtualOutbound` hands connections to.
fn port_listener(name: &str, ip: &str, port: u16, f: Filter) -> Listener {
    Listener {
        name: name.into(),
        address: Some(sock(ip, port)),
        bind_to_port: Some(BoolValue { value: false }),
        traffic_direction: TrafficDirection::Outbound as i32,
        filter_chains: vec![FilterChain {
            filters: vec![f],
            ..Default::default()
        }],
        ..Default::default()
    }
}

fn virtual_outbound() -> Listener {
    Listener {
        name: "virtualOutbound".into(),
        address: Some(sock("0.0.0.0", 15001)),
        use_original_dst: Some(BoolValue { value: true }),
        traffic_direction: TrafficDirection::Outbound as i32,
        listener_filters: vec![ListenerFilter {
            name: "envoy.filters.listener.original_dst".into(),
            config_type: Some(listener_filter::ConfigType::TypedConfig(pack_any(
                envoy_types::pb::envoy::extensions::filters::listener::original_dst::v3::OriginalDst {},
            ))),
            ..Default::default()
        }],
        filter_chains: vec![FilterChain {
            filters: vec![tcp_proxy("PassthroughCluster")],
            ..Default::default()
        }],
        ..Default::default()
    }
}

fn static_cluster(name: &str, endpoints: &[SocketAddr], http2: bool) -> Cluster {
    let mut c = Cluster {
        name: name.into(),
        cluster_discovery_type: Some(cluster::ClusterDiscoveryType::Type(
            cluster::DiscoveryType::Static as i32,
        )),
        lb_policy: cluster::LbPolicy::LeastRequest as i32,
        connect_timeout: Some(envoy_types::pb::google::protobuf::Duration {
            seconds: 1,
            nanos: 0,
        }),
        load_assignment: Some(ClusterLoadAssignment {
            cluster_name: name.into(),
            endpoints: vec![LocalityLbEndpoints {
                lb_endpoints: endpoints
                    .iter()
                    .map(|a| LbEndpoint {
                        host_identifier: Some(lb_endpoint::HostIdentifier::Endpoint(Endpoint {
                            address: Some(sock(&a.ip().to_string(), a.port())),
                            ..Default::default()
                        })),
                        ..Default::default()
                    })
                    .collect(),
                ..Default::default()
            }],
            ..Default::default()
        }),
        ..Default::default()
    };
    if http2 {
        explicit_protocol(
            &mut c,
            ProtocolConfig::Http2ProtocolOptions(Http2ProtocolOptions::default()),
        );
    }
    c
}

/// Sets the cluster's upstream HTTP version (Envoy's `explicit_http_config`).
fn explicit_protocol(c: &mut Cluster, protocol_config: ProtocolConfig) {
    c.typed_extension_protocol_options.insert(
        "envoy.extensions.upstreams.http.v3.HttpProtocolOptions".into(),
        pack_any(HttpProtocolOptions {
            upstream_protocol_options: Some(
                http_protocol_options::UpstreamProtocolOptions::ExplicitHttpConfig(
                    http_protocol_options::ExplicitHttpConfig {
                        protocol_config: Some(protocol_config),
                    },
                ),
            ),
            ..Default::default()
        }),
    );
}

fn passthrough() -> Cluster {
    Cluster {
        name: "PassthroughCluster".into(),
        cluster_discovery_type: Some(cluster::ClusterDiscoveryType::Type(
            cluster::DiscoveryType::OriginalDst as i32,
        )),
        lb_policy: cluster::LbPolicy::ClusterProvided as i32,
        ..Default::default()
    }
}

/// Route configuration `80`: host `svc` to clusters by weight, host `grpc` to `h2`.
fn routes(weights: &[(&str, u32)]) -> RouteConfiguration {
    let action = |spec| {
        Some(route::Action::Route(RouteAction {
            cluster_specifier: Some(spec),
            timeout: Some(Default::default()),
            ..Default::default()
        }))
    };
    let prefix = || {
        Some(RouteMatch {
            path_specifier: Some(route_match::PathSpecifier::Prefix("/".into())),
            ..Default::default()
        })
    };
    RouteConfiguration {
        name: "80".into(),
        virtual_hosts: vec![
            VirtualHost {
                name: "svc".into(),
                domains: vec!["svc".into(), "svc:80".into()],
                routes: vec![Route {
                    r#match: prefix(),
                    action: action(route_action::ClusterSpecifier::WeightedClusters(
                        WeightedCluster {
                            clusters: weights
                                .iter()
                                .map(|(c, w)| weighted_cluster::ClusterWeight {
                                    name: (*c).into(),
                                    weight: Some(UInt32Value { value: *w }),
                                    ..Default::default()
                                })
                                .collect(),
                            ..Default::default()
                        },
                    )),
                    ..Default::default()
                }],
                ..Default::default()
            },
            VirtualHost {
                name: "grpc".into(),
                domains: vec!["grpc".into(), "grpc:80".into()],
                routes: vec![Route {
                    r#match: prefix(),
                    action: action(route_action::ClusterSpecifier::Cluster("h2".into())),
                    ..Default::default()
                }],
                ..Default::default()
            },
        ],
        ..Default::default()
    }
}

/// A test upstream: answers after `delay`, with a trailer for gRPC-style requests, and
/// upgrades WebSocket requests to a byte echo.
async fn upstream(name: &'static str, delay: Duration, http2_only: bool) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((s, _)) = listener.accept().await else {
                return;
            };
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(
                    move |mut req: http::Request<hyper::body::Incoming>| async move {
                        tokio::time::sleep(delay).await;
                        if req.headers().contains_key(http::header::UPGRADE) {
                            let on = hyper::upgrade::on(&mut req);
                            tokio::spawn(async move {
                                if let Ok(up) = on.await {
                                    let mut io = TokioIo::new(up);
                                    let mut buf = [0u8; 64];
                                    while let Ok(n) = io.read(&mut buf).await {
                                        if n == 0 || io.write_all(&buf[..n]).await.is_err() {
                                            break;
                                        }
                                    }
                                }
                            });
                            return Ok::<_, Infallible>(
                                http::Response::builder()
                                    .status(101)
                                    .header("connection", "upgrade")
                                    .header("upgrade", "websocket")
                                    .body(Full::new(Bytes::new()).boxed_unsync())
                                    .unwrap(),
                            );
                        }
                        let (head, body) = req.into_parts();
                        let body = body
                            .collect()
                            .await
                            .map(|b| b.to_bytes())
                            .unwrap_or_default();
                        let seen = format!(
                            "name={name} version={:?} request-id={} connection={:?} x-custom={:?} host={:?} body={}",
                            head.version,
                            head.headers.contains_key("x-request-id"),
                            head.headers.get("connection"),
                            head.headers.get("x-custom"),
                            head.headers.get("host"),
                            String::from_utf8_lossy(&body),
                        );
                        // gRPC's callers get it as one message.
                        let seen = if head
                            .headers
                            .get("content-type")
                            .is_some_and(|c| c.as_bytes().starts_with(b"application/grpc"))
                        {
                            let mut framed = vec![0];
                            framed.extend((seen.len() as u32).to_be_bytes());
                            framed.extend(seen.into_bytes());
                            framed
                        } else {
                            seen.into_bytes()
                        };
                        // A body followed by trailers, as gRPC ends its responses.
                        let frames = vec![
                            Ok::<_, Infallible>(http_body::Frame::data(Bytes::from(seen))),
                            Ok(http_body::Frame::trailers({
                                let mut t = http::HeaderMap::new();
                                t.insert("grpc-status", http::HeaderValue::from_static("0"));
                                t
                            })),
                        ];
                        Ok(http::Response::builder()
                            .header("content-type", "application/grpc")
                            .body(StreamBody::new(futures_stream(frames)).boxed_unsync())
                            .unwrap())
                    },
                );
                let io = TokioIo::new(s);
                if http2_only {
                    let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                        .serve_connection(io, svc)
                        .await;
                } else {
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(io, svc)
                        .with_upgrades()
                        .await;
                }
            });
        }
    });
    addr
}

fn futures_stream<T: Send + 'static>(items: Vec<T>) -> impl futures::Stream<Item = T> + Send {
    futures::stream::iter(items)
}

/// The proxy and its control plane, running in the current (test) network namespace.
struct Harness {
    fixed: Arc<Fixed>,
    version: watch::Sender<u64>,
    ads: AdsServer<Fixed>,
    quit: Option<tokio::sync::oneshot::Sender<()>>,
    proxy: tokio::task::JoinHandle<Result<(), isthmus_proxy::agent::AgentError>>,
    /// Log levels set through `POST /logging`.
    levels: Arc<std::sync::Mutex<Vec<String>>>,
}

impl Harness {
    /// `sotw_only`: the control plane answers delta ADS with Unimplemented, as one without
    /// delta xDS does.
    async fn start(
        a: SocketAddr,
        b: SocketAddr,
        h2: SocketAddr,
        tcp: SocketAddr,
        sotw_only: bool,
    ) -> Harness {
        let fixed = Arc::new(Fixed::default());
        fixed.put(LISTENER, "virtualOutbound", pack_any(virtual_outbound()));
        fixed.put(
            LISTENER,
            "0.0.0.0_80",
            pack_any(port_listener("0.0.0.0_80", "0.0.0.0", 80, hcm("80"))),
        );
        fixed.put(
            LISTENER,
            "10.96.0.20_5000",
            pack_any(port_listener(
                "10.96.0.20_5000",
                "10.96.0.20",
                5000,
                tcp_proxy("tcp"),
            )),
        );
        fixed.put(ROUTE, "80", pack_any(routes(&[("a", 100), ("b", 0)])));
        fixed.put(CLUSTER, "a", pack_any(static_cluster("a", &[a], false)));
        fixed.put(CLUSTER, "b", pack_any(static_cluster("b", &[b], false)));
        fixed.put(CLUSTER, "h2", pack_any(static_cluster("h2", &[h2], true)));
        fixed.put(
            CLUSTER,
            "tcp",
            pack_any(static_cluster("tcp", &[tcp], false)),
        );
        fixed.put(CLUSTER, "PassthroughCluster", pack_any(passthrough()));
        let (version, rx) = watch::channel(1u64);
        let ads = AdsServer::new(fixed.clone(), rx);
        let xds = tokio::net::TcpListener::bind("127.0.0.1:15010")
            .await
            .unwrap();
        let incoming = tokio_stream::wrappers::TcpListenerStream::new(xds);
        let server = tonic::transport::Server::builder();
        let mut svc = ads.clone().into_service();
        if sotw_only {
            svc = svc.without_delta();
        }
        tokio::spawn(
            server
                .clone()
                .add_service(svc)
                .serve_with_incoming(incoming),
        );
        let (quit, quit_rx) = tokio::sync::oneshot::channel::<()>();
        let opts = Options {
            discovery_address: "127.0.0.1:15010".into(),
            root_cert: None,
            discovery_san: String::new(),
            token_path: "/nonexistent".into(),
            pod_name: "client".into(),
            namespace: "default".into(),
            ips: vec!["127.0.0.1".parse().unwrap()],
            service_account: "default".into(),
            cluster_id: "Kubernetes".into(),
            trust_domain: "cluster.local".into(),
            domain: "cluster.local".into(),
            labels: BTreeMap::new(),
            tproxy: false,
            ports: Ports::default(),
            bind: "0.0.0.0".parse().unwrap(),
            drain_duration: Duration::from_secs(3),
            cert_ttl: Duration::from_secs(3600),
            app_metrics: None,
            proxy_config: None,
            // As a pod's `proxyStatsMatcher: {inclusionPrefixes: [cluster.a.]}`.
            stats_inclusions: isthmus_proxy::envoy_stats::Inclusions::istio(
                &["cluster.a.".into()],
                &[],
                &[],
            )
            .unwrap(),
            dns_capture: false,
            resolv_conf: "/etc/resolv.conf".into(),
            metadata: Default::default(),
        };
        let levels = Arc::new(std::sync::Mutex::new(Vec::new()));
        let seen = levels.clone();
        let setter = isthmus_proxy::log_level::LogLevels::new(
            "info",
            Box::new(move |l: &str| {
                seen.lock().unwrap().push(l.to_string());
                Ok(())
            }),
        );
        let proxy = tokio::spawn(isthmus_proxy::agent::run(opts, Some(setter), async {
            let _ = quit_rx.await;
        }));
        let h = Harness {
            fixed,
            version,
            ads,
            quit: Some(quit),
            proxy,
            levels,
        };
        h.wait_ready().await;
        h
    }

    async fn wait_ready(&self) {
        for _ in 0..100 {
            if http_get("127.0.0.1:15021", "/healthz/ready").await.0 == 200 {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("proxy not ready");
    }

    fn push(&self) {
        self.version.send_modify(|v| *v += 1);
    }

    /// The last NACK of `type_url`, waited for up to 3 s.
    async fn nack(&self, type_url: &str) -> Option<String> {
        for _ in 0..100 {
            let nack = self
                .ads
                .proxies()
                .lock()
                .unwrap()
                .values()
                .find_map(|p| p.types.get(type_url).and_then(|t| t.nack.clone()));
            if nack.is_some() {
                return nack;
            }
            tokio::time::sleep(Duration::from_millis(30)).await;
        }
        None
    }
}

/// A GET on a fresh connection: (status, body).
async fn http_get(addr: &str, path: &str) -> (u16, String) {
    get_with_host(addr, path, addr).await
}

async fn http_get_host(addr: &str, host: &str) -> (u16, String) {
    get_with_host(addr, "/", host).await
}

async fn get_with_host(addr: &str, path: &str, host: &str) -> (u16, String) {
    match request("GET", addr, path, host).await {
        Some((status, _, body)) => (status, body),
        None => (0, String::new()),
    }
}

/// One request on a fresh connection: (status, headers, body), None when it could not be sent.
async fn request(
    method: &str,
    addr: &str,
    path: &str,
    host: &str,
) -> Option<(u16, http::HeaderMap, String)> {
    let s = tokio::net::TcpStream::connect(addr).await.ok()?;
    let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(s))
        .await
        .ok()?;
    tokio::spawn(conn);
    let req = http::Request::builder()
        .method(method)
        .uri(path)
        .header("host", host)
        .body(http_body_util::Empty::<Bytes>::new())
        .ok()?;
    let r = send.send_request(req).await.ok()?;
    let (head, body) = r.into_parts();
    let body = body
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    Some((
        head.status.as_u16(),
        head.headers,
        String::from_utf8_lossy(&body).into_owned(),
    ))
}

fn in_netns<F: std::future::Future<Output = ()>>(f: impl FnOnce() -> F + Send + 'static) {
    if !is_root() {
        eprintln!("skipped: needs root");
        return;
    }
    let ns = Netns::new("proxy");
    // The "service range": local addresses whose traffic iptables hands to 15001.
    ns.exec(&["ip", "route", "add", "local", "10.96.0.0/16", "dev", "lo"]);
    ns.exec(&[
        "iptables",
        "-t",
        "nat",
        "-A",
        "OUTPUT",
        "-p",
        "tcp",
        "-d",
        "10.96.0.0/16",
        "-j",
        "REDIRECT",
        "--to-ports",
        "15001",
    ]);
    ns.run_in(move || {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap()
            .block_on(async { tokio::time::timeout(Duration::from_secs(60), f()).await })
            .expect("test within 60 s");
    });
}

async fn harness() -> (Harness, [SocketAddr; 4]) {
    harness_with(false).await
}

async fn harness_with(sotw_only: bool) -> (Harness, [SocketAddr; 4]) {
    let a = upstream("a", Duration::ZERO, false).await;
    let b = upstream("b", Duration::ZERO, false).await;
    let h2 = upstream("h2", Duration::ZERO, true).await;
    let tcp = upstream("tcp", Duration::ZERO, false).await;
    (
        Harness::start(a, b, h2, tcp, sotw_only).await,
        [a, b, h2, tcp],
    )
}

#[test]
fn http1_routing_headers_chunked_keepalive_and_upgrades() {
    in_netns(|| async {
        let (_h, _) = harness().await;
        // Keep-alive: three requests on one connection, one with a chunked body.
        let s = tokio::net::TcpStream::connect("10.96.0.10:80")
            .await
            .unwrap();
        let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(s))
            .await
            .unwrap();
        tokio::spawn(conn);
        for i in 0..3 {
            send.ready().await.unwrap();
            let body = futures_stream(vec![
                Ok::<_, Infallible>(http_body::Frame::data(Bytes::from("chunk-1,"))),
                Ok(http_body::Frame::data(Bytes::from(format!("chunk-{i}")))),
            ]);
            let req = http::Request::post("/x")
                .header("host", "svc")
                .header("connection", "x-custom")
                .header("x-custom", "hop-by-hop")
                .body(StreamBody::new(body))
                .unwrap();
            let resp = send.send_request(req).await.unwrap();
            assert_eq!(resp.status(), 200);
            let text =
                String::from_utf8_lossy(&resp.into_body().collect().await.unwrap().to_bytes())
                    .into_owned();
            assert!(text.starts_with("name=a"), "{text}");
            assert!(
                text.contains("request-id=true"),
                "x-request-id added: {text}"
            );
            assert!(
                text.contains("x-custom=None"),
                "hop-by-hop header crossed: {text}"
            );
            assert!(text.contains(&format!("body=chunk-1,chunk-{i}")), "{text}");
        }
        // Unknown host: no route (404, Envoy's NR).
        let (status, _) = http_get("10.96.0.10:80", "/").await;
        assert_eq!(status, 404);

        // WebSocket: the upgrade crosses the proxy and bytes flow both ways.
        let mut s = tokio::net::TcpStream::connect("10.96.0.10:80")
            .await
            .unwrap();
        s.write_all(
            b"GET /ws HTTP/1.1\r\nHost: svc\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n",
        )
        .await
        .unwrap();
        let mut head = vec![0u8; 256];
        let n = s.read(&mut head).await.unwrap();
        let head = String::from_utf8_lossy(&head[..n]).to_ascii_lowercase();
        assert!(head.starts_with("http/1.1 101"), "{head}");
        assert!(head.contains("upgrade: websocket"), "{head}");
        s.write_all(b"ping").await.unwrap();
        let mut buf = [0u8; 4];
        s.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"ping");

        // Opaque TCP on a TCP service port.
        let all = tcp_service_get().await;
        assert!(all.contains("name=tcp"), "{all}");
    });
}

#[test]
fn h2c_and_grpc_trailers_pass_through() {
    in_netns(|| async {
        let (_h, _) = harness().await;
        let s = tokio::net::TcpStream::connect("10.96.0.10:80")
            .await
            .unwrap();
        let (mut send, conn) =
            hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(s))
                .await
                .unwrap();
        tokio::spawn(conn);
        // Two empty messages.
        let req = http::Request::post("http://grpc/echo.Echo/Call")
            .header("content-type", "application/grpc")
            .header("te", "trailers")
            .body(Full::new(Bytes::from_static(&[0; 10])))
            .unwrap();
        let resp = send.send_request(req).await.unwrap();
        assert_eq!(resp.status(), 200);
        let collected = resp.into_body().collect().await.unwrap();
        let trailers = collected.trailers().cloned().expect("trailers");
        assert_eq!(trailers.get("grpc-status").unwrap(), "0");
        let text = String::from_utf8_lossy(&collected.to_bytes()).into_owned();
        // The upstream is HTTP/2 only: the cluster's protocol options were followed.
        assert!(text.contains("name=h2 version=HTTP/2.0"), "{text}");
        // Istio's gRPC metrics: the messages each way, and the call's status.
        let (_, prom) = http_get("127.0.0.1:15090", "/stats/prometheus").await;
        let line = |metric: &str| {
            prom.lines()
                .find(|l| l.starts_with(&format!("{metric}{{")))
                .unwrap_or_else(|| panic!("no {metric}: {prom}"))
                .to_string()
        };
        let sent = line("istio_request_messages_total");
        assert!(
            sent.contains("request_protocol=\"grpc\"")
                && sent.contains("grpc_response_status=\"0\"")
                && sent.ends_with(" 2"),
            "{sent}"
        );
        assert!(
            line("istio_response_messages_total").ends_with(" 1"),
            "{prom}"
        );
    });
}

#[test]
fn unsupported_config_is_nacked_and_the_previous_config_stays() {
    in_netns(|| async {
        let (h, _) = harness().await;
        let bad = port_listener(
            "0.0.0.0_3306",
            "0.0.0.0",
            3306,
            typed(
                "envoy.filters.network.mysql_proxy",
                Any {
                    type_url: "type.googleapis.com/envoy.extensions.filters.network.mysql_proxy.v3.MySQLProxy".into(),
                    value: vec![],
                },
            ),
        );
        h.fixed.put(LISTENER, "0.0.0.0_3306", pack_any(bad));
        h.push();
        let nack = h.nack(LISTENER).await;
        let nack = nack.expect("a NACK");
        assert!(
            nack.contains("0.0.0.0_3306")
                && nack.contains("mysql_proxy")
                && nack.contains("not supported"),
            "{nack}"
        );
        // The accepted listeners are still in force, and traffic still flows.
        let (_, dump) = http_get(
            "127.0.0.1:15000",
            "/config_dump?resource=dynamic_listeners&mask=name",
        )
        .await;
        assert!(
            dump.contains("0.0.0.0_80") && !dump.contains("0.0.0.0_3306"),
            "{dump}"
        );
        let (status, body) = http_get_host("10.96.0.10:80", "svc").await;
        assert_eq!(status, 200, "{body}");

        // A cluster asking for HTTP/3 upstream, which this proxy does not speak.
        let mut h3 = static_cluster("h3", &["127.0.0.1:9".parse().unwrap()], false);
        explicit_protocol(
            &mut h3,
            ProtocolConfig::Http3ProtocolOptions(Default::default()),
        );
        h.fixed.put(CLUSTER, "h3", pack_any(h3));
        h.push();
        let nack = h.nack(CLUSTER).await;
        let nack = nack.expect("a NACK of the cluster");
        assert!(nack.contains("h3") && nack.contains("HTTP/3"), "{nack}");
        let (status, body) = http_get_host("10.96.0.10:80", "svc").await;
        assert_eq!(status, 200, "{body}");
    });
}

#[test]
fn route_updates_under_load_fail_no_request() {
    in_netns(|| async {
        let (h, _) = harness().await;
        let h = Arc::new(h);
        // Shift traffic a→b and back every 40 ms while four keep-alive clients send requests.
        let flipper = {
            let h = h.clone();
            tokio::spawn(async move {
                for i in 0..25 {
                    let w = if i % 2 == 0 {
                        [("a", 0), ("b", 100)]
                    } else {
                        [("a", 100), ("b", 0)]
                    };
                    h.fixed.put(ROUTE, "80", pack_any(routes(&w)));
                    h.push();
                    tokio::time::sleep(Duration::from_millis(40)).await;
                }
            })
        };
        let mut clients = Vec::new();
        for _ in 0..4 {
            clients.push(tokio::spawn(async move {
                let s = tokio::net::TcpStream::connect("10.96.0.10:80")
                    .await
                    .unwrap();
                let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(s))
                    .await
                    .unwrap();
                tokio::spawn(conn);
                let (mut ok, mut failed, mut seen) = (0, 0, BTreeSet::new());
                let start = std::time::Instant::now();
                while start.elapsed() < Duration::from_millis(1000) {
                    send.ready().await.unwrap();
                    let req = http::Request::get("/")
                        .header("host", "svc")
                        .body(http_body_util::Empty::<Bytes>::new())
                        .unwrap();
                    match send.send_request(req).await {
                        Ok(r) if r.status() == 200 => {
                            let body = r.into_body().collect().await.unwrap().to_bytes();
                            seen.insert(String::from_utf8_lossy(&body[..6]).into_owned());
                            ok += 1;
                        }
                        _ => failed += 1,
                    }
                }
                (ok, failed, seen)
            }));
        }
        let mut total = 0;
        let mut seen = BTreeSet::new();
        for c in clients {
            let (ok, failed, s) = c.await.unwrap();
            assert_eq!(failed, 0, "requests failed during updates");
            total += ok;
            seen.extend(s);
        }
        flipper.await.unwrap();
        assert!(total > 100, "only {total} requests");
        // The updates took effect on connections already open.
        assert_eq!(
            seen,
            BTreeSet::from(["name=a".to_string(), "name=b".to_string()])
        );
    });
}

#[test]
fn drain_finishes_in_flight_requests_and_refuses_new_ones() {
    in_netns(|| async {
        let slow = upstream("a", Duration::from_millis(800), false).await;
        let b = upstream("b", Duration::ZERO, false).await;
        let mut h = Harness::start(slow, b, b, b, false).await;
        let in_flight = tokio::spawn(http_get_host("10.96.0.10:80", "svc"));
        tokio::time::sleep(Duration::from_millis(200)).await;
        let _ = h.quit.take().unwrap().send(());
        tokio::time::sleep(Duration::from_millis(100)).await;
        // Draining: not ready, and no new connections are taken.
        assert_ne!(http_get("127.0.0.1:15021", "/healthz/ready").await.0, 200);
        let (status, _) = tokio::time::timeout(
            Duration::from_secs(2),
            http_get_host("10.96.0.10:80", "svc"),
        )
        .await
        .unwrap_or((0, String::new()));
        assert_ne!(status, 200, "a new connection was served while draining");
        let (status, body) = in_flight.await.unwrap();
        assert_eq!(status, 200, "in-flight request cut: {body}");
        let done = tokio::time::timeout(Duration::from_secs(5), &mut h.proxy).await;
        assert!(done.is_ok(), "proxy did not exit after draining");
    });
}

/// A request to the admin port: (status, body).
async fn admin(method: &str, path: &str) -> (u16, String) {
    let (status, _, body) = request(method, "127.0.0.1:15000", path, "127.0.0.1:15000")
        .await
        .expect("admin request");
    (status, body)
}

/// HTTP/1.1 as opaque bytes through the TCP service `10.96.0.20:5000`: the raw answer.
async fn tcp_service_get() -> String {
    let mut t = tokio::net::TcpStream::connect("10.96.0.20:5000")
        .await
        .unwrap();
    t.write_all(b"GET / HTTP/1.1\r\nHost: raw\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut all = String::new();
    t.read_to_string(&mut all).await.unwrap();
    all
}

/// One HTTP/1.1 GET to the `svc` host on its own connection, with `x-tenant`: the raw answer.
async fn tenant_get(addr: &str, tenant: &str) -> String {
    let Ok(mut s) = tokio::net::TcpStream::connect(addr).await else {
        return String::new();
    };
    let req =
        format!("GET /r HTTP/1.1\r\nHost: svc\r\nx-tenant: {tenant}\r\nConnection: close\r\n\r\n");
    let mut out = String::new();
    if s.write_all(req.as_bytes()).await.is_ok() {
        let _ = s.read_to_string(&mut out).await;
    }
    out
}

#[test]
fn the_stats_filter_decides_which_metrics_and_labels_requests_and_connections_report() {
    in_netns(|| async {
        let (h, _) = harness().await;
        let overrides = serde_json::json!({"metrics": [
            {"name": "requests_total", "dimensions": {
                "request_host": "request.host",
                "tenant": "request.headers['x-tenant']",
                "response_code": "'overridden'",
            }, "tags_to_remove": ["request_protocol"]},
            {"name": "request_duration_milliseconds", "drop": true},
        ]});
        h.fixed.put(
            LISTENER,
            "0.0.0.0_80",
            pack_any(port_listener(
                "0.0.0.0_80",
                "0.0.0.0",
                80,
                hcm_with_stats("80", Some(overrides)),
            )),
        );
        // Without the filter: no Istio metrics.
        h.fixed.put(
            LISTENER,
            "0.0.0.0_81",
            pack_any(port_listener(
                "0.0.0.0_81",
                "0.0.0.0",
                81,
                hcm_with_stats("80", None),
            )),
        );
        let mut tcp = port_listener("10.96.0.20_5000", "10.96.0.20", 5000, tcp_proxy("tcp"));
        tcp.filter_chains[0].filters.insert(
            0,
            typed(
                "istio.stats",
                stats_filter(serde_json::json!({
                    "tcp_reporting_duration": "0.2s",
                    "metrics": [{
                        "dimensions": {"destination_port": "string(destination.port)"},
                        "tags_to_remove": ["source_principal"],
                    }],
                })),
            ),
        );
        h.fixed.put(LISTENER, "10.96.0.20_5000", pack_any(tcp));
        h.push();
        let mut answer = String::new();
        for _ in 0..100 {
            answer = tenant_get("10.96.0.10:81", "none").await;
            if answer.starts_with("HTTP/1.1 200") {
                break;
            }
            tokio::time::sleep(Duration::from_millis(30)).await;
        }
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
        for _ in 0..3 {
            let answer = tenant_get("10.96.0.10:80", "acme").await;
            assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
        }
        // A long connection's bytes count while it lasts (here every 0.2 s).
        let mut long = tokio::net::TcpStream::connect("10.96.0.20:5000")
            .await
            .unwrap();
        let ask = b"GET / HTTP/1.1\r\nHost: raw\r\n\r\n";
        long.write_all(ask).await.unwrap();
        let mut head = [0u8; 12];
        long.read_exact(&mut head).await.unwrap();
        assert_eq!(&head, b"HTTP/1.1 200");
        let mut prom = String::new();
        for _ in 0..100 {
            prom = http_get("127.0.0.1:15090", "/stats/prometheus").await.1;
            if prom.contains("istio_tcp_received_bytes_total{") {
                break;
            }
            tokio::time::sleep(Duration::from_millis(30)).await;
        }
        let received = prom
            .lines()
            .find(|l| l.starts_with("istio_tcp_received_bytes_total{"))
            .unwrap_or_else(|| panic!("no bytes while open: {prom}"));
        assert!(received.ends_with(&format!(" {}", ask.len())), "{received}");
        assert!(
            !prom.contains("istio_tcp_connections_closed_total{"),
            "{prom}"
        );
        drop(long);
        let raw = tcp_service_get().await;
        assert!(raw.starts_with("HTTP/1.1 200"), "{raw}");

        for _ in 0..100 {
            prom = http_get("127.0.0.1:15090", "/stats/prometheus").await.1;
            // Both TCP connections closed.
            if prom
                .lines()
                .any(|l| l.starts_with("istio_tcp_connections_closed_total{") && l.ends_with(" 2"))
            {
                break;
            }
            tokio::time::sleep(Duration::from_millis(30)).await;
        }
        let series = |metric: &str| -> Vec<&str> {
            prom.lines()
                .filter(|l| l.starts_with(&format!("{metric}{{")))
                .collect()
        };
        // Only port 80's three requests, labelled as its overrides say.
        let requests = series("istio_requests_total");
        assert_eq!(requests.len(), 1, "{prom}");
        let r = requests[0];
        assert!(r.ends_with(" 3"), "{r}");
        for label in [
            "request_host=\"svc\"",
            "tenant=\"acme\"",
            "response_code=\"overridden\"",
            "reporter=\"source\"",
            // Istio's canonical labels: this pod has no labels, so its name and `latest`.
            "source_canonical_service=\"client\"",
            "source_canonical_revision=\"latest\"",
            "destination_canonical_service=\"unknown\"",
            "destination_canonical_revision=\"latest\"",
            // The cluster names no service: the client side names it by the Host.
            "destination_service=\"svc\"",
            "destination_service_name=\"svc\"",
        ] {
            assert!(r.contains(label), "{label}: {r}");
        }
        assert!(!r.contains("request_protocol="), "{r}");
        assert_eq!(r.matches("response_code=").count(), 1, "{r}");
        assert!(
            series("istio_request_duration_milliseconds_count").is_empty(),
            "{prom}"
        );
        // The other metrics keep their standard labels.
        let sizes = series("istio_request_bytes_count");
        assert_eq!(sizes.len(), 1, "{prom}");
        assert!(
            sizes[0].contains("request_protocol=\"http\"")
                && sizes[0].contains("response_code=\"200\"")
                && !sizes[0].contains("tenant=")
                && sizes[0].ends_with(" 3"),
            "{}",
            sizes[0]
        );
        // The TCP chain's filter: every TCP metric, without the principal, with the port.
        for metric in [
            "istio_tcp_connections_opened_total",
            "istio_tcp_connections_closed_total",
            "istio_tcp_sent_bytes_total",
            "istio_tcp_received_bytes_total",
        ] {
            let s = series(metric);
            assert_eq!(s.len(), 1, "{metric}: {prom}");
            assert!(
                s[0].contains("destination_port=\"5000\"")
                    && s[0].contains("request_protocol=\"tcp\"")
                    && !s[0].contains("source_principal="),
                "{}",
                s[0]
            );
        }
        // Counted while open and at the close, each byte once: both requests, as sent.
        let received = series("istio_tcp_received_bytes_total")[0];
        let both = 2 * b"GET / HTTP/1.1\r\nHost: raw\r\n".len()
            + "\r\n".len()
            + "Connection: close\r\n\r\n".len();
        assert!(received.ends_with(&format!(" {both}")), "{received}");
    });
}

#[test]
fn admin_endpoints_answer_like_envoys() {
    in_netns(|| async {
        let (mut h, [a, ..]) = harness().await;
        assert_eq!(http_get_host("10.96.0.10:80", "svc").await.0, 200);
        let (_, info) = admin("GET", "/server_info").await;
        assert!(info.contains("\"state\": \"LIVE\""), "{info}");
        let info: serde_json::Value = serde_json::from_str(&info).unwrap();
        assert_eq!(info["node"]["metadata"]["NAME"], "client", "{info}");
        // The dump begins with the bootstrap: the node, the control plane as `xds-grpc`, and
        // the Prometheus and health listeners this proxy serves, as Istio's bootstrap has them.
        let (_, dump) = admin("GET", "/config_dump").await;
        let dump: serde_json::Value = serde_json::from_str(&dump).unwrap();
        let bootstrap = &dump["configs"][0];
        assert_eq!(
            bootstrap["@type"],
            "type.googleapis.com/envoy.admin.v3.BootstrapConfigDump"
        );
        assert_eq!(
            bootstrap["bootstrap"]["node"]["id"],
            "sidecar~127.0.0.1~client.default~default.svc.cluster.local"
        );
        assert_eq!(
            bootstrap["bootstrap"]["dynamic_resources"]["ads_config"]["grpc_services"][0]["envoy_grpc"]
                ["cluster_name"],
            "xds-grpc"
        );
        let (_, fixed) = admin(
            "GET",
            "/config_dump?resource=static_listeners&mask=listener.name",
        )
        .await;
        assert!(
            fixed.contains("0.0.0.0_15090") && fixed.contains("0.0.0.0_15021"),
            "{fixed}"
        );
        let (_, fixed) = admin("GET", "/config_dump?resource=static_clusters").await;
        assert!(
            fixed.contains("\"xds-grpc\"") && fixed.contains("\"port_value\": 15010"),
            "{fixed}"
        );
        // Listeners' inline routes are listed as static route configurations.
        let (_, inline) = admin("GET", "/config_dump?resource=static_route_configs").await;
        assert!(inline.contains("/stats/prometheus"), "{inline}");
        let (_, clusters) = admin("GET", "/clusters").await;
        assert!(
            clusters.contains(&format!("a::{a}::rq_total::1")),
            "{clusters}"
        );
        assert!(
            clusters.contains(&format!("a::{a}::health_flags::healthy")),
            "{clusters}"
        );
        // The one request's connection: made, and pooled open.
        for line in ["cx_total::1", "cx_active::1", "cx_connect_fail::0"] {
            assert!(clusters.contains(&format!("a::{a}::{line}")), "{clusters}");
        }
        // The JSON form istioctl reads, in Envoy's shape.
        let (_, body) = admin("GET", "/clusters?format=json").await;
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        let host = v["cluster_statuses"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["name"] == "a")
            .map(|c| &c["host_statuses"][0])
            .unwrap_or_else(|| panic!("{body}"));
        assert_eq!(
            host["address"]["socket_address"]["port_value"],
            a.port(),
            "{body}"
        );
        assert_eq!(host["health_status"]["eds_health_status"], "HEALTHY");
        let stat = |name: &str| {
            host["stats"]
                .as_array()
                .unwrap()
                .iter()
                .find(|s| s["name"] == name)
                .map(|s| s["value"].clone())
        };
        assert_eq!(stat("rq_total"), Some("1".into()), "{body}");
        assert_eq!(stat("cx_total"), Some("1".into()), "{body}");
        assert_eq!(stat("cx_active"), Some("1".into()), "{body}");
        let (_, stats) = admin("GET", "/stats?filter=upstream_rq").await;
        assert!(
            !stats.is_empty() && stats.lines().all(|l| l.contains("upstream_rq")),
            "{stats}"
        );
        // Envoy's stats read when asked: the server's and each cluster's gauges, and the xDS
        // updates taken.
        let (_, stats) = admin("GET", "/stats").await;
        for line in [
            "server.live: 1\n",
            "server.state: 0\n",
            "cluster.a.upstream_cx_active: 1\n",
            "cluster.a.upstream_rq_active: 0\n",
            "cluster.a.membership_total: 1\n",
            "cluster.a.membership_healthy: 1\n",
            "cluster_manager.cds.update_rejected: 0\n",
            // The control plane's session, as Envoy's `xds-grpc` cluster.
            "control_plane.connected_state: 1\n",
            "cluster.xds-grpc.upstream_cx_active: 1\n",
            "cluster.xds-grpc.upstream_cx_connect_fail: 0\n",
        ] {
            assert!(stats.contains(line), "{line}: {stats}");
        }
        let count = |name: &str| -> u64 {
            stat_value(&stats, name).unwrap_or_else(|| panic!("no {name} in {stats}"))
        };
        assert!(count("cluster_manager.cds.update_success") >= 1, "{stats}");
        assert!(count("listener_manager.lds.update_success") >= 1, "{stats}");
        assert!(count("cluster_manager.active_clusters") >= 5, "{stats}");
        assert!(count("cluster.xds-grpc.upstream_rq_total") >= 1, "{stats}");
        // The same in Envoy's JSON form.
        let (_, body) = admin("GET", "/stats?format=json&filter=^server\\.").await;
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        let names: Vec<&str> = v["stats"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|s| s["name"].as_str())
            .collect();
        assert!(
            names.contains(&"server.live") && names.iter().all(|n| n.starts_with("server.")),
            "{body}"
        );
        assert!(
            v["stats"]
                .as_array()
                .unwrap()
                .iter()
                .any(|s| s["name"] == "server.live" && s["value"] == 1),
            "{body}"
        );
        // Prometheus gets Istio's metrics, and of Envoy's stats those Istio exports (its list
        // and the pod's `cluster.a.`), named with Istio's tags.
        let (_, prom) = http_get("127.0.0.1:15090", "/stats/prometheus").await;
        assert!(
            prom.contains("istio_requests_total{reporter=\"source\""),
            "{prom}"
        );
        let build = format!(
            "# TYPE istio_build gauge\nistio_build{{component=\"proxy\",tag=\"{}\"}} 1\n",
            env!("CARGO_PKG_VERSION")
        );
        assert!(prom.contains(&build), "{prom}");
        for line in [
            "# TYPE envoy_cluster_upstream_rq_total counter\nenvoy_cluster_upstream_rq_total{cluster_name=\"a\"} 1\n",
            "envoy_cluster_upstream_rq{cluster_name=\"a\",response_code_class=\"2xx\"} 1\n",
            "# TYPE envoy_cluster_upstream_cx_active gauge\nenvoy_cluster_upstream_cx_active{cluster_name=\"a\"} 1\n",
            "# TYPE envoy_server_live gauge\nenvoy_server_live 1\n",
            // Istio's list keeps the control plane's cluster.
            "envoy_cluster_upstream_cx_active{cluster_name=\"xds-grpc\"} 1\n",
            "# TYPE envoy_cluster_manager_cds_update_rejected counter\nenvoy_cluster_manager_cds_update_rejected 0\n",
        ] {
            assert!(prom.contains(line), "{line}: {prom}");
        }
        // Not cluster b's: neither Istio's list nor the pod's has them.
        assert!(!prom.contains("cluster_name=\"b\""), "{prom}");
        // A connection held open counts on its listener and its connection manager, which
        // Istio exports (`downstream_cx_active`), and no more once closed.
        let active = [
            "envoy_listener_downstream_cx_active{listener_address=\"0.0.0.0_80\"}",
            "envoy_http_downstream_cx_active{http_conn_manager_prefix=\"80\"}",
        ];
        let gauges = || async {
            let (_, prom) = http_get("127.0.0.1:15090", "/stats/prometheus").await;
            active.map(|g| {
                prom.lines()
                    .find_map(|l| l.strip_prefix(g)?.trim().parse::<u64>().ok())
                    .unwrap_or_else(|| panic!("no {g} in {prom}"))
            })
        };
        let mut held = tokio::net::TcpStream::connect("10.96.0.10:80")
            .await
            .unwrap();
        held.write_all(b"GET / HTTP/1.1\r\nHost: svc\r\n\r\n")
            .await
            .unwrap();
        let mut buf = [0u8; 512];
        assert!(held.read(&mut buf).await.unwrap() > 0);
        assert_eq!(gauges().await, [1, 1]);
        drop(held);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while gauges().await != [0, 0] {
            assert!(
                tokio::time::Instant::now() < deadline,
                "{:?}",
                gauges().await
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(admin("GET", "/logging?level=debug").await.0, 405);
        assert_eq!(admin("POST", "/logging?level=debug").await.0, 200);
        assert_eq!(admin("POST", "/logging?level=loud").await.0, 400);
        assert_eq!(admin("POST", "/logging?level=warning").await.0, 200);
        assert_eq!(*h.levels.lock().unwrap(), vec!["debug", "warn"]);
        // One logger: the filter of its modules changes, the list shows it.
        let (status, list) = admin("POST", "/logging?rbac=debug").await;
        assert_eq!(status, 200);
        assert!(
            list.starts_with("active loggers:\n  admin: warning\n"),
            "{list}"
        );
        assert!(list.contains("\n  rbac: debug\n"), "{list}");
        assert_eq!(
            h.levels.lock().unwrap().last().unwrap(),
            "warn,isthmus_proxy::config::rbac=debug"
        );
        assert_eq!(admin("POST", "/logging?router9=debug").await.0, 400);
        // Without parameters it lists the levels in force, in Envoy's names for them.
        let (status, again) = admin("POST", "/logging").await;
        assert_eq!((status, &again), (200, &list));
        let (status, dump) = admin(
            "GET",
            "/config_dump?resource=dynamic_active_clusters&mask=cluster.name",
        )
        .await;
        assert_eq!(status, 200);
        assert!(
            dump.contains("\"name\": \"a\"") && !dump.contains("connect_timeout"),
            "{dump}"
        );
        // quitquitquit: the proxy drains and exits.
        assert_eq!(admin("POST", "/quitquitquit").await.0, 200);
        let done = tokio::time::timeout(Duration::from_secs(5), &mut h.proxy).await;
        assert!(done.is_ok(), "proxy still running after /quitquitquit");
    });
}

#[test]
fn circuit_breakers_answer_overflow_with_x_envoy_overloaded() {
    in_netns(|| async {
        let (h, _) = harness().await;
        // Cluster `a` now: a slow upstream, one connection and one pending request allowed.
        let slow = upstream("slow", Duration::from_millis(600), false).await;
        let mut c = static_cluster("a", &[slow], false);
        c.circuit_breakers = Some(
            envoy_types::pb::envoy::config::cluster::v3::CircuitBreakers {
                thresholds: vec![
                    envoy_types::pb::envoy::config::cluster::v3::circuit_breakers::Thresholds {
                        max_connections: Some(UInt32Value { value: 1 }),
                        max_pending_requests: Some(UInt32Value { value: 1 }),
                        ..Default::default()
                    },
                ],
                ..Default::default()
            },
        );
        h.fixed.put(CLUSTER, "a", pack_any(c));
        h.push();
        for _ in 0..100 {
            let (_, dump) = admin("GET", "/config_dump?resource=dynamic_active_clusters").await;
            if dump.contains("max_pending_requests") {
                break;
            }
            tokio::time::sleep(Duration::from_millis(30)).await;
        }
        let calls: Vec<_> = (0..4)
            .map(|_| tokio::spawn(overloaded_get("10.96.0.10:80", "svc")))
            .collect();
        let mut ok = 0;
        let mut overflow = 0;
        for c in calls {
            match c.await.unwrap() {
                (200, _) => ok += 1,
                (503, true) => overflow += 1,
                other => panic!("unexpected {other:?}"),
            }
        }
        assert_eq!((ok, overflow), (2, 2));
        let (_, stats) = admin("GET", "/stats?filter=overflow").await;
        assert!(
            stats.contains("cluster.a.upstream_rq_pending_overflow: 2"),
            "{stats}"
        );
    });
}

/// A GET: (status, whether `x-envoy-overloaded` was set).
async fn overloaded_get(addr: &str, host: &str) -> (u16, bool) {
    let (status, headers, _) = request("GET", addr, "/", host).await.expect("request");
    (status, headers.contains_key("x-envoy-overloaded"))
}

#[test]
fn non_http_bytes_on_an_http_port_fail_fast_and_are_counted() {
    in_netns(|| async {
        let (_h, _) = harness().await;
        let mut s = tokio::net::TcpStream::connect("10.96.0.10:80")
            .await
            .unwrap();
        s.write_all(b"\x16\x03\x01\x00\x05hello\r\n\r\n")
            .await
            .unwrap();
        let mut got = Vec::new();
        // Answered (400) and closed, not left hanging.
        tokio::time::timeout(Duration::from_secs(3), s.read_to_end(&mut got))
            .await
            .expect("connection closed in time")
            .unwrap();
        let (_, stats) = admin("GET", "/stats?filter=protocol_error").await;
        assert!(stats.contains("downstream_cx_protocol_error: 1"), "{stats}");
    });
}

#[test]
fn fault_injection_delays_and_aborts_per_route() {
    in_netns(|| async {
        let (h, _) = harness().await;
        // What the control plane makes of a VirtualService `fault`: per-route fault config.
        let mut rc = routes(&[("a", 100), ("b", 0)]);
        let fault = envoy_types::pb::envoy::extensions::filters::http::fault::v3::HttpFault {
            delay: Some(envoy_types::pb::envoy::extensions::filters::common::fault::v3::FaultDelay {
                fault_delay_secifier: Some(
                    envoy_types::pb::envoy::extensions::filters::common::fault::v3::fault_delay::FaultDelaySecifier::FixedDelay(
                        envoy_types::pb::google::protobuf::Duration { seconds: 0, nanos: 50_000_000 },
                    ),
                ),
                ..Default::default()
            }),
            abort: Some(envoy_types::pb::envoy::extensions::filters::http::fault::v3::FaultAbort {
                error_type: Some(
                    envoy_types::pb::envoy::extensions::filters::http::fault::v3::fault_abort::ErrorType::HttpStatus(418),
                ),
                ..Default::default()
            }),
            ..Default::default()
        };
        rc.virtual_hosts[0].routes[0]
            .typed_per_filter_config
            .insert("envoy.filters.http.fault".into(), pack_any(fault));
        h.fixed.put(ROUTE, "80", pack_any(rc));
        h.push();
        let mut status = 0;
        for _ in 0..100 {
            status = http_get_host("10.96.0.10:80", "svc").await.0;
            if status == 418 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(30)).await;
        }
        assert_eq!(status, 418, "abort not injected");
        let (_, stats) = admin("GET", "/stats?filter=fault").await;
        assert!(
            stats.contains("fault.aborts_injected") && stats.contains("fault.delays_injected"),
            "{stats}"
        );
        // Other hosts are untouched.
        let s = tokio::net::TcpStream::connect("10.96.0.10:80")
            .await
            .unwrap();
        let (mut send, conn) =
            hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(s))
                .await
                .unwrap();
        tokio::spawn(conn);
        let req = http::Request::post("http://grpc/x")
            .body(Full::new(Bytes::from_static(b"x")))
            .unwrap();
        assert_eq!(send.send_request(req).await.unwrap().status(), 200);
    });
}

#[test]
fn weighted_routes_split_traffic_within_statistical_bounds() {
    in_netns(|| async {
        let (h, _) = harness().await;
        // `b` has its own header edits (Istio's headers of one destination of a split) and a
        // host rewrite.
        let mut rc = routes(&[("a", 70), ("b", 30)]);
        if let Some(route::Action::Route(RouteAction {
            cluster_specifier: Some(route_action::ClusterSpecifier::WeightedClusters(w)),
            ..
        })) = &mut rc.virtual_hosts[0].routes[0].action
        {
            let header = |key: &str, value: &str| {
                envoy_types::pb::envoy::config::core::v3::HeaderValueOption {
                    header: Some(envoy_types::pb::envoy::config::core::v3::HeaderValue {
                        key: key.into(),
                        value: value.into(),
                        ..Default::default()
                    }),
                    ..Default::default()
                }
            };
            let b = &mut w.clusters[1];
            b.request_headers_to_add = vec![header("x-custom", "to-b")];
            b.response_headers_to_add = vec![header("x-split", "b")];
            b.host_rewrite_specifier = Some(
                weighted_cluster::cluster_weight::HostRewriteSpecifier::HostRewriteLiteral(
                    "b.internal".into(),
                ),
            );
        }
        h.fixed.put(ROUTE, "80", pack_any(rc));
        h.push();
        let s = tokio::net::TcpStream::connect("10.96.0.10:80")
            .await
            .unwrap();
        let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(s))
            .await
            .unwrap();
        tokio::spawn(conn);
        let mut get = async || {
            send.ready().await.unwrap();
            let req = http::Request::get("/")
                .header("host", "svc")
                .body(http_body_util::Empty::<Bytes>::new())
                .unwrap();
            let r = send.send_request(req).await.unwrap();
            assert_eq!(r.status(), 200);
            let split = r.headers().get("x-split").cloned();
            let body = r.into_body().collect().await.unwrap().to_bytes();
            let body = String::from_utf8_lossy(&body).into_owned();
            // Only `b`'s requests and answers carry its edits.
            let to_b = body.starts_with("name=b");
            assert_eq!(body.contains("x-custom=Some(\"to-b\")"), to_b, "{body}");
            assert_eq!(body.contains("host=Some(\"b.internal\")"), to_b, "{body}");
            assert_eq!(split.is_some_and(|v| v == "b"), to_b, "{body}");
            body[..6].to_string()
        };
        // The new weights are in force once `b` answers at all.
        let mut waited = 0;
        while get().await != "name=b" {
            waited += 1;
            assert!(waited < 2000, "the 70/30 split never took effect");
        }
        const N: usize = 2000;
        let mut b = 0;
        for _ in 0..N {
            if get().await == "name=b" {
                b += 1;
            }
        }
        // Binomial(2000, 0.3): mean 600, standard deviation 20.5; 5 deviations either way
        // fail a correct split about once in 1.7 million runs.
        assert!(
            (498..=702).contains(&b),
            "b answered {b} of {N}, expected 600 ± 102"
        );
    });
}

/// A POST with a small body on a new connection: status and body of the answer.
async fn post(addr: &str, host: &str, path: &str, body: &'static str) -> (u16, String) {
    let s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(s))
        .await
        .unwrap();
    tokio::spawn(conn);
    let req = http::Request::post(path)
        .header("host", host)
        .body(Full::new(Bytes::from_static(body.as_bytes())))
        .unwrap();
    let r = send.send_request(req).await.unwrap();
    let status = r.status().as_u16();
    let body = r.into_body().collect().await.unwrap().to_bytes();
    (status, String::from_utf8_lossy(&body).into_owned())
}

/// An HTTP/1.1 test upstream on loopback: `on_accept` runs for each connection, `handle` for
/// each request.
async fn http1_upstream<F, Fut>(on_accept: impl Fn() + Send + 'static, handle: F) -> SocketAddr
where
    F: Fn(http::Request<hyper::body::Incoming>) -> Fut + Clone + Send + 'static,
    Fut: std::future::Future<Output = http::Response<Full<Bytes>>> + Send + 'static,
{
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((s, _)) = listener.accept().await {
            on_accept();
            let handle = handle.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |req| {
                    let response = handle(req);
                    async move { Ok::<_, Infallible>(response.await) }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(s), svc)
                    .await;
            });
        }
    });
    addr
}

/// An upstream that answers 200 and reports the Host and body of every request it gets.
async fn recorder() -> (
    SocketAddr,
    tokio::sync::mpsc::UnboundedReceiver<(String, Bytes)>,
) {
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let addr = http1_upstream(
        || {},
        move |req: http::Request<hyper::body::Incoming>| {
            let tx = tx.clone();
            async move {
                let host = req
                    .headers()
                    .get(http::header::HOST)
                    .and_then(|h| h.to_str().ok())
                    .unwrap_or_default()
                    .to_string();
                let body = req.into_body().collect().await.unwrap().to_bytes();
                let _ = tx.send((host, body));
                http::Response::new(Full::new(Bytes::new()))
            }
        },
    )
    .await;
    (addr, rx)
}

#[test]
fn mirrored_requests_reach_the_shadow_host_and_answers_come_from_the_route() {
    in_netns(|| async {
        let (h, _) = harness().await;
        let (shadow, mut seen) = recorder().await;
        h.fixed.put(
            CLUSTER,
            "m",
            pack_any(static_cluster("m", &[shadow], false)),
        );
        let mut rc = routes(&[("a", 100), ("b", 0)]);
        let mirror_to = |share: u32| {
            vec![route_action::RequestMirrorPolicy {
                cluster: "m".into(),
                runtime_fraction: Some(
                    envoy_types::pb::envoy::config::core::v3::RuntimeFractionalPercent {
                        default_value: Some(
                            envoy_types::pb::envoy::r#type::v3::FractionalPercent {
                                numerator: share,
                                denominator: 2, // MILLION
                            },
                        ),
                        ..Default::default()
                    },
                ),
                ..Default::default()
            }]
        };
        let set_mirrors = |rc: &mut RouteConfiguration, m| {
            if let Some(route::Action::Route(ra)) = rc.virtual_hosts[0].routes[0].action.as_mut() {
                ra.request_mirror_policies = m;
            }
        };
        set_mirrors(&mut rc, mirror_to(1_000_000));
        h.fixed.put(ROUTE, "80", pack_any(rc.clone()));
        h.push();
        // The caller's answer is the route's (a); the copy reaches m as `svc-shadow`.
        let copy = async {
            loop {
                let (status, body) = post("10.96.0.10:80", "svc", "/m", "payload").await;
                assert_eq!(status, 200);
                assert!(body.starts_with("name=a"), "{body}");
                if let Ok(Some(got)) =
                    tokio::time::timeout(Duration::from_millis(200), seen.recv()).await
                {
                    return got;
                }
            }
        };
        let (host, body) = tokio::time::timeout(Duration::from_secs(10), copy)
            .await
            .expect("a mirrored request in time");
        assert_eq!(host, "svc-shadow");
        assert_eq!(&body[..], b"payload");

        // A share of 0: no copies.
        set_mirrors(&mut rc, mirror_to(0));
        h.fixed.put(ROUTE, "80", pack_any(rc));
        h.push();
        tokio::time::sleep(Duration::from_millis(300)).await;
        while seen.try_recv().is_ok() {}
        for _ in 0..20 {
            assert_eq!(http_get_host("10.96.0.10:80", "svc").await.0, 200);
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(seen.try_recv().is_err(), "a 0% mirror copied a request");
    });
}

/// Routes `svc` to a ring-hash cluster of `a` and `b`, hashing by `policy`.
fn hash_to(
    h: &Harness,
    a: SocketAddr,
    b: SocketAddr,
    policy: route_action::hash_policy::PolicySpecifier,
) {
    let mut ab = static_cluster("ab", &[a, b], false);
    ab.lb_policy = cluster::LbPolicy::RingHash as i32;
    h.fixed.put(CLUSTER, "ab", pack_any(ab));
    let mut rc = routes(&[("ab", 100)]);
    if let Some(route::Action::Route(ra)) = rc.virtual_hosts[0].routes[0].action.as_mut() {
        ra.hash_policy = vec![route_action::HashPolicy {
            policy_specifier: Some(policy),
            ..Default::default()
        }];
    }
    h.fixed.put(ROUTE, "80", pack_any(rc));
    h.push();
}

#[test]
fn consistent_hash_keeps_a_key_on_one_endpoint_and_spreads_keys() {
    in_netns(|| async {
        let (h, [a, b, _, _]) = harness().await;
        hash_to(
            &h,
            a,
            b,
            route_action::hash_policy::PolicySpecifier::Header(route_action::hash_policy::Header {
                header_name: "x-user".into(),
                ..Default::default()
            }),
        );
        let who = async |user: &str| {
            let s = tokio::net::TcpStream::connect("10.96.0.10:80")
                .await
                .unwrap();
            let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(s))
                .await
                .unwrap();
            tokio::spawn(conn);
            let req = http::Request::get("/")
                .header("host", "svc")
                .header("x-user", user)
                .body(http_body_util::Empty::<Bytes>::new())
                .unwrap();
            let r = send.send_request(req).await.unwrap();
            let body = r.into_body().collect().await.unwrap().to_bytes();
            String::from_utf8_lossy(&body[..6]).into_owned()
        };
        // Wait for the route to the hashed cluster (both endpoints answer through it).
        let mut seen = BTreeSet::new();
        for i in 0..200 {
            seen.insert(who(&format!("user-{i}")).await);
            if seen.len() == 2 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(seen.len(), 2, "keys never spread over both endpoints");
        // One key: always the same endpoint.
        let first = who("alice").await;
        for _ in 0..20 {
            assert_eq!(who("alice").await, first);
        }
        // Twenty keys: both endpoints get some (all on one: 2 in a million).
        let mut spread = BTreeSet::new();
        for i in 0..20 {
            spread.insert(who(&format!("key-{i}")).await);
        }
        assert_eq!(spread.len(), 2, "{spread:?}");
    });
}

/// An HTTP/1.1 upstream that answers 200 and counts the connections it accepted.
async fn counting_upstream() -> (SocketAddr, Arc<std::sync::atomic::AtomicUsize>) {
    let accepted = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let count = accepted.clone();
    let addr = http1_upstream(
        move || {
            count.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        },
        |_| async { http::Response::new(Full::new(Bytes::from_static(b"name=c"))) },
    )
    .await;
    (addr, accepted)
}

#[test]
fn max_requests_per_connection_retires_pooled_connections() {
    in_netns(|| async {
        let (h, _) = harness().await;
        let (c, accepted) = counting_upstream().await;
        let with_limit = |max: Option<u32>| {
            let mut cluster = static_cluster("c", &[c], false);
            if let Some(max) = max {
                cluster.typed_extension_protocol_options.insert(
                    "envoy.extensions.upstreams.http.v3.HttpProtocolOptions".into(),
                    pack_any(HttpProtocolOptions {
                        common_http_protocol_options: Some(
                            envoy_types::pb::envoy::config::core::v3::HttpProtocolOptions {
                                max_requests_per_connection: Some(UInt32Value { value: max }),
                                ..Default::default()
                            },
                        ),
                        upstream_protocol_options: Some(
                            http_protocol_options::UpstreamProtocolOptions::ExplicitHttpConfig(
                                http_protocol_options::ExplicitHttpConfig {
                                    protocol_config: Some(
                                        http_protocol_options::explicit_http_config::ProtocolConfig::HttpProtocolOptions(
                                            Default::default(),
                                        ),
                                    ),
                                },
                            ),
                        ),
                        ..Default::default()
                    }),
                );
            }
            cluster
        };
        h.fixed.put(CLUSTER, "c", pack_any(with_limit(None)));
        h.fixed.put(ROUTE, "80", pack_any(routes(&[("c", 100)])));
        h.push();
        let mut ok = false;
        for _ in 0..200 {
            if http_get_host("10.96.0.10:80", "svc")
                .await
                .1
                .starts_with("name=c")
            {
                ok = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(ok, "route to c never took effect");
        let six = async || {
            let before = accepted.load(std::sync::atomic::Ordering::SeqCst);
            for _ in 0..6 {
                assert_eq!(http_get_host("10.96.0.10:80", "svc").await.0, 200);
            }
            accepted.load(std::sync::atomic::Ordering::SeqCst) - before
        };
        // Unlimited: the pooled connection carries them all.
        assert_eq!(six().await, 0, "a pooled connection was not reused");
        // Two per connection: six requests need three new connections.
        h.fixed.put(CLUSTER, "c", pack_any(with_limit(Some(2))));
        h.push();
        tokio::time::sleep(Duration::from_millis(300)).await;
        let _ = http_get_host("10.96.0.10:80", "svc").await; // the new cluster's first connection
        let n = six().await;
        assert!(
            (3..=4).contains(&n),
            "{n} new connections for 6 requests at 2 per connection"
        );
        // Envoy's connection counters of the cluster.
        let (_, stats) = admin("GET", "/stats?filter=cluster.c.upstream_cx").await;
        let count = |name: &str| {
            stats
                .lines()
                .find_map(|l| l.strip_prefix(&format!("cluster.c.{name}: ")))
                .and_then(|v| v.trim().parse::<u64>().ok())
                .unwrap_or(0)
        };
        assert!(count("upstream_cx_max_requests") >= 3, "{stats}");
        assert!(count("upstream_cx_http1_total") >= 4, "{stats}");
        assert_eq!(
            count("upstream_cx_total"),
            count("upstream_cx_http1_total"),
            "{stats}"
        );
    });
}

/// An upstream that answers every request 503 after `delay`, and counts the requests.
async fn failing_upstream(delay: Duration) -> (SocketAddr, Arc<std::sync::atomic::AtomicUsize>) {
    let requests = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let count = requests.clone();
    let addr = http1_upstream(
        || {},
        move |_| {
            count.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            async move {
                tokio::time::sleep(delay).await;
                let mut r = http::Response::new(Full::new(Bytes::new()));
                *r.status_mut() = http::StatusCode::SERVICE_UNAVAILABLE;
                r
            }
        },
    )
    .await;
    (addr, requests)
}

#[test]
fn the_retry_budget_keeps_a_failing_upstream_from_a_retry_storm() {
    in_netns(|| async {
        let (h, _) = harness().await;
        let (f, requests) = failing_upstream(Duration::from_millis(200)).await;
        let mut cluster = static_cluster("f", &[f], false);
        cluster.circuit_breakers = Some(envoy_types::pb::envoy::config::cluster::v3::CircuitBreakers {
            thresholds: vec![envoy_types::pb::envoy::config::cluster::v3::circuit_breakers::Thresholds {
                max_retries: Some(UInt32Value { value: u32::MAX }),
                retry_budget: Some(
                    envoy_types::pb::envoy::config::cluster::v3::circuit_breakers::thresholds::RetryBudget {
                        budget_percent: Some(envoy_types::pb::envoy::r#type::v3::Percent { value: 20.0 }),
                        min_retry_concurrency: Some(UInt32Value { value: 1 }),
                        ..Default::default()
                    },
                ),
                ..Default::default()
            }],
            ..Default::default()
        });
        h.fixed.put(CLUSTER, "f", pack_any(cluster));
        let mut rc = routes(&[("f", 100)]);
        if let Some(route::Action::Route(ra)) = rc.virtual_hosts[0].routes[0].action.as_mut() {
            ra.retry_policy = Some(retry_5xx(5));
        }
        h.fixed.put(ROUTE, "80", pack_any(rc));
        h.push();
        for _ in 0..200 {
            if http_get_host("10.96.0.10:80", "svc").await.0 == 503 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let before = requests.load(std::sync::atomic::Ordering::SeqCst);
        // Twenty at once, each allowed five retries: 120 upstream requests without a budget.
        let calls: Vec<_> = (0..20)
            .map(|_| tokio::spawn(async { http_get_host("10.96.0.10:80", "svc").await.0 }))
            .collect();
        for c in calls {
            assert_eq!(c.await.unwrap(), 503);
        }
        let sent = requests.load(std::sync::atomic::Ordering::SeqCst) - before;
        assert!(
            (20..=60).contains(&sent),
            "{sent} upstream requests for 20 calls"
        );
        let (_, stats) = admin("GET", "/stats?filter=cluster.f.upstream_rq_retry").await;
        assert!(
            stats.contains("cluster.f.upstream_rq_retry_overflow"),
            "{stats}"
        );
    });
}

#[test]
fn locality_priorities_fail_over_when_the_local_endpoints_are_down() {
    in_netns(|| async {
        let (h, [a, b, _, _]) = harness().await;
        // a in the proxy's own locality (priority 0), b farther away (priority 1).
        let prioritized = |a_health: i32| {
            let mut c = static_cluster("ab", &[a, b], false);
            if let Some(load) = c.load_assignment.as_mut() {
                let mut far = load.endpoints[0].clone();
                far.lb_endpoints.remove(0);
                far.priority = 1;
                load.endpoints[0].lb_endpoints.truncate(1);
                load.endpoints[0].lb_endpoints[0].health_status = a_health;
                load.endpoints.push(far);
            }
            c
        };
        h.fixed.put(CLUSTER, "ab", pack_any(prioritized(1)));
        h.fixed.put(ROUTE, "80", pack_any(routes(&[("ab", 100)])));
        h.push();
        let name = async || {
            let (status, body) = http_get_host("10.96.0.10:80", "svc").await;
            assert_eq!(status, 200);
            body[..6].to_string()
        };
        let mut first = String::new();
        for _ in 0..200 {
            first = name().await;
            if first == "name=a" {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(first, "name=a", "the prioritized cluster never took effect");
        for _ in 0..20 {
            assert_eq!(name().await, "name=a", "traffic left the local locality");
        }
        // The local endpoint goes unhealthy: everything fails over to priority 1.
        h.fixed.put(CLUSTER, "ab", pack_any(prioritized(2)));
        h.push();
        let mut now = String::new();
        for _ in 0..200 {
            now = name().await;
            if now == "name=b" {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(now, "name=b", "no failover");
        for _ in 0..20 {
            assert_eq!(name().await, "name=b");
        }
    });
}

#[test]
fn a_control_plane_without_delta_xds_is_followed_over_state_of_the_world() {
    in_netns(|| async {
        // Ready at all means the configuration arrived over state of the world.
        let (h, _) = harness_with(true).await;
        assert_eq!(
            http_get_host("10.96.0.10:80", "svc").await.1[..6],
            *"name=a"
        );
        let states = h.ads.proxies().lock().unwrap().clone();
        assert!(
            states.values().any(|p| !p.delta && !p.types.is_empty()),
            "{states:?}"
        );
        // Updates keep arriving the same way.
        h.fixed
            .put(ROUTE, "80", pack_any(routes(&[("a", 0), ("b", 100)])));
        h.push();
        let mut body = String::new();
        for _ in 0..100 {
            body = http_get_host("10.96.0.10:80", "svc").await.1;
            if body.starts_with("name=b") {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(body.starts_with("name=b"), "{body}");
    });
}

#[test]
fn tcp_consistent_hash_by_source_ip_keeps_a_client_on_one_endpoint() {
    in_netns(|| async {
        let (h, [a, b, _, _]) = harness().await;
        // The TCP listener's cluster: a and b (HTTP upstreams, spoken to through the TCP
        // proxy), hashed by the client's IP.
        let mut ab = static_cluster("tcp", &[a, b], false);
        ab.lb_policy = cluster::LbPolicy::RingHash as i32;
        h.fixed.put(CLUSTER, "tcp", pack_any(ab));
        let mut filter = tcp_proxy("tcp");
        if let Some(
            envoy_types::pb::envoy::config::listener::v3::filter::ConfigType::TypedConfig(any),
        ) = filter.config_type.as_mut()
        {
            let mut tp = <TcpProxy as prost::Message>::decode(any.value.as_slice()).unwrap();
            tp.hash_policy = vec![envoy_types::pb::envoy::r#type::v3::HashPolicy {
                policy_specifier: Some(
                    envoy_types::pb::envoy::r#type::v3::hash_policy::PolicySpecifier::SourceIp(
                        Default::default(),
                    ),
                ),
            }];
            *any = pack_any(tp);
        }
        h.fixed.put(
            LISTENER,
            "10.96.0.20_5000",
            pack_any(port_listener("10.96.0.20_5000", "10.96.0.20", 5000, filter)),
        );
        h.push();
        // The new cluster is in force once the old upstream (`tcp`) no longer answers.
        for _ in 0..200 {
            if !http_get_host("10.96.0.20:5000", "svc")
                .await
                .1
                .starts_with("name=tcp")
            {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let mut names = BTreeSet::new();
        for _ in 0..20 {
            let (status, body) = http_get_host("10.96.0.20:5000", "svc").await;
            assert_eq!(status, 200);
            names.insert(body[..6].to_string());
        }
        assert_eq!(names.len(), 1, "one client went to {names:?}");
    });
}

/// Istio's TCP traffic shifting: `tcp_proxy` weighted clusters send each connection to one
/// cluster, by weight.
#[test]
fn tcp_weighted_clusters_split_connections_by_weight() {
    in_netns(|| async {
        let (h, [a, b, _, _]) = harness().await;
        h.fixed.put(
            CLUSTER,
            "tcp-a",
            pack_any(static_cluster("tcp-a", &[a], false)),
        );
        h.fixed.put(
            CLUSTER,
            "tcp-b",
            pack_any(static_cluster("tcp-b", &[b], false)),
        );
        let weighted = typed(
            "envoy.filters.network.tcp_proxy",
            pack_any(TcpProxy {
                stat_prefix: "tcp".into(),
                cluster_specifier: Some(tcp_proxy::ClusterSpecifier::WeightedClusters(
                    tcp_proxy::WeightedCluster {
                        clusters: [("tcp-a", 3), ("tcp-b", 1)]
                            .map(
                                |(name, weight)| tcp_proxy::weighted_cluster::ClusterWeight {
                                    name: name.into(),
                                    weight,
                                    ..Default::default()
                                },
                            )
                            .into(),
                    },
                )),
                ..Default::default()
            }),
        );
        h.fixed.put(
            LISTENER,
            "10.96.0.20_5000",
            pack_any(port_listener(
                "10.96.0.20_5000",
                "10.96.0.20",
                5000,
                weighted,
            )),
        );
        h.push();
        // The split is in force once the old upstream (`tcp`) no longer answers.
        let first = |body: String| body.get(..6).unwrap_or_default().to_string();
        let mut waited = 0;
        while first(http_get_host("10.96.0.20:5000", "svc").await.1) == "name=t" {
            waited += 1;
            assert!(waited < 500, "the weighted clusters never took effect");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        const N: usize = 400;
        let mut to_b = 0;
        for _ in 0..N {
            let (status, body) = http_get_host("10.96.0.20:5000", "svc").await;
            assert_eq!(status, 200);
            match first(body).as_str() {
                "name=b" => to_b += 1,
                "name=a" => {}
                other => panic!("a connection went to {other:?}"),
            }
        }
        // Binomial(400, 0.25): mean 100, standard deviation 8.7; 5 deviations either way.
        assert!(
            (56..=144).contains(&to_b),
            "b took {to_b} of {N} connections, expected 100 ± 44"
        );
    });
}

#[test]
fn a_cookie_hash_policy_with_a_ttl_hands_out_the_cookie_and_sticks_to_it() {
    in_netns(|| async {
        let (h, [a, b, _, _]) = harness().await;
        hash_to(
            &h,
            a,
            b,
            route_action::hash_policy::PolicySpecifier::Cookie(route_action::hash_policy::Cookie {
                name: "affinity".into(),
                ttl: Some(envoy_types::pb::google::protobuf::Duration {
                    seconds: 60,
                    nanos: 0,
                }),
                ..Default::default()
            }),
        );
        // (upstream name, Set-Cookie) of a GET with `cookie`, if any.
        let get = async |cookie: Option<&str>| {
            let s = tokio::net::TcpStream::connect("10.96.0.10:80")
                .await
                .unwrap();
            let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(s))
                .await
                .unwrap();
            tokio::spawn(conn);
            let mut req = http::Request::get("/").header("host", "svc");
            if let Some(c) = cookie {
                req = req.header("cookie", c);
            }
            let r = send
                .send_request(req.body(http_body_util::Empty::<Bytes>::new()).unwrap())
                .await
                .unwrap();
            let set = r
                .headers()
                .get("set-cookie")
                .map(|v| v.to_str().unwrap().to_string());
            let body = r.into_body().collect().await.unwrap().to_bytes();
            (String::from_utf8_lossy(&body[..6]).into_owned(), set)
        };
        let mut handed = None;
        for _ in 0..200 {
            if let (who, Some(set)) = get(None).await {
                handed = Some((who, set));
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let (first, set) = handed.expect("a generated affinity cookie");
        assert!(
            set.starts_with("affinity=") && set.contains("Max-Age=60") && set.contains("Path=/"),
            "{set}"
        );
        let cookie = set.split(';').next().unwrap().to_string();
        for _ in 0..10 {
            let (who, again) = get(Some(&cookie)).await;
            assert_eq!(
                who, first,
                "the cookie did not keep the session on one endpoint"
            );
            assert!(again.is_none(), "a request with the cookie got a new one");
        }
        // Fresh sessions spread over both endpoints.
        let mut spread = BTreeSet::new();
        for _ in 0..20 {
            spread.insert(get(None).await.0);
        }
        assert_eq!(spread.len(), 2, "{spread:?}");
    });
}

/// Sets `idle_timeout` on a `tcp_proxy` filter, or on a connection manager's common options.
fn with_idle_timeout(mut f: Filter, idle: Duration) -> Filter {
    let idle = Some(envoy_types::pb::google::protobuf::Duration {
        seconds: 0,
        nanos: i32::try_from(idle.as_nanos()).unwrap(),
    });
    if let Some(filter::ConfigType::TypedConfig(any)) = f.config_type.as_mut() {
        if let Ok(mut tp) = <TcpProxy as prost::Message>::decode(any.value.as_slice())
            && any.type_url.ends_with(".TcpProxy")
        {
            tp.idle_timeout = idle;
            *any = pack_any(tp);
        } else if let Ok(mut m) =
            <HttpConnectionManager as prost::Message>::decode(any.value.as_slice())
        {
            m.common_http_protocol_options = Some(
                envoy_types::pb::envoy::config::core::v3::HttpProtocolOptions {
                    idle_timeout: idle,
                    ..Default::default()
                },
            );
            *any = pack_any(m);
        }
    }
    f
}

#[test]
fn quiet_connections_are_closed_after_the_idle_timeout() {
    in_netns(|| async {
        let (h, _) = harness().await;
        let idle = Duration::from_millis(300);
        h.fixed.put(
            LISTENER,
            "10.96.0.21_5000",
            pack_any(port_listener(
                "10.96.0.21_5000",
                "10.96.0.21",
                5000,
                with_idle_timeout(tcp_proxy("tcp"), idle),
            )),
        );
        h.fixed.put(
            LISTENER,
            "10.96.0.22_8081",
            pack_any(port_listener(
                "10.96.0.22_8081",
                "10.96.0.22",
                8081,
                with_idle_timeout(hcm("80"), idle),
            )),
        );
        h.push();
        for _ in 0..200 {
            if http_get_host("10.96.0.22:8081", "svc").await.0 == 200
                && http_get_host("10.96.0.21:5000", "svc").await.0 == 200
            {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }

        // HTTP: a request on a connection kept alive, then quiet. The proxy closes it.
        let s = tokio::net::TcpStream::connect("10.96.0.22:8081")
            .await
            .unwrap();
        let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(s))
            .await
            .unwrap();
        let conn = tokio::spawn(conn);
        let req = http::Request::builder()
            .uri("/")
            .header("host", "svc")
            .body(http_body_util::Empty::<Bytes>::new())
            .unwrap();
        let resp = send.send_request(req).await.unwrap();
        assert_eq!(resp.status(), 200);
        resp.into_body().collect().await.unwrap();
        let quiet = std::time::Instant::now();
        tokio::time::timeout(Duration::from_secs(10), conn)
            .await
            .expect("the proxy closes a quiet HTTP connection")
            .unwrap()
            .unwrap();
        assert!(quiet.elapsed() >= idle / 2, "closed too early");

        // TCP: bytes both ways, then quiet. The proxy closes it, and counts what it moved.
        let tx_bytes = || async {
            let (_, stats) = admin("GET", "/stats?filter=cluster.tcp.upstream_cx_tx").await;
            stat_value(&stats, "cluster.tcp.upstream_cx_tx_bytes_total").unwrap_or(0)
        };
        let before = tx_bytes().await;
        let request = b"GET / HTTP/1.1\r\nhost: svc\r\n\r\n";
        let mut s = tokio::net::TcpStream::connect("10.96.0.21:5000")
            .await
            .unwrap();
        s.write_all(request).await.unwrap();
        let mut buf = vec![0u8; 4096];
        let n = s.read(&mut buf).await.unwrap();
        assert!(buf[..n].starts_with(b"HTTP/1.1 200"));
        let quiet = std::time::Instant::now();
        let closed = tokio::time::timeout(Duration::from_secs(10), async {
            loop {
                match s.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(_) => {}
                }
            }
        })
        .await;
        assert!(closed.is_ok(), "the proxy closes a quiet TCP connection");
        assert!(quiet.elapsed() >= idle / 2, "closed too early");
        assert_eq!(tx_bytes().await - before, request.len() as u64);

        let (_, stats) = admin("GET", "/stats?filter=idle_timeout").await;
        let count = |name: &str| -> u64 { stat_value(&stats, name).unwrap_or(0) };
        assert!(count("http.80.downstream_cx_idle_timeout") >= 1, "{stats}");
        assert!(count("tcp.tcp.idle_timeout") >= 1, "{stats}");
    });
}

/// `max_downstream_connection_duration` (a DestinationRule's `tcp.maxConnectionDuration`): a
/// TCP connection in use is closed once that old, and counted.
#[test]
fn busy_tcp_connections_are_closed_at_the_maximum_duration() {
    in_netns(|| async {
        let (h, _) = harness().await;
        let max = Duration::from_millis(600);
        h.fixed.put(
            LISTENER,
            "10.96.0.23_5000",
            pack_any(port_listener(
                "10.96.0.23_5000",
                "10.96.0.23",
                5000,
                tcp_proxy_with("tcp", |tp| {
                    tp.max_downstream_connection_duration =
                        Some(envoy_types::pb::google::protobuf::Duration {
                            seconds: 0,
                            nanos: i32::try_from(max.as_nanos()).unwrap(),
                        });
                }),
            )),
        );
        h.push();
        for _ in 0..200 {
            if http_get_host("10.96.0.23:5000", "svc").await.0 == 200 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        // Keep-alive requests every 50 ms: never idle, yet closed.
        let s = tokio::net::TcpStream::connect("10.96.0.23:5000")
            .await
            .unwrap();
        let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(s))
            .await
            .unwrap();
        let conn = tokio::spawn(conn);
        let opened = std::time::Instant::now();
        let mut answered = 0;
        while !send.is_closed() && opened.elapsed() < Duration::from_secs(10) {
            let req = http::Request::get("/")
                .header("host", "svc")
                .body(http_body_util::Empty::<Bytes>::new())
                .unwrap();
            match send.send_request(req).await {
                Ok(r) if r.status() == 200 => {
                    let _ = r.into_body().collect().await;
                    answered += 1;
                }
                _ => break,
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let lived = opened.elapsed();
        assert!(answered >= 3, "{answered} answers");
        assert!(
            lived >= max / 2 && lived < Duration::from_secs(10),
            "{lived:?}"
        );
        let _ = tokio::time::timeout(Duration::from_secs(5), conn).await;
        let (_, stats) = admin("GET", "/stats?filter=max_downstream").await;
        let closed = stat_value(&stats, "tcp.tcp.max_downstream_connection_duration");
        assert!(closed.is_some_and(|n| n >= 1), "{stats}");
    });
}

/// Envoy's own headers, as Istio configures them: `server` per the connection manager, the
/// attempt count to the upstream (and back, when asked), what is left of the timeout, the path
/// before a rewrite, and the upstream's service time; the router's `suppress_envoy_headers`
/// turns off all but the attempt count.
#[test]
fn envoy_headers_reach_the_upstream_and_the_client_as_configured() {
    in_netns(|| async {
        let (h, _) = harness().await;
        // Fails the first attempt, answers the second; reports what it was sent.
        let up = http1_upstream(
            || {},
            |req: http::Request<hyper::body::Incoming>| async move {
                let get = |n: &str| {
                    req.headers()
                        .get(n)
                        .and_then(|v| v.to_str().ok())
                        .unwrap_or("-")
                        .to_string()
                };
                let attempt = get("x-envoy-attempt-count");
                let seen = format!(
                    "attempt={attempt} expected={} path={} original={}",
                    get("x-envoy-expected-rq-timeout-ms"),
                    req.uri().path(),
                    get("x-envoy-original-path"),
                );
                let mut r = http::Response::new(Full::new(Bytes::from(seen)));
                r.headers_mut()
                    .insert("server", http::HeaderValue::from_static("app"));
                if attempt != "2" {
                    *r.status_mut() = http::StatusCode::SERVICE_UNAVAILABLE;
                }
                r
            },
        )
        .await;
        h.fixed
            .put(CLUSTER, "e", pack_any(static_cluster("e", &[up], false)));
        let mut rc = routes(&[("e", 100)]);
        rc.virtual_hosts[0].include_request_attempt_count = true;
        rc.virtual_hosts[0].include_attempt_count_in_response = true;
        if let Some(route::Action::Route(ra)) = rc.virtual_hosts[0].routes[0].action.as_mut() {
            ra.timeout = Some(envoy_types::pb::google::protobuf::Duration {
                seconds: 5,
                nanos: 0,
            });
            ra.prefix_rewrite = "/v2/".into();
            ra.retry_policy = Some(retry_5xx(1));
        }
        h.fixed.put(ROUTE, "80", pack_any(rc));
        h.push();
        let mut got = None;
        for _ in 0..200 {
            let r = request("GET", "10.96.0.10:80", "/hello", "svc").await;
            if let Some((200, head, body)) = r
                && body.starts_with("attempt=")
            {
                got = Some((head, body));
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let (head, body) = got.expect("a 200 through the retry");
        let header = |n: &str| {
            head.get(n)
                .and_then(|v| v.to_str().ok())
                .map(str::to_string)
        };
        let field = |k: &str| {
            body.split_whitespace()
                .find_map(|f| f.strip_prefix(k)?.strip_prefix('='))
                .unwrap_or_default()
                .to_string()
        };
        assert_eq!(field("attempt"), "2", "{body}");
        let expected: u64 = field("expected")
            .parse()
            .expect("x-envoy-expected-rq-timeout-ms sent");
        assert!((1..=5000).contains(&expected), "{expected}");
        assert_eq!(field("path"), "/v2/hello", "{body}");
        assert_eq!(field("original"), "/hello", "{body}");
        assert_eq!(header("server").as_deref(), Some("envoy"), "overwritten");
        assert_eq!(header("x-envoy-attempt-count").as_deref(), Some("2"));
        let service_time = header("x-envoy-upstream-service-time").expect("service time");
        assert!(service_time.parse::<u64>().is_ok(), "{service_time}");
        // The proxy's own answers are named too.
        let (status, head, _) = request("GET", "10.96.0.10:80", "/", "nowhere")
            .await
            .expect("no route");
        assert_eq!(status, 404);
        assert_eq!(head.get("server").unwrap(), "envoy");

        // Istio's inbound name, kept only where the app sends none; debug headers off.
        let mut filter = hcm("80");
        if let Some(filter::ConfigType::TypedConfig(any)) = filter.config_type.as_mut() {
            let mut m =
                <HttpConnectionManager as prost::Message>::decode(any.value.as_slice()).unwrap();
            m.server_name = "istio-envoy".into();
            m.server_header_transformation =
                http_connection_manager::ServerHeaderTransformation::AppendIfAbsent as i32;
            m.http_filters.last_mut().unwrap().config_type =
                Some(http_filter::ConfigType::TypedConfig(pack_any(
                    envoy_types::pb::envoy::extensions::filters::http::router::v3::Router {
                        suppress_envoy_headers: true,
                        ..Default::default()
                    },
                )));
            *any = pack_any(m);
        }
        h.fixed.put(
            LISTENER,
            "0.0.0.0_80",
            pack_any(port_listener("0.0.0.0_80", "0.0.0.0", 80, filter)),
        );
        h.push();
        let mut last = None;
        for _ in 0..200 {
            let (_, head, _) = request("GET", "10.96.0.10:80", "/", "nowhere")
                .await
                .expect("no route");
            if head.get("server").is_some_and(|s| s == "istio-envoy") {
                last = request("GET", "10.96.0.10:80", "/hello", "svc").await;
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let (status, head, body) = last.expect("the new listener in force");
        assert_eq!(status, 200);
        assert_eq!(head.get("server").unwrap(), "app", "the app's own kept");
        assert!(!head.contains_key("x-envoy-upstream-service-time"));
        assert_eq!(body, "attempt=2 expected=- path=/v2/hello original=-");
        // Istio's `uriRegexRewrite` as Envoy's `regex_rewrite`: RE2 groups in the substitution,
        // the query left alone (the Envoy headers are off by now).
        let mut regex_rc = routes(&[("e", 100)]);
        regex_rc.virtual_hosts[0].include_request_attempt_count = true;
        if let Some(route::Action::Route(ra)) = regex_rc.virtual_hosts[0].routes[0].action.as_mut()
        {
            use envoy_types::pb::envoy::r#type::matcher::v3::{
                RegexMatchAndSubstitute, RegexMatcher,
            };
            ra.regex_rewrite = Some(RegexMatchAndSubstitute {
                pattern: Some(RegexMatcher {
                    regex: "^/users/([^/]+)/(.*)$".into(),
                    ..Default::default()
                }),
                substitution: "/\\2/by/\\1".into(),
            });
            ra.retry_policy = Some(retry_5xx(1));
        }
        h.fixed.put(ROUTE, "80", pack_any(regex_rc));
        h.push();
        let mut rewritten = String::new();
        for _ in 0..200 {
            if let Some((200, _, body)) =
                request("GET", "10.96.0.10:80", "/users/ann/profile?tab=1", "svc").await
                && body.contains("path=/profile/")
            {
                rewritten = body;
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(
            rewritten, "attempt=2 expected=- path=/profile/by/ann original=-",
            "{rewritten}"
        );
    });
}

/// Istio's peer metadata filter on an outbound connection manager, in `IN_MESH` mode or not.
fn with_metadata_exchange(mut f: Filter, skip_external: bool) -> Filter {
    use isthmus_xds::typed_struct::{
        METADATA_EXCHANGE_FILTER, PEER_METADATA_TYPE_URL, TypedStruct,
    };
    let Some(filter::ConfigType::TypedConfig(any)) = &f.config_type else {
        unreachable!("hcm() is typed")
    };
    let mut h = <HttpConnectionManager as prost::Message>::decode(any.value.as_slice()).unwrap();
    let config = serde_json::json!({
        "upstream_discovery": [{"istio_headers": {}}, {"workload_discovery": {}}],
        "upstream_propagation": [{"istio_headers": {"skip_external_clusters": skip_external}}],
    });
    h.http_filters.insert(
        0,
        HttpFilter {
            name: METADATA_EXCHANGE_FILTER.into(),
            config_type: Some(http_filter::ConfigType::TypedConfig(pack_any(
                TypedStruct {
                    type_url: PEER_METADATA_TYPE_URL.into(),
                    value: isthmus_xds::json::from_json(config).ok(),
                },
            ))),
            ..Default::default()
        },
    );
    f.config_type = Some(filter::ConfigType::TypedConfig(pack_any(h)));
    f
}

#[test]
fn peer_metadata_goes_where_the_filter_says_and_not_outside_the_mesh() {
    in_netns(|| async {
        let (h, _) = harness().await;
        // Says whether this workload's metadata came, and answers with its own.
        let up = http1_upstream(
            || {},
            |req: http::Request<hyper::body::Incoming>| async move {
                let came = req.headers().contains_key("x-envoy-peer-metadata")
                    && req.headers().contains_key("x-envoy-peer-metadata-id");
                let mut r = http::Response::new(Full::new(Bytes::from(format!("mx={came}"))));
                r.headers_mut().insert(
                    "x-envoy-peer-metadata",
                    http::HeaderValue::from_static("dXBzdHJlYW0="),
                );
                r
            },
        )
        .await;
        h.fixed
            .put(CLUSTER, "in", pack_any(static_cluster("in", &[up], false)));
        // The same endpoint as a service outside the mesh, marked as Istio marks it.
        let mut out = static_cluster("out", &[up], false);
        out.metadata = Some(envoy_types::pb::envoy::config::core::v3::Metadata {
            filter_metadata: [(
                "istio".to_string(),
                isthmus_xds::json::from_json(serde_json::json!({"external": true})).unwrap(),
            )]
            .into_iter()
            .collect(),
            ..Default::default()
        });
        h.fixed.put(CLUSTER, "out", pack_any(out));
        // Hosts `in` and `out` to their clusters, on three ports: without the filter (6080),
        // with Istio's outbound filter (6081), and with it in IN_MESH mode (6082).
        let host = |name: &str| VirtualHost {
            name: name.into(),
            domains: vec![name.into()],
            routes: vec![Route {
                r#match: Some(RouteMatch {
                    path_specifier: Some(route_match::PathSpecifier::Prefix("/".into())),
                    ..Default::default()
                }),
                action: Some(route::Action::Route(RouteAction {
                    cluster_specifier: Some(route_action::ClusterSpecifier::Cluster(name.into())),
                    ..Default::default()
                })),
                ..Default::default()
            }],
            ..Default::default()
        };
        h.fixed.put(
            ROUTE,
            "mx",
            pack_any(RouteConfiguration {
                name: "mx".into(),
                virtual_hosts: vec![host("in"), host("out")],
                ..Default::default()
            }),
        );
        for (port, filter) in [
            (6080, hcm("mx")),
            (6081, with_metadata_exchange(hcm("mx"), false)),
            (6082, with_metadata_exchange(hcm("mx"), true)),
        ] {
            let name = format!("0.0.0.0_{port}");
            h.fixed.put(
                LISTENER,
                &name,
                pack_any(port_listener(&name, "0.0.0.0", port, filter)),
            );
        }
        h.push();
        // (body, whether the upstream's metadata reached the client).
        let ask = |port: u16, host: &'static str| async move {
            for _ in 0..300 {
                if let Some((200, head, body)) =
                    request("GET", &format!("10.96.0.10:{port}"), "/", host).await
                {
                    return (body, head.contains_key("x-envoy-peer-metadata"));
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            panic!("no answer on {port} for {host}");
        };
        // Istio's outbound filter: sent in the mesh and out of it; the answer's is read and
        // kept back.
        assert_eq!(ask(6081, "in").await, ("mx=true".into(), false));
        assert_eq!(ask(6081, "out").await, ("mx=true".into(), false));
        // IN_MESH: not to a service outside the mesh.
        assert_eq!(ask(6082, "in").await, ("mx=true".into(), false));
        assert_eq!(ask(6082, "out").await, ("mx=false".into(), false));
        // No filter, no exchange: the headers pass as any other.
        assert_eq!(ask(6080, "in").await, ("mx=false".into(), true));
    });
}

/// `hcm("80")` tracing with `provider`, `random` percent of new traces sampled.
fn traced_hcm_with(
    random: f64,
    provider: envoy_types::pb::envoy::config::trace::v3::tracing::Http,
) -> Filter {
    use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3::http_connection_manager::Tracing;
    let mut f = hcm("80");
    if let Some(filter::ConfigType::TypedConfig(any)) = f.config_type.as_mut() {
        let mut m: HttpConnectionManager = prost::Message::decode(any.value.as_slice()).unwrap();
        m.tracing = Some(Tracing {
            random_sampling: Some(envoy_types::pb::envoy::r#type::v3::Percent { value: random }),
            provider: Some(provider),
            ..Default::default()
        });
        *any = pack_any(m);
    }
    f
}

/// `hcm("80")` tracing with Zipkin to cluster `zipkin`.
fn traced_hcm(random: f64) -> Filter {
    use envoy_types::pb::envoy::config::trace::v3::{ZipkinConfig, tracing, zipkin_config};
    traced_hcm_with(
        random,
        tracing::Http {
            name: "envoy.tracers.zipkin".into(),
            config_type: Some(tracing::http::ConfigType::TypedConfig(pack_any(
                ZipkinConfig {
                    collector_cluster: "zipkin".into(),
                    collector_endpoint: "/api/v2/spans".into(),
                    collector_hostname: "zipkin.istio-system.svc.cluster.local".into(),
                    collector_endpoint_version: zipkin_config::CollectorEndpointVersion::HttpJson
                        as i32,
                    trace_id_128bit: true,
                    shared_span_context: Some(BoolValue { value: false }),
                    ..Default::default()
                },
            ))),
        },
    )
}

/// `hcm("80")` tracing with OpenTelemetry to cluster `otel`: over gRPC, else OTLP/HTTP.
fn otel_hcm(grpc: bool) -> Filter {
    use envoy_types::pb::envoy::config::core::v3::{
        GrpcService, HttpService, HttpUri, grpc_service, http_uri,
    };
    use envoy_types::pb::envoy::config::trace::v3::{OpenTelemetryConfig, tracing};
    let config = OpenTelemetryConfig {
        grpc_service: grpc.then(|| GrpcService {
            target_specifier: Some(grpc_service::TargetSpecifier::EnvoyGrpc(
                grpc_service::EnvoyGrpc {
                    cluster_name: "otel".into(),
                    authority: "otel.observability.svc.cluster.local".into(),
                    ..Default::default()
                },
            )),
            ..Default::default()
        }),
        http_service: (!grpc).then(|| HttpService {
            http_uri: Some(HttpUri {
                uri: "otel.observability.svc.cluster.local/v1/traces".into(),
                http_upstream_type: Some(http_uri::HttpUpstreamType::Cluster("otel".into())),
                ..Default::default()
            }),
            ..Default::default()
        }),
        service_name: "client.default".into(),
        ..Default::default()
    };
    traced_hcm_with(
        0.0,
        tracing::Http {
            name: "envoy.tracers.opentelemetry".into(),
            config_type: Some(tracing::http::ConfigType::TypedConfig(pack_any(config))),
        },
    )
}

/// An HTTP/2 gRPC server that takes any call, reports its path and message, and answers OK.
async fn grpc_recorder() -> (
    SocketAddr,
    tokio::sync::mpsc::UnboundedReceiver<(String, Bytes)>,
) {
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((s, _)) = listener.accept().await {
            let tx = tx.clone();
            tokio::spawn(async move {
                let svc =
                    hyper::service::service_fn(move |req: http::Request<hyper::body::Incoming>| {
                        let tx = tx.clone();
                        async move {
                            let path = req.uri().path().to_string();
                            let body = req.into_body().collect().await.unwrap().to_bytes();
                            let _ = tx.send((path, body.slice(5..)));
                            let frames = vec![
                                Ok::<_, Infallible>(http_body::Frame::data(Bytes::from_static(&[
                                    0, 0, 0, 0, 0,
                                ]))),
                                Ok(http_body::Frame::trailers({
                                    let mut t = http::HeaderMap::new();
                                    t.insert("grpc-status", http::HeaderValue::from_static("0"));
                                    t
                                })),
                            ];
                            Ok::<_, Infallible>(
                                http::Response::builder()
                                    .header("content-type", "application/grpc")
                                    .body(StreamBody::new(futures_stream(frames)))
                                    .unwrap(),
                            )
                        }
                    });
                let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(s), svc)
                    .await;
            });
        }
    });
    (addr, rx)
}

/// A GET to `svc` through the sidecar with `headers`: the upstream's answer.
async fn traced_get(headers: Vec<(&'static str, String)>) -> String {
    let s = tokio::net::TcpStream::connect("10.96.0.10:80")
        .await
        .unwrap();
    let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(s))
        .await
        .unwrap();
    tokio::spawn(conn);
    let mut b = http::Request::get("/reviews/1").header("host", "svc");
    for (k, v) in headers {
        b = b.header(k, v);
    }
    let r = send
        .send_request(b.body(http_body_util::Empty::<Bytes>::new()).unwrap())
        .await
        .unwrap();
    let body = r.into_body().collect().await.unwrap().to_bytes();
    String::from_utf8_lossy(&body).into_owned()
}

/// An upstream that answers with the trace headers it got (`-` for those absent).
async fn context_echo() -> SocketAddr {
    http1_upstream(
        || {},
        |req: http::Request<hyper::body::Incoming>| async move {
            let h = |n: &str| {
                req.headers()
                    .get(n)
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or("-")
                    .to_string()
            };
            let seen = [
                "x-b3-traceid",
                "x-b3-spanid",
                "x-b3-parentspanid",
                "x-b3-sampled",
                "traceparent",
                "x-envoy-decorator-operation",
            ]
            .map(h)
            .join(" ");
            http::Response::new(Full::new(Bytes::from(seen)))
        },
    )
    .await
}

#[test]
fn opentelemetry_spans_reach_the_collector_over_grpc_and_over_http() {
    use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
    use prost::Message;
    in_netns(|| async {
        let (h, _) = harness().await;
        let (grpc, mut grpc_reports) = grpc_recorder().await;
        let (http, mut http_reports) = recorder().await;
        let traced = context_echo().await;
        h.fixed.put(
            CLUSTER,
            "otel",
            pack_any(static_cluster("otel", &[grpc], true)),
        );
        h.fixed.put(
            CLUSTER,
            "t",
            pack_any(static_cluster("t", &[traced], false)),
        );
        h.fixed.put(ROUTE, "80", pack_any(routes(&[("t", 100)])));
        h.fixed.put(
            LISTENER,
            "0.0.0.0_80",
            pack_any(port_listener("0.0.0.0_80", "0.0.0.0", 80, otel_hcm(true))),
        );
        h.push();
        let trace = "4bf92f3577b34da6a3ce929d0e0e4736";
        let parent = "00f067aa0ba902b7";
        let tp = format!("00-{trace}-{parent}-01");
        // Wait for the traced listener: the upstream then sees a traceparent of this proxy's.
        for _ in 0..100 {
            let seen = traced_get(vec![("traceparent", tp.clone())]).await;
            let sent = seen.split(' ').nth(4).unwrap_or_default();
            if sent != tp && sent.contains(trace) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(30)).await;
        }
        let decode = |body: &Bytes| ExportTraceServiceRequest::decode(body.as_ref()).unwrap();
        // Drain what the wait sent; then five sampled requests make one report.
        tokio::time::sleep(Duration::from_millis(200)).await;
        while grpc_reports.try_recv().is_ok() {}
        let mut seen_ids = BTreeSet::new();
        for _ in 0..5 {
            let seen = traced_get(vec![("traceparent", tp.clone())]).await;
            let sent = seen.split(' ').nth(4).unwrap().to_string();
            assert!(
                sent.starts_with(&format!("00-{trace}-")) && sent.ends_with("-01"),
                "{seen}"
            );
            // W3C only: no B3 headers are made.
            assert!(seen.starts_with("- - - -"), "{seen}");
            seen_ids.insert(sent[36..52].to_string());
        }
        // The spans of the wait may share the first report; the last of ours can wait for
        // the flush interval.
        let hex = |b: &[u8]| b.iter().map(|x| format!("{x:02x}")).collect::<String>();
        let mut ids = BTreeSet::new();
        while !seen_ids.is_subset(&ids) {
            let (path, body) = tokio::time::timeout(Duration::from_secs(10), grpc_reports.recv())
                .await
                .expect("an OTLP export in time")
                .unwrap();
            assert_eq!(
                path,
                "/opentelemetry.proto.collector.trace.v1.TraceService/Export"
            );
            let req = decode(&body);
            let scope = &req.resource_spans[0].scope_spans[0];
            for s in scope
                .spans
                .iter()
                .filter(|s| seen_ids.contains(&hex(&s.span_id)))
            {
                assert_eq!(hex(&s.trace_id), trace);
                assert_eq!(hex(&s.parent_span_id), parent);
                ids.insert(hex(&s.span_id));
            }
        }
        assert_eq!(ids, seen_ids);

        // The same over OTLP/HTTP, to the path and host of the service's URI.
        h.fixed.put(
            CLUSTER,
            "otel",
            pack_any(static_cluster("otel", &[http], false)),
        );
        h.fixed.put(
            LISTENER,
            "0.0.0.0_80",
            pack_any(port_listener("0.0.0.0_80", "0.0.0.0", 80, otel_hcm(false))),
        );
        h.push();
        tokio::time::sleep(Duration::from_millis(300)).await;
        for _ in 0..5 {
            traced_get(vec![("traceparent", tp.clone())]).await;
        }
        let (host, body) = tokio::time::timeout(Duration::from_secs(10), http_reports.recv())
            .await
            .expect("an OTLP/HTTP export in time")
            .unwrap();
        assert_eq!(host, "otel.observability.svc.cluster.local");
        let req = decode(&body);
        let spans = &req.resource_spans[0].scope_spans[0].spans;
        assert!(!spans.is_empty());
        assert!(spans.iter().all(|s| hex(&s.trace_id) == trace));
        let (_, stats) = admin("GET", "/stats?filter=tracing.opentelemetry").await;
        assert!(
            stats.contains("tracing.opentelemetry.grpc_reports_sent: "),
            "{stats}"
        );
        assert!(
            stats.contains("tracing.opentelemetry.http_reports_sent: "),
            "{stats}"
        );
    });
}

#[test]
fn traced_requests_carry_b3_context_and_sampled_spans_reach_the_collector() {
    in_netns(|| async {
        let (h, _) = harness().await;
        let (collector, mut reports) = recorder().await;
        let traced = context_echo().await;
        h.fixed.put(
            CLUSTER,
            "zipkin",
            pack_any(static_cluster("zipkin", &[collector], false)),
        );
        h.fixed.put(
            CLUSTER,
            "t",
            pack_any(static_cluster("t", &[traced], false)),
        );
        let mut rc = routes(&[("t", 100)]);
        rc.virtual_hosts[0].routes[0].decorator =
            Some(envoy_types::pb::envoy::config::route::v3::Decorator {
                operation: "svc.default.svc.cluster.local:80/*".into(),
                ..Default::default()
            });
        h.fixed.put(ROUTE, "80", pack_any(rc));
        h.fixed.put(
            LISTENER,
            "0.0.0.0_80",
            pack_any(port_listener("0.0.0.0_80", "0.0.0.0", 80, traced_hcm(0.0))),
        );
        h.push();
        // Wait for the traced listener: the upstream then sees B3 headers.
        let mut seen = String::new();
        for _ in 0..100 {
            seen = traced_get(vec![]).await;
            if seen.starts_with(|c: char| c.is_ascii_hexdigit()) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(30)).await;
        }
        // A new trace, sampled at 0%: a 128-bit trace id, no parent, not sampled.
        let f: Vec<&str> = seen.split(' ').collect();
        assert_eq!(f.len(), 6, "{seen}");
        assert_eq!(f[4], "-", "Zipkin propagates B3 only: {seen}");
        // The upstream is told the operation the request was traced as.
        assert_eq!(f[5], "svc.default.svc.cluster.local:80/*", "{seen}");
        assert_eq!(f[0].len(), 32, "{seen}");
        assert_eq!(f[1].len(), 16, "{seen}");
        assert_eq!((f[2], f[3]), ("-", "0"), "{seen}");

        // The caller's sampled trace continues: same trace id, the caller's span as parent.
        let trace = "463ac35c9f6413ad48485a3953bb6124";
        let caller = "a2fb4a1d1a96d312";
        let mut span_ids = BTreeSet::new();
        for _ in 0..5 {
            let seen = traced_get(vec![
                ("x-b3-traceid", trace.to_string()),
                ("x-b3-spanid", caller.to_string()),
                ("x-b3-sampled", "1".to_string()),
            ])
            .await;
            let f: Vec<&str> = seen.split(' ').collect();
            assert_eq!((f[0], f[2], f[3]), (trace, caller, "1"), "{seen}");
            assert_ne!(f[1], caller);
            span_ids.insert(f[1].to_string());
        }
        // Five spans make a report (Envoy's min_flush_spans), to the collector's host.
        let (host, body) = tokio::time::timeout(Duration::from_secs(10), reports.recv())
            .await
            .expect("a span report in time")
            .unwrap();
        assert_eq!(host, "zipkin.istio-system.svc.cluster.local");
        let spans: serde_json::Value = serde_json::from_slice(&body).unwrap();
        let spans = spans.as_array().unwrap();
        assert_eq!(spans.len(), 5, "{spans:?}");
        let reported: BTreeSet<String> = spans
            .iter()
            .map(|s| s["id"].as_str().unwrap().to_string())
            .collect();
        assert_eq!(reported, span_ids);
        for s in spans {
            assert_eq!(s["traceId"], trace);
            assert_eq!(s["parentId"], caller);
            assert_eq!(s["kind"], "CLIENT");
            assert_eq!(s["name"], "svc.default.svc.cluster.local:80/*");
            assert_eq!(s["localEndpoint"]["serviceName"], "client");
            assert_eq!(s["tags"]["http.status_code"], "200");
            assert_eq!(s["tags"]["http.url"], "http://svc/reviews/1");
            assert_eq!(s["tags"]["upstream_cluster"], "t");
            assert!(s["duration"].as_u64().unwrap() > 0);
        }
        // One sampled span alone goes out when the flush interval has passed.
        traced_get(vec![("x-b3-sampled", "1".to_string())]).await;
        let (_, body) = tokio::time::timeout(Duration::from_secs(10), reports.recv())
            .await
            .expect("a timer-flushed report")
            .unwrap();
        let spans: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(spans.as_array().map(Vec::len), Some(1));
        assert!(spans[0].get("parentId").is_none(), "{spans}");
        // Unsampled requests were never reported.
        assert!(reports.try_recv().is_err());
        let (_, stats) = admin("GET", "/stats?filter=tracing.zipkin").await;
        assert!(stats.contains("tracing.zipkin.spans_sent: 6"), "{stats}");
        assert!(stats.contains("tracing.zipkin.reports_sent: 2"), "{stats}");
    });
}
