"""masked_sq_dist / masked_l1 (the masked_reduce family): kernels vs tbd_ops.reference."""
import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st
from torch.library import opcheck

import tbd_ops
from tbd_ops import reference as ref
from op_testing import (DEVICES, RED_TOL, TOL, OpContract, Sample, acc_dtype, all_schedules, assert_bitwise,
                        bitwise_equal, emu_dispatch, requires_cuda, requires_emu, run_single_threaded, strided)

OPS = ["masked_sq_dist", "masked_l1"]
# N, C, H, W: odd sizes, C = 1, H*W across the 256-thread block and the
# 4/2/8-element vector groups, several partial blocks per image.
SHAPES = [(2, 3, 17, 19), (1, 1, 5, 7), (3, 4, 1, 1), (2, 5, 16, 16), (1, 2, 1, 257)]


def rand(shape, device, dtype=torch.float64, scale=1.0):
    return (torch.randn(shape, device=device, dtype=torch.float64) * scale).to(dtype)


def masks_for(n, k, h, w, device, dtype=torch.float64):
    return torch.rand(n, k, h, w, device=device, dtype=torch.float64).to(dtype)


def fn(op, impl):
    return getattr(impl, op)


def value_and_grads(f, a, b, m, g):
    ins = [t.detach().clone().requires_grad_() for t in (a, b, m)]
    y = f(*ins)
    grads = torch.autograd.grad(y, ins, g)
    return y, grads


def compare(op, a, b, m, value_tol, grad_tol, g=None):
    """Ours vs the reference on the same inputs (the reference runs in float64)."""
    y, grads = value_and_grads(fn(op, tbd_ops), a, b, m, None if g is None else g)
    assert y.shape == (a.shape[0], m.shape[1])
    assert y.dtype == (torch.float64 if a.dtype == torch.float64 else torch.float32)
    if g is None:
        g = torch.ones_like(y)
    y_ref, grads_ref = value_and_grads(fn(op, ref), a.double(), b.double(), m.double(), g.double())
    torch.testing.assert_close(y.double(), y_ref, **value_tol)
    for got, want, inp in zip(grads, grads_ref, (a, b, m)):
        assert got.dtype == inp.dtype and got.shape == inp.shape
        torch.testing.assert_close(got.double(), want, **grad_tol)
    return y, grads


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("K", [1, 2, 3])
def test_float64_matches_reference(device, op, shape, K):
    n, c, h, w = shape
    a, b = rand(shape, device), rand(shape, device)
    m = masks_for(n, K, h, w, device)
    g = rand((n, K), device)
    compare(op, a, b, m, dict(rtol=1e-10, atol=1e-12), dict(rtol=1e-10, atol=1e-12), g)


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_float64_gradients_of_several_mib_match_reference(op, layout):
    """Gradients of several MiB, over work items of 4096 locations with a partial last one: the
    reference's values."""
    n, c, h, w = 2, 16, 100, 90  # 11.5 MiB per gradient, 9000 locations per image
    a, b = rand((n, c, h, w), "cpu"), rand((n, c, h, w), "cpu")
    if layout == "channels_last":
        a, b = (t.to(memory_format=torch.channels_last) for t in (a, b))
    m = masks_for(n, 2, h, w, "cpu")
    compare(op, a, b, m, dict(rtol=1e-10, atol=1e-10), dict(rtol=1e-10, atol=1e-12), rand((n, 2), "cpu"))


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("wanted", ["a and b", "b", "a and b, other strides"])
def test_float32_streamed_gradients_are_the_formula_bit_for_bit(op, wanted):
    """Gradients of twice the 16 MiB (both counted) from which the float32 CPU backward writes them
    with streaming stores, in an aligned middle with plain stores before and after it: term'(a - b)
    * (g * m) element by element, as eager torch computes it, with one mask (w = 0 + g * m is
    exact), for TFD's gradient of b alone too. H*W = 45149 is 1 mod 4, so the rows start at every
    offset from an aligned address; with a laid out [C, N, H, W] its gradient's rows and b's start at
    different offsets in most rows (plain stores there); a - b = 0 at every 7th element (sign(0))."""
    n, c, h, w = 2, 96, 151, 299  # 34.7 MB per tensor
    a, b = (rand((n, c, h, w), "cpu", torch.float32) for _ in range(2))
    if wanted.endswith("other strides"):
        a = a.transpose(0, 1).contiguous().transpose(0, 1)
    b.view(-1)[::7] = a.reshape(-1)[::7]  # b is contiguous: the same logical elements
    m = masks_for(n, 1, h, w, "cpu", torch.float32)
    g = rand((n, 1), "cpu", torch.float32)
    leaves = [a.requires_grad_(wanted != "b"), b.requires_grad_()]
    got = torch.autograd.grad(fn(op, tbd_ops)(a, b, m), [t for t in leaves if t.requires_grad], g)
    d = a.detach() - b.detach()
    term_grad = 2 * d if op == "masked_sq_dist" else torch.sign(d)
    want_a = term_grad * (g[:, :, None, None] * m)
    assert_bitwise(got[-1], -want_a)
    if wanted != "b":
        assert got[0].stride() == a.stride()
        assert_bitwise(got[0], want_a)


class MaskedContract(OpContract):
    """The test contract (op_testing.OpContract) of masked_sq_dist and masked_l1."""
    reduction_outputs = [0]  # out[n, k]: a sum over H*W in another order on each side

    def samples(self, device):
        def ab(shape, dtype=torch.float64, grad=True):
            return [rand(shape, device, dtype).requires_grad_(grad) for _ in range(2)]

        def m(n, k, h, w, dtype=torch.float64, grad=True):
            return masks_for(n, k, h, w, device, dtype).requires_grad_(grad)

        cl = torch.channels_last
        a, b = ab((2, 3, 4, 5))
        return [
            Sample((a, b, m(2, 2, 4, 5)), name="float64", gradcheck=True),
            Sample((a, b.detach(), m(2, 2, 4, 5, grad=False)), name="grad of a only", gradcheck=True),
            Sample((a.detach(), b.detach(), m(2, 2, 4, 5)), name="grad of masks only", gradcheck=True),
            Sample((*ab((2, 3, 5, 7), torch.float32), m(2, 2, 5, 7, torch.float32)), name="float32"),
            Sample((*[t.detach().contiguous(memory_format=cl).requires_grad_() for t in ab((1, 6, 4, 3), torch.float32)],
                    m(1, 2, 4, 3, torch.float32)), name="channels_last"),
            Sample((*ab((3, 2, 4, 5), torch.float16), m(3, 1, 4, 5, torch.float16, grad=False)), name="float16"),
            Sample((*ab((2, 4, 3, 3), torch.bfloat16), m(2, 2, 3, 3, torch.bfloat16)), name="bfloat16"),
            Sample((*ab((2, 4, 3, 3)), masks_for(2, 1, 3, 3, device).expand(2, 3, 3, 3)), name="expanded masks"),
            # Strided a, b and masks over more than one CPU chunk (512 locations) and
            # several CUDA blocks (256): 23 x 29 = 667 locations.
            Sample((strided(rand((2, 3, 23, 29), device)).requires_grad_(),
                    strided(rand((2, 3, 23, 29), device), "channels_last").requires_grad_(),
                    strided(masks_for(2, 2, 23, 29, device)).requires_grad_()), name="strided across chunks", opcheck=False),
            Sample((*ab((0, 4, 3, 3), torch.float32), m(0, 2, 3, 3, torch.float32)), name="N = 0"),
            Sample((*ab((2, 4, 0, 3), torch.float32), m(2, 2, 0, 3, torch.float32)), name="H = 0"),
        ]

    def value_tol(self, sample):  # the output is float32 for every 16/32-bit input
        return TOL[acc_dtype(sample.dtype())]

    def grad_tol(self, sample):
        return TOL[sample.dtype()]


class TestContractSqDist(MaskedContract):
    op = staticmethod(tbd_ops.masked_sq_dist)
    reference = staticmethod(ref.masked_sq_dist)


class TestContractL1(MaskedContract):
    op = staticmethod(tbd_ops.masked_l1)
    reference = staticmethod(ref.masked_l1)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("layout", ["channels_last", "channel_slice", "transposed_hw", "padded_rows",
                                    "masks_expanded_k", "masks_expanded_n", "mixed", "misaligned"])
def test_non_contiguous(device, op, layout):
    n, c, h, w, k = 2, 5, 7, 9, 3
    a, b = rand((n, c, h, w), device), rand((n, c, h, w), device)
    m = masks_for(n, k, h, w, device)
    if layout == "channels_last":
        a, b, m = (t.contiguous(memory_format=torch.channels_last) for t in (a, b, m))
    elif layout == "channel_slice":
        a, b = rand((n, 2 * c, h, w), device)[:, ::2], rand((n, 2 * c, h, w), device)[:, 1::2]
        m = masks_for(n, 2 * k, h, w, device)[:, k:]
    elif layout == "transposed_hw":
        a, b = (rand((n, c, w, h), device).transpose(2, 3) for _ in range(2))
        m = masks_for(n, k, w, h, device).transpose(2, 3)
    elif layout == "padded_rows":
        a, b = (rand((n, c, h, w + 3), device)[..., :w] for _ in range(2))
        m = masks_for(n, k, h, w + 1, device)[..., 1:]
    elif layout == "masks_expanded_k":
        m = masks_for(n, 1, h, w, device).expand(n, k, h, w)  # one mask, K views (stride 0)
    elif layout == "masks_expanded_n":
        m = masks_for(1, k, h, w, device).expand(n, k, h, w)
    elif layout == "mixed":
        a = a.contiguous(memory_format=torch.channels_last)
        m = masks_for(n, k, 1, w, device).expand(n, k, h, w)
    else:  # plane starts off the 16-byte boundary of the vector loads
        a = rand((n * c * h * w + 1,), device)[1:].view(n, c, h, w)
    g = rand((n, k), device)
    compare(op, a, b, m, dict(rtol=1e-10, atol=1e-12), dict(rtol=1e-10, atol=1e-12), g)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("shape,k", [((0, 3, 4, 5), 2), ((2, 3, 0, 5), 2), ((2, 3, 4, 0), 1),
                                     ((2, 0, 4, 5), 2), ((2, 3, 4, 5), 0)])
def test_empty(device, op, shape, k):
    n, c, h, w = shape
    a, b = rand(shape, device).requires_grad_(), rand(shape, device).requires_grad_()
    m = masks_for(n, k, h, w, device).requires_grad_()
    y = fn(op, tbd_ops)(a, b, m)
    assert y.shape == (n, k)
    torch.testing.assert_close(y, fn(op, ref)(a, b, m), rtol=0, atol=0)  # zeros where H*W or C = 0
    (y * 2).sum().backward()
    for t in (a, b, m):
        assert t.grad.shape == t.shape
    # Nothing to sum over: every gradient element is 0.
    assert not a.grad.any() and not b.grad.any() and not m.grad.any()


@pytest.mark.parametrize("device", DEVICES)
def test_l1_gradient_at_equal_inputs_is_zero(device):
    a = rand((2, 3, 4, 5), device)
    b = a.clone()
    b[:, 1] += 0.5  # channel 1 differs, the others are equal
    m = masks_for(2, 2, 4, 5, device)
    _, (ga, gb, _) = value_and_grads(tbd_ops.masked_l1, a, b, m, torch.ones(2, 2, dtype=torch.float64, device=device))
    assert ga[:, [0, 2]].abs().max().item() == 0.0 and gb[:, [0, 2]].abs().max().item() == 0.0
    torch.testing.assert_close(ga[:, 1], -m.sum(1))
    torch.testing.assert_close(gb, -ga, rtol=0, atol=0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("op", OPS)
def test_nan_propagates(device, op):
    a, b = rand((3, 2, 4, 5), device), rand((3, 2, 4, 5), device)
    m = masks_for(3, 2, 4, 5, device)
    a[0, 1, 2, 3] = float("nan")
    m[1, 1, 0, 0] = float("nan")
    a, m = a.requires_grad_(), m.requires_grad_()
    y = fn(op, tbd_ops)(a, b, m)
    y_ref = fn(op, ref)(a, b, m)
    assert torch.isnan(y[0]).all() and torch.isnan(y[1, 1]) and not torch.isnan(y[1, 0])
    assert torch.isfinite(y[2]).all()
    torch.testing.assert_close(y, y_ref, rtol=1e-10, atol=1e-12, equal_nan=True)
    ga, gm = torch.autograd.grad(y.sum(), (a, m))
    ga_ref, gm_ref = torch.autograd.grad(y_ref.sum(), (a, m))
    torch.testing.assert_close(ga, ga_ref, rtol=1e-10, atol=1e-12, equal_nan=True)
    torch.testing.assert_close(gm, gm_ref, rtol=1e-10, atol=1e-12, equal_nan=True)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("op", OPS)
def test_deterministic(device, op):
    shape = (2, 16, 37, 41) if device == "cpu" else (2, 3, 23, 29)
    a, b = rand(shape, device, torch.float32), rand(shape, device, torch.float32)
    m = masks_for(shape[0], 2, shape[2], shape[3], device, torch.float32)
    g = rand((shape[0], 2), device, torch.float32)

    def run():
        return value_and_grads(fn(op, tbd_ops), a, b, m, g)

    y1, g1 = run()
    y2, g2 = run_single_threaded(run)
    assert torch.equal(y1, y2) and all(torch.equal(x, z) for x, z in zip(g1, g2))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("op", OPS)
def test_list_of_levels(device, op):
    shapes = [(2, 4, 8, 10), (2, 4, 4, 5), (2, 4, 2, 3)]
    a = [rand(s, device) for s in shapes]
    b = [rand(s, device) for s in shapes]
    m = [masks_for(2, 2, s[2], s[3], device) for s in shapes]
    out = fn(op, tbd_ops)(a, b, m)
    assert isinstance(out, list) and len(out) == 3
    for y, y_ref in zip(out, fn(op, ref)(a, b, m)):
        torch.testing.assert_close(y, y_ref, rtol=1e-10, atol=1e-12)
    assert len(fn(op, tbd_ops)(tuple(a), tuple(b), tuple(m))) == 3


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("op", OPS)
def test_autocast_promotes_mixed_dtypes(device, op):
    a = rand((2, 3, 4, 5), device, torch.float32)
    b = rand((2, 3, 4, 5), device, torch.bfloat16)
    m = masks_for(2, 2, 4, 5, device, torch.float16)
    with torch.autocast(device_type=device, dtype=torch.bfloat16):
        y = fn(op, tbd_ops)(a, b, m)
    assert y.dtype == torch.float32
    torch.testing.assert_close(y, fn(op, ref)(a, b.float(), m.float()), **TOL[torch.float32])


class TestBadInput:
    @pytest.mark.parametrize("op", OPS)
    def test_rank(self, op):
        f = fn(op, tbd_ops)
        x = torch.randn(2, 3, 4, 5)
        m = torch.rand(2, 1, 4, 5)
        with pytest.raises(ValueError, match=r"a must be a 4-D tensor \[N, C, H, W\], got a 3-D"):
            f(x[0], x, m)
        with pytest.raises(ValueError, match=r"b must be a 4-D tensor \[N, C, H, W\], got a 5-D"):
            f(x, x[None], m)
        with pytest.raises(ValueError, match=r"masks must be a 4-D tensor \[N, K, H, W\], got a 3-D"):
            f(x, x, m[:, 0])

    @pytest.mark.parametrize("op", OPS)
    def test_shapes(self, op):
        f = fn(op, tbd_ops)
        x = torch.randn(2, 3, 4, 5)
        with pytest.raises(ValueError, match=r"b must have the shape of a \[2, 3, 4, 5\], got \[2, 2, 4, 5\]"):
            f(x, x[:, :2], torch.rand(2, 1, 4, 5))
        for bad in [(1, 1, 4, 5), (2, 1, 4, 6), (2, 1, 3, 5)]:
            with pytest.raises(ValueError, match=r"masks must be \[N, K, H, W\] = \[2, K, 4, 5\]"):
                f(x, x, torch.rand(bad))

    @pytest.mark.parametrize("op", OPS)
    def test_dtypes(self, op):
        f = fn(op, tbd_ops)
        x = torch.randn(2, 3, 4, 5)
        with pytest.raises(TypeError, match="a must be float32, float64, float16 or bfloat16, got Long"):
            f(x.long(), x, torch.rand(2, 1, 4, 5))
        with pytest.raises(TypeError, match=r"b must have the dtype of a \(Float\), got Double"):
            f(x, x.double(), torch.rand(2, 1, 4, 5))
        with pytest.raises(TypeError, match=r"masks must have the dtype of a \(Float\), got Half"):
            f(x, x, torch.rand(2, 1, 4, 5).half())
        with pytest.raises(TypeError, match="masks must be float32, float64, float16 or bfloat16, got Bool"):
            f(x, x, torch.ones(2, 1, 4, 5, dtype=torch.bool))

    @pytest.mark.parametrize("op", OPS)
    def test_lists(self, op):
        f = fn(op, tbd_ops)
        x = torch.randn(2, 3, 4, 5)
        m = torch.rand(2, 1, 4, 5)
        with pytest.raises(ValueError, match="a, b and masks must have one entry per level, got 2, 2 and 1"):
            f([x, x], [x, x], [m])
        with pytest.raises(TypeError, match="masks is a Tensor"):
            f([x], [x], m)
        with pytest.raises(TypeError, match="b must be a torch.Tensor, got float"):
            f(x, 1.0, m)

    @pytest.mark.parametrize("op", OPS)
    def test_backward_op(self, op):
        bwd = getattr(torch.ops.tbd_ops, f"_{op}_backward")
        x = torch.randn(2, 3, 4, 5)
        m = torch.rand(2, 2, 4, 5)
        with pytest.raises(ValueError, match=r"grad must be \[N, K\] = \[2, 2\], got \[2, 3\]"):
            bwd(torch.randn(2, 3), x, x, m, [True, True, True])
        with pytest.raises(TypeError, match="grad must be Float, got Half"):
            bwd(torch.randn(2, 2).half(), x, x, m, [True, True, True])

    @requires_cuda
    @pytest.mark.parametrize("op", OPS)
    def test_device_mismatch(self, op):
        x = torch.randn(2, 3, 4, 5, device="cuda")
        m = torch.rand(2, 1, 4, 5, device="cuda")
        with pytest.raises((ValueError, RuntimeError), match="device"):
            fn(op, tbd_ops)(x, x.cpu(), m)
        with pytest.raises((ValueError, RuntimeError), match="device"):
            fn(op, tbd_ops)(x, x, m.cpu())


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("op", OPS)
def test_fake_kernels_match_real_strides(op, channels_last):
    """opcheck compares fake strides only on CUDA tensors: check them on CPU too."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    fwd = getattr(torch.ops.tbd_ops, op)
    bwd = getattr(torch.ops.tbd_ops, f"_{op}_backward")
    a, b = rand((2, 5, 4, 6), "cpu", torch.float32), rand((2, 5, 4, 6), "cpu", torch.float32)
    m = masks_for(1, 1, 4, 6, "cpu", torch.float32).expand(2, 3, 4, 6)
    if channels_last:
        a = a.contiguous(memory_format=torch.channels_last)
    grad = torch.randn(2, 3)
    real = [fwd(a, b, m), *bwd(grad, a, b, m, [True, True, True]), *bwd(grad, a, b, m, [False, True, False])]
    with FakeTensorMode() as mode:
        fa, fb, fm, fg = (mode.from_tensor(t) for t in (a, b, m, grad))
        fake = [fwd(fa, fb, fm), *bwd(fg, fa, fb, fm, [True, True, True]), *bwd(fg, fa, fb, fm, [False, True, False])]
    for r, f in zip(real, fake):
        assert (r.shape, r.dtype, r.stride()) == (f.shape, f.dtype, f.stride())


@requires_cuda
@pytest.mark.parametrize("op", OPS)
def test_cuda_matches_cpu_and_graph_capture(op):
    a, b = rand((2, 256, 50, 76), "cpu", torch.float32), rand((2, 256, 50, 76), "cpu", torch.float32)
    m = masks_for(2, 2, 50, 76, "cpu", torch.float32)
    f = fn(op, tbd_ops)
    y_cpu = f(a, b, m)
    ac, bc, mc = a.cuda(), b.cuda(), m.cuda()
    torch.testing.assert_close(f(ac, bc, mc).cpu(), y_cpu, rtol=1e-5, atol=1e-6)
    f(ac, bc, mc)  # warm-up
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_y = f(ac, bc, mc)
    ac.mul_(2)
    graph.replay()
    torch.testing.assert_close(static_y, f(ac, bc, mc))


# ---- the emulated CUDA build against the CPU kernels --------------------------

EMU_DTYPES = [torch.float64, torch.float32, torch.float16, torch.bfloat16]


def emu_inputs(N, C, K, H, W, dtype, layout):
    """a, b [N, C, H, W] and masks [N, K, H, W] for the emulator tests, in a layout: contiguous,
    channels_last, padded_rows (rows of a and b padded by 2), masks_expanded (one mask expanded to K),
    misaligned (a one element into its storage)."""
    a = rand((N, C, H, W + 2), "cpu", dtype)[..., :W]
    b = rand((N, C, H, W + 2), "cpu", dtype)[..., :W]
    m = masks_for(N, K, H, W, "cpu", dtype)
    if layout != "padded_rows":
        a, b = a.contiguous(), b.contiguous()
    if layout == "channels_last":
        a, b, m = (t.contiguous(memory_format=torch.channels_last) for t in (a, b, m))
    elif layout == "masks_expanded":
        m = m[:, :1].expand(N, K, H, W)
    elif layout == "misaligned":
        a = rand((N * C * H * W + 1,), "cpu", dtype)[1:].view(N, C, H, W)
    return a, b, m


def emu_compare(op, a, b, m):
    emu, cpu = torch.ops.tbd_ops_emu, torch.ops.tbd_ops
    y_c = getattr(cpu, op)(a, b, m)
    y_e = getattr(emu, op)(a, b, m)
    tol = RED_TOL[y_c.dtype]  # the forward is a sum in another order on each side
    torch.testing.assert_close(y_e, y_c, rtol=tol["rtol"],
                               atol=tol["rtol"] * float(y_c.abs().max()) if y_c.numel() else 0)
    g = torch.randn(y_c.shape, dtype=y_c.dtype)
    for mask in ([True, True, True], [False, False, True], [True, True, False]):
        got = getattr(emu, f"_{op}_backward")(g, a, b, m, mask)
        want = getattr(cpu, f"_{op}_backward")(g, a, b, m, mask)
        for i, (x, z) in enumerate(zip(got, want)):
            # Per-element gradients: the same shared math in the same order, bit for bit.
            assert x.stride() == z.stride()
            assert_bitwise(x, z, f"{op} backward output {i} (mask {mask})")


@requires_emu
@pytest.mark.emulated
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    seed=st.integers(0, 2**32 - 1),  # the tensors' seed: Hypothesis replays and shrinks it
    op=st.sampled_from(OPS),
    N=st.integers(1, 3),
    C=st.sampled_from([1, 2, 5]),
    K=st.integers(1, 3),
    H=st.integers(1, 19),
    W=st.sampled_from([1, 3, 8, 31, 257]),  # H*W around the vector groups and the block size
    dtype=st.sampled_from(EMU_DTYPES),
    layout=st.sampled_from(["contiguous", "channels_last", "padded_rows", "masks_expanded", "misaligned"]),
)
def test_emulated_matches_cpu_property(op, N, C, K, H, W, dtype, layout, seed):
    torch.manual_seed(seed)
    emu_compare(op, *emu_inputs(N, C, K, H, W, dtype, layout))


@requires_emu
@pytest.mark.emulated
@pytest.mark.parametrize("op", OPS)
def test_emulated_more_images_than_grid_y(op):
    """More images than grid.y allows (65535 on the GPU; 3 here): several launches per kernel."""
    try:
        assert emu_dispatch.emu.set_grid_yz_limit(3) == 3
        a, b = rand((8, 2, 5, 7), "cpu"), rand((8, 2, 5, 7), "cpu")
        a[-1], b[-1] = a[0], b[0]
        m = masks_for(8, 2, 5, 7, "cpu")
        m[-1] = m[0]
        emu_compare(op, a, b, m)
        y = getattr(torch.ops.tbd_ops_emu, op)(a, b, m)
        assert torch.equal(y[-1], y[0])
    finally:
        emu_dispatch.emu.set_grid_yz_limit(0)


# ---- lists of levels in one call; only the gradients asked for --------------------------

def pyramid_levels(device, dtype=torch.float64, n=2, c=5, k=2, shapes=((9, 11), (5, 6), (3, 3), (1, 2))):
    a = [rand((n, c, h, w), device, dtype) for h, w in shapes]
    b = [rand((n, c, h, w), device, dtype) for h, w in shapes]
    m = [masks_for(n, k, h, w, device, dtype) for h, w in shapes]
    return a, b, m


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("op", OPS)
def test_levels_match_single_calls_and_reference(device, op):
    """A list is one call; every level's value and gradients are those of the reference."""
    a, b, m = pyramid_levels(device)
    ins = [[t.detach().clone().requires_grad_() for t in lst] for lst in (a, b, m)]
    outs = getattr(tbd_ops, op)(*ins)
    total = sum((o * (i + 1)).sum() for i, o in enumerate(outs))
    grads = torch.autograd.grad(total, [t for lst in ins for t in lst])
    L = len(a)
    for l in range(L):
        y_ref, g_ref = value_and_grads(fn(op, ref), a[l], b[l], m[l], torch.full_like(outs[l], l + 1.0))
        torch.testing.assert_close(outs[l], y_ref, **TOL[torch.float64])
        for j, want in enumerate(g_ref):
            torch.testing.assert_close(grads[j * L + l], want, **TOL[torch.float64])


class _OpLog(torch.utils._python_dispatch.TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func.namespace == "tbd_ops":
            self.calls.append((func._schema.name.split("::")[1], args, out))
        return out


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("op", OPS)
def test_backward_computes_only_the_gradients_asked_for(device, op):
    """TFD's teacher side is detached: the backward is asked for the gradient of b alone and
    makes no tensor for a or the masks."""
    a, b, m = pyramid_levels(device, torch.float32)
    b = [t.requires_grad_() for t in b]
    outs = getattr(tbd_ops, op)(a, b, m)
    with _OpLog() as log:
        torch.autograd.grad(sum(o.sum() for o in outs), b)
    (name, args, (ga, gb, gm)), = [c for c in log.calls if c[0].endswith("backward")]
    assert name == f"_{op}_levels_backward"
    assert list(args[-1]) == [False, True, False] and args[-2] == []  # no term kept or passed
    assert ga == [] and gm == [] and len(gb) == len(b)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("op", OPS)
def test_mask_gradient_uses_the_forward_term(device, op):
    """The gradient of masks is grad[n, k] * term[n, hw] from the forward's per-location sums
    (a and b are not read again for it): a planted term shows in it."""
    a, b, m = pyramid_levels(device, torch.float32)
    lv = getattr(torch.ops.tbd_ops, f"_{op}_levels").default
    bw = getattr(torch.ops.tbd_ops, f"_{op}_levels_backward").default
    out, term = lv(a, b, m)
    d = [x - y for x, y in zip(a, b)]
    for t, dd in zip(term, d):  # term is sum_c term(a - b) per location
        want = (dd * dd if op == "masked_sq_dist" else dd.abs()).sum(1)
        torch.testing.assert_close(t, want, rtol=1e-5, atol=1e-6)
    grad = [torch.randn_like(o) for o in out]
    planted = [torch.rand_like(t) for t in term]
    _, _, gm = bw(grad, a, b, m, planted, [False, False, True])
    for g, t, gml in zip(grad, planted, gm):
        torch.testing.assert_close(gml, g[:, :, None, None] * t[:, None], rtol=1e-6, atol=0)


@pytest.mark.parametrize("device", DEVICES)
def test_levels_of_mixed_dtypes_fall_back_to_one_call_per_level(device):
    a, b, m = pyramid_levels(device, torch.float32)
    a[1], b[1], m[1] = a[1].double(), b[1].double(), m[1].double()
    outs = tbd_ops.masked_sq_dist(a, b, m)
    assert [o.dtype for o in outs] == [torch.float32, torch.float64, torch.float32, torch.float32]
    for o, x, y, mm in zip(outs, a, b, m):
        torch.testing.assert_close(o, tbd_ops.masked_sq_dist(x, y, mm))


class TestLevelsBadInput:
    @pytest.mark.parametrize("op", OPS)
    def test_level_dtypes_in_one_call(self, op):
        a, b, m = pyramid_levels("cpu", torch.float32)
        a[2], b[2], m[2] = a[2].double(), b[2].double(), m[2].double()
        with pytest.raises(TypeError, match=r"a\[2\] must have the dtype of a\[0\] \(Float\), got Double"):
            getattr(torch.ops.tbd_ops, f"_{op}_levels")(a, b, m)

    @pytest.mark.parametrize("op", OPS)
    def test_level_count(self, op):
        a, b, m = pyramid_levels("cpu", torch.float32)
        with pytest.raises(ValueError, match="a, b and masks must have one entry per level, got 4, 3 and 4"):
            getattr(torch.ops.tbd_ops, f"_{op}_levels")(a, b[:3], m)

    @pytest.mark.parametrize("op", OPS)
    def test_term_for_the_mask_gradient(self, op):
        a, b, m = pyramid_levels("cpu", torch.float32)
        out, term = getattr(torch.ops.tbd_ops, f"_{op}_levels")(a, b, m)
        bw = getattr(torch.ops.tbd_ops, f"_{op}_levels_backward")
        with pytest.raises(ValueError, match=r"term must have one entry per level \(4\) when the gradient of "
                                             r"masks is asked for, got 0"):
            bw(out, a, b, m, [], [False, False, True])
        with pytest.raises(ValueError, match=r"term\[1\] must be \[N, H, W\] = \[2, 5, 6\], got \[2, 5, 5\]"):
            bw(out, a, b, m, [term[0], term[1][..., :5], *term[2:]], [False, False, True])


# ---- the emulated CUDA kernels: both sides of the channel-split rule ---------------------

def emu_compare_levels(op, a, b, m):
    """The emulated levels op against the CPU's: out to rounding, the per-location term and
    every gradient bit for bit, under the three schedules."""
    emu, cpu = torch.ops.tbd_ops_emu, torch.ops.tbd_ops
    fwd = f"_{op}_levels"
    out_c, term_c = getattr(cpu, fwd)(a, b, m)
    out_e, term_e = all_schedules(lambda: tuple(getattr(emu, fwd)(a, b, m)))
    for l, (x, y) in enumerate(zip(term_e, term_c)):
        assert bitwise_equal(x, y), f"{op} term of level {l} differs"
    for x, y in zip(out_e, out_c):
        tol = RED_TOL[y.dtype]
        torch.testing.assert_close(x, y, rtol=tol["rtol"], atol=tol["rtol"] * float(y.abs().max()))
    grad = [torch.randn(o.shape, dtype=o.dtype) for o in out_c]
    for mask in ([True, True, True], [False, True, False], [True, False, False], [False, False, True]):
        args = (grad, a, b, m, term_c if mask[2] else [], mask)
        got = all_schedules(lambda: tuple(getattr(emu, f"_{op}_levels_backward")(*args)))
        want = getattr(cpu, f"_{op}_levels_backward")(*args)
        for i, (xs, zs) in enumerate(zip(got, want)):
            assert len(xs) == (len(a) if mask[i] else 0)
            for l, (x, z) in enumerate(zip(xs, zs)):
                assert bitwise_equal(x, z), f"{op} backward output {i} of level {l} (mask {mask}) differs"
    return out_e, term_e


@requires_emu
@pytest.mark.emulated
@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    seed=st.integers(0, 2**32 - 1),  # the tensors' seed: Hypothesis replays and shrinks it
    op=st.sampled_from(OPS),
    policy=st.sampled_from([1, 2]),
    C=st.sampled_from([1, 3, 8, 13, 40]),  # fewer channels than groups, a multiple, a tail
    K=st.integers(1, 2),
    shapes=st.lists(st.tuples(st.integers(1, 9), st.sampled_from([1, 5, 33, 70])), min_size=1, max_size=3),
    dtype=st.sampled_from(EMU_DTYPES),
    layout=st.sampled_from(["contiguous", "channels_last", "padded_rows"]),
)
def test_emulated_levels_match_cpu_on_both_sides_of_the_split_rule(op, policy, C, K, shapes, dtype, layout, seed):
    torch.manual_seed(seed)
    N = 2
    a, b, m = [], [], []
    for h, w in shapes:
        x, y, mm = emu_inputs(N, C, K, h, w, dtype, layout)
        a.append(x)
        b.append(y)
        m.append(mm)
    emu_dispatch.emu.set_channel_split_policy(policy)
    try:
        emu_compare_levels(op, a, b, m)
    finally:
        emu_dispatch.emu.set_channel_split_policy(0)


@requires_emu
@pytest.mark.emulated
@pytest.mark.parametrize("op", OPS)
def test_emulated_split_variants_give_the_same_terms(split_policy, op):
    """One thread per location, a warp per channel group and a lane per channel group sum each
    location's channels in the same 8 groups and tree: the same bits."""
    a, b, m = pyramid_levels("cpu", torch.float32, c=37)
    lv = getattr(torch.ops.tbd_ops_emu, f"_{op}_levels")
    split_policy(1)
    serial = lv(a, b, m)[1]
    split_policy(2)
    warps = lv(a, b, m)[1]
    lanes = lv(*[[t.contiguous(memory_format=torch.channels_last) for t in x] for x in (a, b, m)])[1]
    for s, w, c in zip(serial, warps, lanes):
        assert bitwise_equal(s, w) and bitwise_equal(s, c.contiguous())


@requires_emu
@pytest.mark.emulated
@pytest.mark.parametrize("op", OPS)
def test_emulated_more_levels_than_one_launch_takes(op):
    """Eleven levels: two launch groups of up to eight; each level as alone."""
    shapes = [(1 + l % 4, 2 + l) for l in range(11)]
    a, b, m = pyramid_levels("cpu", torch.float32, c=3, shapes=shapes)
    before = emu_dispatch.emu.launch_count()
    out, term = getattr(torch.ops.tbd_ops_emu, f"_{op}_levels")(a, b, m)
    assert emu_dispatch.emu.launch_count() - before == 2 * 2
    for l in range(len(shapes)):
        o1, t1 = getattr(torch.ops.tbd_ops_emu, f"_{op}_levels")([a[l]], [b[l]], [m[l]])
        assert bitwise_equal(term[l], t1[0])
        torch.testing.assert_close(out[l], o1[0], rtol=1e-6, atol=0)
    emu_compare_levels(op, a, b, m)


@requires_emu
@pytest.mark.emulated
@pytest.mark.parametrize("op", OPS)
def test_emulated_split_blocks_take_several_steps(split_policy, op):
    """H*W = 9000 > 256 tiles x 32 locations: each block of the split variants loops over several
    steps of 32 locations (the shared memory of one step is reused by the next)."""
    split_policy(2)
    a, b, m = pyramid_levels("cpu", torch.float32, n=1, c=2, k=1, shapes=((100, 90), (3, 4)))
    emu_compare_levels(op, a, b, m)
