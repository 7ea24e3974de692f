"""TBD distillers for MMDetection 3.x: one-stage and two-stage students.

In the spirit of mmdet's ``KnowledgeDistillationSingleStageDetector``: the
student is an ordinary detector; the teacher is built from its own config and
checkpoint (see ``teacher.py``), frozen, kept in eval mode and kept out of the
module tree (not trained, not saved with the student, not wrapped by DDP).
``loss()`` returns exactly the student's own losses plus ``loss_hd`` and
``loss_tfd`` of ``tbd_ops.nn.TBDLoss``, computed on the student's FPN features
and dense-head outputs (captured from the student's own forward, not run twice)
and the teacher's.

* ``TBDSingleStageDetector``: any ``SingleStageDetector`` whose head decodes
  with ``DeltaXYWHBBoxCoder`` (RetinaNet, ATSS, ...) or is an ``FCOSHead``.
* ``TBDTwoStageDetector``: any ``TwoStageDetector`` with an ``RPNHead`` (Faster
  R-CNN, ...): HD on the RPN outputs (objectness logits, C = 1, and the RPN's
  anchors and coder), TFD on the FPN features with masks from the teacher's RPN.
"""
import contextlib
from collections import OrderedDict
from pathlib import Path
from typing import Dict, List, Optional, Union

import torch
from torch import Tensor, nn

from mmengine.config import Config
from mmdet.models.detectors.single_stage import SingleStageDetector
from mmdet.models.detectors.two_stage import TwoStageDetector
from mmdet.models.utils import unpack_gt_instances
from mmdet.registry import MODELS
from mmdet.structures import SampleList
from mmdet.structures.bbox import get_box_tensor

from ..nn import HarmonyDistillationLoss, TaskDecoupledFeatureLoss, TaskWeightGenerator, TBDLoss
from .teacher import InputConverter, build_teacher, coder_from_head, head_strides

for _cls in (TBDLoss, HarmonyDistillationLoss, TaskDecoupledFeatureLoss, TaskWeightGenerator):
    MODELS.register_module(name=_cls.__name__, module=_cls, force=True)

__all__ = ["TBDSingleStageDetector", "TBDTwoStageDetector", "coder_from_head"]

ConfigType = Union[str, Path, dict, Config]


@contextlib.contextmanager
def _outputs_of(module: nn.Module):
    """Collects what ``module`` returns while the block runs."""
    outputs: list = []
    handle = module.register_forward_hook(lambda mod, args, out: outputs.append(out))
    try:
        yield outputs
    finally:
        handle.remove()


def _clips(head: nn.Module) -> bool:
    return bool(getattr(getattr(head, "bbox_coder", None), "clip_border", True))


def _prior_signature(generator) -> tuple:
    """What decides the priors of a prior generator besides the feature sizes: the base anchors of
    every level and the center offset (anchors), or the offset (points)."""
    base = getattr(generator, "base_anchors", None)
    anchors = tuple(tuple(round(float(v), 4) for v in a.flatten().tolist()) for a in base) if base is not None else None
    return (type(generator).__name__, anchors, float(getattr(generator, "center_offset", 0.0)),
            float(getattr(generator, "offset", 0.0)))


# The settings of mmdet's prior generators (AnchorGenerator, SSD's, YOLO's, MlvlPointGenerator) that
# an error names when two generators make different priors.
_PRIOR_SETTINGS = ("octave_base_scale", "scales_per_octave", "scales", "ratios", "base_sizes", "center_offset",
                   "centers", "scale_major", "offset")


def _prior_differences(student, teacher) -> str:
    """The settings in which two prior generators differ, student's then teacher's value; the
    first differing base anchors where no setting differs (a generator of other settings)."""

    def value(g, name):
        v = getattr(g, name, None)
        if isinstance(v, torch.Tensor):
            v = v.tolist()
        return [round(x, 4) if isinstance(x, float) else x for x in v] if isinstance(v, (list, tuple)) else v

    def short(v) -> str:
        text = repr(v)
        return text if len(text) <= 80 else text[:77] + "..."

    if type(student) is not type(teacher):
        return f"type: {type(student).__name__} (student) vs {type(teacher).__name__} (teacher)"
    diffs = [f"{name}: {short(value(student, name))} (student) vs {short(value(teacher, name))} (teacher)"
             for name in _PRIOR_SETTINGS if value(student, name) != value(teacher, name)]
    if diffs:
        return "; ".join(diffs)
    s_sig, t_sig = _prior_signature(student), _prior_signature(teacher)
    for level, (a, b) in enumerate(zip(s_sig[1] or (), t_sig[1] or ())):
        if a != b:
            return f"base anchors of level {level}: {short(a)} (student) vs {short(b)} (teacher)"
    return f"{short(s_sig)} (student) vs {short(t_sig)} (teacher)"


def _num_classes(head: nn.Module) -> int:
    return int(getattr(head, "cls_out_channels", getattr(head, "num_classes", -1)))


class TBDDistillerMixin:
    """Teacher handling and the TBD losses shared by the one- and two-stage distillers.

    A subclass names its dense head (``_dense_head_name``: the module whose
    outputs are distilled) and the detector type the teacher must be.
    """

    _dense_head_name = "bbox_head"
    _teacher_type = nn.Module

    def _init_tbd(self, teacher_config: ConfigType, teacher_ckpt: Optional[str], eval_teacher: bool,
                  tbd_loss: Optional[dict], allow_class_mismatch: bool) -> None:
        owner = type(self).__name__
        if not getattr(self, "with_neck", False):
            raise ValueError(f"{owner}: TBD distills FPN features, the student has no neck")
        teacher = build_teacher(owner, teacher_config, teacher_ckpt)
        if not isinstance(teacher, self._teacher_type) or getattr(teacher, self._dense_head_name, None) is None:
            raise TypeError(f"{owner}: the teacher must be a {self._teacher_type.__name__} with a "
                            f"{self._dense_head_name}, got {type(teacher).__name__}")
        self.eval_teacher = bool(eval_teacher)
        self.teacher_model = teacher  # not a submodule (see __setattr__)
        teacher.train(not self.eval_teacher)

        s_head, t_head = self._dense_head(self), self._dense_head(teacher)
        coder, coder_cfg = coder_from_head(s_head, training=True)  # a supported head first
        t_coder, t_coder_cfg = coder_from_head(t_head, training=not self.eval_teacher)
        self._check_teacher(owner, s_head, t_head, allow_class_mismatch)
        if t_coder != coder:
            raise ValueError(f"{owner}: the teacher's boxes decode with {t_coder!r}, the student's with {coder!r}; "
                             "TBD needs the same kind of box coder on both sides")
        cfg = dict(tbd_loss or {})
        cfg.pop("type", None)
        # What the heads decide: a value given in tbd_loss must agree (the loss would fail at the
        # first step, or decode the boxes in another convention).
        derived = dict(num_levels=s_head.prior_generator.num_levels, in_channels=s_head.in_channels,
                       teacher_channels=t_head.in_channels, coder=coder)
        for key, value in derived.items():
            if key in cfg and cfg[key] != value:
                raise ValueError(f"{owner}: tbd_loss.{key} = {cfg[key]!r} does not match the models ({value!r}); "
                                 "leave it out, it is taken from the student's and the teacher's heads")
            cfg[key] = value
        cfg.setdefault("coder_cfg", coder_cfg)
        cfg.setdefault("teacher_coder_cfg", t_coder_cfg)
        try:
            self.tbd_loss = TBDLoss(**cfg)
        except (TypeError, ValueError) as e:
            raise type(e)(f"{owner}: tbd_loss: {e}") from None
        self._clip_to_image = _clips(s_head)
        self._t_clip_to_image = _clips(t_head)
        self.teacher_input = InputConverter(self.data_preprocessor, teacher.data_preprocessor)

    @classmethod
    def _dense_head(cls, model: nn.Module) -> nn.Module:
        return getattr(model, cls._dense_head_name)

    def _grid_priors(self, head: nn.Module, sizes, dtype: torch.dtype, device: torch.device) -> List[Tensor]:
        """The head's priors of these level sizes, made once per (sizes, dtype, device): mmdet's
        anchor generator copies its base anchors to the device on every call, a copy that
        synchronizes with the host. The last few size sets are kept (multi-scale training)."""
        key = (tuple(tuple(int(v) for v in s) for s in sizes), dtype, torch.device(device))
        cache = self.__dict__.setdefault("_tbd_priors_cache", OrderedDict())
        priors = cache.get(key)
        if priors is not None:
            cache.move_to_end(key)
            return priors
        priors = head.prior_generator.grid_priors(sizes, dtype=dtype, device=device)
        if not torch.is_inference_mode_enabled():  # inference tensors cannot be saved for backward
            cache[key] = priors
            while len(cache) > 8:
                cache.popitem(last=False)
        return priors

    def _check_teacher(self, owner: str, s_head: nn.Module, t_head: nn.Module, allow_class_mismatch: bool) -> None:
        s_strides, t_strides = head_strides(s_head), head_strides(t_head)
        if s_strides != t_strides:
            raise ValueError(f"{owner}: student and teacher must have the same FPN levels (prior strides), got "
                             f"{s_strides} and {t_strides}")
        s_a, t_a = s_head.num_base_priors, t_head.num_base_priors
        if s_a != t_a:
            raise ValueError(f"{owner}: student and teacher heads must have the same priors per location, got "
                             f"{s_a} and {t_a}")
        # The teacher's boxes are decoded on the student's priors: they must be the same anchors (sizes,
        # ratios, scales, center offset) or points (offset), not only as many.
        s_sig, t_sig = _prior_signature(s_head.prior_generator), _prior_signature(t_head.prior_generator)
        if s_sig != t_sig:
            raise ValueError(f"{owner}: student and teacher heads must have the same priors (anchor sizes, ratios, "
                             f"scales and offsets); they differ in "
                             f"{_prior_differences(s_head.prior_generator, t_head.prior_generator)}")
        s_c, t_c = _num_classes(s_head), _num_classes(t_head)
        if s_c != t_c and not allow_class_mismatch:
            raise ValueError(f"{owner}: student and teacher heads predict different numbers of classes ({s_c} and "
                             f"{t_c}); distill from a teacher trained on the student's classes, or set "
                             "allow_class_mismatch=True (p_c is then the max over each side's own classes)")

    # The teacher is kept out of the module tree: not trained, not saved with
    # the student, not wrapped by DDP. These keep its device and mode in step.
    def __setattr__(self, name, value):
        if name == "teacher_model":
            object.__setattr__(self, name, value)
        else:
            super().__setattr__(name, value)

    def cuda(self, device=None):
        self.teacher_model.cuda(device=device)
        return super().cuda(device=device)

    def cpu(self):
        self.teacher_model.cpu()
        return super().cpu()

    def to(self, *args, **kwargs):
        self.teacher_model.to(*args, **kwargs)
        return super().to(*args, **kwargs)

    def train(self, mode: bool = True):
        self.teacher_model.train(False if self.eval_teacher else mode)
        return super().train(mode)

    def teacher_outputs(self, batch_inputs: Tensor, batch_img_metas: List[dict]):
        """``(features, dense-head outputs)`` of the teacher on the batch, in its normalization."""
        img_shapes = [m["img_shape"] for m in batch_img_metas]
        with torch.no_grad():
            inputs = self.teacher_input(batch_inputs, img_shapes)
            feats = self.teacher_model.extract_feat(inputs)
            outs = self._dense_head(self.teacher_model)(feats)
        return feats, outs

    def distillation_losses(self, batch_inputs: Tensor, batch_data_samples: SampleList, feats, outs) -> Dict[str, Tensor]:
        """``loss_hd`` and ``loss_tfd`` from the student's FPN features and dense-head outputs."""
        batch_gt_instances, _, batch_img_metas = unpack_gt_instances(batch_data_samples)
        t_feats, t_outs = self.teacher_outputs(batch_inputs, batch_img_metas)
        cls_scores, bbox_preds = list(outs[0]), list(outs[1])
        head = self._dense_head(self)
        for l, (b, c) in enumerate(zip(bbox_preds, cls_scores)):
            if b.shape[1] != 4 * head.num_base_priors:
                raise ValueError(f"{type(self).__name__}: bbox_pred of level {l} has {b.shape[1]} channels, "
                                 f"TBD needs 4 per prior ({4 * head.num_base_priors}); {type(head).__name__} "
                                 "does not predict one box per prior")
        # Boxes are decoded in float32 on float32 priors, as mmdet does, also when the head runs in
        # float16/bfloat16 under autocast (16-bit anchors are off by pixels on large images).
        bbox_preds = [b.float() for b in bbox_preds]
        t_bbox_preds = [b.float() for b in t_outs[1]]
        sizes = [c.shape[-2:] for c in cls_scores]
        priors = self._grid_priors(head, sizes, torch.float32, bbox_preds[0].device)
        gt_bboxes = [get_box_tensor(g.bboxes).float() for g in batch_gt_instances]
        shapes = [tuple(m["img_shape"][:2]) for m in batch_img_metas]
        # Each side's boxes are clipped to the image as its own box coder does (clip_border).
        return self.tbd_loss(cls_scores, bbox_preds, list(feats), list(t_outs[0]), t_bbox_preds, list(t_feats),
                             priors, gt_bboxes, shapes if self._clip_to_image else None,
                             teacher_img_shapes=shapes if self._t_clip_to_image else None)

    def loss(self, batch_inputs: Tensor, batch_data_samples: SampleList) -> Union[dict, list]:
        """The student's own losses, unchanged, plus ``loss_hd`` and ``loss_tfd``."""
        with _outputs_of(self.neck) as feats, _outputs_of(self._dense_head(self)) as outs:
            losses = super().loss(batch_inputs, batch_data_samples)
        if len(feats) != 1 or len(outs) != 1:
            raise RuntimeError(f"{type(self).__name__}: expected one forward of the neck and of the "
                               f"{self._dense_head_name} in the student's loss, got {len(feats)} and {len(outs)}")
        losses.update(self.distillation_losses(batch_inputs, batch_data_samples, feats[0], outs[0]))
        return losses


@MODELS.register_module()
class TBDSingleStageDetector(TBDDistillerMixin, SingleStageDetector):
    """One-stage student distilled from a frozen one-stage teacher with TBD.

    Args:
        backbone, neck, bbox_head, train_cfg, test_cfg, data_preprocessor,
            init_cfg: the student, as for ``SingleStageDetector``.
        teacher_config: the teacher: a config file path, an ``"mmdet::..."``
            name, a ``Config``/dict with a ``model`` key, or the model dict.
            Teacher and student must have the same FPN levels, priors per
            location and classes.
        teacher_ckpt: the teacher's checkpoint (a path or URL; e.g. the
            ``iter_N.pth``/``epoch_N.pth`` that mmengine's ``CheckpointHook``
            wrote). Every key must match the teacher's config. ``None``: the
            teacher keeps random weights (a warning is logged).
        eval_teacher: keep the teacher in eval mode (default True).
        tbd_loss: keyword arguments of ``tbd_ops.nn.TBDLoss`` (``hd_weight``,
            ``tfd_weight``, ``hd_mode``, ``adapter_kernel``, ...). The levels,
            channels and box coders (student's and teacher's) default to what
            the two heads say.
        allow_class_mismatch: distill from a teacher with other classes.
    """

    _dense_head_name = "bbox_head"
    _teacher_type = SingleStageDetector

    def __init__(self, backbone: dict, neck: dict, bbox_head: dict, teacher_config: ConfigType,
                 teacher_ckpt: Optional[str] = None, eval_teacher: bool = True, tbd_loss: Optional[dict] = None,
                 allow_class_mismatch: bool = False, train_cfg: Optional[dict] = None,
                 test_cfg: Optional[dict] = None, data_preprocessor: Optional[dict] = None, init_cfg=None) -> None:
        super().__init__(backbone=backbone, neck=neck, bbox_head=bbox_head, train_cfg=train_cfg,
                         test_cfg=test_cfg, data_preprocessor=data_preprocessor, init_cfg=init_cfg)
        self._init_tbd(teacher_config, teacher_ckpt, eval_teacher, tbd_loss, allow_class_mismatch)


@MODELS.register_module()
class TBDTwoStageDetector(TBDDistillerMixin, TwoStageDetector):
    """Two-stage student (Faster R-CNN, ...) distilled from a frozen two-stage teacher with TBD.

    As in the TBD paper, the RPN is the one-stage part: HD on the RPN outputs
    (objectness logits as C = 1, the RPN's anchors and ``delta_xywh`` coder,
    p_r against all ground truths), TFD on the FPN features with masks from the
    teacher's RPN p_c and p_r. The student's RPN and RoI losses are its own.

    Args:
        backbone, neck, rpn_head, roi_head, train_cfg, test_cfg,
            data_preprocessor, init_cfg: the student, as for ``TwoStageDetector``.
        teacher_config, teacher_ckpt, eval_teacher, tbd_loss,
            allow_class_mismatch: as for ``TBDSingleStageDetector``; the teacher
            is a ``TwoStageDetector`` with an RPN of the same levels and anchors
            per location, and an RoI head of the same classes.
    """

    _dense_head_name = "rpn_head"
    _teacher_type = TwoStageDetector

    def __init__(self, backbone: dict, rpn_head: dict, roi_head: dict, teacher_config: ConfigType,
                 teacher_ckpt: Optional[str] = None, eval_teacher: bool = True, tbd_loss: Optional[dict] = None,
                 allow_class_mismatch: bool = False, neck: Optional[dict] = None, train_cfg: Optional[dict] = None,
                 test_cfg: Optional[dict] = None, data_preprocessor: Optional[dict] = None, init_cfg=None) -> None:
        super().__init__(backbone=backbone, neck=neck, rpn_head=rpn_head, roi_head=roi_head, train_cfg=train_cfg,
                         test_cfg=test_cfg, data_preprocessor=data_preprocessor, init_cfg=init_cfg)
        if not self.with_rpn:
            raise ValueError("TBDTwoStageDetector: the student needs an rpn_head (HD distills the RPN outputs)")
        self._init_tbd(teacher_config, teacher_ckpt, eval_teacher, tbd_loss, allow_class_mismatch)

    def _check_teacher(self, owner: str, s_head: nn.Module, t_head: nn.Module, allow_class_mismatch: bool) -> None:
        super()._check_teacher(owner, s_head, t_head, allow_class_mismatch)
        s_c = getattr(getattr(self.roi_head, "bbox_head", None), "num_classes", None)
        t_c = getattr(getattr(self.teacher_model.roi_head, "bbox_head", None), "num_classes", None)
        if s_c != t_c and not allow_class_mismatch:
            raise ValueError(f"{owner}: student and teacher RoI heads predict different numbers of classes ({s_c} "
                             f"and {t_c}); distill from a teacher trained on the student's classes, or set "
                             "allow_class_mismatch=True")
