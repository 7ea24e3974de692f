"""tbd_ops: fused CPU/CUDA kernels for Task-Balanced Distillation and PseCo losses.

Every op is a PyTorch dispatcher operator (``torch.ops.tbd_ops.<name>``) with CPU
and CUDA kernels, a backward op, a fake kernel for ``torch.compile`` and an
autocast policy. ``tbd_ops.reference`` holds pure-PyTorch implementations with
the same signatures.
"""
import torch  # noqa: F401  (loads libtorch, which _C links against)

from ._version import __version__
from . import _C  # noqa: F401  (loads the kernels and registers the operators)
from .ops import *  # noqa: F401,F403  (every public op)
from .ops import __all__ as _ops_all
from . import reference  # noqa: E402


def cuda_available() -> bool:
    """Whether this build of tbd_ops contains the CUDA kernels.

    This says nothing about a GPU being present; combine with
    ``torch.cuda.is_available()`` for that.
    """
    return bool(_C.WITH_CUDA)


__all__ = ["__version__", "cuda_available", "reference", "nn", *_ops_all]

from . import nn  # noqa: E402  (loss modules; import after the ops they use)
