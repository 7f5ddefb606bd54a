# shellcheck shell=bash
# What the host's scenarios run on the e2e node (tests/e2e/agent.py sources this for every request):
# the driver's processes and the node-side checks. Processes are remembered in /run/e2e/*.pid, since
# every request is a new shell.

# shellcheck source=/dev/null
. "$E2E_RUN/e2e.env"
RUN=$E2E_RUN
LOGS=$RUN/logs
BACKEND_DIR=/var/lib/sealcsi-backend
HOSTPATH_STATE=/scratch/hostpath
PIDS=/run/e2e
export PATH=/run/e2e-bin:$PATH
mkdir -p "$PIDS"
# shellcheck source=tests/e2e/lib.sh
. "$E2E_REPO/tests/e2e/lib.sh"

# for_backend: the driver instance INSTANCE names (the host's node() calls it first in every request).
# The three passes run side by side, as three drivers of one node, each with its own name, kubelet
# plugin dir, state dir, processes and logs: deploy/'s DaemonSet (daemonset) keeps sealcsi.io, the
# process-mode driver of 7, 9 and 10 (processes) and the stacked one of 8 (stacked) have names of their own.
# BACKEND (local or stacked): how a volume's devices and ciphertext are found.
for_backend() {
    case ${INSTANCE:-processes} in
        stacked) DRIVER=stacked.sealcsi.io STATE=/var/lib/sealcsi-stacked SUFFIX=-stacked BACKEND=stacked ;;
        daemonset) DRIVER=sealcsi.io STATE=/var/lib/sealcsi SUFFIX=-daemonset BACKEND=local ;;
        *) DRIVER=processes.sealcsi.io STATE=/var/lib/sealcsi-processes SUFFIX='' BACKEND=local ;;
    esac
    PLUGIN_DIR=/var/lib/kubelet/plugins/$DRIVER
}
for_backend

# spawn NAME LOG CMD...: start CMD in the background, detached from this request's shell.
spawn() {
    local name=$1 log=$2
    shift 2
    setsid "$@" </dev/null >>"$log" 2>&1 &
    echo $! >"$PIDS/$name.pid"
}

alive() { [ -e "/proc/$1" ] && ! grep -q '^[0-9]* (.*) Z' "/proc/$1/stat" 2>/dev/null; }

stop() { # stop NAME...: SIGTERM, then wait for it to go
    local name pid
    for name in "$@"; do
        [ -s "$PIDS/$name.pid" ] || continue
        pid=$(cat "$PIDS/$name.pid")
        kill "$pid" 2>/dev/null
        wait_for 30 "$name to stop" eval "! alive $pid" || kill -KILL "$pid" 2>/dev/null
        rm -f "$PIDS/$name.pid"
    done
}

# start_plugin [ARGS...]: sealcsi's plugin as the node's CSI driver, with the simulated sealing source.
start_plugin() {
    rm -f "$PLUGIN_DIR/csi.sock"
    mkdir -p "$PLUGIN_DIR"
    SEALCSI_TEE=sim SEALCSI_STATE_DIR=$STATE SEALCSI_LOG=info spawn "plugin$SUFFIX" "$LOGS/sealcsi-plugin$SUFFIX.log" \
        sealcsi plugin --endpoint "unix://$PLUGIN_DIR/csi.sock" --node-id "$E2E_NODE_NAME" --mode all \
        --driver-name "$DRIVER" "$@"
    wait_for 60 "the plugin's socket" test -S "$PLUGIN_DIR/csi.sock"
}

kill_plugin() { # what a crash does: no cleanup at all
    kill -KILL "$(cat "$PIDS/plugin$SUFFIX.pid")" && rm -f "$PIDS/plugin$SUFFIX.pid" || return 1
    # csi-provisioner exits when it loses the plugin's connection (in a pod the kubelet restarts it;
    # csi-resizer and the registrar reconnect): wait for that, so that start_sidecars finds it gone.
    wait_for 180 "csi-provisioner to notice" eval "! running provisioner$SUFFIX"
}

running() { [ -s "$PIDS/$1.pid" ] && alive "$(cat "$PIDS/$1.pid")"; }

# start_sidecars: deploy/node.yaml's sidecars, as deploy/'s ServiceAccount (the host wrote its kubeconfig).
# Starts those not running: a sidecar exits when it loses the plugin's socket (the plugin restarted), and
# in a pod the kubelet would restart it; here this does.
start_sidecars() {
    mkdir -p /var/lib/kubelet/plugins_registry
    local sc=(--kubeconfig="$RUN/sealcsi-node$SUFFIX.kubeconfig" --csi-address="$PLUGIN_DIR/csi.sock" --v=2)
    # --timeout: the plugin's first answers take more than the default second on this slow node.
    running "registrar$SUFFIX" || spawn "registrar$SUFFIX" "$LOGS/registrar$SUFFIX.log" csi-node-driver-registrar --csi-address="$PLUGIN_DIR/csi.sock" \
        --kubelet-registration-path="$PLUGIN_DIR/csi.sock" --timeout=30s \
        --plugin-registration-path=/var/lib/kubelet/plugins_registry --v=2
    running "provisioner$SUFFIX" || NODE_NAME=$E2E_NODE_NAME NAMESPACE=sealcsi POD_NAME=e2e-processes$SUFFIX spawn "provisioner$SUFFIX" "$LOGS/provisioner$SUFFIX.log" \
        csi-provisioner "${sc[@]}" --timeout=60s --node-deployment=true --node-deployment-immediate-binding=false \
        --strict-topology=true --immediate-topology=false --enable-capacity=true --capacity-ownerref-level=-1
    running "resizer$SUFFIX" || spawn "resizer$SUFFIX" "$LOGS/resizer$SUFFIX.log" csi-resizer "${sc[@]}" --timeout=60s --handle-volume-inuse-error=false
}

stop_driver() {
    stop "registrar$SUFFIX" "provisioner$SUFFIX" "resizer$SUFFIX" "plugin$SUFFIX"
    [ "${BACKEND:-local}" = local ] || stop hostpath
    rm -f "$PLUGIN_DIR/csi.sock" "/var/lib/kubelet/plugins_registry/$DRIVER-reg.sock"
}

# Scenario 8: the reference hostpath driver, on a socket only sealcsi uses.
start_hostpath() {
    mkdir -p "$BACKEND_DIR" "$HOSTPATH_STATE"
    spawn hostpath "$LOGS/hostpath.log" hostpathplugin --endpoint "unix://$BACKEND_DIR/hostpath.sock" \
        --nodeid "$E2E_NODE_NAME" --drivername hostpath.csi.k8s.io --statedir "$HOSTPATH_STATE" --v=2
    wait_for 60 "the hostpath driver's socket" test -S "$BACKEND_DIR/hostpath.sock"
}

# --- node-side views of a volume ------------------------------------------------------------------------
# BACKEND (local or stacked) follows from the INSTANCE that comes with each request from the host.
dm_of() { # CSI volume id -> the name of its dm-crypt device
    if [ "${BACKEND:-local}" = stacked ]; then
        echo "sealcsi-sv-$(printf 'stacked:%s' "$1" | sha256sum | cut -c1-32)"
    else
        echo "sealcsi-$1"
    fi
}
backing_file() { # CSI volume id -> the file that holds its ciphertext
    if [ "${BACKEND:-local}" = stacked ]; then echo "$HOSTPATH_STATE/$1"; else echo "$STATE/volumes/$1.img"; fi
}
local_of() { echo "sv-$(printf 'stacked:%s' "$1" | sha256sum | cut -c1-32)"; } # stacked CSI id -> sealcsi's own id
# released ID: sealcsi holds nothing of the volume's ciphertext. Node-local: no loop device over its file.
# Stacked: nothing under sealcsi's private paths for it is mounted, and no device-mapper device holds
# the device the backend published (the backend's own loop device may stay: hostpath detaches it at
# DeleteVolume).
released() {
    if [ "${BACKEND:-local}" = local ]; then
        ! losetup -j "$(backing_file "$1")" | grep -q .
        return
    fi
    local local_id lo
    local_id=$(local_of "$1")
    if grep -Eq " ($STATE/volumes/$local_id\.img|$STATE/stacked/$local_id/[^ ]*) " /proc/self/mounts; then
        echo "still mounted: $(grep -E "$local_id" /proc/self/mounts)"
        return 1
    fi
    for lo in $(losetup -j "$(backing_file "$1")" | cut -d: -f1); do
        if [ -n "$(ls "/sys/block/${lo#/dev/}/holders")" ]; then
            echo "$lo is held by $(ls "/sys/block/${lo#/dev/}/holders")"
            return 1
        fi
    done
}
stack_open() { local dm; dm=$(dm_of "$1"); dmsetup info "$dm" >/dev/null 2>&1 && dmsetup info "$dm-integrity" >/dev/null 2>&1; }
stack_gone() { local dm; dm=$(dm_of "$1"); ! dmsetup info "$dm" >/dev/null 2>&1 && ! dmsetup info "$dm-integrity" >/dev/null 2>&1; }
drop_caches() { sync; echo 3 >/proc/sys/vm/drop_caches; }
no_plaintext() { drop_caches; python3 "$E2E_REPO/tests/e2e/plaintext.py" "$(backing_file "$1")" "$2"; }
