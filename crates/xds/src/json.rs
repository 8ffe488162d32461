//! Envoy resources as JSON, the way Envoy's admin `config_dump` prints them (proto field names,
//! `Any` expanded with its `@type`). Used by config dumps, `proxy-config` and golden tests.

use std::sync::OnceLock;

use prost_reflect::{DescriptorPool, DynamicMessage, SerializeOptions};

/// Envoy's v3 descriptors (see `data/README.md`).
static DESCRIPTORS: &[u8] = include_bytes!("../data/envoy-descriptors.bin");

#[derive(Debug, thiserror::Error)]
pub enum JsonError {
    #[error("Envoy descriptors unusable: {0}")]
    Descriptors(String),
    #[error("unknown message type {0}")]
    UnknownType(String),
    #[error("cannot convert {type_name}: {message}")]
    Convert { type_name: String, message: String },
}

fn pool() -> Result<&'static DescriptorPool, JsonError> {
    static POOL: OnceLock<Result<DescriptorPool, String>> = OnceLock::new();
    POOL.get_or_init(|| {
        let mut pool = DescriptorPool::decode(DESCRIPTORS).map_err(|e| e.to_string())?;
        // Envoy's descriptors name `TypedStruct` without defining it.
        for package in ["udpa.type.v1", "xds.type.v3"] {
            pool.add_file_descriptor_proto(crate::typed_struct::file_descriptor(package))
                .map_err(|e| e.to_string())?;
        }
        Ok(pool)
    })
    .as_ref()
    .map_err(|e| JsonError::Descriptors(e.clone()))
}

/// A message as JSON, for a message whose full protobuf name is `type_name`.
pub fn encoded_to_json(type_name: &str, bytes: &[u8]) -> Result<serde_json::Value, JsonError> {
    let desc = pool()?
        .get_message_by_name(type_name)
        .ok_or_else(|| JsonError::UnknownType(type_name.to_string()))?;
    let convert = |message: String| JsonError::Convert {
        type_name: type_name.to_string(),
        message,
    };
    let msg = DynamicMessage::decode(desc, bytes).map_err(|e| convert(e.to_string()))?;
    let options = SerializeOptions::new()
        .use_proto_field_name(true)
        .skip_default_fields(true);
    msg.serialize_with_options(serde_json::value::Serializer, &options)
        .map_err(|e| convert(e.to_string()))
}

/// Any prost-generated Envoy message as JSON.
pub fn to_json<M: prost::Message + prost::Name>(m: &M) -> Result<serde_json::Value, JsonError> {
    encoded_to_json(&M::full_name(), &m.encode_to_vec())
}

/// A message from its JSON form (protobuf's JSON mapping), e.g. a `Struct` from an object.
pub fn from_json<M: prost::Message + prost::Name + Default>(
    v: serde_json::Value,
) -> Result<M, JsonError> {
    let type_name = M::full_name();
    let desc = pool()?
        .get_message_by_name(&type_name)
        .ok_or_else(|| JsonError::UnknownType(type_name.clone()))?;
    let convert = |message: String| JsonError::Convert {
        type_name: type_name.clone(),
        message,
    };
    DynamicMessage::deserialize(desc, v)
        .map_err(|e| convert(e.to_string()))?
        .transcode_to::<M>()
        .map_err(|e| convert(e.to_string()))
}

/// A resource a proxy received, as JSON.
fn received_to_json<T: crate::client::XdsResource>(
    r: &crate::client::Received<T>,
) -> Result<serde_json::Value, JsonError> {
    encoded_to_json(&T::full_name(), r.body())
}

/// Envoy's `/config_dump` of an xDS state: clusters, endpoints, listeners, routes (Envoy's
/// order), then `extra` sections (secrets).
pub fn config_dump(
    state: &crate::client::XdsState,
    extra: Vec<serde_json::Value>,
) -> serde_json::Value {
    use crate::server::{CLUSTER, ENDPOINT, LISTENER, ROUTE};
    use serde_json::json;
    let version = |t: &str| state.versions.get(t).cloned().unwrap_or_default();
    let clusters: Vec<_> = state
        .clusters
        .values()
        .filter_map(|c| received_to_json(c).ok())
        .map(|c| json!({"version_info": version(CLUSTER), "cluster": c}))
        .collect();
    let endpoints: Vec<_> = state
        .endpoints
        .values()
        .filter_map(|e| received_to_json(e).ok())
        .map(|e| json!({"version_info": version(ENDPOINT), "endpoint_config": e}))
        .collect();
    let listeners: Vec<_> = state
        .listeners
        .iter()
        .filter_map(|(name, l)| Some((name, received_to_json(l).ok()?)))
        .map(|(name, l)| {
            json!({"name": name, "active_state": {"version_info": version(LISTENER), "listener": l}})
        })
        .collect();
    let routes: Vec<_> = state
        .routes
        .values()
        .filter_map(|r| received_to_json(r).ok())
        .map(|r| json!({"version_info": version(ROUTE), "route_config": r}))
        .collect();
    let mut configs = vec![
        json!({"@type": "type.googleapis.com/envoy.admin.v3.ClustersConfigDump", "dynamic_active_clusters": clusters}),
        json!({"@type": "type.googleapis.com/envoy.admin.v3.EndpointsConfigDump", "dynamic_endpoint_configs": endpoints}),
        json!({"@type": "type.googleapis.com/envoy.admin.v3.ListenersConfigDump", "dynamic_listeners": listeners}),
        json!({"@type": "type.googleapis.com/envoy.admin.v3.RoutesConfigDump", "dynamic_route_configs": routes}),
    ];
    configs.extend(extra);
    json!({ "configs": configs })
}

#[cfg(test)]
mod tests {
    use envoy_types::pb::envoy::config::cluster::v3::Cluster;

    #[test]
    fn prints_clusters_like_envoy() {
        let c = Cluster {
            name: "outbound|9080||reviews.default.svc.cluster.local".into(),
            ..Default::default()
        };
        let v = super::to_json(&c).unwrap();
        assert_eq!(
            v["name"],
            "outbound|9080||reviews.default.svc.cluster.local"
        );
    }
}
