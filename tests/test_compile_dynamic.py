"""Ops over per-image lists under torch.compile(dynamic=True): the per-image counts (ground truths,
proposals, pseudo boxes) change every batch in detection training, so they must stay symbolic
sizes. One compiled graph serves batches of other counts; a count that became a constant would
recompile for every new batch (and fall back to eager after the recompile limit)."""
import pytest
import torch
from torch._dynamo.testing import CompileCounter

import tbd_ops

# Counts that share no value with the other sizes of the inputs (N = 2, P = 12 or 20, 4 box
# coordinates, C = 3), so that no size is merged with another by Dynamo's duck sizing.
COUNTS = [(5, 7), (6, 9), (8, 11)]


def boxes(n):
    b = torch.rand(n, 4, dtype=torch.float64) * 10
    b[:, 2:] += 10
    return b


def compiled_once(fn, calls):
    """fn compiled with dynamic shapes over the calls (args per call) gives eager's results, in one frame."""
    torch._dynamo.reset()
    counter = CompileCounter()
    compiled = torch.compile(fn, backend=counter, dynamic=True, fullgraph=True)
    for args in calls:
        got, want = compiled(*args), fn(*args)
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w)
    return counter.frame_count


def test_decode_max_iou_counts_are_symbolic():
    pred, priors = torch.randn(2, 12, 4, dtype=torch.float64), boxes(12)

    def fn(pred, priors, gts):
        iou, arg = tbd_ops.decode_max_iou(pred, priors, gts)
        return iou, arg

    assert compiled_once(fn, [(pred, priors, [boxes(a), boxes(b)]) for a, b in COUNTS]) == 1


def test_prediction_guided_assign_counts_are_symbolic():
    def fn(b, s, pb, pl):
        gt_inds, q = tbd_ops.prediction_guided_assign(b, s, pb, pl)
        return gt_inds + q

    calls = [([boxes(20), boxes(20)], [torch.rand(20, 3, dtype=torch.float64) for _ in range(2)],
              [boxes(a), boxes(b)], [torch.randint(3, (a,)), torch.randint(3, (b,))]) for a, b in COUNTS]
    assert compiled_once(fn, calls) == 1


def test_consistency_voting_counts_are_symbolic():
    def fn(pred, gt_inds, pseudo):
        sigma, w, reg_scale = tbd_ops.consistency_voting(pred, gt_inds, pseudo)
        return sigma + w + [reg_scale]

    calls = [([boxes(r), boxes(r + 3)], [torch.randint(0, m + 1, (r,)), torch.randint(0, m + 1, (r + 3,))],
              [boxes(m), boxes(m)]) for r, m in [(13, 5), (15, 6), (17, 9)]]
    assert compiled_once(fn, calls) == 1


@pytest.mark.parametrize("shapes", [[(5, 7), (6, 9)]])
def test_gradients_through_the_compiled_decode(shapes):
    """The backward of the compiled graph (counts symbolic in the saved context) matches eager."""
    pred, priors = torch.randn(2, 12, 4, dtype=torch.float64), boxes(12)
    compiled = torch.compile(lambda p, q, g: tbd_ops.decode_max_iou(p, q, g)[0].sum(), dynamic=True,
                             fullgraph=True, backend="aot_eager")
    for a, b in shapes:
        gts = [boxes(a), boxes(b)]
        x = pred.clone().requires_grad_()
        (g1,) = torch.autograd.grad(compiled(x, priors, gts), x)
        (g2,) = torch.autograd.grad(tbd_ops.decode_max_iou(x, priors, gts)[0].sum(), x)
        torch.testing.assert_close(g1, g2)
