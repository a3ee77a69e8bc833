// DepformerFrame's own GPU kernel, written once against portable.h (see
// csrc/depformer_frame.h; its other kernels are matvec's, ring_attention's and
// sample_topk's).
//
// embed_add: out[b, :] = T(pre[b, :] + table[tokens[b], :]), one thread per
// element; token -1 ("no input") adds a zero row, other tokens are clamped to the
// table's rows (the reference would read out of bounds).

#pragma once

#include "portable.h"  // PP_CONSTANT, for the constants the host shares

// Scalars of the launch; plain C, shared with the host (csrc/depformer_frame_cuda.cpp).
struct EmbedArgs {
  int B, D, rows;
};

PP_CONSTANT constexpr int kEmbedThreads = 256;

#if defined(__CUDACC__) || defined(__METAL_VERSION__) || defined(PP_EMULATE)

#include "formats.cuh"

namespace depformer_frame {

template <class F>
PP_DEVICE void embed_add(const PP_GLOBAL typename F::Elem* pre, const PP_GLOBAL typename F::Elem* table,
                         const PP_GLOBAL int* tokens, PP_GLOBAL typename F::Elem* out, EmbedArgs a,
                         long i) {
  if (i >= long(a.B) * a.D) return;
  const int b = int(i / a.D), c = int(i % a.D);
  const int t = tokens[b];
  float e = 0.f;
  if (t != -1) {
    const int row = t < 0 ? 0 : (t >= a.rows ? a.rows - 1 : t);
    e = F::load(table[long(row) * a.D + c]);
  }
  out[i] = F::store(pp_add_rn(F::load(pre[i]), e));
}

}  // namespace depformer_frame

#endif

#if !defined(__METAL_VERSION__)
// Launch plan of embed_add, for csrc/depformer_frame_cuda.cpp and
// tests/emulator/depformer_frame.cpp: a thread per element of [B, D].

#include "launch.cuh"

inline PpLaunch embed_add_launch(const EmbedArgs& a) {
  return {.grid_x = pp_blocks_for("depformer_frame", long(a.B) * a.D, kEmbedThreads),
          .grid_y = 1, .grid_z = 1, .threads = kEmbedThreads};
}
#endif
