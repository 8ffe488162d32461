//! Serves the gRPC services (xDS, the CA) on accepted connections with HTTP/2 settings of our
//! own: tonic's server cannot bound how much one stream queues ahead of its socket, and an
//! Envoy grants a 256 MiB window, so a full push to a thousand slow readers would otherwise
//! hold hundreds of kilobytes per proxy in the control plane.

use std::sync::Arc;
use std::time::Duration;

use hyper_util::rt::{TokioExecutor, TokioIo};
use isthmus_xds::server::PeerCertificates;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;
use tonic::codegen::Service;
use tonic::service::Routes;

/// What one stream may have queued in HTTP/2 beyond what the socket took, before its body is
/// asked for more (a response part, `isthmus_xds::server::MAX_CHUNK_BYTES`, is handed over
/// whole, and mostly shared with other streams).
pub const MAX_SEND_BUFFER: usize = 64 << 10;
/// A TLS handshake that has not finished by then is dropped.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Accepts connections on `listener` until the task is dropped; with `tls`, terminates TLS
/// first and hands the client's certificates to the services.
pub async fn serve(listener: TcpListener, routes: Routes, tls: Option<TlsAcceptor>) {
    let routes = routes.prepare();
    loop {
        let tcp = match listener.accept().await {
            Ok((tcp, _)) => tcp,
            Err(e) => {
                // Out of descriptors and the like: wait instead of spinning.
                tracing::warn!(error = %e, "accepting a gRPC connection failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let _ = tcp.set_nodelay(true);
        let (routes, tls) = (routes.clone(), tls.clone());
        tokio::spawn(async move {
            let Some(tls) = tls else {
                return connection(tcp, routes, None).await;
            };
            match tokio::time::timeout(HANDSHAKE_TIMEOUT, tls.accept(tcp)).await {
                Ok(Ok(stream)) => {
                    let certs = stream.get_ref().1.peer_certificates().map(|c| {
                        PeerCertificates(Arc::new(
                            c.iter().map(|c| c.clone().into_owned()).collect(),
                        ))
                    });
                    connection(stream, routes, certs).await;
                }
                Ok(Err(e)) => tracing::debug!(error = %e, "TLS handshake failed"),
                Err(_) => tracing::debug!("TLS handshake timed out"),
            }
        });
    }
}

async fn connection<I>(io: I, routes: Routes, certs: Option<PeerCertificates>)
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let svc = hyper::service::service_fn(move |mut req: http::Request<hyper::body::Incoming>| {
        if let Some(c) = &certs {
            req.extensions_mut().insert(c.clone());
        }
        routes.clone().call(req)
    });
    let served = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
        .max_send_buf_size(MAX_SEND_BUFFER)
        .serve_connection(TokioIo::new(io), svc)
        .await;
    if let Err(e) = served {
        tracing::debug!(error = %e, "gRPC connection ended");
    }
}
