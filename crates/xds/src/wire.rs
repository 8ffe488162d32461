//! Delta responses as they go on the wire. A resource is encoded once, when it is built, and
//! shared by every proxy it goes to; [`DeltaOut`] refers to those shared resources and writes
//! them straight into the stream's buffer, where Envoy's generated `DeltaDiscoveryResponse`
//! would need a copy of every resource for every proxy first. Proxies decode it as the usual
//! `DeltaDiscoveryResponse` (the field numbers are that message's).

use std::sync::Arc;

use prost::bytes::{Buf, BufMut};
use prost::encoding::{DecodeContext, WireType, encode_key, encode_varint, encoded_len_varint};

use crate::server::Versioned;

// Field numbers of envoy.service.discovery.v3.DeltaDiscoveryResponse …
const SYSTEM_VERSION_INFO: u32 = 1;
const RESOURCES: u32 = 2;
const TYPE_URL: u32 = 4;
const NONCE: u32 = 5;
const REMOVED_RESOURCES: u32 = 6;
// … of envoy.service.discovery.v3.Resource …
const RESOURCE_VERSION: u32 = 1;
const RESOURCE_BODY: u32 = 2;
const RESOURCE_NAME: u32 = 3;
// … and of google.protobuf.Any.
const ANY_TYPE_URL: u32 = 1;
const ANY_VALUE: u32 = 2;

/// One resource of a delta response: its name, its version as sent, and the shared body.
#[derive(Debug, Clone)]
pub struct OutResource {
    pub name: String,
    pub version: String,
    pub body: Arc<Versioned>,
}

/// A `DeltaDiscoveryResponse` whose resources are shared, for encoding only.
#[derive(Debug, Clone, Default)]
pub struct DeltaOut {
    pub system_version_info: String,
    pub resources: Vec<OutResource>,
    pub type_url: String,
    pub nonce: String,
    pub removed_resources: Vec<String>,
}

fn string_len(tag: u32, s: &str) -> usize {
    if s.is_empty() {
        0
    } else {
        delimited_len(tag, s.len())
    }
}

fn put_string(tag: u32, s: &str, buf: &mut impl BufMut) {
    if !s.is_empty() {
        put_bytes(tag, s.as_bytes(), buf);
    }
}

fn put_bytes(tag: u32, b: &[u8], buf: &mut impl BufMut) {
    encode_key(tag, WireType::LengthDelimited, buf);
    encode_varint(b.len() as u64, buf);
    buf.put_slice(b);
}

fn delimited_len(tag: u32, inner: usize) -> usize {
    prost::encoding::key_len(tag) + encoded_len_varint(inner as u64) + inner
}

impl OutResource {
    fn any_len(&self) -> usize {
        let any = &self.body.any;
        string_len(ANY_TYPE_URL, &any.type_url)
            + if any.value.is_empty() {
                0
            } else {
                delimited_len(ANY_VALUE, any.value.len())
            }
    }

    /// The length of the `Resource` message, without its own key and length.
    fn len(&self) -> usize {
        string_len(RESOURCE_VERSION, &self.version)
            + delimited_len(RESOURCE_BODY, self.any_len())
            + string_len(RESOURCE_NAME, &self.name)
    }

    /// What this resource adds to a response.
    pub(crate) fn encoded_len(&self) -> usize {
        delimited_len(RESOURCES, self.len())
    }

    fn encode(&self, buf: &mut impl BufMut) {
        encode_key(RESOURCES, WireType::LengthDelimited, buf);
        encode_varint(self.len() as u64, buf);
        put_string(RESOURCE_VERSION, &self.version, buf);
        encode_key(RESOURCE_BODY, WireType::LengthDelimited, buf);
        encode_varint(self.any_len() as u64, buf);
        put_string(ANY_TYPE_URL, &self.body.any.type_url, buf);
        if !self.body.any.value.is_empty() {
            put_bytes(ANY_VALUE, &self.body.any.value, buf);
        }
        put_string(RESOURCE_NAME, &self.name, buf);
    }
}

impl prost::Message for DeltaOut {
    fn encode_raw(&self, buf: &mut impl BufMut) {
        put_string(SYSTEM_VERSION_INFO, &self.system_version_info, buf);
        for r in &self.resources {
            r.encode(buf);
        }
        put_string(TYPE_URL, &self.type_url, buf);
        put_string(NONCE, &self.nonce, buf);
        for n in &self.removed_resources {
            put_bytes(REMOVED_RESOURCES, n.as_bytes(), buf);
        }
    }

    /// Sent, never received (a receiver decodes a `DeltaDiscoveryResponse`): fields are
    /// skipped.
    fn merge_field(
        &mut self,
        tag: u32,
        wire_type: WireType,
        buf: &mut impl Buf,
        ctx: DecodeContext,
    ) -> Result<(), prost::DecodeError> {
        prost::encoding::skip_field(wire_type, tag, buf, ctx)
    }

    fn encoded_len(&self) -> usize {
        string_len(SYSTEM_VERSION_INFO, &self.system_version_info)
            + self
                .resources
                .iter()
                .map(OutResource::encoded_len)
                .sum::<usize>()
            + string_len(TYPE_URL, &self.type_url)
            + string_len(NONCE, &self.nonce)
            + self
                .removed_resources
                .iter()
                .map(|n| delimited_len(REMOVED_RESOURCES, n.len()))
                .sum::<usize>()
    }

    fn clear(&mut self) {
        *self = DeltaOut::default();
    }
}

#[cfg(test)]
mod tests {
    use envoy_types::pb::envoy::service::discovery::v3::{DeltaDiscoveryResponse, Resource};
    use envoy_types::pb::google::protobuf::Any;
    use prost::Message;

    use super::*;

    #[test]
    fn decodes_as_the_envoy_message_it_stands_for() {
        let body = |name: &str, size: usize| {
            Arc::new(Versioned::new(Any {
                type_url: "type.googleapis.com/envoy.config.cluster.v3.Cluster".into(),
                value: name.bytes().cycle().take(size).collect(),
            }))
        };
        let out = DeltaOut {
            system_version_info: "v7".into(),
            resources: vec![
                OutResource {
                    name: "a".into(),
                    version: "11".into(),
                    body: body("a", 3),
                },
                // Lengths past one varint byte, and an empty body.
                OutResource {
                    name: "b".repeat(200),
                    version: "22".into(),
                    body: body("b", 70_000),
                },
                OutResource {
                    name: "c".into(),
                    version: String::new(),
                    body: body("c", 0),
                },
            ],
            type_url: "type.googleapis.com/envoy.config.cluster.v3.Cluster".into(),
            nonce: "1-9".into(),
            removed_resources: vec!["gone".into(), "also-gone".into()],
        };
        let bytes = out.encode_to_vec();
        assert_eq!(bytes.len(), out.encoded_len());
        let got = DeltaDiscoveryResponse::decode(bytes.as_slice()).unwrap();
        let want = DeltaDiscoveryResponse {
            system_version_info: out.system_version_info.clone(),
            resources: out
                .resources
                .iter()
                .map(|r| Resource {
                    name: r.name.clone(),
                    version: r.version.clone(),
                    resource: Some(r.body.any.clone()),
                    ..Default::default()
                })
                .collect(),
            type_url: out.type_url.clone(),
            nonce: out.nonce.clone(),
            removed_resources: out.removed_resources.clone(),
            ..Default::default()
        };
        assert_eq!(got, want);
    }
}
