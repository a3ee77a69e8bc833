// ConvTranspose1dStream's GPU kernels, written once against portable.h (see
// csrc/conv_transpose1d_stream.h for what the primitive computes).
//
// Up to two launches, ordered in the stream / graph:
//   gather (codec.cuh, no context): the ELU of x into a temporary, when
//     elu_input; once per input sample, not once per product.
//   convtr: one group of G lanes per row r of the full transposed conv
//     (T * stride + overlap rows) and output channel co, co fastest. Row r takes
//     the taps k = r (mod stride) whose frame t = (r - k) / stride exists, a dot
//     of C_in / groups each; the previous overlap joins rows r < overlap. All in
//     float32, rounded once: rows below T * stride, plus bias, are y; the rest,
//     without bias, are partial'.

#pragma once

#include "codec.cuh"  // GatherArgs, block sizes, and on the devices the shared bodies

// Scalars of the convtr launch; plain C, shared with the host (conv_transpose1d_stream_cuda.cpp).
struct ConvTrArgs {
  int B, T, C_in, C_out, K, stride, groups;
  int lanes;  // G
  int has_bias;
};

#if defined(__CUDACC__) || defined(__METAL_VERSION__) || defined(PP_EMULATE)

namespace convtr {

template <class F>
PP_DEVICE void convtr(const PP_GLOBAL typename F::Elem* x, const PP_GLOBAL typename F::Elem* partial,
                      const PP_GLOBAL typename F::Elem* w, const PP_GLOBAL typename F::Elem* bias,
                      PP_GLOBAL typename F::Elem* y, PP_GLOBAL typename F::Elem* partial_out,
                      ConvTrArgs a, int block, int tid) {
  const int G = a.lanes, gl = tid % G;
  const int overlap = a.K - a.stride, n_out = a.T * a.stride, rows = n_out + overlap;
  const long o = long(block) * (kConvThreads / G) + tid / G;
  const bool live = o < long(a.B) * rows * a.C_out;
  const int co = live ? int(o % a.C_out) : 0;
  const long br = o / a.C_out;
  const int r = int(br % rows), b = int(br / rows);
  float acc = 0.f;
  if (live) {
    const int cin_g = a.C_in / a.groups, g = co / (a.C_out / a.groups);
    // The lowest tap of row r whose frame t = (r - k) / stride is below T.
    int k = r % a.stride;
    const int t_top = (r - k) / a.stride;
    if (t_top >= a.T) k += (t_top - a.T + 1) * a.stride;
    for (; k < a.K && k <= r; k += a.stride) {
      const PP_GLOBAL typename F::Elem* xrow =
          x + (long(b) * a.T + (r - k) / a.stride) * a.C_in + g * cin_g;
      const PP_GLOBAL typename F::Elem* wrow = w + (long(co) * a.K + k) * cin_g;
      for (int ci = gl; ci < cin_g; ci += G) acc += F::load(wrow[ci]) * F::load(xrow[ci]);
    }
  }
  acc = codec::group_sum(acc, G);
  if (!live || gl != 0) return;
  if (r < overlap) acc += F::load(partial[(long(b) * overlap + r) * a.C_out + co]);
  if (r < n_out) {
    y[(long(b) * n_out + r) * a.C_out + co] = F::store(a.has_bias ? acc + F::load(bias[co]) : acc);
  } else {
    partial_out[(long(b) * overlap + (r - n_out)) * a.C_out + co] = F::store(acc);
  }
}

}  // namespace convtr

#endif

#if !defined(__METAL_VERSION__)
// Launch plan of convtr, for csrc/conv_transpose1d_stream_cuda.cpp and
// tests/emulator/conv_transpose1d_stream.cpp (the ELU's is codec.cuh's gather).

// The lanes G of a row: about 8 of its taps x C_in / groups products a lane, and
// no more than 8 x C_in / groups would keep busy (lanes beyond C_in / groups idle).
inline int convtr_lanes(const ConvTrArgs& a) {
  const int taps = (a.K + a.stride - 1) / a.stride, cin_g = a.C_in / a.groups;
  const int by_products = conv_lanes(long(taps) * cin_g), by_width = conv_lanes(8L * cin_g);
  return by_products < by_width ? by_products : by_width;
}

// Outputs: a row of the full transposed conv (T * stride + K - stride rows: y,
// then partial') and output channel.
inline long convtr_outputs(const ConvTrArgs& a) {
  return long(a.B) * (long(a.T) * a.stride + a.K - a.stride) * a.C_out;
}

// A group of a.lanes threads per output.
inline PpLaunch convtr_launch(const ConvTrArgs& a) {
  return {.grid_x = pp_blocks_for("conv_transpose1d_stream", convtr_outputs(a), kConvThreads / a.lanes),
          .grid_y = 1, .grid_z = 1, .threads = kConvThreads};
}
#endif
