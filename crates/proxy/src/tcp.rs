//! `tcp_proxy`: one upstream connection per downstream connection, bytes copied both ways.

use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::sync::oneshot;

use crate::Shared;
use crate::access_log::{AccessLog, Entry};
use crate::config::istio_stats::StatsConfig;
use crate::idle::{Activity, Watched};
use crate::peer::Workload;
use crate::peer_exchange::{Exchange, Found};
use crate::serve::ConnInfo;
use crate::stats::{Dimensions, Reporter};

/// A filter chain's `tcp_proxy`, as the connection uses it.
pub struct Filter<'a> {
    pub cluster: &'a str,
    pub stat_prefix: &'a str,
    /// The client's IP is the consistent-hash key.
    pub hash_source_ip: bool,
    pub idle_timeout: Option<Duration>,
    /// Envoy's `max_downstream_connection_duration`: the connection is closed this long after
    /// it began (None: never).
    pub max_duration: Option<Duration>,
    pub logs: &'a [Arc<AccessLog>],
    pub stats: Option<&'a Arc<StatsConfig>>,
    /// The client agreed to Istio's TCP metadata exchange, which the chain does.
    pub exchanges: bool,
}

pub async fn proxy<S>(down: S, filter: &Filter<'_>, info: &Arc<ConnInfo>, shared: &Arc<Shared>)
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let cluster_name = filter.cluster;
    let start = (std::time::SystemTime::now(), std::time::Instant::now());
    let mut entry = Entry {
        start: Some(start.0),
        downstream_local: Some(info.destination),
        downstream_remote: Some(info.source),
        upstream_cluster: cluster_name.to_string(),
        ..Default::default()
    };
    let hash = filter
        .hash_source_ip
        .then(|| crate::config::cluster::hash_key(info.source.ip()));
    let (flags, received, sent) = relay(down, filter, hash, info, shared, &mut entry).await;
    if !filter.logs.is_empty() {
        entry.flags = flags.to_string();
        entry.bytes_received = received;
        entry.bytes_sent = sent;
        entry.duration_ms = u64::try_from(start.1.elapsed().as_millis()).unwrap_or(u64::MAX);
        for l in filter.logs {
            l.write(&entry);
        }
    }
}

/// Connects upstream and copies both ways: (response flags, bytes received, bytes sent).
async fn relay<S>(
    down: S,
    filter: &Filter<'_>,
    hash: Option<u64>,
    info: &Arc<ConnInfo>,
    shared: &Arc<Shared>,
    entry: &mut Entry,
) -> (&'static str, u64, u64)
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let cluster_name = filter.cluster;
    let cfg = shared.config();
    let stats = &shared.stats;
    let Some(cluster) = cfg.clusters.get(cluster_name) else {
        stats.inc(format_args!("tcp.{cluster_name}.downstream_cx_no_route"));
        return ("NC", 0, 0);
    };
    let reporter = if info.inbound() {
        Reporter::Destination
    } else {
        Reporter::Source
    };
    // The peer's workload (from the metadata exchange; outbound, else the endpoint's) and the
    // upstream connection's certificate complete the labels once they are known.
    let parties_with = |peer: Option<Arc<Workload>>, upstream| {
        let (source, destination) = if info.inbound() {
            (peer, None)
        } else {
            (None, peer)
        };
        shared.parties(info, Some(cluster), source, destination, upstream, None)
    };
    let parties = parties_with(None, None);
    let dims = filter.stats.map(|config| Dimensions {
        config: config.clone(),
        values: config.values(None, info.source, info.destination),
    });
    let pick = match cluster.pick(Some(info.destination), &[], hash) {
        Ok(p) => p,
        Err(_) => {
            stats.inc(format_args!(
                "cluster.{}.upstream_cx_none_healthy",
                cluster.name
            ));
            stats.tcp_opened(reporter, &parties, dims.as_ref());
            stats.tcp_closed(reporter, &parties, dims.as_ref(), "UH", 0, 0);
            return ("UH", 0, 0);
        }
    };
    entry.upstream_host = pick.address.to_string();
    // Circuit breaker: over the cluster's connection limit, the connection is refused (UO).
    let Some(_slot) = cluster.state.acquire(
        crate::upstream::Counter::Connections,
        cluster.max_connections,
    ) else {
        stats.inc(format_args!(
            "cluster.{}.upstream_cx_overflow",
            cluster.name
        ));
        stats.tcp_opened(reporter, &parties, dims.as_ref());
        stats.tcp_closed(reporter, &parties, dims.as_ref(), "UO", 0, 0);
        return ("UO", 0, 0);
    };
    stats.inc(format_args!("cluster.{}.upstream_cx_total", cluster.name));
    let attempt = pick.state.map(crate::upstream::EndpointState::attempt);
    let up = match info.transport(pick.transport).connect(&pick.address).await {
        Ok(c) => c,
        Err(e) => {
            if let Some(a) = attempt {
                a.failed();
            }
            tracing::debug!(source = %info.source, cluster = %cluster.name, address = %pick.address, error = %e, "upstream connect failed");
            stats.inc(format_args!(
                "cluster.{}.upstream_cx_connect_fail",
                cluster.name
            ));
            if let Some(s) = pick.state {
                cluster.record(s, None);
            }
            stats.tcp_opened(reporter, &parties, dims.as_ref());
            stats.tcp_closed(reporter, &parties, dims.as_ref(), "UF", 0, 0);
            return ("UF", 0, 0);
        }
    };
    let _open = attempt.map(|a| a.made());
    if let Some(s) = pick.state {
        s.active.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }
    let upstream_cert = up.peer();
    let exchange_up = cluster
        .tcp_metadata_exchange
        .as_deref()
        .is_some_and(|p| up.negotiated_alpn() == Some(p.as_bytes()));
    let (down, up, found) = match exchange(down, up, filter.exchanges, exchange_up, info, shared)
        .await
    {
        Ok(exchanged) => exchanged,
        Err(e) => {
            tracing::debug!(source = %info.source, cluster = %cluster.name, error = %e, "metadata exchange failed");
            if let Some(s) = pick.state {
                s.active.fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
            }
            stats.tcp_opened(reporter, &parties, dims.as_ref());
            stats.tcp_closed(reporter, &parties, dims.as_ref(), "UF", 0, 0);
            return ("UF", 0, 0);
        }
    };
    let mut parties = parties_with(pick.workload.cloned(), upstream_cert.as_deref());
    // With the exchange, the connection is reported open once the peer has said who it is
    // (or that it will not), as Istio reports it with the peer's labels; at the latest with
    // the first report of its bytes, or when it closes.
    let mut waiting = found;
    if waiting.is_none() {
        stats.tcp_opened(reporter, &parties, dims.as_ref());
    }
    // Every byte, either way, crosses the downstream side: watching it is enough.
    let activity = Activity::default();
    let mut down = Watched::new(down, activity.clone());
    let mut up = up;
    let copy = tokio::io::copy_bidirectional(&mut down, &mut up);
    tokio::pin!(copy);
    // Istio's metrics count a long connection's bytes as it goes, not only at its end.
    let period = dims.as_ref().map(|d| d.config.tcp_reporting);
    let mut reported = (0, 0);
    let limit = every(filter.max_duration);
    tokio::pin!(limit);
    loop {
        tokio::select! {
            _ = &mut copy => break,
            () = &mut limit => {
                stats.inc(format_args!("tcp.{}.max_downstream_connection_duration", filter.stat_prefix));
                tracing::debug!(source = %info.source, cluster = %cluster.name, "maximum duration");
                break;
            }
            found = told(&mut waiting), if waiting.is_some() => {
                waiting = None;
                if let Some(peer) = found {
                    parties = parties_with(Some(peer), upstream_cert.as_deref());
                }
                stats.tcp_opened(reporter, &parties, dims.as_ref());
            }
            () = activity.expired(filter.idle_timeout) => {
                stats.inc(format_args!("tcp.{}.idle_timeout", filter.stat_prefix));
                tracing::debug!(source = %info.source, cluster = %cluster.name, "idle timeout");
                break;
            }
            () = every(period) => {
                if waiting.take().is_some() {
                    stats.tcp_opened(reporter, &parties, dims.as_ref());
                }
                let (received, sent) = activity.bytes();
                stats.tcp_bytes(reporter, &parties, dims.as_ref(), sent - reported.1, received - reported.0);
                reported = (received, sent);
            }
        }
    }
    if waiting.is_some() {
        stats.tcp_opened(reporter, &parties, dims.as_ref());
    }
    // Counted on the way, so that a copy cut short (an error, the idle timeout) reports
    // what it moved.
    let (received, sent) = activity.bytes();
    if let Some(s) = pick.state {
        s.active.fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
    }
    stats.add(
        format_args!("cluster.{}.upstream_cx_tx_bytes_total", cluster.name),
        received,
    );
    stats.add(
        format_args!("cluster.{}.upstream_cx_rx_bytes_total", cluster.name),
        sent,
    );
    stats.tcp_closed(
        reporter,
        &parties,
        dims.as_ref(),
        "-",
        sent - reported.1,
        received - reported.0,
    );
    ("-", received, sent)
}

/// Istio's TCP metadata exchange on the sides that agreed to it: this workload's preamble is
/// sent first, and the peer's taken off what comes. Also where the peer that telemetry names
/// (the client inbound, the upstream outbound) will tell its workload, when it exchanges.
async fn exchange<S>(
    mut down: S,
    mut up: crate::upstream::Conn,
    with_client: bool,
    with_upstream: bool,
    info: &ConnInfo,
    shared: &Shared,
) -> std::io::Result<(
    Exchange<S>,
    Exchange<crate::upstream::Conn>,
    Option<oneshot::Receiver<Found>>,
)>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    if with_client {
        down.write_all(&shared.me.preamble).await?;
        down.flush().await?;
    }
    if with_upstream {
        up.write_all(&shared.me.preamble).await?;
        up.flush().await?;
    }
    let (down, from_client) = Exchange::new(down, with_client);
    let (up, from_upstream) = Exchange::new(up, with_upstream);
    let found = if info.inbound() {
        from_client
    } else {
        from_upstream
    };
    Ok((down, up, found))
}

/// What the peer's preamble said; never when nothing will be told.
async fn told(waiting: &mut Option<oneshot::Receiver<Found>>) -> Found {
    match waiting {
        Some(rx) => rx.await.ok().flatten(),
        None => std::future::pending().await,
    }
}

/// Ends after `period`; never without one.
async fn every(period: Option<Duration>) {
    match period {
        Some(p) => tokio::time::sleep(p).await,
        None => std::future::pending().await,
    }
}
