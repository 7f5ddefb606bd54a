//! The control path on the host, through the real gRPC server on a unix socket, against the in-memory
//! kernel fakes (MemoryDm, MemoryEngine, MemoryMounter) and a real state directory (records are written
//! and fsynced, backing files are sparse files): no kernel device-mapper is involved, so this measures
//! sealcsi's own overhead (gRPC, validation, guards, store), not dm-crypt.
//!
//! - criterion `lifecycle_100`: CreateVolume, NodeStage, NodePublish, NodeUnpublish, NodeUnstage,
//!   DeleteVolume for 100 volumes, one call after another; one sample = the 100-volume lifecycle.
//! - an instrumented pass of the same lifecycle (per-RPC medians) and ListVolumes over 10 000 volumes
//!   (created through CreateVolume in a tmpfs state directory, then walked in pages of 100 and in one
//!   page), written to target/bench/host.json for tests/bench/report.py.
//!
//! `SEALCSI_BENCH_TINY=1`, or running it without `--bench` (as `cargo test --all-targets` does), shrinks
//! it to seconds (10 volumes, a 500-volume listing).
//! The server is built the way tests/csi_host.rs builds it (that file's helpers are private to it).

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{Criterion, criterion_group, criterion_main};
use sealcsi::csi::proto::controller_client::ControllerClient;
use sealcsi::csi::proto::node_client::NodeClient;
use sealcsi::csi::proto::volume_capability::{
    AccessMode, AccessType, MountVolume, access_mode::Mode,
};
use sealcsi::csi::proto::*;
use sealcsi::csi::{Mode as PluginMode, PluginConfig, PluginDeps};
use sealcsi::dm::MemoryDm;
use sealcsi::node::{MemoryEngine, MemoryMounter};
use tokio::runtime::Runtime;
use tonic::transport::Channel;

#[path = "../tests/common/plugin.rs"]
mod plugin;
use plugin::{Served, serve};

const MIB: i64 = 1 << 20;

/// The tiny configuration: asked for, or not run as a benchmark at all (`cargo test --all-targets`
/// runs this file without `--bench`, as a smoke test that must not take minutes).
fn tiny() -> bool {
    std::env::var_os("SEALCSI_BENCH_TINY").is_some_and(|v| v != "0")
        || !std::env::args().any(|a| a == "--bench")
}

struct Plugin {
    _dir: tempfile::TempDir,
    work: PathBuf,
    served: Served,
}

impl Plugin {
    /// A plugin serving all services, its state directory under `parent`.
    async fn start(parent: &Path) -> Plugin {
        let dir = tempfile::tempdir_in(parent).expect("tempdir");
        let state = dir.path().join("state");
        let work = dir.path().join("work");
        std::fs::create_dir_all(&work).expect("work dir");
        let socket = dir.path().join("csi/csi.sock");
        let dm = Arc::new(MemoryDm::new());
        let deps = PluginDeps {
            dm: dm.clone(),
            engine: Arc::new(MemoryEngine::new(dm, "bench-identity")),
            mounter: Arc::new(MemoryMounter::new()),
        };
        let mut config = PluginConfig::new(
            format!("unix://{}", socket.display()),
            "node-bench",
            PluginMode::All,
            &state,
        );
        // Thousands of sparse 64 MiB volumes that never hold data: promise far more than the disk.
        config.overcommit_ratio = 1e6;
        Plugin {
            _dir: dir,
            work,
            served: serve(config, deps).await,
        }
    }

    fn controller(&self) -> ControllerClient<Channel> {
        self.served.controller()
    }

    fn node(&self) -> NodeClient<Channel> {
        self.served.node()
    }

    async fn stop(mut self) {
        self.served.stop().await.expect("serve");
    }
}

fn mount_cap() -> VolumeCapability {
    VolumeCapability {
        access_mode: Some(AccessMode {
            mode: Mode::SingleNodeWriter as i32,
        }),
        access_type: Some(AccessType::Mount(MountVolume::default())),
    }
}

async fn create(p: &Plugin, name: &str) -> String {
    p.controller()
        .create_volume(CreateVolumeRequest {
            name: name.into(),
            capacity_range: Some(CapacityRange {
                required_bytes: 64 * MIB,
                limit_bytes: 0,
            }),
            volume_capabilities: vec![mount_cap()],
            ..Default::default()
        })
        .await
        .expect("CreateVolume")
        .into_inner()
        .volume
        .expect("volume")
        .volume_id
}

/// Time of each phase, one duration per volume.
type Phases = BTreeMap<&'static str, Vec<Duration>>;

/// CreateVolume, NodeStage, NodePublish, NodeUnpublish, NodeUnstage, DeleteVolume for `n` volumes,
/// phase by phase (all staged at once before any is unstaged, as on a busy node).
async fn lifecycle(p: &Plugin, n: usize, tag: &str, phases: &mut Phases) {
    let timed = |phases: &mut Phases, phase: &'static str, t: Instant| {
        phases.entry(phase).or_default().push(t.elapsed());
    };
    let mut ids = Vec::with_capacity(n);
    for i in 0..n {
        let t = Instant::now();
        ids.push(create(p, &format!("pvc-{tag}-{i}")).await);
        timed(phases, "1 CreateVolume", t);
    }
    let staging = |i: usize| p.work.join(format!("staging-{i}"));
    let target = |i: usize| p.work.join(format!("pod-{i}/volume"));
    for (i, id) in ids.iter().enumerate() {
        let t = Instant::now();
        p.node()
            .node_stage_volume(NodeStageVolumeRequest {
                volume_id: id.clone(),
                staging_target_path: staging(i).display().to_string(),
                volume_capability: Some(mount_cap()),
                ..Default::default()
            })
            .await
            .expect("NodeStageVolume");
        timed(phases, "2 NodeStageVolume", t);
    }
    for (i, id) in ids.iter().enumerate() {
        let t = Instant::now();
        p.node()
            .node_publish_volume(NodePublishVolumeRequest {
                volume_id: id.clone(),
                staging_target_path: staging(i).display().to_string(),
                target_path: target(i).display().to_string(),
                volume_capability: Some(mount_cap()),
                ..Default::default()
            })
            .await
            .expect("NodePublishVolume");
        timed(phases, "3 NodePublishVolume", t);
    }
    for (i, id) in ids.iter().enumerate() {
        let t = Instant::now();
        p.node()
            .node_unpublish_volume(NodeUnpublishVolumeRequest {
                volume_id: id.clone(),
                target_path: target(i).display().to_string(),
            })
            .await
            .expect("NodeUnpublishVolume");
        timed(phases, "4 NodeUnpublishVolume", t);
    }
    for (i, id) in ids.iter().enumerate() {
        let t = Instant::now();
        p.node()
            .node_unstage_volume(NodeUnstageVolumeRequest {
                volume_id: id.clone(),
                staging_target_path: staging(i).display().to_string(),
            })
            .await
            .expect("NodeUnstageVolume");
        timed(phases, "5 NodeUnstageVolume", t);
    }
    for id in &ids {
        let t = Instant::now();
        p.controller()
            .delete_volume(DeleteVolumeRequest {
                volume_id: id.clone(),
                secrets: HashMap::new(),
            })
            .await
            .expect("DeleteVolume");
        timed(phases, "6 DeleteVolume", t);
    }
}

fn median(v: &mut [Duration]) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// Walks ListVolumes in pages of `max_entries` (0: one page); returns (entries, pages, time).
async fn walk(p: &Plugin, max_entries: i32) -> (usize, usize, Duration) {
    let t = Instant::now();
    let (mut entries, mut pages, mut token) = (0, 0, String::new());
    loop {
        let page = p
            .controller()
            .list_volumes(ListVolumesRequest {
                max_entries,
                starting_token: token,
            })
            .await
            .expect("ListVolumes")
            .into_inner();
        entries += page.entries.len();
        pages += 1;
        if page.next_token.is_empty() {
            break;
        }
        token = page.next_token;
    }
    (entries, pages, t.elapsed())
}

fn out_dir() -> PathBuf {
    std::env::var_os("SEALCSI_BENCH_OUT")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("target/bench"))
}

/// The total of the `n`-volume lifecycle already in `report` (ms).
fn t_n(report: &serde_json::Map<String, serde_json::Value>, n: usize) -> f64 {
    report[&format!("lifecycle of {n} volumes, total (ms)")]
        .as_f64()
        .expect("the lifecycle total is a number")
}

/// The instrumented pass, the tenfold lifecycle and the 10 000-volume listing, into host.json.
fn measure_once(rt: &Runtime, n: usize, listed: usize) {
    let mut report = serde_json::Map::new();
    let disk_parent = Path::new(env!("CARGO_MANIFEST_DIR")).join("target");
    rt.block_on(async {
        let p = Plugin::start(&disk_parent).await;
        let mut phases = Phases::new();
        let t = Instant::now();
        lifecycle(&p, n, "once", &mut phases).await;
        report.insert(
            format!("lifecycle of {n} volumes, total (ms)"),
            ms(t.elapsed()).into(),
        );
        for (phase, times) in phases.iter_mut() {
            let first = times[0];
            let last = *times.last().expect("n > 0");
            report.insert(
                format!("{phase}: median / first / #{n} (ms)"),
                format!(
                    "{:.3} / {:.3} / {:.3}",
                    ms(median(times)),
                    ms(first),
                    ms(last)
                )
                .into(),
            );
        }
        // The same lifecycle at ten times the count: the goal is at most ten times the time (O(n)).
        let total_n = t_n(&report, n);
        let t = Instant::now();
        lifecycle(&p, 10 * n, "tenfold", &mut Phases::new()).await;
        let tenfold = ms(t.elapsed());
        report.insert(
            format!("lifecycle of {} volumes, total (ms)", 10 * n),
            tenfold.into(),
        );
        report.insert(
            format!("lifecycle {} / lifecycle {n} (goal <= 10)", 10 * n),
            format!("{:.2}", tenfold / total_n).into(),
        );
        p.stop().await;

        // tmpfs, so that 10 000 CreateVolume calls (each fsyncs a record and the directory) take seconds.
        let shm = Path::new("/dev/shm");
        let parent = if shm.is_dir() {
            shm.to_path_buf()
        } else {
            disk_parent.clone()
        };
        let p = Plugin::start(&parent).await;
        let t = Instant::now();
        for i in 0..listed {
            create(&p, &format!("pvc-list-{i:05}")).await;
        }
        let created = t.elapsed();
        report.insert(
            format!("CreateVolume x {listed} into {} (s)", parent.display()),
            created.as_secs_f64().into(),
        );
        for (label, max) in [("pages of 100", 100), ("one page", 0)] {
            let mut times = Vec::new();
            let mut shape = (0, 0);
            for _ in 0..3 {
                let (entries, pages, d) = walk(&p, max).await;
                shape = (entries, pages);
                times.push(d);
            }
            assert_eq!(shape.0, listed, "every volume listed");
            report.insert(
                format!(
                    "ListVolumes over {listed}, {label} ({} calls): walk median of 3 (ms)",
                    shape.1
                ),
                ms(median(&mut times)).into(),
            );
        }
        let mut first = Vec::new();
        for _ in 0..5 {
            let t = Instant::now();
            p.controller()
                .list_volumes(ListVolumesRequest {
                    max_entries: 100,
                    starting_token: String::new(),
                })
                .await
                .expect("ListVolumes");
            first.push(t.elapsed());
        }
        report.insert(
            format!("ListVolumes over {listed}, one page of 100: median of 5 (ms)"),
            ms(median(&mut first)).into(),
        );
        p.stop().await;
    });
    let dir = out_dir();
    std::fs::create_dir_all(&dir).expect("out dir");
    let path = dir.join("host.json");
    std::fs::write(
        &path,
        serde_json::to_string_pretty(&serde_json::Value::Object(report.clone())).expect("json"),
    )
    .expect("host.json");
    for (k, v) in &report {
        println!("{k}: {v}");
    }
    println!("written: {}", path.display());
}

fn bench(c: &mut Criterion) {
    let (n, listed) = if tiny() { (10, 500) } else { (100, 10_000) };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    measure_once(&rt, n, listed);

    let disk_parent = Path::new(env!("CARGO_MANIFEST_DIR")).join("target");
    let p = rt.block_on(Plugin::start(&disk_parent));
    let mut round = 0u64;
    let mut group = c.benchmark_group("control_path");
    group.sample_size(10);
    group.bench_function(format!("lifecycle_{n}"), |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                round += 1;
                let mut phases = Phases::new();
                let t = Instant::now();
                rt.block_on(lifecycle(&p, n, &round.to_string(), &mut phases));
                total += t.elapsed();
            }
            total
        })
    });
    group.finish();
    rt.block_on(p.stop());
}

criterion_group!(benches, bench);
criterion_main!(benches);
