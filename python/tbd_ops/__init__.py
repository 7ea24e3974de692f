"""tbd_ops: fused CPU/CUDA kernels for Task-Balanced Distillation and PseCo losses.

Every op is a PyTorch dispatcher operator (``torch.ops.tbd_ops.<name>``) with CPU
and CUDA kernels, a backward op, a fake kernel for ``torch.compile`` and an
autocast policy. ``tbd_ops.reference`` holds pure-PyTorch implementations with
the same signatures. ``python -m tbd_ops`` prints how this build was made and
whether it fits the installed torch, GPU and MMDetection.
"""
import torch  # loads libtorch, which _C links against

from ._version import __version__


def _built_against_torch():
    """torch.__version__ at build time, read from the library file without loading it (None if unknown)."""
    import importlib.util
    import mmap

    try:
        spec = importlib.util.find_spec(__name__ + "._C")
        if spec is None or not spec.origin:
            return None
        with open(spec.origin, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
            marker = b"\ntbd_ops built against torch "
            start = data.find(marker)
            if start < 0:
                return None
            start += len(marker)
            end = data.find(b"\n", start, start + 256)
            return data[start:end].decode("ascii") if end > start else None
    except (OSError, ValueError, ImportError):
        return None


def _torch_mismatch(built):
    return ImportError(
        f"tbd_ops {__version__} was built against torch {built}, but torch {torch.__version__} is imported; "
        "a C++ extension only works with the torch it was compiled against. Rebuild tbd_ops in this "
        "environment: pip install --no-build-isolation --force-reinstall --no-deps . (from the source tree)"
    )


def _load_library():
    try:
        from . import _C  # loads the kernels and registers the operators
    except ImportError as e:
        # Built against another torch, the library typically fails to load with an
        # undefined symbol: say so instead.
        built = _built_against_torch()
        if built is not None and built != torch.__version__:
            raise _torch_mismatch(built) from e
        import os

        here = os.path.dirname(os.path.abspath(__file__))
        if not any(n.startswith("_C") and n.endswith((".so", ".pyd")) for n in os.listdir(here)):
            raise ImportError(
                f"tbd_ops in {here} has no compiled library (_C): this looks like an unbuilt source tree. "
                "Build it in place (make build), or install it (pip install --no-build-isolation .) and "
                "import it from outside the source tree"
            ) from e
        raise
    if _C.torch_version() != torch.__version__:
        raise _torch_mismatch(_C.torch_version())
    return _C


_C = _load_library()

from .ops import *  # noqa: E402,F401,F403  (every public op)
from .ops import __all__ as _ops_all  # noqa: E402
from . import reference  # noqa: E402


def cuda_available() -> bool:
    """Whether this build of tbd_ops contains the CUDA kernels.

    This says nothing about a GPU being present; combine with
    ``torch.cuda.is_available()`` for that.
    """
    return bool(_C.with_cuda())


__all__ = ["__version__", "cuda_available", "reference", "nn", *_ops_all]

from . import nn  # noqa: E402  (loss modules; import after the ops they use)
