//! Guest tests of volume health on a real node: (1) data blocks the host changes under an open AEAD
//! volume are counted from the kernel log and make NodeGetVolumeStats report the volume abnormal (and
//! the `sealcsi_integrity_failures` metric count them); (2) a running systemd-udevd leaves sealcsi's
//! devices alone (the DM udev flags: no blkid probe, no AEAD errors from it).
//!
//! Root, loop devices and device-mapper (and udev's binaries from the host) are needed, so they are
//! ignored in a plain `cargo test`:
//!
//! ```text
//! cargo test --test guest_health --no-run      # prints the test binary's path
//! tests/vm/run-in-guest.sh --timeout 1800 -- <binary> --ignored --test-threads=1 --nocapture
//! ```

use std::fs::{self, File, OpenOptions};
use std::io::Read;
use std::os::unix::fs::{FileExt, FileTypeExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use sealcsi::csi::proto::volume_capability::{
    AccessMode, AccessType, BlockVolume, MountVolume, access_mode::Mode,
};
use sealcsi::csi::proto::*;
use sealcsi::csi::{Mode as PluginMode, PluginConfig, PluginDeps};
use sealcsi::dm::{DeviceMapper, DmName, KernelDm};
use sealcsi::health::kmsg;
use sealcsi::sealing::SimSource;

#[path = "common/plugin.rs"]
mod plugin;
use plugin::{Served, serve};

const MIB: i64 = 1 << 20;
const KIB4: usize = 4096;
/// The volume file's header region; dm-integrity starts after it.
const DATA_OFFSET: u64 = 1 << 20;
const AEAD_ERROR: &str = "INTEGRITY AEAD ERROR";

fn scratch(test: &str) -> PathBuf {
    let dir = PathBuf::from(std::env::var_os("SCRATCH").unwrap_or_else(|| "/scratch".into()))
        .join("guest_health")
        .join(test);
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(&dir).unwrap();
    dir
}

fn block_cap() -> VolumeCapability {
    VolumeCapability {
        access_mode: Some(AccessMode {
            mode: Mode::SingleNodeWriter as i32,
        }),
        access_type: Some(AccessType::Block(BlockVolume {})),
    }
}

fn mount_cap() -> VolumeCapability {
    VolumeCapability {
        access_mode: Some(AccessMode {
            mode: Mode::SingleNodeWriter as i32,
        }),
        access_type: Some(AccessType::Mount(MountVolume {
            fs_type: "ext4".into(),
            mount_flags: vec![],
            volume_mount_group: String::new(),
        })),
    }
}

/// The plugin served in this process on the real kernel, with its metrics on `metrics`.
struct Plugin {
    dir: PathBuf,
    state: PathBuf,
    metrics: std::net::SocketAddr,
    served: Served,
    /// Whether dropping this cleans up mounts and devices (not when the plugin is only restarted).
    cleanup: bool,
}

impl Plugin {
    async fn start(dir: &Path) -> Plugin {
        let sim = dir.join("sim");
        fs::create_dir_all(&sim).unwrap();
        let deps = PluginDeps::kernel(Box::new(SimSource::open(&sim, "health").unwrap())).unwrap();
        let state = dir.join("state");
        let mut config = PluginConfig::new(
            plugin::endpoint(&dir.join("csi.sock")),
            "guest-node",
            PluginMode::All,
            &state,
        );
        let free = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let metrics = free.local_addr().unwrap();
        drop(free);
        config.metrics_address = Some(metrics);
        Plugin {
            dir: dir.to_path_buf(),
            state,
            metrics,
            served: serve(config, deps).await,
            cleanup: true,
        }
    }

    /// Stops this plugin and starts a new one on the same state, leaving the volumes staged.
    async fn restart(mut self) -> Plugin {
        self.served.stop().await.unwrap();
        self.cleanup = false;
        let dir = self.dir.clone();
        drop(self);
        Plugin::start(&dir).await
    }

    async fn create(&self, name: &str, bytes: i64, cap: VolumeCapability) -> String {
        self.served
            .controller()
            .create_volume(CreateVolumeRequest {
                name: name.into(),
                capacity_range: Some(CapacityRange {
                    required_bytes: bytes,
                    limit_bytes: 0,
                }),
                volume_capabilities: vec![cap],
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner()
            .volume
            .unwrap()
            .volume_id
    }

    async fn stage(&self, id: &str, staging: &Path, cap: VolumeCapability) {
        self.served
            .node()
            .node_stage_volume(NodeStageVolumeRequest {
                volume_id: id.into(),
                staging_target_path: staging.display().to_string(),
                volume_capability: Some(cap),
                ..Default::default()
            })
            .await
            .unwrap();
    }

    async fn publish(&self, id: &str, staging: &Path, target: &Path, cap: VolumeCapability) {
        self.served
            .node()
            .node_publish_volume(NodePublishVolumeRequest {
                volume_id: id.into(),
                staging_target_path: staging.display().to_string(),
                target_path: target.display().to_string(),
                volume_capability: Some(cap),
                ..Default::default()
            })
            .await
            .unwrap();
    }

    async fn teardown(&self, id: &str, staging: &Path, target: Option<&Path>) {
        let mut node = self.served.node();
        if let Some(target) = target {
            node.node_unpublish_volume(NodeUnpublishVolumeRequest {
                volume_id: id.into(),
                target_path: target.display().to_string(),
            })
            .await
            .unwrap();
        }
        node.node_unstage_volume(NodeUnstageVolumeRequest {
            volume_id: id.into(),
            staging_target_path: staging.display().to_string(),
        })
        .await
        .unwrap();
        self.served
            .controller()
            .delete_volume(DeleteVolumeRequest {
                volume_id: id.into(),
                secrets: Default::default(),
            })
            .await
            .unwrap();
    }

    async fn condition(&self, id: &str, path: &Path) -> VolumeCondition {
        self.served
            .node()
            .node_get_volume_stats(NodeGetVolumeStatsRequest {
                volume_id: id.into(),
                volume_path: path.display().to_string(),
                staging_target_path: String::new(),
            })
            .await
            .unwrap()
            .into_inner()
            .volume_condition
            .unwrap()
    }

    async fn metrics_text(&self) -> String {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut s = tokio::net::TcpStream::connect(self.metrics).await.unwrap();
        s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .await
            .unwrap();
        let mut body = String::new();
        s.read_to_string(&mut body).await.unwrap();
        body
    }

    fn backing(&self, id: &str) -> PathBuf {
        self.state.join("volumes").join(format!("{id}.img"))
    }

    async fn stop(mut self) {
        self.served.stop().await.unwrap();
    }
}

impl Drop for Plugin {
    /// Whatever a failed test left: unmount everything under the test's directory, close our devices.
    fn drop(&mut self) {
        if !self.cleanup {
            return;
        }
        if let Ok(text) = fs::read_to_string("/proc/self/mountinfo") {
            let mut points: Vec<PathBuf> = sealcsi::node::mount::parse_mountinfo(&text)
                .into_iter()
                .map(|m| m.mount_point)
                .filter(|p| p.starts_with(&self.dir))
                .collect();
            points.reverse();
            for p in points {
                let _ = nix::mount::umount2(&p, nix::mount::MntFlags::MNT_DETACH);
            }
        }
        if let Ok(dm) = KernelDm::new()
            && let Ok(list) = dm.list()
        {
            for d in list {
                let name = d.name.as_str();
                if name.starts_with("sealcsi-sv-") && !name.ends_with("-integrity") {
                    let _ = sealcsi::volume::close(&dm, name);
                }
            }
        }
    }
}

/// A 4 KiB-aligned buffer for O_DIRECT.
struct Aligned {
    buf: Vec<u8>,
    off: usize,
}

impl Aligned {
    fn new() -> Self {
        let buf = vec![0u8; 2 * KIB4];
        let off = buf.as_ptr().align_offset(KIB4);
        Aligned { buf, off }
    }
    fn get(&mut self) -> &mut [u8] {
        &mut self.buf[self.off..self.off + KIB4]
    }
}

fn open_direct(path: &Path, write: bool) -> File {
    OpenOptions::new()
        .read(true)
        .write(write)
        .custom_flags(nix::libc::O_DIRECT)
        .open(path)
        .unwrap_or_else(|e| panic!("open {} with O_DIRECT: {e}", path.display()))
}

fn read_block_at(f: &File, offset: u64) -> std::io::Result<Vec<u8>> {
    let mut buf = Aligned::new();
    f.read_exact_at(buf.get(), offset)?;
    Ok(buf.get().to_vec())
}

fn write_block_at(f: &File, offset: u64, data: &[u8]) {
    let mut buf = Aligned::new();
    buf.get().copy_from_slice(data);
    f.write_all_at(buf.get(), offset).unwrap();
    f.sync_all().unwrap();
}

fn pattern(block: u64) -> Vec<u8> {
    (0..KIB4)
        .map(|i| (block as usize * 31 + i) as u8 ^ 0x5a)
        .collect()
}

/// Backing-file byte offset of logical block `block`'s data, from the dm-integrity superblock at
/// DATA_OFFSET (first interleave area only; dm-integrity.c's arithmetic, as tests/guest_volume.rs).
fn data_offset(backing: &Path, block: u64) -> u64 {
    let sb = read_block_at(&open_direct(backing, false), DATA_OFFSET).unwrap();
    assert_eq!(
        &sb[..8],
        b"integrt\0",
        "no dm-integrity superblock at 1 MiB"
    );
    let log2_interleave = u32::from(sb[9]);
    let tag_size = u64::from(u16::from_le_bytes([sb[10], sb[11]]));
    let journal_sections = u64::from(u32::from_le_bytes(sb[12..16].try_into().unwrap()));
    let log2_spb = u32::from(sb[28]);
    assert_eq!(
        (tag_size, log2_spb),
        (48, 3),
        "not the AEAD profile's 48-byte tags on 4 KiB blocks"
    );
    let spb = 1u64 << log2_spb;
    let entry = (8 + 8 * spb + tag_size).div_ceil(8) * 8;
    let section_sectors = (504 / entry) * 8 * spb + 8;
    let initial_sectors = 8 + section_sectors * journal_sections;
    let metadata_run = (tag_size << (log2_interleave - log2_spb)).div_ceil(4096) * 8;
    assert!((block + 1) * spb <= 1 << log2_interleave);
    DATA_OFFSET + (initial_sectors + metadata_run + block * spb) * 512
}

/// The kernel log's messages now (a reader from the oldest retained record; never blocks).
fn kernel_log() -> Vec<(u32, String)> {
    let mut f = OpenOptions::new()
        .read(true)
        .custom_flags(nix::libc::O_NONBLOCK)
        .open(kmsg::KMSG)
        .unwrap();
    let mut out = Vec::new();
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        match f.read(&mut buf) {
            Ok(n) => {
                if let Ok(r) = kmsg::parse_record(&buf[..n]) {
                    out.push((r.facility, String::from_utf8_lossy(r.message).into_owned()));
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return out,
            Err(e) if e.raw_os_error() == Some(nix::libc::EPIPE) => {}
            Err(e) => panic!("reading {}: {e}", kmsg::KMSG),
        }
    }
}

fn minor_of(name: &str) -> u32 {
    let dm = KernelDm::new().unwrap();
    dm.info(&DmName::try_from(name).unwrap())
        .unwrap()
        .unwrap()
        .minor
}

#[tokio::test]
#[ignore = "guest: needs root, loop devices and device-mapper (tests/vm/run-in-guest.sh)"]
async fn guest_health_changed_data_blocks_make_the_volume_abnormal() {
    let dir = scratch("tamper");
    let p = Plugin::start(&dir).await;
    let mut vols = Vec::new();
    for name in ["pvc-tampered", "pvc-sibling"] {
        let id = p.create(name, 64 * MIB, block_cap()).await;
        let staging = dir.join(format!("{name}-staging"));
        let target = dir.join(format!("pods/{name}/dev"));
        p.stage(&id, &staging, block_cap()).await;
        p.publish(&id, &staging, &target, block_cap()).await;
        vols.push((id, staging, target));
    }
    let (id, _, target) = &vols[0];
    let device = PathBuf::from(format!("/dev/mapper/sealcsi-{id}"));
    let dev = open_direct(&device, true);
    for block in 0..16 {
        write_block_at(&dev, block * KIB4 as u64, &pattern(block));
    }
    assert!(!p.condition(id, target).await.abnormal);

    // The host flips one bit of block 5's ciphertext in the volume file, under the open volume.
    let backing = p.backing(id);
    let off = data_offset(&backing, 5);
    let file = open_direct(&backing, true);
    let mut data = read_block_at(&file, off).unwrap();
    assert!(
        data.iter().any(|&b| b != 0),
        "block 5's data is zeros: layout wrong"
    );
    data[100] ^= 1;
    write_block_at(&file, off, &data);
    println!(
        "flipped a bit at backing byte {} (block 5 of {id})",
        off + 100
    );

    assert_eq!(read_block_at(&dev, 4 * KIB4 as u64).unwrap(), pattern(4));
    for _ in 0..3 {
        match read_block_at(&dev, 5 * KIB4 as u64) {
            Ok(_) => panic!("the changed block 5 read back"),
            Err(e) => {
                let errno = e.raw_os_error();
                assert!(
                    errno == Some(nix::libc::EILSEQ) || errno == Some(nix::libc::EIO),
                    "reading block 5: {e}"
                );
                println!("reading block 5 fails as it must: {e}");
            }
        }
    }
    drop(dev);

    // The kernel's own lines, checked against the parser sealcsi uses. dm-crypt names the device its
    // bio went to: the integrity device below it.
    let crypt_minor = minor_of(&format!("sealcsi-{id}"));
    let integrity_minor = minor_of(&format!("sealcsi-{id}-integrity"));
    let lines: Vec<(u32, String)> = kernel_log()
        .into_iter()
        .filter(|(_, m)| {
            m.contains(AEAD_ERROR) || m.contains("suppressed") || m.starts_with("sealcsi: ")
        })
        .collect();
    for (facility, line) in &lines {
        println!("kernel log (facility {facility}): {line}");
    }
    let failures = lines
        .iter()
        .filter(|(facility, m)| {
            let record = kmsg::Record {
                facility: *facility,
                level: 3,
                seq: 0,
                timestamp_us: 0,
                message: m.as_bytes(),
            };
            kmsg::event(&record)
                == Some(kmsg::Event::Failure {
                    minor: integrity_minor,
                })
        })
        .count();
    assert!(
        failures >= 1,
        "no kernel line parses as an AEAD failure of dm-{integrity_minor}: {lines:?}"
    );
    assert!(
        lines
            .iter()
            .any(|(f, m)| *f != 0
                && m == &format!("sealcsi: dm-{crypt_minor} opened as sealcsi-{id}")),
        "no announcement of dm-{crypt_minor} in the kernel log"
    );

    // The follower runs on its own thread: wait (bounded) for it to have read the lines.
    let deadline = Instant::now() + Duration::from_secs(30);
    let condition = loop {
        let c = p.condition(id, target).await;
        if c.abnormal || Instant::now() > deadline {
            break c;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    println!("condition of the changed volume: {}", condition.message);
    assert!(condition.abnormal, "the changed volume is reported healthy");
    let count: u64 = condition
        .message
        .split(' ')
        .next()
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no count first in {:?}", condition.message));
    assert!(
        count >= 1 && count as usize <= failures,
        "count {count}, {failures} failure line(s) in the log"
    );
    assert!(
        condition
            .message
            .contains("integrity failure(s) since the volume was staged")
            && condition.message.contains("EIO"),
        "{}",
        condition.message
    );
    let (sibling, _, sibling_target) = &vols[1];
    let c = p.condition(sibling, sibling_target).await;
    assert!(!c.abnormal, "the sibling volume was charged: {}", c.message);

    let text = p.metrics_text().await;
    let line = format!("sealcsi_integrity_failures{{volume_id=\"{id}\"}} {count}");
    assert!(text.contains(&line), "no {line:?} in the metrics:\n{text}");
    let line = format!("sealcsi_integrity_failures{{volume_id=\"{sibling}\"}} 0");
    assert!(text.contains(&line), "no {line:?} in the metrics:\n{text}");

    // A burst of 40 failed reads: the kernel rate-limits its lines, the count follows the lines.
    let dev = open_direct(&device, false);
    for _ in 0..40 {
        assert!(read_block_at(&dev, 5 * KIB4 as u64).is_err());
    }
    drop(dev);
    let log = kernel_log();
    let since_staging = |log: &[(u32, String)]| {
        let start = log
            .iter()
            .rposition(|(f, m)| {
                *f != 0
                    && m == &format!(
                        "sealcsi: dm-{integrity_minor} opened as sealcsi-{id}-integrity"
                    )
            })
            .expect("the announcement is in the ring");
        log[start..]
            .iter()
            .filter(|(f, m)| {
                *f == 0 && m.contains(AEAD_ERROR) && m.contains(&format!("dm-{integrity_minor}:"))
            })
            .count() as u64
    };
    let lines = since_staging(&log);
    let suppressed: Vec<&String> = log
        .iter()
        .filter(|(_, m)| m.contains("callbacks suppressed"))
        .map(|(_, m)| m)
        .collect();
    let deadline = Instant::now() + Duration::from_secs(30);
    let counted = loop {
        let c = p.condition(id, target).await;
        let n: u64 = c
            .message
            .split(' ')
            .next()
            .and_then(|n| n.parse().ok())
            .unwrap_or(0);
        if n >= lines || Instant::now() > deadline {
            break n;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    println!(
        "43 failed reads since staging: {lines} AEAD line(s) for dm-{integrity_minor} in the log, {counted} counted; \
         rate-limit notes in the log: {suppressed:?}"
    );
    assert_eq!(
        counted, lines,
        "the follower's count differs from the log's lines"
    );

    // A restarted plugin reads the ring from its oldest record: the count survives the restart.
    let p = p.restart().await;
    let deadline = Instant::now() + Duration::from_secs(30);
    let after_restart = loop {
        let c = p.condition(id, target).await;
        let n: u64 = c
            .message
            .split(' ')
            .next()
            .and_then(|n| n.parse().ok())
            .unwrap_or(0);
        if n >= lines || Instant::now() > deadline {
            break n;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    println!("after a plugin restart: {after_restart} counted");
    assert_eq!(
        after_restart, lines,
        "the restarted plugin's count differs from the log's lines"
    );
    let c = p.condition(sibling, sibling_target).await;
    assert!(
        !c.abnormal,
        "after the restart the sibling was charged: {}",
        c.message
    );

    for (id, staging, target) in &vols {
        p.teardown(id, staging, Some(target)).await;
    }
    p.stop().await;
}

/// systemd-udevd, started by the test and killed (by its pid) when dropped.
struct Udevd {
    child: Child,
}

impl Udevd {
    fn start() -> Udevd {
        let bin = "/lib/systemd/systemd-udevd";
        assert!(
            Path::new(bin).exists(),
            "{bin} is missing: install Debian's udev on the host (tests/install-deps.sh does)"
        );
        let child = Command::new(bin)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(20);
        while !Path::new("/run/udev/control").exists() {
            assert!(Instant::now() < deadline, "systemd-udevd did not start");
            std::thread::sleep(Duration::from_millis(50));
        }
        Udevd { child }
    }
}

impl Drop for Udevd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn run(prog: &str, args: &[&str]) -> String {
    let out = Command::new(prog)
        .args(args)
        .env_remove("DM_DISABLE_UDEV")
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("{prog}: {e}"));
    assert!(
        out.status.success(),
        "{prog} {args:?}: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn settle() {
    run("/usr/bin/udevadm", &["settle", "--timeout=60"]);
}

/// udev's database entry of block device `dev-<minor>` (`dm-N`): its properties.
fn udev_properties(minor: u32) -> String {
    run(
        "/usr/bin/udevadm",
        &[
            "info",
            "--query=property",
            &format!("--name=/dev/dm-{minor}"),
        ],
    )
}

fn aead_lines() -> usize {
    kernel_log()
        .iter()
        .filter(|(f, m)| *f == 0 && m.contains(AEAD_ERROR))
        .count()
}

#[tokio::test]
#[ignore = "guest: needs root, loop devices, device-mapper and udev (tests/vm/run-in-guest.sh)"]
async fn guest_health_udev_leaves_sealcsi_devices_alone() {
    let dir = scratch("udev");
    let _udevd = Udevd::start();

    // The control: a device-mapper device without the flags is probed (udev's blkid finds its ext4).
    let image = dir.join("control.img");
    File::create(&image).unwrap().set_len(32 << 20).unwrap();
    run(
        "/usr/sbin/mke2fs",
        &["-q", "-F", "-t", "ext4", image.to_str().unwrap()],
    );
    let lo = run(
        "/usr/sbin/losetup",
        &["-f", "--show", image.to_str().unwrap()],
    );
    let lo = lo.trim().to_string();
    run(
        "/usr/sbin/dmsetup",
        &[
            "create",
            "health-control",
            "--table",
            &format!("0 65536 linear {lo} 0"),
        ],
    );
    settle();
    let control = udev_properties(minor_of("health-control"));
    run("/usr/sbin/dmsetup", &["remove", "health-control"]);
    run("/usr/sbin/losetup", &["-d", &lo]);
    println!("udev's properties of the control device:\n{control}");
    assert!(
        control.contains("ID_FS_TYPE=ext4"),
        "udev did not probe a plain device-mapper device here: this test would prove nothing"
    );

    let before = aead_lines();
    let p = Plugin::start(&dir).await;
    let id = p.create("pvc-udev", 256 * MIB, mount_cap()).await;
    let staging = dir.join("staging");
    p.stage(&id, &staging, mount_cap()).await;
    settle();
    let crypt = format!("sealcsi-{id}");
    let integrity = format!("{crypt}-integrity");
    for name in [&crypt, &integrity] {
        let minor = minor_of(name);
        let props = udev_properties(minor);
        println!("udev's properties of {name} (dm-{minor}):\n{props}");
        assert!(
            props.contains(&format!("DM_NAME={name}")),
            "udev did not process {name}"
        );
        for flag in [
            "DM_UDEV_DISABLE_DISK_RULES_FLAG=1",
            "DM_UDEV_DISABLE_OTHER_RULES_FLAG=1",
            "DM_UDEV_DISABLE_SUBSYSTEM_RULES_FLAG=1",
            "DM_UDEV_PRIMARY_SOURCE_FLAG=1",
        ] {
            assert!(props.contains(flag), "{name}: no {flag}");
        }
        assert!(!props.contains("ID_FS_TYPE="), "udev probed {name} (blkid)");
    }
    // /dev/mapper/<name> works whoever made it (sealcsi's node or udev's link).
    let node = PathBuf::from(format!("/dev/mapper/{crypt}"));
    let meta = fs::metadata(&node).unwrap();
    assert!(meta.file_type().is_block_device());
    assert_eq!(nix::sys::stat::minor(meta.rdev()) as u32, minor_of(&crypt));
    println!(
        "/dev/mapper/{crypt} is a {}",
        if fs::symlink_metadata(&node)
            .unwrap()
            .file_type()
            .is_symlink()
        {
            "symlink (udev's)"
        } else {
            "device node (sealcsi's)"
        }
    );
    let after = aead_lines();
    assert_eq!(
        after, before,
        "the kernel log gained AEAD errors while udev ran"
    );

    p.teardown(&id, &staging, None).await;
    settle();
    assert!(
        fs::symlink_metadata(&node).is_err(),
        "/dev/mapper/{crypt} is left after the volume was unstaged"
    );
    p.stop().await;
}

/// /dev/mapper/<name> where udev made it a symlink first: sealcsi keeps a link to its device, replaces
/// one that leads elsewhere, and leaves a link to udev on remove (udev removes its own links).
#[test]
#[ignore = "guest: needs root, loop devices and device-mapper (tests/vm/run-in-guest.sh)"]
fn guest_health_mapper_node_keeps_udevs_link() {
    use sealcsi::dm::{CryptCipher, CryptKey, CryptTarget, Target, TargetLine};
    let dir = scratch("node");
    let image = dir.join("plain.img");
    File::create(&image).unwrap().set_len(16 << 20).unwrap();
    let lo = run(
        "/usr/sbin/losetup",
        &["-f", "--show", image.to_str().unwrap()],
    );
    let lo = PathBuf::from(lo.trim());
    let line = TargetLine {
        start: 0,
        length: (16 << 20) / 512,
        target: Target::Crypt(
            CryptTarget::new(
                CryptCipher::AesXtsPlain64,
                CryptKey::Hex(zeroize::Zeroizing::new(vec![7; 64])),
                lo.clone(),
                0,
                4096,
            )
            .unwrap(),
        ),
    };
    let dm = KernelDm::new().unwrap();
    let name = DmName::try_from("health-node").unwrap();
    let info = dm
        .create(&name, "HEALTH-NODE", std::slice::from_ref(&line))
        .unwrap();
    let node = name.node();
    let rdev = |p: &Path| fs::metadata(p).unwrap().rdev();
    let dev = nix::sys::stat::makedev(u64::from(info.major), u64::from(info.minor));
    assert!(
        fs::symlink_metadata(&node)
            .unwrap()
            .file_type()
            .is_block_device()
    );
    assert_eq!(rdev(&node), dev);

    // udev's link to the same device is kept across a table reload (which makes sure of the node).
    fs::remove_file(&node).unwrap();
    std::os::unix::fs::symlink(format!("../dm-{}", info.minor), &node).unwrap();
    dm.reload(&name, std::slice::from_ref(&line)).unwrap();
    assert!(
        fs::symlink_metadata(&node)
            .unwrap()
            .file_type()
            .is_symlink(),
        "udev's link was replaced"
    );
    assert_eq!(rdev(&node), dev);

    // A link that leads to another device is stale: replaced by a node for this one.
    fs::remove_file(&node).unwrap();
    std::os::unix::fs::symlink(&lo, &node).unwrap();
    dm.reload(&name, std::slice::from_ref(&line)).unwrap();
    assert!(
        fs::symlink_metadata(&node)
            .unwrap()
            .file_type()
            .is_block_device()
    );
    assert_eq!(rdev(&node), dev);

    // On remove, a link is udev's to remove: left alone.
    fs::remove_file(&node).unwrap();
    std::os::unix::fs::symlink(format!("../dm-{}", info.minor), &node).unwrap();
    dm.remove(&name).unwrap();
    assert!(dm.info(&name).unwrap().is_none());
    assert!(
        fs::symlink_metadata(&node)
            .unwrap()
            .file_type()
            .is_symlink()
    );
    fs::remove_file(&node).unwrap();
    run("/usr/sbin/losetup", &["-d", lo.to_str().unwrap()]);
}
