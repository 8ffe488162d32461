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

/// One answer: status, the echo lines, and how long it took.
#[derive(Debug, Clone)]
pub struct Answer {
    pub status: u16,
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

/// Sends one GET with optional extra headers, on a fresh connection.
pub async fn get(
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
        let mut req = http::Request::get(uri.path_and_query().map_or("/", |p| p.as_str()))
            .header(http::header::HOST, authority.as_str());
        for (k, v) in headers {
            req = req.header(k, v);
        }
        let resp = sender.send_request(req.body(Empty::new())?).await?;
        let status = resp.status().as_u16();
        let body = http_body_util::Limited::new(resp.into_body(), 1 << 20)
            .collect()
            .await
            .map(|b| String::from_utf8_lossy(&b.to_bytes()).into_owned())
            .unwrap_or_default();
        Ok(Answer {
            status,
            body,
            elapsed: start.elapsed(),
        })
    };
    tokio::time::timeout(timeout, work)
        .await
        .map_err(|_| ClientError::Timeout(timeout))?
}
