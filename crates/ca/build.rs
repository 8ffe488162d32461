//! Generates the tonic client and server of Istio's CA API from a description in Rust (the
//! messages are hand-written prost structs in `src/api.rs`), so no protoc is needed.

fn main() {
    let method = tonic_build::manual::Method::builder()
        .name("create_certificate")
        .route_name("CreateCertificate")
        .input_type("crate::api::IstioCertificateRequest")
        .output_type("crate::api::IstioCertificateResponse")
        .codec_path("tonic_prost::ProstCodec")
        .build();
    let service = tonic_build::manual::Service::builder()
        .name("IstioCertificateService")
        .package("istio.v1.auth")
        .method(method)
        .build();
    tonic_build::manual::Builder::new().compile(&[service]);
}
