// Metal instantiations of kernels/conv1d_stream.cuh, the twin of
// kernels/cuda/conv1d_stream.cu, dispatched by csrc/conv1d_stream_metal.cpp with the
// .cuh's launch plans (the gather with kGatherThreads, the conv with kConvThreads
// threads per threadgroup) and compiled at first use on a Mac (csrc/metal_common.h).
// Here on Linux: type-checked (tests/test_metal_check.py), never compiled by Apple's
// compiler nor run. Needs MSL 3.0+ (32-wide SIMD groups, simd_shuffle_xor).

#include "../conv1d_stream.cuh"

#define CONV1D_DTYPE(DT, F)                                                                  \
  [[kernel]] void conv1d_gather_##DT(                                                        \
      const device F::Elem* x [[buffer(0)]], const device F::Elem* prev [[buffer(1)]],       \
      const device unsigned char* first [[buffer(2)]], device F::Elem* buf [[buffer(3)]],    \
      device F::Elem* prev_out [[buffer(4)]], constant GatherArgs& a [[buffer(5)]],          \
      uint g [[threadgroup_position_in_grid]], uint tid [[thread_index_in_threadgroup]]) {   \
    codec::gather<F>(x, prev, first, buf, prev_out, a, long(g) * kGatherThreads + tid);      \
  }                                                                                          \
  [[kernel]] void conv1d_##DT(                                                               \
      const device F::Elem* buf [[buffer(0)]], const device F::Elem* w [[buffer(1)]],        \
      const device F::Elem* bias [[buffer(2)]], device F::Elem* y [[buffer(3)]],             \
      constant Conv1dArgs& a [[buffer(4)]], uint g [[threadgroup_position_in_grid]],         \
      uint tid [[thread_index_in_threadgroup]]) {                                            \
    conv1d::conv<F>(buf, w, bias, y, a, g, tid);                                             \
  }

CONV1D_DTYPE(f32, codec::F32)
CONV1D_DTYPE(bf16, codec::BF16)
CONV1D_DTYPE(f16, codec::F16)
