// Metal instantiations of kernels/rvq.cuh, the twin of kernels/cuda/rvq.cu,
// dispatched by csrc/rvq_metal.cpp and compiled at first use on a Mac in MLX's safe
// math mode (csrc/metal_common.h; the unfused products and sums of portable.h's
// pp_mul_rn / pp_add_rn keep the codes equal to the CPU path's). Here on Linux:
// type-checked (tests/test_metal_check.py), never compiled by Apple's compiler nor
// run. Needs MSL 3.0+ (32-wide SIMD groups).
// Dispatch as csrc/rvq_cuda.cpp launches: rvq_encode_v<V> (V = rvq_encode_vectors
// (n, S, n_q, D, GPU cores)) n_q + 1 times in order on one command buffer (each
// dispatch reads the workspace `part` that the earlier ones wrote, so they must
// not overlap), q = 0..n_q, with kRvqEncodeThreads threads per threadgroup,
// threadgroups (ceil(n / V), S) for q < n_q and (ceil(n / V), 1) for q = n_q,
// S = rvq_encode_splits(bins), `part` a float32 buffer of n * n_q * S * 2, and
// threadgroup memory 0 of rvq_encode_smem_floats(V, n_q, D) floats
// (setThreadgroupMemoryLength, rounded up to 16 bytes; Apple GPUs allow 32 KB, so
// halve V to fit, and D + n_q + 16 must stay within 8192). rvq_decode:
// kRvqDecodeThreads threads per threadgroup, one thread per output element.

#include "../rvq.cuh"

#define RVQ_ENCODE(V)                                                                          \
  [[kernel]] void rvq_encode_v##V(const device float* x [[buffer(0)]],                          \
                                  const device float* books [[buffer(1)]],                      \
                                  device int* codes [[buffer(2)]],                              \
                                  device float* part [[buffer(3)]],                             \
                                  constant RvqArgs& a [[buffer(4)]],                            \
                                  constant int& q [[buffer(5)]], constant int& S [[buffer(6)]], \
                                  threadgroup float* smem [[threadgroup(0)]],                   \
                                  uint2 g [[threadgroup_position_in_grid]],                     \
                                  uint tid [[thread_index_in_threadgroup]]) {                   \
    rvq::encode<V>(x, books, codes, part, a, q, S, smem, g.x, g.y, tid);                       \
  }
RVQ_ENCODE(1)
RVQ_ENCODE(2)
RVQ_ENCODE(4)  // kRvqMaxVectors

[[kernel]] void rvq_decode(const device int* codes [[buffer(0)]],
                           const device float* books [[buffer(1)]],
                           device float* out [[buffer(2)]], constant RvqArgs& a [[buffer(3)]],
                           uint g [[threadgroup_position_in_grid]],
                           uint tid [[thread_index_in_threadgroup]]) {
  rvq::decode(codes, books, out, a, long(g) * kRvqDecodeThreads + tid);
}
