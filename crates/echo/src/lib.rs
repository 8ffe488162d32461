//! The echo app: what a test or a demo runs as its workload. Like Istio's echo app, an HTTP
//! answer lists what the server saw (`Hostname=`, `Host=`, `URL=`, `Method=`, `Proto=`, `IP=`,
//! `RequestHeader=` lines), plus `Identity=` the caller's SPIFFE identity when the sidecar
//! passed one in `x-forwarded-client-cert`. The TCP mode echoes bytes back, optionally after a
//! greeting of its own (server-first protocols, seed 003). The gRPC mode serves Istio's
//! `proto.EchoTestService/Echo` with the same description.

pub mod client;
pub mod grpc;
pub mod server;

pub use server::{Mode, ServerOptions, serve};
