//! Who may fetch a proxy's configuration on the secure port (Istio's 15012): the caller proves
//! an identity with its workload certificate (mutual TLS, verified against the mesh root during
//! the handshake) or, before it has one, with its service-account token; the proxy it claims to
//! be must be in that identity's namespace (and of its service account, when the node says).

use std::sync::Arc;

use envoy_types::pb::envoy::config::core::v3::Node;
use isthmus_ca::TokenAuthority;
use isthmus_xds::server::Authorizer;
use tonic::Status;
use tonic::metadata::MetadataMap;
use tonic::transport::CertificateDer;

use crate::generator::{proxy_of, service_account_of};

pub struct ProxyAuthorizer {
    pub tokens: Arc<TokenAuthority>,
}

impl Authorizer for ProxyAuthorizer {
    fn authorize(
        &self,
        certs: Option<&[CertificateDer<'static>]>,
        metadata: &MetadataMap,
        node: Option<&Node>,
    ) -> Result<(), Status> {
        let (namespace, account) = match certs.and_then(|c| c.first()) {
            Some(leaf) => {
                let id = isthmus_ca::tls::peer_identity(leaf)
                    .map_err(|e| Status::unauthenticated(format!("client certificate: {e}")))?;
                (id.namespace, id.service_account)
            }
            None => {
                let token = isthmus_ca::service::bearer(metadata).map_err(|_| {
                    Status::unauthenticated(
                        "xDS on this port needs a client certificate or a service-account token",
                    )
                })?;
                let sa = self
                    .tokens
                    .verify(token)
                    .map_err(|e| Status::unauthenticated(format!("token: {e}")))?;
                (sa.namespace, sa.name)
            }
        };
        let node = node.ok_or_else(|| Status::invalid_argument("first request has no node"))?;
        let proxy = proxy_of(node).map_err(Status::invalid_argument)?;
        if proxy.namespace != namespace {
            return Err(Status::permission_denied(format!(
                "proxy {} is in namespace {:?}, but the caller is {namespace}/{account}",
                node.id, proxy.namespace
            )));
        }
        if let Some(sa) = service_account_of(node)
            && sa != account
        {
            return Err(Status::permission_denied(format!(
                "proxy {} runs as service account {sa:?}, but the caller is {namespace}/{account}",
                node.id
            )));
        }
        Ok(())
    }
}
