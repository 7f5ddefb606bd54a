#!/usr/bin/env python3
"""Build a single-layer OCI image archive from files on this machine, without a registry or a daemon.

    oci_image.py --name REF --out ARCHIVE [--entrypoint JSON] [--env K=V]...
                 [--file SRC[:DST]]... [--link TARGET:DST]... [--dir DST]... [--with-libs]

The archive is an OCI image layout (oci-layout, index.json, blobs/sha256/...) in a tar, the format
`ctr images import` takes. index.json names the image twice: `io.containerd.image.name` (the full
reference containerd stores) and `org.opencontainers.image.ref.name` (the tag), so the kubelet finds
it by the name a manifest uses, with imagePullPolicy Never or IfNotPresent.

--file copies a file (symlinks are followed; DST defaults to SRC). --with-libs adds every shared
library `ldd` resolves for each ELF file given, and the dynamic loader, at their paths here: that is
how an image is made from the built binary and the Debian packages installed on this machine. The
layer is deterministic (sorted, mtime 0, root-owned), so the same inputs give the same digest.
"""

import argparse
import hashlib
import io
import json
import os
import re
import subprocess
import sys
import tarfile

ELF_MAGIC = b"\x7fELF"


def die(msg):
    print(f"oci_image: ERROR: {msg}", file=sys.stderr)
    sys.exit(2)


def is_elf(path):
    with open(path, "rb") as f:
        return f.read(4) == ELF_MAGIC


def shared_libraries(path):
    """The absolute paths ldd resolves for `path` (empty for a static binary)."""
    out = subprocess.run(["ldd", path], capture_output=True, text=True)
    if out.returncode != 0:
        if "not a dynamic executable" in out.stdout + out.stderr:
            return []
        die(f"ldd {path} failed: {out.stderr.strip()}")
    libs = []
    for line in out.stdout.splitlines():
        if "not found" in line:
            die(f"{path}: a library is missing on this machine: {line.strip()}")
        m = re.search(r"(/\S+)\s+\(0x", line)
        if m:
            libs.append(m.group(1))
    return libs


class Layer:
    """The files of the one layer: path in the image -> (kind, payload)."""

    def __init__(self):
        self.entries = {}

    def add_dir(self, dst):
        dst = "/" + dst.strip("/")
        parts = dst.strip("/").split("/")
        for i in range(1, len(parts) + 1):
            self.entries.setdefault("/" + "/".join(parts[:i]), ("dir", None))

    def add_file(self, src, dst):
        if not os.path.isfile(src):
            die(f"no such file: {src}")
        self.add_dir(os.path.dirname(dst))
        self.entries[dst] = ("file", os.path.realpath(src))

    def add_link(self, target, dst):
        self.add_dir(os.path.dirname(dst))
        self.entries[dst] = ("link", target)

    def tar_bytes(self):
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
            for path in sorted(self.entries):
                kind, payload = self.entries[path]
                info = tarfile.TarInfo(path.lstrip("/"))
                info.mtime = 0
                info.uid = info.gid = 0
                info.uname = info.gname = "root"
                if kind == "dir":
                    info.type = tarfile.DIRTYPE
                    info.mode = 0o755
                    tar.addfile(info)
                elif kind == "link":
                    info.type = tarfile.SYMTYPE
                    info.linkname = payload
                    info.mode = 0o777
                    tar.addfile(info)
                else:
                    st = os.stat(payload)
                    info.size = st.st_size
                    info.mode = 0o755 if st.st_mode & 0o111 else 0o644
                    with open(payload, "rb") as f:
                        tar.addfile(info, f)
        return buf.getvalue()


def blob(data):
    return "sha256:" + hashlib.sha256(data).hexdigest(), data


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--name", required=True, help="full reference, e.g. registry.k8s.io/sig-storage/livenessprobe:v2.19.0")
    ap.add_argument("--out", required=True)
    ap.add_argument("--entrypoint", default="[]", help="JSON list")
    ap.add_argument("--env", action="append", default=[])
    ap.add_argument("--file", action="append", default=[])
    ap.add_argument("--link", action="append", default=[])
    ap.add_argument("--dir", action="append", default=[])
    ap.add_argument("--with-libs", action="store_true")
    args = ap.parse_args()

    if not re.fullmatch(r"[a-z0-9][a-z0-9._/-]*(:[A-Za-z0-9._-]+)?", args.name):
        die(f"not an image reference: {args.name}")
    try:
        entrypoint = json.loads(args.entrypoint)
    except json.JSONDecodeError as e:
        die(f"--entrypoint is not JSON: {e}")
    if not isinstance(entrypoint, list) or not all(isinstance(a, str) for a in entrypoint):
        die("--entrypoint must be a JSON list of strings")

    layer = Layer()
    for d in ["/tmp", "/etc", *args.dir]:
        layer.add_dir(d)
    elves = []
    for spec in args.file:
        src, _, dst = spec.partition(":")
        dst = dst or src
        layer.add_file(src, dst)
        if is_elf(src):
            elves.append(src)
    for spec in args.link:
        target, _, dst = spec.partition(":")
        if not dst:
            die(f"--link wants TARGET:DST, got {spec}")
        layer.add_link(target, dst)
    if args.with_libs:
        for elf in elves:
            for lib in shared_libraries(elf):
                layer.add_file(lib, lib)

    layer_digest, layer_data = blob(layer.tar_bytes())
    env = ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", *args.env]
    config = {
        "architecture": "amd64",
        "os": "linux",
        "config": {"Entrypoint": entrypoint, "Env": env, "WorkingDir": "/"},
        "rootfs": {"type": "layers", "diff_ids": [layer_digest]},
        "history": [{"created_by": "tests/e2e/oci_image.py"}],
    }
    config_digest, config_data = blob(json.dumps(config, sort_keys=True).encode())
    manifest = {
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": config_digest, "size": len(config_data)},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": layer_digest, "size": len(layer_data)}],
    }
    manifest_digest, manifest_data = blob(json.dumps(manifest, sort_keys=True).encode())
    tag = args.name.rsplit(":", 1)[1] if ":" in args.name.rsplit("/", 1)[-1] else "latest"
    index = {
        "schemaVersion": 2,
        "manifests": [{
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "digest": manifest_digest,
            "size": len(manifest_data),
            "platform": {"architecture": "amd64", "os": "linux"},
            "annotations": {"io.containerd.image.name": args.name, "org.opencontainers.image.ref.name": tag},
        }],
    }

    tmp = args.out + ".tmp"
    with tarfile.open(tmp, "w") as tar:
        def put(name, data):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mtime = 0
            info.mode = 0o644
            tar.addfile(info, io.BytesIO(data))

        put("oci-layout", json.dumps({"imageLayoutVersion": "1.0.0"}).encode())
        put("index.json", json.dumps(index, sort_keys=True).encode())
        for digest, data in [(layer_digest, layer_data), (config_digest, config_data), (manifest_digest, manifest_data)]:
            put("blobs/sha256/" + digest.split(":", 1)[1], data)
    os.replace(tmp, args.out)
    print(f"{args.name} {manifest_digest} {len(layer_data)} bytes -> {args.out}")


if __name__ == "__main__":
    main()
