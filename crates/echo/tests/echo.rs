//! The echo app over real loopback sockets: HTTP/1.1, cleartext HTTP/2, TCP, server-first TCP.

use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::{TokioExecutor, TokioIo};
use isthmus_echo::{Mode, ServerOptions, client, serve};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

async fn start(mode: Mode) -> std::net::SocketAddr {
    let (addr, task) = serve(ServerOptions {
        addr: "127.0.0.1:0".parse().unwrap(),
        mode,
        hostname: "echo-0".into(),
    })
    .await
    .unwrap();
    // Dropping the handle detaches the task: the server lives as long as the test's runtime.
    drop(task);
    addr
}

#[tokio::test]
async fn http1_answer_describes_the_request_and_the_caller_identity() {
    let addr = start(Mode::Http).await;
    let xfcc = (
        "x-forwarded-client-cert".to_string(),
        "By=x;URI=spiffe://cluster.local/ns/a/sa/b".to_string(),
    );
    let answer = client::request(
        &http::Method::GET,
        &format!("http://{addr}/p?q=1"),
        &[xfcc],
        Duration::from_secs(5),
    )
    .await
    .unwrap();
    assert_eq!(answer.status, 200);
    assert_eq!(answer.field("Hostname"), Some("echo-0"));
    assert_eq!(answer.field("URL"), Some("/p?q=1"));
    assert_eq!(answer.field("Proto"), Some("HTTP/1.1"));
    assert_eq!(
        answer.field("Identity"),
        Some("spiffe://cluster.local/ns/a/sa/b")
    );
}

#[tokio::test]
async fn http2_cleartext_on_the_same_port() {
    let addr = start(Mode::Http).await;
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (mut sender, conn) = hyper::client::conn::http2::handshake::<_, _, Empty<Bytes>>(
        TokioExecutor::new(),
        TokioIo::new(tcp),
    )
    .await
    .unwrap();
    tokio::spawn(conn);
    let req = http::Request::get(format!("http://{addr}/h2"))
        .body(Empty::new())
        .unwrap();
    let resp = tokio::time::timeout(Duration::from_secs(5), sender.send_request(req))
        .await
        .unwrap()
        .unwrap();
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    let body = String::from_utf8_lossy(&body);
    assert!(body.contains("Proto=HTTP/2.0"), "{body}");
}

#[tokio::test]
async fn tcp_echo_and_server_first() {
    let addr = start(Mode::Tcp).await;
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(b"ping").await.unwrap();
    let mut buf = [0u8; 4];
    tokio::time::timeout(Duration::from_secs(5), s.read_exact(&mut buf))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(&buf, b"ping");

    let addr = start(Mode::TcpServerFirst).await;
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let mut greeting = [0u8; 16];
    tokio::time::timeout(Duration::from_secs(5), s.read_exact(&mut greeting))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(&greeting, b"Hostname=echo-0\n");
}

#[tokio::test]
async fn grpc_echo_answers_like_istios_echo_service() {
    let (addr, _task) = isthmus_echo::grpc::serve("127.0.0.1:0".parse().unwrap(), "pod-g".into())
        .await
        .unwrap();
    let answer = isthmus_echo::grpc::call(
        &addr.to_string(),
        "hello",
        std::time::Duration::from_secs(5),
    )
    .await
    .unwrap();
    assert_eq!(answer.status, 200, "{}", answer.body);
    assert_eq!(answer.field("Hostname"), Some("pod-g"));
    assert_eq!(answer.field("Echo"), Some("hello"));
    assert_eq!(answer.field("Proto"), Some("HTTP/2.0"));
    assert_eq!(answer.field("URL"), Some("/proto.EchoTestService/Echo"));
}
