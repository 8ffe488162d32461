//! Connections to upstream endpoints: TCP with an optional source address, mesh mTLS with the
//! workload certificate, and the HTTP pools over them (HTTP/1.1 or HTTP/2 as the cluster says).
//!
//! Pools outlive configurations: a cluster whose transport did not change keeps its pooled
//! connections and per-endpoint counters across updates.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicU32, AtomicU64, AtomicUsize};
use std::sync::{Arc, Mutex, OnceLock};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::Version;
use http::uri::{Authority, PathAndQuery, Scheme, Uri};
use http_body_util::combinators::BoxBody;
use rustls_pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncWrite, BufWriter, ReadBuf};
use tokio::net::{TcpSocket, TcpStream};
use tokio_rustls::client::TlsStream;

use crate::identity::{Identity, PeerCert};
use crate::pool::HttpPool;
use crate::stats::Stats;

pub type Body = BoxBody<Bytes, hyper::Error>;

/// Mesh mTLS to an upstream: the SNI to send, the identities accepted, the ALPN offered.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct TlsSpec {
    pub sni: String,
    pub sans: Vec<String>,
    pub alpn: Vec<String>,
}

/// Everything that decides how a connection to an endpoint of a cluster is made.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct TransportSpec {
    pub bind: Option<IpAddr>,
    pub connect_timeout: Duration,
    pub tls: Option<TlsSpec>,
    /// The HTTP version spoken upstream (the cluster's protocol options).
    pub protocol: UpstreamHttp,
    /// How long a pooled connection may sit unused: Envoy's default of one hour when None,
    /// no limit when zero.
    pub idle_timeout: Option<Duration>,
    /// Requests a pooled connection carries before it is retired (unlimited when None).
    pub max_requests_per_connection: Option<u32>,
    /// How long a pooled connection takes new requests (no limit when None).
    pub max_connection_duration: Option<Duration>,
    /// TCP keepalive on the connections (the cluster's `upstream_connection_options`).
    pub keepalive: Option<Keepalive>,
}

/// Envoy's `TcpKeepalive`: SO_KEEPALIVE, with the system's timings where a field is unset.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct Keepalive {
    /// Idle time before the first probe.
    pub time: Option<Duration>,
    pub interval: Option<Duration>,
    /// Unanswered probes before the connection is dropped.
    pub probes: Option<u32>,
}

impl Keepalive {
    fn apply(&self, tcp: &TcpStream) -> std::io::Result<()> {
        let mut k = socket2::TcpKeepalive::new();
        if let Some(t) = self.time {
            k = k.with_time(t);
        }
        if let Some(i) = self.interval {
            k = k.with_interval(i);
        }
        if let Some(n) = self.probes {
            k = k.with_retries(n);
        }
        socket2::SockRef::from(tcp).set_tcp_keepalive(&k)
    }
}

/// Which HTTP version a cluster's requests travel in (Envoy's `upstream_protocol_options`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum UpstreamHttp {
    /// HTTP/1.1 (Envoy's default).
    Http1,
    /// HTTP/2: prior knowledge on plaintext, ALPN `h2` over TLS.
    Http2,
    /// The version the request came in (`use_downstream_protocol_config`).
    Downstream,
    /// Whichever TLS's ALPN settles, HTTP/2 first (`auto_config`).
    Alpn,
}

/// Envoy's default idle timeout of upstream HTTP connections.
const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(3600);

#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("connection timeout after {0:?}")]
    Timeout(Duration),
    #[error("connection failure: {0}")]
    Io(#[from] std::io::Error),
    #[error("TLS handshake: {0}")]
    Tls(std::io::Error),
    #[error("no address for {0}")]
    Resolve(String),
    #[error("bad SNI {0:?}")]
    Sni(String),
    #[error("mTLS needs the workload certificate, which this proxy does not have")]
    NoIdentity,
}

/// A cluster's connection counters (Envoy's `cluster.<name>.upstream_cx_*`).
#[derive(Clone)]
pub struct ConnectionStats {
    stats: Arc<Stats>,
    cluster: Arc<str>,
}

impl ConnectionStats {
    pub fn new(stats: Arc<Stats>, cluster: &str) -> ConnectionStats {
        ConnectionStats {
            stats,
            cluster: cluster.into(),
        }
    }

    pub fn inc(&self, what: &str) {
        self.stats
            .inc(format_args!("cluster.{}.{what}", self.cluster));
    }

    /// Counters of their own, cluster `test`.
    #[cfg(test)]
    pub(crate) fn detached() -> ConnectionStats {
        ConnectionStats::new(Arc::new(Stats::new()), "test")
    }

    #[cfg(test)]
    pub(crate) fn get(&self, what: &str) -> u64 {
        self.stats
            .counter(&format!("cluster.{}.{what}", self.cluster))
    }
}

/// How connections of one cluster (and TLS variant) are made, with their HTTP pools. The
/// pools are made on first use: a sidecar knows every cluster of the mesh, and calls few.
pub struct Transport {
    pub spec: TransportSpec,
    tls: Option<TlsConfigs>,
    connector: Connector,
    counters: ConnectionStats,
    /// One pool per HTTP version a request may take: HTTP/1.1, HTTP/2, and negotiated by ALPN.
    http1: OnceLock<Arc<HttpPool>>,
    http2: OnceLock<Arc<HttpPool>>,
    alpn: OnceLock<Arc<HttpPool>>,
}

impl std::fmt::Debug for Transport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Transport")
            .field("spec", &self.spec)
            .finish()
    }
}

/// Connections made from the downstream client's own address (Envoy's `original_src`, TPROXY
/// mode): bound transparently to it and marked, so that the replies route back here.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OriginalSource {
    pub ip: IpAddr,
    pub mark: u32,
}

impl Transport {
    pub(crate) fn new(
        spec: TransportSpec,
        identity: Option<&Identity>,
        counters: ConnectionStats,
    ) -> Result<Transport, String> {
        let tls = match &spec.tls {
            None => None,
            Some(t) => {
                let identity = identity.ok_or("mTLS configured but no workload identity")?;
                let sni = ServerName::try_from(t.sni.clone())
                    .map_err(|_| format!("SNI {:?} is not a valid name", t.sni))?;
                let raw = identity.client_config(&t.sans, alpn(&[], &t.alpn))?;
                Some(TlsConfigs { sni, raw })
            }
        };
        Ok(Transport::assemble(spec, tls, None, counters))
    }

    /// The same transport, with connections made from `source` instead (and pools of their
    /// own: such connections cannot be shared between clients).
    pub fn from_source(&self, source: OriginalSource) -> Transport {
        Transport::assemble(
            self.spec.clone(),
            self.tls.clone(),
            Some(source),
            self.counters.clone(),
        )
    }

    fn assemble(
        spec: TransportSpec,
        tls: Option<TlsConfigs>,
        source: Option<OriginalSource>,
        counters: ConnectionStats,
    ) -> Transport {
        let connector = Connector {
            bind: source.map(|s| s.ip).or(spec.bind),
            mark: source.map(|s| s.mark),
            timeout: spec.connect_timeout,
            keepalive: spec.keepalive,
            tls: tls.as_ref().map(|t| (t.raw.clone(), t.sni.clone())),
        };
        Transport {
            connector,
            tls,
            spec,
            counters,
            http1: OnceLock::new(),
            http2: OnceLock::new(),
            alpn: OnceLock::new(),
        }
    }

    /// The pool for a request that came in as `downstream`: the cluster's version, and
    /// HTTP/1.1 for an upgrade (WebSocket), which cannot ride HTTP/2 here.
    pub fn http(&self, downstream: Version, upgrade: bool) -> &Arc<HttpPool> {
        let version = match self.spec.protocol {
            _ if upgrade => UpstreamHttp::Http1,
            UpstreamHttp::Downstream if downstream == Version::HTTP_2 => UpstreamHttp::Http2,
            UpstreamHttp::Downstream => UpstreamHttp::Http1,
            p => p,
        };
        let pool = match version {
            UpstreamHttp::Http2 => &self.http2,
            UpstreamHttp::Alpn => &self.alpn,
            _ => &self.http1,
        };
        pool.get_or_init(|| Arc::new(self.pool(version)))
    }

    fn pool(&self, version: UpstreamHttp) -> HttpPool {
        let tls = self
            .tls
            .as_ref()
            .zip(self.spec.tls.as_ref())
            .map(|(t, spec)| {
                let mut config = (*t.raw).clone();
                config.alpn_protocols = http_alpn(version, &spec.alpn);
                (Arc::new(config), t.sni.clone())
            });
        let connector = Connector {
            tls,
            ..self.connector.clone()
        };
        HttpPool::new(
            connector,
            self.counters.clone(),
            version,
            match self.spec.idle_timeout {
                None => Some(DEFAULT_IDLE_TIMEOUT),
                Some(t) if t.is_zero() => None,
                t => t,
            },
            self.spec.max_requests_per_connection,
            self.spec.max_connection_duration,
        )
    }

    /// A raw connection for TCP proxying (TLS with the mesh ALPN when configured).
    pub async fn connect(&self, addr: &Address) -> Result<Conn, ConnectError> {
        self.connector.connect(addr).await
    }
}

/// The TLS of a transport's raw connections; its HTTP clients derive theirs (other ALPN) when
/// they are made.
#[derive(Clone)]
struct TlsConfigs {
    sni: ServerName<'static>,
    raw: Arc<rustls::ClientConfig>,
}

/// ALPN values an HTTP connection offers. Over the mesh's mTLS (the cluster offers `istio`),
/// Istio's ALPN filter's: `istio-http/1.1` or `istio-h2` first, by which an Envoy peer picks
/// its HTTP filter chain rather than the TCP one (`istio-peer-exchange`, which an HTTP
/// connection must not take); elsewhere the HTTP version, then the cluster's own.
fn http_alpn(version: UpstreamHttp, cluster: &[String]) -> Vec<Vec<u8>> {
    let mesh = cluster.iter().any(|a| a == "istio");
    let offered: &[&str] = match version {
        UpstreamHttp::Http2 if mesh => &["istio-h2", "istio", "h2"],
        UpstreamHttp::Alpn if mesh => &["istio-h2", "istio-http/1.1", "istio", "h2", "http/1.1"],
        _ if mesh => &["istio-http/1.1", "istio", "http/1.1"],
        UpstreamHttp::Http2 => return alpn(&["h2"], cluster),
        UpstreamHttp::Alpn => return alpn(&["h2", "http/1.1"], cluster),
        _ => return alpn(&["http/1.1"], cluster),
    };
    offered.iter().map(|a| a.as_bytes().to_vec()).collect()
}

/// Whether the ALPN a connection negotiated is HTTP/2 (Istio's name for it, too).
pub(crate) fn is_h2(alpn: Option<&[u8]>) -> bool {
    matches!(alpn, Some(b"h2" | b"istio-h2"))
}

/// ALPN values offered: `first`, then the mesh's own.
fn alpn(first: &[&str], mesh: &[String]) -> Vec<Vec<u8>> {
    let mut all: Vec<Vec<u8>> = Vec::new();
    for a in first.iter().copied().chain(mesh.iter().map(String::as_str)) {
        // The mesh's list may name the version too (Istio's `h2` for HTTP/2 clusters).
        if !all.iter().any(|b| b == a.as_bytes()) {
            all.push(a.as_bytes().to_vec());
        }
    }
    all
}

/// Where an endpoint is.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Address {
    Ip(SocketAddr),
    Dns(String, u16),
}

impl std::fmt::Display for Address {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Address::Ip(a) => a.fmt(f),
            Address::Dns(h, p) => write!(f, "{h}:{p}"),
        }
    }
}

impl Address {
    /// The authority requests to this endpoint carry. Endpoints make theirs once, with the
    /// configuration.
    pub fn authority(&self) -> Option<Authority> {
        Authority::from_maybe_shared(Bytes::from(self.to_string())).ok()
    }
}

/// The URI of a request to the endpoint at `authority`, `http://<authority><path>`; the
/// authority and the path are shared, not copied.
pub fn uri(authority: &Authority, path: Option<&PathAndQuery>) -> Option<Uri> {
    let mut parts = http::uri::Parts::default();
    parts.scheme = Some(Scheme::HTTP);
    parts.authority = Some(authority.clone());
    parts.path_and_query = Some(
        path.cloned()
            .unwrap_or_else(|| PathAndQuery::from_static("/")),
    );
    Uri::from_parts(parts).ok()
}

#[derive(Clone)]
pub struct Connector {
    bind: Option<IpAddr>,
    /// Bind transparently (the address need not be local) and mark the socket.
    mark: Option<u32>,
    timeout: Duration,
    keepalive: Option<Keepalive>,
    tls: Option<(Arc<rustls::ClientConfig>, ServerName<'static>)>,
}

impl Connector {
    pub(crate) async fn connect(&self, addr: &Address) -> Result<Conn, ConnectError> {
        let work = async {
            let target = match addr {
                Address::Ip(a) => *a,
                Address::Dns(host, port) => tokio::net::lookup_host((host.as_str(), *port))
                    .await?
                    .next()
                    .ok_or_else(|| ConnectError::Resolve(addr.to_string()))?,
            };
            let socket = match self.mark {
                Some(mark) => transparent_socket(target, mark)?,
                None if target.is_ipv4() => TcpSocket::new_v4()?,
                None => TcpSocket::new_v6()?,
            };
            if let Some(ip) = self.bind.filter(|ip| ip.is_ipv4() == target.is_ipv4()) {
                socket.bind(SocketAddr::new(ip, 0))?;
            }
            let tcp = socket.connect(target).await?;
            tcp.set_nodelay(true)?;
            if let Some(k) = &self.keepalive {
                k.apply(&tcp)?;
            }
            match &self.tls {
                None => Ok(Conn::Plain(tcp)),
                Some((cfg, sni)) => tokio_rustls::TlsConnector::from(cfg.clone())
                    .connect(sni.clone(), tcp)
                    .await
                    .map(|s| Conn::Tls(Box::new(TlsConn::new(s))))
                    .map_err(ConnectError::Tls),
            }
        };
        tokio::time::timeout(self.timeout, work)
            .await
            .map_err(|_| ConnectError::Timeout(self.timeout))?
    }
}

/// A socket that may bind to an address that is not local (the client's, for TPROXY's
/// `original_src`), marked so that the connection's replies are routed back to this host.
fn transparent_socket(target: SocketAddr, mark: u32) -> std::io::Result<TcpSocket> {
    let socket = socket2::Socket::new(
        socket2::Domain::for_address(target),
        socket2::Type::STREAM,
        Some(socket2::Protocol::TCP),
    )?;
    if target.is_ipv4() {
        socket.set_ip_transparent_v4(true)?;
    }
    socket.set_mark(mark)?;
    socket.set_nonblocking(true)?;
    Ok(TcpSocket::from_std_stream(socket.into()))
}

/// Plaintext gathered before it is encrypted: the frames of one request (HTTP/2 HEADERS,
/// DATA, END_STREAM) leave in one TLS record and one system call instead of one each.
pub const TLS_WRITE_BUFFER: usize = 16 * 1024;

/// An upstream connection, plaintext or mTLS.
pub enum Conn {
    Plain(TcpStream),
    Tls(Box<TlsConn>),
}

/// An mTLS connection whose plaintext is gathered into records.
pub struct TlsConn {
    io: BufWriter<TlsStream<TcpStream>>,
    /// HTTP/2 was negotiated: a flush first lets the request's body task run (below).
    defer_flushes: bool,
    /// The pending flush has let the runtime's other ready tasks run once.
    flush_deferred: bool,
    /// The server's certificate, for the metrics of what the connection carries.
    peer: Option<Arc<PeerCert>>,
}

impl TlsConn {
    fn new(io: TlsStream<TcpStream>) -> TlsConn {
        // HTTP/1.1 writes a request's head and body together and then flushes: nothing would
        // come to gather, and a deferral would only cost a turn of the runtime.
        let defer_flushes = is_h2(io.get_ref().1.alpn_protocol());
        let peer = PeerCert::of(io.get_ref().1.peer_certificates()).map(Arc::new);
        TlsConn {
            io: BufWriter::with_capacity(TLS_WRITE_BUFFER, io),
            defer_flushes,
            flush_deferred: false,
            peer,
        }
    }
}

impl Conn {
    pub fn negotiated_alpn(&self) -> Option<&[u8]> {
        match self {
            Conn::Plain(_) => None,
            Conn::Tls(t) => t.io.get_ref().get_ref().1.alpn_protocol(),
        }
    }

    /// The server's certificate on mTLS, None on plaintext.
    pub fn peer(&self) -> Option<Arc<PeerCert>> {
        match self {
            Conn::Plain(_) => None,
            Conn::Tls(t) => t.peer.clone(),
        }
    }
}

impl AsyncRead for Conn {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Conn::Tls(s) => Pin::new(&mut s.io).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Conn {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Conn::Tls(s) => Pin::new(&mut s.io).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_flush(cx),
            Conn::Tls(s) => {
                // HTTP/2 flushes right after a request's HEADERS; its DATA comes from the
                // request's body task, which is ready to run. Letting it run first sends both
                // in one record and one system call instead of two (and wakes the peer once).
                if s.defer_flushes && !s.flush_deferred && !s.io.buffer().is_empty() {
                    s.flush_deferred = true;
                    cx.waker().wake_by_ref();
                    return Poll::Pending;
                }
                let flushed = std::task::ready!(Pin::new(&mut s.io).poll_flush(cx));
                s.flush_deferred = false;
                Poll::Ready(flushed)
            }
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Conn::Tls(s) => Pin::new(&mut s.io).poll_shutdown(cx),
        }
    }
}

/// Per-endpoint state that survives configuration updates: requests in flight (least
/// request), consecutive failures and ejection (outlier detection), and totals for `/clusters`.
#[derive(Debug, Default)]
pub struct EndpointState {
    pub active: AtomicUsize,
    pub consecutive_errors: AtomicU32,
    /// Milliseconds since the proxy started until which the endpoint is ejected (0: not).
    pub ejected_until_ms: AtomicU64,
    pub ejections: AtomicU32,
    pub requests: AtomicU64,
    pub errors: AtomicU64,
    /// Connections tried, failed to connect, and open now (HTTP pools and TCP proxying).
    pub cx_total: AtomicU64,
    pub cx_connect_fail: AtomicU64,
    pub cx_active: AtomicUsize,
}

impl EndpointState {
    /// Counts a connection attempt to this endpoint; the connection is counted open while
    /// the guard of [`Attempt::made`] lives.
    pub fn attempt(self: &Arc<Self>) -> Attempt {
        self.cx_total
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Attempt(self.clone())
    }
}

/// A connection attempt to an endpoint, counted.
pub struct Attempt(Arc<EndpointState>);

impl Attempt {
    pub fn failed(self) {
        self.0
            .cx_connect_fail
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }

    pub fn made(self) -> OpenConnection {
        self.0
            .cx_active
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        OpenConnection(self.0)
    }
}

/// An open connection to an endpoint, counted in `cx_active` until dropped.
pub struct OpenConnection(Arc<EndpointState>);

impl Drop for OpenConnection {
    fn drop(&mut self) {
        self.0
            .cx_active
            .fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
    }
}

/// What a cluster has in flight, against its circuit-breaker thresholds.
#[derive(Debug, Default)]
pub struct ClusterState {
    pub requests: AtomicUsize,
    pub connections: AtomicUsize,
    /// Retries in flight (Envoy's `max_retries` and retry budget count these).
    pub retries: AtomicUsize,
}

/// Which circuit-breaker counter a slot is taken from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Counter {
    Requests,
    Connections,
    Retries,
}

/// A slot taken from a circuit-breaker counter, given back on drop.
#[derive(Debug)]
pub struct Slot(Arc<ClusterState>, Counter);

impl ClusterState {
    fn counter(&self, which: Counter) -> &AtomicUsize {
        match which {
            Counter::Requests => &self.requests,
            Counter::Connections => &self.connections,
            Counter::Retries => &self.retries,
        }
    }

    /// Takes a slot of `which` if fewer than `limit` are in use.
    pub fn acquire(self: &Arc<Self>, which: Counter, limit: usize) -> Option<Slot> {
        let counter = self.counter(which);
        let prev = counter.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        if prev >= limit {
            counter.fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
            return None;
        }
        Some(Slot(self.clone(), which))
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.0
            .counter(self.1)
            .fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
    }
}

/// Connection pools and endpoint state, shared by successive configurations.
pub struct Pools {
    identity: Option<Arc<Identity>>,
    stats: Arc<Stats>,
    transports: Mutex<HashMap<(String, TransportSpec), Arc<Transport>>>,
    endpoints: Mutex<HashMap<(String, Address), Arc<EndpointState>>>,
    clusters: Mutex<HashMap<String, Arc<ClusterState>>>,
}

impl Pools {
    pub fn new(identity: Option<Arc<Identity>>, stats: Arc<Stats>) -> Pools {
        Pools {
            identity,
            stats,
            transports: Mutex::default(),
            endpoints: Mutex::default(),
            clusters: Mutex::default(),
        }
    }

    pub fn identity(&self) -> Option<&Arc<Identity>> {
        self.identity.as_ref()
    }

    /// The transport for a cluster: the existing one if its spec is unchanged.
    pub fn transport(&self, cluster: &str, spec: TransportSpec) -> Result<Arc<Transport>, String> {
        let key = (cluster.to_string(), spec);
        let mut map = self.transports.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(t) = map.get(&key) {
            return Ok(t.clone());
        }
        let counters = ConnectionStats::new(self.stats.clone(), cluster);
        let t = Arc::new(Transport::new(
            key.1.clone(),
            self.identity.as_deref(),
            counters,
        )?);
        map.insert(key, t.clone());
        Ok(t)
    }

    pub fn cluster(&self, cluster: &str) -> Arc<ClusterState> {
        self.clusters
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(cluster.to_string())
            .or_default()
            .clone()
    }

    pub fn endpoint(&self, cluster: &str, addr: &Address) -> Arc<EndpointState> {
        self.endpoints
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry((cluster.to_string(), addr.clone()))
            .or_default()
            .clone()
    }

    /// Drops pools and state no cluster of the new configuration uses.
    pub fn retain<'a>(&self, clusters: impl Iterator<Item = &'a Arc<crate::config::Cluster>>) {
        let clusters: Vec<&Arc<crate::config::Cluster>> = clusters.collect();
        self.transports
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .retain(|_, t| {
                clusters
                    .iter()
                    .any(|c| c.transports().any(|ct| Arc::ptr_eq(ct, t)))
            });
        self.clusters
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .retain(|name, _| clusters.iter().any(|c| c.name == *name));
        self.endpoints
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .retain(|(name, addr), _| {
                clusters
                    .iter()
                    .any(|c| c.name == *name && c.endpoints.iter().any(|e| e.address == *addr))
            });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rustls::pki_types::pem::PemObject;

    #[test]
    fn http_over_mesh_mtls_offers_istios_alpn() {
        let names = |v: Vec<Vec<u8>>| -> Vec<String> {
            v.into_iter()
                .map(|a| String::from_utf8(a).unwrap())
                .collect()
        };
        let mesh = ["istio-peer-exchange".to_string(), "istio".to_string()];
        assert_eq!(
            names(http_alpn(UpstreamHttp::Http1, &mesh)),
            ["istio-http/1.1", "istio", "http/1.1"]
        );
        assert_eq!(
            names(http_alpn(UpstreamHttp::Http2, &mesh)),
            ["istio-h2", "istio", "h2"]
        );
        // Outside the mesh, the cluster's own values after the version's.
        let user = ["custom".to_string()];
        assert_eq!(
            names(http_alpn(UpstreamHttp::Alpn, &user)),
            ["h2", "http/1.1", "custom"]
        );
        assert!(is_h2(Some(b"istio-h2")) && is_h2(Some(b"h2")));
        assert!(!is_h2(Some(b"istio-http/1.1")) && !is_h2(None));
    }
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// The peer's side of the connection, counting the TLS records that arrive.
    struct Counting {
        io: TcpStream,
        /// Bytes left of the current record; the header being read.
        left: usize,
        header: Vec<u8>,
        records: Arc<Mutex<usize>>,
    }

    impl AsyncRead for Counting {
        fn poll_read(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &mut ReadBuf<'_>,
        ) -> Poll<std::io::Result<()>> {
            let before = buf.filled().len();
            std::task::ready!(Pin::new(&mut self.io).poll_read(cx, buf))?;
            let read = buf.filled()[before..].to_vec();
            for b in read {
                if self.left > 0 {
                    self.left -= 1;
                    continue;
                }
                self.header.push(b);
                if self.header.len() == 5 {
                    self.left = usize::from(u16::from_be_bytes([self.header[3], self.header[4]]));
                    self.header.clear();
                    *self.records.lock().unwrap() += 1;
                }
            }
            Poll::Ready(Ok(()))
        }
    }

    impl AsyncWrite for Counting {
        fn poll_write(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<std::io::Result<usize>> {
            Pin::new(&mut self.io).poll_write(cx, buf)
        }
        fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
            Pin::new(&mut self.io).poll_flush(cx)
        }
        fn poll_shutdown(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
        ) -> Poll<std::io::Result<()>> {
            Pin::new(&mut self.io).poll_shutdown(cx)
        }
    }

    /// On HTTP/2, a flush lets the task's other ready work run once before it writes: what is
    /// written in between (DATA after HEADERS) leaves in the same TLS record. On HTTP/1.1 a
    /// flush writes at once.
    #[tokio::test]
    async fn a_flush_gathers_what_is_written_right_after_it_into_one_record() {
        assert_eq!(flush_then_write("h2").await, (true, 1));
        assert_eq!(flush_then_write("http/1.1").await, (false, 2));
    }

    /// Writes `HEADERS`, flushes, writes `DAT`, flushes over a TLS connection that negotiated
    /// `alpn`: whether the first flush waited, and how many records the peer received.
    async fn flush_then_write(alpn: &str) -> (bool, usize) {
        let dir = tempfile::tempdir().unwrap();
        let ca = isthmus_ca::Authority::load_or_create(dir.path(), Default::default()).unwrap();
        let (chain, key) = ca
            .issue_server(&["peer.test".to_string()], Duration::from_secs(3600))
            .unwrap();
        let certs: Vec<CertificateDer<'static>> = chain
            .iter()
            .map(|p| CertificateDer::from_pem_slice(p.as_bytes()).unwrap())
            .collect();
        let mut server = rustls::ServerConfig::builder()
            .with_no_client_auth()
            .with_single_cert(
                certs,
                PrivateKeyDer::from_pem_slice(key.as_bytes()).unwrap(),
            )
            .unwrap();
        server.alpn_protocols = vec![alpn.as_bytes().to_vec()];
        let mut roots = rustls::RootCertStore::empty();
        for r in ca.roots_der() {
            roots.add(r).unwrap();
        }
        let mut client = rustls::ClientConfig::builder()
            .with_root_certificates(roots)
            .with_no_client_auth();
        client.alpn_protocols = vec![alpn.as_bytes().to_vec()];

        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let records = Arc::new(Mutex::new(0));
        let counted = records.clone();
        let peer = tokio::spawn(async move {
            let (tcp, _) = listener.accept().await.unwrap();
            let io = Counting {
                io: tcp,
                left: 0,
                header: Vec::new(),
                records: counted.clone(),
            };
            let mut tls = tokio_rustls::TlsAcceptor::from(Arc::new(server))
                .accept(io)
                .await
                .unwrap();
            let handshake = *counted.lock().unwrap();
            let mut got = vec![0u8; 10];
            tls.read_exact(&mut got).await.unwrap();
            (got, *counted.lock().unwrap() - handshake)
        });
        let tcp = TcpStream::connect(addr).await.unwrap();
        let tls = tokio_rustls::TlsConnector::from(Arc::new(client))
            .connect(ServerName::try_from("peer.test").unwrap(), tcp)
            .await
            .unwrap();
        let mut conn = Conn::Tls(Box::new(TlsConn::new(tls)));
        conn.write_all(b"HEADERS").await.unwrap();
        let waited =
            std::future::poll_fn(|cx| Poll::Ready(Pin::new(&mut conn).poll_flush(cx).is_pending()))
                .await;
        conn.write_all(b"DAT").await.unwrap();
        conn.flush().await.unwrap();
        let (got, records) = tokio::time::timeout(Duration::from_secs(10), peer)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(got, b"HEADERSDAT");
        (waited, records)
    }

    fn mesh_identity(ca: &isthmus_ca::Authority, sa: &str) -> Identity {
        let id = isthmus_ca::identity::SpiffeId::new("cluster.local", "default", sa);
        let (key_pem, csr) = isthmus_ca::workload::new_key_and_csr(&id).unwrap();
        let chain = ca.sign_csr(&csr, &id, None).unwrap();
        let now = std::time::SystemTime::now();
        let issued = isthmus_ca::workload::Issued {
            chain,
            key_pem,
            not_before: now,
            not_after: now + Duration::from_secs(3600),
        };
        Identity::new(id, ca.root_pem(), vec!["cluster.local".into()], issued).unwrap()
    }

    /// A session made by a cluster's plain-TLS connection resumes on its HTTP one: one store
    /// and one verifier serve every TLS configuration of the cluster. Both connections know
    /// the server's identity.
    #[tokio::test]
    async fn a_clusters_tls_variants_resume_each_others_sessions() {
        let dir = tempfile::tempdir().unwrap();
        let ca = isthmus_ca::Authority::load_or_create(dir.path(), Default::default()).unwrap();
        let server = mesh_identity(&ca, "server");
        let client = mesh_identity(&ca, "client");
        let acceptor = tokio_rustls::TlsAcceptor::from(server.server_config(&[]).unwrap());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let peer = tokio::spawn(async move {
            let mut kinds = Vec::new();
            for _ in 0..2 {
                let (tcp, _) = listener.accept().await.unwrap();
                let mut tls = acceptor.accept(tcp).await.unwrap();
                kinds.push(tls.get_ref().1.handshake_kind());
                // The client reads this after the session ticket, so it has it stored.
                tls.write_all(b"x").await.unwrap();
                tls.shutdown().await.unwrap();
            }
            kinds
        });
        let spec = TransportSpec {
            bind: None,
            connect_timeout: Duration::from_secs(5),
            tls: Some(TlsSpec {
                sni: "outbound_.80_._.server.default.svc.cluster.local".into(),
                sans: vec!["spiffe://cluster.local/ns/default/sa/server".into()],
                alpn: vec!["istio".into()],
            }),
            protocol: UpstreamHttp::Http1,
            idle_timeout: None,
            max_requests_per_connection: None,
            max_connection_duration: None,
            keepalive: None,
        };
        let transport = Transport::new(spec, Some(&client), ConnectionStats::detached()).unwrap();
        let tls = transport.tls.as_ref().unwrap();
        let mut http = (*tls.raw).clone();
        http.alpn_protocols = alpn(&["h2", "http/1.1"], &["istio".to_string()]);
        for config in [tls.raw.clone(), Arc::new(http)] {
            let tcp = TcpStream::connect(addr).await.unwrap();
            let mut conn = Conn::Tls(Box::new(TlsConn::new(
                tokio_rustls::TlsConnector::from(config)
                    .connect(tls.sni.clone(), tcp)
                    .await
                    .unwrap(),
            )));
            // Known on the resumed session too, where the server sends no certificate.
            assert_eq!(
                conn.peer().map(|p| p.principal.to_string()).as_deref(),
                Some("spiffe://cluster.local/ns/default/sa/server")
            );
            let mut got = Vec::new();
            conn.read_to_end(&mut got).await.unwrap();
            assert_eq!(got, b"x");
        }
        let kinds = peer.await.unwrap();
        assert_eq!(
            kinds,
            [
                Some(rustls::HandshakeKind::Full),
                Some(rustls::HandshakeKind::Resumed)
            ]
        );
    }

    /// A cluster that carries no request costs no HTTP pool; each pool comes with its first
    /// request.
    #[test]
    fn http_pools_are_made_on_first_use() {
        let spec = TransportSpec {
            bind: None,
            connect_timeout: Duration::from_secs(1),
            tls: None,
            protocol: UpstreamHttp::Http1,
            idle_timeout: None,
            max_requests_per_connection: None,
            max_connection_duration: None,
            keepalive: None,
        };
        let transport = Transport::new(spec, None, ConnectionStats::detached()).unwrap();
        let made =
            |t: &Transport| [t.http1.get(), t.http2.get(), t.alpn.get()].map(|p| p.is_some());
        assert_eq!(made(&transport), [false; 3]);
        let _ = transport.http(Version::HTTP_11, false);
        assert_eq!(made(&transport), [true, false, false]);
    }

    /// The cluster's TCP keepalive is on the upstream socket, as the kernel reports it.
    #[tokio::test]
    async fn connections_carry_the_clusters_tcp_keepalive() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let to = Address::Ip(listener.local_addr().unwrap());
        let connector = |keepalive| Connector {
            bind: None,
            mark: None,
            timeout: Duration::from_secs(5),
            keepalive,
            tls: None,
        };
        let socket = |c: Conn| match c {
            Conn::Plain(tcp) => tcp,
            Conn::Tls(_) => unreachable!("plaintext connector"),
        };
        let tcp = socket(
            connector(Some(Keepalive {
                time: Some(Duration::from_secs(7)),
                interval: Some(Duration::from_secs(3)),
                probes: Some(4),
            }))
            .connect(&to)
            .await
            .unwrap(),
        );
        let s = socket2::SockRef::from(&tcp);
        assert!(s.keepalive().unwrap());
        assert_eq!(s.tcp_keepalive_time().unwrap(), Duration::from_secs(7));
        assert_eq!(s.tcp_keepalive_interval().unwrap(), Duration::from_secs(3));
        assert_eq!(s.tcp_keepalive_retries().unwrap(), 4);
        // Without one, the socket has none.
        let plain = socket(connector(None).connect(&to).await.unwrap());
        assert!(!socket2::SockRef::from(&plain).keepalive().unwrap());
    }
}
