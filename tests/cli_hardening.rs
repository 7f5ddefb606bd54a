//! The real binary hardens itself first thing: a `sealcsi` process, started with an unlimited core
//! limit, runs with RLIMIT_CORE 0 (read from /proc/<pid>/limits while it is blocked writing its
//! `--version` line into a pipe the test filled beforehand).

use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use nix::libc;

#[test]
fn the_sealcsi_binary_runs_with_no_core_limit() {
    // A full pipe as stdout: the child's first write blocks, so it is still alive to be looked at.
    let (mut reader, mut writer) = std::io::pipe().unwrap();
    // SAFETY: fcntl on a pipe fd we own, integer argument only.
    let size = unsafe { libc::fcntl(writer.as_raw_fd(), libc::F_SETPIPE_SZ, 4096) };
    assert!(
        size > 0,
        "F_SETPIPE_SZ: {}",
        std::io::Error::last_os_error()
    );
    writer.write_all(&vec![b'.'; size as usize]).unwrap();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_sealcsi"));
    cmd.arg("--version").stdout(writer).stderr(Stdio::null());
    // SAFETY: pre_exec runs in the forked child before exec; setrlimit is async-signal-safe and only
    // reads the struct on the child's stack.
    unsafe {
        cmd.pre_exec(|| {
            // Whatever this test process inherited: the child starts able to dump, so that 0 in its
            // limits can only come from sealcsi itself.
            let unlimited = libc::rlimit {
                rlim_cur: libc::RLIM_INFINITY,
                rlim_max: libc::RLIM_INFINITY,
            };
            if libc::setrlimit(libc::RLIMIT_CORE, &unlimited) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut child = cmd
        .spawn()
        .expect("starting sealcsi (as root: raising RLIMIT_CORE)");
    // The Command holds the pipe's write end too: close it, or the drain below never sees EOF.
    drop(cmd);
    let limits = format!("/proc/{}/limits", child.id());
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut last = String::new();
    let hardened = loop {
        let text = std::fs::read_to_string(&limits).unwrap_or_default();
        if let Some(line) = text.lines().find(|l| l.starts_with("Max core file size")) {
            last = line.to_string();
            let f: Vec<&str> = line.split_whitespace().collect();
            // "Max core file size  <soft> <hard> bytes"
            if f.len() >= 6 && f[4] == "0" && f[5] == "0" {
                break true;
            }
        }
        if Instant::now() > deadline {
            break false;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    // Unblock and reap the child: drain the pipe until it exits.
    let mut out = Vec::new();
    reader.read_to_end(&mut out).unwrap();
    let status = child.wait().unwrap();
    assert!(status.success(), "sealcsi --version: {status}");
    assert!(String::from_utf8_lossy(&out).contains("sealcsi"));
    assert!(hardened, "sealcsi's core limit is not 0: {last}");
}
