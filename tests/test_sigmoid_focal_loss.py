"""sigmoid_focal_loss (SPEC 2.4): kernels vs tbd_ops.reference (float64), values and gradients."""
import math

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import tbd_ops
from tbd_ops import reference as ref
from tbd_ops.ops._utils import REDUCTIONS
from tbd_ops.ops.sigmoid_focal_loss import DEFAULTS as FOCAL_DEFAULTS
from op_testing import (DEVICES, DTYPES, GRAD_TOL, TOL, OpContract, Sample, acc_dtype, all_schedules, assert_bitwise,
                        requires_cuda, requires_emu, run_single_threaded, run_without_host_sync, strided)

OP = tbd_ops.sigmoid_focal_loss
F64 = dict(rtol=1e-9, atol=1e-12)


def inputs(R, C, device, dtype=torch.float64, scale=3.0, background=0.3):
    logits = (torch.randn(R, C, dtype=torch.float64) * scale).to(dtype).to(device)
    targets = torch.randint(0, max(C, 1), (R,))
    targets[torch.rand(R) < background] = C
    weight = (torch.rand(R, dtype=torch.float64) + 0.1).to(device)
    return logits, targets.to(device), weight


def value_and_grads(f, logits, targets, weight, reduction, g, **kw):
    x = logits.detach().clone().requires_grad_()
    w = None if weight is None else weight.detach().clone().requires_grad_()
    y = f(x, targets, w, reduction=reduction, **kw)
    ins = [x] if w is None else [x, w]
    grads = torch.autograd.grad(y, ins, g)
    return y, grads


def compare(logits, targets, weight, reduction, value_tol=None, grad_tol=None, **kw):
    """Ours vs the float64 reference on the same (rounded) inputs, with a random incoming gradient."""
    dtype = logits.dtype
    value_tol = value_tol or (F64 if dtype == torch.float64 else TOL[dtype])
    grad_tol = grad_tol or (F64 if dtype == torch.float64 else GRAD_TOL[dtype])
    R, C = logits.shape
    acc = acc_dtype(dtype)
    g = torch.randn((R, C) if reduction == "none" else (), dtype=torch.float64, device=logits.device)
    y, grads = value_and_grads(OP, logits, targets, weight, reduction,
                               g.to(dtype if reduction == "none" else acc), **kw)
    assert y.dtype == (dtype if reduction == "none" else acc)
    assert y.shape == ((R, C) if reduction == "none" else ())
    y_ref, grads_ref = value_and_grads(ref.sigmoid_focal_loss, logits.double(), targets,
                                       None if weight is None else weight.double(), reduction,
                                       g.to(dtype).double() if reduction == "none" else g.to(acc).double(), **kw)
    torch.testing.assert_close(y.double(), y_ref.double(), equal_nan=True, **value_tol)
    for got, want, inp in zip(grads, grads_ref, (logits, weight)):
        assert got.dtype == inp.dtype and got.shape == inp.shape
        torch.testing.assert_close(got.double(), want, equal_nan=True, **grad_tol)
    return y, grads


class TestContract(OpContract):
    op = staticmethod(tbd_ops.sigmoid_focal_loss)
    reference = staticmethod(ref.sigmoid_focal_loss)
    reduction_outputs = [0]  # "sum" and "mean": another summation order on each side

    def samples(self, device):
        out = []
        x, t, w = inputs(7, 4, device, scale=2.0)
        for reduction in REDUCTIONS:
            for gamma in (0.0, 2.0, 1.5):
                out.append(Sample((x.requires_grad_(), t, w.requires_grad_()),
                                  dict(gamma=gamma, alpha=0.3, reduction=reduction),
                                  name=f"{reduction} gamma {gamma}", gradcheck=True))
            out.append(Sample((x, t, None), dict(reduction=reduction), name=f"{reduction}, grad of logits only",
                              gradcheck=True))
            out.append(Sample((x.detach(), t, w), dict(reduction=reduction), name=f"{reduction}, grad of weight only",
                              gradcheck=True))
            for dtype in DTYPES[1:]:
                logits, targets, weight = inputs(9, 4, device, dtype)
                out.append(Sample((logits.requires_grad_(), targets, weight.to(dtype).requires_grad_()),
                                  dict(reduction=reduction), name=f"{reduction} {dtype}"))
            # Column-major logits and a strided weight, R * C = 6000 elements: more than one
            # CPU work item (4096) and several CUDA blocks.
            logits, targets, weight = inputs(300, 20, device)
            out.append(Sample((strided(logits, "transposed").requires_grad_(), targets,
                               strided(weight[:, None])[:, 0].requires_grad_()), dict(reduction=reduction),
                              name=f"{reduction} strided", opcheck=False))
            # float32 rows longer than a CPU segment (1024 columns) and not a multiple of the
            # vector width, the target in the first, a middle and the last column of either
            # segment, or background; gamma 2 (fixed at compile time on CPU) and 1.5 (pow).
            logits, _, weight = inputs(7, 1100, device, torch.float32)
            targets = torch.tensor([0, 1023, 1024, 1099, 1100, 517, 1060], device=device)
            for gamma in (2.0, 1.5):
                out.append(Sample((logits.requires_grad_(), targets, weight.float().requires_grad_()),
                                  dict(gamma=gamma, reduction=reduction), name=f"{reduction} float32 C 1100 gamma {gamma}",
                                  opcheck=False))
            # float32 logits where exp(-|x|) is subnormal or underflows, where the log clamp
            # binds, at the range-reduction boundaries of exp and log1p, and +-0.
            row = torch.tensor([-110.0, -103.98, -100.0, -90.0, -87.34, -87.3, -50.0, -17.0, -1.0397,
                                -0.3466, -1e-30, -0.0, 0.0, 1e-30, 0.3466, 0.8814, 1.0397, 17.0, 50.0, 87.3,
                                87.34, 90.0, 100.0, 103.98, 110.0], dtype=torch.float64)
            logits = torch.cat([row, -row]).repeat(4, 1).to(device=device, dtype=torch.float32)
            targets = torch.tensor([0, 11, 37, 50], device=device)
            out.append(Sample((logits.requires_grad_(), targets, None), dict(gamma=2.0, reduction=reduction),
                              name=f"{reduction} float32 extreme logits", opcheck=False))
        out.append(Sample((x[:0].detach().requires_grad_(), t[:0], None), dict(reduction="sum"), name="R = 0"))
        return out

    def value_tol(self, sample):
        if sample.dtype() == torch.float64:
            return F64
        # "sum" / "mean" are float32 sums of non-negative terms computed in float32 from the
        # (exactly converted) 16-bit logits: float32's tolerance, not the inputs' dtype's.
        reduced = sample.kwargs.get("reduction", FOCAL_DEFAULTS["reduction"]) != "none"
        return TOL[torch.float32] if reduced else TOL[sample.dtype()]

    def grad_tol(self, sample):
        if "C 1100" in sample.name:
            # The weight's gradient sums C = 1100 products g * loss in float32 (their magnitudes
            # add up to ~10^3): a rounding error up to 2.1e-4 in 600 draws (2.7e-7 of that sum).
            return dict(GRAD_TOL[torch.float32], atol=2e-3)
        return F64 if sample.dtype() == torch.float64 else GRAD_TOL[sample.dtype()]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("use_weight", [False, True])
def test_matches_reference(device, dtype, reduction, use_weight):
    logits, targets, weight = inputs(37, 6, device, dtype)
    w = weight.to(dtype) if use_weight else None
    if dtype != torch.float64 and reduction != "none":
        # A float32 sum of 222 non-negative terms computed in float32 (16-bit logits convert exactly).
        y, _ = compare(logits, targets, w, reduction, value_tol=TOL[torch.float32])
    else:
        compare(logits, targets, w, reduction)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("gamma,alpha", [(0.0, 0.25), (2.0, 0.25), (1.0, 0.5), (1.5, 0.75), (2.0, 0.0), (0.5, 1.0)])
def test_gamma_alpha(device, gamma, alpha):
    logits, targets, weight = inputs(29, 5, device)
    for reduction in REDUCTIONS:
        compare(logits, targets, weight, reduction, gamma=gamma, alpha=alpha)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_extreme_logits_are_finite(device, dtype):
    """Logits of +-100 and +-1000 (past the log(FLT_MIN) clamp) against the reference; +-inf finite too."""
    C = 4
    vals = torch.tensor([100.0, -100.0, 1000.0, -1000.0, 87.0, -87.0, 88.0, -88.0, 30.0, -30.0, 0.0, 17.0],
                        dtype=torch.float64)
    logits = vals[:, None].repeat(1, C).to(dtype).to(device)
    logits[:, 1] = -logits[:, 1]
    R = logits.shape[0]
    targets = torch.tensor([i % (C + 1) for i in range(R)], device=device)
    weight = torch.rand(R, dtype=torch.float64, device=device) + 0.5
    for gamma in (0.0, 2.0):
        for reduction in REDUCTIONS:
            y, grads = compare(logits, targets, weight.to(dtype), reduction, gamma=gamma)
            assert torch.isfinite(y).all() and all(torch.isfinite(g).all() for g in grads)
    # The clamp: a confidently wrong positive costs alpha * 87.34 (mmcv), and keeps its gradient -alpha.
    x = torch.tensor([[-1000.0]], dtype=dtype, device=device, requires_grad=True)
    y = OP(x, torch.tensor([0], device=device), gamma=2.0, alpha=0.25, reduction="sum")
    assert abs(float(y.detach()) - 0.25 * 87.336544750553102) < 1e-4
    (gx,) = torch.autograd.grad(y, x)
    assert float(gx) == pytest.approx(-0.25)
    # Infinite logits: finite loss and gradient.
    x = torch.tensor([[float("inf"), float("-inf")], [float("-inf"), float("inf")]], dtype=dtype,
                     device=device, requires_grad=True)
    t = torch.tensor([0, 0], device=device)
    for reduction in REDUCTIONS:
        y = OP(x, t, reduction=reduction)
        (gx,) = torch.autograd.grad(y.sum(), x)
        assert torch.isfinite(y).all() and torch.isfinite(gx).all()
        # The reference gives the same values (the clamp, not inf - inf = NaN).
        want = ref.sigmoid_focal_loss(x.detach().double(), t, reduction=reduction)
        torch.testing.assert_close(y.detach().double(), want.to(y.device), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("device", DEVICES)
def test_all_background_and_single_class(device):
    logits, _, weight = inputs(23, 5, device)
    targets = torch.full((23,), 5, device=device)
    for reduction in REDUCTIONS:
        compare(logits, targets, weight, reduction)
    logits, targets, weight = inputs(31, 1, device)  # C = 1: targets 0 (foreground) or 1 (background)
    assert set(targets.tolist()) <= {0, 1}
    for reduction in REDUCTIONS:
        compare(logits, targets, weight, reduction)
        compare(logits, targets, None, reduction)


@pytest.mark.parametrize("device", DEVICES)
def test_empty(device):
    for R, C in ((0, 5), (0, 1), (4, 0), (0, 0)):
        x = torch.randn(R, C, dtype=torch.float64, device=device, requires_grad=True)
        t = torch.full((R,), C, dtype=torch.long, device=device)
        w = torch.rand(R, dtype=torch.float64, device=device, requires_grad=True)
        y = OP(x, t, w, reduction="none")
        assert y.shape == (R, C)
        y = OP(x, t, w, reduction="sum")
        assert y.shape == () and float(y.detach()) == 0.0
        gx, gw = torch.autograd.grad(y, (x, w))
        assert gx.shape == (R, C) and gw.shape == (R,) and (gw == 0).all()
        # mean over zero elements is NaN, as torch.mean (and torchvision's focal loss)
        assert math.isnan(float(OP(x, t, w, reduction="mean").detach()))
        assert math.isnan(float(ref.sigmoid_focal_loss(x, t, w, reduction="mean").detach()))


@pytest.mark.parametrize("device", DEVICES)
def test_large_deterministic(device):
    """More elements than one thread block and one CPU chunk; repeated runs are bitwise equal."""
    logits, targets, weight = inputs(1500, 81, device, torch.float32)
    compare(logits, targets, weight.float(), "sum", value_tol=dict(rtol=1e-4, atol=1e-4))
    compare(logits, targets, None, "mean", value_tol=dict(rtol=1e-4, atol=1e-6))
    a = OP(logits, targets, weight)
    b = OP(logits, targets, weight)
    assert torch.equal(a, b)
    if device == "cpu":
        c = run_single_threaded(lambda: OP(logits, targets, weight))
        assert torch.equal(a, c)


@pytest.mark.parametrize("device", DEVICES)
def test_weight_dtypes(device):
    """weight in another floating dtype than logits: read in the accumulation dtype; its gradient in its own dtype."""
    logits, targets, weight = inputs(19, 4, device, torch.float32)
    for wd in (torch.float64, torch.float16, torch.bfloat16):
        w = weight.to(wd).requires_grad_()
        x = logits.detach().requires_grad_()
        y = OP(x, targets, w, reduction="sum")
        gx, gw = torch.autograd.grad(y, (x, w))
        assert gw.dtype == wd and gx.dtype == torch.float32
        y_ref = ref.sigmoid_focal_loss(logits.double(), targets, w.detach().float().double(), reduction="sum")
        torch.testing.assert_close(y.double(), y_ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("device", DEVICES)
def test_non_contiguous(device):
    logits, targets, weight = inputs(26, 7, device)
    wide = torch.randn(7, 26 * 2, dtype=torch.float64, device=device)
    wide[:, ::2] = logits.t()
    x_nc = wide[:, ::2].t()  # column-major and strided
    t_wide = torch.full((52,), 7, device=device)
    t_wide[::2] = targets
    t_nc = t_wide[::2]
    w_nc = torch.stack([weight, weight], 1)[:, 0]
    assert not x_nc.is_contiguous() and not t_nc.is_contiguous() and not w_nc.is_contiguous()
    for reduction in REDUCTIONS:
        compare(x_nc, t_nc, w_nc, reduction)
        assert torch.equal(OP(x_nc, t_nc, w_nc, reduction=reduction), OP(logits, targets, weight, reduction=reduction))
    # A non-contiguous incoming gradient for "none".
    x = logits.clone().requires_grad_()
    y = OP(x, targets, weight, reduction="none")
    g = torch.randn(7, 26, dtype=torch.float64, device=device).t()
    (gx,) = torch.autograd.grad(y, x, g)
    x2 = logits.clone().requires_grad_()
    (gx2,) = torch.autograd.grad(ref.sigmoid_focal_loss(x2, targets, weight, reduction="none"), x2, g)
    torch.testing.assert_close(gx, gx2, **F64)


@pytest.mark.parametrize("device", DEVICES)
def test_nan_propagates(device):
    logits, targets, weight = inputs(10, 3, device)
    logits[2, 1] = float("nan")
    y = OP(logits, targets, weight, reduction="none")
    assert torch.isnan(y[2, 1]) and torch.isfinite(y[torch.arange(10) != 2]).all()
    assert torch.isnan(OP(logits, targets, weight, reduction="sum"))
    x = logits.clone().requires_grad_()
    (gx,) = torch.autograd.grad(OP(x, targets, weight, reduction="sum"), x)
    assert torch.isnan(gx[2, 1]) and torch.isfinite(gx[torch.arange(10) != 2]).all()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("weight_dtype", [torch.float64, torch.float32])
def test_autocast_promotes_mixed_dtypes(device, reduction, weight_dtype):
    """Under autocast, fp16 logits and a float64 weight run in float64 (the promote policy of every
    op); the per-element loss comes back in the dtype of the logits. With a float32 weight (mixed
    precision training) the logits are not copied to float32: the same values and gradients, bit for
    bit, as computed from float32 logits."""
    logits, targets, weight = inputs(12, 4, device, torch.float16)
    weight = weight.to(weight_dtype)
    x = logits.requires_grad_()
    copies = []

    class Copies(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func in (torch.ops.aten._to_copy.default, torch.ops.aten.to.dtype) and args[0].shape == x.shape:
                copies.append(func)
            return func(*args, **(kwargs or {}))

    with torch.autocast(device_type=device, dtype=torch.float16), Copies():
        y = OP(x, targets, weight, reduction=reduction)
    wide = torch.float64 if weight_dtype == torch.float64 else torch.float32
    x_wide = logits.detach().to(wide).requires_grad_()
    want = OP(x_wide, targets, weight, reduction=reduction)
    assert y.dtype == (torch.float16 if reduction == "none" else wide)
    torch.testing.assert_close(y, want.to(y.dtype), rtol=0, atol=0)
    g = torch.randn_like(y)
    (gx,) = torch.autograd.grad(y, x, g)
    (gw,) = torch.autograd.grad(want, x_wide, g.to(want.dtype))
    assert gx.dtype == torch.float16 and torch.isfinite(gx).all()
    if weight_dtype == torch.float32:
        assert not copies, copies  # the [R, C] logits stay 16-bit
        torch.testing.assert_close(gx, gw.to(gx.dtype), rtol=0, atol=0)


@pytest.mark.parametrize("device", DEVICES)
def test_target_outside_the_classes(device, request):
    logits, targets, weight = inputs(12, 4, device)
    for bad in (5, -1):
        t = targets.clone()
        t[3] = bad
        if request.node.get_closest_marker("cuda_emu") is None and device == "cpu":
            with pytest.raises(ValueError, match="targets"):
                OP(logits, t, weight)
            x = logits.clone().requires_grad_()
            y = OP(x, targets, weight)  # a valid forward, then a bad backward call
            with pytest.raises(ValueError, match="targets"):
                torch.ops.tbd_ops._sigmoid_focal_loss_backward(y.detach(), logits, t, weight, 2.0, 0.25, "sum",
                                                               [True, False])
            continue
        # CUDA: no host check; the row of the bad target is NaN, the others are exact; nothing read out of bounds.
        x = logits.clone().requires_grad_()
        y = OP(x, t, weight, reduction="none")
        assert torch.isnan(y[3]).all()
        keep = torch.arange(12, device=device) != 3
        torch.testing.assert_close(y[keep], ref.sigmoid_focal_loss(logits[keep], t[keep], weight[keep], reduction="none"),
                                   **F64)
        assert torch.isnan(OP(logits, t, weight, reduction="sum"))
        (gx,) = torch.autograd.grad(OP(x, t, weight, reduction="sum"), x)
        assert torch.isnan(gx[3]).all() and torch.isfinite(gx[keep]).all()


class TestBadInput:
    def call(self, **change):
        logits, targets, weight = inputs(6, 3, "cpu")
        kw = dict(logits=logits, targets=targets, weight=weight)
        kw.update(change)
        return OP(**kw)

    @pytest.mark.parametrize("kw,match", [
        (dict(reduction="avg"), "reduction"), (dict(reduction=None), "reduction"),
        (dict(gamma=-1.0), "gamma"), (dict(gamma=float("nan")), "gamma"), (dict(gamma=float("inf")), "gamma"),
        (dict(alpha=-0.1), "alpha"), (dict(alpha=1.5), "alpha"), (dict(alpha=float("nan")), "alpha"),
    ])
    def test_parameters(self, kw, match):
        with pytest.raises(ValueError, match=match):
            self.call(**kw)

    def test_op_reduction(self):
        logits, targets, weight = inputs(6, 3, "cpu")
        with pytest.raises(ValueError, match="reduction"):
            torch.ops.tbd_ops.sigmoid_focal_loss(logits, targets, weight, 2.0, 0.25, "avg")

    def test_shapes(self):
        with pytest.raises(ValueError, match="logits"):
            self.call(logits=torch.randn(6, 3, 1, dtype=torch.float64))
        with pytest.raises(ValueError, match="targets"):
            self.call(targets=torch.zeros(5, dtype=torch.long))
        with pytest.raises(ValueError, match="targets"):
            self.call(targets=torch.zeros(6, 1, dtype=torch.long))
        with pytest.raises(ValueError, match="weight"):
            self.call(weight=torch.ones(6, 3, dtype=torch.float64))
        with pytest.raises(ValueError, match="weight"):
            self.call(weight=torch.ones(5, dtype=torch.float64))

    def test_dtypes(self):
        with pytest.raises(TypeError, match="logits"):
            self.call(logits=torch.zeros(6, 3, dtype=torch.long))
        with pytest.raises(TypeError, match="targets"):
            self.call(targets=torch.zeros(6, dtype=torch.int32))
        with pytest.raises(TypeError, match="weight"):
            self.call(weight=torch.ones(6, dtype=torch.long))
        with pytest.raises(TypeError, match="logits"):
            self.call(logits=[[0.0] * 3] * 6)

    @requires_cuda
    def test_device(self):
        with pytest.raises(ValueError, match="targets"):
            self.call(logits=torch.randn(6, 3, device="cuda"))

    def test_backward_op_grad(self):
        logits, targets, weight = inputs(6, 3, "cpu")
        bk = torch.ops.tbd_ops._sigmoid_focal_loss_backward
        with pytest.raises(ValueError, match="grad"):
            bk(torch.ones(6, 2, dtype=torch.float64), logits, targets, weight, 2.0, 0.25, "none", [True, True])
        with pytest.raises(ValueError, match="grad"):
            bk(torch.ones(6, 3, dtype=torch.float64), logits, targets, weight, 2.0, 0.25, "sum", [True, True])
        with pytest.raises(TypeError, match="grad"):
            bk(torch.ones((), dtype=torch.float32), logits, targets, weight, 2.0, 0.25, "sum", [True, True])


# ---- the emulated CUDA build against the CPU kernels: per-element results bit for bit ----------

@requires_emu
@pytest.mark.emulated
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_emulated_matches_cpu_bitwise(dtype, reduction):
    logits, targets, weight = inputs(300, 7, "cpu", dtype)
    logits[0, :4] = torch.tensor([100.0, -100.0, 1000.0, -1000.0]).to(dtype)
    w = weight.to(dtype)
    R, C = logits.shape
    acc = acc_dtype(dtype)
    grad = torch.randn(R, C).to(dtype) if reduction == "none" else torch.randn(()).to(acc)
    for gamma in (0.0, 2.0, 1.5):
        args = (logits, targets, w, gamma, 0.25, reduction)
        cpu_out = torch.ops.tbd_ops.sigmoid_focal_loss(*args)
        cpu_bw = torch.ops.tbd_ops._sigmoid_focal_loss_backward(grad, *args, [True, True])
        out, bw = all_schedules(lambda: (torch.ops.tbd_ops_emu.sigmoid_focal_loss(*args),
                                         torch.ops.tbd_ops_emu._sigmoid_focal_loss_backward(grad, *args, [True, True])),
                                seed=7)
        if reduction == "none":
            assert_bitwise(out, cpu_out, "loss")
        else:  # a different summation order
            torch.testing.assert_close(out, cpu_out, rtol=1e-5 if acc == torch.float32 else 1e-12, atol=1e-6)
        for a, b in zip(bw, cpu_bw):
            assert_bitwise(a, b, "gradient")


@requires_emu
@pytest.mark.emulated
def test_emulated_sum_over_more_elements_than_the_grid():
    """"sum"/"mean" take at most 1024 blocks of 256 threads: with 3001 x 91 strided logits each
    thread steps several times through rows and columns (the walk wraps a row between steps)."""
    dense, targets, weight = inputs(3001, 91, "cpu", torch.float64)
    logits = torch.full((3001, 91 * 2), float("nan"), dtype=torch.float64)[:, ::2]  # column stride 2
    logits.copy_(dense)
    assert logits.numel() > 1024 * 256
    w = weight
    for reduction in ("sum", "mean"):
        want = ref.sigmoid_focal_loss(logits, targets, w, reduction=reduction)
        got = all_schedules(lambda: torch.ops.tbd_ops_emu.sigmoid_focal_loss(logits, targets, w, 2.0, 0.25,
                                                                            reduction), seed=3)
        torch.testing.assert_close(got, want, rtol=1e-12, atol=0)


@requires_cuda
def test_no_host_synchronization():
    logits, targets, weight = inputs(300, 9, "cuda", torch.float32)
    x = logits.requires_grad_()

    def step():
        y = OP(x, targets, weight.float(), reduction="mean")
        return y, torch.autograd.grad(y, x)

    y, (gx,) = run_without_host_sync(step)
    torch.testing.assert_close(y.double(), ref.sigmoid_focal_loss(logits.double(), targets, weight, reduction="mean"),
                               rtol=1e-5, atol=1e-7)
