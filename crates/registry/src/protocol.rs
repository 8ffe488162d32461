//! Port protocols as Istio infers them (seed 003, "Protocol Detection").

use std::fmt;

/// A port's protocol. `Unknown` ports are sniffed by the proxy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Protocol {
    Http,
    Http2,
    Https,
    Grpc,
    GrpcWeb,
    Mongo,
    Mysql,
    Redis,
    Tcp,
    Tls,
    Udp,
    /// Istio's "UnsupportedProtocol": decided at connection time by sniffing.
    Unknown,
}

impl Protocol {
    /// Parses a protocol name case-insensitively, as Istio does for `Port.protocol` and
    /// `appProtocol`.
    pub fn parse(s: &str) -> Protocol {
        match s.to_ascii_lowercase().as_str() {
            "http" | "http_proxy" => Protocol::Http,
            "http2" | "h2c" => Protocol::Http2,
            "https" => Protocol::Https,
            "grpc" => Protocol::Grpc,
            "grpc-web" => Protocol::GrpcWeb,
            "mongo" => Protocol::Mongo,
            "mysql" => Protocol::Mysql,
            "redis" => Protocol::Redis,
            "tcp" => Protocol::Tcp,
            "tls" => Protocol::Tls,
            "udp" => Protocol::Udp,
            _ => Protocol::Unknown,
        }
    }

    /// The protocol a port name (or `appProtocol`) implies, as Istio's `ConvertProtocol` reads
    /// it: a `grpc-web` prefix, else the part before the first `-`.
    pub fn from_port_name(name: &str) -> Protocol {
        if name.len() >= 8 && name[..8].eq_ignore_ascii_case("grpc-web") {
            return Protocol::GrpcWeb;
        }
        let prefix = name.split('-').next().unwrap_or("");
        match prefix {
            "kubernetes.io/h2c" => Protocol::Http2,
            "kubernetes.io/ws" => Protocol::Http,
            "kubernetes.io/wss" => Protocol::Https,
            other => Protocol::parse(other),
        }
    }

    /// A Kubernetes service port's protocol: UDP from `protocol`, then `appProtocol` or the port
    /// name; a port left unknown on one of the server-first [`SERVER_FIRST_PORTS`] is TCP.
    pub fn for_kube_port(
        port: u16,
        name: &str,
        l4: Option<&str>,
        app_protocol: Option<&str>,
    ) -> Protocol {
        if l4 == Some("UDP") {
            return Protocol::Udp;
        }
        let p = Protocol::from_port_name(app_protocol.unwrap_or(name));
        if p == Protocol::Unknown && SERVER_FIRST_PORTS.contains(&port) {
            return Protocol::Tcp;
        }
        p
    }

    /// HTTP of any kind: routed per request by the HTTP connection manager.
    pub fn is_http(self) -> bool {
        matches!(
            self,
            Protocol::Http | Protocol::Http2 | Protocol::Grpc | Protocol::GrpcWeb
        )
    }
    /// Protocols that need HTTP/2 upstream.
    pub fn is_http2(self) -> bool {
        matches!(self, Protocol::Http2 | Protocol::Grpc)
    }
    /// Opaque TCP as far as the proxy is concerned (TLS originated by the app included).
    pub fn is_tcp(self) -> bool {
        matches!(
            self,
            Protocol::Https
                | Protocol::Mongo
                | Protocol::Mysql
                | Protocol::Redis
                | Protocol::Tcp
                | Protocol::Tls
        )
    }

    /// Istio's name for the protocol (`HTTP`, `GRPC-Web`, `UnsupportedProtocol`, ...).
    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Http => "HTTP",
            Protocol::Http2 => "HTTP2",
            Protocol::Https => "HTTPS",
            Protocol::Grpc => "GRPC",
            Protocol::GrpcWeb => "GRPC-Web",
            Protocol::Mongo => "Mongo",
            Protocol::Mysql => "MySQL",
            Protocol::Redis => "Redis",
            Protocol::Tcp => "TCP",
            Protocol::Tls => "TLS",
            Protocol::Udp => "UDP",
            Protocol::Unknown => "UnsupportedProtocol",
        }
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Ports where the server speaks first (SMTP, DNS, MySQL, MongoDB): Istio never sniffs them,
/// because waiting for the client's first bytes would stall the connection.
pub const SERVER_FIRST_PORTS: [u16; 4] = [25, 53, 3306, 27017];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn port_names() {
        assert_eq!(Protocol::from_port_name("http"), Protocol::Http);
        assert_eq!(Protocol::from_port_name("http-web"), Protocol::Http);
        assert_eq!(Protocol::from_port_name("HTTP2-x"), Protocol::Http2);
        assert_eq!(Protocol::from_port_name("grpc-web"), Protocol::GrpcWeb);
        assert_eq!(Protocol::from_port_name("GRPC-Web-x"), Protocol::GrpcWeb);
        assert_eq!(Protocol::from_port_name("grpc-foo"), Protocol::Grpc);
        assert_eq!(Protocol::from_port_name("web"), Protocol::Unknown);
        assert_eq!(Protocol::from_port_name("httpx"), Protocol::Unknown);
        assert_eq!(Protocol::from_port_name(""), Protocol::Unknown);
    }

    #[test]
    fn app_protocol_takes_precedence() {
        assert_eq!(
            Protocol::for_kube_port(80, "tcp-db", Some("TCP"), Some("http")),
            Protocol::Http
        );
        assert_eq!(
            Protocol::for_kube_port(80, "http", Some("UDP"), None),
            Protocol::Udp
        );
        assert_eq!(
            Protocol::for_kube_port(80, "web", None, Some("kubernetes.io/h2c")),
            Protocol::Http2
        );
        // Server-first ports are TCP when nothing names them.
        assert_eq!(
            Protocol::for_kube_port(3306, "db", None, None),
            Protocol::Tcp
        );
        assert_eq!(
            Protocol::for_kube_port(3307, "db", None, None),
            Protocol::Unknown
        );
    }
}
