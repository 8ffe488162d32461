//! `isthmus-proxy`: the sidecar alone (`isthmus proxy` without the other subcommands). Every
//! pod runs one, and a binary holding only the data path maps a third of the code.

use clap::Parser;
use isthmus::{cmd, exit};

#[derive(Debug, Parser)]
#[command(
    name = "isthmus-proxy",
    version = isthmus::VERSION,
    about = "The isthmus sidecar proxy (Envoy and pilot-agent of an `istio-proxy` container)"
)]
struct Cli {
    #[command(flatten)]
    args: cmd::proxy::ProxyArgs,
}

fn main() {
    let cli: Cli = exit::parse_args();
    exit::finish(cmd::proxy::run(cli.args))
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_command_line_is_consistent() {
        use clap::CommandFactory;
        super::Cli::command().debug_assert();
    }
}
