// CUDA instantiations of kernels/conv_transpose1d_stream.cuh (and codec.cuh's
// gather, as the ELU of x). Built by nvcc into a fatbin that the extension embeds
// and loads with cuModuleLoadData (see csrc/cuda_common.h).
// Names: convtr_elu_<dtype>, convtr_<dtype>.

#include "../conv_transpose1d_stream.cuh"

#define CONVTR_DTYPE(DT, F)                                                                  \
  extern "C" __global__ void __launch_bounds__(kGatherThreads) convtr_elu_##DT(              \
      const F::Elem* x, F::Elem* out, GatherArgs a) {                                        \
    pp_grid_dependency();                                                                    \
    codec::gather<F>(x, nullptr, nullptr, out, nullptr, a,                                   \
                     long(blockIdx.x) * kGatherThreads + threadIdx.x);                       \
  }                                                                                          \
  extern "C" __global__ void __launch_bounds__(kConvThreads) convtr_##DT(                    \
      const F::Elem* x, const F::Elem* partial, const F::Elem* w, const F::Elem* bias,       \
      F::Elem* y, F::Elem* partial_out, ConvTrArgs a) {                                      \
    pp_grid_dependency();                                                                    \
    convtr::convtr<F>(x, partial, w, bias, y, partial_out, a, blockIdx.x, threadIdx.x);      \
  }

CONVTR_DTYPE(f32, codec::F32)
CONVTR_DTYPE(bf16, codec::BF16)
CONVTR_DTYPE(f16, codec::F16)
