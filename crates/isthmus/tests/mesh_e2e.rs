//! The seeds' scenarios end to end: `isthmus up` runs real pods (network namespaces), real
//! capture (iptables), the real control plane and sidecars; requests are sent from inside pods.
//! Each test's mesh has its own name and is torn down by a guard, also when the test fails.

use std::path::PathBuf;
use std::process::{Command, Output};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use isthmus_testkit::is_root;

const BIN: &str = env!("CARGO_BIN_EXE_isthmus");

/// A mesh brought up from YAML; `down` on drop.
struct Mesh {
    name: String,
    state: PathBuf,
    _dir: tempfile::TempDir,
}

impl Mesh {
    fn up(tag: &str, yaml: &str, extra: &[&str]) -> Mesh {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("mesh.yaml");
        std::fs::write(&file, yaml).expect("write yaml");
        Mesh::up_paths(tag, dir, &[file], extra)
    }

    fn up_paths(tag: &str, dir: tempfile::TempDir, paths: &[PathBuf], extra: &[&str]) -> Mesh {
        static N: AtomicU32 = AtomicU32::new(0);
        // Short: it names namespaces and links.
        let name = format!(
            "t{}{}{}",
            std::process::id() % 1000,
            tag,
            N.fetch_add(1, Ordering::Relaxed)
        );
        let state = dir.path().join("state");
        let mesh = Mesh {
            name,
            state,
            _dir: dir,
        };
        let out = Command::new(BIN)
            .arg("up")
            .args(paths)
            .args(["--name", &mesh.name, "--state-dir"])
            .arg(&mesh.state)
            .args(extra)
            .output()
            .expect("run isthmus up");
        assert!(
            out.status.success(),
            "isthmus up failed:\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        mesh
    }

    /// Up with MeshConfig `mesh_config` (YAML) given as `--meshConfig`, in a file that lives
    /// as long as the mesh (its commands read it again).
    fn up_with_mesh(tag: &str, yaml: &str, mesh_config: &str) -> Mesh {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("mesh.yaml");
        std::fs::write(&file, yaml).expect("write yaml");
        let config = dir.path().join("meshconfig.yaml");
        std::fs::write(&config, mesh_config).expect("write mesh config");
        let config = config.to_str().expect("utf-8 path").to_string();
        Mesh::up_paths(tag, dir, &[file], &["--meshConfig", &config])
    }

    /// `isthmus logs POD -c istio-proxy`: the sidecar's output so far.
    fn proxy_log(&self, pod: &str) -> String {
        let out = Command::new(BIN)
            .args(["logs", pod, "-c", "istio-proxy"])
            .args(self.args())
            .output()
            .expect("isthmus logs");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// The sidecar's `/stats?filter=`, read again for up to 5 s until it shows `want`.
    fn stats_until(&self, pod: &str, filter: &str, want: &str) -> String {
        let url = format!("http://127.0.0.1:15000/stats?filter={filter}");
        let mut stats = String::new();
        for _ in 0..50 {
            stats = self.get(pod, &url, &[]).1;
            if stats.contains(want) {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
        stats
    }

    fn args(&self) -> Vec<String> {
        vec![
            "--name".into(),
            self.name.clone(),
            "--state-dir".into(),
            self.state.display().to_string(),
        ]
    }

    fn exec(&self, pod: &str, cmd: &[&str]) -> Output {
        Command::new(BIN)
            .arg("exec")
            .arg(pod)
            .args(self.args())
            .arg("--")
            .args(cmd)
            .output()
            .expect("run isthmus exec")
    }

    /// `isthmus echo client URL` from inside `pod`: (succeeded, output).
    fn get(&self, pod: &str, url: &str, extra: &[&str]) -> (bool, String) {
        let mut cmd = vec!["isthmus", "echo", "client", url, "--timeout", "3s"];
        cmd.extend_from_slice(extra);
        let out = self.exec(pod, &cmd);
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        (
            out.status.success() && text.contains("StatusCode=200"),
            text,
        )
    }

    /// `isthmus precheck`: (exit code, stdout).
    fn precheck(&self, extra: &[&str]) -> (i32, String) {
        let out = Command::new(BIN)
            .arg("precheck")
            .args(self.args())
            .args(extra)
            .output()
            .expect("run isthmus precheck");
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).into_owned(),
        )
    }

    fn status(&self) -> serde_json::Value {
        let out = Command::new(BIN)
            .arg("status")
            .args(self.args())
            .args(["-o", "json"])
            .output()
            .expect("run isthmus status");
        serde_json::from_slice(&out.stdout).expect("status json")
    }

    fn pod_ip(&self, prefix: &str) -> String {
        self.status()["pods"]
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["name"].as_str().unwrap().starts_with(prefix))
            .map(|p| p["ip"].as_str().unwrap().to_string())
            .unwrap_or_else(|| panic!("no pod {prefix}"))
    }
}

impl Drop for Mesh {
    fn drop(&mut self) {
        let _ = Command::new(BIN).arg("down").args(self.args()).output();
    }
}

const CORE: &str = r#"
apiVersion: v1
kind: Namespace
metadata: {name: e2e, labels: {istio-injection: enabled}}
---
apiVersion: v1
kind: Namespace
metadata: {name: legacy}
---
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: default, namespace: e2e}
spec: {mtls: {mode: STRICT}}
---
apiVersion: v1
kind: Service
metadata: {name: server, namespace: e2e}
spec:
  selector: {app: server}
  ports: [{name: http, port: 8080}]
---
apiVersion: apps/v1
kind: Deployment
metadata: {name: server, namespace: e2e}
spec:
  replicas: 2
  selector: {matchLabels: {app: server}}
  template:
    metadata: {labels: {app: server, version: v1}}
    spec:
      serviceAccountName: server
      containers:
      - name: server
        command: [isthmus, echo, --port, "8080"]
        securityContext: {runAsUser: 1000}
---
apiVersion: v1
kind: Service
metadata: {name: db, namespace: e2e}
spec:
  clusterIP: None
  selector: {app: db}
  ports: [{name: http, port: 8080}]
---
apiVersion: apps/v1
kind: StatefulSet
metadata: {name: db, namespace: e2e}
spec:
  serviceName: db
  replicas: 2
  selector: {matchLabels: {app: db}}
  template:
    metadata: {labels: {app: db}}
    spec:
      containers:
      - name: db
        command: [isthmus, echo, --port, "8080"]
        securityContext: {runAsUser: 1000}
---
apiVersion: v1
kind: Pod
metadata:
  name: client
  namespace: e2e
  labels: {app: client}
  # As Istio's circuit-breaking task does: the outbound clusters' Envoy stats to Prometheus.
  annotations:
    proxy.istio.io/config: '{"proxyStatsMatcher": {"inclusionPrefixes": ["cluster.outbound"]}}'
spec:
  serviceAccountName: client
  containers:
  - name: client
    command: [sleep, "3600"]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: server, namespace: e2e}
spec:
  selector: {matchLabels: {app: server}}
  rules:
  - from: [{source: {principals: [cluster.local/ns/e2e/sa/client]}}]
    to: [{operation: {methods: [GET]}}]
---
apiVersion: v1
kind: Service
metadata: {name: tcpsrv, namespace: e2e}
spec:
  selector: {app: tcpsrv}
  ports: [{name: tcp, port: 7000}]
---
apiVersion: v1
kind: Pod
metadata: {name: tcpsrv, namespace: e2e, labels: {app: tcpsrv}}
spec:
  containers:
  - name: tcpsrv
    command: [isthmus, echo, --tcp, --port, "7000"]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: tcpsrv, namespace: e2e}
spec:
  selector: {matchLabels: {app: tcpsrv}}
  rules:
  - from: [{source: {principals: [cluster.local/ns/e2e/sa/client]}}]
---
apiVersion: v1
kind: Service
metadata: {name: grpc, namespace: e2e}
spec:
  selector: {app: grpc}
  ports: [{name: grpc, port: 7070}]
---
apiVersion: v1
kind: Pod
metadata: {name: grpc, namespace: e2e, labels: {app: grpc}}
spec:
  containers:
  - name: grpc
    command: [isthmus, echo, --port, "8080", --grpc-port, "7070"]
---
apiVersion: v1
kind: Service
metadata: {name: grpc-sniffed, namespace: e2e}
spec:
  selector: {app: grpc-sniffed}
  ports: [{port: 7071}]
---
apiVersion: v1
kind: Pod
metadata: {name: grpc-sniffed, namespace: e2e, labels: {app: grpc-sniffed}}
spec:
  containers:
  - name: grpc
    command: [isthmus, echo, --port, "8080", --grpc-port, "7071"]
---
apiVersion: v1
kind: Pod
metadata: {name: rogue, namespace: e2e, labels: {app: rogue}}
spec:
  containers:
  - name: rogue
    command: [sleep, "3600"]
    securityContext: {runAsUser: 1337}
---
apiVersion: v1
kind: Pod
metadata: {name: legacy, namespace: legacy, labels: {app: legacy}}
spec:
  containers:
  - name: legacy
    command: [sleep, "3600"]
---
apiVersion: v1
kind: Service
metadata: {name: empty, namespace: legacy}
spec:
  selector: {app: nobody}
  ports: [{name: http, port: 8080}]
"#;

#[test]
fn sidecars_carry_mtls_identity_and_enforce_strict_and_pod_ip_rules() {
    if !is_root() {
        eprintln!("skipped: needs root");
        return;
    }
    let mesh = Mesh::up("core", CORE, &[]);

    // Through both sidecars with mTLS: the server sees the caller's SPIFFE identity and the
    // connection from 127.0.0.6, and requests spread over both replicas.
    // 20 requests: all on one replica by chance has odds of 2 in a million.
    let (ok, out) = mesh.get("client", "http://server:8080/hello", &["--count", "20"]);
    assert!(ok, "{out}");
    assert!(out.contains("20 succeeded"), "{out}");
    assert!(
        out.contains("Identity=spiffe://cluster.local/ns/e2e/sa/client"),
        "{out}"
    );
    assert!(out.contains("IP=127.0.0.6"), "{out}");
    // Every request carries Envoy's element for the peer, as Istio configures it: the server
    // sidecar's identity, the client certificate's hash, an empty subject, the caller's URI.
    let xfcc: Vec<&str> = out
        .lines()
        .filter_map(|l| l.split("RequestHeader=x-forwarded-client-cert:").nth(1))
        .collect();
    assert_eq!(xfcc.len(), 20, "{out}");
    for v in &xfcc {
        let fields: Vec<&str> = v.split(';').collect();
        assert!(
            fields.len() == 4
                && fields[0].starts_with("By=spiffe://cluster.local/ns/e2e/sa/")
                && fields[1]
                    .strip_prefix("Hash=")
                    .is_some_and(|h| h.len() == 64 && h.bytes().all(|b| b.is_ascii_hexdigit()))
                && fields[2] == "Subject=\"\""
                && fields[3] == "URI=spiffe://cluster.local/ns/e2e/sa/client",
            "{v}"
        );
    }
    // Envoy's headers as Istio sets them: the attempt count reaches the app; the client sees
    // the outbound sidecar's name (inbound's `istio-envoy` is overwritten on the way back) and
    // the upstream service time.
    for (line, what) in [
        ("RequestHeader=x-envoy-attempt-count:1", "attempt counts"),
        ("ResponseHeader=server:envoy", "server names"),
        (
            "ResponseHeader=x-envoy-upstream-service-time:",
            "service times",
        ),
    ] {
        assert_eq!(out.matches(line).count(), 20, "{what}: {out}");
    }
    let hosts: std::collections::BTreeSet<&str> = out
        .lines()
        .filter_map(|l| l.split("Hostname=").nth(1))
        .collect();
    assert_eq!(hosts.len(), 2, "least-request spreads requests: {out}");
    // Every hostname form of seed 004 reaches the service.
    for host in [
        "server.e2e",
        "server.e2e.svc",
        "server.e2e.svc.cluster.local",
    ] {
        let (ok, out) = mesh.get("client", &format!("http://{host}:8080/"), &[]);
        assert!(ok, "{host}: {out}");
    }

    // Istio's metrics on the server's 15090, reported by the destination with the caller.
    let server = mesh.pod_ip("server-");
    let (_, metrics) = mesh.get(
        "client",
        &format!("http://{server}:15090/stats/prometheus"),
        &[],
    );
    assert!(
        metrics.contains("istio_requests_total{reporter=\"destination\""),
        "{metrics}"
    );
    assert!(
        metrics.contains("source_principal=\"spiffe://cluster.local/ns/e2e/sa/client\""),
        "{metrics}"
    );
    assert!(
        metrics.contains("connection_security_policy=\"mutual_tls\""),
        "{metrics}"
    );
    assert!(
        metrics.contains("destination_service=\"server.e2e.svc.cluster.local\""),
        "{metrics}"
    );
    // Who called, from the peer metadata the caller's sidecar sent (Istio's
    // `istio.metadata_exchange` filter on both sides).
    assert!(metrics.contains("source_workload=\"client\""), "{metrics}");
    // The client's own 15090: the outbound clusters' Envoy stats its `proxyStatsMatcher`
    // asks for, named with Istio's tags, beside the server state Istio always exports.
    let (_, own) = mesh.get("client", "http://127.0.0.1:15090/stats/prometheus", &[]);
    let sent: u64 = own
        .lines()
        .find_map(|l| {
            l.strip_prefix("[0 body] envoy_cluster_upstream_rq_total{cluster_name=\"outbound|8080||server.e2e.svc.cluster.local\"} ")
        })
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no upstream_rq_total for the server in {own}"));
    assert!(sent >= 3, "{own}");
    // And who answered, from the peer metadata of the answers; both principals from the
    // upstream mTLS connection, as Istio's client side reads them.
    assert!(own.contains("destination_workload=\"server\""), "{own}");
    assert!(
        own.lines()
            .any(|l| l.contains("istio_requests_total{reporter=\"source\"")
                && l.contains("source_principal=\"spiffe://cluster.local/ns/e2e/sa/client\"")
                && l.contains("destination_principal=\"spiffe://cluster.local/ns/e2e/sa/server\"")),
        "{own}"
    );
    assert!(own.contains("[0 body] envoy_server_live 1\n"), "{own}");
    // The server asked for nothing more than Istio's list, which has the control plane's
    // cluster and no other.
    assert!(
        !metrics.contains("envoy_cluster_upstream_rq_total{cluster_name=\"outbound")
            && metrics.contains("envoy_cluster_upstream_rq_total{cluster_name=\"xds-grpc\"} "),
        "{metrics}"
    );
    // The agent's port 15020 tells how long the workload certificate has left.
    let (_, agent) = mesh.get(
        "client",
        &format!("http://{server}:15020/stats/prometheus"),
        &[],
    );
    let left: f64 = agent
        .lines()
        .find(|l| l.contains("istio_agent_cert_expiry_seconds{resource_name=\"default\"} "))
        .and_then(|l| l.split_whitespace().last())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no certificate expiry in {agent}"));
    assert!(left > 0.0 && left <= 90.0 * 86400.0, "{left}");

    // gRPC through both sidecars: HTTP/2 end to end, the caller's identity, the status in
    // trailers.
    let (ok, out) = mesh.get("client", "grpc://grpc:7070", &["--count", "2"]);
    assert!(ok && out.contains("2 succeeded"), "{out}");
    assert!(
        out.contains("Proto=HTTP/2.0") && out.contains("Echo=isthmus 1"),
        "{out}"
    );
    assert!(
        out.contains("Identity=spiffe://cluster.local/ns/e2e/sa/client"),
        "{out}"
    );
    // The same on a port without a protocol: sniffed as HTTP/2, and sent on in the version it
    // came in (Istio's `use_downstream_protocol`), so the app still gets HTTP/2.
    let (ok, out) = mesh.get("client", "grpc://grpc-sniffed:7071", &["--count", "2"]);
    assert!(ok && out.contains("2 succeeded"), "{out}");
    assert!(out.contains("Proto=HTTP/2.0"), "{out}");

    // istioctl's views, read from the proxy's admin port and the control plane.
    let cli = |args: &[&str]| {
        let out = Command::new(BIN)
            .args(args)
            .args(mesh.args())
            .output()
            .expect("run isthmus");
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
        )
    };
    let (ok, out) = cli(&["proxy-status", "client"]);
    assert!(ok, "{out}");
    assert!(
        out.contains("SYNCED") && out.contains("Clusters Match") && out.contains("Routes Match"),
        "{out}"
    );
    let (ok, out) = cli(&["proxy-config", "secret", "client"]);
    assert!(
        ok && out.contains("Cert Chain") && out.contains("true"),
        "{out}"
    );
    let (ok, out) = cli(&["proxy-config", "cluster", "client"]);
    assert!(ok && out.contains("server.e2e.svc.cluster.local"), "{out}");
    // The bootstrap's clusters too, as istioctl lists them.
    assert!(
        out.lines()
            .any(|l| l.starts_with("xds-grpc ") && l.contains("STATIC")),
        "{out}"
    );
    let (ok, out) = cli(&["proxy-config", "listeners", "client"]);
    assert!(
        ok && out
            .lines()
            .any(|l| l.contains(" 15090 ") && l.ends_with("Inline Route: /stats/prometheus*")),
        "{out}"
    );
    // The sidecar's log levels, as `istioctl proxy-config log` reads and sets them: all,
    // then some loggers, then back to Istio's default.
    let (ok, out) = cli(&["proxy-config", "log", "client", "--level", "debug"]);
    assert!(
        ok && out.contains("active loggers:\n  admin: debug\n"),
        "{out}"
    );
    let (ok, out) = cli(&[
        "proxy-config",
        "log",
        "client",
        "--level",
        "info,http:debug,rbac:trace",
    ]);
    for want in ["  admin: info\n", "  http: debug\n", "  rbac: trace\n"] {
        assert!(ok && out.contains(want), "{want}: {out}");
    }
    let refused = Command::new(BIN)
        .args(["proxy-config", "log", "client", "--level", "nosuch:debug"])
        .args(mesh.args())
        .output()
        .expect("run isthmus");
    let err = String::from_utf8_lossy(&refused.stderr);
    assert!(
        !refused.status.success() && err.contains("unknown logger \"nosuch\""),
        "{err}"
    );
    let (ok, out) = cli(&["proxy-config", "log", "client", "-r"]);
    assert!(
        ok && out.lines().skip(2).all(|l| l.ends_with(": warning")),
        "{out}"
    );
    let (ok, out) = cli(&["proxy-config", "log", "client"]);
    assert!(ok && out.contains("  rbac: warning\n"), "{out}");
    let (ok, out) = cli(&["proxy-config", "bootstrap", "client"]);
    let bootstrap: serde_json::Value = serde_json::from_str(&out).unwrap_or_default();
    assert!(
        ok && bootstrap["bootstrap"]["node"]["metadata"]["NAMESPACE"] == "e2e",
        "{out}"
    );
    // Endpoints with the health and outlier check the client's proxy reports itself.
    let (ok, out) = cli(&["proxy-config", "endpoints", "client"]);
    assert!(
        ok && out.lines().any(|l| l.contains("HEALTHY")
            && l.contains(" OK ")
            && l.contains("outbound|8080||server.e2e.svc.cluster.local")),
        "{out}"
    );
    let (ok, out) = cli(&["proxy-config", "all", "client", "-o", "json"]);
    assert!(
        ok && out.contains("\"private_key\": {\n") && out.contains("[redacted]"),
        "key not redacted"
    );

    // AuthorizationPolicy: only the client's identity, only GET; HTTP denials are 403 with
    // Envoy's body, TCP denials close the connection.
    let (ok, out) = mesh.get("rogue", "http://server:8080/", &[]);
    assert!(
        !ok && out.contains("StatusCode=403") && out.contains("RBAC: access denied"),
        "{out}"
    );
    let (ok, out) = mesh.get("client", "tcp://tcpsrv:7000", &[]);
    assert!(ok, "{out}");
    // The client side names the server of a TCP connection by its certificate, and its
    // workload by what Istio's TCP metadata exchange brought (the app label, which the
    // control plane's endpoint metadata does not carry, says it came that way).
    let (_, own) = mesh.get("client", "http://127.0.0.1:15090/stats/prometheus", &[]);
    assert!(
        own.lines().any(
            |l| l.contains("istio_tcp_connections_opened_total{reporter=\"source\"")
                && l.contains("destination_principal=\"spiffe://cluster.local/ns/e2e/sa/default\"")
                && l.contains("destination_workload=\"tcpsrv\"")
                && l.contains("destination_app=\"tcpsrv\"")
                && l.contains("destination_canonical_service=\"tcpsrv\"")
                && l.contains("destination_workload_namespace=\"e2e\"")
        ),
        "{own}"
    );
    // The server side learns its caller the same way, and the bytes reached the app whole
    // (the echo above) with the preambles taken off on both sides.
    let tcpsrv = mesh.pod_ip("tcpsrv");
    let (_, theirs) = mesh.get(
        "client",
        &format!("http://{tcpsrv}:15090/stats/prometheus"),
        &[],
    );
    assert!(
        theirs.lines().any(|l| l
            .contains("istio_tcp_connections_opened_total{reporter=\"destination\"")
            && l.contains("source_workload=\"client\"")
            && l.contains("source_app=\"client\"")
            && l.contains("source_principal=\"spiffe://cluster.local/ns/e2e/sa/client\"")),
        "{theirs}"
    );
    let (ok, out) = mesh.get("rogue", "tcp://tcpsrv:7000", &[]);
    assert!(!ok, "a denied TCP connection was served: {out}");

    // STRICT: a pod without a sidecar is refused, by service name and by pod IP.
    let (ok, out) = mesh.get("legacy", "http://server.e2e:8080/", &[]);
    assert!(!ok, "plaintext accepted under STRICT: {out}");
    let (ok, out) = mesh.get("legacy", &format!("http://{server}:8080/"), &[]);
    assert!(!ok, "plaintext accepted under STRICT: {out}");

    // A service without endpoints refuses connections (kube-proxy's filter rules), and those
    // rules are looked at for a connection's first packet only, not for every packet sent.
    let (ok, out) = mesh.get("legacy", "http://empty.legacy:8080/", &[]);
    assert!(!ok && out.to_lowercase().contains("refused"), "{out}");
    let jumps = || {
        let out = mesh.exec(
            "client",
            &["iptables", "-t", "filter", "-L", "OUTPUT", "-v", "-x", "-n"],
        );
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        text.lines()
            .find(|l| l.contains("ISTHMUS-NO-ENDPOINTS"))
            .and_then(|l| l.split_whitespace().next()?.parse::<u64>().ok())
            .unwrap_or_else(|| panic!("no jump to the reject chain: {text}"))
    };
    let before = jumps();
    for _ in 0..3 {
        let (ok, out) = mesh.get("client", "http://server.e2e:8080/", &[]);
        assert!(ok, "{out}");
    }
    let looked = jumps() - before;
    assert!(
        looked <= 12,
        "{looked} packets of three requests went through the reject rules"
    );

    // Seed 004: a plain request by pod IP to a non-headless service matches no route of
    // the service and is not delivered; a headless StatefulSet's pods answer by pod IP and
    // by their own hostname.
    let (ok, out) = mesh.get("client", &format!("http://{server}:8080/"), &[]);
    assert!(!ok, "request by pod IP was delivered: {out}");
    let db0 = mesh.pod_ip("db-0");
    let (ok, out) = mesh.get("client", &format!("http://{db0}:8080/"), &[]);
    assert!(ok && out.contains("Hostname=db-0"), "{out}");
    let (ok, out) = mesh.get("client", "http://db-1.db:8080/", &[]);
    assert!(ok && out.contains("Hostname=db-1"), "{out}");
    assert!(
        out.contains("Identity=spiffe://cluster.local/ns/e2e/sa/client"),
        "headless traffic is mTLS too: {out}"
    );

    // Seed 003's gotcha: an app running as UID 1337 (the proxy's) is not captured, so its
    // traffic leaves in plaintext and STRICT refuses it; analyze warns of such pods, and the
    // same request from another user goes through the sidecar.
    let analyze = Command::new(BIN)
        .arg("analyze")
        .arg(mesh._dir.path().join("mesh.yaml"))
        .output()
        .expect("run isthmus analyze");
    let report = String::from_utf8_lossy(&analyze.stdout);
    assert!(
        report.contains("[IST0144] (Pod e2e/rogue") && report.contains("1337"),
        "{report}"
    );
    let bypass = mesh.exec(
        "rogue",
        &[
            "setpriv",
            "--reuid=1337",
            "--regid=1337",
            "--clear-groups",
            "isthmus",
            "echo",
            "client",
            "http://server:8080/",
            "--timeout",
            "3s",
        ],
    );
    let text = String::from_utf8_lossy(&bypass.stdout);
    assert!(
        !text.contains("StatusCode=200"),
        "UID 1337 was captured: {text}"
    );
    // Through its sidecar the same request is mTLS, and the policy decides: 403, not a reset.
    let (_, out) = mesh.get("rogue", "http://server:8080/", &[]);
    assert!(out.contains("StatusCode=403"), "{out}");
}

const LOCALHOST: &str = r#"
apiVersion: v1
kind: Namespace
metadata: {name: ll, labels: {istio-injection: enabled}}
---
apiVersion: v1
kind: Service
metadata: {name: lo, namespace: ll}
spec:
  selector: {app: lo}
  ports: [{name: http, port: 8080}]
---
apiVersion: v1
kind: Pod
metadata: {name: lo, namespace: ll, labels: {app: lo}}
spec:
  containers:
  - name: app
    command: [isthmus, echo, --port, "8080", --bind, 127.0.0.1]
---
apiVersion: v1
kind: Service
metadata: {name: podip, namespace: ll}
spec:
  selector: {app: podip}
  ports: [{name: http, port: 8080}]
---
apiVersion: v1
kind: Pod
metadata: {name: podip, namespace: ll, labels: {app: podip}}
spec:
  containers:
  - name: app
    command: [isthmus, echo, --port, "8080", --bind, $(POD_IP)]
    env: [{name: POD_IP, valueFrom: {fieldRef: {fieldPath: status.podIP}}}]
---
apiVersion: v1
kind: Service
metadata: {name: fixed, namespace: ll}
spec:
  selector: {app: fixed}
  ports: [{name: http, port: 8080}]
---
apiVersion: v1
kind: Pod
metadata: {name: fixed, namespace: ll, labels: {app: fixed}}
spec:
  containers:
  - name: app
    command: [isthmus, echo, --port, "8080", --bind, 127.0.0.1]
---
apiVersion: networking.istio.io/v1
kind: Sidecar
metadata: {name: fixed, namespace: ll}
spec:
  workloadSelector: {labels: {app: fixed}}
  ingress:
  - port: {number: 8080, protocol: HTTP, name: http}
    defaultEndpoint: 127.0.0.1:8080
---
apiVersion: v1
kind: Pod
metadata: {name: client, namespace: ll, labels: {app: client}}
spec:
  containers:
  - name: client
    command: [sleep, "3600"]
"#;

#[test]
fn inbound_traffic_goes_to_the_pod_ip_like_kubernetes() {
    if !is_root() {
        eprintln!("skipped: needs root");
        return;
    }
    // With Istio's access logs on, in its default text format, and HTTP upgraded to HTTP/2
    // between sidecars mesh-wide; a default ProxyConfig as a cluster's mesh config has it
    // (istiod's address, which the local runtime replaces with its own), asking every sidecar
    // for its clusters' request counts.
    let mesh = Mesh::up_with_mesh(
        "lo",
        LOCALHOST,
        "accessLogFile: /dev/stdout\nh2UpgradePolicy: UPGRADE\ndefaultConfig:\n  discoveryAddress: istiod.istio-system.svc:15012\n  proxyStatsMatcher: {inclusionSuffixes: [upstream_rq_total]}\n",
    );
    // Seeds 000-001: bound only to 127.0.0.1, the app is not reachable from other pods…
    let (ok, out) = mesh.get("client", "http://lo:8080/", &[]);
    assert!(!ok, "a localhost-only app was reachable: {out}");
    // …bound only to the pod IP, it is…
    let (ok, out) = mesh.get("client", "http://podip:8080/", &[]);
    assert!(ok, "{out}");
    // …and seed 002's fix, a Sidecar with defaultEndpoint 127.0.0.1, reaches the loopback app.
    let (ok, out) = mesh.get("client", "http://fixed:8080/", &[]);
    assert!(ok, "{out}");
    // The precheck finds the one pod that is unreachable, from its sockets alone.
    let (code, out) = mesh.precheck(&[]);
    assert_eq!(code, 1, "{out}");
    assert_eq!(
        out.trim(),
        "Error [IST0143] (Pod ll/lo) Port 8080 is exposed in a Service but listens on localhost. It will not be exposed to other pods."
    );
    let (_, json) = mesh.precheck(&["-o", "json"]);
    let items: serde_json::Value = serde_json::from_str(&json).expect("json");
    assert_eq!(items[0]["code"], "IST0143");
    assert_eq!(items[0]["origin"], "Pod ll/lo");

    // The access logs say what happened on each side: the server's sidecar could not reach
    // the loopback-only app (UF), the successful call went to the pod IP.
    let lo = mesh.proxy_log("lo");
    assert!(
        // Between sidecars the request is HTTP/2, as the mesh config says.
        lo.lines()
            .any(|l| l.contains("\"GET / HTTP/2\" 503 UF") && l.contains("inbound|8080||")),
        "{lo}"
    );
    let podip = mesh.proxy_log("podip");
    assert!(
        podip
            .lines()
            .any(|l| l.contains("\"GET / HTTP/2\" 200 -") && l.contains("\"podip:8080\"")),
        "{podip}"
    );
    let client = mesh.proxy_log("client");
    assert!(
        client
            .lines()
            .any(|l| l.contains("\"GET / HTTP/1.1\" 200 -")
                && l.contains("outbound|8080||podip.ll.svc.cluster.local")),
        "{client}"
    );
    // The mesh's `proxyStatsMatcher` reached the client's sidecar.
    let (_, own) = mesh.get("client", "http://127.0.0.1:15090/stats/prometheus", &[]);
    assert!(
        own.contains("] envoy_cluster_upstream_rq_total{cluster_name=\"outbound|8080||podip.ll.svc.cluster.local\"} "),
        "{own}"
    );
}

#[test]
fn localhost_mode_sends_inbound_traffic_to_loopback() {
    if !is_root() {
        eprintln!("skipped: needs root");
        return;
    }
    // PILOT_ENABLE_INBOUND_PASSTHROUGH=false: Istio's behaviour before 1.10.
    let mesh = Mesh::up("lh", LOCALHOST, &["--inbound-passthrough=false"]);
    let (ok, out) = mesh.get("client", "http://lo:8080/", &[]);
    assert!(ok, "{out}");
    let (ok, out) = mesh.get("client", "http://podip:8080/", &[]);
    assert!(
        !ok,
        "an app bound only to the pod IP was reached through 127.0.0.1: {out}"
    );
    // Inbound goes to loopback in this mode: nothing for the precheck to report.
    let (code, out) = mesh.precheck(&[]);
    assert_eq!(code, 0, "{out}");
}

#[test]
fn localhost_listener_example_fails_precheck_until_its_sidecar_fix() {
    if !is_root() {
        eprintln!("skipped: needs root");
        return;
    }
    let example = PathBuf::from(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../examples/localhost-listener"
    ));
    let netcat = example.join("netcat.yaml");
    {
        let mesh = Mesh::up_paths(
            "nc",
            tempfile::tempdir().unwrap(),
            std::slice::from_ref(&netcat),
            &[],
        );
        let (code, out) = mesh.precheck(&[]);
        assert_eq!(code, 1, "{out}");
        assert!(out.contains("(Pod default/netcat) Port 8080"), "{out}");
        // Opaque TCP through both sidecars does not reach a loopback-only app.
        let (ok, out) = mesh.get("client", "tcp://netcat:8080", &[]);
        assert!(!ok, "{out}");
    }
    let mesh = Mesh::up_paths(
        "nf",
        tempfile::tempdir().unwrap(),
        &[netcat, example.join("sidecar.yaml")],
        &[],
    );
    let (code, out) = mesh.precheck(&[]);
    assert_eq!(code, 0, "{out}");
    let (ok, out) = mesh.get("client", "tcp://netcat:8080", &[]);
    assert!(ok, "{out}");
}

#[test]
fn traffic_survives_a_control_plane_restart_and_proxies_resync() {
    if !is_root() {
        eprintln!("skipped: needs root");
        return;
    }
    let mesh = Mesh::up("cp", CORE, &[]);
    let (ok, out) = mesh.get("client", "http://server:8080/", &[]);
    assert!(ok, "{out}");
    let pid = mesh.status()["control_plane_pid"].as_u64().expect("pid") as i32;
    // Frozen (SIGSTOP: not restarted, not answering): the proxies keep their configuration.
    let cp = nix::unistd::Pid::from_raw(pid);
    nix::sys::signal::kill(cp, nix::sys::signal::Signal::SIGSTOP).expect("stop control plane");
    let (ok, out) = mesh.get("client", "http://server:8080/", &["--count", "3"]);
    assert!(ok, "traffic stopped with the control plane: {out}");
    // Gone: the streams break.
    nix::sys::signal::kill(cp, nix::sys::signal::Signal::SIGKILL).expect("kill control plane");
    // The supervisor restarts it; the proxies reconnect and are served again.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (_, stats) = mesh.get("client", "http://127.0.0.1:15000/stats", &[]);
        let restarted = mesh.status()["control_plane_pid"]
            .as_u64()
            .is_some_and(|p| p as i32 != pid);
        let (_, ready) = mesh.get("client", "http://127.0.0.1:15021/healthz/ready", &[]);
        if restarted
            && stats.contains("control_plane.disconnects")
            && ready.contains("StatusCode=200")
        {
            // Synced: a fresh ADS stream exists for this proxy on the new control plane.
            let (ok, syncz) = mesh.get("client", "http://10.200.0.1:15014/debug/syncz", &[]);
            if ok && syncz.contains("client.e2e") {
                break;
            }
        }
        assert!(Instant::now() < deadline, "proxies did not resync: {stats}");
        std::thread::sleep(Duration::from_millis(300));
    }
    let (ok, out) = mesh.get("client", "http://server:8080/", &[]);
    assert!(ok, "{out}");
}

const ROTATION: &str = r#"
apiVersion: v1
kind: Namespace
metadata: {name: rot, labels: {istio-injection: enabled}}
---
apiVersion: v1
kind: Service
metadata: {name: server, namespace: rot}
spec:
  selector: {app: server}
  ports: [{name: http, port: 8080}]
---
apiVersion: v1
kind: Pod
metadata:
  name: server
  namespace: rot
  labels: {app: server}
  annotations:
    proxy.istio.io/config: '{"proxyMetadata": {"SECRET_TTL": "16s"}}'
spec:
  containers:
  - name: server
    command: [isthmus, echo, --port, "8080"]
---
apiVersion: v1
kind: Pod
metadata:
  name: client
  namespace: rot
  labels: {app: client}
  annotations:
    proxy.istio.io/config: '{"proxyMetadata": {"SECRET_TTL": "16s"}, "proxyHeaders": {"server": {"value": "rot-client"}, "attemptCount": {"disabled": true}}}'
spec:
  containers:
  - name: client
    command: [sleep, "3600"]
"#;

#[test]
fn certificates_rotate_at_half_life_without_a_failed_request() {
    if !is_root() {
        eprintln!("skipped: needs root");
        return;
    }
    let mesh = Mesh::up("rot", ROTATION, &[]);
    // The workload certificate's serial, from `proxy-config secret`.
    let serial = |pod: &str| -> String {
        let out = Command::new(BIN)
            .args(["proxy-config", "secret", pod])
            .args(mesh.args())
            .output()
            .expect("proxy-config");
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        text.lines()
            .find(|l| l.starts_with("default "))
            .and_then(|l| l.split_whitespace().nth(5))
            .unwrap_or_else(|| panic!("no certificate: {text}"))
            .to_string()
    };
    let (client0, server0) = (serial("client"), serial("server"));
    // SECRET_TTL 16 s: both renew about 8 s in, while requests keep flowing.
    let start = Instant::now();
    let mut sent = 0;
    while start.elapsed() < Duration::from_secs(12) {
        let (ok, out) = mesh.get("client", "http://server:8080/", &[]);
        assert!(ok, "request failed during rotation: {out}");
        sent += 1;
        std::thread::sleep(Duration::from_millis(300));
    }
    assert!(sent > 20);
    assert_ne!(serial("client"), client0, "client certificate not renewed");
    assert_ne!(serial("server"), server0, "server certificate not renewed");
    let (ok, out) = mesh.get("client", "http://server:8080/", &[]);
    assert!(
        ok && out.contains("Identity=spiffe://cluster.local/ns/rot/sa/default"),
        "{out}"
    );
    // The client pod's own `proxyHeaders`: its name for the server, no attempt count.
    assert!(out.contains("ResponseHeader=server:rot-client"), "{out}");
    assert!(!out.contains("x-envoy-attempt-count"), "{out}");
}

#[test]
fn logs_exec_and_down_after_a_supervisor_crash_leave_nothing_behind() {
    if !is_root() {
        eprintln!("skipped: needs root");
        return;
    }
    let mesh = Mesh::up("crash", LOCALHOST, &[]);
    let logs = |args: &[&str]| {
        let out = Command::new(BIN)
            .arg("logs")
            .args(args)
            .args(mesh.args())
            .output()
            .expect("isthmus logs");
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    assert!(logs(&["podip"]).contains("echo listening on"), "app log");
    assert!(
        logs(&["podip", "-c", "istio-proxy"]).contains("workload certificate issued"),
        "proxy log"
    );
    let out = mesh.exec("podip", &["ip", "-o", "addr", "show", "eth0"]);
    assert!(String::from_utf8_lossy(&out.stdout).contains(&mesh.pod_ip("podip")));

    // The supervisor dies without cleaning up; `down` still removes everything it made.
    let state: serde_json::Value =
        serde_json::from_slice(&std::fs::read(mesh.state.join("state.json")).unwrap()).unwrap();
    let pids: Vec<u64> = mesh.status()["pods"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|p| p["containers"].as_array().unwrap().clone())
        .filter_map(|c| c["pid"].as_u64())
        .collect();
    let netns: Vec<String> = state["netns"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n.as_str().unwrap().to_string())
        .collect();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(state["supervisor_pid"].as_u64().unwrap() as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    std::thread::sleep(Duration::from_millis(200));
    let out = Command::new(BIN)
        .arg("down")
        .args(mesh.args())
        .output()
        .expect("isthmus down");
    assert!(out.status.success());
    let listed = String::from_utf8_lossy(
        &Command::new("ip")
            .args(["netns", "list"])
            .output()
            .unwrap()
            .stdout,
    )
    .into_owned();
    for ns in &netns {
        assert!(!listed.contains(ns.as_str()), "{ns} left behind");
        assert!(!std::path::Path::new(&format!("/etc/netns/{ns}")).exists());
    }
    std::thread::sleep(Duration::from_millis(200));
    for pid in pids {
        let alive =
            std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| !s.contains(") Z "));
        assert!(!alive, "process {pid} left behind");
    }
    assert!(!mesh.state.exists(), "state directory left behind");
}

const TCP_SHIFT: &str = r#"
apiVersion: v1
kind: Namespace
metadata: {name: ts, labels: {istio-injection: enabled}}
---
apiVersion: v1
kind: Service
metadata: {name: shift, namespace: ts}
spec:
  selector: {app: shift}
  ports: [{name: tcp, port: 7000}]
---
apiVersion: v1
kind: Pod
metadata: {name: shift-v1, namespace: ts, labels: {app: shift, version: v1}}
spec:
  containers:
  - name: shift
    command: [isthmus, echo, --tcp, --server-first, --port, "7000"]
---
apiVersion: v1
kind: Pod
metadata: {name: shift-v2, namespace: ts, labels: {app: shift, version: v2}}
spec:
  containers:
  - name: shift
    command: [isthmus, echo, --tcp, --server-first, --port, "7000"]
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: shift, namespace: ts}
spec:
  host: shift
  subsets:
  - {name: v1, labels: {version: v1}}
  - {name: v2, labels: {version: v2}}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: shift, namespace: ts}
spec:
  hosts: [shift]
  tcp:
  - match: [{sourceLabels: {app: canary}}]
    route: [{destination: {host: shift, subset: v2}}]
  - route:
    - {destination: {host: shift, subset: v1}, weight: 50}
    - {destination: {host: shift, subset: v2}, weight: 50}
---
apiVersion: v1
kind: Service
metadata: {name: web, namespace: ts}
spec:
  selector: {app: web}
  ports: [{name: http, port: 8080}]
---
apiVersion: v1
kind: Pod
metadata: {name: web, namespace: ts, labels: {app: web}}
spec:
  containers:
  - name: web
    command: [isthmus, echo, --port, "8080"]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: web, namespace: ts}
spec:
  hosts: [web]
  http:
  - match: [{uri: {prefix: /old}}]
    redirect: {uri: /new, scheme: https}
  - headers:
      request:
        set: {x-route: web-default}
        remove: [x-secret]
      response:
        add: {x-served-by: mesh}
    corsPolicy:
      allowOrigins: [{exact: "https://app.example.com"}]
      allowMethods: [GET, PUT]
      allowHeaders: [x-custom]
      exposeHeaders: [x-served-by]
      maxAge: 1h
    route:
    - destination: {host: web}
      headers:
        request: {add: {x-destination: web}}
---
apiVersion: v1
kind: Pod
metadata: {name: client, namespace: ts, labels: {app: client}}
spec:
  containers:
  - name: client
    command: [sleep, "3600"]
---
apiVersion: v1
kind: Pod
metadata: {name: canary, namespace: ts, labels: {app: canary}}
spec:
  containers:
  - name: canary
    command: [sleep, "3600"]
"#;

/// Istio's TCP traffic shifting through both sidecars: a VirtualService's `tcp` routes split
/// a workload's connections by weight, and send another workload's (`sourceLabels`) to one
/// subset; the server-first greeting comes through the metadata exchange untouched. And an
/// HTTP VirtualService's header operations.
#[test]
fn tcp_routes_split_connections_and_follow_their_sources_and_http_routes_edit_headers_and_answer_cors()
 {
    if !is_root() {
        eprintln!("skipped: needs root");
        return;
    }
    let mesh = Mesh::up("ts", TCP_SHIFT, &[]);
    let (ok, out) = mesh.get(
        "client",
        "tcp-server-first://shift:7000",
        &["--count", "24"],
    );
    // Each of 24 connections to either subset at even odds: both answer but once in
    // 8 million runs.
    assert!(ok, "{out}");
    assert!(
        out.contains("Hostname=shift-v1") && out.contains("Hostname=shift-v2"),
        "{out}"
    );
    let (ok, out) = mesh.get("canary", "tcp-server-first://shift:7000", &["--count", "8"]);
    assert!(
        ok && out.contains("Hostname=shift-v2") && !out.contains("Hostname=shift-v1"),
        "{out}"
    );
    // A VirtualService's header operations, the route's and its destination's: set over
    // the caller's value, removed, added.
    let (ok, out) = mesh.get(
        "client",
        "http://web:8080/",
        &["-H", "x-route: mine", "-H", "x-secret: s3cret"],
    );
    assert!(ok, "{out}");
    assert!(
        out.contains("RequestHeader=x-route:web-default")
            && !out.contains("RequestHeader=x-route:mine")
            && !out.contains("s3cret")
            && out.contains("RequestHeader=x-destination:web"),
        "{out}"
    );
    assert!(
        out.to_lowercase()
            .contains("responseheader=x-served-by:mesh"),
        "{out}"
    );
    // A redirect, by the client's sidecar: to https, the request's port kept (not http's).
    let (_, out) = mesh.get("client", "http://web:8080/old?q=1", &[]);
    assert!(
        out.contains("StatusCode=301")
            && out.contains("ResponseHeader=location:https://web:8080/new?q=1"),
        "{out}"
    );
    // The VirtualService's `corsPolicy`: a preflight from the allowed origin is answered by
    // the client's sidecar (the app never sees it), ...
    let preflight = |origin: &str| {
        mesh.get(
            "client",
            "http://web:8080/",
            &[
                "--method",
                "OPTIONS",
                "-H",
                &format!("origin: {origin}"),
                "-H",
                "access-control-request-method: PUT",
            ],
        )
    };
    let (ok, out) = preflight("https://app.example.com");
    let lower = out.to_lowercase();
    assert!(
        ok && lower.contains("responseheader=access-control-allow-origin:https://app.example.com")
            && lower.contains("responseheader=access-control-allow-methods:get,put")
            && lower.contains("responseheader=access-control-allow-headers:x-custom")
            && lower.contains("responseheader=access-control-max-age:3600")
            && !out.contains("Hostname="),
        "{out}"
    );
    // ... one from another origin goes on to the app, without the allow headers ...
    let (ok, out) = preflight("https://elsewhere.example");
    assert!(
        ok && out.contains("Method=OPTIONS") && !out.contains("access-control-allow"),
        "{out}"
    );
    // ... and the app's answers to the allowed origin carry them.
    let (ok, out) = mesh.get(
        "client",
        "http://web:8080/",
        &["-H", "origin: https://app.example.com"],
    );
    let lower = out.to_lowercase();
    assert!(
        ok && out.contains("Hostname=web")
            && lower.contains("responseheader=access-control-allow-origin:https://app.example.com")
            && lower.contains("responseheader=access-control-expose-headers:x-served-by"),
        "{out}"
    );
}

const SNIFFING: &str = r#"
apiVersion: v1
kind: Namespace
metadata: {name: sn, labels: {istio-injection: enabled}}
---
apiVersion: v1
kind: Service
metadata: {name: web, namespace: sn}
spec:
  selector: {app: web}
  ports: [{port: 8080}]
---
apiVersion: v1
kind: Pod
metadata: {name: web, namespace: sn, labels: {app: web}}
spec:
  containers:
  - name: web
    command: [isthmus, echo, --port, "8080"]
---
apiVersion: v1
kind: Service
metadata: {name: raw, namespace: sn}
spec:
  selector: {app: raw}
  ports: [{port: 9000}]
---
apiVersion: v1
kind: Pod
metadata: {name: raw, namespace: sn, labels: {app: raw}}
spec:
  containers:
  - name: raw
    command: [isthmus, echo, --tcp, --port, "9000"]
---
apiVersion: v1
kind: Service
metadata: {name: mysql, namespace: sn}
spec:
  selector: {app: mysql}
  ports: [{port: 3306}]
---
apiVersion: v1
kind: Pod
metadata: {name: mysql, namespace: sn, labels: {app: mysql}}
spec:
  containers:
  - name: mysql
    command: [isthmus, echo, --tcp, --server-first, --port, "3306"]
---
apiVersion: v1
kind: Service
metadata: {name: greet, namespace: sn}
spec:
  selector: {app: greet}
  ports: [{port: 7777}]
---
apiVersion: v1
kind: Pod
metadata: {name: greet, namespace: sn, labels: {app: greet}}
spec:
  containers:
  - name: greet
    command: [isthmus, echo, --tcp, --server-first, --port, "7777"]
---
apiVersion: v1
kind: Pod
metadata: {name: client, namespace: sn, labels: {app: client}}
spec:
  containers:
  - name: client
    command: [sleep, "3600"]
"#;

#[test]
fn undeclared_ports_are_sniffed_and_server_first_ports_are_tcp() {
    if !is_root() {
        eprintln!("skipped: needs root");
        return;
    }
    let mesh = Mesh::up("sn", SNIFFING, &[]);
    // An unnamed port carrying HTTP is routed as HTTP on both sides: the server's sidecar
    // adds the caller's identity, which only its HTTP connection manager does.
    let (ok, out) = mesh.get("client", "http://web:8080/", &["--count", "2"]);
    assert!(ok && out.contains("2 succeeded"), "{out}");
    assert!(
        out.contains("Identity=spiffe://cluster.local/ns/sn/sa/default"),
        "{out}"
    );
    // The same kind of port carrying other bytes is passed through as TCP.
    let (ok, out) = mesh.get("client", "tcp://raw:9000", &["--count", "2"]);
    assert!(ok && out.contains("2 succeeded"), "{out}");
    // 3306 is one of Istio's server-first ports: TCP without waiting to sniff, so the
    // server's greeting arrives.
    let (ok, out) = mesh.get("client", "tcp://mysql:3306", &[]);
    assert!(ok && out.contains("Hostname=mysql"), "{out}");
    // A server-first protocol on an undeclared port waits for the client forever when
    // detection has no timeout (Istio's default)…
    let (ok, out) = mesh.get("client", "tcp-server-first://greet:7777", &[]);
    assert!(!ok && out.contains("no answer within"), "{out}");
    drop(mesh);
    // …and with MeshConfig protocolDetectionTimeout the sidecar stalls, then goes TCP.
    let mesh = Mesh::up_with_mesh("st", SNIFFING, "protocolDetectionTimeout: 500ms\n");
    let (ok, out) = mesh.get("client", "tcp-server-first://greet:7777", &[]);
    assert!(ok && out.contains("Hostname=greet"), "{out}");
}

#[test]
fn request_authentication_verifies_tokens_and_authorization_uses_their_principal() {
    if !is_root() {
        eprintln!("skipped: needs root");
        return;
    }
    use isthmus_testkit::jwt::Issuer;
    let issuer = Issuer::new("https://auth.example.com", "k1");
    let yaml = format!(
        r#"
apiVersion: v1
kind: Namespace
metadata: {{name: jwt, labels: {{istio-injection: enabled}}}}
---
apiVersion: v1
kind: Service
metadata: {{name: api, namespace: jwt}}
spec:
  selector: {{app: api}}
  ports: [{{name: http, port: 8080}}]
---
apiVersion: v1
kind: Pod
metadata: {{name: api, namespace: jwt, labels: {{app: api}}}}
spec:
  containers:
  - name: api
    command: [isthmus, echo, --port, "8080"]
---
apiVersion: v1
kind: Pod
metadata: {{name: client, namespace: jwt, labels: {{app: client}}}}
spec:
  containers:
  - name: client
    command: [sleep, "3600"]
---
apiVersion: security.istio.io/v1
kind: RequestAuthentication
metadata: {{name: api, namespace: jwt}}
spec:
  selector: {{matchLabels: {{app: api}}}}
  jwtRules:
  - issuer: https://auth.example.com
    audiences: [api]
    jwks: '{jwks}'
    outputClaimToHeaders: [{{header: x-user, claim: sub}}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {{name: api, namespace: jwt}}
spec:
  selector: {{matchLabels: {{app: api}}}}
  rules:
  - from: [{{source: {{requestPrincipals: [https://auth.example.com/alice]}}}}]
"#,
        jwks = issuer.jwks()
    );
    let mesh = Mesh::up("jw", &yaml, &[]);
    let header = |token: &str| format!("Authorization: Bearer {token}");
    // A verified token of the allowed principal: through, without the token, with its claim.
    let alice = issuer.token(serde_json::json!({"sub": "alice", "aud": "api"}));
    let (ok, out) = mesh.get("client", "http://api:8080/", &["-H", &header(&alice)]);
    assert!(ok, "{out}");
    assert!(out.contains("RequestHeader=x-user:alice"), "{out}");
    assert!(
        !out.to_ascii_lowercase().contains("authorization:"),
        "{out}"
    );
    // A verified token of another principal, and no token at all: authorization says no.
    let bob = issuer.token(serde_json::json!({"sub": "bob", "aud": "api"}));
    for extra in [vec!["-H".to_string(), header(&bob)], vec![]] {
        let extra: Vec<&str> = extra.iter().map(String::as_str).collect();
        let (ok, out) = mesh.get("client", "http://api:8080/", &extra);
        assert!(!ok && out.contains("StatusCode=403"), "{out}");
        assert!(out.contains("RBAC: access denied"), "{out}");
    }
    // A token that does not verify never reaches authorization: 401 with Envoy's reason.
    let forged = Issuer::new("https://auth.example.com", "k1")
        .token(serde_json::json!({"sub": "alice", "aud": "api"}));
    let (ok, out) = mesh.get("client", "http://api:8080/", &["-H", &header(&forged)]);
    assert!(!ok && out.contains("StatusCode=401"), "{out}");
    assert!(out.contains("Jwt verification fails"), "{out}");
    let wrong_audience = issuer.token(serde_json::json!({"sub": "alice", "aud": "web"}));
    let (ok, out) = mesh.get(
        "client",
        "http://api:8080/",
        &["-H", &header(&wrong_audience)],
    );
    assert!(
        !ok && out.contains("Audiences in Jwt are not allowed"),
        "{out}"
    );
}

#[test]
fn tproxy_interception_shows_the_app_the_callers_own_address() {
    if !is_root() {
        eprintln!("skipped: needs root");
        return;
    }
    let yaml = r#"
apiVersion: v1
kind: Namespace
metadata: {name: tp, labels: {istio-injection: enabled}}
---
apiVersion: v1
kind: Service
metadata: {name: tproxy, namespace: tp}
spec:
  selector: {app: tproxy}
  ports: [{name: http, port: 8080}, {name: tcp, port: 7000}]
---
apiVersion: v1
kind: Pod
metadata:
  name: tproxy
  namespace: tp
  labels: {app: tproxy}
  annotations: {sidecar.istio.io/interceptionMode: TPROXY}
spec:
  containers:
  - name: http
    command: [isthmus, echo, --port, "8080"]
  - name: tcp
    command: [isthmus, echo, --tcp, --port, "7000"]
---
apiVersion: v1
kind: Service
metadata: {name: redirect, namespace: tp}
spec:
  selector: {app: redirect}
  ports: [{name: http, port: 8080}]
---
apiVersion: v1
kind: Pod
metadata: {name: redirect, namespace: tp, labels: {app: redirect}}
spec:
  containers:
  - name: http
    command: [isthmus, echo, --port, "8080"]
---
apiVersion: v1
kind: Pod
metadata: {name: client, namespace: tp, labels: {app: client}}
spec:
  containers:
  - name: client
    command: [sleep, "3600"]
"#;
    let mesh = Mesh::up("tp", yaml, &[]);
    let client_ip = mesh.pod_ip("client");
    // TPROXY: the app sees the calling pod's address, over mTLS between the sidecars…
    let (ok, out) = mesh.get("client", "http://tproxy:8080/", &["--count", "3"]);
    assert!(ok, "{out}");
    assert!(out.contains(&format!("IP={client_ip}\n")), "{out}");
    assert!(
        out.contains("Identity=spiffe://cluster.local/ns/tp/sa/default"),
        "{out}"
    );
    // …and opaque TCP gets through both ways.
    let (ok, out) = mesh.get("client", "tcp://tproxy:7000", &[]);
    assert!(out.contains("1 succeeded"), "{ok} {out}");
    // REDIRECT: the app sees the proxy's 127.0.0.6, as in Istio.
    let (ok, out) = mesh.get("client", "http://redirect:8080/", &[]);
    assert!(ok, "{out}");
    assert!(out.contains("IP=127.0.0.6\n"), "{out}");
}

/// A namespace `ns` with injection, an echo `server` behind a Service, and a `client` pod:
/// the apps of the tracing tests.
fn traced_apps(ns: &str) -> String {
    format!(
        r#"apiVersion: v1
kind: Namespace
metadata: {{name: {ns}, labels: {{istio-injection: enabled}}}}
---
apiVersion: v1
kind: Service
metadata: {{name: server, namespace: {ns}}}
spec:
  selector: {{app: server}}
  ports: [{{name: http, port: 8080}}]
---
apiVersion: v1
kind: Pod
metadata: {{name: server, namespace: {ns}, labels: {{app: server}}}}
spec:
  containers:
  - name: server
    command: [isthmus, echo, --port, "8080"]
---
apiVersion: v1
kind: Pod
metadata: {{name: client, namespace: {ns}, labels: {{app: client}}}}
spec:
  containers:
  - name: client
    command: [sleep, "3600"]
"#
    )
}

const TRACING: &str = r#"
apiVersion: v1
kind: Namespace
metadata: {name: istio-system}
---
apiVersion: v1
kind: Service
metadata: {name: zipkin, namespace: istio-system}
spec:
  selector: {app: zipkin}
  ports: [{name: http-query, port: 9411}]
---
apiVersion: v1
kind: Pod
metadata: {name: zipkin, namespace: istio-system, labels: {app: zipkin}}
spec:
  containers:
  - name: zipkin
    command: [isthmus, echo, --port, "9411"]
---
apiVersion: telemetry.istio.io/v1
kind: Telemetry
metadata: {name: mesh-default, namespace: istio-system}
spec:
  tracing:
  - providers: [{name: zipkin}]
    randomSamplingPercentage: 100
---
apiVersion: telemetry.istio.io/v1
kind: Telemetry
metadata: {name: errors, namespace: tr}
spec:
  accessLogging:
  - providers: [{name: envoy}]
    match: {mode: SERVER}
    filter: {expression: "response.code >= 400"}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: deny-path, namespace: tr}
spec:
  selector: {matchLabels: {app: server}}
  action: DENY
  rules: [{to: [{operation: {paths: ["/deny"]}}]}]
"#;

#[test]
fn traced_requests_carry_b3_context_through_both_sidecars_and_spans_reach_zipkin() {
    // Also: Telemetry access logs, server side, errors only.
    if !is_root() {
        eprintln!("skipped: needs root");
        return;
    }
    let mesh = Mesh::up_with_mesh(
        "tr",
        &format!("{}---\n{TRACING}", traced_apps("tr")),
        "extensionProviders:\n- name: zipkin\n  zipkin: {service: zipkin.istio-system.svc.cluster.local, port: 9411}\n",
    );
    let (ok, out) = mesh.get("client", "http://server:8080/", &["--count", "5"]);
    assert!(ok && out.contains("5 succeeded"), "{out}");
    // The app behind the server's sidecar sees one trace, sampled, whose parent is the
    // client sidecar's span and whose span is the server sidecar's.
    let header = |i: usize, name: &str| {
        let prefix = format!("[{i} body] RequestHeader={name}:");
        out.lines()
            .find_map(|l| l.strip_prefix(&prefix))
            .unwrap_or_else(|| panic!("no {name} in {out}"))
            .to_string()
    };
    for i in 0..5 {
        assert_eq!(header(i, "x-b3-traceid").len(), 32, "{out}");
        assert_eq!(header(i, "x-b3-sampled"), "1", "{out}");
        assert_ne!(header(i, "x-b3-spanid"), header(i, "x-b3-parentspanid"));
    }
    assert_ne!(header(0, "x-b3-traceid"), header(1, "x-b3-traceid"));
    // Each sidecar sent its five spans to the collector in one report (Envoy's
    // min_flush_spans).
    for pod in ["client", "server"] {
        let stats = mesh.stats_until(pod, "tracing.zipkin", "tracing.zipkin.spans_sent: 5");
        assert!(
            stats.contains("tracing.zipkin.reports_sent: 1"),
            "{pod}: {stats}"
        );
        assert!(
            stats.contains("tracing.zipkin.spans_sent: 5"),
            "{pod}: {stats}"
        );
    }
    // The server's sidecar logs the request its policy refused, and not those it passed.
    let (ok, out) = mesh.get("client", "http://server:8080/deny", &[]);
    assert!(!ok && out.contains("StatusCode=403"), "{out}");
    let mut log = String::new();
    for _ in 0..50 {
        log = mesh.proxy_log("server");
        if log.contains("\"GET /deny HTTP/1.1\" 403") {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    assert!(log.contains("\"GET /deny HTTP/1.1\" 403"), "{log}");
    assert!(!log.contains("\"GET / HTTP/1.1\" 200"), "{log}");
}

const OTEL: &str = r#"
apiVersion: v1
kind: Namespace
metadata: {name: observability}
---
apiVersion: v1
kind: Service
metadata: {name: otel-collector, namespace: observability}
spec:
  selector: {app: otel}
  ports: [{name: grpc-otlp, port: 4317}, {name: http-otlp, port: 4318}]
---
apiVersion: v1
kind: Pod
metadata: {name: otel, namespace: observability, labels: {app: otel}}
spec:
  containers:
  - name: otel
    command: [isthmus, echo, --port, "4318", --grpc-port, "4317"]
---
apiVersion: telemetry.istio.io/v1
kind: Telemetry
metadata: {name: mesh-default, namespace: istio-system}
spec:
  tracing:
  - providers: [{name: otel}]
    randomSamplingPercentage: 100
"#;

/// Istio's metrics: none on the client side, and on the server's request count a label from
/// the request in place of `request_protocol`, its durations dropped.
const METRIC_OVERRIDES: &str = r#"
apiVersion: telemetry.istio.io/v1
kind: Telemetry
metadata: {name: metrics, namespace: ot}
spec:
  metrics:
  - overrides:
    - match: {metric: ALL_METRICS, mode: CLIENT}
      disabled: true
    - match: {metric: REQUEST_COUNT, mode: SERVER}
      tagOverrides:
        request_host: {value: request.host}
        request_protocol: {operation: REMOVE}
    - match: {metric: REQUEST_DURATION, mode: SERVER}
      disabled: true
"#;

#[test]
fn opentelemetry_traces_reach_the_collector_and_telemetry_overrides_shape_istio_metrics() {
    if !is_root() {
        eprintln!("skipped: needs root");
        return;
    }
    let mesh = Mesh::up_with_mesh(
        "ot",
        &format!("{}---\n{OTEL}---\n{METRIC_OVERRIDES}", traced_apps("ot")),
        "extensionProviders:\n- name: otel\n  opentelemetry:\n    service: otel-collector.observability.svc.cluster.local\n    port: 4318\n    http: {path: /v1/traces, timeout: 2s}\n",
    );
    let (ok, out) = mesh.get("client", "http://server:8080/", &["--count", "5"]);
    assert!(ok && out.contains("5 succeeded"), "{out}");
    // W3C context, sampled, and no B3.
    assert!(
        out.contains("RequestHeader=traceparent:00-") && out.contains("-01\n"),
        "{out}"
    );
    assert!(!out.contains("x-b3-traceid"), "{out}");
    let stats = mesh.stats_until("client", "tracing", "tracing.opentelemetry.spans_sent: 5");
    assert!(
        stats.contains("tracing.opentelemetry.http_reports_sent: 1"),
        "{stats}"
    );
    assert!(
        stats.contains("tracing.opentelemetry.spans_sent: 5"),
        "{stats}"
    );
    // The Telemetry's metric overrides, through the pilot to both sidecars.
    let server = mesh.pod_ip("server");
    let (_, metrics) = mesh.get(
        "client",
        &format!("http://{server}:15090/stats/prometheus"),
        &[],
    );
    let requests: Vec<&str> = metrics
        .lines()
        .filter(|l| l.contains("] istio_requests_total{"))
        .collect();
    assert_eq!(requests.len(), 1, "{metrics}");
    assert!(
        requests[0].contains("reporter=\"destination\"")
            && requests[0].contains("request_host=\"server:8080\"")
            // Istio's canonical labels, the caller's through its peer metadata.
            && requests[0].contains("source_canonical_service=\"client\"")
            && requests[0].contains("source_canonical_revision=\"latest\"")
            && requests[0].contains("destination_canonical_service=\"server\"")
            && !requests[0].contains("request_protocol=")
            && requests[0].ends_with(" 5"),
        "{}",
        requests[0]
    );
    assert!(
        !metrics.contains("istio_request_duration_milliseconds_count{"),
        "{metrics}"
    );
    assert!(metrics.contains("istio_request_bytes_count{"), "{metrics}");
    let (_, own) = mesh.get("client", "http://127.0.0.1:15090/stats/prometheus", &[]);
    assert!(
        own.contains("envoy_") && !own.contains("istio_requests_total"),
        "{own}"
    );
}

const DNS: &str = r#"
apiVersion: v1
kind: Namespace
metadata: {name: dns, labels: {istio-injection: enabled}}
---
apiVersion: v1
kind: Pod
metadata: {name: web, namespace: dns, labels: {app: web}}
spec:
  containers:
  - name: web
    command: [isthmus, echo, --port, "8080"]
    securityContext: {runAsUser: 1000}
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: api, namespace: dns}
spec:
  hosts: [api.example.test]
  addresses: [240.240.0.1]
  ports: [{number: 80, name: http, protocol: HTTP, targetPort: 8080}]
  location: MESH_INTERNAL
  resolution: STATIC
  workloadSelector: {labels: {app: web}}
---
apiVersion: v1
kind: Pod
metadata:
  name: client
  namespace: dns
  labels: {app: client}
  annotations:
    proxy.istio.io/config: '{"proxyMetadata": {"ISTIO_META_DNS_CAPTURE": "true", "ISTIO_META_DNS_AUTO_ALLOCATE": "true"}}'
spec:
  containers:
  - name: client
    command: [sleep, "3600"]
---
apiVersion: v1
kind: Pod
metadata: {name: tcp, namespace: dns, labels: {app: tcp}}
spec:
  containers:
  - name: tcp
    command: [isthmus, echo, --tcp, --port, "7000"]
    securityContext: {runAsUser: 1000}
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: db, namespace: dns}
spec:
  hosts: [db.example.test]
  ports: [{number: 7000, name: tcp, protocol: TCP}]
  location: MESH_INTERNAL
  resolution: STATIC
  workloadSelector: {labels: {app: tcp}}
---
apiVersion: v1
kind: Pod
metadata: {name: plain, namespace: dns, labels: {app: plain}}
spec:
  containers:
  - name: plain
    command: [sleep, "3600"]
"#;

/// Istio's DNS proxying: with `ISTIO_META_DNS_CAPTURE`, the pod's DNS queries are captured to
/// its agent, which answers a ServiceEntry's host that no DNS server knows with its address
/// (or, with `ISTIO_META_DNS_AUTO_ALLOCATE`, the one allocated to it); the request to it then
/// goes through the sidecar to the entry's workload. Without it, the name does not resolve.
#[test]
fn dns_capture_resolves_service_entry_hosts_in_the_pod() {
    if !is_root() {
        eprintln!("skipped: needs root");
        return;
    }
    let mesh = Mesh::up("dns", DNS, &[]);
    let resolve = |pod: &str, name: &str| {
        let out = mesh.exec(pod, &["getent", "ahostsv4", name]);
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
        )
    };
    let (ok, out) = resolve("client", "api.example.test");
    assert!(ok && out.starts_with("240.240.0.1 "), "{out}");
    let (ok, out) = mesh.get("client", "http://api.example.test/", &[]);
    assert!(ok && out.contains("Hostname=web"), "{out}");
    // A TCP entry without addresses: with DNS_AUTO_ALLOCATE, the agent answers with the one
    // allocated to it, on which the sidecar has the entry's listener.
    let (ok, out) = resolve("client", "db.example.test");
    assert!(ok && out.starts_with("240.240."), "{out}");
    let (ok, out) = mesh.get("client", "tcp://db.example.test:7000", &[]);
    assert!(ok, "{out}");
    // A name the table does not hold goes to the pod's nameserver, which is not there.
    let (ok, out) = resolve("client", "nowhere.invalid");
    assert!(!ok, "{out}");
    let (ok, out) = resolve("plain", "api.example.test");
    assert!(!ok, "resolved without DNS capture: {out}");
    // The agent counts what it answered and what it forwarded, with Istio's names.
    let (_, agent) = mesh.get("client", "http://127.0.0.1:15020/stats/prometheus", &[]);
    let count = |name: &str| -> u64 {
        agent
            .lines()
            .find_map(|l| l.strip_prefix(&format!("[0 body] {name} ")))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or_else(|| panic!("no {name} in {agent}"))
    };
    assert!(count("istio_agent_dns_requests_total") >= 3, "{agent}");
    assert!(
        count("istio_agent_dns_upstream_requests_total") >= 1,
        "{agent}"
    );
    // …and how long the forwarded queries took, in Istio's buckets.
    assert!(
        count("istio_agent_dns_upstream_request_duration_seconds_count") >= 1,
        "{agent}"
    );
    assert!(
        agent.contains("istio_agent_dns_upstream_request_duration_seconds_bucket{le=\"0.005\"}"),
        "{agent}"
    );
}
