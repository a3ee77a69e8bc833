// What the codec kernels share (conv1d_stream, conv_transpose1d_stream), written
// once against portable.h: the ELU as the CPU path rounds it, the gather of a
// conv's inputs, and the sum over the lanes that share one output.
//
// The convs give each output a group of G lanes (G a power of two up to a warp,
// chosen on the host for ~8 products per lane): small reductions (SEANet's
// 7-tap input conv on one channel, depthwise upsampling) run a thread per
// output, wide ones a warp, and weight rows are read coalesced either way.

#pragma once

#include "portable.h"  // PP_CONSTANT, for the constants the host shares

// Block sizes and the scalars of the gather launch; plain C, shared with the host.
PP_CONSTANT constexpr int kConvThreads = 128;
PP_CONSTANT constexpr int kGatherThreads = 256;

struct GatherArgs {
  int B, T, C;     // x [B, T, C]
  int context;     // rows of `previous` in front of the new samples
  int elu;         // ELU the new samples (SEANet's pre-activation)
  int has_first;   // `first` [B] given: replicate padding where set
};

#if !defined(__METAL_VERSION__)
// Launch plans (host side: csrc/*_cuda.cpp and tests/emulator).

#include "launch.cuh"

// The lanes G that share one output: a power of two up to a warp, about 8 of the
// output's `products` each.
inline int conv_lanes(long products) {
  int g = 1;
  while (g < 32 && g * 8L < products) g *= 2;
  return g;
}

// gather: a thread per element of buf [B, context + T, C] (errors name `op`).
inline PpLaunch gather_launch(const char* op, const GatherArgs& a) {
  return {.grid_x = pp_blocks_for(op, long(a.B) * (a.context + a.T) * a.C, kGatherThreads),
          .grid_y = 1, .grid_z = 1, .threads = kGatherThreads};
}
#endif

#if defined(__CUDACC__) || defined(__METAL_VERSION__) || defined(PP_EMULATE)

#include "formats.cuh"

namespace codec {

using pp::BF16;
using pp::F16;
using pp::F32;

// mlx.nn.elu in the storage type: exp rounded to it, minus one rounded again.
template <class F>
PP_DEVICE typename F::Elem elu(typename F::Elem x) {
  const float v = F::load(x);
  if (v > 0.f) return x;
  return F::store(F::load(F::store(pp_exp(v))) - 1.f);
}

template <class F>
PP_DEVICE typename F::Elem maybe_elu(typename F::Elem x, int on) {
  return on ? elu<F>(x) : x;
}

// Thread i of the grid writes element i of buf [B, context + T, C]: the context
// (previous, or where first[b] the first new sample) then the new samples, ELU'd
// when asked; the last `context` rows also go to prev_out [B, context, C]. With
// context 0 this is the ELU of x alone.
template <class F>
PP_DEVICE void gather(const PP_GLOBAL typename F::Elem* x, const PP_GLOBAL typename F::Elem* prev,
                      const PP_GLOBAL unsigned char* first, PP_GLOBAL typename F::Elem* buf,
                      PP_GLOBAL typename F::Elem* prev_out, GatherArgs a, long i) {
  const int rows = a.context + a.T;
  if (i >= long(a.B) * rows * a.C) return;
  const int c = int(i % a.C);
  const long br = i / a.C;
  const int r = int(br % rows), b = int(br / rows);
  typename F::Elem v;
  if (r >= a.context) {
    v = maybe_elu<F>(x[(long(b) * a.T + (r - a.context)) * a.C + c], a.elu);
  } else if (a.has_first && first[b] && a.T > 0) {
    v = maybe_elu<F>(x[long(b) * a.T * a.C + c], a.elu);
  } else {
    v = prev[(long(b) * a.context + r) * a.C + c];
  }
  buf[i] = v;
  if (r >= a.T) prev_out[(long(b) * a.context + (r - a.T)) * a.C + c] = v;
}

// Sum over the G lanes of a group (G divides 32); every lane of the warp must call it.
PP_DEVICE float group_sum(float s, int G) {
  for (int off = G / 2; off > 0; off >>= 1) s += pp_shfl_xor(s, off);
  return s;
}

}  // namespace codec

#endif
