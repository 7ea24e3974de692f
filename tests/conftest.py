import os
import sys

import pytest
import torch

import tbd_ops  # noqa: F401  (registers the operators)

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "emu"))
import dispatch as emu_dispatch  # noqa: E402

HAS_CUDA = torch.cuda.is_available() and tbd_ops.cuda_available()
requires_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device and a CUDA build of tbd_ops")
requires_emu = pytest.mark.skipif(emu_dispatch.emu is None, reason=str(emu_dispatch.UNAVAILABLE))

# Devices of the op suites:
#   cpu       the CPU kernels;
#   cuda_emu  CPU tensors, but every tbd_ops op runs the CUDA path (glue, launchers,
#             kernels) on the SIMT emulator, under three thread schedules that must
#             agree bit for bit (tests/emu/dispatch.py); the test sees device "cpu";
#   cuda      a real GPU.
CUDA_EMU = pytest.param("cpu", id="cuda_emu", marks=[requires_emu, pytest.mark.cuda_emu])
DEVICES = ["cpu", CUDA_EMU, pytest.param("cuda", marks=[requires_cuda, pytest.mark.cuda])]

# Tolerances of the kernels against the float64 reference, per input dtype
# (outputs are rounded to the input dtype; math runs in float32 inside).
TOL = {
    torch.float64: dict(rtol=1e-10, atol=1e-12),
    torch.float32: dict(rtol=2e-5, atol=1e-6),
    torch.float16: dict(rtol=2e-3, atol=1e-4),
    torch.bfloat16: dict(rtol=1.6e-2, atol=1e-3),
}
# Gradients carry one more cancellation (e.g. g - sum(p * g)): looser in float32.
GRAD_TOL = dict(TOL)
GRAD_TOL[torch.float32] = dict(rtol=1e-4, atol=1e-5)


def assert_compiles_like_eager(loss, x):
    """torch.compile(fullgraph=True) of loss(x) gives eager's value and gradient."""
    compiled = torch.compile(loss, fullgraph=True, backend="aot_eager")
    value = compiled(x)
    (g1,) = torch.autograd.grad(value, x)
    expected = loss(x)
    (g2,) = torch.autograd.grad(expected, x)
    torch.testing.assert_close(value, expected)
    torch.testing.assert_close(g1, g2)


def run_single_threaded(fn):
    """fn() with one intra-op thread (to compare against the multi-threaded result)."""
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        return fn()
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _fresh_seed():
    """Fresh random inputs every run; the seed shows in the captured output of a failure."""
    seed = torch.seed() % (2**31)
    torch.manual_seed(seed)
    print(f"replay with torch.manual_seed({seed})")
    yield


@pytest.fixture(autouse=True)
def _emulated_cuda(request):
    """Routes tbd_ops calls to the emulated CUDA build for tests of the cuda_emu device."""
    if request.node.get_closest_marker("cuda_emu") is None:
        yield
        return
    with emu_dispatch.EmulatedCuda():
        yield


def pytest_configure(config):
    config.addinivalue_line("markers", "cuda: needs a CUDA device")
    config.addinivalue_line("markers", "cuda_emu: runs the CUDA path on the SIMT emulator")
    config.addinivalue_line("markers", "emulated: compares the emulated CUDA build with the CPU kernels")


def pytest_terminal_summary(terminalreporter):
    def emulated(r):
        return "cuda_emu" in r.keywords or "emulated" in r.keywords

    passed = [r for r in terminalreporter.stats.get("passed", []) if emulated(r)]
    failed = [r for r in terminalreporter.stats.get("failed", []) if emulated(r)]
    if passed or failed:
        launches = emu_dispatch.emu.launch_count() if emu_dispatch.emu else 0
        terminalreporter.write_line(
            f"emulated CUDA: {len(passed)} tests passed, {len(failed)} failed; "
            f"{emu_dispatch.stats['calls']} op calls x 3 schedules, {launches} kernel launches")
