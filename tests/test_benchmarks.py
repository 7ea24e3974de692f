"""The benchmark harness runs end to end (tiny sizes) and its correctness guard passes."""
import csv
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# Every op (or composite loss) that has a benchmark script; the quick run covers each of them.
EXPECTED_OPS = {"channel_max_spatial_softmax", "decode_max_iou", "masked_sq_dist", "masked_l1", "tbd_loss",
                "prediction_guided_assign", "consistency_voting", "sigmoid_focal_loss", "pseco_unsup_roi_step"}


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
    missing = EXPECTED_OPS - ops
    assert not missing, f"no quick benchmark rows for {sorted(missing)}:\n" + proc.stdout[-3000:]
    assert all(r["check"].startswith("ok") for r in rows if r["provider"] == "tbd_ops" and r["status"] == "ok")
    for op in EXPECTED_OPS:  # tbd_ops and eager both ran, and the guard compared them
        mine = [r for r in rows if r["op"] == op]
        assert any(r["provider"] == "tbd_ops" and r["status"] == "ok" for r in mine), op
        assert any(r["provider"] == "eager" and r["status"] == "ok" for r in mine), op
