//! Starting the proxy (pilot-agent's part): bind the ports, get the certificate, follow the
//! control plane over ADS (reconnecting with backoff, keeping the last configuration), report
//! readiness, and drain on shutdown.

use std::collections::BTreeMap;
use std::future::Future;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use envoy_types::pb::envoy::config::core::v3::Node;
use envoy_types::pb::google::protobuf::{Struct, Value as PbValue, value};
use isthmus_ca::identity::SpiffeId;
use isthmus_xds::client::XdsState;
use isthmus_xds::nds::NAME_TABLE;
use isthmus_xds::server::{CLUSTER, LISTENER};
use tokio::net::{TcpListener, UdpSocket};
use tokio::sync::watch;
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint};

use crate::admin::AdminState;
use crate::config::Config;
use crate::envoy_stats::Inclusions;
use crate::identity::{CaClient, Identity};
use crate::log_level::LogLevels;
use crate::peer::Workload;
use crate::stats::Stats;
use crate::upstream::Pools;
use crate::{Me, Shared};

/// How long readiness waits for the endpoints and routes that clusters and listeners name
/// (Envoy's default `initial_fetch_timeout`).
const WARMING_LIMIT: Duration = Duration::from_secs(15);

/// Istio's ports.
#[derive(Debug, Clone, Copy)]
pub struct Ports {
    pub outbound: u16,
    pub inbound: u16,
    pub admin: u16,
    pub agent: u16,
    pub health: u16,
    pub prometheus: u16,
    pub dns: u16,
}

impl Default for Ports {
    fn default() -> Self {
        Ports {
            outbound: 15001,
            inbound: 15006,
            admin: 15000,
            agent: 15020,
            health: 15021,
            prometheus: 15090,
            dns: 15053,
        }
    }
}

/// Everything the proxy is started with (flags and environment of the injected sidecar).
#[derive(Debug, Clone)]
pub struct Options {
    /// `host:port` of the control plane's xDS (15012 with TLS, 15010 without).
    pub discovery_address: String,
    /// The mesh roots: with them xDS and the CA are reached over TLS, and mTLS is possible.
    pub root_cert: Option<PathBuf>,
    /// The name the control plane's certificate must carry.
    pub discovery_san: String,
    pub token_path: PathBuf,
    pub pod_name: String,
    pub namespace: String,
    pub ips: Vec<IpAddr>,
    pub service_account: String,
    pub cluster_id: String,
    pub trust_domain: String,
    pub domain: String,
    pub labels: BTreeMap<String, String>,
    pub tproxy: bool,
    pub ports: Ports,
    /// Address the capture and telemetry ports bind to (0.0.0.0 in a pod).
    pub bind: IpAddr,
    pub drain_duration: Duration,
    pub cert_ttl: Duration,
    pub app_metrics: Option<(u16, String)>,
    /// The pod's ProxyConfig (`PROXY_CONFIG`), sent to the control plane in the node metadata
    /// as Istio's agent sends it: some of it (`proxyHeaders`) shapes the configuration.
    pub proxy_config: Option<Struct>,
    /// Which Envoy stats Prometheus gets (Istio's list and the pod's `proxyStatsMatcher`).
    pub stats_inclusions: Inclusions,
    /// Answer the pod's DNS on 127.0.0.1 (Istio's `ISTIO_META_DNS_CAPTURE`), forwarding what
    /// the name table does not know to the nameservers of `resolv_conf`.
    pub dns_capture: bool,
    pub resolv_conf: PathBuf,
    /// The rest of the node metadata, as Istio's agent passes on its `ISTIO_META_*`
    /// environment (`DNS_AUTO_ALLOCATE`, …); the fields above win.
    pub metadata: BTreeMap<String, String>,
}

impl Options {
    pub fn node_id(&self) -> String {
        let ip = self
            .ips
            .first()
            .copied()
            .unwrap_or(IpAddr::V4(Ipv4Addr::LOCALHOST));
        format!(
            "sidecar~{ip}~{}.{}~{}.svc.{}",
            self.pod_name, self.namespace, self.namespace, self.domain
        )
    }

    fn node(&self) -> Node {
        let s = |v: &str| PbValue {
            kind: Some(value::Kind::StringValue(v.to_string())),
        };
        let labels = Struct {
            fields: self.labels.iter().map(|(k, v)| (k.clone(), s(v))).collect(),
        };
        let ips: Vec<String> = self.ips.iter().map(IpAddr::to_string).collect();
        let mut fields: BTreeMap<String, PbValue> = self
            .metadata
            .iter()
            .map(|(k, v)| (k.clone(), s(v)))
            .collect();
        fields.insert("NAME".into(), s(&self.pod_name));
        fields.insert("NAMESPACE".into(), s(&self.namespace));
        fields.insert("INSTANCE_IPS".into(), s(&ips.join(",")));
        fields.insert("SERVICE_ACCOUNT".into(), s(&self.service_account));
        fields.insert("CLUSTER_ID".into(), s(&self.cluster_id));
        fields.insert(
            "INTERCEPTION_MODE".into(),
            s(if self.tproxy { "TPROXY" } else { "REDIRECT" }),
        );
        fields.insert("ISTIO_VERSION".into(), s(env!("CARGO_PKG_VERSION")));
        if self.dns_capture {
            fields.insert("DNS_CAPTURE".into(), s("true"));
        }
        if let Some(pc) = &self.proxy_config {
            fields.insert(
                "PROXY_CONFIG".into(),
                PbValue {
                    kind: Some(value::Kind::StructValue(pc.clone())),
                },
            );
        }
        fields.insert(
            "LABELS".into(),
            PbValue {
                kind: Some(value::Kind::StructValue(labels)),
            },
        );
        Node {
            id: self.node_id(),
            cluster: self.labels.get("app").map_or_else(
                || self.pod_name.clone(),
                |a| format!("{a}.{}", self.namespace),
            ),
            metadata: Some(Struct {
                fields: fields.into_iter().collect(),
            }),
            ..Default::default()
        }
    }

    fn workload_name(&self) -> String {
        // A Deployment's pod `reviews-v1-7d9c-xk2p` belongs to workload `reviews-v1`.
        let parts: Vec<&str> = self.pod_name.rsplitn(3, '-').collect();
        match parts.as_slice() {
            [_, _, name] if self.labels.contains_key("pod-template-hash") => name.to_string(),
            _ => self.pod_name.clone(),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("binding {what} on {addr}: {source}")]
    Bind {
        what: &'static str,
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("reading the mesh roots {path}: {source}")]
    Roots {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("control plane address {0:?}: {1}")]
    Address(String, String),
    #[error(transparent)]
    Identity(#[from] crate::identity::IdentityError),
}

async fn bind(
    what: &'static str,
    addr: SocketAddr,
    transparent: bool,
) -> Result<TcpListener, AgentError> {
    let err = |source| AgentError::Bind { what, addr, source };
    let socket = socket2::Socket::new(
        socket2::Domain::for_address(addr),
        socket2::Type::STREAM,
        Some(socket2::Protocol::TCP),
    )
    .map_err(err)?;
    socket.set_reuse_address(true).map_err(err)?;
    if transparent {
        // TPROXY delivers connections addressed to other IPs to this socket.
        socket.set_ip_transparent_v4(true).map_err(err)?;
    }
    socket.set_nonblocking(true).map_err(err)?;
    socket.bind(&addr.into()).map_err(err)?;
    socket.listen(1024).map_err(err)?;
    TcpListener::from_std(socket.into()).map_err(err)
}

/// The pod's resolv.conf, and the DNS proxy's sockets: UDP and TCP on 127.0.0.1, and on ::1
/// too when a nameserver is IPv6 (as Istio's agent binds them).
async fn bind_dns(
    opts: &Options,
) -> Result<
    (
        isthmus_capture::config::ResolvConf,
        Vec<(UdpSocket, TcpListener)>,
    ),
    AgentError,
> {
    let resolv = match std::fs::read_to_string(&opts.resolv_conf) {
        Ok(text) => isthmus_capture::config::ResolvConf::parse(&text),
        Err(e) => {
            tracing::warn!(path = %opts.resolv_conf.display(), error = %e, "no nameservers to forward DNS to");
            Default::default()
        }
    };
    let mut loopbacks = vec![IpAddr::V4(Ipv4Addr::LOCALHOST)];
    if resolv.nameservers.iter().any(IpAddr::is_ipv6) {
        loopbacks.push(IpAddr::V6(std::net::Ipv6Addr::LOCALHOST));
    }
    let mut sockets = Vec::new();
    for ip in loopbacks {
        let addr = SocketAddr::new(ip, opts.ports.dns);
        let udp = UdpSocket::bind(addr)
            .await
            .map_err(|source| AgentError::Bind {
                what: "DNS (UDP)",
                addr,
                source,
            })?;
        sockets.push((udp, bind("DNS (TCP)", addr, false).await?));
    }
    Ok((resolv, sockets))
}

/// A lazy channel to the control plane: TLS when `roots` are given, presenting `client` (the
/// workload certificate chain and key, PEM) when given.
fn channel(
    opts: &Options,
    roots: Option<&str>,
    client: Option<(String, String)>,
) -> Result<tonic::transport::Channel, AgentError> {
    let bad = |e: String| AgentError::Address(opts.discovery_address.clone(), e);
    let scheme = if roots.is_some() { "https" } else { "http" };
    let mut ep = Endpoint::from_shared(format!("{scheme}://{}", opts.discovery_address))
        .map_err(|e| bad(e.to_string()))?
        .connect_timeout(Duration::from_secs(5))
        .initial_stream_window_size(isthmus_xds::server::CLIENT_WINDOW)
        .initial_connection_window_size(isthmus_xds::server::CLIENT_WINDOW)
        .max_frame_size(isthmus_xds::server::CLIENT_MAX_FRAME)
        .http2_keep_alive_interval(Duration::from_secs(30))
        .keep_alive_timeout(Duration::from_secs(10));
    if let Some(roots) = roots {
        let mut tls = ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(roots))
            .domain_name(opts.discovery_san.clone());
        if let Some((chain, key)) = client {
            tls = tls.identity(tonic::transport::Identity::from_pem(chain, key));
        }
        ep = ep.tls_config(tls).map_err(|e| bad(e.to_string()))?;
    }
    // Lazy: the first use connects, and every reconnect goes through it again.
    Ok(ep.connect_lazy())
}

/// Runs the proxy until `shutdown` completes or `/quitquitquit` is posted, then drains.
pub async fn run(
    opts: Options,
    log_levels: Option<LogLevels>,
    shutdown: impl Future<Output = ()>,
) -> Result<(), AgentError> {
    let started = Instant::now();
    let any = |port| SocketAddr::new(opts.bind, port);
    // Bind first: a port taken is an error now, and the kernel queues early connections.
    let outbound = bind("outbound capture", any(opts.ports.outbound), false).await?;
    let inbound = bind("inbound capture", any(opts.ports.inbound), opts.tproxy).await?;
    let admin = bind(
        "admin",
        SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), opts.ports.admin),
        false,
    )
    .await?;
    let agent = bind("agent", any(opts.ports.agent), false).await?;
    let health = bind("health", any(opts.ports.health), false).await?;
    let prometheus = bind("prometheus", any(opts.ports.prometheus), false).await?;
    let dns = if opts.dns_capture {
        Some(bind_dns(&opts).await?)
    } else {
        None
    };

    let roots = opts
        .root_cert
        .as_ref()
        .map(|p| {
            std::fs::read_to_string(p).map_err(|source| AgentError::Roots {
                path: p.clone(),
                source,
            })
        })
        .transpose()?;
    let ch = channel(&opts, roots.as_deref(), None)?;
    let id = SpiffeId::new(&opts.trust_domain, &opts.namespace, &opts.service_account);
    let identity = match &roots {
        Some(roots) => {
            let ca = CaClient {
                channel: ch.clone(),
                token_path: opts.token_path.clone(),
                ttl: opts.cert_ttl,
            };
            let identity = Arc::new(fetch_with_retry(&ca, &id, roots, &opts.trust_domain).await?);
            tracing::info!(identity = %identity.id, "workload certificate issued");
            tokio::spawn(identity.clone().renew_forever(ca));
            Some(identity)
        }
        None => {
            tracing::warn!("no mesh roots: plaintext xDS and no mTLS");
            None
        }
    };

    let workload = Workload::from_labels(
        &opts.workload_name(),
        &opts.namespace,
        &opts.cluster_id,
        &opts.labels,
    );
    let header = |s: &str| {
        s.parse()
            .unwrap_or_else(|_| ::http::HeaderValue::from_static("unknown"))
    };
    let me = Me {
        metadata: header(&workload.encode()),
        preamble: crate::peer_exchange::preamble(&workload, &opts.node_id()).into(),
        node_id: header(&opts.node_id()),
        principal_uri: id.to_string().into(),
        workload: Arc::new(workload),
    };
    // Each xDS session connects anew and presents the certificate current then (mutual TLS on
    // the control plane's secure port, which checks it against the node it claims to be).
    let connect = {
        let (opts, roots, identity) = (opts.clone(), roots.clone(), identity.clone());
        move || {
            let client = identity.as_ref().map(|i| {
                let (issued, _) = i.issued();
                (issued.presented_chain(), issued.key_pem)
            });
            channel(&opts, roots.as_deref(), client)
        }
    };
    let stats = Arc::new(Stats::with_inclusions(opts.stats_inclusions.clone()));
    let pools = Arc::new(Pools::new(identity, stats.clone()));
    let (config_tx, config_rx) = watch::channel(Arc::new(Config::default()));
    let (drain_tx, drain_rx) = watch::channel(false);
    let (ready_tx, ready_rx) = watch::channel(false);
    let (quit_tx, mut quit_rx) = watch::channel(false);
    let node = opts.node();
    let shared = Arc::new(Shared {
        config: config_rx.clone(),
        pools: pools.clone(),
        spans: crate::trace::Reporter::start(config_rx.clone(), stats.clone()),
        span_endpoint: Arc::new(crate::trace::Endpoint {
            service_name: node.cluster.clone(),
            ip: opts.ips.first().copied(),
        }),
        stats,
        me,
        peers: Default::default(),
        draining: drain_rx,
        connections: Default::default(),
    });
    let xds_state = XdsState::default();
    let state = Arc::new(AdminState {
        shared: shared.clone(),
        ready: ready_rx.clone(),
        started,
        quit: quit_tx,
        log_levels,
        bootstrap: crate::bootstrap::Bootstrap {
            opts: opts.clone(),
            node: node.clone(),
            at: std::time::SystemTime::now(),
        },
        xds_link: xds_state.link.clone(),
        xds_updates: xds_state.updates.clone(),
        app_metrics: opts.app_metrics.clone(),
        app_scrapes: Default::default(),
        app_scrape_failures: Default::default(),
        dns: dns
            .as_ref()
            .map(|_| Arc::new(crate::dns::DnsStats::default())),
    });
    if let (Some((resolv, sockets)), Some(counters)) = (dns, &state.dns) {
        let resolver = crate::dns::Resolver::start(
            config_rx.clone(),
            opts.namespace.clone(),
            opts.domain.clone(),
            resolv.search,
            resolv
                .nameservers
                .iter()
                .map(|ip| SocketAddr::new(*ip, 53))
                .collect(),
            counters.clone(),
        );
        for (udp, tcp) in sockets {
            tokio::spawn(resolver.clone().serve_udp(udp));
            tokio::spawn(resolver.clone().serve_tcp(tcp));
        }
    }
    tokio::spawn(crate::admin::serve(admin, state.admin_handler()));
    tokio::spawn(crate::admin::serve(health, state.health_handler()));
    tokio::spawn(crate::admin::serve(agent, state.agent_handler()));
    tokio::spawn(crate::admin::serve(prometheus, state.prometheus_handler()));

    let mut wildcards = isthmus_xds::client::WILDCARDS.to_vec();
    if opts.dns_capture {
        wildcards.push(NAME_TABLE);
    }
    let xds = tokio::spawn(follow_control_plane(
        connect,
        node,
        wildcards,
        xds_state,
        pools,
        config_tx,
        shared.clone(),
    ));
    // Ready once the first full configuration is in (the certificate came before): clusters
    // and listeners with the endpoints and routes they name, as Envoy warms them, and the
    // name table the DNS proxy answers from. A control plane that never sends some of those
    // still gets a proxy serving what it has, after WARMING_LIMIT.
    {
        let mut rx = config_rx.clone();
        let ready_tx = ready_tx.clone();
        let dns = opts.dns_capture;
        let warmed = move |c: &Arc<Config>| {
            c.xds.warmed() && (!dns || c.xds.versions.contains_key(NAME_TABLE))
        };
        tokio::spawn(async move {
            let warmed = tokio::time::timeout(WARMING_LIMIT, rx.wait_for(warmed))
                .await
                .map(|done| done.is_ok());
            let ready = match warmed {
                Ok(done) => done,
                Err(_) => {
                    tracing::warn!(
                        "endpoints or routes still missing after {WARMING_LIMIT:?}: ready without them"
                    );
                    let full = |c: &Arc<Config>| {
                        c.xds.versions.contains_key(CLUSTER)
                            && c.xds.versions.contains_key(LISTENER)
                    };
                    rx.wait_for(full).await.is_ok()
                }
            };
            if ready {
                ready_tx.send_replace(true);
            }
        });
    }
    // Accept only once configured; until then the kernel holds connections in the backlog.
    let accept = {
        let shared = shared.clone();
        let mut ready = ready_rx.clone();
        let (out_port, in_port) = (opts.ports.outbound, opts.ports.inbound);
        tokio::spawn(async move {
            if ready.wait_for(|r| *r).await.is_ok() {
                tracing::info!("configuration received; proxy ready");
                let o = tokio::spawn(crate::serve::accept_loop(
                    outbound,
                    out_port,
                    shared.clone(),
                ));
                let i = tokio::spawn(crate::serve::accept_loop(inbound, in_port, shared));
                let _ = tokio::join!(o, i);
            }
        })
    };

    tokio::select! {
        () = shutdown => tracing::info!("shutting down"),
        _ = quit_rx.wait_for(|q| *q) => tracing::info!("quit requested"),
    }
    // Drain: stop accepting, let in-flight requests finish, bounded by the drain duration.
    drain_tx.send_replace(true);
    let deadline = Instant::now() + opts.drain_duration;
    while shared.active_connections() > 0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tracing::info!(remaining = shared.active_connections(), "drained");
    xds.abort();
    accept.abort();
    Ok(())
}

async fn fetch_with_retry(
    ca: &CaClient,
    id: &SpiffeId,
    roots: &str,
    trust_domain: &str,
) -> Result<Identity, AgentError> {
    let mut backoff = Duration::from_millis(200);
    let mut tries = 0;
    loop {
        match Identity::fetch(
            ca,
            id.clone(),
            roots.to_string(),
            vec![trust_domain.to_string()],
        )
        .await
        {
            Ok(i) => return Ok(i),
            // The control plane may still be starting: retry for a while, then give up.
            Err(e) if tries < 20 => {
                tracing::warn!(error = %e, "certificate not issued yet; retrying");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(5));
                tries += 1;
            }
            Err(e) => return Err(e.into()),
        }
    }
}

/// ADS forever: on a lost stream, reconnect with backoff, keeping the accepted state.
async fn follow_control_plane(
    connect: impl Fn() -> Result<tonic::transport::Channel, AgentError>,
    node: Node,
    wildcards: Vec<&'static str>,
    mut state: XdsState,
    pools: Arc<Pools>,
    out: watch::Sender<Arc<Config>>,
    shared: Arc<Shared>,
) {
    let mut backoff = Duration::from_millis(100);
    // Delta first; a control plane without it gets state of the world from then on.
    let mut sotw = false;
    loop {
        let since = Instant::now();
        let compile = |xds: &XdsState| Config::compile(xds, &pools).map_err(|e| e.to_string());
        let ch = match connect() {
            Ok(ch) => ch,
            Err(e) => {
                tracing::warn!(error = %e, "cannot set up the control-plane connection");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(15));
                continue;
            }
        };
        let result = if sotw {
            isthmus_xds::client::run_sotw(
                ch.clone(),
                node.clone(),
                &wildcards,
                &mut state,
                compile,
                &out,
            )
            .await
        } else {
            isthmus_xds::client::run(
                ch.clone(),
                node.clone(),
                &wildcards,
                &mut state,
                compile,
                &out,
            )
            .await
        };
        shared.stats.inc("control_plane.disconnects");
        match result {
            Err(isthmus_xds::client::ClientError::Stream(status))
                if !sotw && status.code() == tonic::Code::Unimplemented =>
            {
                tracing::info!("control plane has no delta xDS; using state of the world");
                sotw = true;
                continue;
            }
            Err(e) => tracing::warn!(error = %e, "control plane stream ended; reconnecting"),
            Ok(()) => {}
        }
        if since.elapsed() > Duration::from_secs(30) {
            backoff = Duration::from_millis(100);
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(15));
    }
}
