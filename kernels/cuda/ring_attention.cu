// CUDA instantiations of kernels/ring_attention.cuh. Built by nvcc into a fatbin
// that the extension embeds and loads with cuModuleLoadData (see
// csrc/ring_attention_cuda.cpp for why not as ordinary runtime kernels).
// Names: ring_attend_<dtype>_d<head dim>_q<queries per block>, ring_finish_<dtype>;
// with an 8-bit ring (int8 codes and float32 row scales, the tick program's
// Engine(kv_bits=8)): ring_attend_<dtype>_i8_d<head dim>_q<queries per block>,
// ring_finish_<dtype>_i8.

#include "../ring_attention.cuh"

#define RING_ATTEND(DT, F, D, TQ)                                                              \
  extern "C" __global__ void __launch_bounds__(ring::kThreads)                                 \
      ring_attend_##DT##_d##D##_q##TQ(const F::Elem* q, const F::Elem* k, const F::Elem* v,    \
                                      const F::Elem* kc, const F::Elem* vc, const int* pos,    \
                                      float* ws, RingArgs a) {                                 \
    pp_grid_dependency();                                                                      \
    __shared__ float smem[ring::kWarps * TQ * (D + 2)];                                        \
    ring::attend<F, ring::Plain<F>, D, TQ>(q, k, v, kc, vc, nullptr, nullptr, pos, ws, a, smem, \
                                           blockIdx.x, blockIdx.y, blockIdx.z, threadIdx.x);   \
  }                                                                                            \
  extern "C" __global__ void __launch_bounds__(ring::kThreads)                                 \
      ring_attend_##DT##_i8_d##D##_q##TQ(const F::Elem* q, const F::Elem* k, const F::Elem* v, \
                                         const unsigned char* kc, const unsigned char* vc,     \
                                         const float* ks, const float* vs, const int* pos,     \
                                         float* ws, RingArgs a) {                              \
    pp_grid_dependency();                                                                      \
    __shared__ float smem[ring::kWarps * TQ * (D + 2)];                                        \
    ring::attend<F, ring::Int8Rows<F>, D, TQ>(q, k, v, kc, vc, ks, vs, pos, ws, a, smem,       \
                                              blockIdx.x, blockIdx.y, blockIdx.z, threadIdx.x); \
  }

#define RING_FINISH(DT, F)                                                                     \
  extern "C" __global__ void __launch_bounds__(ring::kThreads) ring_finish_##DT(               \
      const float* ws, const F::Elem* k, const F::Elem* v, const int* pos, const F::Elem* kc,  \
      const F::Elem* vc, F::Elem* out, F::Elem* kc_out, F::Elem* vc_out, RingArgs a) {         \
    pp_grid_dependency();                                                                      \
    ring::finish<F, ring::Plain<F>>(ws, k, v, pos, kc, vc, nullptr, nullptr, out, kc_out,      \
                                    vc_out, nullptr, nullptr, a, blockIdx.x, blockIdx.y,       \
                                    threadIdx.x);                                              \
  }                                                                                            \
  extern "C" __global__ void __launch_bounds__(ring::kThreads) ring_finish_##DT##_i8(          \
      const float* ws, const F::Elem* k, const F::Elem* v, const int* pos,                     \
      const unsigned char* kc, const unsigned char* vc, const float* ks, const float* vs,      \
      F::Elem* out, unsigned char* kc_out, unsigned char* vc_out, float* ks_out,               \
      float* vs_out, RingArgs a) {                                                             \
    pp_grid_dependency();                                                                      \
    ring::finish<F, ring::Int8Rows<F>>(ws, k, v, pos, kc, vc, ks, vs, out, kc_out, vc_out,     \
                                       ks_out, vs_out, a, blockIdx.x, blockIdx.y, threadIdx.x); \
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
