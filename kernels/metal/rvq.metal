// Metal instantiations of kernels/rvq.cuh, the twin of kernels/cuda/rvq.cu.
// NOT YET COMPILED: no Metal toolchain on this project's Linux machines, and no
// eval_gpu for Metal is wired up. Needs MSL 3.0+ (32-wide SIMD groups) and
// -fno-fast-math -ffp-contract=off, or the codes may differ from the CPU path's
// (portable.h, pp_mul_rn). Dispatch rvq_encode with kRvqEncodeThreads threads
// per threadgroup, one threadgroup per vector; rvq_decode with kRvqDecodeThreads.

#include "../rvq.cuh"

[[kernel]] void rvq_encode(const device float* x [[buffer(0)]],
                           const device float* books [[buffer(1)]],
                           device int* codes [[buffer(2)]], device float* res [[buffer(3)]],
                           constant RvqArgs& a [[buffer(4)]],
                           uint g [[threadgroup_position_in_grid]],
                           uint tid [[thread_index_in_threadgroup]]) {
  threadgroup float sd[rvq::kWarps];
  threadgroup int sj[rvq::kWarps];
  rvq::encode(x, books, codes, res, a, sd, sj, g, tid);
}

[[kernel]] void rvq_decode(const device int* codes [[buffer(0)]],
                           const device float* books [[buffer(1)]],
                           device float* out [[buffer(2)]], constant RvqArgs& a [[buffer(3)]],
                           uint g [[threadgroup_position_in_grid]],
                           uint tid [[thread_index_in_threadgroup]]) {
  rvq::decode(codes, books, out, a, long(g) * kRvqDecodeThreads + tid);
}
