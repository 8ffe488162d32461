//! `isthmus create-token`: a workload token for the CA, as `kubectl create token` prints one.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context as _, Result};
use clap::Args;
use isthmus_ca::TokenAuthority;
use isthmus_config::istio::common::parse_go_duration;

use crate::exit;

/// Where the control plane keeps its CA (Istio's file layout) unless told otherwise.
pub const DEFAULT_CA_DIR: &str = "/var/lib/isthmus/ca";

#[derive(Debug, Args)]
pub struct CreateTokenArgs {
    /// The service account the token is for.
    service_account: String,
    /// Its namespace.
    #[arg(short = 'n', long, default_value = "default")]
    namespace: String,
    /// How long the token is valid (Go duration: `1h`, `30m`).
    #[arg(long, default_value = "1h", value_parser = parse_go_duration)]
    duration: Duration,
    /// The control plane's CA directory (holds the token signing key).
    #[arg(long = "ca-dir", env = "ISTHMUS_CA_DIR", default_value = DEFAULT_CA_DIR)]
    ca_dir: PathBuf,
}

pub fn run(a: CreateTokenArgs) -> Result<i32> {
    let tokens = TokenAuthority::load_or_create(&a.ca_dir)
        .with_context(|| format!("token signing key in {}", a.ca_dir.display()))?;
    println!(
        "{}",
        tokens.issue(&a.namespace, &a.service_account, a.duration)
    );
    Ok(exit::OK)
}
