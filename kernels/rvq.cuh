// RvqEncode's and RvqDecode's GPU kernels, written once against portable.h (see
// csrc/rvq.h for what they compute).
//
// encode: one block per vector, the codebooks in order inside the block. Each
//   thread scores bins tid, tid + kThreads, ... against the residual (a float32
//   row of a workspace, read by all threads), the block takes the argmin, and
//   the residual loses the chosen entry before the next codebook. Distances
//   round exactly as the CPU path's: every dot product is codec::dot's eight
//   sequential lanes with unfused products (pp_mul_rn), |e|^2 formed next to
//   r.e from the same loads, and ties go to the lowest bin, so the codes equal
//   the CPU path's bit for bit.
// decode: one thread per output element, summing its codebooks in order.

#pragma once

// Scalars of both launches; plain C, shared with the host (rvq_cuda.cpp).
constexpr int kRvqEncodeThreads = 512;
constexpr int kRvqDecodeThreads = 256;

struct RvqArgs {
  int n;  // vectors
  int n_q, bins, D;
};

#if defined(__CUDACC__) || defined(__METAL_VERSION__) || defined(PP_EMULATE)

#include "formats.cuh"

namespace rvq {

constexpr int kThreads = kRvqEncodeThreads;
constexpr int kWarps = kThreads / 32;

// codec::dot (csrc/codec_common.h): eight lanes of sequential sums, combined
// pairwise, then the tail. Here for a . b and b . b at once.
PP_DEVICE void dot8(const PP_GLOBAL float* a, const PP_GLOBAL float* b, int n,
                    PP_THREAD float& ab, PP_THREAD float& bb) {
  float lab[8], lbb[8];
  #pragma unroll
  for (int j = 0; j < 8; ++j) lab[j] = lbb[j] = 0.f;
  int i = 0;
  for (; i + 8 <= n; i += 8) {
    #pragma unroll
    for (int j = 0; j < 8; ++j) {
      const float bj = b[i + j];
      lab[j] = pp_add_rn(lab[j], pp_mul_rn(a[i + j], bj));
      lbb[j] = pp_add_rn(lbb[j], pp_mul_rn(bj, bj));
    }
  }
  ab = pp_add_rn(pp_add_rn(pp_add_rn(lab[0], lab[1]), pp_add_rn(lab[2], lab[3])),
                 pp_add_rn(pp_add_rn(lab[4], lab[5]), pp_add_rn(lab[6], lab[7])));
  bb = pp_add_rn(pp_add_rn(pp_add_rn(lbb[0], lbb[1]), pp_add_rn(lbb[2], lbb[3])),
                 pp_add_rn(pp_add_rn(lbb[4], lbb[5]), pp_add_rn(lbb[6], lbb[7])));
  for (; i < n; ++i) {
    ab = pp_add_rn(ab, pp_mul_rn(a[i], b[i]));
    bb = pp_add_rn(bb, pp_mul_rn(b[i], b[i]));
  }
}

// (d, j) beats (best_d, best) when nearer, or as near with a lower bin. Distances
// are never NaN here (a NaN never wins the strict comparison that sets them).
PP_DEVICE void take_nearer(PP_THREAD float& best_d, PP_THREAD int& best, float d, int j) {
  if (d < best_d || (d == best_d && j < best)) {
    best_d = d;
    best = j;
  }
}

// res: [n, D] float32 workspace. sd, sj: kWarps slots of workgroup memory.
PP_DEVICE void encode(const PP_GLOBAL float* x, const PP_GLOBAL float* books, PP_GLOBAL int* codes,
                      PP_GLOBAL float* res, RvqArgs a, PP_SHARED_PTR float* sd,
                      PP_SHARED_PTR int* sj, int row, int tid) {
  const int D = a.D, lane = tid & 31, warp = tid >> 5;
  PP_GLOBAL float* r = res + long(row) * D;
  for (int k = tid; k < D; k += kThreads) r[k] = x[long(row) * D + k];
  PP_BARRIER();
  for (int q = 0; q < a.n_q; ++q) {
    const PP_GLOBAL float* book = books + long(q) * a.bins * D;
    float rr, unused;
    dot8(r, r, D, rr, unused);  // the same in every thread
    // The CPU path starts from (inf, bin 0) and keeps a strictly nearer bin.
    float best_d = -PP_NEG_INF;
    int best = 0;
    for (int j = tid; j < a.bins; j += kThreads) {
      float re, ee;
      dot8(r, book + long(j) * D, D, re, ee);
      const float d = pp_add_rn(rr - 2.f * re, ee);
      if (d < best_d) {
        best_d = d;
        best = j;
      }
    }
    for (int off = 16; off > 0; off >>= 1) {
      const float od = pp_shfl_xor(best_d, off);
      const int oj = int(pp_shfl_xor(float(best), off));  // bins < 2^24: exact as float
      take_nearer(best_d, best, od, oj);
    }
    if (lane == 0) {
      sd[warp] = best_d;
      sj[warp] = best;
    }
    PP_BARRIER();  // also: every read of r for codebook q is done
    best_d = sd[0];
    best = sj[0];
    for (int w = 1; w < kWarps; ++w) take_nearer(best_d, best, sd[w], sj[w]);
    if (tid == 0) codes[long(row) * a.n_q + q] = best;
    const PP_GLOBAL float* e = book + long(best) * D;
    for (int k = tid; k < D; k += kThreads) r[k] = r[k] - e[k];
    PP_BARRIER();  // r updated, sd / sj read, before the next codebook
  }
}

PP_DEVICE void decode(const PP_GLOBAL int* codes, const PP_GLOBAL float* books, PP_GLOBAL float* out,
                      RvqArgs a, long i) {
  if (i >= long(a.n) * a.D) return;
  const long v = i / a.D;
  const int k = int(i % a.D);
  float s = 0.f;
  for (int q = 0; q < a.n_q; ++q) {
    int c = codes[v * a.n_q + q];
    c = c < 0 ? 0 : (c >= a.bins ? a.bins - 1 : c);
    s = s + books[(long(q) * a.bins + c) * a.D + k];
  }
  out[i] = s;
}

}  // namespace rvq

#endif
