# shellcheck shell=bash
# The e2e scenarios (docs/e2e.md), sourced by tests/e2e/run.sh on the host. Each asserts what Kubernetes
# reports (kubectl against the API server) and what is on the node (through the node's agent:
# `node SCRIPT` runs SCRIPT there with tests/e2e/node-lib.sh's functions). A scenario is a function that
# returns non-zero at its first failed check, after saying which.

NS=e2e
MARKER=sealcsi-e2e-plaintext-$RANDOM$RANDOM-marker
FAILED=0
# Which driver instance a scenario talks to: processes (7, 9, 10, and 2-6 when named), daemonset (11) or
# stacked (8). The three passes run side by side as three drivers of the node (node-lib.sh, for_backend).
INSTANCE=processes
BACKEND=local   # or stacked (8): how the node finds a volume's devices and ciphertext
PROCESSES_DRIVER=processes.sealcsi.io
STACKED_DRIVER=stacked.sealcsi.io

# run_scenario ID FUNCTION [ARGS...]: run it unless SCENARIOS names others; record the result.
run_scenario() {
    local id=$1 fn=$2 t=$SECONDS result detail logfile args
    shift 2
    # Scenario 1 (deploy/'s objects) is what every other one stands on: it always runs.
    # Scenarios inside a selected one (2-6 of 8 and 11) run with it.
    if [ "$id" != 1 ] && [ -z "${INSIDE_SELECTED:-}" ] && [ -n "${SCENARIOS// /}" ] &&
        ! [[ " $SCENARIOS " == *" ${id%%/*} "* ]]; then
        return 0
    fi
    note "scenario $id: $fn $*"
    args="$*"
    logfile=$RUN/logs/scenario-${id//\//-}-$fn${args:+-${args// /-}}.log
    SKIP_REASON=
    if "$fn" "$@" >"$logfile" 2>&1; then
        result=PASS detail=
    elif [ -n "$SKIP_REASON" ]; then
        result=SKIP detail=$SKIP_REASON
    else
        result=FAIL detail="see logs/${logfile##*/}: $(tail -n 1 "$logfile")"
        FAILED=1
    fi
    note "scenario $id: $result${detail:+ ($detail)} in $((SECONDS - t))s"
    printf '%s\t%s\t%s\t%s\n' "$id" "$result" $((SECONDS - t)) "$fn $*${detail:+ - $detail}" >>"$RUN/results.tsv"
}

# run_together "ID FUNCTION ARGS..." ...: the scenarios at once, each recording its own result (the run's
# outcome is read from results.tsv, since a background job cannot set FAILED).
run_together() {
    local spec pids=()
    for spec in "$@"; do
        # shellcheck disable=SC2086 # the words of a spec are the scenario's arguments
        run_scenario $spec &
        pids+=($!)
    done
    wait "${pids[@]}"
}
any_failed() { grep -q $'^[^\t]*\tFAIL\t' "$RUN/results.tsv" 2>/dev/null; }

check() { # check DESCRIPTION CMD...: a named assertion
    local what=$1
    shift
    if "$@"; then echo "ok: $what"; else echo "FAILED: $what"; return 1; fi
}
k() { in_ns "$KUBECTL" --kubeconfig "$RUN/admin.kubeconfig" --request-timeout=60s "$@"; }
kq() { k "$@" >/dev/null 2>&1; }   # quiet, for wait_for
jp() { k "${@:1:$#-1}" -o jsonpath="${!#}"; } # jp ARGS... JSONPATH

# node SCRIPT: run SCRIPT on the node (tests/e2e/agent.py); its output is printed, its status returned.
node() {
    local reply rc
    reply=$(printf 'INSTANCE=%s; for_backend\n%s\n' "$INSTANCE" "$1" |
        in_ns curl -sS --max-time 960 --data-binary @- "http://$NODE_IP:7000/run") || {
        echo "the node's agent did not answer"
        return 125
    }
    rc=${reply%%$'\n'*}
    [ "$reply" = "$rc" ] || printf '%s\n' "${reply#*$'\n'}"
    return "$rc"
}
nodeq() { node "$1" >/dev/null 2>&1; }

# --- objects ------------------------------------------------------------------------------------------
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

pod() { # pod NAME PVC fs|block SCRIPT: runs SCRIPT, is Ready once it is done, then sleeps
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
      # An exec in the user-mode Linux node takes 1-3 s: with the default 1 s timeout every probe timed
      # out for a minute after the script was done (measured: Ready 44 s after the container started).
      readinessProbe: {exec: {command: [test, -e, /tmp/ready]}, periodSeconds: 2, timeoutSeconds: 20}
  volumes:
    - name: v
      persistentVolumeClaim: {claimName: $2}
EOF
}

pod_ready() { k -n $NS wait --for=condition=Ready "pod/$1" --timeout="${2:-180}s"; }
pod_gone() { k -n $NS delete pod "$1" --wait=true --timeout=300s; }
drop_claim() { pod_gone "$1" && k -n $NS delete pvc "$2" --wait=true --timeout=300s; } # drop_claim POD PVC
in_pod() { local p=$1; shift; k -n $NS exec "$p" -- "$@"; }
# in_pod_read POD CMD...: a command that only reads, tried up to 3 times: on a loaded node an exec stream
# can time out (kubectl's "i/o timeout"), which says nothing about the volume.
in_pod_read() {
    local try
    for try in 1 2 3; do
        in_pod "$@" && return 0
        echo "(attempt $try of 3 failed)" >&2
        [ $try = 3 ] || sleep 5
    done
    return 1
}
pv_of() { jp -n $NS get pvc "$1" '{.spec.volumeName}'; }
volume_handle() { local pv; pv=$(pv_of "$1") && jp get pv "$pv" '{.spec.csi.volumeHandle}'; }
has_event() { # has_event OBJECT REASON
    [ -n "$(k -n $NS get events --field-selector "involvedObject.name=$1,reason=$2" -o name 2>/dev/null)" ]
}
driver_name() {
    case $INSTANCE in stacked) echo $STACKED_DRIVER ;; daemonset) echo sealcsi.io ;; *) echo $PROCESSES_DRIVER ;; esac
}
storage_class() { # FS
    case $INSTANCE in stacked) echo "sealcsi-stacked-$1" ;; daemonset) echo "sealcsi-$1" ;; *) echo "sealcsi-processes-$1" ;; esac
}
# renamed_objects DRIVER PREFIX: deploy/'s CSIDriver and StorageClasses for another instance of the driver.
renamed_objects() {
    sed -e "s/^  name: sealcsi\.io$/  name: $1/" "$REPO/deploy/csidriver.yaml"
    echo ---
    sed -e "s/^provisioner: sealcsi\.io$/provisioner: $1/" -e "s/^  name: sealcsi-/  name: $2/" \
        "$REPO/deploy/storageclasses.yaml"
}
driver_registered() { jp get csinode "$NODE_NAME" '{.spec.drivers[*].name}' 2>/dev/null | tr ' ' '\n' | grep -qx "$(driver_name)"; }

WRITE_DATA="set -e; D=\${DIR:-/data}; head -c 4194304 /dev/urandom >\$D/random; \
i=0; while [ \$i -lt 2048 ]; do echo $MARKER; i=\$((i+1)); done >\$D/marker; \
dd if=\$D/random of=\$D/random.copy bs=1M conv=fsync 2>/dev/null; sync; \
sha256sum \$D/random \$D/marker >\$D/sums; sync"
READ_DATA="set -e; cd /data; sha256sum -c sums; cmp random random.copy"

# --- the driver as processes on the node --------------------------------------------------------------
start_driver_processes() { # [PLUGIN ARGS...]
    local token
    token=$(k -n sealcsi create token sealcsi-node --duration=2h) || return 1
    local suffix=
    [ "$INSTANCE" = stacked ] && suffix=-stacked   # node-lib.sh's SUFFIX
    sed -e '/client-certificate-data/d' -e "s|client-key-data: .*|token: $token|" \
        "$RUN/admin.kubeconfig" >"$RUN/sealcsi-node$suffix.kubeconfig"
    node "start_plugin $* && start_sidecars" || return 1
    wait_for 90 "the kubelet to register $(driver_name)" driver_registered
}
stop_driver_processes() {
    node stop_driver || return 1
    wait_for 90 "the kubelet to unregister $(driver_name)" eval '! driver_registered'
}

# --- 1: deploy/'s cluster objects, as they are -------------------------------------------------------
apply_deploy_objects() {
    local f
    for f in namespace csidriver rbac storageclasses; do
        check "kubectl apply -f deploy/$f.yaml" k apply --validate=false -f "$REPO/deploy/$f.yaml" || return 1
    done
    check "CSIDriver sealcsi.io exists with storageCapacity" test "$(jp get csidriver sealcsi.io '{.spec.storageCapacity}')" = true || return 1
    check "StorageClasses sealcsi-ext4 and sealcsi-xfs exist" k get storageclass sealcsi-ext4 sealcsi-xfs || return 1
    check "ServiceAccount sealcsi-node exists" k -n sealcsi get serviceaccount sealcsi-node || return 1
    kq get namespace $NS || k create namespace $NS
    # Pods are admitted once the namespace's default ServiceAccount exists.
    wait_for 60 "the default ServiceAccount of $NS" kq -n $NS get serviceaccount default
}

# --- 2-6: the PVC lifecycle, against the process-mode driver and the DaemonSet ----------------------
# Claims of different names do not interfere: ext4, xfs and the raw block claim go at once (most of each
# scenario is waiting for the kubelet's and the sidecars' loops, not work).
run_scenarios_against() {
    local mode=$1
    run_together "2/$mode provision_write ext4 $mode" "2/$mode provision_write xfs $mode" "4/$mode raw_block $mode"
    run_together "3/$mode recreate_reads_back ext4 $mode" "3/$mode recreate_reads_back xfs $mode"
    run_scenario "5/$mode" online_expansion ext4 "$mode"
    run_scenario "6/$mode" delete_erases "$mode"
}

provision_write() { # FS MODE
    local fs=$1 name=$1-$2 id size=256Mi
    [ "$fs" = xfs ] && size=320Mi   # mkfs.xfs refuses filesystems under 300 MB
    pvc "$name" "$(storage_class "$fs")" "$size" || return 1
    check "PVC $name waits for its first consumer (the PV controller's event)" \
        wait_for 60 "event WaitForFirstConsumer" has_event "$name" WaitForFirstConsumer || return 1
    check "and is not bound yet" test "$(jp -n $NS get pvc "$name" '{.status.phase}')" = Pending || return 1
    pod "w-$name" "$name" fs "$WRITE_DATA" || return 1
    check "pod w-$name scheduled, volume provisioned, staged, published, data written" pod_ready "w-$name" 300 || return 1
    check "PVC $name is Bound" test "$(jp -n $NS get pvc "$name" '{.status.phase}')" = Bound || return 1
    id=$(volume_handle "$name") || return 1
    echo "volume id $id"
    check "the PV has node affinity to $NODE_NAME" pv_bound_to_node "$(pv_of "$name")" || return 1
    check "the pod's /data is $fs" pod_data_is "w-$name" "$fs" || return 1
    check "on the node: dm-crypt over dm-integrity" node "dm=\$(dm_of $id); dmsetup table \$dm | grep -qw crypt && dmsetup table \$dm-integrity | grep -qw integrity" || return 1
    check "on the node: the backing file holds no plaintext" node "test -e \$(backing_file $id) && no_plaintext $id $MARKER" || return 1
    check "the pod reads its data back" in_pod_read "w-$name" sh -c "$READ_DATA" || return 1
}

recreate_reads_back() { # FS MODE
    local name=$1-$2 id
    id=$(volume_handle "$name") || return 1
    check "pod w-$name deleted" pod_gone "w-$name" || return 1
    # The kubelet unpublishes and unstages after the pod object is gone.
    check "NodeUnstage removed both dm devices" wait_for 120 "the dm stack of $id removed" nodeq "stack_gone $id" || return 1
    check "and sealcsi holds nothing of its ciphertext (no loop or mount of it)" node "released $id" || return 1
    pod "r-$name" "$name" fs "true" || return 1
    check "pod r-$name is Ready" pod_ready "r-$name" || return 1
    check "NodeStage rebuilt the dm stack" node "stack_open $id" || return 1
    check "the new pod reads back what the first wrote" in_pod_read "r-$name" sh -c "$READ_DATA" || return 1
}

raw_block() { # MODE
    local name=block-$1 id
    pvc "$name" "$(storage_class ext4)" 64Mi Block || return 1
    pod "w-$name" "$name" block "head -c 4194304 /dev/urandom >/tmp/r; \
i=0; while [ \$i -lt 2048 ]; do echo $MARKER; i=\$((i+1)); done >>/tmp/r; \
dd if=/tmp/r of=/dev/sealed bs=1M conv=fsync 2>/dev/null; sha256sum </tmp/r >/tmp/sum" || return 1
    check "raw block pod is Ready" pod_ready "w-$name" 300 || return 1
    id=$(volume_handle "$name") || return 1
    nodeq drop_caches
    check "the block device reads back what was written" in_pod_read "w-$name" sh -c \
        'n=$(stat -c %s /tmp/r); [ "$(head -c $n /dev/sealed | sha256sum)" = "$(cat /tmp/sum)" ]' || return 1
    check "on the node: the pod's device is the dm-crypt mapping" node "dmsetup table \$(dm_of $id) | grep -qw crypt" || return 1
    node "echo usable size: \$(blockdev --getsize64 /dev/mapper/\$(dm_of $id)) bytes, asked 67108864"
    check "it offers at least the 64 MiB the PVC asked for" node "[ \$(blockdev --getsize64 /dev/mapper/\$(dm_of $id)) -ge 67108864 ]" || return 1
    check "on the node: the backing file holds no plaintext" node "no_plaintext $id $MARKER" || return 1
}

online_expansion() { # FS MODE: grows the PVC the r- pod uses, while it runs
    local name=$1-$2 before after
    before=$(in_pod_read "r-$name" df -P -k /data | awk 'NR==2 {print $2}') || return 1
    check "PVC $name patched to 512Mi" k -n $NS patch pvc "$name" -p '{"spec":{"resources":{"requests":{"storage":"512Mi"}}}}' || return 1
    if [ "$BACKEND" = stacked ]; then
        # The reference hostpath driver only records a block volume's new size (its ControllerExpandVolume
        # does not grow the file): sealcsi must say so, never report a size the volume does not have.
        # The kubelet (v1.36) logs a failed NodeExpandVolume and retries it; it posts no event for it.
        check "the kubelet's NodeExpandVolume got sealcsi's refusal: the backend's device did not grow" wait_for 240 \
            "the refusal in the kubelet's log" grep -q 'NodeExpand failed.*did not grow enough' "$RUN/logs/kubelet.log" || return 1
        grep -m1 'did not grow enough' "$RUN/logs/kubelet.log"
        echo "PVC resize status: $(jp -n $NS get pvc "$name" '{.status.allocatedResourceStatuses}')"
        check "and the PVC's capacity is not 512Mi" test "$(jp -n $NS get pvc "$name" '{.status.capacity.storage}')" != 512Mi || return 1
        check "the data is intact" in_pod_read "r-$name" sh -c "$READ_DATA" || return 1
        return 0
    fi
    check "PVC capacity becomes 512Mi (csi-resizer, then the kubelet's NodeExpand)" wait_for 240 "PVC capacity 512Mi" \
        eval "[ \"\$(jp -n $NS get pvc $name '{.status.capacity.storage}')\" = 512Mi ]" || return 1
    after=$(in_pod_read "r-$name" df -P -k /data | awk 'NR==2 {print $2}') || return 1
    echo "filesystem size before ${before} KiB, after ${after} KiB"
    check "the running pod sees the grown filesystem" test "$after" -gt $((before * 3 / 2)) || return 1
    check "the data is intact after the expansion" in_pod_read "r-$name" sh -c "$READ_DATA" || return 1
}

delete_erases() { # MODE: deletes this mode's pods and PVCs
    local mode=$1 name ids=() pvs=() pvcs=() id pv
    # This mode's claims (those the scenarios that ran made).
    for name in ext4-$mode xfs-$mode block-$mode; do
        kq -n $NS get pvc "$name" || continue
        id=$(volume_handle "$name") && pv=$(pv_of "$name") || return 1
        ids+=("$id") pvs+=("$pv") pvcs+=("$name")
    done
    [ ${#pvcs[@]} -gt 0 ] || { echo "no claims of $mode to delete"; return 1; }
    k -n $NS delete pod --ignore-not-found "r-ext4-$mode" "r-xfs-$mode" "w-ext4-$mode" "w-xfs-$mode" \
        "w-block-$mode" --wait=true --timeout=300s || return 1
    k -n $NS delete pvc "${pvcs[@]}" --wait=true --timeout=300s || return 1
    for pv in "${pvs[@]}"; do
        check "PV $pv deleted" wait_for 180 "PV $pv deleted" eval "! kq get pv $pv" || return 1
    done
    for id in "${ids[@]}"; do
        check "on the node: the ciphertext of $id is gone" node "[ ! -e \$(backing_file $id) ]" || return 1
        if [ "$BACKEND" = local ]; then
            check "on the node: the record of $id is gone" node "[ ! -e \$STATE/volumes/$id.json ]" || return 1
            check "the plugin crypto-erased $id before removing it" plugin_erased "$id" || return 1
        fi
    done
}

pv_bound_to_node() { jp get pv "$1" '{.spec.nodeAffinity.required}' | grep -q "$NODE_NAME"; }
pod_data_is() { in_pod "$1" cat /proc/mounts | grep ' /data ' | grep -qw "$2"; }
plugin_erased() { # (not a pipeline into grep -q: with pipefail, the writer's SIGPIPE would fail it)
    local logs
    logs=$(plugin_logs)
    grep crypto-erased <<<"$logs" | grep -q "$1"
}
daemonset_runs_image() { jp -n sealcsi get pods '{.items[0].status.containerStatuses[*].image}' | grep -q "$1"; }

plugin_logs() { # the node plugin's log, in either mode
    cat "$RUN/logs/sealcsi-plugin.log" "$RUN/logs/sealcsi-plugin-stacked.log" 2>/dev/null
    k -n sealcsi logs daemonset/sealcsi-node -c sealcsi 2>/dev/null
    return 0
}

# --- 7: the node plugin killed under a running pod ------------------------------------------------------
plugin_restart() {
    local id
    pvc restart "$(storage_class ext4)" 128Mi || return 1
    pod w-restart restart fs "$WRITE_DATA" || return 1
    check "pod w-restart is Ready" pod_ready w-restart 300 || return 1
    id=$(volume_handle restart) || return 1
    check "the plugin is killed (SIGKILL)" node kill_plugin || return 1
    check "the pod reads its data while the plugin is down" in_pod_read w-restart sh -c "$READ_DATA" || return 1
    check "the plugin is started again (and the sidecars that exited with it)" node "start_plugin && start_sidecars" || return 1
    check "the pod still reads its data after the restart" in_pod_read w-restart sh -c "$READ_DATA" || return 1
    check "pod w-restart deleted" pod_gone w-restart || return 1
    check "the restarted plugin unstaged it" wait_for 120 "the dm stack of $id removed" nodeq "stack_gone $id" || return 1
    pod r-restart restart fs "true" || return 1
    check "a new pod after the restart is Ready" pod_ready r-restart || return 1
    check "and reads the data back" in_pod_read r-restart sh -c "$READ_DATA" || return 1
    drop_claim r-restart restart || return 1
}

# --- 9: the host flips bytes of a running pod's ciphertext ---------------------------------------------
tamper_is_reported() {
    local id
    pvc tamper "$(storage_class ext4)" 128Mi || return 1
    pod w-tamper tamper fs "head -c 33554432 /dev/urandom >/data/big; sync" || return 1
    check "pod w-tamper is Ready" pod_ready w-tamper 300 || return 1
    id=$(volume_handle tamper) || return 1
    # The host's move: one byte flipped every 64 KiB of the file's data past its first MiB.
    check "on the node: bytes flipped in the ciphertext" node "drop_caches; python3 \$E2E_REPO/tests/e2e/flip.py \$(backing_file $id); drop_caches" || return 1
    check "the pod's read of the tampered file fails" eval "! in_pod w-tamper cat /data/big >/dev/null 2>$RUN/logs/tamper-read.err"
    cat "$RUN/logs/tamper-read.err"
    check "with an I/O error (EIO)" grep -qiE "input/output error|i/o error" "$RUN/logs/tamper-read.err" || return 1
    check "the kubelet reports VolumeConditionAbnormal on the pod" \
        wait_for 180 "event VolumeConditionAbnormal" has_event w-tamper VolumeConditionAbnormal || return 1
    k -n $NS get events --field-selector involvedObject.name=w-tamper,reason=VolumeConditionAbnormal \
        -o jsonpath='{.items[0].message}{"\n"}'
    drop_claim w-tamper tamper || return 1
}

# --- 10: udevd runs on the node, and leaves sealcsi's devices alone --------------------------------------
udev_leaves_devices_alone() {
    if ! nodeq "pgrep -x systemd-udevd"; then
        SKIP_REASON="systemd-udevd does not run on the node (apt-get install udev)"
        return 1
    fi
    pvc udev "$(storage_class ext4)" 128Mi || return 1
    pod w-udev udev fs "true" || return 1
    check "pod w-udev is Ready" pod_ready w-udev 300 || return 1
    local id dev
    id=$(volume_handle udev) || return 1
    node "udevadm settle -t 30"
    for dev in "sealcsi-$id" "sealcsi-$id-integrity"; do
        node "udevadm info --query=property --name=/dev/mapper/$dev" >"$RUN/logs/udev-$dev.txt" 2>&1
        grep -E 'DM_NAME|DM_UDEV|ID_FS' "$RUN/logs/udev-$dev.txt"
        check "$dev carries DM_UDEV_DISABLE_DISK_RULES_FLAG=1" grep -q '^DM_UDEV_DISABLE_DISK_RULES_FLAG=1' "$RUN/logs/udev-$dev.txt" || return 1
        check "$dev carries DM_UDEV_DISABLE_OTHER_RULES_FLAG=1" grep -q '^DM_UDEV_DISABLE_OTHER_RULES_FLAG=1' "$RUN/logs/udev-$dev.txt" || return 1
        check "udev did not probe $dev (no ID_FS_TYPE)" eval "! grep -q '^ID_FS_TYPE=' $RUN/logs/udev-$dev.txt" || return 1
    done
    check "no AEAD or integrity errors in the node's kernel log so far" node "! dmesg | grep -Eqi 'AEAD ERROR|Checksum failed'" || return 1
    drop_claim w-udev udev || return 1
}

# --- 8: the same flow stacked over the reference hostpath driver ----------------------------------------
stacked_over_hostpath() {
    # Decided here, where the binary was given: a failed request to the node is a failure, not a skip.
    if [ ! -x "$RUN/bin/hostpathplugin" ]; then
        SKIP_REASON="SEALCSI_BACKEND_HOSTPATH is not set (the kubernetes-csi hostpath driver binary)"
        return 1
    fi
    # Its own CSIDriver and StorageClasses: deploy/'s, renamed to the stacked instance's driver name.
    INSTANCE=stacked BACKEND=stacked
    check "CSIDriver $STACKED_DRIVER and StorageClasses sealcsi-stacked-ext4/xfs (deploy/'s, renamed)" \
        eval 'renamed_objects $STACKED_DRIVER sealcsi-stacked- | k apply --validate=false -f -' || return 1
    check "the hostpath driver runs on the node" node start_hostpath || return 1
    check "sealcsi stacked over it, as $STACKED_DRIVER, with the sidecars" \
        start_driver_processes --backend "csi:unix:///var/lib/sealcsi-backend/hostpath.sock" || return 1
    INSIDE_SELECTED=1
    run_scenarios_against stacked
    INSIDE_SELECTED=
    stop_driver_processes
    renamed_objects $STACKED_DRIVER sealcsi-stacked- | k delete --wait=true -f - >/dev/null
    ! grep -q $'^[2-6]/stacked\tFAIL' "$RUN/results.tsv"
}

# --- 11: deploy/'s DaemonSet, scenarios 2-6 against it -----------------------------------------------
deployed_daemonset() {
    INSTANCE=daemonset
    check "kubectl apply -k (deploy/ with the sim sealing source)" k apply --validate=false -k "$E2E_DIR/deploy-sim" || return 1
    check "the DaemonSet rolls out" k -n sealcsi rollout status daemonset/sealcsi-node --timeout=300s || return 1
    check "the kubelet registers sealcsi.io" wait_for 90 "sealcsi.io registered" driver_registered || return 1
    check "the plugin container runs the imported sealcsi image" daemonset_runs_image sealcsi:latest || return 1
    # Owned by the DaemonSet (--capacity-ownerref-level=1): not the objects of a process-mode provisioner.
    check "its provisioner publishes CSIStorageCapacity" wait_for 90 "CSIStorageCapacity of the DaemonSet" \
        eval "jp -n sealcsi get csistoragecapacity '{.items[*].metadata.ownerReferences[*].kind}' | grep -qw DaemonSet" || return 1
    INSIDE_SELECTED=1
    run_scenarios_against daemonset
    INSIDE_SELECTED=
    ! grep -q $'^[2-6]/daemonset\tFAIL' "$RUN/results.tsv"
}

remove_daemonset() {
    INSTANCE=daemonset
    k -n sealcsi delete daemonset/sealcsi-node --wait=true --timeout=180s || return 1
    check "the kubelet unregisters sealcsi.io" wait_for 120 "sealcsi.io unregistered" eval '! driver_registered'
}

# --- 12: nothing left ----------------------------------------------------------------------------------
node_left_clean() {
    check "no PersistentVolumes left" test -z "$(k get pv -o name)" || return 1
    check "on the node: no sealcsi device-mapper devices" node "! dmsetup ls | grep -q '^sealcsi-'" || return 1
    check "on the node: no loop devices over sealcsi's state" node "! losetup -a | grep -q /var/lib/sealcsi" || return 1
    check "on the node: no volume files" node "left=\$(ls /var/lib/sealcsi/volumes /var/lib/sealcsi-processes/volumes /var/lib/sealcsi-stacked/volumes 2>/dev/null | grep -v -e '^/' -e '^\$'); [ -z \"\$left\" ] || { echo \"left: \$left\"; false; }" || return 1
    check "on the node: no stacked volume left staged" node "[ -z \"\$(ls /var/lib/sealcsi-stacked/stacked 2>/dev/null)\" ]" || return 1
    check "on the node: no kubelet mounts of sealcsi volumes" node "! grep -Eq 'kubernetes.io/csi/([a-z]+\.)?sealcsi.io' /proc/mounts" || return 1
}

# The process-mode driver's pass: 7, 10 and 9 (and 2-6 when named), with its own CSIDriver and
# StorageClasses (deploy/'s, renamed). Runs in the background: its results go to results.tsv.
process_mode_pass() {
    INSTANCE=processes BACKEND=local
    if ! renamed_objects $PROCESSES_DRIVER sealcsi-processes- | k apply --validate=false -f - >/dev/null ||
        ! start_driver_processes; then
        note "the process-mode driver did not start"
        printf '%s\t%s\t%s\t%s\n' processes FAIL 0 "the process-mode driver did not start" >>"$RUN/results.tsv"
        return
    fi
    if [ -n "${SCENARIOS// /}" ]; then run_scenarios_against processes; fi
    run_scenario 7 plugin_restart
    # 10 before 9: 10 checks that the kernel log has no AEAD errors, and 9 makes some.
    run_scenario 10 udev_leaves_devices_alone
    run_scenario 9 tamper_is_reported
    if ! stop_driver_processes; then
        printf '%s\t%s\t%s\t%s\n' processes FAIL 0 "the process-mode driver did not stop" >>"$RUN/results.tsv"
    fi
    renamed_objects $PROCESSES_DRIVER sealcsi-processes- | k delete --wait=true -f - >/dev/null
}

# The whole run, in order.
run_all_scenarios() {
    run_scenario 1 apply_deploy_objects
    # Three drivers of the node at once, as a cluster with several drivers has them: the process-mode one
    # (7, 10, 9), deploy/'s DaemonSet with 2-6 (11) and the stacked one with 2-6 (8). Most of each pass is
    # waiting for the kubelet's and the sidecars' loops. A whole run takes 2-6 through the DaemonSet and
    # stacked, the driver as a cluster runs it; against the process-mode driver only when named (the
    # quick way to iterate on one).
    process_mode_pass &
    local processes=$!
    run_together "11 deployed_daemonset" "8 stacked_over_hostpath"
    wait $processes
    run_scenario 11/remove remove_daemonset
    run_scenario 12 node_left_clean
    if any_failed; then FAILED=1; fi
}
