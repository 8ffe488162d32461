//! Accepting connections: the original destination, the hand-off from `virtualOutbound` to
//! the per-port listeners, filter-chain selection, TLS termination, and the network filter.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio_util::either::Either;

use crate::Shared;
use crate::config::listener::{ConnectionFacts, Direction};
use crate::config::{Listener, NetworkFilter};
use crate::identity::PeerCert;
use crate::upstream::{OriginalSource, Transport, TransportSpec};

/// Bound on a TLS handshake from a peer.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// What the filters know about their connection.
#[derive(Debug)]
pub struct ConnInfo {
    pub listener: Arc<Listener>,
    pub destination: SocketAddr,
    pub source: SocketAddr,
    /// Some when the connection is mTLS terminated here.
    pub peer: Option<PeerCert>,
    /// With `original_src`: this connection's own upstream transports, by the cluster's.
    pub upstreams: std::sync::Mutex<std::collections::HashMap<TransportSpec, Arc<Transport>>>,
    /// The `x-forwarded-client-cert` element for the peer, made on the first request: the
    /// peer and the connection manager that describes it stay for the connection's life.
    pub xfcc: std::sync::OnceLock<Option<http::HeaderValue>>,
}

impl ConnInfo {
    pub fn inbound(&self) -> bool {
        self.listener.direction == Direction::Inbound
    }

    /// The transport to reach an upstream of `t`'s cluster from this connection: `t` itself,
    /// or with `original_src`, one that connects from the client's address (kept for the life
    /// of this connection: such connections cannot serve other clients).
    pub fn transport(&self, t: &Arc<Transport>) -> Arc<Transport> {
        let Some(mark) = self.listener.original_src_mark else {
            return t.clone();
        };
        let mut own = self.upstreams.lock().unwrap_or_else(|p| p.into_inner());
        own.entry(t.spec.clone())
            .or_insert_with(|| {
                Arc::new(t.from_source(OriginalSource {
                    ip: self.source.ip(),
                    mark,
                }))
            })
            .clone()
    }

    /// The peer's SPIFFE URI, for authorization.
    pub fn principal(&self) -> Option<String> {
        self.peer
            .as_ref()
            .and_then(|p| p.identity.as_ref())
            .map(ToString::to_string)
    }
}

/// Accepts on a bound listener port until draining starts.
pub async fn accept_loop(tcp: TcpListener, port: u16, shared: Arc<Shared>) {
    let mut drain = shared.draining.clone();
    let draining = async move {
        let _ = drain.wait_for(|d| *d).await;
    };
    let mut draining = std::pin::pin!(draining);
    loop {
        tokio::select! {
            r = tcp.accept() => match r {
                Ok((stream, peer)) => {
                    let shared = shared.clone();
                    let guard = shared.connection_guard();
                    tokio::spawn(async move {
                        handle(stream, peer, port, &shared).await;
                        drop(guard);
                    });
                }
                Err(e) => {
                    // Out of descriptors and the like: back off instead of spinning.
                    tracing::warn!(port, error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
            () = &mut draining => return,
        }
    }
}

/// The destination the connection had before iptables redirected it; for TPROXY (no NAT
/// entry) the local address is that destination.
fn original_dst(stream: &TcpStream) -> std::io::Result<SocketAddr> {
    use nix::sys::socket::{getsockopt, sockopt};
    let local = stream.local_addr()?;
    let got = if local.is_ipv4() {
        getsockopt(stream, sockopt::OriginalDst).map(|sin| {
            SocketAddr::new(
                IpAddr::V4(Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr))),
                u16::from_be(sin.sin_port),
            )
        })
    } else {
        getsockopt(stream, sockopt::Ip6tOriginalDst).map(|sin6| {
            SocketAddr::new(
                IpAddr::V6(Ipv6Addr::from(sin6.sin6_addr.s6_addr)),
                u16::from_be(sin6.sin6_port),
            )
        })
    };
    Ok(got.unwrap_or(local))
}

async fn handle(stream: TcpStream, source: SocketAddr, port: u16, shared: &Arc<Shared>) {
    let cfg = shared.config();
    let Some(bound) = cfg.bound_listener(port).cloned() else {
        return;
    };
    let destination = if bound.use_original_dst {
        match original_dst(&stream) {
            Ok(d) => d,
            Err(_) => return,
        }
    } else {
        match stream.local_addr() {
            Ok(d) => d,
            Err(_) => return,
        }
    };
    // A connection straight to a capture port would come back here forever.
    if bound.use_original_dst && cfg.bound_listener(destination.port()).is_some() {
        shared.stats.inc(format_args!(
            "listener.{}.downstream_cx_loop",
            stat_name(&bound)
        ));
        return;
    }
    let listener = if bound.use_original_dst {
        cfg.listener_for(destination, bound.direction)
            .cloned()
            .unwrap_or(bound)
    } else {
        bound
    };
    let lname = stat_name(&listener);
    let _counted = shared
        .stats
        .downstream_connection(format_args!("listener.{lname}"));
    let mut facts = ConnectionFacts {
        destination: Some(destination),
        source: Some(source),
        ..Default::default()
    };
    if listener.needs_inspection(&facts) {
        match crate::inspect::inspect(&stream, listener.inspect_timeout, &mut facts).await {
            Ok(true) => {}
            Ok(false) if listener.continue_on_timeout => {
                shared
                    .stats
                    .inc(format_args!("listener.{lname}.listener_filter_timeout"));
            }
            Ok(false) | Err(_) => return,
        }
    }
    let Some(chain) = listener.select(&facts).cloned() else {
        shared
            .stats
            .inc(format_args!("listener.{lname}.no_filter_chain_match"));
        return;
    };
    let _ = stream.set_nodelay(true);
    let exchange = match &chain.filter {
        NetworkFilter::Tcp {
            metadata_exchange, ..
        } => metadata_exchange.as_deref(),
        NetworkFilter::Http(_) => None,
    };
    // Whether the client agreed in ALPN to Istio's TCP metadata exchange that the chain does.
    let mut exchanges = false;
    let (io, peer) = match &chain.tls {
        None => (Either::Left(stream), None),
        Some(tls) => {
            let Some(identity) = shared.pools.identity() else {
                return;
            };
            let server = match identity.server_config(&tls.alpn) {
                Ok(s) => s,
                Err(e) => {
                    tracing::warn!(error = %e, "server TLS config");
                    return;
                }
            };
            let accept = tokio_rustls::TlsAcceptor::from(server).accept(stream);
            let tls_stream = match tokio::time::timeout(HANDSHAKE_TIMEOUT, accept).await {
                Ok(Ok(s)) => s,
                Ok(Err(e)) => {
                    tracing::debug!(%source, error = %e, "TLS handshake failed");
                    shared
                        .stats
                        .inc(format_args!("listener.{lname}.ssl.connection_error"));
                    return;
                }
                Err(_) => return,
            };
            let peer = PeerCert::of(tls_stream.get_ref().1.peer_certificates());
            exchanges = exchange
                .is_some_and(|p| tls_stream.get_ref().1.alpn_protocol() == Some(p.as_bytes()));
            (
                Either::Right(tokio::io::BufWriter::with_capacity(
                    crate::upstream::TLS_WRITE_BUFFER,
                    tls_stream,
                )),
                peer,
            )
        }
    };
    let info = Arc::new(ConnInfo {
        listener,
        destination,
        source,
        peer,
        upstreams: Default::default(),
        xfcc: Default::default(),
    });
    if !chain.rbac.is_empty() {
        let principal = info.principal();
        let input = crate::config::rbac::Input {
            principal: principal.as_deref(),
            source,
            destination,
            server_name: facts.server_name.as_deref(),
            request: None,
            metadata: None,
        };
        if !crate::config::rbac::allowed(&chain.rbac, &input) {
            // A TCP denial closes the connection.
            shared
                .stats
                .inc(format_args!("listener.{lname}.rbac.denied"));
            tracing::debug!(%source, %destination, principal = ?principal, "connection denied by RBAC");
            return;
        }
        shared
            .stats
            .inc(format_args!("listener.{lname}.rbac.allowed"));
    }
    match &chain.filter {
        NetworkFilter::Tcp {
            cluster,
            stat_prefix,
            access_logs,
            hash_source_ip,
            idle_timeout,
            max_duration,
            stats,
            metadata_exchange: _,
        } => {
            let filter = crate::tcp::Filter {
                cluster: cluster.pick().0,
                stat_prefix,
                hash_source_ip: *hash_source_ip,
                idle_timeout: *idle_timeout,
                max_duration: *max_duration,
                logs: access_logs,
                stats: stats.as_ref(),
                exchanges,
            };
            crate::tcp::proxy(io, &filter, &info, shared).await;
        }
        NetworkFilter::Http(hcm) => {
            crate::http::serve(io, hcm.clone(), info, shared.clone()).await;
        }
    }
}

/// Envoy names listener stats by address: `0.0.0.0_15006`.
pub fn stat_name(l: &Listener) -> String {
    format!("{}_{}", l.address.ip(), l.address.port())
}
