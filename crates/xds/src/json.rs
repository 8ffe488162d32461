//! Envoy resources as JSON, the way Envoy's admin `config_dump` prints them (proto field names,
//! `Any` expanded with its `@type`). Used by config dumps, `proxy-config` and golden tests.

use std::sync::Mutex;

use prost_reflect::{DescriptorPool, DynamicMessage, MessageDescriptor, SerializeOptions};

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

/// The decoded descriptors, kept once loaded until [`unload`]. Decoded, they take some 45 MB:
/// a sidecar, which needs them only to answer a config dump, lets them go after each.
static POOL: Mutex<Option<DescriptorPool>> = Mutex::new(None);

fn pool() -> Result<DescriptorPool, JsonError> {
    let mut cached = POOL.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(pool) = cached.as_ref() {
        return Ok(pool.clone());
    }
    let decode = || -> Result<DescriptorPool, String> {
        let mut pool = DescriptorPool::decode(DESCRIPTORS).map_err(|e| e.to_string())?;
        // Envoy's descriptors name `TypedStruct` without defining it.
        for package in ["udpa.type.v1", "xds.type.v3"] {
            pool.add_file_descriptor_proto(crate::typed_struct::file_descriptor(package))
                .map_err(|e| e.to_string())?;
        }
        Ok(pool)
    };
    let pool = decode().map_err(JsonError::Descriptors)?;
    *cached = Some(pool.clone());
    Ok(pool)
}

/// Drops the cached descriptors; they are freed once the last conversion using them ends,
/// and decoded again when next needed.
pub fn unload() {
    POOL.lock().unwrap_or_else(|p| p.into_inner()).take();
}

/// The descriptor of the message `type_name`.
fn descriptor(type_name: &str) -> Result<MessageDescriptor, JsonError> {
    pool()?
        .get_message_by_name(type_name)
        .ok_or_else(|| JsonError::UnknownType(type_name.to_string()))
}

/// How a failure to convert a `type_name` is reported.
fn convert(type_name: &str) -> impl Fn(String) -> JsonError + '_ {
    move |message| JsonError::Convert {
        type_name: type_name.to_string(),
        message,
    }
}

/// `msg` as Envoy's config dumps print it: proto field names, defaults left out.
fn render(msg: &DynamicMessage, type_name: &str) -> Result<serde_json::Value, JsonError> {
    let options = SerializeOptions::new()
        .use_proto_field_name(true)
        .skip_default_fields(true);
    msg.serialize_with_options(serde_json::value::Serializer, &options)
        .map_err(|e| convert(type_name)(e.to_string()))
}

/// A message as JSON, for a message whose full protobuf name is `type_name`.
pub fn encoded_to_json(type_name: &str, bytes: &[u8]) -> Result<serde_json::Value, JsonError> {
    let msg = DynamicMessage::decode(descriptor(type_name)?, bytes)
        .map_err(|e| convert(type_name)(e.to_string()))?;
    render(&msg, type_name)
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
    DynamicMessage::deserialize(descriptor(&type_name)?, v)
        .map_err(|e| convert(&type_name)(e.to_string()))?
        .transcode_to::<M>()
        .map_err(|e| convert(&type_name)(e.to_string()))
}

/// `v` as protobuf's JSON of the message `type_name` renders it, defaults left out: an error
/// for a field the message does not have or of the wrong shape.
pub fn normalize(type_name: &str, v: serde_json::Value) -> Result<serde_json::Value, JsonError> {
    let msg = DynamicMessage::deserialize(descriptor(type_name)?, v)
        .map_err(|e| convert(type_name)(e.to_string()))?;
    render(&msg, type_name)
}

/// A resource a proxy received, as JSON.
fn received_to_json<T: crate::client::XdsResource>(
    r: &crate::client::Received<T>,
) -> Result<serde_json::Value, JsonError> {
    encoded_to_json(&T::full_name(), r.body())
}

/// `v` with `"@type"` naming its message, as Envoy prints an `Any`.
fn typed(mut v: serde_json::Value, type_url: &str) -> serde_json::Value {
    if let serde_json::Value::Object(m) = &mut v {
        m.insert("@type".into(), type_url.into());
    }
    v
}

const ROUTE_CONFIGURATION: &str = "type.googleapis.com/envoy.config.route.v3.RouteConfiguration";

/// The route configurations that listeners' connection managers hold inline: Envoy dumps
/// them as static route configs.
fn inline_route_configs<'a>(
    listeners: impl Iterator<Item = &'a serde_json::Value>,
) -> Vec<serde_json::Value> {
    let mut out = Vec::new();
    for l in listeners {
        let chains = l["filter_chains"]
            .as_array()
            .into_iter()
            .flatten()
            .chain(l.get("default_filter_chain"));
        for chain in chains {
            for f in chain["filters"].as_array().into_iter().flatten() {
                let rc = &f["typed_config"]["route_config"];
                if rc.is_object() {
                    out.push(typed(rc.clone(), ROUTE_CONFIGURATION));
                }
            }
        }
    }
    out
}

/// Envoy's `/config_dump` of an xDS state: the `bootstrap` (a `BootstrapConfigDump`, for a
/// proxy) with its static listeners and clusters, then clusters, endpoints, listeners, routes
/// (Envoy's order), then `extra` sections (secrets).
pub fn config_dump(
    state: &crate::client::XdsState,
    bootstrap: Option<&serde_json::Value>,
    extra: Vec<serde_json::Value>,
) -> serde_json::Value {
    use crate::server::{CLUSTER, ENDPOINT, LISTENER, ROUTE};
    use serde_json::json;
    let version = |t: &str| state.versions.get(t).cloned().unwrap_or_default();
    let clusters: Vec<_> = state
        .clusters
        .values()
        .filter_map(|c| received_to_json(c).ok())
        .map(|c| json!({"version_info": version(CLUSTER), "cluster": typed(c, CLUSTER)}))
        .collect();
    let endpoints: Vec<_> = state
        .endpoints
        .values()
        .filter_map(|e| received_to_json(e).ok())
        .map(|e| json!({"version_info": version(ENDPOINT), "endpoint_config": typed(e, ENDPOINT)}))
        .collect();
    let listeners: Vec<(&String, serde_json::Value)> = state
        .listeners
        .iter()
        .filter_map(|(name, l)| Some((name, received_to_json(l).ok()?)))
        .collect();
    let routes: Vec<_> = state
        .routes
        .values()
        .filter_map(|r| received_to_json(r).ok())
        .map(|r| json!({"version_info": version(ROUTE), "route_config": typed(r, ROUTE)}))
        .collect();
    let fixed = |kind: &str| {
        bootstrap
            .and_then(|b| b["bootstrap"]["static_resources"][kind].as_array())
            .cloned()
            .unwrap_or_default()
    };
    let (static_listeners, static_clusters) = (fixed("listeners"), fixed("clusters"));
    // `{field: v, last_updated}`, as Envoy lists a static resource.
    let loaded = |field: &str, v: serde_json::Value| {
        let mut entry = json!({ field: v });
        if let Some(at) = bootstrap.and_then(|b| b.get("last_updated")) {
            entry["last_updated"] = at.clone();
        }
        entry
    };
    let inline = inline_route_configs(
        static_listeners
            .iter()
            .chain(listeners.iter().map(|(_, l)| l)),
    );
    let mut configs = Vec::new();
    configs.extend(bootstrap.cloned());
    configs.extend([
        json!({
            "@type": "type.googleapis.com/envoy.admin.v3.ClustersConfigDump",
            "static_clusters": static_clusters
                .into_iter()
                .map(|c| loaded("cluster", typed(c, CLUSTER)))
                .collect::<Vec<_>>(),
            "dynamic_active_clusters": clusters,
        }),
        json!({"@type": "type.googleapis.com/envoy.admin.v3.EndpointsConfigDump", "dynamic_endpoint_configs": endpoints}),
        json!({
            "@type": "type.googleapis.com/envoy.admin.v3.ListenersConfigDump",
            "static_listeners": static_listeners
                .into_iter()
                .map(|l| loaded("listener", typed(l, LISTENER)))
                .collect::<Vec<_>>(),
            "dynamic_listeners": listeners
                .into_iter()
                .map(|(name, l)| json!({
                    "name": name,
                    "active_state": {"version_info": version(LISTENER), "listener": typed(l, LISTENER)},
                }))
                .collect::<Vec<_>>(),
        }),
        json!({
            "@type": "type.googleapis.com/envoy.admin.v3.RoutesConfigDump",
            "static_route_configs": inline
                .into_iter()
                .map(|r| loaded("route_config", r))
                .collect::<Vec<_>>(),
            "dynamic_route_configs": routes,
        }),
    ]);
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

    #[test]
    fn normalize_renders_envoys_json_and_refuses_a_field_the_message_lacks() {
        let c = serde_json::json!({"name": "xds-grpc", "type": "STATIC", "connect_timeout": "5s", "per_connection_buffer_limit_bytes": 0, "lb_policy": "ROUND_ROBIN"});
        let v = super::normalize("envoy.config.cluster.v3.Cluster", c).unwrap();
        // Defaults are left out; `type`, set in its oneof, is not a default.
        assert_eq!(
            v,
            serde_json::json!({"name": "xds-grpc", "type": "STATIC", "connect_timeout": "5s", "per_connection_buffer_limit_bytes": 0})
        );
        let bad = serde_json::json!({"name": "x", "conect_timeout": "5s"});
        let err = super::normalize("envoy.config.cluster.v3.Cluster", bad).unwrap_err();
        assert!(err.to_string().contains("conect_timeout"), "{err}");
    }

    #[test]
    fn descriptors_unloaded_are_decoded_again_when_needed() {
        let c = envoy_types::pb::envoy::config::cluster::v3::Cluster {
            name: "a".into(),
            ..Default::default()
        };
        let before = super::to_json(&c).unwrap();
        super::unload();
        assert_eq!(super::to_json(&c).unwrap(), before);
    }
}
