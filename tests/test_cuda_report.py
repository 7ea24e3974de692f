"""make cuda-report: per-kernel registers, shared memory, spills and H100 occupancy for sm_90."""
import importlib.util
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
spec = importlib.util.spec_from_file_location("cuda_report", ROOT / "benchmarks" / "cuda_report.py")
cuda_report = importlib.util.module_from_spec(spec)
spec.loader.exec_module(cuda_report)

HAS_NVCC = shutil.which("nvcc") is not None or Path("/usr/local/cuda/bin/nvcc").exists()


@pytest.mark.parametrize("threads,regs,smem,expected", [
    (256, 32, 0, 1.0),       # 8 blocks x 8 warps = 64 warps (thread limit 2048)
    (256, 64, 0, 0.5),       # 64 regs x 32 = 2048 per warp -> 32 warps
    (256, 128, 0, 0.25),     # 4096 per warp -> 16 warps = 2 blocks
    (1024, 64, 0, 0.5),      # 32 warps per block, 65536 / (2048 * 32) = 1 block
    (256, 40, 0, 0.75),      # 40 x 32 = 1280 per warp -> 51 warps -> 6 blocks = 48 warps
    (256, 32, 48 * 1024, 0.5),  # smem: 228 KiB / (48 + 1) KiB = 4 blocks = 32 warps
    (32, 16, 0, 0.5),        # block limit: 32 blocks x 1 warp
])
def test_occupancy_h100(threads, regs, smem, expected):
    assert cuda_report.occupancy(threads, regs, smem) == pytest.approx(expected)


@pytest.mark.skipif(not HAS_NVCC, reason="needs nvcc (the CUDA toolkit) to compile the kernels for sm_90")
def test_report_lists_every_kernel_and_no_spills(tmp_path):
    p = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "cuda_report.py"), "--fail-on-spill",
                        "--csv", str(tmp_path / "r.csv")], capture_output=True, text=True)
    assert p.returncode == 0, p.stdout + p.stderr
    declared = set()
    for cu in (ROOT / "cuda").glob("*.cu"):
        declared |= set(re.findall(r"__global__\s+void\s+(?:__launch_bounds__\(\w+\)\s*)?(\w+)", cu.read_text()))
    assert declared
    for name in declared:
        assert name in p.stdout, f"{name} missing from the report"
    assert "no spills" in p.stdout
