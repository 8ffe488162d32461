//! Translation of the mesh model into per-proxy Envoy v3 resources
