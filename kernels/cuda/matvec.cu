// CUDA instantiations of kernels/matvec.cuh, loaded as CUfunctions (see
// csrc/cuda_common.h). Names: matvec_<dtype>_<dense|q4|q8>_m<rows of x per block>.

#include "../matvec.cuh"

#define MATVEC(DT, F, WN, W, MT)                                                              \
  extern "C" __global__ void __launch_bounds__(matvec::kThreads) matvec_##DT##_##WN##_m##MT(   \
      const F::Elem* x, const pp_u32* w, const F::Elem* scales, const F::Elem* biases,         \
      const F::Elem* alpha, const F::Elem* residual, F::Elem* out, MatvecArgs a) {             \
    __shared__ float smem[matvec::kWarps * matvec::kRows * MT + MT];                           \
    matvec::matvec<F, W, MT>(x, w, scales, biases, alpha, residual, out, a, smem, blockIdx.x,  \
                             blockIdx.y, threadIdx.x);                                         \
  }

#define MATVEC_M(DT, F, WN, W) \
  MATVEC(DT, F, WN, W, 1)      \
  MATVEC(DT, F, WN, W, 2)      \
  MATVEC(DT, F, WN, W, 4)      \
  MATVEC(DT, F, WN, W, 8)

#define MATVEC_DTYPE(DT, F)                       \
  MATVEC_M(DT, F, dense, matvec::Dense<F>)        \
  MATVEC_M(DT, F, q4, matvec::Affine<4>)          \
  MATVEC_M(DT, F, q8, matvec::Affine<8>)

MATVEC_DTYPE(f32, pp::F32)
MATVEC_DTYPE(bf16, pp::BF16)
MATVEC_DTYPE(f16, pp::F16)
