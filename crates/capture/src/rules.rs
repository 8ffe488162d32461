//! The capture rules istio-iptables installs, in its order, for IPv4 and IPv6.
//!
//! Chains (seed 003): `ISTIO_INBOUND` decides which inbound ports go to the proxy,
//! `ISTIO_IN_REDIRECT` redirects them to 15006, `ISTIO_OUTPUT` decides which outbound traffic goes
//! to the proxy, `ISTIO_REDIRECT` redirects it to 15001. Traffic of the proxy's UID/GID (1337)
//! returns early so the proxy's own connections are not captured again; `127.0.0.6` is the source
//! of the proxy's inbound-passthrough connections to the app. TPROXY mode uses the mangle table,
//! marks and policy routing instead of NAT for inbound.

use std::collections::HashSet;

use crate::config::{
    CaptureConfig, DNS_LISTENER_PORT, InterceptionMode, NetworkRange, OUTBOUND_MARK, split,
    split_cidrs,
};

pub const ISTIO_INBOUND: &str = "ISTIO_INBOUND";
pub const ISTIO_IN_REDIRECT: &str = "ISTIO_IN_REDIRECT";
pub const ISTIO_OUTPUT: &str = "ISTIO_OUTPUT";
pub const ISTIO_REDIRECT: &str = "ISTIO_REDIRECT";
pub const ISTIO_DIVERT: &str = "ISTIO_DIVERT";
pub const ISTIO_TPROXY: &str = "ISTIO_TPROXY";
pub const ISTIO_DROP: &str = "ISTIO_DROP";
pub const ISTIO_OUTPUT_DNS: &str = "ISTIO_OUTPUT_DNS";

/// Chains and targets the kernel provides: never created or deleted by us.
const BUILT_IN: [&str; 12] = [
    "INPUT",
    "OUTPUT",
    "FORWARD",
    "PREROUTING",
    "POSTROUTING",
    "ACCEPT",
    "DROP",
    "RETURN",
    "REDIRECT",
    "MARK",
    "TPROXY",
    "CONNMARK",
];

pub fn is_built_in(chain: &str) -> bool {
    BUILT_IN.contains(&chain)
}

/// Where a rule goes in its chain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Position {
    Append,
    Insert(u32),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rule {
    pub table: &'static str,
    pub chain: String,
    pub position: Position,
    /// The match and target, e.g. `-p tcp --dport 15008 -j RETURN`.
    pub spec: Vec<String>,
}

impl Rule {
    /// The rule as an iptables-restore line.
    pub fn restore_line(&self) -> String {
        let head = match self.position {
            Position::Append => format!("-A {}", self.chain),
            Position::Insert(n) => format!("-I {} {n}", self.chain),
        };
        if self.spec.is_empty() {
            head
        } else {
            format!("{head} {}", self.spec.join(" "))
        }
    }

    /// The chain this rule jumps to, when the target is a chain (`... -j CHAIN` at the end).
    pub fn jump_target(&self) -> Option<&str> {
        match self.spec.as_slice() {
            [.., j, target] if j == "-j" => Some(target),
            _ => None,
        }
    }
}

/// The rules of one address family.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FamilyRules {
    pub rules: Vec<Rule>,
}

impl FamilyRules {
    /// Non-built-in chains per table, in order of first use (as a rule's chain, then as a jump
    /// target).
    pub fn chains(&self) -> Vec<(&'static str, String)> {
        let mut seen = HashSet::new();
        let mut out = Vec::new();
        let mut add = |table: &'static str, chain: &str| {
            if !is_built_in(chain) && seen.insert((table, chain.to_string())) {
                out.push((table, chain.to_string()));
            }
        };
        for r in &self.rules {
            add(r.table, &r.chain);
        }
        for r in &self.rules {
            if let Some(t) = r.jump_target() {
                add(r.table, t);
            }
        }
        out
    }

    /// The `iptables-restore --noflush` payload: per table (in name order) the chains to create,
    /// then the rules in order.
    pub fn restore_payload(&self) -> String {
        let chains = self.chains();
        let mut tables: Vec<&str> = self.rules.iter().map(|r| r.table).collect();
        tables.sort_unstable();
        tables.dedup();
        let mut out = String::new();
        for table in tables {
            out.push_str(&format!("* {table}\n"));
            for (_, c) in chains.iter().filter(|(t, _)| *t == table) {
                out.push_str(&format!("-N {c}\n"));
            }
            for r in self.rules.iter().filter(|r| r.table == table) {
                out.push_str(&r.restore_line());
                out.push('\n');
            }
            out.push_str("COMMIT\n");
        }
        out
    }
}

/// IPv4 and IPv6 rules for one configuration.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RuleSet {
    pub v4: FamilyRules,
    pub v6: FamilyRules,
    /// CIDRs that did not parse and were skipped (istio-iptables warns and goes on).
    pub skipped_cidrs: Vec<String>,
}

/// A dual-stack rule builder: IPv6 rules are kept only when IPv6 is enabled.
struct Builder {
    ipv6: bool,
    set: RuleSet,
}

/// Stands for the family-specific address in a versioned rule.
const VERSIONED: &str = "{IP}";

fn owned(params: &[&str]) -> Vec<String> {
    params.iter().map(|s| s.to_string()).collect()
}

impl Builder {
    fn push(
        &mut self,
        v6: bool,
        table: &'static str,
        chain: &str,
        pos: Position,
        spec: Vec<String>,
    ) {
        let rule = Rule {
            table,
            chain: chain.to_string(),
            position: pos,
            spec,
        };
        if v6 {
            if self.ipv6 {
                self.set.v6.rules.push(rule);
            }
        } else {
            self.set.v4.rules.push(rule);
        }
    }
    fn append(&mut self, table: &'static str, chain: &str, params: &[&str]) {
        self.append_v4(table, chain, params);
        self.append_v6(table, chain, params);
    }
    fn append_v4(&mut self, table: &'static str, chain: &str, params: &[&str]) {
        self.push(false, table, chain, Position::Append, owned(params));
    }
    fn append_v6(&mut self, table: &'static str, chain: &str, params: &[&str]) {
        self.push(true, table, chain, Position::Append, owned(params));
    }
    fn insert(&mut self, table: &'static str, chain: &str, pos: u32, params: &[&str]) {
        self.insert_v4(table, chain, pos, params);
        self.insert_v6(table, chain, pos, params);
    }
    fn insert_v4(&mut self, table: &'static str, chain: &str, pos: u32, params: &[&str]) {
        self.push(false, table, chain, Position::Insert(pos), owned(params));
    }
    fn insert_v6(&mut self, table: &'static str, chain: &str, pos: u32, params: &[&str]) {
        self.push(true, table, chain, Position::Insert(pos), owned(params));
    }
    /// A dual-stack rule with a family-specific address in place of [`VERSIONED`].
    fn append_versioned(
        &mut self,
        v4: &str,
        v6: &str,
        table: &'static str,
        chain: &str,
        params: &[&str],
    ) {
        let sub = |ip: &str| -> Vec<String> {
            params
                .iter()
                .map(|p| if *p == VERSIONED { ip } else { p }.to_string())
                .collect()
        };
        self.push(false, table, chain, Position::Append, sub(v4));
        self.push(true, table, chain, Position::Append, sub(v6));
    }
}

/// Builds the rules for `cfg`, in istio-iptables' order.
pub fn build(cfg: &CaptureConfig) -> RuleSet {
    let mut b = Builder {
        ipv6: cfg.enable_ipv6,
        set: RuleSet::default(),
    };
    let (ex_v4, ex_v6, bad_ex) = split_cidrs(&cfg.outbound_ip_ranges_exclude);
    let (in_v4, in_v6, bad_in) = split_cidrs(&cfg.outbound_ip_ranges_include);
    b.set.skipped_cidrs = bad_ex.into_iter().chain(bad_in).collect();

    // Without servers to match, DNS capture would have nothing to redirect.
    let redirect_dns = cfg.redirect_dns
        && (cfg.capture_all_dns
            || !cfg.dns_servers_v4.is_empty()
            || !cfg.dns_servers_v6.is_empty());
    let tproxy = cfg.inbound_interception_mode == InterceptionMode::Tproxy;
    let loopback = cfg.host_ipv4_loopback_cidr.as_str();
    let tunnel = cfg.inbound_tunnel_port.to_string();
    let mark = cfg.inbound_tproxy_mark.to_string();
    let outbound_mark = OUTBOUND_MARK.to_string();

    // Excluded interfaces bypass everything.
    for nic in split(&cfg.exclude_interfaces) {
        b.append("nat", "PREROUTING", &["-i", nic, "-j", "RETURN"]);
        b.append("nat", "OUTPUT", &["-o", nic, "-j", "RETURN"]);
    }
    if tproxy {
        for nic in split(&cfg.exclude_interfaces) {
            b.append("mangle", "PREROUTING", &["-i", nic, "-j", "RETURN"]);
            b.append("mangle", "OUTPUT", &["-o", nic, "-j", "RETURN"]);
        }
    }
    // Traffic arriving on virtual (e.g. KubeVirt) interfaces is not inbound to this pod.
    for nic in split(&cfg.reroute_virtual_interfaces) {
        b.insert("nat", "PREROUTING", 1, &["-i", nic, "-j", "RETURN"]);
    }
    if cfg.drop_invalid {
        b.append(
            "mangle",
            "PREROUTING",
            &["-m", "conntrack", "--ctstate", "INVALID", "-j", ISTIO_DROP],
        );
        b.append("mangle", ISTIO_DROP, &["-j", "DROP"]);
    }
    // HBONE tunnel traffic goes to the proxy's own listener untouched.
    b.append(
        "nat",
        ISTIO_INBOUND,
        &["-p", "tcp", "--dport", &tunnel, "-j", "RETURN"],
    );
    let proxy_port = cfg.proxy_port.to_string();
    b.append(
        "nat",
        ISTIO_REDIRECT,
        &["-p", "tcp", "-j", "REDIRECT", "--to-ports", &proxy_port],
    );
    let capture_port = cfg.inbound_capture_port.to_string();
    b.append(
        "nat",
        ISTIO_IN_REDIRECT,
        &["-p", "tcp", "-j", "REDIRECT", "--to-ports", &capture_port],
    );

    inbound(&mut b, cfg, tproxy, loopback, &mark, &capture_port);

    b.append("nat", "OUTPUT", &["-j", ISTIO_OUTPUT]);
    for port in split(&cfg.outbound_ports_exclude) {
        b.append(
            "nat",
            ISTIO_OUTPUT,
            &["-p", "tcp", "--dport", port, "-j", "RETURN"],
        );
        b.append(
            "nat",
            ISTIO_OUTPUT,
            &["-p", "udp", "--dport", port, "-j", "RETURN"],
        );
    }
    // The proxy's inbound-passthrough connections come from 127.0.0.6 (::6).
    b.append_versioned(
        "127.0.0.6/32",
        "::6/128",
        "nat",
        ISTIO_OUTPUT,
        &["-o", "lo", "-s", VERSIONED, "-j", "RETURN"],
    );
    let loopback_included = in_v4.has_loopback || in_v6.has_loopback;
    let dns_and_tunnel = format!("53,{tunnel}");
    for (owner, ids) in [
        ("--uid-owner", &cfg.proxy_uid),
        ("--gid-owner", &cfg.proxy_gid),
    ] {
        for id in split(ids) {
            // The proxy calling its own pod through a service VIP: back in through inbound.
            // With DNS capture, port 53 is left to the agent's resolver (UID rules only, as
            // istio-iptables does).
            let ports: Vec<&str> = if redirect_dns && owner == "--uid-owner" {
                vec!["-m", "multiport", "!", "--dports", &dns_and_tunnel]
            } else {
                vec!["!", "--dport", &tunnel]
            };
            let mut params = vec!["-o", "lo", "!", "-d", VERSIONED, "-p", "tcp"];
            params.extend(ports);
            params.extend(["-m", "owner", owner, id, "-j", ISTIO_IN_REDIRECT]);
            b.append_versioned(loopback, "::1/128", "nat", ISTIO_OUTPUT, &params);
            // An app calling itself over loopback stays on loopback.
            if !loopback_included {
                if redirect_dns {
                    b.append(
                        "nat",
                        ISTIO_OUTPUT,
                        &[
                            "-o", "lo", "-p", "tcp", "!", "--dport", "53", "-m", "owner", "!",
                            owner, id, "-j", "RETURN",
                        ],
                    );
                } else {
                    b.append(
                        "nat",
                        ISTIO_OUTPUT,
                        &["-o", "lo", "-m", "owner", "!", owner, id, "-j", "RETURN"],
                    );
                }
            }
            // The proxy's own traffic is never captured again.
            b.append(
                "nat",
                ISTIO_OUTPUT,
                &["-m", "owner", owner, id, "-j", "RETURN"],
            );
        }
    }

    let owner_filter = OwnerGroups::parse(&cfg.owner_groups_include, &cfg.owner_groups_exclude);
    match &owner_filter {
        OwnerGroups::Except(groups) => {
            for g in groups {
                b.append(
                    "nat",
                    ISTIO_OUTPUT,
                    &["-m", "owner", "--gid-owner", g, "-j", "RETURN"],
                );
            }
        }
        OwnerGroups::Only(groups) if !groups.is_empty() => {
            let mut params: Vec<&str> = Vec::new();
            for g in groups {
                params.extend(["-m", "owner", "!", "--gid-owner", g]);
            }
            params.extend(["-j", "RETURN"]);
            b.append("nat", ISTIO_OUTPUT, &params);
        }
        OwnerGroups::Only(_) => {}
    }

    if redirect_dns {
        dns(&mut b, cfg);
    }

    // Explicit loopback destinations (sidecar-aware apps, container to container) are not captured.
    b.append_versioned(
        loopback,
        "::1/128",
        "nat",
        ISTIO_OUTPUT,
        &["-d", VERSIONED, "-j", "RETURN"],
    );
    for cidr in &ex_v4.cidrs {
        b.append_v4(
            "nat",
            ISTIO_OUTPUT,
            &["-d", &cidr.to_string(), "-j", "RETURN"],
        );
    }
    for cidr in &ex_v6.cidrs {
        b.append_v6(
            "nat",
            ISTIO_OUTPUT,
            &["-d", &cidr.to_string(), "-j", "RETURN"],
        );
    }
    for port in split(&cfg.outbound_ports_include) {
        b.append(
            "nat",
            ISTIO_OUTPUT,
            &["-p", "tcp", "--dport", port, "-j", ISTIO_REDIRECT],
        );
    }
    outbound_include(&mut b, cfg, &in_v4, false);
    outbound_include(&mut b, cfg, &in_v6, true);

    if tproxy {
        // Keep the mark of connections the proxy accepted so replies route back to it.
        b.append(
            "mangle",
            "PREROUTING",
            &[
                "-p",
                "tcp",
                "-m",
                "mark",
                "--mark",
                &mark,
                "-j",
                "CONNMARK",
                "--save-mark",
            ],
        );
        b.append(
            "mangle",
            "OUTPUT",
            &[
                "-p", "tcp", "-o", "lo", "-m", "mark", "--mark", &mark, "-j", "RETURN",
            ],
        );
        for (owner, ids) in [
            ("--uid-owner", &cfg.proxy_uid),
            ("--gid-owner", &cfg.proxy_gid),
        ] {
            for id in split(ids) {
                b.append_versioned(
                    loopback,
                    "::1/128",
                    "mangle",
                    "OUTPUT",
                    &[
                        "!",
                        "-d",
                        VERSIONED,
                        "-p",
                        "tcp",
                        "-o",
                        "lo",
                        "-m",
                        "owner",
                        owner,
                        id,
                        "-j",
                        "MARK",
                        "--set-mark",
                        &outbound_mark,
                    ],
                );
            }
        }
        b.append(
            "mangle",
            "OUTPUT",
            &[
                "-p",
                "tcp",
                "-m",
                "connmark",
                "--mark",
                &mark,
                "-j",
                "CONNMARK",
                "--restore-mark",
            ],
        );
        b.insert(
            "mangle",
            ISTIO_INBOUND,
            1,
            &["-p", "tcp", "-m", "mark", "--mark", &mark, "-j", "RETURN"],
        );
        b.insert_v4(
            "mangle",
            ISTIO_INBOUND,
            2,
            &[
                "-p",
                "tcp",
                "-s",
                "127.0.0.6/32",
                "-i",
                "lo",
                "-j",
                "RETURN",
            ],
        );
        b.insert_v6(
            "mangle",
            ISTIO_INBOUND,
            2,
            &["-p", "tcp", "-s", "::6/128", "-i", "lo", "-j", "RETURN"],
        );
        b.insert(
            "mangle",
            ISTIO_INBOUND,
            3,
            &[
                "-p",
                "tcp",
                "-i",
                "lo",
                "-m",
                "mark",
                "!",
                "--mark",
                &outbound_mark,
                "-j",
                "RETURN",
            ],
        );
    }
    b.set
}

fn inbound(
    b: &mut Builder,
    cfg: &CaptureConfig,
    tproxy: bool,
    loopback: &str,
    mark: &str,
    capture_port: &str,
) {
    if cfg.inbound_ports_include.trim().is_empty() {
        return;
    }
    let table = if tproxy {
        b.append("mangle", ISTIO_DIVERT, &["-j", "MARK", "--set-mark", mark]);
        b.append("mangle", ISTIO_DIVERT, &["-j", "ACCEPT"]);
        let tproxy_mark = format!("{mark}/0xffffffff");
        b.append_versioned(
            loopback,
            "::1/128",
            "mangle",
            ISTIO_TPROXY,
            &[
                "!",
                "-d",
                VERSIONED,
                "-p",
                "tcp",
                "-j",
                "TPROXY",
                "--tproxy-mark",
                &tproxy_mark,
                "--on-port",
                capture_port,
            ],
        );
        "mangle"
    } else {
        "nat"
    };
    b.append(table, "PREROUTING", &["-p", "tcp", "-j", ISTIO_INBOUND]);
    let established = [
        "-m",
        "conntrack",
        "--ctstate",
        "RELATED,ESTABLISHED",
        "-j",
        ISTIO_DIVERT,
    ];
    if cfg.inbound_ports_include.trim() == "*" {
        for port in split(&cfg.inbound_ports_exclude) {
            b.append(
                table,
                ISTIO_INBOUND,
                &["-p", "tcp", "--dport", port, "-j", "RETURN"],
            );
        }
        if tproxy {
            let mut p = vec!["-p", "tcp"];
            p.extend(established);
            b.append("mangle", ISTIO_INBOUND, &p);
            b.append("mangle", ISTIO_INBOUND, &["-p", "tcp", "-j", ISTIO_TPROXY]);
        } else {
            b.append(
                "nat",
                ISTIO_INBOUND,
                &["-p", "tcp", "-j", ISTIO_IN_REDIRECT],
            );
        }
    } else {
        for port in split(&cfg.inbound_ports_include) {
            if tproxy {
                let mut p = vec!["-p", "tcp", "--dport", port];
                p.extend(established);
                b.append("mangle", ISTIO_INBOUND, &p);
                b.append(
                    "mangle",
                    ISTIO_INBOUND,
                    &["-p", "tcp", "--dport", port, "-j", ISTIO_TPROXY],
                );
            } else {
                b.append(
                    "nat",
                    ISTIO_INBOUND,
                    &["-p", "tcp", "--dport", port, "-j", ISTIO_IN_REDIRECT],
                );
            }
        }
    }
}

fn outbound_include(b: &mut Builder, cfg: &CaptureConfig, range: &NetworkRange, v6: bool) {
    let append = |b: &mut Builder, chain: &str, pos: Option<u32>, params: &[&str]| {
        let spec = owned(params);
        let pos = pos.map_or(Position::Append, Position::Insert);
        b.push(v6, "nat", chain, pos, spec);
    };
    if range.wildcard {
        append(b, ISTIO_OUTPUT, None, &["-j", ISTIO_REDIRECT]);
        for nic in split(&cfg.reroute_virtual_interfaces) {
            append(b, "PREROUTING", Some(1), &["-i", nic, "-j", ISTIO_REDIRECT]);
        }
    } else {
        for cidr in &range.cidrs {
            let cidr = cidr.to_string();
            for nic in split(&cfg.reroute_virtual_interfaces) {
                append(
                    b,
                    "PREROUTING",
                    Some(1),
                    &["-i", nic, "-d", &cidr, "-j", ISTIO_REDIRECT],
                );
            }
            append(b, ISTIO_OUTPUT, None, &["-d", &cidr, "-j", ISTIO_REDIRECT]);
        }
    }
}

/// DNS to the agent's resolver on 15053, with conntrack zones that keep the app↔agent and
/// agent↔upstream halves of a UDP exchange apart.
fn dns(b: &mut Builder, cfg: &CaptureConfig) {
    let port = DNS_LISTENER_PORT.to_string();
    let all = cfg.capture_all_dns;
    b.append("raw", "OUTPUT", &["-j", ISTIO_OUTPUT_DNS]);
    if all || !cfg.dns_servers_v4.is_empty() {
        b.append_v4("nat", ISTIO_OUTPUT, &["-j", ISTIO_OUTPUT_DNS]);
    }
    if all || !cfg.dns_servers_v6.is_empty() {
        b.append_v6("nat", ISTIO_OUTPUT, &["-j", ISTIO_OUTPUT_DNS]);
    }
    // TCP then UDP; note istio-iptables' `--to-ports` vs `--to-port` spellings, kept verbatim.
    for (proto, to) in [("tcp", "--to-ports"), ("udp", "--to-port")] {
        if all {
            b.append(
                "nat",
                ISTIO_OUTPUT_DNS,
                &["-p", proto, "--dport", "53", "-j", "REDIRECT", to, &port],
            );
        } else {
            for s in &cfg.dns_servers_v4 {
                let d = format!("{s}/32");
                b.append_v4(
                    "nat",
                    ISTIO_OUTPUT_DNS,
                    &[
                        "-p", proto, "--dport", "53", "-d", &d, "-j", "REDIRECT", to, &port,
                    ],
                );
            }
            for s in &cfg.dns_servers_v6 {
                let d = format!("{s}/128");
                b.append_v6(
                    "nat",
                    ISTIO_OUTPUT_DNS,
                    &[
                        "-p", proto, "--dport", "53", "-d", &d, "-j", "REDIRECT", to, &port,
                    ],
                );
            }
        }
    }
    for (owner, ids) in [
        ("--uid-owner", &cfg.proxy_uid),
        ("--gid-owner", &cfg.proxy_gid),
    ] {
        for id in split(ids) {
            b.append(
                "raw",
                ISTIO_OUTPUT_DNS,
                &[
                    "-p", "udp", "--dport", "53", "-m", "owner", owner, id, "-j", "CT", "--zone",
                    "1",
                ],
            );
            b.append(
                "raw",
                ISTIO_OUTPUT_DNS,
                &[
                    "-p", "udp", "--sport", &port, "-m", "owner", owner, id, "-j", "CT", "--zone",
                    "2",
                ],
            );
        }
    }
    if all {
        b.append("raw", "PREROUTING", &["-j", ISTIO_INBOUND]);
        b.append(
            "raw",
            ISTIO_OUTPUT_DNS,
            &["-p", "udp", "--dport", "53", "-j", "CT", "--zone", "2"],
        );
        b.append(
            "raw",
            ISTIO_INBOUND,
            &["-p", "udp", "--sport", "53", "-j", "CT", "--zone", "1"],
        );
        return;
    }
    // Conntrack zones per resolver, each family with its own prefix length.
    for (v6, servers, prefix) in [
        (false, &cfg.dns_servers_v4, 32),
        (true, &cfg.dns_servers_v6, 128),
    ] {
        if !servers.is_empty() {
            b.push(
                v6,
                "raw",
                "PREROUTING",
                Position::Append,
                owned(&["-j", ISTIO_INBOUND]),
            );
        }
        for s in servers {
            let a = format!("{s}/{prefix}");
            b.push(
                v6,
                "raw",
                ISTIO_OUTPUT_DNS,
                Position::Append,
                owned(&[
                    "-p", "udp", "--dport", "53", "-d", &a, "-j", "CT", "--zone", "2",
                ]),
            );
            b.push(
                v6,
                "raw",
                ISTIO_INBOUND,
                Position::Append,
                owned(&[
                    "-p", "udp", "--sport", "53", "-s", &a, "-j", "CT", "--zone", "1",
                ]),
            );
        }
    }
}

/// Which groups' outbound traffic is captured (`ISTIO_OUTBOUND_OWNER_GROUPS[_EXCLUDE]`).
enum OwnerGroups {
    /// Capture every group but these.
    Except(Vec<String>),
    /// Capture only these groups.
    Only(Vec<String>),
}

impl OwnerGroups {
    fn parse(include: &str, exclude: &str) -> Self {
        let include = include.trim();
        if include.is_empty() || include == "*" {
            OwnerGroups::Except(split(exclude).into_iter().map(String::from).collect())
        } else {
            OwnerGroups::Only(split(include).into_iter().map(String::from).collect())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_capture_is_outbound_only_with_uid_bypass() {
        let set = build(&CaptureConfig::default());
        let p = set.v4.restore_payload();
        assert!(p.starts_with("* nat\n-N ISTIO_INBOUND\n"), "{p}");
        assert!(p.contains("-A ISTIO_OUTPUT -m owner --uid-owner 1337 -j RETURN\n"));
        assert!(
            !p.contains("PREROUTING"),
            "no inbound capture without inbound ports"
        );
        assert!(set.v6.rules.is_empty());
    }

    #[test]
    fn jump_targets_get_chains() {
        let cfg = CaptureConfig {
            inbound_ports_include: "*".into(),
            ..Default::default()
        };
        let chains = build(&cfg).v4.chains();
        assert!(chains.contains(&("nat", ISTIO_IN_REDIRECT.to_string())));
        assert!(!chains.iter().any(|(_, c)| c == "PREROUTING"));
    }
}
