"""The number, integer and flag arguments of the public functions and modules: a value of the
wrong kind raises an error that names the argument and shows the value, instead of being
coerced (``bool("False")`` is True, ``int(2.7)`` is 2) or failing in ``float()`` without a name."""
import math

import numpy as np
import pytest
import torch

import tbd_ops
from tbd_ops import nn as tnn

X = torch.randn(1, 3, 4, 5)


def _assign(**kw):
    return tbd_ops.prediction_guided_assign([torch.rand(3, 4)], [torch.rand(3, 2)], [torch.rand(1, 4)],
                                            [torch.tensor([0])], **kw)


CASES = [
    # (call, exception, message)
    (lambda: tbd_ops.channel_max_spatial_softmax(X, 1.0, "False"), TypeError,
     "channel_max_spatial_softmax: scale_by_hw must be True or False, got 'False'"),
    (lambda: tbd_ops.channel_max_spatial_softmax(X, 1.0, 1), TypeError,
     "channel_max_spatial_softmax: scale_by_hw must be True or False, got 1"),
    (lambda: tbd_ops.channel_max_spatial_softmax(X, None), TypeError,
     "channel_max_spatial_softmax: temperature must be a number, got None"),
    (lambda: tbd_ops.channel_max_spatial_softmax([X, X], "a"), TypeError,
     "channel_max_spatial_softmax: temperature must be a number, got 'a'"),
    (lambda: _assign(topk=2.7), TypeError, "prediction_guided_assign: topk must be an integer, got 2.7"),
    (lambda: _assign(topk=True), TypeError, "prediction_guided_assign: topk must be an integer, got True"),
    (lambda: _assign(topk=2 ** 70), ValueError, "prediction_guided_assign: topk must fit in 64 bits"),
    (lambda: _assign(iou_thr="0.5"), TypeError, "prediction_guided_assign: iou_thr must be a number, got '0.5'"),
    (lambda: tbd_ops.sigmoid_focal_loss(torch.rand(2, 3), torch.tensor([0, 1]), gamma=None), TypeError,
     "sigmoid_focal_loss: gamma must be a number, got None"),
    (lambda: tbd_ops.harmony_distillation_loss([torch.rand(1, 2, 2)] * 1, [torch.rand(1, 2, 2)],
                                               [torch.rand(1, 2, 2)], [torch.rand(1, 2, 2)], eps="x"),
     TypeError, "harmony_distillation_loss: eps must be a number, got 'x'"),
    (lambda: tnn.HarmonyDistillationLoss(eps=0), ValueError,
     "HarmonyDistillationLoss: eps must be a finite number > 0, got 0.0"),
    (lambda: tnn.HarmonyDistillationLoss(loss_weight=-1), ValueError,
     "HarmonyDistillationLoss: loss_weight must be a finite number >= 0, got -1.0"),
    (lambda: tnn.TaskWeightGenerator(hidden=2.5), TypeError, "TaskWeightGenerator: hidden must be an integer"),
    (lambda: tnn.TBDLoss(num_levels=(5,)), TypeError, r"TBDLoss: num_levels must be an integer, got \(5,\)"),
    (lambda: tnn.TBDLoss(in_channels=(256, 256)), TypeError,
     r"TaskDecoupledFeatureLoss: in_channels must be an integer, got \(256, 256\)"),
    (lambda: tnn.TBDLoss(scale_by_hw="no"), TypeError, "TBDLoss: scale_by_hw must be True or False, got 'no'"),
    (lambda: tnn.TBDLoss(temperature=0), ValueError, "TBDLoss: temperature must be a finite number > 0"),
    (lambda: tnn.TBDLoss(fixed_task_weights=(1.0, "a")), TypeError,
     r"TaskDecoupledFeatureLoss: fixed_task_weights\[1\] must be a number, got 'a'"),
    # coder_cfg values: checked by the op's own rules when the module is built, not at its first forward.
    (lambda: tnn.TBDLoss(coder_cfg={"stds": [1, 1, math.nan, 1]}), ValueError,
     "TBDLoss: coder_cfg: decode_max_iou: means and stds must be finite"),
    (lambda: tnn.TBDLoss(coder_cfg={"stds": "abcd"}), TypeError,
     "TBDLoss: coder_cfg\\['stds'\\] must be a sequence of numbers, got 'abcd'"),
    (lambda: tnn.TBDLoss(coder_cfg={"wh_ratio_clip": 0.0}), ValueError,
     "TBDLoss: coder_cfg: decode_max_iou: wh_ratio_clip must be a finite number > 0"),
    (lambda: tnn.TBDLoss(coder="distance", coder_cfg={"scales": [8, 16, 32, 64, math.inf]}), ValueError,
     "TBDLoss: coder_cfg: decode_max_iou: scale must be finite, got inf"),
    (lambda: tnn.TBDLoss(coder="distance", teacher_coder_cfg={"scales": [8, 16, 32, 64, math.nan]}), ValueError,
     "TBDLoss: teacher_coder_cfg: decode_max_iou: scale must be finite, got nan"),
    (lambda: tnn.PseCoAssigner(topk=2.5), TypeError, "PseCoAssigner: topk must be an integer, got 2.5"),
    (lambda: tnn.SigmoidFocalLoss(gamma="2"), TypeError, "SigmoidFocalLoss: gamma must be a number, got '2'"),
]


@pytest.mark.parametrize("call,exc,msg", CASES, ids=[c[2][:60] for c in CASES])
def test_wrong_kind_of_value_raises(call, exc, msg):
    with pytest.raises(exc, match=msg):
        call()


def test_numbers_of_other_types_are_accepted():
    """NumPy scalars and 0-d tensors are numbers; NumPy bools are flags."""
    want = tbd_ops.channel_max_spatial_softmax(X, 2.0, True)
    for temperature, flag in [(np.float32(2.0), np.bool_(True)), (torch.tensor(2.0), True), (2, True)]:
        assert torch.equal(tbd_ops.channel_max_spatial_softmax(X, temperature, flag), want)
    assert tnn.PseCoAssigner(topk=np.int64(3)).topk == 3
    assert tnn.TBDLoss(num_levels=np.int32(3), in_channels=8).num_levels == 3


def test_features_in_another_dtype_than_the_adapters():
    """float64 features into a float32 module: an error naming the argument, not conv2d's about its bias;
    under autocast, or with the module converted, it runs."""
    m = tnn.TaskDecoupledFeatureLoss(num_levels=1, in_channels=4)
    fs, ft = torch.randn(2, 4, 3, 5, dtype=torch.float64), torch.randn(2, 4, 3, 5)
    maps = [[torch.rand(2, 3, 5)] for _ in range(4)]
    with pytest.raises(TypeError, match=r"student_feats\[0\] is torch.float64, the adapters are torch.float32"):
        m([fs], [ft], *maps)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.isfinite(m([fs.float()], [ft], *maps))
    assert m.double()([fs], [ft.double()], *[[x[0].double()] for x in maps]).dtype == torch.float64
