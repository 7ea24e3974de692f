"""PseCoDetector (tbd_ops.mmdet) with the real mmdet 3.3.0 and mmengine's Runner.

* the Runner trains a ResNet-18 PseCoDetector from a config file on a generated labeled +
  unlabeled set (mmdet's semi-supervised layout, MeanTeacherHook): the supervised and
  unsupervised losses (``_V2`` included) are logged and finite, the unsupervised RoI losses
  are driven by pseudo boxes, the teacher gets no gradient and moves only by the EMA, the
  assignment and the voting run once per batch, and the Runner resumes from its checkpoint;
* the unsupervised RoI losses equal an independent composition written here from the
  formulas, with per-image loops in plain PyTorch as the official implementation;
* the errors for a model outside the V1/V2 level scheme and for bad semi_train_cfg values;
* the shipped configs parse and build.
"""
import copy
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from tbd_ops import mmcv_lite

mmcv_lite.install()
pytest.importorskip("mmdet", reason="mmdet is not installed (make test installs mmdet==3.3.0)")
pytest.importorskip("mmengine", reason="mmengine is not installed (make test installs mmengine==0.10.7)")

from mmengine.config import Config  # noqa: E402
from mmengine.hooks import Hook  # noqa: E402
from mmengine.logging import MMLogger  # noqa: E402
from mmengine.structures import InstanceData  # noqa: E402
from mmdet.models.task_modules.assigners import AssignResult  # noqa: E402
from mmdet.registry import MODELS  # noqa: E402
from mmdet.structures.bbox import bbox2roi  # noqa: E402
from mmdet.utils import register_all_modules  # noqa: E402

import tbd_ops  # noqa: E402
import tbd_ops.mmdet  # noqa: E402,F401
import runner_harness as rh  # noqa: E402

register_all_modules()
MMLogger.get_instance("mmengine", log_level="ERROR")

CONFIG_DIR = Path(tbd_ops.__file__).parent / "configs" / "pseco"


def detector(num_classes=3, channels=32, focal=True, sampler_num=512):
    """A small Faster R-CNN in PseCo's level scheme (FPN P2-P7, RPN on strides 8-128)."""
    return dict(
        type="FasterRCNN",
        data_preprocessor=dict(type="DetDataPreprocessor", mean=rh.MEAN, std=rh.STD, bgr_to_rgb=True,
                               pad_size_divisor=32),
        backbone=dict(type="ResNet", depth=18, num_stages=4, out_indices=(0, 1, 2, 3), frozen_stages=-1,
                      norm_cfg=dict(type="BN", requires_grad=True), norm_eval=False, style="pytorch", init_cfg=None),
        neck=dict(type="FPN", in_channels=[64, 128, 256, 512], out_channels=channels, num_outs=6,
                  add_extra_convs="on_input"),
        rpn_head=dict(
            type="RPNHead", in_channels=channels, feat_channels=channels,
            anchor_generator=dict(type="AnchorGenerator", scales=[4], ratios=[0.5, 1.0, 2.0],
                                  strides=[8, 16, 32, 64, 128]),
            bbox_coder=dict(type="DeltaXYWHBBoxCoder", target_means=[0.0] * 4, target_stds=[1.0] * 4),
            loss_cls=dict(type="CrossEntropyLoss", use_sigmoid=True, loss_weight=1.0),
            loss_bbox=dict(type="L1Loss", loss_weight=1.0)),
        roi_head=dict(
            type="StandardRoIHead",
            bbox_roi_extractor=dict(type="SingleRoIExtractor",
                                    roi_layer=dict(type="RoIAlign", output_size=7, sampling_ratio=0,
                                                   use_torchvision=True),
                                    out_channels=channels, featmap_strides=[8, 16, 32, 64]),
            bbox_head=dict(
                type="Shared2FCBBoxHead", in_channels=channels, fc_out_channels=64, roi_feat_size=7,
                num_classes=num_classes,
                bbox_coder=dict(type="DeltaXYWHBBoxCoder", target_means=[0.0] * 4,
                                target_stds=[0.1, 0.1, 0.2, 0.2]),
                reg_class_agnostic=False,
                loss_cls=(dict(type="RoIFocalLoss", gamma=2.0, alpha=0.25, loss_weight=10.0) if focal else
                          dict(type="CrossEntropyLoss", use_sigmoid=False, loss_weight=1.0)),
                loss_bbox=dict(type="L1Loss", loss_weight=1.0))),
        train_cfg=dict(
            rpn=dict(assigner=dict(type="MaxIoUAssigner", pos_iou_thr=0.7, neg_iou_thr=0.3, min_pos_iou=0.3,
                                   match_low_quality=True, ignore_iof_thr=-1),
                     sampler=dict(type="RandomSampler", num=256, pos_fraction=0.5, neg_pos_ub=-1,
                                  add_gt_as_proposals=False),
                     allowed_border=-1, pos_weight=-1, debug=False),
            rpn_proposal=dict(nms_pre=2000, max_per_img=1000, nms=dict(type="nms", iou_threshold=0.7),
                              min_bbox_size=0),
            rcnn=dict(assigner=dict(type="MaxIoUAssigner", pos_iou_thr=0.5, neg_iou_thr=0.5, min_pos_iou=0.5,
                                    match_low_quality=False, ignore_iof_thr=-1),
                      sampler=dict(type="RandomSampler", num=sampler_num, pos_fraction=0.25, neg_pos_ub=-1,
                                   add_gt_as_proposals=False),
                      pos_weight=-1, debug=False)),
        test_cfg=dict(
            rpn=dict(nms_pre=1000, max_per_img=1000, nms=dict(type="nms", iou_threshold=0.7), min_bbox_size=0),
            rcnn=dict(score_thr=0.05, nms=dict(type="nms", iou_threshold=0.5), max_per_img=100)))


def pseco(det=None, **semi_train_cfg):
    det = det or detector()
    return dict(type="PseCoDetector", detector=det,
                data_preprocessor=dict(type="MultiBranchDataPreprocessor",
                                       data_preprocessor=det["data_preprocessor"]),
                semi_train_cfg=semi_train_cfg, semi_test_cfg=dict(predict_on="teacher"))


def build(det=None, **semi_train_cfg):
    torch.manual_seed(0)
    return MODELS.build(pseco(det, **semi_train_cfg))


# ---- (a) the Runner trains it from a config file -----------------------------------------------------
class Recorder(Hook):
    """Snapshots teacher and student around every iteration; checks the EMA and the gradients."""

    def __init__(self, momentum):
        self.momentum = momentum
        self.iters, self.ema_errors, self.student_moved, self.teacher_grads = [], [], [], []
        self.buffers_changed, self.start = [], None

    @staticmethod
    def _model(runner):
        return runner.model.module if hasattr(runner.model, "module") else runner.model

    def before_train(self, runner):
        m = self._model(runner)
        self.start = dict(iter=runner.iter, teacher={k: v.clone() for k, v in m.teacher.state_dict().items()},
                          student={k: v.clone() for k, v in m.student.state_dict().items()})

    def before_train_iter(self, runner, batch_idx, data_batch=None):
        m = self._model(runner)
        self.t0 = {k: p.detach().clone() for k, p in m.teacher.named_parameters()}
        self.s0 = {k: p.detach().clone() for k, p in m.student.named_parameters()}
        self.b0 = {k: b.clone() for k, b in m.teacher.named_buffers()}

    def after_train_iter(self, runner, batch_idx, data_batch=None, outputs=None):
        m = self._model(runner)
        mom = self.momentum
        worst, moved = 0.0, 0.0
        for (k, t1), (ks, s1) in zip(m.teacher.named_parameters(), m.student.named_parameters()):
            assert k == ks
            expected = self.t0[k] * (1 - mom) + s1.detach() * mom  # MeanTeacherHook: t = (1-m) t + m s
            worst = max(worst, (t1.detach() - expected).abs().max().item())
            moved = max(moved, (s1.detach() - self.s0[k]).abs().max().item())
        self.iters.append(runner.iter)
        self.ema_errors.append(worst)
        self.student_moved.append(moved)
        self.teacher_grads.append(sum(p.grad is not None for p in m.teacher.parameters()))
        self.buffers_changed.append([k for k, b in m.teacher.named_buffers() if not torch.equal(b, self.b0[k])])


class CallCounter:
    """Wraps an op of tbd_ops and records the number of images of every call."""

    def __init__(self, fn):
        self.fn, self.images = fn, []

    def __call__(self, *args, **kwargs):
        self.images.append(len(args[0]))
        return self.fn(*args, **kwargs)


@pytest.fixture(scope="module")
def semi_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("semi")
    labeled = rh.make_coco(root, "labeled", num_images=4, seed=1)
    unlabeled = rh.make_coco(root, "unlabeled", num_images=4, seed=2, labeled=False)
    return root, labeled, unlabeled


def write_semi_config(path, labeled, unlabeled, work_dir, max_iters, momentum, **semi_train_cfg):
    cfg = rh.semi_runtime(labeled, unlabeled, work_dir, max_iters=max_iters, batch_size=3, source_ratio=(1, 2),
                          checkpoint_interval=2, lr=0.01, ema_momentum=momentum, scale=(128, 96),
                          student_scales=((112, 80), (144, 112)))
    det = detector()
    # mmdet's init of the classifier (bias 0: every class scores sigmoid(0) = 0.5) instead of PseCo's prior
    # 0.01, so that the fresh teacher of a 2-iteration run gives pseudo boxes from the first iteration on.
    det["roi_head"]["bbox_head"]["init_cfg"] = [
        dict(type="Normal", std=0.01, bias=0.0, override=dict(name="fc_cls")),
        dict(type="Normal", std=0.001, override=dict(name="fc_reg")),
        dict(type="Xavier", distribution="uniform", override=[dict(name="shared_fcs"), dict(name="cls_fcs"),
                                                               dict(name="reg_fcs")])]
    cfg["model"] = pseco(det, **semi_train_cfg)
    header = 'custom_imports = dict(imports=["tbd_ops.mmdet"], allow_failed_imports=False)'
    return rh.write_config(path, cfg, header)


# Thresholds low enough that the freshly initialized teacher (its focal classifier scores every
# class about sigmoid(0) = 0.5, see write_semi_config) gives pseudo boxes from the first iteration on.
LOW_THRESHOLDS = dict(pseudo_label_initial_score_thr=0.2, rpn_pseudo_thr=0.3, cls_pseudo_thr=0.3)
SUP_KEYS = ["sup_loss_rpn_cls", "sup_loss_rpn_bbox", "sup_loss_cls", "sup_loss_bbox"]
UNSUP_KEYS = ["unsup_loss_rpn_cls", "unsup_loss_rpn_bbox", "unsup_loss_cls", "unsup_loss_bbox"]


def test_runner_trains_resumes_and_teacher_moves_only_by_ema(semi_data, tmp_path, monkeypatch):
    _, labeled, unlabeled = semi_data
    momentum = 0.5  # a visible EMA step
    work_dir = tmp_path / "work"
    path = write_semi_config(tmp_path / "pseco_r18.py", labeled, unlabeled, work_dir, max_iters=2,
                             momentum=momentum, **LOW_THRESHOLDS)
    assign = CallCounter(tbd_ops.prediction_guided_assign)
    voting = CallCounter(tbd_ops.consistency_voting)
    monkeypatch.setattr(tbd_ops, "prediction_guided_assign", assign)
    monkeypatch.setattr(tbd_ops, "consistency_voting", voting)

    rec = Recorder(momentum)
    runner = rh.train_with_hooks(path, [rec])
    assert runner.iter == 2 and rec.iters == [0, 1]  # runner.iter counts from 0 inside an iteration
    logs = [r for r in rh.scalars(work_dir) if "loss" in r]
    assert len(logs) == 2
    for key in SUP_KEYS + UNSUP_KEYS + [k + "_V2" for k in UNSUP_KEYS]:
        values = [r[key] for r in logs]
        assert all(math.isfinite(v) for v in values), (key, values)
    # driven, not vacuous: pseudo boxes gave positive RoIs and regression targets
    assert all(r["unsup_pos_num"] > 0 for r in logs), logs
    for key in ("unsup_loss_cls", "unsup_loss_bbox", "unsup_loss_cls_V2", "unsup_loss_bbox_V2",
                "unsup_loss_rpn_bbox", "unsup_loss_rpn_bbox_V2"):
        assert all(r[key] > 0 for r in logs), (key, [r[key] for r in logs])
    # one assignment and one voting call per batch, each with the batch's 2 unlabeled images
    assert assign.images == [2, 2] and voting.images == [2, 2]
    # no gradient reaches the teacher; the student moved; the teacher moved only by the EMA
    assert rec.teacher_grads == [0, 0]
    assert min(rec.student_moved) > 1e-6
    assert max(rec.ema_errors) <= 1e-6, rec.ema_errors
    assert rec.buffers_changed == [[], []]  # teacher in eval mode, buffers not averaged

    # resume from the Runner's own checkpoint: iteration 3 continues from iteration 2's state
    ckpt = work_dir / "iter_2.pth"
    assert ckpt.exists()
    state = torch.load(ckpt, map_location="cpu", weights_only=True)["state_dict"]
    rec2 = Recorder(momentum)
    runner = rh.train_with_hooks(path, [rec2], **{"train_cfg.max_iters": 3, "resume": True,
                                                  "load_from": str(ckpt)})
    assert runner.iter == 3 and rec2.start["iter"] == 2 and rec2.iters == [2]
    for k, v in rec2.start["teacher"].items():
        assert torch.equal(v, state["teacher." + k]), k
    for k, v in rec2.start["student"].items():
        assert torch.equal(v, state["student." + k]), k
    assert rec2.teacher_grads == [0] and max(rec2.ema_errors) <= 1e-6
    assert assign.images == [2, 2, 2]
    logs = [r for r in rh.scalars(work_dir) if "loss" in r]
    assert logs[-1]["iter"] == 3 and all(math.isfinite(logs[-1][k]) for k in SUP_KEYS + UNSUP_KEYS)

    # load_from that Runner-written checkpoint, as a user starts a new run from it (--cfg-options):
    head = "model.detector.roi_head.bbox_head."
    # another architecture (wider shared FCs): refused before the first iteration, naming the layers;
    # mmengine alone would warn and train the mismatched layers from their initialization
    from tbd_ops.mmdet.checkpoint import CheckpointMismatchError

    with pytest.raises(CheckpointMismatchError, match=r"does not fit the detector built from the config: "
                                                      r"\d+ keys differ in shape: .*bbox_head\.shared_fcs"):
        rh.train(path, **{head + "fc_out_channels": 128, "load_from": str(ckpt),
                          "work_dir": str(tmp_path / "wider")})
    # fine-tuning on other classes: every weight but the RoI head's classifier and box regressor is the
    # checkpoint's (read from the file, for the student and the teacher)
    tuned = rh.runner(path, **{head + "num_classes": 5, "load_from": str(ckpt), "work_dir": str(tmp_path / "tune")})
    tuned.load_or_resume()  # what train() does first
    own = tuned.model.state_dict()
    class_layers = [k for k in state if ".bbox_head.fc_cls." in k or ".bbox_head.fc_reg." in k]
    assert len(class_layers) == 8  # weight and bias of both layers, in the student and the teacher
    for k, v in state.items():
        if k in class_layers:
            assert own[k].shape != v.shape, k
        else:
            assert torch.equal(own[k], v), k


@pytest.mark.parametrize("use_teacher_proposal", [True, False])
def test_no_gradient_reaches_an_unfrozen_teacher(use_teacher_proposal):
    """Even with freeze_teacher=False the teacher's outputs are constants of the losses (RoIs from the
    teacher, or the student's RoIs scored by the teacher; with the feature-level scale consistency)."""
    model = build(freeze_teacher=False, use_teacher_proposal=use_teacher_proposal, scale_consistency_weight=1e-3,
                  **LOW_THRESHOLDS)
    assert all(p.requires_grad for p in model.teacher.parameters())
    inputs, samples = unsup_batch(model)
    info = model.teacher_predictions(inputs["unsup_teacher"], samples["unsup_teacher"], samples["unsup_student"])
    losses = model.loss_by_pseudo_instances(inputs["unsup_student"], samples["unsup_student"], info)
    loss, _ = model.parse_losses(losses)
    loss.backward()
    assert all(p.grad is None for p in model.teacher.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.student.parameters())
    assert losses["unsup_loss_bbox"].item() > 0 and losses["unsup_loss_scale_consistency"].item() > 0
    assert all(torch.isfinite(v).all() for k, v in losses.items() if "loss" in k and isinstance(v, torch.Tensor))


def unsup_batch(model, n=2):
    """A multi-branch batch built by hand: the student's views are flipped / scaled teacher views."""
    from mmdet.structures import DetDataSample

    def sample(h, w, hm, labeled):
        s = DetDataSample(metainfo=dict(img_shape=(h, w), ori_shape=(h, w), pad_shape=(96, 128),
                                        batch_input_shape=(96, 128), scale_factor=(1.0, 1.0),
                                        homography_matrix=hm))
        s.gt_instances = InstanceData(bboxes=torch.tensor([[10.0, 10.0, 60.0, 50.0]]) if labeled else
                                      torch.zeros(0, 4),
                                      labels=torch.tensor([1]) if labeled else torch.zeros(0, dtype=torch.long))
        return s

    eye = np.eye(3, dtype=np.float32)
    flip = np.array([[-1, 0, 120], [0, 1, 0], [0, 0, 1]], np.float32)
    scale = np.array([[0.8, 0, 0], [0, 0.8, 0], [0, 0, 1]], np.float32)
    g = torch.Generator().manual_seed(3)
    inputs = {k: torch.randn(n, 3, 96, 128, generator=g) for k in rh.BRANCHES}
    samples = {"sup": [sample(96, 128, eye, True) for _ in range(n)],
               "unsup_teacher": [sample(90, 120, eye, False) for _ in range(n)],
               "unsup_student": [sample(90, 120, flip if i % 2 == 0 else scale, False) for i in range(n)]}
    return inputs, samples


# ---- (b) parity of the unsupervised RoI losses with an independent per-image composition -------------
def ref_iou(a, b, aligned=False):
    """IoU = inter / max(union, 1e-6), widths and heights clamped at 0 (float64)."""
    a, b = a.double(), b.double()
    if not aligned:
        a, b = a[:, None], b[None]
    lt, rb = torch.maximum(a[..., :2], b[..., :2]), torch.minimum(a[..., 2:], b[..., 2:])
    inter = (rb - lt).clamp(min=0).prod(-1)
    area = lambda x: (x[..., 2:] - x[..., :2]).clamp(min=0).prod(-1)  # noqa: E731
    return inter / (area(a) + area(b) - inter).clamp(min=1e-6)


def ref_focal(logits, labels, num_classes, gamma=2.0, alpha=0.25):
    """RetinaNet's focal loss per element; labels == num_classes is background (all-zero target)."""
    t = F.one_hot(labels, num_classes + 1)[:, :num_classes].to(logits.dtype)
    log_p, log_1mp = F.logsigmoid(logits), F.logsigmoid(-logits)
    p = logits.sigmoid()
    return -(t * alpha * (1 - p) ** gamma * log_p + (1 - t) * (1 - alpha) * p ** gamma * log_1mp)


def ref_pla(boxes, scores, pseudo, labels, proposals, iou_thr=0.4, topk=12, alpha=0.5):
    """The official assignment_refinement for one image: a bag per pseudo box (max-IoU assignment at
    iou_thr), k = max(1, floor(sum of the top-k IoUs)), the k best by s^alpha * u^(1-alpha), then the
    proposals of zero area (in the student's view) dropped."""
    gt_inds = torch.zeros(boxes.shape[0], dtype=torch.long)
    if pseudo.shape[0] == 0:
        return gt_inds
    ious = ref_iou(boxes, pseudo)
    u, j = ious.max(1)
    wh = proposals[:, 2:] - proposals[:, :2]
    area = wh[:, 0] * wh[:, 1]
    for g in range(pseudo.shape[0]):
        idx = ((j == g) & (u >= iou_thr)).nonzero().flatten()
        if idx.numel() == 0:
            continue
        iou = ious[idx, g]
        cost = scores[idx, labels[g]].double() ** alpha * iou ** (1 - alpha)
        order = torch.sort(cost, descending=True, stable=True).indices
        k = max(1, int(math.floor(iou.topk(min(idx.numel(), topk)).values.sum().item())))
        keep = order[:k]
        keep = keep[area[idx[keep]] > 0]
        gt_inds[idx[keep]] = g + 1
    return gt_inds


def ref_roi_losses(model, x1, x2, proposals, scores, boxes, pseudo_boxes, pseudo_labels, focal=True,
                   pcv_mode="pseco"):
    """PseCo's unlabeled RoI losses as the official PseCo_FRCNN computes them, image by image."""
    roi_head = model.student.roi_head
    head = roi_head.bbox_head
    c = head.num_classes
    results = []
    for i in range(len(proposals)):
        gt_inds = ref_pla(boxes[i], scores[i], pseudo_boxes[i], pseudo_labels[i], proposals[i])
        labels = torch.full_like(gt_inds, -1)
        labels[gt_inds > 0] = pseudo_labels[i][gt_inds[gt_inds > 0] - 1]
        assign = AssignResult(pseudo_boxes[i].shape[0], gt_inds, torch.zeros(gt_inds.shape[0]), labels=labels)
        results.append(roi_head.bbox_sampler.sample(assign, InstanceData(priors=proposals[i]),
                                                    InstanceData(bboxes=pseudo_boxes[i], labels=pseudo_labels[i])))
    rois = bbox2roi([r.priors for r in results])
    labels, label_weights, bbox_targets, _ = head.get_targets(results, model.student.train_cfg.rcnn)
    out1 = roi_head._bbox_forward(x1, rois)
    # PCV (compute_PCV): mean IoU of the positives of a pseudo box with it, per image
    sigma = torch.zeros(rois.shape[0], dtype=torch.float64)
    offset = 0
    for r in results:
        npos = r.pos_inds.numel()
        if npos:
            rows = torch.arange(offset, offset + npos)
            pred = out1["bbox_pred"].detach()[rows].view(npos, c, 4)[torch.arange(npos), labels[rows]]
            decoded = head.bbox_coder.decode(r.pos_priors, pred)
            iou = ref_iou(decoded, r.pos_gt_bboxes, aligned=True)
            for g in torch.unique(r.pos_assigned_gt_inds):
                sel = r.pos_assigned_gt_inds == g
                sigma[rows[sel]] = iou[sel].mean()
        offset += r.priors.shape[0]
    pos = labels < c
    if pcv_mode == "pseco":
        w = sigma ** 2
        reg_scale = sigma[pos].sum() / (sigma[pos] ** 2).sum() if pos.any() else torch.tensor(0.0)
    else:
        w, reg_scale = sigma, torch.tensor(1.0)
    r_total = max(rois.shape[0], 1)

    def terms(out):
        logits = out["cls_score"]
        if focal:
            cls = 10.0 * (ref_focal(logits, labels, c) * label_weights[:, None]).sum()
        else:
            cls = (F.cross_entropy(logits, labels, reduction="none") * label_weights).sum()
        loss_cls = cls / max(label_weights.sum().item(), 1.0)
        pred = out["bbox_pred"].view(-1, c, 4)[pos, labels[pos]]
        l1 = (pred - bbox_targets[pos]).abs() * w[pos, None].float()
        return loss_cls, reg_scale.float() * l1.sum() / r_total

    losses = dict(zip(("loss_cls", "loss_bbox"), terms(out1)))
    if x2 is not None:
        losses.update(zip(("loss_cls_V2", "loss_bbox_V2"), terms(roi_head._bbox_forward(x2, rois))))
    losses["pos_num"] = pos.sum().float()
    return losses


def jitter(b, frac, g):
    wh = (b[:, 2:] - b[:, :2]).repeat(1, 2)
    out = b + (torch.rand(b.shape, generator=g) * 2 - 1) * frac * wh
    return torch.cat([out[:, :2], torch.maximum(out[:, 2:], out[:, :2] + 1)], 1)


def roi_inputs(num_classes, channels=32, seed=0, pseudo_counts=(3, 0, 6), num_proposals=150):
    """Fixed inputs of the RoI step: V1/V2 features, RoIs, teacher probabilities and boxes, pseudo boxes.

    60% of the teacher boxes are jittered copies of a pseudo box; every 7th RoI has zero width
    in the student's view (the official valid rule drops it).
    """
    g = torch.Generator().manual_seed(seed)
    n, (h, w) = len(pseudo_counts), (120, 150)
    sizes = [(16, 20), (8, 10), (4, 5), (2, 3), (1, 2)]
    x1 = [torch.randn(n, channels, *s, generator=g) for s in sizes]
    x2 = [torch.randn(n, channels, *s, generator=g) for s in sizes]
    proposals, scores, boxes, pseudo, labels = [], [], [], [], []
    for m in pseudo_counts:
        ctr = torch.rand(m, 2, generator=g) * torch.tensor([w, h])
        half = 10 + torch.rand(m, 2, generator=g) * 25
        pb = torch.cat([ctr - half, ctr + half], 1).clamp(min=0)
        pb = torch.minimum(pb, torch.tensor([w, h, w, h], dtype=torch.float32))
        near = int(num_proposals * 0.6) if m else 0
        src = torch.randint(0, max(m, 1), (near,), generator=g)
        far = torch.rand(num_proposals - near, 2, generator=g) * torch.tensor([w - 40, h - 40])
        far = torch.cat([far, far + 10 + torch.rand(num_proposals - near, 2, generator=g) * 30], 1)
        tb = torch.cat([jitter(pb[src], 0.2, g), far]) if m else far
        props = jitter(tb, 0.15, g)
        props[::7, 2] = props[::7, 0]  # zero area
        proposals.append(props)
        boxes.append(tb)
        scores.append(torch.rand(num_proposals, num_classes, generator=g))
        pseudo.append(pb)
        labels.append(torch.randint(0, num_classes, (m,), generator=g))
    return x1, x2, proposals, scores, boxes, pseudo, labels


@pytest.mark.parametrize("focal,sampler_num,use_msl,pcv_mode", [
    (True, 512, True, "pseco"),    # every RoI sampled
    (True, 64, True, "pseco"),     # 16 positives / 48 negatives drawn per image (same seed on both sides)
    (False, 512, False, "paper"),  # softmax cross-entropy head, no V2, w = sigma
])
def test_unsup_roi_losses_match_independent_composition(focal, sampler_num, use_msl, pcv_mode):
    c = 4
    model = build(detector(num_classes=c, focal=focal, sampler_num=sampler_num), use_MSL=use_msl,
                  PCV_mode=pcv_mode)
    x1, x2, proposals, scores, boxes, pseudo, labels = roi_inputs(c)
    v1 = [t.clone().requires_grad_() for t in x1]
    v2 = [t.clone().requires_grad_() for t in x2] if use_msl else None
    torch.manual_seed(11)
    got = model.roi_losses(v1, v2, proposals, scores, boxes, pseudo, labels)
    r1 = [t.clone().requires_grad_() for t in x1]
    r2 = [t.clone().requires_grad_() for t in x2] if use_msl else None
    torch.manual_seed(11)
    want = ref_roi_losses(model, r1, r2, proposals, scores, boxes, pseudo, labels, focal=focal, pcv_mode=pcv_mode)
    assert set(got) == set(want)
    assert want["pos_num"] > 0 and want["loss_bbox"] > 0
    for k in want:
        torch.testing.assert_close(got[k].float(), want[k].float(), rtol=2e-5, atol=1e-6, msg=k)
    # and the same gradients into the student's features of both views
    sum(v for k, v in got.items() if "loss" in k).backward()
    sum(v for k, v in want.items() if "loss" in k).backward()
    for a, b in zip(v1 + (v2 or []), r1 + (r2 or [])):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("pseudo_counts,empty_image", [((3, 0, 2), 1), ((0, 0), None)])
def test_unsup_roi_losses_edge_cases(pseudo_counts, empty_image):
    """An image without proposals, images without pseudo boxes, a batch without any."""
    c = 4
    model = build(detector(num_classes=c))
    x1, x2, proposals, scores, boxes, pseudo, labels = roi_inputs(c, pseudo_counts=pseudo_counts)
    if empty_image is not None:
        for t in (proposals, scores, boxes):
            t[empty_image] = t[empty_image][:0]
    torch.manual_seed(0)
    got = model.roi_losses(x1, x2, proposals, scores, boxes, pseudo, labels)
    torch.manual_seed(0)
    want = ref_roi_losses(model, x1, x2, proposals, scores, boxes, pseudo, labels)
    for k in want:
        torch.testing.assert_close(got[k].float(), want[k].float(), rtol=2e-5, atol=1e-6, msg=k)
    assert (want["pos_num"] > 0) == any(pseudo_counts)


def test_zero_area_rois_are_never_positives():
    """The valid rule matters on these inputs: without it, zero-area RoIs become positives."""
    c = 4
    _, _, proposals, scores, boxes, pseudo, labels = roi_inputs(c)
    with_rule = [ref_pla(b, s, p, lb, pr) for b, s, p, lb, pr in zip(boxes, scores, pseudo, labels, proposals)]
    no_rule = [ref_pla(b, s, p, lb, pr.new_tensor([[0, 0, 1, 1]]).expand_as(pr))
               for b, s, p, lb, pr in zip(boxes, scores, pseudo, labels, proposals)]
    zero = [((pr[:, 2] - pr[:, 0]) * (pr[:, 3] - pr[:, 1])) <= 0 for pr in proposals]
    assert not any((g[z] > 0).any() for g, z in zip(with_rule, zero))
    assert any((g[z] > 0).any() for g, z in zip(no_rule, zero))


def test_project_boxes_matches_mmdet_bbox_project():
    from mmdet.structures.bbox import bbox_project

    from tbd_ops.mmdet.pseco_detector import project_boxes

    g = torch.Generator().manual_seed(5)
    xy = torch.rand(50, 2, generator=g) * 100
    b = torch.cat([xy, xy + 1 + torch.rand(50, 2, generator=g) * 60], 1)
    flip = torch.tensor([[-1.0, 0, 150], [0, 1, 0], [0, 0, 1]])
    shear = torch.tensor([[1.1, 0.2, -5], [0.1, 0.9, 7], [0, 0, 1]])
    for mat in (flip, shear, torch.diag(torch.tensor([0.6, 1.3, 1.0]))):
        want = bbox_project(b, mat, (90, 140))
        got = project_boxes(b, mat.expand(50, 3, 3), torch.tensor([90.0, 140.0]).expand(50, 2))
        torch.testing.assert_close(got, want)
        # Under autocast (AMP training) in float32 all the same: a 16-bit matmul is pixels off.
        with torch.autocast("cpu", dtype=torch.bfloat16):
            amp = project_boxes(b, mat.expand(50, 3, 3), torch.tensor([90.0, 140.0]).expand(50, 2))
        assert amp.dtype == torch.float32 and torch.equal(amp, got)


def test_teacher_predictions_follow_the_views():
    """Proposals, teacher boxes and pseudo boxes arrive in the student's view: a flipped student
    view gets the flipped boxes of an identical one."""
    model = build(**LOW_THRESHOLDS)
    inputs, samples = unsup_batch(model, n=2)
    teacher = samples["unsup_teacher"]
    same = [copy.deepcopy(t) for t in teacher]
    flipped = [copy.deepcopy(t) for t in teacher]
    wid = 120.0
    for s in flipped:
        s.set_metainfo(dict(homography_matrix=np.array([[-1, 0, wid], [0, 1, 0], [0, 0, 1]], np.float32)))
    a = model.teacher_predictions(inputs["unsup_teacher"], teacher, same)
    b = model.teacher_predictions(inputs["unsup_teacher"], teacher, flipped)

    def flip(x):
        return torch.stack([wid - x[:, 2], x[:, 1], wid - x[:, 0], x[:, 3]], 1)

    for key in ("proposals", "boxes"):
        for pa, pb in zip(a[key], b[key]):
            assert pa.shape[0] > 0
            torch.testing.assert_close(pb, flip(pa), rtol=0, atol=1e-4)
            assert (pa[:, 0::2] >= 0).all() and (pa[:, 0::2] <= wid).all() and (pa[:, 1::2] <= 90).all()
    for sa, sb in zip(a["scores"], b["scores"]):
        torch.testing.assert_close(sa, sb)
        assert ((sa >= 0) & (sa <= 1)).all()
    for pa, pb in zip(a["pseudo"], b["pseudo"]):
        assert len(pa) > 0 and (pa.scores > 0.2).all()
        torch.testing.assert_close(pb.bboxes, flip(pa.bboxes), rtol=0, atol=1e-4)
        assert torch.equal(pa.labels, pb.labels)


def test_a_fresh_focal_classifier_starts_at_the_prior():
    """As the official PseCo BBoxHead (bias_prob=0.01): a freshly initialized teacher gives no pseudo boxes
    at the default thresholds, instead of up to max_per_img random ones per image (sigmoid(0) = 0.5)."""
    model = build()
    model.init_weights()
    prior_bias = -math.log((1 - 0.01) / 0.01)
    for m in (model.student, model.teacher):
        bias = m.roi_head.bbox_head.fc_cls.bias
        torch.testing.assert_close(bias, torch.full_like(bias, prior_bias))
    inputs, samples = unsup_batch(model)
    info = model.teacher_predictions(inputs["unsup_teacher"], samples["unsup_teacher"], samples["unsup_student"])
    assert all(len(p) == 0 for p in info["pseudo"])
    # A softmax head keeps mmdet's init; an explicit bias in the config is kept too.
    ce = build(detector(focal=False))
    ce.init_weights()
    assert ce.student.roi_head.bbox_head.fc_cls.bias.abs().max() == 0


def test_student_proposals_scored_by_the_teacher():
    """use_teacher_proposal=False: given the teacher's own proposals (mapped into the student's view)
    as the student's, the teacher's scores and boxes are those of use_teacher_proposal=True."""
    model = build(**LOW_THRESHOLDS)
    inputs, samples = unsup_batch(model, n=2)
    args = (inputs["unsup_teacher"], samples["unsup_teacher"], samples["unsup_student"])
    info = model.teacher_predictions(*args)
    model.semi_train_cfg.use_teacher_proposal = False
    info2 = model.teacher_predictions(*args)
    assert "proposals" not in info2
    props, scores, boxes = model._teacher_on_student_proposals(info2, [InstanceData(bboxes=p) for p in info["proposals"]])
    for a, b in zip(props, info["proposals"]):
        assert torch.equal(a, b)
    for a, b in zip(scores, info["scores"]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    for a, b in zip(boxes, info["boxes"]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-3)


def test_predict_on_teacher_or_student():
    """Prediction uses P3-P7 of the teacher (default) or of the student (semi_test_cfg.predict_on)."""
    model = build(**LOW_THRESHOLDS).eval()
    inputs, samples = unsup_batch(model, n=2)
    with torch.no_grad():
        model.student.roi_head.bbox_head.fc_cls.bias.add_(torch.arange(3.0))  # the student differs
        t = [r.pred_instances for r in model.predict(inputs["sup"], copy.deepcopy(samples["sup"]))]
        model.semi_test_cfg.predict_on = "student"
        s = [r.pred_instances for r in model.predict(inputs["sup"], copy.deepcopy(samples["sup"]))]
    for a, b in zip(t, s):
        assert len(a) > 0 and len(b) > 0 and a.bboxes.shape[1] == 4
        assert not torch.equal(a.scores, b.scores)
        assert set(a.labels.tolist()) <= {0, 1, 2}
    assert len(model.extract_feat(inputs["sup"])) == 5


def test_views_without_homography_raise():
    model = build()
    inputs, samples = unsup_batch(model, n=1)
    for s in samples["unsup_student"]:
        delattr(s, "homography_matrix")
    with pytest.raises(ValueError, match="unsup_student data samples need their 'homography_matrix'"):
        model.loss(inputs, samples)


# ---- (d) errors -----------------------------------------------------------------------------------
def _with(det, path, value):
    det = copy.deepcopy(det)
    node = det
    for k in path[:-1]:
        node = node[k]
    node[path[-1]] = value
    return det


@pytest.mark.parametrize("path,value,match", [
    (("neck", "num_outs"), 5, r"neck.num_outs must be 6 .*got 5"),
    (("neck", "start_level"), 1, r"neck.start_level must be 0.*got 1"),
    (("rpn_head", "anchor_generator", "strides"), [4, 8, 16, 32, 64],
     r"anchor_generator.strides must be \[8, 16, 32, 64, 128\].*got \[4, 8, 16, 32, 64\]"),
    (("roi_head", "bbox_roi_extractor", "featmap_strides"), [4, 8, 16, 32],
     r"featmap_strides must start at 8.*got \[4, 8, 16, 32\]"),
    (("roi_head", "bbox_head", "loss_cls"), dict(type="FocalLoss", use_sigmoid=True, loss_weight=10.0),
     r"loss_cls FocalLoss .*C \+ 1 class channels.*RoIFocalLoss"),
    (("neck", "add_extra_convs"), "on_output", r"neck.add_extra_convs must be 'on_input' .*got 'on_output'"),
    (("neck", "add_extra_convs"), False, r"neck.add_extra_convs must be 'on_input' .*got False"),
    (("backbone", "out_indices"), (1, 2, 3),
     r"backbone.out_indices \(1, 2, 3\) gives 3 stages, detector.neck.in_channels \[64, 128, 256, 512\] expects 4"),
])
def test_model_outside_the_level_scheme_raises(path, value, match):
    det = _with(detector(channels=16), path, value)
    if path[0] == "neck" and path[1] == "start_level":
        det["neck"]["num_outs"] = 6
    with pytest.raises(ValueError, match=match):
        MODELS.build(pseco(det))


@pytest.mark.parametrize("key,value,match", [
    ("unsup_weight", -1.0, r"semi_train_cfg.unsup_weight must be a number in \[0.0, inf\], got -1.0"),
    ("cls_pseudo_thr", 1.5, r"semi_train_cfg.cls_pseudo_thr must be a number in \[0.0, 1.0\], got 1.5"),
    ("rpn_pseudo_thr", "0.5", r"semi_train_cfg.rpn_pseudo_thr must be a number .*got '0.5'"),
    ("PLA_iou_thres", 0.0, r"semi_train_cfg.PLA_iou_thres must be a number in \(0.0, 1.0\], got 0.0"),
    ("PLA_candidate_topk", 0, r"semi_train_cfg.PLA_candidate_topk must be an int >= 1, got 0"),
    ("PCV_mode", "mean", r"semi_train_cfg.PCV_mode must be 'pseco' or 'paper', got 'mean'"),
    ("use_MSL", "yes", r"semi_train_cfg.use_MSL must be True or False, got 'yes'"),
    ("min_pseudo_bbox_wh", (1.0,), r"semi_train_cfg.min_pseudo_bbox_wh must be \(min_w, min_h\).*got \(1.0,\)"),
    ("cls_pseudo_threshold", 0.5, r"semi_train_cfg.cls_pseudo_threshold is the official code's name; use "
                                  r"'cls_pseudo_thr'"),
    ("cls_thr", 0.5, r"unknown semi_train_cfg key 'cls_thr'; expected one of"),
])
def test_bad_semi_train_cfg_raises(key, value, match):
    with pytest.raises(ValueError, match=match):
        MODELS.build(pseco(detector(channels=16), **{key: value}))


def test_bad_semi_test_cfg_and_data_preprocessor_raise():
    cfg = pseco(detector(channels=16))
    cfg["semi_test_cfg"] = dict(predict_on="teacher", predicton="student")
    with pytest.raises(ValueError, match=r"unknown semi_test_cfg keys \['predicton'\]"):
        MODELS.build(cfg)
    cfg = pseco(detector(channels=16))
    cfg["data_preprocessor"] = cfg["detector"]["data_preprocessor"]
    with pytest.raises(TypeError, match="data_preprocessor must be a MultiBranchDataPreprocessor .*got "
                                        "DetDataPreprocessor"):
        MODELS.build(cfg)


def test_batches_without_the_three_branches_raise():
    model = build(detector(channels=16))
    optim = torch.optim.SGD(model.parameters(), lr=0.0)
    from mmengine.optim import OptimWrapper

    from mmdet.structures import DetDataSample

    wrapper = OptimWrapper(optim)
    image = torch.zeros(3, 64, 64, dtype=torch.uint8)
    with pytest.raises(ValueError, match=r"must hold the branches .* got list inputs: every train pipeline"):
        model.train_step(dict(inputs=[image], data_samples=[DetDataSample()]), wrapper)
    only_labeled = dict(inputs=dict(sup=[image], unsup_teacher=[None], unsup_student=[None]),
                        data_samples=dict(sup=[DetDataSample()], unsup_teacher=[None], unsup_student=[None]))
    with pytest.raises(ValueError, match=r"no images in the branches \['unsup_teacher', 'unsup_student'\]"):
        model.train_step(only_labeled, wrapper)


def test_runner_without_mean_teacher_hook_raises(semi_data, tmp_path):
    """custom_hooks=[] (a config's list replaces its base's) leaves out MeanTeacherHook: the teacher
    would stay at its random initialization. The first iteration raises instead."""
    _, labeled, unlabeled = semi_data
    path = write_semi_config(tmp_path / "pseco_r18.py", labeled, unlabeled, tmp_path / "work", max_iters=1,
                             momentum=0.001, **LOW_THRESHOLDS)
    with pytest.raises(RuntimeError, match=r"the teacher is not a copy of the student.*MeanTeacherHook"):
        rh.train_with_hooks(path, [], custom_hooks=[])


def test_scale_consistency_needs_the_second_view():
    with pytest.raises(ValueError, match=r"scale_consistency_weight > 0 needs the second view.*use_MSL=False"):
        MODELS.build(pseco(detector(channels=16), use_MSL=False, scale_consistency_weight=1.0))


def test_generic_keys_only_and_soft_teacher_keys():
    """mmdet's generic keys alone give PseCo's official defaults; SoftTeacher's own keys are ignored."""
    model = build(detector(channels=16), freeze_teacher=True, sup_weight=1.0, unsup_weight=2.0)
    cfg = model.semi_train_cfg
    assert (cfg.pseudo_label_initial_score_thr, cfg.rpn_pseudo_thr, cfg.cls_pseudo_thr) == (0.3, 0.5, 0.5)
    assert (cfg.PLA_iou_thres, cfg.PLA_candidate_topk, cfg.use_teacher_proposal, cfg.use_MSL) == (0.4, 12, True, True)
    with pytest.warns(UserWarning, match="jitter_times is a SoftTeacher setting"):
        build(detector(channels=16), jitter_times=10)


def test_roi_focal_loss_matches_mmdet_interface():
    """RoIFocalLoss reduces like mmdet's FocalCustomLoss (C channels, background = all zeros)."""
    from tbd_ops.mmdet.pseco_detector import RoIFocalLoss

    g = torch.Generator().manual_seed(2)
    logits = torch.randn(40, 5, generator=g, dtype=torch.float64) * 3
    labels = torch.randint(0, 6, (40,), generator=g)
    weight = torch.rand(40, generator=g, dtype=torch.float64)
    ours = RoIFocalLoss(gamma=2.0, alpha=0.25, loss_weight=3.0)
    theirs = MODELS.build(dict(type="FocalCustomLoss", num_classes=5, gamma=2.0, alpha=0.25, loss_weight=3.0))
    for kw in (dict(), dict(avg_factor=7.0), dict(reduction_override="sum"), dict(reduction_override="none"),
               dict(reduction_override="none", avg_factor=7.0)):
        torch.testing.assert_close(ours(logits, labels, weight, **kw), theirs(logits, labels, weight, **kw))
    with pytest.raises(ValueError, match="avg_factor can only be used with reduction=\"mean\""):
        ours(logits, labels, weight, avg_factor=7.0, reduction_override="sum")
    with pytest.raises(ValueError, match="use_sigmoid must be True"):
        RoIFocalLoss(use_sigmoid=False)
    act = ours.get_activation(logits)
    assert act.shape == (40, 6) and (act[:, 5] == 0).all()


# ---- the shipped configs --------------------------------------------------------------------------
def test_shipped_configs_parse_and_build():
    """The package's PseCo configs parse (mmdet:: bases) and build the model (the backbone's
    pretrained init_cfg is left unused: no init_weights, nothing downloaded)."""
    from tbd_ops.mmdet.pseco_detector import SEMI_TRAIN_DEFAULTS, check_semi_train_cfg

    files = sorted(CONFIG_DIR.glob("pseco_*.py"))
    assert {f.name for f in files} == {f"pseco_faster-rcnn_r50-caffe_fpn_180k_semi-{p}-coco.py"
                                       for p in ("0.01", "0.02", "0.05", "0.1")}
    cfgs = {f.name: Config.fromfile(str(f)) for f in files}
    for name, cfg in cfgs.items():
        percent = name.split("semi-")[1].split("-coco")[0]
        labeled, unlabeled = cfg.train_dataloader.dataset.datasets
        tag = f"1@{round(float(percent) * 100)}"
        assert labeled.ann_file == f"semi_anns/instances_train2017.{tag}.json", name
        assert unlabeled.ann_file == f"semi_anns/instances_train2017.{tag}-unlabeled.json", name
        assert cfg.model.type == "PseCoDetector" and cfg.custom_imports.imports == ["tbd_ops.mmdet"]
        assert cfg.custom_hooks == [dict(type="MeanTeacherHook", momentum=0.001)]
        assert dict(check_semi_train_cfg(cfg.model.semi_train_cfg)) == SEMI_TRAIN_DEFAULTS  # the official values
    cfg = cfgs["pseco_faster-rcnn_r50-caffe_fpn_180k_semi-0.1-coco.py"]
    model = MODELS.build(cfg.model)
    head = model.student.roi_head.bbox_head
    assert type(model).__name__ == "PseCoDetector" and model.student.backbone.depth == 50
    assert model.focal_head and head.fc_cls.out_features == 80 and head.loss_cls.loss_weight == 10.0
    assert model.student.roi_head.bbox_sampler.add_gt_as_proposals is False
    assert all(not p.requires_grad for p in model.teacher.parameters())
    assert dict(model.semi_train_cfg) == SEMI_TRAIN_DEFAULTS


def test_a_checkpoint_of_another_detector_is_refused(tmp_path):
    """mmengine's load_from / resume load non-strictly: a Faster R-CNN of other widths would leave the
    mismatched weights at their initialization (a warning in the log). The detector refuses it; a plain
    Faster R-CNN of the same architecture fills the student and the teacher."""
    from mmengine.config import ConfigDict
    from mmengine.runner.checkpoint import load_checkpoint
    from tbd_ops.mmdet.checkpoint import CheckpointMismatchError

    model = build(detector(channels=16))
    same = MODELS.build(ConfigDict(detector(channels=16)))
    torch.save(dict(state_dict=same.state_dict()), tmp_path / "same.pth")
    load_checkpoint(model, str(tmp_path / "same.pth"), map_location="cpu")
    for k, v in same.state_dict().items():
        assert torch.equal(model.student.state_dict()[k], v) and torch.equal(model.teacher.state_dict()[k], v), k
    wider = MODELS.build(ConfigDict(detector(channels=32)))
    torch.save(dict(state_dict=wider.state_dict()), tmp_path / "wider.pth")
    with pytest.raises(CheckpointMismatchError, match=r"does not fit the detector built from the config: \d+ keys "
                                                      r"differ in shape: student\.neck"):
        load_checkpoint(model, str(tmp_path / "wider.pth"), map_location="cpu")
    # A detector trained on other classes (the usual fine-tuning start): everything but the classifier and
    # box regressor of the RoI head loads; those keep their initialization (mmengine warns).
    other = MODELS.build(ConfigDict(detector(num_classes=7, channels=16)))
    torch.save(dict(state_dict=other.state_dict()), tmp_path / "classes.pth")
    model = build(detector(channels=16))
    head = {k: v.clone() for k, v in model.student.state_dict().items() if "bbox_head.fc_" in k}
    load_checkpoint(model, str(tmp_path / "classes.pth"), map_location="cpu")
    for k, v in other.state_dict().items():
        if "bbox_head.fc_cls" in k or "bbox_head.fc_reg" in k:
            assert torch.equal(model.student.state_dict()[k], head[k]), k
        else:
            assert torch.equal(model.student.state_dict()[k], v), k
