"""The report of ``python -m tbd_ops``: how tbd_ops was built and whether it fits
the torch, the GPUs and the MMDetection installed here. Paste it into bug reports.
"""
import importlib
import importlib.metadata
import importlib.util
import os
import platform
import re
import subprocess
import sys

import torch

import tbd_ops
from tbd_ops import _C


def sass_names():
    return [f"sm_{a}" for a in _C.sass_archs()]


def ptx_names():
    return [f"compute_{a}" for a in _C.ptx_archs()]


def arch_support(capability, sass, ptx):
    """How a GPU of compute capability (major, minor) runs the kernels of a build.

    Returns (kind, arch): ("sass", 86) when SASS of that capability or of an older
    minor revision of the same major one is present (CUDA's binary compatibility),
    ("ptx", 90) when only PTX of an older or equal capability is (the driver
    JIT-compiles it), (None, None) when the GPU can run none of them.
    """
    major, minor = capability
    cc = major * 10 + minor
    same_major = [a for a in sass if a // 10 == major and a % 10 <= minor]
    if same_major:
        return "sass", max(same_major)
    older_ptx = [a for a in ptx if a <= cc]
    if older_ptx:
        return "ptx", max(older_ptx)
    return None, None


def _driver():
    """The NVIDIA driver's version and the CUDA version it supports, as text (None without a driver)."""
    version = None
    try:
        with open("/proc/driver/nvidia/version") as f:
            m = re.search(r"Kernel Module\s+(?:for\s+\S+\s+)?([0-9][0-9.]+)", f.read())
            version = m.group(1) if m else None
    except OSError:
        pass
    if version is None:
        try:
            out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                 capture_output=True, text=True, timeout=20)
            version = out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else None
        except (OSError, subprocess.SubprocessError):
            pass
    cuda = None
    try:
        import ctypes

        libcuda = ctypes.CDLL("libcuda.so.1")
        v = ctypes.c_int(0)
        if libcuda.cuDriverGetVersion(ctypes.byref(v)) == 0 and v.value > 0:
            cuda = f"{v.value // 1000}.{v.value % 1000 // 10}"
    except (OSError, AttributeError):
        pass
    if version is None and cuda is None:
        return None
    return f"{version or 'unknown version'}" + (f" (supports CUDA {cuda})" if cuda else "")


def _distribution_version(*names):
    for name in names:
        try:
            return name, importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return None, None


def _importable(name):
    """(ok, text) for `import name`: its version, or why it fails."""
    try:
        module = importlib.import_module(name)
    except Exception as e:  # any failure of a third-party import is reported, not raised
        return False, f"not importable ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
    return True, getattr(module, "__version__", "version unknown")


def _mmcv_ext():
    """What provides mmcv._ext: "compiled", "stand-in" (tbd_ops.mmcv_lite) or None (mmcv-lite)."""
    module = sys.modules.get("mmcv._ext")
    if module is not None:
        spec = getattr(module, "__spec__", None)
        return "stand-in" if spec is not None and spec.origin == "tbd_ops.mmcv_lite" else "compiled"
    try:
        return "compiled" if importlib.util.find_spec("mmcv._ext") is not None else None
    except (ImportError, ValueError):
        return None


def _tbd_ops_registrations():
    """Names that tbd_ops registered in MMDetection's registries, per registry."""
    from mmdet.registry import MODELS, TASK_UTILS

    out = {}
    for reg_name, registry in (("MODELS", MODELS), ("TASK_UTILS", TASK_UTILS)):
        names = sorted(n for n, cls in registry.module_dict.items()
                       if getattr(cls, "__module__", "").startswith("tbd_ops."))
        if names:
            out[reg_name] = names
    return out


def mmdet_lines(mmcv_lite=False):
    """mmengine, mmcv, mmdet and tbd_ops.mmdet; with mmcv_lite (or TBD_OPS_MMCV_LITE=1, as
    tbd_ops.mmdet reads it), tbd_ops.mmcv_lite's stand-in for mmcv's compiled ops is installed first
    when mmcv has none."""
    mmcv_lite = mmcv_lite or os.environ.get("TBD_OPS_MMCV_LITE", "0") == "1"
    lines = []
    ok = {}
    for name in ("mmengine", "mmcv", "mmdet"):
        ok[name], text = _importable(name)
        if name == "mmcv" and ok[name]:
            if mmcv_lite and _mmcv_ext() is None:
                from tbd_ops import mmcv_lite as standin

                standin.install()
            ext = _mmcv_ext()
            dist, _ = _distribution_version("mmcv", "mmcv-lite", "mmcv-full")
            if ext is None:
                text += f" ({dist or 'mmcv'}: no compiled ops, mmcv._ext is missing)"
            elif ext == "stand-in":
                text += f" ({dist or 'mmcv'}; mmcv._ext: the stand-in of tbd_ops.mmcv_lite)"
        lines.append((name, text))
    if not (ok["mmengine"] and ok["mmdet"]):
        lines.append(("tbd_ops.mmdet", "not available (needs mmdet and mmengine)"))
    elif _mmcv_ext() is None:
        # mmdet's models import mmcv.ops, which needs mmcv._ext: importing
        # tbd_ops.mmdet fails then (with an ImportError that says so).
        lines.append(("tbd_ops.mmdet", "not imported: mmcv has no compiled ops (mmcv-lite), which mmdet's models "
                                       "import; install the full mmcv, or set TBD_OPS_MMCV_LITE=1 (or call "
                                       "tbd_ops.mmcv_lite.install() first; python -m tbd_ops --mmcv-lite shows the "
                                       "registrations then)"))
    else:
        try:
            importlib.import_module("tbd_ops.mmdet")
            registered = _tbd_ops_registrations()
        except Exception as e:  # reported, not raised: this is a diagnostic
            lines.append(("tbd_ops.mmdet", f"import failed ({type(e).__name__}: {e})"))
        else:
            if registered:
                text = "registered " + "; ".join(f"{reg}: {', '.join(names)}" for reg, names in registered.items())
            else:
                text = "imported, but registered nothing in mmdet's MODELS or TASK_UTILS"
            lines.append(("tbd_ops.mmdet", text))
    return lines


def gpu_lines():
    lines = []
    sass, ptx = _C.sass_archs(), _C.ptx_archs()
    driver = _driver()
    lines.append(("NVIDIA driver", driver or "none found"))
    if not torch.cuda.is_available():
        lines.append(("GPUs", "none visible to torch (torch.cuda.is_available() is False)"))
        return lines
    for i in range(torch.cuda.device_count()):
        cap = torch.cuda.get_device_capability(i)
        name = torch.cuda.get_device_name(i)
        cc = f"sm_{cap[0]}{cap[1]}"
        if not _C.with_cuda():
            verdict = "not usable: this tbd_ops build has no CUDA kernels (rebuild with TBD_OPS_CUDA=1)"
        else:
            kind, arch = arch_support(cap, sass, ptx)
            if kind == "sass" and arch == cap[0] * 10 + cap[1]:
                verdict = f"compiled for it ({cc})"
            elif kind == "sass":
                verdict = f"runs the sm_{arch} code (binary compatible); for native code rebuild with " \
                          f"TBD_OPS_CUDA_ARCHS=\"{cap[0]}{cap[1]}\""
            elif kind == "ptx":
                verdict = f"only through PTX compute_{arch}, JIT-compiled by the driver at first use; rebuild " \
                          f"with TBD_OPS_CUDA_ARCHS=\"{cap[0]}{cap[1]}\""
            else:
                verdict = f"NOT compiled for it (the ops would fail with 'no kernel image is available'); " \
                          f"rebuild with TBD_OPS_CUDA_ARCHS=\"{cap[0]}{cap[1]}\""
        lines.append((f"GPU {i}", f"{name}, {cc}: {verdict}"))
    return lines


def report_lines(mmcv_lite=False):
    build = "debug (-O0 -g)" if _C.debug() else "release"
    lines = [
        ("tbd_ops", f"{tbd_ops.__version__} ({os.path.dirname(tbd_ops.__file__)})"),
        ("  built against", f"torch {_C.torch_version()}"),
        ("  compiler", f"{_C.compiler()}" + (f", nvcc {_C.cuda_version()}" if _C.with_cuda() else "")),
        ("  build", build),
    ]
    if _C.with_cuda():
        lines += [
            ("  CUDA kernels", f"yes (CUDA {_C.cuda_version()})"),
            ("  SASS archs", " ".join(sass_names())),
            ("  PTX archs", " ".join(ptx_names())),
        ]
    else:
        lines.append(("  CUDA kernels", "no (CPU-only build: TBD_OPS_CUDA=0, or no nvcc at build time)"))
    lines += [
        ("torch", f"{torch.__version__} (CUDA {torch.version.cuda or 'none: CPU-only torch'})"),
        ("python", f"{platform.python_version()} ({sys.executable})"),
        ("platform", platform.platform()),
    ]
    lines += gpu_lines()
    lines += mmdet_lines(mmcv_lite)
    return lines


def format_report(lines):
    width = max(len(k) for k, _ in lines) + 2
    return "\n".join(f"{k + ':':<{width}}{v}" for k, v in lines)


def main(argv=None):
    import argparse

    parser = argparse.ArgumentParser(
        prog="python -m tbd_ops",
        description="Prints how tbd_ops was built and whether it fits the torch, GPUs and MMDetection "
                    "installed here (for bug reports).")
    parser.add_argument("--mmcv-lite", action="store_true",
                        help="with mmcv-lite (no compiled ops), install tbd_ops.mmcv_lite's stand-in for them "
                             "first, so that tbd_ops.mmdet can be imported and its registrations listed")
    args = parser.parse_args(argv)
    print(format_report(report_lines(mmcv_lite=args.mmcv_lite)))
    return 0
