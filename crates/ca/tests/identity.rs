//! Identity end to end, over real sockets: the CA API over TLS with token authentication, and
//! workload mTLS handshakes accepted or refused by the SPIFFE verifiers.

use std::sync::Arc;
use std::time::Duration;

use isthmus_ca::tls::{
    self, ALPN_ISTIO, CertStore, Rejection, TrustBundle, certified_key, connection_peer,
};
use isthmus_ca::workload::{Issued, new_key_and_csr, validity};
use isthmus_ca::{Authority, CaOptions, SpiffeId, TokenAuthority, service::CaService};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::{TlsAcceptor, TlsConnector};
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity, Server, ServerTlsConfig};

const ISTIOD: &str = "istiod.istio-system.svc";

fn ca(dir: &std::path::Path, trust_domain: &str) -> Authority {
    Authority::load_or_create(
        dir,
        CaOptions {
            trust_domain: trust_domain.into(),
            ..CaOptions::default()
        },
    )
    .expect("CA")
}

/// Issues a workload certificate directly from the authority.
fn issue(ca: &Authority, ns: &str, sa: &str, ttl: Duration) -> Issued {
    let id = SpiffeId::new(&ca.options.trust_domain, ns, sa);
    let (key_pem, csr) = new_key_and_csr(&id).unwrap();
    let chain = ca.sign_csr(&csr, &id, Some(ttl)).unwrap();
    let (not_before, not_after) = validity(&chain).unwrap();
    Issued {
        chain,
        key_pem,
        not_before,
        not_after,
    }
}

fn store(i: &Issued) -> Arc<CertStore> {
    Arc::new(CertStore::new(
        certified_key(&i.presented_chain(), &i.key_pem).unwrap(),
    ))
}

fn bundle(roots: &str, tds: &[&str]) -> Arc<TrustBundle> {
    Arc::new(TrustBundle::from_pem(roots, tds.iter().map(|s| s.to_string()).collect()).unwrap())
}

/// Starts the CA API over TLS on loopback; returns a channel to it.
async fn serve_ca(ca: Arc<Authority>, tokens: Arc<TokenAuthority>) -> tonic::transport::Channel {
    let (chain, key) = ca
        .issue_server(&[ISTIOD.to_string()], Duration::from_secs(3600))
        .unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let root = ca.root_pem();
    let svc = CaService::new(ca, tokens).into_server();
    tokio::spawn(async move {
        Server::builder()
            .tls_config(ServerTlsConfig::new().identity(Identity::from_pem(chain.concat(), key)))
            .unwrap()
            .add_service(svc)
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener))
            .await
            .unwrap();
    });
    Endpoint::from_shared(format!("https://{addr}"))
        .unwrap()
        .tls_config(
            ClientTlsConfig::new()
                .ca_certificate(Certificate::from_pem(root))
                .domain_name(ISTIOD),
        )
        .unwrap()
        .connect_timeout(Duration::from_secs(5))
        .connect()
        .await
        .expect("connect to CA")
}

#[tokio::test]
async fn ca_api_issues_the_token_identity_only() {
    let dir = tempfile::tempdir().unwrap();
    let authority = Arc::new(ca(dir.path(), "cluster.local"));
    let tokens = Arc::new(TokenAuthority::load_or_create(dir.path()).unwrap());
    let channel = serve_ca(authority.clone(), tokens.clone()).await;

    // The CSR claims `admin`; the token says `sleep`.
    let claimed = SpiffeId::new("cluster.local", "istio-system", "admin");
    let (_key, csr) = new_key_and_csr(&claimed).unwrap();
    let token = tokens.issue("default", "sleep", Duration::from_secs(60));
    let chain = isthmus_ca::service::request_certificate(
        channel.clone(),
        &token,
        &csr,
        Duration::from_secs(200 * 24 * 3600),
    )
    .await
    .expect("issued");
    assert_eq!(chain.len(), 2, "leaf and root");
    assert_eq!(chain.last().unwrap(), &authority.root_pem());
    let leaf = rustls_pki_types::pem::PemObject::from_pem_slice(chain[0].as_bytes()).unwrap();
    assert_eq!(
        tls::peer_identity(&leaf).unwrap().to_string(),
        "spiffe://cluster.local/ns/default/sa/sleep"
    );
    // 200 days asked for, 90 days (the maximum) given.
    let (nb, na) = validity(&chain).unwrap();
    let days = na.duration_since(nb).unwrap().as_secs() / 86_400;
    assert_eq!(days, 90);

    // A token signed by another key, an expired token, and no token at all are refused.
    let other_dir = tempfile::tempdir().unwrap();
    let forged = TokenAuthority::load_or_create(other_dir.path())
        .unwrap()
        .issue("default", "sleep", Duration::from_secs(60));
    let expired = tokens.issue("default", "sleep", Duration::ZERO);
    tokio::time::sleep(Duration::from_millis(1100)).await;
    for bad in [forged.as_str(), expired.as_str()] {
        let err = isthmus_ca::service::request_certificate(
            channel.clone(),
            bad,
            &csr,
            Duration::from_secs(60),
        )
        .await
        .unwrap_err();
        assert_eq!(err.code(), tonic::Code::Unauthenticated, "{err:?}");
    }
    let mut client =
        isthmus_ca::api::istio_certificate_service_client::IstioCertificateServiceClient::new(
            channel,
        );
    let err = client
        .create_certificate(isthmus_ca::api::IstioCertificateRequest {
            csr,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unauthenticated);
}

#[test]
fn ca_restarts_with_the_same_root_and_private_keys_are_private() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let first = ca(dir.path(), "cluster.local").root_pem();
    let second = ca(dir.path(), "cluster.local").root_pem();
    assert_eq!(first, second);
    let mode = std::fs::metadata(dir.path().join("ca-key.pem"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
    for f in ["ca-cert.pem", "root-cert.pem", "cert-chain.pem"] {
        assert!(dir.path().join(f).exists(), "{f}");
    }
}

#[test]
fn plug_in_intermediate_ca_chains_to_its_root() {
    // A root, and an intermediate signed by it laid out as Istio's plug-in CA files.
    let root_dir = tempfile::tempdir().unwrap();
    let root = ca(root_dir.path(), "cluster.local");
    let inter_dir = tempfile::tempdir().unwrap();
    let (chain, key) = root.issue_intermediate(Duration::from_secs(3600)).unwrap();
    std::fs::write(inter_dir.path().join("ca-cert.pem"), &chain[0]).unwrap();
    std::fs::write(inter_dir.path().join("ca-key.pem"), key).unwrap();
    std::fs::write(inter_dir.path().join("root-cert.pem"), root.root_pem()).unwrap();
    std::fs::write(inter_dir.path().join("cert-chain.pem"), chain.concat()).unwrap();
    let inter = ca(inter_dir.path(), "cluster.local");
    let issued = issue(&inter, "default", "sleep", Duration::from_secs(3600));
    assert_eq!(issued.chain.len(), 3, "leaf, intermediate, root");
    let b = bundle(&root.root_pem(), &["cluster.local"]);
    let ders: Vec<rustls_pki_types::CertificateDer<'static>> = issued
        .chain
        .iter()
        .map(|p| rustls_pki_types::pem::PemObject::from_pem_slice(p.as_bytes()).unwrap())
        .collect();
    let id = b
        .verify(
            &ders[0],
            &ders[1..2],
            rustls_pki_types::UnixTime::now(),
            webpki::KeyUsage::client_auth(),
        )
        .unwrap();
    assert_eq!(id.service_account, "sleep");
}

/// Runs one mTLS exchange: the client sends a line, the server answers with the client's
/// identity. Returns the server's view or the first handshake error.
async fn exchange(
    server_bundle: Arc<TrustBundle>,
    server_cert: Arc<CertStore>,
    client_bundle: Arc<TrustBundle>,
    expected: &[String],
    client_cert: Arc<CertStore>,
) -> Result<String, String> {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let acceptor = TlsAcceptor::from(Arc::new(
        tls::server_config(server_bundle, server_cert, &[ALPN_ISTIO]).unwrap(),
    ));
    let server = tokio::spawn(async move {
        let (tcp, _) = listener.accept().await.unwrap();
        let mut s = acceptor
            .accept(tcp)
            .await
            .map_err(|e| format!("server: {e}"))?;
        let peer = connection_peer(s.get_ref().1.peer_certificates())
            .map(|p| p.to_string())
            .unwrap_or_default();
        let mut buf = [0u8; 5];
        s.read_exact(&mut buf).await.map_err(|e| e.to_string())?;
        s.write_all(peer.as_bytes())
            .await
            .map_err(|e| e.to_string())?;
        s.shutdown().await.ok();
        Ok::<_, String>(peer)
    });
    let connector = TlsConnector::from(Arc::new(
        tls::client_config(client_bundle, expected, client_cert, &[ALPN_ISTIO]).unwrap(),
    ));
    let tcp = TcpStream::connect(addr).await.unwrap();
    let name = rustls_pki_types::ServerName::try_from("outbound.mesh").unwrap();
    let client = async {
        let mut c = connector
            .connect(name, tcp)
            .await
            .map_err(|e| format!("client: {e}"))?;
        c.write_all(b"hello")
            .await
            .map_err(|e| format!("client: {e}"))?;
        let mut out = String::new();
        c.read_to_string(&mut out)
            .await
            .map_err(|e| format!("client: {e}"))?;
        Ok::<_, String>(out)
    };
    let client = tokio::time::timeout(Duration::from_secs(5), client)
        .await
        .expect("bounded");
    let server = tokio::time::timeout(Duration::from_secs(5), server)
        .await
        .expect("bounded")
        .unwrap();
    match (client, server) {
        (Ok(seen), Ok(_)) => Ok(seen),
        (Err(c), Err(s)) => Err(format!("{c} / {s}")),
        (Err(e), _) | (_, Err(e)) => Err(e),
    }
}

#[tokio::test]
async fn mtls_verifies_identities_and_refuses_bad_peers() {
    let dir = tempfile::tempdir().unwrap();
    let mesh = ca(dir.path(), "cluster.local");
    let roots = mesh.root_pem();
    let trust = bundle(&roots, &["cluster.local"]);
    let server = issue(&mesh, "default", "reviews", Duration::from_secs(3600));
    let client = issue(&mesh, "default", "productpage", Duration::from_secs(3600));
    let reviews = "spiffe://cluster.local/ns/default/sa/reviews".to_string();

    // The server learns the client's identity.
    let seen = exchange(
        trust.clone(),
        store(&server),
        trust.clone(),
        std::slice::from_ref(&reviews),
        store(&client),
    )
    .await
    .expect("handshake");
    assert_eq!(seen, "spiffe://cluster.local/ns/default/sa/productpage");

    // The client expects someone else.
    let err = exchange(
        trust.clone(),
        store(&server),
        trust.clone(),
        &["spiffe://cluster.local/ns/default/sa/ratings".into()],
        store(&client),
    )
    .await
    .unwrap_err();
    assert!(err.contains("UnexpectedIdentity"), "{err}");

    // A self-signed client (another CA's certificate) is refused by the server.
    let other_dir = tempfile::tempdir().unwrap();
    let other = ca(other_dir.path(), "cluster.local");
    let stranger = issue(&other, "default", "productpage", Duration::from_secs(3600));
    let err = exchange(
        trust.clone(),
        store(&server),
        trust.clone(),
        std::slice::from_ref(&reviews),
        store(&stranger),
    )
    .await
    .unwrap_err();
    assert!(
        err.contains("UnknownIssuer") || err.contains("unknown"),
        "{err}"
    );

    // Same root, wrong trust domain: refused, unless the domain is an alias.
    let evil = ca(dir.path(), "evil.local");
    let foreign = issue(&evil, "default", "productpage", Duration::from_secs(3600));
    let err = exchange(
        trust.clone(),
        store(&server),
        trust.clone(),
        std::slice::from_ref(&reviews),
        store(&foreign),
    )
    .await
    .unwrap_err();
    assert!(err.contains("WrongTrustDomain"), "{err}");
    let aliased = bundle(&roots, &["cluster.local", "evil.local"]);
    exchange(
        aliased,
        store(&server),
        trust.clone(),
        std::slice::from_ref(&reviews),
        store(&foreign),
    )
    .await
    .expect("alias accepted");

    // An expired client certificate.
    let short = issue(&mesh, "default", "productpage", Duration::from_secs(1));
    // Validity has whole seconds: wait until `now` is past `not_after` even when truncated.
    tokio::time::sleep(Duration::from_millis(2100)).await;
    let err = exchange(
        trust.clone(),
        store(&server),
        trust.clone(),
        std::slice::from_ref(&reviews),
        store(&short),
    )
    .await
    .unwrap_err();
    assert!(err.to_lowercase().contains("expired"), "{err}");

    // Root rotation: a bundle with the old and the new root verifies both.
    let both = bundle(&format!("{roots}{}", other.root_pem()), &["cluster.local"]);
    exchange(both, store(&server), trust, &[reviews], store(&stranger))
        .await
        .expect("new root accepted during rotation");
}

#[test]
fn not_yet_valid_and_expired_are_named() {
    let dir = tempfile::tempdir().unwrap();
    let mesh = ca(dir.path(), "cluster.local");
    let trust = bundle(&mesh.root_pem(), &["cluster.local"]);
    let cert = issue(&mesh, "default", "a", Duration::from_secs(3600));
    let der = rustls_pki_types::pem::PemObject::from_pem_slice(cert.chain[0].as_bytes()).unwrap();
    let at = |t: std::time::SystemTime| {
        rustls_pki_types::UnixTime::since_unix_epoch(
            t.duration_since(std::time::UNIX_EPOCH).unwrap(),
        )
    };
    let past = at(cert.not_before - Duration::from_secs(3600));
    let future = at(cert.not_after + Duration::from_secs(3600));
    let usage = || webpki::KeyUsage::client_auth();
    assert_eq!(
        trust.verify(&der, &[], past, usage()).unwrap_err(),
        Rejection::NotYetValid
    );
    assert_eq!(
        trust.verify(&der, &[], future, usage()).unwrap_err(),
        Rejection::Expired
    );
}

#[tokio::test]
async fn rotation_keeps_connections_in_use_and_new_handshakes_get_the_new_cert() {
    let dir = tempfile::tempdir().unwrap();
    let mesh = ca(dir.path(), "cluster.local");
    let trust = bundle(&mesh.root_pem(), &["cluster.local"]);
    let server_certs = store(&issue(
        &mesh,
        "default",
        "reviews",
        Duration::from_secs(3600),
    ));
    let client_certs = store(&issue(
        &mesh,
        "default",
        "productpage",
        Duration::from_secs(3600),
    ));

    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let acceptor = TlsAcceptor::from(Arc::new(
        tls::server_config(trust.clone(), server_certs.clone(), &[ALPN_ISTIO]).unwrap(),
    ));
    // Echo server: each connection echoes bytes until closed.
    tokio::spawn(async move {
        loop {
            let (tcp, _) = listener.accept().await.unwrap();
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(mut s) = acceptor.accept(tcp).await else {
                    return;
                };
                let mut buf = [0u8; 64];
                while let Ok(n) = s.read(&mut buf).await {
                    if n == 0 || s.write_all(&buf[..n]).await.is_err() {
                        break;
                    }
                }
            });
        }
    });
    let name = rustls_pki_types::ServerName::try_from("outbound.mesh").unwrap();
    // A fresh client config per connection: no session resumption, a full handshake each time.
    let connect = || async {
        let connector = TlsConnector::from(Arc::new(
            tls::client_config(trust.clone(), &[], client_certs.clone(), &[ALPN_ISTIO]).unwrap(),
        ));
        let tcp = TcpStream::connect(addr).await.unwrap();
        connector.connect(name.clone(), tcp).await.unwrap()
    };
    let serial = |c: &tokio_rustls::client::TlsStream<TcpStream>| {
        c.get_ref().1.peer_certificates().unwrap()[0].to_vec()
    };
    let mut old = connect().await;
    let old_cert = serial(&old);
    let mut buf = [0u8; 4];
    for round in 0..20u8 {
        if round == 10 {
            // Renewal happens while the connection is busy.
            let renewed = issue(&mesh, "default", "reviews", Duration::from_secs(3600));
            server_certs
                .replace(certified_key(&renewed.presented_chain(), &renewed.key_pem).unwrap());
        }
        old.write_all(&[round; 4])
            .await
            .expect("write on the old connection");
        old.read_exact(&mut buf)
            .await
            .expect("read on the old connection");
        assert_eq!(buf, [round; 4]);
    }
    let new = connect().await;
    assert_ne!(
        serial(&new),
        old_cert,
        "new handshakes present the renewed certificate"
    );
}
