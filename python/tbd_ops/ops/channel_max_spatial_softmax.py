"""p_c: channel max then spatial softmax (SPEC 1.1)."""
from typing import List, Sequence, Union

import torch

from ._utils import (acc_dtype, as_bool, as_float, check_tensor, levels, register_fake,
                     same_dtype_and_device, schema_defaults)

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
    temperature = as_float(_OP, "temperature", temperature)
    scale_by_hw = as_bool(_OP, "scale_by_hw", scale_by_hw)
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
            return list(_NO_GRAD(xs, temperature, scale_by_hw))
        return list(torch.ops.tbd_ops._channel_max_spatial_softmax_levels.default(
            xs, temperature, scale_by_hw)[0])
    check_tensor(_OP, "x", x)
    if not _needs_grad([x]):
        return _NO_GRAD_ONE(x, temperature, scale_by_hw)
    return torch.ops.tbd_ops.channel_max_spatial_softmax.default(x, temperature, scale_by_hw)[0]


# p_c alone, without the argmax and log-probabilities that only a backward reads (e.g. the
# teacher's maps): the same values, fewer bytes written and, on the CPU, a max-only channel sweep.
_NO_GRAD_ONE = torch.ops.tbd_ops._channel_max_spatial_softmax_no_grad.default
_NO_GRAD = torch.ops.tbd_ops._channel_max_spatial_softmax_levels_no_grad.default


def _needs_grad(xs) -> bool:
    return torch.is_grad_enabled() and any(t.requires_grad for t in xs)


@register_fake("tbd_ops::channel_max_spatial_softmax")
def _fake(x, temperature=DEFAULTS["temperature"], scale_by_hw=DEFAULTS["scale_by_hw"]):
    torch._check(x.dim() == 4, lambda: f"{_OP}: x must be a 4-D tensor [N, K, H, W], got {x.dim()}-D")
    torch._check(x.shape[1] >= 1, lambda: f"{_OP}: x must have at least one channel, got shape {tuple(x.shape)}")
    n, _, h, w = x.shape
    return (
        x.new_empty((n, h, w)),
        x.new_empty((n, h, w), dtype=acc_dtype(x.dtype)),
        x.new_empty((n, h, w), dtype=torch.long),
    )


@register_fake("tbd_ops::_channel_max_spatial_softmax_levels")
def _fake_levels(x, temperature=DEFAULTS["temperature"], scale_by_hw=DEFAULTS["scale_by_hw"]):
    outs = [_fake(t, temperature, scale_by_hw) for t in x]
    return [o[0] for o in outs], [o[1] for o in outs], [o[2] for o in outs]


@register_fake("tbd_ops::_channel_max_spatial_softmax_no_grad")
def _fake_no_grad(x, temperature=DEFAULTS["temperature"], scale_by_hw=DEFAULTS["scale_by_hw"]):
    return _fake(x, temperature, scale_by_hw)[0]


@register_fake("tbd_ops::_channel_max_spatial_softmax_levels_no_grad")
def _fake_levels_no_grad(x, temperature=DEFAULTS["temperature"], scale_by_hw=DEFAULTS["scale_by_hw"]):
    return [_fake(t, temperature, scale_by_hw)[0] for t in x]


@register_fake("tbd_ops::_channel_max_spatial_softmax_backward")
def _fake_backward(grad, log_p, argmax, channels, temperature, scale_by_hw, channels_last):
    n, h, w = grad.shape
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    return grad.new_empty((n, channels, h, w)).contiguous(memory_format=fmt)


@register_fake("tbd_ops::_channel_max_spatial_softmax_levels_backward")
def _fake_backward_levels(grad, log_p, argmax, channels, temperature, scale_by_hw, channels_last):
    return [_fake_backward(g, lp, am, k, temperature, scale_by_hw, cl)
            for g, lp, am, k, cl in zip(grad, log_p, argmax, channels, channels_last)]
