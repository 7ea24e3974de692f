"""Builds tests/emu/tbd_ops_emu*.so: the CUDA path (kernels, launchers and the
registration glue) compiled by the host compiler against the SIMT emulator.

    python tests/emu/setup.py        (from anywhere; builds in place, incremental)

Needs the CUDA toolkit's headers (cuda_fp16.h, cuda_bf16.h), not a GPU.
"""
import os
import sys
from pathlib import Path

from setuptools import setup
from torch.utils import cpp_extension

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
BUILD = ROOT / "build" / "emu"
sys.path.insert(0, str(HERE))
import emu_sources  # noqa: E402


def cuda_include():
    home = cpp_extension.CUDA_HOME or "/usr/local/cuda"
    inc = Path(home) / "include"
    if not (inc / "cuda_fp16.h").exists():
        raise SystemExit(f"tbd_ops_emu: the CUDA toolkit headers were not found under {inc} (set CUDA_HOME)")
    return str(inc)


def kernel_units():
    """One C++ translation unit per cuda/*.cu (the host compiler does not take .cu files)."""
    out = BUILD / "src"
    out.mkdir(parents=True, exist_ok=True)
    units = []
    for cu in sorted((ROOT / "cuda").glob("*.cu")):
        unit = out / (cu.stem + ".cpp")
        write_if_changed(unit, f'#include "{cu}"\n')
        units.append(str(unit))
    return units


def write_if_changed(path: Path, text: str) -> None:
    if not path.exists() or path.read_text() != text:
        path.write_text(text)


def digest_header():
    """build/emu/src/sources_digest.h: the digest of the sources, compiled into the
    module (only emu_module.cpp includes it, so a change rebuilds that file alone)."""
    out = BUILD / "src"
    out.mkdir(parents=True, exist_ok=True)
    write_if_changed(out / "sources_digest.h", f'#define TBD_OPS_EMU_SOURCES_DIGEST "{emu_sources.digest(ROOT)}"\n')
    return str(out)


def main():
    digest_dir = digest_header()
    units = [
        # Schemas, checks and CUDA registrations of every op (-DTBD_OPS_CUDA_EMU; not
        # module.cpp: no Python module init here).
        *(str(p) for p in sorted((ROOT / "csrc").glob("*.cpp")) if p.name != "module.cpp"),
        *kernel_units(),
        str(ROOT / "cuda" / "emu" / "simt.cpp"),
        str(HERE / "emu_module.cpp"),
    ]
    flags = [
        "-O2", "-g0", "-std=c++17", "-fvisibility=hidden", "-ffp-contract=off",
        "-DTBD_OPS_LIB=tbd_ops_emu", "-DTBD_OPS_CUDA_EMU",
        "-D__CUDA_NO_HALF_OPERATORS__", "-D__CUDA_NO_HALF_CONVERSIONS__",
        "-D__CUDA_NO_BFLOAT16_CONVERSIONS__", "-D__CUDA_NO_HALF2_OPERATORS__",
        "-Wno-unknown-pragmas", "-Wno-attributes",
    ]
    ext = cpp_extension.CppExtension(
        name="tbd_ops_emu",
        sources=units,
        include_dirs=[str(ROOT / "csrc" / "include"), str(ROOT / "cuda"), digest_dir, cuda_include()],
        extra_compile_args={"cxx": flags},
    )
    os.chdir(HERE)
    setup(
        name="tbd_ops_emu",
        ext_modules=[ext],
        cmdclass={"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)},
        script_args=["-q", "build_ext", "--inplace", "--build-temp", str(BUILD / "temp")],
    )


if __name__ == "__main__":
    sys.exit(main())
