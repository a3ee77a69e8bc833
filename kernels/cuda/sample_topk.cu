// CUDA instantiations of kernels/sample_topk.cuh, loaded as CUfunctions (see
// csrc/cuda_common.h). Names: sample_topk_<dtype of the logits>.

#include "../sample_topk.cuh"

#define SAMPLE_TOPK(DT, F)                                                                      \
  extern "C" __global__ void __launch_bounds__(sample_topk::kThreads) sample_topk_##DT(         \
      const F::Elem* logits, const float* noise, const int* forced, int* out, SampleArgs a) {   \
    pp_grid_dependency();                                                                       \
    __shared__ float red[sample_topk::kShared];                                                 \
    sample_topk::sample<F>(logits, noise, forced, out, a, red, blockIdx.x, threadIdx.x);        \
  }

SAMPLE_TOPK(f32, pp::F32)
SAMPLE_TOPK(bf16, pp::BF16)
SAMPLE_TOPK(f16, pp::F16)
