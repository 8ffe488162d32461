//! The sidecar's cost, Istio's way (HTTP/1.1, 1 KB request and response bodies, 1,000
//! requests/s over 4 connections, mTLS between the two proxies), as ratios against baselines
//! measured in the same run on the same machine:
//!
//! - direct: client → server, no proxy;
//! - isthmus: client → client sidecar → (mTLS) → server sidecar → server, pods of `isthmus up`
//!   with real iptables capture and a 100-service mesh configuration;
//! - HAProxy (Debian's package, installed if missing): client → HAProxy → (mTLS) → HAProxy →
//!   server, in the same pods.
//! - isthmus-policy: the isthmus path again, to a service with a VirtualService of 10 routes
//!   (with retries) and an AuthorizationPolicy of 20 rules in force.
//!
//! `ISTHMUS_BENCH_PAYLOAD=N` sets the body size (1,024 bytes by default).
//! `ISTHMUS_BENCH_H2UPGRADE=1` runs the mesh with `h2UpgradePolicy: UPGRADE`, so that the
//! sidecars speak HTTP/2 between them instead of Istio's default HTTP/1.1.
//!
//! Reported: latency added over direct (p50/p90/p99, open-loop load that records each
//! request's intended send time, so stalls are not hidden), CPU seconds per 1,000 requests and
//! RSS of each proxy, the maximum request rate (closed loop), and single-connection bulk
//! throughput. Needs root. Run with `cargo bench --profile production -p isthmus --bench proxy`
//! to measure the binaries as they ship (fat LTO), or without `--profile` for a quicker build.

use std::convert::Infallible;
use std::net::{IpAddr, SocketAddr};
use std::os::fd::{AsFd, AsRawFd, RawFd};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use hdrhistogram::Histogram;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper_util::rt::TokioIo;

#[path = "common/procfs.rs"]
mod procfs;

const BIN: &str = env!("CARGO_BIN_EXE_isthmus");
const RATE: u64 = 1_000;
const CONNECTIONS: usize = 4;
const WARMUP: Duration = Duration::from_secs(2);

/// `ISTHMUS_BENCH_PAYLOAD` sets the request and response body size in bytes (Istio's 1 KB
/// by default).
fn payload() -> usize {
    std::env::var("ISTHMUS_BENCH_PAYLOAD")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1024)
}
/// `ISTHMUS_BENCH_SECONDS` lengthens the measured phase (to profile a proxy under load).
fn measure() -> Duration {
    Duration::from_secs(
        std::env::var("ISTHMUS_BENCH_SECONDS")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(10),
    )
}
/// `ISTHMUS_BENCH_ROUNDS` repeats the open-loop measurement of every path, interleaved.
fn rounds() -> usize {
    std::env::var("ISTHMUS_BENCH_ROUNDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1)
        .max(1)
}
/// `ISTHMUS_BENCH_H2UPGRADE` has the sidecars speak HTTP/2 between them.
fn h2_upgrade() -> bool {
    std::env::var_os("ISTHMUS_BENCH_H2UPGRADE").is_some()
}
/// `ISTHMUS_BENCH_OPEN_LOOP_ONLY` skips the maximum rate and bulk throughput (for proxies run
/// under a profiler, which would not keep up with them).
fn open_loop_only() -> bool {
    std::env::var_os("ISTHMUS_BENCH_OPEN_LOOP_ONLY").is_some()
}
const MAX_RATE_FOR: Duration = Duration::from_secs(5);
const BULK_BYTES: u64 = 256 << 20;
const SERVICES: usize = 100;

fn main() {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("the proxy benchmark creates network namespaces: run it as root");
        std::process::exit(1);
    }
    ensure_haproxy();
    let dir = tempfile::tempdir().expect("tempdir");
    let mesh = Mesh::up(dir.path());
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let status = mesh.status();
    let pod = |name: &str| -> &serde_json::Value {
        status["pods"]
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["name"] == name)
            .unwrap_or_else(|| panic!("pod {name}"))
    };
    let netns = |name: &str| pod(name)["netns"].as_str().unwrap().to_string();
    let ip = |name: &str| -> IpAddr { pod(name)["ip"].as_str().unwrap().parse().unwrap() };
    let proxy_pid = |name: &str| -> u32 {
        pod(name)["containers"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["name"] == "istio-proxy")
            .and_then(|c| c["pid"].as_u64())
            .expect("proxy pid") as u32
    };

    // The servers: one per server pod, in that pod's namespace, on 8080.
    for p in ["server", "pserver", "qserver"] {
        let l = listen_in(&netns(p), "0.0.0.0:8080".parse().unwrap());
        rt.spawn(serve(l));
    }
    // HAProxy pairs: client side on 127.0.0.1:9000 in pclient, server side :9443 in pserver,
    // with mutual TLS between them; and the TCP relay below.
    let tls = TlsFiles::new(dir.path());
    let haproxy = [
        haproxy_in(
            &netns("pclient"),
            &dir.path().join("ha-client.cfg"),
            &format!(
                "frontend f\n  bind 127.0.0.1:9000\n  default_backend b\nbackend b\n  http-reuse always\n  server s {}:9443 ssl crt {} ca-file {} verify required sni str(server)\n",
                ip("pserver"),
                tls.client.display(),
                tls.ca.display()
            ),
        ),
        haproxy_in(
            &netns("pserver"),
            &dir.path().join("ha-server.cfg"),
            &format!(
                "frontend f\n  bind 0.0.0.0:9443 ssl crt {} ca-file {} verify required alpn http/1.1\n  default_backend b\nbackend b\n  http-reuse always\n  server s 127.0.0.1:8080\n",
                tls.server.display(),
                tls.ca.display()
            ),
        ),
        // The floor: HAProxy relaying bytes in TCP mode, no TLS and no HTTP, through the same
        // pods (client side 127.0.0.1:9100, server side :9101). What it costs is what moving a
        // request through two hops costs in this kernel, before any proxy does its own work.
        haproxy_in(
            &netns("pclient"),
            &dir.path().join("relay-client.cfg"),
            &format!(
                "frontend f\n  mode tcp\n  bind 127.0.0.1:9100\n  default_backend b\nbackend b\n  mode tcp\n  server s {}:9101\n",
                ip("pserver"),
            ),
        ),
        haproxy_in(
            &netns("pserver"),
            &dir.path().join("relay-server.cfg"),
            "frontend f\n  mode tcp\n  bind 0.0.0.0:9101\n  default_backend b\nbackend b\n  mode tcp\n  server s 127.0.0.1:8080\n",
        ),
    ];
    std::thread::sleep(Duration::from_millis(500));

    let targets = [
        Target {
            name: "direct",
            netns: netns("pclient"),
            addr: SocketAddr::new(ip("pserver"), 8080),
            host: "pserver".into(),
            proxies: vec![],
        },
        Target {
            name: "isthmus",
            netns: netns("client"),
            addr: SocketAddr::new(mesh.service_ip("server"), 8080),
            host: "server.bench.svc.cluster.local:8080".into(),
            proxies: vec![
                ("client sidecar", proxy_pid("client")),
                ("server sidecar", proxy_pid("server")),
            ],
        },
        // The same pair with policy in force: a VirtualService of 10 routes (the request
        // matches the last, which retries) and an AuthorizationPolicy of 20 rules (the
        // request is allowed by the last).
        Target {
            name: "isthmus-policy",
            netns: netns("qclient"),
            addr: SocketAddr::new(mesh.service_ip("qserver"), 8080),
            host: "qserver.policy.svc.cluster.local:8080".into(),
            proxies: vec![
                ("client sidecar", proxy_pid("qclient")),
                ("server sidecar", proxy_pid("qserver")),
            ],
        },
        Target {
            name: "haproxy",
            netns: netns("pclient"),
            addr: "127.0.0.1:9000".parse().unwrap(),
            host: "pserver".into(),
            proxies: vec![
                ("client haproxy", haproxy[0].id()),
                ("server haproxy", haproxy[1].id()),
            ],
        },
        Target {
            name: "tcp-relay",
            netns: netns("pclient"),
            addr: "127.0.0.1:9100".parse().unwrap(),
            host: "pserver".into(),
            proxies: vec![
                ("client relay", haproxy[2].id()),
                ("server relay", haproxy[3].id()),
            ],
        },
    ];

    let mut report = String::new();
    let machine = machine();
    report.push_str(&format!(
        "{machine}\nload: HTTP/1.1 POST, {} B request and response bodies, {RATE} requests/s over {CONNECTIONS} connections, open loop, {} s after {} s warm-up; mesh config: {SERVICES} services; between the sidecars: {}\n\n",
        payload(),
        measure().as_secs(),
        WARMUP.as_secs(),
        if h2_upgrade() {
            "HTTP/2 (h2UpgradePolicy UPGRADE)"
        } else {
            "HTTP/1.1 (Istio's default)"
        }
    ));
    report.push_str("| path | p50 ms | p90 ms | p99 ms | added p50 | added p90 | added p99 | errors |\n|---|---|---|---|---|---|---|---|\n");
    let mut usage = Vec::new();
    // `ISTHMUS_BENCH_ONLY=isthmus,isthmus-policy` runs those paths (the direct baseline
    // always runs first).
    let only = std::env::var("ISTHMUS_BENCH_ONLY").ok();
    let targets: Vec<&Target> = targets
        .iter()
        .filter(|t| {
            t.name == "direct"
                || only
                    .as_deref()
                    .is_none_or(|o| o.split(',').any(|n| n == t.name))
        })
        .collect();
    // Per round, each path's added p99 against that round's own direct baseline: on a shared
    // machine the baseline drifts between minutes, so paths are compared round by round.
    let mut added_p99: Vec<Vec<(&str, f64)>> = Vec::new();
    for round in 1..=rounds() {
        let mut direct: Option<Histogram<u64>> = None;
        let mut this_round = Vec::new();
        // The baseline first; the others take turns going first, so that none always runs
        // after the same one.
        let mut order = targets.clone();
        order[1..].rotate_left((round - 1) % (targets.len() - 1).max(1));
        for t in &order {
            eprintln!(
                "round {round}: {}: {RATE} requests/s for {} s",
                t.name,
                (WARMUP + measure()).as_secs()
            );
            let before: Vec<f64> = t
                .proxies
                .iter()
                .map(|(_, pid)| procfs::cpu_seconds(pid))
                .collect();
            let (hist, errors, sent) = rt.block_on(open_loop(t));
            for ((label, pid), b) in t.proxies.iter().zip(&before) {
                let cpu = procfs::cpu_seconds(pid) - b;
                let per_1000 = cpu / (sent as f64 / 1000.0);
                usage.push((
                    t.name,
                    *label,
                    per_1000,
                    procfs::status_kb(pid, "VmRSS"),
                    procfs::private_kb(pid),
                ));
            }
            let q = |h: &Histogram<u64>, p: f64| h.value_at_quantile(p) as f64 / 1000.0;
            let added = |p: f64| {
                direct.as_ref().map_or("—".to_string(), |d| {
                    format!("{:.3}", q(&hist, p) - q(d, p))
                })
            };
            let name = if rounds() > 1 {
                format!("{} (round {round})", t.name)
            } else {
                t.name.to_string()
            };
            report.push_str(&format!(
                "| {name} | {:.3} | {:.3} | {:.3} | {} | {} | {} | {errors} |\n",
                q(&hist, 0.5),
                q(&hist, 0.9),
                q(&hist, 0.99),
                added(0.5),
                added(0.9),
                added(0.99),
            ));
            if let Some(d) = &direct {
                this_round.push((t.name, q(&hist, 0.99) - q(d, 0.99)));
            }
            if t.name == "direct" {
                direct = Some(hist);
            }
        }
        added_p99.push(this_round);
    }
    let added =
        |round: &[(&str, f64)], name: &str| round.iter().find(|(n, _)| *n == name).map(|(_, v)| *v);
    let pairs: Vec<(f64, f64)> = added_p99
        .iter()
        .filter_map(|r| Some((added(r, "isthmus")?, added(r, "isthmus-policy")?)))
        .collect();
    if !pairs.is_empty() {
        let median = |mut v: Vec<f64>| {
            v.sort_by(f64::total_cmp);
            v[v.len() / 2]
        };
        let rows: Vec<String> = pairs
            .iter()
            .map(|(plain, policy)| {
                format!(
                    "{policy:.3} vs {plain:.3} ms ({:+.1} %)",
                    (policy / plain - 1.0) * 100.0
                )
            })
            .collect();
        let plain = median(pairs.iter().map(|p| p.0).collect());
        let policy = median(pairs.iter().map(|p| p.1).collect());
        report.push_str(&format!(
            "\npolicy in force (10 routes, retries, 20-rule AuthorizationPolicy), added p99 with vs without, per round: {}; medians {policy:.3} vs {plain:.3} ms ({:+.1} %)\n",
            rows.join("; "),
            (policy / plain - 1.0) * 100.0
        ));
    }
    report.push_str("\n| proxy | CPU s per 1,000 requests | vCPU at 1,000 requests/s | RSS MB | of it private MB |\n|---|---|---|---|---|\n");
    for (path, label, per_1000, rss, private) in &usage {
        report.push_str(&format!(
            "| {path}: {label} | {per_1000:.4} | {per_1000:.3} | {:.1} | {:.1} |\n",
            *rss as f64 / 1024.0,
            *private as f64 / 1024.0
        ));
    }
    if !open_loop_only() {
        report.push_str("\n| path | max requests/s (closed loop, 4 connections) | bulk MB/s (1 connection) |\n|---|---|---|\n");
        for t in &targets {
            eprintln!("{}: maximum rate and bulk throughput", t.name);
            let rps = rt.block_on(closed_loop(t));
            let mbps = rt.block_on(bulk(t));
            report.push_str(&format!("| {} | {rps:.0} | {mbps:.0} |\n", t.name));
        }
    }
    println!("{report}");
    drop(haproxy);
}

struct Target {
    name: &'static str,
    netns: String,
    addr: SocketAddr,
    host: String,
    proxies: Vec<(&'static str, u32)>,
}

/// The bench mesh: `bench` (injected) with client, server and 99 more services; `plain`
/// (no sidecars) with the baselines' client and server.
struct Mesh {
    /// Unique per run, so that runs side by side do not share namespaces.
    name: String,
    state: PathBuf,
}

impl Mesh {
    fn up(dir: &Path) -> Mesh {
        let mut yaml = String::from(
            "apiVersion: v1\nkind: Namespace\nmetadata: {name: bench, labels: {istio-injection: enabled}}\n---\napiVersion: v1\nkind: Namespace\nmetadata: {name: plain}\n",
        );
        for (ns, client, server) in [
            ("bench", "client", "server"),
            ("plain", "pclient", "pserver"),
        ] {
            for pod in [client, server] {
                yaml.push_str(&format!(
                    "---\napiVersion: v1\nkind: Pod\nmetadata: {{name: {pod}, namespace: {ns}, labels: {{app: {pod}}}}}\nspec: {{containers: [{{name: app, command: [sleep, infinity]}}]}}\n"
                ));
            }
            yaml.push_str(&format!(
                "---\napiVersion: v1\nkind: Service\nmetadata: {{name: {server}, namespace: {ns}}}\nspec: {{selector: {{app: {server}}}, ports: [{{name: http, port: 8080}}]}}\n"
            ));
        }
        // The policy pair: its own namespace, routes and authorization.
        yaml.push_str(
            "---\napiVersion: v1\nkind: Namespace\nmetadata: {name: policy, labels: {istio-injection: enabled}}\n",
        );
        for pod in ["qclient", "qserver"] {
            yaml.push_str(&format!(
                "---\napiVersion: v1\nkind: Pod\nmetadata: {{name: {pod}, namespace: policy, labels: {{app: {pod}}}}}\nspec: {{containers: [{{name: app, command: [sleep, infinity]}}]}}\n"
            ));
        }
        yaml.push_str(
            "---\napiVersion: v1\nkind: Service\nmetadata: {name: qserver, namespace: policy}\nspec: {selector: {app: qserver}, ports: [{name: http, port: 8080}]}\n",
        );
        yaml.push_str(&policy_yaml());
        for i in 1..SERVICES {
            yaml.push_str(&format!(
                "---\napiVersion: v1\nkind: Service\nmetadata: {{name: svc-{i}, namespace: bench}}\nspec: {{selector: {{app: svc-{i}}}, ports: [{{name: http, port: 8080}}]}}\n"
            ));
        }
        std::fs::write(dir.join("bench.yaml"), yaml).expect("write");
        let mesh_config = dir.join("mesh-config.yaml");
        let upgrade = std::env::var_os("ISTHMUS_BENCH_H2UPGRADE").is_some();
        std::fs::write(
            &mesh_config,
            if upgrade {
                "h2UpgradePolicy: UPGRADE\n"
            } else {
                "{}\n"
            },
        )
        .expect("write");
        let state = dir.join("state");
        // The guard first: a mesh that does not come up (`up` leaves it running for a look)
        // is torn down as well.
        let mesh = Mesh {
            name: format!("bench{}", std::process::id()),
            state,
        };
        let out = Command::new(BIN)
            .arg("up")
            .arg(dir.join("bench.yaml"))
            .args(["--name", &mesh.name, "--state-dir"])
            .arg(&mesh.state)
            .arg("--meshConfig")
            .arg(&mesh_config)
            .output()
            .expect("isthmus up");
        assert!(
            out.status.success(),
            "isthmus up:\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        mesh
    }

    fn status(&self) -> serde_json::Value {
        serde_json::from_slice(&std::fs::read(self.state.join("status.json")).expect("status"))
            .expect("status json")
    }

    /// The ClusterIP of service `name`, from what the control plane was given.
    fn service_ip(&self, name: &str) -> IpAddr {
        let text = std::fs::read_to_string(self.state.join("config/mesh.yaml")).expect("config");
        text.split("\n---\n")
            .filter_map(|d| serde_json::from_str::<serde_json::Value>(d).ok())
            .find(|v| v["kind"] == "Service" && v["metadata"]["name"] == name)
            .and_then(|v| v["spec"]["clusterIP"].as_str()?.parse().ok())
            .unwrap_or_else(|| panic!("{name} ClusterIP"))
    }
}

/// Policy for the `policy` pair: a VirtualService whose first 9 routes match a header the
/// load does not send and whose 10th retries on 5xx; an AuthorizationPolicy of 20 ALLOW
/// rules, of which only the last (the client's identity) admits the load.
fn policy_yaml() -> String {
    let mut vs = String::from(
        "---\napiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: qserver, namespace: policy}\nspec:\n  hosts: [qserver]\n  http:\n",
    );
    for i in 0..9 {
        vs.push_str(&format!(
            "  - match: [{{headers: {{x-route: {{exact: r{i}}}}}, uri: {{prefix: /r{i}}}}}]\n    route: [{{destination: {{host: qserver}}}}]\n"
        ));
    }
    vs.push_str("  - route: [{destination: {host: qserver}}]\n    timeout: 5s\n    retries: {attempts: 2, retryOn: 5xx}\n");
    let mut ap = String::from(
        "---\napiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: qserver, namespace: policy}\nspec:\n  selector: {matchLabels: {app: qserver}}\n  action: ALLOW\n  rules:\n",
    );
    for i in 0..19 {
        ap.push_str(&format!(
            "  - from: [{{source: {{principals: [cluster.local/ns/other/sa/caller-{i}]}}}}]\n    to: [{{operation: {{methods: [GET], paths: [/api/v{i}/*]}}}}]\n"
        ));
    }
    ap.push_str("  - from: [{source: {principals: [cluster.local/ns/policy/sa/default]}}]\n");
    vs + &ap
}

impl Drop for Mesh {
    fn drop(&mut self) {
        let _ = Command::new(BIN)
            .args(["down", "--name", &self.name, "--state-dir"])
            .arg(&self.state)
            .output();
    }
}

/// Runs `f` on a thread inside `netns`; sockets it creates stay in that namespace.
fn in_netns<T: Send + 'static>(netns: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    let path = format!("/run/netns/{netns}");
    std::thread::spawn(move || {
        let file = std::fs::File::open(&path).expect("netns");
        nix::sched::setns(file.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET).expect("setns");
        f()
    })
    .join()
    .expect("netns thread")
}

fn listen_in(netns: &str, addr: SocketAddr) -> std::net::TcpListener {
    in_netns(netns, move || {
        let l = std::net::TcpListener::bind(addr).expect("bind");
        l.set_nonblocking(true).expect("nonblocking");
        l
    })
}

async fn connect_in(netns: &str, addr: SocketAddr) -> tokio::net::TcpStream {
    let s = in_netns(netns, move || {
        let s = std::net::TcpStream::connect(addr).expect("connect");
        s.set_nonblocking(true).expect("nonblocking");
        s.set_nodelay(true).expect("nodelay");
        s
    });
    tokio::net::TcpStream::from_std(s).expect("tokio stream")
}

/// Answers of the payload size; `/bulk` counts what it was sent.
async fn serve(l: std::net::TcpListener) {
    let l = tokio::net::TcpListener::from_std(l).expect("listener");
    let answer = Bytes::from(vec![b'x'; payload()]);
    loop {
        let Ok((s, _)) = l.accept().await else {
            continue;
        };
        let _ = s.set_nodelay(true);
        let answer = answer.clone();
        tokio::spawn(async move {
            let svc =
                hyper::service::service_fn(move |req: http::Request<hyper::body::Incoming>| {
                    let answer = answer.clone();
                    async move {
                        let bulk = req.uri().path() == "/bulk";
                        let mut body = req.into_body();
                        let mut n = 0u64;
                        while let Some(f) = body.frame().await {
                            if let Ok(d) = f.map(|f| f.into_data()) {
                                n += d.map_or(0, |d| d.len() as u64);
                            }
                        }
                        let out = if bulk {
                            Bytes::from(n.to_string())
                        } else {
                            answer
                        };
                        Ok::<_, Infallible>(http::Response::new(Full::new(out)))
                    }
                });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(s), svc)
                .await;
        });
    }
}

type Sender = hyper::client::conn::http1::SendRequest<Full<Bytes>>;

async fn client(t: &Target) -> Sender {
    let s = connect_in(&t.netns, t.addr).await;
    let (send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(s))
        .await
        .expect("handshake");
    tokio::spawn(conn);
    send
}

/// One request, bounded by a timeout (a lost request counts as an error, not a hang).
async fn request(send: &mut Sender, host: &str, body: &Bytes) -> bool {
    let work = async {
        if send.ready().await.is_err() {
            return false;
        }
        let req = http::Request::post("/")
            .header("host", host)
            .body(Full::new(body.clone()))
            .expect("request");
        match send.send_request(req).await {
            Ok(r) => r.status() == 200 && r.into_body().collect().await.is_ok(),
            Err(_) => false,
        }
    };
    tokio::time::timeout(Duration::from_secs(5), work)
        .await
        .unwrap_or(false)
}

/// Open loop: each connection has a schedule of intended send times; latency counts from the
/// intended time, so a stall delays (and charges) every request behind it.
async fn open_loop(t: &Target) -> (Histogram<u64>, u64, u64) {
    let per_conn = Duration::from_nanos(1_000_000_000 * CONNECTIONS as u64 / RATE);
    let body = Bytes::from(vec![b'y'; payload()]);
    let mut tasks = Vec::new();
    for c in 0..CONNECTIONS {
        let mut send = client(t).await;
        let host = t.host.clone();
        let body = body.clone();
        tasks.push(tokio::spawn(async move {
            let pacer = Pacer::new();
            let mut hist = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).expect("hist");
            let (mut errors, mut sent) = (0u64, 0u64);
            // Connections start staggered across one interval.
            let start = Instant::now() + per_conn * c as u32 / CONNECTIONS as u32;
            let end = start + WARMUP + measure();
            let mut i = 0u32;
            loop {
                let intended = start + per_conn * i;
                if intended >= end {
                    break;
                }
                pacer.until(intended).await;
                let ok = request(&mut send, &host, &body).await;
                if !ok && errors > 50 {
                    panic!("more than 50 failed requests on one connection");
                }
                if intended >= start + WARMUP {
                    sent += 1;
                    if ok {
                        let us = intended.elapsed().as_micros() as u64;
                        let _ = hist.record(us.max(1));
                    } else {
                        errors += 1;
                    }
                }
                i += 1;
            }
            (hist, errors, sent)
        }));
    }
    let mut all = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).expect("hist");
    let (mut errors, mut sent) = (0, 0);
    for task in tasks {
        let (h, e, s) = task.await.expect("load task");
        all.add(h).expect("merge");
        errors += e;
        sent += s;
    }
    (all, errors, sent)
}

/// Waits until an intended send time with a timerfd's precision. Tokio's timer rounds a
/// deadline up to its next millisecond tick, from a phase that differs between the paths'
/// runs: up to 1 ms added to every request's latency, by a different amount on each path.
struct Pacer(tokio::io::unix::AsyncFd<TimerFd>);

#[derive(Debug)]
struct TimerFd(nix::sys::timerfd::TimerFd);

impl AsRawFd for TimerFd {
    fn as_raw_fd(&self) -> RawFd {
        self.0.as_fd().as_raw_fd()
    }
}

impl Pacer {
    fn new() -> Self {
        use nix::sys::timerfd::{ClockId, TimerFlags};
        let fd = nix::sys::timerfd::TimerFd::new(
            ClockId::CLOCK_MONOTONIC,
            TimerFlags::TFD_NONBLOCK | TimerFlags::TFD_CLOEXEC,
        )
        .expect("timerfd");
        // SAFETY: the TimerFd owns its descriptor until it is dropped with the AsyncFd.
        let fd = unsafe {
            tokio::io::unix::AsyncFd::register_with_interest(
                TimerFd(fd),
                tokio::io::Interest::READABLE,
            )
        };
        Pacer(fd.expect("register timerfd"))
    }

    async fn until(&self, t: Instant) {
        use nix::sys::time::TimeSpec;
        use nix::sys::timerfd::{Expiration, TimerSetTimeFlags};
        // A zero one-shot time would disarm the timer: a time already past is not waited for.
        let Some(wait) = t
            .checked_duration_since(Instant::now())
            .filter(|d| !d.is_zero())
        else {
            return;
        };
        let timer = &self.0.get_ref().0;
        timer
            .set(
                Expiration::OneShot(TimeSpec::from_duration(wait)),
                TimerSetTimeFlags::empty(),
            )
            .expect("arm timerfd");
        loop {
            let mut ready = self.0.readable().await.expect("timerfd");
            // Reading the expiry count clears readiness; EAGAIN means a stale wake-up.
            if let Ok(read) = ready.try_io(|fd| fd.get_ref().0.wait().map_err(std::io::Error::from))
            {
                return read.expect("read timerfd");
            }
        }
    }
}

async fn closed_loop(t: &Target) -> f64 {
    let done = Arc::new(AtomicU64::new(0));
    let body = Bytes::from(vec![b'y'; payload()]);
    let end = Instant::now() + MAX_RATE_FOR;
    let mut tasks = Vec::new();
    for _ in 0..CONNECTIONS {
        let mut send = client(t).await;
        let (host, body, done) = (t.host.clone(), body.clone(), done.clone());
        tasks.push(tokio::spawn(async move {
            while Instant::now() < end {
                if request(&mut send, &host, &body).await {
                    done.fetch_add(1, Ordering::Relaxed);
                }
            }
        }));
    }
    for task in tasks {
        let _ = task.await;
    }
    done.load(Ordering::Relaxed) as f64 / MAX_RATE_FOR.as_secs_f64()
}

/// One connection, one POST of `BULK_BYTES` in 64 KB chunks: MB/s.
async fn bulk(t: &Target) -> f64 {
    let s = connect_in(&t.netns, t.addr).await;
    let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(s))
        .await
        .expect("handshake");
    tokio::spawn(conn);
    let chunk = Bytes::from(vec![b'z'; 64 * 1024]);
    let chunks = (BULK_BYTES / chunk.len() as u64) as usize;
    let stream = futures::stream::iter(
        (0..chunks).map(move |_| Ok::<_, Infallible>(http_body::Frame::data(chunk.clone()))),
    );
    let req = http::Request::post("/bulk")
        .header("host", &t.host)
        .body(StreamBody::new(stream))
        .expect("request");
    let start = Instant::now();
    let work = async {
        let resp = send.send_request(req).await.expect("bulk");
        resp.into_body()
            .collect()
            .await
            .expect("bulk body")
            .to_bytes()
    };
    let got = tokio::time::timeout(Duration::from_secs(120), work)
        .await
        .unwrap_or_else(|_| panic!("bulk transfer through {} timed out", t.name));
    let secs = start.elapsed().as_secs_f64();
    let n: u64 = String::from_utf8_lossy(&got).parse().unwrap_or(0);
    assert_eq!(n, BULK_BYTES, "bulk transfer through {} incomplete", t.name);
    n as f64 / secs / 1e6
}

fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .unwrap_or_default()
        .lines()
        .find_map(|l| {
            l.strip_prefix("model name")
                .map(|m| m.trim_start_matches([' ', '\t', ':']).to_string())
        })
        .unwrap_or_default();
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let date = Command::new("date")
        .args(["-u", "+%Y-%m-%d"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default();
    let haproxy = Command::new("haproxy")
        .arg("-v")
        .output()
        .map(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .next()
                .unwrap_or("")
                .to_string()
        })
        .unwrap_or_default();
    format!(
        "machine: {cores} cores ({cpu}), kernel {}, {date}; {haproxy}",
        kernel.trim()
    )
}

fn ensure_haproxy() {
    if Command::new("haproxy").arg("-v").output().is_ok() {
        return;
    }
    eprintln!("installing haproxy (Debian's package) for the comparison");
    let ok = Command::new("apt-get")
        .arg("update")
        .status()
        .is_ok_and(|s| s.success())
        && Command::new("apt-get")
            .args(["install", "-y", "haproxy"])
            .env("DEBIAN_FRONTEND", "noninteractive")
            .status()
            .is_ok_and(|s| s.success());
    assert!(ok, "could not install haproxy");
}

/// A HAProxy process in a pod's namespace, killed on drop.
struct Haproxy(Child);

impl Haproxy {
    fn id(&self) -> u32 {
        self.0.id()
    }
}

impl Drop for Haproxy {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn haproxy_in(netns: &str, cfg: &Path, body: &str) -> Haproxy {
    let text = format!(
        "global\n  maxconn 4096\ndefaults\n  mode http\n  timeout connect 5s\n  timeout client 60s\n  timeout server 60s\n  option http-keep-alive\n{body}"
    );
    std::fs::write(cfg, text).expect("haproxy config");
    let child = Command::new("ip")
        .args(["netns", "exec", netns, "haproxy", "-db", "-f"])
        .arg(cfg)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start haproxy");
    Haproxy(child)
}

/// A CA and two certificates for the HAProxy pair's mutual TLS.
struct TlsFiles {
    ca: PathBuf,
    client: PathBuf,
    server: PathBuf,
}

impl TlsFiles {
    fn new(dir: &Path) -> TlsFiles {
        use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair};
        let ca_key = KeyPair::generate().expect("key");
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).expect("params");
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(DnType::CommonName, "isthmus bench CA");
        let ca_cert = ca_params.self_signed(&ca_key).expect("ca");
        let issuer = rcgen::Issuer::new(ca_params, ca_key);
        let leaf = |name: &str| {
            let key = KeyPair::generate().expect("key");
            let mut params = CertificateParams::new(vec![name.to_string()]).expect("params");
            params.distinguished_name.push(DnType::CommonName, name);
            let cert = params.signed_by(&key, &issuer).expect("leaf");
            format!("{}{}", cert.pem(), key.serialize_pem())
        };
        let files = TlsFiles {
            ca: dir.join("ca.pem"),
            client: dir.join("client.pem"),
            server: dir.join("server.pem"),
        };
        std::fs::write(&files.ca, ca_cert.pem()).expect("ca");
        std::fs::write(&files.client, leaf("client")).expect("client");
        std::fs::write(&files.server, leaf("server")).expect("server");
        files
    }
}
