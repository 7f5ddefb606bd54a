#!/usr/bin/env bash
# The main job end to end on the embedded default (loop-file backend, simulated TEE), inside a real
# Linux kernel (user-mode Linux) because this host has no device-mapper.
set -euo pipefail
cd "$(dirname "$0")/.."
SEALCSI_WITH_FUZZ=0 bash tests/install-deps.sh
cargo build
bash tests/vm/run-in-guest.sh --timeout 600 -- tests/demo-guest.sh
