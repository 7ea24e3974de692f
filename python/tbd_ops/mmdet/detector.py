"""TBD distillation detector for MMDetection 3.x one-stage heads.

In the spirit of mmdet's ``KnowledgeDistillationSingleStageDetector``: the
student is an ordinary ``SingleStageDetector``; the teacher is built from its
own config (plus an optional checkpoint), frozen and kept in eval mode, and is
not a submodule (its weights are neither trained nor saved with the student).
``loss()`` returns the student's own losses plus ``loss_hd`` and ``loss_tfd``
from ``tbd_ops.nn.TBDLoss``, with the priors of the student head's prior
generator, the box coder of its ``bbox_coder`` and the ground truths and
``img_shape`` of the data samples.

Supported heads: anchor heads with ``DeltaXYWHBBoxCoder`` (RetinaNet, ATSS, ...)
and point heads with ``DistancePointBBoxCoder`` (FCOS; predictions scaled by
the stride when the head has ``norm_on_bbox``).
"""
import copy
from pathlib import Path
from typing import Dict, List, Optional, Tuple, Union

import torch
from torch import Tensor, nn

from mmengine.config import Config
from mmengine.hub import get_config
from mmengine.runner import load_checkpoint
from mmdet.models.detectors.single_stage import SingleStageDetector
from mmdet.models.utils import unpack_gt_instances
from mmdet.registry import MODELS
from mmdet.structures import SampleList

from ..nn import HarmonyDistillationLoss, TaskDecoupledFeatureLoss, TaskWeightGenerator, TBDLoss

for _cls in (TBDLoss, HarmonyDistillationLoss, TaskDecoupledFeatureLoss, TaskWeightGenerator):
    MODELS.register_module(name=_cls.__name__, module=_cls, force=True)


def coder_from_head(head: nn.Module) -> Tuple[str, dict]:
    """``(coder, coder_cfg)`` for ``TBDLoss`` from an mmdet dense head."""
    bbox_coder = getattr(head, "bbox_coder", None)
    name = type(bbox_coder).__name__ if bbox_coder is not None else None
    strides = [s[0] if isinstance(s, (tuple, list)) else s for s in head.prior_generator.strides]
    if name == "DeltaXYWHBBoxCoder":
        if getattr(bbox_coder, "add_ctr_clamp", False):
            raise NotImplementedError("TBDSingleStageDetector: DeltaXYWHBBoxCoder(add_ctr_clamp=True) is not supported")
        return "delta_xywh", dict(means=tuple(float(m) for m in bbox_coder.means),
                                  stds=tuple(float(s) for s in bbox_coder.stds))
    if name == "DistancePointBBoxCoder":
        scales = [float(s) for s in strides] if getattr(head, "norm_on_bbox", False) else [1.0] * len(strides)
        return "distance", dict(scales=scales)
    raise NotImplementedError(
        f"TBDSingleStageDetector: the student head's bbox_coder {name!r} is not supported "
        "(supported: DeltaXYWHBBoxCoder, DistancePointBBoxCoder)")


def _clips(head: nn.Module) -> bool:
    return bool(getattr(getattr(head, "bbox_coder", None), "clip_border", True))


@MODELS.register_module()
class TBDSingleStageDetector(SingleStageDetector):
    """One-stage student distilled from a frozen one-stage teacher with TBD.

    Args:
        backbone, neck, bbox_head, train_cfg, test_cfg, data_preprocessor,
            init_cfg: the student, as for ``SingleStageDetector``.
        teacher_config: the teacher: a config file path (``"mmdet::..."`` for
            a config shipped with mmdet), a ``Config``/dict with
            a ``model`` key, or the model dict itself. Teacher and student must
            have the same FPN levels and head layout (A anchors per location).
        teacher_ckpt: optional checkpoint of the teacher.
        eval_teacher: keep the teacher in eval mode (default True).
        tbd_loss: keyword arguments of ``tbd_ops.nn.TBDLoss`` (``hd_weight``,
            ``tfd_weight``, ``hd_mode``, ``adapter_kernel``, ...). ``num_levels``,
            ``in_channels``, ``teacher_channels``, ``coder`` and ``coder_cfg``
            default to what the student and teacher say.
    """

    def __init__(self, backbone: dict, neck: dict, bbox_head: dict,
                 teacher_config: Union[str, Path, dict, Config], teacher_ckpt: Optional[str] = None,
                 eval_teacher: bool = True, tbd_loss: Optional[dict] = None,
                 train_cfg: Optional[dict] = None, test_cfg: Optional[dict] = None,
                 data_preprocessor: Optional[dict] = None, init_cfg=None) -> None:
        super().__init__(backbone=backbone, neck=neck, bbox_head=bbox_head, train_cfg=train_cfg,
                         test_cfg=test_cfg, data_preprocessor=data_preprocessor, init_cfg=init_cfg)
        if isinstance(teacher_config, (str, Path)):
            path = str(teacher_config)
            # "mmdet::retinanet/..." names a config shipped with a package.
            teacher_config = get_config(path) if "::" in path else Config.fromfile(path)
        teacher_config = copy.deepcopy(dict(teacher_config))
        model_cfg = teacher_config["model"] if "model" in teacher_config else teacher_config
        teacher = MODELS.build(model_cfg)
        if teacher_ckpt is not None:
            load_checkpoint(teacher, teacher_ckpt, map_location="cpu")
        for p in teacher.parameters():
            p.requires_grad_(False)
        self.eval_teacher = eval_teacher
        self.teacher_model = teacher  # not a submodule (see __setattr__)
        teacher.train(not eval_teacher)

        cfg = dict(tbd_loss or {})
        cfg.pop("type", None)
        s_levels = self.bbox_head.prior_generator.num_levels
        t_levels = teacher.bbox_head.prior_generator.num_levels
        if s_levels != t_levels:
            raise ValueError(f"TBDSingleStageDetector: student and teacher must have the same FPN levels, "
                             f"got {s_levels} and {t_levels}")
        s_a = self.bbox_head.num_base_priors
        t_a = teacher.bbox_head.num_base_priors
        if s_a != t_a:
            raise ValueError(f"TBDSingleStageDetector: student and teacher heads must have the same priors per "
                             f"location, got {s_a} and {t_a}")
        coder, coder_cfg = coder_from_head(self.bbox_head)
        cfg.setdefault("num_levels", s_levels)
        cfg.setdefault("in_channels", self.bbox_head.in_channels)
        cfg.setdefault("teacher_channels", teacher.bbox_head.in_channels)
        cfg.setdefault("coder", coder)
        cfg.setdefault("coder_cfg", coder_cfg)
        self.tbd_loss = TBDLoss(**cfg)
        self._clip_to_image = _clips(self.bbox_head)

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

    def loss(self, batch_inputs: Tensor, batch_data_samples: SampleList) -> Union[dict, list]:
        """The student's detection losses plus ``loss_hd`` and ``loss_tfd``."""
        feats = self.extract_feat(batch_inputs)
        outs = self.bbox_head(feats)
        cls_scores, bbox_preds = list(outs[0]), list(outs[1])
        batch_gt_instances, batch_gt_instances_ignore, batch_img_metas = unpack_gt_instances(batch_data_samples)
        losses = self.bbox_head.loss_by_feat(*outs, batch_gt_instances, batch_img_metas, batch_gt_instances_ignore)

        with torch.no_grad():
            t_feats = self.teacher_model.extract_feat(batch_inputs)
            t_outs = self.teacher_model.bbox_head(t_feats)
        sizes = [c.shape[-2:] for c in cls_scores]
        priors = self.bbox_head.prior_generator.grid_priors(sizes, dtype=bbox_preds[0].dtype,
                                                             device=bbox_preds[0].device)
        gt_bboxes = [g.bboxes for g in batch_gt_instances]
        img_shapes = [tuple(m["img_shape"][:2]) for m in batch_img_metas] if self._clip_to_image else None
        losses.update(self.tbd_loss(cls_scores, bbox_preds, list(feats), list(t_outs[0]), list(t_outs[1]),
                                    list(t_feats), priors, gt_bboxes, img_shapes))
        return losses
