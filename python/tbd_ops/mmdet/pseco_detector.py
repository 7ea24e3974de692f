"""PseCo (Li et al., ECCV 2022) for MMDetection 3.x: ``PseCoDetector`` and ``RoIFocalLoss``.

``PseCoDetector`` is a ``SemiBaseDetector``: a student and a teacher built from
one Faster R-CNN config, the teacher updated only by ``MeanTeacherHook``'s
exponential moving average. It reproduces the official implementation
(``PseCo_FRCNN``, mmdet 2.x) on the fused ops of ``tbd_ops``:

* labeled images: the student's ordinary RPN and RoI losses (``sup_`` keys);
* unlabeled images: the teacher (weak view V0, eval mode, no gradient) gives
  its detections and its RPN proposals; detections with a score above
  ``pseudo_label_initial_score_thr`` are mapped into the student's view V1 by
  the views' ``homography_matrix`` (clipped to V1's ``img_shape``); the RPN
  learns those above ``rpn_pseudo_thr``, the RoI head those above
  ``cls_pseudo_thr``;
* the RoIs are the teacher's proposals mapped into V1
  (``use_teacher_proposal``); the teacher's class probabilities of every
  proposal and its box regressed at its top class (mapped into V1) go, for the
  whole batch, into one ``tbd_ops.prediction_guided_assign`` call (PLA), with
  ``valid`` = the proposal has a positive area in V1; then the student's RoI
  sampler (``train_cfg.rcnn.sampler``);
* RoI classification: the focal loss of the head's ``RoIFocalLoss`` summed over
  the sampled RoIs and divided by ``max(sum of label weights, 1)``;
  RoI regression: ``consistency_voting`` (PCV) gives every positive the weight
  ``sigma^2`` of its pseudo box and the batch factor ``reg_scale``;
  ``loss_bbox = reg_scale * sum(w * L_bbox) / max(number of sampled RoIs, 1)``;
* multi-view scale-invariant learning (``use_MSL``): V2 is V1 downsampled by 2
  (nearest); the same RPN and RoI losses on V2's P2-P6 with V1's targets, RoIs,
  weights and ``reg_scale`` (keys with a ``_V2`` suffix); optionally the
  feature-level ``scale_consistency_loss`` between V1's P3-P7 and V2's P2-P6;
* every unsupervised term is multiplied by ``unsup_weight`` (``unsup_`` keys).

The FPN must have 6 outputs P2-P7 (``num_outs=6``): V1 and the teacher use
P3-P7 (RPN strides 8-128, RoI strides from 8), V2 uses P2-P6. Prediction runs on
the teacher (``semi_test_cfg.predict_on``) with P3-P7.
"""
import copy
import math
import re
import warnings
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mmengine.config import ConfigDict
from mmengine.logging import MessageHub
from mmengine.structures import InstanceData
from mmdet.models.detectors.semi_base import SemiBaseDetector
from mmdet.models.task_modules.assigners import AssignResult
from mmdet.models.task_modules.samplers import PseudoSampler, RandomSampler
from mmdet.models.utils import empty_instances, rename_loss_dict, reweight_loss_dict
from mmdet.registry import MODELS
from mmdet.structures import DetDataSample, SampleList
from mmdet.structures.bbox import bbox2roi, get_box_tensor

import tbd_ops

__all__ = ["PseCoDetector", "RoIFocalLoss", "SEMI_TRAIN_DEFAULTS"]

_NAME = "PseCoDetector"

# mmdet's SoftTeacher names where they mean the same, then PseCo's own keys with the official defaults
# (configs/PseCo/PseCo_faster_rcnn_r50_caffe_fpn_coco_180k.py of the official code).
SEMI_TRAIN_DEFAULTS = dict(
    freeze_teacher=True,
    sup_weight=1.0,
    unsup_weight=2.0,
    pseudo_label_initial_score_thr=0.3,
    rpn_pseudo_thr=0.5,
    cls_pseudo_thr=0.5,
    min_pseudo_bbox_wh=(0.0, 0.0),
    use_teacher_proposal=True,
    use_MSL=True,
    PLA_iou_thres=0.4,
    PLA_candidate_topk=12,
    PLA_alpha=0.5,
    PCV_mode="pseco",
    scale_consistency_weight=0.0,
)
# SoftTeacher's own keys: accepted (a SoftTeacher config can be switched to PseCo) and unused.
_SOFT_TEACHER_ONLY = ("reg_pseudo_thr", "jitter_times", "jitter_scale")
# The official code's spellings of keys that have mmdet names here.
_OFFICIAL_NAMES = {"rpn_pseudo_threshold": "rpn_pseudo_thr", "cls_pseudo_threshold": "cls_pseudo_thr",
                   "min_pseduo_box_size": "min_pseudo_bbox_wh", "min_pseudo_box_size": "min_pseudo_bbox_wh"}
_VIEWS = ("teacher", "student")
_BRANCHES = ("sup", "unsup_teacher", "unsup_student")
# The RoI head's layers whose shapes follow the number of classes.
_CLASS_LAYERS = re.compile(r"(^|\.)roi_head\.bbox_head\.(fc_cls|fc_reg)\.")
# Samplers that read only gt_inds of an AssignResult (no max_overlaps).
_SAMPLERS_WITHOUT_OVERLAPS = (RandomSampler, PseudoSampler)


def _number(key: str, value, lo: float, hi: float, lo_open: bool = False) -> float:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if ok:
        ok = (value > lo if lo_open else value >= lo) and value <= hi
    if not ok:
        bounds = f"{'(' if lo_open else '['}{lo}, {hi}]"
        raise ValueError(f"{_NAME}: semi_train_cfg.{key} must be a number in {bounds}, got {value!r}")
    return float(value)


def _flag(key: str, value) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"{_NAME}: semi_train_cfg.{key} must be True or False, got {value!r}")
    return value


def check_semi_train_cfg(cfg) -> ConfigDict:
    """``semi_train_cfg`` completed with the defaults and checked; raises naming a bad key."""
    if cfg is None:
        cfg = {}
    if not isinstance(cfg, dict):
        raise ValueError(f"{_NAME}: semi_train_cfg must be a dict, got {type(cfg).__name__}")
    out = dict(SEMI_TRAIN_DEFAULTS)
    for key, value in cfg.items():
        if key in _OFFICIAL_NAMES:
            raise ValueError(f"{_NAME}: semi_train_cfg.{key} is the official code's name; use "
                             f"{_OFFICIAL_NAMES[key]!r} (mmdet's name)")
        if key in _SOFT_TEACHER_ONLY:
            warnings.warn(f"{_NAME}: semi_train_cfg.{key} is a SoftTeacher setting, unused by PseCo")
            continue
        if key not in SEMI_TRAIN_DEFAULTS:
            raise ValueError(f"{_NAME}: unknown semi_train_cfg key {key!r}; expected one of "
                             f"{sorted(SEMI_TRAIN_DEFAULTS)}")
        out[key] = value
    for key in ("freeze_teacher", "use_teacher_proposal", "use_MSL"):
        out[key] = _flag(key, out[key])
    for key in ("sup_weight", "unsup_weight", "scale_consistency_weight"):
        out[key] = _number(key, out[key], 0.0, math.inf)
    for key in ("pseudo_label_initial_score_thr", "rpn_pseudo_thr", "cls_pseudo_thr", "PLA_alpha"):
        out[key] = _number(key, out[key], 0.0, 1.0)
    out["PLA_iou_thres"] = _number("PLA_iou_thres", out["PLA_iou_thres"], 0.0, 1.0, lo_open=True)
    topk = out["PLA_candidate_topk"]
    if not isinstance(topk, int) or isinstance(topk, bool) or topk < 1:
        raise ValueError(f"{_NAME}: semi_train_cfg.PLA_candidate_topk must be an int >= 1, got {topk!r}")
    if out["PCV_mode"] not in ("pseco", "paper"):
        raise ValueError(f"{_NAME}: semi_train_cfg.PCV_mode must be 'pseco' or 'paper', got {out['PCV_mode']!r}")
    wh = out["min_pseudo_bbox_wh"]
    if isinstance(wh, (int, float)) and not isinstance(wh, bool):
        wh = (wh, wh)
    if not (isinstance(wh, (tuple, list)) and len(wh) == 2 and all(
            isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v >= 0 for v in wh)):
        raise ValueError(f"{_NAME}: semi_train_cfg.min_pseudo_bbox_wh must be (min_w, min_h) with finite values "
                         f">= 0, got {out['min_pseudo_bbox_wh']!r}")
    out["min_pseudo_bbox_wh"] = (float(wh[0]), float(wh[1]))
    if out["scale_consistency_weight"] > 0 and not out["use_MSL"]:
        raise ValueError(f"{_NAME}: semi_train_cfg.scale_consistency_weight > 0 needs the second view: set "
                         f"use_MSL=True (got use_MSL=False)")
    return ConfigDict(out)


_TEST_KEYS = ("predict_on", "forward_on", "extract_feat_on")


def check_semi_test_cfg(cfg) -> ConfigDict:
    cfg = dict(predict_on="teacher") if cfg is None else dict(cfg)
    unknown = sorted(set(cfg) - set(_TEST_KEYS))
    if unknown:
        raise ValueError(f"{_NAME}: unknown semi_test_cfg keys {unknown} (known: {list(_TEST_KEYS)})")
    for key in _TEST_KEYS:
        if key in cfg and cfg[key] not in _VIEWS:
            raise ValueError(f"{_NAME}: semi_test_cfg.{key} must be 'teacher' or 'student', got {cfg[key]!r}")
    return ConfigDict(cfg)


@MODELS.register_module()
class RoIFocalLoss(nn.Module):
    """Sigmoid focal loss for an mmdet 3.x RoI box head (PseCo's RoI classifier).

    mmdet's ``FocalLoss`` in a ``BBoxHead`` leaves the head with C + 1 class
    channels and softmax scores at test time. This loss gives the head C
    channels (``custom_cls_channels``), sigmoid scores with a zero background
    column for mmdet's post-processing (``get_activation``, as mmdet 2.x did)
    and computes the loss with the fused ``tbd_ops.sigmoid_focal_loss``
    (targets in ``[0, C]``, C = background: an all-zero one-hot row).

    ``forward(pred, target, weight=None, avg_factor=None, reduction_override=None)``
    reduces as mmdet's ``weight_reduce_loss``: ``"none"`` gives the per-element
    loss ``[R, C]`` (times the per-RoI ``weight``), ``"sum"`` the sum (with
    ``avg_factor`` a ``ValueError``), ``"mean"`` the sum divided by
    ``avg_factor`` (by ``R * C`` without one); everything times ``loss_weight``.
    """

    def __init__(self, use_sigmoid: bool = True, gamma: float = 2.0, alpha: float = 0.25,
                 reduction: str = "mean", loss_weight: float = 1.0):
        super().__init__()
        if use_sigmoid is not True:
            raise ValueError(f"RoIFocalLoss: use_sigmoid must be True (a sigmoid classifier), got {use_sigmoid!r}")
        if reduction not in ("none", "mean", "sum"):
            raise ValueError(f"RoIFocalLoss: reduction must be 'none', 'mean' or 'sum', got {reduction!r}")
        for key, value in (("gamma", gamma), ("alpha", alpha), ("loss_weight", loss_weight)):
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value) or value < 0:
                raise ValueError(f"RoIFocalLoss: {key} must be a finite number >= 0, got {value!r}")
        if alpha > 1:
            raise ValueError(f"RoIFocalLoss: alpha must be in [0, 1], got {alpha!r}")
        self.use_sigmoid = True
        self.gamma, self.alpha = float(gamma), float(alpha)
        self.reduction, self.loss_weight = reduction, float(loss_weight)
        # mmdet's BBoxHead reads these three flags.
        self.custom_cls_channels = True
        self.custom_activation = True
        self.custom_accuracy = True

    def get_cls_channels(self, num_classes: int) -> int:
        return num_classes

    def get_activation(self, cls_score: Tensor) -> Tensor:
        scores = cls_score.sigmoid()
        return torch.cat([scores, scores.new_zeros(scores.shape[0], 1)], dim=1)

    def get_accuracy(self, cls_score: Tensor, labels: Tensor) -> dict:
        return {}

    def forward(self, pred: Tensor, target: Tensor, weight: Optional[Tensor] = None,
                avg_factor: Optional[float] = None, reduction_override: Optional[str] = None) -> Tensor:
        if reduction_override not in (None, "none", "mean", "sum"):
            raise ValueError(f"RoIFocalLoss: reduction_override must be None, 'none', 'mean' or 'sum', got "
                             f"{reduction_override!r}")
        reduction = reduction_override or self.reduction
        if weight is not None and weight.dim() != 1:
            raise ValueError(f"RoIFocalLoss: weight must be one value per RoI [R], got shape {tuple(weight.shape)}")
        if reduction == "none":
            loss = tbd_ops.sigmoid_focal_loss(pred, target, weight, self.gamma, self.alpha, "none")
        elif avg_factor is None:
            loss = tbd_ops.sigmoid_focal_loss(pred, target, weight, self.gamma, self.alpha, reduction)
        elif reduction == "mean":
            loss = tbd_ops.sigmoid_focal_loss(pred, target, weight, self.gamma, self.alpha, "sum") / (
                avg_factor + torch.finfo(torch.float32).eps)
        else:
            raise ValueError('RoIFocalLoss: avg_factor can only be used with reduction="mean" (as mmdet), got '
                             f'reduction={reduction!r}')
        return self.loss_weight * loss


def focal_prior_init(head: nn.Module, prior: float = 0.01) -> None:
    """A sigmoid RoI classifier starts at the probability ``prior`` for every class (bias -4.6), as
    RetinaNet's and the official PseCo's ``BBoxHead`` (``bias_prob=0.01``): mmdet's default (bias 0)
    would score every class 0.5, and the teacher, a copy of the student at the start, would hand out
    up to ``max_per_img`` random pseudo boxes per image until its classifier has moved. Changes the
    ``Normal`` init of ``fc_cls`` in ``head.init_cfg`` (applied by ``init_weights()``) unless it sets
    a bias itself."""
    cfgs = head.init_cfg if isinstance(head.init_cfg, list) else [head.init_cfg] if head.init_cfg else []
    out = []
    for cfg in cfgs:
        cfg = copy.deepcopy(cfg)
        override = cfg.get("override") if isinstance(cfg, dict) else None
        names = [o.get("name") for o in (override if isinstance(override, list) else [override] if override else [])]
        if cfg.get("type") == "Normal" and names == ["fc_cls"] and "bias" not in cfg and "bias_prob" not in cfg:
            cfg["bias_prob"] = float(prior)
        out.append(cfg)
    head.init_cfg = out


# ---- the V1/V2 level scheme -------------------------------------------------------------------------
_RPN_STRIDES = [8, 16, 32, 64, 128]


def check_level_scheme(model: nn.Module) -> None:
    """Raises a ValueError naming the setting when ``model`` does not fit the V1/V2 levels."""
    if not getattr(model, "with_neck", False):
        raise ValueError(f"{_NAME}: the detector needs an FPN neck with 6 outputs P2-P7 "
                         "(neck=dict(type='FPN', ..., num_outs=6, add_extra_convs='on_input'))")
    neck = model.neck
    num_outs = getattr(neck, "num_outs", None)
    if num_outs is not None and num_outs != 6:
        raise ValueError(f"{_NAME}: detector.neck.num_outs must be 6 (P2-P7: the student's view V1 and the teacher "
                         f"use P3-P7, the downsampled view V2 uses P2-P6), got {num_outs}; set "
                         "neck=dict(..., num_outs=6, add_extra_convs='on_input')")
    extra = getattr(neck, "add_extra_convs", None)
    if num_outs is not None and extra != "on_input":
        raise ValueError(f"{_NAME}: detector.neck.add_extra_convs must be 'on_input' (P6 and P7 from the last backbone "
                         f"stage, as PseCo's FPN), got {extra!r}")
    in_channels = getattr(neck, "in_channels", None)
    out_indices = getattr(model.backbone, "out_indices", None)
    if in_channels is not None and out_indices is not None and len(out_indices) != len(in_channels):
        raise ValueError(f"{_NAME}: detector.backbone.out_indices {tuple(out_indices)} gives {len(out_indices)} "
                         f"stages, detector.neck.in_channels {list(in_channels)} expects {len(in_channels)}")
    start_level = getattr(neck, "start_level", None)
    if start_level is not None and start_level != 0:
        raise ValueError(f"{_NAME}: detector.neck.start_level must be 0 (P2 at stride 4 from the first backbone "
                         f"stage), got {start_level}")
    if not getattr(model, "with_rpn", False):
        raise ValueError(f"{_NAME}: the detector needs an rpn_head (a Faster R-CNN)")
    strides = [s[0] if isinstance(s, (tuple, list)) else s for s in model.rpn_head.prior_generator.strides]
    if [int(s) for s in strides] != _RPN_STRIDES:
        raise ValueError(f"{_NAME}: detector.rpn_head.anchor_generator.strides must be {_RPN_STRIDES} (P3-P7 of "
                         f"view V1, P2-P6 of view V2), got {strides}")
    roi_head = getattr(model, "roi_head", None)
    if roi_head is None or not getattr(roi_head, "with_bbox", False):
        raise ValueError(f"{_NAME}: the detector needs a roi_head with a bbox_head (a Faster R-CNN)")
    if getattr(roi_head, "with_mask", False):
        raise ValueError(f"{_NAME}: roi_head.mask_head is not supported (PseCo trains boxes)")
    fs = [int(s) for s in roi_head.bbox_roi_extractor.featmap_strides]
    if not fs or fs != _RPN_STRIDES[:len(fs)]:
        raise ValueError(f"{_NAME}: detector.roi_head.bbox_roi_extractor.featmap_strides must start at 8 and double "
                         f"(the strides of P3-P7 in view V1), e.g. [8, 16, 32, 64], got {fs}")
    head = roi_head.bbox_head
    loss_cls = head.loss_cls
    if getattr(loss_cls, "use_sigmoid", False) and not getattr(head, "custom_cls_channels", False):
        raise ValueError(f"{_NAME}: detector.roi_head.bbox_head.loss_cls {type(loss_cls).__name__} is a sigmoid loss, "
                         "but mmdet's BBoxHead then keeps C + 1 class channels and softmax scores at test time; "
                         "use loss_cls=dict(type='RoIFocalLoss', gamma=2.0, alpha=0.25, loss_weight=10.0) "
                         "(registered by tbd_ops.mmdet)")


# ---- helpers ----------------------------------------------------------------------------------------
def _to_device(array: np.ndarray, device: torch.device, dtype=torch.float32) -> Tensor:
    """One host-to-device copy of metadata; pinned and non-blocking on CUDA (no stream synchronization)."""
    t = torch.from_numpy(np.ascontiguousarray(array)).to(dtype)
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def project_boxes(boxes: Tensor, mats: Tensor, shapes: Tensor) -> Tensor:
    """Boxes ``[R, 4]`` through per-row homographies ``[R, 3, 3]``, clipped to per-row ``(h, w)`` ``[R, 2]``.

    mmdet's ``bbox_project`` for a batch: the four corners are transformed and the
    enclosing axis-aligned box is clipped to ``[0, w] x [0, h]``.
    """
    # float32 also under autocast: matmul would run in float16/bfloat16 there, pixels off on large images.
    with torch.autocast(boxes.device.type, enabled=False):
        boxes, mats, shapes = boxes.float(), mats.float(), shapes.float()
        x1, y1, x2, y2 = boxes.unbind(-1)
        corners = torch.stack([torch.stack([x1, y1], -1), torch.stack([x2, y1], -1),
                               torch.stack([x1, y2], -1), torch.stack([x2, y2], -1)], 1)  # [R, 4, 2]
        corners = torch.cat([corners, corners.new_ones(corners.shape[:2] + (1,))], -1)
        out = torch.matmul(corners, mats.transpose(1, 2))  # [R, 4, 3]
        xy = out[..., :2] / out[..., 2:3]
        lo, hi = xy.amin(1), xy.amax(1)
        h, w = shapes[:, 0], shapes[:, 1]
        return torch.stack([lo[:, 0].clamp(min=0).minimum(w), lo[:, 1].clamp(min=0).minimum(h),
                            hi[:, 0].clamp(min=0).minimum(w), hi[:, 1].clamp(min=0).minimum(h)], -1)


def _at_label(bbox_pred: Tensor, labels: Tensor, num_classes: int, agnostic: bool) -> Tensor:
    """The 4 regression values of each row at its label (background rows: at the last class)."""
    if agnostic:
        return bbox_pred.view(bbox_pred.shape[0], -1)
    rows = torch.arange(bbox_pred.shape[0], device=bbox_pred.device)
    return bbox_pred.view(bbox_pred.shape[0], num_classes, -1)[rows, labels.clamp(max=num_classes - 1)]


@MODELS.register_module()
class PseCoDetector(SemiBaseDetector):
    """PseCo on Faster R-CNN (SPEC 4.2), a ``SemiBaseDetector`` for mmdet 3.x.

    Args:
        detector: the Faster R-CNN config of the student and the teacher (FPN with
            ``num_outs=6``, RPN anchor strides 8-128, RoI extractor strides from 8,
            ``roi_head.bbox_head.loss_cls=dict(type="RoIFocalLoss", ...)`` for
            PseCo's focal classification; a softmax ``CrossEntropyLoss`` head also
            works, its probabilities are then the softmax of the C foreground logits).
        semi_train_cfg: mmdet's keys ``freeze_teacher`` (True), ``sup_weight`` (1.0),
            ``unsup_weight`` (2.0), ``pseudo_label_initial_score_thr`` (0.3),
            ``rpn_pseudo_thr`` (0.5), ``cls_pseudo_thr`` (0.5),
            ``min_pseudo_bbox_wh`` ((0, 0): pseudo boxes must be wider and higher, in
            the teacher's and in the student's view); PseCo's ``use_teacher_proposal`` (True), ``use_MSL``
            (True), ``PLA_iou_thres`` (0.4), ``PLA_candidate_topk`` (12),
            ``PLA_alpha`` (0.5: quality ``s^alpha * u^(1-alpha)``), ``PCV_mode``
            ("pseco": ``w = sigma^2`` and ``reg_scale``; "paper": ``w = sigma``),
            ``scale_consistency_weight`` (0.0 = off: the feature-level loss
            ``loss_scale_consistency`` between V1's P3-P7 and V2's P2-P6).
        semi_test_cfg: ``predict_on`` ("teacher").
        data_preprocessor: a ``MultiBranchDataPreprocessor`` (branches ``sup``,
            ``unsup_teacher``, ``unsup_student``).
    """

    def __init__(self, detector: dict, semi_train_cfg: Optional[dict] = None, semi_test_cfg: Optional[dict] = None,
                 data_preprocessor: Optional[dict] = None, init_cfg=None) -> None:
        semi_train_cfg = check_semi_train_cfg(semi_train_cfg)
        semi_test_cfg = check_semi_test_cfg(semi_test_cfg)
        if isinstance(detector, dict) and not isinstance(detector, ConfigDict):
            detector = ConfigDict(detector)  # mmdet's detectors read train_cfg.rpn etc. as attributes
        super().__init__(detector=detector, semi_train_cfg=semi_train_cfg, semi_test_cfg=semi_test_cfg,
                         data_preprocessor=data_preprocessor, init_cfg=init_cfg)
        check_level_scheme(self.student)
        from mmdet.models.data_preprocessors import MultiBranchDataPreprocessor

        if not isinstance(self.data_preprocessor, MultiBranchDataPreprocessor):
            raise TypeError(f"{_NAME}: data_preprocessor must be a MultiBranchDataPreprocessor (branches "
                            f"{list(_BRANCHES)}) wrapping the detector's DetDataPreprocessor, got "
                            f"{type(self.data_preprocessor).__name__}")
        self._teacher_checked = False
        head = self.student.roi_head.bbox_head
        self.num_classes = int(head.num_classes)
        self.focal_head = isinstance(head.loss_cls, RoIFocalLoss)
        if self.focal_head:
            for model in (self.student, self.teacher):
                focal_prior_init(model.roi_head.bbox_head)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs) -> None:
        """mmdet's loading (a plain detector's checkpoint fills the student and the teacher), then a
        check that the checkpoint fits: mmengine's load_from and resume load non-strictly, so a
        checkpoint of another architecture would leave the mismatched weights at their
        initialization with a warning in the log. The class-dependent layers of the RoI head
        (fc_cls, fc_reg) may differ: starting from a detector trained on other classes is the
        usual fine-tuning, and mmengine's warning names them."""
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        from .checkpoint import CheckpointMismatchError, mismatches

        # Keys of other modules' state (non-tensor extra state, a wrapper's) are mmengine's to report.
        state = {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix) and hasattr(v, "shape")}
        parts = mismatches(self.state_dict(), state, unexpected_ok=True, shape_ok=_CLASS_LAYERS.search)
        if parts:
            raise CheckpointMismatchError(f"{_NAME}: the checkpoint (load_from / resume) does not fit the detector "
                                          "built from the config: " + "; ".join(parts))

    # ---- features --------------------------------------------------------------------------------
    @staticmethod
    def pyramid(model: nn.Module, images: Tensor) -> Tuple[Tensor, ...]:
        """Backbone + neck: the 6 levels P2-P7 (strides 4-128 of ``images``)."""
        feats = model.neck(model.backbone(images))
        h, w = images.shape[-2:]
        if len(feats) != 6:
            raise ValueError(f"{_NAME}: the neck must return 6 levels P2-P7, got {len(feats)}; set "
                             "neck=dict(..., num_outs=6)")
        if tuple(feats[0].shape[-2:]) != (math.ceil(h / 4), math.ceil(w / 4)):
            raise ValueError(f"{_NAME}: the neck's first output must be P2 (stride 4): an input {h}x{w} gives "
                             f"{math.ceil(h / 4)}x{math.ceil(w / 4)}, got {tuple(feats[0].shape[-2:])}; check "
                             "neck.start_level (0) and backbone.out_indices (from the first stage)")
        return tuple(feats)

    def _model(self, key: str) -> nn.Module:
        return self.teacher if self.semi_test_cfg.get(key, "teacher") == "teacher" else self.student

    def extract_feat(self, batch_inputs: Tensor) -> Tuple[Tensor, ...]:
        """P3-P7 of the teacher (or the student, ``semi_test_cfg.extract_feat_on``)."""
        return self.pyramid(self._model("extract_feat_on"), batch_inputs)[1:]

    # ---- labeled data ----------------------------------------------------------------------------
    @staticmethod
    def _two_stage_loss(model: nn.Module, x: Tuple[Tensor, ...], batch_data_samples: SampleList) -> dict:
        """``TwoStageDetector.loss`` on given features (P3-P7)."""
        losses = dict()
        proposal_cfg = model.train_cfg.get("rpn_proposal", model.test_cfg.rpn)
        rpn_data_samples = copy.deepcopy(batch_data_samples)
        for data_sample in rpn_data_samples:
            data_sample.gt_instances.labels = torch.zeros_like(data_sample.gt_instances.labels)
        rpn_losses, rpn_results_list = model.rpn_head.loss_and_predict(x, rpn_data_samples,
                                                                       proposal_cfg=proposal_cfg)
        for key in list(rpn_losses.keys()):
            if "loss" in key and "rpn" not in key:
                rpn_losses[f"rpn_{key}"] = rpn_losses.pop(key)
        losses.update(rpn_losses)
        losses.update(model.roi_head.loss(x, rpn_results_list, batch_data_samples))
        return losses

    def loss_by_gt_instances(self, batch_inputs: Tensor, batch_data_samples: SampleList) -> dict:
        x = self.pyramid(self.student, batch_inputs)[1:]
        losses = self._two_stage_loss(self.student, x, batch_data_samples)
        return rename_loss_dict("sup_", reweight_loss_dict(losses, self.semi_train_cfg.sup_weight))

    # ---- the semi-supervised step ----------------------------------------------------------------
    def train_step(self, data, optim_wrapper):
        """mmengine's train step, after a check of what a config can get wrong without an error of
        its own: every batch holds images of the three branches. (MMDistributedDataParallel runs
        its own train step: there mmengine's data preprocessor reports such a batch.)"""
        self._check_branches(data)
        return super().train_step(data, optim_wrapper)

    @staticmethod
    def _check_branches(data) -> None:
        inputs = data.get("inputs") if isinstance(data, dict) else None
        if not isinstance(inputs, dict):
            raise ValueError(f"{_NAME}: a training batch must hold the branches {list(_BRANCHES)}, got "
                             f"{type(inputs).__name__} inputs: every train pipeline (labeled and unlabeled) must end "
                             "in MultiBranch(branch_field=['sup', 'unsup_teacher', 'unsup_student'], ...)")
        counts = {b: sum(x is not None for x in inputs.get(b, ())) for b in _BRANCHES}
        empty = [b for b, c in counts.items() if c == 0]
        if empty:
            raise ValueError(f"{_NAME}: a training batch has no images in the branches {empty} (images per branch: "
                             f"{counts}): the train dataloader must mix labeled and unlabeled images in every batch "
                             "(ConcatDataset of both sets, GroupMultiSourceSampler with a source_ratio for each)")

    def _check_teacher_follows_student(self) -> None:
        """At the first step of a run that starts at iteration 0, the teacher must equal the student:
        mmdet's MeanTeacherHook copies the student into it before training and then moves it by
        EMA. Without the hook (a custom_hooks list in a config replaces the base's) the teacher
        would stay at its random initialization. One comparison, once per run."""
        hub = MessageHub.get_current_instance()
        if hub.get_info("iter") != 0 or hub.get_info("loop_stage") != "train":
            return  # a resumed run, or not driven by a Runner
        student = dict(self.student.rpn_head.named_parameters())
        teacher = dict(self.teacher.rpn_head.named_parameters())
        if not all(torch.equal(student[k], teacher[k]) for k in student):
            raise RuntimeError(
                f"{_NAME}: at the first iteration the teacher is not a copy of the student: it follows the student "
                "only through mmdet's MeanTeacherHook, which copies the student into it before training; add "
                "custom_hooks = [dict(type='MeanTeacherHook', momentum=0.001)] (a custom_hooks list in your config "
                "replaces the base config's)")

    def loss(self, multi_batch_inputs: Dict[str, Tensor], multi_batch_data_samples: Dict[str, SampleList]) -> dict:
        if not self._teacher_checked:  # the first step of this process (also under DDP)
            self._teacher_checked = True
            self._check_teacher_follows_student()
        losses = dict()
        losses.update(self.loss_by_gt_instances(multi_batch_inputs["sup"], multi_batch_data_samples["sup"]))
        teacher_info = self.teacher_predictions(multi_batch_inputs["unsup_teacher"],
                                                multi_batch_data_samples["unsup_teacher"],
                                                multi_batch_data_samples["unsup_student"])
        losses.update(self.loss_by_pseudo_instances(multi_batch_inputs["unsup_student"],
                                                    multi_batch_data_samples["unsup_student"], teacher_info))
        return losses

    def _teacher_roi_outputs(self, x_t: Tuple[Tensor, ...], rois_t: Tensor) -> Tuple[Tensor, Tensor]:
        """The teacher's class probabilities ``[P, C]`` and its boxes at its top class ``[P, 4]`` (teacher view)."""
        res = self.teacher.roi_head._bbox_forward(x_t, rois_t)
        return self._probs_and_top_boxes(res["cls_score"], res["bbox_pred"], rois_t)

    def _probs_and_top_boxes(self, cls_score: Tensor, bbox_pred: Tensor, rois: Tensor) -> Tuple[Tensor, Tensor]:
        head = self.teacher.roi_head.bbox_head
        c = self.num_classes
        cls_score, bbox_pred = cls_score.float(), bbox_pred.float()
        probs = cls_score.sigmoid() if self.focal_head else cls_score[:, :c].softmax(-1)
        top = probs.argmax(1)
        deltas = _at_label(bbox_pred, top, c, head.reg_class_agnostic)
        boxes = get_box_tensor(head.bbox_coder.decode(rois[:, 1:], deltas))
        return probs, boxes

    @torch.no_grad()
    def teacher_predictions(self, teacher_inputs: Tensor, teacher_samples: SampleList,
                            student_samples: SampleList) -> dict:
        """The teacher's pseudo instances (in the student's view) and its predictions for its proposals."""
        self.teacher.eval()
        device = teacher_inputs.device
        cfg = self.semi_train_cfg
        metas_t = [s.metainfo for s in teacher_samples]
        for branch, samples in (("unsup_teacher", teacher_samples), ("unsup_student", student_samples)):
            if any("homography_matrix" not in s for s in samples):
                raise ValueError(f"{_NAME}: the {branch} data samples need their 'homography_matrix' (add it to "
                                 "PackDetInputs' meta_keys, as mmdet's semi_coco_detection pipelines do)")
        # teacher view -> student view: H_s @ H_t^-1 (float64 on the host, one copy to the device)
        mats = np.stack([np.asarray(s.homography_matrix, np.float64) @ np.linalg.inv(
            np.asarray(t.homography_matrix, np.float64)) for t, s in zip(teacher_samples, student_samples)])
        shapes_s = np.array([s.img_shape[:2] for s in student_samples], np.float64)
        shapes_t = np.array([t.img_shape[:2] for t in teacher_samples], np.float64)
        meta = _to_device(np.concatenate([mats.reshape(-1, 9), np.linalg.inv(mats).reshape(-1, 9), shapes_s,
                                          shapes_t], 1), device)
        mats_d, inv_d, shapes_s_d, shapes_t_d = meta.split([9, 9, 2, 2], 1)
        mats_d, inv_d = mats_d.reshape(-1, 3, 3), inv_d.reshape(-1, 3, 3)

        x_t = self.pyramid(self.teacher, teacher_inputs)[1:]
        rpn_outs = self.teacher.rpn_head(x_t)
        proposal_cfg = self.teacher.train_cfg.get("rpn_proposal", self.teacher.test_cfg.rpn)
        proposals = self.teacher.rpn_head.predict_by_feat(*rpn_outs, batch_img_metas=metas_t, cfg=proposal_cfg,
                                                          rescale=False)
        boxes_t = [get_box_tensor(p.bboxes).float() for p in proposals]
        counts = [int(b.shape[0]) for b in boxes_t]
        rois_t = bbox2roi(boxes_t)
        roi_head = self.teacher.roi_head
        if rois_t.shape[0] == 0:
            dets = empty_instances(metas_t, device, task_type="bbox", box_type=roi_head.bbox_head.predict_box_type,
                                   num_classes=self.num_classes)
            probs = rois_t.new_zeros(0, self.num_classes)
            top_boxes = rois_t.new_zeros(0, 4)
        else:
            res = roi_head._bbox_forward(x_t, rois_t)
            dets = roi_head.bbox_head.predict_by_feat(
                rois=rois_t.split(counts), cls_scores=res["cls_score"].split(counts),
                bbox_preds=res["bbox_pred"].split(counts), batch_img_metas=metas_t,
                rcnn_test_cfg=self.teacher.test_cfg.rcnn, rescale=False)
            probs, top_boxes = self._probs_and_top_boxes(res["cls_score"], res["bbox_pred"], rois_t)

        # pseudo instances: score > initial threshold and the size filter in the teacher's view (as the
        # official code), then mapped into the student's view and the size filter again there
        min_w, min_h = cfg.min_pseudo_bbox_wh
        pseudo = []
        for i, d in enumerate(dets):
            b = get_box_tensor(d.bboxes).float()
            keep = (d.scores > cfg.pseudo_label_initial_score_thr) & ((b[:, 2] - b[:, 0]) > min_w) & (
                (b[:, 3] - b[:, 1]) > min_h)
            d, b = d[keep], b[keep]
            b = project_boxes(b, mats_d[i].expand(b.shape[0], 3, 3), shapes_s_d[i].expand(b.shape[0], 2))
            keep = ((b[:, 2] - b[:, 0]) > min_w) & ((b[:, 3] - b[:, 1]) > min_h)
            pseudo.append(InstanceData(bboxes=b[keep], labels=d.labels[keep], scores=d.scores[keep].float()))

        rows = rois_t[:, 0].long()
        info = dict(x_t=x_t, pseudo=pseudo, mats=mats_d, inv_mats=inv_d, shapes_s=shapes_s_d, shapes_t=shapes_t_d)
        if cfg.use_teacher_proposal:
            info.update(
                proposals=project_boxes(rois_t[:, 1:], mats_d[rows], shapes_s_d[rows]).split(counts),
                scores=probs.split(counts),
                boxes=project_boxes(top_boxes, mats_d[rows], shapes_s_d[rows]).split(counts))
        return info

    def loss_by_pseudo_instances(self, batch_inputs: Tensor, batch_data_samples: SampleList,
                                 batch_info: Optional[dict] = None) -> dict:
        cfg = self.semi_train_cfg
        info = batch_info
        pseudo = info["pseudo"]
        metas = [s.metainfo for s in batch_data_samples]
        losses = dict()

        feats = self.pyramid(self.student, batch_inputs)
        x1 = feats[1:]
        rpn_samples = []
        for meta, p in zip(metas, pseudo):
            keep = p.scores > cfg.rpn_pseudo_thr
            gt = InstanceData(bboxes=p.bboxes[keep], labels=torch.zeros_like(p.labels[keep]))
            rpn_samples.append(DetDataSample(metainfo=meta, gt_instances=gt))
        rpn_head = self.student.rpn_head
        if cfg.use_teacher_proposal:
            losses.update(rpn_head.loss(x1, rpn_samples))
            proposals, scores, boxes = info["proposals"], info["scores"], info["boxes"]
        else:
            proposal_cfg = self.student.train_cfg.get("rpn_proposal", self.student.test_cfg.rpn)
            rpn_losses, results = rpn_head.loss_and_predict(x1, rpn_samples, proposal_cfg=proposal_cfg)
            losses.update(rpn_losses)
            proposals, scores, boxes = self._teacher_on_student_proposals(info, results)
        x2 = None
        if cfg.use_MSL:
            v2 = F.interpolate(batch_inputs, scale_factor=0.5, mode="nearest")
            x2 = self.pyramid(self.student, v2)[:-1]
            losses.update({f"{k}_V2": v for k, v in rpn_head.loss(x2, rpn_samples).items()})

        roi_pseudo = [p[p.scores > cfg.cls_pseudo_thr] for p in pseudo]
        losses.update(self.roi_losses(x1, x2, list(proposals), list(scores), list(boxes),
                                      [p.bboxes for p in roi_pseudo], [p.labels for p in roi_pseudo]))
        if cfg.scale_consistency_weight > 0:
            if any(a.shape != b.shape for a, b in zip(x1, x2)):
                raise ValueError(f"{_NAME}: scale_consistency_weight > 0 needs V1's P3-P7 and V2's P2-P6 of equal "
                                 f"sizes (padded images of even height and width: pad_size_divisor=32), got "
                                 f"{[tuple(a.shape[-2:]) for a in x1]} and {[tuple(b.shape[-2:]) for b in x2]}")
            losses["loss_scale_consistency"] = cfg.scale_consistency_weight * tbd_ops.scale_consistency_loss(
                list(x1), list(x2))
        return rename_loss_dict("unsup_", reweight_loss_dict(losses, cfg.unsup_weight))

    @torch.no_grad()
    def _teacher_on_student_proposals(self, info: dict, results: List[InstanceData]):
        """``use_teacher_proposal=False``: the teacher's predictions for the student's proposals."""
        props = [get_box_tensor(r.bboxes).detach().float() for r in results]
        counts = [int(b.shape[0]) for b in props]
        rois_s = bbox2roi(props)
        rows = rois_s[:, 0].long()
        boxes_t = project_boxes(rois_s[:, 1:], info["inv_mats"][rows], info["shapes_t"][rows])
        rois_t = torch.cat([rois_s[:, :1], boxes_t], 1)
        probs, top_boxes = self._teacher_roi_outputs(info["x_t"], rois_t)
        boxes = project_boxes(top_boxes, info["mats"][rows], info["shapes_s"][rows])
        return props, probs.split(counts), boxes.split(counts)

    def roi_losses(self, x1: Sequence[Tensor], x2: Optional[Sequence[Tensor]], proposals: List[Tensor],
                   scores: List[Tensor], boxes: List[Tensor], pseudo_boxes: List[Tensor],
                   pseudo_labels: List[Tensor]) -> dict:
        """The unsupervised RoI losses (PLA, sampling, focal classification, PCV-weighted regression).

        Args:
            x1: the student's P3-P7 of view V1; x2: P2-P6 of view V2 or None.
            proposals: N tensors ``[P_n, 4]``: the RoIs in the student's view.
            scores: N tensors ``[P_n, C]``: the teacher's class probabilities of the RoIs.
            boxes: N tensors ``[P_n, 4]``: the teacher's boxes of the RoIs at their top class,
                in the student's view.
            pseudo_boxes, pseudo_labels: N tensors ``[M_n, 4]`` and ``[M_n]`` (student's view).

        Returns ``loss_cls``, ``loss_bbox`` (and ``loss_cls_V2``, ``loss_bbox_V2``) and
        ``pos_num`` (the positives among the sampled RoIs), unweighted.
        """
        cfg = self.semi_train_cfg
        roi_head = self.student.roi_head
        head = roi_head.bbox_head
        n = len(proposals)
        counts = [int(p.shape[0]) for p in proposals]
        all_props = torch.cat(proposals) if n else x1[0].new_zeros(0, 4)
        valid = (((all_props[:, 2] - all_props[:, 0]) * (all_props[:, 3] - all_props[:, 1])) > 0).split(counts)
        # PLA for the whole batch: one launch, no host synchronization.
        gt_inds, _ = tbd_ops.prediction_guided_assign(
            boxes, scores, pseudo_boxes, pseudo_labels, valid=list(valid), iou_thr=cfg.PLA_iou_thres,
            topk=cfg.PLA_candidate_topk, alpha=cfg.PLA_alpha)

        sampler = roi_head.bbox_sampler
        needs_overlaps = type(sampler) not in _SAMPLERS_WITHOUT_OVERLAPS
        sampling_results, sampled_gt_inds = [], []
        for i in range(n):  # mmdet's sampler works per image
            m = int(pseudo_boxes[i].shape[0])
            inds = gt_inds[i]
            if m:
                assigned = torch.where(inds > 0, pseudo_labels[i][(inds - 1).clamp(min=0)], inds.new_full((), -1))
            else:
                assigned = inds.new_full(inds.shape, -1)
            if needs_overlaps and m:
                overlaps = tbd_ops.box_max_iou(proposals[i][None], [pseudo_boxes[i]])[0][0]
            else:
                overlaps = proposals[i].new_zeros(inds.shape[0])
            assign_result = AssignResult(m, inds, overlaps, labels=assigned)
            res = sampler.sample(assign_result, InstanceData(priors=proposals[i]),
                                 InstanceData(bboxes=pseudo_boxes[i], labels=pseudo_labels[i]))
            sampling_results.append(res)
            sampled_gt_inds.append(torch.cat([res.pos_assigned_gt_inds + 1,
                                              res.pos_assigned_gt_inds.new_zeros(res.neg_inds.shape[0])]))
        sampled = [get_box_tensor(res.priors) for res in sampling_results]
        rois = bbox2roi(sampled)
        labels, label_weights, bbox_targets, _ = head.get_targets(sampling_results, self.student.train_cfg.rcnn)

        out1 = roi_head._bbox_forward(x1, rois)
        # PCV on the student's V1 boxes decoded at their labels (no clip), for the whole batch.
        deltas = _at_label(out1["bbox_pred"].detach().float(), labels, self.num_classes, head.reg_class_agnostic)
        pred_boxes = get_box_tensor(head.bbox_coder.decode(rois[:, 1:], deltas))
        _, w, reg_scale = tbd_ops.consistency_voting(list(pred_boxes.split([b.shape[0] for b in sampled])),
                                                     sampled_gt_inds, pseudo_boxes, mode=cfg.PCV_mode)
        w = torch.cat(w) if w else rois.new_zeros(0)
        losses = self._roi_terms(out1, rois, labels, label_weights, bbox_targets, w, reg_scale)
        if x2 is not None:
            out2 = roi_head._bbox_forward(x2, rois)
            losses.update({f"{k}_V2": v for k, v in self._roi_terms(
                out2, rois, labels, label_weights, bbox_targets, w, reg_scale).items()})
        losses["pos_num"] = (labels < self.num_classes).sum().float()
        return losses

    def _roi_terms(self, out: dict, rois: Tensor, labels: Tensor, label_weights: Tensor, bbox_targets: Tensor,
                   w: Tensor, reg_scale: Tensor) -> dict:
        head = self.student.roi_head.bbox_head
        cls_score = out["cls_score"]
        denom = label_weights.sum().float().clamp(min=1.0)
        if self.focal_head:
            lc = head.loss_cls
            loss_cls = lc.loss_weight * tbd_ops.sigmoid_focal_loss(
                cls_score, labels, label_weights, gamma=lc.gamma, alpha=lc.alpha, reduction="sum") / denom
        else:
            loss_cls = head.loss_cls(cls_score, labels, label_weights, reduction_override="none").sum() / denom
        pred = _at_label(out["bbox_pred"], labels, self.num_classes, head.reg_class_agnostic)
        if head.reg_decoded_bbox:
            pred = get_box_tensor(head.bbox_coder.decode(rois[:, 1:], pred))
        elem = head.loss_bbox(pred, bbox_targets, reduction_override="none")
        weight = w.to(elem.dtype)
        weight = weight[:, None] if elem.dim() == 2 else weight
        loss_bbox = reg_scale * (elem * weight).sum() / max(int(rois.shape[0]), 1)
        return dict(loss_cls=loss_cls, loss_bbox=loss_bbox)

    # ---- inference (P3-P7) -----------------------------------------------------------------------
    def predict(self, batch_inputs: Tensor, batch_data_samples: SampleList, rescale: bool = True) -> SampleList:
        model = self._model("predict_on")
        x = self.pyramid(model, batch_inputs)[1:]
        if batch_data_samples[0].get("proposals", None) is None:
            rpn_results_list = model.rpn_head.predict(x, batch_data_samples, rescale=False)
        else:
            rpn_results_list = [s.proposals for s in batch_data_samples]
        results_list = model.roi_head.predict(x, rpn_results_list, batch_data_samples, rescale=rescale)
        return model.add_pred_to_datasample(batch_data_samples, results_list)

    def _forward(self, batch_inputs: Tensor, batch_data_samples: SampleList) -> tuple:
        model = self._model("forward_on")
        x = self.pyramid(model, batch_inputs)[1:]
        rpn_results_list = model.rpn_head.predict(x, batch_data_samples, rescale=False)
        return (model.roi_head.forward(x, rpn_results_list, batch_data_samples),)
