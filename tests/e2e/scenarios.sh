# shellcheck shell=bash
# The e2e scenarios (docs/e2e.md), sourced by tests/e2e/node.sh inside the guest node. Each asserts
# what Kubernetes reports (through kubectl) and what is on the node (device-mapper, files, mounts).
# A scenario is a function that returns non-zero on the first failed check, after saying why.

NS=e2e
MARKER=sealcsi-e2e-plaintext-$RANDOM$RANDOM-marker
FAILED=0

# run_scenario ID FUNCTION [ARGS...]: run it unless E2E_SCENARIOS names others; record the result.
run_scenario() {
    local id=$1 fn=$2 t=$SECONDS result detail
    shift 2
    # Scenario 1 (deploy/'s objects) is what every other one stands on: it always runs.
    if [ "$id" != 1 ] && [ -n "${E2E_SCENARIOS// /}" ] && ! [[ " $E2E_SCENARIOS " == *" ${id%%/*} "* ]]; then
        return 0
    fi
    log "scenario $id: $fn $*"
    local logfile=$LOGS/scenario-${id//\//-}-$fn${*:+-${*// /-}}.log
    SKIP_REASON=
    if "$fn" "$@" >"$logfile" 2>&1; then
        result=PASS detail=
    elif [ -n "$SKIP_REASON" ]; then
        result=SKIP detail=$SKIP_REASON
    else
        result=FAIL detail="see logs/${logfile##*/}: $(tail -n 1 "$logfile")"
        FAILED=1
    fi
    log "scenario $id: $result (${detail:-ok}) in $((SECONDS - t))s"
    printf '%s\t%s\t%s\t%s\n' "$id" "$result" $((SECONDS - t)) "$fn $* ${detail:+- $detail}" >>"$RUN/results.tsv"
}

scenarios_summary() {
    [ "$FAILED" = 0 ] || { log "some scenarios failed"; exit 1; }
    log "every scenario that ran passed"
}

check() { # check DESCRIPTION CMD...: a named assertion
    local what=$1
    shift
    if "$@"; then echo "ok: $what"; else echo "FAILED: $what"; return 1; fi
}
k() { kubectl --request-timeout=30s "$@"; }

# --- objects ----------------------------------------------------------------------------------------
pvc() { # pvc NAME STORAGECLASS SIZE [Filesystem|Block]
    k -n $NS apply --validate=false -f - <<EOF
apiVersion: v1
kind: PersistentVolumeClaim
metadata: {name: $1}
spec:
  storageClassName: $2
  accessModes: [ReadWriteOnce]
  volumeMode: ${4:-Filesystem}
  resources: {requests: {storage: $3}}
EOF
}

pod() { # pod NAME PVC fs|block SCRIPT: runs SCRIPT, then sleeps
    local vol
    if [ "$3" = block ]; then
        vol="volumeDevices: [{name: v, devicePath: /dev/sealed}]"
    else
        vol="volumeMounts: [{name: v, mountPath: /data}]"
    fi
    k -n $NS apply --validate=false -f - <<EOF
apiVersion: v1
kind: Pod
metadata: {name: $1}
spec:
  terminationGracePeriodSeconds: 1
  containers:
    - name: c
      image: sealcsi.e2e/busybox:1
      imagePullPolicy: Never
      command: ["/bin/sh", "-c", $(printf '%s' "$4; touch /tmp/ready; exec sleep 1000000" | python3 -c 'import json,sys; print(json.dumps(sys.stdin.read()))')]
      $vol
      readinessProbe: {exec: {command: [test, -e, /tmp/ready]}, periodSeconds: 1}
  volumes:
    - name: v
      persistentVolumeClaim: {claimName: $2}
EOF
}

pod_ready() { k -n $NS wait --for=condition=Ready "pod/$1" --timeout="${2:-180}s"; }
pod_gone() { k -n $NS delete pod "$1" --wait=true --timeout=120s; }
in_pod() { local p=$1; shift; k -n $NS exec "$p" -- "$@"; }
volume_handle() { # PVC -> the CSI volume id of its PV
    local pv
    pv=$(k -n $NS get pvc "$1" -o jsonpath='{.spec.volumeName}') || return 1
    k get pv "$pv" -o jsonpath='{.spec.csi.volumeHandle}'
}
pv_of() { k -n $NS get pvc "$1" -o jsonpath='{.spec.volumeName}'; }
# BACKEND is local (node-local files) or stacked (over the hostpath driver, scenario 8).
BACKEND=local
HOSTPATH_STATE=/scratch/hostpath
dm_of() { # CSI volume id -> the name of its dm-crypt device
    if [ "$BACKEND" = stacked ]; then
        echo "sealcsi-sv-$(printf 'stacked:%s' "$1" | sha256sum | cut -c1-32)"
    else
        echo "sealcsi-$1"
    fi
}
dm_open() { dmsetup info "$(dm_of "$1")" >/dev/null 2>&1; }
backing_file() { # CSI volume id -> the file that holds its ciphertext
    if [ "$BACKEND" = stacked ]; then echo "$HOSTPATH_STATE/$1"; else echo "$STATE/volumes/$1.img"; fi
}
no_plaintext() { python3 "$E2E_DIR/plaintext.py" "$1" "$MARKER"; }
drop_caches() { sync; echo 3 >/proc/sys/vm/drop_caches; }

WRITE_DATA="set -e; D=\${DIR:-/data}; head -c 4194304 /dev/urandom >\$D/random; \
i=0; while [ \$i -lt 2048 ]; do echo $MARKER; i=\$((i+1)); done >\$D/marker; \
dd if=\$D/random of=\$D/random.copy bs=1M conv=fsync 2>/dev/null; sync; \
sha256sum \$D/random \$D/marker >\$D/sums; sync"
READ_DATA="set -e; cd /data; sha256sum -c sums; cmp random random.copy"

# --- 1: deploy/'s cluster objects, as they are -------------------------------------------------------
apply_deploy_objects() {
    local f
    for f in namespace csidriver rbac storageclasses; do
        check "kubectl apply -f deploy/$f.yaml" k apply --validate=false -f "$E2E_REPO/deploy/$f.yaml" || return 1
    done
    check "CSIDriver sealcsi.io exists with storageCapacity" \
        sh -c "[ \"\$(kubectl get csidriver sealcsi.io -o jsonpath='{.spec.storageCapacity}')\" = true ]" || return 1
    check "StorageClasses sealcsi-ext4 and sealcsi-xfs exist" k get storageclass sealcsi-ext4 sealcsi-xfs || return 1
    check "ServiceAccount sealcsi-node exists" k -n sealcsi get serviceaccount sealcsi-node || return 1
    k create namespace $NS >/dev/null 2>&1 || k get namespace $NS >/dev/null
}

# --- 2-6: the PVC lifecycle, against the process-mode driver and the DaemonSet ----------------------
run_scenarios_against() {
    local mode=$1
    run_scenario "2/$mode" provision_write ext4 "$mode"
    run_scenario "2/$mode" provision_write xfs "$mode"
    run_scenario "3/$mode" recreate_reads_back ext4 "$mode"
    run_scenario "3/$mode" recreate_reads_back xfs "$mode"
    run_scenario "4/$mode" raw_block "$mode"
    run_scenario "5/$mode" online_expansion ext4 "$mode"
    run_scenario "6/$mode" delete_erases "$mode"
}

provision_write() { # FS MODE
    local fs=$1 name=$1-$2 id file dm
    pvc "$name" "sealcsi-$fs" 256Mi || return 1
    check "PVC $name waits for its first consumer (the PV controller says so)" wait_for 60 "event WaitForFirstConsumer" \
        sh -c "kubectl -n $NS get events --field-selector involvedObject.name=$name,reason=WaitForFirstConsumer -o name | grep -q ." || return 1
    check "and is not bound yet" \
        sh -c "[ \"\$(kubectl -n $NS get pvc $name -o jsonpath='{.status.phase}')\" = Pending ]" || return 1
    pod "w-$name" "$name" fs "$WRITE_DATA" || return 1
    check "pod w-$name scheduled, volume provisioned, staged, published, data written" pod_ready "w-$name" 240 || return 1
    check "PVC $name is Bound" sh -c "[ \"\$(kubectl -n $NS get pvc $name -o jsonpath='{.status.phase}')\" = Bound ]" || return 1
    id=$(volume_handle "$name") || return 1
    echo "volume id $id"
    check "PV has node affinity to $E2E_NODE_NAME" \
        sh -c "kubectl get pv $(pv_of "$name") -o jsonpath='{.spec.nodeAffinity.required}' | grep -q $E2E_NODE_NAME" || return 1
    check "the pod's filesystem is $fs" sh -c "kubectl -n $NS exec w-$name -- cat /proc/mounts | grep ' /data ' | grep -qw $fs" || return 1
    dm=$(dm_of "$id")
    check "dm-crypt over dm-integrity for the volume" \
        sh -c "dmsetup table $dm | grep -qw crypt && dmsetup table $dm-integrity | grep -qw integrity" || return 1
    file=$(backing_file "$id")
    check "backing file $file exists" test -f "$file" || return 1
    drop_caches
    check "the backing file holds no plaintext" no_plaintext "$file" || return 1
    check "the pod reads its data back" in_pod "w-$name" sh -c "$READ_DATA" || return 1
}

recreate_reads_back() { # FS MODE
    local name=$1-$2 id dm
    id=$(volume_handle "$name") || return 1
    dm=$(dm_of "$id")
    check "pod w-$name deleted" pod_gone "w-$name" || return 1
    # The kubelet unpublishes and unstages after the pod object is gone.
    check "NodeUnstage removed the dm stack of $id" wait_for 120 "dm devices of $id removed" \
        sh -c "! dmsetup info $dm && ! dmsetup info $dm-integrity" || return 1
    check "no loop device holds the backing file" sh -c "! losetup -j $(backing_file "$id") | grep -q ." || return 1
    pod "r-$name" "$name" fs "true" || return 1
    check "pod r-$name is Ready" pod_ready "r-$name" || return 1
    check "NodeStage rebuilt the dm stack" dm_open "$id" || return 1
    check "the new pod reads back what the first wrote" in_pod "r-$name" sh -c "$READ_DATA" || return 1
}

raw_block() { # MODE
    local name=block-$1 id dm
    pvc "$name" sealcsi-ext4 64Mi Block || return 1
    pod "w-$name" "$name" block "head -c 4194304 /dev/urandom >/tmp/r; \
i=0; while [ \$i -lt 2048 ]; do echo $MARKER; i=\$((i+1)); done >>/tmp/r; \
dd if=/tmp/r of=/dev/sealed bs=1M conv=fsync 2>/dev/null; sha256sum </tmp/r >/tmp/sum" || return 1
    check "raw block pod is Ready" pod_ready "w-$name" 240 || return 1
    id=$(volume_handle "$name") || return 1
    drop_caches
    check "the block device reads back what was written" in_pod "w-$name" sh -c \
        'n=$(stat -c %s /tmp/r); [ "$(head -c $n /dev/sealed | sha256sum)" = "$(cat /tmp/sum)" ]' || return 1
    dm=$(dm_of "$id")
    check "the pod's device is the dm-crypt mapping of $id" sh -c "dmsetup table $dm | grep -qw crypt" || return 1
    echo "usable size of the device: $(blockdev --getsize64 "/dev/mapper/$dm") bytes (asked: 67108864)"
    check "it offers at least the 64 MiB the PVC asked for" test "$(blockdev --getsize64 "/dev/mapper/$dm")" -ge 67108864 || return 1
    check "the backing file holds no plaintext" no_plaintext "$(backing_file "$id")" || return 1
}

online_expansion() { # FS MODE: grows the PVC the r- pod uses, while it runs
    local name=$1-$2 before after
    before=$(in_pod "r-$name" df -k /data | awk 'NR==2 {print $2}') || return 1
    check "PVC $name patched to 512Mi" k -n $NS patch pvc "$name" -p '{"spec":{"resources":{"requests":{"storage":"512Mi"}}}}' || return 1
    check "PVC capacity becomes 512Mi (csi-resizer, then the kubelet's NodeExpand)" wait_for 180 "PVC capacity 512Mi" \
        sh -c "[ \"\$(kubectl -n $NS get pvc $name -o jsonpath='{.status.capacity.storage}')\" = 512Mi ]" || return 1
    after=$(in_pod "r-$name" df -k /data | awk 'NR==2 {print $2}') || return 1
    echo "filesystem size before ${before} KiB, after ${after} KiB"
    check "the running pod sees the grown filesystem" test "$after" -gt $((before * 3 / 2)) || return 1
    check "the data is intact after the expansion" in_pod "r-$name" sh -c "$READ_DATA" || return 1
}

delete_erases() { # MODE: deletes this mode's pods and PVCs
    local mode=$1 name ids=() pvs=() id pv
    for name in ext4-$mode xfs-$mode block-$mode; do
        id=$(volume_handle "$name") && pv=$(pv_of "$name") || return 1
        ids+=("$id") pvs+=("$pv")
    done
    k -n $NS delete pod "r-ext4-$mode" "r-xfs-$mode" "w-block-$mode" --wait=true --timeout=120s || return 1
    k -n $NS delete pvc "ext4-$mode" "xfs-$mode" "block-$mode" --wait=true --timeout=120s || return 1
    for pv in "${pvs[@]}"; do
        check "PV $pv deleted" wait_for 120 "PV $pv deleted" sh -c "! kubectl get pv $pv >/dev/null 2>&1" || return 1
    done
    for id in "${ids[@]}"; do
        check "the ciphertext of $id is gone: $(backing_file "$id")" sh -c "[ ! -e $(backing_file "$id") ]" || return 1
        if [ "$BACKEND" = local ]; then
            check "the record of $id is gone" test ! -e "$STATE/volumes/$id.json" || return 1
            check "the plugin crypto-erased $id before removing it" sh -c "plugin_logs | grep 'crypto-erased' | grep -q $id" || return 1
        fi
    done
}

plugin_logs() { # the node plugin's log, in either mode
    if [ -s "$LOGS/sealcsi-plugin.log" ]; then cat "$LOGS/sealcsi-plugin.log"; fi
    kubectl -n sealcsi logs daemonset/sealcsi-node -c sealcsi 2>/dev/null
}
export -f plugin_logs
export LOGS

# --- 7: the node plugin restarted under a running pod ------------------------------------------------
plugin_restart() {
    local id
    pvc restart sealcsi-ext4 128Mi || return 1
    pod w-restart restart fs "$WRITE_DATA" || return 1
    check "pod w-restart is Ready" pod_ready w-restart 240 || return 1
    id=$(volume_handle restart) || return 1
    kill -KILL "$PLUGIN_PID"
    wait "$PLUGIN_PID" 2>/dev/null
    check "the pod reads its data while the plugin is down" in_pod w-restart sh -c "$READ_DATA" || return 1
    rm -f "$PLUGIN_DIR/csi.sock"
    start_plugin || return 1
    check "the pod still reads its data after the restart" in_pod w-restart sh -c "$READ_DATA" || return 1
    check "pod w-restart deleted (unstaged by the restarted plugin)" pod_gone w-restart || return 1
    check "the dm stack is gone" wait_for 120 "dm devices of $id removed" sh -c "! dmsetup info sealcsi-$id" || return 1
    pod r-restart restart fs "true" || return 1
    check "a new pod after the restart is Ready" pod_ready r-restart || return 1
    check "and reads the data back" in_pod r-restart sh -c "$READ_DATA" || return 1
    k -n $NS delete pod r-restart --wait=true --timeout=120s && k -n $NS delete pvc restart --wait=true || return 1
}

# --- 9: the host flips data blocks under a running pod -------------------------------------------------
tamper_is_reported() {
    local id file
    pvc tamper sealcsi-ext4 128Mi || return 1
    pod w-tamper tamper fs "head -c 33554432 /dev/urandom >/data/big; sync" || return 1
    check "pod w-tamper is Ready" pod_ready w-tamper 240 || return 1
    id=$(volume_handle tamper) || return 1
    file=$(backing_file "$id")
    drop_caches
    # The host's move: one byte flipped every 64 KiB of the file's allocated data past its header.
    check "bytes flipped in the backing file" python3 - "$file" <<'EOF' || return 1
import os, sys
fd = os.open(sys.argv[1], os.O_RDWR)
size, pos, flipped = os.fstat(fd).st_size, 1 << 20, 0
while pos < size:
    try:
        pos = os.lseek(fd, pos, os.SEEK_DATA)
    except OSError:
        break
    end = os.lseek(fd, pos, os.SEEK_HOLE)
    for off in range(pos, end, 65536):
        b = os.pread(fd, 1, off)
        os.pwrite(fd, bytes([b[0] ^ 0x55]), off)
        flipped += 1
    pos = end
os.fsync(fd)
print(f"flipped {flipped} bytes")
EOF
    drop_caches
    check "the pod's read of the tampered file fails" sh -c "! kubectl -n $NS exec w-tamper -- cat /data/big >/dev/null 2>/tmp/tamper-read.err"
    cat /tmp/tamper-read.err
    check "the failure is an I/O error" grep -qi "i/o error" /tmp/tamper-read.err || return 1
    check "the kubelet reports VolumeConditionAbnormal on the pod" wait_for 120 "event VolumeConditionAbnormal" \
        sh -c "kubectl -n $NS get events --field-selector involvedObject.name=w-tamper,reason=VolumeConditionAbnormal -o name | grep -q ." || return 1
    k -n $NS get events --field-selector involvedObject.name=w-tamper,reason=VolumeConditionAbnormal \
        -o jsonpath='{.items[0].message}{"\n"}'
    k -n $NS delete pod w-tamper --wait=true --timeout=120s && k -n $NS delete pvc tamper --wait=true || return 1
}

# --- 10: udevd runs, and leaves sealcsi's devices alone --------------------------------------------------
udev_leaves_devices_alone() {
    if ! pgrep -x systemd-udevd >/dev/null; then
        SKIP_REASON="systemd-udevd is not installed (apt-get install udev)"
        return 1
    fi
    pvc udev sealcsi-ext4 128Mi || return 1
    pod w-udev udev fs "true" || return 1
    check "pod w-udev is Ready" pod_ready w-udev 240 || return 1
    udevadm settle -t 30
    local id dev props
    id=$(volume_handle udev) || return 1
    for dev in "sealcsi-$id" "sealcsi-$id-integrity"; do
        props=$(udevadm info --query=property --name="/dev/mapper/$dev" 2>&1 || udevadm info --query=property \
            --path="/sys/block/$(basename "$(readlink -f "/dev/mapper/$dev")")")
        echo "$dev: $props" | grep -E 'DM_NAME|DM_UDEV|ID_FS' 
        check "$dev carries DM_UDEV_DISABLE_DISK_RULES_FLAG=1" grep -q DM_UDEV_DISABLE_DISK_RULES_FLAG=1 <<<"$props" || return 1
        check "$dev carries DM_UDEV_DISABLE_OTHER_RULES_FLAG=1" grep -q DM_UDEV_DISABLE_OTHER_RULES_FLAG=1 <<<"$props" || return 1
        check "udev did not probe $dev (no ID_FS_TYPE)" sh -c "! grep -q '^ID_FS_TYPE=' <<<'$props'" || return 1
    done
    check "no AEAD or integrity errors in the kernel log so far" sh -c "! dmesg | grep -Eqi 'AEAD ERROR|Checksum failed'" || return 1
    k -n $NS delete pod w-udev --wait=true --timeout=120s && k -n $NS delete pvc udev --wait=true || return 1
}

# --- 8: the same flow stacked over the reference hostpath driver ----------------------------------------
stacked_over_hostpath() {
    if [ ! -x /run/e2e-bin/hostpathplugin ]; then
        SKIP_REASON="SEALCSI_BACKEND_HOSTPATH is not set (the kubernetes-csi hostpath driver binary)"
        return 1
    fi
    check "sealcsi stacked over hostpath, as processes" start_stacked_processes || return 1
    BACKEND=stacked
    run_scenarios_against stacked
    BACKEND=local
    stop_driver_processes
    grep -q $'^[2-6]/stacked\tFAIL' "$RUN/results.tsv" && return 1
    return 0
}

# --- 11: deploy/'s DaemonSet, scenarios 2-6 against it -----------------------------------------------
deployed_daemonset() {
    check "kubectl apply -k deploy/ and the DaemonSet rolls out" deploy_daemonset || return 1
    check "the plugin container runs the imported sealcsi image" sh -c \
        "kubectl -n sealcsi get pods -o jsonpath='{.items[0].spec.containers[0].image}' | grep -q sealcsi" || return 1
    check "the DaemonSet's provisioner publishes CSIStorageCapacity" wait_for 60 "CSIStorageCapacity" \
        sh -c "kubectl -n sealcsi get csistoragecapacity -o name | grep -q ." || return 1
    run_scenarios_against daemonset
    grep -q $'^[2-6]/daemonset\tFAIL' "$RUN/results.tsv" && return 1
    return 0
}

# --- 12: nothing left on the node ---------------------------------------------------------------------
node_left_clean() {
    check "no PersistentVolumes left" sh -c "[ -z \"\$(kubectl get pv -o name)\" ]" || return 1
    check "no sealcsi device-mapper devices left" sh -c "! dmsetup ls | grep -q '^sealcsi-'" || return 1
    check "no loop devices on sealcsi's state dir" sh -c "! losetup -a | grep -q $STATE" || return 1
    check "no volume files left" sh -c "[ -z \"\$(ls $STATE/volumes 2>/dev/null)\" ]" || return 1
    check "no kubelet mounts of sealcsi volumes left" sh -c "! grep -q 'kubernetes.io/csi/sealcsi.io' /proc/mounts" || return 1
}
