// CUDA instantiations of kernels/depformer_frame.cuh, loaded as CUfunctions (see
// csrc/cuda_common.h). Names: embed_add_<dtype>.

#include "../depformer_frame.cuh"

#define EMBED_ADD(DT, F)                                                                        \
  extern "C" __global__ void __launch_bounds__(kEmbedThreads) embed_add_##DT(                   \
      const F::Elem* pre, const F::Elem* table, const int* tokens, F::Elem* out, EmbedArgs a) { \
    pp_grid_dependency();                                                                       \
    depformer_frame::embed_add<F>(pre, table, tokens, out, a,                                   \
                                  long(blockIdx.x) * kEmbedThreads + threadIdx.x);              \
  }

EMBED_ADD(f32, pp::F32)
EMBED_ADD(bf16, pp::BF16)
EMBED_ADD(f16, pp::F16)
