// CUDA instantiations of kernels/rvq.cuh. Built by nvcc into a fatbin that the
// extension embeds and loads with cuModuleLoadData (see csrc/cuda_common.h).
// Names: rvq_encode, rvq_decode (float32 only, as the primitives).

#include "../rvq.cuh"

extern "C" __global__ void __launch_bounds__(rvq::kThreads)
    rvq_encode(const float* x, const float* books, int* codes, float* res, RvqArgs a) {
  __shared__ float sd[rvq::kWarps];
  __shared__ int sj[rvq::kWarps];
  rvq::encode(x, books, codes, res, a, sd, sj, blockIdx.x, threadIdx.x);
}

extern "C" __global__ void __launch_bounds__(kRvqDecodeThreads)
    rvq_decode(const int* codes, const float* books, float* out, RvqArgs a) {
  rvq::decode(codes, books, out, a, long(blockIdx.x) * kRvqDecodeThreads + threadIdx.x);
}
