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
    pub cluster: String,
}

impl Workload {
    /// From pod labels, as Istio derives the canonical name and revision.
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
        Workload {
            name: name.to_string(),
            namespace: namespace.to_string(),
            app: first(&[
                "service.istio.io/canonical-name",
                "app.kubernetes.io/name",
                "app",
            ]),
            version: first(&[
                "service.istio.io/canonical-revision",
                "app.kubernetes.io/version",
                "version",
            ]),
            cluster: cluster.to_string(),
        }
    }

    /// The header value announcing this workload to a peer.
    pub fn encode(&self) -> String {
        let s = |v: &str| Value {
            kind: Some(value::Kind::StringValue(v.to_string())),
        };
        let mut labels = BTreeMap::new();
        labels.insert("app".to_string(), s(&self.app));
        labels.insert("version".to_string(), s(&self.version));
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
        STANDARD.encode(
            Struct {
                fields: fields.into_iter().collect(),
            }
            .encode_to_vec(),
        )
    }

    /// Reads a peer's header; None when absent, oversized or malformed.
    pub fn decode(header: &[u8]) -> Option<Workload> {
        if header.len() > MAX_METADATA {
            return None;
        }
        let bytes = STANDARD.decode(header).ok()?;
        let s = Struct::decode(bytes.as_slice()).ok()?;
        let get = |st: &Struct, k: &str| match st.fields.get(k).and_then(|v| v.kind.as_ref()) {
            Some(value::Kind::StringValue(v)) => v.clone(),
            _ => String::new(),
        };
        let labels = match s.fields.get("LABELS").and_then(|v| v.kind.as_ref()) {
            Some(value::Kind::StructValue(l)) => l.clone(),
            _ => Struct::default(),
        };
        Some(Workload {
            name: get(&s, "WORKLOAD_NAME"),
            namespace: get(&s, "NAMESPACE"),
            app: get(&labels, "app"),
            version: get(&labels, "version"),
            cluster: get(&s, "CLUSTER_ID"),
        })
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metadata_round_trips_and_rejects_garbage() {
        let w = Workload {
            name: "reviews-v1".into(),
            namespace: "bookinfo".into(),
            app: "reviews".into(),
            version: "v1".into(),
            cluster: "Kubernetes".into(),
        };
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
}
