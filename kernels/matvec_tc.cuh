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
// step, each lane first issues its weight loads (16-byte vectors of its two rows,
// g and g + 8 of the tile), then the block copies x's 256 columns for all its rows
// (normalised and rounded as the reference does, zero past M) into workgroup
// memory, and each warp multiplies its tile by x: NT n8 tiles of 8 rows of x.
// The weight tile is read once for all M rows, which is what the 8-row matvec
// could not do (it re-read the weights per 8 rows).
//
// K order: a dot product does not depend on the order of its terms, so lane
// (g, t) feeds the mma's logical k = 2t, 2t+1, 2t+8, 2t+9 with 4 consecutive
// physical k of its own vector, and takes x's matching 4 values from the tile.
// Every weight format then loads whole 16-byte vectors: bf16/f16 as they are, and
// MLX's affine 4- and 8-bit weights (w = scale * q + bias per group of 64, as
// matvec.cuh reads them) dequantised to T in registers, w = T(scale * q + bias),
// which is what mx.dequantize computes.
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
};

#define PP_MATVEC_TC_STEP 256   // K per step
#define PP_MATVEC_TC_WARPS 8

#if defined(__CUDACC__) || defined(PP_EMULATE)

#include "formats.cuh"
#include "matvec.cuh"

namespace matvec_tc {

constexpr int kWarps = PP_MATVEC_TC_WARPS;
constexpr int kThreads = kWarps * 32;
constexpr int kStep = PP_MATVEC_TC_STEP;
constexpr int kStride = kStep + 8;  // elements per row of the x tile: 16 bytes of skew per row

// 8 weights (one octet) as 4 registers of T pairs, in order: (w0, w1), (w2, w3), ...
template <class F, class W>
struct Octets;

template <class F>
struct Octets<F, matvec::Dense<F>> {
  static constexpr int kPerVec = 1;  // octets per 16-byte vector
  static PP_DEVICE void get(pp_u32x4 v, int, float, float, PP_THREAD pp_u32* r) {
    r[0] = v.x;
    r[1] = v.y;
    r[2] = v.z;
    r[3] = v.w;
  }
};

template <class F, int BITS>
struct Octets<F, matvec::Affine<BITS>> {
  static constexpr int kPerVec = 128 / BITS / 8;
  static PP_DEVICE void get(pp_u32x4 v, int o, float sc, float bi, PP_THREAD pp_u32* r) {
    float q[8];
    matvec::Affine<BITS>::unpack_sub(v, o, q);
    #pragma unroll
    for (int i = 0; i < 4; ++i) r[i] = pp::pack2<F>(sc * q[2 * i] + bi, sc * q[2 * i + 1] + bi);
  }
};

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

// x: [M, K]; w: [rows, row_words] (dense rows reinterpreted); scales, biases:
// [rows, K / 64] (affine only); alpha: [K] and inv_rms: [M] (norm only);
// part: [splits, M, rows] float32. xs: NT * 8 * kStride elements of workgroup memory.
template <class F, class W, int NT>
PP_DEVICE void project(const PP_GLOBAL typename F::Elem* x, const PP_GLOBAL pp_u32* w,
                       const PP_GLOBAL typename F::Elem* scales, const PP_GLOBAL typename F::Elem* biases,
                       const PP_GLOBAL typename F::Elem* alpha, const PP_GLOBAL float* inv_rms,
                       PP_GLOBAL float* part, MatvecTcArgs a, PP_SHARED_PTR typename F::Elem* xs, int block,
                       int split, int tid) {
  typedef typename F::Elem E;
  constexpr int C = W::kChunk;                  // weights per 16-byte vector
  constexpr int VL = kStep / C / 4;             // vectors per row per step, per lane
  constexpr int OCT = Octets<F, W>::kPerVec;
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
  for (int s = s0; s < s1; ++s) {
    const int kb = s * kStep;
    pp_u32x4 wl[VL], wh[VL];
    float sl[VL], bl[VL], sh[VL], bh[VL];
    #pragma unroll
    for (int i = 0; i < VL; ++i) {
      const int k = kb + (t + 4 * i) * C;
      wl[i] = pp_load16(w + r_lo * words + W::row_words(k));
      wh[i] = pp_load16(w + r_hi * words + W::row_words(k));
      if (W::kAffine) {
        sl[i] = F::load(scales[r_lo * groups + k / 64]);
        bl[i] = F::load(biases[r_lo * groups + k / 64]);
        sh[i] = F::load(scales[r_hi * groups + k / 64]);
        bh[i] = F::load(biases[r_hi * groups + k / 64]);
      } else {
        sl[i] = bl[i] = sh[i] = bh[i] = 0.f;
      }
    }

    // The x tile: NT * 8 rows of 256, 32 vectors of 8 per row.
    PP_BARRIER();  // the previous step's readers are done with it
    for (int e = tid; e < NT * 8 * 32; e += kThreads) {
      const int n = e >> 5, c = (e & 31) * 8;
      pp_u32x4 v = pp_zero16();
      if (n < a.M) {
        v = pp_load16(x + long(n) * a.K + kb + c);
        if (a.norm) {
          float xf[8], al[8];
          pp::unpack<F>(v, xf);
          pp::unpack<F>(pp_load16(alpha + kb + c), al);
          const float r = inv_rms[n];
          v.x = pp::pack2<F>(al[0] * (xf[0] * r), al[1] * (xf[1] * r));
          v.y = pp::pack2<F>(al[2] * (xf[2] * r), al[3] * (xf[3] * r));
          v.z = pp::pack2<F>(al[4] * (xf[4] * r), al[5] * (xf[5] * r));
          v.w = pp::pack2<F>(al[6] * (xf[6] * r), al[7] * (xf[7] * r));
        }
      }
      pp_store16(xs + n * kStride + c, v);
    }
    PP_BARRIER();

    #pragma unroll
    for (int i = 0; i < VL; ++i) {
      #pragma unroll
      for (int o = 0; o < OCT; ++o) {
        pp_u32 lo[4], hi[4];
        Octets<F, W>::get(wl[i], o, sl[i], bl[i], lo);
        Octets<F, W>::get(wh[i], o, sh[i], bh[i], hi);
        const pp_u32 a1[4] = {lo[0], hi[0], lo[1], hi[1]};
        const pp_u32 a2[4] = {lo[2], hi[2], lo[3], hi[3]};
        const int koff = (t + 4 * i) * C + o * 8;
        #pragma unroll
        for (int j = 0; j < NT; ++j) {
          const pp_u32x4 xv = pp_load16(xs + (j * 8 + g) * kStride + koff);
          mma<F>(acc[j], a1, xv.x, xv.y);
          mma<F>(acc[j], a2, xv.z, xv.w);
        }
      }
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

#include "launch.cuh"

constexpr int kMatvecTcThreads = PP_MATVEC_TC_WARPS * 32;
constexpr int kMatvecTcFinishThreads = 256;

// n8 tiles of x rows per block: the kernels are instantiated for 1, 2, 4 and 8
// (matvec_tc_<dtype>_<weights>_n<NT>), so for M up to 64.
constexpr int kMatvecTcMaxRows = 64;
inline int matvec_tc_tiles(int M) { return M <= 8 ? 1 : M <= 16 ? 2 : M <= 32 ? 4 : 8; }

// Workgroup memory of matvec_tc_..._n<NT>, in elements of T.
inline int matvec_tc_smem_elems(int nt) { return nt * 8 * (PP_MATVEC_TC_STEP + 8); }

// Whether the path takes this call: a 16-bit float x and whole 256-wide K steps. More
// than 64 rows go in chunks of 64 (matvec_tc_chunks), each reading the weights again.
inline bool matvec_tc_supported(int M, int K, int elem_bytes) {
  return elem_bytes == 2 && M >= 1 && K > 0 && K % PP_MATVEC_TC_STEP == 0;
}

// The row chunks of a call: fn(first row, rows) for each, at most 64 rows, in order.
template <class Fn>
void matvec_tc_chunks(int M, Fn fn) {
  for (int m0 = 0; m0 < M; m0 += kMatvecTcMaxRows) fn(m0, M - m0 < kMatvecTcMaxRows ? M - m0 : kMatvecTcMaxRows);
}

// Units (outputs) per block: 8 warps of 16 rows.
inline int matvec_tc_units(int gate) { return PP_MATVEC_TC_WARPS * (gate ? 8 : 16); }

// Splits along K: enough blocks for about two per multiprocessor, each split whole steps.
inline MatvecTcArgs matvec_tc_args(int M, int K, int n_out, int norm, int gate, int residual, float eps,
                                   int sm_count) {
  const int steps = K / PP_MATVEC_TC_STEP;
  const int blocks = (n_out + matvec_tc_units(gate) - 1) / matvec_tc_units(gate);
  int splits = (2 * sm_count + blocks - 1) / blocks;
  splits = splits < 1 ? 1 : splits > steps ? steps : splits;
  const int per = (steps + splits - 1) / splits;
  return {.M = M, .K = K, .n_out = n_out, .norm = norm, .gate = gate, .residual = residual, .eps = eps,
          .splits = (steps + per - 1) / per, .steps = per};
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
