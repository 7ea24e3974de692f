"""PseCo (semi-supervised detection) losses and label assignment as ``nn.Module``s (SPEC 2).

Thin modules over the fused ops: ``PseCoAssigner`` (prediction-guided label
assignment), ``ConsistencyVotingWeights`` (positive-proposal consistency
voting), ``SigmoidFocalLoss`` and ``ScaleConsistencyLoss``; and
``downsample_view`` to build PseCo's second view (nearest x0.5) with its boxes.
"""
import math
from typing import List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import tbd_ops
from tbd_ops.ops._utils import REDUCTIONS, VOTING_MODES, acc_dtype, as_float, as_int, check_option, schema_defaults

_ASSIGN = schema_defaults("prediction_guided_assign")
_VOTING = schema_defaults("consistency_voting")
_FOCAL = schema_defaults("sigmoid_focal_loss")

__all__ = ["PseCoAssigner", "ConsistencyVotingWeights", "SigmoidFocalLoss", "ScaleConsistencyLoss",
           "downsample_view"]


def assigner_args(owner: str, iou_thr, topk, alpha) -> Tuple[float, int, float]:
    """The checked options of prediction-guided assignment; TypeError / ValueError naming them."""
    iou_thr, alpha = as_float(owner, "iou_thr", iou_thr), as_float(owner, "alpha", alpha)
    topk = as_int(owner, "topk", topk)
    if not (0 < iou_thr <= 1):
        raise ValueError(f"{owner}: iou_thr must be in (0, 1], got {iou_thr}")
    if topk < 1:
        raise ValueError(f"{owner}: topk must be >= 1, got {topk}")
    if not (0 <= alpha <= 1):
        raise ValueError(f"{owner}: alpha must be in [0, 1], got {alpha}")
    return iou_thr, topk, alpha


class PseCoAssigner(nn.Module):
    """Prediction-guided label assignment (SPEC 2.1) for a whole batch in one call.

    ``forward(boxes, scores, pseudo_boxes, pseudo_labels, valid=None)`` takes
    lists per image (``[P_n, 4]`` teacher boxes, ``[P_n, C]`` teacher class
    probabilities, ``[M_n, 4]`` pseudo boxes, ``[M_n]`` labels, optional
    ``[P_n]`` bool) and returns ``(gt_inds, q)`` lists: ``gt_inds`` 0 for
    background, ``j + 1`` for pseudo box j; ``q`` the assignment quality.
    ``valid=None`` lets every proposal become positive; the official PseCo
    rule is ``valid = (x2 - x1) * (y2 - y1) > 0`` of the proposals in the
    student's view (what ``tbd_ops.mmdet``'s ``PredictionGuidedAssigner``
    applies by default).
    """

    def __init__(self, iou_thr: float = _ASSIGN["iou_thr"], topk: int = _ASSIGN["topk"],
                 alpha: float = _ASSIGN["alpha"]):
        super().__init__()
        self.iou_thr, self.topk, self.alpha = assigner_args("PseCoAssigner", iou_thr, topk, alpha)

    def forward(self, boxes, scores, pseudo_boxes, pseudo_labels, valid=None):
        return tbd_ops.prediction_guided_assign(boxes, scores, pseudo_boxes, pseudo_labels, valid=valid,
                                                iou_thr=self.iou_thr, topk=self.topk, alpha=self.alpha)

    def extra_repr(self) -> str:
        return f"iou_thr={self.iou_thr}, topk={self.topk}, alpha={self.alpha}"


class ConsistencyVotingWeights(nn.Module):
    """Positive-proposal consistency voting (SPEC 2.2).

    ``forward(pred_boxes, gt_inds, pseudo_boxes)`` -> ``(sigma, w, reg_scale)``:
    per pseudo box the mean IoU of its positives, per RoI the regression weight,
    and the batch factor (a 0-d tensor). Constants: no gradient flows.
    """

    def __init__(self, mode: str = _VOTING["mode"]):
        super().__init__()
        self.mode = check_option("ConsistencyVotingWeights", "mode", mode, VOTING_MODES)

    def forward(self, pred_boxes, gt_inds, pseudo_boxes):
        return tbd_ops.consistency_voting(pred_boxes, gt_inds, pseudo_boxes, mode=self.mode)


class FocalLossArgumentError(ValueError, AssertionError):
    """A bad argument to :class:`SigmoidFocalLoss`: a ``ValueError``, and also an
    ``AssertionError`` where mmdet's ``FocalLoss`` asserts on the same input
    (``reduction_override``, the shape of ``weight``), so code written for
    either catches it."""


_OVERRIDES = (None, *REDUCTIONS)


class SigmoidFocalLoss(nn.Module):
    """Fused sigmoid focal loss (SPEC 2.4) with MMDetection's ``FocalLoss`` interface.

    Registered in MMDetection as ``FusedFocalLoss``. It computes what mmdet 3.x's
    ``FocalLoss(use_sigmoid=True)`` computes for integer targets (including
    mmdet's ``weight_reduce_loss`` rules) with the fused kernels:

    ``forward(pred [R, C], target [R], weight=None, avg_factor=None, reduction_override=None)``

    - ``pred``: raw logits of the C foreground classes; ``target``: int64 in
      ``[0, C]``, ``C`` = background (an all-zero one-hot row).
    - ``weight``: ``[R]`` (or ``[R, 1]``) one weight per row, or ``[R, C]`` (or
      the flattened ``[R * C]``) one per element, as mmdet reshapes them.
      Per-row weights go into the fused kernel; per-element weights multiply
      the fused per-element loss.
    - ``reduction`` (``reduction_override`` if given, else the module's):
      ``"none"`` gives the ``[R, C]`` weighted loss, with or without
      ``avg_factor``; ``"sum"`` its sum (``avg_factor`` is an error, as in mmdet);
      ``"mean"`` its mean over the ``R * C`` elements, or with ``avg_factor`` its
      sum divided by ``avg_factor + eps`` (``eps`` = float32's machine epsilon:
      ``avg_factor = 0`` is no division by zero).
    - The result is multiplied by ``loss_weight``.

    ``use_sigmoid`` must be ``True``. Write it in every config: mmdet's dense
    heads read ``use_sigmoid`` from the loss config (default ``False``), not from
    this module, and without it give the head ``C + 1`` class channels, where
    this loss would train background as a class. ``activated=True``
    (probabilities as input) is not supported: ``pred`` are logits.
    Reductions come back in float32 (float64 for float64 logits); 16-bit logits
    are accumulated in float32 (SPEC 0).
    """

    def __init__(self, gamma: float = _FOCAL["gamma"], alpha: float = _FOCAL["alpha"], reduction: str = "mean",
                 loss_weight: float = 1.0, use_sigmoid: bool = True, activated: bool = False):
        super().__init__()
        if use_sigmoid is not True:
            raise ValueError(
                f"SigmoidFocalLoss (FusedFocalLoss): use_sigmoid must be True, got {use_sigmoid!r}. It is a "
                "sigmoid focal loss over the C foreground logits (target C = background); with "
                "use_sigmoid=False mmdet gives the head C + 1 class channels and the loss would train "
                "background as a class. Set use_sigmoid=True in the loss config.")
        if activated:
            raise ValueError(
                f"SigmoidFocalLoss (FusedFocalLoss): activated must be False, got {activated!r}: the fused "
                "loss takes logits, not probabilities (use mmdet's FocalLoss for activated inputs)")
        check_option("SigmoidFocalLoss", "reduction", reduction, REDUCTIONS)
        self.use_sigmoid, self.activated = True, False
        self.gamma = as_float("SigmoidFocalLoss", "gamma", gamma)
        self.alpha = as_float("SigmoidFocalLoss", "alpha", alpha)
        self.reduction = reduction
        self.loss_weight = as_float("SigmoidFocalLoss", "loss_weight", loss_weight)

    def forward(self, pred: Tensor, target: Tensor, weight: Optional[Tensor] = None,
                avg_factor: Optional[Union[float, Tensor]] = None,
                reduction_override: Optional[str] = None) -> Tensor:
        if not (reduction_override is None or
                (isinstance(reduction_override, str) and reduction_override in _OVERRIDES)):
            raise FocalLossArgumentError(
                f"SigmoidFocalLoss: reduction_override must be one of {_OVERRIDES}, got {reduction_override!r}")
        reduction = reduction_override if reduction_override else self.reduction
        if isinstance(pred, Tensor) and isinstance(target, Tensor) and pred.dim() == target.dim():
            raise ValueError(
                f"SigmoidFocalLoss: target must be [R] int64 class indices in [0, C] (C = background), got a "
                f"target of shape {tuple(target.shape)} with the rank of pred {tuple(pred.shape)} (one-hot or "
                "soft targets); the fused loss takes class indices")
        if avg_factor is not None and reduction == "sum":
            raise ValueError('SigmoidFocalLoss: avg_factor can not be used with reduction="sum" (as in mmdet\'s '
                             'weight_reduce_loss); use reduction "mean" to divide the sum by avg_factor')
        row_w, elem_w = self._split_weight(pred, weight)
        kw = dict(gamma=self.gamma, alpha=self.alpha)
        if elem_w is None:
            if reduction == "mean" and avg_factor is not None:
                loss = tbd_ops.sigmoid_focal_loss(pred, target, row_w, reduction="sum", **kw)
                loss = loss / (avg_factor + torch.finfo(torch.float32).eps)
            else:
                loss = tbd_ops.sigmoid_focal_loss(pred, target, row_w, reduction=reduction, **kw)
        elif reduction == "none":
            loss = tbd_ops.sigmoid_focal_loss(pred, target, None, reduction="none", **kw) * elem_w
        else:
            acc = acc_dtype(pred.dtype)
            loss = tbd_ops.sigmoid_focal_loss(pred.to(acc), target, None, reduction="none", **kw) * elem_w.to(acc)
            if avg_factor is not None:
                loss = loss.sum() / (avg_factor + torch.finfo(torch.float32).eps)
            else:
                loss = loss.sum() if reduction == "sum" else loss.mean()
        return self.loss_weight * loss

    @staticmethod
    def _split_weight(pred: Tensor, weight: Optional[Tensor]):
        """mmdet's reshaping of ``weight``: ``(per-row [R] or None, per-element [R, C] or None)``."""
        if weight is None:
            return None, None
        if not isinstance(weight, Tensor) or not isinstance(pred, Tensor) or pred.dim() != 2:
            return weight, None  # the op names what is wrong
        r, c = pred.shape
        if not weight.is_floating_point():
            weight = weight.to(acc_dtype(pred.dtype) if pred.is_floating_point() else torch.float32)
        if weight.dim() == 2 and tuple(weight.shape) == (r, c) and c != 1:
            return None, weight
        if weight.dim() >= 1 and weight.shape[0] == r and weight.numel() == r:
            return weight.reshape(r), None
        if weight.dim() >= 1 and weight.shape[0] != r and weight.numel() == r * c:
            return None, weight.reshape(r, c)
        raise FocalLossArgumentError(
            f"SigmoidFocalLoss: weight must be [R] (or [R, 1]) per row or [R, C] (or [R * C]) per element "
            f"with R = {r}, C = {c}, got {tuple(weight.shape)}")


class ScaleConsistencyLoss(nn.Module):
    """Multi-view scale consistency (SPEC 2.3): ``loss_weight * scale_consistency_loss``.

    ``forward(feats_v1, feats_v2, mask=None)`` with the aligned level lists
    (V1's P3-P7 and V2's P2-P6) and optional per-level masks ``[N, 1, H, W]``.
    """

    def __init__(self, loss_weight: float = 1.0):
        super().__init__()
        self.loss_weight = float(loss_weight)

    def forward(self, feats_v1, feats_v2, mask=None) -> Tensor:
        return tbd_ops.scale_consistency_loss(feats_v1, feats_v2, mask) * self.loss_weight


def downsample_view(images: Tensor, boxes: Optional[Sequence[Tensor]] = None
                    ) -> Tuple[Tensor, Optional[List[Tensor]]]:
    """PseCo's view V2: the images downsampled by 2 (nearest) and the V1 boxes mapped to it.

    ``images`` ``[N, C, H, W]``; ``boxes`` a list of ``[G_n, 4]`` (x1, y1, x2, y2)
    in V1 pixels. Returns ``(images_v2 [N, C, floor(H/2), floor(W/2)], boxes_v2)``,
    the official PseCo code's ``F.interpolate(images, scale_factor=0.5,
    mode="nearest")``: pixel ``(y, x)`` of V2 is pixel ``(2y, 2x)`` of V1 (an odd
    H or W drops V1's last row or column), and every V1 coordinate maps to half
    its value (odd coordinates to ``.5``), without rounding or clipping.
    """
    if not isinstance(images, Tensor) or images.dim() != 4:
        got = tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__
        raise ValueError(f"downsample_view: images must be [N, C, H, W], got {got}")
    v2 = F.interpolate(images, scale_factor=0.5, mode="nearest")
    out_boxes = None
    if boxes is not None:
        out_boxes = []
        for i, b in enumerate(boxes):
            if not isinstance(b, Tensor) or b.dim() != 2 or b.shape[1] != 4:
                got = tuple(b.shape) if isinstance(b, Tensor) else type(b).__name__
                raise ValueError(f"downsample_view: boxes[{i}] must be [G, 4], got {got}")
            out_boxes.append(b * 0.5)
    return v2, out_boxes
