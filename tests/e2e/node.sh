#!/usr/bin/env bash
# Guest side of tests/e2e/run.sh: makes this user-mode-linux guest a Kubernetes node (containerd,
# kubelet, kube-proxy, udevd), then serves the host's scenarios (tests/e2e/scenarios.sh) through
# tests/e2e/agent.py, which runs the node-side steps (tests/e2e/node-lib.sh) they send.
#
#   node.sh RUN_DIR        (RUN_DIR/e2e.env says the rest)
set -uo pipefail
RUN=$1
# shellcheck source=/dev/null
. "$RUN/e2e.env"
E2E_DIR=$E2E_REPO/tests/e2e
# shellcheck source=tests/e2e/lib.sh
. "$E2E_DIR/lib.sh"
# The binaries run from the guest's tmpfs: executing them from hostfs pages them in slowly.
mkdir -p /run/e2e-bin && cp "$RUN"/bin/* /run/e2e-bin/
export PATH=/run/e2e-bin:$PATH
LOGS=$RUN/logs
STATE=/var/lib/sealcsi
# The state of the process-mode and stacked driver instances (node-lib.sh, for_backend).
OTHER_STATES="/var/lib/sealcsi-processes /var/lib/sealcsi-stacked"
log() { echo "node: $(date +%T) $*"; }
fail() { log "FATAL: $*"; exit 1; }
timed() { # timed STEP CMD...: run, record the duration, stop the run on failure
    local what=$1 t=$SECONDS
    shift
    log "$what"
    "$@" || fail "$what failed"
    printf 'node\t%s\t%s\n' "$what" $((SECONDS - t)) >>"$RUN/timings.tsv"
}

# --- the node's own setup ---------------------------------------------------------------------------
prepare_kernel() {
    # UML's kernel has the legacy iptables NAT modules but not nftables' NAT chain (nft_chain_nat):
    # kube-proxy and the CNI bridge plugin use iptables-legacy here.
    modprobe -a overlay bridge veth br_netfilter nf_conntrack nf_nat xt_conntrack xt_MASQUERADE \
        xt_addrtype xt_comment xt_mark xt_nat xt_statistic xt_multiport xt_physdev xt_tcpudp \
        iptable_nat iptable_filter iptable_mangle ip_tables tun || return 1
    update-alternatives --quiet --set iptables /usr/sbin/iptables-legacy && update-alternatives --quiet --set ip6tables /usr/sbin/ip6tables-legacy || return 1
    sysctl -qw net.ipv4.ip_forward=1 net.bridge.bridge-nf-call-iptables=1
    mount -t cgroup2 cgroup2 /sys/fs/cgroup || return 1
    # Delegate every controller to the kubelet's hierarchy.
    tr ' ' '\n' </sys/fs/cgroup/cgroup.controllers | sed 's/^/+/' | tr '\n' ' ' >/sys/fs/cgroup/cgroup.subtree_control
    # cadvisor stops the kubelet when /proc/cpuinfo has no "cpu MHz" (UML's has none).
    awk '{ print } /^bogomips/ { print "cpu MHz\t\t: 1000.000" }' /proc/cpuinfo >/run/cpuinfo
    grep -q '^cpu MHz' /run/cpuinfo || echo "cpu MHz		: 1000.000" >>/run/cpuinfo
    mount --bind /run/cpuinfo /proc/cpuinfo
    # Mounts made under /var/lib/kubelet must propagate (Bidirectional in deploy/node.yaml).
    mount --make-rshared /
    mkdir -p /scratch/kubelet /scratch/containerd /scratch/sealcsi /var/lib/kubelet "$STATE" /var/log/pods
    mount --bind /scratch/kubelet /var/lib/kubelet
    mount --bind /scratch/sealcsi "$STATE"
    local dir
    for dir in $OTHER_STATES; do
        mkdir -p "/scratch/${dir##*/}" "$dir" && mount --bind "/scratch/${dir##*/}" "$dir" || return 1
    done
    echo "$E2E_NODE_IP $E2E_NODE_NAME" >>/etc/hosts
}

start_udevd() {
    local udevd
    udevd=$(command -v systemd-udevd || echo /lib/systemd/systemd-udevd)
    if [ ! -x "$udevd" ]; then
        log "no systemd-udevd on this machine (apt-get install udev): the udev scenario cannot run"
        return 0
    fi
    "$udevd" --daemon --resolve-names=never >"$LOGS/udevd.log" 2>&1 || return 1
    udevadm trigger --action=add --subsystem-match=block >/dev/null 2>&1
    udevadm settle -t 30
}

start_containerd() {
    mkdir -p /etc/containerd /etc/cni/net.d /opt/cni
    cat >/etc/containerd/config.toml <<EOF
version = 2
root = "/scratch/containerd/root"
state = "/run/containerd"
[grpc]
  address = "/run/containerd/containerd.sock"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "sealcsi.e2e/pause:1"
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        SystemdCgroup = false
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "/usr/lib/cni"
    conf_dir = "/etc/cni/net.d"
EOF
    cat >/etc/cni/net.d/10-e2e.conflist <<EOF
{"cniVersion": "1.0.0", "name": "e2e", "plugins": [
  {"type": "bridge", "bridge": "cni0", "isGateway": true, "ipMasq": true, "hairpinMode": true,
   "ipam": {"type": "host-local", "ranges": [[{"subnet": "10.88.0.0/16"}]], "routes": [{"dst": "0.0.0.0/0"}]}},
  {"type": "portmap", "capabilities": {"portMappings": true}}]}
EOF
    containerd --config /etc/containerd/config.toml >"$LOGS/containerd.log" 2>&1 &
    wait_for 60 "containerd" ctr --address /run/containerd/containerd.sock version || return 1
    local a
    for a in "$RUN"/images/*.tar; do
        ctr --address /run/containerd/containerd.sock -n k8s.io images import "$a" >>"$LOGS/images-import.log" 2>&1 \
            || { log "importing $a failed"; return 1; }
    done
}

start_kubelet() {
    mkdir -p /var/lib/kubelet/pki
    cp "$RUN/pki/ca.crt" /var/lib/kubelet/pki/ca.crt
    cat >/var/lib/kubelet/config.yaml <<EOF
apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
authentication:
  anonymous: {enabled: false}
  webhook: {enabled: true}
  x509: {clientCAFile: /var/lib/kubelet/pki/ca.crt}
authorization: {mode: Webhook}
cgroupDriver: cgroupfs
containerRuntimeEndpoint: unix:///run/containerd/containerd.sock
failSwapOn: false
# Online expansion and volume health are noticed at the kubelet's sync and stats periods.
syncFrequency: 10s
volumeStatsAggPeriod: 10s
featureGates: {CSIVolumeHealth: true}
evictionHard: {memory.available: "1Mi", nodefs.available: "0%", imagefs.available: "0%"}
imageGCHighThresholdPercent: 100
localStorageCapacityIsolation: false
serializeImagePulls: false
EOF
    kubelet --config=/var/lib/kubelet/config.yaml --kubeconfig="$RUN/kubelet.kubeconfig" \
        --hostname-override="$E2E_NODE_NAME" --node-ip="$E2E_NODE_IP" --v=2 \
        >"$LOGS/kubelet.log" 2>&1 &
}

start_kube_proxy() {
    # kube-proxy makes the API service IP (what pods' in-cluster config uses) reach the API server.
    kube-proxy --kubeconfig="$RUN/kube-proxy.kubeconfig" --hostname-override="$E2E_NODE_NAME" \
        --proxy-mode=iptables --cluster-cidr=10.88.0.0/16 --conntrack-max-per-core=0 --v=1 \
        >"$LOGS/kube-proxy.log" 2>&1 &
    wait_for 60 "kube-proxy's service rules" sh -c 'iptables-save -t nat | grep -q KUBE-SERVICES'
}

collect_node_logs() {
    dmsetup ls >"$LOGS/node-dmsetup-ls.txt" 2>&1
    losetup -a >"$LOGS/node-losetup.txt" 2>&1
    grep -E 'sealcsi|kubelet' /proc/mounts >"$LOGS/node-mounts.txt" 2>&1
    dmesg >"$LOGS/node-dmesg.txt" 2>&1
}

main() {
    timed "kernel modules, cgroup2, mounts" prepare_kernel
    timed "systemd-udevd" start_udevd
    timed "containerd + image import" start_containerd
    timed "kubelet started" start_kubelet
    timed "kube-proxy started" start_kube_proxy
    # The host runs the scenarios from here on, through the agent, until it says shutdown.
    log "agent serving the host's scenarios"
    E2E_RUN=$RUN python3 "$E2E_DIR/agent.py" "$E2E_NODE_IP" 7000 "$E2E_DIR/node-lib.sh" >"$LOGS/agent.log" 2>&1
    log "agent stopped"
    collect_node_logs
}

main
