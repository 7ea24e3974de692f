"""tbd_ops._C (the pybind11 module with the build facts), the torch-version check at
import, and the report of ``python -m tbd_ops``.

The build facts are checked against how the test build was made: the environment
of setup.py (TBD_OPS_CUDA, TBD_OPS_CUDA_ARCHS, TBD_OPS_DEBUG; CI sets the first
two), nvcc's own --version, and the device code that cuobjdump finds in the library.
"""
import importlib.util
import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch.utils.cpp_extension import CUDA_HOME

import tbd_ops
from tbd_ops import _C, _env

ROOT = Path(__file__).resolve().parent.parent
PYTHON_DIR = str(Path(tbd_ops.__file__).resolve().parent.parent)  # the tbd_ops under test, for subprocesses
IN_TREE_BUILD = Path(PYTHON_DIR) == ROOT / "python"  # built in place by make build, as opposed to installed


def run_python(code, timeout=300):
    env = dict(os.environ, PYTHONPATH=PYTHON_DIR)
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          cwd=str(ROOT), env=env, timeout=timeout)


def env_flag(name):
    value = os.environ.get(name, "").strip().lower()
    if value in ("1", "on", "true", "yes"):
        return True
    if value in ("0", "off", "false", "no"):
        return False
    return None


def expected_archs():
    """Compute capabilities the build was asked for: TBD_OPS_CUDA_ARCHS (set by make and CI for the build
    and the tests alike); without it, the architectures whose SASS cuobjdump finds in the library."""
    raw = os.environ.get("TBD_OPS_CUDA_ARCHS")
    if raw is None:
        cuobjdump = find_cuobjdump()
        if cuobjdump is None:
            pytest.skip("TBD_OPS_CUDA_ARCHS is not set and there is no cuobjdump to read the library's archs")
        elf = subprocess.run([cuobjdump, "--list-elf", _C.__file__], capture_output=True, text=True, check=True)
        return sorted({int(a) for a in re.findall(r"\.sm_(\d+)a?\.cubin", elf.stdout)})
    return sorted({int(a.replace("sm_", "").replace(".", "")) for a in re.split(r"[;, ]+", raw) if a})


def nvcc_release():
    nvcc = Path(CUDA_HOME or "/nonexistent") / "bin" / "nvcc"
    if not nvcc.exists():
        return None
    return re.search(r"release (\d+\.\d+)", subprocess.check_output([str(nvcc), "--version"], text=True)).group(1)


def find_cuobjdump():
    candidates = [Path(CUDA_HOME) / "bin" / "cuobjdump"] if CUDA_HOME else []
    if shutil.which("cuobjdump"):
        candidates.append(Path(shutil.which("cuobjdump")))
    try:  # triton wheels ship one
        import triton

        candidates.append(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump")
    except ImportError:
        pass
    return next((str(c) for c in candidates if c.exists()), None)


# --- the module -------------------------------------------------------------------------------------------------

def test_module_is_pybind11():
    for name in ["with_cuda", "cuda_version", "sass_archs", "ptx_archs", "compiler", "torch_version", "debug"]:
        fn = getattr(_C, name)
        # pybind11 functions are builtins bound to pybind11's function record (a capsule in older
        # pybind11) and carry their signature in the docstring.
        record = type(fn.__self__).__name__
        assert record == "PyCapsule" or record.startswith("pybind11_detail_function_record"), record
        assert fn.__doc__.startswith(f"{name}() -> "), fn.__doc__


def test_fact_types():
    assert isinstance(_C.with_cuda(), bool)
    assert isinstance(_C.debug(), bool)
    assert isinstance(_C.torch_version(), str)
    assert all(isinstance(a, int) for a in _C.sass_archs() + _C.ptx_archs())
    assert tbd_ops.cuda_available() is _C.with_cuda()


# --- the facts against how the build was made -------------------------------------------------------------------

def test_cuda_kernels_as_requested():
    requested = env_flag("TBD_OPS_CUDA")
    if requested is None and not IN_TREE_BUILD:
        pytest.skip("an installed tbd_ops: TBD_OPS_CUDA is not set here, so how it was built is not known")
    if requested is None:  # unset: built whenever nvcc and a CUDA torch were there
        requested = nvcc_release() is not None and torch.version.cuda is not None
    assert _C.with_cuda() is requested


def test_torch_version_built_against():
    assert _C.torch_version() == torch.__version__


def test_debug_flag():
    assert _C.debug() is (os.environ.get("TBD_OPS_DEBUG", "0") == "1")


def test_cuda_version_and_archs():
    if not _C.with_cuda():
        assert _C.cuda_version() is None and _C.sass_archs() == [] and _C.ptx_archs() == []
        return
    assert _C.cuda_version() == nvcc_release()
    archs = expected_archs()
    assert _C.sass_archs() == archs  # SASS for each requested architecture
    assert _C.ptx_archs() == archs[-1:]  # PTX for the newest, for the GPUs after it


def test_compiler_is_the_host_compiler():
    m = re.fullmatch(r"(gcc|clang) (\d+\.\d+\.\d+).*", _C.compiler())
    assert m, _C.compiler()
    cxx = os.environ.get("CXX", "c++")
    if shutil.which(cxx) is None:
        pytest.skip(f"{cxx} not found")
    if m.group(1) == "gcc":
        version = subprocess.run([cxx, "-dumpfullversion", "-dumpversion"], capture_output=True, text=True).stdout
        assert m.group(2) == version.strip()


@pytest.mark.skipif(not tbd_ops.cuda_available(), reason="a CPU-only build has no device code")
def test_archs_match_the_device_code_in_the_library():
    cuobjdump = find_cuobjdump()
    if cuobjdump is None:
        pytest.skip("no cuobjdump (CUDA toolkit or triton) on this machine")
    lib = _C.__file__
    elf = subprocess.run([cuobjdump, "--list-elf", lib], capture_output=True, text=True, check=True).stdout
    ptx = subprocess.run([cuobjdump, "--list-ptx", lib], capture_output=True, text=True, check=True).stdout
    assert sorted({int(a) for a in re.findall(r"\.sm_(\d+)a?\.cubin", elf)}) == _C.sass_archs()
    assert sorted({int(a) for a in re.findall(r"\.sm_(\d+)a?\.ptx", ptx)}) == _C.ptx_archs()


# --- the torch-version check at import --------------------------------------------------------------------------

def test_built_against_is_readable_from_the_file():
    # What the import error uses when the library cannot even be loaded.
    assert tbd_ops._built_against_torch() == _C.torch_version()


def test_import_refuses_another_torch():
    r = run_python("""
        import torch
        torch.__version__ = "1.0.0+other"
        import tbd_ops
    """)
    assert r.returncode != 0
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("ImportError: "), r.stderr
    assert f"built against torch {_C.torch_version()}" in last
    assert "torch 1.0.0+other is imported" in last
    assert "pip install --no-build-isolation" in last


LOAD_FAILS = """
    import importlib.abc, importlib.machinery, sys
    import torch

    class FailingLoader(importlib.abc.Loader):
        def create_module(self, spec):
            raise ImportError(spec.origin + ": undefined symbol: _ZN3c104impl3fooEv")
        def exec_module(self, module):
            pass

    class Finder(importlib.abc.MetaPathFinder):
        # The real library file, whose loading fails as with another torch's symbols.
        def find_spec(self, name, path, target=None):
            if name != "tbd_ops._C":
                return None
            spec = importlib.machinery.PathFinder.find_spec(name, path)
            spec.loader = FailingLoader()
            return spec

    sys.meta_path.insert(0, Finder())
    torch.__version__ = TORCH
    try:
        import tbd_ops
    except ImportError as e:
        print(type(e).__name__, "|", e, "|", e.__cause__)
"""


def test_import_names_both_versions_when_the_library_does_not_load():
    r = run_python(LOAD_FAILS.replace("TORCH", repr("1.0.0+other")))
    assert r.returncode == 0, r.stderr
    message, cause = r.stdout.split(" | ")[1:]
    assert f"built against torch {_C.torch_version()}" in message and "torch 1.0.0+other is imported" in message
    assert "undefined symbol" in cause


def test_load_error_of_the_same_torch_is_not_hidden():
    r = run_python(LOAD_FAILS.replace("TORCH", "torch.__version__"))
    assert r.returncode == 0, r.stderr
    assert "undefined symbol" in r.stdout.split(" | ")[1]


def test_an_unbuilt_source_tree_says_how_to_build(tmp_path):
    # The package's Python files without the compiled library, as in a fresh clone.
    shutil.copytree(Path(tbd_ops.__file__).parent, tmp_path / "tbd_ops",
                    ignore=shutil.ignore_patterns("_C*.so", "_C*.pyd", "__pycache__"))
    r = subprocess.run([sys.executable, "-c", "import tbd_ops"], capture_output=True, text=True, cwd=str(tmp_path),
                       env=dict(os.environ, PYTHONPATH=str(tmp_path)), timeout=300)
    assert r.returncode != 0
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("ImportError: ") and "has no compiled library (_C)" in last, r.stderr
    assert "make build" in last and "pip install --no-build-isolation" in last


# --- python -m tbd_ops ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("capability, sass, ptx, expected", [
    ((9, 0), [80, 90], [90], ("sass", 90)),
    ((8, 9), [80, 86], [86], ("sass", 86)),   # SASS runs on later minor revisions of its major one
    ((8, 6), [89, 90], [90], (None, None)),   # ... not on earlier ones, and PTX not on older GPUs
    ((8, 0), [75], [75], ("ptx", 75)),        # another major revision: only the PTX (JIT)
    ((12, 0), [90, 100], [100], ("ptx", 100)),
    ((10, 0), [90, 120], [120], (None, None)),
    ((7, 5), [], [], (None, None)),
])
def test_arch_support(capability, sass, ptx, expected):
    assert _env.arch_support(capability, sass, ptx) == expected


def test_gpu_not_covered_says_what_to_rebuild_with(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda i=None: (5, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda i=None: "Old GPU")
    (line,) = [v for k, v in _env.gpu_lines() if k == "GPU 0"]
    assert line.startswith("Old GPU, sm_50: ")
    if tbd_ops.cuda_available():
        assert "NOT compiled for it" in line and 'TBD_OPS_CUDA_ARCHS="50"' in line
    else:
        assert "no CUDA kernels" in line and "TBD_OPS_CUDA=1" in line


def test_python_m_tbd_ops():
    env = dict(os.environ, PYTHONPATH=PYTHON_DIR)
    env.pop("TBD_OPS_MMCV_LITE", None)
    r = subprocess.run([sys.executable, "-m", "tbd_ops"], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr
    out = dict(re.match(r"(.+?):\s+(.*)", line).groups() for line in r.stdout.splitlines())
    assert out["tbd_ops"].startswith(tbd_ops.__version__)
    assert out["  built against"] == f"torch {torch.__version__}"
    assert out["torch"].startswith(torch.__version__)
    assert "NVIDIA driver" in out and "mmdet" in out and "mmengine" in out and "mmcv" in out
    if tbd_ops.cuda_available():
        assert out["  CUDA kernels"] == f"yes (CUDA {_C.cuda_version()})"
        # every compiled architecture, by name
        assert out["  SASS archs"].split() == [f"sm_{a}" for a in expected_archs()]
        assert out["  PTX archs"].split() == [f"compute_{expected_archs()[-1]}"]
    else:
        assert out["  CUDA kernels"].startswith("no")
    if torch.cuda.is_available():
        assert "GPU 0" in out
    else:
        assert out["GPUs"].startswith("none")
    # mmcv-lite has no compiled ops: tbd_ops.mmdet is then not imported, and the report says why.
    try:
        spec = importlib.util.find_spec("mmcv._ext")
    except ImportError:
        spec = None
    # Earlier tests of this process may have installed tbd_ops.mmcv_lite's stand-in; the subprocess has not.
    has_ext = spec is not None and spec.origin != "tbd_ops.mmcv_lite"
    if importlib.util.find_spec("mmdet") is None:
        assert out["tbd_ops.mmdet"].startswith("not available")
    elif has_ext:
        assert out["tbd_ops.mmdet"].startswith("registered")
    else:
        assert out["tbd_ops.mmdet"].startswith("not imported: mmcv has no compiled ops")


@pytest.mark.parametrize("how", ["--mmcv-lite", "TBD_OPS_MMCV_LITE=1"])
def test_report_lists_the_mmdet_registrations(how):
    """With mmcv-lite, by the flag or by the variable tbd_ops.mmdet itself reads."""
    pytest.importorskip("mmdet")
    pytest.importorskip("torchvision")  # the nms of tbd_ops.mmcv_lite's stand-in
    env = dict(os.environ, PYTHONPATH=PYTHON_DIR)
    if how.startswith("TBD_OPS_MMCV_LITE"):
        env["TBD_OPS_MMCV_LITE"] = "1"
    args = [how] if how.startswith("--") else []
    r = subprocess.run([sys.executable, "-m", "tbd_ops", *args], capture_output=True, text=True, env=env,
                       timeout=300)
    assert r.returncode == 0, r.stderr
    line = dict(re.match(r"(.+?):\s+(.*)", line).groups() for line in r.stdout.splitlines())["tbd_ops.mmdet"]
    assert line.startswith("registered "), line
    models = re.search(r"MODELS: ([^;]*)", line).group(1).split(", ")
    task_utils = re.search(r"TASK_UTILS: ([^;]*)", line).group(1).split(", ")
    # The modules the README says tbd_ops.mmdet registers.
    assert {"TBDLoss", "HarmonyDistillationLoss", "TaskDecoupledFeatureLoss", "TaskWeightGenerator",
            "TBDSingleStageDetector", "TBDTwoStageDetector", "FusedFocalLoss", "ScaleConsistencyLoss",
            "ConsistencyVotingWeights", "PseCoDetector", "RoIFocalLoss"} <= set(models)
    assert "PredictionGuidedAssigner" in task_utils
