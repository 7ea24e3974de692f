"""The sources of the emulated CUDA build (tests/emu/tbd_ops_emu*.so) and their digest.

tests/emu/setup.py compiles the digest into the module; tests/emu/dispatch.py
refuses a module whose digest differs from the sources' (a stale build that
would test old code) and asks for `make build-emu`.
"""
import hashlib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PATTERNS = ("csrc/*.cpp", "csrc/*.h", "csrc/include/tbd_ops/*.h", "cuda/*.cu", "cuda/*.cuh", "cuda/*.h",
            "cuda/emu/*.cpp", "cuda/emu/*.h", "tests/emu/emu_module.cpp", "tests/emu/setup.py")


def files(root: Path = ROOT):
    return sorted({p for pattern in PATTERNS for p in root.glob(pattern)})


def digest(root: Path = ROOT) -> str:
    h = hashlib.sha256()
    for p in files(root):
        h.update(p.relative_to(root).as_posix().encode() + b"\0" + p.read_bytes() + b"\0")
    return h.hexdigest()
