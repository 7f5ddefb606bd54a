//! Stage-time benchmark of the stacked driver (issue 11, docs/benchmarks.md "Stage time through the
//! stack"): NodeStageVolume of a formatted ext4 volume through sealcsi stacked over the blockback test
//! backend (real loop devices, in the guest), against the sum of its two parts done on their own:
//!
//! - **backend**: the backend's own NodeStageVolume + NodePublishVolume (BLOCK) of the same volume,
//!   straight to the backend's socket;
//! - **open**: sealcsi's own open of the device it published, as the node-local path does it
//!   (`KernelEngine::stage_device`: header read, unseal, binding check, integrity superblock,
//!   dm-integrity + dm-crypt) and the ext4 mount with the node's options.
//!
//! The three are measured round-robin (stack, then backend + open) `SEALCSI_BENCH_RUNS` times (default
//! 3, the CI's tiny configuration), after one unmeasured stage that formats the volume. One JSON line per
//! run and a summary line (medians, and the stack's share over the sum) go to stdout, prefixed
//! `bench:`; with `SEALCSI_BENCH_OUT` set they are appended to `$SEALCSI_BENCH_OUT/stacked-stage.jsonl`.
//! No number fails anything: it is a benchmark, run as a guest test so CI keeps it working.

use super::*;

use std::sync::Arc;
use std::time::Instant;

use sealcsi::node::{KernelEngine, Mounter, SystemMounter, VolumeEngine};
use sealcsi::volume::stack::Workqueues;

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

fn emit(line: &str) {
    println!("bench: {line}");
    if let Some(dir) = std::env::var_os("SEALCSI_BENCH_OUT") {
        let dir = PathBuf::from(dir);
        fs::create_dir_all(&dir).unwrap();
        let mut f = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.join("stacked-stage.jsonl"))
            .unwrap();
        writeln!(f, "{line}").unwrap();
    }
}

pub async fn run() {
    let runs: usize = std::env::var("SEALCSI_BENCH_RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3);
    let dir = scratch("bench_stage");
    let bb = backend(&dir).await;
    let s = Stacked::start(&dir, "a", "id-a", &bb.options.endpoint()).await;
    let (id, ctx, pc) = s.create("bench-vol", 256 * MIB, fs_cap()).await;
    let staging = dir.join("staging");
    // The first stage formats; not measured.
    s.stage(&id, &ctx, &pc, &staging, fs_cap()).await.unwrap();
    s.unstage(&id, &staging).await;

    let backend_context: HashMap<String, String> = ctx
        .iter()
        .filter_map(|(k, v)| {
            k.strip_prefix("backend.")
                .map(|k| (k.to_string(), v.clone()))
        })
        .collect();
    let local = sealcsi::store::stacked::local_id(&id);
    let formatted = sealcsi::store::Store::open(&dir.join("state-a"))
        .unwrap()
        .record(&local)
        .unwrap()
        .and_then(|r| r.formatted());
    let source = SimSource::open(&dir.join("sim-id-a"), "id-a").unwrap();
    let engine = KernelEngine::new(Arc::new(KernelDm::new().unwrap()), Arc::new(source));
    let format = sealcsi::volume::FormatOptions {
        profile: sealcsi::store::VolumeParams::default().profile(),
        fs: sealcsi::header::FsKind::Ext4,
        init: sealcsi::volume::init::InitMode::Fast,
        force: false,
        volume_binding: sealcsi::header::volume_binding(local.as_str()),
    };
    let bb_staging = dir.join("bb-staging");
    let bb_device = dir.join("bb-device");
    let mount_point = dir.join("own-mount");
    fs::create_dir_all(&bb_staging).unwrap();
    fs::create_dir_all(&mount_point).unwrap();

    let (mut stack, mut backend_t, mut open_t, mut hop_t) = (vec![], vec![], vec![], vec![]);
    // Through the stack.
    let through_stack = async || {
        let t0 = Instant::now();
        s.stage(&id, &ctx, &pc, &staging, fs_cap()).await.unwrap();
        let stack_s = t0.elapsed().as_secs_f64();
        s.unstage(&id, &staging).await;
        stack_s
    };
    for run in 1..=runs {
        // The stack goes first in odd runs and last in even ones: whichever comes right after the
        // previous step's teardown (device-mapper removals, loop detach) pays for the kernel's
        // deferred work, and alternating gives both sides the same share of it.
        let stack_first = run % 2 == 1;
        let mut stack_s = 0.0;
        if stack_first {
            stack_s = through_stack().await;
        }

        // The CO -> sealcsi hop the stack has and the two parts below do not: one null call
        // (NodeGetCapabilities) on the same channel and server.
        let t0 = Instant::now();
        s.node()
            .node_get_capabilities(NodeGetCapabilitiesRequest {})
            .await
            .unwrap();
        let hop_s = t0.elapsed().as_secs_f64();

        // The backend on its own.
        let t0 = Instant::now();
        bb.node()
            .node_stage_volume(NodeStageVolumeRequest {
                volume_id: id.clone(),
                publish_context: pc.clone(),
                staging_target_path: bb_staging.display().to_string(),
                volume_capability: Some(block_cap()),
                secrets: HashMap::new(),
                volume_context: backend_context.clone(),
            })
            .await
            .unwrap();
        bb.node()
            .node_publish_volume(NodePublishVolumeRequest {
                volume_id: id.clone(),
                publish_context: pc.clone(),
                staging_target_path: bb_staging.display().to_string(),
                target_path: bb_device.display().to_string(),
                volume_capability: Some(block_cap()),
                readonly: false,
                secrets: HashMap::new(),
                volume_context: backend_context.clone(),
            })
            .await
            .unwrap();
        let backend_s = t0.elapsed().as_secs_f64();

        // sealcsi's own open and mount of what it published: the node-local path's kernel work
        // (`KernelEngine::stage_device`: header read, unseal, binding, dm-integrity + dm-crypt; then
        // the mount with the node's options), without the stack around it.
        let name = format!("sealcsi-bench-{run}");
        let t0 = Instant::now();
        let staged = tokio::task::block_in_place(|| {
            engine.stage_device(&bb_device, &name, &format, formatted, Workqueues::default())
        })
        .unwrap();
        Mounter::mount(
            &SystemMounter,
            &staged.device,
            &mount_point,
            "ext4",
            &sealcsi::node::mount::secure_options(&[]),
        )
        .unwrap();
        let open_s = t0.elapsed().as_secs_f64();
        nix::mount::umount(&mount_point).unwrap();
        engine.close(&name).unwrap();
        bb.node()
            .node_unpublish_volume(NodeUnpublishVolumeRequest {
                volume_id: id.clone(),
                target_path: bb_device.display().to_string(),
            })
            .await
            .unwrap();
        bb.node()
            .node_unstage_volume(NodeUnstageVolumeRequest {
                volume_id: id.clone(),
                staging_target_path: bb_staging.display().to_string(),
            })
            .await
            .unwrap();

        if !stack_first {
            stack_s = through_stack().await;
        }
        emit(&format!(
            "{{\"kind\":\"stacked_stage\",\"run\":{run},\"stack_first\":{stack_first},\"stack_s\":{stack_s:.6},\"backend_s\":{backend_s:.6},\"open_s\":{open_s:.6},\"hop_s\":{hop_s:.6}}}"
        ));
        hop_t.push(hop_s);
        stack.push(stack_s);
        backend_t.push(backend_s);
        open_t.push(open_s);
    }
    let (st, be, op, hop) = (
        median(stack),
        median(backend_t),
        median(open_t),
        median(hop_t),
    );
    emit(&format!(
        "{{\"kind\":\"stacked_stage_summary\",\"runs\":{runs},\"volume_mib\":256,\"stack_s\":{st:.6},\"backend_s\":{be:.6},\"open_s\":{op:.6},\"hop_s\":{hop:.6},\"over_sum_percent\":{:.2},\"over_sum_and_hop_percent\":{:.2}}}",
        (st / (be + op) - 1.0) * 100.0,
        (st / (be + op + hop) - 1.0) * 100.0
    ));
    s.delete(&id).await;
}
