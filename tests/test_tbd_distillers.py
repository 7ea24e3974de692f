"""The TBD distillers built from mmdet's own configs (ResNet-18 FPN RetinaNet, ATSS, FCOS, Faster R-CNN):
the rules of SPEC 4.0/4.1 checked against invariants and against mmdet itself.

* A teacher that is an exact copy of the student gives ``loss_hd == 0`` through the detector's own
  ``loss()`` with the teacher in eval mode (for FCOS this needs the teacher's boxes read in the eval-mode
  convention of ``FCOSHead``).
* The student's own losses equal those of the plain mmdet detector with the same weights.
* The teacher sees its own normalization: the converted batch equals what the teacher's own
  ``data_preprocessor`` makes of the same images.
* Checkpoints load strictly; mismatched teachers raise.
"""
import copy

import pytest
import torch

from tbd_ops import mmcv_lite

mmcv_lite.install()
pytest.importorskip("mmdet", reason="mmdet is not installed (make test installs mmdet==3.3.0)")

from mmengine.config import ConfigDict  # noqa: E402
from mmengine.logging import MMLogger  # noqa: E402
from mmdet.registry import MODELS  # noqa: E402
from mmdet.utils import register_all_modules  # noqa: E402

import tbd_ops.mmdet  # noqa: E402
from tbd_ops.mmdet import teacher as teacher_module  # noqa: E402
from tbd_ops.mmdet.checkpoint import CheckpointMismatchError  # noqa: E402
from runner_harness import MMDET_CONFIGS, detection_batch, mmdet_model  # noqa: E402

register_all_modules()
MMLogger.get_instance("mmengine", log_level="ERROR")

ARCHS = list(MMDET_CONFIGS)
DISTILLER = {"faster_rcnn": "TBDTwoStageDetector"}


def distiller_cfg(arch, teacher=None, **kwargs):
    cfg = mmdet_model(arch)
    cfg["type"] = DISTILLER.get(arch, "TBDSingleStageDetector")
    cfg["teacher_config"] = dict(model=teacher if teacher is not None else mmdet_model(arch))
    cfg.update(kwargs)
    return ConfigDict(cfg)


def student_state(model):
    """The distiller's weights that belong to the student detector (not the TBD loss's adapters/TWG)."""
    return {k: v for k, v in model.state_dict().items() if not k.startswith("tbd_loss.")}


@pytest.fixture(scope="module", params=ARCHS)
def arch(request):
    return request.param


def test_identical_teacher_gives_zero_hd_and_the_students_own_losses(arch):
    torch.manual_seed(0)
    model = MODELS.build(distiller_cfg(arch))
    model.init_weights()
    model.teacher_model.load_state_dict(student_state(model))
    model.train()
    assert not model.teacher_model.training
    inputs, samples = detection_batch(model)

    torch.manual_seed(1)
    losses = model.loss(inputs, samples)
    assert losses["loss_hd"].item() == 0.0, (arch, losses["loss_hd"].item())
    assert losses["loss_tfd"].item() > 0  # the (random) adapters are not the identity

    # The student's own losses are those of the plain detector with the same weights (same RNG state
    # for the RoI sampler of Faster R-CNN).
    plain = MODELS.build(ConfigDict(mmdet_model(arch)))
    plain.load_state_dict(student_state(model))
    plain.train()
    torch.manual_seed(1)
    expected = plain.loss(inputs, samples)
    assert set(losses) == set(expected) | {"loss_hd", "loss_tfd"}
    for key, value in expected.items():
        for a, b in zip(value if isinstance(value, list) else [value], losses[key] if isinstance(value, list)
                        else [losses[key]]):
            torch.testing.assert_close(a, b, rtol=0, atol=0, msg=key)


def test_different_teacher_gives_positive_hd_with_gradients(arch):
    torch.manual_seed(2)
    model = MODELS.build(distiller_cfg(arch))
    model.init_weights()
    model.train()
    inputs, samples = detection_batch(model)
    losses = model.loss(inputs, samples)
    assert losses["loss_hd"].item() > 0 and torch.isfinite(losses["loss_hd"])
    (losses["loss_hd"] + losses["loss_tfd"]).backward()
    head = getattr(model, DISTILLER.get(arch) and "rpn_head" or "bbox_head")
    grads = [p.grad for p in head.parameters() if p.grad is not None]
    assert grads and any(g.abs().sum() > 0 for g in grads)
    assert all(p.grad is None for p in model.teacher_model.parameters())


def test_fcos_teacher_boxes_read_in_eval_mode_convention():
    """FCOSHead(norm_on_bbox) multiplies by the stride in eval mode: the teacher's coder must not again."""
    model = MODELS.build(distiller_cfg("fcos"))
    strides = [8.0, 16.0, 32.0, 64.0, 128.0]
    assert model.tbd_loss.scales == strides
    assert model.tbd_loss.teacher_scales == [1.0] * 5
    # A teacher kept in training mode predicts in units of the stride, like the student.
    train_teacher = MODELS.build(distiller_cfg("fcos", eval_teacher=False))
    assert train_teacher.tbd_loss.teacher_scales == strides


def raw_preprocessor(bgr_to_rgb, mean, std, pad_value=0):
    return dict(type="DetDataPreprocessor", mean=mean, std=std, bgr_to_rgb=bgr_to_rgb, pad_size_divisor=32,
                pad_value=pad_value)


@pytest.mark.parametrize("teacher_pre", [
    raw_preprocessor(False, [103.530, 116.280, 123.675], [1.0, 1.0, 1.0]),                  # caffe: BGR, mean only
    raw_preprocessor(True, [123.675, 116.28, 103.53], [58.395, 57.12, 57.375]),             # same as the student
    raw_preprocessor(True, [120.0, 110.0, 100.0], [50.0, 60.0, 70.0], pad_value=3),
])
def test_teacher_sees_its_own_normalization(teacher_pre):
    teacher = mmdet_model("retinanet")
    teacher["data_preprocessor"] = teacher_pre
    model = MODELS.build(distiller_cfg("retinanet", teacher=teacher))
    inputs, samples, raw = detection_batch(model, raw=True)
    converted = model.teacher_input(inputs, [s.img_shape for s in samples])
    # What the teacher's own preprocessor makes of the same uint8 images.
    expected = model.teacher_model.data_preprocessor(dict(inputs=raw, data_samples=copy.deepcopy(samples)),
                                                     training=True)["inputs"]
    assert converted.shape == expected.shape
    torch.testing.assert_close(converted, expected, rtol=1e-5, atol=1e-4)
    assert model.teacher_input.identity == (teacher_pre["mean"] == [123.675, 116.28, 103.53]
                                            and teacher_pre["pad_value"] == 0)


def test_teacher_checkpoint_loads_strictly_and_mismatches_raise(tmp_path):
    donor = MODELS.build(ConfigDict(mmdet_model("retinanet")))
    path = tmp_path / "retinanet_r18.pth"
    torch.save(dict(state_dict=donor.state_dict(), meta=dict(note="test")), path)

    model = MODELS.build(distiller_cfg("retinanet", teacher_ckpt=str(path)))
    for k, v in donor.state_dict().items():
        assert torch.equal(model.teacher_model.state_dict()[k], v), k

    # An R18 checkpoint into an R50 teacher: missing, unexpected and shape-mismatched keys are named.
    r50 = mmdet_model("retinanet", depth=50)
    with pytest.raises(CheckpointMismatchError, match=r"teacher_ckpt .*retinanet_r18\.pth.* missing .*"
                                                      r"backbone\.layer1\.0\.conv3\.weight") as err:
        MODELS.build(distiller_cfg("retinanet", teacher=r50, teacher_ckpt=str(path)))
    assert "keys differ in shape: backbone.layer1.0.conv1.weight (checkpoint [64, 64, 3, 3], model [64, 64, 1, 1])" \
        in str(err.value)

    # A DDP-saved checkpoint ("module." prefix) loads; stray keys raise.
    torch.save(dict(state_dict={f"module.{k}": v for k, v in donor.state_dict().items()}), tmp_path / "ddp.pth")
    MODELS.build(distiller_cfg("retinanet", teacher_ckpt=str(tmp_path / "ddp.pth")))
    torch.save(dict(state_dict={**donor.state_dict(), "extra.weight": torch.zeros(1)}), tmp_path / "extra.pth")
    with pytest.raises(CheckpointMismatchError, match=r"not in the model: extra\.weight"):
        MODELS.build(distiller_cfg("retinanet", teacher_ckpt=str(tmp_path / "extra.pth")))
    with pytest.raises(FileNotFoundError):
        MODELS.build(distiller_cfg("retinanet", teacher_ckpt=str(tmp_path / "nope.pth")))


def test_no_checkpoint_is_one_warning(monkeypatch):
    messages = []
    monkeypatch.setattr(teacher_module, "print_log", lambda msg, **kw: messages.append((msg, kw.get("level"))))
    MODELS.build(distiller_cfg("atss"))
    assert len(messages) == 1 and "teacher_ckpt is None" in messages[0][0] and messages[0][1] == 30


def test_mismatched_teachers_raise():
    other_classes = mmdet_model("retinanet", num_classes=80)
    with pytest.raises(ValueError, match=r"different numbers of classes \(3 and 80\).*allow_class_mismatch"):
        MODELS.build(distiller_cfg("retinanet", teacher=other_classes))
    model = MODELS.build(distiller_cfg("retinanet", teacher=other_classes, allow_class_mismatch=True))
    model.train()
    losses = model.loss(*detection_batch(model))
    assert torch.isfinite(losses["loss_hd"])

    with pytest.raises(ValueError, match=r"RoI heads predict different numbers of classes \(3 and 80\)"):
        MODELS.build(distiller_cfg("faster_rcnn", teacher=mmdet_model("faster_rcnn", num_classes=80)))

    four_levels = mmdet_model("retinanet")
    four_levels["neck"]["num_outs"] = 4
    four_levels["bbox_head"]["anchor_generator"]["strides"] = [8, 16, 32, 64]
    with pytest.raises(ValueError, match=r"same FPN levels .*\[8\.0, 16\.0, 32\.0, 64\.0, 128\.0\] and "
                                         r"\[8\.0, 16\.0, 32\.0, 64\.0\]"):
        MODELS.build(distiller_cfg("retinanet", teacher=four_levels))

    with pytest.raises(ValueError, match="same priors per location"):
        MODELS.build(distiller_cfg("retinanet", teacher=mmdet_model("atss")))
    # As many anchors per location, but of other sizes: the teacher's deltas would be decoded wrongly.
    bigger = mmdet_model("retinanet")
    bigger["bbox_head"]["anchor_generator"]["octave_base_scale"] = 8
    with pytest.raises(ValueError, match=r"same priors \(anchor sizes, ratios, scales and offsets\); they differ in "
                                         r"octave_base_scale: 4 \(student\) vs 8 \(teacher\); scales: \[4\.0, "
                                         r"5\.0397, 6\.3496\] \(student\) vs \[8\.0, 10\.0794, 12\.6992\] "
                                         r"\(teacher\)$"):
        MODELS.build(distiller_cfg("retinanet", teacher=bigger))
    offset_anchors = mmdet_model("retinanet")
    offset_anchors["bbox_head"]["anchor_generator"]["center_offset"] = 0.5
    with pytest.raises(ValueError, match=r"they differ in center_offset: 0\.0 \(student\) vs 0\.5 \(teacher\)$"):
        MODELS.build(distiller_cfg("retinanet", teacher=offset_anchors))
    offset = mmdet_model("fcos")
    offset["bbox_head"]["center_sample_radius"] = 1.0  # not a prior setting: builds
    MODELS.build(distiller_cfg("fcos", teacher=offset))
    with pytest.raises(TypeError, match="must be a TwoStageDetector"):
        MODELS.build(distiller_cfg("faster_rcnn", teacher=mmdet_model("retinanet")))


def test_unsupported_head_raises():
    gfl = mmdet_model("atss")
    gfl["type"] = "GFL"
    gfl["bbox_head"] = dict(
        type="GFLHead", num_classes=3, in_channels=256, stacked_convs=1, feat_channels=64,
        anchor_generator=dict(type="AnchorGenerator", ratios=[1.0], octave_base_scale=8, scales_per_octave=1,
                              strides=[8, 16, 32, 64, 128]),
        loss_cls=dict(type="QualityFocalLoss", use_sigmoid=True, beta=2.0, loss_weight=1.0),
        loss_dfl=dict(type="DistributionFocalLoss", loss_weight=0.25), reg_max=16,
        loss_bbox=dict(type="GIoULoss", loss_weight=2.0))
    cfg = ConfigDict(dict(gfl, type="TBDSingleStageDetector", teacher_config=dict(model=copy.deepcopy(gfl))))
    with pytest.raises(NotImplementedError, match="does not support GFLHead"):
        MODELS.build(cfg)


@pytest.mark.parametrize("arch", ["retinanet", "faster_rcnn"])
def test_autocast_decodes_in_float32(arch):
    """Under autocast (AMP training) the heads' boxes are 16-bit; the distiller decodes them in float32 on
    float32 priors, as mmdet does: the losses stay close to the float32 ones."""
    torch.manual_seed(3)
    model = MODELS.build(distiller_cfg(arch))
    model.init_weights()
    model.train()
    inputs, samples = detection_batch(model)
    torch.manual_seed(4)
    full = model.loss(inputs, samples)
    torch.manual_seed(4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        amp = model.loss(inputs, samples)
    assert model._tbd_priors_cache and all(key[1] == torch.float32 for key in model._tbd_priors_cache)
    for key in ("loss_hd", "loss_tfd"):
        assert amp[key].dtype == torch.float32 and torch.isfinite(amp[key])
        torch.testing.assert_close(amp[key], full[key], rtol=0.1, atol=1e-3)


# ---- heads and settings the distiller cannot read, refused when the model is built --------------
def test_heads_whose_outputs_are_not_deltas_are_refused():
    from tbd_ops.mmdet.teacher import coder_from_head

    # TOOD's head has DeltaXYWHBBoxCoder but its forward outputs boxes already decoded.
    tood = MODELS.build(ConfigDict(
        type="TOODHead", num_classes=3, in_channels=32, stacked_convs=1, feat_channels=32, anchor_type="anchor_free",
        anchor_generator=dict(type="AnchorGenerator", ratios=[1.0], octave_base_scale=8, scales_per_octave=1,
                              strides=[8, 16, 32, 64, 128]),
        loss_cls=dict(type="QualityFocalLoss", use_sigmoid=True, activated=True, beta=2.0, loss_weight=1.0),
        loss_bbox=dict(type="GIoULoss", loss_weight=2.0)))
    with pytest.raises(NotImplementedError, match="TOODHead with bbox_coder 'DeltaXYWHBBoxCoder': its forward"):
        coder_from_head(tood)
    # Heads that reuse the supported forwards are accepted (FreeAnchor: RetinaNet's; PAA: ATSS's).
    for arch, head_type in (("retinanet", "FreeAnchorRetinaHead"), ("atss", "PAAHead")):
        head = mmdet_model(arch)["bbox_head"]
        head["type"] = head_type
        assert coder_from_head(MODELS.build(ConfigDict(head)))[0] == "delta_xywh", head_type


def test_softmax_classification_is_refused():
    softmax = mmdet_model("retinanet")
    softmax["bbox_head"]["loss_cls"] = dict(type="CrossEntropyLoss", use_sigmoid=False, loss_weight=1.0)
    with pytest.raises(NotImplementedError, match=r"sigmoid class scores; RetinaHead classifies with a softmax"):
        MODELS.build(distiller_cfg("retinanet", teacher=softmax))
    cfg = distiller_cfg("retinanet")
    cfg["bbox_head"]["loss_cls"] = dict(type="CrossEntropyLoss", use_sigmoid=False, loss_weight=1.0)
    with pytest.raises(NotImplementedError, match="softmax"):
        MODELS.build(cfg)


@pytest.mark.parametrize("override,msg", [
    (dict(num_levels=4), r"tbd_loss\.num_levels = 4 does not match the models \(5\)"),
    (dict(in_channels=128), r"tbd_loss\.in_channels = 128 does not match the models \(256\)"),
    (dict(teacher_channels=64), r"tbd_loss\.teacher_channels = 64 does not match the models \(256\)"),
    (dict(coder="distance"), r"tbd_loss\.coder = 'distance' does not match the models \('delta_xywh'\)"),
    (dict(hd_mode="iou"), r"TBDSingleStageDetector: tbd_loss: HarmonyDistillationLoss: mode must be one of"),
    (dict(tfd_weight="a"), r"TBDSingleStageDetector: tbd_loss: TaskDecoupledFeatureLoss: loss_weight must be a number"),
])
def test_tbd_loss_settings_are_checked_when_built(override, msg):
    with pytest.raises((ValueError, TypeError), match=msg):
        MODELS.build(distiller_cfg("retinanet", tbd_loss=override))
    # The values the heads give are accepted when written out.
    MODELS.build(distiller_cfg("retinanet", tbd_loss=dict(num_levels=5, in_channels=256)))


@pytest.mark.parametrize("student_clips,teacher_clips", [(True, False), (False, True), (True, True)])
def test_each_side_clips_its_boxes_as_its_own_coder(student_clips, teacher_clips):
    teacher = mmdet_model("retinanet")
    teacher["bbox_head"]["bbox_coder"]["clip_border"] = teacher_clips
    cfg = distiller_cfg("retinanet", teacher=teacher)
    cfg["bbox_head"]["bbox_coder"]["clip_border"] = student_clips
    model = MODELS.build(cfg)
    model.train()
    seen = {}

    def record(module, args, kwargs):
        seen["student"] = args[8] if len(args) > 8 else kwargs.get("img_shapes")
        seen["teacher"] = kwargs["teacher_img_shapes"]

    handle = model.tbd_loss.register_forward_pre_hook(record, with_kwargs=True)
    try:
        inputs, samples = detection_batch(model)
        model.loss(inputs, samples)
    finally:
        handle.remove()
    shapes = [tuple(s.img_shape[:2]) for s in samples]
    assert seen["student"] == (shapes if student_clips else None)
    assert seen["teacher"] == (shapes if teacher_clips else None)


def test_unreadable_teacher_checkpoint_names_the_argument(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"teacher_ckpt: no checkpoint at '.*nope\.pth'"):
        MODELS.build(distiller_cfg("retinanet", teacher_ckpt=str(tmp_path / "nope.pth")))
    junk = tmp_path / "notes.pth"
    junk.write_text("not a checkpoint")
    with pytest.raises(CheckpointMismatchError, match=r"teacher_ckpt '.*notes\.pth' cannot be read as a PyTorch "
                                                      r"checkpoint"):
        MODELS.build(distiller_cfg("retinanet", teacher_ckpt=str(junk)))
