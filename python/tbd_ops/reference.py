"""Pure-PyTorch reference implementations, same signatures as the fused ops.

They favour clarity over speed and memory (``decode_max_iou`` here does form
the predictions x ground-truth IoU matrix); tests and benchmarks compare the
kernels against them. Computation happens in float32 (float64 for float64
inputs), as in the kernels.
"""
import math
from fractions import Fraction
from typing import List, Optional, Sequence, Union

import torch

from .ops._utils import CODERS, HD_MODES, REDUCTIONS, VOTING_MODES, acc_dtype, check_option, levels, schema_defaults

__all__ = ["channel_max_spatial_softmax", "decode_max_iou", "box_max_iou", "decode_boxes", "pairwise_iou"]
__all__ += ["prediction_guided_assign"]


# The defaults of the ops (from their schemas).
_PC = schema_defaults("channel_max_spatial_softmax")
_PR = schema_defaults("decode_max_iou")
_HD = schema_defaults("harmony_distillation_loss")
_ASSIGN = schema_defaults("prediction_guided_assign")
_FOCAL = schema_defaults("sigmoid_focal_loss")
_VOTING = schema_defaults("consistency_voting")


def _acc(t: torch.Tensor) -> torch.Tensor:
    return t.to(acc_dtype(t.dtype))


def channel_max_spatial_softmax(x, temperature: float = _PC["temperature"], scale_by_hw: bool = _PC["scale_by_hw"]):
    """``softmax over H*W of (max_k x[n, k]) / T`` -> ``[N, H, W]`` (list for list input)."""
    per_level, is_list = levels("channel_max_spatial_softmax", ("x",), x)
    if is_list:
        return [channel_max_spatial_softmax(t, temperature, scale_by_hw) for (t,) in per_level]
    n, _, h, w = x.shape
    z = _acc(x).max(dim=1).values  # ties: lowest channel, as the kernels
    p = torch.softmax((z / temperature).reshape(n, h * w), dim=1).reshape(n, h, w)
    if scale_by_hw:
        p = p * (h * w)
    return p.to(x.dtype)


def decode_boxes(bbox_pred, priors, *, coder=_PR["coder"], means=_PR["means"], stds=_PR["stds"],
                 scale=_PR["scale"], max_shape=None, wh_ratio_clip=_PR["wh_ratio_clip"]) -> torch.Tensor:
    """Decoded boxes ``[N, P, 4]`` with MMDetection's formulas, operation by operation."""
    if bbox_pred.dim() == 4:
        n, c, h, w = bbox_pred.shape
        pred = bbox_pred.reshape(n, c // 4, 4, h, w).permute(0, 3, 4, 1, 2).reshape(n, h * w * (c // 4), 4)
    else:
        pred = bbox_pred
    pred = _acc(pred)
    if coder == "delta_xywh":
        rois = _acc(priors)[None]
        denorm = pred * pred.new_tensor(stds) + pred.new_tensor(means)
        dxy, dwh = denorm[..., :2], denorm[..., 2:]
        pxy = (rois[..., :2] + rois[..., 2:]) * 0.5
        pwh = rois[..., 2:] - rois[..., :2]
        dxy_wh = pwh * dxy
        max_ratio = abs(math.log(wh_ratio_clip))
        dwh = dwh.clamp(min=-max_ratio, max=max_ratio)
        gxy = pxy + dxy_wh
        gwh = pwh * dwh.exp()
        boxes = torch.cat([gxy - gwh * 0.5, gxy + gwh * 0.5], dim=-1)
    elif coder == "distance":
        pts = _acc(priors)[None, :, :2]
        d = pred * scale
        boxes = torch.stack([pts[..., 0] - d[..., 0], pts[..., 1] - d[..., 1],
                             pts[..., 0] + d[..., 2], pts[..., 1] + d[..., 3]], dim=-1)
    else:
        check_option("decode_boxes", "coder", coder, CODERS)
        boxes = pred
    if max_shape is None:
        return boxes
    per_image = (isinstance(max_shape, torch.Tensor) and max_shape.dim() == 2) or (
        isinstance(max_shape, (list, tuple)) and len(max_shape) > 0
        and isinstance(max_shape[0], (list, tuple, torch.Tensor)))
    if per_image:  # one (h, w) per image: [N, 2] tensor or list of N pairs
        hw = torch.as_tensor([[float(v) for v in s[:2]] for s in max_shape]
                             if not isinstance(max_shape, torch.Tensor) else max_shape)
        hw = hw.to(device=boxes.device, dtype=boxes.dtype).reshape(-1, 1, 2)
        zero = torch.zeros((), dtype=boxes.dtype, device=boxes.device)
        mh, mw = hw[..., 0], hw[..., 1]  # [N, 1]
        return torch.stack([boxes[..., 0].clamp(zero, mw), boxes[..., 1].clamp(zero, mh),
                            boxes[..., 2].clamp(zero, mw), boxes[..., 3].clamp(zero, mh)], dim=-1)
    mh, mw = float(max_shape[0]), float(max_shape[1])
    return torch.stack([boxes[..., 0].clamp(0, mw), boxes[..., 1].clamp(0, mh),
                        boxes[..., 2].clamp(0, mw), boxes[..., 3].clamp(0, mh)], dim=-1)


def pairwise_iou(boxes: torch.Tensor, gts: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """IoU matrix ``[P, G]``: ``inter / max(union, eps)``, degenerate boxes have area 0."""
    def area(b):
        return (b[..., 2] - b[..., 0]).clamp(min=0) * (b[..., 3] - b[..., 1]).clamp(min=0)

    lt = torch.maximum(boxes[:, None, :2], gts[None, :, :2])
    rb = torch.minimum(boxes[:, None, 2:], gts[None, :, 2:])
    wh = (rb - lt).clamp(min=0)
    inter = wh[..., 0] * wh[..., 1]
    union = area(boxes)[:, None] + area(gts)[None, :] - inter
    return inter / union.clamp(min=eps)


def _gt_list(gt_bboxes, n):
    if isinstance(gt_bboxes, torch.Tensor):
        return list(gt_bboxes.unbind(0))
    return list(gt_bboxes)


def decode_max_iou(bbox_pred, priors, gt_bboxes, *, coder=_PR["coder"], means=_PR["means"], stds=_PR["stds"],
                   scale=_PR["scale"], max_shape=None, wh_ratio_clip=_PR["wh_ratio_clip"]):
    """Decode, form the full IoU matrix per image, take its max -> ``(iou [N, P], arg [N, P])``."""
    per_level, is_list = levels("decode_max_iou", ("bbox_pred", "priors", "scale"), bbox_pred, priors, scale,
                                broadcast=("priors", "scale"))
    if is_list:
        return [decode_max_iou(b, p, gt_bboxes, coder=coder, means=means, stds=stds, scale=s,
                               max_shape=max_shape, wh_ratio_clip=wh_ratio_clip)
                for b, p, s in per_level]
    boxes = decode_boxes(bbox_pred, priors, coder=coder, means=means, stds=stds, scale=scale,
                         max_shape=max_shape, wh_ratio_clip=wh_ratio_clip)
    n, p = boxes.shape[0], boxes.shape[1]
    ious, args = [], []
    for i, g in enumerate(_gt_list(gt_bboxes, n)):
        if g.shape[0] == 0:
            ious.append(boxes.new_zeros(p) + 0 * boxes[i].sum())
            args.append(torch.full((p,), -1, dtype=torch.long, device=boxes.device))
            continue
        v, a = pairwise_iou(boxes[i], _acc(g)).max(dim=1)  # ties: lowest index
        ious.append(v)
        args.append(a)
    if n == 0:
        return boxes.new_zeros((0, p)).to(bbox_pred.dtype), torch.zeros((0, p), dtype=torch.long, device=boxes.device)
    return torch.stack(ious).to(bbox_pred.dtype), torch.stack(args)


def box_max_iou(boxes, gt_bboxes):
    """Max IoU of decoded boxes ``[N, P, 4]`` over each image's ground truths."""
    per_level, is_list = levels("box_max_iou", ("boxes",), boxes)
    if is_list:
        return [box_max_iou(b, gt_bboxes) for (b,) in per_level]
    return decode_max_iou(boxes, None, gt_bboxes, coder="none")


def tbd_probabilities(cls_scores, bbox_preds, priors, gt_bboxes, *, coder="delta_xywh", scale=1.0, max_shape=None,
                      temperature: float = 1.0, scale_by_hw: bool = False, **coder_kwargs):
    """TBD's two maps of every FPN level from raw one-stage head outputs: ``(p_c, p_r)``, lists of ``[N, H_l, W_l]``.

    ``p_c``: ``channel_max_spatial_softmax`` of the ``[N, A*C, H, W]`` logits (SPEC 1.1); ``p_r``: per
    location the max over its A anchors of ``decode_max_iou`` of the ``[N, A*4, H, W]`` predictions
    (SPEC 1.2; prior ``(h*W + w)*A + a``). ``scale``: one number or one per level; ``max_shape``:
    None, one ``(h, w)`` or one per image; ``coder_kwargs``: means, stds, wh_ratio_clip.
    """
    p_c = channel_max_spatial_softmax(list(cls_scores), temperature, scale_by_hw)
    ious = decode_max_iou(list(bbox_preds), priors, gt_bboxes, coder=coder, scale=scale, max_shape=max_shape,
                          **coder_kwargs)
    p_r = []
    for (iou, _), b in zip(ious, bbox_preds):
        n, a4, h, w = b.shape
        p_r.append(iou.view(n, h, w, a4 // 4).amax(-1))
    return p_c, p_r


__all__ += ["tbd_probabilities"]


# ---- masked reductions (SPEC 1.5) ----
__all__ += ["masked_sq_dist", "masked_l1"]


def _masked_reduce(term, a, b, masks):
    per_level, is_list = levels("masked_reduce", ("a", "b", "masks"), a, b, masks)
    if is_list:
        return [_masked_reduce(term, x, y, m) for x, y, m in per_level]
    s = term(_acc(a) - _acc(b)).sum(dim=1, keepdim=True)  # [N, 1, H, W]
    return (_acc(masks) * s).sum(dim=(2, 3))


def masked_sq_dist(a, b, masks):
    """``sum_hw masks[n, k] * sum_c (a - b)^2`` -> ``[N, K]`` (float32, or float64 for float64)."""
    return _masked_reduce(lambda d: d * d, a, b, masks)


def masked_l1(a, b, masks):
    """``sum_hw masks[n, k] * sum_c |a - b|`` -> ``[N, K]`` (float32, or float64 for float64)."""
    return _masked_reduce(torch.abs, a, b, masks)


# ---- harmony score and harmony distillation loss (SPEC 1.3, 1.4) ----
__all__ += ["harmony_score", "harmony_distillation_loss"]


def harmony_score(p_c, p_r):
    """``1 - tanh(|p_r - p_c|)`` in the dtype of ``p_c`` (list for list input)."""
    per_level, is_list = levels("harmony_score", ("p_c", "p_r"), p_c, p_r)
    if is_list:
        return [harmony_score(c, r) for c, r in per_level]
    return (1 - torch.tanh((_acc(p_r) - _acc(p_c)).abs())).to(p_c.dtype)


def harmony_distillation_loss(pc_s, pr_s, pc_t, pr_t, mode: str = _HD["mode"], eps: float = _HD["eps"]):
    """``sum_l mean_n`` of the per-image HD term; the teacher maps and psi are constants."""
    check_option("harmony_distillation_loss", "mode", mode, HD_MODES)

    per_level, _ = levels("harmony_distillation_loss", ("pc_s", "pr_s", "pc_t", "pr_t"), pc_s, pr_s, pc_t, pr_t)
    total = None
    for cs, rs, ct, rt in per_level:
        cs, rs, ct, rt = _acc(cs), _acc(rs), _acc(ct).detach(), _acc(rt).detach()
        n, h, w = cs.shape
        hs_s = 1 - torch.tanh((rs - cs).abs())
        hs_t = 1 - torch.tanh((rt - ct).abs())
        diff = (hs_t - hs_s).abs()
        if h * w == 0:
            per_image = diff.sum((1, 2))  # zeros, still part of the graph
        elif mode == "plain":
            per_image = diff.sum((1, 2)) / (h * w)
        else:
            psi = rt * torch.sqrt(1 + (ct - cs.detach()).abs())
            per_image = (psi * diff).sum((1, 2)) / psi.sum((1, 2)).clamp(min=eps)
        term = per_image.mean() if n else per_image.sum()  # N = 0: 0, not the NaN of an empty mean
        total = term if total is None else total + term
    return total


# ---- scale_consistency_loss (SPEC 2.3) ----------------------------------------------------------
def scale_consistency_loss(feats_v1, feats_v2, mask=None):
    """``sum over level pairs of mean_n sum_hw mask * sum_c (F1 - F2)^2 / (H W)``."""
    per_level, _ = levels("scale_consistency_loss", ("feats_v1", "feats_v2", "mask"), feats_v1, feats_v2, mask,
                          broadcast=("mask",))
    total = 0
    for f1, f2, m in per_level:
        n, _, h, w = f1.shape
        d = ((_acc(f1) - _acc(f2)) ** 2).sum(1, keepdim=True)
        if m is not None:
            d = d * _acc(m)
        # An empty level adds 0, as a function of the inputs (their gradients are zeros, not absent).
        per_image = d.sum((1, 2, 3)) / (h * w) if h * w else d.sum((1, 2, 3))
        total = total + (per_image.mean() if n else d.sum())
    return total
__all__ += ["scale_consistency_loss"]

def prediction_guided_assign(boxes, scores, pseudo_boxes, pseudo_labels, valid=None,
                             iou_thr: float = _ASSIGN["iou_thr"], topk: int = _ASSIGN["topk"],
                             alpha: float = _ASSIGN["alpha"]):
    """PseCo's prediction-guided label assignment, image by image and pseudo box by pseudo box.

    Per image: the full ``[P, M]`` IoU matrix, its max over pseudo boxes (lowest
    index on ties); per pseudo box j the bag ``{p : j*(p) = j, u[p] >= iou_thr}``;
    ``k = max(1, floor(sum))`` of the exact sum (in rationals, no rounding) of
    the ``min(|bag|, topk)`` largest u, so a sum that is exactly an integer
    gives that integer (the official code's float32 ``topk(...).sum()`` does
    for PseCo's example 1 + .85 + .85 + .75 + .65 + .45 + .45 = 5, where a
    float32 running sum gives 4.9999995); the
    ``k`` members first in a stable descending sort of q (NaN first) become
    positives ``j + 1`` unless ``valid`` is False. ``q = s^alpha * u^(1-alpha)``
    of every proposal against ``j*(p)`` (0 without pseudo boxes), in the dtype of
    ``scores``. Returns ``(gt_inds list, q list)``.
    """
    gt_out, q_out = [], []
    for i in range(len(boxes)):
        b, g = _acc(boxes[i]), _acc(pseudo_boxes[i])
        p, m = b.shape[0], g.shape[0]
        gt = torch.zeros(p, dtype=torch.long, device=b.device)
        if m == 0 or p == 0:
            gt_out.append(gt)
            q_out.append(torch.zeros(p, dtype=scores[i].dtype, device=b.device))
            continue
        u, jstar = pairwise_iou(b, g).max(dim=1)
        s = _acc(scores[i]).gather(1, pseudo_labels[i][jstar][:, None]).squeeze(1)
        q = s.pow(alpha) * u.pow(1.0 - alpha)
        in_bag = u >= torch.tensor(iou_thr, dtype=u.dtype)
        for j in range(m):
            members = torch.nonzero((jstar == j) & in_bag).squeeze(1)
            if members.numel() == 0:
                continue
            top_u = torch.sort(u[members], descending=True, stable=True).values[:topk]
            total = sum((Fraction(v) for v in top_u.tolist()), Fraction(0))  # exact
            k = max(1, math.floor(total))
            keep = members[torch.sort(q[members], descending=True, stable=True).indices[:k]]
            if valid is not None:
                keep = keep[valid[i][keep]]
            gt[keep] = j + 1
        gt_out.append(gt)
        q_out.append(q.to(scores[i].dtype))
    return gt_out, q_out


# ---- sigmoid_focal_loss (SPEC 2.4) --------------------------------------------------------------
_FOCAL_LOG_MIN = math.log(torch.finfo(torch.float32).tiny)  # log(FLT_MIN)


def _clamped_log(log_v: torch.Tensor) -> torch.Tensor:
    """``log_v`` clamped below at log(FLT_MIN); its gradient is 1 wherever ``log_v`` is finite (as
    mmcv's backward). At an infinite logit (``log_v = -inf``) the value is the clamp, not NaN."""
    through = log_v - log_v.detach()
    return log_v.detach().clamp(min=_FOCAL_LOG_MIN) + torch.where(torch.isfinite(log_v), through,
                                                                  torch.zeros_like(through))


def sigmoid_focal_loss(logits, targets, weight=None, gamma: float = _FOCAL["gamma"], alpha: float = _FOCAL["alpha"],
                       reduction: str = _FOCAL["reduction"]):
    """RetinaNet's sigmoid focal loss on one-hot targets (``targets == C``: background).

    ``-alpha (1-p)^gamma log p`` (target 1), ``-(1-alpha) p^gamma log(1-p)`` (target 0),
    times ``weight[r]``; p and 1 - p as sigmoid(x) and sigmoid(-x), the logs as
    log-sigmoids clamped below at log(FLT_MIN). ``"none"``: ``[R, C]`` in the dtype
    of logits; ``"sum"``/``"mean"`` (over R * C elements): 0-d float32 (float64 for
    float64).
    """
    check_option("sigmoid_focal_loss", "reduction", reduction, REDUCTIONS)
    x = _acc(logits)
    r, c = x.shape
    t = torch.nn.functional.one_hot(targets, c + 1)[:, :c].to(x.dtype) if r else x.new_zeros(r, c)
    p, q = torch.sigmoid(x), torch.sigmoid(-x)
    log_p = _clamped_log(torch.nn.functional.logsigmoid(x))
    log_q = _clamped_log(torch.nn.functional.logsigmoid(-x))
    loss = -alpha * q.pow(gamma) * log_p * t - (1.0 - alpha) * p.pow(gamma) * log_q * (1.0 - t)
    if weight is not None:
        loss = loss * _acc(weight).to(x.dtype)[:, None]
    if reduction == "none":
        return loss.to(logits.dtype)
    if reduction == "sum":
        return loss.sum()
    return loss.mean()
__all__ += ["sigmoid_focal_loss"]


# ---- consistency_voting (SPEC 2.2) --------------------------------------------------------------
def consistency_voting(pred_boxes, gt_inds, pseudo_boxes, mode: str = _VOTING["mode"]):
    """Consistency voting image by image and pseudo box by pseudo box.

    ``sigma_j`` = mean IoU of the positives of pseudo box j (0 without); ``w[r]`` =
    ``sigma^2`` ("pseco") or ``sigma`` ("paper") of the RoI's pseudo box, 0 for
    background; ``reg_scale = sum sigma(r) / max(sum sigma(r)^2, 1e-6)`` over the
    batch's positives ("pseco"; 0 without positives) or 1 ("paper"). Float32
    (float64 for float64 boxes). Returns ``(sigma list, w list, reg_scale)``.
    """
    check_option("consistency_voting", "mode", mode, VOTING_MODES)
    dtype = _acc(pred_boxes[0]).dtype if len(pred_boxes) else torch.float32
    device = pred_boxes[0].device if len(pred_boxes) else torch.device("cpu")
    sig_out, w_out = [], []
    num = torch.zeros((), dtype=dtype, device=device)
    den = torch.zeros((), dtype=dtype, device=device)
    for i in range(len(pred_boxes)):
        b, g, gi = _acc(pred_boxes[i]), _acc(pseudo_boxes[i]), gt_inds[i]
        m = g.shape[0]
        if gi.numel() and (int(gi.min()) < 0 or int(gi.max()) > m):
            raise ValueError(f"consistency_voting: gt_inds[{i}] must lie in [0, {m}]")
        sigma = torch.zeros(m, dtype=dtype, device=device)
        for j in range(m):
            mask = gi == j + 1
            if bool(mask.any()):
                sigma[j] = pairwise_iou(b[mask], g[j:j + 1])[:, 0].mean()
        pos = gi > 0
        s_r = sigma[gi[pos] - 1]
        w = torch.zeros(b.shape[0], dtype=dtype, device=device)
        w[pos] = s_r * s_r if mode == "pseco" else s_r
        num = num + s_r.sum()
        den = den + (s_r * s_r).sum()
        sig_out.append(sigma)
        w_out.append(w)
    if mode == "paper":
        return sig_out, w_out, torch.ones((), dtype=dtype, device=device)
    return sig_out, w_out, num / den.clamp(min=1e-6)
__all__ += ["consistency_voting"]
