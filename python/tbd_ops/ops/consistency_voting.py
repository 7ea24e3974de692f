"""PseCo's positive-proposal consistency voting (SPEC 2.2), the whole batch per launch."""
from typing import List, Optional, Sequence, Tuple

import torch

from ._utils import (VOTING_MODES, acc_dtype, cat_images, check_option, check_rows, image_list, register_fake,
                     schema_defaults)

_OP = "consistency_voting"
DEFAULTS = schema_defaults(_OP)  # mode


def consistency_voting(
    pred_boxes: Sequence[torch.Tensor],
    gt_inds: Sequence[torch.Tensor],
    pseudo_boxes: Sequence[torch.Tensor],
    mode: str = DEFAULTS["mode"],
) -> Tuple[List[torch.Tensor], List[torch.Tensor], torch.Tensor]:
    """Positive-proposal consistency voting of PseCo, for a batch of images.

    ``sigma_j`` is the mean IoU between the predicted boxes of the positives of
    pseudo box j (``gt_inds[r] = j + 1``) and the pseudo box (IoU with eps 1e-6
    as everywhere in tbd_ops; 0 for a pseudo box without positives). Per RoI
    ``w[r] = sigma_{gt_inds[r] - 1}^2`` for positives, 0 for background; the
    batch factor ``reg_scale = sum_r sigma(r) / max(sum_r sigma(r)^2, 1e-6)``
    over all positives of the batch (0 when there is none). ``mode="paper"``:
    ``w = sigma`` and ``reg_scale = 1``.

    All images run in one launch (a few small follow-up kernels); nothing
    synchronizes with the host; the sums run in a fixed order (deterministic).

    Args:
        pred_boxes: N tensors ``[R_n, 4]`` (the student's decoded boxes of the RoIs).
        gt_inds: N int64 tensors ``[R_n]``: 0 background, ``j + 1`` positive of
            pseudo box j. The CPU kernel raises ``ValueError`` on a value outside
            ``[0, M_n]``; the CUDA kernels count such a RoI as background (they
            never index with it).
        pseudo_boxes: N tensors ``[M_n, 4]`` in the dtype of ``pred_boxes``
            (``M_n`` may be 0).
        mode: ``"pseco"`` (PseCo's implementation) or ``"paper"``.

    Returns:
        ``(sigma, w, reg_scale)``: lists of N tensors ``[M_n]`` and ``[R_n]`` and
        a 0-d tensor, in float32 (float64 for float64 boxes). Constants: no
        gradient flows through them.
    """
    check_option(_OP, "mode", mode, VOTING_MODES)
    pred_boxes = image_list(_OP, "pred_boxes", pred_boxes, None)
    n = len(pred_boxes)
    gt_inds = image_list(_OP, "gt_inds", gt_inds, n)
    pseudo_boxes = image_list(_OP, "pseudo_boxes", pseudo_boxes, n)
    if n == 0:
        return [], [], torch.tensor(1.0 if mode == "paper" else 0.0)
    for i in range(n):
        check_rows(_OP, "pred_boxes", pred_boxes, i, "R", 4)
        check_rows(_OP, "gt_inds", gt_inds, i, "R", like=("pred_boxes", pred_boxes))
        check_rows(_OP, "pseudo_boxes", pseudo_boxes, i, "M", 4)
    r_counts = [b.shape[0] for b in pred_boxes]
    m_counts = [g.shape[0] for g in pseudo_boxes]
    sigma, w, reg_scale = torch.ops.tbd_ops.consistency_voting.default(
        cat_images(pred_boxes), cat_images(gt_inds), cat_images(pseudo_boxes), r_counts, m_counts, mode)
    return list(sigma.split(m_counts)), list(w.split(r_counts)), reg_scale


@register_fake("tbd_ops::consistency_voting")
def _fake(pred_boxes, gt_inds, pseudo_boxes, roi_counts, pseudo_counts, mode=DEFAULTS["mode"]):
    torch._check(mode in VOTING_MODES, lambda: f"{_OP}: mode must be one of {VOTING_MODES}, got {mode!r}")
    torch._check(pred_boxes.dim() == 2 and pred_boxes.shape[1] == 4, lambda: f"{_OP}: pred_boxes must be [R, 4]")
    torch._check(pseudo_boxes.dim() == 2 and pseudo_boxes.shape[1] == 4, lambda: f"{_OP}: pseudo_boxes must be [M, 4]")
    torch._check(gt_inds.dim() == 1 and gt_inds.shape[0] == pred_boxes.shape[0],
                 lambda: f"{_OP}: gt_inds must be [R] with R the rows of pred_boxes")
    torch._check(len(roi_counts) == len(pseudo_counts),
                 lambda: f"{_OP}: roi_counts and pseudo_counts must have one count per image each")
    acc = acc_dtype(pred_boxes.dtype)
    return (pseudo_boxes.new_empty((pseudo_boxes.shape[0],), dtype=acc),
            pred_boxes.new_empty((pred_boxes.shape[0],), dtype=acc),
            pred_boxes.new_empty((), dtype=acc))
