"""Task-Balanced Distillation losses as ``nn.Module``s (SPEC 1.4, 1.6, 1.7, 3).

``TBDLoss`` takes the raw outputs of a one-stage MMDetection head (lists per
FPN level) for a student and a frozen teacher and returns
``{"loss_hd": ..., "loss_tfd": ...}``, already weighted. The pieces are usable
on their own: ``HarmonyDistillationLoss`` (HD), ``TaskWeightGenerator`` (TWG)
and ``TaskDecoupledFeatureLoss`` (TFD).
"""
import math
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

import tbd_ops
from tbd_ops.ops._utils import (CODERS, HD_MODES, acc_dtype, as_bool, as_float, as_floats, as_int, check_option,
                                schema_defaults)

_HD = schema_defaults("harmony_distillation_loss")
_PC = schema_defaults("channel_max_spatial_softmax")
_PR = schema_defaults("decode_max_iou")

# Default of TBDLoss's teacher_img_shapes: the student's img_shapes.
SAME = object()

__all__ = ["HarmonyDistillationLoss", "TaskWeightGenerator", "TaskDecoupledFeatureLoss", "TBDLoss"]



def _check_list(name: str, value, length: Optional[int] = None) -> List[Tensor]:
    if isinstance(value, Tensor) or not isinstance(value, (list, tuple)):
        raise TypeError(f"{name} must be a list of tensors (one per FPN level), got {type(value).__name__}")
    if length is not None and len(value) != length:
        raise ValueError(f"{name} must hold {length} levels, got {len(value)}")
    for i, t in enumerate(value):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name}[{i}] must be a torch.Tensor, got {type(t).__name__}")
    return list(value)


def _finite(owner: str, name: str, value, zero_ok: bool = True) -> float:
    """``value`` as a finite float ``>= 0`` (``> 0`` unless ``zero_ok``); TypeError or ValueError
    naming the argument otherwise."""
    value = as_float(owner, name, value)
    if not math.isfinite(value) or value < 0 or (value == 0 and not zero_ok):
        raise ValueError(f"{owner}: {name} must be a finite number {'>=' if zero_ok else '>'} 0, got {value}")
    return value


def _at_least_one(owner: str, name: str, value) -> int:
    value = as_int(owner, name, value)
    if value < 1:
        raise ValueError(f"{owner}: {name} must be >= 1, got {value}")
    return value


class HarmonyDistillationLoss(nn.Module):
    """IoU-guided harmony distillation (SPEC 1.4): ``loss_weight * L_HD``.

    ``forward(pc_s, pr_s, pc_t, pr_t)`` takes lists of ``[N, H_l, W_l]`` maps
    (p_c and per-location p_r of the student and of the teacher) and returns a
    0-d tensor. The teacher maps are treated as constants.
    """

    def __init__(self, mode: str = _HD["mode"], eps: float = _HD["eps"], loss_weight: float = 1.0):
        super().__init__()
        self.mode = check_option("HarmonyDistillationLoss", "mode", mode, HD_MODES)
        self.eps = _finite("HarmonyDistillationLoss", "eps", eps, zero_ok=False)
        self.loss_weight = _finite("HarmonyDistillationLoss", "loss_weight", loss_weight)

    def forward(self, pc_s, pr_s, pc_t, pr_t) -> Tensor:
        pc_t = [t.detach() for t in pc_t] if isinstance(pc_t, (list, tuple)) else pc_t.detach()
        pr_t = [t.detach() for t in pr_t] if isinstance(pr_t, (list, tuple)) else pr_t.detach()
        loss = tbd_ops.harmony_distillation_loss(pc_s, pr_s, pc_t, pr_t, mode=self.mode, eps=self.eps)
        return loss * self.loss_weight

    def extra_repr(self) -> str:
        return f"mode={self.mode!r}, eps={self.eps}, loss_weight={self.loss_weight}"


class TaskWeightGenerator(nn.Module):
    """TWG (SPEC 1.6): ``(T0, T1)`` per image from ``(p_c^t, p_r^t, p_c^s, p_r^s)``.

    Global average pool of the four (detached) maps -> FC(4 -> hidden) -> ReLU
    -> FC(hidden -> 2) -> softmax. One module is shared by all levels.
    ``forward(pc_t, pr_t, pc_s, pr_s)`` takes ``[N, H, W]`` maps of one level and
    returns ``[N, 2]``.
    """

    def __init__(self, hidden: int = 16):
        super().__init__()
        self.hidden = _at_least_one("TaskWeightGenerator", "hidden", hidden)
        self.fc1 = nn.Linear(4, self.hidden)
        self.fc2 = nn.Linear(self.hidden, 2)

    def forward(self, pc_t: Tensor, pr_t: Tensor, pc_s: Tensor, pr_s: Tensor) -> Tensor:
        maps = (pc_t, pr_t, pc_s, pr_s)
        shape = pc_t.shape
        for name, m in zip(("pc_t", "pr_t", "pc_s", "pr_s"), maps):
            if not isinstance(m, Tensor) or m.dim() != 3 or m.shape != shape:
                got = tuple(m.shape) if isinstance(m, Tensor) else type(m).__name__
                raise ValueError(f"TaskWeightGenerator: {name} must be [N, H, W] like pc_t {tuple(shape)}, got {got}")
        dtype = self.fc1.weight.dtype
        if shape[1] * shape[2] == 0:
            pooled = torch.zeros(shape[0], 4, dtype=dtype, device=pc_t.device)
        else:
            pooled = torch.stack([m.detach().to(dtype).mean(dim=(1, 2)) for m in maps], dim=1)
        return self.from_pooled(pooled)

    def from_pooled(self, pooled: Tensor) -> Tensor:
        """``[..., 2]`` weights from the pooled maps ``[..., 4]`` (means of ``pc_t, pr_t, pc_s, pr_s``),
        e.g. every level at once as ``[L, N, 4]``."""
        pooled = pooled.detach().to(self.fc1.weight.dtype)
        return torch.softmax(self.fc2(torch.relu(self.fc1(pooled))), dim=-1)


class TaskDecoupledFeatureLoss(nn.Module):
    """Task-decoupled feature distillation (SPEC 1.6): ``loss_weight * L_TFD``.

    Per level l: ``L_c = sum_hw M_c * sum_c (F^t - phi_l(F^s))^2`` and ``L_r``
    likewise, with ``M_c = p_c^t / sum p_c^t`` and ``M_r = p_r^t / sum p_r^t``
    (0 for an image without ground truth); ``L_TFD = sum_l mean_n (T0 * L_c +
    T1 * L_r)`` with ``(T0, T1)`` from the TWG, or fixed weights ``(w_c, w_r)``.
    Every level's ``L_c`` and ``L_r`` come from one ``masked_sq_dist`` call on the
    unnormalized maps, divided by the maps' sums afterwards (``sum M * d =
    sum p * d / sum p``), and the TWG runs once for all levels.

    Args:
        num_levels: FPN levels (one adapter each).
        in_channels: channels of the student features.
        teacher_channels: channels of the teacher features (default: in_channels).
        adapter_kernel: 1 (1x1 conv, default) or 3 (3x3 conv), no activation.
        twg_hidden: hidden width of the task weight generator.
        fixed_task_weights: ``(w_c, w_r)`` to use instead of the TWG.
        loss_weight: multiplier of the loss.
    """

    def __init__(self, num_levels: int = 5, in_channels: int = 256, teacher_channels: Optional[int] = None,
                 adapter_kernel: int = 1, twg_hidden: int = 16,
                 fixed_task_weights: Optional[Sequence[float]] = None, loss_weight: float = 1.0):
        super().__init__()
        if adapter_kernel not in (1, 3):
            raise ValueError(f"TaskDecoupledFeatureLoss: adapter_kernel must be 1 or 3, got {adapter_kernel!r}")
        self.num_levels = _at_least_one("TaskDecoupledFeatureLoss", "num_levels", num_levels)
        self.in_channels = _at_least_one("TaskDecoupledFeatureLoss", "in_channels", in_channels)
        self.teacher_channels = (self.in_channels if teacher_channels is None
                                 else _at_least_one("TaskDecoupledFeatureLoss", "teacher_channels", teacher_channels))
        self.adapters = nn.ModuleList(
            nn.Conv2d(self.in_channels, self.teacher_channels, adapter_kernel, padding=adapter_kernel // 2)
            for _ in range(self.num_levels))
        if fixed_task_weights is None:
            self.twg = TaskWeightGenerator(twg_hidden)
            self.fixed_task_weights = None
        else:
            w = as_floats("TaskDecoupledFeatureLoss", "fixed_task_weights", fixed_task_weights)
            if len(w) != 2 or not all(math.isfinite(v) and v >= 0 for v in w):
                raise ValueError("TaskDecoupledFeatureLoss: fixed_task_weights must be two finite numbers >= 0 "
                                 f"(w_c, w_r), got {fixed_task_weights!r}")
            self.twg = None
            self.fixed_task_weights = tuple(w)
            # A buffer follows the module to its device: no host-to-device copy per forward.
            self.register_buffer("_fixed_weights", torch.tensor(w, dtype=torch.float64), persistent=False)
        self.loss_weight = _finite("TaskDecoupledFeatureLoss", "loss_weight", loss_weight)

    def task_weights(self, pc_t: Tensor, pr_t: Tensor, pc_s: Tensor, pr_s: Tensor,
                     dtype: torch.dtype = torch.float32) -> Tensor:
        """``[N, 2]`` weights ``(T0, T1)`` of one level."""
        if self.twg is not None:
            return self.twg(pc_t, pr_t, pc_s, pr_s).to(dtype)
        return self._fixed_weights.to(device=pc_t.device, dtype=dtype).expand(pc_t.shape[0], 2)

    def adapt(self, l: int, fs: Tensor) -> Tensor:
        """``phi_l(F^s)``: the adapter of level ``l`` on the student features ``[N, C, H, W]``.

        On the CPU a 1x1 adapter on contiguous features runs as one batched GEMM
        (``W [C_t, C] @ F^s [N, C, H*W] + b``), the same product that a 1x1
        convolution computes: forward and backward about twice as fast as
        oneDNN's convolution on NCHW on an Intel Xeon, as fast on an AMD EPYC.
        On CUDA, and for 3x3 adapters or other layouts, the convolution (also
        under autocast and for mixed dtypes).
        """
        conv = self.adapters[l]
        if (fs.device.type != "cpu" or conv.kernel_size != (1, 1) or fs.dim() != 4 or not fs.is_contiguous()
                or fs.dtype != conv.weight.dtype or torch.is_autocast_enabled("cpu")):
            return conv(fs)
        n, c, h, w = fs.shape
        ct = conv.out_channels
        weight = conv.weight.view(1, ct, c).expand(n, ct, c)
        if conv.bias is None:
            return torch.bmm(weight, fs.view(n, c, h * w)).view(n, ct, h, w)
        bias = conv.bias.view(1, ct, 1).expand(n, ct, h * w)
        return torch.baddbmm(bias, weight, fs.view(n, c, h * w)).view(n, ct, h, w)

    def forward(self, student_feats, teacher_feats, pc_t, pr_t, pc_s, pr_s) -> Tensor:
        L = self.num_levels
        student_feats = _check_list("TaskDecoupledFeatureLoss: student_feats", student_feats, L)
        teacher_feats = _check_list("TaskDecoupledFeatureLoss: teacher_feats", teacher_feats, L)
        maps = [_check_list(f"TaskDecoupledFeatureLoss: {name}", m, L)
                for name, m in (("pc_t", pc_t), ("pr_t", pr_t), ("pc_s", pc_s), ("pr_s", pr_s))]
        teachers, adapted, masks, sums, means = [], [], [], [], []
        for l in range(L):
            fs, ft = student_feats[l], teacher_feats[l].detach()
            if fs.dim() != 4 or fs.shape[1] != self.in_channels:
                raise ValueError(f"TaskDecoupledFeatureLoss: student_feats[{l}] must be [N, {self.in_channels}, H, W], "
                                 f"got {tuple(fs.shape)}")
            if ft.dim() != 4 or ft.shape[1] != self.teacher_channels or ft.shape[0] != fs.shape[0] \
                    or ft.shape[2:] != fs.shape[2:]:
                raise ValueError(f"TaskDecoupledFeatureLoss: teacher_feats[{l}] must be "
                                 f"[{fs.shape[0]}, {self.teacher_channels}, {fs.shape[2]}, {fs.shape[3]}], "
                                 f"got {tuple(ft.shape)}")
            weight = self.adapters[l].weight
            autocast = torch.is_autocast_enabled(fs.device.type)
            if not fs.is_floating_point() or (fs.dtype != weight.dtype and not autocast):
                raise TypeError(f"TaskDecoupledFeatureLoss: student_feats[{l}] is {fs.dtype}, the adapters are "
                                f"{weight.dtype}: convert the module (.to({fs.dtype})) or the features, or run "
                                "under torch.autocast")
            n, _, h, w = fs.shape
            lv = [m[l] for m in maps]
            for name, m in zip(("pc_t", "pr_t", "pc_s", "pr_s"), lv):
                if m.shape != (n, h, w):
                    raise ValueError(f"TaskDecoupledFeatureLoss: {name}[{l}] must be [{n}, {h}, {w}] (the feature "
                                     f"map of level {l}), got {tuple(m.shape)}")
            a = self.adapt(l, fs)
            acc = acc_dtype(a.dtype)
            # The level's four maps in one [N, 4, H, W] tensor: its first two channels are TFD's
            # masks (a view, normalized below through their sums), the sums of all four give the
            # TWG's pooled means.
            four = torch.stack([m.detach().to(acc) for m in lv], dim=1)
            s = four.sum(dim=(2, 3))
            sums.append(s[:, :2])
            means.append(s * (1.0 / max(h * w, 1)))
            masks.append(four[:, :2].to(a.dtype))
            teachers.append(ft.to(a.dtype))
            adapted.append(a)
        # Every level in one call: [N, 2] per level (one launch sequence on CUDA).
        dist = torch.stack(tbd_ops.masked_sq_dist(teachers, adapted, masks))  # [L, N, 2]
        # The masks are M = p / sum_hw p (0 for a map that sums to 0): sum_hw M * d = (sum_hw p * d) / sum_hw p.
        total = torch.stack(sums).to(dist.dtype)
        positive = total > 0
        dist = torch.where(positive, dist / torch.where(positive, total, torch.ones_like(total)), torch.zeros_like(dist))
        if self.twg is not None:
            weights = self.twg.from_pooled(torch.stack(means)).to(dist.dtype)  # [L, N, 2], every level at once
        else:
            weights = self._fixed_weights.to(device=dist.device, dtype=dist.dtype)
        return (weights * dist).sum() * (self.loss_weight / max(dist.shape[1], 1))


class TBDLoss(nn.Module):
    """The whole TBD loss from raw one-stage head outputs (SPEC 1.2-1.7, 3).

    ``forward(student_cls_scores, student_bbox_preds, student_feats,
    teacher_cls_scores, teacher_bbox_preds, teacher_feats, priors, gt_bboxes,
    img_shapes=None, teacher_img_shapes=SAME)`` with MMDetection's layouts: ``cls_scores[l]``
    ``[N, A*C, H, W]`` raw logits, ``bbox_preds[l]`` ``[N, A*4, H, W]``,
    ``feats[l]`` ``[N, in_channels, H, W]``, ``priors[l]`` ``[H*W*A, 4]``
    anchors or ``[H*W, 2]`` points, ``gt_bboxes`` a list of N ``[G_n, 4]``,
    ``img_shapes`` a list of N ``(h, w)`` used to clip each image's decoded
    boxes (None: no clipping), ``teacher_img_shapes`` the same for the
    teacher's boxes (default: ``img_shapes``; e.g. None for a teacher whose
    box coder does not clip while the student's does). Returns ``{"loss_hd": alpha * L_HD, "loss_tfd": beta * L_TFD}``.
    Teacher inputs are never differentiated.

    p_c per level is the spatial softmax of the max over all A*C channels;
    p_r per location is the max over the A anchors of the max IoU of the
    decoded box with the image's ground truths.

    Args:
        num_levels, in_channels: FPN levels and student feature channels.
        coder: ``"delta_xywh"`` (RetinaNet, ATSS), ``"distance"`` (FCOS) or ``"none"``.
        coder_cfg: ``means``, ``stds``, ``wh_ratio_clip`` (``delta_xywh``);
            ``scales``, one per level (``distance``; e.g. the strides for FCOS
            with ``norm_on_bbox``).
        teacher_coder_cfg: the same for the teacher's ``bbox_preds`` when they
            are in another convention (default: ``coder_cfg``). E.g. mmdet's
            ``FCOSHead`` with ``norm_on_bbox`` outputs distances in units of the
            stride in training mode but in pixels in eval mode: a student in
            training mode needs ``scales`` = the strides, a teacher in eval
            mode ``scales`` = 1.
        hd_mode: ``"iou_guided"`` (default) or ``"plain"``.
        hd_weight, tfd_weight: alpha and beta.
        adapter_kernel, twg_hidden, fixed_task_weights: see ``TaskDecoupledFeatureLoss``.
        temperature, scale_by_hw: options of p_c (see ``channel_max_spatial_softmax``).
        teacher_channels: channels of the teacher features (default: in_channels).
    """

    def __init__(self, num_levels: int = 5, in_channels: int = 256, coder: str = _PR["coder"],
                 coder_cfg: Optional[dict] = None, hd_mode: str = _HD["mode"], hd_weight: float = 1.0,
                 tfd_weight: float = 1.0, adapter_kernel: int = 1, twg_hidden: int = 16,
                 fixed_task_weights: Optional[Sequence[float]] = None, temperature: float = _PC["temperature"],
                 scale_by_hw: bool = _PC["scale_by_hw"], teacher_channels: Optional[int] = None,
                 teacher_coder_cfg: Optional[dict] = None):
        super().__init__()
        check_option("TBDLoss", "coder", coder, CODERS)
        self.num_levels = _at_least_one("TBDLoss", "num_levels", num_levels)
        self.coder = coder
        self.coder_kwargs, self.scales = self._parse_coder_cfg(coder, dict(coder_cfg or {}), self.num_levels)
        if teacher_coder_cfg is None:
            self.teacher_coder_kwargs, self.teacher_scales = self.coder_kwargs, self.scales
        else:
            self.teacher_coder_kwargs, self.teacher_scales = self._parse_coder_cfg(
                coder, dict(teacher_coder_cfg), self.num_levels, "teacher_coder_cfg")
        self.temperature = _finite("TBDLoss", "temperature", temperature, zero_ok=False)
        self.scale_by_hw = as_bool("TBDLoss", "scale_by_hw", scale_by_hw)
        self.hd = HarmonyDistillationLoss(mode=hd_mode, loss_weight=hd_weight)
        self.tfd = TaskDecoupledFeatureLoss(num_levels, in_channels, teacher_channels, adapter_kernel, twg_hidden,
                                            fixed_task_weights, loss_weight=tfd_weight)

    @staticmethod
    def _parse_coder_cfg(coder: str, cfg: dict, num_levels: int,
                         name: str = "coder_cfg") -> Tuple[dict, List[float]]:
        allowed = {"delta_xywh": {"means", "stds", "wh_ratio_clip"}, "distance": {"scales"}, "none": set()}[coder]
        unknown = sorted(set(cfg) - allowed)
        if unknown:
            raise ValueError(f"TBDLoss: {name} keys {unknown} do not apply to coder {coder!r} "
                             f"(allowed: {sorted(allowed)})")
        kwargs = {}
        if coder == "delta_xywh":
            for key in ("means", "stds"):
                if key in cfg:
                    kwargs[key] = tuple(as_floats("TBDLoss", f"{name}[{key!r}]", cfg[key], 4))
            if "wh_ratio_clip" in cfg:
                kwargs["wh_ratio_clip"] = as_float("TBDLoss", f"{name}['wh_ratio_clip']", cfg["wh_ratio_clip"])
        scales = [1.0] * num_levels
        if "scales" in cfg:
            scales = as_floats("TBDLoss", f"{name}['scales']", cfg["scales"])
            if len(scales) != num_levels:
                raise ValueError(f"TBDLoss: {name}['scales'] must hold one value per level ({num_levels}), "
                                 f"got {cfg['scales']!r}")
        # The op's own checks of the values (finite means and stds, wh_ratio_clip > 0, finite
        # scales) at construction, on an empty batch, rather than at the first forward.
        priors = None if coder == "none" else torch.empty(0, 4 if coder == "delta_xywh" else 2)
        for scale in sorted(set(scales)):
            try:
                tbd_ops.decode_max_iou(torch.empty(0, 0, 4), priors, [], coder=coder, scale=scale, **kwargs)
            except ValueError as e:
                raise ValueError(f"TBDLoss: {name}: {e}") from None
        return kwargs, scales

    def probabilities(self, cls_scores: List[Tensor], bbox_preds: List[Tensor], priors, gt_bboxes,
                      img_shapes=None, teacher: bool = False) -> Tuple[List[Tensor], List[Tensor]]:
        """``(p_c, p_r)`` per level, each ``[N, H_l, W_l]`` (``teacher``: decode with ``teacher_coder_cfg``)."""
        p_c = tbd_ops.channel_max_spatial_softmax(cls_scores, self.temperature, self.scale_by_hw)
        kwargs, scales = (self.teacher_coder_kwargs, self.teacher_scales) if teacher else (self.coder_kwargs,
                                                                                           self.scales)
        results = tbd_ops.decode_max_iou(
            bbox_preds, None if self.coder == "none" else priors, gt_bboxes, coder=self.coder,
            scale=scales, max_shape=img_shapes, **kwargs)
        shapes = [b.shape for b in bbox_preds]
        anchors = {a4 // 4 for _, a4, _, _ in shapes}
        if anchors == {1}:  # one prior per location (e.g. FCOS): the max over one anchor is the IoU itself
            return p_c, [iou.view(n, h, w) for (iou, _), (n, _, h, w) in zip(results, shapes)]
        if len(anchors) > 1:
            return p_c, [iou.view(n, h, w, a4 // 4).amax(dim=-1) for (iou, _), (n, a4, h, w) in zip(results, shapes)]
        # The max over the A anchors of every level in one op (the prior index is (h * W + w) * A + a
        # at every level): the levels' [N, H*W*A] IoUs side by side, then views of the [N, sum H*W] maxima.
        n, a = shapes[0][0], anchors.pop()
        ious = [iou for iou, _ in results]
        total = sum(h * w for _, _, h, w in shapes)
        best = (torch.cat(ious, dim=1) if len(ious) > 1 else ious[0]).view(n, total, a).amax(dim=-1)
        return p_c, [m.view(n, h, w) for m, (_, _, h, w) in zip(best.split([h * w for _, _, h, w in shapes], dim=1),
                                                                   shapes)]

    def forward(self, student_cls_scores, student_bbox_preds, student_feats, teacher_cls_scores,
                teacher_bbox_preds, teacher_feats, priors, gt_bboxes, img_shapes=None,
                teacher_img_shapes=SAME) -> Dict[str, Tensor]:
        L = self.num_levels
        s_cls = _check_list("TBDLoss: student_cls_scores", student_cls_scores, L)
        s_box = _check_list("TBDLoss: student_bbox_preds", student_bbox_preds, L)
        t_cls = _check_list("TBDLoss: teacher_cls_scores", teacher_cls_scores, L)
        t_box = _check_list("TBDLoss: teacher_bbox_preds", teacher_bbox_preds, L)
        s_feat = _check_list("TBDLoss: student_feats", student_feats, L)
        t_feat = _check_list("TBDLoss: teacher_feats", teacher_feats, L)
        if self.coder != "none":
            priors = _check_list("TBDLoss: priors", priors, L)
        for l in range(L):
            ref = s_cls[l]
            if ref.dim() != 4:
                raise ValueError(f"TBDLoss: student_cls_scores[{l}] must be [N, A*C, H, W], got {tuple(ref.shape)}")
            n, _, h, w = ref.shape
            for name, t in (("student_bbox_preds", s_box[l]), ("teacher_bbox_preds", t_box[l])):
                if t.dim() != 4 or t.shape[0] != n or t.shape[2:] != ref.shape[2:] or t.shape[1] % 4 or t.shape[1] == 0:
                    raise ValueError(f"TBDLoss: {name}[{l}] must be [{n}, A*4, {h}, {w}], got {tuple(t.shape)}")
            if t_cls[l].dim() != 4 or t_cls[l].shape[0] != n or t_cls[l].shape[2:] != ref.shape[2:]:
                raise ValueError(f"TBDLoss: teacher_cls_scores[{l}] must be [{n}, K, {h}, {w}], "
                                 f"got {tuple(t_cls[l].shape)}")
        n = s_cls[0].shape[0]
        if not isinstance(gt_bboxes, (list, tuple)) or len(gt_bboxes) != n:
            got = len(gt_bboxes) if isinstance(gt_bboxes, (list, tuple)) else type(gt_bboxes).__name__
            raise ValueError(f"TBDLoss: gt_bboxes must be a list of one [G_n, 4] tensor per image (N = {n}), got {got}")
        if teacher_img_shapes is SAME:
            teacher_img_shapes = img_shapes
        for name, shapes in (("img_shapes", img_shapes), ("teacher_img_shapes", teacher_img_shapes)):
            if shapes is None:
                continue
            if isinstance(shapes, Tensor):
                if shapes.shape != (n, 2):
                    raise ValueError(f"TBDLoss: {name} must be [N, 2] = [{n}, 2], got {tuple(shapes.shape)}")
            elif len(shapes) != n:
                raise ValueError(f"TBDLoss: {name} must hold one (h, w) per image (N = {n}), got {len(shapes)}")

        pc_s, pr_s = self.probabilities(s_cls, s_box, priors, gt_bboxes, img_shapes)
        with torch.no_grad():
            pc_t, pr_t = self.probabilities([t.detach() for t in t_cls], [t.detach() for t in t_box],
                                            priors, [g.detach() for g in gt_bboxes], teacher_img_shapes, teacher=True)
        loss_hd = self.hd(pc_s, pr_s, pc_t, pr_t)
        loss_tfd = self.tfd(s_feat, [f.detach() for f in t_feat], pc_t, pr_t, pc_s, pr_s)
        return {"loss_hd": loss_hd, "loss_tfd": loss_tfd}
