"""tbd_ops.mmdet with the real MMDetection 3.3.0: registered modules and the TBD distiller.

RetinaNet (delta_xywh, A = 9), ATSS (delta_xywh, A = 1) and FCOS (distance
coder, norm_on_bbox) teacher/student pairs with ResNet-18 FPN backbones, built
from config dicts with random weights; two small images with different
``img_shape``, one of them without ground truth.
"""
import copy
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from tbd_ops import mmcv_lite

mmcv_lite.install()
mmdet = pytest.importorskip("mmdet", reason="mmdet is not installed (make test installs mmdet==3.3.0)")
pytest.importorskip("mmengine", reason="mmengine is not installed (make test installs mmengine==0.10.7)")

from mmengine.logging import MMLogger  # noqa: E402
from mmdet.registry import MODELS  # noqa: E402
from mmdet.utils import register_all_modules  # noqa: E402

import tbd_ops  # noqa: E402
from runner_harness import detection_batch  # noqa: E402
import tbd_ops.mmdet  # noqa: E402,F401
from tbd_ops import reference as ref  # noqa: E402
from tbd_ops.nn import TBDLoss  # noqa: E402

register_all_modules()
MMLogger.get_instance("mmengine", log_level="ERROR")

MEAN, STD = [123.675, 116.28, 103.53], [58.395, 57.12, 57.375]
STRIDES = [8, 16, 32, 64, 128]


def backbone(depth=18):
    return dict(type="ResNet", depth=depth, num_stages=4, out_indices=(0, 1, 2, 3), frozen_stages=-1,
                norm_cfg=dict(type="BN", requires_grad=True), norm_eval=False, style="pytorch", init_cfg=None)


def neck(channels):
    return dict(type="FPN", in_channels=[64, 128, 256, 512], out_channels=channels, start_level=1,
                add_extra_convs="on_input", num_outs=5)


def retinanet(channels=64, num_classes=20):
    return dict(
        type="RetinaNet",
        data_preprocessor=dict(type="DetDataPreprocessor", mean=MEAN, std=STD, bgr_to_rgb=True, pad_size_divisor=32),
        backbone=backbone(), neck=neck(channels),
        bbox_head=dict(
            type="RetinaHead", num_classes=num_classes, in_channels=channels, stacked_convs=1, feat_channels=channels,
            anchor_generator=dict(type="AnchorGenerator", octave_base_scale=4, scales_per_octave=3,
                                  ratios=[0.5, 1.0, 2.0], strides=STRIDES),
            bbox_coder=dict(type="DeltaXYWHBBoxCoder", target_means=[0.0] * 4, target_stds=[0.1, 0.1, 0.2, 0.2]),
            loss_cls=dict(type="FocalLoss", use_sigmoid=True, gamma=2.0, alpha=0.25, loss_weight=1.0),
            loss_bbox=dict(type="L1Loss", loss_weight=1.0)),
        train_cfg=dict(assigner=dict(type="MaxIoUAssigner", pos_iou_thr=0.5, neg_iou_thr=0.4, min_pos_iou=0,
                                     ignore_iof_thr=-1),
                       sampler=dict(type="PseudoSampler"), allowed_border=-1, pos_weight=-1, debug=False),
        test_cfg=dict(nms_pre=100, min_bbox_size=0, score_thr=0.05, nms=dict(type="nms", iou_threshold=0.5),
                      max_per_img=10))


def atss(channels=64, num_classes=20):
    cfg = retinanet(channels, num_classes)
    cfg["type"] = "ATSS"
    cfg["bbox_head"] = dict(
        type="ATSSHead", num_classes=num_classes, in_channels=channels, stacked_convs=1, feat_channels=channels,
        anchor_generator=dict(type="AnchorGenerator", ratios=[1.0], octave_base_scale=8, scales_per_octave=1,
                              strides=STRIDES),
        bbox_coder=dict(type="DeltaXYWHBBoxCoder", target_means=[0.0] * 4, target_stds=[0.1, 0.1, 0.2, 0.2]),
        loss_cls=dict(type="FocalLoss", use_sigmoid=True, gamma=2.0, alpha=0.25, loss_weight=1.0),
        loss_bbox=dict(type="GIoULoss", loss_weight=2.0),
        loss_centerness=dict(type="CrossEntropyLoss", use_sigmoid=True, loss_weight=1.0))
    cfg["train_cfg"] = dict(assigner=dict(type="ATSSAssigner", topk=9), allowed_border=-1, pos_weight=-1, debug=False)
    return cfg


def fcos(channels=64, num_classes=20):
    cfg = retinanet(channels, num_classes)
    cfg["type"] = "FCOS"
    cfg["bbox_head"] = dict(
        type="FCOSHead", num_classes=num_classes, in_channels=channels, stacked_convs=1, feat_channels=channels,
        strides=STRIDES, norm_on_bbox=True, centerness_on_reg=True, center_sampling=True, conv_bias=True,
        loss_cls=dict(type="FocalLoss", use_sigmoid=True, gamma=2.0, alpha=0.25, loss_weight=1.0),
        loss_bbox=dict(type="GIoULoss", loss_weight=1.0),
        loss_centerness=dict(type="CrossEntropyLoss", use_sigmoid=True, loss_weight=1.0))
    cfg["train_cfg"] = dict(assigner=dict(type="MaxIoUAssigner", pos_iou_thr=0.5, neg_iou_thr=0.4, min_pos_iou=0,
                                          ignore_iof_thr=-1), allowed_border=-1, pos_weight=-1, debug=False)
    return cfg


def run_python(code):
    """Runs code in a fresh interpreter that sees the same modules as this one."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)


ARCHS = {"retinanet": retinanet, "atss": atss, "fcos": fcos}


def distiller(arch, tbd_loss=None, teacher_channels=96):
    student = ARCHS[arch](channels=64)
    teacher = ARCHS[arch](channels=teacher_channels)
    cfg = {k: v for k, v in student.items() if k in ("backbone", "neck", "bbox_head", "train_cfg", "test_cfg",
                                                      "data_preprocessor")}
    cfg.update(type="TBDSingleStageDetector", teacher_config=dict(model=teacher),
               tbd_loss=tbd_loss or dict(hd_weight=1.0, tfd_weight=0.5))
    model = MODELS.build(cfg)
    model.init_weights()
    return model


def batch(model, num_classes=20):
    """Two images of different img_shape padded into one batch; the second has no ground truth."""
    return detection_batch(model, num_classes)


# How each architecture's boxes decode, written from the configs above: (coder, cfg, student scales,
# teacher scales). FCOSHead with norm_on_bbox outputs distances in units of the stride in training mode
# (the student) and multiplies them by the stride itself in eval mode (the teacher).
CODERS = {
    "retinanet": ("delta_xywh", dict(means=(0.0,) * 4, stds=(0.1, 0.1, 0.2, 0.2)), [1.0] * 5, [1.0] * 5),
    "atss": ("delta_xywh", dict(means=(0.0,) * 4, stds=(0.1, 0.1, 0.2, 0.2)), [1.0] * 5, [1.0] * 5),
    "fcos": ("distance", {}, [float(s) for s in STRIDES], [1.0] * 5),
}


def reference_hd(model, inputs, samples, arch):
    """loss_hd composed from tbd_ops.reference primitives on the same head outputs (float64)."""
    head = model.bbox_head
    s_outs = head(model.extract_feat(inputs))
    with torch.no_grad():
        t_outs = model.teacher_model.bbox_head(model.teacher_model.extract_feat(inputs))
    sizes = [c.shape[-2:] for c in s_outs[0]]
    priors = [p.double() for p in head.prior_generator.grid_priors(sizes, device=inputs.device)]
    coder, coder_cfg, s_scales, t_scales = CODERS[arch]
    gts = [s.gt_instances.bboxes.double() for s in samples]

    def probs(cls_scores, bbox_preds, scales):
        return ref.tbd_probabilities([c.double() for c in cls_scores], [b.double() for b in bbox_preds], priors, gts,
                                     coder=coder, scale=scales, max_shape=[s.metainfo["img_shape"] for s in samples],
                                     **coder_cfg)

    pc_s, pr_s = probs(s_outs[0], s_outs[1], s_scales)
    pc_t, pr_t = probs(t_outs[0], t_outs[1], t_scales)
    return ref.harmony_distillation_loss(pc_s, pr_s, pc_t, pr_t, mode="iou_guided")


@pytest.fixture(scope="module", params=list(ARCHS))
def arch(request):
    return request.param


def test_modules_registered():
    for name in ("TBDLoss", "HarmonyDistillationLoss", "TaskDecoupledFeatureLoss", "TaskWeightGenerator",
                 "TBDSingleStageDetector"):
        assert MODELS.get(name) is not None, name
    loss = MODELS.build(dict(type="TBDLoss", num_levels=3, in_channels=32, hd_mode="plain", tfd_weight=2.0))
    assert isinstance(loss, TBDLoss) and loss.hd.mode == "plain" and loss.tfd.loss_weight == 2.0
    assert len(loss.tfd.adapters) == 3


def test_distiller_losses_match_reference_and_gradients(arch):
    torch.manual_seed(0)
    model = distiller(arch)
    model.train()
    assert not model.teacher_model.training
    assert not any(k.startswith("teacher_model") for k in model.state_dict())
    assert all(p.requires_grad is False for p in model.teacher_model.parameters())
    inputs, samples = batch(model)
    losses = model.loss(inputs, samples)
    for key in ("loss_cls", "loss_bbox", "loss_hd", "loss_tfd"):
        assert key in losses, sorted(losses)
    flat = [v for vals in losses.values() for v in (vals if isinstance(vals, (list, tuple)) else [vals])]
    assert all(torch.isfinite(v).all() for v in flat)
    assert losses["loss_hd"].item() > 0 and losses["loss_tfd"].item() > 0

    # loss_hd equals the composition of reference primitives on the same head outputs.
    expected = reference_hd(model, inputs, samples, arch)
    torch.testing.assert_close(losses["loss_hd"].double(), expected.detach(), rtol=2e-5, atol=1e-7)

    # Gradients reach the student (backbone, head), the adapters and the TWG, never the teacher.
    (losses["loss_hd"] + losses["loss_tfd"]).backward()
    head = model.bbox_head
    cls_conv = head.retina_cls if hasattr(head, "retina_cls") else getattr(head, "atss_cls", None) or head.conv_cls
    reg_conv = head.retina_reg if hasattr(head, "retina_reg") else getattr(head, "atss_reg", None) or head.conv_reg
    for name, p in (("cls", cls_conv.weight), ("reg", reg_conv.weight), ("backbone", model.backbone.conv1.weight),
                    ("adapter", model.tbd_loss.tfd.adapters[0].weight), ("twg", model.tbd_loss.tfd.twg.fc1.weight)):
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert all(p.grad is None for p in model.teacher_model.parameters())


def test_three_optimizer_steps(arch):
    torch.manual_seed(1)
    model = distiller(arch, tbd_loss=dict(hd_weight=2.0, tfd_weight=1.0, adapter_kernel=3))
    model.train()
    teacher_before = copy.deepcopy(model.teacher_model.state_dict())
    student_before = model.bbox_head.state_dict()
    student_before = {k: v.clone() for k, v in student_before.items()}
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.01, momentum=0.9)
    inputs, samples = batch(model)
    for _ in range(3):
        losses = model.loss(inputs, samples)
        total = sum(v if torch.is_tensor(v) else sum(v) for v in losses.values())
        assert torch.isfinite(total)
        opt.zero_grad()
        total.backward()
        opt.step()
    for k, v in model.teacher_model.state_dict().items():
        assert torch.equal(v, teacher_before[k]), k
    assert any(not torch.equal(v, student_before[k]) for k, v in model.bbox_head.state_dict().items())


def test_fcos_uses_strides_as_distance_scales():
    model = distiller("fcos")
    assert model.tbd_loss.coder == "distance"
    assert model.tbd_loss.scales == [float(s) for s in STRIDES]
    assert model.tbd_loss.teacher_scales == [1.0] * len(STRIDES)  # the eval-mode teacher's head scales itself
    retina = distiller("retinanet")
    assert retina.tbd_loss.coder == "delta_xywh"
    assert retina.tbd_loss.coder_kwargs["stds"] == (0.1, 0.1, 0.2, 0.2)


def test_mismatched_teacher_raises():
    student = retinanet()
    cfg = {k: v for k, v in student.items() if k in ("backbone", "neck", "bbox_head", "train_cfg", "test_cfg",
                                                      "data_preprocessor")}
    cfg.update(type="TBDSingleStageDetector", teacher_config=dict(model=atss()))
    with pytest.raises(ValueError, match="priors per location"):
        MODELS.build(cfg)


def test_config_file_with_custom_imports(tmp_path):
    """The README's config: custom_imports loads tbd_ops.mmdet, the model builds from the file."""
    teacher = tmp_path / "teacher.py"
    teacher.write_text(f"model = {retinanet(channels=32)!r}\n")
    student = retinanet(channels=32)
    cfg_text = textwrap.dedent(f"""
        custom_imports = dict(imports=["tbd_ops.mmdet"], allow_failed_imports=False)
        _student = {student!r}
        model = dict(
            type="TBDSingleStageDetector",
            data_preprocessor=_student["data_preprocessor"],
            backbone=_student["backbone"], neck=_student["neck"], bbox_head=_student["bbox_head"],
            train_cfg=_student["train_cfg"], test_cfg=_student["test_cfg"],
            teacher_config={str(teacher)!r},
            tbd_loss=dict(hd_weight=1.0, tfd_weight=1.0, hd_mode="iou_guided"))
    """)
    path = tmp_path / "tbd_retinanet.py"
    path.write_text(cfg_text)
    code = textwrap.dedent(f"""
        import sys
        from tbd_ops import mmcv_lite; mmcv_lite.install()
        from mmengine.config import Config
        from mmengine.utils import import_modules_from_strings
        from mmdet.registry import MODELS
        from mmdet.utils import register_all_modules
        register_all_modules()
        cfg = Config.fromfile({str(path)!r})
        import_modules_from_strings(**cfg["custom_imports"])
        model = MODELS.build(cfg.model)
        print(type(model).__name__, type(model.teacher_model).__name__, model.tbd_loss.coder)
    """)
    out = run_python(code)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "TBDSingleStageDetector RetinaNet delta_xywh" in out.stdout


def test_readme_config_with_package_configs(tmp_path):
    """The README's config: an mmdet student config as _base_, the teacher named by an mmdet:: path."""
    path = tmp_path / "tbd_retinanet_r18_from_r50.py"
    path.write_text(textwrap.dedent("""
        _base_ = "mmdet::retinanet/retinanet_r18_fpn_1x_coco.py"
        custom_imports = dict(imports=["tbd_ops.mmdet"], allow_failed_imports=False)
        model = dict(
            type="TBDSingleStageDetector",
            teacher_config="mmdet::retinanet/retinanet_r50_fpn_1x_coco.py",
            tbd_loss=dict(hd_weight=1.0, tfd_weight=0.01, hd_mode="iou_guided", adapter_kernel=1))
    """))
    code = textwrap.dedent(f"""
        from tbd_ops import mmcv_lite; mmcv_lite.install()
        from mmengine.config import Config
        from mmengine.utils import import_modules_from_strings
        from mmdet.registry import MODELS
        from mmdet.utils import register_all_modules
        register_all_modules()
        cfg = Config.fromfile({str(path)!r})
        import_modules_from_strings(**cfg["custom_imports"])
        model = MODELS.build(cfg.model)
        t = model.teacher_model
        print(type(model).__name__, type(t.backbone).__name__, t.backbone.depth, model.backbone.depth,
              model.tbd_loss.tfd.in_channels, model.tbd_loss.tfd.teacher_channels, len(model.tbd_loss.tfd.adapters))
    """)
    out = run_python(code)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "TBDSingleStageDetector ResNet 50 18 256 256 5" in out.stdout, out.stdout


def test_imports_without_mmdet():
    code = textwrap.dedent("""
        import sys
        sys.modules["mmdet"] = None
        import tbd_ops.mmdet as m
        assert m.AVAILABLE is False and m.IMPORT_ERROR is not None
        print("ok")
    """)
    out = run_python(code)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-3000:]
