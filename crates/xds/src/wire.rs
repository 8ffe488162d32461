//! Delta responses as they go on the wire. A resource is encoded once, when it is built, and
//! shared by every proxy it goes to; [`DeltaOut`] refers to those shared resources and writes
//! them (name, version and body) straight into the stream's buffer, where Envoy's generated
//! `DeltaDiscoveryResponse` would need a copy of every resource for every proxy first. Proxies decode it as the usual
//! `DeltaDiscoveryResponse` (the field numbers are that message's).

use std::sync::Arc;

use prost::bytes::{Buf, BufMut, Bytes, BytesMut};
use prost::encoding::{DecodeContext, WireType, encode_key, encode_varint, encoded_len_varint};
use tonic::codegen::http;

use crate::server::{ResponseStream, Versioned};

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

/// A `DeltaDiscoveryResponse` whose resources are shared, for encoding only.
#[derive(Debug, Clone, Default)]
pub struct DeltaOut {
    pub system_version_info: String,
    pub resources: Vec<Arc<Versioned>>,
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

/// Digits of a version as sent (its decimal text).
fn digits(v: u64) -> usize {
    v.checked_ilog10().map_or(1, |d| d as usize + 1)
}

fn any_len(r: &Versioned) -> usize {
    string_len(ANY_TYPE_URL, &r.any.type_url)
        + if r.any.value.is_empty() {
            0
        } else {
            delimited_len(ANY_VALUE, r.any.value.len())
        }
}

/// The length of the `Resource` message, without its own key and length.
fn inner_len(r: &Versioned) -> usize {
    delimited_len(RESOURCE_VERSION, digits(r.version))
        + delimited_len(RESOURCE_BODY, any_len(r))
        + string_len(RESOURCE_NAME, &r.name)
}

/// What a resource adds to a response.
pub(crate) fn resource_len(r: &Versioned) -> usize {
    delimited_len(RESOURCES, inner_len(r))
}

fn put_resource(r: &Versioned, buf: &mut impl BufMut) {
    encode_key(RESOURCES, WireType::LengthDelimited, buf);
    encode_varint(inner_len(r) as u64, buf);
    let mut text = [0u8; 20];
    let n = digits(r.version);
    let mut v = r.version;
    for slot in text[..n].iter_mut().rev() {
        *slot = b'0' + (v % 10) as u8;
        v /= 10;
    }
    put_bytes(RESOURCE_VERSION, &text[..n], buf);
    encode_key(RESOURCE_BODY, WireType::LengthDelimited, buf);
    encode_varint(any_len(r) as u64, buf);
    put_string(ANY_TYPE_URL, &r.any.type_url, buf);
    if !r.any.value.is_empty() {
        put_bytes(ANY_VALUE, &r.any.value, buf);
    }
    put_string(RESOURCE_NAME, &r.name, buf);
}

impl prost::Message for DeltaOut {
    fn encode_raw(&self, buf: &mut impl BufMut) {
        put_string(SYSTEM_VERSION_INFO, &self.system_version_info, buf);
        for r in &self.resources {
            put_resource(r, buf);
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
                .map(|r| resource_len(r))
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

/// The requests of an ADS stream, decoded from the HTTP/2 body (bounded to `max` bytes per
/// message).
pub fn requests<Req: prost::Message + Default + Send + 'static>(
    req: http::Request<tonic::body::Body>,
    max: usize,
) -> tonic::Request<tonic::Streaming<Req>> {
    let (parts, body) = req.into_parts();
    let stream = tonic::Streaming::new_request(
        tonic_prost::ProstDecoder::<Req>::default(),
        body,
        None,
        Some(max),
    );
    tonic::Request::from_http(http::Request::from_parts(parts, stream))
}

/// A stream's answer as a gRPC response: each message framed in a buffer of its own, which is
/// freed once written. (tonic's encoder keeps one buffer per stream as large as the largest
/// message it ever sent: a 300 KB route configuration then costs every connected proxy that
/// much for as long as it stays connected.)
pub fn response<T: prost::Message + 'static>(
    answer: Result<tonic::Response<ResponseStream<T>>, tonic::Status>,
) -> http::Response<tonic::body::Body> {
    let stream = match answer {
        Ok(r) => r.into_inner(),
        Err(status) => return status.into_http(),
    };
    let mut r = http::Response::new(tonic::body::Body::new(Framed {
        stream: Some(stream),
    }));
    r.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/grpc"),
    );
    r
}

struct Framed<T> {
    /// None once the trailers are sent.
    stream: Option<ResponseStream<T>>,
}

impl<T: prost::Message> http_body::Body for Framed<T> {
    type Data = Bytes;
    type Error = tonic::Status;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Bytes>, tonic::Status>>> {
        use futures::StreamExt;
        let Some(stream) = self.stream.as_mut() else {
            return std::task::Poll::Ready(None);
        };
        let end = match std::task::ready!(stream.poll_next_unpin(cx)) {
            Some(Ok(message)) => {
                return std::task::Poll::Ready(Some(frame(&message).map(http_body::Frame::data)));
            }
            Some(Err(status)) => status,
            None => tonic::Status::ok(""),
        };
        self.stream = None;
        // `grpc-status` and `grpc-message`, encoded as tonic encodes them.
        let mut trailers = end.into_http::<()>().into_parts().0.headers;
        trailers.remove(http::header::CONTENT_TYPE);
        std::task::Poll::Ready(Some(Ok(http_body::Frame::trailers(trailers))))
    }

    fn is_end_stream(&self) -> bool {
        self.stream.is_none()
    }
}

/// One gRPC message: uncompressed flag, big-endian length, the message.
fn frame(message: &impl prost::Message) -> Result<Bytes, tonic::Status> {
    let len = message.encoded_len();
    let prefix =
        u32::try_from(len).map_err(|_| tonic::Status::resource_exhausted("response over 4 GiB"))?;
    let mut buf = BytesMut::with_capacity(5 + len);
    buf.put_u8(0);
    buf.put_u32(prefix);
    message
        .encode(&mut buf)
        .map_err(|e| tonic::Status::internal(format!("encoding a response: {e}")))?;
    Ok(buf.freeze())
}

#[cfg(test)]
mod tests {
    use envoy_types::pb::envoy::service::discovery::v3::{DeltaDiscoveryResponse, Resource};
    use envoy_types::pb::google::protobuf::Any;
    use prost::Message;

    use super::*;

    #[test]
    fn decodes_as_the_envoy_message_it_stands_for() {
        let body = |name: &str, size: usize, version: u64| {
            let any = Any {
                type_url: "type.googleapis.com/envoy.config.cluster.v3.Cluster".into(),
                value: name.bytes().cycle().take(size).collect(),
            };
            Arc::new(Versioned {
                version,
                ..Versioned::new(name, any)
            })
        };
        let out = DeltaOut {
            system_version_info: "v7".into(),
            // Lengths past one varint byte, an empty body, versions of one to twenty digits.
            resources: vec![
                body("a", 3, 0),
                body(&"b".repeat(200), 70_000, 10),
                body("c", 0, 9),
                body("d", 1, u64::MAX),
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
                    name: r.name.to_string(),
                    version: r.version.to_string(),
                    resource: Some(r.any.clone()),
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
