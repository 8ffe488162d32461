//! `isthmus analyze` as a user runs it: real process, real files, istioctl's exit codes.

use std::io::Write;
use std::process::{Command, Output, Stdio};

const BIN: &str = env!("CARGO_BIN_EXE_isthmus");

const BROKEN: &str = r#"
apiVersion: v1
kind: Namespace
metadata: {name: default, labels: {istio-injection: enabled}}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: reviews, namespace: default}
spec:
  hosts: [reviews]
  http:
  - route:
    - destination: {host: reviews2}
---
apiVersion: v1
kind: Service
metadata: {name: reviews, namespace: default}
spec:
  selector: {app: reviews}
  ports: [{name: web, port: 9080}]
"#;

fn analyze(args: &[&str], stdin: Option<&str>) -> Output {
    let mut child = Command::new(BIN)
        .arg("analyze")
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn isthmus");
    if let Some(s) = stdin {
        child.stdin.take().unwrap().write_all(s.as_bytes()).unwrap();
    }
    drop(child.stdin.take());
    child.wait_with_output().expect("wait")
}

#[test]
fn reports_in_istioctl_format_and_fails_with_79() {
    let out = analyze(&["-"], Some(BROKEN));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(79), "{stdout}");
    assert!(
        stdout.contains(r#"Error [IST0101] (VirtualService default/reviews -:5) Referenced host not found: "reviews2""#),
        "{stdout}"
    );
    assert!(
        stdout.contains("Info [IST0118] (Service default/reviews"),
        "{stdout}"
    );
}

#[test]
fn thresholds_and_suppression() {
    // Only Errors shown; failing only on Errors still fails.
    let out = analyze(&["-", "--output-threshold", "Error"], Some(BROKEN));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(!stdout.contains("IST0118"), "{stdout}");
    // Suppressing the only error: Info left, below the failure threshold.
    let out = analyze(
        &["-", "-S", "IST0101=VirtualService default/*"],
        Some(BROKEN),
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{stdout}");
    assert!(!stdout.contains("IST0101"));
    // Failure threshold Info: the port-name Info fails the run.
    let out = analyze(
        &["-", "-S", "IST0101=*", "--failure-threshold", "Info"],
        Some(BROKEN),
    );
    assert_eq!(out.status.code(), Some(79));
}

#[test]
fn json_output_has_istioctl_fields() {
    let out = analyze(
        &[
            "-",
            "-o",
            "json",
            "--analyzer",
            "virtualservice.DestinationHostAnalyzer",
        ],
        Some(BROKEN),
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    let items = v.as_array().unwrap();
    assert_eq!(items.len(), 1, "{v}");
    assert_eq!(items[0]["code"], "IST0101");
    assert_eq!(items[0]["level"], "Error");
    assert_eq!(items[0]["origin"], "VirtualService default/reviews");
    assert_eq!(
        items[0]["message"],
        "Referenced host not found: \"reviews2\""
    );
}

#[test]
fn parse_errors_are_reported_and_good_documents_still_analyzed() {
    let input = format!(
        "{BROKEN}\n---\napiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {{name: x}}\nspec: {{host: [oops}}\n"
    );
    let out = analyze(&["-"], Some(&input));
    let stderr = String::from_utf8_lossy(&out.stderr);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(65), "{stderr}");
    assert!(stderr.contains("error: -:"), "{stderr}");
    assert!(stderr.contains("document 4"), "{stderr}");
    assert!(stdout.contains("IST0101"), "{stdout}");
}

#[test]
fn usage_errors_and_listing() {
    assert_eq!(
        analyze(&["--analyzer", "nope", "-"], Some(""))
            .status
            .code(),
        Some(64)
    );
    assert_eq!(analyze(&["--bogus-flag"], None).status.code(), Some(64));
    let out = analyze(&["-L"], None);
    let s = String::from_utf8_lossy(&out.stdout);
    assert!(s.contains("* virtualservice.DestinationHostAnalyzer:"));
    assert!(s.contains("schema.ValidationAnalyzer.VirtualService"));
}

#[test]
fn clean_input_exits_zero() {
    let ok = "apiVersion: v1\nkind: Service\nmetadata: {name: a, namespace: istio-system}\nspec: {ports: [{name: http, port: 80}]}\n";
    let out = analyze(&["-"], Some(ok));
    assert_eq!(out.status.code(), Some(0));
    assert!(String::from_utf8_lossy(&out.stderr).contains("No validation issues found"));
}
