//! Subcommands.

pub mod analyze;
mod config_tables;
pub mod control_plane;
pub mod demo;
pub mod echo;
pub mod iptables;
pub mod local;
pub mod precheck;
pub mod proxy;
pub mod proxy_config;
pub mod proxy_status;
pub mod token;

use std::path::Path;

use std::time::Duration;

use anyhow::{Context as _, Result, bail};
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;

/// Reads one YAML document into `T` (mesh config files and the like).
pub(crate) fn read_yaml<T: serde::de::DeserializeOwned>(p: &Path) -> Result<T> {
    let text = std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?;
    serde_saphyr::from_str(&text).with_context(|| format!("parsing {}", p.display()))
}

/// Longest a debug request may take; the body is bounded too.
const TIMEOUT: Duration = Duration::from_secs(10);
const MAX_BODY: usize = 64 << 20;

/// `method` on `path` at `addr` (host:port), bounded in time and size.
async fn http_request(method: hyper::Method, addr: &str, path: &str) -> Result<bytes::Bytes> {
    let work = async {
        let tcp = tokio::net::TcpStream::connect(addr)
            .await
            .with_context(|| format!("connecting to the control plane at {addr}"))?;
        let (mut sender, conn) =
            hyper::client::conn::http1::handshake::<_, Empty<bytes::Bytes>>(TokioIo::new(tcp))
                .await?;
        tokio::spawn(conn);
        let req = hyper::Request::builder()
            .method(method)
            .uri(path)
            .header(hyper::header::HOST, addr)
            .body(Empty::new())?;
        let resp = sender.send_request(req).await?;
        let status = resp.status();
        if !status.is_success() {
            // The first line of the answer says why, where the server says.
            let body = http_body_util::Limited::new(resp.into_body(), 4096)
                .collect()
                .await
                .map(|b| b.to_bytes())
                .unwrap_or_default();
            let text = String::from_utf8_lossy(&body);
            match text.lines().next().map(str::trim).filter(|l| !l.is_empty()) {
                Some(why) => bail!("{path}: {status}: {why}"),
                None => bail!("{path}: {status}"),
            }
        }
        let body = http_body_util::Limited::new(resp.into_body(), MAX_BODY)
            .collect()
            .await
            .map_err(|e| anyhow::anyhow!("reading {path}: {e}"))?;
        Ok(body.to_bytes())
    };
    tokio::time::timeout(TIMEOUT, work)
        .await
        .with_context(|| format!("{addr}{path}: no answer within {TIMEOUT:?}"))?
}

/// Columns padded like istioctl's tabwriter output.
pub(crate) fn render_table(rows: &[Vec<String>]) -> String {
    let cols = rows.first().map_or(0, Vec::len);
    let widths: Vec<usize> = (0..cols)
        .map(|i| rows.iter().map(|r| r[i].len()).max().unwrap_or(0))
        .collect();
    let mut out = String::new();
    for r in rows {
        let cells: Vec<String> = r
            .iter()
            .zip(&widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect();
        out.push_str(cells.join("     ").trim_end());
        out.push('\n');
    }
    out
}

/// The local runtime needs root and a few system tools; on a fresh Debian machine it installs
/// the missing packages itself.
pub(crate) fn require_root_and_tools() -> Result<()> {
    if !nix::unistd::geteuid().is_root() {
        bail!("the local runtime creates network namespaces: run it as root");
    }
    let have = |tool: &str| {
        ["/usr/sbin", "/usr/bin", "/sbin", "/bin"]
            .iter()
            .any(|d| Path::new(d).join(tool).exists())
    };
    let missing: Vec<&str> = [
        ("ip", "iproute2"),
        ("iptables-restore", "iptables"),
        ("setpriv", "util-linux"),
    ]
    .iter()
    .filter(|(tool, _)| !have(tool))
    .map(|(_, pkg)| *pkg)
    .collect();
    if missing.is_empty() {
        return Ok(());
    }
    if !have("apt-get") {
        bail!("missing system packages: {}", missing.join(", "));
    }
    eprintln!("installing {} with apt-get", missing.join(", "));
    let ok = std::process::Command::new("apt-get")
        .arg("update")
        .status()
        .is_ok_and(|s| s.success())
        && std::process::Command::new("apt-get")
            .args(["install", "-y"])
            .args(&missing)
            .env("DEBIAN_FRONTEND", "noninteractive")
            .status()
            .is_ok_and(|s| s.success());
    if !ok {
        bail!("could not install {}", missing.join(", "));
    }
    Ok(())
}

/// GET from an address inside a network namespace (a pod's admin port, the local runtime's
/// control plane): a thread enters the namespace and runs the request there.
pub(crate) fn http_get_in(netns: Option<&str>, addr: &str, path: &str) -> Result<bytes::Bytes> {
    http_in(netns, hyper::Method::GET, addr, path)
}

/// [`http_get_in`] with another method.
pub(crate) fn http_in(
    netns: Option<&str>,
    method: hyper::Method,
    addr: &str,
    path: &str,
) -> Result<bytes::Bytes> {
    let (netns, addr, path) = (
        netns.map(str::to_string),
        addr.to_string(),
        path.to_string(),
    );
    std::thread::spawn(move || -> Result<bytes::Bytes> {
        if let Some(ns) = &netns {
            isthmus_local::runtime::enter_netns(ns)?;
        }
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .context("starting the runtime")?
            .block_on(http_request(method, &addr, &path))
    })
    .join()
    .map_err(|_| anyhow::anyhow!("request thread panicked"))?
}
