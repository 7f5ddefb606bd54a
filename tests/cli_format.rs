//! `volume format` refuses bad option combinations before it opens the sealing source, the kernel or
//! the device: these run on a host without device-mapper and the device's bytes stay as they were.

use std::process::Command;

#[test]
fn a_filesystem_over_direct_mode_is_refused_and_the_device_is_untouched() {
    let dir = tempfile::tempdir().unwrap();
    let device = dir.path().join("vol.img");
    let content = vec![0x5Au8; 1 << 20];
    std::fs::write(&device, &content).unwrap();
    for fs in ["ext4", "xfs"] {
        let out = Command::new(env!("CARGO_BIN_EXE_sealcsi"))
            .args(["--tee", "sim", "--state-dir"])
            .arg(dir.path().join("state"))
            .args(["volume", "format"])
            .arg(&device)
            .args(["--fs", fs, "--journal", "direct"])
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "usage error expected: {stderr}");
        assert!(stderr.contains("raw block volumes only"), "{stderr}");
        assert!(
            !dir.path().join("state").exists(),
            "no sealing state was created: the options were refused first"
        );
    }
    assert_eq!(std::fs::read(&device).unwrap(), content);
}
