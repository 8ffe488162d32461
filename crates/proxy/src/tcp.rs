//! `tcp_proxy`: one upstream connection per downstream connection, bytes copied both ways.

use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite};

use crate::Shared;
use crate::access_log::{AccessLog, Entry};
use crate::config::istio_stats::StatsConfig;
use crate::idle::{Activity, Watched};
use crate::peer::Workload;
use crate::serve::ConnInfo;
use crate::stats::{Dimensions, Reporter};

/// A filter chain's `tcp_proxy`, as the connection uses it.
pub struct Filter<'a> {
    pub cluster: &'a str,
    pub stat_prefix: &'a str,
    /// The client's IP is the consistent-hash key.
    pub hash_source_ip: bool,
    pub idle_timeout: Option<Duration>,
    pub logs: &'a [Arc<AccessLog>],
    pub stats: Option<&'a Arc<StatsConfig>>,
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
    // Outbound, the endpoint's workload and the upstream connection's certificate complete
    // the labels once they are known.
    let parties_with = |workload: Option<&Arc<Workload>>, upstream| {
        shared.parties(info, Some(cluster), None, workload.cloned(), upstream, None)
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
    let mut up = match info.transport(pick.transport).connect(&pick.address).await {
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
    let parties = parties_with(pick.workload, up.peer().as_deref());
    stats.tcp_opened(reporter, &parties, dims.as_ref());
    let _open = attempt.map(|a| a.made());
    if let Some(s) = pick.state {
        s.active.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }
    // Every byte, either way, crosses the downstream side: watching it is enough.
    let activity = Activity::default();
    let mut down = Watched::new(down, activity.clone());
    let copy = tokio::io::copy_bidirectional(&mut down, &mut up);
    tokio::pin!(copy);
    // Istio's metrics count a long connection's bytes as it goes, not only at its end.
    let period = dims.as_ref().map(|d| d.config.tcp_reporting);
    let mut reported = (0, 0);
    loop {
        tokio::select! {
            _ = &mut copy => break,
            () = activity.expired(filter.idle_timeout) => {
                stats.inc(format_args!("tcp.{}.idle_timeout", filter.stat_prefix));
                tracing::debug!(source = %info.source, cluster = %cluster.name, "idle timeout");
                break;
            }
            () = every(period) => {
                let (received, sent) = activity.bytes();
                stats.tcp_bytes(reporter, &parties, dims.as_ref(), sent - reported.1, received - reported.0);
                reported = (received, sent);
            }
        }
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

/// Ends after `period`; never without one.
async fn every(period: Option<Duration>) {
    match period {
        Some(p) => tokio::time::sleep(p).await,
        None => std::future::pending().await,
    }
}
