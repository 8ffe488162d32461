//! Echo servers: HTTP (HTTP/1.1 and cleartext HTTP/2 on the same port) and TCP.

use std::convert::Infallible;
use std::fmt::Write as _;
use std::net::SocketAddr;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Http,
    Tcp,
    /// TCP that speaks first: a greeting line before reading anything.
    TcpServerFirst,
}

#[derive(Debug, Clone)]
pub struct ServerOptions {
    pub addr: SocketAddr,
    pub mode: Mode,
    /// What the server calls itself (the pod name).
    pub hostname: String,
}

/// Bytes read from one TCP connection before it is closed (the echo is for tests, not bulk).
const MAX_TCP_ECHO: usize = 16 << 20;

/// Binds and serves until the task is dropped. Returns the bound address (port 0 resolved).
pub async fn serve(
    opts: ServerOptions,
) -> std::io::Result<(SocketAddr, tokio::task::JoinHandle<()>)> {
    let listener = TcpListener::bind(opts.addr).await?;
    let addr = listener.local_addr()?;
    let task = tokio::spawn(async move {
        loop {
            let Ok((tcp, peer)) = listener.accept().await else {
                continue;
            };
            let opts = opts.clone();
            tokio::spawn(async move {
                match opts.mode {
                    Mode::Http => http_conn(tcp, peer, addr, &opts.hostname).await,
                    Mode::Tcp => tcp_conn(tcp, None).await,
                    Mode::TcpServerFirst => {
                        let greeting = format!("Hostname={}\n", opts.hostname);
                        tcp_conn(tcp, Some(greeting)).await
                    }
                }
            });
        }
    });
    Ok((addr, task))
}

async fn tcp_conn(mut tcp: tokio::net::TcpStream, greeting: Option<String>) {
    if let Some(g) = greeting
        && tcp.write_all(g.as_bytes()).await.is_err()
    {
        return;
    }
    let mut buf = [0u8; 8192];
    let mut total = 0;
    while let Ok(n) = tcp.read(&mut buf).await {
        total += n;
        if n == 0 || total > MAX_TCP_ECHO || tcp.write_all(&buf[..n]).await.is_err() {
            break;
        }
    }
}

async fn http_conn(
    tcp: tokio::net::TcpStream,
    peer: SocketAddr,
    local: SocketAddr,
    hostname: &str,
) {
    let hostname = hostname.to_string();
    let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
        let body = describe(&req, peer, local, &hostname);
        async move { Ok::<_, Infallible>(Response::new(Full::new(Bytes::from(body)))) }
    });
    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
        .serve_connection(TokioIo::new(tcp), svc)
        .await;
}

/// The body of an echo answer.
pub fn describe<B>(
    req: &Request<B>,
    peer: SocketAddr,
    local: SocketAddr,
    hostname: &str,
) -> String {
    let mut out = String::new();
    let host = req
        .headers()
        .get(http::header::HOST)
        .and_then(|h| h.to_str().ok())
        .map(str::to_string)
        .or_else(|| req.uri().authority().map(|a| a.to_string()))
        .unwrap_or_default();
    let _ = writeln!(out, "ServicePort={}", local.port());
    let _ = writeln!(out, "Host={host}");
    let _ = writeln!(
        out,
        "URL={}",
        req.uri().path_and_query().map_or("/", |p| p.as_str())
    );
    let _ = writeln!(out, "Method={}", req.method());
    let _ = writeln!(out, "Proto={:?}", req.version());
    let _ = writeln!(out, "IP={}", peer.ip());
    let mut headers: Vec<(String, String)> = req
        .headers()
        .iter()
        .map(|(k, v)| {
            (
                k.as_str().to_string(),
                String::from_utf8_lossy(v.as_bytes()).into_owned(),
            )
        })
        .collect();
    headers.sort();
    for (k, v) in &headers {
        let _ = writeln!(out, "RequestHeader={k}:{v}");
    }
    if let Some(id) = req
        .headers()
        .get("x-forwarded-client-cert")
        .and_then(|v| v.to_str().ok())
        .and_then(xfcc_identity)
    {
        let _ = writeln!(out, "Identity={id}");
    }
    let _ = writeln!(out, "Hostname={hostname}");
    out
}

/// The caller's SPIFFE identity from an `x-forwarded-client-cert` header: the `URI=` of its
/// last element (the hop closest to this server).
pub fn xfcc_identity(xfcc: &str) -> Option<String> {
    xfcc.split(',').next_back()?.split(';').find_map(|kv| {
        let (k, v) = kv.split_once('=')?;
        (k.trim().eq_ignore_ascii_case("uri")).then(|| v.trim().trim_matches('"').to_string())
    })
}

#[cfg(test)]
mod tests {
    #[test]
    fn reads_identity_from_xfcc() {
        let h = "By=spiffe://cluster.local/ns/default/sa/b;Hash=abc;Subject=\"\";URI=spiffe://cluster.local/ns/default/sa/sleep";
        assert_eq!(
            super::xfcc_identity(h).as_deref(),
            Some("spiffe://cluster.local/ns/default/sa/sleep")
        );
        assert_eq!(super::xfcc_identity("Hash=x"), None);
    }
}
