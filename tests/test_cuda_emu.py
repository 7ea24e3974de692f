"""The CUDA path on the SIMT emulator against the CPU kernels.

The op suites already run every test on the `cuda_emu` device. These tests
call the emulated build (`torch.ops.tbd_ops_emu`) and the CPU kernels
(`torch.ops.tbd_ops`) side by side on the same inputs and require:
  - per-element results (decoded IoU, argmax, per-prediction gradients) equal
    bit for bit: the same shared headers, no FMA contraction on either side;
  - reductions (softmax normalizer, prior and ground-truth gradients) equal to
    rounding, since the summation order differs;
at the sizes where the launch geometry changes: one block, several blocks per
image, more than one shared-memory tile of ground truths, more than one chunk
of images, more than 65535 images.
"""
import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st

from conftest import requires_emu
import dispatch as emu_dispatch

# Not the cuda_emu device (whose dispatch mode would route the CPU calls here to
# the emulator too): these tests call both builds explicitly.
pytestmark = [requires_emu, pytest.mark.emulated]

EMU = torch.ops.tbd_ops_emu
CPU = torch.ops.tbd_ops
DTYPES = [torch.float64, torch.float32, torch.float16, torch.bfloat16]
RED_TOL = {  # reductions: summation order differs
    torch.float64: dict(rtol=1e-12, atol=1e-14),
    torch.float32: dict(rtol=1e-5, atol=1e-7),
    torch.float16: dict(rtol=2e-3, atol=1e-5),
    torch.bfloat16: dict(rtol=1.6e-2, atol=1e-4),
}


def bitwise_equal(a, b):
    return a.shape == b.shape and a.dtype == b.dtype and torch.equal(
        a.contiguous().view(-1).view(torch.uint8), b.contiguous().view(-1).view(torch.uint8))


def assert_bitwise(a, b, what):
    assert bitwise_equal(a, b), f"{what}: {int((a != b).sum())} of {a.numel()} elements differ"


def all_schedules(fn):
    """fn() under the three schedules; returns the result after checking they agree bitwise."""
    results = []
    for sched, _ in emu_dispatch.SCHEDULES:
        emu_dispatch.emu.set_schedule(sched, 1234)
        results.append(fn())
    emu_dispatch.emu.set_schedule(0, 0)
    for r in results[1:]:
        for x, y in zip(results[0], r):
            assert bitwise_equal(x, y), "thread schedules disagree"
    return results[0]


def boxes(n, dtype, extent=60.0):
    xy = torch.rand(n, 2, dtype=torch.float64) * extent
    wh = torch.rand(n, 2, dtype=torch.float64) * 30 + 1
    return torch.cat([xy, xy + wh], 1).to(dtype)


def decode_args(pred, priors, gts, coder, max_shape):
    kw = {"delta_xywh": ([0.01, -0.02, 0.0, 0.03], [0.1, 0.1, 0.2, 0.2], 1.0),
          "distance": ([0.0] * 4, [1.0] * 4, 8.0)}[coder]
    return (pred, priors, torch.cat(gts) if gts else pred.new_zeros(0, 4), [len(g) for g in gts], coder,
            kw[0], kw[1], kw[2], max_shape, 0.016)


def decode_problem(N, A, H, W, counts, dtype, coder, layout):
    P = H * W * A
    if coder == "delta_xywh":
        priors = boxes(P, dtype)
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
    gts = [boxes(c, dtype, extent=40.0) for c in counts]
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


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
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
def test_decode_max_iou_property(N, A, H, W, counts, dtype, coder, layout, clip):
    pred, priors, gts = decode_problem(N, A, H, W, counts[:N], dtype, coder, layout)
    compare_decode(pred, priors, gts, coder, [45.0, 50.0] if clip else None, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_decode_max_iou_tiles_and_chunks(dtype):
    """G = 1100 > one shared tile (1024) for one image; N = 70 > one chunk (64) with empty images."""
    counts = [1100] + [int(c) for c in torch.randint(0, 6, (69,))]
    counts[5] = counts[64] = 0
    pred, priors, gts = decode_problem(70, 1, 3, 5, counts, dtype, "delta_xywh", "contiguous")
    compare_decode(pred, priors, gts, "delta_xywh", None, dtype)


def test_fp16_prior_gradient_rounded_once_over_chunks():
    """N = 150 images (three chunks): the fp16 prior gradient is the float sum rounded once."""
    N, P = 150, 40
    pred, priors, gts = decode_problem(N, 1, 1, P, [3] * N, torch.float16, "delta_xywh", "contiguous")
    args = decode_args(pred, priors, gts, "delta_xywh", None)
    iou, arg = CPU.decode_max_iou(*args)
    grad = torch.rand(N, P, dtype=torch.float64).to(torch.float16)
    _, gr, _ = EMU._decode_max_iou_backward(grad, arg, *args, [False, True, False])
    # The same gradient in float64 from the float64 reference op on the same
    # fp16 values, then rounded once to fp16: at most one fp16 rounding apart.
    args64 = decode_args(pred.double(), priors.double(), [g.double() for g in gts], "delta_xywh", None)
    _, gr64, _ = CPU._decode_max_iou_backward(grad.double(), arg, *args64, [False, True, False])
    torch.testing.assert_close(gr.double(), gr64, rtol=1e-3, atol=1e-4)


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
    # g - sum(p * g) cancels: compare relative to the largest gradient.
    rtol = RED_TOL[x.dtype]["rtol"]
    torch.testing.assert_close(dx_e, dx_c, rtol=rtol, atol=rtol * float(dx_c.abs().max()))


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    N=st.integers(1, 3),
    K=st.sampled_from([1, 2, 9, 80]),
    H=st.integers(1, 40),
    W=st.sampled_from([1, 7, 16, 255, 257]),  # H*W around the block size and several blocks
    dtype=st.sampled_from(DTYPES),
    layout=st.sampled_from(["contiguous", "channels_last", "padded_rows"]),
    temperature=st.sampled_from([1.0, 0.5]),
    scale_by_hw=st.booleans(),
)
def test_channel_max_spatial_softmax_property(N, K, H, W, dtype, layout, temperature, scale_by_hw):
    x = (torch.randn(N, K, H, W + 2, dtype=torch.float64) * 3).to(dtype)
    if layout == "padded_rows":
        x = x[..., :W]
    else:
        x = x[..., :W].contiguous()
        if layout == "channels_last":
            x = x.contiguous(memory_format=torch.channels_last)
    cmss_compare(x, temperature, scale_by_hw)


def test_channel_max_spatial_softmax_many_blocks_per_image():
    """H*W = 300*300 > 256 blocks of 256 threads: each block loops over several tiles."""
    cmss_compare((torch.randn(2, 3, 300, 300) * 3))


@pytest.fixture
def grid_yz_limit():
    """Lowers the grid.y limit (65535 on the GPU) so that batch chunking shows at small sizes."""
    yield emu_dispatch.emu.set_grid_yz_limit
    emu_dispatch.emu.set_grid_yz_limit(0)


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


def test_grid_limit_is_enforced(grid_yz_limit):
    """A launch over the grid.y limit is refused with the launch site, not run."""
    grid_yz_limit(7)
    pred, priors, gts = decode_problem(8, 1, 2, 3, [2] * 8, torch.float32, "delta_xywh", "contiguous")
    args = decode_args(pred, priors, gts, "delta_xywh", None)
    with pytest.raises(RuntimeError, match=r"decode_max_iou\.cu:\d+: launch of .*decode_max_iou_fwd_kernel.*"
                       r"grid dimension over the limit \(2\^31 - 1, 7, 7\)"):
        EMU.decode_max_iou(*args)


def test_schedule_argument_and_launch_count():
    x = torch.randn(1, 2, 3, 4)
    with pytest.raises(ValueError, match=r"schedule must be 0 \(forward\), 1 \(reverse\) or 2"):
        emu_dispatch.emu.set_schedule(7, 0)
    # The emulator is exercised: the launch counter moves.
    before = emu_dispatch.emu.launch_count()
    EMU.channel_max_spatial_softmax(x, 1.0, False)
    assert emu_dispatch.emu.launch_count() == before + 2


# ---- p_c: every level of a list in the same launches, both sides of the split rule ------

def cmss_levels_compare(xs, temperature=1.0, scale_by_hw=False):
    """The emulated levels op against the CPU's, level by level: argmax equal, values and
    gradients to rounding (the softmax normalizer is a sum in another order)."""
    L = len(xs)
    out_c, lp_c, am_c = CPU.channel_max_spatial_softmax_levels(xs, temperature, scale_by_hw)
    flat = all_schedules(
        lambda: tuple(t for r in EMU.channel_max_spatial_softmax_levels(xs, temperature, scale_by_hw) for t in r))
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
        rtol = RED_TOL[x.dtype]["rtol"]
        torch.testing.assert_close(dx_e[l], dx_c[l], rtol=rtol, atol=rtol * float(dx_c[l].abs().max()))
    return out_e, am_e, dx_e


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    policy=st.sampled_from([1, 2]),
    K=st.sampled_from([1, 3, 8, 9, 80]),
    shapes=st.lists(st.tuples(st.integers(1, 2), st.integers(1, 9), st.sampled_from([1, 7, 40, 70])),
                    min_size=1, max_size=3),
    dtype=st.sampled_from(DTYPES),
    layout=st.sampled_from(["contiguous", "channels_last", "padded_rows"]),
    scale_by_hw=st.booleans(),
)
def test_channel_max_spatial_softmax_levels_on_both_sides_of_the_split_rule(policy, K, shapes, dtype, layout,
                                                                            scale_by_hw):
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


@pytest.fixture
def split_policy():
    yield emu_dispatch.emu.set_channel_split_policy
    emu_dispatch.emu.set_channel_split_policy(0)


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


def test_channel_max_spatial_softmax_rule_picks_the_split_for_small_grids(split_policy):
    """Under the rule (policy 0) a small call splits and gives the split variant's bits."""
    x = torch.randn(2, 11, 6, 7)
    split_policy(2)
    forced = EMU.channel_max_spatial_softmax(x, 1.0, False)
    split_policy(0)
    ruled = EMU.channel_max_spatial_softmax(x, 1.0, False)
    assert all(bitwise_equal(a, b) for a, b in zip(forced, ruled))


def test_channel_max_spatial_softmax_more_levels_than_one_launch_takes():
    """Eleven levels: two launch groups of up to eight per kernel; each level as alone."""
    xs = [torch.randn(2, 5, 1 + l % 3, 2 + l) * 3 for l in range(11)]
    before = emu_dispatch.emu.launch_count()
    out, _, am = EMU.channel_max_spatial_softmax_levels(xs, 1.0, True)
    assert emu_dispatch.emu.launch_count() - before == 2 * 2
    for l, x in enumerate(xs):
        o1, _, a1 = EMU.channel_max_spatial_softmax(x, 1.0, True)
        assert bitwise_equal(out[l], o1) and torch.equal(am[l], a1)
    cmss_levels_compare(xs, 2.0, True)


def test_channel_max_spatial_softmax_split_blocks_take_several_steps(split_policy):
    """H*W = 9000 > 256 tiles x 32 locations: each block of the split variants loops over several
    steps of 32 locations (the shared memory of one step is reused by the next)."""
    split_policy(2)
    cmss_levels_compare([torch.randn(1, 3, 100, 90) * 3, torch.randn(1, 3, 7, 5)])
