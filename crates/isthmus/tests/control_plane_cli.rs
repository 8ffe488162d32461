//! `isthmus control-plane` and `isthmus proxy-status` as processes: a real ADS client connects,
//! ACKs clusters, and proxy-status shows it in istioctl's table; `isthmus proxy` refuses a
//! ProxyConfig it cannot read.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use envoy_types::pb::envoy::config::core::v3::Node;
use envoy_types::pb::envoy::service::discovery::v3::DiscoveryRequest;
use envoy_types::pb::envoy::service::discovery::v3::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

const BIN: &str = env!("CARGO_BIN_EXE_isthmus");
const CDS: &str = "type.googleapis.com/envoy.config.cluster.v3.Cluster";

/// Kills the control plane when the test ends, however it ends.
struct Proc(Child);
impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts the control plane on free loopback ports; returns it with its xDS and HTTP addresses.
fn control_plane(dir: &std::path::Path) -> (Proc, String, String) {
    let mut child = Command::new(BIN)
        .args(["control-plane", "--config-dir"])
        .arg(dir)
        .args(["--xds-addr", "127.0.0.1:0", "--http-addr", "127.0.0.1:0"])
        .env("RUST_LOG", "info")
        .env("NO_COLOR", "1")
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn control plane");
    let stderr = child.stderr.take().unwrap();
    let proc = Proc(child);
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    loop {
        let line = rx
            .recv_timeout(Duration::from_secs(20))
            .expect("control plane started");
        if line.contains("control plane serving") {
            let field = |k: &str| {
                let at = line.find(&format!("{k}=")).unwrap() + k.len() + 1;
                line[at..]
                    .split_whitespace()
                    .next()
                    .unwrap()
                    .trim_matches(|c: char| !c.is_ascii_alphanumeric() && c != '.' && c != ':')
                    .to_string()
            };
            return (proc, field("xds"), field("http"));
        }
    }
}

#[tokio::test]
async fn proxy_status_shows_a_connected_proxy() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("mesh.yaml"),
        "apiVersion: v1\nkind: Service\nmetadata: {name: reviews, namespace: default}\nspec:\n  clusterIP: 10.96.0.11\n  ports: [{name: http, port: 9080}]\n",
    )
    .unwrap();
    let (_cp, xds, http) = control_plane(dir.path());

    let mut client = AggregatedDiscoveryServiceClient::connect(format!("http://{xds}"))
        .await
        .unwrap();
    let (tx, rx) = mpsc::channel(4);
    let mut stream = client
        .stream_aggregated_resources(ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    use envoy_types::pb::google::protobuf::{Struct, Value, value::Kind};
    let text = |s: &str| Value {
        kind: Some(Kind::StringValue(s.into())),
    };
    let node = Node {
        id: "sidecar~10.1.0.5~sleep-0.default~default.svc.cluster.local".into(),
        metadata: Some(Struct {
            fields: [
                ("CLUSTER_ID".to_string(), text("east")),
                ("ISTIO_VERSION".to_string(), text("1.24.2")),
            ]
            .into_iter()
            .collect(),
        }),
        ..Default::default()
    };
    tx.send(DiscoveryRequest {
        node: Some(node),
        type_url: CDS.into(),
        ..Default::default()
    })
    .await
    .unwrap();
    let cds = tokio::time::timeout(Duration::from_secs(10), stream.message())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    tx.send(DiscoveryRequest {
        type_url: CDS.into(),
        response_nonce: cds.nonce,
        version_info: cds.version_info,
        ..Default::default()
    })
    .await
    .unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;

    let out = Command::new(BIN)
        .args(["proxy-status", "--control-plane", &http])
        .output()
        .unwrap();
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{table} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut lines = table.lines();
    assert!(lines.next().unwrap().starts_with("NAME"), "{table}");
    let row = lines.next().unwrap();
    assert!(row.starts_with("sleep-0.default"), "{table}");
    let cols: Vec<&str> = row
        .split("     ")
        .map(str::trim)
        .filter(|c| !c.is_empty())
        .collect();
    assert_eq!(cols[2], "SYNCED", "{table}");
    assert_eq!(cols[3], "NOT SENT", "{table}");
    // The proxy's cluster and version, as its node reported them.
    assert_eq!(cols[1], "east", "{table}");
    assert_eq!(cols.last(), Some(&"1.24.2"), "{table}");

    let clusters = Command::new(BIN)
        .args([
            "proxy-config",
            "cluster",
            "sleep-0.default",
            "--control-plane",
            &http,
        ])
        .output()
        .unwrap();
    let clusters = String::from_utf8_lossy(&clusters.stdout);
    assert!(clusters.starts_with("SERVICE FQDN"), "{clusters}");
    let row = clusters
        .lines()
        .find(|l| l.starts_with("reviews.default.svc.cluster.local"))
        .unwrap_or_else(|| panic!("{clusters}"));
    assert!(
        row.contains("9080") && row.contains("outbound") && row.contains("EDS"),
        "{row}"
    );
    let listeners = Command::new(BIN)
        .args([
            "proxy-config",
            "listener",
            "sleep-0.default",
            "--control-plane",
            &http,
        ])
        .output()
        .unwrap();
    let listeners = String::from_utf8_lossy(&listeners.stdout);
    assert!(
        listeners.contains("15001") && listeners.contains("     PassthroughCluster"),
        "{listeners}"
    );
    assert!(listeners.contains("Route: 9080"), "{listeners}");

    let missing = Command::new(BIN)
        .args(["proxy-status", "nope.default", "--control-plane", &http])
        .output()
        .unwrap();
    assert!(!missing.status.success());
}

/// The sidecar checks its pod's ProxyConfig before it connects: a field of the wrong shape is
/// named there, not discovered when the control plane refuses the node.
#[test]
fn the_proxy_refuses_a_proxy_config_it_cannot_read() {
    let out = Command::new(BIN)
        .args([
            "proxy",
            "--pod-name",
            "p",
            "--discovery-address",
            "127.0.0.1:9",
        ])
        .args(["--proxy-config", r#"{"proxyHeaders": {"server": "mine"}}"#])
        .env("NO_COLOR", "1")
        .output()
        .expect("run isthmus proxy");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("PROXY_CONFIG is not a valid ProxyConfig")
            && err.contains("expected struct ServerHeader"),
        "{err}"
    );
}
