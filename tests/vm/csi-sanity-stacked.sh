#!/usr/bin/env bash
# The interop tier of stacking (docs/stacked.md), run by hand: csi-sanity against sealcsi stacked over the
# kubernetes-csi reference driver (csi-driver-host-path, hostpath.csi.k8s.io: block volumes through loop
# devices), and, for comparison, against that driver alone. On the real kernel (the guest of tests/vm).
#
#   SEALCSI_BACKEND_HOSTPATH=/path/to/hostpathplugin SEALCSI_CSI_SANITY=/path/to/csi-sanity \
#       tests/vm/csi-sanity-stacked.sh [stacked|backend|both] [-- EXTRA csi-sanity ARGS...]
#
# Neither binary is part of this repository or built by it. Without one the script says so in one line
# and exits 0 without running anything. Build the plugin first: `cargo build`.
#   SEALCSI_SANITY_VOLUME_SIZE (default 134217728 = 128 MiB): --csi.testvolumesize
#   SEALCSI_SANITY_TIMEOUT (default 2400): the guest's timeout in seconds
# Each run ends with csi-sanity's summary line ("Ran N of M Specs ... P Passed | F Failed ...").
set -euo pipefail
cd "$(dirname "$0")/../.."
repo=$(pwd)

which=both
if [ $# -gt 0 ] && [ "$1" != "--" ]; then
    which=$1
    shift
fi
[ "${1:-}" = "--" ] && shift
case "$which" in stacked|backend|both) ;; *) echo "csi-sanity-stacked: stacked, backend or both, not $which" >&2; exit 2 ;; esac
hostpath=${SEALCSI_BACKEND_HOSTPATH:-}
sanity=${SEALCSI_CSI_SANITY:-}
if [ -z "$hostpath" ] || [ -z "$sanity" ]; then
    echo "csi-sanity-stacked: NOT RUN: set SEALCSI_BACKEND_HOSTPATH (hostpathplugin) and SEALCSI_CSI_SANITY (csi-sanity)"
    exit 0
fi
plugin=${SEALCSI_BIN:-$repo/target/debug/sealcsi}
size=${SEALCSI_SANITY_VOLUME_SIZE:-134217728}

if [ "${SEALCSI_IN_GUEST:-}" != 1 ]; then
    for b in "$hostpath" "$sanity" "$plugin"; do
        [ -x "$b" ] || { echo "csi-sanity-stacked: $b is not an executable" >&2; exit 2; }
    done
    # The guest's /tmp is its own; the repository is shared.
    mkdir -p target/csi-sanity
    cp -f "$sanity" target/csi-sanity/csi-sanity-stacked
    cp -f "$hostpath" target/csi-sanity/hostpathplugin
    exec bash tests/vm/run-in-guest.sh --timeout "${SEALCSI_SANITY_TIMEOUT:-2400}" -- \
        env SEALCSI_BIN="$plugin" SEALCSI_SANITY_VOLUME_SIZE="$size" \
        SEALCSI_BACKEND_HOSTPATH="$repo/target/csi-sanity/hostpathplugin" \
        SEALCSI_CSI_SANITY="$repo/target/csi-sanity/csi-sanity-stacked" \
        bash tests/vm/csi-sanity-stacked.sh "$which" -- "$@"
fi

# In the guest.
work=$SCRATCH/csi-sanity-stacked
rm -rf "$work"
mkdir -p "$work"
pids=()
cleanup() {
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
}
trap cleanup EXIT

wait_socket() { # socket pid log
    for _ in $(seq 1 400); do
        [ -S "$1" ] && return 0
        kill -0 "$2" 2>/dev/null || { tail -n 50 "$3" >&2; echo "csi-sanity-stacked: $3: the driver died" >&2; exit 1; }
        sleep 0.05
    done
    tail -n 50 "$3" >&2
    echo "csi-sanity-stacked: no socket at $1" >&2
    exit 1
}

start_hostpath() { # dir
    mkdir -p "$1/state"
    "$hostpath" --endpoint "unix://$1/hostpath.sock" --nodeid sanity-node \
        --drivername hostpath.csi.k8s.io --statedir "$1/state" --v 3 >"$1/hostpath.log" 2>&1 &
    pids+=($!)
    wait_socket "$1/hostpath.sock" "$!" "$1/hostpath.log"
}

run_sanity() { # label endpoint dir
    set +e
    "$sanity" --csi.endpoint="$2" \
        --csi.stagingdir="$3/staging" \
        --csi.mountdir="$3/mount" \
        --csi.testvolumesize="$size" \
        --ginkgo.no-color \
        "${@:4}" >"$3/sanity.log" 2>&1
    local rc=$?
    set -e
    echo "== $1: csi-sanity exit $rc"
    grep -E '^\[FAIL\]|^  \[FAIL\]|Summarizing' -A0 "$3/sanity.log" | head -40 || true
    grep -E '^Ran [0-9]+ of [0-9]+ Specs|Passed \| [0-9]+ Failed' "$3/sanity.log" || tail -n 5 "$3/sanity.log"
    return 0
}

if [ "$which" = backend ] || [ "$which" = both ]; then
    d=$work/backend
    mkdir -p "$d"
    start_hostpath "$d"
    run_sanity "hostpath alone" "unix://$d/hostpath.sock" "$d" "$@"
fi

if [ "$which" = stacked ] || [ "$which" = both ]; then
    d=$work/stacked
    mkdir -p "$d/sealcsi"
    start_hostpath "$d"
    "$plugin" --tee sim --state-dir "$d/sealcsi" --sim-identity csi-sanity --log info \
        plugin --endpoint "unix://$d/sealcsi.sock" --node-id sanity-node --mode all \
        --backend "csi:unix://$d/hostpath.sock" >"$d/sealcsi.log" 2>&1 &
    pids+=($!)
    wait_socket "$d/sealcsi.sock" "$!" "$d/sealcsi.log"
    run_sanity "sealcsi stacked over hostpath" "unix://$d/sealcsi.sock" "$d" "$@"
    if grep -q '\[FAIL\]' "$d/sanity.log"; then
        echo "== sealcsi log (last 80 lines)"
        tail -n 80 "$d/sealcsi.log"
    fi
fi
