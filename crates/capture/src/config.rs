//! The capture configuration: istio-iptables' settings, with its defaults and its parsing rules.

use std::net::IpAddr;

use ipnet::IpNet;

/// How inbound traffic reaches the proxy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum InterceptionMode {
    /// NAT REDIRECT to the inbound capture port (the original destination is read back with
    /// `SO_ORIGINAL_DST`; the source address is the proxy's).
    #[default]
    Redirect,
    /// TPROXY in the mangle table with policy routing: the proxy sees the original source.
    Tproxy,
}

impl InterceptionMode {
    pub fn parse(s: &str) -> Result<Self, String> {
        match s {
            "REDIRECT" => Ok(Self::Redirect),
            "TPROXY" => Ok(Self::Tproxy),
            _ => Err(format!(
                "invalid interception mode {s:?}: expected REDIRECT or TPROXY"
            )),
        }
    }
}

/// Every setting of istio-iptables. List-valued settings keep istio-iptables' comma-separated
/// text form, because `*` and empty have meanings of their own.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CaptureConfig {
    pub proxy_port: u16,
    pub inbound_capture_port: u16,
    pub inbound_tunnel_port: u16,
    /// Comma-separated UIDs whose traffic bypasses capture.
    pub proxy_uid: String,
    /// Comma-separated GIDs whose traffic bypasses capture.
    pub proxy_gid: String,
    pub inbound_interception_mode: InterceptionMode,
    pub inbound_tproxy_mark: u32,
    pub inbound_tproxy_route_table: u32,
    /// `*`, empty (no inbound capture) or a port list.
    pub inbound_ports_include: String,
    pub inbound_ports_exclude: String,
    /// `*`, empty or CIDRs of outbound traffic to capture.
    pub outbound_ip_ranges_include: String,
    pub outbound_ip_ranges_exclude: String,
    pub outbound_ports_include: String,
    pub outbound_ports_exclude: String,
    pub reroute_virtual_interfaces: String,
    pub exclude_interfaces: String,
    pub owner_groups_include: String,
    pub owner_groups_exclude: String,
    pub host_ipv4_loopback_cidr: String,
    pub redirect_dns: bool,
    pub capture_all_dns: bool,
    pub dns_servers_v4: Vec<String>,
    pub dns_servers_v6: Vec<String>,
    pub drop_invalid: bool,
    pub enable_ipv6: bool,
}

/// Istio's well-known ports and marks.
pub const DEFAULT_PROXY_PORT: u16 = 15001;
pub const DEFAULT_INBOUND_CAPTURE_PORT: u16 = 15006;
pub const DEFAULT_INBOUND_TUNNEL_PORT: u16 = 15008;
pub const DEFAULT_PROXY_UID: &str = "1337";
pub const DNS_LISTENER_PORT: u16 = 15053;
/// Mark set on the proxy's own loopback connections to the app in TPROXY mode.
pub const OUTBOUND_MARK: u32 = 1338;

impl Default for CaptureConfig {
    fn default() -> Self {
        CaptureConfig {
            proxy_port: DEFAULT_PROXY_PORT,
            inbound_capture_port: DEFAULT_INBOUND_CAPTURE_PORT,
            inbound_tunnel_port: DEFAULT_INBOUND_TUNNEL_PORT,
            proxy_uid: DEFAULT_PROXY_UID.into(),
            proxy_gid: DEFAULT_PROXY_UID.into(),
            inbound_interception_mode: InterceptionMode::Redirect,
            inbound_tproxy_mark: 1337,
            inbound_tproxy_route_table: 133,
            inbound_ports_include: String::new(),
            inbound_ports_exclude: String::new(),
            outbound_ip_ranges_include: String::new(),
            outbound_ip_ranges_exclude: String::new(),
            outbound_ports_include: String::new(),
            outbound_ports_exclude: String::new(),
            reroute_virtual_interfaces: String::new(),
            exclude_interfaces: String::new(),
            owner_groups_include: "*".into(),
            owner_groups_exclude: String::new(),
            host_ipv4_loopback_cidr: "127.0.0.1/32".into(),
            redirect_dns: false,
            capture_all_dns: false,
            dns_servers_v4: Vec::new(),
            dns_servers_v6: Vec::new(),
            drop_invalid: false,
            enable_ipv6: false,
        }
    }
}

/// A setting that does not parse.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("{setting}: {message}")]
pub struct ConfigError {
    pub setting: &'static str,
    pub message: String,
}

impl CaptureConfig {
    /// Checks what istio-iptables would reject, naming the setting. Unparsable CIDRs are not
    /// errors: istio-iptables skips them with a warning (see [`split_cidrs`]).
    pub fn validate(&self) -> Result<(), ConfigError> {
        let ports = [
            ("--istio-inbound-ports", &self.inbound_ports_include, true),
            (
                "--istio-local-exclude-ports",
                &self.inbound_ports_exclude,
                false,
            ),
            (
                "--istio-outbound-ports",
                &self.outbound_ports_include,
                false,
            ),
            (
                "--istio-local-outbound-ports-exclude",
                &self.outbound_ports_exclude,
                false,
            ),
        ];
        for (setting, list, star_ok) in ports {
            if star_ok && list.trim() == "*" {
                continue;
            }
            for p in split(list) {
                if p.parse::<u16>().is_err() {
                    return Err(ConfigError {
                        setting,
                        message: format!("invalid port {p:?}: expected a number 0-65535"),
                    });
                }
            }
        }
        for (setting, list) in [
            ("--proxy-uid", &self.proxy_uid),
            ("--proxy-gid", &self.proxy_gid),
        ] {
            for id in split(list) {
                if id.parse::<u32>().is_err() {
                    return Err(ConfigError {
                        setting,
                        message: format!("invalid id {id:?}: expected a number"),
                    });
                }
            }
        }
        if self.outbound_ip_ranges_exclude.trim() == "*" {
            return Err(ConfigError {
                setting: "--istio-service-exclude-cidr",
                message: "`*` is not allowed".into(),
            });
        }
        if self.host_ipv4_loopback_cidr.parse::<IpNet>().is_err() {
            return Err(ConfigError {
                setting: "ISTIO_OUTBOUND_IPV4_LOOPBACK_CIDR",
                message: format!("invalid CIDR {:?}", self.host_ipv4_loopback_cidr),
            });
        }
        for s in self.dns_servers_v4.iter().chain(&self.dns_servers_v6) {
            if s.parse::<IpAddr>().is_err() {
                return Err(ConfigError {
                    setting: "DNS servers",
                    message: format!("invalid address {s:?}"),
                });
            }
        }
        Ok(())
    }
}

/// istio-iptables' list splitting: commas, surrounding space trimmed, empty items dropped.
pub fn split(s: &str) -> Vec<&str> {
    s.split(',')
        .map(str::trim)
        .filter(|x| !x.is_empty())
        .collect()
}

/// Outbound ranges split by family. `*` is a wildcard for both.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct NetworkRange {
    pub wildcard: bool,
    pub cidrs: Vec<IpNet>,
    pub has_loopback: bool,
}

/// Splits a CIDR list into IPv4 and IPv6 ranges. Items that do not parse are returned in the
/// third element, to be warned about and skipped as istio-iptables does.
pub fn split_cidrs(list: &str) -> (NetworkRange, NetworkRange, Vec<String>) {
    if list.trim() == "*" {
        let w = NetworkRange {
            wildcard: true,
            ..Default::default()
        };
        return (w.clone(), w, Vec::new());
    }
    let (mut v4, mut v6, mut bad) = (NetworkRange::default(), NetworkRange::default(), Vec::new());
    for item in split(list) {
        match item.parse::<IpNet>() {
            Ok(net) => {
                let r = if net.addr().is_ipv4() {
                    &mut v4
                } else {
                    &mut v6
                };
                r.has_loopback |= net.addr().is_loopback();
                r.cidrs.push(net);
            }
            Err(_) => bad.push(item.to_string()),
        }
    }
    (v4, v6, bad)
}

/// What a resolv.conf says: the nameservers, in order, and the search domains.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ResolvConf {
    pub nameservers: Vec<IpAddr>,
    pub search: Vec<String>,
}

impl ResolvConf {
    /// Unknown lines and addresses that do not parse are left out; the last `search` wins,
    /// as in the C library.
    pub fn parse(text: &str) -> ResolvConf {
        let mut out = ResolvConf::default();
        for line in text.lines() {
            let mut words = line.split_whitespace();
            match words.next() {
                // A zone index (`fe80::1%eth0`) is not part of the address.
                Some("nameserver") => out.nameservers.extend(
                    words
                        .next()
                        .and_then(|a| a.split('%').next())
                        .and_then(|a| a.parse::<IpAddr>().ok()),
                ),
                Some("search") => out.search = words.map(str::to_string).collect(),
                _ => {}
            }
        }
        out
    }
}

/// The `nameserver` addresses of a resolv.conf, by family.
pub fn resolv_conf_servers(text: &str) -> (Vec<String>, Vec<String>) {
    let (v4, v6): (Vec<IpAddr>, Vec<IpAddr>) = ResolvConf::parse(text)
        .nameservers
        .into_iter()
        .partition(IpAddr::is_ipv4);
    let text = |ips: Vec<IpAddr>| ips.iter().map(ToString::to_string).collect();
    (text(v4), text(v6))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_lists_and_cidrs() {
        assert_eq!(split(" 6000, 7000,,"), vec!["6000", "7000"]);
        let (v4, v6, bad) = split_cidrs("10.0.0.0/8, 2001:db8::/32,127.1.2.3/32,nope");
        assert_eq!(v4.cidrs.len(), 2);
        assert!(v4.has_loopback);
        assert_eq!(v6.cidrs.len(), 1);
        assert_eq!(bad, vec!["nope"]);
        assert!(split_cidrs("*").0.wildcard);
    }

    #[test]
    fn reads_resolv_conf() {
        let (v4, v6) = resolv_conf_servers(
            "# c\nsearch x\nnameserver 10.96.0.10\nnameserver fe80::1%eth0\nnameserver bad\n",
        );
        assert_eq!(v4, vec!["10.96.0.10"]);
        assert_eq!(v6, vec!["fe80::1"]);
        let conf = ResolvConf::parse("search a b\nsearch x.svc.cluster.local svc.cluster.local\n");
        assert_eq!(conf.search, ["x.svc.cluster.local", "svc.cluster.local"]);
    }

    #[test]
    fn validation_names_the_flag() {
        let c = CaptureConfig {
            inbound_ports_include: "80,http".into(),
            ..Default::default()
        };
        assert_eq!(c.validate().unwrap_err().setting, "--istio-inbound-ports");
        let c = CaptureConfig {
            outbound_ip_ranges_exclude: "*".into(),
            ..Default::default()
        };
        assert!(c.validate().is_err());
        assert!(CaptureConfig::default().validate().is_ok());
    }
}
