"""The benchmark harness runs end to end (tiny sizes) and its correctness guard passes."""
import csv
import os
import subprocess
import sys
from pathlib import Path

import tbd_ops

ROOT = Path(__file__).resolve().parents[1]
# Every op (or composite loss) that has a benchmark script; the quick run covers each of them.
EXPECTED_OPS = {"channel_max_spatial_softmax", "decode_max_iou", "masked_sq_dist", "masked_l1", "tbd_loss",
                "prediction_guided_assign", "consistency_voting", "sigmoid_focal_loss", "pseco_unsup_roi_step"}


def test_run_all_quick(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(Path(tbd_ops.__file__).resolve().parents[1]))  # the tbd_ops under test
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "run_all.py"), "--quick", "--device", "cpu",
         "--no-plot", "--out-dir", str(tmp_path)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    files = list(tmp_path.glob("*.csv"))
    assert len(files) == 1
    rows = list(csv.DictReader(files[0].open()))
    ops = {r["op"] for r in rows}
    missing = EXPECTED_OPS - ops
    assert not missing, f"no quick benchmark rows for {sorted(missing)}:\n" + proc.stdout[-3000:]
    assert all(r["check"].startswith("ok") for r in rows if r["provider"] == "tbd_ops" and r["status"] == "ok")
    for op in EXPECTED_OPS:  # tbd_ops and eager both ran, and the guard compared them
        mine = [r for r in rows if r["op"] == op]
        assert any(r["provider"] == "tbd_ops" and r["status"] == "ok" for r in mine), op
        assert any(r["provider"] == "eager" and r["status"] == "ok" for r in mine), op


def _row(label, case, provider, mode, ms, status="ok"):
    return dict(device="cpu", torch="2", commit="abc", label=label, case=case, dtype="fp32", provider=provider,
                mode=mode, status=status, median_ms=ms)


def test_summary_figure(tmp_path):
    """make bench's picture: one figure, the speed-up of tbd_ops over eager and over torch.compile per
    case (rows) and mode (columns)."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import harness
    finally:
        sys.path.pop(0)
    rows = [_row("p_c", "P3", "tbd_ops", "fwd", 0.5), _row("p_c", "P3", "eager", "fwd", 2.0),
            _row("p_c", "P3", "compile", "fwd", 1.0), _row("p_c", "P3", "tbd_ops", "bwd", 4.0),
            _row("p_c", "P3", "eager", "bwd", 2.0), _row("p_c", "P3", "compile", "bwd", 0.0, status="skipped"),
            _row("msd", "P5", "tbd_ops", "fwd", 1.0), _row("msd", "P5", "eager", "fwd", 3.0)]
    cases, speed = harness.summary(rows)
    assert cases == ["p_c P3 fp32", "msd P5 fp32"]
    assert speed[("p_c P3 fp32", "fwd")] == {"eager": 4.0, "compile": 2.0}
    assert speed[("p_c P3 fp32", "bwd")] == {"eager": 0.5}  # slower than eager; compile did not run
    assert speed[("msd P5 fp32", "fwd")] == {"eager": 3.0}
    # Many cases: still one figure of a readable size (not one panel per op and mode).
    many = [_row(f"op{i % 5}", f"case{i}", p, m, t) for i in range(40) for m in ("fwd", "bwd", "fwd+bwd")
            for p, t in (("tbd_ops", 1.0), ("eager", 1.0 + i / 10), ("compile", 2.0))]
    path = tmp_path / "summary.png"
    assert harness.write_plot(many, path) == f"wrote {path}"
    import matplotlib.pyplot as plt
    height, width = plt.imread(str(path)).shape[:2]
    assert width <= 2000 and height <= 1500, (width, height)


def _first_quick_case(script: str):
    """The harness module, a quick CPU config, and the first quick case of benchmarks/<script>.py with
    its inputs."""
    import importlib

    import torch

    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        bench = importlib.import_module(script)
        import harness
    finally:
        sys.path.pop(0)
    cfg = harness.Config(device=torch.device("cpu"), quick=True)
    case = bench.cases(cfg)[0][0]
    return harness, cfg, case, case.make_inputs(cfg.device)


def test_guard_catches_planted_bugs():
    """The guard against eager on a p_c case: values equal but 5% of the gradient dropped (it lives in
    one channel of K, so 5% of its locations is 0.06% of the elements), and a forward that is wrong
    only with gradients enabled (the forward fwd+bwd times), are both MISMATCH; the op itself is ok."""
    import dataclasses

    import torch

    harness, cfg, case, base = _first_quick_case("bench_channel_max_spatial_softmax")
    assert harness.check(case, base, cfg).startswith("ok")

    def dropped(x, *a, **k):
        out = tbd_ops.channel_max_spatial_softmax(x, *a, **k)
        keep = (torch.rand(out.shape) > 0.05).to(out.dtype)
        return out.detach() * (1 - keep) + out * keep

    def doubled_with_grad(x, *a, **k):
        out = tbd_ops.channel_max_spatial_softmax(x, *a, **k)
        return out * 2 if torch.is_grad_enabled() else out

    assert harness.check(dataclasses.replace(case, ours=dropped), base, cfg).startswith("MISMATCH grad")
    assert harness.check(dataclasses.replace(case, ours=doubled_with_grad), base, cfg).startswith(
        "MISMATCH fwd with grad")


def test_bwd_times_one_backward_per_forward(monkeypatch):
    """The bwd mode runs a fresh forward (untimed) before each backward, as a training step does: the
    forward's time is not in the samples, each backward consumes its graph (none is retained, so
    torch.compile's donated buffers work), and every call gives eager's gradients."""
    import types

    import pytest
    import torch

    harness, cfg, case, base = _first_quick_case("bench_masked_reduce")

    # Only the backward is timed: on a fake clock, each forward takes 1000 s and each backward 1 s.
    clock = [0.0]

    class Tick(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return x.clone()

        @staticmethod
        def backward(ctx, g):
            clock[0] += 1.0
            return g

    def ticking(*args, **kwargs):
        clock[0] += 1000.0
        return Tick.apply(case.eager(*args, **kwargs))

    run = harness.make_runner(case, ticking, "bwd", base)
    assert isinstance(run, harness.Backward)
    monkeypatch.setattr(harness, "time", types.SimpleNamespace(perf_counter=lambda: clock[0]))
    times = harness._time_backward(run, cfg.device, budget=10.0)
    monkeypatch.undo()
    assert len(times) >= 3 and all(t == 1.0 for t in times), times

    # Each backward consumes its graph, and a call without a forward before it is refused.
    run.prepare()
    outs = run.outs
    run()
    with pytest.raises(RuntimeError, match="second time"):
        torch.autograd.grad(outs, run.leaves, run.grads)
    with pytest.raises(RuntimeError, match="prepare"):
        run()

    # Every backward gives eager's gradients, under torch.compile too.
    want = harness._forward_and_grads(case, case.eager, base)[1]
    torch._dynamo.reset()
    crun = harness.make_runner(case, torch.compile(case.eager, dynamic=False), "bwd", base)
    for _ in range(3):
        got = crun()
        assert len(got) == len(want) == 2
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w)
        crun.prepare()

    # A compiled function with donated buffers (a retained graph raises there) runs backward after
    # backward: Backward never retains the graph. Its first backward is not retained: AOTAutograd
    # compiles the backward then, and keeps the donation only if that first call does not retain the
    # graph (with a warm compile cache the backward comes compiled and the order would not matter).
    torch._dynamo.reset()
    f = torch.compile(lambda x, w1, w2: torch.mm(torch.mm(x, w1).relu(), w2), dynamic=False)
    xs = [torch.randn(32, 32, requires_grad=True) for _ in range(3)]
    o = f(*xs)
    torch.autograd.grad(o, xs, torch.ones_like(o))
    o = f(*xs)
    with pytest.raises(RuntimeError, match="donated"):
        torch.autograd.grad(o, xs, torch.ones_like(o), retain_graph=True)
    drun = harness.Backward(f, xs, {}, xs)
    assert len(harness._time_backward(drun, cfg.device, budget=0.01)) >= 3
