//! The TLS and HTTP inspectors: what the first bytes of a connection say about it, read with
//! `peek` so the bytes stay for whoever handles the connection.

use std::time::Duration;

use tokio::net::TcpStream;

use crate::config::listener::ConnectionFacts;

/// Enough for a ClientHello with SNI and ALPN; longer hellos are judged on what fits.
const PEEK_BYTES: usize = 2048;

/// Peeks until the protocol is known, the buffer is full, or `timeout` (if any) passes.
/// Returns false on timeout (the caller decides whether to continue without the facts).
pub async fn inspect(
    stream: &TcpStream,
    timeout: Option<Duration>,
    facts: &mut ConnectionFacts,
) -> std::io::Result<bool> {
    let mut buf = vec![0u8; PEEK_BYTES];
    let work = async {
        loop {
            let n = stream.peek(&mut buf).await?;
            if n == 0 {
                // Closed before saying anything: plaintext with nothing to match.
                facts.transport = Some("raw_buffer");
                return Ok(());
            }
            match classify(&buf[..n]) {
                Some(Verdict::Tls(hello)) => {
                    facts.transport = Some("tls");
                    facts.server_name = hello.server_name;
                    facts.alpn = hello.alpn;
                    return Ok(());
                }
                Some(Verdict::Plain(alpn)) => {
                    facts.transport = Some("raw_buffer");
                    facts.alpn = alpn.into_iter().map(str::to_string).collect();
                    return Ok(());
                }
                None if n == buf.len() => {
                    facts.transport = Some(if buf[0] == 0x16 { "tls" } else { "raw_buffer" });
                    return Ok(());
                }
                // More bytes may be on the way; peek returns at once when some are buffered.
                None => tokio::time::sleep(Duration::from_millis(1)).await,
            }
        }
    };
    match timeout {
        None => work.await.map(|()| true),
        Some(t) => match tokio::time::timeout(t, work).await {
            Ok(r) => r.map(|()| true),
            Err(_) => Ok(false),
        },
    }
}

#[derive(Debug, Default, PartialEq, Eq)]
pub struct ClientHello {
    pub server_name: Option<String>,
    pub alpn: Vec<String>,
}

#[derive(Debug, PartialEq, Eq)]
enum Verdict {
    Tls(ClientHello),
    /// Plaintext, with the HTTP version recognised (`http/1.1`, `h2c`) if any.
    Plain(Option<&'static str>),
}

const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// None: not enough bytes to decide yet.
fn classify(b: &[u8]) -> Option<Verdict> {
    if b[0] == 0x16 {
        return match client_hello(b) {
            Parse::Done(h) => Some(Verdict::Tls(h)),
            Parse::Short => None,
            Parse::Bad => Some(Verdict::Tls(ClientHello::default())),
        };
    }
    if b.len() < H2_PREFACE.len() && H2_PREFACE.starts_with(b) {
        return None;
    }
    if b.starts_with(H2_PREFACE) {
        return Some(Verdict::Plain(Some("h2c")));
    }
    // HTTP/1.x: a request line `METHOD SP target SP HTTP/1.x`.
    let Some(end) = b.windows(2).position(|w| w == b"\r\n") else {
        let token = b.iter().all(|c| c.is_ascii_graphic() || *c == b' ');
        return if token && b.len() < 1024 {
            None
        } else {
            Some(Verdict::Plain(None))
        };
    };
    let line = &b[..end];
    let http = line.ends_with(b" HTTP/1.1") || line.ends_with(b" HTTP/1.0");
    Some(Verdict::Plain(http.then_some("http/1.1")))
}

enum Parse {
    Done(ClientHello),
    Short,
    Bad,
}

/// Reads SNI and ALPN from a TLS record holding a ClientHello.
fn client_hello(b: &[u8]) -> Parse {
    struct R<'a>(&'a [u8]);
    impl<'a> R<'a> {
        fn take(&mut self, n: usize) -> Option<&'a [u8]> {
            if self.0.len() < n {
                return None;
            }
            let (h, t) = self.0.split_at(n);
            self.0 = t;
            Some(h)
        }
        fn u8(&mut self) -> Option<usize> {
            self.take(1).map(|b| usize::from(b[0]))
        }
        fn u16(&mut self) -> Option<usize> {
            self.take(2)
                .map(|b| usize::from(u16::from_be_bytes([b[0], b[1]])))
        }
        fn vec8(&mut self) -> Option<&'a [u8]> {
            let n = self.u8()?;
            self.take(n)
        }
        fn vec16(&mut self) -> Option<&'a [u8]> {
            let n = self.u16()?;
            self.take(n)
        }
    }
    if b.len() < 5 {
        return Parse::Short;
    }
    let record_len = usize::from(u16::from_be_bytes([b[3], b[4]]));
    if b.len() < 5 + record_len {
        return if 5 + record_len > PEEK_BYTES {
            Parse::Bad
        } else {
            Parse::Short
        };
    }
    let parse = || -> Option<ClientHello> {
        let mut r = R(&b[5..5 + record_len]);
        if r.u8()? != 1 {
            return None;
        }
        r.take(3)?; // handshake length
        r.take(2 + 32)?; // version, random
        r.vec8()?; // session id
        r.vec16()?; // cipher suites
        r.vec8()?; // compression
        let mut ext = R(r.vec16()?);
        let mut hello = ClientHello::default();
        while !ext.0.is_empty() {
            let kind = ext.u16()?;
            let mut data = R(ext.vec16()?);
            match kind {
                0 => {
                    let mut list = R(data.vec16()?);
                    while !list.0.is_empty() {
                        let name_type = list.u8()?;
                        let name = list.vec16()?;
                        if name_type == 0 {
                            hello.server_name = std::str::from_utf8(name).ok().map(str::to_string);
                        }
                    }
                }
                16 => {
                    let mut list = R(data.vec16()?);
                    while !list.0.is_empty() {
                        let p = list.vec8()?;
                        hello.alpn.push(String::from_utf8_lossy(p).into_owned());
                    }
                }
                _ => {}
            }
        }
        Some(hello)
    };
    parse().map_or(Parse::Bad, Parse::Done)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recognises_http_versions_and_waits_for_more() {
        assert_eq!(
            classify(b"GET / HTTP/1.1\r\nHost: a\r\n"),
            Some(Verdict::Plain(Some("http/1.1")))
        );
        assert_eq!(classify(b"GET / HT"), None);
        assert_eq!(classify(b"PRI * HTTP"), None);
        assert_eq!(classify(H2_PREFACE), Some(Verdict::Plain(Some("h2c"))));
        assert_eq!(classify(b"\x00\x01binary"), Some(Verdict::Plain(None)));
        assert_eq!(classify(b"hello\r\n"), Some(Verdict::Plain(None)));
    }

    #[test]
    fn reads_sni_and_alpn_from_a_real_client_hello() {
        // A ClientHello from rustls, captured through an in-memory connection.
        let mut cfg = rustls::ClientConfig::builder_with_provider(isthmus_ca::tls::provider())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(rustls::RootCertStore::empty())
            .with_no_client_auth();
        cfg.alpn_protocols = vec![b"h2".to_vec(), b"istio".to_vec()];
        let name = rustls_pki_types::ServerName::try_from(
            "outbound_.9080_._.reviews.ns.svc.cluster.local",
        )
        .unwrap();
        let mut conn = rustls::ClientConnection::new(std::sync::Arc::new(cfg), name).unwrap();
        let mut bytes = Vec::new();
        conn.write_tls(&mut bytes).unwrap();
        match classify(&bytes) {
            Some(Verdict::Tls(h)) => {
                assert_eq!(
                    h.server_name.as_deref(),
                    Some("outbound_.9080_._.reviews.ns.svc.cluster.local")
                );
                assert_eq!(h.alpn, vec!["h2", "istio"]);
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(classify(&bytes[..20]), None);
    }
}
