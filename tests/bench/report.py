#!/usr/bin/env python3
"""Turns the raw benchmark records into the tables and target/bench/results.json.

Inputs (all optional, whatever exists is reported):
  target/bench/guest.jsonl, target/bench/fio/*.json   written by tests/bench/guest-bench.sh (guest)
  target/bench/host.json                              written by benches/control_path.rs (host)
  target/criterion/**/new/estimates.json              written by criterion (host)
Usage: report.py [--guest-only] [--repo DIR] [--out DIR (default target/bench)]
"""

import glob
import json
import os
import statistics
import sys

args = sys.argv[1:]
GUEST_ONLY = "--guest-only" in args
REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
if "--repo" in args:
    REPO = args[args.index("--repo") + 1]
OUT = os.path.join(REPO, "target", "bench")
if "--out" in args:
    OUT = os.path.abspath(args[args.index("--out") + 1])

PEER = "luks2-integrity"


def load_jsonl(path):
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def fmt_s(x, est=False):
    if x is None:
        return "-"
    s = f"{x:.2f} s" if x < 100 else f"{x:.0f} s"
    return ("~" + s + " (est)") if est else s


def ratio(a, b):
    if a is None or b is None or b == 0:
        return None
    return a / b


def fmt_ratio(r):
    return "-" if r is None else f"{r:.2f}x"


def table(headers, rows):
    widths = [len(h) for h in headers]
    for r in rows:
        for i, c in enumerate(r):
            widths[i] = max(widths[i], len(str(c)))
    line = lambda cells: "| " + " | ".join(str(c).ljust(widths[i]) for i, c in enumerate(cells)) + " |"
    out = [line(headers), "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    out += [line(r) for r in rows]
    return "\n".join(out)


results = {}
records = load_jsonl(os.path.join(OUT, "guest.jsonl"))
meta = next((r for r in records if r["kind"] == "meta"), None)
if meta:
    results["guest"] = {"meta": meta}

# ------------------------------------------------------------------ provisioning
prov = {}
for r in records:
    if r["kind"] == "prov":
        t = r["t"]
        prov[(r["stack"], r["size_mib"])] = {
            "total_s": t[-1] - t[0],
            "phases": {p: t[i + 1] - t[i] for i, p in enumerate(r["phases"])},
            "init_s": r.get("init_s"),
            "mkfs_s": r.get("mkfs_s"),
            "journal_mib": None if r.get("journal_sectors") is None else r["journal_sectors"] / 2048,
            "open_mem_mib": None if r.get("open_mem_kib") is None else r["open_mem_kib"] / 1024,
            "allocated_mib": r.get("allocated_kib", 0) / 1024,
            "estimated": False,
        }
nowipe = next((r for r in records if r["kind"] == "prov_nowipe"), None)
sizes = sorted({s for (_, s) in prov})
# Full wipes are extrapolated (linear in the size) up to this size only: beyond it the guess says nothing.
EXTRAPOLATE_MAX_MIB = 65536


def extrapolate(stack, size):
    """Linear in size from the two largest measured sizes (the wipe is a sequential write)."""
    pts = sorted((s, v["total_s"]) for (st, s), v in prov.items() if st == stack and not v["estimated"])
    if not pts or size > EXTRAPOLATE_MAX_MIB:
        return None
    if len(pts) == 1:
        return pts[0][1] * size / pts[0][0]
    (s1, t1), (s2, t2) = pts[-2], pts[-1]
    slope = (t2 - t1) / (s2 - s1)
    return t2 + slope * (size - s2)


def fmt_mib(x):
    return "-" if x is None else f"{x:.1f} MiB"


def fmt_size(mib):
    return f"{mib / 1024:g} GiB" if mib < 1 << 20 else f"{mib / (1 << 20):.4g} TiB"


prov_rows = []
prov_json = []
for size in sizes:
    row = {"size_mib": size}
    cells = []
    for stack in ("floor", "sealcsi-fast", "sealcsi-full", PEER):
        v = prov.get((stack, size))
        if v is None:
            est = None if stack in ("floor", "sealcsi-fast") else extrapolate(stack, size)
            v = None if est is None else {"total_s": est, "estimated": True}
        row[stack] = v
        cells.append(v)
    floor, fast, full, peer = cells
    if not any(cells):
        continue
    r_floor = ratio(fast and fast["total_s"], floor and floor["total_s"])
    r_full = ratio(peer and peer["total_s"], full and full["total_s"])
    row["fast_over_floor"] = r_floor
    row["peer_over_full"] = r_full
    prov_json.append(row)
    prov_rows.append(
        [
            fmt_size(size),
            fmt_s(floor and floor["total_s"]),
            fmt_s(fast and fast["total_s"]),
            fmt_ratio(r_floor),
            fmt_s(fast and fast.get("init_s")),
            fmt_s(fast and fast.get("mkfs_s")),
            fmt_s(full and full["total_s"], full and full["estimated"]),
            fmt_s(peer and peer["total_s"], peer and peer["estimated"]),
            fmt_ratio(r_full),
            fmt_mib(fast and fast.get("journal_mib")),
            fmt_mib(fast and fast.get("open_mem_mib")),
        ]
    )
if prov_json:
    results.setdefault("guest", {})["provisioning"] = prov_json
    if nowipe:
        results["guest"]["peer_luksformat_without_wipe_s"] = nowipe["t"][1] - nowipe["t"][0]

# ------------------------------------------------------------------ data path
fio = {}
for path in glob.glob(os.path.join(OUT, "fio", "*.json")):
    stack, wl, run = os.path.basename(path)[: -len(".json")].rsplit(".", 2)
    try:
        with open(path) as f:
            text = f.read()
        d = json.loads(text[text.index("{") :])
    except (ValueError, OSError):
        continue
    job = d["jobs"][0]
    side = job["write"] if "write" in wl else job["read"]
    fio.setdefault((stack, wl), []).append(
        {"mib_s": side["bw"] / 1024, "iops": side["iops"], "lat_us_mean": side["lat_ns"]["mean"] / 1000}
    )


def metric(wl):
    return "mib_s" if wl.startswith("seq") else "iops"


def summary(stack, wl):
    runs = fio.get((stack, wl))
    if not runs:
        return None
    vals = [r[metric(wl)] for r in runs]
    med = statistics.median(vals)
    return {
        "unit": "MiB/s" if metric(wl) == "mib_s" else "IOPS",
        "median": med,
        "min": min(vals),
        "max": max(vals),
        "spread_pct": 0 if med == 0 else 100 * (max(vals) - min(vals)) / med,
        "runs": len(vals),
        "values": vals,
        "lat_us_mean_median": statistics.median(r["lat_us_mean"] for r in runs),
    }


def cell(s):
    if s is None:
        return "-"
    v = f"{s['median']:.1f}" if s["unit"] == "MiB/s" else f"{s['median']:.0f}"
    return f"{v} ±{s['spread_pct'] / 2:.0f}%" if s["runs"] > 1 else v


tables = {}
for r in records:
    if r["kind"] == "table":
        tables[r["stack"]] = r["table"]
stacks = sorted({s for (s, _) in fio})
ALL_WORKLOADS = [
    "seqwrite1m", "seqread1m", "randwrite4k", "randread4k",
    "seqwrite1m-qd16", "seqread1m-qd16", "randwrite4k-qd16", "randread4k-qd16",
]
workloads = [w for w in ALL_WORKLOADS if any(wl == w for (_, wl) in fio)]
if fio:
    results.setdefault("guest", {})["data_path"] = {
        s: {w: summary(s, w) for w in workloads if summary(s, w)} for s in stacks
    }
    results["guest"]["dm_tables"] = tables

data_rows = []
COMPARE = [("sealcsi-J", PEER), ("sealcsi-D", PEER + "-D"), ("sealcsi-crypt", "luks2-plain")]
for wl in workloads:
    row = [wl + (" MiB/s" if metric(wl) == "mib_s" else " IOPS"), cell(summary("raw", wl))]
    for ours, theirs in COMPARE:
        a, b = summary(ours, wl), summary(theirs, wl)
        row += [cell(a), cell(b), fmt_ratio(ratio(a and a["median"], b and b["median"]))]
    data_rows.append(row)

LEVERS = [
    ("sealcsi-J", "sealcsi as shipped (J, 4096, random IV, tag 48, its default workqueues)"),
    ("man-J-wq", "J, workqueues queued (the kernel's default)"),
    ("man-J-rin", "J, reads inline (no_read_workqueue)"),
    ("man-J-win", "J, writes inline (no_write_workqueue)"),
    ("man-J-inline", "J, both inline (no_read_workqueue no_write_workqueue)"),
    ("man-J-plain64-tag32", "J, inline, IV plain64, tag 32 (the peer's cipher)"),
    ("man-J-512", "J, inline, sector size 512"),
    ("man-J-wq-js8m", "J queued, journal_sectors 16384 (8 MiB)"),
    ("man-J-wq-js64m", "J queued, journal_sectors 131072 (64 MiB)"),
    ("man-J-wq-buf1k", "J queued, buffer_sectors 1024"),
    ("man-J-wq-ct1s", "J queued, commit_time 1000 ms"),
    ("man-J-wq-wm90", "J queued, journal_watermark 90"),
    ("sealcsi-D", "sealcsi direct (its default workqueues)"),
    ("man-D-wq", "D, queued"),
    ("man-D-rin", "D, reads inline"),
    ("man-D-inline", "D, both inline"),
    (PEER, "peer as configured (J, workqueues queued, plain64, tag 32)"),
    (PEER + "-nowq", "peer + no_read/no_write_workqueue"),
    (PEER + "-D", "peer --integrity-no-journal"),
    ("luks2-plain", "peer crypt-only (workqueues queued)"),
    ("luks2-plain-nowq", "peer crypt-only + no workqueues"),
    ("sealcsi-crypt", "sealcsi crypt-only"),
]
lever_rows = []
for stack, what in LEVERS:
    if not any(s == stack for (s, _) in fio):
        continue
    row = [stack, what]
    for wl in workloads:
        s, ref = summary(stack, wl), summary("sealcsi-J", wl)
        row.append(f"{cell(s)} ({fmt_ratio(ratio(s and s['median'], ref and ref['median']))})" if s else "-")
    lever_rows.append(row)

# ------------------------------------------------------------------ scale
scale = next((r for r in records if r["kind"] == "scale"), None)
if scale:
    times = [b - a for a, b in scale["stage"]]
    n = scale["n"]
    used = scale["mem_available_kib"][0] - scale["mem_available_kib"][1]
    slab = scale["slab_kib"][1] - scale["slab_kib"][0]
    td = next((r for r in records if r["kind"] == "scale_teardown"), None)
    results.setdefault("guest", {})["scale"] = {
        "n": n,
        "volume_mib": scale["volume_mib"],
        "stage_first_s": times[0],
        "stage_last_s": times[-1],
        "stage_median_s": statistics.median(times),
        "stage_max_s": max(times),
        "stage_times_s": times,
        "mem_per_volume_kib": used / n,
        "slab_per_volume_kib": slab / n,
        "teardown_total_s": td and td["t"][1] - td["t"][0],
        "integrity_table": scale["integrity_table"],
    }

# ------------------------------------------------------------------ host (criterion + control path)
host = {}
if not GUEST_ONLY:
    for est in glob.glob(os.path.join(REPO, "target", "criterion", "**", "new", "estimates.json"), recursive=True):
        name = os.path.relpath(os.path.dirname(os.path.dirname(est)), os.path.join(REPO, "target", "criterion"))
        with open(est) as f:
            e = json.load(f)
        host.setdefault("criterion", {})[name] = {
            "median_us": e["median"]["point_estimate"] / 1000,
            "median_ci_us": [
                e["median"]["confidence_interval"]["lower_bound"] / 1000,
                e["median"]["confidence_interval"]["upper_bound"] / 1000,
            ],
        }
    hp = os.path.join(OUT, "host.json")
    if os.path.exists(hp):
        with open(hp) as f:
            host["control_path"] = json.load(f)
    if host:
        results["host"] = host

# ------------------------------------------------------------------ print
out = []
if meta:
    out.append(
        f"guest: {meta['kernel']}, {meta['cryptsetup']}, {meta['fio']}, {meta['date']}"
        + (" [TINY configuration: not a measurement]" if meta["tiny"] else "")
    )
if prov_rows:
    out.append("\n## 1. Provisioning: blank sparse file -> mounted, usable ext4 (lower is better)")
    out.append(
        table(
            ["size", "floor (loop+mkfs+mount)", "sealcsi fast", "fast/floor", "of which pre-write", "mkfs",
             "sealcsi full", "peer (LUKS2 integrity)", "peer/full", "integrity journal", "memory pinned by open"],
            prov_rows,
        )
    )
    if nowipe:
        out.append(f"peer luksFormat without its wipe (PBKDF, headers): {nowipe['t'][1] - nowipe['t'][0]:.2f} s")
if data_rows:
    out.append(
        f"\n## 2. Data path: fio O_DIRECT, libaio; median of {meta['runs'] if meta else '?'} runs ±half the spread (higher is better)"
    )
    heads = ["workload", "raw"]
    for ours, theirs in COMPARE:
        heads += [ours, theirs, "ratio"]
    out.append(table(heads, data_rows))
if lever_rows:
    out.append("\n## 3. Levers (median; ratio against sealcsi-J)")
    out.append(table(["stack", "what changed"] + workloads, lever_rows))
if tables:
    out.append("\n## dm tables (keys cut)")
    for s in stacks:
        if s in tables:
            out.append(f"{s}:\n  " + tables[s].strip().replace("\n", "\n  "))
sc = results.get("guest", {}).get("scale")
if sc:
    out.append(f"\n## 4. Scale: {sc['n']} volumes ({sc['volume_mib']} MiB, AEAD J, ext4) staged at once (open + mount)")
    out.append(
        table(
            ["first stage", f"stage #{sc['n']}", "median", "max", "memory / staged volume", "of which slab", "teardown all"],
            [
                [
                    fmt_s(sc["stage_first_s"]),
                    fmt_s(sc["stage_last_s"]),
                    fmt_s(sc["stage_median_s"]),
                    fmt_s(sc["stage_max_s"]),
                    f"{sc['mem_per_volume_kib'] / 1024:.2f} MiB",
                    f"{sc['slab_per_volume_kib'] / 1024:.2f} MiB",
                    fmt_s(sc["teardown_total_s"]),
                ]
            ],
        )
    )
if host:
    out.append("\n## Host: control path (in-memory kernel fakes, real gRPC server on a unix socket)")
    rows = []
    for name, v in sorted(host.get("criterion", {}).items()):
        rows.append([name, f"{v['median_us']:.1f} µs", f"[{v['median_ci_us'][0]:.1f}, {v['median_ci_us'][1]:.1f}]"])
    if rows:
        out.append(table(["criterion bench", "median", "95% CI"], rows))
    cp = host.get("control_path")
    if cp:
        rows = [[k, v if isinstance(v, str) else (f"{v:.3f}" if isinstance(v, float) else str(v))] for k, v in cp.items()]
        out.append(table(["control path", "value"], rows))
print("\n".join(out))

os.makedirs(OUT, exist_ok=True)
dest = os.path.join(OUT, "results.json")
with open(dest, "w") as f:
    json.dump(results, f, indent=1)
print(f"\nresults: {dest}")
