#!/usr/bin/env python3
"""Resource report of every CUDA kernel for sm_90 (no GPU needed).

Compiles cuda/*.cu with nvcc -Xptxas -v (the flags of the package build) and
prints, per kernel instantiation: registers per thread, static shared memory,
stack frame, spill stores/loads, and the theoretical occupancy on an H100
computed from them (per SM: 65,536 registers allocated per warp in units of
256, 64 warps, 2,048 threads, 32 blocks, 228 KiB shared memory with 1 KiB
reserved per block). The block size is the kernel's __launch_bounds__.

    python3 benchmarks/cuda_report.py [--csv PATH] [--fail-on-spill]
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
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
H100 = dict(regs=65536, reg_unit=256, warps=64, threads=2048, blocks=32,
            smem=228 * 1024, smem_reserved=1024)
FLAGS = ["-gencode=arch=compute_90,code=sm_90", "-O3", "-std=c++17", "-fmad=false",
         "-Xptxas", "-v", "--expt-relaxed-constexpr",
         "-D__CUDA_NO_HALF_OPERATORS__", "-D__CUDA_NO_HALF_CONVERSIONS__",
         "-D__CUDA_NO_BFLOAT16_CONVERSIONS__", "-D__CUDA_NO_HALF2_OPERATORS__"]


def occupancy(threads, regs, smem, h=H100):
    """Resident warps per SM / 64 for a block of `threads` threads."""
    warps = -(-threads // 32)
    by_threads = h["threads"] // (warps * 32)
    regs_per_warp = -(-max(regs, 1) * 32 // h["reg_unit"]) * h["reg_unit"]
    by_regs = h["regs"] // (regs_per_warp * warps)
    by_smem = h["smem"] // (smem + h["smem_reserved"])
    blocks = min(h["blocks"], by_threads, by_regs, by_smem)
    return blocks * warps / h["warps"]


def demangle(names):
    tool = shutil.which("cu++filt") or "/usr/local/cuda/bin/cu++filt"
    if not os.path.exists(tool):
        tool = shutil.which("c++filt")
    if not tool:
        return names
    out = subprocess.run([tool], input="\n".join(names), capture_output=True, text=True).stdout
    res = out.splitlines()
    return res if len(res) == len(names) else names


def short(name):
    name = re.sub(r"\(anonymous namespace\)::|tbd_ops::cuda::|tbd_ops::", "", name)
    name = re.sub(r"\(.*\)$", "", name)  # drop the parameter list
    return name.replace("__nv_bfloat16", "bf16").replace("__half", "half")


def launch_bounds(src):
    """kernel name -> block size from __launch_bounds__(kBlock) (resolving simple constants)."""
    text = src.read_text()
    consts = {m.group(1): int(m.group(2)) for m in re.finditer(r"constexpr\s+int\w*\s+(\w+)\s*=\s*(\d+)", text)}
    common = (src.parent / "common.cuh")
    if common.exists():
        consts.update({m.group(1): int(m.group(2))
                       for m in re.finditer(r"constexpr\s+int\w*\s+(\w+)\s*=\s*(\d+)", common.read_text())})
    out = {}
    for m in re.finditer(r"__launch_bounds__\((\w+)\)\s*(\w+)\s*\(", text):
        v = m.group(1)
        out[m.group(2)] = int(v) if v.isdigit() else consts.get(v, 256)
    return out


def compile_one(nvcc, root, cu, tmp):
    cmd = [nvcc, *FLAGS, "-I", str(root / "csrc" / "include"), "-I", str(root / "cuda"),
           "-c", str(cu), "-o", os.path.join(tmp, cu.stem + ".o")]
    p = subprocess.run(cmd, capture_output=True, text=True)
    if p.returncode != 0:
        raise SystemExit(f"nvcc failed on {cu}:\n{p.stderr}")
    rows, cur = [], None
    for line in p.stderr.splitlines():
        m = re.search(r"Compiling entry function '(\w+)' for 'sm_90'", line)
        if m:
            cur = dict(file=cu.name, mangled=m.group(1), stack=0, spill_st=0, spill_ld=0, regs=0, smem=0)
            rows.append(cur)
            continue
        if cur is None:
            continue
        m = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", line)
        if m:
            cur.update(stack=int(m.group(1)), spill_st=int(m.group(2)), spill_ld=int(m.group(3)))
        m = re.search(r"Used (\d+) registers", line)
        if m:
            cur["regs"] = int(m.group(1))
            m2 = re.search(r"(\d+) bytes smem", line)
            cur["smem"] = int(m2.group(1)) if m2 else 0
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--root", type=Path, default=ROOT)
    ap.add_argument("--csv", type=Path)
    ap.add_argument("--fail-on-spill", action="store_true")
    args = ap.parse_args(argv)
    home = os.environ.get("CUDA_HOME", "/usr/local/cuda")
    nvcc = shutil.which("nvcc") or os.path.join(home, "bin", "nvcc")
    if not os.path.exists(nvcc):
        print("cuda_report: nvcc not found (set CUDA_HOME)", file=sys.stderr)
        return 2
    sources = sorted((args.root / "cuda").glob("*.cu"))
    with tempfile.TemporaryDirectory() as tmp, concurrent.futures.ThreadPoolExecutor(2) as ex:
        rows = [r for rs in ex.map(lambda cu: compile_one(nvcc, args.root, cu, tmp), sources) for r in rs]
    names = demangle([r["mangled"] for r in rows])
    bounds = {}
    for cu in sources:
        bounds.update(launch_bounds(cu))
    for r, n in zip(rows, names):
        r["kernel"] = short(n)
        base = r["kernel"].split("<")[0].replace("void ", "")
        r["block"] = bounds.get(base)  # None: a library kernel (CUB) launched with its own sizes
        r["occupancy"] = occupancy(r["block"], r["regs"], r["smem"]) if r["block"] else None
    seen, unique = set(), []
    for r in sorted(rows, key=lambda r: (r["kernel"].startswith("void cub"), r["kernel"])):
        if r["mangled"] not in seen:  # the same library kernel compiled into several files
            seen.add(r["mangled"])
            unique.append(r)
    rows = unique
    hdr = f"{'kernel':58} {'block':>5} {'regs':>4} {'smem B':>7} {'stack B':>7} {'spill st/ld B':>13} {'occ H100':>8}"
    print(hdr)
    print("-" * len(hdr))
    for r in rows:
        block = f"{r['block']:5d}" if r["block"] else "    -"
        occ = f"{r['occupancy']:8.0%}" if r["occupancy"] is not None else "       -"
        print(f"{r['kernel'][:58]:58} {block} {r['regs']:4d} {r['smem']:7d} {r['stack']:7d} "
              f"{str(r['spill_st']) + '/' + str(r['spill_ld']):>13} {occ}")
    spills = [r for r in rows if r["spill_st"] or r["spill_ld"]]
    print(f"{len(rows)} kernels for sm_90; " +
          ("no spills" if not spills else f"{len(spills)} spill: " + ", ".join(r["kernel"] for r in spills)))
    if args.csv:
        with open(args.csv, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=["file", "kernel", "block", "regs", "smem", "stack",
                                              "spill_st", "spill_ld", "occupancy", "mangled"])
            w.writeheader()
            w.writerows(rows)
    return 1 if (spills and args.fail_on_spill) else 0


if __name__ == "__main__":
    sys.exit(main())
