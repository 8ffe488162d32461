//! `isthmus`: a service mesh that speaks Istio's APIs. One binary, many subcommands.

use clap::{Parser, Subcommand};
use isthmus::{cmd, exit};

/// mimalloc for the control plane and the tools; the sidecar (`isthmus-proxy`) keeps glibc's
/// malloc, with which it needs 15 MB instead of 24 (docs/benchmarks.md).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Debug, Parser)]
#[command(
    name = "isthmus",
    version = isthmus::VERSION,
    about = "A service mesh that speaks Istio's APIs",
    propagate_version = true
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Analyze Kubernetes and Istio configuration, as `istioctl analyze` does.
    Analyze(cmd::analyze::AnalyzeArgs),
    /// Install the sidecar's traffic capture rules, as `istio-iptables` does.
    Iptables(cmd::iptables::IptablesArgs),
    /// Print a workload token for the mesh CA, as `kubectl create token` does.
    CreateToken(cmd::token::CreateTokenArgs),
    /// Run the control plane (istiod): xDS on 15010, monitoring on 15014.
    ControlPlane(cmd::control_plane::ControlPlaneArgs),
    /// Show which proxies are in sync with the control plane, as `istioctl proxy-status`.
    ProxyStatus(cmd::proxy_status::ProxyStatusArgs),
    /// Show a proxy's clusters, listeners, routes or endpoints, as `istioctl proxy-config`.
    ProxyConfig(cmd::proxy_config::ProxyConfigArgs),
    /// Run the sidecar proxy (Envoy and pilot-agent of an `istio-proxy` container).
    Proxy(cmd::proxy::ProxyArgs),
    /// Check a running mesh for ports exposed by Services but bound to localhost (IST0143).
    Precheck(cmd::precheck::PrecheckArgs),
    /// Bring an example up, send traffic through it, show what happened, tear it down.
    Demo(cmd::demo::DemoArgs),
    /// Run a mesh on this machine: pods as network namespaces, with the control plane.
    Up(cmd::local::UpArgs),
    /// Tear down a mesh started by `up` (also after a crash).
    Down(cmd::local::MeshArgs),
    /// The pods of a mesh started by `up`.
    Status(cmd::local::StatusArgs),
    /// A pod's log (`-c istio-proxy` for its sidecar).
    Logs(cmd::local::LogsArgs),
    /// Run a command inside a pod's network namespace, as `kubectl exec`.
    Exec(cmd::local::ExecArgs),
    /// The echo test app (server), or `echo client URL` to call one.
    Echo(cmd::echo::EchoArgs),
}

fn main() {
    let cli: Cli = exit::parse_args();
    let result = match cli.command {
        Command::Analyze(a) => cmd::analyze::run(a),
        Command::Iptables(a) => cmd::iptables::run(a),
        Command::CreateToken(a) => cmd::token::run(a),
        Command::ControlPlane(a) => cmd::control_plane::run(a),
        Command::ProxyStatus(a) => cmd::proxy_status::run(a),
        Command::ProxyConfig(a) => cmd::proxy_config::run(a),
        Command::Echo(a) => cmd::echo::run(a),
        Command::Proxy(a) => cmd::proxy::run(a),
        Command::Demo(a) => cmd::demo::run(a),
        Command::Precheck(a) => cmd::precheck::run(a),
        Command::Up(a) => cmd::local::up(a),
        Command::Down(a) => cmd::local::down(a),
        Command::Status(a) => cmd::local::status(a),
        Command::Logs(a) => cmd::local::logs(a),
        Command::Exec(a) => cmd::local::exec(a),
    };
    exit::finish(result)
}

#[cfg(test)]
mod tests {
    /// clap's own checks of every subcommand's flags (names used twice, bad defaults), which
    /// otherwise fail only when that subcommand is run.
    #[test]
    fn the_command_line_is_consistent() {
        use clap::CommandFactory;
        super::Cli::command().debug_assert();
    }
}
