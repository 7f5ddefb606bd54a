#!/usr/bin/env bash
# Installs what building and testing sealcsi needs on a fresh Debian 12 machine (idempotent).
set -euo pipefail

packages=(
    # guest kernel and what runs inside it
    user-mode-linux busybox-static kmod cpio e2fsprogs xfsprogs dmsetup util-linux
    # systemd-udevd, run in the guest by tests/guest_health.rs
    udev
    # reference peer and I/O driver for the benchmarks
    cryptsetup-bin fio
    # building: the devicemapper crate's bindgen + pkg-config probe, and the UML FPU-state shim
    libdevmapper-dev libclang-dev pkg-config gcc libtss2-dev
    # the TPM source is tested against a software TPM
    swtpm
)

missing=()
for p in "${packages[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
    sudo=""
    [ "$(id -u)" -eq 0 ] || sudo="sudo"
    echo "install-deps: apt-get install ${missing[*]}"
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# tests/grpc_clients.rs runs a gRPC C-core client (PyPI grpcio) against the plugin.
if ! python3 -c 'import grpc, grpc_tools' 2>/dev/null; then
    echo "install-deps: pip install grpcio grpcio-tools"
    python3 -m pip install --quiet grpcio grpcio-tools || python3 -m pip install --quiet --break-system-packages grpcio grpcio-tools
fi

rustup component list --installed 2>/dev/null | grep -q '^clippy' || rustup component add clippy rustfmt
if [ "${SEALCSI_WITH_FUZZ:-1}" = 1 ] && ! command -v cargo-fuzz >/dev/null; then
    cargo install --locked cargo-fuzz
fi
