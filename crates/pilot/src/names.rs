//! Istio's Envoy resource names, so that `proxy-config` output reads as Istio's does.

pub const VIRTUAL_OUTBOUND: &str = "virtualOutbound";
pub const VIRTUAL_INBOUND: &str = "virtualInbound";
pub const PASSTHROUGH_CLUSTER: &str = "PassthroughCluster";
pub const BLACKHOLE_CLUSTER: &str = "BlackHoleCluster";
pub const INBOUND_PASSTHROUGH_CLUSTER: &str = "InboundPassthroughCluster";
/// Source of the proxy's inbound-passthrough connections to the app (IPv4 / IPv6).
pub const INBOUND_PASSTHROUGH_BIND_V4: &str = "127.0.0.6";
pub const INBOUND_PASSTHROUGH_BIND_V6: &str = "::6";
/// The socket mark of the proxy's TPROXY connections (Istio's `ISTIO_INBOUND_TPROXY_MARK`).
pub const TPROXY_MARK: u32 = 1337;
pub const OUTBOUND_PORT: u16 = 15001;
pub const INBOUND_PORT: u16 = 15006;

/// `outbound|<port>|<subset>|<host>`
pub fn outbound_cluster(port: u16, subset: &str, host: &str) -> String {
    format!("outbound|{port}|{subset}|{host}")
}

/// `inbound|<port>||` (Istio ≥ 1.10 no longer names the service).
pub fn inbound_cluster(port: u16) -> String {
    format!("inbound|{port}||")
}

/// `filter_metadata.istio.config` of what an Istio config built: its API path as Istio writes
/// it (in `v1alpha3`, its internal version), which istioctl shows as `<name>.<namespace>` in
/// its DESTINATION RULE and VIRTUAL SERVICE columns.
pub fn config_path(resource: &str, namespace: &str, name: &str) -> String {
    format!("/apis/networking.istio.io/v1alpha3/namespaces/{namespace}/{resource}/{name}")
}

#[cfg(test)]
mod tests {
    #[test]
    fn names_round_trip() {
        let n = super::outbound_cluster(9080, "v1", "reviews.bookinfo.svc.cluster.local");
        assert_eq!(n, "outbound|9080|v1|reviews.bookinfo.svc.cluster.local");
        assert_eq!(super::inbound_cluster(8080), "inbound|8080||");
    }
}
