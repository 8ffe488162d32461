//! Hostnames: the forms a service answers to (seed 004) and how config hosts resolve.

use std::net::IpAddr;

/// The default cluster domain.
pub const DEFAULT_DOMAIN: &str = "cluster.local";

/// `name.ns.svc.domain`.
pub fn service_fqdn(name: &str, namespace: &str, domain: &str) -> String {
    format!("{name}.{namespace}.svc.{domain}")
}

/// Resolves a host written in Istio config (VirtualService hosts, destinations, DestinationRule
/// host) the way Istio does: a name without a dot is a short name in the config's namespace;
/// anything with a dot, `*`, or an IP is taken as written.
pub fn resolve_config_host(host: &str, namespace: &str, domain: &str) -> String {
    if host == "*" || host.contains('.') || host.parse::<IpAddr>().is_ok() {
        return host.to_string();
    }
    let mut out = host.to_string();
    if !namespace.is_empty() {
        out.push('.');
        out.push_str(namespace);
    }
    if !domain.is_empty() {
        out.push_str(".svc.");
        out.push_str(domain);
    }
    out
}

/// Resolves a name the way a pod's resolver does with the search path
/// `ns.svc.domain svc.domain domain`: `reviews`, `reviews.ns`, `reviews.ns.svc` and the FQDN all
/// give the FQDN. Returns the candidates in search order.
pub fn search_candidates(name: &str, namespace: &str, domain: &str) -> Vec<String> {
    let name = name.trim_end_matches('.');
    let mut out = vec![
        format!("{name}.{namespace}.svc.{domain}"),
        format!("{name}.svc.{domain}"),
        format!("{name}.{domain}"),
    ];
    out.push(name.to_string());
    out
}

/// The domains a service's virtual host matches for a caller in `caller_ns` (seed 004): the FQDN
/// always; `name.ns.svc` and `name.ns` from any namespace; the bare `name` only from the
/// service's own namespace. Each also with `:port`.
pub fn virtual_host_domains(
    fqdn: &str,
    service_ns: &str,
    caller_ns: &str,
    domain: &str,
    port: u16,
    vips: &[IpAddr],
) -> Vec<String> {
    let mut names = vec![fqdn.to_string()];
    let suffix = format!(".svc.{domain}");
    if let Some(short) = fqdn.strip_suffix(&suffix) {
        // short is `name.ns`
        names.push(format!("{short}.svc"));
        names.push(short.to_string());
        if caller_ns == service_ns
            && let Some((name, _)) = short.split_once('.')
        {
            names.push(name.to_string());
        }
    }
    for vip in vips {
        names.push(match vip {
            IpAddr::V4(v4) => v4.to_string(),
            IpAddr::V6(v6) => format!("[{v6}]"),
        });
    }
    let mut out = Vec::with_capacity(names.len() * 2);
    for n in names {
        out.push(format!("{n}:{port}"));
        out.push(n);
    }
    out
}

/// Istio's host matching with wildcards: `*.example.com` matches `a.example.com` and
/// `b.a.example.com`; `*` matches everything.
pub fn host_matches(pattern: &str, host: &str) -> bool {
    if pattern == "*" || pattern == host {
        return true;
    }
    match pattern.strip_prefix('*') {
        Some(suffix) => host.ends_with(suffix),
        None => false,
    }
}

/// Whether two hosts (either may be a wildcard) overlap.
pub fn hosts_intersect(a: &str, b: &str) -> bool {
    host_matches(a, b) || host_matches(b, a)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_hosts() {
        assert_eq!(
            resolve_config_host("reviews", "default", DEFAULT_DOMAIN),
            "reviews.default.svc.cluster.local"
        );
        assert_eq!(
            resolve_config_host("reviews.other", "default", DEFAULT_DOMAIN),
            "reviews.other"
        );
        assert_eq!(resolve_config_host("*", "default", DEFAULT_DOMAIN), "*");
        assert_eq!(
            resolve_config_host("10.0.0.1", "default", DEFAULT_DOMAIN),
            "10.0.0.1"
        );
    }

    #[test]
    fn domains_by_caller_namespace() {
        let vips = ["10.96.0.10".parse().unwrap()];
        let same = virtual_host_domains(
            "reviews.bookinfo.svc.cluster.local",
            "bookinfo",
            "bookinfo",
            DEFAULT_DOMAIN,
            9080,
            &vips,
        );
        for d in [
            "reviews",
            "reviews:9080",
            "reviews.bookinfo",
            "reviews.bookinfo.svc",
            "reviews.bookinfo.svc.cluster.local:9080",
            "10.96.0.10:9080",
        ] {
            assert!(same.iter().any(|x| x == d), "{d} missing from {same:?}");
        }
        let other = virtual_host_domains(
            "reviews.bookinfo.svc.cluster.local",
            "bookinfo",
            "default",
            DEFAULT_DOMAIN,
            9080,
            &[],
        );
        assert!(!other.iter().any(|x| x == "reviews"));
        assert!(other.iter().any(|x| x == "reviews.bookinfo"));
    }

    #[test]
    fn wildcards() {
        assert!(host_matches("*.example.com", "a.example.com"));
        assert!(!host_matches("*.example.com", "example.com"));
        assert!(hosts_intersect("*.com", "*.example.com"));
        assert!(!hosts_intersect("a.com", "b.com"));
    }
}
