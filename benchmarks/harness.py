"""Benchmark runner for tbd_ops: ours vs eager PyTorch vs torch.compile.

A benchmark *case* is one problem size of one op (see :class:`Case`). For every case the
runner

1. checks that the tbd_ops output (and, when the case has a backward, the input gradients)
   agrees with the eager reference within a loose dtype tolerance; rows of a case that
   fails are marked ``MISMATCH``;
2. times three providers -- ``tbd_ops`` (the fused op), ``eager`` (the pure-PyTorch
   reference in ``tbd_ops.reference``) and ``compile`` (``torch.compile(reference,
   dynamic=False)``) -- in three modes:

   * ``fwd``: forward on inputs that do not require grad (inference / teacher side);
   * ``bwd``: backward only -- the forward runs once outside the timed region, then
     ``torch.autograd.grad(outputs, inputs, grad_outputs, retain_graph=True)`` is timed
     with a fixed random ``grad_outputs``;
   * ``fwd+bwd``: forward on inputs that require grad, then ``torch.autograd.grad``;

3. measures the peak extra memory of one call of each provider and mode;
4. prints a table, writes ``benchmarks/results/bench_<device>.csv`` and a PNG plot.

Timing
  CUDA: one CUDA event pair per iteration (no host synchronization inside the timed loop),
  a 256 MiB buffer is overwritten between iterations so that every iteration starts with a
  cold L2 cache, warm-up iterations first; median and 20th/80th percentiles in ms.
  CPU: ``time.perf_counter`` around each call, after warm-up, with
  ``torch.set_num_threads(<all cores>)``.

Peak extra memory
  CUDA: ``torch.cuda.max_memory_allocated()`` after ``reset_peak_memory_stats()`` minus
  ``torch.cuda.memory_allocated()`` before the call (outputs included).
  CPU: the call runs once under ``torch.profiler.profile(activities=[CPU],
  profile_memory=True)``; every allocation and free of the CPU allocator is a
  ``[memory]`` event carrying +bytes or -bytes; the events are sorted by time and the
  peak of their running sum is the peak extra memory of the call (outputs included;
  memory that existed before the call, such as the inputs or the autograd graph of the
  ``bwd`` mode, is not counted).

Achieved GB/s
  ``case.bytes_moved(mode)`` -- the bytes the op fundamentally has to read and write,
  defined per case (see the bench_*.py files) -- divided by the median time.

Usage: the bench_*.py scripts and run_all.py call :func:`main`; see ``--help``.
"""
from __future__ import annotations

import os

# Kineto (the profiler backend) probes for GPUs and logs an error on machines without a
# driver; keep its log quiet unless the user asked otherwise. Must be set before torch loads.
os.environ.setdefault("KINETO_LOG_LEVEL", "5")

import argparse
import csv
import dataclasses
import contextlib
import datetime
import gc
import logging
import math
import platform
import re
import subprocess
import sys
import time
import traceback
import warnings
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch

ROOT = Path(__file__).resolve().parents[1]
RESULTS_DIR = Path(__file__).resolve().parent / "results"

try:
    import tbd_ops  # noqa: F401
except ImportError:  # running from a source checkout without PYTHONPATH=python
    sys.path.insert(0, str(ROOT / "python"))
    import tbd_ops  # noqa: F401

PROVIDERS = ("tbd_ops", "eager", "compile")
MODES = ("fwd", "bwd", "fwd+bwd")
GiB = float(1 << 30)
MiB = float(1 << 20)

DTYPE_NAMES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16", torch.float64: "fp64"}
# (rtol, atol relative to max |reference|) for the correctness guard.
DTYPE_TOL = {torch.float32: (1e-3, 1e-4), torch.float64: (1e-7, 1e-9),
             torch.float16: (1e-2, 2e-3), torch.bfloat16: (5e-2, 1e-2)}


# --------------------------------------------------------------------------- cases
@dataclasses.dataclass
class Inputs:
    """Arguments of one call; ``grad_inputs`` are the leaves that backward differentiates."""
    args: tuple
    kwargs: dict = dataclasses.field(default_factory=dict)
    grad_inputs: List[torch.Tensor] = dataclasses.field(default_factory=list)


def with_grad(inp: Inputs, grad_args: Sequence[int]) -> Inputs:
    """The same inputs, with the tensors of the positional arguments ``grad_args`` (a tensor or
    a list of tensors each) replaced by fresh leaves that require grad (no copy)."""
    args = list(inp.args)
    leaves: List[torch.Tensor] = []
    for i in grad_args:
        a = args[i]
        if isinstance(a, torch.Tensor):
            args[i] = a.detach().requires_grad_()
            leaves.append(args[i])
        else:
            args[i] = type(a)(t.detach().requires_grad_() for t in a)
            leaves += list(args[i])
    return Inputs(tuple(args), dict(inp.kwargs), leaves)


@dataclasses.dataclass
class Case:
    """One benchmark problem.

    make_inputs(device) -> Inputs: builds the inputs (the runner seeds the RNG first and
        builds them once per case; all providers and modes share them).
    grad_args: positional arguments that backward differentiates (tensor or list of tensors).
    ours / reference: callables taking ``(*inputs.args, **inputs.kwargs)``.
    bytes_moved(mode) -> int: the bytes the op must read + write in that mode.
    ref_bytes(mode) -> int: estimated peak memory of the eager reference in that mode;
        eager and compile are skipped when it exceeds the memory budget.
    check_subset(inputs) -> (sub_inputs, select): when the reference does not fit the
        memory budget, the correctness guard compares ``select(ours(full))`` with
        ``reference(sub_inputs)``, and the gradients of both providers on ``sub_inputs``.
    no_compile: reason string when the compile provider is not run for this case.
    """
    op: str
    label: str
    name: str
    params: Dict[str, Any]
    make_inputs: Callable[[torch.device], Inputs]
    ours: Callable
    reference: Callable
    bytes_moved: Callable[[str], int]
    dtype: torch.dtype = torch.float32
    grad_args: Tuple[int, ...] = (0,)
    modes: Tuple[str, ...] = MODES
    ref_bytes: Optional[Callable[[str], int]] = None
    check_subset: Optional[Callable[[Inputs], Tuple[Inputs, Callable[[Any], Any]]]] = None
    no_compile: Optional[str] = None


@dataclasses.dataclass
class Config:
    device: torch.device
    quick: bool = False
    full: bool = False  # the full (GPU) matrix even on CPU
    providers: Tuple[str, ...] = PROVIDERS
    modes: Tuple[str, ...] = MODES
    threads: int = 1
    # timing knobs (set by make_config)
    warmup_ms: float = 25.0
    rep_ms: float = 100.0
    min_reps: int = 5
    max_reps: int = 100
    mem_budget: float = 4 * GiB
    plot: bool = True
    filter: Optional[str] = None


@dataclasses.dataclass
class Row:
    op: str
    label: str
    case: str
    params: str
    dtype: str
    provider: str
    mode: str
    status: str = "ok"  # ok | skipped | error
    median_ms: float = float("nan")
    p20_ms: float = float("nan")
    p80_ms: float = float("nan")
    reps: int = 0
    bytes: int = 0
    gbps: float = float("nan")
    peak_extra_mib: float = float("nan")
    speedup_vs_eager: float = float("nan")
    check: str = ""
    note: str = ""
    env: Dict[str, str] = dataclasses.field(default_factory=dict, repr=False)  # device, versions


# --------------------------------------------------------------------------- environment
def _slug(s: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", s.lower()).strip("_")


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "cpu"


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return cpu_model()


def device_slug(device: torch.device) -> str:
    if device.type == "cuda":
        return _slug(torch.cuda.get_device_name(device))
    model = re.sub(r"\((R|TM|tm|r)\)|\bCPU\b|\bProcessor\b|@.*$", " ", cpu_model())
    return ("cpu_" + _slug(model))[:48].rstrip("_")


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                             text=True, timeout=10)
        if out.returncode != 0:
            return "unknown"
        commit = out.stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return commit + ("-dirty" if dirty else "")
    except Exception:
        return "unknown"


def environment(cfg: Config) -> Dict[str, str]:
    return {
        "device": device_name(cfg.device),
        "device_type": cfg.device.type,
        "torch": torch.__version__ + (f" (CUDA {torch.version.cuda})" if cfg.device.type == "cuda" else ""),
        "tbd_ops": getattr(tbd_ops, "__version__", "unknown"),
        "commit": git_commit(),
        "threads": str(cfg.threads) if cfg.device.type == "cpu" else "",
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
    }


# --------------------------------------------------------------------------- helpers
def flat_tensors(x) -> List[torch.Tensor]:
    if isinstance(x, torch.Tensor):
        return [x]
    if isinstance(x, (list, tuple)):
        return [t for item in x for t in flat_tensors(item)]
    return []


def diff_outputs(out) -> List[torch.Tensor]:
    return [t for t in flat_tensors(out) if t.is_floating_point() and t.requires_grad]


def _percentile(xs: Sequence[float], q: float) -> float:
    s = sorted(xs)
    if not s:
        return float("nan")
    pos = (len(s) - 1) * q
    lo, hi = math.floor(pos), math.ceil(pos)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def fmt_bytes(n: float) -> str:
    return f"{n / GiB:.1f} GiB" if n >= GiB else f"{n / MiB:.0f} MiB"


def _short_error(e: BaseException) -> str:
    msg = str(e).strip().splitlines()
    first = next((m for m in msg if m.strip()), "")
    return f"{type(e).__name__}: {first}"[:160]


# --------------------------------------------------------------------------- providers / modes
_COMPILED: Dict[int, Callable] = {}


def provider_fn(case: Case, provider: str) -> Callable:
    if provider == "tbd_ops":
        return case.ours
    if provider == "eager":
        return case.reference
    if provider == "compile":
        key = id(case)
        if key not in _COMPILED:
            _COMPILED.clear()
            import torch._dynamo
            torch._dynamo.reset()  # fresh guards per case: no silent fallback at the recompile limit
            _COMPILED[key] = torch.compile(case.reference, dynamic=False)
        return _COMPILED[key]
    raise ValueError(provider)


def _grad_outputs(outs: Sequence[torch.Tensor], seed: int = 1234) -> List[torch.Tensor]:
    gen = torch.Generator(device=outs[0].device if outs else "cpu").manual_seed(seed)
    return [torch.randn(o.shape, generator=gen, device=o.device, dtype=torch.float32).to(o.dtype)
            for o in outs]


def make_runner(case: Case, fn: Callable, mode: str, base: Inputs) -> Callable[[], Any]:
    """A zero-argument callable running one iteration of ``mode`` on ``base``.

    For ``bwd`` the forward is run here, once, outside the timed region."""
    if mode == "fwd":
        args, kwargs = base.args, base.kwargs
        return lambda: fn(*args, **kwargs)
    inp = with_grad(base, case.grad_args)
    args, kwargs, leaves = inp.args, inp.kwargs, inp.grad_inputs
    out = fn(*args, **kwargs)
    outs = diff_outputs(out)
    if not outs:
        raise RuntimeError("no differentiable output")
    grads = _grad_outputs(outs)
    if mode == "bwd":
        def run_bwd():
            return torch.autograd.grad(outs, leaves, grads, retain_graph=True, allow_unused=True)
        return run_bwd
    del out, outs

    def run_fwd_bwd():
        o = diff_outputs(fn(*args, **kwargs))
        return torch.autograd.grad(o, leaves, grads, allow_unused=True)
    return run_fwd_bwd


# --------------------------------------------------------------------------- timing
@contextlib.contextmanager
def _no_gc():
    """Collect first, then keep Python's cyclic GC from running (and freeing unrelated
    tensors) inside a timed loop or a memory measurement, as timeit does."""
    gc.collect()
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


_L2_FLUSH: Dict[str, torch.Tensor] = {}


def time_cuda(run: Callable, cfg: Config) -> List[float]:
    dev = cfg.device
    key = str(dev)
    if key not in _L2_FLUSH:
        _L2_FLUSH[key] = torch.empty(256 * (1 << 20), dtype=torch.int8, device=dev)
    flush = _L2_FLUSH[key]
    r = run()  # first call: compilation, allocator warm-up
    del r
    torch.cuda.synchronize(dev)
    # Estimate the time of one iteration to size warm-up and repetitions.
    s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    s.record()
    for _ in range(3):
        r = run()
        del r
    e.record()
    torch.cuda.synchronize(dev)
    est = max(s.elapsed_time(e) / 3, 1e-3)
    n_warm = int(min(max(cfg.warmup_ms / est, 1), 200))
    n_rep = int(min(max(cfg.rep_ms / est, cfg.min_reps), cfg.max_reps))
    for _ in range(n_warm):
        r = run()
        del r
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(n_rep)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(n_rep)]
    for i in range(n_rep):
        flush.zero_()  # evict the L2 cache (not timed)
        starts[i].record()
        r = run()
        ends[i].record()
        del r
    torch.cuda.synchronize(dev)
    return [a.elapsed_time(b) for a, b in zip(starts, ends)]


def time_cpu(run: Callable, cfg: Config) -> List[float]:
    t0 = time.perf_counter()
    r = run()  # warm-up (and compilation)
    del r
    first = time.perf_counter() - t0
    # A second warm-up unless the op is slow; it also gives a compile-free estimate.
    if first < 0.25 or cfg.quick:
        t0 = time.perf_counter()
        r = run()
        del r
        first = time.perf_counter() - t0
    n_rep = int(min(max(cfg.rep_ms / 1e3 / max(first, 1e-6), cfg.min_reps), cfg.max_reps))
    times = []
    for _ in range(n_rep):
        t0 = time.perf_counter()
        r = run()
        t1 = time.perf_counter()
        del r  # freeing is not timed
        times.append((t1 - t0) * 1e3)
    return times


# --------------------------------------------------------------------------- memory
def peak_extra_cuda(run: Callable, device: torch.device) -> float:
    torch.cuda.synchronize(device)
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    r = run()
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) - before
    del r
    return peak / MiB


def peak_extra_cpu(run: Callable) -> float:
    """Peak of the running sum of the CPU allocator's [memory] events during one call."""
    from torch.profiler import ProfilerActivity, profile

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            r = run()
            del r
        try:
            events = [e for e in prof.profiler.kineto_results.events()
                      if e.name() == "[memory]" and "CPU" in str(e.device_type())]
            events.sort(key=lambda e: e.start_ns())
            deltas = [e.nbytes() for e in events]
        except AttributeError:  # profiler internals changed: fall back to per-op totals
            deltas = [e.cpu_memory_usage for e in prof.events() if e.cpu_memory_usage and not e.cpu_parent]
    running = peak = 0
    for d in deltas:
        running += d
        peak = max(peak, running)
    return peak / MiB


# --------------------------------------------------------------------------- correctness
def _compare(got: Sequence[torch.Tensor], want: Sequence[torch.Tensor], dtype: torch.dtype,
             what: str, bad_frac_ok: float) -> Tuple[bool, str]:
    if len(got) != len(want):
        return False, f"{what}: {len(got)} tensors vs {len(want)}"
    rtol, atol_rel = DTYPE_TOL.get(dtype, (1e-3, 1e-4))
    worst = 0.0
    for g, w in zip(got, want):
        if g is None or w is None:
            if (g is None) != (w is None):
                return False, f"{what}: gradient missing"
            continue
        if g.shape != w.shape:
            return False, f"{what}: shape {tuple(g.shape)} vs {tuple(w.shape)}"
        if not g.is_floating_point():
            bad = (g != w).float().mean().item() if g.numel() else 0.0
            if bad > 1e-3:  # ties between almost-equal IoUs may resolve differently
                return False, f"{what}: {bad:.2%} of indices differ"
            continue
        g64, w64 = g.double(), w.double()
        scale = w64.abs().max().item() if w.numel() else 0.0
        atol = atol_rel * max(scale, 1e-30)
        err = (g64 - w64).abs()
        bad = (err > atol + rtol * w64.abs()).float().mean().item() if w.numel() else 0.0
        if w.numel():
            worst = max(worst, (err.max().item()) / max(scale, 1e-30))
        if bad > bad_frac_ok:
            return False, f"{what}: {bad:.3%} outside tol, max rel err {worst:.1e}"
    return True, f"max rel err {worst:.1e}"


def _grad_check(case: Case, base: Inputs) -> Tuple[bool, str]:
    grads = []
    for fn in (case.ours, case.reference):
        inp = with_grad(base, case.grad_args)
        outs = diff_outputs(fn(*inp.args, **inp.kwargs))
        grads.append(list(torch.autograd.grad(outs, inp.grad_inputs, _grad_outputs(outs), allow_unused=True)))
        del outs, inp
    # A gradient follows the argmax: allow a tiny fraction of elements whose argmax is
    # decided differently between almost-equal candidates.
    return _compare(grads[0], grads[1], case.dtype, "grad", 1e-4)


def check_case(case: Case, cfg: Config, base: Inputs, fwd_fits: bool, grad_fits: bool) -> str:
    """'ok', 'ok (subset)', 'unchecked' or 'MISMATCH ...' / 'ERROR ...'.

    The forward is compared on the full inputs when the reference fits the memory budget,
    otherwise on ``case.check_subset`` (a slice of the problem); the gradients likewise."""
    has_bwd = any(m in case.modes for m in ("bwd", "fwd+bwd")) and any(m in cfg.modes for m in ("bwd", "fwd+bwd"))
    need_sub = not fwd_fits or (has_bwd and not grad_fits)
    sub, select = case.check_subset(base) if case.check_subset and need_sub else (None, None)
    try:
        if not fwd_fits and sub is None:
            return "unchecked"
        with torch.no_grad():
            ours = case.ours(*base.args, **base.kwargs)
            if fwd_fits:
                ref = case.reference(*base.args, **base.kwargs)
                got = flat_tensors(ours)
            else:
                ref = case.reference(*sub.args, **sub.kwargs)
                got = flat_tensors(select(ours))
            ok, msg = _compare(got, flat_tensors(ref), case.dtype, "fwd", 0.0)
            del ours, ref, got
        if not ok:
            return "MISMATCH " + msg
        if has_bwd and (grad_fits or sub is not None):
            ok, msg = _grad_check(case, base if grad_fits else sub)
            if not ok:
                return "MISMATCH " + msg
        if has_bwd and not grad_fits and sub is None:
            return "ok (fwd only)"
        return "ok (subset)" if sub is not None else "ok"
    except Exception as e:  # noqa: BLE001
        return "ERROR " + _short_error(e)
    finally:
        _cleanup(cfg.device)


def _cleanup(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()


# --------------------------------------------------------------------------- running
def _params_str(p: Dict[str, Any]) -> str:
    return " ".join(f"{k}={v}" for k, v in p.items())


def run_case(case: Case, cfg: Config, log: Callable[[str], None] = print) -> List[Row]:
    dev = cfg.device
    rows: List[Row] = []
    budget = cfg.mem_budget
    modes = [m for m in cfg.modes if m in case.modes]
    need = (lambda m: case.ref_bytes(m)) if case.ref_bytes else (lambda m: 0)
    ref_need = {m: need(m) for m in modes}
    # The guard runs the reference forward, and forward + backward when there is a backward.
    torch.manual_seed(0)
    try:
        base = case.make_inputs(dev)
    except Exception as e:  # noqa: BLE001  (e.g. out of memory)
        log(f"  {case.label} {case.name}: cannot build inputs: {_short_error(e)}")
        _cleanup(dev)
        return [Row(op=case.op, label=case.label, case=case.name, params=_params_str(case.params),
                    dtype=DTYPE_NAMES.get(case.dtype, str(case.dtype)), provider=p, mode=m,
                    status="error", note="inputs: " + _short_error(e))
                for m in modes for p in cfg.providers]
    check = check_case(case, cfg, base, fwd_fits=need("fwd") <= budget, grad_fits=need("fwd+bwd") <= budget)
    for mode in modes:
        for provider in cfg.providers:
            row = Row(op=case.op, label=case.label, case=case.name, params=_params_str(case.params),
                      dtype=DTYPE_NAMES.get(case.dtype, str(case.dtype)), provider=provider, mode=mode,
                      bytes=int(case.bytes_moved(mode)), check=check)
            rows.append(row)
            if provider != "tbd_ops" and ref_need[mode] > budget:
                row.status = "skipped"
                row.note = f"skipped (needs ~{fmt_bytes(ref_need[mode])})"
                continue
            if provider == "compile" and case.no_compile:
                row.status = "skipped"
                row.note = f"skipped ({case.no_compile})"
                continue
            run = None
            try:
                t0 = time.perf_counter()
                fn = provider_fn(case, provider)
                run = make_runner(case, fn, mode, base)
                with _no_gc():
                    times = time_cuda(run, cfg) if dev.type == "cuda" else time_cpu(run, cfg)
                row.median_ms = _percentile(times, 0.5)
                row.p20_ms = _percentile(times, 0.2)
                row.p80_ms = _percentile(times, 0.8)
                row.reps = len(times)
                row.gbps = row.bytes / (row.median_ms * 1e-3) / 1e9
                with _no_gc():
                    row.peak_extra_mib = peak_extra_cuda(run, dev) if dev.type == "cuda" else peak_extra_cpu(run)
                if provider == "compile":
                    row.note = f"{time.perf_counter() - t0:.0f} s wall incl. compile"
            except Exception as e:  # noqa: BLE001  (record, go on)
                row.status = "error"
                row.note = _short_error(e)
                if os.environ.get("TBD_BENCH_TRACEBACK"):
                    traceback.print_exc()
            finally:
                del run
                _cleanup(dev)
    del base
    _cleanup(dev)
    eager = {r.mode: r.median_ms for r in rows if r.provider == "eager" and r.status == "ok"}
    for r in rows:
        if r.status == "ok" and r.mode in eager:
            r.speedup_vs_eager = eager[r.mode] / r.median_ms
    return rows


# --------------------------------------------------------------------------- output
COLUMNS = [("op", 4), ("case", 30), ("provider", 8), ("mode", 7), ("median ms", 10), ("p20", 9),
           ("p80", 9), ("GB/s", 7), ("peak MiB", 9), ("vs eager", 8)]


def _num(x: float, width: int, digits: int = 3) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-".rjust(width)
    if abs(x) >= 1000:
        return f"{x:.0f}".rjust(width)
    if abs(x) >= 100:
        return f"{x:.1f}".rjust(width)
    return f"{x:.{digits}g}".rjust(width) if abs(x) < 1 else f"{x:.2f}".rjust(width)


def table_header() -> str:
    head = " ".join(name.ljust(w) if i < 4 else name.rjust(w) for i, (name, w) in enumerate(COLUMNS))
    return head + "  check\n" + "-" * (len(head) + 7)


def format_rows(rows: List[Row]) -> str:
    lines = []
    prev = None
    for r in rows:
        key = (r.label, r.case, r.dtype)
        if prev is not None and key != prev:
            lines.append("")
        prev = key
        case = r.case + ("" if r.dtype == "fp32" else " " + r.dtype)
        left = f"{r.label:<4} {case[:30]:<30} {r.provider:<8} {r.mode:<7}"
        if r.status == "ok":
            sp = r.speedup_vs_eager
            mid = (f" {_num(r.median_ms, 10)} {_num(r.p20_ms, 9)} {_num(r.p80_ms, 9)} {_num(r.gbps, 7)}"
                   f" {_num(r.peak_extra_mib, 9)} " + ("-".rjust(8) if math.isnan(sp) else f"{_num(sp, 7)}x"))
        else:
            mid = "  " + (r.note if r.status == "skipped" else "error: " + r.note)
        lines.append(left + mid + (f"  {r.check}" if r.provider == "tbd_ops" else "")
                     + (f"  ({r.note})" if r.status == "ok" and r.note else ""))
    return "\n".join(lines)


def format_table(rows: List[Row]) -> str:
    return table_header() + "\n" + format_rows(rows)


def _merge(previous: List[Row], new: List[Row]) -> List[Row]:
    """``previous`` with the rows of ``new`` replacing those of the same case, provider and mode."""
    keys = {_row_key(r) for r in new}
    return [r for r in previous if _row_key(r) not in keys] + list(new)


def exit_code(rows: List[Row]) -> int:
    """1 when tbd_ops failed to run or disagrees with the reference, else 0."""
    bad = [r for r in rows if r.provider == "tbd_ops"
           and (r.status == "error" or r.check.startswith(("MISMATCH", "ERROR")))]
    return 1 if bad else 0


_FLOAT_FIELDS = ("median_ms", "p20_ms", "p80_ms", "gbps", "peak_extra_mib", "speedup_vs_eager")
_ENV_FIELDS = ("device", "device_type", "torch", "tbd_ops", "commit", "threads", "date")


def write_csv(rows: List[Row], path: Path) -> None:
    """One line per row; every line carries the device and versions it was measured with."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fields = [f.name for f in dataclasses.fields(Row) if f.name != "env"] + list(_ENV_FIELDS)
    tmp = path.with_suffix(".csv.tmp")
    with tmp.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            d = {k: v for k, v in dataclasses.asdict(r).items() if k != "env"}
            for k in _FLOAT_FIELDS:
                v = d[k]
                d[k] = "" if isinstance(v, float) and math.isnan(v) else f"{v:.6g}"
            d.update(r.env)
            w.writerow(d)
    tmp.replace(path)


def read_csv(path: Path) -> List[Row]:
    """Rows of a CSV written by :func:`write_csv` (for --append)."""
    rows = []
    names = {f.name for f in dataclasses.fields(Row)} - {"env"}
    with path.open(newline="") as f:
        for d in csv.DictReader(f):
            kw: Dict[str, Any] = {k: v for k, v in d.items() if k in names}
            for k in _FLOAT_FIELDS:
                kw[k] = float(kw[k]) if kw.get(k) else float("nan")
            kw["reps"] = int(kw.get("reps") or 0)
            kw["bytes"] = int(kw.get("bytes") or 0)
            rows.append(Row(**kw, env={k: d.get(k, "") for k in _ENV_FIELDS}))
    return rows


def _row_key(r: Row) -> Tuple[str, ...]:
    return (r.label, r.case, r.dtype, r.provider, r.mode)


def write_plot(rows: List[Row], env: Dict[str, str], path: Path) -> Optional[str]:
    """Grouped bars: speedup vs eager per case, one panel per (op, mode), plus peak memory."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import matplotlib.ticker as ticker
    except Exception as e:  # noqa: BLE001
        return f"matplotlib not available ({type(e).__name__}); PNG skipped"
    labels = list(dict.fromkeys(r.label for r in rows))
    modes = [m for m in MODES if any(r.mode == m for r in rows)]
    ncols = len(modes) + 1
    colors = {"tbd_ops": "#d62728", "eager": "#7f7f7f", "compile": "#1f77b4"}
    ncase = max(len({r.case + r.dtype for r in rows if r.label == lab}) for lab in labels)
    width_per_panel = max(4.5, 0.32 * ncase + 1.5)
    fig, axes = plt.subplots(len(labels), ncols, figsize=(width_per_panel * ncols, 4.8 * len(labels)),
                             squeeze=False)
    for i, lab in enumerate(labels):
        op_rows = [r for r in rows if r.label == lab]
        cases = list(dict.fromkeys((r.case, r.dtype) for r in op_rows))
        names = [c if d == "fp32" else f"{c} {d}" for c, d in cases]
        x = list(range(len(cases)))
        for j, mode in enumerate(modes + ["memory"]):
            ax = axes[i][j]
            present = [p for p in PROVIDERS if any(r.provider == p for r in op_rows)]
            if mode == "memory":
                provs = present
                bw = 0.8 / max(len(provs), 1)
                metric = lambda r: r.peak_extra_mib  # noqa: E731
                mrows = [r for r in op_rows if r.mode == "fwd"]
                ax.set_title(f"{lab}: peak extra memory, fwd (MiB, log)", fontsize=10)
            else:
                provs = [p for p in present if p != "eager"]
                bw = 0.8 / max(len(provs), 1)
                metric = lambda r: r.speedup_vs_eager  # noqa: E731
                mrows = [r for r in op_rows if r.mode == mode]
                ax.set_title(f"{lab} {mode}: speedup vs eager (log)", fontsize=10)
                ax.axhline(1.0, color="#7f7f7f", lw=1, ls="--", label="eager = 1")
            if not mrows:
                ax.set_visible(False)
                continue
            vals_all = []
            for k, prov in enumerate(provs):
                xs, vs = [], []
                for ci, c in enumerate(cases):
                    r = next((r for r in mrows if (r.case, r.dtype) == c and r.provider == prov), None)
                    pos = ci + (k - (len(provs) - 1) / 2) * bw
                    if r is None:
                        continue
                    v = metric(r) if r.status == "ok" else float("nan")
                    if v is not None and not math.isnan(v) and v > 0:
                        xs.append(pos)
                        vs.append(v)
                        vals_all.append(v)
                    elif prov != "eager" or mode == "memory":
                        tag = "skip" if r.status == "skipped" else ("err" if r.status == "error" else "")
                        if tag:
                            ax.text(pos, 0.02, tag, rotation=90, fontsize=7, ha="center", va="bottom",
                                    transform=ax.get_xaxis_transform(), color=colors[prov])
                ax.bar(xs, vs, bw, label=prov, color=colors[prov])
                if mode != "memory":
                    for px, v in zip(xs, vs):
                        ax.text(px, v * 1.05, f"{v:.2g}" if v < 10 else f"{v:.0f}", fontsize=6,
                                ha="center", va="bottom", rotation=90)
            ax.set_yscale("log")
            if vals_all:
                lo, hi = min(vals_all + [1.0]), max(vals_all + [1.0])
                ax.set_ylim(lo / 2, hi * 3)
                subs = (1.0, 2.0, 5.0) if hi / lo < 300 else (1.0,)
                ax.yaxis.set_major_locator(ticker.LogLocator(base=10, subs=subs))
            ax.yaxis.set_major_formatter(ticker.FuncFormatter(lambda v, _: f"{v:g}"))
            ax.yaxis.set_minor_formatter(ticker.NullFormatter())
            ax.set_xticks(x)
            ax.set_xticklabels(names, rotation=60, ha="right", fontsize=7)
            ax.grid(axis="y", which="major", alpha=0.3)
            ax.legend(fontsize=7, loc="upper left")
    fig.suptitle(f"tbd_ops {env['tbd_ops']} ({env['commit']}) on {env['device']}, torch {env['torch']}"
                 + (f", {env['threads']} threads" if env.get("threads") else ""), fontsize=11)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return None


# --------------------------------------------------------------------------- CLI
def _cpu_busy_fraction(interval: float = 0.5) -> Optional[float]:
    """Fraction of all cores' time spent non-idle during ``interval`` (Linux /proc/stat)."""
    def sample():
        fields = [float(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
        return fields[3] + (fields[4] if len(fields) > 4 else 0.0), sum(fields)  # idle + iowait, total
    try:
        idle0, total0 = sample()
        time.sleep(interval)
        idle1, total1 = sample()
    except (OSError, ValueError, IndexError):
        return None
    return 1.0 - (idle1 - idle0) / max(total1 - total0, 1.0)


def _available_ram() -> float:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return float(line.split()[1]) * 1024
    except OSError:
        pass
    return 10 * GiB


def make_config(args: argparse.Namespace) -> Config:
    if args.device:
        device = torch.device(args.device)
    elif torch.cuda.is_available() and not tbd_ops.cuda_available():
        print("note: a GPU is present but this build of tbd_ops has no CUDA kernels; benchmarking on CPU")
        device = torch.device("cpu")
    else:
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise SystemExit("--device cuda: torch.cuda.is_available() is False")
        if not tbd_ops.cuda_available():
            raise SystemExit("--device cuda: this build of tbd_ops has no CUDA kernels")
        device = torch.device("cuda", torch.cuda.current_device())
    cfg = Config(device=device, quick=args.quick, full=args.full, plot=not args.no_plot, filter=args.filter)
    if device.type == "cpu":
        if args.threads:
            cfg.threads = args.threads
        else:
            try:
                cfg.threads = len(os.sched_getaffinity(0))
            except AttributeError:
                cfg.threads = os.cpu_count() or 1
        torch.set_num_threads(cfg.threads)
        cfg.mem_budget = min(8 * GiB, 0.4 * _available_ram())
        cfg.warmup_ms, cfg.rep_ms, cfg.min_reps, cfg.max_reps = 0.0, 400.0, 3, 25
    else:
        free, _ = torch.cuda.mem_get_info(device)
        cfg.mem_budget = 0.4 * free
        cfg.warmup_ms, cfg.rep_ms, cfg.min_reps, cfg.max_reps = 25.0, 100.0, 10, 200
    if args.quick:
        cfg.warmup_ms, cfg.rep_ms, cfg.min_reps, cfg.max_reps = 1.0, 5.0, 3, 5
    if args.mem_budget_gib is not None:
        cfg.mem_budget = args.mem_budget_gib * GiB
    if args.providers:
        cfg.providers = tuple(p for p in PROVIDERS if p in args.providers.split(","))
    elif args.quick:
        cfg.providers = ("tbd_ops", "eager")  # torch.compile needs tens of seconds to compile
    if args.modes:
        cfg.modes = tuple(m for m in MODES if m in args.modes.split(","))
    return cfg


def _configure_compile() -> None:
    # CPU-only machines: cpp_extension warns that no CUDA runtime is found when inductor loads.
    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
    try:
        import torch._dynamo
        import torch._functorch.config as functorch_config
    except Exception:  # noqa: BLE001  (compile rows will then record the error)
        return
    # The bwd mode calls backward repeatedly on one graph (retain_graph=True), which
    # AOTAutograd's donated buffers forbid; without them compile may use a little more memory.
    if hasattr(functorch_config, "donated_buffer"):
        functorch_config.donated_buffer = False
    # Guards are reset per case; a high limit keeps the fwd and fwd+bwd graphs of a case compiled.
    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(torch._dynamo.config, name):
            setattr(torch._dynamo.config, name, 64)


def parse_args(argv: Optional[Sequence[str]], description: str) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--device", choices=["cpu", "cuda"], default=None,
                   help="default: cuda if available, else cpu")
    p.add_argument("--quick", action="store_true",
                   help="tiny sizes, few repetitions, no torch.compile unless --providers says so (smoke test)")
    p.add_argument("--full", action="store_true",
                   help="every case, also on CPU (slow there: tens of minutes), and torch.compile "
                        "also for the cases whose compilation alone takes tens of seconds")
    p.add_argument("--providers", default=None, help="comma list of tbd_ops,eager,compile")
    p.add_argument("--modes", default=None, help="comma list of fwd,bwd,fwd+bwd")
    p.add_argument("--filter", default=None, help="regex on '<op label> <case name>'")
    p.add_argument("--mem-budget-gib", type=float, default=None,
                   help="skip eager/compile when the reference's estimated memory exceeds this "
                        "(default: 40%% of free GPU memory; on CPU 40%% of available RAM, at most 8 GiB)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: all cores)")
    p.add_argument("--out-dir", default=str(RESULTS_DIR), help="where the CSV and PNG go")
    p.add_argument("--no-plot", action="store_true", help="do not write the PNG")
    p.add_argument("--list", action="store_true", help="list the selected cases and exit")
    p.add_argument("--append", action="store_true",
                   help="merge into an existing CSV of the same device (e.g. a run split with --filter); "
                        "the PNG then shows all rows")
    return p.parse_args(argv)


def main(modules: Sequence[Any], tag: str = "", argv: Optional[Sequence[str]] = None,
         description: str = "tbd_ops benchmarks") -> List[Row]:
    """Runs the cases of each module (``module.cases(cfg) -> (cases, notes)``).

    Writes ``<out-dir>/bench_<device>[_<tag>][_quick].csv`` and ``.png``."""
    args = parse_args(argv, description)
    cfg = make_config(args)
    if "compile" in cfg.providers:
        _configure_compile()
    env = environment(cfg)
    cases: List[Case] = []
    notes: List[str] = []
    for m in modules:
        c, n = m.cases(cfg)
        cases += c
        notes += n
    if cfg.filter:
        rx = re.compile(cfg.filter)
        cases = [c for c in cases if rx.search(f"{c.label} {c.name}")]
    slug = device_slug(cfg.device)
    stem = "bench_" + slug + (f"_{tag}" if tag else "") + ("_quick" if cfg.quick else "")
    out_dir = Path(args.out_dir)

    print(f"tbd_ops {env['tbd_ops']} (commit {env['commit']}), torch {env['torch']}")
    print(f"device: {env['device']} ({cfg.device})" + (f", {cfg.threads} threads" if cfg.device.type == "cpu" else ""))
    print(f"providers: {', '.join(cfg.providers)}; modes: {', '.join(cfg.modes)}; "
          f"eager/compile skipped above ~{fmt_bytes(cfg.mem_budget)} estimated reference memory")
    if cfg.device.type == "cuda":
        print("timing: CUDA events per iteration, cold L2, median and 20/80th percentiles over "
              f">= {cfg.min_reps} reps after warm-up")
    else:
        print(f"timing: perf_counter, warm-up then {cfg.min_reps}..{cfg.max_reps} reps; "
              "peak memory: torch.profiler CPU allocator events")
        busy = _cpu_busy_fraction()
        if busy is not None and busy > 0.2:
            print(f"WARNING: {busy:.0%} of the CPU was busy with other processes just before the start; "
                  f"multi-threaded timings ({cfg.threads} threads) will be noisy (see --threads)")
    for n in notes:
        print("note: " + n)
    print(f"{len(cases)} cases\n")
    if args.list:
        for c in cases:
            skip = [m for m in c.modes if c.ref_bytes and c.ref_bytes(m) > cfg.mem_budget]
            print(f"  {c.label} {c.name:<30} {DTYPE_NAMES.get(c.dtype, c.dtype):<5} {_params_str(c.params)}  "
                  f"modes={','.join(c.modes)}"
                  + (f"  eager/compile skipped for {','.join(skip)}" if skip else "")
                  + (f"  no compile ({c.no_compile})" if c.no_compile else ""))
        return []

    t0 = time.perf_counter()
    csv_path = out_dir / f"{stem}.csv"
    previous: List[Row] = []
    if args.append and csv_path.exists():
        previous = read_csv(csv_path)
        print(f"appending to {csv_path} ({len(previous)} rows; rows of re-run cases are replaced)\n")
    rows: List[Row] = []
    print(table_header())
    for case in cases:
        t_case = time.perf_counter()
        case_rows = run_case(case, cfg)
        for r in case_rows:
            r.env = dict(env)
        rows += case_rows
        print(format_rows(case_rows))
        print(f"{'':5}({time.perf_counter() - t_case:.1f} s)\n", flush=True)
        write_csv(_merge(previous, rows), csv_path)  # after every case: an interrupted run keeps its rows
    elapsed = time.perf_counter() - t0
    bad = [r for r in rows if r.provider == "tbd_ops" and r.check.startswith(("MISMATCH", "ERROR"))]
    if bad:
        print(f"WARNING: {len({(r.label, r.case, r.dtype) for r in bad})} case(s) where tbd_ops "
              "disagrees with the eager reference (rows marked MISMATCH)")
    write_csv(_merge(previous, rows), csv_path)
    print(f"wrote {csv_path}")
    if cfg.plot:
        msg = write_plot(_merge(previous, rows), env, out_dir / f"{stem}.png")
        print(msg if msg else f"wrote {out_dir / (stem + '.png')}")
    print(f"total time {elapsed:.0f} s")
    return rows
