// Conv1dStream's GPU kernels, written once against portable.h (see
// csrc/conv1d_stream.h for what the primitive computes).
//
// Two launches, ordered in the stream / graph:
//   gather (codec.cuh): the conv inputs of every session, [B, context + T, C_in]
//     (previous or the replicated first sample, then the new samples, ELU'd),
//     into a temporary; its last `context` rows are previous'. ELU once per
//     input sample here, not once per product in the conv. Skipped when there is
//     no context and no ELU: the conv then reads x itself.
//   conv: one group of G lanes per output (b, t, co), co fastest, so the groups
//     of a block share one input window. The lanes walk the weight row
//     [K, C_in / groups] (contiguous) and the matching window rows, accumulate
//     in float32 and round once, after the bias, as the CPU path does.

#pragma once

#include "codec.cuh"  // GatherArgs, block sizes, and on the devices the shared bodies

// Scalars of the conv launch; plain C, shared with the host (conv1d_stream_cuda.cpp).
struct Conv1dArgs {
  int B, T, C_in, C_out, K;
  int context;  // rows of buf in front of each session's new samples
  int stride, dilation, groups;
  int lanes;    // G
  int has_bias;
};

#if defined(__CUDACC__) || defined(__METAL_VERSION__) || defined(PP_EMULATE)

namespace conv1d {

template <class F>
PP_DEVICE void conv(const PP_GLOBAL typename F::Elem* buf, const PP_GLOBAL typename F::Elem* w,
                    const PP_GLOBAL typename F::Elem* bias, PP_GLOBAL typename F::Elem* y,
                    Conv1dArgs a, int block, int tid) {
  const int G = a.lanes, gl = tid % G;
  const long o = long(block) * (kConvThreads / G) + tid / G;
  const int T_out = a.T / a.stride;
  const bool live = o < long(a.B) * T_out * a.C_out;
  const int co = live ? int(o % a.C_out) : 0;
  float acc = 0.f;
  if (live && a.C_in > 0) {
    const long bt = o / a.C_out;
    const int t = int(bt % T_out), b = int(bt / T_out);
    const int cin_g = a.C_in / a.groups, g = co / (a.C_out / a.groups), R = a.K * cin_g;
    const PP_GLOBAL typename F::Elem* win =
        buf + (long(b) * (a.context + a.T) + long(t) * a.stride) * a.C_in + g * cin_g;
    const PP_GLOBAL typename F::Elem* wrow = w + long(co) * R;
    // Product i = k * cin_g + ci of the flattened weight row; (k, ci) advance by G.
    int k = gl / cin_g, ci = gl % cin_g;
    const int dk = G / cin_g, dci = G % cin_g;
    for (int i = gl; i < R; i += G) {
      acc += F::load(wrow[i]) * F::load(win[long(k) * a.dilation * a.C_in + ci]);
      k += dk;
      ci += dci;
      if (ci >= cin_g) {
        ci -= cin_g;
        ++k;
      }
    }
  }
  acc = codec::group_sum(acc, G);
  if (live && gl == 0) y[o] = F::store(a.has_bias ? acc + F::load(bias[co]) : acc);
}

}  // namespace conv1d

#endif

#if !defined(__METAL_VERSION__)
// Launch plan of the conv, for csrc/conv1d_stream_cuda.cpp and
// tests/emulator/conv1d_stream.cpp (the gather's is codec.cuh's).

// The lanes G of an output: its K * C_in / groups products, about 8 a lane.
inline int conv1d_lanes(const Conv1dArgs& a) { return conv_lanes(long(a.K) * (a.C_in / a.groups)); }

// Outputs: the elements (b, t, co) of y [B, T / stride, C_out].
inline long conv1d_outputs(const Conv1dArgs& a) { return long(a.B) * (a.T / a.stride) * a.C_out; }

// A group of a.lanes threads per output.
inline PpLaunch conv1d_launch(const Conv1dArgs& a) {
  return {.grid_x = pp_blocks_for("conv1d_stream", conv1d_outputs(a), kConvThreads / a.lanes), .grid_y = 1,
          .grid_z = 1, .threads = kConvThreads};
}
#endif
