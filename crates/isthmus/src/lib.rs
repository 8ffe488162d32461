//! The isthmus command line: every subcommand, shared by the `isthmus` binary and the
//! sidecar-only `isthmus-proxy`.

pub mod cmd;
pub mod exit;
