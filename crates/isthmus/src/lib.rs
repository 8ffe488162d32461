//! The isthmus command line: every subcommand, shared by the `isthmus` binary and the
//! sidecar-only `isthmus-proxy`.

pub mod cmd;
pub mod exit;

/// The version both binaries print: the package's and the build's fingerprint of the sources
/// (see `build.rs`), equal only for binaries built from the same code.
pub const VERSION: &str = concat!(
    env!("CARGO_PKG_VERSION"),
    " (build ",
    env!("ISTHMUS_BUILD_ID"),
    ")"
);
