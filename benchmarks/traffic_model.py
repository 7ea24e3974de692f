"""Launches and global-memory bytes per call of the CUDA kernels of the TBD loss (stdlib only).

A model from the shapes and from what each kernel reads and writes (cuda/*.cu), so that
anyone can see where bandwidth goes before a GPU is available. Per op call it gives each
kernel's launches and bytes, and the op's minimum bytes: what the op must read and write
(its inputs once, its outputs once; the byte formulas of benchmarks/README.md). The launch
counts are checked against the emulated CUDA build (tests/test_cuda_report.py).

Bytes are what the kernels ask of global memory: every load and store counted once per
thread that makes it, except values a whole block reads alike (partial sums, a ground-truth
tile, a clip shape), counted once per block. Re-reads by other blocks or images count (an
L2 cache may serve them: "actual" is an upper bound of DRAM traffic, and the minimum a lower
bound). es is the element size of the inputs, acc = 4 bytes (8 for float64) the size of the
accumulators, 8 bytes an int64 index. Per level l with HW locations, N images:

p_c and the masked reductions take every level of a list in the same launches (one launch
per kernel for up to 8 levels). Their tile grid: one block per (level, image, tile); the
channel split rule (cuda/level_table.cuh): below 2^18 locations in the call (N * sum HW) the
channels of a location are spread over 8 threads (s = 8, 32 locations per block step), else one
thread per location (s = 1, 256 per step); tiles = min(ceil(HW / step), 256) per image, HW
summed over the levels below. Values a whole block reads alike (partials, grad[n, k]) count
once per block; a location's own values read by its s threads count s times.
p_c (channel_max_spatial_softmax), T = N * tiles blocks, chunks = N * ceil(HW / 2048):
  forward   cmss_max_kernel        N*K*HW*es + N*HW*(acc + 8) + 2*T*acc  (no grad: no argmax, + 0)
            cmss_normalize_kernel  2*acc * (per image: chunks x tiles) + N*HW*(2*acc + es)
            minimum                N*K*HW*es + N*HW*es
  backward  cmss_dot_kernel        N*HW*(es + acc) + chunks*acc
            cmss_scatter_kernel    acc * (per image: tiles x chunks) + s*N*HW*(es + acc + 8)
                                   + N*K*HW*es
            minimum                N*HW*es + N*K*HW*es
masked_sq_dist / masked_l1 (a, b [N, C, H, W], K masks), T as above:
  forward   masked_partial_kernel  2*N*C*HW*es + N*HW*acc (the per-location sums, kept for the
                                   backward) + N*K*HW*(es + acc) + N*K*T*acc
            masked_combine_kernel  N*K*T*acc + N*K*acc
            minimum                2*N*C*HW*es + N*K*HW*es + N*K*acc
  backward  masked_grad_kernel     s*N*K*HW*es (masks) + T*K*acc (grad) + 2*N*C*HW*es (a, b)
                                   + N*C*HW*es per gradient asked for (TFD: b only; the teacher
                                   side is detached)
            minimum                N*K*HW*es + 2*N*C*HW*es + N*C*HW*es
decode_max_iou (P = HW*A predictions, G ground truths per image, gb = ceil(P / 256) blocks per
image), per image chunk of 64:
  forward   _device_values kernel      2*N*acc (per-image clip shapes, once per call)
            decode_max_iou_fwd_kernel  N*P*4*es (predictions) + N*P*4*es (priors, per image)
                                       + N*gb*(G*4*es + 2*acc) (ground-truth tiles, clip shape)
                                       + N*P*(es + 8) (iou, arg)
            minimum                    N*P*4*es + P*4*es + N*G*4*es + N*P*(es + 8)
  backward  decode_max_iou_bwd_kernel  N*P*(8 + es + 4*es + 4*es + 4*es + 2*acc) (arg, gradient,
            (gradient of the            prediction, prior, matched ground truth, clip shape; every
            predictions only)           prediction matched) + N*P*4*es (gradient)
            minimum                    N*P*(es + 8 + 4*es) + P*4*es + N*G*4*es + N*P*4*es
harmony_distillation_loss (all levels at once, B = sum_l N*ceil(HW / 2048) blocks, HW summed):
  forward   harmony_partial_kernel     4*N*HW*es + 2*B*acc
            harmony_combine_kernel     2*B*acc + 2*N*L*acc + acc
            minimum                    4*N*HW*es + acc
  backward  harmony_loss_grad_kernel   4*N*HW*es + B*(acc + 2*acc) + 2*N*HW*es
            minimum                    4*N*HW*es + 2*N*HW*es
TBDLoss: p_c and p_r of the student and of the teacher, HD, TFD's masked_sq_dist (C = 256,
K = 2); its backward: the student's p_c, p_r (predictions), HD and TFD (b). The adapters'
convolutions, the mask normalization and the TWG are PyTorch's kernels and not in the model.
"""
from dataclasses import dataclass, field
from typing import Dict, List, Sequence, Tuple

# RetinaNet at 1333 x 800: levels of strides 8 .. 128 (ceil of the image over the stride).
RETINANET_LEVELS = ((100, 167), (50, 84), (25, 42), (13, 21), (7, 11))
ANCHORS, CLASSES, CHANNELS, GTS = 9, 80, 256, 7
BLOCK = 256
IMAGE_CHUNK = 64      # images per launch of decode_max_iou
HD_CHUNK = 2048       # locations per block of harmony_distillation_loss
MAX_BPI = 256         # partial sums per image
MAX_LEVELS = 8        # levels per launch of p_c, the masked reductions and the HD loss


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _bpi(hw: int) -> int:
    return min(max(_cdiv(hw, BLOCK), 1), MAX_BPI)


@dataclass
class OpCall:
    """One call of an op: launches and bytes per kernel, and the op's minimum bytes."""
    name: str
    kernels: Dict[str, List[int]] = field(default_factory=dict)  # kernel -> [launches, bytes]
    minimum: int = 0

    def add(self, kernel: str, launches: int, nbytes: int) -> None:
        k = self.kernels.setdefault(kernel, [0, 0])
        k[0] += launches
        k[1] += nbytes

    def extend(self, other: "OpCall") -> None:
        for kernel, (launches, nbytes) in other.kernels.items():
            self.add(kernel, launches, nbytes)
        self.minimum += other.minimum

    @property
    def launches(self) -> int:
        return sum(v[0] for v in self.kernels.values())

    @property
    def actual(self) -> int:
        return sum(v[1] for v in self.kernels.values())


SPLIT_BELOW = 1 << 18  # locations of a call below which the channels of a location are split
SPLIT = 8              # threads per location when split
MAX_TILES = 256        # tiles (partial sums) per image
PC_CHUNK = 2048        # locations per block of the elementwise grid of p_c


def _split(N, levels) -> int:
    """Threads per location of the tile-grid kernels of p_c and the masked reductions (NCHW)."""
    return SPLIT if N * sum(h * w for h, w in levels) < SPLIT_BELOW else 1


def _tiles(hw: int, s: int) -> int:
    step = 32 if s > 1 else BLOCK
    tiles = min(_cdiv(hw, step), MAX_TILES)
    length = _cdiv(_cdiv(hw, tiles), step) * step
    return _cdiv(hw, length)


def _tile_grid_op(name, N, levels, kernels, level_bytes):
    """An op of the tile grid over the non-empty levels (one launch per kernel for up to MAX_LEVELS
    levels): level_bytes(hw, tiles, chunks, s) gives each kernel's bytes and the minimum of a level."""
    op = OpCall(name)
    s = _split(N, levels)
    hws = [h * w for h, w in levels if h * w > 0]
    if N == 0 or not hws:
        return op
    totals = [0] * len(kernels)
    for hw in hws:
        *nbytes, minimum = level_bytes(hw, _tiles(hw, s), _cdiv(hw, PC_CHUNK), s)
        totals = [t + b for t, b in zip(totals, nbytes)]
        op.minimum += minimum
    for kernel, nbytes in zip(kernels, totals):
        op.add(kernel, _cdiv(len(hws), MAX_LEVELS), nbytes)
    return op


def p_c_forward(N, levels, K, es=4, acc=4, keep_argmax=True):
    """keep_argmax False: the no-grad op (the teacher's maps), which writes no argmax."""
    am = 8 if keep_argmax else 0
    return _tile_grid_op("p_c forward" if keep_argmax else "p_c forward (no grad)", N, levels,
                         ("cmss_max_kernel", "cmss_normalize_kernel"),
                         lambda hw, t, ch, s: (N * K * hw * es + N * hw * (acc + am) + 2 * N * t * acc,
                                               2 * acc * N * ch * t + N * hw * (2 * acc + es),
                                               N * K * hw * es + N * hw * es))


def p_c_backward(N, levels, K, es=4, acc=4):
    return _tile_grid_op("p_c backward", N, levels, ("cmss_dot_kernel", "cmss_scatter_kernel"),
                         lambda hw, t, ch, s: (N * hw * (es + acc) + N * ch * acc,
                                               acc * N * t * ch + s * N * hw * (es + acc + 8) + N * K * hw * es,
                                               N * hw * es + N * K * hw * es))


def masked_forward(N, levels, C, K, es=4, acc=4, name="masked_sq_dist"):
    op = OpCall(f"{name} forward")
    s = _split(N, levels)
    if N == 0 or not levels:
        return op
    launches = _cdiv(len(levels), MAX_LEVELS)
    partial = combine = 0
    for h, w in levels:
        hw = h * w
        t = _tiles(hw, s) if hw else 0
        partial += 2 * N * C * hw * es + N * hw * acc + N * K * hw * (es + acc) + N * K * t * acc
        combine += N * K * t * acc + N * K * acc
        op.minimum += 2 * N * C * hw * es + N * K * hw * es + N * K * acc
    if any(h * w for h, w in levels):
        op.add("masked_partial_kernel", launches, partial)
    if K:
        op.add("masked_combine_kernel", launches, combine)
    return op


def masked_backward(N, levels, C, K, es=4, acc=4, name="masked_sq_dist", grads=1):
    """grads: the gradients of a and b asked for (TFD: 1, b only)."""
    return _tile_grid_op(f"{name} backward", N, levels, ("masked_grad_kernel",),
                         lambda hw, t, ch, s: (s * N * K * hw * es + N * t * K * acc + 2 * N * C * hw * es
                                               + grads * N * C * hw * es,
                                               N * K * hw * es + 2 * N * C * hw * es + N * C * hw * es))


def decode_forward(N, levels, A, G, es=4, acc=4, per_image_shapes=True):
    op = OpCall("decode_max_iou forward")
    if per_image_shapes and N > 0:
        op.add("device_values_kernel", _cdiv(2 * N, 128), 2 * N * acc)
    for h, w in levels:
        P = h * w * A
        if N == 0 or P == 0:
            continue
        gb = _cdiv(P, BLOCK)
        op.add("decode_max_iou_fwd_kernel", _cdiv(N, IMAGE_CHUNK),
               N * P * 4 * es * 2 + N * gb * (G * 4 * es + 2 * acc) + N * P * (es + 8))
        op.minimum += N * P * 4 * es + P * 4 * es + N * G * 4 * es + N * P * (es + 8)
    return op


def decode_backward(N, levels, A, G, es=4, acc=4):
    op = OpCall("decode_max_iou backward")
    for h, w in levels:
        P = h * w * A
        if N == 0 or P == 0:
            continue
        op.add("decode_max_iou_bwd_kernel", _cdiv(N, IMAGE_CHUNK),
               N * P * (8 + es + 12 * es + 2 * acc) + N * P * 4 * es)
        op.minimum += N * P * (es + 8 + 4 * es) + P * 4 * es + N * G * 4 * es + N * P * 4 * es
    return op


def _harmony_size(N, levels) -> Tuple[int, int]:
    """Locations summed over the levels, and blocks of the HD loss's kernels."""
    return sum(h * w for h, w in levels), sum(N * _cdiv(h * w, HD_CHUNK) for h, w in levels)


def harmony_forward(N, levels, es=4, acc=4):
    op = OpCall("harmony_distillation_loss forward")
    hw, blocks = _harmony_size(N, levels)
    if blocks:
        op.add("harmony_partial_kernel", 1, 4 * N * hw * es + 2 * blocks * acc)
    op.add("harmony_combine_kernel", 1, 2 * blocks * acc + 2 * N * len(levels) * acc + acc)
    op.minimum = 4 * N * hw * es + acc
    return op


def harmony_backward(N, levels, es=4, acc=4):
    op = OpCall("harmony_distillation_loss backward")
    hw, blocks = _harmony_size(N, levels)
    if blocks:
        op.add("harmony_loss_grad_kernel", 1, 4 * N * hw * es + blocks * 3 * acc + 2 * N * hw * es)
    op.minimum = 4 * N * hw * es + 2 * N * hw * es
    return op


def tbd_forward(N, levels, A, C, CH, G, es=4, acc=4, per_image_shapes=True):
    op = OpCall("TBDLoss forward")
    for side in ("student", "teacher"):
        op.extend(p_c_forward(N, levels, A * C, es, acc, keep_argmax=side == "student"))
        op.extend(decode_forward(N, levels, A, G, es, acc, per_image_shapes))
    op.extend(harmony_forward(N, levels, es, acc))
    op.extend(masked_forward(N, levels, CH, 2, es, acc))
    return op


def tbd_backward(N, levels, A, C, CH, G, es=4, acc=4):
    op = OpCall("TBDLoss backward")
    op.extend(masked_backward(N, levels, CH, 2, es, acc))
    op.extend(harmony_backward(N, levels, es, acc))
    op.extend(decode_backward(N, levels, A, G, es, acc))
    op.extend(p_c_backward(N, levels, A * C, es, acc))
    return op


def retinanet_calls(N: int, levels: Sequence[Tuple[int, int]] = RETINANET_LEVELS, A: int = ANCHORS,
                    C: int = CLASSES, CH: int = CHANNELS, G: int = GTS, es: int = 4) -> List[OpCall]:
    """Every op call of the TBD loss on a RetinaNet pyramid at batch N, and the whole loss."""
    acc = 8 if es == 8 else 4
    return [
        p_c_forward(N, levels, A * C, es, acc), p_c_backward(N, levels, A * C, es, acc),
        p_c_forward(N, levels, A * C, es, acc, keep_argmax=False),
        decode_forward(N, levels, A, G, es, acc), decode_backward(N, levels, A, G, es, acc),
        harmony_forward(N, levels, es, acc), harmony_backward(N, levels, es, acc),
        masked_forward(N, levels, CH, 2, es, acc), masked_backward(N, levels, CH, 2, es, acc),
        tbd_forward(N, levels, A, C, CH, G, es, acc), tbd_backward(N, levels, A, C, CH, G, es, acc),
    ]


def report_lines(batches=(2, 16), levels=RETINANET_LEVELS) -> List[str]:
    """The table of make cuda-report: per op and kernel, launches and MB per call per batch."""
    per_batch = [retinanet_calls(n, levels) for n in batches]
    hw = sum(h * w for h, w in levels)
    lines = [f"Launches and global-memory traffic per call of the TBD loss's kernels (model: "
             f"benchmarks/traffic_model.py), float32, RetinaNet at 1333x800:",
             f"{len(levels)} levels ({hw:,} locations), A = {ANCHORS}, C = {CLASSES} (K = {ANCHORS * CLASSES}), "
             f"{CHANNELS} feature channels, {GTS} ground truths per image. min: the inputs read and the outputs "
             "written once; actual: what the kernels access."]
    w = 34
    cell = 8 + 1 + 8 + 1 + 9 + 1 + 5
    top = f"{'':{w}}" + "".join(f" | {'batch ' + str(n):^{cell}}" for n in batches)
    head = f"{'op / kernel':{w}}" + "".join(
        f" | {'launches':>8} {'min MB':>8} {'actual MB':>9} {'ratio':>5}" for _ in batches)
    lines += [top, head, "-" * len(head)]
    for i, op in enumerate(per_batch[0]):
        row = f"{op.name:{w}}"
        for calls in per_batch:
            o = calls[i]
            ratio = f"{o.actual / o.minimum:5.2f}" if o.minimum else f"{'-':>5}"
            row += f" | {o.launches:8d} {o.minimum / 1e6:8.1f} {o.actual / 1e6:9.1f} {ratio}"
        lines.append(row)
        for kernel in op.kernels:
            row = f"{'  ' + kernel:{w}}"
            for calls in per_batch:
                launches, nbytes = calls[i].kernels[kernel]
                row += f" | {launches:8d} {'':8} {nbytes / 1e6:9.1f} {'':5}"
            lines.append(row.rstrip())
    return lines


if __name__ == "__main__":
    print("\n".join(report_lines()))
