"""Masked reductions (SPEC 1.5): ``masked_sq_dist`` and ``masked_l1``, one op family."""
from typing import List, Sequence, Union

import torch

from ._utils import acc_dtype, check_tensor, input_grads, levels

Levels = Union[torch.Tensor, Sequence[torch.Tensor]]


def _apply(name: str, a: Levels, b: Levels, masks: Levels):
    per_level, is_list = levels(name, ("a", "b", "masks"), a, b, masks)
    if is_list:
        return [_apply(name, x, y, m) for x, y, m in per_level]
    check_tensor(name, "a", a)
    check_tensor(name, "b", b)
    check_tensor(name, "masks", masks)
    return getattr(torch.ops.tbd_ops, name).default(a, b, masks)


def masked_sq_dist(a: Levels, b: Levels, masks: Levels) -> Union[torch.Tensor, List[torch.Tensor]]:
    """``out[n, k] = sum_hw masks[n, k, hw] * sum_c (a[n, c, hw] - b[n, c, hw])^2``.

    Args:
        a, b: ``[N, C, H, W]`` feature maps (any strides), one dtype.
        masks: ``[N, K, H, W]`` spatial weights in the dtype of ``a``; an
            expanded view (e.g. ``m[:, None].expand(N, K, H, W)``) is read in place.
        Each may also be a list/tuple of FPN levels (then all three are).

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
    @torch.library.register_fake(f"tbd_ops::{name}")
    def _fake(a, b, masks):
        _check_fake(name, a, b, masks)
        return a.new_empty((a.shape[0], masks.shape[1]), dtype=acc_dtype(a.dtype))

    @torch.library.register_fake(f"tbd_ops::_{name}_backward")
    def _fake_backward(grad, a, b, masks, output_mask):
        _check_fake(f"_{name}_backward", a, b, masks)
        want_ab = output_mask[0] or output_mask[1]
        ga = torch.empty_like(a) if want_ab and output_mask[0] else a.new_empty((0,))
        gb = torch.empty_like(b) if want_ab and output_mask[1] else b.new_empty((0,))
        gm = torch.empty_like(masks) if output_mask[2] else masks.new_empty((0,))
        return ga, gb, gm

    backward_op = getattr(torch.ops.tbd_ops, f"_{name}_backward").default

    def _setup_context(ctx, inputs, output):
        ctx.save_for_backward(*inputs)  # a, b, masks: the difference is recomputed in backward

    def _backward(ctx, grad):
        need = ctx.needs_input_grad
        mask = [bool(need[0]), bool(need[1]), bool(need[2])]
        if grad is None or not any(mask):
            return input_grads(ctx, {})
        a, b, masks = ctx.saved_tensors
        ga, gb, gm = backward_op(grad, a, b, masks, mask)
        return input_grads(ctx, {0: ga, 1: gb, 2: gm})

    torch.library.register_autograd(f"tbd_ops::{name}", _backward, setup_context=_setup_context)


_register("masked_sq_dist")
_register("masked_l1")
