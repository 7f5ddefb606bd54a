//! Compiles the vendored CSI v1.12.0 proto (proto/csi.proto) into `sealcsi::csi::proto`.
//! protox is a pure-Rust protobuf compiler: no protoc needed on the build machine.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto/csi.proto");
    let fds = protox::compile(["proto/csi.proto"], ["proto"])?;
    tonic_prost_build::configure()
        .build_server(true)
        .build_client(true)
        .compile_fds(fds)?;
    Ok(())
}
