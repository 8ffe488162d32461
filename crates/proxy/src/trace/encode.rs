//! Finished spans in a collector's format: Zipkin v2 JSON, or OTLP's
//! `ExportTraceServiceRequest` in protobuf (over HTTP, or framed as a gRPC message).

use bytes::Bytes;
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::{AnyValue, InstrumentationScope, KeyValue, any_value};
use opentelemetry_proto::tonic::resource::v1::Resource;
use opentelemetry_proto::tonic::trace::v1::{
    ResourceSpans, ScopeSpans, Span, Status, span, status,
};
use serde_json::{Map, Value, json};

use super::{Kind, SpanData};

/// Zipkin's v2 JSON: an array of spans.
pub fn zipkin_json(spans: &[SpanData]) -> Bytes {
    let list: Vec<Value> = spans
        .iter()
        .map(|s| {
            let mut tags: Map<String, Value> = s
                .tags
                .iter()
                .map(|(k, v)| (k.clone(), Value::String(v.clone())))
                .collect();
            if s.error {
                tags.insert("error".into(), Value::String("true".into()));
            }
            let mut local = Map::new();
            local.insert(
                "serviceName".into(),
                Value::String(s.local.service_name.clone()),
            );
            match s.local.ip {
                Some(std::net::IpAddr::V4(ip)) => {
                    local.insert("ipv4".into(), Value::String(ip.to_string()));
                }
                Some(std::net::IpAddr::V6(ip)) => {
                    local.insert("ipv6".into(), Value::String(ip.to_string()));
                }
                None => {}
            }
            let mut span = json!({
                "traceId": s.trace.hex(),
                "id": format!("{:016x}", s.id),
                "name": s.name,
                "kind": match s.kind { Kind::Client => "CLIENT", Kind::Server => "SERVER" },
                "timestamp": s.start_unix_micros,
                "duration": s.duration_micros,
                "localEndpoint": local,
                "tags": tags,
            });
            if let (Some(p), Some(m)) = (s.parent, span.as_object_mut()) {
                m.insert("parentId".into(), Value::String(format!("{p:016x}")));
            }
            span
        })
        .collect();
    Bytes::from(Value::Array(list).to_string())
}

fn string(key: &str, value: &str) -> KeyValue {
    KeyValue {
        key: key.into(),
        value: Some(AnyValue {
            value: Some(any_value::Value::StringValue(value.into())),
        }),
        ..Default::default()
    }
}

/// OTLP's export request: one resource (`service.name`) with the spans of one scope.
pub fn otlp(spans: &[SpanData], service_name: &str) -> Vec<u8> {
    use prost::Message;
    let service = if service_name.is_empty() {
        spans.first().map_or("", |s| s.local.service_name.as_str())
    } else {
        service_name
    };
    let spans = spans
        .iter()
        .map(|s| {
            let start = s.start_unix_micros.saturating_mul(1000);
            Span {
                trace_id: s.trace.bytes().to_vec(),
                span_id: s.id.to_be_bytes().to_vec(),
                parent_span_id: s
                    .parent
                    .map(|p| p.to_be_bytes().to_vec())
                    .unwrap_or_default(),
                name: s.name.clone(),
                kind: match s.kind {
                    Kind::Client => span::SpanKind::Client,
                    Kind::Server => span::SpanKind::Server,
                } as i32,
                start_time_unix_nano: start,
                end_time_unix_nano: start.saturating_add(s.duration_micros.saturating_mul(1000)),
                attributes: s.tags.iter().map(|(k, v)| string(k, v)).collect(),
                status: s.error.then(|| Status {
                    code: status::StatusCode::Error as i32,
                    ..Default::default()
                }),
                ..Default::default()
            }
        })
        .collect();
    ExportTraceServiceRequest {
        resource_spans: vec![ResourceSpans {
            resource: Some(Resource {
                attributes: vec![string("service.name", service)],
                ..Default::default()
            }),
            scope_spans: vec![ScopeSpans {
                scope: Some(InstrumentationScope {
                    name: "envoy".into(),
                    ..Default::default()
                }),
                spans,
                ..Default::default()
            }],
            ..Default::default()
        }],
    }
    .encode_to_vec()
}

/// A gRPC message: uncompressed, its length, itself.
pub fn grpc_frame(message: &[u8]) -> Bytes {
    let mut out = Vec::with_capacity(5 + message.len());
    out.push(0);
    out.extend_from_slice(
        &u32::try_from(message.len())
            .unwrap_or(u32::MAX)
            .to_be_bytes(),
    );
    out.extend_from_slice(message);
    Bytes::from(out)
}
