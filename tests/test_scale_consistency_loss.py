"""scale_consistency_loss (SPEC 2.3) and PseCo's second view, against tbd_ops.reference."""
import pytest
import torch
import torch.nn.functional as F
from torch.library import opcheck

import tbd_ops
from tbd_ops import reference as ref
from tbd_ops.nn import ScaleConsistencyLoss, downsample_view
from op_testing import DEVICES, REDUCED, TOL, OpContract, Sample, acc_dtype, assert_compiles_like_eager, strided

LEVELS = [(13, 17), (7, 9), (4, 5), (2, 3), (1, 1)]


def views(n, c, device, dtype=torch.float64, levels=LEVELS):
    v1 = [torch.randn(n, c, h, w, dtype=torch.float64, device=device).to(dtype) for h, w in levels]
    v2 = [(t.double() + 0.3 * torch.randn_like(t.double())).to(dtype) for t in v1]
    return v1, v2


class TestContract(OpContract):
    op = staticmethod(tbd_ops.scale_consistency_loss)
    reference = staticmethod(ref.scale_consistency_loss)
    reduction_outputs = "all"  # sums over H*W in another order on each side (masked_sq_dist)

    def samples(self, device):
        def grad(ts):
            return [t.requires_grad_() for t in ts]

        small = [(4, 5), (2, 3)]
        v1, v2 = views(2, 2, device, levels=small)
        masks = [torch.rand(2, 1, h, w, dtype=torch.float64, device=device) for h, w in small]
        out = [Sample((grad(v1), grad(v2), [masks[0].requires_grad_(), None]), name="float64", gradcheck=True),
               Sample((grad([strided(t, "channels_last") for t in v1]), [strided(t) for t in v2]), name="strided",
                      opcheck=False)]
        for dtype in REDUCED:
            v1, v2 = views(2, 8, device, dtype)
            out.append(Sample((grad(v1), v2), name=str(dtype)))
        # Empty levels among the others (H = 0; N = 0 for every level), with masks.
        v1, v2 = views(2, 3, device, levels=[(4, 5), (0, 3), (2, 3)])
        masks = [torch.rand(2, 1, h, w, dtype=torch.float64, device=device) for h, w in [(4, 5), (0, 3), (2, 3)]]
        out.append(Sample((grad(v1), grad(v2), [m.requires_grad_() for m in masks]), name="an empty level"))
        v1, v2 = views(0, 3, device, levels=small)
        out.append(Sample((grad(v1), grad(v2)), name="N = 0"))
        return out

    def value_tol(self, sample):  # the loss is float32 for every 16/32-bit input (accumulated in float32)
        return TOL[acc_dtype(sample.dtype())]

    def grad_tol(self, sample):
        return TOL[sample.dtype()]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("with_mask", [False, True])
def test_matches_reference_float64(device, with_mask):
    v1, v2 = views(3, 5, device)
    masks = [torch.rand(3, 1, h, w, dtype=torch.float64, device=device) for h, w in LEVELS] if with_mask else None
    leaves = v1 + v2 + (masks or [])
    for t in leaves:
        t.requires_grad_()
    ours = tbd_ops.scale_consistency_loss(v1, v2, masks)
    expected = ref.scale_consistency_loss(v1, v2, masks)
    assert ours.dtype == torch.float64 and ours.dim() == 0
    torch.testing.assert_close(ours, expected, rtol=1e-10, atol=1e-12)
    g1 = torch.autograd.grad(ours, leaves)
    g2 = torch.autograd.grad(expected, leaves)
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    mod = ScaleConsistencyLoss(loss_weight=0.5)
    torch.testing.assert_close(mod(v1, v2, masks), 0.5 * expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("device", DEVICES)
def test_single_level_empty_and_noncontiguous(device):
    a = torch.randn(2, 4, 6, 7, dtype=torch.float64, device=device).contiguous(memory_format=torch.channels_last)
    b = torch.randn(2, 4, 6, 9, dtype=torch.float64, device=device)[..., 1:8]
    torch.testing.assert_close(tbd_ops.scale_consistency_loss(a, b), ref.scale_consistency_loss(a, b),
                               rtol=1e-10, atol=1e-12)
    e1, e2 = torch.randn(0, 4, 5, 5, device=device), torch.randn(0, 4, 5, 5, device=device)
    assert tbd_ops.scale_consistency_loss(e1, e2).item() == 0.0
    z1, z2 = torch.randn(2, 4, 0, 5, device=device), torch.randn(2, 4, 0, 5, device=device)
    got = tbd_ops.scale_consistency_loss([a.float(), z1], [b.float(), z2])
    want = ref.scale_consistency_loss([a, z1.double()], [b, z2.double()])
    torch.testing.assert_close(got.double(), want, **TOL[torch.float32])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_dtypes(device, dtype):
    v1, v2 = views(2, 8, device, dtype)
    out = tbd_ops.scale_consistency_loss(v1, v2)
    assert out.dtype == torch.float32
    expected = ref.scale_consistency_loss([t.double() for t in v1], [t.double() for t in v2])
    torch.testing.assert_close(out.double(), expected, **TOL[torch.float32])  # accumulated in float32


def test_opcheck_and_compile():
    v1, v2 = views(2, 3, "cpu", levels=LEVELS[:2])
    for t in v1:
        t.requires_grad_()
    opcheck(torch.ops.tbd_ops.scale_consistency_loss, (v1, v2, [None, torch.rand(2, 1, 7, 9, dtype=torch.float64)]))
    x = v1[0].detach().requires_grad_()
    assert_compiles_like_eager(lambda t: tbd_ops.scale_consistency_loss([t, v1[1].detach()], v2), x)


def test_bad_input():
    v1, v2 = views(2, 3, "cpu", levels=LEVELS[:2])
    with pytest.raises(ValueError, match="feats_v1 and feats_v2 must have one entry per level, got 2 and 1"):
        tbd_ops.scale_consistency_loss(v1, v2[:1])
    with pytest.raises(ValueError, match=r"feats_v2\[1\]"):
        tbd_ops.scale_consistency_loss(v1, [v2[0], v2[1][:, :2]])
    with pytest.raises(ValueError, match=r"mask\[0\]"):
        tbd_ops.scale_consistency_loss(v1, v2, [torch.rand(2, 2, 13, 17), None])
    with pytest.raises(ValueError, match="feats_v1, feats_v2 and mask must have one entry per level, got 2, 2 and 1"):
        tbd_ops.scale_consistency_loss(v1, v2, [None])
    with pytest.raises(ValueError, match=r"feats_v1\[0\]"):
        tbd_ops.scale_consistency_loss([v1[0][0]], [v2[0][0]])
    with pytest.raises(ValueError, match="dtype"):
        tbd_ops.scale_consistency_loss(v1, [v2[0].float(), v2[1]])
    with pytest.raises(TypeError, match=r"feats_v1\[1\]"):
        tbd_ops.scale_consistency_loss([v1[0], 3.0], v2)


def test_nan_propagates():
    v1, v2 = views(2, 3, "cpu", levels=LEVELS[:2])
    v1[1][0, 0, 0, 0] = float("nan")
    assert torch.isnan(tbd_ops.scale_consistency_loss(v1, v2))


def test_downsample_view_aligns_levels_and_boxes():
    img = torch.randn(2, 3, 64, 96)
    assert downsample_view(torch.randn(1, 3, 65, 33))[0].shape == (1, 3, 32, 16)
    v2, boxes = downsample_view(img, [torch.tensor([[8.0, 4.0, 40.0, 30.0]]), torch.zeros(0, 4)])
    torch.testing.assert_close(v2, F.interpolate(img, scale_factor=0.5, mode="nearest"))
    torch.testing.assert_close(boxes[0], torch.tensor([[4.0, 2.0, 20.0, 15.0]]))
    assert boxes[1].shape == (0, 4)
    # Odd and fractional coordinates halve exactly (no rounding to the V2 pixel grid).
    _, odd = downsample_view(img, [torch.tensor([[7.0, 3.0, 41.0, 29.5]])])
    torch.testing.assert_close(odd[0], torch.tensor([[3.5, 1.5, 20.5, 14.75]]), rtol=0, atol=0)
    # V1's level of stride s has the spatial size of V2's level of stride s / 2.
    p3_v1 = F.avg_pool2d(img, 8)
    p2_v2 = F.avg_pool2d(v2, 4)
    assert p3_v1.shape == p2_v2.shape
    with pytest.raises(ValueError, match="images"):
        downsample_view(img[0])
    with pytest.raises(ValueError, match=r"boxes\[0\]"):
        downsample_view(img, [torch.zeros(3)])


@pytest.mark.parametrize("h,w", [(7, 5), (9, 8), (8, 9), (3, 3), (33, 65)])
def test_downsample_view_odd_sizes_and_coordinates(h, w):
    """V2 is floor(H/2) x floor(W/2) and pixel (y, x) of V2 is pixel (2y, 2x) of V1 (the official
    code's F.interpolate(scale_factor=0.5, mode="nearest")); odd box coordinates map to .5."""
    img = torch.arange(2 * 3 * h * w, dtype=torch.float32).reshape(2, 3, h, w)
    boxes = [torch.tensor([[1.0, 3.0, 5.0, 7.0], [0.0, 0.0, float(w), float(h)]]),
             torch.tensor([[3.0, 1.0, 9.0, 11.0]])]
    v2, b2 = downsample_view(img, boxes)
    assert v2.shape == (2, 3, h // 2, w // 2)
    assert torch.equal(v2, img[:, :, 0:2 * (h // 2):2, 0:2 * (w // 2):2])
    assert torch.equal(b2[0], torch.tensor([[0.5, 1.5, 2.5, 3.5], [0.0, 0.0, w / 2, h / 2]]))
    assert torch.equal(b2[1], torch.tensor([[1.5, 0.5, 4.5, 5.5]]))
