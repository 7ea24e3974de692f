"""Benchmark harness: tbd_ops vs the fastest eager PyTorch vs torch.compile of that eager code.

Timing is torch.utils.benchmark.Timer(...).blocked_autorange() (warm-up, accelerator sync,
thread count), the providers of a mode interleaved over ROUNDS rounds; median and IQR over
every block. The bwd mode times each backward alone, after its own untimed forward
(Backward, _time_backward). Added here: the fwd / bwd / fwd+bwd modes, a correctness guard
(tbd_ops vs eager), GB/s from the bytes a case must move, the peak extra memory of one call
(CUDA: allocator stats; CPU: torch.profiler allocator events), a CSV keyed by device, torch
version and commit, and a PNG. See README.md (what is measured, how to add a bench script).
"""
from __future__ import annotations

import os

os.environ.setdefault("KINETO_LOG_LEVEL", "5")  # the profiler probes for GPUs and logs errors without one
import logging  # noqa: E402

import argparse
import csv
import dataclasses
import datetime
import gc
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch.utils import benchmark

logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)  # "no CUDA runtime" on CPU hosts

ROOT = Path(__file__).resolve().parents[1]
# The source tree's tbd_ops when it is built in place (make build), else the installed one.
if any((ROOT / "python" / "tbd_ops").glob("_C*.so")):
    sys.path.insert(0, str(ROOT / "python"))
import tbd_ops  # noqa: E402

PROVIDERS = ("tbd_ops", "eager", "compile")
MODES = ("fwd", "bwd", "fwd+bwd")
DTYPE_NAMES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16", torch.float64: "fp64"}
TOL = {torch.float32: (1e-3, 1e-4), torch.float64: (1e-7, 1e-9), torch.float16: (1e-2, 2e-3),
       torch.bfloat16: (5e-2, 1e-2)}  # rtol, atol relative to max |eager|
FIELDS = ["device", "torch", "commit", "threads", "date", "op", "label", "case", "params", "dtype",
          "provider", "mode", "status", "median_ms", "iqr_ms", "runs", "gbps", "peak_mib",
          "speedup_vs_eager", "check", "note"]
KEY = ("device", "torch", "commit", "threads", "label", "case", "dtype", "provider", "mode")


@dataclasses.dataclass
class Inputs:
    args: tuple
    kwargs: dict = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class Case:
    """One problem. ``ours``/``eager`` take ``(*inputs.args, **inputs.kwargs)``; ``compile`` is
    ``torch.compile(eager)``. ``skip(provider, mode, cfg)`` returns a reason to skip, or None."""
    op: str
    label: str
    name: str
    params: Dict[str, Any]
    make_inputs: Callable[[torch.device], Inputs]
    ours: Callable
    eager: Callable
    bytes_moved: Callable[[str], int]
    dtype: torch.dtype = torch.float32
    grad_args: Tuple[int, ...] = (0,)
    modes: Tuple[str, ...] = MODES
    skip: Optional[Callable[[str, str, "Config"], Optional[str]]] = None


@dataclasses.dataclass
class Config:
    device: torch.device
    quick: bool = False
    full: bool = False
    providers: Tuple[str, ...] = PROVIDERS
    modes: Tuple[str, ...] = MODES
    threads: int = 1
    min_run_time: float = 0.5
    mem_budget: float = 4 * 2**30  # bytes an eager/compile provider may need (cases check it)
    filter: Optional[str] = None


def _tensors(x) -> List[torch.Tensor]:
    if isinstance(x, torch.Tensor):
        return [x]
    return [t for i in x for t in _tensors(i)] if isinstance(x, (list, tuple)) else []


def _diff(out) -> List[torch.Tensor]:
    return [t for t in _tensors(out) if t.is_floating_point() and t.requires_grad]


def _grad_inputs(case: Case, base: Inputs) -> Tuple[list, List[torch.Tensor]]:
    """The positional arguments with fresh leaves that require grad at ``case.grad_args``, and the leaves."""
    args = [a.detach().requires_grad_() if i in case.grad_args and isinstance(a, torch.Tensor) else
            type(a)(t.detach().requires_grad_() for t in a) if i in case.grad_args else a
            for i, a in enumerate(base.args)]
    return args, [t for i in case.grad_args for t in _tensors(args[i])]


def _upstream(outs: List[torch.Tensor]) -> List[torch.Tensor]:
    """The incoming gradients of the differentiable outputs: the same seeded values for every provider."""
    gen = torch.Generator(device=outs[0].device).manual_seed(1234)
    return [torch.randn(o.shape, generator=gen, device=o.device).to(o.dtype) for o in outs]


class Backward:
    """The ``bwd`` iteration: ``prepare()`` runs the forward (untimed), a call then runs the backward of
    that graph, once, as a training step does (no ``retain_graph``: torch.compile's backward may reuse
    the memory of the tensors its forward saved, its donated buffers). Every call needs a ``prepare()``
    before it (the constructor does the first)."""

    def __init__(self, fn: Callable, args: list, kwargs: dict, leaves: List[torch.Tensor]):
        self.fn, self.args, self.kwargs, self.leaves = fn, args, kwargs, leaves
        self.prepare()
        self.grads = _upstream(self.outs)

    def prepare(self) -> None:
        self.outs = _diff(self.fn(*self.args, **self.kwargs))

    def __call__(self):
        outs, self.outs = self.outs, None
        if outs is None:
            raise RuntimeError("Backward: prepare() (the untimed forward) must run before each backward")
        return torch.autograd.grad(outs, self.leaves, self.grads, allow_unused=True)


def make_runner(case: Case, fn: Callable, mode: str, base: Inputs) -> Callable[[], Any]:
    """One iteration of ``mode`` (for ``bwd`` a ``Backward``)."""
    if mode == "fwd":
        return lambda: fn(*base.args, **base.kwargs)
    args, leaves = _grad_inputs(case, base)
    if mode == "bwd":
        return Backward(fn, args, base.kwargs, leaves)
    grads = _upstream(_diff(fn(*args, **base.kwargs)))
    return lambda: torch.autograd.grad(_diff(fn(*args, **base.kwargs)), leaves, grads, allow_unused=True)


def _time_backward(run: Backward, device: torch.device, budget: float) -> List[float]:
    """Seconds per backward, one sample per call, each after its own untimed forward, for about
    ``budget`` seconds of backward (a round stops at 2x that in wall time, forwards included, and has
    at least 3 samples), after one untimed warm-up backward, with the garbage collector off (as the
    Timer runs). On CUDA between events after a synchronized forward: the latency of one backward,
    host launch costs included (nothing overlaps it)."""
    times: List[float] = []
    run.prepare()
    run()  # warm-up: caches and allocator after another provider's round
    gc.collect()
    gc_was_on = gc.isenabled()
    gc.disable()
    try:
        wall0 = time.perf_counter()
        while len(times) < 3 or (sum(times) < budget and time.perf_counter() - wall0 < 2 * budget):
            run.prepare()
            if device.type == "cuda":
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                torch.cuda.synchronize(device)
                start.record()
                run()
                end.record()
                end.synchronize()
                times.append(start.elapsed_time(end) / 1e3)
            else:
                t0 = time.perf_counter()
                run()
                times.append(time.perf_counter() - t0)
    finally:
        if gc_was_on:
            gc.enable()
    return times


def peak_mib(run: Callable, device: torch.device) -> float:
    """MiB allocated at the peak of one call of ``run`` over what was allocated before it (for a
    ``Backward``, after its forward)."""
    if isinstance(run, Backward):
        run.prepare()
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        r = run()
        torch.cuda.synchronize(device)
        del r
        return (torch.cuda.max_memory_allocated(device) - before) / 2**20
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True,
                                acc_events=True) as prof:
        run()  # outputs freed inside the profile: their allocation still counts in the peak
    events = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"
                     and "CPU" in str(e.device_type())), key=lambda e: e.start_ns())
    running = peak = 0
    for e in events:
        running += e.nbytes()
        peak = max(peak, running)
    return peak / 2**20


def _forward_and_grads(case: Case, fn: Callable, base: Inputs) -> Tuple[List[torch.Tensor], List[torch.Tensor]]:
    """The outputs of a forward with gradients enabled (the forward that fwd+bwd times, which may take
    another path than under no_grad) and the input gradients of its backward."""
    args, leaves = _grad_inputs(case, base)
    out = fn(*args, **base.kwargs)
    outs = _diff(out)
    grads = torch.autograd.grad(outs, leaves, _upstream(outs), allow_unused=True)
    return [t.detach() for t in _tensors(out)], list(grads)


def _compare(what: str, got: List[torch.Tensor], want: List[torch.Tensor], dtype) -> Tuple[float, str]:
    rtol, atol = TOL.get(dtype, (1e-3, 1e-4))
    worst = 0.0
    if len(got) != len(want):
        return worst, f"{what}: {len(got)} tensors vs {len(want)}"
    for i, (g, w) in enumerate(zip(got, want)):
        if g is None or w is None:
            if (g is None) != (w is None):
                return worst, f"{what}[{i}]: no gradient on one side"
            continue
        if g.shape != w.shape:
            return worst, f"{what}: shape {tuple(g.shape)} vs {tuple(w.shape)}"
        if g.numel() and not g.is_floating_point():  # indices: near-ties may resolve differently
            if (g != w).double().mean() > 1e-3:
                return worst, f"{what}: indices differ"
        elif g.numel():
            g, w = g.double(), w.double()
            scale, err = max(w.abs().max().item(), 1e-30), (g - w).abs()
            worst = max(worst, err.max().item() / scale)
            # A few elements may differ (argmax near-ties pick another channel or box), counted among
            # the elements that are nonzero on either side: a gradient that lives in one channel of K
            # (p_c's) would otherwise hide wrong values among its zeros.
            support = max(int(((g != 0) | (w != 0)).sum()), 1)
            if int((err > atol * scale + rtol * w.abs()).sum()) > 1e-4 * support:
                return worst, f"{what}: max rel err {worst:.1e}"
    return worst, ""


def check(case: Case, base: Inputs, cfg: Config) -> str:
    """tbd_ops vs eager, outputs and input gradients: 'ok (...)', 'MISMATCH ...' or 'ERROR ...'."""
    if case.skip and case.skip("eager", "fwd", cfg):
        return "unchecked (eager skipped)"
    try:
        with torch.no_grad():
            worst, bad = _compare("fwd", *(_tensors(f(*base.args, **base.kwargs)) for f in (case.ours, case.eager)),
                                  case.dtype)
        if not bad and case.modes != ("fwd",) and not (case.skip and case.skip("eager", "fwd+bwd", cfg)):
            (out_o, grad_o), (out_e, grad_e) = (_forward_and_grads(case, f, base) for f in (case.ours, case.eager))
            w2, bad = _compare("fwd with grad", out_o, out_e, case.dtype)
            if not bad:
                w3, bad = _compare("grad", grad_o, grad_e, case.dtype)
                w2 = max(w2, w3)
            worst = max(worst, w2)
        return f"MISMATCH {bad}" if bad else f"ok (max rel err {worst:.1e})"
    except Exception as e:  # noqa: BLE001
        return f"ERROR {type(e).__name__}: {str(e).strip()[:120]}"


ROUNDS = 5  # timing rounds per mode, the providers interleaved


def _time_interleaved(case: Case, cfg: Config, mode: str, runners: Dict[str, Tuple[Dict[str, Any], Callable]]) -> None:
    """Times the providers of one mode in ROUNDS interleaved rounds (each round every provider
    for min_run_time / ROUNDS, starting with a different provider each round), so that a slow
    drift of the machine (clock, other load) is shared by every provider instead of landing on
    whichever ran last; the median and IQR are over the blocks of all rounds."""
    if not runners:
        return
    times: Dict[str, List[float]] = {prov: [] for prov in runners}
    runs: Dict[str, int] = {prov: 0 for prov in runners}
    order = list(runners)
    for r in range(ROUNDS):
        for prov in order[r % len(order):] + order[:r % len(order)]:
            row, run = runners[prov]
            if row["status"] != "ok":
                continue
            try:
                if isinstance(run, Backward):
                    t = _time_backward(run, cfg.device, cfg.min_run_time / ROUNDS)
                    times[prov] += t
                    runs[prov] += len(t)
                    continue
                m = benchmark.Timer("run()", globals={"run": run}, num_threads=cfg.threads, label=case.label,
                                    sub_label=case.name, description=prov
                                    ).blocked_autorange(min_run_time=cfg.min_run_time / ROUNDS)
                times[prov] += m.times
                runs[prov] += len(m.times) * m.number_per_run
            except Exception as e:  # noqa: BLE001  (record it, go on)
                row.update(status="error", note=f"{type(e).__name__}: {str(e).strip()[:120]}")
    for prov, (row, run) in runners.items():
        if row["status"] != "ok":
            continue
        median = statistics.median(times[prov])
        q = statistics.quantiles(times[prov], n=4) if len(times[prov]) > 1 else [median] * 3
        iqr = q[2] - q[0]
        row.update(median_ms=median * 1e3, iqr_ms=iqr * 1e3, runs=runs[prov],
                   gbps=case.bytes_moved(mode) / median / 1e9, peak_mib=peak_mib(run, cfg.device))
    runners.clear()


def run_case(case: Case, cfg: Config, env: Dict[str, str]) -> List[Dict[str, Any]]:
    torch.manual_seed(0)
    base = case.make_inputs(cfg.device)
    guard = check(case, base, cfg)
    fns = {"tbd_ops": case.ours, "eager": case.eager}
    guards = {"tbd_ops": guard}
    compile_s = 0.0
    if "compile" in cfg.providers:
        torch._dynamo.reset()
        fns["compile"] = torch.compile(case.eager, dynamic=False)
        # The same guard for torch.compile's result (its graphs are then cached for the timing), where
        # no mode of the case skips it.
        if not (case.skip and any(case.skip("compile", m, cfg) for m in case.modes)):
            t0 = time.perf_counter()
            guards["compile"] = check(dataclasses.replace(case, ours=fns["compile"]), base, cfg)
            compile_s = time.perf_counter() - t0
    rows = []
    for mode in (m for m in cfg.modes if m in case.modes):
        runners = {}
        for prov in cfg.providers:
            row = dict(env, op=case.op, label=case.label, case=case.name, dtype=DTYPE_NAMES[case.dtype],
                       params=" ".join(f"{k}={v}" for k, v in case.params.items()), provider=prov,
                       mode=mode, status="ok", check=guards.get(prov, ""), note="")
            rows.append(row)
            reason = case.skip(prov, mode, cfg) if case.skip and prov != "tbd_ops" else None
            if reason:
                row.update(status="skipped", note=reason)
                continue
            try:
                t0 = time.perf_counter()
                run = make_runner(case, fns[prov], mode, base)
                run()  # first call: compilation, allocator warm-up
                if prov == "compile":  # the guard compiled first: its time counts for the first mode
                    row["note"] = f"first call {time.perf_counter() - t0 + compile_s:.1f} s" + \
                        (" (with the guard's compilation)" if compile_s else "")
                    compile_s = 0.0
                runners[prov] = (row, run)
            except Exception as e:  # noqa: BLE001  (record it, go on)
                row.update(status="error", note=f"{type(e).__name__}: {str(e).strip()[:120]}")
        _time_interleaved(case, cfg, mode, runners)
    eager = {r["mode"]: r["median_ms"] for r in rows if r["provider"] == "eager" and r["status"] == "ok"}
    for r in rows:
        if r["status"] == "ok" and r["mode"] in eager:
            r["speedup_vs_eager"] = eager[r["mode"]] / r["median_ms"]
    return rows


def format_row(r: Dict[str, Any]) -> str:
    head = f"{r['label']:<4} {(r['case'] + ' ' + r['dtype'])[:37]:<37} {r['provider']:<8} {r['mode']:<7}"
    if r["status"] != "ok":
        return f"{head}  {r['status']}: {r['note']}"
    nums = [format(r[k], f) if k in r else "-".rjust(int(f.split(".")[0]))
            for k, f in (("median_ms", "10.4g"), ("iqr_ms", "9.3g"), ("gbps", "7.3g"), ("peak_mib", "9.4g"),
                         ("speedup_vs_eager", "7.3g"))]
    return f"{head} {' '.join(nums)}x  {r['check']} {r['note']}".rstrip()


HEADER = f"{'op':<4} {'case':<37} {'provider':<8} {'mode':<7} {'median ms':>10} {'IQR ms':>9} " \
         f"{'GB/s':>7} {'peak MiB':>9} {'vs eager':>8}"


def write_csv(rows: List[Dict[str, Any]], path: Path) -> None:
    """Merges into ``path``: a row replaces an earlier one with the same device, torch, commit,
    case, provider and mode; rows of other commits/versions stay (before/after comparisons)."""
    old = list(csv.DictReader(path.open())) if path.exists() else []
    keys = {tuple(str(r[k]) for k in KEY) for r in rows}
    merged = [r for r in old if tuple(r.get(k, "") for k in KEY) not in keys] + rows
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=FIELDS, extrasaction="ignore")
        w.writeheader()
        for r in merged:
            w.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in r.items()})


def summary(rows: List[Dict[str, Any]]) -> Tuple[List[str], Dict[Tuple[str, str], Dict[str, float]]]:
    """The speed-up of tbd_ops per case and mode: ``(cases, {(case, mode): {"eager": x, "compile": y}})``,
    x = eager's median / tbd_ops' median (likewise y for torch.compile); cases in row order, named
    ``"<label> <case> <dtype>"``; a provider that did not run is left out."""
    cases = list(dict.fromkeys(f"{r['label']} {r['case']} {r['dtype']}" for r in rows))
    ms = {(f"{r['label']} {r['case']} {r['dtype']}", r["mode"], r["provider"]): float(r["median_ms"])
          for r in rows if r["status"] == "ok" and r.get("median_ms") not in (None, "")}
    out: Dict[Tuple[str, str], Dict[str, float]] = {}
    for (case, mode, prov), t in ms.items():
        ours = ms.get((case, mode, "tbd_ops"))
        if prov != "tbd_ops" and ours:
            out.setdefault((case, mode), {})[prov] = t / ours
    return cases, out


def write_plot(rows: List[Dict[str, Any]], path: Path) -> str:
    """One summary figure: per case (a row, grouped by op) and mode (a column), the speed-up of
    tbd_ops over eager PyTorch and over torch.compile, log scale (right of 1: tbd_ops is faster)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import matplotlib.ticker  # noqa: F401
    except ImportError:
        return "matplotlib not installed: no PNG"
    cases, speed = summary(rows)
    modes = [m for m in MODES if any(k[1] == m for k in speed)] or [MODES[0]]
    values = [v for d in speed.values() for v in d.values()]
    lo, hi = (min(values + [1.0]), max(values + [1.0])) if values else (0.5, 2.0)
    lo, hi = lo / 1.6, hi * 1.6
    height = 1.2 + 0.26 * len(cases)
    fig, axes = plt.subplots(1, len(modes), figsize=(4.2 * len(modes) + 3.2, height), sharey=True, squeeze=False)
    y = {c: len(cases) - 1 - i for i, c in enumerate(cases)}
    bar = 0.38
    for ax, mode in zip(axes[0], modes):
        for k, (prov, color, label) in enumerate((("eager", "#d62728", "vs eager"),
                                                   ("compile", "#1f77b4", "vs torch.compile"))):
            pts = [(y[c] + (0.5 - k) * bar, speed[(c, mode)][prov]) for c in cases
                   if prov in speed.get((c, mode), {})]
            if pts:
                ys, xs = zip(*pts)
                # Bars grow from 1 (no speed-up) to the value, on a log axis.
                ax.barh(ys, [x - 1 for x in xs], bar, left=1, color=color, label=label)
                for yy, xx in pts:
                    ax.text(xx * (1.05 if xx >= 1 else 0.95), yy, f"{xx:.0f}x" if xx >= 10 else f"{xx:.2g}x",
                            va="center",
                            ha="left" if xx >= 1 else "right", fontsize=6)
        ax.axvline(1.0, color="grey", lw=1)
        ax.set_xscale("log")
        ax.set_xlim(lo, hi)
        ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}x"))
        ax.set_xlabel("speed-up of tbd_ops (log scale)", fontsize=8)
        ax.set_title(mode, fontsize=10)
        ax.grid(axis="x", which="both", lw=0.3, alpha=0.5)
        # Separators between ops.
        ops = [c.split(" ", 1)[0] for c in cases]
        for i in range(1, len(cases)):
            if ops[i] != ops[i - 1]:
                ax.axhline(len(cases) - i - 0.5, color="black", lw=0.6)
    axes[0][0].set_yticks(range(len(cases)), list(reversed(cases)), fontsize=7)
    axes[0][0].set_ylim(-0.6, len(cases) - 0.4)
    handles, labels = axes[0][0].get_legend_handles_labels()
    for ax in axes[0][1:]:
        if not handles:
            handles, labels = ax.get_legend_handles_labels()
    r0 = rows[0]
    fig.suptitle(f"tbd_ops speed-up (median time of the other / tbd_ops'): {r0['device']}, torch {r0['torch']}, "
                 f"commit {r0['commit']}", fontsize=9)
    if handles:
        fig.legend(handles, labels, loc="upper right", fontsize=8, ncol=2)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.35 / height))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return f"wrote {path}"


def environment(cfg: Config) -> Dict[str, str]:
    info = Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []
    device = torch.cuda.get_device_name(cfg.device) if cfg.device.type == "cuda" else \
        next((ln.split(":", 1)[1].strip() for ln in info if ln.startswith("model name")), "cpu")
    git = lambda *a: subprocess.run(["git", *a], cwd=ROOT, capture_output=True, text=True).stdout.strip()  # noqa: E731
    # Dirty: changes to the sources, tracked or new (not the results a run writes, nor build outputs).
    changed = git("status", "--porcelain", "--", ".", ":(exclude)benchmarks/results")
    commit = (git("rev-parse", "--short", "HEAD") or "unknown") + ("-dirty" if changed else "")
    return {"device": device, "torch": torch.__version__, "commit": commit, "threads": str(cfg.threads),
            "date": datetime.datetime.now().isoformat(timespec="seconds")}


def reuse_freed_memory() -> str:
    """CPU: glibc's malloc keeps freed memory for the next allocation (mmap and trim thresholds of
    1 GiB), as a long training process's heap does and PyTorch's caching allocator does on a GPU, so
    that a measurement is of the kernels rather than of the page faults of fresh memory, and does not
    depend on what ran before it in the process (glibc's default thresholds move with the history of
    frees). Returns a note for the header."""
    import ctypes
    try:
        libc = ctypes.CDLL("libc.so.6")
        ok = libc.mallopt(-3, 1 << 30) == 1 and libc.mallopt(-1, 1 << 30) == 1  # M_MMAP_, M_TRIM_THRESHOLD
    except (OSError, AttributeError):
        ok = False
    return ("malloc: glibc keeps freed memory for reuse (mmap/trim thresholds 1 GiB; --malloc default "
            "leaves glibc's)") if ok else "malloc: not glibc, left as is"


def main(modules: Sequence[Any], tag: str = "", argv: Optional[Sequence[str]] = None) -> List[Dict[str, Any]]:
    p = argparse.ArgumentParser(description="tbd_ops vs eager vs torch.compile")
    for flag, kw in (("--device", dict(choices=["cpu", "cuda"], help="default: cuda when usable, else cpu")),
                     ("--quick", dict(action="store_true", help="tiny sizes, short timing, one thread, no torch.compile")),
                     ("--full", dict(action="store_true", help="every case, also the slow ones on CPU")),
                     ("--providers", dict(help="comma list of " + ",".join(PROVIDERS))),
                     ("--modes", dict(help="comma list of " + ",".join(MODES))),
                     ("--filter", dict(help="regex on '<label> <case>'")),
                     ("--threads", dict(type=int, help="CPU threads (default: all cores; --quick: 1)")),
                     ("--min-run-time", dict(type=float, help="s per blocked_autorange (0.5; --quick 0.05)")),
                     ("--malloc", dict(choices=["reuse", "default"], default="reuse",
                                       help="CPU: glibc keeps freed memory for reuse (default) or its defaults")),
                     ("--out-dir", dict(default=str(ROOT / "benchmarks" / "results"))),
                     ("--no-plot", dict(action="store_true"))):
        p.add_argument(flag, **kw)
    a = p.parse_args(argv)
    cuda = a.device == "cuda" or (a.device is None and torch.cuda.is_available() and tbd_ops.cuda_available())
    cfg = Config(torch.device("cuda" if cuda else "cpu"), quick=a.quick, full=a.full, filter=a.filter,
                 threads=a.threads or (1 if a.quick else len(os.sched_getaffinity(0))),
                 min_run_time=a.min_run_time or (0.05 if a.quick else 0.5),
                 providers=tuple(a.providers.split(",")) if a.providers else PROVIDERS[:2 if a.quick else 3],
                 modes=tuple(a.modes.split(",")) if a.modes else MODES)
    if cuda:
        cfg.mem_budget = 0.4 * torch.cuda.mem_get_info(cfg.device)[0]
    torch.set_num_threads(cfg.threads)
    env = environment(cfg)
    found = [m.cases(cfg) for m in modules]
    cases = [c for cs, _ in found for c in cs if not cfg.filter or re.search(cfg.filter, f"{c.label} {c.name}")]
    print(f"{env['device']} ({cfg.device}, {cfg.threads} threads), torch {env['torch']}, commit {env['commit']}")
    print(f"timing: torch.utils.benchmark blocked_autorange, min_run_time {cfg.min_run_time} s; median, IQR")
    if cfg.device.type == "cpu":
        print(reuse_freed_memory() if a.malloc == "reuse" else "malloc: glibc's defaults")
    print("".join(f"note: {n}\n" for _, ns in found for n in ns) + HEADER)
    rows = []
    for case in cases:
        case_rows = run_case(case, cfg, env)
        print("\n".join(format_row(r) for r in case_rows) + "\n", flush=True)
        rows += case_rows
    slug = re.sub(r"[^a-z0-9]+", "_", env["device"].lower()).strip("_")[:40]
    stem = Path(a.out_dir) / f"bench_{cfg.device.type}_{slug}{'_' + tag if tag else ''}{'_quick' if a.quick else ''}"
    write_csv(rows, stem.with_suffix(".csv"))
    print(f"wrote {stem.with_suffix('.csv')}")
    if rows and not a.no_plot:
        print(write_plot(rows, stem.with_suffix(".png")))
    return rows


def exit_code(rows: List[Dict[str, Any]]) -> int:
    """1 when tbd_ops failed or disagrees with eager (so ``run_all.py --quick`` is a test)."""
    return int(any(r["provider"] == "tbd_ops" and (r["status"] == "error" or r["check"].startswith(("MISMATCH", "ERROR")))
                   for r in rows))
