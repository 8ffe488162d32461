//! The resources `istioctl analyze` adds when it analyzes files rather than a cluster: the
//! default ingress gateway Pod and Service in the control-plane namespace, so that Gateways
//! selecting `istio: ingressgateway` resolve.

use isthmus_config::{Loader, Resource};

/// Istio's default ingress gateway, as its analyzer renders it for `istio-system`.
pub const DEFAULT_RESOURCES: &str = r#"
apiVersion: v1
kind: Pod
metadata:
  labels:
    istio: ingressgateway
  name: istio-ingressgateway-dummypod
  namespace: istio-system
spec:
  containers:
    - name: istio-proxy
---
apiVersion: v1
kind: Service
metadata:
  name: istio-ingressgateway
  namespace: istio-system
spec:
  ports:
  - {name: http2, nodePort: 31380, port: 80, protocol: TCP, targetPort: 80}
  - {name: https, nodePort: 31390, port: 443, protocol: TCP, targetPort: 443}
  - {name: tcp, nodePort: 31400, port: 31400, protocol: TCP, targetPort: 31400}
  - {name: tls, nodePort: 31447, port: 15443, protocol: TCP, targetPort: 15443}
  selector:
    istio: ingressgateway
"#;

/// The default resources, with origins marked as built in.
pub fn default_resources() -> Vec<Resource> {
    let mut loaded = Loader::default().load_str("", DEFAULT_RESOURCES).resources;
    for r in &mut loaded {
        r.origin = Default::default();
    }
    loaded
}

#[cfg(test)]
mod tests {
    #[test]
    fn defaults_load() {
        assert_eq!(super::default_resources().len(), 2);
    }
}
