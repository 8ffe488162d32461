use isthmus_config::{Kind, Loader, Severity, Snapshot};

const MIXED: &str = r#"apiVersion: v1
kind: Service
metadata:
  name: reviews
  namespace: default
spec:
  selector:
    app: reviews
  ports:
  - name: http
    port: 9080
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata:
  name: broken
spec:
  hosts: [reviews]
  http:
  - timeout: 5x
    route:
    - destination:
        host: reviews
---
apiVersion: networking.istio.io/v1beta1
kind: DestinationRule
metadata:
  name: reviews
spec:
  host: reviews
  trafficPolicy:
    loadBalancr:
      simple: RANDOM
  subsets:
  - name: v1
    labels: {version: v1}
---
apiVersion: example.com/v1
kind: Widget
metadata:
  name: w
---
this is: [not, closed
"#;

#[test]
fn bad_documents_are_reported_and_good_ones_load() {
    let loaded = Loader::default().load_str("mixed.yaml", MIXED);
    for d in &loaded.diagnostics {
        eprintln!("{d}");
    }
    let snap: Snapshot = loaded.resources.iter().cloned().collect();
    assert_eq!(snap.services.len(), 1);
    assert_eq!(snap.destination_rules.len(), 1);
    assert_eq!(snap.virtual_services.len(), 0);

    let err = loaded
        .diagnostics
        .iter()
        .find(|d| d.document == 2)
        .expect("VirtualService error");
    assert_eq!(err.severity, Severity::Error);
    assert_eq!(err.field.as_deref(), Some("spec.http[0].timeout"));
    assert_eq!(err.line, Some(20));
    assert!(err.message.contains("invalid duration"), "{}", err.message);
    assert_eq!(err.resource.as_deref(), Some("VirtualService broken"));

    let warn = loaded
        .diagnostics
        .iter()
        .find(|d| d.document == 3)
        .expect("unknown field warning");
    assert_eq!(warn.severity, Severity::Warning);
    assert_eq!(
        warn.field.as_deref(),
        Some("spec.trafficPolicy.loadBalancr")
    );

    let unknown = loaded.diagnostics.iter().find(|d| d.document == 4).unwrap();
    assert_eq!(unknown.severity, Severity::Warning);
    assert!(unknown.message.contains("Widget"));

    let syntax = loaded.diagnostics.iter().find(|d| d.document == 5).unwrap();
    assert_eq!(syntax.severity, Severity::Error);
    assert!(syntax.line.unwrap() >= 42, "{syntax}");
}

#[test]
fn lists_and_default_namespace() {
    let text = r#"apiVersion: v1
kind: List
items:
- apiVersion: networking.istio.io/v1alpha3
  kind: Gateway
  metadata: {name: a}
  spec: {selector: {istio: ingressgateway}}
- apiVersion: v1
  kind: Namespace
  metadata: {name: foo}
"#;
    let loader = Loader {
        default_namespace: Some("default".into()),
    };
    let loaded = loader.load_str("list.yaml", text);
    assert!(loaded.diagnostics.is_empty(), "{:?}", loaded.diagnostics);
    assert_eq!(loaded.resources.len(), 2);
    assert_eq!(loaded.resources[0].kind(), Kind::Gateway);
    assert_eq!(loaded.resources[0].namespace(), "default");
    // Cluster-scoped kinds get no namespace.
    assert_eq!(loaded.resources[1].namespace(), "");
}

#[test]
fn json_documents_load() {
    let text = r#"{"apiVersion":"security.istio.io/v1","kind":"PeerAuthentication",
      "metadata":{"name":"default","namespace":"istio-system"},
      "spec":{"mtls":{"mode":"STRICT"},"portLevelMtls":{"8080":{"mode":"DISABLE"}}}}"#;
    let loaded = Loader::default().load_str("pa.json", text);
    assert!(loaded.diagnostics.is_empty(), "{:?}", loaded.diagnostics);
    let snap: Snapshot = loaded.resources.into_iter().collect();
    let pa = &snap.peer_authentications[0].object.spec;
    assert_eq!(
        pa.port_mode(8080).and_then(|m| m.mode.as_deref()),
        Some("DISABLE")
    );
}

#[test]
fn unserved_version_is_an_error() {
    let text = "apiVersion: networking.istio.io/v1\nkind: EnvoyFilter\nmetadata: {name: x}\n";
    let loaded = Loader::default().load_str("ef.yaml", text);
    assert!(loaded.has_errors());
    assert!(loaded.diagnostics[0].message.contains("v1alpha3"));
}

#[test]
fn telemetry_metric_overrides_are_typed_and_checked_as_istio_does() {
    let text = r#"apiVersion: telemetry.istio.io/v1
kind: Telemetry
metadata: {name: m, namespace: istio-system}
spec:
  metrics:
  - providers: [{name: prometheus}]
    overrides:
    - match: {metric: REQUEST_COUNT, mode: SERVER}
      tagOverrides:
        request_host: {value: request.host}
        request_protocol: {operation: REMOVE}
    - match: {metric: REQUESTS}
      tagOverrides:
        a: {operation: UPSERT}
        b: {operation: REMOVE, value: x}
"#;
    let loaded = Loader::default().load_str("t.yaml", text);
    assert!(loaded.diagnostics.is_empty(), "{:?}", loaded.diagnostics);
    let report = isthmus_config::validate::validate(&loaded.resources[0].object);
    assert_eq!(report.errors.len(), 3, "{report:?}");
    assert!(report.errors[0].contains("metrics[0].overrides[1]: match.metric \"REQUESTS\""));
    assert!(
        report.errors[1].contains("tagOverrides.a: value must be set when operation is UPSERT")
    );
    assert!(
        report.errors[2].contains("tagOverrides.b: value may only be set when operation is UPSERT")
    );
    let snap: Snapshot = loaded.resources.into_iter().collect();
    let o = &snap.telemetries[0].object.spec.metrics[0].overrides[0];
    assert!(o.tag_overrides["request_protocol"].removes());
    assert_eq!(o.tag_overrides["request_host"].value, "request.host");
}

/// The validation report of VirtualService `web` with one HTTP route to `web` that has
/// `fields` (YAML, indented as the route's).
fn web_route_report(fields: &str) -> isthmus_config::validate::Report {
    let text = format!(
        "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata:\n  name: web\nspec:\n  hosts: [web]\n  http:\n  - route:\n    - destination:\n        host: web\n{fields}"
    );
    let loaded = Loader::default().load_str("vs.yaml", &text);
    assert!(loaded.diagnostics.is_empty(), "{:?}", loaded.diagnostics);
    isthmus_config::validate::validate(&loaded.resources[0].object)
}

#[test]
fn cors_unmatched_preflights_is_one_of_istios_values() {
    let report = |value: &str| {
        web_route_report(&format!(
            "    corsPolicy:\n      allowOrigins:\n      - exact: https://app.example.com\n      unmatchedPreflights: {value}\n"
        ))
    };
    assert!(report("IGNORE").is_valid());
    let bad = report("DROP");
    assert_eq!(bad.errors.len(), 1, "{bad:?}");
    assert!(
        bad.errors[0].contains("unmatchedPreflights \"DROP\" is not one of"),
        "{bad:?}"
    );
}

#[test]
fn the_authority_is_rewritten_in_one_place_only() {
    let report = web_route_report(
        "    headers:\n      request:\n        set: {\":authority\": a.internal}\n        add: {host: b.internal}\n",
    );
    assert_eq!(
        report.errors,
        [
            "authority header cannot be set multiple times: have \"a.internal\", attempting to set \"b.internal\""
        ],
        "{report:?}"
    );
}
