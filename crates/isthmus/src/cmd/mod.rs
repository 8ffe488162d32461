//! Subcommands.

pub mod analyze;
