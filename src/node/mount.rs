//! Mounts: the [`Mounter`] trait the node core stages and publishes through, the real implementation
//! ([`SystemMounter`], mount(2) through nix and /proc/self/mountinfo) and an in-memory one
//! ([`MemoryMounter`]) for host tests.
//!
//! Idempotency is observed, not remembered: "is something mounted at this path, and is it what we
//! want?" is answered from the kernel's mount table every time.

use std::collections::BTreeMap;
use std::fs;
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use nix::mount::{MntFlags, MsFlags};

#[derive(Debug, thiserror::Error)]
pub enum MountError {
    /// A mount option this node does not accept.
    #[error("mount option {0:?} is not supported")]
    BadOption(String),
    #[error("{op} {target}: {source}")]
    Sys {
        op: &'static str,
        target: PathBuf,
        #[source]
        source: io::Error,
    },
}

impl MountError {
    fn sys(op: &'static str, target: &Path, source: impl Into<io::Error>) -> Self {
        MountError::Sys {
            op,
            target: target.to_owned(),
            source: source.into(),
        }
    }

    /// Whether the kernel refused because something holds the mount (EBUSY).
    pub fn is_busy(&self) -> bool {
        matches!(self, MountError::Sys { source, .. } if source.raw_os_error() == Some(nix::libc::EBUSY))
    }
}

/// One line of /proc/self/mountinfo.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountInfo {
    pub mount_id: u32,
    pub parent_id: u32,
    /// st_dev of the mounted filesystem.
    pub major: u32,
    pub minor: u32,
    /// The path inside the filesystem that is mounted here (`/` unless a bind of a subtree or a file).
    pub root: String,
    pub mount_point: PathBuf,
    /// Per-mount options (`rw`/`ro`, `nosuid`, ...).
    pub options: Vec<String>,
    pub fs_type: String,
    pub source: String,
    pub super_options: Vec<String>,
}

impl MountInfo {
    /// Whether this mount is read-only.
    pub fn read_only(&self) -> bool {
        self.options.iter().any(|o| o == "ro")
    }

    /// Same filesystem (device) mounted: compares st_dev.
    pub fn same_filesystem(&self, other: &MountInfo) -> bool {
        (self.major, self.minor) == (other.major, other.minor)
    }
}

/// One mount as every path shows it: a mount made under a shared mount (`/var/lib/kubelet` bind-mounted
/// from another directory, with shared propagation) appears at each peer's path too, and those copies
/// are the same mount, not another publication. The paths of one place, in mount-table order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountPlace(pub Vec<PathBuf>);

impl MountPlace {
    /// Whether `path` is one of the paths this mount shows at.
    pub fn shows_at(&self, path: &Path) -> bool {
        self.0.iter().any(|p| p == path)
    }

    /// The first of its paths (for messages).
    pub fn path(&self) -> &Path {
        &self.0[0]
    }
}

/// Groups `mounts` by where they sit independently of propagation: the filesystem of the parent mount
/// and the path inside that filesystem (the parent's root joined with the mount point's path below
/// the parent's mount point). Propagated copies of one mount share it; binds elsewhere do not.
pub fn group_by_place(mounts: Vec<MountInfo>, table: &[MountInfo]) -> Vec<MountPlace> {
    let mut places: Vec<((u32, u32, PathBuf), MountPlace)> = Vec::new();
    for m in mounts {
        let key = match table.iter().find(|p| p.mount_id == m.parent_id) {
            Some(parent) => {
                let below = m
                    .mount_point
                    .strip_prefix(&parent.mount_point)
                    .unwrap_or(&m.mount_point);
                (
                    parent.major,
                    parent.minor,
                    Path::new(&parent.root).join(below),
                )
            }
            None => (0, 0, m.mount_point.clone()),
        };
        match places.iter_mut().find(|(k, _)| *k == key) {
            Some((_, place)) => place.0.push(m.mount_point),
            None => places.push((key, MountPlace(vec![m.mount_point]))),
        }
    }
    places.into_iter().map(|(_, place)| place).collect()
}

/// Undo mountinfo's octal escapes (`\040` for space, `\011`, `\012`, `\134`).
fn unescape(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
        {
            let v = (b[i + 1] - b'0') as u32 * 64
                + (b[i + 2] - b'0') as u32 * 8
                + (b[i + 3] - b'0') as u32;
            if let Ok(byte) = u8::try_from(v) {
                out.push(byte);
                i += 4;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Parses /proc/self/mountinfo text; malformed lines are skipped.
pub fn parse_mountinfo(text: &str) -> Vec<MountInfo> {
    text.lines().filter_map(parse_line).collect()
}

fn parse_line(line: &str) -> Option<MountInfo> {
    // id parent major:minor root mountpoint options [optional fields...] - fstype source superoptions
    let (left, right) = line.split_once(" - ")?;
    let f: Vec<&str> = left.split(' ').collect();
    if f.len() < 6 {
        return None;
    }
    let (major, minor) = f[2].split_once(':')?;
    let r: Vec<&str> = right.split(' ').collect();
    if r.len() < 3 {
        return None;
    }
    Some(MountInfo {
        mount_id: f[0].parse().ok()?,
        parent_id: f[1].parse().ok()?,
        major: major.parse().ok()?,
        minor: minor.parse().ok()?,
        root: unescape(f[3]),
        mount_point: PathBuf::from(unescape(f[4])),
        options: f[5].split(',').map(str::to_string).collect(),
        fs_type: unescape(r[0]),
        source: unescape(r[1]),
        super_options: r[2].split(',').map(str::to_string).collect(),
    })
}

/// Mount options split into flags and the filesystem-specific data string. Options apply in order, as
/// with mount(8): a later `suid`, `dev` or `exec` clears an earlier `nosuid`, `nodev` or `noexec`.
pub fn split_options(options: &[String]) -> Result<(MsFlags, String), MountError> {
    let mut flags = MsFlags::empty();
    let mut data = Vec::new();
    for opt in options
        .iter()
        .flat_map(|o| o.split(','))
        .filter(|o| !o.is_empty())
    {
        let flag = match opt {
            "ro" => Some(MsFlags::MS_RDONLY),
            "rw" => Some(MsFlags::empty()),
            "nosuid" => Some(MsFlags::MS_NOSUID),
            "nodev" => Some(MsFlags::MS_NODEV),
            "noexec" => Some(MsFlags::MS_NOEXEC),
            "suid" | "dev" | "exec" => {
                flags.remove(match opt {
                    "suid" => MsFlags::MS_NOSUID,
                    "dev" => MsFlags::MS_NODEV,
                    _ => MsFlags::MS_NOEXEC,
                });
                Some(MsFlags::empty())
            }
            "sync" => Some(MsFlags::MS_SYNCHRONOUS),
            "dirsync" => Some(MsFlags::MS_DIRSYNC),
            "noatime" => Some(MsFlags::MS_NOATIME),
            "nodiratime" => Some(MsFlags::MS_NODIRATIME),
            "relatime" => Some(MsFlags::MS_RELATIME),
            "strictatime" => Some(MsFlags::MS_STRICTATIME),
            "lazytime" => Some(MsFlags::MS_LAZYTIME),
            "defaults" => Some(MsFlags::empty()),
            // Flags that would change what the mount is, not how it behaves: not ours to take.
            "bind" | "rbind" | "remount" | "move" | "shared" | "private" | "slave"
            | "unbindable" => {
                return Err(MountError::BadOption(opt.to_string()));
            }
            _ => None,
        };
        match flag {
            Some(f) => flags |= f,
            None => {
                if opt.contains(|c: char| c.is_whitespace() || c.is_control()) {
                    return Err(MountError::BadOption(opt.to_string()));
                }
                data.push(opt);
            }
        }
    }
    Ok((flags, data.join(",")))
}

/// The options of a filesystem mount sealcsi makes: `nosuid,nodev` first, then the CO's `mount_flags`
/// (a volume's files are the tenant's, and a set-uid binary or a device node on it must not grant
/// anything on the node). An explicit `suid` or `dev` from the CO comes later and so wins.
pub fn secure_options(requested: &[String]) -> Vec<String> {
    let mut options = vec!["nosuid".to_string(), "nodev".to_string()];
    options.extend(requested.iter().cloned());
    options
}

/// The per-mount flags of a bind mount (a bind ignores flags on its first mount(2) call; they are set
/// by a `remount,bind` that replaces them all, so every one that should hold is listed here).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct BindFlags {
    pub readonly: bool,
    pub nosuid: bool,
    pub nodev: bool,
    pub noexec: bool,
}

impl BindFlags {
    /// A published filesystem: [`secure_options`] over the CO's mount flags, read-only if asked.
    pub fn filesystem(mount_flags: &[String], readonly: bool) -> Result<Self, MountError> {
        let (flags, _) = split_options(&secure_options(mount_flags))?;
        Ok(Self {
            readonly: readonly || flags.contains(MsFlags::MS_RDONLY),
            nosuid: flags.contains(MsFlags::MS_NOSUID),
            nodev: flags.contains(MsFlags::MS_NODEV),
            noexec: flags.contains(MsFlags::MS_NOEXEC),
        })
    }

    /// A published raw block device node: `nosuid`, but not `nodev`, which would make the device node
    /// itself unopenable through the bind.
    pub fn block(readonly: bool) -> Self {
        Self {
            readonly,
            nosuid: true,
            nodev: false,
            noexec: false,
        }
    }

    pub fn ms_flags(&self) -> MsFlags {
        let mut f = MsFlags::empty();
        f.set(MsFlags::MS_RDONLY, self.readonly);
        f.set(MsFlags::MS_NOSUID, self.nosuid);
        f.set(MsFlags::MS_NODEV, self.nodev);
        f.set(MsFlags::MS_NOEXEC, self.noexec);
        f
    }

    /// As mountinfo shows them (`rw`/`ro` first).
    fn option_names(&self) -> Vec<String> {
        let mut o = vec![if self.readonly { "ro" } else { "rw" }.to_string()];
        for (on, name) in [
            (self.nosuid, "nosuid"),
            (self.nodev, "nodev"),
            (self.noexec, "noexec"),
        ] {
            if on {
                o.push(name.to_string());
            }
        }
        o
    }
}

/// Per-mount option names mountinfo would show for `flags`.
fn flag_names(flags: MsFlags) -> Vec<String> {
    BindFlags {
        readonly: flags.contains(MsFlags::MS_RDONLY),
        nosuid: flags.contains(MsFlags::MS_NOSUID),
        nodev: flags.contains(MsFlags::MS_NODEV),
        noexec: flags.contains(MsFlags::MS_NOEXEC),
    }
    .option_names()
}

/// The mount operations the node core needs.
pub trait Mounter: Send + Sync {
    /// Mounts filesystem `fs_type` on `source` at `target` with `options` (flags and data).
    fn mount(
        &self,
        source: &Path,
        target: &Path,
        fs_type: &str,
        options: &[String],
    ) -> Result<(), MountError>;
    /// Bind-mounts `source` (a directory or a device node) on `target` with the per-mount `flags`
    /// (through a `remount,bind`: a bind mount ignores flags on its first call).
    fn bind(&self, source: &Path, target: &Path, flags: BindFlags) -> Result<(), MountError>;
    /// Unmounts the topmost mount at `target`.
    fn umount(&self, target: &Path) -> Result<(), MountError>;
    /// The topmost mount whose mount point is `path`, if any.
    fn mounted_at(&self, path: &Path) -> Result<Option<MountInfo>, MountError>;
    /// Whether `target` is a bind mount of the device node `device` (same device number).
    fn is_bind_of(&self, target: &Path, device: &Path) -> Result<bool, MountError>;
    /// Every place where the filesystem of `mount` is mounted (itself and its bind mounts), each with
    /// the paths propagation shows it at ([`MountPlace`]).
    fn mount_points_of(&self, mount: &MountInfo) -> Result<Vec<MountPlace>, MountError>;
    /// Every place where the device node `device` is bind-mounted.
    fn binds_of_device(&self, device: &Path) -> Result<Vec<MountPlace>, MountError>;
}

/// The real mounter: mount(2)/umount2(2) and /proc/self/mountinfo. Blocking.
#[derive(Debug, Default)]
pub struct SystemMounter;

/// Where the kernel's mount table of this process is.
pub const MOUNTINFO: &str = "/proc/self/mountinfo";

/// Whether `path` is the root of a mount in this process's mount namespace (statx's
/// `STATX_ATTR_MOUNT_ROOT`, Linux 5.8); `None` when the kernel cannot say.
pub fn is_mount_root(path: &Path) -> Option<bool> {
    use rustix::fs::{AtFlags, CWD, StatxAttributes, StatxFlags};
    let flags = AtFlags::NO_AUTOMOUNT | AtFlags::SYMLINK_NOFOLLOW;
    let stx = rustix::fs::statx(CWD, path, flags, StatxFlags::empty()).ok()?;
    stx.stx_attributes_mask
        .contains(StatxAttributes::MOUNT_ROOT)
        .then(|| stx.stx_attributes.contains(StatxAttributes::MOUNT_ROOT))
}

/// This process's mount table, read now.
fn read_mount_table() -> Result<Vec<MountInfo>, MountError> {
    let text = fs::read_to_string(MOUNTINFO)
        .map_err(|e| MountError::sys("read", Path::new(MOUNTINFO), e))?;
    Ok(parse_mountinfo(&text))
}

impl Mounter for SystemMounter {
    fn mount(
        &self,
        source: &Path,
        target: &Path,
        fs_type: &str,
        options: &[String],
    ) -> Result<(), MountError> {
        let (flags, data) = split_options(options)?;
        let data = (!data.is_empty()).then_some(data.as_str());
        nix::mount::mount(Some(source), target, Some(fs_type), flags, data)
            .map_err(|e| MountError::sys("mount", target, e))
    }

    fn bind(&self, source: &Path, target: &Path, flags: BindFlags) -> Result<(), MountError> {
        nix::mount::mount(
            Some(source),
            target,
            None::<&str>,
            MsFlags::MS_BIND,
            None::<&str>,
        )
        .map_err(|e| MountError::sys("bind mount", target, e))?;
        // Always remounted: the remount sets exactly these per-mount flags (a bind of the staging
        // mount would inherit its nosuid,nodev, but a `remount,bind,ro` without them clears them).
        let remount = MsFlags::MS_BIND | MsFlags::MS_REMOUNT | flags.ms_flags();
        if let Err(e) = nix::mount::mount(None::<&str>, target, None::<&str>, remount, None::<&str>)
        {
            // Never leave a mount with weaker flags than asked for (writable, suid, dev).
            let _ = nix::mount::umount2(target, MntFlags::empty());
            return Err(MountError::sys("remount bind with flags", target, e));
        }
        Ok(())
    }

    fn umount(&self, target: &Path) -> Result<(), MountError> {
        nix::mount::umount2(target, MntFlags::UMOUNT_NOFOLLOW)
            .map_err(|e| MountError::sys("umount", target, e))
    }

    fn mounted_at(&self, path: &Path) -> Result<Option<MountInfo>, MountError> {
        let path = match fs::canonicalize(path) {
            Ok(p) => p,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(MountError::sys("resolve", path, e)),
        };
        // A node's mount table holds every pod's mounts; reading and parsing it costs milliseconds
        // per call. statx says in one call whether anything is mounted here at all (the common case
        // of a first stage or publish); only a mount root needs the table, for what is mounted.
        if is_mount_root(&path) == Some(false) {
            return Ok(None);
        }
        // Later lines are mounted on top of earlier ones.
        Ok(read_mount_table()?
            .into_iter()
            .rev()
            .find(|m| m.mount_point == path))
    }

    fn is_bind_of(&self, target: &Path, device: &Path) -> Result<bool, MountError> {
        let (t, d) = match (fs::metadata(target), fs::metadata(device)) {
            (Ok(t), Ok(d)) => (t, d),
            _ => return Ok(false),
        };
        use std::os::unix::fs::FileTypeExt;
        Ok(t.file_type().is_block_device()
            && d.file_type().is_block_device()
            && t.rdev() == d.rdev())
    }

    fn mount_points_of(&self, mount: &MountInfo) -> Result<Vec<MountPlace>, MountError> {
        let table = read_mount_table()?;
        let mounts = table
            .iter()
            .filter(|m| m.same_filesystem(mount))
            .cloned()
            .collect();
        Ok(group_by_place(mounts, &table))
    }

    fn binds_of_device(&self, device: &Path) -> Result<Vec<MountPlace>, MountError> {
        let table = read_mount_table()?;
        let mut binds = Vec::new();
        // A device node bound elsewhere shows as a mount of devtmpfs (or whatever holds /dev): only its
        // device number tells which device it is.
        for m in &table {
            if m.root != "/" && self.is_bind_of(&m.mount_point, device)? {
                binds.push(m.clone());
            }
        }
        Ok(group_by_place(binds, &table))
    }
}

/// The in-memory mounter for host tests: a table of mount points, no kernel involved. A bind of a mount
/// point carries its device number, like the kernel's; a mount or bind of a device gets a number derived
/// from the device path.
#[derive(Debug, Default)]
pub struct MemoryMounter {
    mounts: Mutex<BTreeMap<PathBuf, Vec<MountInfo>>>,
    next_id: Mutex<u32>,
}

impl MemoryMounter {
    pub fn new() -> Self {
        Self::default()
    }

    /// Every mount point with its topmost mount.
    pub fn table(&self) -> Vec<MountInfo> {
        let mounts = self.mounts.lock().unwrap_or_else(|e| e.into_inner());
        mounts.values().filter_map(|v| v.last().cloned()).collect()
    }

    fn fake_dev(source: &Path) -> (u32, u32) {
        use sha2::Digest;
        let d = sha2::Sha256::digest(source.as_os_str().as_encoded_bytes());
        (254, u32::from_le_bytes([d[0], d[1], d[2], 0]))
    }

    fn push(&self, info: MountInfo) {
        self.mounts
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(info.mount_point.clone())
            .or_default()
            .push(info);
    }

    fn id(&self) -> u32 {
        let mut n = self.next_id.lock().unwrap_or_else(|e| e.into_inner());
        *n += 1;
        *n
    }

    fn exists(target: &Path) -> Result<(), MountError> {
        if target.exists() {
            Ok(())
        } else {
            Err(MountError::sys(
                "mount",
                target,
                io::Error::from(io::ErrorKind::NotFound),
            ))
        }
    }
}

impl Mounter for MemoryMounter {
    fn mount(
        &self,
        source: &Path,
        target: &Path,
        fs_type: &str,
        options: &[String],
    ) -> Result<(), MountError> {
        let (flags, data) = split_options(options)?;
        Self::exists(target)?;
        let (major, minor) = Self::fake_dev(source);
        self.push(MountInfo {
            mount_id: self.id(),
            parent_id: 1,
            major,
            minor,
            root: "/".into(),
            mount_point: target.to_owned(),
            options: flag_names(flags),
            fs_type: fs_type.to_string(),
            source: source.display().to_string(),
            super_options: data
                .split(',')
                .filter(|s| !s.is_empty())
                .map(str::to_string)
                .collect(),
        });
        Ok(())
    }

    fn bind(&self, source: &Path, target: &Path, flags: BindFlags) -> Result<(), MountError> {
        Self::exists(target)?;
        let base = self.mounted_at(source)?;
        let (major, minor, fs_type, src) = match &base {
            Some(b) => (b.major, b.minor, b.fs_type.clone(), b.source.clone()),
            None => {
                let (a, b) = Self::fake_dev(source);
                (a, b, "devtmpfs".to_string(), source.display().to_string())
            }
        };
        self.push(MountInfo {
            mount_id: self.id(),
            parent_id: 1,
            major,
            minor,
            root: if base.is_some() {
                "/".into()
            } else {
                source.display().to_string()
            },
            mount_point: target.to_owned(),
            options: flags.option_names(),
            fs_type,
            source: src,
            super_options: Vec::new(),
        });
        Ok(())
    }

    fn umount(&self, target: &Path) -> Result<(), MountError> {
        let mut mounts = self.mounts.lock().unwrap_or_else(|e| e.into_inner());
        let Some(stack) = mounts.get_mut(target) else {
            return Err(MountError::sys(
                "umount",
                target,
                io::Error::from_raw_os_error(nix::libc::EINVAL),
            ));
        };
        stack.pop();
        if stack.is_empty() {
            mounts.remove(target);
        }
        Ok(())
    }

    fn mounted_at(&self, path: &Path) -> Result<Option<MountInfo>, MountError> {
        let mounts = self.mounts.lock().unwrap_or_else(|e| e.into_inner());
        Ok(mounts.get(path).and_then(|v| v.last().cloned()))
    }

    fn is_bind_of(&self, target: &Path, device: &Path) -> Result<bool, MountError> {
        Ok(self
            .mounted_at(target)?
            .is_some_and(|m| m.source == device.display().to_string() && m.root != "/"))
    }

    fn mount_points_of(&self, mount: &MountInfo) -> Result<Vec<MountPlace>, MountError> {
        // No propagation in memory: every mount is its own place.
        Ok(self
            .table()
            .into_iter()
            .filter(|m| m.same_filesystem(mount))
            .map(|m| MountPlace(vec![m.mount_point]))
            .collect())
    }

    fn binds_of_device(&self, device: &Path) -> Result<Vec<MountPlace>, MountError> {
        let device = device.display().to_string();
        Ok(self
            .table()
            .into_iter()
            .filter(|m| m.source == device && m.root != "/")
            .map(|m| MountPlace(vec![m.mount_point]))
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: &str = "\
22 1 0:21 / / rw,relatime shared:1 - overlay overlay rw,lowerdir=/a
36 22 253:3 / /var/lib/kubelet/staging\\040dir rw,nosuid - ext4 /dev/mapper/sealcsi-sv-1 rw,errors=remount-ro
37 22 253:3 / /pods/x ro,relatime shared:5 master:2 - ext4 /dev/mapper/sealcsi-sv-1 rw
38 22 0:5 /mapper/sealcsi-sv-2 /pods/blk rw - devtmpfs udev rw,size=1024k
bad line
";

    /// What the e2e node showed: /var/lib/kubelet is a bind of /scratch/kubelet and / is rshared, so the
    /// staging mount and the pod's bind of it each also appear under /scratch/kubelet (propagation).
    const PROPAGATED: &str = "\
22 1 0:21 / / rw shared:1 - overlay overlay rw
30 22 98:0 / /scratch rw shared:7 - ext4 /dev/ubda rw
31 22 98:0 /kubelet /var/lib/kubelet rw shared:7 - ext4 /dev/ubda rw
40 31 253:3 / /var/lib/kubelet/plugins/g/globalmount rw shared:9 - ext4 /dev/mapper/sealcsi-sv-1 rw
41 30 253:3 / /scratch/kubelet/plugins/g/globalmount rw shared:9 - ext4 /dev/mapper/sealcsi-sv-1 rw
42 31 253:3 / /var/lib/kubelet/pods/p/mount rw shared:9 - ext4 /dev/mapper/sealcsi-sv-1 rw
43 30 253:3 / /scratch/kubelet/pods/p/mount rw shared:9 - ext4 /dev/mapper/sealcsi-sv-1 rw
";

    #[test]
    fn propagated_copies_are_one_place_and_binds_elsewhere_are_not() {
        let table = parse_mountinfo(PROPAGATED);
        let staged = table[3].clone();
        let mounts: Vec<MountInfo> = table
            .iter()
            .filter(|m| m.same_filesystem(&staged))
            .cloned()
            .collect();
        let places = group_by_place(mounts, &table);
        assert_eq!(places.len(), 2, "{places:?}");
        assert!(places[0].shows_at(Path::new("/var/lib/kubelet/plugins/g/globalmount")));
        assert!(places[0].shows_at(Path::new("/scratch/kubelet/plugins/g/globalmount")));
        assert!(places[1].shows_at(Path::new("/var/lib/kubelet/pods/p/mount")));
        assert!(places[1].shows_at(Path::new("/scratch/kubelet/pods/p/mount")));
        assert_eq!(places[1].path(), Path::new("/var/lib/kubelet/pods/p/mount"));
        // Without the pod's bind, the staging mount is alone: nothing else publishes it.
        let only_staging: Vec<MountInfo> = table[3..5].to_vec();
        assert_eq!(group_by_place(only_staging, &table).len(), 1);
    }

    #[test]
    fn parses_mountinfo() {
        let m = parse_mountinfo(SAMPLE);
        assert_eq!(m.len(), 4);
        assert_eq!(
            m[1].mount_point,
            PathBuf::from("/var/lib/kubelet/staging dir")
        );
        assert_eq!((m[1].major, m[1].minor), (253, 3));
        assert_eq!(m[1].fs_type, "ext4");
        assert_eq!(m[1].source, "/dev/mapper/sealcsi-sv-1");
        assert!(!m[1].read_only());
        assert!(m[2].read_only());
        assert!(m[1].same_filesystem(&m[2]));
        assert_eq!(m[2].fs_type, "ext4", "optional fields skipped");
        assert_eq!(m[3].root, "/mapper/sealcsi-sv-2");
    }

    #[test]
    fn splits_options() {
        let (f, d) = split_options(&[
            "ro,noatime".into(),
            "discard".into(),
            "errors=remount-ro".into(),
        ])
        .unwrap();
        assert!(f.contains(MsFlags::MS_RDONLY | MsFlags::MS_NOATIME));
        assert_eq!(d, "discard,errors=remount-ro");
        assert!(split_options(&["bind".into()]).is_err());
        assert!(split_options(&["a b".into()]).is_err());
    }

    #[test]
    fn filesystem_mounts_are_nosuid_nodev_unless_the_co_asks_otherwise() {
        let opts = |v: &[&str]| -> Vec<String> { v.iter().map(|s| s.to_string()).collect() };
        // Stage: no flags from the CO.
        let (f, d) = split_options(&secure_options(&[])).unwrap();
        assert_eq!(f, MsFlags::MS_NOSUID | MsFlags::MS_NODEV);
        assert_eq!(d, "");
        // The CO's flags are kept, and nosuid,nodev added.
        let (f, d) = split_options(&secure_options(&opts(&["noatime", "discard"]))).unwrap();
        assert_eq!(
            f,
            MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOATIME
        );
        assert_eq!(
            d, "discard",
            "suid/dev never reach the filesystem's data string"
        );
        // An explicit suid or dev wins, each on its own.
        let (f, _) = split_options(&secure_options(&opts(&["suid"]))).unwrap();
        assert_eq!(f, MsFlags::MS_NODEV);
        let (f, _) = split_options(&secure_options(&opts(&["dev"]))).unwrap();
        assert_eq!(f, MsFlags::MS_NOSUID);
        let (f, d) = split_options(&secure_options(&opts(&["suid,dev"]))).unwrap();
        assert_eq!((f, d.as_str()), (MsFlags::empty(), ""));
        // In order, as mount(8): a later nosuid after suid is nosuid again.
        let (f, _) = split_options(&opts(&["suid", "nosuid"])).unwrap();
        assert_eq!(f, MsFlags::MS_NOSUID);
        // Publish binds of a filesystem carry the same flags, plus read-only and noexec if asked.
        let b = BindFlags::filesystem(&opts(&["noexec"]), true).unwrap();
        assert_eq!(
            b.ms_flags(),
            MsFlags::MS_RDONLY | MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC
        );
        let b = BindFlags::filesystem(&opts(&["dev", "ro"]), false).unwrap();
        assert_eq!(b.ms_flags(), MsFlags::MS_RDONLY | MsFlags::MS_NOSUID);
        // A raw block device node must stay openable: nosuid only.
        assert_eq!(BindFlags::block(false).ms_flags(), MsFlags::MS_NOSUID);
        assert_eq!(
            BindFlags::block(true).ms_flags(),
            MsFlags::MS_NOSUID | MsFlags::MS_RDONLY
        );
    }

    #[test]
    fn memory_mounter_tracks_binds() {
        let d = tempfile::tempdir().unwrap();
        let (stage, target) = (d.path().join("s"), d.path().join("t"));
        fs::create_dir_all(&stage).unwrap();
        fs::create_dir_all(&target).unwrap();
        let m = MemoryMounter::new();
        m.mount(Path::new("/dev/mapper/x"), &stage, "ext4", &[])
            .unwrap();
        m.bind(&stage, &target, BindFlags::filesystem(&[], true).unwrap())
            .unwrap();
        let (s, t) = (
            m.mounted_at(&stage).unwrap().unwrap(),
            m.mounted_at(&target).unwrap().unwrap(),
        );
        assert!(s.same_filesystem(&t));
        assert!(t.read_only() && !s.read_only());
        m.umount(&target).unwrap();
        assert!(m.mounted_at(&target).unwrap().is_none());
        assert!(m.umount(&target).is_err());
        let f = d.path().join("blk");
        fs::write(&f, b"").unwrap();
        m.bind(Path::new("/dev/mapper/x"), &f, BindFlags::block(false))
            .unwrap();
        assert!(m.is_bind_of(&f, Path::new("/dev/mapper/x")).unwrap());
        assert!(!m.is_bind_of(&f, Path::new("/dev/mapper/y")).unwrap());
    }

    #[test]
    fn system_mounter_reads_this_process_table() {
        // Whatever this host has mounted at /, the parser must find it.
        if Path::new(MOUNTINFO).exists() {
            assert!(SystemMounter.mounted_at(Path::new("/")).unwrap().is_some());
            assert!(
                SystemMounter
                    .mounted_at(Path::new("/nonexistent-sealcsi"))
                    .unwrap()
                    .is_none()
            );
        }
    }

    #[test]
    fn statx_tells_mount_roots_from_plain_directories() {
        // /proc is a mount of its own on every Linux host this runs on; a fresh directory is not.
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(is_mount_root(Path::new("/proc")), Some(true));
        assert_eq!(is_mount_root(dir.path()), Some(false));
        let proc_mount = SystemMounter.mounted_at(Path::new("/proc")).unwrap();
        assert_eq!(proc_mount.map(|m| m.fs_type), Some("proc".to_string()));
        assert!(SystemMounter.mounted_at(dir.path()).unwrap().is_none());
    }
}
