//! Listening TCP sockets of a process's network namespace, read from `/proc/<pid>/net/tcp` and
//! `tcp6` (no exec into the app, so images without `ss` work), and the LocalhostListener check
//! of seeds 001–002: a Service port whose only listeners are on loopback is unreachable from
//! other pods once traffic is forwarded to the pod IP.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

/// TCP state `LISTEN` in `/proc/net/tcp`.
const LISTEN: &str = "0A";

#[derive(Debug, thiserror::Error)]
#[error("{path}: {source}")]
pub struct SocketsError {
    pub path: String,
    pub source: std::io::Error,
}

/// The listening addresses in the network namespace of `pid` (`self` for this process).
pub fn listening(pid: &str) -> Result<Vec<SocketAddr>, SocketsError> {
    let mut out = Vec::new();
    for file in ["tcp", "tcp6"] {
        let path = format!("/proc/{pid}/net/{file}");
        match std::fs::read_to_string(&path) {
            Ok(text) => out.extend(parse(&text)),
            // No IPv6 in the namespace: no tcp6 file.
            Err(e) if file == "tcp6" && e.kind() == std::io::ErrorKind::NotFound => {}
            Err(source) => return Err(SocketsError { path, source }),
        }
    }
    out.sort();
    out.dedup();
    Ok(out)
}

/// Listening sockets from the text of a `/proc/net/tcp{,6}` file; malformed lines are skipped.
pub fn parse(text: &str) -> Vec<SocketAddr> {
    text.lines()
        .skip(1)
        .filter_map(|line| {
            let mut f = line.split_whitespace();
            let local = f.nth(1)?;
            let state = f.nth(1)?;
            (state == LISTEN).then_some(())?;
            let (ip, port) = local.split_once(':')?;
            let port = u16::from_str_radix(port, 16).ok()?;
            Some(SocketAddr::new(parse_ip(ip)?, port))
        })
        .collect()
}

/// `/proc/net/tcp` prints each 32-bit word of the address as the hex of its in-memory
/// (little-endian) value.
fn parse_ip(hex: &str) -> Option<IpAddr> {
    if !hex.len().is_multiple_of(8) || !hex.is_ascii() {
        return None;
    }
    let mut bytes = Vec::with_capacity(hex.len() / 2);
    for i in 0..hex.len() / 8 {
        let word = u32::from_str_radix(&hex[i * 8..i * 8 + 8], 16).ok()?;
        bytes.extend_from_slice(&word.to_le_bytes());
    }
    match bytes.len() {
        4 => Some(IpAddr::V4(Ipv4Addr::new(
            bytes[0], bytes[1], bytes[2], bytes[3],
        ))),
        16 => <[u8; 16]>::try_from(bytes)
            .ok()
            .map(|b| IpAddr::V6(Ipv6Addr::from(b))),
        _ => None,
    }
}

/// Whether an address is loopback: 127.0.0.0/8, ::1, or IPv4-mapped loopback.
pub fn is_loopback(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => v4.is_loopback(),
        IpAddr::V6(v6) => {
            v6.is_loopback() || v6.to_ipv4_mapped().is_some_and(|v4| v4.is_loopback())
        }
    }
}

/// The `ports` that are listened on, but only on loopback addresses.
pub fn localhost_only(listeners: &[SocketAddr], ports: &[u16]) -> Vec<u16> {
    let mut out: Vec<u16> = ports
        .iter()
        .copied()
        .filter(|p| {
            let on_port: Vec<&SocketAddr> = listeners.iter().filter(|l| l.port() == *p).collect();
            !on_port.is_empty() && on_port.iter().all(|l| is_loopback(l.ip()))
        })
        .collect();
    out.sort_unstable();
    out.dedup();
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_proc_net_tcp() {
        let text = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n   0: 0100007F:1F90 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 1 1 0 100 0 0 10 0\n   1: 00000000:0050 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 2 1 0 100 0 0 10 0\n   2: 0100007F:9C40 0100007F:1F90 01 00000000:00000000 00:00000000 00000000     0        0 3 1 0 100 0 0 10 0\n";
        let l = parse(text);
        assert_eq!(
            l,
            vec![
                "127.0.0.1:8080".parse().unwrap(),
                "0.0.0.0:80".parse().unwrap()
            ]
        );
        assert_eq!(localhost_only(&l, &[8080, 80, 9090]), vec![8080]);
        let v6 = "h\n 0: 00000000000000000000000001000000:1F90 00000000000000000000000000000000:0000 0A x\n";
        assert_eq!(parse(v6), vec!["[::1]:8080".parse().unwrap()]);
        assert!(is_loopback("::ffff:127.0.0.1".parse().unwrap()));
    }

    #[test]
    fn reads_this_process_listeners() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        let found = listening("self").unwrap();
        assert!(
            found.contains(&SocketAddr::new("127.0.0.1".parse().unwrap(), port)),
            "{found:?}"
        );
        assert_eq!(localhost_only(&found, &[port]), vec![port]);
    }
}
