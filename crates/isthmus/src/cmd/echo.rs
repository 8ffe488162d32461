//! `isthmus echo`: the test app (server), and `isthmus echo client URL` to send it traffic.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use anyhow::{Context as _, Result};
use clap::{Args, Subcommand};
use isthmus_echo::{Mode, ServerOptions};

use crate::exit;

#[derive(Debug, Args)]
#[command(args_conflicts_with_subcommands = true)]
pub struct EchoArgs {
    #[command(subcommand)]
    client: Option<EchoCommand>,
    /// Port to listen on (0 picks one; the address is printed).
    #[arg(long, default_value_t = 8080)]
    port: u16,
    /// Address to bind: 0.0.0.0, 127.0.0.1 (only reachable inside the pod, seed 002) or the pod IP.
    #[arg(long, default_value = "0.0.0.0")]
    bind: IpAddr,
    /// Echo raw TCP instead of HTTP.
    #[arg(long)]
    tcp: bool,
    /// With --tcp, greet first (a server-first protocol such as MySQL).
    #[arg(long = "server-first", requires = "tcp")]
    server_first: bool,
    /// Also serve gRPC (Istio's `proto.EchoTestService`) on this port.
    #[arg(long = "grpc-port")]
    grpc_port: Option<u16>,
    /// The name answers carry (default: the host name, i.e. the pod name).
    #[arg(long, env = "HOSTNAME")]
    hostname: Option<String>,
}

#[derive(Debug, Subcommand)]
enum EchoCommand {
    /// Send requests to an echo server and print what it saw.
    Client(ClientArgs),
}

#[derive(Debug, Args)]
struct ClientArgs {
    /// http://host:port/path, tcp://host:port (sends a line, expects it echoed), or
    /// grpc://host:port (Istio's EchoTestService/Echo), or tcp-server-first://host:port (reads
    /// the server's greeting without sending)
    url: String,
    /// How many requests (each on a new connection).
    #[arg(long, default_value_t = 1)]
    count: u32,
    /// Extra request header `Name: value` (repeatable).
    #[arg(short = 'H', long = "header")]
    headers: Vec<String>,
    /// The HTTP method of each request.
    #[arg(long, default_value = "GET")]
    method: hyper::Method,
    /// Per-request timeout (Go duration).
    #[arg(long, default_value = "5s", value_parser = isthmus_config::istio::common::parse_go_duration)]
    timeout: Duration,
}

pub fn run(a: EchoArgs) -> Result<i32> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the runtime")?;
    match a.client {
        Some(EchoCommand::Client(c)) => runtime.block_on(client(c)),
        None => runtime.block_on(server(a)),
    }
}

async fn server(a: EchoArgs) -> Result<i32> {
    let mode = match (a.tcp, a.server_first) {
        (false, _) => Mode::Http,
        (true, false) => Mode::Tcp,
        (true, true) => Mode::TcpServerFirst,
    };
    let hostname = a.hostname.unwrap_or_else(|| {
        nix::unistd::gethostname()
            .ok()
            .and_then(|h| h.into_string().ok())
            .unwrap_or_default()
    });
    let (addr, task) = isthmus_echo::serve(ServerOptions {
        addr: SocketAddr::new(a.bind, a.port),
        mode,
        hostname: hostname.clone(),
    })
    .await
    .with_context(|| format!("listening on {}:{}", a.bind, a.port))?;
    eprintln!("echo listening on {addr} ({mode:?})");
    let grpc = match a.grpc_port {
        Some(port) => {
            let (addr, task) = isthmus_echo::grpc::serve(SocketAddr::new(a.bind, port), hostname)
                .await
                .with_context(|| format!("listening on {}:{port}", a.bind))?;
            eprintln!("echo listening on {addr} (gRPC)");
            Some(task)
        }
        None => None,
    };
    let grpc = async move {
        match grpc {
            Some(t) => {
                let _ = t.await;
            }
            None => std::future::pending().await,
        }
    };
    tokio::select! {
        _ = task => {}
        _ = grpc => {}
        _ = tokio::signal::ctrl_c() => {}
    }
    Ok(exit::OK)
}

async fn client(c: ClientArgs) -> Result<i32> {
    let headers: Vec<(String, String)> = c
        .headers
        .iter()
        .map(|h| {
            h.split_once(':')
                .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
                .with_context(|| format!("header {h:?} is not `Name: value`"))
        })
        .collect::<Result<_>>()?;
    let mut failed = 0;
    for i in 0..c.count {
        let answer = if let Some(addr) = c.url.strip_prefix("tcp-server-first://") {
            isthmus_echo::client::tcp_read_first(addr.trim_end_matches('/'), c.timeout).await
        } else if let Some(addr) = c.url.strip_prefix("tcp://") {
            let addr = addr.trim_end_matches('/');
            isthmus_echo::client::tcp(addr, &format!("isthmus {i}\n"), c.timeout).await
        } else if let Some(addr) = c.url.strip_prefix("grpc://") {
            let addr = addr.trim_end_matches('/');
            isthmus_echo::grpc::call(addr, &format!("isthmus {i}"), c.timeout).await
        } else {
            isthmus_echo::client::request(&c.method, &c.url, &headers, c.timeout).await
        };
        match answer {
            Ok(answer) => {
                println!(
                    "[{i}] StatusCode={} Time={:?}",
                    answer.status, answer.elapsed
                );
                for (k, v) in &answer.headers {
                    println!("[{i}] ResponseHeader={k}:{v}");
                }
                for line in answer.body.lines() {
                    println!("[{i} body] {line}");
                }
                if answer.status >= 400 {
                    failed += 1;
                }
            }
            Err(e) => {
                println!("[{i}] error: {e}");
                failed += 1;
            }
        }
    }
    println!("{} succeeded, {failed} failed", c.count - failed);
    Ok(if failed == 0 { exit::OK } else { exit::FAILURE })
}
