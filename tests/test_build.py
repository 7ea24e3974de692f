import inspect
import os
import re

import pytest
import torch
from torch.utils.cpp_extension import CUDA_HOME

import tbd_ops
from tbd_ops.ops._utils import schema_defaults

# Every operator the library registers, from the dispatcher: a new op is covered without an edit here.
OPS = sorted(n.split("::", 1)[1] for n in torch._C._dispatch_get_all_op_names() if n.startswith("tbd_ops::"))
# Composite operators: implemented once over the others (CompositeImplicitAutograd), no backend kernels.
COMPOSITE = [op for op in OPS if torch._C._dispatch_has_kernel_for_dispatch_key(f"tbd_ops::{op}",
                                                                                "CompositeImplicitAutograd")]
KERNEL_OPS = [op for op in OPS if op not in COMPOSITE]


def test_version():
    assert re.fullmatch(r"\d+\.\d+\.\d+.*", tbd_ops.__version__)


def test_every_op_is_found():
    # The families of the library (a registration that went missing would shrink the list).
    for op in ["channel_max_spatial_softmax", "decode_max_iou", "box_max_iou", "harmony_score",
               "harmony_distillation_loss", "masked_sq_dist", "masked_l1", "prediction_guided_assign",
               "consistency_voting", "sigmoid_focal_loss", "scale_consistency_loss"]:
        assert op in OPS
    assert {"box_max_iou", "scale_consistency_loss"} <= set(COMPOSITE)


@pytest.mark.parametrize("op", KERNEL_OPS)
def test_cpu_kernels_registered(op):
    assert torch._C._dispatch_has_kernel_for_dispatch_key(f"tbd_ops::{op}", "CPU")


@pytest.mark.skipif(not tbd_ops.cuda_available(), reason="a CPU-only build of tbd_ops (TBD_OPS_CUDA=0 or no nvcc)")
@pytest.mark.parametrize("op", KERNEL_OPS)
def test_cuda_kernels_registered(op):
    # A build with the CUDA kernels registers every op for the CUDA key, GPU or not.
    assert torch._C._dispatch_has_kernel_for_dispatch_key(f"tbd_ops::{op}", "CUDA")


@pytest.mark.parametrize("op", KERNEL_OPS)
def test_fake_kernels_registered(op):
    """torch.compile traces every op with its fake kernel (python/tbd_ops/ops/<op>.py)."""
    assert torch._library.simple_registry.singleton.find(f"tbd_ops::{op}").fake_impl.kernel is not None


# The ops a user calls (not the backward ops, nor the forward variants used where no gradient will be asked).
USER_OPS = [op for op in KERNEL_OPS if not op.endswith("_backward") and "no_grad" not in op and op != "_device_values"]


@pytest.mark.parametrize("op", USER_OPS)
def test_autograd_kernels_are_cpp(op):
    """Every op's autograd is a C++ kernel at the Autograd key (csrc/<op>.cpp), not a Python one: a
    call then costs no Python (torch.library.register_autograd's wrapper flattens a list op's
    arguments on every call and in every direction)."""
    dump = torch._C._dispatch_dump(f"tbd_ops::{op}")
    line = next((ln for ln in dump.splitlines() if ln.startswith("Autograd[alias]")), None)
    assert line is not None, f"{op}: no autograd kernel\n{dump}"
    # A kernel registered from Python reads "registered at /dev/null" (or a .py file); a C++ one names
    # its csrc file (its unboxed function is listed unless it takes SymInts, whose variant is not).
    assert re.search(r"registered at \S*csrc/\w+\.cpp:\d+ ", line), line


@pytest.mark.skipif(CUDA_HOME is None, reason="no CUDA toolkit on this machine")
def test_ci_builds_cuda_kernels_when_nvcc_exists():
    # CI sets TBD_OPS_CUDA=1 where nvcc exists: a silent CPU-only build would fail here.
    if os.environ.get("TBD_OPS_CUDA", "") not in ("1", "on", "true", "yes"):
        pytest.skip("TBD_OPS_CUDA is not 1 in this environment")
    assert tbd_ops.cuda_available()


def test_public_api():
    for op in OPS:
        if op.startswith("_"):
            continue  # backward ops
        assert callable(getattr(tbd_ops, op)), op
        assert callable(getattr(tbd_ops.reference, op)), op
    assert callable(tbd_ops.cuda_available)


# ---- defaults: one source (the schema), the values of the papers --------------------------------
def _signature_defaults(fn):
    return {k: v.default for k, v in inspect.signature(fn).parameters.items()
            if v.default is not inspect.Parameter.empty}


def _same(a, b):
    if isinstance(a, (list, tuple)) or isinstance(b, (list, tuple)):
        return list(a) == list(b)
    return a == b


@pytest.mark.parametrize("op", [op for op in OPS if not op.startswith("_") and op not in COMPOSITE])
def test_function_and_reference_defaults_are_the_schemas(op):
    """The Python function and the reference default every argument the schema
    has a default for, to the schema's value."""
    schema = schema_defaults(op)
    for fn in (getattr(tbd_ops, op), getattr(tbd_ops.reference, op)):
        defaults = _signature_defaults(fn)
        for name, value in schema.items():
            if name in defaults:
                assert _same(defaults[name], value), f"{fn.__module__}.{op}: {name} = {defaults[name]!r}, schema {value!r}"


def test_defaults_are_the_papers():
    """The documented defaults, from the papers' official code (PseCo: iou_thr 0.4, topk 12,
    alpha 0.5; RetinaNet's focal loss: gamma 2, alpha 0.25; MMDetection's DeltaXYWHBBoxCoder:
    wh_ratio_clip 16/1000), not from the code under test."""
    assert schema_defaults("prediction_guided_assign") == {"valid": None, "iou_thr": 0.4, "topk": 12, "alpha": 0.5}
    focal = schema_defaults("sigmoid_focal_loss")
    assert (focal["gamma"], focal["alpha"], focal["reduction"]) == (2.0, 0.25, "sum")
    assert schema_defaults("decode_max_iou")["wh_ratio_clip"] == 16 / 1000
    assert schema_defaults("consistency_voting") == {"mode": "pseco"}
    assert schema_defaults("harmony_distillation_loss") == {"mode": "iou_guided", "eps": 1e-6}
    assert schema_defaults("channel_max_spatial_softmax") == {"temperature": 1.0, "scale_by_hw": False}


def test_module_defaults_are_the_ops():
    from tbd_ops import nn
    same = lambda *names: {k: k for k in names}  # noqa: E731
    groups = [  # (module, op, {the module's argument: the op's argument})
        (nn.PseCoAssigner, "prediction_guided_assign", same("iou_thr", "topk", "alpha")),
        (nn.ConsistencyVotingWeights, "consistency_voting", same("mode")),
        (nn.SigmoidFocalLoss, "sigmoid_focal_loss", same("gamma", "alpha")),
        (nn.HarmonyDistillationLoss, "harmony_distillation_loss", same("mode", "eps")),
        (nn.TBDLoss, "harmony_distillation_loss", {"hd_mode": "mode"}),
        (nn.TBDLoss, "decode_max_iou", same("coder")),
        (nn.TBDLoss, "channel_max_spatial_softmax", same("temperature", "scale_by_hw")),
    ]
    try:  # the MMDetection registrations, where mmdet is installed
        from tbd_ops.mmdet.pseco import PredictionGuidedAssigner
        groups.append((PredictionGuidedAssigner, "prediction_guided_assign", same("iou_thr", "topk", "alpha")))
    except ImportError:
        pass
    pairs = [(module, arg, op, op_arg) for module, op, args in groups for arg, op_arg in args.items()]
    for module, arg, op, op_arg in pairs:
        got = _signature_defaults(module.__init__)[arg]
        assert _same(got, schema_defaults(op)[op_arg]), f"{module.__name__}({arg}={got!r}) vs {op}({op_arg})"
