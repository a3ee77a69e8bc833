// Metal instantiations of kernels/matvec.cuh, the twin of kernels/cuda/matvec.cu,
// dispatched by csrc/matvec_metal.cpp with matvec_launch (128 threads per
// threadgroup) and compiled at first use on a Mac (csrc/metal_common.h). Here on
// Linux: type-checked (tests/test_metal_check.py), never compiled by Apple's compiler
// nor run. Needs MSL 3.0+ (32-wide SIMD groups).

#include "../matvec.cuh"

#define MATVEC(DT, F, WN, W, MT)                                                              \
  [[kernel]] void matvec_##DT##_##WN##_m##MT(                                                  \
      const device F::Elem* x [[buffer(0)]], const device pp_u32* w [[buffer(1)]],             \
      const device F::Elem* scales [[buffer(2)]], const device F::Elem* biases [[buffer(3)]],  \
      const device F::Elem* alpha [[buffer(4)]], const device F::Elem* residual [[buffer(5)]], \
      device F::Elem* out [[buffer(6)]], constant MatvecArgs& a [[buffer(7)]],                 \
      uint3 g [[threadgroup_position_in_grid]], uint tid [[thread_index_in_threadgroup]]) {    \
    threadgroup float smem[matvec::kWarps * matvec::kRows * MT + MT];                          \
    matvec::matvec<F, W, MT>(x, w, scales, biases, alpha, residual, out, a, smem, g.x, g.y,    \
                             tid);                                                             \
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
