"""consistency_voting (SPEC 2.2) against the per-image reference loop."""
import pytest
import torch

import tbd_ops
from tbd_ops import reference
from tbd_ops.ops._utils import VOTING_MODES as MODES
from op_testing import (DEVICES, DTYPES, RED_TOL, TOL, ImageListBadInput, OpContract, Sample, acc_dtype, all_schedules,
                        rand_boxes, requires_cuda, requires_emu, run_single_threaded, run_without_host_sync,
                        strided)

OP = tbd_ops.consistency_voting


def image(R, M, pos_frac=0.6, skip=()):
    """RoIs jittered around their pseudo boxes; about pos_frac positives; pseudo boxes in `skip` get none."""
    pseudo = rand_boxes(M, extent=80.0, min_wh=3.0, max_wh=33.0)
    gt = torch.zeros(R, dtype=torch.long)
    if M > 0:
        j = torch.randint(0, M, (R,))
        pos = torch.rand(R) < pos_frac
        if pos_frac > 0:  # every pseudo box outside `skip` has a positive (RoI s for box s)
            k = min(M, R)
            j[:k] = torch.arange(k)
            pos[:k] = True
        for s in skip:
            pos &= j != s
        gt[pos] = j[pos] + 1
        src = pseudo[j]
        size = (src[:, 2:] - src[:, :2]).repeat(1, 2)
        pred = src + (torch.rand(R, 4, dtype=torch.float64) - 0.5) * size * 0.5
    else:
        pred = rand_boxes(R, extent=80.0, min_wh=3.0, max_wh=33.0)
    return pred, gt, pseudo


def batch(sizes, dtype=torch.float64, device="cpu", **kw):
    cols = list(zip(*[image(R, M, **kw) for R, M in sizes])) if sizes else [[]] * 3
    pred, gt, pseudo = (list(c) for c in cols)
    return ([p.to(dtype).to(device) for p in pred], [g.to(device) for g in gt],
            [p.to(dtype).to(device) for p in pseudo])


def check(args, mode="pseco"):
    pred, gt, pseudo = args
    sigma, w, scale = OP(pred, gt, pseudo, mode=mode)
    s_r, w_r, scale_r = reference.consistency_voting(pred, gt, pseudo, mode=mode)
    dtype = pred[0].dtype if pred else torch.float32
    acc = acc_dtype(dtype)
    tol = dict(rtol=1e-9, atol=1e-12) if dtype == torch.float64 else TOL[torch.float32]
    assert len(sigma) == len(s_r) == len(w) == len(pred)
    for a, b in zip(sigma + w, s_r + w_r):
        assert a.dtype == acc and a.shape == b.shape
        torch.testing.assert_close(a, b.to(acc), equal_nan=True, **tol)
    assert scale.dtype == acc and scale.shape == ()
    torch.testing.assert_close(scale, scale_r.to(acc), equal_nan=True, **tol)
    for gi, wi in zip(gt, w):
        assert (wi[gi == 0] == 0).all()
    return sigma, w, scale


SIZES = [(37, 4), (0, 3), (61, 7), (25, 0), (1, 1), (90, 12)]


class TestContract(OpContract):
    op = staticmethod(tbd_ops.consistency_voting)
    reference = staticmethod(reference.consistency_voting)
    differentiable = False
    reduction_outputs = "all"  # means over RoIs and the batch factor: sums in another order

    def samples(self, device):
        out = [Sample(batch(SIZES, device=device), name="float64"),
               Sample(batch(SIZES, device=device), dict(mode="paper"), name="paper")]
        for dtype in DTYPES[1:]:
            out.append(Sample(batch([(37, 4), (0, 3), (61, 7)], dtype=dtype, device=device), name=str(dtype)))
        pred, gt, pseudo = batch([(13, 3), (0, 1), (9, 2)], device=device, dtype=torch.float32)
        out.append(Sample(([p.requires_grad_() for p in pred], gt, pseudo), name="inputs that require grad"))
        # Strided boxes and RoI indices over more than one CUDA chunk of images (64).
        sizes = [(int(r), int(m)) for r, m in zip(torch.randint(0, 12, (70,)), torch.randint(0, 4, (70,)))]
        pred, gt, pseudo = batch(sizes, device=device)
        out.append(Sample(([strided(p) for p in pred], [strided(g[:, None])[:, 0] for g in gt],
                           [strided(q, "transposed") for q in pseudo]), name="strided, 70 images", opcheck=False))
        return out

    def value_tol(self, sample):
        return dict(rtol=1e-9, atol=1e-12) if sample.dtype() == torch.float64 else TOL[torch.float32]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mode", MODES)
def test_matches_reference(device, dtype, mode):
    sigma, w, scale = check(batch(SIZES, dtype=dtype, device=device), mode)
    assert sum(int((x > 0).sum()) for x in w) > 0
    if mode == "paper":
        assert float(scale) == 1.0
    else:
        assert float(scale) > 1.0  # sum s / sum s^2 with 0 < s < 1


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mode", MODES)
def test_pseudo_box_without_positive(device, mode):
    pred, gt, pseudo = (list(c) for c in zip(image(50, 5, skip=(1, 3)), image(30, 3, skip=(0,))))
    args = ([p.to(device) for p in pred], [g.to(device) for g in gt], [p.to(device) for p in pseudo])
    sigma, _, _ = check(args, mode)
    assert sigma[0][1] == 0 and sigma[0][3] == 0 and sigma[1][0] == 0
    assert (sigma[0][[0, 2, 4]] > 0).all()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mode", MODES)
def test_no_positives_and_empty_images(device, mode):
    sigma, w, scale = check(batch([(17, 0), (0, 0), (5, 2), (0, 4)], device=device, pos_frac=0.0), mode)
    assert all((x == 0).all() for x in sigma + w)
    assert float(scale) == (1.0 if mode == "paper" else 0.0)
    sigma, w, scale = check(batch([(0, 0)], device=device), mode)
    assert [x.shape for x in sigma + w] == [(0,), (0,)]
    assert float(scale) == (1.0 if mode == "paper" else 0.0)
    s, w, scale = OP([], [], [], mode=mode)
    assert s == [] and w == [] and float(scale) == (1.0 if mode == "paper" else 0.0)


@pytest.mark.parametrize("device", DEVICES)
def test_many_rois_and_images(device):
    """Images of 2000 RoIs (well above a 256-thread block), and more images than one launch takes (64)."""
    check(batch([(2000, 9), (1500, 1), (0, 2)], device=device, dtype=torch.float32))
    sizes = [(int(torch.randint(0, 20, ())), int(torch.randint(0, 4, ()))) for _ in range(150)]
    check(batch(sizes, device=device))


@pytest.mark.parametrize("device", DEVICES)
def test_all_rois_identical(device):
    """Every positive has the same IoU: sigma equals it exactly-ish, reg_scale = 1 / sigma."""
    pseudo = torch.tensor([[10.0, 10.0, 50.0, 50.0]], dtype=torch.float64, device=device)
    pred = torch.tensor([[12.0, 10.0, 50.0, 52.0]], dtype=torch.float64, device=device).repeat(40, 1)
    gt = torch.ones(40, dtype=torch.long, device=device)
    sigma, w, scale = check(([pred], [gt], [pseudo]))
    iou = float(reference.pairwise_iou(pred[:1], pseudo)[0, 0])
    assert float(sigma[0][0]) == pytest.approx(iou, rel=1e-14)
    assert float(scale) == pytest.approx(1.0 / iou, rel=1e-12)


@pytest.mark.parametrize("device", DEVICES)
def test_non_contiguous(device):
    pred, gt, pseudo = batch([(33, 4)], device=device)
    wide = torch.zeros(33, 7, dtype=torch.float64, device=device)
    wide[:, 1:5] = pred[0]
    p_nc = wide[:, 1:5]
    g_wide = torch.zeros(66, dtype=torch.long, device=device)
    g_wide[::2] = gt[0]
    g_nc = g_wide[::2]
    q_nc = pseudo[0].t().contiguous().t()
    assert not p_nc.is_contiguous() and not g_nc.is_contiguous() and not q_nc.is_contiguous()
    a = check(([p_nc], [g_nc], [q_nc]))
    b = OP(pred, gt, pseudo)
    for x, y in zip(a[0] + a[1] + [a[2]], b[0] + b[1] + [b[2]]):
        assert torch.equal(x, y)


@pytest.mark.parametrize("device", DEVICES)
def test_nan_does_not_crash(device):
    pred, gt, pseudo = batch([(30, 3), (25, 4)], device=device)
    r = int((gt[0] > 0).nonzero()[0])
    pred[0][r, 2] = float("nan")
    sigma, w, scale = check((pred, gt, pseudo))
    assert torch.isnan(sigma[0][gt[0][r] - 1]) and torch.isnan(scale)
    assert torch.isfinite(sigma[1]).all()


@pytest.mark.parametrize("device", DEVICES)
def test_gt_inds_outside(device, request):
    pred, gt, pseudo = batch([(30, 3), (20, 2)], device=device)
    for bad in (4, -1):
        g = [x.clone() for x in gt]
        g[0][5] = bad
        if request.node.get_closest_marker("cuda_emu") is None and device == "cpu":
            with pytest.raises(ValueError, match="gt_inds"):
                OP(pred, g, pseudo)
            continue
        # CUDA: no host check; the RoI counts as background, nothing is read out of bounds.
        sigma, w, scale = OP(pred, g, pseudo)
        g_bg = [x.clone() for x in g]
        g_bg[0][5] = 0
        s_r, w_r, scale_r = reference.consistency_voting(pred, g_bg, pseudo)
        for a, b in zip(sigma + w, s_r + w_r):
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(scale, scale_r, rtol=1e-9, atol=1e-12)
        assert w[0][5] == 0


@pytest.mark.parametrize("device", DEVICES)
def test_no_gradient(device):
    pred, gt, pseudo = batch([(20, 3)], device=device)
    pred = [p.requires_grad_() for p in pred]
    pseudo = [p.requires_grad_() for p in pseudo]
    sigma, w, scale = OP(pred, gt, pseudo)
    assert not sigma[0].requires_grad and not w[0].requires_grad and not scale.requires_grad


def test_deterministic():
    args = batch([(300, 9), (250, 14), (0, 2), (400, 20)], dtype=torch.float32)
    a = OP(*args)
    b = run_single_threaded(lambda: OP(*args))
    c = OP(*args)
    for x, y, z in zip(a[0] + a[1] + [a[2]], b[0] + b[1] + [b[2]], c[0] + c[1] + [c[2]]):
        assert torch.equal(x, y) and torch.equal(x, z)


@pytest.mark.parametrize("device", DEVICES)
def test_autocast_promotes_mixed_dtypes(device):
    """Under autocast, fp16 predictions and fp32 pseudo boxes run in float32 (the promote policy of every op)."""
    pred, gt, pseudo = batch([(30, 3), (20, 2)], dtype=torch.float32, device=device)
    half = [p.half() for p in pred]
    with pytest.raises(TypeError, match="pseudo_boxes must have the dtype of pred_boxes"):
        OP(half, gt, pseudo)  # outside autocast: an explicit error
    with torch.autocast(device_type=device, dtype=torch.float16):
        sigma, w, scale = OP(half, gt, pseudo)
    s_r, w_r, scale_r = OP([p.float() for p in half], gt, pseudo)
    assert scale.dtype == torch.float32
    for a, b in zip(sigma + w + [scale], s_r + w_r + [scale_r]):
        assert torch.equal(a, b)


@requires_cuda
def test_no_host_synchronization():
    args = batch(SIZES, dtype=torch.float32, device="cuda")
    sigma, w, scale = run_without_host_sync(lambda: OP(*args))
    _, _, scale_r = reference.consistency_voting(*args)
    torch.testing.assert_close(scale, scale_r, rtol=1e-5, atol=1e-6)


class TestBadInput(ImageListBadInput):
    op = staticmethod(OP)
    flat_op = staticmethod(torch.ops.tbd_ops.consistency_voting)
    flat_inputs, count_names = 3, ("roi_counts", "pseudo_counts")
    names = ("pred_boxes", "gt_inds", "pseudo_boxes")
    float_names = ("pred_boxes", "pseudo_boxes")
    shape_cases = [
        ("pred_boxes", [torch.zeros(6, 5), torch.zeros(4, 4)], r"pred_boxes\[0\]"),
        ("gt_inds", [torch.zeros(5, dtype=torch.long), torch.zeros(4, dtype=torch.long)], r"gt_inds\[0\]"),
        ("gt_inds", [torch.zeros(6, 1, dtype=torch.long), torch.zeros(4, dtype=torch.long)], r"gt_inds\[0\]"),
        ("pseudo_boxes", [torch.zeros(2, 3), torch.zeros(1, 4)], r"pseudo_boxes\[0\]"),
    ]
    dtype_cases = [("gt_inds", "int"), ("pred_boxes", "long"), ("pseudo_boxes", "float")]
    device_name = "gt_inds"

    def args(self):
        return batch([(6, 2), (4, 1)])

    def test_mode(self):
        with pytest.raises(ValueError, match="mode"):
            self.call(mode="vote")
        with pytest.raises(ValueError, match="mode"):
            self.flat_op(*self.flat_args(), [6, 4], [2, 1], "vote")


# ---- the emulated CUDA build against the CPU kernel ----------------------------------------------

@requires_emu
@pytest.mark.emulated
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mode", MODES)
def test_emulated_matches_cpu(dtype, mode):
    """Sums in another order: sigma (up to 700 terms) and reg_scale (a few thousand) agree to rounding."""
    sizes = [(int(torch.randint(0, 700, ())), int(torch.randint(0, 9, ()))) for _ in range(5)] + [(300, 1)]
    pred, gt, pseudo = batch(sizes, dtype=dtype)
    args = (torch.cat(pred), torch.cat(gt), torch.cat(pseudo), [p.shape[0] for p in pred],
            [q.shape[0] for q in pseudo], mode)
    s_c, w_c, k_c = torch.ops.tbd_ops.consistency_voting(*args)
    tol = dict(rtol=1e-12, atol=1e-14) if dtype == torch.float64 else dict(rtol=1e-4, atol=1e-6)
    s_e, w_e, k_e = all_schedules(lambda: torch.ops.tbd_ops_emu.consistency_voting(*args), seed=5)
    for a, b in ((s_e, s_c), (w_e, w_c), (k_e, k_c)):
        torch.testing.assert_close(a, b, **tol)
