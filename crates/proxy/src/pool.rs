//! Pooled HTTP connections to the endpoints of one transport. An HTTP/1.1 connection carries
//! one request at a time and waits idle between them; one HTTP/2 connection per endpoint
//! carries them all. A connection leaves the pool when its peer closes it, when it has been
//! unused for the idle timeout, after `maxRequestsPerConnection` requests, or once it is older
//! than the maximum connection duration (it finishes the requests it carries).
//!
//! Connections are keyed by the endpoint's address, which the load balancer has in hand
//! (hyper-util's pool, used before, hashed each request's scheme and authority with SipHash and
//! gave an HTTP/1.1 connection back through a task of its own per request).

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::uri::{Authority, Parts, Uri};
use http::{HeaderValue, Request, Response, header};
use http_body::{Body as HttpBody, Frame, SizeHint};
use hyper::body::Incoming;
use hyper::client::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo};

use crate::identity::PeerCert;
use crate::upstream::{
    Address, Body, ConnectError, ConnectionStats, Connector, EndpointState, UpstreamHttp,
};

#[derive(Debug, thiserror::Error)]
pub enum PoolError {
    #[error(transparent)]
    Connect(#[from] ConnectError),
    #[error("handshake: {0}")]
    Handshake(hyper::Error),
    #[error(transparent)]
    Request(hyper::Error),
    /// The connection this request waited for failed (as Envoy fails a pending request with
    /// the connection it was waiting for).
    #[error("{0}")]
    Waited(Arc<str>),
}

impl PoolError {
    /// No connection was made (Envoy's connection failure, not a reset).
    pub fn is_connect(&self) -> bool {
        matches!(
            self,
            PoolError::Connect(_) | PoolError::Handshake(_) | PoolError::Waited(_)
        )
    }
}

/// The HTTP connections of one transport, per endpoint.
pub struct HttpPool {
    connector: Connector,
    counters: ConnectionStats,
    /// HTTP/1.1, HTTP/2, or settled per connection by ALPN.
    version: UpstreamHttp,
    /// None: connections stay until their peer closes them.
    idle_timeout: Option<Duration>,
    max_requests: Option<u32>,
    /// Envoy's `max_connection_duration`: no new requests on a connection this old.
    max_duration: Option<Duration>,
    endpoints: Mutex<HashMap<Address, Endpoint, foldhash::fast::RandomState>>,
    /// The task that closes connections idle past the timeout has been started.
    reaping: AtomicBool,
}

#[derive(Default)]
struct Endpoint {
    /// Idle HTTP/1.1 connections, the most recently used last.
    idle: Vec<Idle>,
    http2: Option<Shared>,
    /// Held while an HTTP/2 connection (or one whose ALPN is unsettled) is made, so that the
    /// requests that come meanwhile wait for it instead of making their own.
    connecting: Arc<tokio::sync::Mutex<()>>,
    /// ALPN settled on HTTP/1.1 here: requests take idle connections instead of waiting.
    http1_only: bool,
    /// When the last connection made under `connecting` failed, and why.
    failed: Option<(Instant, Arc<str>)>,
}

struct Idle {
    conn: Http1Conn,
    since: Instant,
}

struct Shared {
    tx: http2::SendRequest<Body>,
    peer: Peer,
    uses: u32,
    used: Instant,
    born: Instant,
}

/// An HTTP/1.1 connection out of the pool, and the requests it has carried.
struct Http1Conn {
    tx: http1::SendRequest<Body>,
    uses: u32,
    peer: Peer,
    born: Instant,
}

/// The server's certificate on an mTLS connection, None on plaintext.
pub type Peer = Option<Arc<PeerCert>>;

enum Checked {
    Http1(Http1Conn),
    Http2(http2::SendRequest<Body>, Peer),
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Endpoint {
    /// The shared HTTP/2 connection, counted as used; it leaves the pool with its last
    /// allowed request.
    fn http2(&mut self, now: Instant, pool: &HttpPool) -> Option<Checked> {
        if !self
            .http2
            .as_ref()
            .is_some_and(|s| pool.keeps(&s.tx, s.used, s.born, now))
        {
            self.http2 = None;
            return None;
        }
        let s = self.http2.as_mut()?;
        s.uses += 1;
        s.used = now;
        let checked = Checked::Http2(s.tx.clone(), s.peer.clone());
        if pool.max_requests.is_some_and(|max| s.uses >= max) {
            pool.counters.inc("upstream_cx_max_requests");
            self.http2 = None;
        }
        Some(checked)
    }

    /// An idle HTTP/1.1 connection ready for a request. Closed and expired ones are dropped;
    /// one whose previous exchange the connection has not wound up yet stays for later.
    fn http1(&mut self, now: Instant, pool: &HttpPool) -> Option<Http1Conn> {
        self.idle
            .retain(|i| pool.keeps(&i.conn.tx, i.since, i.conn.born, now));
        let at = self.idle.iter().rposition(|i| i.conn.tx.is_ready())?;
        let mut conn = self.idle.remove(at).conn;
        conn.uses += 1;
        Some(conn)
    }

    fn is_empty(&self) -> bool {
        self.idle.is_empty() && self.http2.is_none() && Arc::strong_count(&self.connecting) == 1
    }
}

impl HttpPool {
    pub fn new(
        connector: Connector,
        counters: ConnectionStats,
        version: UpstreamHttp,
        idle_timeout: Option<Duration>,
        max_requests: Option<u32>,
        max_duration: Option<Duration>,
    ) -> HttpPool {
        HttpPool {
            connector,
            counters,
            version,
            idle_timeout,
            max_requests,
            max_duration,
            endpoints: Mutex::default(),
            reaping: AtomicBool::new(false),
        }
    }

    /// Sends `req` (its URI absolute, `http://<endpoint><path>`) to the endpoint at `to`, on
    /// a pooled connection or a new one. A request that a reused connection closed on before
    /// taking it is sent again on another, as the connection was not the request's to fail.
    /// The response comes with the certificate of the server that sent it.
    pub async fn send(
        self: &Arc<Self>,
        to: &Address,
        state: Option<&Arc<EndpointState>>,
        mut req: Request<Body>,
    ) -> Result<(Response<PooledBody>, Peer), PoolError> {
        let uri = req.uri().clone();
        loop {
            let (checked, reused) = self.checkout(to, state).await?;
            let mut err = match checked {
                Checked::Http2(mut tx, peer) => {
                    host_as_authority(&mut req);
                    match tx.try_send_request(req).await {
                        Ok(resp) => return Ok((resp.map(PooledBody::unpooled), peer)),
                        Err(e) => e,
                    }
                }
                Checked::Http1(mut conn) => {
                    to_origin_form(&mut req);
                    match conn.tx.try_send_request(req).await {
                        Ok(resp) => {
                            let peer = conn.peer.clone();
                            return Ok((self.after_response(to, conn, resp), peer));
                        }
                        Err(e) => e,
                    }
                }
            };
            match err.take_message() {
                Some(again) if reused => {
                    req = again;
                    // HTTP/2 moved the host into the URI: it goes back to `Host`.
                    host_from_authority(&mut req);
                    *req.uri_mut() = uri.clone();
                }
                _ => return Err(PoolError::Request(err.into_error())),
            }
        }
    }

    /// A connection for one request, and whether it has carried others.
    async fn checkout(
        self: &Arc<Self>,
        to: &Address,
        state: Option<&Arc<EndpointState>>,
    ) -> Result<(Checked, bool), PoolError> {
        let now = Instant::now();
        let gate = {
            let mut endpoints = lock(&self.endpoints);
            let ep = match endpoints.get_mut(to) {
                Some(ep) => ep,
                None => {
                    self.start_reaping();
                    endpoints.entry(to.clone()).or_default()
                }
            };
            if let Some(checked) = ep.http2(now, self) {
                return Ok((checked, true));
            }
            if self.version == UpstreamHttp::Http1 || ep.http1_only {
                if let Some(conn) = ep.http1(now, self) {
                    return Ok((Checked::Http1(conn), true));
                }
                None
            } else {
                Some(ep.connecting.clone())
            }
        };
        let Some(gate) = gate else {
            return self.open(to, state).await;
        };
        let _turn = gate.lock_owned().await;
        {
            // Made, or failed, while this request waited: take it, or fail with it.
            let mut endpoints = lock(&self.endpoints);
            let ep = endpoints.entry(to.clone()).or_default();
            if let Some(checked) = ep.http2(Instant::now(), self) {
                return Ok((checked, true));
            }
            if let Some((at, why)) = &ep.failed
                && *at >= now
            {
                return Err(PoolError::Waited(why.clone()));
            }
        }
        let opened = self.open(to, state).await;
        if let Err(e) = &opened {
            let mut endpoints = lock(&self.endpoints);
            endpoints.entry(to.clone()).or_default().failed =
                Some((Instant::now(), e.to_string().into()));
        }
        opened
    }

    /// Whether a pooled connection made at `born` and unused since `since` stays: not once
    /// its peer has closed it, nor after the idle timeout or the maximum duration (counted).
    fn keeps<T: Closes>(&self, tx: &T, since: Instant, born: Instant, now: Instant) -> bool {
        if tx.closed() {
            return false;
        }
        if self
            .idle_timeout
            .is_some_and(|t| now.duration_since(since) >= t)
        {
            self.counters.inc("upstream_cx_idle_timeout");
            return false;
        }
        if self
            .max_duration
            .is_some_and(|d| now.duration_since(born) >= d)
        {
            self.counters.inc("upstream_cx_max_duration_reached");
            return false;
        }
        true
    }

    /// A new connection to `to`, HTTP/2 ones pooled at once.
    async fn open(
        &self,
        to: &Address,
        state: Option<&Arc<EndpointState>>,
    ) -> Result<(Checked, bool), PoolError> {
        self.counters.inc("upstream_cx_total");
        let attempt = state.map(EndpointState::attempt);
        let conn = match self.connector.connect(to).await {
            Ok(c) => c,
            Err(e) => {
                self.counters.inc("upstream_cx_connect_fail");
                if let Some(a) = attempt {
                    a.failed();
                }
                return Err(e.into());
            }
        };
        // Counted open as long as the connection's task runs.
        let open = attempt.map(|a| a.made());
        let peer = conn.peer();
        let http2 = match self.version {
            UpstreamHttp::Http2 => true,
            UpstreamHttp::Alpn => crate::upstream::is_h2(conn.negotiated_alpn()),
            _ => false,
        };
        if self.version == UpstreamHttp::Alpn {
            let mut endpoints = lock(&self.endpoints);
            endpoints.entry(to.clone()).or_default().http1_only = !http2;
        }
        self.counters.inc(if http2 {
            "upstream_cx_http2_total"
        } else {
            "upstream_cx_http1_total"
        });
        let io = TokioIo::new(conn);
        if http2 {
            let (mut tx, task) = http2::Builder::new(TokioExecutor::new())
                .handshake(io)
                .await
                .map_err(PoolError::Handshake)?;
            tokio::spawn(async move {
                if let Err(e) = task.await {
                    tracing::debug!(error = %e, "upstream HTTP/2 connection ended");
                }
                drop(open);
            });
            tx.ready().await.map_err(PoolError::Handshake)?;
            if self.max_requests.is_none_or(|max| max > 1) {
                let mut endpoints = lock(&self.endpoints);
                let now = Instant::now();
                endpoints.entry(to.clone()).or_default().http2 = Some(Shared {
                    tx: tx.clone(),
                    peer: peer.clone(),
                    uses: 1,
                    used: now,
                    born: now,
                });
            }
            Ok((Checked::Http2(tx, peer), false))
        } else {
            let (tx, task) = http1::Builder::new()
                .handshake(io)
                .await
                .map_err(PoolError::Handshake)?;
            tokio::spawn(async move {
                if let Err(e) = task.with_upgrades().await {
                    tracing::debug!(error = %e, "upstream HTTP/1.1 connection ended");
                }
                drop(open);
            });
            // A new connection takes its first request before it reports ready.
            let conn = Http1Conn {
                tx,
                uses: 1,
                peer,
                born: Instant::now(),
            };
            Ok((Checked::Http1(conn), false))
        }
    }

    /// The response of an HTTP/1.1 exchange: the connection goes back to the pool once the
    /// body has been read to its end (at once when there is none), unless it is spent,
    /// closing, or now belongs to an upgrade.
    fn after_response(
        self: &Arc<Self>,
        to: &Address,
        conn: Http1Conn,
        resp: Response<Incoming>,
    ) -> Response<PooledBody> {
        let spent = self.max_requests.is_some_and(|max| conn.uses >= max);
        if spent {
            self.counters.inc("upstream_cx_max_requests");
        }
        let keep = resp.status() != http::StatusCode::SWITCHING_PROTOCOLS && !spent;
        let back = keep.then(|| GiveBack {
            pool: self.clone(),
            to: to.clone(),
            conn,
        });
        resp.map(|inner| {
            let mut body = PooledBody { inner, back };
            if body.inner.is_end_stream() {
                body.give_back();
            }
            body
        })
    }

    fn put(&self, to: Address, conn: Http1Conn) {
        if conn.tx.is_closed() {
            return;
        }
        let mut endpoints = lock(&self.endpoints);
        endpoints.entry(to).or_default().idle.push(Idle {
            conn,
            since: Instant::now(),
        });
    }

    /// Starts the task that closes connections left idle for the idle timeout (checked a few
    /// times per timeout), and forgets endpoints with none. It ends with the pool.
    fn start_reaping(self: &Arc<Self>) {
        if self.reaping.swap(true, Ordering::Relaxed) {
            return;
        }
        let pool: Weak<HttpPool> = Arc::downgrade(self);
        // Without a timeout, only to forget closed connections and the endpoints left empty
        // (original-destination clusters meet many).
        let every = self
            .idle_timeout
            .into_iter()
            .chain(self.max_duration)
            .min()
            .map_or(Duration::from_secs(60), |t| {
                (t / 4).max(Duration::from_millis(50))
            });
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            tick.tick().await;
            loop {
                tick.tick().await;
                let Some(pool) = pool.upgrade() else {
                    return;
                };
                pool.reap(Instant::now());
            }
        });
    }

    fn reap(&self, now: Instant) {
        let mut endpoints = lock(&self.endpoints);
        endpoints.retain(|_, ep| {
            ep.idle
                .retain(|i| self.keeps(&i.conn.tx, i.since, i.conn.born, now));
            if ep
                .http2
                .as_ref()
                .is_some_and(|s| !self.keeps(&s.tx, s.used, s.born, now))
            {
                ep.http2 = None;
            }
            !ep.is_empty()
        });
    }

    /// Pooled connections, for tests.
    #[cfg(test)]
    fn pooled(&self) -> usize {
        lock(&self.endpoints)
            .values()
            .map(|ep| ep.idle.len() + usize::from(ep.http2.is_some()))
            .sum()
    }
}

/// The senders of both versions, for the checks the pool makes of either.
trait Closes {
    fn closed(&self) -> bool;
}

impl Closes for http1::SendRequest<Body> {
    fn closed(&self) -> bool {
        self.is_closed()
    }
}

impl Closes for http2::SendRequest<Body> {
    fn closed(&self) -> bool {
        self.is_closed()
    }
}

/// HTTP/2 carries the host as `:authority` instead of a `Host` field (RFC 9113, 8.3.1), as
/// Envoy sends it; the endpoint is the connection's.
fn host_as_authority(req: &mut Request<Body>) {
    let Some(host) = req.headers().get(header::HOST) else {
        return;
    };
    let Ok(authority) = Authority::try_from(host.as_bytes()) else {
        return;
    };
    let mut parts = Parts::default();
    parts.scheme = req.uri().scheme().cloned();
    parts.authority = Some(authority);
    parts.path_and_query = req.uri().path_and_query().cloned();
    if let Ok(uri) = Uri::from_parts(parts) {
        *req.uri_mut() = uri;
        req.headers_mut().remove(header::HOST);
    }
}

/// A request without `Host` gets its URI's authority as one.
fn host_from_authority(req: &mut Request<Body>) {
    if !req.headers().contains_key(header::HOST)
        && let Some(a) = req.uri().authority()
        && let Ok(v) = HeaderValue::from_str(a.as_str())
    {
        req.headers_mut().insert(header::HOST, v);
    }
}

/// HTTP/1.1 carries the path alone (origin form); the endpoint is the connection's.
fn to_origin_form(req: &mut Request<Body>) {
    host_from_authority(req);
    let mut parts = Parts::default();
    parts.path_and_query = req.uri().path_and_query().cloned();
    if let Ok(uri) = Uri::from_parts(parts) {
        *req.uri_mut() = uri;
    }
}

struct GiveBack {
    pool: Arc<HttpPool>,
    to: Address,
    conn: Http1Conn,
}

/// A response body; one from an HTTP/1.1 connection gives the connection back to its pool
/// when it ends. Dropped before its end, it takes the connection with it (hyper closes it).
pub struct PooledBody {
    inner: Incoming,
    back: Option<GiveBack>,
}

impl PooledBody {
    fn unpooled(inner: Incoming) -> PooledBody {
        PooledBody { inner, back: None }
    }

    fn give_back(&mut self) {
        if let Some(b) = self.back.take() {
            b.pool.put(b.to, b.conn);
        }
    }
}

impl HttpBody for PooledBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let p = Pin::new(&mut self.inner).poll_frame(cx);
        match &p {
            Poll::Ready(Some(Ok(_))) if self.inner.is_end_stream() => self.give_back(),
            Poll::Ready(None) => self.give_back(),
            // A broken exchange leaves the connection unusable.
            Poll::Ready(Some(Err(_))) => self.back = None,
            _ => {}
        }
        p
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::upstream::{Transport, TransportSpec};
    use futures::StreamExt;
    use http::Version;
    use http_body_util::{BodyExt, Empty, StreamBody};
    use std::net::SocketAddr;
    use std::sync::atomic::AtomicUsize;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpStream;

    /// An HTTP/1.1 and h2c upstream on loopback. It answers with the version it was asked in,
    /// except `/stream`, whose body never ends, and counts the connections opened and open.
    struct Upstream {
        addr: Address,
        opened: Arc<AtomicUsize>,
        open: Arc<AtomicUsize>,
    }

    async fn upstream() -> Upstream {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = Address::Ip(listener.local_addr().unwrap());
        let (opened, open) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
        let (o, n) = (opened.clone(), open.clone());
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                o.fetch_add(1, Ordering::SeqCst);
                n.fetch_add(1, Ordering::SeqCst);
                let n = n.clone();
                tokio::spawn(async move {
                    let answer = hyper::service::service_fn(|req: Request<Incoming>| async move {
                        let body = if req.uri().path() == "/host" {
                            let host = req.headers().get(header::HOST);
                            let v = format!("{:?} {host:?}", req.uri().authority());
                            http_body_util::Full::new(Bytes::from(v))
                                .map_err(|never| match never {})
                                .boxed()
                        } else if req.uri().path() == "/stream" {
                            let chunks =
                                futures::stream::iter([Ok::<_, std::convert::Infallible>(
                                    Frame::data(Bytes::from_static(b"first")),
                                )])
                                .chain(futures::stream::pending());
                            BodyExt::boxed(StreamBody::new(chunks))
                        } else {
                            let v = format!("{:?}", req.version());
                            http_body_util::Full::new(Bytes::from(v))
                                .map_err(|never| match never {})
                                .boxed()
                        };
                        Ok::<_, std::convert::Infallible>(Response::new(body))
                    });
                    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(tcp), answer)
                        .await;
                    n.fetch_sub(1, Ordering::SeqCst);
                });
            }
        });
        Upstream { addr, opened, open }
    }

    fn spec(protocol: UpstreamHttp) -> TransportSpec {
        TransportSpec {
            bind: None,
            connect_timeout: Duration::from_secs(5),
            tls: None,
            protocol,
            idle_timeout: None,
            max_requests_per_connection: None,
            max_connection_duration: None,
            keepalive: None,
        }
    }

    fn transport(spec: TransportSpec) -> Transport {
        Transport::new(spec, None, ConnectionStats::detached()).unwrap()
    }

    fn pool(protocol: UpstreamHttp, idle: Option<Duration>, max: Option<u32>) -> Transport {
        transport(TransportSpec {
            idle_timeout: idle,
            max_requests_per_connection: max,
            ..spec(protocol)
        })
    }

    /// A GET of `path` at `to`, its URI absolute as the proxy sends it.
    fn request(to: &Address, path: &str) -> Request<Body> {
        Request::get(format!("http://{to}{path}"))
            .body(Empty::new().map_err(|never| match never {}).boxed())
            .unwrap()
    }

    async fn get(pool: &Arc<HttpPool>, to: &Address, path: &str) -> Response<PooledBody> {
        pool.send(to, None, request(to, path)).await.unwrap().0
    }

    async fn text(resp: Response<PooledBody>) -> String {
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        String::from_utf8(body.to_vec()).unwrap()
    }

    /// Waits (bounded) until `n` reads `want`.
    async fn settles(n: &AtomicUsize, want: usize) -> bool {
        for _ in 0..500 {
            if n.load(Ordering::SeqCst) == want {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        false
    }

    #[tokio::test]
    async fn http1_connections_carry_one_request_at_a_time_and_are_reused() {
        let up = upstream().await;
        let t = pool(UpstreamHttp::Http1, None, None);
        let pool = t.http(Version::HTTP_11, false);
        for _ in 0..5 {
            assert_eq!(text(get(pool, &up.addr, "/").await).await, "HTTP/1.1");
        }
        assert_eq!(up.opened.load(Ordering::SeqCst), 1);
        // Three at once: the idle connection and two new ones, all pooled afterwards.
        let (a, b, c) = tokio::join!(
            get(pool, &up.addr, "/"),
            get(pool, &up.addr, "/"),
            get(pool, &up.addr, "/")
        );
        for r in [a, b, c] {
            assert_eq!(text(r).await, "HTTP/1.1");
        }
        assert_eq!(up.opened.load(Ordering::SeqCst), 3);
        assert_eq!(pool.pooled(), 3);
        assert_eq!(pool.counters.get("upstream_cx_total"), 3);
        assert_eq!(pool.counters.get("upstream_cx_http1_total"), 3);
    }

    #[tokio::test]
    async fn http2_requests_share_one_connection() {
        let up = upstream().await;
        let t = pool(UpstreamHttp::Http2, None, None);
        let pool = t.http(Version::HTTP_11, false);
        let all = futures::future::join_all((0..8).map(|_| get(pool, &up.addr, "/"))).await;
        for r in all {
            assert_eq!(text(r).await, "HTTP/2.0");
        }
        assert_eq!(up.opened.load(Ordering::SeqCst), 1);
        assert_eq!(pool.pooled(), 1);
        assert_eq!(pool.counters.get("upstream_cx_http2_total"), 1);
    }

    #[tokio::test]
    async fn connections_are_retired_after_max_requests() {
        let up = upstream().await;
        for (protocol, want) in [(UpstreamHttp::Http1, 3), (UpstreamHttp::Http2, 3)] {
            let before = up.opened.load(Ordering::SeqCst);
            let t = pool(protocol, None, Some(2));
            let pool = t.http(Version::HTTP_11, false);
            for _ in 0..6 {
                let _ = text(get(pool, &up.addr, "/").await).await;
            }
            let opened = up.opened.load(Ordering::SeqCst) - before;
            assert_eq!(opened, want, "{protocol:?}");
            assert_eq!(pool.counters.get("upstream_cx_max_requests"), want as u64);
        }
    }

    #[tokio::test]
    async fn idle_connections_are_closed_after_the_idle_timeout() {
        let up = upstream().await;
        let t = pool(UpstreamHttp::Http1, Some(Duration::from_millis(200)), None);
        let pool = t.http(Version::HTTP_11, false);
        let _ = text(get(pool, &up.addr, "/").await).await;
        assert_eq!(pool.pooled(), 1);
        assert!(
            settles(&up.open, 0).await,
            "the idle connection stayed open"
        );
        assert_eq!(pool.pooled(), 0);
        assert_eq!(pool.counters.get("upstream_cx_idle_timeout"), 1);
        // The next request opens a new one.
        let _ = text(get(pool, &up.addr, "/").await).await;
        assert_eq!(up.opened.load(Ordering::SeqCst), 2);
    }

    /// DestinationRule `tcp.maxConnectionDuration`: a connection takes requests while it is
    /// younger, is closed once older (with no request in flight), and the next one is new;
    /// HTTP/1.1 and HTTP/2 alike.
    #[tokio::test]
    async fn connections_retire_at_the_maximum_duration() {
        for (protocol, version) in [
            (UpstreamHttp::Http1, Version::HTTP_11),
            (UpstreamHttp::Http2, Version::HTTP_2),
        ] {
            let up = upstream().await;
            let t = transport(TransportSpec {
                max_connection_duration: Some(Duration::from_millis(300)),
                ..spec(protocol)
            });
            let pool = t.http(version, false);
            for _ in 0..3 {
                let _ = text(get(pool, &up.addr, "/").await).await;
            }
            assert_eq!(up.opened.load(Ordering::SeqCst), 1, "{protocol:?}");
            assert!(
                settles(&up.open, 0).await,
                "{protocol:?}: the connection outlived its maximum duration"
            );
            assert_eq!(pool.counters.get("upstream_cx_max_duration_reached"), 1);
            let _ = text(get(pool, &up.addr, "/").await).await;
            assert_eq!(up.opened.load(Ordering::SeqCst), 2, "{protocol:?}");
        }
    }

    /// The endpoint's own connection counts, for `/clusters`: tried, failed, open now.
    #[tokio::test]
    async fn an_endpoint_counts_its_connections() {
        let up = upstream().await;
        let t = pool(UpstreamHttp::Http1, None, None);
        let pool = t.http(Version::HTTP_11, false);
        let state = Arc::new(EndpointState::default());
        for _ in 0..3 {
            let req = request(&up.addr, "/");
            let resp = pool.send(&up.addr, Some(&state), req).await.unwrap().0;
            let _ = text(resp).await;
        }
        assert_eq!(state.cx_total.load(Ordering::SeqCst), 1);
        assert_eq!(state.cx_active.load(Ordering::SeqCst), 1);
        // A connection that cannot be made counts as tried and failed, never as open.
        let closed = Arc::new(EndpointState::default());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let gone = Address::Ip(listener.local_addr().unwrap());
        drop(listener);
        let req = request(&gone, "/");
        let e = pool.send(&gone, Some(&closed), req).await.err().unwrap();
        assert!(e.is_connect(), "{e}");
        assert_eq!(closed.cx_total.load(Ordering::SeqCst), 1);
        assert_eq!(closed.cx_connect_fail.load(Ordering::SeqCst), 1);
        assert_eq!(closed.cx_active.load(Ordering::SeqCst), 0);
    }

    /// Zero is Envoy's "no idle timeout".
    #[tokio::test]
    async fn a_zero_idle_timeout_keeps_idle_connections() {
        let up = upstream().await;
        let t = pool(UpstreamHttp::Http1, Some(Duration::ZERO), None);
        let pool = t.http(Version::HTTP_11, false);
        let _ = text(get(pool, &up.addr, "/").await).await;
        tokio::time::sleep(Duration::from_millis(300)).await;
        let _ = text(get(pool, &up.addr, "/").await).await;
        assert_eq!(up.opened.load(Ordering::SeqCst), 1);
        assert_eq!(pool.pooled(), 1);
        assert_eq!(pool.counters.get("upstream_cx_idle_timeout"), 0);
    }

    #[tokio::test]
    async fn a_body_dropped_before_its_end_takes_its_connection_along() {
        let up = upstream().await;
        let t = pool(UpstreamHttp::Http1, None, None);
        let pool = t.http(Version::HTTP_11, false);
        let mut body = get(pool, &up.addr, "/stream").await.into_body();
        let first = body.frame().await.unwrap().unwrap().into_data().unwrap();
        assert_eq!(first, "first");
        drop(body);
        assert!(settles(&up.open, 0).await, "the connection stayed open");
        assert_eq!(pool.pooled(), 0);
        assert_eq!(text(get(pool, &up.addr, "/").await).await, "HTTP/1.1");
        assert_eq!(up.opened.load(Ordering::SeqCst), 2);
    }

    /// An upstream that closes each connection after one answer, without saying so.
    #[tokio::test]
    async fn a_connection_its_peer_closed_is_not_reused() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr: SocketAddr = listener.local_addr().unwrap();
        let accepted = Arc::new(AtomicUsize::new(0));
        let count = accepted.clone();
        tokio::spawn(async move {
            while let Ok((mut tcp, _)) = listener.accept().await {
                count.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(async move {
                    let mut buf = [0u8; 1024];
                    let _ = tcp.read(&mut buf).await;
                    let _ = tcp
                        .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
                        .await;
                });
            }
        });
        let to = Address::Ip(addr);
        let t = pool(UpstreamHttp::Http1, None, None);
        let pool = t.http(Version::HTTP_11, false);
        for _ in 0..3 {
            assert_eq!(text(get(pool, &to, "/").await).await, "ok");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert_eq!(accepted.load(Ordering::SeqCst), 3);
    }

    /// Requests that wait for an HTTP/2 connection being made fail with it, rather than each
    /// trying again in turn.
    #[tokio::test]
    async fn requests_waiting_for_a_connection_fail_with_it() {
        // A listener whose accept queue is full: connections to it time out.
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let listener = socket.listen(0).unwrap();
        let to = listener.local_addr().unwrap();
        let mut queued = Vec::new();
        for _ in 0..4 {
            let c = tokio::time::timeout(Duration::from_millis(100), TcpStream::connect(to)).await;
            if let Ok(Ok(c)) = c {
                queued.push(c);
            }
        }
        let t = transport(TransportSpec {
            connect_timeout: Duration::from_millis(300),
            ..spec(UpstreamHttp::Http2)
        });
        let pool = t.http(Version::HTTP_11, false);
        let to = Address::Ip(to);
        let tries = (0..5).map(|_| pool.send(&to, None, request(&to, "/")));
        let mut waited = 0;
        for r in futures::future::join_all(tries).await {
            let e = r.err().expect("no connection, no answer");
            assert!(e.is_connect(), "{e}");
            waited += usize::from(matches!(e, PoolError::Waited(_)));
        }
        // One tried; the others failed with it.
        assert_eq!(waited, 4);
        assert_eq!(pool.counters.get("upstream_cx_connect_fail"), 1);
    }

    /// The request's host reaches the upstream as `Host` on HTTP/1.1 and as `:authority` on
    /// HTTP/2; the endpoint's address in neither.
    #[tokio::test]
    async fn the_host_travels_as_each_version_carries_it() {
        let up = upstream().await;
        let seen = async |protocol: UpstreamHttp| {
            let t = pool(protocol, None, None);
            let mut req = request(&up.addr, "/host");
            req.headers_mut().insert(
                header::HOST,
                HeaderValue::from_static("reviews.default:9080"),
            );
            text(
                t.http(Version::HTTP_11, false)
                    .send(&up.addr, None, req)
                    .await
                    .unwrap()
                    .0,
            )
            .await
        };
        assert_eq!(
            seen(UpstreamHttp::Http1).await,
            r#"None Some("reviews.default:9080")"#
        );
        assert_eq!(
            seen(UpstreamHttp::Http2).await,
            "Some(reviews.default:9080) None"
        );
    }

    /// A request travels in the version its cluster names; with `use_downstream_protocol`, in
    /// the version it came in; an upgrade always in HTTP/1.1.
    #[tokio::test]
    async fn a_request_travels_in_the_version_its_cluster_says() {
        let up = upstream().await;
        let seen = async |protocol: UpstreamHttp, downstream: Version, upgrade: bool| {
            let t = pool(protocol, None, None);
            text(get(t.http(downstream, upgrade), &up.addr, "/").await).await
        };
        use UpstreamHttp::*;
        let (h1, h2) = (Version::HTTP_11, Version::HTTP_2);
        assert_eq!(seen(Http1, h2, false).await, "HTTP/1.1");
        assert_eq!(seen(Http2, h1, false).await, "HTTP/2.0");
        assert_eq!(seen(Http2, h1, true).await, "HTTP/1.1");
        assert_eq!(seen(Downstream, h1, false).await, "HTTP/1.1");
        assert_eq!(seen(Downstream, h2, false).await, "HTTP/2.0");
        // Without TLS there is no ALPN to settle on HTTP/2.
        assert_eq!(seen(Alpn, h2, false).await, "HTTP/1.1");
    }
}
