"""prediction_guided_assign (SPEC 2.1) against the per-image reference loop."""
from fractions import Fraction

import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st

import tbd_ops
from tbd_ops import reference
from op_testing import (DEVICES, DTYPES, TOL, ImageListBadInput, OpContract, Sample, all_schedules, assert_bitwise,
                        requires_cuda, requires_emu, run_single_threaded, run_without_host_sync,
                        strided)

OP = tbd_ops.prediction_guided_assign


def rand_boxes(n, extent=60.0, grid=None):
    xy = torch.rand(n, 2, dtype=torch.float64) * extent
    wh = torch.rand(n, 2, dtype=torch.float64) * 30 + 2
    b = torch.cat([xy, xy + wh], 1)
    return b.round() if grid else b


def image(P, M, C, *, ties=False, grid=False, valid_frac=0.8):
    """One image: proposals jittered around its pseudo boxes (many bags), some stray ones."""
    pseudo = rand_boxes(M, grid=grid)
    if ties and M >= 2:
        pseudo[M - 1] = pseudo[0]  # a duplicated pseudo box: j* ties, the lower index wins
    if M > 0:
        src = pseudo[torch.randint(0, M, (P,))]
        size = (src[:, 2:] - src[:, :2]).repeat(1, 2)
        boxes = src + (torch.rand(P, 4, dtype=torch.float64) - 0.5) * size * 0.6
        stray = torch.rand(P) < 0.15
        boxes[stray] = rand_boxes(int(stray.sum()))
    else:
        boxes = rand_boxes(P)
    if grid:
        boxes = boxes.round()
    scores = torch.softmax(torch.randn(P, C, dtype=torch.float64) * 2, 1)
    if ties and P >= 4:
        dup = torch.randint(0, P, (P // 3,))
        boxes[dup.flip(0)] = boxes[dup].clone()  # duplicated proposals: ties in u
        scores[torch.randint(0, P, (P // 3,))] = scores[0].clone()  # ties in q
    labels = torch.randint(0, C, (M,))
    valid = torch.rand(P) < valid_frac
    return boxes, scores, pseudo, labels, valid


def batch(sizes, C=5, dtype=torch.float64, device="cpu", **kw):
    cols = list(zip(*[image(P, M, C, **kw) for P, M in sizes])) if sizes else [[]] * 5
    boxes, scores, pseudo, labels, valid = (list(c) for c in cols)
    fl = lambda ts: [t.to(dtype).to(device) for t in ts]  # noqa: E731
    dev = lambda ts: [t.to(device) for t in ts]  # noqa: E731
    return fl(boxes), fl(scores), fl(pseudo), dev(labels), dev(valid)


def check(args, use_valid=True, **kw):
    boxes, scores, pseudo, labels, valid = args
    v = valid if use_valid else None
    gt, q = OP(boxes, scores, pseudo, labels, v, **kw)
    gt_r, q_r = reference.prediction_guided_assign(boxes, scores, pseudo, labels, v, **kw)
    assert len(gt) == len(gt_r) == len(boxes)
    for i, (a, b, qa, qb) in enumerate(zip(gt, gt_r, q, q_r)):
        assert a.dtype == torch.long and qa.dtype == scores[i].dtype
        assert torch.equal(a, b), f"image {i}: {int((a != b).sum())} assignments differ"
        tol = dict(rtol=1e-9, atol=0) if qa.dtype == torch.float64 else TOL[qa.dtype]
        torch.testing.assert_close(qa, qb, equal_nan=True, **tol)
    return gt, q


SIZES = [(37, 4), (0, 3), (61, 7), (25, 0), (1, 1), (90, 12)]


class TestContract(OpContract):
    op = staticmethod(tbd_ops.prediction_guided_assign)
    reference = staticmethod(reference.prediction_guided_assign)
    differentiable = False
    # The assignments are decisions made in the accumulation dtype (float32 for 16-bit inputs): a
    # bag's size is the floor of a sum of IoUs, which on grid boxes often is an integer in exact
    # arithmetic, and float32 and float64 can round it to either side of it (about one 16-bit
    # sample in 1300 differs from a float64 reference, none from the reference in its dtype).
    reference_in_float64 = False

    def samples(self, device):
        out = [Sample(batch(SIZES, device=device), name="float64")]
        for dtype in DTYPES[1:]:
            out.append(Sample(batch([(37, 4), (0, 3), (61, 7)], dtype=dtype, device=device, ties=True, grid=True),
                              name=str(dtype)))
        boxes, scores, pseudo, labels, valid = batch([(13, 3), (0, 1), (9, 2)], device=device)
        out.append(Sample(([b.requires_grad_() for b in boxes], [s.requires_grad_() for s in scores], pseudo, labels),
                          dict(iou_thr=0.3, topk=2, alpha=0.25), name="inputs that require grad, no valid"))
        # Strided boxes, column-major scores and strided labels over more than one CUDA
        # chunk of images (64) and several CPU work items (64 proposals).
        boxes, scores, pseudo, labels, valid = batch([(int(p), int(m)) for p, m in zip(torch.randint(0, 9, (70,)),
                                                                                       torch.randint(0, 3, (70,)))],
                                                     device=device)
        out.append(Sample(([strided(b) for b in boxes], [strided(s, "transposed") for s in scores],
                           [strided(g) for g in pseudo], labels, valid), name="strided, 70 images", opcheck=False))
        return out

    def value_tol(self, sample):
        return TOL[sample.dtype()]

    def compare(self, got, want, tol, what):
        (gt, q), (gt_r, q_r) = got, want
        assert len(gt) == len(gt_r) == len(q)
        for i, (a, b, qa, qb) in enumerate(zip(gt, gt_r, q, q_r)):
            assert a.dtype == torch.long and torch.equal(a, b.to(a.device)), f"{what}: image {i} assignments differ"
            torch.testing.assert_close(qa.double(), qb.double(), equal_nan=True, **tol)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("ties", [False, True])
def test_matches_reference(device, dtype, ties):
    gt, _ = check(batch(SIZES, dtype=dtype, device=device, ties=ties, grid=ties))
    assert sum(int((g > 0).sum()) for g in gt) > 0  # the data does produce positives


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kw", [dict(), dict(iou_thr=0.7, topk=3, alpha=0.0), dict(iou_thr=0.2, topk=40, alpha=1.0),
                                dict(iou_thr=1.0), dict(alpha=0.3, topk=1)])
def test_parameters(device, kw):
    check(batch([(53, 5), (70, 9)], device=device, ties=True), **kw)
    check(batch([(53, 5), (70, 9)], device=device), use_valid=False, **kw)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_iou_equal_to_the_threshold_joins_the_bag(device, dtype):
    """u >= iou_thr (SPEC 2.1): the proposal [0, 0, 10, 5] has IoU 50 / 100 = 0.5 exactly with the
    pseudo box [0, 0, 10, 10] (in every dtype) and becomes its positive at iou_thr = 0.5; the one at
    IoU 0.4 does not. At iou_thr = 1 (the top of its range) the identical box does."""
    boxes = torch.tensor([[0.0, 0.0, 10.0, 4.0], [0.0, 0.0, 10.0, 5.0]], dtype=dtype, device=device)
    pseudo = torch.tensor([[0.0, 0.0, 10.0, 10.0]], dtype=dtype, device=device)
    scores = torch.full((2, 2), 0.5, dtype=dtype, device=device)
    labels = torch.tensor([0], device=device)
    gt, _ = check(([boxes], [scores], [pseudo], [labels], [torch.ones(2, dtype=torch.bool, device=device)]),
                  iou_thr=0.5)
    assert gt[0].tolist() == [0, 1]
    gt, _ = OP([pseudo.repeat(2, 1) * torch.tensor([[1.0], [0.5]], dtype=dtype, device=device)],
               [scores], [pseudo], [labels], iou_thr=1.0)
    assert gt[0].tolist() == [1, 0]


@pytest.mark.parametrize("device", DEVICES)
def test_all_ties(device):
    """Every proposal the same box, every pseudo box the same, every score row the same."""
    P, M, C = 40, 3, 4
    pseudo = torch.tensor([[10.0, 10.0, 40.0, 40.0]], dtype=torch.float64).repeat(M, 1)
    boxes = torch.tensor([[12.0, 11.0, 41.0, 39.0]], dtype=torch.float64).repeat(P, 1)
    scores = torch.full((P, C), 0.25, dtype=torch.float64)
    args = ([boxes.to(device)], [scores.to(device)], [pseudo.to(device)],
            [torch.tensor([0, 1, 2], device=device)], [torch.ones(P, dtype=torch.bool, device=device)])
    gt, _ = check(args, topk=12)
    # One bag (pseudo box 0 by the lowest-index rule); k = floor(12 * u); the lowest indices win.
    k = int(gt[0].gt(0).sum())
    assert k >= 1 and torch.equal(gt[0][:k], torch.ones(k, dtype=torch.long, device=device))
    assert (gt[0][k:] == 0).all()


# PseCo's example 1 + .85 + .85 + .75 + .65 + .45 + .45 = 5 and a float64 one (0.96 + 0.87 + 0.8 +
# 0.72 + 0.65 = 4 in doubles, 3.9999999999999996 as a double running sum).
EXACT_SUM_BAGS = [
    (torch.float32, [100, 85, 85, 75, 65, 45, 45]),
    (torch.float16, [100, 85, 85, 75, 65, 45, 45]),
    (torch.bfloat16, [100, 85, 85, 75, 65, 45, 45]),
    (torch.float64, [96, 87, 80, 72, 65]),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype,widths", EXACT_SUM_BAGS)
def test_dynamic_k_floors_the_exact_sum(device, dtype, widths):
    """Proposals [0, 0, w, 10] inside the pseudo box [0, 0, 100, 10]: IoU = 10w / 1000 exactly as a
    rational, so the kernel's IoU is the correctly rounded w / 100 in the accumulation dtype. Their
    exact sum is an integer k; k members become positive (the official code's float32
    torch.topk(...).sum().int() agrees for PseCo's example; a float running sum would give k - 1)."""
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    u = torch.tensor(widths, dtype=acc) / 100  # the IoUs, independently of the op
    k = sum(Fraction(v) for v in u.tolist())
    assert k.denominator == 1
    k = int(k)
    running = torch.zeros((), dtype=acc)
    for v in u:
        running = running + v
    assert int(running.floor()) == k - 1  # the case is sharp: a running sum misses it
    if acc == torch.float32:
        assert int(torch.topk(u, len(widths)).values.sum(0).int().clamp(min=1)) == k  # the official formula
    p = len(widths)
    boxes = torch.tensor([[0.0, 0.0, float(w), 10.0] for w in widths]).to(dtype).to(device)
    pseudo = torch.tensor([[0.0, 0.0, 100.0, 10.0]]).to(dtype).to(device)
    scores = torch.full((p, 2), 0.5).to(dtype).to(device)
    labels = torch.tensor([1], device=device)
    args = ([boxes], [scores], [pseudo], [labels], [torch.ones(p, dtype=torch.bool, device=device)])
    gt, _ = check(args, topk=12, iou_thr=0.4, alpha=0.5)
    # Equal scores: q ranks as u (widths are in descending order, ties by index): the first k.
    expected = torch.tensor([1] * k + [0] * (p - k), device=device)
    assert torch.equal(gt[0], expected)


@pytest.mark.parametrize("device", DEVICES)
def test_small_bags_and_large_topk(device):
    """Bags of 1-2 members: k = 1 (the max(1, .) floor); topk far above the bag size."""
    args = batch([(3, 3), (5, 4)], device=device)
    check(args, topk=1000)
    check(args, iou_thr=0.05, topk=1000, use_valid=False)


@pytest.mark.parametrize("device", DEVICES)
def test_all_invalid(device):
    boxes, scores, pseudo, labels, valid = batch([(30, 3), (20, 2)], device=device)
    valid = [torch.zeros_like(v) for v in valid]
    gt, q = check((boxes, scores, pseudo, labels, valid))
    assert all((g == 0).all() for g in gt)
    assert all((x > 0).any() for x in q)


@pytest.mark.parametrize("device", DEVICES)
def test_no_pseudo_boxes_and_empty_images(device):
    gt, q = check(batch([(17, 0), (0, 0), (5, 0)], device=device))
    assert all((g == 0).all() for g in gt) and all((x == 0).all() for x in q)
    gt, q = check(batch([(0, 3), (0, 0)], device=device))
    assert [g.shape for g in gt] == [(0,), (0,)]
    assert OP([], [], [], []) == ([], [])
    assert reference.prediction_guided_assign([], [], [], []) == ([], [])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("topk", [12, 5000])
def test_bag_larger_than_shared_memory_tile(device, topk):
    """One bag of 1100 members (> the 1024 members a shared-memory tile holds on CUDA)."""
    P, C = 1100, 3
    pseudo = torch.tensor([[100.0, 100.0, 300.0, 260.0], [0.0, 0.0, 10.0, 10.0]], dtype=torch.float64)
    boxes = pseudo[0] + (torch.rand(P, 4, dtype=torch.float64) - 0.5) * 40
    boxes[::7] = boxes[3]  # ties across tiles
    scores = torch.rand(P, C, dtype=torch.float64)
    scores[::5] = scores[2]
    args = ([boxes.to(device)], [scores.to(device)], [pseudo.to(device)],
            [torch.tensor([1, 2], device=device)], [(torch.rand(P) < 0.9).to(device)])
    gt, _ = check(args, topk=topk, iou_thr=0.3)
    assert int((gt[0] > 0).sum()) > (100 if topk > 12 else 0)


@pytest.mark.parametrize("device", DEVICES)
def test_non_contiguous(device):
    def strided(ts):
        out = []
        for t in ts:
            wide = torch.zeros(t.shape[0], t.shape[1] + 3, dtype=t.dtype, device=t.device) if t.dim() == 2 else \
                torch.zeros(t.shape[0] * 2, dtype=t.dtype, device=t.device)
            if t.dim() == 2:
                wide[:, 1:-2] = t
                out.append(wide[:, 1:-2])
            else:
                wide[::2] = t
                out.append(wide[::2])
        return out

    boxes, scores, pseudo, labels, valid = batch([(41, 4), (29, 3)], device=device)
    scores_t = [s.t().contiguous().t() for s in scores]  # column-major
    for n in (1, 2):  # one image: the tensors reach the op as they are
        args = (strided(boxes[:n]), scores_t[:n], strided(pseudo[:n]), strided(labels[:n]), strided(valid[:n]))
        assert not args[0][0].is_contiguous() and not args[1][0].is_contiguous()
        gt, q = check(args)
        gt2, q2 = OP(boxes[:n], scores[:n], pseudo[:n], labels[:n], valid[:n])
        for a, b in zip(gt, gt2):
            assert torch.equal(a, b)
        for a, b in zip(q, q2):
            assert torch.equal(a, b)


@pytest.mark.parametrize("device", DEVICES)
def test_nan_does_not_crash(device):
    boxes, scores, pseudo, labels, valid = batch([(30, 3), (25, 4)], device=device)
    scores[0][3] = float("nan")
    boxes[1][5, 2] = float("nan")
    check((boxes, scores, pseudo, labels, valid))


@pytest.mark.parametrize("device", DEVICES)
def test_label_outside_the_classes(device, request):
    boxes, scores, pseudo, labels, valid = batch([(30, 3)], C=4, device=device)
    labels[0][1] = 4
    if request.node.get_closest_marker("cuda_emu") is None and device == "cpu":
        with pytest.raises(ValueError, match="pseudo_labels"):
            OP(boxes, scores, pseudo, labels, valid)
        return
    # CUDA: never read out of bounds; the pseudo box's score counts as 0.
    gt, q = OP(boxes, scores, pseudo, labels, valid)
    u, j = reference.pairwise_iou(boxes[0].double().cpu(), pseudo[0].double().cpu()).max(1)
    q0 = q[0].cpu()
    assert (q0[j == 1] == 0).all() and (j == 1).any()
    assert (q0[(j != 1) & (u > 0)] > 0).all()
    assert ((gt[0].cpu() == 0) | (gt[0].cpu() - 1 == j)).all()


@pytest.mark.parametrize("device", DEVICES)
def test_no_gradient(device):
    boxes, scores, pseudo, labels, valid = batch([(20, 3)], device=device)
    boxes = [b.requires_grad_() for b in boxes]
    scores = [s.requires_grad_() for s in scores]
    gt, q = OP(boxes, scores, pseudo, labels, valid)
    assert not q[0].requires_grad and not gt[0].requires_grad


def test_deterministic():
    args = batch([(300, 9), (250, 14), (0, 2), (400, 20)], ties=True, grid=True)
    a = OP(*args)
    b = run_single_threaded(lambda: OP(*args))
    for x, y in zip(a[0] + a[1], b[0] + b[1]):
        assert torch.equal(x, y)


def test_autocast_mixed_dtypes():
    boxes, scores, pseudo, labels, valid = batch([(30, 3)], dtype=torch.float32)
    half = [s.half() for s in scores]
    with pytest.raises(TypeError, match="scores"):
        OP(boxes, half, pseudo, labels, valid)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        gt, q = OP(boxes, half, pseudo, labels, valid)
    gt_r, _ = OP(boxes, [s.float() for s in half], pseudo, labels, valid)
    assert q[0].dtype == torch.float32 and torch.equal(gt[0], gt_r[0])


@requires_cuda
def test_no_host_synchronization():
    args = batch(SIZES, dtype=torch.float32, device="cuda")
    gt, q = run_without_host_sync(lambda: OP(*args))
    gt_r, _ = reference.prediction_guided_assign(*args)
    for a, b in zip(gt, gt_r):
        assert torch.equal(a, b)


class TestBadInput(ImageListBadInput):
    op = staticmethod(OP)
    flat_op = staticmethod(torch.ops.tbd_ops.prediction_guided_assign)
    flat_inputs, count_names = 4, ("proposal_counts", "pseudo_counts")
    names = ("boxes", "scores", "pseudo_boxes", "pseudo_labels", "valid")
    float_names = ("boxes", "scores", "pseudo_boxes")
    shape_cases = [
        ("boxes", [torch.zeros(6, 5), torch.zeros(4, 4)], r"boxes\[0\]"),
        ("scores", [torch.zeros(6, 3), torch.zeros(5, 3)], r"scores\[1\]"),
        ("scores", [torch.zeros(6, 3), torch.zeros(4, 2)], r"scores\[1\]"),
        ("scores", [torch.zeros(6, 0), torch.zeros(4, 0)], "scores"),
        ("pseudo_boxes", [torch.zeros(2, 3), torch.zeros(1, 4)], r"pseudo_boxes\[0\]"),
        ("pseudo_labels", [torch.zeros(3, dtype=torch.long), torch.zeros(1, dtype=torch.long)], r"pseudo_labels\[0\]"),
        ("valid", [torch.ones(5, dtype=torch.bool), torch.ones(4, dtype=torch.bool)], r"valid\[0\]"),
    ]
    dtype_cases = [("pseudo_labels", "int"), ("valid", "long"), ("boxes", "long"), ("pseudo_boxes", "float")]
    device_name = "pseudo_labels"

    def args(self):
        return batch([(6, 2), (4, 1)], C=3)

    @pytest.mark.parametrize("kw,match", [
        (dict(iou_thr=0.0), "iou_thr"), (dict(iou_thr=1.5), "iou_thr"), (dict(iou_thr=float("nan")), "iou_thr"),
        (dict(iou_thr=float("inf")), "iou_thr"), (dict(topk=0), "topk"), (dict(alpha=-0.1), "alpha"),
        (dict(alpha=1.1), "alpha"), (dict(alpha=float("nan")), "alpha"),
    ])
    def test_parameters(self, kw, match):
        with pytest.raises(ValueError, match=match):
            self.call(**kw)


# ---- the emulated CUDA build against the CPU kernel, bit for bit ------------------------------

def _emu_vs_cpu(sizes, C, dtype, kw, ties, use_valid):
    boxes, scores, pseudo, labels, valid = batch(sizes, C=C, dtype=dtype, ties=ties, grid=ties)
    args = (torch.cat(boxes), torch.cat(scores), torch.cat(pseudo), torch.cat(labels),
            [b.shape[0] for b in boxes], [g.shape[0] for g in pseudo],
            torch.cat(valid) if use_valid else None, kw["iou_thr"], kw["topk"], kw["alpha"])
    gt_c, q_c = torch.ops.tbd_ops.prediction_guided_assign(*args)
    gt_e, q_e = all_schedules(lambda: torch.ops.tbd_ops_emu.prediction_guided_assign(*args), seed=99)
    assert torch.equal(gt_e, gt_c)
    assert_bitwise(q_e, q_c, "q")


@requires_emu
@pytest.mark.emulated
@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    seed=st.integers(0, 2**32 - 1),  # the tensors' seed: Hypothesis replays and shrinks it
    sizes=st.lists(st.tuples(st.integers(0, 300), st.integers(0, 9)), min_size=1, max_size=4),
    C=st.integers(1, 6),
    dtype=st.sampled_from(DTYPES),
    iou_thr=st.sampled_from([0.2, 0.4, 0.75]),
    topk=st.sampled_from([1, 3, 12, 500]),
    alpha=st.sampled_from([0.0, 0.5, 0.3, 1.0]),
    ties=st.booleans(),
    use_valid=st.booleans(),
)
def test_emulated_matches_cpu(sizes, C, dtype, iou_thr, topk, alpha, ties, use_valid, seed):
    torch.manual_seed(seed)
    _emu_vs_cpu(sizes, C, dtype, dict(iou_thr=iou_thr, topk=topk, alpha=alpha), ties, use_valid)


@requires_emu
@pytest.mark.emulated
def test_emulated_many_images():
    """More than the 64 images one launch of the match kernel takes."""
    sizes = [(int(torch.randint(0, 12, ())), int(torch.randint(0, 3, ()))) for _ in range(150)]
    _emu_vs_cpu(sizes, 3, torch.float32, dict(iou_thr=0.4, topk=12, alpha=0.5), True, True)
