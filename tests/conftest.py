"""Fixtures and hooks of the test suite. The shared test code (devices, dtypes,
tolerances, random inputs, the op test contract) is in op_testing.py."""
import os
import sys
from pathlib import Path

import pytest
import torch

# The tbd_ops under test: the folder TBD_OPS_TEST_PACKAGE names (the AddressSanitizer build of
# `make pytest-asan`), else the source tree's python/ when it holds a build (`make build` compiles in
# place), else the installed package (`pip install .[test]`, then `pytest` from the clone).
_SOURCE_TREE = Path(__file__).resolve().parents[1] / "python"
if os.environ.get("TBD_OPS_TEST_PACKAGE"):
    sys.path.insert(0, str(Path(os.environ["TBD_OPS_TEST_PACKAGE"]).resolve()))
elif any((_SOURCE_TREE / "tbd_ops").glob("_C*.so")) and str(_SOURCE_TREE) not in sys.path:
    sys.path.insert(0, str(_SOURCE_TREE))

import tbd_ops  # noqa: F401  (registers the operators)
from op_testing import emu_dispatch
# The names test files used to import from here.
from op_testing import (DEVICES, GRAD_TOL, HAS_CUDA, TOL, assert_compiles_like_eager,  # noqa: F401
                        requires_cuda, requires_emu, run_single_threaded)


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


@pytest.fixture
def grid_yz_limit():
    """Lowers the grid.y limit (65535 on the GPU) so that batch chunking shows at small sizes."""
    yield emu_dispatch.emu.set_grid_yz_limit
    emu_dispatch.emu.set_grid_yz_limit(0)


@pytest.fixture
def split_policy():
    """Forces the channel split of the CUDA kernels of p_c and the masked reductions (1: one
    thread per location, 2: 8 threads per location); the rule (0) chooses by the launch's
    location count and is restored after the test."""
    yield emu_dispatch.emu.set_channel_split_policy
    emu_dispatch.emu.set_channel_split_policy(0)


def pytest_runtest_setup(item):
    """Tests that need the emulated CUDA build: skipped when it is missing, failed
    when it was built from other sources (it would test old code)."""
    if not any(item.get_closest_marker(m) for m in ("requires_emu", "cuda_emu", "emulated")):
        return
    if emu_dispatch.STALE:
        pytest.fail(emu_dispatch.UNAVAILABLE, pytrace=False)
    if emu_dispatch.emu is None:
        pytest.skip(emu_dispatch.UNAVAILABLE)


def pytest_configure(config):
    config.addinivalue_line("markers", "cuda: needs a CUDA device")
    config.addinivalue_line("markers", "cuda_emu: runs the CUDA path on the SIMT emulator")
    config.addinivalue_line("markers", "emulated: compares the emulated CUDA build with the CPU kernels")
    config.addinivalue_line("markers", "requires_emu: needs the emulated CUDA build (tests/emu)")


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
    if emu_dispatch.STALE:
        terminalreporter.write_line(f"emulated CUDA: {emu_dispatch.UNAVAILABLE}")
