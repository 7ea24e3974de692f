"""Build script of tbd_ops (the compiled extension tbd_ops._C).

Environment knobs:
  TBD_OPS_CUDA        unset: build the CUDA kernels whenever nvcc is found (a GPU is not needed);
                      1: build them and fail if nvcc is missing; 0: CPU-only build.
  TBD_OPS_CUDA_ARCHS  compute capabilities, e.g. "90" or "80;90" (default: 75;80;86;89;90;100;120);
                      SASS for each, plus PTX for the newest.
  MAX_JOBS            parallel compile jobs (ninja).
  TBD_OPS_DEBUG=1     -O0 -g builds.
  TBD_OPS_ASAN=1      a CPU-only build under AddressSanitizer + UBSan (for the test suite: load it with
                      LD_PRELOAD=libasan.so; see `make pytest-asan`).
"""
import os
import re
import subprocess
from pathlib import Path

from setuptools import find_packages, setup
from torch.utils import cpp_extension

ROOT = Path(__file__).resolve().parent
DEFAULT_ARCHS = "75;80;86;89;90;100;120"


def read_version():
    text = (ROOT / "python" / "tbd_ops" / "_version.py").read_text()
    return re.search(r'__version__ = "([^"]+)"', text).group(1)


def cuda_mode():
    value = os.environ.get("TBD_OPS_CUDA", "").strip().lower()
    if value in ("", "auto"):
        return "auto"
    if value in ("1", "on", "true", "yes"):
        return "on"
    if value in ("0", "off", "false", "no"):
        return "off"
    raise SystemExit(f"TBD_OPS_CUDA must be 0, 1 or unset, got {value!r}")


def nvcc_version(cuda_home):
    out = subprocess.check_output([os.path.join(cuda_home, "bin", "nvcc"), "--version"], text=True)
    m = re.search(r"release (\d+)\.(\d+)", out)
    return (int(m.group(1)), int(m.group(2))) if m else None


def cuda_archs():
    """(SASS, PTX): the compute capabilities compiled to machine code, and to PTX (the newest)."""
    raw = os.environ.get("TBD_OPS_CUDA_ARCHS", DEFAULT_ARCHS)
    archs = sorted({a.strip().replace(".", "").replace("sm_", "") for a in re.split(r"[;, ]+", raw) if a.strip()}, key=int)
    if not archs or not all(a.isdigit() for a in archs):
        raise SystemExit(f"TBD_OPS_CUDA_ARCHS must list compute capabilities like '80;90', got {raw!r}")
    return archs, archs[-1:]


def arch_flags(sass, ptx):
    flags = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in sass]
    flags += [f"-gencode=arch=compute_{a},code=compute_{a}" for a in ptx]
    return flags


def build_fact_flags(torch_version, debug, cuda_version, sass, ptx):
    """-D flags for csrc/module.cpp, which reports them (tbd_ops._C.torch_version() etc.).

    The torch version travels as one preprocessor token (stringified there), so that
    no quoting depends on the shell that runs the compiler.
    """
    if not re.fullmatch(r"[0-9][0-9A-Za-z.+_]*", torch_version):
        raise SystemExit(f"tbd_ops: unexpected characters in torch.__version__ {torch_version!r}")
    flags = [f"-DTBD_OPS_BUILD_TORCH_VERSION={torch_version}", f"-DTBD_OPS_BUILD_DEBUG={int(debug)}"]
    if cuda_version is not None:
        flags += [f"-DTBD_OPS_BUILD_CUDA_MAJOR={cuda_version[0]}", f"-DTBD_OPS_BUILD_CUDA_MINOR={cuda_version[1]}",
                  f"-DTBD_OPS_BUILD_SASS_ARCHS={','.join(sass)}", f"-DTBD_OPS_BUILD_PTX_ARCHS={','.join(ptx)}"]
    return flags


def build_extension():
    import torch

    mode = cuda_mode()
    cuda_home = cpp_extension.CUDA_HOME
    has_nvcc = cuda_home is not None and os.path.exists(os.path.join(cuda_home, "bin", "nvcc"))
    if mode == "on" and not has_nvcc:
        raise SystemExit("TBD_OPS_CUDA=1 but nvcc was not found (set CUDA_HOME); refusing a CPU-only build")
    with_cuda = has_nvcc and mode != "off"
    if with_cuda and torch.version.cuda is None:
        if mode == "on":
            raise SystemExit("TBD_OPS_CUDA=1 but the installed torch has no CUDA support")
        with_cuda = False
    nv = None
    if with_cuda:
        nv = nvcc_version(cuda_home)
        if nv is None:
            raise SystemExit(f"could not read the release of {cuda_home}/bin/nvcc (nvcc --version)")
        torch_major = int(torch.version.cuda.split(".")[0])
        if nv[0] != torch_major:
            raise SystemExit(
                f"nvcc is CUDA {nv[0]}.{nv[1]} but torch was built with CUDA {torch.version.cuda}; "
                "install a matching toolkit or set TBD_OPS_CUDA=0"
            )

    asan = os.environ.get("TBD_OPS_ASAN", "0") == "1"
    if asan and with_cuda:
        raise SystemExit("TBD_OPS_ASAN=1 is a CPU-only build: set TBD_OPS_CUDA=0")
    debug = os.environ.get("TBD_OPS_DEBUG", "0") == "1"
    opt = ["-O0", "-g"] if debug else ["-O3"]
    sanitize = ["-fsanitize=address,undefined", "-fno-sanitize-recover=all", "-fno-omit-frame-pointer"] if asan else []
    sources = sorted(str(p.relative_to(ROOT)) for p in [*(ROOT / "csrc").glob("*.cpp"), *(ROOT / "csrc" / "cpu").glob("*.cpp")])
    include_dirs = [str(ROOT / "csrc" / "include")]
    # -fopenmp: at::parallel_for is inline and runs serially without it.
    # -ffp-contract=off / -fmad=false: no FMA contraction, so that the CPU kernels,
    # the emulated CUDA kernels and the GPU agree bit for bit on per-element results.
    extra = {"cxx": opt + sanitize + ["-fvisibility=hidden", "-fopenmp", "-ffp-contract=off"]}
    define_macros = []
    sass, ptx = cuda_archs() if with_cuda else ([], [])
    # Build facts for csrc/module.cpp, on the host compiler's command line only
    # (nvcc would split the comma-separated lists into several -D definitions).
    extra["cxx"] += build_fact_flags(torch.__version__, debug, nv, sass, ptx)
    if with_cuda:
        sources += sorted(str(p.relative_to(ROOT)) for p in (ROOT / "cuda").glob("*.cu"))
        extra["cxx"].append("-DTBD_OPS_WITH_CUDA")
        extra["nvcc"] = opt + ["-lineinfo", "-fmad=false", "-DTBD_OPS_WITH_CUDA"] + arch_flags(sass, ptx)
        ext = cpp_extension.CUDAExtension
    else:
        ext = cpp_extension.CppExtension
    if with_cuda:
        print(f"tbd_ops: building with CUDA kernels (nvcc {nv[0]}.{nv[1]}; SASS {' '.join('sm_' + a for a in sass)}; "
              f"PTX {' '.join('compute_' + a for a in ptx)}) against torch {torch.__version__}")
    else:
        print(f"tbd_ops: building CPU-only{' under AddressSanitizer' if asan else ''} against torch {torch.__version__}")
    return ext(
        name="tbd_ops._C",
        sources=sources,
        include_dirs=include_dirs,
        define_macros=define_macros,
        extra_compile_args=extra,
        extra_link_args=["-fopenmp"] + sanitize,
    )


setup(
    name="tbd_ops",
    version=read_version(),
    package_dir={"": "python"},
    packages=find_packages("python"),
    # Configs users start from (tbd_ops::tbd/..., tbd_ops::pseco/...; see tbd_ops.mmdet.train).
    package_data={"tbd_ops": ["configs/*/*.py"]},
    ext_modules=[build_extension()],
    cmdclass={"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)},
    zip_safe=False,
)
