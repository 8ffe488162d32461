//! Delta responses as they go on the wire. A resource is encoded once, when it is built, and
//! shared by every proxy it goes to; a run of resources sent in one response is encoded once
//! more into the response's `resources` field ([`EncodedRuns`]), and that encoding is shared by
//! every stream that sends the same run — the proxies of one scope get the same shared parts in
//! the same order. A stream then frames only its own envelope (version, type, nonce, removals)
//! and hands the shared bytes to HTTP/2 as they are. Proxies decode it as the usual
//! `DeltaDiscoveryResponse` (the field numbers are that message's; protobuf fields may come in
//! any order). The stream's requests are read here too, and the responses of the streams that
//! xDS clients open ([`call`]), both decoded from the received frames ([`Messages`]).

use std::collections::{HashMap, HashSet, VecDeque};
use std::hash::{BuildHasher, Hasher};
use std::sync::{Arc, Mutex};

use envoy_types::pb::envoy::service::discovery::v3::DiscoveryResponse;
use envoy_types::pb::google::protobuf::Any;
use prost::bytes::{Buf, BufMut, Bytes, BytesMut};
use prost::encoding::{WireType, encode_key, encode_varint, encoded_len_varint};
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

/// A `DeltaDiscoveryResponse`, for sending only: its resources already encoded, as the
/// repeated `resources` field ([`EncodedRuns::get`]).
#[derive(Debug, Clone, Default)]
pub struct DeltaOut {
    pub system_version_info: String,
    pub resources: Bytes,
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

fn any_len(any: &Any) -> usize {
    string_len(ANY_TYPE_URL, &any.type_url)
        + if any.value.is_empty() {
            0
        } else {
            delimited_len(ANY_VALUE, any.value.len())
        }
}

/// The length of a `Resource` message, without its own key and length.
pub(crate) fn resource_inner_len(name: &str, version: u64, any: &Any) -> usize {
    delimited_len(RESOURCE_VERSION, digits(version))
        + delimited_len(RESOURCE_BODY, any_len(any))
        + string_len(RESOURCE_NAME, name)
}

/// What a resource adds to a response.
pub(crate) fn resource_len(r: &Versioned) -> usize {
    delimited_len(RESOURCES, r.encoded_len())
}

fn put_resource(r: &Versioned, buf: &mut impl BufMut) {
    encode_key(RESOURCES, WireType::LengthDelimited, buf);
    encode_varint(r.encoded_len() as u64, buf);
    let mut text = [0u8; 20];
    let n = digits(r.version);
    let mut v = r.version;
    for slot in text[..n].iter_mut().rev() {
        *slot = b'0' + (v % 10) as u8;
        v /= 10;
    }
    put_bytes(RESOURCE_VERSION, &text[..n], buf);
    encode_key(RESOURCE_BODY, WireType::LengthDelimited, buf);
    encode_varint(any_len(&r.any) as u64, buf);
    put_string(ANY_TYPE_URL, &r.any.type_url, buf);
    if !r.any.value.is_empty() {
        put_bytes(ANY_VALUE, &r.any.value, buf);
    }
    put_string(RESOURCE_NAME, &r.name, buf);
}

/// The `resources` field of a response carrying `run`.
fn encode_run(run: &[Arc<Versioned>]) -> Bytes {
    let mut buf = BytesMut::with_capacity(run.iter().map(|r| resource_len(r)).sum());
    for r in run {
        put_resource(r, &mut buf);
    }
    buf.freeze()
}

/// Encoded runs of resources, by the resources themselves: a run is encoded once however many
/// streams send it. A run is kept from the second time it is asked for, so that what only one
/// proxy gets (its inbound part) is not kept; at most [`ENCODED_RUNS_BYTES`] are kept, the
/// oldest dropped first.
#[derive(Default)]
pub(crate) struct EncodedRuns {
    inner: Mutex<RunsInner>,
    hasher: foldhash::fast::RandomState,
}

#[derive(Default)]
struct RunsInner {
    /// Keys of runs asked for once, oldest first (at most [`SEEN_RUNS`]).
    seen: HashSet<u64, foldhash::fast::RandomState>,
    seen_order: VecDeque<u64>,
    /// Kept runs, holding their resources so that their addresses stay theirs.
    kept: HashMap<u64, (Vec<Arc<Versioned>>, Bytes), foldhash::fast::RandomState>,
    kept_order: VecDeque<u64>,
    kept_bytes: usize,
}

/// Encoded bytes kept for sharing: a few scopes' full configurations of a large mesh.
const ENCODED_RUNS_BYTES: usize = 48 << 20;
/// Runs remembered as asked for once.
const SEEN_RUNS: usize = 8192;

impl EncodedRuns {
    /// The `resources` field of a response carrying `run`.
    pub(crate) fn get(&self, run: Vec<Arc<Versioned>>) -> Bytes {
        // Resources are immutable behind their `Arc`s: the addresses name the content.
        let mut h = self.hasher.build_hasher();
        for r in &run {
            h.write_usize(Arc::as_ptr(r) as usize);
        }
        let key = h.finish();
        let same = |kept: &[Arc<Versioned>]| {
            kept.len() == run.len() && kept.iter().zip(&run).all(|(a, b)| Arc::ptr_eq(a, b))
        };
        let mut inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((kept, bytes)) = inner.kept.get(&key) {
            if same(kept) {
                return bytes.clone();
            }
            // Another run with the same key: not worth a second slot.
            drop(inner);
            return encode_run(&run);
        }
        if inner.first_sight(key) {
            drop(inner);
            return encode_run(&run);
        }
        // Encoded under the lock: the streams that want the same run at the same moment (a push
        // starts on a hundred streams at once) wait for this one instead of each encoding a copy.
        let bytes = encode_run(&run);
        inner.keep(key, run, bytes.clone());
        bytes
    }
}

impl RunsInner {
    /// Records `key` as asked for; true the first time.
    fn first_sight(&mut self, key: u64) -> bool {
        if !self.seen.insert(key) {
            return false;
        }
        self.seen_order.push_back(key);
        if self.seen_order.len() > SEEN_RUNS
            && let Some(old) = self.seen_order.pop_front()
        {
            self.seen.remove(&old);
        }
        true
    }

    fn keep(&mut self, key: u64, run: Vec<Arc<Versioned>>, bytes: Bytes) {
        self.kept_bytes += bytes.len();
        self.kept.insert(key, (run, bytes));
        self.kept_order.push_back(key);
        while self.kept_bytes > ENCODED_RUNS_BYTES
            && let Some(old) = self.kept_order.pop_front()
        {
            if let Some((_, b)) = self.kept.remove(&old) {
                self.kept_bytes -= b.len();
            }
        }
    }
}

/// A response as one gRPC message on the wire: its first buffer, and the shared bytes that
/// follow it as they are.
pub trait Outgoing {
    fn frames(&self) -> Result<(Bytes, Option<Bytes>), tonic::Status>;
}

/// A buffer for `own` more bytes after the gRPC message prefix (uncompressed, big-endian
/// length) of a `len`-byte message.
fn prefixed(len: usize, own: usize) -> Result<BytesMut, tonic::Status> {
    let prefix =
        u32::try_from(len).map_err(|_| tonic::Status::resource_exhausted("message over 4 GiB"))?;
    let mut buf = BytesMut::with_capacity(GRPC_PREFIX + own);
    buf.put_u8(0);
    buf.put_u32(prefix);
    Ok(buf)
}

/// `message` as one gRPC message: prefix and encoding in one buffer.
fn encode_framed(message: &impl prost::Message) -> Result<Bytes, tonic::Status> {
    let len = message.encoded_len();
    let mut buf = prefixed(len, len)?;
    message
        .encode(&mut buf)
        .map_err(|e| tonic::Status::internal(format!("encoding a message: {e}")))?;
    Ok(buf.freeze())
}

impl Outgoing for DiscoveryResponse {
    fn frames(&self) -> Result<(Bytes, Option<Bytes>), tonic::Status> {
        Ok((encode_framed(self)?, None))
    }
}

impl Outgoing for DeltaOut {
    /// The envelope first, then the shared resources.
    fn frames(&self) -> Result<(Bytes, Option<Bytes>), tonic::Status> {
        let envelope = string_len(SYSTEM_VERSION_INFO, &self.system_version_info)
            + string_len(TYPE_URL, &self.type_url)
            + string_len(NONCE, &self.nonce)
            + self
                .removed_resources
                .iter()
                .map(|n| delimited_len(REMOVED_RESOURCES, n.len()))
                .sum::<usize>();
        let mut buf = prefixed(envelope + self.resources.len(), envelope)?;
        put_string(SYSTEM_VERSION_INFO, &self.system_version_info, &mut buf);
        put_string(TYPE_URL, &self.type_url, &mut buf);
        put_string(NONCE, &self.nonce, &mut buf);
        for n in &self.removed_resources {
            put_bytes(REMOVED_RESOURCES, n.as_bytes(), &mut buf);
        }
        let rest = (!self.resources.is_empty()).then(|| self.resources.clone());
        Ok((buf.freeze(), rest))
    }
}

/// The requests of an ADS stream, decoded from the HTTP/2 body (bounded to `max` bytes per
/// message).
pub fn requests<Req: prost::Message + Default>(
    req: http::Request<tonic::body::Body>,
    max: usize,
) -> tonic::Request<Messages<Req>> {
    let (parts, body) = req.into_parts();
    tonic::Request::from_http(http::Request::from_parts(parts, Messages::new(body, max)))
}

/// Opens a bidirectional gRPC stream on `channel` at `path` (`/package.Service/Method`): the
/// requests are encoded as they come from `requests`, the responses read as [`Messages`] of at
/// most `max` bytes each.
pub async fn call<Req, Resp, S>(
    channel: &mut tonic::transport::Channel,
    path: &'static str,
    requests: S,
    max: usize,
) -> Result<Messages<Resp>, tonic::Status>
where
    Req: prost::Message + 'static,
    Resp: prost::Message + Default,
    S: futures::Stream<Item = Req> + Send + 'static,
{
    use futures::StreamExt;
    use tonic::client::GrpcService;
    let body = requests.map(|req| encode_framed(&req).map(http_body::Frame::data));
    let mut req = http::Request::new(tonic::body::Body::new(http_body_util::StreamBody::new(
        body,
    )));
    *req.method_mut() = http::Method::POST;
    *req.uri_mut() = http::Uri::from_static(path);
    let headers = req.headers_mut();
    headers.insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/grpc"),
    );
    headers.insert(http::header::TE, http::HeaderValue::from_static("trailers"));
    std::future::poll_fn(|cx| channel.poll_ready(cx))
        .await
        .map_err(|e| tonic::Status::unavailable(format!("connecting: {e}")))?;
    let resp = channel
        .call(req)
        .await
        .map_err(|e| tonic::Status::unavailable(format!("calling {path}: {e}")))?;
    // A call refused at once answers with its status in the headers (trailers only).
    if let Some(status) = tonic::Status::from_header_map(resp.headers())
        && status.code() != tonic::Code::Ok
    {
        return Err(status);
    }
    if resp.status() != http::StatusCode::OK {
        return Err(tonic::Status::unknown(format!(
            "HTTP status {} for {path}",
            resp.status()
        )));
    }
    Ok(Messages::new(resp.into_body(), max))
}

/// The gRPC messages of an HTTP/2 body, decoded where they arrived: a message is decoded from
/// the received DATA frames themselves, its `bytes` fields slices of them, and nothing is kept
/// once it is decoded. (tonic's decoder copies every frame into a buffer of its own, which it
/// keeps per stream as large as the largest message it ever read: a control plane's delta
/// response is up to 512 KB, an Envoy's subscription to a thousand endpoint names 50 KB.)
pub struct Messages<M, B = tonic::body::Body> {
    body: B,
    /// Received and not yet decoded: the start of the next message.
    chunks: Chunks,
    max: usize,
    _message: std::marker::PhantomData<fn() -> M>,
}

/// A gRPC message's prefix: compression flag and big-endian length.
const GRPC_PREFIX: usize = 5;

impl<M, B> Messages<M, B> {
    pub fn new(body: B, max: usize) -> Self {
        Messages {
            body,
            chunks: Chunks::default(),
            max,
            _message: std::marker::PhantomData,
        }
    }
}

impl<M, B> Messages<M, B>
where
    M: prost::Message + Default,
    B: http_body::Body<Data = Bytes> + Unpin,
    B::Error: std::fmt::Display,
{
    /// The next message, or None once the peer has closed its side.
    pub async fn message(&mut self) -> Result<Option<M>, tonic::Status> {
        Ok(self.sized().await?.map(|(m, _)| m))
    }

    /// The next message with its size on the wire (without the prefix).
    pub async fn sized(&mut self) -> Result<Option<(M, usize)>, tonic::Status> {
        loop {
            if let Some(decoded) = self.decode()? {
                return Ok(Some(decoded));
            }
            let frame =
                std::future::poll_fn(|cx| std::pin::Pin::new(&mut self.body).poll_frame(cx));
            match frame.await {
                Some(frame) => {
                    let frame = frame.map_err(|e| tonic::Status::unavailable(e.to_string()))?;
                    match frame.into_data() {
                        Ok(data) => self.chunks.push(data),
                        // A response's trailers carry its status; a request's have none.
                        Err(frame) => {
                            if let Some(status) = frame
                                .trailers_ref()
                                .and_then(tonic::Status::from_header_map)
                                && status.code() != tonic::Code::Ok
                            {
                                return Err(status);
                            }
                        }
                    }
                }
                None if self.chunks.remaining() == 0 => return Ok(None),
                None => {
                    return Err(tonic::Status::invalid_argument(format!(
                        "the stream ended inside a message ({} bytes of it)",
                        self.chunks.remaining()
                    )));
                }
            }
        }
    }

    /// The first message received, once all of it is there.
    fn decode(&mut self) -> Result<Option<(M, usize)>, tonic::Status> {
        let mut prefix = [0u8; GRPC_PREFIX];
        if !self.chunks.peek(&mut prefix) {
            return Ok(None);
        }
        if prefix[0] != 0 {
            return Err(tonic::Status::unimplemented(
                "compressed messages are not accepted",
            ));
        }
        let len = u32::from_be_bytes([prefix[1], prefix[2], prefix[3], prefix[4]]) as usize;
        if len > self.max {
            return Err(tonic::Status::resource_exhausted(format!(
                "a message of {len} bytes, over the limit of {}",
                self.max
            )));
        }
        if self.chunks.remaining() < GRPC_PREFIX + len {
            return Ok(None);
        }
        self.chunks.advance(GRPC_PREFIX);
        let message = M::decode((&mut self.chunks).take(len))
            .map_err(|e| tonic::Status::invalid_argument(format!("decoding a message: {e}")))?;
        Ok(Some((message, len)))
    }
}

/// Received DATA frames, read as one buffer.
#[derive(Default)]
struct Chunks {
    queue: VecDeque<Bytes>,
    len: usize,
}

impl Chunks {
    fn push(&mut self, data: Bytes) {
        if !data.is_empty() {
            self.len += data.len();
            self.queue.push_back(data);
        }
    }

    fn advance_across(&mut self, mut n: usize) {
        assert!(n <= self.len, "advanced past the received bytes");
        self.len -= n;
        while let Some(front) = self.queue.front_mut() {
            if n < front.len() {
                front.advance(n);
                return;
            }
            n -= front.len();
            self.queue.pop_front();
        }
    }

    /// Copies the first `out.len()` bytes, if there are that many.
    fn peek(&self, out: &mut [u8]) -> bool {
        if self.len < out.len() {
            return false;
        }
        let mut filled = 0;
        for chunk in &self.queue {
            let n = chunk.len().min(out.len() - filled);
            out[filled..filled + n].copy_from_slice(&chunk[..n]);
            filled += n;
            if filled == out.len() {
                break;
            }
        }
        true
    }
}

// Inlined into prost's decoders, which read a field at a time.
impl Buf for Chunks {
    #[inline]
    fn remaining(&self) -> usize {
        self.len
    }

    #[inline]
    fn chunk(&self) -> &[u8] {
        self.queue.front().map_or(&[], |c| c)
    }

    #[inline]
    fn advance(&mut self, n: usize) {
        if let Some(front) = self.queue.front_mut()
            && n < front.len()
        {
            front.advance(n);
            self.len -= n;
        } else {
            self.advance_across(n);
        }
    }

    /// A slice of the frame when the bytes lie in one: `bytes` fields are not copied.
    fn copy_to_bytes(&mut self, len: usize) -> Bytes {
        if let Some(front) = self.queue.front_mut()
            && front.len() >= len
        {
            let out = front.split_to(len);
            if front.is_empty() {
                self.queue.pop_front();
            }
            self.len -= len;
            return out;
        }
        let mut out = BytesMut::with_capacity(len);
        out.put((&mut *self).take(len));
        out.freeze()
    }
}

/// A stream's answer as a gRPC response: each message framed in a buffer of its own, which is
/// freed once written. (tonic's encoder keeps one buffer per stream as large as the largest
/// message it ever sent: a 300 KB route configuration then costs every connected proxy that
/// much for as long as it stays connected.)
pub fn response<T: Outgoing + 'static>(
    answer: Result<tonic::Response<ResponseStream<T>>, tonic::Status>,
) -> http::Response<tonic::body::Body> {
    let stream = match answer {
        Ok(r) => r.into_inner(),
        Err(status) => return status.into_http(),
    };
    let mut r = http::Response::new(tonic::body::Body::new(Framed {
        stream: Some(stream),
        rest: None,
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
    /// The rest of the message whose first buffer went last.
    rest: Option<Bytes>,
}

impl<T: Outgoing> http_body::Body for Framed<T> {
    type Data = Bytes;
    type Error = tonic::Status;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Bytes>, tonic::Status>>> {
        use futures::StreamExt;
        if let Some(rest) = self.rest.take() {
            return std::task::Poll::Ready(Some(Ok(http_body::Frame::data(rest))));
        }
        let Some(stream) = self.stream.as_mut() else {
            return std::task::Poll::Ready(None);
        };
        let end = match std::task::ready!(stream.poll_next_unpin(cx)) {
            Some(Ok(message)) => {
                let first = message.frames().map(|(first, rest)| {
                    self.rest = rest;
                    http_body::Frame::data(first)
                });
                return std::task::Poll::Ready(Some(first));
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
        self.stream.is_none() && self.rest.is_none()
    }
}

#[cfg(test)]
mod tests {
    use envoy_types::pb::envoy::service::discovery::v3::{
        DeltaDiscoveryRequest, DeltaDiscoveryResponse, Resource,
    };
    use prost::Message;

    use super::*;

    #[test]
    fn decodes_as_the_envoy_message_it_stands_for() {
        let body = |name: &str, size: usize, version: u64| {
            let any = Any {
                type_url: "type.googleapis.com/envoy.config.cluster.v3.Cluster".into(),
                value: name.bytes().cycle().take(size).collect(),
            };
            Arc::new(Versioned::with_version(name, any, version))
        };
        // Lengths past one varint byte, an empty body, versions of one to twenty digits.
        let run = vec![
            body("a", 3, 0),
            body(&"b".repeat(200), 70_000, 10),
            body("c", 0, 9),
            body("d", 1, u64::MAX),
        ];
        let runs = EncodedRuns::default();
        let out = DeltaOut {
            system_version_info: "v7".into(),
            resources: runs.get(run.clone()),
            type_url: "type.googleapis.com/envoy.config.cluster.v3.Cluster".into(),
            nonce: "1-9".into(),
            removed_resources: vec!["gone".into(), "also-gone".into()],
        };
        let (first, rest) = out.frames().unwrap();
        let mut bytes = first.to_vec();
        bytes.extend_from_slice(&rest.unwrap());
        assert_eq!(bytes[0], 0, "uncompressed");
        let len = u32::from_be_bytes(bytes[1..5].try_into().unwrap()) as usize;
        assert_eq!(bytes.len(), 5 + len);
        let got = DeltaDiscoveryResponse::decode(&bytes[5..]).unwrap();
        let want = DeltaDiscoveryResponse {
            system_version_info: out.system_version_info.clone(),
            resources: run
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

    #[test]
    fn a_run_is_encoded_once_from_the_second_time_it_is_sent() {
        let resource = |name: &str| {
            let any = Any {
                type_url: "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment"
                    .into(),
                value: vec![7; 100],
            };
            Arc::new(Versioned::new(name, any))
        };
        let run = vec![resource("a"), resource("b")];
        let runs = EncodedRuns::default();
        let first = runs.get(run.clone());
        let second = runs.get(run.clone());
        let third = runs.get(run.clone());
        assert_eq!(first, second);
        assert_ne!(first.as_ptr(), second.as_ptr(), "not kept the first time");
        assert_eq!(
            second.as_ptr(),
            third.as_ptr(),
            "shared from the second time"
        );
        // Equal content in other resources is another run.
        let other = vec![resource("a"), resource("b")];
        runs.get(other.clone());
        let again = runs.get(other);
        assert_eq!(again, third);
        assert_ne!(again.as_ptr(), third.as_ptr());
    }

    /// A body that arrives in the given frames.
    struct Pieces(std::collections::VecDeque<http_body::Frame<Bytes>>);

    impl http_body::Body for Pieces {
        type Data = Bytes;
        type Error = std::convert::Infallible;

        fn poll_frame(
            mut self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
        ) -> std::task::Poll<Option<Result<http_body::Frame<Bytes>, Self::Error>>> {
            std::task::Poll::Ready(self.0.pop_front().map(Ok))
        }
    }

    fn data(pieces: Vec<Bytes>) -> Pieces {
        Pieces(pieces.into_iter().map(http_body::Frame::data).collect())
    }

    fn body(pieces: Vec<Vec<u8>>) -> http::Request<tonic::body::Body> {
        let pieces = data(pieces.into_iter().map(Bytes::from).collect());
        http::Request::new(tonic::body::Body::new(pieces))
    }

    /// A message with a `bytes` field held as `Bytes`, as xDS clients read resources.
    #[derive(Clone, PartialEq, prost::Message)]
    struct Blob {
        #[prost(string, tag = "1")]
        name: String,
        #[prost(bytes = "bytes", tag = "2")]
        value: Bytes,
    }

    #[tokio::test]
    async fn messages_are_decoded_from_the_frames_they_came_in() {
        let a = Blob {
            name: "a".into(),
            value: vec![7; 1000].into(),
        };
        let b = Blob {
            name: "b".into(),
            value: vec![9; 100].into(),
        };
        let (a_bytes, b_bytes) = (framed(&a), framed(&b));
        // A's value alone in the second frame (after the prefix, the name and the value's key and
        // length); B's value cut in two by the end of the third frame.
        let value_at = a_bytes.len() - 1000;
        let a_value = Bytes::copy_from_slice(&a_bytes[value_at..]);
        let cut = b_bytes.len() - 50;
        let pieces = vec![
            Bytes::copy_from_slice(&a_bytes[..value_at]),
            a_value.clone(),
            Bytes::copy_from_slice(&b_bytes[..cut]),
            Bytes::copy_from_slice(&b_bytes[cut..]),
        ];
        let mut messages = Messages::<Blob, _>::new(data(pieces), 1 << 20);
        let (got, len) = messages.sized().await.unwrap().unwrap();
        assert_eq!((&got, len), (&a, a.encoded_len()));
        assert_eq!(got.value.as_ptr(), a_value.as_ptr(), "not copied");
        assert_eq!(messages.message().await.unwrap(), Some(b));
        assert_eq!(messages.message().await.unwrap(), None);
    }

    #[tokio::test]
    async fn a_status_in_the_trailers_ends_the_stream_with_it() {
        let a = Blob {
            name: "a".into(),
            ..Default::default()
        };
        let mut trailers = http::HeaderMap::new();
        trailers.insert("grpc-status", http::HeaderValue::from_static("3"));
        trailers.insert("grpc-message", http::HeaderValue::from_static("bad"));
        let frames = [
            http_body::Frame::data(Bytes::from(framed(&a))),
            http_body::Frame::trailers(trailers),
        ];
        let mut messages = Messages::<Blob, _>::new(Pieces(frames.into()), 1 << 20);
        assert_eq!(messages.message().await.unwrap(), Some(a));
        let e = messages.message().await.unwrap_err();
        assert_eq!(
            (e.code(), e.message()),
            (tonic::Code::InvalidArgument, "bad")
        );
    }

    fn framed(req: &impl Message) -> Vec<u8> {
        let mut out = vec![0];
        out.extend_from_slice(&(req.encoded_len() as u32).to_be_bytes());
        req.encode(&mut out).unwrap();
        out
    }

    #[tokio::test]
    async fn requests_are_read_across_frames_and_their_buffer_freed() {
        let a = DeltaDiscoveryRequest {
            type_url: "a".into(),
            resource_names_subscribe: (0..1000).map(|i| format!("outbound|80||s{i}")).collect(),
            ..Default::default()
        };
        let b = DeltaDiscoveryRequest {
            type_url: "b".into(),
            ..Default::default()
        };
        let (a_bytes, b_bytes) = (framed(&a), framed(&b));
        // A in three pieces, the last of them carrying B's first bytes.
        let third = a_bytes.len() / 3;
        let mut last = a_bytes[2 * third..].to_vec();
        last.extend_from_slice(&b_bytes[..3]);
        let pieces = vec![
            a_bytes[..third].to_vec(),
            a_bytes[third..2 * third].to_vec(),
            last,
            b_bytes[3..].to_vec(),
        ];
        let mut requests = requests::<DeltaDiscoveryRequest>(body(pieces), 1 << 20).into_inner();
        assert_eq!(requests.message().await.unwrap(), Some(a));
        assert_eq!(requests.message().await.unwrap(), Some(b));
        assert!(
            requests.chunks.queue.is_empty(),
            "nothing kept between requests"
        );
        assert_eq!(requests.message().await.unwrap(), None);
    }

    #[tokio::test]
    async fn an_oversized_or_cut_request_is_an_error() {
        let big = DeltaDiscoveryRequest {
            resource_names_subscribe: vec!["x".repeat(2000)],
            ..Default::default()
        };
        let bytes = framed(&big);
        // Refused from its prefix, before the rest arrives.
        let mut refused =
            requests::<DeltaDiscoveryRequest>(body(vec![bytes[..5].to_vec()]), 1000).into_inner();
        let e = refused.message().await.unwrap_err();
        assert_eq!(e.code(), tonic::Code::ResourceExhausted, "{e}");
        // Cut short by the end of the stream.
        let mut cut = requests::<DeltaDiscoveryRequest>(body(vec![bytes[..100].to_vec()]), 1 << 20)
            .into_inner();
        let e = cut.message().await.unwrap_err();
        assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e}");
        assert!(e.message().contains("ended inside a message"), "{e}");
    }
}
