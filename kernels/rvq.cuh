// RvqEncode's and RvqDecode's GPU kernels, written once against portable.h (see
// csrc/rvq.h for what they compute).
//
// encode: n_q + 1 launches of one kernel (csrc/rvq_cuda.cpp), q = 0..n_q, each
//   over a grid of (vector group, chunk s = 0..S-1). A group is V consecutive
//   vectors (rvq_encode_vectors: 1, 2 or 4), a chunk kRvqBinsPerChunk (64)
//   consecutive bins. Block (g, s) of launch q < n_q scores chunks s, s + S, ...
//   of codebook q against the residuals of its V vectors (each entry loaded once
//   for all V) and writes each vector's nearest (distance, bin) to a float32
//   workspace, part[vector][q][s]. Nothing else is carried from launch to
//   launch: each block first reduces the partial argmins of codebooks 0..q-1 to
//   their codes (the nearest pair, ties to the lower bin: a total order over
//   distinct bins, so the order of the reduction does not matter), then rebuilds
//   the residuals in workgroup memory as the CPU path does: r = x, then
//   r[k] = r[k] - e_q'[k] for q' in order. Blocks s = 0 of launch q write code
//   q - 1; launch n_q (grid (groups, 1)) only writes the last codes.
//   Distances: eight consecutive threads per bin (kRvqBinsPerGroup bins per
//   eight), thread `lane` of the eight summing elements lane, lane + 8, ...
//   sequentially (codec::dot's lane `lane`), the eight lane sums combined by
//   xor-shuffles over 1, 2, 4 (float addition commutes, so all eight get
//   ((l0+l1)+(l2+l3))+((l4+l5)+(l6+l7))), then the D % 8 tail sequentially;
//   r.e and |e|^2 from the same loads, products unfused (pp_mul_rn),
//   d = (|r|^2 - 2 r.e) + |e|^2. Every value thus rounds as the CPU path's, and
//   ties go to the lowest bin, so the codes equal the CPU path's bit for bit.
//   Loads are issued in batches of kBatch steps, the next batch's before the
//   current one's sums, so that a thread waits about one L2 round trip per bin
//   rather than one per step.
// decode: one thread per output element, summing its codebooks in order.

#pragma once

#include "portable.h"  // PP_CONSTANT, for the constants the host shares

// Scalars of both kernels; plain C, shared with the host (rvq_cuda.cpp).
PP_CONSTANT constexpr int kRvqEncodeThreads = 256;
PP_CONSTANT constexpr int kRvqBinsPerGroup = 2;  // bins per group of eight threads, per chunk
PP_CONSTANT constexpr int kRvqBinsPerChunk = kRvqEncodeThreads / 8 * kRvqBinsPerGroup;
PP_CONSTANT constexpr int kRvqMaxChunks = 256;  // S at most (a block then scores several chunks)
PP_CONSTANT constexpr int kRvqMaxVectors = 4;   // V at most: kernels rvq_encode_v1, _v2, _v4
PP_CONSTANT constexpr int kRvqDecodeThreads = 256;

struct RvqArgs {
  int n;  // vectors
  int n_q, bins, D;
};

// Host side of rvq_encode's launches. S, the blocks per vector group and
// codebook: one per chunk of bins, at most kRvqMaxChunks.
inline int rvq_encode_splits(int bins) {
  const int chunks = (bins + kRvqBinsPerChunk - 1) / kRvqBinsPerChunk;
  return chunks < kRvqMaxChunks ? chunks : kRvqMaxChunks;
}
// Workgroup memory of rvq_encode_v<V>, in floats: per vector the residual, the
// codes of the earlier codebooks and the warps' (distance, bin) pairs.
inline int rvq_encode_smem_floats(int V, int n_q, int D) {
  return V * (D + n_q + 2 * (kRvqEncodeThreads / 32));
}
// V, the vectors per block: the fewest that keep the grid within 3 blocks per
// multiprocessor (`sms` of them), at most kRvqMaxVectors, halved while one
// block's workgroup memory would pass 48 KB. Every group of V vectors loads each
// codebook entry once, so a larger V cuts the L2 traffic, a smaller one the
// latency of a block. On an H100 (132 SMs) with Mimi's codebooks (2048 bins of
// 256, S = 32) this takes V = 1 up to 8 vectors, 2 up to 24, then 4: the fastest
// of 1, 2 and 4 as measured at 1, 2, 4, 8, 16, 24, 32 and 64 vectors.
inline int rvq_encode_vectors(long n, int S, int n_q, int D, int sms) {
  int V = 1;
  while (V < kRvqMaxVectors && (n + V - 1) / V * S > 3L * sms) V *= 2;
  while (V > 1 && 4L * rvq_encode_smem_floats(V, n_q, D) > 48 * 1024) V /= 2;
  return V;
}

#if defined(__CUDACC__) || defined(__METAL_VERSION__) || defined(PP_EMULATE)

#include "formats.cuh"

namespace rvq {

PP_CONSTANT constexpr int kThreads = kRvqEncodeThreads;
PP_CONSTANT constexpr int kWarps = kThreads / 32;
PP_CONSTANT constexpr int kGroups = kThreads / 8;
PP_CONSTANT constexpr int kPer = kRvqBinsPerGroup;
PP_CONSTANT constexpr int kChunk = kRvqBinsPerChunk;
PP_CONSTANT constexpr int kBatch = 8;  // loads in flight per bin (and per residual element)

// (d, j) beats (best_d, best) when nearer, or as near with a lower bin. Distances
// are never NaN here (a NaN never wins the strict comparison that sets them).
PP_DEVICE void take_nearer(PP_THREAD float& best_d, PP_THREAD int& best, float d, int j) {
  if (d < best_d || (d == best_d && j < best)) {
    best_d = d;
    best = j;
  }
}

// The warp's nearest pair, in every lane. bins < 2^24: exact as float.
PP_DEVICE void warp_nearest(PP_THREAD float& best_d, PP_THREAD int& best) {
  for (int off = 16; off > 0; off >>= 1) {
    const float od = pp_shfl_xor(best_d, off);
    const int oj = int(pp_shfl_xor(float(best), off));
    take_nearer(best_d, best, od, oj);
  }
}

// codec::dot's combination of the eight lane sums held by eight consecutive
// threads: ((l0+l1)+(l2+l3))+((l4+l5)+(l6+l7)), the same bits in all eight.
PP_DEVICE float combine8(float s) {
  s = pp_add_rn(s, pp_shfl_xor(s, 1));
  s = pp_add_rn(s, pp_shfl_xor(s, 2));
  return pp_add_rn(s, pp_shfl_xor(s, 4));
}

// One element (index i of every row) into the sums of kPer bins and V residuals:
// |e|^2 and r.e of codec::dot's lane i % 8.
template <int V>
PP_DEVICE void step(PP_THREAD float* ee, PP_THREAD float (*re)[V], PP_THREAD const float* ei,
                    const PP_SHARED_PTR float* r, PP_THREAD const int* row, int i) {
  #pragma unroll
  for (int t = 0; t < kPer; ++t) ee[t] = pp_add_rn(ee[t], pp_mul_rn(ei[t], ei[t]));
  #pragma unroll
  for (int u = 0; u < V; ++u) {
    const float ri = r[row[u] + i];
    #pragma unroll
    for (int t = 0; t < kPer; ++t) re[t][u] = pp_add_rn(re[t][u], pp_mul_rn(ri, ei[t]));
  }
}

// Elements i, i + 8, ..., i + 8 (kBatch - 1) of kPer rows.
PP_DEVICE void load_batch(PP_THREAD float (*out)[kPer], const PP_GLOBAL float* const PP_THREAD* e,
                          int i) {
  #pragma unroll
  for (int m = 0; m < kBatch; ++m) {
    #pragma unroll
    for (int t = 0; t < kPer; ++t) out[m][t] = e[t][i + 8 * m];
  }
}

// Launch q of the encoder for vectors v0 .. v0 + V - 1 (those below n), block s
// of S. part: [n, n_q, S, 2] float32 (distance, bin). smem:
// rvq_encode_smem_floats(V, n_q, D) floats.
template <int V>
PP_DEVICE void encode(const PP_GLOBAL float* x, const PP_GLOBAL float* books, PP_GLOBAL int* codes,
                      PP_GLOBAL float* part, RvqArgs a, int q, int S, PP_SHARED_PTR float* smem,
                      int vb, int s, int tid) {
  const int D = a.D, D8 = D - D % 8, n_q = a.n_q, bins = a.bins;
  const int lane = tid & 31, warp = tid >> 5, lane8 = tid & 7, group = tid >> 3;
  const long v0 = long(vb) * V;
  const int nv = a.n - v0 < V ? int(a.n - v0) : V;  // vectors of this block
  PP_SHARED_PTR float* r = smem;                    // [V][D] residuals
  PP_SHARED_PTR float* sc = smem + V * D;           // [V][n_q] codes of codebooks < q, as float
  PP_SHARED_PTR float* sd = sc + V * n_q;           // [V][kWarps]
  PP_SHARED_PTR float* sj = sd + V * kWarps;        // [V][kWarps]

  // The codes so far: (vector, codebook) pairs shared out over the warps. The
  // last launch needs only code q - 1.
  const int first = q == n_q ? q - 1 : 0, per = q - first;
  for (int w = warp; w < nv * per; w += kWarps) {
    const int u = w / per, qq = first + w % per;
    const PP_GLOBAL float* p = part + ((v0 + u) * n_q + qq) * S * 2;
    float best_d = -PP_NEG_INF;
    int best = 0;
    for (int t = lane; t < S; t += 32) take_nearer(best_d, best, p[2 * t], int(p[2 * t + 1]));
    warp_nearest(best_d, best);
    if (lane == 0) sc[u * n_q + qq] = float(best);
  }
  PP_BARRIER();
  if (s == 0 && q > 0) {
    for (int u = tid; u < nv; u += kThreads) codes[(v0 + u) * n_q + q - 1] = int(sc[u * n_q + q - 1]);
  }
  if (q == n_q) return;

  // The residuals, as the CPU path forms them.
  #pragma unroll 4  // loads of several elements in flight at once
  for (int i = tid; i < nv * D; i += kThreads) {
    const int u = i / D, k = i % D;
    float rk = x[(v0 + u) * D + k];
    for (int q0 = 0; q0 < q; q0 += kBatch) {  // loads first, as below
      float ev[kBatch];
      #pragma unroll
      for (int m = 0; m < kBatch; ++m) {
        const int qq = q0 + m < q ? q0 + m : q0;
        ev[m] = books[(long(qq) * bins + int(sc[u * n_q + qq])) * D + k];
      }
      #pragma unroll
      for (int m = 0; m < kBatch; ++m) {
        if (q0 + m < q) rk = rk - ev[m];
      }
    }
    r[i] = rk;
  }
  PP_BARRIER();

  // A block with fewer than V vectors scores its last one in the spare slots
  // (never written back): no branch in the loops below.
  int row[V];
  #pragma unroll
  for (int u = 0; u < V; ++u) row[u] = (u < nv ? u : nv - 1) * D;

  // |r|^2, in every group of eight alike.
  float rr[V];
  #pragma unroll
  for (int u = 0; u < V; ++u) {
    const PP_SHARED_PTR float* ru = r + row[u];
    float acc = 0.f;
    for (int i = lane8; i < D8; i += 8) acc = pp_add_rn(acc, pp_mul_rn(ru[i], ru[i]));
    acc = combine8(acc);
    for (int i = D8; i < D; ++i) acc = pp_add_rn(acc, pp_mul_rn(ru[i], ru[i]));
    rr[u] = acc;
  }

  // The CPU path starts from (inf, bin 0) and keeps a strictly nearer bin.
  float best_d[V];
  int best[V];
  #pragma unroll
  for (int u = 0; u < V; ++u) {
    best_d[u] = -PP_NEG_INF;
    best[u] = 0;
  }
  const PP_GLOBAL float* book = books + long(q) * bins * D;
  const int chunks = (bins + kChunk - 1) / kChunk;
  for (int c = s; c < chunks; c += S) {  // uniform over the block: shuffles below
    const PP_GLOBAL float* e[kPer];
    float re[kPer][V], ee[kPer];
    #pragma unroll
    for (int t = 0; t < kPer; ++t) {
      const int j = c * kChunk + t * kGroups + group;
      e[t] = book + long(j < bins ? j : 0) * D;  // past the end: scored, never taken
      ee[t] = 0.f;
      #pragma unroll
      for (int u = 0; u < V; ++u) re[t][u] = 0.f;
    }
    // The lane's D / 8 steps in batches of kBatch, each batch's loads issued
    // before the sums of the one before (in order): a step's loads would
    // otherwise wait for the previous step's sums, an L2 round trip each.
    const int batches = D8 / (8 * kBatch);
    float next[kBatch][kPer];
    if (batches > 0) load_batch(next, e, lane8);
    for (int b = 0; b < batches; ++b) {
      const int i = lane8 + b * 8 * kBatch;
      float cur[kBatch][kPer];
      #pragma unroll
      for (int m = 0; m < kBatch; ++m) {
        #pragma unroll
        for (int t = 0; t < kPer; ++t) cur[m][t] = next[m][t];
      }
      if (b + 1 < batches) load_batch(next, e, i + 8 * kBatch);
      #pragma unroll
      for (int m = 0; m < kBatch; ++m) step(ee, re, cur[m], r, row, i + 8 * m);
    }
    for (int i = lane8 + batches * 8 * kBatch; i < D8; i += 8) {
      float ei[kPer];
      #pragma unroll
      for (int t = 0; t < kPer; ++t) ei[t] = e[t][i];
      step(ee, re, ei, r, row, i);
    }
    #pragma unroll
    for (int t = 0; t < kPer; ++t) {
      ee[t] = combine8(ee[t]);
      #pragma unroll
      for (int u = 0; u < V; ++u) re[t][u] = combine8(re[t][u]);
    }
    for (int i = D8; i < D; ++i) {
      #pragma unroll
      for (int t = 0; t < kPer; ++t) {
        const float ei = e[t][i];
        ee[t] = pp_add_rn(ee[t], pp_mul_rn(ei, ei));
        #pragma unroll
        for (int u = 0; u < V; ++u) re[t][u] = pp_add_rn(re[t][u], pp_mul_rn(r[row[u] + i], ei));
      }
    }
    #pragma unroll
    for (int t = 0; t < kPer; ++t) {
      const int j = c * kChunk + t * kGroups + group;
      #pragma unroll
      for (int u = 0; u < V; ++u) {
        // rr - 2 re, as rr + (-2 re): the same bits, and no room for a fused multiply-add.
        const float d = pp_add_rn(pp_add_rn(rr[u], pp_mul_rn(-2.f, re[t][u])), ee[t]);
        if (j < bins) take_nearer(best_d[u], best[u], d, j);
      }
    }
  }
  #pragma unroll
  for (int u = 0; u < V; ++u) {
    warp_nearest(best_d[u], best[u]);
    if (lane == 0) {
      sd[u * kWarps + warp] = best_d[u];
      sj[u * kWarps + warp] = float(best[u]);
    }
  }
  PP_BARRIER();
  if (tid < nv) {
    float bd = sd[tid * kWarps];
    int bj = int(sj[tid * kWarps]);
    for (int w = 1; w < kWarps; ++w) take_nearer(bd, bj, sd[tid * kWarps + w], int(sj[tid * kWarps + w]));
    PP_GLOBAL float* p = part + (((v0 + tid) * n_q + q) * S + s) * 2;
    p[0] = bd;
    p[1] = float(bj);
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

#if !defined(__METAL_VERSION__)
// Launch plans, for csrc/rvq_cuda.cpp and tests/emulator/rvq.cpp (with
// rvq_encode_splits, _vectors and _smem_floats above).

#include "launch.cuh"

// Launch q = 0..n_q of rvq_encode_v<V>: (vector groups, S chunks), then (groups, 1).
inline PpLaunch rvq_encode_launch(const RvqArgs& a, int V, int S, int q) {
  return {.grid_x = pp_blocks_for("rvq_encode", a.n, V),
          .grid_y = static_cast<unsigned int>(q < a.n_q ? S : 1), .grid_z = 1, .threads = kRvqEncodeThreads};
}

// rvq_decode: a thread per element of out [n, D].
inline PpLaunch rvq_decode_launch(const RvqArgs& a) {
  return {.grid_x = pp_blocks_for("rvq_decode", long(a.n) * a.D, kRvqDecodeThreads), .grid_y = 1, .grid_z = 1,
          .threads = kRvqDecodeThreads};
}
#endif
