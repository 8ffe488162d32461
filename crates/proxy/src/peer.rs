//! Who is on the other side, for telemetry: this proxy's own workload, and the peer's, learned
//! over HTTP through Istio's metadata-exchange headers (`x-envoy-peer-metadata` is a base64
//! protobuf `Struct`, `x-envoy-peer-metadata-id` the node id) and over mTLS from the certificate.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use envoy_types::pb::google::protobuf::{Struct, Value, value};
use http::HeaderName;
use prost::Message;

// Header names as `HeaderName`s: a `&str` is parsed again on every use.
pub const METADATA: HeaderName = HeaderName::from_static("x-envoy-peer-metadata");
pub const METADATA_ID: HeaderName = HeaderName::from_static("x-envoy-peer-metadata-id");
/// Bound on what is decoded from a peer.
const MAX_METADATA: usize = 8 * 1024;
/// Distinct headers remembered (a proxy talks to a bounded set of peers; past this the memory
/// starts over).
const MAX_REMEMBERED: usize = 256;

/// A workload as Istio's metric labels describe it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct Workload {
    pub name: String,
    pub namespace: String,
    pub app: String,
    pub version: String,
    pub canonical_service: String,
    pub canonical_revision: String,
    pub cluster: String,
}

/// The pod labels Istio's injector sets, from which Istio's canonical labels come.
const CANONICAL_NAME: &str = "service.istio.io/canonical-name";
const CANONICAL_REVISION: &str = "service.istio.io/canonical-revision";

impl Workload {
    /// From pod labels: `app` and `version` (or their `app.kubernetes.io/` forms), and the
    /// canonical service and revision as Istio's injector derives them (the workload's name,
    /// `latest`, when no label says).
    pub fn from_labels(
        name: &str,
        namespace: &str,
        cluster: &str,
        labels: &BTreeMap<String, String>,
    ) -> Workload {
        let first = |keys: &[&str]| {
            keys.iter()
                .find_map(|k| labels.get(*k).cloned())
                .unwrap_or_default()
        };
        let or = |v: String, default: &str| if v.is_empty() { default.to_string() } else { v };
        Workload {
            name: name.to_string(),
            namespace: namespace.to_string(),
            app: first(&["app", "app.kubernetes.io/name"]),
            version: first(&["version", "app.kubernetes.io/version"]),
            canonical_service: or(
                first(&[CANONICAL_NAME, "app.kubernetes.io/name", "app"]),
                name,
            ),
            canonical_revision: or(
                first(&[CANONICAL_REVISION, "app.kubernetes.io/version", "version"]),
                "latest",
            ),
            cluster: cluster.to_string(),
        }
    }

    /// From Istio's `istio.workload` endpoint metadata,
    /// `<name>;<namespace>;<canonical service>;<canonical revision>;<cluster>` (no app or
    /// version: the control plane sends none); None when it is not of that form.
    pub fn from_endpoint_label(label: &str) -> Option<Workload> {
        let mut parts = label.split(';');
        let mut next = || parts.next().map(str::to_string);
        let w = Workload {
            name: next()?,
            namespace: next()?,
            canonical_service: next()?,
            canonical_revision: next()?,
            cluster: next()?,
            ..Workload::default()
        };
        parts.next().is_none().then_some(w)
    }

    /// This workload's metadata as Istio's peer metadata `Struct` (`WORKLOAD_NAME`,
    /// `NAMESPACE`, `CLUSTER_ID`, `LABELS`), which both exchanges carry.
    pub fn to_struct(&self) -> Struct {
        let s = |v: &str| Value {
            kind: Some(value::Kind::StringValue(v.to_string())),
        };
        let mut labels = BTreeMap::new();
        labels.insert("app".to_string(), s(&self.app));
        labels.insert("version".to_string(), s(&self.version));
        labels.insert(CANONICAL_NAME.to_string(), s(&self.canonical_service));
        labels.insert(CANONICAL_REVISION.to_string(), s(&self.canonical_revision));
        let mut fields = BTreeMap::new();
        fields.insert("WORKLOAD_NAME".to_string(), s(&self.name));
        fields.insert("NAMESPACE".to_string(), s(&self.namespace));
        fields.insert("CLUSTER_ID".to_string(), s(&self.cluster));
        fields.insert(
            "LABELS".to_string(),
            Value {
                kind: Some(value::Kind::StructValue(Struct {
                    fields: labels.into_iter().collect(),
                })),
            },
        );
        Struct {
            fields: fields.into_iter().collect(),
        }
    }

    /// A peer's metadata `Struct`; fields it lacks are empty.
    pub fn from_struct(s: &Struct) -> Workload {
        let get = |st: &Struct, k: &str| match st.fields.get(k).and_then(|v| v.kind.as_ref()) {
            Some(value::Kind::StringValue(v)) => v.clone(),
            _ => String::new(),
        };
        let labels = match s.fields.get("LABELS").and_then(|v| v.kind.as_ref()) {
            Some(value::Kind::StructValue(l)) => l.clone(),
            _ => Struct::default(),
        };
        Workload {
            name: get(s, "WORKLOAD_NAME"),
            namespace: get(s, "NAMESPACE"),
            app: get(&labels, "app"),
            version: get(&labels, "version"),
            canonical_service: get(&labels, CANONICAL_NAME),
            canonical_revision: get(&labels, CANONICAL_REVISION),
            cluster: get(s, "CLUSTER_ID"),
        }
    }

    /// The header value announcing this workload to a peer.
    pub fn encode(&self) -> String {
        STANDARD.encode(self.to_struct().encode_to_vec())
    }

    /// Reads a peer's header; None when absent, oversized or malformed.
    pub fn decode(header: &[u8]) -> Option<Workload> {
        if header.len() > MAX_METADATA {
            return None;
        }
        let bytes = STANDARD.decode(header).ok()?;
        Struct::decode(bytes.as_slice())
            .ok()
            .map(|s| Workload::from_struct(&s))
    }
}

/// A header's workload (None when malformed), shared by every request that brings it.
type Decoded = Option<Arc<Workload>>;

/// Peers' metadata headers already decoded: a peer sends the same header on every request, and
/// decoding it (base64, then a protobuf `Struct`) costs more than finding it again.
#[derive(Debug, Default)]
pub struct Peers {
    seen: Mutex<HashMap<Box<[u8]>, Decoded, foldhash::fast::RandomState>>,
}

impl Peers {
    /// [`Workload::decode`], remembered by the header's bytes.
    pub fn decode(&self, header: &[u8]) -> Decoded {
        if header.len() > MAX_METADATA {
            return None;
        }
        let mut seen = self.seen.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(w) = seen.get(header) {
            return w.clone();
        }
        let w = Workload::decode(header).map(Arc::new);
        if seen.len() >= MAX_REMEMBERED {
            seen.clear();
        }
        seen.insert(header.into(), w.clone());
        w
    }
}

/// What Istio's peer metadata filter (`istio.metadata_exchange`) of a connection manager does
/// with the metadata headers. Without the filter, nothing: they pass as any other header.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Exchange {
    /// Requests: the caller's headers are read and removed.
    pub downstream_discovery: bool,
    /// Responses: this workload's headers go back to the caller.
    pub downstream_propagation: bool,
    /// Responses: the upstream's headers are read and removed.
    pub upstream_discovery: bool,
    /// Requests: this workload's headers go to the upstream...
    pub upstream_propagation: bool,
    /// ...but not to clusters outside the mesh (`skip_external_clusters`: Istio's `IN_MESH`).
    pub skip_external: bool,
}

impl Exchange {
    /// From the filter's configuration (`io.istio.http.peer_metadata.Config` as a `Struct`).
    /// Methods other than Istio's headers (`workload_discovery`, which needs ambient's
    /// workload xDS) find nothing here, and the headers are what Istio's sidecars use.
    pub fn from_config(config: &Struct) -> Result<Exchange, String> {
        // Each list of methods: whether it has `istio_headers`, and that method's settings.
        let methods = |key: &str| -> Result<Option<Struct>, String> {
            let camel = snake_to_camel(key);
            let Some(v) = config.fields.get(key).or_else(|| config.fields.get(&camel)) else {
                return Ok(None);
            };
            let Some(value::Kind::ListValue(list)) = &v.kind else {
                return Err(format!("peer metadata: {key} is not a list"));
            };
            let mut found = None;
            for m in &list.values {
                let Some(value::Kind::StructValue(m)) = &m.kind else {
                    return Err(format!("peer metadata: an entry of {key} is not an object"));
                };
                match m
                    .fields
                    .get("istio_headers")
                    .or_else(|| m.fields.get("istioHeaders"))
                {
                    Some(Value {
                        kind: Some(value::Kind::StructValue(settings)),
                    }) => found = Some(settings.clone()),
                    Some(_) => {
                        return Err(format!(
                            "peer metadata: {key} istio_headers is not an object"
                        ));
                    }
                    None => {}
                }
            }
            Ok(found)
        };
        let upstream = methods("upstream_propagation")?;
        let skip = |s: &Struct| {
            s.fields
                .get("skip_external_clusters")
                .or_else(|| s.fields.get("skipExternalClusters"))
                .and_then(|v| v.kind.as_ref())
                == Some(&value::Kind::BoolValue(true))
        };
        Ok(Exchange {
            downstream_discovery: methods("downstream_discovery")?.is_some(),
            downstream_propagation: methods("downstream_propagation")?.is_some(),
            upstream_discovery: methods("upstream_discovery")?.is_some(),
            skip_external: upstream.as_ref().is_some_and(skip),
            upstream_propagation: upstream.is_some(),
        })
    }
}

/// A proto field's JSON name (`upstream_propagation` → `upstreamPropagation`).
fn snake_to_camel(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut upper = false;
    for c in s.chars() {
        if c == '_' {
            upper = true;
        } else if upper {
            out.extend(c.to_uppercase());
            upper = false;
        } else {
            out.push(c);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_filter_configuration_says_which_way_metadata_goes() {
        let config = |v: serde_json::Value| {
            let s: Struct = isthmus_xds::json::from_json(v).unwrap();
            Exchange::from_config(&s)
        };
        // Istio's outbound filter, in IN_MESH mode.
        let outbound = config(serde_json::json!({
            "upstream_discovery": [{"istio_headers": {}}, {"workload_discovery": {}}],
            "upstream_propagation": [{"istio_headers": {"skip_external_clusters": true}}],
        }))
        .unwrap();
        assert_eq!(
            outbound,
            Exchange {
                upstream_discovery: true,
                upstream_propagation: true,
                skip_external: true,
                ..Exchange::default()
            }
        );
        // Istio's inbound filter, with JSON names.
        let inbound = config(serde_json::json!({
            "downstreamDiscovery": [{"istioHeaders": {}}],
            "downstreamPropagation": [{"istioHeaders": {}}],
        }))
        .unwrap();
        assert!(inbound.downstream_discovery && inbound.downstream_propagation);
        assert!(!inbound.upstream_propagation);
        // Discovery through the workload xDS alone finds nothing in a sidecar.
        let xds_only =
            config(serde_json::json!({"upstream_discovery": [{"workload_discovery": {}}]}));
        assert_eq!(xds_only, Ok(Exchange::default()));
        let bad = config(serde_json::json!({"upstream_propagation": {"istio_headers": {}}}));
        assert_eq!(
            bad,
            Err("peer metadata: upstream_propagation is not a list".into())
        );
    }

    #[test]
    fn metadata_round_trips_and_rejects_garbage() {
        let labels = [("app", "reviews"), ("version", "v1")]
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .into();
        let w = Workload::from_labels("reviews-v1", "bookinfo", "Kubernetes", &labels);
        // Istio's canonical labels, from `app` and `version` when the injector set none.
        assert_eq!(
            (w.canonical_service.as_str(), w.canonical_revision.as_str()),
            ("reviews", "v1")
        );
        let bare = Workload::from_labels("job-7", "batch", "Kubernetes", &BTreeMap::new());
        assert_eq!(
            (
                bare.canonical_service.as_str(),
                bare.canonical_revision.as_str()
            ),
            ("job-7", "latest")
        );
        assert_eq!(Workload::decode(w.encode().as_bytes()), Some(w));
        assert_eq!(Workload::decode(b"!!not base64"), None);
        assert_eq!(Workload::decode(&vec![b'A'; MAX_METADATA + 4]), None);
    }

    #[test]
    fn remembered_headers_decode_alike_and_memory_is_bounded() {
        let peers = Peers::default();
        let w = |i: usize| Workload {
            name: format!("w{i}"),
            ..Workload::default()
        };
        for round in 0..2 {
            for i in 0..MAX_REMEMBERED + 10 {
                let got = peers.decode(w(i).encode().as_bytes());
                assert_eq!(got.as_deref(), Some(&w(i)), "round {round}, peer {i}");
            }
            assert_eq!(peers.decode(b"!!not base64"), None);
            assert!(peers.seen.lock().unwrap().len() <= MAX_REMEMBERED);
        }
    }

    /// Istio's `istio.workload` endpoint metadata: five fields, no more, no fewer.
    #[test]
    fn endpoint_labels_name_a_workload() {
        let w = Workload::from_endpoint_label("reviews-v1;shop;reviews;v1;Kubernetes").unwrap();
        assert_eq!(
            (
                w.name.as_str(),
                w.namespace.as_str(),
                w.canonical_service.as_str()
            ),
            ("reviews-v1", "shop", "reviews")
        );
        assert_eq!(
            (w.canonical_revision.as_str(), w.cluster.as_str()),
            ("v1", "Kubernetes")
        );
        assert!(w.app.is_empty());
        for bad in ["", "a;b;c;d", "a;b;c;d;e;f"] {
            assert_eq!(Workload::from_endpoint_label(bad), None, "{bad:?}");
        }
    }
}
