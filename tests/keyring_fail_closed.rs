//! Without a usable kernel keyring, sealcsi refuses to build a crypt table instead of putting the
//! volume key into it as hex. The keyring is taken away from the test's own thread with a seccomp
//! filter (add_key and keyctl fail with ENOSYS, as on a kernel without CONFIG_KEYS or under a
//! container profile that filters them). A test binary of its own: the filter stays on that thread.

use nix::libc;

/// Makes add_key(2) and keyctl(2) fail with ENOSYS on the calling thread (and only there: no TSYNC).
fn block_keyring_syscalls() {
    let insn = |code: u32, k: u32, jt: u8, jf: u8| libc::sock_filter {
        code: code as u16,
        jt,
        jf,
        k,
    };
    let filter = [
        // A = seccomp_data.nr
        insn(libc::BPF_LD | libc::BPF_W | libc::BPF_ABS, 0, 0, 0),
        insn(
            libc::BPF_JMP | libc::BPF_JEQ | libc::BPF_K,
            libc::SYS_add_key as u32,
            2,
            0,
        ),
        insn(
            libc::BPF_JMP | libc::BPF_JEQ | libc::BPF_K,
            libc::SYS_keyctl as u32,
            1,
            0,
        ),
        insn(libc::BPF_RET | libc::BPF_K, libc::SECCOMP_RET_ALLOW, 0, 0),
        insn(
            libc::BPF_RET | libc::BPF_K,
            libc::SECCOMP_RET_ERRNO | libc::ENOSYS as u32,
            0,
            0,
        ),
    ];
    let prog = libc::sock_fprog {
        len: filter.len() as u16,
        filter: filter.as_ptr() as *mut libc::sock_filter,
    };
    // SAFETY: PR_SET_NO_NEW_PRIVS takes integer arguments only.
    assert_eq!(
        unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) },
        0
    );
    // SAFETY: the kernel copies the filter program (`prog` and `filter`, alive for the call) and
    // reads no other memory.
    let r = unsafe {
        libc::prctl(
            libc::PR_SET_SECCOMP,
            libc::SECCOMP_MODE_FILTER,
            &prog as *const libc::sock_fprog,
            0,
            0,
        )
    };
    assert_eq!(
        r,
        0,
        "installing the seccomp filter: {}",
        std::io::Error::last_os_error()
    );
}

#[test]
fn no_keyring_is_an_error_and_never_a_hex_key_table() {
    // A thread of its own, so the filter is certainly confined to it.
    std::thread::spawn(|| {
        block_keyring_syscalls();
        assert!(!sealcsi::keyring::available());
        let key = sealcsi::keys::VolumeKey::generate(96).unwrap();
        let err = match sealcsi::volume::stack::table_key("0f6c1e2a-volume", &key) {
            Ok((k, _)) => panic!("a table key without a keyring: {k:?}"),
            Err(e) => e.to_string(),
        };
        assert!(err.contains("kernel keyring"), "{err}");
        assert!(
            err.contains("never puts a volume key into a device-mapper table"),
            "the error says why there is no fallback: {err}"
        );
        assert!(err.contains("add_key"), "and what to allow: {err}");
    })
    .join()
    .unwrap();
}
