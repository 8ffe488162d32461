//! Istio's istio-iptables golden files: every case in `conformance/istio/iptables/cases.tsv`,
//! rendered in dry-run and compared line by line (surrounding white space ignored).

use std::path::PathBuf;

use isthmus_capture::{CaptureConfig, InterceptionMode, dry_run};

fn corpus() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../conformance/istio/iptables")
}

/// Undoes the TSV cell quoting (`"..."` with `""` for a quote).
fn unquote(cell: &str) -> String {
    match cell.strip_prefix('"').and_then(|c| c.strip_suffix('"')) {
        Some(inner) => inner.replace("\"\"", "\""),
        None => cell.to_string(),
    }
}

fn string_value(v: &str) -> String {
    v.trim_matches('"').to_string()
}

fn list_value(v: &str) -> Vec<String> {
    v.trim_start_matches('[')
        .trim_end_matches(']')
        .split(',')
        .map(|s| s.trim().trim_matches('"').to_string())
        .filter(|s| !s.is_empty())
        .collect()
}

/// Applies `Field=value;...` overrides, as named in Istio's config struct.
fn configure(overrides: &str) -> CaptureConfig {
    let mut c = CaptureConfig::default();
    for item in overrides.split(';').filter(|s| !s.is_empty()) {
        let (field, value) = item.split_once('=').expect("Field=value");
        let s = string_value(value);
        match field {
            "InboundPortsInclude" => c.inbound_ports_include = s,
            "InboundPortsExclude" => c.inbound_ports_exclude = s,
            "InboundInterceptionMode" => {
                c.inbound_interception_mode = InterceptionMode::parse(&s).unwrap()
            }
            "OutboundIPRangesInclude" => c.outbound_ip_ranges_include = s,
            "OutboundIPRangesExclude" => c.outbound_ip_ranges_exclude = s,
            "OutboundPortsInclude" => c.outbound_ports_include = s,
            "OutboundPortsExclude" => c.outbound_ports_exclude = s,
            "RerouteVirtualInterfaces" => c.reroute_virtual_interfaces = s,
            "ExcludeInterfaces" => c.exclude_interfaces = s,
            "ProxyUID" => c.proxy_uid = s,
            "ProxyGID" => c.proxy_gid = s,
            "OwnerGroupsInclude" => c.owner_groups_include = s,
            "OwnerGroupsExclude" => c.owner_groups_exclude = s,
            "HostIPv4LoopbackCidr" => c.host_ipv4_loopback_cidr = s,
            "RedirectDNS" => c.redirect_dns = s == "true",
            "CaptureAllDNS" => c.capture_all_dns = s == "true",
            "DropInvalid" => c.drop_invalid = s == "true",
            "EnableIPv6" => c.enable_ipv6 = s == "true",
            "DNSServersV4" => c.dns_servers_v4 = list_value(value),
            "DNSServersV6" => c.dns_servers_v6 = list_value(value),
            "InboundTProxyMark" => c.inbound_tproxy_mark = s.parse().unwrap(),
            "InboundTProxyRouteTable" => c.inbound_tproxy_route_table = s.parse().unwrap(),
            "ProxyPort" => c.proxy_port = s.parse().unwrap(),
            "InboundCapturePort" => c.inbound_capture_port = s.parse().unwrap(),
            "InboundTunnelPort" => c.inbound_tunnel_port = s.parse().unwrap(),
            // Dry-run is how the goldens were produced; it changes no rule.
            "DryRun" => {}
            other => panic!("unknown override field {other}"),
        }
    }
    c
}

fn lines(s: &str) -> Vec<&str> {
    s.lines().map(str::trim).filter(|l| !l.is_empty()).collect()
}

#[test]
fn istio_iptables_goldens() {
    let dir = corpus();
    let cases = std::fs::read_to_string(dir.join("cases.tsv")).expect("cases.tsv");
    let (mut passed, mut failed) = (0, 0);
    for row in cases.lines().skip(1).filter(|l| !l.trim().is_empty()) {
        let cols: Vec<&str> = row.split('\t').collect();
        let (golden, name) = (cols[0], cols[1]);
        let overrides = unquote(cols.get(2).copied().unwrap_or(""));
        let want = std::fs::read_to_string(dir.join(golden)).expect("golden");
        let got = dry_run(&configure(&overrides)).expect("dry run");
        if lines(&got) == lines(&want) {
            passed += 1;
        } else {
            failed += 1;
            eprintln!("FAIL {name}\n--- want\n{want}\n--- got\n{got}");
        }
    }
    println!("{passed} passed, {failed} failed");
    assert_eq!(failed, 0);
    assert!(passed >= 18);
}

/// Every golden case's rules are also accepted by the kernel: restored into a fresh network
/// namespace and read back.
#[test]
fn every_case_restores_in_a_namespace() {
    if !isthmus_testkit::is_root() {
        eprintln!("skipped: needs root for network namespaces");
        return;
    }
    let dir = corpus();
    let cases = std::fs::read_to_string(dir.join("cases.tsv")).expect("cases.tsv");
    for row in cases.lines().skip(1).filter(|l| !l.trim().is_empty()) {
        let cols: Vec<&str> = row.split('\t').collect();
        let mut cfg = configure(&unquote(cols.get(2).copied().unwrap_or("")));
        // Group names (`java`) need not exist on this machine; the rule form is what matters.
        for groups in [&mut cfg.owner_groups_include, &mut cfg.owner_groups_exclude] {
            *groups = groups
                .split(',')
                .map(|g| {
                    if g.parse::<u32>().is_ok() || g == "*" {
                        g
                    } else {
                        "4242"
                    }
                })
                .collect::<Vec<_>>()
                .join(",");
        }
        let set = isthmus_capture::build(&cfg);
        let ns = isthmus_testkit::Netns::new("golden");
        for (restore, save, rules) in [
            ("iptables-restore", "iptables-save", &set.v4),
            ("ip6tables-restore", "ip6tables-save", &set.v6),
        ] {
            if rules.rules.is_empty() {
                continue;
            }
            let out = ns.exec_input(&[restore, "--noflush"], &rules.restore_payload());
            assert!(
                out.status.success(),
                "{}: {}",
                cols[1],
                String::from_utf8_lossy(&out.stderr)
            );
            let saved = ns.exec(&[save]);
            let installed = saved.lines().filter(|l| l.starts_with("-A ")).count();
            assert_eq!(installed, rules.rules.len(), "{}: {saved}", cols[1]);
        }
    }
}
