"""PseCo multi-view scale consistency (SPEC 2.3) on the masked-L2 kernel.

``torch.ops.tbd_ops.scale_consistency_loss`` is a composite operator: it calls
``masked_sq_dist`` once for all aligned level pairs (one launch sequence on
CUDA), so autograd, the fake kernels, AMP and ``torch.compile`` come from that op.
"""
from typing import List, Optional, Sequence, Union

import torch

from ._utils import check_tensor, levels, same_dtype_and_device

_OP = "scale_consistency_loss"

torch.library.define(
    "tbd_ops::scale_consistency_loss", "(Tensor[] feats_v1, Tensor[] feats_v2, Tensor?[] mask) -> Tensor")


@torch.library.impl("tbd_ops::scale_consistency_loss", "CompositeImplicitAutograd")
def _scale_consistency_loss(feats_v1, feats_v2, mask):
    masks = []
    for f1, m in zip(feats_v1, mask):
        n, _, h, w = f1.shape
        masks.append(f1.new_ones(()).expand(n, 1, h, w) if m is None else m.to(f1.dtype))
    if same_dtype_and_device(list(feats_v1)):
        dists = torch.ops.tbd_ops._masked_sq_dist_levels.default(list(feats_v1), list(feats_v2), masks)[0]
    else:
        dists = [torch.ops.tbd_ops.masked_sq_dist.default(f1, f2, m) for f1, f2, m in zip(feats_v1, feats_v2, masks)]
    total = None
    for f1, d in zip(feats_v1, dists):  # d: [N, 1]
        n, _, h, w = f1.shape
        term = d.sum() / (max(n, 1) * max(h * w, 1))
        total = term if total is None else total + term
    return total


def scale_consistency_loss(
    feats_v1: Union[torch.Tensor, Sequence[torch.Tensor]],
    feats_v2: Union[torch.Tensor, Sequence[torch.Tensor]],
    mask: Optional[Union[torch.Tensor, Sequence[Optional[torch.Tensor]]]] = None,
) -> torch.Tensor:
    """``sum over level pairs of mean_n sum_hw mask * sum_c (F1 - F2)^2 / (H W)``.

    Args:
        feats_v1, feats_v2: the aligned levels of the two views (V1's P3-P7 and
            V2's P2-P6: identical shapes ``[N, C, H, W]`` pair by pair), one
            tensor or a list of levels.
        mask: optional spatial weights ``[N, 1, H, W]`` per level (a list, or
            one tensor for a single level), None for all ones.

    Returns:
        A 0-d tensor in float32 (float64 for float64 features); gradients flow
        into both views (and the masks).
    """
    per_level, _ = levels(_OP, ("feats_v1", "feats_v2", "mask"), feats_v1, feats_v2, mask, broadcast=("mask",))
    if not per_level:
        raise ValueError(f"{_OP}: feats_v1 must hold at least one level")
    v1, v2, masks = (list(x) for x in zip(*per_level))
    for l, (f1, f2, m) in enumerate(per_level):
        check_tensor(_OP, f"feats_v1[{l}]", f1)
        check_tensor(_OP, f"feats_v2[{l}]", f2)
        if f1.dim() != 4:
            raise ValueError(f"{_OP}: feats_v1[{l}] must be [N, C, H, W], got shape {tuple(f1.shape)}")
        if f2.shape != f1.shape:
            raise ValueError(f"{_OP}: feats_v2[{l}] must have the shape of feats_v1[{l}] {tuple(f1.shape)} "
                             f"(aligned levels of the two views), got {tuple(f2.shape)}")
        if f2.dtype != f1.dtype or f2.device != f1.device:
            raise ValueError(f"{_OP}: feats_v2[{l}] must have the dtype and device of feats_v1[{l}] "
                             f"({f1.dtype}, {f1.device}), got ({f2.dtype}, {f2.device})")
        if m is not None:
            check_tensor(_OP, f"mask[{l}]", m)
            n, _, h, w = f1.shape
            if tuple(m.shape) != (n, 1, h, w):
                raise ValueError(f"{_OP}: mask[{l}] must be [N, 1, H, W] = [{n}, 1, {h}, {w}], got {tuple(m.shape)}")
            if m.device != f1.device:
                raise ValueError(f"{_OP}: mask[{l}] must be on {f1.device}, got {m.device}")
    return torch.ops.tbd_ops.scale_consistency_loss.default(v1, v2, masks)
