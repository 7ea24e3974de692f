import functools
import inspect
import numbers
import re
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch

FLOAT_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)

# The string options of the ops (the C++ parsers of csrc/<op>.cpp take exactly these).
CODERS = ("delta_xywh", "distance", "none")            # decode_max_iou
HD_MODES = ("iou_guided", "plain")                     # harmony_distillation_loss
VOTING_MODES = ("pseco", "paper")                      # consistency_voting
REDUCTIONS = ("none", "sum", "mean")                   # sigmoid_focal_loss


def schema_defaults(op: str) -> Dict[str, Any]:
    """The defaults of operator ``tbd_ops::<op>`` by argument name, from its schema
    (csrc/<op>.cpp): the one source of the defaults of the Python function, the
    modules over it and the reference."""
    schema = getattr(torch.ops.tbd_ops, op).default._schema
    return {a.name: (tuple(a.default_value) if isinstance(a.default_value, list) else a.default_value)
            for a in schema.arguments if a.has_default_value()}


def check_option(owner: str, name: str, value, options) -> str:
    """``value`` if it is one of ``options``; ValueError naming the argument otherwise."""
    if not isinstance(value, str) or value not in options:
        raise ValueError(f"{owner}: {name} must be one of {options}, got {value!r}")
    return value


def as_float(owner: str, name: str, value) -> float:
    """``value`` (a real number: int, float, NumPy scalar, 0-d tensor) as a float; TypeError
    naming the argument for anything else (a string, None or a bool too)."""
    if value is None or isinstance(value, (bool, str, bytes)):
        raise TypeError(f"{owner}: {name} must be a number, got {value!r}")
    try:
        return float(value)
    except (TypeError, ValueError, RuntimeError):
        raise TypeError(f"{owner}: {name} must be a number, got {value!r}") from None


def as_floats(owner: str, name: str, value, length: Optional[int] = None) -> List[float]:
    """``value`` (a sequence of numbers, of ``length`` of them when given) as a list of floats;
    TypeError / ValueError naming the argument (and the element) otherwise."""
    if isinstance(value, (str, bytes)) or not hasattr(value, "__iter__"):
        raise TypeError(f"{owner}: {name} must be a sequence of numbers, got {value!r}")
    out = [as_float(owner, f"{name}[{i}]", v) for i, v in enumerate(value)]
    if length is not None and len(out) != length:
        raise ValueError(f"{owner}: {name} must have {length} values, got {len(out)}")
    return out


def as_int(owner: str, name: str, value) -> int:
    """``value`` (an integer: int or NumPy integer, not a bool or a float) as an int within the
    64 bits of the operators' int arguments; TypeError / ValueError naming the argument."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{owner}: {name} must be an integer, got {value!r}")
    value = int(value)
    if not -(1 << 63) <= value < (1 << 63):
        raise ValueError(f"{owner}: {name} must fit in 64 bits, got {value}")
    return value


def as_bool(owner: str, name: str, value) -> bool:
    """``value`` (True or False, or a NumPy bool) as a bool; TypeError naming the argument for
    anything else: ``bool("False")`` would be True."""
    if isinstance(value, bool) or (type(value).__module__ == "numpy" and type(value).__name__ in ("bool", "bool_")):
        return bool(value)
    raise TypeError(f"{owner}: {name} must be True or False, got {value!r}")


def register_fake(qualname: str):
    """``torch.library.register_fake(qualname)`` with the device check of the real kernels first.

    A call that mixes meta tensors with tensors on another device is dispatched to the fake
    kernel (the Meta key outranks CPU and CUDA), which would otherwise return uninitialized
    tensors on the device of its first argument. ValueError naming the argument instead, as the
    CPU and CUDA kernels raise (csrc/common.cpp, check_same_device).
    """
    name = qualname.split("::", 1)[1]
    op = re.sub(r"_(levels|backward|no_grad)", "", name.lstrip("_"))

    def wrap(fn):
        sig = inspect.signature(fn)

        @functools.wraps(fn)
        def fake(*args, **kwargs):
            ref = None
            for arg, value in sig.bind(*args, **kwargs).arguments.items():
                listed = isinstance(value, (list, tuple))
                for i, t in enumerate(value if listed else (value,)):
                    if not isinstance(t, torch.Tensor):
                        continue
                    label = f"{arg}[{i}]" if listed else arg
                    if ref is None:
                        ref = (label, t.device)
                    elif t.device != ref[1]:
                        raise ValueError(f"{op}: {label} must be on the device of {ref[0]} ({ref[1]}), "
                                         f"got {t.device}")
            return fn(*args, **kwargs)

        torch.library.register_fake(qualname)(fake)
        return fn

    return wrap


def check_tensor(op: str, name: str, value) -> None:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(value).__name__}")


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype of the kernels: float64 for float64 input, else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def image_list(op: str, name: str, value, n: Optional[int]) -> List[torch.Tensor]:
    """``value`` as a list of tensors, one per image (``n`` of them when given)."""
    if not isinstance(value, (list, tuple)):
        raise TypeError(f"{op}: {name} must be a list with one tensor per image, got {type(value).__name__}")
    if n is not None and len(value) != n:
        raise ValueError(f"{op}: {name} must hold one tensor per image (N = {n}), got {len(value)}")
    for i, t in enumerate(value):
        check_tensor(op, f"{name}[{i}]", t)
    return list(value)


def check_rows(op: str, name: str, parts: List[torch.Tensor], i: int, rows: str, cols=None,
               like: Optional[Tuple[str, List[torch.Tensor]]] = None) -> None:
    """``parts[i]``, image i's tensor of argument ``name``, must be ``[rows]`` (``cols`` None) or
    ``[rows, cols]`` (an int ``cols`` fixes the width, a str names any); with ``like = (other,
    others)`` its rows must be those of ``others[i]``. ValueError naming the argument otherwise."""
    t = parts[i]
    ok = t.dim() == (1 if cols is None else 2) and (not isinstance(cols, int) or t.shape[1] == cols)
    if like is not None:
        ok = ok and t.shape[0] == like[1][i].shape[0]
    if not ok:  # the message only then: formatting a size would specialize it under torch.compile
        expected = f"[{rows}]" if cols is None else f"[{rows}, {cols}]"
        if like is not None:
            other, others = like
            expected += f" with {rows} = {others[i].shape[0]} (the rows of {other}[{i}])"
        raise ValueError(f"{op}: {name}[{i}] must be {expected}, got shape {tuple(t.shape)}")


def cat_images(parts: List[torch.Tensor]) -> torch.Tensor:
    """The rows of every image, concatenated (no copy for a single image)."""
    return parts[0] if len(parts) == 1 else torch.cat(parts, 0)


def _join(items) -> str:
    items = list(items)
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def levels(op: str, names: Sequence[str], *values, broadcast: Sequence[str] = ()) -> Tuple[List[tuple], bool]:
    """The arguments of each FPN level of a call that takes one level or a list of levels.

    Either no argument is a list/tuple (one level: the arguments as given) or
    every tensor argument is a list/tuple of levels, all of one length; the
    arguments named in ``broadcast`` may instead be None or a number, which
    stands for itself at every level. Returns ``([(arg, ...) per level],
    is_list)``. TypeError for a single tensor (or anything else) among lists,
    ValueError for lists of different lengths, both naming the arguments.
    """
    is_list = [isinstance(v, (list, tuple)) for v in values]
    if not any(is_list):
        return [tuple(values)], False
    for name, v, listed in zip(names, values, is_list):
        if listed or (name in broadcast and (v is None or isinstance(v, numbers.Number))):
            continue
        if isinstance(v, torch.Tensor):
            raise TypeError(f"{op}: {_join(names)} must all be tensors or all be lists of levels; "
                            f"{name} is a {type(v).__name__}")
        raise TypeError(f"{op}: {name} must be a tensor or a list/tuple of tensors (one per level), "
                        f"got {type(v).__name__}")
    counts = [len(v) for v, listed in zip(values, is_list) if listed]
    if len(set(counts)) > 1:
        listed_names = [n for n, listed in zip(names, is_list) if listed]
        raise ValueError(f"{op}: {_join(listed_names)} must have one entry per level, got "
                         f"{_join([str(c) for c in counts])} levels")
    return [tuple(v[l] if listed else v for v, listed in zip(values, is_list)) for l in range(counts[0])], True


def same_dtype_and_device(tensors) -> bool:
    """Whether the tensors share one dtype and one device (a list of levels one call can take)."""
    return all(t.dtype == tensors[0].dtype and t.device == tensors[0].device for t in tensors)
