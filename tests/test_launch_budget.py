"""What the TBD path asks of a GPU, proven without one: device operations per call and no
host synchronization.

On the emulated CUDA build (tests/emu/observe.py) every tbd_ops call counts its device
operations (kernel launches, memsets, device-wide sorts) and every other ATen op is counted
as at least one PyTorch kernel; anything that would copy between host and device or wait
for the device is recorded with the line of our code that did it.

The problem is a RetinaNet pyramid at batch 2: five levels (strides 8 to 128), A = 9
anchors, C = 80 classes (K = 720 logits per location), 256 feature channels. The counts do
not depend on the spatial size (the launchers loop over images only past 65535 of them), so
the levels are small.

BUDGETS are today's counts, as upper bounds: a change that launches more fails, one that
launches fewer passes (then lower the budget to the new count). p_c, the masked reductions
and the HD loss take every level of a list in the same launches:
``test_launches_do_not_grow_with_levels`` holds their counts independent of the level count.

On a real GPU the same is checked with ``torch.cuda.set_sync_debug_mode("error")`` and by
capturing the loss's forward and backward in a CUDA graph.
"""
import collections
import re
import sys

import pytest
import torch

import tbd_ops
from conftest import requires_cuda, requires_emu
from tbd_ops.nn import TBDLoss

import observe



def emulated(test):
    return requires_emu(pytest.mark.emulated(test))


N = 2
A, C, CH = 9, 80, 256
STRIDES = (8, 16, 32, 64, 128)
LEVELS = [(12, 16), (6, 8), (3, 4), (2, 2), (1, 1)]  # a 96 x 128 image

# Budgets: (device operations of the tbd_ops calls, other ATen ops), per call on the pyramid.
BUDGETS = {
    # p_c: every level in the same two kernels (channel max + partial sums, normalize); the
    # backward two (partial dot products, gradient).
    "p_c forward": (2, 0),
    "p_c backward": (2, None),
    # Without a gradient to come (the teacher's maps): the same two kernels, no argmax kept.
    "p_c forward (no grad)": (2, 0),
    # masked_sq_dist / masked_l1: every level in one partial-sum kernel and one combination;
    # the backward one kernel.
    "masked_sq_dist forward": (2, 0),
    "masked_sq_dist backward": (1, None),
    "masked_l1 forward": (2, 0),
    "masked_l1 backward": (1, None),
    # p_r: the per-image clip shapes written once for all levels, then one kernel per level;
    # the ATen op is the concatenation of the ground truths, once for all levels.
    "decode_max_iou forward": (6, 1),
    "decode_max_iou backward": (5, None),
    # HD: all levels in one launch already (partials + combination; one backward kernel).
    "harmony_distillation_loss forward": (2, 0),
    "harmony_distillation_loss backward": (1, None),
    # The whole loss: student and teacher p_c (2 + 2) and p_r (2 x 6), HD (2), TFD's masked_sq_dist
    # for all levels (2). The ATen ops are TBDLoss's own: per level the adapter and the four maps
    # stacked and summed (TFD's masks and the TWG's pooled means); once for all levels (student,
    # teacher) the ground truths' concatenation and p_r's max over the anchors (the levels' IoUs
    # side by side), the masks' normalization, the TWG and the weighted sum.
    "TBDLoss forward": (20, 43),
    # p_c (2), p_r (5), HD (1), TFD (1); gradients of the student inputs and of the adapters and TWG.
    # (The inputs here are CPU tensors, so the adapters run as on the CPU, a batched GEMM: its
    # backward is 4 ATen ops per level where a CUDA convolution's is 1.)
    "TBDLoss backward": (9, 39),
}


def pyramid(seed=0, dtype=torch.float32, levels=LEVELS, anchors=A):
    g = torch.Generator().manual_seed(seed)

    def maps(k, scale=1.0):
        return [(torch.randn(N, k, h, w, generator=g) * scale).to(dtype) for h, w in levels]

    img_h, img_w = levels[0][0] * 8, levels[0][1] * 8
    priors = []
    for (h, w), s in zip(levels, STRIDES):
        ys, xs = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
        c = torch.stack([(xs + 0.5) * s, (ys + 0.5) * s], -1).reshape(-1, 1, 2).to(torch.float64)
        half = (4 * s * 1.26 ** torch.arange(anchors, dtype=torch.float64) / 2).view(1, -1, 1)
        priors.append(torch.cat([c - half, c + half], -1).reshape(-1, 4).to(dtype))
    gts = [torch.tensor([[8.0, 10.0, 60.0, 70.0], [40.0, 20.0, 100.0, 90.0]], dtype=dtype),
           torch.zeros(0, 4, dtype=dtype)]
    return dict(student_cls_scores=maps(anchors * C, 2.0), student_bbox_preds=maps(anchors * 4, 0.3),
                student_feats=maps(CH), teacher_cls_scores=maps(anchors * C, 2.0),
                teacher_bbox_preds=maps(anchors * 4, 0.3), teacher_feats=maps(CH), priors=priors,
                gt_bboxes=gts, img_shapes=[(img_h, img_w), (img_h - 16, img_w - 24)])


def requiring_grad(tensors):
    return [t.detach().requires_grad_(True) for t in tensors]


def check_budget(name, obs):
    device_ops, aten_ops = BUDGETS[name]
    detail = f"{name}:\n{obs.summary()}"
    assert obs.device_ops() <= device_ops, f"more device operations than the budget of {device_ops}; {detail}"
    if aten_ops is not None:
        assert obs.aten_ops() <= aten_ops, f"more ATen ops than the budget of {aten_ops}; {detail}"
    assert not obs.syncs, f"host synchronization; {detail}"


def observed_forward_backward(fn, inputs, name):
    """Observes fn(inputs) and the gradient of the sum of its outputs into inputs."""
    with observe.observe() as fwd:
        outs = fn(inputs)
    check_budget(f"{name} forward", fwd)
    flat = [o for o in (outs if isinstance(outs, (list, tuple)) else [outs])]
    total = sum((o[0] if isinstance(o, tuple) else o).double().sum() for o in flat)
    with observe.observe() as bwd:
        torch.autograd.grad(total, inputs)
    check_budget(f"{name} backward", bwd)
    return fwd, bwd


@emulated
def test_p_c():
    p = pyramid()
    observed_forward_backward(tbd_ops.channel_max_spatial_softmax, requiring_grad(p["student_cls_scores"]), "p_c")


@emulated
def test_p_c_without_gradient():
    p = pyramid()
    with observe.observe() as fwd:
        with torch.no_grad():
            tbd_ops.channel_max_spatial_softmax(requiring_grad(p["teacher_cls_scores"]))
    check_budget("p_c forward (no grad)", fwd)
    assert fwd.op_calls()["_channel_max_spatial_softmax_levels_no_grad"] == 1


@emulated
@pytest.mark.parametrize("op", ["masked_sq_dist", "masked_l1"])
def test_masked_reductions(op):
    p = pyramid()
    masks = [torch.rand(N, 2, h, w) for h, w in LEVELS]
    student = requiring_grad(p["student_feats"])
    observed_forward_backward(lambda s: getattr(tbd_ops, op)(p["teacher_feats"], s, masks), student, op)


@emulated
def test_decode_max_iou_with_per_image_shapes():
    p = pyramid()
    preds = requiring_grad(p["student_bbox_preds"])
    fwd, _ = observed_forward_backward(
        lambda b: tbd_ops.decode_max_iou(b, p["priors"], p["gt_bboxes"], max_shape=p["img_shapes"]),
        preds, "decode_max_iou")
    assert fwd.op_calls()["_device_values"] == 1  # the shapes of every level in one small launch


@emulated
def test_harmony_distillation_loss():
    g = torch.Generator().manual_seed(3)
    maps = [[torch.rand(N, h, w, generator=g) for h, w in LEVELS] for _ in range(4)]
    student = requiring_grad(maps[0] + maps[1])
    L = len(LEVELS)
    observed_forward_backward(
        lambda s: tbd_ops.harmony_distillation_loss(s[:L], s[L:], maps[2], maps[3]), student,
        "harmony_distillation_loss")


def tbd_inputs(p, student_keys=("student_cls_scores", "student_bbox_preds", "student_feats")):
    inp = dict(p)
    for k in student_keys:
        inp[k] = requiring_grad(p[k])
    return inp, [t for k in student_keys for t in inp[k]]


@emulated
def test_tbd_loss():
    torch.manual_seed(0)
    loss = TBDLoss(num_levels=5, in_channels=CH)
    inp, student = tbd_inputs(pyramid())
    with observe.observe() as fwd:
        out = loss(**inp)
    check_budget("TBDLoss forward", fwd)
    total = out["loss_hd"] + out["loss_tfd"]
    with observe.observe() as bwd:
        torch.autograd.grad(total, student + list(loss.parameters()))
    check_budget("TBDLoss backward", bwd)


def device_ops_per_levels(op_fn, levels):
    """Device operations of one forward and one backward of op_fn on the first `levels` levels."""
    with observe.observe() as fwd:
        outs, inputs = op_fn(levels)
    total = sum(o.double().sum() for o in outs)
    with observe.observe() as bwd:
        torch.autograd.grad(total, inputs)
    return fwd.device_ops(), bwd.device_ops()


def _p_c(levels):
    x = requiring_grad(pyramid()["student_cls_scores"][:levels])
    return tbd_ops.channel_max_spatial_softmax(x), x


def _masked(op):
    def run(levels):
        p = pyramid()
        s = requiring_grad(p["student_feats"][:levels])
        masks = [torch.rand(N, 2, h, w) for h, w in LEVELS[:levels]]
        return getattr(tbd_ops, op)(p["teacher_feats"][:levels], s, masks), s
    return run


@emulated
@pytest.mark.parametrize("op", ["p_c", "masked_sq_dist", "masked_l1"])
def test_launches_do_not_grow_with_levels(op):
    fn = _p_c if op == "p_c" else _masked(op)
    assert device_ops_per_levels(fn, 5) == device_ops_per_levels(fn, 1)


# ---- no host synchronization ----------------------------------------------------------------

@emulated
@pytest.mark.parametrize("coder", ["delta_xywh", "distance"])
@pytest.mark.parametrize("img_shapes", ["list", "tensor", None])
@pytest.mark.parametrize("twg", [True, False])
def test_tbd_loss_does_not_synchronize(coder, img_shapes, twg):
    anchors = A if coder == "delta_xywh" else 1
    p = pyramid(seed=4, anchors=anchors)
    if coder == "distance":
        p["priors"] = [pr.view(-1, 2, 2).mean(1) for pr in p["priors"]]  # anchor centers as points
        p["student_bbox_preds"] = [b.abs() + 1 for b in p["student_bbox_preds"]]
        p["teacher_bbox_preds"] = [b.abs() + 1 for b in p["teacher_bbox_preds"]]
    if img_shapes == "tensor":
        p["img_shapes"] = torch.tensor(p["img_shapes"], dtype=torch.float32)
    elif img_shapes is None:
        p["img_shapes"] = None
    cfg = {"scales": list(map(float, STRIDES))} if coder == "distance" else None
    loss = TBDLoss(num_levels=5, in_channels=CH, coder=coder, coder_cfg=cfg,
                   fixed_task_weights=None if twg else (0.7, 0.3))
    inp, student = tbd_inputs(p)
    with observe.observe() as obs:
        out = loss(**inp)
        torch.autograd.grad(out["loss_hd"] + out["loss_tfd"], student + list(loss.parameters()))
    assert not obs.syncs, obs.summary()
    assert obs.op_calls()["_device_values"] == (2 if img_shapes == "list" else 0)


# ---- host work per step -------------------------------------------------------------------------
# At batch 2 a GPU runs our kernels in microseconds each, so the host's work per step matters as
# much as the launches: every op's autograd is a C++ node (csrc/<op>.cpp), not a Python function
# that flattens its arguments per call and per direction. PYTHON_CALLS is today's count of Python
# function calls of one TBDLoss forward and backward (RetinaNet pyramid; the module's own Python,
# nn.Module's and the op wrappers'; 821 today), with 10 % to spare; it was 2486 with the ops'
# autograd registered from Python.
PYTHON_CALLS = {"TBDLoss forward and backward": 900}


def _tbd_step():
    torch.manual_seed(0)
    loss = TBDLoss(num_levels=5, in_channels=CH)
    inp, student = tbd_inputs(pyramid())

    def step():
        out = loss(**inp)
        return out["loss_hd"] + out["loss_tfd"], student + list(loss.parameters())
    return step


def test_tbd_loss_backward_graph_has_no_python_nodes():
    total, _ = _tbd_step()()
    seen, todo, names = set(), [total.grad_fn], []
    while todo:
        node = todo.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        names.append(node.name())
        assert not isinstance(node, torch.autograd.function.BackwardCFunction), (
            f"a Python autograd node in the TBD loss's graph: {node.name()}")
        todo.extend(fn for fn, _ in node.next_functions)
    ours = collections.Counter(re.search(r"CppNode<tbd_ops::.*?(\w+Function)\b", n).group(1)
                               for n in names if "CppNode<tbd_ops::" in n)
    # The student's p_c of every level, the HD loss and the masked reduction: one node each for all
    # levels; p_r: one per level.
    assert ours == {"CmssLevelsFunction": 1, "HarmonyLossFunction": 1, "MaskedLevelsFunction": 1,
                    "DecodeFunction": 5}, ours


def test_tbd_loss_python_calls_per_step():
    step = _tbd_step()
    step()  # first call: lazy initialization, caches
    calls = 0

    def count(frame, event, arg):
        nonlocal calls
        calls += event == "call"
    sys.setprofile(count)
    try:
        total, inputs = step()
        torch.autograd.grad(total, inputs)
    finally:
        sys.setprofile(None)
    budget = PYTHON_CALLS["TBDLoss forward and backward"]
    assert 0 < calls <= budget, f"{calls} Python function calls per TBDLoss step, budget {budget}"


@emulated
def test_the_observer_sees_host_synchronization():
    """Each kind of synchronization that observe() reports (on CPU tensors standing for device ones)."""
    x = torch.rand(4, 3)
    counts = torch.ones(3, dtype=torch.long)
    cases = {
        "item": lambda: x[0, 0].item(),
        "bool": lambda: bool(x.sum() > 0),
        "tolist": lambda: x.tolist(),
        "cpu": lambda: x.cpu(),
        "numpy": lambda: x.numpy(),
        "torch.tensor": lambda: torch.tensor([1.0, 2.0]),
        "nonzero": lambda: x.nonzero(),
        "mask index": lambda: x[x > 0.5],
        "repeat_interleave": lambda: torch.repeat_interleave(counts),
    }
    for name, fn in cases.items():
        with observe.observe() as obs:
            fn()
        assert obs.syncs, name
    with observe.observe() as obs:
        (x * 2).sum(1).softmax(0)
        x.masked_fill(x > 0.5, 0.0)
        torch.where(x > 0.5, x, 0.0)
    assert not obs.syncs, obs.summary()


def _distiller(teacher_bgr: bool):
    """A RetinaNet-R18 TBD distiller; a teacher that reads BGR images converts the channel order."""
    from tbd_ops import mmcv_lite

    mmcv_lite.install()
    pytest.importorskip("mmdet", reason="mmdet is not installed (make test installs mmdet==3.3.0)")
    from mmengine.config import ConfigDict
    from mmengine.logging import MMLogger
    from mmdet.registry import MODELS
    from mmdet.utils import register_all_modules

    import tbd_ops.mmdet  # noqa: F401
    from runner_harness import mmdet_model

    register_all_modules()
    MMLogger.get_instance("mmengine", log_level="ERROR")
    torch.manual_seed(0)
    teacher = mmdet_model("retinanet")
    if teacher_bgr:
        teacher["data_preprocessor"] = dict(type="DetDataPreprocessor", mean=[103.53, 116.28, 123.675],
                                            std=[1.0, 1.0, 1.0], bgr_to_rgb=False, pad_size_divisor=32)
    cfg = mmdet_model("retinanet")
    cfg.update(type="TBDSingleStageDetector", teacher_config=dict(model=teacher))
    model = MODELS.build(ConfigDict(cfg))
    model.init_weights()
    model.train()
    return model


@emulated
@pytest.mark.parametrize("teacher_bgr", [False, True])
def test_tbd_distiller_loss_path_does_not_synchronize(teacher_bgr):
    """The distiller's own part of the step: teacher input conversion and forward, priors, TBDLoss."""
    from runner_harness import detection_batch

    model = _distiller(teacher_bgr)
    assert model.teacher_input.identity != teacher_bgr
    inputs, samples = detection_batch(model)
    feats = model.extract_feat(inputs)
    outs = model.bbox_head(feats)
    for _ in range(2):  # the first call makes the priors, the second takes them from the cache
        with observe.observe() as obs:
            losses = model.distillation_losses(inputs, samples, feats, outs)
            torch.autograd.grad(losses["loss_hd"] + losses["loss_tfd"], [p for p in model.parameters()
                                                                          if p.requires_grad], allow_unused=True,
                                retain_graph=True)
        assert not obs.syncs, obs.summary()
        assert obs.op_calls()["_device_values"] == 2  # img_shapes: student and teacher p_r


@requires_emu
def test_tbd_distiller_makes_the_priors_once_per_size(monkeypatch):
    from runner_harness import detection_batch

    model = _distiller(False)
    generator = model.bbox_head.prior_generator
    calls = []
    original = generator.grid_priors
    monkeypatch.setattr(generator, "grid_priors", lambda *a, **k: calls.append(a[0]) or original(*a, **k))
    for shapes in (((100, 128), (72, 96)), ((100, 128), (64, 64)), ((160, 128), (72, 96))):
        inputs, samples = detection_batch(model, shapes=shapes)
        with torch.no_grad():
            feats = model.extract_feat(inputs)
            model.distillation_losses(inputs, samples, feats, model.bbox_head(feats))
    assert len(calls) == 2  # the first two batches pad to the same size


# ---- on a GPU ----------------------------------------------------------------------------------

def _cuda_tbd_problem():
    torch.manual_seed(0)
    loss = TBDLoss(num_levels=5, in_channels=CH).cuda()
    p = pyramid()
    inp = {k: ([t.cuda() for t in v] if isinstance(v, list) and v and isinstance(v[0], torch.Tensor) else v)
           for k, v in p.items()}
    inp, student = tbd_inputs(inp)
    return loss, inp, student


def _step(loss, inp, student):
    out = loss(**inp)
    total = out["loss_hd"] + out["loss_tfd"]
    return (total, *torch.autograd.grad(total, student))


@requires_cuda
def test_tbd_loss_has_no_synchronizing_call_on_gpu():
    loss, inp, student = _cuda_tbd_problem()
    _step(loss, inp, student)  # warm-up: allocator, cuBLAS and cuDNN handles
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        _step(loss, inp, student)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()


@requires_cuda
def test_tbd_loss_forward_and_backward_capture_in_a_cuda_graph():
    loss, inp, student = _cuda_tbd_problem()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            eager = _step(loss, inp, student)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = _step(loss, inp, student)
    graph.replay()
    torch.cuda.synchronize()
    for a, b in zip(captured, eager):  # cuDNN may pick a nondeterministic algorithm: to rounding
        torch.testing.assert_close(a, b)
    # New inputs in the same buffers: the replay follows them.
    with torch.no_grad():
        for t in inp["student_cls_scores"]:
            t.mul_(0.5)
    graph.replay()
    expected = _step(loss, inp, student)
    torch.cuda.synchronize()
    for a, b in zip(captured, expected):
        torch.testing.assert_close(a, b)
