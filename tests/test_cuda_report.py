"""make cuda-report (benchmarks/cuda_report.py): per-kernel resources and H100 occupancy for sm_90.

The compile test needs nvcc only (no GPU) and fails when any kernel spills registers.
"""
import csv
import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "benchmarks" / "cuda_report.py"
_spec = importlib.util.spec_from_file_location("cuda_report", SCRIPT)  # benchmarks/ is not a package
cuda_report = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(cuda_report)

NVCC = cuda_report.find_nvcc()


# H100 (cc 9.0) per SM: 65,536 registers in 4 sub-partitions of 16,384, allocated per warp in
# units of 256; 64 warps (2,048 threads); 32 blocks; 228 KiB shared memory, 1 KiB reserved per
# block, allocated in units of 128 B, at most 227 KiB per block.
#   regs/warp = ceil(regs * 32 / 256) * 256;  warps by regs = floor(16384 / regs/warp) * 4
#   blocks = min(warps by regs / warps per block, 64 / warps per block, 32,
#                floor(233472 / ceil((smem + 1024) / 128) * 128));  occupancy = blocks * warps / 64
@pytest.mark.parametrize("threads,regs,smem,expected", [
    (256, 32, 0, 1.0),          # 1024/warp -> 16*4 = 64 warps = 8 blocks of 8 warps; threads: 8 too
    (256, 64, 0, 0.5),          # 2048/warp -> 8*4 = 32 warps = 4 blocks
    (256, 128, 0, 0.25),        # 4096/warp -> 4*4 = 16 warps = 2 blocks
    (1024, 64, 0, 0.5),         # 32 warps per block, 32 warps by regs -> 1 block
    (1024, 65, 0, 0.0),         # 2080 -> 2304/warp * 32 warps = 73,728 > 65,536: cannot launch
    (256, 40, 0, 0.75),         # 1280/warp -> 12*4 = 48 warps = 6 blocks
    (256, 48, 0, 0.625),        # 1536/warp -> 10*4 = 40 warps = 5 blocks
    (32, 152, 0, 12 / 64),      # 4864/warp -> 3*4 = 12 warps (65536/4864 = 13 without sub-partitions)
    (96, 255, 0, 6 / 64),       # 8160 -> 8192/warp -> 2*4 = 8 warps = 2 blocks of 3 warps
    (256, 32, 48 * 1024, 0.5),  # smem: 233472 // (49152 + 1024) = 4 blocks = 32 warps
    (64, 16, 7000, 56 / 64),    # smem: 8024 -> 8064 B: 28 blocks of 2 warps (29 unrounded)
    (256, 32, 227 * 1024, 0.125),  # the largest block: 1 block of 8 warps
    (256, 32, 227 * 1024 + 1, 0.0),  # over 227 KiB: cannot launch
    (32, 16, 0, 0.5),           # block limit: 32 blocks x 1 warp
    (2048, 16, 0, 0.0),         # over 1,024 threads: cannot launch
])
def test_occupancy_h100(threads, regs, smem, expected):
    assert cuda_report.occupancy(threads, regs, smem) == pytest.approx(expected)


def test_limiter():
    assert cuda_report.limiter(256, 32, 0) == ""  # full occupancy
    assert cuda_report.limiter(256, 128, 0) == "regs"
    assert cuda_report.limiter(256, 32, 48 * 1024) == "smem"
    assert cuda_report.limiter(32, 16, 0) == "blocks"


PTXAS = """\
ptxas info    : 0 bytes gmem
ptxas info    : Compiling entry function '_Z1kIdEvPT_' for 'sm_90'
ptxas info    : Function properties for _Z1kIdEvPT_
    8 bytes stack frame, 12 bytes spill stores, 8 bytes spill loads
ptxas info    : Used 48 registers, used 1 barriers, 8 bytes cumulative stack size, 152 bytes smem, 380 bytes cmem[0]
ptxas info    : Function properties for _Z6helperv
    16 bytes stack frame, 4 bytes spill stores, 4 bytes spill loads
ptxas info    : Compiling entry function '_Z1kIfEvPT_' for 'sm_90'
ptxas info    : Function properties for _Z1kIfEvPT_
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 15 registers, used 0 barriers, 380 bytes cmem[0]
"""


def test_parse_ptxas_and_ptx():
    entries, spills = cuda_report.parse_ptxas(PTXAS)
    assert entries == {
        "_Z1kIdEvPT_": dict(regs=48, smem=152, stack=8, spill_st=12, spill_ld=8),
        "_Z1kIfEvPT_": dict(regs=15, smem=0, stack=0, spill_st=0, spill_ld=0),
    }
    assert spills == {"_Z1kIdEvPT_": (12, 8), "_Z6helperv": (4, 4)}  # a spilling callee counts too
    ptx = (".visible .entry _Z1aPi(\n\t.param .u64 _Z1aPi_param_0\n)\n.maxntid 128, 1, 1\n{\n}\n"
           ".visible .entry _Z1bv()\n{\n}\n.entry _Z1cv()\n.reqntid 32, 4, 1\n{\n}\n")
    assert cuda_report.parse_ptx_block_sizes(ptx) == {"_Z1aPi": 128, "_Z1cv": 128}


def test_short_names():
    short = cuda_report.short
    assert short("void tbd_ops::cuda::(anonymous namespace)::cmss_max_kernel<float, float>"
                 "(long, float const*, long, float (*)(float))") == "cmss_max_kernel<float, float>"
    assert short("void tbd_ops::cuda::k<__half, float>(__half const*)") == "k<half, float>"
    assert short("void tbd_ops::cuda::k<__nv_bfloat16, float>()") == "k<bf16, float>"
    assert short("void cub::CUB_300001_SM_900::detail::radix_sort::Onesweep<cub::CUB_300001_SM_900::detail::"
                 "radix::policy_hub<int, long>::Policy1000, (cub::CUB_300001_SM_900::SortOrder)0, int>(int*)") \
        == "cub::radix_sort::Onesweep<policy_hub<...>::Policy1000, (SortOrder)0, int>"


def test_fail_on_spill_exit_status(tmp_path, monkeypatch, capsys):
    (tmp_path / "cuda").mkdir()
    (tmp_path / "cuda" / "k.cu").write_text("template <typename T> __global__ void k(T* p) {}\n")
    monkeypatch.setattr(cuda_report, "find_nvcc", lambda explicit=None: sys.executable)  # nvcc not run
    monkeypatch.setattr(cuda_report, "compile_one",
                        lambda *a: cuda_report.parse_ptxas(PTXAS) + ({"_Z1kIdEvPT_": 128},))
    assert cuda_report.main(["--root", str(tmp_path)]) == 0
    assert cuda_report.main(["--root", str(tmp_path), "--fail-on-spill"]) == 1
    out = capsys.readouterr().out.splitlines()
    assert any(line.split()[:2] == ["k<double>", "128"] or line.split()[:2] == ["_Z1kIdEvPT_", "128"]
               for line in out)
    spills = next(line for line in out if line.startswith("Spills:"))
    assert spills.startswith("Spills: YES") and "(12 B stored / 8 B loaded)" in spills
    assert "[device function] (4 B stored / 4 B loaded)" in spills  # a spilling callee counts too


def test_exit_2_without_nvcc(tmp_path):
    p = subprocess.run([sys.executable, str(SCRIPT), "--nvcc", str(tmp_path / "nvcc")],
                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, universal_newlines=True)
    assert p.returncode == 2 and "nvcc not found" in p.stderr


def declared_kernels():
    """Names declared with __global__ in cuda/*.cu (any order of specifiers and launch bounds)."""
    names = set()
    for cu in (ROOT / "cuda").glob("*.cu"):
        text = re.sub(r"//[^\n]*|/\*.*?\*/", "", cu.read_text(), flags=re.S)  # comments
        text = re.sub(r"\b__\w+__\s*\((?:[^()]|\([^()]*\))*\)", "", text)  # __launch_bounds__(..) etc.
        names.update(re.findall(r"\b__global__\b[^;{()]*?(\w+)\s*\(", text))
    return names


@pytest.mark.skipif(NVCC is None, reason="needs nvcc (the CUDA toolkit) to compile the kernels for sm_90; no GPU")
def test_report_lists_every_kernel_and_nothing_spills(tmp_path):
    p = subprocess.run([sys.executable, str(SCRIPT), "--fail-on-spill", "--csv", str(tmp_path / "r.csv")],
                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT, universal_newlines=True)
    assert p.returncode == 0, "a kernel spills registers (or nvcc failed):\n" + p.stdout
    with open(tmp_path / "r.csv") as f:
        rows = list(csv.DictReader(f))
    reported = {re.split(r"[<(]", r["kernel"])[0].split("::")[-1] for r in rows}
    declared = declared_kernels()
    assert declared, "no __global__ kernels found in cuda/*.cu"
    assert declared <= reported, f"missing from the report: {sorted(declared - reported)}"
    for r in rows:
        assert r["kernel"][:40] in p.stdout  # long library names are cut in the table
        assert int(r["spill_st"]) == 0 and int(r["spill_ld"]) == 0, r["kernel"]
        assert int(r["regs"]) > 0 and 0 < float(r["occupancy"]) <= 1, r
    assert any(line.startswith("Spills: none") for line in p.stdout.splitlines())
    assert "TBDLoss backward" in p.stdout  # the launches and bytes per call follow


# ---- launches and bytes per call (benchmarks/traffic_model.py) --------------------------------

_tm_spec = importlib.util.spec_from_file_location("traffic_model", ROOT / "benchmarks" / "traffic_model.py")
traffic_model = importlib.util.module_from_spec(_tm_spec)
_tm_spec.loader.exec_module(traffic_model)

SMALL_LEVELS = [(12, 16), (6, 8), (3, 4), (2, 2), (1, 1)]  # launches do not depend on the sizes


def _emulated_calls(n):
    """Per op call of the TBD loss on a small RetinaNet pyramid: the emulator's launches by kernel."""
    import observe
    import tbd_ops
    import torch
    from tbd_ops.nn import TBDLoss
    from test_launch_budget import CH, LEVELS, pyramid, requiring_grad

    assert LEVELS == SMALL_LEVELS
    p = pyramid(seed=1)
    if n != 2:  # pyramid() makes two images
        p = {k: ([t.repeat(n // 2, *([1] * (t.dim() - 1))) if t.dim() == 4 else t for t in v]
                 if k.endswith(("scores", "preds", "feats")) else v) for k, v in p.items()}
        p["gt_bboxes"] = p["gt_bboxes"] * (n // 2)
        p["img_shapes"] = p["img_shapes"] * (n // 2)
    out = {}

    def run(name, fn, grads=None):
        with observe.observe() as fwd:
            res = fn()
        out[f"{name} forward"] = fwd.kernels()
        if grads is not None:
            flat = res if isinstance(res, (list, tuple)) else [res]
            total = sum((o[0] if isinstance(o, tuple) else o).sum() for o in flat)
            with observe.observe() as bwd:
                torch.autograd.grad(total, grads)
            out[f"{name} backward"] = bwd.kernels()

    x = requiring_grad(p["student_cls_scores"])
    run("p_c", lambda: tbd_ops.channel_max_spatial_softmax(x), x)
    with torch.no_grad():
        run("p_c", lambda: tbd_ops.channel_max_spatial_softmax(x))
    out["p_c forward (no grad)"] = out.pop("p_c forward")
    run("p_c", lambda: tbd_ops.channel_max_spatial_softmax(x), x)
    b = requiring_grad(p["student_bbox_preds"])
    run("decode_max_iou", lambda: tbd_ops.decode_max_iou(b, p["priors"], p["gt_bboxes"], max_shape=p["img_shapes"]), b)
    maps = [[torch.rand(n, h, w) for h, w in SMALL_LEVELS] for _ in range(4)]
    s = requiring_grad(maps[0] + maps[1])
    run("harmony_distillation_loss", lambda: tbd_ops.harmony_distillation_loss(s[:5], s[5:], maps[2], maps[3]), s)
    f = requiring_grad(p["student_feats"])
    masks = [torch.rand(n, 2, h, w) for h, w in SMALL_LEVELS]
    run("masked_sq_dist", lambda: tbd_ops.masked_sq_dist(p["teacher_feats"], f, masks), f)
    loss = TBDLoss(num_levels=5, in_channels=CH)
    student = {k: requiring_grad(p[k]) for k in ("student_cls_scores", "student_bbox_preds", "student_feats")}
    with observe.observe() as fwd:
        r = loss(**{**p, **student})
    out["TBDLoss forward"] = fwd.kernels()
    with observe.observe() as bwd:
        torch.autograd.grad(r["loss_hd"] + r["loss_tfd"], [t for v in student.values() for t in v])
    out["TBDLoss backward"] = bwd.kernels()
    return out


@pytest.mark.emulated
@pytest.mark.parametrize("n", [2, 4])
def test_traffic_model_launches_are_the_emulators(n):
    import dispatch

    if dispatch.emu is None:
        pytest.skip(str(dispatch.UNAVAILABLE))
    observed = _emulated_calls(n)
    for op in traffic_model.retinanet_calls(n, SMALL_LEVELS):
        want = {k: v[0] for k, v in op.kernels.items()}
        assert dict(observed[op.name]) == want, op.name


def test_traffic_model_bytes():
    n, levels, K, es = 2, traffic_model.RETINANET_LEVELS, 720, 4
    hw = sum(h * w for h, w in levels)
    calls = {op.name: op for op in traffic_model.retinanet_calls(n)}
    # The minimum of p_c is the benchmark's formula (benchmarks/README.md): read N*K*HW, write N*HW.
    assert calls["p_c forward"].minimum == (n * K * hw + n * hw) * es
    assert calls["p_c backward"].minimum == (n * hw + n * K * hw) * es
    # Without a gradient to come p_c writes no argmax (int64): 8 bytes a location less.
    assert calls["p_c forward"].actual - calls["p_c forward (no grad)"].actual == n * hw * 8
    # TFD's masked backward writes the gradient of b alone (the teacher side is detached): above
    # the minimum only small reads (grad[n, k] per block, the split's re-reads of the masks).
    mb = calls["masked_sq_dist backward"]
    assert 0 < mb.actual - mb.minimum < n * 2 * hw * es * 8
    both = traffic_model.masked_backward(n, levels, 256, 2, grads=2)
    assert both.actual - mb.actual == n * 256 * hw * es  # what the gradient of a would add
    # All levels in one launch per kernel, at both batches.
    for name in ("p_c forward", "p_c backward", "masked_sq_dist forward", "masked_sq_dist backward"):
        assert calls[name].launches == (2 if name != "masked_sq_dist backward" else 1), name
    for op in calls.values():
        assert op.minimum <= op.actual, op.name
        assert op.launches == sum(v[0] for v in op.kernels.values())
    # Eight times the batch: the same launches, at most eight times the bytes.
    calls16 = {op.name: op for op in traffic_model.retinanet_calls(16)}
    for name, op in calls.items():
        assert calls16[name].launches == op.launches, name
        assert op.minimum < calls16[name].minimum <= 8 * op.minimum, name
        assert op.actual < calls16[name].actual <= 8 * op.actual, name
    lines = traffic_model.report_lines()
    assert any(line.startswith("TBDLoss forward") for line in lines)
    assert any(line.startswith("  cmss_max_kernel") for line in lines)
