import re

import pytest
import torch
from torch.utils.cpp_extension import CUDA_HOME

import tbd_ops

OPS = ["channel_max_spatial_softmax", "_channel_max_spatial_softmax_backward",
       "decode_max_iou", "_decode_max_iou_backward"]


def test_version():
    assert re.fullmatch(r"\d+\.\d+\.\d+.*", tbd_ops.__version__)


@pytest.mark.parametrize("op", OPS)
def test_cpu_kernels_registered(op):
    assert torch._C._dispatch_has_kernel_for_dispatch_key(f"tbd_ops::{op}", "CPU")


@pytest.mark.skipif(CUDA_HOME is None,
                    reason="no CUDA toolkit on this machine: a CPU-only build is expected")
@pytest.mark.parametrize("op", OPS)
def test_cuda_kernels_built_and_registered(op):
    # With nvcc present the CUDA kernels are always compiled, GPU or not.
    assert tbd_ops.cuda_available()
    assert torch._C._dispatch_has_kernel_for_dispatch_key(f"tbd_ops::{op}", "CUDA")


def test_box_max_iou_is_composite():
    assert torch._C._dispatch_has_kernel_for_dispatch_key("tbd_ops::box_max_iou", "CompositeImplicitAutograd")


def test_public_api():
    for name in ["channel_max_spatial_softmax", "decode_max_iou", "box_max_iou", "cuda_available"]:
        assert callable(getattr(tbd_ops, name))
        if name != "cuda_available":
            assert callable(getattr(tbd_ops.reference, name))
