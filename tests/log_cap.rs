//! The devicemapper crate logs through the `log` crate: its records reach the subscriber through the
//! `log` bridge that `sealcsi::logging::init` installs. A dedicated test binary, because that bridge
//! and the subscriber are process-global.

use std::io::Read;

#[test]
fn devicemapper_log_records_never_reach_the_output_whatever_the_filter() {
    // The output is stderr; capture it through a pipe dup'ed over fd 2 for the duration of the test.
    let (mut reader, writer) = std::io::pipe().unwrap();
    let saved = nix::unistd::dup(std::io::stderr()).unwrap();
    nix::unistd::dup2_stderr(&writer).unwrap();
    drop(writer);

    sealcsi::logging::init(
        "trace,devicemapper=trace,devicemapper::core::dm=trace",
        false,
    );
    log::trace!(target: "devicemapper::core::dm", "Loading table \"MARKER-LOG-0123abcd\" for dev");
    log::debug!(target: "devicemapper::core::dm", "MARKER-LOG-DEBUG");
    log::info!(target: "devicemapper::core::dm", "devicemapper info through log");
    log::trace!(target: "sealcsi::probe", "sealcsi trace through log");
    tracing::trace!(target: "devicemapper::core::dm", "MARKER-TRACING");

    nix::unistd::dup2_stderr(&saved).unwrap();
    let mut out = String::new();
    reader.read_to_string(&mut out).unwrap();
    assert!(!out.contains("MARKER"), "leaked:\n{out}");
    assert!(out.contains("devicemapper info through log"), "{out}");
    assert!(out.contains("sealcsi trace through log"), "{out}");
}
