//! Sends finished spans: batched as Envoy's tracers batch them, one report at a time, each
//! bounded in time, to the collector cluster of the configuration in force.

use std::sync::Arc;
use std::time::Duration;

use http::header::HeaderValue;
use tokio::sync::{mpsc, watch};

use super::encode;
use super::{Collector, Format, SpanData};
use crate::config::Config;
use crate::stats::Stats;

/// Envoy's defaults (`tracing.<tracer>.min_flush_spans` and `…flush_interval_ms`).
const MIN_FLUSH_SPANS: usize = 5;
const FLUSH_INTERVAL: Duration = Duration::from_secs(5);
/// Finished spans waiting for the reporter; beyond this they are dropped (and counted) rather
/// than held while a collector is slow.
const QUEUE: usize = 4096;
/// Spans in one report at most.
const MAX_BATCH: usize = 1000;
/// OTLP's export method.
const OTLP_EXPORT: &str = "/opentelemetry.proto.collector.trace.v1.TraceService/Export";

pub(super) struct Finished {
    pub collector: Arc<Collector>,
    pub span: SpanData,
}

/// Hands finished spans to the task that reports them.
#[derive(Clone)]
pub struct Reporter {
    tx: mpsc::Sender<Finished>,
    stats: Arc<Stats>,
}

impl std::fmt::Debug for Reporter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Reporter")
    }
}

impl Reporter {
    /// Starts the reporting task, which sends to clusters of the configuration in force.
    pub fn start(config: watch::Receiver<Arc<Config>>, stats: Arc<Stats>) -> Reporter {
        let (tx, rx) = mpsc::channel(QUEUE);
        tokio::spawn(run(rx, config, stats.clone()));
        Reporter { tx, stats }
    }

    #[cfg(test)]
    pub(super) fn for_test(tx: mpsc::Sender<Finished>) -> Reporter {
        Reporter {
            tx,
            stats: Arc::new(Stats::new()),
        }
    }

    pub(super) fn report(&self, f: Finished) {
        let tracer = f.collector.format.stat_prefix();
        if self.tx.try_send(f).is_err() {
            self.stats
                .inc(format_args!("tracing.{tracer}.spans_dropped"));
        }
    }
}

impl Format {
    /// The tracer's name in Envoy's stats (`tracing.zipkin.spans_sent`).
    fn stat_prefix(self) -> &'static str {
        match self {
            Format::ZipkinJson => "zipkin",
            Format::OtlpHttp | Format::OtlpGrpc => "opentelemetry",
        }
    }
}

/// Collects finished spans and sends them when enough wait or the flush interval has passed
/// since the first. Idle, it sleeps without a timer.
async fn run(
    mut rx: mpsc::Receiver<Finished>,
    config: watch::Receiver<Arc<Config>>,
    stats: Arc<Stats>,
) {
    let mut batch: Vec<Finished> = Vec::new();
    let mut deadline: Option<tokio::time::Instant> = None;
    loop {
        let next = match deadline {
            None => rx.recv().await,
            Some(d) => tokio::select! {
                got = rx.recv() => got,
                () = tokio::time::sleep_until(d) => {
                    if let Some(f) = batch.first() {
                        let tracer = f.collector.format.stat_prefix();
                        stats.inc(format_args!("tracing.{tracer}.timer_flushed"));
                    }
                    flush(&mut batch, &mut rx, &config, &stats).await;
                    deadline = None;
                    continue;
                }
            },
        };
        let Some(f) = next else {
            flush(&mut batch, &mut rx, &config, &stats).await;
            return;
        };
        batch.push(f);
        deadline.get_or_insert_with(|| tokio::time::Instant::now() + FLUSH_INTERVAL);
        if batch.len() >= MIN_FLUSH_SPANS {
            flush(&mut batch, &mut rx, &config, &stats).await;
            deadline = None;
        }
    }
}

/// Sends what waits (and what queued meanwhile, up to a batch), one report per collector.
async fn flush(
    batch: &mut Vec<Finished>,
    rx: &mut mpsc::Receiver<Finished>,
    config: &watch::Receiver<Arc<Config>>,
    stats: &Stats,
) {
    while batch.len() < MAX_BATCH {
        match rx.try_recv() {
            Ok(f) => batch.push(f),
            Err(_) => break,
        }
    }
    while !batch.is_empty() {
        let collector = batch[0].collector.clone();
        let (mine, rest): (Vec<_>, Vec<_>) =
            batch.drain(..).partition(|f| f.collector == collector);
        *batch = rest;
        let spans: Vec<SpanData> = mine.into_iter().map(|f| f.span).collect();
        send(&collector, &spans, config, stats).await;
    }
}

/// One report: encoded in the collector's format, sent, counted as Envoy counts it.
async fn send(
    collector: &Collector,
    spans: &[SpanData],
    config: &watch::Receiver<Arc<Config>>,
    stats: &Stats,
) {
    let tracer = collector.format.stat_prefix();
    let cluster = config.borrow().clusters.get(&collector.cluster).cloned();
    let Some(cluster) = cluster else {
        stats.inc(format_args!("tracing.{tracer}.reports_skipped_no_cluster"));
        return;
    };
    let (path, content_type, body, version) = match collector.format {
        Format::ZipkinJson => (
            collector.path.as_str(),
            "application/json",
            encode::zipkin_json(spans),
            http::Version::HTTP_11,
        ),
        Format::OtlpHttp => (
            collector.path.as_str(),
            "application/x-protobuf",
            encode::otlp(spans, &collector.service_name).into(),
            http::Version::HTTP_11,
        ),
        Format::OtlpGrpc => (
            OTLP_EXPORT,
            "application/grpc",
            encode::grpc_frame(&encode::otlp(spans, &collector.service_name)),
            http::Version::HTTP_2,
        ),
    };
    let mut req = http::Request::post(path)
        .version(version)
        .header(http::header::CONTENT_TYPE, content_type)
        .header(http::header::HOST, collector.host.as_str());
    if collector.format == Format::OtlpGrpc {
        req = req.header(http::header::TE, "trailers");
    }
    for (k, v) in &collector.headers {
        req = req.header(k, v);
    }
    let Ok(req) = req.body(body) else {
        stats.inc(format_args!("tracing.{tracer}.reports_failed"));
        return;
    };
    let answer = crate::http::send_to_cluster(&cluster, req, collector.timeout, stats).await;
    let accepted = match &answer {
        // gRPC says in its status, in the trailers or (trailers-only) the headers.
        Some((200, h)) if collector.format == Format::OtlpGrpc => {
            h.get("grpc-status").map(HeaderValue::as_bytes) == Some(b"0")
        }
        Some((status, _)) => (200..300).contains(status),
        None => false,
    };
    let kind = match collector.format {
        Format::ZipkinJson => "",
        Format::OtlpHttp => "http_",
        Format::OtlpGrpc => "grpc_",
    };
    match (answer, accepted) {
        (Some(_), true) => {
            stats.inc(format_args!("tracing.{tracer}.{kind}reports_sent"));
            stats.add(
                format_args!("tracing.{tracer}.spans_sent"),
                spans.len() as u64,
            );
        }
        (Some((status, _)), false) => {
            tracing::debug!(status, cluster = %collector.cluster, "span report refused");
            stats.inc(format_args!("tracing.{tracer}.{kind}reports_dropped"));
        }
        (None, _) => stats.inc(format_args!("tracing.{tracer}.{kind}reports_failed")),
    }
}
