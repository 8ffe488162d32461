//! `isthmus control-plane`: istiod for the embedded default, reading a directory of YAML.

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::{Context as _, Result};
use clap::Args;
use isthmus_config::MeshConfig;

use crate::cmd::read_yaml;
use crate::exit;

#[derive(Debug, Args)]
pub struct ControlPlaneArgs {
    /// Directory of Kubernetes and Istio YAML to serve; watched for changes.
    #[arg(long = "config-dir")]
    config_dir: PathBuf,
    /// Plaintext xDS (Istio's 15010).
    #[arg(long = "xds-addr", default_value = "127.0.0.1:15010")]
    xds_addr: SocketAddr,
    /// Monitoring and debug HTTP (Istio's 15014).
    #[arg(long = "http-addr", default_value = "127.0.0.1:15014")]
    http_addr: SocketAddr,
    /// MeshConfig file (Istio's defaults otherwise).
    #[arg(long = "meshConfig")]
    mesh_config: Option<PathBuf>,
    /// Cluster DNS domain.
    #[arg(long, default_value = "cluster.local")]
    domain: String,
    /// Run the CA, keeping Istio's file layout (root-cert.pem, ca-cert.pem, …) in this directory,
    /// and serve it with xDS over TLS on --secure-addr.
    #[arg(long = "ca-dir", env = "ISTHMUS_CA_DIR")]
    ca_dir: Option<PathBuf>,
    /// TLS port for the CA and xDS (Istio's 15012).
    #[arg(long = "secure-addr", default_value = "127.0.0.1:15012")]
    secure_addr: SocketAddr,
    /// DNS names of the control plane's serving certificate (istiod's by default).
    #[arg(long = "dns-name")]
    dns_names: Vec<String>,
    /// Istio's switch of seeds 000-001: `false` sends inbound traffic to 127.0.0.1.
    #[arg(long, env = "PILOT_ENABLE_INBOUND_PASSTHROUGH")]
    inbound_passthrough: Option<bool>,
}

pub fn run(a: ControlPlaneArgs) -> Result<i32> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    // No transparent huge pages: each fresh 2 MB page the allocator touches is zeroed whole,
    // which made a push context rebuild half again as long and added 50 MB of RSS at 1,000
    // proxies (docs/benchmarks.md). Only this process: it starts no children to inherit it.
    if let Err(e) = nix::sys::prctl::set_thp_disable(true) {
        tracing::debug!("transparent huge pages stay enabled: {e}");
    }
    let mesh: MeshConfig = match &a.mesh_config {
        Some(p) => read_yaml(p)?,
        None => MeshConfig::default(),
    };
    let trust_domain = mesh.trust_domain().to_string();
    let root_namespace = mesh.root_namespace().to_string();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the runtime")?;
    runtime.block_on(async move {
        let running = isthmus_controlplane::start(isthmus_controlplane::Options {
            config_dir: a.config_dir.clone(),
            xds_addr: a.xds_addr,
            http_addr: a.http_addr,
            domain: a.domain,
            mesh,
            inbound_passthrough: a.inbound_passthrough,
            ca: a.ca_dir.map(|dir| isthmus_controlplane::CaOptions {
                dir,
                secure_addr: a.secure_addr,
                trust_domain: trust_domain.clone(),
                dns_names: if a.dns_names.is_empty() {
                    isthmus_controlplane::istiod_dns_names(&root_namespace)
                } else {
                    a.dns_names
                },
            }),
        })
        .await
        .with_context(|| format!("control plane for {}", a.config_dir.display()))?;
        let secure = running.secure_addr.map(|a| a.to_string()).unwrap_or_else(|| "off".into());
        tracing::info!(xds = %running.xds_addr, http = %running.http_addr, secure, "control plane serving");
        tokio::signal::ctrl_c()
            .await
            .context("waiting for a signal")?;
        tracing::info!("shutting down");
        drop(running);
        Ok::<_, anyhow::Error>(())
    })?;
    Ok(exit::OK)
}
