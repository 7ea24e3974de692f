"""Masked reductions (SPEC 1.5): ``masked_sq_dist`` and ``masked_l1``, one op family."""
from typing import List, Sequence, Union

import torch

from ._utils import acc_dtype, check_tensor, levels, register_fake, same_dtype_and_device

Levels = Union[torch.Tensor, Sequence[torch.Tensor]]


def _apply(name: str, a: Levels, b: Levels, masks: Levels):
    op = getattr(torch.ops.tbd_ops, f"_{name}_levels").default
    per_level, is_list = levels(name, ("a", "b", "masks"), a, b, masks)
    if is_list:
        for l, (x, y, m) in enumerate(per_level):
            check_tensor(name, f"a[{l}]", x)
            check_tensor(name, f"b[{l}]", y)
            check_tensor(name, f"masks[{l}]", m)
        if not per_level:
            return []
        xs = [x for x, _, _ in per_level]
        if not same_dtype_and_device(xs):
            return [_apply(name, x, y, m) for x, y, m in per_level]
        # Every level in one call (on CUDA in the same kernel launches).
        return list(op(xs, [y for _, y, _ in per_level], [m for _, _, m in per_level])[0])
    check_tensor(name, "a", a)
    check_tensor(name, "b", b)
    check_tensor(name, "masks", masks)
    if masks.requires_grad and torch.is_grad_enabled():
        return op([a], [b], [masks])[0][0]  # keeps the per-location sums for the gradient of masks
    # One level: the single-tensor op, a little cheaper on the host than the list op (no list, no
    # term output; same kernels, same values).
    return getattr(torch.ops.tbd_ops, name).default(a, b, masks)


def masked_sq_dist(a: Levels, b: Levels, masks: Levels) -> Union[torch.Tensor, List[torch.Tensor]]:
    """``out[n, k] = sum_hw masks[n, k, hw] * sum_c (a[n, c, hw] - b[n, c, hw])^2``.

    Args:
        a, b: ``[N, C, H, W]`` feature maps (any strides), one dtype.
        masks: ``[N, K, H, W]`` spatial weights in the dtype of ``a``; an
            expanded view (e.g. ``m[:, None].expand(N, K, H, W)``) is read in place.
        Each may also be a list/tuple of FPN levels (then all three are);
        the levels of a list are computed by one call (on CUDA in the same
        kernel launches).

    Returns:
        ``[N, K]`` in float32 (float64 for float64 input); a list for list input.
        Differentiable with respect to ``a``, ``b`` and ``masks``.
    """
    return _apply("masked_sq_dist", a, b, masks)


def masked_l1(a: Levels, b: Levels, masks: Levels) -> Union[torch.Tensor, List[torch.Tensor]]:
    """``out[n, k] = sum_hw masks[n, k, hw] * sum_c |a[n, c, hw] - b[n, c, hw]|``.

    Same shapes, dtypes and list form as :func:`masked_sq_dist`. The gradient of
    ``|a - b|`` at ``a == b`` is 0.
    """
    return _apply("masked_l1", a, b, masks)


def _check_fake(name, a, b, masks):
    torch._check(a.dim() == 4, lambda: f"{name}: a must be a 4-D tensor [N, C, H, W], got {a.dim()}-D")
    torch._check(b.shape == a.shape, lambda: f"{name}: b must have the shape of a {tuple(a.shape)}, got {tuple(b.shape)}")
    torch._check(masks.dim() == 4, lambda: f"{name}: masks must be a 4-D tensor [N, K, H, W], got {masks.dim()}-D")
    torch._check(masks.shape[0] == a.shape[0] and masks.shape[2:] == a.shape[2:],
                 lambda: f"{name}: masks must be [N, K, H, W] with N, H, W of a, got {tuple(masks.shape)}")
    torch._check(b.dtype == a.dtype and masks.dtype == a.dtype,
                 lambda: f"{name}: a, b and masks must have one dtype, got {a.dtype}, {b.dtype}, {masks.dtype}")


def _register(name: str) -> None:
    @register_fake(f"tbd_ops::{name}")
    def _fake(a, b, masks):
        _check_fake(name, a, b, masks)
        return a.new_empty((a.shape[0], masks.shape[1]), dtype=acc_dtype(a.dtype))

    @register_fake(f"tbd_ops::_{name}_backward")
    def _fake_backward(grad, a, b, masks, output_mask):
        _check_fake(f"_{name}_backward", a, b, masks)
        ga = torch.empty_like(a) if output_mask[0] else a.new_empty((0,))
        gb = torch.empty_like(b) if output_mask[1] else b.new_empty((0,))
        gm = torch.empty_like(masks) if output_mask[2] else masks.new_empty((0,))
        return ga, gb, gm

    @register_fake(f"tbd_ops::_{name}_levels")
    def _fake_levels(a, b, masks):
        torch._check(len(a) == len(b) == len(masks), lambda: f"{name}: a, b and masks must have one entry per level")
        for x, y, m in zip(a, b, masks):
            _check_fake(name, x, y, m)
        acc = [acc_dtype(x.dtype) for x in a]
        return ([x.new_empty((x.shape[0], m.shape[1]), dtype=d) for x, m, d in zip(a, masks, acc)],
                [x.new_empty((x.shape[0], x.shape[2], x.shape[3]), dtype=d) for x, d in zip(a, acc)])

    @register_fake(f"tbd_ops::_{name}_levels_backward")
    def _fake_backward_levels(grad, a, b, masks, term, output_mask):
        for x, y, m in zip(a, b, masks):
            _check_fake(f"_{name}_backward", x, y, m)
        return ([torch.empty_like(x) for x in a] if output_mask[0] else [],
                [torch.empty_like(y) for y in b] if output_mask[1] else [],
                [torch.empty_like(m) for m in masks] if output_mask[2] else [])


_register("masked_sq_dist")
_register("masked_l1")
