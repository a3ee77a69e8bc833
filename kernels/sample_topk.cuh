// SampleTopK's GPU kernel, written once against portable.h (see
// csrc/sample_topk.h for what the primitive computes).
//
// One block per row of logits. Top-k needs only the k-th largest scaled logit,
// not a sort: the block finds it as the largest 32-bit order key t with
// count(key >= t) >= k, four bits per pass from the top (8 passes; per pass each
// thread counts its elements against the 15 candidates of the next digit, and
// the counts are summed across the block). The keys map float order to unsigned
// order (sign bit flipped for positives, all bits for negatives). Then one more
// pass takes the argmax of scaled + noise over the kept logits, ties to the
// lowest index, as MLX's argmax. NaN logits are ignored: they neither count
// towards the top k nor win the argmax. Every thread sums the per-warp counts in the
// same order, so all threads pick the same digit without another broadcast.

#pragma once

#include "portable.h"  // PP_CONSTANT, for the constants the host shares

// Scalars of the launch; plain C, shared with the host (csrc/sample_topk_cuda.cpp).
struct SampleArgs {
  int V;          // logits per row
  float temp;     // logits are divided by it (unused when greedy)
  int top_k;      // keep the top_k largest; <= 0 or >= V: keep all
  int greedy;     // argmax of the raw logits, no noise
  int has_noise;  // add noise (Gumbel) to the kept scaled logits
  int has_forced; // forced[row] >= 0 replaces the sampled token
};

PP_CONSTANT constexpr int kSampleThreads = 256;

#if defined(__CUDACC__) || defined(__METAL_VERSION__) || defined(PP_EMULATE)

#include "formats.cuh"

namespace sample_topk {

PP_CONSTANT constexpr int kThreads = kSampleThreads;
PP_CONSTANT constexpr int kWarps = kThreads / 32;
PP_CONSTANT constexpr int kDigit = 4;                     // bits decided per pass
PP_CONSTANT constexpr int kCand = (1 << kDigit) - 1;      // candidates per pass (digit 0 always holds)
PP_CONSTANT constexpr int kShared = kWarps * (kCand + 1); // floats of workgroup memory the body needs

// NaN takes key 0, below every number (-inf's key is 0x007fffff): NaN logits
// never count towards the top k.
PP_DEVICE pp_u32 order_key(float f) {
  const pp_u32 u = pp_float_to_bits(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return 0u;
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

PP_DEVICE float key_value(pp_u32 k) {
  return pp_bits_to_float((k & 0x80000000u) ? (k & 0x7fffffffu) : ~k);
}

// (v, i) beats (best, best_i) when larger, or as large with a lower index.
PP_DEVICE bool beats(float v, float i, float best, float best_i) {
  return v > best || (v == best && i < best_i);
}

template <class F>
PP_DEVICE void sample(const PP_GLOBAL typename F::Elem* logits, const PP_GLOBAL float* noise,
                      const PP_GLOBAL int* forced, PP_GLOBAL int* out, SampleArgs a,
                      PP_SHARED_PTR float* red, int row, int tid) {
  const long base = long(row) * a.V;
  const int lane = tid & 31, warp = tid >> 5;
  const bool topk = !a.greedy && a.top_k > 0 && a.top_k < a.V;
  float kth = PP_NEG_INF;
  if (topk) {
    pp_u32 prefix = 0u;
    for (int shift = 32 - kDigit; shift >= 0; shift -= kDigit) {
      float cnt[kCand];
      #pragma unroll
      for (int j = 0; j < kCand; ++j) cnt[j] = 0.f;
      for (int i = tid; i < a.V; i += kThreads) {
        const pp_u32 key = order_key(F::load(logits[base + i]) / a.temp);
        if (key >= prefix) {
          const pp_u32 d = (key - prefix) >> shift;  // >= 16: above every candidate
          #pragma unroll
          for (int j = 0; j < kCand; ++j) cnt[j] += d > pp_u32(j) ? 1.f : 0.f;
        }
      }
      #pragma unroll
      for (int j = 0; j < kCand; ++j) {
        for (int off = 16; off > 0; off >>= 1) cnt[j] += pp_shfl_xor(cnt[j], off);
      }
      if (lane == 0) {
        #pragma unroll
        for (int j = 0; j < kCand; ++j) red[warp * kCand + j] = cnt[j];
      }
      PP_BARRIER();
      // Candidate j + 1 holds when at least top_k keys reach it; counts fall with j.
      pp_u32 digit = 0u;
      for (int j = 0; j < kCand; ++j) {
        float total = 0.f;
        for (int w = 0; w < kWarps; ++w) total += red[w * kCand + j];
        if (total >= float(a.top_k)) digit = pp_u32(j + 1);
      }
      PP_BARRIER();  // red is rewritten by the next pass
      prefix |= digit << shift;
    }
    // Key 0: fewer than top_k numbers in the row (the rest NaN): keep them all.
    kth = prefix == 0u ? PP_NEG_INF : key_value(prefix);
  }
  float best = PP_NEG_INF, best_i = float(a.V);
  for (int i = tid; i < a.V; i += kThreads) {
    float v = F::load(logits[base + i]);
    if (!a.greedy) {
      v = v / a.temp;
      if (topk && !(v >= kth)) continue;
      if (a.has_noise) v = pp_add_rn(v, noise[base + i]);
    }
    if (beats(v, float(i), best, best_i)) {
      best = v;
      best_i = float(i);
    }
  }
  for (int off = 16; off > 0; off >>= 1) {
    const float ov = pp_shfl_xor(best, off), oi = pp_shfl_xor(best_i, off);
    if (beats(ov, oi, best, best_i)) {
      best = ov;
      best_i = oi;
    }
  }
  if (lane == 0) {
    red[2 * warp] = best;
    red[2 * warp + 1] = best_i;
  }
  PP_BARRIER();
  if (tid == 0) {
    for (int w = 1; w < kWarps; ++w) {
      if (beats(red[2 * w], red[2 * w + 1], best, best_i)) {
        best = red[2 * w];
        best_i = red[2 * w + 1];
      }
    }
    // All logits -inf or NaN: token 0, as MLX's argmax of such a row.
    const int token = best_i < float(a.V) ? int(best_i) : 0;
    out[row] = a.has_forced && forced[row] >= 0 ? forced[row] : token;
  }
}

}  // namespace sample_topk

#endif

#if !defined(__METAL_VERSION__)
// Launch plan, for csrc/sample_topk_cuda.cpp and tests/emulator/sample_topk.cpp: a
// block of kSampleThreads per row of logits.

#include "launch.cuh"

inline PpLaunch sample_topk_launch(int rows) {
  return {.grid_x = static_cast<unsigned int>(rows), .grid_y = 1, .grid_z = 1, .threads = kSampleThreads};
}
#endif
