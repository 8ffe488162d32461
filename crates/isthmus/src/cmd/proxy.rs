//! `isthmus proxy`: the sidecar (Envoy and pilot-agent in one), configured by the flags and
//! environment an injected `istio-proxy` container gets.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context as _, Result, bail};
use clap::Args;
use isthmus_config::istio::common::parse_go_duration;
use isthmus_proxy::agent::{Options, Ports};
use tracing_subscriber::layer::SubscriberExt as _;
use tracing_subscriber::util::SubscriberInitExt as _;
use tracing_subscriber::{EnvFilter, reload};

use crate::exit;

#[derive(Debug, Args)]
pub struct ProxyArgs {
    /// The control plane's xDS address: 15012 (TLS, with --root-cert) or 15010 (plaintext).
    /// PROXY_CONFIG's `discoveryAddress` wins when set.
    #[arg(long = "discovery-address", default_value = "127.0.0.1:15012")]
    discovery_address: String,
    /// The mesh roots (Istio mounts them at /var/run/secrets/istio/root-cert.pem).
    #[arg(long = "root-cert", env = "ISTHMUS_ROOT_CERT")]
    root_cert: Option<PathBuf>,
    /// The name the control plane's certificate must carry.
    #[arg(long = "discovery-san", default_value = "istiod.istio-system.svc")]
    discovery_san: String,
    /// The pod's token for the CA.
    #[arg(
        long = "token",
        env = "ISTHMUS_TOKEN_PATH",
        default_value = "/var/run/secrets/tokens/istio-token"
    )]
    token: PathBuf,
    #[arg(long = "pod-name", env = "POD_NAME")]
    pod_name: String,
    #[arg(
        long = "pod-namespace",
        env = "POD_NAMESPACE",
        default_value = "default"
    )]
    namespace: String,
    /// The pod's IPs (comma-separated, as INSTANCE_IP).
    #[arg(long = "instance-ip", env = "INSTANCE_IP", value_delimiter = ',')]
    ips: Vec<IpAddr>,
    #[arg(
        long = "service-account",
        env = "SERVICE_ACCOUNT",
        default_value = "default"
    )]
    service_account: String,
    #[arg(
        long = "cluster-id",
        env = "ISTIO_META_CLUSTER_ID",
        default_value = "Kubernetes"
    )]
    cluster_id: String,
    #[arg(
        long = "trust-domain",
        env = "TRUST_DOMAIN",
        default_value = "cluster.local"
    )]
    trust_domain: String,
    #[arg(long, default_value = "cluster.local")]
    domain: String,
    /// A pod label, `key=value` (repeatable); ISTIO_METAJSON_LABELS (a JSON object) adds more.
    #[arg(long = "label")]
    labels: Vec<String>,
    #[arg(long = "labels-json", env = "ISTIO_METAJSON_LABELS", hide = true)]
    labels_json: Option<String>,
    /// REDIRECT or TPROXY, as the capture rules were installed.
    #[arg(
        long = "interception-mode",
        env = "ISTIO_META_INTERCEPTION_MODE",
        default_value = "REDIRECT"
    )]
    interception_mode: String,
    /// Istio's ProxyConfig as JSON (`proxy.istio.io/config`): discoveryAddress,
    /// drainDuration, terminationDrainDuration.
    #[arg(long = "proxy-config", env = "PROXY_CONFIG")]
    proxy_config: Option<String>,
    /// The app's metrics to merge on 15020 (`prometheus.io/port` and `/path`).
    #[arg(long = "app-metrics-port")]
    app_metrics_port: Option<u16>,
    #[arg(long = "app-metrics-path", default_value = "/metrics")]
    app_metrics_path: String,
    /// Address the capture and telemetry ports bind to.
    #[arg(long, default_value = "0.0.0.0")]
    bind: IpAddr,
    /// Certificate lifetime asked of the CA.
    #[arg(long = "cert-ttl", env = "SECRET_TTL", default_value = "24h")]
    cert_ttl: String,
    /// Worker threads (Istio's ProxyConfig `concurrency`; 0: one per core). Default 1.
    #[arg(long)]
    concurrency: Option<usize>,
    /// Answer the pod's DNS on 127.0.0.1:15053 from the control plane's name table, as
    /// Istio's agent does with DNS capture (`--redirect-dns` sends the queries there).
    #[arg(long = "dns-capture", env = "ISTIO_META_DNS_CAPTURE")]
    dns_capture: bool,
    /// Where the nameservers for other names, and the search domains, are.
    #[arg(long = "resolv-conf", default_value = "/etc/resolv.conf")]
    resolv_conf: PathBuf,
}

pub fn run(a: ProxyArgs) -> Result<i32> {
    let (filter, initial) = match EnvFilter::try_from_default_env() {
        Ok(f) => {
            let given = std::env::var(EnvFilter::DEFAULT_ENV).unwrap_or_default();
            (f, given)
        }
        Err(_) => (EnvFilter::new("info"), "info".to_string()),
    };
    let (filter, handle) = reload::Layer::new(filter);
    tracing_subscriber::registry()
        .with(filter)
        .with(tracing_subscriber::fmt::layer().with_writer(std::io::stderr))
        .init();
    let set_level = isthmus_proxy::log_level::LogLevels::new(
        &initial,
        Box::new(move |directive: &str| {
            handle
                .reload(EnvFilter::new(directive))
                .map_err(|e| e.to_string())
        }),
    );

    let mut labels: BTreeMap<String, String> = BTreeMap::new();
    if let Some(j) = &a.labels_json {
        let parsed: BTreeMap<String, String> = serde_json::from_str(j)
            .context("ISTIO_METAJSON_LABELS is not a JSON object of strings")?;
        labels.extend(parsed);
    }
    for l in &a.labels {
        let Some((k, v)) = l.split_once('=') else {
            bail!("--label {l:?}: expected key=value");
        };
        labels.insert(k.to_string(), v.to_string());
    }
    let pc: serde_json::Value = match &a.proxy_config {
        Some(s) => serde_json::from_str(s).context("PROXY_CONFIG is not JSON")?,
        None => serde_json::Value::Null,
    };
    // Checked here, where its author reads the error, rather than by the control plane, which
    // would refuse the proxy's stream over it.
    let typed = if pc.is_null() {
        isthmus_config::mesh::ProxyConfig::default()
    } else {
        if !pc.is_object() {
            bail!("PROXY_CONFIG is not a JSON object");
        }
        serde_json::from_value::<isthmus_config::mesh::ProxyConfig>(pc.clone())
            .context("PROXY_CONFIG is not a valid ProxyConfig")?
    };
    let matcher = typed.proxy_stats_matcher.unwrap_or_default();
    let stats_inclusions = isthmus_proxy::envoy_stats::Inclusions::istio(
        &matcher.inclusion_prefixes,
        &matcher.inclusion_suffixes,
        &matcher.inclusion_regexps,
    )
    .context("PROXY_CONFIG")?;
    let duration = |key: &str, default: Duration| -> Result<Duration> {
        match pc.get(key).and_then(|v| v.as_str()) {
            Some(s) => parse_go_duration(s).map_err(|e| anyhow::anyhow!("PROXY_CONFIG {key}: {e}")),
            None => Ok(default),
        }
    };
    let drain_duration = duration(
        "terminationDrainDuration",
        duration("drainDuration", Duration::from_secs(5))?,
    )?;
    let discovery_address = pc
        .get("discoveryAddress")
        .and_then(|v| v.as_str())
        .map_or(a.discovery_address.clone(), str::to_string);
    let tproxy = match a.interception_mode.as_str() {
        "REDIRECT" => false,
        "TPROXY" => true,
        other => bail!("--interception-mode {other:?}: expected REDIRECT or TPROXY"),
    };
    let ports = Ports::default();
    let opts = Options {
        discovery_address,
        root_cert: a.root_cert,
        discovery_san: a.discovery_san,
        token_path: a.token,
        pod_name: a.pod_name,
        namespace: a.namespace,
        ips: a.ips,
        service_account: a.service_account,
        cluster_id: a.cluster_id,
        trust_domain: a.trust_domain,
        domain: a.domain,
        labels,
        tproxy,
        ports,
        bind: a.bind,
        drain_duration,
        cert_ttl: parse_go_duration(&a.cert_ttl).map_err(|e| anyhow::anyhow!("--cert-ttl: {e}"))?,
        app_metrics: a.app_metrics_port.map(|p| (p, a.app_metrics_path)),
        // Null or an object: anything else failed the check above.
        proxy_config: (!pc.is_null())
            .then(|| isthmus_xds::json::from_json(pc.clone()))
            .transpose()
            .context("PROXY_CONFIG cannot travel in the node metadata")?,
        stats_inclusions,
        dns_capture: a.dns_capture,
        resolv_conf: a.resolv_conf,
        metadata: std::env::vars()
            .filter_map(|(k, v)| Some((k.strip_prefix("ISTIO_META_")?.to_string(), v)))
            .collect(),
    };
    // Istio's ProxyConfig `concurrency`: worker threads (0: one per core). One by default: a
    // sidecar serves one pod, and a single thread spends no CPU on cross-thread wake-ups.
    let concurrency = match (
        a.concurrency,
        pc.get("concurrency").and_then(|v| v.as_u64()),
    ) {
        (Some(c), _) => c,
        (None, Some(c)) => usize::try_from(c).unwrap_or(1),
        (None, None) => 1,
    };
    let concurrency = if concurrency == 0 {
        std::thread::available_parallelism().map_or(1, |n| n.get())
    } else {
        concurrency
    };
    let runtime = if concurrency == 1 {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
    } else {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(concurrency)
            .enable_all()
            .build()
    }
    .context("starting the runtime")?;
    runtime.block_on(async move {
        let shutdown = async {
            let mut term =
                match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                    Ok(s) => s,
                    Err(_) => return std::future::pending().await,
                };
            tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
        };
        isthmus_proxy::agent::run(opts, Some(set_level), shutdown)
            .await
            .context("proxy")
    })?;
    Ok(exit::OK)
}
