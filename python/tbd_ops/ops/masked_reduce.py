"""Masked reductions (SPEC 1.5): ``masked_sq_dist`` and ``masked_l1``, one op family."""
from typing import List, Sequence, Union

import torch

from ._utils import acc_dtype, check_tensor, input_grads, levels, same_dtype_and_device

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
    # One level: the single-tensor op, whose autograd wrapper is about twice as cheap on the host as
    # the list op's (same kernels, same values).
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


def _flags(need, levels: int) -> List[bool]:
    """needs_input_grad of a Tensor[] input as one flag per tensor (autograd may give one bool for all)."""
    return [bool(x) for x in need] if isinstance(need, (list, tuple)) else [bool(need)] * levels


def _register(name: str) -> None:
    @torch.library.register_fake(f"tbd_ops::{name}")
    def _fake(a, b, masks):
        _check_fake(name, a, b, masks)
        return a.new_empty((a.shape[0], masks.shape[1]), dtype=acc_dtype(a.dtype))

    @torch.library.register_fake(f"tbd_ops::_{name}_backward")
    def _fake_backward(grad, a, b, masks, output_mask):
        _check_fake(f"_{name}_backward", a, b, masks)
        ga = torch.empty_like(a) if output_mask[0] else a.new_empty((0,))
        gb = torch.empty_like(b) if output_mask[1] else b.new_empty((0,))
        gm = torch.empty_like(masks) if output_mask[2] else masks.new_empty((0,))
        return ga, gb, gm

    @torch.library.register_fake(f"tbd_ops::_{name}_levels")
    def _fake_levels(a, b, masks):
        torch._check(len(a) == len(b) == len(masks), lambda: f"{name}: a, b and masks must have one entry per level")
        for x, y, m in zip(a, b, masks):
            _check_fake(name, x, y, m)
        acc = [acc_dtype(x.dtype) for x in a]
        return ([x.new_empty((x.shape[0], m.shape[1]), dtype=d) for x, m, d in zip(a, masks, acc)],
                [x.new_empty((x.shape[0], x.shape[2], x.shape[3]), dtype=d) for x, d in zip(a, acc)])

    @torch.library.register_fake(f"tbd_ops::_{name}_levels_backward")
    def _fake_backward_levels(grad, a, b, masks, term, output_mask):
        for x, y, m in zip(a, b, masks):
            _check_fake(f"_{name}_backward", x, y, m)
        return ([torch.empty_like(x) for x in a] if output_mask[0] else [],
                [torch.empty_like(y) for y in b] if output_mask[1] else [],
                [torch.empty_like(m) for m in masks] if output_mask[2] else [])

    backward_op = getattr(torch.ops.tbd_ops, f"_{name}_backward").default
    backward_levels_op = getattr(torch.ops.tbd_ops, f"_{name}_levels_backward").default

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

    def _setup_context_levels(ctx, inputs, output):
        a, b, masks = inputs
        out, term = output
        ctx.mark_non_differentiable(*term)
        ctx.set_materialize_grads(False)  # no zero gradients made for term
        ctx.levels = len(a)
        # The per-location sums are kept only where the gradient of masks may be asked for.
        keep_term = any(_flags(ctx.needs_input_grad[2], len(masks)))
        ctx.keep_term = keep_term
        ctx.save_for_backward(*a, *b, *masks, *(term if keep_term else ()))

    def _backward_levels(ctx, grad, _grad_term):
        L = ctx.levels
        need_a, need_b, need_m = (_flags(x, L) for x in ctx.needs_input_grad[:3])
        mask = [any(need_a), any(need_b), any(need_m) and ctx.keep_term]
        none = [None] * L
        if grad is None or all(g is None for g in grad) or not any(mask):
            return list(none), list(none), list(none)
        saved = ctx.saved_tensors
        a, b, masks = saved[:L], saved[L:2 * L], saved[2 * L:3 * L]
        term = list(saved[3 * L:]) if mask[2] else []
        grad = [g if g is not None else x.new_zeros((x.shape[0], m.shape[1]), dtype=acc_dtype(x.dtype))
                for g, x, m in zip(grad, a, masks)]
        ga, gb, gm = backward_levels_op(grad, list(a), list(b), list(masks), term, mask)

        def pick(got, need, wanted):
            return [g if n else None for g, n in zip(got, need)] if wanted else list(none)
        return pick(ga, need_a, mask[0]), pick(gb, need_b, mask[1]), pick(gm, need_m, mask[2])

    torch.library.register_autograd(f"tbd_ops::_{name}_levels", _backward_levels,
                                    setup_context=_setup_context_levels)


_register("masked_sq_dist")
_register("masked_l1")
