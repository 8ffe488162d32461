//! Istio's TCP metadata exchange (the `istio.metadata_exchange` network and cluster filter).
//! On a connection whose ALPN came out as `istio-peer-exchange`, each side first sends a
//! preamble — the magic 0x3D230467 and a length, both big-endian `u32`, then that many bytes
//! of a protobuf `Any` holding a `Struct` with the workload's metadata under
//! `x-envoy-peer-metadata` and its node id under `x-envoy-peer-metadata-id` — and takes the
//! peer's off the start of what it receives. A stream that does not begin with the magic is
//! data from a peer without the filter, and passes untouched.

use std::collections::HashMap;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};

use envoy_types::pb::google::protobuf::{Any, Struct, Value, value};
use prost::Message;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::oneshot;

use crate::peer::Workload;

const MAGIC: [u8; 4] = 0x3D23_0467u32.to_be_bytes();
/// The magic and the length.
const HEADER: usize = 8;
/// Bound on a peer's preamble: Istio's carry a few hundred bytes.
const MAX_PREAMBLE: usize = 16 * 1024;
const STRUCT_TYPE_URL: &str = "type.googleapis.com/google.protobuf.Struct";
const METADATA_KEY: &str = "x-envoy-peer-metadata";
const METADATA_ID_KEY: &str = "x-envoy-peer-metadata-id";

/// The preamble announcing `me` (node `node_id`) to a peer.
pub fn preamble(me: &Workload, node_id: &str) -> Vec<u8> {
    let mut fields = HashMap::new();
    fields.insert(
        METADATA_KEY.to_string(),
        Value {
            kind: Some(value::Kind::StructValue(me.to_struct())),
        },
    );
    fields.insert(
        METADATA_ID_KEY.to_string(),
        Value {
            kind: Some(value::Kind::StringValue(node_id.to_string())),
        },
    );
    let body = Any {
        type_url: STRUCT_TYPE_URL.to_string(),
        value: Struct { fields }.encode_to_vec(),
    }
    .encode_to_vec();
    let len = u32::try_from(body.len()).unwrap_or(u32::MAX);
    let mut out = Vec::with_capacity(HEADER + body.len());
    out.extend_from_slice(&MAGIC);
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(&body);
    out
}

/// The workload a preamble's body names; None when it is not Istio's metadata.
fn parse(body: &[u8]) -> Option<Workload> {
    let any = Any::decode(body).ok()?;
    if any.type_url != STRUCT_TYPE_URL {
        return None;
    }
    let data = Struct::decode(any.value.as_slice()).ok()?;
    match data.fields.get(METADATA_KEY)?.kind.as_ref()? {
        value::Kind::StructValue(s) => Some(Workload::from_struct(s)),
        _ => None,
    }
}

/// What the bytes gathered so far at a stream's start are.
#[derive(Debug, PartialEq, Eq)]
enum Start {
    /// Not a preamble: data.
    Data,
    /// A preamble, or possibly one: more bytes are needed.
    More,
    /// A preamble longer than the bound.
    TooLong(usize),
    /// A whole preamble, ending at this offset.
    Preamble(usize),
}

fn scan(buf: &[u8]) -> Start {
    let seen = buf.len().min(MAGIC.len());
    if buf[..seen] != MAGIC[..seen] {
        return Start::Data;
    }
    let Some(len) = buf.get(4..HEADER) else {
        return Start::More;
    };
    let len = u32::from_be_bytes([len[0], len[1], len[2], len[3]]) as usize;
    if len > MAX_PREAMBLE {
        Start::TooLong(len)
    } else if buf.len() < HEADER + len {
        Start::More
    } else {
        Start::Preamble(HEADER + len)
    }
}

/// Where reading a stream stands.
enum State {
    /// Gathering the stream's start: a preamble, or bytes that turn out to be data.
    Start(Vec<u8>),
    /// Data read while looking for the preamble, handed out before the stream's own.
    Replay(Vec<u8>, usize),
    Through,
}

/// The peer's workload as its preamble names it; None when it sent none, or a malformed one.
pub type Found = Option<Arc<Workload>>;

/// A stream whose first bytes may be the peer's preamble: reading takes the preamble off and
/// says once what it named; writing passes through.
pub struct Exchange<S> {
    inner: S,
    state: State,
    found: Option<oneshot::Sender<Found>>,
}

impl<S> Exchange<S> {
    /// `inner`, with the exchange when `on`, and then where the peer's workload will be told.
    pub fn new(inner: S, on: bool) -> (Exchange<S>, Option<oneshot::Receiver<Found>>) {
        if !on {
            let exchange = Exchange {
                inner,
                state: State::Through,
                found: None,
            };
            return (exchange, None);
        }
        let (tx, rx) = oneshot::channel();
        let exchange = Exchange {
            inner,
            state: State::Start(Vec::new()),
            found: Some(tx),
        };
        (exchange, Some(rx))
    }

    fn tell(&mut self, found: Option<Workload>) {
        if let Some(tx) = self.found.take() {
            let _ = tx.send(found.map(Arc::new));
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Exchange<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        out: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        loop {
            match &mut this.state {
                State::Through => return Pin::new(&mut this.inner).poll_read(cx, out),
                State::Replay(buf, at) => {
                    let n = out.remaining().min(buf.len() - *at);
                    out.put_slice(&buf[*at..*at + n]);
                    *at += n;
                    if *at == buf.len() {
                        this.state = State::Through;
                    }
                    return Poll::Ready(Ok(()));
                }
                State::Start(buf) => {
                    let mut chunk = [0u8; 2048];
                    let mut read = ReadBuf::new(&mut chunk);
                    ready!(Pin::new(&mut this.inner).poll_read(cx, &mut read))?;
                    let got = read.filled();
                    if got.is_empty() {
                        // The stream ended in its start: a preamble cut short (the whole
                        // magic came) is dropped, anything else was data.
                        let buf = std::mem::take(buf);
                        this.tell(None);
                        let cut = buf.len() >= MAGIC.len() && scan(&buf) != Start::Data;
                        this.state = if buf.is_empty() || cut {
                            State::Through
                        } else {
                            State::Replay(buf, 0)
                        };
                        if matches!(this.state, State::Through) {
                            return Poll::Ready(Ok(()));
                        }
                        continue;
                    }
                    buf.extend_from_slice(got);
                    match scan(buf) {
                        Start::More => {}
                        Start::Data => {
                            let buf = std::mem::take(buf);
                            this.tell(None);
                            this.state = State::Replay(buf, 0);
                        }
                        Start::TooLong(len) => {
                            this.tell(None);
                            this.state = State::Through;
                            return Poll::Ready(Err(io::Error::new(
                                io::ErrorKind::InvalidData,
                                format!(
                                    "istio-peer-exchange preamble of {len} bytes (at most {MAX_PREAMBLE})"
                                ),
                            )));
                        }
                        Start::Preamble(end) => {
                            let rest = buf.split_off(end);
                            let found = parse(&buf[HEADER..]);
                            if found.is_none() {
                                tracing::debug!("malformed istio-peer-exchange preamble dropped");
                            }
                            this.tell(found);
                            this.state = if rest.is_empty() {
                                State::Through
                            } else {
                                State::Replay(rest, 0)
                            };
                        }
                    }
                }
            }
        }
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Exchange<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    fn reviews() -> Workload {
        Workload {
            name: "reviews-v1".into(),
            namespace: "shop".into(),
            app: "reviews".into(),
            version: "v1".into(),
            canonical_service: "reviews".into(),
            canonical_revision: "v1".into(),
            cluster: "Kubernetes".into(),
        }
    }

    /// Envoy's wire format: magic and length big-endian, then an `Any` of a `Struct`.
    #[test]
    fn the_preamble_is_istios_wire_format() {
        let p = preamble(
            &reviews(),
            "sidecar~10.0.0.5~reviews-v1-1.shop~shop.svc.cluster.local",
        );
        assert_eq!(&p[..4], &[0x3D, 0x23, 0x04, 0x67]);
        let len = u32::from_be_bytes([p[4], p[5], p[6], p[7]]) as usize;
        assert_eq!(len, p.len() - HEADER);
        let any = Any::decode(&p[HEADER..]).unwrap();
        assert_eq!(any.type_url, "type.googleapis.com/google.protobuf.Struct");
        let s = Struct::decode(any.value.as_slice()).unwrap();
        assert_eq!(
            s.fields["x-envoy-peer-metadata-id"].kind,
            Some(value::Kind::StringValue(
                "sidecar~10.0.0.5~reviews-v1-1.shop~shop.svc.cluster.local".into()
            ))
        );
        assert_eq!(parse(&p[HEADER..]), Some(reviews()));
    }

    /// Reads everything from `bytes` delivered in pieces of `piece` bytes.
    async fn read_all(bytes: &[u8], piece: usize) -> (Vec<u8>, Found) {
        let (mut client, server) = tokio::io::duplex(64 * 1024);
        let (mut exchange, found) = Exchange::new(server, true);
        let send = bytes.to_vec();
        let writer = tokio::spawn(async move {
            for c in send.chunks(piece.max(1)) {
                client.write_all(c).await.unwrap();
                client.flush().await.unwrap();
                tokio::task::yield_now().await;
            }
        });
        let mut got = Vec::new();
        exchange.read_to_end(&mut got).await.unwrap();
        writer.await.unwrap();
        (got, found.unwrap().await.unwrap())
    }

    #[tokio::test]
    async fn the_peers_preamble_is_taken_off_however_it_arrives() {
        let mut stream = preamble(&reviews(), "node");
        stream.extend_from_slice(b"SELECT 1;");
        for piece in [1, 3, 7, 64, stream.len()] {
            let (data, found) = read_all(&stream, piece).await;
            assert_eq!(data, b"SELECT 1;", "pieces of {piece}");
            assert_eq!(found.as_deref(), Some(&reviews()), "pieces of {piece}");
        }
    }

    #[tokio::test]
    async fn a_stream_without_a_preamble_passes_untouched() {
        // Other bytes, bytes that begin like the magic, and a stream shorter than a header.
        for data in [
            b"GET / HTTP/1.1\r\n\r\n".to_vec(),
            vec![0x3D, 0x23, 0x00, 0x01, 2, 3, 4, 5, 6],
            vec![0x3D, 0x23],
            Vec::new(),
        ] {
            let (got, found) = read_all(&data, 1).await;
            assert_eq!(got, data);
            assert_eq!(found, None);
        }
    }

    #[tokio::test]
    async fn bad_preambles_are_dropped_or_refused() {
        // Magic and length right, body not Istio's metadata: dropped, the data goes on.
        let mut stream = MAGIC.to_vec();
        stream.extend_from_slice(&3u32.to_be_bytes());
        stream.extend_from_slice(b"xyzdata");
        let (got, found) = read_all(&stream, 2).await;
        assert_eq!((got.as_slice(), found), (&b"data"[..], None));
        // A preamble cut short by the end of the stream is no data.
        let p = preamble(&reviews(), "node");
        let (got, found) = read_all(&p[..p.len() - 1], 5).await;
        assert_eq!((got.len(), found), (0, None));
        // A length over the bound ends the stream with an error.
        let (mut client, server) = tokio::io::duplex(1024);
        let (mut exchange, found) = Exchange::new(server, true);
        client.write_all(&MAGIC).await.unwrap();
        client.write_all(&u32::MAX.to_be_bytes()).await.unwrap();
        let err = exchange.read_to_end(&mut Vec::new()).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);
        assert!(err.to_string().contains("4294967295 bytes"), "{err}");
        assert_eq!(found.unwrap().await.unwrap(), None);
    }
}
