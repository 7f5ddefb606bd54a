//! `/dev/kmsg`: the parser of its records (bytes from the kernel, and from any root writer) and the real
//! [`KernelLog`] over it.
//!
//! A record, as `read(2)` on `/dev/kmsg` returns it (one record per read, Documentation/ABI/testing/
//! dev-kmsg): `<prio>,<seq>,<timestamp µs>,<flags>[,<more fields>];<message>\n`, then optional
//! continuation lines ` KEY=value\n`. `prio` is `facility << 3 | level`; the kernel's own messages
//! have facility 0, and the kernel gives every record written from user space a non-zero facility
//! (`LOG_USER` unless the writer names another), so user space cannot forge a kernel record.

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::fd::AsFd;
use std::os::unix::fs::OpenOptionsExt;
use std::time::Duration;

use super::{KernelLog, LogError, LogReader, Next};

/// The device.
pub const KMSG: &str = "/dev/kmsg";
/// The facility of the kernel's own records.
pub const KERNEL_FACILITY: u32 = 0;
/// `<13>`: facility user (1), level notice (5): how sealcsi's announcements are written.
const ANNOUNCE_PRIO: u32 = 13;
/// Highest minor number the kernel gives (MINORBITS = 20).
const MAX_MINOR: u32 = (1 << 20) - 1;
/// A record is at most 8 KiB in 6.1 (CONSOLE_EXT_LOG_MAX); a read into a smaller buffer fails.
const READ_BUFFER: usize = 16 * 1024;

/// One parsed record: its prefix, and its message up to the first newline (continuation lines are
/// not part of it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Record<'a> {
    pub facility: u32,
    pub level: u8,
    pub seq: u64,
    pub timestamp_us: u64,
    pub message: &'a [u8],
}

/// Why bytes are not a kmsg record.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RecordError {
    /// No `;` ends the prefix.
    #[error("kmsg record without a ';' after its prefix")]
    NoPrefix,
    /// A prefix field is missing or not a decimal number that fits.
    #[error("kmsg record field {0} is missing or not a number")]
    BadField(&'static str),
}

fn number<T: std::str::FromStr>(
    field: Option<&[u8]>,
    what: &'static str,
) -> Result<T, RecordError> {
    let field = field.ok_or(RecordError::BadField(what))?;
    if field.is_empty() || !field.iter().all(u8::is_ascii_digit) {
        return Err(RecordError::BadField(what));
    }
    // ASCII digits are UTF-8; an overflow is an error of the parse.
    std::str::from_utf8(field)
        .ok()
        .and_then(|s| s.parse().ok())
        .ok_or(RecordError::BadField(what))
}

/// Parses one record. Fields after the timestamp (flags, caller id) are not needed and not checked.
pub fn parse_record(bytes: &[u8]) -> Result<Record<'_>, RecordError> {
    let semi = bytes
        .iter()
        .position(|&b| b == b';')
        .ok_or(RecordError::NoPrefix)?;
    let mut fields = bytes[..semi].split(|&b| b == b',');
    let prio: u32 = number(fields.next(), "priority")?;
    let seq = number(fields.next(), "sequence")?;
    let timestamp_us = number(fields.next(), "timestamp")?;
    let rest = &bytes[semi + 1..];
    let end = rest.iter().position(|&b| b == b'\n').unwrap_or(rest.len());
    Ok(Record {
        facility: prio >> 3,
        level: (prio & 7) as u8,
        seq,
        timestamp_us,
        message: &rest[..end],
    })
}

/// What a record means to the failure count.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event<'a> {
    /// dm-crypt refused a block whose authentication tag did not match (`INTEGRITY AEAD ERROR`), or
    /// dm-integrity refused one whose checksum did not (`Checksum failed`), on device `dm-<minor>`.
    Failure { minor: u32 },
    /// sealcsi opened `dm-<minor>` as device-mapper device `name` ([`announcement`]).
    Opened { minor: u32, name: &'a str },
}

/// `dm-<minor>` at the start of `s`: the minor and what follows.
fn dm_minor(s: &[u8]) -> Option<(u32, &[u8])> {
    let digits = s.strip_prefix(b"dm-")?;
    let n = digits.iter().take_while(|b| b.is_ascii_digit()).count();
    if n == 0 || n > 7 {
        return None;
    }
    let minor: u32 = std::str::from_utf8(&digits[..n]).ok()?.parse().ok()?;
    (minor <= MAX_MINOR).then_some((minor, &digits[n..]))
}

/// The failure lines (`DMERR_LIMIT`, prefixed `device-mapper: <target>: `): dm-crypt
/// `"%pg: INTEGRITY AEAD ERROR, sector %llu"` and dm-integrity `"%pg: Checksum failed at sector
/// 0x%llx"`. `%pg` names the device the failed bio was mapped to: for dm-crypt the device *below* it
/// (in sealcsi's AEAD stack the dm-integrity device; seen on 6.1), for dm-integrity its own device.
/// Seen on Linux 6.1.176: `trusted_key: device-mapper: crypt: dm-0: INTEGRITY AEAD ERROR, sector 40`
/// (dm-crypt.c includes a header that sets `pr_fmt` to `trusted_key: `; later kernels drop it).
const FAILURES: [(&[u8], &[u8]); 2] = [
    (b"device-mapper: crypt: ", b": INTEGRITY AEAD ERROR"),
    (b"device-mapper: integrity: ", b": Checksum failed"),
];

/// A `pr_fmt` prefix some kernels put in front of dm-crypt's messages (see [`FAILURES`]).
const STRAY_PREFIX: &[u8] = b"trusted_key: ";

/// The prefix of sealcsi's announcements (facility user).
const ANNOUNCE_PREFIX: &[u8] = b"sealcsi: ";
const OPENED_AS: &[u8] = b" opened as ";

/// What `record` says about integrity failures, if anything. Failures count only from the kernel's
/// own records (facility 0), announcements only from user space (any other facility).
pub fn event<'a>(record: &Record<'a>) -> Option<Event<'a>> {
    let msg = record.message;
    if record.facility == KERNEL_FACILITY {
        let msg = msg.strip_prefix(STRAY_PREFIX).unwrap_or(msg);
        return FAILURES.iter().find_map(|(prefix, after)| {
            let (minor, rest) = dm_minor(msg.strip_prefix(*prefix)?)?;
            rest.starts_with(after).then_some(Event::Failure { minor })
        });
    }
    let (minor, rest) = dm_minor(msg.strip_prefix(ANNOUNCE_PREFIX)?)?;
    let name = std::str::from_utf8(rest.strip_prefix(OPENED_AS)?).ok()?;
    crate::dm::DmName::try_from(name).ok()?;
    Some(Event::Opened { minor, name })
}

/// The message announcing that sealcsi opened `dm-<minor>` as `name` (see [`event`]).
pub fn announcement(minor: u32, name: &crate::dm::DmName) -> String {
    format!("sealcsi: dm-{minor} opened as {name}")
}

/// The kernel log on this machine, `/dev/kmsg`. Reading needs CAP_SYSLOG where
/// `kernel.dmesg_restrict` is set; writing needs write permission on the device.
#[derive(Debug, Default, Clone, Copy)]
pub struct Kmsg;

impl KernelLog for Kmsg {
    fn reader(&self) -> Result<Box<dyn LogReader>, LogError> {
        // A new reader starts at the oldest record the ring still holds.
        let file = OpenOptions::new()
            .read(true)
            .custom_flags(nix::libc::O_NONBLOCK)
            .open(KMSG)
            .map_err(LogError::io("open"))?;
        Ok(Box::new(KmsgReader {
            file,
            buf: vec![0; READ_BUFFER],
        }))
    }

    fn announce(&self, message: &str) -> Result<(), LogError> {
        // A file per message: the kernel rate-limits writers per open file (printk.devkmsg).
        let mut file = OpenOptions::new()
            .write(true)
            .open(KMSG)
            .map_err(LogError::io("open for writing"))?;
        file.write_all(format!("<{ANNOUNCE_PRIO}>{message}\n").as_bytes())
            .map_err(LogError::io("write"))
    }
}

struct KmsgReader {
    file: File,
    buf: Vec<u8>,
}

impl LogReader for KmsgReader {
    fn next(&mut self) -> Result<Next, LogError> {
        match self.file.read(&mut self.buf) {
            Ok(n) => Ok(Next::Record(self.buf[..n].to_vec())),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(Next::Empty),
            // The ring overwrote records this reader had not read; it continues at the oldest left.
            Err(e) if e.raw_os_error() == Some(nix::libc::EPIPE) => Ok(Next::Lost),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => Ok(Next::Empty),
            Err(e) => Err(LogError::io("read")(e)),
        }
    }

    fn wait(&mut self, timeout: Duration) -> Result<(), LogError> {
        use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
        let mut fds = [PollFd::new(self.file.as_fd(), PollFlags::POLLIN)];
        let ms = u16::try_from(timeout.as_millis()).unwrap_or(u16::MAX);
        match poll(&mut fds, PollTimeout::from(ms)) {
            Ok(_) | Err(nix::errno::Errno::EINTR) => Ok(()),
            Err(e) => Err(LogError::io("poll")(io::Error::from(e))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn parses_records_of_linux_6_1() {
        let r = parse_record(
            b"3,1234,98765432,-,caller=T12;device-mapper: crypt: dm-3: INTEGRITY AEAD ERROR, sector 40\n SUBSYSTEM=block\n",
        )
        .unwrap();
        assert_eq!(
            (r.facility, r.level, r.seq, r.timestamp_us),
            (0, 3, 1234, 98765432)
        );
        assert_eq!(
            r.message,
            b"device-mapper: crypt: dm-3: INTEGRITY AEAD ERROR, sector 40"
        );
        assert_eq!(event(&r), Some(Event::Failure { minor: 3 }));
        let r = parse_record(
            b"3,7,1,-;device-mapper: integrity: dm-12: Checksum failed at sector 0x8\n",
        )
        .unwrap();
        assert_eq!(event(&r), Some(Event::Failure { minor: 12 }));
        // Exactly as Linux 6.1.176 wrote it in a guest run (tests/guest_health.rs).
        let r = parse_record(
            b"3,1207,16402119,-;trusted_key: device-mapper: crypt: dm-0: INTEGRITY AEAD ERROR, sector 40\n",
        )
        .unwrap();
        assert_eq!(event(&r), Some(Event::Failure { minor: 0 }));
        // No newline at all is still a record.
        assert!(parse_record(b"6,1,2,c;x").is_ok());
    }

    #[test]
    fn refuses_malformed_prefixes() {
        for bad in [
            &b""[..],
            b"no prefix",
            b";msg",
            b"3;msg",
            b"3,1;msg",
            b"3,,1,-;msg",
            b"x,1,1,-;msg",
            b"3,-1,1,-;msg",
            b"3,1, 1,-;msg",
            b"99999999999,1,1,-;msg",
            b"3,99999999999999999999,1,-;msg",
        ] {
            assert!(
                parse_record(bad).is_err(),
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
    }

    #[test]
    fn failures_count_only_from_the_kernel_and_announcements_only_from_user_space() {
        let msg = b"device-mapper: crypt: dm-3: INTEGRITY AEAD ERROR, sector 40";
        let rec = |facility: u32, message: &'static [u8]| Record {
            facility,
            level: 3,
            seq: 1,
            timestamp_us: 1,
            message,
        };
        assert_eq!(
            event(&rec(1, msg)),
            None,
            "a user-space writer forged a failure"
        );
        let name = crate::dm::DmName::try_from("sealcsi-sv-1").unwrap();
        let ann = announcement(7, &name);
        let ann: &'static [u8] = Box::leak(ann.into_bytes().into_boxed_slice());
        assert_eq!(
            event(&rec(1, ann)),
            Some(Event::Opened {
                minor: 7,
                name: "sealcsi-sv-1"
            })
        );
        assert_eq!(event(&rec(0, ann)), None);
        for other in [
            &b"device-mapper: crypt: dm-: INTEGRITY AEAD ERROR"[..],
            b"device-mapper: crypt: dm-3 INTEGRITY AEAD ERROR",
            b"device-mapper: crypt: dm-99999999: INTEGRITY AEAD ERROR",
            b"device-mapper: crypt: dm-3: some other error",
            b"device-mapper: verity: dm-3: INTEGRITY AEAD ERROR",
            b"crypt: dm-3: INTEGRITY AEAD ERROR",
            b"other: device-mapper: crypt: dm-3: INTEGRITY AEAD ERROR",
            b"trusted_key: trusted_key: device-mapper: crypt: dm-3: INTEGRITY AEAD ERROR",
        ] {
            assert_eq!(
                event(&rec(0, other)),
                None,
                "{}",
                String::from_utf8_lossy(other)
            );
        }
        for bad in [
            &b"sealcsi: dm-3 opened as "[..],
            b"sealcsi: dm-3 opened as a/b",
            b"sealcsi: dm-x opened as a",
            b"sealcsi: dm-3 opened  as a",
        ] {
            assert_eq!(
                event(&rec(1, bad)),
                None,
                "{}",
                String::from_utf8_lossy(bad)
            );
        }
    }

    proptest! {
        /// Any bytes: no panic, and whatever parses keeps its message inside the input.
        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
            if let Ok(r) = parse_record(&bytes) {
                prop_assert!(r.message.len() < bytes.len());
                prop_assert!(!r.message.contains(&b'\n'));
                let _ = event(&r);
            }
        }

        /// Well-formed records round-trip their fields, and a failure line names its minor.
        #[test]
        fn well_formed_records_round_trip(
            prio in 0u32..(1 << 16),
            seq in any::<u64>(),
            ts in any::<u64>(),
            minor in 0u32..=MAX_MINOR,
            sector in any::<u64>(),
            tail in "[ -~]{0,40}",
        ) {
            let text = format!(
                "{prio},{seq},{ts},-;device-mapper: crypt: dm-{minor}: INTEGRITY AEAD ERROR, sector {sector}\n{tail}"
            );
            let r = parse_record(text.as_bytes()).unwrap();
            prop_assert_eq!((r.facility, u32::from(r.level), r.seq, r.timestamp_us), (prio >> 3, prio & 7, seq, ts));
            let want = (prio >> 3 == 0).then_some(Event::Failure { minor });
            prop_assert_eq!(event(&r), want);
        }
    }
}
