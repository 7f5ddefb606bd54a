//! Running the filesystem tools (mkfs, fsck, grow) on an open volume.
//!
//! Every tool runs with stdin from /dev/null and its stderr captured into the error. Tools are
//! found by PATH under their real names (`mkfs.ext4`, never a busybox applet).
//!
//! The options here are part of the fast-initialization recipe of [`super::init`]: on an AEAD
//! integrity volume every block that was never written fails to read, so the tools must read
//! nothing the recipe did not pre-write and they did not write themselves. Two things matter
//! beyond the option lists:
//!
//! * **No page-cache read-ahead while a tool runs.** e2fsprogs reads the device buffered; the
//!   kernel's read-ahead then reads up to `read_ahead_kb` past every sequential run of metadata
//!   (measured: e2fsck reading the directory blocks it must check also read the never-written
//!   free blocks after them; mke2fs and dumpe2fs read the never-written block bitmap of an
//!   uninitialized group next to initialized ones). [`ReadaheadGuard`] sets the device's
//!   read-ahead to 0 for the duration of the tool and restores it after. The mounted filesystem
//!   keeps the default: in the guest tests the kernel (mount, writes, ext4lazyinit, umount)
//!   never read a never-written block with read-ahead on.
//! * **The journal / log is zeroed by mkfs, at a fixed size.** Recovery after a crash (jbd2,
//!   XFS log recovery) scans the log up to the first block that is not a valid next record, so
//!   a log that was never written in full would be read there (reasoned from how recovery
//!   works; no crash is simulated in the tests). mkfs writes the whole log, so its size is
//!   capped at 64 MiB to keep the initialization time independent of the volume size.

use std::ffi::OsString;
use std::fs;
use std::io;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};

use tracing::{debug, warn};

use crate::header::FsKind;

/// Block size of every filesystem sealcsi makes: the integrity/crypt sector size.
pub const BLOCK_SIZE: u64 = 4096;
/// Blocks per ext4 block group at 4 KiB blocks (mke2fs's default, passed explicitly because
/// the pre-write plan depends on it).
pub const EXT4_BLOCKS_PER_GROUP: u64 = 32768;
/// Journal / log size used once the tool's default would be at least this large.
pub const LOG_MIB: u64 = 64;
/// Below this size mke2fs's default journal is at most [`LOG_MIB`]; from here on it is pinned.
const EXT4_PIN_JOURNAL_FROM: u64 = 4 << 30;
/// mkfs.xfs's default log is 64 MiB from 1 GiB up to ~128 GiB and grows beyond; pinned from here.
const XFS_PIN_LOG_FROM: u64 = 1 << 30;

/// Errors from running filesystem tools.
#[derive(Debug, thiserror::Error)]
pub enum FsError {
    /// The operation needs a filesystem but the volume has none (raw block volume).
    #[error("volume has no filesystem ({0})")]
    NoFilesystem(&'static str),
    /// The tool could not be started (not installed, not in PATH, ...).
    #[error("cannot run {tool}: {source}")]
    Spawn {
        tool: &'static str,
        #[source]
        source: io::Error,
    },
    /// The tool ran and failed.
    #[error("{tool} failed ({status}): {stderr}")]
    ToolFailed {
        tool: &'static str,
        status: ExitStatus,
        stderr: String,
    },
    /// The consistency check ran and found problems (or could not finish).
    #[error("{tool} reports the filesystem is not clean ({status}): {output}")]
    Unclean {
        tool: &'static str,
        status: ExitStatus,
        output: String,
    },
    /// The device's size or read-ahead setting could not be read or changed.
    #[error("{what} of {device}: {source}")]
    Device {
        what: &'static str,
        device: PathBuf,
        #[source]
        source: io::Error,
    },
    /// A dry run printed something this build cannot parse.
    #[error("cannot parse the output of {tool}: {reason}")]
    Parse { tool: &'static str, reason: String },
}

struct Output {
    status: ExitStatus,
    stdout: String,
    stderr: String,
}

fn run(tool: &'static str, args: &[OsString]) -> Result<Output, FsError> {
    debug!(tool, ?args, "running");
    let out = Command::new(tool)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .output()
        .map_err(|source| FsError::Spawn { tool, source })?;
    Ok(Output {
        status: out.status,
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
    })
}

fn run_ok(tool: &'static str, args: &[OsString]) -> Result<Output, FsError> {
    let out = run(tool, args)?;
    if !out.status.success() {
        return Err(FsError::ToolFailed {
            tool,
            status: out.status,
            stderr: out.stderr,
        });
    }
    Ok(out)
}

fn os(args: &[String], device: &Path) -> Vec<OsString> {
    let mut v: Vec<OsString> = args.iter().map(OsString::from).collect();
    v.push(device.as_os_str().to_owned());
    v
}

/// The mkfs program for `fs`.
pub fn mkfs_tool(fs: FsKind) -> Result<&'static str, FsError> {
    match fs {
        FsKind::Ext4 => Ok("mkfs.ext4"),
        FsKind::Xfs => Ok("mkfs.xfs"),
        FsKind::None => Err(FsError::NoFilesystem("mkfs")),
    }
}

/// The mkfs options (without the device) for a volume of `size_bytes`.
///
/// `fast`: the volume was not wiped, only pre-written by [`super::init`]'s plan; the options
/// are then the ones that plan was computed for. Both modes use the same geometry options so
/// a volume looks the same whichever way it was initialized; `fast` only changes whether
/// mke2fs zeroes the inode tables itself.
pub fn mkfs_args(fs: FsKind, size_bytes: u64, fast: bool) -> Result<Vec<String>, FsError> {
    match fs {
        FsKind::Ext4 => {
            let mut extended = vec![
                // Discard does not make never-written blocks readable, and a device claiming
                // "discard zeroes data" would make mke2fs skip zeroing the journal.
                "nodiscard",
                // The journal must be written in full (see the module docs); its size is fixed.
                "lazy_journal_init=0",
            ];
            // Fast: leave inode tables to the kernel's ext4lazyinit thread, which zeroes them
            // with writes after mount (zeroing them here costs time proportional to the size).
            // The kernel and e2fsck never read inodes past a group's itable_unused mark.
            extended.push(if fast {
                "lazy_itable_init=1"
            } else {
                "lazy_itable_init=0"
            });
            let mut args = vec![
                "-F".to_owned(),
                "-q".to_owned(),
                "-b".to_owned(),
                BLOCK_SIZE.to_string(),
                "-g".to_owned(),
                EXT4_BLOCKS_PER_GROUP.to_string(),
                // sparse_super (backups in groups 1 and powers of 3, 5, 7) is what the plan
                // assumes; sparse_super2 would move them.
                "-O".to_owned(),
                "sparse_super,^sparse_super2".to_owned(),
                "-E".to_owned(),
                extended.join(","),
            ];
            if size_bytes >= EXT4_PIN_JOURNAL_FROM {
                args.push("-J".to_owned());
                args.push(format!("size={LOG_MIB}"));
            }
            Ok(args)
        }
        FsKind::Xfs => {
            let mut args = vec![
                "-f".to_owned(),
                "-q".to_owned(),
                // No discard: it does not make blocks readable (and is refused by dm-crypt
                // without allow_discards anyway).
                "-K".to_owned(),
                "-b".to_owned(),
                format!("size={BLOCK_SIZE}"),
            ];
            if size_bytes >= XFS_PIN_LOG_FROM {
                args.push("-l".to_owned());
                args.push(format!("size={LOG_MIB}m"));
            }
            Ok(args)
        }
        FsKind::None => Err(FsError::NoFilesystem("mkfs")),
    }
}

/// Creates the filesystem on `device` (read-ahead off while mkfs runs).
pub fn mkfs(fs: FsKind, device: &Path, fast: bool) -> Result<(), FsError> {
    let tool = mkfs_tool(fs)?;
    let size = device_size(device)?;
    let args = mkfs_args(fs, size, fast)?;
    let _ra = ReadaheadGuard::off(device)?;
    run_ok(tool, &os(&args, device))?;
    Ok(())
}

/// What mkfs would make on `device`, without writing anything (`mke2fs -n` / `mkfs.xfs -N`
/// with the options [`mkfs`] uses).
pub fn dry_run(fs: FsKind, device: &Path, size_bytes: u64, fast: bool) -> Result<String, FsError> {
    let tool = mkfs_tool(fs)?;
    let mut args = mkfs_args(fs, size_bytes, fast)?;
    args.retain(|a| a != "-q");
    args.insert(0, if fs == FsKind::Ext4 { "-n" } else { "-N" }.to_owned());
    let _ra = ReadaheadGuard::off(device)?;
    Ok(run_ok(tool, &os(&args, device))?.stdout)
}

/// `e2fsck -fn` / `xfs_repair -n`: Ok only when the filesystem is clean. Never modifies it.
pub fn fsck_check(fs: FsKind, device: &Path) -> Result<(), FsError> {
    let (tool, args): (&'static str, &[&str]) = match fs {
        FsKind::Ext4 => ("e2fsck", &["-f", "-n"]),
        FsKind::Xfs => ("xfs_repair", &["-n"]),
        FsKind::None => return Err(FsError::NoFilesystem("fsck")),
    };
    let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
    let _ra = ReadaheadGuard::off(device)?;
    let out = run(tool, &os(&args, device))?;
    if out.status.success() {
        return Ok(());
    }
    // e2fsck: 4 = errors left uncorrected (all errors, with -n); 8 and up = it could not check.
    // xfs_repair -n: 1 = corruption found (also some fatal errors, which it prints).
    let unclean = match fs {
        FsKind::Ext4 => out.status.code().is_some_and(|c| c & 4 != 0 && c < 8),
        _ => out.status.code() == Some(1),
    };
    if !unclean {
        return Err(FsError::ToolFailed {
            tool,
            status: out.status,
            stderr: out.stderr,
        });
    }
    let mut output = out.stdout.trim().to_owned();
    if !out.stderr.is_empty() {
        output.push('\n');
        output.push_str(&out.stderr);
    }
    Err(FsError::Unclean {
        tool,
        status: out.status,
        output,
    })
}

/// Grows the mounted filesystem to fill its (already grown) device, and returns only once the
/// growth is durable.
///
/// ext4: `resize2fs <device>` (online). XFS: `xfs_growfs <mount_point>` (XFS grows only mounted),
/// then its secondary superblocks are rewritten from the primary ([`super::xfs`]: the kernel's
/// growfs writes them after its commit, and a retry that finds the size reached would otherwise
/// never write them). Both end with a cache flush of the device: NodeExpandVolume acknowledges a
/// growth that a power cut right after cannot take back. Note for AEAD volumes: the added space
/// must have been initialized first (the engine's `init_new_space`).
pub fn grow(fs: FsKind, device: &Path, mount_point: &Path) -> Result<(), FsError> {
    match fs {
        FsKind::Ext4 => {
            let _ra = ReadaheadGuard::off(device)?;
            run_ok("resize2fs", &[device.as_os_str().to_owned()])?;
        }
        FsKind::Xfs => {
            run_ok("xfs_growfs", &[mount_point.as_os_str().to_owned()])?;
            super::xfs::rewrite_secondary_superblocks(mount_point).map_err(|source| {
                FsError::Device {
                    what: "rewriting the XFS secondary superblocks",
                    device: mount_point.to_owned(),
                    source,
                }
            })?;
        }
        FsKind::None => return Err(FsError::NoFilesystem("grow")),
    }
    flush_device(device)
}

/// fsync of the block device: the kernel sends a cache flush down the whole stack.
fn flush_device(device: &Path) -> Result<(), FsError> {
    let err = |source| FsError::Device {
        what: "flushing",
        device: device.to_owned(),
        source,
    };
    fs::File::open(device).map_err(err)?.sync_all().map_err(err)
}

fn device_size(device: &Path) -> Result<u64, FsError> {
    crate::devio::size_of(device).map_err(|source| FsError::Device {
        what: "size",
        device: device.to_owned(),
        source,
    })
}

/// The sysfs read-ahead knob of a block device, `None` for anything else (a regular file in
/// host tests, a mount point).
fn readahead_knob(device: &Path) -> Result<Option<PathBuf>, FsError> {
    let meta = match fs::metadata(device) {
        Ok(m) => m,
        Err(source) => {
            return Err(FsError::Device {
                what: "stat",
                device: device.to_owned(),
                source,
            });
        }
    };
    if !meta.file_type().is_block_device() {
        return Ok(None);
    }
    let rdev = meta.rdev();
    let knob = PathBuf::from(format!(
        "/sys/dev/block/{}:{}/queue/read_ahead_kb",
        nix::sys::stat::major(rdev),
        nix::sys::stat::minor(rdev)
    ));
    Ok(Some(knob))
}

/// Sets a block device's read-ahead to 0 and restores the previous value when dropped.
///
/// A no-op for paths that are not block devices. If the process dies in between, the device
/// is left with read-ahead 0: slower sequential reads, nothing worse.
pub struct ReadaheadGuard {
    knob: Option<(PathBuf, String)>,
}

impl ReadaheadGuard {
    /// Turns read-ahead off on `device` (if it is a block device).
    pub fn off(device: &Path) -> Result<Self, FsError> {
        let Some(knob) = readahead_knob(device)? else {
            return Ok(Self { knob: None });
        };
        let err = |what, source| FsError::Device {
            what,
            device: device.to_owned(),
            source,
        };
        let old = fs::read_to_string(&knob).map_err(|e| err("read_ahead_kb", e))?;
        let old = old.trim().to_owned();
        if old != "0" {
            fs::write(&knob, "0").map_err(|e| err("setting read_ahead_kb", e))?;
        }
        Ok(Self {
            knob: Some((knob, old)),
        })
    }
}

impl Drop for ReadaheadGuard {
    fn drop(&mut self) {
        if let Some((knob, old)) = self.knob.take()
            && old != "0"
            && let Err(e) = fs::write(&knob, &old)
        {
            warn!(knob = %knob.display(), error = %e, "cannot restore read_ahead_kb");
        }
    }
}

/// Backup superblock blocks that `mke2fs -n` reports ("Superblock backups stored on blocks:").
pub fn parse_ext4_backups(dry_run: &str) -> Result<Vec<u64>, FsError> {
    let parse_err = |reason: String| FsError::Parse {
        tool: "mke2fs -n",
        reason,
    };
    let Some(pos) = dry_run.find("Superblock backups stored on blocks:") else {
        // A filesystem of a single group has no backups and mke2fs prints no such line.
        if dry_run.contains("Creating filesystem with") {
            return Ok(Vec::new());
        }
        return Err(parse_err("no filesystem summary".into()));
    };
    let rest = &dry_run[pos + "Superblock backups stored on blocks:".len()..];
    let mut blocks = Vec::new();
    for line in rest.lines() {
        let line = line.trim();
        if line.is_empty() {
            if blocks.is_empty() {
                continue;
            }
            break;
        }
        if !line.chars().next().is_some_and(|c| c.is_ascii_digit()) {
            break;
        }
        for word in line.split(',') {
            let word = word.trim();
            if word.is_empty() {
                continue;
            }
            blocks.push(
                word.parse()
                    .map_err(|_| parse_err(format!("bad block number '{word}'")))?,
            );
        }
    }
    Ok(blocks)
}

/// Allocation-group geometry from `mkfs.xfs -N`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct XfsGeometry {
    pub ag_count: u64,
    /// AG size in filesystem blocks.
    pub ag_blocks: u64,
    pub block_size: u64,
}

/// Parses `agcount=N, agsize=M blks` and `bsize=B` of the data section of `mkfs.xfs -N`.
pub fn parse_xfs_geometry(dry_run: &str) -> Result<XfsGeometry, FsError> {
    let parse_err = |reason: &str| FsError::Parse {
        tool: "mkfs.xfs -N",
        reason: reason.to_owned(),
    };
    let field = |text: &str, key: &str| -> Option<u64> {
        let start = text.find(key)? + key.len();
        let digits: String = text[start..]
            .chars()
            .take_while(|c| c.is_ascii_digit())
            .collect();
        digits.parse().ok()
    };
    let ag_count = field(dry_run, "agcount=").ok_or_else(|| parse_err("no agcount"))?;
    let ag_blocks = field(dry_run, "agsize=").ok_or_else(|| parse_err("no agsize"))?;
    let data = dry_run
        .lines()
        .find(|l| l.starts_with("data"))
        .ok_or_else(|| parse_err("no data line"))?;
    let block_size = field(data, "bsize=").ok_or_else(|| parse_err("no data bsize"))?;
    if ag_count == 0 || ag_blocks == 0 || block_size == 0 {
        return Err(parse_err("zero geometry"));
    }
    Ok(XfsGeometry {
        ag_count,
        ag_blocks,
        block_size,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    // Captured from `mke2fs -n` 1.47.0 with mkfs_args(Ext4, 16914444288, true) on a file of
    // the size of a 16 GiB AEAD volume (stdout only; the version line goes to stderr).
    const MKE2FS_16G: &str = "Creating filesystem with 4129503 4k blocks and 1034288 inodes
Filesystem UUID: 804631a8-3af2-4c45-8b7e-aa8ac54fa1c6
Superblock backups stored on blocks: 
\t32768, 98304, 163840, 229376, 294912, 819200, 884736, 1605632, 2654208, 
\t4096000

";

    // Captured from `mkfs.xfs -N` 6.1.0 with mkfs_args(Xfs, 16914444288, true) -s size=4096.
    const MKFS_XFS_16G: &str =
        "meta-data=f16.img                isize=512    agcount=4, agsize=1032376 blks
         =                       sectsz=4096  attr=2, projid32bit=1
         =                       crc=1        finobt=1, sparse=1, rmapbt=0
         =                       reflink=1    bigtime=1 inobtcount=1 nrext64=0
data     =                       bsize=4096   blocks=4129503, imaxpct=25
         =                       sunit=0      swidth=0 blks
naming   =version 2              bsize=4096   ascii-ci=0, ftype=1
log      =internal log           bsize=4096   blocks=16384, version=2
         =                       sectsz=4096  sunit=1 blks, lazy-count=1
realtime =none                   extsz=4096   blocks=0, rtextents=0
";

    #[test]
    fn parses_mke2fs_backups() {
        let b = parse_ext4_backups(MKE2FS_16G).unwrap();
        assert_eq!(
            b,
            vec![
                32768, 98304, 163840, 229376, 294912, 819200, 884736, 1605632, 2654208, 4096000
            ]
        );
        let single = "Creating filesystem with 5120 4k blocks and 5120 inodes\n";
        assert_eq!(parse_ext4_backups(single).unwrap(), Vec::<u64>::new());
        assert!(parse_ext4_backups("garbage").is_err());
        assert!(parse_ext4_backups("Superblock backups stored on blocks: \n\t32768, x\n").is_err());
    }

    #[test]
    fn parses_xfs_geometry() {
        let g = parse_xfs_geometry(MKFS_XFS_16G).unwrap();
        assert_eq!(
            g,
            XfsGeometry {
                ag_count: 4,
                ag_blocks: 1032376,
                block_size: 4096
            }
        );
        assert!(parse_xfs_geometry("nothing").is_err());
    }

    #[test]
    fn ext4_options_pin_what_the_plan_assumes() {
        let fast = mkfs_args(FsKind::Ext4, 16 << 30, true).unwrap().join(" ");
        assert!(fast.contains("-b 4096"));
        assert!(fast.contains("-g 32768"));
        assert!(fast.contains("lazy_itable_init=1"));
        assert!(fast.contains("lazy_journal_init=0"));
        assert!(fast.contains("nodiscard"));
        assert!(fast.contains("-J size=64"));
        let small = mkfs_args(FsKind::Ext4, 1 << 30, true).unwrap();
        assert!(!small.contains(&"-J".to_owned()));
        let full = mkfs_args(FsKind::Ext4, 1 << 30, false).unwrap().join(" ");
        assert!(full.contains("lazy_itable_init=0"));
    }

    #[test]
    fn xfs_options() {
        let a = mkfs_args(FsKind::Xfs, 16 << 30, true).unwrap().join(" ");
        assert!(a.contains("-K"));
        assert!(a.contains("-l size=64m"));
        assert!(mkfs_args(FsKind::None, 1 << 30, true).is_err());
    }

    #[test]
    fn readahead_guard_is_a_noop_on_files() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("f");
        std::fs::write(&f, b"x").unwrap();
        let g = ReadaheadGuard::off(&f).unwrap();
        assert!(g.knob.is_none());
        assert!(ReadaheadGuard::off(&dir.path().join("absent")).is_err());
    }

    #[test]
    fn missing_tool_is_a_spawn_error() {
        let e = run("sealcsi-no-such-tool", &[]).err().unwrap();
        assert!(matches!(e, FsError::Spawn { .. }), "{e}");
    }
}
