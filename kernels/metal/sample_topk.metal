// Metal instantiations of kernels/sample_topk.cuh, the twin of
// kernels/cuda/sample_topk.cu, dispatched by csrc/sample_topk_metal.cpp
// (kSampleThreads threads per threadgroup, one threadgroup per row of logits) and
// compiled at first use on a Mac in MLX's safe math mode (csrc/metal_common.h: the
// division by the temperature must round as the CPU path's). Here on Linux:
// type-checked (tests/test_metal_check.py), never compiled by Apple's compiler nor
// run. Needs MSL 3.0+ (32-wide SIMD groups).

#include "../sample_topk.cuh"

#define SAMPLE_TOPK(DT, F)                                                                  \
  [[kernel]] void sample_topk_##DT(                                                         \
      const device F::Elem* logits [[buffer(0)]], const device float* noise [[buffer(1)]],  \
      const device int* forced [[buffer(2)]], device int* out [[buffer(3)]],                \
      constant SampleArgs& a [[buffer(4)]], uint g [[threadgroup_position_in_grid]],        \
      uint tid [[thread_index_in_threadgroup]]) {                                           \
    threadgroup float red[sample_topk::kShared];                                            \
    sample_topk::sample<F>(logits, noise, forced, out, a, red, g, tid);                     \
  }

SAMPLE_TOPK(f32, pp::F32)
SAMPLE_TOPK(bf16, pp::BF16)
SAMPLE_TOPK(f16, pp::F16)
