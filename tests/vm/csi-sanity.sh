#!/usr/bin/env bash
# Runs the official CSI conformance suite, csi-sanity (github.com/kubernetes-csi/csi-test), against the
# sealcsi plugin on the real kernel (the user-mode-linux guest of tests/vm).
#
#   tests/vm/csi-sanity.sh [CSI_SANITY_BINARY] [-- EXTRA csi-sanity ARGS...]
#
# The csi-sanity binary is not part of this repository and is not built by it: build it elsewhere
# (csi-test v5.4.0 or later for CSI spec 1.12: `go build -mod=vendor ./cmd/csi-sanity`) and pass its
# path as the first argument or in $CSI_SANITY. Without one the script prints a note and exits 0
# (skipped), so a machine without it stays green.
#
# On the host it copies the binary under target/csi-sanity/ (the guest's /tmp is its own tmpfs, the
# repo is shared) and re-runs itself in the guest. In the guest it starts
# `target/debug/sealcsi --tee sim ... plugin --mode all` in the background with its state in $SCRATCH,
# runs csi-sanity against its socket, prints the plugin's log on failure, and exits with csi-sanity's
# status. Build the plugin first: `cargo build`.
#   SEALCSI_SANITY_VOLUME_SIZE (default 134217728 = 128 MiB): --csi.testvolumesize
#   SEALCSI_SANITY_TIMEOUT (default 1500): the guest's timeout in seconds
set -euo pipefail
cd "$(dirname "$0")/../.."
repo=$(pwd)

bin=${CSI_SANITY:-}
if [ $# -gt 0 ] && [ "$1" != "--" ]; then
    bin=$1
    shift
fi
[ "${1:-}" = "--" ] && shift
if [ -z "$bin" ]; then
    echo "csi-sanity: SKIPPED: no csi-sanity binary given (pass its path or set CSI_SANITY)"
    exit 0
fi
plugin=${SEALCSI_BIN:-$repo/target/debug/sealcsi}
size=${SEALCSI_SANITY_VOLUME_SIZE:-134217728}

if [ "${SEALCSI_IN_GUEST:-}" != 1 ]; then
    [ -x "$bin" ] || { echo "csi-sanity: $bin is not an executable" >&2; exit 2; }
    [ -x "$plugin" ] || { echo "csi-sanity: $plugin missing; run cargo build first" >&2; exit 2; }
    mkdir -p target/csi-sanity
    cp -f "$bin" target/csi-sanity/csi-sanity
    exec bash tests/vm/run-in-guest.sh --timeout "${SEALCSI_SANITY_TIMEOUT:-1500}" -- \
        env SEALCSI_BIN="$plugin" SEALCSI_SANITY_VOLUME_SIZE="$size" \
        bash tests/vm/csi-sanity.sh "$repo/target/csi-sanity/csi-sanity" -- "$@"
fi

# In the guest.
work=$SCRATCH/csi-sanity
rm -rf "$work"
mkdir -p "$work/state"
sock=$work/csi.sock
log=$work/plugin.log
"$plugin" --tee sim --state-dir "$work/state" --sim-identity csi-sanity --log info \
    plugin --endpoint "unix://$sock" --node-id sanity-node --mode all >"$log" 2>&1 &
pid=$!
for _ in $(seq 1 200); do
    [ -S "$sock" ] && break
    kill -0 "$pid" 2>/dev/null || { cat "$log" >&2; echo "csi-sanity: the plugin died" >&2; exit 1; }
    sleep 0.05
done
[ -S "$sock" ] || { cat "$log" >&2; echo "csi-sanity: no socket at $sock" >&2; exit 1; }

set +e
"$bin" --csi.endpoint="unix://$sock" \
    --csi.stagingdir="$work/staging" \
    --csi.mountdir="$work/mount" \
    --csi.testvolumesize="$size" \
    --ginkgo.v "$@"
rc=$?
set -e
kill "$pid" 2>/dev/null || true
wait "$pid" 2>/dev/null || true
if [ "$rc" -ne 0 ]; then
    echo "== plugin log (last 200 lines)"
    tail -n 200 "$log"
fi
exit "$rc"
