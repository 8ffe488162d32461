//! `TypedStruct`: an extension's configuration as a `Struct` beside the type it stands for,
//! the way Istio configures the filters of its own proxy build that Envoy's API does not
//! define (`io.istio.http.peer_metadata.Config`). `envoy-types` does not generate it.

use envoy_types::pb::google::protobuf::Struct;

/// `udpa.type.v1.TypedStruct`, the name Istio sends; `xds.type.v3.TypedStruct` has the same
/// fields.
#[derive(Clone, PartialEq, prost::Message)]
pub struct TypedStruct {
    /// The configuration's own type (`type.googleapis.com/io.istio.http.peer_metadata.Config`).
    #[prost(string, tag = "1")]
    pub type_url: String,
    #[prost(message, optional, tag = "2")]
    pub value: Option<Struct>,
}

impl prost::Name for TypedStruct {
    const NAME: &'static str = "TypedStruct";
    const PACKAGE: &'static str = "udpa.type.v1";

    fn type_url() -> String {
        UDPA_TYPE_URL.into()
    }
}

pub const UDPA_TYPE_URL: &str = "type.googleapis.com/udpa.type.v1.TypedStruct";
pub const XDS_TYPE_URL: &str = "type.googleapis.com/xds.type.v3.TypedStruct";

/// Whether an `Any` of this type holds a [`TypedStruct`].
pub fn is_typed_struct(type_url: &str) -> bool {
    type_url == UDPA_TYPE_URL || type_url == XDS_TYPE_URL
}

/// The descriptor of `TypedStruct` in `package`, for the JSON of config dumps.
pub(crate) fn file_descriptor(package: &str) -> prost_types::FileDescriptorProto {
    use prost_types::field_descriptor_proto::{Label, Type};
    use prost_types::{DescriptorProto, FieldDescriptorProto, FileDescriptorProto};
    let field =
        |name: &str, json: &str, number, ty: Type, type_name: Option<&str>| FieldDescriptorProto {
            name: Some(name.into()),
            json_name: Some(json.into()),
            number: Some(number),
            label: Some(Label::Optional as i32),
            r#type: Some(ty as i32),
            type_name: type_name.map(Into::into),
            ..Default::default()
        };
    FileDescriptorProto {
        name: Some(format!("{}/typed_struct.proto", package.replace('.', "/"))),
        package: Some(package.into()),
        dependency: vec!["google/protobuf/struct.proto".into()],
        message_type: vec![DescriptorProto {
            name: Some("TypedStruct".into()),
            field: vec![
                field("type_url", "typeUrl", 1, Type::String, None),
                field(
                    "value",
                    "value",
                    2,
                    Type::Message,
                    Some(".google.protobuf.Struct"),
                ),
            ],
            ..Default::default()
        }],
        syntax: Some("proto3".into()),
        ..Default::default()
    }
}

/// Istio's peer metadata filter (`istio.metadata_exchange`), whose configuration travels in a
/// [`TypedStruct`] of this type.
pub const PEER_METADATA_TYPE_URL: &str = "type.googleapis.com/io.istio.http.peer_metadata.Config";
pub const METADATA_EXCHANGE_FILTER: &str = "istio.metadata_exchange";

/// Istio's stats filter (`istio.stats`, HTTP and network): which of Istio's standard metrics a
/// listener reports and with which labels, in a [`TypedStruct`] of this type.
pub const STATS_TYPE_URL: &str = "type.googleapis.com/stats.PluginConfig";
pub const STATS_FILTER: &str = "istio.stats";

/// Istio's TCP metadata exchange (`istio.metadata_exchange` as a network filter of inbound TCP
/// chains and a filter of outbound clusters): Istio sends its configuration in a
/// [`TypedStruct`] of this type, older releases as the message itself ([`MetadataExchange`]).
pub const TCP_METADATA_EXCHANGE_TYPE_URL: &str =
    "type.googleapis.com/envoy.tcp.metadataexchange.config.MetadataExchange";

/// `envoy.tcp.metadataexchange.config.MetadataExchange`: the ALPN value under which the
/// exchange happens (`istio-peer-exchange`).
#[derive(Clone, PartialEq, prost::Message)]
pub struct MetadataExchange {
    #[prost(string, tag = "1")]
    pub protocol: String,
}
