"""TBD distillation the way users run it: config files, mmengine's Runner, checkpoints the Runner wrote.

For RetinaNet, ATSS, FCOS and Faster R-CNN (ResNet-18, no pretrained weights) on a generated COCO-format
set: train a teacher with the Runner, distill a student from the teacher's ``iter_N.pth`` with a config
that starts from the config tbd_ops ships for that detector, resume the distiller from its own checkpoint,
export the student and load it into the plain detector. The FCOS teacher normalizes its inputs the caffe way
(BGR, mean only) while the student uses torchvision's (RGB, mean/std).
"""
import math

import pytest
import torch

from tbd_ops import mmcv_lite

mmcv_lite.install()
pytest.importorskip("mmdet", reason="mmdet is not installed (make test installs mmdet==3.3.0)")

from mmengine.config import Config, ConfigDict  # noqa: E402
from mmdet.registry import MODELS  # noqa: E402
from mmdet.utils import register_all_modules  # noqa: E402

import tbd_ops.mmdet  # noqa: E402,F401
from tbd_ops.mmdet.checkpoint import CheckpointMismatchError, load_checkpoint_weights_only  # noqa: E402
from tbd_ops.mmdet.export import export_student  # noqa: E402
from tbd_ops.mmdet.train import config_path, main as train_main  # noqa: E402
import runner_harness as H  # noqa: E402

register_all_modules()

SHIPPED = {
    "retinanet": "tbd_ops::tbd/tbd_retinanet_r18-from-r50_fpn_1x_coco.py",
    "atss": "tbd_ops::tbd/tbd_atss_r18-from-r50_fpn_1x_coco.py",
    "fcos": "tbd_ops::tbd/tbd_fcos_r18-from-r50-caffe_fpn_gn-head-center-normbbox-centeronreg-giou_1x_coco.py",
    "faster_rcnn": "tbd_ops::tbd/tbd_faster-rcnn_r18-from-r50_fpn_1x_coco.py",
}
TEACHER_BASE = dict(H.MMDET_CONFIGS, fcos="mmdet::fcos/fcos_r50-caffe_fpn_gn-head-center-normbbox-centeronreg-giou_1x_coco.py")
R18_NECK = dict(in_channels=[64, 128, 256, 512])


def test_model_overrides(arch, depth=None):
    """What a CPU test changes in a shipped or mmdet config: no download, 3 classes, torchvision RoIAlign."""
    model = dict(backbone=dict(init_cfg=None), data_preprocessor=dict(batch_augments=None))
    if depth is not None:
        model["backbone"]["depth"] = depth
        model["neck"] = R18_NECK
    if arch == "faster_rcnn":
        model["roi_head"] = dict(bbox_head=dict(num_classes=len(H.CLASSES)),
                                 bbox_roi_extractor=dict(roi_layer=dict(use_torchvision=True)))
    else:
        model["bbox_head"] = dict(num_classes=len(H.CLASSES))
    return model


test_model_overrides.__test__ = False  # a helper, not a test


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return H.make_coco(tmp_path_factory.mktemp("coco"), num_images=4, seed=3)


def finite_losses(records, keys):
    for r in records:
        for k in keys:
            assert k in r, (k, sorted(r))
            assert math.isfinite(r[k]), (k, r)


@pytest.mark.parametrize("arch", list(SHIPPED))
def test_teacher_then_distill_then_resume_then_export(arch, data, tmp_path):
    # 1. The teacher, trained by the Runner from its config; its CheckpointHook writes iter_2.pth.
    teacher_cfg = H.config_on_base(tmp_path / "teacher.py", TEACHER_BASE[arch],
                                   test_model_overrides(arch, depth=18),
                                   H.runtime(data, tmp_path / "teacher", max_iters=2, lr=0.002))
    H.train(teacher_cfg)
    teacher_ckpt = tmp_path / "teacher" / "iter_2.pth"
    assert teacher_ckpt.is_file()

    # 2. The student distilled from it, with the config tbd_ops ships as the base.
    model = test_model_overrides(arch)
    model.update(teacher_config=str(teacher_cfg), teacher_ckpt=str(teacher_ckpt))
    work = tmp_path / "student"
    student_cfg = H.config_on_base(tmp_path / "student.py", config_path(SHIPPED[arch]), model,
                                   H.runtime(data, work, max_iters=3, lr=0.002))
    runner = H.train(student_cfg)
    records = H.scalars(work)
    assert [r["iter"] for r in records] == [1, 2, 3]
    finite_losses(records, ["loss", "loss_hd", "loss_tfd"])
    assert any(r["loss_hd"] > 0 for r in records)  # a teacher other than the student
    distiller = runner.model
    assert type(distiller).__name__ == ("TBDTwoStageDetector" if arch == "faster_rcnn" else "TBDSingleStageDetector")
    if arch == "fcos":
        assert distiller.teacher_input.perm == [2, 1, 0] and not distiller.teacher_input.identity

    # The teacher still holds exactly its checkpoint's weights.
    saved = load_checkpoint_weights_only(str(teacher_ckpt))["state_dict"]
    now = distiller.teacher_model.state_dict()
    assert set(now) == set(saved)
    for k, v in saved.items():
        assert torch.equal(now[k], v), k
    student_ckpt = work / "iter_3.pth"
    assert not any(k.startswith("teacher") for k in load_checkpoint_weights_only(str(student_ckpt))["state_dict"])

    # 3. Resume from the distiller's own checkpoint: iteration 4 only.
    resumed = H.train(student_cfg, resume=True, train_cfg=dict(max_iters=4))
    assert resumed.iter == 4
    assert [r["iter"] for r in H.scalars(work)] == [4]
    finite_losses(H.scalars(work), ["loss_hd", "loss_tfd"])

    # 4. The student alone loads into the plain detector of the student's config, strictly.
    exported = export_student(str(work / "iter_4.pth"), str(tmp_path / "student_only.pth"))
    plain_cfg = Config.fromfile(student_cfg).model
    plain_cfg.type = "FasterRCNN" if arch == "faster_rcnn" else type(distiller.teacher_model).__name__
    for key in ("teacher_config", "teacher_ckpt", "tbd_loss", "eval_teacher", "allow_class_mismatch"):
        plain_cfg.pop(key, None)
    plain = MODELS.build(plain_cfg)
    tbd_ops.mmdet.checkpoint.load_state_dict_strict(plain, str(tmp_path / "student_only.pth"))
    for k, v in resumed.model.state_dict().items():
        if not k.startswith("tbd_loss."):
            assert torch.equal(plain.state_dict()[k], v), k
    assert set(exported) == set(plain.state_dict())

    if arch == "retinanet":
        # A Runner-written checkpoint into a teacher of another depth raises, naming the keys.
        wrong_cfg = Config.fromfile(teacher_cfg)
        wrong_cfg.model.backbone.depth = 34
        cfg = Config.fromfile(student_cfg).model
        cfg.teacher_config = wrong_cfg
        with pytest.raises(CheckpointMismatchError, match=r"teacher_ckpt .*iter_2\.pth.* missing from the "
                                                          r"checkpoint: backbone\.layer1\.2\."):
            MODELS.build(cfg)


@pytest.mark.parametrize("arch", ["retinanet", "atss"])
def test_student_started_from_its_teacher_has_zero_loss_until_it_moves(arch, data, tmp_path):
    """The invariant through the Runner: a student that ``load_from`` starts from the teacher's own
    Runner-written checkpoint, with identity adapters, sees exactly the teacher's maps and features, so
    the first iteration logs ``loss_hd == 0`` and ``loss_tfd == 0`` (p_c and p_r of the teacher come
    from the no-grad path, the student's from the gradient path; TFD normalizes its masks after the
    reduction, the TWG runs once for all levels, RetinaNet's max over 9 anchors is one op for all
    levels, and the 1x1 adapters run as a GEMM on the CPU). After one SGD step both are positive."""
    teacher_cfg = H.config_on_base(tmp_path / "teacher.py", TEACHER_BASE[arch], test_model_overrides(arch, depth=18),
                                   H.runtime(data, tmp_path / "teacher", max_iters=2, lr=0.002))
    H.train(teacher_cfg)
    teacher_ckpt = tmp_path / "teacher" / "iter_2.pth"

    # The distiller's starting point: the teacher's weights for the student, identity 1x1 adapters.
    state = dict(load_checkpoint_weights_only(str(teacher_ckpt))["state_dict"])
    for l in range(5):
        state[f"tbd_loss.tfd.adapters.{l}.weight"] = torch.eye(256).view(256, 256, 1, 1)
        state[f"tbd_loss.tfd.adapters.{l}.bias"] = torch.zeros(256)
    start = tmp_path / "start.pth"
    torch.save({"state_dict": state, "meta": {}}, start)

    model = test_model_overrides(arch)
    model.update(teacher_config=str(teacher_cfg), teacher_ckpt=str(teacher_ckpt))
    cfg = H.runtime(data, tmp_path / "student", max_iters=2, lr=0.002)
    cfg["load_from"] = str(start)
    H.train(H.config_on_base(tmp_path / "student.py", config_path(SHIPPED[arch]), model, cfg))
    first, second = H.scalars(tmp_path / "student")
    assert first["iter"] == 1 and first["loss_hd"] == 0.0 and first["loss_tfd"] == 0.0, first
    assert second["loss_hd"] > 0 and second["loss_tfd"] > 0, second


def test_shipped_configs_build():
    """Every shipped TBD config parses (mmdet's configs as bases) and builds its distiller."""
    for arch, name in SHIPPED.items():
        cfg = Config.fromfile(config_path(name))
        assert cfg.custom_imports["imports"] == ["tbd_ops.mmdet"]
        assert str(cfg.model.teacher_ckpt).startswith("https://download.openmmlab.com/")
        cfg.model.teacher_ckpt = None  # no download in a test
        model = MODELS.build(cfg.model)
        assert model.backbone.depth == 18 and model.teacher_model.backbone.depth == 50
        assert model.tbd_loss.tfd.in_channels == 256 and len(model.tbd_loss.tfd.adapters) == 5
    with pytest.raises(FileNotFoundError, match="shipped configs: .*tbd/tbd_retinanet"):
        config_path("tbd_ops::tbd/nope.py")


def test_train_command(data, tmp_path):
    """``python -m tbd_ops.mmdet.train CONFIG --work-dir D --cfg-options ...`` (its main) trains a config."""
    model = test_model_overrides("atss")
    model.update(teacher_config=TEACHER_BASE["atss"], teacher_ckpt=None)
    model["teacher_config"] = H.config_on_base(tmp_path / "teacher.py", TEACHER_BASE["atss"],
                                               test_model_overrides("atss", 18), H.runtime(data, tmp_path / "t"))
    cfg = H.config_on_base(tmp_path / "student.py", config_path(SHIPPED["atss"]), model,
                           H.runtime(data, tmp_path / "unused", max_iters=5))
    runner = train_main([cfg, "--work-dir", str(tmp_path / "work"), "--cfg-options", "train_cfg.max_iters=1"])
    assert runner.iter == 1 and (tmp_path / "work" / "iter_1.pth").is_file()
    assert not (tmp_path / "unused").exists()
    with pytest.raises(FileNotFoundError, match="tbd_ops ships no tbd/nope.py"):
        train_main(["tbd_ops::tbd/nope.py"])
    # A config of one's own on a shipped one by its tbd_ops:: name (mmengine cannot read those).
    by_name = tmp_path / "by_name.py"
    by_name.write_text(f'_base_ = "{SHIPPED["atss"]}"\n')
    with pytest.raises(ValueError, match=r"by_name\.py.*'tbd_ops::\.\.\.' cannot be read by mmengine.*"
                                         r"--list-configs"):
        train_main([str(by_name)])


def test_export_command_errors_name_the_problem(tmp_path, capsys):
    """``python -m tbd_ops.mmdet.export``: a missing file, or a checkpoint that is not a distiller's,
    ends with the reason on one line (exit status 2), not a traceback."""
    from tbd_ops.mmdet.export import main as export_main

    with pytest.raises(SystemExit) as e:
        export_main([str(tmp_path / "nope.pth"), str(tmp_path / "out.pth")])
    assert e.value.code == 2
    assert "python -m tbd_ops.mmdet.export: error: " in capsys.readouterr().err
    plain = tmp_path / "plain.pth"
    torch.save(dict(state_dict={"backbone.conv1.weight": torch.zeros(1)}), plain)
    with pytest.raises(SystemExit) as e:
        export_main([str(plain), str(tmp_path / "out.pth")])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "Traceback" not in err
    assert err.startswith("python -m tbd_ops.mmdet.export: error: checkpoint ") and "has no tbd_loss.* weights" in err
    assert not (tmp_path / "out.pth").exists()


def test_command_line_lists_the_shipped_configs():
    """``python -m tbd_ops.mmdet.train --list-configs`` (with mmcv-lite: TBD_OPS_MMCV_LITE=1)."""
    import os
    import subprocess
    import sys

    env = dict(os.environ, TBD_OPS_MMCV_LITE="1", PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
    out = subprocess.run([sys.executable, "-m", "tbd_ops.mmdet.train", "--list-configs"], capture_output=True,
                         text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    listed = dict(line.split() for line in out.stdout.splitlines())
    for name in SHIPPED.values():
        assert listed[name] == config_path(name)
    assert any(name.startswith("tbd_ops::pseco/") for name in listed)
