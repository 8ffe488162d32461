//! The echo client: sends N requests to a URL and reports each answer's fields, as
//! `isthmus echo client URL --count N` prints them.

use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("invalid URL {0:?}: expected http://host:port/path")]
    Url(String),
    #[error("connecting to {addr}: {source}")]
    Connect {
        addr: String,
        source: std::io::Error,
    },
    #[error("HTTP: {0}")]
    Http(#[from] hyper::Error),
    #[error("request: {0}")]
    Request(#[from] http::Error),
    #[error("no answer within {0:?}")]
    Timeout(Duration),
}

/// One answer: status, response headers (HTTP only), the echo lines, and how long it took.
#[derive(Debug, Clone, Default)]
pub struct Answer {
    pub status: u16,
    /// The response's header fields, in order (what the sidecars added shows here).
    pub headers: Vec<(String, String)>,
    pub body: String,
    pub elapsed: Duration,
}

impl Answer {
    /// The value of an echo field (`Hostname`, `Identity`, …).
    pub fn field(&self, name: &str) -> Option<&str> {
        self.body
            .lines()
            .find_map(|l| l.strip_prefix(name).and_then(|r| r.strip_prefix('=')))
    }
}

/// Sends one request without a body (a GET, or a preflight's OPTIONS) with optional extra
/// headers, on a fresh connection.
pub async fn request(
    method: &http::Method,
    url: &str,
    headers: &[(String, String)],
    timeout: Duration,
) -> Result<Answer, ClientError> {
    let uri: http::Uri = url.parse().map_err(|_| ClientError::Url(url.into()))?;
    let authority = uri
        .authority()
        .ok_or_else(|| ClientError::Url(url.into()))?
        .clone();
    let addr = if authority.port().is_some() {
        authority.to_string()
    } else {
        format!("{authority}:80")
    };
    let start = Instant::now();
    let work = async {
        let tcp = tokio::net::TcpStream::connect(&addr)
            .await
            .map_err(|source| ClientError::Connect {
                addr: addr.clone(),
                source,
            })?;
        let (mut sender, conn) =
            hyper::client::conn::http1::handshake::<_, Empty<Bytes>>(TokioIo::new(tcp)).await?;
        tokio::spawn(conn);
        let mut req = http::Request::builder()
            .method(method)
            .uri(uri.path_and_query().map_or("/", |p| p.as_str()))
            .header(http::header::HOST, authority.as_str());
        for (k, v) in headers {
            req = req.header(k, v);
        }
        let resp = sender.send_request(req.body(Empty::new())?).await?;
        let status = resp.status().as_u16();
        let headers = resp
            .headers()
            .iter()
            .map(|(k, v)| {
                (
                    k.to_string(),
                    String::from_utf8_lossy(v.as_bytes()).into_owned(),
                )
            })
            .collect();
        let body = http_body_util::Limited::new(resp.into_body(), 1 << 20)
            .collect()
            .await
            .map(|b| String::from_utf8_lossy(&b.to_bytes()).into_owned())
            .unwrap_or_default();
        Ok(Answer {
            status,
            headers,
            body,
            elapsed: start.elapsed(),
        })
    };
    tokio::time::timeout(timeout, work)
        .await
        .map_err(|_| ClientError::Timeout(timeout))?
}

/// Opens a TCP connection to `addr` (`host:port`), sends `payload` and reads until it comes
/// back (after a server-first greeting, if any): the whole exchange, bounded by `timeout`.
pub async fn tcp(addr: &str, payload: &str, timeout: Duration) -> Result<Answer, ClientError> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let start = Instant::now();
    let work = async {
        let mut s = tokio::net::TcpStream::connect(addr)
            .await
            .map_err(|source| ClientError::Connect {
                addr: addr.to_string(),
                source,
            })?;
        let io = |source| ClientError::Connect {
            addr: addr.to_string(),
            source,
        };
        s.write_all(payload.as_bytes()).await.map_err(io)?;
        let mut got = Vec::new();
        let mut buf = [0u8; 4096];
        while !String::from_utf8_lossy(&got).contains(payload) && got.len() < 64 * 1024 {
            let n = s.read(&mut buf).await.map_err(io)?;
            if n == 0 {
                break;
            }
            got.extend_from_slice(&buf[..n]);
        }
        let body = String::from_utf8_lossy(&got).into_owned();
        Ok(Answer {
            // Complete echo: as good as a 200.
            status: if body.contains(payload) { 200 } else { 502 },
            body,
            elapsed: start.elapsed(),
            ..Default::default()
        })
    };
    tokio::time::timeout(timeout, work)
        .await
        .map_err(|_| ClientError::Timeout(timeout))?
}

/// Connects to `addr` and reads what the server says first (a server-first protocol's
/// greeting, one line), sending nothing.
pub async fn tcp_read_first(addr: &str, timeout: Duration) -> Result<Answer, ClientError> {
    use tokio::io::AsyncBufReadExt;
    let start = Instant::now();
    let work = async {
        let s = tokio::net::TcpStream::connect(addr)
            .await
            .map_err(|source| ClientError::Connect {
                addr: addr.to_string(),
                source,
            })?;
        let mut line = String::new();
        tokio::io::BufReader::new(s)
            .read_line(&mut line)
            .await
            .map_err(|source| ClientError::Connect {
                addr: addr.to_string(),
                source,
            })?;
        Ok(Answer {
            status: if line.is_empty() { 502 } else { 200 },
            body: line,
            elapsed: start.elapsed(),
            ..Default::default()
        })
    };
    tokio::time::timeout(timeout, work)
        .await
        .map_err(|_| ClientError::Timeout(timeout))?
}
