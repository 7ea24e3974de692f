from typing import List, Optional

import torch

FLOAT_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def check_tensor(op: str, name: str, value) -> None:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(value).__name__}")


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype of the kernels: float64 for float64 input, else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def is_channels_last(x: torch.Tensor) -> bool:
    return x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)


def image_list(op: str, name: str, value, n: Optional[int]) -> List[torch.Tensor]:
    """``value`` as a list of tensors, one per image (``n`` of them when given)."""
    if not isinstance(value, (list, tuple)):
        raise TypeError(f"{op}: {name} must be a list with one tensor per image, got {type(value).__name__}")
    if n is not None and len(value) != n:
        raise ValueError(f"{op}: {name} must hold one tensor per image (N = {n}), got {len(value)}")
    for i, t in enumerate(value):
        check_tensor(op, f"{name}[{i}]", t)
    return list(value)


def cat_images(parts: List[torch.Tensor]) -> torch.Tensor:
    """The rows of every image, concatenated (no copy for a single image)."""
    return parts[0] if len(parts) == 1 else torch.cat(parts, 0)


def same_dtype_and_device(tensors) -> bool:
    """Whether the tensors share one dtype and one device (a list of levels one call can take)."""
    return all(t.dtype == tensors[0].dtype and t.device == tensors[0].device for t in tensors)
