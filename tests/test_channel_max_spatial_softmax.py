"""channel_max_spatial_softmax (p_c): kernels vs tbd_ops.reference."""
import pytest
import torch

import tbd_ops
from tbd_ops import reference as ref
from tbd_ops.ops.channel_max_spatial_softmax import DEFAULTS as CMSS_DEFAULTS
from hypothesis import HealthCheck, given, settings, strategies as st

from op_testing import (DEVICES, DTYPES, GRAD_TOL, RED_TOL, TOL, OpContract, Sample, all_schedules, assert_bitwise,
                        bitwise_equal,
                        emu_dispatch,
                        requires_cuda, requires_emu, run_single_threaded, strided)

OP = torch.ops.tbd_ops.channel_max_spatial_softmax.default
SHAPES = [(2, 7, 5, 9), (3, 80, 13, 21), (1, 1, 1, 1), (2, 720, 7, 11), (1, 3, 1, 17), (4, 2, 33, 1)]


def logits(shape, device, dtype=torch.float64, scale=3.0):
    return (torch.randn(shape, device=device, dtype=torch.float64) * scale).to(dtype)


def both(x, g, **kw):
    """(value, grad) of ours and of the reference for the same input and grad_output."""
    out = []
    for fn in (tbd_ops.channel_max_spatial_softmax, ref.channel_max_spatial_softmax):
        xi = x.detach().clone().requires_grad_()
        y = fn(xi, **kw)
        (gx,) = torch.autograd.grad(y, xi, g)
        out.append((y, gx))
    return out


class TestContract(OpContract):
    op = staticmethod(tbd_ops.channel_max_spatial_softmax)
    reference = staticmethod(ref.channel_max_spatial_softmax)
    # The softmax normalizer and the backward's sum(p * g) are sums in another order on each side.
    reduction_outputs = "all"
    reduction_grads = "all"
    one_tensor_per_call = True

    def samples(self, device):
        out = [
            Sample((logits((2, 5, 3, 4), device).requires_grad_(), 0.5, True), name="float64", gradcheck=True),
            Sample((logits((1, 5, 3, 1), device).requires_grad_(), 0.7, True), name="W = 1", gradcheck=True),
            Sample((logits((2, 3, 4, 5), device).requires_grad_(),), name="defaults", gradcheck=True),
            Sample((strided(logits((1, 9, 6, 2), device, torch.float32), "channels_last").requires_grad_(), 2.0),
                   name="channels_last"),
            Sample((logits((0, 4, 5, 6), device, torch.float32).requires_grad_(),), name="N = 0"),
        ]
        for dtype in DTYPES[1:]:
            out.append(Sample((logits((2, 80, 13, 21), device, dtype).requires_grad_(), 1.0, True), name=str(dtype)))
        # Strided logits over more than one CPU tile (2048 locations) and backward chunk (256),
        # and several CUDA blocks: 47 x 53 = 2491 locations.
        for kind in ("channels_last", "padded"):
            out.append(Sample((strided(logits((2, 7, 47, 53), device), kind).requires_grad_(),), name=kind + " tiles", opcheck=False))
        # A list of levels (one call for all), of three layouts: each level's gradient in the layout of its x.
        pyramid = [logits((2, 5, 6, 7), device), strided(logits((2, 5, 3, 4), device), "channels_last"),
                   strided(logits((2, 5, 2, 3), device), "padded")]
        out.append(Sample(([t.requires_grad_() for t in pyramid], 0.5, True), name="levels", gradcheck=True))
        return out

    def emulated_tol(self, want, sample=None, grad_outputs=None):
        # Relative to the largest value; for the gradient (scale / T) * p * (g - sum(p * g)), whose
        # difference cancels, relative to the terms' size (scale / T) * max p * max |g| instead.
        rtol = RED_TOL[want.dtype]["rtol"]
        size = float(want.abs().max()) if want.numel() else 0.0
        if grad_outputs is not None and want.numel():
            x, t, by_hw = (*sample.args, *CMSS_DEFAULTS.values())[:3]  # temperature, scale_by_hw
            g = max(float(v.abs().max()) for v in grad_outputs if v.numel())
            for level in (x if isinstance(x, (list, tuple)) else [x]):
                p = (level.detach().double().amax(1).flatten(1) / t).softmax(-1)
                scale = level.shape[2] * level.shape[3] if by_hw else 1
                size = max(size, scale / t * float(p.max()) * g)
        return dict(rtol=rtol, atol=rtol * size)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("temperature,scale_by_hw", [(1.0, False), (0.5, True), (3.0, False)])
def test_float64_matches_reference(device, shape, temperature, scale_by_hw):
    x = logits(shape, device)
    g = torch.randn(shape[0], shape[2], shape[3], device=device, dtype=torch.float64)
    (y, gx), (y_ref, gx_ref) = both(x, g, temperature=temperature, scale_by_hw=scale_by_hw)
    assert y.dtype == torch.float64 and y.shape == (shape[0], shape[2], shape[3])
    torch.testing.assert_close(y, y_ref, rtol=1e-10, atol=1e-14)
    torch.testing.assert_close(gx, gx_ref, rtol=1e-10, atol=1e-12)
    total = y.sum(dim=(1, 2))
    expected = shape[2] * shape[3] if scale_by_hw else 1.0
    torch.testing.assert_close(total, torch.full_like(total, expected), rtol=1e-12, atol=0)


@pytest.mark.parametrize("device", DEVICES)
def test_gradient_only_in_argmax_channel(device):
    x = logits((2, 6, 4, 5), device).requires_grad_()
    y = tbd_ops.channel_max_spatial_softmax(x)
    (gx,) = torch.autograd.grad(y, x, torch.randn_like(y))
    am = x.argmax(dim=1, keepdim=True)
    off = gx.clone().scatter_(1, am, 0.0)
    assert off.abs().max().item() == 0.0
    assert gx.gather(1, am).abs().min().item() > 0.0


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", ["channels_last", "channel_slice", "transposed_hw", "expanded_grad"])
def test_non_contiguous(device, layout):
    base = logits((2, 12, 7, 9), device)
    if layout == "channels_last":
        x = base.contiguous(memory_format=torch.channels_last)
    elif layout == "channel_slice":
        x = logits((2, 24, 7, 9), device)[:, ::2]
    elif layout == "transposed_hw":
        x = logits((2, 12, 9, 7), device).transpose(2, 3)
    else:
        x = base
    assert layout == "expanded_grad" or not x.is_contiguous()
    g = torch.randn(2, 7, 9, device=device, dtype=torch.float64)
    if layout == "expanded_grad":
        g = torch.randn(1, 7, 1, device=device, dtype=torch.float64).expand(2, 7, 9)
    (y, gx), (y_ref, gx_ref) = both(x, g)
    torch.testing.assert_close(y, y_ref, rtol=1e-10, atol=1e-14)
    torch.testing.assert_close(gx, gx_ref, rtol=1e-10, atol=1e-12)
    if layout == "channels_last":
        assert gx.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", [(0, 3, 4, 5), (2, 3, 0, 5), (2, 3, 4, 0)])
def test_empty(device, shape):
    x = logits(shape, device).requires_grad_()
    y = tbd_ops.channel_max_spatial_softmax(x)
    assert y.shape == (shape[0], shape[2], shape[3])
    y.sum().backward()
    assert x.grad.shape == x.shape


@pytest.mark.parametrize("device", DEVICES)
def test_single_location_is_one_with_zero_gradient(device):
    x = logits((3, 4, 1, 1), device).requires_grad_()
    y = tbd_ops.channel_max_spatial_softmax(x)
    torch.testing.assert_close(y, torch.ones_like(y))
    (gx,) = torch.autograd.grad(y, x, torch.randn_like(y))
    assert gx.abs().max().item() == 0.0


@pytest.mark.parametrize("device", DEVICES)
def test_ties_pick_lowest_channel(device):
    x = logits((2, 1, 3, 4), device).repeat(1, 5, 1, 1)  # every channel equal
    x[:, 3] -= 1.0  # a smaller channel in the middle changes nothing
    g = torch.randn(2, 3, 4, device=device, dtype=torch.float64)
    (_, gx), (_, gx_ref) = both(x, g)
    assert gx[:, 1:].abs().max().item() == 0.0
    assert gx[:, 0].abs().min().item() > 0.0
    torch.testing.assert_close(gx, gx_ref, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("device", DEVICES)
def test_nan_and_inf_propagate(device):
    x = logits((3, 3, 4, 5), device)
    x[0, 1, 2, 3] = float("nan")
    x[1, :, 0, 0] = float("-inf")  # a location at -inf gets probability 0
    x[2, 1, 3, 4] = float("inf")   # softmax with +inf is NaN everywhere, as torch.softmax
    y = tbd_ops.channel_max_spatial_softmax(x)
    y_ref = ref.channel_max_spatial_softmax(x)
    assert torch.isnan(y[0]).all() and torch.isnan(y[2]).all()
    assert y[1, 0, 0].item() == 0.0 and torch.isfinite(y[1]).all()
    torch.testing.assert_close(y, y_ref, rtol=1e-10, atol=1e-14, equal_nan=True)


@pytest.mark.parametrize("device", DEVICES)
def test_deterministic(device):
    x = logits((2, 80, 50, 84), device, torch.float32)
    a = tbd_ops.channel_max_spatial_softmax(x)
    b = run_single_threaded(lambda: tbd_ops.channel_max_spatial_softmax(x))
    assert torch.equal(a, b)


def with_threads(n, fn):
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(n)
        return fn()
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("N", [2, 3])
def test_cpu_work_splits_agree_bitwise(N, dtype):
    """The CPU forward runs a work item per image when the images split evenly over the threads
    (1 thread: always), per tile otherwise (N = 3 on 2 threads, N = 2 on 3): out, log_p and argmax
    are the same bytes either way, for one level and for a list (H*W of 9 tiles, a partial span
    of the argmax sweep, a level of one short tile, a level where every row is one channel's NaN)."""
    levels = [logits((N, 80, 100, 167), "cpu", dtype), logits((N, 80, 25, 42), "cpu", dtype),
              logits((N, 3, 7, 11), "cpu", dtype)]
    levels[2][:, 1, 2, 3] = float("nan")
    levels.append(levels[0].to(memory_format=torch.channels_last))
    run = lambda: ([OP(x, 0.5, True) for x in levels],  # noqa: E731
                   torch.ops.tbd_ops._channel_max_spatial_softmax_levels(levels, 0.5, True))
    want = with_threads(1, run)
    for threads in (2, 3):
        got = with_threads(threads, run)
        single = [t for r in got[0] for t in r]
        listed = [t for r in zip(*got[1]) for t in r]
        for a, b in zip(single + listed, [t for r in want[0] for t in r] * 2):
            assert bitwise_equal(a, b), f"{threads} threads"


@pytest.mark.parametrize("channels_last", [False, True])
def test_float64_gradient_of_several_mib_matches_reference(channels_last):
    """A gradient of several MiB: zero outside the argmax channel, the reference's values in it."""
    x = logits((2, 80, 60, 70), "cpu")  # 5.1 MiB of float64 gradient
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    g = torch.randn(2, 60, 70, dtype=torch.float64)
    (y, gx), (y_ref, gx_ref) = both(x, g, temperature=0.5, scale_by_hw=True)
    torch.testing.assert_close(y, y_ref, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(gx, gx_ref, rtol=1e-10, atol=1e-12)


def test_float32_streamed_gradient_is_the_channels_last_one_bit_for_bit():
    """A float32 gradient over the 16 MiB from which the CPU backward writes NCHW planes with
    streaming stores (aligned middles, plain stores before and after): bit for bit the gradient
    that the channels_last backward scatters into zeros, one value per location; the reference's
    values in the argmax channel (torch's argmax of the input), exact zeros elsewhere. H*W = 5917
    is 1 mod 4, so the channel rows start at every offset from an aligned address."""
    x = logits((2, 720, 61, 97), "cpu", torch.float32)  # 34 MB of float32 gradient, 2 images
    g = torch.randn(2, 61, 97)
    grads = []
    for fmt in (torch.contiguous_format, torch.channels_last):
        xi = x.to(memory_format=fmt).requires_grad_()
        (gx,) = torch.autograd.grad(tbd_ops.channel_max_spatial_softmax(xi, temperature=0.5), xi, g)
        assert gx.is_contiguous(memory_format=fmt)
        grads.append(gx.contiguous())
    assert_bitwise(grads[0], grads[1])
    am = x.argmax(dim=1, keepdim=True)
    assert grads[0].clone().scatter_(1, am, 0.0).eq(0).all()
    xr = x.double().requires_grad_()
    (want,) = torch.autograd.grad(ref.channel_max_spatial_softmax(xr, temperature=0.5), xr, g.double())
    torch.testing.assert_close(grads[0].gather(1, am).double(), want.gather(1, am), rtol=1e-4, atol=1e-9)


@pytest.mark.parametrize("device", DEVICES)
def test_list_of_levels(device):
    levels = [logits((2, 9, 8, 10), device), logits((2, 9, 4, 5), device), logits((2, 9, 2, 3), device)]
    out = tbd_ops.channel_max_spatial_softmax(levels, temperature=2.0)
    assert isinstance(out, list) and len(out) == 3
    for y, x in zip(out, levels):
        torch.testing.assert_close(y, ref.channel_max_spatial_softmax(x, temperature=2.0), rtol=1e-10, atol=1e-14)
    assert len(tbd_ops.channel_max_spatial_softmax(tuple(levels))) == 3


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("empty", [(2, 9, 0, 10), (2, 9, 8, 0)])
def test_list_of_levels_with_an_empty_first_level(device, empty):
    """An empty level first (no argmax storage: a null pointer on CUDA) must not turn off the argmax of
    the levels after it: their gradients equal the reference's."""
    levels = [logits(empty, device).requires_grad_(), logits((2, 9, 4, 5), device).requires_grad_()]
    out = tbd_ops.channel_max_spatial_softmax(levels)
    g = torch.randn_like(out[1])
    gx = torch.autograd.grad(out[1], levels[1], g)[0]
    want = torch.autograd.grad(ref.channel_max_spatial_softmax(levels[1]), levels[1], g)[0]
    torch.testing.assert_close(gx, want, rtol=1e-10, atol=1e-14)
    assert out[0].shape == (2,) + empty[2:]


@pytest.mark.parametrize("device", DEVICES)
def test_autocast_keeps_input_dtype(device):
    dtype = torch.bfloat16
    x32 = logits((2, 5, 4, 6), device, torch.float32)
    with torch.autocast(device_type=device, dtype=dtype):
        y32 = tbd_ops.channel_max_spatial_softmax(x32)
        y16 = tbd_ops.channel_max_spatial_softmax(x32.to(dtype))
    assert y32.dtype == torch.float32 and y16.dtype == dtype
    torch.testing.assert_close(y32, ref.channel_max_spatial_softmax(x32), **TOL[torch.float32])


class TestBadInput:
    def test_rank(self):
        with pytest.raises(ValueError, match=r"x must be a 4-D tensor \[N, K, H, W\], got a 3-D"):
            tbd_ops.channel_max_spatial_softmax(torch.randn(2, 3, 4))

    def test_dtype(self):
        with pytest.raises(TypeError, match="x must be float32, float64, float16 or bfloat16, got Long"):
            tbd_ops.channel_max_spatial_softmax(torch.ones(2, 3, 4, 5, dtype=torch.long))

    @pytest.mark.parametrize("t", [0.0, -1.0, float("nan"), float("inf")])
    def test_temperature(self, t):
        with pytest.raises(ValueError, match="temperature must be a finite number > 0, got"):
            tbd_ops.channel_max_spatial_softmax(torch.randn(2, 3, 4, 5), temperature=t)

    def test_no_channels(self):
        with pytest.raises(ValueError, match=r"between 1 and 2\^31 - 1 channels"):
            tbd_ops.channel_max_spatial_softmax(torch.randn(2, 0, 4, 5))

    def test_not_a_tensor(self):
        with pytest.raises(TypeError, match="x must be a torch.Tensor, got float"):
            tbd_ops.channel_max_spatial_softmax(1.0)

    def test_backward_op_shapes(self):
        g = torch.randn(2, 3, 4)
        with pytest.raises(ValueError, match="must have the same shape"):
            torch.ops.tbd_ops._channel_max_spatial_softmax_backward(
                g, torch.randn(2, 3, 5), torch.zeros(2, 3, 4, dtype=torch.long), 5, 1.0, False, False)


@requires_cuda
def test_cuda_matches_cpu_and_graph_capture():
    x = logits((2, 720, 25, 42), "cpu", torch.float32)
    y_cpu = tbd_ops.channel_max_spatial_softmax(x)
    xc = x.cuda()
    y_gpu = tbd_ops.channel_max_spatial_softmax(xc)
    torch.testing.assert_close(y_gpu.cpu(), y_cpu, rtol=1e-5, atol=1e-9)
    # No host synchronization inside: the op can be captured in a CUDA graph.
    static_x = xc.clone()
    tbd_ops.channel_max_spatial_softmax(static_x)  # warm-up
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_y = tbd_ops.channel_max_spatial_softmax(static_x)
    static_x.copy_(xc * 2)
    graph.replay()
    torch.testing.assert_close(static_y, tbd_ops.channel_max_spatial_softmax(xc * 2))


@requires_cuda
def test_cuda_device_guard_and_cpu_mismatch():
    x = logits((2, 3, 4, 5), "cuda", torch.float32).requires_grad_()
    y = tbd_ops.channel_max_spatial_softmax(x)
    assert y.device == x.device
    with pytest.raises((ValueError, RuntimeError), match="device"):
        torch.ops.tbd_ops._channel_max_spatial_softmax_backward(
            y.detach(), torch.zeros(2, 4, 5), torch.zeros(2, 4, 5, dtype=torch.long, device="cuda"),
            3, 1.0, False, False)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", ["channels_last", "channel_slice"])
def test_ties_pick_lowest_channel_any_layout(device, layout):
    base = logits((2, 1, 3, 4), device).repeat(1, 6, 1, 1)
    base[:, 0] -= 1.0  # channel 0 smaller: the tie is between channels 1..5
    if layout == "channels_last":
        x = base.contiguous(memory_format=torch.channels_last)
    else:
        x = torch.stack([base, base + 5], 2).flatten(1, 2)[:, ::2]  # a strided channel view
    assert not x.is_contiguous()
    g = torch.randn(2, 3, 4, device=device, dtype=torch.float64)
    (_, gx), (_, gx_ref) = both(x, g)
    assert gx[:, 1].abs().min().item() > 0.0
    assert gx[:, [0, 2, 3, 4, 5]].abs().max().item() == 0.0
    torch.testing.assert_close(gx, gx_ref, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("device", DEVICES)
def test_padded_rows_are_not_a_contiguous_plane(device):
    x = logits((2, 5, 6, 10), device)[..., :9]  # unit column stride, padded rows
    g = torch.randn(2, 6, 10, device=device, dtype=torch.float64)[..., :9]
    (y, gx), (y_ref, gx_ref) = both(x, g)
    torch.testing.assert_close(y, y_ref, rtol=1e-10, atol=1e-14)
    torch.testing.assert_close(gx, gx_ref, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("channels_last", [False, True])
def test_fake_kernels_match_real_strides(channels_last):
    """opcheck compares fake strides only on CUDA tensors: check them on CPU too."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    x = logits((2, 5, 4, 6), "cpu", torch.float32)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    real = OP(x, 1.0, False)
    grad = torch.randn_like(real[0])
    real_dx = torch.ops.tbd_ops._channel_max_spatial_softmax_backward(
        grad, real[1], real[2], 5, 1.0, False, channels_last)
    with FakeTensorMode() as mode:
        fx, fg = mode.from_tensor(x), mode.from_tensor(grad)
        fake = OP(fx, 1.0, False)
        fake_dx = torch.ops.tbd_ops._channel_max_spatial_softmax_backward(
            fg, fake[1], fake[2], 5, 1.0, False, channels_last)
    for r, f in zip([*real, real_dx], [*fake, fake_dx]):
        assert (r.shape, r.dtype, r.stride()) == (f.shape, f.dtype, f.stride())


@pytest.mark.parametrize("device", DEVICES)
def test_list_of_levels_keeps_scale_by_hw(device):
    levels = [logits((2, 4, 5, 6), device), logits((2, 4, 3, 3), device)]
    for y, x in zip(tbd_ops.channel_max_spatial_softmax(levels, 0.5, True), levels):
        torch.testing.assert_close(y, ref.channel_max_spatial_softmax(x, 0.5, True), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("K", [1, 8, 9, 19, 80])
def test_float32_ties_across_channel_blocks_and_tiles(device, K):
    """Few distinct values (many ties) over channel blocks and several location tiles:
    the lowest maximal channel wins, as torch.max."""
    x = torch.randint(-3, 3, (2, K, 45, 50), device=device).float()  # H*W = 2250: two tiles and a tail
    out, log_p, argmax = OP(x, 1.0, False)
    k = torch.arange(K, device=device).view(1, K, 1, 1)
    lowest = torch.where(x == x.amax(1, keepdim=True), k, K).amin(1)
    assert torch.equal(argmax, lowest)
    torch.testing.assert_close(out.double(), ref.channel_max_spatial_softmax(x.double()), **TOL[torch.float32])
    torch.testing.assert_close(log_p.exp(), out, **TOL[torch.float32])


@pytest.mark.parametrize("device", DEVICES)
def test_float32_nan_in_a_later_tile_and_channel(device):
    x = logits((2, 11, 45, 50), device, torch.float32)
    x[0, 9, 44, 49] = float("nan")  # last tile, a channel of the remainder block
    x[0, 10, 44, 49] = float("nan")
    out, _, argmax = OP(x, 1.0, False)
    assert torch.isnan(out[0]).all() and argmax[0, 44, 49].item() == 9
    torch.testing.assert_close(out[1], ref.channel_max_spatial_softmax(x[1:])[0], **TOL[torch.float32])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_a_whole_tile_at_minus_inf(device, dtype):
    """The first 2048 locations at -inf: probability 0 there, the rest sums to 1."""
    x = logits((2, 3, 45, 50), device, dtype)
    x.view(2, 3, -1)[0, :, :2100] = float("-inf")
    y = tbd_ops.channel_max_spatial_softmax(x, 0.5, True)
    assert (y.view(2, -1)[0, :2100] == 0).all()
    torch.testing.assert_close(y, ref.channel_max_spatial_softmax(x, 0.5, True), **TOL[dtype])

# ---- without a gradient to come: p only -------------------------------------------------------------

def _special(x):
    """Ties, +-0 maxima, a row at -inf and a NaN (the last image) in logits [N, K, H, W]."""
    x = x.clone()
    x[0, :, 0, 0] = 1.5  # every channel tied
    x[0, :, 0, 1] = 0.0
    x[0, 1::2, 0, 1] = -0.0  # +0 / -0 ties
    x[0, :, 1, :] = float("-inf")
    x[-1, x.shape[1] - 1, 2, 3] = float("nan")  # the last image's map is NaN
    return x


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "padded"])
@pytest.mark.parametrize("K", [1, 7, 80])
def test_no_grad_path_equals_the_gradient_path_bitwise(device, dtype, layout, K):
    """With nothing to differentiate, p_c skips the argmax and log-probabilities (float32 on the
    CPU: a max-only channel sweep): its maps are those of the path that keeps them, bit for bit,
    over several tiles, with ties, +-0, -inf and NaN, for one level and for a list."""
    def lay(t):
        return t if layout == "contiguous" else strided(t, layout)
    x = lay(_special(logits((2, K, 47, 53), device, dtype)))
    levels = [x, lay(logits((2, K, 9, 11), device, dtype))]
    for temperature, scale_by_hw in ((1.0, False), (0.5, True)):
        with torch.no_grad():
            fast = tbd_ops.channel_max_spatial_softmax(x, temperature, scale_by_hw)
            fast_levels = tbd_ops.channel_max_spatial_softmax(levels, temperature, scale_by_hw)
        kept = tbd_ops.channel_max_spatial_softmax(x.detach().requires_grad_(), temperature, scale_by_hw)
        kept_levels = tbd_ops.channel_max_spatial_softmax([t.detach().requires_grad_() for t in levels],
                                                          temperature, scale_by_hw)
        assert fast.grad_fn is None and kept.grad_fn is not None
        assert_bitwise(fast, kept.detach(), f"{layout} T={temperature}")
        for l, (a, b) in enumerate(zip(fast_levels, kept_levels)):
            assert_bitwise(a, b.detach(), f"level {l}")
        assert torch.isnan(fast[-1]).all() and not torch.isnan(fast[0]).any()


def test_no_grad_op_schema():
    """The no-grad ops (one level, a list): fake kernels, schemas and dispatch (opcheck)."""
    op = torch.ops.tbd_ops._channel_max_spatial_softmax_levels_no_grad.default
    xs = [logits((2, 9, 5, 6), "cpu", torch.float32), logits((2, 9, 3, 2), "cpu", torch.float32)]
    torch.library.opcheck(op, (xs, 0.5, True))
    torch.library.opcheck(op, ([logits((2, 9, 5, 6), "cpu")],))
    out = op(xs, 0.5, True)
    assert len(out) == 2 and out[1].shape == (2, 3, 2)
    with pytest.raises(ValueError, match="temperature"):
        op(xs, 0.0, False)
    single = torch.ops.tbd_ops._channel_max_spatial_softmax_no_grad.default
    torch.library.opcheck(single, (xs[0], 0.5, True))
    torch.library.opcheck(single, (strided(xs[0], "channels_last"),))
    with pytest.raises(ValueError, match=r"x must be a 4-D tensor"):
        single(torch.randn(2, 3, 4))


# ---- the emulated CUDA build against the CPU kernels ------------------------------------------------
# The argmax bit for bit; the softmax normalizer and the backward's sum(p * g) (another summation
# order) to rounding; at the sizes where the launch geometry changes.
EMU = torch.ops.tbd_ops_emu
CPU = torch.ops.tbd_ops


def cmss_compare(x, temperature=1.0, scale_by_hw=False, schedules=True):
    out_c, lp_c, am_c = CPU.channel_max_spatial_softmax(x, temperature, scale_by_hw)
    run = lambda: EMU.channel_max_spatial_softmax(x, temperature, scale_by_hw)  # noqa: E731
    out_e, lp_e, am_e = all_schedules(run) if schedules else run()
    assert torch.equal(am_e, am_c)
    # The normalizer is a sum in another order: a few ulps of log-sum-exp.
    for a, b, dt in ((out_e, out_c, x.dtype), (lp_e, lp_c, lp_c.dtype)):
        rtol = RED_TOL[dt]["rtol"]
        torch.testing.assert_close(a, b, rtol=rtol, atol=rtol * float(b.abs().max()))
    g = torch.randn(out_c.shape, dtype=torch.float64).to(x.dtype)
    cl = x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
    bw = (g, lp_c, am_c, x.shape[1], temperature, scale_by_hw, cl)
    dx_c = CPU._channel_max_spatial_softmax_backward(*bw)
    run_b = lambda: (EMU._channel_max_spatial_softmax_backward(*bw),)  # noqa: E731
    (dx_e,) = all_schedules(run_b) if schedules else run_b()
    assert dx_e.stride() == dx_c.stride()
    # Only the argmax channel (equal on both sides, checked above) receives gradient.
    idx = am_c.unsqueeze(1)
    assert not dx_e.scatter(1, idx, 0).any(), "gradient outside the argmax channel"
    # dx = (scale / T) p (g - sum(p * g)): the difference cancels (for a sharp softmax also at the
    # largest gradient), so the error of the sum shows relative to (scale / T) max(p) max|g|.
    rtol = RED_TOL[x.dtype]["rtol"]
    c = (x.shape[2] * x.shape[3] if scale_by_hw else 1.0) / temperature
    bound = c * float(torch.exp(lp_c).max()) * float(g.double().abs().max())
    torch.testing.assert_close(dx_e, dx_c, rtol=rtol, atol=rtol * bound)


@requires_emu
@pytest.mark.emulated
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    seed=st.integers(0, 2**32 - 1),  # the tensors' seed: Hypothesis replays and shrinks it
    N=st.integers(1, 3),
    K=st.sampled_from([1, 2, 9, 80]),
    H=st.integers(1, 40),
    W=st.sampled_from([1, 7, 16, 255, 257]),  # H*W around the block size and several blocks
    dtype=st.sampled_from(DTYPES),
    layout=st.sampled_from(["contiguous", "channels_last", "padded_rows"]),
    temperature=st.sampled_from([1.0, 0.5]),
    scale_by_hw=st.booleans(),
)
def test_channel_max_spatial_softmax_property(N, K, H, W, dtype, layout, temperature, scale_by_hw, seed):
    torch.manual_seed(seed)
    x = (torch.randn(N, K, H, W + 2, dtype=torch.float64) * 3).to(dtype)
    if layout == "padded_rows":
        x = x[..., :W]
    else:
        x = x[..., :W].contiguous()
        if layout == "channels_last":
            x = x.contiguous(memory_format=torch.channels_last)
    cmss_compare(x, temperature, scale_by_hw)


@requires_emu
@pytest.mark.emulated
def test_channel_max_spatial_softmax_many_blocks_per_image():
    """H*W = 300*300 > 256 blocks of 256 threads: each block loops over several tiles."""
    cmss_compare((torch.randn(2, 3, 300, 300) * 3))


@requires_emu
@pytest.mark.emulated
def test_channel_max_spatial_softmax_more_images_than_grid_y(grid_yz_limit):
    """More images than grid.y allows (65535 on the GPU; 7 here): the images lie along grid.x
    (a 1-D grid over (level, image, tile)), so the launches do not depend on the batch."""
    assert grid_yz_limit(7) == 7
    x = torch.randn(20, 5, 9, 31) * 3
    x[-1] = x[0]  # the last image equals the first
    before = emu_dispatch.emu.launch_count()
    cmss_compare(x)
    # 3 schedules x (forward: 2 kernels + backward: 2 kernels)
    assert emu_dispatch.emu.launch_count() - before == 3 * 4
    out = EMU.channel_max_spatial_softmax(x, 1.0, False)[0]
    assert torch.equal(out[-1], out[0])


# ---- p_c: every level of a list in the same launches, both sides of the split rule ------

def cmss_levels_compare(xs, temperature=1.0, scale_by_hw=False):
    """The emulated levels op against the CPU's, level by level: argmax equal, values and
    gradients to rounding (the softmax normalizer is a sum in another order)."""
    L = len(xs)
    out_c, lp_c, am_c = CPU._channel_max_spatial_softmax_levels(xs, temperature, scale_by_hw)
    flat = all_schedules(
        lambda: tuple(t for r in EMU._channel_max_spatial_softmax_levels(xs, temperature, scale_by_hw) for t in r))
    out_e, lp_e, am_e = flat[:L], flat[L:2 * L], flat[2 * L:]
    for l, x in enumerate(xs):
        assert torch.equal(am_e[l], am_c[l]), f"argmax of level {l}"
        for a, b, dt in ((out_e[l], out_c[l], x.dtype), (lp_e[l], lp_c[l], lp_c[l].dtype)):
            rtol = RED_TOL[dt]["rtol"]
            torch.testing.assert_close(a, b, rtol=rtol, atol=rtol * float(b.abs().max()))
    grads = [torch.randn(o.shape, dtype=torch.float64).to(x.dtype) for o, x in zip(out_c, xs)]
    cl = [x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous() for x in xs]
    bw = (grads, lp_c, am_c, [x.shape[1] for x in xs], temperature, scale_by_hw, cl)
    dx_c = CPU._channel_max_spatial_softmax_levels_backward(*bw)
    dx_e = all_schedules(lambda: tuple(EMU._channel_max_spatial_softmax_levels_backward(*bw)))
    for l, x in enumerate(xs):
        assert dx_e[l].stride() == dx_c[l].stride()
        assert not dx_e[l].scatter(1, am_c[l].unsqueeze(1), 0).any(), "gradient outside the argmax channel"
        # As in cmss_compare: g - sum(p * g) cancels, so the error of the sum shows relative to
        # (scale / T) max(p) max|g|, not to the largest gradient.
        rtol = RED_TOL[x.dtype]["rtol"]
        c = (x.shape[2] * x.shape[3] if scale_by_hw else 1.0) / temperature
        bound = c * float(torch.exp(lp_c[l]).max()) * float(grads[l].double().abs().max())
        torch.testing.assert_close(dx_e[l], dx_c[l], rtol=rtol, atol=rtol * bound)
    return out_e, am_e, dx_e


@requires_emu
@pytest.mark.emulated
@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    seed=st.integers(0, 2**32 - 1),  # the tensors' seed: Hypothesis replays and shrinks it
    policy=st.sampled_from([1, 2]),
    K=st.sampled_from([1, 3, 8, 9, 80]),
    shapes=st.lists(st.tuples(st.integers(1, 2), st.integers(1, 9), st.sampled_from([1, 7, 40, 70])),
                    min_size=1, max_size=3),
    dtype=st.sampled_from(DTYPES),
    layout=st.sampled_from(["contiguous", "channels_last", "padded_rows"]),
    scale_by_hw=st.booleans(),
)
def test_channel_max_spatial_softmax_levels_on_both_sides_of_the_split_rule(policy, K, shapes, dtype, layout,
                                                                            scale_by_hw, seed):
    torch.manual_seed(seed)
    xs = []
    for n, h, w in shapes:
        x = (torch.randn(n, K, h, w + 2, dtype=torch.float64) * 3).to(dtype)
        x = x[..., :w] if layout == "padded_rows" else x[..., :w].contiguous()
        if layout == "channels_last":
            x = x.contiguous(memory_format=torch.channels_last)
        xs.append(x)
    emu_dispatch.emu.set_channel_split_policy(policy)
    try:
        cmss_levels_compare(xs, 0.5, scale_by_hw)
    finally:
        emu_dispatch.emu.set_channel_split_policy(0)


@requires_emu
@pytest.mark.emulated
def test_channel_max_spatial_softmax_split_variants_agree(split_policy):
    """One thread per location, a warp per channel group, a lane per channel group: the same
    argmax (ties and NaN included) and the same values to rounding."""
    x = torch.randint(-3, 3, (2, 37, 9, 13)).float()  # many ties across the channel groups
    x[1, 20, 4, 5] = float("nan")
    x[1, 29, 4, 5] = float("nan")
    split_policy(1)
    out_s, _, am_s = EMU.channel_max_spatial_softmax(x, 1.0, False)
    split_policy(2)
    out_w, _, am_w = EMU.channel_max_spatial_softmax(x, 1.0, False)
    out_l, _, am_l = EMU.channel_max_spatial_softmax(x.contiguous(memory_format=torch.channels_last), 1.0, False)
    k = torch.arange(37).view(1, 37, 1, 1)
    lowest = torch.where(x == x.amax(1, keepdim=True), k, 37).amin(1)
    lowest[1, 4, 5] = 20  # the first NaN
    for am in (am_s, am_w, am_l):
        assert torch.equal(am, lowest)
    for out in (out_w, out_l):
        torch.testing.assert_close(out, out_s, rtol=1e-6, atol=0, equal_nan=True)
    assert torch.isnan(out_s[1]).all() and not torch.isnan(out_s[0]).any()


@requires_emu
@pytest.mark.emulated
def test_channel_max_spatial_softmax_rule_picks_the_split_for_small_grids(split_policy):
    """Under the rule (policy 0) a small call splits and gives the split variant's bits."""
    x = torch.randn(2, 11, 6, 7)
    split_policy(2)
    forced = EMU.channel_max_spatial_softmax(x, 1.0, False)
    split_policy(0)
    ruled = EMU.channel_max_spatial_softmax(x, 1.0, False)
    assert all(bitwise_equal(a, b) for a, b in zip(forced, ruled))


@requires_emu
@pytest.mark.emulated
def test_channel_max_spatial_softmax_more_levels_than_one_launch_takes():
    """Eleven levels: two launch groups of up to eight per kernel; each level as alone."""
    xs = [torch.randn(2, 5, 1 + l % 3, 2 + l) * 3 for l in range(11)]
    before = emu_dispatch.emu.launch_count()
    out, _, am = EMU._channel_max_spatial_softmax_levels(xs, 1.0, True)
    assert emu_dispatch.emu.launch_count() - before == 2 * 2
    for l, x in enumerate(xs):
        o1, _, a1 = EMU.channel_max_spatial_softmax(x, 1.0, True)
        assert bitwise_equal(out[l], o1) and torch.equal(am[l], a1)
    cmss_levels_compare(xs, 2.0, True)


@requires_emu
@pytest.mark.emulated
def test_channel_max_spatial_softmax_split_blocks_take_several_steps(split_policy):
    """H*W = 9000 > 256 tiles x 32 locations: each block of the split variants loops over several
    steps of 32 locations (the shared memory of one step is reused by the next)."""
    split_policy(2)
    cmss_levels_compare([torch.randn(1, 3, 100, 90) * 3, torch.randn(1, 3, 7, 5)])


def test_no_grad_variants_refuse_an_input_that_needs_a_gradient():
    """The p_c operators without argmax (for maps no gradient is asked of, e.g. a teacher's) have no
    backward: called with an input that requires grad under grad mode they raise instead of returning
    an output whose gradient would silently be missing; under no_grad they run."""
    x = logits((2, 6, 3, 4), "cpu").requires_grad_()
    ops = torch.ops.tbd_ops
    with pytest.raises(ValueError, match=r"_channel_max_spatial_softmax_no_grad: x requires grad"):
        ops._channel_max_spatial_softmax_no_grad(x)
    with pytest.raises(ValueError, match=r"_channel_max_spatial_softmax_levels_no_grad: x\[1\] requires grad"):
        ops._channel_max_spatial_softmax_levels_no_grad([x.detach(), x])
    with torch.no_grad():
        y = ops._channel_max_spatial_softmax_no_grad(x)
    assert not y.requires_grad and torch.equal(y, tbd_ops.channel_max_spatial_softmax(x.detach()))
    # _device_values only takes the device of `like`: a plain tensor comes back.
    v = ops._device_values([1.0, 2.0], x, torch.float32)
    assert not v.requires_grad and v.tolist() == [1.0, 2.0]
