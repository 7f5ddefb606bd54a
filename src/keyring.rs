//! The kernel keyring, through the `add_key(2)` and `keyctl(2)` system calls (no keyutils).
//!
//! sealcsi hands dm-crypt its volume key as a `logon` key: the table then carries only
//! `:<len>:logon:<description>`, dm-crypt looks the key up (request_key) at table load and copies it
//! into the mapping, and the key is invalidated right after ([`LogonKey`]'s Drop). `logon` keys
//! cannot be read back from user space.
//!
//! Kernel trap (threads): the process keyring is shared by the threads of a process only if it
//! exists when they are created. A thread that creates it later (the first `add_key` into
//! `KEY_SPEC_PROCESS_KEYRING`) installs it in its own credentials alone, and a table load on
//! another, older thread then fails with ENOKEY. Call [`ensure_process_keyring`] at start-up,
//! before any thread (tokio runtime, thread pool) is spawned; [`available`] does it too.
#![deny(clippy::undocumented_unsafe_blocks)]

use std::ffi::CString;
use std::fmt;

use nix::errno::Errno;
use nix::libc;
use tracing::{debug, warn};

use crate::dm::table::check_logon_description;

/// `KEY_SPEC_PROCESS_KEYRING` from <linux/keyctl.h>.
const KEY_SPEC_PROCESS_KEYRING: i32 = -2;
/// `KEYCTL_GET_KEYRING_ID`.
const KEYCTL_GET_KEYRING_ID: libc::c_long = 0;
/// `KEYCTL_UNLINK`.
const KEYCTL_UNLINK: libc::c_long = 9;
/// `KEYCTL_INVALIDATE`.
const KEYCTL_INVALIDATE: libc::c_long = 21;
/// Largest `logon` payload the kernel takes (user_preparse: 32767).
pub const MAX_LOGON_PAYLOAD: usize = 32767;

/// Errors of keyring operations. Never contain the payload.
#[derive(Debug, thiserror::Error)]
pub enum KeyringError {
    /// The description is not `prefix:name` in printable ASCII without spaces.
    #[error("invalid logon key description: {0}")]
    InvalidDescription(String),
    /// Empty or oversized payload.
    #[error("invalid logon key payload size {0} (1..=32767 bytes)")]
    InvalidPayload(usize),
    /// The kernel has no keyring support (CONFIG_KEYS off) or the call is filtered (seccomp).
    #[error("kernel keyring unavailable: {0}")]
    Unavailable(#[source] std::io::Error),
    /// A keyring system call failed.
    #[error("keyring {op} failed: {source}")]
    Syscall {
        op: &'static str,
        #[source]
        source: std::io::Error,
    },
}

fn keyctl(op: libc::c_long, a2: libc::c_long, a3: libc::c_long) -> Result<libc::c_long, Errno> {
    // SAFETY: keyctl with these operations (GET_KEYRING_ID, UNLINK, INVALIDATE) takes only integer
    // arguments (key serials, a create flag); no memory is passed to or written by the kernel.
    let r = unsafe {
        libc::syscall(
            libc::SYS_keyctl,
            op,
            a2,
            a3,
            0 as libc::c_long,
            0 as libc::c_long,
        )
    };
    Errno::result(r)
}

/// Make sure this process has a process keyring, so that threads spawned from now on share it.
pub fn ensure_process_keyring() -> Result<i32, KeyringError> {
    match keyctl(
        KEYCTL_GET_KEYRING_ID,
        libc::c_long::from(KEY_SPEC_PROCESS_KEYRING),
        1,
    ) {
        Ok(id) => Ok(id as i32),
        Err(e @ (Errno::ENOSYS | Errno::EPERM | Errno::EACCES)) => {
            Err(KeyringError::Unavailable(e.into()))
        }
        Err(e) => Err(KeyringError::Syscall {
            op: "get process keyring",
            source: e.into(),
        }),
    }
}

/// The calling thread's process keyring, if it has one (without creating it).
pub fn process_keyring_id() -> Option<i32> {
    keyctl(
        KEYCTL_GET_KEYRING_ID,
        libc::c_long::from(KEY_SPEC_PROCESS_KEYRING),
        0,
    )
    .ok()
    .map(|id| id as i32)
}

/// Whether the kernel keyring is usable: makes (or finds) the process keyring, then adds and
/// invalidates a probe `logon` key in it.
pub fn available() -> bool {
    if ensure_process_keyring().is_err() {
        return false;
    }
    let desc = format!("sealcsi:probe-{}", std::process::id());
    match LogonKey::add(&desc, &[0u8]) {
        Ok(k) => {
            drop(k);
            true
        }
        Err(e) => {
            debug!(error = %e, "kernel keyring probe failed");
            false
        }
    }
}

/// Fails unless the kernel keyring is usable ([`available`]), with a message that says what to fix.
/// sealcsi loads volume keys only through the keyring, so without one no volume can be opened.
pub fn require() -> Result<(), KeyringError> {
    if available() {
        return Ok(());
    }
    Err(KeyringError::Unavailable(std::io::Error::other(
        "cannot add a logon key to the process keyring; sealcsi never puts a volume key into a \
         device-mapper table, so it cannot open volumes here: enable CONFIG_KEYS in the kernel and \
         allow the add_key and keyctl system calls (seccomp profile of the container)",
    )))
}

/// A `logon` key in the process keyring. Dropping it invalidates the key (the kernel then
/// garbage-collects it; a mapping that already loaded it keeps its own copy).
pub struct LogonKey {
    serial: i32,
}

impl fmt::Debug for LogonKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LogonKey")
            .field("serial", &self.serial)
            .finish_non_exhaustive()
    }
}

impl LogonKey {
    /// Add (or update: same type and description replace the payload) a `logon` key to the process
    /// keyring. `description` must be `prefix:name` (the logon type requires the prefix).
    pub fn add(description: &str, payload: &[u8]) -> Result<LogonKey, KeyringError> {
        check_logon_description(description).map_err(|_| {
            KeyringError::InvalidDescription(format!(
                "{} bytes, need `prefix:name`",
                description.len()
            ))
        })?;
        if payload.is_empty() || payload.len() > MAX_LOGON_PAYLOAD {
            return Err(KeyringError::InvalidPayload(payload.len()));
        }
        let ty = c"logon";
        let desc = CString::new(description)
            .map_err(|_| KeyringError::InvalidDescription("contains NUL".into()))?;
        // SAFETY: add_key(type, description, payload, plen, keyring): `ty` and `desc` are
        // NUL-terminated strings that outlive the call; `payload` points to `payload.len()`
        // readable bytes, which the kernel only reads (copies) during the call.
        let r = unsafe {
            libc::syscall(
                libc::SYS_add_key,
                ty.as_ptr(),
                desc.as_ptr(),
                payload.as_ptr() as *const libc::c_void,
                payload.len(),
                libc::c_long::from(KEY_SPEC_PROCESS_KEYRING),
            )
        };
        match Errno::result(r) {
            Ok(serial) => Ok(LogonKey {
                serial: serial as i32,
            }),
            Err(e @ (Errno::ENOSYS | Errno::EPERM | Errno::EACCES)) => {
                Err(KeyringError::Unavailable(e.into()))
            }
            Err(e) => Err(KeyringError::Syscall {
                op: "add_key",
                source: e.into(),
            }),
        }
    }

    /// The key's serial number.
    pub fn serial(&self) -> i32 {
        self.serial
    }
}

impl Drop for LogonKey {
    fn drop(&mut self) {
        let serial = libc::c_long::from(self.serial);
        if keyctl(KEYCTL_INVALIDATE, serial, 0).is_ok() {
            return;
        }
        if let Err(e) = keyctl(
            KEYCTL_UNLINK,
            serial,
            libc::c_long::from(KEY_SPEC_PROCESS_KEYRING),
        ) {
            warn!(key.serial = self.serial, error = %e, "could not invalidate or unlink logon key");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refuses_bad_descriptions_and_payloads() {
        for d in ["", "nocolon", ":x", "a b:c", "a:\n"] {
            assert!(
                matches!(
                    LogonKey::add(d, b"k"),
                    Err(KeyringError::InvalidDescription(_))
                ),
                "{d:?}"
            );
        }
        assert!(matches!(
            LogonKey::add("sealcsi:t", b""),
            Err(KeyringError::InvalidPayload(0))
        ));
        let big = vec![0u8; MAX_LOGON_PAYLOAD + 1];
        assert!(matches!(
            LogonKey::add("sealcsi:t", &big),
            Err(KeyringError::InvalidPayload(_))
        ));
    }

    #[test]
    fn add_and_drop_when_available() {
        // The host may filter keyctl (containers); where it works, the key must exist until drop.
        if !available() {
            return;
        }
        let k = LogonKey::add("sealcsi:unit-test", &[7u8; 96]).unwrap();
        assert!(k.serial() > 0);
        assert!(format!("{k:?}").contains("serial"));
        let keys = std::fs::read_to_string("/proc/keys").unwrap_or_default();
        let hex = format!("{:08x}", k.serial());
        if !keys.is_empty() {
            assert!(
                keys.lines().any(|l| l.starts_with(&hex)),
                "key not in /proc/keys"
            );
        }
        drop(k);
        let keys = std::fs::read_to_string("/proc/keys").unwrap_or_default();
        // An invalidated key may linger until gc, flagged 'i' (invalidated) or 'D' (dead).
        for l in keys.lines().filter(|l| l.starts_with(&hex)) {
            let flags = l.split_whitespace().nth(1).unwrap_or("");
            assert!(
                flags.contains('i') || flags.contains('D'),
                "key still live: {l}"
            );
        }
    }
}
