"""tbd_ops.nn: HarmonyDistillationLoss, TaskWeightGenerator, TaskDecoupledFeatureLoss, TBDLoss
against compositions of tbd_ops.reference primitives."""
import math

import pytest
import torch

import tbd_ops
from tbd_ops import reference as ref
from tbd_ops.nn import HarmonyDistillationLoss, TaskDecoupledFeatureLoss, TaskWeightGenerator, TBDLoss
from op_testing import DEVICES

SIZES = [(12, 16), (6, 8), (3, 4), (2, 2), (1, 1)]
STRIDES = [8, 16, 32, 64, 128]


def anchors(h, w, stride, a, dtype=torch.float64):
    """[H*W*A, 4] anchors in (h, w, a) order, A sizes around 4*stride."""
    ys, xs = torch.meshgrid(torch.arange(h, dtype=dtype), torch.arange(w, dtype=dtype), indexing="ij")
    cx, cy = (xs + 0.5) * stride, (ys + 0.5) * stride
    size = 4 * stride * (1.26 ** torch.arange(a, dtype=dtype)) / 1.26
    half = size.view(1, 1, a) / 2
    box = torch.stack([cx[..., None] - half, cy[..., None] - half, cx[..., None] + half, cy[..., None] + half], -1)
    return box.reshape(-1, 4)


def points(h, w, stride, dtype=torch.float64):
    ys, xs = torch.meshgrid(torch.arange(h, dtype=dtype), torch.arange(w, dtype=dtype), indexing="ij")
    return torch.stack([(xs.reshape(-1) + 0.5) * stride, (ys.reshape(-1) + 0.5) * stride], -1)


def head_outputs(n, a, c, ch, device, coder="delta_xywh", levels=SIZES, dtype=torch.float64):
    """Random RetinaNet-format (A = 9) or FCOS-format (A = 1) outputs of a student and a teacher."""
    def level_list(k, scale=1.0, shift=0.0):
        return [(torch.randn(n, k, h, w, dtype=torch.float64) * scale + shift).to(dtype).to(device)
                for h, w in levels]
    out = dict(
        student_cls_scores=level_list(a * c, 2.0), teacher_cls_scores=level_list(a * c, 2.0),
        student_feats=level_list(ch), teacher_feats=level_list(ch),
    )
    if coder == "delta_xywh":
        out["student_bbox_preds"] = level_list(4 * a, 0.3)
        out["teacher_bbox_preds"] = level_list(4 * a, 0.3)
        out["priors"] = [anchors(h, w, s, a).to(dtype).to(device) for (h, w), s in zip(levels, STRIDES)]
    else:
        out["student_bbox_preds"] = [t.abs() for t in level_list(4 * a, 1.0, 1.5)]
        out["teacher_bbox_preds"] = [t.abs() for t in level_list(4 * a, 1.0, 1.5)]
        out["priors"] = [points(h, w, s).to(dtype).to(device) for (h, w), s in zip(levels, STRIDES)]
    img = (levels[0][0] * 8, levels[0][1] * 8)
    gts = []
    for i in range(n):
        g = 2 if i % 2 == 0 else 0  # every other image without ground truth
        xy = torch.rand(g, 2, dtype=torch.float64) * torch.tensor([img[1] * 0.6, img[0] * 0.6], dtype=torch.float64)
        wh = 10 + torch.rand(g, 2, dtype=torch.float64) * 40
        gts.append(torch.cat([xy, xy + wh], 1).to(dtype).to(device))
    out["gt_bboxes"] = gts
    out["img_shapes"] = [(img[0] - 3 * i, img[1] - 5 * i) for i in range(n)]
    return out


def reference_tbd(loss: TBDLoss, inp, coder, coder_cfg, scales):
    """TBDLoss composed from reference primitives and plain PyTorch, with the module's own parameters."""
    def probs(cls_scores, bbox_preds):
        return ref.tbd_probabilities(cls_scores, bbox_preds, inp["priors"], inp["gt_bboxes"], coder=coder,
                                     scale=scales, max_shape=inp["img_shapes"], temperature=loss.temperature,
                                     scale_by_hw=loss.scale_by_hw, **coder_cfg)

    pc_s, pr_s = probs(inp["student_cls_scores"], inp["student_bbox_preds"])
    with torch.no_grad():
        pc_t, pr_t = probs(inp["teacher_cls_scores"], inp["teacher_bbox_preds"])
    hd = loss.hd.loss_weight * ref.harmony_distillation_loss(pc_s, pr_s, pc_t, pr_t, mode=loss.hd.mode)
    tfd = 0
    for l in range(len(pc_s)):
        adapted = loss.tfd.adapters[l](inp["student_feats"][l])
        ft = inp["teacher_feats"][l].detach()
        def norm(p):
            s = p.sum((1, 2), keepdim=True)
            return torch.where(s > 0, p / s.clamp_min(1e-300), torch.zeros_like(p))
        masks = torch.stack([norm(pc_t[l]), norm(pr_t[l])], 1)
        dist = ref.masked_sq_dist(ft, adapted, masks)
        if loss.tfd.fixed_task_weights is not None:
            wts = torch.tensor(loss.tfd.fixed_task_weights, dtype=dist.dtype).expand_as(dist)
        else:
            twg = loss.tfd.twg
            pooled = torch.stack([m.mean((1, 2)) for m in (pc_t[l], pr_t[l], pc_s[l].detach(), pr_s[l].detach())], 1)
            wts = torch.softmax(twg.fc2(torch.relu(twg.fc1(pooled))), 1)
        tfd = tfd + (wts * dist).sum(1).mean(0)
    return hd, loss.tfd.loss_weight * tfd


CASES = [
    # (coder, A, coder_cfg, kwargs)
    ("delta_xywh", 9, dict(means=(0.01, -0.02, 0.0, 0.03), stds=(0.1, 0.1, 0.2, 0.2), wh_ratio_clip=0.02), {}),
    ("delta_xywh", 9, {}, dict(hd_mode="plain", fixed_task_weights=(0.3, 0.7), hd_weight=2.0, tfd_weight=0.5)),
    ("distance", 1, dict(scales=[float(s) for s in STRIDES]), dict(adapter_kernel=3, temperature=0.5)),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", range(len(CASES)))
def test_tbd_loss_matches_reference_composition(device, case):
    coder, a, coder_cfg, kwargs = CASES[case]
    ch = 8
    loss = TBDLoss(num_levels=5, in_channels=ch, coder=coder, coder_cfg=coder_cfg, **kwargs).double().to(device)
    inp = head_outputs(3, a, 3, ch, device, coder)
    student = [inp[k] for k in ("student_cls_scores", "student_bbox_preds", "student_feats")]
    for ts in student:
        for t in ts:
            t.requires_grad_()
    for k in ("teacher_cls_scores", "teacher_bbox_preds", "teacher_feats"):
        for t in inp[k]:
            t.requires_grad_()  # a teacher that requires grad still gets none
    out = loss(**inp)
    assert set(out) == {"loss_hd", "loss_tfd"} and out["loss_hd"].dtype == torch.float64
    scales = coder_cfg.get("scales", [1.0] * 5)
    cfg = {k: v for k, v in coder_cfg.items() if k != "scales"}
    hd, tfd = reference_tbd(loss, inp, coder, cfg, scales)
    torch.testing.assert_close(out["loss_hd"], hd, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(out["loss_tfd"], tfd, rtol=1e-9, atol=1e-12)
    assert out["loss_hd"].item() > 0 and out["loss_tfd"].item() > 0

    params = [p for p in loss.parameters()]
    flat_student = [t for ts in student for t in ts]
    g_ours = torch.autograd.grad(out["loss_hd"] + out["loss_tfd"], flat_student + params, allow_unused=True)
    g_ref = torch.autograd.grad(hd + tfd, flat_student + params, allow_unused=True)
    for i, (x, y) in enumerate(zip(g_ours, g_ref)):
        if y is None:
            assert x is None or x.abs().max() == 0, i
            continue
        torch.testing.assert_close(x, y, rtol=1e-8, atol=1e-12, msg=lambda m: f"gradient {i}: {m}")
    # Both losses reach the classification and the box branch of the student.
    for name in ("student_cls_scores", "student_bbox_preds"):
        (g,) = torch.autograd.grad(loss(**inp)["loss_hd"], inp[name][0])
        assert g.abs().sum() > 0, name
    # Teacher tensors get nothing.
    teacher = [t for k in ("teacher_cls_scores", "teacher_bbox_preds", "teacher_feats") for t in inp[k]]
    total = sum(loss(**inp).values())
    grads = torch.autograd.grad(total, teacher, allow_unused=True)
    assert all(g is None for g in grads)


@pytest.mark.parametrize("device", DEVICES)
def test_tbd_loss_without_any_ground_truth(device):
    loss = TBDLoss(num_levels=2, in_channels=4).double()
    inp = head_outputs(2, 9, 2, 4, device, levels=SIZES[:2])
    inp["gt_bboxes"] = [g[:0] for g in inp["gt_bboxes"]]
    out = loss(**inp)
    # No ground truth: p_r^t = 0 everywhere, so psi = 0 and M_r = 0.
    assert out["loss_hd"].item() == 0.0
    assert math.isfinite(out["loss_tfd"].item()) and out["loss_tfd"].item() > 0


def test_tbd_loss_float32_and_half_inputs():
    loss = TBDLoss(num_levels=3, in_channels=8)
    inp64 = head_outputs(2, 9, 4, 8, "cpu", levels=SIZES[:3])
    ref_out = TBDLoss(num_levels=3, in_channels=8).double()
    ref_out.load_state_dict(loss.state_dict())
    expected = ref_out(**inp64)
    for dtype, tol in ((torch.float32, 1e-4), (torch.float16, 2e-2), (torch.bfloat16, 5e-2)):
        inp = {k: ([t.to(dtype) if torch.is_tensor(t) else t for t in v] if isinstance(v, list) else v)
               for k, v in inp64.items()}
        out = loss.to(torch.float32)(**{**inp, "student_feats": [f.float() for f in inp["student_feats"]],
                                        "teacher_feats": [f.float() for f in inp["teacher_feats"]]})
        for key in out:
            assert out[key].dtype == torch.float32
            torch.testing.assert_close(out[key].double(), expected[key].detach(), rtol=tol, atol=tol)


def test_task_weight_generator():
    twg = TaskWeightGenerator(hidden=5).double()
    maps = [torch.rand(3, 4, 6, dtype=torch.float64, requires_grad=True) for _ in range(4)]
    w = twg(*maps)
    assert w.shape == (3, 2)
    torch.testing.assert_close(w.sum(1), torch.ones(3, dtype=torch.float64))
    pooled = torch.stack([m.mean((1, 2)) for m in maps], 1)
    torch.testing.assert_close(w, torch.softmax(twg.fc2(torch.relu(twg.fc1(pooled))), 1))
    w.sum().backward()
    assert all(m.grad is None for m in maps)  # inputs are detached
    assert twg.fc1.weight.grad is not None
    with pytest.raises(ValueError, match="pr_s"):
        twg(maps[0], maps[1], maps[2], maps[3][:, :2])
    with pytest.raises(ValueError, match="hidden"):
        TaskWeightGenerator(0)


def test_task_weight_generator_every_level_at_once():
    """from_pooled on [L, N, 4] gives each level's forward()."""
    twg = TaskWeightGenerator(hidden=7).double()
    levels = [[torch.rand(3, h, w, dtype=torch.float64) for _ in range(4)] for h, w in SIZES[:3]]
    pooled = torch.stack([torch.stack([m.mean((1, 2)) for m in maps], 1) for maps in levels])
    together = twg.from_pooled(pooled)
    assert together.shape == (3, 3, 2)
    for l, maps in enumerate(levels):
        torch.testing.assert_close(together[l], twg(*maps), rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "sliced"])
@pytest.mark.parametrize("bias", [True, False])
def test_adapter_matches_its_convolution(dtype, layout, bias):
    """TaskDecoupledFeatureLoss.adapt (a batched GEMM for 1x1 adapters on contiguous CPU features,
    the convolution otherwise) against the adapter's own nn.Conv2d: values and the gradients of
    the features, weight and bias."""
    tfd = TaskDecoupledFeatureLoss(num_levels=2, in_channels=24, teacher_channels=16).to(dtype)
    if not bias:
        tfd.adapters[1].bias = None
    x = torch.randn(3, 24 * (2 if layout == "sliced" else 1), 7, 9, dtype=dtype)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    elif layout == "sliced":
        x = x[:, ::2]
    conv = tfd.adapters[1]
    params = [p for p in conv.parameters()]
    g = torch.randn(3, 16, 7, 9, dtype=dtype)
    got_x, want_x = x.detach().requires_grad_(), x.detach().requires_grad_()
    got = tfd.adapt(1, got_x)
    got_grads = torch.autograd.grad(got, [got_x] + params, g)
    want = conv(want_x)
    want_grads = torch.autograd.grad(want, [want_x] + params, g)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-12, atol=1e-12)
    assert got.shape == want.shape == (3, 16, 7, 9)
    torch.testing.assert_close(got, want, **tol)
    for a, b in zip(got_grads, want_grads):
        torch.testing.assert_close(a, b, **tol)


@pytest.mark.parametrize("device", DEVICES)
def test_harmony_distillation_loss_module(device):
    mod = HarmonyDistillationLoss(mode="iou_guided", loss_weight=3.0)
    maps = [[torch.rand(2, h, w, dtype=torch.float64, device=device) for h, w in SIZES[:3]] for _ in range(4)]
    for t in maps[0] + maps[1]:
        t.requires_grad_()
    out = mod(*maps)
    torch.testing.assert_close(out, 3.0 * ref.harmony_distillation_loss(*maps), rtol=1e-9, atol=1e-12)
    with pytest.raises(ValueError, match="mode"):
        HarmonyDistillationLoss(mode="iou")
    with pytest.raises(ValueError, match="eps"):
        HarmonyDistillationLoss(eps=float("nan"))


def test_bad_input():
    inp = head_outputs(2, 9, 2, 4, "cpu", levels=SIZES[:2])
    loss = TBDLoss(num_levels=2, in_channels=4).double()
    with pytest.raises(ValueError, match="coder"):
        TBDLoss(coder="delta")
    with pytest.raises(ValueError, match="hd_mode|mode"):
        TBDLoss(hd_mode="fancy")
    with pytest.raises(ValueError, match="coder_cfg"):
        TBDLoss(coder="distance", coder_cfg=dict(means=(0, 0, 0, 0)))
    with pytest.raises(ValueError, match="scales"):
        TBDLoss(num_levels=5, coder="distance", coder_cfg=dict(scales=[8, 16]))
    with pytest.raises(ValueError, match="adapter_kernel"):
        TBDLoss(adapter_kernel=5)
    with pytest.raises(ValueError, match="temperature"):
        TBDLoss(temperature=0.0)
    with pytest.raises(ValueError, match="fixed_task_weights"):
        TBDLoss(fixed_task_weights=(1.0,))
    with pytest.raises(ValueError, match="student_cls_scores must hold 2 levels"):
        loss(**{**inp, "student_cls_scores": inp["student_cls_scores"][:1]})
    with pytest.raises(ValueError, match="teacher_feats must hold 2 levels"):
        loss(**{**inp, "teacher_feats": inp["teacher_feats"] + inp["teacher_feats"]})
    with pytest.raises(ValueError, match="gt_bboxes"):
        loss(**{**inp, "gt_bboxes": inp["gt_bboxes"][:1]})
    with pytest.raises(ValueError, match="img_shapes"):
        loss(**{**inp, "img_shapes": inp["img_shapes"] * 2})
    with pytest.raises(ValueError, match=r"student_feats\[1\]"):
        loss(**{**inp, "student_feats": [inp["student_feats"][0], inp["student_feats"][1][:, :3]]})
    with pytest.raises(ValueError, match=r"student_bbox_preds\[0\]"):
        loss(**{**inp, "student_bbox_preds": [inp["student_bbox_preds"][0][:, :5], inp["student_bbox_preds"][1]]})
    with pytest.raises(TypeError, match="student_cls_scores"):
        loss(**{**inp, "student_cls_scores": inp["student_cls_scores"][0]})


def test_nan_propagates():
    loss = TBDLoss(num_levels=2, in_channels=4).double()
    inp = head_outputs(2, 9, 2, 4, "cpu", levels=SIZES[:2])
    inp["student_feats"][0][0, 0, 0, 0] = float("nan")
    out = loss(**inp)
    assert math.isnan(out["loss_tfd"].item())
    inp = head_outputs(2, 9, 2, 4, "cpu", levels=SIZES[:2])
    inp["student_cls_scores"][1][0, 0, 0, 0] = float("nan")
    out = loss(**inp)
    assert not math.isinf(out["loss_hd"].item())  # NaN or finite, never a crash
