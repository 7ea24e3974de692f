"""TBDLoss under DistributedDataParallel (2 processes, gloo, CPU): the loss and the
gradients equal the single-process values on the same batch, because every term is
normalized per image (SPEC 1.4, 1.6)."""
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from tbd_ops.nn import TBDLoss
from test_nn_tbd import head_outputs

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="torch.distributed with the gloo backend is not available")

LEVELS = [(10, 12), (5, 6), (3, 3)]
CH = 6


class Student(nn.Module):
    """A tiny differentiable stand-in for a detector: per-level convs on fixed inputs."""

    def __init__(self, a=9, c=3):
        super().__init__()
        self.neck = nn.ModuleList(nn.Conv2d(CH, CH, 3, padding=1) for _ in LEVELS)
        self.cls = nn.Conv2d(CH, a * c, 1)
        self.reg = nn.Conv2d(CH, 4 * a, 1)
        self.tbd = TBDLoss(num_levels=len(LEVELS), in_channels=CH)

    def forward(self, inputs, teacher, priors, gts, img_shapes):
        feats = [conv(x) for conv, x in zip(self.neck, inputs)]
        cls = [self.cls(f) for f in feats]
        reg = [self.reg(f) * 0.1 for f in feats]
        out = self.tbd(cls, reg, feats, teacher["teacher_cls_scores"], teacher["teacher_bbox_preds"],
                       teacher["teacher_feats"], priors, gts, img_shapes)
        return out["loss_hd"] + out["loss_tfd"]


def make_problem(path):
    torch.manual_seed(torch.seed() % 2**31)
    model = Student().double()
    data = head_outputs(4, 9, 3, CH, "cpu", levels=LEVELS)
    inputs = [torch.randn(4, CH, h, w, dtype=torch.float64) for h, w in LEVELS]
    torch.save(dict(state=model.state_dict(), data=data, inputs=inputs), path)


def run_single(path):
    p = torch.load(path, weights_only=False)
    model = Student().double()
    model.load_state_dict(p["state"])
    d = p["data"]
    loss = model(p["inputs"], d, d["priors"], d["gt_bboxes"], d["img_shapes"])
    loss.backward()
    return loss.detach(), {k: v.grad.clone() for k, v in model.named_parameters()}


def worker(rank, world, path, out_dir):
    dist.init_process_group("gloo", init_method=f"file://{out_dir}/rendezvous", rank=rank, world_size=world)
    try:
        torch.set_num_threads(1)
        p = torch.load(path, weights_only=False)
        model = Student().double()
        model.load_state_dict(p["state"])
        ddp = nn.parallel.DistributedDataParallel(model)
        d = p["data"]
        sl = slice(2 * rank, 2 * rank + 2)  # this rank's two images
        teacher = {k: [t[sl] for t in d[k]] for k in ("teacher_cls_scores", "teacher_bbox_preds", "teacher_feats")}
        loss = ddp([x[sl] for x in p["inputs"]], teacher, d["priors"], d["gt_bboxes"][sl], d["img_shapes"][sl])
        loss.backward()  # DDP averages the gradients over the ranks
        # The ranks' losses are averaged by the test, not by a collective on a tensor of ours:
        # a gloo worker thread drops its references to a collective's tensors only after
        # wait() has returned, and dropping one that Python also holds takes the GIL. If this
        # process has begun to finalize its interpreter by then (the group's threads outlive
        # destroy_process_group()), the thread is killed inside a noexcept destructor and the
        # process aborts: "terminate called without an active exception". DDP's collectives
        # run on buckets it allocates in C++, which never need the GIL.
        torch.save(dict(loss=loss.detach(), grads={k: v.grad for k, v in model.named_parameters()}),
                   os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_ddp_matches_single_process(tmp_path):
    path = str(tmp_path / "problem.pt")
    make_problem(path)
    loss, grads = run_single(path)
    mp.start_processes(worker, args=(2, path, str(tmp_path)), nprocs=2, join=True, start_method="spawn")
    results = [torch.load(tmp_path / f"rank{rank}.pt", weights_only=False) for rank in range(2)]
    # each rank's loss covers its two images; their mean is the loss of the whole batch
    torch.testing.assert_close((results[0]["loss"] + results[1]["loss"]) / 2, loss, rtol=1e-10, atol=1e-12)
    for r in results:
        assert set(r["grads"]) == set(grads)
        for k, g in grads.items():
            assert g.abs().sum() > 0, k
            torch.testing.assert_close(r["grads"][k], g, rtol=1e-9, atol=1e-12, msg=lambda m: f"{k}: {m}")
