//! `isthmus analyze` over generated meshes of increasing size: wall time of the real binary
//! (process start, loading, every default analyzer, output), median of several runs.
//!
//! Run with `cargo bench -p isthmus --bench analyze` (sizes can be given as arguments, e.g.
//! `-- 10000 20000`). The baseline, measured in the same run, is `cat` reading the same files:
//! the cost of merely getting the bytes off disk.

use std::fmt::Write as _;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_isthmus");
const RUNS: usize = 5;
/// Resources generated per application (see `app`).
const PER_APP: usize = 6;
const APPS_PER_NAMESPACE: usize = 50;

fn main() {
    let sizes: Vec<usize> = std::env::args()
        .skip(1)
        .filter_map(|a| a.parse().ok())
        .collect();
    let sizes = if sizes.is_empty() {
        vec![2_500, 5_000, 10_000, 20_000]
    } else {
        sizes
    };
    println!(
        "{:>9} {:>10} {:>10} {:>12} {:>10} {:>9}",
        "resources", "bytes", "cat ms", "analyze ms", "µs/res", "messages"
    );
    for n in sizes {
        let dir = tempfile::tempdir().expect("tempdir");
        let (resources, bytes) = generate(dir.path(), n);
        let cat = median(|| run(Command::new("cat").arg(dir.path().join("mesh.yaml"))));
        let mut messages = 0;
        let analyze = median(|| {
            let (t, out) = run_with_output(
                Command::new(BIN)
                    .args(["analyze", "--failure-threshold", "Error", "-o", "json"])
                    .arg(dir.path()),
            );
            messages = serde_json::from_slice::<Vec<serde_json::Value>>(&out)
                .map(|v| v.len())
                .unwrap_or(usize::MAX);
            t
        });
        println!(
            "{resources:>9} {bytes:>10} {:>10.1} {:>12.1} {:>10.1} {messages:>9}",
            ms(cat),
            ms(analyze),
            analyze.as_secs_f64() * 1e6 / resources as f64,
        );
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn median(mut f: impl FnMut() -> Duration) -> Duration {
    let mut v: Vec<Duration> = (0..RUNS).map(|_| f()).collect();
    v.sort();
    v[RUNS / 2]
}

fn run(cmd: &mut Command) -> Duration {
    run_with_output(cmd).0
}

fn run_with_output(cmd: &mut Command) -> (Duration, Vec<u8>) {
    let start = Instant::now();
    let out = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .output()
        .expect("run");
    let t = start.elapsed();
    // 0: clean; 79: issues found at Error level. Anything else is a broken benchmark.
    assert!(
        matches!(out.status.code(), Some(0 | 79)),
        "{cmd:?} exited with {}",
        out.status
    );
    (t, out.stdout)
}

/// Writes about `n` resources to `dir/mesh.yaml`: namespaces of 50 applications, each with a
/// Service, Deployment, Pod, VirtualService, DestinationRule and AuthorizationPolicy that refer to
/// each other and to a neighbouring application, so analyzers do real lookups. Returns the
/// resource count and the file size.
fn generate(dir: &Path, n: usize) -> (usize, usize) {
    let apps = n.div_ceil(PER_APP);
    let mut y = String::with_capacity(apps * 2_500);
    let mut count = 0;
    for i in 0..apps {
        let ns = format!("ns-{}", i / APPS_PER_NAMESPACE);
        if i % APPS_PER_NAMESPACE == 0 {
            let _ = write!(
                y,
                "---\napiVersion: v1\nkind: Namespace\nmetadata:\n  name: {ns}\n  labels:\n    istio-injection: enabled\n"
            );
            count += 1;
        }
        let peer = if (i + 1) % APPS_PER_NAMESPACE == 0 {
            i + 1 - APPS_PER_NAMESPACE
        } else {
            i + 1
        };
        app(&mut y, &ns, i, peer);
        count += PER_APP;
    }
    std::fs::write(dir.join("mesh.yaml"), &y).expect("write");
    (count, y.len())
}

fn app(y: &mut String, ns: &str, i: usize, peer: usize) {
    let _ = write!(
        y,
        r#"---
apiVersion: v1
kind: Service
metadata:
  name: app-{i}
  namespace: {ns}
spec:
  selector:
    app: app-{i}
  ports:
  - name: http-web
    port: 8080
    targetPort: 9080
  - name: grpc-api
    port: 9090
---
apiVersion: apps/v1
kind: Deployment
metadata:
  name: app-{i}
  namespace: {ns}
spec:
  selector:
    matchLabels:
      app: app-{i}
  template:
    metadata:
      labels:
        app: app-{i}
        version: v1
    spec:
      serviceAccountName: app-{i}
      containers:
      - name: app
        image: example/app:1.0
        ports:
        - containerPort: 9080
---
apiVersion: v1
kind: Pod
metadata:
  name: app-{i}-0
  namespace: {ns}
  labels:
    app: app-{i}
    version: v1
spec:
  serviceAccountName: app-{i}
  containers:
  - name: app
    image: example/app:1.0
  - name: istio-proxy
    image: docker.io/istio/proxyv2:1.24.0
status:
  podIP: 10.{}.{}.{}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata:
  name: app-{i}
  namespace: {ns}
spec:
  hosts:
  - app-{i}
  http:
  - match:
    - uri:
        prefix: /peer
    route:
    - destination:
        host: app-{peer}
        subset: v1
  - route:
    - destination:
        host: app-{i}
        subset: v1
      weight: 90
    - destination:
        host: app-{i}
        subset: v2
      weight: 10
    retries:
      attempts: 3
      perTryTimeout: 2s
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata:
  name: app-{i}
  namespace: {ns}
spec:
  host: app-{i}
  trafficPolicy:
    connectionPool:
      http:
        http2MaxRequests: 1000
  subsets:
  - name: v1
    labels:
      version: v1
  - name: v2
    labels:
      version: v2
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata:
  name: app-{i}
  namespace: {ns}
spec:
  selector:
    matchLabels:
      app: app-{i}
  action: ALLOW
  rules:
  - from:
    - source:
        principals:
        - cluster.local/ns/{ns}/sa/app-{peer}
    to:
    - operation:
        methods: [GET, POST]
        paths: [/api/*]
"#,
        (i >> 16) & 0xff,
        (i >> 8) & 0xff,
        i & 0xff,
    );
}
