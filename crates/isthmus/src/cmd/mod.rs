//! Subcommands.

pub mod analyze;
pub mod iptables;
pub mod token;
