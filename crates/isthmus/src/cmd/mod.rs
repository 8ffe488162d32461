//! Subcommands.

pub mod analyze;
pub mod control_plane;
pub mod iptables;
pub mod proxy_status;
pub mod token;

use std::path::Path;

use anyhow::{Context as _, Result};

/// Reads one YAML document into `T` (mesh config files and the like).
pub(crate) fn read_yaml<T: serde::de::DeserializeOwned>(p: &Path) -> Result<T> {
    let text = std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?;
    serde_saphyr::from_str(&text).with_context(|| format!("parsing {}", p.display()))
}
