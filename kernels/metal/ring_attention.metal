// Metal instantiations of kernels/ring_attention.cuh, the twin of
// kernels/cuda/ring_attention.cu, dispatched by csrc/ring_attention_metal.cpp with the
// .cuh's launch plans (128 threads per threadgroup) and compiled at first use on a
// Mac (csrc/metal_common.h). Here on Linux: type-checked (tests/test_metal_check.py),
// never compiled by Apple's compiler nor run. Needs MSL 3.0+ (32-wide SIMD groups,
// simd_shuffle_xor). The 8-bit ring's kernels (_i8) are the tick program's, which has
// no Metal host yet: here they are type-checked only.

#include "../ring_attention.cuh"

#define RING_ATTEND(DT, F, D, TQ)                                                              \
  [[kernel]] void ring_attend_##DT##_d##D##_q##TQ(                                             \
      const device F::Elem* q [[buffer(0)]], const device F::Elem* k [[buffer(1)]],            \
      const device F::Elem* v [[buffer(2)]], const device F::Elem* kc [[buffer(3)]],           \
      const device F::Elem* vc [[buffer(4)]], const device int* pos [[buffer(5)]],             \
      device float* ws [[buffer(6)]], constant RingArgs& a [[buffer(7)]],                      \
      uint3 g [[threadgroup_position_in_grid]], uint tid [[thread_index_in_threadgroup]]) {    \
    threadgroup float smem[ring::kWarps * TQ * (D + 2)];                                       \
    ring::attend<F, ring::Plain<F>, D, TQ>(q, k, v, kc, vc, nullptr, nullptr, pos, ws, a, smem, \
                                           g.x, g.y, g.z, tid);                                \
  }                                                                                            \
  [[kernel]] void ring_attend_##DT##_i8_d##D##_q##TQ(                                          \
      const device F::Elem* q [[buffer(0)]], const device F::Elem* k [[buffer(1)]],            \
      const device F::Elem* v [[buffer(2)]], const device uchar* kc [[buffer(3)]],             \
      const device uchar* vc [[buffer(4)]], const device float* ks [[buffer(5)]],              \
      const device float* vs [[buffer(6)]], const device int* pos [[buffer(7)]],               \
      device float* ws [[buffer(8)]], constant RingArgs& a [[buffer(9)]],                      \
      uint3 g [[threadgroup_position_in_grid]], uint tid [[thread_index_in_threadgroup]]) {    \
    threadgroup float smem[ring::kWarps * TQ * (D + 2)];                                       \
    ring::attend<F, ring::Int8Rows<F>, D, TQ>(q, k, v, kc, vc, ks, vs, pos, ws, a, smem, g.x,  \
                                              g.y, g.z, tid);                                  \
  }

#define RING_FINISH(DT, F)                                                                     \
  [[kernel]] void ring_finish_##DT(                                                            \
      const device float* ws [[buffer(0)]], const device F::Elem* k [[buffer(1)]],             \
      const device F::Elem* v [[buffer(2)]], const device int* pos [[buffer(3)]],              \
      const device F::Elem* kc [[buffer(4)]], const device F::Elem* vc [[buffer(5)]],          \
      device F::Elem* out [[buffer(6)]], device F::Elem* kc_out [[buffer(7)]],                 \
      device F::Elem* vc_out [[buffer(8)]], constant RingArgs& a [[buffer(9)]],                \
      uint3 g [[threadgroup_position_in_grid]], uint tid [[thread_index_in_threadgroup]]) {    \
    ring::finish<F, ring::Plain<F>>(ws, k, v, pos, kc, vc, nullptr, nullptr, out, kc_out,      \
                                    vc_out, nullptr, nullptr, a, g.x, g.y, tid);               \
  }                                                                                            \
  [[kernel]] void ring_finish_##DT##_i8(                                                       \
      const device float* ws [[buffer(0)]], const device F::Elem* k [[buffer(1)]],             \
      const device F::Elem* v [[buffer(2)]], const device int* pos [[buffer(3)]],              \
      const device uchar* kc [[buffer(4)]], const device uchar* vc [[buffer(5)]],              \
      const device float* ks [[buffer(6)]], const device float* vs [[buffer(7)]],              \
      device F::Elem* out [[buffer(8)]], device uchar* kc_out [[buffer(9)]],                   \
      device uchar* vc_out [[buffer(10)]], device float* ks_out [[buffer(11)]],                \
      device float* vs_out [[buffer(12)]], constant RingArgs& a [[buffer(13)]],                \
      uint3 g [[threadgroup_position_in_grid]], uint tid [[thread_index_in_threadgroup]]) {    \
    ring::finish<F, ring::Int8Rows<F>>(ws, k, v, pos, kc, vc, ks, vs, out, kc_out, vc_out,     \
                                       ks_out, vs_out, a, g.x, g.y, tid);                      \
  }

#define RING_DTYPE(DT, F) \
  RING_ATTEND(DT, F, 16, 1)  \
  RING_ATTEND(DT, F, 16, 4)  \
  RING_ATTEND(DT, F, 32, 1)  \
  RING_ATTEND(DT, F, 32, 4)  \
  RING_ATTEND(DT, F, 64, 1)  \
  RING_ATTEND(DT, F, 64, 4)  \
  RING_ATTEND(DT, F, 128, 1) \
  RING_ATTEND(DT, F, 128, 4) \
  RING_FINISH(DT, F)

RING_DTYPE(f32, ring::F32)
RING_DTYPE(bf16, ring::BF16)
RING_DTYPE(f16, ring::F16)
