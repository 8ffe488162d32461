//! `isthmus iptables` applied for real in a network namespace of the test's own: the rules read
//! back, re-applying changes nothing, cleanup removes only ours, and traffic is captured
//! (outbound to 15001 with its original destination kept) except the proxy UID's.

use std::io::Read;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::time::Duration;

use isthmus_testkit::{Netns, is_root};

const BIN: &str = env!("CARGO_BIN_EXE_isthmus");

fn iptables(ns: &Netns, args: &[&str]) -> String {
    let out = ns.exec_output(&[&[BIN, "iptables"][..], args].concat());
    assert!(
        out.status.success(),
        "isthmus iptables {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn applies_idempotently_and_cleans_up_only_its_own() {
    if !is_root() {
        eprintln!("skipped: needs root for network namespaces");
        return;
    }
    let ns = Netns::new("ipt");
    // Someone else's rule in the same table must survive our cleanup.
    ns.exec(&["iptables", "-t", "nat", "-N", "OTHER"]);
    ns.exec(&[
        "iptables", "-t", "nat", "-A", "OUTPUT", "-p", "udp", "-j", "OTHER",
    ]);

    let first = iptables(&ns, &["-b", "*", "-d", "15020,15021", "-x", "10.0.0.1/32"]);
    assert!(first.contains("installed"), "{first}");
    let nat = ns.exec(&["iptables-save", "-t", "nat"]);
    for want in [
        ":ISTIO_INBOUND",
        ":ISTIO_IN_REDIRECT",
        ":ISTIO_OUTPUT",
        ":ISTIO_REDIRECT",
        "-A PREROUTING -p tcp -j ISTIO_INBOUND",
        "-A OUTPUT -j ISTIO_OUTPUT",
        "--dport 15020 -j RETURN",
        "-A ISTIO_OUTPUT -m owner --uid-owner 1337 -j RETURN",
        "-A ISTIO_OUTPUT -s 127.0.0.6/32 -o lo -j RETURN",
        "-A ISTIO_OUTPUT -d 10.0.0.1/32 -j RETURN",
        "-A ISTIO_IN_REDIRECT -p tcp -j REDIRECT --to-ports 15006",
        "-A ISTIO_REDIRECT -p tcp -j REDIRECT --to-ports 15001",
    ] {
        assert!(nat.contains(want), "missing {want:?} in\n{nat}");
    }

    let again = iptables(&ns, &["-b", "*", "-d", "15020,15021", "-x", "10.0.0.1/32"]);
    assert!(again.contains("already in place"), "{again}");
    assert_eq!(
        ns.exec(&["iptables-save", "-t", "nat"])
            .matches("-j ISTIO_OUTPUT")
            .count(),
        1
    );

    // A different configuration replaces ours rather than adding to it.
    iptables(&ns, &["-b", "8080"]);
    let nat = ns.exec(&["iptables-save", "-t", "nat"]);
    assert!(!nat.contains("15020"), "{nat}");
    assert!(nat.contains("--dport 8080 -j ISTIO_IN_REDIRECT"), "{nat}");
    assert_eq!(nat.matches("-j ISTIO_INBOUND").count(), 1, "{nat}");

    iptables(&ns, &["--cleanup"]);
    let nat = ns.exec(&["iptables-save", "-t", "nat"]);
    assert!(!nat.contains("ISTIO"), "{nat}");
    assert!(nat.contains("-A OUTPUT -p udp -j OTHER"), "{nat}");
    // Cleaning up twice is fine.
    iptables(&ns, &["--cleanup"]);
}

#[test]
fn tproxy_mode_installs_and_removes_policy_routing() {
    if !is_root() {
        eprintln!("skipped: needs root for network namespaces");
        return;
    }
    let ns = Netns::new("tpx");
    iptables(&ns, &["-m", "TPROXY", "-b", "*"]);
    let mangle = ns.exec(&["iptables-save", "-t", "mangle"]);
    assert!(mangle.contains("-j TPROXY --on-port 15006"), "{mangle}");
    assert!(ns.exec(&["ip", "rule"]).contains("fwmark 0x539 lookup 133"));
    assert!(
        ns.exec(&["ip", "route", "show", "table", "133"])
            .contains("local default dev lo")
    );
    iptables(&ns, &["-m", "TPROXY", "--cleanup"]);
    assert!(!ns.exec(&["ip", "rule"]).contains("lookup 133"));
    assert!(
        !ns.exec(&["iptables-save", "-t", "mangle"])
            .contains("ISTIO")
    );
}

#[test]
fn outbound_traffic_is_captured_except_the_proxy_uid() {
    if !is_root() {
        eprintln!("skipped: needs root for network namespaces");
        return;
    }
    let ns = Netns::new("cap");
    // A route for an address nobody answers: only capture can make a connection succeed.
    // (A veth pair with both ends inside the namespace: the far end has no address.)
    ns.exec(&[
        "ip", "link", "add", "v0", "type", "veth", "peer", "name", "v1",
    ]);
    ns.exec(&["ip", "addr", "add", "10.255.0.1/24", "dev", "v0"]);
    ns.exec(&["ip", "link", "set", "v0", "up"]);
    ns.exec(&["ip", "link", "set", "v1", "up"]);
    iptables(&ns, &["-i", "*"]);

    // One listener for both halves: binding 15001 a second time could fail while a child
    // process forked by a parallel test still holds the first socket until its exec.
    let (proxy, original) = ns.run_in(|| {
        let proxy = TcpListener::bind("0.0.0.0:15001").expect("bind 15001");
        let target: SocketAddr = "10.255.0.9:8080".parse().unwrap();
        let _app = TcpStream::connect_timeout(&target, Duration::from_secs(5))
            .expect("captured connection");
        let (accepted, _) = proxy.accept().expect("accept");
        let original =
            nix::sys::socket::getsockopt(&accepted, nix::sys::socket::sockopt::OriginalDst)
                .expect("SO_ORIGINAL_DST");
        let original = SocketAddr::from((
            std::net::Ipv4Addr::from(u32::from_be(original.sin_addr.s_addr)),
            u16::from_be(original.sin_port),
        ));
        (proxy, original)
    });
    assert_eq!(original, "10.255.0.9:8080".parse().unwrap());

    let bypassed = ns.run_in(move || {
        proxy.set_nonblocking(true).unwrap();
        // SAFETY: setresuid on the calling thread only; no memory is involved.
        let rc = unsafe { libc::syscall(libc::SYS_setresuid, 1337, 1337, 1337) };
        assert_eq!(rc, 0, "setresuid");
        let target: SocketAddr = "10.255.0.9:8080".parse().unwrap();
        let connected = TcpStream::connect_timeout(&target, Duration::from_millis(500));
        let mut buf = [0u8; 1];
        let proxy_saw = proxy.accept().map(|(mut s, _)| s.read(&mut buf)).is_ok();
        (connected.is_err(), proxy_saw)
    });
    assert_eq!(bypassed, (true, false), "UID 1337 must not be captured");
}
