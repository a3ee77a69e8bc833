// CUDA instantiations of kernels/rvq.cuh. Built by nvcc into a fatbin that the
// extension embeds and loads with cuModuleLoadData (see csrc/cuda_common.h).
// Names: rvq_encode_v1, _v2, _v4 (V vectors per block), rvq_decode (float32 only,
// as the primitives).

#include "../rvq.cuh"

// Launch q of the encoder: grid (ceil(n / V), S), dynamic shared memory of
// rvq_encode_smem_floats(V, n_q, D) floats (see csrc/rvq_cuda.cpp).
#define RVQ_ENCODE(V)                                                                        \
  extern "C" __global__ void __launch_bounds__(rvq::kThreads) rvq_encode_v##V(               \
      const float* x, const float* books, int* codes, float* part, RvqArgs a, int q, int S) { \
    pp_grid_dependency();                                                                    \
    extern __shared__ float smem[];                                                          \
    rvq::encode<V>(x, books, codes, part, a, q, S, smem, blockIdx.x, blockIdx.y, threadIdx.x); \
  }
RVQ_ENCODE(1)
RVQ_ENCODE(2)
RVQ_ENCODE(4)  // kRvqMaxVectors

extern "C" __global__ void __launch_bounds__(kRvqDecodeThreads)
    rvq_decode(const int* codes, const float* books, float* out, RvqArgs a) {
  pp_grid_dependency();
  rvq::decode(codes, books, out, a, long(blockIdx.x) * kRvqDecodeThreads + threadIdx.x);
}
