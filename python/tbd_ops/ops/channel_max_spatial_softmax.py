"""p_c: channel max then spatial softmax (SPEC 1.1)."""
from typing import List, Sequence, Union

import torch

from ._utils import acc_dtype, check_tensor, input_grads, is_channels_last, levels, schema_defaults

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
    """
    per_level, is_list = levels(_OP, ("x",), x)
    if is_list:
        return [channel_max_spatial_softmax(t, temperature, scale_by_hw) for (t,) in per_level]
    check_tensor(_OP, "x", x)
    return torch.ops.tbd_ops.channel_max_spatial_softmax.default(x, float(temperature), bool(scale_by_hw))[0]


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
