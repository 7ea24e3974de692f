import re

import pytest
import torch
from torch.utils.cpp_extension import CUDA_HOME

import tbd_ops

OPS = ["channel_max_spatial_softmax", "_channel_max_spatial_softmax_backward",
       "decode_max_iou", "_decode_max_iou_backward",
       "sigmoid_focal_loss", "_sigmoid_focal_loss_backward", "consistency_voting",
       "harmony_score", "_harmony_score_backward",
       "harmony_distillation_loss", "_harmony_distillation_loss_backward",
       "_device_values"]


def test_version():
    assert re.fullmatch(r"\d+\.\d+\.\d+.*", tbd_ops.__version__)


@pytest.mark.parametrize("op", OPS)
def test_cpu_kernels_registered(op):
    assert torch._C._dispatch_has_kernel_for_dispatch_key(f"tbd_ops::{op}", "CPU")


@pytest.mark.skipif(not tbd_ops.cuda_available(), reason="a CPU-only build of tbd_ops (TBD_OPS_CUDA=0 or no nvcc)")
@pytest.mark.parametrize("op", OPS)
def test_cuda_kernels_registered(op):
    # A build with the CUDA kernels registers every op for the CUDA key, GPU or not.
    assert torch._C._dispatch_has_kernel_for_dispatch_key(f"tbd_ops::{op}", "CUDA")


@pytest.mark.skipif(CUDA_HOME is None, reason="no CUDA toolkit on this machine")
def test_ci_builds_cuda_kernels_when_nvcc_exists():
    # CI sets TBD_OPS_CUDA=1 where nvcc exists: a silent CPU-only build would fail here.
    import os
    if os.environ.get("TBD_OPS_CUDA", "") not in ("1", "on", "true", "yes"):
        pytest.skip("TBD_OPS_CUDA is not 1 in this environment")
    assert tbd_ops.cuda_available()


def test_box_max_iou_is_composite():
    assert torch._C._dispatch_has_kernel_for_dispatch_key("tbd_ops::box_max_iou", "CompositeImplicitAutograd")


def test_public_api():
    for name in ["channel_max_spatial_softmax", "decode_max_iou", "box_max_iou", "cuda_available"]:
        assert callable(getattr(tbd_ops, name))
        if name != "cuda_available":
            assert callable(getattr(tbd_ops.reference, name))
