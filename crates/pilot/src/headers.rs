//! The headers a sidecar adds or passes on: Istio's defaults, as changed by `proxyHeaders` of
//! ProxyConfig (the pod's `proxy.istio.io/config`, else `meshConfig.defaultConfig`).
//!
//! By default, as Istio: inbound answers carry `server: istio-envoy` and outbound ones Envoy's
//! own `server: envoy`; requests get `x-request-id` where missing and `x-envoy-attempt-count`;
//! the router adds `x-envoy-upstream-service-time`; inbound forwards the caller's identity in
//! `x-forwarded-client-cert` (APPEND_FORWARD: subject, URI, DNS).

use envoy_types::pb::envoy::extensions::filters::http::router::v3::Router;
use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3::{
    HttpConnectionManager, http_connection_manager,
};
use envoy_types::pb::google::protobuf::BoolValue;
use isthmus_config::mesh::{self, Disabled};

use http_connection_manager::{
    ForwardClientCertDetails, ServerHeaderTransformation, SetCurrentClientCertDetails,
};

/// Istio's server name on inbound listeners.
pub const ISTIO_SERVER_NAME: &str = "istio-envoy";

/// A `proxyHeaders` setting, resolved against Istio's defaults.
#[derive(Debug, Clone, PartialEq)]
pub struct ProxyHeaders {
    /// `server.value`: one name for both directions, in place of Istio's two.
    server_name: Option<String>,
    /// `server.disabled`: the app's own `server` header passes, and none is added.
    server_disabled: bool,
    request_id: bool,
    /// `x-envoy-attempt-count` on upstream requests (the virtual hosts' setting).
    pub attempt_count: bool,
    /// The router's `suppress_envoy_headers` (`envoyDebugHeaders.disabled`).
    suppress_envoy_headers: bool,
    forward_client_cert: ForwardClientCertDetails,
    cert_details: SetCurrentClientCertDetails,
    /// `metadataExchangeHeaders.mode: IN_MESH`: no peer metadata to services outside the
    /// mesh.
    pub metadata_in_mesh_only: bool,
}

impl Default for ProxyHeaders {
    fn default() -> Self {
        ProxyHeaders {
            server_name: None,
            server_disabled: false,
            request_id: true,
            attempt_count: true,
            suppress_envoy_headers: false,
            forward_client_cert: ForwardClientCertDetails::AppendForward,
            cert_details: SetCurrentClientCertDetails {
                subject: Some(BoolValue { value: true }),
                dns: true,
                uri: true,
                ..Default::default()
            },
            metadata_in_mesh_only: false,
        }
    }
}

impl ProxyHeaders {
    pub fn resolve(ph: Option<&mesh::ProxyHeaders>) -> ProxyHeaders {
        let mut out = ProxyHeaders::default();
        let Some(ph) = ph else {
            return out;
        };
        if let Some(server) = &ph.server {
            out.server_disabled = server.disabled == Some(true);
            out.server_name = (!server.value.is_empty()).then(|| server.value.clone());
        }
        out.request_id = !Disabled::is_set(&ph.request_id);
        out.attempt_count = !Disabled::is_set(&ph.attempt_count);
        out.suppress_envoy_headers = Disabled::is_set(&ph.envoy_debug_headers);
        out.metadata_in_mesh_only = ph.metadata_exchange_headers.as_ref().and_then(|m| m.mode)
            == Some(mesh::MetadataExchangeMode::InMesh);
        if let Some(fcc) = ph.forwarded_client_cert.and_then(forward_client_cert) {
            out.forward_client_cert = fcc;
        }
        if let Some(d) = &ph.set_current_client_cert_details {
            out.cert_details = SetCurrentClientCertDetails {
                subject: Some(BoolValue {
                    value: d.subject.unwrap_or(false),
                }),
                dns: d.dns.unwrap_or(false),
                uri: d.uri.unwrap_or(false),
                ..Default::default()
            };
        }
        out
    }

    /// Sets the connection manager's header fields for a listener of one direction.
    pub fn apply(&self, hcm: &mut HttpConnectionManager, inbound: bool) {
        if self.server_disabled {
            hcm.server_header_transformation = ServerHeaderTransformation::PassThrough as i32;
        } else if let Some(name) = &self.server_name {
            hcm.server_name = name.clone();
        } else if inbound {
            hcm.server_name = ISTIO_SERVER_NAME.into();
        }
        if !self.request_id {
            hcm.generate_request_id = Some(BoolValue { value: false });
        }
        if inbound {
            hcm.forward_client_cert_details = self.forward_client_cert as i32;
            hcm.set_current_client_cert_details = Some(self.cert_details);
        }
    }

    /// The router filter's configuration.
    pub fn router(&self) -> Router {
        Router {
            suppress_envoy_headers: self.suppress_envoy_headers,
            ..Default::default()
        }
    }
}

fn forward_client_cert(mode: mesh::ForwardClientCert) -> Option<ForwardClientCertDetails> {
    use mesh::ForwardClientCert as M;
    Some(match mode {
        M::Undefined => return None,
        M::Sanitize => ForwardClientCertDetails::Sanitize,
        M::ForwardOnly => ForwardClientCertDetails::ForwardOnly,
        M::AppendForward => ForwardClientCertDetails::AppendForward,
        M::SanitizeSet => ForwardClientCertDetails::SanitizeSet,
        M::AlwaysForwardOnly => ForwardClientCertDetails::AlwaysForwardOnly,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A `proxyHeaders` setting from its JSON.
    fn resolve(json: &str) -> ProxyHeaders {
        ProxyHeaders::resolve(Some(&serde_json::from_str(json).expect("proxyHeaders")))
    }

    #[test]
    fn istio_defaults_name_the_server_by_direction() {
        let ph = ProxyHeaders::resolve(None);
        let (mut inbound, mut outbound) = Default::default();
        ph.apply(&mut inbound, true);
        ph.apply(&mut outbound, false);
        let inbound: HttpConnectionManager = inbound;
        let outbound: HttpConnectionManager = outbound;
        assert_eq!(inbound.server_name, "istio-envoy");
        assert_eq!(outbound.server_name, "", "Envoy's own default, `envoy`");
        assert_eq!(inbound.server_header_transformation, 0, "OVERWRITE");
        assert_eq!(inbound.generate_request_id, None);
        assert_eq!(
            inbound.forward_client_cert_details,
            ForwardClientCertDetails::AppendForward as i32
        );
        assert_eq!(outbound.forward_client_cert_details, 0, "SANITIZE");
        assert!(ph.attempt_count);
        assert!(!ph.router().suppress_envoy_headers);
    }

    #[test]
    fn proxy_headers_turn_headers_off_and_rename_the_server() {
        let ph = resolve(
            r#"{
                "server": {"value": "my-mesh"},
                "requestId": {"disabled": true},
                "attemptCount": {"disabled": true},
                "envoyDebugHeaders": {"disabled": true},
                "forwardedClientCert": "SANITIZE_SET",
                "setCurrentClientCertDetails": {"uri": true},
                "metadataExchangeHeaders": {"mode": "IN_MESH"}}"#,
        );
        let mut outbound = HttpConnectionManager::default();
        ph.apply(&mut outbound, false);
        assert_eq!(outbound.server_name, "my-mesh");
        assert_eq!(
            outbound.generate_request_id,
            Some(BoolValue { value: false })
        );
        assert!(!ph.attempt_count);
        assert!(ph.router().suppress_envoy_headers);
        let mut inbound = HttpConnectionManager::default();
        ph.apply(&mut inbound, true);
        assert_eq!(inbound.server_name, "my-mesh");
        assert_eq!(
            inbound.forward_client_cert_details,
            ForwardClientCertDetails::SanitizeSet as i32
        );
        let d = inbound.set_current_client_cert_details.expect("details");
        assert!(d.uri && !d.dns && d.subject == Some(BoolValue { value: false }));

        let off = resolve(r#"{"server": {"disabled": true}}"#);
        let mut hcm = HttpConnectionManager::default();
        off.apply(&mut hcm, true);
        assert_eq!(
            hcm.server_header_transformation,
            ServerHeaderTransformation::PassThrough as i32
        );
        assert_eq!(hcm.server_name, "");
    }
}
