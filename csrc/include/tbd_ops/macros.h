// The one macro of the shared headers: TBD_HD marks a function as callable
// from host and device code (inline on the host compiler, forced inline
// __host__ __device__ under nvcc). The math itself is in tbd_ops/math.h.
#pragma once

#if defined(__CUDACC__) || defined(__HIPCC__)
#define TBD_HD __host__ __device__ __forceinline__
#else
#define TBD_HD inline
#endif
