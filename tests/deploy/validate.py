"""Checks the Kubernetes deployment under deploy/ (run by tests/deploy/validate.sh, which sets up the
Python environment and passes the expected values in SEALCSI_EXPECT_* variables).

1. Every document of every YAML file under deploy/ against the Kubernetes OpenAPI schemas of the two
   newest Kubernetes minor versions kubernetes-validate knows, strict (unknown fields are errors), both
   as written and as `kubectl apply -k deploy/` renders it (namespace and image tags applied).
2. The manifests against the plugin's contract: CSIDriver name and fields, socket paths, the topology
   key, StorageClass provisioner, parameter keys and values, the node DaemonSet's wiring.
2b. Every stacked Component (deploy/stacked/**/kustomization.yaml) rendered over deploy/ (its
   resources, images, JSON 6902 patches and `$patch: delete` patches, as kustomize applies them), the
   result against the schemas, and the stacked contract: the backend's socket shared by sealcsi and the
   backend only, the state directory Bidirectional, and for a controller Deployment its sidecars,
   modes, attach, RBAC and token wiring.
3. deploy/Dockerfile's structure (stages, packages, entry point) and that it carries every tool the
   plugin's source executes.
4. If target/debug/sealcsi exists: its --help defaults against the same expected values.

Prints one line per check and closes with `deploy: N passed, M failed`; exits 1 on any failure.
"""

from __future__ import annotations

import copy
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable, Iterable

import yaml

ROOT = Path.cwd()
DEPLOY = ROOT / "deploy"
STACKED = DEPLOY / "stacked"


def env(name: str) -> str:
    value = os.environ.get(f"SEALCSI_EXPECT_{name}")
    if value is None:
        sys.exit(f"validate.py: SEALCSI_EXPECT_{name} is not set (run tests/deploy/validate.sh)")
    return value


EXPECT = {
    "driver": env("DRIVER_NAME"),
    "endpoint": env("ENDPOINT"),
    "plugin_dir": env("PLUGIN_DIR"),
    "registration_path": env("REGISTRATION_PATH"),
    "registry_dir": env("REGISTRY_DIR"),
    "kubelet_dir": env("KUBELET_DIR"),
    "topology_key": env("TOPOLOGY_KEY"),
    "state_dir": env("STATE_DIR"),
    "health_port": int(env("HEALTH_PORT")),
    "binary": env("BINARY"),
    "image": env("IMAGE"),
    "namespace": env("NAMESPACE"),
    # "integrity=hmac-sha256,none;init=fast,full;journal=journal,direct" (first value is the default)
    "parameters": {
        k: v.split(",")
        for k, v in (item.split("=", 1) for item in env("PARAMETERS").split(";") if item)
    },
    "fstypes": env("FSTYPES").split(","),
    "tee_values": env("TEE_VALUES").split(","),
    "storage_classes": dict(item.split("=", 1) for item in env("STORAGE_CLASSES").split(",")),
}
FSTYPE_KEY = "csi.storage.k8s.io/fstype"

# Tools the plugin may execute, by the Debian package that provides them in the runtime image.
TOOL_PACKAGES = {
    "mkfs.ext4": "e2fsprogs", "mke2fs": "e2fsprogs", "e2fsck": "e2fsprogs", "resize2fs": "e2fsprogs",
    "dumpe2fs": "e2fsprogs", "tune2fs": "e2fsprogs",
    "mkfs.xfs": "xfsprogs", "xfs_repair": "xfsprogs", "xfs_growfs": "xfsprogs", "xfs_db": "xfsprogs",
    "xfs_admin": "xfsprogs",
    "blkid": "util-linux", "wipefs": "util-linux", "blockdev": "util-linux",
}

passed: list[str] = []
failed: list[str] = []


def check(name: str, ok: bool, detail: str = "") -> bool:
    if ok:
        passed.append(name)
        print(f"  ok    {name}")
    else:
        failed.append(name)
        print(f"  FAIL  {name}" + (f": {detail}" if detail else ""))
    return ok


def note(text: str) -> None:
    print(f"  note  {text}")


# ---- loading ----------------------------------------------------------------------------------------

class Doc:
    def __init__(self, path: Path, index: int, body: dict):
        self.path, self.index, self.body = path, index, body

    @property
    def kind(self) -> str:
        return self.body.get("kind", "")

    @property
    def name(self) -> str:
        return (self.body.get("metadata") or {}).get("name", "")

    def where(self) -> str:
        return f"{self.path.relative_to(ROOT)}[{self.index}] {self.kind}/{self.name}"


def load_docs() -> tuple[list[Doc], list[str]]:
    docs, errors = [], []
    files = sorted(p for p in DEPLOY.rglob("*") if p.suffix in (".yaml", ".yml") and p.is_file())
    for path in files:
        try:
            loaded = list(yaml.safe_load_all(path.read_text()))
        except yaml.YAMLError as e:
            errors.append(f"{path.relative_to(ROOT)}: {e}")
            continue
        for i, body in enumerate(loaded):
            if body is None:
                continue
            if not isinstance(body, dict) or "kind" not in body or "apiVersion" not in body:
                errors.append(f"{path.relative_to(ROOT)}[{i}]: not a Kubernetes object")
                continue
            docs.append(Doc(path, i, body))
    return docs, errors


# ---- 1. schemas --------------------------------------------------------------------------------------

def newest_versions(count: int = 2) -> list[str]:
    from kubernetes_validate import utils
    from packaging.version import Version

    by_minor: dict[str, str] = {}
    for v in utils.all_versions():
        minor = utils.major_minor(v)
        if minor not in by_minor or Version(v) > Version(by_minor[minor]):
            by_minor[minor] = v
    return [by_minor[m] for m in sorted(by_minor, key=Version)[-count:]]


def validate_schema(label: str, body: dict, versions: list[str]) -> None:
    import kubernetes_validate
    from kubernetes_validate import utils

    for version in versions:
        name = f"schema {version} strict: {label}"
        try:
            kubernetes_validate.validate(body, version, strict=True)
            check(name, True)
        except utils.ValidationError as e:
            path = "/".join(str(p) for p in e.absolute_path) or "(top)"
            check(name, False, f"at {path}: {e.message}")
        except utils.SchemaNotFoundError as e:
            check(name, False, e.message)
        except Exception as e:  # noqa: BLE001 - an unusable schema is a failure to report, not a crash
            check(name, False, f"{type(e).__name__}: {e}")


CLUSTER_SCOPED = {
    "Namespace", "CSIDriver", "StorageClass", "ClusterRole", "ClusterRoleBinding", "PriorityClass",
    "PersistentVolume", "CSINode", "VolumeAttachment",
}


def split_image(image: str) -> tuple[str, str | None]:
    """("registry/name", "tag") of an image reference; digests count as pinned tags."""
    if "@" in image:
        name, digest = image.split("@", 1)
        return name, "@" + digest
    last = image.rsplit("/", 1)[-1]
    if ":" in last:
        name, tag = image.rsplit(":", 1)
        return name, tag
    return image, None


def containers_of(body: dict) -> list[dict]:
    spec = body.get("spec", {})
    pod = spec.get("template", {}).get("spec", spec) if body.get("kind") != "Pod" else spec
    return list(pod.get("initContainers", []) or []) + list(pod.get("containers", []) or [])


def render_kustomization(kust: dict, docs: list[Doc]) -> list[dict]:
    """What `kubectl apply -k deploy/` applies, for the parts this kustomization uses (resources,
    namespace, images)."""
    by_file: dict[Path, list[Doc]] = {}
    for d in docs:
        by_file.setdefault(d.path, []).append(d)
    images = {i["name"]: i for i in kust.get("images", [])}
    out = []
    for res in kust.get("resources", []):
        for d in by_file.get(DEPLOY / res, []):
            body = copy.deepcopy(d.body)
            ns = kust.get("namespace")
            if ns and body["kind"] not in CLUSTER_SCOPED:
                body.setdefault("metadata", {})["namespace"] = ns
            for c in containers_of(body):
                name, tag = split_image(c["image"])
                if name in images:
                    entry = images[name]
                    new_name = entry.get("newName", name)
                    if "digest" in entry:
                        c["image"] = f"{new_name}@{entry['digest']}"
                    else:
                        c["image"] = f"{new_name}:{entry.get('newTag', tag or 'latest')}"
            out.append(body)
    return out


# ---- 2. contract -------------------------------------------------------------------------------------

def arg_value(args: list[str], flag: str) -> str | None:
    """The value of --flag in args (`--flag=value` or `--flag value`); "" for a bare boolean flag."""
    for i, a in enumerate(args):
        if a == flag:
            nxt = args[i + 1] if i + 1 < len(args) else None
            return nxt if nxt is not None and not nxt.startswith("-") else ""
        if a.startswith(flag + "="):
            return a.split("=", 1)[1]
    return None


def truthy_flag(args: list[str], flag: str) -> bool:
    v = arg_value(args, flag)
    return v is not None and v.lower() in ("", "true")


def socket_path(endpoint: str) -> str:
    return endpoint[len("unix://"):] if endpoint.startswith("unix://") else endpoint


def env_map(container: dict) -> dict[str, Any]:
    out = {}
    for e in container.get("env", []) or []:
        out[e["name"]] = e.get("value", e.get("valueFrom"))
    return out


def field_ref(value: Any) -> str | None:
    if isinstance(value, dict):
        return (value.get("fieldRef") or {}).get("fieldPath")
    return None


def mount_at(container: dict, path: str) -> dict | None:
    for m in container.get("volumeMounts", []) or []:
        if m["mountPath"].rstrip("/") == path.rstrip("/"):
            return m
    return None


def check_contract(docs: list[Doc], kust: dict) -> None:
    main = [d for d in docs if d.path.parent == DEPLOY and d.kind != "Kustomization"]
    examples = [d for d in docs if d.path.parent != DEPLOY]
    kinds = lambda k: [d for d in main if d.kind == k]  # noqa: E731

    # Kustomization: resources exist, every top-level manifest is listed, examples are not.
    listed = {DEPLOY / r for r in kust.get("resources", [])}
    check("kustomization: every listed resource exists", all(p.exists() for p in listed),
          ", ".join(str(p) for p in listed if not p.exists()))
    unlisted = {d.path for d in main} - listed
    check("kustomization: every manifest in deploy/ is listed", not unlisted,
          ", ".join(str(p.relative_to(ROOT)) for p in unlisted))
    check("kustomization: examples are not part of it",
          not any("examples" in Path(r).parts for r in kust.get("resources", [])))
    check(f"kustomization: namespace is {EXPECT['namespace']}", kust.get("namespace") == EXPECT["namespace"])

    # Namespaces of the objects.
    for d in main:
        if d.kind in CLUSTER_SCOPED:
            continue
        ns = d.body.get("metadata", {}).get("namespace")
        check(f"namespace of {d.where()}", ns == EXPECT["namespace"], f"is {ns!r}")

    # CSIDriver.
    drivers = kinds("CSIDriver")
    if check("one CSIDriver", len(drivers) == 1, f"found {len(drivers)}"):
        d = drivers[0]
        check("CSIDriver name", d.name == EXPECT["driver"], f"{d.name!r} != {EXPECT['driver']!r}")
        spec = d.body.get("spec", {})
        want = {"attachRequired": False, "podInfoOnMount": True, "fsGroupPolicy": "File",
                "volumeLifecycleModes": ["Persistent"], "storageCapacity": True,
                "requiresRepublish": False}
        for k, v in want.items():
            check(f"CSIDriver spec.{k} = {json.dumps(v)}", spec.get(k) == v, f"is {json.dumps(spec.get(k))}")

    # StorageClasses (main and any in examples).
    classes = {d.name: d for d in docs if d.kind == "StorageClass"}
    for name, fstype in EXPECT["storage_classes"].items():
        check(f"StorageClass {name} exists", name in classes)
    allowed_keys = set(EXPECT["parameters"]) | {FSTYPE_KEY}
    for name, d in classes.items():
        sc = d.body
        check(f"StorageClass {name}: provisioner", sc.get("provisioner") == EXPECT["driver"],
              f"{sc.get('provisioner')!r} != {EXPECT['driver']!r}")
        params = sc.get("parameters", {}) or {}
        unknown = set(params) - allowed_keys
        if STACKED in d.path.parents:
            # A stacked class passes `backend.<key>` parameters on to the backend (docs/stacked.md).
            unknown = {k for k in unknown if not (k.startswith("backend.") and len(k) > len("backend."))}
        check(f"StorageClass {name}: parameter keys", not unknown,
              f"unknown {sorted(unknown)}; allowed {sorted(allowed_keys)}")
        for k, v in params.items():
            if k in EXPECT["parameters"]:
                check(f"StorageClass {name}: {k}={v}", v in EXPECT["parameters"][k],
                      f"allowed {EXPECT['parameters'][k]}")
        fs = params.get(FSTYPE_KEY, EXPECT["fstypes"][0])
        check(f"StorageClass {name}: fstype {fs}", fs in EXPECT["fstypes"], f"allowed {EXPECT['fstypes']}")
        if name in EXPECT["storage_classes"]:
            check(f"StorageClass {name}: fstype is {EXPECT['storage_classes'][name]}",
                  fs == EXPECT["storage_classes"][name])
        if "journal" in params:
            check(f"StorageClass {name}: journal only with integrity=hmac-sha256",
                  params.get("integrity", EXPECT["parameters"]["integrity"][0]) == "hmac-sha256")
        check(f"StorageClass {name}: volumeBindingMode WaitForFirstConsumer",
              sc.get("volumeBindingMode") == "WaitForFirstConsumer")
        check(f"StorageClass {name}: allowVolumeExpansion", sc.get("allowVolumeExpansion") is True)
        for term in sc.get("allowedTopologies", []) or []:
            for expr in term.get("matchLabelExpressions", []) or []:
                check(f"StorageClass {name}: topology key", expr.get("key") == EXPECT["topology_key"],
                      f"{expr.get('key')!r} != {EXPECT['topology_key']!r}")

    # Examples: claims name existing classes; at least one Block and one Filesystem claim with a pod.
    claims = [d for d in examples if d.kind == "PersistentVolumeClaim"]
    for c in claims:
        sc = c.body.get("spec", {}).get("storageClassName")
        check(f"example {c.where()}: StorageClass {sc} exists", sc in classes)
    modes = {c.body["spec"].get("volumeMode", "Filesystem") for c in claims}
    check("examples: a Block claim and a Filesystem claim", {"Block", "Filesystem"} <= modes, f"have {modes}")
    pods = [d for d in examples if d.kind == "Pod"]
    used = {v["persistentVolumeClaim"]["claimName"] for p in pods
            for v in p.body["spec"].get("volumes", []) if "persistentVolumeClaim" in v}
    check("examples: every claim is used by a pod", {c.name for c in claims} <= used)
    for c in claims:
        key = c.name
        for p in pods:
            vols = {v["name"]: v["persistentVolumeClaim"]["claimName"] for v in p.body["spec"].get("volumes", [])
                    if "persistentVolumeClaim" in v}
            for ctr in containers_of(p.body):
                if c.body["spec"].get("volumeMode") == "Block":
                    for dev in ctr.get("volumeDevices", []) or []:
                        if vols.get(dev["name"]) == key:
                            check(f"example {p.name}: Block claim {key} used as volumeDevices", True)
                else:
                    for m in ctr.get("volumeMounts", []) or []:
                        if vols.get(m["name"]) == key:
                            check(f"example {p.name}: Filesystem claim {key} used as volumeMounts", True)

    # The node DaemonSet.
    daemonsets = kinds("DaemonSet")
    if not check("one node DaemonSet", len(daemonsets) == 1, f"found {len(daemonsets)}"):
        return
    ds = daemonsets[0].body
    pod = ds["spec"]["template"]["spec"]
    volumes = {v["name"]: v for v in pod.get("volumes", [])}
    ctrs = {c["name"]: c for c in pod.get("containers", [])}
    images = {i["name"]: i for i in kust.get("images", [])}

    def host_path_of(mount: dict | None) -> str | None:
        if not mount:
            return None
        vol = volumes.get(mount["name"], {})
        return (vol.get("hostPath") or {}).get("path")

    sock = socket_path(EXPECT["endpoint"])
    sock_dir = str(Path(sock).parent)

    # Images: untagged in the manifest, pinned once in kustomization images.
    for c in pod.get("containers", []):
        name, tag = split_image(c["image"])
        check(f"container {c['name']}: image tag not written in node.yaml", tag is None,
              f"{c['image']} (pin it in kustomization.yaml images:)")
        entry = images.get(name)
        check(f"container {c['name']}: image pinned in kustomization", bool(entry and (entry.get("newTag") or entry.get("digest"))),
              f"no images: entry with newTag for {name}")
    check("kustomization: no unused images entries",
          set(images) <= {split_image(c["image"])[0] for c in pod.get("containers", [])},
          f"{sorted(set(images) - {split_image(c['image'])[0] for c in pod.get('containers', [])})}")
    for c in pod.get("containers", []):
        res = c.get("resources", {}) or {}
        check(f"container {c['name']}: resource requests and memory limit",
              bool(res.get("requests")) and "memory" in (res.get("limits") or {}))

    # Priority.
    prio = pod.get("priorityClassName")
    defined = {d.name for d in main if d.kind == "PriorityClass"}
    check("node pod has a priorityClassName", bool(prio))
    if prio:
        check(f"priorityClassName {prio} is a system class or defined in deploy/",
              prio.startswith("system-") or prio in defined)
    check("node pod tolerations set", bool(pod.get("tolerations")))

    # The plugin container.
    plugin = next((c for c in pod["containers"] if split_image(c["image"])[0] == EXPECT["image"]), None)
    if check(f"a container runs the {EXPECT['image']} image", plugin is not None):
        args = list(plugin.get("command", []) or []) + list(plugin.get("args", []) or [])
        penv = env_map(plugin)
        check("plugin: first argument is the plugin subcommand", bool(args) and args[0] == "plugin", f"args {args[:1]}")
        check("plugin: no command override (ENTRYPOINT is the binary)", "command" not in plugin)
        ep = arg_value(args, "--endpoint") or penv.get("SEALCSI_ENDPOINT")
        check("plugin: --endpoint", ep == EXPECT["endpoint"], f"{ep!r} != {EXPECT['endpoint']!r}")
        nid = arg_value(args, "--node-id") or penv.get("SEALCSI_NODE_ID")
        check("plugin: --node-id is $(NODE_NAME)", nid == "$(NODE_NAME)", f"{nid!r}")
        check("plugin: NODE_NAME from spec.nodeName", field_ref(penv.get("NODE_NAME")) == "spec.nodeName")
        mode = arg_value(args, "--mode") or penv.get("SEALCSI_MODE")
        check("plugin: --mode all", mode == "all", f"{mode!r}")
        tee = arg_value(args, "--tee") or penv.get("SEALCSI_TEE")
        check("plugin: --tee auto (hardware only) in the shipped deployment", tee == "auto", f"{tee!r}")
        sd = arg_value(args, "--state-dir") or penv.get("SEALCSI_STATE_DIR", EXPECT["state_dir"])
        check("plugin: state dir", sd == EXPECT["state_dir"], f"{sd!r}")
        dn = arg_value(args, "--driver-name") or penv.get("SEALCSI_DRIVER_NAME")
        check("plugin: driver name left at its default or set to the expected one",
              dn in (None, EXPECT["driver"]), f"{dn!r}")
        sc = plugin.get("securityContext", {}) or {}
        check("plugin: privileged", sc.get("privileged") is True)
        check("plugin: imagePullPolicy IfNotPresent (locally built image)",
              plugin.get("imagePullPolicy") == "IfNotPresent")
        m = mount_at(plugin, sock_dir)
        check(f"plugin: socket dir {sock_dir} is the host's {EXPECT['plugin_dir']}",
              host_path_of(m) == EXPECT["plugin_dir"], f"{host_path_of(m)!r}")
        m = mount_at(plugin, EXPECT["kubelet_dir"])
        check(f"plugin: {EXPECT['kubelet_dir']} mounted Bidirectional",
              host_path_of(m) == EXPECT["kubelet_dir"] and (m or {}).get("mountPropagation") == "Bidirectional")
        for path, ro in (("/dev", False), ("/sys", False), ("/lib/modules", True)):
            m = mount_at(plugin, path)
            check(f"plugin: host {path} mounted" + (" read-only" if ro else ""),
                  host_path_of(m) == path and (not ro or (m or {}).get("readOnly") is True))
        m = mount_at(plugin, EXPECT["state_dir"])
        vol = volumes.get((m or {}).get("name", ""), {})
        check(f"plugin: state dir {EXPECT['state_dir']} is a DirectoryOrCreate hostPath",
              (vol.get("hostPath") or {}).get("path") == EXPECT["state_dir"]
              and vol["hostPath"].get("type") == "DirectoryOrCreate")
        probe = (plugin.get("livenessProbe") or {}).get("httpGet") or {}
        port = probe.get("port")
        if isinstance(port, str):
            port = next((p["containerPort"] for p in plugin.get("ports", []) if p.get("name") == port), port)
        check(f"plugin: liveness probe GET /healthz on {EXPECT['health_port']}",
              probe.get("path") == "/healthz" and port == EXPECT["health_port"], f"{probe}")

    # No hostPath of a device type (fails on nodes without the device).
    for name, vol in volumes.items():
        t = (vol.get("hostPath") or {}).get("type")
        check(f"volume {name}: no CharDevice/BlockDevice hostPath", t not in ("CharDevice", "BlockDevice"), f"type {t}")

    # Sidecars.
    def sidecar(image_suffix: str) -> dict | None:
        return next((c for c in pod["containers"] if split_image(c["image"])[0].endswith("/" + image_suffix)), None)

    for suffix in ("csi-provisioner", "csi-resizer", "csi-node-driver-registrar", "livenessprobe"):
        c = sidecar(suffix)
        if not check(f"sidecar {suffix} present", c is not None):
            continue
        args = c.get("args", []) or []
        addr = arg_value(args, "--csi-address")
        check(f"{suffix}: --csi-address {sock}", socket_path(addr or "") == sock, f"{addr!r}")
        m = mount_at(c, sock_dir)
        check(f"{suffix}: socket dir is the host's {EXPECT['plugin_dir']}",
              host_path_of(m) == EXPECT["plugin_dir"], f"{host_path_of(m)!r}")
        sc = c.get("securityContext", {}) or {}
        check(f"{suffix}: not privileged", not sc.get("privileged"))

    prov = sidecar("csi-provisioner")
    if prov:
        a = prov.get("args", [])
        for flag in ("--node-deployment", "--strict-topology", "--enable-capacity"):
            check(f"csi-provisioner: {flag}", truthy_flag(a, flag))
        check("csi-provisioner: --immediate-topology=false", arg_value(a, "--immediate-topology") == "false")
        check("csi-provisioner: --capacity-ownerref-level=1 (the DaemonSet owns capacity objects)",
              arg_value(a, "--capacity-ownerref-level") == "1")
        pe = env_map(prov)
        check("csi-provisioner: NODE_NAME from spec.nodeName", field_ref(pe.get("NODE_NAME")) == "spec.nodeName")
        check("csi-provisioner: NAMESPACE and POD_NAME from the pod",
              field_ref(pe.get("NAMESPACE")) == "metadata.namespace" and field_ref(pe.get("POD_NAME")) == "metadata.name")
    reg = sidecar("csi-node-driver-registrar")
    if reg:
        a = reg.get("args", [])
        path = arg_value(a, "--kubelet-registration-path")
        check("registrar: --kubelet-registration-path", path == EXPECT["registration_path"],
              f"{path!r} != {EXPECT['registration_path']!r}")
        check("registrar: registration path is the socket dir's host path + socket name",
              path == f"{EXPECT['plugin_dir']}/{Path(sock).name}")
        m = mount_at(reg, "/registration")
        check(f"registrar: /registration is the host's {EXPECT['registry_dir']}",
              host_path_of(m) == EXPECT["registry_dir"], f"{host_path_of(m)!r}")
    lp = sidecar("livenessprobe")
    if lp:
        hp = arg_value(lp.get("args", []), "--health-port") or "9808"
        check(f"livenessprobe: --health-port {EXPECT['health_port']}", hp == str(EXPECT["health_port"]), hp)

    # RBAC wiring: the pod's ServiceAccount exists, bindings point at it and at defined roles, and no
    # rule uses wildcards or touches secrets.
    sa = pod.get("serviceAccountName")
    sas = {(d.body["metadata"].get("namespace"), d.name) for d in kinds("ServiceAccount")}
    check(f"ServiceAccount {sa} defined", (EXPECT["namespace"], sa) in sas)
    roles = {(d.kind, d.body["metadata"].get("namespace"), d.name) for d in main if d.kind in ("Role", "ClusterRole")}
    for b in [d for d in main if d.kind in ("RoleBinding", "ClusterRoleBinding")]:
        ref = b.body["roleRef"]
        ns = b.body["metadata"].get("namespace") if ref["kind"] == "Role" else None
        check(f"{b.where()}: roleRef {ref['kind']}/{ref['name']} defined", (ref["kind"], ns, ref["name"]) in roles)
        subs = b.body.get("subjects", [])
        check(f"{b.where()}: subject is the node ServiceAccount",
              all(s.get("kind") == "ServiceAccount" and s.get("name") == sa and s.get("namespace") == EXPECT["namespace"]
                  for s in subs) and bool(subs))
    for r in [d for d in main if d.kind in ("Role", "ClusterRole")]:
        for rule in r.body.get("rules", []):
            flat = rule.get("verbs", []) + rule.get("resources", []) + rule.get("apiGroups", [])
            check(f"{r.where()}: no wildcard in {rule.get('resources')}", "*" not in flat)
            check(f"{r.where()}: no access to secrets", "secrets" not in rule.get("resources", []))
    token_ctrs = [c["name"] for c in pod["containers"]
                  if mount_at(c, "/var/run/secrets/kubernetes.io/serviceaccount")]
    check("API token: not automounted into every container", pod.get("automountServiceAccountToken") is False)
    check("API token: only csi-provisioner and csi-resizer get it",
          sorted(token_ctrs) == sorted(c["name"] for c in (prov, sidecar("csi-resizer")) if c), f"{token_ctrs}")

    # The topology key is reported by the plugin (NodeGetInfo); manifests (comments included) and the
    # install guide name it for allowedTopologies and must not name another.
    texts = {d.path for d in docs} | {ROOT / "docs" / "install.md"}
    mentions = 0
    for path in sorted(p for p in texts if p.exists()):
        for found in sorted(set(re.findall(r"topology\.[a-z0-9.-]*sealcsi[a-z0-9./-]*[a-z0-9]", path.read_text()))):
            mentions += 1
            check(f"{path.relative_to(ROOT)}: topology key {found}", found == EXPECT["topology_key"],
                  f"expected {EXPECT['topology_key']}")
    check("topology key documented in deploy/ or docs/install.md", mentions > 0)


# ---- 2b. stacked components ---------------------------------------------------------------------------

def _matches(body: dict, kind: str, name: str, namespace: str | None = None) -> bool:
    meta = body.get("metadata", {})
    return (body.get("kind") == kind and meta.get("name") == name
            and (namespace is None or meta.get("namespace") in (None, namespace)))


def set_image_tags(bodies: list[dict], images: list[dict]) -> None:
    by_name = {i["name"]: i for i in images}
    for body in bodies:
        for c in containers_of(body):
            name, tag = split_image(c["image"])
            entry = by_name.get(name)
            if entry:
                new_name = entry.get("newName", name)
                c["image"] = (f"{new_name}@{entry['digest']}" if "digest" in entry
                              else f"{new_name}:{entry.get('newTag', tag or 'latest')}")


def render_component(comp_path: Path, base: list[dict], base_kust: dict) -> tuple[list[dict], list[str]]:
    """What kustomize renders for `resources: [deploy]` + `components: [<comp_path's dir>]`, for the
    fields components here use (resources, images, patches: JSON 6902 with a target, or a strategic
    `$patch: delete`). Anything else is an error, so the renderer never silently differs."""
    import jsonpatch

    comp = yaml.safe_load(comp_path.read_text())
    errors: list[str] = []
    out = copy.deepcopy(base)
    known = {"apiVersion", "kind", "resources", "images", "patches"}
    if set(comp) - known:
        errors.append(f"fields the validator does not render: {sorted(set(comp) - known)}")
    ns = base_kust.get("namespace")
    added = []
    for res in comp.get("resources", []) or []:
        for body in yaml.safe_load_all((comp_path.parent / res).read_text()):
            if body is None:
                continue
            if ns and body["kind"] not in CLUSTER_SCOPED:
                body.setdefault("metadata", {})["namespace"] = ns
            added.append(body)
    out += added
    for i, patch in enumerate(comp.get("patches", []) or []):
        text = patch.get("patch", "")
        target = patch.get("target")
        doc = yaml.safe_load(text)
        if target and isinstance(doc, list):
            hits = [b for b in out if _matches(b, target.get("kind"), target.get("name"))]
            if len(hits) != 1:
                errors.append(f"patch {i}: target {target} matches {len(hits)} objects")
                continue
            try:
                patched = jsonpatch.apply_patch(hits[0], doc)
            except (jsonpatch.JsonPatchException, jsonpatch.JsonPointerException) as e:
                errors.append(f"patch {i} ({target.get('kind')}/{target.get('name')}): {e}")
                continue
            out[out.index(hits[0])] = patched
        elif not target and isinstance(doc, dict) and doc.get("$patch") == "delete":
            meta = doc.get("metadata", {})
            hits = [b for b in out if _matches(b, doc.get("kind"), meta.get("name"), meta.get("namespace"))]
            if len(hits) != 1:
                errors.append(f"patch {i}: delete of {doc.get('kind')}/{meta.get('name')} matches {len(hits)}")
            for b in hits:
                out.remove(b)
        else:
            errors.append(f"patch {i}: a kind of patch the validator does not render")
    # As kustomize: the image tags after the patches (containers a patch adds get them too).
    set_image_tags(out, comp.get("images", []) or [])
    return out, errors


def check_stacked_component(comp_path: Path, rendered: list[dict], base_kust: dict, comp: dict) -> list[str]:
    """The stacked contract of one rendered component; returns the sealcsi args it uses (for the
    binary check)."""
    label = str(comp_path.parent.relative_to(ROOT))
    by_kind = lambda k: [b for b in rendered if b["kind"] == k]  # noqa: E731
    used_args: list[str] = []

    # Images: every one pinned, and a base image the component re-pins has the base's tag.
    base_pins = {i["name"]: i.get("newTag") for i in base_kust.get("images", [])}
    for i in comp.get("images", []) or []:
        if i["name"] in base_pins:
            check(f"{label}: image {i['name']} pinned as in deploy/kustomization.yaml",
                  i.get("newTag") == base_pins[i["name"]], f"{i.get('newTag')} != {base_pins[i['name']]}")
    for b in rendered:
        for c in containers_of(b):
            name, tag = split_image(c["image"])
            if name != EXPECT["image"]:
                check(f"{label}: {b['kind']}/{b['metadata']['name']} {c['name']}: image {c['image']} pinned",
                      tag not in (None, "latest"))

    def plugin_of(body: dict) -> dict | None:
        return next((c for c in containers_of(body) if split_image(c["image"])[0] == EXPECT["image"]), None)

    def pod_of(body: dict) -> dict:
        return body["spec"]["template"]["spec"]

    def volume_of(pod: dict, ctr: dict, path: str) -> dict | None:
        m = mount_at(ctr, path)
        return next((v for v in pod.get("volumes", []) if m and v["name"] == m["name"]), None)

    def check_backend_socket(kind: str, body: dict, plugin: dict) -> str | None:
        args = plugin.get("args", [])
        backend = arg_value(args, "--backend") or ""
        if not check(f"{label}: {kind} sealcsi --backend=csi:unix://...", backend.startswith("csi:unix:///"),
                     repr(backend)):
            return None
        sock = backend[len("csi:unix://"):]
        sock_dir = str(Path(sock).parent)
        pod = pod_of(body)
        vol = volume_of(pod, plugin, sock_dir)
        check(f"{label}: {kind} backend socket dir {sock_dir} is a volume of its own pod (emptyDir)",
              vol is not None and "emptyDir" in vol, f"{vol}")
        others = [c for c in pod["containers"] if c is not plugin and mount_at(c, sock_dir)]
        serving = [c for c in others if arg_value(c.get("args", []), "--endpoint") == f"unix://{sock}"]
        check(f"{label}: {kind} a backend container serves on {sock}", len(serving) == 1,
              f"{[c['name'] for c in others]}")
        check(f"{label}: {kind} only sealcsi and the backend share the backend socket",
              len(others) == len(serving), f"{[c['name'] for c in others]}")
        for c in serving:
            check(f"{label}: {kind} backend {c['name']} mounts the same socket volume",
                  vol is not None and mount_at(c, sock_dir)["name"] == vol["name"])
        return sock

    # The node DaemonSet.
    ds = next((b for b in by_kind("DaemonSet")), None)
    if not check(f"{label}: the node DaemonSet renders", ds is not None):
        return used_args
    node_plugin = plugin_of(ds)
    if not check(f"{label}: node DaemonSet runs sealcsi", node_plugin is not None):
        return used_args
    node_args = node_plugin.get("args", [])
    used_args += node_args
    check_backend_socket("node DaemonSet", ds, node_plugin)
    state = EXPECT["state_dir"]
    for c in pod_of(ds)["containers"]:
        m = mount_at(c, state)
        if c is node_plugin or m:
            check(f"{label}: node {c['name']} mounts {state} Bidirectional (the backend's devices)",
                  bool(m) and m.get("mountPropagation") == "Bidirectional", f"{m}")

    deployments = [b for b in by_kind("Deployment") if plugin_of(b)]
    node_mode = arg_value(node_args, "--mode")
    node_sidecars = {c["name"] for c in pod_of(ds)["containers"]}
    if not deployments:
        check(f"{label}: without a controller Deployment the node pod runs the controller (--mode=all)",
              node_mode == "all", f"{node_mode!r}")
        return used_args

    # A controller Deployment.
    check(f"{label}: one controller Deployment", len(deployments) == 1, f"{len(deployments)}")
    dep = deployments[0]
    pod = pod_of(dep)
    ctl = plugin_of(dep)
    ctl_args = ctl.get("args", [])
    used_args += ctl_args
    check(f"{label}: controller sealcsi: plugin --mode=controller",
          ctl_args[:1] == ["plugin"] and arg_value(ctl_args, "--mode") == "controller", f"{ctl_args}")
    check(f"{label}: node sealcsi: --mode=node", node_mode == "node", f"{node_mode!r}")
    check(f"{label}: node and controller stack over the same socket path",
          arg_value(ctl_args, "--backend") == arg_value(node_args, "--backend"))
    ep = arg_value(ctl_args, "--endpoint")
    check(f"{label}: controller sealcsi --endpoint", ep == EXPECT["endpoint"], f"{ep!r}")
    check_backend_socket("controller Deployment", dep, ctl)
    # The stacked controller needs no device-mapper, no sealing source (src/csi: needs_kernel).
    sc = ctl.get("securityContext", {})
    check(f"{label}: controller sealcsi not privileged, no privilege escalation",
          not sc.get("privileged") and sc.get("allowPrivilegeEscalation") is False, f"{sc}")
    host_paths = [v["name"] for v in pod.get("volumes", []) if "hostPath" in v]
    check(f"{label}: controller pod mounts nothing of its host", not host_paths, f"{host_paths}")
    sock = socket_path(EXPECT["endpoint"])
    sock_dir = str(Path(sock).parent)
    csi_vol = volume_of(pod, ctl, sock_dir)
    check(f"{label}: controller socket dir {sock_dir} is an emptyDir of the pod",
          csi_vol is not None and "emptyDir" in csi_vol)
    sidecars = {c["name"]: c for c in pod["containers"]
                if arg_value(c.get("args", []), "--csi-address") is not None}
    for need in ("csi-provisioner", "csi-attacher", "csi-resizer"):
        check(f"{label}: controller pod has {need}", need in sidecars)
    check(f"{label}: node pod runs no provisioner or resizer (the Deployment's do)",
          not ({"csi-provisioner", "csi-resizer"} & node_sidecars), f"{sorted(node_sidecars)}")
    replicas = dep["spec"].get("replicas", 1)
    for name, c in sidecars.items():
        args = c.get("args", [])
        check(f"{label}: {name} --csi-address={sock}", arg_value(args, "--csi-address") == sock)
        m = mount_at(c, sock_dir)
        check(f"{label}: {name} mounts sealcsi's socket volume", bool(m) and csi_vol is not None
              and m["name"] == csi_vol["name"])
        if name != "liveness-probe" and replicas > 1:
            check(f"{label}: {name} --leader-election ({replicas} replicas)", truthy_flag(args, "--leader-election"))
    prov = sidecars.get("csi-provisioner")
    if prov:
        check(f"{label}: csi-provisioner is central (no --node-deployment)",
              not truthy_flag(prov.get("args", []), "--node-deployment"))
    drivers = by_kind("CSIDriver")
    if check(f"{label}: one CSIDriver", len(drivers) == 1):
        spec = drivers[0]["spec"]
        check(f"{label}: CSIDriver attachRequired with csi-attacher",
              spec.get("attachRequired") is ("csi-attacher" in sidecars))
        capacity = prov is not None and truthy_flag(prov.get("args", []), "--enable-capacity")
        check(f"{label}: CSIDriver storageCapacity only with --enable-capacity",
              spec.get("storageCapacity") is capacity, f"{spec.get('storageCapacity')}")

    # RBAC of the Deployment: its ServiceAccount, bindings to defined roles, no wildcard, no secrets,
    # the token only in the sidecars.
    sa = pod.get("serviceAccountName")
    ns = base_kust.get("namespace")
    check(f"{label}: ServiceAccount {sa} defined",
          any(b["metadata"]["name"] == sa and b["metadata"].get("namespace") == ns for b in by_kind("ServiceAccount")))
    roles = {(b["kind"], b["metadata"].get("namespace") if b["kind"] == "Role" else None, b["metadata"]["name"])
             for b in rendered if b["kind"] in ("Role", "ClusterRole")}
    bound = set()
    for b in rendered:
        if b["kind"] not in ("RoleBinding", "ClusterRoleBinding"):
            continue
        ref = b["roleRef"]
        rns = b["metadata"].get("namespace") if ref["kind"] == "Role" else None
        check(f"{label}: {b['kind']}/{b['metadata']['name']}: roleRef defined", (ref["kind"], rns, ref["name"]) in roles)
        if any(s.get("name") == sa for s in b.get("subjects", [])):
            bound.add(ref["name"])
    for need in ("csi-provisioner", "csi-attacher", "csi-resizer", "csi-snapshotter"):
        if need in sidecars:
            check(f"{label}: a role for {need} is bound to {sa}",
                  any(need.removeprefix("csi-") in r for r in bound), f"{sorted(bound)}")
    for b in rendered:
        if b["kind"] in ("Role", "ClusterRole"):
            for rule in b.get("rules", []):
                flat = rule.get("verbs", []) + rule.get("resources", []) + rule.get("apiGroups", [])
                check(f"{label}: {b['kind']}/{b['metadata']['name']}: no wildcard in {rule.get('resources')}",
                      "*" not in flat)
                check(f"{label}: {b['kind']}/{b['metadata']['name']}: no access to secrets",
                      "secrets" not in rule.get("resources", []))
    check(f"{label}: controller API token not automounted", pod.get("automountServiceAccountToken") is False)
    token = [c["name"] for c in pod["containers"] if mount_at(c, "/var/run/secrets/kubernetes.io/serviceaccount")]
    check(f"{label}: controller API token only in the API-using sidecars",
          set(token) <= set(sidecars) - {"liveness-probe"} and bool(token), f"{token}")
    for c in containers_of(dep):
        res = c.get("resources", {}) or {}
        check(f"{label}: controller {c['name']}: resource requests and memory limit",
              bool(res.get("requests")) and "memory" in (res.get("limits") or {}))
    return used_args


def check_stacked(docs: list[Doc], kust: dict, versions: list[str]) -> list[str]:
    base = render_kustomization(kust, docs)
    used: list[str] = []
    comps = sorted(STACKED.rglob("kustomization.yaml"))
    check("deploy/stacked: components found", bool(comps))
    for comp_path in comps:
        label = str(comp_path.parent.relative_to(ROOT))
        comp = yaml.safe_load(comp_path.read_text())
        if not check(f"{label}: is a kustomize Component", comp.get("kind") == "Component"):
            continue
        rendered, errors = render_component(comp_path, base, kust)
        if not check(f"{label}: renders over deploy/", not errors, "; ".join(errors)):
            continue
        for body in rendered:
            validate_schema(f"rendered {label} {body['kind']}/{body['metadata']['name']}", body, versions)
        used += check_stacked_component(comp_path, rendered, kust, comp)
    return used


# ---- 3. Dockerfile -----------------------------------------------------------------------------------

def check_hadolint(path: Path) -> None:
    hadolint = os.environ.get("SEALCSI_HADOLINT", "hadolint")
    cmd = [hadolint, "--no-color", "--failure-threshold", "warning"]
    for rule in filter(None, os.environ.get("SEALCSI_HADOLINT_IGNORE", "").split(",")):
        cmd += ["--ignore", rule]
    try:
        version = subprocess.run([hadolint, "--version"], capture_output=True, text=True).stdout.split()[-1]
        run = subprocess.run(cmd + [str(path)], capture_output=True, text=True, timeout=60)
    except (OSError, IndexError) as e:
        check("hadolint runs", False, str(e))
        return
    out = (run.stdout + run.stderr).strip()
    check(f"hadolint {version}: {path.relative_to(ROOT)} parses and lints clean", run.returncode == 0,
          "\n        " + out.replace("\n", "\n        "))


def check_dockerfile(path: Path) -> None:
    import dockerfile

    check_hadolint(path)

    try:
        cmds = dockerfile.parse_file(str(path))
    except dockerfile.GoParseError as e:
        check("Dockerfile parses (BuildKit parser)", False, str(e))
        return
    check("Dockerfile parses (BuildKit parser)", True)

    args: dict[str, str] = {}
    stages: list[dict] = []
    for c in cmds:
        if c.cmd == "ARG" and not stages:
            k, _, v = c.value[0].partition("=")
            args[k] = v
        elif c.cmd == "FROM":
            image = re.sub(r"\$\{?(\w+)\}?", lambda m: args.get(m.group(1), m.group(0)), c.value[0])
            alias = c.value[2] if len(c.value) == 3 and c.value[1].upper() == "AS" else None
            stages.append({"image": image, "alias": alias, "cmds": []})
        elif stages:
            stages[-1]["cmds"].append(c)
    if not check("Dockerfile: at least two stages", len(stages) >= 2, f"{len(stages)}"):
        return
    build, final = stages[0], stages[-1]
    check("Dockerfile: build stage is rust on Debian bookworm",
          re.fullmatch(r"rust:[0-9.]+-bookworm", build["image"]) is not None, build["image"])
    check("Dockerfile: runtime is debian:bookworm-slim", final["image"] == "debian:bookworm-slim", final["image"])

    def runs(stage: dict) -> str:
        return "\n".join(" ".join(c.value) for c in stage["cmds"] if c.cmd == "RUN")

    def installed(stage: dict) -> set[str]:
        pkgs: set[str] = set()
        for m in re.finditer(r"apt-get install ([^&;|]*)", runs(stage)):
            pkgs |= {w for w in m.group(1).split() if not w.startswith("-")}
        return pkgs

    want_build = {"libdevmapper-dev", "libclang-dev", "pkg-config"}
    check("Dockerfile: build stage installs libdevmapper-dev libclang-dev pkg-config",
          want_build <= installed(build), f"{sorted(installed(build))}")
    check("Dockerfile: cargo build --release --locked",
          re.search(r"cargo build[^\n]*--release[^\n]*--locked|cargo build[^\n]*--locked[^\n]*--release", runs(build)) is not None)
    runtime_pkgs = installed(final)
    # The tools the plugin execs, and the tpm2-tss runtime libraries the binary links (tss-esapi).
    allowed = {"e2fsprogs", "xfsprogs", "util-linux",
               "libtss2-esys-3.0.2-0", "libtss2-tctildr0", "libtss2-tcti-device0"}
    check("Dockerfile: runtime installs only the exec'd tools and the linked tpm2-tss libraries",
          runtime_pkgs <= allowed and {"e2fsprogs", "xfsprogs"} <= runtime_pkgs, f"{sorted(runtime_pkgs)}")
    check("Dockerfile: runtime apt lists and docs removed",
          "/var/lib/apt/lists" in runs(final) and "/usr/share/doc" in runs(final))
    aliases = {s["alias"] for s in stages if s["alias"]}
    for s in stages:
        for c in s["cmds"]:
            for f in c.flags:
                if f.startswith("--from="):
                    check(f"Dockerfile: COPY {f} names a stage", f.split("=", 1)[1] in aliases)
    ep = [c for c in final["cmds"] if c.cmd == "ENTRYPOINT"]
    check(f'Dockerfile: ENTRYPOINT ["{EXPECT["binary"]}"] (exec form)',
          len(ep) == 1 and ep[0].json and list(ep[0].value) == [EXPECT["binary"]],
          ep[-1].original if ep else "none")
    copies = [c for c in final["cmds"] if c.cmd == "COPY" and any(f.startswith("--from=") for f in c.flags)]
    check(f"Dockerfile: the binary is copied to {EXPECT['binary']}",
          any(c.value[-1] == EXPECT["binary"] for c in copies))

    # Every tool the plugin's source runs must come with the runtime image.
    src = ROOT / "src"
    tools: set[str] = set()
    unknown: set[str] = set()
    for rs in src.rglob("*.rs"):
        text = rs.read_text()
        for m in re.finditer(r'Command::new\(\s*"([^"]+)"', text):
            (tools if m.group(1) in TOOL_PACKAGES else unknown).add(m.group(1))
        for m in re.finditer(r'"([a-z0-9_.]+)"', text):
            if m.group(1) in TOOL_PACKAGES:
                tools.add(m.group(1))
    check("Dockerfile: every program src/ executes is a known tool", not unknown,
          f"{sorted(unknown)}: add its package to deploy/Dockerfile and to TOOL_PACKAGES in tests/deploy/validate.py")
    for tool in sorted(tools):
        pkg = TOOL_PACKAGES[tool]
        essential = pkg == "util-linux"  # essential in Debian: always in debian:bookworm-slim
        check(f"Dockerfile: runtime carries {tool} ({pkg})", pkg in runtime_pkgs or essential)


# ---- 4. the binary's help ----------------------------------------------------------------------------

def help_options(text: str) -> dict[str, str]:
    """--option -> the help text of that option (joined lines)."""
    out: dict[str, str] = {}
    current = None
    for line in text.splitlines():
        m = re.match(r"\s+(?:-\w, )?(--[\w-]+)", line)
        if m:
            current = m.group(1)
            out[current] = line
        elif current and (line.startswith(" " * 8) or not line.strip()):
            # clap's long help puts blank lines inside an option's block (before "Possible values").
            out[current] += " " + line.strip()
        else:
            current = None
    return out


def bracket(opt_text: str, label: str) -> str | None:
    m = re.search(r"\[" + label + r": ([^\]]*)\]", opt_text)
    return m.group(1).strip() if m else None


def check_binary(binary: Path, plugin_args: list[str]) -> None:
    if not binary.exists():
        note(f"{binary.relative_to(ROOT)} not built: skipped comparing the binary's --help (cargo build first)")
        return
    try:
        top = subprocess.run([str(binary), "--help"], capture_output=True, text=True, timeout=30)
    except OSError as e:
        check("sealcsi --help runs", False, str(e))
        return
    if not check("sealcsi --help runs", top.returncode == 0, top.stderr.strip()):
        return
    opts = help_options(top.stdout)
    tee = opts.get("--tee", "")
    values = [v.strip() for v in (bracket(tee, "possible values") or "").split(",") if v.strip()]
    check("binary: --tee accepts " + "|".join(EXPECT["tee_values"]), set(EXPECT["tee_values"]) <= set(values), f"{values}")
    check("binary: --tee env SEALCSI_TEE", (bracket(tee, "env") or "").startswith("SEALCSI_TEE"))
    sd = opts.get("--state-dir", "")
    check("binary: --state-dir default", bracket(sd, "default") == EXPECT["state_dir"], f"{bracket(sd, 'default')!r}")
    check("binary: --state-dir env SEALCSI_STATE_DIR", (bracket(sd, "env") or "").startswith("SEALCSI_STATE_DIR"))
    check("binary: --log env SEALCSI_LOG", (bracket(opts.get("--log", ""), "env") or "").startswith("SEALCSI_LOG"))

    plug = subprocess.run([str(binary), "plugin", "--help"], capture_output=True, text=True, timeout=30)
    if plug.returncode != 0:
        reason = (plug.stderr.strip().splitlines() or ["(no message)"])[0]
        note(f"`sealcsi plugin --help` failed ({reason}): the plugin subcommand is not built yet; "
             "skipped comparing its defaults")
        return
    popts = help_options(plug.stdout)
    for flag, env_name in (("--endpoint", "SEALCSI_ENDPOINT"), ("--node-id", "SEALCSI_NODE_ID"),
                           ("--mode", "SEALCSI_MODE"), ("--driver-name", "SEALCSI_DRIVER_NAME")):
        text = popts.get(flag)
        if not check(f"binary: plugin {flag} exists", text is not None):
            continue
        check(f"binary: plugin {flag} env {env_name}", (bracket(text, "env") or "").startswith(env_name),
              f"{bracket(text, 'env')!r}")
    ep_default = bracket(popts.get("--endpoint", ""), "default")
    if ep_default is not None:
        check("binary: plugin --endpoint default", ep_default == EXPECT["endpoint"], f"{ep_default!r}")
    dn_default = bracket(popts.get("--driver-name", ""), "default")
    if dn_default is not None:
        check("binary: plugin --driver-name default", dn_default == EXPECT["driver"], f"{dn_default!r}")
    else:
        note("plugin --driver-name shows no default in --help; could not compare the driver name")
    modes = bracket(popts.get("--mode", ""), "possible values") or ""
    if modes:
        check("binary: plugin --mode accepts all", "all" in [m.strip() for m in modes.split(",")], modes)
    # Every flag the node DaemonSet and the stacked components pass must exist.
    for a in plugin_args[1:]:
        if a.startswith("--"):
            flag = a.split("=", 1)[0]
            check(f"binary: plugin accepts {flag} (used in deploy/)", flag in popts or flag in opts)


# ---- main --------------------------------------------------------------------------------------------

def section(title: str) -> None:
    print(f"== {title}")


def main() -> int:
    docs, errors = load_docs()
    section("YAML")
    check("every YAML file under deploy/ parses into Kubernetes objects", not errors, "; ".join(errors))
    kusts = [d for d in docs if d.kind == "Kustomization"]
    main_kust = next((d for d in kusts if d.path == DEPLOY / "kustomization.yaml"), None)
    if not check("deploy/kustomization.yaml exists", main_kust is not None):
        return finish()
    kust = main_kust.body

    versions = newest_versions()
    import kubernetes_validate
    section(f"schemas (kubernetes-validate {kubernetes_validate.__version__ if hasattr(kubernetes_validate, '__version__') else ''}"
            f" knows up to {versions[-1]}; validating against {', '.join(versions)})")
    for d in docs:
        # kustomize's own files (deploy/kustomization.yaml, the deploy/stacked/ component) have no schema.
        if d.kind in ("Kustomization", "Component"):
            continue
        validate_schema(d.where(), d.body, versions)
    for body in render_kustomization(kust, docs):
        validate_schema(f"rendered -k deploy/ {body['kind']}/{body['metadata']['name']}", body, versions)
        for c in containers_of(body):
            name, tag = split_image(c["image"])
            if name != EXPECT["image"]:
                check(f"rendered image {c['image']} has a pinned tag", tag not in (None, "latest"))

    section("contract")
    check_contract(docs, kust)

    section("stacked components")
    stacked_args = check_stacked(docs, kust, versions)

    section("Dockerfile")
    check_dockerfile(DEPLOY / "Dockerfile")

    section("binary")
    ds = next((d for d in docs if d.kind == "DaemonSet" and d.path.parent == DEPLOY), None)
    plugin_args: list[str] = []
    if ds:
        for c in ds.body["spec"]["template"]["spec"]["containers"]:
            if split_image(c["image"])[0] == EXPECT["image"]:
                plugin_args = c.get("args", [])
    check_binary(ROOT / "target" / "debug" / "sealcsi", plugin_args + stacked_args)
    return finish()


def finish() -> int:
    print()
    if failed:
        print("FAILED checks:")
        for f in failed:
            print(f"  - {f}")
    print(f"deploy: {len(passed)} passed, {len(failed)} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
