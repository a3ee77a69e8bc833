// CUDA instantiations of kernels/conv1d_stream.cuh (and codec.cuh's gather). Built
// by nvcc into a fatbin that the extension embeds and loads with cuModuleLoadData
// (see csrc/cuda_common.h). Names: conv1d_gather_<dtype>, conv1d_<dtype>.

#include "../conv1d_stream.cuh"

#define CONV1D_DTYPE(DT, F)                                                                  \
  extern "C" __global__ void __launch_bounds__(kGatherThreads) conv1d_gather_##DT(           \
      const F::Elem* x, const F::Elem* prev, const unsigned char* first, F::Elem* buf,       \
      F::Elem* prev_out, GatherArgs a) {                                                     \
    pp_grid_dependency();                                                                    \
    codec::gather<F>(x, prev, first, buf, prev_out, a,                                       \
                     long(blockIdx.x) * kGatherThreads + threadIdx.x);                       \
  }                                                                                          \
  extern "C" __global__ void __launch_bounds__(kConvThreads) conv1d_##DT(                    \
      const F::Elem* buf, const F::Elem* w, const F::Elem* bias, F::Elem* y, Conv1dArgs a) { \
    pp_grid_dependency();                                                                    \
    conv1d::conv<F>(buf, w, bias, y, a, blockIdx.x, threadIdx.x);                            \
  }

CONV1D_DTYPE(f32, codec::F32)
CONV1D_DTYPE(bf16, codec::BF16)
CONV1D_DTYPE(f16, codec::F16)
