"""The examples run (a short smoke run each)."""
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_tbd_distill_retinanet_example():
    pytest.importorskip("mmdet", reason="mmdet is not installed (make test installs mmdet==3.3.0)")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
    out = subprocess.run(
        [sys.executable, os.path.join(ROOT, "examples", "tbd_distill_retinanet.py"), "--iters", "2", "--size", "96",
         "--mmcv-lite", "--device", "cpu"],
        capture_output=True, text=True, timeout=600, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    lines = [l for l in out.stdout.splitlines() if l.startswith("iter")]
    assert len(lines) == 2, out.stdout
    for key in ("loss_cls", "loss_bbox", "loss_hd", "loss_tfd", "harmony"):
        assert key in lines[-1], lines[-1]
    assert "nan" not in lines[-1].lower()
