"""Checkpoints written by mmengine, loaded under ``torch.load(weights_only=True)``.

Since torch 2.6 ``torch.load`` defaults to ``weights_only=True``, and mmengine
0.10.7 does not pass ``weights_only``: a checkpoint written by its
``CheckpointHook`` (which pickles the ``message_hub``: ``HistoryBuffer``
objects holding numpy arrays, and ``getattr(HistoryBuffer, "mean")``-style
references to its statistics methods) then fails to load with "Unsupported
global: ... HistoryBuffer" — both as a teacher checkpoint and when the Runner
resumes.

``allow_mmengine_checkpoints()`` (called when ``tbd_ops.mmdet`` is imported)
adds exactly those types to torch's weights-only allow-list: ``HistoryBuffer``,
numpy arrays, dtypes and scalars, and a ``getattr`` that only returns
``HistoryBuffer``'s statistics methods. ``weights_only`` stays on: any other
global in a checkpoint is still refused.

``load_state_dict_strict(model, filename)`` loads a checkpoint into a model and
raises, naming them, on missing, unexpected or shape-mismatched keys.
"""
import pickle
import re
from typing import Dict, List, Tuple

import numpy as np
import torch
from mmengine.logging.history_buffer import HistoryBuffer
from torch import Tensor, nn

__all__ = ["allow_mmengine_checkpoints", "load_checkpoint_weights_only", "load_state_dict_strict",
           "CheckpointMismatchError"]

_HISTORY_BUFFER_STATISTICS = ("min", "max", "current", "mean")


def _history_buffer_getattr(obj, name):
    """``getattr`` as mmengine's pickles use it: a statistics method of ``HistoryBuffer``, nothing else."""
    allowed = set(_HISTORY_BUFFER_STATISTICS) | set(HistoryBuffer._statistics_methods)
    if obj is HistoryBuffer and isinstance(name, str) and name in allowed:
        return getattr(HistoryBuffer, name)
    raise _unpickling_error(f"getattr({getattr(obj, '__qualname__', type(obj).__name__)}, {name!r}) is not allowed "
                       "in a weights-only load")


def _unpickling_error(message: str) -> Exception:
    import pickle

    return pickle.UnpicklingError(message)


def _numpy_globals() -> List[Tuple[object, str]]:
    core = getattr(np, "_core", None) or np.core
    reconstruct = core.multiarray._reconstruct
    scalar = core.multiarray.scalar
    out = [(np.ndarray, "numpy.ndarray"), (np.dtype, "numpy.dtype")]
    # numpy 2 pickles as numpy._core.*, numpy 1 as numpy.core.*; a file may come from either.
    for prefix in ("numpy._core.multiarray", "numpy.core.multiarray"):
        out += [(reconstruct, f"{prefix}._reconstruct"), (scalar, f"{prefix}.scalar")]
    # numpy >= 1.25 pickles dtypes of arrays as numpy.dtypes.<Name>DType in some versions.
    dtypes = getattr(np, "dtypes", None)
    if dtypes is not None:
        for name in dir(dtypes):
            if name.endswith("DType"):
                out.append((getattr(dtypes, name), f"numpy.dtypes.{name}"))
    return out


_ALLOWED = None


def _allowed_globals() -> list:
    global _ALLOWED
    if _ALLOWED is None:
        _ALLOWED = [HistoryBuffer, *_numpy_globals(),
                    (_history_buffer_getattr, "builtins.getattr"),
                    (_history_buffer_getattr, "__builtin__.getattr")]
    return _ALLOWED


def _weights_only_by_default() -> bool:
    """torch >= 2.6: ``torch.load`` defaults to ``weights_only=True`` (and its allow-list takes
    ``(object, "module.name")`` pairs); before, it unpickles anything and needs no allow-list."""
    major, minor = (int(v) for v in torch.__version__.split(".")[:2])
    return (major, minor) >= (2, 6)


def allow_mmengine_checkpoints() -> None:
    """Lets ``torch.load(weights_only=True)`` read checkpoints written by mmengine's ``CheckpointHook``.

    Adds ``HistoryBuffer``, numpy arrays/dtypes/scalars and a ``getattr``
    restricted to ``HistoryBuffer``'s statistics methods to torch's allow-list
    (``torch.serialization.add_safe_globals``); nothing else. Idempotent. With
    torch < 2.6, whose ``torch.load`` does not default to weights-only loading,
    it does nothing.
    """
    if _weights_only_by_default():
        torch.serialization.add_safe_globals(_allowed_globals())


class CheckpointMismatchError(ValueError):
    """A checkpoint's keys or shapes do not fit the model it is loaded into."""


def load_checkpoint_weights_only(filename: str, map_location="cpu") -> dict:
    """The checkpoint at ``filename`` (a path, URL or ``open-mmlab://``-style name), loaded weights-only."""
    from mmengine.runner.checkpoint import CheckpointLoader

    # Not torch.serialization.safe_globals(...): leaving that context removes the entries from the
    # process-wide allow-list even when allow_mmengine_checkpoints() had added them before.
    allow_mmengine_checkpoints()
    return CheckpointLoader.load_checkpoint(filename, map_location=map_location)


def _state_dict_of(checkpoint, filename: str) -> Dict[str, Tensor]:
    state = checkpoint.get("state_dict", checkpoint) if isinstance(checkpoint, dict) else None
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise CheckpointMismatchError(f"{filename!r} holds no state dict (expected a dict of tensors, or a dict "
                                      "with a 'state_dict' entry)")
    # Checkpoints saved from a DDP-wrapped model carry a "module." prefix (mmengine strips it too).
    return {re.sub(r"^module\.", "", k): v for k, v in state.items()}


def _listing(keys: List[str], limit: int = 8) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f", ... ({len(keys) - limit} more)" if len(keys) > limit else "")


def mismatches(expected: Dict[str, Tensor], state: Dict[str, Tensor], unexpected_ok: bool = False,
               shape_ok=lambda key: False) -> List[str]:
    """What keeps ``state`` from loading into a model whose state dict is ``expected``: the model's keys
    missing from it, its keys not in the model (unless ``unexpected_ok``) and the keys whose shapes
    differ (unless ``shape_ok(key)``), each part naming the keys; empty when it fits."""
    missing = sorted(set(expected) - set(state))
    unexpected = [] if unexpected_ok else sorted(set(state) - set(expected))
    mismatched = sorted(k for k in set(state) & set(expected)
                        if state[k].shape != expected[k].shape and not shape_ok(k))
    parts = []
    if missing:
        parts.append(f"{len(missing)} keys of the model are missing from the checkpoint: {_listing(missing)}")
    if unexpected:
        parts.append(f"{len(unexpected)} keys of the checkpoint are not in the model: {_listing(unexpected)}")
    if mismatched:
        shapes = [f"{k} (checkpoint {list(state[k].shape)}, model {list(expected[k].shape)})" for k in mismatched]
        parts.append(f"{len(mismatched)} keys differ in shape: {_listing(shapes, 4)}")
    return parts


def load_state_dict_strict(model: nn.Module, filename: str, what: str = "checkpoint") -> dict:
    """Loads ``filename`` into ``model``; every key must be present with the model's shape.

    Raises ``CheckpointMismatchError`` naming the missing, unexpected and
    shape-mismatched keys (``what`` names the argument in the message, e.g.
    ``"teacher_ckpt"``). Returns the checkpoint's ``meta`` (or ``{}``).
    """
    try:
        checkpoint = load_checkpoint_weights_only(filename)
    except FileNotFoundError as e:
        raise FileNotFoundError(f"{what}: no checkpoint at {filename!r} ({e})") from None
    except (OSError, RuntimeError, EOFError, ValueError, pickle.UnpicklingError) as e:  # not a checkpoint
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointMismatchError(f"{what} {filename!r} cannot be read as a PyTorch checkpoint: {first}") from e
    state = _state_dict_of(checkpoint, filename)
    parts = mismatches(model.state_dict(), state)
    if parts:
        raise CheckpointMismatchError(
            f"{what} {filename!r} does not fit the {type(model).__name__} built from its config: " + "; ".join(parts))
    model.load_state_dict(state, strict=True)
    meta = checkpoint.get("meta", {}) if isinstance(checkpoint, dict) else {}
    return meta if isinstance(meta, dict) else {}
