//! Generates the tonic client and server of Istio's echo gRPC service (`proto.EchoTestService`,
//! method `Echo`) from a description in Rust; the messages are hand-written prost structs in
//! `src/grpc.rs`, so no protoc is needed.

fn main() {
    let method = tonic_build::manual::Method::builder()
        .name("echo")
        .route_name("Echo")
        .input_type("crate::grpc::EchoRequest")
        .output_type("crate::grpc::EchoResponse")
        .codec_path("tonic_prost::ProstCodec")
        .build();
    let service = tonic_build::manual::Service::builder()
        .name("EchoTestService")
        .package("proto")
        .method(method)
        .build();
    tonic_build::manual::Builder::new().compile(&[service]);
}
