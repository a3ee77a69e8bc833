// CUDA instantiations of kernels/matvec.cuh, loaded as CUfunctions (see
// csrc/cuda_common.h). Names: matvec_<dtype>_<dense|q4|q8>_m<rows of x per block>.

#include "../matvec.cuh"

#define MATVEC(DT, F, WN, W, MT)                                                              \
  extern "C" __global__ void __launch_bounds__(matvec::kThreads) matvec_##DT##_##WN##_m##MT(   \
      const F::Elem* x, const pp_u32* w, const F::Elem* scales, const F::Elem* biases,         \
      const F::Elem* alpha, const F::Elem* residual, F::Elem* out, MatvecArgs a) {             \
    __shared__ float smem[matvec::kWarps * matvec::kRows * MT + MT];                           \
    matvec::matvec<F, W, MT>(x, w, scales, biases, alpha, residual, out, a, smem, blockIdx.x,  \
                             blockIdx.y, threadIdx.x, [] { pp_grid_dependency(); });          \
  }

// KERNEL(..., n) for the 4 tile sizes of rows of x each family is instantiated for.
#define PP_TILES(KERNEL, DT, F, WN, W) KERNEL(DT, F, WN, W, 1) KERNEL(DT, F, WN, W, 2) KERNEL(DT, F, WN, W, 4) \
  KERNEL(DT, F, WN, W, 8)

#define MATVEC_M(DT, F, WN, W) PP_TILES(MATVEC, DT, F, WN, W)

#define MATVEC_DTYPE(DT, F)                       \
  MATVEC_M(DT, F, dense, matvec::Dense<F>)        \
  MATVEC_M(DT, F, q4, matvec::Affine<4>)          \
  MATVEC_M(DT, F, q8, matvec::Affine<8>)

MATVEC_DTYPE(f32, pp::F32)
MATVEC_DTYPE(bf16, pp::BF16)
MATVEC_DTYPE(f16, pp::F16)

// The tensor-core path (kernels/matvec_tc.cuh), 16-bit x only: matvec_tc_rms_<dtype>,
// matvec_tc_<dtype>_<dense|q4|q8>_n<n8 tiles of x rows>, matvec_tc_finish_<dtype>.
#include "../matvec_tc.cuh"

// AHEAD: the Plan's load-ahead (kernels ..._ahead, csrc/cuda_nodes.h picks them).
#define MATVEC_TC_KERNEL(DT, F, WN, W, NT, AHEAD, SUFFIX)                                           \
  extern "C" __global__ void __launch_bounds__(matvec_tc::kThreads,                                  \
                                               (matvec_tc::Plan<W, NT, AHEAD>::kMinBlocks))          \
      matvec_tc_##DT##_##WN##_n##NT##SUFFIX(                                                         \
          const F::Elem* x, const pp_u32* w, const F::Elem* scales, const F::Elem* biases,           \
          const F::Elem* alpha, const float* inv_rms, float* part, MatvecTcArgs a) {                 \
    __shared__ __align__(16) F::Elem xs[NT * 8 * matvec_tc::kStep];                                  \
    matvec_tc::project<F, W, NT, AHEAD>(x, w, scales, biases, alpha, inv_rms, part, a, xs, blockIdx.x, \
                                        blockIdx.y, threadIdx.x, [] { pp_grid_dependency(); });      \
  }

#define MATVEC_TC(DT, F, WN, W, NT) MATVEC_TC_KERNEL(DT, F, WN, W, NT, false, )

#define MATVEC_TC_N(DT, F, WN, W) PP_TILES(MATVEC_TC, DT, F, WN, W)

#define MATVEC_TC_DTYPE(DT, F)                                                                       \
  MATVEC_TC_N(DT, F, dense, matvec::Dense<F>)                                                        \
  MATVEC_TC_N(DT, F, q4, matvec::Affine<4>)                                                          \
  MATVEC_TC_N(DT, F, q8, matvec::Affine<8>)                                                          \
  extern "C" __global__ void __launch_bounds__(matvec_tc::kThreads)                                  \
      matvec_tc_rms_##DT(const F::Elem* x, float* inv_rms, MatvecTcArgs a) {                         \
    pp_grid_dependency();                                                                            \
    __shared__ float smem[matvec_tc::kWarps];                                                        \
    matvec_tc::rms<F>(x, inv_rms, a, smem, blockIdx.x, threadIdx.x);                                 \
  }                                                                                                  \
  extern "C" __global__ void __launch_bounds__(kMatvecTcFinishThreads)                               \
      matvec_tc_finish_##DT(const float* part, const F::Elem* residual, F::Elem* out, MatvecTcArgs a) { \
    pp_grid_dependency();                                                                            \
    matvec_tc::finish<F>(part, residual, out, a, long(blockIdx.x) * blockDim.x + threadIdx.x);       \
  }

MATVEC_TC_DTYPE(bf16, pp::BF16)
MATVEC_TC_DTYPE(f16, pp::F16)

// 4-bit weights and up to 8 rows of x, loading the next step ahead (PERSONAPLEX_MATVEC_TC_AHEAD=1):
// measured against the default.
MATVEC_TC_KERNEL(bf16, pp::BF16, q4, matvec::Affine<4>, 1, true, _ahead)
MATVEC_TC_KERNEL(f16, pp::F16, q4, matvec::Affine<4>, 1, true, _ahead)
