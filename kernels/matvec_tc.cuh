// Matvec's tensor-core path for 16-bit x of several rows (csrc/matvec.h says what the
// primitive computes and from how many rows the CUDA hosts take this path;
// kernels/matvec.cuh is its path for a few rows). CUDA and the CPU emulator; Metal keeps
// matvec.cuh at every row count.
//
// Three launches per projection and per 64 rows of x (matvec_tc_chunks):
//   matvec_tc_rms     (norm only) inv_rms[m] = 1 / sqrt(mean(x[m]^2) + eps), once per call;
//   matvec_tc         partial sums of x0 @ W^T over one K range per block row (split K);
//   matvec_tc_finish  sums the splits in a fixed order, then the epilogue (round to T,
//                     gate, residual) exactly as matvec.cuh applies it.
//
// matvec_tc: a block of 8 warps owns 128 weight rows (16 per warp: one m16 tile of
// mma.m16n8k16, float32 accumulation) and one K range, walked 256 at a time. Per
// step, each lane issues its weight loads (16-byte vectors of its two rows, g and
// g + 8 of the tile), the block copies x's 256 columns for all its rows (normalised
// and rounded as the reference does, zero past M) into workgroup memory, and each
// warp multiplies its tile by x: NT n8 tiles of 8 rows of x. The weight tile is read
// once for all M rows, which is what the 8-row matvec could not do (it re-read the
// weights per 8 rows). With 4-bit weights and up to 8 rows of x, kernels ..._ahead have
// the next step's weights and x in flight while a step multiplies (Plan; not the default).
//
// The x tile's rows are 512 bytes, unpadded; the 16-byte octets of a row are swizzled
// (swizzle()) so that each quarter of a warp reads 8 bank groups per fragment load.
//
// K order: a dot product does not depend on the order of its terms, so lane
// (g, t) feeds the mma's logical k = 2t, 2t+1, 2t+8, 2t+9 with 4 physical k of its
// own vector, and takes x's matching 4 values from the tile. Every weight format then
// loads whole 16-byte vectors: bf16/f16 as they are, and MLX's affine 4- and 8-bit
// weights (w = scale * q + bias per group of 64, as matvec.cuh reads them) dequantised
// to T in registers, w = T(scale * q + bias), which is what mx.dequantize computes.
// 4-bit weights are dequantised in T pairs, two nibbles 16 bits apart at once, so a
// lane's pairs are (w0, w4), (w1, w5), ... of each octet, and x's octets are stored
// in the tile in that order too (interleave()).
//
// Gated projections (ffn_in: rows j and j + n_out are output j's gate and value)
// put 8 units in a tile: row g is unit g's gate row and row g + 8 its value row.

#pragma once

// Scalars of the launches; plain C, shared with the hosts.
struct MatvecTcArgs {
  int M, K;      // x is [M, K]
  int n_out;     // outputs (weight rows: n_out, or 2 * n_out gated)
  int norm, gate, residual;
  float eps;
  int splits;    // blocks along K (grid y)
  int steps;     // 256-wide K steps per split (the last split may have fewer)
  int early;     // the first step's weights loaded before waiting for the previous kernel
};

#define PP_MATVEC_TC_STEP 256   // K per step
#define PP_MATVEC_TC_WARPS 8

#if defined(__CUDACC__) || defined(PP_EMULATE)

#include "formats.cuh"
#include "matvec.cuh"

namespace matvec_tc {

constexpr int kWarps = PP_MATVEC_TC_WARPS;
constexpr int kThreads = kWarps * 32;
constexpr int kStep = PP_MATVEC_TC_STEP;  // elements per row of the x tile (no padding: swizzled)

// Two 16-bit values a * b + c, each rounded once (fma.rn on the pair).
template <class F>
PP_DEVICE pp_u32 fma2(pp_u32 a, pp_u32 b, pp_u32 c);
template <>
PP_DEVICE pp_u32 fma2<pp::BF16>(pp_u32 a, pp_u32 b, pp_u32 c) { return pp_fma2_bf16(a, b, c); }
template <>
PP_DEVICE pp_u32 fma2<pp::F16>(pp_u32 a, pp_u32 b, pp_u32 c) { return pp_fma2_f16(a, b, c); }

// 2^m in F, the power of two whose unit in the last place is 1 (bf16: 128, f16: 1024):
// (kMagic | q) is exactly kMagic + q for a 4-bit q, and kMagic + q - kMagic exactly q.
template <class F>
struct Magic;
template <>
struct Magic<pp::BF16> {
  static constexpr pp_u32 kMagic2 = 0x43004300u, kOne2 = 0x3f803f80u, kNegMagic2 = 0xc300c300u;
};
template <>
struct Magic<pp::F16> {
  static constexpr pp_u32 kMagic2 = 0x64006400u, kOne2 = 0x3c003c00u, kNegMagic2 = 0xe400e400u;
};

// 8 weights (one octet) as 4 registers of T pairs. Scale: what a group's scale or bias is
// held as. kInterleaved: the pairs are (w0, w4), (w1, w5), (w2, w6), (w3, w7) instead of
// (w0, w1), (w2, w3), ... (x's octet in the tile is interleaved the same way).
template <class F, class W>
struct Octets;

template <class F>
struct Octets<F, matvec::Dense<F>> {
  static constexpr int kPerVec = 1;  // octets per 16-byte vector
  static constexpr bool kInterleaved = false;
  typedef float Scale;
  static PP_DEVICE Scale scale(typename F::Elem) { return 0.f; }
  static PP_DEVICE void get(pp_u32x4 v, int, Scale, Scale, PP_THREAD pp_u32* r) {
    r[0] = v.x;
    r[1] = v.y;
    r[2] = v.z;
    r[3] = v.w;
  }
};

// 8-bit: to float, w = T(scale * q + bias) (as mx.dequantize), back to T pairs.
template <class F>
struct Octets<F, matvec::Affine<8>> {
  static constexpr int kPerVec = 2;
  static constexpr bool kInterleaved = false;
  typedef float Scale;
  static PP_DEVICE Scale scale(typename F::Elem e) { return F::load(e); }
  static PP_DEVICE void get(pp_u32x4 v, int o, Scale sc, Scale bi, PP_THREAD pp_u32* r) {
    float q[8];
    matvec::Affine<8>::unpack_sub(v, o, q);
    #pragma unroll
    for (int i = 0; i < 4; ++i) r[i] = pp::pack2<F>(sc * q[2 * i] + bi, sc * q[2 * i + 1] + bi);
  }
};

// 4-bit, in T pair arithmetic: the word's nibbles i and i + 4 (one mask and one or) are
// T(kMagic + q) exactly, less kMagic (exact), times scale plus bias, rounded once to T:
// w = T(scale * q + bias), which is mx.dequantize's value up to its float32 rounding of
// the sum before T (a tie at T's precision only). Per pair 4 instructions, not ~9.
template <class F>
struct Octets<F, matvec::Affine<4>> {
  static constexpr int kPerVec = 4;
  static constexpr bool kInterleaved = true;
  typedef pp_u32 Scale;  // the value in both halves
  static PP_DEVICE Scale scale(typename F::Elem e) { return pp_u32(e) | (pp_u32(e) << 16); }
  static PP_DEVICE void get(pp_u32x4 v, int o, Scale sc, Scale bi, PP_THREAD pp_u32* r) {
    const pp_u32 word = o == 0 ? v.x : o == 1 ? v.y : o == 2 ? v.z : v.w;
    #pragma unroll
    for (int i = 0; i < 4; ++i) {
      const pp_u32 q = ((word >> (4 * i)) & 0x000f000fu) | Magic<F>::kMagic2;
      r[i] = fma2<F>(fma2<F>(q, Magic<F>::kOne2, Magic<F>::kNegMagic2), sc, bi);
    }
  }
};

// An octet of x (x0 .. x7 as 4 registers of pairs) as (x0, x4), (x1, x5), (x2, x6), (x3, x7).
PP_DEVICE pp_u32x4 interleave(pp_u32x4 v) {
  pp_u32x4 r;
  r.x = (v.x & 0xffffu) | (v.z << 16);
  r.y = (v.x >> 16) | (v.z & 0xffff0000u);
  r.z = (v.y & 0xffffu) | (v.w << 16);
  r.w = (v.y >> 16) | (v.w & 0xffff0000u);
  return r;
}

// Where octet c8 (of 32) of x tile row n lies in that row: the octet index with two bits
// flipped, so that each quarter of a warp reads 8 different 16-byte bank groups when it
// loads its fragments (lane (g, t) reads row g, octet (t + 4 i) * OCT + o): a row is 512
// bytes, 4 lines of the 32 banks, and the 8 lanes of a quarter are rows g, g + 1 and
// t = 0..3. Odd rows flip the bit t does not move (bit 2 for dense weights, whose lanes
// t take consecutive octets; bit 0 otherwise), and bit 1 flips with octet bit 3, which
// separates t and t + 2 for 4-bit weights (their octets 16 apart: the same banks). A
// quarter of consecutive octets of one row (the tile's stores) stays conflict-free too.
template <int C>
PP_DEVICE int swizzle(int n, int c8) {
  return c8 ^ (((c8 >> 3) & 1) << 1) ^ ((n & 1) * (C == 8 ? 4 : 1));
}

// Element offsets in the x tile: of row n's octet c8 (the tile's stores), and of the 8
// values lane (g, t) multiplies by its weight vector i's octet o (the fragments' loads).
template <class W>
PP_DEVICE int tile_offset(int n, int c8) { return n * kStep + swizzle<W::kChunk>(n, c8) * 8; }
template <class W>
PP_DEVICE int fragment_offset(int g, int t, int i, int o) {
  return tile_offset<W>(g, (t + 4 * i) * (W::kChunk / 8) + o);
}

template <class F>
PP_DEVICE void mma(PP_THREAD float* d, PP_THREAD const pp_u32* a, pp_u32 b0, pp_u32 b1);

template <>
PP_DEVICE void mma<pp::BF16>(PP_THREAD float* d, PP_THREAD const pp_u32* a, pp_u32 b0, pp_u32 b1) {
  pp_mma_bf16(d, a, b0, b1);
}
template <>
PP_DEVICE void mma<pp::F16>(PP_THREAD float* d, PP_THREAD const pp_u32* a, pp_u32 b0, pp_u32 b1) {
  pp_mma_f16(d, a, b0, b1);
}

// A block's partial sums for its split: acc[j] holds (row g: columns 2t, 2t + 1) and
// (row g + 8: the same columns) of n8 tile j; units u_lo and u_hi are rows g and g + 8.
template <int NT>
PP_DEVICE void store_partials(PP_THREAD float (*acc)[4], PP_GLOBAL float* part, MatvecTcArgs a, int split, int u_lo,
                              int u_hi, int t) {
  const int rows = a.gate ? 2 * a.n_out : a.n_out;
  PP_GLOBAL float* p = part + long(split) * a.M * rows;
  #pragma unroll
  for (int j = 0; j < NT; ++j) {
    #pragma unroll
    for (int e = 0; e < 4; ++e) {
      const int n = j * 8 + 2 * t + (e & 1);
      const int u = e < 2 ? u_lo : u_hi;
      if (n < a.M && u < a.n_out) {
        const long row = u + (e >= 2 && a.gate ? long(a.n_out) : 0L);
        p[long(n) * rows + row] = acc[j][e];
      }
    }
  }
}

// One step's weights for a lane: VL 16-byte vectors of rows lo and hi, and their groups'
// scales and biases (affine only).
template <class F, class W>
struct StepWeights {
  static constexpr int VL = kStep / W::kChunk / 4;
  typedef typename Octets<F, W>::Scale Scale;
  pp_u32x4 lo[VL], hi[VL];
  Scale sl[VL], bl[VL], sh[VL], bh[VL];
};

template <class F, class W>
PP_DEVICE void load_weights(PP_THREAD StepWeights<F, W>& sw, const PP_GLOBAL pp_u32* w,
                            const PP_GLOBAL typename F::Elem* scales, const PP_GLOBAL typename F::Elem* biases,
                            long r_lo, long r_hi, long words, int groups, int kb, int t) {
  typedef Octets<F, W> O;
  #pragma unroll
  for (int i = 0; i < StepWeights<F, W>::VL; ++i) {
    const int k = kb + (t + 4 * i) * W::kChunk;
    sw.lo[i] = pp_load16(w + r_lo * words + W::row_words(k));
    sw.hi[i] = pp_load16(w + r_hi * words + W::row_words(k));
    if (W::kAffine) {
      sw.sl[i] = O::scale(scales[r_lo * groups + k / 64]);
      sw.bl[i] = O::scale(biases[r_lo * groups + k / 64]);
      sw.sh[i] = O::scale(scales[r_hi * groups + k / 64]);
      sw.bh[i] = O::scale(biases[r_hi * groups + k / 64]);
    } else {
      sw.sl[i] = sw.bl[i] = sw.sh[i] = sw.bh[i] = O::scale(0);
    }
  }
}

// The x tile's NT * 8 rows of 256, NT vectors of 8 a thread: element e = tid + r * 256 is
// row e / 32, octet e % 32. One vector as read.
PP_DEVICE int x_row(int e) { return e >> 5; }

template <class F>
PP_DEVICE pp_u32x4 load_x(const PP_GLOBAL typename F::Elem* x, MatvecTcArgs a, int kb, int e) {
  const int n = x_row(e);
  return n < a.M ? pp_load16(x + long(n) * a.K + kb + (e & 31) * 8) : pp_zero16();
}

// Normalised (by alpha's matching 8 of the step at kb) and rounded as the reference does
// (zero past M), interleaved for 4-bit weights, into the tile at its swizzled place.
template <class F, class W>
PP_DEVICE void store_x(pp_u32x4 v, const PP_GLOBAL typename F::Elem* alpha, const PP_GLOBAL float* inv_rms,
                       MatvecTcArgs a, PP_SHARED_PTR typename F::Elem* xs, int kb, int e) {
  const int n = x_row(e), c8 = e & 31;
  if (a.norm && n < a.M) {
    float xf[8], al[8];
    pp::unpack<F>(v, xf);
    pp::unpack<F>(pp_load16(alpha + kb + c8 * 8), al);
    const float rr = inv_rms[n];
    v.x = pp::pack2<F>(al[0] * (xf[0] * rr), al[1] * (xf[1] * rr));
    v.y = pp::pack2<F>(al[2] * (xf[2] * rr), al[3] * (xf[3] * rr));
    v.z = pp::pack2<F>(al[4] * (xf[4] * rr), al[5] * (xf[5] * rr));
    v.w = pp::pack2<F>(al[6] * (xf[6] * rr), al[7] * (xf[7] * rr));
  }
  if (Octets<F, W>::kInterleaved) v = interleave(v);
  pp_store16(xs + tile_offset<W>(n, c8), v);
}

// acc += the step's weights times the x tile.
template <class F, class W, int NT>
PP_DEVICE void multiply(PP_THREAD float (*acc)[4], PP_THREAD const StepWeights<F, W>& sw,
                        const PP_SHARED_PTR typename F::Elem* xs, int g, int t) {
  typedef Octets<F, W> O;
  constexpr int OCT = O::kPerVec;
  #pragma unroll
  for (int i = 0; i < StepWeights<F, W>::VL; ++i) {
    #pragma unroll
    for (int o = 0; o < OCT; ++o) {
      pp_u32 lo[4], hi[4];
      O::get(sw.lo[i], o, sw.sl[i], sw.bl[i], lo);
      O::get(sw.hi[i], o, sw.sh[i], sw.bh[i], hi);
      const pp_u32 a1[4] = {lo[0], hi[0], lo[1], hi[1]};
      const pp_u32 a2[4] = {lo[2], hi[2], lo[3], hi[3]};
      const PP_SHARED_PTR typename F::Elem* xr = xs + fragment_offset<W>(g, t, i, o);
      #pragma unroll
      for (int j = 0; j < NT; ++j) {
        const pp_u32x4 xv = pp_load16(xr + j * 8 * kStep);
        mma<F>(acc[j], a1, xv.x, xv.y);
        mma<F>(acc[j], a2, xv.z, xv.w);
      }
    }
  }
}

// kAhead: whether project<F, W, NT, Ahead> loads the next step's weights and x while it
// multiplies. Only the kernels ..._ahead (Ahead, PERSONAPLEX_MATVEC_TC_AHEAD=1) of 4-bit
// weights and up to 8 rows, where a lane has only 64 bytes of weights in flight a step
// otherwise (denser formats have 2 or 4 times that; more rows of x need the registers
// for accumulators). Not the default: on the H200 (2026-12-02) the q4 tick at 8 sessions
// took 11.16-11.30 ms without it and 11.76-11.78 with, though matvec_tc_bench timed the
// 8-row qkv and ffn_out faster with it in isolation.
// kMinBlocks: the kernel's __launch_bounds__ minimum of blocks a multiprocessor (3 for the
// ahead kernels: 80 registers, 56 bytes spilled).
template <class W, int NT, bool Ahead = false>
struct Plan {
  static constexpr bool kAhead = W::kChunk == 32 && NT == 1 && Ahead;
  static constexpr int kMinBlocks = kAhead ? 3 : (W::kChunk == 8 ? 1 : 2);
  // x vectors a thread loads at once for the tile (ptxas sm_90a: 4-bit n8 126 registers
  // either way; dense n2 would pass 128 with 2).
  static constexpr int kXBatch = W::kChunk == 8 && NT == 2 ? 1 : NT < 4 ? NT : 4;
};

// x: [M, K]; w: [rows, row_words] (dense rows reinterpreted); scales, biases:
// [rows, K / 64] (affine only); alpha: [K] and inv_rms: [M] (norm only);
// part: [splits, M, rows] float32. xs: NT * 8 * kStep elements of workgroup memory.
// wait(): the wait for the kernel before (programmatic dependent launch, portable.h), called
// before x, inv_rms or the partials are touched; with a.early the block's first step of
// weights (never written by any kernel) is already on its way then.
template <class F, class W, int NT, bool Ahead = false, class Wait>
PP_DEVICE void project(const PP_GLOBAL typename F::Elem* x, const PP_GLOBAL pp_u32* w,
                       const PP_GLOBAL typename F::Elem* scales, const PP_GLOBAL typename F::Elem* biases,
                       const PP_GLOBAL typename F::Elem* alpha, const PP_GLOBAL float* inv_rms,
                       PP_GLOBAL float* part, MatvecTcArgs a, PP_SHARED_PTR typename F::Elem* xs, int block,
                       int split, int tid, Wait wait) {
  constexpr bool kAhead = Plan<W, NT, Ahead>::kAhead;
  const int lane = tid & 31, warp = tid >> 5, g = lane >> 2, t = lane & 3;
  const int per_warp = a.gate ? 8 : 16;  // units
  const int u0 = (block * kWarps + warp) * per_warp;
  const int u_lo = u0 + g, u_hi = a.gate ? u0 + g : u0 + 8 + g;
  // Past the end: read a valid row, store nothing.
  const long r_lo = u_lo < a.n_out ? u_lo : a.n_out - 1;
  const long r_hi = (u_hi < a.n_out ? u_hi : a.n_out - 1) + (a.gate ? a.n_out : 0);
  const long words = W::row_words(a.K);
  const int groups = a.K / 64;

  float acc[NT][4];
  #pragma unroll
  for (int j = 0; j < NT; ++j) {
    #pragma unroll
    for (int e = 0; e < 4; ++e) acc[j][e] = 0.f;
  }

  const int total = a.K / kStep;
  const int s0 = split * a.steps;
  const int s1 = s0 + a.steps < total ? s0 + a.steps : total;
  if constexpr (kAhead) {
    // Two sets of weights in turn (no copies between them): step s multiplies by cur
    // while nxt and the x vectors for step s + 1 are in flight.
    StepWeights<F, W> w0, w1;
    pp_u32x4 xn[NT];
    auto step = [&](PP_THREAD StepWeights<F, W>& cur, PP_THREAD StepWeights<F, W>& nxt, int s) {
      const int kb = s * kStep;
      if (s + 1 < s1) load_weights<F, W>(nxt, w, scales, biases, r_lo, r_hi, words, groups, kb + kStep, t);
      PP_BARRIER();  // the previous step's readers are done with the tile
      #pragma unroll
      for (int r = 0; r < NT; ++r) store_x<F, W>(xn[r], alpha, inv_rms, a, xs, kb, tid + r * kThreads);
      PP_BARRIER();
      if (s + 1 < s1) {
        #pragma unroll
        for (int r = 0; r < NT; ++r) xn[r] = load_x<F>(x, a, kb + kStep, tid + r * kThreads);
      }
      multiply<F, W, NT>(acc, cur, xs, g, t);
    };
    if (!a.early) wait();
    if (s0 < s1) load_weights<F, W>(w0, w, scales, biases, r_lo, r_hi, words, groups, s0 * kStep, t);
    if (a.early) wait();
    if (s0 < s1) {
      #pragma unroll
      for (int r = 0; r < NT; ++r) xn[r] = load_x<F>(x, a, s0 * kStep, tid + r * kThreads);
    }
    for (int s = s0; s < s1; s += 2) {
      step(w0, w1, s);
      if (s + 1 < s1) step(w1, w0, s + 1);
    }
  } else {
    StepWeights<F, W> sw;
    if (a.early && s0 < s1) load_weights<F, W>(sw, w, scales, biases, r_lo, r_hi, words, groups, s0 * kStep, t);
    wait();
    for (int s = s0; s < s1; ++s) {
      const int kb = s * kStep;
      if (!a.early || s > s0) load_weights<F, W>(sw, w, scales, biases, r_lo, r_hi, words, groups, kb, t);
      PP_BARRIER();  // the previous step's readers are done with the tile
      // The thread's NT vectors of x in batches of XB: a batch's loads are in flight
      // together, one round trip each; a batch's registers still fit the occupancy.
      constexpr int XB = Plan<W, NT, Ahead>::kXBatch;
      #pragma unroll 1
      for (int r0 = 0; r0 < NT; r0 += XB) {
        pp_u32x4 v[XB];
        #pragma unroll
        for (int b = 0; b < XB; ++b) v[b] = load_x<F>(x, a, kb, tid + (r0 + b) * kThreads);
        #pragma unroll
        for (int b = 0; b < XB; ++b) store_x<F, W>(v[b], alpha, inv_rms, a, xs, kb, tid + (r0 + b) * kThreads);
      }
      PP_BARRIER();
      multiply<F, W, NT>(acc, sw, xs, g, t);
    }
  }

  store_partials<NT>(acc, part, a, split, u_lo, u_hi, t);
}

// One block per row of x: inv_rms[m].
template <class F>
PP_DEVICE void rms(const PP_GLOBAL typename F::Elem* x, PP_GLOBAL float* inv_rms, MatvecTcArgs a,
                   PP_SHARED_PTR float* smem, int m, int tid) {
  float s = 0.f;
  const PP_GLOBAL typename F::Elem* xr = x + long(m) * a.K;
  for (int k = tid * 8; k < a.K; k += kThreads * 8) {
    float v[8];
    pp::unpack<F>(pp_load16(xr + k), v);
    #pragma unroll
    for (int e = 0; e < 8; ++e) s += v[e] * v[e];
  }
  s = matvec::warp_sum(s);
  if ((tid & 31) == 0) smem[tid >> 5] = s;
  PP_BARRIER();
  if (tid == 0) {
    float tot = 0.f;
    for (int i = 0; i < kWarps; ++i) tot += smem[i];
    inv_rms[m] = 1.f / sqrt(tot / float(a.K) + a.eps);
  }
}

// One thread per output (m, u): the splits' sum in order, then matvec's epilogue.
template <class F>
PP_DEVICE void finish(const PP_GLOBAL float* part, const PP_GLOBAL typename F::Elem* residual,
                      PP_GLOBAL typename F::Elem* out, MatvecTcArgs a, long item) {
  if (item >= long(a.M) * a.n_out) return;
  const int m = int(item / a.n_out), u = int(item % a.n_out);
  const int rows = a.gate ? 2 * a.n_out : a.n_out;
  float y[2] = {0.f, 0.f};
  for (int h = 0; h < (a.gate ? 2 : 1); ++h) {
    for (int s = 0; s < a.splits; ++s) y[h] += part[(long(s) * a.M + m) * rows + u + h * a.n_out];
    y[h] = pp::round_trip<F>(y[h]);
  }
  float o = y[0];
  if (a.gate) {
    const float sig = pp::round_trip<F>(1.f / (1.f + pp_exp(-y[0])));
    o = pp::round_trip<F>(pp::round_trip<F>(y[0] * sig) * y[1]);
  }
  if (a.residual) o = pp::round_trip<F>(F::load(residual[item]) + o);
  out[item] = F::store(o);
}

}  // namespace matvec_tc

#endif

#if !defined(__METAL_VERSION__)
// Launch plans, for the CUDA hosts and tests/emulator/matvec.cpp.

#include <cstdlib>
#include <cstring>

#include "launch.cuh"

constexpr int kMatvecTcThreads = PP_MATVEC_TC_WARPS * 32;
constexpr int kMatvecTcFinishThreads = 256;

// n8 tiles of x rows per block: the kernels are instantiated for 1, 2, 4 and 8
// (matvec_tc_<dtype>_<weights>_n<NT>), so for M up to 64.
constexpr int kMatvecTcMaxRows = 64;
inline int matvec_tc_tiles(int M) { return M <= 8 ? 1 : M <= 16 ? 2 : M <= 32 ? 4 : 8; }

// Workgroup memory of matvec_tc_..._n<NT>, in elements of T.
inline int matvec_tc_smem_elems(int nt) { return nt * 8 * PP_MATVEC_TC_STEP; }

// Whether the path takes this call: a 16-bit float x and whole 256-wide K steps. More
// than 64 rows go in chunks of 64 (matvec_tc_chunks), each reading the weights again.
inline bool matvec_tc_supported(int M, int K, int elem_bytes) {
  return elem_bytes == 2 && M >= 1 && K > 0 && K % PP_MATVEC_TC_STEP == 0;
}

// Whether a call of M rows (at most 64) takes the kernel ..._n1_ahead (Plan): with
// PERSONAPLEX_MATVEC_TC_AHEAD=1, 4-bit weights and one n8 tile of x.
inline bool matvec_tc_ahead(int bits, int M) {
  const char* env = std::getenv("PERSONAPLEX_MATVEC_TC_AHEAD");
  return bits == 4 && matvec_tc_tiles(M) == 1 && env && env[0] == '1' && env[1] == '\0';
}

// The row chunks of a call: fn(first row, rows) for each, at most 64 rows, in order.
template <class Fn>
void matvec_tc_chunks(int M, Fn fn) {
  for (int m0 = 0; m0 < M; m0 += kMatvecTcMaxRows) fn(m0, M - m0 < kMatvecTcMaxRows ? M - m0 : kMatvecTcMaxRows);
}

// Units (outputs) per block: 8 warps of 16 rows.
inline int matvec_tc_units(int gate) { return PP_MATVEC_TC_WARPS * (gate ? 8 : 16); }

// Splits along K for `blocks` blocks of `steps` steps, `slots` of which run at once
// (multiprocessors times the blocks one holds). A model: the blocks run in waves of
// `slots`, a block's time its steps plus one for its start and its partial sums, a step's
// time the same whatever runs beside it; so the count that gives the fewest waves times
// (steps a split + 1), the fewer splits on a tie (each adds M x rows partial sums to write
// and sum). Against the earlier rule (`fill` below) the q4 tick on an H200 took 39.88
// against 41.55 ms at 64 sessions, 25.07 / 25.76 at 32 (docs/PERF.md, 2026-12-02 later).
// PERSONAPLEX_MATVEC_TC_SPLITS=N: N for every call instead (bench/matvec_tc_bench.py's
// sweep); =fill: the earlier rule, blocks for about every slot (slots / blocks, rounded up).
inline int matvec_tc_splits(int blocks, int steps, int slots) {
  const char* env = std::getenv("PERSONAPLEX_MATVEC_TC_SPLITS");
  int splits = 0;
  if (env && std::strcmp(env, "fill") == 0) {
    splits = (slots + blocks - 1) / blocks;
  } else if (env && std::atoi(env) > 0) {
    splits = std::atoi(env);
  } else {
    long best = -1;
    for (int per = steps; per >= 1; --per) {  // steps a split; splits = steps / per rounded up
      const int n = (steps + per - 1) / per;
      if ((steps + n - 1) / n != per) continue;  // the same n as a larger per
      const long waves = (long(blocks) * n + slots - 1) / slots;
      const long cost = waves * (per + 1);
      if (best < 0 || cost < best) best = cost, splits = n;
    }
  }
  return splits < 1 ? 1 : splits > steps ? steps : splits;
}

// Whether matvec_tc loads its first step of weights before waiting for the kernel before
// it (MatvecTcArgs::early): unless PERSONAPLEX_MATVEC_TC_EARLY=0. On an H200 (2026-12-02,
// docs/PERF.md) the tick at 4 and 8 sessions took 0.1-0.4 ms less with it (q4 at 8:
// 10.81 / 10.88 against 11.18 / 11.08 ms; bf16 12.65 / 12.57 against 13.02 / 12.92), even
// from 32 (bf16 runs on cuBLAS there).
inline bool matvec_tc_early() {
  const char* env = std::getenv("PERSONAPLEX_MATVEC_TC_EARLY");
  return !(env && std::strcmp(env, "0") == 0);
}

// The launches' scalars for M rows (at most 64); `slots` as matvec_tc_splits says.
inline MatvecTcArgs matvec_tc_args(int M, int K, int n_out, int norm, int gate, int residual, float eps,
                                   int slots) {
  const int steps = K / PP_MATVEC_TC_STEP;
  const int blocks = (n_out + matvec_tc_units(gate) - 1) / matvec_tc_units(gate);
  const int splits = matvec_tc_splits(blocks, steps, slots);
  const int per = (steps + splits - 1) / splits;
  return {.M = M, .K = K, .n_out = n_out, .norm = norm, .gate = gate, .residual = residual, .eps = eps,
          .splits = (steps + per - 1) / per, .steps = per, .early = matvec_tc_early() ? 1 : 0};
}

// Floats of the workspace: inv_rms [M] (rounded up to 4), then the partials.
inline long matvec_tc_workspace_floats(const MatvecTcArgs& a) {
  return (a.M + 3) / 4 * 4 + long(a.splits) * a.M * (a.gate ? 2L : 1L) * a.n_out;
}

inline PpLaunch matvec_tc_rms_launch(const MatvecTcArgs& a) {
  return {.grid_x = static_cast<unsigned int>(a.M), .grid_y = 1, .grid_z = 1, .threads = kMatvecTcThreads};
}
inline PpLaunch matvec_tc_launch(const MatvecTcArgs& a) {
  return {.grid_x = pp_blocks_for("matvec", a.n_out, matvec_tc_units(a.gate)),
          .grid_y = static_cast<unsigned int>(a.splits), .grid_z = 1, .threads = kMatvecTcThreads};
}
inline PpLaunch matvec_tc_finish_launch(const MatvecTcArgs& a) {
  return {.grid_x = pp_blocks_for("matvec", long(a.M) * a.n_out, kMatvecTcFinishThreads), .grid_y = 1,
          .grid_z = 1, .threads = kMatvecTcFinishThreads};
}

#if defined(__CUDACC__) || defined(PP_EMULATE)
static_assert(matvec_tc::kThreads == kMatvecTcThreads, "the body's block size is its launch's");
#endif
#endif
