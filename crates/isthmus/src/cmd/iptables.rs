//! `isthmus iptables`: a drop-in for `istio-iptables` (same flags, same environment, same rules).

use std::net::IpAddr;

use anyhow::{Context as _, Result};
use clap::Args;
use isthmus_capture::{CaptureConfig, InterceptionMode, config::resolv_conf_servers};

use crate::exit;

#[derive(Debug, Args)]
pub struct IptablesArgs {
    /// Port the proxy listens on for captured outbound traffic.
    #[arg(
        short = 'p',
        long = "envoy-port",
        env = "ENVOY_PORT",
        default_value_t = 15001
    )]
    envoy_port: u16,
    /// Port the proxy listens on for captured inbound traffic.
    #[arg(
        short = 'z',
        long = "inbound-capture-port",
        env = "INBOUND_CAPTURE_PORT",
        default_value_t = 15006
    )]
    inbound_capture_port: u16,
    /// HBONE tunnel port, never captured inbound.
    #[arg(
        short = 'e',
        long = "inbound-tunnel-port",
        env = "INBOUND_TUNNEL_PORT",
        default_value_t = 15008
    )]
    inbound_tunnel_port: u16,
    /// Comma-separated UIDs whose traffic is not captured (the proxy's).
    #[arg(
        short = 'u',
        long = "proxy-uid",
        env = "PROXY_UID",
        default_value = "1337"
    )]
    proxy_uid: String,
    /// Comma-separated GIDs whose traffic is not captured (defaults to the proxy UIDs).
    #[arg(short = 'g', long = "proxy-gid", env = "PROXY_GID")]
    proxy_gid: Option<String>,
    /// REDIRECT or TPROXY.
    #[arg(short = 'm', long = "istio-inbound-interception-mode", env = "ISTIO_INBOUND_INTERCEPTION_MODE", default_value = "REDIRECT", value_parser = InterceptionMode::parse)]
    mode: InterceptionMode,
    /// Mark of inbound packets in TPROXY mode.
    #[arg(
        short = 't',
        long = "istio-inbound-tproxy-mark",
        env = "ISTIO_INBOUND_TPROXY_MARK",
        default_value_t = 1337
    )]
    tproxy_mark: u32,
    /// Routing table of TPROXY mode.
    #[arg(
        short = 'r',
        long = "istio-inbound-tproxy-route-table",
        env = "ISTIO_INBOUND_TPROXY_ROUTE_TABLE",
        default_value_t = 133
    )]
    tproxy_route_table: u32,
    /// Inbound ports to capture: a list, `*` for all, empty for none.
    #[arg(
        short = 'b',
        long = "istio-inbound-ports",
        env = "ISTIO_INBOUND_PORTS",
        default_value = ""
    )]
    inbound_ports: String,
    /// Inbound ports not to capture (with `-b '*'`).
    #[arg(
        short = 'd',
        long = "istio-local-exclude-ports",
        env = "ISTIO_LOCAL_EXCLUDE_PORTS",
        default_value = ""
    )]
    inbound_exclude_ports: String,
    /// Outbound CIDRs to capture, `*` for all.
    #[arg(
        short = 'i',
        long = "istio-service-cidr",
        env = "ISTIO_SERVICE_CIDR",
        default_value = ""
    )]
    service_cidr: String,
    /// Outbound CIDRs not to capture.
    #[arg(
        short = 'x',
        long = "istio-service-exclude-cidr",
        env = "ISTIO_SERVICE_EXCLUDE_CIDR",
        default_value = ""
    )]
    service_exclude_cidr: String,
    /// Outbound ports to capture whatever the destination.
    #[arg(
        short = 'q',
        long = "istio-outbound-ports",
        env = "ISTIO_OUTBOUND_PORTS",
        default_value = ""
    )]
    outbound_ports: String,
    /// Outbound ports never captured.
    #[arg(
        short = 'o',
        long = "istio-local-outbound-ports-exclude",
        env = "ISTIO_LOCAL_OUTBOUND_PORTS_EXCLUDE",
        default_value = ""
    )]
    outbound_exclude_ports: String,
    /// Interfaces whose traffic is never captured.
    #[arg(
        short = 'c',
        long = "istio-exclude-interfaces",
        env = "ISTIO_EXCLUDE_INTERFACES",
        default_value = ""
    )]
    exclude_interfaces: String,
    /// Virtual (e.g. KubeVirt) interfaces whose traffic is treated as outbound.
    #[arg(
        short = 'k',
        long = "kube-virt-interfaces",
        env = "KUBE_VIRT_INTERFACES",
        default_value = ""
    )]
    kube_virt_interfaces: String,
    /// Send DNS to the agent's resolver on 15053 (servers from /etc/resolv.conf).
    #[arg(long = "redirect-dns", env = "ISTIO_META_DNS_CAPTURE")]
    redirect_dns: bool,
    /// With --redirect-dns, capture DNS to any server.
    #[arg(long = "capture-all-dns")]
    capture_all_dns: bool,
    /// Drop packets conntrack considers invalid instead of resetting connections.
    #[arg(long = "drop-invalid", env = "INVALID_DROP")]
    drop_invalid: bool,
    /// Print what would be executed, change nothing.
    #[arg(short = 'n', long = "dry-run")]
    dry_run: bool,
    /// Remove the capture rules and routes instead of installing them.
    #[arg(long = "cleanup", alias = "cleanup-only")]
    cleanup: bool,
    /// resolv.conf to read DNS servers from.
    #[arg(long = "resolv-conf", default_value = "/etc/resolv.conf", hide = true)]
    resolv_conf: String,
}

pub fn run(a: IptablesArgs) -> Result<i32> {
    let cfg = config(&a)?;
    if let Err(e) = cfg.validate() {
        eprintln!("error: {e}");
        return Ok(exit::USAGE);
    }
    if a.dry_run {
        print!("{}", isthmus_capture::dry_run(&cfg)?);
        return Ok(exit::OK);
    }
    if a.cleanup {
        isthmus_capture::cleanup(&cfg).context("removing capture rules")?;
        eprintln!("capture rules removed");
        return Ok(exit::OK);
    }
    let report = isthmus_capture::apply(&cfg).context("installing capture rules")?;
    for cidr in &report.skipped_cidrs {
        eprintln!("warning: ignoring invalid CIDR {cidr:?}");
    }
    if report.installed.is_empty() {
        eprintln!("capture rules already in place");
    } else {
        eprintln!("capture rules installed ({:?})", report.installed);
    }
    Ok(exit::OK)
}

fn env(name: &str) -> Option<String> {
    std::env::var(name).ok()
}

fn config(a: &IptablesArgs) -> Result<CaptureConfig> {
    let defaults = CaptureConfig::default();
    let mut cfg = CaptureConfig {
        proxy_port: a.envoy_port,
        inbound_capture_port: a.inbound_capture_port,
        inbound_tunnel_port: a.inbound_tunnel_port,
        proxy_uid: a.proxy_uid.clone(),
        proxy_gid: a.proxy_gid.clone().unwrap_or_else(|| a.proxy_uid.clone()),
        inbound_interception_mode: a.mode,
        inbound_tproxy_mark: a.tproxy_mark,
        inbound_tproxy_route_table: a.tproxy_route_table,
        inbound_ports_include: a.inbound_ports.clone(),
        inbound_ports_exclude: a.inbound_exclude_ports.clone(),
        outbound_ip_ranges_include: a.service_cidr.clone(),
        outbound_ip_ranges_exclude: a.service_exclude_cidr.clone(),
        outbound_ports_include: a.outbound_ports.clone(),
        outbound_ports_exclude: a.outbound_exclude_ports.clone(),
        reroute_virtual_interfaces: a.kube_virt_interfaces.clone(),
        exclude_interfaces: a.exclude_interfaces.clone(),
        owner_groups_include: env("ISTIO_OUTBOUND_OWNER_GROUPS")
            .unwrap_or(defaults.owner_groups_include),
        owner_groups_exclude: env("ISTIO_OUTBOUND_OWNER_GROUPS_EXCLUDE").unwrap_or_default(),
        host_ipv4_loopback_cidr: env("ISTIO_OUTBOUND_IPV4_LOOPBACK_CIDR")
            .unwrap_or(defaults.host_ipv4_loopback_cidr),
        redirect_dns: a.redirect_dns,
        capture_all_dns: a.capture_all_dns,
        drop_invalid: a.drop_invalid,
        enable_ipv6: pod_is_ipv6(),
        ..defaults
    };
    if cfg.redirect_dns {
        // A missing resolv.conf means no servers: DNS capture then only works with
        // --capture-all-dns, as in istio-iptables.
        let text = std::fs::read_to_string(&a.resolv_conf).unwrap_or_default();
        (cfg.dns_servers_v4, cfg.dns_servers_v6) = resolv_conf_servers(&text);
    }
    Ok(cfg)
}

/// IPv6 rules are installed when the pod's address is IPv6: `INSTANCE_IP` when set, else the
/// namespace's interface addresses (IPv6 only when there is no IPv4 one).
fn pod_is_ipv6() -> bool {
    if let Some(ip) = env("INSTANCE_IP").and_then(|s| s.parse::<IpAddr>().ok()) {
        return ip.is_ipv6();
    }
    let Ok(addrs) = nix::ifaddrs::getifaddrs() else {
        return false;
    };
    let (mut v4, mut v6) = (false, false);
    for a in addrs {
        let Some(addr) = a.address else { continue };
        if let Some(sin) = addr.as_sockaddr_in() {
            v4 |= !sin.ip().is_loopback() && !sin.ip().is_link_local();
        } else if let Some(sin6) = addr.as_sockaddr_in6() {
            let ip = sin6.ip();
            v6 |= !ip.is_loopback() && !ip.is_unicast_link_local();
        }
    }
    v6 && !v4
}
