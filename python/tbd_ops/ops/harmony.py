"""Harmony score and harmony distillation loss (SPEC 1.3, 1.4): the Python API of the ops
`harmony_score` and `harmony_distillation_loss` (their C++ and CUDA files are `harmony_score.*` and
`harmony_loss.*`).

``harmony_score`` is elementwise; ``harmony_distillation_loss`` takes every FPN
level at once (one kernel launch for all levels on CUDA) and returns a 0-d
loss. The teacher maps are constants: they never receive a gradient.
"""
import math
from typing import List, Sequence, Union

import torch

from ._utils import (HD_MODES, acc_dtype, as_float, check_option, check_tensor, levels, register_fake,
                     schema_defaults)

Levels = Union[torch.Tensor, Sequence[torch.Tensor]]

_SCORE = "harmony_score"
_LOSS = "harmony_distillation_loss"
DEFAULTS = schema_defaults(_LOSS)  # mode, eps


def harmony_score(p_c: Levels, p_r: Levels) -> Union[torch.Tensor, List[torch.Tensor]]:
    """``HS = 1 - tanh(|p_r - p_c|)``, elementwise.

    Args:
        p_c, p_r: tensors of one shape, dtype and device (any shape and strides),
            or lists/tuples of levels (then both are).

    Returns:
        The score in the input dtype (computed in float32 for 16-bit input);
        a list for list input. Differentiable with respect to both inputs:
        ``dHS/dp_r = -(1 - tanh^2(|d|)) * sign(d)``, ``d = p_r - p_c``
        (``sign(0) = 0``), ``dHS/dp_c = -dHS/dp_r``.
    """
    per_level, is_list = levels(_SCORE, ("p_c", "p_r"), p_c, p_r)
    if is_list:
        return [harmony_score(c, r) for c, r in per_level]
    check_tensor(_SCORE, "p_c", p_c)
    check_tensor(_SCORE, "p_r", p_r)
    return torch.ops.tbd_ops.harmony_score.default(p_c, p_r)


def harmony_distillation_loss(pc_s: Levels, pr_s: Levels, pc_t: Levels, pr_t: Levels,
                              mode: str = DEFAULTS["mode"], eps: float = DEFAULTS["eps"]) -> torch.Tensor:
    """Harmony distillation loss of TBD (SPEC 1.4), summed over the levels.

    With ``HS = harmony_score`` of the teacher (t) and the student (s):

    - ``"plain"``: ``L = sum_l mean_n (1 / (H_l W_l)) sum_hw |HS^t - HS^s|``;
    - ``"iou_guided"`` (default): ``psi = pr_t * sqrt(1 + |pc_t - pc_s|)`` (a
      constant), ``L = sum_l mean_n sum_hw psi |HS^t - HS^s| / max(sum_hw psi, eps)``;
      an image whose ``psi`` is 0 everywhere (no ground truth) contributes 0.

    Args:
        pc_s, pr_s, pc_t, pr_t: lists/tuples of levels, level l ``[N, H_l, W_l]``
            in all four (any strides), one dtype and device; a single tensor is
            one level.
        mode: ``"iou_guided"`` or ``"plain"``.
        eps: floor of the psi normalizer, finite and > 0.

    Returns:
        A 0-d tensor in float32 (float64 for float64 input). ``N = 0`` and levels
        with ``H_l W_l = 0`` contribute 0. Gradients reach ``pc_s`` and ``pr_s``
        (through ``HS^s`` only: psi is detached); the teacher maps never get a
        gradient, even when they require one. Deterministic: fixed-order
        reductions on CPU and CUDA.
    """
    check_option(_LOSS, "mode", mode, HD_MODES)
    eps = as_float(_LOSS, "eps", eps)
    if not math.isfinite(eps) or eps <= 0:
        raise ValueError(f"{_LOSS}: eps must be finite and > 0, got {eps}")
    names = ("pc_s", "pr_s", "pc_t", "pr_t")
    per_level, _ = levels(_LOSS, names, pc_s, pr_s, pc_t, pr_t)
    if not per_level:
        raise ValueError(f"{_LOSS}: pc_s must hold at least one level, got 0")
    for l, maps in enumerate(per_level):
        for name, t in zip(names, maps):
            check_tensor(_LOSS, f"{name}[{l}]", t)
    cs, rs, ct, rt = (list(m) for m in zip(*per_level))
    ct, rt = [t.detach() for t in ct], [t.detach() for t in rt]
    return torch.ops.tbd_ops.harmony_distillation_loss.default(cs, rs, ct, rt, mode, eps)[0]


# ---- fake kernels ---------------------------------------------------------------------------------

def _check_score_fake(name, p_c, p_r):
    torch._check(p_r.shape == p_c.shape,
                 lambda: f"{name}: p_r must have the shape of p_c {tuple(p_c.shape)}, got {tuple(p_r.shape)}")
    torch._check(p_r.dtype == p_c.dtype, lambda: f"{name}: p_r must have the dtype of p_c ({p_c.dtype}), got {p_r.dtype}")


@register_fake("tbd_ops::harmony_score")
def _score_fake(p_c, p_r):
    _check_score_fake(_SCORE, p_c, p_r)
    return torch.empty_like(p_c)


@register_fake("tbd_ops::_harmony_score_backward")
def _score_backward_fake(grad, p_c, p_r, output_mask):
    _check_score_fake("_harmony_score_backward", p_c, p_r)
    gc = torch.empty_like(p_c) if output_mask[0] else p_c.new_empty((0,))
    gr = torch.empty_like(p_r) if output_mask[1] else p_r.new_empty((0,))
    return gc, gr


def _check_loss_fake(name, pc_s, pr_s, pc_t, pr_t, mode):
    torch._check(mode in HD_MODES, lambda: f"{name}: mode must be one of {HD_MODES}, got {mode!r}")
    torch._check(len(pc_s) >= 1, lambda: f"{name}: pc_s must hold at least one level, got 0")
    torch._check(len(pr_s) == len(pc_s) and len(pc_t) == len(pc_s) and len(pr_t) == len(pc_s),
                 lambda: f"{name}: pc_s, pr_s, pc_t and pr_t must hold one map per level")
    first = pc_s[0]
    for l, ref in enumerate(pc_s):
        for t in (ref, pr_s[l], pc_t[l], pr_t[l]):
            torch._check(t.dim() == 3, lambda: f"{name}: level {l} must be [N, H, W], got {t.dim()}-D")
            torch._check(t.shape == ref.shape, lambda: f"{name}: the maps of level {l} must have one shape")
            torch._check(t.dtype == first.dtype, lambda: f"{name}: every map must have the dtype of pc_s[0]")
        torch._check(ref.shape[0] == first.shape[0], lambda: f"{name}: every level must hold N images")


@register_fake("tbd_ops::harmony_distillation_loss")
def _loss_fake(pc_s, pr_s, pc_t, pr_t, mode=DEFAULTS["mode"], eps=DEFAULTS["eps"]):
    _check_loss_fake(_LOSS, pc_s, pr_s, pc_t, pr_t, mode)
    acc = acc_dtype(pc_s[0].dtype)
    return pc_s[0].new_empty((), dtype=acc), pc_s[0].new_empty((len(pc_s), pc_s[0].shape[0]), dtype=acc)


@register_fake("tbd_ops::_harmony_distillation_loss_backward")
def _loss_backward_fake(grad, norm, pc_s, pr_s, pc_t, pr_t, mode, output_mask):
    _check_loss_fake("_harmony_distillation_loss_backward", pc_s, pr_s, pc_t, pr_t, mode)
    gc = [torch.empty_like(t) for t in pc_s] if output_mask[0] else []
    gr = [torch.empty_like(t) for t in pr_s] if output_mask[1] else []
    return gc, gr
