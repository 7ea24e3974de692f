"""The benchmark harness runs end to end (tiny sizes) and its correctness guard passes."""
import csv
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_run_all_quick(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(ROOT / "python"))
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
    assert {"channel_max_spatial_softmax", "decode_max_iou"} <= ops
    assert all(r["check"].startswith("ok") for r in rows if r["provider"] == "tbd_ops" and r["status"] == "ok")
    assert any(r["provider"] == "tbd_ops" for r in rows) and any(r["provider"] == "eager" for r in rows)
