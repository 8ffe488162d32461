//! Istio's custom resources.

pub mod common;
pub mod networking;
pub mod security;
pub mod telemetry;
