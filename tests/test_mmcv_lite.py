"""tbd_ops.mmcv_lite: the stand-in for mmcv's compiled ops that lets mmdet run with mmcv-lite."""
import importlib.util
import sys

import pytest
import torch

from tbd_ops import mmcv_lite

torchvision = pytest.importorskip("torchvision", reason="torchvision is not installed (make test installs it)")


def greedy_nms(boxes, scores, thr, offset):
    """Written from the definition: keep the best box, drop those overlapping it by more than thr, repeat."""
    order = sorted(range(len(scores)), key=lambda i: -float(scores[i]))
    keep = []
    for i in order:
        ok = True
        for j in keep:
            a, b = boxes[i].tolist(), boxes[j].tolist()
            iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]) + offset)
            ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]) + offset)
            inter = iw * ih
            area = lambda r: (r[2] - r[0] + offset) * (r[3] - r[1] + offset)  # noqa: E731
            if inter / (area(a) + area(b) - inter) > thr:
                ok = False
                break
        if ok:
            keep.append(i)
    return keep


def test_installs_a_module_with_a_spec():
    mmcv_lite.install()
    ext = sys.modules["mmcv._ext"]
    # mmengine (revert_sync_batchnorm) and importlib ask for the spec of an imported module.
    assert importlib.util.find_spec("mmcv._ext") is not None
    assert ext.__spec__.name == "mmcv._ext"
    with pytest.raises(mmcv_lite.CompiledOpCalled, match=r"mmcv\._ext\.roi_align_forward.*use_torchvision=True"):
        ext.roi_align_forward()
    with pytest.raises(mmcv_lite.CompiledOpCalled, match=r"mmcv\._ext\.deform_conv_forward was called, but "
                                                         r"mmcv-lite has no compiled ops \(install the full mmcv "
                                                         r"for it\)$"):
        ext.deform_conv_forward()
    mmcv_lite.install()  # idempotent
    assert sys.modules["mmcv._ext"] is ext


@pytest.mark.parametrize("offset", [0, 1])
def test_nms_matches_greedy_definition(offset):
    xy = torch.rand(60, 2) * 50
    boxes = torch.cat([xy, xy + 5 + torch.rand(60, 2) * 30], 1)
    scores = torch.rand(60)
    keep = mmcv_lite.nms(boxes, scores, 0.4, offset=offset)
    assert keep.dtype == torch.int64
    assert keep.tolist() == greedy_nms(boxes, scores, 0.4, offset)


def test_mmcv_nms_through_the_stand_in():
    mmcv_lite.install()
    from mmcv.ops import batched_nms

    boxes = torch.tensor([[0., 0., 10., 10.], [1., 1., 10., 10.], [0., 0., 10., 10.]])
    scores = torch.tensor([0.9, 0.8, 0.7])
    dets, keep = batched_nms(boxes, scores, torch.tensor([0, 0, 1]), dict(type="nms", iou_threshold=0.5))
    assert keep.tolist() == [0, 2]
