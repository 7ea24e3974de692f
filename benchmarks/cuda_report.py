#!/usr/bin/env python3
"""Resource report of every CUDA kernel for sm_90 (no GPU needed; stdlib only).

Compiles each cuda/*.cu for sm_90 with the package's nvcc flags and prints, per
kernel instantiation: block size, registers per thread, static shared memory,
stack frame (local memory), spill stores/loads, and the theoretical occupancy
on an H100 (the rules of CUDA's cuda_occupancy.h for compute capability 9.0).

Then, per op of the TBD loss and per kernel, the launches and the minimum vs actual bytes
of global memory per call at RetinaNet batch 2 and 16 (benchmarks/traffic_model.py, a model
from the shapes; its formulas are in that file's docstring).

The block size is the kernel's __launch_bounds__ as the compiler evaluated it
(PTX .maxntid, so constants, template parameters and library policies all
resolve), or 256 for a kernel without one (marked *). Occupancy counts static
shared memory only; dynamic shared memory is a launch argument.

    python3 benchmarks/cuda_report.py [--root DIR] [--csv PATH] [--fail-on-spill]

Exit status: 0 ok, 1 a kernel spills (with --fail-on-spill), 2 nvcc or the
sources not found, 3 nvcc failed.
"""
import argparse
import concurrent.futures
import csv
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import traffic_model  # noqa: E402  (benchmarks/ is not a package)

ROOT = Path(__file__).resolve().parent.parent
ARCH = "sm_90"
FLAGS = ["-gencode=arch=compute_90,code=sm_90", "-O3", "-std=c++17", "-fmad=false",
         "-Xptxas", "-v", "--expt-relaxed-constexpr",
         "-D__CUDA_NO_HALF_OPERATORS__", "-D__CUDA_NO_HALF_CONVERSIONS__",
         "-D__CUDA_NO_BFLOAT16_CONVERSIONS__", "-D__CUDA_NO_HALF2_OPERATORS__"]
DEFAULT_BLOCK = 256
DTYPES = ("float", "double", "half", "bf16")  # row order within a kernel
# H100 SXM / PCIe (compute capability 9.0), per SM.
H100 = dict(regs=65536, regs_per_block=65536, reg_unit=256, sub_partitions=4,
            warps=64, blocks=32, max_block=1024,
            smem=228 * 1024, smem_per_block=227 * 1024, smem_reserved=1024, smem_unit=128)


def _up(x, unit):
    return -(-x // unit) * unit


def block_limits(threads, regs, smem, h=H100):
    """Resident blocks per SM allowed by each resource (0: the block cannot launch)."""
    warps = -(-threads // 32)
    reg_warp = _up(max(regs, 1) * 32, h["reg_unit"])  # registers are allocated per warp
    if (threads > h["max_block"] or smem > h["smem_per_block"]
            or reg_warp * _up(warps, h["sub_partitions"]) > h["regs_per_block"]):
        return dict(launch=0)
    # Warps are placed on 4 sub-partitions of 16,384 registers each.
    warps_by_regs = (h["regs"] // h["sub_partitions"] // reg_warp) * h["sub_partitions"]
    return dict(regs=warps_by_regs // warps,
                smem=h["smem"] // _up(smem + h["smem_reserved"], h["smem_unit"]),
                warps=h["warps"] // warps,
                blocks=h["blocks"])


def occupancy(threads, regs, smem, h=H100):
    """Theoretical occupancy: resident warps per SM / 64, as a fraction."""
    return min(block_limits(threads, regs, smem, h).values()) * -(-threads // 32) / h["warps"]


def limiter(threads, regs, smem):
    lim = block_limits(threads, regs, smem)
    return "" if occupancy(threads, regs, smem) == 1 else min(lim, key=lim.get)


def parse_ptxas(text):
    """ptxas -v output -> {mangled: resources} for entries, and {function: spill bytes} for all."""
    entries, spills, entry, func = {}, {}, None, None
    for line in text.splitlines():
        m = re.search(r"Compiling entry function '([^']+)' for '(\w+)'", line)
        if m:
            entry = dict(regs=0, smem=0, stack=0, spill_st=0, spill_ld=0) if m.group(2) == ARCH else None
            if entry is not None:
                entries[m.group(1)] = entry
            continue
        m = re.search(r"Function properties for (\S+)", line)
        if m:
            func = m.group(1)
            continue
        m = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", line)
        if m and func:
            st, ld = int(m.group(2)), int(m.group(3))
            if st or ld:
                spills[func] = (st, ld)
            if func in entries:
                entries[func].update(stack=int(m.group(1)), spill_st=st, spill_ld=ld)
            continue
        m = re.search(r"Used (\d+) registers", line)
        if m and entry is not None:
            sm = re.search(r"(\d+) bytes smem", line)
            entry.update(regs=int(m.group(1)), smem=int(sm.group(1)) if sm else 0)
    return entries, spills


def parse_ptx_block_sizes(ptx):
    """PTX -> {mangled entry: threads per block from .maxntid / .reqntid}."""
    out = {}
    for m in re.finditer(r"\.entry\s+(\w+)\s*\([^)]*\)([^{]*)\{", ptx):
        d = re.search(r"\.(?:maxntid|reqntid)\s+(\d+)(?:\s*,\s*(\d+))?(?:\s*,\s*(\d+))?", m.group(2))
        if d:
            out[m.group(1)] = int(d.group(1)) * int(d.group(2) or 1) * int(d.group(3) or 1)
    return out


def compile_one(nvcc, root, cu, tmp):
    keep = Path(tmp) / cu.stem
    keep.mkdir()
    cmd = [nvcc, *FLAGS, "-I", str(root / "csrc" / "include"), "-I", str(root / "cuda"),
           "-cubin", "--keep", "--keep-dir", str(keep), str(cu), "-o", str(keep / "out.cubin")]
    p = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, universal_newlines=True,
                       errors="replace")
    if p.returncode != 0:
        raise RuntimeError(f"nvcc failed on {cu} (exit {p.returncode}):\n{p.stdout[-6000:]}")
    ptx = "".join(f.read_text(errors="replace") for f in keep.glob("*.ptx"))
    return parse_ptxas(p.stdout) + (parse_ptx_block_sizes(ptx),)


def find_nvcc(explicit=None):
    if explicit:
        return explicit if os.access(explicit, os.X_OK) else None
    homes = (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda")
    cands = [shutil.which("nvcc")] + [os.path.join(d, "bin", "nvcc") for d in homes if d]
    return next((c for c in cands if c and os.access(c, os.X_OK)), None)


def demangle(names, nvcc):
    tools = [os.path.join(os.path.dirname(nvcc), "cu++filt"), shutil.which("cu++filt"), shutil.which("c++filt")]
    tool = next((t for t in tools if t and os.access(t, os.X_OK)), None)
    if tool and names:
        p = subprocess.run([tool], input="\n".join(names) + "\n", stdout=subprocess.PIPE, universal_newlines=True)
        out = p.stdout.splitlines()
        if p.returncode == 0 and len(out) == len(names):
            return out
    return list(names)


def short(name):
    """Readable kernel name: no return type, parameters, namespaces or nested template arguments."""
    name = re.sub(r"^void ", "", name)
    if name.endswith(")"):  # drop the (balanced) parameter list
        depth = 0
        for i in range(len(name) - 1, -1, -1):
            depth += {")": 1, "(": -1}.get(name[i], 0)
            if depth == 0:
                name = name[:i]
                break
    name = re.sub(r"\(anonymous namespace\)::|tbd_ops::cuda::|tbd_ops::|CUB_\d+_SM_\d+::|detail::", "", name)
    name = re.sub(r"(?<=[<(, ])(?:\w+::)+", "", name)  # qualifiers inside template arguments
    name = re.sub(r"(?<!\w)__nv_bfloat16(?!\w)", "bf16", re.sub(r"(?<!\w)__half(?!\w)", "half", name))
    out, depth = [], 0
    for c in name:  # nested template arguments -> <...>
        if c == "<":
            depth += 1
            out.append({1: "<", 2: "<..."}.get(depth, ""))
        elif c == ">":
            out.append(">" if depth <= 2 else "")
            depth -= 1
        elif depth < 2:
            out.append(c)
    return "".join(out)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--root", type=Path, default=ROOT, help="repository root (default: %(default)s)")
    ap.add_argument("--csv", type=Path, help="also write the table as CSV")
    ap.add_argument("--fail-on-spill", action="store_true", help="exit 1 when any kernel spills")
    ap.add_argument("--nvcc", help="nvcc to use (default: PATH, $CUDA_HOME/bin, /usr/local/cuda/bin)")
    ap.add_argument("-j", "--jobs", type=int, default=int(os.environ.get("MAX_JOBS") or 2))
    args = ap.parse_args(argv)
    nvcc = find_nvcc(args.nvcc)
    if not nvcc:
        print("cuda_report: nvcc not found (install the CUDA toolkit, put nvcc on PATH or set "
              "CUDA_HOME); no report", file=sys.stderr)
        return 2
    root = args.root.resolve()
    sources = sorted((root / "cuda").glob("*.cu"))
    if not sources:
        print(f"cuda_report: no cuda/*.cu under {root}", file=sys.stderr)
        return 2
    t0 = time.time()
    with tempfile.TemporaryDirectory() as tmp, concurrent.futures.ThreadPoolExecutor(max(1, args.jobs)) as ex:
        try:
            results = list(ex.map(lambda cu: compile_one(nvcc, root, cu, tmp), sources))
        except RuntimeError as e:
            print(f"cuda_report: {e}", file=sys.stderr)
            return 3
    seconds = time.time() - t0
    version = re.search(r"release ([\d.]+)", subprocess.run(
        [nvcc, "--version"], stdout=subprocess.PIPE, universal_newlines=True).stdout)
    texts = [cu.read_text(errors="replace") for cu in sources]
    rows, all_spills = {}, {}
    for i, (cu, (entries, spills, blocks)) in enumerate(zip(sources, results)):
        all_spills.update(spills)
        for mangled, r in entries.items():
            if mangled in rows:  # the same (library) kernel compiled into several files
                rows[mangled]["file"] += " " + cu.name
                continue
            r.update(file=cu.name, mangled=mangled, block=blocks.get(mangled, DEFAULT_BLOCK),
                     bounds=mangled in blocks, src=i)
            rows[mangled] = r
    rows = list(rows.values())
    for r, full in zip(rows, demangle([r["mangled"] for r in rows], nvcc)):
        r["demangled"], r["kernel"] = full, short(full)
        r["occupancy"] = occupancy(r["block"], r["regs"], r["smem"])
        r["limiter"] = limiter(r["block"], r["regs"], r["smem"])
        pos = texts[r["src"]].find(re.split(r"[<(]", r["kernel"])[0].split("::")[-1])
        rank = next((i for i, t in enumerate(DTYPES) if f"<{t}," in r["kernel"] or f"<{t}>" in r["kernel"]), 9)
        r["order"] = (pos < 0, r["src"], pos, rank, r["kernel"])
    rows.sort(key=lambda r: r["order"])

    w = min(60, max([len(r["kernel"]) for r in rows] + [6]))
    hdr = (f"{'kernel':{w}} {'block':>6} {'regs':>4} {'smem B':>7} {'stack B':>7} {'spill st/ld B':>13} "
           f"{'occupancy':>9}  limit")
    files = f"{len(sources)} file{'s' * (len(sources) != 1)}: {', '.join(s.name for s in sources)}"
    print(f"CUDA kernels for {ARCH} ({files}; "
          f"nvcc {version.group(1) if version else '?'}, {seconds:.1f} s); occupancy on an H100")
    print(hdr)
    print("-" * len(hdr))
    for r in rows:
        name = r["kernel"] if len(r["kernel"]) <= w else r["kernel"][:w - 3] + "..."
        block = f"{r['block']}{'' if r['bounds'] else '*'}"
        spill = f"{r['spill_st']}/{r['spill_ld']}"
        print(f"{name:{w}} {block:>6} {r['regs']:4d} {r['smem']:7d} {r['stack']:7d} {spill:>13} "
              f"{r['occupancy']:9.1%}  {r['limiter']}".rstrip())
    if not all(r["bounds"] for r in rows):
        print(f"* no __launch_bounds__: block size {DEFAULT_BLOCK} assumed")
    names = {r["mangled"]: r["kernel"] for r in rows}
    others = [f for f in all_spills if f not in names]  # a non-inlined device function
    names.update((f, short(d) + " [device function]") for f, d in zip(others, demangle(others, nvcc)))
    spilled = [f"{names.get(f, f)} ({st} B stored / {ld} B loaded)" for f, (st, ld) in sorted(all_spills.items())]
    if spilled:
        print("Spills: YES, registers spill to local memory in " + "; ".join(spilled))
    else:
        print(f"Spills: none ({len(rows)} kernels, no spill stores or loads)")
    print()
    print("\n".join(traffic_model.report_lines()))
    if args.csv:
        with open(args.csv, "w", newline="") as f:
            cols = ["file", "kernel", "block", "regs", "smem", "stack", "spill_st", "spill_ld",
                    "occupancy", "limiter", "demangled", "mangled"]
            wr = csv.DictWriter(f, fieldnames=cols, extrasaction="ignore")
            wr.writeheader()
            wr.writerows(rows)
    return 1 if spilled and args.fail_on_spill else 0


if __name__ == "__main__":
    sys.exit(main())
