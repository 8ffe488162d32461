//! The sidecar data plane
