//! Helpers shared by the guest suites that drive the real `sealcsi` binary: running a command and
//! asserting on its exit code, output and JSON. Each suite uses a subset.
#![allow(dead_code)]

use std::path::Path;
use std::process::{Command, Stdio};

use serde_json::Value;

pub const BIN: &str = env!("CARGO_BIN_EXE_sealcsi");
pub const MIB: u64 = 1 << 20;

/// The result of one command.
pub struct Out {
    pub what: String,
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

impl std::fmt::Display for Out {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "`{}` exited {}\n--- stdout:\n{}\n--- stderr:\n{}",
            self.what, self.code, self.stdout, self.stderr
        )
    }
}

impl Out {
    #[track_caller]
    pub fn ok(self) -> Self {
        assert_eq!(self.code, 0, "command failed: {self}");
        self
    }

    #[track_caller]
    pub fn exit(self, code: i32) -> Self {
        assert_eq!(self.code, code, "expected exit code {code}: {self}");
        self
    }

    #[track_caller]
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.stdout)
            .unwrap_or_else(|e| panic!("stdout is not JSON ({e}): {self}"))
    }

    /// stderr without the simulated-TEE warning, lower-cased.
    pub fn error_text(&self) -> String {
        self.stderr
            .lines()
            .filter(|l| !l.contains("WARNING"))
            .collect::<Vec<_>>()
            .join("\n")
            .to_lowercase()
    }

    #[track_caller]
    pub fn error_mentions(&self, needle: &str) {
        assert!(
            self.error_text().contains(&needle.to_lowercase()),
            "the error message does not mention {needle:?}: {self}"
        );
    }
}

/// Runs `cmd` (stdin closed) and captures everything; `what` names it in failure messages.
pub fn run(mut cmd: Command, what: String) -> Out {
    let output = cmd
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("running {what}: {e}"));
    Out {
        what,
        code: output.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
    }
}

/// Runs a system tool.
pub fn sh(prog: &str, args: &[&str]) -> Out {
    let mut cmd = Command::new(prog);
    cmd.args(args);
    run(cmd, format!("{prog} {}", args.join(" ")))
}

/// A scratch path as a command-line argument.
pub fn p(path: &Path) -> &str {
    path.to_str().expect("scratch paths are UTF-8")
}

/// The `*_workqueue` options of the live crypt table `dm_name` (`dmsetup table`: the key is not shown).
pub fn workqueue_flags(dm_name: &str) -> Vec<String> {
    sh("dmsetup", &["table", dm_name])
        .ok()
        .stdout
        .split_whitespace()
        .filter(|w| w.ends_with("_workqueue"))
        .map(str::to_owned)
        .collect()
}
