"""harmony_score and harmony_distillation_loss (the harmony family): kernels vs tbd_ops.reference."""
import math

import pytest
import torch

import tbd_ops
from tbd_ops import reference as ref
from tbd_ops.ops._utils import HD_MODES as MODES
from op_testing import (DEVICES, DTYPES, GRAD_TOL, TOL, OpContract, Sample, acc_dtype, bitwise_equal, requires_cuda,
                        requires_emu, run_single_threaded, strided)

F64_TOL = dict(rtol=1e-9, atol=1e-12)
# [N, H_l, W_l] per level: odd sizes, a 1x1 level, one level of several CUDA
# blocks (2048 locations each) and several CPU work items.
LEVELS = [(7, 5), (1, 1), (13, 3)]
BIG_LEVELS = [(61, 67), (7, 5)]


def rand(shape, device, dtype=torch.float64, lo=0.0, hi=1.0):
    return (torch.rand(shape, device=device, dtype=torch.float64) * (hi - lo) + lo).to(dtype)


def maps_for(n, levels, device, dtype=torch.float64, no_gt=()):
    """pc_s, pr_s, pc_t, pr_t: lists of [N, H, W] maps in [0, 1]; images in no_gt get pr_t = 0."""
    out = [[rand((n, h, w), device, dtype) for h, w in levels] for _ in range(4)]
    for t in out[3]:
        for i in no_gt:
            if i < n:
                t[i] = 0
    return out


# ---- harmony_score ----------------------------------------------------------------------------

class TestScoreContract(OpContract):
    op = staticmethod(tbd_ops.harmony_score)
    reference = staticmethod(ref.harmony_score)

    def samples(self, device):
        def pair(shape, dtype=torch.float64, grad=(True, True)):
            return tuple(rand(shape, device, dtype, -1.5, 1.5).requires_grad_(g) for g in grad)

        out = [Sample(pair((3, 4, 5)), name="float64", gradcheck=True),
               Sample(pair((3, 4, 5), grad=(False, True)), name="grad of p_r only", gradcheck=True),
               Sample(pair(()), name="0-d"),
               Sample((strided(rand((3, 7, 5), device), "transposed").requires_grad_(),
                       strided(rand((3, 7, 5), device)).requires_grad_()), name="strided"),
               Sample(pair((2, 0, 3)), name="empty")]
        for dtype in DTYPES[1:]:
            out.append(Sample(pair((2, 13, 17), dtype), name=str(dtype)))
        return out

    def value_tol(self, sample):
        return F64_TOL if sample.dtype() == torch.float64 else TOL[sample.dtype()]

    def grad_tol(self, sample):
        return F64_TOL if sample.dtype() == torch.float64 else GRAD_TOL[sample.dtype()]


def score_value_and_grads(f, p_c, p_r, g):
    ins = [t.detach().requires_grad_() for t in (p_c, p_r)]  # views keep their strides
    y = f(*ins)
    grads = torch.autograd.grad(y, ins, g)
    return y, grads


def compare_score(p_c, p_r, value_tol, grad_tol, g=None):
    if g is None:
        g = rand(p_c.shape, p_c.device, p_c.dtype, -1, 1)
    y, grads = score_value_and_grads(tbd_ops.harmony_score, p_c, p_r, g)
    assert y.dtype == p_c.dtype and y.shape == p_c.shape
    y_ref, grads_ref = score_value_and_grads(ref.harmony_score, p_c.double(), p_r.double(), g.double())
    torch.testing.assert_close(y.double(), y_ref, **value_tol)
    for got, want, inp in zip(grads, grads_ref, (p_c, p_r)):
        assert got.dtype == inp.dtype and got.shape == inp.shape
        torch.testing.assert_close(got.double(), want, **grad_tol)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", [(), (1,), (257,), (2, 7, 5), (3, 1, 13, 3), (2, 3, 4, 5, 6)])
def test_score_float64_matches_reference(device, shape):
    p_c, p_r = rand(shape, device, lo=-1.5, hi=1.5), rand(shape, device, lo=-1.5, hi=1.5)
    compare_score(p_c, p_r, F64_TOL, F64_TOL)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", ["transposed", "sliced", "expanded", "mixed", "rank8", "rank9"])
def test_score_non_contiguous(device, layout):
    if layout == "transposed":
        p_c = rand((3, 5, 7), device).transpose(1, 2)
        p_r = rand((3, 7, 5), device)
    elif layout == "sliced":
        p_c = rand((3, 7, 10), device)[:, :, ::2]
        p_r = rand((4, 7, 5), device)[1:]
    elif layout == "expanded":
        p_c = rand((1, 7, 1), device).expand(3, 7, 5)
        p_r = rand((3, 7, 5), device)
    elif layout == "mixed":
        p_c = rand((5, 3, 7), device).permute(1, 2, 0)
        p_r = rand((3, 7, 9), device)[..., 2:7]
    elif layout == "rank8":  # eight dimensions that do not merge: the most one launch takes
        p_c = rand((3,) * 8, device).permute(7, 5, 3, 1, 0, 2, 4, 6)[..., 1:]
        p_r = rand((3,) * 8, device).permute(0, 2, 4, 6, 7, 5, 3, 1)[..., 1:]
    else:  # nine dimensions that do not merge: the CUDA glue's fallback
        p_c = rand((2,) * 9, device).permute(8, 6, 4, 2, 0, 1, 3, 5, 7)
        p_r = rand((2,) * 9, device).permute(0, 2, 4, 6, 8, 7, 5, 3, 1)
    g = rand(p_c.shape, device, lo=-1, hi=1).transpose(-1, -2).contiguous().transpose(-1, -2)
    compare_score(p_c, p_r, F64_TOL, F64_TOL, g)


@pytest.mark.parametrize("device", DEVICES)
def test_score_empty(device):
    p_c = rand((2, 0, 3), device).requires_grad_()
    p_r = rand((2, 0, 3), device).requires_grad_()
    y = tbd_ops.harmony_score(p_c, p_r)
    assert y.shape == (2, 0, 3)
    y.sum().backward()
    assert p_c.grad.shape == p_c.shape and p_r.grad.shape == p_r.shape


@pytest.mark.parametrize("device", DEVICES)
def test_score_gradient_at_equal_inputs_is_zero(device):
    p_c = rand((3, 4), device)
    p_r = p_c.clone()
    p_r[0] += 0.25
    y, (gc, gr) = score_value_and_grads(tbd_ops.harmony_score, p_c, p_r, torch.ones_like(p_c))
    assert (y[1:] == 1).all()
    assert not gc[1:].any() and not gr[1:].any()  # sign(0) = 0
    t = math.tanh(0.25)
    torch.testing.assert_close(gr[0], torch.full_like(gr[0], -(1 - t * t)), rtol=1e-12, atol=0)
    torch.testing.assert_close(gc, -gr, rtol=0, atol=0)


@pytest.mark.parametrize("device", DEVICES)
def test_score_nan_propagates(device):
    p_c, p_r = rand((3, 4), device), rand((3, 4), device)
    p_c[1, 2] = float("nan")
    p_r[2, 0] = float("inf")
    y, grads = score_value_and_grads(tbd_ops.harmony_score, p_c, p_r, torch.ones_like(p_c))
    y_ref, grads_ref = score_value_and_grads(ref.harmony_score, p_c, p_r, torch.ones_like(p_c))
    assert torch.isnan(y[1, 2]) and y[2, 0] == 0 and torch.isfinite(y[0]).all()
    torch.testing.assert_close(y, y_ref, equal_nan=True, **F64_TOL)
    for got, want in zip(grads, grads_ref):
        torch.testing.assert_close(got, want, equal_nan=True, **F64_TOL)


@pytest.mark.parametrize("device", DEVICES)
def test_score_list_of_levels(device):
    p_c = [rand((2, h, w), device) for h, w in LEVELS]
    p_r = [rand((2, h, w), device) for h, w in LEVELS]
    out = tbd_ops.harmony_score(p_c, p_r)
    assert isinstance(out, list) and len(out) == 3
    for y, y_ref in zip(out, ref.harmony_score(p_c, p_r)):
        torch.testing.assert_close(y, y_ref, **F64_TOL)
    assert len(tbd_ops.harmony_score(tuple(p_c), tuple(p_r))) == 3


@pytest.mark.parametrize("device", DEVICES)
def test_score_autocast_promotes_mixed_dtypes(device):
    p_c = rand((3, 4), device, torch.float32)
    p_r = rand((3, 4), device, torch.bfloat16)
    with torch.autocast(device_type=device, dtype=torch.bfloat16):
        y = tbd_ops.harmony_score(p_c, p_r)
    assert y.dtype == torch.float32
    torch.testing.assert_close(y, ref.harmony_score(p_c, p_r.float()), **TOL[torch.float32])


class TestScoreBadInput:
    def test_shapes(self):
        with pytest.raises(ValueError, match=r"p_r must have the shape of p_c \[2, 3\], got \[3, 2\]"):
            tbd_ops.harmony_score(torch.rand(2, 3), torch.rand(3, 2))

    def test_dtypes(self):
        with pytest.raises(TypeError, match=r"p_r must have the dtype of p_c \(Float\), got Double"):
            tbd_ops.harmony_score(torch.rand(2, 3), torch.rand(2, 3, dtype=torch.float64))
        with pytest.raises(TypeError, match="p_c must be float32, float64, float16 or bfloat16, got Long"):
            tbd_ops.harmony_score(torch.ones(2, 3, dtype=torch.long), torch.rand(2, 3))

    def test_types_and_lists(self):
        with pytest.raises(TypeError, match="p_r must be a torch.Tensor, got float"):
            tbd_ops.harmony_score(torch.rand(2), 0.5)
        with pytest.raises(TypeError, match="p_r is a Tensor"):
            tbd_ops.harmony_score([torch.rand(2)], torch.rand(2))
        with pytest.raises(ValueError, match="one entry per level, got 2 and 1"):
            tbd_ops.harmony_score([torch.rand(2)] * 2, [torch.rand(2)])

    def test_backward_op(self):
        x = torch.rand(2, 3)
        with pytest.raises(ValueError, match=r"grad must have the shape of p_c \[2, 3\], got \[3\]"):
            torch.ops.tbd_ops._harmony_score_backward(torch.rand(3), x, x, [True, True])
        with pytest.raises(TypeError, match=r"grad must have the dtype of p_c \(Float\), got Half"):
            torch.ops.tbd_ops._harmony_score_backward(x.half(), x, x, [True, True])

    @requires_cuda
    def test_device_mismatch(self):
        with pytest.raises((ValueError, RuntimeError), match="device"):
            tbd_ops.harmony_score(torch.rand(2, device="cuda"), torch.rand(2))


# ---- harmony_distillation_loss ------------------------------------------------------------------

class TestLossContract(OpContract):
    op = staticmethod(tbd_ops.harmony_distillation_loss)
    reference = staticmethod(ref.harmony_distillation_loss)
    # The loss and its normalizers (hence the gradients) are sums in another order on each side.
    reduction_outputs = "all"
    reduction_grads = "all"

    def samples(self, device):
        def maps(n, levels, dtype=torch.float64, grad=(True, True), no_gt=(), layout=None):
            m = maps_for(n, levels, device, dtype, no_gt)
            if layout is not None:
                m = [[strided(t, layout) for t in ts] for ts in m]
            m[0] = [t.requires_grad_(grad[0]) for t in m[0]]
            m[1] = [t.requires_grad_(grad[1]) for t in m[1]]
            return tuple(m)

        small = [(3, 4), (1, 1), (2, 3)]
        out = [Sample(maps(2, small, no_gt=(1,)), dict(mode="plain"), name="plain", gradcheck=True),
               # iou_guided: psi depends on pc_s but is a constant of the loss (see test_loss_gradcheck)
               Sample(maps(2, small, grad=(False, True), no_gt=(1,)), name="iou_guided, grad of pr_s",
                      gradcheck=True),
               Sample(maps(2, small, grad=(True, False)), dict(mode="plain"), name="plain, grad of pc_s",
                      gradcheck=True),
               Sample(maps(3, LEVELS, no_gt=(1,)), name="iou_guided"),
               Sample(maps(0, LEVELS), name="N = 0"),
               Sample(maps(2, [(3, 3), (0, 2)]), dict(mode="plain"), name="empty level"),
               # Strided maps of a level over more than one CPU work item and CUDA block (2048
               # locations): 47 x 53 = 2491.
               Sample(maps(2, [(47, 53), (7, 5)], layout="padded"), name="strided, padded", opcheck=False),
               Sample(maps(2, [(47, 53), (7, 5)], layout="transposed"), dict(mode="plain"), name="strided, transposed", opcheck=False)]
        for dtype in DTYPES[1:]:
            out.append(Sample(maps(2, LEVELS + [(17, 9)], dtype, no_gt=(1,)), name=str(dtype)))
        return out

    def value_tol(self, sample):  # the loss is float32 for every 16/32-bit input
        return F64_TOL if sample.dtype() == torch.float64 else TOL[acc_dtype(sample.dtype())]

    def grad_tol(self, sample):
        return F64_TOL if sample.dtype() == torch.float64 else GRAD_TOL[sample.dtype()]


def loss_value_and_grads(f, maps, mode, g=2.5, **kw):
    cs = [t.detach().requires_grad_() for t in maps[0]]  # views keep their strides
    rs = [t.detach().requires_grad_() for t in maps[1]]
    y = f(cs, rs, maps[2], maps[3], mode=mode, **kw)
    gc = torch.autograd.grad(y * g, cs + rs, allow_unused=True)
    return y, list(gc[:len(cs)]), list(gc[len(cs):])


def compare_loss(maps, mode, value_tol, grad_tol, **kw):
    y, gc, gr = loss_value_and_grads(tbd_ops.harmony_distillation_loss, maps, mode, **kw)
    dt = maps[0][0].dtype
    assert y.shape == () and y.dtype == (torch.float64 if dt == torch.float64 else torch.float32)
    y_ref, gc_ref, gr_ref = loss_value_and_grads(
        ref.harmony_distillation_loss, [[t.double() for t in ts] for ts in maps], mode, **kw)
    torch.testing.assert_close(y.double(), y_ref, **value_tol)
    for got, want, inp in zip(gc + gr, gc_ref + gr_ref, maps[0] + maps[1]):
        assert got.dtype == inp.dtype and got.shape == inp.shape
        want = torch.zeros_like(got, dtype=torch.float64) if want is None else want
        torch.testing.assert_close(got.double(), want, **grad_tol)
    return y, gc, gr


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("n", [1, 3])
def test_loss_float64_matches_reference(device, mode, n):
    maps = maps_for(n, LEVELS, device, no_gt=(1,))  # image 1 has no ground truth (pr_t = 0)
    compare_loss(maps, mode, F64_TOL, F64_TOL)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mode", MODES)
def test_loss_levels_of_several_blocks(device, mode):
    """A level of 61 * 67 locations: two CUDA blocks and two CPU work items per image."""
    maps = maps_for(2, BIG_LEVELS, device)
    compare_loss(maps, mode, F64_TOL, F64_TOL)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mode", MODES)
def test_loss_more_levels_than_one_launch_holds(device, mode):
    """Eleven levels: two launches of up to eight levels each on CUDA."""
    levels = [(3 + l, 2 + (l * 5) % 7) for l in range(11)]
    maps = maps_for(2, levels, device, no_gt=(0,))
    compare_loss(maps, mode, F64_TOL, F64_TOL)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mode", MODES)
def test_loss_no_ground_truth_image_contributes_zero(device, mode):
    none = maps_for(2, LEVELS, device, no_gt=(0, 1))
    y, gc, gr = compare_loss(none, mode, F64_TOL, F64_TOL)
    if mode == "iou_guided":  # psi = 0 everywhere: no loss, no gradient
        assert y.item() == 0.0 and all(not g.any() for g in gc + gr)
    # [image without gt, image with gt]: the mean over both halves the second one's term.
    maps = maps_for(2, LEVELS, device, no_gt=(0,))
    y2 = tbd_ops.harmony_distillation_loss(*maps, mode=mode)
    y1 = tbd_ops.harmony_distillation_loss(*[[t[1:] for t in ts] for ts in maps], mode=mode)
    if mode == "iou_guided":
        torch.testing.assert_close(y2, y1 / 2, **F64_TOL)
    else:  # "plain" has no psi: the image without ground truth counts as any other
        y0 = tbd_ops.harmony_distillation_loss(*[[t[:1] for t in ts] for ts in maps], mode=mode)
        assert y0.item() > 0
        torch.testing.assert_close(y2, (y0 + y1) / 2, **F64_TOL)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_loss_dtypes(device, mode, dtype):
    maps = maps_for(2, LEVELS + [(17, 9)], device, dtype, no_gt=(1,))
    # The reference runs in float64 on the same (rounded) values; the loss is
    # float32 for every 16/32-bit input, the gradients come back in the input dtype.
    compare_loss(maps, mode, TOL[torch.float32], GRAD_TOL[dtype])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("case", ["n0", "empty_level", "all_empty"])
def test_loss_empty(device, mode, case):
    if case == "n0":
        maps = maps_for(0, LEVELS, device)
    elif case == "empty_level":
        maps = maps_for(2, [(7, 5), (0, 3), (4, 0)], device)
    else:
        maps = maps_for(2, [(0, 3)], device)
    y, gc, gr = compare_loss(maps, mode, F64_TOL, F64_TOL)
    assert torch.isfinite(y)
    if case != "empty_level":
        assert y.item() == 0.0
        assert all(not g.any() for g in gc + gr)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", ["transposed", "sliced", "expanded_teacher", "expanded_student", "mixed"])
@pytest.mark.parametrize("mode", MODES)
def test_loss_non_contiguous(device, layout, mode):
    n = 2
    if layout == "transposed":
        maps = [[rand((n, w, h), device).transpose(1, 2) for h, w in LEVELS] for _ in range(4)]
    elif layout == "sliced":
        maps = [[rand((n + 1, h, 2 * w + 1), device)[1:, :, 1::2] for h, w in LEVELS] for _ in range(4)]
    elif layout == "expanded_teacher":
        maps = maps_for(n, LEVELS, device)
        maps[2] = [rand((1, h, w), device).expand(n, h, w) for h, w in LEVELS]
        maps[3] = [rand((n, h, 1), device).expand(n, h, w) for h, w in LEVELS]
    elif layout == "expanded_student":
        maps = maps_for(n, LEVELS, device)
        maps[1] = [rand((n, 1, w), device).expand(n, h, w) for h, w in LEVELS]
    else:
        maps = maps_for(n, LEVELS, device)
        maps[0] = [rand((h, n, w), device).transpose(0, 1) for h, w in LEVELS]
        maps[3] = [rand((n, w, h), device).transpose(1, 2) for h, w in LEVELS]
    assert any(not t.is_contiguous() for ts in maps for t in ts)
    compare_loss(maps, mode, F64_TOL, F64_TOL)


@pytest.mark.parametrize("device", DEVICES)
def test_loss_single_tensor_is_one_level(device):
    maps = maps_for(2, [(7, 5)], device)
    y = tbd_ops.harmony_distillation_loss(*[ts[0] for ts in maps])
    torch.testing.assert_close(y, ref.harmony_distillation_loss(*maps), **F64_TOL)
    torch.testing.assert_close(tbd_ops.harmony_distillation_loss(*[tuple(ts) for ts in maps]), y, rtol=0, atol=0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mode", MODES)
def test_loss_gradcheck(device, mode):
    maps = maps_for(2, [(3, 4), (1, 1), (2, 3)], device, no_gt=(1,))
    cs = [t.requires_grad_() for t in maps[0]]
    rs = [t.requires_grad_() for t in maps[1]]

    def f_r(*rs_):
        return tbd_ops.harmony_distillation_loss([t.detach() for t in cs], list(rs_), maps[2], maps[3], mode=mode)

    assert torch.autograd.gradcheck(f_r, tuple(rs))
    if mode == "plain":  # iou_guided: psi depends on pc_s but is a constant of the loss
        def f(*xs):
            return tbd_ops.harmony_distillation_loss(list(xs[:3]), list(xs[3:]), maps[2], maps[3], mode=mode)

        assert torch.autograd.gradcheck(f, tuple(cs + rs))
    else:  # pc_s's analytic gradient: through HS^s only (against psi held fixed)
        psi = [rt * torch.sqrt(1 + (ct - c.detach()).abs()) for c, ct, rt in zip(cs, maps[2], maps[3])]

        def f_c(*xs):
            total = 0
            for x, r, ct, rt, p in zip(xs, rs, maps[2], maps[3], psi):
                d = ((1 - torch.tanh((rt - ct).abs())) - (1 - torch.tanh((r.detach() - x).abs()))).abs()
                total = total + ((p * d).sum((1, 2)) / p.sum((1, 2)).clamp(min=1e-6)).mean()
            return total

        got = torch.autograd.grad(tbd_ops.harmony_distillation_loss(cs, [r.detach() for r in rs], maps[2], maps[3],
                                                                    mode=mode), cs)
        want = torch.autograd.grad(f_c(*cs), cs)
        assert torch.autograd.gradcheck(f_c, tuple(cs))
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, **F64_TOL)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mode", MODES)
def test_loss_teacher_gets_no_gradient(device, mode):
    maps = maps_for(2, LEVELS, device)
    for ts in maps:
        for t in ts:
            t.requires_grad_()
    y = tbd_ops.harmony_distillation_loss(*maps, mode=mode)
    y.backward()
    assert all(t.grad is not None for t in maps[0] + maps[1])
    assert all(t.grad is None for t in maps[2] + maps[3])
    # Also through the operator itself (no detach in the Python wrapper).
    out, _ = torch.ops.tbd_ops.harmony_distillation_loss(*maps, mode, 1e-6)
    grads = torch.autograd.grad(out, maps[0] + maps[2] + maps[3], allow_unused=True)
    assert all(g is not None for g in grads[:3]) and all(g is None for g in grads[3:])
    # Only the teacher requires grad: nothing to differentiate.
    only_t = [[t.detach() for t in maps[0]], [t.detach() for t in maps[1]], maps[2], maps[3]]
    assert not tbd_ops.harmony_distillation_loss(*only_t, mode=mode).requires_grad


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mode", MODES)
def test_loss_nan_propagates(device, mode):
    maps = maps_for(3, LEVELS, device)
    maps[0][0][1, 2, 3] = float("nan")
    y, gc, gr = loss_value_and_grads(tbd_ops.harmony_distillation_loss, maps, mode)
    y_ref, gc_ref, gr_ref = loss_value_and_grads(ref.harmony_distillation_loss, maps, mode)
    assert torch.isnan(y) and torch.isnan(y_ref)
    for got, want in zip(gc + gr, gc_ref + gr_ref):
        torch.testing.assert_close(got, want, equal_nan=True, **F64_TOL)
    # A NaN in the teacher's p_r (HS^t and psi) of one image.
    maps = maps_for(3, LEVELS, device)
    maps[3][2][0, 0, 0] = float("nan")
    assert torch.isnan(tbd_ops.harmony_distillation_loss(*maps, mode=mode))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mode", MODES)
def test_loss_deterministic(device, mode):
    levels = [(100, 76), (50, 38), (7, 5)] if device == "cpu" else BIG_LEVELS
    maps = maps_for(4, levels, device, torch.float32, no_gt=(2,))

    def run():
        return loss_value_and_grads(tbd_ops.harmony_distillation_loss, maps, mode)

    y1, gc1, gr1 = run()
    y2, gc2, gr2 = run()
    y3, gc3, gr3 = run_single_threaded(run)
    for y, gc, gr in ((y2, gc2, gr2), (y3, gc3, gr3)):
        assert torch.equal(y, y1)
        assert all(torch.equal(a, b) for a, b in zip(gc + gr, gc1 + gr1))


@pytest.mark.parametrize("device", DEVICES)
def test_loss_autocast_promotes_mixed_dtypes(device):
    maps = maps_for(2, LEVELS, device, torch.float32)
    maps[2] = [t.bfloat16() for t in maps[2]]
    with torch.autocast(device_type=device, dtype=torch.bfloat16):
        y = tbd_ops.harmony_distillation_loss(*maps)
    assert y.dtype == torch.float32
    torch.testing.assert_close(y, ref.harmony_distillation_loss(*maps), **TOL[torch.float32])


class TestLossBadInput:
    def maps(self, n=2, levels=LEVELS):
        return maps_for(n, levels, "cpu", torch.float32)

    def test_mode_and_eps(self):
        m = self.maps()
        with pytest.raises(ValueError, match="mode must be one of"):
            tbd_ops.harmony_distillation_loss(*m, mode="iou")
        with pytest.raises(ValueError, match=r'mode must be "iou_guided" or "plain", got "l1"'):
            torch.ops.tbd_ops.harmony_distillation_loss(*m, "l1", 1e-6)
        for eps in (0.0, -1.0, float("nan"), float("inf")):
            with pytest.raises(ValueError, match="eps must be finite and > 0"):
                tbd_ops.harmony_distillation_loss(*m, eps=eps)
            with pytest.raises(ValueError, match="eps must be finite and > 0"):
                torch.ops.tbd_ops.harmony_distillation_loss(*m, "plain", eps)

    def test_level_counts(self):
        m = self.maps()
        with pytest.raises(ValueError, match="pc_s, pr_s, pc_t and pr_t must have one entry per level, "
                                             "got 3, 3, 2 and 3 levels"):
            tbd_ops.harmony_distillation_loss(m[0], m[1], m[2][:2], m[3])
        with pytest.raises(ValueError, match="one map per level, got 3, 2, 3 and 3 levels"):
            torch.ops.tbd_ops.harmony_distillation_loss(m[0], m[1][:2], m[2], m[3], "plain", 1e-6)
        with pytest.raises(ValueError, match="pc_s must hold at least one level"):
            tbd_ops.harmony_distillation_loss([], [], [], [])

    def test_shapes(self):
        m = self.maps()
        bad = [t.clone() for t in m[3]]
        bad[1] = torch.rand(2, 1, 2)
        with pytest.raises(ValueError, match=r"pr_t\[1\] must have the shape of pc_s\[1\] \[2, 1, 1\], got \[2, 1, 2\]"):
            tbd_ops.harmony_distillation_loss(m[0], m[1], m[2], bad)
        rank = [t.clone() for t in m[1]]
        rank[2] = rank[2][0]
        with pytest.raises(ValueError, match=r"pr_s\[2\] must be a 3-D tensor \[N, H, W\], got a 2-D"):
            tbd_ops.harmony_distillation_loss(m[0], rank, m[2], m[3])
        n = self.maps()
        other = [[ts[0], self.maps(3)[k][1]] for k, ts in enumerate(n)]
        with pytest.raises(ValueError, match=r"pc_s\[1\] must hold N = 2 images \(as pc_s\[0\]\), got 3"):
            tbd_ops.harmony_distillation_loss(*other)

    def test_dtypes(self):
        m = self.maps()
        bad = [t.double() for t in m[2]]
        with pytest.raises(TypeError, match=r"pc_t\[0\] must have the dtype of pc_s\[0\] \(Float\), got Double"):
            tbd_ops.harmony_distillation_loss(m[0], m[1], bad, m[3])
        ints = [(t * 10).long() for t in m[1]]
        with pytest.raises(TypeError, match=r"pr_s\[0\] must be float32, float64, float16 or bfloat16, got Long"):
            tbd_ops.harmony_distillation_loss(m[0], ints, m[2], m[3])

    def test_types(self):
        m = self.maps()
        with pytest.raises(TypeError, match=r"pr_t\[1\] must be a torch.Tensor, got float"):
            tbd_ops.harmony_distillation_loss(m[0], m[1], m[2], [m[3][0], 0.5, m[3][2]])
        with pytest.raises(TypeError, match="pc_t must be a tensor or a list/tuple of tensors"):
            tbd_ops.harmony_distillation_loss(m[0], m[1], None, m[3])

    def test_backward_op(self):
        m = self.maps()
        bwd = torch.ops.tbd_ops._harmony_distillation_loss_backward
        norm = torch.rand(3, 2)
        with pytest.raises(ValueError, match=r"grad must be a 0-d tensor, got shape \[1\]"):
            bwd(torch.ones(1), norm, *m, "plain", [True, True])
        with pytest.raises(TypeError, match="grad must be Float, got Double"):
            bwd(torch.tensor(1.0, dtype=torch.float64), norm, *m, "plain", [True, True])
        with pytest.raises(ValueError, match=r"norm must be \[L, N\] = \[3, 2\], got \[2, 3\]"):
            bwd(torch.tensor(1.0), norm.t(), *m, "plain", [True, True])

    @requires_cuda
    def test_device_mismatch(self):
        m = self.maps()
        m[3] = [t.cuda() for t in m[3]]
        with pytest.raises((ValueError, RuntimeError), match="device"):
            tbd_ops.harmony_distillation_loss(*m)


def test_fake_kernels_match_real_strides():
    """opcheck compares fake strides only on CUDA tensors: check them on CPU too."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    maps = maps_for(2, LEVELS, "cpu", torch.float32)
    maps[0][0] = maps[0][0].transpose(1, 2).contiguous().transpose(1, 2)
    p_c, p_r = rand((4, 3), "cpu", torch.float32).t(), rand((3, 4), "cpu", torch.float32)
    g = torch.rand(3, 4)
    loss, norm = torch.ops.tbd_ops.harmony_distillation_loss(*maps, "iou_guided", 1e-6)
    grad = torch.tensor(1.0)
    real = [torch.ops.tbd_ops.harmony_score(p_c, p_r), *torch.ops.tbd_ops._harmony_score_backward(g, p_c, p_r, [True, True]),
            loss, norm, *sum(torch.ops.tbd_ops._harmony_distillation_loss_backward(grad, norm, *maps, "plain", [True, True]), [])]
    with FakeTensorMode() as mode:
        fm = [[mode.from_tensor(t) for t in ts] for ts in maps]
        fc, fr, fg, fgrad, fnorm = (mode.from_tensor(t) for t in (p_c, p_r, g, grad, norm))
        fl, fn = torch.ops.tbd_ops.harmony_distillation_loss(*fm, "iou_guided", 1e-6)
        fake = [torch.ops.tbd_ops.harmony_score(fc, fr), *torch.ops.tbd_ops._harmony_score_backward(fg, fc, fr, [True, True]),
                fl, fn, *sum(torch.ops.tbd_ops._harmony_distillation_loss_backward(fgrad, fnorm, *fm, "plain", [True, True]), [])]
    for r, f in zip(real, fake):
        assert (r.shape, r.dtype, r.stride()) == (f.shape, f.dtype, f.stride())


@requires_cuda
@pytest.mark.parametrize("mode", MODES)
def test_cuda_matches_cpu(mode):
    maps = maps_for(4, [(100, 152), (50, 76), (25, 38), (13, 19), (7, 10)], "cpu", torch.float32, no_gt=(1,))
    y_cpu, gc_cpu, gr_cpu = loss_value_and_grads(tbd_ops.harmony_distillation_loss, maps, mode)
    cuda_maps = [[t.cuda() for t in ts] for ts in maps]
    y, gc, gr = loss_value_and_grads(tbd_ops.harmony_distillation_loss, cuda_maps, mode)
    torch.testing.assert_close(y.cpu(), y_cpu, rtol=1e-5, atol=1e-7)
    for a, b in zip(gc + gr, gc_cpu + gr_cpu):
        torch.testing.assert_close(a.cpu(), b, rtol=1e-5, atol=1e-9)
    p_c, p_r = maps[0][0], maps[1][0]
    torch.testing.assert_close(tbd_ops.harmony_score(p_c.cuda(), p_r.cuda()).cpu(), tbd_ops.harmony_score(p_c, p_r),
                               rtol=1e-6, atol=1e-7)


# ---- the emulated CUDA build against the CPU kernels --------------------------

@requires_emu
@pytest.mark.emulated
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16])
def test_emulated_score_bitwise_equals_cpu(dtype):
    """The score and its gradients: the same shared math (and libm tanh) on both sides."""
    emu, cpu = torch.ops.tbd_ops_emu, torch.ops.tbd_ops
    p_c = rand((3, 37, 41), "cpu", dtype, -2, 2)
    p_r = rand((3, 41, 37), "cpu", dtype, -2, 2).transpose(1, 2)
    p_r[0, 0, :5] = p_c[0, 0, :5]  # d = 0
    assert bitwise_equal(emu.harmony_score(p_c, p_r), cpu.harmony_score(p_c, p_r), strides=True)
    g = rand(p_c.shape, "cpu", dtype, -1, 1)
    for mask in ([True, True], [True, False], [False, True]):
        for x, z in zip(emu._harmony_score_backward(g, p_c, p_r, mask), cpu._harmony_score_backward(g, p_c, p_r, mask)):
            assert bitwise_equal(x, z, strides=True)


@requires_emu
@pytest.mark.emulated
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16])
def test_emulated_loss_matches_cpu(mode, dtype):
    """Loss and normalizers: sums in another order (close); gradients for the same
    normalizers: bit for bit."""
    emu, cpu = torch.ops.tbd_ops_emu, torch.ops.tbd_ops
    maps = maps_for(3, BIG_LEVELS + LEVELS, "cpu", dtype, no_gt=(1,))
    maps[1][0] = rand((3, 67, 61), "cpu", dtype).transpose(1, 2)
    y_e, n_e = emu.harmony_distillation_loss(*maps, mode, 1e-6)
    y_c, n_c = cpu.harmony_distillation_loss(*maps, mode, 1e-6)
    tol = dict(rtol=1e-12, atol=1e-14) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(y_e, y_c, **tol)
    torch.testing.assert_close(n_e, n_c, **tol)
    if mode == "plain":
        assert torch.equal(n_e, n_c)  # 1 / (H W N): no sum involved
    grad = torch.tensor(0.7, dtype=y_c.dtype)
    for mask in ([True, True], [True, False], [False, True]):
        got = emu._harmony_distillation_loss_backward(grad, n_c, *maps, mode, mask)
        want = cpu._harmony_distillation_loss_backward(grad, n_c, *maps, mode, mask)
        for xs, zs in zip(got, want):
            assert len(xs) == len(zs) == (len(maps[0]) if xs else 0)
            assert all(bitwise_equal(x, z, strides=True) for x, z in zip(xs, zs))
