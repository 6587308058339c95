//! Generates the gRPC code from `kms/v2/api.proto` and `broker/v1/broker.proto` (and the
//! apiserver's etcd record `kms/v2/storage.proto`)
//! with `protox` (pure Rust), so building needs no system `protoc`.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protos = [
        "kms/v2/api.proto",
        "kms/v2/storage.proto",
        "broker/v1/broker.proto",
    ];
    for p in protos {
        println!("cargo:rerun-if-changed={p}");
    }
    let fds = protox::compile(protos, ["."])?;
    tonic_prost_build::configure()
        .build_server(true)
        .build_client(true)
        .compile_fds(fds)?;
    Ok(())
}
