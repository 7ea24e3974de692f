// prediction_guided_assign (SPEC 2.1): the whole batch in a fixed number of
// launches, no host synchronization (CUDA-graph safe). The images travel
// concatenated; their offsets are host metadata, passed as kernel parameters.
//
//   1. assign_match_kernel, one thread per proposal: u = max IoU against the
//      image's pseudo boxes (lowest index on ties), j*, the quality q, and the
//      sort key of the proposal: the batch-wide index of its bag's pseudo box,
//      or M (no bag) when u < iou_thr or the image has no pseudo box.
//   2. a stable radix sort of (key, proposal) pairs: every bag becomes one
//      contiguous segment.
//   3. assign_select_kernel, one block per pseudo box: finds its segment by
//      binary search, stages the members (u, q, p) in shared memory (tile by
//      tile when the bag is larger than the tile) and gives every member two
//      ranks, the number of members before it by (u desc, p asc) and by
//      (q desc, p asc): exact, and independent of the thread schedule. The
//      u-ranks place the u values in descending order, thread 0 adds the
//      first min(|bag|, topk) of them exactly (BagSum of tbd_ops/assign.h, as
//      the CPU kernel) and k = max(1, floor(sum)); members of q-rank < k
//      become positives when valid.
#include <stdexcept>
#include <string>

#include "common.cuh"
#include "prediction_guided_assign.h"
#include "tbd_ops/argmax.h"
#include "tbd_ops/assign.h"
#include "tbd_ops/box.h"

namespace tbd_ops {
namespace cuda {
namespace {

// Tiles of more bytes opt in to more than 48 KiB of shared memory per block.
constexpr size_t kSelectNoOptInSmem = 32 * 1024;

// The proposal (table kP) and pseudo-box (table kM) offsets of a chunk of images.
using AssignChunk = ImageChunk<2>;
constexpr int kP = 0, kM = 1;

template <typename A> struct Member {
  A u, q;
  int64_t p;
};

template <typename T, typename A>
__global__ void __launch_bounds__(kBlock)
assign_match_kernel(const T* __restrict__ boxes, int64_t bs0, int64_t bs1,
                    const T* __restrict__ scores, int64_t ss0, int64_t ss1, int64_t C,
                    const T* __restrict__ gts, const int64_t* __restrict__ labels,
                    AssignChunk chunk, A eps, A thr, double alpha, double beta, int32_t none,
                    int64_t* __restrict__ gt_inds, T* __restrict__ q_out, A* __restrict__ u_buf,
                    A* __restrict__ q_buf, int32_t* __restrict__ jloc, int32_t* __restrict__ keys,
                    int64_t* __restrict__ vals) {
  const int64_t p = chunk.off[kP][0] + blockIdx.x * int64_t(kBlock) + threadIdx.x;
  if (p >= chunk.off[kP][chunk.count]) return;
  const int lo = image_of(chunk.off[kP], chunk.count, p);
  const int64_t g0 = chunk.off[kM][lo], M = chunk.off[kM][lo + 1] - g0;
  const Box<A> box = load_box<A>(boxes, p, bs0, bs1, ToAcc());
  ArgMax<A> best = argmax_empty<A>();
  for (int64_t j = 0; j < M; ++j) {
    argmax_update(best, box_iou(box, load_box<A>(gts, g0 + j, ToAcc()), eps), j);
  }
  A u = A(0), qv = A(0);
  int32_t key = none, j = -1;
  if (best.index >= 0) {
    u = best.value;
    j = static_cast<int32_t>(best.index);
    const int64_t lab = labels[g0 + j];
    // A label outside [0, C) is never read: its score counts as 0.
    const A s = (lab >= 0 && lab < C) ? to_acc(scores[p * ss0 + lab * ss1]) : A(0);
    qv = assign_quality(s, u, alpha, beta);
    if (u >= thr) key = static_cast<int32_t>(g0 + j);
  }
  gt_inds[p] = 0;
  q_out[p] = from_acc<T>(qv);
  u_buf[p] = u;
  q_buf[p] = qv;
  jloc[p] = j;
  keys[p] = key;
  vals[p] = p;
}

template <typename A>
__device__ __forceinline__ Member<A> load_member(const int64_t* vals, const A* u_buf,
                                                 const A* q_buf, int64_t pos) {
  const int64_t v = vals[pos];
  return {u_buf[v], q_buf[v], v};
}

template <typename A>
__global__ void __launch_bounds__(kBlock)
assign_select_kernel(const int32_t* __restrict__ keys, const int64_t* __restrict__ vals, int64_t P,
                     const A* __restrict__ u_buf, const A* __restrict__ q_buf,
                     const int32_t* __restrict__ jloc, const bool* __restrict__ valid,
                     int64_t topk, int tile, A* __restrict__ sorted_u,
                     int32_t* __restrict__ qrank_buf, int64_t* __restrict__ gt_inds) {
  Member<A>* sm = dynamic_smem<Member<A>>();  // `tile` members
  __shared__ SharedArray<int64_t, 1> k_shared;
  const int32_t g = static_cast<int32_t>(blockIdx.x);
  const int64_t start = lower_bound_key(keys, P, g);
  const int64_t bag = lower_bound_key(keys, P, g + 1) - start;
  if (bag == 0) return;  // the same for every thread of the block
  const bool resident = bag <= tile;
  if (resident) {
    for (int64_t i = threadIdx.x; i < bag; i += kBlock) sm[i] = load_member(vals, u_buf, q_buf, start + i);
    __syncthreads();
  }
  for (int64_t c0 = 0; c0 < bag; c0 += kBlock) {
    const int64_t i = c0 + threadIdx.x;
    const bool mine = i < bag;
    A mu = A(0), mq = A(0);
    int64_t mp = 0;
    if (mine) {
      const Member<A> m = resident ? sm[i] : load_member(vals, u_buf, q_buf, start + i);
      mu = m.u;
      mq = m.q;
      mp = m.p;
    }
    int64_t urank = 0, qrank = 0;
    for (int64_t t0 = 0; t0 < bag; t0 += tile) {
      const int tn = static_cast<int>(bag - t0 < tile ? bag - t0 : tile);
      if (!resident) {
        __syncthreads();  // the previous tile is no longer read
        for (int k = threadIdx.x; k < tn; k += kBlock) {
          sm[k] = load_member(vals, u_buf, q_buf, start + t0 + k);
        }
        __syncthreads();
      }
      if (mine) {
        // Unrolled by 2: the compiler's default unrolling spills in the double kernel.
#pragma unroll 2
        for (int k = 0; k < tn; ++k) {
          const Member<A> o = sm[k];
          urank += ranks_before(o.u, o.p, mu, mp);
          qrank += ranks_before(o.q, o.p, mq, mp);
        }
      }
    }
    if (mine) {
      if (urank < topk) sorted_u[start + urank] = mu;
      qrank_buf[start + i] = static_cast<int32_t>(qrank);
    }
  }
  __syncthreads();  // sorted_u and qrank_buf (global memory) are written
  if (threadIdx.x == 0) {
    const int64_t kk = bag < topk ? bag : topk;
    BagSum sum = bag_sum_empty();
    for (int64_t r = 0; r < kk; ++r) bag_sum_add(sum, static_cast<double>(sorted_u[start + r]));
    k_shared[0] = dynamic_k(sum);  // floor of the exact sum, as the CPU kernel
  }
  __syncthreads();
  const int64_t k = k_shared[0];
  for (int64_t i = threadIdx.x; i < bag; i += kBlock) {
    if (qrank_buf[start + i] < k) {
      const int64_t v = vals[start + i];
      if (valid == nullptr || valid[v]) gt_inds[v] = jloc[v] + 1;
    }
  }
}

struct AssignWorkspace {
  size_t u = 0, q = 0, sorted_u = 0, jloc = 0, keys_in = 0, keys_out = 0, vals_in = 0,
         vals_out = 0, qrank = 0, temp = 0, temp_bytes = 0, total = 0;
  AssignWorkspace(DType dt, int64_t P, int64_t M) {
    if (P == 0) return;
    const size_t acc = dt == DType::kDouble ? sizeof(double) : sizeof(float);
    WorkspaceLayout w;
    u = w.take(acc * P);
    q = w.take(acc * P);
    sorted_u = w.take(acc * P);
    jloc = w.take_array<int32_t>(P);
    keys_in = w.take_array<int32_t>(P);
    keys_out = w.take_array<int32_t>(P);
    vals_in = w.take_array<int64_t>(P);
    vals_out = w.take_array<int64_t>(P);
    qrank = w.take_array<int32_t>(P);
    if (M > 0) {
      temp_bytes = sort_pairs_temp_bytes(P, bits_for(M));
      temp = w.take(temp_bytes);
    }
    total = w.total();
  }
};

}  // namespace

size_t prediction_guided_assign_workspace(DType dt, const AssignArgs& a) {
  return AssignWorkspace(dt, a.p_offsets[a.N], a.m_offsets[a.N]).total;
}

void prediction_guided_assign(DType dt, const AssignArgs& a, int64_t* gt_inds, void* q,
                              void* workspace, void* stream, int tile) {
  const int64_t P = a.p_offsets[a.N], M = a.m_offsets[a.N];
  if (P == 0) return;
  if (tile <= 0) tile = kAssignDefaultTile;
  if (tile > kAssignMaxTile) {
    throw std::invalid_argument("prediction_guided_assign: tile must be at most " +
                                std::to_string(kAssignMaxTile) + " members, got " +
                                std::to_string(tile));
  }
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  const AssignWorkspace ws(dt, P, M);
  int32_t* jloc = workspace_at<int32_t>(workspace, ws.jloc);
  int32_t* keys_in = workspace_at<int32_t>(workspace, ws.keys_in);
  int32_t* keys_out = workspace_at<int32_t>(workspace, ws.keys_out);
  int64_t* vals_in = workspace_at<int64_t>(workspace, ws.vals_in);
  int64_t* vals_out = workspace_at<int64_t>(workspace, ws.vals_out);
  int32_t* qrank = workspace_at<int32_t>(workspace, ws.qrank);
  const int64_t* const tables[2] = {a.p_offsets, a.m_offsets};
  dispatch_dtype(dt, [&](auto tag) {
    using T = typename decltype(tag)::type;
    using A = acc_t<T>;
    A* u_buf = workspace_at<A>(workspace, ws.u);
    A* q_buf = workspace_at<A>(workspace, ws.q);
    A* sorted_u = workspace_at<A>(workspace, ws.sorted_u);
    for_each_offset_chunk<2>(a.N, tables, [&](const AssignChunk& c) {
      const int64_t chunk_p = c.off[kP][c.count] - c.off[kP][0];
      if (chunk_p == 0) return;
      launch_kernel((assign_match_kernel<T, A>), dim3(static_cast<unsigned>(ceil_div(chunk_p, kBlock))),
                    kBlock, 0, s, static_cast<const T*>(a.boxes), a.bs0, a.bs1,
                    static_cast<const T*>(a.scores), a.ss0, a.ss1, a.C,
                    static_cast<const T*>(a.pseudo_boxes), a.pseudo_labels, c,
                    static_cast<A>(a.eps), static_cast<A>(a.iou_thr), a.alpha, 1.0 - a.alpha,
                    static_cast<int32_t>(M), gt_inds, static_cast<T*>(q), u_buf, q_buf, jloc,
                    keys_in, vals_in);
    });
    if (M == 0) return;
    sort_pairs(keys_in, keys_out, vals_in, vals_out, P, bits_for(M),
               workspace_at<char>(workspace, ws.temp), ws.temp_bytes, s);
    const size_t smem = static_cast<size_t>(tile) * sizeof(Member<A>);
    if (smem > kSelectNoOptInSmem) {
      // With its static shared memory (k_shared) the kernel may need more than
      // the 48 KiB a block gets without the opt-in (float64, the largest tile).
      // Always the largest tile's bytes: concurrent callers never lower it.
      set_max_dynamic_smem(assign_select_kernel<A>, kAssignMaxTile * sizeof(Member<A>));
    }
    launch_kernel((assign_select_kernel<A>), dim3(static_cast<unsigned>(M)), kBlock,
                  smem, s, keys_out, vals_out, P, u_buf,
                  q_buf, jloc, a.valid, a.topk, tile, sorted_u, qrank, gt_inds);
  });
}

}  // namespace cuda
}  // namespace tbd_ops
