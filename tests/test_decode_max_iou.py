"""decode_max_iou / box_max_iou (p_r): kernels vs tbd_ops.reference."""
import math

import pytest
import torch
from torch.library import opcheck

import tbd_ops
from tbd_ops import reference as ref
from hypothesis import HealthCheck, given, settings, strategies as st

from op_testing import (DEVICES, DTYPES, F64, RED_TOL, REDUCED, TOL, OpContract, Sample, all_schedules,
                        assert_bitwise, assert_compiles_like_eager, rand_boxes, requires_cuda, requires_emu,
                        run_single_threaded, strided)


def make_problem(device, coder="delta_xywh", N=2, A=3, H=4, W=5, counts=(5, 0), dtype=F64, form="4d"):
    """Random predictions, priors and ragged ground truths for one FPN level."""
    P = H * W * A
    if coder == "delta_xywh":
        priors = rand_boxes(P, device, dtype)
        pred = torch.randn(N, A * 4, H, W, device=device, dtype=F64) * 0.3
    elif coder == "distance":
        priors = (torch.rand(P, 2, device=device, dtype=F64) * 60).to(dtype)
        pred = torch.rand(N, A * 4, H, W, device=device, dtype=F64) * 4 + 0.5
    else:
        priors = None
        pred = rand_boxes(N * P, device).view(N, P, 4).permute(0, 2, 1).reshape(N, 4, P, 1)
        pred = pred.view(N, 4, H * W, A).permute(0, 3, 1, 2).reshape(N, A * 4, H, W)
    if form == "3d":
        pred = pred.view(N, A, 4, H, W).permute(0, 3, 4, 1, 2).reshape(N, P, 4)
    gts = [rand_boxes(c, device, dtype, extent=35.0) for c in counts[:N]]  # inside any clip window used
    return pred.to(dtype), priors, gts


CODER_KW = {
    "delta_xywh": dict(coder="delta_xywh", means=(0.01, -0.02, 0.0, 0.03), stds=(0.1, 0.1, 0.2, 0.2)),
    "distance": dict(coder="distance", scale=8.0),
    "none": dict(coder="none"),
}


def run_both(pred, priors, gts, kw, need=(True, True, True), grad=None):
    """Values and gradients (pred, priors, gts) of ours and of the reference."""
    results = []
    for fn in (tbd_ops.decode_max_iou, ref.decode_max_iou):
        p = pred.detach().clone().requires_grad_(need[0])
        q = None if priors is None else priors.detach().clone().requires_grad_(need[1])
        g = [t.detach().clone().requires_grad_(need[2]) for t in gts]
        iou, arg = fn(p, q, g, **kw)
        leaves = [t for t in [p, q, *g] if t is not None and t.requires_grad]
        if grad is None:  # one random grad_output shared by both
            grad = torch.randn_like(iou)
        go = grad
        grads = torch.autograd.grad(iou, leaves, go, allow_unused=True) if leaves else ()
        grads = [torch.zeros_like(t) if d is None else d for t, d in zip(leaves, grads)]
        results.append((iou, arg, grads))
    return results


def assert_matches_reference(pred, priors, gts, kw, grad=None, same_arg=True):
    """Ours against the reference (float64): IoU, the argmax (same_arg) and the gradients; ours returned."""
    (iou, arg, grads), (iou_r, arg_r, grads_r) = run_both(pred, priors, gts, kw, grad=grad)
    torch.testing.assert_close(iou, iou_r, rtol=1e-10, atol=1e-14)
    if same_arg:
        assert torch.equal(arg, arg_r)
    for d, d_r in zip(grads, grads_r):
        torch.testing.assert_close(d, d_r, rtol=1e-10, atol=1e-12)
    return iou, arg, grads


class TestContract(OpContract):
    op = staticmethod(tbd_ops.decode_max_iou)
    reference = staticmethod(ref.decode_max_iou)
    reduction_grads = (2,)  # the ground truths' gradients: sums over the predictions

    def samples(self, device):
        out = []
        for coder in ("delta_xywh", "distance", "none"):
            pred, priors, gts = make_problem(device, coder, A=2, H=2, W=3, counts=(4, 2))
            out.append(Sample((pred.requires_grad_(), priors if priors is None else priors.requires_grad_(),
                               [g.requires_grad_() for g in gts]), dict(CODER_KW[coder], max_shape=(50.0, 55.0)),
                              name=coder, gradcheck=True))
        pred, priors, gts = make_problem(device, "delta_xywh", N=3, A=3, counts=(7, 1, 0), form="3d")
        out.append(Sample((pred.requires_grad_(), priors, gts), CODER_KW["delta_xywh"], name="[N, P, 4], grad of pred"))
        out.append(Sample((pred.detach(), priors.requires_grad_(), gts), CODER_KW["delta_xywh"], name="grad of priors"))
        # Per-image clip shapes; channels_last predictions.
        pred, priors, gts = make_problem(device, "delta_xywh", N=3, A=2, H=3, W=4, counts=(3, 2, 4))
        shapes = torch.tensor(SHAPES, device=device)
        out.append(Sample((strided(pred, "channels_last").requires_grad_(), priors.requires_grad_(),
                           [g.requires_grad_() for g in gts]), dict(CODER_KW["delta_xywh"], max_shape=shapes),
                          name="per-image max_shape, channels_last"))
        # Strided predictions across the CUDA tile of ground truths (1024) and chunk of images (64).
        pred, priors, gts = make_problem(device, "delta_xywh", N=2, A=1, H=6, W=7, counts=(1100, 3))
        out.append(Sample((strided(pred).requires_grad_(), priors.requires_grad_(), [g.requires_grad_() for g in gts]),
                          CODER_KW["delta_xywh"], name="padded rows, 1100 ground truths", opcheck=False))
        counts = [int(c) for c in torch.randint(0, 4, (70,))]
        pred, priors, gts = make_problem(device, "distance", N=70, A=1, H=2, W=3, counts=counts)
        out.append(Sample((strided(pred, "transposed").requires_grad_(), priors.requires_grad_(),
                           [g.requires_grad_() for g in gts]), CODER_KW["distance"], name="transposed, 70 images", opcheck=False))
        out.append(Sample(make_problem(device, "delta_xywh", N=0, counts=()), CODER_KW["delta_xywh"], name="N = 0"))
        for dtype in REDUCED:  # values only (near-ties of the argmax may flip in reduced precision)
            pred, priors, gts = make_problem(device, "delta_xywh", N=2, A=3, H=8, W=9, counts=(20, 5), dtype=dtype)
            out.append(Sample((pred, priors, gts), CODER_KW["delta_xywh"], name=str(dtype)))
        return out

    def value_tol(self, sample):
        return dict(rtol=1e-10, atol=1e-14) if sample.dtype() == F64 else TOL[sample.dtype()]

    def grad_tol(self, sample):
        return dict(rtol=1e-10, atol=1e-12)

    def compare(self, got, want, tol, what):
        if len(got) == 2 and isinstance(got[1], torch.Tensor) and got[1].dtype == torch.long \
                and got[0].dtype != F64:
            (iou, arg), (iou_r, arg_r) = got, want
            torch.testing.assert_close(iou.double(), iou_r, **tol)
            assert (arg == arg_r).double().mean().item() > 0.97, f"{what}: argmax"  # near-ties in 16 bits
            return
        super().compare(got, want, tol, what)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("coder", ["delta_xywh", "distance", "none"])
@pytest.mark.parametrize("form", ["4d", "3d"])
@pytest.mark.parametrize("A", [1, 3])
@pytest.mark.parametrize("max_shape", [None, (40.0, 45.0)])
def test_float64_matches_reference(device, coder, form, A, max_shape):
    pred, priors, gts = make_problem(device, coder, A=A, counts=(7, 1, 0), N=3, form=form)
    kw = dict(CODER_KW[coder], max_shape=max_shape)
    (iou, arg, grads), (iou_r, arg_r, grads_r) = run_both(pred, priors, gts, kw)
    assert iou.dtype == F64 and arg.dtype == torch.long and iou.shape == (3, pred.shape[1] if form == "3d" else 4 * 5 * A)
    torch.testing.assert_close(iou, iou_r, rtol=1e-10, atol=1e-14)
    assert torch.equal(arg, arg_r)
    assert (iou > 0).any()
    for d, d_r in zip(grads, grads_r):
        torch.testing.assert_close(d, d_r, rtol=1e-10, atol=1e-12)
    assert (arg[2] == -1).all() and (iou[2] == 0).all()


@pytest.mark.parametrize("device", DEVICES)
def test_box_max_iou_and_16_bit_backward_opcheck(device):
    boxes = rand_boxes(12, device).view(2, 6, 4).requires_grad_()
    opcheck(torch.ops.tbd_ops.box_max_iou, (boxes, rand_boxes(3, device), [1, 2]))
    for dtype in (torch.float32, torch.float16):
        pred, priors, gts = make_problem(device, "delta_xywh", dtype=dtype, counts=(3, 0))
        kw = CODER_KW["delta_xywh"]
        args = (pred, priors, torch.cat(gts), [3, 0], kw["coder"], list(kw["means"]), list(kw["stds"]), 1.0,
                [40.0, 50.0], 0.016)
        iou, arg = torch.ops.tbd_ops.decode_max_iou(*args)
        for mask in ([True, True, True], [False, True, False], [True, False, False]):
            opcheck(torch.ops.tbd_ops._decode_max_iou_backward, (torch.randn_like(iou), arg, *args, mask))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("G", [1, 1500])
def test_one_and_many_ground_truths(device, G):
    # 1500 > one shared-memory tile of the CUDA kernel.
    pred, priors, gts = make_problem(device, "delta_xywh", N=2, A=1, H=6, W=7, counts=(G, G // 2 + 1))
    _, arg, _ = assert_matches_reference(pred, priors, gts, CODER_KW["delta_xywh"])
    if G == 1:
        assert (arg[0] == 0).all()


@pytest.mark.parametrize("device", DEVICES)
def test_ties_pick_lowest_ground_truth(device):
    boxes = rand_boxes(10, device).view(1, 10, 4)
    g = rand_boxes(3, device)
    gts = [torch.cat([g[:1], g, g])]  # every box appears at least twice
    iou, arg = tbd_ops.box_max_iou(boxes, gts)
    iou_r, arg_r = ref.box_max_iou(boxes, gts)
    assert torch.equal(arg, arg_r)
    assert (arg <= 3).all()  # the first copy always wins
    torch.testing.assert_close(iou, iou_r, rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("device", DEVICES)
def test_degenerate_and_zero_area_boxes(device):
    gts = [torch.tensor([[10.0, 10.0, 10.0, 20.0],     # zero width
                         [30.0, 30.0, 20.0, 20.0],     # inverted
                         [0.0, 0.0, 10.0, 10.0]], device=device, dtype=F64)]
    boxes = torch.tensor([[[0.0, 0.0, 10.0, 10.0],     # identical to gt 2
                           [10.0, 10.0, 10.0, 20.0],   # identical zero-area box
                           [25.0, 25.0, 22.0, 22.0],   # inverted, inside gt 1's span
                           [100.0, 100.0, 110.0, 110.0]]], device=device, dtype=F64)
    iou, arg = tbd_ops.box_max_iou(boxes, gts)
    iou_r, arg_r = ref.box_max_iou(boxes, gts)
    torch.testing.assert_close(iou, iou_r, rtol=1e-10, atol=1e-14)
    assert torch.equal(arg, arg_r)
    assert iou[0, 0].item() == pytest.approx(1.0)
    assert iou[0, 1].item() == 0.0 and iou[0, 2].item() == 0.0 and iou[0, 3].item() == 0.0
    assert (iou >= 0).all()
    b = boxes.clone().requires_grad_()
    (gb,) = torch.autograd.grad(tbd_ops.box_max_iou(b, gts)[0].sum(), b)
    b_r = boxes.clone().requires_grad_()
    (gb_r,) = torch.autograd.grad(ref.box_max_iou(b_r, gts)[0].sum(), b_r)
    torch.testing.assert_close(gb, gb_r, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("device", DEVICES)
def test_no_ground_truth_anywhere(device):
    pred, priors, _ = make_problem(device, "delta_xywh", N=2)
    p = pred.clone().requires_grad_()
    q = priors.clone().requires_grad_()
    iou, arg = tbd_ops.decode_max_iou(p, q, [priors.new_zeros(0, 4)] * 2)
    assert (iou == 0).all() and (arg == -1).all()
    gp, gq = torch.autograd.grad(iou.sum(), [p, q])
    assert (gp == 0).all() and (gq == 0).all()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", [(0, 12, 4, 5), (2, 12, 0, 5), (2, 12, 4, 0)])
def test_empty(device, shape):
    N, C, H, W = shape
    P = C // 4 * H * W
    pred = torch.randn(shape, device=device, dtype=F64, requires_grad=True)
    priors = rand_boxes(P, device).requires_grad_()
    gts = [rand_boxes(3, device) for _ in range(N)]
    iou, arg = tbd_ops.decode_max_iou(pred, priors, gts)
    assert iou.shape == (N, P) and arg.shape == (N, P)
    iou.sum().backward()
    assert pred.grad.shape == pred.shape and priors.grad.shape == priors.shape


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_dtypes(device, dtype):
    pred, priors, gts = make_problem(device, "delta_xywh", N=2, A=3, H=8, W=9, counts=(20, 5), dtype=dtype)
    kw = CODER_KW["delta_xywh"]
    (iou, arg, grads), _ = run_both(pred, priors, gts, kw, grad=torch.ones(2, 216, device=device, dtype=dtype))
    # Reference: float64 math on the same (rounded) inputs.
    (iou_r, arg_r, grads_r), _ = run_both(pred.double(), priors.double(), [g.double() for g in gts], kw,
                                          grad=torch.ones(2, 216, device=device, dtype=F64))
    assert iou.dtype == dtype
    torch.testing.assert_close(iou.double(), iou_r, **TOL[dtype])
    agree = (arg == arg_r).double().mean().item()
    assert agree > 0.97  # near-ties may flip in reduced precision
    if dtype == torch.float32:
        same = arg == arg_r
        torch.testing.assert_close(grads[0].double().view(2, 3, 4, 8, 9).permute(0, 3, 4, 1, 2).reshape(2, -1, 4)[same],
                                   grads_r[0].view(2, 3, 4, 8, 9).permute(0, 3, 4, 1, 2).reshape(2, -1, 4)[same],
                                   rtol=1e-3, atol=1e-5)


@pytest.mark.parametrize("device", DEVICES)
def test_float16_large_coordinates_do_not_overflow(device):
    # Areas near 1e8 overflow float16 (max 65504); the math runs in float32.
    gts = [torch.tensor([[0.0, 0.0, 9000.0, 9500.0], [1000.0, 2000.0, 9990.0, 9990.0]], device=device)]
    boxes = torch.tensor([[[10.0, 20.0, 8990.0, 9400.0], [1500.0, 2500.0, 9000.0, 9900.0]]], device=device)
    iou, arg = tbd_ops.box_max_iou(boxes.half(), [g.half() for g in gts])
    iou_r, arg_r = ref.box_max_iou(boxes.half().double(), [g.half().double() for g in gts])
    assert torch.isfinite(iou).all()
    torch.testing.assert_close(iou.double(), iou_r, **TOL[torch.float16])
    assert torch.equal(arg, arg_r)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", ["channels_last", "sliced_3d", "strided_priors"])
def test_non_contiguous(device, layout):
    pred, priors, gts = make_problem(device, "delta_xywh", N=2, A=3, H=5, W=6, counts=(6, 4))
    if layout == "channels_last":
        pred = pred.contiguous(memory_format=torch.channels_last)
    elif layout == "sliced_3d":
        big = torch.randn(2, 90, 8, device=device, dtype=F64) * 0.3
        pred = big[:, :, 1:8:2]
    else:
        priors = torch.cat([priors, priors], 1)[:, ::2].contiguous()[:, :].t().contiguous().t()
    assert not (pred.is_contiguous() and priors.is_contiguous())
    assert_matches_reference(pred, priors, gts, CODER_KW["delta_xywh"])


@pytest.mark.parametrize("device", DEVICES)
def test_points_with_strides_and_list_of_levels(device):
    levels, priors, scales = [], [], [8.0, 16.0]
    for H, W in ((6, 8), (3, 4)):
        p, pts, _ = make_problem(device, "distance", N=2, A=1, H=H, W=W)
        levels.append(p)
        priors.append(torch.cat([pts, torch.full_like(pts, 8.0)], 1))  # [P, 4] (x, y, stride_w, stride_h)
    gts = [rand_boxes(5, device), rand_boxes(2, device)]
    out = tbd_ops.decode_max_iou(levels, priors, gts, coder="distance", scale=scales)
    out_r = ref.decode_max_iou(levels, priors, gts, coder="distance", scale=scales)
    assert isinstance(out, list) and len(out) == 2
    for (iou, arg), (iou_r, arg_r) in zip(out, out_r):
        torch.testing.assert_close(iou, iou_r, rtol=1e-10, atol=1e-14)
        assert torch.equal(arg, arg_r)
    q = priors[0].clone().requires_grad_()
    (gq,) = torch.autograd.grad(tbd_ops.decode_max_iou(levels[0], q, gts, coder="distance", scale=8.0)[0].sum(), q)
    q_r = priors[0].clone().requires_grad_()
    (gq_r,) = torch.autograd.grad(ref.decode_max_iou(levels[0], q_r, gts, coder="distance", scale=8.0)[0].sum(), q_r)
    torch.testing.assert_close(gq, gq_r, rtol=1e-10, atol=1e-12)
    assert (gq[:, 2:] == 0).all()


@pytest.mark.parametrize("device", DEVICES)
def test_gt_as_batched_tensor(device):
    pred, priors, gts = make_problem(device, "delta_xywh", counts=(4, 4))
    a = tbd_ops.decode_max_iou(pred, priors, torch.stack(gts))
    b = tbd_ops.decode_max_iou(pred, priors, gts)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


@pytest.mark.parametrize("device", DEVICES)
def test_deterministic(device):
    pred, priors, gts = make_problem(device, "delta_xywh", N=2, A=9, H=10, W=12, counts=(40, 3), dtype=torch.float32)
    gts = [g.requires_grad_() for g in gts]
    q = priors.requires_grad_()

    def run():
        iou, _ = tbd_ops.decode_max_iou(pred, q, gts)
        return [iou, *torch.autograd.grad(iou, [q, *gts], torch.ones_like(iou))]

    a = run()
    b = run_single_threaded(run)
    for x, y in zip(a, b):
        assert torch.equal(x, y)


@pytest.mark.parametrize("device", DEVICES)
def test_autocast_mixed_precision(device):
    pred, priors, gts = make_problem(device, "delta_xywh", dtype=torch.float32, counts=(5, 2))
    with torch.autocast(device_type=device, dtype=torch.bfloat16):
        iou, arg = tbd_ops.decode_max_iou(pred.bfloat16(), priors, gts)
    assert iou.dtype == torch.bfloat16
    iou_r, arg_r = ref.decode_max_iou(pred.bfloat16().float(), priors, gts)
    torch.testing.assert_close(iou.float(), iou_r, **TOL[torch.bfloat16])
    with pytest.raises(TypeError, match="priors must have the dtype of bbox_pred"):
        tbd_ops.decode_max_iou(pred.bfloat16(), priors, gts)  # outside autocast: explicit error


def test_memory_stays_linear():
    """One image, 151,200 anchors x 800 ground truths: the fp32 IoU matrix alone would be 460 MiB."""
    P, G = 151_200, 800
    boxes = rand_boxes(P, "cpu", torch.float32, extent=1200.0, max_wh=200.0).view(1, P, 4)
    gts = [rand_boxes(G, "cpu", torch.float32, extent=1200.0, max_wh=200.0)]
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True,
                                acc_events=True) as prof:
        iou, arg = tbd_ops.box_max_iou(boxes, gts)
    allocated = sum(max(e.self_cpu_memory_usage, 0) for e in prof.key_averages())
    outputs = iou.numel() * iou.element_size() + arg.numel() * arg.element_size()
    assert allocated >= outputs  # the measurement sees the outputs ...
    assert allocated < outputs + 4 * 2**20  # ... and nothing of size P x G
    # Spot-check values against the dense reference on a slice.
    iou_r, arg_r = ref.box_max_iou(boxes[:, :2000], gts)
    torch.testing.assert_close(iou[:, :2000], iou_r, **TOL[torch.float32])


class TestBadInput:
    def setup_method(self):
        self.pred, self.priors, self.gts = make_problem("cpu", "delta_xywh", N=2, A=3, H=4, W=5, counts=(3, 1))

    def test_prior_count(self):
        with pytest.raises(ValueError, match=r"priors must have P = H\*W\*A = 60 rows .* got 59"):
            tbd_ops.decode_max_iou(self.pred, self.priors[:59], self.gts)

    def test_channels(self):
        with pytest.raises(ValueError, match="positive multiple of 4"):
            tbd_ops.decode_max_iou(self.pred[:, :10], self.priors, self.gts)
        with pytest.raises(ValueError, match="positive multiple of 4"):
            tbd_ops.decode_max_iou(self.pred[:, :0], self.priors[:0], self.gts)

    def test_rank(self):
        with pytest.raises(ValueError, match=r"bbox_pred must be \[N, A\*4, H, W\] or \[N, P, 4\]"):
            tbd_ops.decode_max_iou(self.pred[0, 0], self.priors, self.gts)
        with pytest.raises(ValueError, match=r"got shape \(12, 4, 5\)"):
            tbd_ops.decode_max_iou(self.pred[0], self.priors, self.gts)

    def test_gt_list_length(self):
        with pytest.raises(ValueError, match=r"one tensor per image \(N = 2\), got 1"):
            tbd_ops.decode_max_iou(self.pred, self.priors, self.gts[:1])

    def test_gt_shape(self):
        with pytest.raises(ValueError, match=r"gt_bboxes\[1\] must be \[G, 4\], got shape \(1, 5\)"):
            tbd_ops.decode_max_iou(self.pred, self.priors, [self.gts[0], torch.zeros(1, 5, dtype=F64)])

    def test_coder(self):
        with pytest.raises(ValueError, match="coder must be one of"):
            tbd_ops.decode_max_iou(self.pred, self.priors, self.gts, coder="tblr")

    def test_missing_priors(self):
        with pytest.raises(ValueError, match="coder 'delta_xywh' needs priors, got None"):
            tbd_ops.decode_max_iou(self.pred, None, self.gts)

    def test_prior_columns(self):
        with pytest.raises(ValueError, match=r"needs anchors \[P, 4\]"):
            tbd_ops.decode_max_iou(self.pred, self.priors[:, :2], self.gts)

    def test_dtype_mismatch(self):
        with pytest.raises(TypeError, match="gt_bboxes must have the dtype of bbox_pred"):
            tbd_ops.decode_max_iou(self.pred, self.priors, [g.float() for g in self.gts])

    def test_integer_input(self):
        with pytest.raises(TypeError, match="bbox_pred must be float32, float64, float16 or bfloat16"):
            tbd_ops.decode_max_iou(self.pred.long(), self.priors.long(), [g.long() for g in self.gts])

    @pytest.mark.parametrize("kw,msg", [
        (dict(means=(0.0, 0.0)), "means must have 4 values, got 2"),
        (dict(stds=(1.0, 1.0, float("nan"), 1.0)), "means and stds must be finite"),
        (dict(wh_ratio_clip=0.0), "wh_ratio_clip must be a finite number > 0"),
        (dict(max_shape=(10.0, -1.0)), "max_shape must hold finite sizes >= 0"),
        (dict(max_shape=(10.0,)), r"max_shape must be \(h, w\)"),
    ])
    def test_parameters(self, kw, msg):
        with pytest.raises(ValueError, match=msg):
            tbd_ops.decode_max_iou(self.pred, self.priors, self.gts, **kw)

    def test_max_shape_requiring_grad(self):
        # Image sizes get no gradient: a per-image tensor that asks for one raises (under no_grad
        # it is read as any tensor).
        ms = torch.tensor([[20.0, 18.0], [15.0, 22.0]], dtype=self.pred.dtype, requires_grad=True)
        with pytest.raises(ValueError, match="max_shape is not differentiable"):
            tbd_ops.decode_max_iou(self.pred.requires_grad_(), self.priors, self.gts, max_shape=ms)
        with torch.no_grad():
            iou, _ = tbd_ops.decode_max_iou(self.pred, self.priors, self.gts, max_shape=ms)
        want, _ = tbd_ops.decode_max_iou(self.pred.detach(), self.priors, self.gts, max_shape=ms.detach())
        assert torch.equal(iou, want)

    @pytest.mark.parametrize("kw,msg", [
        (dict(means="abcd"), "means must be a sequence of numbers, got 'abcd'"),
        (dict(stds=(1.0, 1.0, None, 1.0)), r"stds\[2\] must be a number, got None"),
        (dict(max_shape=(10.0, "w")), r"max_shape\[1\] must be a number, got 'w'"),
        (dict(scale="2"), "scale must be a number, got '2'"),
    ])
    def test_parameter_types(self, kw, msg):
        with pytest.raises(TypeError, match=msg):
            tbd_ops.decode_max_iou(self.pred, self.priors, self.gts, **kw)

    def test_box_max_iou_rank(self):
        with pytest.raises(ValueError, match=r"boxes must be \[N, P, 4\]"):
            tbd_ops.box_max_iou(torch.zeros(2, 4), self.gts)

    def test_gt_counts_sum(self):
        with pytest.raises(ValueError, match=r"gt_counts must sum to the rows of gt_bboxes \(4\), got more by "
                                             r"image 1 \(3 \+ 2\)"):
            torch.ops.tbd_ops.decode_max_iou(self.pred, self.priors, torch.cat(self.gts), [3, 2])
        with pytest.raises(ValueError, match=r"gt_counts must sum to the rows of gt_bboxes \(3\), got 2"):
            torch.ops.tbd_ops.decode_max_iou(self.pred, self.priors, torch.cat(self.gts)[:3], [1, 1])
        # Counts whose sum wraps around int64 back to the rows: refused, not indexed (it read out of bounds).
        huge = [1 << 62, 1 << 62, 1 << 62, (1 << 62) + 3]
        with pytest.raises(ValueError, match=r"gt_counts must sum to the rows of gt_bboxes \(3\), got more by "
                                             r"image 0"):
            dt = self.pred.dtype
            torch.ops.tbd_ops.box_max_iou(torch.zeros(4, 2, 4, dtype=dt), torch.zeros(3, 4, dtype=dt), huge)


@requires_cuda
def test_cuda_matches_cpu_many_images_and_graph_capture():
    # 70 images: more than one launch chunk of the CUDA kernels.
    N = 70
    pred, priors, gts = make_problem("cpu", "delta_xywh", N=N, A=3, H=6, W=7,
                                     counts=[(i * 7) % 23 for i in range(N)], dtype=torch.float32)
    q = priors.clone().requires_grad_()
    iou, arg = tbd_ops.decode_max_iou(pred, q, gts)
    (gq,) = torch.autograd.grad(iou.sum(), q)
    qc = priors.cuda().requires_grad_()
    gts_c = [g.cuda() for g in gts]
    iou_c, arg_c = tbd_ops.decode_max_iou(pred.cuda(), qc, gts_c)
    (gq_c,) = torch.autograd.grad(iou_c.sum(), qc)
    torch.testing.assert_close(iou_c.cpu(), iou, rtol=1e-5, atol=1e-6)
    assert (arg_c.cpu() == arg).float().mean() > 0.999
    torch.testing.assert_close(gq_c.cpu(), gq, rtol=1e-3, atol=1e-4)
    static_pred = pred.cuda()
    tbd_ops.decode_max_iou(static_pred, qc.detach(), gts_c)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_iou, _ = tbd_ops.decode_max_iou(static_pred, qc.detach(), gts_c)
    static_pred.mul_(0.5)
    graph.replay()
    torch.testing.assert_close(static_iou, tbd_ops.decode_max_iou(static_pred, qc.detach(), gts_c)[0])


@requires_cuda
def test_cuda_memory_stays_linear():
    P, G = 151_200, 800
    boxes = rand_boxes(P, "cuda", torch.float32, extent=1200.0, max_wh=200.0).view(1, P, 4)
    gts = [rand_boxes(G, "cuda", torch.float32, extent=1200.0, max_wh=200.0)]
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    iou, arg = tbd_ops.box_max_iou(boxes, gts)
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - before
    assert extra < 8 * 2**20, f"peak extra memory {extra / 2**20:.1f} MiB"


@requires_cuda
def test_cuda_device_mismatch():
    pred, priors, gts = make_problem("cuda", "delta_xywh", counts=(3, 1))
    with pytest.raises(ValueError, match="priors must be on the device of bbox_pred"):
        tbd_ops.decode_max_iou(pred, priors.cpu(), gts)
    with pytest.raises(ValueError, match="gt_bboxes must be on the device of bbox_pred"):
        tbd_ops.decode_max_iou(pred, priors, [g.cpu() for g in gts])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("wh_ratio_clip", [0.016, 0.05, 0.2])
def test_wh_ratio_clip_and_its_gradient_mask(device, wh_ratio_clip):
    """Deltas beyond the clamp |log(wh_ratio_clip)|, some exactly at it (stds 1)."""
    pred, priors, gts = make_problem(device, "delta_xywh", A=2, H=3, W=4, counts=(6, 2))
    bound = abs(math.log(wh_ratio_clip))
    pred = pred.clone()
    pred[:, 2::4] = torch.randn_like(pred[:, 2::4]) * 2 * bound
    pred[0, 2, 0, 0] = bound
    pred[1, 3, 1, 1] = -bound
    kw = dict(coder="delta_xywh", wh_ratio_clip=wh_ratio_clip, max_shape=(60.0, 70.0))
    assert_matches_reference(pred, priors, gts, kw)


@pytest.mark.parametrize("device", DEVICES)
def test_padded_rows_and_strided_grad(device):
    pred, priors, gts = make_problem(device, "delta_xywh", A=2, H=3, W=6, counts=(5, 3))
    wide = torch.randn(2, 8, 3, 7, device=device, dtype=F64) * 0.3
    wide[..., :6] = pred
    grad = torch.randn(2, 36 * 2, device=device, dtype=F64)[:, ::2]
    assert_matches_reference(wide[..., :6], priors, gts, CODER_KW["delta_xywh"], grad=grad, same_arg=False)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_reduced_precision_gradients_vs_reference(device, dtype):
    """Gradients of bbox_pred, priors and gts in 16/32-bit against float64 on the same rounded inputs."""
    pred, priors, gts = make_problem(device, "delta_xywh", A=1, H=4, W=5, counts=(3, 2), dtype=dtype)
    kw = CODER_KW["delta_xywh"]
    (iou, arg, grads), _ = run_both(pred, priors, gts, kw)
    g = torch.randn_like(iou.double())
    (iou_l, arg_l, grads_l), _ = run_both(pred, priors, gts, kw, grad=g.to(dtype))
    (iou_d, arg_d, grads_d), _ = run_both(pred.double(), priors.double(), [t.double() for t in gts], kw,
                                          grad=g.to(dtype).double())
    same = arg_l == arg_d  # an exact IoU tie may round differently in 16-bit
    assert same.float().mean() > 0.9
    # Each gradient is computed in float32 from the rounded inputs and rounded once to the dtype
    # (the priors' sum over images too): a few units of the dtype's rounding.
    tol = {torch.float32: 1e-4, torch.float16: 2e-3, torch.bfloat16: 1e-2}[dtype]
    keep = same.view(pred.shape[0], 1, *pred.shape[2:]).expand_as(pred)  # A = 1: prediction p at (h, w)
    for i, (d, d64) in enumerate(zip(grads_l, grads_d)):
        scale = float(d64.abs().max()) + 1e-6
        if i == 0:  # bbox_pred: where both sides picked the same ground truth
            d, d64 = d[keep], d64[keep]
        elif not bool(same.all()):
            continue  # priors and gts sum over predictions, some of which picked another ground truth
        torch.testing.assert_close(d.double(), d64, rtol=tol, atol=tol * scale)


@pytest.mark.parametrize("device", DEVICES)
def test_list_of_levels_keeps_max_shape(device):
    # A random draw where the clip changes some IoU (with 12 predictions and 5 ground truths
    # all IoUs can be 0 with and without it; such draws say nothing and are redrawn).
    for _ in range(100):
        pred, priors, gts = make_problem(device, "delta_xywh", A=1, H=3, W=4, counts=(4, 1))
        pred = pred * 20  # boxes reaching beyond the clip window
        iou_r, _ = ref.decode_max_iou(pred, priors, gts, max_shape=(20.0, 25.0))
        iou_u, _ = ref.decode_max_iou(pred, priors, gts)
        if not torch.allclose(iou_r, iou_u):
            break
    assert not torch.allclose(iou_r, iou_u), "no draw where the clip matters"
    outs = tbd_ops.decode_max_iou([pred, pred], [priors, priors], gts, max_shape=(20.0, 25.0))
    for iou, _ in outs:
        torch.testing.assert_close(iou, iou_r, rtol=1e-10, atol=1e-14)


def test_mismatched_level_lists_raise():
    pred, priors, gts = make_problem("cpu", "delta_xywh", A=1, H=3, W=4, counts=(4, 1))
    with pytest.raises(ValueError, match="bbox_pred and priors must have one entry per level, got 3 and 2"):
        tbd_ops.decode_max_iou([pred, pred, pred], [priors, priors], gts)
    with pytest.raises(ValueError, match="bbox_pred, priors and scale must have one entry per level, got 2, 2 and 3"):
        tbd_ops.decode_max_iou([pred, pred], [priors, priors], gts, scale=[1.0, 2.0, 3.0])
    with pytest.raises(TypeError, match="bbox_pred, priors and scale must all be tensors or all be lists of "
                                        "levels; priors is a Tensor"):
        tbd_ops.decode_max_iou([pred, pred], priors, gts)


# ---- per-image clip shapes (max_shape as [N, 2] tensor or list of N (h, w)) ----

SHAPES = [(20.0, 25.0), (33.5, 12.0), (0.0, 40.0)]  # (h, w) of images 0..2; image 2: zero height


def per_image(kind, device, shapes=SHAPES):
    if kind == "list":
        return [tuple(s) for s in shapes]
    if kind == "tuple_of_lists":
        return tuple(list(s) for s in shapes)
    dtype = {"tensor": F64, "tensor_f32": torch.float32, "tensor_int": torch.int32}[kind]
    t = torch.tensor(shapes, dtype=F64, device=device)
    return t.round().to(dtype) if dtype == torch.int32 else t.to(dtype)


def clipped_problem(device, coder, N=3, A=2, H=3, W=4):
    pred, priors, gts = make_problem(device, coder, N=N, A=A, H=H, W=W, counts=(6, 3, 2))
    if coder == "delta_xywh":
        pred = pred * 4  # wider boxes, beyond the clip windows
    elif coder == "distance":
        pred = pred * 1.5
    else:
        pred = pred.clone()
        # Coordinates exactly on the clip bounds (clamp gradient at the bound: passes, as torch.clamp).
        pred[0, 2, 0, 0] = SHAPES[0][1]
        pred[1, 3, 1, 1] = SHAPES[1][0]
        pred[0, 0, 1, 2] = 0.0
    return pred, priors, gts


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("coder", ["delta_xywh", "distance", "none"])
@pytest.mark.parametrize("kind", ["tensor", "list", "tensor_f32", "tensor_int"])
def test_per_image_max_shape_matches_reference(device, coder, kind):
    pred, priors, gts = clipped_problem(device, coder)
    # Image 0 gets a ground truth covering both clip windows and a first prediction that decodes
    # to about (1, 1, 31, 31): clipped to (20, 25) or to (33.5, 12), its area and so its IoU with
    # the cover differ, whatever the random rest of the problem.
    cover = torch.tensor([[0.0, 0.0, 40.0, 40.0]], dtype=gts[0].dtype, device=device)
    gts = [torch.cat([gts[0], cover]), *gts[1:]]
    pred = pred.detach().clone()
    if coder == "delta_xywh":
        priors = priors.detach().clone()
        priors[0] = torch.tensor([1.0, 1.0, 31.0, 31.0])
        pred[0, :4, 0, 0] = -torch.tensor(CODER_KW[coder]["means"], dtype=pred.dtype) / torch.tensor(
            CODER_KW[coder]["stds"], dtype=pred.dtype)  # zero deltas after de-normalization
    elif coder == "distance":
        priors = priors.detach().clone()
        priors[0] = torch.tensor([16.0, 16.0])
        pred[0, :4, 0, 0] = 15.0 / CODER_KW[coder]["scale"]
    else:
        pred[0, :4, 0, 0] = torch.tensor([1.0, 1.0, 31.0, 31.0])
    ms = per_image(kind, device)
    kw = dict(CODER_KW[coder], max_shape=ms)
    iou, _, _ = assert_matches_reference(pred, priors, gts, kw)
    # The clip is per image: image 0 differs from the same image clipped with image 1's shape.
    iou_1, _ = tbd_ops.decode_max_iou(pred, priors, gts, **dict(CODER_KW[coder], max_shape=SHAPES[1]))
    iou_0, _ = tbd_ops.decode_max_iou(pred, priors, gts, **dict(CODER_KW[coder], max_shape=SHAPES[0]))
    if kind != "tensor_int":
        assert torch.equal(iou[0], iou_0[0]) and torch.equal(iou[1], iou_1[1])
        assert not torch.equal(iou[0], iou_1[0])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_per_image_max_shape_equals_the_single_shape_bitwise(device, dtype):
    """The same (h, w) for every image, per image or once: identical values and gradients."""
    pred, priors, gts = make_problem(device, "delta_xywh", N=3, A=2, H=3, W=4, counts=(4, 2, 3), dtype=dtype)
    pred = (pred.double() * 4).to(dtype)
    outs = []
    for ms in [(30.0, 26.0), [(30.0, 26.0)] * 3, torch.tensor([30.0, 26.0], device=device),
               torch.tensor([[30, 26]] * 3, device=device)]:
        p = pred.detach().clone().requires_grad_()
        q = priors.detach().clone().requires_grad_()
        iou, arg = tbd_ops.decode_max_iou(p, q, gts, stds=(0.1, 0.1, 0.2, 0.2), max_shape=ms)
        outs.append((iou, arg, *torch.autograd.grad(iou, [p, q], torch.ones_like(iou))))
    for o in outs[1:]:
        for a, b in zip(outs[0], o):
            assert torch.equal(a, b)


@pytest.mark.parametrize("device", DEVICES)
def test_per_image_max_shape_gradcheck(device):
    pred, priors, gts = clipped_problem(device, "delta_xywh", N=3, A=1, H=2, W=3)
    ms = torch.tensor([(30.0, 40.0), (25.0, 28.0), (45.0, 30.0)], device=device)
    inputs = [pred.requires_grad_(), priors.requires_grad_(), *(t.requires_grad_() for t in gts)]

    def fn(p, q, *g):
        return tbd_ops.decode_max_iou(p, q, list(g), **dict(CODER_KW["delta_xywh"], max_shape=ms))[0]

    assert torch.autograd.gradcheck(fn, tuple(inputs))


@pytest.mark.parametrize("device", DEVICES)
def test_per_image_max_shape_opcheck(device):
    for dtype, rg in ((torch.float32, False), (F64, True)):
        pred, priors, gts = clipped_problem(device, "delta_xywh")
        pred, priors = pred.to(dtype), priors.to(dtype)
        flat = torch.cat(gts).to(dtype)
        ms = per_image("tensor_f32", device)
        args = (pred.requires_grad_(rg), priors.requires_grad_(rg), flat.requires_grad_(rg), [6, 3, 2],
                "delta_xywh", [0.0] * 4, [0.1, 0.1, 0.2, 0.2], 1.0, None, 0.016, ms)
        opcheck(torch.ops.tbd_ops.decode_max_iou, args)
        iou, arg = torch.ops.tbd_ops.decode_max_iou(*args)
        plain = tuple(a.detach() if isinstance(a, torch.Tensor) else a for a in args)
        opcheck(torch.ops.tbd_ops._decode_max_iou_backward,
                (torch.randn_like(iou), arg, *plain[:10], [True, True, True], ms))


@pytest.mark.parametrize("device", DEVICES)
def test_per_image_max_shape_list_of_levels(device):
    pred, priors, gts = clipped_problem(device, "delta_xywh", H=3, W=4)
    pred2, priors2, _ = clipped_problem(device, "delta_xywh", H=2, W=2)
    for kind in ("tensor", "list"):
        ms = per_image(kind, device)
        outs = tbd_ops.decode_max_iou([pred, pred2], [priors, priors2], gts, stds=(0.1, 0.1, 0.2, 0.2),
                                      max_shape=ms)
        refs = ref.decode_max_iou([pred, pred2], [priors, priors2], gts, stds=(0.1, 0.1, 0.2, 0.2),
                                  max_shape=ms)
        for (iou, arg), (iou_r, arg_r) in zip(outs, refs):
            torch.testing.assert_close(iou, iou_r, rtol=1e-10, atol=1e-14)
            assert torch.equal(arg, arg_r)


@pytest.mark.parametrize("device", DEVICES)
def test_per_image_max_shape_compiles(device):
    pred, priors, gts = clipped_problem(device, "delta_xywh")
    ms = per_image("tensor", device)

    def loss(p):
        iou, _ = tbd_ops.decode_max_iou(p, priors, gts, stds=(0.1, 0.1, 0.2, 0.2), max_shape=ms)
        return (1 - iou).sum()

    assert_compiles_like_eager(loss, pred.requires_grad_())


@pytest.mark.parametrize("device", DEVICES)
def test_per_image_max_shape_empty_and_nan(device):
    pred, priors, _ = make_problem(device, "delta_xywh", N=2, counts=(3, 1))
    iou, arg = tbd_ops.decode_max_iou(pred[:0], priors, [], max_shape=torch.zeros(0, 2, device=device))
    assert iou.shape == (0, pred.shape[1] // 4 * pred.shape[2] * pred.shape[3])
    iou, arg = tbd_ops.decode_max_iou(pred[:0], priors, [], max_shape=[])
    assert iou.shape[0] == 0
    # NaN in the data propagates (the shapes themselves are checked on the host).
    pred, priors, gts = make_problem(device, "delta_xywh", N=2, counts=(3, 1))
    pred = pred.clone()
    pred[0, 0, 0, 0] = float("nan")
    iou, arg = tbd_ops.decode_max_iou(pred, priors, gts, max_shape=[(30.0, 30.0), (20.0, 10.0)])
    assert torch.isnan(iou[0, 0]) and not torch.isnan(iou[1]).any()


class TestPerImageMaxShapeBadInput:
    def setup_method(self):
        self.pred, self.priors, self.gts = make_problem("cpu", "delta_xywh", N=2, A=3, H=4, W=5, counts=(3, 1))

    def call(self, ms):
        return tbd_ops.decode_max_iou(self.pred, self.priors, self.gts, max_shape=ms)

    @pytest.mark.parametrize("ms,msg", [
        ([(10.0, 20.0)] * 3, r"max_shape must hold one \(h, w\) per image \(N = 2\), got 3"),
        (torch.ones(3, 2), r"max_shape per image must be \[N, 2\] = \[2, 2\] .* got shape \[3, 2\]"),
        (torch.ones(2, 3), r"max_shape per image must be \[N, 2\] = \[2, 2\] .* got shape \[2, 3\]"),
        (torch.ones(2, 2, 1), r"max_shape per image must be \[N, 2\]"),
        (torch.ones(1), r"max_shape must be \(h, w\)"),
        ([(10.0,), (10.0, 20.0)], r"max_shape\[0\] must be \(h, w\)"),
        ([(10.0, float("nan")), (10.0, 20.0)], r"max_shape must hold finite sizes >= 0, got max_shape\[0\]"),
        ([(10.0, 20.0), (-1.0, 20.0)], r"max_shape must hold finite sizes >= 0, got max_shape\[1\]"),
        (torch.tensor([[10.0, 20.0], [float("inf"), 3.0]]), "max_shape must hold finite sizes >= 0"),
        (torch.tensor([[10, 20], [-3, 3]]), "max_shape must hold finite sizes >= 0"),
    ])
    def test_values_and_shapes(self, ms, msg):
        with pytest.raises(ValueError, match=msg):
            self.call(ms)

    def test_dtype(self):
        with pytest.raises(TypeError, match="max_shape per image must be a float or integer tensor, got Bool"):
            self.call(torch.ones(2, 2, dtype=torch.bool))
        with pytest.raises(TypeError, match=r"max_shape\[1\] must be a sequence of numbers"):
            self.call([(1.0, 2.0), None])

    def test_both_forms_at_once(self):
        with pytest.raises(ValueError, match=r"max_shape must be one \(h, w\) or one per image, got both"):
            torch.ops.tbd_ops.decode_max_iou(self.pred, self.priors, torch.cat(self.gts), [3, 1], "delta_xywh",
                                            [0.0] * 4, [1.0] * 4, 1.0, [10.0, 20.0], 0.016, torch.ones(2, 2))


@requires_cuda
def test_cuda_per_image_max_shape_device_and_graph_capture():
    pred, priors, gts = make_problem("cuda", "delta_xywh", N=3, counts=(3, 1, 2), dtype=torch.float32)
    with pytest.raises(ValueError, match="max_shape per image must be on the device of bbox_pred"):
        tbd_ops.decode_max_iou(pred, priors, gts, max_shape=torch.ones(3, 2))
    ms = torch.tensor(SHAPES, device="cuda")
    iou_l, _ = tbd_ops.decode_max_iou(pred, priors, gts, max_shape=SHAPES)
    iou_t, _ = tbd_ops.decode_max_iou(pred, priors, gts, max_shape=ms)
    assert torch.equal(iou_l, iou_t)
    iou_c, _ = tbd_ops.decode_max_iou(pred.cpu(), priors.cpu(), [g.cpu() for g in gts], max_shape=SHAPES)
    torch.testing.assert_close(iou_t.cpu(), iou_c, rtol=1e-5, atol=1e-6)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):  # a tensor of shapes needs no synchronization
        static_iou, _ = tbd_ops.decode_max_iou(pred, priors, gts, max_shape=ms)
    ms.mul_(0.5)
    graph.replay()
    torch.testing.assert_close(static_iou, tbd_ops.decode_max_iou(pred, priors, gts, max_shape=ms)[0])


@requires_emu
@pytest.mark.emulated
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, F64])
def test_per_image_max_shape_emulated_matches_cpu_bitwise(dtype):
    """The emulated CUDA kernels and the CPU kernels: per-element outputs bit for bit."""
    pred, priors, gts = clipped_problem("cpu", "delta_xywh", N=3, A=3, H=5, W=7)
    pred, priors, flat = pred.to(dtype), priors.to(dtype), torch.cat(gts).to(dtype)
    args = (pred, priors, flat, [6, 3, 2], "delta_xywh", [0.01, -0.02, 0.0, 0.03], [0.1, 0.1, 0.2, 0.2],
            1.0, None, 0.016, torch.tensor(SHAPES))
    iou_c, arg_c = torch.ops.tbd_ops.decode_max_iou(*args)
    iou_e, arg_e = torch.ops.tbd_ops_emu.decode_max_iou(*args)
    assert torch.equal(iou_e.view(-1).view(torch.uint8), iou_c.view(-1).view(torch.uint8))
    assert torch.equal(arg_e, arg_c)
    grad = torch.randn(iou_c.shape, dtype=F64).to(dtype)
    gp_c, _, _ = torch.ops.tbd_ops._decode_max_iou_backward(grad, arg_c, *args[:10], [True, False, False], args[10])
    gp_e, _, _ = torch.ops.tbd_ops_emu._decode_max_iou_backward(grad, arg_c, *args[:10], [True, False, False],
                                                               args[10])
    assert torch.equal(gp_e.view(-1).view(torch.uint8), gp_c.view(-1).view(torch.uint8))

# ---- the emulated CUDA build against the CPU kernels ------------------------------------------------
# Per-element results (decoded IoU, argmax, per-prediction gradients) bit for bit, the sums of the
# ground-truth gradients to rounding, at the sizes where the launch geometry changes: one block,
# several blocks per image, more than one shared-memory tile of ground truths, more than one chunk
# of images.
EMU = torch.ops.tbd_ops_emu
CPU = torch.ops.tbd_ops


def decode_args(pred, priors, gts, coder, max_shape):
    kw = {"delta_xywh": ([0.01, -0.02, 0.0, 0.03], [0.1, 0.1, 0.2, 0.2], 1.0),
          "distance": ([0.0] * 4, [1.0] * 4, 8.0)}[coder]
    return (pred, priors, torch.cat(gts) if gts else pred.new_zeros(0, 4), [len(g) for g in gts], coder,
            kw[0], kw[1], kw[2], max_shape, 0.016)


def decode_problem(N, A, H, W, counts, dtype, coder, layout):
    P = H * W * A
    if coder == "delta_xywh":
        priors = rand_boxes(P, "cpu", dtype)
        # Some deltas beyond the wh_ratio_clip clamp (|log 0.016| = 4.14 after stds).
        pred = (torch.randn(N, A * 4, H, W, dtype=torch.float64) * 8).to(dtype)
    else:
        priors = (torch.rand(P, 2, dtype=torch.float64) * 60).to(dtype)
        pred = (torch.rand(N, A * 4, H, W, dtype=torch.float64) * 4 + 0.1).to(dtype)
    if layout == "channels_last":
        pred = pred.contiguous(memory_format=torch.channels_last)
    elif layout == "padded_rows":
        wide = torch.randn(N, A * 4, H, W + 3, dtype=torch.float64).to(dtype)
        wide[..., :W] = pred
        pred = wide[..., :W]
    gts = [rand_boxes(c, "cpu", dtype, extent=40.0) for c in counts]
    return pred, priors, gts


def compare_decode(pred, priors, gts, coder, max_shape, dtype):
    args = decode_args(pred, priors, gts, coder, max_shape)
    iou_c, arg_c = CPU.decode_max_iou(*args)
    iou_e, arg_e = all_schedules(lambda: EMU.decode_max_iou(*args))
    assert_bitwise(iou_e, iou_c, "iou")
    assert torch.equal(arg_e, arg_c)
    grad = torch.randn(iou_c.shape, dtype=torch.float64).to(dtype)
    mask = [True, True, True]
    gp_c, gr_c, gg_c = CPU._decode_max_iou_backward(grad, arg_c, *args, mask)
    gp_e, gr_e, gg_e = all_schedules(lambda: EMU._decode_max_iou_backward(grad, arg_c, *args, mask))
    assert_bitwise(gp_e, gp_c, "grad of bbox_pred")
    assert gp_e.stride() == gp_c.stride()
    # Priors: images summed in the same order on both sides, accumulated in
    # fp32/fp64 and rounded once -> bitwise equal.
    assert_bitwise(gr_e, gr_c, "grad of priors")
    torch.testing.assert_close(gg_e, gg_c, **RED_TOL[dtype])


@requires_emu
@pytest.mark.emulated
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    seed=st.integers(0, 2**32 - 1),  # the tensors' seed: Hypothesis replays and shrinks it
    N=st.integers(1, 3),
    A=st.sampled_from([1, 3]),
    H=st.integers(1, 12),
    W=st.sampled_from([1, 7, 31, 33, 95]),   # P around one block (256) and a few blocks
    counts=st.lists(st.integers(0, 40), min_size=3, max_size=3),
    dtype=st.sampled_from(DTYPES),
    coder=st.sampled_from(["delta_xywh", "distance"]),
    layout=st.sampled_from(["contiguous", "channels_last", "padded_rows"]),
    clip=st.booleans(),
)
def test_decode_max_iou_property(N, A, H, W, counts, dtype, coder, layout, clip, seed):
    torch.manual_seed(seed)
    pred, priors, gts = decode_problem(N, A, H, W, counts[:N], dtype, coder, layout)
    compare_decode(pred, priors, gts, coder, [45.0, 50.0] if clip else None, dtype)


@requires_emu
@pytest.mark.emulated
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_decode_max_iou_tiles_and_chunks(dtype):
    """G = 1100 > one shared tile (1024) for one image; N = 70 > one chunk (64) with empty images."""
    counts = [1100] + [int(c) for c in torch.randint(0, 6, (69,))]
    counts[5] = counts[64] = 0
    pred, priors, gts = decode_problem(70, 1, 3, 5, counts, dtype, "delta_xywh", "contiguous")
    compare_decode(pred, priors, gts, "delta_xywh", None, dtype)


@requires_emu
@pytest.mark.emulated
def test_fp16_prior_gradient_rounded_once_over_chunks():
    """N = 150 images (three chunks): the fp16 prior gradient is the float sum rounded once."""
    N, P = 150, 40
    pred, priors, gts = decode_problem(N, 1, 1, P, [3] * N, torch.float16, "delta_xywh", "contiguous")
    args = decode_args(pred, priors, gts, "delta_xywh", None)
    iou, arg = CPU.decode_max_iou(*args)
    grad = torch.rand(N, P, dtype=torch.float64).to(torch.float16)
    _, gr, _ = EMU._decode_max_iou_backward(grad, arg, *args, [False, True, False])
    # The same gradient in float64 from the CPU kernels on the same fp16 values and the same
    # argmax, so that only the rounding differs: at most one fp16 rounding apart. (The formula
    # itself is checked against tbd_ops.reference by the contract and the float64 tests.)
    args64 = decode_args(pred.double(), priors.double(), [g.double() for g in gts], "delta_xywh", None)
    _, gr64, _ = CPU._decode_max_iou_backward(grad.double(), arg, *args64, [False, True, False])
    torch.testing.assert_close(gr.double(), gr64, rtol=1e-3, atol=1e-4)


@requires_emu
@pytest.mark.emulated
def test_grid_limit_is_enforced(grid_yz_limit):
    """A launch over the grid.y limit is refused with the launch site, not run."""
    grid_yz_limit(7)
    pred, priors, gts = decode_problem(8, 1, 2, 3, [2] * 8, torch.float32, "delta_xywh", "contiguous")
    args = decode_args(pred, priors, gts, "delta_xywh", None)
    with pytest.raises(RuntimeError, match=r"decode_max_iou\.cu:\d+: launch of .*decode_max_iou_fwd_kernel.*"
                       r"grid dimension over the limit \(2\^31 - 1, 7, 7\)"):
        EMU.decode_max_iou(*args)


# ---- special coordinates: NaN, +-inf, -0.0, touching, degenerate and inverted boxes ----------------
# The pair loop of the kernels skips the NaN tests of the min/max for boxes whose area is not NaN;
# the values must stay those of the NaN-propagating formula bit for bit, the sign of a zero IoU
# included. The reference is scalar IEEE arithmetic in the dtype (numpy scalars) from the formula
# inter / max(union, eps) with torch.maximum / torch.minimum / torch.clamp semantics (NaN
# propagates; on a tie, -0.0 against +0.0 included, the first argument, the prediction's, is
# returned; a clamped NaN stays NaN) and torch.max's argmax (the first NaN, else the first maximum).
SPECIAL = [float("nan"), float("inf"), -float("inf"), -0.0, 0.0, 0.5, 1.0, 2.0, 3.0, 1e30]


def special_boxes(gen, n, allow_nan=True):
    pool = SPECIAL if allow_nan else SPECIAL[1:]
    idx = torch.randint(0, len(pool), (n, 4), generator=gen)
    return torch.tensor(pool, dtype=F64)[idx]


def structured_boxes():
    """Touching (at 0.0 and -0.0, in x and in y), degenerate, inverted and nested boxes."""
    z, nz = 0.0, -0.0
    return torch.tensor([
        [z, z, 2.0, 2.0], [-2.0, z, nz, 2.0], [-2.0, z, z, 2.0], [nz, z, 2.0, 2.0], [z, -2.0, 2.0, nz],
        [z, nz, 2.0, 2.0], [2.0, z, 4.0, 2.0], [1.0, 1.0, 1.0, 3.0], [1.0, 1.0, 3.0, 1.0], [3.0, 3.0, 1.0, 1.0],
        [nz, nz, nz, nz], [z, z, z, z], [0.5, 0.5, 1.0, 1.0], [-float("inf"), z, z, 1.0], [z, z, float("inf"), 1.0],
    ], dtype=F64)


def scalar_max_iou(boxes, gts, eps, np_dtype):
    """(iou, arg) of one prediction against an image's ground truths, in scalar IEEE arithmetic."""
    import numpy as np

    def mn(x, y):
        return x if (x != x or x < y) else (y if (y != y or y < x) else x)

    def mx(x, y):
        return x if (x != x or x > y) else (y if (y != y or y > x) else x)

    def cmin(v, lo):
        return v if v != v else (lo if v < lo else v)

    zero, e = np_dtype(0), np_dtype(eps)

    def area(q):
        return cmin(q[2] - q[0], zero) * cmin(q[3] - q[1], zero)

    out_v, out_a = [], []
    with np.errstate(all="ignore"):
        for a in boxes:
            a = [np_dtype(c) for c in a]
            best, arg = None, -1
            for j, b in enumerate(gts):
                b = [np_dtype(c) for c in b]
                iw = cmin(mn(a[2], b[2]) - mx(a[0], b[0]), zero)
                ih = cmin(mn(a[3], b[3]) - mx(a[1], b[1]), zero)
                inter = iw * ih
                v = inter / cmin(area(a) + area(b) - inter, e)
                if arg < 0 or (best == best and (v != v or v > best)):
                    best, arg = v, j
            out_v.append(np_dtype(0) if arg < 0 else best)
            out_a.append(arg)
    return out_v, out_a


def special_problem(dtype, seed=0):
    """Five images: ground truths without NaN, with NaN, the structured boxes, and two boxes that
    predictions touch at -0.0, in both orders (a zero IoU of either sign is the maximum); predictions
    [5, P, 4] (coder "none": the boxes themselves) from the same values, NaN included but in the
    last image, whose first 16 and more predictions have no NaN area (the CPU kernel's vector
    path, a lane per prediction, takes them)."""
    gen = torch.Generator().manual_seed(seed)
    s = structured_boxes()
    pred = torch.cat([s, special_boxes(gen, 60)])
    touching = torch.tensor([[-2.0, 0.0, -0.0, 2.0], [0.0, -2.0, 2.0, -0.0], [-2.0, 0.0, 0.0, 2.0], [2.0, 0.0, 4.0, 2.0]],
                            dtype=F64)
    pred = torch.stack([pred, pred.flip(0), torch.cat([special_boxes(gen, 45, allow_nan=False), s, s]),
                        torch.cat([touching, special_boxes(gen, 71)]),
                        torch.cat([touching, s, touching, s, special_boxes(gen, 37, allow_nan=False)])])
    touched = torch.tensor([[0.0, 0.0, 2.0, 2.0], [-0.0, 0.0, 2.0, 2.0]], dtype=F64)
    gts = [torch.cat([s, special_boxes(gen, 25, allow_nan=False)]), torch.cat([special_boxes(gen, 20), s]), s,
           touched, touched.flip(0)]
    return pred.to(dtype), [g.to(dtype) for g in gts]


def bits(t):
    return t.view(torch.int64 if t.dtype == F64 else torch.int32)


@pytest.mark.parametrize("device", DEVICES[:2])
@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_special_coordinates_match_scalar_reference(device, dtype):
    import numpy as np
    pred, gts = special_problem(dtype)
    iou, arg = tbd_ops.decode_max_iou(pred.to(device), None, [g.to(device) for g in gts], coder="none")
    np_dtype = np.float32 if dtype == torch.float32 else np.float64
    for n in range(pred.shape[0]):
        v, a = scalar_max_iou(pred[n].tolist(), gts[n].tolist(), 1e-6, np_dtype)
        want = torch.tensor(np.array(v, dtype=np_dtype))
        assert arg[n].tolist() == a, f"image {n}: argmax"
        nan = torch.isnan(want)
        assert torch.equal(torch.isnan(iou[n]), nan), f"image {n}: NaN positions"
        assert torch.equal(bits(iou[n][~nan]), bits(want[~nan])), f"image {n}: values (sign of zero included)"
    # Signed zeros, NaN and zero IoUs all occur (the test covers what it says).
    assert torch.isnan(iou).any() and (iou == 0).any() and (iou > 0).any()
    assert torch.signbit(iou[iou == 0]).any()


@requires_emu
@pytest.mark.emulated
@pytest.mark.parametrize("dtype", [torch.float32, F64, torch.float16])
def test_special_coordinates_emulated_matches_cpu_bitwise(dtype):
    """CPU and emulated CUDA kernels: the IoUs bit for bit (in float16 but for the payloads of
    NaNs, which the two float-to-half conversions write differently), the prediction gradient bit
    for bit but for the payloads of its NaNs (the host compiler orders the operands of its
    NaN-producing operations as it likes), the ground-truth gradient to rounding with the same
    NaNs."""
    pred, gts = special_problem(dtype, seed=1)
    args = (pred, None, torch.cat(gts), [len(g) for g in gts], "none", [0.0] * 4, [1.0] * 4, 1.0, None, 0.016)
    iou_c, arg_c = CPU.decode_max_iou(*args)
    iou_e, arg_e = all_schedules(lambda: EMU.decode_max_iou(*args))
    if dtype == torch.float16:
        nan = torch.isnan(iou_c)
        assert torch.equal(torch.isnan(iou_e), nan)
        iou_e, iou_c = iou_e[~nan], iou_c[~nan]
    assert_bitwise(iou_e, iou_c, "iou")
    assert torch.equal(arg_e, arg_c)
    grad = torch.randn(arg_c.shape, dtype=F64, generator=torch.Generator().manual_seed(2)).to(dtype)
    mask = [True, False, True]
    gp_c, _, gg_c = CPU._decode_max_iou_backward(grad, arg_c, *args, mask)
    gp_e, _, gg_e = all_schedules(lambda: EMU._decode_max_iou_backward(grad, arg_c, *args, mask))
    nan = torch.isnan(gp_c)
    assert torch.equal(torch.isnan(gp_e), nan) and nan.any()
    assert_bitwise(gp_e[~nan], gp_c[~nan], "grad of bbox_pred")
    torch.testing.assert_close(gg_e, gg_c, equal_nan=True, **RED_TOL[dtype])
    assert torch.isnan(gg_c).any() and not torch.isnan(gg_c).all()


def non_overlap_problem(dtype):
    """Two images with two ground truths each. Predictions: far from every ground truth (IoU 0,
    arg 0, a zero gradient), touching the first ground truth (IoU 0 but a nonzero gradient at the
    boundary, as autograd's clamp), overlapping it, overlapping the second one; more of them than
    a block (256) sums in one pass."""
    gt = torch.tensor([[10.0, 10.0, 20.0, 20.0], [40.0, 40.0, 50.0, 60.0]], dtype=F64)
    far = torch.tensor([[100.0, 100.0, 110.0, 120.0]], dtype=F64) + torch.arange(600, dtype=F64)[:, None] * 0.25
    touch = torch.tensor([[20.0, 12.0, 25.0, 18.0], [5.0, 20.0, 15.0, 30.0], [0.0, 0.0, 10.0, 15.0]], dtype=F64)
    over = torch.tensor([[12.0, 11.0, 19.0, 22.0], [15.0, 15.0, 25.0, 25.0], [42.0, 45.0, 49.0, 55.0]], dtype=F64)
    boxes = torch.cat([far[:200], touch, far[200:400], over, far[400:]])
    pred = torch.stack([boxes, boxes.flip(0)]).to(dtype)
    return pred, [gt.to(dtype), (gt + 1.0).to(dtype)]


@pytest.mark.parametrize("device", DEVICES[:2])
def test_gt_gradient_with_non_overlapping_and_touching_predictions(device):
    """The ground-truth gradient: non-overlapping predictions add exactly zero, touching ones
    (IoU 0) still add their boundary gradient, and a NaN upstream gradient reaches the row."""
    pred, gts = non_overlap_problem(F64)
    P = pred.shape[1]
    grad = torch.linspace(0.5, 1.5, 2 * P, dtype=F64).view(2, P)
    grad[1, 5] = float("nan")   # a non-overlapping prediction of image 1 (matched row 0 with IoU 0)
    got, want = [], []
    for fn, out in ((tbd_ops.decode_max_iou, got), (ref.decode_max_iou, want)):
        g = [t.clone().to(device).requires_grad_() for t in gts]
        iou, arg = fn(pred.to(device), None, g, coder="none")
        out.extend([iou, arg, *torch.autograd.grad(iou, g, grad.to(device))])
    assert torch.equal(got[1], want[1])
    assert (got[0][0, 200:203] == 0).all() and (got[1][:, :200] == 0).all()
    torch.testing.assert_close(got[2], want[2], rtol=1e-12, atol=1e-12)
    assert torch.isnan(got[3][0]).all() and not torch.isnan(got[3][1]).any()
    torch.testing.assert_close(got[3][1], want[3][1], rtol=1e-12, atol=1e-12)
    # Without the touching predictions, the first row's gradient changes (they count).
    keep = torch.ones(P, dtype=torch.bool)
    keep[200:203] = False
    g = [t.clone().requires_grad_() for t in gts]
    iou, _ = ref.decode_max_iou(pred[:, keep], None, g, coder="none")
    (g0,) = torch.autograd.grad(iou, g[0], grad[:, keep])
    assert not torch.allclose(g0[0], want[2][0])
