//! The gRPC echo: Istio's `proto.EchoTestService/Echo` (same package, method and field numbers
//! as Istio's echo app), answering with the same description lines as the HTTP echo.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use tonic::{Request, Response, Status};

use crate::client::{Answer, ClientError};
use crate::server::describe;

#[derive(Clone, PartialEq, prost::Message)]
pub struct EchoRequest {
    #[prost(string, tag = "1")]
    pub message: String,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct EchoResponse {
    #[prost(string, tag = "1")]
    pub message: String,
}

include!(concat!(env!("OUT_DIR"), "/proto.EchoTestService.rs"));

struct Echo {
    hostname: String,
    local: SocketAddr,
}

#[tonic::async_trait]
impl echo_test_service_server::EchoTestService for Echo {
    async fn echo(&self, req: Request<EchoRequest>) -> Result<Response<EchoResponse>, Status> {
        let peer = req
            .remote_addr()
            .unwrap_or_else(|| SocketAddr::from(([0, 0, 0, 0], 0)));
        let mut head = http::Request::builder()
            .method(http::Method::POST)
            .uri("/proto.EchoTestService/Echo")
            .version(http::Version::HTTP_2);
        if let Some(h) = head.headers_mut() {
            *h = req.metadata().clone().into_headers();
        }
        let head = head.body(()).map_err(|e| Status::internal(e.to_string()))?;
        let mut message = describe(&head, peer, self.local, &self.hostname);
        message.push_str(&format!("Echo={}\n", req.get_ref().message));
        Ok(Response::new(EchoResponse { message }))
    }
}

/// Serves the gRPC echo on `addr` until the task is dropped.
pub async fn serve(
    addr: SocketAddr,
    hostname: String,
) -> std::io::Result<(SocketAddr, tokio::task::JoinHandle<()>)> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let local = listener.local_addr()?;
    let svc = echo_test_service_server::EchoTestServiceServer::new(Echo { hostname, local });
    let task = tokio::spawn(async move {
        let incoming = tonic::transport::server::TcpIncoming::from(listener);
        if let Err(e) = tonic::transport::Server::builder()
            .add_service(svc)
            .serve_with_incoming(incoming)
            .await
        {
            tracing::warn!(error = %e, "gRPC echo server stopped");
        }
    });
    Ok((local, task))
}

/// One `Echo` call to `authority` (`host:port`) on a fresh connection.
pub async fn call(
    authority: &str,
    message: &str,
    timeout: Duration,
) -> Result<Answer, ClientError> {
    let start = Instant::now();
    let work = async {
        let channel = tonic::transport::Endpoint::from_shared(format!("http://{authority}"))
            .map_err(|_| ClientError::Url(authority.to_string()))?
            .connect()
            .await
            .map_err(|e| ClientError::Connect {
                addr: authority.to_string(),
                source: std::io::Error::other(e),
            })?;
        let mut client = echo_test_service_client::EchoTestServiceClient::new(channel);
        Ok(
            match client
                .echo(EchoRequest {
                    message: message.to_string(),
                })
                .await
            {
                // Istio's echo client prints gRPC success as StatusCode=200 too.
                Ok(resp) => Answer {
                    status: 200,
                    body: resp.into_inner().message,
                    elapsed: start.elapsed(),
                    ..Default::default()
                },
                Err(status) => Answer {
                    status: 500,
                    body: format!("grpc-status={:?} {}", status.code(), status.message()),
                    elapsed: start.elapsed(),
                    ..Default::default()
                },
            },
        )
    };
    tokio::time::timeout(timeout, work)
        .await
        .map_err(|_| ClientError::Timeout(timeout))?
}
