//! Compiles the vendored CSI v1.12.0 proto (proto/csi.proto) into `sealcsi::csi::proto`.
//! protox is a pure-Rust protobuf compiler: no protoc needed on the build machine.

/// Messages with a `csi_secret` field (secrets maps, the snapshot-metadata security token): generated
/// without `Debug`; `src/csi/mod.rs` gives them one that prints no field, so no log can leak a secret.
/// The same list is in `src/csi/mod.rs` (`redacted_debug!`).
const SECRET_MESSAGES: &[&str] = &[
    "CreateVolumeRequest",
    "DeleteVolumeRequest",
    "ControllerPublishVolumeRequest",
    "ControllerUnpublishVolumeRequest",
    "ValidateVolumeCapabilitiesRequest",
    "ControllerModifyVolumeRequest",
    "CreateSnapshotRequest",
    "DeleteSnapshotRequest",
    "ListSnapshotsRequest",
    "GetSnapshotRequest",
    "ControllerExpandVolumeRequest",
    "NodeStageVolumeRequest",
    "NodePublishVolumeRequest",
    "NodeExpandVolumeRequest",
    "CreateVolumeGroupSnapshotRequest",
    "DeleteVolumeGroupSnapshotRequest",
    "GetVolumeGroupSnapshotRequest",
    "GetMetadataAllocatedRequest",
    "GetMetadataDeltaRequest",
];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto/csi.proto");
    let fds = protox::compile(["proto/csi.proto"], ["proto"])?;
    tonic_prost_build::configure()
        .build_server(true)
        .build_client(true)
        .skip_debug(SECRET_MESSAGES.iter().map(|m| format!(".csi.v1.{m}")))
        .compile_fds(fds)?;
    Ok(())
}
