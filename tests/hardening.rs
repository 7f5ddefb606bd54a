//! `harden_process` in a test binary of its own: it changes process-wide state (dumpable flag, core
//! limit) that the other tests must not inherit.

use nix::libc;

fn core_limit() -> (libc::rlim_t, libc::rlim_t) {
    let mut l = libc::rlimit {
        rlim_cur: 1,
        rlim_max: 1,
    };
    // SAFETY: getrlimit writes one rlimit into the struct we own, valid for the call.
    assert_eq!(unsafe { libc::getrlimit(libc::RLIMIT_CORE, &mut l) }, 0);
    (l.rlim_cur, l.rlim_max)
}

fn dumpable() -> libc::c_int {
    // SAFETY: PR_GET_DUMPABLE takes no pointer arguments and returns the flag.
    unsafe { libc::prctl(libc::PR_GET_DUMPABLE, 0, 0, 0, 0) }
}

#[test]
fn the_process_is_not_dumpable_and_writes_no_core_after_hardening() {
    // A test process starts dumpable (1): the assertion after hardening means something.
    assert_eq!(
        dumpable(),
        1,
        "precondition: the test process starts dumpable"
    );
    assert!(!sealcsi::hardening::is_hardened());
    sealcsi::hardening::harden_process().unwrap();
    assert_eq!(dumpable(), 0, "PR_GET_DUMPABLE after hardening");
    assert_eq!(
        core_limit(),
        (0, 0),
        "RLIMIT_CORE soft and hard after hardening"
    );
    assert!(sealcsi::hardening::is_hardened());
    // Idempotent (main may be entered again through a re-exec; lowering 0 to 0 is allowed).
    sealcsi::hardening::harden_process().unwrap();
    // Key material made afterwards is still usable and kept out of dumps.
    let key = sealcsi::keys::VolumeKey::generate(96).unwrap();
    assert_eq!(key.len(), 96);
}
