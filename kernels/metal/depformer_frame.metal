// Metal instantiations of kernels/depformer_frame.cuh, the twin of
// kernels/cuda/depformer_frame.cu, dispatched by csrc/depformer_frame_metal.cpp
// (embed_add_launch: kEmbedThreads threads per threadgroup over B * D elements) and
// compiled at first use on a Mac (csrc/metal_common.h). Here on Linux: type-checked
// (tests/test_metal_check.py), never compiled by Apple's compiler nor run.

#include "../depformer_frame.cuh"

#define EMBED_ADD(DT, F)                                                                    \
  [[kernel]] void embed_add_##DT(                                                           \
      const device F::Elem* pre [[buffer(0)]], const device F::Elem* table [[buffer(1)]],   \
      const device int* tokens [[buffer(2)]], device F::Elem* out [[buffer(3)]],            \
      constant EmbedArgs& a [[buffer(4)]], uint g [[threadgroup_position_in_grid]],         \
      uint tid [[thread_index_in_threadgroup]]) {                                           \
    depformer_frame::embed_add<F>(pre, table, tokens, out, a, long(g) * kEmbedThreads + tid); \
  }

EMBED_ADD(f32, pp::F32)
EMBED_ADD(bf16, pp::BF16)
EMBED_ADD(f16, pp::F16)
