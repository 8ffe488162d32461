//! The control plane at scale: 1,000 services × 10 endpoints (10 namespaces of 100), served by
//! a real `isthmus control-plane` process to 1,000 delta ADS clients held by this process, each
//! presenting itself as one pod of the mesh.
//!
//! Measured: the time until every client has ACKed a full configuration (clusters, every
//! endpoint assignment, listeners, routes); after one endpoint is added to one service, the time
//! until each client has ACKed the new assignment (p50/p99, from the file write, and from the
//! push: the control plane's own debounce and rebuild times, read from its `/metrics`, are
//! subtracted), the bytes sent for that change, and the control plane's RSS and CPU seconds.
//! Run with `cargo bench -p isthmus --bench controlplane` (`ISTHMUS_BENCH_CLIENTS` and
//! `ISTHMUS_BENCH_SERVICES` scale it down).

use std::collections::HashSet;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use envoy_types::pb::envoy::config::core::v3::Node;
use envoy_types::pb::envoy::config::listener::v3::Listener;
use envoy_types::pb::google::protobuf::{Struct, Value, value};
use hdrhistogram::Histogram;
use isthmus_xds::server::{CLUSTER, ENDPOINT, LISTENER, MAX_RESPONSE_BYTES, ROUTE};
use prost::Message;
use tokio::sync::mpsc;

#[path = "common/procfs.rs"]
mod procfs;

/// The clients' name sets, of the names' 64-bit hashes ([`key`]): the clients share two cores
/// with the control plane, and a thousand of them each hold thousands of names.
type Names = HashSet<u64, foldhash::fast::RandomState>;

fn key(name: &[u8]) -> u64 {
    use std::hash::BuildHasher;
    foldhash::quality::FixedState::with_seed(0).hash_one(name)
}

const BIN: &str = env!("CARGO_BIN_EXE_isthmus");
const NAMESPACES: usize = 10;
const ENDPOINTS: usize = 10;
const PORT: u16 = 8080;
/// Every wait of the benchmark is bounded by this.
const LIMIT: Duration = Duration::from_secs(180);
/// The service that gains an endpoint, and the name of its cluster.
const CHANGED_NS: &str = "ns-0";
const CHANGED_SVC: &str = "svc-0";

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(default)
}

fn main() {
    let services = env_usize("ISTHMUS_BENCH_SERVICES", 1000);
    let clients = env_usize("ISTHMUS_BENCH_CLIENTS", 1000);
    let per_ns = services.div_ceil(NAMESPACES);
    let dir = tempfile::tempdir().expect("tempdir");
    write_mesh(dir.path(), per_ns);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let cp = ControlPlane::start(dir.path());
    println!(
        "mesh: {} services × {ENDPOINTS} endpoints in {NAMESPACES} namespaces; {clients} delta ADS clients",
        per_ns * NAMESPACES
    );
    let started_cpu = cp.cpu_seconds();
    let clients_cpu = procfs::cpu_seconds("self");
    println!(
        "control plane started: RSS {:.1} MB",
        cp.rss_kb() as f64 / 1024.0
    );

    // Client k is a pod of service (k / NAMESPACES) in namespace k % NAMESPACES.
    let changed = format!("outbound|{PORT}||{CHANGED_SVC}.{CHANGED_NS}.svc.cluster.local");
    let report = Arc::new(Mutex::new(Report::default()));
    // Connected first (HTTP/2 up, no stream yet), then every client subscribes at once.
    let channels: Vec<tonic::transport::Channel> = rt.block_on(async {
        use futures::StreamExt;
        futures::stream::iter(0..clients)
            .map(|_| connect(cp.xds))
            .buffer_unordered(64)
            .collect()
            .await
    });
    let t0 = Instant::now();
    rt.block_on(async {
        for (k, channel) in channels.into_iter().enumerate() {
            let ns = k % NAMESPACES;
            let svc = (k / NAMESPACES) % per_ns;
            let pod = (k / (NAMESPACES * per_ns)) % ENDPOINTS;
            let node = node(ns, svc, pod);
            let report = report.clone();
            let changed = changed.clone();
            tokio::spawn(async move {
                if let Err(e) = client(channel, node, &changed, report.clone(), t0).await {
                    report.lock().unwrap().errors.push(e);
                }
            });
        }
    });
    let full = wait(&report, |r| r.full.len() >= clients);
    let full_cpu = cp.cpu_seconds() - started_cpu;
    let clients_cpu = procfs::cpu_seconds("self") - clients_cpu;
    let rss_full = cp.rss_kb();
    let mut full_hist = Histogram::<u64>::new(3).expect("histogram");
    for d in &report.lock().unwrap().full {
        full_hist.record(d.as_micros() as u64).expect("record");
    }
    println!(
        "full config to {clients} clients: all ACKed after {:.2} s (p50 {:.2} s, p99 {:.2} s); control plane CPU {:.2} s; RSS {:.1} MB",
        full.as_secs_f64(),
        full_hist.value_at_quantile(0.5) as f64 / 1e6,
        full_hist.value_at_quantile(0.99) as f64 / 1e6,
        full_cpu,
        rss_full as f64 / 1024.0
    );
    // The clients share the machine: what they used bounds how fast the push can be here.
    println!(
        "  the clients' own CPU for it (this process): {clients_cpu:.2} s, on {} cores",
        std::thread::available_parallelism().map_or(1, |n| n.get())
    );
    let (bytes_full, by_type) = {
        let r = report.lock().unwrap();
        (r.bytes, r.bytes_by_type.clone())
    };
    println!(
        "bytes sent for the full configuration: {:.1} MB in all, {:.0} KB per client ({})",
        bytes_full as f64 / 1e6,
        bytes_full as f64 / 1e3 / clients as f64,
        by_type
            .iter()
            .map(|(t, b)| format!("{t} {:.0} KB", *b as f64 / 1e3 / clients as f64))
            .collect::<Vec<_>>()
            .join(", ")
    );

    // One endpoint added to one service.
    std::thread::sleep(Duration::from_secs(2));
    let before = cp.metrics();
    let cpu_before = cp.cpu_seconds();
    {
        let mut r = report.lock().unwrap();
        r.bytes = 0;
        r.responses = 0;
        r.change_started = Some(Instant::now());
    }
    std::fs::write(
        dir.path().join(CHANGED_NS).join("extra.yaml"),
        pod_yaml(0, 0, ENDPOINTS),
    )
    .expect("write the new pod");
    wait(&report, |r| r.changed.len() >= clients);
    std::thread::sleep(Duration::from_millis(500));
    let after = cp.metrics();
    let change_cpu = cp.cpu_seconds() - cpu_before;
    let r = report.lock().unwrap();
    let mut hist = Histogram::<u64>::new(3).expect("histogram");
    for d in &r.changed {
        hist.record(d.as_micros() as u64).expect("record");
    }
    let debounce = metric_delta(&before, &after, "pilot_debounce_time_sum");
    let init = metric_delta(&before, &after, "pilot_pushcontext_init_seconds_sum");
    let ms = |us: u64| us as f64 / 1e3;
    println!(
        "one endpoint added: all {clients} clients ACKed; from the file write p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms",
        ms(hist.value_at_quantile(0.5)),
        ms(hist.value_at_quantile(0.99)),
        ms(hist.max())
    );
    let skip = (debounce + init) * 1e3;
    println!(
        "  of which debounce {:.1} ms and push context rebuild {:.1} ms; from the push: p50 {:.1} ms, p99 {:.1} ms",
        debounce * 1e3,
        init * 1e3,
        ms(hist.value_at_quantile(0.5)) - skip,
        ms(hist.value_at_quantile(0.99)) - skip
    );
    println!(
        "  bytes sent for the change: {} in {} responses ({:.0} per client); control plane CPU {:.2} s",
        r.bytes,
        r.responses,
        r.bytes as f64 / clients as f64,
        change_cpu
    );
    println!(
        "control plane RSS: {:.1} MB now, peak {:.1} MB",
        cp.rss_kb() as f64 / 1024.0,
        cp.hwm_kb() as f64 / 1024.0
    );
    if !r.errors.is_empty() {
        println!("client errors: {} (first: {})", r.errors.len(), r.errors[0]);
    }
}

#[derive(Default)]
struct Report {
    /// Per client: time from start until its full configuration was ACKed.
    full: Vec<Duration>,
    /// Per client: time from the change until the new assignment was ACKed.
    changed: Vec<Duration>,
    change_started: Option<Instant>,
    bytes: usize,
    bytes_by_type: std::collections::BTreeMap<String, usize>,
    responses: usize,
    errors: Vec<String>,
}

fn wait(report: &Mutex<Report>, done: impl Fn(&Report) -> bool) -> Duration {
    let start = Instant::now();
    loop {
        {
            let r = report.lock().unwrap();
            if done(&r) {
                return start.elapsed();
            }
            if start.elapsed() > LIMIT {
                let mut kinds: std::collections::BTreeMap<&str, usize> = Default::default();
                for e in &r.errors {
                    *kinds.entry(e.as_str()).or_default() += 1;
                }
                panic!(
                    "not done within {LIMIT:?}: {} full (last at {:?}), {} changed, errors {kinds:#?}",
                    r.full.len(),
                    r.full.iter().max(),
                    r.changed.len(),
                );
            }
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// A connection to the control plane, with the receive windows the proxy's agent uses.
async fn connect(addr: std::net::SocketAddr) -> tonic::transport::Channel {
    tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .expect("endpoint")
        .connect_timeout(Duration::from_secs(10))
        .initial_stream_window_size(isthmus_xds::server::CLIENT_WINDOW)
        .initial_connection_window_size(isthmus_xds::server::CLIENT_WINDOW)
        .max_frame_size(isthmus_xds::server::CLIENT_MAX_FRAME)
        .connect()
        .await
        .expect("connect to the control plane")
}

/// What a client sends: a `DeltaDiscoveryRequest` (same field numbers) whose names subscribed
/// are the bytes received, not copied into strings of their own.
#[derive(Clone, PartialEq, prost::Message)]
struct Request {
    #[prost(message, optional, tag = "1")]
    node: Option<Node>,
    #[prost(string, tag = "2")]
    type_url: String,
    #[prost(bytes = "bytes", repeated, tag = "3")]
    resource_names_subscribe: Vec<prost::bytes::Bytes>,
    #[prost(string, tag = "6")]
    response_nonce: String,
}

/// What a client reads of a `DeltaDiscoveryResponse` (same field numbers): the envelope, with
/// the resources left as the bytes received (no copy) — as an agent that hands them on to
/// Envoy. Of a resource, only its name is read ([`ResourceName`]); listeners are decoded fully,
/// for their route names ([`ResourceBody`]).
#[derive(Clone, PartialEq, prost::Message)]
struct Envelope {
    #[prost(bytes = "bytes", repeated, tag = "2")]
    resources: Vec<prost::bytes::Bytes>,
    #[prost(string, tag = "4")]
    type_url: String,
    #[prost(string, tag = "5")]
    nonce: String,
}

/// A `Resource`'s name (a protobuf `string`, read as the bytes received).
#[derive(Clone, PartialEq, prost::Message)]
struct ResourceName {
    #[prost(bytes = "bytes", tag = "3")]
    name: prost::bytes::Bytes,
}

/// A `Resource`'s body.
#[derive(Clone, PartialEq, prost::Message)]
struct ResourceBody {
    #[prost(message, optional, tag = "2")]
    resource: Option<EnvelopeAny>,
}

/// The names of `resources`.
fn names(resources: &[prost::bytes::Bytes]) -> Result<Vec<prost::bytes::Bytes>, String> {
    resources
        .iter()
        .map(|r| {
            ResourceName::decode(r.clone())
                .map(|n| n.name)
                .map_err(|e| e.to_string())
        })
        .collect()
}

#[derive(Clone, PartialEq, prost::Message)]
struct EnvelopeAny {
    #[prost(bytes = "bytes", tag = "2")]
    value: prost::bytes::Bytes,
}

/// One delta ADS client: wildcard clusters and listeners, then the endpoints and routes they
/// name; ACKs every response. Decodes the envelope only (and listeners, to follow them to
/// routes), as a proxy's agent would before handing bytes on.
async fn client(
    mut channel: tonic::transport::Channel,
    node: Node,
    changed: &str,
    report: Arc<Mutex<Report>>,
    t0: Instant,
) -> Result<(), String> {
    let (tx, rx) = mpsc::unbounded_channel();
    for type_url in [CLUSTER, LISTENER] {
        let _ = tx.send(Request {
            node: Some(node.clone()),
            type_url: type_url.into(),
            ..Default::default()
        });
    }
    let mut stream = isthmus_xds::wire::call::<_, Envelope, _>(
        &mut channel,
        isthmus_xds::server::DELTA_PATH,
        tokio_stream::wrappers::UnboundedReceiverStream::new(rx),
        MAX_RESPONSE_BYTES,
    )
    .await
    .map_err(|e| e.to_string())?;
    let mut eds_names = Names::default();
    let mut eds_have = Names::default();
    let mut routes_want = Names::default();
    let mut routes_have = Names::default();
    let mut clusters = false;
    let mut listeners = false;
    let mut full_done = false;
    while let Some((resp, size)) = stream.sized().await.map_err(|e| e.to_string())? {
        {
            let mut r = report.lock().unwrap();
            r.bytes += size;
            r.responses += 1;
            let short = resp.type_url.rsplit('.').next().unwrap_or_default();
            match r.bytes_by_type.get_mut(short) {
                Some(b) => *b += size,
                None => {
                    r.bytes_by_type.insert(short.to_string(), size);
                }
            }
        }
        let _ = tx.send(Request {
            type_url: resp.type_url.clone(),
            response_nonce: resp.nonce,
            ..Default::default()
        });
        match resp.type_url.as_str() {
            CLUSTER => {
                clusters = true;
                let want: Vec<_> = names(&resp.resources)?
                    .into_iter()
                    .filter(|n| n.starts_with(b"outbound|") && eds_names.insert(key(n)))
                    .collect();
                if !want.is_empty() {
                    let _ = tx.send(Request {
                        type_url: ENDPOINT.into(),
                        resource_names_subscribe: want,
                        ..Default::default()
                    });
                }
            }
            ENDPOINT => {
                let names = names(&resp.resources)?;
                if full_done && names.iter().any(|n| n == changed.as_bytes()) {
                    let mut r = report.lock().unwrap();
                    if let Some(s) = r.change_started {
                        let d = s.elapsed();
                        r.changed.push(d);
                    }
                }
                eds_have.extend(names.iter().map(|n| key(n)));
            }
            LISTENER => {
                listeners = true;
                let mut want = Vec::new();
                for r in &resp.resources {
                    let body = ResourceBody::decode(r.clone()).map_err(|e| e.to_string())?;
                    let Some(any) = &body.resource else { continue };
                    let l = Listener::decode(any.value.clone()).map_err(|e| e.to_string())?;
                    for name in isthmus_xds::client::route_names(&l) {
                        if routes_want.insert(key(name.as_bytes())) {
                            want.push(name.into());
                        }
                    }
                }
                if !want.is_empty() {
                    let _ = tx.send(Request {
                        type_url: ROUTE.into(),
                        resource_names_subscribe: want,
                        ..Default::default()
                    });
                }
            }
            ROUTE => routes_have.extend(names(&resp.resources)?.iter().map(|n| key(n))),
            _ => {}
        }
        if !full_done
            && listeners
            && clusters
            && eds_have.len() >= eds_names.len()
            && routes_have.len() >= routes_want.len()
        {
            full_done = true;
            report.lock().unwrap().full.push(t0.elapsed());
        }
    }
    Err("stream ended".into())
}

/// Istio's node id and metadata for pod `pod` of service `svc` in namespace `ns`.
fn node(ns: usize, svc: usize, pod: usize) -> Node {
    let s = |v: &str| Value {
        kind: Some(value::Kind::StringValue(v.into())),
    };
    let namespace = format!("ns-{ns}");
    let name = format!("svc-{svc}-{pod}");
    let labels = Struct {
        fields: [("app".to_string(), s(&format!("svc-{svc}")))]
            .into_iter()
            .collect(),
    };
    Node {
        id: format!(
            "sidecar~{}~{name}.{namespace}~{namespace}.svc.cluster.local",
            pod_ip(ns, svc, pod)
        ),
        metadata: Some(Struct {
            fields: [
                ("NAMESPACE".to_string(), s(&namespace)),
                ("INSTANCE_IPS".to_string(), s(&pod_ip(ns, svc, pod))),
                ("SERVICE_ACCOUNT".to_string(), s(&format!("svc-{svc}"))),
                (
                    "LABELS".to_string(),
                    Value {
                        kind: Some(value::Kind::StructValue(labels)),
                    },
                ),
            ]
            .into_iter()
            .collect(),
        }),
        ..Default::default()
    }
}

fn pod_ip(ns: usize, svc: usize, pod: usize) -> String {
    format!(
        "10.{}.{}.{}",
        10 + ns,
        svc % 250,
        (svc / 250) * 50 + pod + 1
    )
}

fn pod_yaml(ns: usize, svc: usize, pod: usize) -> String {
    format!(
        "apiVersion: v1\nkind: Pod\nmetadata: {{name: svc-{svc}-{pod}, namespace: ns-{ns}, labels: {{app: svc-{svc}, security.istio.io/tlsMode: istio}}}}\nspec: {{serviceAccountName: svc-{svc}, containers: [{{name: app, image: app}}, {{name: istio-proxy, image: proxyv2}}]}}\nstatus: {{podIP: {}}}\n",
        pod_ip(ns, svc, pod)
    )
}

/// One file per service (the Service and its pods), one directory per namespace, and a
/// mesh-wide STRICT PeerAuthentication.
fn write_mesh(dir: &Path, per_ns: usize) {
    std::fs::create_dir_all(dir.join("istio-system")).expect("mkdir");
    std::fs::write(
        dir.join("istio-system/peer-authentication.yaml"),
        "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {name: default, namespace: istio-system}\nspec: {mtls: {mode: STRICT}}\n",
    )
    .expect("write");
    for ns in 0..NAMESPACES {
        let d = dir.join(format!("ns-{ns}"));
        std::fs::create_dir_all(&d).expect("mkdir");
        for svc in 0..per_ns {
            let mut y = format!(
                "apiVersion: v1\nkind: Service\nmetadata: {{name: svc-{svc}, namespace: ns-{ns}}}\nspec: {{selector: {{app: svc-{svc}}}, ports: [{{name: http, port: {PORT}, targetPort: {PORT}}}]}}\n"
            );
            for pod in 0..ENDPOINTS {
                y.push_str("---\n");
                y.push_str(&pod_yaml(ns, svc, pod));
            }
            std::fs::write(d.join(format!("svc-{svc}.yaml")), y).expect("write");
        }
    }
}

struct ControlPlane {
    child: Child,
    xds: std::net::SocketAddr,
    http: std::net::SocketAddr,
}

impl ControlPlane {
    fn start(dir: &Path) -> ControlPlane {
        let xds = free_port();
        let http = free_port();
        let child = Command::new(BIN)
            .args(["control-plane", "--config-dir"])
            .arg(dir)
            .args([
                "--xds-addr",
                &xds.to_string(),
                "--http-addr",
                &http.to_string(),
            ])
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .spawn()
            .expect("start the control plane");
        let mut cp = ControlPlane { child, xds, http };
        let start = Instant::now();
        while http_get(cp.http, "/ready").is_none() {
            assert!(start.elapsed() < LIMIT, "control plane not ready");
            if let Ok(Some(status)) = cp.child.try_wait() {
                panic!("control plane exited: {status}");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        cp
    }

    fn rss_kb(&self) -> u64 {
        procfs::status_kb(self.child.id(), "VmRSS")
    }

    fn hwm_kb(&self) -> u64 {
        procfs::status_kb(self.child.id(), "VmHWM")
    }

    /// User + system CPU seconds of the control plane so far.
    fn cpu_seconds(&self) -> f64 {
        procfs::cpu_seconds(self.child.id())
    }

    fn metrics(&self) -> String {
        http_get(self.http, "/metrics").unwrap_or_default()
    }
}

impl Drop for ControlPlane {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn metric_delta(before: &str, after: &str, name: &str) -> f64 {
    let get = |text: &str| -> f64 {
        text.lines()
            .find(|l| l.starts_with(name) && l[name.len()..].starts_with(' '))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0.0)
    };
    get(after) - get(before)
}

fn free_port() -> std::net::SocketAddr {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    l.local_addr().expect("addr")
}

fn http_get(addr: std::net::SocketAddr, path: &str) -> Option<String> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(1)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: x\r\n\r\n").ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).ok()?;
    out.lines()
        .next()
        .is_some_and(|status| status.contains(" 200 "))
        .then(|| {
            out.split_once("\r\n\r\n")
                .map_or(String::new(), |(_, b)| b.to_string())
        })
}
