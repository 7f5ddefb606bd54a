#!/usr/bin/env bash
# The benchmark set of issue 6, in one command (host):
#   bash tests/bench/run.sh          # the full set: ~25 min on a 2-core host
#   bash tests/bench/run.sh --tiny   # CI: smallest sizes, 1 run, no levers; keeps the set from rotting
#                                    # (dev profile: the test build's artifacts, no release build)
# 1. builds target/release/sealcsi (--tiny: target/debug/sealcsi);
# 2. runs the criterion benches on the host (benches/unseal.rs, benches/control_path.rs);
# 3. boots the user-mode Linux guest for tests/bench/guest-bench.sh (provisioning, data path with fio,
#    levers, scale), all configurations in ONE guest run so their ratios are comparable;
# 4. prints the combined table (tests/bench/report.py) and writes target/bench/results.json;
# 5. the stacked driver's stage time (tests/bench/stacked_stage.rs, a guest test of guest_stacked) in a
#    second guest run: through the stack vs the backend's own stage + sealcsi's own open, over the
#    blockback test backend; records in target/bench/stacked-stage.jsonl.
# Benchmarks are not tests: no number fails this script; only a broken benchmark does.
# Needs fio on the host (the guest runs the host's binaries): apt-get install fio.
set -euo pipefail
cd "$(dirname "$0")/../.."

TINY=0
for arg in "$@"; do
    case $arg in
        --tiny) TINY=1 ;;
        *) echo "usage: $0 [--tiny]" >&2; exit 2 ;;
    esac
done
command -v fio >/dev/null || { echo "run.sh: fio is not installed (apt-get install fio)" >&2; exit 2; }

OUT=target/bench
# --tiny checks that every benchmark still runs, not what it measures: it reuses the dev profile the
# tests built instead of a second, optimized build of the whole tree (several minutes of CI).
PROFILE=release
[ "$TINY" = 1 ] && PROFILE=dev
profile_dir=release
[ "$PROFILE" = dev ] && profile_dir=debug
export SEALCSI_BIN=$PWD/target/$profile_dir/sealcsi
mkdir -p "$OUT"
rm -f "$OUT/host.json" "$OUT/results.json"
rm -rf target/criterion/header_select target/criterion/unseal_only target/criterion/decode_select_unseal \
    target/criterion/control_path

echo "== building target/$profile_dir/sealcsi" >&2
cargo build --profile "$PROFILE" --bin sealcsi

echo "== host: criterion benches" >&2
if [ "$TINY" = 1 ]; then
    SEALCSI_BENCH_TINY=1 cargo bench --profile "$PROFILE" --bench unseal --bench control_path -- \
        --warm-up-time 0.2 --measurement-time 0.5 --sample-size 10
else
    cargo bench --bench unseal --bench control_path
fi

echo "== guest: provisioning, data path, levers, scale (user-mode Linux)" >&2
guest_args=()
timeout=5400
if [ "$TINY" = 1 ]; then
    guest_args=(--tiny)
    timeout=900
fi
bash tests/vm/run-in-guest.sh --timeout "$timeout" -- bash tests/bench/guest-bench.sh "${guest_args[@]}" >"$OUT/guest-table.txt"

echo "== results" >&2
python3 tests/bench/report.py --out "$OUT"

echo "== guest: stage time through the stacked driver (tests/bench/stacked_stage.rs)" >&2
cargo build --profile "$PROFILE" --example blockback
stacked_bin=$(cargo test --profile "$PROFILE" --test guest_stacked --no-run --message-format=json \
    | python3 -c 'import json,sys
for l in sys.stdin:
    m = json.loads(l)
    if m.get("reason") == "compiler-artifact" and m["target"]["name"] == "guest_stacked" and m.get("executable"):
        print(m["executable"])')
stacked_runs=20
[ "$TINY" = 1 ] && stacked_runs=3
rm -f "$OUT/stacked-stage.jsonl"
SEALCSI_BENCH_RUNS=$stacked_runs SEALCSI_BENCH_OUT="$PWD/$OUT" bash tests/vm/run-in-guest.sh --timeout 900 -- \
    "$stacked_bin" --ignored --exact guest_stacked_bench_stage_time_through_the_stack --test-threads=1 --nocapture \
    | grep '^bench:' >&2
