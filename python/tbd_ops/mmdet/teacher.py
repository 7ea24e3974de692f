"""The frozen teacher of a distiller: built from its own config, checked against the student.

* ``build_teacher``: the teacher model from a config (file path, ``mmdet::`` name,
  ``Config`` or dict) and an optional checkpoint loaded strictly (every key, every
  shape; see ``checkpoint.py``), its parameters frozen.
* ``InputConverter``: the student's normalized batch turned into the teacher's
  normalization (per-channel affine map plus channel order, padding set to the
  teacher's pad value), exactly what the teacher's own ``data_preprocessor``
  would have produced from the same images.
* ``coder_from_head``: how a dense head's ``bbox_pred`` decodes, in the mode
  (training or eval) the head runs in.
"""
import copy
from pathlib import Path
from typing import List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn

from mmengine.config import Config
from mmengine.hub import get_config
from mmengine.logging import print_log
from mmdet.registry import MODELS

from .checkpoint import load_state_dict_strict

__all__ = ["build_teacher", "InputConverter", "coder_from_head", "head_strides"]


def _model_cfg(teacher_config) -> dict:
    if isinstance(teacher_config, (str, Path)):
        path = str(teacher_config)
        # "mmdet::retinanet/..." names a config shipped with a package.
        teacher_config = get_config(path) if "::" in path else Config.fromfile(path)
    if not isinstance(teacher_config, (dict, Config)):
        raise TypeError("teacher_config must be a config file path, an 'mmdet::...' name, a Config or a dict, "
                        f"got {type(teacher_config).__name__}")
    cfg = copy.deepcopy(dict(teacher_config))
    model = cfg["model"] if "model" in cfg else cfg
    if "type" not in model:
        raise ValueError("teacher_config must hold a model config (a dict with 'type', or a config with 'model'), "
                         f"got keys {sorted(model)}")
    return model


def build_teacher(owner: str, teacher_config, teacher_ckpt: Optional[str]) -> nn.Module:
    """The teacher from its config and checkpoint, frozen (no parameter requires grad)."""
    teacher = MODELS.build(_model_cfg(teacher_config))
    if teacher_ckpt is not None:
        load_state_dict_strict(teacher, str(teacher_ckpt), what="teacher_ckpt")
    else:
        print_log(f"{owner}: teacher_ckpt is None, the teacher keeps the random weights of its initialization "
                  "(set teacher_ckpt to the teacher's trained checkpoint)", logger="current", level=30)
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher


def head_strides(head: nn.Module) -> List[float]:
    return [float(s[0] if isinstance(s, (tuple, list)) else s) for s in head.prior_generator.strides]


def _is_fcos_forward(head: nn.Module) -> bool:
    from mmdet.models.dense_heads import FCOSHead

    return isinstance(head, FCOSHead) and type(head).forward_single is FCOSHead.forward_single


def _outputs_deltas(head: nn.Module) -> bool:
    """Whether the head's forward returns its conv outputs as DeltaXYWHBBoxCoder deltas: the
    forward of mmdet's RetinaNet, RPN, ATSS (and PAA), FreeAnchor and NAS-FPN RetinaNet heads,
    not overridden. Others with that coder output something else (TOODHead: boxes already
    decoded; GARetinaHead: deltas on guided anchors; SSDHead: per-level prior counts)."""
    from mmdet.models.dense_heads import AnchorHead, ATSSHead, RetinaHead, RetinaSepBNHead, RPNHead

    cls = type(head)
    return (cls.forward, cls.forward_single) in {
        (AnchorHead.forward, AnchorHead.forward_single), (AnchorHead.forward, RetinaHead.forward_single),
        (AnchorHead.forward, RPNHead.forward_single), (ATSSHead.forward, ATSSHead.forward_single),
        (RetinaSepBNHead.forward, AnchorHead.forward_single)}


_SUPPORTED = ("supported: RetinaHead, ATSSHead, PAAHead, FreeAnchorRetinaHead, RetinaSepBNHead and RPNHead with "
              "DeltaXYWHBBoxCoder; FCOSHead with DistancePointBBoxCoder")


def coder_from_head(head: nn.Module, training: Optional[bool] = None) -> Tuple[str, dict]:
    """``(coder, coder_cfg)`` of ``TBDLoss`` for the ``bbox_pred`` of an mmdet dense head.

    ``training``: the mode the head runs in (default: ``head.training``). It
    matters for mmdet's ``FCOSHead`` with ``norm_on_bbox``: in training mode it
    outputs distances in units of the stride (``scales`` = strides), in eval mode
    it has already multiplied them by the stride (``scales`` = 1).
    """
    training = head.training if training is None else bool(training)
    bbox_coder = getattr(head, "bbox_coder", None)
    name = type(bbox_coder).__name__ if bbox_coder is not None else None
    if not getattr(head, "use_sigmoid_cls", True):
        raise NotImplementedError(
            f"TBD distillation needs sigmoid class scores; {type(head).__name__} classifies with a softmax "
            "(loss_cls use_sigmoid=False), whose channels include background: set use_sigmoid=True in its loss_cls")
    if name == "DeltaXYWHBBoxCoder" and _outputs_deltas(head):
        if getattr(bbox_coder, "add_ctr_clamp", False):
            raise NotImplementedError(f"{type(head).__name__}: DeltaXYWHBBoxCoder(add_ctr_clamp=True) is not supported")
        return "delta_xywh", dict(means=tuple(float(m) for m in bbox_coder.means),
                                  stds=tuple(float(s) for s in bbox_coder.stds))
    if name == "DistancePointBBoxCoder" and _is_fcos_forward(head):
        strides = head_strides(head)
        scaled = getattr(head, "norm_on_bbox", False) and training
        return "distance", dict(scales=strides if scaled else [1.0] * len(strides))
    raise NotImplementedError(
        f"TBD distillation does not support {type(head).__name__} with bbox_coder {name!r}: its forward does not "
        f"output what the coder decodes ({_SUPPORTED})")


def _normalization(pre: nn.Module, who: str, channels: int) -> Tuple[Tensor, Tensor, bool, float]:
    """``(mean [C], std [C], swaps_channels, pad_value)`` of an mmengine ``ImgDataPreprocessor``."""
    needed = ("_enable_normalize", "_channel_conversion", "pad_value")
    if not all(hasattr(pre, a) for a in needed):
        raise TypeError(f"{who} data_preprocessor {type(pre).__name__} is not an ImgDataPreprocessor "
                        "(DetDataPreprocessor); its normalization cannot be converted")
    if pre._enable_normalize:
        mean = pre.mean.detach().double().cpu().flatten()
        std = pre.std.detach().double().cpu().flatten()
        if mean.numel() == 1:
            mean, std = mean.expand(channels), std.expand(channels)
    else:
        mean, std = torch.zeros(channels, dtype=torch.float64), torch.ones(channels, dtype=torch.float64)
    if mean.numel() != channels:
        raise ValueError(f"{who} data_preprocessor normalizes {mean.numel()} channels, the other side {channels}")
    return mean, std, bool(pre._channel_conversion), float(pre.pad_value)


class InputConverter(nn.Module):
    """The student's preprocessed batch in the teacher's normalization.

    Both preprocessors see the same images: the student's gives
    ``x_s[c] = (img[perm_s(c)] - mean_s[c]) / std_s[c]`` (``perm`` the BGR->RGB
    swap when it converts channels), then pads with ``pad_s``. The teacher's
    would give ``x_t[c] = (img[perm_t(c)] - mean_t[c]) / std_t[c]``, padded with
    ``pad_t``. So ``x_t[c] = x_s[p(c)] * std_s[p(c)] / std_t[c] + (mean_s[p(c)] -
    mean_t[c]) / std_t[c]`` with ``p`` the channel permutation between the two,
    and the padding (outside each image's ``img_shape``) is ``pad_t``. Exact up
    to float32 rounding; the identity (no work) when both normalize alike.
    """

    def __init__(self, student_pre: nn.Module, teacher_pre: nn.Module, channels: int = 3):
        super().__init__()
        mean_s, std_s, swap_s, self.pad_s = _normalization(student_pre, "the student's", channels)
        mean_t, std_t, swap_t, self.pad_t = _normalization(teacher_pre, "the teacher's", channels)
        if swap_s != swap_t and channels != 3:
            raise ValueError(f"a channel-order conversion needs 3 channels, the images have {channels}")
        perm = list(range(channels))[::-1] if swap_s != swap_t else list(range(channels))
        scale = std_s[perm] / std_t
        shift = (mean_s[perm] - mean_t) / std_t
        self.perm = None if perm == sorted(perm) else perm
        same_values = bool(torch.equal(scale, torch.ones_like(scale)) and torch.equal(shift, torch.zeros_like(shift)))
        self.identity = self.perm is None and same_values and self.pad_s == self.pad_t
        self.channels = channels
        self.register_buffer("scale", scale.float().view(1, channels, 1, 1), persistent=False)
        self.register_buffer("shift", shift.float().view(1, channels, 1, 1), persistent=False)

    def forward(self, inputs: Tensor, img_shapes: Sequence[Tuple[int, int]]) -> Tensor:
        if self.identity:
            return inputs
        if inputs.dim() != 4 or inputs.shape[1] != self.channels:
            raise ValueError(f"InputConverter: inputs must be [N, {self.channels}, H, W], got {tuple(inputs.shape)}")
        # The permutation is the channel reversal (BGR <-> RGB): flip, not an index
        # list (which would be a tensor made from host data, a host-to-device copy).
        x = inputs.flip(1) if self.perm is not None else inputs
        x = x * self.scale.to(x.dtype) + self.shift.to(x.dtype)
        h, w = inputs.shape[-2:]
        # Each image fills [0, img_h) x [0, img_w) of the batch; the rest is padding
        # (fill_ with a Python scalar: a kernel parameter, no host-device copy).
        for n, shape in enumerate(img_shapes):
            ih, iw = int(shape[0]), int(shape[1])
            if ih < h:
                x[n, :, ih:, :].fill_(self.pad_t)
            if iw < w:
                x[n, :, :, iw:].fill_(self.pad_t)
        return x

    def extra_repr(self) -> str:
        return f"identity={self.identity}, perm={self.perm}"
