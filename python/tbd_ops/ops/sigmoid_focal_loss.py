"""Sigmoid focal loss (SPEC 2.4): fused forward and backward."""
from typing import Optional

import torch

from ._utils import (FLOAT_DTYPES, REDUCTIONS, acc_dtype, as_float, check_option, check_tensor,
                     register_fake, schema_defaults)

_OP = "sigmoid_focal_loss"
DEFAULTS = schema_defaults(_OP)  # weight, gamma, alpha, reduction


def sigmoid_focal_loss(
    logits: torch.Tensor,
    targets: torch.Tensor,
    weight: Optional[torch.Tensor] = None,
    gamma: float = DEFAULTS["gamma"],
    alpha: float = DEFAULTS["alpha"],
    reduction: str = DEFAULTS["reduction"],
) -> torch.Tensor:
    """RetinaNet's sigmoid focal loss on one-hot targets.

    With ``p = sigmoid(logits[r, c])`` and the one-hot target ``t = (targets[r] == c)``:
    ``loss[r, c] = -alpha * (1 - p)^gamma * log(p)`` where ``t = 1`` and
    ``-(1 - alpha) * p^gamma * log(1 - p)`` where ``t = 0``, times ``weight[r]``.
    ``log(p)`` and ``log(1 - p)`` are log-sigmoids (as
    ``binary_cross_entropy_with_logits``), clamped below at ``log(FLT_MIN)``
    (about -87.34, mmcv's clamp of p): equal to torchvision's
    ``sigmoid_focal_loss`` for ``|logit| <= 87`` and finite for every non-NaN
    logit, infinite ones included. Accumulates in float32 (float64 for float64).

    Args:
        logits: ``[R, C]`` raw scores (float32/float16/bfloat16/float64, any strides).
        targets: ``[R]`` int64 in ``[0, C]``; ``C`` is background (an all-zero
            one-hot row). On CPU a target outside raises ``ValueError``; the CUDA
            kernels cannot check without a host synchronization, so there the
            loss (and gradient) of a row with a target outside ``[0, C]`` is
            NaN: never an out-of-bounds access, never a silent wrong value.
        weight: optional ``[R]`` per-row weight, any floating dtype (read in the
            accumulation dtype); differentiable.
        gamma: finite, ``>= 0``. alpha: in ``[0, 1]``.
        reduction: ``"none"`` -> ``[R, C]`` in the dtype of ``logits``;
            ``"sum"`` -> 0-d float32 (float64 for float64 logits);
            ``"mean"`` -> the sum divided by ``R * C`` (the number of elements,
            as torchvision and mmdet's ``FocalLoss``; NaN when ``R * C = 0``, as
            ``torch.mean``). Sums run in a fixed order: deterministic.

    Gradients reach ``logits`` and ``weight``; the backward recomputes from the
    logits (nothing of size ``[R, C]`` is saved). The derivative of the log
    terms is ``1 - p`` (resp. ``-p``) also where the clamp binds, as mmcv's.
    """
    check_tensor(_OP, "logits", logits)
    check_tensor(_OP, "targets", targets)
    if weight is not None:
        check_tensor(_OP, "weight", weight)
    check_option(_OP, "reduction", reduction, REDUCTIONS)
    return torch.ops.tbd_ops.sigmoid_focal_loss.default(logits, targets, weight, as_float(_OP, "gamma", gamma),
                                                        as_float(_OP, "alpha", alpha), reduction)


def _check_fake(op, logits, targets, weight, gamma, alpha, reduction):
    torch._check(reduction in REDUCTIONS, lambda: f"{op}: reduction must be one of {REDUCTIONS}, got {reduction!r}")
    torch._check(logits.dim() == 2, lambda: f"{op}: logits must be a 2-D tensor [R, C], got {logits.dim()}-D")
    torch._check(logits.dtype in FLOAT_DTYPES, lambda: f"{op}: logits must be floating, got {logits.dtype}")
    torch._check(targets.dim() == 1 and targets.shape[0] == logits.shape[0],
                 lambda: f"{op}: targets must be [R] with R = {logits.shape[0]}, got {tuple(targets.shape)}")
    torch._check(targets.dtype == torch.long, lambda: f"{op}: targets must be int64, got {targets.dtype}")
    if weight is not None:
        torch._check(weight.dim() == 1 and weight.shape[0] == logits.shape[0],
                     lambda: f"{op}: weight must be [R] with R = {logits.shape[0]}, got {tuple(weight.shape)}")
        torch._check(weight.dtype in FLOAT_DTYPES, lambda: f"{op}: weight must be floating, got {weight.dtype}")


@register_fake("tbd_ops::sigmoid_focal_loss")
def _fake(logits, targets, weight=None, gamma=DEFAULTS["gamma"], alpha=DEFAULTS["alpha"],
          reduction=DEFAULTS["reduction"]):
    _check_fake(_OP, logits, targets, weight, gamma, alpha, reduction)
    if reduction == "none":
        return logits.new_empty(logits.shape)
    return logits.new_empty((), dtype=acc_dtype(logits.dtype))


@register_fake("tbd_ops::_sigmoid_focal_loss_backward")
def _fake_backward(grad, logits, targets, weight, gamma, alpha, reduction, output_mask):
    _check_fake("_sigmoid_focal_loss_backward", logits, targets, weight, gamma, alpha, reduction)
    gx = logits.new_empty(logits.shape) if output_mask[0] else logits.new_empty((0,))
    if weight is not None and output_mask[1]:
        gw = weight.new_empty(weight.shape)
    else:
        gw = logits.new_empty((0,), dtype=acc_dtype(logits.dtype))
    return gx, gw
