//! The keys behind RequestAuthentication `jwksUri`s, fetched by the control plane as istiod
//! does (http and https; `file://` too, for keys kept beside the control plane), so that
//! proxies get them inline and make no requests of their own. A document is
//! kept for [`REFRESH`] (istiod's 20 minutes) and then fetched again; one that failed is tried
//! again after [`RETRY`]. A change of keys is pushed like a change of config.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use http_body_util::{BodyExt, Empty, Limited};
use hyper_util::rt::TokioIo;
use isthmus_pilot::authn::JwksDocs;
use tokio::net::TcpStream;

/// How long fetched keys are used before they are fetched again.
pub const REFRESH: Duration = Duration::from_secs(20 * 60);
/// How soon a failed fetch is tried again.
pub const RETRY: Duration = Duration::from_secs(1);
/// Larger documents are refused.
const MAX_BYTES: usize = 1 << 20;

/// A document, or why it could not be fetched.
type Doc = Result<String, String>;

struct Fetched {
    at: Instant,
    doc: Doc,
}

impl Fetched {
    fn due(&self, now: Instant) -> bool {
        let keep = if self.doc.is_ok() { REFRESH } else { RETRY };
        now.duration_since(self.at) >= keep
    }
}

/// Fetched documents by URI.
#[derive(Default, Clone)]
pub struct JwksCache {
    docs: Arc<Mutex<BTreeMap<String, Fetched>>>,
}

impl JwksCache {
    /// The documents for `uris` (URI → time limit), fetching those never fetched.
    pub async fn resolve(&self, uris: &BTreeMap<String, Duration>) -> JwksDocs {
        let missing: Vec<(String, Duration)> = {
            let docs = self.lock();
            uris.iter()
                .filter(|(u, _)| !docs.contains_key(*u))
                .map(|(u, t)| (u.clone(), *t))
                .collect()
        };
        self.fetch_all(missing).await;
        let docs = self.lock();
        uris.keys()
            .map(|u| {
                let doc = docs
                    .get(u)
                    .map_or_else(|| Err("not fetched".to_string()), |f| f.doc.clone());
                (u.clone(), doc)
            })
            .collect()
    }

    /// Fetches again the documents of `uris` that are due; true when any came back different.
    pub async fn refresh(&self, uris: &BTreeMap<String, Duration>) -> bool {
        let now = Instant::now();
        let (due, before): (Vec<(String, Duration)>, Vec<Option<Doc>>) = {
            let docs = self.lock();
            uris.iter()
                .filter(|(u, _)| docs.get(*u).is_none_or(|f| f.due(now)))
                .map(|(u, t)| ((u.clone(), *t), docs.get(u).map(|f| f.doc.clone())))
                .unzip()
        };
        if due.is_empty() {
            return false;
        }
        let uris: Vec<String> = due.iter().map(|(u, _)| u.clone()).collect();
        self.fetch_all(due).await;
        let docs = self.lock();
        uris.iter()
            .zip(before)
            .any(|(u, old)| docs.get(u).map(|f| &f.doc) != old.as_ref())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, Fetched>> {
        self.docs.lock().unwrap_or_else(|p| p.into_inner())
    }

    async fn fetch_all(&self, uris: Vec<(String, Duration)>) {
        let fetches = uris.into_iter().map(|(uri, timeout)| async move {
            let doc = match tokio::time::timeout(timeout, Self::fetch(&uri)).await {
                Ok(r) => r,
                Err(_) => Err(format!("no answer within {timeout:?}")),
            };
            if let Err(e) = &doc {
                tracing::warn!(
                    uri,
                    "JWKS fetch failed, tokens of this issuer are refused: {e}"
                );
            }
            (uri, doc)
        });
        let results = futures::future::join_all(fetches).await;
        let now = Instant::now();
        let mut docs = self.lock();
        for (uri, doc) in results {
            docs.insert(uri, Fetched { at: now, doc });
        }
    }

    /// One GET of `uri` (http or https), its body as text when the answer is 200.
    async fn fetch(uri: &str) -> Result<String, String> {
        if let Some(path) = uri.strip_prefix("file://") {
            return read_file(path).await;
        }
        let parsed: http::Uri = uri.parse().map_err(|e| format!("bad URI: {e}"))?;
        let host = parsed.host().ok_or("URI without a host")?.to_string();
        let https = match parsed.scheme_str() {
            Some("http") => false,
            Some("https") => true,
            _ => return Err("only http, https and file URIs are fetched".into()),
        };
        let port = parsed.port_u16().unwrap_or(if https { 443 } else { 80 });
        let tcp = TcpStream::connect((host.trim_matches(['[', ']']), port))
            .await
            .map_err(|e| format!("connect: {e}"))?;
        let request = http::Request::get(parsed.path_and_query().map_or("/", |p| p.as_str()))
            .header(
                http::header::HOST,
                parsed.authority().map_or(host.as_str(), |a| a.as_str()),
            )
            .header(http::header::ACCEPT, "application/json")
            .body(Empty::<bytes::Bytes>::new())
            .map_err(|e| e.to_string())?;
        if https {
            let name =
                rustls::pki_types::ServerName::try_from(host.trim_matches(['[', ']']).to_string())
                    .map_err(|e| format!("bad host name: {e}"))?;
            let tls = tokio_rustls::TlsConnector::from(tls_config()?)
                .connect(name, tcp)
                .await
                .map_err(|e| format!("TLS: {e}"))?;
            get(TokioIo::new(tls), request).await
        } else {
            get(TokioIo::new(tcp), request).await
        }
    }
}

/// A JWKS kept in a file beside the control plane (`file:///path`, an isthmus extension).
async fn read_file(path: &str) -> Result<String, String> {
    use tokio::io::AsyncReadExt;
    let file = tokio::fs::File::open(path)
        .await
        .map_err(|e| format!("{path}: {e}"))?;
    let mut text = String::new();
    file.take(MAX_BYTES as u64 + 1)
        .read_to_string(&mut text)
        .await
        .map_err(|e| format!("{path}: {e}"))?;
    if text.len() > MAX_BYTES {
        return Err(format!("{path} is larger than {MAX_BYTES} bytes"));
    }
    Ok(text)
}

/// Server certificates are checked against Mozilla's roots, as a browser would.
fn tls_config() -> Result<Arc<rustls::ClientConfig>, String> {
    let roots = rustls::RootCertStore::from_iter(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    let cfg = rustls::ClientConfig::builder_with_provider(isthmus_ca::tls::provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("TLS: {e}"))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Arc::new(cfg))
}

async fn get<IO>(io: IO, request: http::Request<Empty<bytes::Bytes>>) -> Result<String, String>
where
    IO: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let (mut sender, conn) = hyper::client::conn::http1::handshake(io)
        .await
        .map_err(|e| format!("HTTP: {e}"))?;
    tokio::spawn(conn);
    let response = sender
        .send_request(request)
        .await
        .map_err(|e| format!("HTTP: {e}"))?;
    if response.status() != http::StatusCode::OK {
        return Err(format!("answered {}", response.status()));
    }
    let body = Limited::new(response.into_body(), MAX_BYTES)
        .collect()
        .await
        .map_err(|e| format!("body: {e}"))?
        .to_bytes();
    String::from_utf8(body.to_vec()).map_err(|_| "the document is not UTF-8".into())
}
