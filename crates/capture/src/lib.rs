//! Transparent traffic capture for the sidecar: istio-iptables' chains and rules, rendered
//! (`rules`), configured as istio-iptables is (`config`), and installed or removed in the
//! current network namespace (`apply`).

pub mod apply;
pub mod config;
pub mod rules;

pub use apply::{ApplyReport, CaptureError, Family, apply, cleanup, dry_run};
pub use config::{CaptureConfig, ConfigError, InterceptionMode};
pub use rules::{RuleSet, build};
