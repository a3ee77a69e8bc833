// Storage formats shared by the kernel bodies: float32, bfloat16 and float16
// handled as raw bits and converted in registers (no bf16 type is common to
// CUDA and Metal). Arithmetic is float32; stores round as MLX's astype does.

#pragma once

#include "portable.h"

namespace pp {

struct F32 {
  typedef pp_u32 Elem;
  static PP_CONSTANT constexpr int kPerVec = 4;
  static PP_DEVICE float load(pp_u32 e) { return pp_bits_to_float(e); }
  static PP_DEVICE pp_u32 store(float f) { return pp_float_to_bits(f); }
};

struct BF16 {
  typedef pp_u16 Elem;
  static PP_CONSTANT constexpr int kPerVec = 8;
  static PP_DEVICE float load(pp_u32 e) { return pp_bits_to_float(e << 16); }
  static PP_DEVICE pp_u16 store(float f) {  // round to nearest even, as MLX's astype
    pp_u32 u = pp_float_to_bits(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) return pp_u16(0x7fc0);
    return pp_u16((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
  }
};

struct F16 {
  typedef pp_u16 Elem;
  static PP_CONSTANT constexpr int kPerVec = 8;
  static PP_DEVICE float load(pp_u32 e) { return pp_half_to_float(pp_u16(e)); }
  static PP_DEVICE pp_u16 store(float f) { return pp_float_to_half(f); }
};

template <class F>
PP_DEVICE float round_trip(float x) { return F::load(F::store(x)); }

// Two values stored as one register of 16-bit elements, lo in the low half (16-bit F).
template <class F>
PP_DEVICE pp_u32 pack2(float lo, float hi) { return pp_u32(F::store(lo)) | (pp_u32(F::store(hi)) << 16); }
#if defined(__CUDACC__)
template <>  // one cvt instruction, rounding as BF16::store does
PP_DEVICE pp_u32 pack2<BF16>(float lo, float hi) {
  const __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<const pp_u32*>(&h);
}
template <>
PP_DEVICE pp_u32 pack2<F16>(float lo, float hi) {
  const __half2 h = __floats2half2_rn(lo, hi);
  return *reinterpret_cast<const pp_u32*>(&h);
}
#endif

template <class F>
PP_DEVICE void unpack(pp_u32x4 r, PP_THREAD float* out) {
  pp_u32 w[4] = {r.x, r.y, r.z, r.w};
  #pragma unroll
  for (int i = 0; i < 4; ++i) {
    if (F::kPerVec == 4) {
      out[i] = F::load(w[i]);
    } else {
      out[2 * i] = F::load(w[i] & 0xffffu);
      out[2 * i + 1] = F::load(w[i] >> 16);
    }
  }
}

// n elements of F from p (n a multiple of F::kPerVec, p on a 16-byte boundary), as float32.
template <class F>
PP_DEVICE void load_elems(const PP_GLOBAL typename F::Elem* p, int n, PP_THREAD float* out) {
  for (int v = 0; v < n; v += F::kPerVec) unpack<F>(pp_load16(p + v), out + v);
}

}  // namespace pp
