//! Subcommands.

pub mod analyze;
pub mod iptables;
