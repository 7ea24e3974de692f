"""p_c: channel max then spatial softmax (SPEC 1.1)."""
from typing import List, Sequence, Union

import torch

from ._utils import (acc_dtype, check_tensor, input_grads, is_channels_last, levels, same_dtype_and_device,
                     schema_defaults)

_OP = "channel_max_spatial_softmax"
DEFAULTS = schema_defaults(_OP)  # temperature, scale_by_hw


def channel_max_spatial_softmax(
    x: Union[torch.Tensor, Sequence[torch.Tensor]],
    temperature: float = DEFAULTS["temperature"],
    scale_by_hw: bool = DEFAULTS["scale_by_hw"],
) -> Union[torch.Tensor, List[torch.Tensor]]:
    """p_c of the TBD paper: ``softmax_{h,w}(max_k x[n, k, h, w] / T)``.

    Args:
        x: raw classification logits ``[N, K, H, W]`` (K = A*C, any strides,
            channels_last included), or a list/tuple of FPN levels.
        temperature: softmax temperature T > 0.
        scale_by_hw: multiply by H*W so that each map has mean 1 instead of
            summing to 1.

    Returns:
        ``[N, H, W]`` in the dtype of ``x`` (a list for list input). Only the
        argmax channel of each location receives gradient.

    The levels of a list (of one dtype and device) are computed by one call,
    on CUDA in the same kernel launches. Where no gradient can be asked for
    (``torch.no_grad()``, or ``x`` not requiring grad; e.g. a teacher's maps)
    the argmax that the backward reads is not kept: the same values, fewer
    bytes written.
    """
    per_level, is_list = levels(_OP, ("x",), x)
    if is_list:
        xs = [t for (t,) in per_level]
        for i, t in enumerate(xs):
            check_tensor(_OP, f"x[{i}]", t)
        if not xs:
            return []
        if not same_dtype_and_device(xs):
            return [channel_max_spatial_softmax(t, temperature, scale_by_hw) for t in xs]
        if not _needs_grad(xs):
            return list(_NO_GRAD(xs, float(temperature), bool(scale_by_hw)))
        return list(torch.ops.tbd_ops._channel_max_spatial_softmax_levels.default(
            xs, float(temperature), bool(scale_by_hw))[0])
    check_tensor(_OP, "x", x)
    if not _needs_grad([x]):
        return _NO_GRAD_ONE(x, float(temperature), bool(scale_by_hw))
    return torch.ops.tbd_ops.channel_max_spatial_softmax.default(x, float(temperature), bool(scale_by_hw))[0]


# p_c alone, without the argmax and log-probabilities that only a backward reads (e.g. the
# teacher's maps): the same values, fewer bytes written and, on the CPU, a max-only channel sweep.
_NO_GRAD_ONE = torch.ops.tbd_ops._channel_max_spatial_softmax_no_grad.default
_NO_GRAD = torch.ops.tbd_ops._channel_max_spatial_softmax_levels_no_grad.default


def _needs_grad(xs) -> bool:
    return torch.is_grad_enabled() and any(t.requires_grad for t in xs)


@torch.library.register_fake("tbd_ops::channel_max_spatial_softmax")
def _fake(x, temperature=DEFAULTS["temperature"], scale_by_hw=DEFAULTS["scale_by_hw"]):
    torch._check(x.dim() == 4, lambda: f"{_OP}: x must be a 4-D tensor [N, K, H, W], got {x.dim()}-D")
    torch._check(x.shape[1] >= 1, lambda: f"{_OP}: x must have at least one channel, got shape {tuple(x.shape)}")
    n, _, h, w = x.shape
    return (
        x.new_empty((n, h, w)),
        x.new_empty((n, h, w), dtype=acc_dtype(x.dtype)),
        x.new_empty((n, h, w), dtype=torch.long),
    )


@torch.library.register_fake("tbd_ops::_channel_max_spatial_softmax_levels")
def _fake_levels(x, temperature=DEFAULTS["temperature"], scale_by_hw=DEFAULTS["scale_by_hw"]):
    outs = [_fake(t, temperature, scale_by_hw) for t in x]
    return [o[0] for o in outs], [o[1] for o in outs], [o[2] for o in outs]


@torch.library.register_fake("tbd_ops::_channel_max_spatial_softmax_no_grad")
def _fake_no_grad(x, temperature=DEFAULTS["temperature"], scale_by_hw=DEFAULTS["scale_by_hw"]):
    return _fake(x, temperature, scale_by_hw)[0]


@torch.library.register_fake("tbd_ops::_channel_max_spatial_softmax_levels_no_grad")
def _fake_levels_no_grad(x, temperature=DEFAULTS["temperature"], scale_by_hw=DEFAULTS["scale_by_hw"]):
    return [_fake(t, temperature, scale_by_hw)[0] for t in x]


@torch.library.register_fake("tbd_ops::_channel_max_spatial_softmax_backward")
def _fake_backward(grad, log_p, argmax, channels, temperature, scale_by_hw, channels_last):
    n, h, w = grad.shape
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    return grad.new_empty((n, channels, h, w)).contiguous(memory_format=fmt)


def _setup_context(ctx, inputs, output):
    x, temperature, scale_by_hw = inputs
    _, log_p, argmax = output
    ctx.mark_non_differentiable(log_p, argmax)
    ctx.set_materialize_grads(False)  # no zero gradients made for log_p and argmax
    ctx.save_for_backward(log_p, argmax)
    ctx.channels = x.shape[1]
    ctx.temperature = temperature
    ctx.scale_by_hw = scale_by_hw
    ctx.channels_last = is_channels_last(x)


def _backward(ctx, grad_out, _grad_log_p, _grad_argmax):
    if grad_out is None or not ctx.needs_input_grad[0]:
        return input_grads(ctx, {})
    log_p, argmax = ctx.saved_tensors
    dx = torch.ops.tbd_ops._channel_max_spatial_softmax_backward.default(
        grad_out, log_p, argmax, ctx.channels, ctx.temperature, ctx.scale_by_hw, ctx.channels_last
    )
    return input_grads(ctx, {0: dx})


torch.library.register_autograd("tbd_ops::channel_max_spatial_softmax", _backward, setup_context=_setup_context)


@torch.library.register_fake("tbd_ops::_channel_max_spatial_softmax_levels_backward")
def _fake_backward_levels(grad, log_p, argmax, channels, temperature, scale_by_hw, channels_last):
    return [_fake_backward(g, lp, am, k, temperature, scale_by_hw, cl)
            for g, lp, am, k, cl in zip(grad, log_p, argmax, channels, channels_last)]


def _setup_context_levels(ctx, inputs, output):
    x, temperature, scale_by_hw = inputs
    _, log_p, argmax = output
    ctx.mark_non_differentiable(*log_p, *argmax)
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(*log_p, *argmax)
    ctx.levels = len(x)
    ctx.channels = [t.shape[1] for t in x]
    ctx.temperature = temperature
    ctx.scale_by_hw = scale_by_hw
    ctx.channels_last = [is_channels_last(t) for t in x]


def _backward_levels(ctx, grad_out, _grad_log_p, _grad_argmax):
    L = ctx.levels
    need = ctx.needs_input_grad[0]
    need = list(need) if isinstance(need, (list, tuple)) else [need] * L
    # The levels with an incoming gradient whose input needs one, in one call.
    todo = [l for l in range(L) if grad_out is not None and grad_out[l] is not None and need[l]]
    dx = [None] * L
    if todo:
        saved = ctx.saved_tensors
        got = torch.ops.tbd_ops._channel_max_spatial_softmax_levels_backward.default(
            [grad_out[l] for l in todo], [saved[l] for l in todo], [saved[L + l] for l in todo],
            [ctx.channels[l] for l in todo], ctx.temperature, ctx.scale_by_hw,
            [ctx.channels_last[l] for l in todo])
        for l, g in zip(todo, got):
            dx[l] = g
    return input_grads(ctx, {0: dx})


torch.library.register_autograd("tbd_ops::_channel_max_spatial_softmax_levels", _backward_levels,
                                setup_context=_setup_context_levels)
