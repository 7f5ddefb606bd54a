#!/usr/bin/env bash
# The OCI image archives the e2e node imports into containerd (no registry):
#   images.sh BIN_DIR OUT_DIR
# - sealcsi.e2e/pause:1 and sealcsi.e2e/busybox:1, from Debian's busybox-static;
# - sealcsi:latest, what deploy/Dockerfile builds: the sealcsi binary, the filesystem tools it runs
#   (e2fsprogs, xfsprogs, blkid) and the shared libraries they link, from this machine's packages;
# - the CSI sidecars of deploy/node.yaml, each a static binary as its entrypoint, under the names and
#   tags deploy/kustomization.yaml pins (read from it, so the deployed manifests run unchanged).
set -euo pipefail
BIN=$1 OUT=$2
E2E_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd -P)
REPO=$(cd "$E2E_DIR/../.." && pwd -P)
img() { python3 "$E2E_DIR/oci_image.py" "$@"; }
BUSYBOX=$(command -v busybox)

img --name sealcsi.e2e/pause:1 --out "$OUT/pause.tar" --file "$BUSYBOX:/bin/busybox" \
    --entrypoint '["/bin/busybox","sh","-c","trap \"exit 0\" TERM INT; while :; do sleep 3600 & wait $!; done"]'

links=()
for a in sh cat dd sync sleep echo sha256sum ls stat df head tail test grep wc seq tr mount od cmp true false; do
    links+=(--link "busybox:/bin/$a")
done
img --name sealcsi.e2e/busybox:1 --out "$OUT/busybox.tar" --file "$BUSYBOX:/bin/busybox" "${links[@]}" \
    --entrypoint '["/bin/sh"]'

tools=()
for t in mke2fs e2fsck resize2fs dumpe2fs mkfs.xfs xfs_repair xfs_growfs xfs_db blkid; do
    p=$(command -v "$t") || { echo "images: $t is not installed (e2fsprogs, xfsprogs, util-linux)" >&2; exit 1; }
    tools+=(--file "$(readlink -f "$p"):/usr/sbin/$t")
done
# Without its debug info (a debug build's is most of its size, and importing it into the node is slow).
objcopy --strip-debug "$BIN/sealcsi" "$OUT/sealcsi.stripped"
img --name docker.io/library/sealcsi:latest --out "$OUT/sealcsi.tar" --with-libs \
    --file "$OUT/sealcsi.stripped:/usr/bin/sealcsi" "${tools[@]}" \
    --link mke2fs:/usr/sbin/mkfs.ext4 --file /etc/mke2fs.conf --dir /var/lib/sealcsi \
    --entrypoint '["/usr/bin/sealcsi"]'

# name:tag of each sidecar as deploy/kustomization.yaml pins it.
pinned() {
    awk -v want="registry.k8s.io/sig-storage/$1" '
        $1 == "-" && $2 == "name:" { name = $3 }
        $1 == "newTag:" && name == want { print want ":" $2; exit }' "$REPO/deploy/kustomization.yaml"
}
for pair in csi-provisioner:csi-provisioner csi-resizer:csi-resizer \
    csi-node-driver-registrar:csi-node-driver-registrar livenessprobe:livenessprobe; do
    image=${pair%%:*} binary=${pair#*:}
    ref=$(pinned "$image")
    [ -n "$ref" ] || { echo "images: deploy/kustomization.yaml pins no tag for $image" >&2; exit 1; }
    img --name "$ref" --out "$OUT/$image.tar" --file "$BIN/$binary:/$binary" --entrypoint "[\"/$binary\"]"
done
rm -f "$OUT/sealcsi.stripped"
