// CUDA instantiations of kernels/matvec.cuh, loaded as CUfunctions (see
// csrc/cuda_common.h). Names: matvec_<dtype>_<dense|q4|q8>_m<rows of x per block>.

#include "../matvec.cuh"

#define MATVEC(DT, F, WN, W, MT)                                                              \
  extern "C" __global__ void __launch_bounds__(matvec::kThreads) matvec_##DT##_##WN##_m##MT(   \
      const F::Elem* x, const pp_u32* w, const F::Elem* scales, const F::Elem* biases,         \
      const F::Elem* alpha, const F::Elem* residual, F::Elem* out, MatvecArgs a) {             \
    pp_grid_dependency();                                                                      \
    __shared__ float smem[matvec::kWarps * matvec::kRows * MT + MT];                           \
    matvec::matvec<F, W, MT>(x, w, scales, biases, alpha, residual, out, a, smem, blockIdx.x,  \
                             blockIdx.y, threadIdx.x);                                         \
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

// V: the Plan's variant (kernels ..._ahead, ..._ring, ..._ring_ahead, ..._wring; csrc/cuda_nodes.h
// picks them). The ring kernels' tiles are dynamic workgroup memory (matvec_tc_dynamic_smem:
// more than a static array may have).
extern __shared__ __align__(16) unsigned char matvec_tc_ring_tiles[];
#define MATVEC_TC_KERNEL(DT, F, WN, W, NT, V, SUFFIX)                                               \
  extern "C" __global__ void __launch_bounds__(matvec_tc::kThreads, (matvec_tc::Plan<W, NT, V>::kMinBlocks)) \
      matvec_tc_##DT##_##WN##_n##NT##SUFFIX(                                                         \
          const F::Elem* x, const pp_u32* w, const F::Elem* scales, const F::Elem* biases,           \
          const F::Elem* alpha, const float* inv_rms, float* part, MatvecTcArgs a) {                 \
    pp_grid_dependency();                                                                            \
    constexpr bool ring = matvec_tc::Plan<W, NT, V>::kRing;                                          \
    __shared__ __align__(16) F::Elem tile[ring ? 8 : NT * 8 * matvec_tc::kStep];                     \
    F::Elem* xs = ring ? reinterpret_cast<F::Elem*>(matvec_tc_ring_tiles) : tile;                    \
    matvec_tc::project<F, W, NT, V>(x, w, scales, biases, alpha, inv_rms, part, a, xs, blockIdx.x,   \
                                    blockIdx.y, threadIdx.x);                                        \
  }

#define MATVEC_TC(DT, F, WN, W, NT) MATVEC_TC_KERNEL(DT, F, WN, W, NT, 0, )
#define MATVEC_TC_RING(DT, F, WN, W, NT) MATVEC_TC_KERNEL(DT, F, WN, W, NT, PP_MATVEC_TC_RING, _ring)

#define MATVEC_TC_N(DT, F, WN, W)                                                                    \
  PP_TILES(MATVEC_TC, DT, F, WN, W)                                                                  \
  MATVEC_TC_RING(DT, F, WN, W, 2) MATVEC_TC_RING(DT, F, WN, W, 4) MATVEC_TC_RING(DT, F, WN, W, 8)

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
MATVEC_TC_KERNEL(bf16, pp::BF16, q4, matvec::Affine<4>, 1, PP_MATVEC_TC_AHEAD, _ahead)
MATVEC_TC_KERNEL(f16, pp::F16, q4, matvec::Affine<4>, 1, PP_MATVEC_TC_AHEAD, _ahead)
// From 2 n8 tiles: the x ring and the next step's weights in flight.
#define MATVEC_TC_RING_AHEAD(DT, F, NT) \
  MATVEC_TC_KERNEL(DT, F, q4, matvec::Affine<4>, NT, PP_MATVEC_TC_RING | PP_MATVEC_TC_AHEAD, _ring_ahead)
MATVEC_TC_RING_AHEAD(bf16, pp::BF16, 2) MATVEC_TC_RING_AHEAD(bf16, pp::BF16, 4) MATVEC_TC_RING_AHEAD(bf16, pp::BF16, 8)
MATVEC_TC_RING_AHEAD(f16, pp::F16, 2) MATVEC_TC_RING_AHEAD(f16, pp::F16, 4) MATVEC_TC_RING_AHEAD(f16, pp::F16, 8)
// 4-bit weights in the ring too (PERSONAPLEX_MATVEC_TC_WRING=1), every tile count.
#define MATVEC_TC_WRING(DT, F, WN, W, NT) MATVEC_TC_KERNEL(DT, F, WN, W, NT, PP_MATVEC_TC_RING | PP_MATVEC_TC_WRING, _wring)
PP_TILES(MATVEC_TC_WRING, bf16, pp::BF16, q4, matvec::Affine<4>)
PP_TILES(MATVEC_TC_WRING, f16, pp::F16, q4, matvec::Affine<4>)
