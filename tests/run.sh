#!/usr/bin/env bash
# The test command: host unit and integration tests, then every guest suite in the real kernel
# (user-mode Linux), then a short fuzzing run of the header parser. Fails if anything fails.
#   SEALCSI_FUZZ_SECONDS (default 60): how long the fuzzer runs; 0 skips it.
# Interop tiers against real peers built outside the repo, each run only when its env path is set
# (one line says so otherwise): SEALCSI_CSI_SANITY (csi-sanity), SEALCSI_BACKEND_HOSTPATH with
# SEALCSI_CSI_SANITY (stacked over the hostpath driver), SEALCSI_TRUSTEE_KBS (the Trustee KBS),
# SEALCSI_KUBE_BIN_DIR (a real Kubernetes cluster, tests/e2e/run.sh; docs/e2e.md).
set -euo pipefail
cd "$(dirname "$0")/.."
bash tests/install-deps.sh

echo "== host tests"
cargo test --all-targets

echo "== guest tests (real device-mapper in user-mode Linux)"
# The blockback test backend the guest suites spawn (an example: `cargo test --no-run` does not build it).
cargo build --example blockback
# Every suite's binary from one cargo call, then the suites SEALCSI_GUEST_JOBS (default 2) at a time:
# a user-mode Linux guest runs on one CPU, so on a 2-CPU machine two suites take about the time of
# one. Each suite's output is printed whole when it ends; the longest suites start first.
suite_args=()
for f in tests/guest_*.rs; do suite_args+=(--test "$(basename "$f" .rs)"); done
declare -A suite_bin=()
while read -r name exe; do suite_bin[$name]=$exe; done < <(
    cargo test "${suite_args[@]}" --no-run --message-format=json 2>/dev/null |
        python3 -c 'import json,sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["kind"] == ["test"]:
        print(m["target"]["name"], m["executable"])')
longest_first=(guest_csi guest_crash guest_keyslots guest_init guest_volume)
ordered=()
for s in "${longest_first[@]}"; do [ -n "${suite_bin[$s]:-}" ] && ordered+=("$s"); done
for s in $(printf '%s\n' "${!suite_bin[@]}" | sort); do
    case " ${ordered[*]} " in *" $s "*) ;; *) ordered+=("$s") ;; esac
done
[ "${#ordered[@]}" = "$((${#suite_args[@]} / 2))" ] || { echo "a guest suite did not build" >&2; exit 1; }
logs=target/guest-logs
rm -rf "$logs" && mkdir -p "$logs"
declare -A running=() started=()
failed=()
finish_one() { # waits for one suite, prints its log and its result
    local pid rc=0 name
    wait -n -p pid "${!running[@]}" || rc=$?
    name=${running[$pid]}
    unset "running[$pid]"
    echo "-- $name (${suite_bin[$name]}): rc $rc, $(($(date +%s) - ${started[$name]})) s"
    cat "$logs/$name.log"
    [ "$rc" = 0 ] || failed+=("$name")
}
for name in "${ordered[@]}"; do
    while [ "${#running[@]}" -ge "${SEALCSI_GUEST_JOBS:-2}" ]; do finish_one; done
    started[$name]=$(date +%s)
    bash tests/vm/run-in-guest.sh --timeout 1800 -- "${suite_bin[$name]}" --ignored --test-threads=1 \
        --nocapture </dev/null >"$logs/$name.log" 2>&1 &
    running[$!]=$name
done
while [ "${#running[@]}" -gt 0 ]; do finish_one; done
if [ "${#failed[@]}" -gt 0 ]; then
    echo "guest suites failed: ${failed[*]}" >&2
    exit 1
fi

echo "== interop tiers (real peers from env paths)"
if [ -n "${SEALCSI_CSI_SANITY:-}" ]; then
    bash tests/vm/csi-sanity.sh "$SEALCSI_CSI_SANITY"
else
    echo "csi-sanity tier: not run (SEALCSI_CSI_SANITY is not set)"
fi
if [ -n "${SEALCSI_BACKEND_HOSTPATH:-}" ] && [ -n "${SEALCSI_CSI_SANITY:-}" ]; then
    bash tests/vm/csi-sanity-stacked.sh stacked
else
    echo "stacked-over-hostpath tier: not run (needs SEALCSI_BACKEND_HOSTPATH and SEALCSI_CSI_SANITY)"
fi
if [ -n "${SEALCSI_TRUSTEE_KBS:-}" ]; then
    cargo test --test kbs_interop -- --ignored --nocapture
else
    echo "Trustee KBS tier: not run (SEALCSI_TRUSTEE_KBS is not set)"
fi
if [ -n "${SEALCSI_KUBE_BIN_DIR:-}" ]; then
    bash tests/e2e/run.sh
else
    echo "Kubernetes e2e tier: not run (SEALCSI_KUBE_BIN_DIR is not set; docs/e2e.md)"
fi

fuzz_seconds=${SEALCSI_FUZZ_SECONDS:-60}
if [ "$fuzz_seconds" -gt 0 ]; then
    echo "== fuzzing the header parser for ${fuzz_seconds}s"
    # cargo-fuzz needs -Z flags; RUSTC_BOOTSTRAP lets the stable toolchain accept them.
    # New inputs go to the first directory (fuzz/corpus, not committed); the seeds stay untouched.
    mkdir -p fuzz/corpus/header
    RUSTC_BOOTSTRAP=1 cargo fuzz run header fuzz/corpus/header fuzz/seeds/header -- -max_total_time="$fuzz_seconds"
fi
echo "== all tests passed"
