// Metal instantiations of kernels/conv_transpose1d_stream.cuh, the twin of
// kernels/cuda/conv_transpose1d_stream.cu, dispatched by
// csrc/conv_transpose1d_stream_metal.cpp with the .cuh's launch plans (the ELU with
// kGatherThreads, the conv with kConvThreads threads per threadgroup) and compiled at
// first use on a Mac (csrc/metal_common.h). Here on Linux: type-checked
// (tests/test_metal_check.py), never compiled by Apple's compiler nor run. Needs MSL
// 3.0+ (32-wide SIMD groups, simd_shuffle_xor).

#include "../conv_transpose1d_stream.cuh"

#define CONVTR_DTYPE(DT, F)                                                                  \
  [[kernel]] void convtr_elu_##DT(                                                           \
      const device F::Elem* x [[buffer(0)]], device F::Elem* out [[buffer(1)]],              \
      constant GatherArgs& a [[buffer(2)]], uint g [[threadgroup_position_in_grid]],         \
      uint tid [[thread_index_in_threadgroup]]) {                                            \
    codec::gather<F>(x, nullptr, nullptr, out, nullptr, a, long(g) * kGatherThreads + tid);  \
  }                                                                                          \
  [[kernel]] void convtr_##DT(                                                               \
      const device F::Elem* x [[buffer(0)]], const device F::Elem* partial [[buffer(1)]],    \
      const device F::Elem* w [[buffer(2)]], const device F::Elem* bias [[buffer(3)]],       \
      device F::Elem* y [[buffer(4)]], device F::Elem* partial_out [[buffer(5)]],            \
      constant ConvTrArgs& a [[buffer(6)]], uint g [[threadgroup_position_in_grid]],         \
      uint tid [[thread_index_in_threadgroup]]) {                                            \
    convtr::convtr<F>(x, partial, w, bias, y, partial_out, a, g, tid);                       \
  }

CONVTR_DTYPE(f32, codec::F32)
CONVTR_DTYPE(bf16, codec::BF16)
CONVTR_DTYPE(f16, codec::F16)
